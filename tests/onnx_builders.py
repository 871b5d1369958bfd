"""In-memory ONNX model builders for the ``mpq`` test-suite.

Every public builder returns an :class:`onnx.ModelProto` (opset 13, IR version 8) built with
:mod:`onnx.helper` and seeded :func:`numpy.random.default_rng` weights -- no PyTorch or
TensorFlow needed.  Apart from :func:`missing_initializer_model` (deliberately broken), each model
passes ``onnx.checker.check_model(model, full_check=True)`` and runs in onnxruntime.

Groups of builders:

* :func:`mobilenet_v2` -- torchvision's MobileNetV2, exported either the way ``torch.onnx``
  writes it (NCHW, Conv + BatchNormalization or folded BN, ReLU6 as ``Clip``, Gemm) or the way
  tf2onnx writes a Keras model (NHWC input + Transpose, folded BN, Reshape + MatMul + Add).
  :func:`mobilenet_v2_macs` computes the multiply-accumulate count straight from the architecture
  table, independently of the graph, so tests can use it as an anchor.
* Small single-feature models for importer tests (asymmetric pads, explicit ``Pad``,
  ``Constant``/``Identity`` plumbing, standalone BN, grouped/dilated/depthwise convs, concat +
  flatten order, tf2onnx- and KWS-style NHWC front ends).
* Bad inputs the importer must reject cleanly (unsupported op, dynamic spatial dims, FLOAT16
  weights, a dangling weight name).

Run ``python tests/onnx_builders.py`` for a self-check that builds and runs every model.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 13
IR_VERSION = 8
BN_EPSILON = 1e-5
BN_MOMENTUM = 0.9  # torch exports 1 - momentum(0.1)

#: torchvision's MobileNetV2 inverted-residual table: expand ratio t, channels c, repeats n,
#: first stride s.
MOBILENET_V2_SETTINGS: tuple[tuple[int, int, int, int], ...] = (
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)

_TORCH_PRODUCER = ("pytorch", "2.1.0")
_TF2ONNX_PRODUCER = ("tf2onnx", "1.16.1 15c810")

IntPair = int | tuple[int, int]


# --------------------------------------------------------------------------------------------
# Generic helpers
# --------------------------------------------------------------------------------------------


def make_divisible(v: float, divisor: int = 8, min_value: int | None = None) -> int:
    """Round ``v`` to a multiple of ``divisor`` exactly like torchvision's ``_make_divisible``.

    The result is never below ``min_value`` (default ``divisor``) and never more than 10 %
    below ``v``.
    """
    if min_value is None:
        min_value = divisor
    new_v = max(min_value, int(v + divisor / 2) // divisor * divisor)
    if new_v < 0.9 * v:
        new_v += divisor
    return new_v


def _pair(v: IntPair) -> tuple[int, int]:
    """Expand an int to an (h, w) pair; pass pairs through."""
    if isinstance(v, int):
        return (v, v)
    h, w = v
    return (int(h), int(w))


def _out_dim(size: int, kernel: int, stride: int, pad_begin: int, pad_end: int,
             dilation: int = 1) -> int:
    """Output size of a conv/pool along one axis (floor mode)."""
    eff = dilation * (kernel - 1) + 1
    out = (size + pad_begin + pad_end - eff) // stride + 1
    if out < 1:
        raise ValueError(f"non-positive output size for input {size}, kernel {kernel}")
    return out


def _same_pads(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """TensorFlow ``SAME`` padding (begin, end) along one axis: the extra pixel goes at the end."""
    out = -(-size // stride)
    total = max((out - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


class _Builder:
    """Accumulates nodes and initializers for one graph and draws seeded weights."""

    def __init__(self, seed: int = 0) -> None:
        self.rng = np.random.default_rng(seed)
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[TensorProto] = []
        self._init_names: set[str] = set()
        self._anon = 300  # counter for torch-style anonymous names (onnx::Conv_301, ...)

    # -- naming / bookkeeping ----------------------------------------------------------------
    def anon(self, op: str) -> str:
        """A fresh torch-style anonymous initializer name such as ``onnx::Conv_301``."""
        self._anon += 1
        return f"onnx::{op}_{self._anon}"

    def init(self, name: str, value: np.ndarray | float | int | Sequence[int],
             dtype: type | None = None) -> str:
        """Add an initializer and return its name.

        Re-adding a name shares the existing initializer; the values must then be identical.
        """
        arr = np.asarray(value, dtype=dtype)
        if name in self._init_names:
            old = next(t for t in self.initializers if t.name == name)
            if not np.array_equal(numpy_helper.to_array(old), arr):
                raise ValueError(f"initializer {name!r} re-added with different values")
            return name
        self.initializers.append(numpy_helper.from_array(arr, name))
        self._init_names.add(name)
        return name

    def node(self, op: str, inputs: Sequence[str], name: str, outputs: Sequence[str] | None = None,
             n_out: int = 1, **attrs: object) -> str:
        """Append a node; return its first output (named ``<name>_output_<i>`` by default)."""
        if outputs is None:
            outputs = [f"{name}_output_{i}" for i in range(n_out)]
        self.nodes.append(helper.make_node(op, list(inputs), list(outputs), name=name, **attrs))
        return outputs[0]

    # -- weights -----------------------------------------------------------------------------
    def he(self, shape: Sequence[int], gain: float = 2.0) -> np.ndarray:
        """He-normal weights: std = sqrt(gain / fan_in), fan_in = prod(shape[1:])."""
        fan_in = int(np.prod(shape[1:]))
        w = self.rng.standard_normal(tuple(shape)) * math.sqrt(gain / fan_in)
        return w.astype(np.float32)

    def small(self, n: int | Sequence[int], scale: float = 0.05) -> np.ndarray:
        """Small normal values (biases)."""
        return (self.rng.standard_normal(n) * scale).astype(np.float32)

    def bn(self, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """BatchNorm (gamma, beta, running_mean, running_var), near identity, var > 0."""
        gamma = 1.0 + 0.1 * self.rng.standard_normal(n)
        beta = 0.1 * self.rng.standard_normal(n)
        mean = 0.1 * self.rng.standard_normal(n)
        var = self.rng.uniform(0.5, 1.5, n)
        return tuple(a.astype(np.float32) for a in (gamma, beta, mean, var))  # type: ignore

    # -- common subgraphs --------------------------------------------------------------------
    def conv(self, x: str, weight: str, bias: str | None, name: str, kernel: IntPair,
             stride: IntPair = 1, pads: Sequence[int] = (0, 0, 0, 0), dilation: IntPair = 1,
             group: int = 1, output: str | None = None) -> str:
        """A ``Conv`` node with all attributes spelled out (as torch and tf2onnx do)."""
        inputs = [x, weight] + ([bias] if bias is not None else [])
        return self.node(
            "Conv", inputs, name, outputs=None if output is None else [output],
            dilations=list(_pair(dilation)), group=group, kernel_shape=list(_pair(kernel)),
            pads=list(pads), strides=list(_pair(stride)),
        )

    def batchnorm(self, x: str, prefix: str, params: Sequence[np.ndarray], name: str) -> str:
        """An inference ``BatchNormalization`` node with torch-style parameter names."""
        names = [
            self.init(f"{prefix}.{suffix}", p)
            for suffix, p in zip(("weight", "bias", "running_mean", "running_var"), params,
                                 strict=True)
        ]
        return self.node("BatchNormalization", [x, *names], name, epsilon=BN_EPSILON,
                         momentum=BN_MOMENTUM)

    # -- finishing ---------------------------------------------------------------------------
    def model(self, graph_name: str, inputs: Sequence[onnx.ValueInfoProto],
              outputs: Sequence[str | onnx.ValueInfoProto],
              producer: tuple[str, str] = _TORCH_PRODUCER, check: bool = True) -> onnx.ModelProto:
        """Assemble the model; output shapes are filled in by ONNX shape inference.

        ``outputs`` items that are plain names become FLOAT outputs whose shape is inferred; a
        leading dimension left unknown by inference (e.g. after ``Reshape [-1, C]``) is renamed
        to the first input's batch symbol.  With ``check`` the model is validated with
        ``full_check=True``.
        """
        out_vis = [
            o if isinstance(o, onnx.ValueInfoProto)
            else helper.make_tensor_value_info(o, TensorProto.FLOAT, None)
            for o in outputs
        ]
        graph = helper.make_graph(self.nodes, graph_name, list(inputs), out_vis,
                                  initializer=self.initializers)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                                  ir_version=IR_VERSION, producer_name=producer[0],
                                  producer_version=producer[1])
        if check:
            inferred = onnx.shape_inference.infer_shapes(model, strict_mode=True)
            batch_sym = inputs[0].type.tensor_type.shape.dim[0].dim_param or None
            for declared, got in zip(model.graph.output, inferred.graph.output, strict=True):
                if declared.type.tensor_type.HasField("shape"):
                    continue
                declared.type.CopyFrom(got.type)
                dims = declared.type.tensor_type.shape.dim
                if batch_sym and dims and not dims[0].HasField("dim_value") \
                        and not dims[0].dim_param:
                    dims[0].dim_param = batch_sym
            onnx.checker.check_model(model, full_check=True)
        return model


def _input(name: str, shape: Sequence[int | str],
           elem_type: int = TensorProto.FLOAT) -> onnx.ValueInfoProto:
    """Graph input value-info."""
    return helper.make_tensor_value_info(name, elem_type, list(shape))


def _fold_bn(weight: np.ndarray, bias: np.ndarray | None, bn: Sequence[np.ndarray],
             eps: float = BN_EPSILON) -> tuple[np.ndarray, np.ndarray]:
    """Fold inference BatchNorm into the preceding conv (as torch.onnx / tf2onnx do)."""
    gamma, beta, mean, var = (np.asarray(p, dtype=np.float64) for p in bn)
    scale = gamma / np.sqrt(var + eps)
    b = np.zeros_like(mean) if bias is None else bias.astype(np.float64)
    w = weight.astype(np.float64) * scale.reshape(-1, *([1] * (weight.ndim - 1)))
    return w.astype(np.float32), ((b - mean) * scale + beta).astype(np.float32)


# --------------------------------------------------------------------------------------------
# MobileNetV2
# --------------------------------------------------------------------------------------------


@dataclass
class _MbConv:
    """One Conv(+BN)(+ReLU6) of MobileNetV2 with its names in both export flavours."""

    torch_conv: str  # torch module path of the Conv, e.g. "features/1/conv/0/0"
    torch_bn: str  # torch module path of the BN
    torch_act: str | None  # torch module path of the ReLU6 (None: linear)
    keras: str  # Keras layer name of the conv, e.g. "block_1_expand"
    keras_act: str | None  # Keras layer name of the ReLU6
    kernel: int
    stride: int
    group: int
    weight: np.ndarray  # [cout, cin / group, k, k]
    bn: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]


@dataclass
class _MbBlock:
    """A ``features[index]`` entry: a list of convs and an optional residual add."""

    index: int
    keras_add: str
    residual: bool = False
    convs: list[_MbConv] = field(default_factory=list)


def _mobilenet_v2_arch(b: _Builder, width: float, num_classes: int
                       ) -> tuple[list[_MbBlock], np.ndarray, np.ndarray]:
    """Build the layer list and draw all weights (same draw order for every export flavour)."""

    def cna(torch_path: str, keras: str, keras_act: str | None, cin: int, cout: int, k: int,
            s: int, group: int, relu6: bool, torch_bn: str | None = None) -> _MbConv:
        weight = b.he((cout, cin // group, k, k), gain=2.0 if relu6 else 1.0)
        bn = b.bn(cout)
        if relu6:  # Conv2dNormActivation: children 0 Conv, 1 BN, 2 ReLU6
            return _MbConv(f"{torch_path}/0", f"{torch_path}/1", f"{torch_path}/2", keras,
                           keras_act, k, s, group, weight, bn)
        assert torch_bn is not None
        return _MbConv(torch_path, torch_bn, None, keras, None, k, s, group, weight, bn)

    blocks: list[_MbBlock] = []
    cin = make_divisible(32 * width)
    last = make_divisible(1280 * max(1.0, width))
    stem = _MbBlock(0, "")
    stem.convs.append(cna("features/0", "Conv1", "Conv1_relu", 3, cin, 3, 2, 1, True))
    blocks.append(stem)
    idx = 1
    for t, c, n, s in MOBILENET_V2_SETTINGS:
        cout = make_divisible(c * width)
        for i in range(n):
            stride = s if i == 0 else 1
            hidden = int(round(cin * t))
            kp = "expanded_conv_" if idx == 1 else f"block_{idx - 1}_"
            blk = _MbBlock(idx, f"{kp}add", residual=stride == 1 and cin == cout)
            j = 0
            if t != 1:
                blk.convs.append(cna(f"features/{idx}/conv/{j}", f"{kp}expand", f"{kp}expand_relu",
                                     cin, hidden, 1, 1, 1, True))
                j += 1
            blk.convs.append(cna(f"features/{idx}/conv/{j}", f"{kp}depthwise",
                                 f"{kp}depthwise_relu", hidden, hidden, 3, stride, hidden, True))
            blk.convs.append(cna(f"features/{idx}/conv/{j + 1}", f"{kp}project", None, hidden,
                                 cout, 1, 1, 1, False, torch_bn=f"features/{idx}/conv/{j + 2}"))
            blocks.append(blk)
            cin = cout
            idx += 1
    head = _MbBlock(idx, "")
    head.convs.append(cna(f"features/{idx}", "Conv_1", "out_relu", cin, last, 1, 1, 1, True))
    blocks.append(head)
    fc_w = b.he((num_classes, last), gain=1.0)
    fc_b = b.small(num_classes)
    return blocks, fc_w, fc_b


def mobilenet_v2(width: float = 1.0, resolution: int = 224, num_classes: int = 1000,
                 seed: int = 0, fold_bn: bool = False, layout: str = "nchw",
                 same_pads: bool = False) -> onnx.ModelProto:
    """torchvision MobileNetV2 (``width_mult=width``) as an ONNX model with random weights.

    ``layout="nchw"`` mimics ``torch.onnx.export``: input ``input`` ``['batch', 3, R, R]``,
    bias-free ``Conv`` + ``BatchNormalization`` (or, with ``fold_bn``, Conv with folded bias and
    anonymous ``onnx::Conv_N`` initializers, as torch does in eval mode), ReLU6 as ``Clip`` with
    shared scalar initializers 0 and 6, residual ``Add``, ``GlobalAveragePool``, ``Flatten``,
    ``Gemm(transB=1)``, output ``output`` ``['batch', num_classes]``.  Node names follow the
    module paths, e.g. ``/features/1/conv/0/0/Conv``.

    ``layout="nhwc"`` mimics tf2onnx on the Keras model: input ``input_1`` ``['unk__1', R, R, 3]``
    and a ``Transpose(0, 3, 1, 2)``, BN always folded, ReLU6 as ``Clip``, ``GlobalAveragePool``,
    ``Reshape [-1, C]``, ``MatMul`` + ``Add``, output ``predictions`` (no Softmax).

    The weights depend only on (width, num_classes, seed), so ``fold_bn`` True/False and both
    layouts compute the same function.  ``same_pads`` (extension, default off) replaces the
    symmetric torch padding of the 3x3 convs with TensorFlow ``SAME`` padding -- asymmetric
    ``[0, 0, 1, 1]`` for stride 2 on even sizes, as in the Keras model; output shapes and MACs
    are unchanged but the numbers then differ from the symmetric variant.
    """
    if layout not in ("nchw", "nhwc"):
        raise ValueError(f"layout must be 'nchw' or 'nhwc', not {layout!r}")
    b = _Builder(seed)
    blocks, fc_w, fc_b = _mobilenet_v2_arch(b, width, num_classes)
    tf = layout == "nhwc"
    fold = fold_bn or tf

    if tf:
        scope = f"StatefulPartitionedCall/mobilenetv2_{width:.2f}_{resolution}"
        inputs = [_input("input_1", ["unk__1", resolution, resolution, 3])]
        x = b.node("Transpose", ["input_1"], f"{scope}/Conv1/Conv2D__6", perm=[0, 3, 1, 2])
        clip_lo = b.init("const_fold_opt__clip_min", np.float32(0.0))
        clip_hi = b.init("const_fold_opt__clip_max", np.float32(6.0))
    else:
        inputs = [_input("input", ["batch", 3, resolution, resolution])]
        x = "input"
        clip_lo = b.init("onnx::Clip_min", np.float32(0.0))
        clip_hi = b.init("onnx::Clip_max", np.float32(6.0))

    h = resolution
    for blk in blocks:
        block_in = x
        for cv in blk.convs:
            k, s = cv.kernel, cv.stride
            if same_pads:
                pb, pe = _same_pads(h, k, s)
            else:
                pb = pe = (k - 1) // 2
            pads = [pb, pb, pe, pe]
            h = _out_dim(h, k, s, pb, pe)
            if tf:
                w, bias = _fold_bn(cv.weight, None, cv.bn)
                wn = b.init(f"{scope}/{cv.keras}/Conv2D_weights_fused_bn", w)
                bn_ = b.init(f"{scope}/{cv.keras}/Conv2D_bias_fused_bn", bias)
                x = b.conv(x, wn, bn_, f"{scope}/{cv.keras}/Conv2D", k, s, pads, group=cv.group)
            elif fold:
                w, bias = _fold_bn(cv.weight, None, cv.bn)
                wn, bn_ = b.init(b.anon("Conv"), w), b.init(b.anon("Conv"), bias)
                x = b.conv(x, wn, bn_, f"/{cv.torch_conv}/Conv", k, s, pads, group=cv.group)
            else:
                wn = b.init(cv.torch_conv.replace("/", ".") + ".weight", cv.weight)
                x = b.conv(x, wn, None, f"/{cv.torch_conv}/Conv", k, s, pads, group=cv.group)
                x = b.batchnorm(x, cv.torch_bn.replace("/", "."), cv.bn,
                                f"/{cv.torch_bn}/BatchNormalization")
            if cv.torch_act is not None:
                name = f"{scope}/{cv.keras_act}/Relu6" if tf else f"/{cv.torch_act}/Clip"
                x = b.node("Clip", [x, clip_lo, clip_hi], name)
        if blk.residual:
            name = f"{scope}/{blk.keras_add}/add" if tf else f"/features/{blk.index}/Add"
            x = b.node("Add", [block_in, x], name)

    last = fc_w.shape[1]
    if tf:
        x = b.node("GlobalAveragePool", [x], f"{scope}/global_average_pooling2d/Mean")
        shape = b.init("const_fold_opt__reshape_shape", np.array([-1, last], dtype=np.int64))
        x = b.node("Reshape", [x, shape], f"{scope}/global_average_pooling2d/Mean_Squeeze__1")
        w = b.init(f"{scope}/predictions/MatMul/ReadVariableOp:0", fc_w.T.copy())
        x = b.node("MatMul", [x, w], f"{scope}/predictions/MatMul")
        bias = b.init(f"{scope}/predictions/BiasAdd/ReadVariableOp:0", fc_b)
        b.node("Add", [x, bias], f"{scope}/predictions/BiasAdd", outputs=["predictions"])
        return b.model("tf2onnx", inputs, ["predictions"], producer=_TF2ONNX_PRODUCER)
    x = b.node("GlobalAveragePool", [x], "/GlobalAveragePool")
    x = b.node("Flatten", [x], "/Flatten", axis=1)
    w = b.init("classifier.1.weight", fc_w)
    bias = b.init("classifier.1.bias", fc_b)
    b.node("Gemm", [x, w, bias], "/classifier/1/Gemm", outputs=["output"], alpha=1.0, beta=1.0,
           transB=1)
    return b.model("main_graph", inputs, ["output"])


def mobilenet_v2_macs(width: float = 1.0, resolution: int = 224, num_classes: int = 1000) -> int:
    """Multiply-accumulates of torchvision MobileNetV2, from the architecture table alone.

    Conv: ``Cout * Hout * Wout * KH * KW * Cin / group``; FC: ``in * out``; BN, activations,
    residual adds and pooling count 0.  Independent of :func:`mobilenet_v2`'s graph.
    """

    def conv(cin: int, cout: int, k: int, s: int, h: int, group: int = 1) -> tuple[int, int]:
        ho = (h + 2 * (k // 2) - k) // s + 1
        return cout * ho * ho * k * k * cin // group, ho

    total = 0
    c = make_divisible(32 * width)
    m, h = conv(3, c, 3, 2, resolution)
    total += m
    for t, ch, n, s in MOBILENET_V2_SETTINGS:
        cout = make_divisible(ch * width)
        for i in range(n):
            hidden = int(round(c * t))
            if t != 1:
                m, _ = conv(c, hidden, 1, 1, h)
                total += m
            m, h = conv(hidden, hidden, 3, s if i == 0 else 1, h, group=hidden)
            total += m
            m, _ = conv(hidden, cout, 1, 1, h)
            total += m
            c = cout
    last = make_divisible(1280 * max(1.0, width))
    m, _ = conv(c, last, 1, 1, h)
    return total + m + last * num_classes


# --------------------------------------------------------------------------------------------
# Small single-feature models (NCHW, symbolic batch unless stated)
# --------------------------------------------------------------------------------------------


def conv_pad_model(pads: Sequence[int], kernel: IntPair = 3, stride: IntPair = 1,
                   dilation: IntPair = 1, group: int = 1, cin: int = 4, cout: int = 8,
                   hw: tuple[int, int] = (9, 11), seed: int = 0) -> onnx.ModelProto:
    """Single Conv (with bias) carrying ONNX ``pads`` ``[top, left, bottom, right]``.

    Input ``input`` ``['batch', cin, H, W]``, output ``output``.
    """
    if len(pads) != 4:
        raise ValueError("pads must be ONNX [top, left, bottom, right]")
    if cin % group or cout % group:
        raise ValueError("cin and cout must be divisible by group")
    b = _Builder(seed)
    kh, kw = _pair(kernel)
    w = b.init("conv.weight", b.he((cout, cin // group, kh, kw)))
    bias = b.init("conv.bias", b.small(cout))
    b.conv("input", w, bias, "/conv/Conv", (kh, kw), stride, pads, dilation, group,
           output="output")
    return b.model("main_graph", [_input("input", ["batch", cin, *hw])], ["output"])


def _spatial_pads_to_onnx(pads: Sequence[int]) -> list[int]:
    """[t, l, b, r] -> 8-element NCHW Pad pads; 8-element lists pass through."""
    if len(pads) == 4:
        t, left, bot, r = pads
        return [0, 0, t, left, 0, 0, bot, r]
    if len(pads) == 8:
        return [int(p) for p in pads]
    raise ValueError("pads must be [t, l, b, r] or the 8-element ONNX NCHW form")


def pad_then_conv_model(pads: Sequence[int], kernel: int = 3, stride: int = 1, cin: int = 4,
                        cout: int = 8, hw: tuple[int, int] = (9, 11),
                        seed: int = 0) -> onnx.ModelProto:
    """Explicit constant-mode ``Pad`` (pads and value as initializers) then a Conv with pads 0.

    ``pads`` is ``[t, l, b, r]`` (expanded to ``[0, 0, t, l, 0, 0, b, r]``) or already the
    8-element ONNX NCHW form.
    """
    b = _Builder(seed)
    p = b.init("/pad/Constant_output_0", np.array(_spatial_pads_to_onnx(pads), dtype=np.int64))
    v = b.init("/pad/Constant_1_output_0", np.float32(0.0))
    x = b.node("Pad", ["input", p, v], "/pad/Pad", mode="constant")
    w = b.init("conv.weight", b.he((cout, cin, kernel, kernel)))
    bias = b.init("conv.bias", b.small(cout))
    b.conv(x, w, bias, "/conv/Conv", kernel, stride, output="output")
    return b.model("main_graph", [_input("input", ["batch", cin, *hw])], ["output"])


def pad_then_maxpool_model(pads: Sequence[int] = (0, 0, 1, 1), kernel: int = 3, stride: int = 2,
                           cin: int = 3, cout: int = 8, hw: tuple[int, int] = (10, 12),
                           seed: int = 0) -> onnx.ModelProto:
    """Conv -> Relu -> explicit zero ``Pad`` -> ``MaxPool`` (pads 0).

    Because the Pad follows a Relu, padding with 0 equals MaxPool's implicit -inf padding, so an
    importer may fold the Pad into the pool.  ``pads`` as in :func:`pad_then_conv_model`.
    """
    b = _Builder(seed)
    w = b.init("conv.weight", b.he((cout, cin, 3, 3)))
    bias = b.init("conv.bias", b.small(cout))
    x = b.conv("input", w, bias, "/conv/Conv", 3, 1, (1, 1, 1, 1))
    x = b.node("Relu", [x], "/relu/Relu")
    p = b.init("/pad/Constant_output_0", np.array(_spatial_pads_to_onnx(pads), dtype=np.int64))
    v = b.init("/pad/Constant_1_output_0", np.float32(0.0))
    x = b.node("Pad", [x, p, v], "/pad/Pad", mode="constant")
    b.node("MaxPool", [x], "/pool/MaxPool", outputs=["output"], ceil_mode=0,
           kernel_shape=[kernel, kernel], pads=[0, 0, 0, 0], strides=[stride, stride])
    return b.model("main_graph", [_input("input", ["batch", cin, *hw])], ["output"])


def identity_constant_model(seed: int = 0) -> onnx.ModelProto:
    """Weights delivered via ``Constant`` nodes and ``Identity`` nodes on weights and activations.

    input -> Identity -> Conv1(W: Constant -> Identity, B: Constant) -> Relu -> Identity ->
    Conv2(W: initializer -> Identity, B: initializer) -> Identity -> output
    ``['batch', 8, 8, 8]``.
    """
    b = _Builder(seed)
    x = b.node("Identity", ["input"], "/Identity")
    w1 = b.node("Constant", [], "/conv1/Constant",
                value=numpy_helper.from_array(b.he((8, 3, 3, 3)), "w1"))
    w1 = b.node("Identity", [w1], "/conv1/Identity")
    b1 = b.node("Constant", [], "/conv1/Constant_1",
                value=numpy_helper.from_array(b.small(8), "b1"))
    x = b.conv(x, w1, b1, "/conv1/Conv", 3, 1, (1, 1, 1, 1))
    x = b.node("Relu", [x], "/relu/Relu")
    x = b.node("Identity", [x], "/Identity_1")
    w2 = b.init("conv2.weight", b.he((8, 8, 3, 3)))
    w2 = b.node("Identity", [w2], "/conv2/Identity")
    b2 = b.init("conv2.bias", b.small(8))
    x = b.conv(x, w2, b2, "/conv2/Conv", 3, 2, (1, 1, 1, 1))
    b.node("Identity", [x], "/Identity_2", outputs=["output"])
    return b.model("main_graph", [_input("input", ["batch", 3, 16, 16])], ["output"])


def batchnorm_standalone_model(seed: int = 0) -> onnx.ModelProto:
    """Unfolded BN: Conv(+bias) -> BN -> Relu -> MaxPool(2, 2) -> Conv -> BN -> Clip(0, 6).

    The Clip takes min/max as scalar initializer inputs (opset 13 has no Clip attributes).
    Input ``['batch', 3, 16, 16]``, output ``['batch', 16, 8, 8]``.
    """
    b = _Builder(seed)
    w = b.init("conv1.weight", b.he((8, 3, 3, 3)))
    bias = b.init("conv1.bias", b.small(8))
    x = b.conv("input", w, bias, "/conv1/Conv", 3, 1, (1, 1, 1, 1))
    x = b.batchnorm(x, "bn1", b.bn(8), "/bn1/BatchNormalization")
    x = b.node("Relu", [x], "/relu/Relu")
    x = b.node("MaxPool", [x], "/pool/MaxPool", ceil_mode=0, kernel_shape=[2, 2],
               pads=[0, 0, 0, 0], strides=[2, 2])
    w = b.init("conv2.weight", b.he((16, 8, 3, 3)))
    x = b.conv(x, w, None, "/conv2/Conv", 3, 1, (1, 1, 1, 1))
    x = b.batchnorm(x, "bn2", b.bn(16), "/bn2/BatchNormalization")
    lo = b.init("onnx::Clip_min", np.float32(0.0))
    hi = b.init("onnx::Clip_max", np.float32(6.0))
    b.node("Clip", [x, lo, hi], "/act/Clip", outputs=["output"])
    return b.model("main_graph", [_input("input", ["batch", 3, 16, 16])], ["output"])


def grouped_dilated_model(seed: int = 0) -> onnx.ModelProto:
    """Grouped conv (group 2, 8->16), dilated conv (dilation 2, 16->16), depthwise multiplier 2.

    The last conv has ``group = cin = 16`` and ``cout = 32`` (channel multiplier 2) and stride 2.
    Input ``['batch', 8, 16, 16]``, output ``['batch', 32, 8, 8]``.
    """
    b = _Builder(seed)
    w = b.init("conv_g.weight", b.he((16, 4, 3, 3)))
    bias = b.init("conv_g.bias", b.small(16))
    x = b.conv("input", w, bias, "/conv_g/Conv", 3, 1, (1, 1, 1, 1), group=2)
    x = b.node("Relu", [x], "/relu1/Relu")
    w = b.init("conv_d.weight", b.he((16, 16, 3, 3)))
    bias = b.init("conv_d.bias", b.small(16))
    x = b.conv(x, w, bias, "/conv_d/Conv", 3, 1, (2, 2, 2, 2), dilation=2)
    x = b.node("Relu", [x], "/relu2/Relu")
    w = b.init("conv_dw.weight", b.he((32, 1, 3, 3)))
    bias = b.init("conv_dw.bias", b.small(32))
    b.conv(x, w, bias, "/conv_dw/Conv", 3, 2, (1, 1, 1, 1), group=16, output="output")
    return b.model("main_graph", [_input("input", ["batch", 8, 16, 16])], ["output"])


def concat_model(seed: int = 0) -> onnx.ModelProto:
    """Two conv branches -> Concat(axis 1) -> AveragePool -> Flatten -> Gemm -> Softmax.

    Input ``['batch', 3, 16, 12]`` (non-square on purpose).  Branch a: 1x1 conv 3->8 + Relu;
    branch b: 3x3 conv 3->4 + Relu.  AveragePool 3x3 stride 2 pads [1,1,1,1]
    ``count_include_pad=0`` gives ``[N, 12, 8, 6]``; Flatten (576 features, NCHW order, so the
    flatten order matters) -> Gemm(transB=1) -> 10 -> Softmax(axis 1).
    """
    b = _Builder(seed)
    w = b.init("branch_a.weight", b.he((8, 3, 1, 1)))
    bias = b.init("branch_a.bias", b.small(8))
    xa = b.conv("input", w, bias, "/branch_a/Conv", 1)
    xa = b.node("Relu", [xa], "/relu_a/Relu")
    w = b.init("branch_b.weight", b.he((4, 3, 3, 3)))
    bias = b.init("branch_b.bias", b.small(4))
    xb = b.conv("input", w, bias, "/branch_b/Conv", 3, 1, (1, 1, 1, 1))
    xb = b.node("Relu", [xb], "/relu_b/Relu")
    x = b.node("Concat", [xa, xb], "/Concat", axis=1)
    x = b.node("AveragePool", [x], "/pool/AveragePool", ceil_mode=0, count_include_pad=0,
               kernel_shape=[3, 3], pads=[1, 1, 1, 1], strides=[2, 2])
    x = b.node("Flatten", [x], "/Flatten", axis=1)
    w = b.init("fc.weight", b.he((10, 12 * 8 * 6), gain=1.0))
    bias = b.init("fc.bias", b.small(10))
    x = b.node("Gemm", [x, w, bias], "/fc/Gemm", alpha=1.0, beta=1.0, transB=1)
    b.node("Softmax", [x], "/Softmax", outputs=["output"], axis=1)
    return b.model("main_graph", [_input("input", ["batch", 3, 16, 12])], ["output"])


def tf2onnx_style_model(seed: int = 0) -> onnx.ModelProto:
    """tf2onnx-style NHWC front end and classifier.

    ``input_1`` ``['unk__5', 16, 16, 3]`` -> Transpose(0,3,1,2) -> Conv 3x3 stride 2 pads
    [0,0,1,1] (TF SAME) 3->8 -> Relu -> depthwise 3x3 -> Relu -> AveragePool 8x8 (whole map) ->
    Reshape [-1, 8] -> MatMul [8, 10] -> Add -> Softmax -> ``Identity:0`` ``['unk__5', 10]``.
    """
    b = _Builder(seed)
    sc = "StatefulPartitionedCall/model"
    x = b.node("Transpose", ["input_1"], f"{sc}/conv2d/Conv2D__6", perm=[0, 3, 1, 2])
    w = b.init(f"{sc}/conv2d/Conv2D/ReadVariableOp:0", b.he((8, 3, 3, 3)))
    bias = b.init(f"{sc}/conv2d/BiasAdd/ReadVariableOp:0", b.small(8))
    x = b.conv(x, w, bias, f"{sc}/conv2d/BiasAdd", 3, 2, (0, 0, 1, 1))
    x = b.node("Relu", [x], f"{sc}/conv2d/Relu")
    w = b.init(f"{sc}/depthwise_conv2d/depthwise/ReadVariableOp:0", b.he((8, 1, 3, 3)))
    bias = b.init(f"{sc}/depthwise_conv2d/BiasAdd/ReadVariableOp:0", b.small(8))
    x = b.conv(x, w, bias, f"{sc}/depthwise_conv2d/BiasAdd", 3, 1, (1, 1, 1, 1), group=8)
    x = b.node("Relu", [x], f"{sc}/depthwise_conv2d/Relu")
    x = b.node("AveragePool", [x], f"{sc}/average_pooling2d/AvgPool", kernel_shape=[8, 8],
               strides=[8, 8])
    shape = b.init("const_fold_opt__20", np.array([-1, 8], dtype=np.int64))
    x = b.node("Reshape", [x, shape], f"{sc}/flatten/Reshape")
    w = b.init(f"{sc}/dense/MatMul/ReadVariableOp:0", b.he((8, 10), gain=1.0).reshape(8, 10))
    x = b.node("MatMul", [x, w], f"{sc}/dense/MatMul")
    bias = b.init(f"{sc}/dense/BiasAdd/ReadVariableOp:0", b.small(10))
    x = b.node("Add", [x, bias], f"{sc}/dense/BiasAdd")
    b.node("Softmax", [x], f"{sc}/dense/Softmax", outputs=["Identity:0"], axis=-1)
    return b.model("tf2onnx", [_input("input_1", ["unk__5", 16, 16, 3])], ["Identity:0"],
                   producer=_TF2ONNX_PRODUCER)


def kws_style_model(channels: int = 64, num_blocks: int = 2, num_classes: int = 12,
                    seed: int = 0) -> onnx.ModelProto:
    """DS-CNN keyword-spotting style model (MLPerf Tiny KWS shape), tf2onnx flavour.

    ``input_1`` ``['unk__1', 49, 10, 1]`` -> Reshape ``[-1, 1, 49, 10]`` (valid NHWC->NCHW
    because C = 1, as tf2onnx emits it) -> Conv 10x4 stride 2 pads [4,1,5,1] -> Relu
    (``[N, C, 25, 5]``) -> ``num_blocks`` x (depthwise 3x3 -> Relu -> pointwise 1x1 -> Relu) ->
    AveragePool 25x5 -> Reshape ``[-1, C]`` -> MatMul -> Add -> Softmax -> ``Identity:0``.
    """
    b = _Builder(seed)
    sc = "StatefulPartitionedCall/model"
    shape = b.init("const_fold_opt__31", np.array([-1, 1, 49, 10], dtype=np.int64))
    x = b.node("Reshape", ["input_1", shape], f"{sc}/conv2d/Conv2D__5")
    w = b.init(f"{sc}/conv2d/Conv2D_weights_fused_bn", b.he((channels, 1, 10, 4)))
    bias = b.init(f"{sc}/conv2d/Conv2D_bias_fused_bn", b.small(channels))
    x = b.conv(x, w, bias, f"{sc}/conv2d/Conv2D", (10, 4), 2, (4, 1, 5, 1))
    x = b.node("Relu", [x], f"{sc}/activation/Relu")
    for i in range(1, num_blocks + 1):
        dw, pw = f"{sc}/depthwise_conv2d_{i}", f"{sc}/conv2d_{i}"
        w = b.init(f"{dw}/depthwise_weights_fused_bn", b.he((channels, 1, 3, 3)))
        bias = b.init(f"{dw}/depthwise_bias_fused_bn", b.small(channels))
        x = b.conv(x, w, bias, f"{dw}/depthwise", 3, 1, (1, 1, 1, 1), group=channels)
        x = b.node("Relu", [x], f"{sc}/activation_{2 * i - 1}/Relu")
        w = b.init(f"{pw}/Conv2D_weights_fused_bn", b.he((channels, channels, 1, 1)))
        bias = b.init(f"{pw}/Conv2D_bias_fused_bn", b.small(channels))
        x = b.conv(x, w, bias, f"{pw}/Conv2D", 1)
        x = b.node("Relu", [x], f"{sc}/activation_{2 * i}/Relu")
    x = b.node("AveragePool", [x], f"{sc}/average_pooling2d/AvgPool", kernel_shape=[25, 5],
               strides=[25, 5])
    shape = b.init("const_fold_opt__32", np.array([-1, channels], dtype=np.int64))
    x = b.node("Reshape", [x, shape], f"{sc}/flatten/Reshape")
    w = b.init(f"{sc}/dense/MatMul/ReadVariableOp:0",
               b.he((num_classes, channels), gain=1.0).T.copy())
    x = b.node("MatMul", [x, w], f"{sc}/dense/MatMul")
    bias = b.init(f"{sc}/dense/BiasAdd/ReadVariableOp:0", b.small(num_classes))
    x = b.node("Add", [x, bias], f"{sc}/dense/BiasAdd")
    b.node("Softmax", [x], f"{sc}/dense/Softmax", outputs=["Identity:0"], axis=-1)
    return b.model("tf2onnx", [_input("input_1", ["unk__1", 49, 10, 1])], ["Identity:0"],
                   producer=_TF2ONNX_PRODUCER)


def two_head_model(seed: int = 0) -> onnx.ModelProto:
    """A conv trunk with two heads of different shapes (issue 14 item 1: every output).

    ``input`` ``['batch', 3, 16, 16]`` -> Conv 3x3 stride 2 3->8 + Relu -> Conv 3x3 8->16 + Relu
    (trunk ``[N, 16, 8, 8]``). Head ``scores``: AveragePool 8x8 -> Flatten -> Gemm 16->10 ->
    Softmax, ``['batch', 10]``. Head ``boxes``: Conv 1x1 16->4, ``['batch', 4, 8, 8]`` (a
    detector's per-cell regression map). Outputs in that order: scores, boxes.
    """
    b = _Builder(seed)
    w = b.init("stem.weight", b.he((8, 3, 3, 3)))
    bias = b.init("stem.bias", b.small(8))
    x = b.conv("input", w, bias, "/stem/Conv", 3, 2, (1, 1, 1, 1))
    x = b.node("Relu", [x], "/stem/Relu")
    w = b.init("trunk.weight", b.he((16, 8, 3, 3)))
    bias = b.init("trunk.bias", b.small(16))
    x = b.conv(x, w, bias, "/trunk/Conv", 3, 1, (1, 1, 1, 1))
    trunk = b.node("Relu", [x], "/trunk/Relu")
    x = b.node("AveragePool", [trunk], "/cls/AveragePool", kernel_shape=[8, 8], strides=[8, 8])
    x = b.node("Flatten", [x], "/cls/Flatten", axis=1)
    w = b.init("cls.weight", b.he((10, 16), gain=1.0))
    bias = b.init("cls.bias", b.small(10))
    x = b.node("Gemm", [x, w, bias], "/cls/Gemm", alpha=1.0, beta=1.0, transB=1)
    b.node("Softmax", [x], "/cls/Softmax", outputs=["scores"], axis=1)
    w = b.init("box.weight", b.he((4, 16, 1, 1), gain=1.0))
    bias = b.init("box.bias", b.small(4))
    b.conv(trunk, w, bias, "/box/Conv", 1, output="boxes")
    return b.model("two_heads", [_input("input", ["batch", 3, 16, 16])], ["scores", "boxes"])


def output_then_consumer_model(last: str = "depthwise", seed: int = 0) -> onnx.ModelProto:
    """A graph output that a later node still reads, where the memory planner could otherwise
    overwrite it: ``input`` ``['batch', 3, 12, 12]`` -> Conv 3x3 3->8 + Relu -> ``feature``
    (output 0), then, as the last node, output 1: ``last="depthwise"``: a depthwise 3x3 conv
    of ``feature`` (``refined``; in place over its input if that died there), or
    ``last="residual"``: Conv 1x1 8->8 of ``feature``, Conv 3x3 8->8, + ``feature``
    (``refined``; a residual add fused into the second conv writes over its skip input)."""
    b = _Builder(seed)
    w = b.init("stem.weight", b.he((8, 3, 3, 3)))
    bias = b.init("stem.bias", b.small(8))
    x = b.conv("input", w, bias, "/stem/Conv", 3, 1, (1, 1, 1, 1))
    b.node("Relu", [x], "/stem/Relu", outputs=["feature"])
    if last == "depthwise":
        w = b.init("dw.weight", b.he((8, 1, 3, 3)))
        bias = b.init("dw.bias", b.small(8))
        b.conv("feature", w, bias, "/dw/Conv", 3, 1, (1, 1, 1, 1), group=8, output="refined")
    else:
        w = b.init("mid.weight", b.he((8, 8, 1, 1)))
        bias = b.init("mid.bias", b.small(8))
        y = b.conv("feature", w, bias, "/mid/Conv", 1)
        w = b.init("res.weight", b.he((8, 8, 3, 3), gain=0.5))
        bias = b.init("res.bias", b.small(8))
        y = b.conv(y, w, bias, "/res/Conv", 3, 1, (1, 1, 1, 1))
        b.node("Add", ["feature", y], "/res/Add", outputs=["refined"])
    return b.model("output_reuse", [_input("input", ["batch", 3, 12, 12])],
                   ["feature", "refined"])


def two_input_model(seed: int = 0) -> onnx.ModelProto:
    """Two graph inputs ``a`` and ``b`` ``['batch', 4, 8, 8]``, each through a 1x1 Conv, then
    Add -> ``output``: a valid multi-input model (mpq takes one input and must say so)."""
    b = _Builder(seed)
    outs = []
    for name in ("a", "b"):
        w = b.init(f"{name}.weight", b.he((4, 4, 1, 1)))
        bias = b.init(f"{name}.bias", b.small(4))
        outs.append(b.conv(name, w, bias, f"/{name}/Conv", 1))
    b.node("Add", outs, "/Add", outputs=["output"])
    return b.model("two_inputs", [_input("a", ["batch", 4, 8, 8]),
                                  _input("b", ["batch", 4, 8, 8])], ["output"])


# --------------------------------------------------------------------------------------------
# Bad inputs (the importer must reject these with a clear error)
# --------------------------------------------------------------------------------------------


def unsupported_op_model(seed: int = 0) -> onnx.ModelProto:
    """Conv -> Flatten -> ``TopK`` (node ``/bad/TopK``, k = 5); outputs ``values``, ``indices``.

    Valid ONNX that runs in onnxruntime; TopK is not a supported operator.
    """
    b = _Builder(seed)
    w = b.init("conv.weight", b.he((4, 3, 3, 3)))
    bias = b.init("conv.bias", b.small(4))
    x = b.conv("input", w, bias, "/conv/Conv", 3, 1, (1, 1, 1, 1))
    x = b.node("Flatten", [x], "/Flatten", axis=1)
    k = b.init("/bad/Constant_output_0", np.array([5], dtype=np.int64))
    b.node("TopK", [x, k], "/bad/TopK", outputs=["values", "indices"], axis=-1, largest=1,
           sorted=1)
    outputs = [
        helper.make_tensor_value_info("values", TensorProto.FLOAT, ["batch", 5]),
        helper.make_tensor_value_info("indices", TensorProto.INT64, ["batch", 5]),
    ]
    return b.model("main_graph", [_input("input", ["batch", 3, 8, 8])], outputs)


def dynamic_spatial_model(seed: int = 0) -> onnx.ModelProto:
    """Input ``['batch', 3, 'height', 'width']`` -> Conv -> Relu -> GlobalAveragePool -> Flatten.

    Valid and runnable at any spatial size, but memory cannot be planned without fixed H, W.
    """
    b = _Builder(seed)
    w = b.init("conv.weight", b.he((8, 3, 3, 3)))
    bias = b.init("conv.bias", b.small(8))
    x = b.conv("input", w, bias, "/conv/Conv", 3, 1, (1, 1, 1, 1))
    x = b.node("Relu", [x], "/relu/Relu")
    x = b.node("GlobalAveragePool", [x], "/GlobalAveragePool")
    b.node("Flatten", [x], "/Flatten", outputs=["output"], axis=1)
    return b.model("main_graph", [_input("input", ["batch", 3, "height", "width"])], ["output"])


def float16_weights_model(seed: int = 0) -> onnx.ModelProto:
    """A Conv whose weight (and bias) initializers are FLOAT16.

    float32 ``input`` -> Cast(FLOAT16) -> Conv(fp16 W, fp16 B) -> Relu -> Cast(FLOAT) ->
    ``output`` -- the shape an fp16-converted model with float32 I/O has.  Runs in onnxruntime.
    """
    b = _Builder(seed)
    x = b.node("Cast", ["input"], "/Cast", to=TensorProto.FLOAT16)
    w = b.init("conv.weight", b.he((8, 3, 3, 3)).astype(np.float16))
    bias = b.init("conv.bias", b.small(8).astype(np.float16))
    x = b.conv(x, w, bias, "/conv/Conv", 3, 1, (1, 1, 1, 1))
    x = b.node("Relu", [x], "/relu/Relu")
    b.node("Cast", [x], "/Cast_1", outputs=["output"], to=TensorProto.FLOAT)
    return b.model("main_graph", [_input("input", ["batch", 3, 8, 8])], ["output"])


def missing_initializer_model(seed: int = 0) -> onnx.ModelProto:
    """A Conv whose weight ``conv.weight`` is not an initializer, node output or graph input.

    Built with ``check_model`` skipped (the checker would reject the dangling name) and with the
    output shape ``['batch', 8, 8, 8]`` declared by hand.  onnxruntime refuses to load it.
    """
    b = _Builder(seed)
    bias = b.init("conv.bias", b.small(8))
    x = b.conv("input", "conv.weight", bias, "/conv/Conv", 3, 1, (1, 1, 1, 1))
    b.node("Relu", [x], "/relu/Relu", outputs=["output"])
    out = helper.make_tensor_value_info("output", TensorProto.FLOAT, ["batch", 8, 8, 8])
    return b.model("main_graph", [_input("input", ["batch", 3, 8, 8])], [out], check=False)


# --------------------------------------------------------------------------------------------
# Self-check
# --------------------------------------------------------------------------------------------


def _graph_macs(model: onnx.ModelProto) -> int:
    """Conv/Gemm/MatMul MACs of a model from its inferred shapes (self-check helper)."""
    inferred = onnx.shape_inference.infer_shapes(model)
    shapes = {
        vi.name: [d.dim_value for d in vi.type.tensor_type.shape.dim]
        for vi in [*inferred.graph.value_info, *inferred.graph.output]
    }
    inits = {t.name: list(t.dims) for t in model.graph.initializer}
    total = 0
    for n in model.graph.node:
        if n.op_type == "Conv":
            total += math.prod(shapes[n.output[0]][1:]) * math.prod(inits[n.input[1]][1:])
        elif n.op_type in ("Gemm", "MatMul"):
            total += math.prod(inits[n.input[1]])
    return total


def _run(model: onnx.ModelProto, batch: int = 2, seed: int = 1) -> list[np.ndarray]:
    """Run ``model`` in onnxruntime on random input with the symbolic batch set to ``batch``."""
    import onnxruntime as ort

    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(seed)
    feeds = {}
    for inp in sess.get_inputs():
        shape = [d if isinstance(d, int) else batch for d in inp.shape]
        feeds[inp.name] = rng.standard_normal(shape).astype(np.float32)
    return sess.run(None, feeds)


def _main() -> None:
    """Build every model, run it in onnxruntime and print shapes and MACs."""
    import onnxruntime as ort

    cases: dict[str, onnx.ModelProto] = {
        "mobilenet_v2 1.0@224": mobilenet_v2(),
        "mobilenet_v2 1.0@224 fold_bn": mobilenet_v2(fold_bn=True),
        "mobilenet_v2 1.0@224 nhwc": mobilenet_v2(layout="nhwc"),
        "mobilenet_v2 0.35@144": mobilenet_v2(0.35, 144),
        "mobilenet_v2 1.4@96 nhwc same": mobilenet_v2(1.4, 96, 10, layout="nhwc",
                                                      same_pads=True),
        "conv_pad_model [0,1,2,0] k3 s2": conv_pad_model([0, 1, 2, 0], stride=2),
        "conv_pad_model [1,0,0,1] d2 g2": conv_pad_model([1, 0, 0, 1], dilation=2, group=2),
        "pad_then_conv_model [1,2,0,1]": pad_then_conv_model([1, 2, 0, 1]),
        "pad_then_maxpool_model": pad_then_maxpool_model(),
        "identity_constant_model": identity_constant_model(),
        "batchnorm_standalone_model": batchnorm_standalone_model(),
        "grouped_dilated_model": grouped_dilated_model(),
        "concat_model": concat_model(),
        "tf2onnx_style_model": tf2onnx_style_model(),
        "kws_style_model": kws_style_model(),
        "unsupported_op_model": unsupported_op_model(),
        "dynamic_spatial_model": dynamic_spatial_model(),
        "float16_weights_model": float16_weights_model(),
    }
    results: dict[str, list[np.ndarray]] = {}
    for name, model in cases.items():
        outs = _run(model)
        results[name] = outs
        y = outs[0]
        assert np.isfinite(y).all() and np.abs(y).max() > 0, name
        in_dims = model.graph.input[0].type.tensor_type.shape.dim
        in_shape = [d.dim_param or d.dim_value for d in in_dims]
        print(f"{name:34s} in {in_shape} -> {[o.shape for o in outs]}"
              f"  |y|max={np.abs(y).max():.3g} std={y.std():.3g}")

    # fold_bn and layout change the export, not the function
    ref = results["mobilenet_v2 1.0@224"][0]
    assert np.allclose(results["mobilenet_v2 1.0@224 fold_bn"][0], ref, rtol=1e-3, atol=1e-3)
    nchw_in = np.random.default_rng(1).standard_normal((2, 224, 224, 3)).astype(np.float32)
    sess_t = ort.InferenceSession(cases["mobilenet_v2 1.0@224"].SerializeToString(),
                                  providers=["CPUExecutionProvider"])
    sess_h = ort.InferenceSession(cases["mobilenet_v2 1.0@224 nhwc"].SerializeToString(),
                                  providers=["CPUExecutionProvider"])
    y_t = sess_t.run(None, {"input": nchw_in.transpose(0, 3, 1, 2).copy()})[0]
    y_h = sess_h.run(None, {"input_1": nchw_in})[0]
    assert np.allclose(y_t, y_h, rtol=1e-3, atol=1e-3), np.abs(y_t - y_h).max()
    print("fold_bn / nhwc variants match the reference MobileNetV2 numerically")

    for width, res, ncls in [(1.0, 224, 1000), (0.35, 144, 1000), (0.5, 160, 1000),
                             (0.75, 96, 10), (1.4, 224, 1000)]:
        macs = mobilenet_v2_macs(width, res, ncls)
        for layout in ("nchw", "nhwc"):
            got = _graph_macs(mobilenet_v2(width, res, ncls, layout=layout))
            assert got == macs, (width, res, layout, got, macs)
        print(f"mobilenet_v2_macs({width}, {res}, {ncls}) = {macs:,} ({macs / 1e6:.3f} M)")
    macs = mobilenet_v2_macs()
    assert abs(macs / 300.8e6 - 1) < 0.005, macs

    bad = missing_initializer_model()
    try:
        ort.InferenceSession(bad.SerializeToString(), providers=["CPUExecutionProvider"])
    except Exception as exc:  # noqa: BLE001 - any load failure is the expected outcome
        print(f"missing_initializer_model rejected by onnxruntime: {type(exc).__name__}")
    else:
        raise AssertionError("missing_initializer_model unexpectedly loaded")
    try:
        onnx.checker.check_model(bad, full_check=True)
    except onnx.checker.ValidationError as exc:
        print(f"missing_initializer_model rejected by onnx.checker: {str(exc).splitlines()[0]}")
    else:
        raise AssertionError("missing_initializer_model unexpectedly passed check_model")
    print("all ok")


if __name__ == "__main__":
    _main()
