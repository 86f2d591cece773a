"""Compiling the Gluon kernel ahead (`gluon_attention.compile_ahead`, `triton.compile_ahead`, the pipeline's
`Backend.compile_ahead`): on a new shape's first call the kernel's compile starts in a worker thread beside the
quantizer's, through triton's AsyncCompileMode. What the CPU can check: the warmup carries the arguments the
launch will carry (Triton's own per-argument specialization, so the launch finds the kernel compiled), once per
shape; it stays out of the way where it cannot help; the pipeline quantizes inside it and attends after it; and,
in a child process with triton's JIT on a stand-in sm_90 driver, the real warmup compiles in the background the
kernel whose cache key the real launch looks up. The time it saves is measured on the GPU host
(scripts/first_call.py) and offline (scripts/compile_ahead_offline.py)."""

import contextlib
import dataclasses
import os
import pathlib
import subprocess
import sys

import pytest
import torch

from hf_fp8_attention import attention, backends
from hf_fp8_attention.metrics import sqnr_db
from hf_fp8_attention.options import FP8AttentionOptions
from hf_fp8_attention.quantization import QuantizedQKV
from hf_fp8_attention.quantization.qkv import V_WGMMA, _outputs

gluon_attention = pytest.importorskip("hf_fp8_attention.backends.gluon_attention")
from hf_fp8_attention.backends import triton as triton_backend  # noqa: E402

if gluon_attention.triton_problem() is not None or gluon_attention._async_compile_mode()[0] is None:
    pytest.skip("needs a triton with Gluon's warp_specialize list form and AsyncCompileMode (>= 3.6)",
                allow_module_level=True)

CPU = torch.device("cpu")
SCRIPTS = pathlib.Path(__file__).resolve().parents[2] / "scripts"


class Recorder:
    """Stands in for the persistent Gluon kernel: records its launches and warmups."""

    def __init__(self, fail_warmup=False):
        self.launches, self.warmups, self.fail_warmup = [], [], fail_warmup

    def __getitem__(self, grid):
        return lambda *args, **meta: self.launches.append((grid, args, meta))

    def warmup(self, *args, grid, **meta):
        if self.fail_warmup:
            raise RuntimeError("a compile that fails")
        self.warmups.append((grid, args, meta))


@pytest.fixture
def kernel(monkeypatch):
    monkeypatch.setattr(gluon_attention, "_AHEAD_SEEN", set())
    monkeypatch.setattr(gluon_attention, "_num_sms", lambda index: 132)
    monkeypatch.delenv(gluon_attention.COMPILE_AHEAD_ENV, raising=False)
    monkeypatch.delenv(triton_backend.KERNEL_ENV, raising=False)
    recorder = Recorder()
    monkeypatch.setattr(gluon_attention, "fp8_attn_fwd_gluon_persistent_kernel", recorder)
    return recorder


def _bundle(B, S, H_q, H_kv, D=128):
    """Empty buffers laid out as the Triton quantizer lays out a wgmma-order call's outputs: BSHD e4m3 Q/K,
    keys-contiguous V, the descales three rows of one (3, B, H_kv) block (whose rows sit at B * H_kv * 4-byte
    steps: not 16-byte aligned when B * H_kv is odd)."""
    q, k, v = _outputs(((B, S, H_q, D), (B, S, H_kv, D), (B, S, H_kv, D)), FP8AttentionOptions(), CPU, V_WGMMA)
    block = torch.ones((3, B, H_kv), dtype=torch.float32)
    return QuantizedQKV(q, k, v, block[0], block[1], block[2], v_wgmma_order=True)


def _specialization(arg):
    """Triton's own specialization of one argument (what its cache key holds)."""
    from triton._C.libtriton import native_specialize_impl
    from triton.backends.nvidia.compiler import CUDABackend

    return native_specialize_impl(CUDABackend, arg, False, True, True)


def _ahead(B, S, H_q, H_kv, causal, out_dtype=torch.bfloat16, **kw):
    return triton_backend.compile_ahead(CPU, B, S, H_q, H_kv, S, 128, is_causal=causal, scale=0.088,
                                        out_dtype=out_dtype, v_wgmma_order=kw.pop("v_wgmma_order", True))


@pytest.mark.parametrize("B,S,H_q,H_kv,causal", [(1, 256, 4, 2, True), (1, 1024, 32, 8, False), (3, 128, 6, 3, True),
                                                 (2, 4096, 32, 8, True)])
