"""``unbroken supervise --config FILE``: keep a list of processes alive, without Kubernetes.

The YAML::

    supervisor:            # SupervisorSection: backoff, crash loop, health judgement
      crash_loop_failures: 5
    metrics_port: 9109     # Prometheus metrics on 127.0.0.1 (0 = none)
    status_path: supervisor.json
    programs:
      - name: r0
        command: [python, -m, replica, --model, models/tiny-qwen, --port, "8101"]
        health_url: http://127.0.0.1:8101/health
        env: {OMP_NUM_THREADS: "1"}
        log_path: logs/r0.log

Every program is started at once, then supervised; SIGINT / SIGTERM stops them all, by pid.
Secrets belong in ``env`` (inherited by the child), never in ``command``.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading

from pydantic import Field, field_validator

from unbroken.config import ConfigError, Section, load_config
from unbroken.supervisor.policy import SupervisorSection
from unbroken.supervisor.runner import CommandTarget, Supervisor

ENV_PREFIX = "UNBROKEN_SUPERVISE"


class ProgramSection(Section):
    name: str = Field(..., description="Unique name (logs, metrics labels).")
    command: list[str] = Field(..., min_length=1, description="argv of the program.")
    health_url: str = Field("", description="Polled for 2xx; empty = alive is healthy.")
    env: dict[str, str] = Field(default_factory=dict, description="Extra environment.")
    log_path: str = Field("", description="stdout and stderr go here (appended); empty = discarded.")
    cwd: str = Field("", description="Working directory (empty = ours).")


class SuperviseConfig(Section):
    supervisor: SupervisorSection = Field(default_factory=SupervisorSection)
    metrics_port: int = Field(0, ge=0, le=65535, description="Serve Prometheus metrics on 127.0.0.1 (0 = off).")
    status_path: str = Field("", description="Write the programs' states here as JSON every second.")
    stop_timeout_s: float = Field(15.0, gt=0, description="SIGTERM grace per program on shutdown.")
    programs: list[ProgramSection] = Field(..., min_length=1, description="What to keep alive.")

    @field_validator("programs")
    @classmethod
    def _unique(cls, v: list[ProgramSection]) -> list[ProgramSection]:
        names = [p.name for p in v]
        if len(set(names)) != len(names):
            raise ValueError(f"program names must be unique: {names}")
        return v


def build_targets(config: SuperviseConfig) -> list[CommandTarget]:
    return [CommandTarget(p.name, p.command, health_url=p.health_url or None, env=p.env,
                          log_path=p.log_path or None, cwd=p.cwd or None) for p in config.programs]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="unbroken supervise", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, help="YAML listing the programs to keep alive")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    try:
        config = load_config(SuperviseConfig, args.config, env_prefix=ENV_PREFIX)
    except ConfigError as e:
        print(f"unbroken supervise: {e}", file=sys.stderr)
        return 2
    stop = threading.Event()
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    targets = build_targets(config)
    for t in targets:
        if t.process.log_path is not None:
            t.process.log_path.parent.mkdir(parents=True, exist_ok=True)
        t.start()
    sup = Supervisor(config.supervisor, targets).start()
    if config.metrics_port:
        from prometheus_client import start_http_server

        start_http_server(config.metrics_port, addr="127.0.0.1", registry=sup.metrics.registry)
    try:
        while not stop.wait(1.0):
            if config.status_path:
                sup.write_status(config.status_path)
    finally:
        sup.stop()
        for t in targets:
            t.stop(config.stop_timeout_s)
    return 0


if __name__ == "__main__":
    sys.exit(main())
