"""Reading a session back: the newest manifest, its blocks, every check, one full snapshot.

Never raises: every way it can go wrong is an outcome (``missing``, ``mismatch``, ``corrupt``,
``timeout``, ``error``) and the replica falls back to re-prefill from the transcript.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Any

from kvsync.blocks import BadData, assemble
from kvsync.metrics import KVSyncMetrics
from kvsync.protocol import Manifest, encode_snapshot_parts
from kvsync.store import KVStore
from kvsync.writer import REDIS_FAILURES
from replica.protocol import KVIdentity

log = logging.getLogger(__name__)


@dataclass
class RestoreResult:
    outcome: str  # restored | missing | mismatch | corrupt | timeout | error
    wire: list[bytes | memoryview] | None = None  # the full snapshot in wire form (buffers) when restored
    num_tokens: int = 0
    transcript: list[dict[str, Any]] | None = None
    manifest: Manifest | None = None
    message: str = ""


async def restore_session(store: KVStore, metrics: KVSyncMetrics, session_id: str,
                          identity: KVIdentity, timeout_s: float) -> RestoreResult:
    t0 = time.monotonic()
    try:
        async with asyncio.timeout(timeout_s):
            result = await _restore(store, metrics, session_id, identity)
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
    elif result.outcome not in ("missing", "timeout"):
        log.info("kvsync: session %s not restored (%s): %s", session_id, result.outcome, result.message)
    return result


async def _restore(store: KVStore, metrics: KVSyncMetrics, session_id: str,
                   identity: KVIdentity) -> RestoreResult:
    raw = await store.read_manifest(session_id)
    if raw is None:
        return RestoreResult("missing", message="no snapshot of this session")
    try:
        manifest = Manifest.from_json(raw)
        if manifest.session_id != session_id:
            raise ValueError(f"manifest names session {manifest.session_id!r}")
    except ValueError as e:
        metrics.bad_data.labels("manifest").inc()
        return RestoreResult("corrupt", message=str(e))
    if manifest.identity != identity:
        return RestoreResult("mismatch", transcript=manifest.transcript,
                             message=f"snapshot is of {manifest.identity.to_dict()}, asked for {identity.to_dict()}")
    stored = await store.read_blocks([b.store_id for b in manifest.blocks])
    try:
        snapshot = await asyncio.to_thread(assemble, manifest, stored)
    except BadData as e:
        metrics.bad_data.labels(e.reason).inc()
        outcome = "missing" if e.reason == "missing_block" else "corrupt"
        return RestoreResult(outcome, transcript=manifest.transcript, message=str(e))
    del stored
    wire = await asyncio.to_thread(encode_snapshot_parts, snapshot)
    try:
        await store.touch(session_id)
    except REDIS_FAILURES:
        metrics.redis_errors.labels("touch").inc()
    return RestoreResult("restored", wire=wire, num_tokens=len(manifest.token_ids),
                         transcript=manifest.transcript, manifest=manifest)
