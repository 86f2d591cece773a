"""FP8 KV cache on CPU: the write and attention kernels (Triton interpreter) against their torch reference,
block scales across appends, the Cache operations generate uses, and a prepared model with kv_cache="fp8".

The interpreter's float32 -> bf16 cast is inexact (and its bf16 dots are wrong), so kernel comparisons use
float16/float32 model tensors; the bf16 path is covered on the GPU (tests/gpu/test_kv_cache_gpu.py)."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM, MistralConfig, Qwen2Config

import hf_fp8_attention as hfa
from hf_fp8_attention._constants import KV_BLOCK
from hf_fp8_attention.kv_cache import FP8Cache, FP8CacheLayer, ops, reference
from hf_fp8_attention.kv_cache.layer import _GROW_MIN
from hf_fp8_attention.quantization.reference import apply_rope_reference
from hf_fp8_attention.transformers.model import _cache_kwarg


def _rope(n: int, offset: int, dim: int, dtype=torch.float32):
    pos = torch.arange(offset, offset + n).float()
    inv = 10000.0 ** (-torch.arange(0, dim, 2).float() / dim)
    emb = torch.cat([pos[:, None] * inv[None]] * 2, dim=-1)[None]
    return emb.cos().to(dtype), emb.sin().to(dtype)


def _sqnr(x: torch.Tensor, ref: torch.Tensor) -> float:
    x, ref = x.double(), ref.double()
    return 10 * math.log10(ref.pow(2).sum().item() / max((x - ref).pow(2).sum().item(), 1e-300))


def _codes(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.uint8)


def _fill(layers, chunks, B=2, H=2, D=64, rope=True, dtype=torch.float16, seed=0):
    gen = torch.Generator().manual_seed(seed)
    length = 0
    for n in chunks:
        k = (torch.randn(B, H, n, D, generator=gen) * (1 + length / 40)).to(dtype)
        v = (torch.randn(B, H, n, D, generator=gen) + 3).to(dtype)
        cos, sin = _rope(n, length, D, dtype) if rope else (None, None)
        for layer in layers:
            layer.append(k, v, cos, sin)
        length += n
    return length


def _assert_same_storage(a: FP8CacheLayer, b: FP8CacheLayer):
    n, nb = a.length, math.ceil(a.length / KV_BLOCK)
    assert a.length == b.length
    assert torch.equal(_codes(a.k8[:, :, :n]), _codes(b.k8[:, :, :n]))
    assert torch.equal(_codes(a.v8[:, :, :n]), _codes(b.v8[:, :, :n]))
    assert torch.equal(a.k_desc[:, :, :nb], b.k_desc[:, :, :nb])
    assert torch.equal(a.v_desc[:, :, :nb], b.v_desc[:, :, :nb])


@pytest.mark.parametrize("rope", [True, False])
@pytest.mark.parametrize("dim", [64, 96])
def test_write_kernel_equals_reference_across_appends(rope, dim):
    kernel, torch_ref = FP8CacheLayer(impl="triton"), FP8CacheLayer(impl="torch")
    _fill([kernel, torch_ref], [70, 1, 1, 60, 5, 130], D=dim, rope=rope)
    _assert_same_storage(kernel, torch_ref)


@pytest.mark.parametrize("hadamard", [None, False])
def test_blocks_written_across_appends_equal_one_write(hadamard):
    """Block by block equal to quantizing all 300 keys at once: RoPE, the Hadamard rotation (the default at
    D=64) or none, then a scale per block."""
    pieces, whole = FP8CacheLayer(impl="torch", hadamard=hadamard), FP8CacheLayer(impl="torch", hadamard=hadamard)
    gen = torch.Generator().manual_seed(1)
    k = torch.randn(1, 2, 300, 64, generator=gen).half()
    v = torch.randn(1, 2, 300, 64, generator=gen).half()
    cos, sin = _rope(300, 0, 64)
    start = 0
    for n in (1, 63, 1, 64, 100, 71):
        pieces.append(k[:, :, start : start + n], v[:, :, start : start + n], cos[:, start : start + n], sin[:, start : start + n])
        start += n
    whole.append(k, v, cos, sin)
    _assert_same_storage(pieces, whole)
    assert whole.rotate == (hadamard is None)
    roped = apply_rope_reference(k.float(), cos, sin)
    expected, descale = reference.quantize_blocks(reference.rotate(roped, k.dtype) if whole.rotate else roped)
    assert torch.equal(_codes(whole.k8[:, :, :300]), _codes(expected))
    assert torch.equal(whole.k_desc[:, :, :5], descale)


def test_late_large_token_does_not_saturate_its_block():
    layer = FP8CacheLayer(impl="torch", hadamard=False)  # per-channel values: the scale rule itself
    small = torch.full((1, 1, 10, 64), 0.01).half()
    layer.append(small, small)
    big = torch.full((1, 1, 1, 64), 100.0).half()
    layer.append(big, big)
    k, v = layer.dequantize()
    assert layer.k_desc[0, 0, 0].item() == pytest.approx(100.0 / 448.0, rel=1e-6)
    # the early tokens are re-quantized with the new scale, not clipped: within e4m3's relative precision
    torch.testing.assert_close(k[0, 0, :10].float(), small[0, 0].float(), rtol=0.07, atol=0)
    torch.testing.assert_close(k[0, 0, 10].float(), big[0, 0, 0].float(), rtol=0, atol=0)


def test_non_finite_key_stays_local():
    layer = FP8CacheLayer(impl="triton")
    k = torch.randn(1, 1, 130, 64).half()
    k[0, 0, 5, 3] = float("inf")
    layer.append(k, k.clone())
    assert torch.isfinite(layer.k_desc[0, 0, :3]).all()
    deq, _ = layer.dequantize()
    assert torch.isnan(deq[0, 0, 5, 3])
    assert torch.isfinite(deq[0, 0, 64:]).all() and torch.isfinite(deq[0, 0, :5]).all()


def _exact(query, cos, sin, layer: FP8CacheLayer, scale):
    """float64 attention of the rotated queries against the dequantized cache (the cache's own rounding
    excluded): what the attention kernel approximates."""
    q = query.double().transpose(1, 2)
    if cos is not None:
        q = apply_rope_reference(q.float(), cos, sin).double()
    k, v = (t.double() for t in layer.dequantize())
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    L, S_q = k.shape[2], q.shape[2]
    mask = torch.ones(S_q, L, dtype=torch.bool).tril(L - S_q)
    scores = (q @ k.transpose(-1, -2) * scale).masked_fill(~mask, float("-inf"))
    return (scores.softmax(-1) @ v).transpose(1, 2)


@pytest.mark.parametrize("qk_fp8", [False, True])
@pytest.mark.parametrize("s_q", [1, 5])
def test_attention_kernel_tracks_reference(qk_fp8, s_q):
    D, group = 64, 2
    kernel, torch_ref = FP8CacheLayer(impl="triton"), FP8CacheLayer(impl="torch")
    length = _fill([kernel, torch_ref], [200, 67], D=D, dtype=torch.float32)
    query = torch.randn(2, s_q, 2 * group, D, generator=torch.Generator().manual_seed(3))
    cos, sin = _rope(s_q, length - s_q, D)
    exact = _exact(query, cos, sin, torch_ref, D**-0.5)
    ref = torch_ref.attend(query, cos, sin, scale=D**-0.5, qk_fp8=qk_fp8)
    floor = 22 if qk_fp8 else 50  # e4m3 Q and P vs fp16 ones, against attention on the cached values
    assert _sqnr(ref, exact) > floor
    for splits in (1, 3):
        got = ops.cache_attention(query, cos, sin, kernel.k8, kernel.k_desc, kernel.v8, kernel.v_desc, length,
                                  scale=D**-0.5, impl="triton", qk_fp8=qk_fp8, num_splits=splits,
                                  rotate=kernel.rotate)
        assert got.shape == query.shape
        # online softmax rounds P against the running max, the reference against the row's max
        assert _sqnr(got, exact) > _sqnr(ref, exact) - 1.5, splits


def _gqa_case(fills, s_q, seed, qk_fp8, D=64, group=4):
    """A triton and a torch cache layer filled with `fills` (B=2, float32 values), s_q queries of GQA `group`:
    the float32 attention over the cache, the torch reference's SQNR against it, and run(splits, **config),
    the triton kernel's output for a split count and a config."""
    kernel, torch_ref = FP8CacheLayer(impl="triton"), FP8CacheLayer(impl="torch")
    length = _fill([kernel, torch_ref], fills, D=D, dtype=torch.float32)
    query = torch.randn(2, s_q, 2 * group, D, generator=torch.Generator().manual_seed(seed))
    cos, sin = _rope(s_q, length - s_q, D)
    exact = _exact(query, cos, sin, torch_ref, D**-0.5)
    ref_db = _sqnr(torch_ref.attend(query, cos, sin, scale=D**-0.5, qk_fp8=qk_fp8), exact)

    def run(splits, **config):  # fused_combine False unless given: the tests name the combine they check
        return ops.cache_attention(query, cos, sin, kernel.k8, kernel.k_desc, kernel.v8, kernel.v_desc, length,
                                   scale=D**-0.5, impl="triton", qk_fp8=qk_fp8, num_splits=splits,
                                   config={"fused_combine": False, **config}, rotate=kernel.rotate)

    run.default = lambda splits: ops.cache_attention(  # the launcher's defaults (config None)
        query, cos, sin, kernel.k8, kernel.k_desc, kernel.v8, kernel.v_desc, length, scale=D**-0.5, impl="triton",
        qk_fp8=qk_fp8, num_splits=splits, rotate=kernel.rotate)
    return exact, ref_db, run


