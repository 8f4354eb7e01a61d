"""``python -m gateway`` / ``unbroken gateway``: run the gateway (one or several worker processes)."""

from __future__ import annotations

import argparse
import multiprocessing
import os
import signal
import sys
from pathlib import Path

from gateway.config import load_gateway_config
from gateway.worker import run_worker
from unbroken.config import ConfigError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="gateway", description="The unbroken gateway: one OpenAI-compatible "
                                                                 "URL in front of the replicas.")
    parser.add_argument("--config", help="gateway YAML (default: configs/gateway.yaml when present)")
    parser.add_argument("--port", type=int, help="port to listen on")
    parser.add_argument("--host", help="address to listen on")
    parser.add_argument("--replica", action="append", metavar="URL", help="a replica base URL (repeatable)")
    parser.add_argument("--standby-replica", action="append", metavar="URL",
                        help="a warm standby replica's base URL (repeatable): out of rotation until promoted")
    parser.add_argument("--replica-kind", metavar="KIND", help="kind of the --replica servers: auto | unbroken | "
                        "vllm | sglang | tgi | llamacpp | openai (default: auto, asked of each server)")
    parser.add_argument("--redis-url", help="Redis for discovery and shared state")
    parser.add_argument("--workers", type=int, help="worker processes sharing the port (SO_REUSEPORT)")
    args = parser.parse_args(argv)
    path = args.config
    if path is None and Path("configs/gateway.yaml").is_file():
        path = "configs/gateway.yaml"
    try:
        config = load_gateway_config(path, {
            "server.port": args.port, "server.host": args.host, "replicas.urls": args.replica,
            "replicas.standby_urls": args.standby_replica,
            "replicas.kind": args.replica_kind,
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
