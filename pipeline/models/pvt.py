"""PVT v1 (Wang et al. 2021, "Pyramid Vision Transformer"), written in timm's style and registered with it.

timm ships only PVT v2; the paper's PVT-Tiny is v1: four stages of patch embedding + transformer blocks
with spatial-reduction attention, and a class token that joins only in the last stage.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.layers import DropPath, Mlp, trunc_normal_
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from torch import nn


class SpatialReductionAttention(nn.Module):
    """Multi-head attention whose keys/values come from a map shrunk by `sr_ratio` (a strided conv)."""

    def __init__(self, dim: int, num_heads: int, sr_ratio: int, qkv_bias: bool = True):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.kv = nn.Linear(dim, dim * 2, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.sr_ratio = sr_ratio
        if sr_ratio > 1:
            self.sr = nn.Conv2d(dim, dim, kernel_size=sr_ratio, stride=sr_ratio)
            self.norm = nn.LayerNorm(dim, eps=1e-6)

    def forward(self, x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        b, n, c = x.shape
        heads = self.num_heads
        q = self.q(x).reshape(b, n, heads, c // heads).transpose(1, 2)
        if self.sr_ratio > 1:
            kv_in = x.transpose(1, 2).reshape(b, c, *size)
            kv_in = self.norm(self.sr(kv_in).flatten(2).transpose(1, 2))
        else:
            kv_in = x
        k, v = self.kv(kv_in).reshape(b, -1, 2, heads, c // heads).permute(2, 0, 3, 1, 4)
        x = F.scaled_dot_product_attention(q, k, v)
        return self.proj(x.transpose(1, 2).reshape(b, n, c))


class Block(nn.Module):
    """Pre-norm transformer block with spatial-reduction attention."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, sr_ratio: int, drop_path: float = 0.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = SpatialReductionAttention(dim, num_heads, sr_ratio)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x), size))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class Stage(nn.Module):
    """Patch embedding (strided conv + LayerNorm), position embedding and blocks at one resolution."""

    def __init__(self, in_chs: int, dim: int, patch: int, grid: int, depth: int, num_heads: int,
                 mlp_ratio: float, sr_ratio: int, drop_path: list[float], class_token: bool):
        super().__init__()
        self.proj = nn.Conv2d(in_chs, dim, kernel_size=patch, stride=patch)
        self.norm = nn.LayerNorm(dim, eps=1e-5)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim)) if class_token else None
        self.pos_embed = nn.Parameter(torch.zeros(1, grid * grid + int(class_token), dim))
        self.blocks = nn.ModuleList(Block(dim, num_heads, mlp_ratio, sr_ratio, dp) for dp in drop_path)
        trunc_normal_(self.pos_embed, std=0.02)
        if self.cls_token is not None:
            trunc_normal_(self.cls_token, std=0.02)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        x = self.proj(x)
        size = (x.shape[2], x.shape[3])
        x = self.norm(x.flatten(2).transpose(1, 2))
        if self.cls_token is not None:
            x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        x = x + self.pos_embed
        for block in self.blocks:
            x = block(x, size)
        return x, size


