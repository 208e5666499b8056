"""docs/fidelity.md states the defaults the pipeline trains with (`key = value`); each statement is checked
against the code here, so the page and the code cannot drift apart. Also the authors'-code behaviours
themselves: head init, RandomResizedCrop, per-family dropout, the no-decay set, ResNet BatchNorm init."""
from __future__ import annotations

import math
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from timm.optim import create_optimizer_v2
from torch import nn

from pipeline import REPO_ROOT
from pipeline.config import AugmentConfig, ConfigError, HeadConfig, RecipeConfig, load_params, parse, to_dict
from pipeline.data.loaders import build_augment, build_loader
from pipeline.models import NoahHead, build_model, list_backbones, resolve_head
from pipeline.report.specs import TABLES, Metric
from pipeline.training.recipes import build_optimizer, build_scheduler, scale

DOC = REPO_ROOT / "docs" / "fidelity.md"
STATEMENT = re.compile(r"`([a-z0-9_]+(?:\.[a-z0-9_]+)+) = ([^`]+)`")  # dotted keys only


def _augment(train: bool) -> str:
    return type(build_augment(32, train)).__name__


def _init(head: NoahHead) -> tuple[float, float]:
    """(largest |std / sqrt(2/(N·M)) - 1| over the key and value weights, largest |bias|)."""
    n, m = head.cfg.N, head.num_classes
    target = math.sqrt(2 / (n * m))
    off = max(abs(w.std().item() / target - 1) for w in (head.key_weight, head.value_weight))
    return off, max(b.abs().max().item() for b in (head.key_bias, head.value_bias))


def _last_bn_is_one() -> bool:
    model = build_model("resnet18", {"kind": "baseline"}, 10, 32)
    return all(bool((block.bn2.weight == 1).all()) for layer in ("layer1", "layer4")
               for block in getattr(model.backbone, layer))


def _pvt() -> nn.Module:
    with torch.device("meta"):
        return build_model("pvt_tiny_050", {"kind": "baseline"}, 10, 32).backbone


def _noah_backbone(key: str) -> nn.Module:
    with torch.device("meta"):
        return build_model(key, {"kind": "noah"}, 10, 32).backbone


def _metric(name: str) -> Metric:
    return next(m for m in TABLES["table4"].metrics if m.name == name)


FIXED: dict[str, Callable[[], Any]] = {
    "augment.standard.train": lambda: _augment(True),
    "augment.eval": lambda: _augment(False),
    "augment.crop_scale": lambda: AugmentConfig().crop_scale,
    "augment.crop_ratio": lambda: "(3/4, 4/3)" if build_augment(32, True).ratio == (3 / 4, 4 / 3) else "other",
    "augment.eval_crop_pct": lambda: build_augment(32, False).crop_pct,
    "augment.eval_interpolation": lambda: build_augment(32, False).mode,
    "augment.mean": lambda: "stats.json" if AugmentConfig().mean is None and AugmentConfig().std is None else "set",
    "recipe.opt_eps": lambda: RecipeConfig().opt_eps,
    "recipe.lr_step": lambda: RecipeConfig().lr_step,
    "pvt.no_weight_decay": lambda: ", ".join(sorted(_pvt().no_weight_decay())),
    "noah.final_norm": lambda: ", ".join(sorted({type(_noah_backbone(k).norm).__name__ for k in (
        "deit_tiny_050", "pvt_tiny_050", "mixer_small_050", "gmlp_tiny_050")})),
    "head.init_std": lambda: "sqrt(2/(N*M))" if _init(NoahHead(HeadConfig(N=4, r=0.5), 512, 1000))[0] < 0.15
    else "something else",
    "head.init_bias": lambda: _init(NoahHead(HeadConfig(N=4, r=0.5), 512, 1000))[1],
    "baseline.dropout": lambda: "none" if resolve_head("resnet18", {"kind": "baseline"}).dropout is None else "set",
    "resnet.zero_init_last": lambda: not _last_bn_is_one(),
    "report.top1": lambda: _metric("top1").source,
    "report.top1_last": lambda: _metric("top1_last").source,
    "noah.class_token": lambda: any(build_model(k, {"kind": "noah"}, 10, 32).backbone.num_prefix_tokens
                                    for k in ("deit_tiny_100", "pvt_tiny_100")),
    "datasets.imagenet.max_side": lambda: load_params().datasets["imagenet"].max_side,
    "datasets.imagenet.quality": lambda: load_params().datasets["imagenet"].quality,
    "noah.no_weight_decay": lambda: ", ".join(sorted(NoahHead(HeadConfig(N=4, r=0.5), 64, 10).no_weight_decay())),
}


