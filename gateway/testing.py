"""Run a gateway inside the current process (tests, benchmarks, notebooks).

``async with RunningGateway(config) as gw`` serves on the running loop; ``start_in_thread()``
serves on a loop of its own in a daemon thread so that synchronous code (the ``openai`` client)
can call it. Port 0 picks a free port; :attr:`RunningGateway.url` tells which.
"""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

from aiohttp import web

from gateway.config import GatewayConfig
from gateway.server import GATEWAY_KEY, Gateway, build_app


class RunningGateway:
    def __init__(self, config: GatewayConfig) -> None:
        self.config = config
        self.app = build_app(config)
        self.port = 0
        self._runner: web.AppRunner | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    @property
    def gateway(self) -> Gateway:
        return self.app[GATEWAY_KEY]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> "RunningGateway":
        self._runner = web.AppRunner(self.app, access_log=None, handle_signals=False,
                                    shutdown_timeout=self.config.server.shutdown_timeout_s)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.config.server.host, self.config.server.port)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        return self

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def wait_healthy(self, num_replicas: int = 1, timeout_s: float = 5.0) -> None:
        deadline = time.monotonic() + timeout_s
        while self.gateway.replicas.num_healthy() < num_replicas:
            if time.monotonic() > deadline:
                raise TimeoutError(f"only {self.gateway.replicas.num_healthy()} of {num_replicas} replicas healthy")
            await asyncio.sleep(0.01)

    async def __aenter__(self) -> "RunningGateway":
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # -- thread mode -----------------------------------------------------------------------------

    def start_in_thread(self, num_healthy: int = 0, timeout_s: float = 5.0) -> "RunningGateway":
        ready = threading.Event()
        errors: list[BaseException] = []
        self._loop = asyncio.new_event_loop()

        def run() -> None:
            assert self._loop is not None
            asyncio.set_event_loop(self._loop)
            try:
                self._loop.run_until_complete(self.start())
                if num_healthy:
                    self._loop.run_until_complete(self.wait_healthy(num_healthy, timeout_s))
            except BaseException as e:  # noqa: BLE001 - handed to the caller
                errors.append(e)
                ready.set()
                return
            ready.set()
            self._loop.run_forever()

        self._thread = threading.Thread(target=run, name="gateway", daemon=True)
        self._thread.start()
        if not ready.wait(timeout_s + 10):
            raise RuntimeError("gateway did not start")
        if errors:
            raise errors[0]
        return self

    def call(self, fn: Any) -> Any:
        """Run ``fn()`` on the gateway's loop (thread mode) and return its result."""
        assert self._loop is not None

        async def wrap() -> Any:
            return fn()

        return asyncio.run_coroutine_threadsafe(wrap(), self._loop).result(timeout=10)

    def stop_thread(self) -> None:
        if self._loop is None:
            return
        asyncio.run_coroutine_threadsafe(self.stop(), self._loop).result(timeout=20)
        self._loop.call_soon_threadsafe(self._loop.stop)
        if self._thread is not None:
            self._thread.join(timeout=10)
        self._loop = None


def parse_sse(text: str) -> list[Any]:
    """The ``data:`` payloads of an SSE body: dicts for JSON events, the string ``"[DONE]"``."""
    import orjson

    out: list[Any] = []
    for line in text.split("\n"):
        if line.startswith("data:"):
            payload = line[5:].strip()
            out.append(payload if payload == "[DONE]" else orjson.loads(payload))
    return out


def stream_tokens(events: list[Any], index: int = 0) -> tuple[list[int], str]:
    """All ``token_ids`` and the concatenated text of choice ``index`` over a stream's events."""
    ids: list[int] = []
    text = ""
    for ev in events:
        if not isinstance(ev, dict):
            continue
        for ch in ev.get("choices") or []:
            if ch.get("index", 0) != index:
                continue
            ids.extend(ch.get("token_ids") or [])
            text += (ch.get("delta") or {}).get("content") or ch.get("text") or ""
    return ids, text
