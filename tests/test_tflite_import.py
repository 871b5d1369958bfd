"""TFLite import: `.tflite` flatbuffers become the same NHWC IR as ONNX, int8 models keep their
own quantisation parameters.

Checks: each float MLPerf Tiny `.tflite` run by the IR's float interpreter matches its ONNX
conversion in onnxruntime (≤ 1e-4 of the output range); each int8 `.tflite` imports with the
float model's structure, quantisation for every tensor and weighted node, and its dequantised
graph agrees with TensorFlow Lite Micro running the int8 model; small hand-built models cover
the ops and paddings the shared models lack (PAD, CONCATENATION, MAX_POOL_2D, SAME with odd
sizes and dilation, depth multiplier 2, QUANTIZE/DEQUANTIZE at the boundary) against TFLM; and
every kind of bad input gives one MpqError line naming the file.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from conftest import ort_run, rel_err, shared_model

pytest.importorskip("tflite_micro")

import flatbuffers  # noqa: E402  (installed with tflite-micro)
from tflite_micro.python.tflite_micro import runtime  # noqa: E402

import mpq.frontend.tflite_import as tfl  # noqa: E402
from mpq.errors import MpqError  # noqa: E402
from mpq.frontend.tflite_import import TfliteModel, import_tflite, import_tflite_bytes  # noqa: E402
from mpq.interpreter import run_graph  # noqa: E402
from mpq.ir import LAYOUT_NHWC  # noqa: E402

TOL = 1e-4
FB = tfl.schema()
OP = FB.BuiltinOperator
OPT = FB.BuiltinOptions
T_FLOAT32, T_FLOAT16, T_INT32, T_INT8 = 0, 1, 2, 9
SAME, VALID = 0, 1
NONE, RELU, RELU6, TANH_ACT = 0, 1, 3, 4

# float .tflite → (ONNX conversion, input scale); int8 .tflite → its float counterpart
FLOAT_MODELS = {
    "pretrainedResnet.tflite": ("pretrainedResnet.onnx", 255.0),
    "vww_96_float.tflite": ("vww_96_float.onnx", 1.0),
    "kws_ref_model_fp32.tflite": ("kws_ref_model_fp32.onnx", 1.0),
    "ad01_fp32.tflite": ("ad01_fp32.onnx", 1.0),
}
INT8_MODELS = {
    "pretrainedResnet_quant.tflite": "pretrainedResnet.tflite",
    "vww_96_int8.tflite": "vww_96_float.tflite",
    "kws_ref_model.tflite": "kws_ref_model_fp32.tflite",
    "ad01_int8.tflite": "ad01_fp32.tflite",
}


def interpret(graph, x: np.ndarray) -> np.ndarray:
    return run_graph(graph, {graph.inputs[0]: np.ascontiguousarray(x, np.float32)})[
        graph.outputs[0]]


def tflm_run(model: Path | bytes, xs: np.ndarray) -> np.ndarray:
    """TFLM output 0 for each sample of `xs` (one invoke per sample)."""
    interp = (runtime.Interpreter.from_file(str(model)) if isinstance(model, Path)
              else runtime.Interpreter.from_bytes(model))
    outs = []
    for k in range(len(xs)):
        interp.set_input(xs[k:k + 1], 0)
        interp.invoke()
        outs.append(np.array(interp.get_output(0)))
    return np.concatenate(outs)


def structure(m: TfliteModel) -> list[tuple]:
    g = m.graph
    return [(n.name, n.kind, n.attrs, None if n.weight is None else n.weight.shape,
             [g.tensors[t].shape for t in n.inputs], g.tensors[n.outputs[0]].shape)
            for n in g.nodes]


# -- shared models ---------------------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(FLOAT_MODELS))
def test_float_models_match_onnx(name: str) -> None:
    onnx_name, scale = FLOAT_MODELS[name]
    m = import_tflite(shared_model(name))
    assert m.quant is None
    g = m.graph
    assert g.input_layouts == {g.inputs[0]: LAYOUT_NHWC}
    shape = g.tensors[g.inputs[0]].shape
    x = (np.random.default_rng(0).random((3, *shape[1:])) * scale).astype(np.float32)
    ref = ort_run(shared_model(onnx_name), x)
    assert rel_err(interpret(g, x), ref) <= TOL


def test_float_structure_and_names() -> None:
    m = import_tflite(shared_model("kws_ref_model_fp32.tflite"))
    g = m.graph
    assert g.inputs == ["serving_default_input_1:0"]
    assert g.outputs == ["StatefulPartitionedCall:0"]
    assert [n.name for n in g.nodes][:3] == ["conv_2d_0", "depthwise_conv_2d_1", "conv_2d_2"]
    first = g.nodes[0]
    assert first.attrs["pads"] == (4, 1, 5, 1)  # TFLite SAME: the extra row/column at the end
    assert first.act == "relu"
    assert [n.kind for n in g.nodes][-4:] == ["avg_pool", "reshape", "fully_connected",
                                              "softmax"]
    assert all(m.tensor_index[t] >= 0 for t in g.tensors)
    vww = import_tflite(shared_model("vww_96_float.tflite")).graph
    assert [n.kind for n in vww.nodes].count("depthwise") == 13
    assert vww.nodes[0].attrs["pads"] == (0, 0, 1, 1)  # SAME, stride 2, even input


def _check_quant(m: TfliteModel) -> None:
    q = m.quant
    g = m.graph
    assert q is not None
    assert set(q.activations) == set(g.tensors)
    for tq in q.activations.values():
        assert isinstance(tq.scale, np.float32) and tq.scale > 0
        assert isinstance(tq.zero_point, int) and -128 <= tq.zero_point <= 127
    weighted = [n for n in g.nodes if n.op in ("conv2d", "fully_connected")]
    assert weighted and set(q.weights) == {n.name for n in weighted}
    for n in weighted:
        wq = q.weights[n.name]
        cout = n.weight.shape[0]
        assert wq.weight.dtype == np.int8 and wq.weight.shape == n.weight.shape
        assert wq.weight.min() >= -127 and wq.weight.max() <= 127
        assert wq.scale.dtype == np.float32 and wq.scale.shape == (cout,)
        assert wq.bias.dtype == np.int32 and wq.bias.shape == (cout,)
        shape = (cout,) + (1,) * (wq.weight.ndim - 1)
        deq = (wq.scale.astype(np.float64).reshape(shape) * wq.weight).astype(np.float32)
        np.testing.assert_array_equal(n.weight, deq)
        s_in = float(q.activations[n.inputs[0]].scale)
        np.testing.assert_allclose(n.bias, s_in * wq.scale.astype(np.float64) * wq.bias,
                                   rtol=1e-6, atol=0)
    assert set(q.inputs) == set(g.inputs) and set(q.outputs) == set(g.outputs)


@pytest.mark.parametrize("name", sorted(INT8_MODELS))
def test_int8_models(name: str) -> None:
    path = shared_model(name)
    m = import_tflite(path)
    g = m.graph
    _check_quant(m)
    assert structure(m) == structure(import_tflite(shared_model(INT8_MODELS[name])))
    assert any(wq.per_channel for wq in m.quant.weights.values()) or name.startswith("ad01")

    interp = runtime.Interpreter.from_file(str(path))
    for details, tq in ((interp.get_input_details(0), m.quant.inputs[g.inputs[0]]),
                        (interp.get_output_details(0), m.quant.outputs[g.outputs[0]])):
        qp = details["quantization_parameters"]
        assert qp["scales"].tolist() == [tq.scale] and qp["zero_points"].tolist() == \
            [tq.zero_point]

    iq, oq = m.quant.inputs[g.inputs[0]], m.quant.outputs[g.outputs[0]]
    shape = g.tensors[g.inputs[0]].shape
    if name.startswith("kws"):  # real MFCC clips, already quantised for this model
        xq = np.load(shared_model("kws01_mfcc_int8_1000.npz"))["x"][:50]
    else:
        xq = np.random.default_rng(1).integers(-128, 128, (50, *shape[1:])).astype(np.int8)
    ref = (tflm_run(path, xq).astype(np.float32) - oq.zero_point) * oq.scale
    x = (xq.astype(np.float32) - iq.zero_point) * iq.scale
    y = interpret(g, x)
    if name.startswith("ad01"):  # an autoencoder: compare the reconstruction itself
        span = float(np.ptp(ref))
        assert float(np.abs(y - ref).mean()) <= 0.05 * span
        assert np.corrcoef(y.ravel(), ref.ravel())[0, 1] >= 0.95
    else:
        assert float((y.argmax(1) == ref.argmax(1)).mean()) >= 0.9


# -- hand-built models -------------------------------------------------------------------------

class ModelBuilder:
    """A minimal `.tflite` writer over the schema's object API (for tests only)."""

    def __init__(self) -> None:
        self.tensors: list = []
        self.buffers: list = [FB.BufferT()]
        self.ops: list = []
        self.codes: list[int] = []

    def tensor(self, name: str, shape: tuple[int, ...], data: np.ndarray | None = None,
               dtype: int = T_FLOAT32, scale: list[float] | None = None,
               zero_point: list[int] | None = None, axis: int = 0) -> int:
        t = FB.TensorT()
        t.name, t.shape, t.type = name, list(shape), dtype
        buf = FB.BufferT()
        if data is not None:
            buf.data = np.frombuffer(np.ascontiguousarray(data).tobytes(), np.uint8)
        self.buffers.append(buf)
        t.buffer = len(self.buffers) - 1
        if scale is not None:
            q = FB.QuantizationParametersT()
            q.scale = list(scale)
            q.zeroPoint = list(zero_point if zero_point is not None else [0] * len(scale))
            q.quantizedDimension = axis
            t.quantization = q
        self.tensors.append(t)
        return len(self.tensors) - 1

    def const(self, name: str, data: np.ndarray, **kw) -> int:
        dtype = {np.dtype(np.float32): T_FLOAT32, np.dtype(np.int32): T_INT32,
                 np.dtype(np.int8): T_INT8, np.dtype(np.float16): T_FLOAT16}[data.dtype]
        return self.tensor(name, data.shape, data, dtype, **kw)

    def op(self, code: int, inputs: list[int], outputs: list[int], options_type: int = 0,
           options=None) -> None:
        if code not in self.codes:
            self.codes.append(code)
        o = FB.OperatorT()
        o.opcodeIndex = self.codes.index(code)
        o.inputs, o.outputs = inputs, outputs
        o.builtinOptionsType, o.builtinOptions = options_type, options
        self.ops.append(o)

    def build(self, inputs: list[int], outputs: list[int]) -> bytes:
        sg = FB.SubGraphT()
        sg.tensors, sg.operators, sg.inputs, sg.outputs = self.tensors, self.ops, inputs, outputs
        sg.name = "main"
        m = FB.ModelT()
        m.version = 3
        m.subgraphs = [sg]
        m.buffers = self.buffers
        m.operatorCodes = []
        for code in self.codes:
            oc = FB.OperatorCodeT()
            oc.builtinCode, oc.deprecatedBuiltinCode, oc.version = code, min(code, 127), 1
            m.operatorCodes.append(oc)
        b = flatbuffers.Builder(1024)
        b.Finish(m.Pack(b), file_identifier=b"TFL3")
        return bytes(b.Output())


