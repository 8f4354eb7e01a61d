"""Benchmark: the replica's incremental detokenizer when a stop string holds text back.

The worst case for a stop string is one that the output keeps almost matching: the stop string is
the model's next output plus one character, so every token extends a possible stop prefix and the
detokenizer must hold it back. This runs 800 tokens of the tiny model's tokenizer through
:class:`replica.detokenizer.IncrementalDetokenizer` three ways, in the same run:

- baseline: no stop string;
- capped: a stop string of ``server.max_stop_string_chars`` (256) characters, the next output's
  first 255 characters plus one (the longest a replica accepts);
- uncapped: the whole output plus one character (thousands of characters; what a replica would
  face without the cap).

The replica runs this on its event loop, so the time is time every other stream on it waits.

Usage: ``python -m loadtest.bench_detokenizer [--tokens 800] [--rounds 5] [--model DIR]``
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from replica.detokenizer import IncrementalDetokenizer

SENTENCE = "The gateway routes each request to the replica with the shortest queue."


def _run(tokenizer, ids: list[int], stop: list[str]) -> float:
    detok = IncrementalDetokenizer(tokenizer, stop)
    t0 = time.perf_counter()
    for i in ids:
        detok.add(i)
    detok.flush()
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tokens", type=int, default=800)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--stop-chars", type=int, default=256, help="the capped stop string's length")
    p.add_argument("--model", help="checkpoint directory whose tokenizer is used (default: a tiny model)")
    args = p.parse_args(argv)
    from transformers import AutoTokenizer

    model = args.model
    if model is None:
        from unbroken.tinymodel import write_tiny_model

        model = str(write_tiny_model(Path(tempfile.mkdtemp(prefix="bench-detok-")), shape="tiny", seed=0))
    tokenizer = AutoTokenizer.from_pretrained(model)
    text = " ".join([SENTENCE] * (args.tokens // 8 + 1))
    ids = tokenizer(text, add_special_tokens=False)["input_ids"][:args.tokens]
    whole = tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)
    cases = {
        "baseline (no stop)": [],
        f"capped ({args.stop_chars}-char stop)": [whole[:args.stop_chars - 1] + "\u2603"],
        f"uncapped ({len(whole) + 1}-char stop)": [whole + "\u2603"],
    }
    times: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(args.rounds):
        for name, stop in cases.items():
            times[name].append(_run(tokenizer, ids, stop))
    base = statistics.median(times["baseline (no stop)"])
    print(f"{len(ids)} tokens, median of {args.rounds} rounds")
    print(f"{'case':34} {'total ms':>9} {'us/token':>9} {'vs baseline':>12}")
    for name, ts in times.items():
        t = statistics.median(ts)
        print(f"{name:34} {t * 1000:9.1f} {t / len(ids) * 1e6:9.1f} {t / base:11.1f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
