"""scripts/: argument handling of eval_perplexity, benchmark_model, bench_sdpa and accuracy_report, plus tiny
CPU runs; bench_quantize's byte counts and a dry run of its --modes / --configs loops.

The end-to-end perplexity run uses a tiny random Llama and a WordLevel tokenizer built offline in a tmp
dir (as tests/cpu/test_generate_example.py does); benchmark_model runs its --tiny config on CPU.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest
import torch
from tiny_models import save_tiny_llama

from hf_fp8_attention import demo
from hf_fp8_attention.backends import ATTN_IMPLEMENTATIONS

SCRIPTS = Path(__file__).resolve().parents[2] / "scripts"
no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU error path")


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"hfa_scripts_{name}", SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


ppl = _load("eval_perplexity")
bench_model = _load("benchmark_model")
bench_sdpa = _load("bench_sdpa")
acc = _load("accuracy_report")
bench_quantize = _load("bench_quantize")
common = sys.modules["_common"]


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def _expect_usage_error(parse, argv, capsys, match: str | None = None):
    with pytest.raises(SystemExit) as exc:
        parse(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "error" in err
    if match:
        assert match in err
    return err


# ------------------------------------------------------------------------------------------------------
# _common
# ------------------------------------------------------------------------------------------------------


def test_parse_attn_spec():
    assert common.parse_attn_spec("sdpa") == ("sdpa", {})
    assert common.parse_attn_spec("fp8:hadamard=qkv") == ("fp8", {"hadamard": "qkv"})
    assert common.parse_attn_spec("fp8_fa3:hadamard=none,fuse_rope=false,n=3,x=0.5") == (
        "fp8_fa3",
        {"hadamard": "none", "fuse_rope": False, "n": 3, "x": 0.5},
    )
    for bad in ("", ":a=b", "fp8:", "fp8:hadamard", "fp8:a=1,a=2", "fp8:1x=2"):
        with pytest.raises(ValueError):
            common.parse_attn_spec(bad)
    with pytest.raises(ValueError, match="unknown attention"):
        common.check_attn_spec("flash_attention_9")
    with pytest.raises(ValueError, match="only apply to the fp8"):
        common.check_attn_spec("sdpa:hadamard=qkv")
    assert common.check_attn_spec("fa3_bf16", extra_names=("fa3_bf16",)) == ("fa3_bf16", {})


def test_attn_names_from_the_registry():
    """Every attention the package registers (fp8_triton included) is a known --attn/--impls name."""
    assert "fp8_triton" in ATTN_IMPLEMENTATIONS
    for name in ATTN_IMPLEMENTATIONS:
        assert common.check_attn_spec(f"{name}:hadamard=qkv") == (name, {"hadamard": "qkv"})
    assert not hasattr(common, "FP8_ATTN") and not hasattr(common, "fp8_attn_names")


# Ways of importing a file by its path instead of as a module of an installed package.
_PATH_IMPORTS = {"spec_from_file_location", "SourceFileLoader", "run_path", "load_source", "module_from_spec"}


def _docstrings(tree: ast.AST) -> set[int]:
    ids = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                ids.add(id(first.value))
    return ids


@pytest.mark.parametrize("path", sorted(SCRIPTS.glob("*.py")), ids=lambda p: p.name)
def test_scripts_do_not_load_the_example(path):
    """No script reaches into examples/ (file loading, sys.path, `import generate`): what the scripts and
    the example share lives in hf_fp8_attention.demo."""
    text = path.read_text()
    tree = ast.parse(text)
    docstrings = _docstrings(tree)
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute):
            assert node.attr not in _PATH_IMPORTS, f"{path.name}:{node.lineno} uses {node.attr}"
        elif isinstance(node, ast.Name):
            assert node.id not in _PATH_IMPORTS, f"{path.name}:{node.lineno} uses {node.id}"
        elif isinstance(node, ast.Import):
            for alias in node.names:
                assert alias.name.split(".")[0] not in ("generate", "examples"), f"{path.name}:{node.lineno}"
                assert alias.name not in ("runpy", "imp"), f"{path.name}:{node.lineno} imports {alias.name}"
        elif isinstance(node, ast.ImportFrom):
            assert (node.module or "").split(".")[0] not in ("generate", "examples", "runpy", "imp"), (
                f"{path.name}:{node.lineno} imports from {node.module}"
            )
            assert not {a.name for a in node.names} & _PATH_IMPORTS, f"{path.name}:{node.lineno}"
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
            assert "examples" not in node.value, f"{path.name}:{node.lineno}: {node.value!r}"


def test_markdown_table_and_fmt():
    table = common.markdown_table(["a", "b"], [[1, "x"], [2, "y"]])
    assert table.splitlines() == ["| a | b |", "|---|---|", "| 1 | x |", "| 2 | y |"]
    assert common.fmt(None) == "-" and common.fmt(1.23456, ".2f") == "1.23" and common.fmt(float("inf")) == "inf"


# ------------------------------------------------------------------------------------------------------
# eval_perplexity
# ------------------------------------------------------------------------------------------------------


def test_ppl_defaults():
    args = ppl.parse_args([])
    assert args.model is None and args.gguf_file is None
    assert args.attn == ["sdpa", "fp8"]
    assert args.seq_len == 2048 and args.stride == 2048
    assert args.max_windows is None and args.dtype == "bf16"
    assert args.text_file is None and args.dataset is None
    assert args.device == ("cuda" if torch.cuda.is_available() else "cpu")
    assert [s[1] for s in args.specs] == ["sdpa", "fp8"]


def test_ppl_attn_specs():
    args = ppl.parse_args(["--attn", "sdpa", "fp8_reference:hadamard=qkv", "--device", "cpu", "--seq-len", "64"])
    assert args.specs == [("sdpa", "sdpa", {}), ("fp8_reference:hadamard=qkv", "fp8_reference", {"hadamard": "qkv"})]
    assert args.stride == 64


@pytest.mark.parametrize(
    "argv",
    [
        ["--seq-len", "1"],
        ["--stride", "0"],
        ["--seq-len", "16", "--stride", "32"],
        ["--max-windows", "0"],
        ["--text-file", "/no/such/file.txt"],
        ["--attn", "flash_attention_9"],
        ["--attn", "sdpa", "sdpa"],
        ["--attn", "sdpa:hadamard=qkv"],
        ["--attn", "fp8:"],
        ["--attn", "fp8_reference", "--dtype", "fp32"],
        ["--dtype", "fp8"],
        ["--device", "not-a-device"],
        ["--text-file", "x", "--dataset", "wikitext2"],
    ],
)
def test_ppl_errors(argv, capsys):
    _expect_usage_error(ppl.parse_args, argv, capsys)


@no_cuda
@pytest.mark.parametrize("argv", [["--device", "cuda"], ["--attn", "fp8_fa3", "--device", "cpu"]])
def test_ppl_gpu_only_errors(argv, capsys):
    err = _expect_usage_error(ppl.parse_args, argv, capsys)
    assert "CUDA" in err


def test_make_windows():
    # Disjoint windows: each scores all but its first token; the first token of the stream never.
    assert ppl.make_windows(10, 4, 4) == [(0, 4, 3), (4, 8, 3), (8, 10, 1)]
    # Overlapping: every token after the first scored exactly once.
    wins = ppl.make_windows(10, 4, 2)
    assert wins == [(0, 4, 3), (2, 6, 2), (4, 8, 2), (6, 10, 2)]
    assert sum(w[2] for w in wins) == 9
    assert ppl.make_windows(10, 4, 2, max_windows=2) == [(0, 4, 3), (2, 6, 2)]
    assert ppl.make_windows(1, 4, 4) == []
    for n, length, stride in [(100, 16, 5), (37, 8, 8), (50, 50, 7), (50, 9, 8)]:
        wins = ppl.make_windows(n, length, stride)
        # With stride < seq-len every token after the first is scored; disjoint windows skip each first token.
        assert sum(w[2] for w in wins) == (n - len(wins) if stride == length else n - 1)
        assert all(e - b <= length and 0 < k < e - b + 1 for b, e, k in wins)


def test_strip_doc_wrappers(tmp_path):
    wrapped = (
        '<doc id="1" url="u" title="A">\nA\n\nFirst doc text.\n\n</doc>\n'
        '<doc id="2" url="u" title="B">\nB\n\nSecond.\n</doc>\n'
    )
    assert ppl.strip_doc_wrappers(wrapped) == "A\n\nFirst doc text.\n\nB\n\nSecond."
    plain = "no <doc> wrappers here\n</doc> is just text"
    assert ppl.strip_doc_wrappers(plain) == plain


@pytest.mark.skipif(importlib.util.find_spec("exllamav2") is None, reason="exllamav2 (default corpus) not installed")
def test_default_corpus_found():
    path = ppl.default_corpus_path()
    assert path.name == "wiki.utf8" and path.stat().st_size > 1_000_000
    head = ppl.strip_doc_wrappers(path.read_text(encoding="utf-8")[:20000].rsplit("</doc>", 1)[0] + "</doc>\n")
    assert "<doc" not in head and "</doc>" not in head and len(head) > 1000


def test_default_corpus_missing(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(ppl.importlib.util, "find_spec", lambda name, *a: None if name == "exllamav2" else real(name, *a))
    with pytest.raises(FileNotFoundError, match="exllamav2"):
        ppl.default_corpus_path()


def test_dataset_offline_error(monkeypatch):
    """--dataset needs `datasets` and the hub: offline it stops with a message, never a traceback."""
    args = ppl.parse_args(["--dataset", "wikitext2", "--device", "cpu"])
    if importlib.util.find_spec("datasets") is None:
        with pytest.raises(SystemExit, match="datasets"):
            ppl.load_corpus(args)
    else:
        monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
        try:
            ppl.load_corpus(args)
        except SystemExit as e:
            assert "wikitext2" in str(e)


def test_gguf_file_resolution(tmp_path):
    """--gguf-file (eval_perplexity): resolved by hf_fp8_attention.demo, shared with the example."""
    (tmp_path / "m.gguf").write_bytes(b"")
    src = demo.resolve_model_source(str(tmp_path), "m.gguf")
    assert (Path(src.path), src.gguf_file) == (tmp_path.resolve(), "m.gguf")
    src = demo.resolve_model_source(None, str(tmp_path / "m.gguf"))
    assert src.gguf_file == "m.gguf"
    with pytest.raises(FileNotFoundError, match="--gguf-file"):
        demo.resolve_model_source(None, str(tmp_path / "missing.gguf"))
    with pytest.raises(ValueError, match=".gguf"):
        demo.resolve_model_source(None, str(tmp_path / "w.bin"))
    assert not hasattr(common, "resolve_model_source") and not hasattr(common, "load_model")
    assert ppl.resolve_model_source is demo.resolve_model_source


WORDS = (
    "the sky is blue because of rayleigh scattering the sea is blue and the grass is green "
    "explain why the sun is bright in two sentences user assistant system hello world"
).split()


def _save_tiny_model(path: Path) -> Path:
    return save_tiny_llama(path, [" ".join(WORDS)])


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    return _save_tiny_model(tmp_path_factory.mktemp("tiny_llama_ppl"))


@pytest.fixture(scope="module")
def tiny_corpus(tmp_path_factory) -> Path:
    g = torch.Generator().manual_seed(1)
    docs = []
    for i in range(3):
        words = [WORDS[j] for j in torch.randint(0, len(WORDS), (150,), generator=g).tolist()]
        docs.append(f'<doc id="{i}" url="u" title="t{i}">\n' + " ".join(words) + "\n</doc>")
    path = tmp_path_factory.mktemp("corpus") / "wiki.utf8"
    path.write_text("\n".join(docs) + "\n")
    return path


def test_eval_perplexity_end_to_end(tiny_model, tiny_corpus, tmp_path, capsys):
    out_json = tmp_path / "ppl.json"
    argv = [
        "--model", str(tiny_model), "--text-file", str(tiny_corpus), "--attn", "sdpa", "fp8_reference",
        "--seq-len", "128", "--stride", "96", "--max-windows", "3", "--device", "cpu", "--no-progress",
        "--json", str(out_json),
    ]
    report = ppl.main(argv)
    out = capsys.readouterr().out
    assert "| attn | attention | perplexity | delta |" in out
    assert "`sdpa`" in out and "`fp8_reference`" in out
    assert f"{report['tokens_scored']:,} tokens scored" in out and "seq-len 128, stride 96" in out
    assert "torch" in out and "transformers" in out and "device: cpu" in out

    data = json.loads(out_json.read_text())
    assert data["seq_len"] == 128 and data["stride"] == 96 and data["windows"] == 3
    assert data["tokens_scored"] == 127 + 96 + 96
    sdpa, fp8 = data["results"]
    assert (sdpa["attn"], fp8["attn"]) == ("sdpa", "fp8_reference")
    assert "reference" in fp8["backend"]
    for r in (sdpa, fp8):
        assert math.isfinite(r["ppl"]) and r["ppl"] > 1 and r["tokens"] == data["tokens_scored"]
        assert len(r["window_nll"]) == 3
    assert sdpa["delta"] == 0.0
    # A random tiny model is near-uniform over the vocabulary: fp8 attention barely moves it.
    assert abs(fp8["ppl"] / sdpa["ppl"] - 1) < 0.03
    assert fp8["delta_pct"] == pytest.approx(100 * (fp8["ppl"] / sdpa["ppl"] - 1))


def test_eval_perplexity_bad_prepare_kwarg(tiny_model, tiny_corpus):
    """An option prepare_model refuses stops the run before any window, naming the spec."""
    argv = [
        "--model", str(tiny_model), "--text-file", str(tiny_corpus), "--attn", "sdpa", "fp8_reference:hadamard=bogus",
        "--seq-len", "64", "--max-windows", "1", "--device", "cpu", "--no-progress",
    ]
    with pytest.raises(SystemExit, match="fp8_reference:hadamard=bogus.*hadamard"):
        ppl.main(argv)


# ------------------------------------------------------------------------------------------------------
# benchmark_model
# ------------------------------------------------------------------------------------------------------


@no_cuda
def test_bench_model_needs_cuda(capsys):
    _expect_usage_error(bench_model.parse_args, [], capsys, match="CUDA")


@pytest.mark.parametrize(
    "argv",
    [
        ["--device", "cpu"],  # the 8B shape on CPU: refused
        ["--tiny", "--device", "cpu", "--layers", "0"],
        ["--tiny", "--device", "cpu", "--repeats", "0"],
        ["--tiny", "--device", "cpu", "--warmup", "-1"],
        ["--tiny", "--device", "cpu", "--seqlens", "0"],
        ["--tiny", "--device", "cpu", "--impls", "sdpa", "sdpa"],
        ["--tiny", "--device", "cpu", "--impls", "flash_attention_9"],
        ["--tiny", "--device", "cpu", "--impls", "fa3_bf16:x=1"],
        ["--tiny", "--device", "cpu", "--profile"],  # CUDA kernel times only
    ],
)
def test_bench_model_errors(argv, capsys):
    _expect_usage_error(bench_model.parse_args, argv, capsys)


@pytest.mark.parametrize("name,category", [
    ("void flash::FlashAttnFwdSm90<flash::CollectiveMainloopFwdSm90<2, cute::tuple<>>>(Params)", "attention"),
    # FA3's kernels as the profiler names them: inside CUTLASS's device_kernel (attention before "cutlass")
    ("void cutlass::device_kernel<flash::enable_sm90_or_later<flash::FlashAttnFwdSm90<flash::CollectiveMainloopFwdSm90"
     "<2, cute::tuple<cute::C<1>, cute::C<1>, cute::C<1>>, cute::tuple<cute::C<128>, cute::C<176>>>>>>(Params)",
     "attention"),
    ("fp8_attn_fwd_gluon_persistent_kernel", "attention"),
    ("_fp8_attn_fwd_kernel", "attention"),
    ("pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<128, 128, 64, 4>>", "attention"),
    ("fmha_cutlassF_bf16_aligned_64x128_rf_sm80", "attention"),  # before the matmul's "cutlass"
    ("cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_3", "attention"),
    ("qk_rope_block_kernel", "quantize"),
    ("qkv_block_quantize_kernel", "quantize"),
    ("qkv_quantize_kernel", "quantize"),
    ("centring_sums_kernel", "quantize"),
    ("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x256x64_warpgroupsize2x1x1", "matmul"),
    ("nvjet_tst_256x128_64x4_2x1_v_bz_coopB_TNN", "matmul"),
    ("void at::native::vectorized_elementwise_kernel<4, at::native::CUDAFunctor_add<c10::BFloat16>>", "other"),
    ("triton_red_fused__to_copy_add_mean_mul_pow_rsqrt_0", "other"),
])
def test_bench_model_kernel_category(name, category):
    assert bench_model.kernel_category(name) == category


def test_bench_model_profile_table():
    bf16 = bench_model.kernel_ms_by_category([("flash::FlashAttnFwdSm90", 6000.0), ("nvjet_gemm", 2500.0),
                                              ("elementwise_kernel", 500.0)])
    assert bf16 == {"quantize": 0.0, "attention": 6.0, "matmul": 2.5, "other": 0.5, "total": 9.0}
    fp8 = bench_model.kernel_ms_by_category([("flash::FlashAttnFwdSm90", 4000.0), ("qk_rope_block_kernel", 200.0),
                                             ("qkv_block_quantize_kernel", 100.0), ("nvjet_gemm", 2500.0)])
    assert fp8["quantize"] == pytest.approx(0.3) and fp8["total"] == pytest.approx(6.8)
    rows = [{"S": 8, "impl": "fa3_bf16", "label": "FA3 bf16", "profile": bf16},
            {"S": 8, "impl": "fp8_fa3", "label": "fp8_fa3", "profile": fp8},
            {"S": 8, "impl": "sdpa", "label": "sdpa", "error": "OOM"}]  # no profile: no line
    lines = bench_model.format_profile_table(rows).splitlines()
    assert len(lines) == 4 and "attn+quantize vs FA3 bf16" in lines[0]
    assert lines[2].split("|")[-2].strip() == "1.00x"
    assert lines[3].split("|")[-2].strip() == f"{6.0 / 4.3:.2f}x"  # 6.0 ms / (4.0 + 0.3) ms


def test_cuda_kernel_times():
    """The profiler's CUDA kernels with their device time (cuda_time where device_time is missing); CPU events
    are not kernels."""
    cuda, cpu = torch.autograd.DeviceType.CUDA, torch.autograd.DeviceType.CPU
    event = lambda name, kind, **t: type("E", (), dict(name=name, device_type=kind, **t))()  # noqa: E731
    prof = type("P", (), {"events": lambda self: [event("gemm", cuda, device_time=5.0),
                                                  event("aten::mm", cpu, device_time=9.0),
                                                  event("old_torch_kernel", cuda, cuda_time=2.0)]})()
    assert common.cuda_kernel_times(prof) == [("gemm", 5.0), ("old_torch_kernel", 2.0)]


def test_bench_model_defaults():
    args = bench_model.parse_args(["--tiny", "--device", "cpu"])
    assert args.seqlens == [4096, 8192, 16384, 32768, 65536, 131072]
    assert args.impls[:3] == ["sdpa", "fa3_bf16", "fp8_fa3"]
    assert (args.warmup, args.repeats, args.batch, args.layers) == (1, 3, 1, None)


def test_bench_model_config_and_build():
    config = bench_model.build_config()
    assert (config.num_hidden_layers, config.hidden_size, config.intermediate_size) == (32, 4096, 14336)
    assert (config.num_attention_heads, config.num_key_value_heads, config.head_dim, config.vocab_size) == (32, 8, 128, 128256)
    assert config.use_cache is False
    assert bench_model.build_config(layers=2).num_hidden_layers == 2

    tiny = bench_model.build_config(tiny=True, layers=1)
    model = bench_model.build_model(tiny, "cpu", torch.bfloat16)
    assert model.dtype == torch.bfloat16 and len(model.model.layers) == 1
    params = dict(model.named_parameters())
    assert torch.equal(params["model.norm.weight"], torch.ones_like(params["model.norm.weight"]))
    w = params["model.layers.0.mlp.up_proj.weight"].float()
    assert 0.015 < w.std().item() < 0.025
    logits = bench_model.prefill(model, torch.randint(0, tiny.vocab_size, (1, 32)))
    assert logits.shape == (1, 1, tiny.vocab_size) and torch.isfinite(logits).all()


def test_bench_model_tiny_cpu_run(tmp_path, capsys):
    out_json = tmp_path / "bm.json"
    report = bench_model.main(
        ["--tiny", "--device", "cpu", "--layers", "1", "--seqlens", "32", "64", "--impls", "sdpa", "fp8_reference",
         "fa3_bf16", "--warmup", "0", "--repeats", "1", "--json", str(out_json)]
    )
    captured = capsys.readouterr()
    assert "skipping fa3_bf16" in captured.err  # no CUDA: skipped with a note
    assert "| S | implementation | s (median) |" in captured.out
    rows = json.loads(out_json.read_text())["rows"]
    assert [(r["S"], r["impl"]) for r in rows] == [(32, "sdpa"), (32, "fp8_reference"), (64, "sdpa"), (64, "fp8_reference")]
    assert all(r["s"] > 0 and r["finite"] for r in rows)
    assert rows[0]["vs_sdpa"] == 1.0 and rows[1]["vs_fa3_bf16"] is None
    assert report["layers"] == 1


@pytest.mark.skipif(importlib.util.find_spec("matplotlib") is None, reason="matplotlib not installed")
def test_plots(tmp_path):
    rows = [
        {"S": s, "impl": impl, "label": impl, "s": s / 1000 * f, "vs_sdpa": 1 / f}
        for s in (32, 64) for impl, f in (("sdpa", 1.0), ("fp8_reference", 1.5))
    ]
    bench_model.plot(str(tmp_path / "bm.png"), rows, "title")
    sdpa_rows = [
        {"S": s, "causal": c, "impl": impl, "tflops": None if "only" in impl else s / 10, "D": d}
        for s in (4096, 8192) for c in (False, True) for impl in ("FA3 bf16", "fp8 quantize only") for d in (64, 128)
    ]
    bench_sdpa._plot(str(tmp_path / "sdpa.png"), sdpa_rows, "title")
    assert (tmp_path / "bm.png").stat().st_size > 1000 and (tmp_path / "sdpa.png").stat().st_size > 1000


def test_fa3_bf16_registered():
    from transformers import AttentionInterface

    bench_model.register_fa3_bf16()
    assert AttentionInterface()["fa3_bf16"] is bench_model.fa3_bf16_attention


# ------------------------------------------------------------------------------------------------------
# bench_sdpa
# ------------------------------------------------------------------------------------------------------


def test_bench_sdpa_args():
    args = bench_sdpa.parse_args([])
    assert args.head_dims == [128] and args.head_dim == 128
    assert args.seqlens == [4096, 16384, 32768] and args.causal == "both"
    assert args.modes[0] == "none" and args.sqnr_ref == "bf16"
    assert bench_sdpa.parse_args(["--head-dim", "64"]).head_dims == [64]
    assert bench_sdpa.parse_args(["--head-dims", "64", "256"]).head_dims == [64, 256]
    assert bench_sdpa.parse_args(["--modes", "none"]).mode_kwargs == {"none": {"hadamard": "none", "smooth_v": False}}


def test_bench_sdpa_host_rows(monkeypatch):
    """--host: each implementation called once to warm up, then HOST_CALLS times back to back; a graph
    capture that raises becomes "not capturable" with its reason, the eager ms is carried over."""
    calls = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: None)

    def graph_ms(fn, device):
        if fn is broken.fn:
            raise bench_sdpa._common.GraphCaptureError("RuntimeError: operation not permitted when stream is capturing")
        return 0.5

    monkeypatch.setattr(bench_sdpa._common, "graph_ms", graph_ms)
    ok = bench_sdpa.Candidate("fp8_fa3", lambda: calls.append(1), mode="none")
    broken = bench_sdpa.Candidate("other", lambda: None, mode="none")
    rows = bench_sdpa.host_rows({"fp8_fa3": (ok, 1.25), "other": (broken, 2.0)}, dict(S=4096, causal=True, D=128))
    assert len(calls) == bench_sdpa.HOST_CALLS + 1
    assert rows[0]["graph_ms"] == 0.5 and rows[0]["eager_ms"] == 1.25 and rows[0]["host_us"] >= 0
    assert rows[1]["graph_ms"] is None and "capturing" in rows[1]["graph_error"] and rows[1]["S"] == 4096
    assert bench_sdpa.parse_args(["--host"]).host and not bench_sdpa.parse_args([]).host


def test_bench_sdpa_host_profile(monkeypatch):
    """--host-profile: each implementation's profile (its own loop of HOST_CALLS + 1 calls) as a table of us per
    call with the function that did the work in it; refused without --host."""
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: None)

    def busy():
        return sum(i * i for i in range(2000))

    calls = []
    ok = bench_sdpa.Candidate("fp8_fa3", lambda: calls.append(busy()), mode="none")
    profiles = []
    monkeypatch.setattr(bench_sdpa._common, "graph_ms", lambda fn, device: 0.5)
    bench_sdpa.host_rows({"fp8_fa3": (ok, 1.0)}, dict(S=4096, causal=True, D=128), profiles)
    assert len(calls) == 2 * (bench_sdpa.HOST_CALLS + 1)  # host_us's loop, then the profiled one
    (text,) = profiles
    lines = text.splitlines()
    assert lines[0].startswith("## fp8_fa3") and f"{bench_sdpa.HOST_CALLS + 1} calls" in lines[0]
    assert lines[1] == "| own us | cumulative us | calls per call | function |"
    rows = [line for line in lines[3:] if line.startswith("| ")]
    assert 0 < len(rows) <= bench_sdpa.HOST_PROFILE_TOP
    busy_row = next(r for r in rows if " busy" in r)
    own, cum, per_call = (float(c) for c in busy_row.split("|")[1:4])
    assert per_call == 1.0 and 0 < own <= cum  # called once per call, its time counted
    assert bench_sdpa.parse_args(["--host", "--host-profile", "p.txt"]).host_profile == "p.txt"


def test_bench_sdpa_host_profile_needs_host(capsys):
    _expect_usage_error(bench_sdpa.parse_args, ["--host-profile", "p.txt"], capsys, match="--host")


def test_bench_quantize_kernel_times_args():
    assert bench_quantize.parse_args(["--kernel-times"]).kernel_times
    assert not bench_quantize.parse_args([]).kernel_times


@pytest.mark.parametrize(
    "argv",
    [
        ["--heads", "32", "--kv-heads", "5"],
        ["--head-dim", "64", "--head-dims", "128"],
        ["--modes", "no-such-mode"],
        ["--sqnr-ref", "fp8"],
        ["--seqlens", "0"],
    ],
)
def test_bench_sdpa_errors(argv, capsys):
    _expect_usage_error(bench_sdpa.parse_args, argv, capsys)


@no_cuda
def test_bench_sdpa_without_cuda(capsys):
    assert bench_sdpa.main(["--seqlens", "128"]) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().err


def test_bench_sdpa_sqnr_helpers():
    """The SQNR plumbing on CPU: the reference backend's fp8 output against torch SDPA in bf16 and fp32."""
    from hf_fp8_attention import fp8_sdpa

    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 64, 4, 64, generator=g).to(torch.bfloat16).transpose(1, 2)
    k = torch.randn(1, 64, 2, 64, generator=g).to(torch.bfloat16).transpose(1, 2)
    v = torch.randn(1, 64, 2, 64, generator=g).to(torch.bfloat16).transpose(1, 2)
    cand = bench_sdpa.Candidate("fp8_reference", lambda: fp8_sdpa(q, k, v, is_causal=True, backend="reference"), mode="none")
    for ref_kind in ("bf16", "fp32"):
        ref = bench_sdpa._reference(q, k, v, True, ref_kind)
        assert ref.shape == q.shape
        assert 20 < bench_sdpa._sqnr(cand, ref) < 60
    assert bench_sdpa._reference(q, k, v, True, "off") is None
    assert bench_sdpa._sqnr(bench_sdpa.Candidate("t", lambda: None, output=False), ref) is None
    assert "none" in bench_sdpa.available_modes()


