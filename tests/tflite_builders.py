"""Tiny int8 `.tflite` models built in memory, one operator each (for the TFLM oracle tests).

Every builder returns the bytes of a complete, valid TFLite flatbuffer (schema version 3,
file identifier `TFL3`) written with the object API of the schema module that ships in
`tflite-micro` (`mpq.frontend.tflite_import.schema()`). The model has one subgraph with one
operator whose activation input(s) are the graph input(s) and whose output is the graph output.
Activations are int8 with per-tensor (scale, zero point); weights are symmetric int8
(per output channel for CONV_2D and DEPTHWISE_CONV_2D, per tensor for FULLY_CONNECTED); biases
are int32 quantised at s_in·s_w[c] (TFLM checks that for FULLY_CONNECTED). Buffer 0 is the
empty sentinel buffer the format requires; every tensor then gets its own buffer.

Output shapes follow TFLite's own rules (`tensorflow/lite/kernels/padding.h`): SAME gives
ceil(in / stride), VALID gives ceil((in − (k − 1)·dilation) / stride).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import flatbuffers
import numpy as np

from mpq.frontend.tflite_import import schema

FB = schema()
OP = FB.BuiltinOperator
OPT = FB.BuiltinOptions
T_INT8 = FB.TensorType.INT8
T_INT32 = FB.TensorType.INT32

PADDINGS = {"SAME": FB.Padding.SAME, "VALID": FB.Padding.VALID}
ACTIVATIONS = {"NONE": FB.ActivationFunctionType.NONE, "RELU": FB.ActivationFunctionType.RELU,
               "RELU6": FB.ActivationFunctionType.RELU6}


@dataclass(frozen=True)
class QParams:
    """Per-tensor int8 quantisation: real = scale·(q − zero_point); scale kept as float32."""

    scale: float
    zero_point: int

    def __post_init__(self) -> None:
        object.__setattr__(self, "scale", float(np.float32(self.scale)))
        object.__setattr__(self, "zero_point", int(self.zero_point))


SOFTMAX_OUT = QParams(1.0 / 256.0, -128)  # the output quantisation TFLM requires for int8


# -- geometry ------------------------------------------------------------------------------------

def out_size(padding: str, size: int, kernel: int, stride: int, dilation: int = 1) -> int:
    """TFLite's output size along one spatial axis (0 or less: no valid output)."""
    if padding == "SAME":
        return -(-size // stride)
    if padding == "VALID":
        effective = (kernel - 1) * dilation + 1
        return (size - effective + stride) // stride
    raise ValueError(f"unknown padding {padding!r}")


def out_hw(padding: str, hw: tuple[int, int], kernel: tuple[int, int], stride: tuple[int, int],
           dilation: tuple[int, int] = (1, 1)) -> tuple[int, int]:
    """(height, width) of a conv / pool output."""
    return (out_size(padding, hw[0], kernel[0], stride[0], dilation[0]),
            out_size(padding, hw[1], kernel[1], stride[1], dilation[1]))


# -- the generic writer --------------------------------------------------------------------------

class TfliteWriter:
    """Collects tensors, buffers and operators of subgraph 0 and packs them into bytes."""

    def __init__(self) -> None:
        self.tensors: list[Any] = []
        self.buffers: list[Any] = [FB.BufferT()]  # buffer 0: the empty sentinel
        self.operators: list[Any] = []
        self.codes: list[int] = []

    def tensor(self, name: str, shape: tuple[int, ...], dtype: int = T_INT8,
               scale: list[float] | None = None, zero_point: list[int] | None = None,
               axis: int = 0, data: np.ndarray | None = None) -> int:
        """Add a tensor (constant when `data` is given); returns its index."""
        t = FB.TensorT()
        t.name = name.encode()
        t.shape = [int(d) for d in shape]
        t.type = dtype
        buf = FB.BufferT()
        if data is not None:
            raw = np.ascontiguousarray(data).tobytes()
            buf.data = np.frombuffer(raw, np.uint8).copy()
        self.buffers.append(buf)
        t.buffer = len(self.buffers) - 1
        if scale is not None:
            q = FB.QuantizationParametersT()
            q.scale = [float(np.float32(s)) for s in scale]
            q.zeroPoint = [int(z) for z in (zero_point if zero_point is not None
                                              else [0] * len(scale))]
            q.quantizedDimension = axis
            t.quantization = q
        self.tensors.append(t)
        return len(self.tensors) - 1

    def activation(self, name: str, shape: tuple[int, ...], q: QParams) -> int:
        """An int8 activation tensor with per-tensor quantisation."""
        return self.tensor(name, shape, T_INT8, [q.scale], [q.zero_point])

    def weights(self, name: str, data: np.ndarray, scales: np.ndarray, axis: int) -> int:
        """Constant symmetric int8 weights, one scale (per tensor) or one per `axis` slice."""
        scales = np.atleast_1d(np.asarray(scales, np.float32))
        return self.tensor(name, data.shape, T_INT8, scales.tolist(), [0] * scales.size,
                           axis, np.asarray(data, np.int8))

    def bias(self, name: str, data: np.ndarray, scales: np.ndarray) -> int:
        """Constant int32 bias with its (per-channel) scale s_in·s_w[c] and zero point 0."""
        scales = np.atleast_1d(np.asarray(scales, np.float64))
        return self.tensor(name, data.shape, T_INT32, scales.tolist(), [0] * scales.size, 0,
                           np.asarray(data, np.int32))

    def op(self, code: int, inputs: list[int], outputs: list[int], options_type: int = 0,
           options: Any = None) -> None:
        if code not in self.codes:
            self.codes.append(code)
        o = FB.OperatorT()
        o.opcodeIndex = self.codes.index(code)
        o.inputs, o.outputs = list(inputs), list(outputs)
        o.builtinOptionsType, o.builtinOptions = options_type, options
        self.operators.append(o)

    def finish(self, inputs: list[int], outputs: list[int]) -> bytes:
        sg = FB.SubGraphT()
        sg.tensors, sg.operators = self.tensors, self.operators
        sg.inputs, sg.outputs = list(inputs), list(outputs)
        sg.name = b"main"
        model = FB.ModelT()
        model.version = 3
        model.description = b"mpq single-op test model"
        model.subgraphs = [sg]
        model.buffers = self.buffers
        model.operatorCodes = []
        for code in self.codes:
            oc = FB.OperatorCodeT()
            oc.builtinCode, oc.deprecatedBuiltinCode, oc.version = code, min(code, 127), 1
            model.operatorCodes.append(oc)
        builder = flatbuffers.Builder(1024)
        builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
        return bytes(builder.Output())


# -- one builder per operator --------------------------------------------------------------------

def _check_choice(value: str, table: dict[str, int], what: str) -> int:
    if value not in table:
        raise ValueError(f"unknown {what} {value!r}; one of {sorted(table)}")
    return table[value]


def conv_2d(x_shape: tuple[int, int, int, int], x_q: QParams, weight: np.ndarray,
            weight_scale: np.ndarray, bias: np.ndarray | None, y_q: QParams, *,
            padding: str = "VALID", stride: tuple[int, int] = (1, 1),
            dilation: tuple[int, int] = (1, 1), activation: str = "NONE") -> bytes:
    """CONV_2D: `weight` int8 OHWI `[Cout, KH, KW, Cin/groups]` (grouped when its last axis is
    smaller than the input's channels) with per-channel `weight_scale` `[Cout]` (quantised
    dimension 0); `bias` int32 `[Cout]` or None (no bias input)."""
    cout, kh, kw, _ = weight.shape
    ho, wo = out_hw(padding, x_shape[1:3], (kh, kw), stride, dilation)
    w = TfliteWriter()
    x = w.activation("x", x_shape, x_q)
    ws = np.broadcast_to(np.asarray(weight_scale, np.float32), (cout,))
    f = w.weights("filter", weight, ws, axis=0)
    b = -1 if bias is None else w.bias("bias", bias, x_q.scale * ws.astype(np.float64))
    y = w.activation("y", (1, ho, wo, cout), y_q)
    o = FB.Conv2DOptionsT()
    o.padding = _check_choice(padding, PADDINGS, "padding")
    o.strideH, o.strideW = stride
    o.dilationHFactor, o.dilationWFactor = dilation
    o.fusedActivationFunction = _check_choice(activation, ACTIVATIONS, "activation")
    w.op(OP.CONV_2D, [x, f, b], [y], OPT.Conv2DOptions, o)
    return w.finish([x], [y])


def depthwise_conv_2d(x_shape: tuple[int, int, int, int], x_q: QParams, weight: np.ndarray,
                      weight_scale: np.ndarray, bias: np.ndarray | None, y_q: QParams, *,
                      padding: str = "VALID", stride: tuple[int, int] = (1, 1),
                      dilation: tuple[int, int] = (1, 1), activation: str = "NONE") -> bytes:
    """DEPTHWISE_CONV_2D: `weight` int8 `[1, KH, KW, Cout]`, Cout = Cin·depth_multiplier,
    per-channel `weight_scale` `[Cout]` (quantised dimension 3); `bias` int32 `[Cout]`/None.

    Without a bias the operator gets two inputs rather than an optional input −1: TFLM's
    `CalculateOpDataDepthwiseConv` (depthwise_conv_common.cc) calls
    `DeallocateTempTfLiteTensor(bias)` on the null tensor of an omitted optional input and
    crashes (segmentation fault) while CONV_2D and FULLY_CONNECTED check for null first.
    """
    _, kh, kw, cout = weight.shape
    cin = x_shape[3]
    if weight.shape[0] != 1 or cout % cin:
        raise ValueError(f"depthwise filter {weight.shape} does not fit {cin} input channels")
    ho, wo = out_hw(padding, x_shape[1:3], (kh, kw), stride, dilation)
    w = TfliteWriter()
    x = w.activation("x", x_shape, x_q)
    ws = np.broadcast_to(np.asarray(weight_scale, np.float32), (cout,))
    f = w.weights("filter", weight, ws, axis=3)
    ins = [x, f]
    if bias is not None:
        ins.append(w.bias("bias", bias, x_q.scale * ws.astype(np.float64)))
    y = w.activation("y", (1, ho, wo, cout), y_q)
    o = FB.DepthwiseConv2DOptionsT()
    o.padding = _check_choice(padding, PADDINGS, "padding")
    o.strideH, o.strideW = stride
    o.dilationHFactor, o.dilationWFactor = dilation
    o.depthMultiplier = cout // cin
    o.fusedActivationFunction = _check_choice(activation, ACTIVATIONS, "activation")
    w.op(OP.DEPTHWISE_CONV_2D, ins, [y], OPT.DepthwiseConv2DOptions, o)
    return w.finish([x], [y])


def fully_connected(x_shape: tuple[int, ...], x_q: QParams, weight: np.ndarray,
                    weight_scale: float, bias: np.ndarray | None, y_q: QParams, *,
                    activation: str = "NONE") -> bytes:
    """FULLY_CONNECTED: `weight` int8 `[Cout, K]` with one per-tensor scale; the input holds
    K values (`[1, K]`, or e.g. `[1, H, W, C]` which TFLM flattens); output `[1, Cout]`."""
    cout, k = weight.shape
    if int(np.prod(x_shape)) != k:
        raise ValueError(f"input {x_shape} does not hold K={k} values")
    w = TfliteWriter()
    x = w.activation("x", x_shape, x_q)
    f = w.weights("weights", weight, np.float32(weight_scale), axis=0)
    s_b = float(np.float32(x_q.scale)) * float(np.float32(weight_scale))
    b = -1 if bias is None else w.bias("bias", bias, np.float64(s_b))
    y = w.activation("y", (1, cout), y_q)
    o = FB.FullyConnectedOptionsT()
    o.fusedActivationFunction = _check_choice(activation, ACTIVATIONS, "activation")
    o.keepNumDims = False
    w.op(OP.FULLY_CONNECTED, [x, f, b], [y], OPT.FullyConnectedOptions, o)
    return w.finish([x], [y])


def add(shape: tuple[int, ...], a_q: QParams, b_q: QParams, y_q: QParams, *,
        activation: str = "NONE") -> bytes:
    """ADD of two int8 graph inputs of the same shape (no broadcasting)."""
    w = TfliteWriter()
    a = w.activation("a", shape, a_q)
    b = w.activation("b", shape, b_q)
    y = w.activation("y", shape, y_q)
    o = FB.AddOptionsT()
    o.fusedActivationFunction = _check_choice(activation, ACTIVATIONS, "activation")
    w.op(OP.ADD, [a, b], [y], OPT.AddOptions, o)
    return w.finish([a, b], [y])


def _pool(code: int, x_shape: tuple[int, int, int, int], q: QParams, kernel: tuple[int, int],
          stride: tuple[int, int], padding: str, activation: str) -> bytes:
    ho, wo = out_hw(padding, x_shape[1:3], kernel, stride)
    w = TfliteWriter()
    x = w.activation("x", x_shape, q)
    y = w.activation("y", (1, ho, wo, x_shape[3]), q)
    o = FB.Pool2DOptionsT()
    o.padding = _check_choice(padding, PADDINGS, "padding")
    o.filterHeight, o.filterWidth = kernel
    o.strideH, o.strideW = stride
    o.fusedActivationFunction = _check_choice(activation, ACTIVATIONS, "activation")
    w.op(code, [x], [y], OPT.Pool2DOptions, o)
    return w.finish([x], [y])


def average_pool_2d(x_shape: tuple[int, int, int, int], q: QParams, *,
                    kernel: tuple[int, int], stride: tuple[int, int] = (1, 1),
                    padding: str = "VALID", activation: str = "NONE") -> bytes:
    """AVERAGE_POOL_2D; input and output share the quantisation `q` (as TFLite requires)."""
    return _pool(OP.AVERAGE_POOL_2D, x_shape, q, kernel, stride, padding, activation)


def max_pool_2d(x_shape: tuple[int, int, int, int], q: QParams, *, kernel: tuple[int, int],
                stride: tuple[int, int] = (1, 1), padding: str = "VALID",
                activation: str = "NONE") -> bytes:
    """MAX_POOL_2D; input and output share the quantisation `q` (as TFLite requires)."""
    return _pool(OP.MAX_POOL_2D, x_shape, q, kernel, stride, padding, activation)


def softmax(shape: tuple[int, ...], x_q: QParams, beta: float = 1.0) -> bytes:
    """SOFTMAX over the last axis; output quantised at 1/256, zero point −128."""
    w = TfliteWriter()
    x = w.activation("x", shape, x_q)
    y = w.activation("y", shape, SOFTMAX_OUT)
    o = FB.SoftmaxOptionsT()
    o.beta = float(beta)
    w.op(OP.SOFTMAX, [x], [y], OPT.SoftmaxOptions, o)
    return w.finish([x], [y])


def reshape(x_shape: tuple[int, ...], new_shape: tuple[int, ...], q: QParams) -> bytes:
    """RESHAPE with the new shape both as a constant int32 input and in the options."""
    if int(np.prod(x_shape)) != int(np.prod(new_shape)):
        raise ValueError(f"cannot reshape {x_shape} to {new_shape}")
    w = TfliteWriter()
    x = w.activation("x", x_shape, q)
    s = w.tensor("shape", (len(new_shape),), T_INT32, data=np.asarray(new_shape, np.int32))
    y = w.activation("y", new_shape, q)
    o = FB.ReshapeOptionsT()
    o.newShape = [int(d) for d in new_shape]
    w.op(OP.RESHAPE, [x, s], [y], OPT.ReshapeOptions, o)
    return w.finish([x], [y])


def mean(x_shape: tuple[int, ...], axes: tuple[int, ...], x_q: QParams, y_q: QParams, *,
         keep_dims: bool = True) -> bytes:
    """MEAN over `axes` (a constant int32 input), keep_dims as given."""
    reduced = {a % len(x_shape) for a in axes}
    y_shape = tuple(1 if i in reduced else d for i, d in enumerate(x_shape)) if keep_dims \
        else tuple(d for i, d in enumerate(x_shape) if i not in reduced)
    w = TfliteWriter()
    x = w.activation("x", x_shape, x_q)
    a = w.tensor("axes", (len(axes),), T_INT32, data=np.asarray(axes, np.int32))
    y = w.activation("y", y_shape, y_q)
    o = FB.ReducerOptionsT()
    o.keepDims = bool(keep_dims)
    w.op(OP.MEAN, [x, a], [y], OPT.ReducerOptions, o)
    return w.finish([x], [y])


def resize_nearest_neighbor(x_shape: tuple[int, int, int, int], size: tuple[int, int],
                            q: QParams, *, align_corners: bool = False,
                            half_pixel_centers: bool = False) -> bytes:
    """RESIZE_NEAREST_NEIGHBOR to a constant (height, width); output quantised like the input."""
    w = TfliteWriter()
    x = w.activation("x", x_shape, q)
    s = w.tensor("size", (2,), T_INT32, data=np.asarray(size, np.int32))
    y = w.activation("y", (1, size[0], size[1], x_shape[3]), q)
    o = FB.ResizeNearestNeighborOptionsT()
    o.alignCorners, o.halfPixelCenters = bool(align_corners), bool(half_pixel_centers)
    w.op(OP.RESIZE_NEAREST_NEIGHBOR, [x, s], [y], OPT.ResizeNearestNeighborOptions, o)
    return w.finish([x], [y])


def resize_bilinear(x_shape: tuple[int, int, int, int], size: tuple[int, int], q: QParams, *,
                    align_corners: bool = False, half_pixel_centers: bool = False) -> bytes:
    """RESIZE_BILINEAR to a constant (height, width); output quantised like the input."""
    w = TfliteWriter()
    x = w.activation("x", x_shape, q)
    s = w.tensor("size", (2,), T_INT32, data=np.asarray(size, np.int32))
    y = w.activation("y", (1, size[0], size[1], x_shape[3]), q)
    o = FB.ResizeBilinearOptionsT()
    o.alignCorners, o.halfPixelCenters = bool(align_corners), bool(half_pixel_centers)
    w.op(OP.RESIZE_BILINEAR, [x, s], [y], OPT.ResizeBilinearOptions, o)
    return w.finish([x], [y])


# -- structural ops (values copied unchanged; one quantisation throughout) ---------------------

def pad(x_shape: tuple[int, ...], paddings: list[tuple[int, int]], q: QParams, *,
        v2: bool = False) -> bytes:
    """PAD (or PADV2 with the constant value at the zero point, i.e. real 0)."""
    w = TfliteWriter()
    x = w.activation("x", x_shape, q)
    p = w.tensor("paddings", (len(x_shape), 2), T_INT32, data=np.asarray(paddings, np.int32))
    y_shape = tuple(d + lo + hi for d, (lo, hi) in zip(x_shape, paddings, strict=True))
    y = w.activation("y", y_shape, q)
    if v2:
        v = w.tensor("value", (1,), T_INT8, [q.scale], [q.zero_point],
                     data=np.array([q.zero_point], np.int8))
        w.op(OP.PADV2, [x, p, v], [y], OPT.PadV2Options, FB.PadV2OptionsT())
    else:
        w.op(OP.PAD, [x, p], [y], OPT.PadOptions, FB.PadOptionsT())
    return w.finish([x], [y])


def concatenation(shapes: list[tuple[int, ...]], axis: int, q: QParams,
                  zero_inputs: tuple[int, ...] = (),
                  constants: dict[int, np.ndarray] | None = None) -> bytes:
    """CONCATENATION of graph inputs sharing `q`; inputs listed in `zero_inputs` are constant
    zeros (real 0: int8 zero points) instead, those in `constants` these int8 values."""
    w = TfliteWriter()
    ins, graph_in = [], []
    constants = constants or {}
    for i, s in enumerate(shapes):
        if i in zero_inputs or i in constants:
            data = constants[i] if i in constants else np.full(s, q.zero_point, np.int8)
            ins.append(w.tensor(f"const{i}", s, T_INT8, [q.scale], [q.zero_point],
                                data=np.asarray(data, np.int8)))
        else:
            ins.append(w.activation(f"x{i}", s, q))
            graph_in.append(ins[-1])
    out = list(shapes[0])
    out[axis] = sum(s[axis] for s in shapes)
    y = w.activation("y", tuple(out), q)
    o = FB.ConcatenationOptionsT()
    o.axis = axis
    w.op(OP.CONCATENATION, ins, [y], OPT.ConcatenationOptions, o)
    return w.finish(graph_in, [y])


def slice_(x_shape: tuple[int, ...], begin: list[int], size: list[int], q: QParams) -> bytes:
    """SLICE with constant int32 begin and size (−1: to the end)."""
    w = TfliteWriter()
    x = w.activation("x", x_shape, q)
    b = w.tensor("begin", (len(begin),), T_INT32, data=np.asarray(begin, np.int32))
    s = w.tensor("size", (len(size),), T_INT32, data=np.asarray(size, np.int32))
    y_shape = tuple(d - bb if n == -1 else n for d, bb, n in zip(x_shape, begin, size,
                                                                  strict=True))
    y = w.activation("y", y_shape, q)
    w.op(OP.SLICE, [x, b, s], [y], OPT.SliceOptions, FB.SliceOptionsT())
    return w.finish([x], [y])


def strided_slice(x_shape: tuple[int, ...], begin: list[int], end: list[int],
                  strides: list[int], y_shape: tuple[int, ...], q: QParams, *,
                  begin_mask: int = 0, end_mask: int = 0, shrink_axis_mask: int = 0) -> bytes:
    """STRIDED_SLICE with constant int32 begin/end/strides; `y_shape` is what it computes."""
    w = TfliteWriter()
    x = w.activation("x", x_shape, q)
    ts = [w.tensor(n, (len(v),), T_INT32, data=np.asarray(v, np.int32))
          for n, v in (("begin", begin), ("end", end), ("strides", strides))]
    y = w.activation("y", y_shape, q)
    o = FB.StridedSliceOptionsT()
    o.beginMask, o.endMask, o.shrinkAxisMask = begin_mask, end_mask, shrink_axis_mask
    w.op(OP.STRIDED_SLICE, [x, *ts], [y], OPT.StridedSliceOptions, o)
    return w.finish([x], [y])


def split(x_shape: tuple[int, ...], axis: int, sizes: list[int], q: QParams, output: int, *,
          v: bool = False) -> bytes:
    """SPLIT (equal `sizes`) or SPLIT_V into len(sizes) outputs; the graph's output is part
    `output` (the others are computed and unused)."""
    w = TfliteWriter()
    x = w.activation("x", x_shape, q)
    a = w.tensor("axis", (1,), T_INT32, data=np.asarray([axis], np.int32))
    outs = []
    for k, n in enumerate(sizes):
        s = list(x_shape)
        s[axis] = n
        outs.append(w.activation(f"y{k}", tuple(s), q))
    if v:
        sz = w.tensor("sizes", (len(sizes),), T_INT32, data=np.asarray(sizes, np.int32))
        o = FB.SplitVOptionsT()
        o.numSplits = len(sizes)
        w.op(OP.SPLIT_V, [x, sz, a], outs, OPT.SplitVOptions, o)
    else:
        o = FB.SplitOptionsT()
        o.numSplits = len(sizes)
        w.op(OP.SPLIT, [a, x], outs, OPT.SplitOptions, o)
    return w.finish([x], [outs[output]])


def unary(op: str, shape: tuple[int, ...], x_q: QParams, y_q: QParams,
          alpha: float | None = None) -> bytes:
    """One unary activation: LOGISTIC, TANH, HARD_SWISH or LEAKY_RELU (with `alpha`), int8
    input and output of `shape` (TFLM fixes LOGISTIC's output at 1/256, −128 and TANH's at
    1/128, 0; pass those as `y_q`)."""
    w = TfliteWriter()
    x = w.activation("x", shape, x_q)
    y = w.activation("y", shape, y_q)
    if op == "LEAKY_RELU":
        o = FB.LeakyReluOptionsT()
        o.alpha = float(0.2 if alpha is None else alpha)
        w.op(OP.LEAKY_RELU, [x], [y], OPT.LeakyReluOptions, o)
    else:
        w.op(getattr(OP, op), [x], [y])
    return w.finish([x], [y])
