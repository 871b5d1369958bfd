"""Memory model: tensor lifetimes, the greedy arena planner, scratch and Flash (DESIGN §5).

Time is the index of a step in the schedule (one IR node per step in the layer-based schedule).
A *buffer* is a set of tensors that share storage: a reshape's output is a view of its input,
and an in-place depthwise convolution writes its output over its input (TinyEngine). A buffer
is therefore a list of segments `(first, last, bytes)` at one offset; its footprint at step t is
the largest segment alive at t. The planner is TFLM's GreedyMemoryPlanner (and TinyEngine's):
buffers sorted largest first, each placed at the lowest offset where it overlaps no buffer that
is alive at the same time.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from functools import lru_cache
from typing import Any

from mpq.ir import Graph, Node, node_macs

ALIGN = 16  # TFLM's arena alignment (micro_arena_constants.h)
#: Where the graph input and outputs live (the plan's `schedule.io`): "arena" — tensors of the
#: arena like any activation, the input freed after its last reader (TFLM keeps its input in its
#: arena too); "external" — the caller's buffers beside the arena (plans before `io` existed).
IO_MODES = ("arena", "external")


def align_up(n: int, a: int = ALIGN) -> int:
    """Round `n` up to a multiple of `a`."""
    return -(-n // a) * a


def packed_bytes(elements: int, bits: int) -> int:
    """Bytes of a packed tensor of `elements` values at `bits` each: ⌈n·b/8⌉ (DESIGN §4.2)."""
    return -(-elements * bits // 8)


@dataclass(frozen=True)
class Segment:
    """A tensor's share of a buffer: alive from step `first` to step `last` inclusive, `shift`
    bytes above the buffer's offset (0 but for partial input/output overlap, `overlap_shift`)."""

    tensor: str
    first: int
    last: int
    size: int
    shift: int = 0


@dataclass
class Buffer:
    """Tensors sharing one storage location."""

    name: str
    segments: list[Segment] = field(default_factory=list)

    @property
    def size(self) -> int:
        return max(s.shift + s.size for s in self.segments)

    @property
    def first(self) -> int:
        return min(s.first for s in self.segments)


@dataclass
class ArenaPlan:
    """Placed buffers: offset per buffer, and the arena size (max offset + size)."""

    offsets: dict[str, int]
    size: int
    buffers: list[Buffer]

    def tensor_offsets(self) -> dict[str, int]:
        return {s.tensor: self.offsets[b.name] + s.shift for b in self.buffers
                for s in b.segments}


def buffers_conflict(a: Buffer, off_a: int, b: Buffer, off_b: int) -> bool:
    """True when buffers `a` at `off_a` and `b` at `off_b` share arena bytes while some
    segment of each is alive at the same step (the planner's rule, and the plan check's)."""
    for sa in a.segments:
        for sb in b.segments:
            if sa.first <= sb.last and sb.first <= sa.last \
                    and off_a + sa.shift < off_b + sb.shift + sb.size \
                    and off_b + sb.shift < off_a + sa.shift + sa.size:
                return True
    return False


def plan_arena(buffers: list[Buffer]) -> ArenaPlan:
    """Greedy largest-first placement at the lowest free offset (TFLM GreedyMemoryPlanner).

    Sizes must already be aligned. Ties are broken by first use, then by name, so the plan is
    deterministic.

    Only placed buffers alive at some step of `buf` can conflict with it, and the lowest
    offset without conflict is 0 or the end of such a buffer's segment less a shift of `buf`
    (just below it, some pair of segments alive together overlaps and stops overlapping exactly
    there), so offsets are tried only from those: the same placement as trying every placed
    buffer's ends, without the work of a whole network's worth of dead ones.
    """
    order = sorted(buffers, key=lambda b: (-b.size, b.first, b.name))
    placed: list[tuple[Buffer, int, int, int]] = []  # buffer, offset, first and last step
    offsets: dict[str, int] = {}
    for buf in order:
        first = min(s.first for s in buf.segments)
        last = max(s.last for s in buf.segments)
        near = [(other, off) for other, off, o_first, o_last in placed
                if o_first <= last and first <= o_last]
        # A segment of `buf` may start right after a placed one (`shift`: the overlap's).
        shifts = {s.shift for s in buf.segments}
        candidates = sorted({0} | {off + s.shift + s.size - k for other, off in near
                                   for s in other.segments for k in shifts
                                   if off + s.shift + s.size >= k})
        for cand in candidates:
            if not any(buffers_conflict(buf, cand, other, off) for other, off in near):
                break
        offsets[buf.name] = cand
        placed.append((buf, cand, first, last))
    size = max((offsets[b.name] + b.size for b in buffers), default=0)
    return ArenaPlan(offsets=offsets, size=size, buffers=order)


def scratch_bytes(node: Node, graph: Graph, inplace: bool) -> int:
    """Kernel scratch of one node at int8 (CMSIS-NN DSP getters; runtimes.md §1.2).

    conv: 2·align4(KH·KW·Cin/g) int16 (im2col), 0 for 1×1 stride-1 unpadded; in-place
    depthwise: one padded input channel (TinyEngine); others 0 — mpq's own pooling kernels
    accumulate each output in a register (CMSIS-NN's arm_avgpool_s8 would need 4·C; the
    cmsis-nn backend adds that at export).
    """
    if node.op == "conv2d":
        _, kh, kw, cin_g = node.weight.shape
        a = node.attrs
        if node.is_depthwise:
            _, h, w, _ = graph.tensors[node.inputs[0]].shape
            t, left, b, r = a["pads"]
            if inplace:
                return (h + t + b) * (w + left + r)
            return 2 * kh * kw * graph.tensors[node.inputs[0]].shape[3]
        if (kh, kw) == (1, 1) and a["strides"] == (1, 1) and not any(a["pads"]):
            return 0
        return 2 * align_up(kh * kw * cin_g, 4) * 2
    return 0


