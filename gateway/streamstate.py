"""Each running stream's resumable state, kept locally and written behind the relay to Redis.

A stream that a gateway relays is registered here (:meth:`StreamStateStore.open`) with what another
gateway needs to continue it: the request id, the route, the API key that owns it, a hash of the
client's body, the body as forwarded to replicas (serialized once), the stream's
``id``/``created``/``model``, and the token ids that reached the client (the relay's own list,
shared: nothing is copied per token).

Writes to Redis go through the store's own pipelined connection (:class:`RedisSetWriter`), with a
TTL, in three ways. A stream as it opens (when the first replica's first event is in hand, before
anything reaches the client: a gateway killed a few milliseconds into a stream leaves it resumable)
and an unfinished stream's end (the client left) are written from the event loop's next turn,
together with every other stream opened or left in the same turn: no task is woken for them and the
replies are counted by the connection as they arrive. Every ``state_write_interval_ms`` a task
writes the streams whose token count changed, retries what failed and reopens a lost connection.
The relay never waits on Redis: a write that cannot go out is counted and the stream stays
resumable within this gateway (the local copy); a batch unanswered for ``op_timeout_s`` closes the
connection. What is read back from Redis is untrusted: sizes are bounded before anything is
allocated and every field's type is checked. Ended streams are kept locally in a compact form (the
body as bytes, no dicts): thousands of them cost the garbage collector next to nothing.

Redis layout, one command per write: ``{prefix}stream:{request id}`` is ``UBS1``, the lengths of
``meta`` and of the body (uint32 each), ``meta`` (JSON: version, route, principal, body_sha256, id,
created, model, finished), the body (JSON), then the token ids (uint32), with the TTL
``state_ttl_s``. A body over ``INLINE_BODY_MAX_BYTES`` is written once, at
``{prefix}stream-body:{request id}`` (living ``state_ttl_s`` + the request deadline), and its length
in the state is 0.
"""

from __future__ import annotations

import asyncio
import functools
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


@dataclass(eq=False, slots=True)
class StreamRecord:
    """One stream's resumable state. ``token_ids`` is the relay's list of ids sent to the client;
    ``body_json`` the request as sent to replicas (JSON), set when the stream opens."""

    request_id: str
    route: str
    principal: str
    body_sha256: str
    body_json: bytes = b""
    stream_id: str | None = None
    created: int | None = None
    model: str | None = None
    token_ids: list[int] = field(default_factory=list)
    finished: bool = False
    ended_s: float = 0.0  # monotonic time the local relay ended (0 = running here)
    opened_s: float = 0.0  # monotonic time the local relay began
    num_written: int = -1  # tokens in the last write sent to Redis (-1: the body not written yet)
    written_s: float = 0.0  # monotonic time of the last write sent to Redis
    writable: bool = True  # False once its token ids would not fit the record: not tried again

    def body(self) -> dict[str, Any]:
        """The request as sent to replicas (parsed anew: the caller may change it)."""
        body = orjson.loads(self.body_json)
        if not isinstance(body, dict):  # pragma: no cover - set by this gateway or checked by parse_record
            raise ValueError("a stream's body is not an object")
        return body

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
                        body_sha256=meta["body_sha256"], body_json=bytes(body_b), stream_id=meta.get("id"),
                        created=meta.get("created"), model=meta.get("model"), token_ids=token_ids,
                        finished=meta["finished"])


# An ended stream as kept locally: (ended_s, finished, route, principal, body_sha256, body_json,
# stream_id, created, model, token ids). Tuples of strings, numbers and bytes only, which the
# garbage collector stops tracking at its first look: ten thousand ended streams cost its
# collections nothing, where records (a dict and a list each, the body's dicts) cost the gateway a
# few per cent of its CPU under a load of short streams.
_Ended = tuple[float, bool, str, str, str, bytes, "str | None", "int | None", "str | None", tuple[int, ...]]


def _compact(r: StreamRecord) -> _Ended:
    return (r.ended_s, r.finished, r.route, r.principal, r.body_sha256, r.body_json, r.stream_id, r.created,
            r.model, tuple(r.token_ids))