@pytest.mark.parametrize("block_n", [128, 256])
@pytest.mark.parametrize("qk_fp8,s_q", [(False, 1), (True, 5)])
def test_attention_kernel_keys_per_iteration(block_n, qk_fp8, s_q):
    """BLOCK_N = 2 or 4 cache blocks per iteration on 267 keys (not a multiple of BLOCK_N), split ranges of
    267/192/128 keys (tiles cut at a split's end), GQA 4. One-block softmax steps: the 64-key kernel's output
    bit for bit. tile_softmax (per-column K descales, V's folded into P; fp16 products only, qk_fp8 ignores
    it): its P rounding moves, within 3 dB of the reference's SQNR (~77 -> ~75 dB here). The fused
    combine gives the two-launch result bit for bit and leaves its counters at zero."""
    exact, ref_db, run = _gqa_case([200, 67], s_q, 4, qk_fp8)
    for splits in (1, 2, 3):
        one_block = run(splits)
        assert _sqnr(one_block, exact) > ref_db - 1.5, splits
        assert torch.equal(run(splits, block_n=block_n), one_block), splits
        tile = run(splits, block_n=block_n, tile_softmax=True)
        if qk_fp8:
            assert torch.equal(tile, one_block), splits
        else:
            assert _sqnr(tile, exact) > ref_db - 3.0, (splits, _sqnr(tile, exact), ref_db)
        if splits > 1:
            assert torch.equal(run(splits, block_n=block_n, tile_softmax=True, fused_combine=True), tile), splits
            assert torch.equal(run(splits, block_n=block_n, fused_combine=True), one_block), splits
    assert not ops._COUNTERS[torch.device("cpu")].any()


def test_fused_combine_counters_not_allocated_in_a_capture(monkeypatch):
    """The counters buffer is allocated eagerly: a first allocation inside a CUDA-graph capture is an error
    that says what to do (the check itself is device-independent; CUDA-ness is stood in for here)."""
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    monkeypatch.setattr(ops, "_COUNTERS", {})
    device = torch.device("cuda", 0)
    with pytest.raises(RuntimeError, match="eagerly first"):
        ops._counters(device, 16)
    assert ops._counters_if_free(device, 16) is None  # "auto": the two launches instead
    monkeypatch.setattr(ops, "_COUNTERS", {device: torch.zeros(4096, dtype=torch.int32)})
    assert ops._counters(device, 16) is ops._COUNTERS[device]  # already there: no allocation, no error
    assert ops._counters_if_free(device, 16) is ops._COUNTERS[device]