def test_warmup_specializes_as_the_launch(kernel, B, S, H_q, H_kv, causal):
    """The warmup's grid, constexprs and launch options equal the launch's, and every positional argument
    specializes alike in Triton's own terms (dtype, 16-byte alignment, ints' divisibility and 1s, descriptors'
    dtype, block and layout), the descales' alignment included: the launch then finds the compiled kernel."""
    with _ahead(B, S, H_q, H_kv, causal):
        pass
    route = triton_backend._KERNELS["gluon-pp-persistent"]
    bundle = _bundle(B, S, H_q, H_kv)
    gluon_attention.gluon_fp8_attention(bundle, is_causal=causal, scale=0.088, out_dtype=torch.bfloat16, **route)
    assert len(kernel.warmups) == 1 and len(kernel.launches) == 1
    (w_grid, w_args, w_meta), (l_grid, l_args, l_meta) = kernel.warmups[0], kernel.launches[0]
    out = l_args[3]  # the launch's own: its strides, V's row stride and the descales as the bundle has them
    assert out.shape == bundle.q.shape and l_args[7:9] == (out.stride(0), out.stride(1))
    assert l_args[2].strides == [bundle.v.stride(3), 1] and l_args[2].base is bundle.v
    assert all(a is b for a, b in zip(l_args[4:7], (bundle.q_descale, bundle.k_descale, bundle.v_descale)))
    assert w_grid == l_grid and len(w_args) == len(l_args)
    # the constexprs and options equal; the output's TMA descriptor (TMA_STORE, the default since session 28) is
    # built on the stand-in output in the warmup: it specializes alike (dtype, block, layout)
    assert {n: m for n, m in w_meta.items() if n != "desc_o"} == {n: m for n, m in l_meta.items() if n != "desc_o"}
    assert l_meta["TMA_STORE"] and _specialization(w_meta["desc_o"]) == _specialization(l_meta["desc_o"])
    assert l_meta["V_WGMMA_ORDER"] and l_meta["ROWSUM_MMA"] and l_meta["IS_CAUSAL"] is causal
    got, want = [_specialization(a) for a in w_args], [_specialization(a) for a in l_args]
    assert got == want
    aligned = [s[1] == "D" for a, s in zip(l_args, want) if isinstance(a, torch.Tensor)]  # out and the descales
    assert aligned == [True, True, (B * H_kv) % 4 == 0, (B * H_kv) % 2 == 0]


def test_once_per_shape(kernel):
    """A shape's first call warms the kernel; its repeats do not (a plain context); another shape, causal flag or
    output dtype does."""
    for causal, out_dtype, S in ((True, torch.bfloat16, 256), (True, torch.bfloat16, 256), (False, torch.bfloat16, 256),
                                 (True, torch.float16, 256), (True, torch.bfloat16, 512), (True, torch.bfloat16, 256)):
        with _ahead(1, S, 4, 2, causal, out_dtype):
            pass
    assert len(kernel.warmups) == 4
    assert [w[2]["IS_CAUSAL"] for w in kernel.warmups] == [True, False, True, True]


def test_stays_out_of_the_way(kernel, monkeypatch):
    """No warmup where it cannot help: the env switch at 0 (another value is an error), V not in wgmma order
    (another route), the Triton kernel's route, an AsyncCompileMode already active, a triton without it, an
    empty problem. A warmup that fails is dropped (the launch compiles in turn and reports it) and the body
    runs; an error in the body comes out, and the mode is left either way."""
    from triton.runtime._async_compile import AsyncCompileMode, active_mode

    monkeypatch.setenv(gluon_attention.COMPILE_AHEAD_ENV, "0")
    with _ahead(1, 256, 4, 2, True):
        pass
    monkeypatch.setenv(gluon_attention.COMPILE_AHEAD_ENV, "yes")
    with pytest.raises(ValueError, match="HF_FP8_ATTENTION_COMPILE_AHEAD='yes': expected 0 or 1"):
        _ahead(1, 256, 4, 2, True)
    monkeypatch.setenv(gluon_attention.COMPILE_AHEAD_ENV, "1")
    with _ahead(1, 256, 4, 2, True, v_wgmma_order=False):
        pass
    monkeypatch.setenv(triton_backend.KERNEL_ENV, "triton")
    with _ahead(1, 256, 4, 2, True):
        pass
    monkeypatch.delenv(triton_backend.KERNEL_ENV)
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(1) as pool, AsyncCompileMode(pool):
        with _ahead(1, 256, 4, 2, True):
            pass
    with monkeypatch.context() as m:
        m.setattr(gluon_attention, "_async_compile_mode", lambda: (None, None))
        with _ahead(1, 256, 4, 2, True):
            pass
    assert isinstance(gluon_attention.compile_ahead(CPU, (1, 0, 4, 0, 2, 128, 0), is_causal=True, scale=1.0,
                                                    out_dtype=torch.bfloat16), contextlib.nullcontext)
    assert kernel.warmups == []

    failing = Recorder(fail_warmup=True)
    monkeypatch.setattr(gluon_attention, "fp8_attn_fwd_gluon_persistent_kernel", failing)
    ran, warmups = [], gluon_attention.AHEAD_WARMUPS
    with _ahead(1, 256, 4, 2, True):
        assert active_mode.get() is not None  # the body runs inside the asynchronous compile
        ran.append(True)
    assert ran and active_mode.get() is None and gluon_attention.AHEAD_WARMUPS == warmups  # (none issued)
    monkeypatch.setattr(gluon_attention, "fp8_attn_fwd_gluon_persistent_kernel", kernel)
    with pytest.raises(KeyError, match="from the body"):
        with _ahead(1, 512, 4, 2, True):
            active_mode.get().raw_futures.append(_Never())  # a compile still running: the error does not wait
            raise KeyError("from the body")
    assert active_mode.get() is None and len(kernel.warmups) == 1


