"""``unbroken up``: the whole local stack in one command, and :class:`Stack`, the same as a class.

Starts, in order: the tiny model at ``replicas.model_path`` when that directory is missing, the
zygote (``replicas.zygote``: ``python -m replica.zygote``, which forks the replicas once it has
imported torch and read the checkpoint; docs/supervisor.md), a redis-server of its own on a free
port (unless ``redis.url`` is set), N replicas on free ports
(each with a kvsync sidecar when the kvsync package exists and ``kvsync.enabled``), optionally a
fault proxy in front of each replica, then the gateway pointed at the replicas (or their proxies).
It waits until every replica answers ``/health`` and the gateway ``/readyz``, prints the URL and a
curl example, and on Ctrl-C / SIGTERM stops everything it started, by pid: gateway, replicas and
sidecars first, then the zygote, Redis last. Every process logs to ``<run_dir>/<name>.log``.

Secure by default (``security.auth``): on first run it makes an API key, an admin key, a replica
token, a sidecar token, a kvsync HMAC secret, a session secret and a Redis password
(:mod:`unbroken.credentials`; files of mode 0600 in ``security.secrets_dir``), prints them once,
and turns auth on everywhere. They reach the children through ``UNBROKEN_<PROCESS>__<SECTION>__<FIELD>``
environment variables and Redis's password through a config file, never argv; ``stack.json`` and the
logs carry no secret (Redis URLs are redacted).

The chaos tests and ``python -m loadtest.chaos`` use :class:`Stack` directly, so the fault
injector can reach each process (:attr:`Stack.replicas`, :attr:`Stack.gateway`, ...).
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import shutil
import signal
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Protocol

from pydantic import Field

from unbroken.config import ConfigError, Section, load_config
from unbroken.credentials import StackSecrets, load_or_create, redact_url, write_private_file
from unbroken.procs import ManagedProcess, free_port, http_ok, python_module_cmd, start_redis
from unbroken.supervisor.policy import SupervisorSection
from unbroken.zygote import REFUSED_EXIT_CODE, ForkedProcess, ZygoteUnavailable, ping


class ReplicaProxy(Protocol):
    """A TCP proxy in front of one replica (``loadtest.faultproxy.FaultProxy``): what the launcher
    needs of it. The launcher does not import loadtest; whoever wants proxies passes a factory."""

    @property
    def url(self) -> str: ...

    def stop(self) -> None: ...


# (replica port, proxy name) -> a started proxy
ProxyFactory = Callable[[int, str], ReplicaProxy]


if TYPE_CHECKING:
    from unbroken.supervisor.runner import Supervisor

ENV_PREFIX = "UNBROKEN_STACK"
LOOPBACK = "127.0.0.1"


class RedisSection(Section):
    url: str = Field("", description="Use this Redis; empty = start a redis-server of our own on a free port.")


class ReplicasSection(Section):
    count: int = Field(2, ge=1, le=64, description="Replicas to start (in rotation).")
    standby: int = Field(0, ge=0, le=64, description="Warm standby replicas, loaded and heartbeating but out "
                                                     "of rotation until the gateway promotes one in place of "
                                                     "a failed replica.")
    model_path: str = Field("models/tiny-qwen", description="Checkpoint directory; the tiny model is written "
                                                            "there when it is missing.")
    config_path: str = Field("", description="Replica YAML passed as --config (empty = the replica's defaults).")
    quantization: str = Field("nf4", description="nf4 | none.")
    shared_token: str = Field("", description="Gateway<->replica token (empty = the generated one when "
                                              "security.auth, else none); given to both by environment.")
    announce_in_redis: bool = Field(False, description="Also announce replicas in the Redis registry "
                                                       "(--registry-redis-url); the gateway gets static URLs either way.")
    ready_timeout_s: float = Field(240.0, gt=0, description="Longest wait for a replica's /health.")
    num_threads: int = Field(1, ge=0, description="torch CPU threads per replica (0 = torch's default).")
    env: dict[str, str] = Field(default_factory=dict, description="Extra environment for every replica "
                                                                  "(e.g. UNBROKEN_REPLICA__ENGINE__MAX_NUM_SEQS).")
    zygote: bool = Field(True, description="Start replicas by forking them from a zygote (python -m replica.zygote: "
                                           "imports done and the checkpoint in the page cache), supervised like the "
                                           "rest; a start falls back to a plain one while it is not ready or when it "
                                           "refuses (docs/supervisor.md). unbroken up --no-zygote = off.")
    zygote_load_weights: bool = Field(False, description="The zygote also loads the model and the replicas "
                                                         "inherit it copy-on-write (CPU only; the zygote holds a "
                                                         "copy of the model while it runs).")
    zygote_ready_timeout_s: float = Field(60.0, gt=0, description="Longest wait at start for the zygote to be "
                                                                  "ready before the replicas start plainly.")


class KVSyncSection(Section):
    enabled: bool = Field(True, description="Start a kvsync sidecar per replica (when the package exists).")
    config_path: str = Field("", description="kvsync YAML passed as --config (empty = defaults).")
    ready_timeout_s: float = Field(30.0, gt=0, description="Longest wait for a sidecar's /health.")


class GatewaySection(Section):
    port: int = Field(8000, ge=0, le=65535, description="Gateway port (0 = a free port).")
    config_path: str = Field("", description="Gateway YAML passed as --config (empty = defaults).")
    workers: int = Field(1, ge=1, description="Worker processes of each gateway (one port, SO_REUSEPORT).")
    count: int = Field(1, ge=1, le=16, description="Independent gateway processes sharing Redis, each its own "
                                                   "process on its own port (port, port+1, ...; free ports when "
                                                   "port is 0): a client lists them all (unbroken.client).")
    ready_timeout_s: float = Field(60.0, gt=0, description="Longest wait for the gateway's /readyz.")
    env: dict[str, str] = Field(default_factory=dict, description="Extra environment for the gateway.")


class FaultProxySection(Section):
    enabled: bool = Field(False, description="Put a fault proxy (loadtest.faultproxy) in front of each "
                                             "replica and give the gateway the proxy's URL.")


class SecuritySection(Section):
    auth: bool = Field(True, description="Make (on first run) and use an API key, an admin key, a replica token, a "
                                         "sidecar token, a kvsync HMAC secret, a session secret and a Redis "
                                         "password, and turn auth on. Off: no auth anywhere, every caller shares "
                                         "one trust domain (loopback only).")
    secrets_dir: str = Field("", description="Where the secrets are kept (mode 0600 files); empty = "
                                             "<run_dir>/secrets when the run directory is given, else "
                                             "<runs_dir>/secrets, so that every `unbroken up` reuses them.")


class RunSection(Section):
    runs_dir: str = Field("runs", description="Run directories (logs, stack.json) are made under this folder.")
    stop_timeout_s: float = Field(15.0, gt=0, description="SIGTERM grace per process before SIGKILL.")


class StackConfig(Section):
    """``configs/stack.yaml``; env overrides ``UNBROKEN_STACK__SECTION__FIELD``."""

    redis: RedisSection = Field(default_factory=RedisSection)
    replicas: ReplicasSection = Field(default_factory=ReplicasSection)
    kvsync: KVSyncSection = Field(default_factory=KVSyncSection)
    gateway: GatewaySection = Field(default_factory=GatewaySection)
    fault_proxy: FaultProxySection = Field(default_factory=FaultProxySection)
    security: SecuritySection = Field(default_factory=SecuritySection)
    supervisor: SupervisorSection = Field(default_factory=SupervisorSection)
    run: RunSection = Field(default_factory=RunSection)


@dataclass
class ReplicaHandle:
    """One replica, its sidecar and (optionally) the fault proxy the gateway reaches it through."""

    index: int
    replica_id: str
    port: int
    process: ManagedProcess
    kvsync: ManagedProcess | None = None
    kvsync_port: int = 0
    proxy: Any = None  # a ReplicaProxy (loadtest's FaultProxy, with its fault controls) or None
    standby: bool = False
    model_path_override: str = ""  # a fault (crash_loop) points a restart at a bad checkpoint

    @property
    def direct_url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    @property
    def url(self) -> str:
        """The URL the gateway uses: the proxy's when there is one."""
        return self.proxy.url if self.proxy is not None else self.direct_url


