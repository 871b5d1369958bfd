"""`mpq search --strategy importance`: LIMPQ's fitted LSQ step sizes and its ILP (DESIGN §7.4).

The fits must beat the min/max quantiser on real layers, lower bits must cost more, the ILP
must meet every budget it is given (SRAM through the real planner, Flash, BitOPs) and the plan
must be a normal one: deterministic, exported and bit-exact in C.
"""

from __future__ import annotations

import itertools
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import run_mpq
from test_bad_input import assert_clean_failure

from mpq.boards import get_board
from mpq.frontend import load_model
from mpq.plan import load_plan
from mpq.quant.calibrate import calibrate, load_dataset
from mpq.search import importance as imp
from mpq.search.driver import SearchOptions, search
from mpq.search.solvers import BitopsBudget, BitopsTerm, Group, Problem, solve_exact


@pytest.fixture(scope="module")
def kws_table(kws):
    graph = load_model(kws["model"])
    data = load_dataset(kws["calib"], graph)
    stats = calibrate(graph, data)
    return graph, data, stats, imp.ImportanceTable(graph, data, stats, (8, 4, 2), (8, 4, 2))


def _mac_layers(graph) -> list[str]:
    return [n.name for n in graph.nodes if n.weight is not None]


def test_lsq_fit_beats_the_minmax_step_on_real_layers(kws_table) -> None:
    graph, _, _, table = kws_table
    for name in _mac_layers(graph)[1:4]:  # depthwise (padded taps) and pointwise layers
        sample = table.sample(name)
        for bits in (8, 4, 2):
            fit = table.act_fit(name, bits)
            minmax = imp.minmax_activation_error(sample, bits)
            assert fit.error <= minmax
            if bits == 2:  # min/max wastes most of 4 levels on rare large values
                assert fit.error < 0.8 * minmax, (name, fit.error, minmax)
        # Weights: against the deployed per-channel max-abs step (DESIGN §4.1).
        for bits in (4, 2):
            qn, qp = imp.weight_levels(bits)
            amax = np.abs(sample.w).max(axis=2, keepdims=True)
            deployed = float(sample.backward(sample.x,
                                             imp.lsq_quantize(sample.w, amax / qp, qn, qp))[0])
            assert table.weight_fit(name, bits).error <= deployed
            if bits == 2:
                assert table.weight_fit(name, bits).error < 0.8 * deployed


def test_fit_is_deterministic_and_lower_bits_cost_more(kws_table, kws) -> None:
    graph, data, stats, table = kws_table
    again = imp.ImportanceTable(graph, data, stats, (8, 4, 2), (8, 4, 2))
    for name in _mac_layers(graph):
        a = [table.act_fit(name, b).importance for b in (8, 4, 2)]
        w = [table.weight_fit(name, b).importance for b in (8, 4, 2)]
        assert a[0] < a[1] < a[2], (name, a)
        assert w[0] < w[1] < w[2], (name, w)
        assert a == [again.act_fit(name, b).importance for b in (8, 4, 2)]


def test_gradient_is_lsq_straight_through() -> None:
    v = np.array([-3.0, -0.26, 0.0, 0.2, 1.2, 9.0])
    q, grad = imp.lsq_with_gradient(v, 0.5, -2, 1)
    assert np.array_equal(q, [-1.0, -0.5, 0.0, 0.0, 0.5, 0.5])
    # Inside: round(v/s) − v/s; clipped below: Q_N; clipped above: Q_P (LSQ Eq. 3).
    np.testing.assert_allclose(grad, [-2.0, -1 + 0.52, 0.0, -0.4, 1.0, 1.0])
    assert imp.lsq_grad_scale(100, 7) == pytest.approx(1 / np.sqrt(700))


def test_bitops_rows_are_exact_against_brute_force() -> None:
    """The joint (b_w, b_a) linearisation: the ILP's optimum equals enumeration."""
    rng = np.random.default_rng(3)
    options = (8, 4, 2)
    groups = []
    for i in range(3):
        for kind in ("a", "w"):
            cost = np.sort(rng.random(3))  # 8 bits cheapest
            groups.append(Group(f"{kind}{i}", (f"t{i}",) if kind == "a" else (), options,
                                {b: -float(c) for b, c in zip(options, cost, strict=True)}))
    terms = [BitopsTerm(float(m), f"a{i}", 8, f"w{i}", 8)
             for i, m in enumerate((1000, 3000, 500))]
    terms.append(BitopsTerm(700.0, None, 8, "w0", 8))  # input fixed at 8
    for budget in (50_000, 120_000, 200_000, 280_000):
        problem = Problem(groups=groups, live=[[("t0",), ("t1",), ("t2",)]],
                          size=lambda t, b: 0, arena=lambda bits: 0, sram_budget=1,
                          flash_budget=1, bitops=BitopsBudget(terms, budget))
        best = None
        for combo in itertools.product(options, repeat=len(groups)):
            choice = {g.name: b for g, b in zip(groups, combo, strict=True)}
            if problem.bitops.total(choice) <= budget:
                value = problem.objective(choice)
                best = value if best is None else max(best, value)
        sol = solve_exact(problem)
        assert problem.bitops.total(sol.choice) <= budget
        assert sol.objective == pytest.approx(best, abs=1e-6)


