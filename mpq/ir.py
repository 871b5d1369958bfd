"""The NHWC intermediate representation every stage after import works on (DESIGN §3).

A `Graph` is a list of `Node`s in topological order over named `Tensor`s. Rank-4 activation
tensors are NHWC (CMSIS-NN's layout); convolution weights are OHWI `[Cout, KH, KW, Cin/groups]`
and fully connected weights are `[Cout, K]`, so later stages never transpose. Activation
functions are fused into their producer as a clamp range, and padding is always explicit and
four-sided `(top, left, bottom, right)`, so asymmetric TF "SAME" pads survive exactly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

# Layout of a graph input or output as the *original* model sees it, so that data given in
# the ONNX model's layout can be fed to the IR (and results handed back) without guessing.
LAYOUT_NHWC = "nhwc"  # the original tensor is already in the IR's layout (any rank)
LAYOUT_NCHW = "nchw"  # the original rank-4 tensor is NCHW; the IR holds it as NHWC
LAYOUT_NCW = "ncw"  # the original rank-3 tensor is NCW (1-D conv nets); the IR: NHWC, H = 1

OPS = (
    "conv2d",
    "fully_connected",
    "add",
    "max_pool",
    "avg_pool",
    "reshape",
    "concat",
    "softmax",
    "mean",
    "resize",
    "mul",
    "sub",
    "prelu",
    "pad",
    "slice",
    "activation",
)

# Ops that accept a fused activation clamp.
ACT_OPS = ("conv2d", "fully_connected", "add", "max_pool", "avg_pool", "mul", "sub")

# Elementwise ops of two activations whose second (or first) input may broadcast: each of its
# dims equals the output's or is 1 (squeeze-excite's [1,H,W,C] × [1,1,1,C]).
BROADCAST_OPS = ("mul", "sub")


@dataclass
class Tensor:
    """An activation tensor: its name and static shape (batch 1, NHWC when rank 4)."""

    name: str
    shape: tuple[int, ...]

    @property
    def size(self) -> int:
        """Number of elements."""
        return int(math.prod(self.shape))


@dataclass
class Node:
    """One IR operation.

    `attrs` by op:
      conv2d          kernel (kh, kw), strides (sh, sw), dilations (dh, dw), pads (t, l, b, r),
                      groups; weight [Cout, KH, KW, Cin/groups], bias [Cout]
      fully_connected weight [Cout, K], bias [Cout]
      add             (two activation inputs of equal shape)
      max_pool        kernel, strides, pads
      avg_pool        kernel, strides, pads (padding taps are excluded from the count)
      reshape         shape (the output shape; NHWC memory order is kept)
      concat          axis (in the IR layout); optional constants: ((position among the
                      concatenated parts, float32 array in the IR layout with batch 1), …),
                      quantised with the output's parameters
      softmax         axis (always the last)
      mean            axes (IR axes among 1, 2, 3), count (elements averaged per output); the
                      output keeps the reduced axes as 1 (rank 4), an importer adds a reshape
                      where the model drops them
      resize          mode "nearest": rows / cols, the input row (column) each output row
                      (column) copies — the model's coordinate rule resolved at import;
                      scales (H, W): the scales that rule used (for the ONNX writer);
                      mode "bilinear" (TFLite RESIZE_BILINEAR): align_corners,
                      half_pixel_centers (taps: interpreter/arith bilinear_*_taps)
      mul, sub        two activation inputs of the output's rank; each dim of an input equals
                      the output's or is 1 (broadcast, e.g. [1,H,W,C] × [1,1,1,C]); or one
                      activation and a constant: const (flat float values), const_shape (IR
                      layout, the output's rank, dims equal or 1), const_first (sub: c − x);
                      int8 imports also carry const_q, const_scale, const_zp
      prelu           alpha: tuple of one slope per channel (last axis); int8 imports also
                      carry alpha_q (the file's int8 slopes), alpha_scale, alpha_zp
      pad             pads ((before, after) per axis, IR layout); the pad value is real zero
                      (the zero point), TFLite PAD / ONNX Pad constant 0
      slice           starts, steps (per axis, IR layout; steps ≥ 1); element i of an axis
                      reads input element starts + i·steps (Slice, Split, StridedSlice)
      activation      function (sigmoid, tanh, hard_swish, hard_sigmoid, leaky_relu), alpha
                      (leaky_relu, hard_sigmoid), beta (hard_sigmoid); elementwise, one input
    Ops in ACT_OPS also carry `act_min` / `act_max` (float, ±inf when unbounded).
    """

    name: str
    op: str
    inputs: list[str]
    outputs: list[str]
    attrs: dict[str, Any] = field(default_factory=dict)
    weight: np.ndarray | None = None
    bias: np.ndarray | None = None

    @property
    def act(self) -> str:
        """The fused activation as a word: none, relu, relu6 or clip."""
        lo = self.attrs.get("act_min", -math.inf)
        hi = self.attrs.get("act_max", math.inf)
        if lo == -math.inf and hi == math.inf:
            return "none"
        if lo == 0.0 and hi == math.inf:
            return "relu"
        if lo == 0.0 and hi == 6.0:
            return "relu6"
        return "clip"

    @property
    def is_depthwise(self) -> bool:
        """A conv2d whose every group has exactly one input channel (any channel multiplier)."""
        return self.op == "conv2d" and self.weight is not None and self.weight.shape[3] == 1 \
            and self.attrs["groups"] > 1

    @property
    def kind(self) -> str:
        """A finer op name for tables: depthwise and grouped convolutions are told apart."""
        if self.op == "conv2d":
            if self.is_depthwise:
                return "depthwise"
            if self.attrs["groups"] > 1:
                return "grouped_conv"
            return "conv2d"
        return self.op


@dataclass
class Graph:
    """A whole network in the IR."""

    name: str
    tensors: dict[str, Tensor]
    nodes: list[Node]
    inputs: list[str]
    outputs: list[str]
    input_layouts: dict[str, str] = field(default_factory=dict)
    output_layouts: dict[str, str] = field(default_factory=dict)
    notes: dict[str, int] = field(default_factory=dict)  # what import folded, fused, removed
    # The node names in the model file's order when `nodes` runs in another (a plan's
    # memory-aware order, `mpq.order`); empty: `nodes` is the file's order.
    file_order: tuple[str, ...] = ()

    def producer(self) -> dict[str, Node]:
        """Map each tensor name to the node that writes it."""
        return {t: n for n in self.nodes for t in n.outputs}

    def consumers(self) -> dict[str, list[Node]]:
        """Map each tensor name to the nodes that read it, in schedule order."""
        out: dict[str, list[Node]] = {name: [] for name in self.tensors}
        for n in self.nodes:
            for t in n.inputs:
                out[t].append(n)
        return out


def tensor_groups(graph: Graph, pairs: Any) -> list[list[str]]:
    """The connected groups of `graph`'s tensors under the (a, b) `pairs` (union-find): every
    tensor in one group, members in tensor order, groups ordered by their first member."""
    parent = {t: t for t in graph.tensors}
    order = {t: i for i, t in enumerate(graph.tensors)}

    def find(t: str) -> str:
        while parent[t] != t:
            parent[t] = parent[parent[t]]
            t = parent[t]
        return t

    for a, b in pairs:
        ra, rb = find(a), find(b)
        if ra != rb:
            lo, hi = sorted((ra, rb), key=order.get)
            parent[hi] = lo
    groups: dict[str, list[str]] = {}
    for t in graph.tensors:
        groups.setdefault(find(t), []).append(t)
    return sorted(groups.values(), key=lambda g: order[g[0]])


def remove_dead_nodes(graph: Graph) -> None:
    """Drop nodes no graph output depends on, and tensors no remaining node touches."""
    live = set(graph.outputs)
    kept: list[Node] = []
    for n in reversed(graph.nodes):
        if any(o in live for o in n.outputs):
            kept.append(n)
            live.update(n.inputs)
    graph.nodes = kept[::-1]
    used = set(graph.inputs) | set(graph.outputs)
    for n in graph.nodes:
        used.update(n.inputs)
        used.update(n.outputs)
    graph.tensors = {k: v for k, v in graph.tensors.items() if k in used}


def constant_operand(node: Node) -> np.ndarray | None:
    """The float constant operand of a mul/sub with one activation input, shaped
    `const_shape`, or None when both operands are activations."""
    if "const" not in node.attrs:
        return None
    return np.asarray(node.attrs["const"], np.float32).reshape(node.attrs["const_shape"])


def binary_operands(node: Node, x: np.ndarray, const: np.ndarray | None,
                    others: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """(first, second) operand of a mul/sub: the two inputs, or the activation `x` and the
    constant in the node's order (`const_first`)."""
    if const is None:
        return x, others[0]
    return (const, x) if node.attrs.get("const_first") else (x, const)


def broadcast_shape(sa: tuple[int, ...], sb: tuple[int, ...]) -> tuple[int, ...] | None:
    """The shape two same-rank operands of a BROADCAST_OPS node broadcast to (each dim equal
    or 1, as TFLM's broadcasting kernels and numpy allow), or None when they do not — or when
    they differ at a rank other than 2 or 4: the kernels see [1, K] as 1×1×K and rank 4 as
    H×W×C views, so only those broadcast there."""
    if len(sa) != len(sb) or (sa != sb and len(sa) not in (2, 4)):
        return None
    pairs = list(zip(sa, sb, strict=True))
    if any(a != b and 1 not in (a, b) for a, b in pairs):
        return None
    return tuple(max(a, b) for a, b in pairs)


def conv_out_size(size: int, kernel: int, stride: int, dilation: int, pad_lo: int,
                  pad_hi: int) -> int:
    """Output length of a convolution or pooling window along one axis (ONNX/TFLite formula)."""
    effective = dilation * (kernel - 1) + 1
    return (size + pad_lo + pad_hi - effective) // stride + 1


def slice_window(dim: int, start: int, end: int, step: int) -> tuple[int, int]:
    """(first index, count) of a slice along one axis with step > 0 (ONNX Slice; TFLite
    strided_slice_logic.h StartForAxis/StopForAxis): negative start/end count from the end,
    both clamp to [0, dim], count = ⌈(end − start)/step⌉ (0 when empty)."""
    start = start + dim if start < 0 else start
    end = end + dim if end < 0 else end
    start, end = min(max(start, 0), dim), min(max(end, 0), dim)
    return start, max(0, -(-(end - start) // step))


def node_macs(node: Node, graph: Graph) -> int:
    """Multiply-accumulates of one node: conv Cout·Ho·Wo·KH·KW·Cin/groups, FC Cout·K, else 0."""
    if node.op == "conv2d":
        cout, kh, kw, cin_g = node.weight.shape
        _, ho, wo, _ = graph.tensors[node.outputs[0]].shape
        return int(cout * ho * wo * kh * kw * cin_g)
    if node.op == "fully_connected":
        cout, k = node.weight.shape
        return int(cout * k)
    return 0


def node_params(node: Node) -> int:
    """Trainable parameters of one node: weights plus biases."""
    total = 0
    if node.weight is not None:
        total += int(node.weight.size)
    if node.bias is not None:
        total += int(node.bias.size)
    return total


def graph_fingerprint(graph: Graph) -> str:
    """sha256 over the graph's structure and weights: identifies "the same model" across files.

    Two imports of the same network (original ONNX, normalised ONNX) give the same value, so
    statistics and plans can refuse a model they were not made for.
    """
    import hashlib

    h = hashlib.sha256()
    for name in graph.inputs:
        h.update(f"in:{name}:{graph.tensors[name].shape}".encode())
    nodes = graph.nodes
    if graph.file_order:  # the model, not the order a plan runs it in (`mpq.order`)
        by_name = {n.name: n for n in graph.nodes}
        nodes = [by_name[name] for name in graph.file_order]
    for n in nodes:
        attrs = sorted((k, repr(v)) for k, v in n.attrs.items())
        h.update(f"{n.name}|{n.op}|{n.inputs}|{n.outputs}|{attrs}".encode())
        for arr in (n.weight, n.bias, *(c for _, c in n.attrs.get("constants", ()))):
            if arr is not None:
                h.update(np.ascontiguousarray(arr, np.float32).tobytes())
    return h.hexdigest()
