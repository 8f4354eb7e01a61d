"""``python -m loadtest.emulators --kind vllm --port N [--model NAME] [--token-interval-ms MS]
[--tokenizer DIR]``: one emulated engine server in its own process (Ctrl-C or SIGTERM ends it). With
``--tokenizer``, token-id requests (vLLM's prompt of ids, SGLang's ``/generate``) are answered by
the greedy hash model over that tokenizer's words (:mod:`loadtest.emulators.tokens`)."""

from __future__ import annotations

import argparse
import asyncio
import signal

from loadtest.emulators import EmulatorKnobs, make_emulator
from loadtest.emulators.flavors import FLAVORS


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m loadtest.emulators", description=__doc__)
    p.add_argument("--kind", required=True, choices=sorted(FLAVORS))
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--model", default="qwen")
    p.add_argument("--token-interval-ms", type=float, default=0.0)
    p.add_argument("--tokenizer", default="", help="directory with tokenizer.json: answer token-id requests")
    args = p.parse_args(argv)
    token_model = None
    if args.tokenizer:
        from loadtest.emulators.tokens import HashGreedyModel

        token_model = HashGreedyModel(args.tokenizer)

    async def run() -> None:
        emu = await make_emulator(args.kind, EmulatorKnobs(token_interval_ms=args.token_interval_ms),
                                  model=args.model, token_model=token_model).start(args.port)
        print(f"{args.kind} emulator on {emu.url}", flush=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        await emu.stop()

    asyncio.run(run())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
