"""kvsync's Redis layout and every Redis command it sends (redis-py asyncio).

Keys (``P`` = ``redis.key_prefix``, default ``unbroken:kv``)::

    P:block:{id}          block bytes; id = BlockRef.store_id = chain key + "." + crc32, so equal
                          prefixes share a block only when their bytes are equal (TTL = ttl_s + grace)
    P:ref:{id}            how many manifests name the block (same TTL as the block)
    P:manifest:{session}  the session's Manifest (JSON; TTL = ttl_s), written last
    P:lru                 sorted set: session -> last use (ms since the epoch)
    P:bytes               hash: session -> bytes its manifest names
    P:total               bytes named by all manifests (what the memory cap limits)

Writing a snapshot is: SET each new block (``PX``), then one Lua script (atomic in Redis) that
checks that every block the manifest names exists, adjusts reference counts, SETs the manifest,
and evicts least recently used sessions while ``P:total`` exceeds the cap (a victim's manifest
goes first, then each of its blocks that no other manifest names). The same script first drops
from the index sessions whose manifest expired (TTL), so ``P:total`` counts only live sessions.
A writer killed between the
two steps leaves only orphan blocks, which expire; a manifest never names a missing block, short of
TTL expiry, which the reader detects. The layout assumes one Redis (not Redis Cluster).
"""

from __future__ import annotations

import asyncio
import queue
import socket
import time
import urllib.parse
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError, RedisError

from kvsync.blocks import BadData, Block
from kvsync.config import RedisSection, StoreSection
from kvsync.protocol import Manifest
from unbroken.resp import encode_command, setup_commands

# Blocks outlive their manifest by this much, so a manifest read just before it expires does not
# find its blocks already gone.
BLOCK_TTL_GRACE_MS = 60_000
PIPELINE_BYTES = 4 * 1024 * 1024

_EVICT = """
local function store_id(b)
  return b.key .. '.' .. string.format('%d', b.crc32)
end
local function evict(p, v, lru, bytes_key, total_key)
  local mk = p .. ':manifest:' .. v
  local m = redis.call('GET', mk)
  if m then
    local ok, d = pcall(cjson.decode, m)
    if ok and type(d) == 'table' and type(d.blocks) == 'table' then
      for _, b in ipairs(d.blocks) do
        if type(b) == 'table' and type(b.key) == 'string' and type(b.crc32) == 'number' then
          local h = store_id(b)
          local n = redis.call('DECR', p .. ':ref:' .. h)
          if n <= 0 then redis.call('DEL', p .. ':ref:' .. h, p .. ':block:' .. h) end
        end
      end
    end
    redis.call('DEL', mk)
  end
  local nb = tonumber(redis.call('HGET', bytes_key, v) or '0') or 0
  redis.call('HDEL', bytes_key, v)
  redis.call('ZREM', lru, v)
  redis.call('DECRBY', total_key, nb)
end
"""

