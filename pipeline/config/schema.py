"""The one schema of the project's configuration.

Every option that `params.yaml`, the command line or a test can set is declared here as a typed,
frozen dataclass. `parse` turns plain mappings into these dataclasses and rejects bad input with one
`ConfigError` naming the key, the value given and what is allowed, before any expensive work starts.
`params.yaml` only fills this schema in.
"""
from __future__ import annotations

import dataclasses
import math
import posixpath
import re
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    """An option that cannot be used: the message names the key, the value and what is allowed."""

    def __init__(self, key: str, value: Any, allowed: str):
        self.key, self.value, self.allowed = key, value, allowed
        super().__init__(f"{key}: got {_shown(value)}; allowed: {allowed}")

    def under(self, where: str) -> ConfigError:
        """The same error with its key placed inside `where`, e.g. `root` -> `datasets.imagenet.root`."""
        return ConfigError(f"{where}.{self.key}", self.value, self.allowed)

    def __reduce__(self) -> tuple[type, tuple[str, Any, str]]:
        """Pickle by the three parts, so the error crosses process boundaries (Ray workers) intact."""
        return type(self), (self.key, self.value, self.allowed)


MAX_SHOWN = 200
"""Characters of a bad value that an error message shows: a huge value (a long list, a whole section
given where a number belongs) must not bury the message."""


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= MAX_SHOWN else f"{text[:MAX_SHOWN]}… ({len(text)} characters)"


INT64 = 2**63
"""Every integer the schema takes fits a signed 64-bit integer (what torch, numpy and SQLite hold)."""
SEEDS = 2**32
"""Seeds are 0 … 2**32 - 1: numpy's global seed takes no more, and a seed must reach every generator."""


def checked(check: Callable[[Any], bool], allowed: str, default: Any = dataclasses.MISSING,
            default_factory: Any = dataclasses.MISSING) -> Any:
    """A field whose value must satisfy `check`; `allowed` says in words what passes."""
    return field(default=default, default_factory=default_factory,
                 metadata={"check": check, "allowed": allowed})


def seed_field() -> Any:
    """A seed: an integer from 0 to 2**32 - 1, default 0."""
    return checked(lambda s: 0 <= s < SEEDS, "an integer from 0 to 2**32 - 1", default=0)


SEEDS_RULE = "a non-empty list of distinct integers from 0 to 2**32 - 1 (every row trains once per seed)"


def seeds_field(default: Any, allowed: str = SEEDS_RULE) -> Any:
    """A list of seeds (`SEEDS_RULE`): the study trains every row once per seed."""
    return checked(lambda s: len(s) >= 1 and len(set(s)) == len(s) and all(0 <= x < SEEDS for x in s), allowed,
                   default=default)


IMG_SIZE_RULE = "a multiple of 16, at least 32"
WIDTH_RULE = "a number in (0, 1]: the backbone's channel widths times it (1: the paper's)"


def valid_img_size(size: Any) -> bool:
    """The ViTs and MLPs cut 16-px patches, so an input size is a whole multiple of 16; the CNNs' and PVT's
    stride-32 last stage rounds a 16-px remainder (48 px: a 2x2 last map in a ResNet, as at 64)."""
    return isinstance(size, int) and not isinstance(size, bool) and size >= 32 and size % 16 == 0


def img_size_field(default: Any) -> Any:
    """An input image size (`valid_img_size`), checked where params.yaml sets it, not when a model is built."""
    return checked(valid_img_size, IMG_SIZE_RULE, default=default)


def width_field() -> Any:
    """A backbone width multiplier (`WIDTH_RULE`), checked where it is set."""
    return checked(lambda w: 0 < w <= 1, WIDTH_RULE, default=1.0)


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is not None:
        args = ", ".join("..." if a is Ellipsis else _type_name(a) for a in typing.get_args(tp))
        return f"{getattr(origin, '__name__', origin)}[{args}]"
    return "null" if tp is type(None) else getattr(tp, "__name__", str(tp))


