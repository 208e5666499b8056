"""Person re-identification (Table 9): Market-1501 ranking metrics, the ResNet50-FC and NOAH reid
models, and their initialisation from a classification checkpoint for the fine-tuning regime.

Ranking uses the Euclidean (L2) distance between raw, un-normalised embeddings (torchreid's default
metric). The protocol is the Market-1501 devkit's (Zheng et al., ICCV 2015, `evaluation.m` /
`compute_AP.m`): for each query the gallery is sorted by distance; gallery images of the query's
identity taken by the query's camera and junk images (pid -1) are removed from the ranking;
distractors (pid 0) stay in it as negatives; a query with no remaining image of its identity is
skipped. CMC rank-k is the share of queries whose first true match is within the top k. AP is the
devkit's: the area under the precision-recall curve by the trapezoid rule, i.e. the mean over the
true matches of (precision just before the hit + precision at the hit) / 2, with precision 1 before
the first ranked image. (torchreid and scikit-learn report the un-interpolated mean of the precision at
each hit, which is never lower than this.)

Models (`build_reid_model`): ResNet50-FC, the paper's baseline, is backbone → GAP → FC to a 512-D
vector; its NOAH variant replaces GAP → FC by the NOAH head with M = 512 outputs read from the
backbone's feature map. Both then apply BatchNorm1d + ReLU to that vector, which is the embedding used
for matching, and an identity classifier (FC to the training identities) trained with cross-entropy.
This is torchreid's `resnet50_fc512` (fc = Linear + BatchNorm1d + ReLU), whose training settings the
appendix's two regimes reproduce; unlike it the backbone keeps its last stride of 2, so the backbone
is exactly the classification one and fine-tuning loads its weights unchanged.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from .config import ConfigError, HeadConfig

JUNK_PID = -1
DISTRACTOR_PID = 0
EMBED_DIM = 512


def pairwise_distance(query: torch.Tensor, gallery: torch.Tensor) -> torch.Tensor:
    """Euclidean distances (Q, G) between query (Q, D) and gallery (G, D) embeddings."""
    return torch.cdist(query.float(), gallery.float())


def market1501_metrics(distmat: torch.Tensor, q_pids: torch.Tensor, g_pids: torch.Tensor,
                       q_camids: torch.Tensor, g_camids: torch.Tensor, max_rank: int = 50,
                       chunk_size: int = 256) -> dict[str, float | torch.Tensor | int]:
    """CMC (rank-1 … rank-`max_rank`) and mAP of a (Q, G) distance matrix, as fractions in [0, 1].

    Returns `{"cmc": (max_rank,) tensor, "rank1", "rank5", "map", "num_valid_queries"}`. Ties in
    distance are broken by gallery order (stable sort). Queries are processed `chunk_size` at a time
    so Market-1501's 3368 × 19732 matrix never needs more than a few chunk-sized (chunk, G) tensors.
    """
    if max_rank < 5:
        raise ValueError(f"max_rank: got {max_rank}; allowed: an integer >= 5 (rank-5 is reported)")
    distmat = torch.as_tensor(distmat)
    q_pids, g_pids, q_camids, g_camids = (torch.as_tensor(t).long().flatten()
                                          for t in (q_pids, g_pids, q_camids, g_camids))
    num_q, num_g = distmat.shape
    if (len(q_pids), len(q_camids), len(g_pids), len(g_camids)) != (num_q, num_q, num_g, num_g):
        raise ValueError(f"distmat is {num_q}x{num_g} but got {len(q_pids)} query pids, {len(q_camids)} "
                         f"query camids, {len(g_pids)} gallery pids and {len(g_camids)} gallery camids")
    q_pids, g_pids, q_camids, g_camids = (t.to(distmat.device) for t in (q_pids, g_pids, q_camids, g_camids))
    ranks = torch.arange(1, max_rank + 1, device=distmat.device)
    cmc_hits = torch.zeros(max_rank, device=distmat.device)
    ap_sum = torch.zeros((), dtype=torch.float64, device=distmat.device)
    num_valid = 0
    for start in range(0, num_q, chunk_size):
        order = torch.sort(distmat[start:start + chunk_size], dim=1, stable=True).indices
        pid, cam = g_pids[order], g_camids[order]
        q_pid, q_cam = q_pids[start:start + chunk_size, None], q_camids[start:start + chunk_size, None]
        same_id = pid == q_pid
        kept = (pid != JUNK_PID) & ~(same_id & (cam == q_cam))
        good = same_id & kept & (pid != DISTRACTOR_PID)
        num_good = good.sum(dim=1)
        valid = num_good > 0
        # For every true match: its 1-based rank once junk is removed, and the true matches up to it.
        rows, cols = good.nonzero(as_tuple=True)
        rank = kept.cumsum(dim=1, dtype=torch.int32)[rows, cols].double()
        hits = good.cumsum(dim=1, dtype=torch.int32)[rows, cols].double()
        first_hit = torch.full((len(order),), torch.inf, dtype=torch.float64, device=distmat.device)
        first_hit[rows[hits == 1]] = rank[hits == 1]
        cmc_hits += (first_hit[valid, None] <= ranks).sum(dim=0)
        precision_before = torch.where(rank > 1, (hits - 1) / (rank - 1).clamp(min=1), 1.0)
        area = torch.zeros(len(order), dtype=torch.float64, device=distmat.device)
        area.index_add_(0, rows, (hits / rank + precision_before) / 2)
        ap_sum += (area[valid] / num_good[valid]).sum()
        num_valid += int(valid.sum())
    if num_valid == 0:
        raise ValueError("no query has a true match in the gallery (same identity, other camera)")
    cmc = (cmc_hits / num_valid).cpu()
    return {"cmc": cmc, "rank1": float(cmc[0]), "rank5": float(cmc[4]),
            "map": float(ap_sum / num_valid), "num_valid_queries": num_valid}


# ---- models


class ReidNet(nn.Module):
    """Backbone feature map → `embedding` head (GAP+FC or NOAH, 512 outputs) → BN + ReLU → identities.

    `forward` gives identity logits (training); `embed` the 512-D vector ranked at evaluation.
    """

    def __init__(self, backbone: nn.Module, embedding: nn.Module, head: HeadConfig, num_ids: int,
                 embed_dim: int = EMBED_DIM):
        super().__init__()
        self.head_cfg = head
        self.backbone, self.embedding = backbone, embedding
        self.bottleneck = nn.Sequential(nn.BatchNorm1d(embed_dim), nn.ReLU(inplace=True))
        self.classifier = nn.Linear(embed_dim, num_ids)
        nn.init.normal_(self.classifier.weight, std=0.01)  # torchreid's classifier init
        nn.init.zeros_(self.classifier.bias)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """The (B, 512) embedding used for matching."""
        return self.bottleneck(self.embedding(self.backbone.forward_features(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.embed(x))


def build_reid_model(backbone: str, head: dict[str, Any] | HeadConfig, num_ids: int,
                     img_size: int = 256) -> ReidNet:
    """ResNet50-FC (`head` kind `baseline`) or its NOAH variant (kind `noah`) over `num_ids` identities.

    The backbone is the zoo's (`build_model` with its own head, then that classifier removed), so its
    weights are the classification model's; the embedding head is `build_head(head, C, 512)`: GAP+FC
    for `baseline`, the NOAH head with M = 512 (N and r from backbones.csv unless given) for `noah`.
    """
    from .models import build_head, build_model, resolve_head

    cfg = resolve_head(backbone, head)
    if cfg.kind == "gap":
        raise ConfigError("head.kind", "gap", "'baseline' (ResNet50-FC) or 'noah' for a reid model")
    if not isinstance(num_ids, int) or isinstance(num_ids, bool) or num_ids < 2:
        raise ConfigError("num_ids", num_ids, "an integer >= 2 (training identities)")
    net = build_model(backbone, {"kind": "baseline"}, num_ids, img_size)
    net.backbone.reset_classifier(0)
    return ReidNet(net, build_head(cfg, net.backbone.num_features, EMBED_DIM), cfg, num_ids)


def load_backbone(model: ReidNet, checkpoint: str | Path, trial_id: str | None = None) -> list[str]:
    """Initialise `model`'s backbone from a classification checkpoint of the same backbone and head.

    `checkpoint` is the trainer's, read and verified by its `load_checkpoint` (CheckpointError when damaged
    or, with `trial_id`, another trial's). Every backbone tensor must be there with its shape (strict); the
    checkpoint's classifier (its own FC, or its NOAH head over the classification classes) is left out and
    the reid embedding head and identity classifier keep their fresh initialisation. Returns the skipped keys.
    """
    from .train import load_checkpoint

    found = load_checkpoint(checkpoint, trial_id)
    if found is None:
        raise ConfigError("init_from", str(checkpoint), "the path of a classification checkpoint file")
    state = found["model"]
    own = model.backbone.state_dict()
    missing = [k for k in own if k not in state]
    wrong = [f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in own.items()
             if k in state and state[k].shape != v.shape]
    if missing or wrong:
        problem = f"missing {missing[:3]}" if missing else f"shapes differ: {wrong[:3]}"
        raise ConfigError("init_from", str(checkpoint), f"a checkpoint of this backbone ({problem})")
    skipped = sorted(set(state) - set(own))
    noah_head = any(k.startswith("head.") for k in skipped)
    if noah_head != (model.head_cfg.kind == "noah"):
        found = "NOAH" if noah_head else "its own (baseline)"
        raise ConfigError("init_from", str(checkpoint), f"a classification checkpoint with a "
                          f"{model.head_cfg.kind} head like this reid model's (it has {found} head)")
    model.backbone.load_state_dict({k: state[k] for k in own}, strict=True)
    return skipped


# ---- evaluation


@torch.inference_mode()
def extract(model: ReidNet, loader: DataLoader) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Embeddings (float32), person ids and camera ids of every image a reid loader yields."""
    model.eval()
    from .train import precision

    device = next(model.parameters()).device
    autocast, memory_format = precision(device)
    feats, pids, camids = [], [], []
    for batch in loader:
        if len(batch) != 4:
            raise ValueError("a reid loader yields (images, labels, pids, camids); this one yields "
                             f"{len(batch)} items (is the dataset a reid one?)")
        with autocast:
            feats.append(model.embed(batch[0].to(device, non_blocking=True, memory_format=memory_format)).float())
        pids.append(batch[2])
        camids.append(batch[3])
    return torch.cat(feats), torch.cat(pids), torch.cat(camids)


def evaluate_reid(model: ReidNet, query_loader: DataLoader, gallery_loader: DataLoader) -> dict[str, float]:
    """Rank-1, rank-5 and mAP (%) of `model` on Market-1501-style query and gallery loaders.

    The loaders must cover their whole split (not a data-parallel shard): every rank can call this and
    gets the same numbers. Distances are computed on the model's device.
    """
    q, q_pids, q_camids = extract(model, query_loader)
    g, g_pids, g_camids = extract(model, gallery_loader)
    out = market1501_metrics(pairwise_distance(q, g), q_pids, g_pids, q_camids, g_camids)
    return {"rank1": 100 * out["rank1"], "rank5": 100 * out["rank5"], "map": 100 * out["map"]}