class _Never:
    """A future that never completes (as_completed on it would block): stands for a long background compile."""

    def __getattr__(self, name):
        raise AssertionError(f"the context waited for the background compile ({name})")


def test_the_pipeline_quantizes_inside_it(monkeypatch):
    """`attention.fp8_attention` enters the backend's compile_ahead (with the call's batch, lengths, heads, head
    dim, causal flag, scale and output dtype) around the quantization only, and only where the backend reads V
    in wgmma order and the Triton quantizer runs; the output is the same as without it."""
    events, seen = [], []
    real_quantize = attention.quantize

    def quantize(*args, **kwargs):
        events.append("quantize")
        return real_quantize(*args, **kwargs)

    class Ahead:
        def __init__(self, *args, **kwargs):
            seen.append((args, kwargs))

        def __enter__(self):
            events.append("enter")

        def __exit__(self, *exc):
            events.append("exit")

    reference = backends.REGISTRY["reference"]
    attend = reference.fn

    def fn(qkv, **kw):
        events.append("attend")
        return attend(qkv, **kw)

    monkeypatch.setattr(attention, "quantize", quantize)
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, 64, 32, generator=g).bfloat16()
    k, v = (torch.randn(2, 2, 64, 32, generator=g).bfloat16() for _ in range(2))
    opts = FP8AttentionOptions()

    def run(quantizer="triton"):  # (the Triton quantizer, interpreted on the CPU)
        return attention.fp8_attention(q, k, v, None, None, None, None, None, None, True, 0.125, "reference",
                                       quantizer, opts)

    plain = run()
    assert events == ["quantize"]
    events.clear()
    wgmma = dataclasses.replace(reference, v_keys_contiguous=lambda *a: True, v_wgmma_order=lambda *a, **kw: True,
                                compile_ahead=Ahead)
    wgmma.__dict__["fn"] = fn  # (the cached backend function, wrapped)
    monkeypatch.setitem(backends.REGISTRY, "reference", wgmma)
    ahead = run()
    assert events == ["enter", "quantize", "exit", "attend"]
    call = dict(is_causal=True, scale=0.125, out_dtype=torch.bfloat16, v_wgmma_order=True)
    assert seen == [((q.device, 2, 64, 4, 2, 64, 32), dict(call, q_in_kernel=False, q_rotate=False))]
    assert torch.equal(ahead, plain)
    events.clear()
    run("reference")  # another quantizer's outputs are laid out otherwise: no compile-ahead
    assert events == ["quantize", "attend"] and len(seen) == 1
    events.clear()
    monkeypatch.setitem(backends.REGISTRY, "reference", dataclasses.replace(wgmma, v_wgmma_order=lambda *a, **kw: False))
    run()
    assert events == ["quantize"] and len(seen) == 1
    # a backend whose kernel quantizes Q (the triton backend's Gluon route): the compile-ahead hears of it, the
    # quantizer leaves Q, and a backend without that kernel (here the reference) quantizes Q per head itself
    bundles = []

    def keep(qkv, **kw):
        bundles.append(qkv)
        return fn(qkv, **kw)

    q_in = dataclasses.replace(wgmma, q_in_kernel=lambda options, rope: not rope)
    q_in.__dict__["fn"] = keep
    monkeypatch.setitem(backends.REGISTRY, "reference", q_in)
    events.clear()
    left = run()
    assert events == ["enter", "quantize", "exit", "attend"]
    assert seen[-1] == ((q.device, 2, 64, 4, 2, 64, 32), dict(call, q_in_kernel=True, q_rotate=True))  # (auto: qk)
    assert bundles[-1].q_in_kernel and bundles[-1].q_rotate and torch.equal(bundles[-1].q, q.transpose(1, 2))
    # Q per head in torch against the Triton quantizer's (the rotation's sums in another order: an ulp at most)
    assert sqnr_db(left, plain) > 40.0


