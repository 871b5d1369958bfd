"""Outputs written inside their dying inputs within a patch stage (vMCU inside the stage,
`mpq.patch.PatchSchedule.stage_shift`): the shift for a view that starts inside a wider stored
tile against a brute-force check, the C convolution writing in the order it assumes from such
a view, the planner's choice on KWS DS-CNN's pooled stage (the int8 arena a quarter smaller),
the default search's plan byte-exact on the host and on qemu-m4 with its SRAM within the
prediction, and the plan check refusing tampered stage overlaps."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import ckernels as ck
import numpy as np
import pytest
from conftest import run_mpq, shared_model
from test_overlap import _brute_shift

from mpq.boards import get_board
from mpq.frontend import load_model
from mpq.memory import ALIGN, buffers_conflict, overlap_shift
from mpq.patch import choose_stage_overlaps, plan_patches, pooled_splits
from mpq.quant import arith
from mpq.quant.calibrate import load_dataset
from mpq.search.driver import SearchOptions, search, with_stage_overlap
from mpq.verify import verify

needs_arm = pytest.mark.skipif(shutil.which("arm-none-eabi-gcc") is None
                               or shutil.which("qemu-system-arm") is None,
                               reason="needs arm-none-eabi-gcc and qemu-system-arm")


# -- the shift of a view inside a stored tile ---------------------------------------------------

VIEW_CASES = [
    # view (h, w, C), origin (y0, x0, stored width), output, window, bits, group
    ((4, 3, 8), (1, 0, 3), (4, 3, 8), (1, 1, 0, 0, 1, 1), (8, 8), 2),    # rows below the top
    ((3, 4, 6), (0, 2, 6), (3, 4, 10), (1, 1, 0, 0, 1, 1), (4, 8), 2),   # columns, widening
    ((5, 4, 4), (1, 1, 6), (5, 4, 4), (1, 1, 1, 1, 3, 3), (4, 4), 2),    # 3×3 "same", inside
    ((6, 5, 3), (2, 0, 5), (3, 3, 4), (2, 2, 1, 1, 3, 3), (8, 2), 2),    # stride 2
    ((4, 4, 8), (0, 0, 4), (4, 4, 8), (1, 1, 0, 0, 1, 1), (2, 8), 2),    # the whole map
]


@pytest.mark.parametrize("view,origin,out,window,bits,group", VIEW_CASES)
def test_view_shift_is_the_least_safe_shift(view, origin, out, window, bits, group) -> None:
    got = overlap_shift(view, out, window, bits[0], bits[1], group, origin)
    assert got == _brute_shift(view, out, window, 1, bits[0], bits[1], group, origin)
    if origin == (0, 0, view[1]):  # the whole map: the layer-based formula
        assert got == overlap_shift(view, out, window, bits[0], bits[1], group)


def _run_view(kern, case, x_stored, stored_hwc, view, origin, out_hwc, bits, d) -> np.ndarray:
    """The convolution of `case` on the view of a stored map placed at byte d of one buffer,
    its output at byte 0: the output values it leaves."""
    run, in_bits, out_bits = case
    n_in = int(np.prod(stored_hwc))
    in_bytes = -(-n_in * in_bits // 8)
    n_out = int(np.prod(out_hwc))
    mem = np.full(d + max(in_bytes, -(-n_out * out_bits // 8)) + 16, 0xA5, np.uint8)
    mem[d:d + in_bytes] = arith.pack(x_stored, in_bits)
    base = mem.ctypes.data
    vin = ck.View(base + d, in_bits, *view, origin[0], origin[1], origin[2])
    vout = ck.View(base, out_bits, *out_hwc, 0, 0, out_hwc[1])
    assert run(kern, vin, vout) == 0
    return arith.unpack(mem, out_bits, n_out).astype(np.int64)


def _conv(rng, cin, cout, k, stride, pad, in_bits, out_bits, w_bits):
    weight = ck.Weights.random(rng, (cout, k, k, cin), w_bits, ck.WFMT_LINEAR)
    lo, hi = arith.qrange(out_bits)
    p = ck.ConvParams(stride, stride, 1, 1, pad, pad, 1, int(rng.integers(-3, 3)),
                      int(rng.integers(-2, 2)), lo, hi)
    mult = rng.integers(1 << 29, 1 << 30, cout)
    shift = rng.integers(-9, -5, cout)
    bias = rng.integers(-500, 500, cout)

    def run(kern, vin, vout):
        return kern.conv2d(p, weight, None, bias, mult, shift, vin, vout)
    return run, in_bits, out_bits


KERNEL_CASES = {
    # name: (stored (H, W, C), view (h, w), origin, conv (cin, cout, k, stride, pad, bits...))
    "pointwise s8 pairs, rows below the top": ((6, 5, 16), (4, 5), (2, 0, 5),
                                               (16, 16, 1, 1, 0, 8, 8, 8)),
    "pointwise 4→8 widening, columns": ((4, 6, 8), (4, 4), (0, 2, 6), (8, 12, 1, 1, 0, 4, 8, 8)),
    "3x3 4→4 w4 inside the tile": ((7, 6, 8), (5, 4), (1, 1, 6), (8, 8, 3, 1, 1, 4, 4, 4)),
    "3x3 s2 8→2": ((8, 5, 6), (6, 5), (2, 0, 5), (6, 4, 3, 2, 1, 8, 2, 8)),
}


@pytest.mark.parametrize("variant", ["portable", "dsp"])
@pytest.mark.parametrize("name", list(KERNEL_CASES))
def test_kernels_write_from_a_view_in_the_order_the_shift_assumes(name, variant) -> None:
    """The output written `overlap_shift(…, origin)` bytes below the stored tile a view reads
    from (the exact bound, unaligned; at least 1 B: a kernel refuses its input's own address)
    equals the same call's output into a separate buffer — on the plain C and the DSP
    paths."""
    stored, (h, w), origin, (cin, cout, k, stride, pad, in_bits, out_bits, w_bits) = \
        KERNEL_CASES[name]
    rng = np.random.default_rng(len(name))
    case = _conv(rng, cin, cout, k, stride, pad, in_bits, out_bits, w_bits)
    ho, wo = (h + 2 * pad - k) // stride + 1, (w + 2 * pad - k) // stride + 1
    out_hwc = (ho, wo, cout)
    lo, hi = arith.qrange(in_bits)
    x = rng.integers(lo, hi + 1, int(np.prod(stored)))
    window = (stride, stride, pad, pad, k, k)
    d = overlap_shift((h, w, cin), out_hwc, window, in_bits, out_bits, 2, origin)
    assert d < -(-int(np.prod(out_hwc)) * out_bits // 8), "the case must really overlap"
    kern = ck.build(variant)
    far = _run_view(kern, case, x, stored, (h, w, cin), origin, out_hwc, (in_bits, out_bits),
                    d + -(-int(np.prod(out_hwc)) * out_bits // 8) + 64)
    near = _run_view(kern, case, x, stored, (h, w, cin), origin, out_hwc, (in_bits, out_bits),
                     max(d, 1))
    np.testing.assert_array_equal(near, far)


# -- the planner -------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def kws_graph(kws):
    return load_model(kws["model"])


def test_kws_pooled_stage_overlaps_its_pointwise_convolutions(kws_graph) -> None:
    """The 25×1 pooled stage at int8: two pointwise convolutions start one pixel pair (128 B)
    below their inputs and the arena shrinks by a quarter; every overlapped output starts
    exactly D below its input, D is the largest per-patch shift, and no two buffers alive
    together share a byte. The first depthwise's output ends where its input's 9-row tile
    ends (U = 2 rows, 640 B above its start), so the chain of tiles stays inside the first
    tile: the arena is the first convolution's step exactly — its im2col column, its 9-row
    output tile, the input and the sums (80 + 2,880 + 496 + 256 = 3,712 B), 176 B less than
    with every depthwise output at its input's start."""
    g = kws_graph
    split = pooled_splits(g)[0]
    plain = plan_patches(g, split, "arena", scratch="arena")
    sched = plan_patches(g, split, "arena", overlap=True, scratch="arena")
    assert (sched.overlap, sched.inplace_raise) == choose_stage_overlaps(plain)
    before, mem = plain.memory(), sched.memory()
    assert mem.arena_bytes <= 0.75 * before.arena_bytes
    assert mem.arena_bytes == 80 + 2880 + 496 + 256
    unraised = replace(sched, inplace_raise=frozenset()).memory()
    assert unraised.arena_bytes == mem.arena_bytes + 176
    by_name = {n.name: n for n in g.nodes}
    offsets = mem.plan.tensor_offsets()
    raised = sched.raise_record(None, mem.inplace)
    assert list(raised.values()) == [640]
    for name, u in raised.items():
        node = by_name[name]
        assert node.is_depthwise and name in mem.inplace
        assert offsets[node.outputs[0]] == offsets[node.inputs[0]] + u
        assert u + sched.tensor_elements[node.outputs[0]] == \
            sched.tensor_elements[node.inputs[0]]  # int8: ends where the input's tile ends
    assert len(mem.overlap) == 2 and set(mem.overlap.values()) == {128}
    for name, d in mem.overlap.items():
        node = by_name[name]
        assert node.op == "conv2d" and node.weight.shape[1:3] == (1, 1)
        assert d % ALIGN == 0 and d == sched.stage_shift(node, 8, 8)
        assert offsets[node.outputs[0]] == offsets[node.inputs[0]] - d
    bufs = mem.plan.buffers
    for i, a in enumerate(bufs):
        for b in bufs[i + 1:]:
            assert not buffers_conflict(a, mem.plan.offsets[a.name], b, mem.plan.offsets[b.name])


def test_what_a_stage_does_not_overlap(kws_graph) -> None:
    """No shift for the first convolution (it reads the graph input, stored whole), for
    nodes after the stage, or with line buffers; and a strategy that runs VDPC on an n×n
    split keeps its schedule without stage overlap (the outlier branch has other bits) —
    ResNet-8's 2×2 split, where int8 (no VDPC) does overlap a convolution."""
    g = kws_graph
    sched = plan_patches(g, pooled_splits(g)[0], "arena")
    by_name = {n.name: n for n in g.nodes}
    assert sched.stage_shift(by_name[sched.stage_nodes[0]], 8, 8) is None
    assert sched.stage_shift(g.nodes[-2], 8, 8) is None  # the classifier, after the stage
    assert sched.stage_shift(by_name[sched.stage_nodes[2]], 8, 8) == 128
    assert replace(sched, cache=True).stage_shift(by_name[sched.stage_nodes[2]], 8, 8) is None
    from mpq.patch import PatchSplit

    resnet = load_model(shared_model("pretrainedResnet.onnx"))
    square = plan_patches(resnet, PatchSplit(8, 2), "arena")
    assert with_stage_overlap(resnet, square, SearchOptions(strategy="int8")).overlap
    assert with_stage_overlap(resnet, square, SearchOptions(strategy="exact")).overlap \
        == frozenset()
    assert with_stage_overlap(resnet, square, SearchOptions(strategy="int8", overlap=False)) \
        is square


# -- the default search's plan, export and verify ------------------------------------------------

@pytest.fixture(scope="module")
def kws_tight(kws, kws_graph, tmp_path_factory) -> dict:
    """The default search at 4,636 B (0.5× of KWS's layer-based int8 need, 9,272 B), with and
    without --overlap."""
    g = kws_graph
    data = load_dataset(kws["calib"], g)
    root = tmp_path_factory.mktemp("stage_overlap")
    out = {"graph": g, "x": np.load(kws["test"])["x"], "root": root}
    for name, overlap in (("overlap", True), ("plain", False)):
        res = search(kws["model"], g, get_board("nano33ble"), data,
                     SearchOptions(sram=4636, overlap=overlap))
        path = root / f"{name}.plan.json"
        res.plan.save(path)
        out[name] = res.plan
        out[f"{name}_path"] = path
    return out


def test_search_overlaps_the_stage_and_keeps_more_bits(kws_tight: dict) -> None:
    """With overlap the 4,636 B plan records its stage overlaps and its raised depthwise, runs
    without VDPC, meets the budget, and its maps hold more bits than the plan without overlap
    at the same budget (all 8: the pooled stage's int8 need is 4,600 B)."""
    p, plain = kws_tight["overlap"], kws_tight["plain"]
    assert p.patch is not None and p.patch.get("pool") and p.patch["vdpc"] is None
    stage = set(p.patch["stage_nodes"])
    assert p.schedule["overlap"] and set(p.schedule["overlap"]) <= stage
    assert p.schedule["inplace_raised"] and set(p.schedule["inplace_raised"]) <= stage
    assert "overlap" not in plain.schedule and "inplace_raised" not in plain.schedule
    assert p.predicted["sram_needed_bytes"] <= 4636
    assert {t.bits for t in p.tensors} == {8}

    def bits(plan) -> int:
        return sum(t.bytes for t in plan.tensors if t.name not in kws_tight["graph"].inputs)
    assert bits(p) > bits(plain)


def test_overlapped_stage_is_byte_exact_on_the_host(kws_tight: dict) -> None:
    r = verify(kws_tight["overlap"], kws_tight["graph"], kws_tight["x"][:24], "host")
    assert r.mismatches == 0 and r.samples == 24


@needs_arm
def test_overlapped_stage_is_byte_exact_under_qemu(kws_tight: dict) -> None:
    r = verify(kws_tight["overlap"], kws_tight["graph"], kws_tight["x"][:2], "qemu-m4")
    assert r.mismatches == 0
    pr = kws_tight["overlap"].predicted
    assert r.model_sram_bytes <= pr["arena_bytes"] + pr["scratch_bytes"]


def _tampered(kws_tight: dict, edit, name: str) -> Path:
    plan = json.loads(kws_tight["overlap_path"].read_text())
    edit(plan)
    path = kws_tight["root"] / name
    path.write_text(json.dumps(plan))
    return path


def _shrink(plan: dict) -> None:
    node = sorted(plan["schedule"]["overlap"])[0]
    plan["schedule"]["overlap"][node] -= ALIGN


def _outside(plan: dict) -> None:
    plan["schedule"]["overlap"][plan["layers"][-2]["name"]] = 16


def _raise_more(plan: dict) -> None:
    node = sorted(plan["schedule"]["inplace_raised"])[0]
    plan["schedule"]["inplace_raised"][node] += 64


def _raise_pointwise(plan: dict) -> None:
    plan["schedule"]["inplace_raised"][sorted(plan["schedule"]["overlap"])[0]] = 64


def _raise_dropped(plan: dict) -> None:
    del plan["schedule"]["inplace_raised"]


@pytest.mark.parametrize("edit,where", [(_shrink, "schedule.overlap"),
                                        (_outside, "schedule.overlap"),
                                        (_raise_more, "schedule.inplace_raised"),
                                        (_raise_pointwise, "schedule.inplace_raised"),
                                        (_raise_dropped, "they share storage")])
def test_tampered_stage_overlaps_are_refused(kws_tight: dict, kws, tmp_path: Path, edit,
                                             where) -> None:
    """A smaller shift than the kernels' order allows, an overlap on a layer after the
    stage, a raised depthwise output moved (past its input's tile), a pointwise convolution
    "raised", or the raise left out (the tensors' offsets then disagree with the schedule):
    one line naming the field, exit 1, nothing written."""
    bad = _tampered(kws_tight, edit, f"{edit.__name__}.plan.json")
    r = run_mpq("export", bad, "--model", kws["model"], "-o", tmp_path / "out")
    assert r.returncode == 1, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and where in lines[0] and "Traceback" not in r.stderr, r.stderr
    assert not (tmp_path / "out").exists()


def test_stage_overlaps_beside_vdpc_are_refused(kws, tmp_path: Path) -> None:
    """A VDPC plan (its outlier branch runs the stage at 8 bits) given a stage overlap, or a
    raised depthwise: the shifts hold at one branch's bits, and the search raises only
    without VDPC, so the check refuses either in one line."""
    plan = tmp_path / "vdpc.plan.json"
    r = run_mpq("search", kws["model"], "--board", "nano33ble", "--data", kws["calib"],
                "--strategy", "exact", "--patches", "k=4,n=2", "-o", plan, "-q")
    assert r.returncode == 0, r.stderr
    p = json.loads(plan.read_text())
    assert p["patch"]["vdpc"] is not None and "overlap" not in p["schedule"]
    p["schedule"]["overlap"] = {p["patch"]["stage_nodes"][2]: 128}
    plan.write_text(json.dumps(p))
    r = run_mpq("export", plan, "--model", kws["model"], "-o", tmp_path / "out")
    assert r.returncode == 1
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "schedule.overlap" in lines[0] and "VDPC" in lines[0], r.stderr
    assert not (tmp_path / "out").exists()
    del p["schedule"]["overlap"]
    p["schedule"]["inplace_raised"] = {p["patch"]["stage_nodes"][1]: 64}
    plan.write_text(json.dumps(p))
    r = run_mpq("export", plan, "--model", kws["model"], "-o", tmp_path / "out")
    assert r.returncode == 1
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "schedule.inplace_raised" in lines[0] and "VDPC" in lines[0], \
        r.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("bits", ["4", "2"])
def test_raised_depthwise_in_a_square_grid_is_byte_exact(bits: str, tmp_path: Path) -> None:
    """VWW's 4-layer 8×8 split at 4 and 2 bits (no VDPC): tiles of several widths, the first
    depthwise's output raised a whole number of pixels above its input (the grouped sub-byte
    kernel's path), byte-exact on the host."""
    model = shared_model("vww_96_float.onnx")
    x = np.random.default_rng(3).random((6, 96, 96, 3)).astype(np.float32)
    np.savez(tmp_path / "c.npz", x=x)
    plan = tmp_path / "p.plan.json"
    r = run_mpq("search", model, "--board", "stm32h743", "--data", tmp_path / "c.npz",
                "--strategy", "exact", "--no-vdpc", "--bits", bits, "--patches", "k=4,n=8",
                "-o", plan, "-q")
    assert r.returncode == 0, r.stderr
    p = json.loads(plan.read_text())
    raised = p["schedule"]["inplace_raised"]
    assert raised and all(u % ALIGN == 0 for u in raised.values())
    from mpq.plan import load_plan

    g = load_model(model)
    assert verify(load_plan(plan), g, x[:2], "host").mismatches == 0


def test_int8_ties_are_broken_at_the_floor_bits() -> None:
    """The Fashion example's 11-layer 7×7 stage: at int8 the arena is set after the stage, so
    no stage overlap changes it and none is chosen; with the search's floor bits as the
    tie-break the expanding pointwise convolution is written over its dying input, which
    saves 1,808 B once the last block's expansion is at 4 bits."""
    from mpq.patch import PatchSplit

    g = load_model(Path(__file__).parents[1] / "examples" / "fashion" / "fashion_cnn.onnx")
    sched = plan_patches(g, PatchSplit(11, 7), "arena", scratch="arena")
    low = {t: 8 if t in g.inputs else 2 for t in g.tensors}
    assert choose_stage_overlaps(sched)[0] == frozenset()
    chosen = choose_stage_overlaps(sched, low)[0]
    assert [g.nodes[i].name in chosen for i in range(3)] == [False, True, False]
    mixed = {t: 8 for t in g.tensors}
    for node in g.nodes[11:13]:
        mixed[node.outputs[0]] = 4
    assert sched.memory(mixed).arena_bytes \
        - replace(sched, overlap=chosen).memory(mixed).arena_bytes == 1808


def test_search_says_what_the_stage_writes_over(kws, tmp_path: Path) -> None:
    """`mpq search` names the stage's overlapped outputs and raised depthwise outputs under its
    Patches line (KWS at 0.5× of its int8 need: two and one)."""
    r = run_mpq("search", kws["model"], "--board", "nano33ble", "--data", kws["calib"],
                "--sram", "4636", "-o", tmp_path / "p.json")
    assert r.returncode == 0, r.stderr
    assert "inside the stage: 2 output(s) written over their dying input (schedule.overlap), " \
        "1 in-place depthwise output(s)" in " ".join(r.stdout.split()), r.stdout