@dataclass
class Step:
    """One step of a schedule with the bytes it needs."""

    node: str
    live_bytes: int  # bytes of buffers alive at this step (what the arena must hold)
    scratch: int


@dataclass
class MemoryReport:
    """The layer-based memory model of a graph at given per-tensor bitwidths."""

    arena_bytes: int
    scratch_bytes: int
    input_bytes: int
    output_bytes: int
    steps: list[Step]
    plan: ArenaPlan
    inplace: set[str]
    overlap: dict[str, int] = field(default_factory=dict)  # node -> D (`overlap_shift`)

    @property
    def peak_sram_bytes(self) -> int:
        return self.arena_bytes + self.scratch_bytes


def live_bytes_per_step(buffers: list[Buffer], n_steps: int) -> list[int]:
    """Σ over buffers of the bytes their segments alive at each step cover (what the arena
    must hold then): the largest segment, or the union of an overlapped input and output."""
    live = [0] * n_steps
    for b in buffers:
        if all(s.shift == 0 for s in b.segments):
            foot = [0] * n_steps
            for s in b.segments:
                for t in range(s.first, s.last + 1):
                    foot[t] = max(foot[t], s.size)
        else:
            foot = [_union_bytes([(s.shift, s.shift + s.size) for s in b.segments
                                  if s.first <= t <= s.last]) for t in range(n_steps)]
        for t in range(n_steps):
            live[t] += foot[t]
    return live


def _union_bytes(spans: list[tuple[int, int]]) -> int:
    """Bytes covered by the half-open spans."""
    total, end = 0, None
    for a, b in sorted(spans):
        if end is None or a >= end:
            total += b - a
            end = b
        elif b > end:
            total += b - end
            end = b
    return total


def layer_lifetimes(graph: Graph, first_override: dict[str, int] | None = None,
                    io: str = "external", hold_input: int = 0) -> dict[str, tuple[int, int]]:
    """(first, last) step of every node output in the layer-based order; graph outputs live
    to the last step. `first_override` moves a tensor's birth earlier (the patch split tensor
    is alive from step 0). With `io` "arena" the graph inputs are arena tensors too
    (`input_lifetimes`)."""
    last_step = len(graph.nodes) - 1
    produced = {t: i for i, n in enumerate(graph.nodes) for t in n.outputs}
    last = dict(produced)
    for i, n in enumerate(graph.nodes):
        for t in n.inputs:
            if t in last:
                last[t] = max(last[t], i)
    for t in graph.outputs:
        if t in last:
            last[t] = last_step
    first = {**produced, **(first_override or {})}
    out = {t: (first[t], last[t]) for t in produced}
    if io == "arena":
        out.update(input_lifetimes(graph, hold_input))
    return out


def input_lifetimes(graph: Graph, hold_until: int = 0) -> dict[str, tuple[int, int]]:
    """(first, last) step of each graph input kept in the arena (`io` "arena"): written by the
    caller before step 0, freed after its last reader — or after step `hold_until` when later
    (the patch stage's last step: every patch reads the input again)."""
    out = {}
    for t in graph.inputs:
        last = max((i for i, n in enumerate(graph.nodes) if t in n.inputs), default=0)
        out[t] = (0, max(last, hold_until))
    return out


def fused_residual_adds(graph: Graph, elements: dict[str, int],
                        lifetimes: dict[str, tuple[int, int]],
                        allowed: Callable[[Node], bool] | None = None
                        ) -> dict[str, tuple[str, str]]:
    """Residual adds fused into the convolution right before them (TinyEngine-style).

    add(skip, res) at step i fuses when `res` is the output of a conv2d at step i − 1 that
    nothing else reads, and `skip` dies at the add and has the output's size: the conv then
    requantises each output pixel, adds the skip pixel with TFLM's add arithmetic and writes
    the sum over the skip pixel it just read, so `res` never exists in memory and the sum
    takes the skip's buffer (never a graph output's). Bit-exact with the unfused pair; the skip
    and the sum must share a bitwidth (so in-place writing never overtakes reading — the
    search ties them), and the conv must not read the skip itself. Returns add → (conv, skip).
    """
    readers: dict[str, int] = {}
    for n in graph.nodes:
        for t in n.inputs:
            readers[t] = readers.get(t, 0) + 1
    producer = {t: i for i, n in enumerate(graph.nodes) for t in n.outputs}
    fused: dict[str, tuple[str, str]] = {}
    for i, n in enumerate(graph.nodes):
        if n.op != "add" or (allowed is not None and not allowed(n)):
            continue
        out = n.outputs[0]
        for skip, res in ((n.inputs[0], n.inputs[1]), (n.inputs[1], n.inputs[0])):
            if skip == res or skip not in producer or res not in producer:
                continue
            conv = graph.nodes[producer[res]]
            if producer[res] != i - 1 or conv.op != "conv2d" or readers.get(res) != 1 \
                    or res in graph.outputs:
                continue
            if lifetimes[skip][1] != i or elements[skip] != elements[out] \
                    or skip in graph.outputs:  # a graph output is read after the run
                continue
            if skip in conv.inputs:
                continue  # add(x, conv(x)): the sum would overwrite pixels the conv reads
            fused[n.name] = (conv.name, skip)
            break
    return fused


def schedule_buffers(graph: Graph, elements: dict[str, int],
                     lifetimes: dict[str, tuple[int, int]], bits: dict[str, int] | None = None,
                     inplace_ok: Callable[[Node], bool] | None = None,
                     fused: dict[str, tuple[str, str]] | None = None
                     ) -> tuple[list[Buffer], set[str]]:
    """`schedule_buffers_overlap` without partial overlap: (buffers, in-place nodes)."""
    buffers, inplace, _ = schedule_buffers_overlap(graph, elements, lifetimes, bits,
                                                   inplace_ok, fused)
    return buffers, inplace