_REAL_COMPILE = r"""
import sys, torch, triton
sys.path.insert(0, sys.argv[1])  # scripts/: the offline script's stand-in driver (triton's JIT without a GPU)
from compile_ahead_offline import _stand_in_driver

_stand_in_driver()
from hf_fp8_attention.backends import gluon_attention as G, triton as T
from hf_fp8_attention.options import FP8AttentionOptions
from hf_fp8_attention.quantization import QuantizedQKV
from hf_fp8_attention.quantization.qkv import V_WGMMA, _outputs
G._num_sms = lambda index: 132
B, S, H, Hkv, D = 1, 256, 4, 2, 128
real = G.fp8_attn_fwd_gluon_persistent_kernel
with T.compile_ahead(torch.device("cpu"), B, S, H, Hkv, S, D, is_causal=True, scale=0.088,
                     out_dtype=torch.bfloat16, v_wgmma_order=True):
    from triton.runtime._async_compile import active_mode
    pending = list(active_mode.get().future_kernels.values())
    assert len(pending) == 1 and not pending[0].future.done(), "the compile runs in the background"
# (triton 3.6 files the kernel when the mode ends, later ones file the future at once)
compiled = [k.result() if hasattr(k, "result") else k for k in real.device_caches[0][0].values()]
launched = []
class Recorder:
    def __getitem__(self, grid): return lambda *a, **kw: launched.append((grid, a, kw))
G.fp8_attn_fwd_gluon_persistent_kernel = Recorder()
q, k, v = _outputs(((B, S, H, D), (B, S, Hkv, D), (B, S, Hkv, D)), FP8AttentionOptions(), "cpu", V_WGMMA)
block = torch.ones((3, B, Hkv))
G.gluon_fp8_attention(QuantizedQKV(q, k, v, *block, v_wgmma_order=True), is_causal=True, scale=0.088,
                      out_dtype=torch.bfloat16, **T._KERNELS["gluon-pp-persistent"])
grid, args, meta = launched[0]
misses = []  # the JIT's compile requests from here on (the hook declines them: nothing compiles)
triton.knobs.runtime.jit_cache_hook = lambda *a, **kw: misses.append(kw.get("key")) or True
found = real.warmup(*args, grid=grid, **meta)  # the launch's own arguments, through the JIT's lookup
found = found.result() if hasattr(found, "result") else found
print("compiled", len(compiled), "misses", len(misses), "same", found is compiled[0],
      "cubin", len(compiled[0].asm["cubin"]))
"""


def test_the_real_warmup_compiles_what_the_launch_looks_up():
    """A child process without TRITON_INTERPRET, triton's JIT on a stand-in sm_90 driver: inside compile_ahead the
    Gluon kernel's compile is pending in the background; after it the JIT's cache holds one compiled kernel (a
    cubin), and the JIT looking up gluon_fp8_attention's own launch arguments finds that kernel without asking to
    compile anything (its jit_cache_hook, which would decline the compile, is never called)."""
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", _REAL_COMPILE, str(SCRIPTS)], env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    words = done.stdout.split()
    assert words[:6] == ["compiled", "1", "misses", "0", "same", "True"] and int(words[7]) > 10000, done.stdout


