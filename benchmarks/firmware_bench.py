"""Latency evidence (issue: export): instructions per inference under QEMU, exactly counted.

For VWW and ResNet-8, KWS and the Fashion example: int8 layer-based, int8 patch-based (the
smallest budget an int8 split meets), the mixed-precision plans of the accuracy-first search at
0.5× and 0.35× of the int8 layer-based SRAM need (issue 15) and an all-4-bit plan (W4A4:
every map and every weight at 4 bits, layer-based: the packed sub-byte kernels' case; issue 15
target <= 0.8x int8 layer-based), on the emulated Cortex-M4, with mpq's portable kernels
and — when CMSIS_NN_PATH names a CMSIS-NN checkout — with the cmsis-nn backend (the counts are
instructions, not cycles: QEMU models no pipeline).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from common import show  # noqa: E402

from mpq.boards import get_board  # noqa: E402
from mpq.codegen.cmsis import ENV, cmsis_nn_root  # noqa: E402
from mpq.codegen.export import render_export  # noqa: E402
from mpq.errors import MpqError  # noqa: E402
from mpq.frontend import load_model  # noqa: E402
from mpq.quant.calibrate import dataset_from_array, onnx_input_shape  # noqa: E402
from mpq.search.driver import SearchOptions, search  # noqa: E402
from mpq.verify import verify  # noqa: E402

SHARED = REPO.parent / "shared" / "models"
CASES = [("VWW MobileNetV1-0.25@96", "vww_96_float.onnx", 1.0),
         ("IC ResNet-8", "pretrainedResnet.onnx", 255.0),
         ("KWS DS-CNN", "kws_ref_model_fp32.onnx", 1.0),
         ("Fashion CNN (example)", REPO / "examples" / "fashion" / "fashion_cnn.onnx", 1.0)]
#: the mixed plans' SRAM budgets, as fractions of the int8 layer-based plan's need (issue 15)
MIXED_FRACTIONS = (0.5, 0.35)
#: the int8 patch-based plan: the first of these fractions of the int8 layer-based need whose
#: budget an int8 patch split meets (below 1: the layer-based schedule does not fit, so the
#: search must split)
PATCH_FRACTIONS = (0.5, 0.6, 0.7, 0.8, 0.9, 0.99)
#: every map and every weight at 4 bits, layer-based (the packed kernels' W4A4 case)
W4A4 = SearchOptions(strategy="qe", bits=(4,), weight_scheme="linear", weight_bits=(4,),
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


def bench_latency() -> dict:
    no_cmsis = _cmsis_available()
    backends = ["portable"] + ([] if no_cmsis else ["cmsis-nn"])
    rows = []
    board = get_board("nano33ble")
    for label, name, scale in CASES:
        path = SHARED / name  # an absolute `name` (the Fashion example) stays as it is
        graph = load_model(path)
        x = (np.random.default_rng(0).random((32, *onnx_input_shape(graph))) * scale)
        data = dataset_from_array(x.astype(np.float32), "random")
        int8 = search(path, graph, board, data,
                      SearchOptions(strategy="int8", patches="none")).plan
        need = int(int8.predicted["sram_needed_bytes"])
        variants = [("int8 layer-based", int8), ("int8 patch-based", _int8_patch_plan(
            path, graph, board, data, need))]
        for f in MIXED_FRACTIONS:
            sram = int(need * f)
            variants.append((f"mixed plan (SRAM {sram:,} B = {f}× int8)",
                             SearchOptions(sram=sram)))
        variants.append(("W4A4 layer-based (packed kernels)", W4A4))
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
                   "bitops": plan.predicted["bitops"],
                   "patches": None if plan.patch is None else
                   f"k={plan.patch['split_layer']},n={plan.patch['n']}",
                   "bits": sorted({t.bits for t in plan.tensors})}
            for backend in backends:
                result = verify(plan, graph, x[:2].astype(np.float32), "qemu-m4", backend)
                row[backend] = {"instructions": result.instructions,
                                "mismatches": result.mismatches,
                                "flash_bytes": result.flash_bytes,
                                "sram_bytes": result.sram_bytes}
            if "cmsis-nn" in backends:
                layers = json.loads(render_export(plan, graph, "cmsis-nn")
                                    ["mpq_report.json"])["layers"]
                row["cmsis_layers"] = [sum(x["backend"] == "cmsis-nn" for x in layers),
                                       len(layers)]
            base = base or row["portable"]["instructions"]
            row["relative"] = row["portable"]["instructions"] / base
            if what.startswith("int8 patch"):
                patch_base = row["portable"]["instructions"]
            elif plan.patch is not None and patch_base:  # a mixed patch plan
                row["vs_int8_patch"] = row["portable"]["instructions"] / patch_base
            rows.append(row)
    columns = ["model", "plan", "portable", "vs int8 layer", "vs int8 patch"]
    if no_cmsis is None:
        columns += ["cmsis-nn", "cmsis-nn / portable", "CMSIS-NN layers"]
    columns += ["SRAM", "BitOPs", "patches", "bits", "mismatches"]
    table_rows = []
    for r in rows:
        if "error" in r:
            table_rows.append([r["model"], r["plan"], r["error"][:60]]
                              + [""] * (len(columns) - 3))
            continue
        p = r["portable"]
        line = [r["model"], r["plan"], f"{p['instructions']:,}", f"{r['relative']:.2f}×",
                f"{r['vs_int8_patch']:.2f}×" if "vs_int8_patch" in r else ""]
        mismatches = [p["mismatches"]]
        if no_cmsis is None:
            c = r["cmsis-nn"]
            line += [f"{c['instructions']:,}", f"{c['instructions'] / p['instructions']:.2f}×",
                     f"{r['cmsis_layers'][0]}/{r['cmsis_layers'][1]}"]
            mismatches.append(c["mismatches"])
        line += [f"{r['sram']:,}", f"{r['bitops'] / 1e6:.1f} M", str(r["patches"]),
                 ",".join(map(str, r["bits"])), "/".join(map(str, mismatches))]
        table_rows.append(line)
    if no_cmsis is None:
        note = ("cmsis-nn: layers with int8 activations in and out call CMSIS-NN (int8/int4 "
                "weights; a conv fused with its residual add: CMSIS-NN's conv band by band, "
                "then arm_elementwise_add_s8 in place); the patch stage, sub-byte maps and "
                "in-place depthwise keep mpq's portable kernels. Mismatches: portable/cmsis-nn "
                "output bytes vs the integer reference.")
    else:
        note = (f"cmsis-nn columns left out: {no_cmsis} (set {ENV} to a CMSIS-NN checkout to "
                "measure the cmsis-nn backend).")
    table = show("Instructions per inference on QEMU mps2-an386 (Cortex-M4), portable vs "
                 "cmsis-nn backend", columns, table_rows, note)
    return {"rows": rows, "table": table, "cmsis_nn": no_cmsis is None}
