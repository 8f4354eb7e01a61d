"""unbroken.client against a real local aiohttp server that cuts its streams: the openai SDK sees one
stream, reconnects carry ``Last-Event-ID`` and the same ``X-Request-ID``, refused connections go to
the next gateway, a refused resume is raised, non-stream requests are sent again with the same id."""

from __future__ import annotations

import asyncio
import socket
import threading
from dataclasses import dataclass, field
from typing import Any, Iterator

import openai
import orjson
import pytest
from aiohttp import web

import unbroken.client as uc

NUM_TOKENS = 30


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Server:
    """A gateway stand-in: streams ``NUM_TOKENS`` chunks with ids ``rid:i``; the first ``cuts`` stream
    connections are cut (transport aborted) after ``cut_after`` chunks."""

    cut_after: int = 7
    cuts: int = 1
    refuse_resume: bool = False
    nonstream_cuts: int = 0
    seen: list[dict[str, str]] = field(default_factory=list)
    port: int = 0

    def chunk(self, rid: str, i: int) -> bytes:
        obj = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": "m",
               "choices": [{"index": 0, "delta": {"content": f"t{i} "}, "finish_reason": None}]}
        return f"id: {rid}:{i + 1}\n".encode() + b"data: " + orjson.dumps(obj) + b"\n\n"

    async def handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.seen.append({k: v for k, v in request.headers.items()})
        rid = request.headers.get("X-Request-ID", "")
        if not body.get("stream"):
            if self.nonstream_cuts > 0:
                self.nonstream_cuts -= 1
                assert request.transport is not None
                request.transport.abort()
                await asyncio.sleep(1)
            return web.json_response({"id": "c1", "object": "chat.completion", "created": 1, "model": "m",
                                      "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"},
                                                   "finish_reason": "stop"}]})
        last = request.headers.get("Last-Event-ID")
        start = 0
        if last is not None:
            if self.refuse_resume:
                return web.json_response({"error": {"message": "unknown stream", "type": "invalid_request_error",
                                                    "param": None, "code": "stream_not_found"}}, status=404)
            lrid, _, n = last.rpartition(":")
            assert lrid == rid
            start = int(n)
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        if start == 0:
            role = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": "m",
                    "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}]}
            await resp.write(f"id: {rid}:0\n".encode() + b"data: " + orjson.dumps(role) + b"\n\n")
        for i in range(start, NUM_TOKENS):
            if self.cuts > 0 and i == start + self.cut_after:
                self.cuts -= 1
                # half an event first: the client must not pass it on
                await resp.write(self.chunk(rid, i)[:20])
                assert request.transport is not None
                request.transport.abort()
                return resp
            await resp.write(self.chunk(rid, i))
        end = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": "m",
               "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}
        await resp.write(f"id: {rid}:{NUM_TOKENS}.1\n".encode() + b"data: " + orjson.dumps(end) + b"\n\n")
        await resp.write(f"id: {rid}:{NUM_TOKENS}.2\n".encode() + b"data: [DONE]\n\n")
        return resp