# KEYS: manifest, lru, bytes, total.
# ARGV: prefix, session, manifest json, manifest ttl ms, block ttl ms, now ms, session bytes, cap bytes,
#       then the store ids (``BlockRef.store_id``) of the blocks the manifest names, in order.
COMMIT_SCRIPT = _EVICT + """
local p, sid = ARGV[1], ARGV[2]
local ttl, block_ttl = tonumber(ARGV[4]), tonumber(ARGV[5])
local first = 9
local missing = {}
for i = first, #ARGV do
  if redis.call('EXISTS', p .. ':block:' .. ARGV[i]) == 0 then table.insert(missing, ARGV[i]) end
end
if #missing > 0 then return {0, missing, {}, 0, {}} end
local oldset = {}
local old = redis.call('GET', KEYS[1])
if old then
  local ok, d = pcall(cjson.decode, old)
  if ok and type(d) == 'table' and type(d.blocks) == 'table' then
    for _, b in ipairs(d.blocks) do
      if type(b) == 'table' and type(b.key) == 'string' and type(b.crc32) == 'number' then
        oldset[store_id(b)] = true
      end
    end
  end
end
local newset = {}
for i = first, #ARGV do
  local h = ARGV[i]
  if not newset[h] then
    newset[h] = true
    if not oldset[h] then redis.call('INCR', p .. ':ref:' .. h) end
    redis.call('PEXPIRE', p .. ':block:' .. h, block_ttl)
    redis.call('PEXPIRE', p .. ':ref:' .. h, block_ttl)
  end
end
for h, _ in pairs(oldset) do
  if not newset[h] then
    local n = redis.call('DECR', p .. ':ref:' .. h)
    if n <= 0 then redis.call('DEL', p .. ':ref:' .. h, p .. ':block:' .. h) end
  end
end
redis.call('SET', KEYS[1], ARGV[3], 'PX', ttl)
local oldbytes = tonumber(redis.call('HGET', KEYS[3], sid) or '0') or 0
redis.call('HSET', KEYS[3], sid, ARGV[7])
redis.call('INCRBY', KEYS[4], tonumber(ARGV[7]) - oldbytes)
redis.call('ZADD', KEYS[2], ARGV[6], sid)
-- Sessions unused for longer than the manifest TTL whose manifest is gone: expired, not evicted.
-- Drop them from the accounting (a few per commit, so the script stays short).
local expired = {}
local stale = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', '(' .. (tonumber(ARGV[6]) - ttl), 'LIMIT', 0, 32)
for _, v in ipairs(stale) do
  if v ~= sid and redis.call('EXISTS', p .. ':manifest:' .. v) == 0 then
    evict(p, v, KEYS[2], KEYS[3], KEYS[4])
    table.insert(expired, v)
  end
end
local evicted = {}
local cap = tonumber(ARGV[8])
if cap > 0 then
  for _ = 1, 100000 do
    if (tonumber(redis.call('GET', KEYS[4]) or '0') or 0) <= cap then break end
    local victims = redis.call('ZRANGE', KEYS[2], 0, 1)
    local v = victims[1]
    if v == sid then v = victims[2] end
    if not v then break end
    evict(p, v, KEYS[2], KEYS[3], KEYS[4])
    table.insert(evicted, v)
  end
end
for i = 2, 4 do redis.call('PEXPIRE', KEYS[i], block_ttl) end
return {1, {}, evicted, tonumber(redis.call('GET', KEYS[4]) or '0') or 0, expired}
"""

# KEYS: manifest, lru, bytes, total. ARGV: prefix, session.
DELETE_SCRIPT = _EVICT + """
evict(ARGV[1], ARGV[2], KEYS[2], KEYS[3], KEYS[4])
return 1
"""


@dataclass
class CommitResult:
    committed: bool
    missing: list[str] = field(default_factory=list)  # store ids of blocks that were not in Redis
    evicted: list[str] = field(default_factory=list)  # sessions evicted by the memory cap
    expired: list[str] = field(default_factory=list)  # sessions whose manifest had expired, now unindexed
    total_bytes: int = 0


