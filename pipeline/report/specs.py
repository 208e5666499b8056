"""What each of Tables 1–11 (and the proxy study, some of Tables 1–3's rows) looks like in the paper: rows come
from `pipeline/paper/*.csv`, the rest is here.

A `TableSpec` names the paper CSV that fixes the rows and their order, the setting columns the paper prints
(with the paper's wording), the metric columns with their units, and how each row's network is labelled.
"""
from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from fractions import Fraction
from typing import Any, Literal

import torch

from ..config import ConfigError, HeadConfig, to_dict
from ..models import backbone_table, build_reid_model, resolve_head
from ..models.backbones import BackboneInfo
from ..models.complexity import count, measure, paper_head
from ..paper import read_paper_table

PaperRow = dict[str, str]


@dataclass(frozen=True)
class Metric:
    """One metric column: `name` in CSVs, `source` in results (default `name`), `paper` in the paper CSV
    (× `scale` gives our unit; "" when the paper prints none)."""

    name: str
    label: str
    paper: str
    kind: Literal["pct", "params", "madds", "params_m", "fps"] = "pct"
    better: Literal["max", "min"] | None = "max"  # which value is bold (None: none)
    delta: bool = True  # printed with (↑x)/(↓x) against the block's baseline
    scale: float = 1.0
    trained: bool = True  # needs a finished training run (params and MAdds do not)
    source: str = ""
    interval: str = ""  # a timed metric's prefix of `_low`, `_high` (its 95% interval), `_rounds` and `_resolved`


@dataclass(frozen=True)
class Setting:
    """A setting column as the paper prints it, derived from the paper CSV row."""

    label: str
    show: Callable[[PaperRow], str]


@dataclass(frozen=True)
class TableSpec:
    name: str
    title: str
    paper_csv: str
    settings: tuple[Setting, ...]
    metrics: tuple[Metric, ...]
    network: Callable[[PaperRow], str]
    decimals: int = 2
    producer: Literal["study", "benchmark"] = "study"  # the DVC stage that writes its results file
    groups: bool = False  # Table 10 prints CNNs / ViTs / MLPs section rows
    paper_table: int | None = None  # Tables 1-3 share one CSV: the rows whose backbone's paper_table this is
    keys: tuple[str, ...] = ()  # the proxy: only the paper CSV's rows of these backbones
    proxy: bool = False  # a proxy study: its NOAH rows' top-1 deltas are set beside the paper's (report/proxy.py)
    task: Literal["classify", "reid"] = "classify"  # which model its Params and MAdds count

    @property
    def seeded(self) -> bool:
        """A table of trained rows, one run per seed (Table 10 is timed instead)."""
        return self.producer == "study"

    @property
    def heading(self) -> str:
        """`Table 4`, or the table's own name (`Proxy`)."""
        return self.name.replace("table", "Table ") if self.name.startswith("table") else self.name.capitalize()

    @property
    def complexity_setting(self) -> str:
        classes, size = PAPER_SETTINGS[self.task]
        what = "identities" if self.task == "reid" else "classes"
        return f"{classes:,} {what}, {size}×{size} input"


PAPER_SETTINGS = {"classify": (1000, 224), "reid": (751, 256)}
"""(classes, input size) at which a table's Params and MAdds are counted, whatever scale trained it: ImageNet's
1,000 classes at 224×224; for re-identification Market-1501's 751 training identities at the ImageNet
profile's `reid_img_size`, 256."""


@functools.cache
def _complexity(task: str, backbone: str, head: HeadConfig) -> tuple[int, int]:
    """(Params, MAdds) of a model at `PAPER_SETTINGS`, counted on the meta device (no memory, no time)."""
    classes, size = PAPER_SETTINGS[task]
    if task == "classify":
        return measure(backbone, head, classes, size)
    with torch.device("meta"):
        model = build_reid_model(backbone, head, classes, size)
    return count(model, size)


