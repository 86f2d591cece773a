"""Pure-torch reference of the FP8 Q/K/V quantization (optional RoPE, per-(batch, KV head) scales).

Input layout BHSD (any strides), output layout BSHD contiguous. The Triton path in ``qkv.py`` computes
exactly the same float32 math: bit for bit without the accuracy modes, within one fp8 ulp on a few
elements with Hadamard / smoothing (summation order; see tests/cpu/test_quantize.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from .._constants import FP8_DTYPE, FP8_MAX, SCALE_BLOCK
from .._intmath import cdiv
from .hadamard import check_hadamard, hadamard_matrix, rotates_qk, rotates_v


@dataclass(frozen=True)
class QuantizedQKV:
    """FP8 Q/K/V in BSHD layout plus the per-(batch, KV head) descales FA3 takes.

    q: (B, S_q, H_q, D) float8_e4m3fn, contiguous.
    k, v: (B, S_kv, H_kv, D) float8_e4m3fn, contiguous.
    q_descale, k_descale, v_descale: (B, H_kv) float32. One Q scale per KV group: the G = H_q / H_kv query
        heads that share a KV head share a scale, which is the granularity FA3's q_descale has.
    """

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    q_descale: torch.Tensor
    k_descale: torch.Tensor
    v_descale: torch.Tensor
    # smooth_v only: (B, H_kv, D) float32 mean over the sequence subtracted from V (after any Hadamard
    # rotation); rows of P sum to 1, so the attention output gets it back.
    v_mean: Optional[torch.Tensor] = None
    # Variable-length batches (`quantize_qkv_fp8_varlen`): N sequences packed along the rows of batch-1
    # tensors q (1, total_q, H_q, D), k/v (1, total_kv, H_kv, D); sequence i is rows
    # [cu_seqlens[i], cu_seqlens[i + 1]) (int32 (N + 1,) on the tensors' device), and the descales /
    # v_mean have one row per sequence: (N, H_kv) / (N, H_kv, D). max_seqlen_*: the longest length.
    cu_seqlens_q: Optional[torch.Tensor] = None
    cu_seqlens_k: Optional[torch.Tensor] = None
    max_seqlen_q: int = 0
    max_seqlen_k: int = 0
    # qk_scales="block": q and k were quantized with one scale per SCALE_BLOCK tokens of one head; their
    # descales, (B, H_q, cdiv(S_q, SCALE_BLOCK)) and (B, H_kv, cdiv(S_kv, SCALE_BLOCK)) float32 (varlen: per
    # sequence, blocks counted from its first token, sized by the longest), replace q_descale / k_descale.
    q_block_descale: Optional[torch.Tensor] = None
    k_block_descale: Optional[torch.Tensor] = None

    @property
    def block_scales(self) -> bool:
        return self.q_block_descale is not None

    @property
    def is_varlen(self) -> bool:
        return self.cu_seqlens_q is not None

    def sequences(self) -> list["QuantizedQKV"]:
        """A varlen batch as one batch-1 QuantizedQKV per sequence (views; one host sync for the offsets)."""
        cu_q, cu_k = self.cu_seqlens_q.tolist(), self.cu_seqlens_k.tolist()
        parts = []
        for i in range(len(cu_q) - 1):
            rows_q, rows_k = slice(cu_q[i], cu_q[i + 1]), slice(cu_k[i], cu_k[i + 1])
            one = slice(i, i + 1)
            blocks = {}
            if self.block_scales:
                n_q, n_k = cdiv(rows_q.stop - rows_q.start, SCALE_BLOCK), cdiv(rows_k.stop - rows_k.start, SCALE_BLOCK)
                blocks = dict(q_block_descale=self.q_block_descale[one, :, :n_q].contiguous(),
                              k_block_descale=self.k_block_descale[one, :, :n_k].contiguous())
            parts.append(QuantizedQKV(
                self.q[:, rows_q], self.k[:, rows_k], self.v[:, rows_k],
                self.q_descale[one], self.k_descale[one], self.v_descale[one],
                None if self.v_mean is None else self.v_mean[one], **blocks,
            ))
        return parts


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


def _check_rope_args(q: torch.Tensor, k: torch.Tensor, cos: Optional[torch.Tensor], sin: Optional[torch.Tensor]) -> None:
    if (cos is None) != (sin is None):
        raise ValueError("cos and sin must be given together, got only one of them")
    if cos is None:
        return
    B, _, S_q, D = q.shape
    if k.shape[2] != S_q:
        raise ValueError(f"RoPE needs S_q == S_kv (prefill), got S_q={S_q}, S_kv={k.shape[2]}")
    for name, t in (("cos", cos), ("sin", sin)):
        if t.dim() != 3 or t.shape[0] not in (1, B) or tuple(t.shape[1:]) != (S_q, D):
            raise ValueError(f"{name} must have shape (1 or {B}, {S_q}, {D}), got {tuple(t.shape)}")
    if cos.shape != sin.shape:
        raise ValueError(f"cos and sin shapes differ: {tuple(cos.shape)} vs {tuple(sin.shape)}")


def check_cu_seqlens(
    cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor, total_q: int, total_k: int, *, is_causal: bool = False
) -> tuple[list[int], list[int]]:
    """Validates the offsets of a packed (varlen) batch; returns them as host lists (one sync each).

    Both int32 1-D tensors of the same length N + 1 >= 2, starting at 0, ending at total_q / total_k,
    every sequence with >= 1 query and >= 1 key; causal needs each sequence's S_q <= S_kv.
    """
    for name, cu, total in (("cu_seqlens_q", cu_seqlens_q, total_q), ("cu_seqlens_k", cu_seqlens_k, total_k)):
        if not isinstance(cu, torch.Tensor) or cu.dtype != torch.int32 or cu.dim() != 1 or cu.numel() < 2:
            got = f"{cu.dtype} {tuple(cu.shape)}" if isinstance(cu, torch.Tensor) else type(cu).__name__
            raise ValueError(f"{name} must be a 1-D torch.int32 tensor of N + 1 >= 2 offsets, got {got}")
    if cu_seqlens_q.numel() != cu_seqlens_k.numel():
        raise ValueError(f"cu_seqlens_q and cu_seqlens_k hold {cu_seqlens_q.numel() - 1} and "
                         f"{cu_seqlens_k.numel() - 1} sequences")
    cu_q, cu_k = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    for name, cu, total in (("cu_seqlens_q", cu_q, total_q), ("cu_seqlens_k", cu_k, total_k)):
        if cu[0] != 0 or cu[-1] != total:
            raise ValueError(f"{name} must start at 0 and end at the packed length {total}, got {cu[0]}..{cu[-1]}")
        if any(b <= a for a, b in zip(cu, cu[1:])):
            raise ValueError(f"{name} must be strictly increasing (every sequence needs >= 1 token), got {cu}")
    if is_causal:
        for i, (a, b, c, d) in enumerate(zip(cu_q, cu_q[1:], cu_k, cu_k[1:])):
            if b - a > d - c:
                raise ValueError(f"causal attention with more queries than keys in sequence {i} "
                                 f"(S_q={b - a} > S_kv={d - c}); the causal mask is bottom-right aligned")
    return cu_q, cu_k


def _quantize_grouped(x: torch.Tensor, n_groups: int) -> tuple[torch.Tensor, torch.Tensor]:
    """x: (B, H, S, D) float32 -> (fp8 (B, S, H, D) contiguous, descale (B, n_groups) float32)."""
    B, H, S, D = x.shape
    # torch.amax propagates NaN; a NaN amax then fails `amax > 0` and gets scale 1.0, like the kernel.
    amax = x.abs().reshape(B, n_groups, (H // n_groups) * S * D).amax(dim=-1)
    fp8_max = torch.full_like(amax, FP8_MAX)
    positive = amax > 0
    # Tensor/tensor division on purpose: `FP8_MAX / t` is reciprocal-then-multiply in torch, and CUDA's
    # `t / python_scalar` multiplies by the reciprocal too; both round twice.
    scale = torch.where(positive, torch.div(fp8_max, amax), torch.ones_like(amax))
    descale = torch.where(positive, torch.div(amax, fp8_max), torch.ones_like(amax))
    scaled = x.reshape(B, n_groups, H // n_groups, S, D) * scale[:, :, None, None, None]
    x_fp8 = torch.clamp(scaled, -FP8_MAX, FP8_MAX).to(FP8_DTYPE).reshape(B, H, S, D)
    return x_fp8.transpose(1, 2).contiguous(), descale


def _quantize_blocks(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x: (B, H, S, D) float32 -> (fp8 (B, S, H, D) contiguous, descale (B, H, cdiv(S, SCALE_BLOCK)) float32):
    one scale per SCALE_BLOCK tokens of one head, with `_quantize_grouped`'s rules."""
    B, H, S, D = x.shape
    n_blk = cdiv(S, SCALE_BLOCK)
    padded = torch.nn.functional.pad(x, (0, 0, 0, n_blk * SCALE_BLOCK - S)).reshape(B, H, n_blk, SCALE_BLOCK * D)
    amax = padded.abs().amax(dim=-1)
    fp8_max = torch.full_like(amax, FP8_MAX)
    positive = amax > 0
    scale = torch.where(positive, torch.div(fp8_max, amax), torch.ones_like(amax))
    descale = torch.where(positive, torch.div(amax, fp8_max), torch.ones_like(amax))
    scaled = (padded * scale[..., None]).reshape(B, H, n_blk * SCALE_BLOCK, D)[:, :, :S]
    x_fp8 = torch.clamp(scaled, -FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return x_fp8.transpose(1, 2).contiguous(), descale


def quantize_qkv_fp8_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cos: Optional[torch.Tensor] = None,
    sin: Optional[torch.Tensor] = None,
    *,
    hadamard: str = "none",
    smooth_k: bool = False,
    smooth_v: bool = False,
    block_scales: bool = False,
) -> QuantizedQKV:
    """Reference FP8 quantization of Q, K, V, with optional RoPE on Q and K. CPU or GPU.

    Args:
        q: (B, H_q, S_q, D) bf16/fp16, any strides.
        k, v: (B, H_kv, S_kv, D) bf16/fp16, any strides; H_q % H_kv == 0.
        cos, sin: optional (B_c, S_q, D), B_c in {1, B}, any float dtype (HF rotary embedding output);
            only with S_q == S_kv. Applied to q and k in float32 before the amax.
        hadamard: "none", "qkv" (q, k and v rotated by the normalised Hadamard matrix) or "v_only".
        smooth_k: subtract K's per-(batch, head, channel) mean over the sequence (exact for softmax
            attention: it shifts each score row by a constant).
        smooth_v: subtract V's mean likewise and return it as ``v_mean`` for the output to add back.
        block_scales: q and k get one scale per SCALE_BLOCK (16) tokens of one head instead (their
            per-group descales are still returned); v keeps its per-(batch, KV head) scale.
        Order, all in float32: RoPE -> Hadamard -> mean subtraction -> amax -> scale -> e4m3.

    Returns:
        QuantizedQKV with BSHD fp8 tensors and (B, H_kv) float32 descales.
    """
    _check_rope_args(q, k, cos, sin)
    check_hadamard(hadamard, q.shape[-1])
    h_kv = k.shape[1]
    qf, kf, vf = q.float(), k.float(), v.float()
    if cos is not None:
        qf = apply_rope_reference(qf, cos, sin)
        kf = apply_rope_reference(kf, cos, sin)
    if hadamard != "none":
        h = hadamard_matrix(q.shape[-1], device=q.device)
        if rotates_qk(hadamard):
            qf, kf = qf @ h, kf @ h
        if rotates_v(hadamard):
            vf = vf @ h
    if smooth_k:
        kf = kf - kf.mean(dim=2, keepdim=True)
    v_mean = None
    if smooth_v:
        v_mean = vf.mean(dim=2, keepdim=True)
        vf = vf - v_mean
        v_mean = v_mean.squeeze(2)
    q8, q_descale = _quantize_grouped(qf, h_kv)
    k8, k_descale = _quantize_grouped(kf, h_kv)
    v8, v_descale = _quantize_grouped(vf, h_kv)
    blocks = {}
    if block_scales:
        q8, q_blocks = _quantize_blocks(qf)
        k8, k_blocks = _quantize_blocks(kf)
        blocks = dict(q_block_descale=q_blocks, k_block_descale=k_blocks)
    return QuantizedQKV(q8, k8, v8, q_descale, k_descale, v_descale, v_mean, **blocks)


