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

from dataclasses import dataclass, field

from mpq.ir import Graph, Node

ALIGN = 16  # TFLM's arena alignment (micro_arena_constants.h)


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


def _conflict(a: Buffer, off_a: int, b: Buffer, off_b: int) -> bool:
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
            if not any(_conflict(buf, cand, other, off) for other, off in placed):
                break
        offsets[buf.name] = cand
        placed.append((buf, cand))
    size = max((offsets[b.name] + b.size for b in buffers), default=0)
    return ArenaPlan(offsets=offsets, size=size, buffers=order)


def scratch_bytes(node: Node, graph: Graph, inplace: bool) -> int:
    """Kernel scratch of one node at int8 (CMSIS-NN DSP getters; runtimes.md §1.2).

    conv: 2·align4(KH·KW·Cin/g) int16 (im2col), 0 for 1×1 stride-1 unpadded; in-place
    depthwise: one padded input channel (TinyEngine); avgpool: 4·C; others 0.
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
    if node.op == "avg_pool":
        return 4 * graph.tensors[node.inputs[0]].shape[3]
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


def layer_schedule_buffers(graph: Graph, bits: dict[str, int] | None = None,
                           inplace_depthwise: bool = True) -> tuple[list[Buffer], set[str]]:
    """Buffers of the layer-based schedule (one node per step).

    Graph inputs are not in the arena: `mpq_model_run` reads them from the caller's buffer.
    Graph outputs stay alive to the last step. Returns the buffers and the names of the
    depthwise nodes that run in place.
    """
    bits = bits or {}
    last_step = len(graph.nodes) - 1
    produced = {t: i for i, n in enumerate(graph.nodes) for t in n.outputs}
    last_use = {t: produced[t] for t in produced}
    for i, n in enumerate(graph.nodes):
        for t in n.inputs:
            if t in last_use:
                last_use[t] = max(last_use[t], i)
    for t in graph.outputs:
        last_use[t] = last_step

    owner: dict[str, str] = {}  # tensor -> buffer name
    buffers: dict[str, Buffer] = {}
    inplace: set[str] = set()
    for i, n in enumerate(graph.nodes):
        src = n.inputs[0] if n.inputs else None
        shares = False
        if src is not None and src in owner:
            if n.op == "reshape":
                shares = True
            elif inplace_depthwise and n.is_depthwise and last_use[src] == i \
                    and n.weight.shape[0] == graph.tensors[src].shape[3] \
                    and graph.tensors[n.outputs[0]].size <= graph.tensors[src].size:
                shares = True
                inplace.add(n.name)
        for t in n.outputs:
            size = align_up(packed_bytes(graph.tensors[t].size, bits.get(t, 8)))
            seg = Segment(t, i, last_use[t], size)
            if shares:
                owner[t] = owner[src]
            else:
                owner[t] = t
                buffers[t] = Buffer(t)
            buffers[owner[t]].segments.append(seg)
    return list(buffers.values()), inplace


def layer_memory(graph: Graph, bits: dict[str, int] | None = None,
                 inplace_depthwise: bool = True) -> MemoryReport:
    """Arena, scratch and per-step live bytes of the layer-based schedule (DESIGN §5)."""
    bits = bits or {}
    buffers, inplace = layer_schedule_buffers(graph, bits, inplace_depthwise)
    plan = plan_arena(buffers)
    steps = []
    for i, n in enumerate(graph.nodes):
        live = 0
        for b in buffers:
            alive = [s.size for s in b.segments if s.first <= i <= s.last]
            live += max(alive, default=0)
        steps.append(Step(n.name, live, scratch_bytes(n, graph, n.name in inplace)))
    input_bytes = sum(packed_bytes(graph.tensors[t].size, bits.get(t, 8)) for t in graph.inputs)
    output_bytes = sum(packed_bytes(graph.tensors[t].size, bits.get(t, 8))
                       for t in graph.outputs)
    return MemoryReport(arena_bytes=plan.size, scratch_bytes=max(s.scratch for s in steps),
                        input_bytes=input_bytes, output_bytes=output_bytes, steps=steps,
                        plan=plan, inplace=inplace)


def flash_bytes(graph: Graph, weight_bits: dict[str, int] | None = None) -> int:
    """Flash for parameters: packed weights + int32 biases + (M, S) int32 per output channel."""
    weight_bits = weight_bits or {}
    total = 0
    for n in graph.nodes:
        if n.weight is None:
            continue
        cout = n.weight.shape[0]
        total += packed_bytes(n.weight.size, weight_bits.get(n.name, 8))
        total += 4 * cout  # bias
        total += 8 * cout  # requantisation multiplier and shift
    return total
