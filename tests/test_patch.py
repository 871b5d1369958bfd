"""Patch-based schedules (DESIGN §6): exact regions, redundant MACs, memory, MCUNetV2 anchor."""

from __future__ import annotations

import math
import time

import numpy as np
import onnx_builders as B
import pytest

from mpq.errors import MpqError
from mpq.frontend.onnx_import import import_model
from mpq.interpreter import run_graph
from mpq.ir import Graph, Node, Tensor, node_macs
from mpq.memory import layer_memory, layer_schedule_buffers, plan_arena
from mpq.patch import (
    PatchSplit,
    Region,
    grid_spans,
    patch_conv_macs,
    plan_patches,
    run_patch_stage,
    search_patches,
    valid_splits,
    window_span,
)

# MCUNetV2 Fig. 1: MobileNetV2 with 4×4 patches needs 172 kB = 28·28·(32 + 192) B (input excluded).
MCUNETV2_172KB = 28 * 28 * (32 + 192)


def with_tail(graph: Graph) -> Graph:
    """Append a flatten (not spatially local), so a split after the last conv is valid."""
    out = graph.outputs[0]
    flat = f"{out}_flat"
    size = graph.tensors[out].size
    graph.tensors[flat] = Tensor(flat, (1, size))
    graph.nodes.append(Node("tail/flatten", "reshape", [out], [flat], {"shape": (1, size)}))
    graph.outputs = [flat]
    return graph


