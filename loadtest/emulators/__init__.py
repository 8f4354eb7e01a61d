"""Emulators of other engines' OpenAI servers (vLLM, SGLang, TGI, llama.cpp's llama-server) for gateway tests: each follows
its project's HTTP API for a cited version (routes, bodies, SSE form, error bodies, metric names)
and generates deterministic text, with a knob for every misbehaviour the gateway must survive.
See :mod:`loadtest.emulators.base` for the knobs and :func:`make_emulator` for the kinds."""

from __future__ import annotations

from loadtest.emulators.base import EmulatorKnobs, EngineEmulator, expected_text, prompt_base
from loadtest.emulators.flavors import FLAVORS, make_emulator

__all__ = ["EmulatorKnobs", "EngineEmulator", "FLAVORS", "expected_text", "make_emulator", "prompt_base"]
