"""``python -m kvsync`` / ``unbroken kvsync``: run one kvsync sidecar."""

from __future__ import annotations

import argparse
import logging
import sys
import urllib.parse

import torch
from aiohttp import web

from kvsync.config import KVSyncConfig
from kvsync.server import create_app
from unbroken.access import check_exposure, is_loopback
from unbroken.config import ConfigError, load_config
from unbroken.credentials import redact_url

ENV_PREFIX = "UNBROKEN_KVSYNC"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kvsync", description="Replicate a replica's session KV caches and transcripts through Redis.")
    parser.add_argument("--config", help="YAML config file (see configs/kvsync.yaml)")
    parser.add_argument("--port", type=int, help="TCP port to listen on (overrides server.port)")
    parser.add_argument("--host", help="address to listen on (overrides server.host)")
    parser.add_argument("--redis-url", help="Redis URL (overrides redis.url)")
    parser.add_argument("--log-level", default="INFO", help="logging level (default INFO)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        config = load_config(KVSyncConfig, args.config, env_prefix=ENV_PREFIX, overrides={
            "server.port": args.port, "server.host": args.host, "redis.url": args.redis_url})
        check_exposure("kvsync", config.server.host, config.auth.token, config.auth.allow_insecure,
                       token_field="auth.token", allow_field="auth.allow_insecure")
        redis_host = urllib.parse.urlsplit(config.redis.url).hostname or "127.0.0.1"
        if not config.auth.mac_secret and not config.auth.allow_insecure and not is_loopback(redis_host):
            raise ConfigError(
                f"kvsync: refusing to use the Redis at {redis_host!r} (not loopback) without auth.mac_secret: "
                "anyone who can write to it could forge KV; set auth.mac_secret (or its environment "
                "variable), or auth.allow_insecure = true")
    except ConfigError as e:
        print(f"kvsync: {e}", file=sys.stderr)
        return 2
    if not config.auth.mac_secret:
        logging.getLogger(__name__).warning(
            "kvsync: auth.mac_secret is empty: KV in Redis is checked for accidents, not for forgery")
    # The sidecar's tensor work is memory copies on worker threads; torch's intra-op thread pool
    # only adds contention with the replica beside it.
    torch.set_num_threads(1)
    try:
        import uvloop

        uvloop.install()
    except ImportError:  # pragma: no cover
        pass
    logging.getLogger(__name__).info("kvsync listening on %s:%d, Redis %s", config.server.host,
                                     config.server.port, redact_url(config.redis.url))
    web.run_app(create_app(config), host=config.server.host, port=config.server.port, print=None,
                access_log=None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
