"""IR → normalised ONNX (the `model.mpq.onnx` of DESIGN §1).

The written model is plain opset-13 ONNX that onnxruntime runs and that `import_model` reads
back into the same IR: BatchNorm already folded, activations as one Relu/Clip after their
producer, pads as attributes, rank-4 tensors NCHW inside, and the graph inputs and outputs in
the original model's layout (an NHWC input keeps its `Transpose`, as tf2onnx writes it).
IR tensor names become ONNX value names, so names stay stable across a round trip.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from mpq import __version__
from mpq.errors import MpqError
from mpq.ir import LAYOUT_NCHW, LAYOUT_NCW, Graph, Node, constant_operand

NORMALISED_KEY = "mpq.normalised"
OPSET = 13


class _Writer:
    def __init__(self, graph: Graph) -> None:
        self.graph = graph
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        # Shapes by ONNX value name (IR names plus the renamed graph inputs/outputs).
        self.shapes = {name: t.shape for name, t in graph.tensors.items()}
        # Every value name in the model: derived names (`x__preact`, `conv/weight`) must not
        # collide with a name the user's model already chose.
        self.taken: set[str] = set(graph.tensors)
        # Node names: the IR's own (unique) names are reserved; derived ones (`conv/act`) avoid
        # them, since onnxruntime refuses a model with two nodes of one name.
        self.node_names: set[str] = {n.name for n in graph.nodes}

    def derived(self, name: str) -> str:
        """A name for a node the writer adds, unique among all node names."""
        return _claim(name, self.node_names)

    def fresh(self, name: str) -> str:
        """A value name: `name`, or `name_1`, `name_2`, … if a value of that name exists."""
        return _claim(name, self.taken)

    def init(self, name: str, array: np.ndarray) -> str:
        name = self.fresh(name)
        self.inits.append(numpy_helper.from_array(array, name))
        return name

    def rank4(self, tensor: str) -> bool:
        return len(self.shapes[tensor]) == 4

    def add(self, op: str, inputs: list[str], outputs: list[str], name: str, **attrs) -> None:
        self.nodes.append(helper.make_node(op, inputs, outputs, name=name, **attrs))

    def with_act(self, node: Node, op: str, inputs: list[str], **attrs) -> None:
        """Emit `op` followed by its fused activation, the activation writing the IR name."""
        out = node.outputs[0]
        lo = node.attrs.get("act_min", -math.inf)
        hi = node.attrs.get("act_max", math.inf)
        if lo == -math.inf and hi == math.inf:
            self.add(op, inputs, [out], node.name, **attrs)
            return
        pre = self.fresh(f"{out}__preact")
        self.add(op, inputs, [pre], node.name, **attrs)
        if lo == 0.0 and hi == math.inf:
            self.add("Relu", [pre], [out], self.derived(f"{node.name}/act"))
            return
        lo_name = self.init(f"{node.name}/act/min", np.array(lo, np.float32)) \
            if lo != -math.inf else ""
        hi_name = self.init(f"{node.name}/act/max", np.array(hi, np.float32)) \
            if hi != math.inf else ""
        self.add("Clip", [pre, lo_name, hi_name], [out], self.derived(f"{node.name}/act"))

    def conv2d(self, node: Node) -> None:
        a = node.attrs
        w = self.init(f"{node.name}/weight", node.weight.transpose(0, 3, 1, 2).copy())
        b = self.init(f"{node.name}/bias", node.bias)
        t, left, bottom, r = a["pads"]
        self.with_act(node, "Conv", [node.inputs[0], w, b], kernel_shape=list(a["kernel"]),
                      strides=list(a["strides"]), dilations=list(a["dilations"]),
                      pads=[t, left, bottom, r], group=a["groups"])

    def fully_connected(self, node: Node) -> None:
        w = self.init(f"{node.name}/weight", node.weight)
        b = self.init(f"{node.name}/bias", node.bias)
        self.with_act(node, "Gemm", [node.inputs[0], w, b], transB=1)

    def add_(self, node: Node) -> None:
        self.with_act(node, "Add", list(node.inputs))

    def pool(self, node: Node, op: str) -> None:
        a = node.attrs
        attrs = {"kernel_shape": list(a["kernel"]), "strides": list(a["strides"]),
                 "pads": list(a["pads"])}
        if op == "AveragePool":
            attrs["count_include_pad"] = 0
        self.with_act(node, op, list(node.inputs), **attrs)

    def reshape(self, node: Node) -> None:
        src, out = node.inputs[0], node.outputs[0]
        # The IR reshape keeps NHWC memory order; in NCHW ONNX that means going through NHWC.
        if self.rank4(src):
            nhwc_in = self.fresh(f"{out}__nhwc_in")
            self.add("Transpose", [src], [nhwc_in], self.derived(f"{node.name}/to_nhwc"),
                     perm=[0, 2, 3, 1])
            src = nhwc_in
        shape = [-1] + list(node.attrs["shape"][1:])
        s = self.init(f"{node.name}/shape", np.array(shape, np.int64))
        if self.rank4(out):
            nhwc = self.fresh(f"{out}__nhwc")
            self.add("Reshape", [src, s], [nhwc], node.name)
            self.add("Transpose", [nhwc], [out], self.derived(f"{node.name}/to_nchw"),
                     perm=[0, 3, 1, 2])
        else:
            self.add("Reshape", [src, s], [out], node.name)

    def concat(self, node: Node) -> None:
        axis = node.attrs["axis"]
        if self.rank4(node.outputs[0]):
            axis = (0, 2, 3, 1)[axis]
        inputs = list(node.inputs)
        constants = node.attrs.get("constants", ())
        if constants:
            # Concat does not broadcast: the batch-1 constants are expanded to the batch of
            # the activations (onnxruntime runs calibration batches), shape [N, 1, …, 1].
            rank = len(self.shapes[node.outputs[0]])
            pre = f"{node.name}/batch"
            shape = self.fresh(f"{pre}_shape")
            self.add("Shape", [node.inputs[0]], [shape], self.derived(f"{pre}_shape"))
            n = self.fresh(f"{pre}_n")
            self.add("Slice", [shape, self.init(f"{pre}_0", np.array([0], np.int64)),
                               self.init(f"{pre}_1", np.array([1], np.int64))], [n],
                     self.derived(f"{pre}_n"))
            target = self.fresh(f"{pre}_target")
            self.add("Concat", [n, self.init(f"{pre}_ones", np.ones(rank - 1, np.int64))],
                     [target], self.derived(f"{pre}_target"), axis=0)
        for pos, c in constants:
            value = c.transpose(0, 3, 1, 2) if c.ndim == 4 else c
            const = self.init(f"{node.name}/constant{pos}", np.ascontiguousarray(value,
                                                                               np.float32))
            expanded = self.fresh(f"{node.name}/constant{pos}_batch")
            self.add("Expand", [const, target], [expanded],
                     self.derived(f"{node.name}/expand{pos}"))
            inputs.insert(pos, expanded)
        self.add("Concat", inputs, list(node.outputs), node.name, axis=axis)

    def softmax(self, node: Node) -> None:
        axis = 1 if self.rank4(node.outputs[0]) else -1
        self.add("Softmax", list(node.inputs), list(node.outputs), node.name, axis=axis)

    def mean(self, node: Node) -> None:
        axes = sorted((0, 2, 3, 1)[a] for a in node.attrs["axes"])  # IR NHWC → NCHW axes
        self.add("ReduceMean", list(node.inputs), list(node.outputs), node.name, axes=axes,
                 keepdims=1)

    def resize(self, node: Node) -> None:
        """Resize nearest with the first coordinate rule and nearest mode that give the node's
        index maps (every map mpq imports, ONNX's or TFLite's, is one of them): by the scales
        it was imported with when they give its size, else by sizes (out/in), built from the
        input's Shape so that any batch runs (the importer folds it back to constants)."""
        from mpq.frontend.onnx_import import _NEAREST_MODES, _RESIZE_TRANSFORMS, nearest_index_map

        if node.attrs["mode"] == "bilinear":
            self.resize_bilinear(node)
            return
        _, h, w, _ = self.shapes[node.inputs[0]]
        rows, cols = tuple(node.attrs["rows"]), tuple(node.attrs["cols"])
        ho, wo = len(rows), len(cols)
        given = node.attrs.get("scales")
        candidates = [(ho / h, wo / w, False)]
        if given and _resized(h, given[0]) == ho and _resized(w, given[1]) == wo:
            candidates.insert(0, (given[0], given[1], True))
        for (sh, sw, by_scales), transform, mode in itertools.product(
                candidates, _RESIZE_TRANSFORMS, _NEAREST_MODES):
            if nearest_index_map(h, ho, sh, transform, mode) != rows or \
                    nearest_index_map(w, wo, sw, transform, mode) != cols:
                continue
            if by_scales:
                scales = self.init(f"{node.name}/scales", np.array([1, 1, sh, sw], np.float32))
                ins = [node.inputs[0], "", scales]
            else:
                ins = [node.inputs[0], "", "", self.resize_sizes(node, ho, wo)]
            self.add("Resize", ins, list(node.outputs), node.name, mode="nearest",
                     coordinate_transformation_mode=transform, nearest_mode=mode)
            return
        raise MpqError(f"normalised ONNX: resize '{node.name}' has index maps no ONNX Resize "
                       "mode reproduces")

    def resize_sizes(self, node: Node, ho: int, wo: int) -> str:
        """Resize's sizes input [N, C, ho, wo] from the input's Shape, so any batch runs."""
        shape = self.fresh(f"{node.outputs[0]}__shape")
        nc = self.fresh(f"{node.outputs[0]}__nc")
        sizes = self.fresh(f"{node.outputs[0]}__sizes")
        self.add("Shape", [node.inputs[0]], [shape], self.derived(f"{node.name}/shape"))
        self.add("Slice", [shape, self.init(f"{node.name}/start", np.array([0])),
                           self.init(f"{node.name}/end", np.array([2]))], [nc],
                 self.derived(f"{node.name}/nc"))
        self.add("Concat", [nc, self.init(f"{node.name}/hw", np.array([ho, wo]))],
                 [sizes], self.derived(f"{node.name}/sizes"), axis=0)
        return sizes

    def resize_bilinear(self, node: Node) -> None:
        """TFLite's bilinear as ONNX Resize linear (align_corners, half_pixel or asymmetric);
        the same interpolation up to float rounding of the coordinates (onnxruntime serves
        calibration; mpq does not import linear Resize back)."""
        a = node.attrs
        _, ho, wo, _ = self.shapes[node.outputs[0]]
        transform = "align_corners" if a["align_corners"] else \
            "half_pixel" if a["half_pixel_centers"] else "asymmetric"
        self.add("Resize", [node.inputs[0], "", "", self.resize_sizes(node, ho, wo)],
                 list(node.outputs), node.name, mode="linear",
                 coordinate_transformation_mode=transform)

    def binary(self, node: Node, op: str) -> None:
        """Mul / Sub: ONNX broadcasts the NCHW views exactly as the IR does the NHWC ones; a
        constant operand becomes an initializer in the ONNX layout."""
        c = constant_operand(node)
        if c is None:
            self.with_act(node, op, list(node.inputs))
            return
        if c.ndim == 4:
            c = c.transpose(0, 3, 1, 2)
        name = self.init(f"{node.name}/const", np.ascontiguousarray(c))
        x = node.inputs[0]
        self.with_act(node, op, [name, x] if node.attrs.get("const_first") else [x, name])

    def prelu(self, node: Node) -> None:
        alpha = np.asarray(node.attrs["alpha"], np.float32)
        shape = (alpha.size, 1, 1) if self.rank4(node.inputs[0]) else (alpha.size,)
        slope = self.init(f"{node.name}/slope", alpha.reshape(shape))
        self.add("PRelu", [node.inputs[0], slope], list(node.outputs), node.name)

    def onnx_axis(self, tensor: str, ir_axis: int) -> int:
        """The ONNX axis of an IR axis (rank-4 tensors are NCHW in the written model)."""
        return (0, 2, 3, 1)[ir_axis] if self.rank4(tensor) else ir_axis

    def pad(self, node: Node) -> None:
        ir = node.attrs["pads"]
        before, after = [0] * len(ir), [0] * len(ir)
        for a, (lo, hi) in enumerate(ir):
            before[self.onnx_axis(node.inputs[0], a)] = lo
            after[self.onnx_axis(node.inputs[0], a)] = hi
        p = self.init(f"{node.name}/pads", np.array(before + after, np.int64))
        self.add("Pad", [node.inputs[0], p], list(node.outputs), node.name)

    def slice_(self, node: Node) -> None:
        a = node.attrs
        shape = self.shapes[node.outputs[0]]
        axes = list(range(1, len(shape)))
        starts = [a["starts"][i] for i in axes]
        ends = [a["starts"][i] + a["steps"][i] * (shape[i] - 1) + 1 for i in axes]
        ins = [node.inputs[0]]
        for what, v in (("starts", starts), ("ends", ends),
                        ("axes", [self.onnx_axis(node.inputs[0], i) for i in axes]),
                        ("steps", [a["steps"][i] for i in axes])):
            ins.append(self.init(f"{node.name}/{what}", np.array(v, np.int64)))
        self.add("Slice", ins, list(node.outputs), node.name)

    def activation(self, node: Node) -> None:
        a = node.attrs
        op_type = {"sigmoid": "Sigmoid", "tanh": "Tanh", "hard_swish": "HardSwish",
                   "hard_sigmoid": "HardSigmoid", "leaky_relu": "LeakyRelu"}[a["function"]]
        extra = {k: float(a[k]) for k in ("alpha", "beta") if k in a}
        self.add(op_type, list(node.inputs), list(node.outputs), node.name, **extra)

    def emit(self, node: Node) -> None:
        dispatch = {
            "conv2d": self.conv2d,
            "fully_connected": self.fully_connected,
            "add": self.add_,
            "max_pool": lambda n: self.pool(n, "MaxPool"),
            "avg_pool": lambda n: self.pool(n, "AveragePool"),
            "reshape": self.reshape,
            "concat": self.concat,
            "softmax": self.softmax,
            "mean": self.mean,
            "resize": self.resize,
            "mul": lambda n: self.binary(n, "Mul"),
            "sub": lambda n: self.binary(n, "Sub"),
            "prelu": self.prelu,
            "pad": self.pad,
            "slice": self.slice_,
            "activation": self.activation,
        }
        dispatch[node.op](node)