def _coerce(tp: Any, value: Any, key: str) -> Any:
    """Check `value` against the annotation `tp`, recursing into dataclasses, lists and dicts."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(tp):
            try:
                return _coerce(arg, value, key)
            except ConfigError:
                continue
        raise ConfigError(key, value, _type_name(tp))
    if origin is typing.Literal:  # the same value and type: true is not 1, nor 1.0 the 1 of Literal[1, 3]
        if any(value == allowed and type(value) is type(allowed) for allowed in typing.get_args(tp)):
            return value
        raise ConfigError(key, value, "one of " + ", ".join(map(repr, typing.get_args(tp))))
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(key, value, f"a list ({_type_name(tp)})")
        (item,) = typing.get_args(tp)[:1] or (Any,)
        return tuple(_coerce(item, v, f"{key}[{i}]") for i, v in enumerate(value))
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(key, value, f"a mapping ({_type_name(tp)})")
        _, val_tp = typing.get_args(tp)
        return {k: _coerce(val_tp, v, f"{key}.{k}") for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        return parse(tp, value, key)
    if tp is type(None):
        if value is None:
            return None
        raise ConfigError(key, value, "null")
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(key, value, "true or false")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool) and -INT64 <= value < INT64:
            return value
        raise ConfigError(key, value, "an integer (within ±2**63)")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            return float(value)
        raise ConfigError(key, value, "a finite number")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(key, value, "a string")
    raise TypeError(f"{key}: unsupported annotation {tp!r}")


def parse(cls: type[T], data: Any, where: str = "") -> T:
    """Build dataclass `cls` from a mapping, rejecting unknown keys, wrong types and bad values."""
    if isinstance(data, cls):
        return data
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(where or cls.__name__, data, "a mapping")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        key = f"{where}.{unknown[0]}" if where else str(unknown[0])
        raise ConfigError(key, data[unknown[0]], "a known key: " + ", ".join(fields))
    values = {}
    for name, f in fields.items():
        key = f"{where}.{name}" if where else name
        if name not in data:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise ConfigError(key, None, f"a value is required ({_type_name(hints[name])})")
            continue
        try:
            value = _coerce(hints[name], data[name], key)
        except ConfigError as err:  # a checked field says what it takes better than its type does
            if err.key != key or "allowed" not in f.metadata:
                raise
            raise ConfigError(key, data[name], f"{f.metadata['allowed']} ({_type_name(hints[name])})") from None
        check = f.metadata.get("check")
        if check is not None and value is not None and not check(value):
            raise ConfigError(key, value, f.metadata["allowed"])
        values[name] = value
    try:
        return cls(**values)
    except ConfigError as err:
        if not where or err.key.startswith(f"{where}."):
            raise
        raise err.under(where) from None


def to_dict(obj: Any) -> Any:
    """The plain-data form of a config dataclass (for YAML, JSON and MLflow params)."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


def flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    """`{"a.b": 1}` from `{"a": {"b": 1}}`: the form MLflow params and hashes use."""
    data = to_dict(obj)
    if not isinstance(data, dict):
        return {prefix: data}
    out: dict[str, Any] = {}
    for k, v in data.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        out.update(flatten(v, key) if isinstance(v, dict) else {key: v})
    return out


# ---- Head: the classifier a row or trial puts on its backbone (baseline, GAP or NOAH) and NOAH's options


@dataclass(frozen=True)
class HeadConfig:
    """A classifier head; the NOAH options are the paper's design by default (docs/interface.md)."""

    kind: Literal["baseline", "gap", "noah"] = "noah"
    N: int | None = checked(lambda n: n >= 1, "an integer >= 1", default=None)
    r: float | None = checked(lambda r: 0 < r < 1, "a number with 0 < r < 1", default=None)
    feature_split: Literal["both", "first", "none"] = "both"
    activation: Literal["softmax", "sigmoid"] = "softmax"
    softmax_axis: Literal["spatial", "channel"] = "spatial"
    aggregation: Literal["sum", "avg", "max", "avg_spatial", "max_spatial"] = "sum"
    """How the N·H·W local POCAs of a class become its logit. Table 7's `avg` and `max` are one mean or max over
    all N·H·W of them; `avg_spatial` and `max_spatial` are the other reading (over H·W per block, then the sum
    over the N blocks). docs/fidelity.md."""
    kernel_size: Literal[1, 3] = 1
    shared_attention: bool = False
    extra_linear: bool = False
    dropout: float | None = checked(lambda p: 0 <= p < 1, "a number with 0 <= dropout < 1, or null (the "
                                    "backbone's registered noah_dropout)", default=None)

    @property
    def name(self) -> str:
        """A short readable label, e.g. `noah(N=4,r=0.5)` or `noah(N=4,r=0.5,aggregation=max)`."""
        if self.kind != "noah":
            return self.kind
        parts = [f"N={self.N}", f"r={self.r:g}"] if self.N is not None and self.r is not None else []
        parts += [f"{k}={v}" for k, v in self.options().items()]
        return f"noah({','.join(parts)})"

    def options(self) -> dict[str, Any]:
        """The options besides kind, N, r and dropout (each backbone's own, from its registration) that differ
        from the paper's design: what makes a variant."""
        defaults = HeadConfig()
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                if f.name not in ("kind", "N", "r", "dropout") and getattr(self, f.name) != getattr(defaults, f.name)}


def parse_head(head: dict[str, Any] | HeadConfig | None, where: str = "head") -> HeadConfig:
    """A `HeadConfig` from a mapping such as `{"kind": "noah", "N": 4, "r": 0.5}`."""
    return parse(HeadConfig, head, where)


def parse_head_spec(spec: str) -> HeadConfig:
    """A `HeadConfig` from the command line form `kind=noah,N=4,r=0.5,aggregation=max`."""
    data: dict[str, Any] = {}
    for item in filter(None, (s.strip() for s in spec.split(","))):
        if "=" not in item:
            raise ConfigError("--head", item, "comma-separated key=value pairs, e.g. kind=noah,N=4,r=0.5")
        key, value = item.split("=", 1)
        data[key.strip()] = yaml.safe_load(value)
    return parse_head(data, "--head")


