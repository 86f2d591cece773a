"""Padding and packing, as Transformers' modeling_flash_attention_utils: padded batches and packed
sequences run exactly in fp8 instead of falling back.

- `_padding_spans`: per batch row, the one contiguous run of valid keys of a 2-D padding mask (left or
  right padding), or None when some row is not one run (the adapter then falls back to bf16).
- `_fp8_padded`: each row attended over its run; rows that differ are packed into one `fp8_sdpa_varlen`
  call (`_query_runs` -> `_packing_plan`). Padded query rows are zeros, as FlashAttention-2 returns them.
- `_packed_offsets`: FlashAttention's ``cu_seq_lens_q/k`` kwargs (packed sequences in one row) as host
  int32 offsets for `fp8_sdpa_varlen`.

The same mask / offsets reach every layer of one forward, so what costs a host sync is computed once per
forward and kept in a `_PerForwardCache`.
"""

from __future__ import annotations

import itertools
import weakref
from typing import Any, Callable, Hashable

import torch

from ..options import FP8AttentionOptions
from ..sdpa import fp8_sdpa, fp8_sdpa_varlen


class _PerForwardCache:
    """One value computed from some tensors and a hashable key, kept while those very tensors, unmodified,
    come back with an equal key: the same mask / offsets objects reach every layer of one forward, so their
    host sync happens once per forward. Weak references (a freed tensor whose address is reused can never
    hit) and version counters (in-place edits recompute); inference tensors have no version counter, so
    they are never cached. With no tensors the key alone decides (a value that is a function of the key)."""

    def __init__(self):
        self._refs, self._versions, self._key, self._value = None, None, None, None

    def get(self, tensors: tuple[torch.Tensor, ...], compute: Callable[[], Any], key: Hashable = None):
        if any(t.is_inference() for t in tensors):
            return compute()
        versions = tuple(t._version for t in tensors)
        if (self._refs is not None and len(self._refs) == len(tensors)
                and all(r() is t for r, t in zip(self._refs, tensors))
                and self._versions == versions and self._key == key):
            return self._value
        value = compute()
        self._refs, self._versions, self._key = tuple(weakref.ref(t) for t in tensors), versions, key
        self._value = value
        return value


_offsets_cache = _PerForwardCache()
_spans_cache = _PerForwardCache()
_plan_cache = _PerForwardCache()


