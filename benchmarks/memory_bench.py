"""Lossless memory (issue 16): int8 peak SRAM with the input and outputs as the caller's
buffers (`--io external`, mpq before issue 16) and inside the arena (`--io arena`, the default),
layer-based and with int8 patches, beside TFLM's planned arena head; and the patch stage's
two forms — halos recomputed (MCUNetV2) or kept in line buffers (StreamNet / msf-CNN) — with
their peaks and redundant MACs.

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
from mpq.order import apply_order, best_order  # noqa: E402
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
    # + partial input/output overlap (vMCU; `memory.choose_overlaps`), layer-based: outputs
    # below their dying inputs, or above them with the rows run last to first
    over = plan_patches(graph, None, io, overlap=True).memory()
    # + the memory-aware order (`mpq.order.best_order`, what `mpq search` runs), overlap on
    ordered = plan_patches(apply_order(graph, best_order(graph).order), None, io,
                           overlap=True).memory()
    return {"layer": layer, "patch": patch, "input": mem.input_bytes,
            "overlap": over.peak_sram_bytes + mem.input_bytes + mem.output_bytes,
            "overlapped_layers": len(over.overlap),
            "reversed_layers": sum(d < 0 for d in over.overlap.values()),
            "reordered": ordered.peak_sram_bytes + mem.input_bytes + mem.output_bytes,
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
    p = result.plan.predicted
    # The measured figure is the ELF's .data/.bss (arena, scratch, I/O buffers): the predicted
    # one without the stack (`sram_needed_bytes` adds it; the ELF does not hold the stack).
    return {"predicted": int(p["sram_needed_bytes"]) - int(p.get("stack_bytes", 0)),
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
        layers = f"{a['overlapped_layers']}" + (f", {a['reversed_layers']} above"
                                                 if a["reversed_layers"] else "")
        cells.append([r["task"], num(e["input"] + e["output"]), num(e["layer"]), num(a["layer"]),
                       f"{num(a['overlap'])} ({layers})", num(a["reordered"]),
                       num(r["tflm_head"]), ratio(e["layer"], r["tflm_head"]),
                       ratio(a["layer"], r["tflm_head"]), ratio(a["reordered"], r["tflm_head"]),
                       num(e["patch"]),
                       num(None if e["patch"] is None else e["patch"] - e["input"]),
                       num(a["patch"]), ratio(a["patch"], r["tflm_head"]), check])
    table = show("Int8 peak SRAM, input included: caller's I/O buffers vs input and outputs in "
                 "the arena (bytes)",
                 ["model", "I/O buffers", "layer: external", "layer: arena",
                  "+ overlap (layers)", "+ reordering", "TFLM head", "external/TFLM",
                  "arena/TFLM", "reordering/TFLM", "patches: external",
                  "patches: excl. input", "patches: arena", "patches arena/TFLM",
                  "qemu-m4 mismatches; measured model SRAM (arena plan)"],
                 cells,
                 "external = arena + scratch + the caller's input and output buffers (mpq "
                 "before issue 16); arena = arena + scratch with the input and outputs as arena "
                 "tensors (the input freed after its last reader); + overlap = arena with "
                 "layer outputs written inside their dying inputs where the kernels' write "
                 "order makes it exact and the arena shrinks (vMCU; `--overlap`, the default; "
                 "in brackets the layers overlapped, and how many of them start above their "
                 "input with their rows run last to first), file order; + reordering = the "
                 "same in the memory-aware order `mpq search` runs (`mpq.order.best_order`). "
                 "Patches: the best int8 split "
                 f"(`search_patches`, redundant MACs ≤ {MAX_OVERHEAD:.0%}; no overlap); "
                 "excl. input = patches: external less the caller's input buffer (arena + "
                 "scratch + output buffer; MCUNetV2 reports 172 kB for MobileNetV2-1.0@224, "
                 "issue 16's target is ≤ 150 kB). TFLM head: its "
                 "planned arena head for the same `.tflite` (input included). The last column "
                 "is a real run: `mpq search --strategy int8 --patches none --io arena` "
                 "(overlap on) on "
                 "stm32h743, exported, built and run on qemu-m4 by `mpq verify` (random "
                 "inputs); measured = the model's .data/.bss in the linked ELF.")
    cache = patch_cache_table([(task, graph) for task, graph, _, _ in models])
    return {"rows": rows, "tables": [table, cache["table"]], "patch_cache": cache["rows"]}


def patch_forms(graph: Graph, io: str = "arena") -> dict | None:
    """Issue 16 item 5: the best int8 split recomputing its halos (MCUNetV2), the same split
    with line buffers (`mpq.patch.cache_rows`), and the search's pick over both forms
    (`search_patches(cache=None)`: lowest peak, then fewest redundant MACs); peak with the
    input, redundant MACs of each. None when no split beats layer-based."""
    from mpq.patch import PatchSplit, plan_patches

    mem = layer_memory(graph, io=io)
    io_bytes = mem.input_bytes + mem.output_bytes
    rec = search_patches(graph, max_overhead=MAX_OVERHEAD, io=io, cache=False)
    if rec is None:
        return None
    same = plan_patches(graph, PatchSplit(rec.split_layer, rec.n, cache=True), io)
    pick = search_patches(graph, max_overhead=MAX_OVERHEAD, io=io, cache=None)
    best_cached = search_patches(graph, max_overhead=MAX_OVERHEAD, io=io, cache=True)

    def entry(s) -> dict:
        return {"split": f"k={s.split_layer},n={s.n}", "cache": s.cache,
                "peak": s.memory().peak_sram_bytes + io_bytes,
                "redundant_macs": s.redundant_macs,
                "redundant_percent": round(s.redundant_macs_percent, 2),
                "line_buffer_bytes": sum(b.size for b in s.buffers()
                                         if b.name.startswith("line:"))}
    return {"recompute": entry(rec), "cached": entry(same), "pick": entry(pick),
            "best_cached": entry(best_cached) if best_cached is not None else None}


def patch_cache_table(models: list[tuple[str, Graph]]) -> dict:
    """The "int8 patches with cached overlaps" columns beside recomputed halos."""
    rows = []
    for task, graph in models:
        rows.append({"task": task, **(patch_forms(graph) or {})})

    def cell(e: dict | None, key: str) -> str:
        return "-" if not e else f"{e[key]:,}"

    cells = []
    for r in rows:
        rec, cached, pick = r.get("recompute"), r.get("cached"), r.get("pick")
        ratio = "-" if not rec or not rec["redundant_macs"] else \
            f"{cached['redundant_macs'] / rec['redundant_macs']:.2f}×"
        form = "-" if not pick else f"{pick['split']} " + ("cached" if pick["cache"]
                                                             else "recompute")
        bc = r.get("best_cached")
        cells.append([r["task"], rec["split"] if rec else "-", cell(rec, "peak"),
                      cell(rec, "redundant_macs"), cell(cached, "peak"),
                      cell(cached, "line_buffer_bytes"), cell(cached, "redundant_macs"), ratio,
                      bc["split"] if bc else "-", cell(bc, "peak"), cell(bc, "redundant_macs"),
                      form, cell(pick, "peak"), cell(pick, "redundant_macs")])
    table = show("Int8 patches: halos recomputed (MCUNetV2) vs overlaps cached in line buffers "
                 "(StreamNet / msf-CNN), input in the arena (bytes, MACs)",
                 ["model", "best split", "recompute: peak", "recompute: redundant MACs",
                  "cached: peak", "cached: line buffers", "cached: redundant MACs",
                  "cached/recompute MACs", "best cached split", "its peak",
                  "its redundant MACs", "search's pick (both forms)", "pick: peak",
                  "pick: redundant MACs"],
                 cells,
                 "best split: `search_patches` recomputing halos (redundant MACs ≤ "
                 f"{MAX_OVERHEAD:.0%}); cached: the same split with line buffers (patches column "
                 "by column, each keeps the rows the patch below shares; columns still "
                 "recomputed), their bytes counted in the peak; best cached split: the "
                 "lowest-peak split in that form; pick: `search_patches` over both forms "
                 "(lowest peak, then fewest redundant MACs, then line buffers for the maps that "
                 "fit under that peak: `cache_within_peak`). `mpq search --patch-cache auto` "
                 "offers the solver the best split of each form, and it takes the fewer MACs "
                 "when both fit the budget. Predicted by the memory model; exactness of the "
                 "form is checked byte for byte (host and qemu-m4) in tests/test_patch_cache.py.")
    return {"rows": rows, "table": table}


if __name__ == "__main__":
    bench_memory()
