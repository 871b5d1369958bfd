"""Benchmark suite: prints tables and writes JSON to benchmarks/results/.

    python benchmarks/run.py            # everything
    python benchmarks/run.py inspect    # one benchmark by name

Speed and memory goals are checked here, not in timed unit tests.
"""

from __future__ import annotations

import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO))

import onnx_builders as B  # noqa: E402

from mpq.frontend.onnx_import import import_onnx  # noqa: E402
from mpq.memory import layer_memory  # noqa: E402
from mpq.tflm import tflm_arena  # noqa: E402

RESULTS = REPO / "benchmarks" / "results"
SHARED = REPO.parent / "shared" / "models"
console = Console(width=140)


def machine() -> dict:
    return {"python": platform.python_version(), "machine": platform.machine(),
            "cpus": __import__("os").cpu_count()}


def bench_inspect() -> dict:
    """`mpq inspect` on MobileNetV2-1.0@224, end to end as a user runs it (goal: < 5 s)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "mobilenet_v2_1.0_224.onnx"
        path.write_bytes(B.mobilenet_v2(1.0, 224).SerializeToString())
        runs = []
        for _ in range(3):
            t0 = time.perf_counter()
            proc = subprocess.run([sys.executable, "-m", "mpq.cli", "inspect", str(path),
                                   "--json"], capture_output=True, text=True, cwd=REPO)
            runs.append(time.perf_counter() - t0)
            assert proc.returncode == 0, proc.stderr
        arena = json.loads(proc.stdout)["arena_bytes"]
    result = {"model": "MobileNetV2-1.0@224", "seconds_best": min(runs),
              "seconds_all": runs, "goal_seconds": 5.0, "ok": min(runs) < 5.0,
              "arena_bytes": arena}
    table = Table(title="mpq inspect speed")
    for col in ("model", "best of 3 (s)", "goal (s)", "ok"):
        table.add_column(col)
    table.add_row(result["model"], f"{result['seconds_best']:.2f}", "5.0", str(result["ok"]))
    console.print(table)
    return result


PAIRS = [("IC ResNet-8", "pretrainedResnet.onnx", "pretrainedResnet_quant.tflite"),
         ("VWW MobileNetV1", "vww_96_float.onnx", "vww_96_int8.tflite"),
         ("KWS DS-CNN", "kws_ref_model_fp32.onnx", "kws_ref_model.tflite"),
         ("AD autoencoder", "ad01_fp32.onnx", "ad01_int8.tflite")]


def bench_tflm_arena() -> dict:
    """mpq's layer-based int8 memory model beside the arena TFLM plans for the same network."""
    rows = []
    for task, onnx_name, tflite_name in PAIRS:
        mem = layer_memory(import_onnx(SHARED / onnx_name))
        tflm = tflm_arena(SHARED / tflite_name)
        rows.append({"task": task, "mpq_arena": mem.arena_bytes,
                     "mpq_scratch": mem.scratch_bytes, "mpq_peak_sram": mem.peak_sram_bytes,
                     "mpq_input": mem.input_bytes, "tflm_head": tflm.head,
                     "tflm_tail": tflm.tail, "tflm_total": tflm.total})
    table = Table(title="Layer-based int8 SRAM: mpq vs TFLM (bytes)")
    for col in ("task", "mpq arena", "mpq scratch", "mpq peak", "input (caller's)",
                "TFLM head", "TFLM tail", "arena ≤ TFLM head"):
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(r["task"], f"{r['mpq_arena']:,}", f"{r['mpq_scratch']:,}",
                      f"{r['mpq_peak_sram']:,}", f"{r['mpq_input']:,}", f"{r['tflm_head']:,}",
                      f"{r['tflm_tail']:,}", str(r["mpq_arena"] <= r["tflm_head"]))
    console.print(table)
    console.print("TFLM's head holds every tensor incl. the input; its tail holds persistent "
                  "structures. mpq's arena excludes the input, which the caller passes in.")
    return {"rows": rows}


BENCHMARKS = {"inspect": bench_inspect, "tflm_arena": bench_tflm_arena}


def main(names: list[str]) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    for name in names or list(BENCHMARKS):
        result = {"benchmark": name, "machine": machine(), "result": BENCHMARKS[name]()}
        (RESULTS / f"{name}.json").write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")


if __name__ == "__main__":
    main(sys.argv[1:])
