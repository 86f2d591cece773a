"""Triton FP8 attention (any CUDA GPU Triton supports fp8 dots on; tuned for Hopper). Layout: BSHD. GQA/MQA.

Launches the kernels of `triton_attention.py`: the autotuned prefill kernel, or, when a KV head has few
query rows (decode), a small-tile kernel whose keys are split over several programs and merged by a
combine kernel. Same semantics as `reference.py` (FA3's fp8 rounding), within online-softmax rounding.
Long prefills read V keys-contiguous (fp8 wgmma needs P.V's B operand K-major): `attention.fp8_attention`
has the quantizer write it so (a BSHD view with unit stride over keys); a BSHD V handed in is copied first.
"""

from __future__ import annotations

import dataclasses
import functools
import os

import torch

from .._constants import FP8_DTYPE, SCALE_BLOCK, SUPPORTED_HEAD_DIMS, V_SCALE_BLOCK
from .._intmath import cdiv, next_power_of_2
from ..quantization import QuantizedQKV
from ..quantization.quantized import keys_contiguous, natural_key_order
from ..quantization.reference import quantize_q_per_head
from .. import backends as _registry  # its TRITON_* constants, read at call time (tests patch them)
from .triton_attention import _fp8_attn_combine_kernel, _fp8_attn_fwd_kernel, fp8_attn_fwd_prefill

_OUT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
# The prefill kernel (HF_FP8_ATTENTION_TRITON_KERNEL): "auto" (unset) sends the prefill calls that
# `gluon_attention.gluon_fp8_attention` takes (per-head scales, e4m3, keys-contiguous V, key count a multiple of
# 16) on Hopper at head_dim 128 to the Gluon kernel with two consumers whose MMAs take turns, in its persistent
# build ("gluon-pp-persistent", below; until session 19 the one-tile "gluon-pp"). The one-tile build: on the
# H200 it measured 0.89-0.94x FA3 fp8 against the Triton kernel's 0.73-0.86x at 16k/64k (session 18,
# docs/results/gluon_probe2_h200_s18.log; "gluon-2c", the same without turns, 0.93x at 16k: within the run-to-run
# spread, and the backend's GPU tests ran through gluon-pp); every other call keeps the autotuned Triton kernel.
# "triton": always the Triton kernel. "gluon" (one 8-warp consumer),
# "gluon-2c" (two), "gluon-pp" (two, their MMAs in turn) and "gluon-pp-persistent" (that, one program per SM
# looping over the tiles, causal ones heaviest first, heads fastest while all heads' K/V fit in half the L2 and
# head by head beyond (`gluon_attention.persistent_heads_fastest`); since session 25 with P's row sums by MMA,
# 46-54 dB from gluon-pp; "gluon-pp-persistent-alu-sums": the same with the sums in the softmax, bit-equal to
# gluon-pp in its probes): the
# Gluon kernel wherever it applies, D 64 too. auto takes gluon-pp-persistent since session 20: timed against
# gluon-pp in the same processes (docs/results/gluon_persistent_order_h200_s20.log) 1.02x causal at 16k,
# 1.07x at 8 x 4k, 1.17x at 4k, 1.08-1.12x at 8k (MHA, GQA 32/8), 1.00x non-causal; bench_sdpa's kernel alone
# (docs/results/sdpa_routes_h200_s20.log, the earlier heads-fastest-only order) 0-4% faster non-causal. The
# Gluon kernel reads V keys-contiguous, which prefill has from S_kv * D >= 256k (`TRITON_V_KEYS_MIN_KEYS_X_DIM`),
# and takes key counts that are multiples of 16 (`gluon_attention.refusal`); auto also wants S_q >= 128 (a full
# query tile per head): other calls keep the Triton kernel. The Gluon kernel needs triton >= 3.6
# (`gluon_unavailable`): with an older triton auto keeps the Triton kernel and a gluon* value is an error.
KERNEL_ENV = _registry.TRITON_KERNEL_ENV
_GLUON_2C = dict(config=(128, 128, 4, 2), consumers=2)
# Since session 25 the persistent build takes the row sums of P from an MMA with a block of ones
# (`gluon_attention._attend_block`'s ROWSUM_MMA): H200, probe_ws A/B in the same processes
# (docs/results/gluon_rowsum_mma_h200_s25.log, gluon_rowsum_sdpa_h200_s25.log), GQA 32/8, D=128: non-causal
# 1.02x at 16k and 1.06-1.08x at 64k, causal 1.00x at 16k and 64k, 0.98-1.01x at 4k; 46-54 dB against the build without, the same SQNR against
# float32 (26.4 dB at 4k causal) or higher with a V channel offset of 4 (52.2 vs 50.4 dB). "gluon-pp-persistent-
# alu-sums" keeps the sums in the softmax (sessions 20-24).
_GLUON_PP_PERSISTENT = dict(_GLUON_2C, pingpong=True, persistent=True)
_KERNELS = {"auto": "auto", "triton": None, "gluon": dict(config=(128, 128, 8, 2), consumers=1),
            "gluon-2c": _GLUON_2C, "gluon-pp": dict(_GLUON_2C, pingpong=True),
            "gluon-pp-persistent": dict(_GLUON_PP_PERSISTENT, rowsum_mma=True, tma_store=True),
            "gluon-pp-persistent-key-order": dict(_GLUON_PP_PERSISTENT, rowsum_mma=True, tma_store=True),
            "gluon-pp-persistent-plain-store": dict(_GLUON_PP_PERSISTENT, rowsum_mma=True),
            "gluon-pp-persistent-q2": dict(_GLUON_PP_PERSISTENT, rowsum_mma=True, tma_store=True, q_buffers=2),
            "gluon-pp-persistent-alu-sums": _GLUON_PP_PERSISTENT}