def _expand(request_id: str, e: _Ended) -> StreamRecord:
    return StreamRecord(request_id=request_id, ended_s=e[0], finished=e[1], route=e[2], principal=e[3],
                        body_sha256=e[4], body_json=e[5], stream_id=e[6], created=e[7], model=e[8],
                        token_ids=list(e[9]))


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
        self._ended: OrderedDict[str, _Ended] = OrderedDict()  # recently ended here (bounded, compact)
        self._soon: list[StreamRecord] = []  # opened or left unfinished: written at the loop's next turn
        self._soon_handle: asyncio.Handle | None = None
        self._retry: list[StreamRecord] = []  # ended unfinished, their write failed: written at the next tick
        self._task: asyncio.Task[None] | None = None
        self._connecting: asyncio.Task[None] | None = None
        self._stopping = False
        self._wire: RedisSetWriter | None = None
        writes = metrics.stream_state_writes
        self._ok, self._error, self._dropped = writes.labels("ok"), writes.labels("error"), writes.labels("dropped")

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
        if self._wire is not None and self.config.state_write_on_open:
            # Written at the loop's next turn, not at the next tick: a gateway killed a few
            # milliseconds after a stream's first event must leave enough behind for another to
            # continue it. (Past the bound, the tick writes it.)
            self._write_soon(record)

    def close(self, record: StreamRecord, finished: bool) -> None:
        """The local relay of ``record`` ended (``finished``: its last chunk reached the client)."""
        record.finished = finished
        record.ended_s = time.monotonic()
        if self._running.get(record.request_id) is record:
            del self._running[record.request_id]
        ended = self._ended
        if record.request_id in ended:  # a resumed stream ended again: it moves to the newest end
            del ended[record.request_id]
        ended[record.request_id] = _compact(record)
        if len(ended) > self.config.max_local_streams:
            ended.popitem(last=False)
        if self._wire is None or finished:
            # A finished stream needs no last write: a client that missed its end resumes from the
            # state of the last interval (the replica regenerates the rest).
            return
        if not self._write_soon(record):
            self._dropped.inc()

    def _write_soon(self, record: StreamRecord) -> bool:
        if len(self._soon) >= self.config.state_queue_max:
            return False
        self._soon.append(record)
        if self._soon_handle is None:
            self._soon_handle = asyncio.get_running_loop().call_soon(self._flush_soon)
        return True

    def _flush_soon(self) -> None:
        self._soon_handle = None
        todo, self._soon = self._soon, []
        self._send(todo)

    @property
    def num_running(self) -> int:
        return len(self._running)

    # -- lookups -------------------------------------------------------------------------------------

    def local(self, request_id: str) -> StreamRecord | None:
        rec = self._running.get(request_id)
        if rec is not None:
            return rec
        ended = self._ended.get(request_id)
        if ended is None:
            return None
        if time.monotonic() - ended[0] > self.config.state_ttl_s:
            del self._ended[request_id]
            return None
        return _expand(request_id, ended)

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

    # -- writing -------------------------------------------------------------------------------------

    def attach_redis(self, redis: Any, url: str) -> None:
        """``redis`` (redis-py) reads the state back (a stream another gateway wrote); the writes go
        through their own connection to ``url`` (:class:`RedisSetWriter`), unless
        ``state_write_behind`` is off."""
        self.redis = redis
        if self.config.state_write_behind:
            self._wire = RedisSetWriter(url, self.op_timeout_s)

    def start(self) -> None:
        if self._wire is not None and self._task is None:
            self._stopping = False
            self._task = asyncio.create_task(self._run(), name="stream-state-writer")

    async def stop(self) -> None:
        if self._soon_handle is not None:
            self._soon_handle.cancel()
            self._soon_handle = None
        tasks = [t for t in (self._task, self._connecting) if t is not None]
        if tasks:
            # The flag as well as the cancel: on Python 3.11.2 a cancel that lands as a timeout
            # expires can come out as TimeoutError, and the loop would go on.
            self._stopping = True
            await stop_tasks(tasks, what="stream-state writer")
            self._task = self._connecting = None
        if self._wire is not None:
            await self._wire.aclose()

    async def _run(self) -> None:
        """Every interval: the streams that grew, the writes to retry; a connection that is lost or
        unanswered for ``op_timeout_s`` is closed and opened again."""
        interval_s = self.config.state_write_interval_ms / 1000.0
        self._connect_soon()
        while not self._stopping:
            await asyncio.sleep(interval_s)
            try:
                self._tick()
            except Exception as e:  # noqa: BLE001 - the next tick tries again
                log.debug("stream state tick failed: %s", e)

    def _tick(self) -> None:
        wire = self._wire
        assert wire is not None
        now = time.monotonic()
        oldest = wire.oldest_unanswered_s()
        if oldest is not None and now - oldest > self.op_timeout_s:
            log.warning("Redis left the stream state's writes unanswered for %.1f s: reconnecting", now - oldest)
            wire.abort(TimeoutError("Redis did not answer in time"))
        # a stream written (as it opened) less than half an interval ago waits for the next tick
        recent = now - self.config.state_write_interval_ms / 2000.0
        todo, self._retry = self._retry, []
        todo += [r for r in self._running.values() if r.num_written != len(r.token_ids) and r.written_s <= recent]
        if not wire.connected:
            self._connect_soon()
            self._failed(todo)
            return
        self._send(todo)

    def _connect_soon(self) -> None:
        if self._connecting is None and not self._stopping:
            self._connecting = asyncio.create_task(self._connect(), name="stream-state-connect")

    async def _connect(self) -> None:
        assert self._wire is not None
        try:
            await self._wire.connect()
        except Exception as e:  # noqa: BLE001 - counted as the writes fail; the next tick tries again
            log.debug("stream state connection to Redis failed: %s", e)
        finally:
            self._connecting = None
        if self._wire.connected:  # what is owed (opened, or failed while it was down), at once
            on_open = self.config.state_write_on_open
            todo, self._retry = self._retry, []
            self._send(todo + [r for r in self._running.values()
                               if r.num_written != len(r.token_ids) and (on_open or r.written_s)])

    def _send(self, records: list[StreamRecord]) -> None:
        """One pipeline, sent now: ``records`` whole (each once), with the tokens they have."""
        ttl_ms = self.config.state_ttl_s * 1000
        body_ttl_ms = ttl_ms + int(self.body_extra_ttl_s * 1000)
        items: list[tuple[bytes, bytes, int]] = []
        sent: list[StreamRecord] = []
        now = time.monotonic()
        seen: set[int] = set()
        for rec in records:
            if id(rec) in seen or (rec.finished and rec.num_written < 0) or not rec.writable:
                continue  # an opened stream that finished before its first write needs none (see close())
            seen.add(id(rec))
            n = len(rec.token_ids)
            inline = rec.body_json if len(rec.body_json) <= INLINE_BODY_MAX_BYTES else b""
            try:
                blob = rec.state_blob(n, inline)
            except (OverflowError, TypeError) as e:  # ids no uint32 holds: this stream only, once
                log.warning("stream %s cannot be written: %s", rec.request_id, e)
                self._error.inc()
                rec.writable = False
                continue
            if not inline and rec.num_written < 0:
                items.append((self.body_key(rec.request_id).encode(), rec.body_json, body_ttl_ms))
            items.append((self.key(rec.request_id).encode(), blob, ttl_ms))
            sent.append(rec)
            rec.num_written, rec.written_s = n, now  # not again before the next interval
        if not items:
            return
        assert self._wire is not None
        if not self._wire.send(items, functools.partial(self._sent, sent)):
            self._connect_soon()
            self._failed(sent)

    def _sent(self, records: list[StreamRecord], exc: BaseException | None, errors: list[str]) -> None:
        if exc is None and not errors:
            self._ok.inc(len(records))
            return
        log.debug("stream state write failed: %s", exc if exc is not None else errors[0])
        self._failed(records)

    def _failed(self, records: list[StreamRecord]) -> None:
        """Writes that did not reach Redis: the running streams are written whole at the next tick,
        the ended ones kept for it (bounded: more are dropped and counted)."""
        if not records:
            return
        self._error.inc(len(records))
        retry = []
        for rec in records:
            rec.num_written = -1
            if rec.ended_s and not rec.finished:
                retry.append(rec)
        room = self.config.state_queue_max - len(self._retry)
        if len(retry) > room:
            self._dropped.inc(len(retry) - max(0, room))
            retry = retry[:max(0, room)]
        self._retry += retry
