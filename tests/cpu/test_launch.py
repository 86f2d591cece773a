"""`_launch.DirectLauncher`: the host-time fast path of the cache's decode launches, with a stand-in for a
triton.jit function and its compiled kernel (the GPU tests run the real kernels with VERIFY on)."""

import inspect
import os

import pytest
import torch

from hf_fp8_attention import _launch


class _Param:
    def __init__(self, p):
        self.name, self.default = p.name, p.default
        self.has_default = p.default is not inspect.Parameter.empty


class _Compiled:
    def __init__(self, log):
        self.log, self.function, self.packed_metadata = log, "fn", "meta"

    def run(self, g0, g1, g2, stream, function, packed, launch_metadata, enter, exit_, *values):
        self.log.append(("direct", (g0, g1, g2), stream, values))


class _Jit:
    """fn(A, B, n, X=7, C: constexpr=2): fn[grid](...) records the call and returns one compiled kernel."""

    def __init__(self):
        def fn(A, B, n, X=7, C=2):
            pass

        self.params = [_Param(p) for p in inspect.signature(fn).parameters.values()]
        self.__name__ = "fn"
        self.log = []
        self.kernel = _Compiled(self.log)
        self.spec = ["spec"]
        self.device_caches = {0: (None, None, None, None, lambda *a, **k: (None, list(self.spec), None))}

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.log.append(("jit", grid, args, kwargs))
            return self.kernel

        return launch


class HookChain:  # the name and `calls` list of triton.knobs.HookChain
    def __init__(self):
        self.calls = []


class _Hooks:
    launch_enter_hook = None
    launch_exit_hook = None


@pytest.fixture
def fake_triton(monkeypatch):
    hooks = _Hooks()
    monkeypatch.setattr(_launch, "_TRITON", (hooks, lambda device: f"stream{device}", True))
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(_launch, "ENABLED", True)
    monkeypatch.setattr(_launch, "VERIFY", False)
    return hooks


def test_first_call_jit_then_direct_in_parameter_order(fake_triton):
    fn = _Jit()
    _launch.launch(fn, ("k",), (3, 2), (1, 2, 100), dict(C=5))
    _launch.launch(fn, ("k",), (4,), (10, 20, 200), dict(C=5))  # a new grid and new runtime values
    assert fn.log[0] == ("jit", (3, 2), (1, 2, 100), dict(C=5))
    # the parameters in order: positional ones, then the later ones from kwargs or their defaults
    assert fn.log[1] == ("direct", (4, 1, 1), "stream0", (10, 20, 200, 7, 5))
    assert len(fn.log) == 2


def test_none_key_hooks_disabled_and_other_triton_take_the_jit(fake_triton, monkeypatch):
    fn = _Jit()
    _launch.launch(fn, None, (1,), (1, 2, 3), {})
    _launch.launch(fn, None, (1,), (1, 2, 3), {})
    assert [e[0] for e in fn.log] == ["jit", "jit"]  # no key: never remembered
    _launch.launch(fn, "k", (1,), (1, 2, 3), {})
    fake_triton.launch_enter_hook = lambda *a: None  # a profiler's hook: the JIT calls it, so the JIT runs
    _launch.launch(fn, "k", (1,), (1, 2, 3), {})
    fake_triton.launch_enter_hook = HookChain()  # Triton 3.6's default: an empty chain, nothing to call
    _launch.launch(fn, "k", (1,), (1, 2, 3), {})
    fake_triton.launch_enter_hook.calls.append(lambda *a: None)
    _launch.launch(fn, "k", (1,), (1, 2, 3), {})
    fake_triton.launch_enter_hook = None
    monkeypatch.setattr(_launch, "ENABLED", False)
    _launch.launch(fn, "k", (1,), (1, 2, 3), {})
    monkeypatch.setattr(_launch, "ENABLED", True)
    _launch.launch(fn, "k", (1,), (1, 2, 3), {})
    assert [e[0] for e in fn.log] == ["jit", "jit", "jit", "jit", "direct", "jit", "jit", "direct"]
    other = _Jit()  # a Triton whose launcher was not read: never direct
    monkeypatch.setattr(_launch, "_TRITON", (fake_triton, lambda d: "s", False))
    for _ in range(2):
        _launch.launch(other, "k", (1,), (1, 2, 3), {})
    assert [e[0] for e in other.log] == ["jit", "jit"]


