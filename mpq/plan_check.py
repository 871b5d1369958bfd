"""Does a plan fit its model? Checked wherever a plan is used with its model.

`mpq.plan_schema` only knows the JSON. A plan whose fields are each well-formed can still lie
about the model: an offset that puts a tensor past the arena's end, two live tensors at the
same address, a `bytes` smaller than the tensor, a patch grid that is not the one the split
gives, bits that break the ties the in-place kernels need. Export turns those numbers into C
pointers, so each one would be an out-of-bounds write.

The rule is simple: recompute, with the library functions the search used (`mpq.patch`,
`mpq.memory`, the search's tie groups and BitOPs), everything the plan's own choices (its
bits and its patch split) determine, and compare field by field. Offsets are the one free
choice a plan makes that is checked by its safety rather than by equality: every stored tensor
lies inside the arena and no two tensors alive at the same step overlap, except where the
schedule shares storage (views, in-place depthwise, fused adds).
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

from mpq.boards import plan_board
from mpq.budget import code_shape, stage_branch_flash, unpacked_needs
from mpq.errors import MpqError
from mpq.ir import Graph, graph_fingerprint, node_macs
from mpq.memory import (
    ALIGN,
    SCRATCH_PREFIX,
    buffers_conflict,
    constant_flash_bytes,
    packed_bytes,
)
from mpq.patch import PatchSchedule, plan_patches, plan_split
from mpq.plan import (
    Plan,
    plan_io,
    plan_overlap,
    plan_raised,
    plan_scratch,
    plan_scratch_slots,
)
from mpq.plan_schema import PlanFieldError, fail
from mpq.quant.weights import LINEAR, storage


def storage_bits(plan: Plan) -> dict[str, int]:
    """Bits each tensor is stored at: a VDPC outlier branch writes its (8-bit) values into the
    same buffer as the mixed branch, so the buffer holds the wider of the two (DESIGN §6)."""
    return {t.name: max(t.bits, t.outlier_branch["bits"]) if t.outlier_branch else t.bits
            for t in plan.tensors}


def check_plan(plan: Plan, graph: Graph) -> None:
    """Raise PlanFieldError naming the first field of `plan` that does not fit `graph`.

    `plan` must have passed `plan_schema.check_plan_data` (load_plan does it)."""
    if plan.graph_fingerprint != graph_fingerprint(graph):
        raise fail("graph_fingerprint", "the plan was made for a different model")
    graph = _ordered(plan, graph)
    index = _check_names(plan, graph)
    schedule = _check_patch(plan, graph)
    inplace = _check_schedule(plan, schedule)
    _check_bits(plan, graph, schedule, inplace)
    _check_ptq(plan, graph)
    _check_memory(plan, graph, schedule, index)
    _check_counts(plan, graph, schedule)
    _check_instructions(plan, graph)
    _check_regions(plan)


def _check_regions(plan: Plan) -> None:
    """`schedule.regions` is the placement `mpq.regions` makes for the plan's board and
    predicted sizes (absent exactly when the board ranks no region)."""
    from mpq.boards import plan_board
    from mpq.regions import place_buffers

    p = plan.predicted
    io = p["input_bytes"] + p.get("output_bytes", 0)
    want = place_buffers(plan_board(plan.board), p["arena_bytes"], p["scratch_bytes"], io)
    got = plan.schedule.get("regions")
    if got != want:
        raise fail("schedule.regions", f"must be {_short(want)} (the board's fastest regions "
                                       f"that hold each part), got {_short(got)}")


def _ordered(plan: Plan, graph: Graph) -> Graph:
    """`graph` in the plan's `schedule.order` (the file order without one), which must be a
    topological order of the model's nodes (`mpq.order`)."""
    from mpq.order import apply_order, file_order, order_problem

    order = plan.schedule.get("order", list(file_order(graph)))
    problem = order_problem(graph, order)
    if problem is not None:
        raise fail("schedule.order", problem)
    return apply_order(graph, order)


