"""The FP8 attention pipeline every entry point shares: quantize -> backend attention -> output fix-up.

Inputs arrive validated (`sdpa.fp8_sdpa` / `sdpa.fp8_sdpa_varlen`) with a `dispatch.Plan` already made:
fixed-length query (B, H_q, S_q, D) / key, value (B, H_kv, S_kv, D) BHSD views, or packed sequences
(total, H, D) with int32 offsets. Output: BSHD contiguous (B, S_q, H_q, D), or (total_q, H_q, D) packed.
`custom_ops` wraps `fp8_attention` as the torch custom op that `torch.compile` sees, with
`exact_attention_grads` as its backward (straight-through: fp8 forward, exact attention gradients).
"""

from __future__ import annotations

import contextlib

import torch

from .backends import get_backend
from .options import FP8AttentionOptions
from .quantization import QUANTIZERS, QuantizedQKV, apply_rope_reference, check_cu_seqlens, hadamard_matrix
from .quantization.qkv import add_v_mean
from .quantization.quantized import rows_bhsd


def quantize(query, key, value, cos, sin, varlen, quantizer: str, options: FP8AttentionOptions,
             v_keys_contiguous: bool = False, v_wgmma_order: bool = False, q_in_kernel: bool = False) -> QuantizedQKV:
    """Q/K/V -> `QuantizedQKV` with the planned quantizer: the Triton kernel (CUDA, SM 8.9+), which fuses
    RoPE, the Hadamard rotation and the mean subtraction into its one launch, or the torch reference
    (bit-identical without hadamard/smoothing, within an fp8 ulp on a few elements with them).

    varlen: None, or (cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k) of validated offsets.
    v_keys_contiguous: V's codes keys-contiguous (the layout the triton backend reads at long prefills).
    v_wgmma_order: those keys in wgmma order within every 16 (fixed-length only; the Gluon kernel's V layout).
    q_in_kernel: Q left to the attention kernel (`QuantizedQKV.q_in_kernel`; with v_wgmma_order only).
    """
    fixed, packed = QUANTIZERS[quantizer]
    if varlen is None:
        extra = dict(q_in_kernel=True) if q_in_kernel else {}
        return fixed(query, key, value, cos, sin, options=options, v_keys_contiguous=v_keys_contiguous,
                     v_wgmma_order=v_wgmma_order, **extra)
    if v_wgmma_order:
        raise ValueError("v_wgmma_order: not for packed sequences")
    return packed(query, key, value, *varlen, cos, sin, options=options, check=False,
                  v_keys_contiguous=v_keys_contiguous)


def restore_output(out: torch.Tensor, qkv: QuantizedQKV) -> torch.Tensor:
    """Undo the V transforms `qkv` records on the (B, S, H_q, D) output: O = O' H + v_add, with H @ H = I
    (V was centred, then rotated; v_add is V's mean less the mean quantization error, `QuantizedQKV.v_add`). A varlen output (1, total_q, H_q, D) takes each packed query's own
    sequence offset.

    One GEMM in the output dtype (fp32 accumulation; memory-bound, one read and one write of O') plus, for
    smooth_v, one in-place add of the (tiny) offset (a Triton pass on CUDA: `qkv.add_v_mean`). The float32 version of this took 0.9 ms at S=16k,
    H=32, D=128 on the H100, a third of the attention itself.
    """
    if qkv.v_rotated:
        out = torch.matmul(out, hadamard_matrix(out.shape[-1], device=out.device, dtype=out.dtype))
    add = qkv.v_add if qkv.v_add is not None else qkv.v_mean
    if add is not None and out.is_cuda and not qkv.is_varlen and out.stride(3) == 1 \
            and out.stride(2) == out.shape[3]:
        return add_v_mean(out, add)
    if add is not None:
        group = out.shape[2] // add.shape[1]
        bias = add.repeat_interleave(group, dim=1)  # (B, H_q, D) float32
        if qkv.is_varlen:  # (1, total_q, H_q, D): the offset of each query's sequence
            lengths = qkv.cu_seqlens_q.diff()
            bias = bias.repeat_interleave(lengths, dim=0, output_size=out.shape[1])[None]
        else:
            bias = bias[:, None]  # (B, 1, H_q, D)
        out = out.add_(bias)  # float32 offset: one rounding to out's dtype
    return out


