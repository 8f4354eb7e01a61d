"""The gateway's HTTP app: OpenAI endpoints, health, metrics and the admin API.

``build_app(config)`` wires the parts (replica set, heartbeats, discovery, policy, retry, relay,
degradation, auth) into one aiohttp application; they are started and stopped in ``cleanup_ctx``.
The request path: authenticate -> read and check the body (client mistakes answered here) ->
per-key limits -> degradation admission -> relay (retries, hedging, failover) -> metrics.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from dataclasses import dataclass
from typing import Any, AsyncIterator

import orjson
from aiohttp import web

from gateway.auth import ApiKey, Authenticator, KeyLease, RateLimiter, SessionScope, run_rate_limit_sync
from gateway.config import GatewayConfig
from gateway.degradation import DegradationController
from gateway.health import HealthMonitor
from gateway.idempotency import AnswerCache
from gateway.metrics import GatewayMetrics, ReplicaCollector
from gateway.openapi import openapi_spec
from gateway.policies import RouteRequest, make_policy
from gateway.policies.adapter_affinity import AdapterAffinityPolicy
from gateway.policies.session_affinity import SessionAffinityPolicy
from gateway.policies.stability import StabilityPolicy
from gateway.protocol import CHAT_ROUTE, COMPLETIONS_ROUTE, ClientRequest, parse_request
from gateway.rediswire import redis_client
from gateway.registry import RegistryDiscovery
from gateway.relay import Relay, RequestContext
from gateway.replicaset import ReplicaSet, ReplicaSource, ReplicaState
from gateway.retry import AttemptError, RetryBudget, RetryExecutor
from gateway.sessions import RedisSessionSync, SessionPlacements
from gateway.stream_rewrite import EventId, ResumePoint
from gateway.streamstate import StreamRecord, StreamStateStore, body_sha256, check_request_id
from unbroken.aio import stop_tasks
from unbroken.contract import headers as hdr
from unbroken.errors import (
    ClientError,
    ContextLengthError,
    ConflictError,
    InvalidRequestError,
    ModelNotFoundError,
    NoReplicaError,
    NotFoundError,
    ShedError,
    StreamNotFoundError,
    UnbrokenError,
)
from unbroken.http import error_middleware, error_response, json_response, read_json_body

log = logging.getLogger(__name__)

_FORWARDED_HEADERS = hdr.FORWARDED


@dataclass
class Gateway:
    """Everything one gateway process holds (one per app; stored under :data:`GATEWAY_KEY`)."""

    config: GatewayConfig
    replicas: ReplicaSet
    health: HealthMonitor
    relay: Relay
    degradation: DegradationController
    auth: Authenticator
    limiter: RateLimiter
    metrics: GatewayMetrics
    placements: SessionPlacements
    sessions: SessionScope
    policy: Any
    budget: RetryBudget
    streams: StreamStateStore
    answers: AnswerCache
    redis: Any = None
    discovery: RegistryDiscovery | None = None
    session_sync: RedisSessionSync | None = None
    draining: bool = False

    def apply_drain(self, replica_id: str) -> bool:
        rep = self.replicas.find(replica_id)
        if rep is None:
            return False
        if not rep.admin_draining:
            rep.admin_draining = True
            self.replicas.set_state(rep, ReplicaState.DRAINING)
            log.info("replica %s drained by the admin API", rep.replica_id)
        return True


GATEWAY_KEY = web.AppKey("gateway", Gateway)


def build_gateway(config: GatewayConfig, num_workers: int = 1) -> Gateway:
    replicas = ReplicaSet(config.breaker, config.stability)
    for url in config.replicas.urls:
        replicas.add(url, ReplicaSource.STATIC)
    for url in config.replicas.standby_urls:
        replicas.add(url, ReplicaSource.STATIC, standby=True)
    headers = {"Authorization": f"Bearer {config.replicas.shared_token}"} if config.replicas.shared_token else {}
    rcfg = config.replicas

    def kind_of(rep) -> str:  # type: ignore[no-untyped-def]
        if rep.source is ReplicaSource.REGISTRY:
            return "unbroken"  # only the project's replicas announce themselves in Redis
        return rcfg.kinds.get(rep.url) or rcfg.kind

    health = HealthMonitor(replicas, config.health, headers=headers, kind_of=kind_of,
                           resume_overrides=dict(rcfg.resume))
    metrics = GatewayMetrics()
    placements = SessionPlacements()
    base_policy = make_policy(config.routing.policy, config.routing)
    policy: Any = base_policy
    if config.routing.session_affinity:
        policy = SessionAffinityPolicy(config.routing, base_policy, lambda: replicas.ring_members, placements,
                                       on_move=lambda key, old, new: metrics.session_moves.inc())
    if config.routing.adapter_affinity:
        policy = AdapterAffinityPolicy(policy)
    if config.stability.enabled:
        policy = StabilityPolicy(policy)
    rc = config.retry
    budget = RetryBudget(rc.budget_ratio, rc.budget_min_per_s, rc.budget_window_s)
    executor = RetryExecutor(rc, budget)
    relay = Relay(config, replicas, policy, health, executor, metrics)
    degradation = DegradationController(config.degradation, replicas, num_workers=num_workers)
    metrics.attach_replicas(ReplicaCollector(replicas, lambda: degradation.queue_depth,
                                             lambda: degradation.num_inflight, relay.admin_resume))
    streams = StreamStateStore(config.streams, config.redis.key_prefix, metrics, config.server.max_body_bytes,
                               config.redis.op_timeout_s, body_extra_ttl_s=config.server.request_deadline_s)
    relay.streams = streams
    metrics.streams_running.set_function(lambda: streams.num_running)
    answers = AnswerCache(config.streams, config.redis.key_prefix, metrics, config.redis.op_timeout_s)
    return Gateway(config=config, replicas=replicas, health=health, relay=relay, degradation=degradation,
                   auth=Authenticator(config.auth), limiter=RateLimiter(), metrics=metrics,
                   placements=placements, policy=policy, budget=budget, streams=streams, answers=answers,
                   sessions=SessionScope.from_config(config.auth, config.replicas.shared_token))


async def _lifecycle(app: web.Application) -> AsyncIterator[None]:
    gw = app[GATEWAY_KEY]
    cfg = gw.config
    tasks: list[asyncio.Task[None]] = []
    await gw.relay.start()
    await gw.health.start()
    if cfg.redis.url:
        gw.redis = redis_client(cfg.redis.url, cfg.redis.op_timeout_s)
        gw.discovery = RegistryDiscovery(gw.replicas, gw.redis, cfg.redis.key_prefix,
                                         cfg.redis.discovery_interval_ms / 1000.0, cfg.redis.op_timeout_s,
                                         on_drain=gw.apply_drain,
                                         allowed_hosts=cfg.redis.registry_allowed_hosts)
        gw.discovery.start()
        gw.session_sync = RedisSessionSync(gw.placements, gw.redis, cfg.redis.key_prefix, cfg.redis.session_ttl_s,
                                           cfg.redis.op_timeout_s)
        await gw.session_sync.start()
        gw.streams.attach_redis(gw.redis, cfg.redis.url)
        gw.streams.start()
        gw.answers.redis = gw.redis
        tasks.append(asyncio.create_task(run_rate_limit_sync(gw.limiter, gw.redis, cfg.redis.key_prefix, 0.25)))
    try:
        yield
    finally:
        await stop_tasks(tasks, what="rate-limit sync")
        if gw.discovery is not None:
            await gw.discovery.stop()
        if gw.session_sync is not None:
            await gw.session_sync.stop()
        await gw.streams.stop()
        await gw.health.stop()
        await gw.relay.stop()
        if gw.redis is not None:
            try:
                await gw.redis.aclose()
            except Exception:  # noqa: BLE001
                pass


def build_app(config: GatewayConfig, num_workers: int = 1) -> web.Application:
    gw = build_gateway(config, num_workers=num_workers)
    app = web.Application(middlewares=[error_middleware], client_max_size=config.server.max_body_bytes)
    app[GATEWAY_KEY] = gw
    app.cleanup_ctx.append(_lifecycle)
    app.router.add_post(CHAT_ROUTE, _completions_handler(CHAT_ROUTE))
    app.router.add_post(COMPLETIONS_ROUTE, _completions_handler(COMPLETIONS_ROUTE))
    app.router.add_get("/v1/models", models_handler)
    app.router.add_get("/healthz", healthz_handler)
    app.router.add_get("/readyz", readyz_handler)
    app.router.add_get("/metrics", metrics_handler)
    app.router.add_get("/openapi.json", openapi_handler)
    app.router.add_get("/admin/replicas", admin_replicas_handler)
    app.router.add_post("/admin/replicas/{replica_id}/drain", admin_drain_handler)
    return app


def _completions_handler(route: str):  # type: ignore[no-untyped-def]
    async def handler(request: web.Request) -> web.StreamResponse:
        return await handle_completion(request, route)

    return handler


async def handle_completion(request: web.Request, route: str) -> web.StreamResponse:
    gw = request.app[GATEWAY_KEY]
    cfg = gw.config
    started = time.monotonic()
    client_request_id = request.headers.get("X-Request-ID")
    last_event_id = request.headers.get("Last-Event-ID")
    if client_request_id is None and last_event_id is not None:  # a reconnect names its stream either way
        client_request_id = last_event_id.strip().rpartition(":")[0] or None
    request_id = client_request_id or os.urandom(12).hex()
    out_headers = {"X-Request-ID": request_id[:128]}
    status = 500
    replica_label = "none"
    try:
        key = gw.auth.authenticate(request.headers.get("Authorization"))
    except UnbrokenError as e:
        gw.metrics.auth_failures.labels(e.code or "invalid").inc()
        gw.metrics.count_request(route, e.status, "none", time.monotonic() - started)
        return error_response(e, headers=out_headers)
    lease: KeyLease | None = None
    try:
        if client_request_id is not None:
            check_request_id(client_request_id)
        body = await read_json_body(request, cfg.server.max_body_bytes, cfg.server.body_read_timeout_s)
        req = parse_request(route, body, request.headers, gw.replicas.default_model)
        sha = body_sha256(body) if cfg.streams.resumable and (req.stream or client_request_id) else ""
        if req.model not in gw.replicas.all_models:
            if not gw.replicas.all_models:
                gw.relay.log_no_replica(req.model, "no replica has reported its models yet")
                raise NoReplicaError("no replica has reported its models yet",
                                     retry_after_s=cfg.degradation.retry_after_s)
            raise ModelNotFoundError(f"model {req.model!r} does not exist; available: "
                                     f"{', '.join(sorted(gw.replicas.known_models()))}", param="model")
        _check_context_length(gw, req, route)
        gw.auth.check_priority(key, req.priority)
        session_id = request.headers.get("X-Session-ID", "").strip()
        scoped_session = gw.sessions.derive(key, gw.sessions.check(session_id)) if session_id else None
        if scoped_session is not None:
            req.session_key = scoped_session
        elif req.session_key is not None:  # the body's 'user': routing only, scoped the same way
            req.session_key = gw.sessions.derive(key, req.session_key)
        reserve = int(req.num_prompt_chars / cfg.routing.chars_per_token) + (req.max_tokens or 0)
        try:
            lease = gw.limiter.acquire(key, reserve)
        except UnbrokenError as e:
            gw.metrics.rate_limited.labels(key.name, e.code or "limit").inc()
            raise
        if gw.draining:
            raise NoReplicaError("the gateway is shutting down", retry_after_s=cfg.degradation.retry_after_s)
        resume: ResumePoint | None = None
        state: StreamRecord | None = None
        if last_event_id is not None and not (req.stream and sha):
            raise InvalidRequestError("Last-Event-ID resumes a stream, and this gateway keeps no stream state"
                                      if req.stream else "Last-Event-ID is for streams ('stream': true) only",
                                      param="Last-Event-ID")
        if req.stream and sha:
            if last_event_id is not None:
                resume, stored_body = await _resume_point(gw, route, req, request_id, last_event_id, key, sha)
                # the request as it was sent to replicas (a fallback model, a clamp), parsed again: untrusted
                req.openai = parse_request(route, stored_body, request.headers, gw.replicas.default_model).openai
            # the body as sent is filled in when the stream opens
            state = StreamRecord(request_id=request_id, route=route, principal=key.name, body_sha256=sha)
        elif not req.stream and sha and client_request_id is not None:
            resp, status, replica_label = await _serve_once(gw, request, req, request_id, out_headers, started,
                                                            key, lease, scoped_session, sha)
            return resp
        resp, status, replica_label = await _serve(gw, request, req, request_id, out_headers, started, key,
                                                   lease, scoped_session, state=state, resume=resume)
        return resp
    except UnbrokenError as e:
        status = e.status
        return error_response(e, headers=out_headers)
    finally:
        if lease is not None:
            lease.release()  # a request that ended early keeps its reservation as its charge
        gw.metrics.count_request(route, status, replica_label, time.monotonic() - started)


def max_model_len(gw: Gateway, model: str) -> int:
    """The longest context any replica serving ``model`` reports (0 = none reported)."""
    best = 0
    for rep in gw.replicas:
        if rep.report is not None and rep.serves(model):
            best = max(best, rep.report.max_model_len)
    return best


def _check_context_length(gw: Gateway, req: ClientRequest, route: str) -> None:
    """400 context_length_exceeded at once for a prompt that cannot fit any replica's context even at
    ``routing.max_chars_per_token`` characters per token (a bound, so no prompt that fits is refused)."""
    per_token = gw.config.routing.max_chars_per_token
    if per_token <= 0:
        return
    limit = max_model_len(gw, req.model)
    min_tokens = int(req.num_prompt_chars / per_token)
    if limit and min_tokens >= limit:
        raise ContextLengthError(
            f"this model's maximum context length is {limit} tokens; the prompt ({req.num_prompt_chars} "
            f"characters) has at least {min_tokens}", param="messages" if route == CHAT_ROUTE else "prompt")


def _shed_reason(err: UnbrokenError) -> str:
    if isinstance(err, ShedError):
        return "batch"  # batch work goes first, before the queue
    if isinstance(err, NoReplicaError):
        return "no_replica"
    return "queue"  # the queue was full or its wait ran out


async def _resume_point(gw: Gateway, route: str, req: ClientRequest, request_id: str, last_event_id: str,
                        key: ApiKey, sha: str) -> tuple[ResumePoint, dict[str, Any]]:
    """Where a client's reconnect continues, from the stream's state here or in Redis; a 4xx for an
    unknown or expired stream, another key's, another body, or a point that cannot be reached exactly."""
    cfg = gw.config
    refused = gw.metrics.stream_resumes.labels("refused")
    try:
        last = EventId.parse(last_event_id, cfg.streams.max_stream_tokens)
    except ValueError as e:
        refused.inc()
        raise InvalidRequestError(f"Last-Event-ID: {e}", param="Last-Event-ID") from None
    if last.request_id != request_id:
        refused.inc()
        raise InvalidRequestError("Last-Event-ID belongs to another request: send the X-Request-ID of the "
                                  "stream being resumed", param="Last-Event-ID")
    record, source = await gw.streams.lookup(request_id)
    if record is None or record.principal != key.name:  # another key's stream is not theirs to know of
        refused.inc()
        raise StreamNotFoundError(f"no stream {request_id!r} to resume: unknown, expired, or not this key's "
                                  f"(streams stay resumable for {cfg.streams.state_ttl_s} s)", param="Last-Event-ID")
    if record.route != route or record.body_sha256 != sha:
        refused.inc()
        raise ConflictError("a resumed stream must be requested with the same route and body as at its start",
                            param="Last-Event-ID")
    known = record.token_ids[:last.num_tokens]
    body = record.body()
    if len(known) < last.num_tokens and (record.finished or not _deterministic(body)):
        refused.inc()
        raise ConflictError(f"the stream's state holds {len(record.token_ids)} tokens, fewer than the "
                            f"{last.num_tokens} of Last-Event-ID, and its sampling is not greedy or seeded: it "
                            f"cannot be continued exactly", param="Last-Event-ID")
    gw.metrics.stream_resumes.labels(source).inc()
    log.info("request %s: resuming from %s (%d of its tokens known, state from %s)", request_id, last_event_id,
             len(known), source)
    return ResumePoint(last=last, known_token_ids=list(known), stream_id=record.stream_id, created=record.created,
                       model=record.model), body


