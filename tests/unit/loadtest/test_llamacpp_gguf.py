"""The GGUF written from the tiny Qwen3 checkpoint for llama.cpp: read back with the gguf package's
reader (the llama.cpp server itself runs in the slow tests)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

gguf = pytest.importorskip("gguf", reason="needs the engines extra")

from loadtest.llamacpp import gguf_tensor_name, write_gguf  # noqa: E402


def test_tensor_names_follow_llama_cpp() -> None:
    assert gguf_tensor_name("model.layers.3.self_attn.q_norm.weight") == "blk.3.attn_q_norm.weight"
    assert gguf_tensor_name("lm_head.weight") == "output.weight"
    with pytest.raises(ValueError, match="no GGUF name"):
        gguf_tensor_name("model.layers.0.mystery.weight")


def test_tiny_gguf_reads_back(tiny_model_dir: Path, tmp_path: Path) -> None:
    path = write_gguf(tiny_model_dir, tmp_path / "tiny.gguf")
    r = gguf.GGUFReader(str(path))
    cfg = json.loads((tiny_model_dir / "config.json").read_text())
    tok = json.loads((tiny_model_dir / "tokenizer.json").read_text())

    def field(name: str):  # type: ignore[no-untyped-def]
        return r.fields[name].contents()

    assert field("general.architecture") == "qwen3"
    assert field("tokenizer.ggml.model") == "gpt2" and field("tokenizer.ggml.pre") == "gpt-2"
    assert field("qwen3.block_count") == cfg["num_hidden_layers"]
    assert field("qwen3.attention.head_count_kv") == cfg["num_key_value_heads"]
    tokens = field("tokenizer.ggml.tokens")
    assert len(tokens) == cfg["vocab_size"]
    for text, i in list(tok["model"]["vocab"].items())[:50]:
        assert tokens[i] == text
    assert tokens[field("tokenizer.ggml.eos_token_id")] == "<|im_end|>"
    assert len(r.tensors) == 3 + 11 * cfg["num_hidden_layers"]
    shapes = {t.name: [int(d) for d in t.shape] for t in r.tensors}
    assert shapes["token_embd.weight"] == [cfg["hidden_size"], cfg["vocab_size"]]
