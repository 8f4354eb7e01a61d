"""Start, wait for, signal and stop the local processes of a stack (used by the launcher, the
fault injector and the tests). Every process is ended by its own pid, never by name."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Mapping, Sequence
from urllib.parse import quote


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def http_ok(url: str, timeout_s: float = 1.0) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as r:
            return 200 <= r.status < 300
    except (urllib.error.URLError, OSError, ValueError):
        return False


def wait_for_port(host: str, port: int, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return True
        except OSError:
            time.sleep(0.05)
    return False


class ManagedProcess:
    """One child process with its log file; ``ready_url`` is polled by :meth:`wait_ready`."""

    def __init__(
        self,
        name: str,
        cmd: Sequence[str],
        *,
        log_path: str | Path | None = None,
        env: Mapping[str, str] | None = None,
        ready_url: str | None = None,
        cwd: str | Path | None = None,
    ) -> None:
        self.name = name
        self.cmd = list(cmd)
        self.log_path = Path(log_path) if log_path else None
        self.env = dict(os.environ, **(env or {}))
        self.ready_url = ready_url
        self.cwd = cwd
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        assert self.proc is not None, f"{self.name} was not started"
        return self.proc.pid

    def start(self) -> "ManagedProcess":
        out = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL
        try:
            self.proc = subprocess.Popen(
                self.cmd, stdout=out, stderr=subprocess.STDOUT, env=self.env, cwd=self.cwd,
                start_new_session=True,
            )
        finally:
            if self.log_path:
                out.close()  # type: ignore[union-attr]
        return self

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def wait_ready(self, timeout_s: float = 60.0) -> None:
        """Block until ``ready_url`` answers 2xx; raise with the log's tail if it dies or times out."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if not self.alive():
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode if self.proc else None}"
                                   f" before it was ready:\n{self.log_tail()}")
            if self.ready_url is None or http_ok(self.ready_url, timeout_s=1.0):
                return
            time.sleep(0.1)
        raise TimeoutError(f"{self.name} not ready after {timeout_s}s:\n{self.log_tail()}")

    def signal(self, sig: int) -> None:
        """Send ``sig`` through the process handle: ``Popen`` signals only a child not yet reaped, a
        zygote's child (``unbroken.zygote.ZygoteChild``) goes through its pidfd; never a reused pid."""
        if self.alive():
            self.proc.send_signal(sig)  # type: ignore[union-attr]

    def kill(self) -> None:
        """kill -9, and reap."""
        if self.alive():
            self.proc.send_signal(signal.SIGKILL)  # type: ignore[union-attr]
            self.proc.wait(timeout=10)  # type: ignore[union-attr]

    def stop(self, timeout_s: float = 10.0) -> int | None:
        """SIGCONT (in case it was stopped), SIGTERM, then SIGKILL after ``timeout_s``."""
        if self.proc is None:
            return None
        if self.alive():
            try:
                self.proc.send_signal(signal.SIGCONT)
                self.proc.send_signal(signal.SIGTERM)
                self.proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self.kill()
            except ProcessLookupError:
                pass
        return self.proc.poll()

    def log_tail(self, num_lines: int = 40) -> str:
        if not self.log_path or not self.log_path.exists():
            return "(no log)"
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-num_lines:])


def python_module_cmd(module: str, *args: str) -> list[str]:
    return [sys.executable, "-m", module, *args]


def redis_server_cmd(port: int, extra: Sequence[str] = (), config_file: str | Path | None = None) -> list[str]:
    """A throwaway redis-server on 127.0.0.1:port that keeps nothing on disk. Secrets (``requirepass``)
    go in ``config_file``, never on this command line."""
    head = ["redis-server", str(config_file)] if config_file else ["redis-server"]
    return [*head, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", *extra]


def start_redis(port: int | None = None, log_path: str | Path | None = None,
                extra: Sequence[str] = (), config_file: str | Path | None = None,
                password: str = "") -> tuple[ManagedProcess, str]:
    """Start a redis-server; the URL returned carries ``password`` (which ``config_file`` must set)."""
    port = port or free_port()
    proc = ManagedProcess("redis", redis_server_cmd(port, extra, config_file), log_path=log_path).start()
    if not wait_for_port("127.0.0.1", port, 10.0):
        proc.stop()
        raise RuntimeError(f"redis-server did not open port {port}:\n{proc.log_tail()}")
    auth = f":{quote(password, safe='')}@" if password else ""
    return proc, f"redis://{auth}127.0.0.1:{port}/0"
