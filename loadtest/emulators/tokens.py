"""The emulators' "models" for token-id requests (vLLM's ``prompt`` of ids, SGLang's ``/generate``
``input_ids``): greedy and deterministic, so that a stream cut and continued from prompt + generated
ids can be compared with one that ran through.

- :class:`HashGreedyModel`: the next id is a hash of every id before it (prompt and generated), drawn
  from the tokenizer's plain word tokens: any wrong, missing or repeated id changes all that follows;
- :class:`TinyCheckpointModel`: the real tiny Qwen checkpoint (``unbroken.tinymodel``), greedy in
  float32 with transformers, so the text equals the model's own ``generate()``;
- :class:`CallableModel`: any greedy function (a test's reference, loaded as the replicas load it).
"""

from __future__ import annotations

import array
import re
import zlib
from pathlib import Path
from typing import Callable, Protocol

_PLAIN = re.compile(r"^ ?[a-z]{2,}$")


class TokenModel(Protocol):
    def generate(self, ids: list[int], max_new_tokens: int) -> list[int]:
        """The greedy continuation of ``ids``."""
        ...

    def decode(self, ids: list[int]) -> str:
        ...


class HashGreedyModel:
    def __init__(self, tokenizer_dir: str | Path) -> None:
        from tokenizers import Tokenizer

        self.tok = Tokenizer.from_file(str(Path(tokenizer_dir) / "tokenizer.json"))
        vocab = self.tok.get_vocab()
        self.words = sorted(i for i in vocab.values() if _PLAIN.match(self.tok.decode([i])))
        if len(self.words) < 16:
            raise ValueError("the tokenizer has too few plain word tokens for the emulator's model")

    def generate(self, ids: list[int], max_new_tokens: int) -> list[int]:
        seq = list(ids)
        for _ in range(max_new_tokens):
            h = zlib.crc32(array.array("q", seq).tobytes())
            seq.append(self.words[h % len(self.words)])
        return seq[len(ids):]

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=True)


class TinyCheckpointModel:
    """Greedy decoding of a checkpoint with transformers (float32 on the CPU); needs the replica extra."""

    def __init__(self, model_dir: str | Path) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.torch = torch
        self.tok = AutoTokenizer.from_pretrained(str(model_dir))
        self.model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
        self.eos = set(self.model.generation_config.eos_token_id or [])

    def generate(self, ids: list[int], max_new_tokens: int) -> list[int]:
        torch = self.torch
        with torch.inference_mode():
            out = self.model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                      max_new_tokens=max_new_tokens, do_sample=False)
        return out[0, len(ids):].tolist()

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=True)


class CallableModel:
    """Any greedy function as the model (e.g. a test's reference ``generate`` that loads the
    checkpoint exactly as the project's replicas do, so an emulated engine and a replica agree)."""

    def __init__(self, generate: Callable[[list[int], int], list[int]], decode: Callable[[list[int]], str]) -> None:
        self._generate = generate
        self._decode = decode

    def generate(self, ids: list[int], max_new_tokens: int) -> list[int]:
        return list(self._generate(list(ids), max_new_tokens))

    def decode(self, ids: list[int]) -> str:
        return self._decode(ids)
