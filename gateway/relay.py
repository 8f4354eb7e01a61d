"""Sending a client request to replicas: retries before the first byte, hedging, and the SSE relay
with token-exact mid-stream failover.

Streams: an attempt is *open* once the replica has sent its first content event (a token or the
end); events before it (the role chunk) are held. Until then nothing has reached the client, so a
failed attempt is retried on another replica (``retry.py``) and the client never sees it. Once open,
the gateway commits (sends headers, the role chunk and the first token) and relays event by event,
recording the ``token_ids`` of every choice it forwards. If the replica dies (connection error),
stalls (no event within ``stall_timeout_s``), is declared unhealthy by the heartbeats (a hang or a
partition: every wait on it expires at once), sends an error it is to blame for, or closes early,
the request is re-sent to another replica with ``resume_token_ids`` = every id forwarded so far;
the new replica's role chunk is dropped, and its chunks' ``id``, ``created`` and ``model`` are
rewritten to the original ones. The client sees one stream: no repeated role chunk, no duplicated
or missing token, the same id. vLLM and SGLang take part through the token route
(``tokenroute.py``): a stream for a model with a tokenizer goes to them by token ids, its events are
translated back to chunks with ``token_ids`` as they are read, and it resumes there with the prompt's
ids plus those sent. Requests whose state could not move (``n > 1``, several prompts,
``logprobs``, ``echo``) are refused at the edge by the contract.

Non-stream requests are forwarded as non-stream and retried whole (nothing has been sent yet).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable

import aiohttp
import orjson
from aiohttp import web

from gateway.backends.errors import engine_error, is_error_event
from gateway.config import GatewayConfig
from gateway.health import HealthMonitor
from gateway.lease import AttemptLease, Outcome
from gateway.metrics import GatewayMetrics
from gateway.policies import RouteRequest, RoutingPolicy
from gateway.protocol import ClientRequest
from gateway.replicaset import Replica, ReplicaSet, ReplicaState
from gateway.resume import for_engine, resume_body
from gateway.retry import AttemptError, RetryExecutor
from gateway.stream_rewrite import DONE, ResumePoint, StreamRewriter
from gateway.streamstate import StreamRecord, StreamStateStore
from gateway.tokenizer import ChatTokenizer
from gateway.tokenroute import TOKEN_ROUTE_KINDS, EngineStreamTranslator, TokenRoute
from unbroken.errors import (
    ClientError,
    InvalidRequestError,
    NoReplicaError,
    OverloadedError,
    UnbrokenError,
    UpstreamError,
)
from unbroken.http import sse_error_event

log = logging.getLogger(__name__)

NO_REPLICA_POLL_S = 0.05
NO_REPLICA_LOG_EVERY_S = 10.0  # per replica and model: an outage logs its reasons, not every request
# A chunk this small written to a client with nothing buffered cannot reach the transport's
# high-water mark (64 KiB by default in asyncio and uvloop), so its write cannot block.
UNTIMED_WRITE_MAX_BYTES = 16 * 1024


class _watched:
    """``asyncio.timeout(timeout_s)`` that also expires at once when ``rep`` is declared unhealthy
    (:meth:`Replica.expire_waits`): a hung or partitioned replica's in-flight work moves on within
    the heartbeat's detection bound, not after the stall or response timeout."""

    __slots__ = ("rep", "cm")

    def __init__(self, rep: Replica, timeout_s: float) -> None:
        self.rep = rep
        self.cm = asyncio.timeout(timeout_s)

    async def __aenter__(self) -> None:
        await self.cm.__aenter__()
        self.rep.waits.add(self.cm)

    async def __aexit__(self, *exc: Any) -> bool | None:
        self.rep.waits.discard(self.cm)
        return await self.cm.__aexit__(*exc)


def _timeout_reason(rep: Replica, default: str = "timeout") -> str:
    """``lost`` when the wait ended because the replica was declared unhealthy."""
    return "lost" if rep.state is ReplicaState.UNHEALTHY else default
_CONNECT_ERRORS = (aiohttp.ClientConnectorError, ConnectionRefusedError)
_BROKEN_ERRORS = (aiohttp.ClientError, ConnectionError, OSError, asyncio.IncompleteReadError)


def _json_object(body: bytes) -> dict[str, Any] | None:
    try:
        parsed = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    return parsed if isinstance(parsed, dict) else None


def _io_failure(rep: Replica, e: BaseException, timeout_message: str) -> tuple[UnbrokenError, str]:
    """An exception of the I/O with ``rep`` as the error and the attempt's reason."""
    if isinstance(e, TimeoutError):
        return UpstreamError(f"replica {rep.replica_id} {timeout_message}"), _timeout_reason(rep)
    if isinstance(e, _CONNECT_ERRORS):
        return UpstreamError(f"replica {rep.replica_id} unreachable: {e}"), "connect"
    return UpstreamError(f"replica {rep.replica_id} failed: {e}"), "closed"


