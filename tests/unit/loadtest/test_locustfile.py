"""``locust -f loadtest/locustfile.py --headless`` against the fake server: CSV, HTML and the
events file come out, custom TTFT/ITL/TOK/S entries are there, and a misbehaving server makes
failures (and a failing exit status)."""

from __future__ import annotations

import csv
import subprocess
import sys
import threading
from pathlib import Path

import orjson


def _locust_cmd(url: str, out: Path, run_time_s: int = 4) -> list[str]:
    return [sys.executable, "-m", "locust", "-f", "loadtest/locustfile.py", "--headless", "-u", "3", "-r", "3",
           "-t", "60s", "--load-duration-s", str(run_time_s), "--host", url, "--csv", str(out / "load"), "--html", str(out / "load.html"),
           "--events-file", str(out / "events.jsonl"), "--max-tokens", "6", "--wait-s", "0.05",
           "--only-summary", "--stop-timeout", "5"]


def _locust(url: str, out: Path, run_time_s: int = 4) -> subprocess.CompletedProcess[str]:
    return subprocess.run(_locust_cmd(url, out, run_time_s), capture_output=True, text=True, timeout=60,
                          cwd=Path(__file__).resolve().parents[3])


def test_headless_run_writes_csv_html_and_events(fake_gateway, tmp_path: Path) -> None:
    import time

    t0 = time.monotonic()
    proc = _locust(fake_gateway.url, tmp_path)
    assert time.monotonic() - t0 < 30  # --load-duration-s ended it, not -t 60s
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    rows = list(csv.DictReader((tmp_path / "load_stats.csv").open()))
    types = {r["Type"] for r in rows}
    assert {"TTFT", "ITL", "TOK/S"} <= types and ({"SSE", "POST"} & types)
    assert all(r["Failure Count"] == "0" for r in rows)
    assert (tmp_path / "load.html").stat().st_size > 1000
    records = [orjson.loads(line) for line in (tmp_path / "events.jsonl").read_bytes().splitlines()]
    assert len(records) >= 5 and all(r["ok"] for r in records)
    assert {r["kind"] for r in records} == {"single", "session"}


def test_a_bad_server_makes_locust_fail(fake_gateway, tmp_path: Path) -> None:
    # The server starts repeating tokens once the references are made (a line Locust prints),
    # so the failures are the load's, not the references'.
    proc = subprocess.Popen(_locust_cmd(fake_gateway.url, tmp_path), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=Path(__file__).resolve().parents[3])
    killer = threading.Timer(90, proc.kill)
    killer.start()
    try:
        seen = []
        for line in proc.stdout:  # type: ignore[union-attr]
            seen.append(line)
            if "references ready" in line:
                fake_gateway.misbehave.add("duplicate")
                break
        stdout, stderr = proc.communicate(timeout=90)
    finally:
        killer.cancel()
    assert any("references ready" in line for line in seen), "".join(seen) + stderr[-2000:]
    assert proc.returncode == 1, stdout[-2000:] + stderr[-2000:]
    records = [orjson.loads(line) for line in (tmp_path / "events.jsonl").read_bytes().splitlines()]
    kinds = {r["failure_kind"] for r in records if not r["ok"]}
    assert kinds and kinds <= {"tokens_repeated"}
