"""The engine: scheduler + model runner glued by ``step()``, and its asyncio face.

:class:`LLMEngine` is synchronous: ``add_request``, ``step() -> list[TokenOutput]``, ``abort``.
``step`` is the only glue: schedule, execute, update. :class:`AsyncEngine` runs it on one
background thread (the only thread that touches the model and the KV), takes commands through a
queue and hands each request's tokens to the asyncio loop, so the HTTP layer never blocks.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
import uuid
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Callable

import torch

from replica.config import ReplicaConfig
from replica.loader import LoadedModel, load_model
from replica.protocol import FinishReason, GenerationRequest, KVIdentity, KVSnapshot, TokenOutput
from replica.replication import SessionReplicator
from replica.runner import ModelRunner, SessionKV
from replica.scheduler import Scheduler, SchedulerOutput, Sequence
from unbroken.contract.replication import Replication
from unbroken.errors import ContextLengthError, InvalidRequestError, ModelNotFoundError

log = logging.getLogger(__name__)


@dataclass
class EngineStats:
    num_running: int
    num_waiting: int
    kv_bytes_used: int
    kv_bytes_free: int
    kv_bytes_per_token: int
    device_memory_free_bytes: int
    tokens_per_s: float
    sessions: list[str]
    num_preemptions: int
    restore_outcomes: dict[str, int] = field(default_factory=dict)
    num_restored_tokens: int = 0
    num_snapshots_published: int = 0
    num_snapshots_dropped: int = 0


class _Throughput:
    """Generated tokens per second over a sliding window."""

    def __init__(self, window_s: float = 5.0) -> None:
        self.window_s = window_s
        self.events: deque[tuple[float, int]] = deque()

    def record(self, num_tokens: int, now: float) -> None:
        if num_tokens:
            self.events.append((now, num_tokens))
        while self.events and self.events[0][0] < now - self.window_s:
            self.events.popleft()

    def rate(self, now: float) -> float:
        self.record(0, now)
        return sum(n for _, n in self.events) / self.window_s


class LLMEngine:
    """Synchronous engine over one loaded model. Not thread-safe: one thread drives it."""

    def __init__(self, config: ReplicaConfig, loaded: LoadedModel | None = None,
                 kvsync: Replication | None = None) -> None:
        self.config = config
        self.loaded = loaded
        self.scheduler: Scheduler | None = None
        self.runner: ModelRunner | None = None
        self.transcripts: OrderedDict[str, list[dict[str, Any]]] = OrderedDict()
        self.replicator = SessionReplicator(kvsync, config.kvsync, self.identity) if kvsync is not None else None
        self.throughput = _Throughput()
        self.kv_capacity_bytes = 0
        if loaded is not None:
            self._setup()

    def load(self, progress: Callable[[str], None] = print) -> None:
        self.loaded = load_model(self.config.model, progress)
        self._setup()

    def _setup(self) -> None:
        assert self.loaded is not None
        loaded = self.loaded
        per_token = loaded.kv_bytes_per_token
        if loaded.device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(loaded.device)
            self.kv_capacity_bytes = int(free * self.config.engine.kv_cache_memory_fraction)
        else:
            self.kv_capacity_bytes = self.config.engine.kv_cache_bytes
        self.max_model_len = min(self.config.model.max_model_len, loaded.max_position_embeddings)
        self.eos_token_ids = _eos_ids(loaded)
        self.scheduler = Scheduler(
            kv_capacity_tokens=max(1, self.kv_capacity_bytes // per_token),
            max_num_seqs=self.config.engine.max_num_seqs,
            max_prefill_tokens_per_step=self.config.engine.max_prefill_tokens_per_step,
            max_kept_sessions=self.config.engine.max_kept_sessions,
            max_model_len=self.max_model_len,
            eos_token_ids=self.eos_token_ids,
        )
        self.runner = ModelRunner(loaded)
        self.runner.eos_ids = sorted(self.eos_token_ids)

    # -- identity ----------------------------------------------------------------------------
    @property
    def served_name(self) -> str:
        return self.config.model.served_name

    def identity(self, adapter: str | None) -> KVIdentity:
        assert self.loaded is not None
        return KVIdentity(
            model=self.served_name,
            revision=self.loaded.revision,
            adapter=adapter,
            dtype=str(self.loaded.dtype).removeprefix("torch."),
            num_layers=self.loaded.num_layers,
            num_kv_heads=self.loaded.num_kv_heads,
            head_dim=self.loaded.head_dim,
        )

    # -- requests --------------------------------------------------------------------------------
    def validate(self, request: GenerationRequest) -> None:
        """Raise the client's error before a request enters the engine."""
        assert self.loaded is not None
        if request.adapter is not None and request.adapter not in self.loaded.adapter_names:
            raise ModelNotFoundError(
                f"adapter {request.adapter!r} is not loaded; available: "
                f"{', '.join(self.loaded.adapter_names) or 'none'}", param="model")
        context = len(request.prompt_token_ids) + len(request.resume_token_ids)
        if len(request.prompt_token_ids) == 0:
            raise InvalidRequestError("the prompt is empty", param="prompt")
        if context >= self.max_model_len:
            raise ContextLengthError(
                f"the prompt has {context} tokens; this model's context is {self.max_model_len} "
                "tokens and at least one must be left to generate", param="messages")
        assert self.scheduler is not None
        if context + 1 > self.scheduler.kv_capacity_tokens:
            raise ContextLengthError(
                f"the prompt has {context} tokens; this replica's KV budget holds "
                f"{self.scheduler.kv_capacity_tokens}", param="messages")

    def add_request(self, request: GenerationRequest) -> None:
        self.validate(request)
        assert self.scheduler is not None
        self.scheduler.add(Sequence.from_request(request))

    def abort(self, request_id: str) -> TokenOutput | None:
        assert self.scheduler is not None and self.runner is not None
        seq = self.scheduler.abort(request_id)
        if seq is None:
            return None
        self.runner.free(request_id)
        if self.replicator is not None:
            self.replicator.forget_request(request_id)
        return TokenOutput(request_id, None, FinishReason.CANCELLED)

    def has_unfinished(self) -> bool:
        return self.scheduler is not None and self.scheduler.has_unfinished()

    def step(self) -> list[TokenOutput]:
        """Schedule, execute, update. Returns one output per request that advanced or ended."""
        assert self.scheduler is not None and self.runner is not None
        plan = self.scheduler.schedule()
        sampled = self.runner.execute(plan)  # an empty plan still applies its frees and evictions
        finished = [] if plan.is_empty else self.scheduler.update(plan, sampled)
        return self._report(plan, sampled, finished)

    def _report(self, plan: SchedulerOutput, sampled: dict[str, int], finished: list[Sequence]) -> list[TokenOutput]:
        """The step's outputs; finished sequences leave (keeping their session's KV) and running
        sessions are replicated when due."""
        assert self.scheduler is not None and self.runner is not None
        outputs = [TokenOutput(s.request_id, None, s.finish_reason,
                               error="the request does not fit this replica's KV budget"
                               if s.finish_reason is FinishReason.ERROR else None)
                   for s in plan.ended]
        if plan.is_empty:
            return outputs
        self.throughput.record(len(sampled), time.monotonic())
        finished_ids = {s.request_id for s in finished}
        for seq in [chunk.seq for chunk in plan.prefills] + list(plan.decodes):
            if seq.request_id in sampled and seq.request_id not in finished_ids:
                outputs.append(self._output(seq, sampled[seq.request_id], None))
        for seq in finished:
            outputs.append(self._output(seq, sampled[seq.request_id], seq.finish_reason))
            self._leave(seq)
        if self.replicator is not None:
            self.replicator.after_step(self.runner)
        return outputs

    def _leave(self, seq: Sequence) -> None:
        assert self.scheduler is not None and self.runner is not None
        if self.replicator is not None:
            self.replicator.forget_request(seq.request_id)
        keep = seq.request.session_id is not None and seq.finish_reason is not FinishReason.ERROR
        kept = self.runner.finish(seq, keep_session=keep)
        if kept is not None:
            evicted = self.scheduler.keep_session(seq.request.session_id, kept.token_ids, kept.adapter)
            for sid in evicted:
                self.runner.sessions.pop(sid, None)

    def _output(self, seq: Sequence, token: int, reason: FinishReason | None) -> TokenOutput:
        first = not seq.reported_cache
        seq.reported_cache = True
        sid = seq.request.session_id
        if first and sid is not None and self.replicator is not None:
            self.replicator.on_prefix_reused(sid, seq.num_cached_prompt_tokens)
        return TokenOutput(
            seq.request_id, token, reason,
            num_cached_prompt_tokens=seq.num_cached_prompt_tokens if first else 0,
            cache_source=seq.cache_source if first else None,
        )

    # -- sessions, export and import ------------------------------------------------------------------
    def export_session(self, session_id: str) -> KVSnapshot | None:
        assert self.runner is not None
        kept = self.runner.sessions.get(session_id)
        if kept is None:
            return None
        return KVSnapshot(
            session_id=session_id,
            identity=self.identity(kept.adapter),
            token_ids=list(kept.token_ids),
            keys=[k.to("cpu", copy=True) for k in kept.keys],
            values=[v.to("cpu", copy=True) for v in kept.values],
            transcript=self.transcripts.get(session_id),
        )

    def import_session(self, snapshot: KVSnapshot, source: str = "restored") -> int:
        """Keep a snapshot's KV for its session, so the next turn continues from it."""
        assert self.runner is not None and self.scheduler is not None and self.loaded is not None
        mine = self.identity(snapshot.identity.adapter)
        if snapshot.identity != mine:
            raise InvalidRequestError(
                f"KV snapshot identity {snapshot.identity.to_dict()} does not match this replica's "
                f"{mine.to_dict()}", param="identity")
        if snapshot.start != 0:
            raise InvalidRequestError("only a full snapshot (start = 0) can be imported")
        n = len(snapshot.token_ids)
        shape = (self.loaded.num_kv_heads, n, self.loaded.head_dim)
        if len(snapshot.keys) != self.loaded.num_layers or len(snapshot.values) != self.loaded.num_layers or any(
            tuple(t.shape) != shape for t in list(snapshot.keys) + list(snapshot.values)
        ):
            raise InvalidRequestError(f"KV snapshot tensors do not have shape {shape} per layer")
        if n == 0 or n >= self.max_model_len:
            raise InvalidRequestError(f"KV snapshot of {n} tokens cannot be imported")
        device, dtype = self.loaded.device, self.loaded.dtype
        self.runner.sessions[snapshot.session_id] = SessionKV(
            token_ids=list(snapshot.token_ids),
            keys=[k.to(device=device, dtype=dtype) for k in snapshot.keys],
            values=[v.to(device=device, dtype=dtype) for v in snapshot.values],
            adapter=snapshot.identity.adapter,
        )
        evicted = self.scheduler.keep_session(snapshot.session_id, snapshot.token_ids,
                                              snapshot.identity.adapter, source=source)
        for sid in evicted:
            self.runner.sessions.pop(sid, None)
        if snapshot.session_id in evicted:
            return 0
        if snapshot.transcript is not None:
            self.set_transcript(snapshot.session_id, snapshot.transcript)
        if self.replicator is not None:
            self.replicator.on_imported(snapshot.session_id, n)
        return n

    def set_transcript(self, session_id: str, transcript: list[dict[str, Any]]) -> None:
        self.transcripts[session_id] = transcript
        self.transcripts.move_to_end(session_id)
        while len(self.transcripts) > max(1, self.config.engine.max_kept_sessions):
            self.transcripts.popitem(last=False)

    def finish_turn(self, session_id: str, transcript: list[dict[str, Any]]) -> None:
        """Record a turn's conversation and replicate the session's kept KV with it."""
        assert self.runner is not None
        self.set_transcript(session_id, transcript)
        kept = self.runner.sessions.get(session_id)
        if self.replicator is not None and kept is not None:
            self.replicator.after_turn(session_id, kept, transcript)

    # -- state -----------------------------------------------------------------------------------------
    def stats(self) -> EngineStats:
        assert self.scheduler is not None and self.loaded is not None and self.runner is not None
        per_token = self.loaded.kv_bytes_per_token
        used = self.scheduler.num_used_tokens * per_token
        if self.loaded.device.type == "cuda":
            device_free = int(torch.cuda.mem_get_info(self.loaded.device)[0])
        else:
            device_free = _host_available_bytes()
        return EngineStats(
            num_running=len(self.scheduler.running),
            num_waiting=len(self.scheduler.waiting),
            kv_bytes_used=used,
            kv_bytes_free=max(0, self.kv_capacity_bytes - used),
            kv_bytes_per_token=per_token,
            device_memory_free_bytes=device_free,
            tokens_per_s=round(self.throughput.rate(time.monotonic()), 2),
            sessions=list(self.scheduler.sessions),
            num_preemptions=self.scheduler.num_preemptions,
            num_snapshots_published=self.replicator.num_published if self.replicator else 0,
            num_snapshots_dropped=self.replicator.num_dropped if self.replicator else 0,
        )


