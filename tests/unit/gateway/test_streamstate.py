"""Resumable streams without sockets: event ids, the rewriter catching up to a client's last event,
and stream state read back from Redis (untrusted: malformed or oversized records are refused)."""

from __future__ import annotations

import struct
from array import array

import orjson
import pytest

from gateway.stream_rewrite import EventId, ResumePoint, StreamRewriter
from gateway.streamstate import StreamRecord, body_sha256, check_request_id, parse_record
from unbroken.errors import InvalidRequestError


def _chunk(ids: list[int], *, finish: str | None = None, cid: str = "c") -> bytes:
    return orjson.dumps({"id": cid, "created": 1, "model": "m",
                         "choices": [{"index": 0, "delta": {"content": "x" * len(ids)}, "token_ids": ids,
                                      "finish_reason": finish}]})


ROLE = orjson.dumps({"id": "c", "created": 1, "model": "m",
                     "choices": [{"index": 0, "delta": {"role": "assistant"}, "finish_reason": None}]})
USAGE = orjson.dumps({"id": "c", "created": 1, "model": "m", "choices": [],
                      "usage": {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}})


def _ids_and_payloads(data: bytes) -> list[tuple[str, bytes]]:
    out = []
    for block in data.split(b"\n\n"):
        if block:
            id_line, data_line = block.split(b"\n")
            out.append((id_line.decode()[4:], data_line[6:]))
    return out


def _full_stream() -> list[bytes]:
    return [_chunk([1]), _chunk([2, 3]), _chunk([4]), _chunk([], finish="stop"), USAGE, b"[DONE]"]


def test_every_event_gets_an_id() -> None:
    rw = StreamRewriter(orjson.loads(_chunk([1])), transferable=True, request_id="r")
    opening = rw.begin_upstream([ROLE])
    out = rw.rewrite(_full_stream(), replica_id="a", num_failovers=0)
    ids = [i for i, _ in _ids_and_payloads(opening + out.data)]
    assert ids == ["r:0", "r:1", "r:3", "r:4", "r:4.1", "r:4.2", "r:4.3"]
    assert out.done and rw.tag(b"data: x\n\n") == b"id: r:4.4\ndata: x\n\n"


@pytest.mark.parametrize("last, known", [("r:0", 0), ("r:1", 1), ("r:3", 1), ("r:3", 3), ("r:4", 2),
                                          ("r:4.1", 4), ("r:4.2", 0)])
def test_a_reconnect_sends_exactly_the_events_after_the_clients_last(last: str, known: int) -> None:
    full = StreamRewriter(orjson.loads(_chunk([1])), transferable=True, request_id="r")
    all_events = _ids_and_payloads(full.begin_upstream([ROLE]) +
                                   full.rewrite(_full_stream(), replica_id="a", num_failovers=0).data)
    tokens = [1, 2, 3, 4]
    point = ResumePoint(last=EventId.parse(last, 100), known_token_ids=tokens[:known], stream_id="c",
                        created=1, model="m")
    rw = StreamRewriter(orjson.loads(_chunk([1])), transferable=True, request_id="r", resume=point)
    assert rw.begin_upstream([ROLE]) == b""  # no role chunk again
    # the replica resumes from the known tokens and regenerates the rest (the same: greedy)
    # (a chunk the state's end falls inside comes back holding only the tokens after it)
    regenerated = []
    for b in _full_stream():
        ids = [] if b in (USAGE, b"[DONE]") else orjson.loads(b)["choices"][0]["token_ids"]
        if not ids:
            regenerated.append(b)
        elif ids[-1] > known:
            regenerated.append(_chunk([t for t in ids if t > known]))
    out = rw.rewrite(regenerated, replica_id="b", num_failovers=0)
    got = _ids_and_payloads(out.data)
    idx = [i for i, _ in all_events].index(last)
    want = all_events[idx + 1:]
    assert [i for i, _ in got] == [i for i, _ in want]
    assert rw.sent_ids == tokens


@pytest.mark.parametrize("bad", ["", "r", "r:", ":5", "r:x", "r:1.x", "r:1.", "r:99999999999", "r:101"])
def test_malformed_event_ids_are_refused(bad: str) -> None:
    with pytest.raises(ValueError):
        EventId.parse(bad, 100)


def test_event_id_request_id_may_contain_colons() -> None:
    assert EventId.parse("a:b:12.3", 100) == EventId("a:b", 12, 3)


def test_request_ids_are_bounded() -> None:
    assert check_request_id("abc-123_x.y") == "abc-123_x.y"
    for bad in ("", "a b", "x" * 129, "a\nb", "é"):
        with pytest.raises(InvalidRequestError):
            check_request_id(bad)


