"""Latency model: predicted Cortex-M instructions per layer from a measured cost table.

BitOPs (MACs·b_w·b_a, DESIGN §7.1) do not follow what the kernels cost: a 4-bit map can take
more instructions than an 8-bit one (unpacking), a depthwise 3×3 or a first layer with three
input channels costs several times an int8 1×1 conv per MAC (issue 15: −14 % BitOPs was +27 %
instructions). This model predicts each layer from exact QEMU counts instead.

The table (`kernels/latency_table.json`, rebuilt with `python tools/latency_table.py`) holds,
per target and per key `kind|shape|w<bits>|a<in>><out>` (`layer_key`), a fit of

    instructions = a·MACs + b·outputs + c

(non-negative least squares over the layers of the measured plans, `fit`; outputs = output
elements) with its measured points. `predict_layer` uses the key's fit, or — for a key no
measured plan had — the nearest key of the same op kind (`nearest_key`), and says which.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from mpq.errors import MpqError
from mpq.ir import Graph, Node, node_macs
from mpq.resources import data_dir

TABLE_NAME = "latency_table.json"
TABLE_SCHEMA = 1
DEFAULT_TARGET = "qemu-m4"
REGENERATE = "python tools/latency_table.py"


def shape_class(node: Node, graph: Graph) -> str:
    """The kernel path a layer takes, as far as its cost per MAC goes: `fc`; for conv2d
    `dw3x3` / `dwKxK` (depthwise), `first` (≤ 4 input channels: no SIMD over channels),
    `1x1`, `kxk`; `-` for every other op."""
    if node.op == "fully_connected":
        return "fc"
    if node.op != "conv2d":
        return "-"
    cout, kh, kw, cin_g = node.weight.shape
    groups = int(node.attrs.get("groups", 1))
    if groups > 1 and cin_g == 1:
        return "dw3x3" if (kh, kw) == (3, 3) else "dwKxK"
    if cin_g <= 4:
        return "first"
    return "1x1" if (kh, kw) == (1, 1) else "kxk"


def layer_key(kind: str, shape: str, w_bits: int | None, a_in: int, a_out: int) -> str:
    """`kind|shape|w<bits>|a<in>><out>` (w0: no weights)."""
    return f"{kind}|{shape}|w{w_bits or 0}|a{a_in}>{a_out}"


def parse_key(key: str) -> tuple[str, str, int, int, int]:
    """Inverse of `layer_key`."""
    kind, shape, w, a = key.split("|")
    a_in, a_out = a[1:].split(">")
    return kind, shape, int(w[1:]), int(a_in), int(a_out)


def node_features(node: Node, graph: Graph, fused_add: bool = False) -> dict[str, Any]:
    """Kind, shape class, MACs and output elements of one node (a conv with its residual add
    fused is kind `conv2d_add`: `mpq_conv2d_add`)."""
    kind = "conv2d_add" if fused_add else node.op
    return {"kind": kind, "shape": shape_class(node, graph), "macs": node_macs(node, graph),
            "outputs": int(np.prod(graph.tensors[node.outputs[0]].shape[1:]))}


def fit(points: list[tuple[int, int, int]]) -> dict[str, float]:
    """Non-negative least squares `instructions ≈ a·MACs + b·outputs + c` over (MACs, outputs,
    instructions) points (columns scaled to unit norm first, so the three terms weigh alike;
    with fewer distinct points than terms NNLS still returns one exact non-negative fit)."""
    from scipy.optimize import nnls

    x = np.array([[m, o, 1.0] for m, o, _ in points], dtype=np.float64)
    y = np.array([i for _, _, i in points], dtype=np.float64)
    norm = np.linalg.norm(x, axis=0)
    norm[norm == 0] = 1.0
    coef, _ = nnls(x / norm, y)
    a, b, c = (coef / norm).tolist()
    return {"a": a, "b": b, "c": c}


def evaluate(f: dict[str, float], macs: int, outputs: int) -> float:
    """a·MACs + b·outputs + c."""
    return f["a"] * macs + f["b"] * outputs + f["c"]


def nearest_key(entries: dict[str, Any], key: str) -> str | None:
    """The measured key closest to `key` with the same op kind: distance 4 for another shape
    class, plus 1 per differing bitwidth (weights, input, output); ties go to the entry with
    more measured points, then the smaller key. None when the kind was never measured."""
    kind, shape, w, a_in, a_out = parse_key(key)
    best = None
    for other in sorted(entries):
        k2, s2, w2, i2, o2 = parse_key(other)
        if k2 != kind:
            continue
        d = 4 * (s2 != shape) + (w2 != w) + (i2 != a_in) + (o2 != a_out)
        rank = (d, -len(entries[other]["points"]), other)
        if best is None or rank < best[0]:
            best = (rank, other)
    return None if best is None else best[1]


def predict_layer(table: dict[str, Any], target: str, key: str, macs: int, outputs: int
                  ) -> tuple[int, str]:
    """Predicted instructions of one layer and the table key that predicted them (`key`
    itself, or its `nearest_key`); MpqError when the table has no entry of that kind."""
    entries = table["targets"].get(target, {}).get("entries")
    if entries is None:
        raise MpqError(f"latency table: no measurements for target '{target}' "
                       f"(regenerate with `{REGENERATE}`)")
    used = key if key in entries else nearest_key(entries, key)
    if used is None:
        raise MpqError(f"latency table: no measured layer of kind '{parse_key(key)[0]}' for "
                       f"{target} (regenerate with `{REGENERATE}`)")
    return max(0, round(evaluate(entries[used]["fit"], macs, outputs))), used


def check_table(table: Any) -> None:
    """MpqError unless `table` is a well-formed latency table: schema, how it was made, and per
    target entries whose key parses, whose fit is three finite non-negative numbers and whose
    points are (MACs, outputs, instructions) triples of non-negative integers."""
    def bad(what: str) -> MpqError:
        return MpqError(f"latency table: {what}")

    if not isinstance(table, dict) or table.get("schema") != TABLE_SCHEMA:
        raise bad(f"schema must be {TABLE_SCHEMA}")
    for k in ("generated_by", "machine", "plans", "targets"):
        if k not in table:
            raise bad(f"missing '{k}'")
    for target, t in table["targets"].items():
        entries = t.get("entries") if isinstance(t, dict) else None
        if not isinstance(entries, dict) or not entries:
            raise bad(f"target '{target}' has no entries")
        for key, e in entries.items():
            try:
                parse_key(key)
            except ValueError:
                raise bad(f"bad key '{key}'") from None
            f = e.get("fit", {})
            if set(f) != {"a", "b", "c"} or not all(
                    isinstance(v, (int, float)) and np.isfinite(v) and v >= 0
                    for v in f.values()):
                raise bad(f"{target} {key}: fit must be non-negative a, b, c")
            pts = e.get("points")
            if not pts or not all(isinstance(p, list) and len(p) == 3 and all(
                    isinstance(v, int) and v >= 0 for v in p) for p in pts):
                raise bad(f"{target} {key}: points must be [MACs, outputs, instructions]")


def table_path() -> Path:
    return data_dir("kernels") / TABLE_NAME


@lru_cache(maxsize=4)
def _load(path: str, mtime: float) -> dict[str, Any]:
    try:
        table = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise MpqError(f"latency table {path}: {exc}") from None
    check_table(table)
    return table


def load_table(path: Path | None = None) -> dict[str, Any]:
    """The shipped (or given) latency table, checked (`check_table`)."""
    p = path or table_path()
    if not p.is_file():
        raise MpqError(f"no latency table at {p} (build it with `{REGENERATE}`)")
    return _load(str(p), p.stat().st_mtime)


def plan_layer_features(graph: Graph, fused: dict[str, str]) -> dict[str, dict[str, Any]]:
    """Per node name: its `node_features`, for every node that is a kernel call of the export
    (reshapes are views; a residual add fused into its conv is part of the conv: `fused` maps
    add name → conv name)."""
    conv_of_add = set(fused.values())
    out = {}
    for node in graph.nodes:
        if node.op == "reshape" or node.name in fused:
            continue
        out[node.name] = node_features(node, graph, node.name in conv_of_add)
    return out


def predict_bits(graph: Graph, act_bits: dict[str, int], w_bits: dict[str, int],
                 fused: dict[str, str], table: dict[str, Any],
                 target: str = DEFAULT_TARGET) -> dict[str, Any]:
    """Predicted instructions of a bit allocation: per kernel-call node (`plan_layer_features`)
    the table's prediction for its kind, shape class and bitwidths (input: first input's map,
    output: the node's map — the fused add's for a conv with its residual add fused).
    Returns {"target", "total", "layers": {name: instructions}, "keys": {name: key used}}."""
    by_name = {n.name: n for n in graph.nodes}
    add_of_conv = {conv: add for add, conv in fused.items()}
    layers: dict[str, int] = {}
    keys: dict[str, str] = {}
    for name, f in plan_layer_features(graph, fused).items():
        node = by_name[name]
        out_node = by_name[add_of_conv[name]] if name in add_of_conv else node
        key = layer_key(f["kind"], f["shape"], w_bits.get(name) if node.weight is not None
                        else None, act_bits[node.inputs[0]], act_bits[out_node.outputs[0]])
        layers[name], keys[name] = predict_layer(table, target, key, f["macs"], f["outputs"])
    return {"target": target, "total": sum(layers.values()), "layers": layers, "keys": keys}


def predict_plan(plan: Any, graph: Graph, table: dict[str, Any] | None = None,
                 target: str = DEFAULT_TARGET) -> dict[str, Any]:
    """`predict_bits` for a plan's bitwidths and fused adds: what `predicted.instructions`
    records (without the `keys`)."""
    table = table or load_table()
    act = {t.name: t.bits for t in plan.tensors}
    for t in graph.tensors:
        act.setdefault(t, 8)
    w = {layer.name: layer.w_bits for layer in plan.layers if layer.w_bits is not None}
    fused = {add: v["conv"] for add, v in plan.schedule.get("fused_adds", {}).items()}
    p = predict_bits(graph, act, w, fused, table, target)
    return {"target": p["target"], "total": p["total"], "layers": p["layers"],
            "model": "latency table (kernels/latency_table.json)"}


def stage_ratio(full_macs: int, redundant_macs: int) -> float:
    """A patch stage's recomputation ratio: patched / whole-map MACs of its layers,
    (full + redundant) / full — the factor `search_prediction` scales the stage layers' costs
    by, and `tools/latency_table.py` divides a measured stage layer's count by."""
    return (full_macs + redundant_macs) / max(full_macs, 1)


