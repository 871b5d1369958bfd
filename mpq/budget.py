"""Budgets that hold after the build: one SRAM figure and one Flash figure, each with its parts
labelled, predicted from the plan and measured from a linked ELF (DESIGN §5, README "Memory
figures").

SRAM. What the model adds to a firmware, and what ``--sram`` (or the board's
``region − reserve.stack − reserve.runtime_sram``) bounds::

    model SRAM = arena + kernel scratch + input buffer + output buffer

The search plans the arena against ``budget − scratch − input − output``. The stack and the
rest of the firmware's ``.data``/``.bss`` are the board's reserves (``reserve.stack``,
``reserve.runtime_sram``): they do not depend on the model, so they are shown beside the model's
figure, never hidden in it, and the build check holds the total against the SRAM region.

Flash. ``model Flash = parameters + code and tables``: the packed weights, int32 biases,
multipliers and shifts (each array 4-byte aligned, as ``mpq_weights.c`` declares them), the
kernel library functions the model's kernels link (measured per kernel family with
arm-none-eabi-gcc by ``tools/code_sizes.py``, ``kernels/code_sizes.json``) and the calls and
constant parameter blocks of ``mpq_model_run`` (measured per call the same way).

Measured. :func:`build_breakdown` attributes every symbol of a linked ELF to its source file
(``arm-none-eabi-nm -l``, the build has ``-g``): the export's files are the model, the harness
files (``main.c``, the start-up code, semihosting) are not; libgcc helpers (no source) count
with the model that calls them.
"""

from __future__ import annotations

import json
import re
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mpq.errors import MpqError

#: Source files of the build harness (`firmware.build_elf` adds the last two to every build;
#: main.c is `mpq export --build`'s or `mpq verify`'s). Everything else is the model's.
HARNESS_FILES = ("main.c", "verify_main.c", "mpq_startup.c", "mpq_semihost.c")
#: The harness mains, whose .data/.bss are its input/output buffers (test vectors in verify).
_HARNESS_MAINS = ("main.c", "verify_main.c")


