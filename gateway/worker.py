"""One gateway worker process (``python -m gateway`` runs one inline, or several with SO_REUSEPORT)."""

from __future__ import annotations

import gc
import logging
import os
import threading
from typing import Any

from aiohttp import web

from gateway.config import GatewayConfig


def _install_uvloop() -> None:
    try:
        import uvloop

        uvloop.install()
    except ImportError:  # pragma: no cover - uvloop is a dependency where it exists
        pass


# Past the streams' grace (server.shutdown_timeout_s), how long the teardown may take (stopping
# background tasks, closing Redis) before the worker exits anyway: a gateway asked to stop stops.
_TEARDOWN_GRACE_S = 10.0


def _exit_watchdog(limit_s: float):  # type: ignore[no-untyped-def]
    async def arm(_app: web.Application) -> None:
        def expire() -> None:
            logging.getLogger("gateway").error("shutdown did not finish within %.0f s: exiting now", limit_s)
            logging.shutdown()
            os._exit(1)

        timer = threading.Timer(limit_s, expire)
        timer.daemon = True
        timer.start()

    return arm


async def _freeze_startup_objects(_app: web.Application) -> None:
    """What start-up made (modules, the config, the app) lives as long as the process: moved out of
    the garbage collector's reach, so its full collections scan only what serving makes (each of
    them scanned ~66k start-up objects: ~5% of the gateway's CPU under a load of short streams)."""
    gc.collect()
    gc.freeze()


def run_worker(config_data: dict[str, Any], num_workers: int, index: int) -> None:
    """One worker process: build the app and serve until SIGTERM/SIGINT."""
    logging.basicConfig(level=os.environ.get("UNBROKEN_LOG_LEVEL", "INFO"),
                        format=f"%(asctime)s gateway[{index}] %(levelname)s %(name)s: %(message)s")
    _install_uvloop()
    from gateway.server import build_app

    config = GatewayConfig.model_validate(config_data)
    app = build_app(config, num_workers=num_workers)
    app.on_startup.append(_freeze_startup_objects)  # after the app's own start-up (cleanup contexts)
    app.on_shutdown.append(_exit_watchdog(config.server.shutdown_timeout_s + _TEARDOWN_GRACE_S))
    web.run_app(app, host=config.server.host, port=config.server.port, reuse_port=num_workers > 1,
                access_log=None, print=None, shutdown_timeout=config.server.shutdown_timeout_s,
                handle_signals=True)
