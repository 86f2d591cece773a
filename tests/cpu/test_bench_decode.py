"""scripts/bench_decode.py on the CPU: arguments, the --cpu-smoke run (torch reference of the fp8 cache, the
reference fp8 backend, the tiny Llama of benchmark_model, FA3 skipped) and its JSON, and the FA3 wiring
(the kvcache calls of part 1, the AttentionInterface function of part 2) against a torch stand-in of
``flash_attn_interface`` that follows FA3's documented semantics.
"""

from __future__ import annotations

import importlib.util
import json
import sys
import types
from pathlib import Path

import pytest
import torch

SCRIPTS = Path(__file__).resolve().parents[2] / "scripts"
no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU error path")


def _load():
    spec = importlib.util.spec_from_file_location("hfa_scripts_bench_decode", SCRIPTS / "bench_decode.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


bd = _load()


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def _usage_error(argv, capsys, match=None):
    with pytest.raises(SystemExit) as exc:
        bd.parse_args(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "error" in err and (match is None or match in err), err


def _strict_json(path: Path) -> dict:
    def refuse(token):
        raise ValueError(f"non-standard JSON constant {token}")

    return json.loads(path.read_text(), parse_constant=refuse)


# ------------------------------------------------------------------------------------------------------
# arguments
# ------------------------------------------------------------------------------------------------------


def test_smoke_defaults():
    args = bd.parse_args(["--cpu-smoke"])
    assert args.device == "cpu" and args.part == "all" and args.modes == list(bd.MODES)
    assert args.shapes == bd.SMOKE["grid"] and args.gqa == bd.SMOKE["gqa"] and args.head_dims == [64]
    assert (args.batches, args.prompts, args.new_tokens) == ([1, 2], [48], 4)
    assert (args.rounds, args.sdpa_backends) == (2, ["fa3", "triton"])
    assert bd.parse_args(["--cpu-smoke", "--sdpa-backends"]).sdpa_backends == []


def test_grids_of_the_issue():
    """Default part 1: B x S_kv 1x4k 1x32k 1x128k 8x4k 8x32k 32x8k, GQA 32/8 and 8/1, D 64 and 128; part 2:
    B 1 and 8, prompts 4k and 32k, 128 new tokens."""
    assert bd.ATTN_GRID == [(1, 4096), (1, 32768), (1, 131072), (8, 4096), (8, 32768), (32, 8192)]
    assert bd.GQA == [(32, 8), (8, 1)] and bd.HEAD_DIMS == [64, 128]
    assert (bd.GEN_BATCHES, bd.GEN_PROMPTS, bd.NEW_TOKENS) == ([1, 8], [4096, 32768], 128)
    assert all(s % 64 == 0 for _, s in bd.ATTN_GRID + bd.ATTN_GRID_QUICK)  # crop(-1) stays host-only


def test_explicit_values():
    args = bd.parse_args(["--cpu-smoke", "--shapes", "2x1k", "1x96", "--gqa", "8/1", "--head-dims", "128",
                          "--batches", "4", "--prompts", "2k", "100", "--new-tokens", "8", "--modes", "fp8_cache",
                          "--part", "generate", "--bf16-attn", "sdpa", "--fp8-backend", "reference"])
    assert args.shapes == [(2, 1024), (1, 96)] and args.gqa == [(8, 1)] and args.head_dims == [128]
    assert (args.batches, args.prompts, args.new_tokens, args.modes) == ([4], [2048, 100], 8, ["fp8_cache"])
    assert (args.part, args.bf16_attn, args.fp8_backend) == ("generate", "sdpa", "reference")


@pytest.mark.parametrize("warmup,warm_len", [(None, 300), ("short", 256)])
def test_generate_warmup_prompt(monkeypatch, warmup, warm_len):
    """The untimed warm-up generate runs on the timed prompt itself by default (every length-dependent kernel
    variant compiled before timing), on its first 256 tokens with --warmup short."""
    calls = []

    def fake(model, ids, new_tokens, *, measure=True, static=False):
        calls.append((ids.shape[1], new_tokens, measure))
        return {"prefill_s": 0.1, "decode_ms_per_token": 1.0, "total_s": 0.2, "peak_gib": None, "cache_gib": 0.0,
                "cache_type": "DynamicCache", "cache_tokens": ids.shape[1] + new_tokens, "new_tokens": new_tokens,
                "decode_steps": new_tokens - 1}

    monkeypatch.setattr(bd, "timed_generate", fake)
    argv = ["--cpu-smoke", "--part", "generate", "--modes", "bf16", "--bf16-attn", "sdpa", "--batches", "1",
            "--prompts", "300", "--new-tokens", "4"] + (["--warmup", warmup] if warmup else [])
    rows = bd.run_generate(bd.parse_args(argv), [])
    assert calls == [(warm_len, 3, False), (300, 4, True)]
    assert rows[0]["error"] is None


def test_generate_static_rows(monkeypatch):
    """--static: extra bf16 (sdpa) and fp8_cache rows generated with cache_implementation="static", each
    warmed up on the timed prompt and token count (the compiled step is built for that cache length) and
    compared with the static bf16 row, not the eager one."""
    calls = []

    def fake(model, ids, new_tokens, *, measure=True, static=False):
        calls.append((ids.shape[1], new_tokens, measure, static))
        ms = 2.0 if static else 4.0
        return {"prefill_s": 0.1, "decode_ms_per_token": ms, "decode_ms_median": ms / 2, "total_s": 0.2,
                "peak_gib": None, "cache_gib": 0.0, "cache_type": "StaticCache" if static else "DynamicCache",
                "cache_tokens": ids.shape[1] + new_tokens, "new_tokens": new_tokens, "decode_steps": new_tokens - 1}

    monkeypatch.setattr(bd, "timed_generate", fake)
    monkeypatch.setattr(bd, "switch_mode", lambda model, mode, name, backend: f"{mode} {name}")
    argv = ["--cpu-smoke", "--part", "generate", "--modes", "bf16", "fp8_cache", "--bf16-attn", "sdpa",
            "--batches", "1", "--prompts", "300", "--new-tokens", "4", "--static"]
    rows = bd.run_generate(bd.parse_args(argv), [])
    assert [(r["mode"], r["static"]) for r in rows] == [("bf16", False), ("fp8_cache", False), ("bf16", True),
                                                        ("fp8_cache", True)]
    assert all(r["error"] is None for r in rows)
    assert calls[4:] == [(300, 4, False, True), (300, 4, True, True)] * 2  # warm-up = the timed call
    assert rows[2]["label"] == "sdpa (no fp8), static cache, compiled" and rows[2]["attention"] == "bf16 sdpa"
    assert "static cache, compiled" in rows[3]["label"]
    assert [r["decode_vs_bf16"] for r in rows] == [1.0, 1.0, 1.0, 1.0]  # static vs static: 2.0 / 2.0
    table = bd.generate_table(rows)
    assert "median step ms" in table and "1.00" in table
    calls.clear()
    rows = bd.run_generate(bd.parse_args(argv[:-1] + ["--static", "only"]), [])
    assert [(r["mode"], r["static"]) for r in rows] == [("bf16", True), ("fp8_cache", True)]


def test_generate_cache_presets(monkeypatch, capsys):
    """--generate-cache-presets NAME: an extra fp8_cache row whose cache attention calls run with that
    DECODE_PRESETS config (the override gone after it); an unknown name is a usage error."""
    from hf_fp8_attention.kv_cache import ops

    seen = []
    real = ops.cache_attention

    def fake(model, ids, new_tokens, *, measure=True, static=False):
        seen.append(ops.cache_attention is real)  # False inside the override
        return {"prefill_s": 0.1, "decode_ms_per_token": 1.0, "total_s": 0.2, "peak_gib": None, "cache_gib": 0.0,
                "cache_type": "FP8Cache", "cache_tokens": ids.shape[1] + new_tokens, "new_tokens": new_tokens,
                "decode_steps": new_tokens - 1}

    monkeypatch.setattr(bd, "timed_generate", fake)
    monkeypatch.setattr(bd, "switch_mode", lambda *a: "stub")
    argv = ["--cpu-smoke", "--part", "generate", "--modes", "fp8_cache", "--bf16-attn", "sdpa", "--batches", "1",
            "--prompts", "64", "--new-tokens", "2", "--generate-cache-presets", "tma"]
    rows = bd.run_generate(bd.parse_args(argv), [])
    assert [r["label"] for r in rows] == ["fp8 attention + fp8 cache", "fp8 attention + fp8 cache [tma]"]
    assert [r["cache_preset"] for r in rows] == [None, "tma"]
    assert seen == [True, True, False, False] and ops.cache_attention is real
    calls = []
    monkeypatch.setattr(ops, "cache_attention", lambda *a, **kw: calls.append(kw["config"]))
    with bd.cache_config_override({"tma": True, "fused_combine": False}):
        ops.cache_attention(config={"fused_combine": True})
        ops.cache_attention()
    assert calls == [{"tma": True, "fused_combine": True}, {"tma": True, "fused_combine": False}]
    _usage_error(["--cpu-smoke", "--generate-cache-presets", "nope"], capsys, "nope")


def test_generate_rounds_interleave_modes_and_report_medians(monkeypatch, capsys):
    """--generate-rounds 3: the modes of a shape are timed round-robin, every other round reversed (a b, b a,
    a b; one untimed warm-up generate per mode, in round 1), each row keeps its rounds and reports each
    quantity's median and the largest peak; a mode that fails stops being timed and reports only its error
    (no ratio against it); 0 rounds is a usage error."""
    order = []
    clock = iter(range(100))

    def fake(model, ids, new_tokens, *, measure=True, static=False):
        order.append((bd.switch_mode.last, measure))
        if bd.switch_mode.last == "fp8_bf16_cache" and order.count(("fp8_bf16_cache", True)) == 2:  # round 2
            raise RuntimeError("boom")
        t = next(clock)
        return {"prefill_s": float(t), "decode_ms_per_token": 10.0 * t, "total_s": t + 0.5, "peak_gib": float(t),
                "cache_gib": 0.0, "cache_type": "X", "cache_tokens": 1, "new_tokens": new_tokens,
                "decode_steps": new_tokens - 1}

    def switch(model, mode, *a):
        switch.last = mode
        return mode

    monkeypatch.setattr(bd, "timed_generate", fake)
    monkeypatch.setattr(bd, "switch_mode", switch)
    argv = ["--cpu-smoke", "--part", "generate", "--modes", "fp8_cache", "fp8_bf16_cache", "--bf16-attn", "sdpa",
            "--batches", "1", "--prompts", "64", "--new-tokens", "2", "--generate-rounds", "3"]
    notes = []
    rows = bd.run_generate(bd.parse_args(argv), notes)
    # round 1: a (warm-up, timed), b (warm-up, timed); round 2 reversed: b (fails: no clock value), a;
    # round 3: a only
    assert order == [("fp8_cache", False), ("fp8_cache", True), ("fp8_bf16_cache", False), ("fp8_bf16_cache", True),
                     ("fp8_bf16_cache", True), ("fp8_cache", True), ("fp8_cache", True)]
    a, b = rows
    # a's timed runs took clock values 1, 4, 5 (warm-ups 0 and 2, b's timed run 3; b's round-2 call failed)
    assert [r["prefill_s"] for r in a["rounds"]] == [1.0, 4.0, 5.0]
    assert (a["prefill_s"], a["decode_ms_per_token"], a["total_s"], a["peak_gib"]) == (4.0, 40.0, 4.5, 5.0)
    assert b["error"] == "RuntimeError: boom" and len(b["rounds"]) == 1 and b.get("prefill_s") is None
    assert any("3 times" in n for n in notes)
    _usage_error(["--cpu-smoke", "--generate-rounds", "0"], capsys, "generate-rounds")


@pytest.mark.parametrize(
    "argv",
    [
        ["--cpu-smoke", "--shapes", "8"],
        ["--cpu-smoke", "--shapes", "0x4k"],
        ["--cpu-smoke", "--shapes", "axb"],
        ["--cpu-smoke", "--gqa", "32/5"],
        ["--cpu-smoke", "--gqa", "32"],
        ["--cpu-smoke", "--head-dims", "80"],
        ["--cpu-smoke", "--new-tokens", "1"],
        ["--cpu-smoke", "--batches", "0"],
        ["--cpu-smoke", "--prompts", "0"],
        ["--cpu-smoke", "--modes", "fp16"],
        ["--cpu-smoke", "--modes", "bf16", "bf16"],
        ["--cpu-smoke", "--fp8-backend", "fa9"],
        ["--cpu-smoke", "--quick"],
        ["--cpu-smoke", "--rep-ms", "0"],
        ["--cpu-smoke", "--rounds", "0"],
        ["--cpu-smoke", "--sdpa-backends", "reference"],
        ["--cpu-smoke", "--timing", "graph"],
    ],
)
def test_errors(argv, capsys):
    _usage_error(argv, capsys)


@no_cuda
def test_needs_cuda_without_smoke(capsys):
    _usage_error([], capsys, match="--cpu-smoke")


# ------------------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------------------


def test_rope_tables_match_llama():
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    config = LlamaConfig(hidden_size=256, num_attention_heads=2, head_dim=128, rope_theta=bd.ROPE_THETA)
    pos = torch.arange(300)
    cos, sin = LlamaRotaryEmbedding(config)(torch.zeros(1, dtype=torch.float32), pos[None])
    mine = bd.rope_tables(pos, 128, torch.float32)
    # angles up to 300 rad: one float32 ulp of the angle is ~3e-5, and transformers forms it with a matmul
    # whose CPU kernel choice (under load) moved it by a few ulps (1.5e-4 seen once); a wrong convention
    # (frequency order, interleaving, theta) differs by O(1)
    torch.testing.assert_close(mine[0], cos, rtol=0, atol=5e-4)
    torch.testing.assert_close(mine[1], sin, rtol=0, atol=5e-4)


def test_reference_decode_is_sdpa():
    g = torch.Generator().manual_seed(0)
    q, k, v = torch.randn(2, 8, 64, generator=g), torch.randn(2, 2, 40, 64, generator=g), torch.randn(2, 2, 40, 64, generator=g)
    ref = torch.nn.functional.scaled_dot_product_attention(q[:, :, None], k, v, enable_gqa=True)[:, :, 0]
    torch.testing.assert_close(bd.reference_decode(q, k, v, 64**-0.5), ref, rtol=1e-5, atol=1e-5)


def test_cache_step_leaves_the_layer_as_it_was():
    """append + attend + crop(-1), repeated as the timing loop does: the layer keeps S_kv tokens and the
    step's output does not drift."""
    x = bd.AttentionShape(1, 128, 4, 2, 64, torch.device("cpu"), 0, "torch")
    cands = {c.name: c for c in bd.attention_candidates(x, [], False, [])}
    outs = [cands[bd.CACHE_STEP_ROW].fn() for _ in range(3)]
    assert x.layer.get_seq_length() == 128
    assert torch.equal(outs[0], outs[2])
    firsts = bd.first_calls(x)
    assert x.layer.get_seq_length() == 128 and set(firsts) == {"fill_s", "first_attend_s", "first_append_s",
                                                               "second_length_attend_s"}


def test_cache_bytes_and_call_counter():
    from transformers.cache_utils import DynamicCache

    import hf_fp8_attention as hfa

    cache = DynamicCache()
    k = torch.zeros(2, 3, 10, 64, dtype=torch.bfloat16)
    cache.update(k, k, 0)
    cache.update(k, k, 1)
    assert bd.cache_bytes(cache) == 4 * k.numel() * 2
    assert bd.cache_bytes(None) is None
    fp8 = hfa.FP8Cache(impl="torch")
    fp8.update(k, k, 0)
    assert bd.cache_bytes(fp8) == fp8.memory_bytes() > 0
    original = hfa.FP8CacheLayer.update
    with bd.count_cache_calls() as calls:
        hfa.FP8Cache(impl="torch").update(k, k, 0)
    assert calls == {"attend": 0, "update": 1} and hfa.FP8CacheLayer.update is original


# ------------------------------------------------------------------------------------------------------
# FA3 wiring, against a torch stand-in of flash_attn_interface
# ------------------------------------------------------------------------------------------------------


def _rotate(x, cos, sin, pos):
    """FA3's non-interleaved rotary: tables (seqlen_ro, D/2), x (B, n, H, D) at positions pos (n,)."""
    c, s = cos[pos][None, :, None].float(), sin[pos][None, :, None].float()
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1).to(x.dtype)


def _attend(q, k, v, scale, causal):
    """q (B, S_q, H_q, D), k/v (B, S_k, H_kv, D), bottom-right causal -> (B, S_q, H_q, D)."""
    s_q, s_k = q.shape[1], k.shape[1]
    mask = torch.ones(s_q, s_k, dtype=torch.bool).tril(s_k - s_q) if causal else None
    out = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(1, 2).float(), k.transpose(1, 2).float(), v.transpose(1, 2).float(), attn_mask=mask,
        scale=scale, enable_gqa=True)
    return out.transpose(1, 2).to(q.dtype)


