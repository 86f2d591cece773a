"""CUDA-graph capture of the fp8 paths: a captured call replayed on new inputs (copied into the captured
tensors) equals an eager call on those inputs, bit for bit. Covers fp8_sdpa with the default accuracy modes
(fa3 on SM 9.x, triton on SM 8.9+, prefill with and without smooth_v; the quantizer's persistent kernel and its
split path) and the FP8 cache's append and
decode attend (static-cache + torch.compile "reduce-overhead" decoding replays such graphs)."""

from __future__ import annotations

import pytest
import torch

if not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9):
    pytest.skip("needs a CUDA GPU with fp8 (SM 8.9+)", allow_module_level=True)

from hf_fp8_attention import FP8CacheLayer, fp8_sdpa  # noqa: E402
from hf_fp8_attention.dispatch import device_arch, kernel_available  # noqa: E402

DEV = "cuda"
_fa3 = device_arch(torch.device(DEV)) // 10 == 9 and kernel_available("fa3")


def _randn(*shape, seed):
    return torch.randn(*shape, device=DEV, generator=torch.Generator(device=DEV).manual_seed(seed))


def _captured(fn, *static):
    """(graph, output) of ``fn(*static)`` captured after a warm-up on a side stream (compiles, autotuning)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn(*static)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn(*static)
    return graph, out


@pytest.mark.parametrize("backend,smooth_v,extra", [
    ("fa3", "auto", {}), ("fa3", True, {}), ("triton", "auto", {}),
    # every scale per block with fused RoPE: the q/k RoPE kernel then the single-pass kernel's v tiles
    ("triton", "auto", {"qk_scales": "block", "v_scales": "block", "rope": True}),
    # 2048 keys x D=128 reach the keys-contiguous V that the Triton backend's prefill on Hopper hands to the
    # Gluon kernel (its default route there): the TMA descriptors are built per call, outside the graph
    ("triton", "auto", {"seq": 2048}),
    # the same call with the Gluon route refused after the quantizer wrote V in wgmma key order (session 26): the
    # Triton kernel gets V back in key order inside the graph (`natural_key_order`, no host copy)
    ("triton", "auto", {"seq": 2048, "no_gluon": True}),
    # the quantizer's split path (per-head scales in two launches of the single-pass kernels; at these sizes
    # only when forced): plain with smooth_v, and fused RoPE through the q/k RoPE kernel
    ("fa3", True, {"split": True}), ("fa3", "auto", {"split": True, "rope": True}),
])
def test_fp8_sdpa_replays(backend, smooth_v, extra, monkeypatch):
    if backend == "fa3" and not _fa3:
        pytest.skip("needs Hopper (SM 9.x) and the FA3 wheel")
    extra = dict(extra)
    split_calls = None
    if extra.pop("split", False):
        from hf_fp8_attention.quantization import qkv

        monkeypatch.setattr(qkv, "_SPLIT_MIN_ELEMENTS", 0)
        split_calls, launch_split = [], qkv._launch_split
        monkeypatch.setattr(qkv, "_launch_split", lambda *a, **kw: split_calls.append(1) or launch_split(*a, **kw))
    B, H_q, H_kv, S, D = 2, 8, 2, extra.pop("seq", 1024), 128
    no_gluon = extra.pop("no_gluon", False)
    if no_gluon:
        if not _gluon_default():
            pytest.skip("needs the Gluon kernel's default route (Hopper, auto, a triton that builds it)")
        from hf_fp8_attention.backends import triton as triton_backend

        monkeypatch.setattr(triton_backend, "_gluon_route", lambda *a: None)
        restored, natural = [], triton_backend.natural_key_order
        monkeypatch.setattr(triton_backend, "natural_key_order", lambda v: restored.append(1) or natural(v))
    check_gluon = S >= 2048 and backend == "triton" and _gluon_default() and not no_gluon
    gluon_calls = _gluon_calls() if check_gluon else 0

    def inputs(seed):  # BHSD views of BSHD memory, as Transformers hands them over
        return [(_randn(B, S, h, D, seed=seed + i) + (3.0 if i == 2 else 0.0)).bfloat16().transpose(1, 2)
                for i, h in enumerate((H_q, H_kv, H_kv))]

    if extra.pop("rope", False):
        pos = torch.arange(S, device=DEV, dtype=torch.float32)[:, None]
        emb = torch.cat([pos * 1e-2 * torch.arange(1, D // 2 + 1, device=DEV)] * 2, dim=-1)[None]
        extra.update(cos=emb.cos().bfloat16(), sin=emb.sin().bfloat16())

    def call(q, k, v):
        return fp8_sdpa(q, k, v, is_causal=True, backend=backend, smooth_v=smooth_v, **extra)

    static = inputs(0)
    graph, out = _captured(call, *static)
    for seed in (10, 20):
        new = inputs(seed)
        for dst, src in zip(static, new):
            dst.copy_(src)
        graph.replay()
        assert torch.equal(out, call(*new)), seed
    if check_gluon:
        assert _gluon_calls() > gluon_calls  # the captured prefill ran the Gluon kernel
    if split_calls is not None:
        assert split_calls  # the quantizer took the split path
    if no_gluon:
        assert restored  # V came in wgmma key order and went back to key order


def _gluon_calls() -> int:
    from hf_fp8_attention.backends import gluon_attention

    return gluon_attention.CALLS


def _gluon_default() -> bool:
    """Whether the Triton backend's D=128 prefill goes to the Gluon kernel here (Hopper, auto, a triton that
    builds it)."""
    from hf_fp8_attention.backends import triton as triton_backend

    return (device_arch(torch.device(DEV)) // 10 == 9 and triton_backend.kernel_choice() == "auto"
            and triton_backend.gluon_unavailable() is None)


@pytest.mark.parametrize("fused_step", [False, True])
def test_fp8_cache_append_and_attend_replay(fused_step):
    """A decode step (append then attend, or the model's `append_attend`: the write launch prepares the
    rotated queries) captured and replayed on new inputs equals eager calls bit for bit."""
    # L a multiple of the 64-token block: the step's crop back to L is host-only, so every step starts from
    # the same cache state
    B, H_q, H_kv, D, L = 2, 32, 8, 128, 4992
    layer = FP8CacheLayer(impl="triton")
    layer.append(_randn(B, H_kv, L, D, seed=1).bfloat16(), _randn(B, H_kv, L, D, seed=2).bfloat16())
    q = _randn(B, 1, H_q, D, seed=3).bfloat16()
    k_new, v_new = (_randn(B, H_kv, 1, D, seed=s).bfloat16() for s in (4, 5))

    def step(q, k_new, v_new):  # one decode step at a fixed length: append, attend, then back to L
        if fused_step:
            out = layer.append_attend(q, k_new, v_new, None, None, scale=D**-0.5)
        else:
            layer.append(k_new, v_new)
            out = layer.attend(q, None, None, scale=D**-0.5)
        layer.crop(L)
        return out

    graph, out = _captured(step, q, k_new, v_new)
    for seed in (10, 20):
        new = [_randn(*t.shape, seed=seed + i).bfloat16() for i, t in enumerate((q, k_new, v_new))]
        for dst, src in zip((q, k_new, v_new), new):
            dst.copy_(src)
        graph.replay()
        assert torch.equal(out, step(*new)), seed
