"""Locust users for an unbroken gateway: OpenAI-style single requests and multi-turn sessions,
streamed and not, with a mix of priorities; every answer checked (loadtest/checks.py).

    locust -f loadtest/locustfile.py --host http://127.0.0.1:8000                  # web UI
    locust -f loadtest/locustfile.py --host http://127.0.0.1:8000 --headless \\
        -u 8 -r 4 -t 60s --csv runs/load --html runs/load.html

Before the users start, the reference answer of every prompt and every conversation turn is
asked once (greedy, or seeded); afterwards every answer must equal it token for token, and any
violation (invalid SSE, an error event, a missing or repeated token, a conversation that lost its
context, an HTTP error) is a Locust failure whose message starts with its kind.

Besides the requests themselves (type ``POST`` for JSON answers, ``SSE`` for streams), each
answer fires custom entries: ``TTFT`` (time to first token, ms), ``ITL`` (mean inter-token
latency, ms) and ``TOK/S`` (decode tokens per second, in the response-time column).
``--events-file FILE`` also writes one JSON line per request for ``loadtest.report``.
"""

from __future__ import annotations

import os
import threading
import time

import gevent
import orjson
from locust import HttpUser, between, events, task
from locust.env import Environment

from loadtest.workload import ReferenceBook, RequestRecord, WorkloadConfig, WorkloadUser

_STATE: dict[str, object] = {}
_WRITE_LOCK = threading.Lock()


@events.init_command_line_parser.add_listener
def _add_arguments(parser) -> None:  # type: ignore[no-untyped-def]
    g = parser.add_argument_group("unbroken")
    g.add_argument("--max-tokens", type=int, default=int(os.environ.get("UNBROKEN_LOADTEST_MAX_TOKENS", 24)),
                   help="completion tokens per request (ignore_eos, so every answer has exactly this many)")
    g.add_argument("--session-fraction", type=float,
                   default=float(os.environ.get("UNBROKEN_LOADTEST_SESSION_FRACTION", 0.5)),
                   help="share of tasks that play a whole multi-turn conversation")
    g.add_argument("--stream-fraction", type=float,
                   default=float(os.environ.get("UNBROKEN_LOADTEST_STREAM_FRACTION", 0.7)),
                   help="share of requests that stream")
    g.add_argument("--wait-s", type=float, default=float(os.environ.get("UNBROKEN_LOADTEST_WAIT_S", 0.1)),
                   help="pause between a user's tasks, in seconds")
    g.add_argument("--server-history", action="store_true",
                   default=os.environ.get("UNBROKEN_LOADTEST_SERVER_HISTORY", "") == "1",
                   help="sessions send only new messages (X-Session-History: server)")
    g.add_argument("--api-key", default=os.environ.get("UNBROKEN_LOADTEST_API_KEY", ""),
                   help="Authorization bearer key for the gateway")
    g.add_argument("--events-file", default=os.environ.get("UNBROKEN_LOADTEST_EVENTS", ""),
                   help="append one JSON line per request here (for loadtest.report)")
    g.add_argument("--load-duration-s", type=float,
                   default=float(os.environ.get("UNBROKEN_LOADTEST_DURATION_S", 0)),
                   help="stop this many seconds after the references are made (unlike -t, which also "
                        "counts the time spent making them); 0 = off")
    g.add_argument("--fallback-hosts", default=os.environ.get("UNBROKEN_LOADTEST_FALLBACK_HOSTS", ""),
                   help="other gateways, comma-separated: refused connections go there and broken streams "
                        "are resumed there with Last-Event-ID")
    g.add_argument("--references-file", default=os.environ.get("UNBROKEN_LOADTEST_REFERENCES", ""),
                   help="write the reference token ids here")


def _config(environment: Environment) -> WorkloadConfig:
    opts = environment.parsed_options
    host = environment.host or "http://127.0.0.1:8000"
    return WorkloadConfig(
        base_url=host, max_tokens=getattr(opts, "max_tokens", 24),
        stream_fraction=getattr(opts, "stream_fraction", 0.7), api_key=getattr(opts, "api_key", ""),
        server_history=getattr(opts, "server_history", False),
        fallback_urls=tuple(u for u in (getattr(opts, "fallback_hosts", "") or "").split(",") if u),
    )


