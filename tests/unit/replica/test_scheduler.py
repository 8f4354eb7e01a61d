"""The pure scheduler, driven with hand-made sampled tokens: no model, no torch."""

from __future__ import annotations

import random
from typing import Callable

import pytest

from replica.protocol import FinishReason, GenerationRequest, SamplingParams
from replica.scheduler import Scheduler, SchedulerOutput, Sequence, SequenceStatus

EOS = 2
FILLER = 1000  # a token that is never EOS


def make_seq(rid: str, prompt: list[int] | int, *, session_id: str | None = None, adapter: str | None = None,
             resume: list[int] | None = None, **sampling: object) -> Sequence:
    prompt_ids = list(range(10, 10 + prompt)) if isinstance(prompt, int) else list(prompt)
    sampling.setdefault("max_tokens", 16)
    request = GenerationRequest(request_id=rid, prompt_token_ids=prompt_ids,
                                sampling=SamplingParams(**sampling), adapter=adapter,
                                session_id=session_id, resume_token_ids=list(resume or []))
    return Sequence.from_request(request)


def make_scheduler(**kwargs: object) -> Scheduler:
    kwargs.setdefault("kv_capacity_tokens", 10_000)
    kwargs.setdefault("eos_token_ids", {EOS})
    return Scheduler(**kwargs)  # type: ignore[arg-type]


def sampling_rows(plan: SchedulerOutput) -> list[Sequence]:
    """The sequences the model samples for this step: last prefill chunks and decodes."""
    return [c.seq for c in plan.prefills if c.samples] + list(plan.decodes)


def check_plan(sched: Scheduler, plan: SchedulerOutput) -> None:
    """Invariants every plan must keep, checked right after ``schedule()``."""
    chunk_tokens = sum(c.end - c.start for c in plan.prefills)
    assert chunk_tokens <= sched.max_prefill_tokens_per_step
    assert sched.num_free_tokens >= 0
    # What the model writes this step must fit: one slot per decode plus every chunk.
    assert sched.num_used_tokens + len(plan.decodes) + chunk_tokens <= sched.kv_capacity_tokens
    assert len(sched.running) <= sched.max_num_seqs
    for c in plan.prefills:
        assert c.seq.status is SequenceStatus.RUNNING
        assert 0 <= c.start < c.end <= len(c.seq.token_ids)
        assert c.start == c.seq.num_computed_tokens
    for s in plan.decodes:
        assert s.status is SequenceStatus.RUNNING
        assert s.num_computed_tokens == len(s.token_ids) - 1
    ids = [c.seq.request_id for c in plan.prefills] + [s.request_id for s in plan.decodes]
    assert len(ids) == len(set(ids)), "a sequence appears twice in one plan"


Chunk = tuple[Sequence, int, int, bool]  # seq, start, end, samples (as planned, before update)


def step(sched: Scheduler, token: int | dict[str, int] | Callable[[Sequence], int] = FILLER
         ) -> tuple[SchedulerOutput, list[Sequence], list[Chunk]]:
    """One schedule/update round; ``token`` is the sampled token (per request id, or a function).
    Returns the plan, the finished sequences and the plan's chunks as they were scheduled."""
    plan = sched.schedule()
    check_plan(sched, plan)
    chunks = [(c.seq, c.start, c.end, c.samples) for c in plan.prefills]
    sampled: dict[str, int] = {}
    for seq in sampling_rows(plan):
        if callable(token):
            sampled[seq.request_id] = token(seq)
        elif isinstance(token, dict):
            sampled[seq.request_id] = token.get(seq.request_id, FILLER)
        else:
            sampled[seq.request_id] = token
    finished = sched.update(plan, sampled)
    assert sched.num_free_tokens >= 0
    return plan, finished, chunks


def run_until_done(sched: Scheduler, max_steps: int = 500, token: object = FILLER) -> list[Sequence]:
    finished: list[Sequence] = []
    for _ in range(max_steps):
        if not sched.has_unfinished():
            break
        plan, done, _ = step(sched, token)  # type: ignore[arg-type]
        finished.extend(done)
        finished.extend(plan.ended)
    return finished