# ------------------------------------------------------------------------------------------------------
# bench_quantize
# ------------------------------------------------------------------------------------------------------


def test_bench_quantize_traffic():
    """Bytes read + written: bf16 q/k/v in, 1 byte per element out, cos/sin read once, int8's block scales."""
    def meta(*shape):
        return torch.empty(shape, dtype=torch.bfloat16, device="meta")

    S = 65536
    q, k, v, cos = meta(1, 32, S, 128), meta(1, 8, S, 128), meta(1, 8, S, 128), meta(1, S, 128)
    assert bench_quantize.traffic(q, k, v) == (805306368, 402653184)
    assert bench_quantize.traffic(q, k, v, cos, cos) == (805306368 + 33554432, 402653184)
    assert bench_quantize.traffic(q, k, v, block_scales=True) == (805306368, 402653184 + 4 * 40 * 4096)
    # int8: K's descales per 128 tokens (32 Q heads x 4096 blocks + 8 K heads x 512)
    assert bench_quantize.traffic(q, k, v, block_scales=True, int8=True) == (805306368, 402653184 + 4 * (32 * 4096 + 8 * 512))
    # V's descales per 128 tokens too (8 V heads x 512)
    assert bench_quantize.traffic(q, k, v, block_scales=True, int8=True, v_blocks=True) == (
        805306368, 402653184 + 4 * (32 * 4096 + 2 * 8 * 512))
    q, k = meta(2, 4, 17, 64), meta(2, 2, 17, 64)  # 17 tokens: two scale blocks per head
    assert bench_quantize.traffic(q, k, k, block_scales=True) == (2 * 16 * 17 * 64, 16 * 17 * 64 + 4 * 2 * 6 * 2)
    assert bench_quantize.rate(2.0, (6_000_000_000, 2_000_000_000), 5000.0) == "4000 | 80%"


