"""The replica's side of kvsync: hand snapshots to the local sidecar, fetch them back.

:meth:`KVSyncClient.publish` is called on the engine thread and never blocks: it puts the
snapshot on a bounded queue and a background thread sends it (the tensors are written to the
socket one by one, never joined into one buffer). When the queue is full the snapshot is
dropped and counted; the engine then sends the same blocks again with its next snapshot.

Incremental snapshots and ``needs_full``: the engine sends only the blocks after what it
believes is replicated. When the sidecar cannot build on that (it restarted, lost the blocks
in Redis, or refused a snapshot as busy), or the sidecar cannot be reached, the client marks the
session and :meth:`KVSyncClient.needs_full` returns True until a snapshot from token 0 has been
accepted; the engine checks it before each snapshot.
"""

from __future__ import annotations

import asyncio
import http.client
import logging
import queue
import threading
import time
import urllib.parse
from collections import OrderedDict
from typing import Any

import aiohttp
import orjson

from kvsync.handoff import open_handoff
from kvsync.protocol import (
    CONTENT_TYPE_SNAPSHOT,
    OUTCOME_HEADER,
    FetchReply,
    FetchRequest,
    decode_snapshot,
    encode_snapshot_parts,
)
from unbroken.contract.kv import KVIdentity, KVSnapshot
from unbroken.contract.replication import FetchResult, Replication

__all__ = ["FetchResult", "KVSyncClient"]

log = logging.getLogger(__name__)

_CLOSE = object()
MAX_TOO_LARGE_SESSIONS = 4096  # sessions remembered as too large to replicate (oldest forgotten first)


