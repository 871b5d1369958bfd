"""`mpq search`: plans that meet the budget, are byte-identical, and say why they fail."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO, SHARED_ONNX, run_mpq, shared_model
from test_bad_input import assert_clean_failure

from mpq.boards import get_board
from mpq.frontend import load_model
from mpq.memory import layer_memory
from mpq.patch import PatchSplit, plan_patches
from mpq.plan import load_plan
from mpq.quant.calibrate import dataset_from_array
from mpq.search.driver import SearchOptions, search


def random_data(graph, n: int, scale: float = 1.0):
    from mpq.quant.calibrate import onnx_input_shape

    x = np.random.default_rng(0).random((n, *onnx_input_shape(graph))).astype(np.float32)
    return dataset_from_array(x * scale, "random")


def test_plan_is_byte_identical_and_complete(kws, tmp_path: Path) -> None:
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    for out in (a, b):
        r = run_mpq("search", kws["model"], "--board", "nano33ble", "--data", kws["calib"],
                    "--sram", "11000", "-o", out, "-q")
        assert r.returncode == 0, r.stderr
    assert a.read_bytes() == b.read_bytes()
    d = json.loads(a.read_text())
    for key in ("schema", "model_sha256", "board", "strategy", "patch", "tensors", "layers",
                "predicted", "search"):
        assert key in d
    assert {"name", "bits", "scale", "zero_point", "bytes"} <= set(d["tensors"][0])
    assert {"name", "op", "w_bits", "a_bits_in", "a_bits_out", "macs", "bitops"} \
        <= set(d["layers"][0])
    assert {"peak_sram_bytes", "flash_bytes", "macs", "bitops"} <= set(d["predicted"])
    assert {"objective", "lambda", "phi", "bins"} <= set(d["search"])
    assert str(tmp_path) not in a.read_text() and "/tmp" not in a.read_text()


def test_budget_met_and_checked_by_the_real_planner(kws) -> None:
    graph = load_model(kws["model"])
    from mpq.quant.calibrate import load_dataset

    # int8 needs 4,600 B on the pooled stage (patch.pooled_splits, its pointwise outputs over
    # their inputs, its first depthwise output raised inside its input, its first conv's
    # scratch in the arena), 9.3 kB layer-based
    for sram in (4_400, 4_560):
        res = search(kws["model"], graph, get_board("nano33ble"),
                     load_dataset(kws["calib"], graph), SearchOptions(sram=sram))
        p = res.plan.predicted
        assert p["sram_needed_bytes"] <= sram
        bits = {t.name: t.bits for t in res.plan.tensors}
        mem = res.schedule.memory(bits)
        assert mem.arena_bytes == p["arena_bytes"]
        assert mem.peak_sram_bytes + p["input_bytes"] + p["output_bytes"] \
            + p["stack_bytes"] == p["sram_needed_bytes"]
        assert min(bits.values()) < 8  # the budget forced sub-byte activations


def test_exact_objective_at_least_vdqs(kws) -> None:
    from mpq.quant.calibrate import calibrate, load_dataset

    graph = load_model(kws["model"])
    stats = calibrate(graph, load_dataset(kws["calib"], graph))
    objectives = {}
    for strategy in ("exact", "vdqs"):
        res = search(kws["model"], graph, get_board("nano33ble"), None,
                     SearchOptions(strategy=strategy, sram=11_000, qbr=False), stats=stats)
        objectives[strategy] = res.plan.search["objective"]
        assert res.plan.predicted["sram_needed_bytes"] <= 11_000
    assert objectives["exact"] >= objectives["vdqs"] - 1e-9


def test_impossible_budget_names_the_smallest_reachable(kws, tmp_path: Path) -> None:
    out = tmp_path / "plan.json"
    r = run_mpq("search", kws["model"], "--board", "nano33ble", "--data", kws["calib"],
                "--sram", "2400", "-o", out, "-q")
    assert_clean_failure(r, "needs at least 2,440 B SRAM", "budget is 2,400 B")
    assert not out.exists()
    r = run_mpq("search", kws["model"], "--board", "nano33ble", "--data", kws["calib"],
                "--strategy", "int8", "--patches", "none", "--sram", "9000", "-o", out, "-q")
    from mpq.budget import predicted_stack_bytes
    from mpq.memory import align_up
    from mpq.patch import plan_patches

    graph = load_model(kws["model"])
    # the defaults: I/O in the arena, outputs overlapping their inputs where that pays, the
    # kernels' scratch inside the arena (then `scratch_bytes` is 0)
    mem = plan_patches(graph, None, "arena", overlap=True, scratch="arena").memory()
    # arena + scratch (16-B aligned, as the export allocates it) + the model's stack (no input
    # and output buffers)
    need = mem.arena_bytes + align_up(mem.scratch_bytes) \
        + predicted_stack_bytes(graph, "cortex-m4/fpv4-sp-d16")
    assert_clean_failure(r, f"needs at least {need:,} B SRAM with 8-bit activations")


def test_plan_eval_and_run(kws, tmp_path: Path) -> None:
    plan = kws["root"] / "kws.plan.json"
    r = run_mpq("search", kws["model"], "--board", "nano33ble", "--data", kws["calib"],
                "--sram", "11000", "--strategy", "vdqs", "-o", plan, "-q")
    assert r.returncode == 0, r.stderr
    r = run_mpq("eval", plan, "--data", kws["test"], "--json", "-q")
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    assert {"float", "int8", "plan", "samples"} <= set(d)
    assert d["plan"] > 0.8  # 4-bit maps with entropy ranges stay usable
    x = np.load(kws["test"])["x"][:2]
    np.save(tmp_path / "x.npy", x)
    r = run_mpq("run", plan, "--input", tmp_path / "x.npy", "-o", tmp_path / "y.npy")
    assert r.returncode == 0, r.stderr
    assert np.load(tmp_path / "y.npy").shape == (2, 12)


def test_plan_refuses_changed_model_and_newer_schema(kws, tmp_path: Path) -> None:
    plan = tmp_path / "p.json"
    model = tmp_path / "kws.onnx"
    shutil.copy(kws["model"], model)
    assert run_mpq("search", model, "--board", "nano33ble", "--data", kws["calib"], "-o",
                   plan, "-q").returncode == 0
    model.write_bytes(model.read_bytes() + b"\0")
    assert_clean_failure(run_mpq("eval", plan, "--data", kws["test"]), "model changed")
    d = json.loads(plan.read_text())
    d["schema"] = 99
    newer = tmp_path / "newer.json"
    newer.write_text(json.dumps(d))
    assert_clean_failure(run_mpq("eval", newer, "--data", kws["test"]), "newer")


def test_plan_finds_its_model_from_another_directory(tmp_path: Path) -> None:
    """The usual Makefile layout: models/ and build/ side by side, commands run from the
    project root. The plan names its model relative to itself (no absolute path), so export
    finds it without --model, and the same layout elsewhere gives the same plan bytes."""
    ex = REPO / "examples" / "fashion"
    plans = []
    for root in (tmp_path / "a", tmp_path / "b"):
        (root / "models").mkdir(parents=True)
        (root / "build").mkdir()
        shutil.copy(ex / "fashion_cnn.onnx", root / "models" / "x.onnx")
        r = run_mpq("search", "models/x.onnx", "--board", "nano33ble", "--strategy", "int8",
                    "--patches", "none", "--data", ex / "calib.npz", "-o", "build/x.plan.json",
                    "-q", cwd=root)
        assert r.returncode == 0, r.stderr
        plans.append((root / "build" / "x.plan.json").read_bytes())
        assert json.loads(plans[-1])["model"] == "../models/x.onnx"
        r = run_mpq("export", "build/x.plan.json", "-o", "build/fw", cwd=root)
        assert r.returncode == 0, r.stderr
        assert (root / "build" / "fw" / "mpq_model.c").is_file()
    assert plans[0] == plans[1]


def test_flash_error_names_the_floor_and_the_floor_is_accepted(tmp_path: Path) -> None:
    """A Flash budget below the floor at the offered weight bits names the floor (the packed
    kernels' code reserved, as 4-bit weights may take them) and the `--weight-bits` that goes
    lower, before any data is read; the floor is a budget the search then meets."""
    ex = REPO / "examples" / "fashion"
    r = run_mpq("search", ex / "fashion_cnn.onnx", "--board", "nano33ble", "--flash", "60000",
                "--data", ex / "calib.npz", "-o", tmp_path / "p.json")
    assert_clean_failure(r, "needs at least", "B Flash with 4-bit weights",
                         "--weight-bits 8,4,2 goes down to")
    assert not (tmp_path / "p.json").exists()
    floor = int(re.search(r"needs at least ([\d,]+) B Flash", r.stderr)[1].replace(",", ""))
    # With a tight SRAM budget too, 4-bit weights meet sub-byte maps and take the packed
    # kernels: their code was in the floor, so the plan still fits it.
    r = run_mpq("search", ex / "fashion_cnn.onnx", "--board", "nano33ble", "--flash",
                str(floor), "--sram", "12000", "--data", ex / "calib.npz", "-o",
                tmp_path / "p.json", "-q")
    assert r.returncode == 0, r.stderr
    p = json.loads((tmp_path / "p.json").read_text())["predicted"]
    assert p["flash_bytes"] + p["code_bytes_estimate"] <= floor


def test_vdpc_thresholds_and_rates() -> None:
    import onnx_builders as B

    from mpq.frontend.onnx_import import import_model

    model = B.mobilenet_v2(0.35, 64, num_classes=10)
    graph = import_model(model, "mbv2")
    sched = plan_patches(graph, PatchSplit(6, 2))
    assert sched.split_tensor is not None
    from mpq.quant.calibrate import calibrate

    data = random_data(graph, 16)
    stats = calibrate(graph, data)
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "m.onnx"
        path.write_bytes(model.SerializeToString())
        # VDPC is the paper's (vdqs); the measured strategy also solves the split without it
        res = search(path, graph, get_board("stm32h743"), data,
                     SearchOptions(strategy="vdqs", patches="k=6,n=2", sram=120_000),
                     stats=stats)
        off = search(path, graph, get_board("stm32h743"), data,
                     SearchOptions(strategy="vdqs", patches="k=6,n=2", sram=120_000,
                                   vdpc=False), stats=stats)
    v = res.plan.patch["vdpc"]
    assert isinstance(v["lo_threshold"], int) and v["lo_threshold"] <= v["hi_threshold"]
    rates = np.array(v["outlier_rate"])
    assert rates.shape == (2, 2) and ((rates >= 0) & (rates <= 1)).all()
    assert off.plan.patch["vdpc"] is None
    p = res.plan.predicted
    assert p["bitops"] <= p["expected_bitops"] <= p["bitops_int8"] + 1


@pytest.mark.parametrize("board", ["nano33ble", "stm32h743"])
@pytest.mark.parametrize("key", sorted(SHARED_ONNX))
def test_every_shared_model_gets_a_plan(key: str, board: str, tmp_path: Path) -> None:
    path = shared_model(SHARED_ONNX[key])
    graph = load_model(path)
    data = random_data(graph, 16, 255.0 if key == "resnet8" else 1.0)
    res = search(path, graph, get_board(board), data, SearchOptions())
    plan = res.plan
    assert plan.predicted["sram_needed_bytes"] <= plan.board["sram_budget"]
    assert plan.predicted["flash_bytes"] + plan.predicted["code_bytes_estimate"] \
        <= plan.board["flash_budget"]
    plan.save(tmp_path / "p.json")
    assert load_plan(tmp_path / "p.json").to_json() == plan.to_json()
    if {t.bits for t in plan.tensors} == {8} and plan.patch is not None:
        # patches only recompute overlaps: an all-8-bit patch plan is right only when the
        # layer-based int8 schedule does not fit (VWW on nano33ble once chose 4x6 patches)
        need = layer_memory(graph, io=plan.schedule["io"]).peak_sram_bytes \
            + plan.predicted["input_bytes"]
        assert need > plan.board["sram_budget"]


def test_rusci_baseline_cuts_only_what_memory_demands(kws) -> None:
    """Rusci's rules: all 8-bit when everything fits; under a budget some maps are cut and the
    real planner accepts the plan."""
    from mpq.quant.calibrate import calibrate, load_dataset
    from mpq.search.rusci import _cut

    graph = load_model(kws["model"])
    stats = calibrate(graph, load_dataset(kws["calib"], graph))
    roomy = search(kws["model"], graph, get_board("nano33ble"), None,
                   SearchOptions(strategy="rusci", qbr=False, patches="none"), stats=stats)
    assert {t.bits for t in roomy.plan.tensors} == {8}
    res = search(kws["model"], graph, get_board("nano33ble"), None,
                 SearchOptions(strategy="rusci", sram=9_000, qbr=False, patches="none"),
                 stats=stats)  # int8, overlapped, needs ~11,000 B
    p = res.plan.predicted
    assert p["sram_needed_bytes"] <= 9_000
    bits = {t.name: t.bits for t in res.plan.tensors}
    assert min(bits.values()) < 8
    assert res.plan.strategy == "rusci"
    assert _cut((8, 4, 2), 8) == 4 and _cut((8, 4, 2), 2) is None


def test_cached_weight_omega_is_the_recomputed_one(monkeypatch) -> None:
    """Each (weight array, bits) is computed once, and the value is weight_omega's own."""
    from mpq.search import driver

    rng = np.random.default_rng(2)
    w1 = rng.standard_normal((8, 3, 3, 4)).astype(np.float32)
    w2 = rng.standard_normal((8, 3, 3, 4)).astype(np.float32) ** 3
    expected = {(i, b): driver.weight_omega(w, b) for i, w in enumerate((w1, w2))
                for b in (8, 4, 2)}
    calls = []
    real = driver.weight_omega
    monkeypatch.setattr(driver, "weight_omega", lambda w, b: calls.append(b) or real(w, b))
    for _ in range(3):  # three "schedules"
        for i, w in enumerate((w1, w2)):
            for b in (8, 4, 2):
                assert driver.cached_weight_omega(w, b) == expected[(i, b)]
    assert len(calls) == 6
    w3 = w1.copy()  # equal values, another array: its own entry, the same number
    assert driver.cached_weight_omega(w3, 4) == expected[(0, 4)] and len(calls) == 7


def test_vdpc_rates_do_not_depend_on_the_slice(monkeypatch) -> None:
    """classify_rates runs the integer reference a few samples at a time: 1 or 64 per run
    give the same thresholds and rates."""
    import onnx_builders as B

    import mpq.vdpc as V
    from mpq.frontend.onnx_import import import_model
    from mpq.interpreter import to_ir_layout
    from mpq.quant.calibrate import calibrate
    from mpq.quant.qmodel import quantize_graph

    graph = import_model(B.mobilenet_v2(0.35, 64, num_classes=10), "mbv2")
    sched = plan_patches(graph, PatchSplit(6, 2))
    data = random_data(graph, 12)
    stats = calibrate(graph, data)
    qm = quantize_graph(graph, stats.ranges())
    classified = next(n for n in graph.nodes if n.name == sched.stage_nodes[0]).outputs[0]
    regions = [[(r.y0, r.y1, r.x0, r.x1) for r in row] for row in sched.regions[classified]]
    st = stats.tensors[classified]
    results = []
    for size in (1, 64):
        monkeypatch.setattr(V, "VDPC_SLICE", size)
        batches = (to_ir_layout(graph, graph.inputs[0], b) for b in data.batches(64))
        # ~300 outliers per patch on these inputs: 310 flags some samples' patches only
        results.append(V.classify_rates(graph, qm, classified, st.mean, st.std, 0.96, 310,
                                        regions, batches).to_dict())
    assert results[0] == results[1] and results[0]["samples"] == 12
    assert any(0 < r < 1 for row in results[0]["outlier_rate"] for r in row)


def test_solver_noise_never_reaches_stdout(capfd) -> None:
    """HiGHS prints debug lines on the C stdout even when silent; `mpq search --json` printed
    them before its JSON. Whatever else reaches stdout inside the solve is kept (C's and
    Python's buffers are two streams: their relative order was never defined)."""
    import ctypes

    from mpq.search.solvers import solver_stdout_filtered

    libc = ctypes.CDLL(None)
    print("before", flush=True)
    with solver_stdout_filtered():
        # C stdio is fully buffered on a file: the wrapper must flush it before restoring
        libc.printf(b"HighsMipSolverData::transformNewIntegerFeasibleSolution tmpSolver.run();\n")
        libc.printf(b"kept from C\n")
        print("kept from Python")
    print("after", flush=True)
    libc.fflush(None)
    lines = capfd.readouterr().out.splitlines()
    assert lines[0] == "before" and lines[-1] == "after"
    assert sorted(lines[1:-1]) == ["kept from C", "kept from Python"]