@no_cuda
def test_bench_quantize_without_cuda(capsys):
    assert bench_quantize.main(["--modes"]) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().err


def test_bench_quantize_graph_timing(monkeypatch):
    """--timing graph routes every timing through `_common.graph_ms` (the call itself, on the inputs' device);
    eager keeps do_bench."""
    calls = []
    monkeypatch.setattr(common, "graph_ms", lambda fn, device: calls.append((fn(), device)) or 0.25)
    monkeypatch.setattr(bench_quantize, "TIMING", "graph")
    x = torch.ones(3)
    assert bench_quantize.device_ms(lambda t: t.sum(), (x,), 10) == 0.25
    assert calls == [(torch.tensor(3.0), x.device)]
    assert bench_quantize.parse_args(["--timing", "graph"]).timing == "graph"
    assert bench_quantize.parse_args([]).timing == "eager"


def test_bench_quantize_dry_run(monkeypatch, capsys):
    """--modes / --configs on CPU with the kernel launch replaced: every mode's explicit options pass
    quantize_qkv_fp8's checks, each tile config and programs/SM reaches the launcher, the module is restored."""
    from hf_fp8_attention.options import FP8AttentionOptions
    from hf_fp8_attention.quantization import qkv

    seen = []

    def launch(q, k, v, outs, rope, B, S_q, S_kv, varlen, options, v_keys_contiguous=False, skip_q=False):
        assert not skip_q  # (Q is left to the kernel only where the pipeline asks)
        if options.v_block_scales:  # the single-pass kernel: its warps and item order
            seen.append((options, qkv._BLOCK_WARPS[(64, rope is not None)], qkv._BLOCK_HEADS_FASTEST))
        else:
            seen.append((options, qkv._tile_config(q.shape[-1], rope is not None), qkv._PROGRAMS_PER_SM))

    saved = qkv._ONE_TILE_CONFIG, qkv._TILE_ELEMS, qkv._PROGRAMS_PER_SM, qkv._tile_config
    saved_warps, saved_order, saved_rope = dict(qkv._BLOCK_WARPS), qkv._BLOCK_HEADS_FASTEST, dict(qkv._ROPE_TILES)
    monkeypatch.setattr(qkv, "_launch", launch)
    monkeypatch.setattr(bench_quantize, "make_inputs", functools.partial(bench_quantize.make_inputs, device="cpu"))
    monkeypatch.setattr(bench_quantize, "device_ms", lambda fn, inputs, rep_ms: (fn(*inputs), 0.5)[1])
    args = bench_quantize.parse_args(["--modes", "--configs", "--seqlens", "64", "--heads", "4/2"])

    bench_quantize.modes(args)
    modes = bench_quantize.MODES
    assert {"none", "rope", "qk", "rope+qk", "smooth_v", "rope+qk+smooth_v", "int8", "rope+int8"} <= set(modes)
    assert all(kw["hadamard"] != "auto" and isinstance(kw["smooth_v"], bool) for _, kw in modes.values())
    assert [s[0] for s in seen] == [FP8AttentionOptions(**kw) for _, kw in modes.values()]
    assert capsys.readouterr().out.count("| 4/2 | 64 |") == len(modes)

    seen.clear()
    bench_quantize.configs(args)
    assert (qkv._ONE_TILE_CONFIG, qkv._TILE_ELEMS, qkv._PROGRAMS_PER_SM, qkv._tile_config) == saved
    # (HALF_BLOCK, BLOCK_S, num_warps, ONE_TILE) at D=128, with RoPE then without
    rope = [(64, 32, 4, True), (64, 32, 8, True), (64, 16, 4, True), (64, 64, 8, True), (64, 64, 8, False)]
    plain = [(64, 32, 4, False), (64, 64, 4, False), (64, 64, 8, False)]
    expected = [(c, p) for configs in (rope, plain) for c in configs for p in (4, 8, 16) for _ in range(2)]
    assert [s[1:] for s in seen[:len(expected)]] == expected
    assert [s[0].hadamard for s in seen[:2]] == ["qk", "none"] and seen[len(expected) - 1][0].qk_format == "int8"
    # then the single-pass kernel: each of its modes at 4 and 8 warps, each in both item orders
    block = seen[len(expected):]
    assert [s[1:] for s in block] == [(w, order) for w in (4, 8) for order in (True, False)
                                      for _ in bench_quantize.BLOCK_MODES]
    assert all(s[0].v_block_scales for s in block)
    assert qkv._BLOCK_WARPS == saved_warps and qkv._BLOCK_HEADS_FASTEST is saved_order
    out = capsys.readouterr().out
    assert out.count("| 4/2 | 64 |") == 28 and out.count("* | 8 |") == 2 and f"{saved_warps[(64, True)]} with RoPE, {saved_warps[(64, False)]} without" in out
    # --rope-configs: every q/k RoPE tile reaches the launcher, the table is restored
    seen.clear()
    monkeypatch.setattr(qkv, "_launch", lambda *a, **kw: seen.append(qkv._ROPE_TILES.get(64)))
    bench_quantize.rope_configs(args)
    assert seen == list(dict.fromkeys((*bench_quantize.ROPE_TILES, saved_rope[64]))) and qkv._ROPE_TILES == saved_rope
    assert capsys.readouterr().out.count(f"\n| {saved_rope[64]}* |") == 1
    # --rope-tiles: the given tiles (and today's) instead, each --rounds times in turns
    seen.clear()
    args = bench_quantize.parse_args(["--rope-configs", "--seqlens", "64", "--heads", "4/2", "--rounds", "2",
                                      "--rope-tiles", "16,10,4,1,1,3", "32,5,2,0,1,0"])
    bench_quantize.rope_configs(args)
    tiles = [(16, 10, 4, True, True, 3), (32, 5, 2, False, True, 0), saved_rope[64]]
    assert seen == tiles * 2 and qkv._ROPE_TILES == saved_rope and qkv._V_SIDE_MIN_ROWS == 3 << 20
    out = capsys.readouterr().out
    assert all(out.count(f"\n| {t}{'*' if t == saved_rope[64] else ''} |") == 1 for t in tiles)
    for bad in ("16,8,4,1,1,4", "16,8,4", "16,8,4,2,1,0", "a,8,4,1,1,0"):
        with pytest.raises(SystemExit):
            bench_quantize.parse_args(["--rope-configs", "--rope-tiles", bad])
    with pytest.raises(SystemExit):  # tiles without the table they are for
        bench_quantize.parse_args(["--modes", "--rope-tiles", "16,8,4,1,1,0"])