def _check_names(plan: Plan, graph: Graph) -> dict[str, int]:
    """The plan's tensors are the model's tensors, its layers the model's nodes in order with
    their ops. Returns tensor name → index in `plan.tensors`."""
    index: dict[str, int] = {}
    for i, t in enumerate(plan.tensors):
        if t.name in index:
            raise fail(f"tensors[{i}].name", f"duplicate tensor '{t.name}'")
        if t.name not in graph.tensors:
            raise fail(f"tensors[{i}].name", f"'{t.name}' is not a tensor of the model")
        index[t.name] = i
    missing = [t for t in graph.tensors if t not in index]
    if missing:
        raise fail("tensors", f"missing the model's tensor '{missing[0]}'")
    if len(plan.layers) != len(graph.nodes):
        raise fail("layers", f"must list the model's {len(graph.nodes)} nodes, got "
                             f"{len(plan.layers)}")
    for i, (layer, node) in enumerate(zip(plan.layers, graph.nodes, strict=True)):
        if layer.name != node.name:
            raise fail(f"layers[{i}].name", f"must be the model's node {i} '{node.name}', got "
                                            f"'{layer.name}'")
        if layer.op != node.kind:
            raise fail(f"layers[{i}].op", f"must be '{node.kind}', got '{layer.op}'")
    return index


def _check_patch(plan: Plan, graph: Graph) -> PatchSchedule:
    """Rebuild the schedule from (split_layer, n) with `mpq.patch` and compare every recorded
    part of its geometry; a tampered grid or stage would send export's views out of their
    buffers."""
    p = plan.patch
    if p is None:
        return plan_patches(graph, None, plan_io(plan), plan_overlap(plan), plan_scratch(plan))
    if plan_scratch(plan) == "arena" and "cache" in p:
        raise fail("schedule.scratch", "must be absent in a plan with line buffers (their "
                                       "stage keeps the separate scratch)")
    if plan_overlap(plan) and p.get("vdpc"):
        raise fail("schedule.overlap", "must be empty in a plan with VDPC's outlier branch (the "
                                       "shifts hold at one branch's bits)")
    if plan_raised(plan) and p.get("vdpc"):
        raise fail("schedule.inplace_raised", "must be empty in a plan with VDPC's outlier "
                                              "branch (the search raises only without it)")
    try:
        schedule = plan_patches(graph, plan_split(p), plan_io(plan), plan_overlap(plan),
                                plan_scratch(plan), plan_raised(plan))
    except MpqError as exc:
        where = "patch.cache.line_buffers" if "line buffer" in str(exc) else "patch.split_layer"
        raise fail(where, str(exc)) from None
    if "cache" in p:  # first: which maps are kept decides the MACs compared below
        _check_cache(p["cache"], schedule, p["vdpc"])
    if ("pool" in p) != (schedule.pool_input is not None):
        raise fail("patch.pool", "must be present exactly when the stage ends in a global "
                                 "average pool" if schedule.pool_input is None else
                   f"is missing: the stage ends in the global pool '{schedule.stage_nodes[-1]}'")
    if "pool" in p:
        if p["vdpc"] is not None:
            raise fail("patch.vdpc", "must be null: a stage ending in a global pool sums one "
                                     "branch's integers")
        if p["pool"]["tensor"] != schedule.pool_input:
            raise fail("patch.pool.tensor", f"must be '{schedule.pool_input}'")
        if p["pool"]["bytes"] != schedule.accumulator[1]:
            raise fail("patch.pool.bytes", f"must be {schedule.accumulator[1]}")
    if p["vdpc"] is not None and schedule.m != schedule.n:
        raise fail("patch.vdpc", "must be null on a grid that is not n×n")
    expect = {
        "split_tensor": schedule.split_tensor,
        "stage_nodes": schedule.stage_nodes,
        "redundant_macs": schedule.redundant_macs,
        "redundant_macs_percent": round(schedule.redundant_macs_percent, 4),
        "tiles": [[[r.y0, r.y1, r.x0, r.x1] for r in row] for row in schedule.tiles],
    }
    for key, want in expect.items():
        if p[key] != want:
            raise fail(f"patch.{key}", f"does not match the split at layer {p['split_layer']} "
                                       f"with {_grid(p)} (expected {_short(want)})")
    v = p["vdpc"]
    if v is not None:
        classified = {n.name: n for n in graph.nodes}[schedule.stage_nodes[0]].outputs[0]
        if classified == schedule.split_tensor:
            raise fail("patch.vdpc", "VDPC needs a stage of more than one layer")
        if v["map"] != classified:
            raise fail("patch.vdpc.map", f"must be the first stage layer's output "
                                         f"'{classified}', got '{v['map']}'")
        regions = [[[r.y0, r.y1, r.x0, r.x1] for r in row]
                   for row in schedule.regions[classified]]
        if v["regions"] != regions:
            raise fail("patch.vdpc.regions", "do not match the patch grid")
        if len(v["outlier_rate"]) != schedule.n:
            raise fail("patch.vdpc.outlier_rate", f"must be {schedule.n}×{schedule.n}")
    return schedule


