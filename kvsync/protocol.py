"""What crosses kvsync's boundaries, defined once.

- replica -> sidecar (``POST /v1/sessions/{id}/snapshots``) and the replica's own
  ``GET/PUT /v1/sessions/{id}/kv``: a :class:`~unbroken.contract.kv.KVSnapshot` in the binary wire
  form of :func:`encode_snapshot` / :func:`decode_snapshot`. The sidecar answers with a
  :class:`PublishReply` (JSON).
- replica -> sidecar (``POST /v1/sessions/{id}/fetch``): a :class:`FetchRequest` (JSON). The
  answer is either the restored snapshot in the wire form (``X-KVSync-Outcome: restored``) or a
  :class:`FetchReply` (JSON) saying why there is none, with the transcript when one is known.
- sidecar -> Redis: content-addressed blocks and one :class:`Manifest` per session (JSON).

Wire form of a snapshot (all integers little-endian)::

    b"UBKVSNAP" | u32 version | u32 header_len | header (JSON) | payload

The header holds the session id, identity, token ids, ``start``, transcript, the tensors'
dtype and dimensions, and the payload's length and CRC-32. The payload is, for each layer in
order, K then V, each ``[num_kv_heads, len(token_ids) - start, head_dim]`` contiguous. The header
is padded with spaces so that the payload starts at a multiple of 64 bytes. A snapshot handed
over in a shared-memory file (a restore on the same host) has the same form, with a null CRC: the
sidecar checked every block it was assembled from, and nothing crossed a wire since.
"""

from __future__ import annotations

import hashlib
import mmap
import struct
import warnings
import zlib
from dataclasses import dataclass, field
from typing import Any

import orjson
import torch

from unbroken.contract.kv import KVIdentity, KVSnapshot

MAGIC = b"UBKVSNAP"
WIRE_VERSION = 1
MANIFEST_VERSION = 1
_PREFIX = struct.Struct("<8sII")
MAX_HEADER_BYTES = 64 * 1024 * 1024
PAYLOAD_ALIGN = 64

# dtype names as they appear in KVIdentity.dtype and the wire header.
DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,
}

CONTENT_TYPE_SNAPSHOT = "application/x-unbroken-kv-snapshot"
OUTCOME_HEADER = "X-KVSync-Outcome"
OUTCOMES = ("restored", "missing", "mismatch", "corrupt", "timeout", "error")


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def tensor_bytes(t: torch.Tensor) -> memoryview:
    """The raw bytes of a CPU tensor (made contiguous), without another copy."""
    t = t.detach()
    if t.device.type != "cpu":
        t = t.to("cpu")
    t = t.contiguous()
    return memoryview(t.view(torch.uint8).numpy()).cast("B")


