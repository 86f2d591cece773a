"""All coupling to `transformers.masking_utils`: the mask function registered for the fp8 names.

The fp8 adapter wants what flash_attention_2 gets: a 2-D (B, S_kv) padding mask, or None when nothing is
padded (causality and the sliding window are the adapter's job). Patterns it cannot express get the
materialised 4-D mask sdpa would get, which the adapter then runs in bf16 (`fallback`).
"""

from __future__ import annotations

import torch
from transformers.masking_utils import (
    bidirectional_mask_function,
    causal_mask_function,
    flash_attention_mask,
    sdpa_mask,
)


def _is_sliding_causal(mask_function) -> bool:
    """Whether ``mask_function`` is masking_utils' ``sliding_window_causal_mask_function(w)``.

    That function returns ``and_masks(sliding_window_overlay(w), causal_mask_function)``, a closure; it is
    recognised by its parts. Anything not recognised gets a materialised 4-D mask (correct, bf16 fallback).
    """
    if getattr(mask_function, "__qualname__", "") != "and_masks.<locals>.and_mask":
        return False
    for cell in mask_function.__closure__ or ():
        parts = cell.cell_contents
        if isinstance(parts, tuple) and len(parts) == 2:
            names = {getattr(p, "__qualname__", "") for p in parts if p is not causal_mask_function}
            return causal_mask_function in parts and names == {"sliding_window_overlay.<locals>.inner_mask"}
    return False


def _static_causal_mask(batch_size: int, q_length: int, kv_length: int, q_offset: torch.Tensor,
                        attention_mask: torch.Tensor | None) -> torch.Tensor:
    """A compiled step of a static cache (its length a device tensor ``q_offset``): the (B, 1, q_length,
    kv_length) bool mask sdpa would get, query i seeing the slots up to q_offset + i that the 2-D padding mask
    keeps, built on the device (no host sync, one shape at every step: one compiled step and its CUDA graph
    serve every length). The adapter runs such a mask in bf16 (correct); `FP8StaticCache`'s fused forward
    attends the filled slots itself and ignores it. (Eager calls keep the flash-style 2-D mask below, cut at
    the last query, which the adapter runs in fp8: it aligns the queries with the last keys.)"""
    device = q_offset.device
    rows = q_offset + torch.arange(q_length, device=device)
    mask = (torch.arange(kv_length, device=device)[None, :] <= rows[:, None])[None, None]
    mask = mask.expand(batch_size, 1, q_length, kv_length)
    if attention_mask is not None and attention_mask.dim() == 2:
        keep = attention_mask[:, :kv_length].to(device=device, dtype=torch.bool)
        if keep.shape[-1] < kv_length:  # a mask as long as the tokens so far: the slots past it are unfilled
            keep = torch.nn.functional.pad(keep, (0, kv_length - keep.shape[-1]), value=True)
        mask = mask & keep[:, None, None, :]
    return mask


def fp8_attention_mask(
    batch_size: int,
    q_length: int,
    kv_length: int,
    q_offset: int = 0,
    kv_offset: int = 0,
    mask_function=causal_mask_function,
    attention_mask: torch.Tensor | None = None,
    **kwargs,
):
    """Mask function registered for the fp8 names in `AttentionMaskInterface`.

    Plain causal, bidirectional and sliding-window-causal patterns get the flash-style mask: the (B, S_kv)
    bool padding mask, or None without padding (the adapter handles causality and the window itself).
    Every other pattern (packed sequences found from position_ids, or/and overlays such as image tokens,
    chunked attention) is materialised as the 4-D bool mask sdpa would get, which the adapter runs in
    bf16: transformers gives no mask at all to names without a mask function, which would drop padding.
    """
    plain = mask_function in (causal_mask_function, bidirectional_mask_function)
    if (mask_function is causal_mask_function and isinstance(q_offset, torch.Tensor) and kv_offset == 0
            and torch.compiler.is_compiling()):  # a compiled static-cache step: no host read of the length
        return _static_causal_mask(batch_size, q_length, kv_length, q_offset, attention_mask)
    if plain or _is_sliding_causal(mask_function):
        # The adapter assumes the queries are the last q_length of the keys (bottom-right), true for no
        # cache and for dynamic caches. A StaticCache has empty slots after the queries: pass a mask that
        # stops at the last query (the adapter drops the keys past it), as flash_attention_mask does when
        # it is given a padding mask shorter than the cache.
        q_end = int(q_offset) + q_length
        kv_end = int(kv_offset) + kv_length
        mask = flash_attention_mask(
            batch_size, q_length, kv_length, q_offset, kv_offset, mask_function, attention_mask, **kwargs
        )
        if q_end == kv_end:
            return mask
        if plain and mask_function is causal_mask_function and int(kv_offset) == 0 and q_end < kv_length:
            if mask is None:
                return torch.ones(batch_size, q_end, dtype=torch.bool, device=kwargs.get("device", "cpu"))
            return mask[:, :q_end]
    kwargs.update(allow_is_causal_skip=False, allow_is_bidirectional_skip=False)
    return sdpa_mask(batch_size, q_length, kv_length, q_offset, kv_offset, mask_function, attention_mask, **kwargs)
