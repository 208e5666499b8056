"""Data: sources → `prepare` (a versioned, validated dataset folder) → `build_loader` for training.

Imports are lazy so `python -m pipeline prepare` does not pay for torch.
"""
from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {"build_loader": "loaders", "build_transform": "loaders", "read_dataset": "loaders", "read_meta": "prepare"}
__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(name)
    return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