def test_bench_quantize_split_dry_run(monkeypatch, capsys):
    """--split on CPU (the interpreted kernels, a tiny shape): every column runs its path, the split columns
    with their tiles (what the split launcher sees), both paths give the same bytes, the module is restored;
    malformed --split-tiles, or --split-tiles without --split, are refused."""
    from hf_fp8_attention.quantization import qkv

    saved = (qkv._SPLIT_MIN_ELEMENTS, dict(qkv._SPLIT_TILES), dict(qkv._SPLIT_ROPE_TILES))
    seen, real = [], qkv._launch_split

    def spy(*a, **kw):
        seen.append((qkv._SPLIT_TILES.get(32), qkv._SPLIT_ROPE_TILES.get(32)))
        return real(*a, **kw)

    monkeypatch.setattr(qkv, "_launch_split", spy)
    monkeypatch.setattr(bench_quantize, "make_inputs", functools.partial(bench_quantize.make_inputs, device="cpu"))
    monkeypatch.setattr(bench_quantize, "device_ms", lambda fn, inputs, rep_ms: (fn(*inputs), 0.5)[1])
    args = bench_quantize.parse_args(["--split", "--seqlens", "40", "--heads", "4/2", "--head-dim", "64",
                                      "--only-modes", "rope+qk", "none", "--split-tiles", "32,4", "16,4:16,3,4"])
    bench_quantize.split_paths(args)
    today_rope = saved[2][32]
    columns = [((32, 4), today_rope), ((16, 4), (16, 3, 4))]
    assert seen == (columns + columns[:1]) * 2  # timed in turns, then the best (ties: the first) re-run
    assert (qkv._SPLIT_MIN_ELEMENTS, qkv._SPLIT_TILES, qkv._SPLIT_ROPE_TILES) == saved
    out = capsys.readouterr().out
    assert out.count("| 0 |\n") == 2 and "| persistent | split 32,4:" in out and "split 16,4:16,3,4 |" in out
    # the difference count sees smooth_v's add-back
    a = qkv.quantize_qkv_fp8(*bench_quantize.make_inputs(16, 2, 1, 64, False)[:3], options={"smooth_v": True})
    b = dataclasses.replace(a, v_add=a.v_add + 1)
    assert bench_quantize._byte_diff(a, a) == 0 and bench_quantize._byte_diff(a, b) == a.v_add.numel()
    for bad in ("32", "32,4:16,3", "0,4", "a,4", "32,4,1", "48,4", "32,6", "32,4:8,3,4", "32,4:16,3,3"):
        with pytest.raises(SystemExit):
            bench_quantize.parse_args(["--split", "--split-tiles", bad])
    with pytest.raises(SystemExit):
        bench_quantize.parse_args(["--modes", "--split-tiles", "32,4"])
    with pytest.raises(SystemExit):  # per-block modes have one path: nothing to compare
        bench_quantize.parse_args(["--split", "--only-modes", "rope", "int8"])