@pytest.fixture
def fake_fa3(monkeypatch):
    calls = []

    def flash_attn_with_kvcache(q, k_cache, v_cache, k=None, v=None, rotary_cos=None, rotary_sin=None,
                                cache_seqlens=None, softmax_scale=None, causal=False, rotary_interleaved=True, **kw):
        assert k_cache.stride(-1) == 1 and v_cache.stride(-1) == 1
        calls.append(dict(fn="kvcache", q=tuple(q.shape), k_cache=tuple(k_cache.shape), k_new=k is not None,
                          rotary=rotary_cos is not None, causal=causal, k_cache_contiguous=k_cache.is_contiguous()))
        n0 = k_cache.shape[1] if cache_seqlens is None else int(cache_seqlens[0])
        assert cache_seqlens is None or bool((cache_seqlens == n0).all())
        if rotary_cos is not None:
            assert not rotary_interleaved and causal
            q = _rotate(q, rotary_cos, rotary_sin, torch.arange(n0, n0 + q.shape[1]))
            k = _rotate(k, rotary_cos, rotary_sin, torch.arange(n0, n0 + k.shape[1]))
        n = n0
        if k is not None:
            k_cache[:, n0 : n0 + k.shape[1]] = k
            v_cache[:, n0 : n0 + k.shape[1]] = v
            n = n0 + k.shape[1]
        return _attend(q, k_cache[:, :n], v_cache[:, :n], softmax_scale, causal)

    def flash_attn_func(q, k, v, softmax_scale=None, causal=False, **kw):
        calls.append(dict(fn="func", q=tuple(q.shape), causal=causal))
        return _attend(q, k, v, softmax_scale, causal)

    module = types.SimpleNamespace(flash_attn_with_kvcache=flash_attn_with_kvcache, flash_attn_func=flash_attn_func)
    monkeypatch.setitem(sys.modules, "flash_attn_interface", module)
    monkeypatch.setattr(bd, "fa3_available", lambda device: True)
    return calls


