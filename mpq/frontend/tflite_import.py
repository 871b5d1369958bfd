"""TFLite flatbuffer → NHWC IR (DESIGN §3), keeping an int8 model's own quantisation (§4.1).

The file is parsed with the flatbuffer schema module that ships in PyPI `tflite-micro`
(`tflite_micro/tensorflow/lite/micro/python/schema_py_generated.py`, which needs `flatbuffers`).
Only the first subgraph is read (the one TFLM runs). TFLite is NHWC natively and its
convolution weights are already OHWI, so import is mostly a renaming:

- CONV_2D (grouped when the filter has fewer input channels than the input), DEPTHWISE_CONV_2D
  (filter `[1, KH, KW, Cout]` → OHWI `[Cout, KH, KW, 1]`, groups = Cin, any depth multiplier),
  FULLY_CONNECTED (`[Cout, K]`), ADD, AVERAGE_POOL_2D, MAX_POOL_2D, RESHAPE, SOFTMAX and
  CONCATENATION map one-to-one onto IR nodes; fused activations (NONE, RELU, RELU6) become
  `act_min` / `act_max`. MEAN becomes `mean` (plus a reshape without keep_dims),
  RESIZE_NEAREST_NEIGHBOR and RESIZE_BILINEAR become `resize`. LOGISTIC, TANH, HARD_SWISH and
  LEAKY_RELU (α from its options) become `activation` nodes (`mpq.quant.lut`).
- SAME/VALID padding becomes explicit `(top, left, bottom, right)` exactly as TFLite computes
  it (`tensorflow/lite/kernels/padding.h`): out = ceil(in / stride) for SAME,
  total = max((out − 1)·stride + (k − 1)·dilation + 1 − in, 0), before = total // 2 and
  after = total − before.
- PAD folds into the following CONV_2D / DEPTHWISE_CONV_2D / MAX_POOL_2D, as in the ONNX
  importer. A RESHAPE that keeps the shape disappears.
- QUANTIZE right after a graph input and DEQUANTIZE right before a graph output are removed
  and recorded (`TfliteQuant.boundary`); the IR's inputs and outputs are then the int8 tensors,
  read as the real numbers they stand for.

Names. IR tensors carry the TFLite tensor names (an empty name becomes `tensor_<index>`; a
repeated name gets `_1`, `_2`, … in tensor-index order), so they are stable across imports.
IR nodes are named `<builtin op name in lower case>_<operator index>`, e.g. `conv_2d_0`,
`depthwise_conv_2d_1`, `fully_connected_11`; a flatten the importer inserts before a fully
connected layer whose input is not `[1, K]` is `<node>_flatten`.

int8 models. The IR graph holds float weights — the dequantised weights `scale[c]·q` and biases
`s_in·s_w[c]·q_bias` — so that `mpq.interpreter.run_graph` runs it. `TfliteModel.quant` keeps
what the integer reference needs with the model's own parameters: per activation tensor
(IR tensor name) the float32 scale and the zero point, per weighted node (IR node name) the raw
int8 weights in IR layout, per-channel float32 weight scales and the int32 bias, and the
quantisation of the graph's inputs and outputs.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

from mpq import limits
from mpq.errors import MpqError
from mpq.ir import (
    LAYOUT_NHWC,
    Graph,
    Node,
    Tensor,
    broadcast_shape,
    conv_out_size,
    remove_dead_nodes,
    slice_window,
)

SCHEMA_MODULE = "tflite_micro.tensorflow.lite.micro.python.schema_py_generated"
SCHEMA_PACKAGE = "tflite_micro"
SCHEMA_RELPATH = ("tensorflow", "lite", "micro", "python", "schema_py_generated.py")
FILE_IDENTIFIER = b"TFL3"
NEEDS_TFLITE_MICRO = "reading .tflite needs the tflite-micro package: pip install tflite-micro"

SUPPORTED_OPS = (
    "ADD", "AVERAGE_POOL_2D", "CONCATENATION", "CONV_2D", "DEPTHWISE_CONV_2D", "DEQUANTIZE",
    "FULLY_CONNECTED", "MAX_POOL_2D", "PAD", "QUANTIZE", "RESHAPE", "SOFTMAX",
    "MEAN", "RESIZE_NEAREST_NEIGHBOR", "RESIZE_BILINEAR",
    "MUL", "SUB", "PRELU",
    "PADV2", "SLICE", "STRIDED_SLICE", "SPLIT", "SPLIT_V",
    "LOGISTIC", "TANH", "HARD_SWISH", "LEAKY_RELU",
)

# TensorType code → (name, numpy dtype); codes from the TFLite schema.
_TYPES: dict[int, tuple[str, Any]] = {
    0: ("float32", np.dtype("<f4")), 1: ("float16", np.dtype("<f2")),
    2: ("int32", np.dtype("<i4")), 3: ("uint8", np.dtype("u1")), 4: ("int64", np.dtype("<i8")),
    6: ("bool", np.dtype("?")), 7: ("int16", np.dtype("<i2")), 9: ("int8", np.dtype("i1")),
    10: ("float64", np.dtype("<f8")),
}
_FLOAT32, _FLOAT16, _INT32, _INT8 = 0, 1, 2, 9
_SAME, _VALID = 0, 1
_ACTIVATIONS = {0: (-math.inf, math.inf), 1: (0.0, math.inf), 3: (0.0, 6.0)}
_ACTIVATION_NAMES = {0: "NONE", 1: "RELU", 2: "RELU_N1_TO_1", 3: "RELU6", 4: "TANH",
                     5: "SIGN_BIT"}


# -- the schema module -----------------------------------------------------------------------

def _load_schema(module: str, package: str) -> ModuleType:
    """Import the generated schema; fall back to loading the file itself.

    The `tflite_micro` package's `__init__` loads TFLM's native runtime; should that fail on
    a platform, the pure-Python schema file is still usable and is loaded by path.
    """
    try:
        return importlib.import_module(module)
    except Exception:  # ImportError, or the package __init__ failing to load its extension
        pass
    try:
        import flatbuffers  # noqa: F401  (the schema needs it)

        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            raise ImportError(package)
        path = Path(next(iter(spec.submodule_search_locations))).joinpath(*SCHEMA_RELPATH)
        file_spec = importlib.util.spec_from_file_location("_mpq_tflite_schema", path)
        if file_spec is None or file_spec.loader is None or not path.is_file():
            raise ImportError(str(path))
        mod = importlib.util.module_from_spec(file_spec)
        file_spec.loader.exec_module(mod)
        return mod
    except Exception:
        raise MpqError(NEEDS_TFLITE_MICRO) from None


@functools.lru_cache(maxsize=1)
def schema() -> ModuleType:
    """The TFLite flatbuffer schema module from `tflite-micro` (MpqError when missing)."""
    return _load_schema(SCHEMA_MODULE, SCHEMA_PACKAGE)


def _op_names(fb: ModuleType) -> dict[int, str]:
    return {v: k for k, v in vars(fb.BuiltinOperator).items()
            if not k.startswith("_") and isinstance(v, int)}


# -- public result -----------------------------------------------------------------------------

@dataclass(frozen=True)
class TensorQuant:
    """Per-tensor affine quantisation as stored in the file: real = scale·(q − zero_point)."""

    scale: np.float32
    zero_point: int
    dtype: str = "int8"


@dataclass
class WeightQuant:
    """A weighted node's integer parameters, in IR layout.

    `weight` is int8, OHWI `[Cout, KH, KW, Cin/groups]` for conv2d (depthwise included) or
    `[Cout, K]` for fully_connected; `scale` is float32 `[Cout]` (a per-tensor scale is
    broadcast, `per_channel` says which the file had); `bias` is int32 `[Cout]` (zeros when the
    layer had none) with scale s_in·scale[c].
    """

    weight: np.ndarray
    scale: np.ndarray
    bias: np.ndarray
    per_channel: bool


@dataclass(frozen=True)
class BoundaryOp:
    """A QUANTIZE after a graph input or a DEQUANTIZE before a graph output, removed at import.

    `outer` is the model's own input/output tensor (TFLite name, not in the IR); `inner` is the
    IR graph input/output that replaces it. `quant` is the outer tensor's quantisation when it
    is quantised (e.g. a uint8 input), else None.
    """

    op: str
    index: int
    outer: str
    inner: str
    dtype: str
    shape: tuple[int, ...]
    quant: TensorQuant | None


@dataclass
class TfliteQuant:
    """Everything the integer reference needs, with the int8 model's own parameters."""

    activations: dict[str, TensorQuant]  # every IR tensor (graph inputs and node outputs)
    weights: dict[str, WeightQuant]  # every conv2d / fully_connected node, by IR node name
    inputs: dict[str, TensorQuant]  # the IR graph inputs
    outputs: dict[str, TensorQuant]  # the IR graph outputs
    boundary: list[BoundaryOp] = field(default_factory=list)


@dataclass
class TfliteModel:
    """An imported `.tflite`: the float IR graph and, for int8 models, the model's quantisation.

    `tensor_index` maps each IR tensor name to its TFLite tensor index in subgraph 0 (an
    inserted flatten's tensor maps to the tensor it reshapes).
    """

    graph: Graph
    quant: TfliteQuant | None
    source: str
    description: str = ""
    tensor_index: dict[str, int] = field(default_factory=dict)


# -- the importer --------------------------------------------------------------------------------

@dataclass
class _PendingPad:
    source: str  # IR tensor
    pads: tuple[int, int, int, int]
    node: str


