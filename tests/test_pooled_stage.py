"""Patch stages that end in a global average pool (`mpq.patch.global_pool_problem`): the whole
network up to the pool runs per patch, each patch's tile of the pool's input is summed into
int32 accumulators and the rounded means are taken once after the last patch — so no feature
map ever exists whole. Geometry and float execution against the full model, the memory model,
rows-only grids, the plan's record and its checks, the search's candidates, and the export
byte for byte against the integer reference on the host and under QEMU."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import onnx_builders as B
import pytest
from conftest import run_mpq

from mpq.boards import get_board
from mpq.errors import MpqError
from mpq.frontend import load_model
from mpq.frontend.onnx_import import import_model
from mpq.interpreter import run_graph
from mpq.memory import layer_memory
from mpq.patch import (
    ACC_PREFIX,
    PatchSplit,
    global_pool_problem,
    plan_patches,
    pooled_splits,
    run_patch_stage,
    valid_splits,
)
from mpq.plan import Plan, load_plan
from mpq.plan_check import check_plan
from mpq.quant.calibrate import load_dataset
from mpq.search.driver import SearchOptions, candidate_list, parse_patches, search
from mpq.verify import verify

KWS_POOLED = 10  # the DS-CNN's split ending in its AvgPool (9 convolutions, then the pool)


@pytest.fixture(scope="module")
def small() -> dict:
    """A tf2onnx-style model: conv, depthwise conv, global AvgPool, classifier (8×8 maps)."""
    g = import_model(B.tf2onnx_style_model(), "tf2onnx")
    feeds = {g.inputs[0]: np.random.default_rng(0).standard_normal(
        (3, *g.tensors[g.inputs[0]].shape[1:])).astype(np.float32)}
    return {"graph": g, "feeds": feeds, "env": run_graph(g, feeds, keep=True)}


def test_the_global_pool_ends_a_stage(small: dict) -> None:
    g = small["graph"]
    pool = g.nodes[2]
    assert global_pool_problem(pool, g) is None
    assert "not an average pool" in global_pool_problem(g.nodes[0], g)
    assert valid_splits(g)[-1] == 3
    s = plan_patches(g, PatchSplit(3, 4))
    assert s.pool_input == pool.inputs[0] and s.split_tensor == pool.outputs[0]
    assert s.tile_tensor == pool.inputs[0]
    # the pool's input is stored a tile at a time, its 1×1 output whole
    assert s.tensor_elements[pool.inputs[0]] == 2 * 2 * 8
    assert s.tensor_elements[pool.outputs[0]] == 8
    assert s.accumulator == (ACC_PREFIX + pool.outputs[0], 4 * 8)
    acc = [b for b in s.buffers() if b.name.startswith(ACC_PREFIX)]
    assert len(acc) == 1 and acc[0].size == 32
    seg = acc[0].segments[0]
    assert (seg.first, seg.last) == (0, 2)  # alive through the whole stage


def test_a_pool_too_large_for_int32_sums_ends_no_stage(small: dict,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    import mpq.patch as patch

    monkeypatch.setattr(patch, "POOL_SUM_PIXELS", 63)  # the 8×8 map: 64 pixels
    g = small["graph"]
    assert "sums more than 63 pixels" in global_pool_problem(g.nodes[2], g)
    assert 3 not in valid_splits(g)


@pytest.mark.parametrize("n,m,cache", [(4, None, False), (8, 1, False), (3, 1, False),
                                       (2, None, True), (8, 2, False)])
def test_pooled_stage_computes_the_full_pool(small: dict, n: int, m: int | None,
                                             cache: bool) -> None:
    g = small["graph"]
    s = plan_patches(g, PatchSplit(3, n, cache, m))
    assert (s.n, s.m) == (n, m or n) and s.patches == n * (m or n)
    y = run_patch_stage(s, small["feeds"])
    np.testing.assert_allclose(y, small["env"][s.split_tensor], rtol=1e-5, atol=1e-6)


def test_rows_only_grids_and_their_limits(small: dict) -> None:
    g = small["graph"]
    s = plan_patches(g, PatchSplit(3, 8, False, 1))
    assert [r.cols for r in s.tiles[0]] == [8] and len(s.tiles) == 8
    with pytest.raises(MpqError, match="a 9×1 grid does not fit the 8×8"):
        plan_patches(g, PatchSplit(3, 9, False, 1))
    with pytest.raises(MpqError, match="n = 9 patches per side does not fit"):
        plan_patches(g, PatchSplit(3, 9))
    assert parse_patches("k=3,n=8,m=1") == PatchSplit(3, 8, cols=1)
    with pytest.raises(MpqError, match="k=K,n=N,m=M"):
        parse_patches("k=3,n=8,x=1")


def test_kws_pooled_stage_needs_less_sram_than_any_other_schedule(kws) -> None:
    """On the DS-CNN no other schedule avoids a whole 25×5×64 map: rows-only pooled stages do
    (int8 arena well below the layer-based one); the default search offers them."""
    g = load_model(kws["model"])
    splits = pooled_splits(g)
    assert [(p.split_layer, p.n, p.cols) for p in splits] == [(10, 25, 1), (10, 13, 1),
                                                               (10, 7, 1)]
    layer = layer_memory(g).arena_bytes
    one_row = plan_patches(g, splits[0]).memory()
    assert one_row.arena_bytes < 0.6 * layer
    cands = candidate_list(g, SearchOptions(sram=6000))
    assert any(c.pool_input is not None for c in cands)
    # the paper strategies keep their 25 % overhead bound: no 333 % pooled stage for them
    assert all(c.pool_input is None or c.redundant_macs <= 0.25 * c.total_macs
               for c in candidate_list(g, SearchOptions(strategy="exact")))


@pytest.fixture(scope="module")
def kws_plan(kws, tmp_path_factory) -> dict:
    """The default search at 4,500 B (below the pooled stage's int8 need of 4,600 B): a pooled
    stage with some maps below 8 bits, its first depthwise output raised inside its input
    (`schedule.inplace_raised`)."""
    g = load_model(kws["model"])
    res = search(kws["model"], g, get_board("nano33ble"), load_dataset(kws["calib"], g),
                 SearchOptions(sram=4500))
    root = tmp_path_factory.mktemp("pooled")
    path = root / "p.plan.json"
    res.plan.save(path)
    x = np.load(kws["test"])["x"]
    return {"graph": g, "plan": res.plan, "path": path, "x": x, "schedule": res.schedule}


def test_kws_plan_records_the_pool_and_meets_its_budget(kws_plan: dict) -> None:
    p: Plan = kws_plan["plan"]
    assert p.patch is not None and p.patch["split_layer"] == KWS_POOLED
    assert p.patch.get("cols") == 1 and p.patch["vdpc"] is None
    pool = p.patch["pool"]
    assert pool["tensor"] == "Relu__29:0" and pool["bytes"] == 256
    bits = {t.name: t.bits for t in p.tensors}
    mem = kws_plan["schedule"].memory(bits)
    assert mem.plan.offsets[ACC_PREFIX + p.patch["split_tensor"]] == pool["offset"]
    assert p.predicted["sram_needed_bytes"] <= 4500
    assert min(bits.values()) < 8
    assert p.schedule.get("inplace_raised")
    check_plan(p, kws_plan["graph"])


def test_kws_at_half_its_layer_based_int8_need_keeps_its_accuracy(kws) -> None:
    """At 4,636 B (0.5× of the layer-based int8 need, 9,272 B) the default plan keeps ≥ 90 %
    top-1 on the 900 held-out clips (issue 13's target; 91.6 % measured, 61.0 % when only
    layer-based and map-holding patch schedules existed): the pooled stage at int8, its first
    depthwise output raised inside its input, byte-exact on the host."""
    from mpq.evaluate import accuracy, eval_labels, quant_predictions
    from mpq.plan import plan_quant_model

    g = load_model(kws["model"])
    with pytest.raises(MpqError, match="needs at least 9,272 B SRAM"):
        search(kws["model"], g, get_board("nano33ble"), load_dataset(kws["calib"], g),
               SearchOptions(sram=4636, strategy="int8"))
    res = search(kws["model"], g, get_board("nano33ble"), load_dataset(kws["calib"], g),
                 SearchOptions(sram=4636))
    assert res.plan.patch is not None and res.plan.patch.get("pool")
    assert res.plan.predicted["sram_needed_bytes"] <= 4636
    assert res.plan.schedule.get("inplace_raised")
    test = load_dataset(kws["test"], g)
    preds = quant_predictions(plan_quant_model(res.plan, g), test)
    assert accuracy(preds, eval_labels(test, g)) >= 0.90
    assert verify(res.plan, g, np.load(kws["test"])["x"][:8], "host").mismatches == 0


def test_kws_pooled_export_is_bit_exact_on_host(kws_plan: dict) -> None:
    r = verify(kws_plan["plan"], kws_plan["graph"], kws_plan["x"][:12], "host")
    assert r.mismatches == 0


def test_kws_pooled_export_is_bit_exact_under_qemu(kws_plan: dict) -> None:
    r = verify(kws_plan["plan"], kws_plan["graph"], kws_plan["x"][:2], "qemu-m4")
    assert r.mismatches == 0
    # the measured model SRAM is within the predicted arena + scratch
    p = kws_plan["plan"].predicted
    assert r.model_sram_bytes <= p["arena_bytes"] + p["scratch_bytes"]


def test_small_pooled_plans_are_bit_exact_at_sub_byte_bits(tmp_path: Path) -> None:
    """Rows-only and square pooled grids with 4- and 2-bit maps: export == reference."""
    model = tmp_path / "m.onnx"
    model.write_bytes(B.tf2onnx_style_model().SerializeToString())
    x = np.random.default_rng(2).random((24, 16, 16, 3)).astype(np.float32)
    np.savez(tmp_path / "c.npz", x=x)
    g = load_model(model)
    for patches, bits in (("k=3,n=8,m=1", "4"), ("k=3,n=4", "2"), ("k=3,n=3,m=2", "4,2")):
        plan = tmp_path / f"{bits}.plan.json"
        r = run_mpq("search", model, "--board", "nano33ble", "--data", tmp_path / "c.npz",
                    "--patches", patches, "--bits", bits, "--strategy", "exact", "-o", plan,
                    "-q")
        assert r.returncode == 0, r.stderr
        p = load_plan(plan)
        assert p.patch["pool"]["tensor"] == g.nodes[2].inputs[0]
        assert verify(p, g, x[:6], "host").mismatches == 0


def test_resnet8_pooled_stage_with_residual_adds_is_bit_exact(tmp_path: Path) -> None:
    """ResNet-8: stride-2 convolutions and residual adds fused into their convolutions inside
    a stage that ends in the global pool, 4-bit maps where the budget needs them."""
    from conftest import shared_model

    x = np.random.default_rng(3).random((24, 32, 32, 3), dtype=np.float32) * 255
    np.savez(tmp_path / "c.npz", x=x)
    plan = tmp_path / "r.plan.json"
    r = run_mpq("search", shared_model("pretrainedResnet.onnx"), "--board", "nano33ble",
                "--data", tmp_path / "c.npz", "--patches", "k=13,n=8,m=1", "--sram", "30000",
                "-o", plan, "-q")
    assert r.returncode == 0, r.stderr
    p = load_plan(plan)
    assert p.patch["pool"] and p.schedule["fused_adds"]
    assert min(t.bits for t in p.tensors) < 8
    g = load_model(shared_model("pretrainedResnet.onnx"))
    assert verify(p, g, x[:4], "host").mismatches == 0


@pytest.mark.parametrize("edit,message", [
    (lambda p: p["patch"].pop("pool"), "patch.pool: is missing"),
    (lambda p: p["patch"]["pool"].update(bytes=128), "patch.pool.bytes: must be 256"),
    (lambda p: p["patch"]["pool"].update(offset=0), "patch.pool.offset: the pooled stage's "
                                                   "sums overlap"),
    (lambda p: p["patch"]["pool"].update(offset=10**6), "ends past predicted.arena_bytes"),
    (lambda p: p["patch"].update(cols=5), "×5 grid (expected"),
])
def test_tampered_pool_records_are_refused(kws_plan: dict, kws, tmp_path: Path, edit,
                                           message: str) -> None:
    d = copy.deepcopy(json.loads(kws_plan["path"].read_text()))
    edit(d)
    bad = tmp_path / "bad.plan.json"
    bad.write_text(json.dumps(d))
    r = run_mpq("export", bad, "--model", kws["model"], "-o", tmp_path / "out")
    assert r.returncode == 1
    assert message in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()