def test_fa3_rows_against_the_fp8_cache(fake_fa3):
    """Part 1's FA3 calls: the attend-only row is bf16 attention over the rotated cache (SQNR >> fp8's vs the
    float32 reference), and the append+attend row (RoPE of q and k in the kernel at position S_kv) gives what
    the fp8 cache's step gives, to fp8 accuracy."""
    from hf_fp8_attention.metrics import sqnr_db

    x = bd.AttentionShape(2, 192, 8, 2, 64, torch.device("cpu"), 1, "torch")
    notes = []
    cands = {c.name: c for c in bd.attention_candidates(x, ["reference"], True, notes)}
    assert list(cands) == [bd.FA3_ROW, bd.FA3_STEP_ROW, "fp8_sdpa reference (bf16 cache)", bd.CACHE_ROW,
                           bd.CACHE_STEP_ROW]
    assert not notes and cands[bd.FA3_STEP_ROW].note == "RoPE in the kernel"
    assert sqnr_db(cands[bd.FA3_ROW].fn().float(), x.ref) > 40
    assert sqnr_db(cands[bd.CACHE_ROW].fn().float(), x.ref) > 20
    step_fa3, step_fp8 = cands[bd.FA3_STEP_ROW].fn(), cands[bd.CACHE_STEP_ROW].fn()
    assert sqnr_db(step_fp8.float(), step_fa3.float()) > 20
    assert {c["fn"] for c in fake_fa3} == {"kvcache"}
    assert fake_fa3[0]["k_cache"] == (2, 193, 2, 64)  # S_kv + 1 slots, BSHD


