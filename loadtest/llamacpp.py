"""llama.cpp as a replica, for the tests that put the gateway in front of a real engine.

:func:`write_gguf` writes the tiny Qwen3 checkpoint (``unbroken tiny-model``) as a GGUF file with
the ``gguf`` package's writer (float32 tensors, the names llama.cpp's own ``convert_hf_to_gguf.py``
gives them). The tiny tokenizer is a byte-level BPE trained here, which that converter does not
recognise; it splits text like GPT-2's, so its pre-tokenizer is named ``gpt-2`` explicitly.
:class:`LlamaCppServer` runs llama-cpp-python's OpenAI server on it (``python -m llama_cpp.server``)
as a subprocess on a free port. Both need the ``engines`` extra (``pip install -e '.[engines]'``).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

_TENSORS = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}
_LAYER_TENSORS = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "self_attn.q_norm.weight": "attn_q_norm.weight",
    "self_attn.k_norm.weight": "attn_k_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}


def gguf_tensor_name(hf_name: str) -> str:
    if hf_name in _TENSORS:
        return _TENSORS[hf_name]
    parts = hf_name.split(".")
    if len(parts) > 3 and parts[0] == "model" and parts[1] == "layers":
        rest = ".".join(parts[3:])
        if rest in _LAYER_TENSORS:
            return f"blk.{int(parts[2])}.{_LAYER_TENSORS[rest]}"
    raise ValueError(f"no GGUF name for tensor {hf_name!r}")


def write_gguf(model_dir: str | Path, out_path: str | Path) -> Path:
    """Write the Qwen3 checkpoint in ``model_dir`` as a float32 GGUF file at ``out_path``."""
    import gguf
    import numpy as np
    from safetensors.numpy import load_file

    model_dir, out_path = Path(model_dir), Path(out_path)
    cfg = json.loads((model_dir / "config.json").read_text())
    if cfg.get("model_type") != "qwen3":
        raise ValueError(f"only qwen3 checkpoints are written, got {cfg.get('model_type')!r}")
    tok = json.loads((model_dir / "tokenizer.json").read_text())
    tok_cfg = json.loads((model_dir / "tokenizer_config.json").read_text())
    template_file = model_dir / "chat_template.jinja"
    chat_template = template_file.read_text() if template_file.exists() else tok_cfg.get("chat_template")

    arch = "qwen3"
    w = gguf.GGUFWriter(str(out_path), arch)
    w.add_name("unbroken-tiny")
    w.add_context_length(int(cfg["max_position_embeddings"]))
    w.add_embedding_length(int(cfg["hidden_size"]))
    w.add_block_count(int(cfg["num_hidden_layers"]))
    w.add_feed_forward_length(int(cfg["intermediate_size"]))
    w.add_head_count(int(cfg["num_attention_heads"]))
    w.add_head_count_kv(int(cfg["num_key_value_heads"]))
    w.add_key_length(int(cfg["head_dim"]))
    w.add_value_length(int(cfg["head_dim"]))
    rope = (cfg.get("rope_parameters") or {}).get("rope_theta") or cfg.get("rope_theta") or 10000.0
    w.add_rope_freq_base(float(rope))
    w.add_layer_norm_rms_eps(float(cfg["rms_norm_eps"]))
    w.add_file_type(gguf.LlamaFileType.ALL_F32)

    vocab_size = int(cfg["vocab_size"])
    by_id: dict[int, str] = {i: t for t, i in tok["model"]["vocab"].items()}
    special = {a["id"]: a["content"] for a in tok.get("added_tokens") or []}
    by_id.update(special)
    tokens, types = [], []
    for i in range(vocab_size):
        if i in special:
            tokens.append(special[i])
            types.append(gguf.TokenType.CONTROL)
        elif i in by_id:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.NORMAL)
        else:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
    merges = [m if isinstance(m, str) else " ".join(m) for m in tok["model"]["merges"]]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt-2")  # the tiny tokenizer splits like GPT-2's byte-level BPE
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    ids = {v: k for k, v in special.items()}
    w.add_eos_token_id(ids["<|im_end|>"])
    w.add_pad_token_id(ids["<|endoftext|>"])
    w.add_bos_token_id(ids["<|endoftext|>"])
    w.add_add_bos_token(False)
    if chat_template:
        w.add_chat_template(chat_template)

    tensors = load_file(str(model_dir / "model.safetensors"))
    for name in sorted(tensors):
        w.add_tensor(gguf_tensor_name(name), np.ascontiguousarray(tensors[name].astype(np.float32)))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out_path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class LlamaCppServer:
    """llama-cpp-python's OpenAI server on ``gguf_path``, as a subprocess (ended by its pid)."""

    def __init__(self, gguf_path: str | Path, model_alias: str = "qwen", port: int = 0, n_ctx: int = 2048) -> None:
        self.gguf_path = Path(gguf_path)
        self.model_alias = model_alias
        self.port = port or free_port()
        self.n_ctx = n_ctx
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout_s: float = 120.0, log_path: str | Path | None = None) -> "LlamaCppServer":
        cmd = [sys.executable, "-m", "llama_cpp.server", "--model", str(self.gguf_path), "--model_alias",
               self.model_alias, "--host", "127.0.0.1", "--port", str(self.port), "--n_ctx", str(self.n_ctx),
               "--n_threads", "1"]  # chat: the GGUF's own template (write_gguf embeds the model's)
        out = open(log_path, "wb") if log_path else subprocess.DEVNULL
        self.proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env={**os.environ})
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"llama_cpp.server exited with {self.proc.returncode}")
            try:
                with urllib.request.urlopen(self.url + "/v1/models", timeout=2) as r:
                    if r.status == 200:
                        return self
            except OSError:
                time.sleep(0.2)
        self.stop()
        raise TimeoutError("llama_cpp.server did not answer /v1/models in time")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.proc = None

    def __enter__(self) -> "LlamaCppServer":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
