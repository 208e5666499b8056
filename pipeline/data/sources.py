"""Sources: each turns a folder in a known layout into a `Scan` (the files to prepare and the ones it
rejects), or raises one `ConfigError` that says which layout it expected and what it found.

Registered in `SOURCES` by name; `builtin` and `builtin_reid` generate their tree first (see builtin.py)
and then use the `imagefolder` and `market1501` scanners, so every dataset takes the same path.
An `imagefolder` source can be narrowed to the classes a class list names (`read_class_list`; ImageNet-100).
A file or folder whose name is not valid UTF-8 cannot be written to the manifest: it is rejected (a folder
with everything in it) under a readable path that shows the bad bytes as `\\xNN`.
"""
from __future__ import annotations

import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from ..config import ConfigError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
MARKET_SPLITS = {"train": "bounding_box_train", "query": "query", "gallery": "bounding_box_test"}
MARKET_NAME = re.compile(r"^(-1|\d+)_c(\d+)s\d+_\d+_\d+\.jpe?g$", re.IGNORECASE)


@dataclass(frozen=True)
class Item:
    """One input image: where it is, where its prepared copy goes, and what it is."""

    src: str  # path relative to the source root (the manifest's `path`, and what `rejected` reports)
    split: str
    cls: str  # class name (classification) or person id as text (reid)
    pid: int | None = None
    camid: int | None = None


@dataclass
class Scan:
    task: Literal["classification", "reid"]
    splits: tuple[str, ...]
    classes: tuple[str, ...] | None = None  # the label order a class list fixes (labels 0..K-1 in it)
    items: list[Item] = field(default_factory=list)
    rejected: list[dict[str, str]] = field(default_factory=list)

    def reject(self, path: str, reason: str) -> None:
        self.rejected.append({"path": readable(path), "reason": reason})


def readable(path: str) -> str:
    """`path` as valid UTF-8 text: bytes that are not UTF-8 (held by Python as surrogate escapes) become `\\xNN`."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def _utf8(name: str) -> bool:
    return readable(name) == name


def _bad_name(scan: Scan, root: Path, path: Path, is_dir: bool) -> bool:
    """Reject `path` when its name is not valid UTF-8 (the manifest and stats are UTF-8 text)."""
    if _utf8(path.name):
        return False
    scan.reject(path.relative_to(root).as_posix(), f"{'folder' if is_dir else 'file'} name is not valid UTF-8")
    return True


def _files(scan: Scan, root: Path, folder: Path) -> list[Path]:
    """Every file under `folder`, in a sorted, platform-independent order; names that are not UTF-8 are rejected,
    a folder with all it holds."""
    out = []
    for dirpath, dirnames, filenames in os.walk(folder):
        here = Path(dirpath)
        dirnames[:] = [d for d in sorted(dirnames) if not _bad_name(scan, root, here / d, True)]
        out.extend(here / f for f in sorted(filenames) if not _bad_name(scan, root, here / f, False))
    return out


def _layout_error(root: Path, expected: str) -> ConfigError:
    found = sorted(p.name + ("/" if p.is_dir() else "") for p in root.iterdir())[:20] if root.is_dir() else []
    what = "missing folder" if not root.exists() else ("a file, not a folder" if not root.is_dir()
                                                        else "entries " + (", ".join(found) or "none (empty)"))
    return ConfigError("root", str(root), f"{expected}; found {what}")


def _add(scan: Scan, root: Path, path: Path, split: str, cls: str, pid: int | None = None,
         camid: int | None = None) -> None:
    rel = path.relative_to(root).as_posix()
    if path.suffix.lower() not in IMAGE_EXTENSIONS:
        scan.reject(rel, f"not an image file extension ({path.suffix or 'none'})")
    else:
        scan.items.append(Item(rel, split, cls, pid, camid))


def read_class_list(path: Path) -> tuple[str, ...]:
    """The classes a class list names, in its order: one WordNet id or folder name a line; blank lines and
    `#` comments are skipped. A missing or empty file, or a name given twice, is a `ConfigError`."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError("classes", str(path), f"a readable UTF-8 text file of class names ({err})") from None
    names: dict[str, int] = {}
    for number, line in enumerate(lines, 1):
        name = line.split("#", 1)[0].strip()
        if name in names:
            raise ConfigError("classes", name, f"each class once in {path} (lines {names[name]} and {number} name it)")
        if name:
            names[name] = number
    if not names:
        raise ConfigError("classes", str(path), "a file naming at least one class (one a line; # starts a comment)")
    return tuple(names)