def conv_opts(padding: int, stride: tuple[int, int], act: int = NONE,
              dilation: tuple[int, int] = (1, 1)):
    o = FB.Conv2DOptionsT()
    o.padding, o.strideH, o.strideW, o.fusedActivationFunction = padding, *stride, act
    o.dilationHFactor, o.dilationWFactor = dilation
    return o


def dw_opts(padding: int, stride: tuple[int, int], mult: int, act: int = NONE,
            dilation: tuple[int, int] = (1, 1)):
    o = FB.DepthwiseConv2DOptionsT()
    o.padding, o.strideH, o.strideW, o.fusedActivationFunction = padding, *stride, act
    o.depthMultiplier = mult
    o.dilationHFactor, o.dilationWFactor = dilation
    return o


def pool_opts(padding: int, kernel: tuple[int, int], stride: tuple[int, int], act: int = NONE):
    o = FB.Pool2DOptionsT()
    o.padding, o.filterHeight, o.filterWidth = padding, *kernel
    o.strideH, o.strideW, o.fusedActivationFunction = *stride, act
    return o


def fc_opts(act: int = NONE):
    o = FB.FullyConnectedOptionsT()
    o.fusedActivationFunction = act
    return o


def act_opts(cls: str, act: int):
    o = getattr(FB, cls)()
    o.fusedActivationFunction = act
    return o