# -- life cycle ------------------------------------------------------------------------------------
def test_single_request_life_cycle() -> None:
    sched = make_scheduler()
    seq = make_seq("a", 5, max_tokens=3)
    sched.add(seq)
    assert seq.status is SequenceStatus.WAITING and sched.has_unfinished()

    plan, finished, chunks = step(sched, 101)
    assert chunks == [(seq, 0, 5, True)]
    assert plan.decodes == [] and finished == []
    assert seq.status is SequenceStatus.RUNNING
    assert seq.num_computed_tokens == 5 and seq.output_ids == [101] and seq.output_position == 1

    plan, finished, chunks = step(sched, 102)
    assert plan.prefills == [] and plan.decodes == [seq] and finished == []
    assert seq.num_computed_tokens == 6 and seq.output_ids == [101, 102]

    plan, finished, chunks = step(sched, 103)
    assert finished == [seq]
    assert seq.status is SequenceStatus.FINISHED and seq.finish_reason is FinishReason.LENGTH
    assert seq.output_ids == [101, 102, 103]
    assert seq.token_ids == list(range(10, 15)) + [101, 102, 103]
    assert sched.running == [] and not sched.has_unfinished()
    assert sched.num_used_tokens == 0

    plan = sched.schedule()
    assert plan.is_empty and plan.ended == [] and plan.preempted == []


def test_long_prompt_is_chunked_while_running_sequences_keep_decoding() -> None:
    sched = make_scheduler(max_prefill_tokens_per_step=4)
    a = make_seq("a", 3, max_tokens=50)
    sched.add(a)
    step(sched)
    assert a.num_computed_tokens == 3 and len(a.output_ids) == 1

    b = make_seq("b", 10, max_tokens=50)
    sched.add(b)
    b_chunks = []
    for expected_a_outputs in (2, 3, 4):
        plan, _, chunks = step(sched)
        assert plan.decodes == [a], "a running sequence must decode every step"
        assert len(a.output_ids) == expected_a_outputs
        assert len(plan.prefills) == 1 and plan.prefills[0].seq is b
        b_chunks.append(chunks[0][1:])
    assert b_chunks == [(0, 4, False), (4, 8, False), (8, 10, True)]
    assert b.output_ids == [FILLER] and b.num_computed_tokens == 10

    plan, _, chunks = step(sched)
    assert plan.prefills == [] and plan.decodes == [a, b]


def test_prefill_budget_is_shared_between_prompts_in_one_step() -> None:
    sched = make_scheduler(max_prefill_tokens_per_step=8)
    a, b, c = make_seq("a", 5), make_seq("b", 5), make_seq("c", 5)
    for s in (a, b, c):
        sched.add(s)

    plan, _, chunks = step(sched)
    assert [(ch.seq, ch.start, ch.end) for ch in plan.prefills] == [(a, 0, 5), (b, 0, 3)]
    assert list(sched.waiting) == [c]

    plan, _, chunks = step(sched)
    assert plan.decodes == [a]
    # The partial prefill continues first, then the next waiting prompt takes what is left.
    assert [(ch.seq, ch.start, ch.end) for ch in plan.prefills] == [(b, 3, 5), (c, 0, 5)]
    assert not sched.waiting


def test_prefill_budget_holds_over_many_steps() -> None:
    sched = make_scheduler(max_prefill_tokens_per_step=7)
    for i in range(6):
        sched.add(make_seq(f"r{i}", 3 + 4 * i, max_tokens=4))
    finished = run_until_done(sched)  # check_plan asserts the budget every step
    assert len(finished) == 6
    assert all(s.finish_reason is FinishReason.LENGTH and len(s.output_ids) == 4 for s in finished)


def test_max_num_seqs_limits_admission() -> None:
    sched = make_scheduler(max_num_seqs=2)
    a, b, c = make_seq("a", 3, max_tokens=2), make_seq("b", 3, max_tokens=5), make_seq("c", 3, max_tokens=2)
    for s in (a, b, c):
        sched.add(s)
    plan, _, chunks = step(sched)
    assert [ch.seq for ch in plan.prefills] == [a, b]
    assert list(sched.waiting) == [c] and c.status is SequenceStatus.WAITING

    plan, finished, chunks = step(sched)
    assert finished == [a]
    assert not any(ch.seq is c for ch in plan.prefills), "admitted before a slot was free"

    plan, _, chunks = step(sched)
    assert [ch.seq for ch in plan.prefills] == [c]
    assert plan.decodes == [b]


