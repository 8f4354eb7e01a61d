"""``unbroken up``: the whole local stack in one command, and :class:`Stack`, the same as a class.

Starts, in order: a redis-server of its own on a free port (unless ``redis.url`` is set), the
tiny model at ``replicas.model_path`` when that directory is missing, N replicas on free ports
(each with a kvsync sidecar when the kvsync package exists and ``kvsync.enabled``), optionally a
fault proxy in front of each replica, then the gateway pointed at the replicas (or their proxies).
It waits until every replica answers ``/health`` and the gateway ``/readyz``, prints the URL and a
curl example, and on Ctrl-C / SIGTERM stops everything it started, by pid: gateway, replicas and
sidecars first, Redis last. Every process logs to ``<run_dir>/<name>.log``.

The chaos tests and ``python -m loadtest.chaos`` use :class:`Stack` directly, so the fault
injector can reach each process (:attr:`Stack.replicas`, :attr:`Stack.gateway`, ...).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import signal
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Protocol

from pydantic import Field

from unbroken.config import ConfigError, Section, load_config
from unbroken.procs import ManagedProcess, free_port, http_ok, python_module_cmd, start_redis


class ReplicaProxy(Protocol):
    """A TCP proxy in front of one replica (``loadtest.faultproxy.FaultProxy``): what the launcher
    needs of it. The launcher does not import loadtest; whoever wants proxies passes a factory."""

    @property
    def url(self) -> str: ...

    def stop(self) -> None: ...


# (replica port, proxy name) -> a started proxy
ProxyFactory = Callable[[int, str], ReplicaProxy]

ENV_PREFIX = "UNBROKEN_STACK"
LOOPBACK = "127.0.0.1"


class RedisSection(Section):
    url: str = Field("", description="Use this Redis; empty = start a redis-server of our own on a free port.")


class ReplicasSection(Section):
    count: int = Field(2, ge=1, le=64, description="Replicas to start.")
    model_path: str = Field("models/tiny-qwen", description="Checkpoint directory; the tiny model is written "
                                                            "there when it is missing.")
    config_path: str = Field("", description="Replica YAML passed as --config (empty = the replica's defaults).")
    quantization: str = Field("nf4", description="nf4 | none.")
    shared_token: str = Field("", description="Gateway<->replica token passed as --shared-token (empty = none); "
                                              "give the gateway the same token in its own config.")
    announce_in_redis: bool = Field(False, description="Also announce replicas in the Redis registry "
                                                       "(--registry-redis-url); the gateway gets static URLs either way.")
    ready_timeout_s: float = Field(240.0, gt=0, description="Longest wait for a replica's /health.")
    num_threads: int = Field(1, ge=0, description="torch CPU threads per replica (0 = torch's default).")
    env: dict[str, str] = Field(default_factory=dict, description="Extra environment for every replica "
                                                                  "(e.g. UNBROKEN_REPLICA__ENGINE__MAX_NUM_SEQS).")


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

    @property
    def direct_url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    @property
    def url(self) -> str:
        """The URL the gateway uses: the proxy's when there is one."""
        return self.proxy.url if self.proxy is not None else self.direct_url


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
        self.progress = progress
        self.redis: ManagedProcess | None = None
        self.redis_url = self.config.redis.url
        self.redis_port = 0
        self.replicas: list[ReplicaHandle] = []
        self.gateway: ManagedProcess | None = None  # the first of ``gateways``
        self.gateway_port = 0
        self.gateways: list[ManagedProcess] = []
        self.gateway_ports: list[int] = []
        self._lock = threading.Lock()

    # -- properties ------------------------------------------------------------------------------

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.gateway_port}"

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
            self._start_redis()
            self._ensure_model()
            for i in range(self.config.replicas.count):
                self._start_replica(i)
            for r in self.replicas:
                self._wait_replica(r)
            self._start_gateway()
            self.write_manifest()
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Stop by pid: gateway, replicas and sidecars, proxies, then Redis."""
        timeout_s = self.config.run.stop_timeout_s
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
        if self.redis is not None:
            self.redis.stop(timeout_s)

    def __enter__(self) -> "Stack":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def write_manifest(self) -> Path:
        """``<run_dir>/stack.json``: URLs, ports and pids, for tools and for the operator."""
        data: dict[str, Any] = {
            "gateway_url": self.url,
            "gateway_pid": self.gateway.pid if self.gateway and self.gateway.proc else None,
            "gateway_urls": self.urls,
            "gateway_pids": [g.pid if g.proc else None for g in self.gateways],
            "redis_url": self.redis_url,
            "redis_pid": self.redis.pid if self.redis and self.redis.proc else None,
            "replicas": [
                {"replica_id": r.replica_id, "url": r.direct_url, "gateway_url": r.url,
                 "pid": r.process.pid if r.process.proc else None,
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
        self.redis, self.redis_url = start_redis(port=self.redis_port or None, log_path=self._log("redis"))
        self.redis_port = int(self.redis_url.rsplit(":", 1)[1].split("/")[0])
        self.progress(f"redis      {self.redis_url} (pid {self.redis.pid})")

    def restart_redis(self) -> None:
        """Start our redis-server again on the same port (after a kill)."""
        if self.redis is None:
            raise RuntimeError("this stack does not own its Redis")
        if self.redis.alive():
            self.redis.stop()
        self.redis, _ = start_redis(port=self.redis_port, log_path=self._log("redis"))

    def _ensure_model(self) -> None:
        if (self.model_path / "config.json").is_file():
            return
        from unbroken.tinymodel import write_tiny_model

        self.progress(f"model      writing the tiny model to {self.model_path}")
        write_tiny_model(self.model_path, shape="tiny", seed=0)

    def _replica_process(self, index: int, replica_id: str, port: int, kvsync_port: int,
                         advertise_url: str) -> ManagedProcess:
        cfg = self.config.replicas
        args = ["--model", str(self.model_path), "--port", str(port), "--host", LOOPBACK,
                "--replica-id", replica_id, "--quantization", cfg.quantization]
        if cfg.config_path:
            args += ["--config", cfg.config_path]
        if cfg.shared_token:
            args += ["--shared-token", cfg.shared_token]
        env = dict(cfg.env)
        if cfg.num_threads:
            env.setdefault("UNBROKEN_REPLICA__MODEL__NUM_THREADS", str(cfg.num_threads))
            env.setdefault("OMP_NUM_THREADS", str(cfg.num_threads))
        if kvsync_port:
            args += ["--kvsync-url", f"http://{LOOPBACK}:{kvsync_port}"]
        if cfg.announce_in_redis and self.redis_url:
            args += ["--registry-redis-url", self.redis_url]
            env.setdefault("UNBROKEN_REPLICA__REGISTRY__ADVERTISE_URL", advertise_url)
        return ManagedProcess(
            replica_id, python_module_cmd("replica", *args), log_path=self._log(replica_id), env=env,
            ready_url=f"http://{LOOPBACK}:{port}/health",
        )

    def _start_replica(self, index: int) -> ReplicaHandle:
        replica_id = f"r{index}"
        handle = ReplicaHandle(index=index, replica_id=replica_id, port=free_port(),
                               process=ManagedProcess(replica_id, []))
        self.replicas.append(handle)  # registered first, so stop() ends whatever starts below
        if self.config.kvsync.enabled and kvsync_available():
            handle.kvsync_port = free_port()
            kargs = ["--port", str(handle.kvsync_port), "--redis-url", self.redis_url]
            if self.config.kvsync.config_path:
                kargs += ["--config", self.config.kvsync.config_path]
            handle.kvsync = ManagedProcess(
                f"kvsync-{replica_id}", python_module_cmd("kvsync", *kargs),
                log_path=self._log(f"kvsync-{replica_id}"),
                ready_url=f"http://{LOOPBACK}:{handle.kvsync_port}/health",
            ).start()
        if self.config.fault_proxy.enabled:
            assert self.proxy_factory is not None
            handle.proxy = self.proxy_factory(handle.port, f"proxy-{replica_id}")
        handle.process = self._replica_process(index, replica_id, handle.port, handle.kvsync_port,
                                               handle.url).start()
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
        r = self.replica(which)
        if r.process.alive():
            r.process.stop(self.config.run.stop_timeout_s)
        r.process = self._replica_process(r.index, r.replica_id, r.port, r.kvsync_port, r.url).start()
        if r.kvsync is not None and not r.kvsync.alive():
            r.kvsync = ManagedProcess(r.kvsync.name, r.kvsync.cmd, log_path=r.kvsync.log_path,
                                      ready_url=r.kvsync.ready_url).start()
        if wait:
            self._wait_replica(r)
        return r

    def _gateway_process(self, index: int = 0) -> ManagedProcess:
        cfg = self.config.gateway
        port = self.gateway_ports[index] if self.gateway_ports else self.gateway_port
        args = ["--port", str(port), "--host", LOOPBACK, "--redis-url", self.redis_url,
                "--workers", str(cfg.workers)]
        for r in self.replicas:
            args += ["--replica", r.url]
        if cfg.config_path:
            args += ["--config", cfg.config_path]
        env = dict(cfg.env)
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
    parser.add_argument("--run-dir", help="logs and stack.json go here (default: runs/stack-TIME)")
    args = parser.parse_args(argv)
    try:
        config = load_stack_config(args.config, {
            "replicas.count": args.replicas, "gateway.port": args.port, "gateway.count": args.gateways,
            "replicas.model_path": args.model, "fault_proxy.enabled": args.fault_proxies,
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
    print(f"\nready: {stack.url}\n"
          f"  curl -s {stack.url}/v1/chat/completions -H 'Content-Type: application/json' \\\n"
          f"    -d '{{\"model\": \"qwen\", \"messages\": [{{\"role\": \"user\", \"content\": \"Hello\"}}], "
          f"\"max_tokens\": 16}}'\n"
          f"Ctrl-C stops everything.", flush=True)
    try:
        while not stop.wait(1.0):
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
