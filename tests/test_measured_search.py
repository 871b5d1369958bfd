"""The measured-sensitivity search (`--strategy measured`, the default): damage measured
through the integer reference ranks maps as the model's outputs feel them, plans get no worse
with more memory, and the minimum budget an error names is one every strategy accepts."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO, run_mpq
from onnx_builders import _Builder, _input
from test_bad_input import assert_clean_failure

from mpq.frontend import load_model
from mpq.quant.calibrate import activation_range, calibrate, dataset_from_array
from mpq.search.sensitivity import Probe

FASHION = REPO / "examples" / "fashion"


def fragile_and_robust_model():
    """input [N,4,8,8] → 1×1 conv 4→8 + Relu (`fragile`: continuous values the rest reads)
    → 1×1 conv 8→8 with gain 60 + Clip(0, 6) (`robust`: saturated, nearly only 0 and 6,
    which 2 bits hold exactly on a [0, 6] range) → global average pool → Flatten → Gemm 8→5."""
    b = _Builder(3)
    w = b.init("c1.weight", b.he((8, 4, 1, 1)))
    x = b.conv("input", w, b.init("c1.bias", b.small(8)), "/c1/Conv", 1)
    x = b.node("Relu", [x], "/c1/Relu", outputs=["fragile"])
    w2 = (b.he((8, 8, 1, 1)) * 60.0).astype(np.float32)
    x = b.conv(x, b.init("c2.weight", w2), b.init("c2.bias", b.small(8)), "/c2/Conv", 1)
    lo, hi = b.init("clip_lo", np.float32(0.0)), b.init("clip_hi", np.float32(6.0))
    x = b.node("Clip", [x, lo, hi], "/c2/Clip", outputs=["robust"])
    x = b.node("GlobalAveragePool", [x], "/pool")
    x = b.node("Flatten", [x], "/Flatten", axis=1)
    w3 = b.init("fc.weight", b.he((5, 8), gain=1.0))
    x = b.node("Gemm", [x, w3, b.init("fc.bias", b.small(5))], "/fc/Gemm", outputs=["logits"],
               alpha=1.0, beta=1.0, transB=1)
    return b.model("main_graph", [_input("input", ["batch", 4, 8, 8])], ["logits"])


def fragile_probe_inputs(root: Path):
    """(graph, 32 validation samples, min-max range_of) of `fragile_and_robust_model`,
    calibrated on 64 random samples: what a Probe of it needs."""
    import onnx

    path = root / "fr.onnx"
    onnx.save(fragile_and_robust_model(), path)
    graph = load_model(path)
    x = np.random.default_rng(0).standard_normal((64, 4, 8, 8)).astype(np.float32)
    stats = calibrate(graph, dataset_from_array(x, "random"))

    def range_of(t: str, bits: int) -> tuple[float, float]:
        return activation_range(stats.tensors[t], "minmax", bits)

    return graph, x[:32], range_of


def test_sensitivity_ranks_a_fragile_map_above_a_robust_one(tmp_path: Path) -> None:
    graph, x_val, range_of = fragile_probe_inputs(tmp_path)
    probe = Probe(graph, x_val, range_of, {})
    fragile, robust = probe.group_damage(("fragile",), 2), probe.group_damage(("robust",), 2)
    assert robust >= 0 and fragile > 3 * robust, (fragile, robust)
    # 8 bits is the reference itself; a variant with nothing changed costs nothing
    assert probe.group_damage(("fragile",), 8) == 0.0
    assert probe.damage_of({}, {}) == 0.0


def _search(budget: int, out: Path, strategy: str = "measured", *extra: str):
    return run_mpq("search", FASHION / "fashion_cnn.onnx", "--board", "nano33ble", "--data",
                   FASHION / "calib.npz", "--sram", str(budget), "--strategy", strategy,
                   "-o", out, "-q", *extra)


def test_more_memory_never_measures_worse(tmp_path: Path) -> None:
    """A budget ladder on the Fashion example, from a plan with 4-bit maps to all-8-bit ones:
    the measured damage of the chosen bits (the search's own validation measure, before the
    PTQ fit it then keeps) never grows with the budget, and the plan records it."""
    damages = []
    for budget in (9_116, 10_816, 15_000):
        out = tmp_path / f"p{budget}.json"
        r = _search(budget, out)
        assert r.returncode == 0, r.stderr
        plan = json.loads(out.read_text())
        assert plan["predicted"]["sram_needed_bytes"] <= budget
        fid = plan["predicted"]["fidelity"]
        assert fid["samples"] == 64 and set(fid["outputs"]) == {"logits"}
        assert 0.0 <= fid["outputs"]["logits"]["top1_agreement"] <= 1.0
        measured = plan["search"]["measured"]
        damages.append(measured.get("damage_before_ptq", measured["damage"]))
    assert damages[0] > 0 and damages == sorted(damages, reverse=True), damages


def test_a_deeper_stage_without_vdpc_keeps_more_bits(tmp_path: Path) -> None:
    """At half the Fashion example's int8 need the default spends recomputed MACs (within its
    1.0 bound) on an 11-layer patch stage without VDPC instead of 2-bit maps: every map at 4
    bits or more, lower measured damage than under the paper strategies' 25 % bound and
    VDPC, and still bit-exact."""
    plans = {}
    for label, extra in (("default", ()), ("bounded", ("--max-overhead", "0.25"))):
        out = tmp_path / f"{label}.json"
        r = _search(12_520, out, "measured", *extra)
        assert r.returncode == 0, r.stderr
        plans[label] = json.loads(out.read_text())
    deep, bounded = plans["default"], plans["bounded"]
    assert deep["patch"]["split_layer"] > bounded["patch"]["split_layer"]
    assert deep["patch"]["vdpc"] is None
    total = sum(layer["macs"] for layer in deep["layers"])
    assert bounded["patch"]["redundant_macs"] <= 0.25 * total < deep["patch"]["redundant_macs"] \
        <= 1.0 * total
    assert min(t["bits"] for t in deep["tensors"]) >= 4
    assert min(t["bits"] for t in bounded["tensors"]) == 2
    assert deep["search"]["measured"]["damage"] < bounded["search"]["measured"]["damage"]
    assert deep["predicted"]["sram_needed_bytes"] <= 12_520
    r = run_mpq("verify", tmp_path / "default.json", "--data", FASHION / "test.npz",
                "--samples", "4", "-q")
    assert r.returncode == 0 and "0 mismatches" in r.stdout, r.stdout + r.stderr


def test_compare_strategies_keeps_the_best_ranked_plan(tmp_path: Path) -> None:
    """`--compare-strategies`: the other strategies' plans are measured beside the measured
    one, the plan records every candidate, and the kept plan ranks best (top-1 agreement with
    float on the calibration samples, then the measured damage)."""
    out = tmp_path / "p.json"
    # below the int8 need (10,816 B: an 11-layer 7×7 stage), so the measured plan has damage
    r = _search(10_000, out, "measured", "--compare-strategies")
    assert r.returncode == 0, r.stderr
    plan = json.loads(out.read_text())
    assert plan["strategy"] == "measured"
    sel = plan["search"]["measured"]["selection"]
    assert sel["samples"] == 256 and sel["candidates"][0]["from"] == "measured"
    assert len(sel["candidates"]) >= 2  # the other strategies' plans were measured too
    rank = {c["from"]: (c["top1_agreement"], -c["damage"]) for c in sel["candidates"]}
    assert rank[sel["chosen"]] == max(rank.values())
    assert -rank[sel["chosen"]][1] == plan["search"]["measured"]["damage"]


def test_the_advertised_minimum_is_accepted_by_every_strategy(tmp_path: Path) -> None:
    r = _search(2_000, tmp_path / "never.json")
    assert_clean_failure(r)
    assert not (tmp_path / "never.json").exists()
    need = int(re.search(r"needs at least ([\d,]+) B SRAM", r.stderr).group(1).replace(",", ""))
    for strategy in ("measured", "exact", "vdqs", "qe", "rusci"):
        out = tmp_path / f"{strategy}.json"
        r = _search(need, out, strategy)
        assert r.returncode == 0, (strategy, r.stderr)
        assert json.loads(out.read_text())["predicted"]["sram_needed_bytes"] <= need
    r = _search(need - 1, tmp_path / "below.json")
    assert_clean_failure(r, f"needs at least {need:,} B SRAM")


@pytest.mark.parametrize("samples", [3, 15])
def test_too_little_calibration_data_is_one_line(tmp_path: Path, samples: int) -> None:
    d = np.load(FASHION / "calib.npz")
    small = tmp_path / "small.npz"
    np.savez(small, x=d["x"][:samples])
    out = tmp_path / "plan.json"
    r = run_mpq("search", FASHION / "fashion_cnn.onnx", "--board", "nano33ble", "--data",
                small, "-o", out)
    assert_clean_failure(r, "at least 16")
    assert not out.exists()
    assert "--strategy exact" in r.stderr and "--strategy exact" in r.stderr


class _Plan:
    def __init__(self, name: str) -> None:
        self.name = name

    def to_json(self) -> str:
        return json.dumps({k: self.name for k in ("tensors", "layers", "patch", "schedule")})


class _Result:
    def __init__(self, name: str) -> None:
        self.plan = _Plan(name)


class _Judge:
    """Agreement counts by plan name (the selection's first key)."""

    def __init__(self, counts: dict[str, int]) -> None:
        self.counts, self.measured = counts, []
        self.x, self.float_top1 = np.zeros((10, 1)), {"logits": np.zeros(10, int)}

    def agreement(self, plan) -> int:
        self.measured.append(plan.name)
        return self.counts[plan.name]


def test_selection_keeps_the_plan_closest_to_float() -> None:
    """`portfolio.choose`: most top-1 agreement wins; equal agreement goes to less damage; a
    full tie keeps the measured strategy's own plan; a plan found twice is measured once."""
    from mpq.search.portfolio import choose

    damage = {"own": 0.02, "a": 0.05, "b": 0.01, "c": 0.01}
    judge = _Judge({"own": 8, "a": 9, "b": 9, "c": 8})

    def pick(names: list[str]) -> str:
        best, _ = choose(_Result("own"), lambda: [(n, _Result(n)) for n in names], judge,
                         lambda plan: damage[plan.name], lambda line: None)
        return best.label

    assert pick(["a"]) == "a"  # more agreement beats less damage
    assert pick(["a", "b"]) == "b"  # same agreement: less damage
    damage["c"] = damage["own"]
    assert pick(["c"]) == "measured"  # a full tie keeps the default's own plan
    judge.measured.clear()
    best, cands = choose(_Result("own"), lambda: [("again", _Result("own")), ("a", _Result("a"))],
                         judge, lambda plan: damage[plan.name], lambda line: None)
    assert judge.measured == ["own", "a"] and [c.label for c in cands] == ["measured", "a"]


def test_fashion_at_035x_stays_within_1pp_of_float(tmp_path: Path) -> None:
    """Issue 13's target: at 8,551 B (0.35× of the Fashion example's 24,432 B int8 need) the
    default plan keeps top-1 within 1 pp of float (92.9 %) on the 1000 held-out images — 92.1 %
    measured: an 11-layer 7×7 stage whose expanding pointwise convolution writes over its
    dying input, every map but one block's expansion at 8 bits — meets the budget, and its
    export is byte-exact on the host."""
    import shutil

    from mpq.plan import load_plan
    from mpq.verify import verify

    out = tmp_path / "p.json"
    r = _search(8_551, out)
    assert r.returncode == 0, r.stderr
    plan = load_plan(out)
    assert plan.predicted["sram_needed_bytes"] <= 8_551
    assert plan.patch is not None and plan.schedule.get("overlap")
    r = run_mpq("eval", out, "--data", FASHION / "test.npz", "--json", "-q")
    assert r.returncode == 0, r.stderr
    top1 = json.loads(r.stdout)
    assert top1["samples"] == 1000 and top1["float"] == pytest.approx(0.929)
    assert top1["plan"] >= top1["float"] - 0.010
    g = load_model(FASHION / "fashion_cnn.onnx")
    x = np.load(FASHION / "test.npz")["x"][:4]
    assert verify(plan, g, x, "host").mismatches == 0
    if shutil.which("arm-none-eabi-gcc") and shutil.which("qemu-system-arm"):
        assert verify(plan, g, x[:1], "qemu-m4").mismatches == 0
