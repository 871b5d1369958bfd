"""Benchmark suite: prints tables and writes JSON to benchmarks/results/.

    python benchmarks/run.py            # everything
    python benchmarks/run.py inspect    # one benchmark by name
    python benchmarks/run.py --smoke --out DIR   # the tiny subset CI runs (< 3 min), into DIR

Speed and memory goals are checked here, not in timed unit tests.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

import methods_table  # noqa: E402
import onnx_builders as B  # noqa: E402
import paper_tables  # noqa: E402
import pareto  # noqa: E402
import ptq_options  # noqa: E402
import search_bench  # noqa: E402
import weight_schemes  # noqa: E402
from common import show  # noqa: E402
from engine_speed import bench_engine_speed  # noqa: E402
from firmware_bench import bench_latency  # noqa: E402
from patch_overhead import bench_patch_overhead  # noqa: E402

from mpq.frontend.onnx_import import import_onnx  # noqa: E402
from mpq.memory import layer_memory  # noqa: E402
from mpq.tflm import tflm_arena  # noqa: E402
from tools.toolchain import cross_versions  # noqa: E402

RESULTS = REPO / "benchmarks" / "results"
SHARED = REPO.parent / "shared" / "models"


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine() -> dict:
    """The machine and the versions every number depends on."""
    import numpy
    import onnxruntime

    return {"python": platform.python_version(), "machine": platform.machine(),
            "cpus": os.cpu_count(), "cpu_model": cpu_model(), "numpy": numpy.__version__,
            "onnxruntime": onnxruntime.__version__, **cross_versions()}


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
    result["table"] = show("mpq inspect speed", ["model", "best of 3 (s)", "goal (s)", "ok"],
                           [[result["model"], f"{result['seconds_best']:.2f}", "5.0",
                             str(result["ok"])]])
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
    table = show("Layer-based int8 SRAM: mpq vs TFLM (bytes)",
                 ["task", "mpq arena", "mpq scratch", "mpq peak", "input (caller's)",
                  "TFLM head", "TFLM tail", "arena ≤ TFLM head"],
                 [[r["task"], f"{r['mpq_arena']:,}", f"{r['mpq_scratch']:,}",
                   f"{r['mpq_peak_sram']:,}", f"{r['mpq_input']:,}", f"{r['tflm_head']:,}",
                   f"{r['tflm_tail']:,}", str(r["mpq_arena"] <= r["tflm_head"])] for r in rows],
                 "TFLM's head holds every tensor incl. the input; its tail holds persistent "
                 "structures. mpq's arena excludes the input, which the caller passes in.")
    return {"rows": rows, "table": table}


def bench_sim_speed() -> dict:
    """Integer reference throughput: VWW int8 (its own parameters), 1000 samples (goal < 60 s)."""
    import numpy as np

    from mpq.quant.pipeline import load_for_quantisation
    from mpq.sim import run_int

    qm = load_for_quantisation(SHARED / "vww_96_int8.tflite").own_quant
    g = qm.graph
    x = np.random.default_rng(0).integers(-128, 128, (1000, 96, 96, 3))
    t0 = time.perf_counter()
    for start in range(0, len(x), 100):
        run_int(qm, {g.inputs[0]: x[start:start + 100]})
    seconds = time.perf_counter() - t0
    result = {"model": "VWW MobileNetV1-0.25@96 int8", "samples": len(x), "seconds": seconds,
              "samples_per_second": len(x) / seconds, "goal_seconds": 60.0,
              "ok": seconds < 60.0}
    result["table"] = show("Integer reference speed",
                           ["model", "samples", "seconds", "samples/s", "goal (s)", "ok"],
                           [[result["model"], "1000", f"{seconds:.1f}",
                             f"{len(x) / seconds:.1f}", "60", str(result["ok"])]])
    return result


def bench_kws_accuracy() -> dict:
    """KWS DS-CNN: float vs TFLite int8 vs mpq's uniform 8/4/2-bit activations, per range
    method; calibrated on the first 100 shared clips, evaluated on the other 900."""
    import numpy as np

    from mpq.evaluate import accuracy, quant_predictions
    from mpq.quant.calibrate import calibrate, load_dataset
    from mpq.quant.pipeline import quantise

    d = np.load(SHARED / "kws01_mfcc_int8_1000.npz")
    x = (d["x"].astype(np.float32) - 83) * np.float32(0.5847029)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        calib, test = Path(tmp) / "calib.npz", Path(tmp) / "test.npz"
        np.savez(calib, x=x[:100], y=d["y"][:100])
        np.savez(test, x=x[100:], y=d["y"][100:])
        from mpq.evaluate import float_predictions
        from mpq.quant.pipeline import load_for_quantisation

        onnx_path = SHARED / "kws_ref_model_fp32.onnx"
        graph = import_onnx(onnx_path)
        ds = load_dataset(test, graph)
        rows.append({"model": "float (onnxruntime)", "method": "-", "act_bits": 32,
                     "accuracy": accuracy(float_predictions(onnx_path, graph, ds), ds.y)})
        tfl = load_for_quantisation(SHARED / "kws_ref_model.tflite")
        rows.append({"model": "TFLite int8", "method": "TFLite", "act_bits": 8,
                     "accuracy": accuracy(quant_predictions(tfl.own_quant, ds), ds.y)})
        stats = calibrate(graph, load_dataset(calib, graph))
        for method in ("minmax", "percentile", "entropy"):
            for bits in (8, 4, 2):
                qm = quantise(graph, stats, bits, method)
                rows.append({"model": f"mpq A{bits}W8", "method": method, "act_bits": bits,
                             "accuracy": accuracy(quant_predictions(qm, ds), ds.y)})
    table = show("KWS DS-CNN top-1 on 900 clips (calibrated on 100)",
                 ["model", "range method", "accuracy"],
                 [[r["model"], r["method"], f"{r['accuracy']:.4f}"] for r in rows])
    return {"rows": rows, "table": table}


BENCHMARKS = {"inspect": bench_inspect, "tflm_arena": bench_tflm_arena,
              "sim_speed": bench_sim_speed, "kws_accuracy": bench_kws_accuracy,
              "patches": bench_patch_overhead, "solvers": search_bench.bench_solvers,
              "search_time": search_bench.bench_search_time,
              "kws_plans": search_bench.bench_kws_plans, "latency": bench_latency,
              "weight_schemes": weight_schemes.bench_weight_schemes,
              "pareto": pareto.bench_pareto,
              "engine_speed": bench_engine_speed,
              "ptq_options": ptq_options.bench_ptq_options}
# issue 16 items 3-4: memory-aware order and data regions (order_bench.py)
from order_bench import bench_order  # noqa: E402

BENCHMARKS["order"] = bench_order
# The papers' tables, our version (paper_tables.py, methods_table.py): each takes (results
# dir, smoke).
PAPER = {"table1": lambda out, smoke: paper_tables.bench_table1(smoke),
         "table2": lambda out, smoke: paper_tables.bench_table2(smoke),
         "table3": paper_tables.bench_table3,
         "methods": lambda out, smoke: methods_table.bench_methods(smoke)}
SMOKE = ["tflm_arena", "table1", "table2", "table3", "methods"]  # `--smoke`: CI's, < 3 min

# Issue 16 (lossless memory): int8 peak with the input in the arena vs the caller's buffers.
import memory_bench  # noqa: E402

BENCHMARKS["memory"] = memory_bench.bench_memory


def markdown_path(results: Path) -> Path:
    """benchmarks/RESULTS.md for the suite's own results, DIR/RESULTS.md for `--out DIR`."""
    return REPO / "benchmarks" / "RESULTS.md" if results == RESULTS else results / "RESULTS.md"