def zoo_model(seed: int = 0) -> bytes:
    """Every supported float op, odd sizes, SAME pads with stride 2 and dilation 2."""
    rng = np.random.default_rng(seed)

    def w(*shape: int) -> np.ndarray:
        return (rng.standard_normal(shape) * 0.4).astype(np.float32)

    mb = ModelBuilder()
    x = mb.tensor("x", (1, 9, 11, 3))
    pads = mb.const("pads", np.array([[0, 0], [1, 2], [2, 1], [0, 0]], np.int32))
    p = mb.tensor("padded", (1, 12, 14, 3))
    mb.op(OP.PAD, [x, pads], [p], OPT.PadOptions, FB.PadOptionsT())
    c1 = mb.tensor("c1", (1, 10, 12, 6))
    mb.op(OP.CONV_2D, [p, mb.const("w1", w(6, 3, 3, 3)), mb.const("b1", w(6))], [c1],
          OPT.Conv2DOptions, conv_opts(VALID, (1, 1), RELU6))
    d1 = mb.tensor("d1", (1, 5, 6, 12))
    mb.op(OP.DEPTHWISE_CONV_2D, [c1, mb.const("w2", w(1, 3, 3, 12)), mb.const("b2", w(12))],
          [d1], OPT.DepthwiseConv2DOptions, dw_opts(SAME, (2, 2), 2, RELU))
    c2 = mb.tensor("c2", (1, 5, 6, 12))
    mb.op(OP.CONV_2D, [d1, mb.const("w3", w(12, 2, 3, 12)), mb.const("b3", w(12))], [c2],
          OPT.Conv2DOptions, conv_opts(SAME, (1, 1), NONE, (2, 2)))
    a = mb.tensor("a", (1, 5, 6, 12))
    mb.op(OP.ADD, [d1, c2], [a], OPT.AddOptions, act_opts("AddOptionsT", RELU))
    pads2 = mb.const("pads2", np.array([[0, 0], [1, 1], [1, 1], [0, 0]], np.int32))
    ap = mb.tensor("a_padded", (1, 7, 8, 12))
    mb.op(OP.PAD, [a, pads2], [ap], OPT.PadOptions, FB.PadOptionsT())
    mp = mb.tensor("mp", (1, 3, 3, 12))
    mb.op(OP.MAX_POOL_2D, [ap], [mp], OPT.Pool2DOptions, pool_opts(VALID, (3, 3), (2, 2)))
    av = mb.tensor("av", (1, 3, 3, 12))
    mb.op(OP.AVERAGE_POOL_2D, [a], [av], OPT.Pool2DOptions, pool_opts(SAME, (3, 3), (2, 2)))
    cat = mb.tensor("cat", (1, 3, 3, 24))
    co = FB.ConcatenationOptionsT()
    co.axis = -1
    mb.op(OP.CONCATENATION, [mp, av], [cat], OPT.ConcatenationOptions, co)
    flat = mb.tensor("flat", (1, 216))
    ro = FB.ReshapeOptionsT()
    ro.newShape = [1, 216]
    mb.op(OP.RESHAPE, [cat, mb.const("shape", np.array([1, 216], np.int32))], [flat],
          OPT.ReshapeOptions, ro)
    f = mb.tensor("f", (1, 10))
    mb.op(OP.FULLY_CONNECTED, [flat, mb.const("wf", w(10, 216)), mb.const("bf", w(10))], [f],
          OPT.FullyConnectedOptions, fc_opts(RELU))
    y = mb.tensor("y", (1, 10))
    so = FB.SoftmaxOptionsT()
    so.beta = 1.0
    mb.op(OP.SOFTMAX, [f], [y], OPT.SoftmaxOptions, so)
    return mb.build([x], [y])