def _packed_offsets(query, key, kwargs) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(cu_seqlens_q, cu_seqlens_k) as int32 CPU tensors when FlashAttention's packed-sequence kwargs came
    with this call (batch 1); None otherwise."""
    cu_q, cu_k = kwargs.get("cu_seq_lens_q"), kwargs.get("cu_seq_lens_k")
    if cu_q is None or query.shape[0] != 1:
        return None
    cu_k = cu_q if cu_k is None else cu_k
    # the one host sync; fp8_sdpa_varlen validates them against the tokens of every call
    return _offsets_cache.get((cu_q, cu_k), lambda: tuple(t.detach().to("cpu", torch.int32) for t in (cu_q, cu_k)))


def _padding_spans(mask2d: torch.Tensor) -> list[tuple[int, int]] | None:
    """Per batch row, the [start, end) run of valid keys ((0, 0) if none); None if some row is not one run.
    One host sync per mask object (`_PerForwardCache`)."""
    return _spans_cache.get((mask2d,), lambda: _compute_padding_spans(mask2d))


def _compute_padding_spans(mask2d: torch.Tensor) -> list[tuple[int, int]] | None:
    valid = mask2d.to(torch.bool)
    length = valid.shape[1]
    counts = valid.sum(dim=1)
    first = valid.int().argmax(dim=1)
    end = length - valid.flip(1).int().argmax(dim=1)
    rows = torch.stack([counts, first, end], dim=1).tolist()  # the host sync
    spans = []
    for count, start, stop in rows:
        if count == 0:
            spans.append((0, 0))
        elif stop - start != count:
            return None
        else:
            spans.append((start, stop))
    return spans


def _fp8_padded(query, key, value, spans, *, is_causal, scaling, backend,
                options: FP8AttentionOptions | dict | None = None) -> torch.Tensor:
    """fp8 attention of each row over its valid keys. Returns (B, S_q, H_q, D), padded queries zero.

    Query i sits at key position S_kv - S_q + i (bottom-right alignment, as with a KV cache); it is valid
    when that position is inside the row's run [start, end). The valid queries then end at key end - 1, so
    bottom-right causal attention on the (queries, keys[start:end]) slice is exactly the masked attention.
    When every row has the same run, one `fp8_sdpa` call on the slices; otherwise the valid tokens are
    packed and go through `fp8_sdpa_varlen` (one quantize launch, one attention launch on triton/fa3).
    """
    extra = FP8AttentionOptions.coerce(options).changed()  # defaults are not passed on
    batch, heads, s_q, dim = query.shape
    s_kv = key.shape[2]
    out = query.new_zeros(batch, s_q, heads, dim)
    runs = _query_runs(spans, s_q, s_kv, is_causal)
    if not runs:
        return out
    if len(runs) == batch and len(set(r[1:] for r in runs)) == 1:
        _, start, end, q_start, q_end = runs[0]
        causal = is_causal and q_end - q_start > 1
        res = fp8_sdpa(query[:, :, q_start:q_end], key[:, :, start:end], value[:, :, start:end],
                       is_causal=causal, scale=scaling, backend=backend, **extra)
        out[:, q_start:q_end] = res.transpose(1, 2)
        return out
    idx_q, idx_k, cu_q, cu_k = _packing_plan(runs, s_q, s_kv, query.device)
    pack = lambda x, idx: x.transpose(1, 2).reshape(-1, x.shape[1], dim).index_select(0, idx)  # noqa: E731
    res = fp8_sdpa_varlen(pack(query, idx_q), pack(key, idx_k), pack(value, idx_k), cu_q, cu_k,
                          is_causal=is_causal, scale=scaling, backend=backend, **extra)
    out.view(batch * s_q, heads, dim).index_copy_(0, idx_q, res)
    return out


def _query_runs(spans, s_q, s_kv, is_causal) -> list[tuple[int, int, int, int, int]]:
    """(row, key start, key end, query start, query end) of every row with >= 1 valid query and key."""
    offset = s_kv - s_q
    runs = []
    for row, (start, end) in enumerate(spans):
        if is_causal and offset >= 0:
            q_start, q_end = max(0, start - offset), min(s_q, end - offset)
        else:  # non-causal (e.g. cross-attention): the key mask says nothing about which queries are valid
            q_start, q_end = 0, s_q
        if q_end > q_start and end > start:
            runs.append((row, start, end, q_start, q_end))
    return runs


def _packing_plan(runs, s_q, s_kv, device):
    """Row indices of the valid queries / keys in the flattened (B * S, H, D) tensors (on `device`) and
    the int32 offsets of the packed sequences (on the host: `fp8_sdpa_varlen` checks them without a sync).
    A pure function of its arguments, so every layer of one forward reuses the plan (`_PerForwardCache`
    keyed on them: no tensors to track)."""
    return _plan_cache.get((), lambda: _compute_packing_plan(runs, s_q, s_kv, device),
                           key=(tuple(runs), s_q, s_kv, torch.device(device)))


def _compute_packing_plan(runs, s_q, s_kv, device):
    idx_q = torch.cat([torch.arange(row * s_q + a, row * s_q + b) for row, _, _, a, b in runs])
    idx_k = torch.cat([torch.arange(row * s_kv + a, row * s_kv + b) for row, a, b, _, _ in runs])
    cu = lambda lengths: torch.tensor([0, *itertools.accumulate(lengths)], dtype=torch.int32)  # noqa: E731
    return idx_q.to(device), idx_k.to(device), cu([b - a for *_, a, b in runs]), cu([b - a for _, a, b, _, _ in runs])