def _is_content_event(obj: dict[str, Any]) -> bool:
    choices = obj.get("choices")
    if not choices:
        return "usage" in obj and obj["usage"] is not None
    for ch in choices:
        if ch.get("token_ids") or ch.get("finish_reason") or ch.get("text"):
            return True
        delta = ch.get("delta")
        if delta and delta.get("content"):
            return True
    return False


@dataclass
class RequestContext:
    """One client request on its way through the gateway."""

    req: ClientRequest
    request_id: str
    started_s: float
    deadline_s: float
    forward_headers: dict[str, str]
    route: RouteRequest
    tried: set[Replica] = field(default_factory=set)
    num_retries: int = 0
    num_failovers: int = 0
    replica: Replica | None = None
    status: int = 0
    tiers: list[str] = field(default_factory=list)
    num_completion_tokens: int = 0
    num_prompt_tokens: int = 0  # from the replica's usage event, when the stream carries one
    # While a broken stream is being resumed: the resume modes a replica must offer for this route.
    resume_modes: frozenset[str] | None = None
    state: StreamRecord | None = None  # a resumable stream's state, kept in ``Relay.streams``
    resume: ResumePoint | None = None  # a client's reconnect: where its stream continues
    # While a stream is being resumed: the ids the client has (the token route sends them to vLLM/SGLang).
    resume_ids: list[int] | None = None
    token_route: TokenRoute | None = None  # the request's way to vLLM and SGLang by ids, when its model has one


def _without_ids(mode: str) -> str:
    """A vLLM or SGLang replica's resume mode off the token route: it has no ids to continue from."""
    return "text" if mode == "token" else mode


class Upstream:
    """An open response from one replica; its lease holds the replica's in-flight slot until
    :meth:`finish`."""

    def __init__(self, lease: AttemptLease, resp: aiohttp.ClientResponse,
                 translator: EngineStreamTranslator | None = None) -> None:
        lease.attach(resp)
        self.translator = translator  # the token route: the engine's events as the client's chunks
        self.lease = lease
        self.replica = lease.replica
        self.resp = resp
        self.prefix: list[bytes] = []  # events before the first content event (the role chunk)
        self.first_obj: dict[str, Any] | None = None
        self.pending: list[bytes] = []  # payloads read but not yet relayed (from the first content event on)
        self._buf = b""

    async def read_batch(self) -> list[bytes] | None:
        """The SSE ``data:`` payloads of the next network read(s): at least one, or None at the end.
        Reading in batches lets a fast replica's events be relayed several per write. On the token
        route they are the translated chunks."""
        while True:
            batch = await self._read_payloads()
            if batch is None or self.translator is None:
                return batch
            batch = self.translator.feed(batch)
            if batch:
                return batch

    async def _read_payloads(self) -> list[bytes] | None:
        content = self.resp.content
        while True:
            data = await content.readany()
            if not data:
                return None
            buf = self._buf + data if self._buf else data
            if b"\n\n" not in buf:
                self._buf = buf
                continue
            blocks = buf.split(b"\n\n")
            self._buf = blocks.pop()
            out: list[bytes] = []
            for block in blocks:
                if block.startswith(b"data:"):
                    out.append(block[5:].strip())
                elif b"data:" in block:  # comments or other fields first
                    for line in block.split(b"\n"):
                        if line.startswith(b"data:"):
                            out.append(line[5:].strip())
            if out:
                return out

    def take_pending(self) -> list[bytes]:
        batch, self.pending = self.pending, []
        return batch

    def finish(self, outcome: Outcome) -> None:
        """End the attempt (the first call counts): see :meth:`AttemptLease.release`."""
        self.lease.release(outcome)


class TTFTTracker:
    """Recent first-byte times, for the hedge delay (near the observed p95)."""

    def __init__(self, size: int = 256) -> None:
        self._samples: deque[float] = deque(maxlen=size)
        self._count = 0
        self._p95_s = 0.0

    def observe(self, seconds: float) -> None:
        self._samples.append(seconds)
        self._count += 1
        if self._count % 32 == 0 or len(self._samples) < 32:
            ordered = sorted(self._samples)
            self._p95_s = ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))]

    @property
    def p95_s(self) -> float:
        return self._p95_s


