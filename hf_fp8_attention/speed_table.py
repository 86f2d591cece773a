"""fp8 vs bf16 speed per shape: the measured table that lets the auto path run bf16 where fp8 is slower.

The auto path (``fp8_sdpa(backend=None)``, attn_implementation ``fp8``) quantizes Q/K/V on every call; on
short causal prefill and on decode from a bf16 cache that costs more than the fp8 kernel saves. A table,
one JSON file per GPU architecture (``tables/sm90.json``, written by ``scripts/tune_dispatch.py``), holds
for a grid of shapes the time of `bf16_attention` and of the auto fp8 path (quantization included),
measured side by side. A call runs bf16 when its grid point measured fp8 slower than bf16 by more than
`BF16_MARGIN` (`SpeedTable.prefers_bf16`); named backends never look at the table (`dispatch`).

Lookup (`SpeedTable.row_for`), cheap and traceable (comparisons with constants only, so under
torch.compile a symbolic length guards on its bucket's bounds instead of specialising on its value):

- each of head_dim, GQA group (H_q / H_kv), S_q, S_kv and batch x H_q is snapped to the nearest measured
  value in log2 (the bucket containing it; bounds at the geometric midpoints, a value on a bound goes up);
  batch x H_q is compared with the table's batch x ``heads`` (the kernels parallelise over both);
- S_q in the decode bucket (1) uses the non-causal rows (bottom-right causal with a handful of queries is
  nearly unmasked);
- that grid point's row decides; where the grid has none (e.g. batch 8 measured only up to 16k tokens),
  the row nearest to it in log2 (head_dim and group first, then S_q + S_kv + batch) decides, ties to the
  row where fp8 did best.

File format (``version`` 1): ``device`` ("sm90", "cpu"), ``device_name``, ``fp8_backend`` (the backend
the auto path planned when measuring: the table applies only where it plans the same one), ``bf16``
("fa3" or "sdpa": the bf16 attention measured, idem), ``heads`` (H_q of the measured shapes), ``rows``:
``{"s_q", "s_kv", "causal", "head_dim", "group", "batch", "bf16_ms", "fp8_ms"}``. Other keys (``created``,
``command``, ``versions``, a row's ``fp8_speedup``) are for readers and ignored.

`bf16_attention` / `bf16_attention_varlen` are what a bf16 decision runs (and what the script times):
FA3 bf16 (``flash_attn_interface``) or torch SDPA, RoPE applied first when cos/sin come with the call.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import torch

from .attention import _exact_attention
from .quantization import apply_rope_reference

ENV = "HF_FP8_ATTENTION_SPEED_TABLE"  # "off": fp8 on every call; a path: that table instead of the packaged ones
OFF_VALUES = ("off", "0", "false", "no", "none")
TABLE_DIR = Path(__file__).resolve().parent / "tables"
FORMAT_VERSION = 1
# bf16 only where fp8 measured more than 2% slower: within timing noise the auto path stays fp8 (today's
# behaviour, and the point of the package).
BF16_MARGIN = 0.98
BF16_IMPLS = ("fa3", "sdpa")
_ROW_INTS = ("s_q", "s_kv", "head_dim", "group", "batch")
_ROW_TIMES = ("bf16_ms", "fp8_ms")


class SpeedTableError(ValueError):
    """A table file that cannot be used: the message names the file and what is wrong in it."""


class Row(NamedTuple):
    s_q: int
    s_kv: int
    causal: bool
    head_dim: int
    group: int
    batch: int
    bf16_ms: float
    fp8_ms: float

    @property
    def fp8_speedup(self) -> float:
        """bf16 time / fp8 time: > 1 where fp8 is faster."""
        return self.bf16_ms / self.fp8_ms


def _bounds(values: tuple[int, ...]) -> tuple[float, ...]:
    """Geometric midpoints between consecutive sorted values: nearest in log2 = below which bound."""
    return tuple(math.sqrt(a * b) for a, b in zip(values, values[1:]))


def _snap(x, values: tuple[int, ...], bounds: tuple[float, ...]) -> int:
    """The value of ``values`` nearest to ``x`` in log2. Only comparisons touch ``x`` (it may be symbolic)."""
    for value, bound in zip(values, bounds):
        if x < bound:
            return value
    return values[-1]


def _log_distance(a: float, b: float) -> float:
    return abs(math.log2(a) - math.log2(b))


@dataclass(frozen=True, eq=False)  # hashed by identity: a cheap lru_cache key
class SpeedTable:
    device: str
    device_name: str
    fp8_backend: str
    bf16: str
    heads: int
    rows: tuple[Row, ...]
    source: str = ""
    meta: dict = field(default_factory=dict, repr=False)

    def __post_init__(self):
        by_key = {(r.causal, r.head_dim, r.group, r.s_q, r.s_kv, r.batch): r for r in self.rows}
        axes = {}
        for name in ("head_dim", "group", "s_q", "s_kv", "batch"):
            values = tuple(sorted({getattr(r, name) for r in self.rows}))
            axes[name] = (values, _bounds(values))
        object.__setattr__(self, "_by_key", by_key)
        object.__setattr__(self, "_axes", axes)

    def _snapped(self, name: str, x) -> int:
        values, bounds = self._axes[name]
        return _snap(x, values, bounds)

    def row_for(self, *, s_q, s_kv, causal: bool, head_dim, group, batch, heads_q) -> Row:
        """The measured row that decides a call of this shape (see the module docstring)."""
        values, bounds = self._axes["batch"]
        batch_bucket = _snap(batch * heads_q, tuple(v * self.heads for v in values),
                             tuple(b * self.heads for b in bounds)) // self.heads
        key = (self._snapped("head_dim", head_dim), self._snapped("group", group), self._snapped("s_q", s_q),
               self._snapped("s_kv", s_kv), batch_bucket)
        causal = bool(causal) and key[2] > 1
        row = self._by_key.get((causal, *key))
        return row if row is not None else self._nearest(causal, *key)

    def _nearest(self, causal: bool, head_dim: int, group: int, s_q: int, s_kv: int, batch: int) -> Row:
        rows = [r for r in self.rows if r.causal == causal] or list(self.rows)
        kind = lambda r: _log_distance(r.head_dim, head_dim) + _log_distance(r.group, group)  # noqa: E731
        best = min(map(kind, rows))
        rows = [r for r in rows if kind(r) == best]
        size = lambda r: (_log_distance(r.s_q, s_q) + _log_distance(r.s_kv, s_kv)  # noqa: E731
                          + _log_distance(r.batch, batch))
        return min(rows, key=lambda r: (size(r), -r.fp8_speedup))

    def prefers_bf16(self, **shape) -> bool:
        """Whether the row deciding this shape (`row_for` keywords) measured bf16 faster by the margin."""
        return self.row_for(**shape).fp8_speedup < BF16_MARGIN

    def summary(self) -> str:
        """Which measured shapes run bf16, e.g. "bf16 on 40/264 measured shapes: decode (S_q=1) S_kv 1k-128k
        40/48, causal prefill none of 108, non-causal prefill none of 108"."""
        groups = {"decode (S_q=1)": lambda r: r.s_q == 1,
                  "causal prefill": lambda r: r.s_q > 1 and r.causal,
                  "non-causal prefill": lambda r: r.s_q > 1 and not r.causal}
        bf16 = [r for r in self.rows if r.fp8_speedup < BF16_MARGIN]
        parts = []
        for name, member in groups.items():
            total = [r for r in self.rows if member(r)]
            if not total:
                continue
            picked = [r for r in bf16 if member(r)]
            if not picked:
                parts.append(f"{name} none of {len(total)}")
                continue
            lengths = sorted({r.s_kv for r in picked})
            what = "S_kv" if name.startswith("decode") else "S"
            span = _fmt_len(lengths[0]) + ("" if len(lengths) == 1 else f"-{_fmt_len(lengths[-1])}")
            parts.append(f"{name} {what} {span} {len(picked)}/{len(total)}")
        return f"bf16 on {len(bf16)}/{len(self.rows)} measured shapes: " + ", ".join(parts)


