"""Cutting snapshots into chained blocks and assembling them back, with every check firing."""

from __future__ import annotations

import zlib

import pytest
import torch

from kvsync.blocks import BadData, assemble, chain_keys, check_manifest_sizes, decompress, split_blocks
from kvsync.protocol import BlockRef, Manifest, block_mac, tensor_bytes
from replica.protocol import KVIdentity, KVSnapshot

IDENT = KVIdentity("qwen", "rev1", None, "float32", 2, 2, 4)
B = 8


def _full(n: int, seed: int = 0, ident: KVIdentity = IDENT) -> KVSnapshot:
    g = torch.Generator().manual_seed(seed)
    shape = (ident.num_kv_heads, n, ident.head_dim)
    return KVSnapshot("s1", ident, [(i * 31 + seed) % 1000 for i in range(n)],
                      [torch.randn(shape, generator=g) for _ in range(ident.num_layers)],
                      [torch.randn(shape, generator=g) for _ in range(ident.num_layers)])


def _manifest(snap: KVSnapshot, blocks, compression: str = "none") -> Manifest:
    return Manifest(snap.session_id, snap.identity, list(snap.token_ids), B, snap.identity.dtype,
                    [b.ref for b in blocks], compression=compression)


@pytest.mark.parametrize("n", [1, 7, 8, 9, 24, 29])
@pytest.mark.parametrize("compression", ["none", "zlib"])
def test_split_then_assemble_is_exact(n: int, compression: str) -> None:
    snap = _full(n)
    blocks = split_blocks(snap, B, [], compression)
    assert [b.ref.num_tokens for b in blocks] == [min(B, n - i) for i in range(0, n, B)]
    assert [b.ref.key for b in blocks] == chain_keys(IDENT, snap.token_ids, B)
    back = assemble(_manifest(snap, blocks, compression), [b.data for b in blocks])
    assert back.start == 0 and back.token_ids == snap.token_ids
    for x, y in zip(back.keys + back.values, snap.keys + snap.values):
        assert torch.equal(x, y)


def test_incremental_split_continues_the_chain() -> None:
    snap = _full(29)
    full = split_blocks(snap, B, [])
    start = 16
    inc = KVSnapshot("s1", IDENT, snap.token_ids, [k[:, start:] for k in snap.keys],
                     [v[:, start:] for v in snap.values], start=start)
    new = split_blocks(inc, B, [b.ref for b in full[:2]])
    assert [b.ref for b in new] == [b.ref for b in full[2:]]
    assert [b.data for b in new] == [b.data for b in full[2:]]
    with pytest.raises(ValueError):
        split_blocks(inc, B, [b.ref for b in full[:1]])  # base does not reach start


def test_equal_prefixes_share_keys_and_other_models_do_not() -> None:
    a, b = _full(24, seed=1), _full(24, seed=1)
    b.token_ids = a.token_ids[:16] + [7] * 8
    ka, kb = chain_keys(IDENT, a.token_ids, B), chain_keys(IDENT, b.token_ids, B)
    assert ka[:2] == kb[:2] and ka[2] != kb[2]
    other = KVIdentity("qwen", "rev1", "lora", "float32", 2, 2, 4)
    assert not set(chain_keys(other, a.token_ids, B)) & set(ka)


@pytest.mark.parametrize("damage,reason", [
    ("missing", "missing_block"), ("truncated", "truncated"), ("flipped", "mac"),
    ("wrong_shape", "shape"), ("wrong_dtype", "dtype"), ("other_tokens", "chain"),
    ("bad_zlib", "decompress"),
])
def test_bad_blocks_are_detected(damage: str, reason: str) -> None:
    snap = _full(20)
    compression = "zlib" if damage == "bad_zlib" else "none"
    blocks = split_blocks(snap, B, [], compression)
    m = _manifest(snap, blocks, compression)
    stored: list[bytes | None] = [b.data for b in blocks]
    if damage == "missing":
        stored[1] = None
    elif damage == "truncated":
        stored[2] = stored[2][:-4]
    elif damage == "flipped":
        stored[0] = bytes([stored[0][0] ^ 1]) + stored[0][1:]
    elif damage == "wrong_shape":
        # A block of another model (fewer heads) whose manifest entry was made to match it.
        other = _full(8, ident=KVIdentity("qwen", "rev1", None, "float32", 2, 1, 4))
        data = split_blocks(KVSnapshot("s1", other.identity, snap.token_ids[:8], other.keys, other.values),
                            B, [])[0].data
        stored[0] = data
        m.blocks[0] = BlockRef(m.blocks[0].key, 8, len(data), len(data), zlib.crc32(data),
                               block_mac(b"", m.blocks[0].key, 8, len(data), data))
    elif damage == "wrong_dtype":
        m.dtype = "bfloat16"
    elif damage == "other_tokens":
        m.token_ids = list(reversed(m.token_ids))
    elif damage == "bad_zlib":
        junk = b"not zlib at all"
        stored[0] = junk
        m.blocks[0] = BlockRef(m.blocks[0].key, 8, len(junk), m.blocks[0].raw_bytes, zlib.crc32(junk),
                               block_mac(b"", m.blocks[0].key, 8, m.blocks[0].raw_bytes, junk))
    with pytest.raises(BadData) as e:
        assemble(m, stored)
    assert e.value.reason == reason