def test_body_hash_ignores_key_order() -> None:
    assert body_sha256({"a": 1, "b": [1, 2]}) == body_sha256({"b": [1, 2], "a": 1})
    assert body_sha256({"a": 1}) != body_sha256({"a": 2})


def _raw(rec: StreamRecord, meta: bytes | None = None, body: bytes | None = None,
         tokens: bytes | None = None) -> tuple[bytes, bytes]:
    meta = rec.meta_json() if meta is None else meta
    tokens = array("I", rec.token_ids).tobytes() if tokens is None else tokens
    return (b"UBS1" + struct.pack("<II", len(meta), 0) + meta + tokens,
            rec.body_json if body is None else body)


def test_a_record_round_trips() -> None:
    rec = StreamRecord(request_id="r", route="/v1/chat/completions", principal="k", body_sha256="ab",
                       body_json=orjson.dumps({"model": "m"}), stream_id="c", created=5, model="m", token_ids=[1, 2, 70000])
    assert _raw(rec)[0] == rec.state_blob(3, b"")
    back = parse_record("r", *_raw(rec), 1000, 100)
    inline = parse_record("r", rec.state_blob(2, rec.body_json), None, 1000, 100)  # the body inside
    assert (inline.body(), inline.token_ids) == ({"model": "m"}, [1, 2])
    assert (back.principal, back.body(), back.token_ids, back.stream_id, back.created) == \
        ("k", {"model": "m"}, [1, 2, 70000], "c", 5)


@pytest.mark.parametrize("field, value", [
    (b"meta", b"[]"), (b"meta", b"{\"v\": 2}"), (b"meta", b"x" * 5000), (b"body", b"x" * 2000),
    (b"body", b"[1]"), (b"tokens", b"abc"), (b"tokens", b"\x00" * 404), (b"tokens", b"\xff\xff\xff\xff"),
    (b"meta", orjson.dumps({"v": 1, "route": 1, "principal": "k", "body_sha256": "a", "finished": False})),
    (b"meta", orjson.dumps({"v": 1, "route": "/", "principal": "k", "body_sha256": "a", "finished": False,
                            "created": "x"})),
])
def test_malformed_or_oversized_records_are_refused(field: bytes, value: bytes) -> None:
    rec = StreamRecord(request_id="r", route="/v1/chat/completions", principal="k", body_sha256="ab",
                       body_json=orjson.dumps({"model": "m"}), token_ids=[1, 2])
    blob, body = _raw(rec, **{field.decode(): value})
    with pytest.raises((ValueError, orjson.JSONDecodeError)):
        parse_record("r", blob, body, 1000, 100)


@pytest.mark.parametrize("blob", [None, b"", b"UBS1", b"XXXX\x00\x00\x00\x00\x00\x00\x00\x00",
                                  b"UBS1\xff\xff\x00\x00\x00\x00\x00\x00{}", b"UBS1\x02\x00\x00\x00\xff\xff\x00\x00{}"])
def test_truncated_or_foreign_blobs_are_refused(blob: bytes | None) -> None:
    with pytest.raises(ValueError):
        parse_record("r", blob, b"{}", 1000, 100)


def test_an_ended_stream_is_kept_locally_as_it_was() -> None:
    """Ended streams are kept compact (tuples the garbage collector stops tracking); what comes back
    is the record."""
    from gateway.config import StreamsSection
    from gateway.metrics import GatewayMetrics
    from gateway.streamstate import StreamStateStore

    store = StreamStateStore(StreamsSection(max_local_streams=2), "t:", GatewayMetrics(), 1 << 20, 2.0)
    body = {"model": "m", "messages": [{"role": "user", "content": "é" * 5000}], "temperature": 0}
    recs = [StreamRecord(request_id=f"r{i}", route="/v1/chat/completions", principal="k", body_sha256="ab",
                         body_json=orjson.dumps(body), stream_id="c", created=5, model="m",
                         token_ids=[1, 2, 70000 + i]) for i in range(3)]
    for rec in recs:
        store.open(rec)
        assert store.local(rec.request_id) is rec  # running: the relay's own record
    store.close(recs[0], finished=True)
    store.close(recs[1], finished=False)
    back = store.local("r1")
    assert back is not None and back is not recs[1]
    assert (back.route, back.principal, back.body_sha256, back.stream_id, back.created, back.model,
            back.token_ids, back.finished, back.body()) == \
        ("/v1/chat/completions", "k", "ab", "c", 5, "m", [1, 2, 70001], False, body)
    import gc

    gc.collect()
    gc.collect()  # the inner tuple (the ids) is let go at the first look, the outer one at the next
    assert not any(gc.is_tracked(e) for e in store._ended.values())
    store.close(recs[2], finished=True)
    assert store.local("r0") is None  # the oldest of three, over max_local_streams
    assert store.local("r2") is not None and store.local("r2").finished  # type: ignore[union-attr]
