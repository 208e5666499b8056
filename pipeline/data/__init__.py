"""Data: sources → `prepare` (a versioned, validated dataset folder, format in `prepared`) → `build_loader`.

Imports are lazy (PEP 562) so `python -m pipeline prepare` does not pay for torch.
"""
from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {"build_loader": "loaders", "build_transform": "loaders", "read_dataset": "prepared",
            "read_meta": "prepared"}
__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(name)
    return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
