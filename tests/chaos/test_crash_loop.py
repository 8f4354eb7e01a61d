"""crash_loop under load on a stack with one replica in rotation and one warm standby: the replica's
checkpoint disappears and it is killed; every restart dies at start, the supervisor reports a crash
loop and leaves it down, the standby was promoted at once (time to full capacity within a couple of
seconds of the kill), and no request fails."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import pytest

from loadtest.chaos import run_scenario, running_stack
from loadtest.scenarios import load_scenario
from unbroken.launcher import Stack, StackConfig

SCENARIO = Path(__file__).resolve().parents[2] / "configs" / "scenarios" / "crash_loop.yaml"


@pytest.fixture
def standby_stack(tiny_model_dir: Path, tmp_path: Path) -> Iterator[Stack]:
    config = StackConfig.model_validate({
        "replicas": {"count": 1, "standby": 1, "model_path": str(tiny_model_dir), "ready_timeout_s": 240},
        "gateway": {"port": 0},
        # Two failures (the kill, then the first restart dying at start) make a crash loop here.
        "supervisor": {"crash_loop_failures": 2, "backoff_initial_s": 0.1},
        "run": {"stop_timeout_s": 10},
    })
    with running_stack(config, tmp_path / "stack", progress=lambda *_: None) as stack:
        yield stack


def test_crash_loop_is_left_down_and_the_standby_keeps_capacity(standby_stack: Stack, tmp_path: Path) -> None:
    scenario = load_scenario(SCENARIO)
    result = run_scenario(standby_stack, scenario, tmp_path / "crash_loop")
    report = result.report_path.read_text()
    assert result.violations() == [], report
    assert result.summary.num_requests >= 20, report
    (fault,) = result.faults
    print(f"detection {fault['detection_s']}s, time to full capacity {fault['mttr_s']}s")
    assert fault["detection_s"] is not None and fault["detection_s"] <= 0.4, report
    assert fault["mttr_s"] is not None and fault["mttr_s"] <= 3.0, report
    assert "time to full capacity" in report
    sup = standby_stack.supervisor
    assert sup is not None
    kinds = [(e.program, e.kind) for e in sup.events]
    assert ("r0", "crash_loop") in kinds and ("r0", "reset") in kinds, kinds
