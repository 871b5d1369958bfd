"""Latency evidence (issue: export): instructions per inference under QEMU, exactly counted.

For VWW and ResNet-8 (and KWS): int8 layer-based, int8 patch-based and the mixed-precision plan
under a budget that forces sub-byte maps, on the emulated Cortex-M4 (portable backend; the
counts are instructions, not cycles — QEMU models no pipeline).
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from common import show  # noqa: E402

from mpq.boards import get_board  # noqa: E402
from mpq.frontend import load_model  # noqa: E402
from mpq.quant.calibrate import dataset_from_array, onnx_input_shape  # noqa: E402
from mpq.search.driver import SearchOptions, search  # noqa: E402
from mpq.verify import verify  # noqa: E402

SHARED = REPO.parent / "shared" / "models"
CASES = [("VWW MobileNetV1-0.25@96", "vww_96_float.onnx", 1.0, 45_000),
         ("IC ResNet-8", "pretrainedResnet.onnx", 255.0, 36_000),
         ("KWS DS-CNN", "kws_ref_model_fp32.onnx", 1.0, 11_000)]


def bench_latency() -> dict:
    rows = []
    for label, name, scale, sram in CASES:
        path = SHARED / name
        graph = load_model(path)
        x = (np.random.default_rng(0).random((32, *onnx_input_shape(graph))) * scale)
        data = dataset_from_array(x.astype(np.float32), "random")
        variants = [("int8 layer-based", SearchOptions(strategy="int8", patches="none")),
                    ("int8 patch-based (auto)", SearchOptions(strategy="int8", sram=sram)),
                    (f"mixed plan (SRAM {sram:,} B)", SearchOptions(sram=sram))]
        base = None
        for what, opts in variants:
            try:
                plan = search(path, graph, get_board("nano33ble"), data, opts).plan
            except Exception as exc:  # a budget the int8 schedule cannot meet
                rows.append({"model": label, "plan": what, "error": str(exc)})
                continue
            result = verify(plan, graph, x[:2].astype(np.float32), "qemu-m4")
            base = base or result.instructions
            rows.append({"model": label, "plan": what, "instructions": result.instructions,
                         "relative": result.instructions / base,
                         "sram": plan.predicted["sram_needed_bytes"],
                         "bitops": plan.predicted["bitops"],
                         "patches": None if plan.patch is None else
                         f"k={plan.patch['split_layer']},n={plan.patch['n']}",
                         "bits": sorted({t.bits for t in plan.tensors}),
                         "mismatches": result.mismatches})
    table = show("Instructions per inference on QEMU mps2-an386 (Cortex-M4), portable backend",
                 ["model", "plan", "instructions", "vs int8 layer", "SRAM", "BitOPs",
                  "patches", "bits", "mismatches"],
                 [[r["model"], r["plan"], f"{r['instructions']:,}", f"{r['relative']:.2f}×",
                   f"{r['sram']:,}", f"{r['bitops'] / 1e6:.1f} M", str(r["patches"]),
                   ",".join(map(str, r["bits"])), str(r["mismatches"])]
                  if "error" not in r else [r["model"], r["plan"], r["error"][:60], "", "", "",
                                            "", "", ""] for r in rows])
    return {"rows": rows, "table": table}
