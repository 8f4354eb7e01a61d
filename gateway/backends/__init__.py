"""Backend kinds: how the gateway learns what one replica is, how loaded it is, and how far a
stream on it can be resumed elsewhere.

Every kind is one small class (one file each) behind :class:`BackendProbe`: ``poll()`` asks the
engine what it exposes (its health route, its model list, its Prometheus metrics) and returns the
same :class:`ReplicaStateReport` the project's replicas serve at ``/state``, so least-load,
power-of-two, session affinity, breakers, retries, hedging and degradation work alike for every
kind. ``kind: auto`` asks the server what it is once it answers (:mod:`gateway.backends.detect`).

Resume modes (what a failover after the first byte can do, best first):
- ``token``: the prompt and the generated token ids move exactly (the project's replicas:
  ``resume_token_ids``);
- ``text``: the partial answer is sent back as an assistant prefix (chat, for engines that accept
  one) or appended to the prompt (completions); the continuation is re-tokenized, so it is
  *inexact* (counted apart in metrics);
- ``none``: fail over only before the first byte; afterwards the stream ends with an SSE error event.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from gateway.policies import Registry

if TYPE_CHECKING:
    import aiohttp

    from unbroken.contract.heartbeat import ReplicaStateReport


class ResumeMode(str, enum.Enum):
    TOKEN = "token"
    TEXT = "text"
    NONE = "none"


class ProbeError(Exception):
    """A heartbeat answer the gateway cannot use (a 404, a body of the wrong shape): a miss."""


@dataclass
class BackendTraits:
    """What a kind offers, shown in ``/admin/replicas`` and docs/backends.md."""

    resume_chat: ResumeMode
    resume_completions: ResumeMode
    load_signal: str  # where running/waiting come from
    kv_signal: str  # where KV use comes from ("" = none)
    adapters: bool = False
    sessions: bool = False  # kvsync session KV (the project's replicas only)
    version_source: str = ""
    notes: list[str] = field(default_factory=list)

    def resume_for(self, route: str) -> ResumeMode:
        from gateway.protocol import CHAT_ROUTE

        return self.resume_chat if route == CHAT_ROUTE else self.resume_completions


class BackendProbe(Protocol):
    """One replica's heartbeat for one kind. One instance per replica (it may keep state, such as
    the model list it fetches less often than the load)."""

    kind: str
    traits: BackendTraits
    version: str

    async def poll(self, session: aiohttp.ClientSession, url: str) -> ReplicaStateReport:
        """The replica's report now. Raises :class:`ProbeError` (or an aiohttp/OS/timeout error)
        when it cannot say."""
        ...


BACKENDS: Registry[BackendProbe] = Registry("replica kind")


def make_probe(kind: str) -> BackendProbe:
    """The probe for ``kind`` (``auto`` detects); an unknown kind lists the supported ones."""
    return BACKENDS.get(kind)()


def kind_names() -> list[str]:
    return BACKENDS.names()


# Importing the modules registers them.
from gateway.backends import detect, llamacpp, openai, sglang, tgi, unbroken, vllm  # noqa: E402,F401