def test_static_rows_equal_the_dynamic_cache():
    """--static's attention rows: the FP8StaticCacheLayer's attention (length on the device; the "[tma]" row's
    config is ignored by the torch implementation here) equals the dynamic layer's bit for bit on the same
    tokens, and its step (write + attend, then the length put back) equals the dynamic step's and leaves the
    length where it was."""
    x = bd.AttentionShape(2, 192, 8, 2, 64, torch.device("cpu"), 3, "torch", static=True)
    cands = {c.name: c for c in bd.attention_candidates(x, [], False, [])}
    assert [n for n in cands if "static" in n] == [bd.STATIC_ROW, bd.STATIC_TMA_ROW, bd.STATIC_STEP_ROW]
    want = cands[bd.CACHE_ROW].fn()
    assert torch.equal(cands[bd.STATIC_ROW].fn(), want)
    assert torch.equal(cands[bd.STATIC_TMA_ROW].fn(), want)
    assert cands[bd.STATIC_ROW].baseline == bd.FA3_ROW and cands[bd.STATIC_STEP_ROW].baseline == bd.FA3_STEP_ROW
    for _ in range(2):  # twice: the step leaves the cache as it found it
        assert torch.equal(cands[bd.STATIC_STEP_ROW].fn(), cands[bd.CACHE_STEP_ROW].fn())
        assert int(x.static.cumulative_length) == 192


