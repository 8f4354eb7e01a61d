"""The run report: Markdown with matplotlib plots, from the load test's per-request records and the
injected faults' timeline.

``report.md`` holds the summary table an operator reads first (per fault: detection time, time to
full capacity (MTTR: the gateway's rotation back to its size before the fault), requests lost,
tokens lost or repeated, conversations that kept their context, p99 latency during the fault
against steady state), then the totals, failures by kind, failover / retry / restore
counts, and the plots: requests/s, p50/p99 latency and p50/p99 TTFT over time with every fault
shaded, and failures by kind.

    python -m loadtest.report --events runs/x/events.jsonl --faults runs/x/faults.json --out runs/x
"""

from __future__ import annotations

import argparse
import math
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import orjson

FAULT_WINDOW_MIN_S = 5.0
"""A fault without a duration (a kill that is never healed, a reset) is judged over this window."""

TOKEN_KINDS = {"tokens_missing", "tokens_repeated", "token_mismatch", "stream_incomplete", "text_mismatch"}


def percentile(values: Sequence[float], q: float) -> float | None:
    """Nearest-rank percentile (q in [0, 100]); None for no values."""
    if not values:
        return None
    xs = sorted(values)
    k = max(0, min(len(xs) - 1, math.ceil(q / 100.0 * len(xs)) - 1))
    return xs[k]


def load_events(path: str | Path) -> list[dict[str, Any]]:
    p = Path(path)
    if not p.exists():
        return []
    return [orjson.loads(line) for line in p.read_bytes().splitlines() if line.strip()]


@dataclass
class FaultSummary:
    action: str
    target: str
    at_s: float
    window_s: tuple[float, float]
    detection_s: float | None
    num_requests: int
    num_lost: int
    num_token_faults: int
    contexts_kept: int
    contexts_total: int
    p99_during_s: float | None
    failovers: int
    mttr_s: float | None = None


@dataclass
class RunSummary:
    t0_s: float
    duration_s: float
    num_requests: int
    num_failed: int
    failures_by_kind: Counter[str]
    steady_p50_s: float | None
    steady_p99_s: float | None
    steady_ttft_p99_s: float | None
    num_failovers: int
    num_retries: int
    num_client_retries: int
    num_stream_resumes: int = 0  # streams continued with Last-Event-ID after a gateway was lost
    # of num_client_retries, those of requests running while a gateway was killed: the client moving
    # to another gateway is the expected answer to that fault, not a gateway dropping connections
    num_client_retries_gateway_lost: int = 0
    faults: list[FaultSummary] = field(default_factory=list)
    counters: dict[str, float] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.num_failed == 0


def _overlaps(r: dict[str, Any], lo: float, hi: float) -> bool:
    return r["t_start_s"] < hi and r["t_end_s"] > lo


