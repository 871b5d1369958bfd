"""`mpq eval --engine c` vs `--engine numpy` on VWW (issue 17 item 3: a VWW-sized model at
≥ 200 samples/s on one core through the generated C).

Two plans of the shared VWW MobileNetV1-0.25@96 for nano33ble (the int8 layer-based one and
the mixed plan under a 45,000 B SRAM budget: patches, VDPC, sub-byte maps), searched on random
images (speed does not depend on the pixels; VWW's images are not shipped). Per plan and
engine: the plan's runner over N samples (what `--engine` changes; CPU seconds of this process,
so other load on the machine does not count, and wall seconds), the C engine's one-time export
and compile with an empty object cache, whether the outputs are byte-identical, and the whole
`mpq eval PLAN --json` as a user runs it (wall; the c run finds the objects cached; it also runs
the float model and the all-int8 column, which stay on onnxruntime and numpy).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from common import show  # noqa: E402

from mpq.boards import get_board  # noqa: E402
from mpq.engine import C_FLAGS, CPlanRunner, host_compiler  # noqa: E402
from mpq.evaluate import PlanRunner  # noqa: E402
from mpq.frontend import load_model  # noqa: E402
from mpq.quant.calibrate import dataset_from_array, load_dataset, onnx_input_shape  # noqa: E402
from mpq.search.driver import SearchOptions, search  # noqa: E402

SHARED = REPO.parent / "shared" / "models"
SAMPLES = 300
GOAL = 200.0  # samples/s on one core (issue 17, item 3)


def _timed(fn):
    """(result, CPU seconds of this process, wall seconds) of fn()."""
    c0, w0 = time.process_time(), time.perf_counter()
    out = fn()
    return out, time.process_time() - c0, time.perf_counter() - w0


def _cli_eval(plan: Path, data: Path, engine: str, tmpdir: Path) -> tuple[dict, float]:
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "mpq.cli", "eval", str(plan), "--data",
                           str(data), "--engine", engine, "--json", "-q"], capture_output=True,
                          text=True, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO),
                                                    "TMPDIR": str(tmpdir)})
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout), time.perf_counter() - t0


def bench_engine_speed() -> dict:
    cc = host_compiler()
    assert cc is not None, "the C engine needs a host compiler"
    path = SHARED / "vww_96_float.onnx"
    graph = load_model(path)
    rng = np.random.default_rng(0)
    x = rng.random((SAMPLES, *onnx_input_shape(graph))).astype(np.float32)
    y = rng.integers(0, 2, SAMPLES)
    calib = dataset_from_array(x[:32], "random")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        # The engine's object cache lives under the temporary directory: a fresh one here, so
        # the first build of each plan is cold and `mpq eval --engine c` then finds it warm.
        saved_tempdir, tempfile.tempdir = tempfile.tempdir, str(root)
        (root / "vww.onnx").write_bytes(path.read_bytes())
        np.savez(root / "test.npz", x=x, y=y)
        ds = load_dataset(root / "test.npz", graph)
        for what, opts in (("int8 layer-based", SearchOptions(strategy="int8", patches="none")),
                           ("mixed plan (SRAM 45,000 B)", SearchOptions(sram=45_000))):
            plan = search(root / "vww.onnx", graph, get_board("nano33ble"), calib, opts).plan
            plan_path = root / "vww.plan.json"
            plan.save(plan_path)
            numpy_runner = PlanRunner(plan, graph)
            ref, np_cpu, np_wall = _timed(lambda r=numpy_runner: r.outputs(x))
            c_runner, build_cpu, build_wall = _timed(lambda p=plan: CPlanRunner(p, graph, cc))
            out, c_cpu, c_wall = _timed(lambda r=c_runner: r.outputs(x))
            _, cli_np = _cli_eval(plan_path, root / "test.npz", "numpy", root)
            _, cli_c = _cli_eval(plan_path, root / "test.npz", "c", root)
            preds = c_runner.predictions(ds)
            rows.append({
                "plan": what, "samples": SAMPLES,
                "patches": None if plan.patch is None else
                f"k={plan.patch['split_layer']},n={plan.patch['n']}",
                "vdpc": bool(plan.patch and plan.patch.get("vdpc")),
                "bits": sorted({t.bits for t in plan.tensors}),
                "identical": bool(np.array_equal(out, ref)),
                "same_predictions": bool(np.array_equal(preds, ref.reshape(SAMPLES, -1)
                                                        .argmax(axis=1))),
                "numpy_cpu_s_per_sample": np_cpu / SAMPLES,
                "numpy_wall_s_per_sample": np_wall / SAMPLES,
                "c_cpu_s_per_sample": c_cpu / SAMPLES,
                "c_wall_s_per_sample": c_wall / SAMPLES,
                "c_samples_per_cpu_s": SAMPLES / c_cpu,
                "c_build_wall_s": build_wall,
                "eval_cli_wall_s_numpy": cli_np, "eval_cli_wall_s_c": cli_c,
                "speedup_cpu": np_cpu / c_cpu})
        tempfile.tempdir = saved_tempdir
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    table = show(
        f"VWW MobileNetV1-0.25@96: a plan through numpy vs its compiled C ({SAMPLES} samples)",
        ["plan", "numpy ms/sample", "C ms/sample", "C samples/s", "speed-up",
         "C build, cold (s)", "mpq eval numpy (s)", "mpq eval c, warm (s)", "identical",
         "goal ≥ 200/s"],
        [[r["plan"], f"{r['numpy_cpu_s_per_sample'] * 1e3:.2f}",
          f"{r['c_cpu_s_per_sample'] * 1e3:.2f}", f"{r['c_samples_per_cpu_s']:.0f}",
          f"{r['speedup_cpu']:.1f}×", f"{r['c_build_wall_s']:.1f}",
          f"{r['eval_cli_wall_s_numpy']:.1f}", f"{r['eval_cli_wall_s_c']:.1f}",
          str(r["identical"]), "met" if r["c_samples_per_cpu_s"] >= GOAL else
          f"missed ({r['c_samples_per_cpu_s']:.0f}/s)"] for r in rows],
        "ms/sample and samples/s: CPU time of the benchmark process over the plan's runner "
        "(one core; other load on the machine excluded), host cc "
        f"{' '.join(f for f in C_FLAGS if f not in ('-fPIC', '-std=c99'))} "
        "(mpq.engine.C_FLAGS; MPQ_HOST_FAST: the kernels' host-only SIMD paths). "
        "C build, cold: export + compile + load, wall, with an empty object cache (what the "
        "first `mpq eval --engine c` of a plan pays). mpq eval columns: the whole command's "
        "wall time, the c one with the objects cached (float + all-int8 columns included; "
        f"1-minute load average {load:.1f} on {os.cpu_count()} CPUs at the end). identical: "
        "C outputs == numpy's, byte for byte.")
    return {"rows": rows, "table": table, "goal_samples_per_s": GOAL,
            "compiler": cc, "load_average_1min": load}
