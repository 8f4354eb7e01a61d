"""The supervisor's policy (pure, with a hand-driven clock) and its runner on real processes."""

import sys
import time

from unbroken.supervisor.policy import Decision, Observation, ProgramPolicy, ProgramState, SupervisorSection
from unbroken.supervisor.runner import CommandTarget, Supervisor
from unbroken.supervisor.standalone import SuperviseConfig

DEAD = Observation(alive=False, healthy=False)
UP = Observation(alive=True, healthy=True)
HUNG = Observation(alive=True, healthy=False)


def test_exit_is_restarted_after_a_growing_backoff_and_a_crash_loop_is_left_down() -> None:
    cfg = SupervisorSection(backoff_initial_s=1.0, backoff_multiplier=2.0, backoff_max_s=3.0,
                            crash_loop_failures=4, crash_loop_window_s=100.0)
    p = ProgramPolicy(cfg)
    p.started(0.0)
    assert p.observe(1.0, UP) is Decision.NONE and p.state is ProgramState.RUNNING
    assert p.observe(2.0, DEAD) is Decision.FAILED and p.state is ProgramState.BACKOFF
    assert p.observe(2.5, DEAD) is Decision.NONE  # waits 1 s
    assert p.observe(3.0, DEAD) is Decision.RESTART
    p.started(3.0)
    assert p.observe(3.1, DEAD) is Decision.FAILED
    assert p.restart_at_s == 3.1 + 2.0
    assert p.observe(5.1, DEAD) is Decision.RESTART
    p.started(5.1)
    assert p.observe(5.2, DEAD) is Decision.FAILED
    assert p.restart_at_s == 5.2 + 3.0  # capped at backoff_max_s
    assert p.observe(8.2, DEAD) is Decision.RESTART
    p.started(8.2)
    assert p.observe(8.3, DEAD) is Decision.GIVE_UP and p.state is ProgramState.CRASH_LOOP
    assert p.observe(500.0, DEAD) is Decision.NONE  # left down
    p.reset(600.0)
    assert p.observe(600.0, DEAD) is Decision.RESTART and not p.failures_s


def test_failures_outside_the_window_do_not_make_a_crash_loop() -> None:
    p = ProgramPolicy(SupervisorSection(backoff_initial_s=0.0, crash_loop_failures=2, crash_loop_window_s=10.0))
    p.started(0.0)
    assert p.observe(1.0, DEAD) is Decision.FAILED
    assert p.observe(1.0, DEAD) is Decision.RESTART
    p.started(1.0)
    assert p.observe(20.0, DEAD) is Decision.FAILED  # the first failure has left the window


def test_hung_or_never_ready_programs_are_killed() -> None:
    cfg = SupervisorSection(start_timeout_s=5.0, unhealthy_after_s=2.0, backoff_initial_s=0.5)
    p = ProgramPolicy(cfg)
    p.started(0.0)
    assert p.observe(4.0, HUNG) is Decision.NONE  # still loading
    assert p.observe(5.5, HUNG) is Decision.KILL and p.last_failure == "not ready in time"
    assert p.observe(6.0, DEAD) is Decision.RESTART
    p.started(6.0)
    assert p.observe(7.0, UP) is Decision.NONE
    assert p.observe(8.5, HUNG) is Decision.NONE  # a moment unhealthy is tolerated
    assert p.observe(9.5, HUNG) is Decision.KILL and p.last_failure == "unhealthy"


def _wait(cond, timeout_s: float = 20.0) -> bool:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.02)
    return False


