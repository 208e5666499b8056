"""`build_model` and `build_head`: a backbone with its own, GAP or NOAH head, from a head mapping."""
from __future__ import annotations

import dataclasses
from typing import Any

from timm.layers import ClassifierHead
from torch import nn

from ..config import IMG_SIZE_RULE, ConfigError, HeadConfig, parse_head, valid_img_size
from .backbones import backbone_info, create_backbone, detach_head_conv, has_class_token, list_backbones
from .classifier import Classifier
from .noah import NoahHead


def resolve_head(backbone: str, head: dict[str, Any] | HeadConfig | None) -> HeadConfig:
    """The head config with N, r and dropout filled from the backbone's registered defaults for `kind: noah`
    (where not given)."""
    info = backbone_info(backbone)
    cfg = parse_head(head)
    if cfg.kind == "gap" and not has_class_token(backbone):
        allowed = [k for k in list_backbones() if has_class_token(k)]
        raise ConfigError("head.kind", "gap", f"'baseline' or 'noah' for {backbone} (its own head already "
                          f"pools); 'gap' only on class-token ViTs: {', '.join(allowed)}")
    if cfg.kind != "noah":
        return dataclasses.replace(cfg, N=None, r=None, dropout=None)
    return dataclasses.replace(cfg, N=info.noah_N if cfg.N is None else cfg.N,
                               r=info.noah_r if cfg.r is None else cfg.r,
                               dropout=info.noah_dropout if cfg.dropout is None else cfg.dropout)


def build_head(head: dict[str, Any] | HeadConfig, in_channels: int, num_classes: int) -> nn.Module:
    """A head mapping (B, C, H, W) to (B, num_classes): NOAH, or GAP+FC for `baseline`/`gap`."""
    cfg = parse_head(head)
    _check_positive("num_classes", num_classes)
    _check_positive("in_channels", in_channels)
    if cfg.kind == "noah":
        return NoahHead(cfg, in_channels, num_classes)
    return ClassifierHead(in_channels, num_classes, pool_type="avg")


def build_model(backbone: str, head: dict[str, Any] | HeadConfig | None, num_classes: int,
                img_size: int = 224, drop_path_rate: float = 0.0, zero_init_last: bool = False,
                block_dropout: float = 0.0, width: float = 1.0) -> Classifier:
    """Backbone `backbone` (a registered key, `list_backbones()`) with the head `head`, randomly initialised;
    `drop_path_rate` is the recipe's stochastic depth (timm's per-block schedule), `zero_init_last` its
    residual blocks' last norms at 0 (ResNets; ignored by backbones without them), `block_dropout` the
    dropout inside every block's MLPs (timm's `proj_drop_rate`; DeiT, Mixer and gMLP only), `width` the
    backbone's channels times the paper's (ResNets only)."""
    cfg = resolve_head(backbone, head)
    opts: dict[str, Any] = {"width": width}
    if drop_path_rate:
        opts["drop_path_rate"] = drop_path_rate
    info = backbone_info(backbone)
    if zero_init_last and info.zero_init_last:
        opts["zero_init_last"] = True
    if block_dropout:
        if not info.block_dropout:
            takers = ", ".join(k for k in list_backbones() if backbone_info(k).block_dropout)
            raise ConfigError("block_dropout", block_dropout, f"0 for {backbone}: only the blocks of "
                              f"{takers} take dropout")
        opts["proj_drop_rate"] = block_dropout
    _check_positive("num_classes", num_classes)
    if not valid_img_size(img_size):
        raise ConfigError("img_size", img_size, IMG_SIZE_RULE)
    tokens = info.family in ("vit", "mlp")
    if cfg.kind == "baseline":
        return Classifier(create_backbone(backbone, num_classes, img_size, **opts), None, tokens=tokens)
    if cfg.kind == "gap":
        net = create_backbone(backbone, num_classes, img_size, class_token=False, global_pool="avg", **opts)
        return Classifier(net, None, tokens=tokens)
    if has_class_token(backbone):
        # the authors' NOAH ViTs have no class token and apply the final LayerNorm to every token before NOAH
        # (vit/deit/noah_vision_transformer.py L227-234): no pooling, so timm keeps `norm` in forward_features
        # rather than moving it after an average pool as `fc_norm`, which the NOAH path never calls
        opts.update(class_token=False, global_pool="")
    net = create_backbone(backbone, 0, img_size, **opts)
    neck = detach_head_conv(net)
    channels = net.head_hidden_size if neck is not None else net.num_features
    return Classifier(net, build_head(cfg, channels, num_classes), neck=neck, tokens=tokens)


def _check_positive(key: str, value: Any) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ConfigError(key, value, "an integer >= 1")