# -- finishing ---------------------------------------------------------------------------------------
def test_eos_finishes_with_stop() -> None:
    sched = make_scheduler()
    seq = make_seq("a", 4, max_tokens=10)
    sched.add(seq)
    step(sched, 7)
    _, finished, _ = step(sched, EOS)
    assert finished == [seq] and seq.finish_reason is FinishReason.STOP
    assert seq.output_ids == [7, EOS]


def test_eos_on_the_prefill_sample_finishes() -> None:
    sched = make_scheduler()
    seq = make_seq("a", 4)
    sched.add(seq)
    _, finished, _ = step(sched, EOS)
    assert finished == [seq] and seq.finish_reason is FinishReason.STOP
    assert sched.num_used_tokens == 0


def test_min_tokens_suppresses_eos_finish() -> None:
    sched = make_scheduler()
    seq = make_seq("a", 4, max_tokens=10, min_tokens=3)
    sched.add(seq)
    for _ in range(2):
        _, finished, _ = step(sched, EOS)
        assert finished == []
    _, finished, _ = step(sched, EOS)
    assert finished == [seq] and seq.finish_reason is FinishReason.STOP
    assert len(seq.output_ids) == 3


def test_ignore_eos_runs_to_max_tokens() -> None:
    sched = make_scheduler()
    seq = make_seq("a", 4, max_tokens=5, ignore_eos=True)
    sched.add(seq)
    finished = run_until_done(sched, token=EOS)
    assert finished == [seq] and seq.finish_reason is FinishReason.LENGTH
    assert seq.output_ids == [EOS] * 5


def test_max_tokens_counts_resume_tokens() -> None:
    sched = make_scheduler()
    seq = make_seq("a", 4, max_tokens=5, resume=[501, 502])
    assert seq.num_context_tokens == 6 and seq.output_position == 2
    sched.add(seq)
    plan, _, chunks = step(sched, 601)
    assert plan.prefills[0].end == 6, "the resume tokens are prefilled with the prompt"
    assert seq.output_position == 3
    finished = run_until_done(sched, token=602)
    assert finished == [seq] and seq.finish_reason is FinishReason.LENGTH
    assert seq.output_ids == [601, 602, 602]  # 2 resumed + 3 new = max_tokens
    assert seq.output_position == 5


def test_max_model_len_finishes_with_length() -> None:
    sched = make_scheduler(max_model_len=8)
    seq = make_seq("a", 5, max_tokens=100)
    sched.add(seq)
    finished = run_until_done(sched)
    assert finished == [seq] and seq.finish_reason is FinishReason.LENGTH
    assert len(seq.token_ids) == 8 and len(seq.output_ids) == 3


# -- abort -------------------------------------------------------------------------------------------
def test_abort_waiting_request() -> None:
    sched = make_scheduler(max_num_seqs=1)
    a, b = make_seq("a", 3), make_seq("b", 3)
    sched.add(a)
    sched.add(b)
    step(sched)
    assert list(sched.waiting) == [b]
    assert sched.abort("b") is b
    assert b.status is SequenceStatus.FINISHED and b.finish_reason is FinishReason.CANCELLED
    assert not sched.waiting and sched.running == [a]
    assert sched.abort("b") is None and sched.abort("nope") is None


def test_abort_running_request_frees_its_slots() -> None:
    sched = make_scheduler()
    a = make_seq("a", 6)
    sched.add(a)
    step(sched)
    step(sched)
    assert sched.num_used_tokens == 7
    assert sched.abort("a") is a
    assert a.finish_reason is FinishReason.CANCELLED
    assert sched.running == [] and sched.num_used_tokens == 0 and not sched.has_unfinished()


def test_abort_between_schedule_and_update_is_ignored_by_update() -> None:
    sched = make_scheduler(max_prefill_tokens_per_step=4)
    a, b = make_seq("a", 3), make_seq("b", 10)
    sched.add(a)
    step(sched)
    sched.add(b)
    plan = sched.schedule()
    assert plan.decodes == [a] and plan.prefills[0].seq is b
    sched.abort("a")
    sched.abort("b")
    assert sched.update(plan, {}) == []  # no token for the aborted ones, and no KeyError
    assert a.output_ids == [FILLER] and b.num_computed_tokens == 0
    assert sched.running == [] and sched.num_used_tokens == 0


