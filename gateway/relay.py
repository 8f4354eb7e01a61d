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
or missing token, the same id. Requests whose state cannot move (``n > 1``, several prompts,
``logprobs``, ``echo``) fail over only before the first byte; a later failure ends their stream
with an SSE error event.

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

from gateway.config import GatewayConfig
from gateway.health import HealthMonitor
from gateway.metrics import GatewayMetrics
from gateway.policies import RouteRequest, RoutingPolicy
from gateway.protocol import ClientRequest
from gateway.replicaset import Replica, ReplicaSet, ReplicaState
from gateway.retry import AttemptError, RetryExecutor
from unbroken.errors import (
    AuthenticationError,
    ClientError,
    ContextLengthError,
    DrainingError,
    InternalError,
    InvalidRequestError,
    ModelNotFoundError,
    NoReplicaError,
    OverloadedError,
    RateLimitError,
    UnbrokenError,
    UpstreamError,
    ValidationError,
    error_from_response,
)
from unbroken.http import sse_error_event

log = logging.getLogger(__name__)

DONE = b"[DONE]"
NO_REPLICA_POLL_S = 0.05


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
_ERRORS_BY_CODE: dict[str, tuple[int, type[UnbrokenError]]] = {
    cls.code: (cls.status, cls) for cls in (  # type: ignore[misc]
        InvalidRequestError, ValidationError, ContextLengthError, ModelNotFoundError, AuthenticationError,
        RateLimitError, OverloadedError, DrainingError, UpstreamError, InternalError)
}
_CONNECT_ERRORS = (aiohttp.ClientConnectorError, ConnectionRefusedError)
_BROKEN_ERRORS = (aiohttp.ClientError, ConnectionError, OSError, asyncio.IncompleteReadError)


def error_from_event(obj: dict[str, Any]) -> UnbrokenError:
    """An error a replica sent inside a stream (no HTTP status there: use the code)."""
    err = obj.get("error") or {}
    code = err.get("code")
    status = _ERRORS_BY_CODE.get(code, (500, UpstreamError))[0] if isinstance(code, str) else 500
    if status == 500 and err.get("type") == "invalid_request_error":
        status = 400
    return error_from_response(status, obj)


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


