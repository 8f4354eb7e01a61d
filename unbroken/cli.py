"""The ``unbroken`` console script: one subcommand per process, plus the local-stack launcher.

``unbroken up | gateway | replica | kvsync | tiny-model DIR``. Each process subcommand hands its
remaining arguments to that package's ``__main__.main(argv)`` so ``python -m replica`` and
``unbroken replica`` are the same program.
"""

from __future__ import annotations

import argparse
import importlib
import sys

_PROCESSES = {
    "up": ("unbroken.launcher", "Bring up the whole local stack (Redis, replicas, gateway)."),
    "gateway": ("gateway.__main__", "Run one gateway."),
    "replica": ("replica.__main__", "Run one model replica."),
    "kvsync": ("kvsync.__main__", "Run one kvsync sidecar."),
}


def _tiny_model(argv: list[str]) -> int:
    from unbroken.tinymodel import SHAPES, write_tiny_model

    parser = argparse.ArgumentParser(
        prog="unbroken tiny-model",
        description="Write a random-weight Qwen checkpoint with a locally trained tokenizer.",
    )
    parser.add_argument("dir", help="output directory")
    parser.add_argument("--shape", choices=SHAPES, default="tiny")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    out = write_tiny_model(args.dir, shape=args.shape, seed=args.seed)
    print(f"wrote {args.shape} Qwen checkpoint to {out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = {**{k: v[1] for k, v in _PROCESSES.items()}, "tiny-model": "Write a tiny random Qwen."}
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: unbroken {%s} [args...]\n" % "|".join(commands))
        for name, help_text in commands.items():
            print(f"  {name:<11} {help_text}")
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command == "tiny-model":
        return _tiny_model(rest)
    if command not in _PROCESSES:
        print(f"unbroken: unknown command {command!r}; choose one of: {', '.join(commands)}",
              file=sys.stderr)
        return 2
    if command == "up":
        from loadtest.faultproxy import start_fault_proxy
        from unbroken.launcher import main as up

        return up(rest, proxy_factory=start_fault_proxy)
    module = importlib.import_module(_PROCESSES[command][0])
    return int(module.main(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