# -- KV budget -----------------------------------------------------------------------------------------
def test_decodes_evict_lru_sessions_then_preempt_the_newest() -> None:
    sched = make_scheduler(kv_capacity_tokens=20, max_prefill_tokens_per_step=100)
    assert sched.keep_session("old", [1, 2, 3, 4], None) == []
    assert sched.keep_session("new", [5, 6, 7, 8], None) == []
    a = make_seq("a", 5, max_tokens=100)
    b = make_seq("b", 5, max_tokens=100)
    sched.add(a)
    sched.add(b)

    counter = iter(range(200, 10_000))
    evicted: list[str] = []
    preempted: list[Sequence] = []
    for _ in range(50):
        plan, _, chunks = step(sched, lambda s: next(counter))
        evicted += plan.evicted_sessions
        if plan.preempted:
            preempted = plan.preempted
            break
        assert plan.decodes == [a, b] or plan.prefills, "nobody is preempted while sessions can go"
    assert evicted == ["old", "new"], "kept sessions go first, least recently used first"
    assert not sched.sessions
    assert preempted == [b], "the newest running sequence is preempted"
    assert plan.decodes == [a]
    assert b.status is SequenceStatus.WAITING and b.num_computed_tokens == 0
    assert sched.waiting[0] is b and b.num_preemptions == 1 and sched.num_preemptions == 1
    b_tokens_before = list(b.token_ids)
    b_outputs = len(b.output_ids)
    assert b_outputs >= 2

    # a finishes; b is recomputed from its prompt AND the tokens it generated, and continues.
    plan, finished, chunks = step(sched, {"a": EOS})
    assert finished == [a]
    plan, _, chunks = step(sched, {"b": 777})
    assert chunks == [(b, 0, len(b_tokens_before), True)]
    assert b.token_ids == b_tokens_before + [777]
    assert b.output_position == b_outputs + 1
    assert b.status is SequenceStatus.RUNNING and b._decoding
    assert b.num_cached_prompt_tokens == 0


def test_preempted_sequence_goes_before_older_waiting_ones() -> None:
    sched = make_scheduler(kv_capacity_tokens=12, max_prefill_tokens_per_step=100, max_num_seqs=2)
    a, b, c = make_seq("a", 4, max_tokens=100), make_seq("b", 4, max_tokens=100), make_seq("c", 2)
    for s in (a, b, c):
        sched.add(s)
    for _ in range(20):
        plan, _, chunks = step(sched)
        if plan.preempted:
            break
    assert plan.preempted == [b]
    assert list(sched.waiting) == [b, c]


def test_request_that_can_never_fit_fails_instead_of_waiting() -> None:
    sched = make_scheduler(kv_capacity_tokens=10, max_prefill_tokens_per_step=100)
    too_big = make_seq("big", 11)
    fits = make_seq("ok", 9, max_tokens=1)
    sched.add(too_big)
    sched.add(fits)
    plan = sched.schedule()
    assert plan.ended == [too_big]
    assert too_big.status is SequenceStatus.FINISHED and too_big.finish_reason is FinishReason.ERROR
    assert [c.seq for c in plan.prefills] == [fits], "the queue moves on past the failed request"


def test_request_too_big_fails_at_once_without_disturbing_the_running_ones() -> None:
    sched = make_scheduler(kv_capacity_tokens=10, max_prefill_tokens_per_step=100)
    a = make_seq("a", 3, max_tokens=3)
    sched.add(a)
    step(sched)
    big = make_seq("big", 12)
    sched.add(big)
    plan, _, chunks = step(sched)
    assert plan.ended == [big] and not sched.waiting
    assert big.finish_reason is FinishReason.ERROR
    finished = run_until_done(sched, max_steps=20)
    assert a in finished and a.finish_reason is FinishReason.LENGTH and not sched.has_unfinished()


def test_admission_evicts_lru_sessions_to_make_room() -> None:
    sched = make_scheduler(kv_capacity_tokens=20, max_prefill_tokens_per_step=100)
    sched.keep_session("s1", list(range(100, 108)), None)
    sched.keep_session("s2", list(range(200, 208)), None)
    seq = make_seq("a", 8)
    sched.add(seq)
    plan, _, chunks = step(sched)
    assert plan.evicted_sessions == ["s1"]
    assert list(sched.sessions) == ["s2"]
    assert [c.seq for c in plan.prefills] == [seq]


