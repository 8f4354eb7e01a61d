"""Scenario files parse and validate; the runner applies and heals faults on time; the injector
refuses anything the stack did not start."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from loadtest.faultproxy import FaultSafetyError
from loadtest.faults import FaultInjector
from loadtest.scenarios import (
    FaultStep,
    Scenario,
    ScenarioRunner,
    load_scenario,
    replica_healthy,
)
from unbroken.config import ConfigError
from unbroken.launcher import Stack, StackConfig
from unbroken.procs import ManagedProcess, start_redis, wait_for_port

SCENARIOS = sorted((Path(__file__).resolve().parents[3] / "configs" / "scenarios").glob("*.yaml"))


@pytest.mark.parametrize("path", SCENARIOS, ids=[p.stem for p in SCENARIOS])
def test_every_scenario_file_is_valid(path: Path) -> None:
    s = load_scenario(path)
    assert s.name == path.stem and s.faults
    assert all(f.at_s < s.duration_s for f in s.faults)


def test_the_short_chaos_set_fits_its_time_budget() -> None:
    short = [load_scenario(p) for p in SCENARIOS if p.stem != "mixed"]
    assert sum(s.duration_s for s in short) <= 180


@pytest.mark.parametrize("data, field", [
    ({"name": "x", "faults": [{"at_s": 1, "action": "explode"}]}, "action"),
    ({"name": "x", "duration_s": 5, "faults": [{"at_s": 9, "action": "kill_replica"}]}, "at_s"),
    ({"name": "x", "faults": [{"at_s": 1, "action": "proxy_fault", "proxy": {"latency_ms": 5}}]}, "needs_fault_proxy"),
    ({"name": "x", "needs_fault_proxy": True,
      "faults": [{"at_s": 1, "action": "proxy_fault", "proxy": {"latency": 5}}]}, "latency"),
    ({"name": "x", "faults": [{"at_s": 1, "action": "kill_replica", "bogus": 1}]}, "bogus"),
])
def test_bad_scenarios_fail_naming_the_field(tmp_path: Path, data: dict, field: str) -> None:
    import yaml

    p = tmp_path / "bad.yaml"
    p.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError) as e:
        load_scenario(p)
    assert field in str(e.value)


def test_scaling_stretches_every_time() -> None:
    s = Scenario(name="x", duration_s=20, faults=[FaultStep(action="kill_replica", at_s=5, duration_s=4)])
    long = s.scaled(100)
    assert long.duration_s == 100 and long.faults[0].at_s == 25 and long.faults[0].duration_s == 20
    assert s.scaled(None) is s


def test_replica_health_reading_is_tolerant() -> None:
    assert replica_healthy({"healthy": False}) is False
    assert replica_healthy({"state": "UNHEALTHY".lower()}) is False
    assert replica_healthy({"breaker": "open"}) is False
    assert replica_healthy({"state": "healthy", "breaker": "closed"}) is True


@pytest.fixture
def redis_stack(tmp_path: Path):
    """A Stack that owns only a Redis (enough for the injector's safety rules)."""
    stack = Stack(StackConfig(), run_dir=tmp_path, progress=lambda *_: None)
    stack.redis, stack.redis_url = start_redis(log_path=tmp_path / "redis.log")
    stack.redis_port = int(stack.redis_url.rsplit(":", 1)[1].split("/")[0])
    try:
        yield stack
    finally:
        stack.stop()


def test_injector_kills_and_restarts_its_own_redis(redis_stack: Stack) -> None:
    inj = FaultInjector(redis_stack)
    old_pid = redis_stack.redis.pid
    rec = inj.kill_redis()
    assert not redis_stack.redis.alive() and rec.ended_at_s is None
    inj.restart_redis()
    assert redis_stack.redis.alive() and redis_stack.redis.pid != old_pid
    assert wait_for_port("127.0.0.1", redis_stack.redis_port, 5)
    assert rec.ended_at_s is not None and inj.active() == []


def test_injector_refuses_processes_the_stack_did_not_start(redis_stack: Stack, tmp_path: Path) -> None:
    inj = FaultInjector(redis_stack)
    stranger = ManagedProcess("stranger", [sys.executable, "-c", "import time; time.sleep(30)"]).start()
    try:
        with pytest.raises(FaultSafetyError):
            inj._check_owned(stranger, "stranger")
        with pytest.raises(FaultSafetyError):
            inj._signal(stranger, signal.SIGSTOP, "stranger")
        assert stranger.alive()
        # A stack pid that is not our child (e.g. swapped under us) is refused too.
        foreign = subprocess.Popen(["sleep", "30"])
        try:
            redis_stack.redis.proc.pid  # the real one stays ours
            fake = ManagedProcess("redis", ["true"])
            fake.proc = foreign
            redis_stack.redis, real = fake, redis_stack.redis
            try:
                inj._check_owned(fake, "redis")  # a direct child: accepted
            finally:
                redis_stack.redis = real
            with pytest.raises(FaultSafetyError):
                inj._check_owned(fake, "redis")  # no longer the stack's
        finally:
            foreign.kill()
            foreign.wait()
        with pytest.raises(KeyError):
            inj.kill_replica("r9")
    finally:
        stranger.stop()


class _RecordingInjector(FaultInjector):
    def __init__(self) -> None:
        super().__init__(Stack(StackConfig()))
        self.calls: list[tuple[float, str, str]] = []

    def kill_replica(self, which):  # type: ignore[override]
        self.calls.append((time.monotonic(), "kill", which))
        return self._begin("kill_replica", which)

    def restart_replica(self, which, wait=True):  # type: ignore[override]
        self.calls.append((time.monotonic(), "restart", which))
        self._end("kill_replica", which)

    def heal_kill(self, which, wait=True):  # type: ignore[override]
        self.restart_replica(which, wait)

    def heal(self, wait=True):  # type: ignore[override]
        self.calls.append((time.monotonic(), "heal", ""))


def test_runner_applies_and_heals_on_time() -> None:
    s = Scenario(name="x", duration_s=2, faults=[FaultStep(action="kill_replica", at_s=0.2, target="r1",
                                                           duration_s=0.4)])
    inj = _RecordingInjector()
    t0 = time.monotonic()
    runner = ScenarioRunner(s, inj).start()
    runner.join(5)
    runner.stop()
    assert runner.errors == []
    (t_kill, a, ta), (t_restart, b, tb), (_, c, _) = inj.calls
    assert (a, ta, b, tb, c) == ("kill", "r1", "restart", "r1", "heal")
    assert 0.15 <= t_kill - t0 <= 0.4 and 0.35 <= t_restart - t_kill <= 0.6
    assert inj.records[0].ended_at_s is not None