def test_zoo_model_matches_tflm() -> None:
    data = zoo_model()
    m = import_tflite_bytes(data, "zoo.tflite")
    g = m.graph
    assert m.quant is None
    assert [(n.name, n.kind) for n in g.nodes] == [
        ("conv_2d_1", "conv2d"), ("depthwise_conv_2d_2", "depthwise"), ("conv_2d_3", "conv2d"),
        ("add_4", "add"), ("max_pool_2d_6", "max_pool"), ("average_pool_2d_7", "avg_pool"),
        ("concatenation_8", "concat"), ("reshape_9", "reshape"),
        ("fully_connected_10", "fully_connected"), ("softmax_11", "softmax")]
    by = {n.name: n for n in g.nodes}
    assert by["conv_2d_1"].attrs["pads"] == (1, 2, 2, 1) and by["conv_2d_1"].act == "relu6"
    assert by["conv_2d_1"].inputs == ["x"]  # the PAD folded away
    dw = by["depthwise_conv_2d_2"]
    assert dw.attrs["pads"] == (0, 0, 1, 1) and dw.attrs["groups"] == 6
    assert dw.weight.shape == (12, 3, 3, 1)
    # SAME with dilation 2: effective kernel 3x5 → pads (1, 2, 1, 2)
    assert by["conv_2d_3"].attrs["pads"] == (1, 2, 1, 2)
    assert by["max_pool_2d_6"].attrs["pads"] == (1, 1, 1, 1)
    assert by["average_pool_2d_7"].attrs["pads"] == (1, 0, 1, 1)  # W: 6 → 3, total 1
    assert by["concatenation_8"].attrs["axis"] == 3
    assert g.notes["PAD folded"] == 2
    x = np.random.default_rng(3).standard_normal((8, 1, 9, 11, 3)).astype(np.float32)
    ref = np.concatenate([tflm_run(data, xi) for xi in x])
    assert rel_err(interpret(g, x[:, 0]), ref) <= TOL