def test_fused_combine_over_several_row_tiles():
    """Chunked prefill rows (40 queries x GQA 4: two 128-row tiles), 3 splits: each tile's last split program
    merges its own rows; equal to the combine kernel's result."""
    D = 64
    layer = FP8CacheLayer(impl="triton")
    length = _fill([layer], [300], B=1, D=D, dtype=torch.float32)
    query = torch.randn(1, 40, 8, D, generator=torch.Generator().manual_seed(5))
    cos, sin = _rope(40, length - 40, D)
    outs = [ops.cache_attention(query, cos, sin, layer.k8, layer.k_desc, layer.v8, layer.v_desc, length,
                                scale=D**-0.5, impl="triton", num_splits=3, config={"fused_combine": fused},
                                rotate=layer.rotate)
            for fused in (False, True)]
    assert torch.equal(outs[0], outs[1])
    assert not ops._COUNTERS[torch.device("cpu")].any()


@pytest.mark.parametrize("qk_fp8,s_q", [(False, 1), (False, 5), (True, 5)])
def test_decode_speed_configs(qk_fp8, s_q):
    """The decode config keys on 636 keys (not a multiple of a split), GQA 4: prefetch_desc (descales loaded
    one iteration ahead) and widen_v (a plain cast here: the inline PTX is GPU only) leave the output bit for
    bit at every split count, with either combine; the default wide combine (all splits of a row in one
    tile, tree-order sums) stays within 0.05 dB of the split-by-split combine's SQNR; every DECODE_PRESETS
    config (its own split count) tracks the reference like the default does."""
    exact, ref_db, run = _gqa_case([600, 36], s_q, 6, qk_fp8)
    for splits in (1, 3, 6):
        default = run(splits)
        serial = run(splits, wide_combine=False)
        for combine in (default, serial):
            wide = combine is default
            assert torch.equal(run(splits, prefetch_desc=False, wide_combine=wide), combine), splits
            assert torch.equal(run(splits, widen_v=False, prefetch_desc=False, wide_combine=wide), combine), splits
        if splits == 1:
            assert torch.equal(default, serial)
        else:
            assert abs(_sqnr(default, exact) - _sqnr(serial, exact)) < 0.05, splits
            torch.testing.assert_close(default, serial, rtol=1e-5, atol=1e-6)
    for name, config in ops.DECODE_PRESETS.items():
        got = run(None, **config)
        assert _sqnr(got, exact) > ref_db - 1.5, name


@pytest.mark.parametrize("D", [64, 256])
def test_wide_combine_chunks(D):
    """More than 16 splits (17): the wide combine's 128-split chunk (D <= 128) or its loop over 32-split
    chunks (D=256, running max) agree with the split-by-split combine to rounding, as do 8 splits (the
    16-split chunk)."""
    exact, _, run = _gqa_case([1050, 38], 1, 9, False, D=D)  # 1088 keys = 17 blocks: 17 splits of one block
    for splits in (8, 17):
        wide, serial = run(splits), run(splits, wide_combine=False)
        assert abs(_sqnr(wide, exact) - _sqnr(serial, exact)) < 0.05, splits
        torch.testing.assert_close(wide, serial, rtol=1e-5, atol=1e-6)


def test_fused_combine_auto():
    """fused_combine="auto": fused (the split-by-split arithmetic in the last split program) up to
    FUSED_AUTO_MAX_SPLITS (8) splits (an explicit count; else the count of a long cache of the call's geometry,
    `test_fused_auto_by_geometry`), the two launches above; it is the default; any other value is refused."""
    assert ops.FUSED_AUTO_MAX_SPLITS == 8
    _, _, run = _gqa_case([600, 36], 1, 6, False)
    for splits in (3, 5):  # 636 keys: 3 and 5 splits of 256 / 128 keys
        assert torch.equal(run(splits, fused_combine="auto"), run(splits, fused_combine=True)), splits
        assert torch.equal(run.default(splits), run(splits, fused_combine=True)), splits  # "auto" is the default
    assert torch.equal(run(10, fused_combine="auto"), run(10))  # 10 splits of one block: two launches
    assert torch.equal(run.default(10), run(10))
    with pytest.raises(ValueError, match="fused_combine must be"):
        run(3, fused_combine="yes")


def test_pdl_config():
    """config "pdl": True or False only; off the GPU (the interpreter has no griddepcontrol) it changes
    nothing: the default's output bit for bit, with either combine."""
    _, _, run = _gqa_case([600, 36], 1, 6, False)
    for splits in (1, 3):
        assert torch.equal(run(splits, pdl=True), run(splits)), splits
        assert torch.equal(run(splits, pdl=True, wide_combine=False), run(splits, wide_combine=False)), splits
    with pytest.raises(ValueError, match="pdl must be"):
        run(3, pdl=1)


def test_fused_auto_by_geometry(monkeypatch):
    """The default "auto" combine decides by the geometry's split count for a long cache, not by the call's:
    one decode shape keeps one compiled build as its cache grows (so a growing cache never compiles the other
    build mid-generation). The interpreter's geometry is 4 SMs x 8 programs: B=1 x 2 KV heads -> 16 splits
    for a long cache: never fused, even at 300 keys (2 splits); B=2 -> 8: fused at 300 and 636 keys; chunked
    prefill rows (e4m3 products) never fused."""
    _, _, _, kernels = ops._gpu_parts()
    real, seen = kernels.cache_attn_kernel, []

    class Spy:  # records each attention launch's SPLIT / FUSED_COMBINE, then launches it
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                seen.append((kwargs["SPLIT"], kwargs["FUSED_COMBINE"]))
                return real[grid](*args, **kwargs)
            return launch

        def __getattr__(self, name):
            return getattr(real, name)

    monkeypatch.setattr(kernels, "cache_attn_kernel", Spy())
    for B, s_q, fills, fused in ((1, 1, [300], False), (1, 1, [600, 36], False), (2, 1, [300], True),
                                 (2, 1, [600, 36], True), (2, 40, [600, 36], False)):
        layer = FP8CacheLayer(impl="triton")
        length = _fill([layer], fills, B=B, dtype=torch.float32)
        query = torch.randn(B, s_q, 8, 64, generator=torch.Generator().manual_seed(1))
        cos, sin = _rope(s_q, length - s_q, 64)
        seen.clear()
        ops.cache_attention(query, cos, sin, layer.k8, layer.k_desc, layer.v8, layer.v_desc, length, scale=0.125,
                            impl="triton", rotate=layer.rotate)
        assert seen == [(True, fused)], (B, s_q, length, seen)


