"""The gateway in front of a real llama.cpp server (llama-cpp-python's, on a GGUF of the tiny
Qwen written at test time): detected as ``llamacpp``, served through the openai client, the same
tokens as the checkpoint's own ``generate()``, completions resumed by text after a kill and chat
streams ended with an error event. Slow: the ``engines`` extra builds llama.cpp from source."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path
from typing import Iterator

import pytest

pytestmark = pytest.mark.slow

llama_cpp = pytest.importorskip("llama_cpp", reason="needs the engines extra (pip install -e '.[engines]')")
pytest.importorskip("gguf")

from gateway.config import GatewayConfig  # noqa: E402
from gateway.testing import RunningGateway  # noqa: E402
from loadtest.llamacpp import LlamaCppServer, write_gguf  # noqa: E402


@pytest.fixture(scope="module")
def gguf_path(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_gguf(tiny_model_dir, tmp_path_factory.mktemp("gguf") / "tiny.gguf")


@pytest.fixture(scope="module")
def servers(gguf_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[LlamaCppServer]]:
    logs = tmp_path_factory.mktemp("llamacpp-logs")
    started: list[LlamaCppServer] = []
    try:
        for i in range(2):
            started.append(LlamaCppServer(gguf_path).start(log_path=logs / f"server{i}.log"))
        yield started
    finally:
        for s in started:
            s.stop()


def test_llamacpp_tokenizes_like_the_tiny_tokenizer(gguf_path: Path, tiny_model_dir: Path) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    llm = llama_cpp.Llama(model_path=str(gguf_path), vocab_only=True, verbose=False)
    for text in ["Hello! How can I help you today?", "Tell me a story about a small robot.",
                 "def add(a, b):\n    return a + b", "Numbers: 12 100 2026, and émigré ñ 東京",
                 "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"]:
        assert llm.tokenize(text.encode(), add_bos=False, special=True) == tok.encode(text), text


@pytest.fixture(scope="module")
def reference(tiny_model_dir: Path):  # type: ignore[no-untyped-def]
    """The checkpoint's own greedy generate() in float32, as the GGUF holds it (the replicas' NF4
    reference would differ: llama.cpp runs the float32 weights)."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()

    def generate(prompt_ids: list[int], max_new_tokens: int) -> list[int]:
        with torch.inference_mode():
            out = model.generate(torch.tensor([prompt_ids]), attention_mask=torch.ones(1, len(prompt_ids),
                                 dtype=torch.long), max_new_tokens=max_new_tokens, do_sample=False)
        return out[0, len(prompt_ids):].tolist()

    return generate


def _gateway(servers: list[LlamaCppServer]) -> RunningGateway:
    cfg = GatewayConfig.model_validate({
        "server": {"port": 0},
        "replicas": {"urls": [s.url for s in servers], "stall_timeout_s": 5.0, "first_byte_timeout_s": 30.0},
        "routing": {"session_affinity": False, "policy": "round_robin"},
        "health": {"heartbeat_interval_ms": 200, "heartbeat_timeout_ms": 2000},
    })
    return RunningGateway(cfg).start_in_thread(num_healthy=len(servers), timeout_s=60)


def test_gateway_serves_llamacpp_with_the_models_own_tokens(servers: list[LlamaCppServer], tiny_model_dir: Path,
                                                            reference) -> None:  # type: ignore[no-untyped-def]
    import openai
    from transformers import AutoTokenizer

    gw = _gateway(servers)
    try:
        reps = gw.call(lambda: [(r.kind, r.resume_chat, r.resume_completions) for r in gw.gateway.replicas])
        assert reps == [("llamacpp", "none", "text")] * 2
        client = openai.OpenAI(base_url=gw.url + "/v1", api_key="none", max_retries=0)
        tok = AutoTokenizer.from_pretrained(tiny_model_dir)
        prompt = "Once upon a time there was a quiet village"
        want = tok.decode(reference(tok.encode(prompt), 12))
        out = client.completions.create(model="qwen", prompt=prompt, max_tokens=12, temperature=0)
        assert out.choices[0].text == want and out.usage.completion_tokens == 12
        assert out.model == "qwen"
        # The random model's answers often contain byte tokens that do not form UTF-8; llama-cpp-python
        # drops such bytes (and counts max_tokens across them its own way) where the tokenizer writes
        # U+FFFD, so the text is compared on the first message whose greedy answer decodes cleanly.
        for content in ("Hello", "Hi", "Tell me a story", "What is the weather like?", "Count to ten",
                        "Good morning", "Why is the sky blue?", "Name a color"):
            messages = [{"role": "user", "content": content}]
            ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
            want_chat = tok.decode(reference(list(ids), 8), skip_special_tokens=True)
            if "\ufffd" not in want_chat:
                break
        else:
            pytest.fail("no candidate message has an answer that decodes cleanly")
        chat = client.chat.completions.create(model="qwen", messages=messages, max_tokens=8, temperature=0)
        assert chat.usage.prompt_tokens == len(ids)
        assert chat.choices[0].message.content == want_chat
    finally:
        gw.stop_thread()


def test_killed_llamacpp_mid_stream(gguf_path: Path, tmp_path: Path) -> None:
    """SIGKILL one server mid-stream: a completion continues by text on the other (marked inexact),
    a chat stream ends with an error event; the gateway then serves from the survivor."""
    import openai

    servers = [LlamaCppServer(gguf_path).start(log_path=tmp_path / f"s{i}.log") for i in range(2)]
    gw = _gateway(servers)
    try:
        client = openai.OpenAI(base_url=gw.url + "/v1", api_key="none", max_retries=0)
        whole = client.completions.create(model="qwen", prompt="Once upon a time", max_tokens=40,
                                          temperature=0).choices[0].text
        for route in ("completions", "chat"):
            if route == "completions":
                stream = client.completions.create(model="qwen", prompt="Once upon a time", max_tokens=40,
                                                   temperature=0, stream=True)
            else:
                stream = client.chat.completions.create(model="qwen", messages=[{"role": "user", "content": "Hi"}],
                                                        max_tokens=40, temperature=0, stream=True)
            text, killed, error = "", False, None
            try:
                for chunk in stream:
                    if not chunk.choices:
                        continue
                    ch = chunk.choices[0]
                    text += (ch.text if route == "completions" else ch.delta.content) or ""
                    if text and not killed:
                        victim = next(s for s in servers if s.proc is not None
                                      and gw.call(lambda: gw.gateway.replicas.find(s.url).num_inflight) > 0)
                        os.kill(victim.proc.pid, signal.SIGKILL)  # type: ignore[union-attr]
                        victim.proc.wait(10)  # type: ignore[union-attr]
                        victim.proc = None
                        killed = True
            except openai.APIError as e:
                error = e
            assert killed
            if route == "completions":
                # continued by text: complete, and here (greedy, a tokenizer that re-splits the same way)
                # the same words as the unbroken run
                assert error is None and text == whole
            else:
                assert error is not None and "could not be resumed" in str(error)
            # restart the victim for the next round
            for i, s in enumerate(servers):
                if s.proc is None:
                    servers[i] = LlamaCppServer(gguf_path, port=s.port).start(log_path=tmp_path / f"r{i}.log")
            deadline = time.monotonic() + 30
            while gw.call(lambda: gw.gateway.replicas.num_healthy()) < 2 and time.monotonic() < deadline:
                time.sleep(0.1)
        assert threading.active_count() >= 1
    finally:
        gw.stop_thread()
        for s in servers:
            s.stop()