def _env_str(value: str) -> str:
    """A string for an env override (whose value is parsed as YAML): quoted, so it stays a string."""
    return json.dumps(value)


def kvsync_available() -> bool:
    """Whether ``python -m kvsync`` can run here (installed, or in the working directory)."""
    try:
        return importlib.util.find_spec("kvsync.__main__") is not None
    except ImportError:
        return (Path.cwd() / "kvsync" / "__main__.py").is_file()


class Stack:
    """The local stack: Redis, replicas (+ sidecars, + proxies), gateway. Every process is ours."""

    def __init__(self, config: StackConfig | None = None, *, run_dir: str | Path | None = None,
                 progress=print, proxy_factory: ProxyFactory | None = None) -> None:  # type: ignore[no-untyped-def]
        self.config = config or StackConfig()
        self.proxy_factory = proxy_factory  # needed when fault_proxy.enabled
        if self.config.fault_proxy.enabled and proxy_factory is None:
            raise ConfigError("fault_proxy.enabled needs a proxy factory (loadtest.faultproxy.start_fault_proxy); "
                              "'unbroken up --fault-proxies' and loadtest.chaos pass one")
        stamp = time.strftime("%Y%m%d-%H%M%S")
        self.run_dir = Path(run_dir) if run_dir else Path(self.config.run.runs_dir) / f"stack-{stamp}"
        sec = self.config.security
        self.secrets_dir = Path(sec.secrets_dir) if sec.secrets_dir else (
            self.run_dir / "secrets" if run_dir else Path(self.config.run.runs_dir) / "secrets")
        self.secrets: StackSecrets | None = None
        self.secrets_created: list[str] = []  # the names made by this start (printed once by `unbroken up`)
        self._redis_conf: Path | None = None
        self.progress = progress
        self.redis: ManagedProcess | None = None
        self.redis_url = self.config.redis.url
        self.redis_port = 0
        self.replicas: list[ReplicaHandle] = []
        self.gateway: ManagedProcess | None = None  # the first of ``gateways``
        self.gateway_port = 0
        self.supervisor: "Supervisor | None" = None
        self.gateways: list[ManagedProcess] = []
        self.gateway_ports: list[int] = []
        self.zygote: ManagedProcess | None = None
        self.zygote_socket: Path | None = None
        self._zygote_dir: Path | None = None
        self.replica_starts: list[tuple[str, str, str]] = []  # (replica, "zygote" | "plain", why plain)
        self._lock = threading.RLock()

    # -- properties ------------------------------------------------------------------------------

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.gateway_port}"

    @property
    def api_key(self) -> str:
        """The key clients send (``Authorization: Bearer ...``); empty when security.auth is off."""
        return self.secrets.api_key if self.secrets else ""

    @property
    def admin_key(self) -> str:
        """The key for ``/admin/*``; empty when security.auth is off."""
        return self.secrets.admin_key if self.secrets else ""

    @property
    def replica_token(self) -> str:
        """The gateway's token for the replicas (empty = none)."""
        return self.config.replicas.shared_token or (self.secrets.replica_token if self.secrets else "")

    def auth_headers(self, admin: bool = False) -> dict[str, str]:
        key = self.admin_key if admin else self.api_key
        return {"Authorization": f"Bearer {key}"} if key else {}

    @property
    def urls(self) -> list[str]:
        """Every gateway's URL (``--gateways N``)."""
        return [f"http://{LOOPBACK}:{p}" for p in self.gateway_ports] or [self.url]

    @property
    def model_path(self) -> Path:
        return Path(self.config.replicas.model_path)

    def processes(self) -> list[ManagedProcess]:
        """Every process this stack started (alive or not)."""
        procs: list[ManagedProcess] = list(self.gateways)
        if self.gateway is not None and self.gateway not in procs:
            procs.append(self.gateway)
        for r in self.replicas:
            procs.append(r.process)
            if r.kvsync is not None:
                procs.append(r.kvsync)
        if self.zygote is not None:
            procs.append(self.zygote)
        if self.redis is not None:
            procs.append(self.redis)
        return procs

    def owned_pids(self) -> set[int]:
        return {p.pid for p in self.processes() if p.proc is not None}

    def replica(self, which: int | str) -> ReplicaHandle:
        """A replica by index or id."""
        for r in self.replicas:
            if r.index == which or r.replica_id == which:
                return r
        raise KeyError(f"no replica {which!r} in this stack (have {[r.replica_id for r in self.replicas]})")

    # -- start / stop ----------------------------------------------------------------------------

    def start(self) -> "Stack":
        """Start everything and wait until it is ready; on failure stop what was started."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        try:
            self.load_secrets()
            self._ensure_model()
            if self.config.replicas.zygote:
                self._start_zygote()
            self._start_redis()
            if self.zygote is not None:
                self.wait_zygote(self.config.replicas.zygote_ready_timeout_s)
            for i in range(self.config.replicas.count + self.config.replicas.standby):
                self._start_replica(i).standby = i >= self.config.replicas.count
            for r in self.replicas:
                self._wait_replica(r)
            self._start_gateway()
            self.write_manifest()
            if self.config.supervisor.enabled:
                from unbroken.supervisor.stack import supervise_stack

                self.supervisor = supervise_stack(self, on_event=lambda ev: self.progress(
                    f"supervisor {ev.program} {ev.kind}: {ev.detail}"))
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Stop by pid: gateway, replicas and sidecars, proxies, then Redis."""
        timeout_s = self.config.run.stop_timeout_s
        if self.supervisor is not None:
            self.supervisor.stop()
        for g in self.gateways:
            g.stop(timeout_s)
        if self.gateway is not None and self.gateway not in self.gateways:
            self.gateway.stop(timeout_s)
        for r in self.replicas:
            r.process.stop(timeout_s)
        for r in self.replicas:
            if r.kvsync is not None:
                r.kvsync.stop(timeout_s)
            if r.proxy is not None:
                r.proxy.stop()
        if self.zygote is not None:  # after the replicas: it is the parent of those it forked
            self.zygote.stop(timeout_s)
        if self._zygote_dir is not None:
            shutil.rmtree(self._zygote_dir, ignore_errors=True)
        if self.redis is not None:
            self.redis.stop(timeout_s)

    def __enter__(self) -> "Stack":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def load_secrets(self) -> StackSecrets | None:
        """Read (or make, on first use) the stack's secrets when security.auth is on."""
        if self.config.security.auth and self.secrets is None:
            self.secrets, self.secrets_created = load_or_create(self.secrets_dir)
        return self.secrets

    def write_manifest(self) -> Path:
        """``<run_dir>/stack.json``: URLs, ports and pids, for tools and for the operator (no secret)."""
        data: dict[str, Any] = {
            "gateway_url": self.url,
            "gateway_pid": self.gateway.pid if self.gateway and self.gateway.proc else None,
            "redis_url": redact_url(self.redis_url),
            "auth": self.secrets is not None,
            "secrets_dir": str(self.secrets_dir) if self.secrets is not None else None,
            "gateway_urls": self.urls,
            "gateway_pids": [g.pid if g.proc else None for g in self.gateways],
            "redis_pid": self.redis.pid if self.redis and self.redis.proc else None,
            "zygote_pid": self.zygote.pid if self.zygote and self.zygote.proc else None,
            "replicas": [
                {"replica_id": r.replica_id, "url": r.direct_url, "gateway_url": r.url,
                 "pid": r.process.pid if r.process.proc else None, "standby": r.standby,
                 "kvsync_port": r.kvsync_port or None,
                 "kvsync_pid": r.kvsync.pid if r.kvsync and r.kvsync.proc else None}
                for r in self.replicas
            ],
        }
        path = self.run_dir / "stack.json"
        path.write_text(json.dumps(data, indent=2))
        return path

    # -- pieces ----------------------------------------------------------------------------------

    def _log(self, name: str) -> Path:
        return self.run_dir / f"{name}.log"

    def _start_redis(self) -> None:
        if self.redis_url:
            return
        password = self.secrets.redis_password if self.secrets else ""
        if password:  # requirepass goes in a private config file: never on redis-server's command line
            self._redis_conf = write_private_file(self.secrets_dir / "redis.conf", f"requirepass {password}\n")
        self.redis, self.redis_url = start_redis(port=self.redis_port or None, log_path=self._log("redis"),
                                                 config_file=self._redis_conf, password=password)
        self.redis_port = int(self.redis_url.rsplit(":", 1)[1].split("/")[0])
        self.progress(f"redis      {redact_url(self.redis_url)} (pid {self.redis.pid})")

    def restart_redis(self) -> None:
        """Start our redis-server again on the same port (after a kill)."""
        if self.redis is None:
            raise RuntimeError("this stack does not own its Redis")
        if self.redis.alive():
            self.redis.stop()
        self.redis, _ = start_redis(port=self.redis_port, log_path=self._log("redis"), config_file=self._redis_conf,
                                    password=self.secrets.redis_password if self._redis_conf and self.secrets else "")

    def _ensure_model(self) -> None:
        if (self.model_path / "config.json").is_file():
            return
        from unbroken.tinymodel import write_tiny_model

        self.progress(f"model      writing the tiny model to {self.model_path}")
        write_tiny_model(self.model_path, shape="tiny", seed=0)

    def _replica_process(self, index: int, replica_id: str, port: int, kvsync_port: int,
                         advertise_url: str) -> ManagedProcess:
        cfg = self.config.replicas
        handle = next((r for r in self.replicas if r.replica_id == replica_id), None)
        model = handle.model_path_override if handle is not None and handle.model_path_override else self.model_path
        args = ["--model", str(model), "--port", str(port), "--host", LOOPBACK,
                "--replica-id", replica_id, "--quantization", cfg.quantization]
        if cfg.config_path:
            args += ["--config", cfg.config_path]
        env = dict(cfg.env)
        env.update(self._replica_secret_env())
        if cfg.num_threads:
            env.setdefault("UNBROKEN_REPLICA__MODEL__NUM_THREADS", str(cfg.num_threads))
            env.setdefault("OMP_NUM_THREADS", str(cfg.num_threads))
        if kvsync_port:
            args += ["--kvsync-url", f"http://{LOOPBACK}:{kvsync_port}"]
        if cfg.announce_in_redis and self.redis_url:
            env["UNBROKEN_REPLICA__REGISTRY__REDIS_URL"] = _env_str(self.redis_url)
            env.setdefault("UNBROKEN_REPLICA__REGISTRY__ADVERTISE_URL", advertise_url)
        zygote_ok = self.zygote is not None and self.zygote.alive()
        return ForkedProcess(
            replica_id, python_module_cmd("replica", *args), child_argv=args,
            zygote_socket=self.zygote_socket if zygote_ok else None, log_path=self._log(replica_id), env=env,
            ready_url=f"http://{LOOPBACK}:{port}/health",
        )

    def _launch_replica(self, proc: ForkedProcess) -> ForkedProcess:
        """Start a replica (forked by the zygote, or plainly) and note which way it went."""
        proc.start()
        why = proc.fallback_reason if self.config.replicas.zygote else "zygote off"
        self.replica_starts.append((proc.name, proc.started_via, "" if proc.started_via == "zygote" else why))
        if proc.started_via != "zygote" and self.config.replicas.zygote:
            self.progress(f"replica    {proc.name} started plainly (zygote: {why})")
        return proc

    # -- the zygote ------------------------------------------------------------------------------

    def _zygote_process(self) -> ManagedProcess:
        cfg = self.config.replicas
        if self._zygote_dir is None:  # a short private path: a unix socket's path has at most 107 bytes
            self._zygote_dir = Path(tempfile.mkdtemp(prefix="unbroken-zygote-"))
            self.zygote_socket = self._zygote_dir / "zygote.sock"
        args = ["--socket", str(self.zygote_socket), "--model", str(self.model_path),
                "--quantization", cfg.quantization]
        if cfg.zygote_load_weights:
            args.append("--load-weights")
        if cfg.config_path:
            args += ["--config", cfg.config_path]
        env = dict(cfg.env)  # what the replicas see, less their secrets (the zygote needs none)
        if cfg.num_threads:
            env.setdefault("UNBROKEN_REPLICA__MODEL__NUM_THREADS", str(cfg.num_threads))
        # (the zygote itself runs with one thread whatever OMP_NUM_THREADS says; each child sets its own)
        return ManagedProcess("zygote", python_module_cmd("replica.zygote", *args), log_path=self._log("zygote"),
                              env=env)

    def _start_zygote(self) -> None:
        self.zygote = self._zygote_process().start()
        self.progress(f"zygote     {self.zygote_socket} (pid {self.zygote.pid})")

    def restart_zygote(self) -> None:
        """Start the zygote again (after it exited); replicas start plainly until it is ready."""
        with self._lock:
            if self.zygote is not None and self.zygote.alive():
                self.zygote.stop(self.config.run.stop_timeout_s)
            self._start_zygote()

    @property
    def zygote_refused(self) -> bool:
        """The zygote exited with status 3: forks cannot be safe here (CUDA, threads)."""
        z = self.zygote
        return z is not None and z.proc is not None and z.proc.poll() == REFUSED_EXIT_CODE

    def zygote_ready(self) -> bool:
        if self.zygote is None or self.zygote_socket is None or not self.zygote.alive():
            return False
        try:
            ping(self.zygote_socket)
            return True
        except ZygoteUnavailable:
            return False

    def wait_zygote(self, timeout_s: float) -> bool:
        """Wait until the zygote answers (or exits, or ``timeout_s``); False: replicas start plainly."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.zygote_ready():
                return True
            if self.zygote is None or not self.zygote.alive():
                code = self.zygote.proc.returncode if self.zygote and self.zygote.proc else None
                what = "refused to fork (status 3)" if code == REFUSED_EXIT_CODE else f"exited with {code}"
                self.progress(f"zygote     {what}; replicas start plainly (see {self._log('zygote')})")
                return False
            time.sleep(0.05)
        self.progress(f"zygote     not ready after {timeout_s:.0f}s; replicas start plainly")
        return False

    def _replica_secret_env(self) -> dict[str, str]:
        env: dict[str, str] = {}
        if self.replica_token:
            env["UNBROKEN_REPLICA__SERVER__SHARED_TOKEN"] = _env_str(self.replica_token)
        if self.secrets is not None:
            env["UNBROKEN_REPLICA__KVSYNC__TOKEN"] = _env_str(self.secrets.sidecar_token)
        return env

    def _kvsync_env(self) -> dict[str, str]:
        env = {"UNBROKEN_KVSYNC__REDIS__URL": _env_str(self.redis_url)}
        if self.secrets is not None:
            env["UNBROKEN_KVSYNC__AUTH__TOKEN"] = _env_str(self.secrets.sidecar_token)
            env["UNBROKEN_KVSYNC__AUTH__MAC_SECRET"] = _env_str(self.secrets.kvsync_hmac_secret)
        return env

    def _start_replica(self, index: int) -> ReplicaHandle:
        replica_id = f"r{index}"
        handle = ReplicaHandle(index=index, replica_id=replica_id, port=free_port(),
                               process=ManagedProcess(replica_id, []))
        self.replicas.append(handle)  # registered first, so stop() ends whatever starts below
        if self.config.kvsync.enabled and kvsync_available():
            handle.kvsync_port = free_port()
            kargs = ["--port", str(handle.kvsync_port)]
            if self.config.kvsync.config_path:
                kargs += ["--config", self.config.kvsync.config_path]
            handle.kvsync = ManagedProcess(
                f"kvsync-{replica_id}", python_module_cmd("kvsync", *kargs),
                log_path=self._log(f"kvsync-{replica_id}"), env=self._kvsync_env(),
                ready_url=f"http://{LOOPBACK}:{handle.kvsync_port}/health",
            ).start()
        if self.config.fault_proxy.enabled:
            assert self.proxy_factory is not None
            handle.proxy = self.proxy_factory(handle.port, f"proxy-{replica_id}")
        handle.process = self._launch_replica(self._replica_process(index, replica_id, handle.port,
                                                                    handle.kvsync_port, handle.url))
        self.progress(f"replica    {replica_id} {handle.direct_url} (pid {handle.process.pid})"
                      + (f" via proxy {handle.proxy.url}" if handle.proxy else "")
                      + (f", kvsync :{handle.kvsync_port} (pid {handle.kvsync.pid})" if handle.kvsync else ""))
        return handle

    def _wait_replica(self, r: ReplicaHandle) -> None:
        if r.kvsync is not None:
            r.kvsync.wait_ready(self.config.kvsync.ready_timeout_s)
        r.process.wait_ready(self.config.replicas.ready_timeout_s)

    def restart_replica(self, which: int | str, wait: bool = True) -> ReplicaHandle:
        """Start a replica again on the same port (after a kill or stop); the sidecar is kept."""
        with self._lock:
            r = self.replica(which)
            if r.process.alive():
                r.process.stop(self.config.run.stop_timeout_s)
            r.process = self._launch_replica(self._replica_process(r.index, r.replica_id, r.port, r.kvsync_port,
                                                                   r.url))
            self.restart_kvsync(r.replica_id)
        if wait:
            self._wait_replica(r)
        return r

    def restart_kvsync(self, which: int | str) -> None:
        """Start a replica's sidecar again on its port when it is not running."""
        with self._lock:
            r = self.replica(which)
            if r.kvsync is not None and not r.kvsync.alive():
                r.kvsync = ManagedProcess(r.kvsync.name, r.kvsync.cmd, log_path=r.kvsync.log_path,
                                          env=self._kvsync_env(), ready_url=r.kvsync.ready_url).start()

    def _gateway_process(self, index: int = 0) -> ManagedProcess:
        cfg = self.config.gateway
        port = self.gateway_ports[index] if self.gateway_ports else self.gateway_port
        args = ["--port", str(port), "--host", LOOPBACK, "--workers", str(cfg.workers)]
        for r in self.replicas:
            args += ["--standby-replica" if r.standby else "--replica", r.url]
        if cfg.config_path:
            args += ["--config", cfg.config_path]
        env = dict(cfg.env)
        env["UNBROKEN_GATEWAY__REDIS__URL"] = _env_str(self.redis_url)
        if self.replica_token:
            env["UNBROKEN_GATEWAY__REPLICAS__SHARED_TOKEN"] = _env_str(self.replica_token)
        if self.secrets is not None:
            keys = [{"name": "default", "sha256": hashlib.sha256(self.secrets.api_key.encode()).hexdigest(),
                     "allow_critical": True}]
            env.update({
                "UNBROKEN_GATEWAY__AUTH__ENABLED": "true",
                "UNBROKEN_GATEWAY__AUTH__API_KEYS": json.dumps(keys),
                "UNBROKEN_GATEWAY__AUTH__ADMIN_KEY_SHA256": _env_str(
                    hashlib.sha256(self.secrets.admin_key.encode()).hexdigest()),
                "UNBROKEN_GATEWAY__AUTH__SESSION_SECRET": _env_str(self.secrets.session_secret),
            })
        name = "gateway" if index == 0 else f"gateway-{index}"
        return ManagedProcess(name, python_module_cmd("gateway", *args), log_path=self._log(name),
                              env=env, ready_url=f"http://{LOOPBACK}:{port}/readyz")

    def _start_gateway(self) -> None:
        base = self.gateway_port or self.config.gateway.port
        if not self.gateway_ports:
            self.gateway_ports = [base + i if base else free_port() for i in range(self.config.gateway.count)]
        self.gateway_port = self.gateway_ports[0]
        self.gateways = [self._gateway_process(i).start() for i in range(len(self.gateway_ports))]
        self.gateway = self.gateways[0]
        for g, url in zip(self.gateways, self.urls):
            g.wait_ready(self.config.gateway.ready_timeout_s)
            self.progress(f"gateway    {url} (pid {g.pid})")

    def restart_gateway(self, wait: bool = True, index: int = 0) -> None:
        """SIGTERM gateway ``index`` (it drains), then start it again on the same port."""
        if index < len(self.gateways):
            self.gateways[index].stop(self.config.run.stop_timeout_s)
        elif self.gateway is not None:
            self.gateway.stop(self.config.run.stop_timeout_s)
        proc = self._gateway_process(index).start()
        if index < len(self.gateways):
            self.gateways[index] = proc
        if index == 0:
            self.gateway = proc
        if wait:
            proc.wait_ready(self.config.gateway.ready_timeout_s)

    def all_healthy(self) -> bool:
        ok = all(http_ok(r.direct_url + "/health") for r in self.replicas)
        return ok and http_ok(self.url + "/readyz")