# ---- Study: profiles (the scale), the paper's tables as grids of rows, Ray


NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,99}")
NAME_RULE = ("a name of letters, digits, `_`, `.` and `-` that starts with a letter or digit, at most 100 characters "
             "(it becomes a folder and an MLflow name: no `/`, `..` or `#`)")


def check_name(key: str, name: Any) -> str:
    """`name` if it may become a path or an MLflow name (`NAME_RULE`: it stays inside the folder it names a part
    of, and MLflow keeps experiments with different names apart), else ConfigError naming `key`."""
    if not isinstance(name, str) or not NAME.fullmatch(name):
        raise ConfigError(key, name, NAME_RULE)
    return name


INSIDE_RULE = "a path inside the repository (no `..` above it), or an absolute path"


def inside(path: str) -> bool:
    """Whether a path from params.yaml stays in the root it is taken from: absolute, or relative without
    climbing above it (`a/../../x`)."""
    return bool(path) and (posixpath.isabs(path) or posixpath.normpath(path).split("/")[0] != "..")


ROW_NAME = re.compile(r"[a-z][a-z0-9_]*")
ROW_NAME_RULE = ("a row name of lowercase letters, digits and underscores that starts with a letter (e.g. `max`, "
                 "`resnet50_both`), so that DVC can address it: `-S tables.table7.rows.max.head.aggregation=avg`")
ROWS_RULE = ("a non-empty mapping of row name to row, e.g. `rows: {baseline: {row: 1, backbone: resnet18, head: {kind: "
             "baseline}}, max: {row: 3, backbone: resnet18, head: {kind: noah, aggregation: max}}}`")


@dataclass(frozen=True)
class TableRow:
    """One printed row of a paper table: its name (its key under the table's `rows:`, which DVC's `params diff`
    and `-S` use and the results, reports and metrics carry), the paper's row number (by which the reports find
    the paper's row), a backbone, a head and, where the row's family trains with another recipe than the
    table's (Tables 1-3), that recipe."""

    row: int = checked(lambda r: r >= 1, "a paper row number >= 1")
    backbone: str = checked(lambda b: bool(b), "a registered backbone key (pipeline.models.list_backbones)")
    head: HeadConfig = field(default_factory=HeadConfig)
    recipe: str | None = None
    name: str = ""  # filled in from its key by TableConfig


@dataclass(frozen=True)
class TableConfig:
    """A table's grid: the recipe its rows train with and the rows, by name, as the paper lays them out.

    A `reid` table (Table 9) trains every row twice: from scratch with `recipe` and fine-tuned with
    `finetune_recipe` from the same backbone and head trained for classification with `pretrain_recipe`
    on the profile's classification data (the pipeline's own checkpoint, never downloaded weights).
    """

    recipe: str = checked(lambda r: bool(r), "a key of `recipes`")
    rows: dict[str, TableRow] = checked(lambda rows: len(rows) > 0, ROWS_RULE)
    task: Literal["classify", "reid"] = "classify"
    finetune_recipe: str | None = None
    pretrain_recipe: str | None = None

    def __post_init__(self) -> None:
        for name, row in self.rows.items():
            if not isinstance(name, str) or not ROW_NAME.fullmatch(name):
                raise ConfigError(f"rows.{name}", name, ROW_NAME_RULE)
            if row.name not in ("", name):
                raise ConfigError(f"rows.{name}.name", row.name, f"left out, or {name!r} (a row's name is its key)")
        object.__setattr__(self, "rows", {name: dataclasses.replace(row, name=name) for name, row in self.rows.items()})


@dataclass(frozen=True)
class ProfileConfig:
    """The scale a study runs at: which prepared data, image size and how much of each recipe.

    `epochs` and `batch_size` override the recipe's (null keeps the paper's); the recipe's shape
    (schedule fractions, warm-up share, lr per image) is kept, and lr follows the batch linearly.
    """

    dataset: str = checked(lambda d: bool(d), "a key of `datasets`")
    reid_dataset: str | None = None
    img_size: int = img_size_field(224)
    reid_img_size: int | None = img_size_field(None)
    resnet_width: float = width_field()
    """The ResNets' channels times this (other families keep the paper's widths): a ResNet50 at 0.5 trains
    3.4x faster on a CPU core, which is what fits the embedded study's ResNets into minutes."""
    epochs: int | None = checked(lambda e: e >= 1, "an integer >= 1 or null (the recipe's)", default=None)
    batch_size: int | None = checked(lambda b: b >= 1, "an integer >= 1 or null (the recipe's)", default=None)
    gpu_tflops: float = checked(lambda t: t > 0, "a positive number (effective TFLOP/s per GPU)", default=30.0)
    recipes: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Fields laid over named recipes at this profile (`{resnet: {optimizer: adamw, ...}}`), for a budget the
    paper's recipes were not made for: a ResNet50 given a hundred SGD updates at the paper's lr barely
    moves. The `imagenet` profile sets none; every one is a departure the reports list."""
    seeds: tuple[int, ...] | None = seeds_field(None, f"null (the top-level `seeds`) or {SEEDS_RULE}")
    """This profile's own seeds, for a scale whose differences need more seeds than the default study trains."""
    tables: tuple[str, ...] | None = checked(lambda t: len(t) >= 1, "null (every table that no profile lists) or a "
                                             "non-empty list of keys of `tables`", default=None)
    """The only tables this profile trains and `plan` prices, and they train at no other profile (the `proxy`
    profile's `tables.proxy`); null: every table that no profile lists."""


