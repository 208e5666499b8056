"""The model zoo: every registered backbone with their own and NOAH heads, Params against the paper, every error.

Models are built on the meta device (no memory, no init) and, for forward passes, materialised on the
CPU with small random weights: shapes and the real kernels are exercised without timm's slow init.
"""
from __future__ import annotations

import csv

import pytest
import torch

from pipeline.config import ConfigError, HeadConfig
from pipeline.models import Classifier, NoahHead, backbone_table, build_head, build_model, list_backbones, resolve_head
from pipeline.paper import PAPER_TABLES, read_paper_table

IMG = 32
KEYS = list_backbones()
MAIN = list(csv.DictReader(open(PAPER_TABLES / "table1_3_main.csv")))
HEAVY = {"resnet101", "resnet152", "deit_base", "mixer_base", "gmlp_small"}
"""Backbones whose CPU forward passes take seconds: the slow tier runs them."""


def meta_model(backbone: str, head: dict, num_classes: int = 1000, img_size: int = 224) -> Classifier:
    with torch.device("meta"):
        return build_model(backbone, head, num_classes, img_size)


def cpu_model(backbone: str, head: dict, num_classes: int = 5, img_size: int = IMG) -> Classifier:
    """A real CPU model with N(0, 0.02) weights and unit BN statistics (skips timm's init for speed)."""
    model = meta_model(backbone, head, num_classes, img_size).to_empty(device="cpu").eval()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
        for b in model.buffers():
            b.fill_(1) if b.is_floating_point() else b.zero_()
    return model


def test_every_backbone_of_the_paper_is_registered_with_the_papers_facts():
    """backbones.csv holds what the paper prints; the registry holds every backbone's facts. Each backbone the
    paper lists is registered, in the paper's order, with the paper's name, family, table, width, N and r; the
    registry may hold more (a backbone the paper does not use), and every key a paper table names is one of
    backbones.csv's."""
    paper = read_paper_table("backbones.csv")
    table = backbone_table()
    assert KEYS == list(table) and set(KEYS) >= {row["key"] for row in paper}
    assert [k for k in KEYS if k in {row["key"] for row in paper}] == [row["key"] for row in paper]
    for row in paper:
        info = table[row["key"]]
        assert (info.name, info.family, info.paper_table, info.width, info.noah_N, info.noah_r) == (
            row["paper_name"], row["family"], int(row["paper_table"]), float(row["width"]), int(row["noah_N"]),
            float(row["noah_r"])), row["key"]
    for path in PAPER_TABLES.glob("table*.csv"):
        assert {r["key"] for r in read_paper_table(path.name)} <= {row["key"] for row in paper}, path.name


# 48: a multiple of 16 that stride-32 stages round (the smoke profile's); the slow tier checks it
@pytest.mark.parametrize("img", [IMG, pytest.param(48, marks=pytest.mark.slow)])
@pytest.mark.parametrize("backbone", [pytest.param(k, marks=pytest.mark.slow) if k in HEAVY else k for k in KEYS])
def test_forward_shapes(backbone, img):
    torch.set_num_threads(1)
    family = backbone_table()[backbone].family
    x = torch.randn(2, 3, img, img)
    for kind in ("baseline", "noah"):
        model = cpu_model(backbone, {"kind": kind}, img_size=img)
        with torch.no_grad():
            feats, prefix = model.forward_parts(x)
            logits = model(x)
        patches = family in ("vit", "mlp") and not backbone.startswith("pvt")
        side = img // 16 if patches else img // 32 if backbone.startswith("pvt") else -(-img // 32)
        assert feats.shape[0] == 2 and feats.shape[2:] == (side, side), (kind, feats.shape)
        assert logits.shape == (2, 5) and torch.isfinite(logits).all()
        assert torch.equal(model.forward_head(feats, prefix), logits)
        if kind == "noah":
            assert isinstance(model.head, NoahHead) and model.head.in_channels == feats.shape[1]


