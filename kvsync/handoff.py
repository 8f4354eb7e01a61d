"""Handing a restored snapshot to the local replica through a shared-memory file.

The sidecar and its replica run on one host. Instead of sending hundreds of MiB of restored KV
over loopback HTTP (a copy into the socket, one out of it, a checksum pass on each side), the
sidecar assembles the snapshot's tensors straight into a file on a tmpfs (``/dev/shm``) in the
snapshot wire form, and answers the fetch with the file's name. The replica maps the file, unlinks
it, and imports tensors that are views of the mapping: the bytes are written once, by the
assembly, and never copied again on the CPU.

The file is created with ``O_EXCL`` and mode 0600 and its space reserved with ``posix_fallocate``
before it is mapped, so a full tmpfs is an ``OSError`` here (the sidecar then answers over HTTP)
rather than a ``SIGBUS`` later. A file the replica never takes is unlinked by the sidecar after
``UNCLAIMED_TTL_S`` or when it stops; files a killed sidecar left behind are swept when the next
one starts.
"""

from __future__ import annotations

import logging
import mmap
import os
import time
import uuid
from pathlib import Path

import torch

log = logging.getLogger(__name__)

FILE_PREFIX = "unbroken-kvsync-"
FILE_SUFFIX = ".snap"
UNCLAIMED_TTL_S = 60.0


class HandoffFile:
    """A new hand-off file of ``len(head) + payload_bytes`` bytes, mapped: ``head`` written at the
    start, :attr:`payload` the rest as a ``uint8`` tensor. Raises ``OSError`` when it cannot be made."""

    def __init__(self, directory: str | Path, head: bytes, payload_bytes: int) -> None:
        self.path = str(Path(directory) / f"{FILE_PREFIX}{os.getpid()}-{uuid.uuid4().hex}{FILE_SUFFIX}")
        self.size = len(head) + payload_bytes
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.posix_fallocate(fd, 0, self.size)
            self._map = mmap.mmap(fd, self.size)
        except BaseException:
            os.close(fd)
            self.discard()
            raise
        os.close(fd)
        self._map[:len(head)] = head
        self.payload = torch.frombuffer(self._map, dtype=torch.uint8, offset=len(head), count=payload_bytes)

    def release(self) -> None:
        """Unmap it here (the file stays for the replica). Views of :attr:`payload` must be gone."""
        del self.payload
        self._map.close()

    def discard(self) -> None:
        """Remove the file (nothing happens when the replica already has)."""
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass


def open_handoff(path: str, size: int) -> mmap.mmap:
    """The replica's side: map the file the sidecar named and unlink it at once (the mapping keeps
    the memory until the last tensor over it is gone). Raises ``OSError`` or ``ValueError``."""
    name = os.path.basename(path)
    if not (name.startswith(FILE_PREFIX) and name.endswith(FILE_SUFFIX)):
        raise ValueError(f"{path!r} is not a kvsync hand-off file")
    fd = os.open(path, os.O_RDWR)
    try:
        os.unlink(path)
        actual = os.fstat(fd).st_size
        if actual != size:
            raise ValueError(f"hand-off file holds {actual} bytes, the sidecar said {size}")
        return mmap.mmap(fd, size)
    finally:
        os.close(fd)


def usable_dir(directory: str) -> str | None:
    """``directory`` when hand-off files can be made there, else None."""
    if not directory:
        return None
    path = Path(directory)
    return str(path) if path.is_dir() and os.access(path, os.W_OK | os.X_OK) else None


def sweep(directory: str, older_than_s: float = UNCLAIMED_TTL_S, owner_pid: int | None = None) -> int:
    """Remove hand-off files older than ``older_than_s`` (left by a sidecar that was killed), or
    only those of the sidecar ``owner_pid`` (its own, when it stops)."""
    removed = 0
    now = time.time()
    prefix = FILE_PREFIX if owner_pid is None else f"{FILE_PREFIX}{owner_pid}-"
    try:
        entries = list(os.scandir(directory))
    except OSError:
        return 0
    for entry in entries:
        if not (entry.name.startswith(prefix) and entry.name.endswith(FILE_SUFFIX)):
            continue
        try:
            if now - entry.stat().st_mtime > older_than_s:
                os.unlink(entry.path)
                removed += 1
        except OSError:
            pass
    return removed
