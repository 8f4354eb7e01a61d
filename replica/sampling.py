"""Token sampling for a batch of rows, each with its own :class:`SamplingParams`.

Greedy rows take the argmax together. Sampled rows apply temperature, top-k and top-p, then draw
with a generator: for a request with a ``seed``, the generator for output position ``k`` is seeded
from ``(seed, k)`` alone, so the token at position ``k`` does not depend on what ran before it,
on which replica, or in which batch. That is what makes a resumed seeded stream exact.
"""

from __future__ import annotations

from typing import Sequence

import torch

from replica.protocol import SamplingParams

_MASK64 = (1 << 63) - 1


def position_seed(seed: int, position: int) -> int:
    """A 63-bit seed for output position ``position`` of a request seeded with ``seed``."""
    x = (seed * 0x9E3779B97F4A7C15 + position * 0xBF58476D1CE4E5B9 + 0x94D049BB133111EB) & _MASK64
    x ^= x >> 31
    x = (x * 0xD6E8FEB86659FD93) & _MASK64
    return x ^ (x >> 29)


def _filter(logits: torch.Tensor, sp: SamplingParams) -> torch.Tensor:
    logits = logits / max(sp.temperature, 1e-5)
    if sp.top_k > 0 and sp.top_k < logits.shape[-1]:
        kth = torch.topk(logits, sp.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if sp.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        # Drop a token when the mass before it already reaches top_p (the first token always stays).
        drop = (probs.cumsum(-1) - probs) >= sp.top_p
        drop[0] = False
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(0, order, sorted_logits)
    return logits


def sample_tokens(
    logits: torch.Tensor,
    params: Sequence[SamplingParams],
    positions: Sequence[int],
    suppress_ids: Sequence[Sequence[int]],
    generator: torch.Generator,
) -> list[int]:
    """Pick one token per row of ``logits`` ([rows, vocab], float32).

    ``positions[i]`` is row i's output position; ``suppress_ids[i]`` are ids it may not emit now
    (EOS before ``min_tokens``)."""
    logits = logits.float().clone()
    for i, ids in enumerate(suppress_ids):
        if ids:
            logits[i, list(ids)] = float("-inf")
    out = logits.argmax(dim=-1).tolist()
    for i, sp in enumerate(params):
        if sp.greedy:
            continue
        probs = torch.softmax(_filter(logits[i], sp), dim=-1)
        if sp.seed is not None:
            g = torch.Generator(device="cpu")
            g.manual_seed(position_seed(sp.seed, positions[i]))
        else:
            g = generator
        out[i] = int(torch.multinomial(probs.cpu(), 1, generator=g).item())
    return out
