"""The re-identification model of Table 9: ResNet50-FC, the paper's baseline, and its NOAH variant.

ResNet50-FC is backbone → GAP → FC to a 512-D vector; its NOAH variant replaces GAP → FC by the NOAH head
with M = 512 outputs read from the backbone's feature map. Both then apply BatchNorm1d + ReLU to that
vector, which is the embedding used for matching, and an identity classifier (FC to the training
identities) trained with cross-entropy. This is torchreid's `resnet50_fc512` (fc = Linear + BatchNorm1d +
ReLU), whose training settings the appendix's two regimes reproduce; unlike it the backbone keeps its last
stride of 2, so the backbone is exactly the classification one and fine-tuning loads its weights unchanged.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..config import ConfigError, HeadConfig
from .classifier import children_no_weight_decay
from .factory import build_head, build_model, resolve_head

EMBED_DIM = 512


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

    def no_weight_decay(self) -> set[str]:
        return children_no_weight_decay(self)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """The (B, 512) embedding used for matching."""
        return self.bottleneck(self.embedding(self.backbone.forward_features(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.embed(x))


def build_reid_model(backbone: str, head: dict[str, Any] | HeadConfig, num_ids: int,
                     img_size: int = 256, zero_init_last: bool = False, width: float = 1.0) -> ReidNet:
    """ResNet50-FC (`head` kind `baseline`) or its NOAH variant (kind `noah`) over `num_ids` identities.

    The backbone is the zoo's (`build_model` with its own head, then that classifier removed), so its
    weights are the classification model's; the embedding head is `build_head(head, C, 512)`: GAP+FC
    for `baseline`, the NOAH head with M = 512 (N and r the backbone's defaults unless given) for `noah`.
    """
    cfg = resolve_head(backbone, head)
    if cfg.kind == "gap":
        raise ConfigError("head.kind", "gap", "'baseline' (ResNet50-FC) or 'noah' for a reid model")
    if not isinstance(num_ids, int) or isinstance(num_ids, bool) or num_ids < 2:
        raise ConfigError("num_ids", num_ids, "an integer >= 2 (training identities)")
    net = build_model(backbone, {"kind": "baseline"}, num_ids, img_size, zero_init_last=zero_init_last, width=width)
    net.backbone.reset_classifier(0)
    return ReidNet(net, build_head(cfg, net.backbone.num_features, EMBED_DIM), cfg, num_ids)