def test_offline_script_times_both_orders(capsys):
    """scripts/compile_ahead_offline.py (real compiles for sm_90 on the CPU, each run in a fresh process with an
    empty Triton cache): a row per shape with the quantizer's and the Gluon kernel's compile times, serial
    against ahead; each child checks that the Gluon kernel compiled exactly once through one warmup. Bad
    arguments are a usage error."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("hfa_scripts_compile_ahead_offline",
                                                  SCRIPTS / "compile_ahead_offline.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    assert script.main(["--seqlens", "256", "--heads", "4/2", "--rounds", "1"]) == 0
    text = capsys.readouterr().out
    assert "S=256 serial:" in text and "S=256 ahead:" in text and "stand-in driver" in text
    row = [line for line in text.splitlines() if line.startswith("| 256 |")]
    assert len(row) == 1
    cells = [c.strip() for c in row[0].strip("|").split("|")]
    quantizer, gluon, serial, ahead = (float(c) for c in cells[1:5])
    assert quantizer > 0 and gluon > 0 and ahead > 0 and serial > quantizer
    for bad in (["--heads", "4/3"], ["--seqlens", "100"], ["--head-dim", "64"], ["--rounds", "0"]):
        with pytest.raises(SystemExit):
            script.parse_args(bad)


@pytest.mark.parametrize("B,S,out_dtype,tma", [(1, 1040, torch.bfloat16, True), (2, 1024, torch.bfloat16, True),
                                               (2, 1040, torch.bfloat16, False), (1, 256, torch.float32, True)])
def test_tma_store_launch(kernel, monkeypatch, B, S, out_dtype, tma):
    """The default persistent route (TMA stores since session 28; route gluon-pp-persistent-plain-store keeps the
    plain stores): the launcher passes TMA_STORE with a descriptor over the output as (B * S_q, H_q * D), one
    consumer's rows (64) per block, in the output's dtype, where no tile's rows run into the next sequence (B = 1:
    the unit clips at the end; or S_q a multiple of 128); else the plain stores (no descriptor). The route reads V
    in wgmma order, and compile-ahead warms the same build."""
    route = triton_backend._KERNELS["gluon-pp-persistent"]
    assert route == dict(triton_backend._KERNELS["gluon-pp-persistent-plain-store"], tma_store=True)
    assert triton_backend._AUTO_KERNEL is route
    monkeypatch.setenv(triton_backend.KERNEL_ENV, "auto")
    monkeypatch.setattr(triton_backend, "_hopper_device", lambda d: True)
    assert triton_backend.reads_v_wgmma_order(torch.device("cuda", 0), 4096, 4, 2, 4096, 128, is_causal=True,
                                              options=FP8AttentionOptions(hadamard="none"), varlen=False)
    with triton_backend.compile_ahead(CPU, B, S, 4, 2, S, 128, is_causal=True, scale=0.088, out_dtype=out_dtype,
                                      v_wgmma_order=True):
        pass
    gluon_attention.gluon_fp8_attention(_bundle(B, S, 4, 2), is_causal=True, scale=0.088, out_dtype=out_dtype,
                                        **route)
    (_, w_args, w_meta), (_, l_args, l_meta) = kernel.warmups[0], kernel.launches[0]
    assert l_meta.get("TMA_STORE", False) is tma and ("desc_o" in l_meta) is tma
    assert [_specialization(a) for a in (*w_args, *w_meta.values())] == \
        [_specialization(a) for a in (*l_args, *l_meta.values())]
    if tma:
        desc, out = l_meta["desc_o"], l_args[3]
        assert desc.base is out and desc.shape == [B * S, 4 * 128] and desc.block_shape == [64, 128]
        assert desc.strides == [4 * 128, 1] and desc.layout.element_bitwidth == out.element_size() * 8
    with pytest.raises(ValueError, match="tma_store is built into the persistent kernel only"):
        gluon_attention.gluon_fp8_attention(_bundle(B, S, 4, 2), is_causal=True, scale=0.088, out_dtype=out_dtype,
                                            config=(128, 128, 4, 2), consumers=2, tma_store=True)


def test_one_compile_serves_every_causal_length(monkeypatch):
    """The persistent kernel takes its tile counts and order flag unspecialized (do_not_specialize): over causal
    B=1 GQA 32/8 prefills of 2k..64k keys (whole 16s: the route's), every launch specializes alike in Triton's
    terms (each argument as the JIT's binder treats it), so one compile serves them all. With the three
    specialized, n_m % 16 and heads_fastest (true up to the L2 bound) split them into several compiles."""
    from triton._C.libtriton import native_specialize_impl
    from triton.backends.nvidia.compiler import CUDABackend

    monkeypatch.setattr(gluon_attention, "_num_sms", lambda index: 132)
    kernel = gluon_attention.fp8_attn_fwd_gluon_persistent_kernel
    params = {p.name: p for p in kernel.params}
    assert all(params[n].do_not_specialize for n in ("n_tiles", "n_m", "heads_fastest"))
    route = triton_backend._KERNELS["gluon-pp-persistent"]
    codes = tuple(torch.empty(16, dtype=torch.float8_e4m3fn) for _ in range(3))
    out, descales = torch.empty(1, dtype=torch.bfloat16), tuple(torch.empty(3, 1, 8))

    def spec(S, unspecialized=True):
        _, _, args, meta = gluon_attention._launch_arguments(codes, out, descales, (1, S, 32, S, 8, 128, S),
                                                             is_causal=True, scale=0.088, v_wgmma_order=True, **route)
        names = [p.name for p in kernel.params][:len(args)]
        keep = lambda n: not (unspecialized and params[n].do_not_specialize)  # noqa: E731
        return (tuple(native_specialize_impl(CUDABackend, a, False, keep(n), True) for n, a in zip(names, args)),
                # (the output's TMA descriptor, a keyword: its dtype, block and layout, as for the others)
                tuple(sorted((k, repr(native_specialize_impl(CUDABackend, v, False, True, True) if k == "desc_o"
                                      else v)) for k, v in meta.items())))

    lengths = list(range(2048, 65536 + 1, 16 * 37)) + [2048 + 16, 16384, 16384 + 16, 65536]
    assert len({spec(S) for S in lengths}) == 1
    assert len({spec(S, unspecialized=False) for S in lengths}) >= 3


# --- the direct launch (session 28): a repeat of a launch's specialization skips the JIT's dispatch -------------

_PERSISTENT = gluon_attention.fp8_attn_fwd_gluon_persistent_kernel  # (the real one: the fixtures replace it)


def _launch_spec(args, meta):
    """Triton's specialization of a persistent launch's positional and keyword arguments as its JIT computes it
    (the ints marked do_not_specialize by their type only; the output descriptor by its dtype, block and
    layout; constexprs and options by value)."""
    from triton._C.libtriton import native_specialize_impl
    from triton.backends.nvidia.compiler import CUDABackend

    params = _PERSISTENT.params[:len(args)]
    return (tuple(native_specialize_impl(CUDABackend, a, False, not p.do_not_specialize, True)
                  for p, a in zip(params, args)),
            tuple((n, _specialization(m) if n == "desc_o" else m) for n, m in sorted(meta.items())))


class Launches(list):
    """`attend`'s launches as on a GPU: (how, kernel, key, args, meta) each, how "jit" (`_launch.launch`, then the
    recorder kernel) or "direct" (`_launch.try_launch`, which launches where ``direct_applies``)."""

    direct_applies = True


@pytest.fixture
def keyed(kernel, monkeypatch):
    from hf_fp8_attention import _launch

    seen = Launches()

    def launch(fn, key, grid, args, meta):
        seen.append(("jit", fn, key, args, meta))
        return fn[grid](*args, **meta)

    def try_launch(fn, key, grid, args, meta):
        if not seen.direct_applies:
            return None
        seen.append(("direct", fn, key, args, meta))
        return "compiled kernel"

    monkeypatch.setattr(_launch, "wanted", lambda t: True)
    monkeypatch.setattr(_launch, "launch", launch)
    monkeypatch.setattr(_launch, "try_launch", try_launch)
    monkeypatch.setattr(_launch, "VERIFY", False)
    return seen


def _attend(bundle, causal=True, out_dtype=torch.bfloat16, route="gluon-pp-persistent", scale=0.088):
    return gluon_attention.attend(bundle, is_causal=causal, scale=scale, out_dtype=out_dtype,
                                  v_wgmma_order=bundle.v_wgmma_order, **triton_backend._KERNELS[route])


def _separate(b, dtype=torch.float32):
    """The bundle with each descale its own (16-byte aligned) tensor of ``dtype``."""
    return dataclasses.replace(b, **{f"{n}_descale": torch.ones(getattr(b, f"{n}_descale").shape, dtype=dtype)
                                     for n in "qkv"})


def test_direct_launch_keys_determine_the_specialization(keyed):
    """`attend`'s direct-launch key (`_launch`'s contract: one key, one specialization) holds what the Gluon
    launch specializes on and lets the rest vary: over causal or not, output dtypes, both store routes, batch
    with and without TMA stores, descales at other 16-byte alignments or of another dtype, every key maps to one
    specialization in Triton's own terms; lengths and scales within one class of Triton's int specialization
    (B = 1, whole 16s) share one key, so prompts of new lengths launch directly."""
    cases = [(_bundle(1, 256, 4, 2), {}), (_bundle(1, 256, 4, 2), dict(causal=False)),
             (_bundle(1, 256, 4, 2), dict(out_dtype=torch.float32)), (_bundle(1, 512, 4, 2), {}),
             (_bundle(1, 1040, 4, 2), dict(scale=0.5)), (_bundle(3, 128, 6, 3), {}), (_bundle(2, 1040, 4, 2), {}),
             (_bundle(2, 1024, 4, 2), {}), (_bundle(1, 256, 4, 2), dict(route="gluon-pp-persistent-plain-store")),
             (_separate(_bundle(1, 256, 4, 2)), {}), (_separate(_bundle(1, 256, 4, 2), torch.bfloat16), {}),
             (_bundle(1, 256, 4, 2), {})]
    for bundle, kw in cases:
        _attend(bundle, **kw)
    assert [how for how, *_ in keyed] == ["jit"] * len(cases)  # (no plans: each goes to `_launch.launch`)
    by_key = {}
    for _, _, key, args, meta in keyed:
        assert key is not None
        by_key.setdefault(key, set()).add(_launch_spec(args, meta))
    assert all(len(specs) == 1 for specs in by_key.values()), by_key
    keys = [key for _, _, key, _, _ in keyed]
    assert keys[0] == keys[3] == keys[4] == keys[11]  # 256, 512 and 1040 keys at B = 1; another scale
    assert keys[9] != keys[10] and keys[9] != keys[0]  # the descales' dtype; their alignment
    # 8 keys: the separate float32 descales (all aligned) share the B = 2 x 1024 call's (its block's rows fall on
    # 16-byte steps): the same classes of ints, TMA stores, alignments and dtypes
    assert len(by_key) == 8 and keys[9] == keys[7]
    tma = [("desc_o" in meta) for _, _, _, _, meta in keyed]
    assert tma == [True, True, True, True, True, True, False, True, False, True, True, True]


def _descriptors(args, meta):
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    return [x for x in (*args, *meta.values()) if isinstance(x, (TensorDescriptor, gluon_attention._LaunchDesc))]


def test_direct_launch_takes_plain_descriptors_once_the_key_is_known(keyed, monkeypatch):
    """The first launch of a key goes to the JIT with Triton's TensorDescriptors (its binder specializes them);
    once `_launch` holds the key's plan, a repeat goes to the direct launch with `_LaunchDesc` records carrying
    the fields the compiled launcher reads (base, shape, strides, padding, round_f32_to_tf32) and otherwise
    the same arguments; with VERIFY on (the GPU tests) the binder runs again, so the real descriptors go; and
    where the direct launch does not apply after all (a launch hook set, another current device, the plan
    dropped: `try_launch` None) the call goes to the JIT with real descriptors, never with the records."""
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    from hf_fp8_attention import _launch

    bundle = _bundle(1, 256, 4, 2)
    _attend(bundle)
    _, fn, key, first_args, first_meta = keyed[-1]
    _launch.direct(fn).plans[key] = "plan"  # as DirectLauncher records it after the JIT's launch
    _attend(bundle)
    keyed.direct_applies = False
    _attend(bundle)
    keyed.direct_applies = True
    monkeypatch.setattr(_launch, "VERIFY", True)
    _attend(bundle)
    assert [how for how, *_ in keyed] == ["jit", "direct", "jit", "jit"]
    real, light = _descriptors(first_args, first_meta), _descriptors(*keyed[1][3:])
    assert len(real) == len(light) == 4 and all(isinstance(d, TensorDescriptor) for d in real)
    assert all(type(d) is gluon_attention._LaunchDesc for d in light)
    for launch in keyed[2:]:  # passed over, and VERIFY
        assert all(isinstance(d, TensorDescriptor) for d in _descriptors(*launch[3:]))
    for r, d in zip(real, light):
        assert all(getattr(d, f) == getattr(r, f) for f in ("shape", "strides", "padding", "round_f32_to_tf32"))
    args, meta = keyed[1][3:]
    # Q, K, V's descriptors over the bundle's codes, the output's over each call's own output
    assert [d.base is b for d, b in zip(light, (bundle.q, bundle.k, bundle.v, args[3]))] == [True] * 4
    kinds = (TensorDescriptor, gluon_attention._LaunchDesc, torch.Tensor)
    assert [x for x in args if not isinstance(x, kinds)] == [x for x in first_args if not isinstance(x, kinds)]
    assert {n: m for n, m in meta.items() if n != "desc_o"} == {n: m for n, m in first_meta.items() if n != "desc_o"}


def test_a_plan_the_direct_path_passes_over_takes_the_jit(kernel, monkeypatch):
    """`_launch.DirectLauncher.try_direct` itself: with a plan recorded for the key, a launch hook set (a
    profiler) makes `attend` launch through the JIT (the recorder kernel) with real descriptors; without the
    hook the plan's compiled kernel runs with the records."""
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    from hf_fp8_attention import _launch

    class Hooks:
        launch_enter_hook = None
        launch_exit_hook = None

    class Compiled:
        function = packed_metadata = None
        runs = []

        def run(self, *values):
            self.runs.append(values)

    hooks = Hooks()
    monkeypatch.setattr(_launch, "_TRITON", (hooks, lambda device: "stream", True))
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(_launch, "wanted", lambda t: True)
    monkeypatch.setattr(_launch, "ENABLED", True)
    monkeypatch.setattr(_launch, "VERIFY", False)
    bundle = _bundle(1, 256, 4, 2)
    _attend(bundle)  # the JIT (the recorder returns no compiled kernel, so no plan): record one by hand
    launcher = _launch.direct(kernel)
    key = gluon_attention._direct_key((1, 256, 4, 256, 2, 128, bundle.v.stride(3)),
                                      (bundle.q_descale, bundle.k_descale, bundle.v_descale),
                                      torch.empty(1, dtype=torch.bfloat16), True,
                                      dict(triton_backend._KERNELS["gluon-pp-persistent"], v_wgmma_order=True,
                                           heads_fastest=None), bundle.q.dtype)
    launcher.plans[key] = (Compiled(), ("desc_o",), None, 0)  # (kernel, the parameters after the positionals,
    # spec, device): the tail is "desc_o" only here, which the call passes
    hooks.launch_enter_hook = lambda *a: None
    _attend(bundle)
    assert len(kernel.launches) == 2 and not Compiled.runs
    assert isinstance(kernel.launches[1][2]["desc_o"], TensorDescriptor)
    hooks.launch_enter_hook = None
    _attend(bundle)
    assert len(kernel.launches) == 2 and len(Compiled.runs) == 1
    assert isinstance(Compiled.runs[0][-1], gluon_attention._LaunchDesc)  # desc_o, the tail's one name here