# Session 30: the default build with part of the softmax's exponentials by a polynomial on the FMA pipe (1, 2 or 4 of
# every 8: `gluon_attention._exp2`), for A/B runs.
_EXP2_ROUTES = {f"gluon-pp-persistent-exp2-{emu}": dict(_KERNELS["gluon-pp-persistent"], exp2_emu=emu) for emu in (1, 2, 4)}
_KERNELS.update(_EXP2_ROUTES)
# Session 26: the routes whose prefill calls get V from the quantizer in wgmma key order within every 16
# (`quantized.wgmma_key_order`; the kernel relabels P instead of moving it between threads before P.V:
# `gluon_attention._softmax`'s V_WGMMA_ORDER); "gluon-pp-persistent-key-order" is the same build on V in key
# order (sessions 20-25). The quantizer writes the order where `reads_v_wgmma_order` says the call will take
# this route; a call that ends up on any other kernel gets V back in key order first (`_launch`, a copy).
_V_WGMMA_ROUTES = frozenset({"auto", "gluon-pp-persistent", "gluon-pp-persistent-plain-store", "gluon-pp-persistent-q2",
                             *_EXP2_ROUTES})
# Session 29: where the kernel quantizes Q itself (`q_in_kernel`) its bf16/fp16 Q tiles take one shared buffer, which
# the consumers release once they hold their rows in e4m3; "gluon-pp-persistent-q2" keeps two (the e4m3 Q's count).
# Since session 28 the persistent build writes its output through shared memory by TMA stores left in flight
# under the next tile (`gluon_attention`'s TMA_STORE; FA3's epilogue; session 27's probe) instead of each
# thread's plain stores, which "gluon-pp-persistent-plain-store" keeps (sessions 20-27; so does
# "gluon-pp-persistent-alu-sums", an A/B of the row sums against the plain-store build). H200, bench_sdpa's
# kernels alone, GQA 32/8, D=128, 2 rounds, two runs (docs/results/tma_sdpa_h200_s28.log,
# default_sdpa_h200_s28.log), non-causal / causal: 1.08x / 1.03x and 1.03x / 1.02x at 16k, 0.995x / 1.01x and
# 1.01x / 1.02x at 64k, at 95.9-100.2% of the FA3 fp8 kernel (plain stores 91-98%); at 4k, graph-timed
# (host_h200_s28_before.log), 1.05x / 1.08x. Where a tile could run past a sequence's end into the next (B > 1
# with S_q not a multiple of 128) the launcher keeps the plain stores.
_AUTO_KERNEL = _KERNELS["gluon-pp-persistent"]
_AUTO_HEAD_DIMS = (128,)  # where the Gluon kernel was measured faster (D=64: correct, its speed not measured)
# Decode splits the keys over programs from this many keys on (H100: at 4k keys the extra combine launch
# cost more than it saved, at 16k splitting was faster; launch overhead dominates short decodes).
_SPLIT_MIN_KEYS = 8192