def _missing_classes(root: Path, splits: tuple[str, ...], classes: tuple[str, ...]) -> ConfigError | None:
    """The error naming the first listed class without a folder in every split (None when all have one)."""
    missing = [(c, absent) for c in classes if (absent := [s for s in splits if not (root / s / c).is_dir()])]
    if not missing:
        return None
    name, absent = missing[0]
    more = f"; {len(missing) - 1} other listed class(es) are missing too" if len(missing) > 1 else ""
    return ConfigError("classes", name, f"a class with a folder in {' and '.join(f'{root}/{s}' for s in splits)}; "
                       f"it has none in {' or '.join(f'{s}/' for s in absent)}{more}; nothing was prepared")


def scan_imagefolder(root: Path, classes: tuple[str, ...] | None = None) -> Scan:
    """ImageNet layout: `root/train/<class>/…` and `root/val/<class>/…` (files at any depth in a class).

    With `classes` (a class list, `read_class_list`) only those class folders are read, and every one must
    exist in both splits: a subset such as ImageNet-100 is prepared from the full tree without a copy, and
    the folders left out are not inputs (neither read nor listed as rejected)."""
    expected = "an ImageFolder tree: root/train/<class>/<image> and root/val/<class>/<image>"
    if not all((root / s).is_dir() for s in ("train", "val")):
        raise _layout_error(root, expected)
    scan = Scan("classification", ("train", "val"), classes)
    if classes is not None and (err := _missing_classes(root, scan.splits, classes)) is not None:
        raise err
    for split in scan.splits:
        entries = sorted((root / split).iterdir())
        if not any(e.is_dir() for e in entries):
            raise _layout_error(root / split, f"class folders in {split}/ ({expected})")
        for entry in entries:
            if classes is not None and entry.is_dir() and entry.name not in classes:
                continue
            if _bad_name(scan, root, entry, entry.is_dir()):
                continue
            if not entry.is_dir():
                scan.reject(entry.relative_to(root).as_posix(), "not inside a class folder")
                continue
            files = _files(scan, root, entry)
            if not files:
                scan.reject(entry.relative_to(root).as_posix(), "empty class folder")
            for path in files:
                _add(scan, root, path, split, entry.name)
    return scan


def scan_market1501(root: Path) -> Scan:
    """Market-1501: `bounding_box_train`, `query`, `bounding_box_test`, names `PPPP_cCsS_FFFFFF_BB.jpg`.

    Person id -1 (junk) and 0 (distractor) stay in query/gallery with their meaning; in train they
    have no identity to learn, so they are rejected there.
    """
    expected = "a Market-1501 tree: root/bounding_box_train, root/bounding_box_test and root/query"
    if not all((root / d).is_dir() for d in MARKET_SPLITS.values()):
        raise _layout_error(root, expected)
    scan = Scan("reid", tuple(MARKET_SPLITS))
    for split, folder in MARKET_SPLITS.items():
        for path in _files(scan, root, root / folder):
            rel = path.relative_to(root).as_posix()
            match = MARKET_NAME.match(path.name)
            if path.suffix.lower() in IMAGE_EXTENSIONS and not match:
                scan.reject(rel, "file name does not match PPPP_cCsS_FFFFFF_BB.jpg (person id, camera)")
                continue
            pid, camid = (int(match.group(1)), int(match.group(2))) if match else (None, None)
            if split == "train" and pid is not None and pid <= 0:
                scan.reject(rel, f"{'junk' if pid < 0 else 'distractor'} id {pid} in the training split")
                continue
            _add(scan, root, path, split, match.group(1) if match else "", pid, camid)
    return scan


SOURCES: dict[str, Callable[[Path], Scan]] = {
    "imagefolder": scan_imagefolder,
    "market1501": scan_market1501,
}
