"""Latency evidence (issue 15): instructions per inference under QEMU, exactly counted.

For VWW and ResNet-8, KWS and the Fashion example: int8 layer-based, int8 patch-based (the
smallest budget an int8 split meets), the mixed-precision plans of the accuracy-first search at
0.5× and 0.35× of the int8 layer-based SRAM need, an all-4-bit plan (W4A4: every map and every
weight at 4 bits, layer-based: the packed sub-byte kernels' case; target <= 0.8x int8
layer-based) and an all-2-bit one (W2A2), on the emulated Cortex-M4 and Cortex-M7, with mpq's
portable kernels and — when CMSIS_NN_PATH names a CMSIS-NN checkout — with the cmsis-nn
backend (the counts are instructions, not cycles: QEMU models no pipeline), MACs per
instruction, and each plan's top-1 on held-out labelled data where the project has some (KWS:
the shared clips, calibrated on 100 and tested on 900; the Fashion example: calib.npz /
test.npz). VWW and ResNet-8 come without labelled data here: they are calibrated on seeded
random inputs and have no accuracy column.

The second table holds the mixed plans against the target (<= 0.67x int8 patch-based), with a
lower bound on each plan's instructions: per layer, the fewest instructions the same layer took
at the plan's weight bits with any activation bits (kernels/latency_table.json, measured).
"""

from __future__ import annotations

import functools
import json
import os
import sys
import tempfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from common import show  # noqa: E402
from paper_tables import kws_task, load_task, plan_accuracy  # noqa: E402
from pareto import example_task  # noqa: E402

from mpq.boards import get_board  # noqa: E402
from mpq.codegen.cmsis import ENV, cmsis_nn_root  # noqa: E402
from mpq.codegen.export import render_export  # noqa: E402
from mpq.errors import MpqError  # noqa: E402
from mpq.frontend import load_model  # noqa: E402
from mpq.latency import load_table, parse_key, plan_layer_features  # noqa: E402
from mpq.quant.calibrate import dataset_from_array, onnx_input_shape  # noqa: E402
from mpq.search.driver import SearchOptions, search  # noqa: E402
from mpq.verify import verify  # noqa: E402

SHARED = REPO.parent / "shared" / "models"
#: (label, model, input scale of the random calibration data, labelled data): "kws" is the
#: shared clips (calibrate on the first 100, test on the other 900), "fashion" the example's
#: calib.npz / test.npz; None: seeded random inputs, no accuracy
CASES = [("VWW MobileNetV1-0.25@96", "vww_96_float.onnx", 1.0, None),
         ("IC ResNet-8", "pretrainedResnet.onnx", 255.0, None),
         ("KWS DS-CNN", "kws_ref_model_fp32.onnx", 1.0, "kws"),
         ("Fashion CNN (example)", REPO / "examples" / "fashion" / "fashion_cnn.onnx", 1.0,
          "fashion")]
#: the QEMU targets counted (issue 15: M4 and M7)
TARGETS = ("qemu-m4", "qemu-m7")
#: the mixed patch plans' target against int8 patch-based (issue 15)
MIXED_TARGET = 0.67
#: the mixed plans' SRAM budgets, as fractions of the int8 layer-based plan's need (issue 15)
MIXED_FRACTIONS = (0.5, 0.35)
#: the int8 patch-based plan: the first of these fractions of the int8 layer-based need whose
#: budget an int8 patch split meets (below 1: the layer-based schedule does not fit, so the
#: search must split)
PATCH_FRACTIONS = (0.5, 0.6, 0.7, 0.8, 0.9, 0.99)
#: every map and every weight at 4 bits, layer-based (the packed kernels' W4A4 case)
W4A4 = SearchOptions(strategy="qe", bits=(4,), weight_scheme="linear", weight_bits=(4,),
                     patches="none")
#: every map and every weight at 2 bits, layer-based: what a plan would need on most of its MACs
#: to reach the mixed-plan target, and the accuracy it keeps
W2A2 = SearchOptions(strategy="qe", bits=(2,), weight_scheme="linear", weight_bits=(2,),
                     patches="none")


def _cmsis_available() -> str | None:
    """None when the cmsis-nn backend can be built, else why not."""
    if not os.environ.get(ENV):
        return f"{ENV} not set"
    try:
        cmsis_nn_root()
    except MpqError as exc:
        return str(exc)
    return None


def _int8_patch_plan(path: Path, graph, board, data, need: int) -> tuple:
    """(label, plan) of the int8 patch-based plan under the smallest budget of
    `PATCH_FRACTIONS` × the int8 layer-based need that an int8 patch split meets, or
    (why not, None) when none does (e.g. a residual model whose split saves nothing)."""
    why = ""
    for f in PATCH_FRACTIONS:
        sram = int(need * f)
        try:
            plan = search(path, graph, board, data,
                          SearchOptions(strategy="int8", sram=sram)).plan
        except MpqError as exc:
            why = str(exc)
            continue
        return f"int8 patch-based (SRAM {sram:,} B = {f}× int8)", plan
    return f"no int8 patch split below {PATCH_FRACTIONS[-1]}× the int8 need: {why}", None