def schedule_buffers_overlap(graph: Graph, elements: dict[str, int],
                             lifetimes: dict[str, tuple[int, int]],
                             bits: dict[str, int] | None = None,
                             inplace_ok: Callable[[Node], bool] | None = None,
                             fused: dict[str, tuple[str, str]] | None = None,
                             overlap_ok: Callable[[Node], bool] | None = None,
                             reverse_ok: Callable[[Node], bool] | None = None,
                             shift_of: Callable[[Node, int, int], int | None] | None = None,
                             raise_of: Callable[[Node, int], int | None] | None = None
                             ) -> tuple[list[Buffer], set[str], dict[str, int]]:
    """Buffers of a schedule (DESIGN §5): tensors as (bytes, first, last), sharing storage
    where the kernels allow it.

    A reshape is a view of its input. A depthwise conv runs in place (TinyEngine) when its
    input dies there (a graph output never does: the caller reads it after the last step), it
    has channel multiplier 1, its output is not larger and `inplace_ok` agrees; so does an
    activation (table lookup) whose input dies there, with `inplace_ok` likewise (both are
    listed in the plan's `schedule.inplace_depthwise`). A fused residual add
    (`fused_residual_adds`) writes over its skip input, and the conv feeding it keeps nothing in
    memory. Graph inputs are the caller's buffer, never in the arena, unless `lifetimes` lists
    them (io "arena", `input_lifetimes`): then each is a buffer of its own. Segment sizes are
    align16(⌈elements·bits/8⌉). With `overlap_ok`, a node it accepts among `OVERLAP_OPS` whose
    input dies there (with everything else its storage holds) writes its output
    `node_overlap_shift` bytes below the input's start, inside the same buffer, when that
    shares bytes at all (vMCU); with `reverse_ok`, a node it accepts writes its output
    `node_reverse_shift` bytes *above* the input's start instead, its rows run last to first
    (D negative). `shift_of(node, in_bits, out_bits)` replaces `node_overlap_shift` where
    the node's calls are not the whole map's (a patch stage's, per tile:
    `mpq.patch.PatchSchedule.stage_shift`). `raise_of(node, bits)` gives an in-place depthwise
    node's output a start U bytes *above* its input's (a patch stage's tile shrinks by its halo:
    `mpq.patch.PatchSchedule.raise_shift`), None or 0 for the same start. Returns the buffers,
    the names of the in-place nodes and the overlapped nodes with their shift D (output offset
    = input offset − D).
    """
    bits = bits or {}
    fused = fused or {}
    fused_res = {graph.nodes[i].outputs[0] for i, n in enumerate(graph.nodes)
                 if n.name in {conv for conv, _ in fused.values()}}
    owner: dict[str, str] = {}  # tensor -> buffer name
    buffers: dict[str, Buffer] = {}
    inplace: set[str] = set()
    overlap: dict[str, int] = {}
    shift: dict[str, int] = {}  # tensor -> bytes above its buffer's origin (may be < 0)
    for t in graph.inputs:
        if t in lifetimes:  # io "arena": the input is an arena buffer (`input_lifetimes`)
            first, last = lifetimes[t]
            size = align_up(packed_bytes(elements[t], bits.get(t, 8)))
            owner[t] = t
            buffers[t] = Buffer(t, [Segment(t, first, last, size)])
    for i, n in enumerate(graph.nodes):
        src = n.inputs[0] if n.inputs else None
        share = None
        up = 0  # bytes an in-place output starts above its input (`raise_of`)
        if n.name in fused:
            share = fused[n.name][1]
        elif src is not None and src in owner:
            if n.op == "reshape":
                share = src
            elif n.is_depthwise and lifetimes[src][1] == i and src not in graph.outputs \
                    and n.weight.shape[0] == graph.tensors[src].shape[3] \
                    and elements[n.outputs[0]] <= elements[src] \
                    and (inplace_ok is None or inplace_ok(n)):
                share = src
                inplace.add(n.name)
                if raise_of is not None:
                    up = raise_of(n, bits.get(src, 8)) or 0
            elif n.op == "activation" and src not in graph.outputs \
                    and all(seg.last <= i for seg in buffers[owner[src]].segments) \
                    and (inplace_ok is None or inplace_ok(n)):
                # A table lookup reads each element before writing it (mpq_activation): the
                # output takes its input's storage when the input — and whatever else that
                # storage holds, e.g. the tensor a reshape views — dies here (bits tied).
                share = src
                inplace.add(n.name)
        below = 0
        if share is None and (overlap_ok is not None or reverse_ok is not None) \
                and src is not None and src in owner \
                and n.op in OVERLAP_OPS and n.outputs[0] not in fused_res \
                and src not in graph.outputs:
            if reverse_ok is not None and reverse_ok(n):
                below = _overlap_below(n, graph, i, src, buffers[owner[src]], shift, elements,
                                       bits, reverse=True)
            elif overlap_ok is not None and overlap_ok(n):
                below = _overlap_below(n, graph, i, src, buffers[owner[src]], shift, elements,
                                       bits, shift_of=shift_of)
            else:
                below = None
            if below is not None:
                share = src
                overlap[n.name] = below
        for t in n.outputs:
            first, last = lifetimes[t]
            size = 0 if t in fused_res else align_up(packed_bytes(elements[t], bits.get(t, 8)))
            if share is not None:
                owner[t] = owner[share]
                shift[t] = shift.get(share, 0) - (below or 0) + up
            else:
                owner[t] = t
                buffers[t] = Buffer(t)
            buffers[owner[t]].segments.append(Segment(t, first, last, size))
    for b in buffers.values():  # shifts relative to the buffer's lowest byte
        low = min(shift.get(s.tensor, 0) for s in b.segments)
        if any(shift.get(s.tensor, 0) for s in b.segments):
            b.segments = [replace(s, shift=shift.get(s.tensor, 0) - low) for s in b.segments]
    return list(buffers.values()), inplace, overlap