@dataclass(frozen=True)
class StudyConfig:
    """The study stage of `dvc repro`: `python stages/study.py` with no table named trains these tables as one
    schedule, into its out folder `results/study/`. Tables 1-3 and the proxy stay out (they are trained by name,
    outside `dvc repro`). dvc.yaml's study stage lists each of them as a param (`tables.<table>`), its only other
    mention: a stage's params are exactly the keys that change its outs."""

    tables: tuple[str, ...] = ()


@dataclass(frozen=True)
class RayConfig:
    """Where sweeps run: a cluster address (or RAY_ADDRESS) or a local Ray, and per-trial resources."""

    address: str | None = None
    num_cpus: int | None = checked(lambda n: n >= 1, "an integer >= 1 or null (all cores)", default=None)
    cpus_per_trial: float = checked(lambda c: c > 0, "a positive number", default=1.0)
    gpus_per_trial: float = checked(lambda g: g >= 0, "a number >= 0 (fractions share a GPU)", default=0.0)
    max_concurrent: int = checked(lambda n: n >= 1, "an integer >= 1", default=2)
    max_failures: int = checked(lambda n: n >= 0, "an integer >= 0", default=2)
    storage_path: str = checked(inside, INSIDE_RULE, default=".ray_results")
    reuse_actors: bool = False
    verbose: int = checked(lambda v: v in (0, 1, 2, 3), "0 (the study's own lines), or 1-3 (Ray Tune's status "
                           "tables at that verbosity, with the trial processes' output)", default=0)


# ---- Data: prepared datasets and the loaders' augmentation


@dataclass(frozen=True)
class BuiltinDataConfig:
    """Size of the generated datasets (`builtin` shapes, `builtin_reid` persons); all drawn from `seed`."""

    seed: int = seed_field()
    num_classes: int = checked(lambda n: 2 <= n <= 10, "an integer from 2 to 10 (one per shape kind)", default=8)
    train_per_class: int = checked(lambda n: n >= 1, "an integer >= 1", default=40)
    val_per_class: int = checked(lambda n: n >= 1, "an integer >= 1", default=16)
    image_size: int = checked(lambda n: n >= 16, "an integer >= 16 (pixels, square)", default=96)
    clutter: float = checked(lambda c: 0 <= c <= 2, "a number from 0 (plain background) to 2", default=1.0)
    train_ids: int = checked(lambda n: n >= 2, "an integer >= 2", default=30)
    test_ids: int = checked(lambda n: n >= 2, "an integer >= 2", default=30)
    cameras: int = checked(lambda n: 2 <= n <= 6, "an integer from 2 to 6", default=4)
    images_per_id: int = checked(lambda n: n >= 2, "an integer >= 2", default=8)
    distractors: int = checked(lambda n: n >= 0, "an integer >= 0", default=20)
    junk: int = checked(lambda n: n >= 0, "an integer >= 0", default=20)


@dataclass(frozen=True)
class PrepareConfig:
    """One entry of `datasets:`: where the images come from and how the prepared copy is stored.

    The stored size keeps RandomResizedCrop at 224 faithful to training on the originals: `max_side` 500
    leaves ImageNet's typical 500×375 photos at their own size and shrinks only the larger ones (FFCV stores
    ImageNet the same way), so even a crop of 8 % of the area is cut from as many pixels as the authors had.
    `resize` (scale the short side to it, up or down) is for small generated data. Copies are baseline
    JPEGs, 4:2:0 like ImageNet's own, in tar shards of about `shard_mb` MB.
    """

    source: Literal["builtin", "builtin_reid", "imagefolder", "market1501"] = "builtin"
    root: str | None = None
    classes: str | None = checked(lambda s: bool(s), "null (every class folder) or a class list file: one WordNet "
                                  "id or folder name a line, prepared as labels 0..K-1 in its order", default=None)
    """Prepare only these classes of an `imagefolder` source (ImageNet-100: pipeline/data/imagenet100.txt); a
    relative path is taken from the working folder, as `root` is (a stage runs in the repository root)."""
    out: str = checked(lambda s: bool(s), "a non-empty folder path", default="data/builtin")
    resize: int | None = checked(lambda n: n >= 8, "null (keep the size) or an integer >= 8 (the short side is "
                                 "scaled to it)", default=None)
    max_side: int | None = checked(lambda n: n >= 8, "null (no cap) or an integer >= 8 (the long side is shrunk "
                                   "to at most this)", default=500)
    quality: int = checked(lambda q: 1 <= q <= 100, "an integer from 1 to 100 (JPEG quality)", default=90)
    shard_mb: int = checked(lambda n: n >= 1, "an integer >= 1 (megabytes per shard file)", default=256)
    builtin: BuiltinDataConfig = field(default_factory=BuiltinDataConfig)
    train_images: int | None = checked(lambda n: n >= 1, "an integer >= 1 or null (what `plan` assumes "
                                       "before the data is prepared)", default=None)

    def __post_init__(self) -> None:
        if self.source in ("imagefolder", "market1501") and not self.root:
            raise ConfigError("root", self.root, f"a folder path (source {self.source!r} reads images from it)")
        if self.classes is not None and self.source != "imagefolder":
            raise ConfigError("classes", self.classes, f"null for source {self.source!r} (a class list selects "
                              "folders of an `imagefolder` source)")