def test_split_count_rounding():
    """Default: one wave at the kernel's residency (programs per SM) x SMs, rounded down (H200, 132 SMs,
    GQA 32/8 decode at 4 per SM: 1x128k 8 (batch, KV head) tiles -> 66 splits, 8x32k 64 tiles -> 8, 1x4k
    -> 16 (>= 4 blocks per split), a 512-query chunk at 128k (128 tiles) -> 4, more tiles than slots -> 1).
    keys_per_split: ~that many keys per split, >= 1 and <= 8 programs per SM. programs_per_sm: rounded up,
    or down with exact_waves (8x32k at 4/SM: 8 splits, 512 programs for 528 slots, not 9: a second wave);
    short caches: >= 4 blocks per split; never more than _MAX_SPLITS."""
    assert ops.pick_num_splits(131072, 8, 132, {}, 4) == 66
    assert ops.pick_num_splits(32768, 64, 132, {}, 4) == 8
    assert ops.pick_num_splits(32768, 8, 132, {}, 4) == 66
    assert ops.pick_num_splits(4096, 8, 132, {}, 4) == 16
    assert ops.pick_num_splits(131072, 128, 132, {}, 4) == 4
    assert ops.pick_num_splits(131072, 1024, 132, {}, 4) == 1
    assert ops.pick_num_splits(1 << 20, 8, 132, {}, 8) == ops._MAX_SPLITS
    assert ops.pick_num_splits(131072, 8, 132, {"keys_per_split": 2048}) == 64
    assert ops.pick_num_splits(32768, 64, 132, {"keys_per_split": 2048}) == 16
    assert ops.pick_num_splits(32768, 8, 132, {"keys_per_split": 2048}) == 17
    assert ops.pick_num_splits(32768, 64, 132, {"programs_per_sm": 4}) == 9
    assert ops.pick_num_splits(32768, 64, 132, {"programs_per_sm": 4, "exact_waves": True}) == 8
    assert ops.pick_num_splits(32768, 64, 132, {"programs_per_sm": 5, "exact_waves": True}) == 10
    assert ops.pick_num_splits(131072, 8, 132, {"programs_per_sm": 4, "exact_waves": True}) == 66
    assert ops.pick_num_splits(1000, 8, 132, {"programs_per_sm": 8, "exact_waves": True}) == 4


def test_residency_from_the_compiled_kernel(monkeypatch):
    """Programs per SM of a compiled variant: the least of the shared-memory limit (228 KiB + 1 KiB reserved
    per program), the register limit (per warp in units of 256 registers, from each of 4 sub-partitions of
    16384), threads (2048) and 32 programs; computed once per variant key; a warm-up that returns no
    compiled kernel gives the fallback."""
    from types import SimpleNamespace

    props = SimpleNamespace(shared_memory_per_multiprocessor=233472, regs_per_multiprocessor=65536,
                            max_threads_per_multi_processor=2048)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: props)
    compiles = []

    class Kernel:
        def __init__(self, shared, regs, compiled=True):
            self.shared, self.regs, self.compiled = shared, regs, compiled

        def warmup(self, *args, grid, **kwargs):
            compiles.append(kwargs["num_warps"])
            if not self.compiled:
                return None
            return SimpleNamespace(metadata=SimpleNamespace(shared=self.shared), n_regs=self.regs,
                                   _init_handles=lambda: None)

    monkeypatch.setattr(ops, "_RESIDENCY", {})
    dev = torch.device("cpu")
    # the widened-V decode build: 55.3 KB shared (4 fit); 183 registers: 2 warps per sub-partition -> 4
    assert ops._residency(Kernel(56_600, 183), dev, "a", (), {"num_warps": 2}) == 4
    assert ops._residency(Kernel(1, 1), dev, "a", (), {"num_warps": 2}) == 4  # cached per key
    assert compiles == [2]
    # register-bound by sub-partition: 190 registers -> 6144 per warp, 2 warps per quarter, 8 per SM -> 4
    # programs of 2 warps (65536 / (192 x 64) would say 5), though shared memory (38.9 KB) allows 5
    assert ops._residency(Kernel(39_834, 190), dev, "b", (), {"num_warps": 2}) == 4
    # 255 registers x 4 warps -> 2; thread-bound at 8 warps -> 8; tiny kernels stop at 32 programs
    assert ops._residency(Kernel(10_000, 255), dev, "c", (), {"num_warps": 4}) == 2
    assert ops._residency(Kernel(0, 16), dev, "d", (), {"num_warps": 8}) == 8
    assert ops._residency(Kernel(0, 8), dev, "e", (), {"num_warps": 1}) == 32
    assert ops._residency(Kernel(0, 8, compiled=False), dev, "f", (), {"num_warps": 2}) == ops._FALLBACK_RESIDENCY