def test_gap_head_on_deit_pools_tokens_without_class_token():
    model = cpu_model("deit_tiny_100", {"kind": "gap"})
    x = torch.randn(2, 3, IMG, IMG)
    feats, prefix = model.forward_parts(x)
    assert prefix is None and model.num_prefix_tokens == 0
    assert torch.allclose(model(x), model.forward_head(feats))


def test_class_token_head_needs_the_class_token():
    model = cpu_model("pvt_tiny_050", {"kind": "baseline"})
    x = torch.randn(2, 3, IMG, IMG)
    feats, prefix = model.forward_parts(x)
    assert prefix.shape == (2, 1, 256)
    assert not torch.allclose(model.forward_head(feats, prefix), model.forward_head(feats, prefix + 1))
    with pytest.raises(ValueError, match="class token"):
        model.forward_head(feats)


def test_pvt_v1_has_its_class_token_only_in_the_last_stage():
    model = meta_model("pvt_tiny_100", {"kind": "baseline"})
    stages = model.backbone.stages
    assert [s.cls_token is not None for s in stages] == [False, False, False, True]
    assert [s.proj.out_channels for s in stages] == [64, 128, 320, 512]
    assert [b.attn.sr_ratio for s in stages for b in s.blocks][::2] == [8, 4, 2, 1]


def test_mobilenetv3_small_head_conv_runs_on_the_map_before_noah():
    base = meta_model("mobilenetv3_small_100", {"kind": "baseline"})
    noah = meta_model("mobilenetv3_small_100", {"kind": "noah"})
    assert base.backbone.conv_head.out_channels == 1280
    assert noah.forward_features(torch.empty(1, 3, 224, 224, device="meta")).shape == (1, 1280, 7, 7)
    assert noah.head.in_channels == 1280


def test_real_build_matches_meta_build_and_trains():
    size = 2 * IMG  # a 2×2 map: over one position the spatial softmax is constant and the keys get no gradient
    model = build_model("resnet18", {"kind": "noah", "N": 4, "r": 0.5}, 3, img_size=size)
    assert sum(p.numel() for p in model.parameters()) == \
        sum(p.numel() for p in meta_model("resnet18", {"kind": "noah"}, 3, size).parameters())
    loss = model(torch.randn(2, 3, size, size)).logsumexp(1).mean()
    loss.backward()
    assert model.backbone.conv1.weight.grad.abs().sum() > 0 and model.head.key_weight.grad.abs().sum() > 0


@pytest.mark.parametrize("row", MAIN, ids=lambda r: f"{r['key']}-{r['head']}")
def test_params_match_tables_1_to_3(row):
    model = meta_model(row["key"], {"kind": row["head"]})
    params = sum(p.numel() for p in model.parameters())
    paper = float(row["params_m"]) * 1e6
    assert abs(params - paper) / paper <= 0.01, (params, paper)


# ---- resolve_head and the errors


def test_resolve_head_fills_n_r_and_dropout_from_the_registry():
    for key, info in backbone_table().items():
        cfg = resolve_head(key, {"kind": "noah"})
        assert (cfg.N, cfg.r, cfg.dropout) == (info.noah_N, info.noah_r, info.noah_dropout)
    assert resolve_head("resnet50", {"kind": "noah", "N": 8}) == HeadConfig(kind="noah", N=8, r=0.125, dropout=0.1)
    assert resolve_head("resnet50", {"kind": "baseline"}).N is None
    assert resolve_head("mixer_base", None).kind == "noah"


def _error(fn, *args) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        fn(*args)
    return info.value