class Relay:
    def __init__(self, config: GatewayConfig, replicas: ReplicaSet, policy: RoutingPolicy,
                 health: HealthMonitor, executor: RetryExecutor, metrics: GatewayMetrics) -> None:
        self.config = config
        self.replicas = replicas
        self.policy = policy
        self.health = health
        self.executor = executor
        self.metrics = metrics
        self.ttft = TTFTTracker()
        self.streams: StreamStateStore | None = None  # resumable streams' state (set by the server)
        # Models whose streams go to vLLM and SGLang by token ids (replicas.tokenizers), loaded at start.
        self.tokenizers: dict[str, ChatTokenizer] = {
            model: ChatTokenizer.load(path) for model, path in config.replicas.tokenizers.items()}
        self.session: aiohttp.ClientSession | None = None
        rc = config.replicas
        self._auth_header = {"Authorization": f"Bearer {rc.shared_token}"} if rc.shared_token else {}
        self._nonstream_timeout = aiohttp.ClientTimeout(total=rc.nonstream_timeout_s, sock_connect=rc.connect_timeout_s)
        self._stream_timeout = aiohttp.ClientTimeout(total=None, sock_connect=rc.connect_timeout_s)
        self._attempt_counters: dict[tuple[str, str], Any] = {}
        self._no_replica_logged: dict[tuple[str, str], float] = {}

    async def start(self) -> None:
        self.session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0, limit_per_host=self.config.replicas.max_connections_per_replica,
                                           ttl_dns_cache=300, enable_cleanup_closed=True),
            headers=self._auth_header, skip_auto_headers=("User-Agent",),
            json_serialize=lambda o: orjson.dumps(o).decode(),
        )

    async def stop(self) -> None:
        if self.session is not None:
            await self.session.close()
            self.session = None

    # -- selection -------------------------------------------------------------------------------

    def select(self, ctx: RequestContext) -> AttemptLease:
        """Pick a replica for ``ctx`` and take a lease on it (released once, by the attempt)."""
        model = ctx.req.model
        now = time.monotonic()
        modes = ctx.resume_modes

        def usable(reps: list[Replica]) -> list[Replica]:
            # a replica that answered 429 is left alone until its Retry-After; while resuming, only
            # replicas that can continue the stream in a mode we have the state for
            out = [r for r in reps if r.cooldown_until_s <= now
                   and (modes is None or self.resume_mode(r, ctx.req) in modes)]
            if modes is not None and "token" in modes:  # an exact resume wherever one can be had
                exact = [r for r in out if self.resume_mode(r, ctx.req) == "token"]
                return exact or out
            return out

        cands = usable(self.replicas.candidates(model, ctx.tried))
        if not cands:
            cands = usable(self.replicas.candidates(model))  # every one was tried: after backoff, try again
        if not cands and ctx.req.adapter and self.config.routing.adapter_affinity:
            cands = usable(self.replicas.candidates(ctx.req.base_model))
        rep = self.policy.select(cands, ctx.route) if cands else None
        if rep is None:
            why = "none can resume this stream" if modes is not None and self.replicas.candidates(model) else ""
            self.log_no_replica(model, why)
            err = NoReplicaError(f"no replica in rotation can serve model {model!r} right now"
                                 + (f" ({why})" if why else ""), retry_after_s=self.config.degradation.retry_after_s)
            raise AttemptError(err, None, "no_replica")
        ctx.tried.add(rep)
        return AttemptLease(rep)

    def resume_mode(self, rep: Replica, req: ClientRequest) -> str:
        """How a stream of ``req`` on ``rep`` resumes, and how one resumes there: ``token`` for vLLM
        and SGLang when the model has a tokenizer (the token route) unless ``replicas.resume`` turns
        the kind down; else the kind's own mode."""
        mode = rep.resume_mode(req.route)
        if rep.kind not in TOKEN_ROUTE_KINDS:
            return mode
        if req.stream and req.base_model in self.tokenizers and self._token_route_allowed(rep):
            return "token"
        return _without_ids(mode)

    def _token_route_allowed(self, rep: Replica) -> bool:
        """Whether ``replicas.resume`` lets ``rep``'s kind (vLLM, SGLang) take streams by token ids."""
        return self.config.replicas.resume.get(rep.kind, "token") == "token"

    def _token_route(self, ctx: RequestContext, rep: Replica) -> TokenRoute | None:
        if rep.kind not in TOKEN_ROUTE_KINDS or self.resume_mode(rep, ctx.req) != "token":
            return None
        if ctx.token_route is None or ctx.token_route.model != ctx.req.base_model:  # a fallback model
            ctx.token_route = TokenRoute(ctx.req, self.tokenizers[ctx.req.base_model])
        return ctx.token_route

    def admin_resume(self, rep: Replica) -> dict[str, Any]:
        """``rep``'s resume modes for ``/admin/replicas``: per route, and the models it resumes by
        token ids (the token route)."""
        out: dict[str, Any] = {"chat": rep.resume_chat, "completions": rep.resume_completions}
        if rep.kind not in TOKEN_ROUTE_KINDS:
            return out
        out = {route: _without_ids(mode) for route, mode in out.items()}
        if self._token_route_allowed(rep):
            token_models = sorted(m for m in self.tokenizers if not rep.models or m in rep.models)
            if token_models:
                out = {"chat": "token", "completions": "token", "token_models": token_models, "otherwise": out}
        return out

    def log_no_replica(self, model: str, headline: str = "") -> None:
        """Say why no replica could take a request for ``model``: one line per replica and reason,
        at most every :data:`NO_REPLICA_LOG_EVERY_S` per replica."""
        now = time.monotonic()
        last = self._no_replica_logged
        reasons = []
        for rep in self.replicas:
            why = self.replicas.why_not_routable(rep, model, now) or "in rotation but refused by routing"
            key = (rep.url, model)
            if now - last.get(key, -NO_REPLICA_LOG_EVERY_S) >= NO_REPLICA_LOG_EVERY_S:
                last[key] = now
                reasons.append(f"{rep.replica_id} ({rep.kind}): {why}")
        if reasons:
            log.warning("no_replica_available for model %r%s: %s", model, f" ({headline})" if headline else "",
                        "; ".join(reasons))
        elif not len(self.replicas) and now - last.get(("", model), -NO_REPLICA_LOG_EVERY_S) >= NO_REPLICA_LOG_EVERY_S:
            last[("", model)] = now
            log.warning("no_replica_available for model %r: no replica is configured or discovered", model)

    def _cool_down(self, rep: Replica, retry_after: str | None) -> float:
        """``rep`` answered 429: keep it out of routing for its Retry-After (seconds form; the
        default when absent or unreadable), capped."""
        rc = self.config.replicas
        try:
            wait_s = float(retry_after) if retry_after is not None else rc.retry_after_default_s
        except ValueError:
            wait_s = rc.retry_after_default_s
        wait_s = min(max(0.0, wait_s), rc.retry_after_max_s)
        rep.cooldown_until_s = max(rep.cooldown_until_s, time.monotonic() + wait_s)
        self.metrics.replica_rate_limited.labels(rep.replica_id).inc()
        log.info("replica %s answered 429%s; kept out of routing for %.1fs", rep.replica_id,
                 f" (Retry-After: {retry_after})" if retry_after is not None else " without Retry-After", wait_s)
        return wait_s

    def _count_attempt(self, rep: Replica, outcome: str) -> None:
        key = (rep.replica_id, outcome)
        c = self._attempt_counters.get(key)
        if c is None:
            c = self._attempt_counters[key] = self.metrics.upstream_attempts.labels(rep.replica_id, outcome)
        c.inc()

    def _fail(self, lease: AttemptLease, err: UnbrokenError, reason: str,
              outcome: Outcome = Outcome.FAILURE) -> AttemptError:
        """End a failed attempt: release its lease with ``outcome``, count it, and return the error
        for the retry executor."""
        lease.release(outcome)
        rep = lease.replica
        if reason == "connect":
            self.health.mark_suspect(rep, err.message)
        self._count_attempt(rep, reason)
        return AttemptError(err, rep, reason)

    def _refused(self, lease: AttemptLease, err: UnbrokenError) -> AttemptError:
        """The replica answered ``err`` instead of a stream or a body: the replica's fault or not."""
        if err.blames_replica:
            return self._fail(lease, err, "status_5xx")
        return self._fail(lease, err, "overloaded", Outcome.NEUTRAL)

    # -- retries and hedging ---------------------------------------------------------------------

    def _hooks(self, ctx: RequestContext) -> "_Hooks":
        return _Hooks(ctx, self.metrics)

    def hedge_delay_s(self) -> float:
        rc = self.config.retry
        p95 = self.ttft.p95_s or rc.hedge_delay_max_ms / 1000.0
        return min(max(p95, rc.hedge_delay_min_ms / 1000.0), rc.hedge_delay_max_ms / 1000.0)

    async def _with_retries(self, ctx: RequestContext, attempt: Callable[[], Awaitable[Any]]) -> Any:
        hedge = ctx.req.priority == "critical" and self.config.retry.hedge_critical

        async def one(_n: int) -> Any:
            if hedge and len(self.replicas.candidates(ctx.req.model, ctx.tried)) >= 2:
                return await self._hedged(attempt)
            return await attempt()

        # No replica at all is not retried by the executor (it is no replica's fault, and retrying
        # would spend the budget); it is waited out here, briefly, polling for one.
        wait_until = min(ctx.deadline_s, time.monotonic() + self.config.replicas.no_replica_wait_s)
        while True:
            try:
                return await self.executor.run(one, max_attempts=self.executor.max_attempts_for(ctx.req.priority),
                                               deadline_s=ctx.deadline_s, hooks=self._hooks(ctx))
            except AttemptError as e:
                if e.reason != "no_replica" or time.monotonic() + NO_REPLICA_POLL_S > wait_until:
                    raise
            await asyncio.sleep(NO_REPLICA_POLL_S)

    async def _hedged(self, attempt: Callable[[], Awaitable[Any]]) -> Any:
        """Start ``attempt``; if it has not answered after the hedge delay, start a second copy (on
        another replica); the first to answer wins and the other is cancelled."""
        first = asyncio.ensure_future(attempt())
        done, _ = await asyncio.wait({first}, timeout=self.hedge_delay_s())
        if done:
            return first.result()
        self.metrics.hedges.labels("launched").inc()
        second = asyncio.ensure_future(attempt())
        pending = {first, second}
        winner: Any = None
        last_exc: BaseException | None = None
        try:
            while pending and winner is None:
                done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                for t in done:
                    if t.exception() is None and winner is None:
                        winner = t.result()
                        self.metrics.hedges.labels("won_by_hedge" if t is second else "won_by_first").inc()
                    elif t.exception() is None:
                        _close_result(t.result())
                    else:
                        last_exc = t.exception()
        finally:
            for t in pending:
                t.cancel()
            for t in pending:
                try:
                    res = await t
                    _close_result(res)
                except BaseException:  # noqa: BLE001 - the loser's fate does not matter
                    pass
        if winner is None:
            assert last_exc is not None
            raise last_exc
        return winner

    # -- non-stream ------------------------------------------------------------------------------

    async def call_nonstream(self, ctx: RequestContext) -> tuple[int, bytes]:
        payload_for = self._payloads(ctx)
        url_path = ctx.req.route

        async def attempt() -> tuple[int, bytes, Replica]:
            lease = self.select(ctx)
            rep = lease.replica
            payload = payload_for(rep)
            assert self.session is not None
            try:
                async with _watched(rep, self.config.replicas.nonstream_timeout_s):
                    async with self.session.post(rep.url + url_path, data=payload, headers=_headers_for(rep, ctx),
                                                 timeout=self._nonstream_timeout) as resp:
                        body = await resp.read()
                        status = resp.status
                        retry_after = resp.headers.get("Retry-After")
            except asyncio.CancelledError:
                lease.release(Outcome.NEUTRAL)
                raise
            except (TimeoutError, *_BROKEN_ERRORS) as e:
                raise self._fail(lease, *_io_failure(rep, e, "timed out")) from None
            if status == 429:
                wait_s = self._cool_down(rep, retry_after)
                raise self._fail(lease, OverloadedError(f"replica {rep.replica_id} is rate limiting",
                                                        retry_after_s=wait_s), "rate_limited", Outcome.NEUTRAL)
            if status >= 400:
                err = engine_error(status, _json_object(body))
                if not isinstance(err, ClientError):
                    raise self._refused(lease, err)
                raise self._fail(lease, err, "client_error", Outcome.SUCCESS)  # a client's 4xx: a working replica
            lease.release(Outcome.SUCCESS)  # a client's 4xx is a working replica
            self._count_attempt(rep, "ok" if status < 400 else "client_error")
            return status, body, rep

        t0 = time.monotonic()
        status, body, rep = await self._with_retries(ctx, attempt)
        self.ttft.observe(time.monotonic() - t0)
        ctx.replica = rep
        ctx.status = status
        return status, body

    @staticmethod
    def _payloads(ctx: RequestContext) -> Callable[[Replica], bytes]:
        """The body for a replica of each kind: the contract's serialization for the project's
        replicas, and without the project's own defaults (``top_k: 0`` ...) for other engines."""
        cache: dict[str, bytes] = {}

        def payload_for(rep: Replica) -> bytes:
            if rep.kind not in cache:
                cache[rep.kind] = ctx.req.payload() if rep.kind == "unbroken" else \
                    orjson.dumps(for_engine(ctx.req.openai.to_body(), rep.kind))
            return cache[rep.kind]

        return payload_for

    # -- stream: opening ---------------------------------------------------------------------------

    async def _open_stream(self, ctx: RequestContext, payload_for: Callable[[Replica], bytes]) -> Upstream:
        lease = self.select(ctx)
        rep = lease.replica
        token_route = self._token_route(ctx, rep)
        translator = None
        if token_route is not None:
            try:
                path, payload, translator = token_route.engine_call(rep.kind, ctx.resume_ids or [])
            except ValueError as e:  # the chat template refused the messages
                raise self._fail(lease, InvalidRequestError(f"the chat template of model {ctx.req.base_model!r} "
                                                            f"refused these messages: {e}", param="messages"),
                                 "client_error", Outcome.NEUTRAL) from None
        else:
            path, payload = ctx.req.route, payload_for(rep)
        assert self.session is not None
        rc = self.config.replicas
        try:
            async with _watched(rep, min(rc.first_byte_timeout_s, max(0.001, ctx.deadline_s - time.monotonic()))):
                resp = await self.session.post(rep.url + path, data=payload, headers=_headers_for(rep, ctx),
                                               timeout=self._stream_timeout)
                lease.attach(resp)
                if resp.status == 429:
                    wait_s = self._cool_down(rep, resp.headers.get("Retry-After"))
                    raise self._fail(lease, OverloadedError(f"replica {rep.replica_id} is rate limiting",
                                                            retry_after_s=wait_s), "rate_limited", Outcome.NEUTRAL)
                if resp.status != 200:
                    err = engine_error(resp.status, _json_object(await resp.read()))
                    if isinstance(err, ClientError):
                        raise self._fail(lease, err, "client_error", Outcome.SUCCESS)
                    raise self._refused(lease, err)
                up = Upstream(lease, resp, translator)
                await self._read_opening(up)
                self._count_attempt(rep, "ok")
                return up
        except AttemptError:
            raise
        except asyncio.CancelledError:
            lease.release(Outcome.NEUTRAL)
            raise
        except (TimeoutError, *_BROKEN_ERRORS, orjson.JSONDecodeError) as e:
            raise self._fail(lease, *_io_failure(rep, e, "sent no token in time")) from None

    async def _read_opening(self, up: Upstream) -> None:
        """Read ``up`` up to its first content event (or the end marker): the events before it go
        to ``up.prefix``, the rest of that read to ``up.pending``. An error event ends the attempt."""
        rep = up.replica
        while up.first_obj is None:
            batch = await up.read_batch()
            if batch is None:
                raise self._fail(up.lease, UpstreamError(f"replica {rep.replica_id} ended the stream early"),
                                 "closed")
            for i, p in enumerate(batch):
                if p == DONE:
                    up.first_obj = {}
                    up.pending = batch[i:]
                    break
                obj = orjson.loads(p)
                if not isinstance(obj, dict):
                    raise self._fail(up.lease, UpstreamError(f"replica {rep.replica_id} sent a malformed event"),
                                     "malformed")
                if is_error_event(obj):
                    err = engine_error(None, obj)
                    if isinstance(err, ClientError):
                        raise self._fail(up.lease, err, "client_error", Outcome.NEUTRAL)
                    if not err.blames_replica:
                        raise self._fail(up.lease, err, "overloaded", Outcome.NEUTRAL)
                    raise self._fail(up.lease, err, "stream_error")
                if _is_content_event(obj):
                    up.first_obj = obj
                    up.pending = batch[i:]
                    break
                up.prefix.append(p)

    async def open_stream(self, ctx: RequestContext, rw: StreamRewriter | None = None, *,
                          resume_token_ids: list[int] | None = None) -> Upstream:
        """Open a stream for ``ctx``; with ``rw``, resume the stream ``rw`` has relayed so far on a
        replica that can continue it (``gateway/resume.py``). ``resume_token_ids``: a client's
        reconnect (``Last-Event-ID``) continues from these tokens, exactly, so only on a replica
        that resumes by token ids."""
        if rw is None and resume_token_ids:
            payload = ctx.req.payload(resume_token_ids)
            ctx.resume_modes = frozenset({"token"})
            ctx.resume_ids = resume_token_ids
            try:
                return await self._with_retries(ctx, lambda: self._open_stream(ctx, lambda _rep: payload))
            finally:
                ctx.resume_modes = ctx.resume_ids = None
        if rw is None:
            return await self._with_retries(ctx, lambda: self._open_stream(ctx, self._payloads(ctx)))
        req = ctx.req
        body = req.openai.to_body()
        modes = {"token", "text"} if rw.ids_complete else {"text"}
        bodies: dict[str, bytes | None] = {}

        def payload_for(rep: Replica) -> bytes:
            mode = self.resume_mode(rep, req)
            key = f"{mode}:{rep.kind}"
            if key not in bodies:
                b = resume_body(body, req.route, mode, sent_ids=rw.sent_ids, sent_text=rw.text_so_far,
                                num_tokens_sent=rw.num_tokens_sent)
                bodies[key] = None if b is None else orjson.dumps(b if rep.kind == "unbroken" else
                                                                  for_engine(b, rep.kind))
            payload = bodies[key]
            assert payload is not None  # select() only offers replicas of a usable mode
            return payload

        usable = {m for m in modes if resume_body(body, req.route, m, sent_ids=[], sent_text="",
                                                  num_tokens_sent=0) is not None}
        if not usable:
            raise AttemptError(UpstreamError("this request cannot be continued by text"), None, "not_resumable")
        ctx.resume_modes = frozenset(usable)
        ctx.resume_ids = list(rw.sent_ids)
        try:
            return await self._with_retries(ctx, lambda: self._open_stream(ctx, payload_for))
        finally:
            ctx.resume_modes = ctx.resume_ids = None

    # -- stream: relaying and failing over -------------------------------------------------------

    async def relay_stream(self, ctx: RequestContext, http_request: web.Request, up: Upstream,
                           headers: dict[str, str]) -> web.StreamResponse:
        """Commit the response to the client and relay ``up`` (and its successors) to the end:
        reading is here, what is sent is :class:`StreamRewriter`'s, whether to go on elsewhere is
        :meth:`_fail_over`'s."""
        resp = web.StreamResponse(status=200, headers=headers)
        resp.content_type = "text/event-stream"
        resp.headers["Cache-Control"] = "no-cache"
        resp.headers["X-Accel-Buffering"] = "no"
        ctx.status = 200
        ctx.replica = up.replica
        write_timeout_s = self.config.server.client_write_timeout_s
        observe_itl = self.metrics.inter_token.observe
        resumable = self.config.streams.resumable
        rw = StreamRewriter(up.first_obj or {}, transferable=ctx.req.transferable,
                            request_id=ctx.request_id if resumable else None, resume=ctx.resume)
        state = ctx.state if resumable and ctx.req.transferable else None
        if state is not None and self.streams is not None:
            state.stream_id, state.created, state.model = rw.orig_id, rw.orig_created, rw.orig_model
            state.body_json = orjson.dumps(ctx.req.openai.to_body())  # as sent (after degradation)
            state.token_ids = rw.sent_ids  # shared, not copied: the write-behind reads it
            self.streams.open(state)
        else:
            state = None
        last_write_s = 0.0

        transport = http_request.transport

        async def write(data: bytes) -> None:
            # Nothing waiting for the client and a small chunk: the transport stays under its
            # high-water mark, so aiohttp's write cannot wait on the client and needs no timer (a
            # timer per write was ~3% of a gateway's CPU relaying one token per event).
            if transport is not None and len(data) <= UNTIMED_WRITE_MAX_BYTES \
                    and not transport.get_write_buffer_size():
                await resp.write(data)
                return
            async with asyncio.timeout(write_timeout_s):
                await resp.write(data)

        try:
            await resp.prepare(http_request)
            opening = rw.begin_upstream(up.prefix)
            if opening:
                await write(opening)
            batch: list[bytes] | None = up.take_pending()
            self.metrics.ttft.labels(ctx.req.route).observe(time.monotonic() - ctx.started_s)
            self.ttft.observe(time.monotonic() - ctx.started_s)
            while True:
                failure: tuple[str, UnbrokenError] | None = None
                if batch is None:
                    batch, failure = await self._next_batch(up)
                    if batch is None and failure is None:  # the replica closed the stream
                        if rw.finish_seen:
                            up.finish(Outcome.SUCCESS)
                            await write(rw.done_event())
                            break
                        failure = ("closed", UpstreamError(f"replica {up.replica.replica_id} closed the stream"))
                if batch is not None:
                    out = rw.rewrite(batch, replica_id=up.replica.replica_id, num_failovers=ctx.num_failovers)
                    batch = None
                    ctx.num_prompt_tokens = rw.num_prompt_tokens or ctx.num_prompt_tokens
                    if out.data:
                        await write(out.data)
                        now = time.monotonic()
                        if last_write_s:
                            observe_itl(now - last_write_s)
                        last_write_s = now
                    if out.done:
                        up.finish(Outcome.SUCCESS)
                        break
                    if out.end_error is not None:
                        ctx.status = out.end_error.status
                        up.finish(Outcome.NEUTRAL)
                        break
                    if out.failure is None:
                        continue
                    failure = ("stream_error", out.failure)
                assert failure is not None
                successor, final = await self._fail_over(ctx, up, rw, *failure)
                if successor is None:
                    await write(final)
                    break
                up = successor
                batch = up.take_pending()
        except (ConnectionError, TimeoutError, aiohttp.ClientConnectionResetError) as e:
            self.metrics.client_disconnects.labels("timeout" if isinstance(e, TimeoutError) else "gone").inc()
            ctx.status = 499
        finally:
            ctx.num_completion_tokens = len(rw.sent_ids)
            if state is not None and self.streams is not None:
                self.streams.close(state, finished=rw.finish_seen)
            up.finish(Outcome.NEUTRAL)  # a no-op unless the stream ended without an outcome
        return resp

    async def _next_batch(self, up: Upstream) -> tuple[list[bytes] | None, tuple[str, UnbrokenError] | None]:
        """The next payloads of ``up`` (None at its end), or why it failed: a stall (no event within
        ``stall_timeout_s``), the heartbeats declaring it lost, or a broken connection."""
        rid = up.replica.replica_id
        try:
            async with _watched(up.replica, self.config.replicas.stall_timeout_s):
                return await up.read_batch(), None
        except TimeoutError:
            return None, (_timeout_reason(up.replica, "stall"), UpstreamError(f"replica {rid} stalled"))
        except _BROKEN_ERRORS as e:
            return None, ("connection", UpstreamError(f"replica {rid} failed: {e}"))

    async def _fail_over(self, ctx: RequestContext, failed: Upstream, rw: StreamRewriter, reason: str,
                         err: UnbrokenError) -> tuple[Upstream | None, bytes]:
        """``failed`` broke mid-stream: resume on another replica with the ids sent so far, or end the
        stream. Returns the successor, or None and the last bytes to send the client."""
        failed.finish(Outcome.FAILURE)
        if reason == "connection":
            self.health.mark_suspect(failed.replica, err.message)
        self._count_attempt(failed.replica, reason)
        if rw.finish_seen:  # everything was delivered; only the end marker is missing
            return None, rw.done_event()
        why = self._why_not_resumable(ctx)
        if why is not None:
            self.metrics.failover_failures.labels(why).inc()
            ctx.status = 502
            return None, rw.tag(sse_error_event(UpstreamError(
                f"the replica failed mid-stream and the stream could not be resumed ({why}): {err.message}")))
        ctx.num_failovers += 1
        self.metrics.failovers.labels(reason).inc()
        log.info("request %s: %s on %s after %d tokens; resuming elsewhere", ctx.request_id, reason,
                 failed.replica.replica_id, len(rw.sent_ids))
        try:
            up = await self.open_stream(ctx, rw)
        except AttemptError as e:
            self.metrics.failover_failures.labels("no_replica" if e.reason != "not_resumable" else
                                                  "not_resumable").inc()
            ctx.status = 502
            return None, rw.tag(sse_error_event(UpstreamError(
                f"the replica failed mid-stream and no other could resume it: {e.error.message}")))
        mode = self.resume_mode(up.replica, ctx.req)
        rw.note_resume(mode)
        self.metrics.resumes.labels(mode, up.replica.kind).inc()
        rw.begin_upstream(up.prefix)  # the new replica's role chunk is dropped
        ctx.replica = up.replica
        return up, b""

    def _why_not_resumable(self, ctx: RequestContext) -> str | None:
        if not ctx.req.transferable:
            return "not_transferable"
        if not any(self.resume_mode(r, ctx.req) != "none" for r in self.replicas if r.serves(ctx.req.model)):
            return "no_replica_can_resume"
        if ctx.num_failovers >= self.config.retry.max_failovers:
            return "too_many_failovers"
        if time.monotonic() >= ctx.deadline_s:
            return "deadline"
        return None