@pytest.mark.parametrize("out_dtype", triton_backend._OUT_DTYPES)
def test_every_route_passes_the_launchers_checks(kernel, monkeypatch, out_dtype):
    """The triton backend calls `attend`, which skips `gluon_fp8_attention`'s checks of the route's arguments:
    every route of `_KERNELS` passes them, at every output dtype the backend writes and both head dims."""
    monkeypatch.setattr(gluon_attention, "fp8_attn_fwd_gluon_kernel", kernel)
    routes = {name: r for name, r in triton_backend._KERNELS.items() if isinstance(r, dict)}
    assert {"gluon-pp-persistent", "gluon-pp-persistent-plain-store", "gluon"} <= set(routes)
    for D in gluon_attention.GLUON_HEAD_DIMS:
        for name, route in routes.items():
            gluon_attention.gluon_fp8_attention(_bundle(1, 256, 4, 2, D), is_causal=True, scale=0.088,
                                                out_dtype=out_dtype, **route)
    assert len(kernel.launches) == len(routes) * len(gluon_attention.GLUON_HEAD_DIMS)


@pytest.mark.parametrize("route_name,rotate,dtype", [("gluon-pp-persistent", True, torch.bfloat16),
                                                     ("gluon-pp-persistent", False, torch.float16),
                                                     ("gluon-pp-persistent-q2", True, torch.bfloat16)])
