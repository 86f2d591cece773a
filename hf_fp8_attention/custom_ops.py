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


def _quantize(query, key, value, *args, varlen: bool = False, **modes) -> QuantizedQKV:
    # CUDA tensors go to the Triton kernel, which fuses RoPE, the Hadamard rotation and the mean subtraction
    # into its one launch; CPU tensors use the torch reference (bit-identical without hadamard/smoothing,
    # within an fp8 ulp on a few elements with them; the kernel's interpreted run is in the CPU tests).
    # The kernel's e4m3 casts need FP8 hardware (SM 8.9+) and triton; other GPUs run the reference.
    # varlen: the packed-sequence entry points (offsets already validated by `fp8_sdpa_varlen`).
    if query.is_cuda and triton_quantize_usable(query.device):
        if varlen:
            return quantize_qkv_fp8_varlen(query, key, value, *args, **modes, check=False)
        return quantize_qkv_fp8(query, key, value, *args, **modes)
    reference = quantize_qkv_fp8_varlen_reference if varlen else quantize_qkv_fp8_reference
    return reference(query, key, value, *args, **modes)


def _restore_output(out: torch.Tensor, qkv: QuantizedQKV, hadamard: str) -> torch.Tensor:
    """Undo the V transforms on the (B, S, H_q, D) output: O = (O' + mean_v) H, with H @ H = I. A varlen
    output (1, total_q, H_q, D) takes each packed query's own sequence mean.

    One GEMM in the output dtype (fp32 accumulation; memory-bound, one read and one write of O') plus, for
    smooth_v, one in-place add of the (tiny) rotated mean. The float32 version of this took 0.9 ms at
    S=16k, H=32, D=128 on the H100, a third of the attention itself.
    """
    bias = None
    if qkv.v_mean is not None:
        group = out.shape[2] // qkv.v_mean.shape[1]
        bias = qkv.v_mean.repeat_interleave(group, dim=1)  # (B, H_q, D) float32
        if qkv.is_varlen:  # (1, total_q, H_q, D): the mean of each query's sequence
            lengths = qkv.cu_seqlens_q.diff()
            bias = bias.repeat_interleave(lengths, dim=0, output_size=out.shape[1])[None]
        else:
            bias = bias[:, None]  # (B, 1, H_q, D)
    if rotates_v(hadamard):
        out = torch.matmul(out, hadamard_matrix(out.shape[-1], device=out.device, dtype=out.dtype))
        bias = None if bias is None else bias @ hadamard_matrix(out.shape[-1], device=out.device)
    if bias is not None:
        out = out.add_(bias.to(out.dtype))
    return out


def _attend(qkv: QuantizedQKV, is_causal: bool, scale: float, backend: str, hadamard: str, out_dtype) -> torch.Tensor:
    """The backend's attention on quantized Q/K/V, then the output fix-up of the V transforms."""
    out = get_backend_fn(backend)(qkv, is_causal=is_causal, scale=scale, out_dtype=out_dtype)
    if rotates_v(hadamard) or qkv.v_mean is not None:
        out = _restore_output(out, qkv, hadamard)
    return out


def _on_device(query: torch.Tensor):
    # Triton launches on the *current* CUDA device; with device_map="auto" or tensor parallelism the
    # tensors may live elsewhere, so every launch (and every buffer) follows the query's device.
    return torch.cuda.device(query.device) if query.is_cuda else contextlib.nullcontext()


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
    with _on_device(query):
        qkv = _quantize(query, key, value, cos, sin, hadamard=hadamard, smooth_k=smooth_k, smooth_v=smooth_v,
                        block_scales=qk_scales == "block")
        return _attend(qkv, is_causal, scale, backend, hadamard, query.dtype)


def fp8_sdpa_varlen_impl(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
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
    """Packed sequences: query (total_q, H_q, D), key/value (total_kv, H_kv, D), validated int32 offsets on
    the query's device and the longest lengths -> (total_q, H_q, D) contiguous."""
    with _on_device(query):
        qkv = _quantize(query, key, value, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, cos, sin,
                        varlen=True, hadamard=hadamard, smooth_k=smooth_k, smooth_v=smooth_v,
                        block_scales=qk_scales == "block")
        return _attend(qkv, is_causal, scale, backend, hadamard, query.dtype)[0]


fp8_sdpa_op = torch.library.custom_op("hf_fp8_attention::fp8_sdpa", fp8_sdpa_impl, mutates_args=())


@fp8_sdpa_op.register_fake
def _fp8_sdpa_fake(query, key, value, cos, sin, is_causal, scale, backend, hadamard="none", smooth_k=False,
                   smooth_v=False, qk_scales="head"):
    b, h_q, s_q, d = query.shape
    return query.new_empty((b, s_q, h_q, d))
