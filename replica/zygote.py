"""``python -m replica.zygote --socket PATH [--model DIR] [--load-weights]``: a warm template that
forks replicas.

A plain replica start spends seconds importing torch, transformers and bitsandbytes and reading the
checkpoint from disk before it loads the model. The zygote does that once: it imports everything a
replica imports, reads the checkpoint's files (so their pages are in the page cache), then listens
on a unix socket (``unbroken/zygote.py`` has the protocol and the client). Each request forks a
child that becomes ``python -m replica`` with the request's arguments and environment.

With ``--load-weights`` it loads the model itself (the replica config its own environment and
``--config`` give) and the children inherit it copy-on-write: a child whose ``model`` section
equals the zygote's skips the load. The weights are the very tensors a load would make, so greedy
tokens are the same; but they are the checkpoint as it was when the zygote loaded it (restart the
zygote after changing it), and the zygote holds one copy of the model for as long as it runs.

A fork is only safe from a single-threaded process that has not initialised CUDA: before every
fork the zygote checks that it has one Python thread and one OS thread (``/proc/self/task``) and
that CUDA is not initialised. Where it cannot be safe it refuses (``--load-weights`` on a CUDA
device is refused at start) and exits with status 3; callers then start replicas plainly.
Numeric libraries start their thread pools at import unless told one thread, so the zygote sets
``OMP_NUM_THREADS`` (and friends) to 1 for itself, whatever it was given; a child sets its torch
thread count from its own ``OMP_NUM_THREADS`` (else the CPU count) after the fork, and from
``model.num_threads`` when it loads, as a plain start would.
"""

from __future__ import annotations

import os

# Before numpy or torch is imported: one thread each, or their pools make every fork unsafe (and
# a fork after an OpenMP parallel region can hang the child). A child sets its own thread count.
THREAD_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")
for _var in THREAD_VARS:
    os.environ[_var] = "1"
os.environ.setdefault("PYTORCH_NVML_BASED_CUDA_CHECK", "1")  # torch.cuda.is_available() without cuInit
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import argparse  # noqa: E402
import errno  # noqa: E402
import importlib  # noqa: E402
import random  # noqa: E402
import selectors  # noqa: E402
import signal  # noqa: E402
import socket  # noqa: E402
import struct  # noqa: E402
import sys  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Callable  # noqa: E402

from unbroken.zygote import (  # noqa: E402
    MAX_MESSAGE_BYTES,
    REFUSED_EXIT_CODE,
    ExitReport,
    PingReply,
    PingRequest,
    SpawnReply,
    SpawnRequest,
    decode_request,
    encode,
)

READ_CHUNK_BYTES = 1 << 20


def _progress(message: str) -> None:
    print(f"[zygote] {message}", flush=True)


def fork_hazard() -> str | None:
    """Why a fork from this process would not be safe now (None: it is safe)."""
    if threading.active_count() > 1:
        return f"{threading.active_count()} Python threads ({[t.name for t in threading.enumerate()]})"
    try:
        num_tasks = len(os.listdir("/proc/self/task"))
    except OSError:
        num_tasks = 1
    if num_tasks > 1:
        return f"{num_tasks} OS threads (a library started a thread pool)"
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_initialized():
        return "CUDA is initialised (a forked child cannot use it)"
    return None


WARM_MODULES = ("aiohttp", "torch", "transformers", "replica.__main__", "replica.engine", "replica.server")
OPTIONAL_WARM_MODULES = ("bitsandbytes", "uvloop", "kvsync.client")
# bitsandbytes asks a CUDA device for its capability at import, which initialises CUDA: on a
# machine with one, the children import it themselves, after the fork.
CUDA_INITIALISING_MODULES = ("bitsandbytes",)


def warm_imports(model: str | None) -> None:
    """Import what a replica imports (and the model's own classes), without starting threads."""
    import tqdm

    tqdm.tqdm.monitor_interval = 0  # its monitor thread would make every fork unsafe
    for name in WARM_MODULES:
        importlib.import_module(name)
    import torch

    cuda_here = torch.cuda.is_available()  # by NVML (PYTORCH_NVML_BASED_CUDA_CHECK): no CUDA init
    for name in OPTIONAL_WARM_MODULES:
        if cuda_here and name in CUDA_INITIALISING_MODULES:
            continue
        try:
            importlib.import_module(name)
        except ImportError:
            pass
    if model and Path(model, "config.json").is_file():
        from transformers import AutoConfig, AutoTokenizer
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

        config = AutoConfig.from_pretrained(model)
        MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]  # imports the model's module
        AutoTokenizer.from_pretrained(model)  # and the tokenizer's


def read_into_page_cache(model: str) -> int:
    """Read every file of the checkpoint once; the bytes read."""
    total = 0
    root = Path(model)
    if not root.is_dir():
        return 0
    for f in sorted(root.rglob("*")):
        if f.is_file():
            with open(f, "rb", buffering=0) as fh:
                while chunk := fh.read(READ_CHUNK_BYTES):
                    total += len(chunk)
    return total


