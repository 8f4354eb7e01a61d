"""Shared fixtures: a tiny Qwen checkpoint written at test time, a throwaway redis-server, the
model's own greedy generate() as the reference, and promtool."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Iterator

import pytest
import torch

from unbroken.procs import ManagedProcess, free_port, python_module_cmd, start_redis


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random-weight Qwen3 checkpoint with a locally trained tokenizer (written once)."""
    from unbroken.tinymodel import write_tiny_model

    return write_tiny_model(tmp_path_factory.mktemp("tiny-qwen"), shape="tiny", seed=0)


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model's tokenizer files alone (tokenizer.json, tokenizer_config.json with the chat
    template), as a gateway's ``replicas.tokenizers`` reads them."""
    from unbroken.tinymodel import train_tokenizer

    out = tmp_path_factory.mktemp("tiny-tokenizer")
    train_tokenizer().save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def tiny_replica_url(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """One of the project's replicas on the tiny model (NF4, as the ``reference`` fixture loads it),
    one process per test module."""
    port = free_port()
    proc = ManagedProcess(
        "replica", python_module_cmd("replica", "--model", str(tiny_model_dir), "--port", str(port),
                                     "--quantization", "nf4", "--replica-id", "tiny"),
        log_path=tmp_path_factory.mktemp("tiny-replica") / "replica.log",
        env={"UNBROKEN_REPLICA__MODEL__NUM_THREADS": "1", "UNBROKEN_REPLICA__MODEL__MAX_MODEL_LEN": "512"},
        ready_url=f"http://127.0.0.1:{port}/health",
    ).start()
    try:
        proc.wait_ready(timeout_s=180)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.stop(timeout_s=20)


@pytest.fixture
def redis_url(tmp_path: Path) -> Iterator[str]:
    """A fresh redis-server on a free port, ended by pid after the test."""
    if shutil.which("redis-server") is None:
        pytest.fail("redis-server is not installed (the set-up installs it with apt-get)")
    proc, url = start_redis(log_path=tmp_path / "redis.log")
    try:
        yield url
    finally:
        proc.stop()


@pytest.fixture
def redis_proc(tmp_path: Path) -> Iterator[tuple[ManagedProcess, str]]:
    """Like ``redis_url`` but hands over the process too, for tests that kill and restart it."""
    proc, url = start_redis(log_path=tmp_path / "redis.log")
    try:
        yield proc, url
    finally:
        proc.stop()


@pytest.fixture(scope="session")
def promtool() -> str:
    """Prometheus's promtool (the set-up unpacks it into .tools/bin when it is not installed)."""
    found = shutil.which("promtool") or str(Path(__file__).resolve().parents[1] / ".tools" / "bin" / "promtool")
    if not Path(found).is_file():
        pytest.fail("promtool is not installed (scripts/test.sh unpacks it from Debian's prometheus package)")
    return found


@pytest.fixture
def port() -> int:
    return free_port()


@pytest.fixture(scope="session")
def reference(tiny_model_dir: Path):
    """The model loaded here as the replicas load it (NF4 on the CPU, float32 compute, the float32
    kernel where bitsandbytes would pick its bfloat16 one), for its own generate()."""
    from replica.config import ModelSection
    from replica.loader import load_model

    loaded = load_model(ModelSection(path=str(tiny_model_dir), quantization="nf4", device="cpu"),
                        progress=lambda _: None)
    tok, model = loaded.tokenizer, loaded.model

    def generate(prompt_ids: list[int], max_new_tokens: int) -> list[int]:
        with torch.inference_mode():
            out = model.generate(torch.tensor([prompt_ids]), attention_mask=torch.ones(1, len(prompt_ids),
                                 dtype=torch.long), max_new_tokens=max_new_tokens, do_sample=False)
        return out[0, len(prompt_ids):].tolist()

    return tok, generate
