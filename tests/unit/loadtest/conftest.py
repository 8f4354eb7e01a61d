"""A small deterministic OpenAI-style server (in a thread, on a free loopback port) that the
load-test users talk to: each answer's token ids are a function of the prompt, so the users'
reference checks pass, until a test switches on a misbehaviour."""

from __future__ import annotations

import asyncio
import hashlib
import threading
from dataclasses import dataclass, field
from typing import Iterator

import orjson
import pytest
from aiohttp import web


@dataclass
class FakeGateway:
    url: str = ""
    misbehave: set[str] = field(default_factory=set)
    """``duplicate`` a token, ``drop_done``, ``forget_context`` (ignore history), ``error_event``, ``http_500``."""
    num_requests: int = 0
    headers_seen: list[dict[str, str]] = field(default_factory=list)


def _ids(messages: list[dict], n: int, seed: object) -> list[int]:
    key = orjson.dumps([messages, seed])
    digest = hashlib.sha256(key).digest()
    return [10 + digest[i % len(digest)] + i for i in range(n)]


def _app(state: FakeGateway) -> web.Application:
    async def chat(request: web.Request) -> web.StreamResponse:
        state.num_requests += 1
        state.headers_seen.append(dict(request.headers))
        body = await request.json()
        if "http_500" in state.misbehave:
            return web.json_response({"error": {"message": "boom", "type": "server_error", "param": None,
                                                "code": "x"}}, status=500)
        messages = body["messages"]
        if "forget_context" in state.misbehave:
            messages = messages[-1:]
        n = body["max_tokens"]
        ids = _ids(messages, n, body.get("seed"))
        if "duplicate" in state.misbehave:  # a badly resumed stream that repeats token 2
            ids = ids[:3] + ids[2:3] + ids[3:]
        texts = [f"t{i} " for i in ids]
        hdrs = {"X-Replica-ID": "fake-0", "X-Unbroken-Retries": "0"}
        if not body.get("stream"):
            return web.json_response({
                "id": "cmpl-1", "object": "chat.completion",
                "choices": [{"index": 0, "message": {"role": "assistant", "content": "".join(texts)},
                             "token_ids": ids, "finish_reason": "length"}],
                "usage": {"prompt_tokens": 5, "completion_tokens": len(ids), "total_tokens": 5 + len(ids)},
            }, headers=hdrs)
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", **hdrs})
        await resp.prepare(request)

        async def send(obj: object) -> None:
            await resp.write(b"data: " + orjson.dumps(obj) + b"\n\n")

        await send({"id": "cmpl-1", "choices": [{"index": 0, "delta": {"role": "assistant"}, "finish_reason": None}]})
        for k, (i, t) in enumerate(zip(ids, texts)):
            if "error_event" in state.misbehave and k == 2:
                await send({"error": {"message": "replica lost", "type": "server_error", "code": "upstream_error"}})
                return resp
            last = k == len(ids) - 1
            await send({"id": "cmpl-1", "choices": [{"index": 0, "delta": {"content": t}, "token_ids": [i],
                                                      "finish_reason": "length" if last else None}],
                        **({"unbroken": {"failovers": 0}} if last else {})})
            await asyncio.sleep(0.001)
        await send({"id": "cmpl-1", "choices": [], "usage": {"completion_tokens": len(ids)}})
        if "drop_done" not in state.misbehave:
            await resp.write(b"data: [DONE]\n\n")
        return resp

    app = web.Application()
    app.router.add_post("/v1/chat/completions", chat)

    async def readyz(_request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    app.router.add_get("/readyz", readyz)
    return app


@pytest.fixture
def fake_gateway() -> Iterator[FakeGateway]:
    state = FakeGateway()
    loop = asyncio.new_event_loop()
    started = threading.Event()
    runner_box: dict[str, web.AppRunner] = {}

    async def start() -> None:
        runner = web.AppRunner(_app(state))
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        state.url = f"http://127.0.0.1:{port}"
        runner_box["r"] = runner

    def run() -> None:
        asyncio.set_event_loop(loop)
        loop.run_until_complete(start())
        started.set()
        loop.run_forever()

    t = threading.Thread(target=run, daemon=True)
    t.start()
    assert started.wait(10)
    try:
        yield state
    finally:
        asyncio.run_coroutine_threadsafe(runner_box["r"].cleanup(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        t.join(10)
