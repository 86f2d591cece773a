"""What the quantizers hand to the backends (`QuantizedQKV`) and the checks of their inputs.

Shared by the Triton launcher (`qkv.py`) and the torch reference (`reference.py`); the public entry points
(`hf_fp8_attention.sdpa`) validate user input before either is reached, these checks guard direct calls.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from .._constants import SCALE_BLOCK, V_SCALE_BLOCK, k_scale_block
from .._intmath import cdiv


@dataclass(frozen=True)
class QuantizedQKV:
    """FP8 Q/K/V in BSHD layout plus the per-(batch, KV head) descales FA3 takes.

    q: (B, S_q, H_q, D) float8_e4m3fn, contiguous.
    k, v: (B, S_kv, H_kv, D) float8_e4m3fn, contiguous; v may instead be a BSHD view of keys-contiguous
        (B, H_kv, D, S_kv) memory (`keys_contiguous`; the quantizers' ``v_keys_contiguous``), whose keys
        may in turn be in wgmma order within every 16 (`v_wgmma_order`).
    q_descale, k_descale, v_descale: (B, H_kv) float32. One Q scale per KV group: the G = H_q / H_kv query
        heads that share a KV head share a scale, which is the granularity FA3's q_descale has.
    """

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    q_descale: torch.Tensor
    k_descale: torch.Tensor
    v_descale: torch.Tensor
    # What was done to V, for the output fix-up (`attention.restore_output`): v_mean (smooth_v only) is the
    # (B, H_kv, D) float32 centring offset subtracted from V before any Hadamard rotation (rows of P sum to 1,
    # so the output gets it back); v_rotated: V was then multiplied by the normalised Hadamard matrix.
    v_mean: Optional[torch.Tensor] = None
    v_rotated: bool = False
    # What the output gets back with smooth_v (B, H_kv, D) float32: v_mean minus the mean over the sequence of
    # the quantization error of the centred V (dequantized e4m3 V, rotated back when V was rotated). Adding
    # v_mean alone left that error's mean in every output row: centring bf16 V breaks the symmetry that
    # makes e4m3's rounding errors cancel over the keys, which cost 1.2 dB at 128k keys on Gaussian V.
    v_add: Optional[torch.Tensor] = None
    # Variable-length batches (`quantize_qkv_fp8_varlen`): N sequences packed along the rows of batch-1
    # tensors q (1, total_q, H_q, D), k/v (1, total_kv, H_kv, D); sequence i is rows
    # [cu_seqlens[i], cu_seqlens[i + 1]) (int32 (N + 1,) on the tensors' device), and the descales /
    # v_mean have one row per sequence: (N, H_kv) / (N, H_kv, D). max_seqlen_*: the longest length.
    cu_seqlens_q: Optional[torch.Tensor] = None
    cu_seqlens_k: Optional[torch.Tensor] = None
    max_seqlen_q: int = 0
    max_seqlen_k: int = 0
    # qk_scales="block": q and k were quantized with one scale per SCALE_BLOCK (q) / `k_scale_block` (k)
    # tokens of one head; their descales, (B, H_q, cdiv(S_q, SCALE_BLOCK)) and (B, H_kv, cdiv(S_kv,
    # k_scale_block)) float32 (varlen: per
    # sequence, blocks counted from its first token, sized by the longest), replace q_descale / k_descale.
    q_block_descale: Optional[torch.Tensor] = None
    k_block_descale: Optional[torch.Tensor] = None
    # qk_format="int8": q and k are torch.int8 (codes in [-127, 127]) with those per-block descales.
    # v_scales="block" (with q/k block scales): v was quantized with one scale per V_SCALE_BLOCK tokens of one
    # KV head, (B, H_kv, cdiv(S_kv, V_SCALE_BLOCK)) float32 (varlen as above); q/k/v_descale are then NaN
    # (not computed: the single-pass quantizer never sees a whole head).
    v_block_descale: Optional[torch.Tensor] = None
    # v's keys are in wgmma order within every 16 (`wgmma_key_order`; the quantizers' ``v_wgmma_order``): only
    # the Gluon kernel reads it so (the triton backend restores key order for any other kernel, `natural_key_order`)
    v_wgmma_order: bool = False
    # q_in_kernel: q is the (B, S_q, H_q, D) bf16/fp16 input itself, contiguous, not quantized: the Gluon kernel
    # quantizes each query row with its own scale as it loads the row's tile (`gluon_attention._quantize_q`),
    # first rotating it by the normalised Hadamard matrix where q_rotate says so (K was rotated by the quantizer);
    # q_descale is then not a scale of q (NaN). Only the triton backend takes such a bundle (fixed length, per-head
    # K/V scales, V in wgmma order); any other kernel gets q quantized first (`quantize_q_per_head`).
    q_in_kernel: bool = False
    q_rotate: bool = False

    def __post_init__(self):
        if self.v_wgmma_order and (self.is_varlen or keys_contiguous_rows(self.v) is None or self.v.shape[1] % 16):
            raise ValueError("QuantizedQKV: v_wgmma_order needs a fixed-length, keys-contiguous V over whole 16s of "
                             f"keys, got v of shape {tuple(self.v.shape)}, strides {self.v.stride()}"
                             + (", packed sequences" if self.is_varlen else ""))
        if self.q_in_kernel and (self.is_varlen or self.block_scales or self.v_block_scales
                                 or self.q.dtype not in (torch.bfloat16, torch.float16)):
            raise ValueError("QuantizedQKV: q_in_kernel needs a fixed-length bf16/fp16 q with per-head K/V scales, "
                             f"got q {self.q.dtype}" + (", packed sequences" if self.is_varlen else "")
                             + (", block scales" if self.block_scales or self.v_block_scales else ""))
        if self.q_rotate and not self.q_in_kernel:
            raise ValueError("QuantizedQKV: q_rotate is for a q that the kernel quantizes (q_in_kernel)")

    @property
    def v_block_scales(self) -> bool:
        return self.v_block_descale is not None

    @property
    def block_scales(self) -> bool:
        return self.q_block_descale is not None

    @property
    def k_scale_block(self) -> int:
        """Tokens per K block descale (block scales): 128 for int8 K, else 16."""
        return k_scale_block(self.k.dtype == torch.int8)

    @property
    def is_varlen(self) -> bool:
        return self.cu_seqlens_q is not None

    @property
    def output_needs_fixup(self) -> bool:
        """Whether the attention output must be rotated back and/or get V's mean back."""
        return self.v_rotated or self.v_mean is not None

    def sequences(self) -> list["QuantizedQKV"]:
        """A varlen batch as one batch-1 QuantizedQKV per sequence (views; one host sync for the offsets)."""
        cu_q, cu_k = self.cu_seqlens_q.tolist(), self.cu_seqlens_k.tolist()
        parts = []
        for i in range(len(cu_q) - 1):
            rows_q, rows_k = slice(cu_q[i], cu_q[i + 1]), slice(cu_k[i], cu_k[i + 1])
            one = slice(i, i + 1)
            blocks = {}
            if self.block_scales:
                n_q = cdiv(rows_q.stop - rows_q.start, SCALE_BLOCK)
                n_k = cdiv(rows_k.stop - rows_k.start, self.k_scale_block)
                blocks = dict(q_block_descale=self.q_block_descale[one, :, :n_q].contiguous(),
                              k_block_descale=self.k_block_descale[one, :, :n_k].contiguous())
            if self.v_block_scales:
                n_v = cdiv(rows_k.stop - rows_k.start, V_SCALE_BLOCK)
                blocks["v_block_descale"] = self.v_block_descale[one, :, :n_v].contiguous()
            parts.append(QuantizedQKV(
                self.q[:, rows_q], self.k[:, rows_k], self.v[:, rows_k],
                self.q_descale[one], self.k_descale[one], self.v_descale[one],
                v_mean=None if self.v_mean is None else self.v_mean[one], v_rotated=self.v_rotated,
                v_add=None if self.v_add is None else self.v_add[one], **blocks,
            ))
        return parts


def check_rope_args(q: torch.Tensor, k: torch.Tensor, cos: Optional[torch.Tensor], sin: Optional[torch.Tensor]) -> None:
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


def rows_bhsd(x: torch.Tensor, start: int, stop: int) -> torch.Tensor:
    """Rows [start, stop) of a packed (total, H, D) tensor as a (1, H, S, D) view: one sequence of a varlen
    batch in the fixed-length layout."""
    return x[start:stop].transpose(0, 1).unsqueeze(0)


def keys_contiguous(v: torch.Tensor) -> torch.Tensor:
    """A BSHD tensor's values in keys-contiguous (B, H, D, S) memory, returned as its BSHD view (unit stride
    over keys): the V layout `quantize_qkv_fp8(v_keys_contiguous=True)` writes."""
    return v.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2)