# ------------------------------------------------------------------------------------------------------
# accuracy_report
# ------------------------------------------------------------------------------------------------------


def test_accuracy_report_args():
    from hf_fp8_attention.accuracy import FAMILIES, LONG_FAMILIES, MODES

    args = acc.parse_args([])
    assert args.families == list(FAMILIES) and args.modes == list(MODES) and args.seqlens is None
    assert (args.seq, args.windows, args.last, args.kv_heads) == (1024, 1, 256, 8)
    args = acc.parse_args(["--seqlens", "8192", "32768", "131072"])
    assert args.families == list(LONG_FAMILIES) and args.seqlens == [8192, 32768, 131072]
    assert acc.parse_args(["--seqlens", "512", "--families", "needle", "real", "--model", "m"]).families == ["needle", "real"]
    assert acc.parse_args(["--families", "gaussian", "real", "--model", "default"]).windows == 1
    assert acc.parse_args(["--seqlens", "256", "--last", "250", "--families", "v_offset"]).last == 250


@pytest.mark.parametrize(
    "argv",
    [
        ["--families", "needle"],  # a long-context family without --seqlens
        ["--seqlens", "512", "--families", "k_outlier_20x"],
        ["--families", "real"],  # needs --model
        ["--seqlens", "512", "--model", "default"],  # --model without the real family
        ["--seqlens", "128", "--last", "256"],
        ["--seqlens", "256", "1024", "--last", "250"],  # the needle at 256/16 = 16 is not before every scored query
        ["--seqlens", "0"],
        ["--windows", "0"],
        ["--text-file", "/no/such/file.txt"],
        ["--heads", "8", "--kv-heads", "3"],
    ],
)
def test_accuracy_report_errors(argv, capsys):
    _expect_usage_error(acc.parse_args, argv, capsys)