@dataclass
class _Importer:
    fb: ModuleType
    model: Any  # schema ModelT
    data: bytes
    source: str
    op_names: dict[int, str] = field(default_factory=dict)
    names: list[str] = field(default_factory=list)  # unique name per TFLite tensor index
    values: dict[int, str] = field(default_factory=dict)  # TFLite tensor index → IR tensor
    origin: dict[str, int] = field(default_factory=dict)  # IR tensor → TFLite tensor index
    pending: dict[int, _PendingPad] = field(default_factory=dict)
    consumers: dict[int, list[int]] = field(default_factory=dict)
    tensors: dict[str, Tensor] = field(default_factory=dict)
    nodes: list[Node] = field(default_factory=list)
    weights: dict[str, WeightQuant] = field(default_factory=dict)
    consts: dict[int, np.ndarray] = field(default_factory=dict)  # folded DEQUANTIZE constants
    skip: set[int] = field(default_factory=set)  # operator indices removed at the boundary
    boundary: list[BoundaryOp] = field(default_factory=list)
    notes: Counter = field(default_factory=Counter)
    int8: bool = False

    # -- helpers --------------------------------------------------------------------------------
    def fail(self, message: str) -> MpqError:
        return MpqError(f"{self.source}: {message}")

    @property
    def sg(self) -> Any:
        return self.model.subgraphs[0]

    def tensor(self, index: int) -> Any:
        return self.sg.tensors[index]

    def op_name(self, op: Any) -> str:
        codes = self.model.operatorCodes or []
        if not 0 <= op.opcodeIndex < len(codes):
            raise self.fail(f"operator refers to missing operator code {op.opcodeIndex}")
        code = codes[op.opcodeIndex]
        builtin = max(code.builtinCode, code.deprecatedBuiltinCode)
        name = self.op_names.get(builtin, f"builtin {builtin}")
        if name == "CUSTOM":
            custom = code.customCode.decode("utf-8", "replace") if code.customCode else "?"
            return f"CUSTOM ({custom})"
        return name

    def where(self, index: int) -> str:
        return f"operator {index} ({self.op_name(self.sg.operators[index])})"

    def type_name(self, index: int) -> str:
        t = self.tensor(index).type
        return _TYPES.get(t, (f"type {t}", None))[0]

    def shape(self, index: int) -> tuple[int, ...]:
        t = self.tensor(index)
        return tuple(int(d) for d in (t.shape if t.shape is not None else []))

    def raw(self, index: int) -> np.ndarray | None:
        """The constant data of a tensor, shaped, or None for an activation."""
        if index in self.consts:
            return self.consts[index]
        t = self.tensor(index)
        buffers = self.model.buffers or []
        if t.buffer <= 0 or t.buffer >= len(buffers):
            return None
        buf = buffers[t.buffer]
        if buf.offset > 1:  # data stored after the flatbuffer (models > 2 GB)
            if buf.offset + buf.size > len(self.data):
                raise self.fail(f"tensor '{self.names[index]}' points past the end of the file "
                                "(truncated file?)")
            blob = self.data[buf.offset:buf.offset + buf.size]
        elif buf.data is not None and len(buf.data):
            blob = np.asarray(buf.data, np.uint8).tobytes()
        else:
            return None
        name, dtype = _TYPES.get(t.type, (None, None))
        if dtype is None:
            raise self.fail(f"tensor '{self.names[index]}' has unsupported element type "
                            f"{self.type_name(index)}")
        shape = self.shape(index)
        need = math.prod(shape) * dtype.itemsize
        if len(blob) != need:
            raise self.fail(f"tensor '{self.names[index]}' holds {len(blob)} bytes but its "
                            f"shape {list(shape)} needs {need} (truncated or corrupt file)")
        return np.frombuffer(blob, dtype).reshape(shape).copy()

    def is_const(self, index: int) -> bool:
        return self.raw(index) is not None

    def quant_params(self, index: int) -> tuple[np.ndarray, np.ndarray, int] | None:
        """(scales float32, zero points int64, quantized dimension) or None."""
        q = self.tensor(index).quantization
        if q is None or q.scale is None or len(q.scale) == 0:
            return None
        scale = np.asarray(q.scale, np.float32).reshape(-1)
        zp = (np.asarray(q.zeroPoint, np.int64).reshape(-1) if q.zeroPoint is not None
              and len(q.zeroPoint) else np.zeros(scale.size, np.int64))
        return scale, zp, int(q.quantizedDimension)

    def tensor_quant(self, index: int, what: str) -> TensorQuant:
        params = self.quant_params(index)
        if params is None:
            raise self.fail(f"{what} '{self.names[index]}' is {self.type_name(index)} but has no "
                            "quantisation parameters")
        scale, zp, _ = params
        if scale.size != 1 or zp.size != 1:
            raise self.fail(f"{what} '{self.names[index]}' is quantised per channel; "
                            "activations must be quantised per tensor")
        if not (np.isfinite(scale[0]) and scale[0] > 0):
            raise self.fail(f"{what} '{self.names[index]}' has invalid scale {float(scale[0])}")
        return TensorQuant(np.float32(scale[0]), int(zp[0]), self.type_name(index))

    def act(self, index: int, opts: Any) -> dict[str, float]:
        code = int(getattr(opts, "fusedActivationFunction", 0) or 0)
        if code not in _ACTIVATIONS:
            name = _ACTIVATION_NAMES.get(code, str(code))
            raise self.fail(f"{self.where(index)}: fused activation {name} is not supported "
                            "(NONE, RELU, RELU6)")
        lo, hi = _ACTIVATIONS[code]
        if code == 0:
            return {}
        return {"act_min": lo, "act_max": hi}

    def value(self, index: int, op_index: int) -> str:
        """The IR tensor that holds TFLite activation tensor `index`."""
        if index in self.pending:
            _materialise_pad(self, index)  # not folded into a window: a pad node of its own
        if index not in self.values:
            if self.is_const(index):
                raise self.fail(f"{self.where(op_index)} has a constant "
                                f"'{self.names[index]}' where an activation is expected")
            raise self.fail(f"{self.where(op_index)} reads tensor '{self.names[index]}', which "
                            "is neither a graph input nor computed earlier")
        return self.values[index]

    def take_pad(self, index: int, op_index: int) -> tuple[str, tuple[int, int, int, int]]:
        if index in self.pending and len(self.consumers.get(index, [])) != 1:
            _materialise_pad(self, index)  # read by several operators: pad once for all
        if index in self.pending:
            pad = self.pending.pop(index)
            self.notes["PAD folded"] += 1
            return pad.source, pad.pads
        return self.value(index, op_index), (0, 0, 0, 0)

    def new_tensor(self, index: int, shape: tuple[int, ...] | None = None) -> str:
        name = self.names[index]
        if name in self.tensors:
            raise self.fail(f"tensor '{name}' is written twice")
        shape = self.shape(index) if shape is None else shape
        limits.check_shape(shape, f"{self.source}: tensor '{name}'")
        self.tensors[name] = Tensor(name, tuple(int(d) for d in shape))
        self.values[index] = name
        self.origin[name] = index
        return name

    def extra_tensor(self, base: str, shape: tuple[int, ...], like: int) -> str:
        """A tensor mpq adds (no TFLite index), quantised like TFLite tensor `like`."""
        name, k = base, 0
        while name in self.tensors or name in self.names:
            k += 1
            name = f"{base}_{k}"
        limits.check_shape(shape, f"{self.source}: tensor '{name}'")
        self.tensors[name] = Tensor(name, tuple(int(d) for d in shape))
        self.origin[name] = like
        return name

    def producer_of(self, tensor: str) -> Node | None:
        for n in reversed(self.nodes):
            if tensor in n.outputs:
                return n
        return None

    def node_name(self, op_index: int) -> str:
        return f"{self.op_name(self.sg.operators[op_index]).lower()}_{op_index}"

    def inputs(self, op: Any) -> list[int]:
        return [int(i) for i in (op.inputs if op.inputs is not None else [])]

    def outputs(self, op: Any) -> list[int]:
        return [int(i) for i in (op.outputs if op.outputs is not None else [])]

    def rank4(self, tensor: str, op_index: int) -> tuple[int, int, int, int]:
        shape = self.tensors[tensor].shape
        if len(shape) != 4:
            raise self.fail(f"{self.where(op_index)}: input must be rank 4 NHWC, got "
                            f"{list(shape)}")
        return shape  # type: ignore[return-value]

    def check_output(self, op_index: int, out: int, expected: tuple[int, ...]) -> None:
        got = self.shape(out)
        if tuple(got) != tuple(expected):
            raise self.fail(f"{self.where(op_index)}: output '{self.names[out]}' has shape "
                            f"{list(got)}, but the operator computes {list(expected)}")