def test_q_in_kernel_warmup_specializes_as_the_launch(kernel, monkeypatch, route_name, rotate, dtype):
    """A bundle that leaves Q to the kernel (`QuantizedQKV.q_in_kernel`, session 29): the compile-ahead warmup (told
    so by the pipeline) carries the launch's constexprs (Q_IN_KERNEL, Q_ROTATE, Q_BUFFERS) and its arguments
    specialize alike, Q's descriptor a bf16/fp16 one; the direct-launch key tells the Q dtype and the rotation
    apart."""
    monkeypatch.setenv(triton_backend.KERNEL_ENV, route_name)
    B, S, H_q, H_kv = 1, 1024, 8, 2
    with triton_backend.compile_ahead(CPU, B, S, H_q, H_kv, S, 128, is_causal=True, scale=0.088, out_dtype=dtype,
                                      v_wgmma_order=True, q_in_kernel=True, q_rotate=rotate):
        pass
    codes = _bundle(B, S, H_q, H_kv)
    bundle = dataclasses.replace(codes, q=torch.zeros((B, S, H_q, 128), dtype=dtype), q_in_kernel=True,
                                 q_rotate=rotate)
    route = triton_backend._KERNELS[route_name]
    gluon_attention.attend(bundle, is_causal=True, scale=0.088, out_dtype=dtype, v_wgmma_order=True, **route)
    assert len(kernel.warmups) == 1 and len(kernel.launches) == 1
    (w_grid, w_args, w_meta), (l_grid, l_args, l_meta) = kernel.warmups[0], kernel.launches[0]
    assert l_meta["Q_IN_KERNEL"] and l_meta["Q_ROTATE"] is rotate
    assert l_meta["Q_BUFFERS"] == route.get("q_buffers", 1)
    assert {n: m for n, m in w_meta.items() if n != "desc_o"} == {n: m for n, m in l_meta.items() if n != "desc_o"}
    assert w_grid == l_grid and [_specialization(a) for a in w_args] == [_specialization(a) for a in l_args]
    want = "bf16" if dtype == torch.bfloat16 else "fp16"
    assert l_args[0].base is bundle.q and _specialization(l_args[0])[0].startswith(f"tensordesc<{want}["), \
        _specialization(l_args[0])
    keys = [gluon_attention._direct_key((B, S, H_q, S, H_kv, 128, S), (codes.q_descale,) * 3, l_args[3], True,
                                        dict(route, v_wgmma_order=True, q_in_kernel=True, q_rotate=r), t)
            for r, t in ((rotate, dtype), (not rotate, dtype), (rotate, torch.float8_e4m3fn))]
    assert len(set(keys)) == 3