def test_budgets_met_by_the_plan(kws) -> None:
    graph = load_model(kws["model"])
    data = load_dataset(kws["calib"], graph)
    stats = calibrate(graph, data)
    free = search(kws["model"], graph, get_board("nano33ble"), data,
                  SearchOptions(strategy="importance", sram=20_000, weight_bits=(8, 4, 2)),
                  stats=stats)
    assert free.plan.predicted["bitops"] == free.plan.predicted["bitops_int8"]  # nothing binds
    budget = free.plan.predicted["bitops_int8"] // 2
    # just above the 2-bit floor (86,742 B: the sub-byte kernels' code — packed, unpacked and
    # the channel-group depthwise/pooling entry points — is reserved in it, so it is no longer
    # below int8's need with int8's smaller code)
    flash = 87_200
    res = search(kws["model"], graph, get_board("nano33ble"), data,
                 SearchOptions(strategy="importance", sram=11_000, flash=flash,
                               weight_bits=(8, 4, 2), bitops=budget), stats=stats)
    p = res.plan.predicted
    assert p["sram_needed_bytes"] <= 11_000
    assert p["flash_bytes"] + p["code_bytes_estimate"] <= flash
    assert p["bitops"] <= budget
    per_layer = sum(layer.bitops for layer in res.plan.layers)
    assert p["bitops"] == per_layer if res.plan.patch is None else p["bitops"] > per_layer
    bits = {t.name: t.bits for t in res.plan.tensors}
    assert res.schedule.memory(bits).peak_sram_bytes + p["input_bytes"] + p["output_bytes"] \
        + p["stack_bytes"] \
        == p["sram_needed_bytes"]
    assert min(layer.w_bits for layer in res.plan.layers if layer.w_bits) < 8
    s = res.plan.search
    assert s["solver"] == "importance" and s["bitops_budget"] == budget
    table = s["importance"]
    assert table["alpha"] == imp.ALPHA and table["activations"] and table["weights"]


def test_infeasible_and_misused_options_fail_in_one_line(kws, tmp_path: Path) -> None:
    out = tmp_path / "plan.json"
    r = run_mpq("search", kws["model"], "--board", "nano33ble", "--data", kws["calib"],
                "--strategy", "importance", "--bitops", "1000000", "-o", out, "-q")
    assert_clean_failure(r, "needs at least", "BitOPs", "--bitops is 1,000,000")
    assert not out.exists()
    r = run_mpq("search", kws["model"], "--board", "nano33ble", "--data", kws["calib"],
                "--strategy", "importance", "--sram", "3000", "-o", out, "-q")
    assert_clean_failure(r, "needs at least", "B SRAM", "budget is 3,000 B")
    r = run_mpq("search", kws["model"], "--board", "nano33ble", "--data", kws["calib"],
                "--bitops", "90000000", "-o", out, "-q")
    assert_clean_failure(r, "--bitops", "--strategy importance")
    r = run_mpq("search", kws["model"], "--board", "nano33ble", "--strategy", "importance",
                "-o", out, "-q")
    assert_clean_failure(r, "importance", "--data")
    assert not out.exists()


def test_kws_plan_is_deterministic_exports_and_is_bit_exact(kws, tmp_path: Path) -> None:
    shutil.copy(kws["model"], tmp_path / "kws.onnx")
    a, b = tmp_path / "a.plan.json", tmp_path / "b.plan.json"
    for out in (a, b):
        r = run_mpq("search", tmp_path / "kws.onnx", "--board", "nano33ble", "--data",
                    kws["calib"], "--sram", "9000", "--strategy", "importance", "-o", out,
                    "-q")
        assert r.returncode == 0, r.stderr
    assert a.read_bytes() == b.read_bytes()
    plan = load_plan(a)
    assert plan.strategy == "importance"
    assert plan.predicted["sram_needed_bytes"] <= 9_000  # int8 (overlapped) needs ~11,000 B
    assert min(t.bits for t in plan.tensors) < 8
    r = run_mpq("eval", a, "--data", kws["test"], "--json", "-q")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["plan"] > 0.8
    r = run_mpq("export", a, "-o", tmp_path / "fw")
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "fw" / "mpq_model.c").exists()
    targets = ["host"]
    if shutil.which("arm-none-eabi-gcc") and shutil.which("qemu-system-arm"):
        targets.append("qemu-m4")
    for target in targets:
        r = run_mpq("verify", a, "--target", target, "--data", kws["test"], "--samples", "4")
        assert r.returncode == 0, r.stderr + r.stdout
        assert "0 mismatches" in r.stdout