def test_lone_sequence_outgrowing_the_kv_budget_ends() -> None:
    sched = make_scheduler(kv_capacity_tokens=10, max_prefill_tokens_per_step=4)
    seq = make_seq("a", 5, max_tokens=100)
    sched.add(seq)
    run_until_done(sched, max_steps=100)
    assert seq.status is SequenceStatus.FINISHED


def test_partial_prefill_evicts_kept_sessions_instead_of_stalling() -> None:
    sched = make_scheduler(kv_capacity_tokens=20, max_prefill_tokens_per_step=8)
    sched.keep_session("other", list(range(100, 110)), None)
    seq = make_seq("a", 12, max_tokens=2)
    sched.add(seq)
    run_until_done(sched, max_steps=50)
    assert seq.status is SequenceStatus.FINISHED


def test_reuse_of_a_short_prefix_of_a_big_session_does_not_wait_forever() -> None:
    sched = make_scheduler(kv_capacity_tokens=20, max_prefill_tokens_per_step=100)
    kept = list(range(100, 115))  # 15 slots held by the session
    sched.keep_session("s", kept, None)
    seq = make_seq("a", kept[:2] + list(range(50, 60)), session_id="s", max_tokens=2)  # 12 tokens, 2 shared
    sched.add(seq)
    run_until_done(sched, max_steps=50)
    assert seq.status is SequenceStatus.FINISHED and seq.finish_reason is FinishReason.LENGTH


# -- sessions ------------------------------------------------------------------------------------------
def test_session_reuse_starts_after_the_common_prefix() -> None:
    sched = make_scheduler()
    first = make_seq("t1", 5, session_id="s", max_tokens=2)
    sched.add(first)
    run_until_done(sched)
    kept = first.token_ids[:-1]  # the last sampled token has no KV yet
    assert sched.keep_session("s", kept, None) == []
    assert sched.num_used_tokens == len(kept) == 6

    second = make_seq("t2", kept + [70, 71, 72], session_id="s", max_tokens=2)
    sched.add(second)
    plan, _, chunks = step(sched)
    assert [(c.seq, c.start, c.end, c.reuse_session) for c in plan.prefills] == [(second, 6, 9, "s")]
    assert second.num_cached_prompt_tokens == 6 and second.cache_source == "session"
    assert "s" not in sched.sessions, "the session's KV moved into the sequence"
    assert second.num_computed_tokens == 9 and sched.num_used_tokens == 9


def test_session_reuse_leaves_at_least_one_token_to_compute() -> None:
    sched = make_scheduler()
    sched.keep_session("s", [1, 2, 3, 4], None)
    seq = make_seq("a", [1, 2, 3, 4], session_id="s")
    sched.add(seq)
    plan = sched.schedule()
    chunk = plan.prefills[0]
    assert (chunk.start, chunk.end, chunk.reuse_session, chunk.samples) == (3, 4, "s", True)
    assert seq.num_cached_prompt_tokens == 3


def test_session_reuse_of_a_diverging_prompt_uses_the_longest_common_prefix() -> None:
    sched = make_scheduler()
    sched.keep_session("s", [1, 2, 3, 4, 5, 6], None, source="restored")
    seq = make_seq("a", [1, 2, 3, 9, 9], session_id="s")
    sched.add(seq)
    chunk = sched.schedule().prefills[0]
    assert (chunk.start, chunk.end, chunk.reuse_session) == (3, 5, "s")
    assert seq.num_cached_prompt_tokens == 3 and seq.cache_source == "restored"


@pytest.mark.parametrize("adapter_kept, adapter_asked, session_asked, prompt", [
    ("lora-a", None, "s", [1, 2, 3, 4, 5]),  # adapter mismatch
    (None, "lora-a", "s", [1, 2, 3, 4, 5]),
    ("lora-a", "lora-b", "s", [1, 2, 3, 4, 5]),
    (None, None, "other", [1, 2, 3, 4, 5]),  # another session
    (None, None, None, [1, 2, 3, 4, 5]),  # no session
    (None, None, "s", [9, 2, 3, 4, 5]),  # nothing in common
])
def test_no_reuse_without_a_matching_session(adapter_kept: str | None, adapter_asked: str | None,
                                             session_asked: str | None, prompt: list[int]) -> None:
    sched = make_scheduler()
    sched.keep_session("s", [1, 2, 3, 4], adapter_kept)
    seq = make_seq("a", prompt, session_id=session_asked, adapter=adapter_asked)
    sched.add(seq)
    chunk = sched.schedule().prefills[0]
    assert (chunk.start, chunk.end, chunk.reuse_session) == (0, 5, None)
    assert seq.num_cached_prompt_tokens == 0 and seq.cache_source is None
    assert "s" in sched.sessions


