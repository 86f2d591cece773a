"""Helpers shared by the scripts: attention specs, tables, plots.

Model resolution and loading (the embedded SmolLM2 GGUF, a HF directory or a .gguf file) are
`hf_fp8_attention.demo`'s, shared with `examples/generate.py`. The fp8 attention names come from the
package's backend registry (`hf_fp8_attention.backends.ATTN_IMPLEMENTATIONS`).
"""

from __future__ import annotations

import contextlib
import importlib.util
import math
import os
import statistics

import torch

from hf_fp8_attention.backends import ATTN_IMPLEMENTATIONS
from hf_fp8_attention.demo import PLAIN_ATTN


@contextlib.contextmanager
def environment(values: dict[str, str]):
    """Environment variables set to ``values`` inside the block, restored (or removed) after it."""
    before = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in before.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


@contextlib.contextmanager
def direct_launches(enabled: bool):
    """Inside: `hf_fp8_attention._launch.ENABLED` set to ``enabled`` (restored after): False sends every launch
    of the package's Triton and Gluon kernels through Triton's JIT (benchmarks' A/B of the direct launches)."""
    from hf_fp8_attention import _launch

    before = _launch.ENABLED
    _launch.ENABLED = enabled
    try:
        yield
    finally:
        _launch.ENABLED = before


