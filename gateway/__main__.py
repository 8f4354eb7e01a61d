"""``python -m gateway`` / ``unbroken gateway``: run the gateway (one or several worker processes)."""

from __future__ import annotations

import argparse
import logging
import multiprocessing
import os
import signal
import sys
from pathlib import Path
from typing import Any

from aiohttp import web

from gateway.config import GatewayConfig, load_gateway_config
from unbroken.config import ConfigError


def _install_uvloop() -> None:
    try:
        import uvloop

        uvloop.install()
    except ImportError:  # pragma: no cover - uvloop is a dependency where it exists
        pass


def run_worker(config_data: dict[str, Any], num_workers: int, index: int) -> None:
    """One worker process: build the app and serve until SIGTERM/SIGINT."""
    logging.basicConfig(level=os.environ.get("UNBROKEN_LOG_LEVEL", "INFO"),
                        format=f"%(asctime)s gateway[{index}] %(levelname)s %(name)s: %(message)s")
    _install_uvloop()
    from gateway.server import build_app

    config = GatewayConfig.model_validate(config_data)
    app = build_app(config, num_workers=num_workers)
    web.run_app(app, host=config.server.host, port=config.server.port, reuse_port=num_workers > 1,
                access_log=None, print=None, shutdown_timeout=config.server.shutdown_timeout_s,
                handle_signals=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="gateway", description="The unbroken gateway: one OpenAI-compatible "
                                                                 "URL in front of the replicas.")
    parser.add_argument("--config", help="gateway YAML (default: configs/gateway.yaml when present)")
    parser.add_argument("--port", type=int, help="port to listen on")
    parser.add_argument("--host", help="address to listen on")
    parser.add_argument("--replica", action="append", metavar="URL", help="a replica base URL (repeatable)")
    parser.add_argument("--redis-url", help="Redis for discovery and shared state")
    parser.add_argument("--workers", type=int, help="worker processes sharing the port (SO_REUSEPORT)")
    args = parser.parse_args(argv)
    path = args.config
    if path is None and Path("configs/gateway.yaml").is_file():
        path = "configs/gateway.yaml"
    try:
        config = load_gateway_config(path, {
            "server.port": args.port, "server.host": args.host, "replicas.urls": args.replica,
            "redis.url": args.redis_url, "server.workers": args.workers,
        })
    except ConfigError as e:
        print(f"gateway: {e}", file=sys.stderr)
        return 2
    workers = config.server.workers
    if workers > 1 and config.server.port == 0:
        print("gateway: server.port must be set (not 0) when server.workers > 1", file=sys.stderr)
        return 2
    data = config.model_dump()
    if workers == 1:
        run_worker(data, 1, 0)
        return 0
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=run_worker, args=(data, workers, i), name=f"gateway-{i}") for i in range(workers)]
    for p in procs:
        p.start()

    def forward(signum: int, _frame: object) -> None:
        for p in procs:
            if p.is_alive() and p.pid is not None:
                os.kill(p.pid, signal.SIGTERM)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    code = 0
    for p in procs:
        p.join()
        code = code or (p.exitcode or 0)
    return code


if __name__ == "__main__":
    sys.exit(main())
