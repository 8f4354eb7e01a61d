"""Sessions stick and move (and agree across gateways through Redis); replicas join and leave
through the Redis registry without a gateway restart."""

from __future__ import annotations

import asyncio
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from gateway.auth import ANONYMOUS
from gateway.config import GatewayConfig
from gateway.testing import RunningGateway
from loadtest.mock_replica import MockReplica
from unbroken.procs import ManagedProcess, free_port

pytestmark = pytest.mark.asyncio
CHAT = {"model": "qwen", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}


def config(urls: list[str], **sections: Any) -> GatewayConfig:
    data: dict[str, Any] = {"server": {"port": 0}, "replicas": {"urls": urls},
                            "retry": {"backoff_initial_ms": 1, "backoff_max_ms": 2}}
    for k, v in sections.items():
        data.setdefault(k, {}).update(v)
    return GatewayConfig.model_validate(data)


async def _served_by(s: aiohttp.ClientSession, url: str, session: str, *, user: bool = False) -> str:
    body = {**CHAT, "user": session} if user else CHAT
    headers = {} if user else {"X-Session-ID": session}
    async with s.post(url + "/v1/chat/completions", json=body, headers=headers) as r:
        assert r.status == 200, await r.text()
        return r.headers["X-Replica-ID"]


async def _wait(pred, timeout_s: float = 3.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout_s
    while not pred():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.01)


async def test_sessions_stick_move_when_their_replica_fails_and_stay_shared_through_redis(redis_url: str) -> None:
    ms = [await MockReplica(replica_id=f"m{i}").start() for i in range(3)]
    urls = [m.url for m in ms]
    gw1 = await RunningGateway(config(urls, redis={"url": redis_url})).start()
    gw2 = await RunningGateway(config(urls, redis={"url": redis_url})).start()
    try:
        await gw1.wait_healthy(3)
        await gw2.wait_healthy(3)
        sessions = [f"conv-{i}" for i in range(24)]
        async with aiohttp.ClientSession() as s:
            home = {k: await _served_by(s, gw1.url, k) for k in sessions}
            assert len(set(home.values())) >= 2
            for k in sessions:  # sticky, on either gateway, by X-Session-ID or by `user`
                assert await _served_by(s, gw1.url, k) == home[k]
                assert await _served_by(s, gw2.url, k) == home[k]
            assert await _served_by(s, gw1.url, sessions[0], user=True) == home[sessions[0]]
            victim_id = home[sessions[0]]
            victim = next(m for m in ms if m.replica_id == victim_id)
            await victim.stop()
            await _wait(lambda: gw1.gateway.replicas.find(victim_id).state.value != "healthy")
            moved = {k: await _served_by(s, gw1.url, k) for k in sessions}
            for k in sessions:
                if home[k] == victim_id:
                    assert moved[k] != victim_id
                else:
                    assert moved[k] == home[k]
            await victim.start(port=victim.port)  # it comes back on the same address
            await _wait(lambda: gw1.gateway.replicas.find(victim_id).state.value == "healthy")
            await _wait(lambda: gw2.gateway.replicas.find(victim_id).state.value == "healthy")
            scoped = {k: gw2.gateway.sessions.derive(ANONYMOUS, k) for k in sessions}  # the key placements use
            await _wait(lambda: all(gw2.gateway.placements.get(scoped[k]) for k in sessions if home[k] == victim_id))
            for k in sessions:  # moved sessions stay where they went, on both gateways
                assert await _served_by(s, gw1.url, k) == moved[k]
                assert await _served_by(s, gw2.url, k) == moved[k]
        # a gateway started later loads the placements from Redis
        gw3 = await RunningGateway(config(urls, redis={"url": redis_url})).start()
        try:
            await gw3.wait_healthy(3)
            async with aiohttp.ClientSession() as s:
                for k in sessions:
                    assert await _served_by(s, gw3.url, k) == moved[k]
        finally:
            await gw3.stop()
    finally:
        await gw1.stop()
        await gw2.stop()
        for m in ms:
            await m.stop()


async def test_replicas_join_and_leave_through_the_redis_registry(redis_url: str, tmp_path: Path) -> None:
    gw = await RunningGateway(config([], redis={"url": redis_url, "discovery_interval_ms": 100})).start()
    procs: list[ManagedProcess] = []
    try:
        async with aiohttp.ClientSession() as s:
            async with s.get(gw.url + "/readyz") as r:
                assert r.status == 503
            for i in range(2):
                port = free_port()
                procs.append(ManagedProcess(
                    f"dyn{i}", [sys.executable, "-m", "loadtest.mock_replica", "--port", str(port), "--replica-id",
                                f"dyn{i}", "--registry-redis-url", redis_url, "--registry-ttl-s", "1.0"],
                    log_path=tmp_path / f"dyn{i}.log", ready_url=f"http://127.0.0.1:{port}/health").start())
            for p in procs:
                await asyncio.get_running_loop().run_in_executor(None, p.wait_ready, 30)
            await _wait(lambda: gw.gateway.replicas.num_healthy() == 2, 5)
            async with s.get(gw.url + "/readyz") as r:
                assert r.status == 200
            seen = {await _served_by(s, gw.url, f"k{i}") for i in range(12)}
            assert seen == {"dyn0", "dyn1"}
            procs[0].stop()  # clean shutdown deletes its key
            await _wait(lambda: gw.gateway.replicas.find("dyn0") is None, 3)
            procs[1].kill()  # kill -9: the key expires (ttl 1 s)
            await _wait(lambda: gw.gateway.replicas.find("dyn1") is None, 4)
    finally:
        await gw.stop()
        for p in procs:
            p.stop()
