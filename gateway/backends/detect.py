"""``kind: auto``: ask the server what it is, once it answers, then poll it as that kind.

Each kind says who it is somewhere else, asked in this order: the project's replicas at ``/state``
(with ``pid`` and ``kv_bytes_free``), SGLang at ``/get_server_info`` or ``/get_model_info``, TGI at
``/info`` (``model_id``), llama.cpp's ``llama-server`` at ``/props`` (``default_generation_settings``),
vLLM at ``/version`` (last of these: other engines may serve a ``/version`` too), llama-cpp-python in ``/v1/models`` (``owned_by: "me"``); anything else that answers ``/v1/models`` is ``openai``. Until one of them
answers, every poll is a miss with the reason.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import orjson

from gateway.backends.base import BACKENDS, BackendProbe, BackendTraits, ProbeError, ResumeMode, make_probe
from gateway.backends.engine import get_body

if TYPE_CHECKING:
    import aiohttp

    from unbroken.contract.heartbeat import ReplicaStateReport

log = logging.getLogger(__name__)


def _obj(code: int, body: bytes) -> dict[str, Any] | None:
    if code != 200:
        return None
    try:
        obj = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    return obj if isinstance(obj, dict) else None


async def detect_kind(session: aiohttp.ClientSession, url: str) -> tuple[str, str]:
    """``(kind, version)`` of the server at ``url``; raises :class:`ProbeError` if it is none we
    know and lists no models either."""
    st = _obj(*await get_body(session, url + "/state"))
    if st is not None and "pid" in st and "kv_bytes_free" in st:
        return "unbroken", ""
    # the engine-specific routes first; /version last, as more than one engine may serve one
    si = _obj(*await get_body(session, url + "/get_server_info"))
    if si is not None:
        return "sglang", str(si.get("version") or "")[:64]
    mi = _obj(*await get_body(session, url + "/get_model_info"))
    if mi is not None and "model_path" in mi:
        return "sglang", ""
    info = _obj(*await get_body(session, url + "/info"))
    if info is not None and "model_id" in info:
        return "tgi", str(info.get("version") or "")[:64]
    props = _obj(*await get_body(session, url + "/props"))
    if props is not None and ("default_generation_settings" in props or "total_slots" in props):
        return "llamacpp", str(props.get("build_info") or "")[:64]
    v = _obj(*await get_body(session, url + "/version"))
    if v is not None and isinstance(v.get("version"), str) and len(v) <= 2:
        return "vllm", v["version"][:64]
    models = _obj(*await get_body(session, url + "/v1/models"))
    if models is not None and isinstance(models.get("data"), list):
        data = [m for m in models["data"] if isinstance(m, dict)]
        if data and all(m.get("owned_by") == "me" for m in data):  # llama-cpp-python's server says so
            return "llamacpp", "llama-cpp-python"
        return "openai", ""
    raise ProbeError("not an OpenAI-compatible server: /state, /get_server_info, /get_model_info, /info, "
                     "/props, /version and /v1/models all failed")


@BACKENDS.register("auto")
class AutoProbe:
    """Detects the kind on the first answer, then delegates to that kind's probe."""

    kind = "auto"
    traits = BackendTraits(resume_chat=ResumeMode.NONE, resume_completions=ResumeMode.NONE,
                           load_signal="(detecting)", kv_signal="")

    def __init__(self) -> None:
        self.inner: BackendProbe | None = None
        self.version = ""

    async def poll(self, session: aiohttp.ClientSession, url: str) -> ReplicaStateReport:
        if self.inner is None:
            kind, version = await detect_kind(session, url)
            self.inner = make_probe(kind)
            self.inner.version = version
            self.version = version
            self.kind = kind  # type: ignore[misc]
            self.traits = self.inner.traits  # type: ignore[misc]
            log.info("replica %s detected as kind %s%s", url, kind, f" (version {version})" if version else "")
        return await self.inner.poll(session, url)

    def served_models(self) -> list[str]:
        return self.inner.served_models() if self.inner is not None else []  # type: ignore[attr-defined]