def test_accuracy_report_long_context_cpu(tmp_path, capsys):
    out_json = tmp_path / "long.json"
    argv = ["--seqlens", "256", "512", "--last", "32", "--heads", "2", "--kv-heads", "1", "--head-dim", "64",
            "--modes", "none", "smooth_k+smooth_v", "--device", "cpu", "--json", str(out_json)]
    assert acc.main(argv) == 0
    out = capsys.readouterr().out
    assert "| inputs | S | mode | SQNR dB | cosine | rel L2 |" in out and "last 32 queries" in out
    data = json.loads(out_json.read_text())
    assert data["backend"] == "reference" and data["seqlens"] == [256, 512] and data["last"] == 32
    keys = [(r["S"], r["family"], r["mode"]) for r in data["rows"]]
    assert keys == [(s, f, m) for s in (256, 512) for f in ("v_offset", "needle", "gaussian")
                    for m in ("bf16 sdpa (torch.bfloat16)", "none", "smooth_k+smooth_v")]
    assert all(20 < r["sqnr_db"] < 80 and r["cosine"] > 0.99 for r in data["rows"])
    assert f"| needle | 512 | none | {data['rows'][-5]['sqnr_db']:.2f} |" in out


def test_accuracy_report_real_family_cpu(tiny_model, tiny_corpus, tmp_path, capsys):
    """Every layer of the tiny Llama on 3 windows of 64 tokens of a text file; one synthetic family too."""
    out_json = tmp_path / "real.json"
    argv = ["--model", str(tiny_model), "--text-file", str(tiny_corpus), "--families", "gaussian", "real",
            "--seq", "64", "--windows", "3", "--heads", "2", "--head-dim", "64", "--modes", "none", "qkv",
            "--device", "cpu", "--json", str(out_json)]
    assert acc.main(argv) == 0
    out = capsys.readouterr().out
    assert "| inputs | mode | SQNR dB |" in out and "| gaussian | none |" in out
    assert "2 layers x 3 windows of 64 tokens" in out and "H=2/1 D=64" in out
    assert "| mode | SQNR dB mean | SQNR dB min | min at |" in out
    real = json.loads(out_json.read_text())["real"]
    assert real["model"] == str(tiny_model) and real["corpus"] == str(tiny_corpus)
    assert [r["mode"] for r in real["summary"]] == ["bf16 sdpa (torch.bfloat16)", "none", "qkv"]
    assert {(r["window"], r["layer"]) for r in real["rows"]} == {(w, layer) for w in range(3) for layer in range(2)}
    for r in real["summary"]:
        mine = [x["sqnr_db"] for x in real["rows"] if x["mode"] == r["mode"]]
        assert r["n"] == 6 and r["sqnr_min"] == min(mine) and r["sqnr_mean"] == pytest.approx(sum(mine) / 6)
        assert math.isfinite(r["sqnr_mean"]) and r["sqnr_mean"] > 15
        assert f"| {r['mode']} | {r['sqnr_mean']:.2f} | {r['sqnr_min']:.2f} |" in out


def test_accuracy_report_real_family_needs_a_text(tiny_model, tiny_corpus, monkeypatch):
    """Without --text-file the text is exllamav2's wiki.utf8; missing, the error names the package. Too
    short a text is an error too."""
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "exllamav2" else real_find_spec(name, *a))
    base = ["--model", str(tiny_model), "--families", "real", "--seq", "64", "--modes", "none", "--device", "cpu"]
    with pytest.raises(SystemExit, match="exllamav2"):
        acc.main(base)
    with pytest.raises(SystemExit, match="fewer than --windows 50 x --seq 64"):
        acc.main([*base, "--text-file", str(tiny_corpus), "--windows", "50"])


def test_accuracy_report_model_without_real_family(tiny_model, capsys):
    """--model alone keeps the single-layer row of earlier versions."""
    argv = ["--model", str(tiny_model), "--families", "gaussian", "--layer", "1", "--seq", "32", "--heads", "2",
            "--head-dim", "64", "--modes", "none", "--device", "cpu"]
    assert acc.main(argv) == 0
    out = capsys.readouterr().out
    assert "| real (layer 1) | none |" in out and "| gaussian | none |" in out and "# real:" not in out


@pytest.mark.skipif(importlib.util.find_spec("matplotlib") is None, reason="matplotlib not installed")
def test_accuracy_report_plot(tmp_path):
    bars = [(f, m, 20.0 + i) for i, (f, m) in enumerate([("gaussian", "none"), ("gaussian", "qkv"), ("needle S=512", "none")])]
    acc._plot(bars, str(tmp_path / "acc.png"))
    assert (tmp_path / "acc.png").stat().st_size > 1000