def _overlap_below(n: Node, graph: Graph, i: int, src: str, buf: Buffer,
                   shift: dict[str, int], elements: dict[str, int], bits: dict[str, int],
                   reverse: bool = False,
                   shift_of: Callable[[Node, int, int], int | None] | None = None
                   ) -> int | None:
    """D for node `n` at step `i` writing below its input `src` (`node_overlap_shift`) — with
    `reverse`, −S for writing S bytes above it, rows last to first (`node_reverse_shift`) — or
    None when it may not: something in `src`'s storage other than `src` (or a view of its
    bytes) is alive after step i−1, or the output would not share a byte with the input."""
    base = shift.get(src, 0)
    in_size = align_up(packed_bytes(elements[src], bits.get(src, 8)))
    for seg in buf.segments:
        if seg.last > i or (seg.last == i and not (
                shift.get(seg.tensor, 0) == base and seg.size <= in_size)):
            return None
    out_size = align_up(packed_bytes(elements[n.outputs[0]], bits.get(n.outputs[0], 8)))
    if reverse:
        s = node_reverse_shift(n, graph, bits.get(src, 8), bits.get(n.outputs[0], 8))
        if s is None or s <= 0 or s >= in_size:
            return None
        return -s
    d = (shift_of or (lambda nd, bi, bo: node_overlap_shift(nd, graph, bi, bo)))(
        n, bits.get(src, 8), bits.get(n.outputs[0], 8))
    if d is None or d >= out_size:
        return None
    return d


def layer_schedule_buffers(graph: Graph, bits: dict[str, int] | None = None,
                           inplace_depthwise: bool = True,
                           fuse_adds: bool = True, io: str = "external"
                           ) -> tuple[list[Buffer], set[str]]:
    """Buffers of the layer-based schedule (one node per step); see `schedule_buffers`."""
    buffers, inplace, _ = layer_schedule_buffers_overlap(graph, bits, inplace_depthwise,
                                                         fuse_adds, io, overlap=False)
    return buffers, inplace


def layer_schedule_buffers_overlap(graph: Graph, bits: dict[str, int] | None = None,
                                   inplace_depthwise: bool = True, fuse_adds: bool = True,
                                   io: str = "external", overlap: bool = False
                                   ) -> tuple[list[Buffer], set[str], dict[str, int]]:
    """`layer_schedule_buffers`, with partial input/output overlap when `overlap`
    (`schedule_buffers_overlap`)."""
    elements = {t: graph.tensors[t].size for t in graph.tensors}
    lifetimes = layer_lifetimes(graph, io=io)
    fused = fused_residual_adds(graph, elements, lifetimes) if fuse_adds else {}
    return schedule_buffers_overlap(graph, elements, lifetimes, bits,
                                    None if inplace_depthwise else (lambda n: False), fused,
                                    (lambda n: True) if overlap else None)


def layer_memory(graph: Graph, bits: dict[str, int] | None = None,
                 inplace_depthwise: bool = True, io: str = "external",
                 overlap: bool = False) -> MemoryReport:
    """Arena, scratch and per-step live bytes of the layer-based schedule (DESIGN §5); with
    `io` "arena" the input and outputs are in the arena and the caller's buffers are 0 B
    (`io_buffer_bytes`); with `overlap`, outputs start inside their dying inputs where the
    kernels' write order allows (`overlap_shift`)."""
    bits = bits or {}
    buffers, inplace, shifts = layer_schedule_buffers_overlap(graph, bits, inplace_depthwise,
                                                              io=io, overlap=overlap)
    plan = plan_arena(buffers)
    live = live_bytes_per_step(buffers, len(graph.nodes))
    steps = [Step(n.name, live[i], scratch_bytes(n, graph, n.name in inplace))
             for i, n in enumerate(graph.nodes)]
    input_bytes, output_bytes = io_buffer_bytes(graph, io)
    return MemoryReport(arena_bytes=plan.size, scratch_bytes=max(s.scratch for s in steps),
                        input_bytes=input_bytes, output_bytes=output_bytes, steps=steps,
                        plan=plan, inplace=inplace, overlap=shifts)


def io_buffer_bytes(graph: Graph, io: str = "external") -> tuple[int, int]:
    """(input, output) bytes of the caller's buffers beside the arena, 8-bit: the graph
    input's and outputs' packed sizes with `io` "external", 0 and 0 with "arena" (they are
    arena tensors then, counted once in the arena)."""
    if io == "arena":
        return 0, 0
    return (sum(packed_bytes(graph.tensors[t].size, 8) for t in graph.inputs),
            sum(packed_bytes(graph.tensors[t].size, 8) for t in graph.outputs))


def check_io(io: str, where: str = "--io") -> str:
    """`io` itself when it is one of `IO_MODES`, else MpqError naming them."""
    from mpq.errors import MpqError

    if io not in IO_MODES:
        raise MpqError(f"{where} must be one of {', '.join(IO_MODES)}, not '{io}'")
    return io


def code_bytes_estimate(graph: Graph, cpu: str = "cortex-m4/fpv4-sp-d16",
                        shape: Any = None, packed: frozenset[str] = frozenset(),
                        either: bool = False, unpacked: frozenset[str] = frozenset(),
                        unpacked_exact: bool = False) -> int:
    """Flash of the code and constant call blocks an export of `graph` links for `cpu`
    (`core/fpu`), predicted from sizes measured with arm-none-eabi-gcc per kernel family and
    per call (`mpq.budget.predicted_code_bytes`, `tools/code_sizes.py`); `shape` (a
    `budget.CodeShape`) describes a patch stage, `packed` the layers on the packed sub-byte
    kernels, `unpacked` those that may take mpq_conv2d_unpacked (`unpacked_exact`: those that
    do)."""
    from mpq.budget import predicted_code_bytes

    return predicted_code_bytes(graph, cpu, shape, packed, either, unpacked, unpacked_exact)