def test_fc_on_rank4_input_gets_a_flatten_and_no_bias() -> None:
    mb = ModelBuilder()
    x = mb.tensor("x", (1, 4, 4, 2))
    pooled = mb.tensor("pooled", (1, 1, 1, 2))
    mb.op(OP.AVERAGE_POOL_2D, [x], [pooled], OPT.Pool2DOptions, pool_opts(VALID, (4, 4), (4, 4)))
    y = mb.tensor("y", (1, 3))
    wf = np.arange(6, dtype=np.float32).reshape(3, 2) - 2.5
    mb.op(OP.FULLY_CONNECTED, [pooled, mb.const("wf", wf), -1], [y], OPT.FullyConnectedOptions,
          fc_opts())
    data = mb.build([x], [y])
    g = import_tflite_bytes(data, "fc.tflite").graph
    assert [n.name for n in g.nodes] == ["average_pool_2d_0", "fully_connected_1_flatten",
                                         "fully_connected_1"]
    assert g.tensors[g.nodes[1].outputs[0]].shape == (1, 2)
    np.testing.assert_array_equal(g.nodes[2].bias, np.zeros(3, np.float32))
    x = np.random.default_rng(4).standard_normal((4, 1, 4, 4, 2)).astype(np.float32)
    ref = np.concatenate([tflm_run(data, xi) for xi in x])
    assert rel_err(interpret(g, x[:, 0]), ref) <= TOL