def test_attention_config_validation():
    layer = FP8CacheLayer(impl="torch")
    _fill([layer], [70], B=1, H=2, D=64)
    args = (torch.randn(1, 1, 4, 64), None, None, layer.k8, layer.k_desc, layer.v8, layer.v_desc, layer.length)
    with pytest.raises(ValueError, match="block_n must be one of"):
        ops.cache_attention(*args, scale=0.1, impl="torch", rotate=False, config={"block_n": 96})
    with pytest.raises(ValueError, match="unknown keys"):
        ops.cache_attention(*args, scale=0.1, impl="torch", rotate=False, config={"blockn": 128})
    with pytest.raises(ValueError, match="num_warps must be a positive int"):
        ops.cache_attention(*args, scale=0.1, impl="torch", rotate=False, config={"num_warps": 0})
    with pytest.raises(ValueError, match="prefetch_desc needs block_n"):
        ops.cache_attention(*args, scale=0.1, impl="torch", rotate=False, config={"prefetch_desc": True, "block_n": 128})
    with pytest.raises(ValueError, match="keys_per_split must be a multiple of 64"):
        ops.cache_attention(*args, scale=0.1, impl="torch", rotate=False, config={"keys_per_split": 100})
    with pytest.raises(ValueError, match="keys_per_split must be a positive int"):
        ops.cache_attention(*args, scale=0.1, impl="torch", rotate=False, config={"keys_per_split": 0})
    with pytest.raises(ValueError, match="cached tokens asked of a cache holding"):
        ops.cache_attention(*args[:-1], layer.k8.shape[2] + 1, scale=0.1, impl="torch", rotate=False)


def test_keys_values_are_views_of_the_cached_tokens():
    """``keys`` / ``values`` (what generic code inspecting a layer reads) are made when read: the e4m3 codes of
    the cached tokens after appends, crops and batch selection; assigning a tensor is refused."""
    layer = FP8CacheLayer(impl="torch")
    assert layer.keys is None and layer.values is None
    _fill([layer], [70, 5], B=2, H=2, D=64)
    assert layer.keys.shape == (2, 2, 75, 64) and layer.values.dtype == layer.v8.dtype
    assert layer.keys.data_ptr() == layer.k8.data_ptr()
    layer.crop(-10)
    assert layer.keys.shape[2] == 65 and layer.values.shape[2] == 65
    layer.batch_select_indices(torch.tensor([1]))
    assert layer.keys.shape[0] == 1 and torch.equal(layer.values.view(torch.uint8), layer.v8[:, :, :65].view(torch.uint8))
    layer.keys = None  # the base class's initial assignment
    with pytest.raises(AttributeError, match="write through append"):
        layer.values = torch.zeros(1)


def test_attention_rejects_bad_input():
    layer = FP8CacheLayer(impl="torch")
    _fill([layer], [10], B=1, H=2, D=64)
    with pytest.raises(ValueError, match="multiple"):
        layer.attend(torch.randn(1, 1, 3, 64), None, None, scale=0.1)
    with pytest.raises(ValueError, match="cached first"):
        layer.attend(torch.randn(1, 11, 2, 64), None, None, scale=0.1)
    with pytest.raises(ValueError, match="appending"):
        layer.append(torch.randn(1, 3, 1, 64), torch.randn(1, 3, 1, 64))


@pytest.mark.parametrize("hadamard", [False, None])
def test_cache_operations_generate_uses(hadamard):
    layer = FP8CacheLayer(impl="torch", hadamard=hadamard)
    length = _fill([layer], [100], B=3, H=2, D=64)
    k, v = layer.dequantize()
    layer.reorder_cache(torch.tensor([2, 0, 0]))
    k2, _ = layer.dequantize()
    assert torch.equal(k2, k[[2, 0, 0]])
    layer.batch_select_indices(torch.tensor([0, 1]))
    layer.batch_repeat_interleave(2)
    assert layer.dequantize()[0].shape == (4, 2, length, 64)
    assert torch.equal(layer.dequantize()[1], v[[2, 2, 0, 0]])
    layer.crop(-30)
    assert layer.get_seq_length() == 70 and layer.keys.shape[2] == 70
    # the cropped block's kept tokens come back within e4m3 precision when the block is rewritten
    before = layer.dequantize()[0][:, :, 64:70].float()
    _fill([layer], [3], B=4, H=2, D=64, rope=False)
    after = layer.dequantize()[0][:, :, 64:70].float()
    if layer.rotate:  # re-quantized in the rotated basis: the error spreads over a row's channels
        assert _sqnr(after, before) > 25
    else:
        torch.testing.assert_close(after, before, rtol=0.07, atol=1e-3)
    layer.reset()
    assert layer.get_seq_length() == 0


def test_hadamard_rotation_of_the_cache():
    """K stored rotated (the default where the head_dim allows), queries rotated to match: the scores are
    unchanged, and outlier channels that Q and K share (offsets on two channels, as real Q/K have) cost far
    less: a score's error is the sum over channels of q_c times K's e4m3 error, which one aligned channel
    dominates unrotated and which the rotation spreads over all D. Output SQNR against float64 attention on
    the exact inputs, decode (fp16 Q) and chunked prefill (e4m3 Q) rows. (Real SmolLM2 Q/K/V, 30 layers,
    1024 tokens, CPU: +3.4 dB at decode, +3.0 dB for 256-query chunks, `build/exp_cache_rot.py`-style.)
    hadamard=True needs a power-of-two head_dim; None turns it on only where it can."""
    gen = torch.Generator().manual_seed(11)
    B, H, D, L = 1, 2, 64, 260
    k = torch.randn(B, H, L, D, generator=gen)
    k[..., 5] += 6.0
    k[..., 40] -= 9.0
    v = torch.randn(B, H, L, D, generator=gen).half()
    k = k.half()
    layers = {rot: FP8CacheLayer(impl="torch", hadamard=rot) for rot in (False, True)}
    for layer in layers.values():
        layer.append(k[:, :, :200], v[:, :, :200])
        layer.append(k[:, :, 200:], v[:, :, 200:])
    assert layers[True].rotate and not layers[False].rotate
    scale = D**-0.5
    for s_q, qk_fp8 in ((1, False), (40, True)):
        q = torch.randn(B, s_q, 2 * H, D, generator=gen) * 0.3
        q[..., 5] += 2.0
        q[..., 40] -= 1.5
        q = q.half()
        qd, kd, vd = q.double().transpose(1, 2), k.double().repeat_interleave(2, 1), v.double().repeat_interleave(2, 1)
        mask = torch.ones(s_q, L, dtype=torch.bool).tril(L - s_q)
        exact = ((qd @ kd.transpose(-1, -2) * scale).masked_fill(~mask, float("-inf")).softmax(-1) @ vd).transpose(1, 2)
        db = {rot: _sqnr(layer.attend(q, None, None, scale=scale, qk_fp8=qk_fp8), exact) for rot, layer in layers.items()}
        assert db[True] > db[False] + 3.0, (s_q, db)
    with pytest.raises(ValueError, match="power-of-two head_dim"):
        FP8CacheLayer(impl="torch", hadamard=True).append(torch.randn(1, 1, 2, 96).half(), torch.randn(1, 1, 2, 96).half())
    auto = FP8CacheLayer(impl="torch")
    auto.append(torch.randn(1, 1, 2, 96).half(), torch.randn(1, 1, 2, 96).half())
    assert not auto.rotate