def _case_data(name: Path, scale: float, labelled: str | None, root: Path) -> tuple:
    """(graph, calibration Dataset, the loaded task for `plan_accuracy` or None, two verify
    inputs) of one case: the benchmarks' own KWS split (`paper_tables.kws_task`) and Fashion
    example (`pareto.example_task`), or seeded random inputs."""
    if labelled is None:
        graph = load_model(name)
        x = (np.random.default_rng(0).random((32, *onnx_input_shape(graph))) * scale)
        x = x.astype(np.float32)
        return graph, dataset_from_array(x, "random"), None, x[:2]
    task = kws_task(root / "kws") if labelled == "kws" else example_task()
    t = load_task(task)
    with np.load(task.calib) as d:
        first = d["x"][:2].astype(np.float32)
    return t.graph, t.calib, t, first


def bench_latency() -> dict:
    no_cmsis = _cmsis_available()
    backends = ["portable"] + ([] if no_cmsis else ["cmsis-nn"])
    rows = []
    board = get_board("nano33ble")
    with tempfile.TemporaryDirectory() as tmp:
        for label, name, scale, labelled in CASES:
            path = SHARED / name  # an absolute `name` (the Fashion example) stays as it is
            graph, data, task, x = _case_data(path, scale, labelled, Path(tmp))
            rows += _latency_rows(label, path, graph, data, task, x, board, backends)
    table = _latency_table(rows, no_cmsis)
    limit = _limit_table(rows)
    return {"rows": rows, "table": table, "tables": [table, limit["table"]],
            "limit": limit["rows"], "cmsis_nn": no_cmsis is None}


def _latency_rows(label: str, path: Path, graph, data, task, x: np.ndarray, board,
                  backends: list[str]) -> list[dict]:
    """One row per plan of one model: instructions per target and backend, accuracy (on
    `task`'s test set, when there is one)."""
    int8 = search(path, graph, board, data, SearchOptions(strategy="int8", patches="none")).plan
    need = int(int8.predicted["sram_needed_bytes"])
    variants = [("int8 layer-based", int8), ("int8 patch-based", _int8_patch_plan(
        path, graph, board, data, need))]
    for f in MIXED_FRACTIONS:
        sram = int(need * f)
        variants.append((f"mixed plan (SRAM {sram:,} B = {f}× int8)", SearchOptions(sram=sram)))
    variants.append(("W4A4 layer-based (packed kernels)", W4A4))
    variants.append(("W2A2 layer-based (packed kernels)", W2A2))
    rows: list[dict] = []
    base = patch_base = None
    for what, opts in variants:
        if isinstance(opts, tuple):  # the int8 patch plan: (label, plan) or (why not, None)
            what, plan = opts
            if plan is None:
                rows.append({"model": label, "plan": "int8 patch-based", "error": what})
                continue
        elif isinstance(opts, SearchOptions):
            try:
                plan = search(path, graph, board, data, opts).plan
            except MpqError as exc:  # a budget no plan meets
                rows.append({"model": label, "plan": what, "error": str(exc)})
                continue
        else:
            plan = opts
        row = {"model": label, "plan": what,
               "sram": plan.predicted["sram_needed_bytes"],
               "bitops": plan.predicted["bitops"], "macs": plan.predicted["macs"],
               "patches": None if plan.patch is None else
               f"k={plan.patch['split_layer']},n={plan.patch['n']}",
               "bits": sorted({t.bits for t in plan.tensors}),
               "w_bits": sorted({la.w_bits for la in plan.layers if la.w_bits is not None}),
               "top1": plan_accuracy(plan, task) if task is not None else None,
               "lower_bound": _lower_bound(plan, graph)}
        for target in TARGETS:
            for backend in backends:
                result = verify(plan, graph, x, target, backend)
                key = backend if target == TARGETS[0] else f"{backend}@{target}"
                row[key] = {"instructions": result.instructions,
                            "mismatches": result.mismatches,
                            "flash_bytes": result.flash_bytes,
                            "sram_bytes": result.sram_bytes}
        if "cmsis-nn" in backends:
            layers = json.loads(render_export(plan, graph, "cmsis-nn")
                                ["mpq_report.json"])["layers"]
            row["cmsis_layers"] = [sum(x["backend"] == "cmsis-nn" for x in layers),
                                   len(layers)]
        if row["lower_bound"] > row["portable"]["instructions"]:  # the bound would be wrong
            raise RuntimeError(f"{label} / {what}: lower bound {row['lower_bound']:,} above "
                               f"the measured {row['portable']['instructions']:,}")
        base = base or row["portable"]["instructions"]
        row["relative"] = row["portable"]["instructions"] / base
        m7 = f"portable@{TARGETS[1]}"
        row["relative_m7"] = row[m7]["instructions"] / rows[0][m7]["instructions"] \
            if rows else 1.0
        if what.startswith("int8 patch"):
            patch_base = row["portable"]["instructions"]
        elif plan.patch is not None and patch_base:  # a mixed patch plan
            row["vs_int8_patch"] = row["portable"]["instructions"] / patch_base
        row["int8_patch"] = patch_base
        row["int8_layer"] = base
        rows.append(row)
    return rows