def _deterministic(body: dict[str, Any]) -> bool:
    """Whether the replica regenerates the same tokens (greedy or seeded)."""
    return body.get("temperature") == 0 or body.get("top_k") == 1 or body.get("seed") is not None


async def _serve_once(gw: Gateway, request: web.Request, req: ClientRequest, request_id: str,
                      out_headers: dict[str, str], started: float, key: ApiKey, lease: KeyLease,
                      scoped_session: str | None, sha: str) -> tuple[web.StreamResponse, int, str]:
    """A non-stream request with the client's X-Request-ID: generated once per id and body."""
    served: dict[str, Any] = {}

    async def generate() -> tuple[int, bytes]:
        resp, status, replica = await _serve(gw, request, req, request_id, out_headers, started, key, lease,
                                             scoped_session)
        served["replica"] = replica
        assert isinstance(resp, web.Response) and resp.body is not None
        return status, bytes(resp.body)  # type: ignore[arg-type]

    (status, body), source = await gw.answers.run(request_id, key.name, sha, generate,
                                                  started + gw.config.server.request_deadline_s)
    if source is not None:
        out_headers["X-Unbroken-Replayed"] = source
    resp = web.Response(body=body, status=status, headers=out_headers, content_type="application/json")
    return resp, status, served.get("replica", "none")


