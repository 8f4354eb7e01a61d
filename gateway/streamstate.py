"""Each running stream's resumable state, kept locally and written behind the relay to Redis.

A stream that a gateway relays is registered here (:meth:`StreamStateStore.open`) with what another
gateway needs to continue it: the request id, the route, the API key that owns it, a hash of the
client's body, the body as forwarded to replicas, the stream's ``id``/``created``/``model``, and the
token ids that reached the client (the relay's own list, shared: nothing is copied per token).

One owner task writes the state to Redis, in pipelines, with a TTL: a stream as it opens (when the
first replica's first event is in hand, before anything reaches the client: a gateway killed a few
milliseconds into a stream leaves it resumable), an unfinished stream's end (the client left), and
every ``state_write_interval_ms`` the streams whose token count changed. The relay puts opened and
ended streams on a bounded queue and registers running ones in a table the owner task reads. The relay never waits on Redis: a full queue drops the command (counted), a failed
write is counted and the stream stays resumable within this gateway (the local copy). What is read
back from Redis is untrusted: sizes are bounded before anything is allocated and every field's type
is checked.

Redis layout, one command per write: ``{prefix}stream:{request id}`` is ``UBS1``, the lengths of
``meta`` and of the body (uint32 each), ``meta`` (JSON: version, route, principal, body_sha256, id,
created, model, finished), the body (JSON), then the token ids (uint32), with the TTL
``state_ttl_s``. A body over ``INLINE_BODY_MAX_BYTES`` is written once, at
``{prefix}stream-body:{request id}`` (living ``state_ttl_s`` + the request deadline), and its length
in the state is 0.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import re
import struct
import time
from array import array
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import orjson

from gateway.config import StreamsSection
from gateway.metrics import GatewayMetrics
from gateway.rediswire import RedisSetWriter
from unbroken.aio import stop_tasks
from unbroken.errors import InvalidRequestError

log = logging.getLogger(__name__)

STATE_VERSION = 1
MAGIC = b"UBS1"
MAX_META_BYTES = 4096
INLINE_BODY_MAX_BYTES = 4096
_REQUEST_ID_RE = re.compile(r"^[A-Za-z0-9._~:+/=-]{1,128}$")
_TOKEN_ID_LIMIT = 1 << 31


def check_request_id(request_id: str) -> str:
    """A request id a stream's state can be kept under (bounded, no spaces or control characters)."""
    if not _REQUEST_ID_RE.match(request_id):
        raise InvalidRequestError("X-Request-ID must be 1-128 characters of A-Z a-z 0-9 . _ ~ : + / = -",
                                  param="X-Request-ID")
    return request_id


def body_sha256(body: dict[str, Any]) -> str:
    """The hash a resumed request's body must match (keys sorted: the same JSON in any key order)."""
    return hashlib.sha256(orjson.dumps(body, option=orjson.OPT_SORT_KEYS)).hexdigest()


@dataclass(eq=False)
class StreamRecord:
    """One stream's resumable state. ``token_ids`` is the relay's list of ids sent to the client."""

    request_id: str
    route: str
    principal: str
    body_sha256: str
    body: dict[str, Any]
    stream_id: str | None = None
    created: int | None = None
    model: str | None = None
    token_ids: list[int] = field(default_factory=list)
    finished: bool = False
    ended_s: float = 0.0  # monotonic time the local relay ended (0 = running here)
    opened_s: float = 0.0  # monotonic time the local relay began
    num_written: int = -1  # tokens in the last write to Redis (-1: the body not written yet)
    written_s: float = 0.0  # monotonic time of the last write to Redis
    body_json: bytes = b""  # the body serialized once, at the first write

    def meta_json(self) -> bytes:
        return orjson.dumps({"v": STATE_VERSION, "route": self.route, "principal": self.principal,
                             "body_sha256": self.body_sha256, "id": self.stream_id, "created": self.created,
                             "model": self.model, "finished": self.finished})


    def state_blob(self, num_tokens: int, inline_body: bytes) -> bytes:
        meta = self.meta_json()
        return MAGIC + struct.pack("<II", len(meta), len(inline_body)) + meta + inline_body + \
            _pack(self.token_ids[:num_tokens])


