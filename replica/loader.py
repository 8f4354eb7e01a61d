"""Load a Qwen checkpoint (NF4 through bitsandbytes, or full precision) and its LoRA adapters."""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from replica.config import ModelSection

BASE_ADAPTER = "__base__"  # peft's name for "no adapter" in a mixed batch


@dataclass
class LoadedModel:
    model: Any  # a transformers causal LM, or a peft PeftModel wrapping one
    tokenizer: Any
    device: torch.device
    dtype: torch.dtype
    quantization: str
    revision: str
    adapter_names: list[str] = field(default_factory=list)
    num_layers: int = 0
    num_kv_heads: int = 0
    head_dim: int = 0
    max_position_embeddings: int = 0

    @property
    def kv_bytes_per_token(self) -> int:
        elem = torch.finfo(self.dtype).bits // 8
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * elem


def resolve_device(name: str) -> torch.device:
    if name == "cuda" or (name == "auto" and torch.cuda.is_available()):
        return torch.device("cuda", 0)
    return torch.device("cpu")


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def checkpoint_revision(path: str) -> str:
    """A short fingerprint of a local checkpoint: its config and the head of each weight file.
    Two checkpoints with the same config but different weights get different revisions."""
    p = Path(path)
    h = hashlib.sha256()
    if not p.is_dir():
        h.update(path.encode())
        return h.hexdigest()[:16]
    for name in ("config.json", "unbroken_model.json"):
        if (p / name).is_file():
            h.update((p / name).read_bytes())
    for w in sorted(p.glob("*.safetensors")):
        h.update(w.name.encode() + str(w.stat().st_size).encode())
        with open(w, "rb") as f:
            h.update(f.read(1 << 20))
    return h.hexdigest()[:16]


def _choose_cpu_nf4_kernel(model: Any, bf16: bool) -> str:
    """On CPUs with AVX512-BF16, bitsandbytes repacks NF4 weights on first use and computes in
    bfloat16. Its rounding turns float32 noise (a padded row, another batch shape) into different
    greedy picks, so unless asked for, every layer keeps the dequantize + float32 matmul path.
    Returns the revision suffix that keeps KV made by one kernel from being imported by the other."""
    layers = [m for m in model.modules() if hasattr(m, "support_avx512bf16_for_cpu")]
    if not any(m.support_avx512bf16_for_cpu for m in layers):
        return ""  # this CPU (or this bitsandbytes) has no fused path: nothing to choose
    if bf16:
        return "-bf16kernel"
    for m in layers:
        m.support_avx512bf16_for_cpu = False
    return ""


_kept: tuple[dict[str, Any], LoadedModel] | None = None


def _weights_key(cfg: ModelSection) -> dict[str, Any]:
    return cfg.model_dump(exclude={"num_threads"})  # threads do not change the weights


def keep_loaded(cfg: ModelSection, loaded: LoadedModel) -> None:
    """The zygote (``replica/zygote.py --load-weights``) keeps the model it loaded: a forked child
    whose ``model`` section equals ``cfg`` (but for ``num_threads``) gets it from :func:`load_model`
    (copy-on-write pages)."""
    global _kept
    _kept = (_weights_key(cfg), loaded)


def load_model(cfg: ModelSection, progress: Callable[[str], None] = print) -> LoadedModel:
    device = resolve_device(cfg.device)
    if cfg.num_threads and device.type == "cpu":
        torch.set_num_threads(cfg.num_threads)
    if _kept is not None and _kept[0] == _weights_key(cfg):
        progress("model inherited from the zygote (copy-on-write)")
        return _kept[1]
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    dtype = resolve_dtype(cfg.dtype, device)
    progress(f"loading tokenizer from {cfg.path}")
    tokenizer = AutoTokenizer.from_pretrained(cfg.path)
    kwargs: dict[str, Any] = {"dtype": dtype}
    if cfg.quantization == "nf4":
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_compute_dtype=dtype,
            bnb_4bit_use_double_quant=False,
        )
    if device.type == "cuda":
        kwargs["device_map"] = {"": device.index or 0}
    progress(f"loading weights ({cfg.quantization}, {str(dtype).removeprefix('torch.')}, {device})")
    model = AutoModelForCausalLM.from_pretrained(cfg.path, **kwargs)
    if device.type == "cpu" and cfg.quantization == "none":
        model = model.to(device)
    kernel = ""
    if device.type == "cpu" and cfg.quantization == "nf4":
        kernel = _choose_cpu_nf4_kernel(model, cfg.cpu_bf16_kernel)
    model.eval()
    adapter_names: list[str] = []
    if cfg.adapters:
        from peft import PeftModel

        for i, (name, adapter_path) in enumerate(sorted(cfg.adapters.items())):
            if not os.path.isdir(adapter_path):
                raise FileNotFoundError(f"model.adapters.{name} = {adapter_path!r}: no such directory")
            progress(f"loading LoRA adapter {name!r} from {adapter_path}")
            if i == 0:
                model = PeftModel.from_pretrained(model, adapter_path, adapter_name=name)
            else:
                model.load_adapter(adapter_path, adapter_name=name)
            adapter_names.append(name)
        model.eval()
    config = model.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    progress("model ready")
    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        device=device,
        dtype=dtype,
        quantization=cfg.quantization,
        revision=cfg.revision or f"{checkpoint_revision(cfg.path)}-{cfg.quantization}{kernel}",
        adapter_names=adapter_names,
        num_layers=config.num_hidden_layers,
        num_kv_heads=config.num_key_value_heads,
        head_dim=head_dim,
        max_position_embeddings=getattr(config, "max_position_embeddings", cfg.max_model_len),
    )