@functools.lru_cache(maxsize=None)
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _check(qkv: QuantizedQKV, out_dtype: torch.dtype) -> None:
    q, k, v = qkv.q, qkv.k, qkv.v
    for name, t in (("q", q), ("k", k), ("v", v)):
        # V may also be a BSHD view of keys-contiguous (B, H_kv, D, S_kv) memory, the layout the kernel
        # reads fastest on Hopper.
        ok_layout = t.is_contiguous() or (name == "v" and t.dim() == 4 and t.stride(1) == 1)
        # int8 q/k (qk_format="int8") come with their per-block descales
        ok_dtype = t.dtype == FP8_DTYPE or (name != "v" and t.dtype == torch.int8 and qkv.block_scales)
        if not ok_dtype or t.dim() != 4 or not ok_layout:
            raise ValueError(f"triton fp8 attention takes contiguous 4-D {FP8_DTYPE} BSHD {name} (int8 q/k with "
                             f"block scales), got {t.dtype} {tuple(t.shape)} strides {t.stride()}")
    if q.shape[-1] not in SUPPORTED_HEAD_DIMS:
        raise ValueError(f"triton fp8 attention supports head_dim {SUPPORTED_HEAD_DIMS}, got {q.shape[-1]}")
    if out_dtype not in _OUT_DTYPES:
        raise ValueError(f"triton fp8 attention writes {_OUT_DTYPES}, got out_dtype={out_dtype}")


def _on_hopper(t: torch.Tensor) -> bool:
    return t.is_cuda and _hopper_device(t.device)