def _actual(key: str) -> Any:
    if key in FIXED:
        return FIXED[key]()
    section, name, *path = key.split(".")
    if section == "backbones":
        (field,) = path
        assert field == "noah_dropout", key
        return resolve_head(name, {"kind": "noah"}).dropout
    assert section in ("recipes", "profiles"), f"no check for `{key}`: add it to FIXED"
    value: Any = to_dict(getattr(load_params(), section)[name])
    for part in path:
        value = value[part]
    return value


def _same(stated: str, actual: Any) -> bool:
    if isinstance(actual, bool):
        return stated.lower() == str(actual).lower()
    if isinstance(actual, (int, float)) and not isinstance(actual, bool):
        return math.isclose(float(stated), float(actual))
    if isinstance(actual, (list, tuple)):
        return stated == str(tuple(actual))
    return stated == str(actual)


def _statements() -> list[tuple[str, str]]:
    return STATEMENT.findall(DOC.read_text())


def test_every_fixed_check_is_stated_in_the_doc() -> None:
    stated = {key for key, _ in _statements()}
    assert set(FIXED) <= stated, f"docs/fidelity.md states no value for {sorted(set(FIXED) - stated)}"
    assert len(_statements()) >= 25


@pytest.mark.parametrize("key,stated", _statements())
def test_the_doc_states_what_the_code_does(key: str, stated: str) -> None:
    actual = _actual(key)
    assert _same(stated.strip(), actual), f"docs/fidelity.md says `{key} = {stated}`; the code has {actual!r}"


@pytest.mark.parametrize("kind", [{}, {"kernel_size": 3}, {"shared_attention": True}])
def test_noah_head_starts_as_the_authors_init(kind: dict) -> None:
    torch.manual_seed(0)
    head = NoahHead(HeadConfig(N=4, r=0.5, **kind), 512, 1000)
    k = head.cfg.kernel_size
    for w in (head.key_weight, head.value_weight):
        target = math.sqrt(2 / (4 * w.shape[1] * k * k))  # fan_out of the grouped convolution
        assert abs(w.std().item() / target - 1) < 0.15
    assert not head.key_bias.any() and not head.value_bias.any()


def test_standard_training_crop_is_random_resized_and_eval_is_a_centre_crop() -> None:
    assert _augment(True) == "RandomResizedCropFlip"
    assert _augment(False) == "ResizeCenterCrop"


def test_resolved_dropout_follows_the_family_and_a_given_one_wins() -> None:
    assert resolve_head("resnet18", {"kind": "noah"}).dropout == 0.1
    assert resolve_head("mobilenetv3_small_100", {"kind": "noah"}).dropout == 0.2
    assert resolve_head("shufflenetv2_100", {"kind": "noah"}).dropout == 0.0
    assert resolve_head("resnet18", {"kind": "noah", "dropout": 0.3}).dropout == 0.3
    model = build_model("resnet18", {"kind": "noah"}, 10, 32)
    assert model.head.dropout.p == 0.1 and model.head.cfg.name == "noah(N=4,r=0.5)"


def test_no_decay_recipes_spare_noah_biases_and_class_tokens() -> None:
    model = build_model("deit_tiny_100", {"kind": "noah"}, 10, 32)
    names = {id(p): n for n, p in model.named_parameters()}
    optimizer = create_optimizer_v2(model, opt="adamw", lr=1e-3, weight_decay=0.05, filter_bias_and_bn=True)
    spared = {names[id(p)] for g in optimizer.param_groups if g["weight_decay"] == 0 for p in g["params"]}
    assert {"head.key_bias", "head.value_bias", "backbone.pos_embed"} <= spared
    assert "head.key_weight" not in spared