def parse_record(request_id: str, blob: bytes | None, body_b: bytes | None, max_body_bytes: int,
                 max_tokens: int) -> StreamRecord:
    """A record read back from Redis; raises ValueError for anything malformed or too large."""
    if not isinstance(blob, bytes):
        raise ValueError("missing state")
    if len(blob) < 12 or blob[:4] != MAGIC:
        raise ValueError("not a stream record")
    meta_len, body_len = struct.unpack_from("<II", blob, 4)
    if meta_len > MAX_META_BYTES or body_len > INLINE_BODY_MAX_BYTES or len(blob) < 12 + meta_len + body_len:
        raise ValueError("meta or body too large")
    meta_b = blob[12:12 + meta_len]
    tokens_b = blob[12 + meta_len + body_len:]
    if body_len:
        body_b = blob[12 + meta_len:12 + meta_len + body_len]
    if not isinstance(body_b, bytes):
        raise ValueError("missing body")
    if len(body_b) > max_body_bytes or len(tokens_b) > 4 * max_tokens or len(tokens_b) % 4:
        raise ValueError("a field is too large")
    meta, body = orjson.loads(meta_b), orjson.loads(body_b)
    if not isinstance(meta, dict) or not isinstance(body, dict) or meta.get("v") != STATE_VERSION:
        raise ValueError("not a stream record")
    for name, kind in (("route", str), ("principal", str), ("body_sha256", str), ("finished", bool)):
        if not isinstance(meta.get(name), kind):
            raise ValueError(f"meta.{name} is not a {kind.__name__}")
    for name, kind in (("id", str), ("created", int), ("model", str)):
        v = meta.get(name)
        if v is not None and (not isinstance(v, kind) or isinstance(v, bool)):
            raise ValueError(f"meta.{name} is not a {kind.__name__}")
    ids = array("I")
    ids.frombytes(tokens_b)
    if ids.itemsize != 4:  # pragma: no cover - platforms where "I" is not 32 bits
        raise ValueError("unsupported platform")
    token_ids = ids.tolist()
    if any(t >= _TOKEN_ID_LIMIT for t in token_ids):
        raise ValueError("token id out of range")
    return StreamRecord(request_id=request_id, route=meta["route"], principal=meta["principal"],
                        body_sha256=meta["body_sha256"], body=body, stream_id=meta.get("id"),
                        created=meta.get("created"), model=meta.get("model"), token_ids=token_ids,
                        finished=meta["finished"])


def _pack(token_ids: list[int]) -> bytes:
    return array("I", token_ids).tobytes()


