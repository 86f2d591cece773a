"""Pure-torch reference of the FP8 Q/K/V quantization (optional RoPE, per-(batch, KV head) scales).

Input layout BHSD (any strides), output layout BSHD contiguous. The Triton path in ``qkv.py`` computes
exactly the same float32 math, bit for bit but for summation orders (Hadamard, offsets; see
`qkv.quantize_qkv_fp8` and tests/cpu/test_quantize.py).
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import torch

from .._constants import FP8_DTYPE, FP8_MAX, INT8_MAX, SCALE_BLOCK, V_SCALE_BLOCK, k_scale_block
from .._intmath import cdiv
from ..options import NO_MODES, FP8AttentionOptions
from .hadamard import hadamard_matrix
from .quantized import (QuantizedQKV, check_cu_seqlens, check_q_in_kernel, check_rope_args, check_wgmma_order,
                        keys_contiguous, rows_bhsd, wgmma_key_order)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """Llama/Qwen/Mistral convention: cat(-x[..., D/2:], x[..., :D/2])."""
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope_reference(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: (B, H, S, D) float32; cos, sin: (B_c, S, D) any float dtype, B_c in {1, B}. Returns float32.

    Three separate roundings (mul, mul, add), no FMA: the kernel is compiled with fp fusion off to match.
    """
    cos = cos.float().unsqueeze(1)
    sin = sin.float().unsqueeze(1)
    return x * cos + rotate_half(x) * sin


def _finite_abs(x: torch.Tensor) -> torch.Tensor:
    """|x| where x is finite, 0 where it is NaN or +-inf: non-finite elements never set a scale, so they
    damage only the rows/columns they are in (as in bf16 attention), not their whole head."""
    a = x.abs()
    return torch.where(a < float("inf"), a, torch.zeros_like(a))  # NaN < inf is False


def _finite_mean(x: torch.Tensor) -> torch.Tensor:
    """Per-channel mean over the sequence (dim 2) with non-finite elements counted as 0 (divided by the
    full length): any per-channel constant keeps the centring exact, and this one stays finite. The sum is
    taken in float64 and rounded once to float32, then divided by the length in float32, as the kernel
    path does with its float64 chunk sums (`qkv._centring_means`): float64 sums of float32 values are exact
    unless magnitudes span ~29 binades, so the two agree bit for bit in practice."""
    finite = torch.where(torch.isfinite(x), x, torch.zeros_like(x))
    total = finite.double().sum(dim=2, keepdim=True).float()
    return torch.div(total, torch.full_like(total, max(x.shape[2], 1)))  # tensor / tensor: one rounding


def v_code_drift(code_mean: torch.Tensor, v_descale: torch.Tensor, rotated: bool) -> torch.Tensor:
    """Mean over the sequence of the dequantized centred V, in V's own basis: (B, H_kv, D) float32, from the
    (B, H_kv, D) mean of its e4m3 codes (as `_finite_mean` takes it: exact float64 sums) times the per-head
    descale, rotated back when V was rotated. The centred V's own mean is ~0, so this is the mean
    quantization error that smooth_v's add-back removes (`QuantizedQKV.v_add`)."""
    drift = code_mean * v_descale[:, :, None]
    if rotated:
        drift = drift @ hadamard_matrix(drift.shape[-1], device=drift.device)
    return drift


