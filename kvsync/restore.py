"""Reading a session back: the newest manifest, its blocks, every check, one full snapshot.

Never raises: every way it can go wrong is an outcome (``missing``, ``mismatch``, ``corrupt``,
``timeout``, ``error``) and the replica falls back to re-prefill from the transcript.

The blocks stream in from Redis on one thread while another checks each and copies it into place
(the two overlap); the place is a shared-memory hand-off file when the replica asked for one and
one can be made (see :mod:`kvsync.handoff`), else memory that is then sent as the response body.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator, TypeVar

import torch

from kvsync.blocks import BadData, assemble, check_manifest_sizes
from kvsync.handoff import UNCLAIMED_TTL_S, HandoffFile
from kvsync.metrics import KVSyncMetrics
from kvsync.protocol import DTYPES, MAX_HEADER_BYTES, Manifest, ManifestForged, encode_snapshot_parts, snapshot_head
from kvsync.store import KVStore
from kvsync.writer import REDIS_FAILURES
from unbroken.contract.kv import KVIdentity, KVSnapshot

T = TypeVar("T")
READ_AHEAD_BLOCKS = 2

log = logging.getLogger(__name__)


@dataclass
class RestoreResult:
    outcome: str  # restored | missing | mismatch | corrupt | timeout | error
    wire: list[bytes | memoryview] | None = None  # the full snapshot in wire form (buffers), or
    handoff_path: str | None = None  # the shared-memory file that holds it in wire form
    handoff_bytes: int = 0
    num_tokens: int = 0
    transcript: list[dict[str, Any]] | None = None
    manifest: Manifest | None = None
    message: str = ""


async def restore_session(store: KVStore, metrics: KVSyncMetrics, session_id: str,
                          identity: KVIdentity, timeout_s: float, handoff_dir: str | None = None,
                          max_tokens: int = 0) -> RestoreResult:
    """``handoff_dir``: put a restored snapshot in a shared-memory file there (when one can be
    made) instead of returning its buffers. ``max_tokens``: the asking replica's context (a longer
    session is refused before anything is allocated; 0 = only ``store.max_session_tokens``)."""
    t0 = time.monotonic()
    cap = store.store_cfg.max_session_tokens
    max_tokens = min(cap, max_tokens) if max_tokens > 0 else cap
    try:
        async with asyncio.timeout(timeout_s):
            result = await _restore(store, metrics, session_id, identity, handoff_dir, max_tokens)
    except TimeoutError:
        result = RestoreResult("timeout", message=f"Redis did not answer within {timeout_s}s")
    except REDIS_FAILURES as e:
        metrics.redis_errors.labels("read").inc()
        result = RestoreResult("error", message=f"Redis read failed: {type(e).__name__}: {e}")
    except Exception as e:  # noqa: BLE001 - a restore never fails the caller
        log.exception("kvsync: restore of session %s failed", session_id)
        result = RestoreResult("error", message=f"{type(e).__name__}: {e}")
    metrics.restores.labels(result.outcome).inc()
    metrics.restore_seconds.observe(time.monotonic() - t0)
    if result.outcome == "restored":
        metrics.restored_tokens.inc(result.num_tokens)
        metrics.restore_handoffs.labels("shm" if result.handoff_path else "http").inc()
    elif result.outcome not in ("missing", "timeout"):
        log.info("kvsync: session %s not restored (%s): %s", session_id, result.outcome, result.message)
    return result


async def _restore(store: KVStore, metrics: KVSyncMetrics, session_id: str,
                   identity: KVIdentity, handoff_dir: str | None, max_tokens: int) -> RestoreResult:
    raw = await store.read_manifest(session_id)
    if raw is None:
        return RestoreResult("missing", message="no snapshot of this session")
    if len(raw) > MAX_HEADER_BYTES:
        metrics.bad_data.labels("too_large").inc()
        return RestoreResult("corrupt", message=f"a manifest of {len(raw)} bytes is not parsed")
    try:
        manifest = Manifest.from_json(raw, store.mac_secret)
        if manifest.session_id != session_id:
            raise ValueError(f"manifest names session {manifest.session_id!r}")
    except ValueError as e:
        metrics.bad_data.labels("mac" if isinstance(e, ManifestForged) else "manifest").inc()
        return RestoreResult("corrupt", message=str(e))
    if manifest.identity != identity:
        # Another model's (or adapter's) snapshot: nothing of it is handed out, not even the transcript.
        return RestoreResult("mismatch", message="the snapshot is of another model identity")
    try:
        check_manifest_sizes(manifest, store.store_cfg.compression, max_tokens)
    except BadData as e:
        metrics.bad_data.labels(e.reason).inc()
        return RestoreResult("corrupt", transcript=manifest.transcript, message=str(e))
    handoff = _handoff_file(handoff_dir, manifest) if handoff_dir else None
    stored: Any = None
    try:
        out = None
        if handoff is not None:
            L, H, D = identity.num_layers, identity.num_kv_heads, identity.head_dim
            out = handoff.payload.view(DTYPES[manifest.dtype]).view(L, 2, H, len(manifest.token_ids), D)
        store_ids = [b.store_id for b in manifest.blocks]
        free: queue.SimpleQueue[Any] = queue.SimpleQueue()
        largest = max((b.stored_bytes for b in manifest.blocks), default=0)
        reader = store.block_reader(store_ids, free, max_value_bytes=largest)
        stored = (_read_ahead(reader, READ_AHEAD_BLOCKS, free.put) if reader is not None
                  else await store.read_blocks(store_ids))
        snapshot = await asyncio.to_thread(assemble, manifest, stored, out, store.mac_secret)
    except BadData as e:
        if handoff is not None:
            handoff.discard()
        metrics.bad_data.labels(e.reason).inc()
        outcome = "missing" if e.reason == "missing_block" else "corrupt"
        return RestoreResult(outcome, transcript=manifest.transcript, message=str(e))
    except BaseException:
        if handoff is not None:
            handoff.discard()
        raise
    finally:
        _close(stored)
    del stored, out
    try:
        await store.touch(session_id)
    except REDIS_FAILURES:
        metrics.redis_errors.labels("touch").inc()
    result = RestoreResult("restored", num_tokens=len(manifest.token_ids), transcript=manifest.transcript,
                           manifest=manifest)
    if handoff is not None:
        del snapshot
        handoff.release()
        asyncio.get_running_loop().call_later(UNCLAIMED_TTL_S, handoff.discard)
        result.handoff_path, result.handoff_bytes = handoff.path, handoff.size
    else:
        result.wire = await asyncio.to_thread(encode_snapshot_parts, snapshot)
    return result


def _close(stored: Any) -> None:
    """Stop a read-ahead early (its thread may still be inside it after a timeout: then it ends
    by itself when the worker finishes)."""
    try:
        close = getattr(stored, "close", None)
        if close is not None:
            close()
    except ValueError:  # "generator already executing" on the abandoned worker thread
        pass


def _handoff_file(directory: str, manifest: Manifest) -> HandoffFile | None:
    """A hand-off file for ``manifest``'s snapshot, or None (then the snapshot goes over HTTP)."""
    ident = manifest.identity
    if manifest.dtype not in DTYPES or manifest.dtype != ident.dtype:
        return None  # assemble() says why
    itemsize = torch.empty((), dtype=DTYPES[manifest.dtype]).element_size()
    payload = 2 * ident.num_layers * ident.num_kv_heads * ident.head_dim * len(manifest.token_ids) * itemsize
    header = KVSnapshot(manifest.session_id, ident, list(manifest.token_ids), [], [], start=0,
                        transcript=manifest.transcript)
    head = snapshot_head(header, manifest.dtype, (ident.num_layers, ident.num_kv_heads, ident.head_dim),
                         payload, None)
    try:
        return HandoffFile(directory, head, payload)
    except OSError as e:
        log.warning("kvsync: no shared-memory hand-off in %s (%s); the snapshot goes over HTTP", directory, e)
        return None


def _read_ahead(source: Iterator[T], depth: int, done: Callable[[T], None] | None = None) -> Iterator[T]:
    """``source``'s items, read on a thread of their own up to ``depth`` items ahead of the
    consumer. Closing this iterator early stops the reader (and closes ``source``).

    ``done`` is called with each item when the consumer asks for the next one (the item is then
    no longer used: its buffer may be read into again)."""
    items: queue.Queue[tuple[str, Any]] = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(message: tuple[str, Any]) -> bool:
        while not stop.is_set():
            try:
                items.put(message, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for item in source:
                if not put(("item", item)):
                    return
            put(("end", None))
        except BaseException as e:  # noqa: BLE001 - handed to the consumer
            put(("error", e))
        finally:
            close = getattr(source, "close", None)
            if close is not None:
                close()

    def consume() -> Iterator[T]:
        thread = threading.Thread(target=produce, name="kvsync-read", daemon=True)
        thread.start()
        try:
            while True:
                kind, value = items.get()
                if kind == "end":
                    return
                if kind == "error":
                    raise value
                yield value
                if done is not None and value is not None:
                    done(value)
        finally:
            stop.set()

    return consume()
