"""The GPU suite (`python -m pytest -m gpu`): every CUDA path the paper's study takes, on the device.

Tests whose logic also runs on a CPU are parametrized over both devices: the CPU variant runs in every test
run (in seconds) and proves the test itself; the CUDA variants and the GPU-only tests carry the `gpu` mark
and skip, with the reason, where torch sees no CUDA GPU (tests/conftest.py)."""
from __future__ import annotations

import copy
import json
import random
import warnings
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from mlflow import MlflowClient
from test_noah import B, C, H, M, W, eq1_logits, variants
from torch import nn

from pipeline import REPO_ROOT
from pipeline.bench.head import bench_shape, peak_bytes
from pipeline.bench.speed import run_benchmark
from pipeline.bench.train import bench, trainer
from pipeline.config import BenchmarkConfig, HeadConfig, MlflowConfig, TrainConfig, load_params
from pipeline.data.prepared import read_meta
from pipeline.models import NoahHead, build_model
from pipeline.study.sweep import run_study
from pipeline.training.engine import compiled, placed, precision, train_one_epoch
from pipeline.training.recipes import get_recipe, scale
from pipeline.training.record import CHECKPOINT, load_checkpoint
from pipeline.training.run import Job, _fit_ray, run_trial
from pipeline.training.tasks import task_of
from pipeline.training.tracking import TrialRun
from pipeline.training.trial import Trial, resolve_trial, trial_id

GPU = pytest.mark.gpu
DEVICES = ["cpu", pytest.param("cuda", marks=GPU)]
RECIPES = load_params().recipes


def _tiny_trial(data: Path, **changes: object) -> Trial:
    spec = {"backbone": "resnet18", "data_dir": str(data), "head": {"kind": "noah"}, "recipe": "resnet",
            "img_size": 32, "epochs": 2, "batch_size": 16}
    return resolve_trial({**spec, **changes}, RECIPES)


def _store(tmp_path: Path) -> tuple[MlflowConfig, MlflowClient]:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    return MlflowConfig(tracking_uri=uri), MlflowClient(uri)


# ---- the NOAH head: fused and reference paths against Eq. (1) in float64


def _close(got: torch.Tensor, want: torch.Tensor, tol: float, what: str, floor: float) -> None:
    """`got` equals `want` (float64, CPU) within `tol` of `want`'s largest magnitude, or of `floor` where that
    is larger (a gradient that is zero by Eq. (1), a softmax key bias's, is rounding noise of larger terms)."""
    scale = max(want.abs().max().item(), floor)
    torch.testing.assert_close(got.detach().double().cpu(), want, rtol=tol, atol=tol * scale,
                               msg=lambda detail: f"{what}: {detail}")


@pytest.mark.parametrize("autocast", [False, True], ids=["float32", "bf16-autocast"])
@pytest.mark.parametrize("device", DEVICES)
def test_head_paths_match_float64_eq1_for_every_option(device: str, autocast: bool) -> None:
    """Every option of the head, fused path (where it applies) and reference path, outputs and gradients, in
    float32 and under bf16 autocast with bf16 features (what the backbone hands it on a GPU), against Eq. (1)
    evaluated per group in float64 on the CPU. The fused path keeps the head in float32 under autocast, so
    its logits are as exact as in float32; only the input gradient is bf16, as its input is. The reference
    path's matmuls run in bf16 under autocast (cuDNN's TF32 convolutions in float32 on a GPU), where a max
    aggregation's gradient is not compared (rounding may move the max to a near-equal position). On a CPU, 40
    options drawn at random (test_noah checks every option there, in float64), to stay within seconds."""
    torch.manual_seed(0)
    configs = list(variants())
    if device == "cpu":
        configs = random.Random(0).sample(configs, 40)
    fused_seen = 0
    for cfg in configs:
        head = NoahHead(cfg, C, M).eval()  # eval: dropout is the identity
        with torch.no_grad():  # a non-zero init for the biases too
            for p in head.parameters():
                p.add_(torch.randn_like(p) * 0.1)
        x = torch.randn(B, C, H, W)
        weight = torch.randn(B, M, dtype=torch.float64)
        if autocast:
            x = x.bfloat16()
        exact = copy.deepcopy(head).double()
        x64 = x.double().requires_grad_()
        want = eq1_logits(exact, x64)
        want_grads = torch.autograd.grad((want * weight).sum(), [x64, *exact.parameters()])
        floor = 0.05 * max(g.abs().max().item() for g in want_grads)
        head.to(device)
        x = x.to(device).requires_grad_()
        paths = {"reference": head.forward_reference}
        if head.fused:
            paths["fused"] = head.forward_fused
            fused_seen += 1
        for name, path in paths.items():
            with torch.autocast(device, dtype=torch.bfloat16, enabled=autocast):
                logits = path(x)
            grads = torch.autograd.grad((logits.float() * weight.float().to(device)).sum(), [x, *head.parameters()])
            low = autocast and name == "reference"
            if autocast and name == "fused":
                assert logits.dtype == torch.float32, cfg.name
            _close(logits, want, 5e-2 if low else 2e-3, f"{cfg.name} {name} logits", floor)
            if low and cfg.aggregation.startswith("max"):
                continue  # bf16 may round another position to the max: its gradient goes elsewhere
            for i, (got, ref) in enumerate(zip(grads, want_grads)):
                tol = 5e-2 if low else (1e-2 if autocast and i == 0 else 2e-3)  # i == 0: the input's, bf16
                _close(got, ref, tol, f"{cfg.name} {name} gradient {i}", floor)
    assert fused_seen > 0


