"""The model runner: executes a :class:`SchedulerOutput` on the model and owns every KV tensor.

Decoding sequences live in one batched, left-padded cache (per layer ``[rows, kv_heads, T,
head_dim]``); each step feeds one token per row with explicit position ids and a 2-D attention
mask that hides the padding. A newcomer is prefilled on its own cache (in chunks when the
scheduler says so, starting from a kept session's KV when it reuses one) and then merged into
the batch. Finished rows leave the batch; a finished session's KV is kept, unpadded, per session.

Between membership changes the batch's KV lives in buffers with spare columns, and each decode
step writes its new column in place (:class:`_AppendLayer`): transformers' own cache concatenates
the whole cache at every step, which on a CPU costs more than the rest of the forward together.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from replica.loader import BASE_ADAPTER, LoadedModel
from replica.sampling import sample_tokens
from replica.scheduler import PrefillChunk, SchedulerOutput, Sequence

KV = tuple[list[torch.Tensor], list[torch.Tensor]]  # per-layer keys, values

SPARE_COLUMNS = 32  # columns a decode buffer grows by when it runs out: one copy per 32 steps


@dataclass
class SessionKV:
    """Kept KV of one session: per layer ``[kv_heads, len(token_ids), head_dim]``."""

    token_ids: list[int]
    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    adapter: str | None


def cache_kwarg(model: Any) -> str:
    """The keyword the model's forward takes its KV cache by: ``cache`` in transformers releases
    that renamed it (``past_key_values`` is deprecated there and removed in 5.40), else
    ``past_key_values``."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # peft wraps it
    params = inspect.signature(type(base).forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def _cache_from(keys: list[torch.Tensor], values: list[torch.Tensor]) -> DynamicCache:
    """A DynamicCache holding exactly these tensors (no copy)."""
    cache = DynamicCache()
    for layer, (k, v) in enumerate(zip(keys, values)):
        cache.update(k[:, :, :0], v[:, :, :0], layer)
        cache.layers[layer].keys = k
        cache.layers[layer].values = v
    return cache


class _AppendLayer(DynamicLayer):
    """A cache layer whose keys/values are views of columns ``start:start + width`` of a larger
    buffer: ``update`` writes the new columns into the buffer's spare room and widens the views,
    copying nothing."""

    def __init__(self, key_buffer: torch.Tensor, value_buffer: torch.Tensor, start: int, width: int) -> None:
        super().__init__()
        self.key_buffer, self.value_buffer, self.start = key_buffer, value_buffer, start
        self.keys, self.values = key_buffer[:, :, start:start + width], value_buffer[:, :, start:start + width]
        self.device = key_buffer.device
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any,
               **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        end = self.start + self.keys.shape[2]
        new_end = end + key_states.shape[2]
        self.key_buffer[:, :, end:new_end] = key_states
        self.value_buffer[:, :, end:new_end] = value_states
        self.keys = self.key_buffer[:, :, self.start:new_end]
        self.values = self.value_buffer[:, :, self.start:new_end]
        return self.keys, self.values


@dataclass
class _Buffers:
    """The decode batch's KV storage: per-layer ``[rows, kv_heads, columns, head_dim]`` tensors
    whose columns ``start:start + width`` are the batch's KV and whose later columns are spare."""

    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    start: int

    def holds(self, keys: list[torch.Tensor]) -> bool:
        """Whether ``keys`` are (still) the views of these buffers."""
        b = self.keys[0]
        return bool(keys) and keys[0].data_ptr() == b.data_ptr() + self.start * b.stride(2) * b.element_size() \
            and keys[0].shape[0] == b.shape[0]

    def spare(self, width: int) -> int:
        return self.keys[0].shape[2] - self.start - width


def _new_buffers(parts: list[list[torch.Tensor]], width: int) -> list[torch.Tensor]:
    """Per layer, one buffer of ``width`` + spare columns holding every part's rows (in order)
    right-aligned at ``width``, zeros to their left: one copy of each part."""
    num_rows = sum(part[0].shape[0] for part in parts)
    out = []
    for layer, first in enumerate(parts[0]):
        b = first.new_empty(num_rows, first.shape[1], width + SPARE_COLUMNS, first.shape[3])
        row = 0
        for tensors in parts:
            t = tensors[layer]
            n, w = t.shape[0], t.shape[2]
            b[row:row + n, :, :width - w].zero_()
            b[row:row + n, :, width - w:width] = t
            row += n
        out.append(b)
    return out


def _cache_tensors(cache: DynamicCache) -> KV:
    return [layer.keys for layer in cache.layers], [layer.values for layer in cache.layers]


class ModelRunner:
    def __init__(self, loaded: LoadedModel, seed: int = 0) -> None:
        self.loaded = loaded
        self.model = loaded.model
        self._cache_kwarg = cache_kwarg(loaded.model)
        self.device = loaded.device
        self.use_adapters = bool(loaded.adapter_names)
        self.generator = torch.Generator(device="cpu")
        self.generator.manual_seed(seed)
        self.eos_ids: list[int] = []
        # The decode batch.
        self.rows: list[Sequence] = []
        self.row_lens: list[int] = []  # real (unpadded) tokens per row
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        # While set (and holding them), self.keys/values are views of these buffers.
        self._buffers: _Buffers | None = None
        # Sequences part-way through a chunked prefill: request id -> (keys, values) batch-1 tensors.
        self.prefilling: dict[str, KV] = {}
        self.sessions: dict[str, SessionKV] = {}

    # -- the step -------------------------------------------------------------------------------
    @torch.inference_mode()
    def execute(self, plan: SchedulerOutput) -> dict[str, int]:
        """Run the plan's decodes and prefill chunks; return the token sampled per request."""
        for seq in plan.preempted + plan.ended:
            self.free(seq.request_id)
        for sid in plan.evicted_sessions:
            self.sessions.pop(sid, None)
        sampled: dict[str, int] = {}
        if plan.decodes:
            assert {s.request_id for s in plan.decodes} == {s.request_id for s in self.rows}, \
                "decode plan and runner batch disagree"
            sampled.update(self._decode())
        # Whole prompts with nothing to reuse go through one left-padded forward together.
        whole = [c for c in plan.prefills if c.start == 0 and c.reuse_session is None and c.samples]
        if len(whole) > 1:
            sampled.update(self._prefill_batch(whole))
        for chunk in plan.prefills:
            if len(whole) > 1 and chunk in whole:
                continue
            token = self._prefill(chunk)
            if token is not None:
                sampled[chunk.seq.request_id] = token
        return sampled

    def _forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor, cache: DynamicCache,
                 attention_mask: torch.Tensor | None, adapters: list[str | None]) -> torch.Tensor:
        kwargs: dict[str, Any] = {}
        if self.use_adapters:
            kwargs["adapter_names"] = [a or BASE_ADAPTER for a in adapters]
        out = self.model(
            input_ids=input_ids.to(self.device),
            position_ids=position_ids.to(self.device),
            attention_mask=None if attention_mask is None else attention_mask.to(self.device),
            use_cache=True,
            logits_to_keep=1,
            **{self._cache_kwarg: cache},
            **kwargs,
        )
        return out.logits[:, -1, :]

    def _sample(self, logits: torch.Tensor, seqs: list[Sequence]) -> list[int]:
        suppress = [
            self.eos_ids if s.output_position < s.request.sampling.min_tokens else ()
            for s in seqs
        ]
        return sample_tokens(
            logits, [s.request.sampling for s in seqs], [s.output_position for s in seqs], suppress,
            self.generator,
        )

    def _decode(self) -> dict[str, int]:
        num_rows = len(self.rows)
        width = self.keys[0].shape[2]
        input_ids = torch.tensor([[s.token_ids[-1]] for s in self.rows], dtype=torch.long)
        positions = torch.tensor([[n] for n in self.row_lens], dtype=torch.long)
        mask = torch.zeros((num_rows, width + 1), dtype=torch.long)
        for i, n in enumerate(self.row_lens):
            mask[i, width - n:] = 1
        cache = self._decode_cache(width)
        logits = self._forward(input_ids, positions, cache, mask, [s.request.adapter for s in self.rows])
        self.keys, self.values = _cache_tensors(cache)
        self.row_lens = [n + 1 for n in self.row_lens]
        tokens = self._sample(logits, self.rows)
        return {s.request_id: t for s, t in zip(self.rows, tokens)}

    def _decode_cache(self, width: int) -> DynamicCache:
        """The batch's KV as a cache that appends in place, moved into new buffers with spare
        columns when it has none left (or is not held in buffers)."""
        buffers = self._buffers
        if buffers is None or not buffers.holds(self.keys) or buffers.spare(width) < 1:
            buffers = self._buffers = _Buffers(_new_buffers([self.keys], width),
                                               _new_buffers([self.values], width), 0)
        cache = DynamicCache()
        cache.layers = [_AppendLayer(kb, vb, buffers.start, width) for kb, vb in zip(buffers.keys, buffers.values)]
        return cache

    def _prefill(self, chunk: PrefillChunk) -> int | None:
        seq = chunk.seq
        rid = seq.request_id
        if chunk.reuse_session is not None:
            kept = self.sessions.pop(chunk.reuse_session)
            keys = [k[None, :, : chunk.start] for k in kept.keys]
            values = [v[None, :, : chunk.start] for v in kept.values]
        elif chunk.start > 0:
            keys, values = self.prefilling.pop(rid)
        else:
            self.prefilling.pop(rid, None)
            keys, values = [], []
        cache = _cache_from(keys, values) if keys else DynamicCache()
        input_ids = torch.tensor([seq.token_ids[chunk.start: chunk.end]], dtype=torch.long)
        positions = torch.arange(chunk.start, chunk.end, dtype=torch.long)[None, :]
        logits = self._forward(input_ids, positions, cache, None, [seq.request.adapter])
        keys, values = _cache_tensors(cache)
        if not chunk.samples:
            self.prefilling[rid] = (keys, values)
            return None
        self._join_batch([seq], keys, values, [chunk.end])
        return self._sample(logits, [seq])[0]

    def _prefill_batch(self, chunks: list[PrefillChunk]) -> dict[str, int]:
        seqs = [c.seq for c in chunks]
        lengths = [c.end for c in chunks]
        width = max(lengths)
        input_ids = torch.zeros(len(seqs), width, dtype=torch.long)
        mask = torch.zeros(len(seqs), width, dtype=torch.long)
        for r, (seq, n) in enumerate(zip(seqs, lengths)):
            self.prefilling.pop(seq.request_id, None)
            input_ids[r, width - n:] = torch.tensor(seq.token_ids[:n], dtype=torch.long)
            mask[r, width - n:] = 1
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        cache = DynamicCache()
        logits = self._forward(input_ids, positions, cache, mask, [s.request.adapter for s in seqs])
        keys, values = _cache_tensors(cache)
        self._join_batch(seqs, keys, values, lengths)
        tokens = self._sample(logits, seqs)
        return {s.request_id: t for s, t in zip(seqs, tokens)}

    # -- batch membership ------------------------------------------------------------------------
    def _join_batch(self, seqs: list[Sequence], keys: list[torch.Tensor], values: list[torch.Tensor],
                    lengths: list[int]) -> None:
        """Add rows (already left-padded to their own common width) to the decode batch. The
        joined batch goes straight into new buffers with spare columns."""
        self._buffers = None
        if not self.rows:
            self.keys, self.values = keys, values
        else:
            width = max(self.keys[0].shape[2], keys[0].shape[2])
            buffers = self._buffers = _Buffers(_new_buffers([self.keys, keys], width),
                                               _new_buffers([self.values, values], width), 0)
            self.keys = [b[:, :, :width] for b in buffers.keys]
            self.values = [b[:, :, :width] for b in buffers.values]
        self.rows.extend(seqs)
        self.row_lens.extend(lengths)

    def _leave_batch(self, request_id: str) -> tuple[list[torch.Tensor], list[torch.Tensor], int] | None:
        """Remove a row; return its unpadded KV ([kv_heads, n, head_dim] per layer) and length."""
        index = next((i for i, s in enumerate(self.rows) if s.request_id == request_id), None)
        if index is None:
            return None
        n = self.row_lens[index]
        width = self.keys[0].shape[2]
        row_keys = [k[index, :, width - n:] for k in self.keys]
        row_values = [v[index, :, width - n:] for v in self.values]
        del self.rows[index]
        del self.row_lens[index]
        buffers, self._buffers = self._buffers, None
        if not self.rows:
            self.keys, self.values = [], []
            return row_keys, row_values, n
        keep = [i for i in range(len(self.rows) + 1) if i != index]
        idx = torch.tensor(keep, device=self.keys[0].device)
        trim = width - max(self.row_lens)  # columns that are padding in every remaining row
        if buffers is not None and buffers.holds(self.keys):
            # Select the rows of the whole buffers, spare columns included: still one copy, and the
            # next decode step has room to append without another.
            start = buffers.start + trim
            self._buffers = _Buffers([b.index_select(0, idx) for b in buffers.keys],
                                     [b.index_select(0, idx) for b in buffers.values], start)
            end = buffers.start + width
            self.keys = [b[:, :, start:end] for b in self._buffers.keys]
            self.values = [b[:, :, start:end] for b in self._buffers.values]
        else:
            self.keys = [k.index_select(0, idx)[:, :, trim:] for k in self.keys]
            self.values = [v.index_select(0, idx)[:, :, trim:] for v in self.values]
        return row_keys, row_values, n

    def free(self, request_id: str) -> None:
        self.prefilling.pop(request_id, None)
        self._leave_batch(request_id)

    def finish(self, seq: Sequence, keep_session: bool) -> SessionKV | None:
        """A sequence finished: drop its row, and keep its KV for its session if asked."""
        self.prefilling.pop(seq.request_id, None)
        row = self._leave_batch(seq.request_id)
        if row is None or not keep_session or seq.request.session_id is None:
            return None
        keys, values, n = row
        kept = SessionKV(
            token_ids=list(seq.token_ids[:n]),
            keys=[k.clone() for k in keys],
            values=[v.clone() for v in values],
            adapter=seq.request.adapter,
        )
        self.sessions[seq.request.session_id] = kept
        return kept

    def row_kv(self, request_id: str, start: int) -> tuple[list[torch.Tensor], list[torch.Tensor], int] | None:
        """A copy of a running row's KV from token ``start`` on (for a mid-generation snapshot)."""
        index = next((i for i, s in enumerate(self.rows) if s.request_id == request_id), None)
        if index is None:
            return None
        n = self.row_lens[index]
        width = self.keys[0].shape[2]
        lo = width - n + start
        return ([k[index, :, lo:].to("cpu", copy=True) for k in self.keys],
                [v[index, :, lo:].to("cpu", copy=True) for v in self.values], n)

    @property
    def num_padded_slots(self) -> int:
        if not self.rows:
            return 0
        return len(self.rows) * self.keys[0].shape[2] - sum(self.row_lens)

