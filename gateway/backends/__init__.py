"""Backend kinds: how the gateway learns what one replica is, how loaded it is, and how far a
stream on it can be resumed elsewhere.

Every kind is one small class (one file each) behind :class:`BackendProbe`: ``poll()`` asks the
engine what it exposes (its health route, its model list, its Prometheus metrics) and returns the
same :class:`ReplicaStateReport` the project's replicas serve at ``/state``, so least-load,
power-of-two, session affinity, breakers, retries, hedging and degradation work alike for every
kind. ``kind: auto`` asks the server what it is once it answers (:mod:`gateway.backends.detect`).

Resume modes (what a failover after the first byte can do, best first):
- ``token``: the prompt and the generated token ids move exactly (the project's replicas:
  ``resume_token_ids``);
- ``text``: the partial answer is sent back as an assistant prefix (chat, for engines that accept
  one) or appended to the prompt (completions); the continuation is re-tokenized, so it is
  *inexact* (counted apart in metrics);
- ``none``: fail over only before the first byte; afterwards the stream ends with an SSE error event.
"""

from __future__ import annotations

from gateway.backends.base import (BACKENDS, BackendProbe, BackendTraits, ProbeError, ResumeMode, kind_names,
                                   make_probe)

__all__ = ["BACKENDS", "BackendProbe", "BackendTraits", "ProbeError", "ResumeMode", "kind_names", "make_probe"]

# Importing the modules registers them.
from gateway.backends import detect, llamacpp, openai, sglang, tgi, unbroken, vllm  # noqa: E402,F401,I001