class KVSyncClient(Replication):
    """The replica's :class:`~unbroken.contract.replication.Replication`: one per replica process. ``start()`` before publishing, ``close()`` at shutdown."""

    def __init__(self, sidecar_url: str, *, block_tokens: int = 64, max_pending: int = 4,
                 post_timeout_s: float = 30.0, shared_memory: bool = True) -> None:
        self.sidecar_url = sidecar_url.rstrip("/")
        parsed = urllib.parse.urlsplit(self.sidecar_url)
        if parsed.scheme != "http" or not parsed.hostname:
            raise ValueError(f"kvsync sidecar URL must be http://host:port, got {sidecar_url!r}")
        self._host = parsed.hostname
        self._port = parsed.port or 80
        self.block_tokens = block_tokens
        self.post_timeout_s = post_timeout_s
        # Restored snapshots come through a shared-memory file while that works (same host).
        self.shared_memory = shared_memory
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=max_pending)
        self._needs_full: set[str] = set()
        # The largest snapshot the sidecar takes (its GET /v1/state), when known.
        self.max_snapshot_bytes: int | None = None
        # Sessions whose full snapshot the sidecar cannot keep: sessions only grow, so they are
        # not exported or sent again (the engine asks :meth:`too_large`).
        self._too_large: OrderedDict[str, None] = OrderedDict()
        self._thread: threading.Thread | None = None
        self._conn: http.client.HTTPConnection | None = None
        self._conn_reused = False
        self._sidecar_down = False
        self.num_published = 0  # accepted by the sidecar
        self.num_dropped = 0  # queue full: never sent
        self.num_refused = 0  # sent, refused (need_full, busy, invalid)
        self.num_failed = 0  # sent, sidecar unreachable or failed
        self.num_too_large = 0  # sessions found too large to replicate
        self.num_bytes_sent = 0
        self._unsent = 0  # queued or being sent
        self._unsent_lock = threading.Lock()

    # -- lifecycle ---------------------------------------------------------------------------------------
    def sidecar_block_tokens(self, timeout_s: float = 2.0) -> int | None:
        """The block size the sidecar uses (``GET /v1/state``), or None when it cannot be asked now.
        Also learns the largest snapshot it takes, so larger ones are not sent at all."""
        conn = http.client.HTTPConnection(self._host, self._port, timeout=timeout_s)
        try:
            conn.request("GET", "/v1/state")
            resp = conn.getresponse()
            state = orjson.loads(resp.read()) if resp.status == 200 else None
        except (OSError, http.client.HTTPException, orjson.JSONDecodeError):
            return None
        finally:
            conn.close()
        if not isinstance(state, dict):
            return None
        largest = state.get("max_snapshot_bytes")
        if isinstance(largest, int) and largest > 0:
            self.max_snapshot_bytes = largest
        value = state.get("block_tokens")
        return value if isinstance(value, int) and value > 0 else None

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="kvsync-client", daemon=True)
            self._thread.start()

    def close(self, timeout_s: float = 5.0) -> None:
        """Send what is queued (for up to ``timeout_s``) and stop the thread."""
        thread, self._thread = self._thread, None
        if thread is None:
            return
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                self._queue.put(_CLOSE, timeout=0.1)
                break
            except queue.Full:
                if time.monotonic() > deadline:
                    break
        thread.join(max(0.0, deadline - time.monotonic()))

    # -- the engine thread's side ------------------------------------------------------------------------
    def publish(self, snapshot: KVSnapshot) -> bool:
        """Queue ``snapshot`` for the sidecar; False (and a count) when the queue is full."""
        if snapshot.start % self.block_tokens:
            raise ValueError(f"snapshot start {snapshot.start} is not a multiple of {self.block_tokens}")
        with self._unsent_lock:
            try:
                self._queue.put_nowait(snapshot)
            except queue.Full:
                self.num_dropped += 1
                return False
            self._unsent += 1
        return True

    def too_large(self, session_id: str) -> bool:
        """Whether this session's KV has outgrown what the sidecar keeps (it is not replicated)."""
        return session_id in self._too_large

    def _mark_too_large(self, session_id: str, nbytes: int, why: str) -> None:
        if session_id not in self._too_large:
            self.num_too_large += 1
            log.info("kvsync client: session %s is not replicated any more: a full snapshot of %d bytes %s",
                     session_id, nbytes, why)
        self._too_large[session_id] = None
        self._too_large.move_to_end(session_id)
        while len(self._too_large) > MAX_TOO_LARGE_SESSIONS:
            self._too_large.popitem(last=False)

    def needs_full(self, session_id: str) -> bool:
        """Whether the next snapshot of this session must start at token 0."""
        return session_id in self._needs_full

    @property
    def sender_thread_id(self) -> int | None:
        """The OS id of the thread that posts snapshots (None before ``start``)."""
        return self._thread.native_id if self._thread is not None else None

    @property
    def num_queued(self) -> int:
        return self._queue.qsize()

    @property
    def num_in_flight(self) -> int:
        """Snapshots queued or being sent."""
        return self._unsent

    # -- the background thread ---------------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is _CLOSE:
                break
            try:
                self._send(item)
            except Exception:  # noqa: BLE001 - the sender thread must survive anything
                log.exception("kvsync client: sending a snapshot failed")
                self._needs_full.add(item.session_id)
                self.num_failed += 1
            finally:
                with self._unsent_lock:
                    self._unsent -= 1
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def _send(self, snapshot: KVSnapshot) -> None:
        if snapshot.session_id in self._too_large:
            self.num_refused += 1
            return
        parts = encode_snapshot_parts(snapshot)
        total = sum(len(p) for p in parts)
        if self.max_snapshot_bytes is not None and total > self.max_snapshot_bytes:
            # Posting it would only be refused (or the connection cut mid-body, which looks like an
            # outage); a later snapshot of the session would be larger still.
            self._needs_full.add(snapshot.session_id)
            self.num_refused += 1
            self._mark_too_large(snapshot.session_id, total,
                                 f"exceeds the {self.max_snapshot_bytes} bytes the sidecar keeps")
            return
        path = f"/v1/sessions/{urllib.parse.quote(snapshot.session_id, safe='')}/snapshots"
        try:
            try:
                status, body = self._post(path, parts, total)
            except (OSError, http.client.HTTPException):
                if self._conn is None or not self._conn_reused:
                    raise
                # The sidecar may have closed an idle keep-alive connection: once more, afresh.
                self._conn.close()
                self._conn = None
                status, body = self._post(path, parts, total)
        except (OSError, http.client.HTTPException) as e:
            if self._conn is not None:
                self._conn.close()
                self._conn = None
            self._needs_full.add(snapshot.session_id)
            self.num_failed += 1
            if not self._sidecar_down:
                self._sidecar_down = True
                log.warning("kvsync client: sidecar at %s unreachable (%s); snapshots are skipped until it is back",
                            self.sidecar_url, e)
            return
        if self._sidecar_down:
            self._sidecar_down = False
            log.warning("kvsync client: sidecar at %s reachable again", self.sidecar_url)
        if status == 202:
            self.num_published += 1
            self.num_bytes_sent += total
            if snapshot.start == 0:
                self._needs_full.discard(snapshot.session_id)
            return
        self.num_refused += 1
        self._needs_full.add(snapshot.session_id)
        if status == 413:
            self._mark_too_large(snapshot.session_id, total, "was refused as too large")
            return
        if status != 409:
            log.info("kvsync client: sidecar refused a snapshot of %s: %s %s", snapshot.session_id,
                     status, body[:200])

    def _post(self, path: str, parts: list[bytes | memoryview], total: int) -> tuple[int, bytes]:
        if self._conn is None:
            self._conn = http.client.HTTPConnection(self._host, self._port, timeout=self.post_timeout_s)
            self._conn_reused = False
        else:
            self._conn_reused = True
        conn = self._conn
        conn.putrequest("POST", path)
        conn.putheader("Content-Type", CONTENT_TYPE_SNAPSHOT)
        conn.putheader("Content-Length", str(total))
        conn.endheaders()
        for part in parts:
            conn.send(part)
        resp = conn.getresponse()
        body = resp.read()
        if resp.will_close:
            conn.close()
            self._conn = None
        return resp.status, body

    # -- restore (the replica's event loop) ----------------------------------------------------------------
    async def fetch(self, session_id: str, identity: KVIdentity, timeout_s: float) -> FetchResult:
        """The newest complete snapshot of ``session_id`` whose identity is ``identity`` (full KV
        from token 0) and the transcript; never raises, the outcome says what happened.

        The snapshot comes through a shared-memory file when the sidecar offers one; if this
        process cannot open it (another host or container), shared memory is switched off and the
        same fetch is made again over HTTP."""
        try:
            async with asyncio.timeout(timeout_s):
                async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout_s)) as http_session:
                    result = await self._fetch(http_session, session_id, identity, self.shared_memory)
                    if result is None:
                        result = await self._fetch(http_session, session_id, identity, False)
                    assert result is not None
                    return result
        except TimeoutError:
            return FetchResult(None, "timeout")
        except ValueError as e:  # a corrupt snapshot or reply
            log.warning("kvsync client: fetched snapshot of %s is unusable: %s", session_id, e)
            return FetchResult(None, "corrupt")
        except (aiohttp.ClientError, OSError) as e:
            log.info("kvsync client: fetch of %s failed: %s", session_id, e)
            return FetchResult(None, "error")

    async def _fetch(self, http_session: aiohttp.ClientSession, session_id: str, identity: KVIdentity,
                     shared_memory: bool) -> FetchResult | None:
        """One fetch; None when the sidecar named a hand-off file this process cannot open."""
        path = f"/v1/sessions/{urllib.parse.quote(session_id, safe='')}/fetch"
        ask = FetchRequest(identity, handoff="shm" if shared_memory else "http")
        async with http_session.post(self.sidecar_url + path, data=ask.to_json(),
                                     headers={"Content-Type": "application/json"}) as resp:
            outcome = resp.headers.get(OUTCOME_HEADER, "")
            if resp.status == 200 and outcome == "restored" and resp.content_type == CONTENT_TYPE_SNAPSHOT:
                data = await _read_into_bytearray(resp)
                snapshot = await asyncio.to_thread(decode_snapshot, data)
            else:
                body = await resp.read()
                if resp.status != 200:
                    log.info("kvsync client: fetch answered %s: %s", resp.status, body[:200])
                    return FetchResult(None, "error")
                reply = FetchReply.from_dict(orjson.loads(body))
                if reply.outcome != "restored":
                    return FetchResult(None, reply.outcome, reply.transcript)
                if reply.handoff_path is None:
                    raise ValueError("the sidecar answered restored with neither a snapshot nor a hand-off file")
                try:
                    mapped = open_handoff(reply.handoff_path, reply.handoff_bytes)
                except OSError as e:
                    log.warning("kvsync client: cannot open the sidecar's hand-off file (%s); restores go over "
                                "HTTP from now on", e)
                    self.shared_memory = False
                    return None
                snapshot = await asyncio.to_thread(decode_snapshot, mapped, False)
        if snapshot.session_id != session_id or snapshot.identity != identity:
            return FetchResult(None, "mismatch", snapshot.transcript)
        if snapshot.start != 0:
            return FetchResult(None, "corrupt", snapshot.transcript)
        return FetchResult(snapshot, "restored", snapshot.transcript)


async def _read_into_bytearray(resp: aiohttp.ClientResponse) -> bytearray:
    """Read a body into one writable buffer (the restored tensors are views over it)."""
    n = resp.content_length
    if n is None:
        return bytearray(await resp.read())
    buf = bytearray(n)
    view = memoryview(buf)
    pos = 0
    async for chunk in resp.content.iter_chunked(1 << 20):
        if pos + len(chunk) > n:
            raise ValueError("restored snapshot is longer than its Content-Length")
        view[pos:pos + len(chunk)] = chunk
        pos += len(chunk)
    if pos != n:
        raise ValueError(f"restored snapshot truncated at {pos} of {n} bytes")
    return buf