def int8_boundary_model() -> tuple[bytes, dict]:
    """float → QUANTIZE → int8 conv (per-channel) and depthwise (per-tensor) → DEQUANTIZE."""
    rng = np.random.default_rng(5)
    s_in, zp_in, s_mid, zp_mid, s_out, zp_out = 0.02, -10, 0.03, -128, 0.05, 3
    w1 = rng.integers(-127, 128, (4, 3, 3, 2)).astype(np.int8)
    s_w1 = (rng.random(4) * 0.004 + 0.001).astype(np.float32)
    b1 = rng.integers(-2000, 2000, 4).astype(np.int32)
    w2 = rng.integers(-127, 128, (1, 3, 3, 4)).astype(np.int8)
    s_w2 = np.float32(0.004)
    b2 = rng.integers(-500, 500, 4).astype(np.int32)
    mb = ModelBuilder()
    xf = mb.tensor("x_float", (1, 6, 7, 2))
    xq = mb.tensor("x_int8", (1, 6, 7, 2), dtype=T_INT8, scale=[s_in], zero_point=[zp_in])
    mb.op(OP.QUANTIZE, [xf], [xq], OPT.QuantizeOptions, FB.QuantizeOptionsT())
    h = mb.tensor("h", (1, 6, 7, 4), dtype=T_INT8, scale=[s_mid], zero_point=[zp_mid])
    mb.op(OP.CONV_2D, [xq, mb.const("w1", w1, scale=s_w1.tolist(), zero_point=[0] * 4),
                       mb.const("b1", b1, scale=(s_in * s_w1.astype(np.float64)).tolist(),
                                zero_point=[0] * 4)],
          [h], OPT.Conv2DOptions, conv_opts(SAME, (1, 1), RELU))
    yq = mb.tensor("y_int8", (1, 3, 4, 4), dtype=T_INT8, scale=[s_out], zero_point=[zp_out])
    mb.op(OP.DEPTHWISE_CONV_2D, [h, mb.const("w2", w2, scale=[float(s_w2)], axis=3),
                                 mb.const("b2", b2, scale=[s_mid * float(s_w2)])],
          [yq], OPT.DepthwiseConv2DOptions, dw_opts(SAME, (2, 2), 1))
    yf = mb.tensor("y_float", (1, 3, 4, 4))
    mb.op(OP.DEQUANTIZE, [yq], [yf], OPT.DequantizeOptions, FB.DequantizeOptionsT())
    params = {"s_in": s_in, "zp_in": zp_in, "s_out": s_out, "zp_out": zp_out, "w1": w1,
              "s_w1": s_w1, "b1": b1, "w2": w2, "b2": b2}
    return mb.build([xf], [yf]), params


def test_int8_boundary_quantize_dequantize() -> None:
    data, p = int8_boundary_model()
    m = import_tflite_bytes(data, "q.tflite")
    g, q = m.graph, m.quant
    assert g.inputs == ["x_int8"] and g.outputs == ["y_int8"]
    assert [(b.op, b.index, b.outer, b.inner, b.dtype) for b in q.boundary] == [
        ("QUANTIZE", 0, "x_float", "x_int8", "float32"),
        ("DEQUANTIZE", 3, "y_float", "y_int8", "float32")]
    _check_quant(m)
    assert q.inputs["x_int8"].scale == np.float32(p["s_in"])
    assert q.inputs["x_int8"].zero_point == p["zp_in"]
    assert q.outputs["y_int8"].zero_point == p["zp_out"]
    conv, dw = q.weights["conv_2d_1"], q.weights["depthwise_conv_2d_2"]
    assert conv.per_channel and not dw.per_channel
    np.testing.assert_array_equal(conv.weight, p["w1"])
    np.testing.assert_array_equal(conv.scale, p["s_w1"])
    np.testing.assert_array_equal(conv.bias, p["b1"])
    np.testing.assert_array_equal(dw.weight, p["w2"][0].transpose(2, 0, 1)[..., None])
    np.testing.assert_array_equal(dw.scale, np.full(4, 0.004, np.float32))
    np.testing.assert_array_equal(dw.bias, p["b2"])
    # TFLM on float inputs that are exact int8 values; the float graph is within one output step.
    xq = np.random.default_rng(6).integers(-128, 128, (20, 1, 6, 7, 2))
    x = ((xq - p["zp_in"]) * p["s_in"]).astype(np.float32)
    ref = np.concatenate([tflm_run(data, xi) for xi in x])
    y = interpret(g, x[:, 0])
    assert float(np.abs(y - ref).max()) <= 1.01 * p["s_out"]


# -- bad input ---------------------------------------------------------------------------------