def _resized(size: int, scale: float) -> int:
    """ONNX Resize's output size floor(size·scale), the float32 scale widened to double (as
    onnxruntime computes it)."""
    return math.floor(size * float(np.float32(scale)))


def _value_info(name: str, shape: tuple[int, ...]) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, ["batch"] + list(shape[1:]))


def graph_to_onnx(graph: Graph) -> onnx.ModelProto:
    """Write the IR as a normalised ONNX model (see the module docstring)."""
    w = _Writer(graph)
    renames: dict[str, str] = {}
    inputs = []
    for name in graph.inputs:
        shape = graph.tensors[name].shape
        if graph.input_layouts.get(name) == LAYOUT_NCW:
            # Original input is NCW (1-D convolutions): unsqueeze to NCHW with H = 1.
            inputs.append(_value_info(name, (shape[0], shape[3], shape[2])))
            renames[name] = w.fresh(f"{name}__nchw")
            w.add("Unsqueeze", [name, w.init(f"{name}/axes", np.array([2], np.int64))],
                  [renames[name]], w.derived(f"{name}/to_nchw"))
        elif len(shape) == 4 and graph.input_layouts.get(name) != LAYOUT_NCHW:
            # Original input is NHWC: declare it so, and transpose to NCHW as tf2onnx does.
            inputs.append(_value_info(name, shape))
            renames[name] = w.fresh(f"{name}__nchw")
            w.add("Transpose", [name], [renames[name]], w.derived(f"{name}/to_nchw"),
                  perm=[0, 3, 1, 2])
        else:
            nchw = tuple(shape[i] for i in (0, 3, 1, 2)) if len(shape) == 4 else shape
            inputs.append(_value_info(name, nchw))

    out_renames = {name: w.fresh(f"{name}__nchw") for name in graph.outputs
                   if len(graph.tensors[name].shape) == 4
                   and graph.output_layouts.get(name) != LAYOUT_NCHW}
    ncw_outputs = {name for name in out_renames if graph.output_layouts.get(name) == LAYOUT_NCW}
    for old, new in list(renames.items()) + list(out_renames.items()):
        w.shapes[new] = graph.tensors[old].shape
    for node in graph.nodes:
        renamed = Node(node.name, node.op,
                       [renames.get(t, out_renames.get(t, t)) for t in node.inputs],
                       [out_renames.get(t, t) for t in node.outputs], node.attrs, node.weight,
                       node.bias)
        w.emit(renamed)
    outputs = []
    for name in graph.outputs:
        shape = graph.tensors[name].shape
        if name in ncw_outputs:
            w.add("Squeeze", [out_renames[name], w.init(f"{name}/axes", np.array([2], np.int64))],
                  [name], w.derived(f"{name}/to_ncw"))
            outputs.append(_value_info(name, (shape[0], shape[3], shape[2])))
        elif name in out_renames:
            w.add("Transpose", [out_renames[name]], [name], w.derived(f"{name}/to_nhwc"),
                  perm=[0, 2, 3, 1])
            outputs.append(_value_info(name, shape))
        else:
            nchw = tuple(shape[i] for i in (0, 3, 1, 2)) if len(shape) == 4 else shape
            outputs.append(_value_info(name, nchw))

    onnx_graph = helper.make_graph(w.nodes, graph.name, inputs, outputs, initializer=w.inits)
    # HardSwish exists from opset 14 on; other models keep the opset they always had.
    opset = 14 if any(n.op == "activation" and n.attrs["function"] == "hard_swish"
                      for n in graph.nodes) else OPSET
    model = helper.make_model(onnx_graph, opset_imports=[helper.make_opsetid("", opset)],
                              producer_name="mpq", producer_version=__version__)
    model.ir_version = 8
    helper.set_model_props(model, {NORMALISED_KEY: "1"})
    onnx.checker.check_model(model)
    return model


def _claim(name: str, taken: set[str]) -> str:
    """`name`, or the first of `name_1`, `name_2`, … not in `taken`; added to `taken`."""
    candidate, k = name, 0
    while candidate in taken:
        k += 1
        candidate = f"{name}_{k}"
    taken.add(candidate)
    return candidate