def _ready_text(stack: Stack) -> str:
    """What `unbroken up` prints when ready: the URL, how to call it, and (once) the new secrets."""
    lines = [f"\nready: {stack.url}"]
    auth = ""
    if stack.secrets is not None:
        key_file = stack.secrets_dir / "api_key"
        auth = f" -H \"Authorization: Bearer $(cat {key_file})\""
        if stack.secrets_created:
            lines += [f"secrets made now, kept (mode 0600) in {stack.secrets_dir}/; shown this once:",
                      f"  API key    {stack.secrets.api_key}   (clients: Authorization: Bearer KEY, "
                      "or OPENAI_API_KEY for the openai SDK)",
                      f"  admin key  {stack.secrets.admin_key}   (/admin/*)",
                      "  replica token, sidecar token, kvsync HMAC secret, session secret, Redis password: "
                      "in the files there (the stack passes them to its processes)"]
        else:
            lines.append(f"auth on; keys in {stack.secrets_dir}/ (api_key, admin_key, ...)")
    else:
        lines.append("auth OFF (security.auth: false): every caller shares one trust domain")
    lines += [f"  curl -s {stack.url}/v1/chat/completions -H 'Content-Type: application/json'{auth} \\",
              "    -d '{\"model\": \"qwen\", \"messages\": [{\"role\": \"user\", \"content\": \"Hello\"}], "
              "\"max_tokens\": 16}'",
              "Ctrl-C stops everything."]
    return "\n".join(lines)