def test_session_reuse_with_the_same_adapter() -> None:
    sched = make_scheduler()
    sched.keep_session("s", [1, 2, 3, 4], "lora-a")
    seq = make_seq("a", [1, 2, 3, 4, 5], session_id="s", adapter="lora-a")
    sched.add(seq)
    chunk = sched.schedule().prefills[0]
    assert (chunk.start, chunk.reuse_session) == (4, "s")


def test_max_kept_sessions_evicts_least_recently_used() -> None:
    sched = make_scheduler(max_kept_sessions=2)
    assert sched.keep_session("a", [1], None) == []
    assert sched.keep_session("b", [2], None) == []
    assert sched.keep_session("c", [3], None) == ["a"]
    assert sched.keep_session("b", [2, 2], None) == []  # refreshed: now the most recent
    assert sched.keep_session("d", [4], None) == ["c"]
    assert list(sched.sessions) == ["b", "d"]
    assert sched.num_session_tokens == 3
    assert sched.drop_session("b") and not sched.drop_session("b")
    assert list(sched.sessions) == ["d"]


def test_keep_session_with_nothing_to_keep() -> None:
    assert make_scheduler(max_kept_sessions=0).keep_session("s", [1, 2], None) == ["s"]
    sched = make_scheduler()
    sched.keep_session("s", [1, 2], None)
    assert sched.keep_session("s", [], None) == ["s"]
    assert not sched.sessions


def test_keep_session_stays_within_the_kv_budget() -> None:
    sched = make_scheduler(kv_capacity_tokens=10)
    sched.keep_session("a", list(range(6)), None)
    assert sched.keep_session("b", list(range(6)), None) == ["a"]
    assert list(sched.sessions) == ["b"] and sched.num_free_tokens == 4
    assert sched.keep_session("huge", list(range(11)), None) == ["b", "huge"]
    assert not sched.sessions and sched.num_free_tokens == 10


# -- accounting under load ---------------------------------------------------------------------------
def _token_for(seq: Sequence) -> int:
    """A token fixed by (request, output position): recomputation must not change the stream."""
    return 300 + int(seq.request_id[1:]) * 100 + seq.output_position


@pytest.mark.parametrize("seed", range(5))
def test_random_load_keeps_accounting_and_streams_consistent(seed: int) -> None:
    rng = random.Random(seed)
    capacity = 60
    sched = make_scheduler(kv_capacity_tokens=capacity, max_prefill_tokens_per_step=rng.choice([4, 8, 16]),
                           max_num_seqs=rng.choice([2, 3, 8]))
    seqs: list[Sequence] = []
    preemptions = 0
    for i in range(30):
        prompt = rng.randint(1, 30)
        max_tokens = rng.randint(1, capacity - prompt)  # never outgrows the budget alone
        seqs.append(make_seq(f"r{i}", [rng.randint(3, 99) for _ in range(prompt)], max_tokens=max_tokens))
    pending = list(seqs)
    done: list[Sequence] = []
    for _ in range(5000):
        while pending and rng.random() < 0.3:
            sched.add(pending.pop(0))
        if not pending and not sched.has_unfinished():
            break
        plan, finished, chunks = step(sched, _token_for)
        preemptions += len(plan.preempted)
        done += finished + plan.ended
        assert sched.num_used_tokens == sum(s.num_computed_tokens for s in sched.running)
    assert not pending and not sched.has_unfinished()
    assert sorted(s.request_id for s in done) == sorted(s.request_id for s in seqs)
    for s in seqs:
        assert s.finish_reason is FinishReason.LENGTH
        assert len(s.output_ids) == s.request.sampling.max_tokens
        expected = [300 + int(s.request_id[1:]) * 100 + k for k in range(len(s.output_ids))]
        assert s.output_ids == expected, "a recomputed sequence lost or changed its generated tokens"
    assert sched.num_preemptions == preemptions
    assert sched.num_used_tokens == 0