def longest_sequences(cu_seqlens_q, cu_seqlens_k, total_q: int, total_k: int, *, is_causal: bool,
                      rope: bool) -> tuple[int, int]:
    """Validate a packed batch's offsets (`check_cu_seqlens`, one host read of each; fused RoPE also needs the
    same sequences for queries and keys) and return the longest query and key lengths."""
    offsets_q, offsets_k = check_cu_seqlens(cu_seqlens_q, cu_seqlens_k, total_q, total_k, is_causal=is_causal)
    if rope and offsets_q != offsets_k:
        raise ValueError("fused RoPE needs the same sequences for queries and keys (cu_seqlens_q == cu_seqlens_k)")
    return tuple(max(b - a for a, b in zip(offsets, offsets[1:])) for offsets in (offsets_q, offsets_k))


def _on_device(query: torch.Tensor):
    # Triton launches on the *current* CUDA device; with device_map="auto" or tensor parallelism the
    # tensors may live elsewhere, so every launch (and every buffer) follows the query's device.
    return torch.cuda.device(query.device) if query.is_cuda else contextlib.nullcontext()


def fp8_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    cu_seqlens_q: torch.Tensor | None,
    cu_seqlens_k: torch.Tensor | None,
    max_seqlen_q: int | None,
    max_seqlen_k: int | None,
    cos: torch.Tensor | None,
    sin: torch.Tensor | None,
    is_causal: bool,
    scale: float,
    backend: str,
    quantizer: str,
    options: FP8AttentionOptions,
) -> torch.Tensor:
    """The whole pipeline. Fixed length (cu_seqlens None): BHSD query/key/value -> (B, S_q, H_q, D)
    contiguous. Packed (cu_seqlens given, (total, H, D) tensors, int32 offsets on the query's device):
    -> (total_q, H_q, D); max_seqlen None means "validate the offsets and measure them here" (one host
    sync; what a compiled graph does, since it cannot read them while tracing).
    """
    varlen = None
    if cu_seqlens_q is not None:
        if max_seqlen_q is None or max_seqlen_k is None:
            max_seqlen_q, max_seqlen_k = longest_sequences(cu_seqlens_q, cu_seqlens_k, query.shape[0], key.shape[0],
                                                           is_causal=is_causal, rope=cos is not None)
            if cos is not None:  # checked equal just above (see `sdpa.fp8_sdpa_varlen`)
                cu_seqlens_k = cu_seqlens_q
        varlen = (cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
    # what the kernels run: smooth_v="auto" from the backend and the key length (a packed batch: its longest
    # sequence; here, inside the op, so that eager and compiled calls decide alike), hadamard="auto" from the
    # head dim
    options = options.for_keys(backend, key.shape[2] if varlen is None else max_seqlen_k)
    options = options.for_head_dim(query.shape[-1])
    # a backend that reads V keys-contiguous at this shape (triton's long prefills) gets it so from the
    # quantizer, not by a copy of its own
    record = get_backend(backend)
    reads_v_keys = record.v_keys_contiguous
    v_keys = reads_v_keys is not None and reads_v_keys(
        query.shape[2] if varlen is None else max_seqlen_q, query.shape[1], key.shape[1],
        key.shape[2] if varlen is None else max_seqlen_k, query.shape[-1])
    reads_wgmma = record.v_wgmma_order
    v_wgmma = v_keys and reads_wgmma is not None and reads_wgmma(
        query.device, query.shape[2], query.shape[1], key.shape[1], key.shape[2], query.shape[-1],
        is_causal=is_causal, options=options, varlen=varlen is not None)
    # that kernel may quantize Q itself, one scale per row (the quantizer then does K and V only)
    q_in = (v_wgmma and quantizer == "triton" and record.q_in_kernel is not None
            and record.q_in_kernel(options, cos is not None))
    # the first call of a shape: the backend may compile its kernel beside the quantizer's compile (the Triton
    # quantizer's: its outputs' layout is what the backend's warmup mirrors)
    ahead = record.compile_ahead if v_wgmma and quantizer == "triton" else None
    with _on_device(query):
        compiling = contextlib.nullcontext() if ahead is None else ahead(
            query.device, query.shape[0], query.shape[2], query.shape[1], key.shape[1], key.shape[2], query.shape[-1],
            is_causal=is_causal, scale=scale, out_dtype=query.dtype, v_wgmma_order=v_wgmma, q_in_kernel=q_in,
            q_rotate=q_in and options.rotates_qk)
        with compiling:
            qkv = quantize(query, key, value, cos, sin, varlen, quantizer, options, v_keys, v_wgmma, q_in)
        out = record.fn(qkv, is_causal=is_causal, scale=scale, out_dtype=query.dtype)
        if qkv.output_needs_fixup:
            out = restore_output(out, qkv)
    return out if varlen is None else out[0]


# --- backward: straight-through ---------------------------------------------------------------------------
# The fp8 forward has no useful derivative of its own (rounding), so gradients are those of the exact
# attention in the input dtype, recomputed from the saved bf16/fp16 inputs: fp8 numerics forward, the exact
# attention's gradients backward (what fine-tuning with fp8 inference numerics wants). RoPE, when fused, is
# part of that exact attention; the Hadamard rotation and the mean subtraction are exact transforms and
# change nothing in it.


def _exact_attention(query, key, value, cos, sin, is_causal: bool, scale: float) -> torch.Tensor:
    """query (B, H_q, S_q, D), key/value (B, H_kv, S_kv, D) -> (B, S_q, H_q, D): torch SDPA in the input
    dtype, bottom-right causal, RoPE applied first when cos/sin are given (as the quantizer does)."""
    if cos is not None:
        query, key = (apply_rope_reference(t.float(), cos, sin).to(t.dtype) for t in (query, key))
    s_q, s_kv = query.shape[2], key.shape[2]
    mask = None
    if is_causal and s_q != s_kv:
        mask = torch.ones(s_q, s_kv, dtype=torch.bool, device=query.device).tril(s_kv - s_q)
    out = torch.nn.functional.scaled_dot_product_attention(
        query, key, value, attn_mask=mask, is_causal=is_causal and mask is None, scale=scale,
        enable_gqa=query.shape[1] != key.shape[1],
    )
    return out.transpose(1, 2)


def exact_attention_grads(grad_out, query, key, value, cu_seqlens_q, cu_seqlens_k, cos, sin, is_causal: bool,
                          scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of the exact attention w.r.t. query, key, value for the output gradient ``grad_out``, in
    `fp8_attention`'s layouts: fixed (B, S_q, H_q, D) grad for BHSD inputs, or packed (total_q, H_q, D)
    grad for packed inputs (one sequence at a time; the offsets are read on the host)."""
    def exact(q, k, v):
        if cu_seqlens_q is None:
            return _exact_attention(q, k, v, cos, sin, is_causal, scale)
        cu_q, cu_k = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
        rope = cos is not None
        tables = (cos.reshape(-1, cos.shape[-1]), sin.reshape(-1, sin.shape[-1])) if rope else None
        parts = []
        for i in range(len(cu_q) - 1):
            (q0, q1), (k0, k1) = cu_q[i : i + 2], cu_k[i : i + 2]
            c, s = (tables[0][None, q0:q1], tables[1][None, q0:q1]) if rope else (None, None)
            parts.append(_exact_attention(rows_bhsd(q, q0, q1), rows_bhsd(k, k0, k1), rows_bhsd(v, k0, k1), c, s,
                                          is_causal, scale)[0])
        return torch.cat(parts)

    # torch.func, not torch.autograd: inside a custom op's implementation the autograd keys are excluded
    _, vjp = torch.func.vjp(exact, query, key, value)
    dq, dk, dv = vjp(grad_out)
    return dq, dk, dv