def _machine_line(m: dict) -> str:
    return (f"{m.get('cpu_model', m['machine'])} ({m['machine']}), {m['cpus']} CPUs; Python "
            f"{m['python']}, numpy {m.get('numpy', '?')}, onnxruntime {m.get('onnxruntime', '?')}, "
            f"arm-none-eabi-gcc {m.get('gcc_arm', '?')}, QEMU {m.get('qemu', '?')}")


def _table_lines(table: dict) -> list[str]:
    lines = [f"### {table['title']}", "", "| " + " | ".join(table["columns"]) + " |",
             "|" + "---|" * len(table["columns"])]
    lines += ["| " + " | ".join(row) + " |" for row in table["rows"]]
    if "note" in table:
        lines += ["", table["note"]]
    return lines + [""]


def write_markdown(results: Path = RESULTS) -> None:
    """RESULTS.md from every result JSON present (tables as they were printed), with the
    machine and tool versions they ran on and the last whole-suite wall time."""
    target = markdown_path(results)
    lines = ["# Benchmark results", "",
             "Written by `python benchmarks/run.py` (`make bench`); each table comes from the "
             f"JSON beside it in `{os.path.relpath(results, target.parent)}/`.", ""]
    suite = results / "suite.json"
    if suite.exists():
        run = json.loads(suite.read_text())
        kind = "smoke subset (`--smoke`)" if run["smoke"] else "whole suite"
        lines += [f"Last {kind} run {run['date']}: {run['seconds']:.0f} s wall "
                  f"({run['seconds'] / 60:.1f} min) on {_machine_line(run['machine'])}.", ""]
    for name in [*PAPER, *BENCHMARKS]:
        path = results / f"{name}.json"
        if not path.exists():
            continue
        data = json.loads(path.read_text())
        result = data["result"]
        tables = result["tables"] if "tables" in result else [result["table"]]
        took = f", {data['seconds']:.0f} s" if "seconds" in data else ""
        lines += [f"## {tables[0]['title']}" if len(tables) == 1 else f"## `{name}`", "",
                  f"`{name}` — run {data['date']}{took} on {_machine_line(data['machine'])}.",
                  ""]
        for table in tables:
            lines += _table_lines(table)[2:] if len(tables) == 1 else _table_lines(table)
        if "figure" in result:
            rel = os.path.relpath(results / result["figure"], target.parent)
            lines += [f"![{result['figure']}]({rel})", ""]
    target.write_text("\n".join(lines))


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description="mpq's benchmark suite")
    parser.add_argument("names", nargs="*", help="benchmarks to run (default: all)")
    parser.add_argument("--smoke", action="store_true",
                        help=f"CI's tiny subset ({', '.join(SMOKE)}), each in its smoke size")
    parser.add_argument("--out", type=Path, default=RESULTS,
                        help="results directory (default: benchmarks/results)")
    args = parser.parse_args(argv)
    registry = {**PAPER, **BENCHMARKS}
    unknown = [n for n in args.names if n not in registry]
    if unknown:
        parser.error(f"unknown benchmark {unknown[0]!r} (choose from {', '.join(registry)})")
    out = args.out.resolve()
    if args.smoke and out == RESULTS:
        parser.error("--smoke needs --out DIR: its numbers must not replace the suite's")
    names = args.names or (SMOKE if args.smoke else list(registry))
    out.mkdir(parents=True, exist_ok=True)
    t_suite = time.perf_counter()
    for name in names:
        t0 = time.perf_counter()
        fn = registry[name]
        outcome = fn(out, args.smoke) if name in PAPER else fn()
        result = {"benchmark": name, "machine": machine(), "smoke": args.smoke,
                  "date": time.strftime("%Y-%m-%d"),
                  "seconds": round(time.perf_counter() - t0, 1), "result": outcome}
        (out / f"{name}.json").write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")
    if not args.names:
        suite = {"smoke": args.smoke, "benchmarks": names, "machine": machine(),
                 "date": time.strftime("%Y-%m-%d"),
                 "seconds": round(time.perf_counter() - t_suite, 1)}
        (out / "suite.json").write_text(json.dumps(suite, indent=2, sort_keys=True) + "\n")
    write_markdown(out)