def test_fa3_step_without_rotary_support(fake_fa3, monkeypatch):
    """A wheel whose kvcache call refuses the rotary tables: the row is timed with q/k rotated outside, and
    the notes say so; the result is the same attention."""
    from hf_fp8_attention.metrics import sqnr_db

    fake = sys.modules["flash_attn_interface"]
    inner = fake.flash_attn_with_kvcache

    def no_rotary(*a, rotary_cos=None, **kw):
        if rotary_cos is not None:
            raise RuntimeError("rotary not supported in this build")
        return inner(*a, **kw)

    monkeypatch.setattr(fake, "flash_attn_with_kvcache", no_rotary)
    x = bd.AttentionShape(1, 128, 4, 1, 64, torch.device("cpu"), 2, "torch")
    notes = []
    cands = {c.name: c for c in bd.attention_candidates(x, [], True, notes)}
    assert "rotary" in notes[0] and cands[bd.FA3_STEP_ROW].note == "RoPE outside, not timed"
    assert sqnr_db(cands[bd.CACHE_STEP_ROW].fn().float(), cands[bd.FA3_STEP_ROW].fn().float()) > 20


def test_fa3_attention_function_in_generate(fake_fa3):
    """Part 2's bf16 mode: the registered AttentionInterface function runs flash_attn_func on the prompt and
    flash_attn_with_kvcache on BSHD views of the DynamicCache (no copy) for each decode step; greedy tokens
    equal sdpa's on the same weights."""
    cpu = torch.device("cpu")
    name, label = bd.bf16_attention("auto", cpu, [])
    assert (name, label) == (bd.FA3_DECODE, "bf16 FA3 + bf16 cache")
    config = bd.bm.build_config(tiny=True, layers=1)
    model = bd.bm.build_model(config, "cpu", torch.bfloat16)
    ids = torch.randint(3, config.vocab_size, (2, 20), generator=torch.Generator().manual_seed(0))
    tokens = {}
    for attn in (name, "sdpa"):
        bd.switch_mode(model, "bf16", attn, None)
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, min_new_tokens=4,
                             do_sample=False, use_cache=True, pad_token_id=0)
        tokens[attn] = out[:, 20:]
    assert torch.equal(tokens[name], tokens["sdpa"])
    assert [c["fn"] for c in fake_fa3] == ["func", "kvcache", "kvcache", "kvcache"]
    decode = fake_fa3[1]
    assert decode["q"] == (2, 1, 4, 64) and decode["k_cache"] == (2, 21, 2, 64) and decode["causal"]
    assert not decode["k_cache_contiguous"]  # a BSHD view of the cache's BHSD tensor


