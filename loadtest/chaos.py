"""Run a chaos scenario: start a stack, put Locust load on its gateway, inject the scenario's faults
on time, then write the report.

    python -m loadtest.chaos --scenario configs/scenarios/kill_replica.yaml --duration-s 120 \\
        --report-dir runs/kill-replica

Locust runs as a child process (``locust -f loadtest/locustfile.py --headless``) with its CSV,
HTML and per-request events written to the report directory; the faults are injected from this
process, which owns the stack, so they can only reach the stack's own processes and loopback
ports. The exit status is 0 when no request failed and every fault was detected within the
scenario's bound.

:func:`run_scenario` is the same on an already running :class:`~unbroken.launcher.Stack`, for the
chaos tests.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shlex
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import orjson

from loadtest.faultproxy import start_fault_proxy
from loadtest.faults import FaultInjector, metrics_text
from loadtest.report import RunSummary, write_report
from loadtest.scenarios import Scenario, ScenarioRunner, gateway_replica_health, load_scenario
from unbroken.launcher import Stack, StackConfig, load_stack_config

REPO_ROOT = Path(__file__).resolve().parents[1]
DETECTION_POLL_SLACK_S = 0.1
"""Detection is measured by polling the gateway's admin view every 20 ms; a bound is judged with
this much slack for the poll itself."""
_COUNTER_WORDS = ("failover", "retr", "restor", "resum", "breaker", "eject", "fetch", "snapshot", "suspect",
                  "unhealthy", "shed")


def _is_interesting(metric: str) -> bool:
    """Counters about failover, retries, restores and health (matched per ``_``-separated word)."""
    return any(w.startswith(_COUNTER_WORDS) for w in metric.split("_"))


@dataclass
class ChaosResult:
    scenario: Scenario
    summary: RunSummary
    report_path: Path
    faults: list[dict[str, Any]]
    scenario_errors: list[str] = field(default_factory=list)
    locust_returncode: int | None = None
    locust_output: str = ""

    def violations(self) -> list[str]:
        """Every way this run broke the scenario's promises (empty = passed)."""
        out = list(self.scenario_errors)
        exp = self.scenario.expect
        if self.summary.num_failed > exp.max_failed_requests:
            kinds = ", ".join(f"{k}={v}" for k, v in self.summary.failures_by_kind.items())
            out.append(f"{self.summary.num_failed} failed requests ({kinds})")
        # a killed gateway's clients moving to another is that fault's expected answer, not a drop
        retries = self.summary.num_client_retries - self.summary.num_client_retries_gateway_lost
        if exp.max_client_retries is not None and retries > exp.max_client_retries:
            out.append(f"{retries} client connection retries outside gateway kills "
                       f"(bound {exp.max_client_retries}): the gateway dropped connections")
        if self.summary.num_requests == 0:
            out.append("no request completed: the load did not run")
        if exp.max_detection_s is not None:
            for f in self.faults:
                if f.get("detected_expected"):
                    d = f.get("detection_s")
                    if d is None:
                        out.append(f"{f['action']} {f['target']}: not detected by the gateway")
                    elif d > exp.max_detection_s + DETECTION_POLL_SLACK_S:
                        out.append(f"{f['action']} {f['target']}: detected after {d:.3f}s "
                                   f"(bound {exp.max_detection_s}s)")
        for f in self.summary.faults:
            if f.contexts_kept != f.contexts_total:
                out.append(f"{f.action} {f.target}: {f.contexts_total - f.contexts_kept} sessions lost context")
        return out


# -- metrics ---------------------------------------------------------------------------------------

def scrape_counters(url: str, timeout_s: float = 2.0, token: str = "") -> dict[str, float]:
    """Prometheus ``*_total`` series (name{labels} -> value) that count failovers, retries, restores.
    ``token``: the bearer token ``/metrics`` needs there (a replica's shared token)."""
    text = metrics_text(url, token, timeout_s)
    if text is None:
        return {}
    out: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        name, _, value = line.rpartition(" ")
        metric = name.split("{", 1)[0]
        if metric.endswith("_total") and _is_interesting(metric):
            try:
                out[name] = float(value)
            except ValueError:
                pass
    return out


