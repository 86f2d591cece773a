"""Launchers of the FP8 KV cache kernels, and their torch counterparts (CPU, or ``impl="torch"``).

`write_blocks` appends tokens to a layer's fp8 storage; `cache_attention` runs new queries against it. Both
take an ``impl``: "triton" (the kernels of `kernels.py`; CUDA on SM 8.9+, or the interpreter in CPU tests)
or "torch" (`reference.py`).
"""

from __future__ import annotations

import os

import torch

from .._constants import FP8_MAX, KV_BLOCK, SUPPORTED_HEAD_DIMS
from .._intmath import cdiv, next_power_of_2
from . import reference


def _unit_last(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def write_blocks(key, value, cos, sin, k8, v8, k_desc, v_desc, tail_in, tail_out, length: int, *, impl: str) -> None:
    """Append key/value (B, H, n, D) after ``length`` cached tokens (key rotated with cos/sin (B or 1, n, D)
    first when given) into k8/v8 (B, H, capacity, D) e4m3 and k_desc/v_desc (B, H, capacity // KV_BLOCK),
    re-quantizing the partial block at ``length`` from tail_in (2, B, H, KV_BLOCK, D) float32 (K, V) and
    leaving the new partial block's float32 values in tail_out (may be tail_in for impl="torch")."""
    n = key.shape[2]
    b0 = length // KV_BLOCK * KV_BLOCK
    if impl == "torch":
        r = length - b0
        k = key.float()
        if cos is not None:
            k = reference.apply_rope_reference(k, cos, sin)
        kx = torch.cat((tail_in[0, :, :, :r], k), dim=2)
        vx = torch.cat((tail_in[1, :, :, :r], value.float()), dim=2)
        end_full = (r + n) // KV_BLOCK * KV_BLOCK
        for x, codes_out, desc_out, slot in ((kx, k8, k_desc, 0), (vx, v8, v_desc, 1)):
            codes, desc = reference.quantize_blocks(x)
            codes_out[:, :, b0 : b0 + r + n] = codes
            desc_out[:, :, b0 // KV_BLOCK : b0 // KV_BLOCK + desc.shape[-1]] = desc
            tail_out[slot, :, :, : r + n - end_full] = x[:, :, end_full:]
        return
    B, H, _, D = k8.shape
    key, value = _unit_last(key), _unit_last(value)
    rope = cos is not None
    if rope:
        cos, sin = _unit_last(cos), _unit_last(sin)
    n_blocks = cdiv(length + n, KV_BLOCK) - length // KV_BLOCK
    from ..attention import _on_device
    from .kernels import cache_write_kernel

    with _on_device(k8):  # the cache's GPU (device_map="auto" spreads layers over several)
        cache_write_kernel[(n_blocks, B * H)](
            key, value, cos if rope else key, sin if rope else key, k8, v8, k_desc, v_desc,
            tail_in[0], tail_in[1], tail_out[0], tail_out[1],
            key.stride(0), key.stride(2), key.stride(1), value.stride(0), value.stride(2), value.stride(1),
            (cos.stride(0) if cos.shape[0] > 1 else 0) if rope else 0, cos.stride(1) if rope else 0,
            k8.stride(0), k8.stride(1), k_desc.stride(0), k_desc.stride(1),
            H, length, n,
            HEAD_DIM=D, HALF_PAD=next_power_of_2(D // 2), APPLY_ROPE=rope, FP8_MAX=FP8_MAX, KV_BLOCK=KV_BLOCK,
            num_warps=4, enable_fp_fusion=False,
        )


# Query rows per KV head (S_q * H_q / H_kv) up to which Q and P are fp16 (decode: memory-bound, the fp8
# products would save nothing); above, both products run in e4m3 (chunked prefill: compute-bound).
FP16_MAX_ROWS = 64
_MAX_SPLITS = 64
# The fused combine runs under the interpreter (CPU tests: programs in sequence) but is refused on a GPU: on
# the H200 (2026-12-01) its output differed from the two-launch combine (tests/gpu/test_kv_cache_gpu.py,
# fused_combine alone, 5000 keys, GQA 32/8). Likely cause, found offline (sm_90 SASS, triton 3.6): not an
# ordering bug but FMA contraction. `cache_combine_kernel` was launched with fp fusion on (ptxas contracted
# `l_sum += w * l` and `acc += o * w` into 17 FFMA per thread), the fused combine runs inside the attention
# kernel, launched with it off (FMUL + FADD): two roundings vs one, not bit-equal; the interpreter (numpy)
# never contracts, hence equal on CPU. The combine is now launched with fp fusion off too. Until a GPU run
# confirms bit equality, fused_combine stays refused on GPUs unless HF_FP8_KV_FUSED_COMBINE=1 (benchmarks).
_FUSED_COMBINE_REFUSED = ("config fused_combine is disabled on GPUs: its output differed from the two-launch "
                          "combine on the H200 (likely the combine kernel's FMA contraction, fixed, not yet "
                          "re-checked on a GPU; HF_FP8_KV_FUSED_COMBINE=1 allows it)")
CONFIG_KEYS = ("programs_per_sm", "num_warps", "num_stages", "block_n", "tile_softmax", "fused_combine",
               "prefetch_desc", "exact_waves", "wide_combine", "widen_v")
BLOCK_N_CHOICES = tuple(KV_BLOCK * n for n in (1, 2, 4))
# Candidate decode configs for the H200 (not yet measured, built offline from sm_90 SASS, see the module
# docstring of `kernels.py`): benchmarks time them next to the default (bench_decode.py --part attention).
# programs_per_sm = the CTAs/SM the sm_90 build (triton 3.6) can hold: registers x warps and shared memory
# (w2 s2: 185 regs, 38.9 KB -> 5; w2 s3: 183 regs, 55.3 KB -> 4; w4 s2: 109 regs, 38.9 KB -> 4).
_FAST = dict(widen_v=True, prefetch_desc=True, exact_waves=True, wide_combine=True)
DECODE_FAST = {
    "fast w2 s2 p5": dict(_FAST, num_warps=2, num_stages=2, programs_per_sm=5),
    "fast w2 s3 p4": dict(_FAST, num_warps=2, num_stages=3, programs_per_sm=4),
    "fast w4 s2 p4": dict(_FAST, num_warps=4, num_stages=2, programs_per_sm=4),
}

# FUSED_COMBINE's arrival counters, one zeroed int32 buffer per device that the kernel leaves zeroed (no
# memset launch per call). Shared by every call on the device: calls on concurrent streams would race.
_COUNTERS: dict[torch.device, torch.Tensor] = {}


def _counters(device: torch.device, n: int) -> torch.Tensor:
    buf = _COUNTERS.get(device)
    if buf is None or buf.numel() < n:
        buf = _COUNTERS[device] = torch.zeros(max(n, 4096), dtype=torch.int32, device=device)
    return buf


def _check_config(config: dict) -> None:
    unknown = sorted(set(config) - set(CONFIG_KEYS))
    if unknown:
        raise ValueError(f"cache_attention config: unknown keys {unknown}; expected some of {list(CONFIG_KEYS)}")
    if "block_n" in config and config["block_n"] not in BLOCK_N_CHOICES:
        raise ValueError(f"cache_attention config: block_n must be one of {BLOCK_N_CHOICES} (multiples of the "
                         f"cache block {KV_BLOCK}), got {config['block_n']!r}")
    if config.get("prefetch_desc") and config.get("block_n", KV_BLOCK) != KV_BLOCK:
        raise ValueError(f"cache_attention config: prefetch_desc needs block_n {KV_BLOCK}, got {config['block_n']!r}")
    for key in ("programs_per_sm", "num_warps", "num_stages"):
        if key in config and (not isinstance(config[key], int) or config[key] < 1):
            raise ValueError(f"cache_attention config: {key} must be a positive int, got {config[key]!r}")


def pick_num_splits(length: int, tiles: int, sms: int, config: dict) -> int:
    """Key splits for ``tiles`` (row tiles x B x H_kv) programs' worth of work on ``sms`` SMs: about
    programs_per_sm (default 8) programs per SM, rounded up (default) or, with "exact_waves", down so that
    they fit the slots; each split >= 4 cache blocks, at most `_MAX_SPLITS`."""
    # decode programs are small (16-64 rows): several per SM keep enough loads in flight
    slots = config.get("programs_per_sm", 8) * sms
    # at most 64 splits: the combine walks them one by one, with few programs when B * H_kv is small
    # (H200, 1x128k GQA 32/8: 132 splits took 0.152 ms, 66 splits 0.113 ms)
    fill = slots // tiles if config.get("exact_waves") else cdiv(slots, tiles)
    return max(1, min(fill, cdiv(length, 4 * KV_BLOCK), _MAX_SPLITS))


def cache_attention(query, cos, sin, k8, k_desc, v8, v_desc, length: int, *, scale: float, impl: str,
                    qk_fp8: bool | None = None, num_splits: int | None = None,
                    config: dict | None = None) -> torch.Tensor:
    """New queries (B, S_q, H_q, D) (un-rotated when cos/sin are given) against the first ``length`` cached
    tokens, the queries being the last S_q of them -> (B, S_q, H_q, D) contiguous in query's dtype.

    qk_fp8: None picks by rows per KV head (`FP16_MAX_ROWS`). num_splits: None picks from the GPU's SM
    count (``programs_per_sm`` programs per SM, default 8, each with >= 4 key blocks); tests and
    benchmarks force values. config (benchmarks): "programs_per_sm", "num_warps", "num_stages"; "block_n"
    keys per loop iteration of the attention kernel (64 (default, one cache block), 128 or 256), in
    one-block softmax steps (the 64-key math bit for bit) or, with "tile_softmax" (default False; fp16
    products only, ignored with qk_fp8), one step per block_n keys with V's descales folded into P (P's fp16
    rounding moves: ~2 dB lower SQNR where it dominates, 77 -> 75 dB on float32 CPU data); "fused_combine"
    (default False): the last split program of each row tile merges the splits, one launch instead of two
    (interpreter only: refused on a GPU, see `_FUSED_COMBINE_REFUSED`).
    Decode-speed variants (default False, see `DECODE_FAST`): "prefetch_desc" (block_n 64 only): each
    iteration loads the next block's K/V descales, carried in registers (same values, same output);
    "exact_waves": the split count rounded down, not up, so the programs fit programs_per_sm * SMs slots
    (8x32k GQA 32/8 at 4/SM: 8 splits, 512 programs for 528 slots, not 9 splits, 576 programs, a second
    wave of 48); "wide_combine": `cache_combine_wide_kernel`, one program per query row loading all of
    its splits at once (sums over splits in tree order: last-bit differences from the default combine);
    "widen_v" (fp16 products): V's e4m3 tile widened to fp16 in its load layout by inline PTX (GPU only; the
    interpreter takes the plain cast, the same values), so it reaches the P.V operand through 16-byte shared
    stores and ldmatrix.trans instead of one-byte shared loads (sm_90 SASS, 2 warps, per 64 keys and
    thread: 128 LDS.U8 gone, 8-byte V copies become 16-byte; the loop 1137 -> 811 instructions, 183
    registers instead of 255; +16 KB shared memory). Same output bit for bit.
    """
    config = config or {}
    _check_config(config)
    B, S_q, H_q, D = query.shape
    H_kv = k8.shape[1]
    if D not in SUPPORTED_HEAD_DIMS:
        raise ValueError(f"fp8 cache attention supports head_dim {SUPPORTED_HEAD_DIMS}, got {D}")
    if H_q % H_kv:
        raise ValueError(f"query heads ({H_q}) must be a multiple of the cache's KV heads ({H_kv})")
    if not 0 < S_q <= length:
        raise ValueError(f"{S_q} new queries against {length} cached tokens: the queries must be cached first")
    group = H_q // H_kv
    n_rows = S_q * group
    if qk_fp8 is None:
        qk_fp8 = n_rows > FP16_MAX_ROWS
    if impl == "torch":
        return reference.cache_attention_reference(query, cos, sin, k8, k_desc, v8, v_desc, length, scale=scale,
                                                   qk_fp8=qk_fp8)
    from ..attention import _on_device
    from ..backends.triton import _interpreting, _num_sms
    from .kernels import cache_attn_kernel, cache_combine_kernel, cache_combine_wide_kernel

    with _on_device(query):  # the cache's GPU (device_map="auto" spreads layers over several)
        query = _unit_last(query)
        rope = cos is not None
        if rope:
            cos, sin = _unit_last(cos), _unit_last(sin)
        out = torch.empty(B, S_q, H_q, D, dtype=query.dtype, device=query.device)
        block_m = min(128 if qk_fp8 else 64, max(16, next_power_of_2(n_rows)))
        m_tiles = cdiv(n_rows, block_m)
        if num_splits is None:
            sms = 4 if _interpreting() or not query.is_cuda else _num_sms(query.device.index or 0)
            num_splits = pick_num_splits(length, m_tiles * B * H_kv, sms, config)
        keys_per_split = cdiv(cdiv(length, num_splits), KV_BLOCK) * KV_BLOCK
        num_splits = cdiv(length, keys_per_split)
        dim_pad = next_power_of_2(D)
        split = num_splits > 1
        if config.get("fused_combine") and query.is_cuda and os.environ.get("HF_FP8_KV_FUSED_COMBINE") != "1":
            raise ValueError(_FUSED_COMBINE_REFUSED)
        fused = split and bool(config.get("fused_combine", False))
        if split:
            o_part = torch.empty(num_splits, B * H_kv, n_rows, dim_pad, dtype=torch.float32, device=query.device)
            ml_part = torch.empty(num_splits, B * H_kv, n_rows, 2, dtype=torch.float32, device=query.device)
        else:
            o_part = ml_part = out  # never read
        counter = _counters(query.device, m_tiles * B * H_kv) if fused else out  # never read unless fused
        cache_attn_kernel[(m_tiles, B * H_kv, num_splits)](
            query, cos if rope else query, sin if rope else query, k8, v8, k_desc, v_desc, out, o_part, ml_part,
            counter,
            query.stride(0), query.stride(1), query.stride(2),
            (cos.stride(0) if cos.shape[0] > 1 else 0) if rope else 0, cos.stride(1) if rope else 0,
            k8.stride(0), k8.stride(1), k_desc.stride(0), k_desc.stride(1),
            out.stride(0), out.stride(1),
            H_kv, S_q, length, float(scale), keys_per_split,
            GROUP=group, HEAD_DIM=D, HEAD_DIM_PAD=dim_pad, APPLY_ROPE=rope, QK_FP8=bool(qk_fp8), SPLIT=split,
            FP8_MAX=FP8_MAX, BLOCK_M=block_m, BLOCK_N=config.get("block_n", KV_BLOCK), KV_BLOCK=KV_BLOCK,
            TILE_SOFTMAX=bool(config.get("tile_softmax", False)), FUSED_COMBINE=fused,
            PREFETCH_DESC=bool(config.get("prefetch_desc", False)),
            WIDEN_V=bool(config.get("widen_v", False)) and not _interpreting(),
            # H200 sweep of 36 settings (docs/results/kv_cache_debug_sweep_h200.log; decode, GQA 32/8, D=128):
            # best 1x128k (4/SM, 2 warps) 0.113 ms, 8x32k (16/SM, 2 warps) 0.193 ms, (8/SM, 2 warps) 0.199 ms;
            # the earlier (4/SM, 4 warps) 0.147 / 0.210 ms
            num_warps=config.get("num_warps", 8 if block_m >= 128 else (2 if block_m <= 16 else 4)),
            num_stages=config.get("num_stages", 3),
            enable_fp_fusion=False,
        )
        # fp fusion off in both combines, as in the attention kernel (and its fused combine): no FMA contraction
        if split and not fused and config.get("wide_combine") and num_splits <= _MAX_SPLITS:
            cache_combine_wide_kernel[(n_rows, B * H_kv)](
                out, o_part, ml_part, out.stride(0), out.stride(1), H_kv, S_q, num_splits,
                GROUP=group, HEAD_DIM=D, HEAD_DIM_PAD=dim_pad, SPLITS_PAD=next_power_of_2(_MAX_SPLITS),
                num_warps=4, enable_fp_fusion=False,
            )
        elif split and not fused:
            block_r = min(64, max(16, next_power_of_2(n_rows)))
            cache_combine_kernel[(cdiv(n_rows, block_r), B * H_kv)](
                out, o_part, ml_part, out.stride(0), out.stride(1), H_kv, S_q, num_splits,
                GROUP=group, HEAD_DIM=D, HEAD_DIM_PAD=dim_pad, BLOCK_R=block_r, num_warps=4,
                enable_fp_fusion=False,
            )
        return out
