"""Seeds: one derivation of every seed the pipeline uses from the trial's seed and where it is used."""
from __future__ import annotations

import hashlib
import random

import numpy as np
import torch


def mix_seed(*parts: int) -> int:
    """A 63-bit seed from integers (epoch seeds stay independent of each other)."""
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:8], "little") >> 1


def seed_everything(seed: int) -> None:
    """Seed the global generators of Python, NumPy and torch."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