def flash_bytes(graph: Graph, weight_bits: dict[str, int] | None = None) -> int:
    """Flash for parameters: packed weights (each array 4-byte aligned, as mpq_weights.c
    declares it) + int32 biases + (M, S) int32 per output channel, and 256 B per activation
    layer's lookup table."""
    weight_bits = weight_bits or {}
    total = 0
    for n in graph.nodes:
        if n.op == "activation":
            total += 256  # its lookup table (mpq.quant.lut.TABLE_BYTES)
        if n.weight is None:
            continue
        cout = n.weight.shape[0]
        total += -(-packed_bytes(n.weight.size, weight_bits.get(n.name, 8)) // 4) * 4
        total += 4 * cout  # bias
        total += 8 * cout  # requantisation multiplier and shift
    return total + constant_flash_bytes(graph)


def resize_map_bytes(graph: Graph) -> int:
    """Flash of the resize tables: per output row and column one int32 (nearest: the input
    index) or three (bilinear: lower, upper, fraction)."""
    total = 0
    for n in graph.nodes:
        if n.op == "resize":
            _, ho, wo, _ = graph.tensors[n.outputs[0]].shape
            total += (12 if n.attrs["mode"] == "bilinear" else 4) * (ho + wo)
    return total


def constant_flash_bytes(graph: Graph) -> int:
    """Flash of the layers' constant arrays other than weights and tables, each 4-byte
    aligned as `mpq_weights.c` declares it: concat constant inputs (counted at 8 bits — an
    upper bound: export packs them at the concat output's bits), the resize maps
    (`resize_map_bytes`), a mul/sub constant operand (int8 per value) and PRelu's int8 slopes,
    one per channel of the output's view (a rank-3 tensor is one 1×1×(A·B) view: its slopes
    repeat)."""
    total = resize_map_bytes(graph)
    for n in graph.nodes:
        if n.op == "concat":
            total += sum(align_up(packed_bytes(int(c.size), 8), 4)
                         for _, c in n.attrs.get("constants", ()))
        elif n.op in ("mul", "sub") and "const" in n.attrs:
            total += align_up(len(n.attrs["const"]), 4)
        elif n.op == "prelu":
            shape = graph.tensors[n.outputs[0]].shape
            channels = shape[3] if len(shape) == 4 else math.prod(shape[1:])
            total += align_up(channels, 4)
    return total


# -- partial input/output overlap (vMCU; issue 16 item 2) ---------------------------------------

#: Ops whose output may start inside their dying input (`node_overlap_shift`): the kernels
#: write output pixels in raster order, each after reading what it needs.
OVERLAP_OPS = ("conv2d", "avg_pool", "max_pool")


@lru_cache(maxsize=4096)
def overlap_shift(in_hwc: tuple[int, int, int], out_hwc: tuple[int, int, int],
                  window: tuple[int, int, int, int, int, int], in_bits: int, out_bits: int,
                  group: int = 1, origin: tuple[int, int, int] | None = None) -> int:
    """The least D ≥ 0 such that an output stored D bytes *below* its input's start never
    overwrites input bytes the kernel still has to read (vMCU, Zheng et al., MLSys'24: the
    output of a layer overwrites the part of its input already consumed).

    The kernel writes the output pixels in raster order, `group` at a time (mpq's int8
    convolution computes pixel pairs: group 2), each unit after reading what it needs; a unit
    covering pixels [uG, e_u) writes output bytes [0, ⌈e_u·C_o·b_o/8⌉) (sub-byte elements are
    merged into the byte they share with their neighbours, keeping the other bits), while the
    pixels q ≥ uG still read input elements from n_u = min_{q ≥ uG} first(q) on, where first(q)
    = (clamp(oy·s_h − p_t)·W + clamp(ox·s_w − p_l))·C is the top-left element of q's window
    (kernel kh×kw; its dilation only widens the window downward/rightward). Safe iff for every
    unit ⌈e_u·C_o·b_o/8⌉ − D ≤ ⌊n_u·b_i/8⌋, so

        D = max(0, max_u (⌈e_u·C_o·b_o/8⌉ − ⌊n_u·b_i/8⌋)).

    `window` = (s_h, s_w, p_t, p_l, kh, kw); a 1×1 stride-1 unpadded window is a pointwise op
    (output pixel p reads input pixel p only): 8-bit C→C gives D = G·C. The loop is the
    formula, exact; cached per geometry.

    `origin` = (y0, x0, stored width): the input is a view whose element (0, 0) is element
    (y0, x0) of a stored map that many pixels wide (a patch stage's tile read from inside its
    buffer, `mpq.patch.PatchSchedule.stage_shift`); first(q) is then
    ((y0 + clamp(oy·s_h − p_t))·W_s + x0 + clamp(ox·s_w − p_l))·C, byte 0 still the stored
    map's first and the output dense from byte 0. None: the view is the whole map.
    """
    h, w, c = in_hwc
    ho, wo, co = out_hwc
    sh, sw, pt, pl, _, _ = window
    y0, x0, stored_w = origin if origin is not None else (0, 0, w)
    n_pix = ho * wo
    firsts = [0] * n_pix
    for oy in range(ho):
        row = (y0 + min(max(oy * sh - pt, 0), h - 1)) * stored_w + x0
        for ox in range(wo):
            firsts[oy * wo + ox] = (row + min(max(ox * sw - pl, 0), w - 1)) * c
    need = 1 << 62  # suffix minimum of `firsts`
    suffix = [0] * n_pix
    for q in range(n_pix - 1, -1, -1):
        need = min(need, firsts[q])
        suffix[q] = need
    d = 0
    for start in range(0, n_pix, group):
        end = min(start + group, n_pix)
        written = -(-end * co * out_bits // 8)
        d = max(d, written - suffix[start] * in_bits // 8)
    return d


def node_overlap_shift(node: Node, graph: Graph, in_bits: int, out_bits: int) -> int | None:
    """`overlap_shift` for a node the portable kernels run in raster order (`OVERLAP_OPS`;
    convolutions in pixel pairs, kernels/mpq_conv.c `mpq__conv_s8_loop`), rounded up to the
    arena alignment so the output's offset stays aligned; None for any other node."""
    geometry = _overlap_geometry(node, graph)
    if geometry is None:
        return None
    in_hwc, out_hwc, window = geometry
    group = 2 if node.op == "conv2d" else 1
    return align_up(overlap_shift(in_hwc, out_hwc, window, in_bits, out_bits, group))


def _overlap_geometry(node: Node, graph: Graph
                      ) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]] | None:
    """(input HWC, output HWC, window (s_h, s_w, p_t, p_l, kh, kw)) of an `OVERLAP_OPS` node
    with 4-D maps, the shapes both overlap forms are computed from; None for any other."""
    if node.op not in OVERLAP_OPS:
        return None
    in_shape = graph.tensors[node.inputs[0]].shape
    out_shape = graph.tensors[node.outputs[0]].shape
    if len(in_shape) != 4 or len(out_shape) != 4:
        return None
    a = node.attrs
    kh, kw = a["kernel"] if "kernel" in a else node.weight.shape[1:3]
    window = (a["strides"][0], a["strides"][1], a["pads"][0], a["pads"][1], int(kh), int(kw))
    return tuple(in_shape[1:]), tuple(out_shape[1:]), window


def choose_overlaps(arena_of: Callable[[frozenset[str], frozenset[str]], int],
                    eligible: Iterable[str], eligible_reverse: Iterable[str] = (),
                    order: Sequence[str] = ()) -> tuple[frozenset[str], frozenset[str]]:
    """The overlapped nodes a schedule uses — (written below their input, written above it in
    reverse row order) — the smallest arena (`arena_of(below, above)`, the greedy planner's
    size; ties: fewer nodes) of greedy passes over the nodes in schedule order, each node
    taking the form among none, below (if in `eligible`) and above (if in
    `eligible_reverse`) that gives the smallest arena with the others kept (ties: none, then
    below, then above; `order`: the schedule's node order). The passes start from all
    `eligible` below, from none, and from all `eligible_reverse` above. None at all when no
    pass is smaller than without overlap.

    Overlap merges a node's input and output into one buffer, and chains of such buffers can
    place worse with the greedy planner than separate tensors (VWW: all 14 eligible layers
    overlapped below give a 19 % larger arena: each output below its input drifts the chain
    down past the dead input; with the expanding pointwise 8 → 16 written one input row above
    its input instead, the arena is 33 % smaller than without overlap), so only the ones that
    pay are kept. Deterministic: the same schedule gives the same sets.
    """
    below_ok, above_ok = list(eligible), list(eligible_reverse)
    names = [n for n in (order or dict.fromkeys([*below_ok, *above_ok]))
             if n in below_ok or n in above_ok]
    none = arena_of(frozenset(), frozenset())

    def size(state: dict[str, str]) -> int:
        return arena_of(frozenset(n for n, f in state.items() if f == "below"),
                        frozenset(n for n, f in state.items() if f == "above"))

    def greedy(state: dict[str, str]) -> tuple[int, dict[str, str]]:
        best = size(state)
        for name in names:
            forms = ["none", *(["below"] if name in below_ok else []),
                     *(["above"] if name in above_ok else [])]
            current = state.get(name, "none")
            sizes = {f: best if f == current else size({**state, name: f}) for f in forms}
            form = min(forms, key=lambda f: (sizes[f], forms.index(f)))
            state, best = {**state, name: form}, sizes[form]
        return best, {n: f for n, f in state.items() if f != "none"}

    passes = [greedy({n: "below" for n in below_ok}), greedy({})]
    if above_ok:
        passes.append(greedy({n: "above" for n in above_ok}))
    best_size, _, _, best = min((sz, len(st), k, st) for k, (sz, st) in enumerate(passes))
    if best_size >= none:
        return frozenset(), frozenset()
    return (frozenset(n for n, f in best.items() if f == "below"),
            frozenset(n for n, f in best.items() if f == "above"))


# -- reverse rows: an output placed ABOVE its dying input (issue 16 item 2) ----------------------

@lru_cache(maxsize=4096)
def reverse_overlap_shift(in_hwc: tuple[int, int, int], out_hwc: tuple[int, int, int],
                          window: tuple[int, int, int, int, int, int],
                          dilation: tuple[int, int], in_bits: int, out_bits: int) -> int:
    """The least S ≥ 0 such that an output stored S bytes *above* its input's start never
    overwrites input bytes still to be read when the output rows run from the last to the
    first (each row by the kernel's own forward pixel loop, in any grouping of pixels within
    the row): the mirror of `overlap_shift` (vMCU's analysis, with the write order reversed so
    an output in the top part of its input stops chains of overlaps drifting downward).

    Row oy's first write, byte ⌊oy·W_o·C_o·b_o/8⌋ of the output, comes while row oy's last
    pixel and every row above it (processed later) still read; the highest element they read
    is m_oy − 1 with m_oy = (R_oy·W + c_max + 1)·C, where R_oy is the largest input row any
    window of rows 0..oy reads (its last in-view tap, dilation d_h included) and c_max the
    largest input column any window reads. Every later write of row oy is higher and needs no
    more, so the order is safe iff for every row S + ⌊oy·W_o·C_o·b_o/8⌋ ≥ ⌈m_oy·b_i/8⌉:

        S = max(0, max_oy (⌈m_oy·b_i/8⌉ − ⌊oy·W_o·C_o·b_o/8⌋)).

    `window` = (s_h, s_w, p_t, p_l, kh, kw) as for `overlap_shift`, `dilation` = (d_h, d_w).
    Sub-byte maps: bytes shared by two elements count as read while either is (the kernels
    merge a partly written byte). The loop is the formula, exact; cached per geometry.
    """
    h, w, c = in_hwc
    ho, wo, co = out_hwc
    sh, sw, pt, pl, kh, kw = window
    dh, dw = dilation

    def last_tap(start: int, k: int, d: int, size: int) -> int:
        """The last in-view tap of a window starting at `start` (−1: none in view)."""
        if start > size - 1:
            return -1
        return start + d * min(k - 1, (size - 1 - start) // d)

    c_max = max(last_tap(ox * sw - pl, kw, dw, w) for ox in range(wo))
    s, row = 0, -1
    for oy in range(ho):
        row = max(row, last_tap(oy * sh - pt, kh, dh, h))
        if row < 0 or c_max < 0:
            continue
        need = -(-(row * w + c_max + 1) * c * in_bits // 8)
        s = max(s, need - oy * wo * co * out_bits // 8)
    return s


def reverse_rows_ok(in_hw: tuple[int, int], out_h: int, stride: int, pad_top: int,
                    kernel: int, dilation: int) -> bool:
    """True when every output row's window reads at least one input row, so the generated
    code can call the kernel on that row alone with a non-empty input view (the reverse-row
    loop of templates/c/mpq_model.c.j2)."""
    h = in_hw[0]
    return all(any(0 <= oy * stride - pad_top + k * dilation <= h - 1 for k in range(kernel))
               for oy in range(out_h))


def node_reverse_shift(node: Node, graph: Graph, in_bits: int, out_bits: int) -> int | None:
    """`reverse_overlap_shift` for a node of `OVERLAP_OPS` whose rows the generated code can
    run one at a time (`reverse_rows_ok`), rounded up to the arena alignment; None for any
    other node."""
    geometry = _overlap_geometry(node, graph)
    if geometry is None:
        return None
    in_hwc, out_hwc, window = geometry
    dh, dw = node.attrs.get("dilations", (1, 1))
    if not reverse_rows_ok(in_hwc[:2], out_hwc[0], window[0], window[2], window[4], int(dh)):
        return None
    s = reverse_overlap_shift(in_hwc, out_hwc, window, (int(dh), int(dw)), in_bits, out_bits)
    return align_up(s)


# -- kernel scratch inside the arena (issue 16: TFLM plans scratch with one op's lifetime) -------

#: Where the kernels' scratch lives (the plan's `schedule.scratch`): "arena" — one arena buffer
#: per layer that needs scratch, alive only during that layer's step(s), placed by the planner
#: like any tensor (a patch stage's nodes too: each patch runs the stage's steps in order);
#: "separate" — one static buffer of the largest scratch beside the arena (plans before
#: `schedule.scratch` existed, and stages with line buffers).
SCRATCH_MODES = ("arena", "separate")
SCRATCH_PREFIX = "scratch:"  # buffer name of a layer's scratch: "scratch:<node>"


def check_scratch(mode: str, where: str = "--scratch") -> str:
    """`mode` itself when it is one of `SCRATCH_MODES`, else MpqError naming them."""
    from mpq.errors import MpqError

    if mode not in SCRATCH_MODES:
        raise MpqError(f"{where} must be one of {', '.join(SCRATCH_MODES)}, not '{mode}'")
    return mode


def padded_plane_bytes(node: Node, in_hw: tuple[int, int], out_hw: tuple[int, int],
                       pads_tl: tuple[int, int]) -> int:
    """The padded input plane an in-place depthwise saves (`mpq_depthwise_inplace_scratch_size`,
    kernels/mpq_depthwise.c): (p_t + H + p_b)·(p_l + W + p_r) bytes for an H×W input, its top
    and left pads, and p_b, p_r the rows/columns the Ho×Wo output's windows reach below/right
    of the input."""
    (h, w), (ho, wo), (pt, pl) = in_hw, out_hw, pads_tl
    kh, kw = int(node.weight.shape[1]), int(node.weight.shape[2])
    sh, sw = node.attrs["strides"]
    dh, dw = node.attrs.get("dilations", (1, 1))
    pb = max(0, (ho - 1) * sh - pt + dh * (kh - 1) + 1 - h)
    pr = max(0, (wo - 1) * sw - pl + dw * (kw - 1) + 1 - w)
    return (pt + h + pb) * (pl + w + pr)


def kernel_scratch_bytes(node: Node, graph: Graph, inplace: bool, packed: bool = False) -> int:
    """Bytes of scratch mpq's portable kernel for `node` asks for (kernels/mpq_kernels.h, the
    `*_scratch_size` functions): in-place depthwise — one padded input channel,
    (p_t + H + p_b)·(p_l + W + p_r) with p_b, p_r the rows/columns the output reaches below/right
    of the input; conv2d — 2·KH·KW·Cin/g (one int16 im2col column), 0 for a 1×1 stride-1
    unpadded conv whose output is no larger than its input; `packed` sub-byte kernels —
    32·⌈K/16⌉ (conv, two pixels of packed lanes) or 16·⌈K/16⌉ (fully connected); others 0.
    The export sizes each layer's scratch with this function."""
    if packed and node.op in ("conv2d", "fully_connected"):
        k = int(math.prod(node.weight.shape[1:]))
        return (32 if node.op == "conv2d" else 16) * ((k + 15) // 16)
    if node.op != "conv2d":
        return 0
    _, kh, kw, cin_g = node.weight.shape
    a = node.attrs
    if inplace:
        _, h, w, _ = graph.tensors[node.inputs[0]].shape
        _, ho, wo, _ = graph.tensors[node.outputs[0]].shape
        return padded_plane_bytes(node, (h, w), (ho, wo), (a["pads"][0], a["pads"][1]))
    in_shape = graph.tensors[node.inputs[0]].shape
    out_shape = graph.tensors[node.outputs[0]].shape
    if (kh, kw) == (1, 1) and tuple(a["strides"]) == (1, 1) and not any(a["pads"][:2]) \
            and out_shape[1] <= in_shape[1] and out_shape[2] <= in_shape[2]:
        return 0
    return 2 * kh * kw * cin_g


def step_scratch_bytes(node: Node, graph: Graph, inplace: bool, in_bits: int = 8) -> int:
    """The arena slot planned for `node`'s scratch: the largest `kernel_scratch_bytes` of the
    kernels the export may pick for it — the packed sub-byte kernel only where it can (a conv
    with groups 1 not in place, or a fully connected layer, reading 4- or 2-bit activations:
    `codegen.packed.packed_choice`; whether it does also depends on the weights and the core,
    so the slot covers both)."""
    need = kernel_scratch_bytes(node, graph, inplace)
    if in_bits in (4, 2) and (node.op == "fully_connected" or (
            node.op == "conv2d" and not inplace and node.attrs.get("groups", 1) == 1)):
        need = max(need, kernel_scratch_bytes(node, graph, inplace, packed=True))
    return need


def scratch_buffers(graph: Graph, inplace: set[str], fused: dict[str, tuple[str, str]],
                    bits: dict[str, int] | None = None,
                    grown: Mapping[str, int] | None = None,
                    stage: Mapping[str, int] | None = None) -> list[Buffer]:
    """One arena buffer per node that needs scratch (`step_scratch_bytes`, aligned), alive at
    its step only — a conv fused with the residual add after it (`fused_residual_adds`) at
    its step and the add's, the steps its one kernel call spans — so the planner reuses the
    bytes at every other step (TFLM plans its scratch buffers the same way, with the
    lifetime of their op). `grown` (node → bytes, `grow_scratch`) sizes a node's slot to at
    least those bytes (mpq_conv2d_unpacked's scratch), making one where the int8/packed
    kernels need none. `stage` (node → bytes): a patch stage's nodes, whose scratch is the
    largest over the patches (`PatchSchedule.slot_bytes`); every patch runs the stage's
    steps in order, so a stage node's slot is alive at its step as a layer's is."""
    bits = bits or {}
    grown = grown or {}
    stage = stage or {}
    fused_convs = {conv for conv, _ in fused.values()}
    out = []
    for i, n in enumerate(graph.nodes):
        if n.op not in ("conv2d", "fully_connected"):
            continue
        if n.name in stage:
            size = stage[n.name]
        else:
            size = max(step_scratch_bytes(n, graph, n.name in inplace,
                                          bits.get(n.inputs[0], 8)), grown.get(n.name, 0))
        if size == 0:
            continue
        last = i + 1 if n.name in fused_convs else i
        name = SCRATCH_PREFIX + n.name
        out.append(Buffer(name, [Segment(name, i, last, align_up(size))]))
    return out


def scratch_record(plan: ArenaPlan, grown: Iterable[str] = ()) -> dict[str, Any]:
    """The plan's `schedule.scratch` for scratch planned in the arena: {"mode": "arena",
    "steps": {node: {"offset", "bytes"}}} from the placed scratch buffers, and — when
    `grow_scratch` grew some — "unpacked": the nodes whose slot holds mpq_conv2d_unpacked's
    scratch (sorted; their bytes are recomputed from the plan's bits by the plan check)."""
    steps = {b.name[len(SCRATCH_PREFIX):]: {"offset": plan.offsets[b.name], "bytes": b.size}
             for b in plan.buffers if b.name.startswith(SCRATCH_PREFIX)}
    out: dict[str, Any] = {"mode": "arena", "steps": dict(sorted(steps.items()))}
    if grown:
        out["unpacked"] = sorted(grown)
    return out


def grow_scratch(graph: Graph, tensors: list[Buffer], inplace: set[str],
                 fused: dict[str, tuple[str, str]], bits: dict[str, int] | None,
                 needs: Mapping[str, int], limit: int,
                 accept: Callable[[dict[str, int], int], bool] | None = None
                 ) -> dict[str, int]:
    """The layers whose scratch slot grows to `needs[node]` bytes (node → bytes; the
    unpacked kernel's scratch, `budget.unpacked_needs`) once the bits are chosen: greedily,
    the layer of most MACs first (ties: schedule order), each kept when the greedy planner
    places `tensors` (the schedule's other buffers) and every slot (`scratch_buffers` with the
    growth so far) in an arena of at most `limit` bytes and `accept(grown, arena bytes)`
    agrees (the Flash budget, the arena's region); a layer whose slot already holds its need
    is left as it is.

    Why this order: mpq_conv2d_unpacked saves per MAC (a sub-byte weight or input decoded once
    per call instead of at every multiply), so the layers with most MACs gain most from the
    SRAM the bits left over. Deterministic: the same inputs give the same growth."""
    base = {b.name[len(SCRATCH_PREFIX):]: b.size
            for b in scratch_buffers(graph, inplace, fused, bits)}
    step = {n.name: i for i, n in enumerate(graph.nodes)}
    by_name = {n.name: n for n in graph.nodes}
    grown: dict[str, int] = {}
    for name in sorted(needs, key=lambda m: (-node_macs(by_name[m], graph), step[m])):
        if align_up(needs[name]) <= base.get(name, 0):
            continue  # its slot already holds the unpacked operands
        trial = {**grown, name: needs[name]}
        size = plan_arena(tensors + scratch_buffers(graph, inplace, fused, bits, trial)).size
        if size <= limit and (accept is None or accept(trial, size)):
            grown = trial
    return grown