def keys_contiguous_rows(v: torch.Tensor) -> int | None:
    """The row count of the packed (B, H, D, rows) memory that a BSHD ``v`` is a view of (unit stride over
    keys, heads D rows apart, batches H heads apart: what `keys_contiguous` and the quantizer write and a TMA
    descriptor over (B * H * D, S) reads), or None for any other layout."""
    rows = v.stride(3)
    if v.stride(1) != 1 or v.stride(2) != v.shape[3] * rows or v.stride(0) != v.shape[2] * v.stride(2):
        return None
    return rows


# Position p of every 16 keys of a V in wgmma order holds key WGMMA_KEY_AT[p]: the bits (p3 p2 p1 p0) of a
# position name the key (p1 p3 p2 p0); key k sits at position (k2 k1 k3 k0). It is where the fp8 wgmma score
# accumulator's thread keeps the columns that the same thread needs as P.V's A operand (4 consecutive k per
# register), so that the Gluon kernel relabels P instead of moving it between threads
# (`gluon_attention._softmax`'s V_WGMMA_ORDER).
def _wgmma_key_at(p):
    """The key at position p (an int or an integer tensor) of every 16 in wgmma order."""
    return 2 * (p // 4) + p % 2 + 8 * ((p // 2) % 2)


WGMMA_KEY_AT = tuple(_wgmma_key_at(p) for p in range(16))


def _reorder_keys(v: torch.Tensor, inverse: bool) -> torch.Tensor:
    """A keys-contiguous V whose position p of every 16 keys takes key WGMMA_KEY_AT[p] of ``v`` (inverse: key p
    goes back from that position): same kind of view, new memory. The index is computed on v's device (no host
    copy: a CUDA-graph capture may call this, `backends.triton._launch`)."""
    if keys_contiguous_rows(v) is None:
        raise ValueError("the wgmma key order is a layout of keys-contiguous V (`keys_contiguous`), got strides "
                         f"{v.stride()} for shape {tuple(v.shape)}")
    S_kv = v.shape[1]
    if S_kv % 16:
        raise ValueError(f"the wgmma key order needs a key count that is a multiple of 16, got {S_kv}")
    at = _wgmma_key_at(torch.arange(16, device=v.device))  # WGMMA_KEY_AT
    if inverse:  # the position of each key
        at = torch.argsort(at)
    index = (torch.arange(0, S_kv, 16, device=v.device)[:, None] + at).reshape(-1)
    packed = v.permute(0, 2, 3, 1)  # (B, H, D, S_kv) view of the keys-contiguous memory
    return packed[..., index].contiguous().permute(0, 3, 1, 2)


def wgmma_key_order(v: torch.Tensor) -> torch.Tensor:
    """A keys-contiguous V (`keys_contiguous`) with its keys in wgmma order within every 16 (`WGMMA_KEY_AT`),
    what the quantizers write with ``v_wgmma_order``; S_kv a multiple of 16."""
    return _reorder_keys(v, inverse=False)


def natural_key_order(v: torch.Tensor) -> torch.Tensor:
    """The inverse of `wgmma_key_order`: a V in wgmma key order back in key order (keys-contiguous)."""
    return _reorder_keys(v, inverse=True)


def key_ordered_v(qkv: "QuantizedQKV") -> torch.Tensor:
    """``qkv.v`` with its keys in key order: what every kernel but the Gluon one reads (a copy when the bundle's
    V is in wgmma key order, `QuantizedQKV.v_wgmma_order`; else v itself)."""
    return natural_key_order(qkv.v) if qkv.v_wgmma_order else qkv.v


def check_wgmma_order(options, S_kv: int, v_keys_contiguous: bool) -> None:
    """Why V cannot be written in wgmma key order (a ValueError), if it cannot: the order is a layout of
    keys-contiguous V over whole 16s of keys, written by the per-head-scale paths (the Gluon kernel, its only
    reader, takes no block scales)."""
    problems = []
    if not v_keys_contiguous:
        problems.append("needs v_keys_contiguous=True")
    if S_kv % 16:
        problems.append(f"needs a key count that is a multiple of 16, got {S_kv}")
    if options.v_block_scales:
        problems.append('needs per-head V scales (not v_scales="block")')
    if problems:
        raise ValueError("v_wgmma_order: " + "; ".join(problems))


def check_q_in_kernel(options, cos, v_wgmma_order: bool) -> None:
    """What a quantizer's ``q_in_kernel`` needs (`QuantizedQKV.q_in_kernel`): the Gluon kernel's layout of V
    (v_wgmma_order, which implies fixed length and per-head V scales), per-head e4m3 K scales, and no fused RoPE
    (the kernel would have to rotate Q's pairs itself)."""
    problems = []
    if not v_wgmma_order:
        problems.append("V in wgmma order (the Gluon kernel's layout)")
    if options.block_scales or options.int8_qk or options.v_block_scales:
        problems.append("per-head e4m3 scales")
    if cos is not None:
        problems.append("no fused RoPE")
    if problems:
        raise ValueError("q_in_kernel: needs " + ", ".join(problems))


def channels_contiguous(v: torch.Tensor) -> torch.Tensor:
    """V with unit stride over channels, as FlashAttention's kernels take it: a keys-contiguous V
    (`keys_contiguous`) copied back to BSHD, any other returned as it is."""
    return v if v.stride(-1) == 1 else v.contiguous()


def check_dtypes(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