def paper_complexity(spec: TableSpec, row: PaperRow, result: dict[str, Any]) -> dict[str, Any]:
    """`params` and `madds` of the row's model as it ran (the paper's row when it has not run) at the paper's
    settings, or the `error` why that model cannot be built there."""
    backbone = result.get("backbone") or row["key"]
    try:
        head = resolve_head(backbone, result["head"]) if result.get("head") else paper_head(row)
        params, madds = _complexity(spec.task, backbone, head)
    except ConfigError as err:
        return {"error": f"this model cannot be built at the paper's settings ({err})"}
    return {"params": params, "madds": madds}


def changed_settings(spec: TableSpec, row: PaperRow, result: dict[str, Any]) -> list[str]:
    """How the row as it ran differs from the paper's row (`option=value`): its backbone, or a head option a
    user set in params.yaml. Such a row is labelled with them and not compared with the paper."""
    if not spec.seeded or not result.get("head"):
        return []
    backbone = result.get("backbone") or row["key"]
    ran, paper = to_dict(resolve_head(backbone, result["head"])), to_dict(paper_head(row))
    out = [f"backbone={backbone}"] if backbone != row["key"] else []
    return out + [f"{k}={v}" for k, v in ran.items() if v != paper.get(k) and v is not None]


def backbones() -> dict[str, BackboneInfo]:
    """Every registered backbone's facts by key (`pipeline/models/backbones.py`): its name, family, defaults."""
    return backbone_table()


def backbone_name(key: str) -> str:
    """A backbone's display name (the paper's, for the paper's backbones), or its key when not registered."""
    info = backbones().get(key)
    return info.name if info is not None else key


def backbone_family(key: str) -> str:
    info = backbones().get(key)
    return info.family if info is not None else ""


def unprinted_row(spec: TableSpec, number: int, result: dict[str, Any]) -> PaperRow:
    """The row a result without a paper counterpart stands in (a backbone or row the paper does not print): the
    paper CSV's columns, with its number, backbone, head kind and its own settings (`N`, `r`, a head option)
    where the table prints them, and no paper value."""
    columns = list(read_paper_table(spec.paper_csv)[0])
    head = result.get("head") if isinstance(result.get("head"), dict) else {}
    setting = {**head, **(result.get("setting") if isinstance(result.get("setting"), dict) else {})}
    metrics = {m.paper for m in spec.metrics}
    row = {c: "" if c in metrics or setting.get(c) is None else str(setting[c]) for c in columns}
    row.update(row=str(number), key=str(result.get("backbone") or result.get("key") or ""))
    if "head" in columns:
        row["head"] = str(head.get("kind", ""))
    return row


def paper_rows(spec: TableSpec) -> list[PaperRow]:
    """The paper's rows of a table in print order, each with a `row` number (Table 10 numbers them 1…26)."""
    rows = read_paper_table(spec.paper_csv)
    if spec.paper_table is not None:
        rows = [r for r in rows if backbones()[r["key"]].paper_table == spec.paper_table]
    if spec.keys:
        rows = [r for r in rows if r["key"] in spec.keys]
    for i, r in enumerate(rows, 1):
        r.setdefault("row", str(i))
    return rows


FIDELITY = "docs/fidelity.md"
GUESSES: dict[str, Callable[[PaperRow], str | None]] = {
    "table7": lambda r: (f"`aggregation: {r['aggregation']}` is one of two readings of the paper's "
                         f"\"{'average' if r['aggregation'] == 'avg' else 'max'} pooling\" ({FIDELITY})"
                         if r.get("aggregation") in ("avg", "max") else None),
    "table8": lambda r: f"stochastic depth 0.1 and layer scale (not applied: no such parameter in a ResNet) follow "
                        f"ConvNeXt's code, not the paper ({FIDELITY})",
    "table9": lambda r: None if is_baseline(r) else f"NOAH as the 512-wide re-identification embedding, N and r "
                                                    f"from backbones.csv, is the pipeline's reading ({FIDELITY})",
}
"""Per table, the footnote of a row whose setting neither the paper nor the authors' code settles."""


