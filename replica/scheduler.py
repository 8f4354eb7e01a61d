"""The replica's scheduler: a pure, synchronous state machine.

``add(seq)`` queues a sequence, ``schedule()`` decides what the model runs this step (a
:class:`SchedulerOutput`), ``update(plan, sampled)`` applies the step's sampled tokens and reports
what finished. It never calls the model, and imports no torch, aiohttp or Redis: its unit tests
run with hand-made outputs.

Memory is counted in KV slots (one per token per sequence). The budget holds the running
sequences and the KV kept for sessions between turns; kept sessions are evicted least recently
used first, then the newest running sequence is preempted (its KV dropped, recomputed later).
"""

from __future__ import annotations

import enum
from collections import OrderedDict, deque
from dataclasses import dataclass, field

from replica.protocol import FinishReason, GenerationRequest


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class Sequence:
    """One request inside the engine. ``token_ids`` = prompt + resume tokens + generated tokens."""

    request: GenerationRequest
    token_ids: list[int]
    num_context_tokens: int  # prompt + resume: what existed before this engine generated anything
    status: SequenceStatus = SequenceStatus.WAITING
    num_computed_tokens: int = 0  # tokens whose KV is in the cache
    num_cached_prompt_tokens: int = 0  # reused from a kept session (first admission only)
    cache_source: str | None = None
    finish_reason: FinishReason | None = None
    arrival_order: int = 0
    num_preemptions: int = 0
    reported_cache: bool = False

    @classmethod
    def from_request(cls, request: GenerationRequest, arrival_order: int = 0) -> "Sequence":
        context = list(request.prompt_token_ids) + list(request.resume_token_ids)
        return cls(request=request, token_ids=context, num_context_tokens=len(context),
                   arrival_order=arrival_order)

    @property
    def request_id(self) -> str:
        return self.request.request_id

    @property
    def output_ids(self) -> list[int]:
        return self.token_ids[self.num_context_tokens:]

    @property
    def output_position(self) -> int:
        """Index of the next output token counted from the start of the whole completion
        (resume tokens included); seeded sampling draws from ``(seed, output_position)``."""
        return len(self.request.resume_token_ids) + len(self.output_ids)

    _decoding: bool = False  # prefill done; one token per step from now on


@dataclass
class PrefillChunk:
    """Compute KV for ``seq.token_ids[start:end]``; if ``end`` is the last token, sample from it.
    ``reuse_session`` names the kept session whose first ``start`` tokens of KV the sequence takes."""

    seq: Sequence
    start: int
    end: int
    reuse_session: str | None = None

    @property
    def samples(self) -> bool:
        return self.end == len(self.seq.token_ids)


@dataclass
class SchedulerOutput:
    prefills: list[PrefillChunk] = field(default_factory=list)
    decodes: list[Sequence] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)
    evicted_sessions: list[str] = field(default_factory=list)
    # Ended by the scheduler: ERROR (can never fit the KV budget) or LENGTH (outgrew it alone).
    ended: list[Sequence] = field(default_factory=list)

    @property
    def is_empty(self) -> bool:
        return not (self.prefills or self.decodes)


@dataclass
class KeptSession:
    token_ids: list[int]  # tokens whose KV is kept
    adapter: str | None
    source: str = "session"  # "session" (kept after a turn here) or "restored" (imported)


