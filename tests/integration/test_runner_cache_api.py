"""The runner uses transformers' supported cache API: a deprecated keyword (``past_key_values``,
removed in transformers 5.40) would break a fresh install on the next releases, so its warning is
an error here."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest

from replica.config import ReplicaConfig
from replica.engine import LLMEngine
from replica.loader import load_model
from replica.protocol import GenerationRequest, SamplingParams
from replica.runner import cache_kwarg


class _Renamed:
    def forward(self, input_ids=None, cache=None, use_cache=None):  # type: ignore[no-untyped-def]
        pass


class _Old:
    def forward(self, input_ids=None, past_key_values=None, use_cache=None):  # type: ignore[no-untyped-def]
        pass


class _Peft:
    def __init__(self, base: object) -> None:
        self.base = base

    def get_base_model(self) -> object:
        return self.base

    def forward(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        pass


def test_cache_keyword_follows_the_model_signature() -> None:
    assert cache_kwarg(_Renamed()) == "cache"
    assert cache_kwarg(_Old()) == "past_key_values"
    assert cache_kwarg(_Peft(_Renamed())) == "cache"


def test_a_prefill_and_decodes_raise_no_cache_deprecation(tiny_model_dir: Path) -> None:
    cfg = ReplicaConfig.model_validate({"model": {"path": str(tiny_model_dir)}})
    loaded = load_model(cfg.model, progress=lambda _: None)
    engine = LLMEngine(cfg, loaded)
    prompt = loaded.tokenizer("Hello there, tell me")["input_ids"]
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=r".*past_key_values.*")
        warnings.filterwarnings("error", message=r".*cache.*deprecat.*")
        engine.add_request(GenerationRequest("r", prompt, SamplingParams(max_tokens=4, temperature=0.0,
                                                                         ignore_eos=True)))
        num_tokens = 0
        for _ in range(50):
            num_tokens += sum(1 for o in engine.step() if o.token_id is not None)
            if not engine.has_unfinished():
                break
    assert num_tokens == 4
    if "cache" in __import__("inspect").signature(type(loaded.model).forward).parameters:
        assert engine.runner is not None and engine.runner._cache_kwarg == "cache"


def test_the_deprecation_check_can_fail(tiny_model_dir: Path) -> None:
    """Passing the old keyword where it is deprecated does raise under the filter above."""
    import inspect

    import torch
    from transformers import DynamicCache

    cfg = ReplicaConfig.model_validate({"model": {"path": str(tiny_model_dir)}})
    loaded = load_model(cfg.model, progress=lambda _: None)
    if "cache" not in inspect.signature(type(loaded.model).forward).parameters:
        pytest.skip("this transformers still takes past_key_values")
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=r".*past_key_values.*")
        with pytest.raises(FutureWarning):
            loaded.model(input_ids=torch.tensor([[1, 2]]), past_key_values=DynamicCache(), use_cache=True)