def _check_cache(c: dict[str, Any], schedule: PatchSchedule, vdpc: Any) -> None:
    """`patch.cache` is the line-buffer form of the split (`mpq.patch.cache_rows`): its
    recomputing form's redundant MACs and each buffer's map and rows as `mpq.patch` finds
    them (bytes and offsets: `_check_memory`); no VDPC (every patch takes the same branch)."""
    if vdpc is not None:
        raise fail("patch.cache", "line buffers need every patch on one branch: not with VDPC")
    if not schedule.cache:
        raise fail("patch.cache.line_buffers", "names no map patches share rows of")
    if c["redundant_macs_recompute"] != schedule.redundant_macs_recompute:
        raise fail("patch.cache.redundant_macs_recompute",
                   f"must be {schedule.redundant_macs_recompute}")
    want = [[t, schedule.line_rows[t]] for t in sorted(schedule.line_rows)]
    got = [[b["tensor"], b["rows"]] for b in c["line_buffers"]]
    if got != want:
        raise fail("patch.cache.line_buffers", f"must hold (map, rows) {_short(want)}")


def line_offsets(plan: Plan) -> dict[str, tuple[int, int]]:
    """Line buffer name ("line:<map>") -> (index in `patch.cache.line_buffers`, offset)."""
    from mpq.patch import LINE_PREFIX

    c = (plan.patch or {}).get("cache")
    return {LINE_PREFIX + b["tensor"]: (i, b["offset"])
            for i, b in enumerate(c["line_buffers"])} if c else {}


def _grid(p: dict[str, Any]) -> str:
    """A plan's patch grid as the user gave it: `n = N`, or `the N×M grid` with `cols`."""
    return f"n = {p['n']}" if "cols" not in p else f"the {p['n']}×{p['cols']} grid"


def _short(v: Any) -> str:
    text = str(v)
    return text if len(text) <= 60 else text[:57] + "..."


def _stage_internal(plan: Plan, graph: Graph, schedule: PatchSchedule) -> set[str]:
    """Tensors with a VDPC outlier branch: stage outputs except the split tensor."""
    if plan.patch is None or plan.patch["vdpc"] is None:
        return set()
    by_name = {n.name: n for n in graph.nodes}
    return {by_name[s].outputs[0] for s in schedule.stage_nodes} - {schedule.split_tensor}


