"""The backbones: each one's create function registered with its facts (`BackboneInfo`), as timm keeps a
model's configuration beside its `@register_model`. The registry is the universe: `list_backbones()` is every
registered key in registration order (the paper's, Tables 1–3), and whatever iterates backbones (the complexity
command, the benchmark, the reports) iterates it. `pipeline/paper/backbones.csv` holds only what the paper
prints about the backbones it uses; tests check that the registered facts agree with it.

Each entry is a create function `(num_classes, img_size, **kwargs) -> nn.Module` returning a timm-style
model: `forward_features` (a (B, C, H, W) map for CNNs, tokens (B, prefix + H·W, C) for ViTs/MLPs),
`forward_head` (the backbone's own head) and `num_prefix_tokens` for token models. `num_classes=0` gives
the model without its classifier, which is what NOAH replaces. Nothing is ever downloaded.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, get_args

import timm
import torch
from timm.layers import GatedMlp, create_conv2d
from timm.models.mlp_mixer import MlpMixer, SpatialGatingBlock
from torch import nn
from torchvision.models import shufflenet_v2_x1_0

from ..config import ConfigError
from . import pvt  # noqa: F401  (registers pvt_v1_* with timm)

CreateFn = Callable[..., nn.Module]

Family = Literal["cnn", "vit", "mlp"]
DropoutSource = Literal["code", "guess"]
FAMILY_TABLES: dict[Family, int] = {"cnn": 1, "vit": 2, "mlp": 3}
"""The paper's table of each family: Table 1 CNNs, Table 2 ViTs, Table 3 MLPs (params.yaml `tables.table1/2/3`)."""


@dataclass(frozen=True)
class BackboneInfo:
    """A registered backbone's facts: its display name (the paper's, for a backbone the paper uses), family,
    width multiplier, the N, r and dropout NOAH gets on it by default, whether its own head reads a class token
    (so a `gap` head is a real alternative), whether it narrows (`profiles.*.resnet_width`), and which of the
    recipes' options its blocks take (`zero_init_last`, `block_dropout`).

    `noah_dropout` is not the paper's (it states none) but the authors' code's for this backbone
    (`dropout_source = "code"`) or its family's value where their commands state none (`"guess"`);
    see docs/fidelity.md."""

    key: str
    name: str
    family: Family
    noah_N: int
    noah_r: float
    noah_dropout: float
    width: float = 1.0
    dropout_source: DropoutSource = "code"
    class_token: bool = False
    narrows: bool = False
    zero_init_last: bool = False  # its residual blocks' last norms can start at 0 (timm's ResNets)
    block_dropout: bool = False  # its blocks' MLPs take a dropout rate (timm's `proj_drop_rate`)

    def __post_init__(self) -> None:
        if self.family not in get_args(Family) or self.dropout_source not in get_args(DropoutSource):
            raise ValueError(f"backbone {self.key}: family {self.family!r}, dropout_source {self.dropout_source!r}")

    @property
    def paper_table(self) -> int:
        """The table of Tables 1–3 its family's rows go to."""
        return FAMILY_TABLES[self.family]


_REGISTRY: dict[str, CreateFn] = {}
_INFO: dict[str, BackboneInfo] = {}


def register_backbone(*infos: BackboneInfo) -> Callable[[CreateFn], CreateFn]:
    """Register a create function under one or more backbones, each with its facts; called as
    `fn(key, num_classes=…, img_size=…, **kwargs)`."""
    def wrap(fn: CreateFn) -> CreateFn:
        for info in infos:
            if info.key in _INFO:
                raise ValueError(f"backbone {info.key} is registered twice")
            _REGISTRY[info.key], _INFO[info.key] = fn, info
        return fn
    return wrap


def list_backbones() -> list[str]:
    """Every registered key, in registration order (the paper's: Tables 1–3)."""
    return list(_INFO)


def backbone_table() -> dict[str, BackboneInfo]:
    """Every registered backbone's facts by key, in `list_backbones()` order."""
    return dict(_INFO)


def backbone_info(key: str) -> BackboneInfo:
    """The facts of backbone `key`, or a ConfigError listing the registered keys."""
    if key not in _INFO:
        raise ConfigError("backbone", key, "one of " + ", ".join(list_backbones()))
    return _INFO[key]


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
    return key in _INFO and _INFO[key].narrows


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
    return key in _INFO and _INFO[key].class_token


# ---- CNNs: timm names equal our keys except for ResNets' absent width suffix. Table 1: N = 4, r = 1/2 in
# ResNet18; N = 4, r = 1/8 in ResNet50/101/152; N = 8, r = 1/4 in the MobileNets and ShuffleNetV2.


def _resnet(key: str, name: str, r: float, dropout_source: str = "code") -> BackboneInfo:
    """A timm ResNet: N = 4, dropout 0.1 (the authors' ResNet18 command); it narrows, its last norms may start at 0."""
    return BackboneInfo(key, name, "cnn", 4, r, 0.1, dropout_source=dropout_source, narrows=True,
                        zero_init_last=True)