def test_bench_quantize_table_compare_rounds(monkeypatch, capsys):
    """table with --compare and --rounds: both modules timed in turns (which goes first alternating) on the
    same inputs, medians reported, the speedup is the other's median over this one's, and a module whose
    output differs is flagged."""
    import types

    calls = []
    times = {"new": iter([1.0, 3.0, 2.0]), "old": iter([4.0, 8.0, 6.0])}
    codes = torch.zeros(4, dtype=torch.uint8)

    def result(offset):
        parts = {n: codes + (offset if n == "v" else 0) for n in "qkv"}
        return types.SimpleNamespace(**parts, **{f"{n}_descale": torch.ones(2) for n in "qkv"})

    def fn_new(*inputs):
        calls.append(("new", inputs))
        return result(0)

    def fn_old(*inputs):
        calls.append(("old", inputs))
        return result(old_offset)

    def device_ms(fn, inputs, rep_ms):
        fn(*inputs)
        return next(times["new" if fn is fn_new else "old"])

    monkeypatch.setattr(bench_quantize, "make_inputs", functools.partial(bench_quantize.make_inputs, device="cpu"))
    monkeypatch.setattr(bench_quantize, "device_ms", device_ms)
    monkeypatch.setattr(bench_quantize, "copy_gbs", lambda *a: 1000.0)
    monkeypatch.setattr(bench_quantize, "host_us", lambda *a: (1.0, 2.0))
    args = bench_quantize.parse_args(["--rope", "--seqlens", "64", "--heads", "4/2", "--rounds", "3",
                                      "--compare", "some.module"])
    for old_offset, same in ((0, "yes"), (1, "NO")):
        calls.clear()
        times = {"new": iter([1.0, 3.0, 2.0]), "old": iter([4.0, 8.0, 6.0])}
        bench_quantize.table(fn_new, args, fn_old)
        order = [c[0] for c in calls]
        assert order == ["new", "old", "old", "new", "new", "old", "new", "old"]  # 3 rounds, then the check
        assert all(all(a is b for a, b in zip(c[1], calls[0][1])) and len(c[1]) == 5 for c in calls)
        row = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| 4/2 | 64 |")]
        assert len(row) == 1 and "| 2.000 |" in row[0] and f"| 6.000 | 3.00x | {same} |" in row[0]
    with pytest.raises(SystemExit):
        bench_quantize.parse_args(["--rounds", "0"])
    with pytest.raises(SystemExit):
        bench_quantize.parse_args(["--modes", "--compare", "some.module"])


def test_bench_sdpa_tma_store_table():
    """bench_sdpa's TMA-store table: per shape, the plain-store Gluon build's ms against the default's (TMA stores;
    each as % of the FA3 fp8 kernel when it ran) and their ratio; shapes without both rows are left out."""
    rows = [dict(D=128, S=16384, causal=True, impl=name, ms=ms) for name, ms in (
        (bench_sdpa.PLAIN_STORE_ROW, 2.0), ("triton fp8 kernel only", 1.6), ("FA3 fp8 kernel only", 1.8))]
    rows += [dict(D=128, S=65536, causal=False, impl="triton fp8 kernel only", ms=30.0)]
    assert bench_sdpa.tma_store_lines(rows) == ["| 128 | 16384 | yes | 2.000 (90.0%) | 1.600 (112.5%) | 1.250x |"]


def test_bench_sdpa_q_in_kernel_table():
    """bench_sdpa's Q-in-kernel A/B: per shape and mode, fp8_triton with Q quantized per head by the quantizer
    (the default) against Q's rows quantized in the kernel (the tagged twin), both against FA3 bf16, their ratio, and for mode none
    the kernel alone with e4m3 Q and with Q quantized inside (% of the FA3 fp8 kernel); no twin row, no line."""
    tag = bench_sdpa.Q_IN_KERNEL_TAG
    rows = [dict(D=128, S=16384, causal=False, impl=name, ms=ms) for name, ms in (
        ("FA3 bf16", 6.6), ("FA3 fp8 kernel only", 4.8), ("triton fp8 kernel only", 4.8),
        (bench_sdpa.Q_IN_KERNEL_ROW, 4.9), ("fp8_triton (quant incl.)", 5.0), (f"fp8_triton (quant incl.), {tag}", 4.95),
        ("fp8_triton [qk] (quant incl.)", 5.5), (f"fp8_triton [qk] (quant incl.), {tag}", 5.0),
        ("fp8_fa3 (quant incl.)", 5.3))]
    rows += [dict(D=128, S=4096, causal=True, impl="fp8_triton (quant incl.)", ms=0.3)]
    assert bench_sdpa.q_in_kernel_lines(rows) == [
        "| 128 | 16384 | no | none | 5.000 (1.32x) | 4.950 (1.33x) | 1.010x | 4.800 (100.0%) | 4.900 (98.0%) |",
        "| 128 | 16384 | no | qk | 5.500 (1.20x) | 5.000 (1.32x) | 1.100x | - | - |"]


