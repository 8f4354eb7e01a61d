"""The short chaos set: each scenario in configs/scenarios/ (but the long ``mixed`` one) under
Locust load on one real stack. Each asserts: zero failed requests (so every stream complete,
without a missing or repeated token, every answer equal to its greedy or seeded reference), every
multi-turn session kept its context, and every replica fault detected by the gateway within the
scenario's bound (crash 0.3 s, hang 1 s)."""

from __future__ import annotations

from pathlib import Path

import pytest

from loadtest.chaos import run_scenario, wait_all_healthy
from loadtest.scenarios import load_scenario
from unbroken.launcher import Stack

SCENARIO_DIR = Path(__file__).resolve().parents[2] / "configs" / "scenarios"
SHORT = ["kill_replica", "hang_replica", "slow_network", "blackhole_replica", "redis_loss", "gateway_restart",
         "kill_gateway"]


@pytest.mark.parametrize("name", SHORT)
def test_scenario_loses_nothing(name: str, chaos_stack: Stack, tmp_path: Path) -> None:
    scenario = load_scenario(SCENARIO_DIR / f"{name}.yaml")
    assert wait_all_healthy(chaos_stack, 90), "the stack did not recover from the previous scenario"
    result = run_scenario(chaos_stack, scenario, tmp_path / name)
    report = result.report_path.read_text()
    assert result.violations() == [], report
    assert result.summary.num_requests >= 20, report
    # The checks had something to check: sessions ran through the faults, streams were timed.
    assert any(f.contexts_total > 0 for f in result.summary.faults), report
    assert result.summary.steady_ttft_p99_s is not None, report
    if any(f.action == "kill_gateway" for f in scenario.faults):  # streams were cut and resumed
        kills = [f for f in result.faults if f["action"] == "kill_gateway"]
        assert all(f["params"].get("streams_running", 0) > 0 for f in kills), f"killed with no stream running: {kills}"
        assert result.summary.num_stream_resumes > 0, report
    for f in result.faults:
        if f["detected_expected"]:
            assert f["detection_s"] is not None and f["detection_s"] <= scenario.expect.max_detection_s + 0.1