class KVStore:
    """All of kvsync's Redis I/O. Raises redis-py's errors; callers decide about retries."""

    def __init__(self, redis_cfg: RedisSection, store_cfg: StoreSection, mac_secret: str = "") -> None:
        self.cfg = redis_cfg
        self.store_cfg = store_cfg
        self.mac_secret = mac_secret.encode()  # keys the MAC of every block and manifest
        self.prefix = redis_cfg.key_prefix
        self.redis = aioredis.Redis.from_url(
            redis_cfg.url,
            socket_timeout=redis_cfg.socket_timeout_s,
            socket_connect_timeout=redis_cfg.connect_timeout_s,
            retry=Retry(NoBackoff(), 0),
            health_check_interval=0,
        )
        self._commit = self.redis.register_script(COMMIT_SCRIPT)
        self._delete = self.redis.register_script(DELETE_SCRIPT)

    async def close(self) -> None:
        await self.redis.aclose()

    # -- keys ----------------------------------------------------------------------------------------------
    def block_key(self, store_id: str) -> str:
        return f"{self.prefix}:block:{store_id}"

    def manifest_key(self, session_id: str) -> str:
        return f"{self.prefix}:manifest:{session_id}"

    @property
    def _index_keys(self) -> list[str]:
        return [f"{self.prefix}:lru", f"{self.prefix}:bytes", f"{self.prefix}:total"]

    @property
    def manifest_ttl_ms(self) -> int:
        return max(1, int(self.store_cfg.ttl_s * 1000))

    @property
    def block_ttl_ms(self) -> int:
        return self.manifest_ttl_ms + BLOCK_TTL_GRACE_MS

    # -- writes --------------------------------------------------------------------------------------------
    async def put_blocks(self, blocks: Sequence[Block]) -> None:
        """SET each block with its TTL, in pipelines of at most ``PIPELINE_BYTES`` (no
        transaction: blocks are idempotent). Small pipelines keep the event loop responsive: the
        socket write of one pipeline is a single synchronous buffer copy."""
        batch: list[Block] = []
        size = 0
        for b in blocks:
            batch.append(b)
            size += len(b.data)
            if size >= PIPELINE_BYTES:
                await self._set_blocks(batch)
                batch, size = [], 0
        if batch:
            await self._set_blocks(batch)

    async def _set_blocks(self, blocks: Sequence[Block]) -> None:
        async with self.redis.pipeline(transaction=False) as pipe:
            for b in blocks:
                pipe.set(self.block_key(b.ref.store_id), b.data, px=self.block_ttl_ms)
            await pipe.execute()

    async def commit(self, manifest: Manifest, now_ms: int | None = None) -> CommitResult:
        """Atomically SET ``manifest`` if every block it names exists; evict LRU sessions past the cap."""
        body = manifest.to_json(self.mac_secret)
        session_bytes = manifest.stored_bytes + len(body)
        res = await self._commit(
            keys=[self.manifest_key(manifest.session_id), *self._index_keys],
            args=[self.prefix, manifest.session_id, body, self.manifest_ttl_ms, self.block_ttl_ms,
                  now_ms if now_ms is not None else int(time.time() * 1000), session_bytes,
                  self.store_cfg.max_memory_bytes, *[b.store_id for b in manifest.blocks]],
        )
        ok, missing, evicted, total, expired = res
        return CommitResult(committed=bool(int(ok)), missing=[_s(m) for m in missing],
                            evicted=[_s(e) for e in evicted], total_bytes=int(total),
                            expired=[_s(e) for e in expired])

    async def delete_session(self, session_id: str) -> None:
        await self._delete(keys=[self.manifest_key(session_id), *self._index_keys],
                           args=[self.prefix, session_id])

    async def touch(self, session_id: str, now_ms: int | None = None) -> None:
        """Mark a session used (for LRU eviction) without rewriting it."""
        await self.redis.zadd(f"{self.prefix}:lru",
                              {session_id: now_ms if now_ms is not None else int(time.time() * 1000)}, xx=True)

    # -- reads ---------------------------------------------------------------------------------------------
    async def read_manifest(self, session_id: str) -> bytes | None:
        return await self.redis.get(self.manifest_key(session_id))

    async def read_blocks(self, block_hashes: Sequence[str], batch_size: int = 16) -> list[bytes | bytearray | None]:
        """GET the blocks. Over plain ``redis://`` this is a worker thread reading pipelined GET
        replies straight into their buffers (about twice redis-py's speed for multi-MB values, and
        the event loop does none of it); otherwise MGET in batches."""
        if not block_hashes:
            return []
        reader = self.block_reader(block_hashes)
        if reader is not None:
            return await asyncio.to_thread(list, reader)
        out: list[bytes | bytearray | None] = []
        for i in range(0, len(block_hashes), batch_size):
            out.extend(await self.redis.mget([self.block_key(h) for h in block_hashes[i:i + batch_size]]))
        return out

    def block_reader(self, block_hashes: Sequence[str], free: "queue.SimpleQueue[bytearray] | None" = None,
                     max_value_bytes: int | None = None) -> Iterator[bytearray | None] | None:
        """A blocking iterator over the blocks' bytes, each yielded as soon as it has arrived (for
        a worker thread that checks one block while the next is read), or None where the URL is not
        plain ``redis://`` (use :meth:`read_blocks`). Buffers put on ``free`` are read into again.
        A value longer than ``max_value_bytes`` raises :class:`~kvsync.blocks.BadData` before any buffer is
        made for it."""
        url = urllib.parse.urlsplit(self.cfg.url)
        if url.scheme != "redis":
            return None
        return _iter_get(url, [self.block_key(h) for h in block_hashes], self.cfg.connect_timeout_s,
                         self.cfg.socket_timeout_s, free, max_value_bytes)

    async def total_bytes(self) -> int:
        return int(await self.redis.get(f"{self.prefix}:total") or 0)

    async def ping(self) -> bool:
        return bool(await self.redis.ping())


