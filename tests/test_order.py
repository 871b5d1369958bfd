"""Memory-aware execution order (issue 16 item 3, `mpq.order`): on a branching graph the
chosen order has a strictly lower planned peak than the file order, exactly the lowest over
every topological order; the plan records it, and export + `mpq verify` (host and qemu-m4) run
it at 0 mismatches, int8 and with sub-byte maps; a tampered order is refused in one line."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import run_mpq
from onnx_builders import _Builder, _input
from real_networks import blazeface_style
from test_bad_input import assert_clean_failure

from mpq.frontend import load_model
from mpq.ir import graph_fingerprint
from mpq.memory import layer_memory
from mpq.order import (
    apply_order,
    best_order,
    order_peak,
    order_problem,
    segments,
    topological_orders,
)
from mpq.plan import load_plan, load_plan_with_model


def branches_model(seed: int = 0) -> onnx.ModelProto:
    """Two paths from the input, concatenated, listed small path first:
    ``input`` [N, 4, 16, 16] → b: 1×1 4→8 Relu; a: 1×1 4→64 Relu → 1×1 64→4; Concat(a, b) →
    1×1 12→4 = ``out``. Running `b` first keeps its 2 KB alive beside a's 16 KB map."""
    b = _Builder(seed)

    def conv(x: str, cin: int, cout: int, name: str, relu: bool = True) -> str:
        w = b.init(f"{name}.weight", b.he((cout, cin, 1, 1)))
        y = b.conv(x, w, b.init(f"{name}.bias", b.small(cout)), f"/{name}/Conv", 1,
                   output="out" if name == "head" else None)
        return b.node("Relu", [y], f"/{name}/Relu") if relu else y

    small = conv("input", 4, 8, "b")
    wide = conv("input", 4, 64, "a1")
    a = conv(wide, 64, 4, "a2", relu=False)
    x = b.node("Concat", [a, small], "/cat/Concat", axis=1)
    conv(x, 12, 4, "head", relu=False)
    return b.model("branches", [_input("input", ["batch", 4, 16, 16])], ["out"])


@pytest.fixture(scope="module")
def branches(tmp_path_factory) -> dict:
    """The model, data, and plans: int8 in memory order and file order, and a tight budget
    (sub-byte maps) in memory order."""
    root = tmp_path_factory.mktemp("order")
    onnx.save(branches_model(), root / "branches.onnx")
    rng = np.random.default_rng(0)
    np.savez(root / "calib.npz", x=rng.standard_normal((16, 4, 16, 16)).astype(np.float32))
    np.savez(root / "test.npz", x=rng.standard_normal((6, 4, 16, 16)).astype(np.float32))
    plans = {}
    for kind, opts in (("memory", ("--strategy", "int8")),
                       ("file", ("--strategy", "int8", "--order", "file")),
                       ("tight", ("--strategy", "qe", "--sram", "17000"))):
        plans[kind] = root / f"{kind}.plan.json"
        # the order's recorded peaks are the planner's without overlap (`mpq.order`)
        r = run_mpq("search", "branches.onnx", "--board", "stm32f412", "--patches", "none",
                    "--no-overlap", *opts,
                    *(("--data", "calib.npz") if kind != "tight" else ()), "-o", plans[kind],
                    "-q", cwd=root)
        assert r.returncode == 0, r.stderr
    return {"root": root, "model": root / "branches.onnx", "plans": plans}


def test_the_chosen_order_is_the_lowest_peak_of_every_order(branches) -> None:
    """Exact search: the peak is the real planner's for the chosen order, strictly below the
    file order's, and no topological order plans lower."""
    graph = load_model(branches["model"])
    file_names = tuple(n.name for n in graph.nodes)
    choice = best_order(graph)
    every = list(topological_orders(graph))
    assert choice.method == "exact" and choice.orders == len(every) > 1
    assert every[0] == file_names  # the file order is a candidate (and wins ties)
    assert choice.file_peak == layer_memory(graph).peak_sram_bytes
    assert choice.peak == layer_memory(apply_order(graph, choice.order)).peak_sram_bytes
    assert choice.peak < choice.file_peak
    assert choice.peak == min(order_peak(graph, o) for o in every)
    assert choice.order.index("/a2/Conv") < choice.order.index("/b/Conv")  # wide path first