@functools.cache
def _best_layer_costs() -> tuple[dict[tuple, int], dict[tuple, float]]:
    """From kernels/latency_table.json (qemu-m4): the fewest instructions per measured layer
    (kind, shape class, weight bits, MACs, outputs), and per (kind, shape class, weight bits)
    the fewest instructions per MAC."""
    same: dict[tuple, int] = {}
    per_mac: dict[tuple, float] = {}
    for measured in load_table()["plans"]:
        for key, macs, outputs, instructions in measured["layers"]["qemu-m4"]:
            kind, shape, w, _, _ = parse_key(key)
            k = (kind, shape, w, macs, outputs)
            same[k] = min(same.get(k, instructions), instructions)
            if macs:
                per_mac[k[:3]] = min(per_mac.get(k[:3], float("inf")), instructions / macs)
    return same, per_mac


def _lower_bound(plan, graph) -> int:
    """Σ over the plan's kernel calls of the fewest instructions the very same layer (kind,
    shape class, weight bits, MACs and outputs) took in any plan `tools/latency_table.py`
    measured (kernels/latency_table.json, qemu-m4: the four models all-int8, W8A4, W4A8, W4A4,
    W2A2), i.e. with any activation bits the kernels have at these weights; a layer never
    measured counts its MACs × the fewest instructions per MAC of its kind, shape class and
    weight bits. The patch stage's recomputation and its tiles' extra calls are left out, so
    no plan with these weight bits runs in fewer instructions on today's kernels."""
    same, per_mac = _best_layer_costs()
    w_bits = {la.name: la.w_bits for la in plan.layers}
    fused = {add: v["conv"] for add, v in plan.schedule.get("fused_adds", {}).items()}
    total = 0.0
    for name, f in plan_layer_features(graph, fused).items():
        w = w_bits.get(name) or 0
        k = (f["kind"], f["shape"], w, f["macs"], f["outputs"])
        total += same[k] if k in same else f["macs"] * per_mac.get(k[:3], 0.0)
    return int(total)


def _latency_table(rows: list[dict], no_cmsis: str | None) -> dict:
    columns = ["model", "plan", "M4 portable", "vs int8 layer", "vs int8 patch",
               "MACs/instr"]
    if no_cmsis is None:
        columns += ["M4 cmsis-nn", "cmsis-nn / portable", "CMSIS-NN layers"]
    columns += ["M7 portable", "M7 vs int8 layer"]
    if no_cmsis is None:
        columns += ["M7 cmsis-nn"]
    columns += ["top-1", "SRAM", "BitOPs", "patches", "bits (maps)", "bits (weights)",
                "mismatches"]
    table_rows = []
    for r in rows:
        if "error" in r:
            table_rows.append([r["model"], r["plan"], r["error"][:60]]
                              + [""] * (len(columns) - 3))
            continue
        p = r["portable"]
        m7 = r[f"portable@{TARGETS[1]}"]
        line = [r["model"], r["plan"], f"{p['instructions']:,}", f"{r['relative']:.2f}×",
                f"{r['vs_int8_patch']:.2f}×" if "vs_int8_patch" in r else "",
                f"{r['macs'] / p['instructions']:.3f}"]
        mismatches = [p["mismatches"]]
        if no_cmsis is None:
            c = r["cmsis-nn"]
            line += [f"{c['instructions']:,}", f"{c['instructions'] / p['instructions']:.2f}×",
                     f"{r['cmsis_layers'][0]}/{r['cmsis_layers'][1]}"]
            mismatches.append(c["mismatches"])
        line += [f"{m7['instructions']:,}", f"{r['relative_m7']:.2f}×"]
        mismatches.append(m7["mismatches"])
        if no_cmsis is None:
            c7 = r[f"cmsis-nn@{TARGETS[1]}"]
            line += [f"{c7['instructions']:,}"]
            mismatches.append(c7["mismatches"])
        line += ["—" if r["top1"] is None else f"{100 * r['top1']:.1f} %",
                 f"{r['sram']:,}", f"{r['bitops'] / 1e6:.1f} M", str(r["patches"]),
                 ",".join(map(str, r["bits"])), ",".join(map(str, r["w_bits"])),
                 "/".join(map(str, mismatches))]
        table_rows.append(line)
    backends = "portable M4" + ("/cmsis-nn M4" if no_cmsis is None else "") + "/portable M7" \
        + ("/cmsis-nn M7" if no_cmsis is None else "")
    if no_cmsis is None:
        note = ("cmsis-nn: layers with int8 activations in and out call CMSIS-NN (int8/int4 "
                "weights; a conv fused with its residual add: CMSIS-NN's conv band by band, "
                "then arm_elementwise_add_s8 in place); the patch stage, sub-byte maps and "
                "in-place depthwise keep mpq's portable kernels. ")
    else:
        note = (f"cmsis-nn columns left out: {no_cmsis} (set {ENV} to a CMSIS-NN checkout to "
                "measure the cmsis-nn backend). ")
    note += (f"Mismatches ({backends}): output bytes vs the integer reference. MACs/instr: the "
             "plan's MACs (patch recomputation included) per M4 portable instruction. top-1: "
             "through the integer reference on held-out labelled data (KWS: 900 clips, the "
             "search calibrated on the other 100; Fashion: test.npz, 1,000 images); — where "
             "the project has no labelled data (VWW, ResNet-8: calibrated on seeded random "
             "inputs). The M7 counts are instructions of the Cortex-M7 build on mps2-an500.")
    return show("Instructions per inference on QEMU, Cortex-M4 (mps2-an386) and Cortex-M7 "
                "(mps2-an500), portable vs cmsis-nn backend", columns, table_rows, note)