def test_bf16_attention_fallbacks():
    notes = []
    assert bd.bf16_attention("auto", torch.device("cpu"), notes) == ("sdpa", "bf16 sdpa + bf16 cache")
    assert "sdpa" in notes[0]
    assert bd.bf16_attention("sdpa", torch.device("cpu"), []) == ("sdpa", "bf16 sdpa + bf16 cache")


# ------------------------------------------------------------------------------------------------------
# the smoke run
# ------------------------------------------------------------------------------------------------------


def test_time_row_falls_back_to_eager(monkeypatch):
    """--timing graph: a row is graph-timed while it captures; once a capture fails, its graph timings are
    dropped (in the list the caller appends to), it is timed eagerly from then on and the notes say why."""
    captures = iter([0.5, bd._common.GraphCaptureError("RuntimeError: not permitted while capturing")])

    def graph_ms(fn, device):
        got = next(captures)
        if isinstance(got, Exception):
            raise got
        return got

    monkeypatch.setattr(bd._common, "graph_ms", graph_ms)
    monkeypatch.setattr(bd, "time_ms", lambda fn, device, rep_ms: 2.0)
    row, notes = {"ms_rounds": []}, []
    for _ in range(3):
        row["ms_rounds"].append(bd.time_row(row, lambda: None, "cuda", True, 10, notes, "1x4k fp8"))
    assert row["ms_rounds"] == [2.0, 2.0] and row["timing"] == "eager"
    assert len(notes) == 1 and "1x4k fp8: not capturable" in notes[0]
    row = {"ms_rounds": []}
    row["ms_rounds"].append(bd.time_row(row, lambda: None, "cpu", False, 10, notes, "eager"))
    assert row == {"ms_rounds": [2.0], "timing": "eager"}


