"""Data: sources → `prepare` (a versioned, validated dataset folder) → `build_loader` for training."""
from .loaders import build_loader, build_transform, read_dataset
from .prepare import prepare

__all__ = ["build_loader", "build_transform", "prepare", "read_dataset"]
