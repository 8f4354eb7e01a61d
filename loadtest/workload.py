"""The load test's workload, independent of Locust: prompts, conversations, one checked exchange
with the gateway, the reference answers, and the per-request record the reports are built from.

Every request is greedy (or seeded) with ``ignore_eos`` and a fixed ``max_tokens``, so each
answer is known in advance: :class:`ReferenceBook` asks each prompt and plays each conversation
once, before any fault, and every later answer must equal it token for token. A multi-turn
session whose later turn differs from the reference has lost its context.
"""

from __future__ import annotations

import random
import threading
import time
import uuid
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import orjson
import requests

from loadtest.checks import (
    Completion,
    ResponseCheckError,
    SSEParser,
    StreamAccumulator,
    check_completion,
    parse_completion,
)

MODEL = "qwen"

PROMPTS = [
    "Tell me a story about a small robot who learned to paint.",
    "How does the gateway route a request?",
    "When a replica crashes, what happens to the stream?",
    "Hello! How can I help you today?",
    "Explain the cache of keys and values in one sentence.",
    "def add(a, b):",
]

CONVERSATIONS = [
    ["Hello! Who are you?", "Tell me about replicas.", "And what happens when one crashes?"],
    ["Write a short poem about Redis.", "Make it longer.", "Now summarise it."],
    ["What is a load test?", "How do you inject faults?", "Does the client notice?"],
]

PRIORITIES = [("critical", 0.2), ("normal", 0.6), ("batch", 0.2)]

CONNECT_RETRIES = 5
"""Attempts beyond the first when the connection fails before any response byte (refused, or a
kept-alive connection closed by a gateway that is restarting), as the OpenAI SDK retries
connection errors. Backoff 0.2, 0.4, 0.8, 1, 1 s. Every retry is counted in the record
(``client_retries``), never hidden, and scenarios can bound them."""


@dataclass(frozen=True)
class WorkloadConfig:
    base_url: str
    max_tokens: int = 24
    seeded_fraction: float = 0.2
    """Share of single requests that sample with a seed instead of greedily."""
    stream_fraction: float = 0.7
    timeout_s: float = 60.0
    api_key: str = ""
    server_history: bool = False
    """Sessions send only their new message with ``X-Session-History: server``."""
    fallback_urls: tuple[str, ...] = ()
    """Other gateways: a refused connection goes to the next, and a broken stream is resumed on the
    next with ``Last-Event-ID`` and the same ``X-Request-ID`` (docs/protocol.md)."""


@dataclass
class RequestRecord:
    """One exchange, as written to the events file (one JSON line each)."""

    t_start_s: float  # wall clock
    t_end_s: float
    kind: str  # "single" | "session"
    name: str  # Locust's name for it
    stream: bool
    priority: str
    ok: bool
    failure_kind: str = ""
    failure: str = ""
    status: int = 0
    latency_s: float = 0.0
    ttft_s: float | None = None  # streams only
    itl_s: float | None = None
    num_tokens: int = 0
    retries: int = 0  # X-Unbroken-Retries
    failovers: int = 0  # X-Unbroken-Failovers or the last chunk's unbroken.failovers
    client_retries: int = 0  # connection refused before any byte, retried here
    stream_resumes: int = 0  # a broken stream continued with Last-Event-ID (on another gateway)
    replica_id: str = ""
    session_id: str = ""
    turn: int = 0
    cached_tokens: int = 0
    request_id: str = ""

    def to_json(self) -> bytes:
        return orjson.dumps(asdict(self))

    @property
    def tokens_per_s(self) -> float | None:
        """Decode rate of a stream after its first token (None for JSON answers)."""
        if not self.stream or self.ttft_s is None or self.num_tokens < 2 or self.latency_s <= self.ttft_s:
            return None
        return (self.num_tokens - 1) / (self.latency_s - self.ttft_s)


def _pick_priority(rng: random.Random) -> str:
    x, acc = rng.random(), 0.0
    for name, w in PRIORITIES:
        acc += w
        if x < acc:
            return name
    return PRIORITIES[-1][0]