# -- latency table (issue 15 item 4) ------------------------------------------------------------
def bench_latency_table() -> dict:
    """Measure per-layer QEMU instructions of the shared models and the Fashion example at
    int8 and sub-byte mixes and rewrite kernels/latency_table.json (`tools/latency_table.py`):
    the fits per key and how well they predict each measured plan."""
    from tools import latency_table as lt

    table = lt.regenerate()
    return latency_table_result(table)


def latency_table_result(table: dict) -> dict:
    """The benchmark's tables for a latency table (also used to report a table the tool wrote)."""
    from tools import latency_table as lt

    keys, plans = lt.summary_rows(table)
    return {"tables": [
        show("Latency table (qemu-m4): instructions = a·MACs + b·outputs + c per key",
             ["key (kind|shape|w bits|a in>out)", "a", "b", "c", "points", "min instr/MAC",
              "max error"], keys,
             "Rebuild with `python benchmarks/run.py latency_table` (or `python "
             "tools/latency_table.py`) after changing a kernel."),
        show("Latency table: measured plans vs their layers' fits (qemu-m4)",
             ["model", "variant", "measured", "sum of layer fits", "difference"], plans,
             "Measured: whole inference (harness and glue included); the fits cover the "
             "layers only.")],
        "machine_table": table["machine"]}


BENCHMARKS["latency_table"] = bench_latency_table


if __name__ == "__main__":
    main(sys.argv[1:])