def test_verify_catches_a_key_that_misses_a_specialization(fake_triton, monkeypatch):
    monkeypatch.setattr(_launch, "VERIFY", True)
    fn = _Jit()
    _launch.launch(fn, "k", (1,), (1, 2, 3), {})
    _launch.launch(fn, "k", (1,), (1, 2, 3), {})  # same specialization: direct
    fn.spec = ["another"]  # the binder now specializes these arguments differently
    with pytest.raises(RuntimeError, match="specialize differently"):
        _launch.launch(fn, "k", (1,), (1, 2, 3), {})
    assert [e[0] for e in fn.log] == ["jit", "direct"]


def test_aligned_is_one_bit_over_all_pointers():
    base = torch.zeros(64, dtype=torch.uint8)
    assert _launch.aligned(base, base[16:], base[32:48])
    assert not _launch.aligned(base, base[1:])
    assert not _launch.aligned(base[8:])


def test_plans_are_bounded(fake_triton, monkeypatch):
    monkeypatch.setattr(_launch, "_MAX_PLANS", 3)
    fn = _Jit()
    for i in range(5):
        _launch.launch(fn, i, (1,), (1, 2, 3), {})
    assert len(_launch.direct(fn).plans) <= 3


def test_a_wrapper_forwarding_attributes_gets_its_own_launcher(fake_triton):
    """A spy that forwards attribute reads to the kernel (the tests' way to record launches) is launched
    itself, not through the kernel's launcher."""
    fn = _Jit()
    _launch.launch(fn, "k", (1,), (1, 2, 3), {})

    class Spy:
        def __init__(self):
            self.calls = 0

        def __getitem__(self, grid):
            self.calls += 1
            return fn[grid]

        def __getattr__(self, name):
            return getattr(fn, name)

    spy = Spy()
    _launch.launch(spy, "k", (1,), (1, 2, 3), {})
    assert spy.calls == 1 and _launch.direct(spy) is not _launch.direct(fn)


def test_another_current_device_or_pre_run_hooks_take_the_jit(fake_triton, monkeypatch):
    """A key's plan launches on the device of its first call: with another current device (a caller that did
    not switch to its tensors' device) the JIT launches, as it would have; so does a kernel with pre-run
    hooks (the JIT runs them)."""
    fn = _Jit()
    _launch.launch(fn, "k", (1,), (1, 2, 3), {})
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    _launch.launch(fn, "k", (1,), (1, 2, 3), {})
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    fn.pre_run_hooks = [lambda *a, **k: None]
    _launch.launch(fn, "k", (1,), (1, 2, 3), {})
    fn.pre_run_hooks = []
    _launch.launch(fn, "k", (1,), (1, 2, 3), {})
    assert [e[0] for e in fn.log] == ["jit", "jit", "jit", "direct"]


# --- the call sites' keys against Triton's specialization, on the CPU (interpreter) ---------------------------


def _triton_spec(fn, args, kwargs):
    """What Triton's JIT binder specializes for this call (3.6/3.9 rules, via its native function): per
    parameter, a constexpr's value or the argument's (type, 16 / 1 / alignment) specialization, honouring the
    kernel's do_not_specialize lists; plus the launch options (num_warps, ...)."""
    from triton._C.libtriton import native_specialize_impl
    from triton.backends.compiler import BaseBackend

    sig = inspect.signature(fn.fn)
    dns = set(fn.kwargs.get("do_not_specialize") or ())
    dns_oa = set(fn.kwargs.get("do_not_specialize_on_alignment") or ())
    bound = sig.bind(*args, **{k: v for k, v in kwargs.items() if k in sig.parameters})
    bound.apply_defaults()
    spec = []
    for name, p in sig.parameters.items():
        value = bound.arguments[name]
        if "constexpr" in str(p.annotation):
            spec.append((name, "constexpr", value))
        elif value is None:
            spec.append((name, None))
        else:
            spec.append((name, native_specialize_impl(BaseBackend, value, False, name not in dns, name not in dns_oa)))
    options = tuple(sorted((k, v) for k, v in kwargs.items() if k not in sig.parameters))
    return tuple(spec), options