@dataclass(frozen=True)
class AugmentConfig:
    """What a recipe's loaders do to images. Training: `standard` is the authors' main.py, RandomResizedCrop +
    flip; `timm` uses timm.data.create_transform (RandomResizedCrop, RandAugment, colour jitter, Random
    Erasing). Evaluation: resize the short side to size / `eval_crop_pct`, then the centre crop. Both
    standardise with `mean` and `std` (null: the prepared data's own)."""

    kind: Literal["standard", "timm"] = "standard"
    crop_scale: tuple[float, ...] = checked(lambda s: len(s) == 2 and 0 < s[0] <= s[1] <= 1,
                                            "[low, high] with 0 < low <= high <= 1 (RandomResizedCrop's area "
                                            "share)", default=(0.08, 1.0))
    crop_ratio: tuple[float, ...] = checked(lambda s: len(s) == 2 and 0 < s[0] <= s[1],
                                            "[low, high] with 0 < low <= high (RandomResizedCrop's aspect ratio "
                                            "range)", default=(3 / 4, 4 / 3))
    hflip: float = checked(lambda p: 0 <= p <= 1, "a probability from 0 to 1", default=0.5)
    auto_augment: str | None = checked(lambda s: s.startswith(("rand", "augmix", "original", "v0")),
                                       "null or a timm policy string such as 'rand-m9-mstd0.5-inc1'",
                                       default=None)
    color_jitter: float = checked(lambda c: c >= 0, "a number >= 0", default=0.0)
    reprob: float = checked(lambda p: 0 <= p <= 1, "a probability from 0 to 1 (Random Erasing)", default=0.0)
    remode: Literal["pixel", "const", "rand"] = "pixel"
    interpolation: Literal["bilinear", "bicubic", "random"] = "bilinear"
    repeats: int = checked(lambda n: n >= 1, "an integer >= 1 (1: every image once an epoch)", default=1)
    """Repeated augmentation: each drawn training image comes this many times in a row, differently augmented,
    in an epoch of as many samples as images (DeiT's RASampler, 3)."""
    eval_crop_pct: float = checked(lambda p: 0 < p <= 1, "a number with 0 < crop_pct <= 1 (the evaluation crop's "
                                   "side over the resized short side)", default=224 / 256)
    eval_interpolation: Literal["bilinear", "bicubic"] = "bilinear"
    mean: tuple[float, ...] | None = checked(lambda m: len(m) == 3, "null (the prepared data's own, stats.json) "
                                             "or three numbers (RGB, on the 0-1 scale)", default=None)
    std: tuple[float, ...] | None = checked(lambda s: len(s) == 3 and min(s) > 0, "null (the prepared data's own, "
                                            "stats.json) or three positive numbers (RGB, on the 0-1 scale)",
                                            default=None)


# ---- Training: recipes, trials, tracking and how a trial's processes run


