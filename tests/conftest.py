"""Shared fixtures: a tiny Qwen checkpoint written at test time, a throwaway redis-server, and
real replica processes on free ports."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Iterator

import pytest

from unbroken.procs import ManagedProcess, free_port, start_redis


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random-weight Qwen3 checkpoint with a locally trained tokenizer (written once)."""
    from unbroken.tinymodel import write_tiny_model

    return write_tiny_model(tmp_path_factory.mktemp("tiny-qwen"), shape="tiny", seed=0)


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


@pytest.fixture
def port() -> int:
    return free_port()
