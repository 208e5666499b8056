"""The paper's figures from our own runs: Fig. 3 (top-1 curves, baseline vs NOAH) and Fig. 2 (A_i, V_i, P_i maps).

Every figure is optional: when what it needs (an MLflow run, its per-epoch metrics, saved weights) is not there,
the function returns a sentence saying why instead of a path, and the report prints that sentence.
"""
from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402
from mlflow.exceptions import MlflowException  # noqa: E402
from torch import nn  # noqa: E402

from ..config import ConfigError, HeadConfig  # noqa: E402
from ..data.loaders import build_loader  # noqa: E402
from ..data.prepared import is_prepared, read_meta  # noqa: E402
from ..models import NoahHead, build_model  # noqa: E402
from ..training.record import (  # noqa: E402
    CONFIG,
    CheckpointError,
    checkpoint_of,
    load_checkpoint,
    read_config,
)
from ..training.tracking import client as mlflow_client  # noqa: E402
from ..training.tracking import local_store  # noqa: E402
from ..utils.io import atomic_write  # noqa: E402
from .render import Line  # noqa: E402
from .specs import backbone_name, backbones, is_baseline  # noqa: E402

TRAIN_KEYS = ("train_loss", "train/loss")
VAL_KEYS = ("val_top1", "val/top1")  # per epoch; the final `top1` is one value, not a curve
WEIGHT_SUFFIXES = (".pt", ".pth")


@dataclass(frozen=True)
class Figure:
    """A figure the README links (`path`), or the reason it could not be drawn (`note`)."""

    title: str
    path: Path | None = None
    note: str | None = None


def is_design(row: dict[str, str]) -> bool:
    """A NOAH row with the paper's design for its backbone (the row Fig. 3 compares with the baseline)."""
    design = HeadConfig()
    defaults = {k: getattr(design, k) for k in ("feature_split", "softmax_axis", "aggregation")} | {"variant": "poca"}
    if row.get("head") != "noah" or any(row.get(k, "") not in ("", v) for k, v in defaults.items()):
        return False
    bb = backbones().get(row["key"])
    if bb is None:
        return False
    n, r = row.get("N") or bb.noah_N, row.get("r") or bb.noah_r  # Tables 1-3 print the design only
    return float(n) == float(bb.noah_N) and float(r) == float(bb.noah_r)


def design_pairs(tables: dict[str, list[Line]]) -> list[tuple[str, Line, Line]]:
    """(label, baseline, NOAH) for every block whose baseline and paper-design NOAH both have a run, once each."""
    pairs, seen = [], set()
    for name, lines in tables.items():
        for line in lines:
            base = line.baseline
            if base is None or is_baseline(line.paper) or not is_design(line.paper) \
                    or {base.status, line.status} != {"FINISHED"}:
                continue
            ids = (base.run.get("run_id"), line.run.get("run_id"))
            if None in ids or ids in seen:
                continue
            seen.add(ids)
            label = f"{backbone_name(line.paper['key'])} ({name.replace('table', 'Table ')})"
            pairs.append((label, base, line))
    return pairs


def open_store(tracking_uri: str | None) -> tuple[Any, str | None]:
    """A client of an existing MLflow store, or the reason there is none (a report never creates a store)."""
    if not tracking_uri:
        return None, "no MLflow tracking URI given (--tracking-uri) or recorded in the results' meta"
    local = local_store(tracking_uri)
    if local is not None and not local.exists():
        return None, f"the MLflow store {local} does not exist (no trial has been tracked yet)"
    return mlflow_client(tracking_uri), None


def metric_history(client: Any, run_id: str, keys: tuple[str, ...]) -> tuple[list[float], list[float]]:
    """Per-epoch values of the first of `keys` the run logged (last value per step)."""
    logged = client.get_run(run_id).data.metrics
    key = next((k for k in keys if k in logged), None)
    if key is None:
        return [], []
    by_step = {m.step: m.value for m in sorted(client.get_metric_history(run_id, key), key=lambda m: m.timestamp)}
    steps = sorted(by_step)
    return [s + 1.0 for s in steps], [by_step[s] for s in steps]  # steps count epochs from 0