def _check_bits(plan: Plan, graph: Graph, schedule: PatchSchedule, inplace: set[str]) -> None:
    """Bits the kernels and the search rely on: graph inputs, outputs, softmax outputs and the
    VDPC map at 8; tied tensors (views, concat, fused adds, in-place depthwise) at one width;
    outlier branches (8-bit) exactly on the VDPC stage's tensors; each layer's a_bits and
    w_bits as its tensors and weights have them."""
    from mpq.search.driver import fixed_8bit, tie_groups

    tensors = {t.name: (i, t) for i, t in enumerate(plan.tensors)}
    internal = _stage_internal(plan, graph, schedule)
    classified = plan.patch["vdpc"]["map"] if plan.patch and plan.patch["vdpc"] else None
    for name in sorted(fixed_8bit(graph, classified), key=lambda t: tensors[t][0]):
        i, t = tensors[name]
        if t.bits != 8:
            raise fail(f"tensors[{i}].bits", f"'{name}' must be 8-bit (graph input, output, "
                                             f"softmax or VDPC map), got {t.bits}")
    for name, (i, t) in tensors.items():
        if (t.outlier_branch is not None) != (name in internal):
            what = "must have" if name in internal else "must not have"
            raise fail(f"tensors[{i}].outlier_branch", f"'{name}' {what} a VDPC outlier "
                                                       "branch in this plan")
        if t.outlier_branch is not None and t.outlier_branch["bits"] != 8:
            raise fail(f"tensors[{i}].outlier_branch.bits", "must be 8 (VDPC's 8-bit branch)")
    for members in tie_groups(graph, schedule.fused_adds, inplace):
        first = tensors[members[0]][1].bits
        for m in members[1:]:
            i, t = tensors[m]
            if t.bits != first:
                raise fail(f"tensors[{i}].bits", f"must equal the bits of '{members[0]}' "
                                                 f"({first}): they share a buffer or a "
                                                 f"format, got {t.bits}")
    for i, (layer, node) in enumerate(zip(plan.layers, graph.nodes, strict=True)):
        if node.weight is None and layer.w_bits is not None:
            raise fail(f"layers[{i}].w_bits", f"must be null ('{node.name}' has no weights)")
        if node.weight is not None and layer.w_bits is None:
            raise fail(f"layers[{i}].w_bits", f"'{node.name}' has weights: must be set")
        if node.inputs and layer.a_bits_in != tensors[node.inputs[0]][1].bits:
            raise fail(f"layers[{i}].a_bits_in", f"must be the bits of its input "
                                                 f"({tensors[node.inputs[0]][1].bits})")
        if layer.a_bits_out != tensors[node.outputs[0]][1].bits:
            raise fail(f"layers[{i}].a_bits_out", f"must be the bits of its output "
                                                  f"({tensors[node.outputs[0]][1].bits})")


def _check_ptq(plan: Plan, graph: Graph) -> None:
    """What post-training quantisation recorded (`mpq.quant.ptq`) fits the layer: AdaRound's
    mask holds one bit per weight (zero padding), a bias correction one number per output
    channel."""
    from mpq.quant.weights import ROUNDING, unpack_rounding

    for i, (layer, node) in enumerate(zip(plan.layers, graph.nodes, strict=True)):
        if node.weight is None:
            continue
        params = layer.w_params or {}
        if (layer.w_scheme or "linear") == "linear" and ROUNDING in params:
            try:
                unpack_rounding(params[ROUNDING], node.weight.size)
            except MpqError as exc:
                raise fail(f"layers[{i}].w_params.{ROUNDING}", str(exc)) from None
        corr = layer.bias_correction
        if corr is not None and len(corr) != node.weight.shape[0]:
            raise fail(f"layers[{i}].bias_correction", f"must have {node.weight.shape[0]} "
                       f"entries (the output channels of '{node.name}'), got {len(corr)}")


def _check_schedule(plan: Plan, schedule: PatchSchedule) -> set[str]:
    """`schedule` (what export shares storage for) is what the memory model decides; returns
    the in-place depthwise nodes."""
    inplace = schedule.memory().inplace
    if plan.schedule["inplace_depthwise"] != sorted(inplace):
        raise fail("schedule.inplace_depthwise", f"does not match the model's schedule "
                                                 f"(expected {_short(inplace)})")
    raised = schedule.raise_record(storage_bits(plan), inplace)
    if plan_raised(plan) != raised:
        raise fail("schedule.inplace_raised", f"must be {_short(raised)} (a patch stage's "
                   "in-place depthwise outputs end where their input's largest tile ends)")
    fused = {add: {"conv": conv, "skip": skip}
             for add, (conv, skip) in sorted(schedule.fused_adds.items())}
    if plan.schedule["fused_adds"] != fused:
        raise fail("schedule.fused_adds", f"does not match the model's schedule "
                                          f"(expected {_short(fused)})")
    return inplace


