"""Direct launches of compiled Triton kernels: the host-time fast path of the FP8 cache's decode step, the
quantizer's launch and (since session 28) the Gluon attention kernel's.

``fn[grid](*args, **kwargs)`` goes through Triton's JIT dispatch on every call: it binds the arguments,
computes the specialization of every one of them (dtype and 16-byte alignment of each tensor; for each int
that is not ``do_not_specialize``, whether it is 1 or a multiple of 16, and its width), builds the compiled
kernel's cache key from it, looks the kernel up, then calls its launcher. On the lent H200's host that took
41-42 us per launch of the cache kernels (46-50 arguments) against 10-11 us for the compiled kernel's own
launcher called with the same arguments (session 11, ``docs/results/launch_cost_h200_s11.log``): about
75 us of a decode step's ~260.

`DirectLauncher` keeps, per caller-supplied key, the kernel that the JIT compiled (or found) for the first
call with that key, and launches later calls with the same key through that kernel's launcher directly.
**The key is the caller's promise** that every call with it gets the same specialization: it must hold the
constexprs, the dtypes, the exact values of the ints Triton specializes (strides, head counts), which
arguments are None, the device, and whether every pointer is 16-byte aligned (`aligned`). Only ints marked
``do_not_specialize`` in the kernel (lengths, split sizes) may vary freely under one key (and stay below 2**31:
Triton types wider ints as int64). With ``VERIFY`` on (the GPU tests turn it on), every direct launch also
runs the JIT's binder and checks that its specialization equals the one recorded with the key, raising
otherwise (the specialization and the compile options).

The fast path is used only with Triton's launch hooks unset or empty (profilers such as proton set them)
and falls back to the JIT for everything else: a first call, a None key, a kernel whose launch returned no compiled
kernel, a kernel with pre-run hooks, a current CUDA device other than the key's first call's, a Triton other
than 3.6 and 3.9 (the versions whose JIT and launcher were read: `kernel.run(grid, stream, function, packed
metadata, launch metadata, hooks, *all parameters)`; 3.6 measured). ``ENABLED = False`` turns it off
(benchmarks compare both).
"""

from __future__ import annotations

import os

import torch

ENABLED = True
VERIFY = False
_INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"  # read when the kernels are decorated, as Triton does
_MAX_PLANS = 512  # per kernel; a bound, not a working set (one per decode geometry and configuration)
_READ = ((3, 6), (3, 9))  # the Triton versions whose JIT run() and launcher were read for this
_TRITON = None  # (knobs.runtime, driver's get_current_stream, whether this Triton's launcher is the one read)


def _triton():
    global _TRITON
    if _TRITON is None:
        import triton
        from triton import knobs
        from triton.runtime import driver

        version = tuple(int(x) for x in triton.__version__.split(".")[:2])
        _TRITON = (knobs.runtime, driver.active.get_current_stream, version in _READ)
    return _TRITON


def _unhooked(hook) -> bool:
    """No launch hook to call: None, or an empty `knobs.HookChain` (what Triton 3.6 holds by default; the JIT
    hands the chain to the launcher, which calls it: nothing runs when it is empty)."""
    return hook is None or (type(hook).__name__ == "HookChain" and not hook.calls)


def wanted(t: torch.Tensor) -> bool:
    """Whether a launch for ``t``'s device builds a key at all: direct launches on, a CUDA tensor, not the
    interpreter (whose kernels are not compiled). The call sites' one gate (tests replace it to check their
    keys on the CPU: tests/cpu/test_launch.py)."""
    return ENABLED and t.is_cuda and not _INTERPRETING


def aligned(*tensors) -> bool:
    """Whether every tensor's data pointer is a multiple of 16 bytes (Triton specializes pointers on it).
    One OR of the pointers: a key holds this single bit, and a call with a misaligned pointer (a view at an
    odd offset) takes the JIT instead (`DirectLauncher.__call__` with key None)."""
    acc = 0
    for t in tensors:
        acc |= t.data_ptr()
    return not acc & 15