def _verdict(measured: float, bound: float, w_bits: list[int]) -> str:
    """Whether a plan meets the mixed-plan target, and if not, whether its weight bits allow
    it at all (`_lower_bound`)."""
    if measured <= MIXED_TARGET:
        return "yes"
    if bound <= MIXED_TARGET:
        return "no (its bound is below: kernel work left)"
    if min(w_bits) >= 8:
        return "no: out of reach with 8-bit weights (one SMLAD lane per product)"
    return "no: out of reach on today's packed kernels at these bits"


def _limit_table(rows: list[dict]) -> dict:
    """The mixed plans and W4A4 against the issue's mixed-plan target: measured and lower
    bound (`_lower_bound`) vs int8 patch-based (int8 layer-based where no split fits)."""
    out, table_rows = [], []
    for r in rows:
        if "error" in r or not r["plan"].startswith(("mixed", "W4A4", "W2A2")):
            continue
        ref = r["int8_patch"] or r["int8_layer"]
        ref_name = "int8 patch" if r["int8_patch"] else "int8 layer (no int8 split fits)"
        measured = r["portable"]["instructions"]
        item = {"model": r["model"], "plan": r["plan"], "reference": ref_name,
                "measured_ratio": measured / ref, "bound_ratio": r["lower_bound"] / ref,
                "w_bits": r["w_bits"], "top1": r["top1"]}
        out.append(item)
        table_rows.append([r["model"], r["plan"], ",".join(map(str, r["w_bits"])),
                           "—" if r["top1"] is None else f"{100 * r['top1']:.1f} %",
                           ref_name, f"{measured / ref:.2f}×",
                           f"{r['lower_bound']:,}", f"{r['lower_bound'] / ref:.2f}×",
                           _verdict(measured / ref, r["lower_bound"] / ref, r["w_bits"])])
    table = show(f"Mixed plans vs the target (≤ {MIXED_TARGET}× int8 patch-based): measured "
                 "and the lower bound of today's kernels (qemu-m4)",
                 ["model", "plan", "weight bits", "top-1", "against", "measured",
                  "lower bound (instr)", "bound / against", f"≤ {MIXED_TARGET}×?"],
                 table_rows,
                 note="Lower bound: Σ over the plan's layers of the fewest instructions the "
                      "same layer took at the plan's weight bits with any activation bits "
                      "the kernels were measured at (kernels/latency_table.json: every model "
                      "all-int8, W8A4, W4A8, W4A4 and W2A2 on qemu-m4), the patch stage's "
                      "recomputation left out. A plan whose bound is above the target cannot "
                      "meet it at its weight bits: with 8-bit weights the limit is physical "
                      "— a product of an 8-bit weight needs a 16-bit SMLAD lane of its own "
                      "whatever the activation bits (int8's 2 MACs per SMLAD), and only 4- and "
                      "2-bit weights with 4- and 2-bit activations pack two products per lane "
                      "(the W4A4 and W2A2 rows: the packed kernels, and the accuracy they "
                      "keep).")
    return {"rows": out, "table": table}