def load_weights(args: argparse.Namespace) -> str:
    """Load the model as a replica with this environment would, and keep it for the children."""
    from replica.__main__ import build_parser, load_replica_config
    from replica.loader import keep_loaded, load_model, resolve_device

    rargv = ["--model", args.model] + (["--config", args.config] if args.config else []) + \
        (["--quantization", args.quantization] if args.quantization else [])
    config = load_replica_config(build_parser().parse_args(rargv))
    import torch

    if config.model.device == "cuda" or (config.model.device == "auto" and torch.cuda.is_available()):
        return "--load-weights on a CUDA device (a forked child cannot use its parent's CUDA tensors)"
    assert resolve_device(config.model.device).type == "cpu"
    one_thread = config.model.model_copy(update={"num_threads": 1})  # more would start a thread pool
    keep_loaded(config.model, load_model(one_thread, _progress))
    return ""


class Zygote:
    """The listening loop: accepts a request per connection, forks, reaps, reports exits."""

    def __init__(self, socket_path: str, model: str = "", weights_loaded: bool = False,
                 child_main: Callable[[list[str]], int] | None = None) -> None:
        """``child_main(argv)`` is what a child runs: ``python -m replica``'s main unless given."""
        self.socket_path = socket_path
        self.child_main = child_main
        self.model = model
        self.weights_loaded = weights_loaded
        self.children: dict[int, socket.socket] = {}  # pid -> the connection its exit goes to
        self.selector = selectors.DefaultSelector()
        self.wake_r, self.wake_w = os.pipe()
        os.set_blocking(self.wake_r, False)
        os.set_blocking(self.wake_w, False)
        self.stopping = False
        self.refused = ""
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)

    def listen(self) -> None:
        try:
            os.unlink(self.socket_path)  # a killed zygote's socket file
        except FileNotFoundError:
            pass
        old_umask = os.umask(0o177)  # the socket is ours only (and its peers' uid is checked too)
        try:
            self.listener.bind(self.socket_path)
        finally:
            os.umask(old_umask)
        self.listener.listen(16)
        signal.set_wakeup_fd(self.wake_w)
        signal.signal(signal.SIGCHLD, lambda *_: None)
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._on_stop)
        self.selector.register(self.listener, selectors.EVENT_READ, "accept")
        self.selector.register(self.wake_r, selectors.EVENT_READ, "wake")

    def _on_stop(self, *_: object) -> None:
        self.stopping = True

    def run(self) -> int:
        while not self.stopping and not self.refused:
            for key, _ in self.selector.select(timeout=1.0):
                if key.data == "wake":
                    self._drain_wakeups()
                    self.reap()
                elif key.data == "accept":
                    try:
                        conn, _addr = self.listener.accept()
                    except OSError:
                        continue
                    with_child = False
                    try:
                        with_child = self.handle(conn)
                    except Exception:  # noqa: BLE001 - one bad request never ends the zygote
                        _progress(f"a request failed: {traceback.format_exc(limit=3)}")
                    if not with_child:
                        conn.close()
            self.reap()
        self.close()
        return REFUSED_EXIT_CODE if self.refused else 0

    def _drain_wakeups(self) -> None:
        try:
            while os.read(self.wake_r, 512):
                pass
        except BlockingIOError:
            pass

    def reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            conn = self.children.pop(pid, None)
            code = os.waitstatus_to_exitcode(status)
            _progress(f"child {pid} exited with {code}")
            if conn is not None:
                try:
                    conn.send(encode(ExitReport(exit_code=code)))
                except OSError:
                    pass
                conn.close()

    def handle(self, conn: socket.socket) -> bool:
        """Answer one connection; True when it now belongs to a child (its exit is sent there)."""
        conn.settimeout(5.0)
        creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        _pid, uid, _gid = struct.unpack("3i", creds)
        data, fds, _flags, _addr = socket.recv_fds(conn, MAX_MESSAGE_BYTES, 2)
        try:
            if uid != os.getuid():
                conn.send(encode(SpawnReply(error="another user")))
                return False
            try:
                request = decode_request(data)
            except (ValueError, TypeError) as e:
                conn.send(encode(SpawnReply(error=f"bad request: {e}")))
                return False
            if isinstance(request, PingRequest):
                conn.send(encode(PingReply(pid=os.getpid(), model=self.model, weights_loaded=self.weights_loaded,
                                           num_children=len(self.children))))
                return False
            hazard = fork_hazard()
            if hazard:
                self.refused = hazard
                _progress(f"refusing to fork: {hazard}; exiting with status {REFUSED_EXIT_CODE}")
                conn.send(encode(SpawnReply(refused=hazard)))
                return False
            log_fd = fds[0] if fds else os.open(os.devnull, os.O_WRONLY)
            pid = self.fork(request, log_fd, conn)
            pidfd = os.pidfd_open(pid)  # before any reap: the pid cannot be reused under it
            try:
                socket.send_fds(conn, [encode(SpawnReply(pid=pid))], [pidfd])
            finally:
                os.close(pidfd)
            self.children[pid] = conn
            conn.settimeout(None)
            _progress(f"forked child {pid}")
            return True
        finally:
            for fd in fds:
                try:
                    os.close(fd)
                except OSError:
                    pass

    def fork(self, request: SpawnRequest, log_fd: int, conn: socket.socket) -> int:
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid:
            return pid
        code = 1
        try:
            code = self._become_replica(request, log_fd, conn)
        except SystemExit as e:  # argparse and friends
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        except BaseException:  # noqa: BLE001 - the child must never return into the zygote's loop
            traceback.print_exc()
        finally:
            try:
                sys.stdout.flush()
                sys.stderr.flush()
            finally:
                os._exit(code)

    def _become_replica(self, request: SpawnRequest, log_fd: int, conn: socket.socket) -> int:
        signal.set_wakeup_fd(-1)
        for sig in (signal.SIGCHLD, signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, signal.SIG_DFL)
        self.selector.close()
        self.listener.close()
        conn.close()
        for c in self.children.values():
            c.close()
        os.close(self.wake_r)
        os.close(self.wake_w)
        os.setsid()  # its own session, as a plain start's (signals to the group reach only it)
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.close(null)
        os.dup2(log_fd, 1)
        os.dup2(log_fd, 2)
        os.close(log_fd)
        os.environ.clear()
        os.environ.update(request.env)
        os.chdir(request.cwd)
        random.seed()  # not the zygote's (and its siblings') random state
        _set_threads(request.env)
        sys.argv = ["replica", *request.argv]
        _name_process(request.argv)
        if self.child_main is not None:
            return self.child_main(request.argv)
        print(f"[replica] forked by the zygote (pid {os.getppid()})", flush=True)
        from replica.__main__ import main

        return main(request.argv)

    def close(self) -> None:
        for conn in self.children.values():
            conn.close()
        self.listener.close()
        try:
            os.unlink(self.socket_path)
        except OSError as e:
            if e.errno != errno.ENOENT:
                raise


