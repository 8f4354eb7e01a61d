"""The chaos runner's pure parts: counter deltas, the Locust command, the verdict."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from loadtest.chaos import ChaosResult, counter_increase, locust_command
from loadtest.report import FaultSummary, RunSummary
from loadtest.scenarios import FaultStep, Scenario


def test_counter_increase_survives_restarts() -> None:
    before = {"a_total": 5.0, "b_total": 2.0}
    after = {"a_total": 7.0, "b_total": 1.0, "c_total": 3.0}  # b restarted from 0
    assert counter_increase(before, after) == {"a_total": 2.0, "b_total": 1.0, "c_total": 3.0}


def test_locust_command_carries_the_scenario_load() -> None:
    s = Scenario(name="x", duration_s=20)
    cmd = locust_command(s, "http://127.0.0.1:9", Path("/tmp/r"))
    joined = " ".join(cmd)
    assert "--headless" in cmd and "--host http://127.0.0.1:9" in joined
    assert "--load-duration-s 20.0" in joined and f"-u {s.load.users}" in joined


def _result(num_failed: int = 0, detection_s: float | None = 0.1, kept: int = 2) -> ChaosResult:
    scenario = Scenario(name="x", duration_s=20, faults=[FaultStep(action="kill_replica", at_s=5)],
                        expect={"max_detection_s": 0.3})
    summary = RunSummary(t0_s=0, duration_s=20, num_requests=10, num_failed=num_failed,
                         failures_by_kind=Counter({"http_502": num_failed} if num_failed else {}),
                         steady_p50_s=0.1, steady_p99_s=0.2, steady_ttft_p99_s=0.05, num_failovers=1,
                         num_retries=0, num_client_retries=0,
                         faults=[FaultSummary("kill_replica", "r0", 5, (5, 10), detection_s, 4, num_failed, 0,
                                              kept, 2, 0.3, 1)])
    faults = [{"action": "kill_replica", "target": "r0", "detection_s": detection_s, "detected_expected": True}]
    return ChaosResult(scenario=scenario, summary=summary, report_path=Path("r.md"), faults=faults)


def test_verdict() -> None:
    assert _result().violations() == []
    assert "1 failed requests (http_502=1)" in _result(num_failed=1).violations()
    assert any("not detected" in v for v in _result(detection_s=None).violations())
    assert any("detected after 0.900s" in v for v in _result(detection_s=0.9).violations())
    assert any("lost context" in v for v in _result(kept=1).violations())