async def _serve(gw: Gateway, request: web.Request, req: ClientRequest, request_id: str,
                 out_headers: dict[str, str], started: float, key: ApiKey, lease: KeyLease,
                 scoped_session: str | None, *, state: StreamRecord | None = None,
                 resume: ResumePoint | None = None) -> tuple[web.StreamResponse, int, str]:
    cfg = gw.config
    deadline = started + cfg.server.request_deadline_s
    gw.budget.on_request()
    try:
        admission = await gw.degradation.admit(req, deadline)
    except UnbrokenError as e:  # the last tier: shed
        if isinstance(e, NoReplicaError):
            gw.relay.log_no_replica(req.model, e.message)
        gw.metrics.sheds.labels(_shed_reason(e), req.priority).inc()
        gw.metrics.degradations.labels("shed").inc()
        out_headers["X-Unbroken-Degraded"] = "shed"
        raise
    try:
        for tier in admission.tiers:
            gw.metrics.degradations.labels(tier).inc()
        if admission.tiers:
            out_headers["X-Unbroken-Degraded"] = ",".join(admission.tiers)
        # JSON bodies: engines behind FastAPI (vLLM, SGLang, llama-cpp-python) refuse any other type.
        fwd = {"X-Request-ID": request_id, "Content-Type": "application/json"}
        for h in _FORWARDED_HEADERS:
            v = request.headers.get(h)
            if v is not None:
                fwd[h] = v
        fwd.pop("X-Session-ID", None)
        if scoped_session is not None:
            fwd["X-Session-ID"] = scoped_session  # the replica never sees the client's own id
        route_req = RouteRequest(model=req.model,
                                 num_prompt_tokens=int(req.num_prompt_chars / cfg.routing.chars_per_token),
                                 session_key=req.session_key, adapter=req.adapter, priority=req.priority)
        ctx = RequestContext(req=req, request_id=request_id, started_s=started, deadline_s=deadline,
                             forward_headers=fwd, route=route_req, tiers=admission.tiers, state=state, resume=resume)
        route_req.exclude = ctx.tried
        fallbacks = _FallbackPlan(cfg.degradation.context_fallback_models, cfg.degradation.error_fallback_models,
                                  req.model)
        while True:
            try:
                if req.stream:
                    up = await gw.relay.open_stream(
                        ctx, resume_token_ids=resume.known_token_ids if resume else None)
                else:
                    status, body = await gw.relay.call_nonstream(ctx)
                break
            except AttemptError as e:
                err = e.error
                nxt = fallbacks.next_model(err, gw.replicas.known_models())
                if nxt is not None and time.monotonic() < deadline:
                    reason = "context_length" if isinstance(err, ContextLengthError) else "error"
                    gw.metrics.model_fallbacks.labels(reason).inc()
                    log.info("request %s: model %r failed (%s: %s); trying model %r", request_id, req.model,
                             err.code, err.message[:200], nxt)
                    req.openai.model = route_req.model = nxt
                    route_req.adapter = req.adapter
                    ctx.tried.clear()
                    continue
                out_headers["X-Unbroken-Retries"] = str(ctx.num_retries)
                if e.replica is not None:
                    out_headers["X-Replica-ID"] = e.replica.replica_id
                lease.release(0)
                return error_response(err, headers=out_headers), err.status, \
                    e.replica.replica_id if e.replica else "none"
        out_headers["X-Unbroken-Model"] = req.model
        assert ctx.replica is not None or req.stream
        if req.stream:
            out_headers["X-Replica-ID"] = up.replica.replica_id
            out_headers["X-Unbroken-Retries"] = str(ctx.num_retries)
            resp = await gw.relay.relay_stream(ctx, request, up, out_headers)
            lease.release(ctx.num_completion_tokens + (ctx.num_prompt_tokens or route_req.num_prompt_tokens))
            return resp, ctx.status, ctx.replica.replica_id if ctx.replica else "none"
        assert ctx.replica is not None
        out_headers["X-Replica-ID"] = ctx.replica.replica_id
        out_headers["X-Unbroken-Retries"] = str(ctx.num_retries)
        out_headers["X-Unbroken-Failovers"] = "0"
        if lease.key.tokens_per_minute:
            try:
                usage = orjson.loads(body).get("usage") or {}
                lease.release(int(usage.get("total_tokens") or 0))
            except (orjson.JSONDecodeError, AttributeError, TypeError, ValueError):
                pass
        resp = web.Response(body=body, status=status, headers=out_headers, content_type="application/json")
        return resp, status, ctx.replica.replica_id
    finally:
        gw.degradation.release(admission)


