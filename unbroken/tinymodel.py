"""Write a random-weight Qwen checkpoint with a locally trained tokenizer.

No machine of this project reaches a model hub, so the tests and the default stack run on a
checkpoint this module writes: transformers' own Qwen3 (or Qwen2) config and model classes,
a byte-level BPE tokenizer trained here with ``tokenizers`` on a built-in text, Qwen's ChatML
chat template and special tokens. Everything then loads through the replica's real loading
code (``AutoModelForCausalLM.from_pretrained`` with NF4 quantization).

Random weights give nearly flat logits, so greedy decoding would be decided by float noise
(batch shape, kernel order). The weights are therefore drawn with a larger scale, which makes
the argmax margin wide enough for batched and unbatched runs to agree.
"""

from __future__ import annotations

import json
from pathlib import Path

SHAPES = ("tiny", "qwen3-0.6b")

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

# Qwen's ChatML template (system prompt optional), as shipped with Qwen2.5/Qwen3 instruct models.
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

_CORPUS = """
The gateway routes each request to the replica with the shortest queue and the most free memory.
When a replica crashes, hangs or runs out of memory, the gateway notices within a heartbeat and
sends the work elsewhere. A stream that breaks in the middle is resumed on another replica, token
for token, so the client sees one continuous answer. The conversation's cache of keys and values is
copied to Redis in the background, and the next turn after a failover starts from that copy instead
of computing the whole context again. Operators read the metrics, watch the live view, and prove the
whole system with load tests that inject faults: kill a process, stop it, slow it down, cut the
network, restart the store. Nothing is lost, nothing is repeated, and no client notices.
Hello! How can I help you today? Tell me a story about a small robot who learned to paint.
Once upon a time there was a quiet village by the sea. Every morning the fishermen sailed out
before sunrise and came back at noon with their nets full. The children ran along the beach,
counting the boats, and the old lighthouse keeper told them about storms he had seen.
What is the capital of France? Paris is the capital of France. What is two plus two? Four.
Write a poem about the autumn rain. Explain how a hash ring balances load across servers.
Numbers: 0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20 100 1000 2026.
def add(a, b):\n    return a + b\nclass Replica:\n    def __init__(self, url):\n        self.url = url
{"role": "user", "content": "hi"} [1, 2, 3] <html><body>ok</body></html> user assistant system
"""


def _config(shape: str, vocab_size: int, bos_id: int, eos_id: int, pad_id: int):
    from transformers import Qwen3Config

    common = dict(
        vocab_size=vocab_size,
        bos_token_id=bos_id,
        eos_token_id=eos_id,
        pad_token_id=pad_id,
        rope_theta=1_000_000.0,
        rms_norm_eps=1e-6,
        hidden_act="silu",
        attention_bias=False,
        use_cache=True,
        dtype="float32",
    )
    if shape == "tiny":
        return Qwen3Config(
            hidden_size=128,
            intermediate_size=256,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=32,
            max_position_embeddings=4096,
            tie_word_embeddings=False,
            initializer_range=0.25,
            **common,
        )
    if shape == "qwen3-0.6b":
        return Qwen3Config(
            hidden_size=1024,
            intermediate_size=3072,
            num_hidden_layers=28,
            num_attention_heads=16,
            num_key_value_heads=8,
            head_dim=128,
            max_position_embeddings=40960,
            tie_word_embeddings=True,
            initializer_range=0.02,
            **common,
        )
    raise ValueError(f"unknown shape {shape!r}; supported: {', '.join(SHAPES)}")


def train_tokenizer(vocab_size: int = 1024):
    """A byte-level BPE tokenizer trained on the built-in text, with Qwen's special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([_CORPUS] * 4, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token=None,
        bos_token=None,
        additional_special_tokens=["<|im_start|>"],
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.model_max_length = 32768
    return fast


def write_tiny_model(out_dir: str | Path, shape: str = "tiny", seed: int = 0) -> Path:
    """Write a checkpoint to ``out_dir`` (config, safetensors weights, tokenizer) and return it."""
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig

    if shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r}; supported: {', '.join(SHAPES)}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = train_tokenizer()
    eos_id = tokenizer.convert_tokens_to_ids("<|im_end|>")
    pad_id = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    vocab = len(tokenizer) if shape == "tiny" else 151936
    # Keep the vocabulary a multiple of 64 so the NF4 blocks of the embedding line up.
    vocab = (vocab + 63) // 64 * 64
    config = _config(shape, vocab, pad_id, eos_id, pad_id)
    torch.manual_seed(seed)
    with torch.no_grad():
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        if shape == "tiny":
            # Rows past the tokenizer's vocabulary are never predicted: they decode to nothing.
            # A wide lm_head gives wide argmax margins, so batching order never flips a greedy pick.
            model.lm_head.weight.normal_(0.0, 1.0)
            model.lm_head.weight[len(tokenizer):] = 0.0
    model.generation_config = GenerationConfig(
        bos_token_id=pad_id, eos_token_id=[eos_id, pad_id], pad_token_id=pad_id, do_sample=False
    )
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    (out / "unbroken_model.json").write_text(json.dumps({"shape": shape, "seed": seed}) + "\n")
    return out