def _rotate(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """x (..., D) float32 @ (H_D / sqrt(D)), as the kernel: x rounded to ``dtype`` (the input dtype) so that the
    products with the +-1 signs are exact, float32 sums, then the 1/sqrt(D) factor."""
    d = x.shape[-1]
    signs = hadamard_matrix(d, device=x.device, normalized=False)
    return (x.to(dtype).float() @ signs) * d**-0.5


def _pow2_norm_bound(x: torch.Tensor, n_groups: int) -> torch.Tensor:
    """Per group of heads of x (B, H, S, D) float32 (not yet rotated): the power-of-two ceiling of
    max_row min(||x||_2, ||x||_1 / sqrt(D)) over the finite elements, >= every |(x H)_i| (the kernel's
    `tile_math._pow2_norm_bound`, from the bits); 0 for an all-zero group. (B, n_groups) float32."""
    B, H, S, D = x.shape
    f = torch.where(torch.isfinite(x), x, torch.zeros_like(x))
    l2 = (f * f).sum(dim=-1).sqrt()
    l1 = f.abs().sum(dim=-1) * D**-0.5
    m = torch.minimum(l2, l1).reshape(B, n_groups, (H // n_groups) * S).amax(dim=-1).contiguous()
    bound = ((m.view(torch.int32) + 0x7FFFFF) & 0x7F800000).view(torch.float32)
    return torch.where(m > 0, bound, torch.zeros_like(bound))


def _to_fp8(scaled: torch.Tensor) -> torch.Tensor:
    """RNE e4m3 of ``scaled`` clamped to +-FP8_MAX; NaN and +-inf become NaN (e4m3fn has no inf)."""
    clamped = torch.clamp(scaled, -FP8_MAX, FP8_MAX)
    return torch.where(scaled.abs() < float("inf"), clamped, torch.full_like(clamped, float("nan"))).to(FP8_DTYPE)


def _to_int8(scaled: torch.Tensor) -> torch.Tensor:
    """floor(x + 0.5) clamped to +-127 as int8 (the kernel rounds the same way); non-finite elements give 0,
    their block's descale is made NaN by the caller."""
    rounded = torch.clamp(torch.floor(scaled + 0.5), -INT8_MAX, INT8_MAX)
    return torch.where(torch.isfinite(scaled), rounded, torch.zeros_like(rounded)).to(torch.int8)


def _scales(amax: torch.Tensor, qmax: float = FP8_MAX) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, descale) for an amax tensor: qmax / amax and amax / qmax, both 1 where amax is 0.

    Tensor/tensor division on purpose: `FP8_MAX / t` is reciprocal-then-multiply in torch, and CUDA's
    `t / python_scalar` multiplies by the reciprocal too; both round twice.
    """
    fp8_max = torch.full_like(amax, qmax)
    positive = amax > 0
    scale = torch.where(positive, torch.div(fp8_max, amax), torch.ones_like(amax))
    descale = torch.where(positive, torch.div(amax, fp8_max), torch.ones_like(amax))
    return scale, descale


def _quantize_grouped(x: torch.Tensor, n_groups: int, amax: Optional[torch.Tensor] = None
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """x: (B, H, S, D) float32 -> (fp8 (B, S, H, D) contiguous, descale (B, n_groups) float32); amax: the
    groups' (B, n_groups) amax when not max |x| (a rotated tensor's norm bound)."""
    B, H, S, D = x.shape
    if amax is None:
        amax = _finite_abs(x).reshape(B, n_groups, (H // n_groups) * S * D).amax(dim=-1)
    scale, descale = _scales(amax)
    scaled = x.reshape(B, n_groups, H // n_groups, S, D) * scale[:, :, None, None, None]
    x_fp8 = _to_fp8(scaled).reshape(B, H, S, D)
    return x_fp8.transpose(1, 2).contiguous(), descale


def quantize_blocks_bhsd(x: torch.Tensor, block: int = SCALE_BLOCK, int8: bool = False
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """x: (B, H, S, D) float32 -> (fp8 or int8 (B, H, S, D), descale (B, H, cdiv(S, block)) float32): one scale
    per ``block`` tokens of one head, with `_quantize_grouped`'s rules. int8: a block holding a non-finite
    element gets a NaN descale (int8 has no NaN), so the damage stays in its rows. Also the FP8 KV cache's
    block quantization (`kv_cache.reference`, block KV_BLOCK)."""
    B, H, S, D = x.shape
    n_blk = cdiv(S, block)
    padded = torch.nn.functional.pad(x, (0, 0, 0, n_blk * block - S)).reshape(B, H, n_blk, block * D)
    scale, descale = _scales(_finite_abs(padded).amax(dim=-1), INT8_MAX if int8 else FP8_MAX)
    scaled = (padded * scale[..., None]).reshape(B, H, n_blk * block, D)[:, :, :S]
    if int8:
        descale = torch.where(torch.isfinite(padded).all(dim=-1), descale, torch.full_like(descale, float("nan")))
    return (_to_int8(scaled) if int8 else _to_fp8(scaled)), descale


def _quantize_blocks(x: torch.Tensor, block: int, int8: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """`quantize_blocks_bhsd`, the codes as (B, S, H, D) contiguous (qk_scales="block")."""
    x_q, descale = quantize_blocks_bhsd(x, block, int8)
    return x_q.transpose(1, 2).contiguous(), descale


def quantize_q_rows_reference(q: torch.Tensor, rotate: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """What the Gluon kernel does with a `QuantizedQKV.q_in_kernel` bundle's q (`gluon_attention._quantize_q`):
    q (B, S, H, D) bf16/fp16 -> (e4m3 codes (B, S, H, D), descale (B, S, H) float32), one scale per row, after
    the +-1 Hadamard matrix when ``rotate`` (exact products, float32 sums) with its 1/sqrt(D) folded into the
    descale. Scales as `_scales`, non-finite elements NaN, as the quantizer's."""
    x = q.float()
    if rotate:
        x = x @ hadamard_matrix(x.shape[-1], device=x.device, normalized=False)
    scale, descale = _scales(_finite_abs(x).amax(dim=-1))
    codes = _to_fp8(x * scale[..., None])
    if rotate:
        descale = descale * torch.tensor(x.shape[-1] ** -0.5, dtype=torch.float32)
    return codes, descale


def quantize_q_per_head(qkv: QuantizedQKV) -> QuantizedQKV:
    """A `QuantizedQKV.q_in_kernel` bundle with its q quantized as the quantizer would have (one scale per
    (batch, KV head), rotated by the normalised Hadamard matrix where ``q_rotate``): for a kernel other than the
    Gluon one (every backend takes such a bundle: the triton backend where its route is not the Gluon kernel's,
    the others where a pipeline misdirected it). Equal to `quantize_qkv_fp8_reference`'s q and q_descale. Any
    other bundle is returned as it is."""
    if not qkv.q_in_kernel:
        return qkv
    qf = qkv.q.transpose(1, 2).float()  # (B, H_q, S, D)
    h_kv = qkv.k.shape[2]
    bound = None
    if qkv.q_rotate:
        bound = _pow2_norm_bound(qf, h_kv)
        qf = _rotate(qf, qkv.q.dtype)
    q8, q_descale = _quantize_grouped(qf, h_kv, bound)
    return dataclasses.replace(qkv, q=q8, q_descale=q_descale, q_in_kernel=False, q_rotate=False)


def quantize_qkv_fp8_reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
    cos: Optional[torch.Tensor] = None, sin: Optional[torch.Tensor] = None, *,
    options: FP8AttentionOptions = NO_MODES, v_keys_contiguous: bool = False, v_wgmma_order: bool = False,
    q_in_kernel: bool = False,
) -> QuantizedQKV:
    """Reference FP8 quantization of Q, K, V, with optional RoPE on Q and K. CPU or GPU.

    Args:
        q: (B, H_q, S_q, D) bf16/fp16, any strides.
        k, v: (B, H_kv, S_kv, D) bf16/fp16, any strides; H_q % H_kv == 0.
        cos, sin: optional (B_c, S_q, D), B_c in {1, B}, any float dtype (HF rotary embedding output);
            only with S_q == S_kv. Applied to q and k in float32 before the amax.
        options: `FP8AttentionOptions`. smooth_k subtracts K's per-(batch, head, channel) mean over the
            sequence (exact for softmax: it shifts each score row by a constant); smooth_v subtracts V's and returns it as
            ``v_mean`` for the output to add back; hadamard rotates q and k ("qk", "qkv") and/or v ("qkv",
            "v_only") by the normalised Hadamard matrix (rows rounded to the input dtype first, `_rotate`),
            and a rotated tensor's group amax is the power-of-two bound of its rows' norms
            (`_pow2_norm_bound`, no second rotation in the kernel's amax pass); qk_scales="block" gives q
            and k one scale per SCALE_BLOCK (16) tokens of one head (int8 k: per INT8_K_SCALE_BLOCK (128)),
            the exact amax of each rotated block
            (their per-group descales are still returned), v keeping its per-(batch, KV head) scale;
            qk_format="int8" makes those q and k int8; v_scales="block" (with them) gives v one scale per
            V_SCALE_BLOCK (128) tokens of one KV head, the exact amax of each (rotated) block, and then no
            per-group descale is computed (q/k/v_descale NaN), as the single-pass kernel.
        v_keys_contiguous: v's codes in keys-contiguous memory (`quantized.keys_contiguous`), as the kernel's.
        v_wgmma_order: with v_keys_contiguous, those keys in wgmma order (`quantized.wgmma_key_order`), as the
            kernel's (`qkv.check_wgmma_order` says what it needs).
        q_in_kernel: q is left to the attention kernel (`QuantizedQKV.q_in_kernel`): returned as the input's
            (B, S_q, H_q, D) contiguous copy, q_descale NaN, q_rotate as the options rotate Q. Needs v_wgmma_order,
            no RoPE and per-head scales (`check_q_in_kernel`).
        Order, all in float32: RoPE -> centring -> Hadamard -> amax -> scale -> e4m3.
        Non-finite inputs: amax and means are taken over the finite elements; NaN and +-inf are stored as
        NaN, so they reach only the scores / output columns they are in.

    Returns:
        QuantizedQKV with BSHD fp8 tensors and (B, H_kv) float32 descales.
    """
    options = FP8AttentionOptions.coerce(options)
    options = options.for_head_dim(q.shape[-1])
    check_rope_args(q, k, cos, sin)
    options.check_head_dim(q.shape[-1])
    if v_wgmma_order:  # (before any work)
        check_wgmma_order(options, k.shape[2], v_keys_contiguous)
    if q_in_kernel:
        check_q_in_kernel(options, cos, v_wgmma_order)
    h_kv = k.shape[1]
    qf, kf, vf = q.float(), k.float(), v.float()
    if cos is not None:
        qf = apply_rope_reference(qf, cos, sin)
        kf = apply_rope_reference(kf, cos, sin)
    if options.smooth_k:
        kf = kf - _finite_mean(kf)
    v_mean = None
    if options.smooth_v:
        v_mean = _finite_mean(vf)
        vf = vf - v_mean
        v_mean = v_mean.squeeze(2)
    # a rotated tensor's group amax is the power-of-two bound of its (unrotated) rows' norms
    bounds = [None, None, None]
    grouped = not options.v_block_scales  # every scale per block: no per-group scale (NaN), as the single-pass kernel
    for i, (x, rotated) in enumerate(((qf, options.rotates_qk), (kf, options.rotates_qk), (vf, options.rotates_v))):
        if rotated and grouped:
            bounds[i] = _pow2_norm_bound(x, h_kv)
    if options.rotates_qk:
        qf, kf = _rotate(qf, q.dtype), _rotate(kf, q.dtype)
    if options.rotates_v:
        vf = _rotate(vf, q.dtype)
    v_add = None
    if grouped:
        q8, q_descale = _quantize_grouped(qf, h_kv, bounds[0])
        k8, k_descale = _quantize_grouped(kf, h_kv, bounds[1])
        v8, v_descale = _quantize_grouped(vf, h_kv, bounds[2])
        if options.smooth_v:
            code_mean = _finite_mean(v8.transpose(1, 2).float()).squeeze(2)
            v_add = v_mean - v_code_drift(code_mean, v_descale, options.rotates_v)
    else:
        q_descale, k_descale, v_descale = (torch.full((q.shape[0], h_kv), float("nan"), device=q.device)
                                           for _ in range(3))
    blocks = {}
    if options.block_scales:
        q8, q_blocks = _quantize_blocks(qf, SCALE_BLOCK, options.int8_qk)
        k8, k_blocks = _quantize_blocks(kf, k_scale_block(options.int8_qk), options.int8_qk)
        blocks = dict(q_block_descale=q_blocks, k_block_descale=k_blocks)
    if options.v_block_scales:
        v8, blocks["v_block_descale"] = _quantize_blocks(vf, V_SCALE_BLOCK)
    if v_keys_contiguous:
        v8 = keys_contiguous(v8)
    if v_wgmma_order:
        v8 = wgmma_key_order(v8)
    if q_in_kernel:
        q8, q_descale = q.transpose(1, 2).contiguous(), torch.full_like(q_descale, float("nan"))
    return QuantizedQKV(q8, k8, v8, q_descale, k_descale, v_descale, v_mean=v_mean, v_rotated=options.rotates_v,
                        v_add=v_add, v_wgmma_order=bool(v_wgmma_order), q_in_kernel=bool(q_in_kernel),
                        q_rotate=bool(q_in_kernel) and options.rotates_qk, **blocks)