def summarize(records: list[dict[str, Any]], faults: list[dict[str, Any]], t0_s: float | None = None,
              warmup_s: float = 0.0, counters: dict[str, float] | None = None) -> RunSummary:
    """Numbers for the report; ``faults`` are :meth:`FaultRecord.to_dict` dicts."""
    records = sorted(records, key=lambda r: r["t_start_s"])
    if t0_s is None:
        t0_s = records[0]["t_start_s"] if records else 0.0
    end_s = max((r["t_end_s"] for r in records), default=t0_s)
    first_fault = min((f["started_at_s"] for f in faults), default=end_s)
    steady = [r for r in records if r["ok"] and r["t_start_s"] >= t0_s + warmup_s and r["t_end_s"] <= first_fault]
    failed = [r for r in records if not r["ok"]]
    run = RunSummary(
        t0_s=t0_s, duration_s=end_s - t0_s, num_requests=len(records), num_failed=len(failed),
        failures_by_kind=Counter(r["failure_kind"] for r in failed),
        steady_p50_s=percentile([r["latency_s"] for r in steady], 50),
        steady_p99_s=percentile([r["latency_s"] for r in steady], 99),
        steady_ttft_p99_s=percentile([r["ttft_s"] for r in steady if r.get("ttft_s") is not None], 99),
        num_failovers=sum(int(r.get("failovers") or 0) for r in records),
        num_retries=sum(int(r.get("retries") or 0) for r in records),
        num_client_retries=sum(int(r.get("client_retries") or 0) for r in records),
        num_stream_resumes=sum(int(r.get("stream_resumes") or 0) for r in records),
        num_client_retries_gateway_lost=sum(
            int(r.get("client_retries") or 0) for r in records
            if any(_overlaps(r, f["started_at_s"], max(f.get("ended_at_s") or f["started_at_s"],
                                                       f["started_at_s"] + FAULT_WINDOW_MIN_S))
                   for f in faults if f.get("action") == "kill_gateway")),
        counters=dict(counters or {}),
    )
    for f in sorted(faults, key=lambda f: f["started_at_s"]):
        lo = f["started_at_s"]
        hi = max(f.get("ended_at_s") or lo, lo + FAULT_WINDOW_MIN_S)
        during = [r for r in records if _overlaps(r, lo, hi)]
        lost = [r for r in during if not r["ok"]]
        sessions: dict[str, bool] = {}
        for r in during:
            if r["kind"] == "session" and r.get("session_id"):
                sessions[r["session_id"]] = sessions.get(r["session_id"], True) and r["ok"]
        run.faults.append(FaultSummary(
            action=f["action"], target=f["target"], at_s=lo - t0_s, window_s=(lo - t0_s, hi - t0_s),
            detection_s=f.get("detection_s"), num_requests=len(during), num_lost=len(lost),
            num_token_faults=sum(1 for r in lost if r["failure_kind"] in TOKEN_KINDS),
            contexts_kept=sum(sessions.values()), contexts_total=len(sessions),
            p99_during_s=percentile([r["latency_s"] for r in during if r["ok"]], 99),
            failovers=sum(int(r.get("failovers") or 0) + int(r.get("retries") or 0) for r in during),
            mttr_s=f.get("mttr_s"),
        ))
    return run


def _fmt_s(x: float | None, digits: int = 3) -> str:
    return "–" if x is None else f"{x:.{digits}f}"


def _describe(f: dict[str, Any] | FaultSummary) -> str:
    return f"{f.action} {f.target}" if isinstance(f, FaultSummary) else f"{f['action']} {f['target']}"