def _check_memory(plan: Plan, graph: Graph, schedule: PatchSchedule,
                  index: dict[str, int]) -> None:
    """Every tensor's `bytes` is its packed size at its storage bits (per-patch maximum inside
    the stage); graph inputs have no offset (the caller's buffer) unless the plan keeps them in
    the arena (`schedule.io` "arena"), every other tensor has one;
    tensors sharing storage share the offset; each stored tensor lies in [0, arena_bytes);
    buffers alive at the same step do not overlap (`memory.buffers_conflict`, the planner's own
    test)."""
    bits = storage_bits(plan)
    for name, i in index.items():
        t = plan.tensors[i]
        want = packed_bytes(schedule.tensor_elements[name], bits[name])
        if t.bytes != want:
            raise fail(f"tensors[{i}].bytes", f"must be {want} ('{name}' at {bits[name]} bits),"
                                              f" got {t.bytes}")
        external = name in graph.inputs and schedule.io == "external"
        if external and t.offset is not None:
            raise fail(f"tensors[{i}].offset", "must be null for a graph input (the caller's "
                                               "buffer)")
        if not external and t.offset is None:
            raise fail(f"tensors[{i}].offset", f"'{name}' needs an arena offset")
    arena = plan.predicted["arena_bytes"]
    buffers, overlap = schedule.buffers_and_overlap(bits)
    if overlap != plan.schedule.get("overlap", {}):
        raise fail("schedule.overlap", f"must be {_short(overlap)} (the safe shifts the "
                                       "kernels' write order gives these nodes at these bits)")
    offsets: dict[str, int] = {}
    lines = line_offsets(plan)
    grown = _unpacked_slots(plan, graph)
    scratch = _scratch_offsets(plan, schedule, bits, arena, grown)
    offsets.update(scratch)
    buffers = buffers + schedule.scratch_buffers(set(plan.schedule["inplace_depthwise"]), bits,
                                                 grown)
    for buf in buffers:
        if buf.name in scratch:  # a layer's kernel scratch (`schedule.scratch`): checked above
            continue
        if schedule.accumulator is not None and buf.name == schedule.accumulator[0]:
            off = plan.patch["pool"]["offset"]  # the pooled stage's sums
            if off + buf.size > arena:
                raise fail("patch.pool.offset", f"{off} + {buf.size} bytes ends past "
                                                f"predicted.arena_bytes ({arena})")
            offsets[buf.name] = off
            continue
        if buf.name in lines:  # a line buffer (`patch.cache`): its own bytes and offset
            i, off = lines[buf.name]
            field = f"patch.cache.line_buffers[{i}]"
            want = packed_bytes(schedule.line_buffers[buf.name], bits[buf.name[len("line:"):]])
            if plan.patch["cache"]["line_buffers"][i]["bytes"] != want:
                raise fail(f"{field}.bytes", f"must be {want}")
            if off + buf.size > arena:
                raise fail(f"{field}.offset", f"{off} + {buf.size} bytes ends past "
                                              f"predicted.arena_bytes ({arena})")
            offsets[buf.name] = off
            continue
        for s in buf.segments:
            i = index[s.tensor]
            off = plan.tensors[i].offset
            offsets.setdefault(buf.name, off - s.shift)
            if off != offsets[buf.name] + s.shift:
                first = buf.segments[0]
                raise fail(f"tensors[{i}].offset", f"must be the offset of '{first.tensor}' "
                                                   f"{s.shift - first.shift:+d} "
                           f"({offsets[buf.name] + s.shift}): they share storage")
            if off + s.size > arena:
                raise fail(f"tensors[{i}].offset", f"{off} + {s.size} bytes ends past "
                                                   f"predicted.arena_bytes ({arena})")
    for a_i, a in enumerate(buffers):
        for b in buffers[a_i + 1:]:
            if buffers_conflict(a, offsets[a.name], b, offsets[b.name]):
                if b.name in lines:
                    raise fail(f"patch.cache.line_buffers[{lines[b.name][0]}].offset",
                               f"'{b.name}' overlaps '{a.segments[0].tensor}' while both are "
                               "alive")
                for x, y in ((b, a), (a, b)):
                    if schedule.accumulator is not None and x.name == schedule.accumulator[0]:
                        raise fail("patch.pool.offset", f"the pooled stage's sums overlap "
                                                        f"'{y.segments[0].tensor}' while both "
                                                        "are alive")
                    if x.name in scratch:
                        node = x.name[len(SCRATCH_PREFIX):]
                        raise fail(f"schedule.scratch.steps.{node}.offset",
                                   f"the scratch of '{node}' overlaps '{y.segments[0].tensor}' "
                                   "while both are alive")
                i = index[b.segments[0].tensor]
                raise fail(f"tensors[{i}].offset", f"'{b.segments[0].tensor}' overlaps "
                                                   f"'{a.segments[0].tensor}' while both are "
                                                   "alive")
    if any(off < 0 for off in offsets.values()):
        name = next(b.segments[0].tensor for b in buffers if offsets[b.name] < 0)
        raise fail(f"tensors[{index[name]}].offset", f"'{name}' starts before the arena")
    extent = max((offsets[b.name] + b.size for b in buffers), default=0)
    if arena != extent:
        raise fail("predicted.arena_bytes", f"must be {extent} (the end of the last tensor), "
                                            f"got {arena}")


