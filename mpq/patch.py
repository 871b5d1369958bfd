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
Peak SRAM = arena + the largest kernel scratch (`memory.scratch_bytes`, on per-patch shapes for
stage nodes).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from dataclasses import dataclass, field
from functools import cached_property

import numpy as np

from mpq.errors import MpqError
from mpq.ir import Graph, Node, Tensor, node_macs
from mpq.memory import (
    ArenaPlan,
    Buffer,
    choose_overlaps,
    fused_residual_adds,
    layer_lifetimes,
    layer_memory,
    live_bytes_per_step,
    plan_arena,
    schedule_buffers_overlap,
    scratch_bytes,
)

Span = tuple[int, int]  # [lo, hi) along one axis
Pads = tuple[int, int, int, int]  # (top, left, bottom, right), the IR's order

N_CHOICES = (2, 3, 4, 5, 6, 8)


@dataclass(frozen=True)
class PatchSplit:
    """A patch schedule's parameters: the first `split_layer` nodes run per patch, n×n patches."""

    split_layer: int
    n: int


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
    output); the split tensor is rank 4 with H, W ≥ 2; every stage op is spatially local.
    """
    index = index or _index(graph)
    if not 1 <= k < len(graph.nodes):
        return f"split layer {k} is outside 1..{len(graph.nodes) - 1}"
    if k > index.first_nonlocal:
        return index.nonlocal_reason
    stage = graph.nodes[:k]
    split = stage[-1].outputs[0]
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
            if t == split:
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


def _axis_pass(graph: Graph, stage: list[Node], split: str, axis: int, n: int) -> _AxisPlan:
    """Walk the stage backwards from each tile along `axis` (0 rows, 1 columns), DESIGN §6."""
    size = graph.tensors[split].shape[1 + axis]
    spans: list[dict[str, Span]] = []
    pads: dict[str, list[tuple[int, int]]] = {nd.name: [] for nd in stage}
    reads: dict[str, list[list[Span]]] = {nd.name: [] for nd in stage}
    for tile in grid_spans(size, n):
        need: dict[str, Span] = {split: tile}
        for nd in reversed(stage):
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
    # Nodes whose output may start inside their dying input (`memory.choose_overlaps`;
    # layer-based schedules only: the patch stage's kernels write per patch)
    overlap: frozenset[str] = frozenset()
    _rows: _AxisPlan | None = field(default=None, repr=False, compare=False)
    _cols: _AxisPlan | None = field(default=None, repr=False, compare=False)

    # -- MACs (DESIGN §6) ------------------------------------------------------------------
    @property
    def redundant_macs(self) -> int:
        """MACs recomputed in patch overlaps: Σ_patches stage MACs − the stage's full MACs."""
        return self.stage_macs_patched - self.stage_macs_full

    @property
    def redundant_macs_percent(self) -> float:
        """Redundant MACs as a percentage of the whole network's MACs."""
        return 100.0 * self.redundant_macs / self.total_macs if self.total_macs else 0.0

    # -- regions ---------------------------------------------------------------------------
    @cached_property
    def regions(self) -> dict[str, list[list[Region]]]:
        """tensor → [i][j] rectangle patch (i, j) computes (the graph input: what it reads)."""
        if self._rows is None or self._cols is None:
            return {}
        rows, cols = self._rows.spans, self._cols.spans
        return {t: [[Region(*rows[i][t], *cols[j][t]) for j in range(self.n)]
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
                      for j in range(self.n)] for i in range(self.n)] for nd in self.stage_nodes}

    @cached_property
    def node_offsets(self) -> dict[str, list[list[list[tuple[int, int]]]]]:
        """node → [i][j] → per input, (dy, dx) of the read window inside that input's region.

        A tensor read by several stage nodes holds the bounding box of their requests, so a
        node may start reading below/right of its input buffer's origin.
        """
        if self._rows is None or self._cols is None:
            return {}
        out: dict[str, list[list[list[tuple[int, int]]]]] = {}
        by_name = {nd.name: nd for nd in self.graph.nodes}
        for name in self.stage_nodes:
            ins = by_name[name].inputs
            rr, cr = self._rows.reads[name], self._cols.reads[name]
            rs, cs = self._rows.spans, self._cols.spans
            out[name] = [[[(rr[i][q][0] - rs[i][t][0], cr[j][q][0] - cs[j][t][0])
                           for q, t in enumerate(ins)] for j in range(self.n)]
                         for i in range(self.n)]
        return out

    @property
    def tiles(self) -> list[list[Region]]:
        """[i][j] tile of the split tensor (the rectangle patch (i, j) writes)."""
        return self.regions[self.split_tensor] if self.split_tensor else []

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
                 overlap: frozenset[str] | None = None
                 ) -> tuple[list[Buffer], set[str], dict[str, int]]:
        stage = set(self.stage_nodes)
        allowed = self.overlap if overlap is None else overlap

        def inplace_ok(nd: Node) -> bool:
            return inplace_depthwise and (nd.name not in stage
                                          or nd.name in self.inplace_candidates)

        return schedule_buffers_overlap(
            self.graph, self.tensor_elements, self.lifetimes, bits, inplace_ok,
            self.fused_adds, (lambda nd: nd.name in allowed) if allowed else None)

    @cached_property
    def fused_adds(self) -> dict[str, tuple[str, str]]:
        """Residual adds fused into their conv (`memory.fused_residual_adds`); inside the patch
        stage only where the skip's region is the add's in every patch."""
        regions = self.regions
        stage = set(self.stage_nodes)

        def allowed(nd: Node) -> bool:
            if nd.name not in stage:
                return True
            if nd.outputs[0] == self.split_tensor:
                return False  # stored whole, while the skip is stored per patch
            out = regions[nd.outputs[0]]
            return all(regions[t] == out for t in nd.inputs)

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

    def memory(self, bits: dict[str, int] | None = None,
               inplace_depthwise: bool = True) -> PatchMemory:
        """Arena (greedy planner), largest scratch and live bytes per step (DESIGN §5)."""
        buffers, inplace, overlap = self._buffers(bits, inplace_depthwise)
        plan = plan_arena(buffers)
        scratch = self.scratch_per_step(inplace)
        return PatchMemory(arena_bytes=plan.size, scratch_bytes=max(scratch, default=0),
                           per_step_bytes=live_bytes_per_step(buffers, len(self.steps)),
                           per_step_scratch=scratch, plan=plan, inplace=inplace,
                           overlap=overlap)

    def peak_lower_bound(self, bits: dict[str, int] | None = None) -> int:
        """Largest live bytes over the steps + the largest scratch: the peak is never lower.

        (Buffers alive at the same step occupy disjoint addresses, so the arena holds at least
        their sum.)
        """
        buffers, inplace, _ = self._buffers(bits, True)
        return max(live_bytes_per_step(buffers, len(self.steps)), default=0) \
            + max(self.scratch_per_step(inplace), default=0)


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
                 overlap: bool | Iterable[str] = False) -> PatchSchedule:
    """The patch schedule for `split` (None: the layer-based schedule). DESIGN §6. `io`:
    where the graph input and outputs live (`memory.IO_MODES`). `overlap` (layer-based only):
    True — outputs start inside their dying inputs where that lowers the int8 arena
    (`memory.choose_overlaps`); a set of node names — exactly those may (a plan's record).

    Raises MpqError naming the reason when the split is invalid or n does not fit the split
    tensor (1 ≤ n ≤ min(H, W)).
    """
    total = sum(node_macs(nd, graph) for nd in graph.nodes)
    if split is None:
        sched = PatchSchedule(
            graph=graph, split_layer=0, n=1, stage_nodes=[], split_tensor=None,
            stage_macs_full=0, stage_macs_patched=0, total_macs=total,
            steps=[nd.name for nd in graph.nodes],
            tensor_elements={t: graph.tensors[t].size for t in graph.tensors},
            lifetimes=_lifetimes(graph, None, io), inplace_candidates=set(), io=io)
        if overlap is True:
            sched.overlap = choose_overlaps(
                lambda allowed: plan_arena(sched._buffers(None, True, allowed)[0]).size,
                sched._buffers(None, True, frozenset(nd.name for nd in graph.nodes))[2])
        elif overlap is not False:
            sched.overlap = frozenset(overlap)
        return sched
    return _plan(graph, split.split_layer, split.n, _index(graph), total, io)