@pytest.fixture
def server() -> Iterator[Server]:
    srv = Server()
    srv.port = _free_port()
    loop = asyncio.new_event_loop()
    started = threading.Event()
    runner_box: list[web.AppRunner] = []

    async def start() -> None:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", srv.handle)
        runner = web.AppRunner(app)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", srv.port).start()
        runner_box.append(runner)
        started.set()

    t = threading.Thread(target=lambda: (loop.run_until_complete(start()), loop.run_forever()), daemon=True)
    t.start()
    assert started.wait(10)
    try:
        yield srv
    finally:
        asyncio.run_coroutine_threadsafe(runner_box[0].cleanup(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        t.join(10)


def _want() -> str:
    return "".join(f"t{i} " for i in range(NUM_TOKENS))


def _client(urls: list[str]) -> openai.OpenAI:
    return openai.OpenAI(base_url=urls[0], api_key="k", max_retries=0,
                         http_client=uc.http_client(urls=urls, policy=uc.ReconnectPolicy(reconnect_timeout_s=10)))


MESSAGES: Any = [{"role": "user", "content": "hi"}]


def test_sdk_sees_one_stream_across_cuts(server: Server) -> None:
    server.cuts = 2
    dead = f"http://127.0.0.1:{_free_port()}/v1"  # refused: the client goes on to the next
    live = f"http://127.0.0.1:{server.port}/v1"
    client = _client([dead, live])
    stream = client.chat.completions.create(model="m", messages=MESSAGES, stream=True)
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert text == _want()
    assert len(server.seen) == 3
    rids = {h["X-Request-ID"] for h in server.seen}
    assert len(rids) == 1 and next(iter(rids))  # one id, generated by the client
    assert "Last-Event-ID" not in server.seen[0]
    rid = next(iter(rids))
    assert server.seen[1]["Last-Event-ID"] == f"{rid}:7"
    assert server.seen[2]["Last-Event-ID"] == f"{rid}:14"


def test_callers_request_id_is_kept(server: Server) -> None:
    client = _client([f"http://127.0.0.1:{server.port}/v1"])
    stream = client.chat.completions.create(model="m", messages=MESSAGES, stream=True,
                                            extra_headers={"X-Request-ID": "mine-1"})
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == _want()
    assert [h["X-Request-ID"] for h in server.seen] == ["mine-1", "mine-1"]
    assert server.seen[1]["Last-Event-ID"] == "mine-1:7"


def test_refused_resume_is_raised(server: Server) -> None:
    server.refuse_resume = True
    client = _client([f"http://127.0.0.1:{server.port}/v1"])
    stream = client.chat.completions.create(model="m", messages=MESSAGES, stream=True)
    got: list[str] = []
    with pytest.raises(openai.APIError, match="unknown stream"):
        for c in stream:
            if c.choices:
                got.append(c.choices[0].delta.content or "")
    assert "".join(got) == "".join(f"t{i} " for i in range(7))  # the half event never passed on


def test_nonstream_is_sent_again_with_the_same_id(server: Server) -> None:
    server.nonstream_cuts = 1
    client = _client([f"http://127.0.0.1:{server.port}/v1"])
    out = client.chat.completions.create(model="m", messages=MESSAGES)
    assert out.choices[0].message.content == "ok"
    assert len(server.seen) == 2 and server.seen[0]["X-Request-ID"] == server.seen[1]["X-Request-ID"]


def test_gives_up_when_nothing_answers() -> None:
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{_free_port()}/v1", api_key="k", max_retries=0,
                           http_client=uc.http_client(urls=[f"http://127.0.0.1:{_free_port()}/v1"],
                                                      policy=uc.ReconnectPolicy(max_reconnects=3)))
    with pytest.raises(openai.APIConnectionError):
        client.chat.completions.create(model="m", messages=MESSAGES)


def test_async_client_splices(server: Server) -> None:
    server.cuts = 2

    async def run() -> str:
        client = openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{server.port}/v1", api_key="k", max_retries=0,
                                    http_client=uc.async_http_client(urls=[f"http://127.0.0.1:{server.port}/v1"]))
        stream = await client.chat.completions.create(model="m", messages=MESSAGES, stream=True)
        parts = [c.choices[0].delta.content or "" async for c in stream if c.choices]
        await client.close()
        return "".join(parts)

    assert asyncio.run(run()) == _want()
    assert len(server.seen) == 3


def test_splicer_holds_half_events() -> None:
    s = uc.SSESplicer()
    assert s.feed(b"id: r:1\ndata: {}\n\nid: r:2\nda") == b"id: r:1\ndata: {}\n\n"
    assert s.last_event_id == "r:1"
    s.reset_partial(RuntimeError())
    assert s.feed(b"id: r:2\r\ndata: [DONE]\r\n\r\n") == b"id: r:2\ndata: [DONE]\n\n"
    assert s.last_event_id == "r:2" and s.done


def test_rebase_keeps_the_path() -> None:
    g = uc._Gateways(["http://a:1/v1", "http://b:2/api/v1"])
    u = g.rebase(uc.httpx.URL("http://a:1/v1/chat/completions?x=1"), 1)
    assert str(u) == "http://b:2/api/v1/chat/completions?x=1"