def test_cpu_smoke_run(tmp_path, capsys):
    out_json = tmp_path / "decode.json"
    argv = ["--cpu-smoke", "--shapes", "1x128", "2x64", "--batches", "1", "2", "--prompts", "32",
            "--out-json", str(out_json), "--out-png", str(tmp_path / "decode.png")]
    report = bd.main(argv)
    out = capsys.readouterr().out
    assert "## Attention step" in out and "## generate, tiny Llama" in out and "device: cpu" in out
    assert "| 4/2 | 64 | 1x128 |" in out and "fp8 attention + fp8 cache" in out

    data = _strict_json(out_json)
    assert data["mode"] == "cpu-smoke" and data["device"] == "cpu" and "torch" in data["versions"]
    assert any("FA3 bf16" in n and "skipped" in n for n in data["notes"])
    attn = data["attention"]
    impls = ["fp8_sdpa reference (bf16 cache)", bd.CACHE_ROW, bd.CACHE_STEP_ROW]
    assert [(r["H_q"], r["H_kv"], r["B"], r["S_kv"], r["impl"]) for r in attn] == [
        (hq, hkv, b, s, i) for hq, hkv in ((4, 2), (4, 1)) for b, s in ((1, 128), (2, 64)) for i in impls]
    for r in attn:
        assert r["error"] is None and r["ms"] > 0 and r["first_call_ms"] > 0 and r["vs_fa3"] is None
        assert len(r["ms_rounds"]) == 2 and r["ms"] == min(r["ms_rounds"])
        if r["impl"] != bd.CACHE_STEP_ROW:
            assert 20 < r["sqnr_db"] < 45
        if r["impl"] == bd.CACHE_ROW:
            assert r["first_attend_s"] > 0 and r["second_length_attend_s"] > 0
            assert r["recompiled_at_second_length"] is False

    gen = data["generate"]
    assert [(r["B"], r["prompt"], r["mode"]) for r in gen] == [(b, 32, m) for b in (1, 2) for m in bd.MODES]
    for r in gen:
        assert r["error"] is None and r["new_tokens"] == 4 and r["decode_steps"] == 3
        assert r["prefill_s"] > 0 and r["decode_ms_per_token"] > 0 and r["total_s"] >= r["prefill_s"]
        assert r["cache_tokens"] == 32 + 3 and r["cache_gib"] > 0 and r["peak_gib"] is None
        assert r["cache_type"] == ("FP8Cache" if r["mode"] == "fp8_cache" else "DynamicCache")
        if r["mode"] == "fp8_cache":
            assert r["fp8_cache_calls"] == {"attend": 3 * 2, "update": 0}  # 3 decode steps x 2 layers, fast path
            assert "fp8 KV cache on 2/2 layers" in r["attention"]
    assert gen[0]["decode_vs_bf16"] == 1.0
    assert report["generate"][0]["label"] == "bf16 sdpa + bf16 cache"
    if importlib.util.find_spec("matplotlib") is None:
        assert any("matplotlib not installed" in n for n in data["notes"])
    else:
        assert (tmp_path / "decode.png").stat().st_size > 1000


def test_a_failing_shape_is_a_note(monkeypatch, capsys):
    """A shape whose fp8 cache fails to set up (e.g. a kernel error on the GPU) is reported and skipped; the
    other shapes still run."""
    real = bd.first_calls

    def flaky(x):
        if x.S == 64:
            raise RuntimeError("kernel failed")
        return real(x)

    monkeypatch.setattr(bd, "first_calls", flaky)
    report = bd.main(["--cpu-smoke", "--part", "attention", "--shapes", "1x64", "1x128", "--gqa", "4/2"])
    assert {r["S_kv"] for r in report["attention"]} == {128} and report["generate"] == []
    assert [r["impl"] for r in report["attention"]] == ["fp8_sdpa reference (bf16 cache)", bd.CACHE_ROW,
                                                        bd.CACHE_STEP_ROW]
    assert any("1x64: not measured" in n and "kernel failed" in n for n in report["notes"])
    assert "1x64: not measured" in capsys.readouterr().out


@pytest.mark.skipif(importlib.util.find_spec("matplotlib") is None, reason="matplotlib not installed")
def test_plot(tmp_path):
    rows = [dict(H_q=32, H_kv=8, D=d, B=b, S_kv=s, impl=i, vs_fa3=f, ms=0.1) for d in (64, 128)
            for b, s in ((1, 4096), (8, 32768)) for i, f in ((bd.FA3_ROW, 1.0), (bd.CACHE_ROW, 1.3))]
    gen = [dict(B=1, prompt=4096, label=label, decode_ms_per_token=ms, error=None)
           for label, ms in (("bf16 FA3 + bf16 cache", 40.0), ("fp8 attention + fp8 cache", 35.0))]
    bd.plot(str(tmp_path / "p.png"), rows, gen, "title")
    assert (tmp_path / "p.png").stat().st_size > 1000


# ------------------------------------------------------------------------------------------------------
# --sweep (fp8 cache kernel configs), in the Triton interpreter
# ------------------------------------------------------------------------------------------------------


