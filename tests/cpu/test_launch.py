"""`_launch.DirectLauncher`: the host-time fast path of the cache's decode launches, with a stand-in for a
triton.jit function and its compiled kernel (the GPU tests run the real kernels with VERIFY on)."""

import inspect

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