def _set_threads(env: dict[str, str]) -> None:
    """The child's torch threads, as its environment would give a plain start (the zygote has one)."""
    torch = sys.modules.get("torch")
    if torch is None:
        return
    wanted = env.get("OMP_NUM_THREADS", "")
    torch.set_num_threads(int(wanted) if wanted.isdigit() and int(wanted) > 0 else (os.cpu_count() or 1))


def _name_process(argv: list[str]) -> None:
    """``top`` and ``ps -o comm`` show ``replica-<id>`` (the command line stays the zygote's)."""
    rid = argv[argv.index("--replica-id") + 1] if "--replica-id" in argv[:-1] else ""
    try:
        with open("/proc/self/comm", "w") as f:
            f.write(("replica-" + rid if rid else "replica")[:15])
    except OSError:
        pass


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m replica.zygote", description=__doc__.split("\n\n")[0])
    p.add_argument("--socket", required=True, help="unix socket to listen on (made mode 0600)")
    p.add_argument("--model", default="", help="checkpoint directory: read into the page cache (and loaded, "
                                               "with --load-weights)")
    p.add_argument("--load-weights", action="store_true",
                   help="load the model here; children inherit it copy-on-write (CPU only)")
    p.add_argument("--config", help="replica YAML, for --load-weights (as python -m replica --config)")
    p.add_argument("--quantization", choices=["nf4", "none"], help="for --load-weights (as python -m replica)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    t0 = time.monotonic()
    warm_imports(args.model or None)
    num_bytes = read_into_page_cache(args.model) if args.model else 0
    _progress(f"imports done and {num_bytes / 1e6:.1f} MB of checkpoint read in {time.monotonic() - t0:.1f}s")
    if args.load_weights:
        if not args.model:
            print("zygote: --load-weights needs --model", file=sys.stderr)
            return 2
        why = load_weights(args)
        if why:
            _progress(f"refusing: {why}; exiting with status {REFUSED_EXIT_CODE}")
            return REFUSED_EXIT_CODE
    hazard = fork_hazard()
    if hazard:
        _progress(f"refusing: {hazard}; exiting with status {REFUSED_EXIT_CODE}")
        return REFUSED_EXIT_CODE
    zygote = Zygote(args.socket, args.model, bool(args.load_weights))
    zygote.listen()
    _progress(f"ready in {time.monotonic() - t0:.1f}s on {args.socket} (pid {os.getpid()}"
              + (", weights loaded" if args.load_weights else "") + ")")
    return zygote.run()


if __name__ == "__main__":
    sys.exit(main())