SECRET = b"sidecars' shared secret"


def test_a_forged_block_with_a_matching_crc_is_refused() -> None:
    """The attack a CRC cannot stop: all-NaN keys under a block's name, its CRC made to match."""
    snap = _full(16)
    blocks = split_blocks(snap, B, [], secret=SECRET)
    m = _manifest(snap, blocks)
    forged = bytearray(tensor_bytes(torch.full((IDENT.num_layers, 2, IDENT.num_kv_heads, B, IDENT.head_dim),
                                               float("nan"))))
    assert len(forged) == len(blocks[1].data)
    # Forge the CRC too (what an attacker can always do) by naming it in a manifest entry...
    m.blocks[1] = BlockRef(m.blocks[1].key, B, len(forged), len(forged), zlib.crc32(forged), m.blocks[1].mac)
    with pytest.raises(BadData) as e:
        assemble(m, [blocks[0].data, forged], secret=SECRET)
    assert e.value.reason == "mac"
    # ...and a MAC computed without the secret does not help either.
    m.blocks[1] = BlockRef(m.blocks[1].key, B, len(forged), len(forged), zlib.crc32(forged),
                           block_mac(b"", m.blocks[1].key, B, len(forged), forged))
    with pytest.raises(BadData) as e:
        assemble(m, [blocks[0].data, forged], secret=SECRET)
    assert e.value.reason == "mac"
    # Good blocks with the right secret assemble exactly.
    back = assemble(_manifest(snap, blocks), [b.data for b in blocks], secret=SECRET)
    assert all(torch.equal(x, y) for x, y in zip(back.keys, snap.keys))


def test_non_finite_kv_is_refused_even_when_authentic() -> None:
    snap = _full(8)
    snap.keys[0][0, 3, 1] = float("inf")
    blocks = split_blocks(snap, B, [], secret=SECRET)
    with pytest.raises(BadData) as e:
        assemble(_manifest(snap, blocks), [b.data for b in blocks], secret=SECRET)
    assert e.value.reason == "nonfinite"


def test_manifest_sizes_are_capped_before_anything_is_read() -> None:
    snap = _full(20)
    blocks = split_blocks(snap, B, [], "zlib")
    m = _manifest(snap, blocks, "zlib")
    check_manifest_sizes(m, "zlib", max_tokens=20)
    with pytest.raises(BadData, match="tokens") as e:
        check_manifest_sizes(m, "zlib", max_tokens=19)
    assert e.value.reason == "too_large"
    with pytest.raises(BadData) as e:
        check_manifest_sizes(m, "none", max_tokens=20)  # only the configured codec
    assert e.value.reason == "compression"
    huge = BlockRef(m.blocks[0].key, B, 10**12, m.blocks[0].raw_bytes, 0, "")
    m.blocks[0] = huge
    with pytest.raises(BadData) as e:
        check_manifest_sizes(m, "zlib", max_tokens=20)
    assert e.value.reason == "shape"


def test_decompression_stops_at_the_shape_s_size() -> None:
    bomb = zlib.compress(bytes(64 * 1024 * 1024))  # 64 MiB of zeros in ~64 KiB
    with pytest.raises(BadData) as e:
        decompress(bomb, "zlib", 4096)
    assert e.value.reason == "shape"
    assert decompress(zlib.compress(b"x" * 100), "zlib", 100) == b"x" * 100
    with pytest.raises(BadData):
        decompress(zlib.compress(b"x" * 100)[:-3], "zlib", 100)  # truncated stream
