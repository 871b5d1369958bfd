"""The latency model: the measured cost table, its fit, the plan's predicted instructions, the
report's column and `mpq search --latency`."""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import onnx_builders as B
import pytest
from conftest import run_mpq
from test_bad_input import assert_clean_failure

from mpq import latency
from mpq.boards import get_board
from mpq.errors import MpqError
from mpq.frontend import load_model
from mpq.quant.calibrate import dataset_from_array, onnx_input_shape
from mpq.search import latency as lsearch
from mpq.search.driver import SearchOptions, search

#: How far the shipped table's fits may be from the plans they were measured on (whole plan).
#: Measured 2026-12-03 on the merged kernels (int8 fast path, packed sub-byte kernels): within a
#: few % except KWS with sub-byte weights (up to +20.1 %: its 10×4 first layer on one input
#: channel shares the `first` class with 3×3 first layers) — a known limit of the fit's shape
#: classes, reported in the README, not a target.
PLAN_TOLERANCE = 0.25


def test_shipped_table_is_well_formed_and_from_a_real_run() -> None:
    table = latency.load_table()
    latency.check_table(table)
    assert table["generated_by"] == latency.REGENERATE
    assert table["machine"]["qemu"] not in ("absent", "unknown")
    assert table["machine"]["gcc_arm"] not in ("absent", "unknown")
    entries = table["targets"]["qemu-m4"]["entries"]
    shapes = {latency.parse_key(k)[:2] for k in entries}
    # The kernel paths whose cost per MAC differs most were all measured.
    assert {("conv2d", "1x1"), ("conv2d", "dw3x3"), ("conv2d", "first"),
            ("fully_connected", "fc")} <= shapes
    assert any(latency.parse_key(k)[2] < 8 for k in entries)  # sub-byte weights measured
    assert any(latency.parse_key(k)[3] < 8 for k in entries)  # sub-byte maps measured
    for e in entries.values():  # each fit explains its own points
        for macs, outputs, ins in e["points"]:
            assert latency.evaluate(e["fit"], macs, outputs) == pytest.approx(
                ins, rel=e["max_rel_error"] + 1e-4)  # recorded to 4 decimals


def test_table_predicts_its_measured_plans() -> None:
    """Per measured plan (recorded in the table), the layers' predictions from the fits add up
    to within PLAN_TOLERANCE of the measured whole-model count (the patch plan only lends the
    table its stage's adds: `stage_adds_only`)."""
    table = latency.load_table()
    entries = table["targets"]["qemu-m4"]["entries"]
    assert len(table["plans"]) >= 2
    assert any(p.get("stage_adds_only") for p in table["plans"]) and "add|-|w0|a8>8" in entries
    for plan in table["plans"]:
        if plan.get("stage_adds_only"):
            continue
        layers = plan["layers"]["qemu-m4"]
        predicted = sum(latency.evaluate(entries[key]["fit"], macs, outputs)
                        for key, macs, outputs, _ in layers)
        measured = plan["instructions"]["qemu-m4"]
        assert abs(predicted - measured) <= PLAN_TOLERANCE * measured, plan["case"]


def test_fit_is_non_negative_least_squares() -> None:
    pts = [(m, o, 3 * m + 5 * o + 100) for m, o in [(1000, 10), (5000, 40), (20000, 70),
                                                     (80000, 300)]]
    f = latency.fit(pts)
    assert f == pytest.approx({"a": 3, "b": 5, "c": 100}, rel=1e-6)
    # A cost that falls with size cannot make a coefficient negative.
    f = latency.fit([(1000, 10, 5000), (2000, 20, 4000)])
    assert min(f.values()) >= 0


