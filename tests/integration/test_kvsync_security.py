"""Secure defaults of the data plane, with real processes: a replica or sidecar told to listen off
loopback without a token refuses to start (unless told explicitly), and the sidecar's fast block
reader logs in to a Redis whose password needs percent-encoding in the URL."""

from __future__ import annotations

import asyncio
import urllib.parse
from pathlib import Path

import pytest

from kvsync.blocks import Block
from kvsync.config import RedisSection, StoreSection
from kvsync.protocol import BlockRef
from kvsync.store import KVStore
from unbroken.credentials import redact_url
from unbroken.access import is_loopback
from unbroken.procs import ManagedProcess, free_port, python_module_cmd, start_redis


def _exit_code(name: str, module: str, args: list[str], env: dict[str, str], tmp_path: Path) -> tuple[int, str]:
    proc = ManagedProcess(name, python_module_cmd(module, *args), log_path=tmp_path / f"{name}.log", env=env).start()
    try:
        assert proc.proc is not None
        code = proc.proc.wait(timeout=120)
        return code, proc.log_tail(40)
    finally:
        proc.stop()


@pytest.mark.parametrize("module,token_env,allow_env,extra", [
    ("kvsync", "UNBROKEN_KVSYNC__AUTH__TOKEN", "UNBROKEN_KVSYNC__AUTH__ALLOW_INSECURE", []),
    ("replica", "UNBROKEN_REPLICA__SERVER__SHARED_TOKEN", "UNBROKEN_REPLICA__SERVER__ALLOW_INSECURE",
     ["--model", "does-not-exist"]),
])
def test_no_token_off_loopback_refuses_to_start(module: str, token_env: str, allow_env: str, extra: list[str],
                                                tmp_path: Path) -> None:
    code, log = _exit_code(module, module, ["--host", "0.0.0.0", "--port", str(free_port()), *extra], {}, tmp_path)
    assert code == 2 and "refusing to listen on '0.0.0.0'" in log, log
    assert token_env.split("__", 1)[1].lower().replace("__", ".") in log  # names the field to set


def test_a_sidecar_refuses_a_remote_redis_without_a_mac_secret(tmp_path: Path) -> None:
    code, log = _exit_code("kvsync", "kvsync", ["--port", str(free_port()), "--redis-url", "redis://10.255.0.1:6379/0"],
                           {}, tmp_path)
    assert code == 2 and "auth.mac_secret" in log, log


def test_loopback_detection() -> None:
    assert is_loopback("127.0.0.1") and is_loopback("localhost") and is_loopback("::1")
    assert not is_loopback("0.0.0.0") and not is_loopback("") and not is_loopback("::")
    assert not is_loopback("10.1.2.3")


def test_fast_block_reader_with_a_percent_encoded_password(tmp_path: Path) -> None:
    password = "p@ss:w/rd%?#"
    proc, url = start_redis(log_path=tmp_path / "redis.log", extra=["--requirepass", password])
    try:
        port = urllib.parse.urlsplit(url).port
        secured = f"redis://:{urllib.parse.quote(password, safe='')}@127.0.0.1:{port}/0"
        assert password not in redact_url(secured) and "***" in redact_url(secured)
        store = KVStore(RedisSection(url=secured), StoreSection())
        data = [bytes([i]) * (1000 + i) for i in range(5)]
        blocks = [Block(BlockRef(f"k{i}", 1, len(d), len(d), i), d) for i, d in enumerate(data)]

        async def run() -> list:
            await store.put_blocks(blocks)
            try:
                reader = store.block_reader([b.ref.store_id for b in blocks])
                assert reader is not None  # the raw-socket path, not redis-py's
                return await asyncio.to_thread(list, reader)
            finally:
                await store.close()

        assert [bytes(b) for b in asyncio.run(run())] == data
        # A value larger than expected is refused before a buffer is made for it.
        from kvsync.blocks import BadData

        reader = store.block_reader([blocks[4].ref.store_id], max_value_bytes=100)
        with pytest.raises(BadData) as e:
            list(reader)
        assert e.value.reason == "too_large"
    finally:
        proc.stop()