def test_sweep_arguments(capsys):
    args = bd.parse_args(["--sweep", "--cpu-smoke"])
    assert args.part == "sweep" and args.shapes == bd.SWEEP_SMOKE["shapes"] and args.gqa == [(4, 2)]
    assert args.sweep_grid == bd.SWEEP_SMOKE["grid"]
    args = bd.parse_args(["--sweep", "--cpu-smoke", "--sweep-block-n", "256", "--sweep-warps", "8", "--out", "x.json"])
    assert args.sweep_grid["block_n"] == [256] and args.sweep_grid["num_warps"] == [8] and args.out_json == "x.json"
    assert bd.SWEEP_SHAPES == [(1, 4096), (1, 32768), (1, 131072), (8, 32768)]
    assert len(bd.sweep_configs(bd.SWEEP_GRID)) == 27 + 2 * 2 * 27
    assert bd.config_name({}) == "default" and bd.config_name({"fused_combine": True}) == "default fused"
    assert bd.config_name(dict(block_n=256, tile_softmax=True, num_warps=4, num_stages=3, programs_per_sm=8,
                               fused_combine=True)) == "n256 tile w4 s3 p8 fused"
    assert bd.config_name({"fused_combine": "auto", "tma": True, "pdl": True}) == "default tma pdl"
    assert bd.config_name({"fused_combine": False, "tma": False}) == "default unfused"
    from hf_fp8_attention.kv_cache.ops import DECODE_PRESETS
    names = [bd.config_name(c) for c in DECODE_PRESETS.values()]
    assert "default" not in names and len(set(names)) == len(names), names  # every preset timed, none merged
    for argv in (["--sweep", "--cpu-smoke", "--sweep-block-n", "96"], ["--sweep", "--cpu-smoke", "--gqa", "4/2", "8/1"],
                 ["--sweep", "--cpu-smoke", "--sweep-stages", "0"]):
        _usage_error(argv, capsys)


def test_sweep_smoke_run(tmp_path, capsys, monkeypatch):
    """Grid pass, re-timing with and without fused_combine, table and strict JSON; a config that raises (here
    every tile_softmax one) is recorded with its error and not retried at the next shape."""
    from hf_fp8_attention.kv_cache import ops

    real = ops.cache_attention
    calls = []

    def flaky(*a, config=None, **kw):
        calls.append(bd.config_name(config or {}))
        if (config or {}).get("tile_softmax"):
            raise RuntimeError("no compile today")
        return real(*a, config=config, **kw)

    monkeypatch.setattr(ops, "cache_attention", flaky)
    out_json = tmp_path / "sweep.json"
    bd.main(["--sweep", "--cpu-smoke", "--shapes", "1x512", "2x384", "--sweep-block-n", "128", "--out", str(out_json)])
    out = capsys.readouterr().out
    assert "config sweep (H 4/2, D 64" in out and "| 1x512 |" in out and "| 2x384 |" in out
    data = _strict_json(out_json)
    sweep = data["sweep"]
    assert data["mode"] == "sweep cpu-smoke" and sweep["configs"] == 3 and sweep["skipped"] == 0
    rows = sweep["rows"]
    assert [(r["shape"], r["name"]) for r in rows] == [(s, n) for n in ("default", "n128 w4 s2 p4 unfused",
                                                                       "n128 tile w4 s2 p4 unfused")
                                                       for s in ("1x512", "2x384")]
    assert calls.count("n128 tile w4 s2 p4 unfused") == 1  # failed once, not retried at the second shape
    for r in rows:
        if "tile" in r["name"]:
            assert "no compile today" in r["error"] and r["ms"] is None
        else:
            assert r["error"] is None and r["ms"] > 0 and r["sqnr_db"] > 20
    assert any("no compile today" in n for n in data["notes"])
    for best in sweep["best"]:
        assert set(best["retimed"]) == {"default", "n128 w4 s2 p4 unfused", "default fused", "n128 w4 s2 p4 fused"}
        assert best["best"] in best["retimed"] and best["best_ms"] > 0 and best["default_ms"] > 0
        assert best["fa3_ms"] is None and best["best_vs_fa3"] is None and best["best_tbps"] > 0
        assert best["bytes"] == 2 * best["B"] * 2 * (best["S_kv"] * 64 + best["S_kv"] // 64 * 4)
        # fused and two-launch results are the same numbers
        retimed = best["retimed"]
        assert retimed["default fused"]["sqnr_db"] == retimed["default"]["sqnr_db"]
    assert sweep["overall"]["name"] == "n128 w4 s2 p4 unfused"


def test_jit_preset_turns_direct_launches_off_for_its_rows_only(capsys):
    """'jit launches' (generate part): the default config with `_launch.ENABLED` off inside, restored after;
    not offered to the attention part, whose rows time configs."""
    from hf_fp8_attention import _launch

    assert bd.cache_config_presets()[bd.JIT_PRESET] == {}
    before = _launch.ENABLED
    with bd.direct_launches(False):
        assert _launch.ENABLED is False
    assert _launch.ENABLED == before
    _usage_error(["--part", "attention", "--cpu-smoke", "--cache-configs", bd.JIT_PRESET], capsys, "cache-configs")
