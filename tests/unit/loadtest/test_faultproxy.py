"""The fault proxy against a real echo server and a real HTTP server on loopback."""

from __future__ import annotations

import socket
import socketserver
import struct
import threading
import time
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Iterator

import pytest

from loadtest.faultproxy import FaultProxy, FaultSafetyError, FaultSpec, require_loopback


class _Echo(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        while True:
            try:
                data = self.request.recv(65536)
            except OSError:
                return
            if not data:
                return
            if data == b"RST":
                self.request.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                self.request.close()
                return
            self.request.sendall(data)


class _Hello(BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        body = b"x" * 1000
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def echo_port() -> Iterator[int]:
    server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), _Echo)
    server.daemon_threads = True
    t = threading.Thread(target=server.serve_forever, daemon=True)
    t.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def http_port() -> Iterator[int]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Hello)
    t = threading.Thread(target=server.serve_forever, daemon=True)
    t.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def proxy(echo_port: int) -> Iterator[FaultProxy]:
    with FaultProxy(echo_port) as p:
        yield p


def _connect(proxy: FaultProxy, timeout_s: float = 2.0) -> socket.socket:
    return socket.create_connection(("127.0.0.1", proxy.listen_port), timeout=timeout_s)


def _roundtrip(sock: socket.socket, payload: bytes) -> tuple[bytes, float]:
    t0 = time.monotonic()
    sock.sendall(payload)
    got = b""
    while len(got) < len(payload):
        chunk = sock.recv(65536)
        if not chunk:
            break
        got += chunk
    return got, time.monotonic() - t0


def test_clean_pass_through(proxy: FaultProxy) -> None:
    with _connect(proxy) as s:
        got, _ = _roundtrip(s, b"hello" * 1000)
    assert got == b"hello" * 1000
    assert proxy.stats.bytes_upstream == 5000 and proxy.stats.bytes_downstream == 5000


def test_latency_both_directions_and_one_direction(proxy: FaultProxy) -> None:
    with _connect(proxy) as s:
        _, clean_s = _roundtrip(s, b"a")
        proxy.set_fault(latency_ms=150)
        got, both_s = _roundtrip(s, b"b")
        proxy.set_fault(latency_ms=150, direction="downstream")
        got2, down_s = _roundtrip(s, b"c")
    assert (got, got2) == (b"b", b"c")
    assert clean_s < 0.1
    assert 0.29 <= both_s < 0.6
    assert 0.14 <= down_s < 0.29


def test_latency_keeps_order_under_jitter(proxy: FaultProxy) -> None:
    proxy.set_fault(latency_ms=5, jitter_ms=30)
    with _connect(proxy) as s:
        for i in range(20):
            s.sendall(f"{i:03d}".encode())
        got = b""
        while len(got) < 60:
            got += s.recv(100)
    assert got == b"".join(f"{i:03d}".encode() for i in range(20))


def test_stall_holds_bytes_until_cleared(proxy: FaultProxy) -> None:
    proxy.set_fault(stall=True, direction="downstream")
    with _connect(proxy, timeout_s=0.4) as s:
        s.sendall(b"held")
        with pytest.raises(socket.timeout):
            s.recv(100)
        proxy.clear()
        s.settimeout(2.0)
        assert s.recv(100) == b"held"


def test_blackhole_drops_bytes_and_keeps_the_connection_open(proxy: FaultProxy) -> None:
    proxy.set_fault(blackhole=True)
    with _connect(proxy, timeout_s=0.4) as s:
        s.sendall(b"lost")
        with pytest.raises(socket.timeout):
            s.recv(100)
        proxy.clear()
        s.settimeout(2.0)
        got, _ = _roundtrip(s, b"after")
    assert got == b"after"
    assert proxy.stats.bytes_dropped == 4


def test_refuse_resets_new_connections(proxy: FaultProxy) -> None:
    proxy.set_fault(refuse=True)
    with pytest.raises(ConnectionResetError):
        with _connect(proxy) as s:
            s.sendall(b"x")
            s.recv(100)
    assert proxy.stats.num_refused == 1


def test_reset_after_bytes_in_one_direction(proxy: FaultProxy) -> None:
    proxy.set_fault(reset_probability=1.0, reset_after_bytes=10, direction="downstream")
    got = b""
    with _connect(proxy) as s:
        s.sendall(b"0123456789abcdefghij")
        with pytest.raises(ConnectionResetError):
            for _ in range(10):
                chunk = s.recv(100)
                if not chunk:
                    break
                got += chunk
    assert got == b"0123456789"
    assert proxy.stats.num_resets == 1


def test_reset_connections_cuts_open_connections(proxy: FaultProxy) -> None:
    with _connect(proxy) as s:
        assert _roundtrip(s, b"x")[0] == b"x"
        assert proxy.reset_connections() == 1
        with pytest.raises(ConnectionResetError):
            s.sendall(b"y")
            s.recv(100)
    # New connections work again.
    with _connect(proxy) as s:
        assert _roundtrip(s, b"z")[0] == b"z"


def test_a_reset_from_the_target_reaches_the_client_as_a_reset(proxy: FaultProxy) -> None:
    with _connect(proxy) as s:
        s.sendall(b"RST")
        with pytest.raises(ConnectionResetError):
            for _ in range(10):
                if not s.recv(100):
                    break


def test_http_error_status(http_port: int) -> None:
    with FaultProxy(http_port) as p:
        with urllib.request.urlopen(p.url + "/", timeout=2) as r:
            assert r.status == 200 and len(r.read()) == 1000
        p.set_fault(http_error_status=502)
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(p.url + "/", timeout=2)
        assert e.value.code == 502
        p.clear()
        with urllib.request.urlopen(p.url + "/", timeout=2) as r:
            assert r.status == 200


def test_only_loopback_may_be_faulted() -> None:
    assert require_loopback("127.0.0.1") == "127.0.0.1"
    assert require_loopback("::1") == "::1"
    assert require_loopback("localhost") == "localhost"
    for host in ("10.0.0.1", "8.8.8.8", "0.0.0.0", "192.168.1.1"):
        with pytest.raises(FaultSafetyError):
            require_loopback(host)
    with pytest.raises(FaultSafetyError):
        FaultProxy(80, target_host="10.1.2.3")
    with pytest.raises(FaultSafetyError):
        FaultProxy(80, listen_host="0.0.0.0")


def test_bad_specs_are_rejected() -> None:
    with pytest.raises(ValueError):
        FaultSpec(direction="sideways")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        FaultSpec(reset_probability=2.0)
    with pytest.raises(ValueError):
        FaultSpec(latency_ms=-1)
