"""Stopping background tasks that may not want to stop.

A background loop that waits with a timeout can swallow the cancel meant to stop it: on Python
3.11.2 (Debian 12's) redis-py waits with the ``async_timeout`` package, and a cancel that lands as
such a timeout expires comes out as a timeout, which the loop treats as "nothing yet" and goes on.
``await task`` after ``task.cancel()`` then waits for ever, and a process asked to stop never does.
``stop_tasks`` cancels again until the task ends or a deadline passes: a swallowed cancel is
followed by another at the loop's next wait.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable

log = logging.getLogger(__name__)


async def stop_tasks(tasks: Iterable[asyncio.Task[object]], timeout_s: float = 5.0, what: str = "task") -> bool:
    """Cancel ``tasks`` and wait for them, cancelling again every 0.1 s until each ends or
    ``timeout_s`` passes. Their results and errors are dropped. True when every task ended."""
    tasks = list(tasks)
    pending = {t for t in tasks if not t.done()}
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while pending:
        for t in pending:
            t.cancel()
        left = deadline - loop.time()
        if left <= 0:
            break
        _, pending = await asyncio.wait(pending, timeout=min(0.1, left))
    for t in tasks:
        if t.done() and not t.cancelled():
            t.exception()  # retrieved: no "exception was never retrieved" at exit
    if pending:
        log.warning("%s did not stop within %.1f s: %s", what, timeout_s,
                    ", ".join(sorted(t.get_name() for t in pending)))
        return False
    return True