class PyramidVisionTransformer(nn.Module):
    """PVT v1. `forward_features` gives the last stage's tokens after the final LayerNorm (class token first when it
    has one); `global_pool` is what `forward_head` reads, as in timm's ViT: 'token', 'avg' or '' (every token)."""

    def __init__(self, img_size: int = 224, in_chans: int = 3, num_classes: int = 1000,
                 embed_dims: tuple[int, ...] = (64, 128, 320, 512), depths: tuple[int, ...] = (2, 2, 2, 2),
                 num_heads: tuple[int, ...] = (1, 2, 5, 8), mlp_ratios: tuple[float, ...] = (8, 8, 4, 4),
                 sr_ratios: tuple[int, ...] = (8, 4, 2, 1), class_token: bool = True,
                 global_pool: str = "token", drop_rate: float = 0.0, drop_path_rate: float = 0.0):
        super().__init__()
        if img_size % 16:
            raise ValueError(f"PVT needs an image size divisible by 16, got {img_size}")
        if global_pool not in ("token", "avg", "") or (global_pool == "token" and not class_token):
            raise ValueError(f"global_pool {global_pool!r} needs 'avg', '' (every token, unpooled) or 'token' "
                             "with a class token")
        self.num_classes, self.global_pool = num_classes, global_pool
        self.num_features = self.head_hidden_size = embed_dims[-1]
        self.num_prefix_tokens = int(class_token)
        rates = [drop_path_rate * i / max(sum(depths) - 1, 1) for i in range(sum(depths))]
        stages, in_chs, stride = [], in_chans, 1
        for i, (dim, depth) in enumerate(zip(embed_dims, depths)):
            patch = 4 if i == 0 else 2
            stride *= patch
            first = sum(depths[:i])
            stages.append(Stage(in_chs, dim, patch, img_size // stride, depth, num_heads[i], mlp_ratios[i],
                                sr_ratios[i], rates[first:first + depth],
                                class_token and i == len(embed_dims) - 1))
            in_chs = dim
        self.stages = nn.ModuleList(stages)
        self.norm = nn.LayerNorm(embed_dims[-1], eps=1e-6)
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    def no_weight_decay(self) -> set[str]:
        """The class token, which the authors' PVT spares from weight decay (`vit/pvt/classification/pvt.py`
        L186-189); timm's optimizer factory reads this as it does a ViT's."""
        return {f"stages.{i}.cls_token" for i, stage in enumerate(self.stages) if stage.cls_token is not None}

    def reset_classifier(self, num_classes: int) -> None:
        self.num_classes = num_classes
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        b = x.shape[0]
        for i, stage in enumerate(self.stages):
            x, size = stage(x)
            if i < len(self.stages) - 1:
                x = x.transpose(1, 2).reshape(b, -1, *size)
        return self.norm(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        if self.global_pool == "token":
            x = x[:, 0]
        elif self.global_pool == "avg":
            x = x[:, self.num_prefix_tokens:].mean(dim=1)
        x = self.head_drop(x)
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def _create(variant: str, width: float, pretrained: bool, **kwargs) -> PyramidVisionTransformer:
    """PVT-Tiny with every stage's channels scaled by `width` (heads keep their count)."""
    if pretrained:
        raise ValueError("no pretrained PVT v1 weights: this pipeline trains from scratch")
    dims = tuple(int(round(d * width)) for d in (64, 128, 320, 512))
    return build_model_with_cfg(PyramidVisionTransformer, variant, pretrained, embed_dims=dims, **kwargs)


default_cfgs = generate_default_cfgs({
    name: {"num_classes": 1000, "input_size": (3, 224, 224), "crop_pct": 0.875, "interpolation": "bicubic",
           "first_conv": "stages.0.proj", "classifier": "head"}
    for name in ("pvt_v1_tiny", "pvt_v1_tiny_075", "pvt_v1_tiny_050")
})


@register_model
def pvt_v1_tiny(pretrained: bool = False, **kwargs) -> PyramidVisionTransformer:
    """PVT-Tiny (13.2M Params)."""
    return _create("pvt_v1_tiny", 1.0, pretrained, **kwargs)


@register_model
def pvt_v1_tiny_075(pretrained: bool = False, **kwargs) -> PyramidVisionTransformer:
    """PVT-Tiny at 0.75× width."""
    return _create("pvt_v1_tiny_075", 0.75, pretrained, **kwargs)


@register_model
def pvt_v1_tiny_050(pretrained: bool = False, **kwargs) -> PyramidVisionTransformer:
    """PVT-Tiny at 0.5× width."""
    return _create("pvt_v1_tiny_050", 0.5, pretrained, **kwargs)