def test_runner_restarts_a_killed_process_and_gives_up_on_one_that_dies_at_start(tmp_path) -> None:
    cfg = SupervisorSection(check_interval_ms=20, backoff_initial_s=0.05, crash_loop_failures=3,
                            crash_loop_window_s=60.0)
    sleeper = CommandTarget("sleeper", [sys.executable, "-c", "import time; time.sleep(60)"])
    crasher = CommandTarget("crasher", [sys.executable, "-c", "import sys; sys.exit(3)"])
    sleeper.start()
    crasher.start()
    sup = Supervisor(cfg, [sleeper, crasher]).start()
    try:
        first_pid = sleeper.process.pid
        sleeper.kill()
        assert _wait(lambda: sleeper.alive() and sleeper.process.pid != first_pid)
        assert _wait(lambda: sup.policies["crasher"].state is ProgramState.CRASH_LOOP)
        kinds = [(e.program, e.kind) for e in sup.events]
        assert ("sleeper", "restarted") in kinds and ("crasher", "crash_loop") in kinds
        text = sup.metrics.render().decode()
        assert 'unbroken_supervisor_restarts_total{program="sleeper"} 1.0' in text
        assert 'unbroken_supervisor_starts_total{program="sleeper",via="plain"} 1.0' in text
        assert 'unbroken_supervisor_crash_loops_total{program="crasher"} 1.0' in text
        assert 'unbroken_supervisor_program_state{program="crasher",state="crash_loop"} 1.0' in text
        assert {r["program"]: r["state"] for r in sup.status()}["crasher"] == "crash_loop"
    finally:
        sup.stop()
        sleeper.stop(5)
        crasher.stop(5)


def test_supervise_config_rejects_duplicate_names() -> None:
    import pytest
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="unique"):
        SuperviseConfig(programs=[{"name": "a", "command": ["x"]}, {"name": "a", "command": ["y"]}])


def test_unbroken_supervise_restarts_a_killed_program_and_stops_everything_on_sigterm(tmp_path) -> None:
    import json
    import os
    import signal
    import subprocess

    pids = tmp_path / "pids"
    status = tmp_path / "status.json"
    child = f"import os, time; open({str(pids)!r}, 'a').write(f'{{os.getpid()}}\\n'); time.sleep(120)"
    (tmp_path / "sup.yaml").write_text(json.dumps({
        "supervisor": {"check_interval_ms": 50, "backoff_initial_s": 0.05},
        "status_path": str(status),
        "programs": [{"name": "worker", "command": [sys.executable, "-c", child]}],
    }))
    sup = subprocess.Popen([sys.executable, "-m", "unbroken.cli", "supervise", "--config", str(tmp_path / "sup.yaml")],
                           start_new_session=True)
    try:
        assert _wait(lambda: pids.exists() and len(pids.read_text().split()) == 1, 60)
        first = int(pids.read_text().split()[0])
        os.kill(first, signal.SIGKILL)
        assert _wait(lambda: len(pids.read_text().split()) == 2, 60), "not restarted"
        second = int(pids.read_text().split()[1])
        assert _wait(lambda: status.exists() and json.loads(status.read_text() or "[]")
                     and json.loads(status.read_text())[0]["restarts"] == 1, 30)
        sup.send_signal(signal.SIGTERM)
        assert sup.wait(timeout=30) == 0
        assert _wait(lambda: not os.path.exists(f"/proc/{second}") or
                     open(f"/proc/{second}/stat").read().split()[2] == "Z", 10), "the program outlived its supervisor"
    finally:
        if sup.poll() is None:
            sup.kill()
            sup.wait(timeout=10)


def test_a_zygote_that_refused_says_so_in_the_status() -> None:
    """A zygote that refused to fork (status 3) stays down on purpose and counts as alive: the
    status row says why instead of a bare 'running'."""
    from types import SimpleNamespace

    from unbroken.supervisor.stack import ZygoteTarget

    stack = SimpleNamespace(zygote=SimpleNamespace(alive=lambda: False), zygote_refused=True)
    sup = Supervisor(SupervisorSection(), [ZygoteTarget(stack)])  # type: ignore[arg-type]
    row = sup.status()[0]
    assert row["program"] == "zygote" and "refused" in row["note"]
    stack.zygote_refused = False
    stack.zygote = SimpleNamespace(alive=lambda: True)
    assert sup.status()[0]["note"] is None
