"""Replica start-up: a checkpoint that cannot load ends the process with the reason (it does not
hang in "loading"), and a replica adopts its kvsync sidecar's block size when its own differs."""

from __future__ import annotations

import json
import time
import urllib.request
from pathlib import Path

from kvsync.testing import start_sidecar
from unbroken.procs import ManagedProcess, free_port, python_module_cmd


def test_a_checkpoint_that_cannot_load_ends_the_replica(tmp_path: Path) -> None:
    empty = tmp_path / "not-a-checkpoint"
    empty.mkdir()
    port = free_port()
    proc = ManagedProcess("replica", python_module_cmd("replica", "--model", str(empty), "--port", str(port)),
                          log_path=tmp_path / "replica.log").start()
    try:
        assert proc.proc is not None
        code = proc.proc.wait(timeout=120)
        assert code != 0
        assert str(empty) in proc.log_tail(60) or "config.json" in proc.log_tail(60), proc.log_tail(60)
    finally:
        proc.stop()


def test_the_replica_adopts_the_sidecars_block_size(tiny_model_dir: Path, redis_url: str, tmp_path: Path) -> None:
    """Replica configured with 32-token blocks, sidecar with 64: the replica takes 64, so its
    incremental snapshots (every 48 tokens of a long generation) line up with the sidecar's
    blocks and none is refused."""
    sidecar, sidecar_url = start_sidecar(redis_url, log_path=tmp_path / "kvsync.log",
                                         settings={"store.block_tokens": 64})
    port = free_port()
    replica = ManagedProcess(
        "replica", python_module_cmd("replica", "--model", str(tiny_model_dir), "--port", str(port),
                                     "--kvsync-url", sidecar_url),
        log_path=tmp_path / "replica.log",
        env={"UNBROKEN_REPLICA__MODEL__NUM_THREADS": "1", "UNBROKEN_REPLICA__KVSYNC__BLOCK_TOKENS": "32",
             "UNBROKEN_REPLICA__KVSYNC__SNAPSHOT_EVERY_TOKENS": "48"},
        ready_url=f"http://127.0.0.1:{port}/health").start()

    def sidecar_metrics() -> str:
        with urllib.request.urlopen(sidecar_url + "/metrics", timeout=10) as r:
            return r.read().decode()

    try:
        replica.wait_ready(180)
        assert "uses 64; using the sidecar's" in replica.log_tail(80)
        body = json.dumps({"model": "qwen", "prompt": "block size", "max_tokens": 200, "temperature": 0,
                           "ignore_eos": True}).encode()
        req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions", data=body,
                                     headers={"Content-Type": "application/json", "X-Session-ID": "bs"})
        with urllib.request.urlopen(req, timeout=60) as r:
            assert r.status == 200
        deadline = time.monotonic() + 20
        while 'snapshots_received_total{kind="incremental"}' not in sidecar_metrics():
            assert time.monotonic() < deadline, sidecar_metrics()
            time.sleep(0.1)
        assert 'snapshots_refused_total{reason="need_full"}' not in sidecar_metrics()
    finally:
        replica.stop()
        sidecar.stop()