def _lightest_per_design() -> list[str]:
    """One backbone per design in the registry (model class and block type: ResNet, MobileNetV2, MobileNetV3,
    ShuffleNetV2, DeiT, PVT, Mixer, gMLP), the one with the fewest parameters."""
    lightest: dict[tuple[str, str], tuple[int, str]] = {}
    for key in list_backbones():
        with torch.device("meta"):
            net = build_model(key, {"kind": "noah"}, 10, 32).backbone
        blocks = getattr(net, "blocks", None)
        design = (type(net).__name__, type(blocks[0]).__name__ if blocks is not None else "")
        size = sum(p.numel() for p in net.parameters())
        lightest[design] = min(lightest.get(design, (size, key)), (size, key))
    return [key for _, key in lightest.values()]


@pytest.mark.parametrize("backbone", _lightest_per_design())
def test_noah_trains_every_backbone_parameter_and_reads_the_final_norm(backbone: str) -> None:
    """As the authors' NOAH models (`vit/deit/noah_vision_transformer.py` L227-234, `noah_pvt.py` L221-227,
    `noah_mlp_mixer.py` L283-292): the backbone's final LayerNorm is applied to every token and NOAH reads the
    normalised tokens, so every backbone parameter, that norm's included, learns through the NOAH head."""
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = build_model(backbone, {"kind": "noah"}, 10, 32).eval()
    seen: dict[str, torch.Tensor] = {}
    model.head.register_forward_pre_hook(lambda _, args: seen.update(head=args[0]))
    norm = getattr(model.backbone, "norm", None) if model.tokens else None
    if norm is not None:
        norm.register_forward_hook(lambda _, args, out: seen.update(tokens=args[0]))
    model(torch.randn(2, 3, 32, 32)).logsumexp(1).sum().backward()
    idle = [n for n, p in model.backbone.named_parameters() if p.grad is None or not p.grad.isfinite().all()]
    assert not idle, f"{backbone}: backbone parameters without a finite gradient through NOAH: {idle}"
    if not model.tokens:
        return
    assert isinstance(norm, nn.LayerNorm), f"{backbone}: the final norm is {type(norm).__name__}, not a LayerNorm"
    tokens = F.layer_norm(seen["tokens"], norm.normalized_shape, norm.weight, norm.bias, norm.eps)
    grid = tokens[:, model.num_prefix_tokens:].transpose(1, 2).reshape(seen["head"].shape)
    assert torch.equal(seen["head"], grid), f"{backbone}: NOAH's input is not the final norm of the tokens"


def _spared(model: nn.Module, recipe: str) -> set[str]:
    names = {id(p): n for n, p in model.named_parameters()}
    optimizer = build_optimizer(model, scale(load_params().recipe(recipe, "imagenet")))
    return {names[id(p)] for g in optimizer.param_groups if g["weight_decay"] == 0 for p in g["params"]}


@pytest.mark.parametrize("recipe, spared", [("resnet", False), ("mobilenet", False), ("mobilenetv3", True),
                                            ("shufflenet", True)])
def test_noah_biases_decay_unless_the_recipe_spares_biases(recipe: str, spared: bool) -> None:
    """The authors' main.py decays every parameter, NOAH's biases included, without `--nowd-bn` (L142-144)."""
    with torch.device("meta"):
        model = build_model("resnet18", {"kind": "noah"}, 10, 32)
    names = _spared(model, recipe)
    assert ({"head.key_bias", "head.value_bias"} <= names) is spared and ("backbone.bn1.bias" in names) is spared


@pytest.mark.parametrize("recipe", ["deit_pvt", "mixer_gmlp"])
def test_vit_and_mlp_recipes_set_the_lr_once_an_epoch(recipe: str) -> None:
    """The DeiT, PVT and timm scripts step their schedulers per epoch (`vit/deit/main.py` L433)."""
    scaled = scale(load_params().recipe(recipe, "imagenet"))
    optimizer = build_optimizer(nn.Linear(2, 2), scaled)
    scheduler = build_scheduler(optimizer, scaled, updates_per_epoch=10)
    scheduler.step(100)
    lr = optimizer.param_groups[0]["lr"]
    scheduler.step_update(num_updates=1005)
    assert optimizer.param_groups[0]["lr"] == lr
    scheduler.step(101)
    assert optimizer.param_groups[0]["lr"] < lr


