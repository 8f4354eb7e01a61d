"""``python -m replica`` (= ``unbroken replica``): one model server.

Starts listening at once (``/health`` answers 503 ``loading``, ``/state`` reports the load),
loads the model with progress on stdout, starts the engine, announces itself in the Redis
registry when configured, and serves until SIGTERM/SIGINT. Then it drains: ``/health`` turns
503, new ``/v1`` work gets 503 ``draining`` with ``Retry-After``, running streams finish (up to
``server.drain_timeout_s``), and the process exits 0.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
import threading
import time
from typing import Any

from aiohttp import web

from replica.config import ReplicaConfig
from unbroken.config import ConfigError, load_config
from unbroken.contract.replication import Replication
from unbroken.procs import free_port

ENV_PREFIX = "UNBROKEN_REPLICA"
log = logging.getLogger("replica")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m replica", description="Run one unbroken model replica.")
    p.add_argument("--config", help="YAML config file (see configs/replica.yaml)")
    p.add_argument("--model", help="checkpoint directory (overrides model.path)")
    p.add_argument("--port", type=int, help="TCP port (overrides server.port)")
    p.add_argument("--host", help="listen address (overrides server.host)")
    p.add_argument("--replica-id", help="name in heartbeats and X-Replica-ID (overrides server.replica_id)")
    p.add_argument("--kvsync-url", help="the local kvsync sidecar; enables kvsync (overrides kvsync.sidecar_url)")
    p.add_argument("--registry-redis-url", help="announce in this Redis (overrides registry.redis_url)")
    p.add_argument("--shared-token", help="require 'Authorization: Bearer T' on /v1 (overrides server.shared_token)")
    p.add_argument("--quantization", choices=["nf4", "none"], help="overrides model.quantization")
    return p


def load_replica_config(args: argparse.Namespace) -> ReplicaConfig:
    overrides: dict[str, Any] = {
        "model.path": args.model,
        "server.port": args.port,
        "server.host": args.host,
        "server.replica_id": args.replica_id,
        "registry.redis_url": args.registry_redis_url,
        "server.shared_token": args.shared_token,
        "model.quantization": args.quantization,
    }
    if args.kvsync_url:
        overrides["kvsync.sidecar_url"] = args.kvsync_url
        overrides["kvsync.enabled"] = True
    return load_config(ReplicaConfig, args.config, env_prefix=ENV_PREFIX, overrides=overrides)


def make_kvsync_client(config: ReplicaConfig) -> Replication | None:
    """The replication the engine uses: kvsync's client when ``kvsync.enabled`` (None, with a
    warning, if kvsync is not installed). The one place the replica names kvsync's implementation."""
    if not config.kvsync.enabled:
        return None
    try:
        from kvsync.client import KVSyncClient
    except ImportError as e:
        log.warning("kvsync.enabled but kvsync.client cannot be imported (%s); serving without kvsync", e)
        return None
    client = KVSyncClient(config.kvsync.sidecar_url, block_tokens=config.kvsync.block_tokens,
                          shared_memory=config.kvsync.shared_memory)
    sidecar_blocks = client.sidecar_block_tokens()
    if sidecar_blocks is not None and sidecar_blocks != config.kvsync.block_tokens:
        # The sidecar owns the Redis layout; with another block size every incremental snapshot
        # would be refused and resent in full.
        log.warning("kvsync.block_tokens is %d but the sidecar at %s uses %d; using the sidecar's",
                    config.kvsync.block_tokens, config.kvsync.sidecar_url, sidecar_blocks)
        config.kvsync.block_tokens = client.block_tokens = sidecar_blocks
    client.start()
    return client


def _progress(message: str) -> None:
    print(f"[replica] {message}", flush=True)


async def _load_in_thread(engine: Any) -> None:
    """``engine.load`` on a daemon thread, so a SIGTERM during loading does not wait for it."""
    loop = asyncio.get_running_loop()
    done: asyncio.Future[None] = loop.create_future()

    def run() -> None:
        try:
            engine.load(_progress)
        except BaseException as e:  # noqa: BLE001 - handed to the loop
            err = e  # ``e`` is unbound when the except block ends, before the callback runs
            loop.call_soon_threadsafe(lambda: done.done() or done.set_exception(err))
        else:
            loop.call_soon_threadsafe(lambda: done.done() or done.set_result(None))

    threading.Thread(target=run, name="model-load", daemon=True).start()
    await done


async def serve(config: ReplicaConfig) -> int:
    from replica.engine import AsyncEngine
    from replica.server import RUNTIME, create_app

    server = config.server
    if server.port == 0:
        server.port = free_port()
    kvsync_client = make_kvsync_client(config)
    engine = AsyncEngine(config, kvsync_client)
    app = create_app(config, engine, engine_loaded=False)
    rt = app[RUNTIME]
    runner = web.AppRunner(app, handler_cancellation=True, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, server.host, server.port)
    await site.start()
    _progress(f"listening on http://{server.host}:{server.port} as {rt.replica_id} (loading the model)")

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    code = 0
    try:
        t0 = time.monotonic()
        load = asyncio.ensure_future(_load_in_thread(engine))
        stopper = asyncio.ensure_future(stop.wait())
        await asyncio.wait([load, stopper], return_when=asyncio.FIRST_COMPLETED)
        if not load.done():
            _progress("stopped while loading")
            load.cancel()
            return 0
        stopper.cancel()
        try:
            load.result()
        except Exception as e:  # noqa: BLE001 - report and exit non-zero
            log.exception("loading the model failed")
            print(f"[replica] loading the model failed: {e}", file=sys.stderr, flush=True)
            code = 1
            return code
        await rt.start_engine()
        _progress(f"ready in {time.monotonic() - t0:.1f}s: model {engine.served_name} "
                  f"({engine.quantization}, {engine.dtype}, {engine.device}), "
                  f"adapters {engine.adapter_names or 'none'}, max_model_len {engine.max_model_len}")
        await stop.wait()
        _progress(f"draining: {rt.num_active} requests running, up to {server.drain_timeout_s}s")
        finished = await rt.drain(server.drain_timeout_s)
        _progress("drained" if finished else "drain timed out; closing the remaining streams")
    finally:
        t_stop = time.monotonic()
        await runner.cleanup()
        if kvsync_client is not None:
            kvsync_client.close()
        _progress(f"stopped in {time.monotonic() - t_stop:.1f}s")
    return code


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        config = load_replica_config(args)
    except ConfigError as e:
        print(f"replica: {e}", file=sys.stderr)
        return 2
    # The engine thread runs Python between torch ops; a short GIL switch interval lets the event
    # loop take requests and write chunks between them instead of waiting 5 ms per hand-off.
    sys.setswitchinterval(float(os.environ.get("UNBROKEN_REPLICA_SWITCH_INTERVAL_S", "0.001")))
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
        return asyncio.run(serve(config))
    return uvloop.run(serve(config))


if __name__ == "__main__":
    sys.exit(main())