@register_backbone(
    _resnet("resnet18", "ResNet18", 0.5),
    _resnet("resnet50", "ResNet50", 0.125, "guess"),
    _resnet("resnet101", "ResNet101", 0.125, "guess"),
    _resnet("resnet152", "ResNet152", 0.125, "guess"),
    BackboneInfo("mobilenetv2_100", "MobileNetV2 (1.0×)", "cnn", 8, 0.25, 0.2),
    BackboneInfo("mobilenetv2_075", "MobileNetV2 (0.75×)", "cnn", 8, 0.25, 0.2, 0.75, "guess"),
    BackboneInfo("mobilenetv2_050", "MobileNetV2 (0.5×)", "cnn", 8, 0.25, 0.2, 0.5, "guess"),
    BackboneInfo("mobilenetv2_035", "MobileNetV2 (0.35×)", "cnn", 8, 0.25, 0.2, 0.35, "guess"),
)
def _timm_cnn(key: str, num_classes: int, img_size: int, **kwargs) -> nn.Module:
    if _INFO[key].zero_init_last:  # the authors' ResNets start every block's last BatchNorm at 1, not timm's 0
        kwargs.setdefault("zero_init_last", False)
    return timm.create_model(key, pretrained=False, num_classes=num_classes, **kwargs)


MNV3_HEAD_WIDTH = 1280
"""The paper's MobileNetV3-Small head conv width (2.94M Params); timm's small variant uses 1024."""


@register_backbone(BackboneInfo("mobilenetv3_small_100", "MobileNetV3-Small", "cnn", 8, 0.25, 0.2))
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


@register_backbone(BackboneInfo("shufflenetv2_100", "ShuffleNetV2 (1.0×)", "cnn", 8, 0.25, 0.0))
def _shufflenetv2(key: str, num_classes: int, img_size: int, **kwargs) -> nn.Module:
    if kwargs:
        raise ConfigError("backbone options", kwargs, "none for shufflenetv2_100")
    return ShuffleNetV2(num_classes)


# ---- Token models: width variants scale the embedding (and with it every hidden) width. timm's
# Mixer/gMLP factories fix embed_dim, so their width variants build timm's MlpMixer class directly.

_MIXER_SMALL = dict(patch_size=16, num_blocks=8)
_GMLP_TINY = dict(patch_size=16, num_blocks=30, mlp_ratio=6, block_layer=SpatialGatingBlock, mlp_layer=GatedMlp)

def _vit(key: str, name: str, width: float = 1.0, block_dropout: bool = True) -> BackboneInfo:
    """Table 2: N = 4, r = 1/2 in all models; dropout 0.1 (the authors' constructor default); a class token;
    timm's ViT blocks take a dropout rate (PVT's do not)."""
    return BackboneInfo(key, name, "vit", 4, 0.5, 0.1, width, class_token=True, block_dropout=block_dropout)


def _mlp(key: str, name: str, width: float = 1.0) -> BackboneInfo:
    """Table 3: N = 4, r = 1/2 in all models; dropout 0.1 (the authors' constructor default); no class token."""
    return BackboneInfo(key, name, "mlp", 4, 0.5, 0.1, width, block_dropout=True)


_TOKEN_MODELS: tuple[tuple[BackboneInfo, str | type[nn.Module], dict], ...] = (
    (_vit("deit_base", "DeiT-Base"), "deit_base_patch16_224", {}),
    (_vit("deit_small", "DeiT-Small"), "deit_small_patch16_224", {}),
    (_vit("deit_tiny_100", "DeiT-Tiny (1.0×)"), "deit_tiny_patch16_224", {}),
    (_vit("deit_tiny_075", "DeiT-Tiny (0.75×)", 0.75), "deit_tiny_patch16_224", {"embed_dim": 144}),
    (_vit("deit_tiny_050", "DeiT-Tiny (0.5×)", 0.5), "deit_tiny_patch16_224", {"embed_dim": 96}),
    (_vit("pvt_tiny_100", "PVT-Tiny (1.0×)", 1.0, block_dropout=False), "pvt_v1_tiny", {}),
    (_vit("pvt_tiny_075", "PVT-Tiny (0.75×)", 0.75, block_dropout=False), "pvt_v1_tiny_075", {}),
    (_vit("pvt_tiny_050", "PVT-Tiny (0.5×)", 0.5, block_dropout=False), "pvt_v1_tiny_050", {}),
    (_mlp("mixer_base", "Mixer-Base"), "mixer_b16_224", {}),
    (_mlp("mixer_small_100", "Mixer-Small (1.0×)"), "mixer_s16_224", {}),
    (_mlp("mixer_small_075", "Mixer-Small (0.75×)", 0.75), MlpMixer, {**_MIXER_SMALL, "embed_dim": 384}),
    (_mlp("mixer_small_050", "Mixer-Small (0.5×)", 0.5), MlpMixer, {**_MIXER_SMALL, "embed_dim": 256}),
    (_mlp("gmlp_small", "gMLP-Small"), "gmlp_s16_224", {}),
    (_mlp("gmlp_tiny_100", "gMLP-Tiny (1.0×)"), "gmlp_ti16_224", {}),
    # a plain 0.75× scale gives 3.86M, 1.3% under the paper's 3.91M; a 6.125× gated MLP (588 wide) matches
    (_mlp("gmlp_tiny_075", "gMLP-Tiny (0.75×)", 0.75), MlpMixer, {**_GMLP_TINY, "embed_dim": 96, "mlp_ratio": 6.125}),
    (_mlp("gmlp_tiny_050", "gMLP-Tiny (0.5×)", 0.5), MlpMixer, {**_GMLP_TINY, "embed_dim": 64}),
)
_TOKEN_FACTORIES = {info.key: (factory, width_args) for info, factory, width_args in _TOKEN_MODELS}


@register_backbone(*(info for info, _, _ in _TOKEN_MODELS))
def _timm_tokens(key: str, num_classes: int, img_size: int, **kwargs) -> nn.Module:
    factory, width_args = _TOKEN_FACTORIES[key]
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