class Scheduler:
    """Iteration-level scheduling with a prefill token budget per step and a KV slot budget."""

    def __init__(
        self,
        *,
        kv_capacity_tokens: int,
        max_num_seqs: int = 64,
        max_prefill_tokens_per_step: int = 512,
        max_kept_sessions: int = 256,
        max_model_len: int = 4096,
        eos_token_ids: frozenset[int] | set[int] = frozenset(),
    ) -> None:
        self.kv_capacity_tokens = kv_capacity_tokens
        self.max_num_seqs = max_num_seqs
        self.max_prefill_tokens_per_step = max_prefill_tokens_per_step
        self.max_kept_sessions = max_kept_sessions
        self.max_model_len = max_model_len
        self.eos_token_ids = frozenset(eos_token_ids)
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.sessions: OrderedDict[str, KeptSession] = OrderedDict()
        self.num_preemptions = 0
        self._arrivals = 0

    # -- accounting -------------------------------------------------------------------------
    @property
    def num_session_tokens(self) -> int:
        return sum(len(s.token_ids) for s in self.sessions.values())

    @property
    def num_used_tokens(self) -> int:
        return sum(s.num_computed_tokens for s in self.running) + self.num_session_tokens

    @property
    def num_free_tokens(self) -> int:
        return self.kv_capacity_tokens - self.num_used_tokens

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    # -- commands -----------------------------------------------------------------------------
    def add(self, seq: Sequence) -> None:
        self._arrivals += 1
        seq.arrival_order = self._arrivals
        seq.status = SequenceStatus.WAITING
        self.waiting.append(seq)

    def abort(self, request_id: str) -> Sequence | None:
        """Remove a request wherever it is; the caller frees its KV."""
        for seq in self.running:
            if seq.request_id == request_id:
                self.running.remove(seq)
                return self._finish(seq, FinishReason.CANCELLED)
        for seq in self.waiting:
            if seq.request_id == request_id:
                self.waiting.remove(seq)
                return self._finish(seq, FinishReason.CANCELLED)
        return None

    def keep_session(self, session_id: str, token_ids: list[int], adapter: str | None,
                     source: str = "session") -> list[str]:
        """Record kept KV for a session (after a turn, or an import). Returns sessions evicted to
        stay within ``max_kept_sessions`` and the KV budget."""
        self.sessions.pop(session_id, None)
        if self.max_kept_sessions == 0 or len(token_ids) == 0:
            return [session_id]
        self.sessions[session_id] = KeptSession(list(token_ids), adapter, source)
        evicted: list[str] = []
        while len(self.sessions) > self.max_kept_sessions or (
            self.num_free_tokens < 0 and len(self.sessions) > 0
        ):
            sid, _ = self.sessions.popitem(last=False)
            evicted.append(sid)
        return evicted

    def drop_session(self, session_id: str) -> bool:
        return self.sessions.pop(session_id, None) is not None

    # -- the step ---------------------------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        decoding = [s for s in self.running if s._decoding]
        # 1. Decodes: each needs one more slot. Evict kept sessions, then preempt the newest;
        #    a sequence that alone has outgrown the whole budget ends where it is.
        while decoding and self.num_free_tokens < len(decoding):
            if self.sessions:
                sid, _ = self.sessions.popitem(last=False)
                out.evicted_sessions.append(sid)
                continue
            victim = max(self.running, key=lambda s: s.arrival_order)
            if len(self.running) == 1:
                self.running.remove(victim)
                self._finish(victim, FinishReason.LENGTH)
                out.ended.append(victim)
            else:
                self._preempt(victim)
                out.preempted.append(victim)
            if victim in decoding:
                decoding.remove(victim)
        out.decodes = decoding

        # 2. Prefill: continue partial prefills first, then admit waiting sequences in order.
        budget = self.max_prefill_tokens_per_step
        free = self.num_free_tokens - len(decoding)
        for seq in list(self.running):
            if seq._decoding or budget <= 0:
                continue
            want = min(len(seq.token_ids) - seq.num_computed_tokens, budget)
            while want > free and self._evict_lru_session(out, set()):
                free = self.num_free_tokens - len(decoding) - self._pending_prefill(out)
            take = min(want, free)
            if take <= 0:
                continue
            end = seq.num_computed_tokens + take
            out.prefills.append(PrefillChunk(seq, seq.num_computed_tokens, end))
            budget -= take
            free -= take
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            if len(seq.token_ids) + 1 > self.kv_capacity_tokens:
                # Can never fit, even alone: fail it rather than wait forever.
                self.waiting.popleft()
                self._finish(seq, FinishReason.ERROR)
                out.ended.append(seq)
                continue
            session_id, reuse = self._reusable(seq)
            # Room needed to make progress: the first chunk. The reused prefix of a kept session
            # moves to the sequence; the rest of that session's KV is released on admission.
            first_end = min(len(seq.token_ids), reuse + budget)
            need = first_end - reuse
            released = len(self.sessions[session_id].token_ids) - reuse if session_id else 0
            protected = {session_id} if session_id else set()
            while need > free + released and self._evict_lru_session(out, protected):
                free = self.num_free_tokens - len(decoding) - self._pending_prefill(out)
            if need > free + released:
                break
            self.waiting.popleft()
            seq.status = SequenceStatus.RUNNING
            if session_id is not None:
                kept = self.sessions.pop(session_id)
                if seq.num_preemptions == 0:
                    seq.num_cached_prompt_tokens = reuse
                    seq.cache_source = kept.source
            seq.num_computed_tokens = reuse
            self.running.append(seq)
            out.prefills.append(PrefillChunk(seq, reuse, first_end, reuse_session=session_id))
            budget -= need
            free += released - need

        # 3. No progress possible with sequences still running (partial prefills holding KV
        #    that together exceed the budget): preempt the newest, or end a lone one.
        if not out.prefills and not out.decodes and self.running:
            victim = max(self.running, key=lambda s: s.arrival_order)
            if len(self.running) == 1:
                self.running.remove(victim)
                self._finish(victim, FinishReason.ERROR if not victim._decoding else FinishReason.LENGTH)
                out.ended.append(victim)
            else:
                self._preempt(victim)
                out.preempted.append(victim)
        return out

    def update(self, plan: SchedulerOutput, sampled: dict[str, int]) -> list[Sequence]:
        """Apply a step's sampled tokens (request id -> token id). Returns finished sequences
        (removed from ``running``; the caller frees or keeps their KV)."""
        finished: list[Sequence] = []
        for chunk in plan.prefills:
            seq = chunk.seq
            if seq.status is not SequenceStatus.RUNNING:
                continue
            seq.num_computed_tokens = chunk.end
            if chunk.samples:
                seq._decoding = True
                self._append(seq, sampled[seq.request_id], finished)
        for seq in plan.decodes:
            if seq.status is not SequenceStatus.RUNNING:
                continue
            seq.num_computed_tokens += 1
            self._append(seq, sampled[seq.request_id], finished)
        for seq in finished:
            self.running.remove(seq)
        return finished

    # -- internals ------------------------------------------------------------------------------
    def _append(self, seq: Sequence, token_id: int, finished: list[Sequence]) -> None:
        seq.token_ids.append(token_id)
        sp = seq.request.sampling
        num_generated = seq.output_position  # includes resume tokens
        reason: FinishReason | None = None
        if token_id in self.eos_token_ids and not sp.ignore_eos and num_generated >= sp.min_tokens:
            reason = FinishReason.STOP
        elif num_generated >= sp.max_tokens or len(seq.token_ids) >= self.max_model_len:
            reason = FinishReason.LENGTH
        if reason is not None:
            self._finish(seq, reason)
            finished.append(seq)

    def _finish(self, seq: Sequence, reason: FinishReason) -> Sequence:
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason
        return seq

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        seq.status = SequenceStatus.WAITING
        seq.num_computed_tokens = 0
        seq._decoding = False
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)

    def _reusable(self, seq: Sequence) -> tuple[str | None, int]:
        sid = seq.request.session_id
        if sid is None or sid not in self.sessions:
            return None, 0
        kept = self.sessions[sid]
        if kept.adapter != seq.request.adapter:
            return None, 0
        n = 0
        limit = min(len(kept.token_ids), len(seq.token_ids) - 1)  # keep >= 1 token to compute
        while n < limit and kept.token_ids[n] == seq.token_ids[n]:
            n += 1
        return (sid, n) if n > 0 else (None, 0)

    def _evict_lru_session(self, out: SchedulerOutput, protected: set[str]) -> bool:
        for sid in self.sessions:
            if sid not in protected:
                del self.sessions[sid]
                out.evicted_sessions.append(sid)
                return True
        return False

    def _pending_prefill(self, out: SchedulerOutput) -> int:
        return sum(c.end - c.start for c in out.prefills)