def request_body(messages: list[dict[str, str]], max_tokens: int, stream: bool,
                 seed: int | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {"model": MODEL, "messages": messages, "max_tokens": max_tokens,
                            "ignore_eos": True, "stream": stream}
    if seed is None:
        body["temperature"] = 0.0
    else:
        body.update(temperature=0.8, seed=seed)
    if stream:
        body["stream_options"] = {"include_usage": True}
    return body


@dataclass
class Exchange:
    """The raw outcome of one HTTP exchange, before it is checked against a reference."""

    completion: Completion | None = None
    error: ResponseCheckError | None = None
    status: int = 0
    headers: dict[str, str] = field(default_factory=dict)
    t_start_mono: float = 0.0
    t_first_token_mono: float | None = None
    t_end_mono: float = 0.0
    client_retries: int = 0
    stream_resumes: int = 0


def exchange(http: requests.Session, cfg: WorkloadConfig, body: dict[str, Any],
             headers: dict[str, str]) -> Exchange:
    """POST /v1/chat/completions and parse (and check the form of) the answer."""
    urls = [u.rstrip("/") + "/v1/chat/completions" for u in (cfg.base_url, *cfg.fallback_urls)]
    hdrs = {"Content-Type": "application/json", **headers}
    hdrs.setdefault("X-Request-ID", uuid.uuid4().hex)  # the same on every try: resumes and repeats
    if cfg.api_key:
        hdrs["Authorization"] = f"Bearer {cfg.api_key}"
    ex = Exchange(t_start_mono=time.monotonic())
    payload = orjson.dumps(body)
    stream = bool(body.get("stream"))
    for attempt in range(CONNECT_RETRIES + 1):
        url = urls[attempt % len(urls)]
        try:
            resp = http.post(url, data=payload, headers=hdrs, stream=stream, timeout=(5.0, cfg.timeout_s))
            break
        except requests.ConnectionError as e:
            # post() raised: no response header arrived, so the request was not answered at all.
            if attempt == CONNECT_RETRIES:
                ex.error = ResponseCheckError("connection", str(e)[:200])
                ex.t_end_mono = time.monotonic()
                return ex
            ex.client_retries += 1
            time.sleep(min(1.0, 0.2 * (2 ** attempt)))
        except requests.Timeout as e:
            ex.error = ResponseCheckError("timeout", str(e)[:200])
            ex.t_end_mono = time.monotonic()
            return ex
    ex.status = resp.status_code
    ex.headers = {k.lower(): v for k, v in resp.headers.items()}
    try:
        if resp.status_code != 200:
            text = resp.text[:300]
            ex.error = ResponseCheckError(f"http_{resp.status_code}", text)
        elif stream:
            reader = _StreamReader(ex)
            while not reader.read(resp) and cfg.fallback_urls and ex.stream_resumes < CONNECT_RETRIES \
                    and reader.last_event_id is not None:
                resp.close()
                ex.stream_resumes += 1
                resp = _resume(http, cfg, urls, ex.stream_resumes, payload, hdrs, reader.last_event_id)
            ex.completion = reader.close()
        else:
            ex.completion = parse_completion(orjson.loads(resp.content))
    except ResponseCheckError as e:
        ex.error = e
    except requests.RequestException as e:
        kind = "timeout" if isinstance(e, requests.Timeout) else "stream_broken"
        ex.error = ResponseCheckError(kind, str(e)[:200])
    except orjson.JSONDecodeError as e:
        ex.error = ResponseCheckError("bad_body", f"not JSON: {e}")
    finally:
        resp.close()
        ex.t_end_mono = time.monotonic()
    return ex


class _StreamReader:
    """A stream's events across the responses that carry it, remembering the last whole event's id."""

    def __init__(self, ex: Exchange) -> None:
        self.ex = ex
        self.parser, self.acc = SSEParser(), StreamAccumulator()
        self.last_event_id: str | None = None
        self._pending_id: str | None = None

    def read(self, resp: requests.Response) -> bool:
        """Read ``resp`` to its end; False when it broke (or ended) before ``[DONE]``."""
        buf = b""
        try:
            for chunk in resp.iter_content(chunk_size=None):
                buf += chunk
                *lines, buf = buf.split(b"\n")
                for raw in lines:
                    self._line(raw.decode("utf-8"))
        except requests.RequestException:
            pass
        self.parser = SSEParser()  # a half event is dropped: it comes again after the resume
        return self.acc.finished

    def _line(self, line: str) -> None:
        if line.startswith("id:"):
            self._pending_id = line[3:].strip()
        data = self.parser.feed_line(line)
        if data is None:
            return
        now = time.monotonic()
        self.last_event_id = self._pending_id
        n_before = len(self.acc.completion.token_ids)
        self.acc.add_event(data, now)
        if self.ex.t_first_token_mono is None and len(self.acc.completion.token_ids) > n_before:
            self.ex.t_first_token_mono = now

    def close(self) -> Completion:
        return self.acc.close()


def _resume(http: requests.Session, cfg: WorkloadConfig, urls: list[str], num: int, payload: bytes,
            hdrs: dict[str, str], last_event_id: str) -> requests.Response:
    """The same body, with ``Last-Event-ID``, to the next gateway (and on round the list)."""
    last_exc: Exception | None = None
    for k in range(len(urls) * 2):
        try:
            resp = http.post(urls[(num + k) % len(urls)], data=payload, stream=True, timeout=(5.0, cfg.timeout_s),
                             headers={**hdrs, "Last-Event-ID": last_event_id})
        except requests.ConnectionError as e:
            last_exc = e
            time.sleep(0.05)
            continue
        if resp.status_code != 200:
            raise ResponseCheckError(f"resume_{resp.status_code}", resp.text[:300])
        return resp
    raise requests.ConnectionError(f"no gateway took the resume: {last_exc}")


def _read_stream(resp: requests.Response, ex: Exchange) -> Completion:
    parser, acc = SSEParser(), StreamAccumulator()
    buf = b""
    for chunk in resp.iter_content(chunk_size=None):
        buf += chunk
        *lines, buf = buf.split(b"\n")
        now = time.monotonic()
        for raw in lines:
            data = parser.feed_line(raw.decode("utf-8"))
            if data is None:
                continue
            n_before = len(acc.completion.token_ids)
            acc.add_event(data, now)
            if ex.t_first_token_mono is None and len(acc.completion.token_ids) > n_before:
                ex.t_first_token_mono = now
    for data in (parser.feed_line(buf.decode("utf-8")) if buf else None, parser.finish()):
        if data is not None:
            acc.add_event(data, time.monotonic())
    return acc.close()


class ReferenceBook:
    """Reference answers, made once before faults: per prompt (greedy and seeded) and per
    conversation turn. Thread- (and greenlet-) safe; the first to need one computes it."""

    def __init__(self, cfg: WorkloadConfig) -> None:
        self.cfg = cfg
        self.singles: dict[tuple[int, int | None], Completion] = {}
        self.conversations: dict[int, list[Completion]] = {}
        self._lock = threading.Lock()

    def build(self, http: requests.Session, seeds: list[int] | None = None, attempts: int = 3) -> None:
        """Ask every prompt (greedy, and with each seed) and play every conversation once."""
        for i in range(len(PROMPTS)):
            for seed in [None, *(seeds or [])]:
                self.single(http, i, seed, attempts)
        for c in range(len(CONVERSATIONS)):
            self.conversation(http, c, attempts)

    def single(self, http: requests.Session, prompt_idx: int, seed: int | None,
               attempts: int = 3) -> Completion:
        key = (prompt_idx, seed)
        with self._lock:
            if key not in self.singles:
                body = request_body([{"role": "user", "content": PROMPTS[prompt_idx]}], self.cfg.max_tokens,
                                    stream=False, seed=seed)
                self.singles[key] = self._ask(http, body, {}, attempts)
            return self.singles[key]

    def conversation(self, http: requests.Session, conv_idx: int, attempts: int = 3) -> list[Completion]:
        with self._lock:
            if conv_idx not in self.conversations:
                messages: list[dict[str, str]] = []
                replies = []
                for user_text in CONVERSATIONS[conv_idx]:
                    messages.append({"role": "user", "content": user_text})
                    c = self._ask(http, request_body(list(messages), self.cfg.max_tokens, stream=False), {},
                                  attempts)
                    replies.append(c)
                    messages.append({"role": "assistant", "content": c.text})
                self.conversations[conv_idx] = replies
            return self.conversations[conv_idx]

    def _ask(self, http: requests.Session, body: dict[str, Any], headers: dict[str, str],
             attempts: int) -> Completion:
        last: Exception | None = None
        for _ in range(attempts):
            ex = exchange(http, self.cfg, body, {"X-Priority": "critical", **headers})
            if ex.completion is not None and ex.error is None:
                check_completion(ex.completion, max_tokens=self.cfg.max_tokens, ignore_eos=True)
                return ex.completion
            last = ex.error
            time.sleep(0.5)
        raise RuntimeError(f"could not get a reference answer: {last}")

    def to_dict(self) -> dict[str, Any]:
        return {
            "singles": {f"{k[0]}:{k[1]}": v.token_ids for k, v in self.singles.items()},
            "conversations": {str(k): [c.token_ids for c in v] for k, v in self.conversations.items()},
        }


RecordSink = Callable[[RequestRecord], None]


class WorkloadUser:
    """One simulated client: single requests and multi-turn sessions, streamed or not, with a
    priority mix; every answer checked. Transport is a ``requests.Session`` (gevent-friendly)."""

    def __init__(self, cfg: WorkloadConfig, references: ReferenceBook, sink: RecordSink,
                 seed: int | None = None, http: requests.Session | None = None) -> None:
        self.cfg = cfg
        self.references = references
        self.sink = sink
        self.rng = random.Random(seed)
        self.http = http or requests.Session()

    def _record(self, ex: Exchange, *, kind: str, name: str, stream: bool, priority: str,
                error: ResponseCheckError | None, session_id: str = "", turn: int = 0,
                request_id: str = "") -> RequestRecord:
        c = ex.completion
        now = time.time()
        latency_s = ex.t_end_mono - ex.t_start_mono
        itl = None
        if c is not None and len(c.chunk_times_s) >= 2:
            itl = (c.chunk_times_s[-1] - c.chunk_times_s[0]) / max(1, len(c.token_ids) - 1)
        failovers = int(ex.headers.get("x-unbroken-failovers") or 0)
        rec = RequestRecord(
            t_start_s=now - latency_s, t_end_s=now, kind=kind, name=name, stream=stream, priority=priority,
            ok=error is None, failure_kind=error.kind if error else "", failure=error.message[:300] if error else "",
            status=ex.status, latency_s=latency_s,
            ttft_s=(ex.t_first_token_mono - ex.t_start_mono) if ex.t_first_token_mono is not None else None,
            itl_s=itl, num_tokens=len(c.token_ids) if c else 0,
            retries=int(ex.headers.get("x-unbroken-retries") or 0),
            failovers=max(failovers, c.failovers if c else 0), client_retries=ex.client_retries,
            stream_resumes=ex.stream_resumes, replica_id=ex.headers.get("x-replica-id", ""), session_id=session_id, turn=turn,
            cached_tokens=c.cached_tokens if c else 0,
            request_id=ex.headers.get("x-request-id", request_id),
        )
        self.sink(rec)
        return rec

    def single_request(self) -> RequestRecord:
        idx = self.rng.randrange(len(PROMPTS))
        seed = 1234 if self.rng.random() < self.cfg.seeded_fraction else None
        stream = self.rng.random() < self.cfg.stream_fraction
        priority = _pick_priority(self.rng)
        ref = self.references.single(self.http, idx, seed)
        body = request_body([{"role": "user", "content": PROMPTS[idx]}], self.cfg.max_tokens, stream, seed)
        request_id = uuid.uuid4().hex
        ex = exchange(self.http, self.cfg, body, {"X-Priority": priority, "X-Request-ID": request_id})
        error = ex.error
        if error is None and ex.completion is not None:
            try:
                check_completion(ex.completion, max_tokens=self.cfg.max_tokens, ignore_eos=True,
                                 reference=ref.token_ids, reference_text=ref.text)
            except ResponseCheckError as e:
                error = e
        name = f"single {'stream' if stream else 'json'}{' seeded' if seed is not None else ''}"
        return self._record(ex, kind="single", name=name, stream=stream, priority=priority, error=error,
                            request_id=request_id)

    def session(self, stop: Callable[[], bool] = lambda: False) -> list[RequestRecord]:
        """Play one conversation turn by turn under a fresh ``X-Session-ID``; stop at the first failure."""
        conv = self.rng.randrange(len(CONVERSATIONS))
        refs = self.references.conversation(self.http, conv)
        session_id = f"s-{uuid.uuid4().hex[:12]}"
        priority = _pick_priority(self.rng)
        messages: list[dict[str, str]] = []
        out: list[RequestRecord] = []
        for turn, user_text in enumerate(CONVERSATIONS[conv]):
            if stop():
                break
            stream = self.rng.random() < self.cfg.stream_fraction
            new = {"role": "user", "content": user_text}
            messages.append(new)
            headers = {"X-Session-ID": session_id, "X-Priority": priority}
            sent = messages
            if self.cfg.server_history:
                headers["X-Session-History"] = "server"
                sent = [new]
            ex = exchange(self.http, self.cfg, request_body(list(sent), self.cfg.max_tokens, stream), headers)
            error = ex.error
            if error is None and ex.completion is not None:
                try:
                    check_completion(ex.completion, max_tokens=self.cfg.max_tokens, ignore_eos=True,
                                     reference=refs[turn].token_ids, reference_text=refs[turn].text,
                                     in_session_turn=turn)
                except ResponseCheckError as e:
                    error = e
            out.append(self._record(ex, kind="session", name=f"session turn {turn + 1}"
                                    f" {'stream' if stream else 'json'}", stream=stream, priority=priority,
                                    error=error, session_id=session_id, turn=turn))
            if error is not None:
                break
            messages.append({"role": "assistant", "content": refs[turn].text})
        return out