def guess_notes(spec: TableSpec, row: PaperRow) -> list[str]:
    """The footnotes of `row` for settings that rest on the pipeline's own reading (docs/fidelity.md)."""
    guess = GUESSES.get(spec.name)
    notes = [note] if guess is not None and (note := guess(row)) else []
    backbone = backbones().get(row["key"])
    if row.get("head") == "noah" and backbone is not None and backbone.dropout_source == "guess":
        notes.append(f"NOAH's dropout {backbone.noah_dropout} is its family's: the authors' commands do not "
                     f"state it for {row['key']} ({FIDELITY})")
    return notes


def is_baseline(row: PaperRow) -> bool:
    return row.get("head", "") in ("baseline", "baseline_fc")


def _ratio(value: str) -> str:
    return str(Fraction(value).limit_denominator(64)) if value else "-"


def _dash(value: str) -> str:
    return value or "-"


def _choice(label: str, column: str, words: dict[str, str]) -> Setting:
    return Setting(label, lambda r: words.get(r.get(column, ""), r.get(column, "") or "-"))


def _network(row: PaperRow) -> str:
    return backbone_name(row["key"]) if is_baseline(row) else "+ NOAH"


ACCURACY = (Metric("top1", "Top-1 (%)", "top1", source="best_top1"), Metric("top5", "Top-5 (%)", "top5"),
            Metric("top1_last", "Last-epoch top-1 (%)", "", better=None, delta=False, source="top1"))
"""Top-1 is the best epoch's, the convention of the paper's code (it keeps the best checkpoint; DeiT and PVT
print the best epoch); the last epoch's is beside it (docs/fidelity.md). Top-5 is the last epoch's."""
COMPLEXITY = (
    Metric("params", "Params", "params_m", kind="params", better=None, delta=False, scale=1e6, trained=False),
    Metric("madds", "MAdds", "madds_g", kind="madds", better=None, delta=False, scale=1e9, trained=False),
)
IMAGENET = COMPLEXITY + ACCURACY


def _split_label(column: str, level: int) -> Setting:
    """Tables 5: ✓ where the first / second level feature split is used."""
    uses = {"both": (True, True), "first": (True, False), "none": (False, False)}
    return Setting(["1st FS", "2nd FS"][level],
                   lambda r: "✓" if uses.get(r.get(column, ""), (False, False))[level] else "-")


def _main_network(row: PaperRow) -> str:
    return "+ GAP head" if row.get("head") == "gap" else _network(row)


def _table8_network(row: PaperRow) -> str:
    suffix = {"both": "", "first": " (w/o 2nd FS)", "none": " (w/ no FS)"}
    return _network(row) + ("" if is_baseline(row) else suffix.get(row["feature_split"], f" ({row['feature_split']})"))


def _table9_network(row: PaperRow) -> str:
    return "ResNet50-FC" if is_baseline(row) else "+ NOAH"


def _table10_network(row: PaperRow) -> str:
    return backbone_name(row["key"])


PROXY_BACKBONES = ("resnet18", "mobilenetv2_050", "deit_tiny_050", "gmlp_tiny_050")
"""The proxy study's backbones (params.yaml `tables.proxy`): light ones of each family, cheap to train on one GPU."""

FAMILY_TITLES = {1: "CNNs", 2: "ViTs (DeiT-Tiny also with a GAP head in place of its class token)", 3: "MLPs"}

SPEED = tuple(
    Metric(col, label, col, kind=kind, better=better, delta=False, trained=False, interval=interval)
    for col, label, kind, better, interval in (
        ("vanilla_params_m", "Vanilla Params", "params_m", None, ""),
        ("vanilla_gpu_fps", "Vanilla GPU (frames/s)", "fps", None, ""),
        ("vanilla_cpu_fps", "Vanilla CPU (frames/s)", "fps", None, ""),
        ("noah_params_m", "NOAH Params", "params_m", None, ""),
        ("noah_gpu_fps", "NOAH GPU (frames/s)", "fps", None, ""),
        ("noah_cpu_fps", "NOAH CPU (frames/s)", "fps", None, ""),
        ("gpu_overhead_pct", "+ GPU (%)", "fps", "min", "gpu"),
        ("cpu_overhead_pct", "+ CPU (%)", "fps", "min", "cpu"),
    )
)
"""Table 10's overheads carry the benchmark's `{dev}_overhead_low`/`_high`, `{dev}_rounds` and `{dev}_resolved`."""

