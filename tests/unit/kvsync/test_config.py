"""The sidecar's config: the shipped YAML is valid, env and flags override, bad values name the field."""

from __future__ import annotations

from pathlib import Path

import pytest

from kvsync.__main__ import main
from kvsync.blocks import compression_available
from kvsync.config import KVSyncConfig
from unbroken.config import ConfigError, load_config

YAML = Path(__file__).resolve().parents[3] / "configs" / "kvsync.yaml"


def test_shipped_yaml_sets_every_field_to_its_default() -> None:
    assert load_config(KVSyncConfig, YAML) == KVSyncConfig()


def test_env_and_flag_overrides() -> None:
    cfg = load_config(KVSyncConfig, YAML, env_prefix="UNBROKEN_KVSYNC",
                      environ={"UNBROKEN_KVSYNC__STORE__BLOCK_TOKENS": "32"},
                      overrides={"server.port": 9999, "redis.url": "redis://127.0.0.1:1/0"})
    assert (cfg.store.block_tokens, cfg.server.port, cfg.redis.url) == (32, 9999, "redis://127.0.0.1:1/0")


def test_bad_values_name_the_field() -> None:
    with pytest.raises(ConfigError, match="store.block_tokens"):
        load_config(KVSyncConfig, overrides={"store.block_tokens": 0})
    with pytest.raises(ConfigError, match="writer.nonsense"):
        load_config(KVSyncConfig, overrides={"writer.nonsense": 1})
    if not compression_available("lz4"):
        with pytest.raises(ConfigError, match="store.compression"):
            load_config(KVSyncConfig, overrides={"store.compression": "lz4"})


def test_cli_fails_fast_on_bad_config(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "k.yaml"
    bad.write_text("store:\n  ttl_s: -1\n")
    assert main(["--config", str(bad)]) == 2
    assert "store.ttl_s" in capsys.readouterr().err
