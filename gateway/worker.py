"""One gateway worker process (``python -m gateway`` runs one inline, or several with SO_REUSEPORT)."""

from __future__ import annotations

import logging
import os
from typing import Any

from aiohttp import web

from gateway.config import GatewayConfig


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