@pytest.mark.parametrize("emu", [1, 2, 4])
def test_exp2_route_reaches_the_kernel_and_its_key(kernel, monkeypatch, emu):
    """Routes gluon-pp-persistent-exp2-k (session 30): the launch carries EXP2_EMU=k and the compile-ahead warmup
    the same constexprs and argument specializations; the default route's launch has no EXP2_EMU (its build, key
    and warmup as before), and the two routes' direct-launch keys differ."""
    B, S, H_q, H_kv = 1, 1024, 8, 2
    name = f"gluon-pp-persistent-exp2-{emu}"
    monkeypatch.setenv(triton_backend.KERNEL_ENV, name)
    with triton_backend.compile_ahead(CPU, B, S, H_q, H_kv, S, 128, is_causal=True, scale=0.088,
                                      out_dtype=torch.bfloat16, v_wgmma_order=True):
        pass
    bundle = _bundle(B, S, H_q, H_kv)
    for route_name in (name, "gluon-pp-persistent"):
        gluon_attention.attend(bundle, is_causal=True, scale=0.088, out_dtype=torch.bfloat16, v_wgmma_order=True,
                               **triton_backend._KERNELS[route_name])
    assert len(kernel.warmups) == 1 and len(kernel.launches) == 2
    (w_grid, w_args, w_meta), (l_grid, l_args, l_meta) = kernel.warmups[0], kernel.launches[0]
    assert l_meta["EXP2_EMU"] == emu and "EXP2_EMU" not in kernel.launches[1][2]
    assert {n: m for n, m in w_meta.items() if n != "desc_o"} == {n: m for n, m in l_meta.items() if n != "desc_o"}
    assert w_grid == l_grid and [_specialization(a) for a in w_args] == [_specialization(a) for a in l_args]
    dims, descales = (B, S, H_q, S, H_kv, 128, S), (bundle.q_descale,) * 3
    keys = [gluon_attention._direct_key(dims, descales, l_args[3], True,
                                        dict(triton_backend._KERNELS[r], v_wgmma_order=True), bundle.q.dtype)
            for r in (name, "gluon-pp-persistent")]
    assert keys[0] != keys[1]
