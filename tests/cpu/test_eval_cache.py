"""scripts/eval_cache.py on a tiny random Llama (tests/tiny_models.py) and a tiny <doc>-wrapped text: both parts
run end to end on CPU with the reference backend and write a well-formed JSON; nothing is downloaded."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest
import torch
from tiny_models import save_tiny_llama

SCRIPTS = Path(__file__).resolve().parents[2] / "scripts"
WORDS = (
    "the sky is blue because of rayleigh scattering the sea is blue and the grass is green "
    "explain why the sun is bright in two sentences"
).split()


def _load_script():
    spec = importlib.util.spec_from_file_location("hfa_scripts_eval_cache", SCRIPTS / "eval_cache.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


ec = _load_script()


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    return save_tiny_llama(tmp_path_factory.mktemp("tiny_llama_cache"), [" ".join(WORDS)])


@pytest.fixture(scope="module")
def tiny_corpus(tmp_path_factory) -> Path:
    g = torch.Generator().manual_seed(3)
    docs = []
    for i in range(3):
        words = [WORDS[j] for j in torch.randint(0, len(WORDS), (120,), generator=g).tolist()]
        docs.append(f'<doc id="{i}" url="u" title="t{i}">\n' + " ".join(words) + "\n</doc>")
    path = tmp_path_factory.mktemp("corpus") / "wiki.utf8"
    path.write_text("\n".join(docs) + "\n")
    return path


def test_mean_sem():
    assert ec.mean_sem([1.0]) == (1.0, None)
    mean, sem = ec.mean_sem([1.0, 2.0, 3.0])
    assert mean == 2.0 and sem == pytest.approx(1 / math.sqrt(3))


def test_prompt_starts():
    assert ec.prompt_starts(100, 20, 3) == [0, 40, 80]
    assert ec.prompt_starts(20, 20, 1) == [0]
    with pytest.raises(ValueError, match="fewer than --prompt-len"):
        ec.prompt_starts(19, 20, 2)


@pytest.mark.parametrize("argv", [["--prompts", "0", "--windows", "0"], ["--chunk", "0"], ["--steps", "0"],
                                  ["--ppl-extra", "fp8"], ["--text-file", "/no/such/file"]])
def test_usage_errors(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        ec.parse_args(argv)
    assert exc.value.code == 2 and "error" in capsys.readouterr().err


def test_eval_cache_end_to_end(tiny_model, tiny_corpus, tmp_path, capsys):
    out_json = tmp_path / "cache.json"
    argv = ["--model", str(tiny_model), "--text-file", str(tiny_corpus), "--prompts", "2", "--prompt-len", "40",
            "--steps", "6", "--continuation", "greedy", "text", "--windows", "2", "--seq-len", "80", "--chunk", "32",
            "--ppl-extra", "bf16+bf16cache", "fp8+bf16cache", "--fp32-linear", "--out-json", str(out_json)]
    report = ec.main(argv)
    out = capsys.readouterr().out
    assert "| comparison | top-1 agreement |" in out and "| mode | perplexity |" in out
    assert "`fp8+fp8cache vs bf16`" in out and "acceptance (text)" in out and "device: cpu" in out

    data = json.loads(out_json.read_text())
    assert data == json.loads(json.dumps(report))
    assert data["device"].startswith("cpu") and {"torch", "transformers"} <= set(data["versions"])
    assert data["date"] and data["settings"]["chunk"] == 32 and data["settings"]["fp32_linear"] is True
    assert data["argv"] == argv and set(data["load_average_1min"]) == {"start", "end"}

    assert set(data["agreement"]) == {"greedy", "text"}
    for continuation, a in data["agreement"].items():
        assert a["continuation"] == continuation and len(a["prompt_starts"]) == 2
        assert torch.tensor(a["fed_tokens"]).shape == (2, 6)
        assert set(a["modes"]) == {"bf16", "fp8+bf16cache", "fp8+fp8cache"}
        assert "fp8 KV cache on 2/2 layers" in a["modes"]["fp8+fp8cache"]["attention"]
        assert len(a["comparisons"]) == 3
        for c in a["comparisons"].values():
            assert c["positions"] == 12 and 0 <= c["top1_agreement_pct"] <= 100
            assert c["kl_mean"] >= -1e-6 and math.isfinite(c["kl_max"]) and -1 <= c["cosine_min"] <= 1 + 1e-6
        assert isinstance(a["acceptance"]["pass"], bool) and math.isfinite(a["acceptance"]["margin_points"])

    b = data["perplexity"]
    assert b["windows"] == 2 and b["seq_len"] == 80 and b["tokens_scored"] == 2 * 79
    assert list(b["modes"]) == ["bf16", "fp8", "fp8+fp8cache", "bf16+bf16cache", "fp8+bf16cache"]
    for name, r in b["modes"].items():
        assert math.isfinite(r["ppl"]) and r["ppl"] > 1 and r["tokens"] == 158 and len(r["window_nll"]) == 2
        assert len(r["window_nll_delta_vs_fp8"]) == 2 and r["window_nll_delta_vs_fp8_sem"] >= 0
        assert r["chunk"] == (None if name in ("bf16", "fp8") else 32)
    # the chunked scoring scores the same tokens as one forward: through a bf16 cache, the same perplexity
    assert b["modes"]["bf16+bf16cache"]["ppl"] == pytest.approx(b["modes"]["bf16"]["ppl"], rel=5e-3)
    assert b["modes"]["fp8"]["vs_fp8_pct"] == 0.0 and b["modes"]["bf16"]["vs_bf16_pct"] == 0.0
    acc = b["acceptance"]
    assert acc["rel_diff_pct"] == b["modes"]["fp8+fp8cache"]["vs_fp8_pct"] and isinstance(acc["pass"], bool)
    assert math.isfinite(acc["rel_diff_vs_fp8_bf16cache_pct"])


def test_fp32_linear_matches_bf16_linear():
    """--fp32-linear computes what a bf16 GEMM with float32 accumulation computes (up to summation order)."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(96, 40, bias=True).to(torch.bfloat16)
    x = torch.randn(5, 96, dtype=torch.bfloat16)
    want = lin(x)
    model = torch.nn.Sequential(lin)
    assert ec.use_fp32_linear(model) == 1
    got = model(x)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), want.float(), rtol=2**-7, atol=1e-2)