def _varlen_bhsd(x: torch.Tensor, start: int, stop: int) -> torch.Tensor:
    """Rows [start, stop) of a (total, H, D) tensor as a (1, H, S, D) view."""
    return x[start:stop].transpose(0, 1).unsqueeze(0)


def quantize_qkv_fp8_varlen_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    cos: Optional[torch.Tensor] = None,
    sin: Optional[torch.Tensor] = None,
    *,
    hadamard: str = "none",
    smooth_k: bool = False,
    smooth_v: bool = False,
    block_scales: bool = False,
) -> QuantizedQKV:
    """`quantize_qkv_fp8_reference` on each sequence of a packed batch (see `quantize_qkv_fp8_varlen`).

    q (total_q, H_q, D), k/v (total_kv, H_kv, D); sequence i is rows [cu[i], cu[i + 1]); cos/sin
    (total_q, D) or (1, total_q, D) per packed token (needs cu_seqlens_q == cu_seqlens_k). Scales per
    (sequence, KV head): exactly what quantizing each sequence alone gives. Every sequence needs at least
    one query and one key (`check_cu_seqlens`).
    """
    cu_q, cu_k = check_cu_seqlens(cu_seqlens_q, cu_seqlens_k, q.shape[0], k.shape[0])
    d = q.shape[2]
    if cos is not None:
        cos, sin = cos.reshape(-1, d), sin.reshape(-1, d)
    q8, k8, v8, descales, means, q_blocks, k_blocks = [], [], [], [], [], [], []
    pad_to = lambda t, n: torch.nn.functional.pad(t, (0, n - t.shape[-1]), value=1.0)  # noqa: E731
    for i in range(len(cu_q) - 1):
        (q0, q1), (k0, k1) = cu_q[i : i + 2], cu_k[i : i + 2]
        rope = (cos[None, q0:q1], sin[None, q0:q1]) if cos is not None else (None, None)
        part = quantize_qkv_fp8_reference(
            _varlen_bhsd(q, q0, q1), _varlen_bhsd(k, k0, k1), _varlen_bhsd(v, k0, k1), *rope,
            hadamard=hadamard, smooth_k=smooth_k, smooth_v=smooth_v, block_scales=block_scales,
        )
        if block_scales:
            q_blocks.append(pad_to(part.q_block_descale, cdiv(max_seqlen_q, SCALE_BLOCK)))
            k_blocks.append(pad_to(part.k_block_descale, cdiv(max_seqlen_k, SCALE_BLOCK)))
        q8.append(part.q)
        k8.append(part.k)
        v8.append(part.v)
        descales.append((part.q_descale, part.k_descale, part.v_descale))
        means.append(part.v_mean)
    q_descale, k_descale, v_descale = (torch.cat(t) for t in zip(*descales))
    return QuantizedQKV(
        torch.cat(q8, dim=1), torch.cat(k8, dim=1), torch.cat(v8, dim=1), q_descale, k_descale, v_descale,
        torch.cat(means) if smooth_v else None,
        cu_seqlens_q, cu_seqlens_k, int(max_seqlen_q), int(max_seqlen_k),
        torch.cat(q_blocks) if block_scales else None, torch.cat(k_blocks) if block_scales else None,
    )

