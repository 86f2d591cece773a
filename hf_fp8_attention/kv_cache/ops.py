"""Launchers of the FP8 KV cache kernels, and their torch counterparts (CPU, or ``impl="torch"``).

`write_blocks` appends tokens to a layer's fp8 storage; `cache_attention` runs new queries against it. Both
take an ``impl``: "triton" (the kernels of `kernels.py`; CUDA on SM 8.9+, or the interpreter in CPU tests)
or "torch" (`reference.py`).
"""

from __future__ import annotations


import torch

from .._constants import FP8_MAX, KV_BLOCK, SUPPORTED_HEAD_DIMS
from .. import _launch
from .._intmath import cdiv, next_power_of_2
from . import reference


def _unit_last(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _check_rotatable(D: int) -> None:
    if not rotatable(D):
        raise ValueError(f"the fp8 cache's Hadamard rotation needs a power-of-two head_dim in [32, 256], got {D}")


def rotatable(head_dim: int) -> bool:
    """Whether the cache can rotate K and Q by the Hadamard matrix at this head_dim (a power of two; the
    kernels' half-tile dots need D / 2 >= 16)."""
    return 32 <= head_dim <= 256 and not head_dim & (head_dim - 1)


def write_blocks(key, value, cos, sin, k8, v8, k_desc, v_desc, tail_in, tail_out, length: int, *, impl: str,
                 rotate: bool, query=None, q_out=None, q_desc_out=None,
                 device_length: torch.Tensor | None = None, length_out: torch.Tensor | None = None,
                 warm_only: bool = False) -> None:
    """Append key/value (B, H, n, D) after ``length`` cached tokens (key rotated with cos/sin (B or 1, n, D)
    first when given, then by the normalised Hadamard matrix with ``rotate``) into k8/v8 (B, H, capacity, D)
    e4m3 and k_desc/v_desc (B, H, capacity // KV_BLOCK), re-quantizing the partial block at ``length`` from
    tail_in (2, B, H, KV_BLOCK, D) float32 (K, V) and leaving the new partial block's float32 values in
    tail_out (may be tail_in for impl="torch").

    query (B, n, H * G, D) with q_out (B, n, H * G, D) float16 and q_desc_out (B, n, H * G) float32, both
    contiguous (impl="triton", power-of-two D, n * G <= `FP16_MAX_ROWS`): the n new tokens' queries as the
    attention's decode build makes its operand from them (RoPE with cos/sin, the rotation with ``rotate``, a
    scale per row, fp16), written by the same launch, for `cache_attention(q_out, ..., q_descale=q_desc_out)`
    (a decode step: once, not in every split program; `reference.prepare_queries`).

    device_length (the static cache, `static.FP8StaticCacheLayer`): the cached length is this int64 scalar
    tensor's value, read on the device (no host sync: a CUDA graph replays the launch at every length;
    ``length`` is ignored), and tail_in / tail_out are (2, 2, B, H, KV_BLOCK, D) parity slots (the
    kernel's DEVICE_LEN): tail_out the layer's, tail_in the same tensor or, for n > KV_BLOCK, a copy of it.
    impl="torch" reads the length on the host.

    length_out (not with device_length): an int64 scalar tensor on the cache's device that receives
    ``length`` (the tokens cached before these), written by the same launch (the kernel's LEN_OUT), for a
    following `cache_attention(..., device_length=length_out)` of these tokens' queries.

    warm_only (impl="triton"): compile the build this call would launch (Triton's warm-up) and return, nothing
    launched or written (`warm_decode_step`)."""
    n = key.shape[2]
    if length_out is not None:
        if device_length is not None:
            raise ValueError("write_blocks: length_out is for a host length, not with device_length")
        if length_out.dtype != torch.int64 or length_out.numel() != 1 or length_out.device != k8.device:
            raise ValueError("write_blocks(length_out=...) takes a one-element int64 tensor on the cache's device, "
                             f"got {length_out.dtype} of {length_out.numel()} elements on {length_out.device}")
        if impl == "torch" and not warm_only:
            length_out.fill_(length)
    if warm_only and impl == "torch":
        return
    if device_length is not None and impl == "torch":
        length = int(device_length)
        tail_in = tail_in[length // KV_BLOCK % 2]
        tail_out = tail_out[(length + n) // KV_BLOCK % 2]
        device_length = None
    b0 = length // KV_BLOCK * KV_BLOCK
    if rotate:
        _check_rotatable(key.shape[-1])
    if impl == "torch":
        r = length - b0
        k = key.float()
        if cos is not None:
            k = reference.apply_rope_reference(k, cos, sin)
        if rotate:
            k = reference.rotate(k, key.dtype)
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
    if warm_only and any(t is not None and t.stride(-1) != 1 for t in (key, value, cos, sin, query)):
        return  # (the launch would copy them first: no copies from a warm-up thread; it compiles inline)
    key, value = _unit_last(key), _unit_last(value)
    rope = cos is not None
    if rope:
        cos, sin = _unit_last(cos), _unit_last(sin)
    static = device_length is not None
    if static:
        if n > KV_BLOCK and tail_in.data_ptr() == tail_out.data_ptr():
            raise ValueError(f"write_blocks(device_length=...) of {n} > {KV_BLOCK} tokens reads the tails from a "
                             "copy (tail_in), not from the tensor it writes (tail_out)")
        n_blocks = cdiv(KV_BLOCK - 1 + n, KV_BLOCK)
        slot_stride = tail_out.stride(0)
        if tail_in.stride(0) != slot_stride:
            raise ValueError("write_blocks(device_length=...): tail_in and tail_out must share their layout")
        tail_in, tail_out = tail_in[0], tail_out[0]
    else:
        n_blocks = cdiv(length + n, KV_BLOCK) - length // KV_BLOCK
    on_device, interpreting, _, kernels = _gpu_parts()
    ks, vs, cs, ds = key.stride(), value.stride(), k8.stride(), k_desc.stride()  # read once: host time
    prep_q = query is not None
    if prep_q:
        group = query.shape[2] // H
        if (impl != "triton" or not rotatable(D) or query.shape != (B, n, H * group, D) or n * group > FP16_MAX_ROWS
                or q_out is None or q_out.dtype != torch.float16 or q_out.shape != query.shape
                or not q_out.is_contiguous() or q_desc_out is None or q_desc_out.dtype != torch.float32
                or q_desc_out.shape != query.shape[:3] or not q_desc_out.is_contiguous()):
            raise ValueError("write_blocks(query=...) takes (B, n, H * G, D) queries of a power-of-two D, at most "
                             f"{FP16_MAX_ROWS} rows per KV head, with contiguous q_out (that shape, float16) and "
                             "q_desc_out ((B, n, H * G), float32)")
        query = _unit_last(query)
        qs = query.stride()
    else:
        group, qs = 1, (0, 0, 0)

    cb, cc = ((cos.stride(0) if cos.shape[0] > 1 else 0), cos.stride(1)) if rope else (0, 0)
    cos, sin = (cos, sin) if rope else (key, key)
    q_src, q_o, q_d = (query, q_out, q_desc_out) if prep_q else (key, key, key)
    consts = dict(
        HEAD_DIM=D, HALF_PAD=next_power_of_2(D // 2), APPLY_ROPE=rope, FP8_MAX=FP8_MAX, KV_BLOCK=KV_BLOCK,
        ROTATE_K=bool(rotate), INV_SQRT_D=D**-0.5, ROT_F32=key.dtype == torch.bfloat16 and interpreting(),
        Q_src=q_src, Q_out=q_o, Q_desc=q_d, stride_qb=qs[0], stride_qs=qs[1], stride_qh=qs[2], PREP_Q=prep_q,
        GROUP=group, Q_ROWS=max(16, next_power_of_2(n * group)) if prep_q else 16,  # a constant unless used
        num_warps=4, enable_fp_fusion=False,
    )
    tails = (tail_in[0], tail_in[1], tail_out[0], tail_out[1])
    args = (key, value, cos, sin, k8, v8, k_desc, v_desc, *tails,
            ks[0], ks[2], ks[1], vs[0], vs[2], vs[1], cb, cc, cs[0], cs[1], ds[0], ds[1], H, length, n)
    # The direct launch's key (`_launch`): what this launch's specialization depends on besides the
    # do-not-specialize ints (length, n, the descale strides): the dtypes, the specialized ints' values,
    # the constexprs, the pointers' alignment (Q_ROWS varies with n only where PREP_Q).
    key_ = None
    len_out = length_out is not None
    if len_out:
        consts.update(Len_out=length_out, LEN_OUT=True)
    if static:  # the static cache's launches are few (CUDA-graph replays): always through the JIT
        consts.update(Len=device_length, capacity=k8.shape[2], tail_slot_stride=slot_stride, DEVICE_LEN=True)
    elif _launch.wanted(k8) and _launch.aligned(key, value, cos, sin, k8, v8, k_desc, v_desc, *tails, q_src, q_o,
                                                q_d, *((length_out,) if len_out else ())):
        key_ = (k8.device, key.dtype, value.dtype, cos.dtype, sin.dtype, q_src.dtype, k8.dtype, v8.dtype,
                k_desc.dtype, v_desc.dtype, tail_in.dtype, tail_out.dtype, ks, vs, cb, cc, cs[0], cs[1], H, qs, rope,
                bool(rotate), prep_q, group, consts["Q_ROWS"], D, len_out)
    with on_device(k8):  # the cache's GPU (device_map="auto" spreads layers over several)
        if warm_only:
            if not interpreting():  # (the interpreter compiles nothing)
                kernels.cache_write_kernel.warmup(*args, grid=(n_blocks, B * H), **consts)
            return
        _launch.launch(kernels.cache_write_kernel, key_, (n_blocks, B * H), args, consts)


# Query rows per KV head (S_q * H_q / H_kv) up to which Q and P are fp16 (decode: memory-bound, the fp8
# products would save nothing); above, both products run in e4m3 (chunked prefill: compute-bound).
FP16_MAX_ROWS = 64
# Split-KV default: one full wave, as many programs as the GPU holds at once (the compiled kernel's
# residency per SM from its registers and shared memory, `_residency`, x SMs), split count rounded down.
# H200, decode GQA 32/8 D=128 (widened V: 4 programs per SM), GPU time from CUDA-graph replays (session 5 of
# 2026-12-01, docs/results/decode_splits_h200_s5.log): this was the fastest or within 0.3% of it at
# 1x4k, 1x32k, 1x128k, 8x32k and 32x8k; ~2048 keys per split (config "keys_per_split": 2048) was as fast
# at 1x128k but 1.6x slower at 1x32k (17 splits: one program per SM).
_MAX_SPLITS = 128
# The fused combine once differed from the two-launch combine on the H200: `cache_combine_kernel` ran with fp
# fusion on (ptxas contracted `l_sum += w * l` and `acc += o * w` into FFMAs) and the fused one, inside the
# attention kernel, with it off. Both run with it off since; on the H200 (session 6 of 2026-12-01, GQA 32/8,
# 5000 keys, S_q 1/4/40, 5 and the default splits) the fused output equals the split-by-split combine's bit for
# bit (tests/gpu/test_kv_cache_gpu.py guards it), and the wide combine's at S_q 1 and 4 (at 40 the wide one
# sums the splits in tree order).
CONFIG_KEYS = ("programs_per_sm", "num_warps", "num_stages", "block_n", "tile_softmax", "fused_combine",
               "prefetch_desc", "exact_waves", "wide_combine", "widen_v", "keys_per_split", "pdl", "tma")
BLOCK_N_CHOICES = tuple(KV_BLOCK * n for n in (1, 2, 4))
# Named decode configs that benchmarks time next to the default (bench_decode.py --part attention):
# "s4 default" is the default before session 5 (8 programs per SM, the split-by-split combine, V's fp8 tile
# as the P.V operand, no descale prefetch); "s8 default" the one before session 9 (always the wide combine);
# "tma" / "tma unfused": K/V by TMA (`TMA_DEFAULT`); "pdl": the wide combine with programmatic launch.
DECODE_PRESETS = {
    "s4 default": dict(programs_per_sm=8, wide_combine=False, widen_v=False, prefetch_desc=False,
                       fused_combine=False),
    "s8 default": dict(fused_combine=False),
    "tma": dict(tma=True),
    "tma unfused": dict(tma=True, fused_combine=False),
    "pdl": dict(fused_combine=False, pdl=True),
}
# config "tma" (K/V tiles by TMA): not the default. H200, session 9 (decode_attention_graph_h200_s9.log),
# GPU time from CUDA-graph replays: 1x128k 0.084 vs 0.089 ms, 8x32k 0.153 vs 0.153 (fused), 1x4k 0.012 vs
# 0.013; but in the same run the eager wall time of a decode step at a second new length rose from
# 0.44-0.61 to 1.38 ms (8x32k; 1x4k 0.62-0.80 -> 1.19), the first call at 1x4k from 4.6-5.0 to 6.2 s, and
# eager generate (B=8, 32k prompt) decoded at 56.7 ms/token where session 8's defaults took 31.8 (another
# host). Session 10 measured that host cost (first_call_h200_s10.log: fresh processes, steady eager
# append_attend, thread CPU time = wall time): 333-604 us per step with TMA vs 200-284 without (1x4k, two
# rounds), 507 vs 203 at 8x32k (per launch: two TensorDescriptor builds and Triton 3.6's tensor-map encoding
# of both; that cProfile put no Python function on the difference: session 11's did, below);
# eager generate B=8 x 32k, 2 interleaved rounds: 39.75 vs 32.27 ms/token (median). The first call is not
# slower (4.31 / 3.82 s vs 4.39 / 3.13). Eager decode is host-bound: the default stays on pointer loads.
# Session 11 (decode_host_direct_h200_s11.log), both with direct launches (`_launch`): still +44-83 us per
# step (1x4k 351 vs 268, 1x128k 294 vs 238, 8x32k 219 vs 176 us; 4th of 8 alternating blocks) against
# a GPU gain of ~4 us per step at 1x128k; a cProfile puts Triton 3.6's tensor-descriptor wrapper (a Python
# loop over all 51 arguments per launch, then the two tensor-map encodings) on it.
TMA_DEFAULT = False
# The static cache (calls with ``static=True``): TMA off by default too. Its steps are CUDA-graph replays,
# which would hide TMA's host cost, but its pointer-load build is as fast: H200, session 13, graph-timed
# (decode_attention_graph_static_h200_s13.log), static TMA vs static pointer loads: 1x4k 0.0132 vs 0.0128 ms,
# 1x128k 0.0839 vs 0.0834, 8x32k 0.1492 vs 0.1508 (another run, stride_probe_h200_s13.log: 0.0131 vs 0.0127,
# 0.0855 vs 0.0843, 0.1509 vs 0.1525); an eager step would pay +44-83 us of host time for nothing.
STATIC_TMA_DEFAULT = False
# config "pdl": the wide combine launched with programmatic dependent launch (sm_90+, not the interpreter):
# its programs are placed while the attention's last splits run, instead of after them. Not the default:
# H200 graph-timed, session 9 (decode_attention_graph_presets_h200_s9.log): 1x128k 0.090 vs 0.089 ms without.
PDL_DEFAULT = False
# fused_combine="auto": fused up to this many splits. H200 sweep of session 8 (decode_sweep_h200_s8.log, eager
# do_bench): 8x32k (few splits) 0.156 ms fused vs 0.167 not; 1x128k (66 splits, merged by the last program
# of each row tile) 0.110 vs 0.093. Graph-timed, session 9 (decode_attention_graph_h200_s9.log): 8x32k (8
# splits) 0.154 fused vs 0.163, 1x4k (16-17 splits) 0.016 vs 0.013, 1x128k (64) 0.105 vs 0.089: fused up to 8.
FUSED_AUTO_MAX_SPLITS = 8
# "auto" decides by the split count of a cache this long (the one-wave count of the batch's geometry), not of
# the call's length: one (batch, heads, rows) shape keeps one compiled build as its cache grows (B=1 GQA 32/8
# on the H200: 66 splits, never fused; B=8: 8, always fused), so that no generation compiles the other
# build mid-way when its cache crosses 8 splits. An explicit num_splits decides by itself. (Session 10: eager
# generate B=8 x 32k at 45.35 ms/token fused vs 30.70 unfused in one run was the host's drift: interleaved,
# 25.81 vs 25.90 in one round and 46.65 vs 40.16 in the next, generate_host_drift_h200_s10.log.)
_LONG = 1 << 40

# FUSED_COMBINE's arrival counters, one zeroed int32 buffer per device that the kernel leaves zeroed (no
# memset launch per call). Shared by every call on the device: fused calls on concurrent streams would race
# (the cache's calls run on one stream). A buffer outgrown by a larger call is kept alive (`_RETIRED`): a
# CUDA graph captured earlier may still point at it.
_COUNTERS: dict[torch.device, torch.Tensor] = {}
_RETIRED: list[torch.Tensor] = []


def _counters(device: torch.device, n: int) -> torch.Tensor:
    buf = _COUNTERS.get(device)
    if buf is None or buf.numel() < n:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            # allocated inside a capture, the buffer would live in the graph's private pool and its zero-fill
            # would only run at replay: later eager calls would share memory the graph owns
            raise RuntimeError("fused_combine's arrival counters are allocated on its first call, which may not be "
                               "inside a CUDA-graph capture: run one fused_combine call of this size eagerly first")
        if buf is not None:
            _RETIRED.append(buf)
        buf = _COUNTERS[device] = torch.zeros(max(n, 4096), dtype=torch.int32, device=device)
    return buf


def _counters_if_free(device: torch.device, n: int) -> torch.Tensor | None:
    """`_counters`, or None where it would have to allocate inside a CUDA-graph capture ("auto" then takes
    the two-launch combine instead of refusing the call)."""
    buf = _COUNTERS.get(device)
    if (buf is None or buf.numel() < n) and device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        return None
    return _counters(device, n)


def _check_config(config: dict) -> None:
    unknown = sorted(set(config) - set(CONFIG_KEYS))
    if unknown:
        raise ValueError(f"cache_attention config: unknown keys {unknown}; expected some of {list(CONFIG_KEYS)}")
    if "block_n" in config and config["block_n"] not in BLOCK_N_CHOICES:
        raise ValueError(f"cache_attention config: block_n must be one of {BLOCK_N_CHOICES} (multiples of the "
                         f"cache block {KV_BLOCK}), got {config['block_n']!r}")
    for key in ("pdl", "tma"):
        if not isinstance(config.get(key, False), bool):
            raise ValueError(f"cache_attention config: {key} must be True or False, got {config[key]!r}")
    fused = config.get("fused_combine", "auto")
    if not (fused is True or fused is False or fused == "auto"):  # identity: 1 / 0 are refused
        raise ValueError(f"cache_attention config: fused_combine must be True, False or 'auto', "
                         f"got {config['fused_combine']!r}")
    if config.get("prefetch_desc") and config.get("block_n", KV_BLOCK) != KV_BLOCK:
        raise ValueError(f"cache_attention config: prefetch_desc needs block_n {KV_BLOCK}, got {config['block_n']!r}")
    for key in ("programs_per_sm", "num_warps", "num_stages", "keys_per_split"):
        if key in config and (not isinstance(config[key], int) or config[key] < 1):
            raise ValueError(f"cache_attention config: {key} must be a positive int, got {config[key]!r}")
    if config.get("keys_per_split", KV_BLOCK) % KV_BLOCK:
        raise ValueError(f"cache_attention config: keys_per_split must be a multiple of {KV_BLOCK}, "
                         f"got {config['keys_per_split']!r}")


def pick_num_splits(length: int, tiles: int, sms: int, config: dict, residency: int = 8) -> int:
    """Key splits for ``tiles`` (row tiles x B x H_kv) programs' worth of work on ``sms`` SMs, each split
    >= 4 cache blocks, at most `_MAX_SPLITS`. Default: ``residency`` (programs per SM the kernel can hold)
    x SMs slots, split count rounded down so that the programs fit them (one wave). config
    "programs_per_sm" replaces the residency, then rounded up unless "exact_waves"; "keys_per_split":
    about that many keys per split, but at least one program per SM and at most 8 per SM."""
    if "keys_per_split" in config:
        fill = min(cdiv(8 * sms, tiles), max(cdiv(length, config["keys_per_split"]), cdiv(sms, tiles)))
    elif "programs_per_sm" in config:
        slots = config["programs_per_sm"] * sms
        fill = slots // tiles if config.get("exact_waves") else cdiv(slots, tiles)
    else:
        fill = residency * sms // tiles
    return max(1, min(fill, cdiv(length, 4 * KV_BLOCK), _MAX_SPLITS))


# Programs per SM of each compiled attention variant, from its registers and shared memory (`_residency`);
# the H200's for the default decode build where the compiled kernel cannot be inspected.
_RESIDENCY: dict = {}
_FALLBACK_RESIDENCY = 4


def _residency(kernel, device: torch.device, key: tuple, args: tuple, kwargs: dict) -> int:
    """Programs of one compiled variant of ``kernel`` an SM holds at once: compiled (not launched) on the
    first call of a variant, then read from `_RESIDENCY`. The limits (CUDA's occupancy rules): shared
    memory (+1 KiB reserved per program); registers, allocated per warp in units of 256 from each of the
    SM's 4 sub-partitions (a quarter of the register file each); threads; 32 programs. A triton whose
    warm-up returns no compiled kernel (a JIT cache hook, asynchronous compilation) gets `_FALLBACK_RESIDENCY`."""
    hit = _RESIDENCY.get(key)
    if hit is None:
        warps = kwargs["num_warps"]
        try:
            compiled = kernel.warmup(*args, grid=(1,), **kwargs)
            compiled = compiled.result() if hasattr(compiled, "result") else compiled
            compiled._init_handles()
            shared, n_regs = compiled.metadata.shared, compiled.n_regs
        except (AttributeError, TypeError):
            hit = _FALLBACK_RESIDENCY
        else:
            props = torch.cuda.get_device_properties(device)
            smem = getattr(props, "shared_memory_per_multiprocessor", 233472)
            regs = getattr(props, "regs_per_multiprocessor", 65536)
            threads = getattr(props, "max_threads_per_multi_processor", 2048)
            per_warp = cdiv(max(n_regs, 1) * 32, 256) * 256
            warps_by_regs = regs // 4 // per_warp * 4
            hit = min(32, threads // (32 * warps), smem // (shared + 1024), warps_by_regs // warps)
        _RESIDENCY[key] = hit = max(1, hit)
    return hit


# `_wide_key`: the wide combine's variants (`_wide_variant`) are all built at the first split call of such a
# decode, so that a cache crossing 16 splits mid-generation does not compile the second one between two tokens
# (0.3-0.4 s on the H200, session 6).
_WIDE_WARMED: set = set()
# The first call of a decode geometry that will take the wide combine starts its two builds in a background
# thread before compiling the attention build (Triton's compiler passes release the GIL and ptxas runs as a
# subprocess), and the launch waits for them (`_WIDE_PENDING`: warm key -> Future). CONCURRENT_WARMUP
# False: one after the other, in the caller's thread (benchmarks compare the first-call times). Where the
# residency guess predicted the wide combine but the launch fuses (a GPU whose decode build holds more
# programs per SM than `_FALLBACK_RESIDENCY`), the builds finish unused; the entry stays for a later wide call.
CONCURRENT_WARMUP = True
_WIDE_PENDING: dict = {}
_WARM_POOL = None


def _wide_key(out: torch.Tensor, group: int, D: int, H_kv: int, pdl: bool) -> tuple:
    """What the wide combine's builds for output ``out`` depend on besides CHUNK (the strides of a contiguous
    `out` follow from these): a `_WIDE_WARMED` / `_WIDE_PENDING` key."""
    return (out.device, out.dtype, group, D, H_kv == 1, H_kv % 16 == 0, pdl)


def _wide_shape(group: int, D: int, dim_pad: int, pdl: bool) -> dict:
    """The wide combine's constexprs and compile options but CHUNK / num_warps (`_wide_variant`)."""
    shape = dict(GROUP=group, HEAD_DIM=D, HEAD_DIM_PAD=dim_pad, enable_fp_fusion=False)
    if pdl:  # a compile option too: its own variants
        shape.update(PDL=True, launch_pdl=True)
    return shape


def _warm_wide(device: torch.device, combine_args: tuple, dim_pad: int, shape: dict) -> None:
    """Compile (not launch) the wide combine's two variants for calls like ``combine_args`` on ``device``."""
    wide = _gpu_parts()[3].cache_combine_wide_kernel
    with torch.cuda.device(device):  # Triton files a build under the thread's current device
        for n in (16, _MAX_SPLITS):
            wide.warmup(*combine_args, grid=(1,), **_wide_variant(n, dim_pad), **shape)


def _warm_pool():
    """The background compile threads (two: the write build and the combine's builds of a first decode step)."""
    global _WARM_POOL
    if _WARM_POOL is None:
        from concurrent.futures import ThreadPoolExecutor

        _WARM_POOL = ThreadPoolExecutor(max_workers=2, thread_name_prefix="fp8-cache-warmup")
    return _WARM_POOL


def _start_wide_warmup(warm_key: tuple, device: torch.device, combine_args: tuple, dim_pad: int,
                       shape: dict) -> None:
    """Start `_warm_wide` in the background thread (once per warm key; inline without CONCURRENT_WARMUP)."""
    if warm_key in _WIDE_WARMED or warm_key in _WIDE_PENDING:
        return
    if not CONCURRENT_WARMUP:
        _warm_wide(device, combine_args, dim_pad, shape)
        _WIDE_WARMED.add(warm_key)
        return
    try:
        _WIDE_PENDING[warm_key] = _warm_pool().submit(_warm_wide, device, combine_args, dim_pad, shape)
    except RuntimeError:  # the interpreter is shutting down: no new threads; the launch builds them inline
        pass


# `warm_decode_step`: the decode-step geometries whose builds were warmed (a heuristic key: a geometry it
# misses compiles its builds one after the other at its first launches, as without the warm-up)
_STEP_WARMED: set = set()


def warm_decode_step(step_key: tuple, warm_write, warm_attend) -> None:
    """At the first decode step of a geometry (``step_key`` not seen; `CONCURRENT_WARMUP`): compile the write
    launch's build in the background thread (``warm_write()``: `write_blocks(..., warm_only=True)`) while this
    thread compiles the attention build (``warm_attend()``: `cache_attention(..., warm_only=True)`, which also
    starts the wide combine's builds in the background), then wait for the write build; the step's launches
    then find their builds compiled. Without it the three compiles ran one after the other: write, then
    attention next to the combine's. Session 14 (H200, fresh processes, empty Triton cache, B=1 x 4k and 8 x 32k,
    GQA 32/8, D=128): the first step took 3.9-5.1 s with the DEVICE_LEN attention build, 3.3-4.0 s with the
    length argument's (docs/results/first_call_probe_h200_s14.log), against the 5 s line; with this warm-up
    2.7-3.1 s (first_call_probe_warm_h200_s14.log)."""
    if step_key in _STEP_WARMED:
        return
    _STEP_WARMED.add(step_key)
    if not CONCURRENT_WARMUP:
        return
    try:
        pending = _warm_pool().submit(warm_write)
    except RuntimeError:  # the interpreter is shutting down: the launches build inline
        return
    try:
        warm_attend()
    finally:
        pending.result()


def _finish_wide_warmup(warm_key: tuple, device: torch.device, combine_args: tuple, dim_pad: int,
                        shape: dict) -> None:
    """Before a wide-combine launch: wait for the background builds of this warm key (re-raising their error),
    or build both variants now where none were started."""
    if warm_key in _WIDE_WARMED:
        return
    pending = _WIDE_PENDING.pop(warm_key, None)
    if pending is not None:
        pending.result()
    else:
        _warm_wide(device, combine_args, dim_pad, shape)
    _WIDE_WARMED.add(warm_key)


def _wide_variant(num_splits: int, dim_pad: int) -> dict:
    """CHUNK (splits per chunk) and num_warps of `cache_combine_wide_kernel`: two compiled variants at most,
    whatever the length. Up to 16 splits one 16-split chunk (4 warps), more in one 128-split chunk at D <= 128
    (8 warps; H200 1x128k, 66 splits: 16-split chunks took ~5 us more, 0.090 vs 0.086 ms) or 32-split chunks
    at D=256 (a 128-split tile spilled there)."""
    chunk = 16 if num_splits <= 16 else (_MAX_SPLITS if dim_pad <= 128 else 32)
    return dict(CHUNK=chunk, num_warps=8 if chunk > 32 else 4)


_GPU = None
_SM90: dict = {}


def _sm90(device: torch.device) -> bool:
    """Whether ``device`` is sm_90+ (programmatic dependent launch, TMA), cached per device (host time)."""
    ok = _SM90.get(device)
    if ok is None:
        ok = _SM90[device] = torch.cuda.get_device_capability(device) >= (9, 0)
    return ok


def _pdl_on(config: dict, wide_combine: bool, device: torch.device) -> bool:
    """Whether the wide combine of a GPU call goes by programmatic dependent launch (config "pdl", sm_90+):
    the attention build's PDL constexpr, decided once here for its warm-up and its launch."""
    return bool(wide_combine and config.get("pdl", PDL_DEFAULT) and _sm90(device))


def _gpu_parts():
    """The launch helpers and kernels, imported once (a per-call import costs microseconds of host time)."""
    global _GPU
    if _GPU is None:
        from ..attention import _on_device
        from ..backends.triton import _interpreting, _num_sms
        from . import kernels

        _GPU = (_on_device, _interpreting, _num_sms, kernels)
    return _GPU


def cache_attention(query, cos, sin, k8, k_desc, v8, v_desc, length: int, *, scale: float, impl: str,
                    qk_fp8: bool | None = None, num_splits: int | None = None,
                    config: dict | None = None, rotate: bool, out_dtype: torch.dtype | None = None,
                    q_descale: torch.Tensor | None = None,
                    device_length: torch.Tensor | None = None, warm_only: bool = False,
                    static: bool = False) -> torch.Tensor | None:
    """New queries (B, S_q, H_q, D) (un-rotated when cos/sin are given) against the first ``length`` cached
    tokens, the queries being the last S_q of them -> (B, S_q, H_q, D) contiguous in query's dtype.
    rotate (required: a mismatch with the cache would be silently wrong): rotate the raw queries after RoPE by
    the Hadamard matrix, which a cache written with ``rotate`` (`write_blocks`; `FP8CacheLayer.rotate`)
    needs; prepared queries (q_descale) are already in the cache's basis and take rotate=False. q_descale (B, S_q, H_q) float32: the queries are the decode build's prepared fp16 operand with
    these row descales (`write_blocks(query=...)`, `reference.prepare_queries`): cos/sin None, rotate False,
    fp16 products. out_dtype: the output's dtype (default: query's).

    qk_fp8: None picks by rows per KV head (`FP16_MAX_ROWS`). num_splits: None picks one wave of programs
    from the compiled kernel's residency and the GPU's SM count (`pick_num_splits`, `_residency`; the
    interpreter assumes 4 SMs x 8); tests and benchmarks force values. config (benchmarks; every key
    optional): "keys_per_split" or "programs_per_sm" / "exact_waves" (other split counts, see
    `pick_num_splits`); "num_warps", "num_stages"; "block_n" keys per
    loop iteration of the attention kernel (64 (default, one cache block), 128 or 256), in one-block
    softmax steps (the 64-key math bit for bit) or, with "tile_softmax" (default False; fp16 products only,
    ignored with qk_fp8), one step per block_n keys with V's descales folded into P (P's fp16 rounding
    moves: ~2 dB lower SQNR where it dominates, 77 -> 75 dB on float32 CPU data); "fused_combine"
    (default "auto": decode builds (fp16 products) fused where a long cache of this batch geometry takes at
    most `FUSED_AUTO_MAX_SPLITS` splits (`_LONG`), or where an explicit num_splits is at most that; chunked
    prefill (e4m3 products, not measured fused) never; a second compiled variant; its counters are
    allocated at the first fused call: "auto" takes the two launches where that call is inside a CUDA-graph
    capture, True refuses it); True: the last split
    program of each row tile merges the splits, one launch instead of two (the split-by-split combine's
    arithmetic, bit for bit); False: never; "prefetch_desc" (default: on at
    block_n 64, the only block_n it takes): each iteration loads the next block's K/V descales, carried in
    registers (same values, same output; H200 graph-timed, session 5: 8x32k 0.159 -> 0.155 ms, 1x128k
    0.087 -> 0.085).
    "wide_combine" (default True): `cache_combine_wide_kernel` merges the splits, one program per query
    row loading all of its splits at once (sums over splits in tree order); False: `cache_combine_kernel`,
    split by split (H200, 1x128k GQA 32/8, 64 splits, profiler: 22 us vs 2.5 us for the wide one in its first
    form, all splits of a row in one tile).
    "pdl" (default `PDL_DEFAULT`; the wide combine, sm_90+, not the interpreter): the combine is launched
    with programmatic dependent launch, its programs placed while the attention's last splits run and waiting
    for them on the GPU (the same output bit for bit).
    "tma" (default `TMA_DEFAULT`, False, or with ``static`` `STATIC_TMA_DEFAULT`, False; applies to fp16
    products, power-of-two D, contiguous caches, sm_90+, not the interpreter; ignored elsewhere): K/V tiles
    loaded by TMA through tensor descriptors (`cache_attn_kernel`'s TMA): less GPU time for the dynamic
    cache's build (H200 graph-timed, session 9: 1x128k 0.084 vs 0.089 ms; the static build's pointer loads
    are as fast, see `STATIC_TMA_DEFAULT`), more host time per eager call (see `TMA_DEFAULT`).
    "widen_v" (default True; fp16 products): V's e4m3 tile widened to fp16 in its load layout by inline
    PTX (GPU only; the interpreter takes the plain cast, the same values), so it reaches the P.V operand
    through 16-byte shared stores and ldmatrix.trans instead of one-byte shared loads (sm_90 SASS, 2 warps,
    per 64 keys and thread: 128 LDS.U8 gone, 8-byte V copies become 16-byte; the loop 1137 -> 811
    instructions, 183 registers instead of 255 before the key loop's interior split; +16 KB shared memory).
    The same operand values; on the H200 the P.V dot's summation can differ in the last bit (1-10 of
    4096-32768 outputs, <= 6e-5).

    device_length: an int64 scalar tensor holding the number of tokens cached before the queries' own, read on
    the device (the kernel's DEVICE_LEN build). The static cache: no host sync, one launch a CUDA graph replays
    at every length; ``length`` is then the cache's capacity, from which the grid's split count is planned
    (the kernel sizes the splits from the real length as this launcher would: the same output as a call
    with the length given). The dynamic cache's decode step (`FP8CacheLayer.append_attend`): ``length`` is
    the real length, and the tensor holds ``length - S_q``, stored by the write launch before it
    (`write_blocks(length_out=...)`): the same output; the DEVICE_LEN build took less GPU time on the H200
    (session 14, graph-timed, GQA 32/8: 1x128k 84.3 vs 89.1 us, 8x32k 152.5 vs 155.1, 1x4k 11.7 vs 13.3;
    docs/results/devlen_probe_h200_s14.log). With device_length an explicit num_splits (or a config's split
    plan) is capped at cdiv(length, 4 * KV_BLOCK), as the kernel caps it. impl="torch" reads the length on
    the host. static: the call is the static cache's (``length`` its capacity): "tma" defaults to
    `STATIC_TMA_DEFAULT` (False) instead of `TMA_DEFAULT`.

    warm_only (impl="triton"): compile the attention build this call would launch (and start its combine's
    background builds) and return None, nothing launched (`warm_decode_step`).
    """
    config = config or {}
    if device_length is not None and impl == "torch":
        length, device_length = int(device_length) + query.shape[1], None
    if config:
        _check_config(config)
    B, S_q, H_q, D = query.shape
    H_kv = k8.shape[1]
    if D not in SUPPORTED_HEAD_DIMS:
        raise ValueError(f"fp8 cache attention supports head_dim {SUPPORTED_HEAD_DIMS}, got {D}")
    if H_q % H_kv:
        raise ValueError(f"query heads ({H_q}) must be a multiple of the cache's KV heads ({H_kv})")
    if not 0 < S_q <= length:
        raise ValueError(f"{S_q} new queries against {length} cached tokens: the queries must be cached first")
    if length > k8.shape[2] or cdiv(length, KV_BLOCK) > k_desc.shape[2]:
        raise ValueError(f"{length} cached tokens asked of a cache holding {k8.shape[2]} "
                         f"({k_desc.shape[2]} descale blocks)")
    group = H_q // H_kv
    n_rows = S_q * group
    if qk_fp8 is None:
        qk_fp8 = n_rows > FP16_MAX_ROWS
    if rotate:
        _check_rotatable(D)
    if q_descale is not None:
        if (cos is not None or rotate or qk_fp8 or query.dtype != torch.float16
                or q_descale.shape != (B, S_q, H_q) or q_descale.dtype != torch.float32
                or not q_descale.is_contiguous() or q_descale.device != query.device):
            raise ValueError("cache_attention(q_descale=...) takes the prepared fp16 queries with contiguous "
                             "(B, S_q, H_q) float32 descales on their device, no cos/sin, rotate=False and fp16 "
                             "products (qk_fp8 not True)")
        qk_fp8 = False
    if impl == "torch":
        if warm_only:
            return None
        return reference.cache_attention_reference(query, cos, sin, k8, k_desc, v8, v_desc, length, scale=scale,
                                                   qk_fp8=qk_fp8, rotate=rotate, q_descale=q_descale,
                                                   out_dtype=out_dtype)
    on_device, interpreting, num_sms, kernels = _gpu_parts()
    # Host time matters here (one decode step is tens of microseconds of GPU time): strides read once per
    # tensor, one workspace allocation for the split partials.
    with on_device(query):  # the cache's GPU (device_map="auto" spreads layers over several)
        query = _unit_last(query)
        rope = cos is not None
        if rope:
            cos, sin = _unit_last(cos), _unit_last(sin)
            cos_strides = ((cos.stride(0) if cos.shape[0] > 1 else 0), cos.stride(1))
        else:
            cos = sin = query
            cos_strides = (0, 0)
        interp = interpreting()
        on_gpu = query.is_cuda and not interp
        out = torch.empty(B, S_q, H_q, D, dtype=out_dtype or query.dtype, device=query.device)
        block_m = min(128 if qk_fp8 else 64, max(16, next_power_of_2(n_rows)))
        m_tiles = cdiv(n_rows, block_m)
        bh = B * H_kv
        dim_pad = next_power_of_2(D)
        qs, ks, ds = query.stride(), k8.stride(), k_desc.stride()
        o_sb, o_ss = S_q * H_q * D, H_q * D  # `out` is contiguous
        fused_cfg = config.get("fused_combine", "auto")
        want_fused = fused_cfg is True  # "auto" decides below, from the split count
        consts = dict(
            GROUP=group, HEAD_DIM=D, HEAD_DIM_PAD=dim_pad, APPLY_ROPE=rope, QK_FP8=bool(qk_fp8), SPLIT=True,
            FP8_MAX=FP8_MAX, BLOCK_M=block_m, BLOCK_N=config.get("block_n", KV_BLOCK), KV_BLOCK=KV_BLOCK,
            TILE_SOFTMAX=bool(config.get("tile_softmax", False)), FUSED_COMBINE=want_fused,
            PREFETCH_DESC=bool(config.get("prefetch_desc", config.get("block_n", KV_BLOCK) == KV_BLOCK)),
            WIDEN_V=bool(config.get("widen_v", True)) and not interp,
            ROTATE_Q=bool(rotate), INV_SQRT_D=D**-0.5, ROT_F32=interp and query.dtype == torch.bfloat16,
            Q_PREPARED=q_descale is not None, DEVICE_LEN=device_length is not None,
            # 2 warps for decode tiles (H200 sweeps, docs/results/kv_cache_debug_sweep_h200.log and
            # decode_flags_h200_s5.log: 2 warps beat 4 at every decode shape)
            num_warps=config.get("num_warps", 8 if block_m >= 128 else (2 if block_m <= 16 else 4)),
            num_stages=config.get("num_stages", 3),
            enable_fp_fusion=False,
        )

        q_desc = out if q_descale is None else q_descale  # never read unless Q_PREPARED
        # DEVICE_LEN's tensor and capacity: launch arguments, not in the keys (capacity is not specialized)
        len_args = {} if device_length is None else dict(Len=device_length, capacity=k8.shape[2])
        k_src, v_src = k8, v8
        tma_default = STATIC_TMA_DEFAULT if static else TMA_DEFAULT
        if (config.get("tma", tma_default) and not qk_fp8 and D == dim_pad and on_gpu
                and _sm90(query.device) and k8.is_contiguous() and v8.is_contiguous()
                and k8.numel() // D < 2**31):  # the kernel's TMA row index is int32
            from triton.tools.tensor_descriptor import TensorDescriptor

            tile = consts["BLOCK_N"] if consts["TILE_SOFTMAX"] else KV_BLOCK
            k_src, v_src = (TensorDescriptor.from_tensor(t.view(-1, D), [tile, D]) for t in (k8, v8))
            consts["TMA"] = True

        def args(o_part, ml_part, counter, keys_per_split):
            return (query, cos, sin, k_src, v_src, k_desc, v_desc, out, o_part, ml_part, counter,
                    qs[0], qs[1], qs[2], cos_strides[0], cos_strides[1], ks[0], ks[1], ds[0], ds[1], o_sb, o_ss,
                    H_kv, S_q, length, float(scale), keys_per_split)

        counter = _counters(query.device, m_tiles * bh) if want_fused else out  # never read unless fused
        wave_splits = num_splits  # "auto" fuses by this: the split count of a long cache, fixed per geometry
        if num_splits is None:
            sms = num_sms(query.device.index or 0) if on_gpu else 4
            residency = 8
            one_split = min(cdiv(length, 4 * KV_BLOCK), _MAX_SPLITS) <= 1  # no warm-up compile for nothing
            if on_gpu and not one_split and "programs_per_sm" not in config and "keys_per_split" not in config:
                # everything the compiled variant depends on: constexprs, dtypes, Triton's specialization of
                # H_kv == 1 and of the strides (divisible by 16, equal to 1)
                # (FUSED_COMBINE left out: the fused and unfused builds share the key loop and its residency)
                key = (query.device, query.dtype, cos.dtype,
                       tuple(kv for kv in consts.items() if kv[0] != "FUSED_COMBINE"), H_kv == 1,
                       tuple((x % 16 == 0, x == 1) for x in (*qs, *cos_strides, ks[0], ks[1], o_sb, o_ss)))
                residency = _RESIDENCY.get(key)
                if residency is None:  # the split variant's residency (first call of a variant only)
                    part = torch.empty(16, dtype=torch.float32, device=query.device)
                    warm, warm_counter = consts, counter
                    if fused_cfg == "auto" and not qk_fp8:  # compile the build this call will launch, not both
                        # (a guess at the residency of the H200's decode build: where the real one differs,
                        # the launch below may compile the other build, once, at this first call)
                        guess = pick_num_splits(_LONG, m_tiles * bh, sms, config, _FALLBACK_RESIDENCY)
                        free = _counters_if_free(query.device, m_tiles * bh) if guess <= FUSED_AUTO_MAX_SPLITS else None
                        if free is not None:
                            warm, warm_counter = {**consts, "FUSED_COMBINE": True}, free
                    # the PDL switch as the launch will set it (a constexpr: another build otherwise)
                    wide_guess = not warm["FUSED_COMBINE"] and config.get("wide_combine", True)
                    warm = {**warm, "PDL": _pdl_on(config, wide_guess, query.device)}
                    if wide_guess:  # its combine's builds compile meanwhile (num_splits: not specialized)
                        _start_wide_warmup(_wide_key(out, group, D, H_kv, warm["PDL"]), query.device,
                                           (out, part, part, o_sb, o_ss, H_kv, S_q, 2), dim_pad,
                                           _wide_shape(group, D, dim_pad, warm["PDL"]))
                    residency = _residency(kernels.cache_attn_kernel, query.device, key,
                                           args(part, part, warm_counter, KV_BLOCK),
                                           {**warm, "Q_desc": q_desc, **len_args})
            num_splits = pick_num_splits(length, m_tiles * bh, sms, config, residency)
            wave_splits = pick_num_splits(_LONG, m_tiles * bh, sms, config, residency)
        if device_length is not None:  # the kernel caps its splits at blocks of >= 4 (DEVICE_LEN): plan the same
            num_splits = max(1, min(num_splits, cdiv(length, 4 * KV_BLOCK)))
        keys_per_split = cdiv(cdiv(length, num_splits), KV_BLOCK) * KV_BLOCK
        num_splits = cdiv(length, keys_per_split)
        split = num_splits > 1
        if fused_cfg == "auto" and split and not qk_fp8 and wave_splits <= FUSED_AUTO_MAX_SPLITS:
            free = _counters_if_free(query.device, m_tiles * bh)
            if free is not None:  # a first call inside a CUDA-graph capture: the two launches instead
                want_fused, counter = True, free
        fused = split and want_fused
        if not fused:
            counter = out  # never read; one dtype for every unfused launch (the direct launch's key)
        if split:  # O_part (splits, B * H_kv, rows, dim_pad) then ML_part (splits, B * H_kv, rows, 2), float32
            n_o = num_splits * bh * n_rows * dim_pad
            ws = torch.empty(n_o + num_splits * bh * n_rows * 2, dtype=torch.float32, device=query.device)
            o_part, ml_part = ws, ws[n_o:]
        else:
            o_part = ml_part = out  # never read
        wide_combine = split and not fused and config.get("wide_combine", True)
        pdl = on_gpu and _pdl_on(config, wide_combine, query.device)
        consts["SPLIT"], consts["FUSED_COMBINE"], consts["PDL"] = split, fused, pdl
        key = None  # the direct launch's (`_launch`): S_q, S_kv, keys_per_split and the descale strides vary
        dev_len = device_length is not None
        if _launch.wanted(query) and _launch.aligned(query, cos, sin, k8, v8, k_desc, v_desc, out, o_part, ml_part,
                                                     counter, q_desc, *((device_length,) if dev_len else ())):
            key = (query.device, query.dtype, cos.dtype, sin.dtype, out.dtype, q_desc.dtype, k8.dtype, v8.dtype,
                   k_desc.dtype, v_desc.dtype, qs, cos_strides, ks[0], ks[1], o_sb, o_ss, H_kv, tuple(consts.values()),
                   device_length.dtype if dev_len else None)
        consts.update(len_args)
        consts["Q_desc"] = q_desc
        launch_args = args(o_part, ml_part, counter, keys_per_split)
        if warm_only:
            if not interp:
                kernels.cache_attn_kernel.warmup(*launch_args, grid=(m_tiles, bh, num_splits), **consts)
            return None
        _launch.launch(kernels.cache_attn_kernel, key, (m_tiles, bh, num_splits), launch_args, consts)
        # fp fusion off in both combines, as in the attention kernel (and its fused combine): no FMA contraction
        if wide_combine:
            combine_args = (out, o_part, ml_part, o_sb, o_ss, H_kv, S_q, num_splits)
            shape = _wide_shape(group, D, dim_pad, pdl)
            if not interp:
                _finish_wide_warmup(_wide_key(out, group, D, H_kv, pdl), query.device, combine_args, dim_pad,
                                    shape)
            variant = {**_wide_variant(num_splits, dim_pad), **shape}
            key = None
            if _launch.wanted(out) and _launch.aligned(out, o_part, ml_part):
                key = (query.device, out.dtype, o_sb, o_ss, H_kv, tuple(variant.values()))
            _launch.launch(kernels.cache_combine_wide_kernel, key, (n_rows, bh), combine_args, variant)
        elif split and not fused:
            block_r = min(64, max(16, next_power_of_2(n_rows)))
            kernels.cache_combine_kernel[(cdiv(n_rows, block_r), bh)](
                out, o_part, ml_part, o_sb, o_ss, H_kv, S_q, num_splits,
                GROUP=group, HEAD_DIM=D, HEAD_DIM_PAD=dim_pad, BLOCK_R=block_r, num_warps=4,
                enable_fp_fusion=False,
            )
        return out
