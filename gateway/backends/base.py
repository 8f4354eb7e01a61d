"""The interface every backend kind implements, and the registry of kinds (see ``__init__``)."""


from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from gateway.policies.base import Registry

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

