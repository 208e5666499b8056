"""Atomic file writes: a temp file in the destination's folder, then `os.replace`, so a reader (or a
later stage) never sees half a file, and a crash leaves the previous version intact."""
from __future__ import annotations

import csv
import io
import os
import secrets
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import IO, Any

from ..config import ConfigError


def atomic_write(path: str | Path, write: Callable[[IO[bytes]], None]) -> None:
    """Call `write` on a temp file beside `path`, fsync it, then move it over `path`.

    The temp file is created with mode 0666 less the umask, like `open` (mkstemp's 0600 would make every
    output private to its writer). A write error that names no file (a full disk) is raised again naming
    `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        tmp.unlink(missing_ok=True)
        if isinstance(err, OSError) and err.filename is None:
            raise OSError(err.errno, f"cannot write {path}: {err.strerror}") from err
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write `text` (UTF-8) to `path` atomically."""
    atomic_write(path, lambda f: f.write(text.encode()))


def csv_text(rows: Iterable[Mapping[str, Any]], columns: Sequence[str]) -> str:
    """`rows` as CSV text with `columns` in that order (a missing value is empty, other keys are left out),
    `\n` line ends: the one CSV form of every file the pipeline writes."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(columns), extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


def require_writable(folder: str | Path, key: str) -> None:
    """Prove a file can be written in `folder`, or, while it does not exist yet, in its nearest existing parent
    (permissions do not tell: root ignores them, and a read-only mount or a full disk refuses root too); else
    one ConfigError naming `key`. Creates nothing: a command refused later leaves no empty folder behind."""
    folder = Path(folder).absolute()
    existing = next(p for p in (folder, *folder.parents) if p.exists())
    probe = existing / f".write-probe-{secrets.token_hex(6)}"
    try:
        if not existing.is_dir():
            raise NotADirectoryError(f"{existing} is not a folder")
        probe.write_bytes(b"probe")
        probe.unlink()
    except OSError as err:
        raise ConfigError(key, str(folder), f"a folder this process can write to ({err.strerror or err})") from None
