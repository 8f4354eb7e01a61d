"""The zygote's wire protocol and its client: ask ``python -m replica.zygote`` for a replica.

The zygote (``replica/zygote.py``) has imported torch, transformers and the replica once and read
the checkpoint into the page cache; a replica forked from it skips those seconds. It listens on a
unix ``SOCK_SEQPACKET`` socket (one message per request and per reply; only this user may
connect). One connection per child:

1. the client sends a :class:`SpawnRequest` (argv, the whole environment, working directory) with
   the log file's descriptor attached (``SCM_RIGHTS``): the replica's secrets travel in the
   environment over the socket, never on any argv, and are never logged;
2. the zygote checks that a fork is safe, forks, and answers a :class:`SpawnReply` with the
   child's pid and a pidfd for it attached (opened before the child can be reaped: no pid reuse);
   or a refusal (then it exits with :data:`REFUSED_EXIT_CODE`, and the caller starts plainly);
3. when the child exits, the zygote (its parent) reaps it and sends its exit status on the same
   connection.

The child is the zygote's, not the caller's, so :class:`ZygoteChild` is a ``Popen`` look-alike over
the pidfd (exit seen by ``poll``, signals by ``pidfd_send_signal``), and :class:`ForkedProcess` is
a :class:`~unbroken.procs.ManagedProcess` that starts through the zygote when it can and plainly
when it cannot: to a supervisor both are a process it started.
"""

from __future__ import annotations

import json
import os
import select
import signal
import socket
import subprocess
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

from unbroken.procs import ManagedProcess

REFUSED_EXIT_CODE = 3  # the zygote's status when a fork cannot be safe: the caller starts plainly
UNKNOWN_EXIT_CODE = 255  # the child exited but the zygote (gone) could not say how
MAX_MESSAGE_BYTES = 1 << 20


class ZygoteUnavailable(Exception):
    """No child from the zygote: absent, not ready (still importing), gone, or refusing."""


class ZygoteRefused(ZygoteUnavailable):
    """The zygote found that a fork would not be safe (threads, CUDA) and refused."""


@dataclass(frozen=True)
class SpawnRequest:
    argv: list[str]  # the replica's arguments, as for ``python -m replica``
    env: dict[str, str]  # the child's whole environment (secrets included: never logged)
    cwd: str
    op: str = "spawn"


@dataclass(frozen=True)
class PingRequest:
    op: str = "ping"


@dataclass(frozen=True)
class SpawnReply:
    pid: int = 0  # the child's pid (a pidfd for it is attached)
    refused: str = ""  # why a fork would not be safe (then no child, and the zygote exits)
    error: str = ""  # a bad request


@dataclass(frozen=True)
class PingReply:
    pid: int
    model: str = ""  # the checkpoint it read into the page cache (or loaded)
    weights_loaded: bool = False  # children inherit the weights copy-on-write
    num_children: int = 0


@dataclass(frozen=True)
class ExitReport:
    exit_code: int  # as ``Popen.returncode``: negative for a signal


def encode(message: Any) -> bytes:
    return json.dumps(asdict(message)).encode()


def decode_request(data: bytes) -> SpawnRequest | PingRequest:
    raw = json.loads(data)
    if raw.get("op") == "ping":
        return PingRequest()
    if raw.get("op") != "spawn":
        raise ValueError(f"unknown op {raw.get('op')!r}")
    argv, env, cwd = raw.get("argv"), raw.get("env"), raw.get("cwd")
    if not (isinstance(argv, list) and all(isinstance(a, str) for a in argv)):
        raise ValueError("argv must be a list of strings")
    if not (isinstance(env, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in env.items())):
        raise ValueError("env must map strings to strings")
    if not isinstance(cwd, str):
        raise ValueError("cwd must be a string")
    return SpawnRequest(argv=argv, env=env, cwd=cwd)


def _connect(path: str | Path, timeout_s: float) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    sock.settimeout(timeout_s)
    try:
        sock.connect(str(path))
    except OSError as e:
        sock.close()
        raise ZygoteUnavailable(f"not ready ({type(e).__name__}: {e.strerror or e})") from None
    return sock


def ping(path: str | Path, timeout_s: float = 1.0) -> PingReply:
    """The zygote's answer when it is listening (it listens only once it is warm)."""
    with _connect(path, timeout_s) as sock:
        try:
            sock.send(encode(PingRequest()))
            data = sock.recv(MAX_MESSAGE_BYTES)
        except OSError as e:
            raise ZygoteUnavailable(f"ping failed: {e}") from None
    try:
        return PingReply(**json.loads(data))
    except (ValueError, TypeError):
        raise ZygoteUnavailable(f"not a ping reply: {data[:200]!r}") from None


