"""Market-1501 ranking metrics (Table 9): CMC and mAP of a query × gallery distance matrix.

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
"""
from __future__ import annotations

import torch

JUNK_PID = -1
DISTRACTOR_PID = 0


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
