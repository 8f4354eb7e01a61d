"""A fault-injecting TCP proxy for loopback traffic (gateway -> replica, or anything -> Redis).

The proxy listens on ``127.0.0.1`` and forwards every connection to one loopback target. Its
:class:`FaultSpec` can be changed at any moment from any thread (:meth:`FaultProxy.set_fault`):

- ``latency_ms`` / ``jitter_ms``: every chunk is delivered that much later (a pipe delay, so
  throughput is kept and order is preserved);
- ``stall``: bytes are held (not dropped) until the stall is lifted, like a peer under SIGSTOP;
- ``blackhole``: bytes are read and dropped; connections stay open and silent;
- ``refuse``: new connections are reset at once;
- ``reset_probability`` / ``reset_after_bytes``: a new connection is, with that probability,
  reset (TCP RST) once that many bytes have passed in the faulted direction;
- ``http_error_status``: new connections are answered with that HTTP status and closed.

``direction`` chooses which byte direction latency, stall, blackhole and resets act on:
``upstream`` (client -> target), ``downstream`` (target -> client) or ``both``.
:meth:`FaultProxy.reset_connections` cuts every open connection right now.

The proxy runs its own asyncio loop on a daemon thread, so a synchronous test, the launcher or
the scenario runner can drive it. It refuses any address that is not loopback.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import random
import socket
import struct
import threading
import time
from dataclasses import dataclass, field, replace
from typing import Literal

log = logging.getLogger(__name__)

Direction = Literal["both", "upstream", "downstream"]
_READ_CHUNK_BYTES = 64 * 1024


class FaultSafetyError(ValueError):
    """A fault was aimed at something this machine's stack does not own (a non-loopback address
    or a process the stack did not start)."""


def require_loopback(host: str) -> str:
    """Return ``host`` if it names a loopback address, else raise :class:`FaultSafetyError`.

    Names are resolved, and every address they resolve to must be loopback.
    """
    if host in ("localhost", "localhost.localdomain"):
        return host
    try:
        addrs = [ipaddress.ip_address(host)]
    except ValueError:
        try:
            infos = socket.getaddrinfo(host, None)
        except OSError:
            raise FaultSafetyError(f"refusing fault on {host!r}: it does not resolve") from None
        addrs = [ipaddress.ip_address(info[4][0]) for info in infos]
    if not addrs or not all(a.is_loopback for a in addrs):
        raise FaultSafetyError(f"refusing fault on {host!r}: only loopback addresses may be faulted")
    return host


@dataclass(frozen=True)
class FaultSpec:
    """What the proxy does to traffic. The default is a clean pass-through."""

    latency_ms: float = 0.0
    """Added one-way delay per chunk, in milliseconds."""
    jitter_ms: float = 0.0
    """Uniform random extra delay in [0, jitter_ms] per chunk (order is still preserved)."""
    direction: Direction = "both"
    """Which byte direction latency, stall, blackhole and resets act on."""
    stall: bool = False
    """Hold bytes (without dropping them) until the stall is lifted."""
    blackhole: bool = False
    """Read and drop bytes; connections stay open and silent."""
    refuse: bool = False
    """Reset every new connection at once."""
    reset_probability: float = 0.0
    """Chance that a new connection is reset after ``reset_after_bytes`` in the faulted direction."""
    reset_after_bytes: int = 0
    """Bytes that pass in the faulted direction before a doomed connection is reset."""
    http_error_status: int = 0
    """Answer new connections with this HTTP status (e.g. 502) and close them; 0 = off."""

    def __post_init__(self) -> None:
        if self.direction not in ("both", "upstream", "downstream"):
            raise ValueError(f"direction must be both|upstream|downstream, not {self.direction!r}")
        if not 0.0 <= self.reset_probability <= 1.0:
            raise ValueError(f"reset_probability must be in [0, 1], not {self.reset_probability}")
        if self.latency_ms < 0 or self.jitter_ms < 0 or self.reset_after_bytes < 0:
            raise ValueError("latency_ms, jitter_ms and reset_after_bytes must be >= 0")
        if self.http_error_status and not 100 <= self.http_error_status <= 599:
            raise ValueError(f"http_error_status must be an HTTP status, not {self.http_error_status}")

    def applies_to(self, direction: str) -> bool:
        return self.direction in ("both", direction)

    @property
    def is_clean(self) -> bool:
        return self == FaultSpec()


CLEAN = FaultSpec()


@dataclass
class ProxyStats:
    """Counters since the proxy started."""

    num_connections: int = 0
    num_resets: int = 0
    num_refused: int = 0
    num_http_errors: int = 0
    bytes_upstream: int = 0
    bytes_downstream: int = 0
    bytes_dropped: int = 0


@dataclass(eq=False)
class _Conn:
    client_writer: asyncio.StreamWriter
    upstream_writer: asyncio.StreamWriter | None = None
    doomed: bool = False
    bytes_by_direction: dict[str, int] = field(default_factory=lambda: {"upstream": 0, "downstream": 0})
    tasks: list[asyncio.Task[None]] = field(default_factory=list)


def _abort_with_rst(writer: asyncio.StreamWriter | None) -> None:
    """Close with SO_LINGER 0, so the peer sees a TCP reset rather than a clean EOF."""
    if writer is None:
        return
    sock = writer.get_extra_info("socket")
    if sock is not None:
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except OSError:
            pass
    writer.transport.abort()


class FaultProxy:
    """A loopback TCP proxy in front of ``target_host:target_port`` with run-time faults."""

    def __init__(self, target_port: int, *, target_host: str = "127.0.0.1", listen_port: int = 0,
                 listen_host: str = "127.0.0.1", name: str = "", seed: int = 0) -> None:
        self.target_host = require_loopback(target_host)
        self.target_port = int(target_port)
        self.listen_host = require_loopback(listen_host)
        self.listen_port = int(listen_port)
        self.name = name or f"proxy->{target_port}"
        self.stats = ProxyStats()
        self._spec = CLEAN
        self._spec_changed: asyncio.Event | None = None
        self._rng = random.Random(seed)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: asyncio.base_events.Server | None = None
        self._conns: set[_Conn] = set()
        self._started = threading.Event()
        self._start_error: BaseException | None = None

    # -- control (any thread) ------------------------------------------------------------------

    @property
    def url(self) -> str:
        return f"http://{self.listen_host}:{self.listen_port}"

    @property
    def fault(self) -> FaultSpec:
        return self._spec

    def start(self) -> "FaultProxy":
        """Bind and start forwarding (returns once the port is open)."""
        self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
        self._thread.start()
        if not self._started.wait(10.0):
            raise RuntimeError(f"{self.name} did not start")
        if self._start_error is not None:
            raise self._start_error
        return self

    def set_fault(self, spec: FaultSpec | None = None, **fields: object) -> FaultSpec:
        """Replace the fault (``set_fault(FaultSpec(...))`` or ``set_fault(latency_ms=200)``)."""
        new = replace(spec or CLEAN, **fields)  # type: ignore[arg-type]
        self._spec = new
        self._call_soon(self._notify_spec_changed)
        return new

    def clear(self) -> None:
        """Back to a clean pass-through; stalled bytes are released."""
        self.set_fault(CLEAN)

    def reset_connections(self) -> int:
        """Reset (RST) every open connection now; returns how many were cut."""
        if self._loop is None:
            return 0
        fut = asyncio.run_coroutine_threadsafe(self._reset_all(), self._loop)
        return fut.result(timeout=5.0)

    def num_open_connections(self) -> int:
        return len(self._conns)

    def stop(self) -> None:
        """Close the listener and every connection, and end the thread."""
        if self._loop is None or self._thread is None:
            return
        try:
            asyncio.run_coroutine_threadsafe(self._shutdown(), self._loop).result(timeout=5.0)
        except Exception:  # noqa: BLE001 - stopping is best effort
            log.exception("%s: error while stopping", self.name)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=5.0)
        self._loop = None

    def __enter__(self) -> "FaultProxy":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- the proxy's own loop --------------------------------------------------------------------

    def _call_soon(self, fn) -> None:  # type: ignore[no-untyped-def]
        if self._loop is not None:
            try:
                self._loop.call_soon_threadsafe(fn)
            except RuntimeError:
                pass

    def _notify_spec_changed(self) -> None:
        if self._spec_changed is not None:
            self._spec_changed.set()
            self._spec_changed = asyncio.Event()

    def _run(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        asyncio.set_event_loop(loop)
        try:
            self._spec_changed = asyncio.Event()
            self._server = loop.run_until_complete(
                asyncio.start_server(self._on_client, self.listen_host, self.listen_port))
            self.listen_port = self._server.sockets[0].getsockname()[1]
        except BaseException as e:  # noqa: BLE001 - reported to start()
            self._start_error = e
            self._started.set()
            loop.close()
            return
        self._started.set()
        try:
            loop.run_forever()
        finally:
            loop.close()

    async def _shutdown(self) -> None:
        if self._server is not None:
            self._server.close()
        await self._reset_all(count=False)

    async def _reset_all(self, count: bool = True) -> int:
        conns = list(self._conns)
        for conn in conns:
            self._kill(conn)
            if count:
                self.stats.num_resets += 1
        return len(conns)

    def _kill(self, conn: _Conn) -> None:
        _abort_with_rst(conn.client_writer)
        _abort_with_rst(conn.upstream_writer)
        for t in conn.tasks:
            t.cancel()
        self._conns.discard(conn)

    async def _on_client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        spec = self._spec
        self.stats.num_connections += 1
        if spec.refuse:
            self.stats.num_refused += 1
            _abort_with_rst(writer)
            return
        if spec.http_error_status:
            self.stats.num_http_errors += 1
            await self._answer_http_error(reader, writer, spec.http_error_status)
            return
        conn = _Conn(client_writer=writer)
        conn.doomed = spec.reset_probability > 0 and self._rng.random() < spec.reset_probability
        try:
            up_reader, up_writer = await asyncio.wait_for(
                asyncio.open_connection(self.target_host, self.target_port), timeout=5.0)
        except (OSError, asyncio.TimeoutError):
            # Target down: the client sees what it would have seen without the proxy, a reset.
            _abort_with_rst(writer)
            return
        conn.upstream_writer = up_writer
        self._conns.add(conn)
        conn.tasks = [
            asyncio.create_task(self._pump(conn, reader, up_writer, "upstream")),
            asyncio.create_task(self._pump(conn, up_reader, writer, "downstream")),
        ]
        await asyncio.gather(*conn.tasks, return_exceptions=True)
        self._conns.discard(conn)
        for w in (writer, up_writer):
            try:
                w.close()
            except OSError:
                pass

    async def _answer_http_error(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                                 status: int) -> None:
        try:
            await asyncio.wait_for(reader.read(_READ_CHUNK_BYTES), timeout=1.0)
        except (asyncio.TimeoutError, OSError):
            pass
        body = (b'{"error": {"message": "injected fault", "type": "server_error", "param": null, '
                b'"code": "injected_fault"}}')
        head = (f"HTTP/1.1 {status} Injected Fault\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode()
        try:
            writer.write(head + body)
            await writer.drain()
            writer.close()
        except OSError:
            pass

    async def _pump(self, conn: _Conn, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                    direction: str) -> None:
        """Copy one direction: this task timestamps chunks, :meth:`_deliver` writes them when
        due, so latency delays without throttling and order is kept."""
        queue: asyncio.Queue[tuple[float, bytes] | None] = asyncio.Queue()
        deliver = asyncio.create_task(self._deliver(conn, queue, writer, direction))
        conn.tasks.append(deliver)
        try:
            while True:
                data = await reader.read(_READ_CHUNK_BYTES)
                if not data:
                    break
                spec = self._spec
                if spec.blackhole and spec.applies_to(direction):
                    self.stats.bytes_dropped += len(data)
                    continue
                delay_s = 0.0
                if spec.applies_to(direction) and (spec.latency_ms or spec.jitter_ms):
                    delay_s = (spec.latency_ms + self._rng.uniform(0.0, spec.jitter_ms)) / 1000.0
                queue.put_nowait((time.monotonic() + delay_s, data))
        except (OSError, asyncio.IncompleteReadError):
            # The peer reset: pass the reset on rather than a clean EOF, as a direct link would.
            self._kill(conn)
            return
        queue.put_nowait(None)
        await deliver

    async def _deliver(self, conn: _Conn, queue: asyncio.Queue[tuple[float, bytes] | None],
                       writer: asyncio.StreamWriter, direction: str) -> None:
        last_due = 0.0
        while True:
            item = await queue.get()
            if item is None:
                break
            due, data = item
            due = max(due, last_due)  # jitter never reorders bytes
            last_due = due
            wait_s = due - time.monotonic()
            if wait_s > 0:
                await asyncio.sleep(wait_s)
            while self._spec.stall and self._spec.applies_to(direction):
                changed = self._spec_changed
                assert changed is not None
                await changed.wait()
            spec = self._spec
            if conn.doomed and spec.applies_to(direction):
                room = spec.reset_after_bytes - conn.bytes_by_direction[direction]
                if room <= 0 or len(data) > room:
                    if room > 0:
                        writer.write(data[:room])
                        await writer.drain()
                    self.stats.num_resets += 1
                    self._kill(conn)
                    return
            conn.bytes_by_direction[direction] += len(data)
            if direction == "upstream":
                self.stats.bytes_upstream += len(data)
            else:
                self.stats.bytes_downstream += len(data)
            writer.write(data)  # after counting: the peer may read it before this thread runs again
            await writer.drain()
        # Half-close: pass the EOF on, so request/response protocols finish cleanly.
        try:
            if writer.can_write_eof():
                writer.write_eof()
        except OSError:
            pass


def start_fault_proxy(target_port: int, name: str) -> FaultProxy:
    """A started proxy in front of ``127.0.0.1:target_port``: the launcher's proxy factory."""
    return FaultProxy(target_port, name=name).start()