class _FallbackPlan:
    """Which model a failed request tries next: a prompt too long for its model goes to the
    configured larger-context group (never resent unchanged); replica failures walk the model's
    error fallback list. Client mistakes (and content-policy refusals) are never retried."""

    def __init__(self, context: dict[str, str], errors: dict[str, list[str]], model: str) -> None:
        self._context = context
        self._errors = list(errors.get(model) or ())
        self._tried = {model}
        self._model = model

    def next_model(self, err: UnbrokenError, known: frozenset[str]) -> str | None:
        if isinstance(err, ContextLengthError):
            nxt = self._context.get(self._model)
            if nxt and nxt not in self._tried:
                self._tried.add(nxt)
                self._model = nxt
                return nxt
            return None
        if isinstance(err, ClientError):
            return None
        while self._errors:
            nxt = self._errors.pop(0)
            if nxt not in self._tried and nxt in known:
                self._tried.add(nxt)
                self._model = nxt
                return nxt
        return None


async def models_handler(request: web.Request) -> web.Response:
    gw = request.app[GATEWAY_KEY]
    gw.auth.authenticate(request.headers.get("Authorization"))
    now = int(time.time())
    models = set()
    for rep in gw.replicas:
        if rep.state is ReplicaState.HEALTHY:
            models |= rep.models
    data = [{"id": m, "object": "model", "created": now, "owned_by": "unbroken",
             **({"parent": m.partition(":")[0]} if ":" in m else {})} for m in sorted(models)]
    return json_response({"object": "list", "data": data})