def _unpacked_slots(plan: Plan, graph: Graph) -> dict[str, int]:
    """node → bytes of the slots the plan grew for mpq_conv2d_unpacked
    (`schedule.scratch.unpacked`, `memory.grow_scratch`): each listed node must be one the
    export runs through it at the plan's bits on its board's core (`budget.unpacked_needs`),
    its bytes that kernel's scratch. Which nodes grew is the plan's choice (like its bits);
    their bytes are not."""
    names = (plan.schedule.get("scratch") or {}).get("unpacked", [])
    if not names:
        return {}
    field = "schedule.scratch.unpacked"
    if names != sorted(set(names)):
        raise fail(field, "must be sorted, each node once")
    bits = {t.name: t.bits for t in plan.tensors}
    layers = {layer.name: layer for layer in plan.layers}

    def weights(n: Any) -> tuple[int, bool]:
        layer = layers[n.name]
        w_bits = int(layer.w_bits)
        return w_bits, storage(layer.w_scheme or "linear", w_bits)[0] == LINEAR

    fused_convs = {v["conv"] for v in plan.schedule["fused_adds"].values()}
    needs = unpacked_needs(graph, plan_board(plan.board).core, bits.__getitem__, weights,
                           set(plan.schedule["inplace_depthwise"]), fused_convs)
    for i, name in enumerate(names):
        if name not in needs:
            raise fail(f"{field}[{i}]", f"'{_short(name)}' is not a convolution "
                       "mpq_conv2d_unpacked runs at the plan's bits")
    return {name: needs[name] for name in names}


def _scratch_offsets(plan: Plan, schedule: PatchSchedule, bits: dict[str, int],
                     arena: int, grown: dict[str, int] | None = None) -> dict[str, int]:
    """Buffer name → offset of each layer's kernel scratch the plan records
    (`schedule.scratch`): exactly the layers `memory.scratch_buffers` gives scratch (`grown`:
    those sized for mpq_conv2d_unpacked, `_unpacked_slots`), each with its bytes, inside the
    arena."""
    slots = plan_scratch_slots(plan)
    want = {b.name[len(SCRATCH_PREFIX):]: b.size for b in schedule.scratch_buffers(
        set(plan.schedule["inplace_depthwise"]), bits, grown)}
    if sorted(slots) != sorted(want):
        raise fail("schedule.scratch.steps", f"must list the layers with kernel scratch "
                                             f"{_short(sorted(want))}, got {_short(sorted(slots))}")
    out = {}
    for node, (off, size) in slots.items():
        if size != want[node]:
            raise fail(f"schedule.scratch.steps.{node}.bytes",
                       f"must be {want[node]} (the kernel's scratch at these bits, 16-B "
                       f"aligned), got {size}")
        if off % ALIGN:
            raise fail(f"schedule.scratch.steps.{node}.offset",
                       f"must be a multiple of {ALIGN}, got {off}")
        if off + size > arena:
            raise fail(f"schedule.scratch.steps.{node}.offset",
                       f"{off} + {size} bytes ends past predicted.arena_bytes ({arena})")
        out[SCRATCH_PREFIX + node] = off
    return out


