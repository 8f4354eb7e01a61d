"""What to do when capacity is short, in order:

1. ``fallback``: route to the model's configured fallback group, if that has capacity;
2. ``clamped``: clamp ``max_tokens`` of non-critical requests to ``clamp_max_tokens``;
3. ``queued``: wait in a bounded queue (critical first) until capacity frees or ``queue_timeout_s``
   (or the request's deadline) passes;
4. shed: 503 with ``Retry-After`` (queue full or timed out), and ``batch`` requests are shed with
   429 earlier, once in-flight passes ``shed_batch_at_fraction`` of capacity.

Capacity for a model is ``overload_inflight_per_replica`` x the replicas in rotation for it, split
over the gateway's worker processes. The controller lives on the event loop; it has no locks.
The tiers applied are returned so the caller can count them and set ``X-Unbroken-Degraded``.
"""

from __future__ import annotations

import asyncio
import itertools
import math
import time
from dataclasses import dataclass, field

from gateway.config import DegradationSection
from gateway.protocol import ClientRequest
from gateway.replicaset import ReplicaSet
from unbroken.errors import NoReplicaError, OverloadedError, ShedError

_PRIORITY_RANK = {"critical": 0, "normal": 1, "batch": 2}


@dataclass
class Admission:
    model: str
    tiers: list[str] = field(default_factory=list)
    released: bool = False


@dataclass(order=True)
class _Waiter:
    rank: int
    seq: int
    model: str = field(compare=False)
    future: asyncio.Future[None] = field(compare=False)


class DegradationController:
    def __init__(self, config: DegradationSection, replicas: ReplicaSet, num_workers: int = 1) -> None:
        self.config = config
        self.replicas = replicas
        self.num_workers = max(1, num_workers)
        self.inflight_by_model: dict[str, int] = {}
        self.num_inflight = 0
        self._waiters: list[_Waiter] = []
        self._seq = itertools.count()
        replicas.add_listener(lambda event, rep: self._wake())

    @property
    def queue_depth(self) -> int:
        return len(self._waiters)

    def capacity(self, model: str) -> int:
        reps = self.replicas.routable_by_model.get(model)
        if not reps:
            return 0
        return max(1, math.ceil(self.config.overload_inflight_per_replica * len(reps) / self.num_workers))

    def has_capacity(self, model: str) -> bool:
        return self.inflight_by_model.get(model, 0) < self.capacity(model)

    def _take(self, model: str) -> None:
        self.inflight_by_model[model] = self.inflight_by_model.get(model, 0) + 1
        self.num_inflight += 1

    async def admit(self, req: ClientRequest, deadline_s: float) -> Admission:
        """Admit ``req`` (possibly changing its model or max_tokens) or raise a shed error."""
        model = req.model
        cap = self.capacity(model)
        used = self.inflight_by_model.get(model, 0)
        if req.priority == "batch" and cap and used >= self.config.shed_batch_at_fraction * cap:
            raise ShedError("shedding batch work: capacity is short", retry_after_s=self.config.retry_after_s)
        if used < cap and not self._waiters:
            self._take(model)
            return Admission(model)
        adm = Admission(model)
        fallback = self.config.fallback_models.get(model)
        if fallback and self.has_capacity(fallback):
            req.openai.model = fallback
            adm.model = fallback
            adm.tiers.append("fallback")
            self._take(fallback)
            return adm
        if req.priority == "batch" and cap:
            raise ShedError("shedding batch work: capacity is short", retry_after_s=self.config.retry_after_s)
        if req.priority != "critical" and cap:
            limit = self.config.clamp_max_tokens
            if req.max_tokens is None or req.max_tokens > limit:
                req.openai.max_tokens = limit
                adm.tiers.append("clamped")
        if len(self._waiters) >= self.config.queue_max_depth:
            adm.tiers.append("shed")
            if cap == 0:
                raise NoReplicaError(f"no replica in rotation serves {model!r}", retry_after_s=self.config.retry_after_s)
            raise OverloadedError("capacity is short and the queue is full", retry_after_s=self.config.retry_after_s)
        adm.tiers.append("queued")
        waiter = _Waiter(_PRIORITY_RANK.get(req.priority, 1), next(self._seq), model,
                         asyncio.get_running_loop().create_future())
        self._waiters.append(waiter)
        self._waiters.sort()
        timeout_s = min(self.config.queue_timeout_s, max(0.0, deadline_s - time.monotonic()))
        try:
            await asyncio.wait_for(asyncio.shield(waiter.future), timeout=timeout_s)
        except asyncio.TimeoutError:
            if waiter.future.done() and not waiter.future.cancelled():
                return adm  # admitted at the last moment
            adm.tiers.append("shed")
            if self.capacity(model) == 0:
                raise NoReplicaError(f"no replica in rotation serves {model!r}",
                                     retry_after_s=self.config.retry_after_s) from None
            raise OverloadedError(f"no capacity for {model!r} within {timeout_s:.1f}s",
                                  retry_after_s=self.config.retry_after_s) from None
        except asyncio.CancelledError:
            if waiter.future.done() and not waiter.future.cancelled():
                self.release(adm)
            raise
        finally:
            if waiter in self._waiters:
                self._waiters.remove(waiter)
            if not waiter.future.done():
                waiter.future.cancel()
        return adm  # _wake already counted it in

    def release(self, adm: Admission) -> None:
        if adm.released:
            return
        adm.released = True
        self.inflight_by_model[adm.model] = max(0, self.inflight_by_model.get(adm.model, 1) - 1)
        self.num_inflight = max(0, self.num_inflight - 1)
        if self._waiters:
            self._wake()

    def _wake(self) -> None:
        for w in list(self._waiters):
            if w.future.done():
                continue
            if self.has_capacity(w.model):
                self._take(w.model)
                self._waiters.remove(w)
                w.future.set_result(None)
