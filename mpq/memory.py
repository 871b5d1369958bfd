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
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from mpq.ir import Graph, Node

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
    """A tensor's share of a buffer: alive from step `first` to step `last` inclusive."""

    tensor: str
    first: int
    last: int
    size: int


@dataclass
class Buffer:
    """Tensors sharing one storage location."""

    name: str
    segments: list[Segment] = field(default_factory=list)

    @property
    def size(self) -> int:
        return max(s.size for s in self.segments)

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
        return {s.tensor: self.offsets[b.name] for b in self.buffers for s in b.segments}


def buffers_conflict(a: Buffer, off_a: int, b: Buffer, off_b: int) -> bool:
    """True when buffers `a` at `off_a` and `b` at `off_b` share arena bytes while some
    segment of each is alive at the same step (the planner's rule, and the plan check's)."""
    for sa in a.segments:
        for sb in b.segments:
            if sa.first <= sb.last and sb.first <= sa.last \
                    and off_a < off_b + sb.size and off_b < off_a + sa.size:
                return True
    return False


def plan_arena(buffers: list[Buffer]) -> ArenaPlan:
    """Greedy largest-first placement at the lowest free offset (TFLM GreedyMemoryPlanner).

    Sizes must already be aligned. Ties are broken by first use, then by name, so the plan is
    deterministic.
    """
    order = sorted(buffers, key=lambda b: (-b.size, b.first, b.name))
    placed: list[tuple[Buffer, int]] = []
    offsets: dict[str, int] = {}
    for buf in order:
        candidates = sorted({0} | {off + s.size for other, off in placed for s in other.segments})
        for cand in candidates:
            if not any(buffers_conflict(buf, cand, other, off) for other, off in placed):
                break
        offsets[buf.name] = cand
        placed.append((buf, cand))
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

    @property
    def peak_sram_bytes(self) -> int:
        return self.arena_bytes + self.scratch_bytes


def live_bytes_per_step(buffers: list[Buffer], n_steps: int) -> list[int]:
    """Σ over buffers of the largest segment alive at each step (what the arena must hold then)."""
    live = [0] * n_steps
    for b in buffers:
        foot = [0] * n_steps
        for s in b.segments:
            for t in range(s.first, s.last + 1):
                foot[t] = max(foot[t], s.size)
        for t in range(n_steps):
            live[t] += foot[t]
    return live


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
    align16(⌈elements·bits/8⌉). Returns the buffers and the names of the in-place nodes.
    """
    bits = bits or {}
    fused = fused or {}
    fused_res = {graph.nodes[i].outputs[0] for i, n in enumerate(graph.nodes)
                 if n.name in {conv for conv, _ in fused.values()}}
    owner: dict[str, str] = {}  # tensor -> buffer name
    buffers: dict[str, Buffer] = {}
    inplace: set[str] = set()
    for t in graph.inputs:
        if t in lifetimes:  # io "arena": the input is an arena buffer (`input_lifetimes`)
            first, last = lifetimes[t]
            size = align_up(packed_bytes(elements[t], bits.get(t, 8)))
            owner[t] = t
            buffers[t] = Buffer(t, [Segment(t, first, last, size)])
    for i, n in enumerate(graph.nodes):
        src = n.inputs[0] if n.inputs else None
        share = None
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
            elif n.op == "activation" and src not in graph.outputs \
                    and all(seg.last <= i for seg in buffers[owner[src]].segments) \
                    and (inplace_ok is None or inplace_ok(n)):
                # A table lookup reads each element before writing it (mpq_activation): the
                # output takes its input's storage when the input — and whatever else that
                # storage holds, e.g. the tensor a reshape views — dies here (bits tied).
                share = src
                inplace.add(n.name)
        for t in n.outputs:
            first, last = lifetimes[t]
            size = 0 if t in fused_res else align_up(packed_bytes(elements[t], bits.get(t, 8)))
            if share is not None:
                owner[t] = owner[share]
            else:
                owner[t] = t
                buffers[t] = Buffer(t)
            buffers[owner[t]].segments.append(Segment(t, first, last, size))
    return list(buffers.values()), inplace


def layer_schedule_buffers(graph: Graph, bits: dict[str, int] | None = None,
                           inplace_depthwise: bool = True,
                           fuse_adds: bool = True, io: str = "external"
                           ) -> tuple[list[Buffer], set[str]]:
    """Buffers of the layer-based schedule (one node per step); see `schedule_buffers`."""
    elements = {t: graph.tensors[t].size for t in graph.tensors}
    lifetimes = layer_lifetimes(graph, io=io)
    fused = fused_residual_adds(graph, elements, lifetimes) if fuse_adds else {}
    return schedule_buffers(graph, elements, lifetimes, bits,
                            None if inplace_depthwise else (lambda n: False), fused)


def layer_memory(graph: Graph, bits: dict[str, int] | None = None,
                 inplace_depthwise: bool = True, io: str = "external") -> MemoryReport:
    """Arena, scratch and per-step live bytes of the layer-based schedule (DESIGN §5); with
    `io` "arena" the input and outputs are in the arena and the caller's buffers are 0 B
    (`io_buffer_bytes`)."""
    bits = bits or {}
    buffers, inplace = layer_schedule_buffers(graph, bits, inplace_depthwise, io=io)
    plan = plan_arena(buffers)
    live = live_bytes_per_step(buffers, len(graph.nodes))
    steps = [Step(n.name, live[i], scratch_bytes(n, graph, n.name in inplace))
             for i, n in enumerate(graph.nodes)]
    input_bytes, output_bytes = io_buffer_bytes(graph, io)
    return MemoryReport(arena_bytes=plan.size, scratch_bytes=max(s.scratch for s in steps),
                        input_bytes=input_bytes, output_bytes=output_bytes, steps=steps,
                        plan=plan, inplace=inplace)


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
                        either: bool = False) -> int:
    """Flash of the code and constant call blocks an export of `graph` links for `cpu`
    (`core/fpu`), predicted from sizes measured with arm-none-eabi-gcc per kernel family and
    per call (`mpq.budget.predicted_code_bytes`, `tools/code_sizes.py`); `shape` (a
    `budget.CodeShape`) describes a patch stage, `packed` the layers on the packed sub-byte
    kernels."""
    from mpq.budget import predicted_code_bytes

    return predicted_code_bytes(graph, cpu, shape, packed, either)


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