def _check_counts(plan: Plan, graph: Graph, schedule: PatchSchedule) -> None:
    """MACs, BitOPs, scratch, input and Flash bytes recomputed from the plan's choices with the
    search's own functions (`search.driver.assemble_plan`)."""
    from mpq.search.driver import stage_bitops, weight_flash
    from mpq.search.scores import full_precision_bitops, layer_bitops

    bits = {t.name: t.bits for t in plan.tensors}
    w_bits = {layer.name: layer.w_bits for layer in plan.layers if layer.w_bits is not None}
    bitops = layer_bitops(graph, bits, w_bits)
    bitops8 = layer_bitops(graph, {t: 8 for t in bits}, {n: 8 for n in w_bits})
    for i, (layer, node) in enumerate(zip(plan.layers, graph.nodes, strict=True)):
        macs = node_macs(node, graph)
        if layer.macs != macs:
            raise fail(f"layers[{i}].macs", f"must be {macs}, got {layer.macs}")
        if layer.bitops != bitops[node.name]:
            raise fail(f"layers[{i}].bitops", f"must be {bitops[node.name]}, got "
                                              f"{layer.bitops}")
    v = plan.patch["vdpc"] if plan.patch else None
    rates = SimpleNamespace(outlier_rate=v["outlier_rate"]) if v else None
    extra = stage_bitops(schedule, graph, bitops, bitops8, rates)
    memory = schedule.memory(storage_bits(plan))
    from mpq.memory import io_buffer_bytes
    from mpq.quant.lut import tables_flash

    input_bytes, output_bytes = io_buffer_bytes(graph, schedule.io)
    # Older plans did not count the caller's output buffer (`mpq.budget`): checked as written.
    if "output_bytes" not in plan.predicted:
        output_bytes = 0
    flash = tables_flash(graph)
    for layer, node in zip(plan.layers, graph.nodes, strict=True):
        if node.weight is not None:
            flash += weight_flash(node.weight.size, node.weight.shape[0], int(layer.w_bits),
                                  layer.w_scheme or "linear")
    flash += constant_flash_bytes(graph)
    shape = code_shape(schedule, plan.schedule.get("inplace_depthwise", []), v is not None)
    by_tensor = {t.name: t for t in plan.tensors}

    def table_differs(node: Any) -> bool:  # as `search.driver.assemble_plan` decides it
        def quant(t: Any) -> tuple:
            o = t.outlier_branch or {"bits": t.bits, "scale": t.scale,
                                     "zero_point": t.zero_point}
            return (o["bits"], o["scale"], o["zero_point"])
        return any(quant(by_tensor[t]) != (by_tensor[t].bits, by_tensor[t].scale,
                                            by_tensor[t].zero_point)
                   for t in (*node.inputs, *node.outputs))

    branch = stage_branch_flash(graph, shape, table_differs)
    # Plans written before the outlier branch's parameters were counted: checked as written.
    flash += 0 if plan.predicted["flash_bytes"] == flash else branch
    arena = plan.predicted["arena_bytes"]
    expect = {
        "scratch_bytes": memory.scratch_bytes,
        "peak_sram_bytes": arena + memory.scratch_bytes,
        "input_bytes": input_bytes,
        "sram_needed_bytes": arena + memory.scratch_bytes + input_bytes + output_bytes
        + plan.predicted.get("stack_bytes", 0),
        "flash_bytes": flash,
        "macs": schedule.total_macs + schedule.redundant_macs,
        "bitops": int(sum(bitops.values())) + extra["mixed"],
        "bitops_int8": int(sum(bitops8.values())) + extra["int8"],
        "expected_bitops": int(sum(bitops.values())) + extra["expected"],
        "full_precision_bitops": full_precision_bitops(graph),
    }
    if "output_bytes" in plan.predicted:
        expect["output_bytes"] = output_bytes
    for key, want in expect.items():
        if plan.predicted[key] != want:
            raise fail(f"predicted.{key}", f"must be {want}, got {plan.predicted[key]}")


__all__ = ["PlanFieldError", "check_plan", "storage_bits"]


def _check_instructions(plan: Plan, graph: Graph) -> None:
    """`predicted.instructions` (optional) names only the model's nodes."""
    layers = plan.predicted.get("instructions", {}).get("layers", {})
    names = {n.name for n in graph.nodes}
    unknown = [n for n in layers if n not in names]
    if unknown:
        raise fail("predicted.instructions.layers", f"'{_short(unknown[0])}' is not a node of "
                   "the model")