TABLES: dict[str, TableSpec] = {s.name: s for s in (
    *(TableSpec(f"table{n}", f"{FAMILY_TITLES[n]} on ImageNet: the baseline head vs. NOAH", "table1_3_main.csv", (),
                IMAGENET, _main_network, paper_table=n) for n in (1, 2, 3)),
    TableSpec("table4", "Ablation with ResNet50: key ratio r and number of POCA blocks N", "table4_N_r.csv",
              (Setting("r", lambda r: _ratio(r["r"])), Setting("N", lambda r: _dash(r["N"]))), IMAGENET, _network),
    TableSpec("table5", "Ablation with ResNet backbones: NOAH without vs. with feature split (FS)",
              "table5_feature_split.csv", (_split_label("feature_split", 0), _split_label("feature_split", 1)),
              IMAGENET, _network),
    TableSpec("table6", "Ablation with ResNet18: the softmax of the POCA block along different dimensions",
              "table6_softmax_axis.csv",
              (_choice("Activation", "softmax_axis",
                       {"spatial": "Along spatial (our design)", "channel": "Along channel"}),),
              IMAGENET, _network),
    TableSpec("table7", "Ablation with ResNet18: operators aggregating local POCAs into a global POCA vector",
              "table7_aggregation.csv",
              (_choice("Method", "aggregation",
                       {"sum": "Sum (our design)", "max": "Max pooling", "avg": "Average pooling"}),),
              IMAGENET, _network),
    TableSpec("table8", "ResNet50 in the aggressive from-scratch training regime (ConvNeXt recipe)",
              "table8_aggressive.csv", (), IMAGENET, _table8_network),
    TableSpec("table9", "Person ReID on Market-1501 with ResNet50: from scratch and fine-tuned", "table9_reid.csv",
              (), COMPLEXITY + (Metric("scratch_top1", "From scratch Top-1 (%)", "scratch_top1"),
                   Metric("scratch_map", "From scratch mAP (%)", "scratch_map"),
                   Metric("finetune_top1", "Fine-tuning Top-1 (%)", "finetune_top1"),
                   Metric("finetune_map", "Fine-tuning mAP (%)", "finetune_map")),
              _table9_network, decimals=1, task="reid"),
    TableSpec("table10", "Inference speed (frames/s) of baseline vs. NOAH models and NOAH's overhead",
              "table10_speed.csv", (), SPEED, _table10_network, producer="benchmark", groups=True),
    TableSpec("table11", "ResNet18: attention designs of the POCA block", "table11_poca_variants.csv",
              (_choice("Method", "variant", {
                  "poca": "The POCA block (our design)",
                  "sigmoid": "Replacing the softmax by the sigmoid",
                  "kernel3x3": "Replacing 1×1 conv. kernels by 3×3 ones",
                  "shared_attention": "Sharing a single spatial attention to M image categories",
                  "extra_linear": "Adding an extra linear layer before W_ki and W_vi"}),),
              IMAGENET, _network),
    TableSpec("proxy", "A one-GPU proxy study: light backbones with and without NOAH on an ImageNet class subset",
              "table1_3_main.csv", (), IMAGENET, _network, keys=PROXY_BACKBONES, proxy=True),
)}
"""Tables 1–11 and the proxy study by results name (`results/[study/]<name>.json` → `reports/<name>.md|.csv`)."""

FAMILIES = {"cnn": "CNNs", "vit": "ViTs", "mlp": "MLPs"}
