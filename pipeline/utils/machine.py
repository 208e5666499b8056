"""What a training process runs on, recorded with every run so that a repeat that differs can be explained.

A trial repeats bit for bit only on the same kind of machine: the float32 reductions in matmuls and
convolutions are split by the CPU's vector width (the kernels torch and oneDNN dispatch to by ISA) and by
the number of threads, and change with the torch build; on a GPU also with the GPU model, CUDA, cuDNN and
whether cuDNN may pick its fastest (non-deterministic) algorithms. `machine_facts` reads those facts and
`machine_kind` folds them into one label: runs with the same label are expected to repeat bit for bit.
"""
from __future__ import annotations

import contextlib
import functools
import platform
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch

CPUINFO = Path("/proc/cpuinfo")


def cpu_model() -> str:
    """The CPU's model name, with its family and model numbers where /proc/cpuinfo has them (a virtual
    machine often shows only `AMD EPYC`, the same name for CPUs of different generations and ISAs)."""
    fields: dict[str, str] = {}
    if CPUINFO.is_file():
        for line in CPUINFO.read_text(errors="replace").splitlines():
            if not line.strip():
                break  # the first processor's block is enough: one machine has one kind of CPU
            key, _, value = line.partition(":")
            fields.setdefault(key.strip(), value.strip())
    name = fields.get("model name") or platform.processor() or platform.machine() or "unknown"
    if "cpu family" in fields and "model" in fields:
        name += f" (family {fields['cpu family']} model {fields['model']})"
    return name


@functools.cache
def native_bf16() -> bool:
    """Whether this CPU computes bfloat16 in hardware (AVX512-BF16 or AMX; /proc/cpuinfo's flags). There
    bf16 autocast trains a ResNet50 at 64 px 1.8x faster than float32; elsewhere it is emulated, and slower."""
    if not CPUINFO.is_file():
        return False
    flags = next((line.partition(":")[2].split() for line in CPUINFO.read_text(errors="replace").splitlines()
                  if line.startswith("flags")), [])
    return bool({"avx512_bf16", "amx_bf16"} & set(flags))


def machine_facts(device: torch.device, deterministic: bool, workers: int = 1) -> dict[str, str]:
    """The facts a bit-exact repeat depends on, as strings (MLflow tags): CPU model and torch's CPU
    capability (ISA), torch's thread count, torch/CUDA/cuDNN versions, the GPU trained on ("none" on CPU),
    the `train.deterministic` mode (recorded on CPU too, where it changes nothing) and the data-parallel
    workers (their number sets how a batch's gradients are summed)."""
    cuda = device.type == "cuda"
    cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    return {"cpu": cpu_model(), "isa": torch.backends.cpu.get_cpu_capability(),
            "threads": str(torch.get_num_threads()), "torch": torch.__version__,
            "cuda": torch.version.cuda or "none", "cudnn": str(cudnn) if cudnn else "none",
            "gpu": torch.cuda.get_device_name(device) if cuda else "none",
            "deterministic": str(deterministic).lower(), "workers": str(workers)}


def machine_kind(facts: Mapping[str, str]) -> str:
    """One comparable label, e.g. `AMD EPYC (family 25 model 17), AVX512, 1 thread, torch 2.14.1, CPU` or
    `…, NVIDIA H100 80GB HBM3, CUDA 12.8, cuDNN 91002, deterministic`. CUDA, cuDNN and the mode enter only
    for a GPU run (a CPU run uses none of them); the workers only when there are several."""
    threads = int(facts["threads"])
    kind = f"{facts['cpu']}, {facts['isa']}, {threads} thread{'s' if threads != 1 else ''}, torch {facts['torch']}"
    if facts["gpu"] == "none":
        kind += ", CPU"
    else:
        mode = "deterministic" if facts["deterministic"] == "true" else "fast"
        kind += f", {facts['gpu']}, CUDA {facts['cuda']}, cuDNN {facts['cudnn']}, {mode}"
    return kind + (f", {facts['workers']} workers" if facts["workers"] != "1" else "")


@contextlib.contextmanager
def fixed_threads(threads: int) -> Iterator[None]:
    """torch's intra-op thread count set to `threads` inside, and back to what it was after (a caller's own
    setting, a test's, survives). Without it the count is whatever the process started with: inside Ray the
    OMP_NUM_THREADS that Ray sets from a task's CPUs, outside it torch's default, the machine's physical
    cores, whatever share of them the process may use."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)
