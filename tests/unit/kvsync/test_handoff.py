"""The shared-memory hand-off file and the read-ahead of restored blocks, without a sidecar."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest
import torch

from kvsync.handoff import FILE_PREFIX, HandoffFile, open_handoff, sweep
from kvsync.protocol import decode_snapshot, encode_snapshot_parts, snapshot_head
from kvsync.restore import _read_ahead
from kvsync.testing import snapshot_of, synthetic_identity, synthetic_kv

IDENT = synthetic_identity(num_layers=3, num_kv_heads=2, head_dim=8)


def test_a_snapshot_assembled_into_a_file_is_read_back_exactly_and_the_file_removed(tmp_path: Path) -> None:
    keys, values = synthetic_kv(IDENT, 10)
    snap = snapshot_of("s", IDENT, list(range(10)), keys, values, transcript=[{"role": "user", "content": "x"}])
    payload = sum(len(p) for p in encode_snapshot_parts(snap)[1:])
    head = snapshot_head(snap, "float32", (3, 2, 8), payload, None)
    assert len(head) % 64 == 0  # the payload is aligned
    f = HandoffFile(tmp_path, head, payload)
    out = f.payload.view(torch.float32).view(3, 2, 2, 10, 8)
    for layer in range(3):
        out[layer, 0], out[layer, 1] = keys[layer], values[layer]
    del out
    f.release()
    assert oct(os.stat(f.path).st_mode & 0o777) == "0o600"
    mapped = open_handoff(f.path, f.size)
    assert not os.path.exists(f.path)
    got = decode_snapshot(mapped, require_checksum=False)
    del mapped  # the tensors keep the mapping alive
    assert got.token_ids == list(range(10)) and got.transcript == snap.transcript
    for a, b in zip(got.keys + got.values, keys + values):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="no checksum"):  # over a wire, a checksum is required
        decode_snapshot(head + b"\0" * payload)


def test_open_handoff_refuses_other_files_and_wrong_sizes(tmp_path: Path) -> None:
    other = tmp_path / "passwd"
    other.write_bytes(b"x" * 10)
    with pytest.raises(ValueError):
        open_handoff(str(other), 10)
    f = HandoffFile(tmp_path, b"h" * 64, 64)
    f.release()
    with pytest.raises(ValueError, match="holds 128 bytes"):
        open_handoff(f.path, 100)
    with pytest.raises(FileNotFoundError):
        open_handoff(str(tmp_path / f"{FILE_PREFIX}gone.snap"), 1)


def test_a_full_directory_is_an_error_at_creation_not_later(tmp_path: Path) -> None:
    with pytest.raises(OSError):
        HandoffFile(tmp_path / "absent", b"h" * 64, 64)
    assert list(tmp_path.iterdir()) == []


def test_sweep_removes_stale_files_and_a_sidecars_own(tmp_path: Path) -> None:
    old = tmp_path / f"{FILE_PREFIX}1-a.snap"
    new = tmp_path / f"{FILE_PREFIX}2-b.snap"
    mine = tmp_path / f"{FILE_PREFIX}{os.getpid()}-c.snap"
    unrelated = tmp_path / "keep.snap"
    for p in (old, new, mine, unrelated):
        p.write_bytes(b"x")
    os.utime(old, (time.time() - 3600, time.time() - 3600))
    assert sweep(str(tmp_path), older_than_s=60) == 1 and not old.exists() and new.exists()
    assert sweep(str(tmp_path), older_than_s=-1, owner_pid=os.getpid()) == 1 and not mine.exists()
    assert new.exists() and unrelated.exists()


def test_read_ahead_yields_in_order_passes_errors_and_stops_early() -> None:
    done: list[int] = []
    assert list(_read_ahead(iter(range(7)), depth=2, done=done.append)) == list(range(7))
    assert done == list(range(7)), "each item is handed back once the next one is asked for"

    def failing():
        yield 1
        raise ConnectionError("Redis went away")

    with pytest.raises(ConnectionError):
        list(_read_ahead(failing(), depth=2))

    produced: list[int] = []
    closed = threading.Event()

    def endless():
        try:
            for i in range(10_000):
                produced.append(i)
                yield i
        finally:
            closed.set()

    ahead = _read_ahead(endless(), depth=2)
    assert next(ahead) == 0
    ahead.close()
    assert closed.wait(5.0), "closing the read-ahead closes its source"
    assert len(produced) < 10


def test_block_buffers_are_read_into_again_when_handed_back() -> None:
    import queue

    from kvsync.store import _reuse

    free: queue.SimpleQueue[bytearray] = queue.SimpleQueue()
    first = _reuse(free, 16)
    free.put(first)
    assert _reuse(free, 16) is first
    free.put(first)
    assert _reuse(free, 8) is not first and len(_reuse(free, 8)) == 8  # a different size is not reused