def _plan(graph: Graph, k: int, n: int, index: _GraphIndex, total: int,
          io: str = "external") -> PatchSchedule:
    """`plan_patches` for a split at layer k with n×n patches, given the graph's index."""
    problem = split_problem(graph, k, index)
    if problem is not None:
        raise MpqError(f"patch split at layer {k} is invalid: {problem}")
    stage = graph.nodes[:k]
    split_tensor = stage[-1].outputs[0]
    _, h, w, _ = graph.tensors[split_tensor].shape
    if not 1 <= n <= min(h, w):
        raise MpqError(f"patch split at layer {k}: n = {n} patches per side does not fit the "
                       f"{h}×{w} split tensor '{split_tensor}' (1 ≤ n ≤ {min(h, w)})")
    rows = _axis_pass(graph, stage, split_tensor, 0, n)
    cols = _axis_pass(graph, stage, split_tensor, 1, n)

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
            if all(r[i] * c[j] <= rs[i] * cs[j] for i in range(n) for j in range(n)):
                inplace_ok.add(nd.name)

    return PatchSchedule(
        graph=graph, split_layer=k, n=n, stage_nodes=[nd.name for nd in stage],
        split_tensor=split_tensor, stage_macs_full=full_macs, stage_macs_patched=patched,
        total_macs=total, steps=[nd.name for nd in graph.nodes], tensor_elements=elements,
        lifetimes=_lifetimes(graph, split_tensor, io, k),
        inplace_candidates=inplace_ok, io=io, _rows=rows, _cols=cols)