@dataclass(frozen=True)
class RecipeConfig:
    """A training recipe in the paper's own units (its epochs, its batch size).

    A trial that trains fewer epochs or uses another batch keeps the recipe's shape: every epoch count
    below is scaled by `trial epochs / epochs` and `lr` by `trial batch / batch_size` (linear scaling).
    """

    name: str = "custom"
    optimizer: Literal["sgd", "adamw", "amsgrad"] = "sgd"
    lr: float = checked(lambda v: v > 0, "a positive number (the lr at `batch_size`)", default=0.1)
    batch_size: int = checked(lambda b: b >= 1, "an integer >= 1", default=256)
    epochs: int = checked(lambda e: e >= 1, "an integer >= 1", default=100)
    weight_decay: float = checked(lambda w: w >= 0, "a number >= 0", default=1e-4)
    momentum: float = checked(lambda m: 0 <= m < 1, "a number with 0 <= momentum < 1", default=0.9)
    opt_eps: float = checked(lambda e: 0 < e < 1, "a number with 0 < eps < 1 (Adam's denominator term)",
                             default=1e-8)
    no_decay_norm_bias: bool = False
    """No weight decay on norms, biases and the model's `no_weight_decay()` (NOAH's biases, class tokens);
    without it every parameter decays, as in the authors' commands without `--nowd-bn`."""
    schedule: Literal["step", "multistep", "cosine", "linear"] = "cosine"
    lr_step: Literal["update", "epoch"] = "update"
    """When the schedule sets the lr: every update, or once at the start of each epoch (the DeiT, PVT and timm
    scripts the authors train ViTs and MLPs with)."""
    decay_epochs: float = checked(lambda d: d > 0, "a positive number of epochs (step schedule)", default=30.0)
    milestones: tuple[float, ...] = ()
    decay_rate: float = checked(lambda d: 0 < d <= 1, "a number with 0 < decay_rate <= 1", default=0.1)
    warmup_epochs: float = checked(lambda w: w >= 0, "a number of epochs >= 0", default=0.0)
    warmup_lr: float = checked(lambda w: w >= 0, "a number >= 0", default=0.0)
    min_lr: float = checked(lambda m: m >= 0, "a number >= 0", default=0.0)
    label_smoothing: float = checked(lambda s: 0 <= s < 1, "a number with 0 <= smoothing < 1", default=0.0)
    mixup: float = checked(lambda a: a >= 0, "a Beta alpha >= 0 (0 = off)", default=0.0)
    cutmix: float = checked(lambda a: a >= 0, "a Beta alpha >= 0 (0 = off)", default=0.0)
    mixup_prob: float = checked(lambda p: 0 <= p <= 1, "a probability from 0 to 1", default=1.0)
    mixup_switch_prob: float = checked(lambda p: 0 <= p <= 1, "a probability from 0 to 1", default=0.5)
    drop_path: float = checked(lambda p: 0 <= p < 1, "a number with 0 <= drop_path < 1", default=0.0)
    block_dropout: float = checked(lambda p: 0 <= p < 1, "a number with 0 <= block_dropout < 1 (non-zero only for "
                                   "DeiT, Mixer and gMLP)", default=0.0)
    """Dropout inside every block's MLPs (timm's `--drop` on a Mixer, its `proj_drop_rate`)."""
    layer_scale: float | None = checked(lambda v: v > 0, "null or a positive init value", default=None)
    ema_decay: float | None = checked(lambda d: 0 < d < 1, "null or a number with 0 < decay < 1", default=None)
    clip_grad: float | None = checked(lambda c: c > 0, "null or a positive max norm", default=None)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    zero_init_last: bool = False
    """Start each residual block's last BatchNorm at 0 (Goyal et al. 2017, timm's default) so a deep ResNet
    starts as a shallow one; the authors' ResNets start it at 1. Only ResNets have it."""

    def __post_init__(self) -> None:
        if self.schedule == "multistep" and not self.milestones:
            raise ConfigError("milestones", self.milestones, "a non-empty list of epochs (schedule multistep)")
        if self.warmup_epochs >= self.epochs:
            raise ConfigError("warmup_epochs", self.warmup_epochs, f"fewer than the recipe's {self.epochs} epochs")


@dataclass(frozen=True)
class TrialConfig:
    """One training run as params.yaml or the command line states it: a recipe by name (or given whole),
    N and r possibly left to the backbone's defaults, `epochs` and `batch_size` null for the recipe's own.
    `pipeline.training.trial.resolve_trial` turns it into the `Trial` that trains and is hashed."""

    backbone: str = checked(lambda b: bool(b), "a registered backbone key (pipeline.models.list_backbones)")
    data_dir: str = checked(lambda d: bool(d), "a prepared dataset folder (with manifest.csv)")
    head: HeadConfig = field(default_factory=HeadConfig)
    recipe: str | RecipeConfig = "resnet"
    seed: int = seed_field()
    img_size: int = img_size_field(224)
    width: float = width_field()
    epochs: int | None = checked(lambda e: e >= 1, "an integer >= 1 or null (the recipe's)", default=None)
    batch_size: int | None = checked(lambda b: b >= 1, "an integer >= 1 or null (the recipe's)", default=None)
    init_from: TrialConfig | None = None


@dataclass(frozen=True)
class MlflowConfig:
    """Where runs are tracked. A relative SQLite path is taken from the repository root."""

    tracking_uri: str = checked(lambda u: inside(u.removeprefix("sqlite:///")),
                                f"an MLflow tracking URI; a relative SQLite file or folder: {INSIDE_RULE}",
                                default="sqlite:///mlflow.db")
    log_weights: bool = False


Decode = Literal["auto", "cpu", "gpu"]
"""Where a training process decodes JPEGs (`TrainConfig.decode`, and `train --decode`)."""


