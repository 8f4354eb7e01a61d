"""The incremental detokenizer on the tiny model's real byte-level BPE tokenizer: pieces carry
exactly their tokens' ids, incomplete UTF-8 and stop-string prefixes are held back, stop strings
cut the text."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from replica.detokenizer import IncrementalDetokenizer

TEXTS = [
    "Hello wörld 日本語 🙂 end",
    "The gateway routes each request to the replica with the shortest queue.",
    "ümlaut, ñ, ç, 中文字符 and emoji 🚀🚀 mixed with plain words",
    "a",
]


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


def _feed(tok, ids, stop=()):
    detok = IncrementalDetokenizer(tok, stop)
    pieces = []
    for i in ids:
        p = detok.add(i)
        if p:
            pieces.append(p)
        if detok.stopped:
            break
    tail = detok.flush()
    if tail:
        pieces.append(tail)
    return detok, pieces


def _decode(tok, ids):
    return tok.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)


@pytest.mark.parametrize("text", TEXTS)
def test_pieces_concatenate_to_the_text_and_ids(tokenizer, text):
    ids = tokenizer(text)["input_ids"]
    detok, pieces = _feed(tokenizer, ids)
    assert "".join(p.text for p in pieces) == text
    assert [i for p in pieces for i in p.token_ids] == ids
    assert detok.text == text and detok.token_ids == ids
    for p in pieces:
        assert "\ufffd" not in p.text
        assert _decode(tokenizer, p.token_ids) == p.text  # each piece is exactly its tokens' text


def test_incomplete_utf8_is_held_until_the_character_is_complete(tokenizer):
    ids = tokenizer("wö")["input_ids"]
    # The tiny tokenizer splits "ö" into byte tokens: the first alone decodes to U+FFFD.
    split_at = next(k for k in range(1, len(ids)) if _decode(tokenizer, ids[:k]).endswith("\ufffd"))
    detok = IncrementalDetokenizer(tokenizer)
    released = [detok.add(i) for i in ids[:split_at]]
    assert "".join(p.text for p in released) == _decode(tokenizer, ids[:split_at]).rstrip("\ufffd")
    assert detok.pending, "the partial character must be held"
    last = [detok.add(i) for i in ids[split_at:]]
    assert "ö" in "".join(p.text for p in last)
    assert detok.pending == []


def test_stop_string_cuts_the_text_and_stops(tokenizer):
    text = "Hello world. Stop here please, nothing more"
    ids = tokenizer(text)["input_ids"]
    detok, pieces = _feed(tokenizer, ids, stop=["Stop here"])
    assert detok.stopped and detok.stop_string == "Stop here"
    assert "".join(p.text for p in pieces) == "Hello world. "
    consumed = [i for p in pieces for i in p.token_ids]
    assert consumed == ids[: len(consumed)]
    # The tokens holding the stop string are reported; nothing after them is consumed.
    assert "Stop here" in _decode(tokenizer, consumed)
    assert "please" not in _decode(tokenizer, consumed)
    assert detok.add(ids[-1]).text == ""  # nothing is accepted after a stop


def test_possible_stop_prefix_is_held_then_released(tokenizer):
    text = "hello world news today"
    ids = tokenizer(text)["input_ids"]
    detok = IncrementalDetokenizer(tokenizer, stop=["world peace"])
    shown = ""
    saw_hold = False
    for i in ids:
        shown += detok.add(i).text
        current = _decode(tokenizer, detok.token_ids + detok.pending)
        if current.endswith(" world") or current.endswith(" wor"):
            assert not shown.endswith("world"), "a possible stop prefix was released too early"
            saw_hold = saw_hold or bool(detok.pending)
    shown += detok.flush().text
    assert saw_hold
    assert shown == text and not detok.stopped


def test_stop_string_spanning_several_tokens_and_pieces(tokenizer):
    text = "one two three four five six"
    ids = tokenizer(text)["input_ids"]
    detok, pieces = _feed(tokenizer, ids, stop=["three four f"])
    assert detok.stopped
    assert "".join(p.text for p in pieces) == "one two "


def test_special_tokens_are_hidden_and_their_ids_ride_along(tokenizer):
    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
    ids = tokenizer("Hi there")["input_ids"]
    detok = IncrementalDetokenizer(tokenizer)
    out = [detok.add(i) for i in ids]
    end = detok.add(eos)
    assert end.text == "" and not end.token_ids  # nothing visible yet: held, not sent empty
    tail = detok.flush()
    assert tail.token_ids == [eos] and tail.text == ""
    assert "".join(p.text for p in out) == "Hi there"
    assert detok.token_ids == ids + [eos]


def test_random_token_streams_never_lose_or_repeat_an_id(tokenizer):
    rng = random.Random(1)
    vocab = len(tokenizer)
    for _ in range(50):
        ids = [rng.randrange(vocab) for _ in range(rng.randrange(1, 40))]
        detok, pieces = _feed(tokenizer, ids, stop=())
        assert [i for p in pieces for i in p.token_ids] == ids
        assert len(detok.pending) == 0


def test_undecodable_tail_is_released_after_max_held_tokens(tokenizer):
    # Lone UTF-8 lead bytes never complete; they must not hold text forever.
    lead = [i for i in range(len(tokenizer)) if _decode(tokenizer, [i]) == "\ufffd"][:1]
    assert lead, "the tiny tokenizer has byte tokens"
    detok = IncrementalDetokenizer(tokenizer, max_held_tokens=3)
    released = [detok.add(lead[0]) for _ in range(6)]
    assert any(p.token_ids for p in released)
    assert len(detok.pending) <= 4


def test_a_held_back_stop_prefix_costs_bounded_work_per_token(tokenizer):
    """The worst case for holding back: the stop string is the whole output plus one character, so
    every token extends a possible stop prefix. Each token must cost one decode of what is held,
    not a decode of every prefix of it (800 tokens took 13 s that way)."""
    import time

    text = " ".join(TEXTS[1] for _ in range(80))
    ids = tokenizer(text, add_special_tokens=False)["input_ids"][:800]
    assert len(ids) == 800
    whole = tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)
    t0 = time.perf_counter()
    detok, pieces = _feed(tokenizer, ids, stop=[whole + "\u2603"])
    elapsed = time.perf_counter() - t0
    print(f"800 tokens held back behind a {len(whole) + 1}-char stop prefix: {elapsed * 1000:.0f} ms")
    assert not detok.stopped
    assert "".join(p.text for p in pieces) == whole and [i for p in pieces for i in p.token_ids] == ids
    assert elapsed < 3.0  # generous for a loaded machine; about 0.1 s here


def test_hold_back_is_at_most_the_longest_stop_string(tokenizer):
    ids = tokenizer(TEXTS[1] * 3, add_special_tokens=False)["input_ids"]
    detok = IncrementalDetokenizer(tokenizer, ["Xyz", TEXTS[1][:10] + "\u2603"])
    for i in ids:
        detok.add(i)
        held = tokenizer.decode(detok.pending, skip_special_tokens=True, clean_up_tokenization_spaces=False)
        assert len(held) <= 10 + max(len(tokenizer.decode([i])) for i in ids)