@pytest.fixture
def recorded_keys(monkeypatch):
    """Every launch of the cache and quantize kernels on the CPU, keyed as on a GPU (`_launch.wanted` says
    yes), recorded with Triton's specialization of its arguments, then launched (interpreter)."""
    if os.environ.get("TRITON_INTERPRET") != "1":  # tests/conftest.py sets it without CUDA
        pytest.skip("CPU interpreter test")
    seen = []

    def record(fn, key, grid, args, kwargs):
        if key is not None:
            seen.append((fn.fn.__name__, key, _triton_spec(fn, args, kwargs)))
        return fn[grid](*args, **kwargs)

    monkeypatch.setattr(_launch, "wanted", lambda t: True)
    monkeypatch.setattr(_launch, "launch", record)
    return seen


def _assert_keys_determine_specs(seen):
    by_key = {}
    for name, key, spec in seen:
        by_key.setdefault((name, key), set()).add(spec)
    bad = {k: v for k, v in by_key.items() if len(v) > 1}
    assert not bad, f"keys with more than one specialization: {bad}"
    return by_key


def test_cache_launch_keys_determine_triton_specialization(recorded_keys):
    """Two launches of a cache kernel with one key always specialize alike (what makes a direct launch
    safe), over appends of 1 / several tokens, with and without RoPE (cos batch 1 or B), decode steps with
    prepared queries, several query lengths, batch sizes, head counts, dtypes and a transposed key layout; and
    different specializations got different keys (each key seen maps to one)."""
    from hf_fp8_attention.kv_cache import FP8CacheLayer

    gen = torch.Generator().manual_seed(0)
    D = 64
    # pairs that differ in one thing only (the rotation; the dtype; the cos batch), so that a key missing
    # that thing would put two specializations under one key
    for B, H_q, H_kv, dtype, rope_b, hadamard in ((1, 4, 2, torch.bfloat16, 1, None),
                                                  (1, 4, 2, torch.bfloat16, 1, False),
                                                  (1, 4, 2, torch.float16, 1, None),
                                                  (2, 4, 1, torch.float16, 2, None),
                                                  (2, 4, 1, torch.float16, 1, None),
                                                  (2, 2, 2, torch.float32, 1, False)):
        layer = FP8CacheLayer(impl="triton", hadamard=hadamard)
        length = 0
        for n in (130, 1, 1, 5):
            k = torch.randn(B, n, H_kv, D, generator=gen).to(dtype).transpose(1, 2)  # a BSHD view
            v = torch.randn(B, H_kv, n, D, generator=gen).to(dtype)
            pos = torch.arange(length, length + n).float()[:, None] * 0.01
            cos = torch.cat([pos.cos()] * D, -1)[None].expand(rope_b, n, D).to(dtype).contiguous()
            sin = torch.cat([pos.sin()] * D, -1)[None].expand(rope_b, n, D).to(dtype).contiguous()
            q = torch.randn(B, n, H_q, D, generator=gen).to(dtype)
            if n == 1 and layer.rotate:
                layer.append_attend(q, k, v, cos, sin, scale=D**-0.5)
            else:
                layer.append(k, v, cos, sin)
                layer.attend(q, cos, sin, scale=D**-0.5)
            length += n
    by_key = _assert_keys_determine_specs(recorded_keys)
    names = {name for name, _ in by_key}
    assert {"cache_write_kernel", "cache_attn_kernel"} <= names, names
    assert len(by_key) >= 6  # the scenarios made several keys, not one


