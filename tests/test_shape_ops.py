"""Structural ops of real detectors (issue 14 item 2): channel Pad (TFLite's residual
widening), standalone spatial Pad, Concat with a zero constant, Concat of Reshapes along any
axis (one quantisation through the views), Slice and Split — imported from ONNX against
onnxruntime, and a BlazeFace-like block through search → export → host C, byte for byte equal
to `mpq.sim`. (TFLite PAD/PADV2, CONCATENATION, SLICE, STRIDED_SLICE, SPLIT, SPLIT_V: the
single-op oracle in test_tflm_single_op.py; the kernel: test_c_kernels.py.)"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import ort_run, with_stack
from onnx import TensorProto, helper, numpy_helper

from mpq.boards import get_board
from mpq.codegen.export import render_export
from mpq.errors import MpqError
from mpq.frontend import load_model
from mpq.frontend.onnx_import import import_model
from mpq.frontend.onnx_writer import graph_to_onnx
from mpq.interpreter import from_ir_layout, run_graph, to_ir_layout
from mpq.ir import graph_fingerprint
from mpq.quant.calibrate import dataset_from_array, onnx_input_shape
from mpq.quant.qmodel import activation_quant
from mpq.search.driver import SearchOptions, search, tie_groups
from mpq.verify import verify


class _G:
    """A tiny onnx.helper graph builder with seeded weights."""

    def __init__(self, seed: int) -> None:
        self.rng = np.random.default_rng(seed)
        self.inits: list[onnx.TensorProto] = []
        self.nodes: list[onnx.NodeProto] = []

    def const(self, name: str, value: np.ndarray) -> str:
        self.inits.append(numpy_helper.from_array(value, name))
        return name

    def w(self, name: str, shape: tuple[int, ...], s: float = 0.3) -> str:
        return self.const(name, (self.rng.standard_normal(shape) * s).astype(np.float32))

    def i64(self, name: str, v: list[int]) -> str:
        return self.const(name, np.array(v, np.int64))

    def node(self, op: str, ins: list[str], out: str, **attrs) -> str:
        self.nodes.append(helper.make_node(op, ins, [out], name=out, **attrs))
        return out

    def conv(self, x: str, name: str, cin: int, cout: int, k: int = 3, stride: int = 1,
             pad: int = 1, s: float = 0.3) -> str:
        return self.node("Conv", [x, self.w(f"{name}_w", (cout, cin, k, k), s),
                                  self.w(f"{name}_b", (cout,))], name,
                         pads=[pad] * 4, strides=[stride] * 2)

    def model(self, in_shape: list[int], out: str, out_shape: list[int]) -> onnx.ModelProto:
        g = helper.make_graph(self.nodes, "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, in_shape)],
                              [helper.make_tensor_value_info(out, TensorProto.FLOAT,
                                                             out_shape)], self.inits)
        m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])
        m.ir_version = 8
        onnx.checker.check_model(m, full_check=True)
        return m


def blazeface_block(seed: int = 0) -> onnx.ModelProto:
    """BlazeFace's structure in miniature: a conv trunk, a residual whose skip is widened by a
    channel Pad (TFLite's idiom), a spatial Pad no conv absorbs (it feeds an Add), a Concat
    with zeros, two conv heads each Transpose'd and Reshape'd to [1, N, 16] and concatenated
    along axis 1, and a strided Slice of the result (one output)."""
    b = _G(seed)
    r1 = b.node("Relu", [b.conv("x", "c1", 3, 8, stride=2)], "r1")
    c2 = b.conv(r1, "c2", 8, 12)
    p1 = b.node("Pad", [r1, b.i64("pad_c", [0, 0, 0, 0, 0, 4, 0, 0])], "channel_padding")
    r2 = b.node("Relu", [b.node("Add", [c2, p1], "a1")], "r2")
    c3 = b.conv(r2, "c3", 12, 12, pad=0)
    p2 = b.node("Pad", [c3, b.i64("pad_s", [0, 0, 1, 1, 0, 0, 1, 1])], "spatial_padding")
    a2 = b.node("Add", [p2, r2], "a2")
    cz = b.node("Concat", [a2, b.const("zeros", np.zeros((1, 4, 8, 8), np.float32))],
                "concat_zeros", axis=1)
    heads = []
    for name, cout, k, stride in (("h1", 4, 1, 1), ("h2", 16, 3, 2)):
        h = b.conv(cz, name, 16, cout, k=k, stride=stride, pad=k // 2, s=0.1)
        t = b.node("Transpose", [h], f"{name}_nhwc", perm=[0, 2, 3, 1])
        heads.append(b.node("Reshape", [t, b.i64(f"{name}_shape", [1, -1, 16])],
                            f"{name}_flat"))
    cat = b.node("Concat", heads, "regressors", axis=1)
    b.node("Slice", [cat, b.i64("st", [0, 0]), b.i64("en", [1000, 12]), b.i64("ax", [1, 2]),
                     b.i64("sp", [2, 1])], "y")
    return b.model([1, 3, 16, 16], "y", [1, 16, 12])


def split_model(seed: int = 1) -> onnx.ModelProto:
    """Split of channels into three parts (one unused), Pad before a MaxPool of a tensor that
    can be negative (zero padding is then not max-pool padding) and before an AveragePool
    (padding taps are counted), a Slice with negative start, a Concat with a constant that
    is not zeros (quantised with the concat's output parameters)."""
    b = _G(seed)
    c = b.conv("x", "c", 3, 10)
    b.nodes.append(helper.make_node("Split", [c, b.i64("sizes", [3, 5, 2])], ["s0", "s1", "s2"],
                                    name="split", axis=1))
    p = b.node("Pad", ["s0", b.i64("pp", [0, 0, 1, 1, 0, 0, 1, 1])], "pad_before_pool")
    m = b.node("MaxPool", [p], "mp", kernel_shape=[3, 3])
    q = b.node("Pad", ["s1", b.i64("pq", [0, 0, 1, 1, 0, 0, 1, 1])], "pad_before_avg")
    a = b.node("AveragePool", [q], "ap", kernel_shape=[3, 3])
    s = b.node("Slice", [a, b.i64("st", [-3]), b.i64("en", [5]), b.i64("ax", [1])], "last3")
    k = b.const("anchors", np.linspace(-2, 3, 36, dtype=np.float32).reshape(1, 1, 6, 6))
    b.node("Concat", [m, k, s], "y", axis=1)
    return b.model([1, 3, 6, 6], "y", [1, 7, 6, 6])


@pytest.mark.parametrize("build", [blazeface_block, split_model])
def test_onnx_import_matches_onnxruntime(build) -> None:
    model = build()
    graph = import_model(model)
    ops = {n.op for n in graph.nodes}
    assert {"pad", "slice"} <= ops
    x = np.random.default_rng(2).standard_normal((1, *onnx_input_shape(graph))).astype(
        np.float32)
    ref = ort_run(model, x)
    name = graph.inputs[0]
    ours = from_ir_layout(graph, graph.outputs[0],
                          run_graph(graph, {name: to_ir_layout(graph, name, x)})[
                              graph.outputs[0]])
    assert ours.shape == ref.shape
    np.testing.assert_allclose(ours, ref, atol=1e-5)
    # The normalised ONNX mpq writes (calibration runs it in onnxruntime) computes the same
    # and imports back into the same graph.
    normalised = graph_to_onnx(graph)
    np.testing.assert_allclose(ort_run(normalised, x), ref, atol=1e-5)
    assert graph_fingerprint(import_model(normalised)) == graph_fingerprint(graph)


def test_blazeface_block_imports_as_expected() -> None:
    graph = import_model(blazeface_block())
    by = {n.name: n for n in graph.nodes}
    assert by["channel_padding"].attrs["pads"] == ((0, 0), (0, 0), (0, 0), (0, 4))
    assert by["spatial_padding"].attrs["pads"] == ((0, 0), (1, 1), (1, 1), (0, 0))
    assert by["concat_zeros"].op == "pad"  # Concat with zeros: a pad of the channels
    assert by["regressors"].op == "concat" and by["regressors"].attrs["axis"] == 1
    assert by["y"].attrs == {"starts": (0, 0, 0), "steps": (1, 2, 1)}


def test_concat_of_reshapes_shares_one_quantisation() -> None:
    """The heads' producers, their reshapes and the concat output carry one (scale, zp) from
    the union range — the reshape no longer overwrites it with its producer's — and the
    search ties exactly those tensors."""
    graph = import_model(blazeface_block())
    ranges = {t: (-1.0 - i, 1.0 + i) for i, t in enumerate(graph.tensors)}
    acts = activation_quant(graph, ranges)
    members = ["h1", "h1_flat", "h2", "h2_flat", "regressors", "y"]
    assert len({acts[t] for t in members}) == 1
    lo = min(ranges[t][0] for t in ("h1", "h2", "regressors"))
    hi = max(ranges[t][1] for t in ("h1", "h2", "regressors"))
    assert acts["y"].scale == pytest.approx((hi - lo) / 255, rel=1e-6)
    group = next(g for g in tie_groups(graph) if "regressors" in g)
    assert set(group) == set(members)


def test_refusals_are_one_line() -> None:
    b = _G(0)
    c = b.conv("x", "c", 3, 4)
    b.node("Slice", [c, b.i64("st", [3]), b.i64("en", [0]), b.i64("ax", [2]),
                     b.i64("sp", [-1])], "y")
    with pytest.raises(MpqError, match="only positive steps"):
        import_model(b.model([1, 3, 4, 4], "y", [1, 4, 3, 4]))


@pytest.mark.parametrize("build, sram", [(blazeface_block, None), (blazeface_block, 3000),
                                         (split_model, None)])
def test_search_export_host_bit_exact(tmp_path: Path, build, sram: int | None) -> None:
    """Search (int8, and a budget that forces 4-bit maps through the pads and the concat of
    zeros), export, build on the host: every output byte equals mpq.sim."""
    path = tmp_path / "blaze.onnx"
    path.write_bytes(build().SerializeToString())
    graph = load_model(path)
    rng = np.random.default_rng(3)
    x = rng.random((32, *onnx_input_shape(graph))).astype(np.float32)
    res = search(path, graph, get_board("nano33ble"), dataset_from_array(x, "blaze"),
                 SearchOptions(strategy="int8" if sram is None else "exact", patches="none",
                               sram=with_stack(graph, sram), io="external"))
    bits = {t.name: t.bits for t in res.plan.tensors}
    if sram is not None:
        assert bits["channel_padding"] < 8 and bits["r1"] == bits["channel_padding"]
    result = verify(res.plan, graph, x[:8], "host")
    assert result.samples == 8 and result.mismatches == 0
    # The cmsis-nn backend keeps the portable block copies for them (CMSIS-NN has no pad,
    # slice or general concat), and says why.
    report = json.loads(render_export(res.plan, graph, "cmsis-nn")["mpq_report.json"])
    for layer in report["layers"]:
        if layer["call"] == "mpq_copy_block":
            assert layer["backend"] == "portable" and "no CMSIS-NN kernel" in layer["reason"]
    assert sum(layer["call"] == "mpq_copy_block" for layer in report["layers"]) >= 2


def test_tflite_int8_chain_byte_identical_to_tflm() -> None:
    """An int8 .tflite chaining the structural ops as BlazeFace's tail does — PAD of channels,
    SPLIT with both parts used, each RESHAPE'd to [1, N, k], CONCATENATION along axis 1 with a
    zero constant, STRIDED_SLICE — imported with its own quantisation: mpq.sim equals TFLM's
    reference kernels byte for byte."""
    pytest.importorskip("tflite_micro")
    import tflite_builders as tb
    from test_tflm_single_op import mpq_quant_model, tflm_outputs

    from mpq.sim import run_int

    q = tb.QParams(0.05, -7)
    w = tb.TfliteWriter()
    x = w.activation("x", (1, 4, 4, 3), q)
    pads = w.tensor("pads", (4, 2), tb.T_INT32,
                    data=np.array([[0, 0], [0, 0], [0, 0], [0, 1]], np.int32))
    p = w.activation("padded", (1, 4, 4, 4), q)
    w.op(tb.OP.PAD, [x, pads], [p], tb.OPT.PadOptions, tb.FB.PadOptionsT())
    axis = w.tensor("axis", (1,), tb.T_INT32, data=np.array([3], np.int32))
    halves = [w.activation(f"half{k}", (1, 4, 4, 2), q) for k in range(2)]
    so = tb.FB.SplitOptionsT()
    so.numSplits = 2
    w.op(tb.OP.SPLIT, [axis, p], halves, tb.OPT.SplitOptions, so)
    flat = []
    for k, h in enumerate(halves):
        shape = w.tensor(f"shape{k}", (3,), tb.T_INT32, data=np.array([1, 8, 4], np.int32))
        f = w.activation(f"flat{k}", (1, 8, 4), q)
        ro = tb.FB.ReshapeOptionsT()
        ro.newShape = [1, 8, 4]
        w.op(tb.OP.RESHAPE, [h, shape], [f], tb.OPT.ReshapeOptions, ro)
        flat.append(f)
    zeros = w.tensor("zeros", (1, 2, 4), tb.T_INT8, [q.scale], [q.zero_point],
                     data=np.full((1, 2, 4), q.zero_point, np.int8))
    cat = w.activation("cat", (1, 18, 4), q)
    co = tb.FB.ConcatenationOptionsT()
    co.axis = 1
    w.op(tb.OP.CONCATENATION, [flat[0], zeros, flat[1]], [cat], tb.OPT.ConcatenationOptions,
         co)
    ss = [w.tensor(n, (3,), tb.T_INT32, data=np.array(v, np.int32))
          for n, v in (("b", [0, 1, 0]), ("e", [1, -1, 3]), ("s", [1, 2, 1]))]
    y = w.activation("y", (1, 8, 3), q)
    w.op(tb.OP.STRIDED_SLICE, [cat, *ss], [y], tb.OPT.StridedSliceOptions,
         tb.FB.StridedSliceOptionsT())
    data = w.finish([x], [y])
    qm = mpq_quant_model(data, "chain.tflite")
    assert [n.op for n in qm.graph.nodes] == ["pad", "slice", "slice", "reshape", "reshape",
                                              "pad", "concat", "slice"]
    xs = np.random.default_rng(0).integers(-128, 128, (6, 1, 4, 4, 3))
    theirs = tflm_outputs(data, [xs.reshape(6, 4, 4, 3).astype(np.int8)])
    ours = run_int(qm, {qm.graph.inputs[0]: xs.reshape(6, 4, 4, 3)})[qm.graph.outputs[0]]
    assert np.array_equal(ours, theirs)