def align4(n: int) -> int:
    """`n` rounded up to 4: every constant array of mpq_weights.c is `aligned(4)`."""
    return -(-n // 4) * 4


@dataclass(frozen=True)
class SramFigure:
    """The SRAM a plan needs, in parts (bytes)."""

    arena: int
    scratch: int
    input: int
    output: int
    model_stack: int  # mpq_model_run's deepest call (GCC's call graph), inside `model`
    budget: int  # the search's (--sram or the board's): bounds `model`
    stack: int  # board reserve
    runtime: int  # board reserve: the rest of the firmware's .data/.bss/heap

    @property
    def model(self) -> int:
        """arena + scratch + input buffer + output buffer + the model's stack."""
        return self.arena + self.scratch + self.input + self.output + self.model_stack

    def describe(self) -> str:
        """`model SRAM 37,504 B = arena … + scratch … + input … + output …` on one line."""
        return (f"model SRAM {self.model:,} B = arena {self.arena:,} + scratch {self.scratch:,}"
                f" + input {self.input:,} + output {self.output:,} + stack "
                f"{self.model_stack:,}; budget {self.budget:,} B; "
                f"board reserves beside it: stack {self.stack:,} B, rest of firmware "
                f"{self.runtime:,} B")


def plan_sram(plan: Any) -> SramFigure:
    """The plan's predicted SRAM figure; a plan written before `output_bytes` or `stack_bytes`
    were recorded counts them as 0 (what its search planned against)."""
    p, b = plan.predicted, plan.board
    reserve = b.get("reserve", {}) if isinstance(b, dict) else {}
    return SramFigure(arena=int(p["arena_bytes"]), scratch=int(p["scratch_bytes"]),
                      input=int(p["input_bytes"]), output=int(p.get("output_bytes", 0)),
                      model_stack=int(p.get("stack_bytes", 0)),
                      budget=int(b["sram_budget"]), stack=int(reserve.get("stack", 0)),
                      runtime=int(reserve.get("runtime_sram", 0)))


# -- measured ------------------------------------------------------------------------------------

_KINDS = {"t": "text", "w": "text", "r": "rodata", "d": "data", "b": "bss"}


def _symbols(elf: Path, nm: str) -> list[tuple[str, str, str, int]]:
    """(source file, symbol, kind, bytes) of every sized symbol of a linked ELF, from
    `arm-none-eabi-nm -l -S` (`?` as the file of symbols without debug info, e.g. libgcc);
    aliases (several names at one address) are listed once."""
    proc = subprocess.run([nm, "-l", "-S", "-t", "d", str(elf)], capture_output=True,
                          text=True)
    if proc.returncode != 0:
        raise MpqError(f"arm-none-eabi-nm failed on {elf}: {proc.stderr.strip()[:200]}")
    seen: set[tuple[str, str]] = set()
    out = []
    for line in proc.stdout.splitlines():
        head, _, where = line.partition("\t")
        fields = head.split()
        if len(fields) != 4 or fields[2].lower() not in _KINDS:
            continue
        addr, size, typ, name = fields
        if (addr, typ) in seen:
            continue
        seen.add((addr, typ))
        src = Path(where.rsplit(":", 1)[0]).name if where else "?"
        out.append((src, name, _KINDS[typ.lower()], int(size)))
    return out


def symbol_breakdown(elf: Path, nm: str) -> dict[str, dict[str, int]]:
    """Bytes per source file and kind (`text`, `rodata`, `data`, `bss`) of a linked ELF."""
    out: dict[str, dict[str, int]] = {}
    for src, _name, kind, size in _symbols(elf, nm):
        per = out.setdefault(src, {})
        per[kind] = per.get(kind, 0) + size
    return out


def symbol_breakdown_symbols(elf: Path, nm: str) -> dict[str, int]:
    """Flash bytes (code, constants, initial values) per `file:symbol` of a linked ELF."""
    return {f"{src}:{name}": size for src, name, kind, size in _symbols(elf, nm)
            if kind != "bss"}


def build_breakdown(elf: Path, sections: dict[str, int], nm: str) -> dict[str, int]:
    """The measured figures of an `mpq export --build` ELF (bytes):

    * ``model_flash_bytes``: code, constants and initial values of the model's files (the
      export and its kernels, libgcc helpers);
    * ``harness_flash_bytes``: the same of the harness (main.c, start-up, semihosting);
    * ``model_sram_bytes``: the model's `.data`/`.bss` symbols (the arena and scratch arrays
      of `.mpq_arena` among them) and the harness's input/output buffers (a firmware has them
      too);
    * ``io_buffer_bytes``: that last part; ``stack_bytes``: the `.stack` section (board
      reserve).
    """
    per = symbol_breakdown(elf, nm)
    model_flash = harness_flash = model_static = io = 0
    for src, kinds in per.items():
        flash = kinds.get("text", 0) + kinds.get("rodata", 0) + kinds.get("data", 0)
        ram = kinds.get("data", 0) + kinds.get("bss", 0)
        if src in HARNESS_FILES:
            harness_flash += flash
            if src in _HARNESS_MAINS:
                io += ram
        else:
            model_flash += flash
            model_static += ram
    # The arena and scratch arrays are mpq_model.c's symbols (in .mpq_arena): in model_static.
    return {"model_flash_bytes": model_flash, "harness_flash_bytes": harness_flash,
            "model_sram_bytes": model_static + io, "io_buffer_bytes": io,
            "stack_bytes": sections.get("stack", 0)}


def over_budget(measured: dict[str, int], board: Any, plan_board: dict[str, Any]) -> list[str]:
    """What a measured build exceeds, one phrase each (empty: it fits): the model's Flash and
    SRAM against the plan's budgets, the whole build against the board's regions less the
    reserves of the rest of the firmware."""
    problems = []
    flash_budget, sram_budget = int(plan_board["flash_budget"]), int(plan_board["sram_budget"])
    if measured["model_flash_bytes"] > flash_budget:
        problems.append(f"model Flash {measured['model_flash_bytes']:,} B is "
                        f"{measured['model_flash_bytes'] - flash_budget:,} B over the plan's "
                        f"budget {flash_budget:,} B")
    sram = measured["model_sram_bytes"] + measured.get("model_stack_bytes", 0)
    if sram > sram_budget:
        problems.append(f"model SRAM {sram:,} B (arena + scratch + I/O buffers + stack) is "
                        f"{sram - sram_budget:,} B over the plan's budget {sram_budget:,} B")
    if measured.get("model_stack_bytes", 0) > board.reserve_stack:
        problems.append(f"the model's stack {measured['model_stack_bytes']:,} B is over the "
                        f"board's {board.reserve_stack:,} B stack reserve")
    room = board.sram_region_obj.length - board.reserve_runtime_sram
    if measured["sram_bytes"] > room:
        problems.append(f"SRAM {measured['sram_bytes']:,} B with the {board.reserve_stack:,} B "
                        f"stack is over {board.sram_region}'s {room:,} B left beside the "
                        f"runtime reserve")
    return problems


def build_summary(measured: dict[str, int], predicted_flash: int | None,
                  predicted_stack: int | None = None) -> str:
    """One line naming the measured parts (and the predicted Flash and stack next to the
    measured: the plan's stack bound is its kernels', a CMSIS-NN export's calls are not)."""
    got = measured["model_flash_bytes"]
    pred = "" if predicted_flash is None else \
        f" (predicted {predicted_flash:,} B, {_pct(got, predicted_flash)})"
    stack = measured.get("model_stack_bytes", 0)
    stack_pred = "" if predicted_stack is None else \
        f"; the plan predicted {predicted_stack:,} B, {_pct(stack, predicted_stack)}"
    return (f"model Flash {measured['model_flash_bytes']:,} B{pred} + harness "
            f"{measured['harness_flash_bytes']:,} B; model SRAM {measured['model_sram_bytes']:,}"
            f" B (arena + scratch {measured.get('mpq_arena', 0):,}, I/O buffers "
            f"{measured['io_buffer_bytes']:,}) + model stack "
            f"{stack:,} B (call-graph bound{stack_pred}; inside the "
            f"{measured['stack_bytes']:,} B stack reserve)")


def _pct(measured: int, predicted: int) -> str:
    """How far the prediction is from the measurement, signed, in % of the measurement."""
    if measured == 0:
        return "n/a"
    return f"{100.0 * (predicted - measured) / measured:+.2f} %"


# -- predicted Flash ------------------------------------------------------------------------------

def code_table() -> dict[str, Any]:
    """`kernels/code_sizes.json`: code bytes per kernel family and per call, measured by
    `tools/code_sizes.py` with the compiler it names."""
    from mpq.resources import data_dir

    path = data_dir("kernels") / "code_sizes.json"
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


#: Kernel of a layer-based node without fusion or in-place work (`codegen.export._Builder`).
_NODE_KERNELS = {"fully_connected": "fully_connected", "add": "add", "avg_pool": "avgpool",
                 "max_pool": "maxpool", "softmax": "softmax", "concat": "copy_view"}
#: Flash of one kernel family / one call the table does not have (a new kernel): the former
#: estimate (4.5 KiB per op kind; a call as the table's median), labelled an estimate.
UNKNOWN_FAMILY_BYTES = 4608


@dataclass(frozen=True)
class CodeShape:
    """What an export's code depends on besides the graph (`codegen.export`): the patch stage
    (its nodes in order and its n×n grid), whether VDPC gives it an all-8-bit outlier branch,
    and — for a patch plan — the schedule's in-place depthwise convolutions and residual adds
    fused into their convolution (add → (conv, skip)), which decide each call's kernel."""

    stage_nodes: tuple[str, ...] = ()
    n: int = 0
    vdpc: bool = False
    inplace: frozenset[str] = frozenset()
    fused: tuple[tuple[str, str], ...] = ()  # (add, conv) pairs
    # line buffers (`patch.cache_rows`): the maps that have one; None: halos recomputed
    lines: frozenset[str] | None = None
    m: int = 0  # patch columns (0: n)
    pooled: bool = False  # the stage ends in a global average pool (its sums, its last step)

    @property
    def patches(self) -> int:
        return self.n * (self.m or self.n)


def code_shape(schedule: Any, inplace: Any, vdpc: bool) -> CodeShape | None:
    """The CodeShape of a plan on `schedule` (a `patch.PatchSchedule`): None for a layer-based
    one, whose kernels `layer_kernels` derives from the graph alone."""
    if not schedule.split_tensor:
        return None
    return CodeShape(tuple(schedule.stage_nodes), schedule.n, bool(vdpc), frozenset(inplace),
                     tuple(sorted((add, conv) for add, (conv, _) in
                                  schedule.fused_adds.items())),
                     frozenset(schedule.line_rows) if getattr(schedule, "cache", False)
                     else None, schedule.m, schedule.pool_input is not None)


def _conv_sets(graph: Any, shape: CodeShape | None
               ) -> tuple[set[str], set[str], set[str], set[str]]:
    """(fused adds, convolutions they are fused into, in-place depthwise convolutions, stage
    nodes) of an export: the layer-based planner's without a `shape`, else the schedule's."""
    from mpq.memory import fused_residual_adds, layer_lifetimes, layer_schedule_buffers

    if shape is None:
        elements = {t: graph.tensors[t].size for t in graph.tensors}
        pairs = fused_residual_adds(graph, elements, layer_lifetimes(graph))
        _, inplace = layer_schedule_buffers(graph)
        return set(pairs), {conv for conv, _ in pairs.values()}, set(inplace), set()
    return ({add for add, _ in shape.fused}, {conv for _, conv in shape.fused},
            set(shape.inplace), set(shape.stage_nodes))


#: The channel-group entry point of a kernel (`codegen.export._Builder._group_note`): a
#: 4- or 2-bit depthwise / pooling layer that `codegen.packed.group_choice` admits calls
#: `mpq_<kernel>_grouped`, a family of its own (int8 exports do not link it).
GROUPED_KERNELS = {"depthwise_inplace": "depthwise_inplace_grouped",
                   "avgpool": "avgpool_grouped", "maxpool": "maxpool_grouped"}


def packed_layers(graph: Any, core: str, shape: CodeShape | None,
                  in_bits: Any, weights: Any, same_storage: Any = None) -> frozenset[str]:
    """The layer-based conv / fully connected nodes an export runs through the packed
    sub-byte kernels (`codegen.packed.packed_choice`, as `codegen.export._Builder._packed`
    asks it), and the depthwise / pooling nodes (patch stage included) it runs by channel
    groups (`codegen.packed.group_choice`, `GROUPED_KERNELS`): `in_bits(tensor) -> bits`,
    `weights(node) -> (bits, linear?)`; `same_storage(node) -> bool` says whether a pooling
    is stored over its own input (no channel groups then; without it: never)."""
    from mpq.codegen.packed import group_choice, packed_choice

    _, fused_convs, inplace, skip = _conv_sets(graph, shape)
    out = set()
    for n in graph.nodes:
        kernel = "depthwise_inplace" if n.op == "conv2d" and n.name in inplace \
            else _NODE_KERNELS.get(n.op)
        if kernel in GROUPED_KERNELS:
            bits = in_bits(n.inputs[0])
            if bits != 8 and group_choice(n, kernel, bits, graph.tensors[n.inputs[0]].shape[-1],
                                          core, bool(same_storage and same_storage(n))) is None:
                out.add(n.name)
            continue
        if n.op not in ("conv2d", "fully_connected") or n.weight is None or n.name in skip:
            continue
        bits, linear = weights(n)
        if packed_choice(n, core, in_bits(n.inputs[0]), bits, 0 if linear else 1,
                         n.name in fused_convs, n.name in inplace) is None:
            out.add(n.name)
    return frozenset(out)


def unpacked_layers(graph: Any, shape: CodeShape | None, in_bits: Any,
                    weights: Any, available: Any = None) -> frozenset[str]:
    """The layer-based conv2d nodes whose operands suit `mpq_conv2d_unpacked`
    (`codegen.packed.unpack_eligible`: a sub-byte input or non-int8 weights, groups 1, not
    fused): a superset of those an export runs through it (it also needs the unpacked operands
    to fit the plan's scratch, and the packed kernels go first), so the code counted for them
    is a bound. `weights(node) -> (bits, linear?)`. With `available(node)` (the scratch the
    plan reserves for the node, as the export reads it) only the layers whose unpacked
    operands fit it (`codegen.packed.unpack_choice`'s second test): then exactly the export's
    choice."""
    from mpq.codegen.packed import unpack_eligible, unpacked_scratch

    _, fused_convs, inplace, skip = _conv_sets(graph, shape)

    def fits(n: Any) -> bool:
        if available is None:
            return True
        shapes = [graph.tensors[t].shape for t in (n.inputs[0], n.outputs[0])]
        bits, linear = weights(n)
        return unpacked_scratch(n, *shapes, in_bits(n.inputs[0]), bits, linear) <= available(n)

    return frozenset(
        n.name for n in graph.nodes
        if n.op == "conv2d" and n.weight is not None and n.name not in skip
        and unpack_eligible(n, in_bits(n.inputs[0]), weights(n)[0], n.name in fused_convs,
                            n.name in inplace, weights(n)[1]) is None and fits(n))


def unpacked_needs(graph: Any, core: str, in_bits: Any, weights: Any,
                   inplace: Any, fused_convs: Any) -> dict[str, int]:
    """node → bytes of `mpq_conv2d_unpacked`'s scratch (`codegen.packed.unpacked_scratch`)
    for each layer-based conv2d an export would run through it given the scratch: its
    operands suit it (`codegen.packed.unpack_eligible`) and the packed sub-byte kernels, which
    the export tries first (`codegen.packed.packed_choice` on `core`), do not take it.
    `in_bits(tensor) -> bits`, `weights(node) -> (bits, linear?)`; `inplace` and `fused_convs`
    are the schedule's in-place depthwise convolutions and convolutions fused with their
    residual add. The layers whose slot `memory.grow_scratch` may grow."""
    from mpq.codegen.packed import packed_choice, unpack_eligible, unpacked_scratch

    out = {}
    for n in graph.nodes:
        if n.op != "conv2d" or n.weight is None:
            continue
        bits, linear = weights(n)
        a_bits = in_bits(n.inputs[0])
        fused, ip = n.name in fused_convs, n.name in inplace
        if packed_choice(n, core, a_bits, bits, 0 if linear else 1, fused, ip) is None \
                or unpack_eligible(n, a_bits, bits, fused, ip, linear) is not None:
            continue
        shapes = [graph.tensors[t].shape for t in (n.inputs[0], n.outputs[0])]
        out[n.name] = unpacked_scratch(n, *shapes, a_bits, bits, linear)
    return out


def packed_padding_bytes(graph: Any, packed: frozenset[str], w_bits: Any) -> int:
    """Flash the packed kernels' weight layout adds (`codegen.packed.pack_filter`): each row
    padded to a multiple of 16 values, against the plain packed array (4-byte aligned)."""
    total = 0
    for n in graph.nodes:
        if n.name in packed and n.op in ("conv2d", "fully_connected") \
                and not n.attrs.get("groups", 1) > 1:  # channel groups: no packed filter
            rows, k = n.weight.shape[0], n.weight.size // n.weight.shape[0]
            bits = w_bits(n)
            total += rows * (-(-k // 16)) * 2 * bits - align4(-(-rows * k * bits // 8))
    return total


def layer_kernels(graph: Any, shape: CodeShape | None = None,
                  packed: frozenset[str] = frozenset(),
                  unpacked: frozenset[str] = frozenset()) -> list[str]:
    """The kernel each layer-based node calls in an export (none for reshapes, adds fused
    into their convolution and the patch stage's nodes), as `codegen.export._Builder._portable`
    chooses it; `packed` names the layers on the packed sub-byte kernels, `unpacked` those on
    `mpq_conv2d_unpacked`."""
    fused, fused_convs, inplace, skip = _conv_sets(graph, shape)
    out = []
    for n in graph.nodes:
        if n.op == "reshape" or n.name in fused or n.name in skip:
            continue
        if n.name in packed and (n.op == "conv2d" and n.name in inplace
                                 or n.op in ("avg_pool", "max_pool")):
            out.append(GROUPED_KERNELS["depthwise_inplace" if n.op == "conv2d"
                                       else _NODE_KERNELS[n.op]])
        elif n.name in packed:
            out.append("packed_conv2d_add" if n.name in fused_convs else f"packed_{n.op}")
        elif n.name in unpacked:
            out.append("conv2d_add_unpacked" if n.name in fused_convs else "conv2d_unpacked")
        elif n.op == "conv2d":
            out.append("conv2d_add" if n.name in fused_convs else
                       "depthwise_inplace" if n.name in inplace else "conv2d")
        else:
            out.append(_node_kernel(graph, n))
    return out


#: Kernel of a stage node (`codegen.export._stage`); convolutions as in `layer_kernels`.
_STAGE_KERNELS = {"conv2d": "conv2d", "add": "add", "avg_pool": "avgpool",
                  "max_pool": "maxpool", "mul": "mul", "sub": "sub", "prelu": "prelu",
                  "activation": "activation"}


def stage_calls(graph: Any, shape: CodeShape,
                packed: frozenset[str] = frozenset()) -> list[tuple[str, int]]:
    """(kernel, int16 fields per geometry row) of each call of the patch stage, as
    `codegen.export._stage` emits them: a row holds (y0, x0, h, w, stored_w) per input (the
    fused residual counts as one), the same for the output, then the top/left padding. A
    depthwise / pooling node in `packed` calls its channel-group kernel (`GROUPED_KERNELS`;
    the mixed branch's)."""
    by_name = {n.name: n for n in graph.nodes}
    fused = {add for add, _ in shape.fused}
    fused_convs = {conv for _, conv in shape.fused}
    out = []
    for name in shape.stage_nodes:
        node = by_name[name]
        kernel = _STAGE_KERNELS.get(node.op)
        if shape.pooled and name == shape.stage_nodes[-1]:
            kernel = "avgpool_accumulate"  # each patch adds its tile to the pool's sums
        if name in fused or kernel is None:
            continue  # fused into its conv (an unsupported op fails the export instead)
        inputs = len(node.inputs)
        out_t = node.outputs[0]
        if node.op == "conv2d" and name in fused_convs:
            kernel, inputs = "conv2d_add", inputs + 1
            add = next(a for a, c in shape.fused if c == name)
            out_t = by_name[add].outputs[0]
        elif node.op == "conv2d" and name in shape.inplace:
            kernel = "depthwise_inplace"
        if name in packed and kernel in GROUPED_KERNELS:
            kernel = GROUPED_KERNELS[kernel]
        # with a line buffer, each row ends with (restore, save from, save) rows
        out.append((kernel, 5 * inputs + 7 + (3 if shape.lines and out_t in shape.lines else 0)))
    return out


def line_buffer_code_bytes(entry: dict[str, Any], shape: CodeShape, median_call: int) -> int:
    """Code of the line-buffer wrappers (`templates/c/mpq_model.c.j2`): an estimate, not yet
    measured by `tools/code_sizes.py` — two `mpq_copy_view` calls per map with a line buffer
    and a skip test per stage call (a quarter of a call)."""
    if shape.lines is None:
        return 0
    copy = int(entry["per_call"].get("copy_view", median_call))
    return 2 * copy * len(shape.lines) + (median_call // 4) * len(shape.stage_nodes)


def stage_table_bytes(graph: Any, shape: CodeShape) -> int:
    """Flash of the stage's geometry tables (`mpq_geo_<i>`: patches × fields int16) and, with
    VDPC, the classified map's byte count per patch (int32 each)."""
    geo = sum(2 * fields * shape.patches for _, fields in stage_calls(graph, shape))
    return geo + (4 * shape.patches if shape.vdpc else 0)


def stage_branch_flash(graph: Any, shape: CodeShape | None,
                       tables_differ: Any = None) -> int:
    """Flash of the VDPC outlier branch's own parameters (`codegen.export._stage`): per stage
    convolution an int32 bias, multiplier and shift per output channel (`mpq_l<i>_outlier_*`),
    per stage activation its 256-byte table when it differs from the mixed branch's.
    `tables_differ(node) -> bool` decides the latter; without it every table is counted (the
    search's bound before the bits are chosen)."""
    if shape is None or not shape.vdpc:
        return 0
    by_name = {n.name: n for n in graph.nodes}
    total = 0
    for name in shape.stage_nodes:
        node = by_name[name]
        if node.op == "conv2d":
            total += 3 * 4 * node.weight.shape[0]
        elif node.op == "activation" and (tables_differ is None or tables_differ(node)):
            total += 256
    return total


def _node_kernel(graph: Any, n: Any) -> str:
    """The portable kernel family of a node that is not a conv (export's `_portable` rule)."""
    if n.op in ("pad", "slice"):
        return "copy_block"
    if n.op == "concat":
        channels = n.attrs["axis"] == 3 and len(graph.tensors[n.outputs[0]].shape) == 4
        return "copy_view" if channels and not n.attrs.get("constants") else "copy_block"
    if n.op == "resize":
        return "resize_bilinear" if n.attrs["mode"] == "bilinear" else "resize_nearest"
    return _NODE_KERNELS.get(n.op, n.op)


def _cpu_entry(cpu: str) -> dict[str, Any] | None:
    """The code-size table's entry for `cpu` (`core/fpu`), else the same core's, else any."""
    table = code_table().get("cpus", {})
    return table.get(cpu) or next((v for k, v in sorted(table.items())
                                   if k.split("/")[0] == cpu.split("/")[0]), None) \
        or next(iter(table.values()), None)


def _stage_entry(entry: dict[str, Any], vdpc: bool) -> dict[str, Any]:
    """The table's stage sizes for a stage with (`vdpc`) or without the outlier branch, else
    the other kind's (closer than nothing), else empty. Without VDPC, each size is the larger
    of the two kinds' where both have it: the plain samples are few (the Fashion demo's own
    stage is predicted 0.82 % low from them alone, 0.04 % with the larger)."""
    stage = entry.get("stage", {})
    if vdpc or "plain" not in stage or "vdpc" not in stage:
        return stage.get("vdpc" if vdpc else "plain") or next(iter(stage.values()), {})
    plain, other = stage["plain"], stage["vdpc"]
    per = dict(other.get("per_call", {}))
    for k, v in plain.get("per_call", {}).items():
        per[k] = max(int(v), int(per.get(k, v)))
    return {"per_call": per, "base": max(int(plain.get("base", 0)), int(other.get("base", 0)))}


def _stage_call_bytes(entry: dict[str, Any], stage: dict[str, Any], kernel: str,
                      median_call: int) -> int:
    """Code bytes of one stage call of `kernel` (its function and parameter blocks, geometry
    table apart): measured, or the layer call's plus the median stage-over-layer difference
    of the measured kernels (an estimate, for a kernel no sample plan had in its stage)."""
    per = stage.get("per_call", {})
    layer = entry["per_call"]
    if kernel not in per and kernel not in layer:  # a new entry point: the call it replaces
        kernel = _FAMILY_BASIS.get(kernel, kernel)
    if kernel in per:
        return int(per[kernel])
    deltas = sorted(int(v) - int(layer[k]) for k, v in per.items() if k in layer)
    delta = deltas[len(deltas) // 2] if deltas else 0
    return int(layer.get(kernel, median_call)) + delta


#: A kernel family that wraps another (the same sources, one more entry point): where the code
#: table lacks it (until `tools/code_sizes.py` runs again), it is bounded by the other's symbols
#: and calls plus `WRAPPER_BYTES`.
_FAMILY_BASIS = {"conv2d_unpacked": "conv2d", "conv2d_add_unpacked": "conv2d_add",
                 # the channel-group entry points: until the table has them, the plain
                 # family measured before the split (which held their code) bounds them
                 **{g: k for k, g in GROUPED_KERNELS.items()}}
#: A bound on such an entry point, measured with nm when they were added (arm-none-eabi-gcc
#: 12.2 -O2, Cortex-M0+ and M4): mpq_conv2d_unpacked 414-446 B, mpq_conv2d_add_unpacked
#: 692-712 B.
WRAPPER_BYTES = 768


def predicted_code_bytes(graph: Any, cpu: str = "cortex-m4/fpv4-sp-d16",
                         shape: CodeShape | None = None,
                         packed: frozenset[str] = frozenset(), either: bool = False,
                         unpacked: frozenset[str] = frozenset(),
                         unpacked_exact: bool = False) -> int:
    """Flash of the code and constant parameter blocks an export of `graph` links for `cpu`
    (`core/fpu`): the union of the symbols its kernel families pull in, plus each call's bytes
    in `mpq_model.c`, plus its base — all measured (`tools/code_sizes.py`); with a patch stage
    (`shape`) its calls, geometry tables, patch loop and VDPC test, measured the same way. A
    family or call the table lacks counts `UNKNOWN_FAMILY_BYTES` / the median call. The
    `unpacked` layers may each run mpq_conv2d instead (a bound over both), unless
    `unpacked_exact` says they are the export's own choice (`unpacked_layers` with the
    scratch the plan gives them)."""
    entry = _cpu_entry(cpu)
    unpacked = unpacked - packed
    kernels = layer_kernels(graph, shape, packed, unpacked)
    calls_in_stage = stage_calls(graph, shape, packed) if shape is not None else []
    families = set(kernels) | {k for k, _ in calls_in_stage}
    if shape is not None and shape.vdpc:  # the all-8-bit outlier branch calls the plain one
        families |= {k for k, _ in stage_calls(graph, shape)}
    if shape is not None and shape.lines:
        families.add("copy_view")  # the line buffers' copies
    if shape is not None and shape.pooled:
        families.add("avgpool_finish")  # the pool's means after the last patch
    # `either`: a bound over packed or not, per layer; the `unpacked` layers may run
    # mpq_conv2d instead (weights too large for the plan's scratch): a bound over both
    plain = layer_kernels(graph, shape) if either else \
        layer_kernels(graph, shape, packed) if unpacked and not unpacked_exact else kernels
    families |= set(plain)
    if entry is None:  # no table at all (a broken install): the old estimate
        return 8192 + UNKNOWN_FAMILY_BYTES * len(families)
    per_call = entry["per_call"]
    median_call = sorted(per_call.values())[len(per_call) // 2] if per_call else 160
    symbols: dict[str, int] = {}
    unknown = 0
    for family in sorted(families):
        if family in entry["families"]:
            symbols.update(entry["families"][family])
        elif family in _FAMILY_BASIS and _FAMILY_BASIS[family] in entry["families"]:
            # a family the table has not measured yet: the one it wraps, plus the unknown bound
            symbols.update(entry["families"][_FAMILY_BASIS[family]])
            unknown += WRAPPER_BYTES
        else:
            unknown += UNKNOWN_FAMILY_BYTES
    calls = sum(max(per_call.get(k, per_call.get(_FAMILY_BASIS.get(k, k), median_call)),
                    per_call.get(q, median_call))
                for k, q in zip(kernels, plain, strict=True))
    if shape is not None:
        stage = _stage_entry(entry, shape.vdpc)
        calls += sum(_stage_call_bytes(entry, stage, k, median_call) for k, _ in calls_in_stage)
        calls += int(stage.get("base", 0)) + stage_table_bytes(graph, shape)
        calls += line_buffer_code_bytes(entry, shape, median_call)
        if shape.pooled:  # zeroing the sums and the finishing call: not measured, a call each
            calls += 2 * int(per_call.get("avgpool", median_call))
    return int(entry["base"]) + sum(symbols.values()) + unknown + calls


def board_cpu(board: Any) -> str:
    """`core/fpu` of a Board or of a plan's board dict (the code-size table's key)."""
    if isinstance(board, dict):
        return f"{board.get('core', 'cortex-m4')}/{board.get('fpu', 'fpv4-sp-d16')}"
    return f"{board.core}/{board.fpu}"


# -- stack ---------------------------------------------------------------------------------------

#: GCC's call-graph dump (`-fcallgraph-info=su`): one VCG file per source, `<output>-<src>.ci`.
STACK_FLAG = "-fcallgraph-info=su"
_CI_NODE = re.compile(r'node: \{ title: "([^"]+)" label: "[^"]*\\n(\d+) bytes \(([a-z,]+)\)')
_CI_EDGE = re.compile(r'edge: \{ sourcename: "([^"]+)" targetname: "([^"]+)"')


def read_call_graph(ci_files: list[Path]) -> tuple[dict[str, int], dict[str, set[str]]]:
    """Frame bytes per function and callees per function from GCC's `.ci` files. Static
    functions are titled `file:name`, global ones by name, so edges resolve across files.
    A frame GCC marks `dynamic` (alloca, VLA) cannot be bounded: an MpqError names it."""
    frames: dict[str, int] = {}
    calls: dict[str, set[str]] = {}
    for path in ci_files:
        text = path.read_text(encoding="utf-8", errors="replace")
        for title, size, kind in _CI_NODE.findall(text):
            if "dynamic" in kind and "bounded" not in kind:
                raise MpqError(f"{title}: its stack frame is dynamic, cannot be bounded")
            frames[title] = int(size)
        for src, dst in _CI_EDGE.findall(text):
            calls.setdefault(src, set()).add(dst)
    return frames, calls


#: GCC's call graph names an indirect call only `__indirect_call`. The kernels' indirect calls
#: and what they can reach (by name prefix; from the pointers each one is given):
#: mpq__conv calls its group loop (`c.group`), the group loops their quad dot products
#: (`quads`/`tquads`, set by mpq__conv), mpq__dot2 a quad dot product from the
#: `mpq__quads_x`/`mpq__tquads_x` tables, the packed fully connected layer its output loop
#: (`mpq__pk_out_for`). tests/test_budget.py checks every indirect call site of the kernels is
#: listed and every function whose address the kernels take matches a prefix here.
INDIRECT_CALL = "__indirect_call"
INDIRECT_TARGETS: dict[str, tuple[str, ...]] = {
    "mpq__conv": ("mpq__group_",),
    "mpq__group_quads": ("mpq__quads_", "mpq__tquads_"),
    "mpq__group_tquads": ("mpq__quads_", "mpq__tquads_"),
    "mpq__dot2": ("mpq__quads_", "mpq__tquads_"),
    "mpq_packed_fully_connected": ("mpq__pk_outputs_",),
}


def bare_name(title: str) -> str:
    """A call-graph title without its `file:` part (static functions are `file:name`)."""
    return title.rsplit(":", 1)[-1]


def stack_depth(frames: dict[str, int], calls: dict[str, set[str]], root: str) -> int:
    """Deepest stack of a call from `root`: its frame plus its deepest callee's, over the
    static call graph (GCC `-fcallgraph-info=su`; a function without a frame record — a
    libgcc helper — counts 0, leaf helpers of a few words). An indirect call reaches every
    function its caller's `INDIRECT_TARGETS` prefixes name; one from a caller not listed
    there cannot be bounded, nor can recursion: both are refused in one line."""
    memo: dict[str, int] = {}

    def callees(f: str) -> set[str]:
        out = set(calls.get(f, ()))
        if INDIRECT_CALL in out:
            out.discard(INDIRECT_CALL)
            prefixes = INDIRECT_TARGETS.get(bare_name(f))
            if prefixes is None:
                raise MpqError(f"{f}: an indirect call to functions mpq does not know, the "
                               "stack cannot be bounded")
            out |= {g for g in frames if bare_name(g).startswith(prefixes)}
        return out

    def depth(f: str, path: tuple[str, ...]) -> int:
        if f in path:
            raise MpqError(f"{f}: recursive call, the stack cannot be bounded")
        if f not in memo:
            memo[f] = frames.get(f, 0) + max((depth(g, (*path, f)) for g in callees(f)),
                                              default=0)
        return memo[f]

    return depth(root, ())


def measured_stack(build_dir: Path, root: str = "mpq_model_run",
                   also: Sequence[Path] = ()) -> int:
    """The deepest stack a call of `root` can take in a build compiled with `STACK_FLAG`
    (its `.ci` files in `build_dir`, and `also`: a library's, CMSIS-NN's, compiled apart):
    GCC's own frame sizes over the static call graph."""
    files = sorted(Path(build_dir).glob("*.ci"))
    if not files:
        raise MpqError(f"{build_dir}: no call graph (.ci) files; build with {STACK_FLAG}")
    missing = [p for p in also if not Path(p).is_file()]
    if missing:
        raise MpqError(f"{missing[0]}: no call graph for this library object; compile it "
                       f"with {STACK_FLAG}")
    files += [Path(p) for p in also]
    frames, calls = read_call_graph(files)
    if root not in frames:
        raise MpqError(f"{root}: not in the build's call graph")
    return stack_depth(frames, calls, root)


#: The kernels a layer-based call of a family may take instead (`codegen.export._portable`):
#: the packed sub-byte kernels (`codegen.packed.packed_choice`) and mpq_conv2d_unpacked
#: (`codegen.packed.unpack_choice`).
KERNEL_ALTERNATIVES = {"conv2d": ("packed_conv2d", "conv2d_unpacked"),
                       "conv2d_add": ("packed_conv2d_add", "conv2d_add_unpacked"),
                       "fully_connected": ("packed_fully_connected",)}


def predicted_stack_bytes(graph: Any, cpu: str = "cortex-m4/fpv4-sp-d16",
                          shape: CodeShape | None = None) -> int:
    """The model's stack bound: `mpq_model_run`'s own frame (the largest over the measured
    sample exports, patch stages included) plus the deepest kernel entry the model calls,
    each measured from GCC's call graph by `tools/code_sizes.py` (`stack` in the table);
    0 without a table. A layer-based conv or fully connected call counts every kernel it may
    take (`KERNEL_ALTERNATIVES`: which one depends on the bits and the scratch slots, chosen
    after the search plans against this bound)."""
    entry = _cpu_entry(cpu)
    if entry is None or "stack" not in entry:
        return 0
    stack = entry["stack"]
    layer = set(layer_kernels(graph, shape))
    kernels = layer | {alt for k in layer & set(KERNEL_ALTERNATIVES)
                       for alt in KERNEL_ALTERNATIVES[k]}
    if shape is not None:
        kernels |= {k for k, _ in stage_calls(graph, shape)}
        if shape.pooled:
            kernels.add("avgpool_finish")
    # a sub-byte depthwise / pooling may take its channel-group entry point (a bound)
    kernels |= {GROUPED_KERNELS[k] for k in kernels if k in GROUPED_KERNELS}
    deepest = max((int(stack["families"].get(k, max(stack["families"].values(), default=0)))
                   for k in kernels), default=0)
    return int(stack["run"]) + deepest