class StreamStateStore:
    """Running streams' state: the local copy (same-gateway resumes) and the write-behind to Redis."""

    def __init__(self, config: StreamsSection, key_prefix: str, metrics: GatewayMetrics,
                 max_body_bytes: int, op_timeout_s: float, body_extra_ttl_s: float = 300.0) -> None:
        self.config = config
        self.prefix = key_prefix
        self.metrics = metrics
        self.max_body_bytes = max_body_bytes
        self.op_timeout_s = op_timeout_s
        self.redis: Any = None
        self.body_extra_ttl_s = body_extra_ttl_s  # the body (written once) outlives the state by a stream's life
        self._running: dict[str, StreamRecord] = {}  # streams this gateway relays now
        self._ended: OrderedDict[str, StreamRecord] = OrderedDict()  # recently ended here (bounded)
        self._queue: asyncio.Queue[StreamRecord] = asyncio.Queue(maxsize=config.state_queue_max)  # to write now
        self._dirty: list[StreamRecord] = []  # taken from the queue, to write now
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        self._wire: RedisSetWriter | None = None

    def key(self, request_id: str) -> str:
        return f"{self.prefix}stream:{request_id}"

    def body_key(self, request_id: str) -> str:
        return f"{self.prefix}stream-body:{request_id}"

    # -- the relay's side: never waits ---------------------------------------------------------------

    def open(self, record: StreamRecord) -> None:
        """A stream began (or was resumed) here: keep it locally and have it written to Redis."""
        record.num_written = -1
        record.opened_s = time.monotonic()
        self._running[record.request_id] = record
        self._ended.pop(record.request_id, None)
        if self.redis is None or not self.config.state_write_on_open:
            return
        # Written at once, not at the next tick: a gateway killed a few milliseconds after a stream's
        # first event must leave enough behind for another to continue it (a full queue leaves the
        # record to the next tick).
        try:
            self._queue.put_nowait(record)
        except asyncio.QueueFull:
            pass

    def close(self, record: StreamRecord, finished: bool) -> None:
        """The local relay of ``record`` ended (``finished``: its last chunk reached the client)."""
        record.finished = finished
        record.ended_s = time.monotonic()
        if self._running.get(record.request_id) is record:
            del self._running[record.request_id]
        self._ended[record.request_id] = record
        self._ended.move_to_end(record.request_id)
        while len(self._ended) > self.config.max_local_streams:
            self._ended.popitem(last=False)
        if self.redis is None or finished:
            # A finished stream needs no last write: a client that missed its end resumes from the
            # state of the last interval (the replica regenerates the rest).
            return
        try:
            self._queue.put_nowait(record)
        except asyncio.QueueFull:
            self.metrics.stream_state_writes.labels("dropped").inc()

    @property
    def num_running(self) -> int:
        return len(self._running)

    # -- lookups -------------------------------------------------------------------------------------

    def local(self, request_id: str) -> StreamRecord | None:
        rec = self._running.get(request_id)
        if rec is not None:
            return rec
        rec = self._ended.get(request_id)
        if rec is not None and time.monotonic() - rec.ended_s > self.config.state_ttl_s:
            del self._ended[request_id]
            return None
        return rec

    async def lookup(self, request_id: str) -> tuple[StreamRecord | None, str]:
        """The stream's state and where it came from (``local``, ``redis``, ``none``)."""
        rec = self.local(request_id)
        if rec is not None:
            return rec, "local"
        if self.redis is None:
            return None, "none"
        try:
            async with asyncio.timeout(self.op_timeout_s):
                blob, body = await self.redis.mget(self.key(request_id), self.body_key(request_id))
        except Exception as e:  # noqa: BLE001 - Redis down: only local streams are resumable
            log.warning("stream state of %s unreadable: %s", request_id, e)
            self.metrics.stream_state_reads.labels("error").inc()
            return None, "none"
        if blob is None:
            return None, "none"
        try:
            rec = parse_record(request_id, blob, body, self.max_body_bytes, self.config.max_stream_tokens)
        except (ValueError, orjson.JSONDecodeError) as e:
            log.warning("stream state of %s in Redis is malformed: %s", request_id, e)
            self.metrics.stream_state_reads.labels("malformed").inc()
            return None, "none"
        self.metrics.stream_state_reads.labels("ok").inc()
        return rec, "redis"

    # -- the owner task ------------------------------------------------------------------------------

    def attach_redis(self, redis: Any, url: str) -> None:
        """``redis`` (redis-py) reads the state back; the writes go through their own connection to
        ``url`` (:class:`RedisSetWriter`: a fifth of redis-py's CPU per write)."""
        self.redis = redis
        self._wire = RedisSetWriter(url, self.op_timeout_s)

    def start(self) -> None:
        if self.redis is not None and self._task is None:
            self._stopping = False
            self._task = asyncio.create_task(self._run(), name="stream-state-writer")

    async def stop(self) -> None:
        if self._task is not None:
            # The flag as well as the cancel: on Python 3.11.2 a cancel that lands as the queue
            # wait's timeout expires can come out as TimeoutError, and the loop would go on.
            self._stopping = True
            await stop_tasks([self._task], what="stream-state writer")
            self._task = None
        if self._wire is not None:
            await self._wire.aclose()

    async def _run(self) -> None:
        interval_s = self.config.state_write_interval_ms / 1000.0
        next_tick = time.monotonic() + interval_s
        while not self._stopping:
            # A queued stream (opened, or left by its client) is written at once, with whatever else
            # is queued by then; the streams that grew are written every interval.
            tick = False
            try:
                async with asyncio.timeout(max(0.0, next_tick - time.monotonic())):
                    self._dirty.append(await self._queue.get())
                while not self._queue.empty():
                    self._dirty.append(self._queue.get_nowait())
            except TimeoutError:
                tick = True
                next_tick = time.monotonic() + interval_s
            try:
                await self._write(grown=tick)
            except asyncio.CancelledError:
                raise
            except Exception as e:  # noqa: BLE001 - counted; the streams stay resumable here
                log.debug("stream state write failed: %s", e)

    async def _write(self, grown: bool = True) -> None:
        """One pipeline: the queued streams (opened, or ended unfinished) and, with ``grown``, the
        running streams whose token count changed since their last write."""
        ttl_ms = self.config.state_ttl_s * 1000
        body_ttl_ms = ttl_ms + int(self.body_extra_ttl_s * 1000)
        # an opened stream that finished before its first write needs none (see close())
        todo: list[StreamRecord] = []
        queued: set[int] = set()
        for r in self._dirty:
            if id(r) not in queued and not (r.finished and r.num_written < 0):
                queued.add(id(r))
                todo.append(r)
        self._dirty = []
        now = time.monotonic()
        if grown:
            # a stream written (as it opened) less than half an interval ago waits for the next tick
            recent = now - self.config.state_write_interval_ms / 2000.0
            todo += [r for r in self._running.values()
                     if r.num_written != len(r.token_ids) and r.written_s <= recent and id(r) not in queued]
        if not todo:
            return
        items: list[tuple[bytes, bytes, int]] = []
        counts: list[tuple[StreamRecord, int]] = []
        for rec in todo:
            n = len(rec.token_ids)
            if not rec.body_json:
                rec.body_json = orjson.dumps(rec.body)
            inline = rec.body_json if len(rec.body_json) <= INLINE_BODY_MAX_BYTES else b""
            if not inline and rec.num_written < 0:
                items.append((self.body_key(rec.request_id).encode(), rec.body_json, body_ttl_ms))
            items.append((self.key(rec.request_id).encode(), rec.state_blob(n, inline), ttl_ms))
            counts.append((rec, n))
        try:
            assert self._wire is not None
            async with asyncio.timeout(self.op_timeout_s):
                await self._wire.set_many(items)
        except Exception:
            self.metrics.stream_state_writes.labels("error").inc(len(counts))
            for rec, _ in counts:  # written again whole at the next tick
                rec.num_written = -1
            ended = [r for r, _ in counts if r.ended_s][-self.config.state_queue_max:]
            self.metrics.stream_state_writes.labels("dropped").inc(
                sum(1 for r, _ in counts if r.ended_s) - len(ended))
            self._dirty = ended
            raise
        for rec, n in counts:
            rec.num_written, rec.written_s = n, now
        self.metrics.stream_state_writes.labels("ok").inc(len(counts))