# ---- training steps: bf16 autocast and channels_last on a GPU, no host syncs but the NaN checks


@pytest.mark.slow
@pytest.mark.parametrize("backbone, device, compile", [
    ("resnet18", "cpu", False),
    pytest.param("resnet18", "cuda", False, marks=GPU),
    pytest.param("resnet50", "cuda", False, marks=GPU),
    pytest.param("resnet50", "cuda", True, marks=GPU)])
def test_training_on_a_fixed_batch_lowers_the_loss_without_host_syncs(backbone: str, device: str,
                                                                      compile: bool) -> None:
    """The trainer's epoch (`train_one_epoch`) on one batch, `steps` times: finite, the second epoch's mean
    loss below the first's; on a GPU in bf16 autocast and channels_last, with only the NaN checks (every
    16 steps and the last) and the epoch's end reading the device: torch's sync debug mode counts the
    rest, which would be at least one per step. On a CPU at 32 px, batch 8, 6 steps (seconds)."""
    torch.manual_seed(0)
    dev = torch.device(device)
    memory_format = precision(dev)[1]
    steps, size, batch = (40, 64, 32) if dev.type == "cuda" else (6, 32, 8)
    model = placed(build_model(backbone, {"kind": "noah"}, 4, size), dev)
    scaled = scale(get_recipe("resnet", RECIPES), epochs=2, batch_size=batch)
    step = trainer(compiled(model, compile), scaled, steps, 4, dev)
    x = torch.randn(batch, 3, size, size, device=dev).to(memory_format=memory_format)
    batches = [(x, torch.arange(batch, device=dev) % 4)] * steps
    if dev.type == "cuda":
        assert model.backbone.conv1.weight.is_contiguous(memory_format=torch.channels_last)
        train_one_epoch(step, batches[:2])  # compiles, when compiling, outside the count
        torch.cuda.set_sync_debug_mode("warn")
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                first = train_one_epoch(step, batches)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        syncs = [str(w.message) for w in caught if "synchroniz" in str(w.message)]
        checks = steps // 16 + 1
        assert len(syncs) <= checks + 4, syncs  # + the epoch's end: isfinite, two .item(), synchronize
    else:
        first = train_one_epoch(step, batches)
    second = train_one_epoch(step, batches)
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert torch.isfinite(torch.tensor([first["train_loss"], second["train_loss"]])).all()
    assert second["train_loss"] < first["train_loss"], (first["train_loss"], second["train_loss"])


# ---- torch.compile: the same outputs and gradients as eager, the head's autograd function included