def stack_counters(stack: Stack) -> dict[str, float]:
    counters = {f"gateway {k}": v for k, v in scrape_counters(stack.url, token=stack.admin_key).items()}
    for r in stack.replicas:
        if r.process.alive():
            scraped = scrape_counters(r.direct_url, token=stack.replica_token)
            counters.update({f"{r.replica_id} {k}": v for k, v in scraped.items()})
    return counters


def counter_increase(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    """Increase per series; a series that went down was reset by a restart, so its value counts."""
    out = {}
    for k, v in after.items():
        b = before.get(k, 0.0)
        d = v - b if v >= b else v
        if d > 0:
            out[k] = d
    return out


# -- the load --------------------------------------------------------------------------------------

def locust_command(scenario: Scenario, host: str, out_dir: Path, extra: list[str] | None = None) -> list[str]:
    load = scenario.load
    return [sys.executable, "-m", "locust", "-f", str(REPO_ROOT / "loadtest" / "locustfile.py"), "--headless",
            "-u", str(load.users), "-r", str(load.spawn_rate), "-t", f"{int(scenario.duration_s) + 600}s",
            "--load-duration-s", str(scenario.duration_s),
            "--host", host, "--csv", str(out_dir / "locust"), "--csv-full-history",
            "--html", str(out_dir / "locust.html"), "--events-file", str(out_dir / "events.jsonl"),
            "--references-file", str(out_dir / "references.json"), "--max-tokens", str(load.max_tokens),
            "--session-fraction", str(load.session_fraction), "--stream-fraction", str(load.stream_fraction),
            "--wait-s", str(load.wait_s), "--only-summary", "--stop-timeout", "60", *(extra or [])]


class _LocustProcess:
    """Locust as a child; ``references_ready`` is set when it printed that the references are made."""

    def __init__(self, cmd: list[str], log_path: Path, api_key: str = "") -> None:
        self.references_ready = threading.Event()
        self.log_path = log_path
        self.lines: list[str] = []
        env = dict(os.environ)
        if api_key:  # by environment, never on Locust's command line
            env["UNBROKEN_LOADTEST_API_KEY"] = api_key
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     cwd=REPO_ROOT, start_new_session=True, env=env)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        with open(self.log_path, "w") as log:
            for line in self.proc.stdout:
                log.write(line)
                log.flush()
                self.lines.append(line)
                if "references ready" in line:
                    self.references_ready.set()

    def wait(self, timeout_s: float) -> int:
        try:
            return self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.stop()
            return self.proc.wait(timeout=10)
        finally:
            self._reader.join(timeout=5)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()

    @property
    def output_tail(self) -> str:
        return "".join(self.lines[-40:])