def _fmt_len(n: int) -> str:
    return f"{n // 1024}k" if n >= 1024 and n % 1024 == 0 else str(n)


# --- files ------------------------------------------------------------------------------------------------


def _fail(source, message: str):
    raise SpeedTableError(f"speed table {source}: {message} (re-run scripts/tune_dispatch.py to rewrite it, or "
                          f"set {ENV}=off for fp8 on every call)")


def _positive_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def parse_table(data, source: str = "<dict>") -> SpeedTable:
    """A validated `SpeedTable` from a table's JSON object; `SpeedTableError` saying what is wrong."""
    if not isinstance(data, dict):
        _fail(source, f"expected a JSON object, got {type(data).__name__}")
    if data.get("version") != FORMAT_VERSION:
        _fail(source, f"'version' must be {FORMAT_VERSION}, got {data.get('version')!r}")
    for name in ("device", "device_name", "fp8_backend", "bf16"):
        if not isinstance(data.get(name), str) or not data[name]:
            _fail(source, f"{name!r} must be a non-empty string, got {data.get(name)!r}")
    if data["bf16"] not in BF16_IMPLS:
        _fail(source, f"'bf16' must be one of {BF16_IMPLS}, got {data['bf16']!r}")
    if not _positive_int(data.get("heads")):
        _fail(source, f"'heads' must be a positive integer, got {data.get('heads')!r}")
    rows = data.get("rows")
    if not isinstance(rows, list) or not rows:
        _fail(source, "'rows' must be a non-empty list")
    parsed, seen = [], set()
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            _fail(source, f"row {i} must be an object, got {type(row).__name__}")
        for name in _ROW_INTS:
            if not _positive_int(row.get(name)):
                _fail(source, f"row {i}: {name!r} must be a positive integer, got {row.get(name)!r}")
        if not isinstance(row.get("causal"), bool):
            _fail(source, f"row {i}: 'causal' must be true or false, got {row.get('causal')!r}")
        for name in _ROW_TIMES:
            value = row.get(name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not (0 < value < math.inf):
                _fail(source, f"row {i}: {name!r} must be a positive finite number of milliseconds, got {value!r}")
        r = Row(*(row[name] for name in Row._fields))
        key = (r.causal, r.head_dim, r.group, r.s_q, r.s_kv, r.batch)
        if key in seen:
            _fail(source, f"row {i} repeats the shape of an earlier row {dict(zip(Row._fields, key))}")
        seen.add(key)
        parsed.append(r._replace(bf16_ms=float(r.bf16_ms), fp8_ms=float(r.fp8_ms)))
    meta = {k: v for k, v in data.items() if k not in ("rows",)}
    return SpeedTable(data["device"], data["device_name"], data["fp8_backend"], data["bf16"], data["heads"],
                      tuple(parsed), source, meta)


def load_table(path) -> SpeedTable:
    """Read and validate one table file."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        _fail(path, f"cannot be read ({e.strerror or e})")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        _fail(path, f"is not valid JSON ({e})")
    return parse_table(data, str(path))


def table_json(table: SpeedTable) -> dict:
    """The JSON object of ``table`` (its ``meta`` keys first, rows with their fp8 speedup for readers)."""
    data = {**table.meta, "version": FORMAT_VERSION, "device": table.device, "device_name": table.device_name,
            "fp8_backend": table.fp8_backend, "bf16": table.bf16, "heads": table.heads}
    data["rows"] = [{**r._asdict(), "fp8_speedup": round(r.fp8_speedup, 4)} for r in table.rows]
    return data


def dumps(table: SpeedTable) -> str:
    """`table_json` as text: the header keys indented, one row per line (a table diffs row by row)."""
    data = table_json(table)
    rows = data.pop("rows")
    head = json.dumps(data, indent=1)[:-2]  # without the closing brace
    body = ",\n".join("  " + json.dumps(r) for r in rows)
    return f'{head},\n "rows": [\n{body}\n ]\n}}\n'


def _load_packaged() -> dict[str, SpeedTable]:
    tables = {}
    for path in sorted(TABLE_DIR.glob("*.json")) if TABLE_DIR.is_dir() else ():
        table = load_table(path)
        if table.device != path.stem:
            _fail(path, f"its 'device' is {table.device!r} but the file name says {path.stem!r}")
        tables[table.device] = table
    return tables


# Loaded at import: a traced call (torch.compile) must find them in memory, never read a file.
PACKAGED: dict[str, SpeedTable] = _load_packaged()
_FROM_PATH: dict[str, SpeedTable] = {}


def _from_path(path: str) -> SpeedTable:
    if path not in _FROM_PATH:
        _FROM_PATH[path] = load_table(path)
    return _FROM_PATH[path]


def _env_setting() -> str:
    return os.environ.get(ENV, "").strip()


def disabled() -> bool:
    """Whether the user turned the table off (``HF_FP8_ATTENTION_SPEED_TABLE=off``): fp8 on every call."""
    return _env_setting().lower() in OFF_VALUES


def table_for(device_key: str) -> SpeedTable | None:
    """The table for ``device_key`` ("sm90", "cpu"): the file named by ``HF_FP8_ATTENTION_SPEED_TABLE`` when
    set (used only if its device matches), else the packaged one; None when off or missing."""
    setting = _env_setting()
    if setting.lower() in OFF_VALUES:
        return None
    if setting:
        table = _from_path(setting)
        return table if table.device == device_key else None
    return PACKAGED.get(device_key)


if _env_setting() and not disabled():  # a bad path fails at import, with the variable named
    try:
        _from_path(_env_setting())
    except SpeedTableError as e:
        raise SpeedTableError(f"{ENV}={_env_setting()!r}: {e}") from None


# --- the bf16 attention a bf16 decision runs ------------------------------------------------------------


def _rope(query, key, cos, sin):
    # as the quantizer applies it (float32, rotate-half), then back to the input dtype
    return tuple(apply_rope_reference(t.float(), cos, sin).to(t.dtype) for t in (query, key))


def _first(out):
    return out[0] if isinstance(out, tuple) else out  # some FA3 builds return (out, softmax_lse)


def bf16_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *, is_causal: bool,
                   scale: float | None, impl: str, cos=None, sin=None) -> torch.Tensor:
    """Attention in the input dtype (bf16/fp16) with `fp8_sdpa`'s semantics.

    query (B, H_q, S_q, D), key/value (B, H_kv, S_kv, D), any strides; causal bottom-right; cos/sin
    (B or 1, S_q, D) rotate un-rotated query/key first. impl "fa3": ``flash_attn_interface.flash_attn_func``
    (Hopper); "sdpa": torch SDPA (`attention._exact_attention`, the straight-through backward's attention).
    Returns (B, S_q, H_q, D) contiguous.
    """
    if cos is not None:
        query, key = _rope(query, key, cos, sin)
    scale = float(scale) if scale is not None else query.shape[-1] ** -0.5
    if impl == "fa3":
        from flash_attn_interface import flash_attn_func

        q, k, v = (t.transpose(1, 2) for t in (query, key, value))  # BSHD views, no copy
        return _first(flash_attn_func(q, k, v, softmax_scale=scale, causal=bool(is_causal)))
    return _exact_attention(query, key, value, None, None, bool(is_causal), scale).contiguous()


def bf16_attention_varlen(query, key, value, cu_seqlens_q, cu_seqlens_k, max_seqlen_q: int, max_seqlen_k: int, *,
                          is_causal: bool, scale: float | None, cos=None, sin=None) -> torch.Tensor:
    """Packed sequences (total, H, D) with int32 offsets on the device -> (total_q, H_q, D), through FA3's
    ``flash_attn_varlen_func`` (one launch; the only bf16 varlen the auto path uses). cos/sin (1, total_q, D)."""
    from flash_attn_interface import flash_attn_varlen_func

    if cos is not None:
        q4, k4 = _rope(query.transpose(0, 1)[None], key.transpose(0, 1)[None], cos, sin)
        query, key = q4[0].transpose(0, 1), k4[0].transpose(0, 1)
    scale = float(scale) if scale is not None else query.shape[-1] ** -0.5
    return _first(flash_attn_varlen_func(query, key, value, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                         softmax_scale=scale, causal=bool(is_causal)))