def test_first_call_script_runs_fresh_children(tmp_path, capsys):
    """scripts/first_call.py: each shape in its own child process with an empty Triton cache; without CUDA the
    children run the reference backend. Rows for every (S, causal), first- and second-call times, the JSON,
    exit 0; a child that fails (here: a head dim fp8_sdpa refuses) is a failed row with its error and exit 1, not
    a crash; bad arguments are a usage error."""
    first_call = _load("first_call")
    out = tmp_path / "fc.json"
    assert first_call.main(["--seqlens", "32", "--causal", "both", "--heads", "4/2", "--head-dim", "64",
                            "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "| 32 | no | on | 1 |" in text and "| 32 | yes | on | 1 |" in text and "empty Triton cache" in text
    rows = json.loads(out.read_text())
    assert [r["causal"] for r in rows] == [False, True] and all(r["compile_ahead"] for r in rows)
    assert all(r["first_s"] > 0 and r["second_ms"] > 0 and r["wall_s"] >= r["first_s"] for r in rows)
    if not torch.cuda.is_available():
        assert {r["backend"] for r in rows} == {"reference"}
    assert first_call.main(["--seqlens", "32", "--causal", "no", "--heads", "4/2", "--head-dim", "48"]) == 1
    assert "failed: ValueError: head_dim 48 is not supported" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        first_call.main(["--heads", "4/3"])
    # off, then on, side by side; the breakdown (nothing compiled on the CPU)
    assert first_call.main(["--seqlens", "32", "--causal", "yes", "--heads", "4/2", "--head-dim", "64",
                            "--compile-ahead", "both", "--breakdown", "--rounds", "2"]) == 0
    text = capsys.readouterr().out
    order = [text.index(f"| 32 | yes | {flag} | {r} |") for flag, r in (("off", 1), ("on", 1), ("on", 2), ("off", 2))]
    assert order == sorted(order)  # the second round runs the flags the other way round
    assert text.count("(no Triton compile or load recorded") == 4 and "medians over 2 round(s)" in text
    assert first_call._medians([dict(S=1, causal=True, compile_ahead=f, first_s=t) for f, t in
                                ((False, 6.0), (True, 4.0), (True, 5.0), (False, 8.0))]) == \
        [[1, "yes", "7.00", "4.50", "1.56x"]]
    lines = first_call._breakdown(dict(S=4096, causal=True, first_s=5.0, events=[
        ("compile", "qkv_quantize_kernel", 1.5, "MainThread"), ("compile", "gluon", 3.0, "worker_0"),
        ("load", "qkv_quantize_kernel", 0.25, "MainThread"), ("load", "gluon", 0.5, "MainThread")]), "on")
    assert lines[0] == "## first call at S=4096, causal yes, compile ahead on: 5.00 s"
    assert "- compile gluon: 3.00 s (worker_0)" in lines
    assert lines[-1].startswith("- compiles 4.50 s, loads 0.75 s; in the main thread 2.25 s, the rest of the call 2.75 s")


def test_bench_sdpa_direct_launch_table():
    """bench_sdpa's direct-launch A/B: each host row with a ", JIT launches" twin of the same shape gets one line
    (both host times, the saving, both eager times); rows without a twin, or whose twin is another shape's, none."""
    row = lambda s, name, us, ms: dict(S=s, causal=True, D=128, impl=name, host_us=us, eager_ms=ms)  # noqa: E731
    host = [row(4096, "fp8_triton (quant incl.)", 300.0, 0.30), row(4096, "fp8_triton (quant incl.), JIT launches",
                                                                       450.5, 0.45),
            row(4096, "FA3 bf16", 150.0, 0.2), row(16384, bench_sdpa.JIT_ROW, 200.0, 2.6)]
    assert bench_sdpa.direct_launch_lines(host) == [
        "| 4096 | yes | 128 | fp8_triton (quant incl.) | 450.5 | 300.0 | 150.5 | 0.450 / 0.300 |"]


def test_bench_sdpa_exp2_table():
    """bench_sdpa's exponentials A/B (session 30): per shape, the Gluon kernel alone with every exponential on MUFU
    and with 1, 2 or 4 of 8 by the polynomial, each as % of the FA3 fp8 kernel and as a speedup over the first;
    a split that did not run shows "-", a shape without any split row is left out."""
    rows = [dict(D=128, S=16384, causal=False, impl=name, ms=ms) for name, ms in (
        ("FA3 fp8 kernel only", 4.8), ("triton fp8 kernel only", 4.8), (f"{bench_sdpa.EXP2_ROW}1/8", 5.0),
        (f"{bench_sdpa.EXP2_ROW}4/8", 6.0))]
    rows += [dict(D=128, S=4096, causal=True, impl="triton fp8 kernel only", ms=0.2)]
    assert bench_sdpa.exp2_lines(rows) == [
        "| 128 | 16384 | no | 4.800 (100.0%) | 5.000 (96.0%, 0.960x) | - | 6.000 (80.0%, 0.800x) |"]


ncu = _load("ncu_attention")


def test_ncu_summary_reads_raw_csv_and_labels_kernels_by_marker():
    """ncu_attention --summary: ncu's raw CSV (messages before the header skipped, the units row read), one table
    row per kernel but the markers (torch.cuda._sleep's spin kernel), each labelled by the driver's n-th
    "# profiled:" line; units scaled (ns -> ms, Hz -> GHz, bytes -> KiB), stalls largest first, "-" for a metric
    the CSV lacks, and a note when the log names another number of candidates."""
    header = ['"ID"', '"Kernel Name"', '"gpu__time_duration.sum"', '"gpc__cycles_elapsed.avg.per_second"',
              '"sm__pipe_tensor_cycles_active.avg.pct_of_peak_sustained_active"',
              '"launch__shared_mem_per_block_dynamic"',
              '"smsp__average_warps_issue_stalled_wait_per_issue_active.ratio"',
              '"smsp__average_warps_issue_stalled_barrier_per_issue_active.ratio"']
    units = ['""', '""', '"ns"', '"hz"', '"%"', '"byte/block"', '"inst"', '"inst"']
    text = "\n".join(["==PROF== Connected", ",".join(header), ",".join(units),
                      '"0","at::cuda::<unnamed>::spin_kernel(long)","1,000","1","0","0","0","0"',
                      '"1","fill","2,000","1,900,000,000","0","0","4","0"',
                      '"2","attn","4,302,336","1,800,000,000","55.22","191,488","1.57","0.71"',
                      '"3","at::cuda::<unnamed>::spin_kernel(long)","1,000","1","0","0","0","0"',
                      '"4","gluon","4,561,664","1,800,000,000","52.45","132,096","1.63","2.40"'])
    rows = ncu.read_raw_csv(text)
    assert [r["Kernel Name"][0] for r in rows] == ["at::cuda::<unnamed>::spin_kernel(long)", "fill", "attn",
                                                   "at::cuda::<unnamed>::spin_kernel(long)", "gluon"]
    labels = ncu.labels_from_log("noise\n# profiled: S=16384 causal=no | FA3 fp8 kernel only\n"
                                 "# profiled: S=16384 causal=no | triton fp8 kernel only\n")
    assert labels == ["S=16384 causal=no FA3 fp8 kernel only", "S=16384 causal=no triton fp8 kernel only"]
    lines = ncu.summary_lines(rows, labels)
    assert len(lines) == 2 + 3
    assert lines[3].startswith("| S=16384 causal=no FA3 fp8 kernel only | attn | 4.302 | 1.80 | 55.2 | - |")
    assert "| 187 | - | wait 1.57, barrier 0.71 |" in lines[3]
    assert lines[4].startswith("| S=16384 causal=no triton fp8 kernel only | gluon | 4.562 |")
    assert lines[4].endswith("barrier 2.40, wait 1.63 |")
    assert "labels may be off" in ncu.summary_lines(rows, labels[:1])[-1]
    # ncu's automatic units (no --print-units base): ms and Kbyte/block scale; a unit it does not know shows "?"
    auto = [dict(r) for r in rows[2:3]]
    auto[0]["gpu__time_duration.sum"] = ("4.30", "ms")
    auto[0]["launch__shared_mem_per_block_dynamic"] = ("191.49", "Kbyte/block")
    auto[0]["gpc__cycles_elapsed.avg.per_second"] = ("1.80", "furlong")
    assert ncu.summary_lines(auto, [])[2].startswith("| ? | attn | 4.300 | ? | 55.2 | - | - | - | - | - | - | 187 |")
    stall_cols = {"smsp__average_warps_issue_stalled_selected_per_issue_active.ratio": ("1.00", "inst")}
    assert ncu.stalls({**rows[2], **stall_cols}) == "wait 1.57, barrier 0.71"  # ("selected" is issuing)
    with pytest.raises(ValueError, match="no ncu raw CSV header"):
        ncu.read_raw_csv("==PROF== nothing profiled\n")


def test_ncu_source_sets_parked_warps_apart():
    """ncu_attention --source: per kernel (markers skipped, a kernel printed twice in a row shown once), the
    stall samples by reason without the warps parked on a NOP for the whole kernel (a NOP executed a few times
    that holds many samples), counted apart, and the most-sampled instructions."""
    cols = ('"Address","Source","Warp Stall Sampling (All Samples)","Warp Stall Sampling (Not-issued Samples)",'
            '"Instructions Executed","stall_barrier","stall_wait","stall_barrier (Not Issued)"')

    def kernel(name, rows):
        return [f'"Kernel Name","{name}",', cols] + [
            f'"0x{i:x}","{src}","{all_}","0","{ex}","{bar}","{wait}","0"' for i, (src, all_, ex, bar, wait) in
            enumerate(rows)]

    gluon = kernel("gluon", [("      NOP", 900, 264, 900, 0), ("MUFU.EX2 R1, R1", 80, 2080768, 0, 80),
                             ("BAR.SYNC.DEFER_BLOCKING 0x3, 0x80", 20, 2080768, 20, 0), ("NOP", 5, 2080768, 0, 5)])
    text = "\n".join(kernel("at::cuda::<unnamed>::spin_kernel(long)", [("EXIT", 0, 1, 0, 0)]) + gluon + gluon)
    kernels = ncu.read_source_csv(text)
    assert [name for name, _ in kernels] == ["at::cuda::<unnamed>::spin_kernel(long)", "gluon", "gluon"]
    lines = ncu.source_lines(kernels, top=2)
    assert lines.count("### gluon") == 1
    assert "samples 105 (parked warps apart: 900); by reason: wait 81.0%, barrier 19.0%" in lines[1]
    assert lines[4] == "| 89.6 | 264 | `NOP` |" and lines[5] == "| 8.0 | 2,080,768 | `MUFU.EX2 R1, R1` |"


@no_cuda
def test_ncu_drive_without_cuda(capsys):
    assert ncu.main(["--drive", "--seqlens", "1024"]) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        ncu.parse_args(["--drive", "--seqlens", "0"])
    with pytest.raises(SystemExit):  # one of --drive, --summary, --source
        ncu.parse_args([])