def _one_line_error(path: Path, *fragments: str) -> str:
    with pytest.raises(MpqError) as info:
        import_tflite(path)
    msg = str(info.value)
    assert "\n" not in msg and str(path) in msg
    for f in fragments:
        assert f in msg, msg
    return msg


def test_missing_and_directory(tmp_path: Path) -> None:
    _one_line_error(tmp_path / "nope.tflite", "no such file")
    _one_line_error(tmp_path, "not a file")


def test_not_a_flatbuffer(tmp_path: Path) -> None:
    bad = tmp_path / "text.tflite"
    bad.write_text("this is certainly not a neural network\n")
    _one_line_error(bad, "not a TFLite flatbuffer")
    empty = tmp_path / "empty.tflite"
    empty.write_bytes(b"")
    _one_line_error(empty, "empty file")
    short = tmp_path / "short.tflite"
    short.write_bytes(b"\x01\x02")
    _one_line_error(short, "too short")


def test_wrong_file_identifier(tmp_path: Path) -> None:
    data = bytearray(shared_model("kws_ref_model.tflite").read_bytes())
    data[4:8] = b"ABCD"
    bad = tmp_path / "ident.tflite"
    bad.write_bytes(bytes(data))
    _one_line_error(bad, "file identifier 'ABCD'", "expected 'TFL3'")


@pytest.mark.parametrize("fraction", [0.0005, 0.1, 0.5, 0.95, 0.9999])
def test_truncated(tmp_path: Path, fraction: float) -> None:
    data = shared_model("vww_96_int8.tflite").read_bytes()
    bad = tmp_path / "cut.tflite"
    bad.write_bytes(data[:max(8, int(len(data) * fraction))])
    _one_line_error(bad, "truncated")


def test_unsupported_op(tmp_path: Path) -> None:
    mb = ModelBuilder()
    x = mb.tensor("x", (1, 4))
    h = mb.tensor("h", (1, 4))
    mb.op(OP.SOFTMAX, [x], [h], OPT.SoftmaxOptions, FB.SoftmaxOptionsT(beta=1.0))
    y = mb.tensor("y", (1, 4))
    mb.op(OP.EXP, [h], [y])
    bad = tmp_path / "exp.tflite"
    bad.write_bytes(mb.build([x], [y]))
    msg = _one_line_error(bad, "operator 1 (EXP) is not supported", "supported ops:")
    for op in ("CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED", "PAD", "QUANTIZE"):
        assert op in msg


def test_unsupported_fused_activation(tmp_path: Path) -> None:
    mb = ModelBuilder()
    x = mb.tensor("x", (1, 4))
    y = mb.tensor("y", (1, 2))
    mb.op(OP.FULLY_CONNECTED, [x, mb.const("w", np.ones((2, 4), np.float32)), -1], [y],
          OPT.FullyConnectedOptions, fc_opts(TANH_ACT))
    bad = tmp_path / "act.tflite"
    bad.write_bytes(mb.build([x], [y]))
    _one_line_error(bad, "operator 0 (FULLY_CONNECTED)", "fused activation TANH")


def test_float16_weights(tmp_path: Path) -> None:
    mb = ModelBuilder()
    x = mb.tensor("x", (1, 4, 4, 1))
    w16 = mb.const("w16", np.ones((2, 1, 1, 1), np.float16))
    w = mb.tensor("w", (2, 1, 1, 1))
    mb.op(OP.DEQUANTIZE, [w16], [w])
    y = mb.tensor("y", (1, 4, 4, 2))
    mb.op(OP.CONV_2D, [x, w, -1], [y], OPT.Conv2DOptions, conv_opts(VALID, (1, 1)))
    bad = tmp_path / "fp16.tflite"
    bad.write_bytes(mb.build([x], [y]))
    _one_line_error(bad, "'w16' is float16")