def summary_table(run: RunSummary) -> str:
    """The per-fault Markdown table."""
    lines = [
        "| fault | at (s) | detection (s) | time to full capacity (s) | requests in window | requests lost "
        "| tokens lost or repeated "
        "| contexts kept | failovers + retries | p99 during fault (s) | p99 steady (s) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for f in run.faults:
        lines.append(
            f"| {_describe(f)} | {f.at_s:.1f} | {_fmt_s(f.detection_s)} | {_fmt_s(f.mttr_s, 2)} "
            f"| {f.num_requests} | {f.num_lost} "
            f"| {f.num_token_faults} | {f.contexts_kept}/{f.contexts_total} | {f.failovers} "
            f"| {_fmt_s(f.p99_during_s, 2)} | {_fmt_s(run.steady_p99_s, 2)} |")
    if not run.faults:
        lines.append("| (no fault) | | | | | | | | | | |")
    return "\n".join(lines)


def _bucket_series(records: list[dict[str, Any]], t0_s: float, bucket_s: float, value_key: str | None):
    """Per time bucket: count of completions (value_key None) or p50/p99 of a field."""
    n = max(1, int(math.ceil(max((r["t_end_s"] - t0_s for r in records), default=1.0) / bucket_s)))
    buckets: list[list[float]] = [[] for _ in range(n)]
    for r in records:
        i = min(n - 1, max(0, int((r["t_end_s"] - t0_s) // bucket_s)))
        if value_key is None:
            buckets[i].append(1.0)
        elif r.get(value_key) is not None and r["ok"]:
            buckets[i].append(float(r[value_key]))
    xs = [(i + 0.5) * bucket_s for i in range(n)]
    return xs, buckets


def write_plots(records: list[dict[str, Any]], faults: list[dict[str, Any]], t0_s: float, out_dir: Path,
                bucket_s: float = 1.0) -> list[str]:
    """PNG plots; returns their file names."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)

    def mark_faults(ax) -> None:  # type: ignore[no-untyped-def]
        for i, f in enumerate(faults):
            lo = f["started_at_s"] - t0_s
            hi = max((f.get("ended_at_s") or f["started_at_s"]) - t0_s, lo + 0.3)
            ax.axvspan(lo, hi, color="tab:red", alpha=0.15, label="fault" if i == 0 else None)
            ax.annotate(_describe(f), (lo, 1.0), xycoords=("data", "axes fraction"), fontsize=7,
                        rotation=90, va="top", ha="right", color="tab:red")

    names = []
    xs, buckets = _bucket_series(records, t0_s, bucket_s, None)
    fails = [r for r in records if not r["ok"]]
    _, fail_buckets = _bucket_series(fails, t0_s, bucket_s, None) if fails else (xs, [[] for _ in xs])
    fig, ax = plt.subplots(figsize=(9, 3.2))
    ax.plot(xs, [len(b) / bucket_s for b in buckets], label="completed requests/s")
    ax.plot(xs[:len(fail_buckets)], [len(b) / bucket_s for b in fail_buckets], color="black", label="failed/s")
    mark_faults(ax)
    ax.set_xlabel("time (s)"), ax.set_ylabel("requests/s"), ax.legend(loc="lower right", fontsize=8)
    ax.set_title("Throughput")
    fig.tight_layout(), fig.savefig(out_dir / "throughput.png", dpi=110), plt.close(fig)
    names.append("throughput.png")

    for key, title, fname in (("latency_s", "Request latency", "latency.png"),
                              ("ttft_s", "Time to first token (streams)", "ttft.png")):
        xs, buckets = _bucket_series(records, t0_s, bucket_s, key)
        fig, ax = plt.subplots(figsize=(9, 3.2))
        for q, style in ((50, "-"), (99, "--")):
            ys = [percentile(b, q) for b in buckets]
            ax.plot(xs, [y if y is not None else float("nan") for y in ys], style, label=f"p{q}")
        mark_faults(ax)
        ax.set_xlabel("time (s)"), ax.set_ylabel("seconds"), ax.legend(loc="upper right", fontsize=8)
        ax.set_title(title)
        fig.tight_layout(), fig.savefig(out_dir / fname, dpi=110), plt.close(fig)
        names.append(fname)

    kinds = Counter(r["failure_kind"] for r in fails)
    fig, ax = plt.subplots(figsize=(6, 2.8))
    if kinds:
        ax.barh(list(kinds), list(kinds.values()), color="tab:red")
    else:
        ax.text(0.5, 0.5, "no failed request", ha="center", va="center", transform=ax.transAxes)
        ax.set_yticks([])
    ax.set_title("Failures by kind"), ax.set_xlabel("requests")
    fig.tight_layout(), fig.savefig(out_dir / "failures.png", dpi=110), plt.close(fig)
    names.append("failures.png")
    return names


def render_markdown(run: RunSummary, *, title: str, command: str = "", description: str = "",
                    plots: Iterable[str] = (), notes: Iterable[str] = ()) -> str:
    total_ok = run.num_requests - run.num_failed
    rps = total_ok / run.duration_s if run.duration_s > 0 else 0.0
    out = [f"# {title}", ""]
    if description:
        out += [description.strip(), ""]
    if command:
        out += ["Command:", "", "```", command, "```", ""]
    verdict = "PASS: no failed request" if run.ok else f"FAIL: {run.num_failed} failed request(s)"
    out += [f"**{verdict}**", "", "## Summary by fault", "", summary_table(run), "",
            "Requests in window: requests running at any time between the fault and its end (at least "
            f"{FAULT_WINDOW_MIN_S:.0f} s). Tokens lost or repeated: failed answers whose token ids were missing, "
            "repeated or different from the reference. Contexts kept: multi-turn sessions active in the window "
            "whose every turn equalled the reference.", "",
            "## Totals", "",
            "| requests | failed | requests/s | p50 steady (s) | p99 steady (s) | TTFT p99 steady (s) "
            "| failovers | retries | client connect retries | stream resumes |",
            "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
            f"| {run.num_requests} | {run.num_failed} | {rps:.2f} | {_fmt_s(run.steady_p50_s, 2)} "
            f"| {_fmt_s(run.steady_p99_s, 2)} | {_fmt_s(run.steady_ttft_p99_s, 2)} | {run.num_failovers} "
            f"| {run.num_retries} | {run.num_client_retries} | {run.num_stream_resumes} |", ""]
    out += ["## Failures by kind", ""]
    if run.failures_by_kind:
        out += ["| kind | requests |", "|---|---:|"]
        out += [f"| {k} | {v} |" for k, v in run.failures_by_kind.most_common()]
    else:
        out += ["None."]
    out.append("")
    if run.counters:
        out += ["## Failover, retry and restore counters (server side, during the run)", "",
                "| counter | increase |", "|---|---:|"]
        out += [f"| `{k}` | {v:g} |" for k, v in sorted(run.counters.items())]
        out.append("")
    notes = list(notes)
    if notes:
        out += ["## Notes", ""] + [f"- {n}" for n in notes] + [""]
    plots = list(plots)
    if plots:
        out += ["## Plots", ""] + [f"![{p}]({p})" for p in plots] + [""]
    return "\n".join(out)


def write_report(out_dir: str | Path, records: list[dict[str, Any]], faults: list[dict[str, Any]], *,
                 title: str = "Load test report", t0_s: float | None = None, warmup_s: float = 0.0,
                 command: str = "", description: str = "", counters: dict[str, float] | None = None,
                 notes: Iterable[str] = ()) -> tuple[Path, RunSummary]:
    """Write ``report.md``, ``summary.json`` and the plots into ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    run = summarize(records, faults, t0_s=t0_s, warmup_s=warmup_s, counters=counters)
    plots = write_plots(records, faults, run.t0_s, out) if records else []
    md = render_markdown(run, title=title, command=command, description=description, plots=plots, notes=notes)
    path = out / "report.md"
    path.write_text(md)
    (out / "summary.json").write_bytes(orjson.dumps({
        "num_requests": run.num_requests, "num_failed": run.num_failed,
        "failures_by_kind": dict(run.failures_by_kind), "steady_p50_s": run.steady_p50_s,
        "steady_p99_s": run.steady_p99_s, "num_failovers": run.num_failovers, "num_retries": run.num_retries,
        "num_client_retries": run.num_client_retries, "num_stream_resumes": run.num_stream_resumes, "counters": run.counters,
        "faults": [f.__dict__ for f in run.faults],
    }, option=orjson.OPT_INDENT_2))
    return path, run


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtest.report", description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", required=True, help="events JSONL written by the locustfile")
    parser.add_argument("--faults", help="faults.json written by loadtest.chaos")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--title", default="Load test report")
    parser.add_argument("--warmup-s", type=float, default=0.0)
    args = parser.parse_args(argv)
    records = load_events(args.events)
    faults: list[dict[str, Any]] = []
    if args.faults and Path(args.faults).exists():
        faults = orjson.loads(Path(args.faults).read_bytes())
    path, run = write_report(args.out, records, faults, title=args.title, warmup_s=args.warmup_s,
                             command=" ".join(["python -m loadtest.report", *(argv or sys.argv[1:])]))
    print(summary_table(run))
    print(f"report: {path}")
    return 0 if run.ok else 1


if __name__ == "__main__":
    sys.exit(main())