@dataclass(frozen=True)
class TrainConfig:
    """How a trial runs (not what it computes, so none of this enters the trial identity).

    `num_workers` > 1 trains data-parallel through Ray Train's TorchTrainer with the same global batch;
    `use_gpu` null means: a GPU when one is there. `loader_workers` null gives each training process its
    CPUs minus one as decoding processes; `decode` auto decodes JPEGs on the GPU (nvJPEG, with crop, flip
    and normalisation there too) when training on one with the standard augmentation, else on the CPU.
    `deterministic` chooses on a GPU between bit-exact repeats and speed (`training.engine.set_determinism`);
    false by default: the paper-scale GPU runs want cuDNN's autotuned kernels, and even bit-exact they
    repeat only on the same GPU model and CUDA/cuDNN; on CPU, where the embedded study runs, it changes
    nothing (a CPU trial repeats bit for bit for a fixed thread count either way). Every run records the
    mode it used (the `machine.deterministic` tag). `compile` runs the training and evaluation passes through
    `torch.compile` (inductor); null means on a GPU, where its fused kernels pay off, and not on a CPU, where
    compiling takes longer than a smoke trial trains. Every run records whether it compiled (the `compiled`
    tag); compiled or not is the same computation, so it is not part of the trial identity either.
    """

    num_workers: int = checked(lambda n: n >= 1, "an integer >= 1", default=1)
    use_gpu: bool | None = None
    loader_workers: int | None = checked(lambda n: n >= 0, "null (the trial's CPUs minus one) or an integer >= 0",
                                         default=None)
    decode: Decode = "auto"
    checkpoint_root: str = checked(inside, f"a folder path: {INSIDE_RULE}", default="checkpoints")
    progress: Literal["auto", "bar", "line", "off"] = "auto"
    deterministic: bool = False
    compile: bool | None = checked(lambda c: isinstance(c, bool), "true, false or null (null: compile on a GPU, "
                                   "not on a CPU)", default=None)


# ---- Benchmark: Table 10's frames/s, the `benchmark` section of params.yaml


def rounds_field(default: int) -> Any:
    """A number of timed rounds: at least two, the fewest a confidence interval can be built from."""
    return checked(lambda n: n >= 2, "an integer >= 2 (an interval needs two rounds)", default=default)


@dataclass(frozen=True)
class BenchmarkConfig:
    """Table 10: which backbones to time and how long. Baseline and NOAH are timed in turns, at least
    `*_repeats` rounds; then more until the 95% interval of the overhead is narrower than the paper's
    overhead for that row, or `*_max_repeats` rounds or `*_seconds` of timed rounds are reached."""

    backbones: tuple[str, ...] | None = None  # null: every registered backbone (pipeline.models.list_backbones)
    cpu_repeats: int = rounds_field(5)
    cpu_max_repeats: int = rounds_field(200)
    cpu_seconds: float = checked(lambda s: s >= 0, "a number of seconds >= 0", default=5.0)
    cpu_warmup: int = checked(lambda n: n >= 0, "an integer >= 0", default=1)
    gpu_repeats: int = rounds_field(10)
    gpu_max_repeats: int = rounds_field(200)
    gpu_seconds: float = checked(lambda s: s >= 0, "a number of seconds >= 0", default=10.0)
    gpu_warmup: int = checked(lambda n: n >= 0, "an integer >= 0", default=3)
    cpu_batch: int = checked(lambda n: n >= 1, "an integer >= 1", default=1)
    gpu_batch: int = checked(lambda n: n >= 1, "an integer >= 1", default=200)
    img_size: int = img_size_field(224)
    out: str = checked(inside, f"a path prefix (writes PREFIX.csv and PREFIX.json): {INSIDE_RULE}",
                       default="results/table10")

    def __post_init__(self) -> None:
        for dev in ("cpu", "gpu"):
            least, most = getattr(self, f"{dev}_repeats"), getattr(self, f"{dev}_max_repeats")
            if most < least:
                raise ConfigError(f"{dev}_max_repeats", most, f"an integer >= {dev}_repeats ({least})")


# ---- Params: the whole of params.yaml