class ZygoteChild:
    """A child of the zygote, seen through a pidfd; what :class:`ManagedProcess` needs of ``Popen``
    (``pid``, ``poll``, ``wait``, ``returncode``, ``send_signal``, ``kill``, ``terminate``)."""

    def __init__(self, pid: int, pidfd: int, conn: socket.socket) -> None:
        self.pid = pid
        self.pidfd = pidfd
        self._conn = conn  # the zygote sends the exit status here
        self._lock = threading.Lock()  # the supervisor's thread and a caller's may both see the exit
        self.returncode: int | None = None

    def __del__(self) -> None:
        # Closed only here, never while another thread could be polling it (a closed descriptor's
        # number may be reused by then).
        try:
            os.close(self.pidfd)
        except OSError:
            pass

    def _exited(self, timeout_s: float | None) -> bool:
        p = select.poll()
        p.register(self.pidfd, select.POLLIN)
        return bool(p.poll(-1 if timeout_s is None else max(0, int(timeout_s * 1000))))

    def _collect(self) -> int:
        """The exit status from the zygote, which reaps the child as soon as it exits."""
        with self._lock:
            if self.returncode is not None:
                return self.returncode
            code = UNKNOWN_EXIT_CODE
            try:
                self._conn.settimeout(2.0)
                data = self._conn.recv(MAX_MESSAGE_BYTES)
                if data:
                    code = int(ExitReport(**json.loads(data)).exit_code)
            except (OSError, ValueError, TypeError):
                pass
            self._conn.close()
            self.returncode = code
            return code

    def poll(self) -> int | None:
        if self.returncode is None and self._exited(0):
            self._collect()
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        if self.returncode is not None:
            return self.returncode
        if not self._exited(timeout):
            raise subprocess.TimeoutExpired(f"pid {self.pid}", timeout or 0.0)
        return self._collect()

    def send_signal(self, sig: int) -> None:
        if self.poll() is None:
            try:
                signal.pidfd_send_signal(self.pidfd, sig)
            except ProcessLookupError:
                pass

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


def spawn(path: str | Path, argv: Sequence[str], env: Mapping[str, str], *, cwd: str | Path | None = None,
          log_path: str | Path | None = None, timeout_s: float = 5.0) -> ZygoteChild:
    """Ask the zygote at ``path`` for a replica; raises :class:`ZygoteUnavailable` (or
    :class:`ZygoteRefused`) when there is none to be had, so the caller starts one plainly."""
    sock = _connect(path, timeout_s)
    try:
        out = os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644) if log_path else \
            os.open(os.devnull, os.O_WRONLY)
        try:
            request = SpawnRequest(argv=list(argv), env=dict(env), cwd=str(cwd or os.getcwd()))
            socket.send_fds(sock, [encode(request)], [out])
        finally:
            os.close(out)
        data, fds, _flags, _addr = socket.recv_fds(sock, MAX_MESSAGE_BYTES, 1)
    except OSError as e:
        sock.close()
        raise ZygoteUnavailable(f"spawn failed: {type(e).__name__}: {e}") from None
    try:
        reply = SpawnReply(**json.loads(data))
    except (ValueError, TypeError):  # nothing (the zygote closed the connection), or not a reply
        reply = SpawnReply(error=f"not a spawn reply: {data[:200]!r}")
    if reply.refused or reply.error or not reply.pid or not fds:
        sock.close()
        for fd in fds:
            os.close(fd)
        if reply.refused:
            raise ZygoteRefused(f"refused: {reply.refused}")
        raise ZygoteUnavailable(f"no child: {reply.error or 'no pidfd'}")
    sock.settimeout(None)
    return ZygoteChild(reply.pid, fds[0], sock)


class ForkedProcess(ManagedProcess):
    """A replica started by the zygote at ``zygote_socket`` when it can (``started_via`` =
    ``"zygote"``), else by a plain ``Popen`` of ``cmd`` (``"plain"``, with ``fallback_reason``).
    ``child_argv`` is what the zygote's child runs as ``python -m replica``'s arguments."""

    def __init__(self, name: str, cmd: Sequence[str], *, child_argv: Sequence[str],
                 zygote_socket: str | Path | None, **kwargs: Any) -> None:
        super().__init__(name, cmd, **kwargs)
        self.child_argv = list(child_argv)
        self.zygote_socket = zygote_socket
        self.started_via = ""
        self.fallback_reason = ""
        self.start_s = 0.0  # how long the start call took (the fork, or the Popen)

    def start(self) -> "ForkedProcess":
        t0 = time.monotonic()
        self.fallback_reason = "" if self.zygote_socket else "no zygote"
        if self.zygote_socket:
            try:
                self.proc = spawn(self.zygote_socket, self.child_argv, self.env, cwd=self.cwd,  # type: ignore[assignment]
                                  log_path=self.log_path)
                self.started_via = "zygote"
                self.start_s = time.monotonic() - t0
                return self
            except ZygoteUnavailable as e:
                self.fallback_reason = str(e)
        super().start()
        self.started_via = "plain"
        self.start_s = time.monotonic() - t0
        return self