def _hopper_device(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.get_device_capability(device)[0] == 9


def kernel_choice() -> str:
    """The `KERNEL_ENV` value ("auto" when unset); a value it does not know is an error."""
    choice = os.environ.get(KERNEL_ENV, "auto")
    if choice not in _KERNELS:
        raise ValueError(f"{KERNEL_ENV}={choice!r}: expected one of {sorted(_KERNELS)}")
    return choice


@functools.lru_cache(maxsize=None)
def gluon_unavailable() -> str | None:
    """Why the installed triton cannot run the Gluon kernel (`gluon_attention.triton_problem`, or its import
    failing), or None."""
    try:
        from . import gluon_attention
    except (ImportError, AttributeError) as error:  # an older triton without gluon's Hopper module or names
        import triton

        return f"the Gluon kernel does not import with triton {triton.__version__} ({error})"
    return gluon_attention.triton_problem()


def reads_v_wgmma_order(device: torch.device, s_q: int, h_q: int, h_kv: int, s_kv: int, dim: int, *, is_causal: bool,
                        options, varlen: bool) -> bool:
    """Whether a prefill call of this shape and these resolved options (`FP8AttentionOptions`) runs the Gluon
    kernel through a route of `_V_WGMMA_ROUTES`, which then reads V in wgmma key order: what the pipeline asks
    the quantizer for (`backends.triton_reads_v_wgmma_order`). The static part of `_gluon_route` and of
    `gluon_attention.refusal` (the quantizer's outputs are contiguous and aligned); a call it misjudges still
    runs right (`_launch` restores key order for another kernel)."""
    from . import triton_reads_v_keys_contiguous

    if varlen or options.block_scales or options.int8_qk or options.v_block_scales:
        return False
    if not triton_reads_v_keys_contiguous(s_q, h_q, h_kv, s_kv, dim) or s_kv % 16 or (is_causal and s_q != s_kv):
        return False
    if not _hopper_device(device) or kernel_choice() not in _V_WGMMA_ROUTES:
        return False
    if _route_kernel(True, dim, s_q, raise_unavailable=False) is None:  # (None also where Gluon cannot build)
        return False
    from .gluon_attention import GLUON_HEAD_DIMS

    return dim in GLUON_HEAD_DIMS


# Q_IN_KERNEL_ENV: "1" lets the Gluon kernel quantize Q itself, one e4m3 scale per query row, wherever the call reads
# V in wgmma order without fused RoPE (`q_in_kernel`); "0" (the default): the quantizer quantizes Q with one scale
# per (batch, KV head). Off by default because it measured slower where it was meant to help. H200, session 29,
# bench_sdpa GQA 32/8, D=128, 2 rounds, two runs (docs/results/q_in_kernel_sdpa_h200_s29_run*.log): the quantizer
# then moves K and V only, but the kernel alone ran 92.5-96.0% of FA3's fp8 kernel instead of 95.0-101.6% (the
# hot loop's SASS is the same as with e4m3 Q; the rotated build -1.5% to +4.8% against it; one bf16 Q buffer or
# two: alike at 16k causal and 64k, 5.20 vs 4.95 ms at 16k non-causal), so fp8_triton end to end at 16k-64k ran
# 0.976-1.018x (run 2) and 0.985-1.024x (run 1) of the per-head path, and at 4k 0.93-1.31x with eager timings bound
# by the host. The per-row scales are as accurate or more (tests/gpu/test_gluon_gpu.py: with an outlier query row
# the rest of its KV group gains 0.6-0.7 dB unrotated, more than 3 dB rotated).
Q_IN_KERNEL_ENV = "HF_FP8_ATTENTION_Q_IN_KERNEL"


def q_in_kernel(options, rope: bool) -> bool:
    """Whether a prefill call that `reads_v_wgmma_order` leaves Q to the Gluon kernel (`QuantizedQKV.q_in_kernel`:
    each query row quantized with its own scale as its tile loads, rotated by the Hadamard matrix in the
    Hadamard modes that rotate Q and K): per-head e4m3 scales (already implied by the wgmma order), no fused
    RoPE (the quantizer applies it), and `Q_IN_KERNEL_ENV` "1" (off by default: measured slower at 16k-64k, see
    there). The quantizer then reads and writes K and V only: Q is 2/3 of the bytes at GQA 32/8."""
    value = os.environ.get(Q_IN_KERNEL_ENV, "0")
    if value not in ("0", "1"):
        raise ValueError(f"{Q_IN_KERNEL_ENV}={value!r}: expected 0 or 1")
    return value == "1" and not rope and not (options.block_scales or options.int8_qk or options.v_block_scales)


def compile_ahead(device: torch.device, batch: int, s_q: int, h_q: int, h_kv: int, s_kv: int, dim: int, *,
                  is_causal: bool, scale: float, out_dtype: torch.dtype, v_wgmma_order: bool,
                  q_in_kernel: bool = False, q_rotate: bool = False):
    """A context manager for the quantization of a fixed-length prefill call: where the call will run the Gluon
    kernel through a route of `_V_WGMMA_ROUTES` (v_wgmma_order: `reads_v_wgmma_order` said so), that kernel's
    first compile for this shape starts beside the quantizer's (`gluon_attention.compile_ahead`); elsewhere a
    plain context. The pipeline's ``compile_ahead`` (`backends.triton_compile_ahead`); q_in_kernel / q_rotate:
    the bundle will leave Q to the kernel (`q_in_kernel`), rotated or not."""
    import contextlib

    if not v_wgmma_order:
        return contextlib.nullcontext()
    route = _route_kernel(True, dim, s_q, raise_unavailable=False)
    if route is None:
        return contextlib.nullcontext()
    from . import gluon_attention

    # (the quantizer writes keys-contiguous V with S_kv rows: the descriptor's row stride)
    if q_in_kernel:  # (as `gluon_attention.attend` adds them from the bundle)
        route = dict(route, q_in_kernel=True, q_rotate=bool(q_rotate))
    return gluon_attention.compile_ahead(device, (batch, s_q, h_q, s_kv, h_kv, dim, s_kv), is_causal=is_causal,
                                         scale=scale, out_dtype=out_dtype, v_wgmma_order=True, **route)


def _route_kernel(on_hopper: bool, dim: int, s_q: int, raise_unavailable: bool = True) -> dict | None:
    """The Gluon launcher's keyword arguments of the `KERNEL_ENV` route for a prefill call of this head dim and
    query length on Hopper (or not), or None where the route keeps the Triton kernel. auto falls back to the
    Triton kernel where the installed triton cannot build the Gluon kernel; a gluon* value there is an error
    (raise_unavailable; else None)."""
    choice = kernel_choice()
    kernel = _KERNELS[choice]
    if kernel is None or not on_hopper:
        return None
    problem = gluon_unavailable()
    if problem is not None:
        if kernel == "auto" or not raise_unavailable:
            return None
        raise ValueError(f"{KERNEL_ENV}={choice!r}: {problem}; unset it (auto) or set 'triton'")
    if kernel == "auto":
        # D=128 only (measured), and a full query tile: the Gluon kernel gives every query head its own
        # BLOCK_M-row tiles, where the Triton kernel packs a KV head's query heads into its rows
        if dim not in _AUTO_HEAD_DIMS or s_q < _AUTO_KERNEL["config"][0]:
            return None
        kernel = _AUTO_KERNEL
    return kernel


def _gluon_route(qkv: QuantizedQKV, v: torch.Tensor, is_causal: bool):
    """(qkv with this V, the Gluon launcher's keyword arguments) when `KERNEL_ENV` sends this prefill call to
    the Gluon kernel (`_route_kernel`) and it takes it (`gluon_attention.refusal`), else None."""
    kernel = _route_kernel(_on_hopper(qkv.q), qkv.q.shape[-1], qkv.q.shape[1])
    if kernel is None:
        return None
    from . import gluon_attention

    if v is not qkv.v:
        qkv = dataclasses.replace(qkv, v=v)
    return None if gluon_attention.refusal(qkv, is_causal) else (qkv, kernel)


def _decodes(s_q: int, h_q: int, h_kv: int) -> bool:
    """Whether a call takes the decode kernels: few query rows per KV head (S_q times the GQA group)."""
    return s_q * (h_q // h_kv) <= _registry.TRITON_DECODE_MAX_ROWS


def _launch(
    qkv: QuantizedQKV,
    is_causal: bool,
    scale: float,
    out_dtype: torch.dtype,
    *,
    v_keys_contiguous: bool | None = None,
    config: dict | None = None,
) -> torch.Tensor:
    """The backend with knobs for tests and benchmarks.

    v_keys_contiguous: copy BSHD V to (B, H_kv, D, S_kv) first, the K-major layout Hopper's fp8 wgmma
        wants for the P.V operand (otherwise Triton transposes each V tile on chip). None: copy for
        prefill with S_kv * D >= 256k; never when V already has unit stride over keys.
    config: explicit {"BLOCK_M", "BLOCK_N", "num_warps", "num_stages", "num_splits"} instead of the
        autotuned/heuristic choice (tests use it to run several tiles in the interpreter).
    """
    if qkv.q_in_kernel:  # Q left to the Gluon kernel (`q_in_kernel`): its persistent build, prefill, an output
        # dtype the backend writes, and within shared memory (two bf16 Q buffers, the rotation's matrix and a float32
        # output's buffers together exceed an SM's: route gluon-pp-persistent-q2)
        route = None
        if config is None and out_dtype in _OUT_DTYPES and not _decodes(qkv.q.shape[1], qkv.q.shape[2], qkv.k.shape[2]):
            route = _gluon_route(qkv, qkv.v, is_causal)
        if route is not None and (not route[1].get("persistent") or (
                qkv.q_rotate and out_dtype == torch.float32 and route[1].get("q_buffers", 1) == 2)):
            route = None
        if route is not None:
            from . import gluon_attention

            return gluon_attention.attend(route[0], is_causal=is_causal, scale=scale, out_dtype=out_dtype,
                                          v_wgmma_order=qkv.v_wgmma_order, **route[1])
        # the pipeline misjudged the route (or a test's config): Q quantized as the quantizer would have
        qkv = quantize_q_per_head(qkv)
    _check(qkv, out_dtype)
    q, k, v = qkv.q, qkv.k, qkv.v
    _, _, h_q, dim = q.shape
    h_kv = k.shape[2]
    varlen = qkv.is_varlen
    if varlen:  # N packed sequences: the grid spans the longest; batch strides are token strides
        batch, s_q, s_kv = qkv.q_descale.shape[0], qkv.max_seqlen_q, qkv.max_seqlen_k
        stride_qb, stride_kb = q.stride(1), k.stride(1)
        cu_q, cu_k = qkv.cu_seqlens_q, qkv.cu_seqlens_k
    else:
        batch, s_q, s_kv = q.shape[0], q.shape[1], k.shape[1]
        stride_qb, stride_kb = q.stride(0), k.stride(0)
    group = h_q // h_kv
    n_rows = s_q * group
    dim_pad = next_power_of_2(dim)
    bh = batch * h_kv
    decode = _decodes(s_q, h_q, h_kv)
    if v_keys_contiguous is None:  # (the quantizer writes it so where fp8_attention asked it to: no copy)
        v_keys_contiguous = _registry.triton_reads_v_keys_contiguous(s_q, h_q, h_kv, s_kv, dim)
    if v_keys_contiguous and v.stride(1) != 1:
        v = keys_contiguous(v)  # BSHD view of (B, H_kv, D, S_kv)
    v_strides = (v.stride(0), v.stride(1), v.stride(2), v.stride(3))

    if config is None and decode:
        block_m = max(16, next_power_of_2(n_rows))
        config = {"BLOCK_M": block_m, "BLOCK_N": 64 if dim_pad >= 256 else 128, "num_warps": 4, "num_stages": 3}
        programs = cdiv(n_rows, block_m) * bh
        sms = 4 if _interpreting() or not q.is_cuda else _num_sms(q.device.index or 0)
        # Enough programs to fill the GPU twice, each with at least 4 key blocks.
        splits = min(cdiv(2 * sms, programs), cdiv(s_kv, 4 * config["BLOCK_N"]))
        if s_kv < _SPLIT_MIN_KEYS and not _interpreting():
            splits = 1
        config["num_splits"] = min(64, next_power_of_2(max(1, splits)))
    route = _gluon_route(qkv, v, is_causal) if config is None and not decode else None
    if route is not None:  # the Gluon kernel (KERNEL_ENV)
        from . import gluon_attention

        # (`refusal` took the call in `_gluon_route`; the route's arguments are fixed: `attend` skips the checks)
        return gluon_attention.attend(route[0], is_causal=is_causal, scale=scale, out_dtype=out_dtype,
                                      v_wgmma_order=qkv.v_wgmma_order, **route[1])
    if qkv.v_wgmma_order:  # the kernels below read V in key order
        v = natural_key_order(v)
        v_strides = (v.stride(0), v.stride(1), v.stride(2), v.stride(3))
    if config is None and _interpreting():
        config = {"BLOCK_M": 64, "BLOCK_N": 32}
    out = torch.empty(q.shape, dtype=out_dtype, device=q.device)  # (after the Gluon route: it allocates its own)
    if not varlen:
        cu_q = cu_k = out  # never read

    num_splits = (config or {}).get("num_splits", 1)
    block_n = (config or {}).get("BLOCK_N", 128)
    keys_per_split = cdiv(cdiv(s_kv, num_splits), block_n) * block_n
    if num_splits > 1:
        o_part = torch.empty(num_splits, bh, n_rows, dim_pad, dtype=torch.float32, device=q.device)
        ml_part = torch.empty(num_splits, bh, n_rows, 2, dtype=torch.float32, device=q.device)
    else:
        o_part = ml_part = out  # unused
    args = (
        q, k, v, out, qkv.q_descale, qkv.k_descale, qkv.v_descale, o_part, ml_part, cu_q, cu_k,
        *((qkv.q_block_descale, qkv.k_block_descale) if qkv.block_scales else (out, out)),
        qkv.v_block_descale if qkv.v_block_scales else out,
        cdiv(s_q, SCALE_BLOCK), cdiv(s_kv, qkv.k_scale_block), cdiv(s_kv, V_SCALE_BLOCK),
        stride_qb, q.stride(1), stride_kb, k.stride(1), *v_strides,
        out.stride(0), out.stride(1),
        h_kv, s_q, s_kv, float(scale), keys_per_split, int(s_kv >= 4096),
    )
    constexprs = dict(GROUP=group, HEAD_DIM=dim, HEAD_DIM_PAD=dim_pad, IS_CAUSAL=bool(is_causal),
                      NUM_SPLITS=num_splits, V_KEYS_CONTIGUOUS=v.stride(1) == 1, VARLEN=varlen,
                      BLOCK_SCALES=qkv.block_scales, SCALE_BLOCK=SCALE_BLOCK,
                      K_SCALE_BLOCK=qkv.k_scale_block, QK_INT8=q.dtype == torch.int8,
                      V_BLOCK_SCALES=qkv.v_block_scales, V_SCALE_BLOCK=V_SCALE_BLOCK)
    if config is None:
        grid = lambda meta: (cdiv(n_rows, meta["BLOCK_M"]), bh, 1)  # noqa: E731
        fp8_attn_fwd_prefill[grid](*args, **constexprs)
        return out
    launch = {key: config[key] for key in ("num_warps", "num_stages") if key in config}
    grid = (cdiv(n_rows, config["BLOCK_M"]), bh, num_splits)
    _fp8_attn_fwd_kernel[grid](*args, **constexprs, BLOCK_M=config["BLOCK_M"], BLOCK_N=block_n, **launch)
    if num_splits > 1:
        block_r = min(64, max(16, next_power_of_2(n_rows)))
        _fp8_attn_combine_kernel[(cdiv(n_rows, block_r), bh)](
            out, qkv.v_descale, o_part, ml_part, cu_q, out.stride(0), out.stride(1), h_kv, s_q, bh,
            GROUP=group, HEAD_DIM=dim, HEAD_DIM_PAD=dim_pad, NUM_SPLITS=num_splits, BLOCK_R=block_r, VARLEN=varlen,
            V_BLOCK_SCALES=qkv.v_block_scales,
        )
    return out


def triton_fp8_attention(qkv: QuantizedQKV, *, is_causal: bool, scale: float, out_dtype: torch.dtype) -> torch.Tensor:
    """q (B, S_q, H_q, D), k/v (B, S_kv, H_kv, D) e4m3, descales (B, H_kv) -> (B, S_q, H_q, D) ``out_dtype``.
    Varlen `qkv` (packed sequences, see `QuantizedQKV`): one launch over all sequences, output (1, total_q, H_q, D)."""
    return _launch(qkv, is_causal, scale, out_dtype)
