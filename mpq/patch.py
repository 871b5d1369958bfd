"""Patch-based schedules (MCUNetV2) with exact regions and exact memory (DESIGN §5, §6).

A split at layer `k` runs `nodes[0:k]` (the *patch stage*) once per spatial patch and the rest
layer by layer. The split tensor `nodes[k-1].outputs[0]` is cut into an n×n grid of tiles (row
boundaries ⌊i·H/n⌋, column boundaries ⌊j·W/n⌋). Each patch branch computes, for every tensor of
the stage, exactly the rectangle its consumers need, found backwards from the tile (§6):

    conv/pool output rows [a, b) read input rows [a·s − p_top, (b−1)·s − p_top + d·(KH−1) + 1)
    clipped to [0, H_in) (s stride, d dilation, KH kernel height; columns alike); add/concat
    read the same rectangle of each input; a tensor read by several stage nodes gets the
    bounding box of the requests.

The part of a window outside the full tensor is the branch's *effective padding* (nonzero only
at image borders, where full inference pads too); interior patch borders read real neighbouring
data. Each branch therefore computes the full network's values on its rectangle and patch
inference is exact. Rows and columns are independent, so every rule runs per axis and a patch's
rectangle is (row span of patch row i) × (column span of patch column j).

Memory (§5): one step per node. Stage tensors get the largest per-patch rectangle (buffers are
reused from patch to patch); the split tensor is a full-size buffer alive from step 0 to its
last use; the graph input is the caller's buffer. Depthwise convolutions run in place and
reshapes are views as in `mpq.memory`, and buffers are placed with `memory.plan_arena`.
Peak SRAM = the arena, each node's kernel scratch a slot in it alive at its step (`--scratch
arena`, the default: `PatchSchedule.slot_bytes`, a stage node's the largest over the patches),
or the arena + the largest kernel scratch (`--scratch separate` and stages with line buffers:
`memory.scratch_bytes`, on per-patch shapes for stage nodes).

A stage may end in a global average pool (`global_pool_problem`): the grid then tiles the
pool's input, each patch adds its tile to an int32 sum per channel (the `accumulator`, alive
through the stage) and the rounded means are taken once after the last patch — the same
integers as the whole pool, with no feature map ever stored whole. Such stages also take
rows-only grids (`PatchSplit.cols` = 1: n rows × 1 column of tiles; `pooled_splits`), and their
1×1 output lives from the pool's step only.

Line buffers (StreamNet, msf-CNN; `cache_rows`): instead of recomputing the rows a patch shares
with the patch below, the stage may run column by column and keep them, per map, in a buffer
alive through the whole stage; a patch then computes only the rows the patch above did not.
Column overlaps are still recomputed (caching them too would need a strip per patch column).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from functools import cached_property

import numpy as np

from mpq.errors import MpqError
from mpq.ir import Graph, Node, Tensor, node_macs
from mpq.memory import (
    ALIGN,
    ArenaPlan,
    Buffer,
    Segment,
    align_up,
    check_scratch,
    choose_overlaps,
    fused_residual_adds,
    grow_scratch,
    kernel_scratch_bytes,
    layer_lifetimes,
    layer_memory,
    live_bytes_per_step,
    overlap_shift,
    packed_bytes,
    padded_plane_bytes,
    plan_arena,
    schedule_buffers_overlap,
    scratch_buffers,
    scratch_bytes,
    step_scratch_bytes,
)

Span = tuple[int, int]  # [lo, hi) along one axis
Pads = tuple[int, int, int, int]  # (top, left, bottom, right), the IR's order

N_CHOICES = (2, 3, 4, 5, 6, 8)


@dataclass(frozen=True)
class PatchSplit:
    """A patch schedule's parameters: the first `split_layer` nodes run per patch, n×n patches;
    `cache`: keep the rows a patch shares with the patch below in line buffers instead of
    recomputing them (`cache_rows`) — for every map (True) or the maps named."""

    split_layer: int
    n: int
    cache: bool | frozenset[str] = False  # True: every map; a set: those maps only
    cols: int | None = None  # patch columns: None — n (an n×n grid); 1 — whole rows


@dataclass(frozen=True)
class Region:
    """The rectangle [y0, y1) × [x0, x1) of a tensor that one patch branch computes."""

    y0: int
    y1: int
    x0: int
    x1: int

    @property
    def rows(self) -> int:
        return self.y1 - self.y0

    @property
    def cols(self) -> int:
        return self.x1 - self.x0

    @property
    def area(self) -> int:
        """Pixels of the rectangle (multiply by the channels for elements)."""
        return self.rows * self.cols


# --------------------------------------------------------------------------------------------
# Geometry (DESIGN §6)
# --------------------------------------------------------------------------------------------


def grid_spans(size: int, n: int) -> list[Span]:
    """The n tiles of one axis of the split tensor: [⌊i·size/n⌋, ⌊(i+1)·size/n⌋)."""
    return [(i * size // n, (i + 1) * size // n) for i in range(n)]


def window_span(out: Span, kernel: int, stride: int, dilation: int, pad_lo: int,
                size_in: int) -> tuple[Span, int, int]:
    """Input span a conv/pool output span [a, b) reads, with the padding outside the tensor.

    Unclipped: [a·s − p, (b−1)·s − p + d·(k−1) + 1) for kernel size k. Returns that span
    clipped to [0, size_in) and the parts cut off before and after it: the branch's effective
    padding on this axis.
    """
    a, b = out
    raw_lo = a * stride - pad_lo
    raw_hi = (b - 1) * stride - pad_lo + dilation * (kernel - 1) + 1
    lo, hi = max(0, raw_lo), min(size_in, raw_hi)
    return (lo, hi), lo - raw_lo, raw_hi - hi


def hull(a: Span | None, b: Span) -> Span:
    """Bounding span of two spans (`a` None means nothing requested yet)."""
    if a is None:
        return b
    return (min(a[0], b[0]), max(a[1], b[1]))


def window_params(node: Node) -> tuple[tuple[int, int], tuple[int, int], tuple[int, int], Pads]:
    """(kernel, strides, dilations, pads) of a conv2d or pool node; pools have dilation 1."""
    a = node.attrs
    return (tuple(a["kernel"]), tuple(a["strides"]), tuple(a.get("dilations", (1, 1))),
            tuple(a["pads"]))


def patch_conv_macs(node: Node, rows: int, cols: int) -> int:
    """MACs of a conv computing `rows`×`cols` output pixels: Cout·rows·cols·KH·KW·Cin/groups."""
    if node.op != "conv2d":
        return 0
    cout, kh, kw, cin_g = node.weight.shape
    return int(cout * rows * cols * kh * kw * cin_g)


# --------------------------------------------------------------------------------------------
# Which splits are valid (DESIGN §6)
# --------------------------------------------------------------------------------------------


# Elementwise ops that read the same rectangle of every input as they write (like add), so a
# patch of their output needs exactly that patch of each input; broadcasting ones are refused.
ELEMENTWISE = ("mul", "sub", "prelu")


def locality_problem(node: Node, graph: Graph) -> str | None:
    """Why `node` cannot run on a spatial patch, or None when it is spatially local.

    Local: conv2d (any groups, strides, dilation), max/avg pool that is not global, add, concat
    on channels, mul/sub of equal shapes and prelu (`ELEMENTWISE`), elementwise activations
    (the same rectangle in and out), all on rank-4 tensors, with no pad as wide as the window
    (a window entirely in the padding would have no input rectangle).
    """
    label = f"node '{node.name}' ({node.op})"
    shapes = [graph.tensors[t].shape for t in (*node.inputs, *node.outputs)]
    if node.op not in ("conv2d", "max_pool", "avg_pool", "add", "concat", "activation",
                       *ELEMENTWISE):
        return f"{label} is not spatially local"
    if node.op in ELEMENTWISE and len(set(shapes)) != 1:
        return f"{label} broadcasts (its operands differ in shape)"
    if "const" in node.attrs:
        return f"{label} has a constant operand"
    if any(len(s) != 4 for s in shapes):
        return f"{label} has a tensor that is not rank 4"
    if node.op == "concat" and node.attrs["axis"] != 3:
        return f"{label} does not concatenate channels"
    if node.op == "concat" and node.attrs.get("constants"):
        return f"{label} has constant inputs"
    if node.op in ("max_pool", "avg_pool"):
        (kh, kw), _, _, _ = window_params(node)
        _, h, w, _ = graph.tensors[node.inputs[0]].shape
        if kh >= h and kw >= w:
            return f"{label} is a global pool"
    if node.op in ("conv2d", "max_pool", "avg_pool"):
        (kh, kw), _, (dh, dw), (t, left, b, r) = window_params(node)
        eh, ew = dh * (kh - 1) + 1, dw * (kw - 1) + 1
        if max(t, b) >= eh or max(left, r) >= ew:
            return f"{label} pads at least a whole window"
    return None


#: The most pixels a pooled stage's int32 sums take: 2^24 values of at most 2^7 in magnitude
#: stay below 2^31 (`mpq_avgpool_accumulate`).
POOL_SUM_PIXELS = 1 << 24


def global_pool_problem(node: Node, graph: Graph) -> str | None:
    """Why `node` cannot end a patch stage as a global average pool, or None when it can.

    It can when it is an avg_pool whose window covers its rank-4 input without padding, so
    its 1×1 output is Σ over every input pixel / (H·W) (`arith.avgpool_round`): the sum splits
    into per-patch sums of disjoint tiles, added up in an int32 accumulator, and the rounded
    division runs once after the last patch — the same integers as the whole pool.
    """
    label = f"node '{node.name}' ({node.op})"
    if node.op != "avg_pool":
        return f"{label} is not an average pool"
    shape_in = graph.tensors[node.inputs[0]].shape
    shape_out = graph.tensors[node.outputs[0]].shape
    if len(shape_in) != 4 or len(shape_out) != 4:
        return f"{label} has a tensor that is not rank 4"
    (kh, kw), _, _, pads = window_params(node)
    if kh < shape_in[1] or kw < shape_in[2] or tuple(shape_out[1:3]) != (1, 1) or any(pads):
        return f"{label} is not a global pool without padding"
    if shape_in[1] * shape_in[2] > POOL_SUM_PIXELS:
        return f"{label} sums more than {POOL_SUM_PIXELS:,} pixels (int32 sums could wrap)"
    return None



@dataclass
class _GraphIndex:
    """Schedule positions the split rules need, computed once per graph."""

    produced: dict[str, int]  # tensor -> index of its producer
    last_read: dict[str, int]  # tensor -> index of its last consumer (-1: never read)
    first_nonlocal: int  # index of the first node that is not spatially local
    nonlocal_reason: str | None


def _index(graph: Graph) -> _GraphIndex:
    produced = {t: i for i, n in enumerate(graph.nodes) for t in n.outputs}
    last_read = {t: -1 for t in graph.tensors}
    for i, n in enumerate(graph.nodes):
        for t in n.inputs:
            last_read[t] = i
    first, reason = len(graph.nodes), None
    for i, n in enumerate(graph.nodes):
        reason = locality_problem(n, graph)
        if reason is not None:
            first = i
            break
    return _GraphIndex(produced, last_read, first, reason)


def split_problem(graph: Graph, k: int, index: _GraphIndex | None = None) -> str | None:
    """Why a split at layer `k` is invalid (DESIGN §6), or None when it is valid.

    Valid: 1 ≤ k < len(nodes); stage nodes read only the graph input and stage outputs; every
    stage tensor other than the split tensor is read, and only by stage nodes (not a graph
    output); the split tensor is rank 4 with H, W ≥ 2; every stage op is spatially local —
    except that the last may be a global average pool (`global_pool_problem`): the stage is
    then tiled on the pool's input, whose tiles' sums accumulate patch by patch, and the
    split tensor is the pool's 1×1 output.
    """
    index = index or _index(graph)
    if not 1 <= k < len(graph.nodes):
        return f"split layer {k} is outside 1..{len(graph.nodes) - 1}"
    stage = graph.nodes[:k]
    pooled = k == index.first_nonlocal + 1 and global_pool_problem(stage[-1], graph) is None
    if k > index.first_nonlocal and not pooled:
        first = graph.nodes[index.first_nonlocal]
        if k > index.first_nonlocal + 1 and global_pool_problem(first, graph) is None:
            return (f"{index.nonlocal_reason}: a stage may end with it (k = "
                    f"{index.first_nonlocal + 1}), not run past it")
        return index.nonlocal_reason
    # A stage ending in a global average pool is tiled on the pool's input (`tile_tensor`)
    split = stage[-1].inputs[0] if pooled else stage[-1].outputs[0]
    if len(graph.tensors[split].shape) != 4:
        return f"split tensor '{split}' is not rank 4"
    _, h, w, _ = graph.tensors[split].shape
    if min(h, w) < 2:
        return f"split tensor '{split}' is {h}×{w}, too small to cut into patches"
    inputs = set(graph.inputs)
    for n in stage:
        for t in n.inputs:
            if t not in inputs and index.produced.get(t, k) >= k:
                return f"stage node '{n.name}' reads '{t}', which is not the graph input"
        for t in n.outputs:
            if t == split or (pooled and n is stage[-1]):
                continue
            if t in graph.outputs:
                return f"stage tensor '{t}' is a graph output"
            if index.last_read[t] < 0:
                return f"stage tensor '{t}' is never read"
            if index.last_read[t] >= k:
                reader = graph.nodes[index.last_read[t]].name
                return f"stage tensor '{t}' is read by '{reader}' after the split"
    return None


def valid_splits(graph: Graph) -> list[int]:
    """Every k for which a split at layer k is valid (`split_problem` is None), ascending."""
    index = _index(graph)
    return [k for k in range(1, len(graph.nodes)) if split_problem(graph, k, index) is None]


# --------------------------------------------------------------------------------------------
# Backward pass along one axis
# --------------------------------------------------------------------------------------------


@dataclass
class _AxisPlan:
    """Per-axis result of the backward pass for each of the n tile positions.

    spans[i][t]: span of tensor t computed by patch position i; pads[node][i]: effective pad
    (before, after); reads[node][i]: span read from each input (absolute coordinates).
    """

    spans: list[dict[str, Span]]
    pads: dict[str, list[tuple[int, int]]]
    reads: dict[str, list[list[Span]]]
    #: with a line buffer (`cache_rows`): the span of each stage output position i computes
    #: (the rest of spans[i] comes from the buffer); None: every patch computes all of spans[i]
    computed: list[dict[str, Span]] | None = None


def _axis_pass(graph: Graph, stage: list[Node], split: str, axis: int, n: int,
               pooled: bool = False) -> _AxisPlan:
    """Walk the stage backwards from each tile along `axis` (0 rows, 1 columns), DESIGN §6.

    `pooled`: the stage ends in a global average pool and `split` is the pool's input; the
    pool reads exactly the tile and its output is the whole 1×1 map in every patch.
    """
    size = graph.tensors[split].shape[1 + axis]
    spans: list[dict[str, Span]] = []
    pads: dict[str, list[tuple[int, int]]] = {nd.name: [] for nd in stage}
    reads: dict[str, list[list[Span]]] = {nd.name: [] for nd in stage}
    for tile in grid_spans(size, n):
        need: dict[str, Span] = {split: tile}
        if pooled:
            pool = stage[-1]
            need[pool.outputs[0]] = (0, 1)
            pads[pool.name].append((0, 0))
            reads[pool.name].append([tile])
        for nd in reversed(stage[:-1] if pooled else stage):
            out = need[nd.outputs[0]]
            if nd.op in ("conv2d", "max_pool", "avg_pool"):
                kernel, strides, dilations, p = window_params(nd)
                size_in = graph.tensors[nd.inputs[0]].shape[1 + axis]
                span, before, after = window_span(out, kernel[axis], strides[axis],
                                                  dilations[axis], p[axis], size_in)
                node_reads = [span]
            else:  # add, concat: the same rectangle of every input
                before = after = 0
                node_reads = [out] * len(nd.inputs)
            pads[nd.name].append((before, after))
            reads[nd.name].append(node_reads)
            for t, span in zip(nd.inputs, node_reads, strict=True):
                need[t] = hull(need.get(t), span)
        spans.append(need)
    return _AxisPlan(spans, pads, reads)


# --------------------------------------------------------------------------------------------
# Line buffers: cached overlaps instead of recomputed ones (StreamNet, msf-CNN)
# --------------------------------------------------------------------------------------------
#
# MCUNetV2 recomputes the halo of every patch. StreamNet (Zheng et al., NeurIPS'23) and msf-CNN
# keep the overlapping rows of each intermediate map for the neighbouring patch instead. mpq
# caches along one axis: patches run column by column (j outer, i inner), so patch (i, j) follows
# (i−1, j) and shares the bottom rows of every stage map of (i−1, j) — at most one strip per
# map, the width of one patch column. Columns are still recomputed (a row-major order would
# need a strip the whole width of each map per tensor). Every map's row span is monotone in i
# (window spans and hulls of monotone spans are monotone), so patch i computes
# [max(lo_i, hi_{i−1}), hi_i) and takes [lo_i, hi_{i−1}) from the strip saved by patch i−1; the
# values are the full network's as before, so the outputs are byte-identical to recomputation.


def cached_span(spans: list[Span], i: int) -> Span:
    """The rows position i computes when position i−1 left its rows in a line buffer:
    [max(lo_i, hi_{i−1}), hi_i) (all of spans[0] for the first); empty when i−1 reached hi_i."""
    lo, hi = spans[i]
    if i == 0:
        return lo, hi
    start = min(max(lo, spans[i - 1][1]), hi)
    return start, hi


def kept_rows(spans: list[Span], i: int) -> int:
    """Rows of position i that position i+1 reads again: max(0, hi_i − lo_{i+1}) (0 for the last);
    what the line buffer holds between the two patches."""
    if i + 1 >= len(spans):
        return 0
    return max(0, spans[i][1] - spans[i + 1][0])


def cache_rows(graph: Graph, stage: list[Node], rows: _AxisPlan,
               maps: set[str] | frozenset[str] | None = None) -> _AxisPlan:
    """The row plan with line buffers: each cached stage output's computed span
    (`cached_span`; `maps` None: every output, else those named), and each node's reads and
    effective pads for those rows only (`window_span` of the computed span;
    add/concat/elementwise: the same rows). Other outputs are computed whole, as without line
    buffers; any subset is exact, since a kept row holds the same value as a recomputed one.
    Stored spans are unchanged.

    Raises MpqError if a map's spans are not monotone in i or a read leaves its input's span
    (neither can happen with the backward pass's rules; checked, not assumed).
    """
    n = len(rows.spans)
    computed: list[dict[str, Span]] = [dict(s) for s in rows.spans]
    pads: dict[str, list[tuple[int, int]]] = {nd.name: [] for nd in stage}
    reads: dict[str, list[list[Span]]] = {nd.name: [] for nd in stage}
    for nd in stage:
        t = nd.outputs[0]
        spans = [s[t] for s in rows.spans]
        if any(spans[i][0] > spans[i + 1][0] or spans[i][1] > spans[i + 1][1]
               for i in range(n - 1)):
            raise MpqError(f"patch line buffer: the row spans of '{t}' are not monotone")
        for i in range(n):
            out = cached_span(spans, i) if maps is None or t in maps else spans[i]
            computed[i][t] = out
            if out == spans[i]:  # computed whole: the recomputing plan's reads
                before, after = rows.pads[nd.name][i]
                node_reads = list(rows.reads[nd.name][i])
            elif out[0] == out[1]:  # every row kept from the patch above: nothing to compute
                before = after = 0
                node_reads = [(rows.spans[i][x][0],) * 2 for x in nd.inputs]
            elif nd.op in ("conv2d", "max_pool", "avg_pool"):
                kernel, strides, dilations, p = window_params(nd)
                size_in = graph.tensors[nd.inputs[0]].shape[1]
                span, before, after = window_span(out, kernel[0], strides[0], dilations[0],
                                                  p[0], size_in)
                node_reads = [span]
            else:
                before = after = 0
                node_reads = [out] * len(nd.inputs)
            for x, r in zip(nd.inputs, node_reads, strict=True):
                have = rows.spans[i][x]
                if not have[0] <= r[0] <= r[1] <= have[1]:
                    raise MpqError(f"patch line buffer: node '{nd.name}' reads rows {r} outside "
                                   f"the {have} of '{x}'")
            pads[nd.name].append((before, after))
            reads[nd.name].append(node_reads)
    return _AxisPlan(rows.spans, pads, reads, computed)


def stage_macs(stage: list[Node], rows: list[dict[str, Span]], cols: list[dict[str, Span]]
               ) -> int:
    """Σ over stage convs of Cout·KH·KW·Cin/groups · Σ_i rows_i · Σ_j cols_j: the MACs of all
    patches when position (i, j) computes rows[i] × cols[j] of each output (DESIGN §6)."""
    total = 0
    for nd in stage:
        if nd.op != "conv2d":
            continue
        t = nd.outputs[0]
        cout, kh, kw, cin_g = nd.weight.shape
        total += int(cout * kh * kw * cin_g) * sum(s[t][1] - s[t][0] for s in rows) \
            * sum(s[t][1] - s[t][0] for s in cols)
    return total


LINE_PREFIX = "line:"  # buffer name of a map's line buffer: "line:<tensor>"
ACC_PREFIX = "acc:"  # buffer name of a pooled stage's sums: "acc:<pool output>"


# --------------------------------------------------------------------------------------------
# The schedule
# --------------------------------------------------------------------------------------------


@dataclass
class PatchMemory:
    """Memory of a patch schedule at given bitwidths (DESIGN §5)."""

    arena_bytes: int
    scratch_bytes: int
    per_step_bytes: list[int]  # bytes of buffers alive at each step
    per_step_scratch: list[int]  # kernel scratch of each step
    plan: ArenaPlan
    inplace: set[str]
    overlap: dict[str, int] = field(default_factory=dict)  # node -> D (`memory.overlap_shift`)

    @property
    def peak_sram_bytes(self) -> int:
        """Arena + the largest kernel scratch (the graph input is the caller's)."""
        return self.arena_bytes + self.scratch_bytes


@dataclass
class PatchSchedule:
    """A patch-based schedule: regions, effective pads, MACs, lifetimes and memory.

    With `split_layer` 0 (from `plan_patches(graph, None)`) it is the layer-based schedule:
    empty stage, `split_tensor` None.
    """

    graph: Graph = field(repr=False, compare=False)
    split_layer: int
    n: int
    stage_nodes: list[str]
    split_tensor: str | None
    stage_macs_full: int
    stage_macs_patched: int
    total_macs: int
    steps: list[str]
    tensor_elements: dict[str, int]
    lifetimes: dict[str, tuple[int, int]]  # tensor -> (first, last) step, graph input excluded
    inplace_candidates: set[str]  # stage depthwise nodes whose output fits in every input patch
    io: str = "external"  # where the graph input/outputs live (`memory.IO_MODES`)
    cache: bool = False  # line buffers keep shared rows (`cache_rows`); patches column-major
    stage_macs_recomputed: int = 0  # Σ_patches stage MACs when every patch recomputes its halo
    line_rows: dict[str, int] = field(default_factory=dict)  # map -> rows of its line buffer
    # Nodes whose output may start inside their dying input (`memory.choose_overlaps`):
    # layer-based nodes, or a patch stage's convolutions (`stage_shift`, every patch's tile)
    overlap: frozenset[str] = frozenset()
    # ... and those whose output starts above it, rows run last to first
    # (`memory.node_reverse_shift`)
    overlap_reverse: frozenset[str] = frozenset()
    # A stage's in-place depthwise nodes whose output tile starts `raise_shift` bytes above
    # their input tile's start (`choose_stage_overlaps`)
    inplace_raise: frozenset[str] = frozenset()
    # Where the kernel scratch lives (`memory.SCRATCH_MODES`): "arena" — per layer, in the
    # arena for its step (`memory.scratch_buffers`; a stage node's the largest over the
    # patches; not with line buffers) — or "separate"
    scratch: str = "separate"
    #: patch columns (0: n, the n×n grid; 1: each patch is whole rows)
    m: int = 0
    #: the global average pool's input when the stage ends in one (`global_pool_problem`):
    #: the tensor the grid tiles; its tiles' sums accumulate in `accumulator`
    pool_input: str | None = None
    _rows: _AxisPlan | None = field(default=None, repr=False, compare=False)
    _cols: _AxisPlan | None = field(default=None, repr=False, compare=False)
    # `stage_shift` per (node, in bits, out bits): the planner asks at every arena it plans
    _shifts: dict[tuple[str, int, int, bool], int | None] = field(
        default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.m == 0:
            self.m = self.n

    @property
    def patches(self) -> int:
        """Patches per inference: n rows × m columns of tiles."""
        return self.n * self.m

    @property
    def tile_tensor(self) -> str | None:
        """The tensor the grid tiles: the pool's input for a pooled stage, else the split
        tensor."""
        return self.pool_input or self.split_tensor

    @property
    def accumulator(self) -> tuple[str, int] | None:
        """(buffer name, bytes) of a pooled stage's int32 sums, one per channel, alive through
        the stage (zeroed before the first patch, read by the pool's last step); None without a
        pooled stage."""
        if self.pool_input is None:
            return None
        return ACC_PREFIX + self.split_tensor, 4 * self.graph.tensors[self.pool_input].shape[3]

    # -- MACs (DESIGN §6) ------------------------------------------------------------------
    @property
    def redundant_macs(self) -> int:
        """MACs recomputed in patch overlaps: Σ_patches stage MACs − the stage's full MACs."""
        return self.stage_macs_patched - self.stage_macs_full

    @property
    def redundant_macs_percent(self) -> float:
        """Redundant MACs as a percentage of the whole network's MACs."""
        return 100.0 * self.redundant_macs / self.total_macs if self.total_macs else 0.0

    @property
    def redundant_macs_recompute(self) -> int:
        """Redundant MACs of the same split when every patch recomputes its overlaps
        (MCUNetV2's form; equals `redundant_macs` without the cache)."""
        return self.stage_macs_recomputed - self.stage_macs_full

    # -- line buffers (`cache_rows`) -------------------------------------------------------
    @property
    def patch_order(self) -> list[tuple[int, int]]:
        """(i, j) of the patches in the order they run: row-major, or column-major with the
        line buffers (patch (i, j) follows (i−1, j), whose bottom rows it reuses)."""
        if self.cache:
            return [(i, j) for j in range(self.m) for i in range(self.n)]
        return [(i, j) for i in range(self.n) for j in range(self.m)]

    @property
    def line_buffers(self) -> dict[str, int]:
        """Line buffer name ("line:<map>") -> elements: rows · widest patch column · channels."""
        if self._cols is None:
            return {}
        out = {}
        for t, rows in self.line_rows.items():
            cols = max(s[t][1] - s[t][0] for s in self._cols.spans)
            out[LINE_PREFIX + t] = rows * cols * self.graph.tensors[t].shape[3]
        return out

    def line_copies(self, t: str, i: int) -> tuple[int, int, int]:
        """(restore, save_from, save) rows for map t at patch row i: after computing, rows
        [0, restore) of its stored region come from the line buffer, then rows
        [save_from, save_from + save) go into it for patch row i+1 (`kept_rows`)."""
        if t not in self.line_rows or self._rows is None or self._rows.computed is None:
            return 0, 0, 0
        spans = [s[t] for s in self._rows.spans]
        restore = self._rows.computed[i][t][0] - spans[i][0]
        save = kept_rows(spans, i)
        start = spans[i + 1][0] - spans[i][0] if save else 0
        return restore, start, save

    @cached_property
    def node_by_name(self) -> dict[str, Node]:
        """The graph's nodes by name."""
        return {nd.name: nd for nd in self.graph.nodes}

    @cached_property
    def computed_regions(self) -> dict[str, list[list[Region]]]:
        """map → [i][j] rectangle patch (i, j) computes: its region, or, with line buffers, the
        rows not kept from the patch above."""
        if self._rows is None or self._cols is None or self._rows.computed is None:
            return self.regions
        rows, cols = self._rows.computed, self._cols.spans
        return {t: [[Region(*rows[i][t], *cols[j][t]) for j in range(self.m)]
                    for i in range(self.n)] for t in rows[0]}

    # -- regions ---------------------------------------------------------------------------
    @cached_property
    def regions(self) -> dict[str, list[list[Region]]]:
        """tensor → [i][j] rectangle patch (i, j) computes (the graph input: what it reads)."""
        if self._rows is None or self._cols is None:
            return {}
        rows, cols = self._rows.spans, self._cols.spans
        return {t: [[Region(*rows[i][t], *cols[j][t]) for j in range(self.m)]
                    for i in range(self.n)] for t in rows[0]}

    @cached_property
    def node_pads(self) -> dict[str, list[list[Pads]]]:
        """node → [i][j] effective pads (t, l, b, r): the window's part outside the full tensor.

        Nonzero only at image borders; add and concat have (0, 0, 0, 0).
        """
        if self._rows is None or self._cols is None:
            return {}
        rp, cp = self._rows.pads, self._cols.pads
        return {nd: [[(rp[nd][i][0], cp[nd][j][0], rp[nd][i][1], cp[nd][j][1])
                      for j in range(self.m)] for i in range(self.n)] for nd in self.stage_nodes}

    @cached_property
    def node_offsets(self) -> dict[str, list[list[list[tuple[int, int]]]]]:
        """node → [i][j] → per input, (dy, dx) of the read window inside that input's region.

        A tensor read by several stage nodes holds the bounding box of their requests, so a
        node may start reading below/right of its input buffer's origin.
        """
        if self._rows is None or self._cols is None:
            return {}
        out: dict[str, list[list[list[tuple[int, int]]]]] = {}
        for name in self.stage_nodes:
            ins = self.node_by_name[name].inputs
            rr, cr = self._rows.reads[name], self._cols.reads[name]
            rs, cs = self._rows.spans, self._cols.spans
            out[name] = [[[(rr[i][q][0] - rs[i][t][0], cr[j][q][0] - cs[j][t][0])
                           for q, t in enumerate(ins)] for j in range(self.m)]
                         for i in range(self.n)]
        return out

    @property
    def tiles(self) -> list[list[Region]]:
        """[i][j] tile of the tiled tensor (the rectangle patch (i, j) writes; a pooled stage's:
        of the pool's input, which it sums)."""
        return self.regions[self.tile_tensor] if self.tile_tensor else []

    # -- memory (DESIGN §5) ----------------------------------------------------------------
    @property
    def live(self) -> list[set[str]]:
        """Tensors alive at each step (graph input excluded)."""
        return [{t for t, (a, b) in self.lifetimes.items() if a <= i <= b}
                for i in range(len(self.steps))]

    def buffers(self, bits: dict[str, int] | None = None,
                inplace_depthwise: bool = True) -> list[Buffer]:
        """Buffers of the schedule, as `memory.layer_schedule_buffers` builds them.

        Segment sizes are align16(⌈elements·bits/8⌉) with `tensor_elements` and `lifetimes`;
        reshapes are views; a depthwise conv runs in place when its input dies there, it has
        channel multiplier 1 and its output is not larger than its input (in every patch, for
        stage nodes).
        """
        return self._buffers(bits, inplace_depthwise)[0]

    def buffers_and_overlap(self, bits: dict[str, int] | None = None
                            ) -> tuple[list[Buffer], dict[str, int]]:
        """`buffers` and the overlapped nodes with their shift D (`memory.overlap_shift`)."""
        buffers, _, overlap = self._buffers(bits, True)
        return buffers, overlap

    def _buffers(self, bits: dict[str, int] | None, inplace_depthwise: bool,
                 overlap: frozenset[str] | None = None,
                 reverse: frozenset[str] | None = None,
                 raised: frozenset[str] | None = None
                 ) -> tuple[list[Buffer], set[str], dict[str, int]]:
        stage = set(self.stage_nodes)
        allowed = self.overlap if overlap is None else overlap
        above = self.overlap_reverse if overlap is None else (reverse or frozenset())
        lifted = self.inplace_raise if raised is None else raised

        def inplace_ok(nd: Node) -> bool:
            return inplace_depthwise and (nd.name not in stage
                                          or nd.name in self.inplace_candidates)

        def plan(ok: frozenset[str], up: frozenset[str] = frozenset()
                 ) -> tuple[list[Buffer], set[str], dict[str, int]]:
            return schedule_buffers_overlap(
                self.graph, self.tensor_elements, self.lifetimes, bits, inplace_ok,
                self.fused_adds, (lambda nd: nd.name in ok) if ok else None,
                (lambda nd: nd.name in up) if up else None,
                self.stage_shift if self.split_tensor is not None else None,
                (lambda nd, b: self.raise_shift(nd, b) if nd.name in lifted else None)
                if lifted else None)

        buffers, inplace, shifts = plan(allowed, above)
        if overlap is None and shifts and any(b != 8 for b in (bits or {}).values()):
            # The overlaps were chosen at int8 (`choose_overlaps`: never a larger arena than
            # none there, so int8 needs no second plan); at other bits the greedy planner may
            # place the shifted pairs worse than separate buffers. Then the schedule runs
            # without them at these bits (the plan records what it uses: an empty set).
            plain = plan(frozenset())
            if plan_arena(plain[0]).size < plan_arena(buffers).size:
                buffers, inplace, shifts = plain
        return (buffers + self._line_buffer_list(bits or {}) + self._accumulator_list(),
                inplace, shifts)

    def stage_shift(self, node: Node, in_bits: int, out_bits: int) -> int | None:
        """D of a patch stage's convolution written below its dying input (vMCU inside the
        stage): the largest `memory.overlap_shift` over the patches, each with its own tile —
        the input view's origin inside the input's stored tile ((dy, dx), `node_offsets`; the
        stored width is the tile's), the view's extent, the effective pads (`node_pads`) and
        the output tile dense from byte 0 — rounded up to the arena alignment, at least one
        step. Every patch's buffers sit at the same offsets, so one D must hold for all.

        None where the stage cannot: a node after the stage (patch plans keep the layer-based
        rest without overlap), anything but a convolution (a stage's pooling may be the
        global pool's sums, and its channel-group forms are not checked against the order),
        a conv whose input is the graph input (stored whole and read by every patch) or
        whose output is the split tensor (stored whole, written tile by tile at its place
        in the map), and stages with line buffers (their output views start at the first
        row not kept, not at byte 0)."""
        key = (node.name, in_bits, out_bits, bool(self.cache))
        if key not in self._shifts:
            self._shifts[key] = self._stage_shift(node, in_bits, out_bits)
        return self._shifts[key]

    def _stage_shift(self, node: Node, in_bits: int, out_bits: int) -> int | None:
        if node.name not in set(self.stage_nodes) or self.cache or node.op != "conv2d":
            return None
        src, out = node.inputs[0], node.outputs[0]
        if src in self.graph.inputs or out == self.split_tensor:
            return None
        a = node.attrs
        kh, kw = node.weight.shape[1:3]
        c_in = self.graph.tensors[src].shape[3]
        c_out = self.graph.tensors[out].shape[3]
        regions, offsets, pads = self.regions, self.node_offsets, self.node_pads
        d = 0
        for i in range(self.n):
            for j in range(self.m):
                r_in, r_out = regions[src][i][j], regions[out][i][j]
                dy, dx = offsets[node.name][i][j][0]
                pt, pl = pads[node.name][i][j][:2]
                window = (a["strides"][0], a["strides"][1], pt, pl, int(kh), int(kw))
                d = max(d, overlap_shift((r_in.rows - dy, r_in.cols - dx, c_in),
                                         (r_out.rows, r_out.cols, c_out), window, in_bits,
                                         out_bits, 2, (dy, dx, r_in.cols)))
        # at least one alignment step: a kernel refuses an output at its input's very address
        # (a view starting inside its stored tile can need D = 0)
        return max(align_up(d), ALIGN)

    def raise_shift(self, node: Node, bits: int) -> int | None:
        """U of a stage's in-place depthwise written U bytes above its input tile's start
        (`memory.schedule_buffers_overlap`'s `raise_of`): its output tile is smaller than its
        input's by the halo rows, so it may end where the input's largest tile ends,

            U = ⌊(⌈E_in·b/8⌉ − ⌈E_out·b/8⌉) / L⌋ · L,  L = lcm(C·b/8, ALIGN),

        E the largest tile's elements. A multiple of the pixel's C·b/8 bytes keeps every
        output element of channel ch over input channel ch, which the in-place kernel has
        saved before it writes that channel (kernels/mpq_kernels.h, mpq_depthwise_inplace),
        whatever the offset; a multiple of ALIGN keeps the offset aligned. Then a convolution
        written below that output (`stage_shift`) stays inside the input's bytes instead of
        drifting the chain of tiles downward. None: not an in-place stage depthwise, a pixel
        not a whole number of bytes, or no room (U = 0)."""
        if node.name not in self.inplace_candidates:
            return None
        src, out = node.inputs[0], node.outputs[0]
        c = self.graph.tensors[src].shape[3]
        if c * bits % 8:
            return None
        unit = math.lcm(c * bits // 8, ALIGN)
        room = packed_bytes(self.tensor_elements[src], bits) \
            - packed_bytes(self.tensor_elements[out], bits)
        u = room // unit * unit
        return u if u > 0 else None

    def raise_record(self, bits: dict[str, int] | None, inplace: set[str]) -> dict[str, int]:
        """The plan's `schedule.inplace_raised`: each raised node that runs in place → its U
        at these bits (`raise_shift`; a node it gives none keeps its input's start)."""
        out = {}
        for name in sorted(self.inplace_raise & set(inplace)):
            nd = self.node_by_name[name]
            u = self.raise_shift(nd, (bits or {}).get(nd.inputs[0], 8))
            if u:
                out[name] = u
        return out

    def _accumulator_list(self) -> list[Buffer]:
        """A pooled stage's int32 sums (`accumulator`), alive over the whole stage."""
        if self.accumulator is None:
            return []
        name, size = self.accumulator
        return [Buffer(name, [Segment(name, 0, self.split_layer - 1, align_up(size))])]

    def _line_buffer_list(self, bits: dict[str, int]) -> list[Buffer]:
        """Each line buffer, alive over the whole stage (it carries rows from one patch to the
        next), at its map's bits: align16(⌈rows·cols·C·bits/8⌉)."""
        out = []
        for name, elements in self.line_buffers.items():
            t = name[len(LINE_PREFIX):]
            size = align_up(packed_bytes(elements, bits.get(t, 8)))
            out.append(Buffer(name, [Segment(name, 0, self.split_layer - 1, size)]))
        return out

    @cached_property
    def fused_adds(self) -> dict[str, tuple[str, str]]:
        """Residual adds fused into their conv (`memory.fused_residual_adds`); inside the patch
        stage only where the skip's region is the add's in every patch."""
        stage = set(self.stage_nodes)

        def same_region(a: str, b: str) -> bool:
            """`regions[a] == regions[b]`, from the spans (no Region built per patch)."""
            return all(s[a] == s[b] for s in self._rows.spans) \
                and all(s[a] == s[b] for s in self._cols.spans)

        def allowed(nd: Node) -> bool:
            if nd.name not in stage:
                return True
            if nd.outputs[0] == self.split_tensor:
                return False  # stored whole, while the skip is stored per patch
            return all(same_region(t, nd.outputs[0]) for t in nd.inputs)

        return fused_residual_adds(self.graph, self.tensor_elements, self.lifetimes, allowed)

    @cached_property
    def fused_conv_outputs(self) -> set[str]:
        """Conv outputs that never exist in memory (consumed by a fused residual add)."""
        convs = {conv for conv, _ in self.fused_adds.values()}
        return {nd.outputs[0] for nd in self.graph.nodes if nd.name in convs}

    def scratch_per_step(self, inplace: set[str]) -> list[int]:
        """Kernel scratch of each step given the in-place depthwise nodes.

        `memory.scratch_bytes` for nodes after the split, the largest over the patches
        (`stage_node_scratch`) for stage nodes.
        """
        out = []
        for i, nd in enumerate(self.graph.nodes):
            if i < self.split_layer and self._rows is not None and self._cols is not None:
                out.append(stage_node_scratch(
                    nd, self.graph, self._rows.reads[nd.name], self._cols.reads[nd.name],
                    self._rows.pads[nd.name], self._cols.pads[nd.name], nd.name in inplace))
            else:
                out.append(scratch_bytes(nd, self.graph, nd.name in inplace))
        return out

    def scratch_buffers(self, inplace: set[str], bits: dict[str, int] | None = None,
                        grown: Mapping[str, int] | None = None) -> list[Buffer]:
        """The kernel scratch as arena buffers of one step each (`memory.scratch_buffers`;
        a stage node's slot the largest over the patches, `scratch_per_step`; `grown`: slots
        sized for mpq_conv2d_unpacked, `grow_scratch`, layer-based) when the schedule keeps
        it in the arena (`scratch_in_arena`); else none."""
        if not self.scratch_in_arena:
            return []
        if self.split_tensor is None:
            return scratch_buffers(self.graph, inplace, self.fused_adds, bits, grown)
        slots = self.slot_bytes(inplace)
        stage = {nd.name: slots[i] for i, nd in enumerate(self.graph.nodes)
                 if i < self.split_layer}
        return scratch_buffers(self.graph, inplace, self.fused_adds, bits, None, stage)

    def slot_bytes(self, inplace: set[str]) -> list[int]:
        """Per step, the arena slot its kernel's scratch takes with the scratch in the arena
        (at int8 after the stage: `memory.step_scratch_bytes`). A stage node's is what mpq's
        own stage kernel asks for (`memory.kernel_scratch_bytes`; the export's stage calls
        never take CMSIS-NN, whose larger sizes `scratch_per_step` holds for the separate
        buffer): an in-place depthwise's padded plane of its largest patch (`plane_bytes`),
        else one im2col column — none for a 1×1 conv read in place."""
        out = []
        for i, nd in enumerate(self.graph.nodes):
            if i >= self.split_layer:
                out.append(step_scratch_bytes(nd, self.graph, nd.name in inplace))
            elif nd.name in inplace and nd.is_depthwise:
                out.append(self.plane_bytes(nd))
            else:
                out.append(kernel_scratch_bytes(nd, self.graph, False))
        return out

    def plane_bytes(self, nd: Node) -> int:
        """The largest padded input plane an in-place depthwise stage call saves over the
        patches — the kernel's (p_t + H + p_b)·(p_l + W + p_r), H×W its input *view*: the
        input tile from the node's offset in it (`node_offsets`) to the tile's end, which is
        larger than the node's own reads when another consumer of the tensor reads further
        (`memory.kernel_scratch_bytes`'s formula; the export sizes each call the same way)."""
        src, dst = nd.inputs[0], nd.outputs[0]
        worst = 0
        for i in range(self.n):
            for j in range(self.m):
                r_in, r_out = self.regions[src][i][j], self.computed_regions[dst][i][j]
                if r_out.rows == 0:
                    continue  # every row kept in a line buffer: the call is skipped
                dy, dx = self.node_offsets[nd.name][i][j][0]
                worst = max(worst, padded_plane_bytes(
                    nd, (r_in.rows - dy, r_in.cols - dx), (r_out.rows, r_out.cols),
                    self.node_pads[nd.name][i][j][:2]))
        return worst

    def grow_scratch(self, bits: dict[str, int] | None, needs: Mapping[str, int], limit: int,
                     accept: Callable[[dict[str, int], int], bool] | None = None
                     ) -> dict[str, int]:
        """The slots `memory.grow_scratch` grows to `needs` within an arena of `limit` bytes;
        none when the scratch is not in the arena or the schedule has a patch stage (its
        slots are the stage kernels', which have no unpacked form)."""
        if not self.scratch_in_arena or self.split_tensor is not None or not needs:
            return {}
        buffers, inplace, _ = self._buffers(bits, True)
        return grow_scratch(self.graph, buffers, inplace, self.fused_adds, bits, needs, limit,
                            accept)

    def memory(self, bits: dict[str, int] | None = None,
               inplace_depthwise: bool = True,
               grown: Mapping[str, int] | None = None) -> PatchMemory:
        """Arena (greedy planner), largest scratch and live bytes per step (DESIGN §5); with
        the scratch in the arena (`scratch_buffers`, `grown` slots) the separate scratch is
        0 B."""
        buffers, inplace, overlap = self._buffers(bits, inplace_depthwise)
        in_arena = self.scratch_buffers(inplace, bits, grown)
        buffers = buffers + in_arena
        plan = plan_arena(buffers)
        scratch = self.scratch_per_step(inplace)
        separate = 0 if self.scratch_in_arena else max(scratch, default=0)
        return PatchMemory(arena_bytes=plan.size, scratch_bytes=separate,
                           per_step_bytes=live_bytes_per_step(buffers, len(self.steps)),
                           per_step_scratch=scratch, plan=plan, inplace=inplace,
                           overlap=overlap)

    @property
    def scratch_in_arena(self) -> bool:
        """True when the kernel scratch is planned in the arena (`scratch_buffers`): asked
        for, and no line buffers (their stage calls' views depend on the rows kept, the
        export sizes those calls' scratch from them)."""
        return self.scratch == "arena" and not self.cache

    def peak_lower_bound(self, bits: dict[str, int] | None = None) -> int:
        """Largest live bytes over the steps + the largest scratch (the separate buffer), or,
        with the scratch in the arena, the largest live bytes + slot of one step
        (`slot_bytes`): the peak is never lower.

        (Buffers alive at the same step occupy disjoint addresses, so the arena holds at least
        their sum.)
        """
        buffers, inplace, _ = self._buffers(bits, True)
        live = live_bytes_per_step(buffers, len(self.steps))
        if self.scratch_in_arena:  # a step's slot is alive with that step's buffers only
            slots = self.slot_bytes(inplace)
            return max((a + align_up(b) for a, b in zip(live, slots, strict=True)), default=0)
        return max(live, default=0) + max(self.scratch_per_step(inplace), default=0)


def stage_node_scratch(nd: Node, graph: Graph, row_reads: list[list[Span]],
                       col_reads: list[list[Span]], row_pads: list[tuple[int, int]],
                       col_pads: list[tuple[int, int]], inplace: bool) -> int:
    """Largest `memory.scratch_bytes` of a stage node over the patches.

    Only an in-place depthwise conv's scratch depends on the patch: one padded input channel,
    (rows + t + b)·(cols + l + r) of the window it reads, largest for the patch row and the
    patch column with the longest padded window. Every other scratch (im2col, avgpool
    accumulators) depends on the kernel and channels only, or on whether a 1×1 conv pads at
    all, which the border patches do exactly when full inference does, so it is the full
    node's.
    """
    if not (inplace and nd.is_depthwise):
        return scratch_bytes(nd, graph, inplace)
    rows, (pt, pb) = max(((r[0][1] - r[0][0], p) for r, p in zip(row_reads, row_pads,
                                                                 strict=True)),
                         key=lambda g: g[0] + sum(g[1]))
    cols, (pl, pr) = max(((c[0][1] - c[0][0], p) for c, p in zip(col_reads, col_pads,
                                                                 strict=True)),
                         key=lambda g: g[0] + sum(g[1]))
    src = nd.inputs[0]
    sub = Graph(name="patch", tensors={src: Tensor(src, (1, rows, cols,
                                                         graph.tensors[src].shape[3]))},
                nodes=[], inputs=[], outputs=[])
    return scratch_bytes(dataclasses.replace(nd, attrs={**nd.attrs, "pads": (pt, pl, pb, pr)}),
                         sub, inplace)


def _lifetimes(graph: Graph, split_tensor: str | None, io: str = "external",
               split_layer: int = 0) -> dict[str, tuple[int, int]]:
    """(first, last) step of every non-input tensor; the split tensor starts at step 0. With
    `io` "arena" the graph input too, alive to the end of the stage at least (every patch
    reads it; `memory.input_lifetimes`)."""
    return layer_lifetimes(graph, {split_tensor: 0} if split_tensor is not None else None,
                           io=io, hold_input=max(split_layer - 1, 0))


def plan_patches(graph: Graph, split: PatchSplit | None, io: str = "external",
                 overlap: bool | Iterable[str] | Mapping[str, int] = False,
                 scratch: str = "separate",
                 raised: Iterable[str] = ()) -> PatchSchedule:
    """The patch schedule for `split` (None: the layer-based schedule). DESIGN §6. `io`:
    where the graph input and outputs live (`memory.IO_MODES`). `overlap`: True — outputs
    start inside their dying inputs where that lowers the int8 arena (`memory.choose_overlaps`;
    with a split, the stage's convolutions, below their input: `choose_stage_overlaps`); a set
    of node names — exactly those may, below their input; a mapping node → D (a plan's
    `schedule.overlap`) — those with D ≥ 0 below, those with D < 0 above their input in
    reverse row order (layer-based only). `scratch` (`memory.SCRATCH_MODES`): where the
    kernels' scratch lives (a schedule with line buffers keeps it separate:
    `PatchSchedule.scratch_in_arena`). `raised`: the stage's in-place depthwise nodes whose
    output starts above their input (a plan's `schedule.inplace_raised`); with `overlap`
    True they are chosen with the overlaps (`choose_stage_overlaps`).

    Raises MpqError naming the reason when the split is invalid or n does not fit the split
    tensor (1 ≤ n ≤ min(H, W)).
    """
    total = sum(node_macs(nd, graph) for nd in graph.nodes)
    check_scratch(scratch, "scratch")
    if split is None:
        sched = PatchSchedule(
            graph=graph, split_layer=0, n=1, stage_nodes=[], split_tensor=None,
            stage_macs_full=0, stage_macs_patched=0, total_macs=total,
            steps=[nd.name for nd in graph.nodes],
            tensor_elements={t: graph.tensors[t].size for t in graph.tensors},
            lifetimes=_lifetimes(graph, None, io), inplace_candidates=set(), io=io,
            scratch=scratch)

        def arena_of(below: frozenset[str], above: frozenset[str]) -> int:
            bufs, inplace, _ = sched._buffers(None, True, below, above)
            return plan_arena(bufs + sched.scratch_buffers(inplace)).size

        if overlap is True:
            every = frozenset(nd.name for nd in graph.nodes)
            sched.overlap, sched.overlap_reverse = choose_overlaps(
                arena_of,
                sched._buffers(None, True, every)[2],
                sched._buffers(None, True, frozenset(), every)[2],
                [nd.name for nd in graph.nodes])
        elif isinstance(overlap, Mapping):  # a plan's record: D < 0 — above, rows reversed
            sched.overlap = frozenset(n for n, d in overlap.items() if d >= 0)
            sched.overlap_reverse = frozenset(n for n, d in overlap.items() if d < 0)
        elif overlap is not False:
            sched.overlap = frozenset(overlap)
        return sched
    sched = _plan(graph, split.split_layer, split.n, _index(graph), total, io, split.cache,
                  split.cols)
    sched.scratch = scratch
    sched.inplace_raise = frozenset(raised)
    if overlap is True:
        sched.overlap, sched.inplace_raise = choose_stage_overlaps(sched)
    elif isinstance(overlap, Mapping):
        # a stage never writes above its input (rows reversed are a layer call's form): a
        # recorded D < 0 is dropped here, so the plan check's recomputation refuses it
        sched.overlap = frozenset(n for n, d in overlap.items() if d >= 0)
    elif overlap is not False:
        sched.overlap = frozenset(overlap)
    return sched


def choose_stage_overlaps(sched: PatchSchedule, low: dict[str, int] | None = None
                          ) -> tuple[frozenset[str], frozenset[str]]:
    """(the stage convolutions a patch schedule writes below their dying input
    (`PatchSchedule.stage_shift`), the in-place depthwise nodes whose output it raises
    (`PatchSchedule.raise_shift`)): `memory.choose_overlaps`' passes (written below only) with
    no depthwise raised and with all raised, the one with the smaller int8 arena (ties: the
    smaller arena at `low`, the search's floor bits, when given; then fewer nodes), then each
    raised node dropped where that is no larger. None when nothing lowers the arena.

    KWS's pooled stage at int8: every pointwise convolution written 128 B below the in-place
    depthwise before it drifts the chain of tiles 256 B below the first tile; with each
    depthwise output ending where its input's tile ends, the chain stays inside it (176 B less
    arena). The Fashion example's 11-layer 7×7 stage: at int8 its arena is the last block's
    expansion after the stage, so no overlap changes it, but with that block below 8 bits the
    stage's expanding pointwise convolution written over its input saves 1,808 B (the tie-break
    at the floor bits keeps it)."""
    every = frozenset(sched.stage_nodes)
    eligible = sched._buffers(None, True, every, None, frozenset())[2]
    liftable = frozenset(n for n in sched.stage_nodes
                         if sched.raise_shift(sched.node_by_name[n], 8) is not None)
    if not eligible and not liftable:
        return frozenset(), frozenset()

    def arena_of(below: frozenset[str], raised: frozenset[str]) -> tuple[int, ...]:
        sizes = []
        for bits in (None, low) if low else (None,):
            bufs, inplace, _ = sched._buffers(bits, True, below, None, raised)
            sizes.append(plan_arena(bufs + sched.scratch_buffers(inplace, bits)).size)
        return tuple(sizes)

    none = arena_of(frozenset(), frozenset())
    options = []
    for raised in dict.fromkeys([frozenset(), liftable]):
        below = choose_overlaps(lambda b, _a, r=raised: arena_of(b, r), eligible, (),
                                sched.stage_nodes)[0] if eligible else frozenset()
        options.append((arena_of(below, raised), len(below) + len(raised), below, raised))
    size, _, below, raised = min(options, key=lambda o: o[:2])
    for name in [n for n in sched.stage_nodes if n in raised]:
        trial = arena_of(below, raised - {name})
        if trial <= size:
            raised, size = raised - {name}, trial
    if size >= none:
        return frozenset(), frozenset()
    return below, raised


def _plan(graph: Graph, k: int, n: int, index: _GraphIndex, total: int,
          io: str = "external", cache: bool | frozenset[str] = False,
          m: int | None = None) -> PatchSchedule:
    """`plan_patches` for a split at layer k with n×m patches (m None: n), given the graph's
    index; with `cache`, line buffers keep the rows vertically adjacent patches share
    (`cache_rows`)."""
    problem = split_problem(graph, k, index)
    if problem is not None:
        raise MpqError(f"patch split at layer {k} is invalid: {problem}")
    stage = graph.nodes[:k]
    split_tensor = stage[-1].outputs[0]
    pooled = global_pool_problem(stage[-1], graph) is None
    tiled = stage[-1].inputs[0] if pooled else split_tensor
    _, h, w, _ = graph.tensors[tiled].shape
    if m is None:
        if not 1 <= n <= min(h, w):
            raise MpqError(f"patch split at layer {k}: n = {n} patches per side does not fit "
                           f"the {h}×{w} split tensor '{tiled}' (1 ≤ n ≤ {min(h, w)})")
        m = n
    elif not (1 <= n <= h and 1 <= m <= w):
        raise MpqError(f"patch split at layer {k}: a {n}×{m} grid does not fit the {h}×{w} "
                       f"tensor '{tiled}' (1 ≤ rows ≤ {h}, 1 ≤ columns ≤ {w})")
    rows = _axis_pass(graph, stage, tiled, 0, n, pooled)
    cols = _axis_pass(graph, stage, tiled, 1, m, pooled)

    elements = {t: graph.tensors[t].size for t in graph.tensors}
    full_macs = patched = 0
    inplace_ok: set[str] = set()
    for nd in stage:
        full_macs += node_macs(nd, graph)
        t = nd.outputs[0]
        r = [s[t][1] - s[t][0] for s in rows.spans]
        c = [s[t][1] - s[t][0] for s in cols.spans]
        if nd.op == "conv2d":
            cout, kh, kw, cin_g = nd.weight.shape
            patched += int(cout * kh * kw * cin_g) * sum(r) * sum(c)
        if t != split_tensor:
            elements[t] = max(r) * max(c) * graph.tensors[t].shape[3]
        # The split tensor is stored whole (each patch writes its tile), so the node that
        # makes it cannot write over its per-patch input.
        if nd.is_depthwise and nd.inputs[0] not in graph.inputs and t != split_tensor:
            src = nd.inputs[0]
            rs = [s[src][1] - s[src][0] for s in rows.spans]
            cs = [s[src][1] - s[src][0] for s in cols.spans]
            if all(r[i] * c[j] <= rs[i] * cs[j] for i in range(n) for j in range(m)):
                inplace_ok.add(nd.name)

    sched = PatchSchedule(
        graph=graph, split_layer=k, n=n, stage_nodes=[nd.name for nd in stage],
        split_tensor=split_tensor, stage_macs_full=full_macs, stage_macs_patched=patched,
        total_macs=total, steps=[nd.name for nd in graph.nodes], tensor_elements=elements,
        # a pooled stage writes its 1×1 output once, after the last patch: from the pool's step
        lifetimes=_lifetimes(graph, None if pooled else split_tensor, io, k),
        inplace_candidates=inplace_ok, io=io, stage_macs_recomputed=patched,
        m=m, pool_input=tiled if pooled else None, _rows=rows, _cols=cols)
    if sched.accumulator is not None:  # its bytes, as a fixed 8-bit "tensor" of the arena
        name, size = sched.accumulator
        if name in graph.tensors:
            raise MpqError(f"patch stage: the model has a tensor named '{name}'")
        sched.tensor_elements[name] = size
    if cache is not False:
        _add_line_buffers(sched, stage, None if cache is True else frozenset(cache))
    return sched


def cacheable_maps(sched: PatchSchedule) -> dict[str, str]:
    """Stored stage map -> the node whose call computes it, for maps vertically adjacent
    patches share rows of: not the split tensor (its tiles do not overlap), not a fused conv's
    output (it never exists: its add's output is the map kept, computed by the conv)."""
    by_name = {nd.name: nd for nd in sched.graph.nodes}
    never = sched.fused_conv_outputs | {sched.split_tensor}
    out = {}
    for name in sched.stage_nodes:
        nd = by_name[name]
        t = nd.outputs[0]
        if t in never or sched._rows is None:
            continue
        spans = [s[t] for s in sched._rows.spans]
        if max(kept_rows(spans, i) for i in range(sched.n)) > 0:
            out[t] = sched.fused_adds[name][0] if name in sched.fused_adds else name
    return out


def _add_line_buffers(sched: PatchSchedule, stage: list[Node],
                      maps: frozenset[str] | None) -> None:
    """Turn `sched` (halos recomputed) into its line-buffer form for `maps` (None: every
    `cacheable_maps` map); a fused conv computes its add's rows, so it follows the add."""
    cacheable = cacheable_maps(sched)
    chosen = set(cacheable) if maps is None else set(maps)
    unknown = sorted(chosen - set(cacheable))
    if unknown:
        raise MpqError(f"patch line buffer: '{unknown[0]}' is not a stage map that patches "
                       "share rows of")
    if not chosen:
        return
    by_name = {nd.name: nd for nd in sched.graph.nodes}
    rows_maps = chosen | {by_name[cacheable[t]].outputs[0] for t in chosen}
    assert sched._rows is not None and sched._cols is not None
    rows = cache_rows(sched.graph, stage, sched._rows, rows_maps)
    sched._rows = rows
    sched.cache = True
    sched.stage_macs_patched = stage_macs(stage, rows.computed or rows.spans, sched._cols.spans)
    for t in sorted(chosen, key=list(cacheable).index):
        sched.line_rows[t] = max(kept_rows([s[t] for s in rows.spans], i)
                                 for i in range(sched.n))
    for name, size in sched.line_buffers.items():
        if name in sched.graph.tensors:
            raise MpqError(f"patch line buffer: the model has a tensor named '{name}'")
        sched.tensor_elements[name] = size


# --------------------------------------------------------------------------------------------
# Search (DESIGN §6: choose (k, n) by search, not by hand)
# --------------------------------------------------------------------------------------------


def search_patches(graph: Graph, n_choices: Iterable[int] = N_CHOICES,
                   max_overhead: float | None = None,
                   bits: dict[str, int] | None = None, io: str = "external",
                   cache: bool | None = False, scratch: str = "separate"
                   ) -> PatchSchedule | None:
    """The valid (k, n) schedule with the lowest peak SRAM, or None if none beats layer-based.

    Ties go to fewer redundant MACs, then smaller k, then smaller n, then recomputed halos
    before line buffers. `cache`: False recomputes every halo (MCUNetV2), True caches rows
    (`cache_rows`), None tries both for every (k, n) — line buffers win when their peak is as
    low and they save MACs — and then, if halos recomputed won, line buffers for the maps that
    fit under its peak (`cache_within_peak`). `scratch`: where the candidates keep the
    kernels' scratch (`memory.SCRATCH_MODES`). With `max_overhead`, only
    schedules with redundant MACs ≤ max_overhead · total MACs are considered. Branch and bound:
    candidates are visited in order of a lower bound on their peak (live bytes per step +
    scratch), so the arena planner runs only for the few that can still win.
    """
    baseline = layer_memory(graph, bits, io=io).peak_sram_bytes
    cands: list[tuple[tuple[int, int, int, int], PatchSchedule]] = []
    index = _index(graph)
    total = sum(node_macs(nd, graph) for nd in graph.nodes)
    for k in range(1, len(graph.nodes)):
        if split_problem(graph, k, index) is not None:
            continue
        _, h, w, _ = graph.tensors[graph.nodes[k - 1].outputs[0]].shape
        for n in sorted(set(n_choices)):
            if not 2 <= n <= min(h, w):
                continue
            for c in ((False, True) if cache is None else (cache,)):
                sched = _plan(graph, k, n, index, total, io, c)
                sched.scratch = scratch
                if max_overhead is not None \
                        and sched.redundant_macs > max_overhead * sched.total_macs:
                    continue
                key = (sched.peak_lower_bound(bits), sched.redundant_macs, k, n, int(c))
                cands.append((key, sched))
    cands.sort(key=lambda c: c[0])
    best: tuple[int, int, int, int, int] | None = None
    best_sched = None
    for key, sched in cands:
        if best is not None and key > best:
            break
        peak = sched.memory(bits).peak_sram_bytes
        full_key = (peak, sched.redundant_macs, sched.split_layer, sched.n, int(sched.cache))
        if best is None or full_key < best:
            best, best_sched = full_key, sched
    if best is None or best[0] >= baseline:
        return None
    if cache is None and best_sched is not None and not best_sched.cache:
        # line buffers for the maps that fit under the winner's peak: fewer MACs, same peak
        cached = cache_within_peak(best_sched, bits)
        if cached is not None and cached.redundant_macs < best_sched.redundant_macs:
            return cached
    return best_sched


def pooled_splits(graph: Graph) -> list[PatchSplit]:
    """The rows-only splits of a stage ending in a global average pool (`global_pool_problem`):
    one, two and four rows of the pool's input per patch (n = H, ⌈H/2⌉, ⌈H/4⌉ patches, each
    the whole width; at least 2), halos recomputed — line buffers would hold a deep stage's
    whole halo per map. Square grids of the same split are `search_patches`'s."""
    index = _index(graph)
    k = index.first_nonlocal + 1
    if k >= len(graph.nodes) or split_problem(graph, k, index) is not None:
        return []
    if global_pool_problem(graph.nodes[k - 1], graph) is not None:
        return []
    h = graph.tensors[graph.nodes[k - 1].inputs[0]].shape[1]
    return [PatchSplit(k, n, False, 1) for n in sorted({h, -(-h // 2), -(-h // 4)}, reverse=True)
            if n >= 2]


def plan_split(patch: dict) -> PatchSplit:
    """The PatchSplit a plan's `patch` record names: (split_layer, n, cols) and, with `cache`,
    the maps its line buffers keep."""
    c = patch.get("cache")
    maps: bool | frozenset[str] = False
    if c is not None:
        maps = frozenset(str(b["tensor"]) for b in c["line_buffers"])
    cols = patch.get("cols")
    return PatchSplit(int(patch["split_layer"]), int(patch["n"]), maps,
                      None if cols is None else int(cols))


def map_savings(sched: PatchSchedule) -> dict[str, int]:
    """MACs each cacheable map's line buffer saves on `sched`'s split: its producing conv's
    Cout·KH·KW·Cin/groups · Σ_i kept rows · Σ_j columns (0 for pools and element-wise ops)."""
    full = plan_patches(sched.graph, PatchSplit(sched.split_layer, sched.n, True, sched.m),
                        sched.io)
    by_name = {nd.name: nd for nd in sched.graph.nodes}
    assert full._rows is not None and full._rows.computed is not None and full._cols is not None
    out = {}
    for t, producer in cacheable_maps(full).items():
        nd = by_name[producer]
        if nd.op != "conv2d":
            out[t] = 0
            continue
        c = nd.outputs[0]
        cout, kh, kw, cin_g = nd.weight.shape
        kept = sum((s[c][1] - s[c][0]) - (m[c][1] - m[c][0])
                   for s, m in zip(full._rows.spans, full._rows.computed, strict=True))
        out[t] = int(cout * kh * kw * cin_g) * kept * sum(s[c][1] - s[c][0]
                                                          for s in full._cols.spans)
    return out


def cache_within_peak(sched: PatchSchedule, bits: dict[str, int] | None = None,
                      peak: int | None = None) -> PatchSchedule | None:
    """The line-buffer form of `sched`'s split whose peak SRAM stays ≤ `peak` (default: the
    recomputing schedule's own): every map if that fits, else maps added greedily by MACs
    saved per line-buffer byte (`map_savings`), each kept only if the planned peak stays
    within. None when no map fits or none saves MACs."""
    limit = sched.memory(bits).peak_sram_bytes if peak is None else peak
    g, k, n = sched.graph, sched.split_layer, sched.n
    full = plan_patches(g, PatchSplit(k, n, True, sched.m), sched.io)
    if not full.line_rows:
        return None
    if full.memory(bits).peak_sram_bytes <= limit:
        return full
    saved = map_savings(sched)
    size = {b.name[len(LINE_PREFIX):]: b.size for b in full._line_buffer_list(bits or {})}
    order = sorted((t for t in full.line_rows if saved.get(t, 0) > 0),
                   key=lambda t: (-saved[t] / size[t], t))
    chosen: list[str] = []
    best = None
    for t in order:
        trial = plan_patches(g, PatchSplit(k, n, frozenset([*chosen, t]), sched.m), sched.io)
        if trial.memory(bits).peak_sram_bytes <= limit:
            chosen.append(t)
            best = trial
    return best


# --------------------------------------------------------------------------------------------
# Float execution of the patch stage (checks the regions; export mirrors it)
# --------------------------------------------------------------------------------------------


def run_patch_stage(schedule: PatchSchedule, feeds: dict[str, np.ndarray]) -> np.ndarray:
    """Run the stage patch by patch in float and stitch the split tensor (batch, NHWC).

    Each branch starts from the graph input's region, runs every stage node on the window it
    reads (offset inside the input's region, effective pads at image borders, as in firmware)
    with the IR interpreter's kernels, and writes its tile into the split tensor. With line
    buffers (`cache_rows`) the patches run in `patch_order`, each node computes only its
    computed rows, and the rest of each map's region comes from the strip the patch above
    saved (rows nobody provides are NaN, so a wrong geometry cannot pass unnoticed). A pooled
    stage (`global_pool_problem`) sums each patch's tile of the pool's input and divides the
    sums by H·W after the last patch.
    """
    from mpq.interpreter import OPS

    g = schedule.graph
    if schedule.split_tensor is None:
        raise MpqError("the layer-based schedule has no patch stage")
    by_name = {nd.name: nd for nd in g.nodes}
    batch = next(iter(feeds.values())).shape[0]
    split = schedule.split_tensor
    tiled = schedule.tile_tensor
    out = np.zeros((batch, *g.tensors[tiled].shape[1:]), np.float32)
    pooled = schedule.pool_input is not None
    sums = np.zeros((batch, 1, 1, g.tensors[split].shape[3]), np.float64)
    stage = schedule.stage_nodes[:-1] if pooled else schedule.stage_nodes
    lines: dict[str, np.ndarray] = {}
    for i, j in schedule.patch_order:
        env: dict[str, np.ndarray] = {}
        for name in g.inputs:
            if name in schedule.regions:
                r = schedule.regions[name][i][j]
                env[name] = feeds[name][:, r.y0:r.y1, r.x0:r.x1]
        for name in stage:
            nd = by_name[name]
            t = nd.outputs[0]
            r = schedule.computed_regions[t][i][j]
            shape = (batch, r.rows, r.cols, g.tensors[t].shape[3])
            if r.rows == 0:
                y = np.zeros(shape, np.float32)
            else:
                xs = [window_of(env[x], off, nd, r, schedule.node_pads[name][i][j])
                      for x, off in zip(nd.inputs, schedule.node_offsets[name][i][j],
                                        strict=True)]
                node = nd
                if nd.op in ("conv2d", "max_pool", "avg_pool"):
                    node = dataclasses.replace(
                        nd, attrs={**nd.attrs, "pads": schedule.node_pads[name][i][j]})
                y = OPS[nd.op].run(node, xs, shape).astype(np.float32)
            stored = schedule.regions[t][i][j]
            full = np.full((batch, stored.rows, stored.cols, shape[3]), np.nan, np.float32)
            full[:, r.y0 - stored.y0:r.y1 - stored.y0] = y
            restore, start, save = schedule.line_copies(t, i)
            if restore:
                full[:, :restore] = lines[t][:, :restore]
            if save:
                lines[t] = full[:, start:start + save].copy()
            env[t] = full
        r = schedule.regions[tiled][i][j]
        if pooled:
            sums += env[tiled].sum(axis=(1, 2), keepdims=True, dtype=np.float64)
        out[:, r.y0:r.y1, r.x0:r.x1] = env[tiled]
    if pooled:
        if np.isnan(out).any():
            raise MpqError("patch stage: a tile of the pooled map was never computed")
        _, h, w, _ = g.tensors[tiled].shape
        return (sums / (h * w)).astype(np.float32)
    return out


def window_of(x: np.ndarray, offset: tuple[int, int], node: Node, out: Region,
              pads: Pads) -> np.ndarray:
    """The part of an input region a stage node reads for output rectangle `out`.

    conv/pool: ((rows−1)·s + d·(k−1) + 1 − t − b) rows from the offset (same for columns);
    add/concat: the output's rows × cols.
    """
    dy, dx = offset
    if node.op in ("conv2d", "max_pool", "avg_pool"):
        (kh, kw), (sh, sw), (dh, dw), _ = window_params(node)
        t, left, b, r = pads
        rows = (out.rows - 1) * sh + dh * (kh - 1) + 1 - t - b
        cols = (out.cols - 1) * sw + dw * (kw - 1) + 1 - left - r
    else:
        rows, cols = out.rows, out.cols
    win = x[:, dy:dy + rows, dx:dx + cols]
    if dy < 0 or dx < 0 or win.shape[1:3] != (rows, cols):
        raise MpqError(f"node '{node.name}': window {rows}×{cols} at ({dy}, {dx}) does not lie "
                       f"inside its {x.shape[1]}×{x.shape[2]} input region")
    return win


__all__ = [
    "ACC_PREFIX", "LINE_PREFIX", "N_CHOICES", "PatchMemory", "PatchSchedule", "PatchSplit",
    "Region", "cache_rows", "cache_within_peak", "cacheable_maps", "cached_span",
    "global_pool_problem", "grid_spans", "hull", "kept_rows", "live_bytes_per_step",
    "locality_problem", "map_savings", "patch_conv_macs", "plan_patches", "plan_split",
    "pooled_splits", "run_patch_stage", "search_patches", "split_problem", "stage_macs",
    "stage_node_scratch", "valid_splits", "window_of", "window_params", "window_span",
]
