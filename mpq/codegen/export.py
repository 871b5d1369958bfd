"""`mpq export`: a plan → C sources for the portable or the cmsis-nn backend (DESIGN §8).

The plan (with the model it pins) becomes one `Layer` record per kernel call — which kernel,
its constant parameters, and where each operand lives (the caller's input, the arena at the
plan's offset, or the caller's output buffer) — and the records are rendered through the
Jinja2 templates in `templates/c/`. Nothing here writes C syntax itself: Python computes
numbers, the templates lay them out. The kernels are plain C (`kernels/`, shipped in the
package): an export gets a verbatim copy of the library files its kernels need
(`library_files`).

With the cmsis-nn backend, the layer-based layers that CMSIS-NN computes exactly call it
instead (`mpq.codegen.cmsis` says which and why); the patch stage stays portable.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path, PurePath
from typing import Any

import numpy as np

from mpq.boards import Board, plan_board
from mpq.codegen import cmsis, packed
from mpq.codegen.blocks import concat_blocks, pad_block, slice_block
from mpq.codegen.render import linker_script, render
from mpq.errors import MpqError
from mpq.fileio import write_if_changed
from mpq.ir import LAYOUT_NHWC, Graph, Node
from mpq.memory import align_up, kernel_scratch_bytes, packed_bytes, padded_plane_bytes
from mpq.plan import Plan, plan_io, plan_quant_model, plan_scratch, plan_scratch_slots
from mpq.quant import arith, weights
from mpq.quant.qmodel import QuantModel
from mpq.regions import section_of
from mpq.resources import data_dir
from mpq.sim import quantize_input

#: The kernel library's headers, copied into every export: the API (mpq_kernels.h) and the
#: helpers its files share (mpq_support.h).
LIBRARY_HEADERS = ("mpq_kernels.h", "mpq_support.h")
_DOT = ("mpq_dot.c", "mpq_support.c")
#: The library sources each kernel (an export context's `kernels` name) is compiled from.
KERNEL_SOURCES: dict[str, tuple[str, ...]] = {
    "conv2d": ("mpq_conv.c", *_DOT),
    "conv2d_add": ("mpq_conv.c", *_DOT),
    "depthwise_inplace": ("mpq_depthwise.c", "mpq_support.c"),
    # 4- and 2-bit depthwise / pooling by channel groups (issue 15; `packed.group_choice`):
    # entry points of their own, so that int8 models do not link that code
    "depthwise_inplace_grouped": ("mpq_depthwise.c", "mpq_support.c"),
    "fully_connected": ("mpq_fully_connected.c", *_DOT),
    "add": ("mpq_add.c", "mpq_support.c"),
    "avgpool": ("mpq_pool.c",),
    "maxpool": ("mpq_pool.c",),
    "avgpool_grouped": ("mpq_pool.c",),
    "avgpool_accumulate": ("mpq_pool.c",),
    "avgpool_finish": ("mpq_pool.c",),
    "maxpool_grouped": ("mpq_pool.c",),
    "softmax": ("mpq_softmax.c",),
    "copy_view": ("mpq_copy.c",),
    "mean": ("mpq_reduce.c", "mpq_support.c"),
    "resize_nearest": ("mpq_resize.c",),
    "resize_bilinear": ("mpq_resize.c",),
    "mul": ("mpq_elementwise.c", "mpq_support.c"),
    "sub": ("mpq_elementwise.c", "mpq_support.c"),
    "prelu": ("mpq_elementwise.c", "mpq_support.c"),
    "copy_block": ("mpq_block.c",),
    "activation": ("mpq_activation.c",),
    # packed sub-byte kernels (issue 15 item 2; selected by mpq.codegen.packed)
    "packed_conv2d": ("mpq_packed.c", "mpq_support.c"),
    "packed_fully_connected": ("mpq_packed.c", "mpq_support.c"),
    "packed_conv2d_add": ("mpq_packed.c", "mpq_support.c"),
    # sub-byte operands unpacked to int8 at int8 speed (issue 15; mpq.codegen.packed)
    "conv2d_unpacked": ("mpq_conv.c", *_DOT),
    "conv2d_add_unpacked": ("mpq_conv.c", *_DOT),
}


#: Kernels whose calls a layer written above its input runs one output row at a time, last
#: row first (`_Builder._reverse_rows`; `memory.OVERLAP_OPS`).
REVERSE_KERNELS = ("conv2d", "packed_conv2d", "avgpool", "maxpool", "conv2d_unpacked",
                   "avgpool_grouped", "maxpool_grouped")


def library_files(kernels: list[str] | tuple[str, ...] | set[str]) -> list[str]:
    """The kernel library files an export calling `kernels` needs: both headers and the
    sources of each kernel (`KERNEL_SOURCES`), sorted."""
    unknown = sorted(set(kernels) - set(KERNEL_SOURCES))
    if unknown:  # pragma: no cover - the builder only emits known kernels
        raise ValueError(f"no kernel library source for kernel '{unknown[0]}'")
    return sorted({*LIBRARY_HEADERS, *(f for k in kernels for f in KERNEL_SOURCES[k])})


def library_sources(kernels: list[str] | tuple[str, ...] | set[str]) -> dict[str, str]:
    """File name → text of the `library_files` of `kernels`, read verbatim from `kernels/`."""
    root = data_dir("kernels")
    return {name: (root / name).read_text(encoding="utf-8") for name in library_files(kernels)}


def c_sources(files: dict[str, str] | list[str]) -> list[str]:
    """The C sources of an export (file names ending in .c, sorted): what a build compiles."""
    return sorted(name for name in files if name.endswith(".c"))


@dataclass
class Operand:
    """Where a tensor lives and how a kernel sees it (an `mpq_view`)."""

    name: str
    base: str  # C expression of the storage start: "mpq_arena + 128", "(void *)input", …
    bits: int
    h: int
    w: int
    c: int


@dataclass
class Layer:
    """One kernel call of the generated `mpq_model_run`."""

    index: int
    name: str  # the IR node(s), for the comment above the call
    kernel: str  # conv2d, conv2d_add, depthwise_inplace, fully_connected, add, …
    inputs: list[Operand]
    output: Operand
    params: dict[str, int] = field(default_factory=dict)
    weight: dict[str, Any] | None = None  # symbol names and filter dims
    channel_c0: list[int] = field(default_factory=list)  # concat: channel offset per input
    cmsis: cmsis.CmsisCall | None = None  # kernel "cmsis": the CMSIS-NN call
    blocks: list[Any] = field(default_factory=list)  # copy_block: `mpq.codegen.blocks.Block`s
    fill: int | None = None  # copy_block: value the whole output is set to first (pad)
    out_elements: int = 0  # copy_block: elements of the output buffer
    block_sources: list[str] = field(default_factory=list)  # copy_block: C source per block
    # Rows run last to first, one kernel call per output row (its output starts above its
    # input: `schedule.overlap` D < 0, `memory.reverse_overlap_shift`): rows, stride_h,
    # pad_top, span (the window's rows, dilation included) and the input's rows.
    reverse: dict[str, int] | None = None
    # The call's scratch argument: the separate array, or its slot in the arena
    # (`schedule.scratch`, `memory.scratch_buffers`)
    scratch: str = "mpq_scratch"


@dataclass
class ConstArray:
    """A constant array of mpq_weights.c."""

    symbol: str
    ctype: str  # "uint8_t" (packed weights) or "int32_t"
    values: list[int]


def _view_dims(shape: tuple[int, ...]) -> tuple[int, int, int]:
    """(h, w, c) of a tensor as a view: rank-4 NHWC, or [1, K] as 1×1×K."""
    if len(shape) == 4:
        return shape[1], shape[2], shape[3]
    return 1, 1, int(np.prod(shape[1:]))


def io_quant(scale: float, zero_point: int, where: str) -> dict[str, Any]:
    """The constants of the generated I/O helpers for one int8 graph input or output.

    mpq quantises and dequantises with the scale rounded to float32 (`mpq.sim`), so that is the
    scale the helpers use: `scale_f32` (printed with %.9g it reads back as the same float32),
    and its exact integer form scale_f32 = mantissa·2^exponent with an odd mantissa < 2^24, from
    which the integer-only helpers compute without any approximation. A scale that is not a
    positive finite float32 has no meaning as a quantisation step: MpqError.
    """
    s = float(np.float32(scale))
    if not (np.isfinite(s) and s > 0):
        raise MpqError(f"export: {where} scale {scale!r} is not a positive finite float32")
    frac, exp = math.frexp(s)
    mantissa, exponent = int(frac * (1 << 24)), exp - 24  # exact: s has at most 24 bits
    while mantissa % 2 == 0:
        mantissa, exponent = mantissa // 2, exponent + 1
    return {"scale_f32": s, "scale_mantissa": mantissa, "scale_exponent": exponent,
            "zero_point": int(zero_point)}


def _plan_int(value: Any, where: str) -> int:
    """A number from the plan that lands in C code as a literal: an int, never text (a plan is
    untrusted, and text there would be compiled)."""
    if not isinstance(value, int) or isinstance(value, bool):
        raise MpqError(f"plan: {where} must be an integer, got {json.dumps(value)[:40]}")
    return value


class _Builder:
    def __init__(self, plan: Plan, graph: Graph, qm: QuantModel,
                 backend: str = "portable") -> None:
        self.plan = plan
        self.backend = backend
        self.cmsis_scratch = 0
        self.report: list[dict[str, Any]] = []  # per layer: call, backend, reason if portable
        self.graph = graph
        self.qm = qm
        self.tensors = {t.name: t for t in plan.tensors}
        self.layers: list[Layer] = []
        self.consts: list[ConstArray] = []
        self.scratch = 0
        fused = plan.schedule.get("fused_adds", {})
        self.fused_by_conv = {v["conv"]: (add, v["skip"]) for add, v in fused.items()}
        self.fused_adds = set(fused)
        self.inplace = set(plan.schedule.get("inplace_depthwise", []))
        self.overlap = set(plan.schedule.get("overlap", {}))  # written inside their input
        # ... above it, rows last to first (`memory.reverse_overlap_shift`)
        self.reverse = {n for n, d in plan.schedule.get("overlap", {}).items() if d < 0}
        self.skip_nodes: set[str] = set()
        self.packed_notes: dict[int, dict[str, Any]] = {}  # layer index -> used / why not
        self.unpack_notes: dict[int, dict[str, Any]] = {}  # mpq_conv2d_unpacked: used / why
        # sub-byte depthwise / pooling: channel groups used (and SIMD rows), or why not
        self.group_notes: dict[int, dict[str, Any]] = {}
        self.io = plan_io(plan)
        self.slots = plan_scratch_slots(plan)  # node -> (arena offset, bytes) of its scratch
        self.scratch_arena = plan_scratch(plan) == "arena"
        self.scratch_of: dict[str, str] = {}  # node -> C expression of its scratch

    def operand(self, tensor: str) -> Operand:
        g = self.graph
        bits = self.qm.acts[tensor].bits
        h, w, c = _view_dims(g.tensors[tensor].shape)
        if tensor in g.inputs and self.io == "external":
            base = "(void *)input"
        else:
            offset = self.tensors[tensor].offset
            if offset is None:
                raise MpqError(f"plan has no arena offset for tensor '{tensor}'")
            base = f"mpq_arena + {_plan_int(offset, 'the offset of a tensor')}"
        return Operand(tensor, base, bits, h, w, c)

    def weights(self, i: int, node: Node) -> dict[str, Any]:
        lq = self.qm.layers[node.name]
        w = lq.weight
        dims = w.shape if w.ndim == 4 else (w.shape[0], 1, 1, w.shape[1])
        sym = f"mpq_l{i}"
        enc = weights.encode(w, lq.weight_scheme, lq.weight_bits, lq.weight_codebook,
                             f"layer '{node.name}'")
        self.consts += [
            ConstArray(f"{sym}_w", "uint8_t", enc.data.tolist()),
            ConstArray(f"{sym}_b", "int32_t", [int(v) for v in lq.bias]),
            ConstArray(f"{sym}_m", "int32_t", [int(v) for v in lq.multiplier]),
            ConstArray(f"{sym}_s", "int32_t", [int(v) for v in lq.shift]),
        ]
        fmt = {}  # a LINEAR filter keeps the short initialiser (format 0, no codebook)
        if enc.format != weights.LINEAR:
            fmt["format"] = weights.FORMATS[enc.format]
        if enc.codebook is not None:
            self.consts.append(ConstArray(f"{sym}_cb", "int8_t", enc.codebook.tolist()))
            fmt["codebook"] = f"{sym}_cb"
        return {"sym": sym, "bits": lq.weight_bits, "n": dims[0], "h": dims[1], "w": dims[2],
                "c": dims[3], **fmt}

    def conv_params(self, node: Node) -> dict[str, int]:
        a = node.attrs
        lq = self.qm.layers[node.name]
        return {"stride_h": a["strides"][0], "stride_w": a["strides"][1],
                "dilation_h": a["dilations"][0], "dilation_w": a["dilations"][1],
                "pad_top": a["pads"][0], "pad_left": a["pads"][1], "groups": a["groups"],
                "input_zp": self.qm.acts[node.inputs[0]].zero_point,
                "output_zp": self.qm.acts[node.outputs[0]].zero_point,
                "act_min": lq.act_min, "act_max": lq.act_max}

    def add_params(self, node: Node, first: str) -> dict[str, int]:
        """TFLM add constants with `first` as input a (the kernel's argument order)."""
        lq = self.qm.layers[node.name]
        e = lq.extra
        a_t, b_t = node.inputs
        swap = first != a_t
        a, b = (b_t, a_t) if swap else (a_t, b_t)
        ma, sa, mb, sb = (e["m2"], e["s2"], e["m1"], e["s1"]) if swap else (
            e["m1"], e["s1"], e["m2"], e["s2"])
        return {"a_zp": self.qm.acts[a].zero_point, "a_multiplier": ma, "a_shift": sa,
                "b_zp": self.qm.acts[b].zero_point, "b_multiplier": mb, "b_shift": sb,
                "left_shift": e["left_shift"],
                "output_zp": self.qm.acts[node.outputs[0]].zero_point,
                "output_multiplier": e["mo"], "output_shift": e["so"],
                "act_min": lq.act_min, "act_max": lq.act_max}

    def conv_scratch(self, node: Node, inplace: bool) -> int:
        """The kernels' own scratch formulas (`memory.kernel_scratch_bytes`)."""
        return kernel_scratch_bytes(node, self.graph, inplace)

    def use_scratch(self, node: Node, need: int) -> None:
        """Give a layer-based call its `need` bytes of scratch: its arena slot when the plan
        keeps the scratch there (`schedule.scratch`; MpqError when the slot is missing or
        smaller), else the separate array, grown to fit."""
        if need == 0:
            return
        if not self.scratch_arena:
            self.scratch = max(self.scratch, need)
            return
        if node.name not in self.slots or self.slots[node.name][1] < need:
            raise MpqError(f"plan: schedule.scratch.steps.{node.name} must hold the kernel's "
                           f"{need} B of scratch, got "
                           f"{self.slots[node.name][1] if node.name in self.slots else 'none'}")
        self.scratch_of[node.name] = f"(void *)(mpq_arena + {self.slots[node.name][0]})"

    def cmsis_weights(self, i: int, node: Node, call: cmsis.CmsisCall) -> dict[str, Any]:
        """Weights, bias and (per-channel calls) requantisation arrays of a CMSIS-NN call, in
        CMSIS-NN's weight layout, packed like mpq's (int4: element 2k in the low nibble)."""
        lq = self.qm.layers[node.name]
        sym = f"mpq_l{i}"
        w = cmsis.cmsis_weights(lq.weight, call.weight_layout or "ohwi")
        self.consts += [
            ConstArray(f"{sym}_w", "uint8_t", arith.pack(w, lq.weight_bits).tolist()),
            ConstArray(f"{sym}_b", "int32_t", [int(v) for v in lq.bias]),
        ]
        if call.kind != "fc_s4":
            self.consts += [
                ConstArray(f"{sym}_m", "int32_t", [int(v) for v in lq.multiplier]),
                ConstArray(f"{sym}_s", "int32_t", [int(v) for v in lq.shift]),
            ]
        return {"sym": sym, "bits": lq.weight_bits, "n": int(lq.weight.shape[0])}

    def build(self) -> None:
        nodes = self.graph.nodes
        by_name = {n.name: n for n in nodes}
        fused_convs = set(self.fused_by_conv)
        for i, node in enumerate(nodes):
            if node.name in self.fused_adds or node.op == "reshape" \
                    or node.name in self.skip_nodes:
                continue  # fused into its conv / a view of its input / run per patch
            out = self.operand(node.outputs[0])
            ins = [self.operand(t) for t in node.inputs]
            reason = None
            if self.backend == "cmsis-nn" and node.name in self.overlap:
                # The plan's overlap shift is safe for the portable kernels' raster write
                # order (`memory.overlap_shift`); CMSIS-NN's order is not guaranteed.
                reason = "output overlaps its input (schedule.overlap): portable write order"
            elif self.backend == "cmsis-nn":
                name = node.name
                if node.name in fused_convs:
                    call, name, ins, out = self._cmsis_fused(node, by_name, ins)
                else:
                    call = cmsis.plan_call(node, self.graph, self.qm, self.inplace, fused_convs)
                if isinstance(call, cmsis.CmsisCall):
                    self.cmsis_scratch = max(self.cmsis_scratch, call.scratch)
                    weight = self.cmsis_weights(i, node, call) if call.weight_layout else None
                    self.layers.append(Layer(i, name, "cmsis", ins, out, weight=weight,
                                             cmsis=call))
                    self.report.append({"index": i, "name": name,
                                        "backend": "cmsis-nn", "call": call.label})
                    continue
                reason = call
                ins = [self.operand(t) for t in node.inputs]
                out = self.operand(node.outputs[0])
            n_before = len(self.layers)
            self._portable(i, node, by_name, ins, out)
            for layer in self.layers[n_before:]:
                # no slot: the kernel needs no scratch (it may then be NULL, mpq_kernels.h)
                layer.scratch = self.scratch_of.get(
                    node.name, "NULL" if self.scratch_arena else layer.scratch)
            if node.name in self.reverse:
                self._reverse_rows(node, self.layers[n_before:])
            for layer in self.layers[n_before:]:
                entry = {"index": i, "name": layer.name, "backend": "portable",
                         "call": f"mpq_{layer.kernel}"}
                if reason is not None:
                    entry["reason"] = reason
                if i in self.packed_notes:  # conv / fully connected: packed, or why not
                    entry["packed"] = self.packed_notes[i]
                if i in self.unpack_notes:  # sub-byte operands: unpacked to int8, or why not
                    entry["unpacked"] = self.unpack_notes[i]
                if i in self.group_notes:  # sub-byte depthwise / pooling: channel groups
                    entry["channel_groups"] = self.group_notes[i]
                self.report.append(entry)

    def _reverse_rows(self, node: Node, layers: list[Layer]) -> None:
        """Mark the one call of a node the plan writes above its input (`schedule.overlap`
        D < 0) to run its output rows last to first, each row a kernel call on that row's
        input window (`memory.reverse_overlap_shift` assumes that order)."""
        if len(layers) != 1 or layers[0].kernel not in REVERSE_KERNELS:
            raise MpqError(f"plan: schedule.overlap writes '{node.name}' above its input, but "
                           f"its kernel cannot run its rows in reverse")
        a = node.attrs
        kh = a["kernel"][0] if "kernel" in a else node.weight.shape[1]
        dh = a.get("dilations", (1, 1))[0]
        layers[0].reverse = {"rows": int(self.graph.tensors[node.outputs[0]].shape[1]),
                             "stride": int(a["strides"][0]), "pad_top": int(a["pads"][0]),
                             "span": int(dh * (kh - 1) + 1),
                             "in_h": int(self.graph.tensors[node.inputs[0]].shape[1])}

    def _cmsis_fused(self, node: Node, by_name: dict[str, Node], ins: list[Operand]
                     ) -> tuple[cmsis.CmsisCall | str, str, list[Operand], Operand]:
        """A conv fused with its residual add, for the cmsis-nn backend: the CMSIS-NN call (or
        why not), the layer's name, its operands (the conv's input, then the skip) and output
        (the add's, over the skip)."""
        add_name, skip = self.fused_by_conv[node.name]
        add = by_name[add_name]
        call = cmsis.plan_fused_call(node, add, skip, self.graph, self.qm, self.inplace,
                                     max([_plan_int(self.plan.predicted.get(
                                         "scratch_bytes", 0), "predicted.scratch_bytes"),
                                         *(b for _, b in self.slots.values())]))
        return (call, f"{node.name} + {add.name}", [ins[0], self.operand(skip)],
                self.operand(add.outputs[0]))

    def _portable(self, i: int, node: Node, by_name: dict[str, Node], ins: list[Operand],
                  out: Operand) -> None:
        """The portable kernel call of one layer-based node."""
        if node.op in ("conv2d", "fully_connected") and self._packed(i, node, ins, out):
            return
        if node.op == "conv2d" and node.name in self.fused_by_conv:
            add_name, skip = self.fused_by_conv[node.name]
            add = by_name[add_name]
            need = self._unpacked(i, node, ins)
            self.use_scratch(node, need or self.conv_scratch(node, False))
            self.layers.append(Layer(
                i, f"{node.name} + {add.name}", "conv2d_add_unpacked" if need else "conv2d_add",
                [ins[0], self.operand(skip)], self.operand(add.outputs[0]),
                {**self.conv_params(node), **{f"add_{k}": v for k, v in
                                              self.add_params(add, skip).items()}},
                self.weights(i, node)))
        elif node.op == "conv2d":
            inplace = node.name in self.inplace
            kernel = "depthwise_inplace" if inplace else "conv2d"
            need = self._unpacked(i, node, ins)
            if need:
                kernel = "conv2d_unpacked"
            self.use_scratch(node, need or self.conv_scratch(node, inplace))
            self.layers.append(Layer(i, node.name, kernel, ins, out,
                                     self.conv_params(node), self.weights(i, node)))
            if node.attrs["groups"] > 1 and self._group_note(i, node, kernel, ins[0], out):
                self.layers[-1].kernel = f"{kernel}_grouped"
        elif node.op == "fully_connected":
            lq = self.qm.layers[node.name]
            params = {"input_zp": self.qm.acts[node.inputs[0]].zero_point,
                      "output_zp": self.qm.acts[node.outputs[0]].zero_point,
                      "act_min": lq.act_min, "act_max": lq.act_max}
            self.layers.append(Layer(i, node.name, "fully_connected", ins, out, params,
                                     self.weights(i, node)))
        elif node.op == "add":
            self.layers.append(Layer(i, node.name, "add", ins, out,
                                     self.add_params(node, node.inputs[0])))
        elif node.op in ("avg_pool", "max_pool"):
            a = node.attrs
            lq = self.qm.layers[node.name]
            params = {"kernel_h": a["kernel"][0], "kernel_w": a["kernel"][1],
                      "stride_h": a["strides"][0], "stride_w": a["strides"][1],
                      "pad_top": a["pads"][0], "pad_left": a["pads"][1],
                      "act_min": lq.act_min, "act_max": lq.act_max}
            kernel = "avgpool" if node.op == "avg_pool" else "maxpool"
            if self._group_note(i, node, kernel, ins[0], out):
                kernel = f"{kernel}_grouped"
            self.layers.append(Layer(i, node.name, kernel, ins, out, params))
        elif node.op == "softmax":
            self.layers.append(Layer(i, node.name, "softmax", ins, out,
                                     dict(self.qm.layers[node.name].extra)))
        elif node.op in ("pad", "slice") or (node.op == "concat" and (not (
                node.attrs["axis"] == 3 and len(self.graph.tensors[node.outputs[0]].shape) == 4)
                or node.attrs.get("constants"))):
            self.layers.append(self._block_layer(i, node, ins, out))
        elif node.op == "concat":
            c0, offsets = 0, []
            for t in node.inputs:
                offsets.append(c0)
                c0 += self.graph.tensors[t].shape[-1]
            self.layers.append(Layer(i, node.name, "copy_view", ins, out,
                                     channel_c0=offsets))
        elif node.op == "mean":
            self.layers.append(Layer(i, node.name, "mean", ins, out, self.mean_params(node)))
        elif node.op == "resize" and node.attrs["mode"] == "bilinear":
            sym = f"mpq_l{i}"
            a = node.attrs
            (_, h, w, _), (_, ho, wo, _) = (self.graph.tensors[t].shape
                                            for t in (node.inputs[0], node.outputs[0]))
            for axis, (n_in, n_out) in (("y", (h, ho)), ("x", (w, wo))):
                taps = arith.bilinear_int_taps(n_in, n_out, a["align_corners"],
                                               a["half_pixel_centers"])
                for part, values in zip(("0", "1", "f"), taps, strict=True):
                    self.consts.append(ConstArray(f"{sym}_{axis}{part}", "int32_t",
                                                  [int(v) for v in values]))
            self.layers.append(Layer(i, node.name, "resize_bilinear", ins, out,
                                     weight={"sym": sym}))
        elif node.op == "resize":
            sym = f"mpq_l{i}"
            self.consts += [ConstArray(f"{sym}_rows", "int32_t", list(node.attrs["rows"])),
                            ConstArray(f"{sym}_cols", "int32_t", list(node.attrs["cols"]))]
            self.layers.append(Layer(i, node.name, "resize_nearest", ins, out,
                                     weight={"sym": sym}))
        elif node.op in ("mul", "sub", "prelu"):
            if "const" in node.attrs:  # the constant as an 8-bit view of a Flash array
                sym = f"mpq_l{i}_const"
                self.consts.append(ConstArray(sym, "int8_t",
                                              [int(v) for v in self.qm.layers[node.name].const]))
                c = Operand(sym, f"(void *){sym}", 8, *_view_dims(node.attrs["const_shape"]))
                ins = [c, ins[0]] if node.attrs.get("const_first") else [ins[0], c]
            self.layers.append(Layer(i, node.name, node.op, ins, out,
                                     self.elementwise_params(i, node)))
        elif node.op == "activation":
            self.layers.append(Layer(i, node.name, "activation", ins, out,
                                     weight=self.activation_table(i, node)))
        else:  # pragma: no cover - the IR has no other ops
            raise MpqError(f"export: op '{node.op}' of '{node.name}' has no kernel")

    def _unpacked(self, i: int, node: Node, ins: list[Operand]) -> int:
        """The scratch of `mpq_conv2d_unpacked` when a conv2d layer takes it
        (`packed.unpack_choice`: a sub-byte input or non-int8 weights, the unpacked operands
        within the plan's scratch), else 0; for such layers the choice and its reason go into
        `unpack_notes` (mpq_report.json)."""
        lq = self.qm.layers[node.name]
        linear = weights.storage(lq.weight_scheme, lq.weight_bits)[0] == 0
        if ins[0].bits == 8 and lq.weight_bits == 8 and linear:
            return 0
        shapes = [self.graph.tensors[t].shape for t in (node.inputs[0], node.outputs[0])]
        need = packed.unpacked_scratch(node, *shapes, ins[0].bits, lq.weight_bits, linear)
        why = packed.unpack_choice(
            node, ins[0].bits, lq.weight_bits, node.name in self.fused_by_conv,
            node.name in self.inplace, need, self._scratch_available(node), linear)
        self.unpack_notes[i] = {"used": why is None, **({"reason": why} if why else {})}
        return need if why is None else 0

    def _group_note(self, i: int, node: Node, kernel: str, x: Operand, out: Operand) -> bool:
        """Whether a depthwise or pooling layer with a 4- or 2-bit input runs its channels in
        byte groups (`packed.group_choice`): then the caller calls `mpq_<kernel>_grouped`
        instead of `mpq_<kernel>`. Noted in `group_notes` (mpq_report.json), with whether it
        takes the SIMD rows (`packed.group_simd`), or why not."""
        if x.bits == 8:
            return False
        core = plan_board(self.plan.board).core
        why = packed.group_choice(node, kernel, x.bits, x.c, core, x.base == out.base)
        self.group_notes[i] = ({"used": True, "simd": packed.group_simd(node, kernel, x.bits,
                                                                        x.c, core)}
                               if why is None else {"used": False, "reason": why})
        return why is None

    def _scratch_available(self, node: Node) -> int:
        """The scratch the plan already reserves for `node`: its own arena slot when the
        scratch is planned in the arena (`schedule.scratch`; sized for mpq_conv2d_unpacked
        where the search had room, `schedule.scratch.unpacked`), else the plan's one separate
        scratch."""
        if self.scratch_arena:
            return self.slots[node.name][1] if node.name in self.slots else 0
        return _plan_int(self.plan.predicted.get("scratch_bytes", 0), "predicted.scratch_bytes")

    def _packed(self, i: int, node: Node, ins: list[Operand], out: Operand) -> bool:
        """Emit the packed sub-byte kernel for a conv2d / fully_connected layer when
        `packed.packed_choice` allows it (True), noting in `packed_notes` either way."""
        lq = self.qm.layers[node.name]
        why = packed.packed_choice(
            node, plan_board(self.plan.board).core, ins[0].bits, lq.weight_bits,
            weights.storage(lq.weight_scheme, lq.weight_bits)[0],
            node.name in self.fused_by_conv, node.name in self.inplace)
        self.packed_notes[i] = {"used": why is None, **({"reason": why} if why else {})}
        if why is not None:
            return False
        w = lq.weight
        dims = w.shape if w.ndim == 4 else (w.shape[0], 1, 1, w.shape[1])
        input_zp = self.qm.acts[node.inputs[0]].zero_point
        words, cbias = packed.pack_filter(w, lq.weight_bits, lq.bias, ins[0].bits, input_zp)
        sym = f"mpq_l{i}"
        self.consts += [
            ConstArray(f"{sym}_pw", "uint32_t", [int(v) for v in words]),
            ConstArray(f"{sym}_pb", "int32_t", [int(v) for v in cbias]),
            ConstArray(f"{sym}_m", "int32_t", [int(v) for v in lq.multiplier]),
            ConstArray(f"{sym}_s", "int32_t", [int(v) for v in lq.shift]),
        ]
        k = int(dims[1] * dims[2] * dims[3])
        weight = {"sym": sym, "bits": lq.weight_bits, "n": dims[0], "h": dims[1],
                  "w": dims[2], "c": dims[3], "k": k}
        # the packed columns: two output pixels (conv), one (fully connected)
        self.use_scratch(node, kernel_scratch_bytes(node, self.graph, False, packed=True))
        if node.op == "conv2d" and node.name in self.fused_by_conv:
            # fused with the residual add that consumes it, as mpq_conv2d_add
            add_name, skip = self.fused_by_conv[node.name]
            add = next(n for n in self.graph.nodes if n.name == add_name)
            self.layers.append(Layer(
                i, f"{node.name} + {add.name}", "packed_conv2d_add",
                [ins[0], self.operand(skip)], self.operand(add.outputs[0]),
                {**self.conv_params(node), **{f"add_{k}": v for k, v in
                                              self.add_params(add, skip).items()}},
                weight))
        elif node.op == "conv2d":
            self.layers.append(Layer(i, node.name, "packed_conv2d", ins, out,
                                     self.conv_params(node), weight))
        else:
            params = {"input_zp": input_zp,
                      "output_zp": self.qm.acts[node.outputs[0]].zero_point,
                      "act_min": lq.act_min, "act_max": lq.act_max}
            self.layers.append(Layer(i, node.name, "packed_fully_connected", ins, out, params,
                                     weight))
        return True

    def mean_params(self, node: Node) -> dict[str, int]:
        """mpq_mean_params of a mean node: reduced axes, count, zero points, TFLM's (M, S)."""
        lq = self.qm.layers[node.name]
        axes = node.attrs["axes"]
        return {"reduce_h": int(1 in axes), "reduce_w": int(2 in axes),
                "reduce_c": int(3 in axes), "count": lq.extra["count"],
                "input_zp": self.qm.acts[node.inputs[0]].zero_point,
                "output_zp": self.qm.acts[node.outputs[0]].zero_point,
                "multiplier": lq.extra["multiplier"], "shift": lq.extra["shift"],
                "act_min": lq.act_min, "act_max": lq.act_max}

    def elementwise_params(self, i: int, node: Node) -> dict[str, Any]:
        """mpq_mul_params, the mpq_add_params of a sub (its inputs in the graph's order), or
        mpq_prelu_params with its int8 slope array (`mpq_l<i>_alpha`, one per channel)."""
        lq = self.qm.layers[node.name]
        e = lq.extra
        zp_out = self.qm.acts[node.outputs[0]].zero_point
        if node.op in ("mul", "sub"):
            za = self.qm.acts[node.inputs[0]].zero_point
            zb = self.qm.acts[node.inputs[-1]].zero_point
            if "const" in node.attrs:  # the constant's own zero point, in operand order
                za, zb = (e["const_zp"], za) if node.attrs.get("const_first") else \
                    (za, e["const_zp"])
            if node.op == "sub":
                return {"a_zp": za, "a_multiplier": e["m1"], "a_shift": e["s1"], "b_zp": zb,
                        "b_multiplier": e["m2"], "b_shift": e["s2"],
                        "left_shift": e["left_shift"], "output_zp": zp_out,
                        "output_multiplier": e["mo"], "output_shift": e["so"],
                        "act_min": lq.act_min, "act_max": lq.act_max}
            return {"a_zp": za, "b_zp": zb, "output_zp": zp_out, "output_multiplier": e["mo"],
                    "output_shift": e["so"], "act_min": lq.act_min, "act_max": lq.act_max}
        sym = f"mpq_l{i}_alpha"
        # One slope per view channel: a rank-3 tensor is one 1×1×(A·B) view, its slopes repeat.
        per_view = _view_dims(self.graph.tensors[node.outputs[0]].shape)[2] // lq.const.size
        self.consts.append(ConstArray(sym, "int8_t", [int(v) for v in np.tile(lq.const,
                                                                               per_view)]))
        return {"input_zp": self.qm.acts[node.inputs[0]].zero_point,
                "pos_multiplier": e["m1"], "pos_shift": e["s1"], "neg_multiplier": e["m2"],
                "neg_shift": e["s2"], "alpha": sym, "alpha_zp": e["alpha_zp"],
                "output_zp": zp_out, "act_min": lq.act_min, "act_max": lq.act_max}


    def _block_layer(self, i: int, node: Node, ins: list[Operand], out: Operand) -> Layer:
        """Pad, slice and concat along any axis but rank-4 channels: block copies
        (`mpq.codegen.blocks`); a pad first fills its output with the zero point."""
        shapes = {t: self.graph.tensors[t].shape for t in (*node.inputs, *node.outputs)}
        out_shape = shapes[node.outputs[0]]
        where = f"layer '{node.name}' ({node.op})"
        fill = None
        sources = [f"in{k}.data" for k in range(len(node.inputs))]
        if node.op == "concat":
            parts = [shapes[t] for t in node.inputs]
            out_q = self.qm.acts[node.outputs[0]]
            for pos, c in node.attrs.get("constants", ()):
                # A constant part: quantised with the output's parameters (as mpq.sim does),
                # packed at the output's bits, in Flash beside the weights.
                sym = f"mpq_l{i}_k{pos}"
                q = quantize_input(out_q, c).reshape(-1)
                self.consts.append(ConstArray(sym, "uint8_t", arith.pack(q, out_q.bits).tolist()))
                parts.insert(pos, tuple(c.shape))
                sources.insert(pos, sym)
            blocks = concat_blocks(parts, out_shape, node.attrs["axis"], where)
        elif node.op == "slice":
            blocks = [slice_block(shapes[node.inputs[0]], out_shape, node.attrs["starts"],
                                  node.attrs["steps"], where)]
        else:
            blocks = [pad_block(shapes[node.inputs[0]], out_shape, node.attrs["pads"], where)]
            fill = self.qm.acts[node.outputs[0]].zero_point
        return Layer(i, node.name, "copy_block", ins, out, blocks=blocks, fill=fill,
                     out_elements=int(np.prod(out_shape)),
                     block_sources=[sources[b.input] for b in blocks])

    def activation_table(self, i: int, node: Node) -> dict[str, Any]:
        """The layer's 256-entry lookup table as a const array (Flash; `mpq.quant.lut`)."""
        sym = f"mpq_l{i}_t"
        self.consts.append(ConstArray(sym, "int8_t",
                                      [int(v) for v in self.qm.layers[node.name].table]))
        return {"table": sym}


@dataclass
class StageCall:
    """One stage node, run once per patch with that patch's geometry (a table row each)."""

    index: int
    name: str
    kernel: str
    n_inputs: int
    in_bases: list[str]
    out_base: str
    bits_in: dict[str, list[int]]  # branch → bits per input
    bits_out: dict[str, int]
    channels_in: list[int]
    channels_out: int
    geometry: list[list[int]]  # per patch: per input (y0, x0, h, w, stored_w), out (5), pads
    params: dict[str, dict[str, int]]  # branch → kernel parameters
    weight: dict[str, Any] | None
    quant_syms: dict[str, str]  # branch → symbol prefix of bias/multiplier/shift
    #: the output's line buffer (`mpq.patch.cache_rows`): its base; each geometry row then ends
    #: with (restore rows, save-from row, save rows) (`PatchSchedule.line_copies`)
    line: str | None = None
    #: branch → the kernel that branch calls when it differs from `kernel` (the mixed
    #: branch's): a sub-byte depthwise / pooling by channel groups (`_stage_group_kernels`)
    #: beside the all-8-bit outlier branch's plain one
    branch_kernels: dict[str, str] = field(default_factory=dict)
    #: the call's scratch argument: the separate array, its arena slot (`schedule.scratch`)
    #: or NULL (no scratch needed)
    scratch: str = "mpq_scratch"


def _stage(plan: Plan, graph: Graph, qm: QuantModel, b: _Builder) -> dict[str, Any]:
    """The patch stage (DESIGN §6): per stage node, per patch, where each operand lives.

    Regions come from `mpq.patch.plan_patches` on the plan's split — the same code that made
    the plan, so the geometry is the plan's. Intermediate stage tensors are stored compactly
    per patch (their buffers are reused from patch to patch); the graph input is read in
    place from the caller's buffer and the split tensor is written tile by tile.
    """
    from mpq.patch import plan_patches, plan_split

    pt = plan.patch
    n = pt["n"]
    sched = plan_patches(graph, plan_split(pt))
    regions, offsets, pads = sched.regions, sched.node_offsets, sched.node_pads
    computed = sched.computed_regions  # with line buffers: the rows not kept from above
    line_base = {b["tensor"]: f"mpq_arena + {_plan_int(b['offset'], 'a line buffer offset')}"
                 for b in pt.get("cache", {}).get("line_buffers", [])}
    split = pt["split_tensor"]
    pool = pt.get("pool")  # a stage ending in a global average pool: its sums' buffer
    pool_node = pt["stage_nodes"][-1] if pool else None
    vdpc = pt.get("vdpc")
    outlier = plan_quant_model(plan, graph, "outlier") if vdpc else None
    branches = {"mixed": qm, **({"outlier": outlier} if outlier else {})}
    builders = {br: _Builder(plan, graph, m) for br, m in branches.items()}
    by_name = {nd.name: nd for nd in graph.nodes}
    fused = b.fused_by_conv
    fused_adds = b.fused_adds
    calls: list[StageCall] = []

    def full_w(t: str) -> int:
        return graph.tensors[t].shape[2]

    def stored(t: str, i: int, j: int) -> tuple[int, int, int]:
        """(y origin, x origin, stored width) of tensor t's storage for patch (i, j)."""
        r = regions[t][i][j]
        if t in graph.inputs or t == split:
            return 0, 0, full_w(t)
        return r.y0, r.x0, r.cols

    def in_view(t: str, node: str, q: int, i: int, j: int) -> list[int]:
        r = regions[t][i][j]
        dy, dx = offsets[node][i][j][q]
        oy, ox, sw = stored(t, i, j)
        return [r.y0 + dy - oy, r.x0 + dx - ox, r.rows - dy, r.cols - dx, sw]

    def out_view(t: str, i: int, j: int) -> list[int]:
        r = computed[t][i][j]
        oy, ox, sw = stored(t, i, j)
        return [r.y0 - oy, r.x0 - ox, r.rows, r.cols, sw]

    for idx, name in enumerate(pt["stage_nodes"]):
        node = by_name[name]
        if name in fused_adds:
            continue
        out_t = node.outputs[0]
        inputs = list(node.inputs)
        kernel = {"conv2d": "conv2d", "add": "add", "avg_pool": "avgpool",
                  "max_pool": "maxpool", "mul": "mul", "sub": "sub", "prelu": "prelu",
                  "activation": "activation"}.get(node.op)
        if node.op == "concat" or kernel is None:
            raise MpqError(f"export: '{node.op}' in the patch stage is not supported yet")
        if name == pool_node:
            kernel = "avgpool_accumulate"
        geo_node = name
        if node.op == "conv2d" and name in b.inplace:
            kernel = "depthwise_inplace"
        add_node = None
        if node.op == "conv2d" and name in fused:
            add_name, skip = fused[name]
            add_node = by_name[add_name]
            kernel = "conv2d_add"
            out_t = add_node.outputs[0]
        geometry = []
        for i, j in sched.patch_order:
            row: list[int] = []
            ov = out_view(out_t, i, j)
            for q, t in enumerate(inputs):
                v = in_view(t, name, q, i, j)
                if node.op in ("add", "mul", "sub", "prelu", "activation"):  # output's extent
                    v[2:4] = ov[2:4]
                row += v
            if add_node is not None:
                skip_q = add_node.inputs.index(fused[name][1])
                v = in_view(fused[name][1], add_node.name, skip_q, i, j)
                v[2:4] = ov[2:4]
                row += v
            row += ov
            pt_, pl_, _, _ = pads[geo_node][i][j]
            row += [pt_, pl_]
            if out_t in line_base:
                row += list(sched.line_copies(out_t, i))
            geometry.append(row)
        params: dict[str, dict[str, int]] = {}
        bits_in: dict[str, list[int]] = {}
        bits_out: dict[str, int] = {}
        quant_syms: dict[str, str] = {}
        weight = None
        for br, m in branches.items():
            bb = builders[br]
            bits_in[br] = [m.acts[t].bits for t in inputs] + (
                [m.acts[fused[name][1]].bits] if add_node is not None else [])
            bits_out[br] = m.acts[out_t].bits
            if node.op == "conv2d":
                p = bb.conv_params(node)
                if add_node is not None:
                    p.update({f"add_{key}": v for key, v in
                              bb.add_params(add_node, fused[name][1]).items()})
                params[br] = p
                if weight is None:
                    weight = b.weights(idx, node)
                    quant_syms[br] = weight["sym"]
                else:
                    sym = f"mpq_l{idx}_{br}"
                    lq = m.layers[node.name]
                    b.consts += [
                        ConstArray(f"{sym}_b", "int32_t", [int(v) for v in lq.bias]),
                        ConstArray(f"{sym}_m", "int32_t", [int(v) for v in lq.multiplier]),
                        ConstArray(f"{sym}_s", "int32_t", [int(v) for v in lq.shift]),
                    ]
                    quant_syms[br] = sym
                if b.scratch_arena:  # its slot (`schedule.scratch`), as a layer call's
                    b.use_scratch(node, _patch_scratch(node, geometry, kernel)
                                  if kernel in INPLACE_KERNELS
                                  else kernel_scratch_bytes(node, graph, False))
                else:
                    b.scratch = max(b.scratch, _patch_scratch(node, geometry, kernel))
            elif node.op == "add":
                params[br] = bb.add_params(node, node.inputs[0])
            elif node.op in ("mul", "sub", "prelu"):
                params[br] = bb.elementwise_params(idx, node)
                # a prelu's slopes (the same in both branches) go into the export once
                b.consts += [a for a in bb.consts if a.symbol not in {x.symbol for x in b.consts}]
            elif node.op == "activation":  # each branch's table (one when they agree)
                table = [int(v) for v in m.layers[node.name].table]
                mixed = next((a for a in b.consts if a.symbol == f"mpq_l{idx}_t"), None)
                if mixed is not None and mixed.values == table:
                    quant_syms[br] = mixed.symbol
                else:
                    sym = f"mpq_l{idx}_t" if br == "mixed" else f"mpq_l{idx}_{br}_t"
                    b.consts.append(ConstArray(sym, "int8_t", table))
                    quant_syms[br] = sym
                params[br] = {}
            else:
                a = node.attrs
                lq = m.layers[node.name]
                params[br] = {"kernel_h": a["kernel"][0], "kernel_w": a["kernel"][1],
                              "stride_h": a["strides"][0], "stride_w": a["strides"][1],
                              "act_min": lq.act_min, "act_max": lq.act_max}
        in_bases = [b.operand(t).base for t in inputs]
        if add_node is not None:
            in_bases.append(b.operand(fused[name][1]).base)
        per_branch = _stage_group_kernels(plan, node, kernel, bits_in,
                                          graph.tensors[inputs[0]].shape[3],
                                          in_bases[0] == b.operand(out_t).base)
        kernel = per_branch.get("mixed", kernel)
        calls.append(StageCall(
            idx, name if add_node is None else f"{name} + {add_node.name}", kernel,
            len(in_bases), in_bases, b.operand(out_t).base, bits_in, bits_out,
            [graph.tensors[t].shape[3] for t in inputs] + (
                [graph.tensors[fused[name][1]].shape[3]] if add_node is not None else []),
            graph.tensors[out_t].shape[3], geometry, params, weight, quant_syms,
            line_base.get(out_t),
            {br: k for br, k in per_branch.items() if k != kernel},
            b.scratch_of.get(name, "NULL") if b.scratch_arena else "mpq_scratch"))
    cmap = None
    if vdpc:
        r = regions[vdpc["map"]]
        cmap = {"base": b.operand(vdpc["map"]).base,
                "bytes": [r[i][j].rows * r[i][j].cols * graph.tensors[vdpc["map"]].shape[3]
                          for i in range(n) for j in range(sched.m)],
                "lo": _plan_int(vdpc["lo_threshold"], "patch.vdpc.lo_threshold"),
                "hi": _plan_int(vdpc["hi_threshold"], "patch.vdpc.hi_threshold"),
                "min_outliers": _plan_int(vdpc["min_outliers"], "patch.vdpc.min_outliers")}
    pooled = None
    if pool:
        if vdpc:
            raise MpqError("export: a patch stage that ends in a global pool has no VDPC branch")
        _, h, w, c = graph.tensors[sched.pool_input].shape
        lq = qm.layers[pool_node]
        pooled = {"sums": f"mpq_arena + {_plan_int(pool['offset'], 'patch.pool.offset')}",
                  "channels": c, "count": h * w, "act_min": lq.act_min, "act_max": lq.act_max,
                  "out": b.operand(split).base, "bits": qm.acts[split].bits}
    return {"n": n, "m": sched.m, "patches": sched.patches, "calls": calls, "vdpc": cmap,
            "branches": list(branches), "cache": sched.cache, "pool": pooled}


def _stage_group_kernels(plan: Plan, node: Node, kernel: str, bits_in: dict[str, list[int]],
                         channels: int, same_storage: bool) -> dict[str, str]:
    """branch → the kernel a stage depthwise / pooling call runs in that branch: its
    `mpq_<kernel>_grouped` form where the branch's input is 4- or 2-bit and
    `packed.group_choice` admits it (as `_Builder._group_note` for layer calls), else
    `kernel`; empty for other kernels."""
    if kernel not in ("depthwise_inplace", "avgpool", "maxpool"):
        return {}
    core = plan_board(plan.board).core
    return {br: f"{kernel}_grouped" if bits[0] != 8 and packed.group_choice(
                node, kernel, bits[0], channels, core, same_storage) is None else kernel
            for br, bits in bits_in.items()}


#: The stage kernels whose scratch is the patch's padded input plane (`_patch_scratch`).
INPLACE_KERNELS = ("depthwise_inplace", "depthwise_inplace_grouped")


def _patch_scratch(node: Node, geometry: list[list[int]], kernel: str) -> int:
    """Largest kernel scratch of a stage conv over the patches (the kernels' formulas)."""
    _, kh, kw, cin_g = node.weight.shape
    if kernel not in INPLACE_KERNELS:
        return 2 * kh * kw * cin_g
    # per patch row: the input view (y0, x0, h, w, stored_w), the output view, then the pads;
    # an output of no rows (every row kept in the line buffer) skips the call
    return max((padded_plane_bytes(node, (row[2], row[3]), (row[7], row[8]), (row[10], row[11]))
                for row in geometry if row[7] != 0), default=0)


def export_context(plan: Plan, graph: Graph, backend: str = "portable") -> dict[str, Any]:
    """Everything the templates need, computed once (pure: same plan ⇒ same context)."""
    from mpq.order import plan_graph

    cmsis.check_backend(backend)
    board = plan_board(plan.board)
    qm = plan_quant_model(plan, graph, "mixed")
    graph = plan_graph(plan, graph)  # the nodes in the order the arena was planned for
    if backend == "cmsis-nn":
        weights.require_linear_storage([(n, lq.weight_scheme, lq.weight_bits)
                                        for n, lq in qm.layers.items() if lq.weight is not None],
                                       backend)
    b = _Builder(plan, graph, qm, backend)
    stage = None
    report: list[dict[str, Any]] = []
    if plan.patch is not None:
        stage = _stage(plan, graph, qm, b)
        b.skip_nodes = set(plan.patch["stage_nodes"])
        for c in stage["calls"]:
            entry = {"index": c.index, "name": c.name, "backend": "portable",
                     "call": f"mpq_{c.kernel}"}
            if backend == "cmsis-nn":
                entry["reason"] = "patch stage (views into larger stored tensors)"
            report.append(entry)
    b.build()
    report += b.report
    g = graph
    x = g.inputs[0]
    xq = qm.acts[x]
    if xq.bits != 8 or any(qm.acts[y].bits != 8 for y in g.outputs):
        raise MpqError("export: the graph input and every graph output must be 8-bit")
    kernels = sorted({layer.kernel for layer in b.layers if layer.cmsis is None}
                     | {k for c in (stage["calls"] if stage else [])
                        for k in (c.kernel, *c.branch_kernels.values())}
                     | ({"copy_view"} if stage and any(c.line for c in stage["calls"])
                        else set()))
    functions = sorted({f for layer in b.layers if layer.cmsis is not None
                        for f in layer.cmsis.functions})
    return {
        "plan_digest": hashlib.sha256(plan.to_json().encode()).hexdigest()[:16],
        "model": plan.model, "model_sha256": plan.model_sha256, "board": board.name,
        "layers": b.layers, "consts": b.consts, "kernels": kernels,
        "arena_bytes": align_up(max(plan.predicted["arena_bytes"], 16)),
        "arena_section": section_of(plan.schedule.get("regions"), "arena", board),
        "scratch_section": section_of(plan.schedule.get("regions"), "scratch", board),
        # with the scratch in the arena (`schedule.scratch`) no separate array, unless
        # CMSIS-NN calls need theirs
        "scratch_bytes": 0 if b.scratch_arena and not (b.scratch or b.cmsis_scratch)
        else align_up(max(b.scratch, b.cmsis_scratch, 16)),
        "portable_scratch_bytes": b.scratch,
        "cmsis": {"functions": functions, "scratch_bytes": b.cmsis_scratch,
                  "sources": cmsis.sources_for(functions)} if functions else None,
        "backend": backend,
        "io": b.io,
        "report_layers": report,
        "input": {"name": x, "dims": _view_dims(g.tensors[x].shape),
                  "bytes": packed_bytes(g.tensors[x].size, 8), "scale": xq.scale,
                  "layout": g.input_layouts.get(x, LAYOUT_NHWC), "rank": len(g.tensors[x].shape),
                  **io_quant(xq.scale, xq.zero_point, "the graph input"),
                  "base": b.operand(x).base},
        "outputs": output_contexts(g, qm, b),
        "stage": stage,
    }


def output_contexts(graph: Graph, qm: QuantModel, b: _Builder) -> list[dict[str, Any]]:
    """One entry per graph output, in the model's output order (index k of `MPQ_OUTPUTk_*`
    and of `mpq_model_run`'s `outputs[k]`): its name, NHWC view dims, bytes, layout, I/O
    quantisation constants (`io_quant`) and where it lives in the arena. Every output is
    exported: a model is never cut to its first output (issue 14)."""
    outs = []
    for k, y in enumerate(graph.outputs):
        yq = qm.acts[y]
        shape = graph.tensors[y].shape
        outs.append({"index": k, "name": y, "dims": _view_dims(shape),
                     "bytes": packed_bytes(graph.tensors[y].size, 8), "scale": yq.scale,
                     "layout": graph.output_layouts.get(y, LAYOUT_NHWC), "rank": len(shape),
                     **io_quant(yq.scale, yq.zero_point, f"graph output '{y}'"),
                     "base": b.operand(y).base})
    return outs


#: Build systems `mpq export --target` writes files for; "make" (mpq.mk) is always written.
BUILD_TARGETS = ("make", "cmake", "zephyr", "arduino", "platformio")
#: The targets that build with a toolchain's own linker script: the arena is a static array.
STATIC_ARENA_TARGETS = ("zephyr", "arduino", "platformio")


def check_targets(targets: tuple[str, ...] | list[str]) -> None:
    """Refuse a build target mpq has no template for (the CLI's --target goes through
    `parse_targets`, which calls this)."""
    unknown = sorted(set(targets) - set(BUILD_TARGETS))
    if unknown:
        raise MpqError(f"export: unknown build target '{unknown[0]}' (choose from "
                       f"{', '.join(BUILD_TARGETS)})")


def parse_targets(values: tuple[str, ...] | list[str]) -> tuple[str, ...]:
    """`--target` values, each one name or a comma-separated list (`zephyr,arduino`), as the
    distinct targets in order of first mention; an unknown one is MpqError (`check_targets`)."""
    names: list[str] = []
    for value in values:
        for name in (part.strip() for part in value.split(",")):
            if name and name not in names:
                names.append(name)
    check_targets(names)
    return tuple(names)


def export_sources(files: dict[str, str]) -> dict[str, list[str]]:
    """The C sources and headers of an export, by name from its file dict of C files (sorted):
    the one list every build-file template is given, so a new or renamed kernel file reaches
    every build system without a template naming it."""
    return {"c": c_sources(files), "h": sorted(n for n in files if n.endswith(".h"))}


def library_name(plan: Plan) -> str:
    """The library/module name of an export in Arduino, PlatformIO and Zephyr: `mpq_` and the
    model file's stem, every character other than a letter, digit or `_` as `_` (the three
    tools accept that set; the model name is untrusted text)."""
    stem = PurePath(str(plan.model)).name.split(".")[0] or "model"
    return "mpq_" + "".join(ch if ch.isascii() and (ch.isalnum() or ch == "_") else "_"
                            for ch in stem)[:48]


def _library_files(plan: Plan, board: Board, ctx: dict[str, Any], files: dict[str, str],
                   targets: tuple[str, ...] | list[str]) -> dict[str, str]:
    """The Zephyr module, Arduino library and PlatformIO manifest of an export (README,
    "Build systems"). All three build with the toolchain's own linker script, so the arena is
    an aligned static array (MPQ_ARENA_STATIC) there: in .bss wherever that script puts it."""
    from mpq import __version__

    if ctx["cmsis"] and set(targets) & set(STATIC_ARENA_TARGETS):
        which = sorted(set(targets) & set(STATIC_ARENA_TARGETS))[0]
        raise MpqError(f"export: --target {which} supports the portable backend only (use "
                       f"--target make or cmake with --backend cmsis-nn)")
    sources = export_sources(files)
    meta = {"name": library_name(plan), "version": __version__, "model": plan.model,
            "board": board, "plan_digest": ctx["plan_digest"], "sources": sources["c"],
            "headers": sources["h"], "arena_bytes": ctx["arena_bytes"],
            "scratch_bytes": ctx["scratch_bytes"], "io": ctx["io"]}
    out: dict[str, str] = {}
    if "zephyr" in targets:
        out["zephyr/module.yml"] = render("zephyr/module.yml.j2", **meta)
        out["zephyr/CMakeLists.txt"] = render("zephyr/CMakeLists.txt.j2", **meta)
        out["zephyr/Kconfig"] = render("zephyr/Kconfig.j2", **meta)
    if "arduino" in targets:
        # The Arduino IDE takes no -D flags for a library: its copy of mpq_model.c defines
        # MPQ_ARENA_STATIC itself.
        static = {"mpq_model.c": render("c/mpq_model.c.j2", **{**ctx, "arena_static": True})}
        for name in sources["c"] + sources["h"]:
            out[f"src/{name}"] = static.get(name, files[name])
        out["library.properties"] = render("arduino/library.properties.j2", **meta)
        sketch = meta["name"]
        out[f"examples/{sketch}/{sketch}.ino"] = render("arduino/sketch.ino.j2", **meta)
    if "platformio" in targets:
        out["library.json"] = render("platformio/library.json.j2", **meta)
    return out


def render_export(plan: Plan, graph: Graph, backend: str = "portable",
                  targets: tuple[str, ...] | list[str] = ("make",)) -> dict[str, str]:
    """File name → content of an export for `backend` ("portable" or "cmsis-nn"), with the
    build files of `targets`: mpq.mk always (it is also the export's make stamp),
    CMakeLists.txt for "cmake", zephyr/{module.yml,CMakeLists.txt,Kconfig} for "zephyr",
    library.properties, src/ and an example sketch for "arduino", library.json for
    "platformio"."""
    check_targets(targets)
    ctx = {**export_context(plan, graph, backend), "arena_static": False}
    files = {
        "mpq_model.h": render("c/mpq_model.h.j2", **ctx),
        "mpq_model.c": render("c/mpq_model.c.j2", **ctx),
        "mpq_weights.h": render("c/mpq_weights.h.j2", **ctx),
        "mpq_weights.c": render("c/mpq_weights.c.j2", **ctx),
        **library_sources(ctx["kernels"]),
    }
    cm = ctx["cmsis"]
    # The export's arena is the plan's; its scratch is the larger of the portable kernels' and
    # CMSIS-NN's, which may exceed what the plan predicted (the linker proves the fit).
    report = {"plan_digest": ctx["plan_digest"], "model": plan.model, "board": plan.board,
              "backend": backend, **({"io": "arena"} if ctx["io"] == "arena" else {}),
              "predicted": {"arena_bytes": ctx["arena_bytes"],
                            "scratch_bytes": ctx["scratch_bytes"],
                            "portable_scratch_bytes": ctx["portable_scratch_bytes"],
                            "cmsis_nn_scratch_bytes": cm["scratch_bytes"] if cm else 0,
                            "plan_arena_bytes": plan.predicted["arena_bytes"],
                            "plan_scratch_bytes": plan.predicted["scratch_bytes"],
                            "flash_bytes": plan.predicted["flash_bytes"]},
              "kernels": ctx["kernels"], "layers": ctx["report_layers"],
              "cmsis_nn": {"functions": cm["functions"], "sources": cm["sources"]} if cm
              else None,
              "files": sorted(files)}
    files["mpq_report.json"] = json.dumps(report, indent=2, sort_keys=True) + "\n"
    board = plan_board(plan.board)
    files[f"{board.name}.ld"] = linker_script(board)
    build = {"model": plan.model, "board": board, "plan_digest": ctx["plan_digest"],
             "cmsis_sources": cm["sources"] if cm else [], "sources": c_sources(files)}
    if "cmake" in targets:
        files["CMakeLists.txt"] = render("cmake/CMakeLists.txt.j2", **build)
    files.update(_library_files(plan, board, ctx, files, targets))
    files["mpq.mk"] = render("make/mpq.mk.j2", **build)
    return files


def measure_build(files: dict[str, str], board: Board) -> dict[str, int]:
    """Link the export for its board with a minimal main and measure the sections
    (`arm-none-eabi-size`) and the model's and the harness's shares of them
    (`budget.build_breakdown`): the measured half of `mpq_report.json`. An export that calls
    CMSIS-NN links it from $CMSIS_NN_PATH."""
    import tempfile

    from mpq import firmware

    used = json.loads(files["mpq_report.json"]).get("cmsis_nn")
    root = cmsis.cmsis_nn_root(used["sources"]) if used else None
    with tempfile.TemporaryDirectory(prefix="mpq-build-") as tmp:
        work = Path(tmp)
        write_export(files, work)
        (work / "main.c").write_text(render("firmware/verify_main.c.j2", target="board",
                                            samples=1))
        sources = [work / n for n in ("main.c", *c_sources(files))]
        from mpq.budget import STACK_FLAG, build_breakdown, measured_stack

        includes, library = [work], []
        if root is not None:
            includes.append(root / "Include")
            # with their call graphs: CMSIS-NN's frames are on the model's stack too
            library = firmware.library_objects([root / s for s in used["sources"]],
                                               [root / "Include"], board, work / "lib",
                                               extra_flags=[STACK_FLAG])
            sources += library
        elf = firmware.build_elf(sources, includes, board, work / "build",
                                 extra_flags=[STACK_FLAG])
        sizes = firmware.section_sizes(elf)
        # the arena arrays' output sections, one per region they were placed in (`mpq.regions`)
        sizes["mpq_arena"] = sum(v for k, v in sizes.items()
                                 if k == "mpq_arena" or k.startswith("mpq_arena_"))
        return {**sizes, **build_breakdown(elf, sizes, firmware.require_tools().nm),
                "model_stack_bytes": measured_stack(
                    work / "build", also=[firmware.call_graph_file(o) for o in library])}


def with_measured(files: dict[str, str], measured: dict[str, int]) -> dict[str, str]:
    """The export with the measured section sizes added to `mpq_report.json`."""
    report = json.loads(files["mpq_report.json"])
    report["measured"] = dict(sorted(measured.items()))
    return {**files, "mpq_report.json": json.dumps(report, indent=2, sort_keys=True) + "\n"}


MAKE_STAMP = "mpq.mk"  # the file a Makefile's export rule names as its target


def write_order(names: list[str]) -> list[str]:
    """The order files are written in: by name, the make stamp `mpq.mk` last. An export cut
    short (an error, Ctrl-C, a full disk) then leaves the old stamp — older than the plan, or
    absent — beside whatever new sources were written, and make runs the export again instead
    of taking a half-new export for up to date."""
    return sorted(names, key=lambda name: (name == MAKE_STAMP, name))


def write_export(files: dict[str, str], out_dir: Path) -> list[str]:
    """Write the files atomically, skipping those whose content did not change (make keeps
    its timestamps), the make stamp last (`write_order`); the subdirectories of the Zephyr
    and Arduino layouts are made first. Returns the names written."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for sub in sorted({(out_dir / name).parent for name in files}):
        sub.mkdir(parents=True, exist_ok=True)
    return [name for name in write_order(list(files))
            if write_if_changed(out_dir / name, files[name].encode())]
