"""Accuracy metrics used by the tests and scripts: SQNR (dB), cosine similarity, relative L2 error.

All are computed in float64 over the whole tensor; NaN anywhere gives NaN (never a passing number).
"""

from __future__ import annotations

import math

import torch


def _pair(out: torch.Tensor, ref: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if out.shape != ref.shape:
        raise ValueError(f"shapes differ: {tuple(out.shape)} vs {tuple(ref.shape)}")
    return out.double().flatten(), ref.double().flatten()


def sqnr_db(out: torch.Tensor, ref: torch.Tensor) -> float:
    """10*log10(|ref|^2 / |out - ref|^2); inf when equal."""
    o, r = _pair(out, ref)
    noise = (o - r).pow(2).sum().item()
    signal = r.pow(2).sum().item()
    if math.isnan(noise) or math.isnan(signal):
        return float("nan")
    if noise == 0:
        return float("inf")
    return 10.0 * math.log10(signal / noise)


def cosine(out: torch.Tensor, ref: torch.Tensor) -> float:
    o, r = _pair(out, ref)
    return torch.nn.functional.cosine_similarity(o, r, dim=0).item()


def rel_l2(out: torch.Tensor, ref: torch.Tensor) -> float:
    o, r = _pair(out, ref)
    return ((o - r).norm() / r.norm()).item()


def report(out: torch.Tensor, ref: torch.Tensor) -> dict[str, float]:
    return {"sqnr_db": sqnr_db(out, ref), "cosine": cosine(out, ref), "rel_l2": rel_l2(out, ref)}