def test_device_length_launch_keys_determine_triton_specialization(recorded_keys):
    """The DEVICE_LEN attention launches (the static cache's, and the dynamic cache's decode step with its
    length on the device) take direct-launch keys that specialize alike, across capacities, rotations, dtypes
    and batch sizes."""
    from hf_fp8_attention import FP8StaticCacheLayer
    from hf_fp8_attention.kv_cache import FP8CacheLayer

    gen = torch.Generator().manual_seed(2)
    D = 64
    for B, H_q, H_kv, dtype, cap, hadamard in ((1, 4, 2, torch.float16, 200, None),
                                               (1, 4, 2, torch.float16, 300, None),
                                               (1, 4, 2, torch.float16, 200, False),
                                               (2, 4, 1, torch.bfloat16, 200, None)):
        for layer in (FP8StaticCacheLayer(cap, impl="triton", hadamard=hadamard),
                      FP8CacheLayer(impl="triton", hadamard=hadamard)):
            for n in (130, 1, 1, 5):
                k = torch.randn(B, H_kv, n, D, generator=gen).to(dtype)
                v = torch.randn(B, H_kv, n, D, generator=gen).to(dtype)
                q = torch.randn(B, n, H_q, D, generator=gen).to(dtype)
                layer.append_attend(q, k, v, None, None, scale=D**-0.5)
    by_key = _assert_keys_determine_specs(recorded_keys)
    attn_keys = [key for name, key in by_key if name == "cache_attn_kernel"]
    assert any(key[-1] is not None for key in attn_keys)  # device-length launches got keys (their tensor's dtype)


def test_block_quantize_launch_keys_determine_triton_specialization(recorded_keys):
    """The same for every scale per block: the q/k RoPE kernel and the single-pass kernel (its v tiles after
    the RoPE kernel, or everything), over cos batch 1 or B, RoPE or none, and packed sequences with one
    offsets tensor or two."""
    from hf_fp8_attention.options import FP8AttentionOptions
    from hf_fp8_attention.quantization import quantize_qkv_fp8, quantize_qkv_fp8_varlen

    options = FP8AttentionOptions(qk_scales="block", v_scales="block", hadamard="none")
    gen = torch.Generator().manual_seed(2)
    for B, S, rope_b in ((1, 40, 1), (2, 40, 1), (2, 40, 2), (2, 32, None), (1, 40, 1)):
        q, k, v = (torch.randn(B, S, h, 64, generator=gen).bfloat16().transpose(1, 2) for h in (4, 2, 2))
        cos, sin = (torch.randn(rope_b, S, 64, generator=gen) for _ in range(2)) if rope_b else (None, None)
        quantize_qkv_fp8(q, k, v, cos, sin, options=options)
    qp, kp, vp = (torch.randn(50, h, 64, generator=gen).bfloat16() for h in (4, 2, 2))
    cos, sin = (torch.randn(1, 50, 64, generator=gen) for _ in range(2))
    cu = torch.tensor([0, 20, 50], dtype=torch.int32)
    for cu_k in (cu, cu.clone()):
        quantize_qkv_fp8_varlen(qp, kp, vp, cu, cu_k, 30, 30, cos, sin, options=options)
    _assert_keys_determine_specs(recorded_keys)
    names = [name for name, _, _ in recorded_keys]
    # v goes with q/k in the RoPE kernel's launch (`qkv._ROPE_TILES`' last flag): the single-pass kernel runs
    # without RoPE and for the packed sequences whose q and k offsets are two tensors
    assert names.count("qk_rope_block_kernel") == 5 and names.count("qkv_block_quantize_kernel") == 2


def test_quantize_launch_keys_determine_triton_specialization(recorded_keys):
    """The quantize launch's key (exact ints, dtypes, constexpr configuration) specializes alike under one
    key, over layouts, GQA, dtypes and RoPE."""
    from hf_fp8_attention.quantization import quantize_qkv_fp8

    gen = torch.Generator().manual_seed(1)
    for B, H_q, H_kv, S, D, dtype, layout in ((1, 4, 2, 40, 64, torch.bfloat16, "bshd"),
                                              (2, 2, 2, 17, 64, torch.float16, "bhsd"),
                                              (1, 4, 2, 40, 64, torch.bfloat16, "bshd")):
        shape = lambda h: (B, S, h, D) if layout == "bshd" else (B, h, S, D)
        q, k, v = (torch.randn(*shape(h), generator=gen).to(dtype) for h in (H_q, H_kv, H_kv))
        if layout == "bshd":
            q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        quantize_qkv_fp8(q, k, v)
    by_key = _assert_keys_determine_specs(recorded_keys)
    assert len(recorded_keys) == 3 and len(by_key) == 2  # the repeated configuration found its key again