class DirectLauncher:
    """Launches ``fn`` (a ``triton.jit`` function) for ``grid`` with positional ``args`` (the kernel's first
    parameters, in order) and keyword ``kwargs`` (any later ones, constexprs and launch options included):
    through the JIT the first time a key is seen, then through the compiled kernel's launcher."""

    __slots__ = ("fn", "plans", "_names", "_defaults")

    def __init__(self, fn):
        self.fn = fn
        self.plans: dict = {}
        self._names = None
        self._defaults = None

    def _layout(self):
        if self._names is None:
            params = self.fn.params
            self._names = tuple(p.name for p in params)
            self._defaults = {p.name: p.default for p in params if p.has_default}
        return self._names, self._defaults

    def try_direct(self, key, grid, args: tuple, kwargs: dict):
        """The direct launch alone: the compiled kernel when ``key``'s plan exists and the direct path applies
        (no launch hooks, no pre-run hooks, the plan's device current), else None without launching. For a
        caller whose arguments only the compiled launcher can take (the Gluon kernel's plain descriptor
        records, `gluon_attention._LaunchDesc`): on None it builds the JIT's arguments and calls the launcher."""
        plan = self.plans.get(key) if key is not None else None
        if plan is None:
            return None
        hooks, stream, _ = _triton()
        kernel, tail, spec, device = plan
        if (not _unhooked(hooks.launch_enter_hook) or not _unhooked(hooks.launch_exit_hook)
                or getattr(self.fn, "pre_run_hooks", None) or torch.cuda.current_device() != device):
            return None
        defaults = self._defaults
        if VERIFY:
            self._verify(args, kwargs, spec, device)
        g = (*grid, 1, 1)
        kernel.run(g[0], g[1], g[2], stream(device), kernel.function, kernel.packed_metadata, None, None,
                   None, *args, *[kwargs[n] if n in kwargs else defaults[n] for n in tail])
        return kernel

    def __call__(self, key, grid, args: tuple, kwargs: dict):
        kernel = self.try_direct(key, grid, args, kwargs)
        if kernel is not None:
            return kernel
        plan = self.plans.get(key) if key is not None else None
        kernel = self.fn[grid](*args, **kwargs)
        if (key is not None and plan is None and _triton()[2] and not hasattr(kernel, "result")
                and hasattr(kernel, "run")):  # (a plan that was passed over above stays: not replaced)
            names, _ = self._layout()
            if len(self.plans) >= _MAX_PLANS:
                self.plans.clear()
            device = torch.cuda.current_device()
            self.plans[key] = (kernel, names[len(args):], self._spec(args, kwargs, device), device)
        return kernel

    def _spec(self, args, kwargs, device):
        """The JIT binder's specialization of these arguments and its compile options (what selects the
        compiled kernel)."""
        binder = self.fn.device_caches[device][4]
        return binder(*args, **kwargs)[1:]

    def _verify(self, args, kwargs, spec, device):
        now = self._spec(args, kwargs, device)
        if now != spec:
            raise RuntimeError(f"{self.fn.__name__}: a direct launch's arguments specialize differently from the "
                               f"call that made its key (a key that misses something): {spec} vs {now}")


def direct(fn) -> DirectLauncher:
    """The `DirectLauncher` of a triton.jit function, one per function (kept on it)."""
    launcher = getattr(fn, "_hf_fp8_direct", None)
    if launcher is None or launcher.fn is not fn:  # (a wrapper forwarding attributes to fn gets its own)
        launcher = DirectLauncher(fn)
        fn._hf_fp8_direct = launcher
    return launcher


def try_launch(fn, key, grid, args: tuple, kwargs: dict):
    """The direct launch only (`DirectLauncher.try_direct`): the compiled kernel, or None (nothing launched)
    where ``key`` has no plan, direct launches are off, or the direct path does not apply now."""
    if not ENABLED or key is None:
        return None
    return direct(fn).try_direct(key, grid, args, kwargs)


def int_class(x: int) -> tuple:
    """What Triton's JIT specializes of a specialized int argument (triton 3.6 and 3.9): whether it is 1,
    whether it is a multiple of 16, and its type (i32, i64 or u64 by range). A key may hold this instead of the
    value where the value itself is free to vary (tests/cpu/test_compile_ahead.py checks a key built so against
    Triton's own specialization)."""
    return x == 1, x % 16 == 0, -(2**31) <= x < 2**31, x < 2**63


def launch(fn, key, grid, args: tuple, kwargs: dict):
    """``fn[grid](*args, **kwargs)``, directly when ``ENABLED`` and ``key`` was seen (see `DirectLauncher`);
    ``key`` None always takes the JIT."""
    if not ENABLED:
        return fn[grid](*args, **kwargs)
    return direct(fn)(key, grid, args, kwargs)
