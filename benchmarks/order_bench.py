"""Memory-aware execution order (issue 16 item 3, `mpq.order`) and data regions (item 4,
`mpq.regions`): per network, the int8 layer-based peak in the file's order and in the chosen
one, how it was found, and where the arena lands on the boards that rank their SRAM."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import onnx
import onnx_builders as B
from common import show
from real_networks import REAL_NETWORKS

from mpq.boards import get_board
from mpq.frontend import load_model
from mpq.memory import layer_memory
from mpq.order import EXACT_ORDERS, apply_order, best_order
from mpq.regions import place_buffers

SHARED = Path(__file__).resolve().parent.parent.parent / "shared" / "models"
SHARED_MODELS = {"ResNet-8": "pretrainedResnet.onnx", "VWW MobileNetV1-0.25@96":
                 "vww_96_float.onnx", "KWS DS-CNN": "kws_ref_model_fp32.onnx",
                 "AD autoencoder": "ad01_fp32.onnx"}
BUILT = {"MobileNetV3-Small-style@32": REAL_NETWORKS["mobilenet_v3_small"],
         "BlazeFace-style@64": REAL_NETWORKS["blazeface"],
         "YOLO-tiny-style@64": REAL_NETWORKS["yolo"],
         "MobileNetV2-0.35@144": lambda: B.mobilenet_v2(0.35, 144)}
BOARDS = ("stm32f746", "stm32h743")


def _graphs(tmp: Path) -> list[tuple[str, object]]:
    out = [(label, load_model(SHARED / name)) for label, name in SHARED_MODELS.items()
           if (SHARED / name).exists()]
    for label, build in BUILT.items():
        path = tmp / f"{len(out)}.onnx"
        onnx.save(build(), path)
        out.append((label, load_model(path)))
    return out


def bench_order() -> dict:
    """File order vs chosen order: int8 peak (arena + scratch), method, seconds, and the region
    the arena goes to on each board with ranked regions (input/output buffers at 8 bits)."""
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for label, graph in _graphs(Path(tmp)):
            t0 = time.perf_counter()
            choice = best_order(graph)
            seconds = time.perf_counter() - t0
            io = sum(graph.tensors[t].size for t in (*graph.inputs, *graph.outputs))
            regions = {}
            for board in BOARDS:
                b = get_board(board)
                for key, g in (("file", graph), ("chosen", apply_order(graph, choice.order))):
                    m = layer_memory(g)
                    regions[f"{board}_{key}"] = place_buffers(b, m.arena_bytes, m.scratch_bytes,
                                                              io)["arena"]
            rows.append({"model": label, "nodes": len(graph.nodes), "orders": choice.orders,
                         "method": choice.method, "file_peak": choice.file_peak,
                         "peak": choice.peak, "seconds": round(seconds, 3), **regions})

    def cells(r: dict) -> list[str]:
        orders = f"> {EXACT_ORDERS:,}" if r["orders"] > EXACT_ORDERS else f"{r['orders']:,}"
        saving = 100.0 * (r["file_peak"] - r["peak"]) / r["file_peak"]
        return [r["model"], str(r["nodes"]), orders, r["method"], f"{r['file_peak']:,}",
                f"{r['peak']:,}", f"{saving:.1f}", f"{r['seconds']:.2f}",
                *(f"{r[f'{b}_file']} → {r[f'{b}_chosen']}" for b in BOARDS)]

    table = show("Memory-aware execution order: int8 layer-based peak SRAM (bytes, input "
                 "excluded)",
                 ["model", "nodes", "topological orders", "search", "file order",
                  "chosen order", "saving %", "search (s)",
                  *(f"arena region on {b} (file → chosen)" for b in BOARDS)],
                 [cells(r) for r in rows],
                 "Peak = greedy arena + largest kernel scratch, planned by mpq.memory for each "
                 "order. exact: every topological order planned (at most 1,000); heuristic: "
                 "Liberis & Lane's DP on live bytes + exact local search per segment between "
                 "cut nodes, on the real planner. The file order is always a candidate. Arena "
                 "region: mpq.regions' rule (fastest ranked region that holds it; the main "
                 "region less stack, runtime reserve and 8-bit input/output buffers).")
    return {"rows": rows, "table": table}