def test_nearest_key_prefers_shape_then_bits() -> None:
    entries = {k: {"points": [[1, 1, 1]]} for k in
               ("conv2d|1x1|w8|a8>8", "conv2d|kxk|w4|a4>4", "conv2d|1x1|w4|a8>8")}
    assert latency.nearest_key(entries, "conv2d|1x1|w4|a4>4") == "conv2d|1x1|w4|a8>8"
    assert latency.nearest_key(entries, "conv2d|kxk|w8|a8>8") == "conv2d|kxk|w4|a4>4"
    assert latency.nearest_key(entries, "add|-|w0|a8>8") is None
    table = {"targets": {"qemu-m4": {"entries": {
        "conv2d|1x1|w8|a8>8": {"fit": {"a": 2.0, "b": 1.0, "c": 10.0}, "points": []}}}}}
    assert latency.predict_layer(table, "qemu-m4", "conv2d|1x1|w4|a8>8", 100, 10) == \
        (220, "conv2d|1x1|w8|a8>8")
    with pytest.raises(MpqError, match="no measured layer of kind 'add'"):
        latency.predict_layer(table, "qemu-m4", "add|-|w0|a8>8", 0, 10)


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """A small MobileNetV2 and calibration data (a classifier: softmax-free logits)."""
    tmp = tmp_path_factory.mktemp("latency")
    path = tmp / "m.onnx"
    path.write_bytes(B.mobilenet_v2(0.35, 32, num_classes=10).SerializeToString())
    graph = load_model(path)
    x = np.random.default_rng(2).random((16, *onnx_input_shape(graph))).astype(np.float32)
    np.savez(tmp / "calib.npz", x=x)
    return path, graph, x


def test_plan_records_predicted_instructions_and_the_report_shows_them(small, tmp_path) -> None:
    from mpq.plan import load_plan
    from mpq.plan_check import check_plan
    from mpq.report import instructions_breakdown

    path, graph, x = small
    plan = search(path, graph, get_board("nano33ble"), dataset_from_array(x, "r"),
                  SearchOptions(strategy="qe", patches="none")).plan
    ins = plan.predicted["instructions"]
    assert ins["target"] == "qemu-m4" and ins["total"] == sum(ins["layers"].values()) > 0
    again = latency.predict_plan(plan, graph)
    assert (again["total"], again["layers"]) == (ins["total"], ins["layers"])
    check_plan(plan, graph)
    data = json.loads(plan.to_json())

    def load(d: dict):
        (tmp_path / "p.json").write_text(json.dumps(d))
        return load_plan(tmp_path / "p.json")

    assert load(data).predicted["instructions"] == ins  # round trip
    shown = instructions_breakdown(plan, graph)
    assert len(shown["layers"]) == len(graph.nodes)
    assert sum(v for v in shown["layers"] if v is not None) == ins["total"]
    # A plan without the prediction (made before the latency model) still loads.
    old = copy.deepcopy(data)
    del old["predicted"]["instructions"]
    assert instructions_breakdown(load(old), graph) is None
    bad = copy.deepcopy(data)
    bad["predicted"]["instructions"]["total"] += 1
    with pytest.raises(MpqError, match="predicted.instructions.total"):
        load(bad)
    bad = copy.deepcopy(data)
    bad["predicted"]["instructions"]["layers"]["no such layer"] = 1
    bad["predicted"]["instructions"]["total"] += 1
    with pytest.raises(MpqError, match="predicted.instructions.layers"):
        check_plan(load(bad), graph)


def test_latency_variants_and_tolerance() -> None:
    assert lsearch.variants((8, 4, 2), (8,)) == [((8, 4, 2), (8,)), ((8, 4), (8,)),
                                                 ((8, 2), (8,)), ((8,), (8,))]
    v = lsearch.variants((8, 4), (8, 4))
    assert v[0] == ((8, 4), (8, 4)) and ((8,), (4,)) in v and len(v) == len(set(v)) == 6
    ref = {"outputs": {"y": {"top1_agreement": 0.95, "cosine": 0.99}}}
    assert lsearch.admissible({"outputs": {"y": {"top1_agreement": 0.946, "cosine": 0.9}}},
                              ref, 0.5)
    assert not lsearch.admissible({"outputs": {"y": {"top1_agreement": 0.944,
                                                     "cosine": 0.999}}}, ref, 0.5)
    ref = {"outputs": {"y": {"top1_agreement": None, "cosine": 0.99}}}
    assert lsearch.admissible({"outputs": {"y": {"top1_agreement": None, "cosine": 0.986}}},
                              ref, 0.5)
    assert not lsearch.admissible({"outputs": {"y": {"top1_agreement": None,
                                                     "cosine": 0.984}}}, ref, 0.5)


@dataclass
class _Fake:
    plan: SimpleNamespace = field(default_factory=SimpleNamespace)


