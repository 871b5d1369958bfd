"""Patch line buffers (`mpq.patch.cache_rows`; StreamNet / msf-CNN): the rows vertically
adjacent patches share are kept instead of recomputed — exact geometry, MACs against a brute
force count, the buffers in the memory model, the plan's record and its checks, and the C
export byte for byte against the integer reference."""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import numpy as np
import onnx_builders as B
import pytest

from mpq.boards import get_board
from mpq.errors import MpqError
from mpq.frontend import load_model
from mpq.interpreter import run_graph
from mpq.memory import align_up, packed_bytes
from mpq.patch import (
    LINE_PREFIX,
    PatchSplit,
    cache_within_peak,
    cached_span,
    kept_rows,
    map_savings,
    plan_patches,
    run_patch_stage,
    search_patches,
)
from mpq.plan import Plan, load_plan
from mpq.plan_check import check_plan
from mpq.quant.calibrate import dataset_from_array, onnx_input_shape
from mpq.search.driver import SearchOptions, cache_choice, search
from mpq.verify import verify

SPLITS = [(5, 2), (10, 3), (13, 3), (13, 4)]  # residual adds inside the stage from k = 13


@pytest.fixture(scope="module")
def mnv2(tmp_path_factory) -> dict:
    """MobileNetV2-0.35 at 64×64 (10 classes), its float run and calibration inputs."""
    root = tmp_path_factory.mktemp("linebuf")
    path = root / "m.onnx"
    path.write_bytes(B.mobilenet_v2(0.35, 64, num_classes=10).SerializeToString())
    graph = load_model(path)
    rng = np.random.default_rng(0)
    feeds = {t: rng.standard_normal((2, *graph.tensors[t].shape[1:])).astype(np.float32)
             for t in graph.inputs}
    x = np.random.default_rng(1).random((32, *onnx_input_shape(graph))).astype(np.float32)
    return {"root": root, "path": path, "graph": graph, "feeds": feeds,
            "env": run_graph(graph, feeds, keep=True), "x": x}


def _search(mnv2: dict, **opts) -> Plan:
    res = search(mnv2["path"], mnv2["graph"], get_board("nano33ble"),
                 dataset_from_array(mnv2["x"], "r"), SearchOptions(**opts))
    return res.plan


# Some maps of the k=13 stage: the first conv's, an in-place depthwise conv's, a residual
# add's (no MACs saved, add calls skipped) and a 1×1 conv's after it.
SUBSET = frozenset({"/features/0/2/Clip_output_0", "/features/2/conv/1/2/Clip_output_0",
                    "/features/3/Add_output_0", "/features/3/conv/1/2/Clip_output_0"})


@pytest.fixture(scope="module")
def int8_plan(mnv2: dict) -> Plan:
    """An int8 plan with line buffers for `SUBSET` only (the search's `cache_within_peak`
    form), on a stage with a residual add and in-place depthwise convolutions."""
    sched = plan_patches(mnv2["graph"], PatchSplit(13, 3, SUBSET), "arena")
    opts = SearchOptions(strategy="int8")
    res = search(mnv2["path"], mnv2["graph"], get_board("nano33ble"),
                 dataset_from_array(mnv2["x"], "r"), opts, candidates=[(sched, opts)])
    return res.plan


# -- geometry ------------------------------------------------------------------------------------

def test_cached_span_and_kept_rows_by_hand() -> None:
    spans = [(0, 5), (3, 9), (7, 12)]
    assert [cached_span(spans, i) for i in range(3)] == [(0, 5), (5, 9), (9, 12)]
    assert [kept_rows(spans, i) for i in range(3)] == [2, 2, 0]
    # the patch above already reached the bottom: nothing left to compute
    assert cached_span([(0, 8), (2, 8)], 1) == (8, 8)
    assert kept_rows([(0, 4), (4, 8)], 0) == 0  # tiles: nothing shared


