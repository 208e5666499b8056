"""Who may touch a prepared folder: trainings read it under a shared lock, `prepare` replaces it under an
exclusive one, and a second `prepare` into the same folder is refused by a lock file beside it.

Nobody waits: a conversion or a training can take hours, so the later process is refused at once with one
line instead, before it has done or written anything. The locks are the kernel's (flock), so a process that
dies releases them. A prepared folder is locked as the folder itself, not through a file in it or beside it:
it is DVC's output, whose files must stay exactly what prepare wrote, and a read-only copy (ImageNet on a
shared mount) can still be locked to read. Where the file system cannot lock a folder (NFS), the folder
goes unlocked; prepare's own lock file still refuses a second prepare there.
"""
from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path

from ..config import ConfigError


def _locked(path: Path, flags: int, how: int) -> int | None:
    """A descriptor of `path` locked with `how` (without waiting), or None where its file system cannot lock.

    Raises BlockingIOError while another process holds a conflicting lock. What is locked is what `path`
    names once the lock is held: a folder swapped or a lock file removed meanwhile is let go and the new one
    locked, so a lock never guards a copy that nobody reads any more."""
    while True:
        fd = os.open(path, flags, 0o644)
        try:
            fcntl.flock(fd, how | fcntl.LOCK_NB)
            current = os.path.samestat(os.fstat(fd), os.stat(path))
        except FileNotFoundError:
            current = False
        except BlockingIOError:
            os.close(fd)
            raise
        except OSError:
            os.close(fd)
            return None
        if current:
            return fd
        os.close(fd)


@contextlib.contextmanager
def data_lock(folder: str | Path, exclusive: bool, key: str) -> Iterator[None]:
    """Hold `folder` shared (a training reads it) or exclusive (prepare replaces it); a conflicting holder
    is a `ConfigError` on `key`. A folder that does not exist yet has nothing to guard: it is not locked (its
    reader reports it missing)."""
    try:
        fd = _locked(Path(folder), os.O_RDONLY | os.O_DIRECTORY, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
    except BlockingIOError:
        allowed = ("a folder no training is reading; a training is reading it now, so nothing was touched (prepare "
                   "again once it has finished, or into another folder)" if exclusive else
                   "a prepared dataset that no prepare is replacing; one is replacing it now (train once it has "
                   "finished)")
        raise ConfigError(key, str(folder), allowed) from None
    except (FileNotFoundError, NotADirectoryError):
        fd = None
    try:
        yield
    finally:
        if fd is not None:
            os.close(fd)


@contextlib.contextmanager
def prepare_lock(out: Path) -> Iterator[None]:
    """Hold `.<out>.lock` beside `out` while prepare builds it (its staging folder is shared by name), and
    remove it afterwards: it would otherwise stay inside a DVC output folder."""
    path = out.with_name(f".{out.name}.lock")
    try:
        fd = _locked(path, os.O_RDWR | os.O_CREAT, fcntl.LOCK_EX)
    except BlockingIOError:
        raise ConfigError("out", str(out), "a folder no other prepare is building; another prepare is building it "
                          "now, so nothing was touched") from None
    try:
        yield
    finally:
        path.unlink(missing_ok=True)  # while held: a prepare that opened it meanwhile finds it gone, locks a new one
        if fd is not None:
            os.close(fd)
