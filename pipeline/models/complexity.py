"""Params and MAdds of any model, and `python -m pipeline complexity` (docs/interface.md).

MAdds are torch's FlopCounterMode flops / 2: every matmul and convolution, attention matmuls included
(the CPU flash-attention kernel has no formula in torch, so one is registered here). Bias adds,
normalisation and activations are not counted, as in the paper. NOAH's elementwise work is added from
the paper's count (Sec. 3, "Computational complexity"): its embeddings are matmuls (HWMC, counted by
torch), plus HWMN for the Hadamard product, HWMN for the sum over groups and positions and M for the
classifier, so a NOAH head costs HWMC + 2HWMN + M in total.
"""
from __future__ import annotations

import argparse
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

from ..config import ConfigError, HeadConfig, parse_head_spec
from ..paper import read_paper_table
from ..utils.io import atomic_write_text, csv_text
from ..utils.progress import steps
from .backbones import backbone_info, list_backbones
from .factory import build_model, resolve_head
from .noah import NoahHead

aten = torch.ops.aten


def _cpu_sdpa_flops(query, key, value, *args, out_val=None, **kwargs) -> int:
    return sdpa_flop_count(query, key, value)


_EXTRA_FORMULAS = {aten._scaled_dot_product_flash_attention_for_cpu: _cpu_sdpa_flops}


def noah_elementwise_madds(head: NoahHead, height: int, width: int) -> int:
    """The paper's non-matmul MAdds of one NOAH head: Hadamard (HWMN), aggregation (HWMN), classifier (M)."""
    n, m = head.cfg.N, head.num_classes
    return 2 * height * width * m * n + m


def count(model: nn.Module, img_size: int = 224) -> tuple[int, int]:
    """(Params, MAdds) of `model` for one img_size×img_size RGB image; meta-device models run instantly."""
    params = sum(p.numel() for p in model.parameters())
    extra = []

    def add_noah(module: NoahHead, inputs: tuple[torch.Tensor, ...], output: Any) -> None:
        extra.append(noah_elementwise_madds(module, inputs[0].shape[-2], inputs[0].shape[-1]))

    heads = [m for m in model.modules() if isinstance(m, NoahHead)]
    hooks = [m.register_forward_hook(add_noah) for m in heads]
    for head in heads:  # count Eq. (1) as written, not the fused kernel's data-dependent chunking
        head.forward = head.forward_reference
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        with FlopCounterMode(display=False, custom_mapping=_EXTRA_FORMULAS) as counter, torch.no_grad():
            model(torch.zeros(1, 3, img_size, img_size, device=device))
    finally:
        model.train(was_training)
        for hook in hooks:
            hook.remove()
        for head in heads:
            del head.forward
    return params, counter.get_total_flops() // 2 + sum(extra)


# ---- The paper's figures for a (backbone, head) pair, from any table that prints it

_VARIANTS = {"poca": {}, "sigmoid": {"activation": "sigmoid"}, "kernel3x3": {"kernel_size": 3},
             "shared_attention": {"shared_attention": True}, "extra_linear": {"extra_linear": True}}


def paper_head(row: dict[str, str]) -> HeadConfig:
    """The head config a paper table row describes (Table 9's `baseline_fc` is the backbone's own head)."""
    data: dict[str, Any] = {"kind": "baseline" if row["head"] == "baseline_fc" else row["head"]}
    if row["head"] == "noah":
        data.update(_VARIANTS[row.get("variant") or "poca"])
        data.update({k: row[k] for k in ("feature_split", "softmax_axis", "aggregation") if row.get(k)})
        if row.get("N"):
            data["N"], data["r"] = int(row["N"]), float(row["r"])
    return resolve_head(row["key"], data)


def paper_figures() -> dict[tuple[str, HeadConfig], tuple[int, int]]:
    """(backbone, resolved head) -> (Params, MAdds) as printed in Tables 1–5, 8 and 11."""
    out: dict[tuple[str, HeadConfig], tuple[int, int]] = {}
    for name in ("table1_3_main.csv", "table4_N_r.csv", "table5_feature_split.csv", "table8_aggressive.csv",
                 "table11_poca_variants.csv"):
        for row in read_paper_table(name):
            key = (row["key"], paper_head(row))
            out.setdefault(key, (round(float(row["params_m"]) * 1e6), round(float(row["madds_g"]) * 1e9)))
    return out


# ---- Command line


@dataclass(frozen=True)
class Row:
    backbone: str
    head: HeadConfig
    params: int
    madds: int
    paper: tuple[int, int] | None

    def as_dict(self) -> dict[str, Any]:
        options = [f"{k}={v}" for k, v in self.head.options().items()]
        paper_params, paper_madds = self.paper or ("", "")
        return {"backbone": self.backbone, "head": self.head.kind,
                "N": "" if self.head.N is None else self.head.N, "r": "" if self.head.r is None else self.head.r,
                "options": ";".join(options) if self.head.kind == "noah" else "",
                "params": self.params, "madds": self.madds, "paper_params": paper_params,
                "paper_madds": paper_madds,
                "params_rel_err": _rel(self.params, paper_params), "madds_rel_err": _rel(self.madds, paper_madds)}


def _rel(ours: int, paper: int | str) -> str:
    return "" if paper == "" else f"{(ours - paper) / paper:+.4f}"


def default_heads(backbone: str) -> list[HeadConfig]:
    """Baseline, the paper's NOAH and, where Table 2 prints one, the GAP head."""
    kinds = ["baseline", "noah"] + (["gap"] if any(r["key"] == backbone and r["head"] == "gap"
                                                    for r in read_paper_table("table1_3_main.csv")) else [])
    return [resolve_head(backbone, {"kind": k}) for k in kinds]


def measure(backbone: str, head: HeadConfig, num_classes: int = 1000, img_size: int = 224,
            width: float = 1.0) -> tuple[int, int]:
    """(Params, MAdds) of a meta-device model: no memory, no compute."""
    with torch.device("meta"):
        model = build_model(backbone, head, num_classes, img_size, width=width)
    return count(model, img_size)


def rows(pairs: Iterable[tuple[str, HeadConfig]]) -> Iterable[Row]:
    paper = paper_figures()
    for backbone, head in pairs:
        params, madds = measure(backbone, head)
        yield Row(backbone, head, params, madds, paper.get((backbone, head)))


def run(args: argparse.Namespace) -> int:
    keys = list_backbones() if args.backbones is None else [k.strip() for k in args.backbones.split(",") if k.strip()]
    if not keys:
        raise ConfigError("--backbones", args.backbones, "one or more of " + ", ".join(list_backbones()))
    for key in keys:
        backbone_info(key)
    head = None if args.head is None else parse_head_spec(args.head)
    pairs = [(k, h) for k in keys for h in ([resolve_head(k, head)] if head else default_heads(k))]
    data = []
    step = steps(len(pairs))
    for i, row in enumerate(rows(pairs), 1):
        data.append(row.as_dict())
        step(i, f"{row.backbone} {row.head.name}: {row.params:,} params, {row.madds:,} MAdds")
    atomic_write_text(args.out, csv_text(data, list(data[0])))
    print(f"wrote {len(data)} rows to {args.out}", file=sys.stderr)
    return 0

