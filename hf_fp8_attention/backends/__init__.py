"""Kernel backends: each takes a `QuantizedQKV` (BSHD e4m3 + (B, H_kv) descales) and returns BSHD output.

Signature shared by all: ``fn(qkv, *, is_causal: bool, scale: float, out_dtype) -> Tensor``. A varlen
`QuantizedQKV` (packed sequences) gets the packed (1, total_q, H_q, D) output: fa3 and triton run it in
one launch, the others one sequence at a time (`_per_sequence`).
"""

from __future__ import annotations

import functools
from typing import Callable

import torch

from ..quantization import QuantizedQKV
from .fa3 import fa3_fp8_attention
from .fa4 import fa4_fp8_attention
from .reference import reference_fp8_attention


def _triton_fp8_attention(qkv, *, is_causal, scale, out_dtype):
    # imported on first use: the kernels module needs triton, which the CPU-only install may lack
    from .triton import triton_fp8_attention

    return triton_fp8_attention(qkv, is_causal=is_causal, scale=scale, out_dtype=out_dtype)

BackendFn = Callable[..., torch.Tensor]


def _per_sequence(fn: BackendFn) -> BackendFn:
    """A backend without a varlen kernel: a packed batch runs one sequence at a time, outputs concatenated."""

    @functools.wraps(fn)
    def run(qkv, *, is_causal, scale, out_dtype):
        if not qkv.is_varlen:
            return fn(qkv, is_causal=is_causal, scale=scale, out_dtype=out_dtype)
        parts = [fn(part, is_causal=is_causal, scale=scale, out_dtype=out_dtype) for part in qkv.sequences()]
        return torch.cat(parts, dim=1)

    return run


_BACKEND_FNS: dict[str, BackendFn] = {
    "fa3": fa3_fp8_attention,
    "fa4": _per_sequence(fa4_fp8_attention),
    "triton": _triton_fp8_attention,
    "reference": _per_sequence(reference_fp8_attention),
}


def get_backend_fn(name: str) -> BackendFn:
    try:
        return _BACKEND_FNS[name]
    except KeyError:
        raise ValueError(f"unknown backend {name!r}; expected one of {tuple(_BACKEND_FNS)}") from None


__all__ = ["QuantizedQKV", "get_backend_fn", "fa3_fp8_attention", "fa4_fp8_attention", "reference_fp8_attention"]
