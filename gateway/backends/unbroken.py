"""The project's own replicas: ``GET /state`` is the whole heartbeat report (load, KV bytes,
sessions, adapters); streams resume token-exact with ``resume_token_ids``; sessions take part in
kvsync."""

from __future__ import annotations

from typing import TYPE_CHECKING

from gateway.backends.base import BACKENDS, BackendTraits, ProbeError, ResumeMode
from gateway.backends.engine import get_body, json_object

from unbroken.contract.heartbeat import ReplicaStateReport

if TYPE_CHECKING:
    import aiohttp


@BACKENDS.register("unbroken")
class UnbrokenProbe:
    kind = "unbroken"
    traits = BackendTraits(resume_chat=ResumeMode.TOKEN, resume_completions=ResumeMode.TOKEN,
                           load_signal="/state queue_length, num_running", kv_signal="/state kv_bytes_used/free",
                           adapters=True, sessions=True, version_source="GET /state")

    def __init__(self) -> None:
        self.version = ""
        self.models: list[str] = []

    async def poll(self, session: aiohttp.ClientSession, url: str) -> ReplicaStateReport:
        code, body = await get_body(session, url + "/state")
        if code != 200:
            raise ProbeError(f"/state answered {code}")
        try:
            return ReplicaStateReport.from_dict(json_object(body, "/state"))
        except (ValueError, TypeError) as e:
            raise ProbeError(f"/state is malformed: {e}") from None

    def served_models(self) -> list[str]:
        return []  # from the report: model and adapters