def _fake_search(results: dict):
    """A stand-in for the driver's search: per activation bit set, a plan's predictions."""
    def run(model_path, graph, board, data, opts):
        r = results[tuple(opts.bits)]
        if isinstance(r, Exception):
            raise r
        top1, ins = r
        return _Fake(SimpleNamespace(notes=[], search={}, predicted={
            "bitops": 1, "instructions": {"total": ins},
            "fidelity": {"damage": 1 - top1, "outputs": {"y": {"top1_agreement": top1,
                                                               "cosine": 0.9}}}}))
    return run


def test_latency_search_picks_the_fastest_admissible_plan() -> None:
    opts = SearchOptions(bits=(8, 4, 2))
    fake = _fake_search({(8, 4, 2): (0.95, 1000), (8, 4): (0.948, 900), (8, 2): (0.90, 500),
                         (8,): MpqError("does not fit")})
    r = lsearch.latency_search(Path("m.onnx"), None, None, None, opts, 0.5, search_fn=fake)
    rec = r.plan.search["latency"]
    assert r.plan.predicted["instructions"]["total"] == 900 and rec["chosen"] == 1
    assert [c["admissible"] for c in rec["candidates"]] == [True, True, False]
    # With a tolerance of 0 only the accuracy-first plan itself qualifies.
    r = lsearch.latency_search(Path("m.onnx"), None, None, None, opts, 0.0, search_fn=fake)
    assert r.plan.search["latency"]["chosen"] == 0
    with pytest.raises(MpqError, match="--strategy measured"):
        lsearch.latency_search(Path("m.onnx"), None, None, None,
                               SearchOptions(strategy="qe"), 0.5, search_fn=fake)


def test_search_latency_cli(small, tmp_path: Path) -> None:
    path, _, _ = small
    out = tmp_path / "m.plan.json"
    r = run_mpq("search", path, "--board", "nano33ble", "--data", path.parent / "calib.npz",
                "--patches", "none", "--bits", "8,4", "--latency", "-o", out, "-q")
    assert r.returncode == 0, r.stderr
    plan = json.loads(out.read_text())
    rec = plan["search"]["latency"]
    chosen = rec["candidates"][rec["chosen"]]
    assert plan["predicted"]["instructions"]["total"] == chosen["instructions"] == min(
        c["instructions"] for c in rec["candidates"] if c["admissible"])
    assert rec["candidates"][0]["bits"] == [8, 4] and rec["tolerance_pp"] == 0.5
    from mpq.plan import load_plan

    assert load_plan(out).search["latency"] == rec  # the schema takes the record
    assert "Instructions (qemu-m4, latency table)" in r.stdout
    assert_clean_failure(run_mpq("search", path, "--board", "nano33ble", "--data",
                                 path.parent / "calib.npz", "--strategy", "qe", "--latency",
                                 "-o", tmp_path / "x.json"), "--strategy measured")


def test_table_tool_fits_and_summarises_measured_points() -> None:
    """`tools/latency_table.py`'s table from (made-up) measured layers: one entry per key whose
    fit reproduces exactly linear points, the plans' layers kept for the summary."""
    from tools import latency_table as lt

    key = latency.layer_key("conv2d", "1x1", 8, 8, 8)
    layers = [(key, "c1", 1000, 100, 2 * 1000 + 3 * 100 + 50),
              (key, "c2", 4000, 100, 2 * 4000 + 3 * 100 + 50),
              (key, "c3", 4000, 400, 2 * 4000 + 3 * 400 + 50)]
    measured = [{"case": "toy", "variant": "int8", "points": {"qemu-m4": layers},
                 "instructions": {"qemu-m4": sum(p[-1] for p in layers) + 20}}]
    table = lt.build_table(measured, ["qemu-m4"])
    latency.check_table(table)
    e = table["targets"]["qemu-m4"]["entries"][key]
    assert e["fit"] == pytest.approx({"a": 2, "b": 3, "c": 50}, rel=1e-4)
    assert e["max_rel_error"] < 1e-4 and len(e["points"]) == 3
    keys, plans = lt.summary_rows(table)
    assert keys[0][0] == key
    assert plans[0][:4] == ["toy", "int8", f"{19_970:,}", f"{19_950:,}"]  # glue: 20