def test_reordering_keeps_the_model_fingerprint(branches) -> None:
    """A reordered graph still names the same model (plans and statistics pin it), and its
    nodes run in the new order."""
    graph = load_model(branches["model"])
    order = best_order(graph).order
    moved = apply_order(graph, order)
    assert [n.name for n in moved.nodes] == list(order) != [n.name for n in graph.nodes]
    assert graph_fingerprint(moved) == graph_fingerprint(graph)
    assert order_problem(graph, tuple(reversed(order))) is not None


def test_the_plan_records_the_order_and_its_peak(branches) -> None:
    memory, file = (load_plan(branches["plans"][k]) for k in ("memory", "file"))
    plan, _, graph = load_plan_with_model(branches["plans"]["memory"])
    assert plan.schedule["order"] == [n.name for n in graph.nodes] \
        == [layer.name for layer in plan.layers]
    assert "order" not in file.schedule and "order" not in file.search
    assert memory.search["order"]["method"] == "exact"
    assert memory.search["order"]["peak_sram_bytes_file_order"] \
        == file.predicted["peak_sram_bytes"]
    assert memory.predicted["peak_sram_bytes"] < file.predicted["peak_sram_bytes"]


def _verify(plan: Path, target: str) -> dict:
    r = run_mpq("verify", plan, "--data", plan.parent / "test.npz", "--target", target,
                "--json")
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


@pytest.mark.parametrize("kind", ["memory", "tight"])
def test_a_reordered_plan_verifies_on_the_host(branches, kind: str) -> None:
    plan = load_plan(branches["plans"][kind])
    assert "order" in plan.schedule
    if kind == "tight":
        assert min(t.bits for t in plan.tensors) < 8  # sub-byte maps in the new order
    result = _verify(branches["plans"][kind], "host")
    assert result["mismatches"] == 0 and result["samples"] == 6


def test_a_reordered_plan_verifies_under_qemu_m4(branches) -> None:
    missing = [t for t in ("arm-none-eabi-gcc", "qemu-system-arm") if shutil.which(t) is None]
    if missing:
        if os.environ.get("CI"):
            pytest.fail(f"{', '.join(missing)} missing in CI")
        pytest.skip(f"{', '.join(missing)} not installed")
    result = _verify(branches["plans"]["tight"], "qemu-m4")
    assert result["mismatches"] == 0 and result["instructions"] > 0


@pytest.mark.parametrize("order, fragment", [
    (lambda o: o[::-1], "runs before"),
    (lambda o: o[1:], "must list each of the model's"),
])
def test_a_tampered_order_is_refused_in_one_line(branches, tmp_path: Path, order,
                                                 fragment: str) -> None:
    data = json.loads(branches["plans"]["memory"].read_text())
    data["schedule"]["order"] = order(data["schedule"]["order"])
    bad = tmp_path / "bad.plan.json"
    bad.write_text(json.dumps(data))
    r = run_mpq("export", bad, "--model", branches["model"], "-o", tmp_path / "out")
    assert_clean_failure(r, "schedule.order", fragment)
    assert not (tmp_path / "out").exists()


def test_the_heuristic_never_plans_more_than_the_file_order(tmp_path: Path) -> None:
    """BlazeFace-style (four heads on two scales: more than EXACT_ORDERS orders): the
    heuristic's order plans strictly less than the file order, and each segment it searched
    exactly lies between cut nodes."""
    onnx.save(blazeface_style(), tmp_path / "blaze.onnx")
    graph = load_model(tmp_path / "blaze.onnx")
    choice = best_order(graph)
    assert choice.method == "heuristic"
    assert choice.peak == order_peak(graph, choice.order) < choice.file_peak
    names = [n.name for n in graph.nodes]
    for lo, hi in segments(graph, tuple(names)):
        assert 0 <= lo < hi <= len(names) and hi - lo >= 2


@pytest.mark.parametrize("order", ["memory", "file"])
def test_inspect_plans_the_peak_the_int8_search_plans(branches, order: str) -> None:
    # A user checks a model with `mpq inspect` before searching: the same order and the same
    # I/O placement must give the same int8 peak (and the order's layer listing). The
    # fixture's plans are made without overlap; test_cli checks inspect's default with it.
    r = run_mpq("inspect", branches["model"], "--order", order, "--no-overlap", "--json")
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    plan = load_plan(branches["plans"][order])
    assert d["io"] == "arena" and d["input_bytes"] == d["output_bytes"] == 0
    assert d["peak_sram_bytes"] == plan.predicted["peak_sram_bytes"]
    assert [x["name"] for x in d["layers"]] == [layer.name for layer in plan.layers]
