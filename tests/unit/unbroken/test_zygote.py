"""The zygote's protocol and client on real processes, without torch (a few seconds): a zygote
(``replica.zygote.Zygote``) whose children run a small test main instead of a replica.

- a child gets its argv, its environment (a secret never on any argv) and its log file; the
  caller sees its exit (SIGTERM, kill -9) and status through the pidfd, like a process it started;
- a zygote that is absent, answers nonsense, or refuses because it has a thread, leaves the caller
  to start plainly;
  a refusing zygote exits with status 3.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
import threading
import textwrap
import time
from pathlib import Path
from typing import Any, Callable

import pytest

from unbroken.procs import ManagedProcess
from unbroken.zygote import REFUSED_EXIT_CODE, ForkedProcess, ZygoteRefused, ZygoteUnavailable, ping, spawn

ROOT = Path(__file__).resolve().parents[3]

# A zygote whose children print what they were given, then wait for a signal. With ``thread`` it
# starts a thread first: every fork is then refused.
ZYGOTE_SCRIPT = textwrap.dedent("""
    import json, os, signal, sys, threading
    from replica.zygote import Zygote

    def child_main(argv):
        print(json.dumps({"argv": argv, "secret": os.environ.get("TEST_SECRET"), "cwd": os.getcwd(),
                          "pid": os.getpid(), "sid": os.getsid(0)}), flush=True)
        if argv and argv[0] == "exit":
            return int(argv[1])
        while True:
            signal.pause()

    if sys.argv[2] == "thread":
        threading.Thread(target=threading.Event().wait, daemon=True).start()
    z = Zygote(sys.argv[1], child_main=child_main)
    z.listen()
    print("listening", flush=True)
    sys.exit(z.run())
""")


def until(cond: Callable[[], Any], timeout_s: float, what: str) -> Any:
    deadline = time.monotonic() + timeout_s
    while not (value := cond()):
        assert time.monotonic() < deadline, f"timed out after {timeout_s}s waiting for {what}"
        time.sleep(0.01)
    return value


def start_zygote(tmp_path: Path, mode: str = "plain") -> tuple[ManagedProcess, Path]:
    script = tmp_path / "zygote_main.py"
    script.write_text(ZYGOTE_SCRIPT)
    sock = tmp_path / "z.sock"
    proc = ManagedProcess("zygote", [sys.executable, str(script), str(sock), mode], log_path=tmp_path / "zygote.log",
                          env={"PYTHONPATH": str(ROOT)}).start()

    def ready() -> bool:
        assert proc.alive(), proc.log_tail()
        try:
            return ping(sock).pid == proc.pid
        except ZygoteUnavailable:
            return False

    until(ready, 30, "the zygote to listen")
    return proc, sock


def first_line(path: Path) -> dict[str, Any]:
    return json.loads(until(lambda: path.is_file() and path.read_text().strip().splitlines()[:1], 30,
                            f"{path.name} to be written")[0])


def test_a_forked_child_gets_its_argv_env_and_log_and_is_controlled_through_its_pidfd(tmp_path: Path) -> None:
    zproc, sock = start_zygote(tmp_path)
    try:
        log = tmp_path / "child.log"
        child = ForkedProcess("c0", [sys.executable, "-c", "raise SystemExit(9)"], child_argv=["wait", "--x"],
                              zygote_socket=sock, log_path=log, env={"TEST_SECRET": "s3cret"}, cwd=tmp_path)
        child.start()
        assert child.started_via == "zygote" and child.fallback_reason == ""
        seen = first_line(log)
        assert seen["argv"] == ["wait", "--x"] and seen["secret"] == "s3cret" and seen["pid"] == child.pid
        assert Path(seen["cwd"]) == tmp_path and seen["sid"] == child.pid  # its own session
        assert "s3cret" not in Path(f"/proc/{child.pid}/cmdline").read_text()
        assert os.getppid() != child.pid and child.alive()
        assert ping(sock).num_children == 1
        assert child.stop(timeout_s=10) == -signal.SIGTERM  # SIGTERM by pidfd; the status from the zygote
        assert not child.alive()

        again = ForkedProcess("c1", [], child_argv=["wait"], zygote_socket=sock, log_path=tmp_path / "c1.log")
        again.start()
        first_line(tmp_path / "c1.log")
        again.kill()  # kill -9 by pid, as the supervisor and the fault injector do
        assert again.proc.returncode == -signal.SIGKILL  # type: ignore[union-attr]

        quick = spawn(sock, ["exit", "7"], {}, log_path=tmp_path / "c2.log")
        assert quick.wait(timeout=30) == 7 and quick.poll() == 7
        assert zproc.alive() and ping(sock).num_children == 0
    finally:
        zproc.stop(10)
    assert zproc.proc.returncode == 0 and not sock.exists()  # type: ignore[union-attr]


def test_without_a_ready_zygote_the_start_is_plain(tmp_path: Path) -> None:
    child = ForkedProcess("c0", [sys.executable, "-c", "print('plain', flush=True)"], child_argv=[],
                          zygote_socket=tmp_path / "absent.sock", log_path=tmp_path / "c0.log")
    child.start()
    assert child.started_via == "plain" and "not ready" in child.fallback_reason
    assert child.proc.wait(timeout=30) == 0  # type: ignore[union-attr]
    assert (tmp_path / "c0.log").read_text().strip() == "plain"


def test_a_zygote_that_answers_nonsense_leaves_a_plain_start(tmp_path: Path) -> None:
    path = tmp_path / "odd.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as server:
        server.bind(str(path))
        server.listen(1)

        def answer() -> None:
            conn, _ = server.accept()
            with conn:
                conn.recv(1 << 20)
                conn.send(b"not json")

        t = threading.Thread(target=answer)
        t.start()
        child = ForkedProcess("c0", [sys.executable, "-c", "pass"], child_argv=[], zygote_socket=path)
        child.start()
        t.join(10)
    assert child.started_via == "plain" and "not a spawn reply" in child.fallback_reason
    assert child.proc.wait(timeout=30) == 0  # type: ignore[union-attr]


def test_a_zygote_with_a_thread_refuses_to_fork_and_exits_3(tmp_path: Path) -> None:
    zproc, sock = start_zygote(tmp_path, mode="thread")
    try:
        with pytest.raises(ZygoteRefused, match="threads"):
            spawn(sock, ["wait"], {}, log_path=tmp_path / "c0.log")
        assert zproc.proc.wait(timeout=30) == REFUSED_EXIT_CODE  # type: ignore[union-attr]
        child = ForkedProcess("c1", [sys.executable, "-c", "pass"], child_argv=["wait"], zygote_socket=sock)
        child.start()
        assert child.started_via == "plain"
        assert child.proc.wait(timeout=30) == 0  # type: ignore[union-attr]
    finally:
        zproc.stop(10)
