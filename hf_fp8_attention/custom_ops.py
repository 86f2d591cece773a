"""torch custom op around the shared FP8 SDPA, so `torch.compile(fullgraph=True)` sees one opaque node.

Triton launches and the FA3/FA4 extension calls cannot be traced by dynamo; the op hides them and its
fake computes only the output's shape and dtype. Schema sentinel: none (``scale`` is always resolved to a
float by `sdpa.fp8_sdpa` before the call).
"""

from __future__ import annotations

import contextlib

import torch

from .backends import get_backend_fn
from .dispatch import triton_quantize_usable
from .quantization import (
    QuantizedQKV,
    hadamard_matrix,
    quantize_qkv_fp8,
    quantize_qkv_fp8_reference,
    quantize_qkv_fp8_varlen,
    quantize_qkv_fp8_varlen_reference,
)
from .quantization.hadamard import rotates_v


def _quantize(query, key, value, cos, sin, hadamard, smooth_k, smooth_v, block_scales=False):
    # CUDA tensors go to the Triton kernel, which fuses RoPE, the Hadamard rotation and the mean subtraction
    # into its one launch; CPU tensors use the torch reference (bit-identical without hadamard/smoothing,
    # within an fp8 ulp on a few elements with them; the kernel's interpreted run is in the CPU tests).
    # The kernel's e4m3 casts need FP8 hardware (SM 8.9+) and triton; other GPUs run the reference.
    if query.is_cuda and triton_quantize_usable(query.device):
        return quantize_qkv_fp8(query, key, value, cos, sin, hadamard=hadamard, smooth_k=smooth_k, smooth_v=smooth_v,
                                block_scales=block_scales)
    return quantize_qkv_fp8_reference(
        query, key, value, cos, sin, hadamard=hadamard, smooth_k=smooth_k, smooth_v=smooth_v, block_scales=block_scales
    )


def _restore_output(out: torch.Tensor, qkv: QuantizedQKV, hadamard: str, token_seq=None) -> torch.Tensor:
    """Undo the V transforms on the (B, S, H_q, D) output: O = (O' + mean_v) H, with H @ H = I.
    A varlen output (1, total_q, H_q, D) takes `token_seq`, the sequence index of every packed query.

    One GEMM in the output dtype (fp32 accumulation; memory-bound, one read and one write of O') plus, for
    smooth_v, one in-place add of the (tiny) rotated mean. The float32 version of this took 0.9 ms at
    S=16k, H=32, D=128 on the H100, a third of the attention itself.
    """
    bias = None
    if qkv.v_mean is not None:
        group = out.shape[2] // qkv.v_mean.shape[1]
        bias = qkv.v_mean.repeat_interleave(group, dim=1)  # (B, H_q, D) float32
        bias = bias[token_seq][None] if token_seq is not None else bias[:, None]  # (1, total_q, ...) / (B, 1, ...)
    if rotates_v(hadamard):
        out = torch.matmul(out, hadamard_matrix(out.shape[-1], device=out.device, dtype=out.dtype))
        bias = None if bias is None else bias @ hadamard_matrix(out.shape[-1], device=out.device)
    if bias is not None:
        out = out.add_(bias.to(out.dtype))
    return out


def fp8_sdpa_impl(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    cos: torch.Tensor | None,
    sin: torch.Tensor | None,
    is_causal: bool,
    scale: float,
    backend: str,
    hadamard: str = "none",
    smooth_k: bool = False,
    smooth_v: bool = False,
    qk_scales: str = "head",
) -> torch.Tensor:
    """query (B, H_q, S_q, D), key/value (B, H_kv, S_kv, D) bf16/fp16 -> (B, S_q, H_q, D) contiguous.

    Eager callers use this directly: the custom-op dispatch costs tens of microseconds per call, which
    shows at short sequences where the GPU work is a fraction of a millisecond.
    """
    # Triton launches on the *current* CUDA device; with device_map="auto" or tensor parallelism the
    # tensors may live elsewhere, so every launch (and every buffer) follows the query's device.
    with torch.cuda.device(query.device) if query.is_cuda else contextlib.nullcontext():
        qkv = _quantize(query, key, value, cos, sin, hadamard, smooth_k, smooth_v, qk_scales == "block")
        out = get_backend_fn(backend)(qkv, is_causal=is_causal, scale=scale, out_dtype=query.dtype)
        if rotates_v(hadamard) or qkv.v_mean is not None:
            out = _restore_output(out, qkv, hadamard)
        return out


def fp8_sdpa_varlen_impl(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    lengths_q: list[int],
    max_seqlen_k: int,
    cos: torch.Tensor | None,
    sin: torch.Tensor | None,
    is_causal: bool,
    scale: float,
    backend: str,
    hadamard: str = "none",
    smooth_k: bool = False,
    smooth_v: bool = False,
    qk_scales: str = "head",
) -> torch.Tensor:
    """Packed sequences: query (total_q, H_q, D), key/value (total_kv, H_kv, D), validated offsets (int32
    on the query's device) and the host list of query lengths -> (total_q, H_q, D) contiguous."""
    with torch.cuda.device(query.device) if query.is_cuda else contextlib.nullcontext():
        args = (query, key, value, cu_seqlens_q, cu_seqlens_k, max(lengths_q), max_seqlen_k, cos, sin)
        modes = dict(hadamard=hadamard, smooth_k=smooth_k, smooth_v=smooth_v, block_scales=qk_scales == "block")
        if query.is_cuda and triton_quantize_usable(query.device):
            qkv = quantize_qkv_fp8_varlen(*args, **modes, check=False)
        else:
            qkv = quantize_qkv_fp8_varlen_reference(*args, **modes)
        out = get_backend_fn(backend)(qkv, is_causal=is_causal, scale=scale, out_dtype=query.dtype)
        if rotates_v(hadamard) or qkv.v_mean is not None:
            token_seq = None
            if qkv.v_mean is not None:
                lengths = torch.tensor(lengths_q, device=query.device)
                token_seq = torch.repeat_interleave(torch.arange(len(lengths_q), device=query.device), lengths)
            out = _restore_output(out, qkv, hadamard, token_seq)
        return out[0]


fp8_sdpa_op = torch.library.custom_op("hf_fp8_attention::fp8_sdpa", fp8_sdpa_impl, mutates_args=())


@fp8_sdpa_op.register_fake
def _fp8_sdpa_fake(query, key, value, cos, sin, is_causal, scale, backend, hadamard="none", smooth_k=False,
                   smooth_v=False, qk_scales="head"):
    b, h_q, s_q, d = query.shape
    return query.new_empty((b, s_q, h_q, d))
