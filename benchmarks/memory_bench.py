"""Lossless memory (issue 16): int8 peak SRAM with the input and outputs as the caller's
buffers (`--io external`, mpq before issue 16) and inside the arena (`--io arena`, the default),
layer-based and with int8 patches, beside TFLM's planned arena head.

    python benchmarks/run.py memory

Peak = what the model needs in SRAM, the input included either way: arena + kernel scratch
(+ the caller's input and output buffers with `--io external`). For the four shared models it is
also checked on the real thing: an int8 plan (`mpq search --strategy int8 --patches none`,
`--io arena`, stm32h743) is exported, built and run on qemu-m4 (`mpq verify`), which reports
its mismatches against the integer reference and the model's measured SRAM.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

import onnx_builders as B  # noqa: E402
from common import show  # noqa: E402

from mpq.frontend.onnx_import import import_model, import_onnx  # noqa: E402
from mpq.ir import Graph  # noqa: E402
from mpq.memory import layer_memory  # noqa: E402
from mpq.patch import plan_patches, search_patches  # noqa: E402

SHARED = REPO.parent / "shared" / "models"
PAIRS = [("IC ResNet-8", "pretrainedResnet.onnx", "pretrainedResnet_quant.tflite"),
         ("VWW MobileNetV1", "vww_96_float.onnx", "vww_96_int8.tflite"),
         ("KWS DS-CNN", "kws_ref_model_fp32.onnx", "kws_ref_model.tflite"),
         ("AD autoencoder", "ad01_fp32.onnx", "ad01_int8.tflite")]
MOBILENETS = [("MobileNetV2-0.35@144", 0.35, 144), ("MobileNetV2-1.0@224", 1.0, 224)]
MAX_OVERHEAD = 0.25  # redundant MACs bound of the search's `--patches auto`
VERIFY_SAMPLES = 2


def peaks(graph: Graph, io: str) -> dict:
    """Layer-based and best int8 patch-based peak of `graph` with `io`, input included."""
    mem = layer_memory(graph, io=io)
    layer = mem.peak_sram_bytes + mem.input_bytes + mem.output_bytes
    best = search_patches(graph, max_overhead=MAX_OVERHEAD, io=io)
    patch = None
    if best is not None:
        patch = best.memory().peak_sram_bytes + mem.input_bytes + mem.output_bytes
    # + partial input/output overlap (vMCU; `memory.choose_overlaps`), layer-based
    over = plan_patches(graph, None, io, overlap=True).memory()
    return {"layer": layer, "patch": patch, "input": mem.input_bytes,
            "overlap": over.peak_sram_bytes + mem.input_bytes + mem.output_bytes,
            "overlapped_layers": len(over.overlap),
            "output": mem.output_bytes,
            "patch_redundant_percent": None if best is None else best.redundant_macs_percent}


def verified_plan(onnx_path: Path, graph: Graph) -> dict:
    """An int8 layer-based `--io arena` plan for stm32h743 (synthetic calibration data: the
    memory does not depend on it), run on qemu-m4: mismatches and measured model SRAM."""
    from mpq.boards import get_board
    from mpq.search.driver import SearchOptions, onnx_input_shape, search, synthetic_data
    from mpq.verify import verify

    opts = SearchOptions(strategy="int8", patches="none", io="arena")
    result = search(onnx_path, graph, get_board("stm32h743"), synthetic_data(graph), opts)
    shape = [VERIFY_SAMPLES, *onnx_input_shape(graph)]
    x = np.random.default_rng(1).uniform(-1.0, 1.0, shape).astype(np.float32)
    v = verify(result.plan, graph, x, "qemu-m4")
    return {"predicted": int(result.plan.predicted["sram_needed_bytes"]),
            "measured": v.model_sram_bytes, "mismatches": v.mismatches,
            "samples": v.samples}


def bench_memory() -> dict:
    """The table of issue 16's evidence: input-in-arena (item 1) and overlap (item 2)
    columns."""
    from mpq.tflm import tflm_arena

    rows = []
    models = [(task, import_onnx(SHARED / o), SHARED / o, SHARED / t) for task, o, t in PAIRS]
    models += [(label, import_model(B.mobilenet_v2(w, r), label), None, None)
               for label, w, r in MOBILENETS]
    for task, graph, onnx_path, tflite in models:
        ext, arena = peaks(graph, "external"), peaks(graph, "arena")
        row = {"task": task, "external": ext, "arena": arena,
               "tflm_head": tflm_arena(tflite).head if tflite else None, "verify": None}
        if onnx_path is not None:
            row["verify"] = verified_plan(onnx_path, graph)
        rows.append(row)

    def num(v: int | None) -> str:
        return "-" if v is None else f"{v:,}"

    def ratio(v: int | None, ref: int | None) -> str:
        return "-" if v is None or not ref else f"{v / ref:.2f}×"

    cells = []
    for r in rows:
        e, a, v = r["external"], r["arena"], r["verify"]
        check = "-" if v is None else (f"{v['mismatches']} / {v['samples']} samples; "
                                       f"{num(v['measured'])} (pred. {num(v['predicted'])})")
        cells.append([r["task"], num(e["input"] + e["output"]), num(e["layer"]), num(a["layer"]),
                       f"{num(a['overlap'])} ({a['overlapped_layers']})",
                       num(r["tflm_head"]), ratio(e["layer"], r["tflm_head"]),
                       ratio(a["layer"], r["tflm_head"]), ratio(a["overlap"], r["tflm_head"]),
                       num(e["patch"]), num(a["patch"]),
                       ratio(a["patch"], r["tflm_head"]), check])
    table = show("Int8 peak SRAM, input included: caller's I/O buffers vs input and outputs in "
                 "the arena (bytes)",
                 ["model", "I/O buffers", "layer: external", "layer: arena",
                  "+ overlap (layers)", "TFLM head", "external/TFLM", "arena/TFLM",
                  "overlap/TFLM", "patches: external", "patches: arena",
                  "patches arena/TFLM",
                  "qemu-m4 mismatches; measured model SRAM (arena plan)"],
                 cells,
                 "external = arena + scratch + the caller's input and output buffers (mpq "
                 "before issue 16); arena = arena + scratch with the input and outputs as arena "
                 "tensors (the input freed after its last reader); + overlap = arena with "
                 "layer outputs written inside their dying inputs where the kernels' raster "
                 "order makes it exact and the arena shrinks (vMCU; `--overlap`, the default; "
                 "in brackets the layers overlapped). Patches: the best int8 split "
                 f"(`search_patches`, redundant MACs ≤ {MAX_OVERHEAD:.0%}). TFLM head: its "
                 "planned arena head for the same `.tflite` (input included). The last column "
                 "is a real run: `mpq search --strategy int8 --patches none --io arena` "
                 "(overlap on) on "
                 "stm32h743, exported, built and run on qemu-m4 by `mpq verify` (random "
                 "inputs); measured = the model's .data/.bss in the linked ELF.")
    return {"rows": rows, "table": table}


if __name__ == "__main__":
    bench_memory()