def run_fresh_child(script: str, spec: dict, env: dict[str, str], timeout: float) -> tuple[dict | None, str | None]:
    """``python script --child JSON(spec)`` in a fresh process with an empty Triton cache (a new TRITON_CACHE_DIR;
    ``env`` on top of this process's environment, a None value removing the variable): (the child's last JSON
    line, None), or (None, why it failed: its last stderr line, its return code, or the timeout)."""
    import json
    import subprocess
    import sys
    import tempfile

    with tempfile.TemporaryDirectory(prefix="triton_cache_") as cache:
        child_env = dict(os.environ, TRITON_CACHE_DIR=cache)
        for name, value in env.items():
            if value is None:
                child_env.pop(name, None)
            else:
                child_env[name] = value
        try:
            done = subprocess.run([sys.executable, script, "--child", json.dumps(spec)], env=child_env,
                                  capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return None, f"timed out after {timeout:g} s"
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode == 0 and lines:
        return json.loads(lines[-1]), None
    return None, (done.stderr.strip().splitlines() or [f"rc {done.returncode}"])[-1]


# ------------------------------------------------------------------------------------------------------
# Attention specs: "name" or "name:key=value,key=value" -> prepare_model kwargs
# ------------------------------------------------------------------------------------------------------


def _parse_value(text: str):
    low = text.lower()
    if low in ("true", "yes", "on"):
        return True
    if low in ("false", "no", "off"):
        return False
    try:
        return int(text)
    except ValueError:
        pass
    try:
        return float(text)
    except ValueError:
        return text


def parse_attn_spec(spec: str) -> tuple[str, dict]:
    """``"fp8:hadamard=qkv,fuse_rope=false"`` -> ``("fp8", {"hadamard": "qkv", "fuse_rope": False})``.

    Values: true/false -> bool, integers and floats -> numbers, anything else a string (``none`` stays the
    string "none", which prepare_model accepts). Options are only checked by prepare_model itself.
    Raises ValueError on a malformed spec.
    """
    name, sep, rest = spec.partition(":")
    name = name.strip()
    if not name:
        raise ValueError(f"attention spec {spec!r} has no name")
    options: dict = {}
    if sep:
        if not rest.strip():
            raise ValueError(f"attention spec {spec!r}: nothing after ':' (expected key=value[,key=value])")
        for item in rest.split(","):
            key, eq, value = item.partition("=")
            key = key.strip()
            if not eq or not key.isidentifier():
                raise ValueError(f"attention spec {spec!r}: {item!r} is not key=value")
            if key in options:
                raise ValueError(f"attention spec {spec!r}: {key!r} given twice")
            options[key] = _parse_value(value.strip())
    return name, options


def check_attn_spec(spec: str, extra_names: tuple[str, ...] = ()) -> tuple[str, dict]:
    """parse_attn_spec plus a known-name check; options only on fp8 names. Raises ValueError."""
    name, options = parse_attn_spec(spec)
    known = (*PLAIN_ATTN, *ATTN_IMPLEMENTATIONS, *extra_names)
    if name not in known:
        raise ValueError(f"unknown attention {name!r} in {spec!r}; expected one of {', '.join(known)}")
    if options and name not in ATTN_IMPLEMENTATIONS:
        raise ValueError(f"{spec!r}: options (prepare_model kwargs) only apply to the fp8 attentions")
    return name, options


def apply_attention(model, name: str, options: dict | None = None) -> str:
    """Switch a loaded model to attention ``name`` (undoing any earlier prepare_model); return a description.

    fp8 names go through ``hf_fp8_attention.prepare_model(model, backend=..., **options)``, whose
    ValueError/TypeError/RuntimeError/ImportError propagate unchanged; other names are set with
    ``model.set_attn_implementation``.
    """
    import hf_fp8_attention as hfa

    hfa.unprepare_model(model)
    if name in ATTN_IMPLEMENTATIONS:
        hfa.prepare_model(model, backend=ATTN_IMPLEMENTATIONS[name], **(options or {}))
        return hfa.describe_backend(model)
    model.set_attn_implementation(name)
    if model.config._attn_implementation != name:
        raise ValueError(f"{type(model).__name__} did not switch to attn_implementation={name!r}")
    return f"{name} (no fp8)"


# ------------------------------------------------------------------------------------------------------
# Output
# ------------------------------------------------------------------------------------------------------


def versions() -> dict[str, str]:
    import transformers

    out = {"torch": torch.__version__, "transformers": transformers.__version__}
    try:
        import triton

        out["triton"] = triton.__version__
    except ImportError:
        pass
    try:
        import hf_fp8_attention

        out["hf_fp8_attention"] = hf_fp8_attention.__version__
    except ImportError:
        pass
    return out


def device_name(device: torch.device | str) -> str:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return device.type


def fmt(value, spec: str = ".3f", none: str = "-") -> str:
    """Format a number for a table cell: None -> ``none``, non-finite -> str(value)."""
    if value is None:
        return none
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return format(value, spec)


def markdown_table(headers: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def have_matplotlib() -> bool:
    return importlib.util.find_spec("matplotlib") is not None


def plot_panels(path: str, panels: dict[str, dict[str, tuple[list, list]]], *, xlabel: str, ylabel: str,
                logx: bool = True, logy: bool | tuple[str, ...] = False, title: str | None = None) -> None:
    """One subplot per panel, one line per label: ``panels[panel][label] = (xs, ys)``. Writes ``path`` (PNG).
    ``logy``: True for every panel, or the titles of the panels with a log y axis."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.5), squeeze=False)
    for ax, (panel, lines) in zip(axes[0], panels.items()):
        for label, (xs, ys) in lines.items():
            ax.plot(xs, ys, marker="o", label=label)
        if logx:
            ax.set_xscale("log", base=2)
        if logy is True or (not isinstance(logy, bool) and panel in logy):
            ax.set_yscale("log")
        ax.set_title(panel)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


GRAPH_CALLS = 20  # calls per captured graph (graph_ms)
_FLUSH: dict = {}


class GraphCaptureError(RuntimeError):
    """``fn`` ran eagerly but could not be captured in a CUDA graph."""


def cuda_kernel_times(prof) -> list[tuple[str, float]]:
    """(name, microseconds) of each CUDA kernel a finished `torch.profiler.profile` recorded (its `device_time`;
    older torch names it `cuda_time`)."""
    out = []
    for e in prof.events():
        if e.device_type != torch.autograd.DeviceType.CUDA:
            continue
        us = getattr(e, "device_time", None)
        out.append((e.name, e.cuda_time if us is None else us))
    return out


def graph_ms(fn, device, replays: int = 5) -> float:
    """GPU ms of one ``fn()`` from CUDA-graph replays: GRAPH_CALLS calls captured in one graph, each after a
    256 MB memset (L2 flushed, as do_bench does), the median replay time minus that of a graph of the
    memsets alone, over GRAPH_CALLS. No host cost: launches are replayed by the GPU. Errors of the eager
    warm-up propagate as they are; a failed capture raises GraphCaptureError with its cause, the current
    stream restored (torch leaves the capture stream current when capture_end raises)."""
    dev = torch.device(device)
    flush = _FLUSH.get(dev)
    if flush is None:
        flush = _FLUSH[dev] = torch.empty(64 * 2**20, dtype=torch.int32, device=dev)
    stream = torch.cuda.current_stream(dev)
    side = torch.cuda.Stream(dev)
    side.wait_stream(stream)
    with torch.cuda.stream(side):  # warm-up off the capture (compiles, allocator pools)
        fn()
        fn()
    stream.wait_stream(side)
    graphs = []
    for with_fn in (True, False):
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph):
                for _ in range(GRAPH_CALLS):
                    flush.zero_()
                    if with_fn:
                        fn()
        except Exception as err:
            torch.cuda.set_stream(stream)
            torch.cuda.synchronize(dev)
            raise GraphCaptureError(f"{type(err).__name__}: {err}") from err
        graphs.append(graph)

    def replay(graph) -> float:
        graph.replay()  # warm
        times = []
        for _ in range(replays):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            graph.replay()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        return statistics.median(times)

    both, alone = replay(graphs[0]), replay(graphs[1])
    del graphs
    return max(both - alone, 0.0) / GRAPH_CALLS