def tensor_from_bytes(data: bytes | bytearray | memoryview, dtype: torch.dtype,
                      shape: tuple[int, ...]) -> torch.Tensor:
    """A tensor over ``data`` (no copy; read-only data gives a tensor that must not be written)."""
    if len(data) == 0:
        return torch.empty(shape, dtype=dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # non-writable buffers are only read here
        flat = torch.frombuffer(data, dtype=torch.uint8)
    return flat.view(dtype).reshape(shape)


# -- snapshot wire form --------------------------------------------------------------------------------

def encode_snapshot(snapshot: KVSnapshot) -> bytes:
    """The binary wire form of ``snapshot`` (see the module docstring)."""
    return b"".join(encode_snapshot_parts(snapshot))


def encode_snapshot_parts(snapshot: KVSnapshot) -> list[bytes | memoryview]:
    """The wire form as a list of buffers (prefix+header, then one per tensor, not copied), for
    senders that write them one by one instead of joining them."""
    num_layers = len(snapshot.keys)
    if num_layers == 0 or len(snapshot.values) != num_layers:
        raise ValueError("a snapshot needs the same number (>0) of key and value layers")
    first = snapshot.keys[0]
    heads, num_tokens, head_dim = (int(x) for x in first.shape)
    if num_tokens != len(snapshot.token_ids) - snapshot.start:
        raise ValueError(f"tensors cover {num_tokens} tokens; token_ids[start:] has "
                         f"{len(snapshot.token_ids) - snapshot.start}")
    parts: list[memoryview] = []
    crc = 0
    for layer in range(num_layers):
        for t in (snapshot.keys[layer], snapshot.values[layer]):
            if tuple(t.shape) != (heads, num_tokens, head_dim) or t.dtype != first.dtype:
                raise ValueError(f"layer {layer}: tensor {tuple(t.shape)} {t.dtype} differs from "
                                 f"{(heads, num_tokens, head_dim)} {first.dtype}")
            mv = tensor_bytes(t)
            crc = zlib.crc32(mv, crc)
            parts.append(mv)
    head = snapshot_head(snapshot, dtype_name(first.dtype), (num_layers, heads, head_dim),
                         sum(len(p) for p in parts), crc)
    return [head, *parts]


def snapshot_head(snapshot: KVSnapshot, dtype: str, dims: tuple[int, int, int], payload_bytes: int,
                  payload_crc32: int | None) -> bytes:
    """Prefix and header of a snapshot's wire form, for tensors of ``dims`` = (layers, kv_heads,
    head_dim) (``snapshot.keys`` is not read), padded so that the payload is 64-byte aligned."""
    num_layers, heads, head_dim = dims
    header = orjson.dumps({
        "session_id": snapshot.session_id,
        "identity": snapshot.identity.to_dict(),
        "token_ids": list(snapshot.token_ids),
        "start": snapshot.start,
        "transcript": snapshot.transcript,
        "dtype": dtype,
        "num_layers": num_layers,
        "num_kv_heads": heads,
        "num_tokens": len(snapshot.token_ids) - snapshot.start,
        "head_dim": head_dim,
        "payload_bytes": payload_bytes,
        "payload_crc32": payload_crc32,
    })
    header += b" " * (-(_PREFIX.size + len(header)) % PAYLOAD_ALIGN)
    return _PREFIX.pack(MAGIC, WIRE_VERSION, len(header)) + header


def decode_snapshot(data: bytes | bytearray | memoryview | mmap.mmap, require_checksum: bool = True) -> KVSnapshot:
    """Parse the wire form. Raises ``ValueError`` on anything truncated, corrupt or inconsistent.

    The tensors are views over ``data`` (no copy); pass a ``bytearray`` when they will be written.
    ``require_checksum=False`` accepts a snapshot without a payload CRC (a local hand-off).
    """
    mv = memoryview(data).cast("B")
    if len(mv) < _PREFIX.size:
        raise ValueError(f"snapshot of {len(mv)} bytes is shorter than its prefix")
    magic, version, header_len = _PREFIX.unpack_from(mv, 0)
    if magic != MAGIC:
        raise ValueError("not a kvsync snapshot (bad magic)")
    if version != WIRE_VERSION:
        raise ValueError(f"snapshot wire version {version} is not supported (want {WIRE_VERSION})")
    if header_len > MAX_HEADER_BYTES or _PREFIX.size + header_len > len(mv):
        raise ValueError("snapshot header is truncated")
    try:
        h = orjson.loads(bytes(mv[_PREFIX.size:_PREFIX.size + header_len]))
        identity = KVIdentity.from_dict(h["identity"])
        token_ids = [int(t) for t in h["token_ids"]]
        start = int(h["start"])
        dtype = DTYPES[str(h["dtype"])]
        num_layers, heads = int(h["num_layers"]), int(h["num_kv_heads"])
        num_tokens, head_dim = int(h["num_tokens"]), int(h["head_dim"])
        payload_bytes = int(h["payload_bytes"])
        payload_crc = None if h["payload_crc32"] is None else int(h["payload_crc32"])
        session_id = str(h["session_id"])
        transcript = h.get("transcript")
    except (orjson.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise ValueError(f"snapshot header is invalid: {e!r}") from None
    if min(num_layers, heads, head_dim) <= 0 or num_tokens < 0 or start < 0:
        raise ValueError("snapshot dimensions must be positive")
    if num_tokens != len(token_ids) - start:
        raise ValueError(f"snapshot covers {num_tokens} tokens but token_ids[start:] has "
                         f"{len(token_ids) - start}")
    if transcript is not None and not isinstance(transcript, list):
        raise ValueError("snapshot transcript must be a list of messages")
    itemsize = torch.empty((), dtype=dtype).element_size()
    per_tensor = heads * num_tokens * head_dim * itemsize
    if payload_bytes != 2 * num_layers * per_tensor:
        raise ValueError(f"payload of {payload_bytes} bytes does not fit {num_layers} layers of "
                         f"{(heads, num_tokens, head_dim)} {h['dtype']}")
    body = mv[_PREFIX.size + header_len:]
    if len(body) != payload_bytes:
        raise ValueError(f"snapshot payload is {len(body)} bytes, header says {payload_bytes} (truncated?)")
    if payload_crc is None:
        if require_checksum:
            raise ValueError("snapshot payload has no checksum")
    elif zlib.crc32(body) != payload_crc:
        raise ValueError("snapshot payload checksum mismatch")
    shape = (heads, num_tokens, head_dim)
    keys: list[torch.Tensor] = []
    values: list[torch.Tensor] = []
    offset = 0
    for _ in range(num_layers):
        for out in (keys, values):
            out.append(tensor_from_bytes(body[offset:offset + per_tensor], dtype, shape))
            offset += per_tensor
    return KVSnapshot(session_id=session_id, identity=identity, token_ids=token_ids, keys=keys,
                      values=values, start=start, transcript=transcript)


# -- block chain -----------------------------------------------------------------------------------------

def identity_root(identity: KVIdentity) -> str:
    """The hash a session's first block chains from: everything that makes KV incompatible."""
    return hashlib.blake2b(orjson.dumps(identity.to_dict(), option=orjson.OPT_SORT_KEYS),
                           digest_size=16).hexdigest()


def block_hash(prev_hash: str, token_ids: list[int], identity_root_hash: str) -> str:
    """``hash(prev_hash, block token ids, identity)``: equal prefixes give equal keys."""
    h = hashlib.blake2b(digest_size=16)
    h.update(prev_hash.encode())
    h.update(identity_root_hash.encode())
    h.update(struct.pack(f"<{len(token_ids)}q", *token_ids))
    return h.hexdigest()


@dataclass(frozen=True)
class BlockRef:
    """One block as a manifest names it: ``num_tokens`` tokens of every layer's K and V."""

    key: str  # the chained prefix hash; the Redis key is ``{prefix}:block:{store_id}``
    num_tokens: int
    stored_bytes: int  # bytes in Redis (after compression)
    raw_bytes: int  # bytes of the tensors
    crc32: int  # of the stored bytes

    @property
    def store_id(self) -> str:
        """The block's name in Redis: its chain key *and* its checksum. Two computations of the same
        prefix that are not bit-identical (another batch, another session) are two blocks, so a
        write never changes the bytes under another session's manifest; identical ones share."""
        return f"{self.key}.{self.crc32}"

    def to_dict(self) -> dict[str, Any]:
        return {"key": self.key, "num_tokens": self.num_tokens, "stored_bytes": self.stored_bytes,
                "raw_bytes": self.raw_bytes, "crc32": self.crc32}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "BlockRef":
        return cls(key=str(d["key"]), num_tokens=int(d["num_tokens"]),
                   stored_bytes=int(d["stored_bytes"]), raw_bytes=int(d["raw_bytes"]),
                   crc32=int(d["crc32"]))


@dataclass
class Manifest:
    """A session's newest complete snapshot in Redis (``{prefix}:manifest:{session_id}``).

    Written last, with one atomic SET, and only after every block it names exists.
    """

    session_id: str
    identity: KVIdentity
    token_ids: list[int]
    block_tokens: int
    dtype: str
    blocks: list[BlockRef]
    compression: str = "none"
    transcript: list[dict[str, Any]] | None = None
    created_at_s: float = 0.0
    version: int = MANIFEST_VERSION

    @property
    def stored_bytes(self) -> int:
        return sum(b.stored_bytes for b in self.blocks)

    def to_json(self) -> bytes:
        return orjson.dumps({
            "version": self.version,
            "session_id": self.session_id,
            "identity": self.identity.to_dict(),
            "token_ids": self.token_ids,
            "block_tokens": self.block_tokens,
            "dtype": self.dtype,
            "compression": self.compression,
            "blocks": [b.to_dict() for b in self.blocks],
            "transcript": self.transcript,
            "created_at_s": self.created_at_s,
        })

    @classmethod
    def from_json(cls, data: bytes | str) -> "Manifest":
        """Parse and check a manifest's own consistency; ``ValueError`` when it is bad."""
        try:
            d = orjson.loads(data)
            m = cls(
                session_id=str(d["session_id"]),
                identity=KVIdentity.from_dict(d["identity"]),
                token_ids=[int(t) for t in d["token_ids"]],
                block_tokens=int(d["block_tokens"]),
                dtype=str(d["dtype"]),
                compression=str(d.get("compression", "none")),
                blocks=[BlockRef.from_dict(b) for b in d["blocks"]],
                transcript=d.get("transcript"),
                created_at_s=float(d.get("created_at_s", 0.0)),
                version=int(d.get("version", 0)),
            )
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError) as e:
            raise ValueError(f"manifest is invalid: {e!r}") from None
        if m.version != MANIFEST_VERSION:
            raise ValueError(f"manifest version {m.version} is not supported")
        if m.dtype not in DTYPES:
            raise ValueError(f"manifest dtype {m.dtype!r} is unknown")
        if m.block_tokens <= 0 or sum(b.num_tokens for b in m.blocks) != len(m.token_ids):
            raise ValueError("manifest blocks do not cover its token ids")
        if any(b.num_tokens != m.block_tokens for b in m.blocks[:-1]) or (
                m.blocks and not 0 < m.blocks[-1].num_tokens <= m.block_tokens):
            raise ValueError("manifest blocks are not of block_tokens each (but the last)")
        if m.transcript is not None and not isinstance(m.transcript, list):
            raise ValueError("manifest transcript must be a list")
        return m


# -- sidecar HTTP messages ---------------------------------------------------------------------------------

@dataclass
class PublishReply:
    """The sidecar's answer to a published snapshot.

    ``status``: ``accepted`` (202), ``need_full`` (409: the sidecar does not hold the blocks an
    incremental snapshot builds on; send one from token 0), ``busy`` (503: its queue is full;
    send a full snapshot later), ``too_large`` (413: larger than the sidecar keeps; later, larger
    snapshots of the session would be refused too), ``invalid`` (400).
    """

    status: str
    message: str = ""
    num_new_blocks: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {"status": self.status, "message": self.message, "num_new_blocks": self.num_new_blocks}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "PublishReply":
        return cls(status=str(d.get("status", "")), message=str(d.get("message", "")),
                   num_new_blocks=int(d.get("num_new_blocks", 0)))


HANDOFFS = ("http", "shm")


@dataclass
class FetchRequest:
    """Ask for a session's newest snapshot whose identity is ``identity``.

    ``handoff``: ``http`` (the snapshot comes back as the response body) or ``shm`` (the replica
    runs on the sidecar's host and can open a shared-memory file: the sidecar may answer with a
    :class:`FetchReply` naming one instead; it falls back to the body when it cannot make one).
    """

    identity: KVIdentity
    handoff: str = "http"

    def to_json(self) -> bytes:
        return orjson.dumps({"identity": self.identity.to_dict(), "handoff": self.handoff})

    @classmethod
    def from_json(cls, data: bytes) -> "FetchRequest":
        try:
            d = orjson.loads(data)
            handoff = str(d.get("handoff", "http"))
            if handoff not in HANDOFFS:
                raise ValueError(f"handoff must be one of {HANDOFFS}, got {handoff!r}")
            return cls(identity=KVIdentity.from_dict(d["identity"]), handoff=handoff)
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError) as e:
            raise ValueError(f"fetch request is invalid: {e!r}") from None


@dataclass
class FetchReply:
    """Why there is no snapshot to restore (``outcome`` other than ``restored``), or, for a
    ``restored`` snapshot handed over in shared memory, the file that holds it in wire form
    (``handoff_path``, ``handoff_bytes`` long; the replica maps it and unlinks it)."""

    outcome: str
    message: str = ""
    transcript: list[dict[str, Any]] | None = field(default=None)
    handoff_path: str | None = None
    handoff_bytes: int = 0

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"outcome": self.outcome, "message": self.message, "transcript": self.transcript}
        if self.handoff_path is not None:
            d.update(handoff_path=self.handoff_path, handoff_bytes=self.handoff_bytes)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "FetchReply":
        outcome = str(d.get("outcome", "error"))
        transcript = d.get("transcript")
        path = d.get("handoff_path")
        return cls(outcome=outcome if outcome in OUTCOMES else "error", message=str(d.get("message", "")),
                   transcript=transcript if isinstance(transcript, list) else None,
                   handoff_path=path if isinstance(path, str) else None,
                   handoff_bytes=int(d.get("handoff_bytes", 0) or 0))
