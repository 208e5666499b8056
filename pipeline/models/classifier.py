"""A backbone plus a head, with one feature-map interface for every family.

`forward_features` always gives a (B, C, H, W) map: CNN maps as they are, ViT/MLP tokens without
their class token reshaped to the H×W grid. Every head reads that map; the backbone's own head of a
class-token model also needs the class token, which `forward_head` takes as `prefix_tokens`.
"""
from __future__ import annotations

import math

import torch
from torch import nn


def children_no_weight_decay(model: nn.Module) -> set[str]:
    """The `no_weight_decay()` names of `model`'s direct children, prefixed with the child's name: what timm's
    optimizer factory reads only from the top-level model (a backbone's class token, NOAH's biases)."""
    return {f"{name}.{p}" for name, child in model.named_children() if hasattr(child, "no_weight_decay")
            for p in child.no_weight_decay()}


class Classifier(nn.Module):
    """`backbone` features -> optional `neck` -> `head` (None: the backbone's own head)."""

    def __init__(self, backbone: nn.Module, head: nn.Module | None, neck: nn.Module | None = None,
                 tokens: bool = False):
        super().__init__()
        self.backbone, self.neck, self.head = backbone, neck, head
        self.tokens = tokens
        self.num_prefix_tokens = getattr(backbone, "num_prefix_tokens", 0) if tokens else 0

    def no_weight_decay(self) -> set[str]:
        """Parameters a recipe with `no_decay_norm_bias` never decays, beyond timm's 1-D and `.bias` rule."""
        return children_no_weight_decay(self)

    def forward_parts(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The (B, C, H, W) feature map and the prefix (class) tokens (B, P, C), None when there are none."""
        feats = self.backbone.forward_features(x)
        prefix = None
        if self.tokens:
            p = self.num_prefix_tokens
            prefix, grid = (feats[:, :p], feats[:, p:]) if p else (None, feats)
            b, n, c = grid.shape
            side = math.isqrt(n)
            if side * side != n:
                raise ValueError(f"{n} tokens do not form a square grid")
            feats = grid.transpose(1, 2).reshape(b, c, side, side)
        if self.neck is not None:
            feats = self.neck(feats)
        return feats, prefix

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_parts(x)[0]

    def forward_head(self, feats: torch.Tensor, prefix_tokens: torch.Tensor | None = None) -> torch.Tensor:
        """Logits from the feature map (plus the class token for a class-token backbone's own head)."""
        if self.head is not None:
            return self.head(feats)
        if not self.tokens:
            return self.backbone.forward_head(feats)
        tokens = feats.flatten(2).transpose(1, 2)
        if self.num_prefix_tokens:
            if prefix_tokens is None:
                raise ValueError("this head reads the class token: pass forward_parts(x)[1] as prefix_tokens")
            tokens = torch.cat([prefix_tokens, tokens], dim=1)
        return self.backbone.forward_head(tokens)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(*self.forward_parts(x))
