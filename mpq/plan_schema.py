"""The plan file's schema: every field's type and range, checked before anything uses it.

A plan is input like any other file: it may be hand-edited, truncated or made by an attacker,
and the later stages turn its numbers into C array offsets and loop bounds. So `load_plan`
refuses, in one line naming the field (`tensors[3].offset: ...`), anything the search could
not have written: unknown or missing keys, bools or floats where ints belong, bitwidths the
kernels do not have, non-finite scales, misaligned offsets, paths in the model name,
oversized lists. Whether the plan fits its *model* (tensor set, sizes,
offsets, patch geometry) is `mpq.plan_check`'s job; this module needs only the JSON.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from typing import Any

from mpq.errors import MpqError
from mpq.memory import ALIGN
from mpq.quant.arith import qrange
from mpq.quant.weights import EXPORT_BITS, ROUNDING, ROUNDING_BITS, SCHEMES

ACT_BITS = (8, 4, 2)  # the activation bitwidths the kernels read and write (DESIGN §4.2)
MAX_ITEMS = 100_000  # tensors, layers, notes, list entries: far above any MCU model
MAX_STR = 4096
MAX_BYTES = (1 << 31) - 1  # sizes and offsets become int32 C constants
MAX_COUNT = (1 << 63) - 1  # MACs and BitOPs: int64
MAX_DEPTH = 8  # nesting of the free-form `search` and `board` dicts
HEX64 = re.compile(r"[0-9a-f]{64}")
BASE64 = re.compile(r"(?:[A-Za-z0-9+/]{4})*(?:[A-Za-z0-9+/]{2}==|[A-Za-z0-9+/]{3}=)?")

TENSOR_KEYS = {"name", "bits", "scale", "zero_point", "bytes", "offset", "outlier_branch",
               "range8"}
LAYER_KEYS = {"name", "op", "w_bits", "a_bits_in", "a_bits_out", "macs", "bitops"}
LAYER_OPTIONAL = {"w_scheme", "w_params", "bias_correction"}
MAX_ROUNDING = 1 << 26  # base64 characters of an AdaRound mask: 50 M weights
PLAN_KEYS = {"model", "model_sha256", "graph_fingerprint", "board", "strategy", "patch",
             "schedule", "tensors", "layers", "predicted", "search", "schema", "notes"}
PATCH_KEYS = {"split_layer", "n", "split_tensor", "stage_nodes", "redundant_macs",
              "redundant_macs_percent", "tiles", "vdpc"}
VDPC_KEYS = {"map", "phi", "z", "mu", "sigma", "lo_threshold", "hi_threshold", "min_outliers",
             "outlier_rate", "samples", "regions"}
PREDICTED_KEYS = {"arena_bytes", "scratch_bytes", "peak_sram_bytes", "input_bytes",
                  "sram_needed_bytes", "flash_bytes", "code_bytes_estimate", "macs", "bitops",
                  "bitops_int8", "expected_bitops", "full_precision_bitops"}
SEARCH_KEYS = {"objective", "objective_solver", "solver", "lambda", "phi", "bins", "phi_norm",
               "range_method", "candidate_bits", "weight_bits", "qbr", "vdpc", "patches",
               "ilp_rounds", "repaired_groups"}
SEARCH_OPTIONAL = {"weights", "importance", "importance_total", "bitops_budget", "measured",
                   "bias_correction", "adaround", "order",
                   "latency"}  # `search --latency`: the candidates compared (mpq.search.latency)
# output_bytes: plans since the budgets fix; stack_bytes: since the model's stack is counted;
# instructions: since the latency model (mpq.latency)
PREDICTED_OPTIONAL = {"fidelity", "output_bytes", "stack_bytes", "instructions"}
FIDELITY_KEYS = {"samples", "data", "damage", "outputs", "int8"}
SUMMARY_KEYS = {"top1_agreement", "cosine", "sqnr_db", "exact"}


class PlanFieldError(MpqError):
    """A field of the plan is wrong; `field` is its path (`tensors[3].offset`)."""

    def __init__(self, field: str, what: str) -> None:
        super().__init__(f"{field}: {what}")
        self.field = field


def fail(field: str, what: str) -> PlanFieldError:
    """The error for `field` (raised by the caller, so the checks read as `raise fail(...)`)."""
    return PlanFieldError(field, what)


def _show(v: Any) -> str:
    """A value as the message quotes it: short, one line, no control characters."""
    text = repr(v) if isinstance(v, str) else _json_type(v) if isinstance(v, dict | list) \
        else str(v).lower() if isinstance(v, bool) or v is None else str(v)
    text = "".join(c if c.isprintable() else "?" for c in text)
    return text if len(text) <= 40 else text[:37] + "..."


def _json_type(v: Any) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "a boolean"
    if isinstance(v, int):
        return "an integer"
    if isinstance(v, float):
        return "a number"
    if isinstance(v, str):
        return "a string"
    if isinstance(v, list):
        return "a list"
    return "an object"


def is_int(v: Any) -> bool:
    """A JSON integer: Python int but not bool (True is an int to Python, not to a plan)."""
    return isinstance(v, int) and not isinstance(v, bool)


def req_int(v: Any, field: str, lo: int = 0, hi: int = MAX_COUNT) -> int:
    """An integer in [lo, hi]; 8.0, "8" and true are refused (the C side needs exact ints)."""
    if not is_int(v):
        raise fail(field, f"must be an integer, got {_show(v)} ({_json_type(v)})")
    if not lo <= v <= hi:
        raise fail(field, f"must be in [{lo}, {hi}], got {v}")
    return v


def req_num(v: Any, field: str, lo: float = -math.inf, hi: float = math.inf,
            positive: bool = False) -> float:
    """A finite number in [lo, hi] (strictly > 0 when `positive`); NaN and ±inf refused."""
    if not (isinstance(v, int | float) and not isinstance(v, bool)):
        raise fail(field, f"must be a number, got {_show(v)} ({_json_type(v)})")
    if not math.isfinite(v):
        raise fail(field, f"must be finite, got {_show(v)}")
    if positive and not v > 0:
        raise fail(field, f"must be > 0, got {_show(v)}")
    if not lo <= v <= hi:
        raise fail(field, f"must be in [{lo}, {hi}], got {_show(v)}")
    return float(v)


def req_str(v: Any, field: str, max_len: int = MAX_STR) -> str:
    """A non-empty string of at most `max_len` characters.

    Any character is allowed: ONNX names (and file names) may hold newlines or escape codes,
    and a plan `mpq search` wrote must load again. Such text is harmless in JSON; every output
    that shows it filters it for its own language (`mpq.codegen.render`, `mpq.safetext`)."""
    if not isinstance(v, str):
        raise fail(field, f"must be a string, got {_show(v)} ({_json_type(v)})")
    if not v or len(v) > max_len:
        raise fail(field, f"must be a string of 1 to {max_len} characters, got {len(v)}")
    return v


def req_bool(v: Any, field: str) -> bool:
    if not isinstance(v, bool):
        raise fail(field, f"must be true or false, got {_show(v)} ({_json_type(v)})")
    return v


def req_list(v: Any, field: str, max_len: int = MAX_ITEMS, length: int | None = None
             ) -> list[Any]:
    """A list of at most `max_len` entries (exactly `length` when given)."""
    if not isinstance(v, list):
        raise fail(field, f"must be a list, got {_show(v)} ({_json_type(v)})")
    if length is not None and len(v) != length:
        raise fail(field, f"must have {length} entries, got {len(v)}")
    if len(v) > max_len:
        raise fail(field, f"must have at most {max_len} entries, got {len(v)}")
    return v


def req_dict(v: Any, field: str, required: set[str] | None = None,
             optional: set[str] | frozenset[str] = frozenset()) -> dict[str, Any]:
    """An object; with `required`, exactly those keys plus any of `optional` (an unknown key is
    refused: it is either a typo or something this mpq would silently ignore)."""
    if not isinstance(v, dict):
        raise fail(field, f"must be an object, got {_show(v)} ({_json_type(v)})")
    if len(v) > MAX_ITEMS:
        raise fail(field, f"must have at most {MAX_ITEMS} keys, got {len(v)}")
    if required is not None:
        missing = sorted(required - set(v))
        if missing:
            raise fail(_join(field, missing[0]), "missing")
        unknown = sorted(set(v) - required - set(optional))
        if unknown:
            raise fail(_join(field, unknown[0]), "unknown key")
    return v


def _join(field: str, key: str) -> str:
    return f"{field}.{key}" if field else key


def req_act_bits(v: Any, field: str) -> int:
    """An activation bitwidth the kernels have: 8, 4 or 2."""
    if not is_int(v) or v not in ACT_BITS:
        raise fail(field, f"must be one of {', '.join(map(str, ACT_BITS))}, got {_show(v)}")
    return v


def optional(check: Callable[..., Any], v: Any, field: str, *args: Any, **kw: Any) -> Any:
    """`check(v, field, ...)` unless v is null."""
    return None if v is None else check(v, field, *args, **kw)


def check_json_value(v: Any, field: str, depth: int = 0) -> None:
    """Free-form JSON (the `search` dict's importance table): bounded depth and sizes, finite
    numbers, strings without control characters."""
    if depth > MAX_DEPTH:
        raise fail(field, f"nested deeper than {MAX_DEPTH} levels")
    if isinstance(v, dict):
        req_dict(v, field)
        for k, item in v.items():
            req_str(k, f"{field} key")
            check_json_value(item, _join(field, k), depth + 1)
    elif isinstance(v, list):
        req_list(v, field)
        for i, item in enumerate(v):
            check_json_value(item, f"{field}[{i}]", depth + 1)
    elif isinstance(v, str):
        req_str(v, field) if v else None
    elif isinstance(v, float):
        req_num(v, field)
    elif isinstance(v, int) and not isinstance(v, bool):
        req_int(v, field, -MAX_COUNT, MAX_COUNT)


# -- the plan's parts ---------------------------------------------------------------------------

def check_quant(d: dict[str, Any], field: str) -> None:
    """bits, scale and zero point of one branch: bits in 8/4/2, scale finite > 0, zero point in
    the signed b-bit range (DESIGN §4.2: real = scale·(q − zp), q in [−2^(b−1), 2^(b−1)−1])."""
    bits = req_act_bits(d["bits"], f"{field}.bits")
    req_num(d["scale"], f"{field}.scale", positive=True)
    lo, hi = qrange(bits)
    req_int(d["zero_point"], f"{field}.zero_point", lo, hi)


def check_tensor(t: Any, field: str) -> None:
    """One entry of `tensors` (see `mpq.plan.TensorPlan`)."""
    req_dict(t, field, TENSOR_KEYS)
    req_str(t["name"], f"{field}.name")
    check_quant(t, field)
    req_int(t["bytes"], f"{field}.bytes", 0, MAX_BYTES)
    off = t["offset"]
    if off is not None and not (is_int(off) and 0 <= off <= MAX_BYTES and off % ALIGN == 0):
        raise fail(f"{field}.offset", f"must be a non-negative multiple of {ALIGN}, got "
                                      f"{_show(off)}")
    if t["outlier_branch"] is not None:
        ob = req_dict(t["outlier_branch"], f"{field}.outlier_branch",
                      {"bits", "scale", "zero_point"})
        check_quant(ob, f"{field}.outlier_branch")
    r = req_list(t["range8"], f"{field}.range8", length=2)  # eval's int8 baseline reads it
    lo = req_num(r[0], f"{field}.range8[0]")
    req_num(r[1], f"{field}.range8[1]", lo=lo)


def check_w_params(p: Any, field: str, scheme: str, bits: int) -> None:
    """What rebuilds a layer's weights (`mpq.quant.weights`): for wentropy, at most 2^(b−1)−1
    ascending finite boundaries and a 2^b-entry int8 codebook; for linear, AdaRound's rounding
    mask (base64 text, 4- or 2-bit weights; its length is checked against the model's layer by
    `plan_check`); other schemes: small scalars."""
    if scheme == "linear":
        req_dict(p, field, {ROUNDING})
        if bits not in ROUNDING_BITS:
            raise fail(f"{field}.{ROUNDING}", f"AdaRound rounding is for "
                       f"{' and '.join(map(str, ROUNDING_BITS))}-bit weights, not {bits}")
        text = req_str(p[ROUNDING], f"{field}.{ROUNDING}", MAX_ROUNDING)
        if not BASE64.fullmatch(text):
            raise fail(f"{field}.{ROUNDING}", "must be base64 text")
        return
    req_dict(p, field)
    for k, v in p.items():
        req_str(k, f"{field} key", 64)
        if isinstance(v, list):
            req_list(v, f"{field}.{k}", 1 << 8)
        check_json_value(v, f"{field}.{k}", MAX_DEPTH - 1)
    if scheme != "wentropy":
        return
    req_dict(p, field, {"normalise", "boundaries", "codebook"})
    req_str(p["normalise"], f"{field}.normalise", 64)
    h = 1 << (bits - 1)
    bounds = req_list(p["boundaries"], f"{field}.boundaries", h - 1)
    prev = -math.inf
    for i, b in enumerate(bounds):
        prev = req_num(b, f"{field}.boundaries[{i}]", lo=prev)
    cb = req_list(p["codebook"], f"{field}.codebook", length=2 * h)
    for i, c in enumerate(cb):
        req_int(c, f"{field}.codebook[{i}]", -128, 127)


def check_layer(layer: Any, field: str) -> None:
    """One entry of `layers` (see `mpq.plan.LayerPlan`): weight bits as the scheme stores them
    (`weights.EXPORT_BITS`; no key: linear), activation bits 8/4/2."""
    req_dict(layer, field, LAYER_KEYS, LAYER_OPTIONAL)
    req_str(layer["name"], f"{field}.name")
    req_str(layer["op"], f"{field}.op", 64)
    scheme = layer.get("w_scheme", "linear")
    if "w_scheme" in layer:
        if not isinstance(scheme, str) or scheme not in SCHEMES or not EXPORT_BITS[scheme]:
            raise fail(f"{field}.w_scheme", "must be one of "
                       f"{', '.join(s for s in SCHEMES if EXPORT_BITS[s])}, got {_show(scheme)}")
    w = layer["w_bits"]
    if w is not None and (not is_int(w) or w not in EXPORT_BITS[scheme]):
        raise fail(f"{field}.w_bits", f"must be null or one of "
                   f"{', '.join(map(str, EXPORT_BITS[scheme]))} ({scheme} weights), got "
                   f"{_show(w)}")
    if w is None and "w_scheme" in layer:
        raise fail(f"{field}.w_scheme", "set on a layer without weights (w_bits is null)")
    if "w_params" in layer:
        if "w_scheme" not in layer or w is None:
            raise fail(f"{field}.w_params", "set without w_scheme and w_bits")
        check_w_params(layer["w_params"], f"{field}.w_params", scheme, w)
    if "bias_correction" in layer:
        if w is None:
            raise fail(f"{field}.bias_correction", "set on a layer without weights")
        for i, v in enumerate(req_list(layer["bias_correction"], f"{field}.bias_correction")):
            req_num(v, f"{field}.bias_correction[{i}]")
    req_act_bits(layer["a_bits_in"], f"{field}.a_bits_in")
    req_act_bits(layer["a_bits_out"], f"{field}.a_bits_out")
    req_int(layer["macs"], f"{field}.macs")
    req_int(layer["bitops"], f"{field}.bitops")


def check_regions(v: Any, field: str) -> None:
    """An n×m grid of [y0, y1, x0, x1] rectangles (`patch.tiles`, `vdpc.regions`): n rows of
    the same length m."""
    rows = req_list(v, field, 64)
    for i, row in enumerate(rows):
        req_list(row, f"{field}[{i}]", 64, length=len(rows[0]) if i else None)
        for j, r in enumerate(row):
            req_list(r, f"{field}[{i}][{j}]", length=4)
            for q, c in enumerate(r):
                req_int(c, f"{field}[{i}][{j}][{q}]", 0, MAX_BYTES)


def check_vdpc(v: Any, field: str) -> None:
    """`patch.vdpc` (`mpq.vdpc.VdpcResult.to_dict`)."""
    req_dict(v, field, VDPC_KEYS)
    req_str(v["map"], f"{field}.map")
    req_num(v["phi"], f"{field}.phi", 0.0, 1.0)
    for key in ("z", "mu"):
        req_num(v[key], f"{field}.{key}")
    req_num(v["sigma"], f"{field}.sigma", lo=0.0)
    lo = req_int(v["lo_threshold"], f"{field}.lo_threshold", -(1 << 31), (1 << 31) - 1)
    req_int(v["hi_threshold"], f"{field}.hi_threshold", lo, (1 << 31) - 1)
    req_int(v["min_outliers"], f"{field}.min_outliers", 1, MAX_BYTES)
    req_int(v["samples"], f"{field}.samples", 0, MAX_COUNT)
    rates = req_list(v["outlier_rate"], f"{field}.outlier_rate", 64)
    for i, row in enumerate(rates):
        req_list(row, f"{field}.outlier_rate[{i}]", length=len(rates))
        for j, r in enumerate(row):
            req_num(r, f"{field}.outlier_rate[{i}][{j}]", 0.0, 1.0)
    check_regions(v["regions"], f"{field}.regions")


def check_patch(p: Any, field: str = "patch") -> None:
    """`patch` (null: the layer-based schedule)."""
    req_dict(p, field, PATCH_KEYS, {"cache", "cols", "pool"})
    req_int(p["split_layer"], f"{field}.split_layer", 1, MAX_ITEMS)
    req_int(p["n"], f"{field}.n", 1, 64)
    if "cols" in p:  # patch columns when the grid is not n×n
        req_int(p["cols"], f"{field}.cols", 1, 64)
    if "pool" in p:  # the stage ends in a global average pool: its int32 sums
        req_dict(p["pool"], f"{field}.pool", {"tensor", "bytes", "offset"})
        req_str(p["pool"]["tensor"], f"{field}.pool.tensor")
        req_int(p["pool"]["bytes"], f"{field}.pool.bytes", 4, MAX_BYTES)
        req_int(p["pool"]["offset"], f"{field}.pool.offset", 0, MAX_BYTES)
    req_str(p["split_tensor"], f"{field}.split_tensor")
    for i, s in enumerate(req_list(p["stage_nodes"], f"{field}.stage_nodes")):
        req_str(s, f"{field}.stage_nodes[{i}]")
    req_int(p["redundant_macs"], f"{field}.redundant_macs")
    req_num(p["redundant_macs_percent"], f"{field}.redundant_macs_percent", lo=0.0)
    check_regions(p["tiles"], f"{field}.tiles")
    if p["vdpc"] is not None:
        check_vdpc(p["vdpc"], f"{field}.vdpc")
    if "cache" in p:
        check_patch_cache(p["cache"], f"{field}.cache")


def check_patch_cache(c: Any, field: str = "patch.cache") -> None:
    """`patch.cache` (`mpq.patch.cache_rows`; absent: every patch recomputes its halo): the
    patch order, the recomputing form's redundant MACs, and per line buffer its map, rows,
    bytes and arena offset."""
    req_dict(c, field, {"order", "redundant_macs_recompute", "line_buffers"})
    if c["order"] != "column-major":
        raise fail(f"{field}.order", f"must be 'column-major', got {c['order']!r}")
    req_int(c["redundant_macs_recompute"], f"{field}.redundant_macs_recompute")
    for i, b in enumerate(req_list(c["line_buffers"], f"{field}.line_buffers")):
        f = f"{field}.line_buffers[{i}]"
        req_dict(b, f, {"tensor", "rows", "bytes", "offset"})
        req_str(b["tensor"], f"{f}.tensor")
        req_int(b["rows"], f"{f}.rows", 1, MAX_ITEMS)
        req_int(b["bytes"], f"{f}.bytes", 1, MAX_BYTES)
        req_int(b["offset"], f"{f}.offset", 0, MAX_BYTES)


def check_schedule(s: Any, field: str = "schedule") -> None:
    """`schedule`: in-place depthwise node names and fused adds {add: {conv, skip}}; optional
    `order`, the node names in the order they run (`mpq.order`; absent: the file's order),
    `regions`, the board regions of the arena and the scratch (`mpq.regions`), and `io`, where
    the graph input and outputs live (plans before it: "external"), and `overlap`, the nodes
    whose output starts D bytes below their input's start (`memory.overlap_shift`; D < 0: −D
    bytes above it, rows run last to first, `memory.reverse_overlap_shift`), and
    `inplace_raised`, a patch stage's in-place depthwise nodes whose output starts U bytes
    above their input's start (`mpq.patch.PatchSchedule.raise_shift`)."""
    req_dict(s, field, {"inplace_depthwise", "fused_adds"},
             {"order", "regions", "io", "overlap", "scratch", "inplace_raised"})
    if "scratch" in s:
        check_scratch_record(s["scratch"], f"{field}.scratch")
    if "overlap" in s:  # node -> bytes its output starts below its input (`memory.overlap_shift`)
        for n, d in req_dict(s["overlap"], f"{field}.overlap").items():
            req_str(n, f"{field}.overlap key")
            if not isinstance(d, int) or isinstance(d, bool):
                raise fail(f"{field}.overlap.{n}", f"must be an integer (bytes below the "
                                                   f"input; < 0: above it), got {_show(d)}")
    if "inplace_raised" in s:  # node -> bytes its in-place output starts above its input
        for n, u in req_dict(s["inplace_raised"], f"{field}.inplace_raised").items():
            req_str(n, f"{field}.inplace_raised key")
            req_int(u, f"{field}.inplace_raised.{n}", 1, MAX_BYTES)
    if "order" in s:
        for i, n in enumerate(req_list(s["order"], f"{field}.order")):
            req_str(n, f"{field}.order[{i}]")
    if "regions" in s:  # where the arena and the scratch go (`mpq.regions`)
        r = req_dict(s["regions"], f"{field}.regions", {"arena", "scratch"})
        for part in ("arena", "scratch"):
            req_str(r[part], f"{field}.regions.{part}")
    if "io" in s and s["io"] not in ("arena", "external"):
        raise fail(f"{field}.io", f"must be \"arena\" or \"external\", got {_show(s['io'])}")
    for i, n in enumerate(req_list(s["inplace_depthwise"], f"{field}.inplace_depthwise")):
        req_str(n, f"{field}.inplace_depthwise[{i}]")
    for add, v in req_dict(s["fused_adds"], f"{field}.fused_adds").items():
        req_str(add, f"{field}.fused_adds key")
        f = req_dict(v, f"{field}.fused_adds.{add}", {"conv", "skip"})
        req_str(f["conv"], f"{field}.fused_adds.{add}.conv")
        req_str(f["skip"], f"{field}.fused_adds.{add}.skip")


def check_scratch_record(r: Any, field: str) -> None:
    """`schedule.scratch`: {"mode": "arena", "steps": {node: {"offset", "bytes"}}}, the arena
    slot of each layer's kernel scratch (`memory.scratch_record`; absent: one separate
    buffer), and optionally "unpacked": the nodes whose slot holds mpq_conv2d_unpacked's
    scratch (`memory.grow_scratch`)."""
    r = req_dict(r, field, {"mode", "steps"}, {"unpacked"})
    for i, n in enumerate(req_list(r.get("unpacked", []), f"{field}.unpacked")):
        req_str(n, f"{field}.unpacked[{i}]")
    if r["mode"] != "arena":
        raise fail(f"{field}.mode", f"must be \"arena\", got {_show(r['mode'])}")
    for n, slot in req_dict(r["steps"], f"{field}.steps").items():
        req_str(n, f"{field}.steps key")
        b = req_dict(slot, f"{field}.steps.{n}", {"offset", "bytes"})
        req_int(b["offset"], f"{field}.steps.{n}.offset", 0, MAX_BYTES)
        req_int(b["bytes"], f"{field}.steps.{n}.bytes", 1, MAX_BYTES)


def check_predicted(p: Any, field: str = "predicted") -> None:
    """`predicted`: byte counts (arena > 0) and operation counts, all non-negative ints."""
    req_dict(p, field, PREDICTED_KEYS, PREDICTED_OPTIONAL)
    for key in sorted(PREDICTED_KEYS):
        hi = MAX_COUNT if "bitops" in key or key == "macs" else MAX_BYTES
        req_int(p[key], f"{field}.{key}", 1 if key == "arena_bytes" else 0, hi)
    if "output_bytes" in p:
        req_int(p["output_bytes"], f"{field}.output_bytes", 0, MAX_BYTES)
    if "stack_bytes" in p:
        req_int(p["stack_bytes"], f"{field}.stack_bytes", 0, MAX_BYTES)
    if "fidelity" in p:
        check_fidelity(p["fidelity"], f"{field}.fidelity")
    if "instructions" in p:
        from mpq.latency import check_instructions

        check_instructions(p["instructions"], f"{field}.instructions")


def check_fidelity(f: Any, field: str) -> None:
    """`predicted.fidelity`: the sample count, what the data was, the measured damage, and per
    output {top1_agreement (null unless a classifier), cosine, sqnr_db (null when exact),
    exact} for the plan and its int8 model (shown, never used to compute anything)."""
    req_dict(f, field, FIDELITY_KEYS)
    req_int(f["samples"], f"{field}.samples", 1, MAX_COUNT)
    req_str(f["data"], f"{field}.data", 256)
    req_num(f["damage"], f"{field}.damage", 0.0, 1e12)
    for part in ("outputs", "int8"):
        for name, s in req_dict(f[part], f"{field}.{part}").items():
            where = f"{field}.{part}.{name}"
            req_dict(s, where, SUMMARY_KEYS)
            if s["top1_agreement"] is not None:
                req_num(s["top1_agreement"], f"{where}.top1_agreement", 0.0, 1.0)
            req_num(s["cosine"], f"{where}.cosine", -1.0, 1.0)
            if s["sqnr_db"] is not None:
                req_num(s["sqnr_db"], f"{where}.sqnr_db", -1e6, 1e6)
            req_bool(s["exact"], f"{where}.exact")


def check_search(s: Any, field: str = "search") -> None:
    """`search`: how the plan was found (shown, never executed): known keys, bounded JSON."""
    req_dict(s, field, SEARCH_KEYS, SEARCH_OPTIONAL)
    for key, v in s.items():
        check_json_value(v, f"{field}.{key}", 1)


def check_board(b: Any, field: str = "board") -> None:
    """`board`: an object with a string name. Its other keys are the board's own business
    (`mpq.boards` rebuilds and checks the board); here only bounded, clean JSON."""
    req_dict(b, field)
    if "name" not in b:
        raise fail(f"{field}.name", "missing")
    req_str(b["name"], f"{field}.name", 256)
    check_json_value(b, field, 1)


def check_model_name(v: Any, field: str = "model") -> None:
    """The model's path relative to the plan's directory, `/`-separated (`x.onnx`,
    `../models/x.onnx`): never absolute (plans hold no absolute paths), and naming a file.
    Whatever it names is only used if its sha256 is the plan's."""
    name = req_str(v, field, 4096)
    last = name.rsplit("/", 1)[-1]
    if name.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", name) \
            or last in ("", ".", ".."):
        raise fail(field, "must be the model file's path relative to the plan, got "
                          f"{_show(name)}")


def check_plan_data(data: dict[str, Any]) -> None:
    """The whole plan JSON (after `schema` was read): raises PlanFieldError on the first field
    that is wrong."""
    from mpq.search.driver import STRATEGIES

    req_dict(data, "", PLAN_KEYS)
    check_model_name(data["model"])
    for key in ("model_sha256", "graph_fingerprint"):
        if not isinstance(data[key], str) or not HEX64.fullmatch(data[key]):
            raise fail(key, f"must be 64 lowercase hex digits, got {_show(data[key])}")
    check_board(data["board"])
    if data["strategy"] not in STRATEGIES:
        raise fail("strategy", f"must be one of {', '.join(STRATEGIES)}, got "
                               f"{_show(data['strategy'])}")
    if data["patch"] is not None:
        check_patch(data["patch"])
    check_schedule(data["schedule"])
    for i, t in enumerate(req_list(data["tensors"], "tensors")):
        check_tensor(t, f"tensors[{i}]")
    for i, layer in enumerate(req_list(data["layers"], "layers")):
        check_layer(layer, f"layers[{i}]")
    check_predicted(data["predicted"])
    check_search(data["search"])
    for i, note in enumerate(req_list(data["notes"], "notes")):
        req_str(note, f"notes[{i}]", 4096)