# --------------------------------------------------------------------------------------------
# Search (DESIGN §6: choose (k, n) by search, not by hand)
# --------------------------------------------------------------------------------------------


def search_patches(graph: Graph, n_choices: Iterable[int] = N_CHOICES,
                   max_overhead: float | None = None,
                   bits: dict[str, int] | None = None, io: str = "external"
                   ) -> PatchSchedule | None:
    """The valid (k, n) schedule with the lowest peak SRAM, or None if none beats layer-based.

    Ties go to fewer redundant MACs, then smaller k, then smaller n. With `max_overhead`, only
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
            sched = _plan(graph, k, n, index, total, io)
            if max_overhead is not None \
                    and sched.redundant_macs > max_overhead * sched.total_macs:
                continue
            key = (sched.peak_lower_bound(bits), sched.redundant_macs, k, n)
            cands.append((key, sched))
    cands.sort(key=lambda c: c[0])
    best: tuple[int, int, int, int] | None = None
    best_sched = None
    for key, sched in cands:
        if best is not None and key > best:
            break
        peak = sched.memory(bits).peak_sram_bytes
        full_key = (peak, sched.redundant_macs, sched.split_layer, sched.n)
        if best is None or full_key < best:
            best, best_sched = full_key, sched
    if best is None or best[0] >= baseline:
        return None
    return best_sched


# --------------------------------------------------------------------------------------------
# Float execution of the patch stage (checks the regions; export mirrors it)
# --------------------------------------------------------------------------------------------


def run_patch_stage(schedule: PatchSchedule, feeds: dict[str, np.ndarray]) -> np.ndarray:
    """Run the stage patch by patch in float and stitch the split tensor (batch, NHWC).

    Each branch starts from the graph input's region, runs every stage node on the window it
    reads (offset inside the input's region, effective pads at image borders, as in firmware)
    with the IR interpreter's kernels, and writes its tile into the split tensor.
    """
    from mpq.interpreter import OPS

    g = schedule.graph
    if schedule.split_tensor is None:
        raise MpqError("the layer-based schedule has no patch stage")
    by_name = {nd.name: nd for nd in g.nodes}
    batch = next(iter(feeds.values())).shape[0]
    split = schedule.split_tensor
    out = np.zeros((batch, *g.tensors[split].shape[1:]), np.float32)
    for i in range(schedule.n):
        for j in range(schedule.n):
            env: dict[str, np.ndarray] = {}
            for name in g.inputs:
                if name in schedule.regions:
                    r = schedule.regions[name][i][j]
                    env[name] = feeds[name][:, r.y0:r.y1, r.x0:r.x1]
            for name in schedule.stage_nodes:
                nd = by_name[name]
                r = schedule.regions[nd.outputs[0]][i][j]
                shape = (batch, r.rows, r.cols, g.tensors[nd.outputs[0]].shape[3])
                xs = [window_of(env[t], off, nd, r, schedule.node_pads[name][i][j])
                      for t, off in zip(nd.inputs, schedule.node_offsets[name][i][j],
                                        strict=True)]
                node = nd
                if nd.op in ("conv2d", "max_pool", "avg_pool"):
                    node = dataclasses.replace(
                        nd, attrs={**nd.attrs, "pads": schedule.node_pads[name][i][j]})
                env[nd.outputs[0]] = OPS[nd.op].run(node, xs, shape).astype(np.float32)
            r = schedule.regions[split][i][j]
            out[:, r.y0:r.y1, r.x0:r.x1] = env[split]
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
    "N_CHOICES", "PatchMemory", "PatchSchedule", "PatchSplit", "Region", "grid_spans",
    "hull", "live_bytes_per_step", "locality_problem", "patch_conv_macs", "plan_patches",
    "run_patch_stage", "search_patches", "split_problem", "stage_node_scratch", "valid_splits",
    "window_of", "window_params", "window_span",
]