def _tfl_pads(padding: int, in_hw: tuple[int, int], kernel: tuple[int, int],
              strides: tuple[int, int], dilations: tuple[int, int]) -> tuple[int, int, int, int]:
    """TFLite SAME/VALID → (top, left, bottom, right), as `kernels/padding.h` computes it."""
    if padding == _VALID:
        return 0, 0, 0, 0
    before, after = [], []
    for size, k, s, d in zip(in_hw, kernel, strides, dilations, strict=True):
        out = -(-size // s)
        total = max((out - 1) * s + (k - 1) * d + 1 - size, 0)
        before.append(total // 2)
        after.append(total - total // 2)
    return before[0], before[1], after[0], after[1]


def _spatial(imp: _Importer, op_index: int, opts: Any, x_hw: tuple[int, int],
             kernel: tuple[int, int], dilated: bool) -> dict[str, Any]:
    """Strides, dilations and explicit pads of a conv/pool from its options."""
    strides = (int(opts.strideH), int(opts.strideW))
    dilations = ((int(opts.dilationHFactor), int(opts.dilationWFactor)) if dilated else (1, 1))
    if min(strides) < 1 or min(dilations) < 1 or min(kernel) < 1:
        raise imp.fail(f"{imp.where(op_index)}: invalid kernel {kernel}, strides {strides} or "
                       f"dilations {dilations}")
    if opts.padding not in (_SAME, _VALID):
        raise imp.fail(f"{imp.where(op_index)}: unknown padding {opts.padding}")
    pads = _tfl_pads(int(opts.padding), x_hw, kernel, strides, dilations)
    return {"kernel": kernel, "strides": strides, "dilations": dilations, "pads": pads}


def _options(imp: _Importer, op: Any, cls: str) -> Any:
    return op.builtinOptions if op.builtinOptions is not None else getattr(imp.fb, cls)()


def _weights(imp: _Importer, op_index: int, w_index: int, b_index: int, x_index: int,
             cout: int, axis: int, to_ir: Any) -> tuple[np.ndarray, np.ndarray, WeightQuant | None]:
    """Float weight (IR layout) and bias; the integer parameters too for int8 models."""
    w = imp.raw(w_index)
    if w is None:
        raise imp.fail(f"{imp.where(op_index)}: the weights '{imp.names[w_index]}' must be a "
                       "constant")
    b = imp.raw(b_index) if b_index >= 0 else None
    if b_index >= 0 and b is None:
        raise imp.fail(f"{imp.where(op_index)}: the bias '{imp.names[b_index]}' must be a "
                       "constant")
    if b is not None and b.size != cout:
        raise imp.fail(f"{imp.where(op_index)}: bias has {b.size} values for {cout} output "
                       "channels")
    wtype = imp.tensor(w_index).type
    if w.dtype == np.float32:
        if imp.int8:
            raise imp.fail(f"{imp.where(op_index)}: float32 weights in an int8 model")
        if b is not None and b.dtype != np.float32:
            raise imp.fail(f"{imp.where(op_index)}: bias is {imp.type_name(b_index)}, "
                           "expected float32")
        bias = b.reshape(-1) if b is not None else np.zeros(cout, np.float32)
        return np.ascontiguousarray(to_ir(w), np.float32), bias.astype(np.float32), None
    if wtype != _INT8:
        raise imp.fail(f"{imp.where(op_index)}: weights '{imp.names[w_index]}' are "
                       f"{imp.type_name(w_index)}; only float32 and int8 weights are supported")
    params = imp.quant_params(w_index)
    if params is None:
        raise imp.fail(f"{imp.where(op_index)}: int8 weights '{imp.names[w_index]}' have no "
                       "quantisation parameters")
    scale, zp, qdim = params
    if np.any(zp != 0):
        raise imp.fail(f"{imp.where(op_index)}: int8 weights '{imp.names[w_index]}' have a "
                       "non-zero zero point; weights must be symmetric")
    if not (np.all(np.isfinite(scale)) and np.all(scale > 0)):
        raise imp.fail(f"{imp.where(op_index)}: weights '{imp.names[w_index]}' have invalid "
                       "scales (not finite and positive)")
    per_channel = scale.size > 1
    if per_channel and (scale.size != cout or qdim != axis):
        raise imp.fail(f"{imp.where(op_index)}: weights '{imp.names[w_index]}' have "
                       f"{scale.size} scales along axis {qdim}; expected {cout} along axis {axis}")
    scales = np.broadcast_to(scale, (cout,)).astype(np.float32)
    q = np.ascontiguousarray(to_ir(w), np.int8)
    shape = (cout,) + (1,) * (q.ndim - 1)
    w_float = (scales.astype(np.float64).reshape(shape) * q).astype(np.float32)
    if not imp.int8:  # a hybrid model: int8 weights, float activations
        imp.notes["int8 weights dequantised (hybrid model)"] += 1
        if b is not None and b.dtype != np.float32:
            raise imp.fail(f"{imp.where(op_index)}: bias is {imp.type_name(b_index)}, "
                           "expected float32")
        bias = b.reshape(-1) if b is not None else np.zeros(cout, np.float32)
        return w_float, bias.astype(np.float32), None
    if b is not None and imp.tensor(b_index).type != _INT32:
        raise imp.fail(f"{imp.where(op_index)}: bias '{imp.names[b_index]}' is "
                       f"{imp.type_name(b_index)}; int8 models need an int32 bias")
    q_bias = b.reshape(-1).astype(np.int32) if b is not None else np.zeros(cout, np.int32)
    s_in = float(imp.tensor_quant(x_index, "input").scale)
    bias = (s_in * scales.astype(np.float64) * q_bias).astype(np.float32)
    return w_float, bias, WeightQuant(q, scales, q_bias, per_channel)


# -- operator handlers ---------------------------------------------------------------------------

def _conv(imp: _Importer, i: int, op: Any, depthwise: bool) -> None:
    opts = _options(imp, op, "DepthwiseConv2DOptionsT" if depthwise else "Conv2DOptionsT")
    ins, outs = imp.inputs(op), imp.outputs(op)
    if len(ins) < 2 or len(outs) != 1:
        raise imp.fail(f"{imp.where(i)}: expected input, filter[, bias] and one output")
    x, extra = imp.take_pad(ins[0], i)
    x_index = imp.origin[x]
    _, h, w, c = imp.rank4(x, i)
    filt = imp.shape(ins[1])
    if len(filt) != 4:
        raise imp.fail(f"{imp.where(i)}: filter must be rank 4, got {list(filt)}")
    if depthwise:
        _, kh, kw, cout = filt
        if filt[0] != 1 or cout % c:
            raise imp.fail(f"{imp.where(i)}: depthwise filter {list(filt)} does not match "
                           f"{c} input channels")
        groups, axis = c, 3

        def to_ir(a: np.ndarray) -> np.ndarray:
            return a[0].transpose(2, 0, 1)[..., None]  # [1,KH,KW,Cout] → [Cout,KH,KW,1]
    else:
        cout, kh, kw, cin_g = filt
        if cin_g < 1 or c % cin_g or cout % (c // cin_g):
            raise imp.fail(f"{imp.where(i)}: filter {list(filt)} does not match {c} input "
                           "channels")
        groups, axis = c // cin_g, 0

        def to_ir(a: np.ndarray) -> np.ndarray:
            return a
    attrs = _spatial(imp, i, opts, (h + extra[0] + extra[2], w + extra[1] + extra[3]),
                     (kh, kw), dilated=True)
    attrs["pads"] = tuple(p + e for p, e in zip(attrs["pads"], extra, strict=True))
    attrs["groups"] = groups
    ho = conv_out_size(h, kh, attrs["strides"][0], attrs["dilations"][0], attrs["pads"][0],
                       attrs["pads"][2])
    wo = conv_out_size(w, kw, attrs["strides"][1], attrs["dilations"][1], attrs["pads"][1],
                       attrs["pads"][3])
    if ho <= 0 or wo <= 0:
        raise imp.fail(f"{imp.where(i)}: empty output {ho}x{wo}")
    imp.check_output(i, outs[0], (1, ho, wo, cout))
    attrs.update(imp.act(i, opts))
    weight, bias, wq = _weights(imp, i, ins[1], ins[2] if len(ins) > 2 else -1, x_index, cout,
                                axis, to_ir)
    name = imp.node_name(i)
    out = imp.new_tensor(outs[0])
    imp.nodes.append(Node(name=name, op="conv2d", inputs=[x], outputs=[out], attrs=attrs,
                          weight=weight, bias=bias))
    if wq is not None:
        imp.weights[name] = wq


def _fully_connected(imp: _Importer, i: int, op: Any) -> None:
    opts = _options(imp, op, "FullyConnectedOptionsT")
    ins, outs = imp.inputs(op), imp.outputs(op)
    if len(ins) < 2 or len(outs) != 1:
        raise imp.fail(f"{imp.where(i)}: expected input, weights[, bias] and one output")
    if int(opts.weightsFormat or 0) != 0:
        raise imp.fail(f"{imp.where(i)}: shuffled weight formats are not supported")
    x = imp.value(ins[0], i)
    x_index = imp.origin[x]
    filt = imp.shape(ins[1])
    if len(filt) != 2:
        raise imp.fail(f"{imp.where(i)}: weights must be [Cout, K], got {list(filt)}")
    cout, k = filt
    in_shape = imp.tensors[x].shape
    if math.prod(in_shape) != k:
        raise imp.fail(f"{imp.where(i)}: input {list(in_shape)} is not one row of {k} "
                       "values (batch 1)")
    if tuple(in_shape) != (1, k):
        if opts.keepNumDims:
            raise imp.fail(f"{imp.where(i)}: keep_num_dims with input {list(in_shape)} is not "
                           "supported")
        flat = f"{x}_flat"
        while flat in imp.tensors or flat in imp.names:
            flat += "_"
        imp.tensors[flat] = Tensor(flat, (1, k))
        imp.origin[flat] = x_index
        imp.nodes.append(Node(name=f"{imp.node_name(i)}_flatten", op="reshape", inputs=[x],
                              outputs=[flat], attrs={"shape": (1, k)}))
        imp.notes["flatten inserted before FULLY_CONNECTED"] += 1
        x = flat
    imp.check_output(i, outs[0], (1, cout))
    weight, bias, wq = _weights(imp, i, ins[1], ins[2] if len(ins) > 2 else -1, x_index, cout,
                                0, lambda a: a)
    name = imp.node_name(i)
    out = imp.new_tensor(outs[0])
    imp.nodes.append(Node(name=name, op="fully_connected", inputs=[x], outputs=[out],
                          attrs=imp.act(i, opts), weight=weight, bias=bias))
    if wq is not None:
        imp.weights[name] = wq


def _add(imp: _Importer, i: int, op: Any) -> None:
    opts = _options(imp, op, "AddOptionsT")
    ins, outs = imp.inputs(op), imp.outputs(op)
    if len(ins) != 2 or len(outs) != 1:
        raise imp.fail(f"{imp.where(i)}: expected two inputs and one output")
    a, b = imp.value(ins[0], i), imp.value(ins[1], i)
    sa, sb = imp.tensors[a].shape, imp.tensors[b].shape
    if sa != sb:
        raise imp.fail(f"{imp.where(i)}: broadcasting ADD is not supported ({list(sa)} + "
                       f"{list(sb)})")
    imp.check_output(i, outs[0], sa)
    out = imp.new_tensor(outs[0])
    imp.nodes.append(Node(name=imp.node_name(i), op="add", inputs=[a, b], outputs=[out],
                          attrs=imp.act(i, opts)))


def _pool(imp: _Importer, i: int, op: Any, kind: str) -> None:
    opts = _options(imp, op, "Pool2DOptionsT")
    ins, outs = imp.inputs(op), imp.outputs(op)
    if len(ins) != 1 or len(outs) != 1:
        raise imp.fail(f"{imp.where(i)}: expected one input and one output")
    if ins[0] in imp.pending:
        # Folding is exact for MAX_POOL_2D after RELU only (padding taps are excluded from an
        # average and zero is not −∞): otherwise pad first, as the model says.
        prod = imp.producer_of(imp.pending[ins[0]].source)
        if kind == "avg_pool" or prod is None or prod.attrs.get("act_min", -math.inf) < 0.0:
            _materialise_pad(imp, ins[0])
    x, extra = imp.take_pad(ins[0], i)
    _, h, w, c = imp.rank4(x, i)
    kernel = (int(opts.filterHeight), int(opts.filterWidth))
    attrs = _spatial(imp, i, opts, (h + extra[0] + extra[2], w + extra[1] + extra[3]), kernel,
                     dilated=False)
    del attrs["dilations"]
    attrs["pads"] = tuple(p + e for p, e in zip(attrs["pads"], extra, strict=True))
    ho = conv_out_size(h, kernel[0], attrs["strides"][0], 1, attrs["pads"][0], attrs["pads"][2])
    wo = conv_out_size(w, kernel[1], attrs["strides"][1], 1, attrs["pads"][1], attrs["pads"][3])
    if ho <= 0 or wo <= 0:
        raise imp.fail(f"{imp.where(i)}: empty output {ho}x{wo}")
    imp.check_output(i, outs[0], (1, ho, wo, c))
    attrs.update(imp.act(i, opts))
    out = imp.new_tensor(outs[0])
    imp.nodes.append(Node(name=imp.node_name(i), op=kind, inputs=[x], outputs=[out],
                          attrs=attrs))


def _same_quant(imp: _Importer, i: int, a: int, b: int) -> None:
    if imp.int8 and imp.tensor_quant(a, "input") != imp.tensor_quant(b, "output"):
        raise imp.fail(f"{imp.where(i)}: input and output quantisation differ "
                       f"({imp.tensor_quant(a, 'input')} vs {imp.tensor_quant(b, 'output')})")


def _reshape(imp: _Importer, i: int, op: Any) -> None:
    ins, outs = imp.inputs(op), imp.outputs(op)
    if not ins or len(outs) != 1:
        raise imp.fail(f"{imp.where(i)}: expected an input and one output")
    x = imp.value(ins[0], i)
    in_shape = imp.tensors[x].shape
    out_shape = imp.shape(outs[0])
    if math.prod(out_shape) != math.prod(in_shape):
        raise imp.fail(f"{imp.where(i)}: cannot reshape {list(in_shape)} to {list(out_shape)}")
    _same_quant(imp, i, imp.origin[x], outs[0])
    if tuple(out_shape) == tuple(in_shape):
        imp.values[outs[0]] = x
        imp.notes["RESHAPE absorbed"] += 1
        return
    out = imp.new_tensor(outs[0])
    imp.nodes.append(Node(name=imp.node_name(i), op="reshape", inputs=[x], outputs=[out],
                          attrs={"shape": tuple(out_shape)}))


def _softmax(imp: _Importer, i: int, op: Any) -> None:
    opts = _options(imp, op, "SoftmaxOptionsT")
    ins, outs = imp.inputs(op), imp.outputs(op)
    if len(ins) != 1 or len(outs) != 1:
        raise imp.fail(f"{imp.where(i)}: expected one input and one output")
    beta = float(opts.beta) if op.builtinOptions is not None else 1.0
    if beta != 1.0:
        raise imp.fail(f"{imp.where(i)}: SOFTMAX with beta {beta} is not supported (beta 1)")
    x = imp.value(ins[0], i)
    shape = imp.tensors[x].shape
    imp.check_output(i, outs[0], shape)
    out = imp.new_tensor(outs[0])
    imp.nodes.append(Node(name=imp.node_name(i), op="softmax", inputs=[x], outputs=[out],
                          attrs={"axis": len(shape) - 1}))


_UNARY = {"LOGISTIC": "sigmoid", "TANH": "tanh", "HARD_SWISH": "hard_swish",
          "LEAKY_RELU": "leaky_relu"}


def _unary(imp: _Importer, i: int, op: Any) -> None:
    """LOGISTIC, TANH, HARD_SWISH, LEAKY_RELU (α from its options) → one `activation` node."""
    ins, outs = imp.inputs(op), imp.outputs(op)
    if len(ins) != 1 or len(outs) != 1:
        raise imp.fail(f"{imp.where(i)}: expected one input and one output")
    function = _UNARY[imp.op_name(op)]
    attrs: dict[str, Any] = {"function": function}
    if function == "leaky_relu":
        opts = _options(imp, op, "LeakyReluOptionsT")
        attrs["alpha"] = float(np.float32(opts.alpha))
        if not math.isfinite(attrs["alpha"]):
            raise imp.fail(f"{imp.where(i)}: alpha {attrs['alpha']} is not finite")
    x = imp.value(ins[0], i)
    shape = imp.tensors[x].shape
    imp.check_output(i, outs[0], shape)
    out = imp.new_tensor(outs[0])
    imp.nodes.append(Node(name=imp.node_name(i), op="activation", inputs=[x], outputs=[out],
                          attrs=attrs))


def _concat(imp: _Importer, i: int, op: Any) -> None:
    opts = _options(imp, op, "ConcatenationOptionsT")
    ins, outs = imp.inputs(op), imp.outputs(op)
    if not ins or len(outs) != 1:
        raise imp.fail(f"{imp.where(i)}: expected inputs and one output")
    if imp.act(i, opts):
        raise imp.fail(f"{imp.where(i)}: a fused activation on CONCATENATION is not supported")
    rank = len(imp.shape(ins[0]))
    axis = int(opts.axis)
    if not -rank <= axis < rank:
        raise imp.fail(f"{imp.where(i)}: axis {axis} does not fit rank {rank}")
    axis %= rank
    if all(imp.is_const(t) for t in ins):
        raise imp.fail(f"{imp.where(i)}: every input is a constant")
    constants = _concat_constants(imp, i, ins, rank)
    if constants:
        ins = [t for t in ins if not imp.is_const(t)]
    xs = _concat_zero_inputs(imp, i, ins, axis) if any(imp.is_const(t) for t in ins) \
        else [imp.value(t, i) for t in ins]
    if constants:
        shapes = [imp.tensors[x].shape for x in xs]
        for pos, c in constants:
            shapes.insert(pos, c.shape)
        rank = len(shapes[0])
        if any(len(sh) != rank or any(sh[d] != shapes[0][d] for d in range(rank) if d != axis)
               for sh in shapes):
            raise imp.fail(f"{imp.where(i)}: shapes {[list(sh) for sh in shapes]} do not match")
        out_shape = list(shapes[0])
        out_shape[axis] = sum(sh[axis] for sh in shapes)
        imp.check_output(i, outs[0], tuple(out_shape))
        out = imp.new_tensor(outs[0])
        imp.nodes.append(Node(name=imp.node_name(i), op="concat", inputs=xs, outputs=[out],
                              attrs={"axis": axis, "constants": tuple(constants)}))
        imp.notes["CONCATENATION constant kept"] += len(constants)
        return
    shapes = [imp.tensors[x].shape for x in xs]
    if any(len(s) != rank for s in shapes):
        raise imp.fail(f"{imp.where(i)}: axis {axis} does not fit inputs {shapes}")
    for s in shapes:
        if any(s[d] != shapes[0][d] for d in range(rank) if d != axis):
            raise imp.fail(f"{imp.where(i)}: shapes {[list(s) for s in shapes]} do not match")
    out_shape = list(shapes[0])
    out_shape[axis] = sum(s[axis] for s in shapes)
    imp.check_output(i, outs[0], tuple(out_shape))
    if len(xs) == 1 and len(ins) > 1:  # one activation padded with zeros: that pad is all
        pad = imp.nodes[-1]
        del imp.tensors[pad.outputs[0]], imp.origin[pad.outputs[0]]
        pad.outputs = [imp.new_tensor(outs[0])]
        pad.name = imp.node_name(i)
        return
    out = imp.new_tensor(outs[0])
    imp.nodes.append(Node(name=imp.node_name(i), op="concat", inputs=xs, outputs=[out],
                          attrs={"axis": axis}))


def _pad(imp: _Importer, i: int, op: Any) -> None:
    """PAD / PADV2 with zeros (TFLM pad.cc: the padding holds the output zero point). Spatial
    padding of a rank-4 tensor waits to be folded into the window op that reads it; any other
    (channels — TFLite's residual-widening idiom —, other ranks) is a pad node."""
    ins, outs = imp.inputs(op), imp.outputs(op)
    v2 = imp.op_name(op) == "PADV2"
    if len(ins) != (3 if v2 else 2) or len(outs) != 1:
        raise imp.fail(f"{imp.where(i)}: expected input, paddings{', value' if v2 else ''} "
                       "and one output")
    x = imp.value(ins[0], i)
    pads = imp.raw(ins[1])
    if pads is None:
        raise imp.fail(f"{imp.where(i)}: the paddings must be a constant")
    shape = imp.tensors[x].shape
    rank = len(shape)
    if pads.size != 2 * rank:
        raise imp.fail(f"{imp.where(i)}: paddings {pads.tolist()} do not fit rank {rank}")
    pads = pads.astype(np.int64).reshape(rank, 2)
    if pads[0].any() or (pads < 0).any():
        raise imp.fail(f"{imp.where(i)}: only non-negative padding outside the batch axis is "
                       f"supported (paddings {pads.tolist()})")
    if v2:
        value = imp.raw(ins[2])
        zero = imp.tensor_quant(outs[0], "output").zero_point if imp.int8 else 0
        if value is None or value.size != 1 or value.reshape(-1)[0] != zero:
            what = f"the zero point {zero}" if imp.int8 else "0"
            raise imp.fail(f"{imp.where(i)}: only zero padding is supported (the constant "
                           f"value must be {what})")
    _same_quant(imp, i, imp.origin[x], outs[0])
    if rank == 4 and not pads[3].any():
        imp.pending[outs[0]] = _PendingPad(
            x, (int(pads[1, 0]), int(pads[2, 0]), int(pads[1, 1]), int(pads[2, 1])),
            imp.node_name(i))
        return
    out = imp.new_tensor(outs[0], tuple(int(d + p.sum()) for d, p in zip(shape, pads,
                                                                          strict=True)))
    imp.check_output(i, outs[0], imp.tensors[out].shape)
    imp.nodes.append(Node(name=imp.node_name(i), op="pad", inputs=[x], outputs=[out],
                          attrs={"pads": tuple((int(a), int(b)) for a, b in pads)}))


def _materialise_pad(imp: _Importer, index: int) -> None:
    """A spatial PAD no window op absorbs becomes a pad node of its own."""
    p = imp.pending.pop(index)
    t, left, b, r = p.pads
    pads = ((0, 0), (t, b), (left, r), (0, 0))
    shape = imp.tensors[p.source].shape
    out = imp.new_tensor(index, tuple(d + lo + hi for d, (lo, hi) in zip(shape, pads,
                                                                         strict=True)))
    imp.nodes.append(Node(name=p.node, op="pad", inputs=[p.source], outputs=[out],
                          attrs={"pads": pads}))


def _slice_node(imp: _Importer, i: int, name: str, x: str, out_index: int, starts: list[int],
                steps: list[int], counts: list[int], keep: list[bool] | None = None) -> None:
    """A slice node of `x` writing TFLite tensor `out_index`; axes with keep[a] False are
    dropped from the output (STRIDED_SLICE shrink_axis_mask) by a reshape after it."""
    if starts[0] != 0 or counts[0] != 1:
        raise imp.fail(f"{imp.where(i)}: slicing the batch axis is not supported")
    if min(counts) <= 0:
        raise imp.fail(f"{imp.where(i)}: the slice is empty (sizes {counts})")
    keep = keep or [True] * len(counts)
    out_shape = tuple(c for c, k in zip(counts, keep, strict=True) if k)
    imp.check_output(i, out_index, out_shape)
    attrs = {"starts": tuple(int(v) for v in starts), "steps": tuple(int(v) for v in steps)}
    if all(keep):
        out = imp.new_tensor(out_index)
        imp.nodes.append(Node(name=name, op="slice", inputs=[x], outputs=[out], attrs=attrs))
        return
    full = imp.extra_tensor(f"{imp.names[out_index]}__slice", tuple(counts), out_index)
    imp.nodes.append(Node(name=name, op="slice", inputs=[x], outputs=[full], attrs=attrs))
    out = imp.new_tensor(out_index)
    imp.nodes.append(Node(name=f"{name}_shrink", op="reshape", inputs=[full], outputs=[out],
                          attrs={"shape": out_shape}))


def _int_const(imp: _Importer, i: int, index: int, what: str) -> list[int]:
    v = imp.raw(index)
    if v is None or v.dtype.kind not in "iu":
        raise imp.fail(f"{imp.where(i)}: {what} must be an integer constant")
    return [int(a) for a in v.reshape(-1)]


def _slice(imp: _Importer, i: int, op: Any) -> None:
    """SLICE: begin, size (−1: to the end); TFLM slice.cc copies values unchanged."""
    ins, outs = imp.inputs(op), imp.outputs(op)
    if len(ins) != 3 or len(outs) != 1:
        raise imp.fail(f"{imp.where(i)}: expected input, begin, size and one output")
    x = imp.value(ins[0], i)
    shape = imp.tensors[x].shape
    begin, size = _int_const(imp, i, ins[1], "begin"), _int_const(imp, i, ins[2], "size")
    if len(begin) != len(shape) or len(size) != len(shape):
        raise imp.fail(f"{imp.where(i)}: begin {begin} / size {size} do not fit {list(shape)}")
    counts = [d - b if n == -1 else n for d, b, n in zip(shape, begin, size, strict=True)]
    if any(b < 0 or n < 0 or b + n > d for d, b, n in zip(shape, begin, counts, strict=True)):
        raise imp.fail(f"{imp.where(i)}: begin {begin} / size {size} leave {list(shape)}")
    _same_quant(imp, i, imp.origin[x], outs[0])
    _slice_node(imp, i, imp.node_name(i), x, outs[0], begin, [1] * len(shape), counts)


def _strided_slice(imp: _Importer, i: int, op: Any) -> None:
    """STRIDED_SLICE with positive strides, begin/end masks and shrink_axis_mask
    (strided_slice_logic.h); ellipsis, new-axis masks and offset are refused."""
    opts = _options(imp, op, "StridedSliceOptionsT")
    ins, outs = imp.inputs(op), imp.outputs(op)
    if len(ins) != 4 or len(outs) != 1:
        raise imp.fail(f"{imp.where(i)}: expected input, begin, end, strides and one output")
    if opts.ellipsisMask or opts.newAxisMask or getattr(opts, "offset", False):
        raise imp.fail(f"{imp.where(i)}: ellipsis_mask, new_axis_mask and offset are not "
                       "supported")
    x = imp.value(ins[0], i)
    shape = imp.tensors[x].shape
    begin, end = _int_const(imp, i, ins[1], "begin"), _int_const(imp, i, ins[2], "end")
    strides = _int_const(imp, i, ins[3], "strides")
    if not len(begin) == len(end) == len(strides) == len(shape):
        raise imp.fail(f"{imp.where(i)}: begin/end/strides do not fit {list(shape)}")
    if min(strides) <= 0:
        raise imp.fail(f"{imp.where(i)}: only positive strides are supported ({strides})")
    starts, counts, steps, keep = [], [], [], []
    for a, d in enumerate(shape):
        if opts.shrinkAxisMask >> a & 1:  # one element at begin (StopForAxis: start + 1)
            first, _ = slice_window(d, begin[a], d, 1)
            count, step = (1 if first < d else 0), 1
        else:
            b = -(1 << 31) if opts.beginMask >> a & 1 else begin[a]
            e = (1 << 31) - 1 if opts.endMask >> a & 1 else end[a]
            first, count = slice_window(d, b, e, strides[a])
            step = strides[a]
        starts.append(first)
        counts.append(count)
        steps.append(step)
        keep.append(not opts.shrinkAxisMask >> a & 1)
    _same_quant(imp, i, imp.origin[x], outs[0])
    _slice_node(imp, i, imp.node_name(i), x, outs[0], starts, steps, counts, keep)


def _split(imp: _Importer, i: int, op: Any) -> None:
    """SPLIT (axis, input; equal parts) and SPLIT_V (input, size_splits, axis): one slice node
    per output (the IR has one output per node)."""
    ins, outs = imp.inputs(op), imp.outputs(op)
    v = imp.op_name(op) == "SPLIT_V"
    if len(ins) != (3 if v else 2) or not outs:
        what = "input, size_splits, axis" if v else "axis, input"
        raise imp.fail(f"{imp.where(i)}: expected {what} and outputs")
    x = imp.value(ins[0] if v else ins[1], i)
    shape = imp.tensors[x].shape
    axis_v = _int_const(imp, i, ins[2] if v else ins[0], "axis")
    if len(axis_v) != 1 or not -len(shape) <= axis_v[0] < len(shape):
        raise imp.fail(f"{imp.where(i)}: axis {axis_v} does not fit {list(shape)}")
    axis = axis_v[0] % len(shape)
    if v:
        sizes = _int_const(imp, i, ins[1], "size_splits")
        if sizes.count(-1) == 1:
            sizes[sizes.index(-1)] = shape[axis] - (sum(sizes) + 1)
    else:
        sizes = [shape[axis] // len(outs)] * len(outs)
    if len(sizes) != len(outs) or sum(sizes) != shape[axis] or min(sizes) <= 0:
        raise imp.fail(f"{imp.where(i)}: sizes {sizes} do not split axis {axis} of "
                       f"{list(shape)} into {len(outs)} outputs")
    offset = 0
    for k, (t, size) in enumerate(zip(outs, sizes, strict=True)):
        starts, counts = [0] * len(shape), list(shape)
        starts[axis], counts[axis] = offset, size
        offset += size
        _same_quant(imp, i, imp.origin[x], t)
        name = imp.node_name(i) + (f"_{k}" if k else "")
        _slice_node(imp, i, name, x, t, starts, [1] * len(shape), counts)


def _concat_constants(imp: _Importer, i: int, ins: list[int],
                      rank: int) -> list[tuple[int, np.ndarray]]:
    """The constant inputs of a CONCATENATION as (position, real float32 values) when some
    constant is not all zeros (those stay in the concat node; quantised with its output's
    parameters they give back the file's int8 values, which TFLM requires to share them);
    [] when every constant is zero (a pad instead: `_concat_zero_inputs`)."""
    out = []
    for pos, t in enumerate(ins):
        if not imp.is_const(t):
            continue
        c = imp.raw(t)
        if imp.int8:
            q = imp.tensor_quant(t, "constant")
            real = (c.astype(np.float64) - q.zero_point) * np.float64(q.scale)
        else:
            real = c.astype(np.float64)
        if c.ndim != rank or c.shape[0] != 1:
            raise imp.fail(f"{imp.where(i)}: constant input '{imp.names[t]}' must have rank "
                           f"{rank} and batch 1")
        out.append((pos, real.astype(np.float32)))
    return out if any(np.any(c != 0) for _, c in out) else []


def _concat_zero_inputs(imp: _Importer, i: int, ins: list[int], axis: int) -> list[str]:
    """CONCATENATION inputs with every all-zero constant folded into a pad of its activation
    neighbour (real 0 is the zero point in any quantisation; other constants:
    `_concat_constants`). Returns the IR tensors to concatenate."""
    acts = [t for t in ins if not imp.is_const(t)]
    if not acts:
        raise imp.fail(f"{imp.where(i)}: every input is a constant")
    before = {t: 0 for t in acts}
    after = {t: 0 for t in acts}
    last = None
    for t in ins:
        if not imp.is_const(t):
            last = t
            continue
        c = imp.raw(t)
        zero = imp.tensor_quant(t, "constant").zero_point if imp.int8 else 0
        if c.ndim != len(imp.shape(acts[0])) or not np.all(c == zero):  # pragma: no cover
            raise imp.fail(f"{imp.where(i)}: constant input '{imp.names[t]}' is not zeros")
        if last is None:
            before[acts[0]] += int(c.shape[axis])
        else:
            after[last] += int(c.shape[axis])
    out = []
    for k, t in enumerate(acts):
        x = imp.value(t, i)
        if before[t] or after[t]:
            shape = imp.tensors[x].shape
            pads = [(0, 0)] * len(shape)
            pads[axis] = (before[t], after[t])
            padded = imp.extra_tensor(f"{imp.names[t]}__pad", tuple(
                d + lo + hi for d, (lo, hi) in zip(shape, pads, strict=True)), imp.outputs(
                imp.sg.operators[i])[0])
            imp.nodes.append(Node(name=f"{imp.node_name(i)}_pad{k}", op="pad", inputs=[x],
                                  outputs=[padded], attrs={"pads": tuple(pads)}))
            x = padded
        out.append(x)
    imp.notes["CONCATENATION of zeros as pad"] += 1
    return out


# -- boundary QUANTIZE / DEQUANTIZE ------------------------------------------------------------

def _binary(imp: _Importer, i: int, op: Any, kind: str, options: str) -> None:
    """MUL / SUB of two activations of one rank, either broadcasting dims of 1 (TFLM's
    BroadcastMul4DSlow / BroadcastQuantSubSlow semantics)."""
    opts = _options(imp, op, options)
    ins, outs = imp.inputs(op), imp.outputs(op)
    if len(ins) != 2 or len(outs) != 1:
        raise imp.fail(f"{imp.where(i)}: expected two inputs and one output")
    if imp.is_const(ins[0]) or imp.is_const(ins[1]):
        _binary_const(imp, i, kind, opts, ins, outs[0])
        return
    a, b = imp.value(ins[0], i), imp.value(ins[1], i)
    sa, sb = imp.tensors[a].shape, imp.tensors[b].shape
    shape = broadcast_shape(sa, sb)
    if shape is None:
        raise imp.fail(f"{imp.where(i)}: operands {list(sa)} and {list(sb)} must have one rank "
                       "and each dim equal or 1 (rank 2 or 4 when they differ)")
    imp.check_output(i, outs[0], shape)
    out = imp.new_tensor(outs[0])
    imp.nodes.append(Node(name=imp.node_name(i), op=kind, inputs=[a, b], outputs=[out],
                          attrs=imp.act(i, opts)))


def _binary_const(imp: _Importer, i: int, kind: str, opts: Any, ins: list[int],
                  out_index: int) -> None:
    """MUL / SUB of an activation and a constant that broadcasts to it (after leading 1s);
    int8 files keep the constant's int8 values and quantisation (`const_q`, …)."""
    const_first = imp.is_const(ins[0])
    x_index, c_index = (ins[1], ins[0]) if const_first else (ins[0], ins[1])
    x = imp.value(x_index, i)
    shape = imp.tensors[x].shape
    raw = imp.raw(c_index)
    c_shape = (1,) * (len(shape) - raw.ndim) + raw.shape
    if raw.ndim > len(shape) or broadcast_shape(shape, c_shape) != shape:
        raise imp.fail(f"{imp.where(i)}: the constant {list(raw.shape)} must broadcast to the "
                       f"activation {list(shape)} (each dim equal or 1; rank 2 or 4 unless "
                       "equal)")
    attrs: dict[str, Any] = {"const_shape": c_shape, "const_first": const_first}
    if raw.dtype == np.int8:
        tq = imp.tensor_quant(c_index, "constant")
        attrs.update(const_q=tuple(int(v) for v in raw.reshape(-1)),
                     const_scale=float(tq.scale), const_zp=int(tq.zero_point))
        values = (raw.astype(np.float64) - tq.zero_point) * np.float32(tq.scale)
    elif raw.dtype == np.float32:
        values = raw
    else:
        raise imp.fail(f"{imp.where(i)}: constant of type {raw.dtype} (float32 or int8)")
    attrs["const"] = tuple(float(np.float32(v)) for v in values.reshape(-1))
    imp.check_output(i, out_index, shape)
    out = imp.new_tensor(out_index)
    imp.nodes.append(Node(name=imp.node_name(i), op=kind, inputs=[x], outputs=[out],
                          attrs={**imp.act(i, opts), **attrs}))


def per_channel(alpha: np.ndarray, x_shape: tuple[int, ...]) -> np.ndarray | None:
    """A constant broadcast (right-aligned) against `x_shape` as one value per last-axis
    channel, or None when it varies along another axis or does not broadcast."""
    try:
        full = np.broadcast_to(alpha, x_shape)
    except ValueError:
        return None
    flat = full.reshape(-1, x_shape[-1]) if x_shape else full.reshape(1, -1)
    if flat.size and not np.all(flat == flat[0]):
        return None
    return np.ascontiguousarray(flat[0])


def _prelu(imp: _Importer, i: int, op: Any) -> None:
    """PRELU with a constant slope per channel (or one for all); int8 files keep their int8
    slopes and quantisation in the node (`alpha_q`, `alpha_scale`, `alpha_zp`)."""
    ins, outs = imp.inputs(op), imp.outputs(op)
    if len(ins) != 2 or len(outs) != 1:
        raise imp.fail(f"{imp.where(i)}: expected an input, a slope and one output")
    x = imp.value(ins[0], i)
    shape = imp.tensors[x].shape
    raw = imp.raw(ins[1])
    if raw is None:
        raise imp.fail(f"{imp.where(i)}: the slope '{imp.names[ins[1]]}' must be a constant")
    q = per_channel(raw, shape)
    if q is None:
        raise imp.fail(f"{imp.where(i)}: the slope {list(raw.shape)} must be one value per "
                       f"channel of {list(shape)} (or one for all)")
    attrs: dict[str, Any] = {}
    if raw.dtype == np.int8:
        tq = imp.tensor_quant(ins[1], "slope")
        attrs = {"alpha_q": tuple(int(v) for v in q), "alpha_scale": float(tq.scale),
                 "alpha_zp": int(tq.zero_point)}
        alpha = (q.astype(np.float64) - tq.zero_point) * np.float32(tq.scale)
    elif raw.dtype == np.float32:
        alpha = q
    else:
        raise imp.fail(f"{imp.where(i)}: slope of type {raw.dtype} (float32 or int8)")
    imp.check_output(i, outs[0], shape)
    out = imp.new_tensor(outs[0])
    imp.nodes.append(Node(name=imp.node_name(i), op="prelu", inputs=[x], outputs=[out],
                          attrs={"alpha": tuple(float(np.float32(v)) for v in alpha), **attrs}))


def _boundary(imp: _Importer) -> tuple[list[int], list[int]]:
    """Remove QUANTIZE after graph inputs and DEQUANTIZE before graph outputs.

    Returns the TFLite tensor indices that become the IR graph inputs and outputs. DEQUANTIZE
    of an int8 constant (a weight-only quantised model) is folded into a float constant.
    """
    sg = imp.sg
    g_in = [int(t) for t in (sg.inputs if sg.inputs is not None else [])]
    g_out = [int(t) for t in (sg.outputs if sg.outputs is not None else [])]
    producers: dict[int, int] = {}
    for i, op in enumerate(sg.operators or []):
        for t in imp.outputs(op):
            producers[t] = i
    inputs, outputs = [], []
    for t in g_in:
        readers = imp.consumers.get(t, [])
        if len(readers) == 1 and imp.op_name(sg.operators[readers[0]]) == "QUANTIZE" \
                and t not in g_out:
            qi = readers[0]
            inner = imp.outputs(sg.operators[qi])[0]
            imp.skip.add(qi)
            imp.boundary.append(_boundary_op(imp, "QUANTIZE", qi, t, inner))
            imp.notes["QUANTIZE removed (graph input)"] += 1
            inputs.append(inner)
        else:
            inputs.append(t)
    for t in g_out:
        pi = producers.get(t)
        if pi is not None and imp.op_name(sg.operators[pi]) == "DEQUANTIZE":
            inner = imp.inputs(sg.operators[pi])[0]
            if not imp.is_const(inner) and inner not in g_in:
                imp.skip.add(pi)
                imp.boundary.append(_boundary_op(imp, "DEQUANTIZE", pi, t, inner))
                imp.notes["DEQUANTIZE removed (graph output)"] += 1
                outputs.append(inner)
                continue
        outputs.append(t)
    for i, op in enumerate(sg.operators or []):
        name = imp.op_name(op)
        if i in imp.skip or name not in ("QUANTIZE", "DEQUANTIZE"):
            continue
        ins, outs = imp.inputs(op), imp.outputs(op)
        const = imp.raw(ins[0]) if ins else None
        if name == "DEQUANTIZE" and const is not None and len(outs) == 1:
            params = imp.quant_params(ins[0])
            if const.dtype != np.int8 or params is None or np.any(params[1] != 0):
                raise imp.fail(f"{imp.where(i)}: only DEQUANTIZE of symmetric int8 constants "
                               f"can be folded (got {imp.type_name(ins[0])})")
            scale, _, qdim = params
            shape = [1] * const.ndim
            if scale.size > 1:
                shape[qdim] = scale.size
            imp.consts[outs[0]] = (scale.astype(np.float64).reshape(shape) * const).astype(
                np.float32)
            imp.skip.add(i)
            imp.notes["DEQUANTIZE of a constant folded"] += 1
            continue
        where = "directly after a graph input" if name == "QUANTIZE" else \
            "directly before a graph output"
        raise imp.fail(f"{imp.where(i)}: {name} is supported only {where} (re-quantisation "
                       "inside the model is not)")
    return inputs, outputs


def _boundary_op(imp: _Importer, op: str, index: int, outer: int, inner: int) -> BoundaryOp:
    q = None
    if imp.tensor(outer).type != _FLOAT32 and imp.quant_params(outer) is not None:
        q = imp.tensor_quant(outer, "tensor")
    return BoundaryOp(op=op, index=index, outer=imp.names[outer], inner=imp.names[inner],
                      dtype=imp.type_name(outer), shape=imp.shape(outer), quant=q)


# -- driver ----------------------------------------------------------------------------------------

def _unique_names(sg: Any) -> list[str]:
    names: list[str] = []
    seen: set[str] = set()
    for i, t in enumerate(sg.tensors or []):
        base = t.name.decode("utf-8", "replace") if t.name else ""
        base = base or f"tensor_{i}"
        name, k = base, 0
        while name in seen:
            k += 1
            name = f"{base}_{k}"
        seen.add(name)
        names.append(name)
    return names


def _activation_kind(imp: _Importer, inputs: list[int]) -> bool:
    """True for an int8 model, False for float; MpqError for anything else."""
    kinds: dict[str, str] = {}
    for t in inputs:
        kinds.setdefault(imp.type_name(t), imp.names[t])
    for i, op in enumerate(imp.sg.operators or []):
        if i in imp.skip:
            continue
        for t in imp.outputs(op):
            kinds.setdefault(imp.type_name(t), imp.names[t])
    if set(kinds) == {"float32"}:
        return False
    if set(kinds) == {"int8"}:
        return True
    odd = sorted(k for k in kinds if k not in ("float32", "int8"))
    if odd:
        k = odd[0]
        hint = {"int16": " (16x8 quantisation is not supported)",
                "uint8": " (legacy uint8 quantisation is not supported)"}.get(k, "")
        raise imp.fail(f"activation tensor '{kinds[k]}' is {k}; mpq reads float32 or int8 "
                       f"models{hint}")
    raise imp.fail("the model mixes float32 and int8 activations (e.g. "
                   f"'{kinds['float32']}' and '{kinds['int8']}'); only fully float or fully int8 "
                   "models (QUANTIZE/DEQUANTIZE at the graph boundary only) are supported")


def _check_tensors(imp: _Importer) -> None:
    for i, t in enumerate(imp.sg.tensors or []):
        if t.type == _FLOAT16:
            raise imp.fail(f"tensor '{imp.names[i]}' is float16; mpq imports float32 or int8 "
                           "models only (convert the model with float32 weights)")
        if t.sparsity is not None:
            raise imp.fail(f"tensor '{imp.names[i]}' is sparse, which mpq does not read")


def _check_input_shape(imp: _Importer, t: int) -> None:
    shape = imp.tensor(t).shape
    if shape is None or len(shape) == 0:
        raise imp.fail(f"graph input '{imp.names[t]}' has no shape")
    dims = [int(d) for d in shape]
    if any(d <= 0 for d in dims):
        raise imp.fail(f"graph input '{imp.names[t]}' has a dynamic dimension {dims}; export "
                       "the model with a fixed input size")
    if dims[0] != 1:
        raise imp.fail(f"graph input '{imp.names[t]}' has batch size {dims[0]}; mpq needs "
                       "batch 1")


def _mean(imp: _Importer, i: int, op: Any) -> None:
    """MEAN over any of H, W, C of a rank-4 tensor (constant int32 axes); without keep_dims
    the IR mean keeps them as 1 and a reshape (a view) gives the file's shape."""
    opts = _options(imp, op, "ReducerOptionsT")
    ins, outs = imp.inputs(op), imp.outputs(op)
    if len(ins) != 2 or len(outs) != 1:
        raise imp.fail(f"{imp.where(i)}: expected input, axes and one output")
    x = imp.value(ins[0], i)
    shape = imp.rank4(x, i)
    axes = imp.raw(ins[1])
    if axes is None:
        raise imp.fail(f"{imp.where(i)}: the axes must be a constant")
    axes = [int(a) for a in np.asarray(axes).reshape(-1)]
    if any(not -4 <= a < 4 for a in axes):
        raise imp.fail(f"{imp.where(i)}: axes {axes} out of range for rank 4")
    reduced = sorted({a % 4 for a in axes})
    ir_axes = tuple(a for a in reduced if a != 0)
    keep = tuple(1 if d in reduced else n for d, n in enumerate(shape))
    keep_dims = bool(opts.keepDims) if op.builtinOptions is not None else False
    imp.check_output(i, outs[0], keep if keep_dims else
                     tuple(n for d, n in enumerate(shape) if d not in reduced))
    if keep_dims:
        out = imp.new_tensor(outs[0])
    else:
        name = f"{imp.names[outs[0]]}_keepdims"
        if name in imp.tensors:
            raise imp.fail(f"tensor '{name}' is written twice")
        imp.tensors[name] = Tensor(name, keep)
        imp.origin[name] = outs[0]  # the same quantisation as the file's output
        out = name
    imp.nodes.append(Node(name=imp.node_name(i), op="mean", inputs=[x], outputs=[out],
                          attrs={"axes": ir_axes,
                                 "count": int(math.prod(shape[a] for a in ir_axes))}))
    if not keep_dims:
        final = imp.new_tensor(outs[0])
        imp.nodes.append(Node(name=f"{imp.node_name(i)}_squeeze", op="reshape", inputs=[out],
                              outputs=[final], attrs={"shape": imp.shape(outs[0])}))


def tflite_nearest_map(in_size: int, out_size: int, align_corners: bool,
                       half_pixel_centers: bool) -> tuple[int, ...]:
    """The input index each output index copies: TFLite's GetNearestNeighbor
    (reference_ops/resize_nearest_neighbor.h) in float32 — scale = (in−1)/(out−1) with
    align_corners (out > 1), else in/out; x = (o + 0.5·hpc)·scale, rounded half away from zero
    with align_corners, else floored; clamped to in−1 (and to 0 with half-pixel centres)."""
    if align_corners and out_size > 1:
        scale = np.float32(in_size - 1) / np.float32(out_size - 1)
    else:
        scale = np.float32(in_size) / np.float32(out_size)
    offset = np.float32(0.5 if half_pixel_centers else 0.0)
    x = (np.arange(out_size, dtype=np.float32) + offset) * scale
    if align_corners:
        v = np.sign(x) * np.floor(np.abs(x) + np.float32(0.5))
    else:
        v = np.floor(x)
    v = np.minimum(v.astype(np.int64), in_size - 1)
    if half_pixel_centers:
        v = np.maximum(v, 0)
    return tuple(int(k) for k in v)


def _resize_operands(imp: _Importer, i: int, op: Any
                     ) -> tuple[str, int, tuple[int, int], tuple[int, int]]:
    """A RESIZE_* op's input value, output tensor index (shape checked), input (H, W) and the
    constant output size (H, W)."""
    ins, outs = imp.inputs(op), imp.outputs(op)
    if len(ins) != 2 or len(outs) != 1:
        raise imp.fail(f"{imp.where(i)}: expected input, size and one output")
    x = imp.value(ins[0], i)
    _, h, w, c = imp.rank4(x, i)
    size = imp.raw(ins[1])
    if size is None or np.asarray(size).size != 2:
        raise imp.fail(f"{imp.where(i)}: the size must be a constant of two values")
    ho, wo = (int(v) for v in np.asarray(size).reshape(-1))
    if ho < 1 or wo < 1:
        raise imp.fail(f"{imp.where(i)}: empty output {ho}x{wo}")
    imp.check_output(i, outs[0], (1, ho, wo, c))
    return x, outs[0], (h, w), (ho, wo)


def _resize_nearest(imp: _Importer, i: int, op: Any) -> None:
    """RESIZE_NEAREST_NEIGHBOR with a constant size: the index maps of `tflite_nearest_map`;
    the output is the input's quantisation (TFLM copies bytes)."""
    opts = _options(imp, op, "ResizeNearestNeighborOptionsT")
    x, out_index, (h, w), (ho, wo) = _resize_operands(imp, i, op)
    align, hpc = bool(opts.alignCorners), bool(opts.halfPixelCenters)
    _same_quant(imp, i, imp.origin[x], out_index)
    out = imp.new_tensor(out_index)
    imp.nodes.append(Node(name=imp.node_name(i), op="resize", inputs=[x], outputs=[out], attrs={
        "mode": "nearest", "rows": tflite_nearest_map(h, ho, align, hpc),
        "cols": tflite_nearest_map(w, wo, align, hpc), "scales": (ho / h, wo / w)}))


def _resize_bilinear(imp: _Importer, i: int, op: Any) -> None:
    """RESIZE_BILINEAR with a constant size; the taps follow from the flags and the sizes
    (`interpreter.bilinear_float_taps`, `arith.bilinear_int_taps`); the output is the input's
    quantisation (TFLM interpolates the int8 values, no requantisation)."""
    opts = _options(imp, op, "ResizeBilinearOptionsT")
    x, out_index, _, _ = _resize_operands(imp, i, op)
    align, hpc = bool(opts.alignCorners), bool(opts.halfPixelCenters)
    if align and hpc:
        raise imp.fail(f"{imp.where(i)}: align_corners and half_pixel_centers together "
                       "(TFLM refuses them)")
    _same_quant(imp, i, imp.origin[x], out_index)
    out = imp.new_tensor(out_index)
    imp.nodes.append(Node(name=imp.node_name(i), op="resize", inputs=[x], outputs=[out], attrs={
        "mode": "bilinear", "align_corners": align, "half_pixel_centers": hpc}))


_HANDLERS: dict[str, Any] = {
    "CONV_2D": lambda imp, i, op: _conv(imp, i, op, depthwise=False),
    "DEPTHWISE_CONV_2D": lambda imp, i, op: _conv(imp, i, op, depthwise=True),
    "FULLY_CONNECTED": _fully_connected,
    "ADD": _add,
    "AVERAGE_POOL_2D": lambda imp, i, op: _pool(imp, i, op, "avg_pool"),
    "MAX_POOL_2D": lambda imp, i, op: _pool(imp, i, op, "max_pool"),
    "RESHAPE": _reshape,
    "SOFTMAX": _softmax,
    "CONCATENATION": _concat,
    "PAD": _pad,
    "MEAN": _mean,
    "RESIZE_NEAREST_NEIGHBOR": _resize_nearest,
    "RESIZE_BILINEAR": _resize_bilinear,
    "MUL": lambda imp, i, op: _binary(imp, i, op, "mul", "MulOptionsT"),
    "SUB": lambda imp, i, op: _binary(imp, i, op, "sub", "SubOptionsT"),
    "PRELU": lambda imp, i, op: _prelu(imp, i, op),
    "PADV2": _pad,
    "SLICE": _slice,
    "STRIDED_SLICE": _strided_slice,
    "SPLIT": _split,
    "SPLIT_V": _split,
    "LOGISTIC": _unary,
    "TANH": _unary,
    "HARD_SWISH": _unary,
    "LEAKY_RELU": _unary,
}


def parse_tflite(data: bytes, source: str = "model") -> Any:
    """Parse `.tflite` bytes into the schema's object API (`ModelT`); MpqError when unreadable."""
    if not data:
        raise MpqError(f"{source}: empty file, not a TFLite model")
    if len(data) < 8:
        raise MpqError(f"{source}: not a TFLite model ({len(data)} bytes, too short for a "
                       "flatbuffer)")
    ident = bytes(data[4:8])
    if ident != FILE_IDENTIFIER:
        shown = ident.decode("ascii") if all(32 <= c < 127 for c in ident) else ident.hex()
        raise MpqError(f"{source}: not a TFLite flatbuffer (file identifier '{shown}', "
                       f"expected '{FILE_IDENTIFIER.decode()}')")
    fb = schema()
    try:
        model = fb.ModelT.InitFromPackedBuf(data, 0)
    except Exception as exc:  # struct.error, ValueError, IndexError from out-of-range reads
        raise MpqError(f"{source}: truncated or corrupt TFLite file "
                       f"({type(exc).__name__})") from None
    if not model.subgraphs or not model.subgraphs[0].operators \
            or not model.subgraphs[0].tensors:
        raise MpqError(f"{source}: truncated or corrupt TFLite file (no operators)")
    return model


def import_tflite_bytes(data: bytes, source: str = "model") -> TfliteModel:
    """Convert `.tflite` bytes to the IR (DESIGN §3). Raises MpqError on anything unsupported."""
    fb = schema()
    model = parse_tflite(data, source)
    imp = _Importer(fb=fb, model=model, data=bytes(data), source=source,
                    op_names=_op_names(fb))
    sg = imp.sg
    imp.names = _unique_names(sg)
    n_tensors = len(imp.names)
    for i, op in enumerate(sg.operators):
        name = imp.op_name(op)
        if name not in SUPPORTED_OPS:
            raise imp.fail(f"operator {i} ({name}) is not supported; supported ops: "
                           + ", ".join(SUPPORTED_OPS))
        for t in imp.inputs(op) + imp.outputs(op):
            if t >= n_tensors or t < -1:
                raise imp.fail(f"{imp.where(i)} refers to tensor {t} of {n_tensors} "
                               "(corrupt file)")
        for t in imp.inputs(op):
            if t >= 0:
                imp.consumers.setdefault(t, []).append(i)
    _check_tensors(imp)
    for t in list(sg.inputs if sg.inputs is not None else []) + \
            list(sg.outputs if sg.outputs is not None else []):
        if not 0 <= t < n_tensors:
            raise imp.fail(f"graph input/output refers to tensor {t} of {n_tensors} "
                           "(corrupt file)")
    in_idx, out_idx = _boundary(imp)
    if not in_idx:
        raise imp.fail("the graph has no input")
    imp.int8 = _activation_kind(imp, in_idx)

    inputs: list[str] = []
    for t in in_idx:
        _check_input_shape(imp, t)
        inputs.append(imp.new_tensor(t))
    for i, op in enumerate(sg.operators):
        if i in imp.skip:
            continue
        _HANDLERS[imp.op_name(op)](imp, i, op)

    outputs: list[str] = []
    for t in out_idx:
        if t in imp.pending:
            _materialise_pad(imp, t)
        if t not in imp.values:
            raise imp.fail(f"graph output '{imp.names[t]}' is not computed by any operator")
        outputs.append(imp.values[t])
    graph = Graph(name=Path(source).stem or "model", tensors=imp.tensors, nodes=imp.nodes,
                  inputs=inputs, outputs=outputs,
                  input_layouts={n: LAYOUT_NHWC for n in inputs},
                  output_layouts={n: LAYOUT_NHWC for n in outputs},
                  notes=dict(sorted(imp.notes.items())))
    remove_dead_nodes(graph)
    if len(set(graph.inputs)) != len(graph.inputs) or set(graph.inputs) & set(graph.outputs):
        raise imp.fail("a graph output is a graph input; there is nothing to compute")

    quant = None
    if imp.int8:
        acts = {name: imp.tensor_quant(imp.origin[name], "activation tensor")
                for name in graph.tensors}
        weights = {n.name: imp.weights[n.name] for n in graph.nodes if n.name in imp.weights}
        quant = TfliteQuant(activations=acts, weights=weights,
                            inputs={n: acts[n] for n in graph.inputs},
                            outputs={n: acts[n] for n in graph.outputs},
                            boundary=list(imp.boundary))
    elif imp.boundary:
        raise imp.fail(f"{imp.where(imp.boundary[0].index)} in a float model")
    desc = model.description.decode("utf-8", "replace") if model.description else ""
    return TfliteModel(graph=graph, quant=quant, source=source, description=desc,
                       tensor_index={name: imp.origin[name] for name in graph.tensors})


def import_tflite(path: str | Path) -> TfliteModel:
    """Read a `.tflite` file into the IR, keeping an int8 model's quantisation parameters."""
    p = Path(path)
    if not p.exists():
        raise MpqError(f"{path}: no such file")
    if not p.is_file():
        raise MpqError(f"{path}: not a file")
    limits.check_model_file(p)
    try:
        data = p.read_bytes()
    except OSError as exc:
        raise MpqError(f"{path}: cannot read ({exc.strerror or exc})") from None
    return import_tflite_bytes(data, str(path))