async def healthz_handler(request: web.Request) -> web.Response:
    return json_response({"status": "ok"})


async def readyz_handler(request: web.Request) -> web.Response:
    gw = request.app[GATEWAY_KEY]
    n = gw.replicas.num_healthy()
    if n == 0 or gw.draining:
        return json_response({"status": "not_ready", "healthy_replicas": n}, status=503)
    return json_response({"status": "ready", "healthy_replicas": n})


async def metrics_handler(request: web.Request) -> web.Response:
    gw = request.app[GATEWAY_KEY]
    if not gw.config.metrics.enabled:
        raise NotFoundError("metrics are disabled")
    gw.auth.check_admin(request.headers.get("Authorization"))  # its labels name the API keys
    return web.Response(body=gw.metrics.render(), headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"})


async def openapi_handler(request: web.Request) -> web.Response:
    request.app[GATEWAY_KEY].auth.authenticate(request.headers.get("Authorization"))
    return json_response(openapi_spec())


async def admin_replicas_handler(request: web.Request) -> web.Response:
    gw = request.app[GATEWAY_KEY]
    gw.auth.check_admin(request.headers.get("Authorization"))
    return json_response({"replicas": [{**r.to_admin_dict(), "resume": gw.relay.admin_resume(r)} for r in gw.replicas],
                          "retry_budget_tokens": round(gw.budget.tokens, 2),
                          "queue_depth": gw.degradation.queue_depth,
                          "session_placements": len(gw.placements)})


async def admin_drain_handler(request: web.Request) -> web.Response:
    gw = request.app[GATEWAY_KEY]
    gw.auth.check_admin(request.headers.get("Authorization"))
    replica_id = request.match_info["replica_id"]
    rep = gw.replicas.find(replica_id)
    if rep is None:
        raise NotFoundError(f"no replica {replica_id!r}; known: {', '.join(r.replica_id for r in gw.replicas)}")
    gw.apply_drain(rep.replica_id)
    if gw.discovery is not None:
        try:
            await gw.discovery.publish_drain(rep.replica_id)
        except Exception as e:  # noqa: BLE001 - this worker drains it anyway
            log.warning("could not share the drain of %s through Redis: %s", rep.replica_id, e)
    return json_response({"replica_id": rep.replica_id, "state": rep.state.value,
                          "gateway_inflight": rep.num_inflight})