def test_decode_step_reads_its_length_from_the_device(monkeypatch):
    """The fused decode step's write launch stores the cached length before the new token (LEN_OUT) and its
    attention launch reads it (DEVICE_LEN), split over several key ranges: the output and storage equal
    `append` then `attend` (a host length argument) bit for bit, at lengths across a block boundary."""
    from hf_fp8_attention import _launch

    launches = []
    real = _launch.launch

    def spy(fn, key, grid, args, kwargs):
        launches.append((fn.fn.__name__, grid, kwargs.get("DEVICE_LEN", False), kwargs.get("LEN_OUT", False)))
        return real(fn, key, grid, args, kwargs)

    monkeypatch.setattr(_launch, "launch", spy)
    gen = torch.Generator().manual_seed(3)
    D = 64
    fused, plain = FP8CacheLayer(impl="triton"), FP8CacheLayer(impl="triton")
    length = _fill([fused, plain], [1086], B=1, H=2, D=D)
    for _ in range(3):  # 1086 -> 1089: crosses the block boundary at 1088
        k = torch.randn(1, 2, 1, D, generator=gen).half()
        v = torch.randn(1, 2, 1, D, generator=gen).half()
        q = torch.randn(1, 1, 8, D, generator=gen).half()
        cos, sin = _rope(1, length, D, torch.float16)
        launches.clear()
        got = fused.append_attend(q, k, v, cos, sin, scale=D**-0.5)
        step = list(launches)
        plain.append(k, v, cos, sin)
        want = plain.attend(q, cos, sin, scale=D**-0.5)
        assert int(fused._length_dev) == length
        length += 1
        assert torch.equal(got, want)
        _assert_same_storage(fused, plain)
        writes = [x for x in step if x[0] == "cache_write_kernel"]
        attns = [x for x in step if x[0] == "cache_attn_kernel"]
        assert len(writes) == 1 and writes[0][3] and not writes[0][2]
        assert len(attns) == 1 and attns[0][2] and attns[0][1][2] > 1, step  # DEVICE_LEN, split
    assert fused._warm_sig == (1, 1, 8, True)  # the warm-up check's geometry: its full key is not rebuilt per step
    # with the switch off, the step takes the length as an argument: no LEN_OUT, no DEVICE_LEN, the same output
    monkeypatch.setattr(FP8CacheLayer, "DEVICE_LENGTH", False)
    q = torch.randn(1, 1, 8, D, generator=gen).half()
    cos, sin = _rope(1, length, D, torch.float16)
    launches.clear()
    got = fused.append_attend(q, k, v, cos, sin, scale=D**-0.5)
    plain.append(k, v, cos, sin)
    assert torch.equal(got, plain.attend(q, cos, sin, scale=D**-0.5))
    assert not any(x[2] or x[3] for x in launches) and {x[0] for x in launches} >= {"cache_write_kernel",
                                                                                   "cache_attn_kernel"}
    # an explicit split count is planned as the kernel caps it (splits of >= 4 blocks): the output of the host
    # length's launch with that capped count (8 -> 5 at 1090 keys; more splits would sum in another order)
    before = torch.full((), fused.length - 1, dtype=torch.int64)
    cache = (fused.k8, fused.k_desc, fused.v8, fused.v_desc, fused.length)
    q_op, q_desc = reference.prepare_queries(q, cos, sin, rotate=True)
    for splits in (3, 8):
        capped = min(splits, -(-fused.length // (4 * KV_BLOCK)))
        host = ops.cache_attention(q_op, None, None, *cache, scale=D**-0.5, impl="triton", rotate=False,
                                   q_descale=q_desc, num_splits=capped)
        dev = ops.cache_attention(q_op, None, None, *cache, scale=D**-0.5, impl="triton", rotate=False,
                                  q_descale=q_desc, num_splits=splits, device_length=before)
        assert torch.equal(host, dev), splits
    # write_blocks refuses a length_out it cannot write or that contradicts a device length
    args = (k, v, None, None, fused.k8, fused.v8, fused.k_desc, fused.v_desc, fused.tails[0], fused.tails[1],
            fused.length)
    with pytest.raises(ValueError, match="int64"):
        ops.write_blocks(*args, impl="triton", rotate=True, length_out=torch.zeros((), dtype=torch.int32))
    with pytest.raises(ValueError, match="not with device_length"):
        ops.write_blocks(*args, impl="triton", rotate=True, length_out=fused._length_dev,
                         device_length=fused._length_dev)
    # the torch implementation fills it on the host's word
    out = torch.zeros((), dtype=torch.int64)
    ref = FP8CacheLayer(impl="torch")
    _fill([ref], [5], B=1, H=2, D=D)
    ref.append(k, v, length_out=out)
    assert int(out) == 5


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_append_attend_equals_append_then_attend(dtype):
    """A decode step of a rotating cache on the kernels (`append_attend`: the write launch stores the queries
    with RoPE and the rotation applied, the attention reads them as they are) gives `append` then `attend`'s
    output and storage bit for bit: S_q 1 and 4 at GQA 4 (4 and 16 query rows per KV head); 40 queries (160
    rows, a prefill chunk) and the torch implementation take the plain path. A query count that is not the
    appended one is refused."""
    gen = torch.Generator().manual_seed(7)
    D = 64
    for impl in ("triton", "torch"):
        fused, plain = FP8CacheLayer(impl=impl), FP8CacheLayer(impl=impl)
        length = _fill([fused, plain], [150], B=2, H=2, D=D, dtype=dtype)
        for s_q in (1, 4, 40):
            k = torch.randn(2, 2, s_q, D, generator=gen).to(dtype)
            v = torch.randn(2, 2, s_q, D, generator=gen).to(dtype)
            q = torch.randn(2, s_q, 8, D, generator=gen).to(dtype)
            cos, sin = _rope(s_q, length, D, dtype)
            got = fused.append_attend(q, k, v, cos, sin, scale=D**-0.5)
            if impl == "triton" and s_q * 4 <= ops.FP16_MAX_ROWS:  # the fused step: its length on the device
                assert int(fused._length_dev) == length, (s_q, int(fused._length_dev), length)
            plain.append(k, v, cos, sin)
            want = plain.attend(q, cos, sin, scale=D**-0.5)
            length += s_q
            assert got.dtype == dtype and torch.equal(got, want), (impl, s_q)
            _assert_same_storage(fused, plain)
    # the write launch's prepared queries are `reference.prepare_queries`' bit for bit, and the attention on
    # them through the torch implementation is the reference's from the raw queries
    layer = FP8CacheLayer(impl="triton")
    layer.append(torch.randn(1, 2, 8, D).half(), torch.randn(1, 2, 8, D).half())
    q = torch.randn(1, 3, 8, D, generator=gen).half() * 3
    cos, sin = _rope(3, 8, D, torch.float16)
    q_op, q_desc = torch.empty(q.shape, dtype=torch.float16), torch.empty(q.shape[:3])
    layer.append(torch.randn(1, 2, 3, D).half(), torch.randn(1, 2, 3, D).half(), cos, sin, query=q, q_out=q_op,
                 q_desc_out=q_desc)
    want_op, want_desc = reference.prepare_queries(q, cos, sin, rotate=True)
    assert torch.equal(q_op, want_op) and torch.equal(q_desc, want_desc)
    cache = (layer.k8, layer.k_desc, layer.v8, layer.v_desc, layer.length)
    prepared = ops.cache_attention(q_op, None, None, *cache, scale=0.1, impl="torch", rotate=False, q_descale=q_desc,
                                   out_dtype=torch.float16)
    assert torch.equal(prepared, ops.cache_attention(q, cos, sin, *cache, scale=0.1, impl="torch", rotate=True))
    with pytest.raises(ValueError, match="q_descale"):
        ops.cache_attention(q_op, cos, sin, *cache, scale=0.1, impl="torch", rotate=False, q_descale=q_desc)
    strided = torch.empty(1, 8, 3).transpose(1, 2)  # (1, 3, 8), not contiguous: the kernel would misread it
    strided.copy_(q_desc)
    with pytest.raises(ValueError, match="contiguous"):
        ops.cache_attention(q_op, None, None, *cache, scale=0.1, impl="triton", rotate=False, q_descale=strided)
    with pytest.raises(ValueError, match="write_blocks"):
        layer.append(torch.randn(1, 2, 1, D).half(), torch.randn(1, 2, 1, D).half(), query=torch.randn(1, 2, 8, D).half(),
                     q_out=torch.empty(1, 2, 8, D))


def test_memory_about_half_of_bf16_at_long_length():
    layer = FP8CacheLayer(impl="torch")
    B, H, D, L = 1, 1, 64, 32768
    layer.append(torch.randn(B, H, L, D).half(), torch.randn(B, H, L, D).half())
    for _ in range(128):
        layer.append(torch.randn(B, H, 1, D).half(), torch.randn(B, H, 1, D).half())
    bf16_bytes = 2 * B * H * (L + 128) * D * 2
    assert layer.memory_bytes() <= 0.53 * bf16_bytes
    assert layer.capacity >= L + 128 and layer.capacity <= L + 128 + max(_GROW_MIN, L // 16)


def test_layer_types_from_config():
    llama = LlamaConfig(num_hidden_layers=3, hidden_size=64, num_attention_heads=2, intermediate_size=64)
    assert all(isinstance(layer, FP8CacheLayer) for layer in FP8Cache(config=llama).layers)
    only = FP8Cache(config=llama, fp8_layers={1})
    assert [type(layer).__name__ for layer in only.layers] == ["DynamicLayer", "FP8CacheLayer", "DynamicLayer"]
    mistral = MistralConfig(num_hidden_layers=2, hidden_size=64, num_attention_heads=2, intermediate_size=64,
                            sliding_window=128)
    assert all(layer.is_sliding for layer in FP8Cache(config=mistral).layers)
    qwen = Qwen2Config(num_hidden_layers=2, hidden_size=64, num_attention_heads=2, intermediate_size=64,
                       use_sliding_window=True, sliding_window=32, max_window_layers=1)
    kinds = [type(layer).__name__ for layer in FP8Cache(config=qwen).layers]
    assert kinds[0] == "FP8CacheLayer" and kinds[1] != "FP8CacheLayer"


# --- a prepared model ---------------------------------------------------------------------------------------


def _tiny_llama(seed=0):
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=97, hidden_size=256, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=64, max_position_embeddings=512)
    return LlamaForCausalLM(config).to(torch.bfloat16).eval()


def test_prepared_model_generates_from_the_fp8_cache(monkeypatch):
    model = _tiny_llama()
    ids = torch.randint(0, 97, (2, 90), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    with torch.no_grad():
        eager = model(torch.cat([ids, ids[:, :12]], 1)).logits[:, 89:101].float()
    hfa.prepare_model(model, backend="reference", kv_cache="fp8")
    assert "fp8 KV cache on 2/2 layers" in hfa.describe_backend(model)
    calls = {"update": 0, "attend": 0}
    attend = FP8CacheLayer.attend
    monkeypatch.setattr(FP8CacheLayer, "update", lambda *a, **k: calls.__setitem__("update", 1 / 0))

    def counting_attend(self, *args, **kwargs):
        calls["attend"] += 1
        return attend(self, *args, **kwargs)

    monkeypatch.setattr(FP8CacheLayer, "attend", counting_attend)
    with torch.no_grad():
        out = model(ids, attention_mask=mask, use_cache=True)
        cache = getattr(out, "cache", None) or out.past_key_values
        assert isinstance(cache, FP8Cache) and cache.get_seq_length() == 90
        steps = [out.logits[:, -1]]
        for t in range(11):
            steps.append(model(ids[:, t : t + 1], use_cache=True, **{_cache_kwarg(model): cache}).logits[:, -1])
    got = torch.stack(steps, 1).float()
    cos = torch.nn.functional.cosine_similarity(got.flatten(), eager.flatten(), dim=0).item()
    assert cos > 0.999, cos
    assert calls["attend"] == 11 * 2 and calls["update"] == 0
    generated = model.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False, num_beams=2)
    assert generated.shape == (2, 94)
    hfa.unprepare_model(model)
    assert not model._forward_pre_hooks and "_prepare_cache_for_generation" not in model.__dict__
    out = model(ids, use_cache=True)
    assert type(getattr(out, "cache", None) or out.past_key_values) is DynamicCache


def test_prepare_model_kv_cache_validation():
    model = _tiny_llama()
    with pytest.raises(ValueError, match="kv_cache must be one of"):
        hfa.prepare_model(model, backend="reference", kv_cache="int4")
    with pytest.raises(ValueError, match="not supported with it"):
        hfa.prepare_model(model, backend="reference", kv_cache="fp8", smooth_k=True)
    for smooth_v in (True, False):  # like the rotation, centring V only shapes the first chunk's fp8_sdpa
        hfa.prepare_model(model, backend="reference", kv_cache="fp8", smooth_v=smooth_v)
        hfa.unprepare_model(model)
    # the rotation shapes the first chunk's fp8_sdpa and the cache's K/Q rotation (never V)
    for hadamard, rotates in (("none", False), ("v_only", False), ("qk", True), ("qkv", True), (None, True)):
        hfa.prepare_model(model, backend="reference", kv_cache="fp8", hadamard=hadamard)
        cache = hfa.new_cache(model)
        layer = cache.fp8_layer(0)
        layer.append(torch.randn(1, 2, 3, 64).bfloat16(), torch.randn(1, 2, 3, 64).bfloat16())
        assert layer.rotate == rotates, hadamard
        assert ("K Hadamard-rotated" in hfa.describe_backend(model)) == rotates, hadamard
        hfa.unprepare_model(model)
    with pytest.raises(ValueError, match="fuse_rope=True"):
        hfa.prepare_model(model, backend="reference", kv_cache="fp8", fuse_rope=False)
    with pytest.raises(ValueError, match="new_cache needs"):
        hfa.new_cache(model)
    hfa.prepare_model(model, backend="reference", kv_cache="bf16")
    assert model.config.use_cache
    out = model(torch.randint(0, 97, (1, 8)), use_cache=True)
    assert type(getattr(out, "cache", None) or out.past_key_values) is DynamicCache


def test_model_without_fused_forward_keeps_bf16_cache(caplog):
    from transformers import OlmoConfig, OlmoForCausalLM
    from transformers.utils import logging as hf_logging

    torch.manual_seed(0)
    config = OlmoConfig(vocab_size=100, hidden_size=128, intermediate_size=128, num_hidden_layers=2,
                        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256,
                        eos_token_id=None, pad_token_id=None, bos_token_id=None)
    model = OlmoForCausalLM(config).to(torch.bfloat16).eval()
    hf_logging.enable_propagation()
    try:
        with caplog.at_level("WARNING"):
            hfa.prepare_model(model, backend="reference", kv_cache="fp8")
    finally:
        hf_logging.disable_propagation()
    assert "keeps transformers' bf16 cache" in caplog.text
    assert "fp8 KV cache on 0/2 layers" in hfa.describe_backend(model)
    out = model(torch.randint(0, 100, (1, 12)), use_cache=True)
    assert type(getattr(out, "cache", None) or out.past_key_values) is DynamicCache


def test_warm_decode_step_compiles_the_write_build_beside_the_attention_build(monkeypatch):
    """`ops.warm_decode_step` runs the write warm-up in the background thread while the caller's thread runs the
    attention warm-up, once per step key, re-raises the background's error, and does nothing without
    CONCURRENT_WARMUP; a warm-only append changes nothing but the reserved room."""
    import threading

    monkeypatch.setattr(ops, "_STEP_WARMED", set())
    calls = []
    ops.warm_decode_step(("a",), lambda: calls.append(("write", threading.current_thread().name)),
                         lambda: calls.append(("attend", threading.current_thread().name)))
    ops.warm_decode_step(("a",), lambda: calls.append("again"), lambda: calls.append("again"))
    names = dict(calls)
    assert set(names) == {"write", "attend"} and len(calls) == 2
    assert names["write"].startswith("fp8-cache-warmup") and names["attend"] == threading.current_thread().name

    def fail():
        raise RuntimeError("write build failed")

    with pytest.raises(RuntimeError, match="write build failed"):
        ops.warm_decode_step(("b",), fail, lambda: None)
    monkeypatch.setattr(ops, "CONCURRENT_WARMUP", False)
    ops.warm_decode_step(("c",), lambda: calls.append("off"), lambda: calls.append("off"))
    assert "off" not in calls

    layer = FP8CacheLayer(impl="triton")
    _fill([layer], [70], B=1, H=2, D=64)
    before = (layer.length, layer._tail_index, _codes(layer.k8[:, :, :70]).clone(), layer.tails.clone())
    k = torch.randn(1, 2, 1, 64).half()
    layer.append(k, k, warm_only=True, length_out=layer._length_dev)
    assert (layer.length, layer._tail_index) == before[:2] and int(layer._length_dev) == 0
    assert torch.equal(_codes(layer.k8[:, :, :70]), before[2]) and torch.equal(layer.tails, before[3])
