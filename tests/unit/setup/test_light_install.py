"""A gateway-only host or a client needs no model stack: the gateway and the client side import, and
the gateway's app is built, with torch (and the rest of the replica extra) made unimportable."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]

# The replica extra of pyproject.toml: none of it may be needed by a gateway or a client.
MODEL_STACK = ("torch", "transformers", "tokenizers", "bitsandbytes", "peft", "accelerate", "numpy")

LIGHT_MODULES = ["gateway.__main__", "gateway.server", "unbroken.cli", "unbroken.errors", "unbroken.http"]
if (ROOT / "unbroken" / "client.py").exists() or (ROOT / "unbroken" / "client").is_dir():
    LIGHT_MODULES.append("unbroken.client")


def _run(body: str) -> subprocess.CompletedProcess[str]:
    script = textwrap.dedent(
        f"""
        import importlib.abc, sys
        BLOCKED = {MODEL_STACK!r}
        class Block(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in BLOCKED:
                    raise ImportError(f"{{name}} is blocked: a light install has no model stack")
        sys.meta_path.insert(0, Block())
        """
    ) + textwrap.dedent(body)
    return subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120)


def test_the_block_works() -> None:
    out = _run("import torch\n")
    assert out.returncode != 0 and "blocked" in out.stderr


def test_gateway_and_client_import_without_the_model_stack() -> None:
    out = _run(
        f"""
        import importlib
        for name in {LIGHT_MODULES!r}:
            importlib.import_module(name)
        from gateway.config import GatewayConfig
        from gateway.server import build_app
        build_app(GatewayConfig())
        print("ok")
        """
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().endswith("ok")