def search_prediction(graph: Graph, act_bits: dict[str, int], w_bits: dict[str, int],
                      schedule: Any, target: str = DEFAULT_TARGET
                      ) -> tuple[dict[str, Any] | None, str | None]:
    """`predicted.instructions` of a searched plan — `predict_bits` for the schedule's fused
    adds, the patch stage's layers scaled by their overlap recomputation (patched / whole-map
    MACs of the `PatchSchedule`) — or (None, why) when the shipped table cannot predict this
    model (an op kind never measured)."""
    fused = {add: conv for add, (conv, _) in schedule.fused_adds.items()}
    try:
        p = predict_bits(graph, act_bits, w_bits, fused, load_table(), target)
    except MpqError as exc:
        return None, f"no predicted instructions: {exc}"
    stage = set(schedule.stage_nodes) if schedule.split_tensor is not None else set()
    ratio = stage_ratio(schedule.stage_macs_full, schedule.redundant_macs) if stage else 1.0
    layers = {name: round(v * ratio) if name in stage else v for name, v in p["layers"].items()}
    model = "latency table (kernels/latency_table.json), layer-based costs"
    if stage:
        # Per-patch calls cost more than their share of the whole-map call (loop set-up per
        # call, halo rows, short rows for the depthwise kernels): on the Fashion demo's 4×4,
        # 11-layer stage the measured count was 27 % above this estimate, on its 3×3, 4-layer
        # ones 2 % (one branch) and 9 % (VDPC's two). The plan says so; `mpq verify` measures.
        model += (f"; patch stage × {ratio:.4f} (overlap recomputation; per-patch call "
                  "overheads not modelled: `mpq verify --target qemu-m4` measures them)")
    return {"target": target, "total": sum(layers.values()), "layers": layers,
            "model": model}, None


INSTRUCTIONS_KEYS = {"target", "total", "layers", "model"}


def check_instructions(p: Any, field: str = "predicted.instructions") -> None:
    """`predicted.instructions`: a target name, the model used, per layer a non-negative int,
    and `total` their sum (PlanFieldError naming the field otherwise)."""
    from mpq.plan_schema import fail, req_dict, req_int, req_str

    req_dict(p, field, INSTRUCTIONS_KEYS)
    req_str(p["target"], f"{field}.target")
    req_str(p["model"], f"{field}.model", 256)
    for name, v in req_dict(p["layers"], f"{field}.layers").items():
        req_int(v, f"{field}.layers.{name}", 0, 1 << 53)
    if not isinstance(p["total"], int) or p["total"] != sum(p["layers"].values()):
        raise fail(f"{field}.total", f"must be the sum of its layers "
                                     f"({sum(p['layers'].values())})")
