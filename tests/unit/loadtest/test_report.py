"""The report from synthetic records: the summary's numbers, the table, the plots."""

from __future__ import annotations

from pathlib import Path

import orjson

from loadtest.report import main, percentile, summarize, summary_table, write_report

T0 = 1_000_000.0


def _rec(t: float, latency: float, ok: bool = True, kind: str = "single", failure_kind: str = "",
         session_id: str = "", ttft: float | None = 0.05, failovers: int = 0) -> dict:
    return {"t_start_s": T0 + t, "t_end_s": T0 + t + latency, "kind": kind, "name": kind, "stream": True,
            "priority": "normal", "ok": ok, "failure_kind": failure_kind, "failure": "", "status": 200,
            "latency_s": latency, "ttft_s": ttft, "itl_s": 0.01, "num_tokens": 8, "retries": 0,
            "failovers": failovers, "client_retries": 0, "replica_id": "r0", "session_id": session_id,
            "turn": 0, "cached_tokens": 0, "request_id": ""}


def _run():
    records = [_rec(t * 0.5, 0.2) for t in range(20)]  # steady: 0..10 s
    records += [_rec(10.5, 1.5, failovers=1), _rec(11, 0.3, kind="session", session_id="a"),
                _rec(11.5, 0.3, kind="session", session_id="a"),
                _rec(12, 0.4, ok=False, kind="session", session_id="b", failure_kind="context_lost"),
                _rec(13, 0.2, ok=False, failure_kind="tokens_repeated")]
    records += [_rec(20 + t * 0.5, 0.2) for t in range(10)]
    faults = [{"action": "kill_replica", "target": "r0", "started_at_s": T0 + 10.4, "ended_at_s": T0 + 14,
               "detected_at_s": T0 + 10.5, "detection_s": 0.1, "mttr_s": 3.25, "params": {}}]
    return records, faults


def test_percentile() -> None:
    assert percentile([], 50) is None
    assert percentile([3, 1, 2], 50) == 2
    assert percentile(list(range(1, 101)), 99) == 99


def test_summary_counts_what_happened_in_the_fault_window() -> None:
    records, faults = _run()
    run = summarize(records, faults, t0_s=T0, warmup_s=1.0)
    assert run.num_requests == 35 and run.num_failed == 2
    assert run.failures_by_kind == {"context_lost": 1, "tokens_repeated": 1}
    (f,) = run.faults
    assert f.detection_s == 0.1 and f.num_requests == 5 and f.num_lost == 2 and f.num_token_faults == 1
    assert (f.contexts_kept, f.contexts_total) == (1, 2)
    assert f.p99_during_s == 1.5 and run.steady_p99_s == 0.2
    assert run.num_failovers == 1
    table = summary_table(run)
    assert f.mttr_s == 3.25
    assert "| kill_replica r0 | 10.4 | 0.100 | 3.25 | 5 | 2 | 1 | 1/2 | 1 | 1.50 | 0.20 |" in table


def test_report_files(tmp_path: Path) -> None:
    records, faults = _run()
    path, run = write_report(tmp_path, records, faults, title="t", t0_s=T0, command="python -m x",
                             counters={"unbroken_gateway_failovers_total": 3})
    md = path.read_text()
    assert "FAIL: 2 failed request(s)" in md and "python -m x" in md and "unbroken_gateway_failovers_total" in md
    for png in ("throughput.png", "latency.png", "ttft.png", "failures.png"):
        assert (tmp_path / png).read_bytes()[:4] == b"\x89PNG" and f"({png})" in md
    assert orjson.loads((tmp_path / "summary.json").read_bytes())["num_failed"] == 2


def test_cli_exit_status_follows_the_verdict(tmp_path: Path) -> None:
    records, faults = _run()
    events = tmp_path / "events.jsonl"
    events.write_bytes(b"\n".join(orjson.dumps(r) for r in records if r["ok"]) + b"\n")
    (tmp_path / "faults.json").write_bytes(orjson.dumps(faults))
    assert main(["--events", str(events), "--faults", str(tmp_path / "faults.json"), "--out", str(tmp_path / "r")]) == 0
    assert "PASS" in (tmp_path / "r" / "report.md").read_text()
    events.write_bytes(b"\n".join(orjson.dumps(r) for r in records) + b"\n")
    assert main(["--events", str(events), "--out", str(tmp_path / "r2")]) == 1


def test_client_retries_while_a_gateway_was_killed_are_counted_apart() -> None:
    records, faults = _run()
    r_kill, r_other = _rec(30.2, 1.0), _rec(5.0, 0.2)  # one inside the gateway kill's window, one before
    r_kill["client_retries"], r_other["client_retries"] = 3, 1
    faults.append({"action": "kill_gateway", "target": "gateway", "started_at_s": T0 + 30, "ended_at_s": T0 + 31,
                   "detected_at_s": None, "detection_s": None, "mttr_s": None, "params": {}})
    run = summarize(records + [r_kill, r_other], faults, t0_s=T0, warmup_s=1.0)
    assert (run.num_client_retries, run.num_client_retries_gateway_lost) == (4, 3)