class Upstream:
    """An open response from one replica; holds the replica's in-flight slot until finished."""

    def __init__(self, replica: Replica, resp: aiohttp.ClientResponse) -> None:
        self.replica = replica
        self.resp = resp
        self.prefix: list[bytes] = []  # events before the first content event (the role chunk)
        self.first_obj: dict[str, Any] | None = None
        self.pending: list[bytes] = []  # payloads read but not yet relayed (from the first content event on)
        self._buf = b""
        self._finished = False

    async def read_batch(self) -> list[bytes] | None:
        """The SSE ``data:`` payloads of the next network read(s): at least one, or None at the end.
        Reading in batches lets a fast replica's events be relayed several per write."""
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

    def finish(self, success: bool | None) -> None:
        """``True``/``False``: the replica's outcome for its breaker; ``None``: says nothing about it."""
        if self._finished:
            return
        self._finished = True
        rep = self.replica
        rep.num_inflight -= 1
        if rep.breaker is not None:
            if success is None:
                rep.breaker.release_probe()
            else:
                rep.breaker.record_outcome(success)
        if success:
            self.resp.release()
        else:
            self.resp.close()  # drop the connection: the replica cancels the generation


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
        self.session: aiohttp.ClientSession | None = None
        rc = config.replicas
        self._auth_header = {"Authorization": f"Bearer {rc.shared_token}"} if rc.shared_token else {}
        self._nonstream_timeout = aiohttp.ClientTimeout(total=rc.nonstream_timeout_s, sock_connect=rc.connect_timeout_s)
        self._stream_timeout = aiohttp.ClientTimeout(total=None, sock_connect=rc.connect_timeout_s)
        self._attempt_counters: dict[tuple[str, str], Any] = {}

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

    def select(self, ctx: RequestContext) -> Replica:
        model = ctx.req.model
        cands = self.replicas.candidates(model, ctx.tried)
        if not cands:
            cands = self.replicas.candidates(model)  # every one was tried: after backoff, try again
        if not cands and ctx.req.adapter and self.config.routing.adapter_affinity:
            cands = self.replicas.candidates(ctx.req.base_model)
        rep = self.policy.select(cands, ctx.route) if cands else None
        if rep is None:
            err = NoReplicaError(f"no replica in rotation can serve model {model!r} right now",
                                 retry_after_s=self.config.degradation.retry_after_s)
            raise AttemptError(err, None, "no_replica")
        ctx.tried.add(rep)
        rep.num_inflight += 1
        if rep.breaker is not None:
            rep.breaker.on_dispatch()
        return rep

    def _count_attempt(self, rep: Replica, outcome: str) -> None:
        key = (rep.replica_id, outcome)
        c = self._attempt_counters.get(key)
        if c is None:
            c = self._attempt_counters[key] = self.metrics.upstream_attempts.labels(rep.replica_id, outcome)
        c.inc()

    def _fail(self, rep: Replica, err: UnbrokenError, reason: str, resp: aiohttp.ClientResponse | None = None,
              blame: bool = True) -> AttemptError:
        rep.num_inflight -= 1
        if rep.breaker is not None:
            if blame:
                rep.breaker.record_outcome(False)
            else:
                rep.breaker.release_probe()
        if resp is not None:
            resp.close()
        if reason == "connect":
            self.health.mark_suspect(rep, err.message)
        self._count_attempt(rep, reason)
        return AttemptError(err, rep, reason)

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
        payload = orjson.dumps(ctx.req.body)
        url_path = ctx.req.route

        async def attempt() -> tuple[int, bytes, Replica]:
            rep = self.select(ctx)
            assert self.session is not None
            try:
                async with _watched(rep, self.config.replicas.nonstream_timeout_s):
                    async with self.session.post(rep.url + url_path, data=payload, headers=ctx.forward_headers,
                                                 timeout=self._nonstream_timeout) as resp:
                        body = await resp.read()
                        status = resp.status
            except asyncio.CancelledError:
                rep.num_inflight -= 1
                if rep.breaker is not None:
                    rep.breaker.release_probe()
                raise
            except _CONNECT_ERRORS as e:
                raise self._fail(rep, UpstreamError(f"replica {rep.replica_id} unreachable: {e}"), "connect") from None
            except asyncio.TimeoutError:
                raise self._fail(rep, UpstreamError(f"replica {rep.replica_id} timed out"), _timeout_reason(rep)) \
                    from None
            except _BROKEN_ERRORS as e:
                raise self._fail(rep, UpstreamError(f"replica {rep.replica_id} failed: {e}"), "closed") from None
            if status >= 500 or status == 429:
                try:
                    parsed = orjson.loads(body)
                except orjson.JSONDecodeError:
                    parsed = None
                err = error_from_response(status, parsed if isinstance(parsed, dict) else None)
                raise self._fail(rep, err, "status_5xx" if err.blames_replica else "overloaded",
                                 blame=err.blames_replica)
            rep.num_inflight -= 1
            if rep.breaker is not None:
                rep.breaker.record_outcome(True)  # a client's 4xx is a working replica
            self._count_attempt(rep, "ok" if status < 400 else "client_error")
            return status, body, rep

        t0 = time.monotonic()
        status, body, rep = await self._with_retries(ctx, attempt)
        self.ttft.observe(time.monotonic() - t0)
        ctx.replica = rep
        ctx.status = status
        return status, body

    # -- stream ----------------------------------------------------------------------------------

    async def _open_stream(self, ctx: RequestContext, payload: bytes) -> Upstream:
        rep = self.select(ctx)
        assert self.session is not None
        resp: aiohttp.ClientResponse | None = None
        rc = self.config.replicas
        try:
            async with _watched(rep, min(rc.first_byte_timeout_s, max(0.001, ctx.deadline_s - time.monotonic()))):
                resp = await self.session.post(rep.url + ctx.req.route, data=payload, headers=ctx.forward_headers,
                                               timeout=self._stream_timeout)
                if resp.status != 200:
                    body = await resp.read()
                    try:
                        parsed = orjson.loads(body)
                    except orjson.JSONDecodeError:
                        parsed = None
                    err = error_from_response(resp.status, parsed if isinstance(parsed, dict) else None)
                    if isinstance(err, ClientError):
                        rep.num_inflight -= 1
                        if rep.breaker is not None:
                            rep.breaker.record_outcome(True)
                        resp.release()
                        self._count_attempt(rep, "client_error")
                        raise AttemptError(err, rep, "client_error")
                    raise self._fail(rep, err, "status_5xx" if err.blames_replica else "overloaded", resp,
                                     blame=err.blames_replica)
                up = Upstream(rep, resp)
                while up.first_obj is None:
                    batch = await up.read_batch()
                    if batch is None:
                        raise self._fail(rep, UpstreamError(f"replica {rep.replica_id} ended the stream early"),
                                         "closed", resp)
                    for i, p in enumerate(batch):
                        if p == DONE:
                            up.first_obj = {}
                            up.pending = batch[i:]
                            break
                        obj = orjson.loads(p)
                        if "error" in obj:
                            err = error_from_event(obj)
                            if isinstance(err, ClientError) or not err.blames_replica:
                                rep.num_inflight -= 1
                                if rep.breaker is not None:
                                    rep.breaker.release_probe()
                                resp.close()
                                raise AttemptError(err, rep, "client_error" if isinstance(err, ClientError)
                                                   else "overloaded")
                            raise self._fail(rep, err, "stream_error", resp)
                        if _is_content_event(obj):
                            up.first_obj = obj
                            up.pending = batch[i:]
                            break
                        up.prefix.append(p)
                self._count_attempt(rep, "ok")
                return up
        except AttemptError:
            raise
        except asyncio.CancelledError:
            rep.num_inflight -= 1
            if rep.breaker is not None:
                rep.breaker.release_probe()
            if resp is not None:
                resp.close()
            raise
        except TimeoutError:
            raise self._fail(rep, UpstreamError(f"replica {rep.replica_id} sent no token in time"),
                             _timeout_reason(rep), resp) from None
        except _CONNECT_ERRORS as e:
            raise self._fail(rep, UpstreamError(f"replica {rep.replica_id} unreachable: {e}"), "connect",
                             resp) from None
        except (*_BROKEN_ERRORS, orjson.JSONDecodeError) as e:
            raise self._fail(rep, UpstreamError(f"replica {rep.replica_id} failed: {e}"), "closed", resp) from None

    async def open_stream(self, ctx: RequestContext, resume_token_ids: list[int] | None = None) -> Upstream:
        body = ctx.req.body
        if resume_token_ids:
            body = dict(body)
            body["resume_token_ids"] = resume_token_ids
        payload = orjson.dumps(body)
        return await self._with_retries(ctx, lambda: self._open_stream(ctx, payload))

    async def relay_stream(self, ctx: RequestContext, http_request: web.Request, up: Upstream,
                           headers: dict[str, str]) -> web.StreamResponse:
        """Commit the response to the client and relay ``up`` (and its successors) to the end."""
        rc = self.config.replicas
        resp = web.StreamResponse(status=200, headers=headers)
        resp.content_type = "text/event-stream"
        resp.headers["Cache-Control"] = "no-cache"
        resp.headers["X-Accel-Buffering"] = "no"
        ctx.status = 200
        ctx.replica = up.replica
        await resp.prepare(http_request)
        write_timeout_s = self.config.server.client_write_timeout_s
        stall_timeout_s = rc.stall_timeout_s
        observe_itl = self.metrics.inter_token.observe
        first_obj = up.first_obj or {}
        orig_id, orig_created, orig_model = first_obj.get("id"), first_obj.get("created"), first_obj.get("model")
        sent_ids: list[int] = []
        transferable = ctx.req.transferable
        finish_seen = False
        last_write_s = 0.0
        resumed = False
        loads, dumps = orjson.loads, orjson.dumps

        async def write(data: bytes) -> None:
            async with asyncio.timeout(write_timeout_s):
                await resp.write(data)

        try:
            if up.prefix:
                await write(b"".join(b"data: " + p + b"\n\n" for p in up.prefix))
            batch: list[bytes] | None = up.pending
            up.pending = []
            self.metrics.ttft.labels(ctx.req.route).observe(time.monotonic() - ctx.started_s)
            self.ttft.observe(time.monotonic() - ctx.started_s)
            while True:
                failure: tuple[str, UnbrokenError] | None = None
                if batch is None:
                    try:
                        async with _watched(up.replica, stall_timeout_s):
                            batch = await up.read_batch()
                        if batch is None:
                            if finish_seen:
                                up.finish(True)
                                await write(b"data: [DONE]\n\n")
                                break
                            failure = ("closed", UpstreamError(f"replica {up.replica.replica_id} closed the stream"))
                    except TimeoutError:
                        failure = (_timeout_reason(up.replica, "stall"),
                                   UpstreamError(f"replica {up.replica.replica_id} stalled"))
                    except _BROKEN_ERRORS as e:
                        failure = ("connection", UpstreamError(f"replica {up.replica.replica_id} failed: {e}"))
                if failure is None:
                    assert batch is not None
                    out_parts: list[bytes] = []
                    done = False
                    end_with: bytes | None = None
                    for p in batch:
                        if p == DONE:
                            done = True
                            break
                        obj = loads(p)
                        if "error" in obj:
                            err = error_from_event(obj)
                            if err.blames_replica:
                                failure = ("stream_error", err)
                            else:
                                end_with = sse_error_event(err)
                                ctx.status = err.status
                            break
                        rewrite = resumed
                        choices = obj.get("choices")
                        if choices:
                            for ch in choices:
                                if ch.get("index", 0) == 0:
                                    ids = ch.get("token_ids")
                                    if ids:
                                        sent_ids.extend(ids)
                                if ch.get("finish_reason"):
                                    finish_seen = True
                                    rewrite = True
                                    obj["unbroken"] = {"failovers": ctx.num_failovers,
                                                       "replica_id": up.replica.replica_id}
                        elif obj.get("usage") is not None:
                            rewrite = True
                            if isinstance(obj["usage"], dict):
                                ctx.num_prompt_tokens = int(obj["usage"].get("prompt_tokens") or 0)
                            if resumed and transferable:
                                usage = obj["usage"]
                                usage["completion_tokens"] = len(sent_ids)
                                usage["total_tokens"] = int(usage.get("prompt_tokens") or 0) + len(sent_ids)
                            obj["unbroken"] = {"failovers": ctx.num_failovers, "replica_id": up.replica.replica_id}
                        if rewrite:
                            if resumed:
                                obj["id"], obj["created"], obj["model"] = orig_id, orig_created, orig_model
                            p = dumps(obj)
                        out_parts.append(b"data: " + p + b"\n\n")
                    batch = None
                    if done:
                        out_parts.append(b"data: [DONE]\n\n")
                    elif end_with is not None:
                        out_parts.append(end_with)
                    if out_parts:
                        await write(b"".join(out_parts))
                        now = time.monotonic()
                        if last_write_s:
                            observe_itl(now - last_write_s)
                        last_write_s = now
                    if done:
                        up.finish(True)
                        break
                    if end_with is not None:
                        up.finish(None)
                        break
                    if failure is None:
                        continue
                # the replica failed mid-stream
                assert failure is not None
                reason, err = failure
                failed = up.replica
                up.finish(False)
                if reason == "connection":
                    self.health.mark_suspect(failed, err.message)
                self._count_attempt(failed, reason)
                if finish_seen:  # everything was delivered; only the end marker is missing
                    await write(b"data: [DONE]\n\n")
                    break
                if not transferable or ctx.num_failovers >= self.config.retry.max_failovers \
                        or time.monotonic() >= ctx.deadline_s:
                    why = "not_transferable" if not transferable else (
                        "too_many_failovers" if ctx.num_failovers >= self.config.retry.max_failovers else "deadline")
                    self.metrics.failover_failures.labels(why).inc()
                    await write(sse_error_event(UpstreamError(
                        f"the replica failed mid-stream and the stream could not be resumed ({why}): {err.message}")))
                    ctx.status = 502
                    break
                ctx.num_failovers += 1
                self.metrics.failovers.labels(reason).inc()
                log.info("request %s: %s on %s after %d tokens; resuming elsewhere", ctx.request_id, reason,
                         failed.replica_id, len(sent_ids))
                try:
                    up = await self.open_stream(ctx, resume_token_ids=list(sent_ids))
                except AttemptError as e:
                    self.metrics.failover_failures.labels("no_replica").inc()
                    await write(sse_error_event(UpstreamError(
                        f"the replica failed mid-stream and no other could resume it: {e.error.message}")))
                    ctx.status = 502
                    break
                resumed = True
                ctx.replica = up.replica
                batch = up.pending  # the role chunk in up.prefix is dropped
                up.pending = []
        except (ConnectionError, TimeoutError, aiohttp.ClientConnectionResetError) as e:
            self.metrics.client_disconnects.labels("timeout" if isinstance(e, TimeoutError) else "gone").inc()
            up.finish(None)
            ctx.status = 499
        except asyncio.CancelledError:
            up.finish(None)
            raise
        finally:
            ctx.num_completion_tokens = len(sent_ids)
            if not up._finished:
                up.finish(None)
        return resp


def _close_result(res: Any) -> None:
    if isinstance(res, Upstream):
        res.finish(None)


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