def _eos_ids(loaded: LoadedModel) -> set[int]:
    ids: set[int] = set()
    gen = getattr(loaded.model, "generation_config", None)
    eos = getattr(gen, "eos_token_id", None)
    if isinstance(eos, int):
        ids.add(eos)
    elif eos:
        ids.update(int(e) for e in eos)
    if loaded.tokenizer.eos_token_id is not None:
        ids.add(int(loaded.tokenizer.eos_token_id))
    return ids


def _host_available_bytes() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


# -- the asyncio face ---------------------------------------------------------------------------------

_STOP = object()


class AsyncEngine:
    """Runs :class:`LLMEngine` on one background thread; the HTTP layer awaits its tokens."""

    def __init__(self, config: ReplicaConfig, kvsync_client: Replication | None = None,
                 loaded: LoadedModel | None = None) -> None:
        self.config = config
        self.kvsync = kvsync_client
        self.engine = LLMEngine(config, loaded, kvsync_client)
        self._commands: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._streams: dict[str, asyncio.Queue[TokenOutput]] = {}
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stats: EngineStats | None = None
        self._kept_sessions: frozenset[str] = frozenset()
        self.restore_outcomes: dict[str, int] = {}
        self.num_restored_tokens = 0
        self.last_restore_s = 0.0
        self._stopping = False

    # -- facts about the loaded model -------------------------------------------------------------------
    def load(self, progress: Callable[[str], None] = print) -> None:
        self.engine.load(progress)

    @property
    def loaded(self) -> LoadedModel:
        assert self.engine.loaded is not None, "load() first"
        return self.engine.loaded

    @property
    def tokenizer(self) -> Any:
        return self.loaded.tokenizer

    @property
    def max_model_len(self) -> int:
        return self.engine.max_model_len

    @property
    def served_name(self) -> str:
        return self.engine.served_name

    @property
    def adapter_names(self) -> list[str]:
        return list(self.loaded.adapter_names)

    @property
    def quantization(self) -> str:
        return self.loaded.quantization

    @property
    def dtype(self) -> str:
        return str(self.loaded.dtype).removeprefix("torch.")

    @property
    def device(self) -> str:
        return str(self.loaded.device)

    @property
    def eos_token_ids(self) -> set[int]:
        return set(self.engine.eos_token_ids)

    def identity(self, adapter: str | None) -> KVIdentity:
        return self.engine.identity(adapter)

    # -- lifecycle -----------------------------------------------------------------------------------------
    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stats = self.engine.stats()
        self._thread = threading.Thread(target=self._run, name="engine", daemon=True)
        self._thread.start()

    async def stop(self) -> None:
        if self._thread is None:
            return
        self._commands.put(_STOP)
        await asyncio.get_running_loop().run_in_executor(None, self._thread.join, 30)
        self._thread = None

    # -- requests ------------------------------------------------------------------------------------------
    async def generate(self, request: GenerationRequest) -> AsyncIterator[TokenOutput]:
        """Yield one :class:`TokenOutput` per token; leaving early aborts the request."""
        self.engine.validate(request)
        if request.session_id and self.kvsync is not None and request.session_id not in self._kept_sessions:
            await self._restore(request.session_id, request.adapter)
        if not request.request_id:
            request.request_id = uuid.uuid4().hex
        stream: asyncio.Queue[TokenOutput] = asyncio.Queue()
        self._streams[request.request_id] = stream
        self._commands.put(("add", request))
        finished = False
        try:
            while True:
                out = await stream.get()
                if out.finish_reason is not None:
                    finished = True
                yield out
                if finished:
                    return
        finally:
            self._streams.pop(request.request_id, None)
            if not finished:
                self._commands.put(("abort", request.request_id))

    def abort(self, request_id: str) -> None:
        self._commands.put(("abort", request_id))

    async def _call(self, name: str, *args: Any) -> Any:
        """Run an engine method on the engine thread and await its result."""
        assert self._loop is not None
        fut: asyncio.Future[Any] = self._loop.create_future()
        self._commands.put(("call", name, args, fut))
        return await fut

    async def export_session(self, session_id: str) -> KVSnapshot | None:
        return await self._call("export_session", session_id)

    async def import_session(self, snapshot: KVSnapshot) -> int:
        return await self._call("import_session", snapshot)

    async def session_transcript(self, session_id: str) -> list[dict[str, Any]] | None:
        transcript = await self._call("_transcript", session_id)
        if transcript is None and self.kvsync is not None:
            await self._restore(session_id, None)
            transcript = await self._call("_transcript", session_id)
        return transcript

    def finish_turn(self, session_id: str, transcript: list[dict[str, Any]]) -> None:
        self._commands.put(("finish_turn", session_id, transcript))

    def stats(self) -> EngineStats:
        stats = self._stats or self.engine.stats()
        stats.restore_outcomes = dict(self.restore_outcomes)
        stats.num_restored_tokens = self.num_restored_tokens
        return stats

    async def _restore(self, session_id: str, adapter: str | None) -> None:
        """Fetch the session's newest snapshot through kvsync and import it. Never raises:
        a miss, a mismatch or a timeout only means the prompt is prefilled from scratch."""
        assert self.kvsync is not None
        t0 = time.monotonic()
        timeout_s = self.config.kvsync.fetch_timeout_s
        try:
            result = await asyncio.wait_for(
                self.kvsync.fetch(session_id, self.identity(adapter), timeout_s), timeout_s + 0.5)
            outcome = result.outcome
            if result.snapshot is not None:
                try:
                    n = await self._call("import_session", result.snapshot)
                    self.num_restored_tokens += n
                except InvalidRequestError as e:
                    log.warning("kvsync snapshot for session %s refused: %s", session_id, e.message)
                    outcome = "mismatch"
            elif result.transcript is not None:
                await self._call("set_transcript", session_id, result.transcript)
            if result.snapshot is not None and result.transcript is not None and outcome == "restored":
                await self._call("set_transcript", session_id, result.transcript)
        except asyncio.TimeoutError:
            outcome = "timeout"
        except Exception:  # noqa: BLE001 - a restore must never fail the request
            log.exception("kvsync restore of session %s failed", session_id)
            outcome = "error"
        self.restore_outcomes[outcome] = self.restore_outcomes.get(outcome, 0) + 1
        self.last_restore_s = time.monotonic() - t0

    # -- the engine thread ---------------------------------------------------------------------------------
    def _run(self) -> None:
        engine = self.engine
        last_stats_s = 0.0
        while True:
            block = not engine.has_unfinished()
            try:
                command = self._commands.get(timeout=0.5) if block else self._commands.get_nowait()
            except queue.Empty:
                command = None
            batch = [command] if command is not None else []
            while True:
                try:
                    batch.append(self._commands.get_nowait())
                except queue.Empty:
                    break
            outputs: list[TokenOutput] = []
            for cmd in batch:
                if cmd is _STOP:
                    self._stopping = True
                    continue
                outputs.extend(self._apply(cmd))
            if self._stopping and not engine.has_unfinished():
                self._deliver(outputs)
                return
            if engine.has_unfinished():
                try:
                    outputs.extend(engine.step())
                except Exception as e:  # noqa: BLE001 - fail the running requests, keep serving
                    log.exception("engine step failed")
                    outputs.extend(self._fail_all(str(e)))
            now = time.monotonic()
            if now - last_stats_s >= 0.05 or not engine.has_unfinished():
                self._stats = engine.stats()  # the heartbeat reads this copy
                last_stats_s = now
            assert engine.scheduler is not None
            self._kept_sessions = frozenset(engine.scheduler.sessions)
            self._deliver(outputs)

    def _apply(self, cmd: tuple[Any, ...]) -> list[TokenOutput]:
        kind = cmd[0]
        engine = self.engine
        if kind == "add":
            request = cmd[1]
            if request.request_id not in self._streams:
                return []  # the caller already left
            try:
                engine.add_request(request)
            except Exception as e:  # noqa: BLE001
                return [TokenOutput(request.request_id, None, FinishReason.ERROR, error=str(e))]
            return []
        if kind == "abort":
            out = engine.abort(cmd[1])
            return [out] if out is not None else []
        if kind == "finish_turn":
            try:
                engine.finish_turn(cmd[1], cmd[2])
            except Exception:  # noqa: BLE001
                log.exception("finish_turn failed")
            return []
        if kind == "call":
            _, name, args, fut = cmd
            try:
                if name == "_transcript":
                    result: Any = engine.transcripts.get(args[0])
                else:
                    result = getattr(engine, name)(*args)
                self._resolve(fut, result, None)
            except Exception as e:  # noqa: BLE001
                self._resolve(fut, None, e)
            return []
        raise ValueError(f"unknown engine command {kind!r}")

    def _resolve(self, fut: asyncio.Future[Any], result: Any, error: BaseException | None) -> None:
        assert self._loop is not None

        def settle() -> None:
            if fut.done():
                return
            if error is not None:
                fut.set_exception(error)
            else:
                fut.set_result(result)

        self._loop.call_soon_threadsafe(settle)

    def _fail_all(self, message: str) -> list[TokenOutput]:
        engine = self.engine
        assert engine.scheduler is not None
        outs = []
        for seq in list(engine.scheduler.running) + list(engine.scheduler.waiting):
            engine.abort(seq.request_id)
            outs.append(TokenOutput(seq.request_id, None, FinishReason.ERROR, error=message))
        return outs

    def _deliver(self, outputs: list[TokenOutput]) -> None:
        if not outputs or self._loop is None:
            return

        def hand_over() -> None:
            for out in outputs:
                stream = self._streams.get(out.request_id)
                if stream is not None:
                    stream.put_nowait(out)

        try:
            self._loop.call_soon_threadsafe(hand_over)
        except RuntimeError:  # the loop is closed: nobody is listening any more
            pass


__all__ = ["AsyncEngine", "EngineStats", "LLMEngine"]