def test_pvt_spares_its_class_token_from_decay() -> None:
    """`vit/pvt/classification/pvt.py` L186-189; the NOAH PVT has no class token (`noah_pvt.py` L186-189)."""
    with torch.device("meta"):
        model = build_model("pvt_tiny_050", {"kind": "baseline"}, 10, 32)
    assert "backbone.stages.3.cls_token" in _spared(model, "deit_pvt")
    assert "backbone.stages.3.pos_embed" not in _spared(model, "deit_pvt")


def test_mlp_recipe_loads_as_the_authors_yaml(tiny_data: Path) -> None:
    """`mlp/configs/default_noah.yaml`: crop ratio 0.67-1.5 (L66-68), evaluation crop 0.9 (L13) at the model's
    bicubic (L32, `noah_mlp_mixer.py` L52), input mean = std = 0.5 (L43, L83; `noah_mlp_mixer.py` L53)."""
    aug = load_params().recipe("mixer_gmlp", "imagenet").augment
    train, val = (build_loader(tiny_data, split, 32, 4, train=split == "train", augment=aug)
                  for split in ("train", "val"))
    crop = next(t for t in train.dataset.timm_transform.transforms if hasattr(t, "ratio"))
    assert crop.ratio == (0.67, 1.5)
    assert (val.dataset.augment.crop_pct, val.dataset.augment.mode) == (0.9, "bicubic")
    assert val.mean.flatten().tolist() == val.std.flatten().tolist() == [127.5] * 3


def test_mlp_blocks_drop_as_the_authors_yaml() -> None:
    """`mlp/configs/default_noah.yaml` L19 (`drop: 0.02333`) is the dropout in every block's MLPs."""
    recipe = load_params().recipe("mixer_gmlp", "imagenet")
    for key in ("mixer_small_050", "gmlp_tiny_050"):
        with torch.device("meta"):
            model = build_model(key, {"kind": "noah"}, 10, 32, block_dropout=recipe.block_dropout)
        rates = {m.p for name, m in model.backbone.named_modules() if isinstance(m, nn.Dropout) and ".mlp" in name}
        assert rates == {0.02333}
    with pytest.raises(ConfigError, match="block_dropout: got 0.1; allowed: 0 for resnet18"):
        build_model("resnet18", {"kind": "noah"}, 10, 32, block_dropout=0.1)


def test_deit_pvt_recipe_repeats_each_image_three_times(tiny_data: Path) -> None:
    """DeiT's and PVT's main.py train with repeated augmentation by default (`vit/deit/main.py` L103-105,
    L213-216): three differently augmented copies of each drawn image, an epoch as long as the dataset."""
    aug = load_params().recipe("deit_pvt", "imagenet").augment
    loader = build_loader(tiny_data, "train", 32, 4, train=True, augment=aug)
    loader.set_epoch(0)
    indices, seeds = zip(*loader.sampler)
    n = len(loader.dataset)
    assert len(indices) == n and all(indices[k] == indices[k - k % 3] for k in range(n))
    assert len(set(indices)) == -(-n // 3) and len(set(seeds)) == n


@pytest.mark.parametrize("given, key, allowed", [
    ({"opt_eps": 0}, "recipe.opt_eps", "0 < eps < 1"),
    ({"lr_step": "batch"}, "recipe.lr_step", "'update', 'epoch'"),
    ({"block_dropout": 1.0}, "recipe.block_dropout", "0 <= block_dropout < 1"),
    ({"augment": {"crop_ratio": [1.5, 0.67]}}, "recipe.augment.crop_ratio", "0 < low <= high"),
    ({"augment": {"repeats": 0}}, "recipe.augment.repeats", "an integer >= 1"),
    ({"augment": {"eval_crop_pct": 1.2}}, "recipe.augment.eval_crop_pct", "0 < crop_pct <= 1"),
    ({"augment": {"eval_interpolation": "random"}}, "recipe.augment.eval_interpolation", "'bilinear', 'bicubic'"),
    ({"augment": {"mean": [0.5]}}, "recipe.augment.mean", "three numbers"),
    ({"augment": {"std": [0.5, 0.5, 0.0]}}, "recipe.augment.std", "three positive numbers"),
])
def test_the_new_recipe_options_refuse_bad_values(given: dict, key: str, allowed: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse(RecipeConfig, given, "recipe")
    err = info.value
    assert err.key == key and allowed in err.allowed and key in str(err), str(err)
