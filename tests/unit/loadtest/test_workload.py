"""The load-test users against a deterministic fake server: good answers pass, and each kind of
misbehaviour is caught and labelled."""

from __future__ import annotations

import pytest
import requests

from loadtest.workload import ReferenceBook, RequestRecord, WorkloadConfig, WorkloadUser


def _user(url: str, records: list[RequestRecord], stream_fraction: float = 0.5, seed: int = 1,
          server_history: bool = False) -> tuple[WorkloadUser, ReferenceBook]:
    cfg = WorkloadConfig(base_url=url, max_tokens=8, stream_fraction=stream_fraction, timeout_s=10,
                         server_history=server_history)
    book = ReferenceBook(cfg)
    book.build(requests.Session(), seeds=[1234])
    return WorkloadUser(cfg, book, records.append, seed=seed), book


def test_good_answers_pass_and_are_recorded(fake_gateway) -> None:
    records: list[RequestRecord] = []
    user, book = _user(fake_gateway.url, records)
    for _ in range(6):
        user.single_request()
    for _ in range(3):
        user.session()
    assert records and all(r.ok for r in records), [r.failure for r in records if not r.ok]
    assert {r.kind for r in records} == {"single", "session"}
    assert {r.stream for r in records} == {True, False}
    sessions = [r for r in records if r.kind == "session"]
    assert all(r.session_id for r in sessions) and max(r.turn for r in sessions) >= 1
    assert all(r.num_tokens == 8 and r.replica_id == "fake-0" for r in records)
    streamed = [r for r in records if r.stream]
    assert all(r.ttft_s is not None and r.ttft_s <= r.latency_s for r in streamed)
    assert any(r.itl_s is not None for r in streamed)
    priorities = {h.get("X-Priority") for h in fake_gateway.headers_seen}
    assert priorities <= {"critical", "normal", "batch"} and len(priorities) >= 2
    session_ids = {h.get("X-Session-ID") for h in fake_gateway.headers_seen if h.get("X-Session-ID")}
    assert len(session_ids) == 3


@pytest.mark.parametrize("misbehaviour, kinds", [
    ("duplicate", {"tokens_repeated"}),
    ("drop_done", {"stream_incomplete"}),
    ("error_event", {"sse_error_event"}),
    ("http_500", {"http_500"}),
])
def test_misbehaviour_is_a_failure_of_its_kind(fake_gateway, misbehaviour: str, kinds: set[str]) -> None:
    records: list[RequestRecord] = []
    user, _ = _user(fake_gateway.url, records, stream_fraction=1.0)
    fake_gateway.misbehave.add(misbehaviour)
    for _ in range(3):
        user.single_request()
    assert records and not any(r.ok for r in records)
    assert {r.failure_kind for r in records} == kinds


def test_a_session_that_forgets_its_context_is_caught(fake_gateway) -> None:
    records: list[RequestRecord] = []
    user, _ = _user(fake_gateway.url, records)
    fake_gateway.misbehave.add("forget_context")
    user.session()
    assert [r.ok for r in records] == [True, False]  # turn 1 has no context to lose; turn 2 stops it
    assert records[1].failure_kind == "context_lost"


def test_server_history_sends_only_the_new_message(fake_gateway) -> None:
    records: list[RequestRecord] = []
    user, _ = _user(fake_gateway.url, records, server_history=True)
    fake_gateway.headers_seen.clear()
    user.session()
    # The fake ignores the header, so without the kept history turn 2 differs: context lost.
    assert fake_gateway.headers_seen[0].get("X-Session-History") == "server"
    assert records[-1].failure_kind == "context_lost"


def test_no_reference_without_a_gateway() -> None:
    from unbroken.procs import free_port

    cfg = WorkloadConfig(base_url=f"http://127.0.0.1:{free_port()}", max_tokens=4, timeout_s=2)
    book = ReferenceBook(cfg)
    with pytest.raises(RuntimeError):
        book.build(requests.Session(), attempts=1)
