"""The speed table: lookup (buckets, fallbacks, margin), files (missing, malformed, env override), the auto
path's choice in fp8_sdpa / the transformers adapter (bf16 = torch SDPA's result exactly; named backends
ignore the table), torch.compile, describe_dispatch, and scripts/tune_dispatch.py on a tiny CPU grid.

Tables here are fake CPU tables ("cpu" device, reference backend against torch SDPA) installed with
monkeypatch; a FA3 stand-in module covers the FA3 bf16 calls."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
import types
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import hf_fp8_attention as hfa
from hf_fp8_attention import dispatch, sdpa, speed_table
from hf_fp8_attention.quantization import apply_rope_reference
from hf_fp8_attention.speed_table import BF16_MARGIN, SpeedTableError, parse_table

SCRIPTS = Path(__file__).resolve().parents[2] / "scripts"


def row(s_q, s_kv, causal, speedup, head_dim=64, group=1, batch=1):
    """A measured row whose fp8 speedup (bf16 ms / fp8 ms) is ``speedup``."""
    return {"s_q": s_q, "s_kv": s_kv, "causal": causal, "head_dim": head_dim, "group": group, "batch": batch,
            "bf16_ms": 1.0, "fp8_ms": 1.0 / speedup}


def table_data(rows, device="cpu", fp8_backend="reference", bf16="sdpa", heads=4):
    return {"version": 1, "device": device, "device_name": "test", "fp8_backend": fp8_backend, "bf16": bf16,
            "heads": heads, "rows": rows}


def make_table(rows, **kw):
    return parse_table(table_data(rows, **kw), "test")


@pytest.fixture
def install(monkeypatch):
    """install(rows or a SpeedTable, **table fields): the table the package uses for its device."""
    monkeypatch.delenv(speed_table.ENV, raising=False)

    def _install(rows, **kw):
        table = rows if isinstance(rows, speed_table.SpeedTable) else make_table(rows, **kw)
        monkeypatch.setattr(speed_table, "PACKAGED", {table.device: table})
        return table

    return _install


def qkv(b=1, h_q=4, h_kv=2, s_q=16, s_kv=16, d=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, s_q, h_q, d, generator=g).to(torch.bfloat16).transpose(1, 2)
    k = torch.randn(b, s_kv, h_kv, d, generator=g).to(torch.bfloat16).transpose(1, 2)
    v = torch.randn(b, s_kv, h_kv, d, generator=g).to(torch.bfloat16).transpose(1, 2)
    return q, k, v


def sdpa_bhsd(q, k, v, causal):
    return F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=q.shape[1] != k.shape[1])


# ------------------------------------------------------------------------------------------------- lookup

GRID = [row(s, s, c, 1.0) for s in (1024, 2048, 4096) for c in (False, True)] + [row(1, s, False, 1.0) for s in
                                                                                 (1024, 4096)]


def lookup(table, s_q, s_kv, causal=False, head_dim=64, group=1, batch=1, heads_q=4):
    r = table.row_for(s_q=s_q, s_kv=s_kv, causal=causal, head_dim=head_dim, group=group, batch=batch,
                      heads_q=heads_q)
    return r.s_q, r.s_kv, r.causal


def test_nearest_bucket_in_log2():
    t = make_table(GRID)
    assert lookup(t, 3000, 3000, True) == (4096, 4096, True)  # log2 distance 0.45 to 4k, 0.55 to 2k
    assert lookup(t, 1400, 1400) == (1024, 1024, False)  # below sqrt(1024 * 2048) = 1448
    assert lookup(t, 1449, 1449) == (2048, 2048, False)
    assert lookup(t, 100, 100) == (1024, 1024, False) and lookup(t, 10**6, 10**6) == (4096, 4096, False)
    # decode: S_q in the bucket of 1 (below sqrt(1 * 1024) = 32) uses the non-causal S_q=1 rows
    assert lookup(t, 1, 3000, True) == (1, 4096, False)
    assert lookup(t, 8, 1000, True) == (1, 1024, False)
    assert lookup(t, 64, 1024, False) == (1024, 1024, False)


def test_batch_counts_heads_and_bounds_go_up():
    t = make_table([row(1024, 1024, False, 1.0, batch=b) for b in (1, 4)], heads=32)
    batch = lambda b, h: t.row_for(s_q=1024, s_kv=1024, causal=False, head_dim=64, group=1, batch=b,  # noqa: E731
                                   heads_q=h).batch
    assert batch(1, 32) == 1 and batch(4, 32) == 4
    assert batch(2, 32) == 4  # on the bound sqrt(1 * 4) = 2: up
    assert batch(1, 128) == 4  # 1 x 128 heads is the work of 4 x 32
    assert batch(1, 16) == 1


def test_head_dim_and_group_exact_then_nearest():
    rows = [row(1024, 1024, False, x, head_dim=d, group=g) for d, g, x in
            ((64, 1, 0.5), (128, 1, 0.6), (128, 4, 0.7), (256, 4, 0.8))]
    t = make_table(rows)
    speed = lambda d, g: t.row_for(s_q=1024, s_kv=1024, causal=False, head_dim=d, group=g, batch=1,  # noqa: E731
                                   heads_q=4).fp8_speedup
    assert speed(64, 1) == pytest.approx(0.5) and speed(128, 4) == pytest.approx(0.7)
    assert speed(96, 1) == pytest.approx(0.6)  # 96 is nearer 128 than 64 in log2
    assert speed(128, 8) == pytest.approx(0.7)
    # (64, 4) is not a grid point: the nearest measured kind, (64, 1) and (128, 4) at distance 2 / 1
    assert speed(64, 4) == pytest.approx(0.7)
    assert speed(256, 1) == pytest.approx(0.8) or speed(256, 1) == pytest.approx(0.6)


def test_missing_grid_point_takes_the_nearest_row_ties_to_fp8():
    t = make_table([row(1024, 1024, False, 0.5), row(4096, 4096, False, 0.9, batch=8), row(4096, 4096, False, 1.2)])
    # (S=1024, B=8) was not measured: (1024, B=1) is 3 away in log2, (4096, B=8) 2 + 2 = 4
    assert t.row_for(s_q=1024, s_kv=1024, causal=False, head_dim=64, group=1, batch=8, heads_q=4).batch == 1
    # a tie: (S_q=1024, S_kv=4096) is 2 away from both prefill rows; the one where fp8 did best decides
    tie = make_table([row(1024, 1024, False, 0.5), row(4096, 4096, False, 1.2)])
    r = tie.row_for(s_q=1024, s_kv=4096, causal=False, head_dim=64, group=1, batch=1, heads_q=4)
    assert r.fp8_speedup == pytest.approx(1.2)
    # a causal flag never measured: the other one's rows
    nc = make_table([row(1024, 1024, False, 0.5)])
    assert nc.row_for(s_q=1024, s_kv=1024, causal=True, head_dim=64, group=1, batch=1, heads_q=4).s_q == 1024


def test_margin():
    for speedup, bf16 in ((0.5, True), (BF16_MARGIN - 0.005, True), (BF16_MARGIN + 0.005, False), (1.0, False),
                          (1.3, False)):
        t = make_table([row(1024, 1024, False, speedup)])
        assert t.prefers_bf16(s_q=1024, s_kv=1024, causal=False, head_dim=64, group=1, batch=1, heads_q=4) is bf16


def test_summary():
    t = make_table([row(1, 1024, False, 0.4), row(1, 4096, False, 0.5), row(1024, 1024, True, 0.9),
                    row(1024, 1024, False, 1.05), row(4096, 4096, True, 1.2)])
    assert t.summary() == ("bf16 on 3/5 measured shapes: decode (S_q=1) S_kv 1k-4k 2/2, causal prefill S 1k 1/2, "
                           "non-causal prefill none of 1")


# -------------------------------------------------------------------------------------------------- files


def test_dumps_round_trip(tmp_path):
    t = make_table(GRID)
    path = tmp_path / "cpu.json"
    path.write_text(speed_table.dumps(t))
    back = speed_table.load_table(path)
    assert back.rows == t.rows and (back.device, back.fp8_backend, back.bf16, back.heads) == ("cpu", "reference",
                                                                                              "sdpa", 4)
    assert json.loads(path.read_text())["rows"][0]["fp8_speedup"] == 1.0


@pytest.mark.parametrize("edit, message", [
    (lambda d: d.update(version=2), "'version' must be 1"),
    (lambda d: d.pop("fp8_backend"), "'fp8_backend' must be a non-empty string"),
    (lambda d: d.update(bf16="cudnn"), "'bf16' must be one of"),
    (lambda d: d.update(heads=0), "'heads' must be a positive integer"),
    (lambda d: d.update(rows=[]), "'rows' must be a non-empty list"),
    (lambda d: d["rows"].append(5), "row 8 must be an object"),
    (lambda d: d["rows"][1].update(s_kv=0), "row 1: 's_kv' must be a positive integer"),
    (lambda d: d["rows"][1].update(batch=True), "row 1: 'batch' must be a positive integer"),
    (lambda d: d["rows"][2].update(causal="yes"), "row 2: 'causal' must be true or false"),
    (lambda d: d["rows"][0].update(fp8_ms=-1.0), "row 0: 'fp8_ms' must be a positive finite number"),
    (lambda d: d["rows"][0].update(bf16_ms=math.inf), "row 0: 'bf16_ms' must be a positive finite number"),
    (lambda d: d["rows"].append(dict(d["rows"][0])), "row 8 repeats the shape of an earlier row"),
])
def test_malformed_table_is_a_clear_error(tmp_path, edit, message):
    data = table_data([dict(r) for r in GRID])
    edit(data)
    path = tmp_path / "cpu.json"
    path.write_text(json.dumps(data))
    with pytest.raises(SpeedTableError, match=message) as exc:
        speed_table.load_table(path)
    assert str(path) in str(exc.value) and "tune_dispatch.py" in str(exc.value)


def test_unreadable_and_invalid_json(tmp_path):
    with pytest.raises(SpeedTableError, match="cannot be read"):
        speed_table.load_table(tmp_path / "nope.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(SpeedTableError, match="not valid JSON"):
        speed_table.load_table(tmp_path / "bad.json")
    with pytest.raises(SpeedTableError, match="expected a JSON object"):
        parse_table([1, 2])


def test_packaged_tables_load_and_match_their_file_name(monkeypatch, tmp_path):
    for path in sorted(speed_table.TABLE_DIR.glob("*.json")):  # whatever is committed must load
        assert speed_table.load_table(path).device == path.stem
    monkeypatch.setattr(speed_table, "TABLE_DIR", tmp_path)
    assert speed_table._load_packaged() == {}
    (tmp_path / "sm90.json").write_text(json.dumps(table_data(GRID, device="sm90")))
    assert speed_table._load_packaged()["sm90"].device == "sm90"
    (tmp_path / "sm100.json").write_text(json.dumps(table_data(GRID, device="sm90")))
    with pytest.raises(SpeedTableError, match="file name says 'sm100'"):
        speed_table._load_packaged()


def test_packaged_tables_are_package_data():
    text = (Path(__file__).resolve().parents[2] / "pyproject.toml").read_text()
    assert '"tables/*.json"' in text


def test_env_off_and_env_path(monkeypatch, tmp_path, install):
    install(GRID)
    assert speed_table.table_for("cpu") is not None and speed_table.table_for("sm90") is None
    for off in ("off", "OFF", "0", "none"):
        monkeypatch.setenv(speed_table.ENV, off)
        assert speed_table.disabled() and speed_table.table_for("cpu") is None
    path = tmp_path / "mine.json"
    path.write_text(json.dumps(table_data([row(1024, 1024, False, 0.5)])))
    monkeypatch.setenv(speed_table.ENV, str(path))
    assert speed_table.table_for("cpu").rows[0].fp8_speedup == 0.5
    assert speed_table.table_for("sm90") is None  # a table is used only on its own device
    monkeypatch.setenv(speed_table.ENV, str(tmp_path / "missing.json"))
    with pytest.raises(SpeedTableError, match="missing.json"):
        speed_table.table_for("cpu")


# ----------------------------------------------------------------------------------------------- dispatch


def test_no_table_means_fp8_everywhere(install, monkeypatch):
    monkeypatch.setattr(speed_table, "PACKAGED", {})
    q, k, v = qkv()
    assert not dispatch.runs_bf16(q.device, "reference", batch=1, heads_q=4, heads_kv=2, s_q=16, s_kv=16,
                                  head_dim=64, causal=True)
    assert torch.equal(hfa.fp8_sdpa(q, k, v, is_causal=True), hfa.fp8_sdpa(q, k, v, is_causal=True,
                                                                             backend="reference"))
    assert dispatch.describe_dispatch(q.device) == (
        "no speed table for cpu: fp8 on every call (scripts/tune_dispatch.py measures one)")


@pytest.mark.parametrize("causal", [False, True])
def test_bf16_choice_is_torch_sdpa_exactly_and_named_backends_ignore_it(install, causal):
    install([row(16, 16, c, 0.5, group=2) for c in (False, True)] + [row(1, 16, False, 0.5, group=2)])
    q, k, v = qkv()
    out = hfa.fp8_sdpa(q, k, v, is_causal=causal)
    assert torch.equal(out, sdpa_bhsd(q, k, v, causal))
    assert out.transpose(1, 2).is_contiguous()  # fp8_sdpa's layout: a BHSD view of contiguous BSHD
    fp8 = hfa.fp8_sdpa(q, k, v, is_causal=causal, backend="reference")
    assert not torch.equal(fp8, out)
    assert torch.equal(fp8, sdpa._run(q, k, v, None, None, None, causal, None, dispatch.Plan("reference", "reference"),
                                      hfa.FP8AttentionOptions()).transpose(1, 2))
    # decode: one query sees every key, causal or not
    q1 = q[:, :, -1:]
    assert torch.equal(hfa.fp8_sdpa(q1, k, v, is_causal=causal), sdpa_bhsd(q1, k, v, False))


def test_fp8_where_the_table_says_fp8_or_off_or_another_backend(install, monkeypatch):
    q, k, v = qkv()
    fp8 = hfa.fp8_sdpa(q, k, v, is_causal=True, backend="reference")
    install([row(16, 16, True, 1.01, group=2)])
    assert torch.equal(hfa.fp8_sdpa(q, k, v, is_causal=True), fp8)
    install([row(16, 16, True, 0.5, group=2)], fp8_backend="triton")  # measured for another fp8 backend
    assert torch.equal(hfa.fp8_sdpa(q, k, v, is_causal=True), fp8)
    install([row(16, 16, True, 0.5, group=2)], bf16="fa3")  # measured against FA3, which this CPU lacks
    assert torch.equal(hfa.fp8_sdpa(q, k, v, is_causal=True), fp8)
    install([row(16, 16, True, 0.5, group=2)])
    monkeypatch.setenv(speed_table.ENV, "off")
    assert torch.equal(hfa.fp8_sdpa(q, k, v, is_causal=True), fp8)


def test_fused_rope_call_applies_rope_before_bf16(install):
    install([row(16, 16, True, 0.5, group=2)])
    q, k, v = qkv()
    g = torch.Generator().manual_seed(3)
    angles = torch.rand(1, 16, 32, generator=g) * 6
    cos, sin = (torch.cat([f(angles)] * 2, dim=-1).to(torch.bfloat16) for f in (torch.cos, torch.sin))
    out = hfa.fp8_sdpa(q, k, v, is_causal=True, cos=cos, sin=sin)
    qr, kr = (apply_rope_reference(t.float(), cos, sin).to(t.dtype) for t in (q, k))
    assert torch.equal(out, sdpa_bhsd(qr, kr, v, True))


def test_chunked_causal_prefill_stays_fp8_with_sdpa(install):
    """Bottom-right causal with 1 < S_q < S_kv would need an explicit mask in torch SDPA (not the measured
    kernel): fp8 keeps it."""
    install([row(16, 16, True, 0.5, group=2), row(16, 64, True, 0.5, group=2)])
    q, k, v = qkv(s_q=16, s_kv=64)
    assert torch.equal(hfa.fp8_sdpa(q, k, v, is_causal=True), hfa.fp8_sdpa(q, k, v, is_causal=True,
                                                                             backend="reference"))
    assert torch.equal(hfa.fp8_sdpa(q, k, v, is_causal=False), sdpa_bhsd(q, k, v, False))


def test_varlen_stays_fp8_without_fa3(install):
    install([row(16, 16, True, 0.5, group=2, batch=b) for b in (1, 2)])
    q, k, v = (t.transpose(1, 2).reshape(-1, t.shape[1], 64) for t in qkv(b=2))
    cu = torch.tensor([0, 16, 32], dtype=torch.int32)
    out = hfa.fp8_sdpa_varlen(q, k, v, cu, cu, is_causal=True)
    assert torch.equal(out, hfa.fp8_sdpa_varlen(q, k, v, cu, cu, is_causal=True, backend="reference"))


def test_decision_is_cached(install):
    table = install([row(16, 16, True, 0.5, group=2)])
    dispatch._prefers_bf16.cache_clear()
    shape = dict(batch=1, heads_q=4, heads_kv=2, s_q=16, s_kv=16, head_dim=64, causal=True)
    for _ in range(3):
        assert dispatch.runs_bf16(torch.device("cpu"), "reference", **shape)
    info = dispatch._prefers_bf16.cache_info()
    assert (info.misses, info.hits) == (1, 2)
    assert dispatch.speed_table_for(torch.device("cpu"), "reference") is table


def test_compile_fullgraph_decides_while_tracing(install):
    """The decision is taken while tracing; a dynamic sequence length guards on its bucket's bounds (one
    graph per bucket), not on its value."""
    import torch._dynamo.testing

    install([row(16, 16, True, 0.5, group=2), row(64, 64, True, 1.5, group=2)])
    torch._dynamo.reset()
    counter = torch._dynamo.testing.CompileCounter()
    f = torch.compile(lambda q, k, v: hfa.fp8_sdpa(q, k, v, is_causal=True) + 1, fullgraph=True, backend=counter)

    def inputs(s, seed):
        tensors = qkv(s_q=s, s_kv=s, seed=seed)
        for t in tensors:
            torch._dynamo.maybe_mark_dynamic(t, 2)  # the sequence length varies, as in a model
        return tensors

    for s, seed in ((16, 0), (20, 1), (24, 2)):  # one bf16 bucket (below sqrt(16 * 64) = 32)
        q, k, v = inputs(s, seed)
        assert torch.equal(f(q, k, v), sdpa_bhsd(q, k, v, True) + 1)
    assert counter.frame_count == 1
    for s, seed in ((64, 3), (48, 4)):  # the fp8 bucket: the bound's guard fails once, then one graph
        q, k, v = inputs(s, seed)
        assert torch.equal(f(q, k, v), hfa.fp8_sdpa(q, k, v, is_causal=True, backend="reference") + 1)
    assert counter.frame_count == 2
    torch._dynamo.reset()


def test_describe_dispatch(install, monkeypatch):
    cpu = torch.device("cpu")
    assert dispatch.describe_dispatch(cpu, backend="reference").startswith("fp8 on every call (backend 'reference'")
    install([row(1, 1024, False, 0.4, group=2), row(1024, 1024, True, 0.9, group=2),
             row(1024, 1024, False, 1.3, group=2)])
    assert dispatch.describe_dispatch(cpu) == (
        "speed table cpu (test, reference fp8 vs torch SDPA bf16): bf16 on 2/3 measured shapes: decode (S_q=1) "
        "S_kv 1k 1/1, causal prefill S 1k 1/1, non-causal prefill none of 1; fp8 elsewhere")
    monkeypatch.setenv(speed_table.ENV, "off")
    assert dispatch.describe_dispatch(cpu) == f"speed table off ({speed_table.ENV}=off): fp8 on every call"
    monkeypatch.delenv(speed_table.ENV)
    install([row(1024, 1024, True, 0.9)], fp8_backend="triton", bf16="fa3")
    assert dispatch.describe_dispatch(cpu) == (
        "speed table cpu measured triton fp8 vs FA3 bf16, this process runs reference fp8 and torch SDPA bf16: "
        "not used, fp8 on every call")


def test_device_key_and_bf16_impl(monkeypatch):
    assert dispatch.device_key(torch.device("cpu")) == "cpu" and dispatch.bf16_impl("cpu") == "sdpa"
    monkeypatch.setenv(dispatch.ARCH_ENV, "90")  # CPU tensors stay CPU tensors whatever the arch override
    assert dispatch.device_key(torch.device("cpu")) == "cpu" and dispatch.bf16_impl("cpu") == "sdpa"


# -------------------------------------------------------------------------------------------- FA3 bf16


@pytest.fixture
def fa3_stand_in(monkeypatch):
    """A stand-in ``flash_attn_interface`` (BSHD flash_attn_func / packed flash_attn_varlen_func computed with
    torch SDPA, bottom-right causal), recording its calls."""
    calls = []

    def attend(q, k, v, scale, causal):  # BSHD
        qb, kb, vb = (t.transpose(1, 2) for t in (q, k, v))
        mask = None
        if causal:
            mask = torch.ones(q.shape[1], k.shape[1], dtype=torch.bool).tril(k.shape[1] - q.shape[1])
        return F.scaled_dot_product_attention(qb, kb, vb, attn_mask=mask, scale=scale,
                                              enable_gqa=True).transpose(1, 2)

    def flash_attn_func(q, k, v, softmax_scale=None, causal=False):
        calls.append(("fixed", q.shape, causal, softmax_scale))
        return attend(q, k, v, softmax_scale, causal).contiguous(), None  # (out, lse) as some builds return

    def flash_attn_varlen_func(q, k, v, cu_q, cu_k, max_q, max_k, softmax_scale=None, causal=False):
        calls.append(("varlen", q.shape, causal, softmax_scale, max_q, max_k))
        cu_q, cu_k = cu_q.tolist(), cu_k.tolist()
        return torch.cat([attend(q[None, a:b], k[None, c:d], v[None, c:d], softmax_scale, causal)[0]
                          for a, b, c, d in zip(cu_q, cu_q[1:], cu_k, cu_k[1:])])

    module = types.ModuleType("flash_attn_interface")
    module.flash_attn_func, module.flash_attn_varlen_func = flash_attn_func, flash_attn_varlen_func
    monkeypatch.setitem(sys.modules, "flash_attn_interface", module)
    return calls


def test_bf16_attention_fa3_matches_sdpa(fa3_stand_in):
    q, k, v = qkv(s_q=8, s_kv=24)
    out = speed_table.bf16_attention(q, k, v, is_causal=True, scale=0.1, impl="fa3")
    assert out.shape == (1, 8, 4, 64)
    ref = F.scaled_dot_product_attention(q, k, v, scale=0.1, enable_gqa=True,
                                         attn_mask=torch.ones(8, 24, dtype=torch.bool).tril(16))
    assert torch.equal(out, ref.transpose(1, 2))
    assert fa3_stand_in == [("fixed", (1, 8, 4, 64), True, 0.1)]


def test_fp8_sdpa_runs_fa3_bf16_where_the_table_says(install, fa3_stand_in, monkeypatch):
    monkeypatch.setattr(dispatch, "bf16_impl", lambda device: "fa3")
    monkeypatch.setattr(sdpa, "bf16_impl", lambda device: "fa3")
    install([row(16, 16, True, 0.5, group=2, batch=b) for b in (1, 2)] + [row(16, 64, True, 0.5, group=2)],
            bf16="fa3")
    q, k, v = qkv(b=2)
    assert torch.equal(hfa.fp8_sdpa(q, k, v, is_causal=True), sdpa_bhsd(q, k, v, True))
    qc, kc, vc = qkv(s_q=16, s_kv=64)  # chunked causal prefill: FA3 is bottom-right natively
    hfa.fp8_sdpa(qc, kc, vc, is_causal=True)
    assert [c[:3] for c in fa3_stand_in] == [("fixed", (2, 16, 4, 64), True), ("fixed", (1, 16, 4, 64), True)]
    # packed sequences: FA3's bf16 varlen, looked up with the longest sequences and their number
    qp, kp, vp = (t.transpose(1, 2).reshape(-1, t.shape[1], 64) for t in (q, k, v))
    cu = torch.tensor([0, 10, 32], dtype=torch.int32)
    out = hfa.fp8_sdpa_varlen(qp, kp, vp, cu, cu, is_causal=True)
    assert fa3_stand_in[-1][0] == "varlen" and fa3_stand_in[-1][4:] == (22, 22)
    ref = torch.cat([sdpa_bhsd(*(t[a:b].transpose(0, 1)[None] for t in (qp, kp, vp)), True)[0].transpose(0, 1)
                     for a, b in ((0, 10), (10, 32))])
    assert torch.equal(out, ref)


# ------------------------------------------------------------------------------------ transformers adapter


def _tiny_llama(seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, head_dim=64, vocab_size=128, max_position_embeddings=256,
                         initializer_range=0.1)
    return LlamaForCausalLM(config).to(torch.bfloat16).eval()


def test_adapter_auto_name_runs_bf16_per_table_named_runs_fp8(install):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from hf_fp8_attention.transformers.attention import _ATTENTION_FORWARDS

    install([row(16, 16, True, 0.5, group=2)])
    module = torch.nn.Module()
    module.is_causal, module.num_key_value_groups = True, 2
    q, k, v = qkv()
    out, _ = _ATTENTION_FORWARDS["fp8"](module, q, k, v, None)
    ref, _ = sdpa_attention_forward(module, q, k, v, None)
    assert torch.equal(out, ref)
    named, _ = _ATTENTION_FORWARDS["fp8_reference"](module, q, k, v, None)
    assert torch.equal(named, hfa.fp8_sdpa(q, k, v, is_causal=True, backend="reference").transpose(1, 2))
    assert not torch.equal(named, ref)


def test_tiny_model_fp8_with_a_bf16_table_equals_sdpa(install):
    """The whole model under attn_implementation="fp8" with a table that says bf16 at its shape: sdpa's logits."""
    install([row(24, 24, True, 0.5, group=2, batch=2)])
    model = _tiny_llama()
    ids = torch.randint(1, 128, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        model.set_attn_implementation("sdpa")
        ref = model(ids, use_cache=False).logits
        model.set_attn_implementation("fp8")
        auto = model(ids, use_cache=False).logits
        model.set_attn_implementation("fp8_reference")
        named = model(ids, use_cache=False).logits
    assert torch.equal(auto, ref)
    assert not torch.equal(named, ref)


# ------------------------------------------------------------------------------------------------- script


def _load_script():
    spec = importlib.util.spec_from_file_location("hfa_scripts_tune_dispatch", SCRIPTS / "tune_dispatch.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


tune = _load_script()


def test_tune_dispatch_dry_run_writes_a_table(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv(speed_table.ENV, raising=False)
    out, md = tmp_path / "cpu.json", tmp_path / "cpu.md"
    assert tune.main(["--dry-run", "--seqlens", "16", "32", "--batches", "1", "--out", str(out),
                      "--markdown", str(md)]) == 0
    assert speed_table.ENV not in __import__("os").environ  # the script's "off" does not leak
    table = speed_table.load_table(out)
    assert (table.device, table.fp8_backend, table.bf16, table.heads) == ("cpu", "reference", "sdpa", 4)
    shapes = {(r.s_q, r.s_kv, r.causal, r.group, r.batch) for r in table.rows}
    assert shapes == ({(s, s, c, g, 1) for s in (16, 32) for c in (False, True) for g in (1, 2)}
                      | {(1, s, False, g, 1) for s in (16, 32) for g in (1, 2)})
    assert all(r.head_dim == 64 and r.bf16_ms > 0 and r.fp8_ms > 0 for r in table.rows)
    data = json.loads(out.read_text())
    assert data["command"].startswith("python scripts/tune_dispatch.py --dry-run") and "versions" in data
    printed = capsys.readouterr().out
    assert "[12/12]" in printed and "| kind | causal | D | H_q/H_kv | B | S=16 | S=32 |" in printed
    assert md.read_text().strip() in printed
    assert f"# cpu: {table.summary()}" in printed


def test_tune_dispatch_budget_and_skips(tmp_path, capsys, monkeypatch):
    out = tmp_path / "cpu.json"
    assert tune.main(["--dry-run", "--budget-s", "0", "--out", str(out)]) == 1
    assert not out.exists() and "no table written" in capsys.readouterr().err
    calls = []
    real = tune.time_shape

    def flaky(shape, *a):
        calls.append(shape)
        if len(calls) == 2:
            raise torch.OutOfMemoryError("pretend")
        return real(shape, *a)

    monkeypatch.setattr(tune, "time_shape", flaky)
    assert tune.main(["--dry-run", "--seqlens", "16", "--kinds", "decode", "--batches", "1", "--out", str(out)]) == 0
    data = json.loads(out.read_text())
    assert len(data["rows"]) == 1 and data["skipped"][0]["reason"] == "OutOfMemoryError: pretend"
    assert "skipped (OutOfMemoryError: pretend)" in capsys.readouterr().out


def test_tune_dispatch_default_grid():
    args = tune.parse_args(["--device", "cpu", "--out", "x.json"])
    shapes = tune.grid(args)
    prefill = [s for s in shapes if s.s_q > 1]
    decode = [s for s in shapes if s.s_q == 1]
    # B=1: 8 lengths, B=8: up to 16k (128k tokens), each causal and not, D 64/128/256, H_kv 32 and 8
    assert len(prefill) == (8 + 5) * 2 * 3 * 2
    assert len(decode) == (8 + 6) * 3 * 2  # B=8 decode up to 32k (256k tokens)
    assert max(s.batch * s.s_kv for s in prefill) == 131072
    assert shapes == sorted(shapes, key=lambda s: s.cost(32)) and shapes[-1].s_kv == 131072
    assert args.budget_s is None and tune.parse_args(["--dry-run", "--out", "x"]).budget_s is None


@pytest.mark.parametrize("argv, message", [
    (["--dry-run", "--device", "cuda"], "runs on the CPU"),
    (["--device", "cpu"], "pass --out on the CPU"),
    (["--device", "cpu", "--out", "x", "--heads", "32", "--kv-heads", "5"], "multiple of every --kv-heads"),
    (["--device", "cpu", "--out", "x", "--head-dims", "80"], "supports"),
    (["--device", "cpu", "--out", "x", "--seqlens", "0"], "--seqlens must be positive"),
    (["--device", "cpu", "--out", "x", "--min-samples", "5", "--max-samples", "2"], "--max-samples"),
])
def test_tune_dispatch_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        tune.parse_args(argv)
    assert exc.value.code == 2 and message in capsys.readouterr().err