# Headers only the project's replicas read. Other engines get none of them: llama-cpp-python, for
# one, answers 400 to an X-Request-ID that is not a UUID (its request-id middleware validates it).
_UNBROKEN_ONLY_HEADERS = frozenset({"X-Request-ID", "X-Session-ID", "X-Session-History", "X-Priority"})


def _headers_for(rep: Replica, ctx: RequestContext) -> dict[str, str]:
    if rep.kind == "unbroken":
        return ctx.forward_headers
    return {k: v for k, v in ctx.forward_headers.items() if k not in _UNBROKEN_ONLY_HEADERS}


def _close_result(res: Any) -> None:
    if isinstance(res, Upstream):
        res.finish(Outcome.NEUTRAL)


class _Hooks:
    def __init__(self, ctx: RequestContext, metrics: GatewayMetrics) -> None:
        self.ctx = ctx
        self.metrics = metrics

    def on_retry(self, exc: AttemptError, attempt_number: int, sleep_s: float) -> None:
        self.ctx.num_retries += 1
        self.metrics.retries.labels(exc.reason).inc()
        log.debug("request %s: attempt %d failed (%s); retrying in %.3fs", self.ctx.request_id, attempt_number,
                  exc, sleep_s)

    def on_budget_exhausted(self, exc: AttemptError) -> None:
        self.metrics.retry_budget_exhausted.inc()