@events.test_start.add_listener
def _build_references(environment: Environment, **_kw: object) -> None:
    """Ask every reference once, before any user starts (and before any fault)."""
    import requests

    cfg = _config(environment)
    book = ReferenceBook(cfg)
    t0 = time.monotonic()
    try:
        book.build(requests.Session(), seeds=[1234])
    except Exception as e:  # noqa: BLE001 - report and stop: no reference, no test
        print(f"loadtest: could not build the reference answers from {cfg.base_url}: {e}", flush=True)
        environment.process_exit_code = 3
        if environment.runner is not None:
            # Not from inside this listener: the runner is still starting, and quitting it from
            # here leaves the process waiting for its -t run time instead of exiting.
            gevent.spawn(environment.runner.quit)
        return
    print(f"loadtest: references ready in {time.monotonic() - t0:.1f}s "
          f"({len(book.singles)} prompts, {len(book.conversations)} conversations)", flush=True)
    _STATE["references"] = book
    opts = environment.parsed_options
    path = getattr(opts, "references_file", "")
    if path:
        with open(path, "wb") as f:
            f.write(orjson.dumps(book.to_dict()))
    duration_s = getattr(opts, "load_duration_s", 0.0)
    if duration_s > 0 and environment.runner is not None:
        def finish() -> None:
            # stop() lets running tasks finish (--stop-timeout); quit() ends the headless run.
            environment.runner.stop()
            environment.runner.quit()

        gevent.spawn_later(duration_s, finish)


def _sink(environment: Environment):  # type: ignore[no-untyped-def]
    path = getattr(environment.parsed_options, "events_file", "") if environment.parsed_options else ""

    def sink(rec: RequestRecord) -> None:
        fire = environment.events.request.fire
        exc = None if rec.ok else AssertionError(f"{rec.failure_kind}: {rec.failure}")
        fire(request_type="SSE" if rec.stream else "POST", name=rec.name, response_time=rec.latency_s * 1000,
             response_length=rec.num_tokens, exception=exc, context={})
        if rec.ok:
            if rec.ttft_s is not None:
                fire(request_type="TTFT", name=rec.name, response_time=rec.ttft_s * 1000, response_length=0,
                     exception=None, context={})
            if rec.itl_s is not None:
                fire(request_type="ITL", name=rec.name, response_time=rec.itl_s * 1000, response_length=0,
                     exception=None, context={})
            tps = rec.tokens_per_s
            if tps is not None:
                fire(request_type="TOK/S", name=rec.name, response_time=tps, response_length=0,
                     exception=None, context={})
        if path:
            with _WRITE_LOCK, open(path, "ab") as f:
                f.write(rec.to_json() + b"\n")

    return sink


class OpenAIUser(HttpUser):
    """A client of the gateway: single requests, or a whole conversation per task."""

    host = "http://127.0.0.1:8000"
    wait_time = between(0.0, 0.2)

    def on_start(self) -> None:
        opts = self.environment.parsed_options
        if opts is not None:
            wait_s = getattr(opts, "wait_s", 0.1)
            self.wait_time = lambda: self._workload.rng.uniform(0.5 * wait_s, 1.5 * wait_s)  # type: ignore[method-assign]
        book = _STATE.get("references")
        if not isinstance(book, ReferenceBook):
            # test_start did not build them (e.g. a distributed worker): build lazily.
            book = ReferenceBook(_config(self.environment))
            _STATE["references"] = book
        self.session_fraction = getattr(opts, "session_fraction", 0.5) if opts else 0.5
        self._workload = WorkloadUser(_config(self.environment), book, _sink(self.environment))

    @task
    def converse(self) -> None:
        if self._workload.rng.random() < self.session_fraction:
            self._workload.session()
        else:
            self._workload.single_request()