@pytest.mark.parametrize("k,n", SPLITS)
def test_cached_patches_are_exact(mnv2: dict, k: int, n: int) -> None:
    """Patch by patch in float, rows from the line buffers (NaN where nothing provides them):
    the stitched split tensor is the full inference's."""
    sched = plan_patches(mnv2["graph"], PatchSplit(k, n, cache=True))
    assert sched.patch_order[:2] == [(0, 0), (1, 0)]  # column by column
    stitched = run_patch_stage(sched, mnv2["feeds"])
    assert not np.isnan(stitched).any()
    np.testing.assert_allclose(stitched, mnv2["env"][sched.split_tensor], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("k,n", SPLITS)
def test_redundant_macs_against_a_brute_force_count(mnv2: dict, k: int, n: int) -> None:
    """Count every output pixel each patch computes, as pixel sets: recomputing, the whole
    region; cached, the region less what the patch above (same column) computed or kept. The
    line buffers at least halve the redundant MACs here."""
    g = mnv2["graph"]
    plain = plan_patches(g, PatchSplit(k, n))
    cached = plan_patches(g, PatchSplit(k, n, cache=True))
    by_name = {nd.name: nd for nd in g.nodes}
    counts = {"plain": 0, "cached": 0, "full": 0}
    for name in plain.stage_nodes:
        nd = by_name[name]
        if nd.op != "conv2d":
            continue
        cout, kh, kw, cin_g = nd.weight.shape
        per_pixel = cout * kh * kw * cin_g
        t = nd.outputs[0]
        _, h, w, _ = g.tensors[t].shape
        counts["full"] += per_pixel * h * w
        seen = np.zeros((h, w), int)
        for i, j in cached.patch_order:
            r = plain.regions[t][i][j]
            pixels = {(y, x) for y in range(r.y0, r.y1) for x in range(r.x0, r.x1)}
            counts["plain"] += per_pixel * len(pixels)
            if i > 0:
                a = plain.regions[t][i - 1][j]
                pixels -= {(y, x) for y in range(a.y0, a.y1) for x in range(a.x0, a.x1)}
            counts["cached"] += per_pixel * len(pixels)
            c = cached.computed_regions[t][i][j]
            assert c.area == len(pixels)  # the geometry computes exactly those pixels
            for y, x in pixels:
                seen[y, x] += 1
        assert (seen >= 1).all()
    assert plain.stage_macs_full == cached.stage_macs_full == counts["full"]
    assert plain.stage_macs_patched == counts["plain"]
    assert cached.stage_macs_patched == counts["cached"]
    assert cached.redundant_macs_recompute == plain.redundant_macs
    assert 0 < cached.redundant_macs <= 0.5 * plain.redundant_macs


def test_any_subset_of_maps_is_exact_and_saves_its_own_macs(mnv2: dict) -> None:
    """Line buffers for some maps only: exact, and each kept map saves exactly its producing
    conv's MACs on the kept rows (`map_savings`), independently of the others."""
    g = mnv2["graph"]
    plain = plan_patches(g, PatchSplit(13, 3))
    part = plan_patches(g, PatchSplit(13, 3, SUBSET))
    assert part.cache and set(part.line_rows) == SUBSET
    saved = map_savings(plain)
    assert saved["/features/3/Add_output_0"] == 0 and saved["/features/0/2/Clip_output_0"] > 0
    assert part.redundant_macs == plain.redundant_macs - sum(saved[t] for t in SUBSET)
    stitched = run_patch_stage(part, mnv2["feeds"])
    np.testing.assert_allclose(stitched, mnv2["env"][part.split_tensor], rtol=1e-5, atol=1e-5)
    with pytest.raises(MpqError, match="not a stage map"):
        plan_patches(g, PatchSplit(13, 3, frozenset({part.split_tensor})))


def test_cache_within_peak_keeps_the_peak(mnv2: dict) -> None:
    """Every map when that fits the limit; else a greedy subset under it; None when no line
    buffer fits."""
    g = mnv2["graph"]
    plain = plan_patches(g, PatchSplit(10, 3))
    full = plan_patches(g, PatchSplit(10, 3, True))
    top = full.memory().peak_sram_bytes
    assert cache_within_peak(plain, peak=top).line_rows == full.line_rows
    sizes = sorted(b.size for b in full.buffers() if b.name.startswith(LINE_PREFIX))
    some = cache_within_peak(plain, peak=plain.memory().peak_sram_bytes + sizes[-1])
    assert some is not None and 0 < len(some.line_rows) < len(full.line_rows)
    assert some.memory().peak_sram_bytes <= plain.memory().peak_sram_bytes + sizes[-1]
    assert full.redundant_macs < some.redundant_macs < plain.redundant_macs
    assert cache_within_peak(plain, peak=plain.memory().peak_sram_bytes - 1) is None


# -- memory --------------------------------------------------------------------------------------

def test_line_buffers_live_through_the_stage(mnv2: dict) -> None:
    """One buffer per kept map, rows × widest patch column × channels at the map's bits,
    alive over every stage step: per step, exactly the line buffers' bytes more than
    recomputing; after the stage, the same."""
    g = mnv2["graph"]
    k, n = 10, 3
    plain = plan_patches(g, PatchSplit(k, n))
    cached = plan_patches(g, PatchSplit(k, n, cache=True))
    assert cached.line_rows  # deep enough to share rows
    for bits in (None, {t: 4 for t in g.tensors if t not in g.inputs}):
        lines = {b.name: b for b in cached.buffers(bits) if b.name.startswith(LINE_PREFIX)}
        assert set(lines) == {LINE_PREFIX + t for t in cached.line_rows}
        extra = 0
        for name, buf in lines.items():
            t = name[len(LINE_PREFIX):]
            cols = max(r.cols for row in cached.regions[t] for r in row)
            elements = cached.line_rows[t] * cols * g.tensors[t].shape[3]
            assert [(s.first, s.last) for s in buf.segments] == [(0, k - 1)]
            assert buf.size == align_up(packed_bytes(elements, (bits or {}).get(t, 8)))
            extra += buf.size
        a = plain.memory(bits).per_step_bytes
        b = cached.memory(bits).per_step_bytes
        assert [y - x for x, y in zip(a, b, strict=True)] == [extra] * k + [0] * (len(a) - k)
        assert cached.memory(bits).peak_sram_bytes >= cached.peak_lower_bound(bits)


def test_search_takes_line_buffers_when_they_cost_no_peak(mnv2: dict) -> None:
    """Both forms compete on (peak, redundant MACs): the winner is the better of the two
    searches restricted to one form; and the driver's switch."""
    g = mnv2["graph"]

    def key(s):
        return (s.memory().peak_sram_bytes, s.redundant_macs)

    for n in (2, 3):
        plain = search_patches(g, n_choices=(n,), cache=False)
        cached = search_patches(g, n_choices=(n,), cache=True)
        both = search_patches(g, n_choices=(n,), cache=None)
        assert not plain.cache and cached.cache
        assert key(both) == min(key(plain), key(cached))
    assert cache_choice(SearchOptions(patch_cache="on")) is True
    assert cache_choice(SearchOptions(patch_cache="off", strategy="int8")) is False
    assert cache_choice(SearchOptions(patch_cache="auto", strategy="int8")) is None
    assert cache_choice(SearchOptions(patch_cache="auto", vdpc=False)) is None
    # VDPC may switch branch from patch to patch: a kept row could be the other branch's
    assert cache_choice(SearchOptions(patch_cache="auto", strategy="vdqs")) is False
    # ... the measured strategy runs every split without VDPC (`vdpc_allowed`)
    assert cache_choice(SearchOptions(patch_cache="auto")) is None


def test_auto_search_prefers_fewer_macs_within_the_budget(mnv2: dict) -> None:
    """`--strategy int8` at a budget patches fit with either form: the plan keeps rows (fewer
    redundant MACs, the search's tie-break at equal objective) and records both forms."""
    plan = _search(mnv2, strategy="int8", sram=40_000)
    assert plan.patch is not None and "cache" in plan.patch
    recompute = plan.patch["cache"]["redundant_macs_recompute"]
    assert plan.patch["redundant_macs"] < recompute
    assert plan.predicted["macs"] == sum(layer.macs for layer in plan.layers) \
        + plan.patch["redundant_macs"]


# -- plan ----------------------------------------------------------------------------------------

def test_plan_records_the_cache_and_refuses_tampering(int8_plan: Plan, mnv2: dict,
                                                      tmp_path: Path) -> None:
    g = mnv2["graph"]
    c = int8_plan.patch["cache"]
    sched = plan_patches(g, PatchSplit(13, 3, SUBSET))
    assert int8_plan.patch["vdpc"] is None
    assert int8_plan.patch["redundant_macs"] == sched.redundant_macs
    assert c["redundant_macs_recompute"] == sched.redundant_macs_recompute
    assert [(b["tensor"], b["rows"]) for b in c["line_buffers"]] == sorted(
        sched.line_rows.items())
    check_plan(int8_plan, g)
    data = json.loads(int8_plan.to_json())

    def refused(mutate, field: str) -> None:
        bad = copy.deepcopy(data)
        mutate(bad)
        path = tmp_path / "bad.plan.json"
        path.write_text(json.dumps(bad))
        with pytest.raises(MpqError) as exc:  # the schema's or the model check's field error
            check_plan(load_plan(path), g)
        assert field in str(exc.value)

    lb = "patch.cache.line_buffers"
    refused(lambda p: p["patch"]["cache"]["line_buffers"][0].update(
        rows=p["patch"]["cache"]["line_buffers"][0]["rows"] + 1), lb)
    refused(lambda p: p["patch"]["cache"]["line_buffers"][0].update(bytes=16), f"{lb}[0].bytes")
    other = c["line_buffers"][1]["offset"]
    refused(lambda p: p["patch"]["cache"]["line_buffers"][0].update(offset=other), lb)
    refused(lambda p: p["patch"]["cache"]["line_buffers"][0].update(
        offset=int8_plan.predicted["arena_bytes"]), f"{lb}[0].offset")
    refused(lambda p: p["patch"]["cache"].update(redundant_macs_recompute=0),
            "patch.cache.redundant_macs_recompute")
    refused(lambda p: p["patch"]["cache"].update(order="row-major"), "patch.cache.order")
    refused(lambda p: p["patch"].pop("cache"), "patch.redundant_macs")  # the recomputing form
    refused(lambda p: p["patch"]["cache"]["line_buffers"][0].update(tensor="nope"), lb)
    refused(lambda p: p["patch"]["cache"].update(line_buffers=[]), lb)


# -- C export ------------------------------------------------------------------------------------

def test_cached_plans_bit_exact_on_host(int8_plan: Plan, mnv2: dict) -> None:
    """int8 (some maps cached), and 4-bit maps (every map: packed line buffers), against the
    integer reference."""
    g = mnv2["graph"]
    assert verify(int8_plan, g, mnv2["x"][:4], "host").mismatches == 0
    low = _search(mnv2, patches="k=10,n=3", strategy="exact", patch_cache="on", bits=(4,))
    assert "cache" in low.patch and min(t.bits for t in low.tensors) < 8
    assert low.patch["vdpc"] is None and any("VDPC off" in note for note in low.notes)
    assert verify(low, g, mnv2["x"][:4], "host").mismatches == 0


def test_cached_plan_bit_exact_under_qemu(int8_plan: Plan, mnv2: dict) -> None:
    """`mpq verify --target qemu-m4`: byte-exact on the emulated Cortex-M4 (the instruction
    counts of both forms: benchmarks/memory_bench.py)."""
    if shutil.which("arm-none-eabi-gcc") is None or shutil.which("qemu-system-arm") is None:
        pytest.skip("arm-none-eabi-gcc / qemu-system-arm not installed")
    r = verify(int8_plan, mnv2["graph"], mnv2["x"][:2], "qemu-m4")
    assert r.mismatches == 0 and r.instructions > 0


def test_cli_patch_cache_switch(mnv2: dict, tmp_path: Path) -> None:
    """`mpq search --patch-cache on` (in-process): the plan and the JSON summary record the
    line buffers with both forms' redundant MACs; a bad value is a usage error."""
    from click.testing import CliRunner

    from mpq.cli import main

    shutil.copy(mnv2["path"], tmp_path / "m.onnx")
    np.savez(tmp_path / "calib.npz", x=mnv2["x"][:16])
    for mode in ("on",):
        plan = tmp_path / f"{mode}.plan.json"
        r = CliRunner().invoke(main, ["search", str(tmp_path / "m.onnx"), "--board", "nano33ble",
                                      "--data", str(tmp_path / "calib.npz"), "--strategy",
                                      "int8", "--patches", "k=10,n=3", "--patch-cache", mode,
                                      "--json", "-o", str(plan)])
        assert r.exit_code == 0, r.output
        summary = json.loads(r.stdout)["patch"]
        saved = json.loads(plan.read_text())["patch"]
        assert ("cache" in summary) == ("cache" in saved) == (mode == "on")
        if mode == "on":
            assert summary["redundant_macs"] < summary["cache"]["redundant_macs_recompute"]
    r = CliRunner().invoke(main, ["search", str(tmp_path / "m.onnx"), "--board", "nano33ble",
                                  "--patch-cache", "sometimes", "-o", str(tmp_path / "x.json")])
    assert r.exit_code == 2 and "sometimes" in r.output
