"""An attempt's hold on one replica: the bookkeeping that must balance, owned by one object.

Routing a request to a replica takes an :class:`AttemptLease` (``acquire``: the replica's
in-flight count goes up and its breaker counts a half-open probe). However the attempt ends —
an answer, a replica failure, a client's mistake, a cancelled hedge, a client gone — it ends
with one :meth:`AttemptLease.release` carrying the :class:`Outcome` that the breaker records.
The first release counts; later ones are ignored, so a cleanup path may release unconditionally
without unbalancing the count.
"""

from __future__ import annotations

import enum
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import aiohttp

    from gateway.replicaset import Replica


class Outcome(enum.Enum):
    """What an attempt says about its replica, for the circuit breaker."""

    SUCCESS = "success"  # the replica answered (a client's 4xx is a working replica)
    FAILURE = "failure"  # the replica is to blame (refused, 5xx, stalled, closed early, died)
    NEUTRAL = "neutral"  # says nothing about it (client gone, cancelled hedge, overload, client error event)


class AttemptLease:
    """One attempt on ``replica``: holds its in-flight slot and, once attached, the upstream
    response; :meth:`release` gives both back and reports the outcome exactly once."""

    __slots__ = ("replica", "response", "_released")

    def __init__(self, replica: Replica) -> None:
        self.replica = replica
        self.response: aiohttp.ClientResponse | None = None
        self._released = False
        replica.num_inflight += 1
        if replica.breaker is not None:
            replica.breaker.on_dispatch()

    @property
    def released(self) -> bool:
        return self._released

    def attach(self, response: aiohttp.ClientResponse) -> None:
        """The attempt's open response: released with the lease (kept alive on success, the
        connection dropped otherwise so that the replica cancels the generation)."""
        self.response = response

    def release(self, outcome: Outcome) -> bool:
        """End the attempt with ``outcome``; False (and nothing done) if it had already ended."""
        if self._released:
            return False
        self._released = True
        rep = self.replica
        rep.num_inflight -= 1
        if rep.breaker is not None:
            if outcome is Outcome.NEUTRAL:
                rep.breaker.release_probe()
            else:
                rep.breaker.record_outcome(outcome is Outcome.SUCCESS)
        if self.response is not None:
            if outcome is Outcome.SUCCESS:
                self.response.release()
            else:
                self.response.close()
        return True
