"""The 26 backbones of the paper (Tables 1–3), keyed by `backbones.csv`'s `key`.

Each entry is a create function `(num_classes, img_size, **kwargs) -> nn.Module` returning a timm-style
model: `forward_features` (a (B, C, H, W) map for CNNs, tokens (B, prefix + H·W, C) for ViTs/MLPs),
`forward_head` (the backbone's own head) and `num_prefix_tokens` for token models. `num_classes=0` gives
the model without its classifier, which is what NOAH replaces. Nothing is ever downloaded.
"""
from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import timm
import torch
from timm.layers import GatedMlp, create_conv2d
from timm.models.mlp_mixer import MlpMixer, SpatialGatingBlock
from torch import nn
from torchvision.models import shufflenet_v2_x1_0

from ..config import ConfigError
from ..paper import read_paper_table
from . import pvt  # noqa: F401  (registers pvt_v1_* with timm)

CreateFn = Callable[..., nn.Module]


@dataclass(frozen=True)
class BackboneInfo:
    """One row of backbones.csv: the paper's name, family, width, NOAH's N and r, and the dropout the
    authors' code puts on NOAH's values for this backbone (docs/fidelity.md)."""

    key: str
    paper_name: str
    family: str
    paper_table: int
    width: float
    noah_N: int
    noah_r: float
    noah_dropout: float


@functools.cache
def backbone_table() -> dict[str, BackboneInfo]:
    """backbones.csv, the one place the paper's per-backbone defaults live."""
    return {row["key"]: BackboneInfo(row["key"], row["paper_name"], row["family"], int(row["paper_table"]),
                                     float(row["width"]), int(row["noah_N"]), float(row["noah_r"]),
                                     float(row["noah_dropout"]))
            for row in read_paper_table("backbones.csv")}


_REGISTRY: dict[str, CreateFn] = {}


def register_backbone(*keys: str) -> Callable[[CreateFn], CreateFn]:
    """Register a create function under one or more backbones.csv keys."""
    def wrap(fn: CreateFn) -> CreateFn:
        for key in keys:
            _REGISTRY[key] = fn
        return fn
    return wrap


def list_backbones() -> list[str]:
    """Registered keys in backbones.csv order."""
    return [k for k in backbone_table() if k in _REGISTRY]


def backbone_info(key: str) -> BackboneInfo:
    """The csv row of `key`, or a ConfigError listing the known keys."""
    if key not in _REGISTRY or key not in backbone_table():
        raise ConfigError("backbone", key, "one of " + ", ".join(list_backbones()))
    return backbone_table()[key]


def create_backbone(key: str, num_classes: int, img_size: int = 224, width: float = 1.0, **kwargs) -> nn.Module:
    """Build backbone `key` (random init) with `num_classes` outputs (0: no classifier), its channels
    `width` times the paper's."""
    backbone_info(key)
    if width != 1:
        kwargs.update(_narrowed(key, width))
    return _REGISTRY[key](key, num_classes=num_classes, img_size=img_size, **kwargs)


RESNET_CHANNELS = (64, 128, 256, 512)
"""timm's ResNet stage widths (a bottleneck's output is 4x its stage's), and 64 its stem's."""


def narrows(key: str) -> bool:
    """Whether backbone `key` can be built at another width than the paper's (the ResNets)."""
    return key.startswith("resnet")


def _narrowed(key: str, width: float) -> dict[str, Any]:
    """timm's options for `key` at `width` times its channels: every ResNet stage and the stem, so a narrow
    ResNet keeps its depth, its blocks and its feature map's size."""
    if not narrows(key):
        resnets = ", ".join(k for k in list_backbones() if narrows(k))
        raise ConfigError("width", width, f"1 for {key}: only the ResNets ({resnets}) narrow")
    return {"channels": tuple(max(1, round(c * width)) for c in RESNET_CHANNELS),
            "stem_width": max(1, round(RESNET_CHANNELS[0] * width))}


def has_class_token(key: str) -> bool:
    """Whether the backbone's own head reads a class token (so a `gap` head is a real alternative)."""
    return key.startswith(("deit_", "pvt_"))


# ---- CNNs: timm names equal our keys except for ResNets' absent width suffix

@register_backbone("resnet18", "resnet50", "resnet101", "resnet152",
                   "mobilenetv2_100", "mobilenetv2_075", "mobilenetv2_050", "mobilenetv2_035")
def _timm_cnn(key: str, num_classes: int, img_size: int, **kwargs) -> nn.Module:
    if key.startswith("resnet"):  # the authors' ResNets start every block's last BatchNorm at 1, not timm's 0
        kwargs.setdefault("zero_init_last", False)
    return timm.create_model(key, pretrained=False, num_classes=num_classes, **kwargs)


MNV3_HEAD_WIDTH = 1280
"""The paper's MobileNetV3-Small head conv width (2.94M Params); timm's small variant uses 1024."""


