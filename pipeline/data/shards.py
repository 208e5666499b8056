"""Shards: a prepared dataset's images as plain tar files of a few hundred MB, indexed by byte offset.

Why plain tar and not a streaming format (WebDataset, MosaicML streaming, LitData): those read shards in
sequence through shuffle buffers, so the order a trial sees depends on worker and shard counts, and the
pipeline promises the same samples and augmentation whatever the loader's workers. Here the manifest
holds each image's shard, offset and size, so a loader reads any image with one `pread` (random access,
exact order) while every tool still reads the files (`tar`, Python's tarfile, WebDataset: members are
`<key>.jpg`). Members carry fixed metadata (mtime 0, uid 0, mode 0644, USTAR), so identical input gives
byte-identical shards, and DVC tracks a few hundred files instead of a million.
"""
from __future__ import annotations

import io
import os
import tarfile
from pathlib import Path


class ShardWriter:
    """Appends images to one tar file; `add` returns where the image's bytes start."""

    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._tar = tarfile.open(path, "w", format=tarfile.USTAR_FORMAT)

    @property
    def size(self) -> int:
        return self._tar.offset

    def add(self, key: str, data: bytes) -> int:
        info = tarfile.TarInfo(f"{key}.jpg")
        info.size, info.mode, info.mtime = len(data), 0o644, 0
        start = self._tar.offset
        self._tar.addfile(info, io.BytesIO(data))
        return start + tarfile.BLOCKSIZE  # a USTAR header with a short name is one block

    def close(self) -> None:
        """Finish the archive and flush it to disk (a shard is only recorded as done after this)."""
        self._tar.close()
        with open(self.path, "rb") as f:
            os.fsync(f.fileno())


class ShardReader:
    """Reads stored images by (shard, offset, size). File descriptors belong to the process that opened
    them: a DataLoader worker forked from a parent that already read opens its own."""

    def __init__(self, root: Path):
        self.root = root
        self._fds: dict[str, int] = {}
        self._pid = os.getpid()

    def read(self, shard: str, offset: int, size: int) -> bytes:
        if self._pid != os.getpid():
            self._fds, self._pid = {}, os.getpid()
        fd = self._fds.get(shard)
        if fd is None:
            fd = self._fds[shard] = os.open(self.root / shard, os.O_RDONLY)
        data = os.pread(fd, size, offset)
        if len(data) != size:
            raise OSError(f"{self.root / shard}: {size} bytes expected at offset {offset}, read {len(data)} "
                          "(the shard is truncated; prepare the dataset again)")
        return data

    def __getstate__(self) -> dict[str, object]:
        return {"root": self.root, "_fds": {}, "_pid": -1}

    def __del__(self) -> None:
        if self._pid == os.getpid():
            for fd in self._fds.values():
                os.close(fd)
