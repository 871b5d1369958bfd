"""ONNX → NHWC IR (DESIGN §3).

One handler per ONNX op, registered in `HANDLERS`, in the spirit of onnx's reference evaluator.
The importer walks the graph once in topological order. Every ONNX value maps either to a
constant array or to an IR tensor plus the layout in which the ONNX graph sees it (the IR keeps
rank-4 tensors NHWC; the ONNX graph may see the same data as NCHW). Transposes that only
convert between those two views disappear, BatchNormalization and bias Adds fold into the
producing conv/FC, Relu/Clip fuse into their producer, and Pad folds into the next conv/pool.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

from mpq import limits
from mpq.errors import MpqError
from mpq.frontend import onnx_validate as check
from mpq.ir import (
    ACT_OPS,
    LAYOUT_NCHW,
    LAYOUT_NCW,
    LAYOUT_NHWC,
    OPS,
    Graph,
    Node,
    Tensor,
    broadcast_shape,
    conv_out_size,
    remove_dead_nodes,
    slice_window,
)

NCHW_TO_NHWC = (0, 2, 3, 1)
NHWC_TO_NCHW = (0, 3, 1, 2)


@dataclass
class Value:
    """An ONNX activation value: the IR tensor that holds it and the ONNX-side layout."""

    tensor: str
    layout: str  # LAYOUT_NCHW: the ONNX value is the NCHW view of a rank-4 NHWC IR tensor


@dataclass
class PendingPad:
    """A zero Pad waiting to be folded into the conv/pool that consumes it."""

    source: Value
    pads: tuple[int, int, int, int]  # t, l, b, r
    node_name: str


@dataclass
class Importer:
    """State of one import: constants, value map, the IR being built."""

    model: onnx.ModelProto
    source: str
    consts: dict[str, np.ndarray] = field(default_factory=dict)
    values: dict[str, Value] = field(default_factory=dict)
    pending_pads: dict[str, PendingPad] = field(default_factory=dict)
    fc_perm: dict[str, np.ndarray] = field(default_factory=dict)
    tensors: dict[str, Tensor] = field(default_factory=dict)
    nodes: list[Node] = field(default_factory=list)
    consumers: dict[str, list[onnx.NodeProto]] = field(default_factory=dict)
    graph_outputs: set[str] = field(default_factory=set)
    notes: Counter = field(default_factory=Counter)
    fold: limits.FoldBudget = field(default_factory=limits.FoldBudget)
    skip_nodes: set[str] = field(default_factory=set)  # consumed by a fusion ahead of them

    def fail(self, message: str) -> MpqError:
        return MpqError(check.show(f"{self.source}: {message}"))

    # -- values ---------------------------------------------------------------------------------
    def value(self, name: str, node: onnx.NodeProto) -> Value:
        if name in self.pending_pads:
            _materialise_pad(self, name)  # not folded into a window: a pad node of its own
        if name not in self.values:
            if name in self.consts:
                raise self.fail(f"node '{node.name}' ({node.op_type}) has a constant where an "
                                f"activation is expected (input '{name}')")
            raise self.fail(f"node '{node.name}' ({node.op_type}) reads '{name}', which is "
                            "neither a graph input, an initializer nor a node output "
                            "(missing initializer?)")
        return self.values[name]

    def const(self, name: str, node: onnx.NodeProto, what: str) -> np.ndarray:
        if name not in self.consts:
            if name in self.values:
                raise self.fail(f"node '{node.name}' ({node.op_type}): {what} must be a constant "
                                f"(initializer), but '{name}' is computed at run time")
            raise self.fail(f"node '{node.name}' ({node.op_type}): {what} '{name}' is missing "
                            "(no initializer, Constant node or producer)")
        return self.consts[name]

    def weight(self, name: str, node: onnx.NodeProto, what: str) -> np.ndarray:
        """A float32 constant input (weights, biases, BatchNorm parameters, Clip bounds).

        ONNX types these inputs like the float32 activation they meet; onnxruntime refuses a
        model whose Conv bias is int32, so mpq must not quietly cast it.
        """
        v = self.const(name, node, what)
        if v.dtype != np.float32:
            raise self.fail(f"node '{node.name}' ({node.op_type}): {what} '{name}' is "
                            f"{v.dtype}; it must be float32 like the activations")
        return v

    def shape(self, value: Value) -> tuple[int, ...]:
        """The shape of a value as the ONNX graph sees it."""
        ir = self.tensors[value.tensor].shape
        if value.layout == LAYOUT_NCHW:
            return tuple(ir[i] for i in NHWC_TO_NCHW)
        if value.layout == LAYOUT_NCW:
            return (ir[0], ir[3], ir[2])
        return ir

    def new_tensor(self, name: str, shape: tuple[int, ...]) -> str:
        if name in self.tensors:
            raise self.fail(f"value '{name}' is defined twice")
        limits.check_shape(shape, f"{self.source}: value '{name}'")
        self.tensors[name] = Tensor(name, tuple(int(d) for d in shape))
        return name

    def fresh_name(self, base: str) -> str:
        """A value name no tensor, ONNX value or constant uses yet (for tensors mpq adds)."""
        name, k = base, 0
        while name in self.tensors or name in self.values or name in self.consts \
                or name in self.consumers or name in self.graph_outputs:
            k += 1
            name = f"{base}_{k}"
        return name

    def producer_of(self, tensor: str) -> Node | None:
        for n in reversed(self.nodes):
            if tensor in n.outputs:
                return n
        return None

    def sole_consumer(self, onnx_name: str) -> bool:
        """True when one node reads this ONNX value and it is not a graph output."""
        return len(self.consumers.get(onnx_name, [])) == 1 and onnx_name not in self.graph_outputs

    def ir_readers(self, tensor: str) -> int:
        return sum(tensor in n.inputs for n in self.nodes)

    def fusable_producer(self, onnx_name: str, ops: tuple[str, ...]) -> Node | None:
        """The IR node producing `onnx_name` if a following op may be folded into it."""
        if not self.sole_consumer(onnx_name) or onnx_name not in self.values:
            return None
        tensor = self.values[onnx_name].tensor
        prod = self.producer_of(tensor)
        if prod is None or prod.op not in ops or self.ir_readers(tensor) > 0:
            return None
        # The same IR tensor may also be visible under other ONNX names (aliases).
        if sum(v.tensor == tensor for v in self.values.values()) > 1:
            return None
        return prod

    def rename_output(self, node: Node, old: str, new_onnx_name: str, layout: str) -> None:
        """Give a producer's output the name of the op folded into it (keeps names stable)."""
        new = new_onnx_name
        tensor = self.tensors.pop(old)
        self.tensors[new] = Tensor(new, tensor.shape)
        node.outputs = [new if t == old else t for t in node.outputs]
        for name, v in list(self.values.items()):
            if v.tensor == old:
                del self.values[name]
        self.values[new_onnx_name] = Value(new, layout)


Handler = Callable[[Importer, onnx.NodeProto], None]
HANDLERS: dict[str, Handler] = {}


def handles(*op_types: str) -> Callable[[Handler], Handler]:
    def register(fn: Handler) -> Handler:
        for op in op_types:
            HANDLERS[op] = fn
        return fn
    return register


def supported_ops() -> list[str]:
    """The ONNX op types the importer accepts (the list quoted in error messages)."""
    return sorted(HANDLERS)


def _attrs(node: onnx.NodeProto) -> dict:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _decode(v):
    return v.decode("utf-8", "replace") if isinstance(v, bytes) else v


def _int_vector(imp: Importer, name: str, node: onnx.NodeProto, what: str) -> list[int]:
    """A constant input that must be a 1-D integer vector (shapes, axes, pads)."""
    v = imp.const(name, node, what)
    if v.ndim != 1 or v.dtype != np.int64:
        raise imp.fail(f"node '{node.name}' ({node.op_type}): {what} must be a 1-D int64 "
                       f"tensor, got {v.dtype} of shape {list(v.shape)}")
    return v.astype(np.int64).tolist()


def _scalar(imp: Importer, name: str, node: onnx.NodeProto, what: str) -> float:
    """A constant input that must hold exactly one float32 number (Clip bounds, Pad value)."""
    v = imp.weight(name, node, what)
    if v.size != 1:
        raise imp.fail(f"node '{node.name}' ({node.op_type}): {what} must be one number, got "
                       f"shape {list(v.shape)}")
    return float(v.reshape(-1)[0])


def _axis(imp: Importer, node: onnx.NodeProto, axis: int, rank: int, what: str = "axis",
          end: bool = False) -> int:
    """An ONNX axis in [-rank, rank) (or [-rank, rank] where `end`, as Flatten's) made
    non-negative; anything outside is refused rather than wrapped to some other axis."""
    hi = rank + 1 if end else rank
    top = rank if end else rank - 1
    if not -rank <= axis < hi:
        raise imp.fail(f"node '{node.name}' ({node.op_type}): {what} {axis} is out of range "
                       f"for rank {rank} (allowed {-rank}..{top})")
    return axis + rank if axis < 0 else axis