def _iter_get(url: urllib.parse.SplitResult, keys: Sequence[str], connect_timeout_s: float,
              socket_timeout_s: float, free: "queue.SimpleQueue[bytearray] | None" = None,
              max_value_bytes: int | None = None) -> Iterator[bytearray | None]:
    """Pipelined GETs on a blocking socket; each value is read into a buffer (no copies) and
    yielded as it arrives. A buffer of the right size on ``free`` is used again instead of a new
    one: a restore then touches a few blocks' worth of fresh memory, not the whole session's.
    Closing the iterator early closes the connection."""

    # As redis-py does: the URL's user and password are percent-encoded.
    setup = setup_commands(urllib.parse.unquote(url.username) if url.username else None,
                           urllib.parse.unquote(url.password) if url.password is not None else None,
                           (url.path or "/0").lstrip("/") or "0")
    with socket.create_connection((url.hostname or "127.0.0.1", url.port or 6379), timeout=connect_timeout_s) as sock:
        sock.settimeout(socket_timeout_s)
        sock.sendall(b"".join(setup + [encode_command("GET", k) for k in keys]))
        with sock.makefile("rb") as f:
            for _ in setup:
                line = f.readline()
                if not line.startswith(b"+"):
                    raise RedisError(f"Redis refused the connection set-up: {line!r}")
            for _ in keys:
                line = f.readline()
                if not line.endswith(b"\r\n"):
                    raise ConnectionError("Redis closed the connection mid-reply")
                if line.startswith(b"-"):
                    raise RedisError(line[1:-2].decode(errors="replace"))
                if not line.startswith(b"$"):
                    raise RedisError(f"unexpected Redis reply {line[:40]!r}")
                n = int(line[1:-2])
                if n < 0:
                    yield None
                    continue
                if max_value_bytes is not None and n > max_value_bytes:
                    raise BadData("too_large", f"a value of {n} bytes in Redis exceeds the {max_value_bytes} expected")
                buf = _reuse(free, n)
                if f.readinto(memoryview(buf)) != n or f.read(2) != b"\r\n":
                    raise ConnectionError("Redis closed the connection mid-value")
                yield buf


def _reuse(free: "queue.SimpleQueue[bytearray] | None", n: int) -> bytearray:
    while free is not None:
        try:
            buf = free.get_nowait()
        except queue.Empty:
            break
        if len(buf) == n:
            return buf
    return bytearray(n)


def _s(x: bytes | str) -> str:
    return x.decode() if isinstance(x, bytes) else str(x)