def wait_all_healthy(stack: Stack, timeout_s: float = 60.0) -> bool:
    """Every replica answers /health and the gateway routes to all of them again."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if stack.all_healthy():
            health = gateway_replica_health(stack.url, admin_key=stack.admin_key)
            if health is None or (health and all(health.values())):
                return True
        time.sleep(0.2)
    return False


class StackNotHealthy(RuntimeError):
    pass


@contextlib.contextmanager
def running_stack(config: StackConfig, run_dir: str | Path, *, healthy_timeout_s: float = 60.0,
                  progress=print) -> Iterator[Stack]:  # type: ignore[no-untyped-def]
    """A started stack whose every part answers healthy; stopped (by pid) on the way out."""
    stack = Stack(config, run_dir=run_dir, progress=progress, proxy_factory=start_fault_proxy)
    try:
        stack.start()
        if not wait_all_healthy(stack, healthy_timeout_s):
            raise StackNotHealthy("the stack did not become healthy")
        yield stack
    finally:
        stack.stop()


def run_scenario(stack: Stack, scenario: Scenario, report_dir: str | Path, *, command: str = "",
                 reference_timeout_s: float = 120.0) -> ChaosResult:
    """Play ``scenario`` under Locust load on a running ``stack``; write the report into ``report_dir``."""
    out = Path(report_dir)
    out.mkdir(parents=True, exist_ok=True)
    for name in ("events.jsonl",):
        (out / name).unlink(missing_ok=True)
    injector = FaultInjector(stack)
    counters_before = stack_counters(stack)
    fallbacks = ["--fallback-hosts", ",".join(stack.urls[1:])] if len(stack.urls) > 1 else []
    locust = _LocustProcess(locust_command(scenario, stack.url, out, fallbacks), out / "locust.log",
                            api_key=stack.api_key)
    errors: list[str] = []
    runner: ScenarioRunner | None = None
    rc: int | None = None
    t0 = time.time()
    try:
        if not locust.references_ready.wait(reference_timeout_s):
            errors.append(f"Locust did not make its reference answers:\n{locust.output_tail}")
            locust.stop()
        else:
            t0 = time.time()
            runner = ScenarioRunner(scenario, injector, gateway_url=stack.url).start(t0)
        rc = locust.wait(scenario.duration_s + 120)
    finally:
        locust.stop()
        if runner is not None:
            runner.stop()
            errors += runner.errors
        else:
            injector.heal()
    counters = counter_increase(counters_before, stack_counters(stack))
    detected_steps = {id(rec) for step, rec in (runner.step_records if runner else []) if step.detected}
    faults = []
    for rec in injector.records:
        d = rec.to_dict()
        d["detected_expected"] = id(rec) in detected_steps
        faults.append(d)
    (out / "faults.json").write_bytes(orjson.dumps(faults, option=orjson.OPT_INDENT_2))
    from loadtest.report import load_events

    records = load_events(out / "events.jsonl")
    notes = [f"Scenario file: `{scenario.name}`; {scenario.load.users} Locust users, "
             f"max_tokens={scenario.load.max_tokens}, ignore_eos; every answer compared with its reference.",
             f"Detection: time from injection until the gateway's `/admin/replicas` shows the replica out of "
             f"rotation (polled every 20 ms); bound {scenario.expect.max_detection_s} s.",
             f"Locust exit status {rc}; CSV and HTML in this directory (`locust_stats.csv`, `locust.html`)."]
    notes += [f"Scenario error: {e}" for e in errors]
    path, summary = write_report(out, records, faults, title=f"Chaos run: {scenario.name}", t0_s=t0,
                                 warmup_s=scenario.warmup_s, command=command, description=scenario.description,
                                 counters=counters, notes=notes)
    return ChaosResult(scenario=scenario, summary=summary, report_path=path, faults=faults,
                       scenario_errors=errors, locust_returncode=rc, locust_output=locust.output_tail)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtest.chaos", description=__doc__.split("\n\n")[0])
    parser.add_argument("--scenario", required=True, help="configs/scenarios/NAME.yaml")
    parser.add_argument("--duration-s", type=float, help="stretch the scenario to this many seconds")
    parser.add_argument("--report-dir", help="where the report goes (default: runs/chaos-NAME-TIME)")
    parser.add_argument("--stack-config", help="stack YAML (default: configs/stack.yaml)")
    parser.add_argument("--replicas", type=int, help="replicas to start")
    parser.add_argument("--model", help="checkpoint directory")
    parser.add_argument("--users", type=int, help="override the scenario's Locust users")
    argv_list = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv_list)
    scenario = load_scenario(args.scenario).scaled(args.duration_s)
    if args.users:
        scenario = scenario.model_copy(update={"load": scenario.load.model_copy(update={"users": args.users})})
    report_dir = Path(args.report_dir or f"runs/chaos-{scenario.name}-{time.strftime('%Y%m%d-%H%M%S')}")
    config = load_stack_config(args.stack_config, {
        "replicas.count": args.replicas, "replicas.model_path": args.model, "gateway.port": 0,
        "fault_proxy.enabled": True if scenario.needs_fault_proxy else None,
        "gateway.count": scenario.num_gateways if scenario.num_gateways > 1 else None,
    })
    command = "python -m loadtest.chaos " + " ".join(shlex.quote(a) for a in argv_list)
    print(f"chaos: {scenario.name} for {scenario.duration_s:.0f}s; logs in {report_dir}", flush=True)
    try:
        with running_stack(config, report_dir / "stack") as stack:
            result = run_scenario(stack, scenario, report_dir, command=command)
    except StackNotHealthy as e:
        print(f"chaos: {e}", file=sys.stderr)
        return 1
    from loadtest.report import summary_table

    print(summary_table(result.summary))
    problems = result.violations()
    for p in problems:
        print(f"VIOLATION: {p}")
    print(f"report: {result.report_path}")
    return 0 if not problems else 1


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