def quantize_qkv_fp8_varlen_reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
    cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor, max_seqlen_q: int, max_seqlen_k: int,
    cos: Optional[torch.Tensor] = None, sin: Optional[torch.Tensor] = None, *,
    options: FP8AttentionOptions = NO_MODES, check: bool = True, v_keys_contiguous: bool = False,
) -> QuantizedQKV:
    """`quantize_qkv_fp8_reference` on each sequence of a packed batch (see `quantize_qkv_fp8_varlen`).

    q (total_q, H_q, D), k/v (total_kv, H_kv, D); sequence i is rows [cu[i], cu[i + 1]); cos/sin
    (total_q, D) or (1, total_q, D) per packed token (needs cu_seqlens_q == cu_seqlens_k). Scales per
    (sequence, KV head): exactly what quantizing each sequence alone gives. Every sequence needs at least
    one query and one key (`check_cu_seqlens`; ``check=False``: the caller validated them, they are only
    read, on the host).
    """
    options = FP8AttentionOptions.coerce(options)
    options = options.for_head_dim(q.shape[-1])
    if check:
        cu_q, cu_k = check_cu_seqlens(cu_seqlens_q, cu_seqlens_k, q.shape[0], k.shape[0])
    else:
        cu_q, cu_k = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    d = q.shape[2]
    if cos is not None:
        cos, sin = cos.reshape(-1, d), sin.reshape(-1, d)
    parts = []
    for i in range(len(cu_q) - 1):
        (q0, q1), (k0, k1) = cu_q[i : i + 2], cu_k[i : i + 2]
        rope = (cos[None, q0:q1], sin[None, q0:q1]) if cos is not None else (None, None)
        parts.append(quantize_qkv_fp8_reference(
            rows_bhsd(q, q0, q1), rows_bhsd(k, k0, k1), rows_bhsd(v, k0, k1), *rope, options=options,
        ))
    cat = lambda name, dim=0: torch.cat([getattr(p, name) for p in parts], dim=dim)  # noqa: E731
    blocks = {}
    if options.block_scales:  # padded to the longest sequence's block count (padding never read)
        pad_to = lambda t, n: torch.nn.functional.pad(t, (0, n - t.shape[-1]), value=1.0)  # noqa: E731
        blocks = dict(
            q_block_descale=torch.cat([pad_to(p.q_block_descale, cdiv(max_seqlen_q, SCALE_BLOCK)) for p in parts]),
            k_block_descale=torch.cat([pad_to(p.k_block_descale, cdiv(max_seqlen_k, k_scale_block(options.int8_qk)))
                                       for p in parts]),
        )
        if options.v_block_scales:
            blocks["v_block_descale"] = torch.cat([pad_to(p.v_block_descale, cdiv(max_seqlen_k, V_SCALE_BLOCK))
                                                   for p in parts])
    v8 = cat("v", 1)
    return QuantizedQKV(
        cat("q", 1), cat("k", 1), keys_contiguous(v8) if v_keys_contiguous else v8,
        cat("q_descale"), cat("k_descale"), cat("v_descale"),
        v_mean=cat("v_mean") if options.smooth_v else None, v_rotated=options.rotates_v,
        v_add=cat("v_add") if options.smooth_v else None,
        cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k, max_seqlen_q=int(max_seqlen_q),
        max_seqlen_k=int(max_seqlen_k), **blocks,
    )