@dataclass(frozen=True)
class Params:
    """params.yaml: the active `profile` picks the scale; every other section is looked up by name."""

    profile: str
    profiles: dict[str, ProfileConfig]
    datasets: dict[str, PrepareConfig]
    tables: dict[str, TableConfig]
    recipes: dict[str, RecipeConfig] = field(default_factory=dict)
    seeds: tuple[int, ...] = seeds_field((0,))
    mlflow: MlflowConfig = field(default_factory=MlflowConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    benchmark: BenchmarkConfig = field(default_factory=BenchmarkConfig)
    study: StudyConfig = field(default_factory=StudyConfig)

    def __post_init__(self) -> None:
        for section in ("profiles", "datasets", "tables", "recipes"):
            for name in getattr(self, section):
                check_name(f"{section}.{name}", name)
        if self.profile not in self.profiles:
            raise ConfigError("profile", self.profile, "a key of `profiles`: " + ", ".join(self.profiles))
        for name, prof in self.profiles.items():
            for key in ("dataset", "reid_dataset"):
                ref = getattr(prof, key)
                if ref is not None and ref not in self.datasets:
                    raise ConfigError(f"profiles.{name}.{key}", ref, "a key of `datasets`: " + ", ".join(self.datasets))
                out = self.datasets[ref].out if ref is not None else "/"
                if not (out.startswith("/") or posixpath.normpath(out).startswith(f"data/{name}/")):
                    raise ConfigError(f"datasets.{ref}.out", out, f"a folder under data/{name}/ (the prepare "
                                      f"stage's out for profile {name!r}) or an absolute path outside DVC")
            for recipe in prof.recipes:
                if recipe not in self.recipes:
                    raise ConfigError(f"profiles.{name}.recipes.{recipe}", prof.recipes[recipe],
                                      "a key of `recipes`: " + ", ".join(self.recipes))
                self.recipe(recipe, name)
        owner: dict[str, str] = {}
        for name, prof in self.profiles.items():
            for i, table in enumerate(prof.tables or ()):
                if table not in self.tables or table in owner:
                    allowed = (f"a table no other profile lists ({owner[table]!r} does)" if table in owner else
                               "a key of `tables`: " + ", ".join(self.tables))
                    raise ConfigError(f"profiles.{name}.tables[{i}]", table, allowed)
                owner[table] = name
        for i, table in enumerate(self.study.tables):
            if table not in self.tables or table in self.study.tables[:i]:
                allowed = ("each table once" if table in self.tables else
                           "a key of `tables`: " + ", ".join(self.tables))
                raise ConfigError(f"study.tables[{i}]", table, allowed)
        for name, table in self.tables.items():
            for key in ("recipe", "finetune_recipe", "pretrain_recipe"):
                ref = getattr(table, key)
                if ref is not None and ref not in self.recipes:
                    raise ConfigError(f"tables.{name}.{key}", ref, "a key of `recipes`: " + ", ".join(self.recipes))
            for row in table.rows.values():
                if row.recipe is not None and (row.recipe not in self.recipes or table.task == "reid"):
                    allowed = ("null (a reid table's recipes are its own)" if table.task == "reid" else
                               "a key of `recipes`: " + ", ".join(self.recipes))
                    raise ConfigError(f"tables.{name}.rows.{row.name}.recipe", row.recipe, allowed)
            for key in ("finetune_recipe", "pretrain_recipe"):
                if table.task == "reid" and getattr(table, key) is None:
                    raise ConfigError(f"tables.{name}.{key}", None, "a key of `recipes` (reid tables fine-tune too)")

    @property
    def active(self) -> ProfileConfig:
        """The profile in force."""
        return self.profiles[self.profile]

    @property
    def trial_seeds(self) -> tuple[int, ...]:
        """The seeds every row trains once per at the active profile: its own `seeds`, else the top-level ones."""
        return self.active.seeds or self.seeds

    def tables_of(self, profile: str | None = None) -> list[str]:
        """The tables `profile` (default: the active one) trains and `plan` prices: those its `tables` lists,
        else every table no profile lists (a proxy study's table is not trained at the smoke or paper scale)."""
        listed = self.profiles[profile or self.profile].tables
        return list(listed) if listed is not None else [table for table in self.tables if self.owner(table) is None]

    def owner(self, table: str) -> str | None:
        """The profile whose `tables` lists `table`; None when it is not listed (every profile without a list of
        its own trains it)."""
        return next((name for name, prof in self.profiles.items() if table in (prof.tables or ())), None)

    def for_tables(self, tables: list[str]) -> Params:
        """These params at the profile that trains `tables`: the profile that lists them, else the active one.
        A study trains at one profile, so tables of two profiles, or a table its profile does not train, fail."""
        for table in tables:
            if table not in self.tables:
                raise ConfigError("tables", table, "a key of `tables`: " + ", ".join(self.tables))
        owners = {table: self.owner(table) or self.profile for table in tables}
        if len(set(owners.values())) > 1:
            raise ConfigError("tables", list(tables), "tables that train at one profile (a study runs at one "
                              "scale); these train at " + ", ".join(f"{t}: {p}" for t, p in owners.items()))
        at = dataclasses.replace(self, profile=next(iter(owners.values()), self.profile))
        for table in tables:
            if table not in at.tables_of():
                raise ConfigError("tables", table, f"a table of profile {at.profile!r}, which trains only "
                                  + ", ".join(at.tables_of()))
        return at

    def recipe(self, name: str, profile: str | None = None) -> RecipeConfig:
        """Recipe `name` as `profile` (default: the active one) trains it: `recipes.<name>` with that
        profile's fields for it laid over (a nested section such as `augment` is replaced whole)."""
        profile = profile or self.profile
        base = self.recipes[name]
        patch = self.profiles[profile].recipes.get(name)
        if patch:
            base = parse(RecipeConfig, {**to_dict(base), **patch}, f"profiles.{profile}.recipes.{name}")
        return dataclasses.replace(base, name=name)