def test_requantize_inside_the_model(tmp_path: Path) -> None:
    mb = ModelBuilder()
    x = mb.tensor("x", (1, 4), dtype=T_INT8, scale=[0.1], zero_point=[0])
    h = mb.tensor("h", (1, 4), dtype=T_INT8, scale=[0.1], zero_point=[0])
    mb.op(OP.SOFTMAX, [x], [h], OPT.SoftmaxOptions, FB.SoftmaxOptionsT(beta=1.0))
    y = mb.tensor("y", (1, 4), dtype=T_INT8, scale=[0.2], zero_point=[1])
    mb.op(OP.QUANTIZE, [h], [y])
    bad = tmp_path / "requant.tflite"
    bad.write_bytes(mb.build([x], [y]))
    _one_line_error(bad, "operator 1 (QUANTIZE)", "only directly after a graph input")


def test_missing_tflite_micro(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(tfl, "SCHEMA_MODULE", "no_such_package_mpq.schema")
    monkeypatch.setattr(tfl, "SCHEMA_PACKAGE", "no_such_package_mpq")
    tfl.schema.cache_clear()
    try:
        with pytest.raises(MpqError, match="pip install tflite-micro"):
            import_tflite(shared_model("kws_ref_model.tflite"))
    finally:
        monkeypatch.undo()
        tfl.schema.cache_clear()
    assert tfl.schema() is not None


def test_schema_fallback_loads_the_file_directly(monkeypatch: pytest.MonkeyPatch) -> None:
    """If `tflite_micro`'s own import fails, the schema file is still loaded by path."""
    monkeypatch.setattr(tfl, "SCHEMA_MODULE", "no_such_package_mpq.schema")
    mod = tfl._load_schema(tfl.SCHEMA_MODULE, tfl.SCHEMA_PACKAGE)
    assert mod.BuiltinOperator.CONV_2D == 3
    assert math.isfinite(mod.ActivationFunctionType.RELU6)


def test_corrupted_bytes_give_mpq_errors_only() -> None:
    """Random byte flips in a real model: either it still imports or one MpqError line."""
    base = shared_model("kws_ref_model.tflite").read_bytes()
    rng = np.random.default_rng(7)
    failures = 0
    for _ in range(150):
        data = bytearray(base)
        for _ in range(int(rng.integers(1, 4))):
            pos = int(rng.integers(8, 4096) if rng.random() < 0.5
                      else rng.integers(len(data) - 6000, len(data)))
            data[pos] = int(rng.integers(0, 256))
        try:
            import_tflite_bytes(bytes(data), "fuzz.tflite")
        except MpqError as exc:
            failures += 1
            assert "\n" not in str(exc) and str(exc).startswith("fuzz.tflite: ")
    assert failures > 0



@pytest.mark.parametrize("scales", [[0.25], [0.1, 0.2, 0.3]])
def test_weight_only_quantised_model_dequantize_folds(scales: list[float]) -> None:
    """DEQUANTIZE of an int8 constant (weight-only quantisation) folds into float weights.

    Per-channel scales follow TFLite's PerChannelDequantize; TFLM's DEQUANTIZE reads only the
    first scale, so it is the oracle for the per-tensor case only.
    """
    mb = ModelBuilder()
    x = mb.tensor("x", (1, 5))
    wq = np.arange(-7, 8, dtype=np.int8).reshape(3, 5)
    w8 = mb.const("w_int8", wq, scale=scales, axis=0)
    w = mb.tensor("w", (3, 5))
    mb.op(OP.DEQUANTIZE, [w8], [w])
    y = mb.tensor("y", (1, 3))
    mb.op(OP.FULLY_CONNECTED, [x, w, mb.const("b", np.ones(3, np.float32))], [y],
          OPT.FullyConnectedOptions, fc_opts())
    data = mb.build([x], [y])
    m = import_tflite_bytes(data, "wq.tflite")
    assert m.quant is None and [n.name for n in m.graph.nodes] == ["fully_connected_1"]
    assert m.graph.notes == {"DEQUANTIZE of a constant folded": 1}
    expected = wq * np.array(scales, np.float32).reshape(-1, 1)
    np.testing.assert_allclose(m.graph.nodes[0].weight, expected, rtol=1e-6)
    if len(scales) == 1:
        xs = np.random.default_rng(8).standard_normal((4, 1, 5)).astype(np.float32)
        ref = np.concatenate([tflm_run(data, xi) for xi in xs])
        assert rel_err(interpret(m.graph, xs[:, 0]), ref) <= TOL