def full_run(graph: Graph, seed: int = 0) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Random feeds (batch 2) and every tensor of the full float inference."""
    rng = np.random.default_rng(seed)
    feeds = {t: rng.standard_normal((2, *graph.tensors[t].shape[1:])).astype(np.float32)
             for t in graph.inputs}
    return feeds, run_graph(graph, feeds, keep=True)


def check_exact(graph: Graph, k: int, n: int,
                run: tuple[dict[str, np.ndarray], dict[str, np.ndarray]] | None = None) -> None:
    """Run every patch branch in float and compare the stitched split tensor with full inference."""
    sched = plan_patches(graph, PatchSplit(k, n))
    feeds, env = run or full_run(graph)
    stitched = run_patch_stage(sched, feeds)
    np.testing.assert_allclose(stitched, env[sched.split_tensor], rtol=1e-5, atol=1e-5,
                               err_msg=f"{graph.name}: k={k} n={n}")
    # The tiles cover the split tensor exactly once.
    _, h, w, _ = graph.tensors[sched.split_tensor].shape
    cover = np.zeros((h, w), int)
    for row in sched.tiles:
        for r in row:
            cover[r.y0:r.y1, r.x0:r.x1] += 1
    assert (cover == 1).all()


# -- geometry ----------------------------------------------------------------------------------


def test_grid_and_window_formulas() -> None:
    assert grid_spans(28, 4) == [(0, 7), (7, 14), (14, 21), (21, 28)]
    assert grid_spans(10, 3) == [(0, 3), (3, 6), (6, 10)]
    # 3×3 stride 1 pad 1 on 8 rows: rows [0, 4) read [-1, 5) -> [0, 5) with 1 row of padding.
    assert window_span((0, 4), 3, 1, 1, 1, 8) == ((0, 5), 1, 0)
    assert window_span((4, 8), 3, 1, 1, 1, 8) == ((3, 8), 0, 1)
    # stride 2, dilation 2, kernel 3: [a·s − p, (b−1)·s − p + d·(k−1) + 1)
    assert window_span((2, 4), 3, 2, 2, 2, 16) == ((2, 9), 0, 0)


def test_regions_by_hand_asymmetric_pads() -> None:
    """Conv 3×3 stride 2, pads (t, l, b, r) = (0, 1, 2, 0) on 9×11 -> 5×5, 2×2 patches."""
    g = with_tail(import_model(B.conv_pad_model([0, 1, 2, 0], stride=2), "conv_pad"))
    s = plan_patches(g, PatchSplit(1, 2))
    assert s.tiles == [[Region(0, 2, 0, 2), Region(0, 2, 2, 5)],
                       [Region(2, 5, 0, 2), Region(2, 5, 2, 5)]]
    # Rows: [0,2) -> [0, 5); [2,5) -> [4, 11) clipped to 9 with 2 rows of bottom padding.
    # Cols: [0,2) -> [-1, 4) -> [0, 4) with 1 col of left padding; [2,5) -> [3, 10).
    assert s.regions["input"] == [[Region(0, 5, 0, 4), Region(0, 5, 3, 10)],
                                  [Region(4, 9, 0, 4), Region(4, 9, 3, 10)]]
    pads = s.node_pads["/conv/Conv"]
    assert pads == [[(0, 1, 0, 0), (0, 0, 0, 0)], [(0, 1, 2, 0), (0, 0, 2, 0)]]
    assert s.node_offsets["/conv/Conv"][1][1] == [(0, 0)]
    check_exact(g, 1, 2)


def test_union_of_requests_and_offsets() -> None:
    """A block input read by the 1×1 expand (wide window) and the residual add (narrow)."""
    g = import_model(B.mobilenet_v2(0.35, 64), "mbv2")
    names = [nd.name for nd in g.nodes]
    k = names.index("/features/3/Add") + 1
    s = plan_patches(g, PatchSplit(k, 2))
    x = g.nodes[names.index("/features/3/Add")].inputs[0]  # the block input
    tile = s.regions["/features/3/Add_output_0"][1][1]
    region = s.regions[x][1][1]
    assert region.y0 < tile.y0 and region.x0 < tile.x0  # the depthwise halo widens it
    dy, dx = s.node_offsets["/features/3/Add"][1][1][0]
    assert (dy, dx) == (tile.y0 - region.y0, tile.x0 - region.x0) and dy > 0
    check_exact(g, k, 2)


# -- exactness ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name,build,splits", [
    ("conv_pad_k3s2", lambda: B.conv_pad_model([0, 1, 2, 0], stride=2), [(1, 2), (1, 3), (1, 5)]),
    ("conv_pad_d2g2", lambda: B.conv_pad_model([1, 0, 0, 1], dilation=2, group=2),
     [(1, 2), (1, 3), (1, 4)]),
    ("conv_pad_k5x2", lambda: B.conv_pad_model([2, 0, 1, 1], kernel=(5, 2), stride=(1, 2)),
     [(1, 2), (1, 3)]),
    ("grouped_dilated", B.grouped_dilated_model, [(1, 2), (1, 5), (2, 3), (2, 4), (3, 2),
                                                  (3, 4)]),
    ("tf2onnx_style", B.tf2onnx_style_model, [(1, 2), (1, 3), (2, 4), (2, 8)]),
    ("concat", B.concat_model, [(1, 2), (3, 3), (4, 2), (4, 4)]),
    ("maxpool_pads", B.pad_then_maxpool_model, [(1, 3), (2, 2), (2, 5)]),
    ("kws_style", lambda: B.kws_style_model(channels=16), [(1, 2), (3, 3), (5, 5)]),
])
def test_patch_inference_is_exact(name: str, build, splits: list[tuple[int, int]]) -> None:
    g = import_model(build(), name)
    if len(g.nodes) <= max(k for k, _ in splits):
        g = with_tail(g)
    run = full_run(g)
    for k, n in splits:
        check_exact(g, k, n, run)


@pytest.mark.parametrize("width,res,max_k", [(0.35, 64, 99), (0.5, 96, 24)])
def test_mobilenet_v2_patches_are_exact_at_every_split(width: float, res: int,
                                                       max_k: int) -> None:
    """Every valid split of MobileNetV2 (up to max_k), n cycling through 2..6 (≤ H, W)."""
    g = import_model(B.mobilenet_v2(width, res), "mbv2")
    run = full_run(g)
    for idx, k in enumerate(k for k in valid_splits(g) if k <= max_k):
        _, h, w, _ = g.tensors[g.nodes[k - 1].outputs[0]].shape
        check_exact(g, k, min(2 + idx % 5, h, w), run)


def test_single_patch_is_the_whole_tensor() -> None:
    g = import_model(B.mobilenet_v2(0.35, 64), "mbv2")
    s = plan_patches(g, PatchSplit(13, 1))
    for t, regions in s.regions.items():
        _, h, w, _ = g.tensors[t].shape
        assert regions == [[Region(0, h, 0, w)]]
        assert s.node_pads  # recorded for every stage node
    for nd in g.nodes[:13]:
        if nd.op == "conv2d":  # the padding full inference actually reads
            (kh, _), (sh, _), (dh, _) = nd.attrs["kernel"], nd.attrs["strides"], \
                nd.attrs["dilations"]
            t, left, b, r = nd.attrs["pads"]
            h_in, h_out = g.tensors[nd.inputs[0]].shape[1], g.tensors[nd.outputs[0]].shape[1]
            used_b = max(0, (h_out - 1) * sh - t + dh * (kh - 1) + 1 - h_in)
            assert s.node_pads[nd.name][0][0] == (t, left, used_b, used_b if r else 0)
    assert s.redundant_macs == 0


# -- redundant MACs ----------------------------------------------------------------------------


def test_redundant_macs_match_the_regions() -> None:
    g = import_model(B.mobilenet_v2(0.35, 96), "mbv2")
    total = sum(node_macs(nd, g) for nd in g.nodes)
    for k, n in [(6, 2), (13, 3), (21, 4)]:
        s = plan_patches(g, PatchSplit(k, n))
        by_name = {nd.name: nd for nd in g.nodes}
        patched = sum(patch_conv_macs(by_name[name], r.rows, r.cols)
                      for name in s.stage_nodes
                      for row in s.regions[by_name[name].outputs[0]] for r in row)
        assert patched == s.stage_macs_patched
        assert s.stage_macs_full == sum(node_macs(nd, g) for nd in g.nodes[:k])
        assert s.redundant_macs == patched - s.stage_macs_full > 0
        assert s.redundant_macs_percent == pytest.approx(100 * s.redundant_macs / total)


# -- memory bookkeeping ------------------------------------------------------------------------


@pytest.mark.parametrize("width,res", [(1.0, 224), (0.35, 144)])
def test_no_split_equals_layer_memory(width: float, res: int) -> None:
    g = import_model(B.mobilenet_v2(width, res), "mbv2")
    s = plan_patches(g, None)
    mem, ref = s.memory(), layer_memory(g)
    assert s.split_tensor is None and s.redundant_macs == 0
    assert mem.arena_bytes == ref.arena_bytes
    assert mem.scratch_bytes == ref.scratch_bytes
    assert mem.peak_sram_bytes == ref.peak_sram_bytes
    assert mem.per_step_bytes == [st.live_bytes for st in ref.steps]
    assert mem.inplace == ref.inplace
    bufs, _ = layer_schedule_buffers(g)
    assert plan_arena(s.buffers()).size == plan_arena(bufs).size
    assert {b.name: b.segments for b in s.buffers()} == {b.name: b.segments for b in bufs}


def test_split_tensor_lifetime_and_stage_sizes() -> None:
    g = import_model(B.mobilenet_v2(0.35, 96), "mbv2")
    s = plan_patches(g, PatchSplit(13, 3))
    split = s.split_tensor
    assert s.steps == [nd.name for nd in g.nodes]
    assert s.lifetimes[split][0] == 0
    assert all(split in live for live in s.live[:14])
    assert "input" not in set().union(*s.live)
    assert s.tensor_elements[split] == g.tensors[split].size
    for nd in g.nodes[:12]:
        t = nd.outputs[0]
        biggest = max(r.area for row in s.regions[t] for r in row)
        assert s.tensor_elements[t] == biggest * g.tensors[t].shape[3] < g.tensors[t].size
    # Tensors after the split keep their full size.
    for nd in g.nodes[13:]:
        assert s.tensor_elements[nd.outputs[0]] == g.tensors[nd.outputs[0]].size
    mem = s.memory()
    assert len(mem.per_step_bytes) == len(g.nodes)
    assert mem.arena_bytes >= max(mem.per_step_bytes)
    assert mem.peak_sram_bytes == mem.arena_bytes + max(mem.per_step_scratch)


def test_sub_byte_bits_shrink_the_arena() -> None:
    g = import_model(B.mobilenet_v2(0.35, 144), "mbv2")
    s = plan_patches(g, PatchSplit(13, 4))
    full = s.memory().arena_bytes
    half = s.memory({t: 4 for t in g.tensors}).arena_bytes
    assert half < full and half == pytest.approx(full / 2, rel=0.05)
    # Narrowing just the split tensor shrinks its segment.
    def seg_size(bufs) -> int:
        return next(seg.size for b in bufs for seg in b.segments if seg.tensor == s.split_tensor)

    assert seg_size(s.buffers({s.split_tensor: 2})) == seg_size(s.buffers()) // 4


@pytest.mark.parametrize("k,n,reason", [
    (0, 2, "outside 1..64"),
    (65, 2, "outside 1..64"),
    (8, 2, "is read by '/features/3/Add' after the split"),
    (64, 2, "is a global pool: a stage may end with it \\(k = 63\\), not run past it"),
    (13, 29, "does not fit"),
    (13, 0, "does not fit"),
])
def test_invalid_splits_are_rejected(k: int, n: int, reason: str) -> None:
    g = import_model(B.mobilenet_v2(1.0, 224), "mbv2")
    with pytest.raises(MpqError, match=reason):
        plan_patches(g, PatchSplit(k, n))


def test_non_local_and_non_rank4_splits_are_rejected() -> None:
    g = with_tail(with_tail(import_model(B.conv_pad_model([1, 1, 1, 1]), "conv")))
    with pytest.raises(MpqError, match="'tail/flatten' \\(reshape\\) is not spatially local"):
        plan_patches(g, PatchSplit(2, 2))
    g = import_model(B.concat_model(), "concat")
    with pytest.raises(MpqError, match="'/relu_a/Relu_output_0' is read by '/Concat'"):
        plan_patches(g, PatchSplit(2, 2))


def test_valid_splits_of_mobilenet_v2() -> None:
    g = import_model(B.mobilenet_v2(0.35, 96), "mbv2")
    ks = valid_splits(g)
    names = [nd.name for nd in g.nodes]
    # the last split ends the stage with the global pool (its sums accumulate per patch)
    assert ks[0] == 1 and ks[-1] == names.index("/GlobalAveragePool") + 1
    assert ks[-2] == names.index("/GlobalAveragePool")
    cons = g.consumers()
    for k in ks:  # never inside a residual block: nothing but the split tensor crosses
        crossing = {t for nd in g.nodes[:k] for t in nd.outputs
                    if any(names.index(c.name) >= k for c in cons[t])}
        assert crossing <= {g.nodes[k - 1].outputs[0]}
    assert names.index("/features/3/Add") + 1 in ks
    assert names.index("/features/3/conv/2/Conv") + 1 not in ks


# -- search ------------------------------------------------------------------------------------


def test_search_is_deterministic_and_respects_the_overhead_bound() -> None:
    g = import_model(B.mobilenet_v2(0.35, 96), "mbv2")
    base = layer_memory(g).peak_sram_bytes
    best = search_patches(g)
    again = search_patches(g)
    assert best is not None and again is not None
    assert (best.split_layer, best.n) == (again.split_layer, again.n)
    peak = best.memory().peak_sram_bytes
    assert peak < base
    # Exhaustive check of the optimum (same key: peak, redundant MACs, k, n).
    keys = []
    for k in valid_splits(g):
        _, h, w, _ = g.tensors[g.nodes[k - 1].outputs[0]].shape
        for n in (2, 3, 4, 5, 6, 8):
            if n <= min(h, w):
                s = plan_patches(g, PatchSplit(k, n))
                keys.append((s.memory().peak_sram_bytes, s.redundant_macs, k, n))
    assert min(keys) == (peak, best.redundant_macs, best.split_layer, best.n)
    bounded = search_patches(g, max_overhead=0.10)
    assert bounded is not None
    assert bounded.redundant_macs <= 0.10 * bounded.total_macs
    assert bounded.memory().peak_sram_bytes >= peak


def test_search_returns_none_when_patches_do_not_help() -> None:
    g = import_model(B.tf2onnx_style_model(), "tf2onnx")
    assert valid_splits(g) == [1, 2, 3]  # 3: the stage ends in the global pool
    assert search_patches(g) is None


def test_search_uses_bits() -> None:
    g = import_model(B.mobilenet_v2(0.35, 96), "mbv2")
    bits = {t: 4 for t in g.tensors}
    s = search_patches(g, n_choices=(4,), bits=bits)
    assert s is not None
    assert s.memory(bits).peak_sram_bytes < layer_memory(g, bits).peak_sram_bytes


# -- MCUNetV2 anchor ---------------------------------------------------------------------------


def test_mobilenet_v2_1_0_224_anchor() -> None:
    """MobileNetV2-1.0@224 int8, 4×4 patches, best split.

    MCUNetV2 reports 172 kB = 28·28·(32+192) B, excluding the input image. With the residual
    adds fused into their 1×1 project convs (the sum is written over the dying skip input,
    `memory.fused_residual_adds`), the arena is exactly that figure; peak = arena + the largest
    kernel scratch, ≤ 180,000 B.
    """
    g = import_model(B.mobilenet_v2(1.0, 224), "mbv2")
    t0 = time.perf_counter()
    s = search_patches(g, n_choices=(4,))
    seconds = time.perf_counter() - t0
    assert s is not None
    mem = s.memory()
    print(f"\nMobileNetV2-1.0@224 n=4: best k={s.split_layer} ({s.stage_nodes[-1]}, split "
          f"{g.tensors[s.split_tensor].shape}), peak {mem.peak_sram_bytes:,} B "
          f"(arena {mem.arena_bytes:,} + scratch {mem.scratch_bytes:,}), redundant MACs "
          f"{s.redundant_macs_percent:.2f} %, layer-based {layer_memory(g).peak_sram_bytes:,} B,"
          f" search {seconds:.2f} s")
    k = s.split_layer
    assert s.stage_nodes[-1] == "/features/4/conv/2/Conv"  # split at 28×28×32
    assert g.tensors[s.split_tensor].shape == (1, 28, 28, 32)
    # The patch stage (with the full split tensor alive) fits under MCUNetV2's 172 kB.
    assert max(mem.per_step_bytes[:k]) < MCUNETV2_172KB
    # The layer-based rest: 28·28·(32+192) at the expand convs, + the skip at the projects.
    names = [nd.name for nd in g.nodes]
    assert mem.per_step_bytes[names.index("/features/5/conv/0/0/Conv")] == MCUNETV2_172KB
    assert max(mem.per_step_bytes[k:]) == MCUNETV2_172KB
    assert mem.arena_bytes == MCUNETV2_172KB
    assert mem.peak_sram_bytes <= 180_000
    assert s.redundant_macs_percent == pytest.approx(9.28, abs=0.01)
    assert mem.peak_sram_bytes < layer_memory(g).peak_sram_bytes / 6


def test_mobilenet_v2_0_35_144_anchor() -> None:
    g = import_model(B.mobilenet_v2(0.35, 144), "mbv2")
    s = search_patches(g, n_choices=(4,))
    assert s is not None
    mem = s.memory()
    print(f"\nMobileNetV2-0.35@144 n=4: best k={s.split_layer} ({s.stage_nodes[-1]}), peak "
          f"{mem.peak_sram_bytes:,} B (arena {mem.arena_bytes:,}), redundant MACs "
          f"{s.redundant_macs_percent:.2f} %, layer-based {layer_memory(g).peak_sram_bytes:,} B")
    assert s.stage_nodes[-1] == "/features/4/conv/2/Conv"
    assert g.tensors[s.split_tensor].shape == (1, 18, 18, 16)
    # Here the patch stage is the bottleneck (features/2's expand at 72×72, per patch, beside
    # the full split tensor); with fused residual adds the rest peaks at its expand convs,
    # 18·18·(16+96) B.
    k = s.split_layer
    assert max(mem.per_step_bytes[k:]) == 18 * 18 * (16 + 96)
    assert max(mem.per_step_bytes[:k]) == mem.per_step_bytes[3] == 46_016
    assert mem.arena_bytes == 46_016
    assert mem.peak_sram_bytes == 46_857
    assert math.isclose(s.redundant_macs_percent, 20.30, abs_tol=0.01)