@pytest.mark.parametrize("backbone, head, key, value, allowed", [
    ("resnet19", {"kind": "noah"}, "backbone", "resnet19", "resnet18, resnet50"),
    ("resnet18", {"kind": "noah", "heads": 4}, "head.heads", 4, "a known key"),
    ("resnet18", {"kind": "attention"}, "head.kind", "attention", "'baseline', 'gap', 'noah'"),
    ("resnet18", {"kind": "noah", "aggregation": "median"}, "head.aggregation", "median", "'sum', 'avg', 'max'"),
    ("resnet18", {"kind": "noah", "kernel_size": 5}, "head.kernel_size", 5, "1, 3"),
    ("resnet18", {"kind": "noah", "r": 1.5}, "head.r", 1.5, "0 < r < 1"),
    ("resnet18", {"kind": "noah", "N": 0}, "head.N", 0, ">= 1"),
    ("resnet18", {"kind": "noah", "N": "4"}, "head.N", "4", "int or null"),
    ("resnet18", {"kind": "noah", "shared_attention": "yes"}, "head.shared_attention", "yes", "true or false"),
    ("resnet18", {"kind": "gap"}, "head.kind", "gap", "deit_tiny_100"),
    ("resnet18", {"kind": "noah", "N": 3}, "head.N", 3, "a divisor of the 512"),
    ("deit_tiny_050", {"kind": "noah", "N": 4, "r": 0.02}, "head.r", 0.02, "1..23 key channels"),
    ("resnet18", {"kind": "noah", "shared_attention": True, "softmax_axis": "channel"},
     "head.softmax_axis", "channel", "'spatial'"),
])
def test_build_model_errors_name_option_value_and_allowed(backbone, head, key, value, allowed):
    err = _error(lambda: meta_model(backbone, head))
    assert (err.key, err.value) == (key, value)
    assert allowed in err.allowed and repr(value) in str(err) and key in str(err)


def test_build_model_rejects_bad_sizes():
    assert _error(lambda: meta_model("resnet18", {"kind": "baseline"}, 0)).key == "num_classes"
    err = _error(lambda: meta_model("resnet18", {"kind": "baseline"}, 10, 40))
    assert (err.key, err.value, err.allowed) == ("img_size", 40, "a multiple of 16, at least 32")


def test_width_narrows_every_resnet_stage_and_nothing_else():
    """A narrow ResNet keeps its depth, blocks and map size: only channels shrink, so NOAH's head sees half the
    features and the same 2x2 map; a backbone that cannot narrow says so instead of training the paper's width."""
    with torch.device("meta"):
        full = build_model("resnet50", {"kind": "noah"}, 8, 48)
        half = build_model("resnet50", {"kind": "noah"}, 8, 48, width=0.5)
    assert (full.backbone.num_features, half.backbone.num_features) == (2048, 1024)
    assert len(list(half.backbone.modules())) == len(list(full.backbone.modules()))
    x = torch.zeros(1, 3, 48, 48, device="meta")
    assert half.backbone.forward_features(x).shape[2:] == full.backbone.forward_features(x).shape[2:] == (2, 2)
    err = _error(lambda: build_model("mobilenetv2_100", {"kind": "baseline"}, 8, 48, width=0.5))
    assert (err.key, err.value) == ("width", 0.5) and "resnet50" in err.allowed


def test_build_head():
    x = torch.randn(2, 64, 3, 3)
    assert build_head({"kind": "noah", "N": 4, "r": 0.5}, 64, 7)(x).shape == (2, 7)
    assert build_head({"kind": "baseline"}, 64, 7)(x).shape == (2, 7)
    err = _error(build_head, {"kind": "noah"}, 64, 7)
    assert err.key == "head.N" and err.value is None
    err = _error(build_head, {"kind": "noah", "N": 8, "r": 0.1}, 64, 7)
    assert (err.key, err.value) == ("head.r", 0.1) and "1..7 key channels" in err.allowed
    err = _error(build_head, {"kind": "noah", "N": 5, "r": 0.5}, 64, 7)
    assert (err.key, err.value) == ("head.N", 5)
    assert _error(build_head, {"kind": "noah", "N": 4, "r": 0.5}, 64, 0).key == "num_classes"
    assert _error(build_head, {"kind": "noah", "N": 4, "r": 0.5, "dropout": 1.0}, 64, 7).key == "head.dropout"

