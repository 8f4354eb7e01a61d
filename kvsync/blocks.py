"""Cutting a snapshot into content-addressed blocks, and putting a session back together.

Pure CPU work (no I/O): the sidecar runs it on a worker thread so its event loop never blocks.

A block holds ``block_tokens`` tokens (the last block of a session may hold fewer) of every
layer's K and V, laid out ``[num_layers, 2, num_kv_heads, num_tokens, head_dim]`` and optionally
compressed. Its key chains the previous block's key, its token ids and the identity, so a block
stands for exactly one prefix of one model's KV, and a later turn re-sends only its new blocks.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import Iterable, Sequence

import torch

from kvsync.protocol import (
    DTYPES,
    BlockRef,
    Manifest,
    block_hash,
    dtype_name,
    identity_root,
    tensor_bytes,
    tensor_from_bytes,
)
from unbroken.contract.kv import KVIdentity, KVSnapshot

try:  # optional, faster than zlib when installed
    import lz4.frame as _lz4
except ImportError:  # pragma: no cover - depends on the environment
    _lz4 = None

COMPRESSIONS = ("none", "zlib", "lz4")


class BadData(ValueError):
    """Data in Redis that must not be imported; ``reason`` labels the metric."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def compression_available(name: str) -> bool:
    return name in ("none", "zlib") or (name == "lz4" and _lz4 is not None)


def compress(raw: bytes | memoryview, method: str, level: int) -> bytes:
    if method == "none":
        return bytes(raw)
    if method == "zlib":
        return zlib.compress(raw, level)
    if method == "lz4" and _lz4 is not None:
        return _lz4.compress(raw, compression_level=level)
    raise ValueError(f"compression {method!r} is not available")


def decompress(stored: bytes, method: str) -> bytes:
    if method == "none":
        return stored
    try:
        if method == "zlib":
            return zlib.decompress(stored)
        if method == "lz4" and _lz4 is not None:
            return _lz4.decompress(stored)
    except Exception as e:  # noqa: BLE001 - any codec failure is bad data
        raise BadData("decompress", f"block does not decompress with {method}: {e}") from None
    raise BadData("compression", f"compression {method!r} is not available here")


@dataclass
class Block:
    ref: BlockRef
    data: bytes  # as stored in Redis


def split_blocks(snapshot: KVSnapshot, block_tokens: int, base: Sequence[BlockRef],
                 compression: str = "none", level: int = 1) -> list[Block]:
    """The blocks of ``snapshot.token_ids[snapshot.start:]``.

    ``base`` is the session's chain up to ``start`` (full blocks); the first new block chains from
    its last key. ``start`` must be a multiple of ``block_tokens`` and ``len(base) ==
    start // block_tokens``.
    """
    start, n = snapshot.start, len(snapshot.token_ids)
    if start % block_tokens or len(base) != start // block_tokens:
        raise ValueError(f"start {start} does not line up with {len(base)} base blocks of {block_tokens}")
    root = identity_root(snapshot.identity)
    prev = base[-1].key if base else root
    keys, values = snapshot.keys, snapshot.values
    blocks: list[Block] = []
    for lo in range(start, n, block_tokens):
        hi = min(lo + block_tokens, n)
        block_ids = list(snapshot.token_ids[lo:hi])
        parts = []
        for k, v in zip(keys, values):
            parts.append(tensor_bytes(k[:, lo - start:hi - start, :]))
            parts.append(tensor_bytes(v[:, lo - start:hi - start, :]))
        raw = b"".join(parts)
        stored = compress(raw, compression, level)
        key = block_hash(prev, block_ids, root)
        blocks.append(Block(BlockRef(key=key, num_tokens=hi - lo, stored_bytes=len(stored),
                                     raw_bytes=len(raw), crc32=zlib.crc32(stored)), stored))
        prev = key
    return blocks


def chain_keys(identity: KVIdentity, token_ids: Sequence[int], block_tokens: int) -> list[str]:
    """The block keys a session's ``token_ids`` would have (for checks and tests)."""
    root = identity_root(identity)
    prev, out = root, []
    for lo in range(0, len(token_ids), block_tokens):
        prev = block_hash(prev, list(token_ids[lo:lo + block_tokens]), root)
        out.append(prev)
    return out


def assemble(manifest: Manifest, stored: Iterable[bytes | bytearray | None],
             out: torch.Tensor | None = None) -> KVSnapshot:
    """A full snapshot (``start = 0``) from a manifest and its blocks' stored bytes, which may be
    an iterator that yields each block as it arrives from Redis.

    Checks every block's presence, length, checksum, chain key, decompressed size (dtype x
    shape); raises :class:`BadData` with the first problem found. The tensors are written into
    ``out`` (``[layers, 2, kv_heads, tokens, head_dim]``, for example over a shared-memory file)
    when given, else into a new tensor; the snapshot's keys and values are views of it.
    """
    ident = manifest.identity
    if manifest.dtype != ident.dtype or manifest.dtype not in DTYPES:
        raise BadData("dtype", f"manifest dtype {manifest.dtype!r} differs from its identity's {ident.dtype!r}")
    dtype = DTYPES[manifest.dtype]
    expected_keys = chain_keys(ident, manifest.token_ids, manifest.block_tokens)
    L, H, D = ident.num_layers, ident.num_kv_heads, ident.head_dim
    n = len(manifest.token_ids)
    if out is None:
        out = torch.empty((L, 2, H, n, D), dtype=dtype)
    elif tuple(out.shape) != (L, 2, H, n, D) or out.dtype != dtype:
        raise ValueError(f"out is {tuple(out.shape)} {out.dtype}, the manifest needs {(L, 2, H, n, D)} {dtype}")
    itemsize = out.element_size()
    blocks = iter(stored)
    lo = 0
    for i, ref in enumerate(manifest.blocks):
        data = next(blocks, _END)
        if data is _END:
            raise BadData("missing_block", "fewer blocks than the manifest names")
        if ref.key != expected_keys[i]:
            raise BadData("chain", f"block {i} key does not match the session's token ids")
        if data is None:
            raise BadData("missing_block", f"block {i} ({ref.key}) is missing")
        if len(data) != ref.stored_bytes:
            raise BadData("truncated", f"block {i} has {len(data)} bytes, manifest says {ref.stored_bytes}")
        if zlib.crc32(data) != ref.crc32:
            raise BadData("checksum", f"block {i} checksum mismatch")
        raw = decompress(data, manifest.compression)
        want = L * 2 * H * ref.num_tokens * D * itemsize
        if len(raw) != want or ref.raw_bytes != want:
            raise BadData("shape", f"block {i} holds {len(raw)} bytes; {(L, 2, H, ref.num_tokens, D)} "
                                   f"{manifest.dtype} needs {want}")
        out[:, :, :, lo:lo + ref.num_tokens, :] = tensor_from_bytes(raw, dtype, (L, 2, H, ref.num_tokens, D))
        lo += ref.num_tokens
        del data, raw
    if next(blocks, _END) is not _END:
        raise BadData("missing_block", "more blocks than the manifest names")
    return KVSnapshot(session_id=manifest.session_id, identity=ident, token_ids=list(manifest.token_ids),
                      keys=[out[i, 0] for i in range(L)], values=[out[i, 1] for i in range(L)],
                      start=0, transcript=manifest.transcript)


_END = object()


def snapshot_dtype(snapshot: KVSnapshot) -> str:
    return dtype_name(snapshot.keys[0].dtype) if snapshot.keys else snapshot.identity.dtype