def curves(tables: dict[str, list[Line]], tracking_uri: str | None, out: Path) -> Figure:
    """Fig. 3: validation top-1 (solid, left axis) and training loss (dashed, right axis) per epoch, baseline
    vs NOAH, for every block: at a glance, whether the models learned."""
    title = "Validation top-1 (solid) and training loss (dashed), baseline vs NOAH (like Fig. 3)"
    pairs = design_pairs(tables)
    if not pairs:
        return Figure(title, note="no table has both a baseline run and a paper-design NOAH run with MLflow run ids")
    client, missing = open_store(tracking_uri)
    if client is None:
        return Figure(title, note=missing)
    drawn, skipped = [], []
    for label, base, noah in pairs:
        try:
            series = {(head, split): metric_history(client, line.run["run_id"], keys)
                      for head, line in (("baseline", base), ("NOAH", noah))
                      for split, keys in (("train", TRAIN_KEYS), ("val", VAL_KEYS))}
        except (MlflowException, OSError) as err:
            skipped.append(f"{label}: {type(err).__name__}: {str(err).splitlines()[0]}")
            continue
        if not any(ys for _, ys in series.values()):
            skipped.append(f"{label}: runs have no per-epoch {TRAIN_KEYS[0]} or {VAL_KEYS[0]} metrics")
            continue
        if not all(series[head, "train"][1] for head in ("baseline", "NOAH")):
            skipped.append(f"{label}: no per-epoch {TRAIN_KEYS[0]} logged, so no training curve")
        drawn.append((label, series))
    if not drawn:
        return Figure(title, note="; ".join(skipped))
    cols = min(4, len(drawn))
    rows = -(-len(drawn) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.4 * rows), squeeze=False)
    for ax in axes.flat[len(drawn):]:
        ax.set_visible(False)
    for ax, (label, series) in zip(axes.flat, drawn):
        loss_ax = ax.twinx()
        for (head, split), (xs, ys) in series.items():
            if ys:
                (loss_ax if split == "train" else ax).plot(
                    xs, ys, linestyle="--" if split == "train" else "-", marker="." if len(ys) < 20 else None,
                    color="tab:blue" if head == "baseline" else "tab:red",
                    label=f"{head} {'train loss' if split == 'train' else 'val top-1'}")
        ax.set_title(label, fontsize=9)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel("validation top-1 (%)")
        loss_ax.set_ylabel("training loss")
        ax.grid(alpha=0.3)
        handles = [h for a in (ax, loss_ax) for h in a.get_legend_handles_labels()[0]]
        ax.legend(handles=handles, fontsize=7)
    fig.tight_layout()
    _save(fig, out)
    return Figure(title, out, "; ".join(skipped) or None)


def _save(fig: plt.Figure, out: Path) -> None:
    """Atomic PNG write: a half-written figure never sits where the README points."""
    try:
        atomic_write(out, lambda f: fig.savefig(f, dpi=110, format="png"))
    finally:
        plt.close(fig)


def head_maps(model: nn.Module, images: torch.Tensor, labels: torch.Tensor
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, tuple[int, int]]:
    """A_i, V_i (B, N, H, W) and ΣP_i (B, H, W) of each image's ground-truth class, from the model's NoahHead."""
    head = next((m for m in model.modules() if isinstance(m, NoahHead)), None)
    if head is None:
        raise ValueError("the model has no NoahHead")
    seen: list[torch.Tensor] = []
    hook = head.register_forward_hook(lambda _m, args, _out: seen.append(args[0]))
    try:
        with torch.no_grad():
            model.eval()(images)
            attn, value, poca = head.forward_maps(seen[0])
    finally:
        hook.remove()
    h, w = seen[0].shape[-2:]
    index = torch.arange(len(labels))
    a = attn[index, :, labels if attn.shape[2] > 1 else 0]
    return a.unflatten(-1, (h, w)), value[index, :, labels].unflatten(-1, (h, w)), \
        poca[index, :, labels].sum(1).unflatten(-1, (h, w)), (h, w)


