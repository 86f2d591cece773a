"""Normalised Walsh-Hadamard matrices for the Hadamard accuracy modes.

H_D (Sylvester construction, entries +-1) scaled by 1/sqrt(D) is symmetric and orthogonal: H @ H = I.
Rotating Q and K by it leaves Q.K^T unchanged and spreads an outlier channel over all D channels, so one
per-head scale loses less; rotating V needs the inverse (H itself) on the attention output. The modes are an option
(`hf_fp8_attention.options.FP8AttentionOptions.hadamard`).
"""

from __future__ import annotations

import functools

import torch


@functools.lru_cache(maxsize=None)
def _sign_matrix(dim: int) -> torch.Tensor:
    h = torch.ones(1, 1)
    while h.shape[0] < dim:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


@functools.lru_cache(maxsize=None)
def _cached(dim: int, device: torch.device, dtype: torch.dtype, normalized: bool) -> torch.Tensor:
    h = _sign_matrix(dim).to(device=device, dtype=dtype)
    return h * dim**-0.5 if normalized else h


def hadamard_matrix(dim: int, device=None, dtype=torch.float32, normalized: bool = True) -> torch.Tensor:
    """(dim, dim) Hadamard matrix, entries +-1 (or +-1/sqrt(dim) when normalized). Cached per device and
    dtype: building it on a GPU from a CPU tensor is a blocking copy, which would stall the host per call.
    Treat the result as read-only."""
    return _cached(dim, torch.device(device) if device is not None else torch.device("cpu"), dtype, normalized)
