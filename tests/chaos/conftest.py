"""One real stack for the chaos suite: Redis, two replicas of the tiny model with their kvsync
sidecars, a fault proxy in front of each replica, and two gateways (the load uses the first and
moves to the second when it is lost). Ended by pid at the end."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import pytest

from loadtest.chaos import running_stack
from unbroken.launcher import Stack, StackConfig


@pytest.fixture(scope="session")
def chaos_stack(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    config = StackConfig.model_validate({
        "replicas": {"count": 2, "model_path": str(tiny_model_dir), "ready_timeout_s": 240},
        "gateway": {"port": 0, "count": 2},
        "fault_proxy": {"enabled": True},
        "run": {"stop_timeout_s": 10},
    })
    with running_stack(config, tmp_path_factory.mktemp("chaos-stack"), progress=lambda *_: None) as stack:
        yield stack