def _spatial_pads(imp: Importer, node: onnx.NodeProto, attrs: dict, in_hw: tuple[int, int],
                  kernel: tuple[int, int], strides: tuple[int, int],
                  dilations: tuple[int, int]) -> tuple[int, int, int, int]:
    """ONNX pads/auto_pad → (top, left, bottom, right)."""
    auto_pad = _decode(attrs.get("auto_pad", "NOTSET"))
    if auto_pad in ("NOTSET", ""):
        pads = list(attrs.get("pads", [0, 0, 0, 0]))
        if len(pads) != 4:
            raise imp.fail(f"node '{node.name}' ({node.op_type}): only 2-D spatial ops are "
                           f"supported (pads {pads})")
        return pads[0], pads[1], pads[2], pads[3]
    if auto_pad == "VALID":
        return 0, 0, 0, 0
    out = []
    for axis in range(2):
        size, k, s, d = in_hw[axis], kernel[axis], strides[axis], dilations[axis]
        target = -(-size // s)
        total = max(0, (target - 1) * s + d * (k - 1) + 1 - size)
        lo = total // 2 if auto_pad == "SAME_UPPER" else total - total // 2
        out.append((lo, total - lo))
    return out[0][0], out[1][0], out[0][1], out[1][1]


def _take_pad(imp: Importer, name: str, node: onnx.NodeProto) -> tuple[Value, tuple[int, ...]]:
    """Resolve a conv/pool input, folding a preceding zero Pad (returns value and extra pads)."""
    if name in imp.pending_pads and imp.sole_consumer(name):
        pending = imp.pending_pads.pop(name)
        imp.notes["Pad folded"] += 1
        return pending.source, pending.pads
    return imp.value(name, node), (0, 0, 0, 0)


def _require_nchw(imp: Importer, value: Value, node: onnx.NodeProto) -> None:
    if value.layout != LAYOUT_NCHW or len(imp.tensors[value.tensor].shape) != 4:
        raise imp.fail(f"node '{node.name}' ({node.op_type}): only 2-D (NCHW rank-4) inputs "
                       f"are supported, got shape {list(imp.shape(value))}")


# -- convolution and fully connected ----------------------------------------------------------

@handles("Conv")
def _conv(imp: Importer, node: onnx.NodeProto) -> None:
    attrs = _attrs(node)
    x, extra = _take_pad(imp, node.input[0], node)
    _require_nchw(imp, x, node)
    w = imp.weight(node.input[1], node, "weight").astype(np.float32)
    if w.ndim != 4:
        raise imp.fail(f"node '{node.name}' (Conv): only 2-D convolution is supported "
                       f"(weight rank {w.ndim})")
    bias = (imp.weight(node.input[2], node, "bias").astype(np.float32)
            if len(node.input) > 2 and node.input[2] else np.zeros(w.shape[0], np.float32))
    if bias.shape != (w.shape[0],):
        raise imp.fail(f"node '{node.name}' (Conv): bias shape {list(bias.shape)} does not "
                       f"match {w.shape[0]} output channels")
    _, h, wd, cin = imp.tensors[x.tensor].shape
    groups = int(attrs.get("group", 1))
    kernel = tuple(int(k) for k in attrs.get("kernel_shape", w.shape[2:]))
    if kernel != tuple(w.shape[2:]):
        raise imp.fail(f"node '{node.name}' (Conv): kernel_shape {list(kernel)} contradicts "
                       f"the weight shape {list(w.shape)}")
    strides = tuple(int(s) for s in attrs.get("strides", (1, 1)))
    dilations = tuple(int(d) for d in attrs.get("dilations", (1, 1)))
    if w.shape[1] * groups != cin or w.shape[0] % groups:
        raise imp.fail(f"node '{node.name}' (Conv): weight shape {list(w.shape)} does not match "
                       f"{cin} input channels in {groups} groups")
    pads = _spatial_pads(imp, node, attrs, (h, wd), kernel, strides, dilations)
    pads = tuple(p + e for p, e in zip(pads, extra, strict=True))
    ho = conv_out_size(h, kernel[0], strides[0], dilations[0], pads[0], pads[2])
    wo = conv_out_size(wd, kernel[1], strides[1], dilations[1], pads[1], pads[3])
    if ho <= 0 or wo <= 0:
        raise imp.fail(f"node '{node.name}' (Conv): empty output {ho}x{wo}")
    out = imp.new_tensor(node.output[0], (1, ho, wo, w.shape[0]))
    imp.nodes.append(Node(
        name=node.name, op="conv2d", inputs=[x.tensor], outputs=[out],
        attrs={"kernel": kernel, "strides": strides, "dilations": dilations, "pads": pads,
               "groups": groups},
        weight=np.ascontiguousarray(w.transpose(0, 2, 3, 1)), bias=bias))
    imp.values[node.output[0]] = Value(out, LAYOUT_NCHW)


def _fc(imp: Importer, node: onnx.NodeProto, x: Value, weight_nk: np.ndarray,
        bias: np.ndarray) -> None:
    """Emit a fully connected node; weight is given as [N, K] in ONNX input order."""
    shape = imp.tensors[x.tensor].shape
    if len(shape) != 2 or shape[0] != 1:
        raise imp.fail(f"node '{node.name}' ({node.op_type}): input must be [1, K], got "
                       f"{list(imp.shape(x))}")
    if weight_nk.shape[1] != shape[1]:
        raise imp.fail(f"node '{node.name}' ({node.op_type}): weight {list(weight_nk.shape)} "
                       f"does not match input width {shape[1]}")
    perm = imp.fc_perm.get(node.input[0])
    if perm is not None:
        # The ONNX flatten ran in NCHW order; the IR flattens NHWC. Feature j of the ONNX
        # vector is IR element perm[j], so column perm[j] of the IR weight is ONNX column j.
        permuted = np.empty_like(weight_nk)
        permuted[:, perm] = weight_nk
        weight_nk = permuted
    out = imp.new_tensor(node.output[0], (1, weight_nk.shape[0]))
    imp.nodes.append(Node(name=node.name, op="fully_connected", inputs=[x.tensor],
                          outputs=[out], weight=np.ascontiguousarray(weight_nk, np.float32),
                          bias=bias.astype(np.float32)))
    imp.values[node.output[0]] = Value(out, LAYOUT_NHWC)


@handles("Gemm")
def _gemm(imp: Importer, node: onnx.NodeProto) -> None:
    attrs = _attrs(node)
    if attrs.get("transA", 0):
        raise imp.fail(f"node '{node.name}' (Gemm): transA=1 is not supported")
    x = imp.value(node.input[0], node)
    w = imp.weight(node.input[1], node, "weight").astype(np.float64)
    if w.ndim != 2:
        raise imp.fail(f"node '{node.name}' (Gemm): weight must be 2-D, got {list(w.shape)}")
    w = w if attrs.get("transB", 0) else w.T
    w = w * float(attrs.get("alpha", 1.0))
    n = w.shape[0]
    bias = np.zeros(n)
    if len(node.input) > 2 and node.input[2]:
        c = imp.weight(node.input[2], node, "bias").astype(np.float64)
        if c.size not in (1, n) or c.ndim > 2 or (c.ndim == 2 and c.shape[0] != 1):
            raise imp.fail(f"node '{node.name}' (Gemm): bias shape {list(c.shape)} does not "
                           f"broadcast to the {n} outputs")
        bias = np.broadcast_to(c.reshape(-1), (n,)) * float(attrs.get("beta", 1.0))
    _fc(imp, node, x, w.astype(np.float32), bias.astype(np.float32))


@handles("MatMul")
def _matmul(imp: Importer, node: onnx.NodeProto) -> None:
    x = imp.value(node.input[0], node)
    w = imp.weight(node.input[1], node, "weight (second MatMul input)")
    if w.ndim != 2:
        raise imp.fail(f"node '{node.name}' (MatMul): weight must be 2-D, got {list(w.shape)}")
    _fc(imp, node, x, w.T.astype(np.float32), np.zeros(w.shape[1], np.float32))


def _channel_vector(imp: Importer, node: onnx.NodeProto, c: np.ndarray, producer: Node,
                    layout: str) -> np.ndarray | None:
    """A per-channel constant broadcast against the producer's output, or None if not one."""
    cout = producer.weight.shape[0]
    if c.size == 1:
        return np.full(cout, float(c.reshape(-1)[0]), np.float32)
    squeezed = [d for d in c.shape if d != 1]
    if squeezed != [cout]:
        return None
    if layout == LAYOUT_NCHW:
        ok = c.ndim >= 3 and c.shape[-3] == cout  # [C,1,1] or [1,C,1,1]
    else:
        ok = c.shape[-1] == cout
    return c.reshape(-1).astype(np.float32) if ok else None


# -- elementwise ----------------------------------------------------------------------------------

@handles("Add")
def _add(imp: Importer, node: onnx.NodeProto) -> None:
    a, b = node.input[0], node.input[1]
    if a in imp.consts and b in imp.consts:
        raise imp.fail(f"node '{node.name}' (Add): both inputs are constant")
    if a in imp.consts or b in imp.consts:
        act_name, const_name = (b, a) if a in imp.consts else (a, b)
        x = imp.value(act_name, node)
        prod = imp.fusable_producer(act_name, ("conv2d", "fully_connected"))
        vec = None
        if prod is not None and prod.act == "none":
            vec = _channel_vector(imp, node, imp.weight(const_name, node, "addend"), prod,
                                  x.layout)
        if vec is None:
            raise imp.fail(f"node '{node.name}' (Add): adding a constant is supported only as a "
                           "per-channel bias directly after Conv/Gemm/MatMul")
        prod.bias = (prod.bias + vec).astype(np.float32)
        imp.rename_output(prod, x.tensor, node.output[0], x.layout)
        imp.notes["bias Add folded"] += 1
        return
    xa, xb = imp.value(a, node), imp.value(b, node)
    if imp.shape(xa) != imp.shape(xb) or xa.layout != xb.layout:
        raise imp.fail(f"node '{node.name}' (Add): broadcasting Add is not supported "
                       f"({list(imp.shape(xa))} + {list(imp.shape(xb))})")
    out = imp.new_tensor(node.output[0], imp.tensors[xa.tensor].shape)
    imp.nodes.append(Node(name=node.name, op="add", inputs=[xa.tensor, xb.tensor],
                          outputs=[out]))
    imp.values[node.output[0]] = Value(out, xa.layout)


@handles("BatchNormalization")
def _batchnorm(imp: Importer, node: onnx.NodeProto) -> None:
    attrs = _attrs(node)
    eps = float(attrs.get("epsilon", 1e-5))
    x = imp.value(node.input[0], node)
    gamma, beta, mean, var = (imp.weight(n, node, "BatchNormalization parameter").astype(np.float64)
                              for n in node.input[1:5])
    shape = imp.shape(x)
    channels = shape[1] if len(shape) > 1 else 0
    for label, p in (("scale", gamma), ("B", beta), ("mean", mean), ("var", var)):
        if p.shape != (channels,):
            raise imp.fail(f"node '{node.name}' (BatchNormalization): {label} has shape "
                           f"{list(p.shape)}, the input {list(shape)} has {channels} channels")
    if not np.all(var + eps > 0):
        raise imp.fail(f"node '{node.name}' (BatchNormalization): var + epsilon must be "
                       "positive in every channel")
    # Overflow to inf is caught with a clear message once the graph is built (finite_weights).
    with np.errstate(all="ignore"):
        scale = gamma / np.sqrt(var + eps)
        shift = beta - mean * scale
    prod = imp.fusable_producer(node.input[0], ("conv2d",))
    if prod is not None and prod.act == "none":
        with np.errstate(all="ignore"):
            prod.weight = (prod.weight * scale[:, None, None, None]).astype(np.float32)
            prod.bias = (prod.bias * scale + shift).astype(np.float32)
        imp.rename_output(prod, x.tensor, node.output[0], x.layout)
        imp.notes["BatchNormalization folded"] += 1
        return
    # A BatchNorm with nothing to fold into is a per-channel affine map: a 1×1 depthwise conv.
    _require_nchw(imp, x, node)
    c = imp.tensors[x.tensor].shape[3]
    out = imp.new_tensor(node.output[0], imp.tensors[x.tensor].shape)
    imp.nodes.append(Node(
        name=node.name, op="conv2d", inputs=[x.tensor], outputs=[out],
        attrs={"kernel": (1, 1), "strides": (1, 1), "dilations": (1, 1), "pads": (0, 0, 0, 0),
               "groups": c},
        weight=scale.reshape(c, 1, 1, 1).astype(np.float32), bias=shift.astype(np.float32)))
    imp.values[node.output[0]] = Value(out, LAYOUT_NCHW)


def _fuse_clamp(imp: Importer, node: onnx.NodeProto, lo: float, hi: float) -> None:
    x = imp.value(node.input[0], node)
    prod = imp.fusable_producer(node.input[0], ACT_OPS)
    if prod is None:
        raise imp.fail(f"node '{node.name}' ({node.op_type}): an activation must directly "
                       "follow a Conv, Gemm/MatMul, Add or pooling op whose output it alone reads")
    prod.attrs["act_min"] = max(lo, prod.attrs.get("act_min", -math.inf))
    prod.attrs["act_max"] = min(hi, prod.attrs.get("act_max", math.inf))
    imp.rename_output(prod, x.tensor, node.output[0], x.layout)
    imp.notes[f"{node.op_type} fused"] += 1


@handles("Relu")
def _relu(imp: Importer, node: onnx.NodeProto) -> None:
    _fuse_clamp(imp, node, 0.0, math.inf)


@handles("Clip")
def _clip(imp: Importer, node: onnx.NodeProto) -> None:
    attrs = _attrs(node)
    lo, hi = float(attrs.get("min", -math.inf)), float(attrs.get("max", math.inf))
    if len(node.input) > 1 and node.input[1]:
        lo = _scalar(imp, node.input[1], node, "min")
    if len(node.input) > 2 and node.input[2]:
        hi = _scalar(imp, node.input[2], node, "max")
    _fuse_clamp(imp, node, lo, hi)


# -- pooling ---------------------------------------------------------------------------------

def _pool(imp: Importer, node: onnx.NodeProto, op: str) -> None:
    attrs = _attrs(node)
    x, extra = _take_pad(imp, node.input[0], node)
    _require_nchw(imp, x, node)
    _, h, w, c = imp.tensors[x.tensor].shape
    kernel = tuple(int(k) for k in attrs["kernel_shape"])
    strides = tuple(int(s) for s in attrs.get("strides", (1, 1)))
    if any(d != 1 for d in attrs.get("dilations", (1, 1))):
        raise imp.fail(f"node '{node.name}' ({node.op_type}): dilated pooling is not supported")
    pads = _spatial_pads(imp, node, attrs, (h, w), kernel, strides, (1, 1))
    if op == "avg_pool" and attrs.get("count_include_pad", 0) and any(pads):
        raise imp.fail(f"node '{node.name}' (AveragePool): count_include_pad=1 with padding is "
                       "not supported (CMSIS-NN averages over in-bounds taps only)")
    pads = tuple(p + e for p, e in zip(pads, extra, strict=True))
    pads = list(pads)
    if attrs.get("ceil_mode", 0):
        # Ceil mode adds windows that hang over the bottom/right edge; their out-of-range taps
        # are skipped exactly like padding taps, so extend the bottom/right pads to cover them.
        for axis, size in ((0, h), (1, w)):
            span = size + pads[axis] + pads[axis + 2] - kernel[axis]
            extra_out = -(-span // strides[axis]) - span // strides[axis]
            pads[axis + 2] += extra_out * strides[axis]
    ho = conv_out_size(h, kernel[0], strides[0], 1, pads[0], pads[2])
    wo = conv_out_size(w, kernel[1], strides[1], 1, pads[1], pads[3])
    if ho <= 0 or wo <= 0:
        raise imp.fail(f"node '{node.name}' ({node.op_type}): empty output {ho}x{wo}")
    out = imp.new_tensor(node.output[0], (1, ho, wo, c))
    imp.nodes.append(Node(name=node.name, op=op, inputs=[x.tensor], outputs=[out],
                          attrs={"kernel": kernel, "strides": strides, "pads": tuple(pads)}))
    imp.values[node.output[0]] = Value(out, LAYOUT_NCHW)


@handles("MaxPool")
def _maxpool(imp: Importer, node: onnx.NodeProto) -> None:
    if len(node.output) > 1 and node.output[1]:
        raise imp.fail(f"node '{node.name}' (MaxPool): the Indices output is not supported")
    if node.input[0] in imp.pending_pads:
        # Zero padding equals max-pool padding only when the input is never negative.
        source = imp.pending_pads[node.input[0]].source
        prod = imp.producer_of(source.tensor)
        if prod is None or prod.attrs.get("act_min", -math.inf) < 0.0:
            # Zero padding is not max-pool padding here: pad first, as the model says.
            _materialise_pad(imp, node.input[0])
    _pool(imp, node, "max_pool")


@handles("AveragePool")
def _avgpool(imp: Importer, node: onnx.NodeProto) -> None:
    if node.input[0] in imp.pending_pads:
        # Folding would drop the padding taps from the count: pad first, as the model says.
        _materialise_pad(imp, node.input[0])
    _pool(imp, node, "avg_pool")


@handles("GlobalAveragePool")
def _global_avgpool(imp: Importer, node: onnx.NodeProto) -> None:
    x = imp.value(node.input[0], node)
    _require_nchw(imp, x, node)
    _, h, w, c = imp.tensors[x.tensor].shape
    out = imp.new_tensor(node.output[0], (1, 1, 1, c))
    imp.nodes.append(Node(name=node.name, op="avg_pool", inputs=[x.tensor], outputs=[out],
                          attrs={"kernel": (h, w), "strides": (h, w), "pads": (0, 0, 0, 0)}))
    imp.values[node.output[0]] = Value(out, LAYOUT_NCHW)


@handles("Pad")
def _pad(imp: Importer, node: onnx.NodeProto) -> None:
    attrs = _attrs(node)
    mode = _decode(attrs.get("mode", "constant"))
    pads = attrs.get("pads")
    if len(node.input) > 1 and node.input[1]:
        pads = _int_vector(imp, node.input[1], node, "pads")
    value = float(attrs.get("value", 0.0))
    if len(node.input) > 2 and node.input[2]:
        value = _scalar(imp, node.input[2], node, "constant_value")
    if len(node.input) > 3 and node.input[3]:
        raise imp.fail(f"node '{node.name}' (Pad): the axes input is not supported")
    x = imp.value(node.input[0], node)
    if mode != "constant" or value != 0.0:
        raise imp.fail(f"node '{node.name}' (Pad): only zero constant padding is supported "
                       f"(mode {mode}, value {value})")
    rank = len(imp.shape(x))
    if pads is None or len(pads) != 2 * rank:
        raise imp.fail(f"node '{node.name}' (Pad): pads {pads} do not fit rank {rank}")
    if any(p < 0 for p in pads) or pads[0] or pads[rank]:
        raise imp.fail(f"node '{node.name}' (Pad): only non-negative padding outside the batch "
                       f"axis is supported (pads {pads})")
    if rank == 4 and x.layout == LAYOUT_NCHW and not pads[1] and not pads[5]:
        # Spatial: folded into the conv/pool that reads it, else a pad node (_materialise_pad).
        imp.pending_pads[node.output[0]] = PendingPad(x, (pads[2], pads[3], pads[6], pads[7]),
                                                      node.name)
        return
    _emit_pad(imp, node.name, x, list(pads[:rank]), list(pads[rank:]), node.output[0])


def _ir_axis(value: Value, axis: int, rank: int) -> int:
    """The IR axis holding ONNX axis `axis` of a value (NCHW views of NHWC tensors)."""
    return NCHW_TO_NHWC.index(axis) if value.layout == LAYOUT_NCHW and rank == 4 else axis


def _emit_pad(imp: Importer, name: str, x: Value, before: list[int], after: list[int],
              out_name: str) -> Value:
    """An IR pad node: ONNX-order pads `before`/`after` of `x`, output named `out_name`."""
    rank = len(before)
    ir = [(0, 0)] * rank
    for a in range(rank):
        ir[_ir_axis(x, a, rank)] = (int(before[a]), int(after[a]))
    in_shape = imp.tensors[x.tensor].shape
    out = imp.new_tensor(out_name, tuple(d + lo + hi for d, (lo, hi) in zip(in_shape, ir,
                                                                            strict=True)))
    imp.nodes.append(Node(name=name, op="pad", inputs=[x.tensor], outputs=[out],
                          attrs={"pads": tuple(ir)}))
    imp.values[out_name] = Value(out, x.layout)
    return imp.values[out_name]


def _materialise_pad(imp: Importer, onnx_name: str) -> None:
    """A spatial zero Pad no window op absorbs becomes a pad node of its own."""
    p = imp.pending_pads.pop(onnx_name)
    t, left, b, r = p.pads
    _emit_pad(imp, p.node_name, p.source, [0, 0, t, left], [0, 0, b, r], onnx_name)


# -- layout and shape ops -----------------------------------------------------------------------

@handles("Transpose")
def _transpose(imp: Importer, node: onnx.NodeProto) -> None:
    perm = tuple(int(p) for p in _attrs(node).get("perm", ()))
    x = imp.value(node.input[0], node)
    rank4 = len(imp.tensors[x.tensor].shape) == 4
    if rank4 and x.layout == LAYOUT_NHWC and perm == NHWC_TO_NCHW:
        imp.values[node.output[0]] = Value(x.tensor, LAYOUT_NCHW)
        imp.notes["Transpose absorbed"] += 1
    elif rank4 and x.layout == LAYOUT_NCHW and perm == NCHW_TO_NHWC:
        imp.values[node.output[0]] = Value(x.tensor, LAYOUT_NHWC)
        imp.notes["Transpose absorbed"] += 1
    else:
        raise imp.fail(f"node '{node.name}' (Transpose): only the NHWC↔NCHW layout transposes "
                       f"are supported (perm {list(perm)})")


def _onnx_view(index: np.ndarray, layout: str) -> np.ndarray:
    if layout == LAYOUT_NCW:
        return index[:, 0].transpose(0, 2, 1)
    return index.transpose(NHWC_TO_NCHW) if layout == LAYOUT_NCHW else index


def _reshape_to(imp: Importer, node: onnx.NodeProto, x: Value, shape: list[int]) -> None:
    """Emit an IR reshape (or alias) for an ONNX reshape of `x` to the ONNX shape `shape`."""
    in_ir = imp.tensors[x.tensor].shape
    if not shape or shape[0] != 1:
        # mpq runs one sample at a time: dimension 0 is the batch and stays 1.
        raise imp.fail(f"node '{node.name}' ({node.op_type}): reshaping to {shape} moves data "
                       "into or out of the batch dimension, which must stay 1")
    if math.prod(shape) != math.prod(in_ir):
        raise imp.fail(f"node '{node.name}' ({node.op_type}): cannot reshape "
                       f"{list(imp.shape(x))} to {shape}")
    out_layout = LAYOUT_NHWC
    if len(shape) == 4:
        readers = imp.consumers.get(node.output[0], [])
        to_nhwc = readers and all(r.op_type == "Transpose" and tuple(
            _attrs(r).get("perm", ())) == NHWC_TO_NCHW for r in readers)
        out_layout = LAYOUT_NHWC if to_nhwc else LAYOUT_NCHW
    out_ir = tuple(shape[i] for i in NCHW_TO_NHWC) if out_layout == LAYOUT_NCHW else tuple(shape)
    # Where does each element of the ONNX output live in the IR input's memory?
    index = np.arange(math.prod(in_ir)).reshape(in_ir)
    gathered = _onnx_view(index, x.layout).reshape(shape)
    if out_layout == LAYOUT_NCHW:
        gathered = gathered.transpose(NCHW_TO_NHWC)
    order = gathered.reshape(-1)
    if not np.array_equal(order, np.arange(order.size)):
        readers = imp.consumers.get(node.output[0], [])
        if len(shape) == 2 and readers and all(r.op_type in ("Gemm", "MatMul")
                                               and r.input[0] == node.output[0] for r in readers):
            imp.fc_perm[node.output[0]] = order
        else:
            raise imp.fail(f"node '{node.name}' ({node.op_type}): this reshape reorders data "
                           "between NCHW and NHWC; only a flatten feeding Gemm/MatMul is supported")
    if out_ir == in_ir:
        imp.values[node.output[0]] = Value(x.tensor, out_layout)
        imp.notes[f"{node.op_type} absorbed"] += 1
        return
    out = imp.new_tensor(node.output[0], out_ir)
    imp.nodes.append(Node(name=node.name, op="reshape", inputs=[x.tensor], outputs=[out],
                          attrs={"shape": out_ir}))
    imp.values[node.output[0]] = Value(out, out_layout)


@handles("Reshape")
def _reshape(imp: Importer, node: onnx.NodeProto) -> None:
    x = imp.value(node.input[0], node)
    target = _int_vector(imp, node.input[1], node, "shape")
    in_shape = imp.shape(x)
    allow_zero = int(_attrs(node).get("allowzero", 0))
    shape = [in_shape[i] if d == 0 and not allow_zero else d for i, d in enumerate(target)]
    if shape.count(-1) > 1:
        raise imp.fail(f"node '{node.name}' (Reshape): more than one -1 in {target}")
    if -1 in shape:
        known = math.prod(d for d in shape if d != -1)
        shape[shape.index(-1)] = math.prod(in_shape) // max(known, 1)
    _reshape_to(imp, node, x, [int(d) for d in shape])


@handles("Flatten")
def _flatten(imp: Importer, node: onnx.NodeProto) -> None:
    x = imp.value(node.input[0], node)
    shape = imp.shape(x)
    axis = _axis(imp, node, int(_attrs(node).get("axis", 1)), len(shape), end=True)
    _reshape_to(imp, node, x, [math.prod(shape[:axis]), math.prod(shape[axis:])])


def _axes(imp: Importer, node: onnx.NodeProto) -> list[int] | None:
    attrs = _attrs(node)
    if len(node.input) > 1 and node.input[1]:
        return _int_vector(imp, node.input[1], node, "axes")
    return list(attrs["axes"]) if "axes" in attrs else None


@handles("Squeeze")
def _squeeze(imp: Importer, node: onnx.NodeProto) -> None:
    x = imp.value(node.input[0], node)
    shape = list(imp.shape(x))
    axes = _axes(imp, node)
    if x.layout == LAYOUT_NCHW and shape[2] == 1 and axes is not None and \
            [a % 4 for a in axes] == [2]:  # NCHW with H = 1 → NCW: the same memory
        prod = imp.fusable_producer(node.input[0], OPS)
        if prod is not None:  # keep the model's name for the tensor (a graph output's)
            imp.rename_output(prod, x.tensor, node.output[0], LAYOUT_NCW)
        else:
            imp.values[node.output[0]] = Value(x.tensor, LAYOUT_NCW)
        imp.notes["Squeeze absorbed"] += 1
        return
    if axes is None:
        axes = [i for i, d in enumerate(shape) if d == 1 and i > 0]
    axes = [_axis(imp, node, a, len(shape), "axes value") for a in axes]
    _reshape_to(imp, node, x, [d for i, d in enumerate(shape) if i not in axes])


@handles("Unsqueeze")
def _unsqueeze(imp: Importer, node: onnx.NodeProto) -> None:
    x = imp.value(node.input[0], node)
    shape = list(imp.shape(x))
    axes = _axes(imp, node) or []
    if x.layout == LAYOUT_NCW and [a % 4 for a in axes] == [2]:  # NCW → NCHW with H = 1
        imp.values[node.output[0]] = Value(x.tensor, LAYOUT_NCHW)
        imp.notes["Unsqueeze absorbed"] += 1
        return
    rank = len(shape) + len(axes)
    for a in sorted(_axis(imp, node, a, rank, "axes value") for a in axes):
        shape.insert(a, 1)
    _reshape_to(imp, node, x, shape)


def _concat_zero_inputs(imp: Importer, node: onnx.NodeProto) -> list[str]:
    """Concat inputs with every all-zero constant folded into a pad of its activation
    neighbour (zero is exact in any quantisation: the zero point); returns the ONNX names of
    the (padded) activations to concatenate. (Other constants: `_concat_with_constants`.)"""
    if not any(n in imp.consts for n in node.input):
        return list(node.input)
    acts = [n for n in node.input if n not in imp.consts]
    x0 = imp.value(acts[0], node)
    rank = len(imp.shape(x0))
    axis = _axis(imp, node, int(_attrs(node)["axis"]), rank)
    before = {n: 0 for n in acts}
    after = {n: 0 for n in acts}
    last = None
    for n in node.input:
        if n not in imp.consts:
            last = n
            continue
        c = imp.consts[n]
        if c.ndim != rank:
            raise imp.fail(f"node '{node.name}' (Concat): constant input '{n}' must have "
                           f"rank {rank}")
        if last is None:
            before[acts[0]] += int(c.shape[axis])
        else:
            after[last] += int(c.shape[axis])
    names = []
    for k, n in enumerate(acts):
        if not before[n] and not after[n]:
            names.append(n)
            continue
        x = imp.value(n, node)
        lo, hi = [0] * rank, [0] * rank
        lo[axis], hi[axis] = before[n], after[n]
        out = node.output[0] if len(acts) == 1 else imp.fresh_name(f"{node.output[0]}__pad{k}")
        _emit_pad(imp, node.name if len(acts) == 1 else f"{node.name}/pad{k}", x, lo, hi, out)
        names.append(out)
    imp.notes["Concat of zeros as pad"] += 1
    return names


def _concat_with_constants(imp: Importer, node: onnx.NodeProto) -> None:
    """A Concat with a constant input that is not all zeros: the constants stay in the concat
    node (`constants`: (input position, float32 array in the IR layout)); they are quantised
    with the concat's output parameters, like the activations that share them."""
    acts = [n for n in node.input if n not in imp.consts]
    if not acts:
        raise imp.fail(f"node '{node.name}' (Concat): every input is a constant")
    xs = [imp.value(n, node) for n in acts]
    rank = len(imp.shape(xs[0]))
    if len({x.layout for x in xs}) != 1 or any(len(imp.shape(x)) != rank for x in xs):
        raise imp.fail(f"node '{node.name}' (Concat): inputs differ in layout or rank")
    axis = _axis(imp, node, int(_attrs(node)["axis"]), rank)
    ir_axis = _ir_axis(xs[0], axis, rank)
    shapes, consts = [], []
    for pos, n in enumerate(node.input):
        if n in imp.consts:
            c = imp.consts[n]
            if c.dtype != np.float32 or c.ndim != rank or c.shape[0] != 1:
                raise imp.fail(f"node '{node.name}' (Concat): constant input '{n}' must be "
                               f"float32 of rank {rank} with batch 1")
            if xs[0].layout == LAYOUT_NCHW and rank == 4:
                c = c.transpose(NCHW_TO_NHWC)
            consts.append((pos, np.ascontiguousarray(c, np.float32)))
            shapes.append(c.shape)
        else:
            shapes.append(imp.tensors[imp.value(n, node).tensor].shape)
    if any(s[i] != shapes[0][i] for s in shapes for i in range(rank) if i != ir_axis):
        raise imp.fail(f"node '{node.name}' (Concat): shapes {shapes} do not match (IR layout)")
    out_shape = list(shapes[0])
    out_shape[ir_axis] = sum(s[ir_axis] for s in shapes)
    out = imp.new_tensor(node.output[0], tuple(out_shape))
    imp.nodes.append(Node(name=node.name, op="concat", inputs=[x.tensor for x in xs],
                          outputs=[out], attrs={"axis": ir_axis, "constants": tuple(consts)}))
    imp.values[node.output[0]] = Value(out, xs[0].layout)
    imp.notes["Concat constant kept"] += len(consts)


@handles("Concat")
def _concat(imp: Importer, node: onnx.NodeProto) -> None:
    if any(n in imp.consts and np.any(imp.consts[n] != 0) for n in node.input):
        _concat_with_constants(imp, node)
        return
    inputs = _concat_zero_inputs(imp, node)
    if len(inputs) == 1 and inputs[0] == node.output[0]:
        return  # one activation padded with zeros: the pad is the concat
    xs = [imp.value(n, node) for n in inputs]
    layouts = {x.layout for x in xs}
    shapes = [imp.shape(x) for x in xs]
    rank = len(shapes[0])
    axis = _axis(imp, node, int(_attrs(node)["axis"]), rank)
    if len(layouts) != 1 or any(len(s) != rank for s in shapes):
        raise imp.fail(f"node '{node.name}' (Concat): inputs differ in layout or rank")
    layout = layouts.pop()
    ir_axis = NCHW_TO_NHWC.index(axis) if layout == LAYOUT_NCHW else axis
    ir_shapes = [imp.tensors[x.tensor].shape for x in xs]
    for s in ir_shapes:
        if any(s[i] != ir_shapes[0][i] for i in range(rank) if i != ir_axis):
            raise imp.fail(f"node '{node.name}' (Concat): shapes {shapes} do not match")
    out_shape = list(ir_shapes[0])
    out_shape[ir_axis] = sum(s[ir_axis] for s in ir_shapes)
    out = imp.new_tensor(node.output[0], tuple(out_shape))
    imp.nodes.append(Node(name=node.name, op="concat", inputs=[x.tensor for x in xs],
                          outputs=[out], attrs={"axis": ir_axis}))
    imp.values[node.output[0]] = Value(out, layout)


def _emit_slice(imp: Importer, name: str, x: Value, starts: list[int], steps: list[int],
                counts: list[int], out_name: str) -> None:
    """An IR slice node taking, per ONNX axis a, `counts[a]` elements from `starts[a]` every
    `steps[a]`; the batch axis must be kept whole."""
    rank = len(starts)
    if starts[0] != 0 or counts[0] != 1:
        raise imp.fail(f"node '{name}': slicing the batch axis is not supported")
    if any(c <= 0 for c in counts):
        raise imp.fail(f"node '{name}': the slice is empty (counts {counts})")
    ir_start, ir_step, ir_count = [0] * rank, [1] * rank, [0] * rank
    for a in range(rank):
        i = _ir_axis(x, a, rank)
        ir_start[i], ir_step[i], ir_count[i] = int(starts[a]), int(steps[a]), int(counts[a])
    out = imp.new_tensor(out_name, tuple(ir_count))
    imp.nodes.append(Node(name=name, op="slice", inputs=[x.tensor], outputs=[out],
                          attrs={"starts": tuple(ir_start), "steps": tuple(ir_step)}))
    imp.values[out_name] = Value(out, x.layout)


@handles("Slice")
def _slice(imp: Importer, node: onnx.NodeProto) -> None:
    x = imp.value(node.input[0], node)
    shape = imp.shape(x)
    rank = len(shape)
    attrs = _attrs(node)
    if len(node.input) > 1:
        starts = _int_vector(imp, node.input[1], node, "starts")
        ends = _int_vector(imp, node.input[2], node, "ends")
        axes = _int_vector(imp, node.input[3], node, "axes") \
            if len(node.input) > 3 and node.input[3] else list(range(len(starts)))
        steps = _int_vector(imp, node.input[4], node, "steps") \
            if len(node.input) > 4 and node.input[4] else [1] * len(starts)
    else:  # opset < 10: attributes
        starts, ends = list(attrs.get("starts", [])), list(attrs.get("ends", []))
        axes = list(attrs.get("axes", range(len(starts))))
        steps = [1] * len(starts)
    if not len(starts) == len(ends) == len(axes) == len(steps):
        raise imp.fail(f"node '{node.name}' (Slice): starts, ends, axes and steps differ in "
                       "length")
    first, step, count = [0] * rank, [1] * rank, list(shape)
    for st, en, ax, sp in zip(starts, ends, axes, steps, strict=True):
        a = _axis(imp, node, int(ax), rank, "axes value")
        if sp <= 0:
            raise imp.fail(f"node '{node.name}' (Slice): only positive steps are supported "
                           f"(step {sp})")
        first[a], count[a] = slice_window(shape[a], int(st), int(en), int(sp))
        step[a] = int(sp)
    _emit_slice(imp, node.name, x, first, step, count, node.output[0])


@handles("Split")
def _split(imp: Importer, node: onnx.NodeProto) -> None:
    x = imp.value(node.input[0], node)
    shape = imp.shape(x)
    attrs = _attrs(node)
    axis = _axis(imp, node, int(attrs.get("axis", 0)), len(shape))
    if len(node.input) > 1 and node.input[1]:
        sizes = _int_vector(imp, node.input[1], node, "split")
    elif "split" in attrs:
        sizes = list(attrs["split"])
    else:  # equal parts, the last one smaller (opset 18 num_outputs)
        part = -(-shape[axis] // len(node.output))
        sizes = [min(part, shape[axis] - k * part) for k in range(len(node.output))]
    if len(sizes) != len(node.output) or sum(sizes) != shape[axis] or min(sizes) <= 0:
        raise imp.fail(f"node '{node.name}' (Split): sizes {sizes} do not split axis {axis} "
                       f"of {list(shape)} into {len(node.output)} outputs")
    offset = 0
    for k, (out, size) in enumerate(zip(node.output, sizes, strict=True)):
        first, count = [0] * len(shape), list(shape)
        first[axis], count[axis] = offset, int(size)
        offset += int(size)
        if out:  # one single-output slice node per output (the IR has one output per node)
            _emit_slice(imp, f"{node.name}/{k}" if k else node.name, x, first,
                        [1] * len(shape), count, out)


@handles("Softmax")
def _softmax(imp: Importer, node: onnx.NodeProto) -> None:
    x = imp.value(node.input[0], node)
    shape = imp.shape(x)
    opset = _opset(imp.model)
    axis = _axis(imp, node, int(_attrs(node).get("axis", -1 if opset >= 13 else 1)), len(shape))
    ir_axis = NCHW_TO_NHWC.index(axis) if x.layout == LAYOUT_NCHW else axis
    ir_shape = imp.tensors[x.tensor].shape
    inner = math.prod(ir_shape[ir_axis + 1:])
    if opset < 13 and axis != len(shape) - 1:
        raise imp.fail(f"node '{node.name}' (Softmax): opset {opset} softmax over several "
                       "axes is not supported")
    if inner != 1:
        raise imp.fail(f"node '{node.name}' (Softmax): only softmax over the channel (last) "
                       "axis is supported")
    out = imp.new_tensor(node.output[0], ir_shape)
    imp.nodes.append(Node(name=node.name, op="softmax", inputs=[x.tensor], outputs=[out],
                          attrs={"axis": len(ir_shape) - 1}))
    imp.values[node.output[0]] = Value(out, x.layout)


_ACTIVATIONS = {"Sigmoid": "sigmoid", "Tanh": "tanh", "HardSwish": "hard_swish",
                "HardSigmoid": "hard_sigmoid", "LeakyRelu": "leaky_relu"}


@handles(*_ACTIVATIONS)
def _activation(imp: Importer, node: onnx.NodeProto) -> None:
    """Elementwise activations → one `activation` node (ONNX defaults: LeakyRelu α 0.01,
    HardSigmoid α 0.2, β 0.5)."""
    x = imp.value(node.input[0], node)
    attrs = _attrs(node)
    function = _ACTIVATIONS[node.op_type]
    a: dict = {"function": function}
    if function == "leaky_relu":
        a["alpha"] = float(np.float32(attrs.get("alpha", 0.01)))
    elif function == "hard_sigmoid":
        a["alpha"] = float(np.float32(attrs.get("alpha", 0.2)))
        a["beta"] = float(np.float32(attrs.get("beta", 0.5)))
    if any(not math.isfinite(v) for k, v in a.items() if k != "function"):
        raise imp.fail(f"node '{node.name}' ({node.op_type}): non-finite attribute")
    mul = _hard_swish_mul(imp, node, a)
    if mul is not None:  # x · HardSigmoid(x) with α = 1/6, β = 1/2 is HardSwish (torch, opset < 14)
        a = {"function": "hard_swish"}
        imp.skip_nodes.add(mul.name)
        imp.notes["HardSigmoid + Mul fused into HardSwish"] += 1
    name = node.output[0] if mul is None else mul.output[0]
    out = imp.new_tensor(name, imp.tensors[x.tensor].shape)
    imp.nodes.append(Node(name=node.name, op="activation", inputs=[x.tensor], outputs=[out],
                          attrs=a))
    imp.values[name] = Value(out, x.layout)


def _hard_swish_mul(imp: Importer, node: onnx.NodeProto, attrs: dict) -> onnx.NodeProto | None:
    """The Mul that makes this HardSigmoid a HardSwish: HardSigmoid(α = 1/6, β = 1/2) whose
    output only that Mul reads, times the HardSigmoid's own input (torch's export of
    Hardswish below opset 14); else None."""
    if attrs["function"] != "hard_sigmoid" or attrs["beta"] != 0.5 \
            or attrs["alpha"] != float(np.float32(1 / 6)) or not imp.sole_consumer(node.output[0]):
        return None
    mul = imp.consumers[node.output[0]][0]
    if mul.op_type != "Mul" or mul.domain not in ("", "ai.onnx") or len(mul.input) != 2 \
            or sorted(mul.input) != sorted([node.input[0], node.output[0]]):
        return None
    return mul


@handles("Identity", "Dropout")
def _identity(imp: Importer, node: onnx.NodeProto) -> None:
    imp.values[node.output[0]] = imp.value(node.input[0], node)
    imp.notes[f"{node.op_type} removed"] += 1


# -- reductions and resizing --------------------------------------------------------------------

def _ir_axes(imp: Importer, node: onnx.NodeProto, x: Value, axes: list[int]) -> list[int]:
    """ONNX axes of a rank-4 value → the IR (NHWC) axes they name, batch dropped (it is 1)."""
    rank = len(imp.shape(x))
    onnx_axes = sorted({_axis(imp, node, a, rank, "axes value") for a in axes})
    perm = NCHW_TO_NHWC if x.layout == LAYOUT_NCHW else tuple(range(rank))
    return sorted(perm.index(a) for a in onnx_axes if a != 0)


@handles("ReduceMean")
def _reduce_mean(imp: Importer, node: onnx.NodeProto) -> None:
    """ReduceMean over any of H, W, C of a rank-4 value (axes as attribute before opset 18,
    as input from 18); keepdims 0 adds an IR reshape (a view) to the squeezed shape."""
    attrs = _attrs(node)
    x = imp.value(node.input[0], node)
    shape = imp.shape(x)
    if len(shape) != 4:
        raise imp.fail(f"node '{node.name}' (ReduceMean): only rank-4 inputs are supported, "
                       f"got shape {list(shape)}")
    axes = _axes(imp, node)
    if not axes:
        if attrs.get("noop_with_empty_axes", 0):
            imp.values[node.output[0]] = x
            imp.notes["ReduceMean removed"] += 1
            return
        axes = list(range(len(shape)))
    if any(_axis(imp, node, a, 4, "axes value") == 0 for a in axes):
        raise imp.fail(f"node '{node.name}' (ReduceMean): axes {axes} average over the batch "
                       "axis; mpq runs one sample at a time (reduce over C, H, W only)")
    ir_axes = _ir_axes(imp, node, x, axes)
    in_ir = imp.tensors[x.tensor].shape
    keep_ir = tuple(1 if i in ir_axes else d for i, d in enumerate(in_ir))
    keepdims = int(attrs.get("keepdims", 1))
    name = node.output[0] if keepdims else f"{node.output[0]}_keepdims"
    out = imp.new_tensor(name, keep_ir)
    imp.nodes.append(Node(name=node.name, op="mean", inputs=[x.tensor], outputs=[out],
                          attrs={"axes": tuple(ir_axes),
                                 "count": int(math.prod(in_ir[a] for a in ir_axes))}))
    kept = Value(out, x.layout)
    if keepdims:
        imp.values[node.output[0]] = kept
        return
    onnx_axes = {_axis(imp, node, a, 4, "axes value") for a in axes}
    squeeze = helper.make_node("Squeeze", [], [node.output[0]], name=f"{node.name}_squeeze")
    try:
        _reshape_to(imp, squeeze, kept, [d for i, d in enumerate(imp.shape(kept))
                                         if i not in onnx_axes or i == 0])
    except MpqError:
        raise imp.fail(f"node '{node.name}' (ReduceMean): keepdims=0 over axes {axes} would "
                       "reorder the data between the model's layout and NHWC; supported are "
                       "keepdims=1, and keepdims=0 over H and W or over the channels") from None


def nearest_index_map(in_size: int, out_size: int, scale: float, transform: str,
                      nearest_mode: str) -> tuple[int, ...]:
    """The input index each output index copies under ONNX Resize nearest (operators.md,
    Resize): x = transform(o) in float32 (half_pixel: (o+0.5)/scale−0.5, pytorch_half_pixel:
    the same unless out = 1 (then 0), align_corners: o·(in−1)/(out−1), asymmetric: o/scale,
    tf_half_pixel_for_nn: (o+0.5)/scale), rounded by nearest_mode (round_prefer_floor,
    round_prefer_ceil, floor, ceil) and clamped to [0, in−1]."""
    o = np.arange(out_size, dtype=np.float32)
    s = np.float32(scale)
    half = np.float32(0.5)
    if transform == "half_pixel":
        x = (o + half) / s - half
    elif transform == "pytorch_half_pixel":
        x = (o + half) / s - half if out_size > 1 else np.zeros_like(o)
    elif transform == "align_corners":
        x = o * np.float32(in_size - 1) / np.float32(out_size - 1) if out_size > 1 \
            else np.zeros_like(o)
    elif transform == "asymmetric":
        x = o / s
    elif transform == "tf_half_pixel_for_nn":
        x = (o + half) / s
    else:
        raise ValueError(transform)
    floor = np.floor(x)
    frac = x - floor
    if nearest_mode == "floor":
        idx = floor
    elif nearest_mode == "ceil":
        idx = np.ceil(x)
    elif nearest_mode == "round_prefer_ceil":
        idx = np.where(frac >= half, floor + 1, floor)
    else:  # round_prefer_floor
        idx = np.where(frac > half, floor + 1, floor)
    return tuple(int(v) for v in np.clip(idx, 0, in_size - 1))


_RESIZE_TRANSFORMS = ("half_pixel", "pytorch_half_pixel", "align_corners", "asymmetric",
                      "tf_half_pixel_for_nn")
_NEAREST_MODES = ("round_prefer_floor", "round_prefer_ceil", "floor", "ceil")


def _emit_resize(imp: Importer, node: onnx.NodeProto, x: Value, out_hw: tuple[int, int],
                 scales_hw: tuple[float, float], transform: str, nearest_mode: str) -> None:
    _, h, w, c = imp.tensors[x.tensor].shape
    if min(out_hw) < 1:
        raise imp.fail(f"node '{node.name}' ({node.op_type}): empty output {out_hw[0]}x"
                       f"{out_hw[1]}")
    rows = nearest_index_map(h, out_hw[0], scales_hw[0], transform, nearest_mode)
    cols = nearest_index_map(w, out_hw[1], scales_hw[1], transform, nearest_mode)
    out = imp.new_tensor(node.output[0], (1, out_hw[0], out_hw[1], c))
    imp.nodes.append(Node(name=node.name, op="resize", inputs=[x.tensor], outputs=[out],
                          attrs={"mode": "nearest", "rows": rows, "cols": cols,
                                 "scales": (float(scales_hw[0]), float(scales_hw[1]))}))
    imp.values[node.output[0]] = Value(out, x.layout)


def _resize_scales(imp: Importer, node: onnx.NodeProto, x: Value, scales: list[float] | None,
                   sizes: list[int] | None) -> tuple[tuple[int, int], tuple[float, float]]:
    """Output (H, W) and the H/W scales from ONNX scales or sizes (NCHW or NHWC order as the
    value is seen); resizing the batch or the channels is refused."""
    shape = imp.shape(x)
    hw = (2, 3) if x.layout == LAYOUT_NCHW else (1, 2)
    other = [i for i in range(4) if i not in hw]
    if sizes is not None:
        if len(sizes) != 4 or any(sizes[i] != shape[i] for i in other):
            raise imp.fail(f"node '{node.name}' ({node.op_type}): only spatial resizing of a "
                           f"rank-4 tensor is supported (sizes {sizes} for {list(shape)})")
        out = (int(sizes[hw[0]]), int(sizes[hw[1]]))
        return out, (out[0] / shape[hw[0]], out[1] / shape[hw[1]])
    if scales is None or len(scales) != 4 or any(scales[i] != 1.0 for i in other):
        raise imp.fail(f"node '{node.name}' ({node.op_type}): only spatial resizing of a "
                       f"rank-4 tensor is supported (scales {scales})")
    sc = (float(scales[hw[0]]), float(scales[hw[1]]))
    if min(sc) <= 0:
        raise imp.fail(f"node '{node.name}' ({node.op_type}): scales must be positive, got "
                       f"{scales}")
    out = tuple(math.floor(shape[a] * float(np.float32(s)))  # double, as onnxruntime
                for a, s in zip(hw, sc, strict=True))
    return (out[0], out[1]), sc


def _float_vector(imp: Importer, name: str, node: onnx.NodeProto, what: str) -> list[float]:
    v = imp.const(name, node, what)
    if v.ndim != 1 or v.dtype != np.float32:
        raise imp.fail(f"node '{node.name}' ({node.op_type}): {what} must be a 1-D float32 "
                       f"tensor, got {v.dtype} of shape {list(v.shape)}")
    return [float(f) for f in v]


@handles("Resize")
def _resize(imp: Importer, node: onnx.NodeProto) -> None:
    """Resize, mode nearest, by scales or sizes, with every coordinate transformation and
    nearest mode exporters use; the index maps are resolved here (`nearest_index_map`).
    Mode linear becomes TFLite's bilinear (`_emit_bilinear`)."""
    attrs = _attrs(node)
    x = imp.value(node.input[0], node)
    if len(imp.shape(x)) != 4:
        raise imp.fail(f"node '{node.name}' (Resize): only rank-4 inputs are supported")
    mode = _decode(attrs.get("mode", "nearest"))
    transform = _decode(attrs.get("coordinate_transformation_mode", "half_pixel"))
    nearest_mode = _decode(attrs.get("nearest_mode", "round_prefer_floor"))
    if _opset(imp.model) < 11:
        transform, nearest_mode = "asymmetric", "floor"  # Resize-10 is Upsample's rule
    if mode not in ("nearest", "linear"):
        raise imp.fail(f"node '{node.name}' (Resize): only modes 'nearest' and 'linear' are "
                       f"supported, got '{mode}'")
    if mode == "linear":
        nearest_mode = "floor"  # unused by linear
    if transform not in _RESIZE_TRANSFORMS or nearest_mode not in _NEAREST_MODES:
        raise imp.fail(f"node '{node.name}' (Resize): coordinate_transformation_mode "
                       f"'{transform}' with nearest_mode '{nearest_mode}' is not supported")
    for key, default in (("antialias", 0), ("keep_aspect_ratio_policy", "stretch")):
        if _decode(attrs.get(key, default)) != default:
            raise imp.fail(f"node '{node.name}' (Resize): {key} is not supported")
    if attrs.get("axes") is not None:
        raise imp.fail(f"node '{node.name}' (Resize): the axes attribute is not supported")
    scales = sizes = None
    if _opset(imp.model) < 11:
        scales = _float_vector(imp, node.input[1], node, "scales")
    else:
        if len(node.input) > 3 and node.input[3]:
            sizes = _int_vector(imp, node.input[3], node, "sizes")
        elif len(node.input) > 2 and node.input[2]:
            scales = _float_vector(imp, node.input[2], node, "scales")
            if not scales:
                raise imp.fail(f"node '{node.name}' (Resize): needs scales or sizes")
    out_hw, sc = _resize_scales(imp, node, x, scales, sizes)
    if mode == "linear":
        _emit_bilinear(imp, node, x, out_hw, sc, transform)
        return
    _emit_resize(imp, node, x, out_hw, sc, transform, nearest_mode)


def _emit_bilinear(imp: Importer, node: onnx.NodeProto, x: Value, out_hw: tuple[int, int],
                   scales_hw: tuple[float, float], transform: str) -> None:
    """Resize linear as TFLite's bilinear (the same interpolation in float): align_corners →
    align_corners, half_pixel (pytorch_half_pixel when no output side is 1) → half-pixel
    centres, asymmetric → neither; only with the scales out/in (TFLite's taps derive from the
    sizes). The integer model then uses TFLM's int8 bilinear (10-bit fractions)."""
    _, h, w, c = imp.tensors[x.tensor].shape
    flags = {"align_corners": (True, False), "half_pixel": (False, True),
             "asymmetric": (False, False)}
    if transform == "pytorch_half_pixel" and min(out_hw) > 1:
        transform = "half_pixel"
    derived = (np.float32(out_hw[0] / h), np.float32(out_hw[1] / w))
    if transform not in flags or min(out_hw) < 1 or \
            (np.float32(scales_hw[0]), np.float32(scales_hw[1])) != derived:
        raise imp.fail(f"node '{node.name}' ({node.op_type}): linear resizing is supported with "
                       "coordinate_transformation_mode align_corners, half_pixel, "
                       "pytorch_half_pixel or asymmetric and scales equal to output/input size "
                       f"(got '{transform}', scales {list(scales_hw)} for "
                       f"{h}x{w} → {out_hw[0]}x{out_hw[1]})")
    align, hpc = flags[transform]
    out = imp.new_tensor(node.output[0], (1, out_hw[0], out_hw[1], c))
    imp.nodes.append(Node(name=node.name, op="resize", inputs=[x.tensor], outputs=[out],
                          attrs={"mode": "bilinear", "align_corners": align,
                                 "half_pixel_centers": hpc}))
    imp.values[node.output[0]] = Value(out, x.layout)


@handles("Upsample")
def _upsample(imp: Importer, node: onnx.NodeProto) -> None:
    """Upsample (opsets 7–9), mode nearest (asymmetric coordinates, floor) or linear
    (asymmetric bilinear)."""
    attrs = _attrs(node)
    x = imp.value(node.input[0], node)
    if len(imp.shape(x)) != 4:
        raise imp.fail(f"node '{node.name}' (Upsample): only rank-4 inputs are supported")
    mode = _decode(attrs.get("mode", "nearest"))
    if mode not in ("nearest", "linear", "bilinear"):
        raise imp.fail(f"node '{node.name}' (Upsample): only modes 'nearest' and 'linear' are "
                       f"supported, got '{mode}'")
    if "scales" in attrs:
        scales = [float(f) for f in attrs["scales"]]
    else:
        scales = _float_vector(imp, node.input[1], node, "scales")
    out_hw, sc = _resize_scales(imp, node, x, scales, None)
    if mode != "nearest":
        _emit_bilinear(imp, node, x, out_hw, sc, "asymmetric")
        return
    _emit_resize(imp, node, x, out_hw, sc, "asymmetric", "floor")


# -- 1-D convolution and pooling as 2-D with H = 1 -------------------------------------------------

_ONE_D = ("Conv", "MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool")


def _reads_ncw(imp: Importer, node: onnx.NodeProto) -> bool:
    """Whether `node` takes a rank-3 NCW activation as 1-D conv/pool (or as the normalised
    ONNX's Unsqueeze at axis 2 to NCHW with H = 1)."""
    if node.op_type == "Unsqueeze":
        axes = _attrs(node).get("axes")
        if axes is None and len(node.input) > 1 and node.input[1] in imp.consts:
            axes = imp.consts[node.input[1]].reshape(-1).tolist()
        return axes is not None and [int(a) % 4 for a in axes] == [2]
    return node.op_type in _ONE_D


def _lift_1d(imp: Importer, node: onnx.NodeProto) -> onnx.NodeProto | None:
    """A 1-D Conv/pool on an NCW value as the same op in 2-D on NCHW with H = 1: the IR tensor
    [1, 1, W, C] is both views. Returns the 2-D node (its input an NCHW alias, a 3-D weight
    given a 4-D twin, kernel/strides/dilations/pads with a unit H axis), or None."""
    x = imp.values.get(node.input[0])
    if x is None or x.layout != LAYOUT_NCW:
        return None
    attrs = _attrs(node)
    alias = f"{node.input[0]}__as_nchw"
    imp.values[alias] = Value(x.tensor, LAYOUT_NCHW)
    inputs = [alias, *node.input[1:]]
    if node.op_type == "Conv":
        w = imp.weight(node.input[1], node, "weight")
        if w.ndim != 3:
            raise imp.fail(f"node '{node.name}' (Conv): a rank-3 input needs a rank-3 weight, "
                           f"got {list(w.shape)}")
        inputs[1] = f"{node.input[1]}__2d"
        imp.consts[inputs[1]] = np.ascontiguousarray(w[:, :, None, :])
    new = {}
    for key, value in attrs.items():
        if key in ("kernel_shape", "strides", "dilations"):
            value = [1, *value]
        elif key == "pads":
            if len(value) != 2:
                raise imp.fail(f"node '{node.name}' ({node.op_type}): 1-D pads must have 2 "
                               f"values, got {list(value)}")
            value = [0, value[0], 0, value[1]]
        new[key] = value
    return helper.make_node(node.op_type, inputs, list(node.output), name=node.name, **new)


def _run_1d(handler: Handler) -> Handler:
    """Wrap a 2-D conv/pool handler so that it also takes NCW inputs (`_lift_1d`)."""
    def run(imp: Importer, node: onnx.NodeProto) -> None:
        lifted = _lift_1d(imp, node)
        if lifted is None:
            handler(imp, node)
            return
        handler(imp, lifted)
        del imp.values[lifted.input[0]]
        out = imp.values[node.output[0]]
        imp.values[node.output[0]] = Value(out.tensor, LAYOUT_NCW)
        imp.notes[f"1-D {node.op_type} as 2-D"] += 1
    run.__doc__ = handler.__doc__
    return run


for _op in _ONE_D:
    if _op in HANDLERS:
        HANDLERS[_op] = _run_1d(HANDLERS[_op])


# -- Mul, Sub, PRelu ------------------------------------------------------------------------------

def _fold_scale(imp: Importer, node: onnx.NodeProto, act_name: str, const_name: str) -> bool:
    """Mul by a per-channel constant right after a Conv/Gemm/MatMul: scale its weights and
    bias (conv(x)·c = conv with c[o]·W[o], c[o]·b[o]). False when not that pattern."""
    x = imp.value(act_name, node)
    prod = imp.fusable_producer(act_name, ("conv2d", "fully_connected"))
    if prod is None or prod.act != "none":
        return False
    vec = _channel_vector(imp, node, imp.weight(const_name, node, "factor"), prod, x.layout)
    if vec is None:
        return False
    shape = (-1,) + (1,) * (prod.weight.ndim - 1)
    prod.weight = (prod.weight * vec.reshape(shape)).astype(np.float32)
    prod.bias = (prod.bias * vec).astype(np.float32)
    imp.rename_output(prod, x.tensor, node.output[0], x.layout)
    imp.notes["Mul by a constant folded"] += 1
    return True


def _fold_subtrahend(imp: Importer, node: onnx.NodeProto, act_name: str,
                     const_name: str) -> bool:
    """Sub of a per-channel constant right after a Conv/Gemm/MatMul: a bias of −c."""
    x = imp.value(act_name, node)
    prod = imp.fusable_producer(act_name, ("conv2d", "fully_connected"))
    if prod is None or prod.act != "none":
        return False
    vec = _channel_vector(imp, node, imp.weight(const_name, node, "subtrahend"), prod, x.layout)
    if vec is None:
        return False
    prod.bias = (prod.bias - vec).astype(np.float32)
    imp.rename_output(prod, x.tensor, node.output[0], x.layout)
    imp.notes["Sub of a constant folded"] += 1
    return True


def _binary(imp: Importer, node: onnx.NodeProto, op: str) -> None:
    """Mul / Sub of two activations of one rank and layout, each dim equal or 1 (broadcast,
    e.g. squeeze-excite's [1,C,H,W] × [1,C,1,1]); a constant operand folds into the producing
    Conv/Gemm/MatMul when it is per channel, else is refused."""
    a, b = node.input[0], node.input[1]
    if a in imp.consts and b in imp.consts:  # pragma: no cover - folded as a constant op
        raise imp.fail(f"node '{node.name}' ({node.op_type}): both inputs are constant")
    if a in imp.consts or b in imp.consts:
        if op == "mul":
            act_name, const_name = (b, a) if a in imp.consts else (a, b)
            if _fold_scale(imp, node, act_name, const_name):
                return
        elif b in imp.consts and _fold_subtrahend(imp, node, a, b):
            return
        _binary_const(imp, node, op)
        return
    xa, xb = imp.value(a, node), imp.value(b, node)
    sa, sb = imp.tensors[xa.tensor].shape, imp.tensors[xb.tensor].shape
    shape = broadcast_shape(sa, sb)
    if shape is None or (xa.layout != xb.layout and len(sa) == 4):
        raise imp.fail(f"node '{node.name}' ({node.op_type}): operands "
                       f"{list(imp.shape(xa))} and {list(imp.shape(xb))} must have one rank "
                       "and layout, each dim equal or 1 (rank 2 or 4 when they differ)")
    out = imp.new_tensor(node.output[0], shape)
    imp.nodes.append(Node(name=node.name, op=op, inputs=[xa.tensor, xb.tensor], outputs=[out]))
    imp.values[node.output[0]] = Value(out, xa.layout)


def _binary_const(imp: Importer, node: onnx.NodeProto, op: str) -> None:
    """Mul / Sub of an activation and a float32 constant that broadcasts to it (ONNX's
    right-aligned rule, the output keeping the activation's shape); the IR keeps the constant
    in its own layout (`const`, `const_shape`, `const_first`)."""
    const_first = node.input[0] in imp.consts
    act_name, const_name = (node.input[1], node.input[0]) if const_first else node.input[:2]
    x = imp.value(act_name, node)
    c = imp.weight(const_name, node, "constant operand")
    onnx_shape = imp.shape(x)
    c_shape = (1,) * (len(onnx_shape) - c.ndim) + c.shape
    if c.ndim > len(onnx_shape) or broadcast_shape(onnx_shape, c_shape) != onnx_shape:
        raise imp.fail(f"node '{node.name}' ({node.op_type}): the constant {list(c.shape)} "
                       f"must broadcast to the activation {list(onnx_shape)} (each dim "
                       "equal or 1; rank 2 or 4 unless equal)")
    c = c.reshape(c_shape)
    if x.layout == LAYOUT_NCHW and c.ndim == 4:
        c = c.transpose(NCHW_TO_NHWC)
    ir_shape = imp.tensors[x.tensor].shape
    out = imp.new_tensor(node.output[0], ir_shape)
    imp.nodes.append(Node(name=node.name, op=op, inputs=[x.tensor], outputs=[out], attrs={
        "const": tuple(float(v) for v in c.reshape(-1)), "const_shape": tuple(c.shape),
        "const_first": const_first}))
    imp.values[node.output[0]] = Value(out, x.layout)
    imp.notes[f"{node.op_type} by a constant"] += 1


@handles("Mul")
def _mul(imp: Importer, node: onnx.NodeProto) -> None:
    _binary(imp, node, "mul")


@handles("Sub")
def _sub(imp: Importer, node: onnx.NodeProto) -> None:
    _binary(imp, node, "sub")


@handles("PRelu")
def _prelu(imp: Importer, node: onnx.NodeProto) -> None:
    """PRelu with a constant slope that is one value per channel (or one for all): ONNX
    broadcasts it against the input as the graph sees it; the IR keeps one slope per channel."""
    x = imp.value(node.input[0], node)
    slope = imp.weight(node.input[1], node, "slope")
    onnx_shape = imp.shape(x)
    try:
        full = np.broadcast_to(slope, onnx_shape)
    except ValueError:
        full = None
    if full is not None and x.layout == LAYOUT_NCHW:
        full = full.transpose(NCHW_TO_NHWC)
    ir_shape = imp.tensors[x.tensor].shape
    flat = None if full is None else full.reshape(-1, ir_shape[-1])
    if flat is None or not np.all(flat == flat[0]):
        raise imp.fail(f"node '{node.name}' (PRelu): slope {list(slope.shape)} must be one "
                       f"value per channel of {list(onnx_shape)} (or one for all)")
    out = imp.new_tensor(node.output[0], ir_shape)
    imp.nodes.append(Node(name=node.name, op="prelu", inputs=[x.tensor], outputs=[out],
                          attrs={"alpha": tuple(float(v) for v in flat[0])}))
    imp.values[node.output[0]] = Value(out, x.layout)


# -- driver ---------------------------------------------------------------------------------------

def _opset(model: onnx.ModelProto) -> int:
    for o in model.opset_import:
        if o.domain in ("", "ai.onnx"):
            return int(o.version)
    return 1


def _constant_node_value(node: onnx.NodeProto) -> np.ndarray:
    """The value of a Constant node (already checked by onnx_validate.constant_value)."""
    a = node.attribute[0]
    if a.name == "value":
        return numpy_helper.to_array(a.t)
    v = helper.get_attribute_value(a)
    dtype = np.int64 if a.name.startswith("value_int") else np.float32
    return np.array(v, dtype=dtype)


# Ops on constants only (shape arithmetic that exporters leave behind) are evaluated at import.
_FOLDABLE = {"Shape", "Gather", "Unsqueeze", "Squeeze", "Concat", "Cast", "Slice", "Mul", "Add",
             "Sub", "Div", "Reshape", "ConstantOfShape", "Range", "Transpose", "Identity",
             "Neg", "Sqrt", "Floor", "Ceil", "ReduceProd", "Expand", "Equal", "Where"}


def _fold_constant(imp: Importer, node: onnx.NodeProto) -> bool:
    """Evaluate `node` now if all its inputs are known constants (or static shapes)."""
    if node.op_type not in _FOLDABLE or node.domain not in ("", "ai.onnx"):
        return False
    if node.op_type == "Shape" and node.input[0] in imp.values:
        shape = np.array(imp.shape(imp.values[node.input[0]]), np.int64)
        attrs = _attrs(node)
        imp.consts[node.output[0]] = shape[attrs.get("start", 0):attrs.get("end", None)]
        return True
    if not all((not n) or n in imp.consts for n in node.input):
        return False
    from onnx.reference import ReferenceEvaluator

    inputs = [n for n in node.input if n]
    sub = helper.make_graph(
        [node], "fold",
        [helper.make_tensor_value_info(n, helper.np_dtype_to_tensor_dtype(imp.consts[n].dtype),
                                       imp.consts[n].shape) for n in inputs],
        [helper.make_tensor_value_info(o, onnx.TensorProto.UNDEFINED, None)
         for o in node.output])
    model = helper.make_model(sub, opset_imports=[helper.make_opsetid("", _opset(imp.model))])
    counted = imp.fold.charge(node, [imp.consts[n] if n else None for n in node.input],
                              _attrs(node), imp.source)
    results = ReferenceEvaluator(model).run(None, {n: imp.consts[n] for n in inputs})
    imp.fold.settle(counted, results, node, imp.source)
    for name, value in zip(node.output, results, strict=True):
        imp.consts[name] = np.asarray(value)
    return True


def _fold_failed(imp: Importer, node: onnx.NodeProto, exc: Exception) -> MpqError:
    """The one-line error of a constant op that cannot be evaluated (a Transpose perm that does
    not fit its input, a Gather index out of range): the model, not mpq, is at fault."""
    text = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ""
    return imp.fail(f"node '{node.name}' ({node.op_type}): cannot evaluate this op on its "
                    f"constant inputs ({type(exc).__name__}: {text})")


def _check_input(imp: Importer, vi: onnx.ValueInfoProto) -> tuple[int, ...]:
    t = vi.type.tensor_type
    if not vi.type.HasField("tensor_type"):
        raise imp.fail(f"graph input '{vi.name}' is not a tensor")
    if t.elem_type != onnx.TensorProto.FLOAT:
        raise imp.fail(f"graph input '{vi.name}' has element type "
                       f"{check.dtype_name(t.elem_type)}; only float32 inputs "
                       "are supported")
    if not t.HasField("shape"):
        raise imp.fail(f"graph input '{vi.name}' has no shape")
    dims = []
    for i, d in enumerate(t.shape.dim):
        if d.HasField("dim_value") and d.dim_value <= 0:
            # Not symbolic: a size of zero or below (onnxruntime would take -7 as "any").
            raise imp.fail(f"graph input '{vi.name}' has dimension {i} of size {d.dim_value}")
        if d.HasField("dim_value"):
            dims.append(int(d.dim_value))
        elif i == 0:
            dims.append(1)  # symbolic batch: mpq runs one sample at a time
        else:
            label = d.dim_param or "?"
            raise imp.fail(f"graph input '{vi.name}' has a dynamic dimension {i} ('{label}'); "
                           "export the model with a fixed input size")
    if dims and dims[0] != 1:
        raise imp.fail(f"graph input '{vi.name}' has batch size {dims[0]}; mpq needs batch 1 "
                       "or a symbolic batch dimension")
    return tuple(dims)


def _input_layout(imp: Importer, name: str, shape: tuple[int, ...]) -> str:
    """Decide whether a rank-4 graph input is NHWC (tf2onnx) or NCHW (PyTorch), and whether a
    rank-3 one is NCW (read by 1-D convolutions and pools, `_lift_1d`)."""
    if len(shape) == 3:
        readers = imp.consumers.get(name, [])
        return LAYOUT_NCW if readers and all(_reads_ncw(imp, r) for r in readers) \
            else LAYOUT_NHWC
    if len(shape) != 4:
        return LAYOUT_NHWC
    readers = imp.consumers.get(name, [])
    if readers and all(r.op_type == "Transpose"
                       and tuple(_attrs(r).get("perm", ())) == NHWC_TO_NCHW for r in readers):
        return LAYOUT_NHWC
    if readers and all(r.op_type == "Reshape" for r in readers):
        return LAYOUT_NHWC  # e.g. the KWS DS-CNN: [1,49,10,1] reshaped to NCHW [1,1,49,10]
    return LAYOUT_NCHW


def _unsupported(imp: Importer, node: onnx.NodeProto) -> MpqError:
    op = node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}.{node.op_type}"
    return imp.fail(f"node '{node.name}' has unsupported op {op}; supported ops: "
                    + ", ".join(supported_ops()))


def _check_ops(imp: Importer) -> None:
    """Refuse unsupported ops before anything else, so the error names the real culprit."""
    for node in imp.model.graph.node:
        if node.domain not in ("", "ai.onnx"):
            raise _unsupported(imp, node)
        if node.op_type not in HANDLERS and node.op_type not in _FOLDABLE \
                and node.op_type != "Constant":
            raise _unsupported(imp, node)


def _check_initializers(imp: Importer) -> None:
    for init in imp.model.graph.initializer:
        if init.data_type == onnx.TensorProto.FLOAT16:
            raise imp.fail(f"initializer '{init.name}' is float16; mpq imports float32 models "
                           "only (convert the weights to float32)")
        if init.data_location == onnx.TensorProto.EXTERNAL:
            raise imp.fail(f"initializer '{init.name}' keeps its data in an external file, "
                           "which mpq does not read")
        limits.check_shape(init.dims, f"{imp.source}: initializer '{init.name}'")
        imp.consts[init.name] = numpy_helper.to_array(init)


def _check_names(model: onnx.ModelProto, source: str) -> None:
    """Name a node input that nothing defines (the checker's own message blames ordering)."""
    g = model.graph
    known = {i.name for i in g.initializer} | {i.name for i in g.input} | {""}
    for node in g.node:
        for name in node.input:
            if name not in known:
                produced_later = any(name in n.output for n in g.node)
                if not produced_later:
                    raise MpqError(check.show(
                        f"{source}: node '{node.name}' ({node.op_type}) reads '{name}', which "
                        "is neither a graph input, an initializer nor a node output (missing "
                        "initializer?)"))
        known.update(node.output)


def load_onnx(path: str | Path) -> onnx.ModelProto:
    """Read an ONNX file, turning every way it can be unreadable into one MpqError line."""
    p = Path(path)
    if not p.exists():
        raise MpqError(f"{path}: no such file")
    if not p.is_file():
        raise MpqError(f"{path}: not a file")
    limits.check_model_file(p)
    data = p.read_bytes()
    if not data:
        raise MpqError(f"{path}: empty file, not an ONNX model")
    try:
        model = onnx.load_from_string(data)
    except Exception as exc:  # protobuf raises DecodeError and friends
        raise MpqError(f"{path}: not an ONNX model or truncated file "
                       f"({type(exc).__name__})") from None
    if not model.HasField("graph") or not model.graph.node:
        raise MpqError(f"{path}: not an ONNX model or truncated file (no graph)")
    check.check_utf8(model, str(path))
    _check_names(model, str(path))
    try:
        onnx.checker.check_model(model)
    except onnx.checker.ValidationError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else "invalid model"
        raise MpqError(check.show(f"{path}: invalid ONNX model or truncated file: {first}")) \
            from None
    return model


def import_model(model: onnx.ModelProto, source: str = "model") -> Graph:
    """Convert an ONNX model to the IR (DESIGN §3). Raises MpqError on anything unsupported."""
    # Folding arithmetic on corrupt weights may overflow; numpy's warnings would only add
    # lines to the one error that finite_weights gives for the result.
    with np.errstate(all="ignore"):
        return _import_model(model, source)


def _import_model(model: onnx.ModelProto, source: str) -> Graph:
    imp = Importer(model=model, source=source)
    g = model.graph
    check.check_utf8(model, source)
    renamed = check.name_nodes(model)
    if renamed:
        imp.notes["unnamed or duplicate node named"] += renamed
    _check_ops(imp)  # an unsupported op is the first thing to tell
    check.check_structure(model, source)
    check.initializers(model, source)
    one_d = check.one_d_nodes(model)
    for node in g.node:
        check.attributes(node, source, node.name in one_d)
        if node.op_type == "Constant":
            check.constant_value(node, source)
    for n in g.node:
        for name in n.input:
            imp.consumers.setdefault(name, []).append(n)
    imp.graph_outputs = {o.name for o in g.output}
    _check_initializers(imp)

    inputs: list[str] = []
    input_layouts: dict[str, str] = {}
    init_names = set(imp.consts)
    for vi in g.input:
        if vi.name in init_names:
            continue
        shape = _check_input(imp, vi)
        layout = _input_layout(imp, vi.name, shape)
        ir_shape = tuple(shape[i] for i in NCHW_TO_NHWC) if layout == LAYOUT_NCHW else shape
        if layout == LAYOUT_NCW:
            ir_shape = (shape[0], 1, shape[2], shape[1])
        imp.new_tensor(vi.name, ir_shape)
        imp.values[vi.name] = Value(vi.name, layout)
        inputs.append(vi.name)
        input_layouts[vi.name] = layout
    if not inputs:
        raise imp.fail("the graph has no (non-initializer) input")

    for node in g.node:
        if node.name in imp.skip_nodes:
            continue
        if node.op_type == "Constant":
            imp.fold.charge(node, [], _attrs(node), imp.source)
            imp.consts[node.output[0]] = _constant_node_value(node)
            imp.notes["Constant resolved"] += 1
            continue
        try:
            folded = _fold_constant(imp, node)
        except MpqError:
            raise
        except Exception as exc:  # onnx's reference evaluator refuses the op's inputs/attributes
            raise _fold_failed(imp, node, exc) from None
        if folded:
            imp.notes["constant subgraph node folded"] += 1
            continue
        handler = HANDLERS.get(node.op_type)
        if handler is None:  # a shape op whose inputs are not constant
            raise _unsupported(imp, node)
        handler(imp, node)

    outputs: list[str] = []
    output_layouts: dict[str, str] = {}
    for vi in g.output:
        if vi.name in imp.consts:
            raise imp.fail(f"graph output '{vi.name}' is a constant; mpq needs every output "
                           "computed from the input")
        value = imp.value(vi.name, onnx.NodeProto(name="<graph output>", op_type="Output"))
        if value.tensor in inputs or value.tensor in outputs:
            what = "a graph input" if value.tensor in inputs else "another graph output"
            raise imp.fail(f"graph output '{vi.name}' is {what} under another name (through "
                           "Identity or a layout-only op); mpq needs distinct computed outputs")
        outputs.append(value.tensor)
        output_layouts[value.tensor] = value.layout
    graph = Graph(name=g.name or Path(source).stem, tensors=imp.tensors, nodes=imp.nodes,
                  inputs=inputs, outputs=outputs, input_layouts=input_layouts,
                  output_layouts=output_layouts, notes=dict(sorted(imp.notes.items())))
    remove_dead_nodes(graph)
    check.finite_weights(graph.nodes, source)
    return graph


def import_onnx(path: str | Path) -> Graph:
    """Load and import an ONNX file."""
    return import_model(load_onnx(path), str(path))