@pytest.mark.slow
@pytest.mark.parametrize("device", DEVICES)
def test_compiled_model_matches_eager(device: str) -> None:
    """A small conv + NOAH head (fused path: `PocaSum`, an autograd function) compiled by inductor gives the
    eager model's logits and gradients. On a CPU inductor compiles C++ (a second or two for this model)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), NoahHead(HeadConfig(N=4, r=0.5), 16, 5))
    model = model.to(device)
    assert model[2].fused
    fast = compiled(copy.deepcopy(model), True)
    x = torch.randn(4, 3, 8, 8, device=device)
    eager_out, fast_out = model(x), fast(x)
    torch.testing.assert_close(fast_out, eager_out, rtol=1e-4, atol=1e-4)
    eager_out.square().sum().backward()
    fast_out.square().sum().backward()
    for (name, a), b in zip(model.named_parameters(), fast.parameters()):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-3, atol=1e-4, msg=name)


# ---- the head benchmark: fused vs straightforward memory (and on a GPU, time)


@pytest.mark.parametrize("device", DEVICES)
def test_fused_head_saves_a_tenth_of_the_straightforward_heads_memory(device: str) -> None:
    """`bench-head`'s train row at ResNet50's head shape (ResNet18's, smaller, on a CPU): the fused head
    saves at most 10% of the straightforward head's bytes for backward; on a GPU its step's peak memory is
    below the straightforward one's, compiled too, and its step time at most the straightforward one's."""
    shape, batch = ("resnet50", 64) if device == "cuda" else ("resnet18", 8)
    (_, row) = bench_shape(shape, (batch,), repeats=5 if device == "cuda" else 2, num_classes=1000, device=device)
    assert row["mode"] == "train" and row["ours_saved"] <= 0.10 * row["plain_saved"], row
    if device == "cuda":
        assert row["ours_peak"] < row["plain_peak"] and row["ours"] <= row["plain"], row
        head = compiled(NoahHead(HeadConfig(N=4, r=1 / 8), 2048, 1000).cuda(), True)  # as the trainer compiles it
        x = torch.randn(batch, 2048, 7, 7, device="cuda", requires_grad=True)
        grad = torch.randn(batch, 1000, device="cuda")
        head(x).backward(grad)  # compiles
        assert peak_bytes(lambda: head(x).backward(grad), x.device) <= 1.25 * row["ours_peak"], row


# ---- GPU only: the trainer benchmark, Table 10, trials on the GPU, Ray Train and Ray Tune


@GPU
def test_bench_train_times_every_contender_on_cuda() -> None:
    out = bench("resnet18", HeadConfig(kind="noah"), "resnet", img_size=64, batch_size=32, steps=4, repeats=2,
                num_classes=100, device=torch.device("cuda"), compile=True)
    assert out["precision"] == "bf16 autocast, channels_last" and out["compile"] is True
    for key in ("bare", "trainer", "baseline", "trainer_compiled", "baseline_compiled"):
        assert out[f"{key}_images_per_s"] > 0, key
    assert out["compile_speedup"] == pytest.approx(out["trainer_compiled_images_per_s"] / out["trainer_images_per_s"])


@GPU
def test_table10_gpu_columns_at_batch_200(tmp_path: Path) -> None:
    cfg = BenchmarkConfig(backbones=("resnet18",), gpu_batch=200, gpu_repeats=3, gpu_max_repeats=6,
                          gpu_seconds=10, gpu_warmup=2, cpu_repeats=2, cpu_max_repeats=2, cpu_seconds=0,
                          cpu_warmup=0, out=str(tmp_path / "table10"))
    (row,) = run_benchmark(cfg, tracking_uri=None, use_gpu=True)
    assert row["vanilla_gpu_fps"] > row["vanilla_cpu_fps"] > 0 and row["noah_gpu_fps"] > 0
    assert row["gpu_overhead_low"] <= row["gpu_overhead_pct"] <= row["gpu_overhead_high"]
    assert 3 <= row["gpu_rounds"] <= 6
    meta = json.loads((tmp_path / "table10.json").read_text())["meta"]
    assert meta["gpu"] == torch.cuda.get_device_name() and meta["gpu_batch"] == 200
    header, line = (tmp_path / "table10.csv").read_text().splitlines()[:2]
    assert dict(zip(header.split(","), line.split(",")))["noah_gpu_fps"] == str(row["noah_gpu_fps"])


@pytest.mark.slow
@GPU
def test_a_gpu_trial_compiles_and_resumes_from_its_checkpoint_bit_for_bit(tiny_data: Path, tmp_path: Path) -> None:
    """Deterministic mode: a trial interrupted after its first epoch and resumed ends with the weights of
    one trained in one go, on the GPU, compiled (train.compile null: on a GPU); both record it."""
    trial = _tiny_trial(tiny_data)
    train = TrainConfig(progress="off", deterministic=True)
    whole = run_trial(trial, train=train, tracking=_store(tmp_path / "a")[0], checkpoint_dir=tmp_path / "a")

    def stop(row: dict[str, float]) -> None:
        raise RuntimeError("stopped after epoch 1")

    tracking, client = _store(tmp_path / "b")
    with pytest.raises(RuntimeError, match="stopped after epoch 1"):
        run_trial(trial, train=train, tracking=tracking, checkpoint_dir=tmp_path / "b", on_epoch=stop)
    resumed = run_trial(trial, train=train, tracking=tracking, checkpoint_dir=tmp_path / "b")
    a, b = (load_checkpoint(tmp_path / k / CHECKPOINT, whole["trial_id"]) for k in ("a", "b"))
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert resumed["top1"] == whole["top1"] and resumed["trial_id"] == whole["trial_id"]
    tags = client.get_run(resumed["run_id"]).data.tags
    assert tags["device"] == torch.cuda.get_device_name() and tags["compiled"] == "true"
    assert tags["precision"] == "bf16" and client.get_run(resumed["run_id"]).data.params["train.compile"] == "None"


@pytest.mark.slow
@GPU
def test_one_gpu_ray_train_run_over_nccl(tiny_data: Path, tmp_path: Path) -> None:
    """The data-parallel path (`_fit_ray`: TorchTrainer, NCCL with use_gpu) with one worker on the one GPU;
    `run_trial` itself trains a one-worker trial in its own process, so the job is started here directly."""
    import ray

    trial = _tiny_trial(tiny_data, epochs=1)
    tracking, client = _store(tmp_path)
    classes, stats = read_meta(trial.data_dir)
    tid = trial_id(trial)
    run = TrialRun.open(tracking.tracking_uri, "nccl", tmp_path / "ck", run_name=trial.label, tags={"trial_id": tid})
    job = Job(trial=trial, task=task_of(stats), train=TrainConfig(use_gpu=True, progress="off"), trial_id=tid,
              checkpoint_dir=str(tmp_path / "ck"), tracking_uri=tracking.tracking_uri, run_id=run.run_id,
              num_classes=len(classes), log_weights=False)
    ray.init(num_cpus=4, num_gpus=1, include_dashboard=False,
             runtime_env={"env_vars": {"PYTHONPATH": str(REPO_ROOT)}})
    try:
        result = _fit_ray(job)
    finally:
        ray.shutdown()
    assert 0 <= result["top1"] <= 100
    tags = client.get_run(run.run_id).data.tags
    assert tags["device"] == torch.cuda.get_device_name() and tags["world_size"] == "1"
    assert load_checkpoint(tmp_path / "ck" / CHECKPOINT, tid)["epoch"] == 1


@pytest.mark.slow
@GPU
def test_a_tune_sweep_shares_the_gpu_between_two_trials(tiny_params: Callable[..., Path], tmp_path: Path) -> None:
    """`ray.gpus_per_trial: 0.5`: the two trials of a table train at the same time on the one GPU."""
    rows = [{"row": 1, "backbone": "resnet18", "head": {"kind": "baseline"}},
            {"row": 2, "backbone": "resnet18", "head": {"kind": "noah", "N": 4, "r": 0.5}}]
    params = load_params(tiny_params(ray={"gpus_per_trial": 0.5, "cpus_per_trial": 1, "max_concurrent": 2},
                                     profiles={"smoke": {"dataset": "builtin", "reid_dataset": None, "img_size": 64,
                                                         "epochs": 4, "batch_size": 16}},
                                     tables={"tg": {"recipe": "resnet", "rows": rows}}))
    results = run_study(params, ["tg"], tmp_path / "results")["tg"]
    assert [row["runs"][0]["status"] for row in results["rows"]] == ["FINISHED", "FINISHED"]
    client = MlflowClient(params.mlflow.tracking_uri)
    runs = [client.get_run(row["runs"][0]["run_id"]) for row in results["rows"]]
    assert all(r.data.tags["device"] == torch.cuda.get_device_name() for r in runs)
    first, second = sorted(runs, key=lambda r: r.info.start_time)
    assert second.info.start_time < first.info.end_time, "the trials did not overlap on the GPU"