def load_stack_config(path: str | None, overrides: dict[str, Any] | None = None) -> StackConfig:
    if path is None and Path("configs/stack.yaml").is_file():
        path = "configs/stack.yaml"
    return load_config(StackConfig, path, env_prefix=ENV_PREFIX, overrides=overrides)


def main(argv: list[str] | None = None, proxy_factory: ProxyFactory | None = None) -> int:
    """``unbroken up``; ``proxy_factory`` serves ``--fault-proxies`` (the CLI passes loadtest's)."""
    parser = argparse.ArgumentParser(prog="unbroken up", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", help="stack YAML (default: configs/stack.yaml when present)")
    parser.add_argument("--replicas", type=int, help="number of replicas")
    parser.add_argument("--port", type=int, help="gateway port (the first, with --gateways)")
    parser.add_argument("--gateways", type=int, help="independent gateway processes sharing Redis, on ports "
                                                     "port, port+1, ...")
    parser.add_argument("--model", help="checkpoint directory (the tiny model is written there if missing)")
    parser.add_argument("--fault-proxies", action="store_true", default=None,
                        help="put a fault proxy in front of each replica")
    parser.add_argument("--standby", type=int, help="warm standby replicas (out of rotation until promoted)")
    parser.add_argument("--no-supervise", dest="supervise", action="store_false", default=None,
                        help="do not restart replicas that exit or stay unhealthy")
    parser.add_argument("--no-zygote", dest="zygote", action="store_false", default=None,
                        help="start replicas plainly (python -m replica), not forked from a warm zygote")
    parser.add_argument("--supervisor-metrics-port", type=int, default=0,
                        help="serve the supervisor's Prometheus metrics on 127.0.0.1:PORT")
    parser.add_argument("--run-dir", help="logs and stack.json go here (default: runs/stack-TIME)")
    args = parser.parse_args(argv)
    try:
        config = load_stack_config(args.config, {
            "replicas.count": args.replicas, "gateway.port": args.port, "gateway.count": args.gateways,
            "replicas.model_path": args.model, "fault_proxy.enabled": args.fault_proxies,
            "replicas.standby": args.standby, "supervisor.enabled": args.supervise,
            "replicas.zygote": args.zygote,
        })
    except ConfigError as e:
        print(f"unbroken up: {e}", file=sys.stderr)
        return 2
    stop = threading.Event()

    def on_signal(signum: int, _frame: object) -> None:
        stop.set()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    try:
        stack = Stack(config, run_dir=args.run_dir, proxy_factory=proxy_factory)
    except ConfigError as e:
        print(f"unbroken up: {e}", file=sys.stderr)
        return 2
    print(f"logs       {stack.run_dir}")
    try:
        stack.start()
    except (RuntimeError, TimeoutError) as e:
        print(f"unbroken up: the stack did not come up: {e}", file=sys.stderr)
        return 1
    if len(stack.urls) > 1:
        print("gateways   " + " ".join(stack.urls) + "  (clients: unbroken.client.http_client(urls=[...]))")
    print(_ready_text(stack), flush=True)
    if stack.supervisor is not None and args.supervisor_metrics_port:
        from prometheus_client import start_http_server

        start_http_server(args.supervisor_metrics_port, addr=LOOPBACK, registry=stack.supervisor.metrics.registry)
        print(f"supervisor metrics http://{LOOPBACK}:{args.supervisor_metrics_port}/metrics", flush=True)
    try:
        while not stop.wait(1.0):
            if stack.supervisor is not None:
                stack.supervisor.write_status(stack.run_dir / "supervisor.json")
                continue
            for p in stack.processes():
                if p.proc is not None and not p.alive():
                    print(f"warning: {p.name} exited with {p.proc.returncode}; see {p.log_path}",
                          file=sys.stderr)
                    p.proc = None
    finally:
        print("stopping ...", flush=True)
        stack.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