@register_backbone("mobilenetv3_small_100")
def _mobilenetv3_small(key: str, num_classes: int, img_size: int, **kwargs) -> nn.Module:
    # timm fixes the small head at 1024 inside its generator (num_features cannot be passed), so the
    # 1×1 head conv is rebuilt at the paper's width and the classifier resized to it.
    model = timm.create_model("mobilenetv3_small_100", pretrained=False, num_classes=num_classes, **kwargs)
    model.conv_head = create_conv2d(model.num_features, MNV3_HEAD_WIDTH, 1, bias=True)
    model.head_hidden_size = MNV3_HEAD_WIDTH
    model.reset_classifier(num_classes)
    return model


class ShuffleNetV2(nn.Module):
    """torchvision's ShuffleNetV2 with timm's forward_features / forward_head split."""

    num_prefix_tokens = 0

    def __init__(self, num_classes: int):
        super().__init__()
        net = shufflenet_v2_x1_0(weights=None, num_classes=max(num_classes, 1))
        self.features = nn.Sequential(net.conv1, net.maxpool, net.stage2, net.stage3, net.stage4, net.conv5)
        self.num_features = net.fc.in_features
        self.num_classes = num_classes
        self.fc = net.fc if num_classes > 0 else nn.Identity()

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)

    def forward_head(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.mean(dim=(2, 3)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


@register_backbone("shufflenetv2_100")
def _shufflenetv2(key: str, num_classes: int, img_size: int, **kwargs) -> nn.Module:
    if kwargs:
        raise ConfigError("backbone options", kwargs, "none for shufflenetv2_100")
    return ShuffleNetV2(num_classes)


# ---- Token models: width variants scale the embedding (and with it every hidden) width. timm's
# Mixer/gMLP factories fix embed_dim, so their width variants build timm's MlpMixer class directly.

_GMLP_TINY = dict(patch_size=16, num_blocks=30, mlp_ratio=6, block_layer=SpatialGatingBlock, mlp_layer=GatedMlp)

_TOKEN_MODELS: dict[str, tuple[str | type[nn.Module], dict]] = {
    "deit_base": ("deit_base_patch16_224", {}),
    "deit_small": ("deit_small_patch16_224", {}),
    "deit_tiny_100": ("deit_tiny_patch16_224", {}),
    "deit_tiny_075": ("deit_tiny_patch16_224", {"embed_dim": 144}),
    "deit_tiny_050": ("deit_tiny_patch16_224", {"embed_dim": 96}),
    "pvt_tiny_100": ("pvt_v1_tiny", {}),
    "pvt_tiny_075": ("pvt_v1_tiny_075", {}),
    "pvt_tiny_050": ("pvt_v1_tiny_050", {}),
    "mixer_base": ("mixer_b16_224", {}),
    "mixer_small_100": ("mixer_s16_224", {}),
    "mixer_small_075": (MlpMixer, {"patch_size": 16, "num_blocks": 8, "embed_dim": 384}),
    "mixer_small_050": (MlpMixer, {"patch_size": 16, "num_blocks": 8, "embed_dim": 256}),
    "gmlp_small": ("gmlp_s16_224", {}),
    "gmlp_tiny_100": ("gmlp_ti16_224", {}),
    # a plain 0.75× scale gives 3.86M, 1.3% under the paper's 3.91M; a 6.125× gated MLP (588 wide) matches
    "gmlp_tiny_075": (MlpMixer, {**_GMLP_TINY, "embed_dim": 96, "mlp_ratio": 6.125}),
    "gmlp_tiny_050": (MlpMixer, {**_GMLP_TINY, "embed_dim": 64}),
}


@register_backbone(*_TOKEN_MODELS)
def _timm_tokens(key: str, num_classes: int, img_size: int, **kwargs) -> nn.Module:
    factory, width_args = _TOKEN_MODELS[key]
    if isinstance(factory, str):
        return timm.create_model(factory, pretrained=False, num_classes=num_classes, img_size=img_size,
                                 **width_args, **kwargs)
    return factory(num_classes=num_classes, img_size=img_size, **width_args, **kwargs)


def detach_head_conv(model: nn.Module) -> nn.Module | None:
    """Take MobileNetV3's 1×1 head conv (+act) out of its head, to run on the map before NOAH.

    The appendix inserts a 1×1 conv ahead of NOAH on MobileNetV3-Small to keep its head's Params; timm
    runs that conv after pooling, so it moves from the backbone's head to the feature path here.
    """
    if not isinstance(model, timm.models.MobileNetV3) or isinstance(model.conv_head, nn.Identity):
        return None
    neck = nn.Sequential(model.conv_head, model.norm_head, model.act2)
    model.conv_head, model.norm_head, model.act2 = nn.Identity(), nn.Identity(), nn.Identity()
    return neck