def attention_figure(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, mean: list[float],
                     std: list[float], out: Path, title: str, class_names: list[str] | None = None) -> Figure:
    """Fig. 2: per image, the input, A_i in [0, 1] and V_i in [-1, 1] per POCA block, and ΣP_i in [-1, 1]."""
    attn, value, poca, _ = head_maps(model, images, labels)
    n = attn.shape[1]
    fig, axes = plt.subplots(len(images), 2 + 2 * n, figsize=(1.6 * (2 + 2 * n), 1.7 * len(images)), squeeze=False)
    pixels = (images * torch.tensor(std)[:, None, None] + torch.tensor(mean)[:, None, None]).clamp(0, 1)
    for b in range(len(images)):
        panels = [(pixels[b].permute(1, 2, 0), "image", None)]
        for i in range(n):
            a = attn[b, i]
            panels.append(((a - a.min()) / (a.max() - a.min()).clamp_min(1e-12), f"A{i + 1}", (0, 1)))
        for i in range(n):
            panels.append((value[b, i] / value[b, i].abs().max().clamp_min(1e-12), f"V{i + 1}", (-1, 1)))
        panels.append((poca[b] / poca[b].abs().max().clamp_min(1e-12), "ΣP", (-1, 1)))
        for ax, (img, name, limits) in zip(axes[b], panels):
            if limits is None:
                ax.imshow(img.numpy())
            else:
                ax.imshow(img.numpy(), cmap="viridis" if limits[0] == 0 else "coolwarm", vmin=limits[0],
                          vmax=limits[1], interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if b == 0:
                ax.set_title(name, fontsize=8)
        label = int(labels[b])
        axes[b][0].set_ylabel(class_names[label] if class_names else f"class {label}", fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    _save(fig, out)
    return Figure(title, out)


def _weights_artifact(client: Any, run_id: str, path: str = "") -> str | None:
    """The first `.pt`/`.pth` artifact of a run, searched breadth-first."""
    folders = []
    for item in client.list_artifacts(run_id, path or None):
        if item.is_dir:
            folders.append(item.path)
        elif item.path.endswith(WEIGHT_SUFFIXES):
            return item.path
    for folder in folders:
        found = _weights_artifact(client, run_id, folder)
        if found:
            return found
    return None


def trained_attention(tables: dict[str, list[Line]], meta: dict[str, Any], tracking_uri: str | None,
                      data_dir: Path | None, out: Path, checkpoints: Path | None = None, images: int = 3) -> Figure:
    """Fig. 2 from a finished paper-design NOAH run: its logged weights, else its trainer checkpoint."""
    title = "Attention A_i, value V_i and ΣP_i of the ground-truth class (like Fig. 2)"
    candidates = [noah for _, _, noah in design_pairs(tables)]
    candidates.sort(key=lambda ln: ln.paper["key"] != "resnet18")
    if not candidates:
        return Figure(title, note="no finished paper-design NOAH run to visualise")
    client, missing = open_store(tracking_uri)
    if client is None:
        return Figure(title, note=missing)
    reasons = []
    for line in candidates:
        run_id = line.run["run_id"]
        try:
            with tempfile.TemporaryDirectory() as tmp:
                artifact = _weights_artifact(client, run_id)
                state = torch.load(client.download_artifacts(run_id, artifact, tmp), map_location="cpu",
                                   weights_only=True) if artifact else _checkpoint(checkpoints, line)
                config = _run_config(client, run_id, tmp)
        except (MlflowException, OSError, RuntimeError, CheckpointError) as err:  # a damaged checkpoint is skipped
            reasons.append(f"run {run_id}: {type(err).__name__}: {str(err).splitlines()[0][:300]}")
            continue
        if state is None:
            reasons.append(f"run {run_id} logged no weights (set mlflow.log_weights) and its trainer checkpoint "
                           f"is not in {checkpoints}")
            continue
        try:
            return _draw_trained(state, _model_spec(line, config, meta, data_dir), out, title, images)
        except (ConfigError, RuntimeError, KeyError, OSError) as err:  # e.g. weights of an older model layout
            reasons.append(f"run {run_id}: {type(err).__name__}: {str(err).splitlines()[0][:300]}")
    return Figure(title, note="; ".join(reasons))


def _checkpoint(checkpoints: Path | None, line: Line) -> dict[str, Any] | None:
    """The trainer's last checkpoint of the row's trial (in its folder under the checkpoint root), if kept;
    verified to be that trial's and intact (CheckpointError)."""
    trial = line.run.get("trial_id")
    return load_checkpoint(checkpoint_of(checkpoints, trial), trial) if checkpoints and trial else None


def _run_config(client: Any, run_id: str, tmp: str) -> dict[str, Any]:
    """The resolved trial config the trainer logs (`record.CONFIG`; empty if the run has none)."""
    if not any(item.path == CONFIG for item in client.list_artifacts(run_id)):
        return {}
    return read_config(Path(client.download_artifacts(run_id, CONFIG, tmp)))


def _model_spec(line: Line, config: dict[str, Any], meta: dict[str, Any], data_dir: Path | None) -> dict[str, Any]:
    """Backbone, head, classes, image size and data of the run: its own logged config first, then the results."""
    trial = config.get("trial") or {}
    return {"backbone": trial.get("backbone") or line.result.get("backbone") or line.paper["key"],
            "head": trial.get("head") or line.result.get("head") or {"kind": "noah"},
            "num_classes": (config.get("data") or {}).get("num_classes") or meta.get("num_classes"),
            "img_size": int(trial.get("img_size") or meta.get("img_size") or 224),
            "width": float(trial.get("width") or 1.0),
            "data_dir": data_dir or trial.get("data_dir") or meta.get("data_dir"),
            "run_id": line.run["run_id"], "name": backbone_name(line.paper["key"])}


def _distinct_classes(loader: Any, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first validation image of each of the first `count` classes met (one class is a dull figure)."""
    picked: dict[int, torch.Tensor] = {}
    for batch in loader:
        for image, label in zip(batch[0], batch[1].tolist()):
            picked.setdefault(label, image)
        if len(picked) >= count:
            break
    labels = list(picked)[:count]
    return torch.stack([picked[k] for k in labels]), torch.tensor(labels)


def _draw_trained(state: dict[str, Any], spec: dict[str, Any], out: Path, title: str, images: int) -> Figure:
    data_dir = spec["data_dir"]
    if data_dir is None or not is_prepared(data_dir):
        return Figure(title, note=f"prepared validation data not found at {data_dir}")
    if spec["num_classes"] is None:
        return Figure(title, note=f"run {spec['run_id']} records no number of classes")
    state = state.get("model", state) if isinstance(state, dict) else state
    model = build_model(spec["backbone"], spec["head"], int(spec["num_classes"]), spec["img_size"],
                        width=spec["width"])
    model.load_state_dict(state)
    batch, labels = _distinct_classes(build_loader(data_dir, "val", spec["img_size"], 32, train=False), images)
    classes, stats = read_meta(data_dir)
    name = f"{title}: {spec['name']}, run {spec['run_id'][:8]}"
    names = classes if isinstance(classes, list) else None
    return attention_figure(model, batch, labels, stats["mean"], stats["std"], out, name, names)
