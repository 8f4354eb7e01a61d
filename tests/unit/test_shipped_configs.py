"""Every YAML the project ships loads with its process's config class, as the processes load it
(``unbroken up`` reads configs/stack.yaml; a field that no longer exists stops it at start)."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.config import GatewayConfig
from kvsync.config import KVSyncConfig
from replica.config import ReplicaConfig
from unbroken.config import load_config
from unbroken.launcher import StackConfig
from unbroken.supervisor.standalone import SuperviseConfig

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


@pytest.mark.parametrize("name, cls", [
    ("stack.yaml", StackConfig), ("gateway.yaml", GatewayConfig), ("replica.yaml", ReplicaConfig),
    ("kvsync.yaml", KVSyncConfig), ("supervise.example.yaml", SuperviseConfig),
])
def test_shipped_config_loads(name: str, cls: type) -> None:
    load_config(cls, CONFIGS / name, environ={})
