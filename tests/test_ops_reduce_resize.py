"""ReduceMean / MEAN, Resize / Upsample (nearest) and Conv1D, from import to firmware.

Import: each ONNX form against onnxruntime in float, plus the normalised-ONNX round trip
(`test_import.check_model`). The int8 arithmetic against TFLM is in test_tflm_single_op.py
(MEAN, RESIZE_NEAREST_NEIGHBOR), the C kernels against mpq.sim in test_c_kernels.py. Here:
a small network conv → Resize ×2 → conv → ReduceMean over H, W → Gemm, and a Conv1D network,
through search (int8 and a tight SRAM budget) → export → host C byte-identical to mpq.sim, and
once under QEMU (Cortex-M4).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
import tflite_builders as tb
from conftest import ort_run
from onnx import TensorProto, helper, numpy_helper
from test_bad_input import import_fails
from test_export import _plan, _random
from test_import import check_model

from mpq.errors import MpqError
from mpq.frontend import load_model
from mpq.frontend.onnx_import import import_model
from mpq.verify import verify

RNG = np.random.default_rng(7)


def _w(name: str, shape: tuple[int, ...], scale: float = 0.3) -> onnx.TensorProto:
    return numpy_helper.from_array((RNG.standard_normal(shape) * scale).astype(np.float32), name)


def _model(nodes: list, inits: list, x_shape: list, opset: int = 13,
           y_shape: list | None = None) -> onnx.ModelProto:
    """One-input model with a symbolic batch; output 'y' (its shape where a file needs it)."""
    g = helper.make_graph(nodes, "t", [helper.make_tensor_value_info(
        "x", TensorProto.FLOAT, ["N", *x_shape[1:]])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, y_shape)], initializer=inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])
    m.ir_version = 8
    return m


def _conv_then(node: onnx.NodeProto, extra: list, x_shape: list, opset: int = 13
               ) -> onnx.ModelProto:
    """Conv 3×3 (3 → 4 channels, pads 1) into `node`, which reads 'c' and writes 'y'."""
    conv = helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1])
    return _model([conv, node], [_w("w", (4, x_shape[1], 3, 3)), *extra], x_shape, opset)


def _x(shape: tuple[int, ...], batch: int = 2) -> np.ndarray:
    return RNG.standard_normal((batch, *shape[1:])).astype(np.float32)


# -- import against onnxruntime ------------------------------------------------------------------

@pytest.mark.parametrize("axes,keepdims", [([2, 3], 1), ([2, 3], 0), ([-1, -2], 1), ([1], 1),
                                           ([1], 0), ([3], 1), ([1, 2, 3], 1), ([1, 2, 3], 0)])
def test_reduce_mean_attribute_axes(axes: list[int], keepdims: int) -> None:
    node = helper.make_node("ReduceMean", ["c"], ["y"], axes=axes, keepdims=keepdims)
    check_model(_conv_then(node, [], [1, 3, 6, 5]), _x((1, 3, 6, 5)))


def test_reduce_mean_axes_input_opset18_and_nhwc_layout() -> None:
    axes = numpy_helper.from_array(np.array([2, 3], np.int64), "axes")
    node = helper.make_node("ReduceMean", ["c", "axes"], ["y"], keepdims=1)
    model = _conv_then(node, [axes], [1, 3, 6, 5], opset=18)
    check_model(model, _x((1, 3, 6, 5)))
    assert [n.op for n in import_model(model).nodes] == ["conv2d", "mean"]
    # tf2onnx style: the value is NHWC (after a Transpose), reduced over axes 1, 2.
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]),
             helper.make_node("Transpose", ["c"], ["t"], perm=[0, 2, 3, 1]),
             helper.make_node("ReduceMean", ["t"], ["y"], axes=[1, 2], keepdims=0)]
    check_model(_model(nodes, [_w("w", (4, 3, 3, 3))], [1, 3, 6, 5]), _x((1, 3, 6, 5)))


@pytest.mark.parametrize("transform", ["half_pixel", "pytorch_half_pixel", "align_corners",
                                       "asymmetric", "tf_half_pixel_for_nn"])
@pytest.mark.parametrize("nearest", ["round_prefer_floor", "round_prefer_ceil", "floor", "ceil"])
def test_resize_nearest_modes(transform: str, nearest: str) -> None:
    """×2 by scales, 1.5×2.6 by scales, and 9×13 by sizes (batch 1: sizes pin it)."""
    for shape, how, value in (((1, 3, 4, 4), "scales", [1, 1, 2, 2]),
                              ((1, 3, 5, 7), "scales", [1, 1, 1.5, 2.6]),
                              ((1, 3, 5, 7), "sizes", [1, 4, 9, 13])):
        if how == "scales":
            const = numpy_helper.from_array(np.array(value, np.float32), "s")
            inputs = ["c", "", "s"]
        else:
            const = numpy_helper.from_array(np.array(value, np.int64), "s")
            inputs = ["c", "", "", "s"]
        node = helper.make_node("Resize", inputs, ["y"], mode="nearest",
                                coordinate_transformation_mode=transform, nearest_mode=nearest)
        check_model(_conv_then(node, [const], list(shape)),
                    _x(shape, 1 if how == "sizes" else 2))


def test_upsample_opset7_and_opset9() -> None:
    node = helper.make_node("Upsample", ["c"], ["y"], mode="nearest", scales=[1.0, 1.0, 2.0, 3.0])
    check_model(_conv_then(node, [], [1, 3, 4, 5], opset=7), _x((1, 3, 4, 5)))
    scales = numpy_helper.from_array(np.array([1, 1, 2, 2], np.float32), "s")
    node = helper.make_node("Upsample", ["c", "s"], ["y"], mode="nearest")
    check_model(_conv_then(node, [scales], [1, 3, 4, 5], opset=9), _x((1, 3, 4, 5)))


@pytest.mark.parametrize("transform", ["half_pixel", "pytorch_half_pixel", "align_corners",
                                       "asymmetric"])
def test_resize_linear_as_tflite_bilinear(transform: str) -> None:
    """×2 and ×0.5 by scales, 9×13 by sizes; Upsample linear (opset 7) too."""
    for shape, how, value in (((1, 3, 4, 4), "scales", [1, 1, 2, 2]),
                              ((1, 3, 6, 6), "scales", [1, 1, 0.5, 0.5]),
                              ((1, 3, 5, 7), "sizes", [1, 4, 9, 13])):
        dtype = np.float32 if how == "scales" else np.int64
        const = numpy_helper.from_array(np.array(value, dtype), "s")
        inputs = ["c", "", "s"] if how == "scales" else ["c", "", "", "s"]
        node = helper.make_node("Resize", inputs, ["y"], mode="linear",
                                coordinate_transformation_mode=transform)
        model = _conv_then(node, [const], list(shape))
        check_model(model, _x(shape, 1 if how == "sizes" else 2))
        assert import_model(model).nodes[-1].attrs["mode"] == "bilinear"
    node = helper.make_node("Upsample", ["c"], ["y"], mode="linear", scales=[1.0, 1.0, 2.0, 2.0])
    check_model(_conv_then(node, [], [1, 3, 4, 5], opset=7), _x((1, 3, 4, 5)))


def _conv1d_model() -> onnx.ModelProto:
    """Conv1d(k5, s2) + BatchNorm + ReLU → MaxPool1d → grouped dilated Conv1d → AvgPool1d →
    Flatten → Gemm, on an NCW [1, 2, 32] signal (PyTorch's export of a 1-D CNN)."""
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], kernel_shape=[5], strides=[2],
                         pads=[2, 2]),
        helper.make_node("BatchNormalization", ["c1", "g", "b", "m", "v"], ["bn"]),
        helper.make_node("Relu", ["bn"], ["r1"]),
        helper.make_node("MaxPool", ["r1"], ["p1"], kernel_shape=[3], strides=[2], pads=[1, 1]),
        helper.make_node("Conv", ["p1", "w2"], ["c2"], kernel_shape=[3], dilations=[2], group=2,
                         pads=[2, 2]),
        helper.make_node("AveragePool", ["c2"], ["p2"], kernel_shape=[2], strides=[2]),
        helper.make_node("Flatten", ["p2"], ["f"]),
        helper.make_node("Gemm", ["f", "fw", "fb"], ["y"], transB=1)]
    var = numpy_helper.from_array((np.abs(RNG.standard_normal(8)) + 0.5).astype(np.float32), "v")
    inits = [_w("w1", (8, 2, 5)), _w("b1", (8,), 0.1), _w("g", (8,)), _w("b", (8,)),
             _w("m", (8,)), var, _w("w2", (6, 4, 3)), _w("fw", (5, 24)), _w("fb", (5,))]
    return _model(nodes, inits, [1, 2, 32], y_shape=["N", 5])


def test_conv1d_imports_as_2d() -> None:
    model = _conv1d_model()
    check_model(model, _x((1, 2, 32), 3))
    g = import_model(model)
    assert g.input_layouts == {"x": "ncw"} and g.tensors["x"].shape == (1, 1, 32, 2)
    assert [(n.op, n.attrs.get("kernel")) for n in g.nodes][:4] == [
        ("conv2d", (1, 5)), ("max_pool", (1, 3)), ("conv2d", (1, 3)), ("avg_pool", (1, 2))]
    # A 1-D output stays NCW for the user.
    conv = helper.make_node("Conv", ["x", "w"], ["y"], kernel_shape=[5], pads=[2, 2])
    out_ncw = _model([conv], [_w("w", (8, 2, 5))], [1, 2, 16])
    check_model(out_ncw, _x((1, 2, 16), 3))
    assert import_model(out_ncw).output_layouts == {"y": "ncw"}


@pytest.mark.parametrize("node,fragment", [
    (helper.make_node("Resize", ["c", "", "s"], ["y"], mode="cubic"),
     "(Resize): only modes 'nearest' and 'linear' are supported, got 'cubic'"),
    (helper.make_node("Resize", ["c", "", "s"], ["y"], mode="linear",
                      coordinate_transformation_mode="tf_half_pixel_for_nn"),
     "linear resizing is supported with coordinate_transformation_mode align_corners"),
    (helper.make_node("Resize", ["c", "", "s"], ["y"], mode="nearest",
                      coordinate_transformation_mode="tf_crop_and_resize"),
     "coordinate_transformation_mode 'tf_crop_and_resize'"),
    (helper.make_node("ReduceMean", ["c"], ["y"], axes=[4]), "axes value 4 is out of range"),
    (helper.make_node("ReduceMean", ["c"], ["y"], axes=[0, 2, 3]), "average over the batch"),
    (helper.make_node("ReduceMean", ["c"], ["y"], axes=[3], keepdims=0),
     "keepdims=0 over axes [3] would reorder the data"),
])
def test_unsupported_forms_fail_in_one_line(node: onnx.NodeProto, fragment: str,
                                            tmp_path: Path) -> None:
    """Forms mpq does not take are named in one line (once through `mpq import`)."""
    scales = numpy_helper.from_array(np.array([1, 1, 2, 2], np.float32), "s")
    model = _conv_then(node, [scales] if node.op_type == "Resize" else [], [1, 3, 4, 4])
    with pytest.raises(MpqError) as info:
        import_model(model, "m.onnx")
    assert fragment in str(info.value) and "\n" not in str(info.value)
    if node.attribute[0].s == b"cubic":  # once through the CLI: one line, exit 1
        for d in ("N", "C", "H", "W"):  # a file needs a shaped output (rank only)
            model.graph.output[0].type.tensor_type.shape.dim.add().dim_param = d
        path = tmp_path / "m.onnx"
        path.write_bytes(model.SerializeToString())
        import_fails(tmp_path, path, fragment)


def _float_resize_tflite(kind: str, x_shape: tuple[int, ...], size: tuple[int, int],
                         align: bool, hpc: bool) -> bytes:
    """A float32 one-op RESIZE_NEAREST_NEIGHBOR / RESIZE_BILINEAR .tflite."""
    w = tb.TfliteWriter()
    f32 = tb.FB.TensorType.FLOAT32
    x = w.tensor("x", x_shape, f32)
    s = w.tensor("size", (2,), tb.T_INT32, data=np.asarray(size, np.int32))
    y = w.tensor("y", (1, *size, x_shape[3]), f32)
    if kind == "bilinear":
        o, code, opt = tb.FB.ResizeBilinearOptionsT(), tb.OP.RESIZE_BILINEAR, \
            tb.OPT.ResizeBilinearOptions
    else:
        o, code, opt = tb.FB.ResizeNearestNeighborOptionsT(), tb.OP.RESIZE_NEAREST_NEIGHBOR, \
            tb.OPT.ResizeNearestNeighborOptions
    o.alignCorners, o.halfPixelCenters = align, hpc
    w.op(code, [x, s], [y], opt, o)
    return w.finish([x], [y])


def test_float_tflite_resize_matches_tflm_and_onnxruntime() -> None:
    """Float RESIZE_* through mpq's interpreter equal TFLM's float kernels exactly; the
    normalised ONNX (what calibration runs in onnxruntime) agrees to float rounding."""
    pytest.importorskip("tflite_micro")
    from tflite_micro.python.tflite_micro import runtime

    from mpq.frontend.onnx_writer import graph_to_onnx
    from mpq.frontend.tflite_import import import_tflite_bytes
    from mpq.interpreter import run_graph

    rng = np.random.default_rng(3)
    for i in range(36):
        h, w, c = (int(v) for v in rng.integers(1, 6, 3))
        size = (2 * h, 2 * w) if i % 2 else tuple(int(v) for v in rng.integers(1, 12, 2))
        align, hpc = [(False, False), (True, False), (False, True)][i % 3]
        kind = "bilinear" if i % 4 < 2 else "nearest"
        data = _float_resize_tflite(kind, (1, h, w, c), size, align, hpc)
        x = rng.standard_normal((1, h, w, c)).astype(np.float32)
        interp = runtime.Interpreter.from_bytes(data)
        interp.set_input(x, 0)
        interp.invoke()
        graph = import_tflite_bytes(data).graph
        ours = run_graph(graph, {graph.inputs[0]: x})[graph.outputs[0]]
        assert np.array_equal(ours, np.array(interp.get_output(0))), (kind, size, align, hpc)
        onnx_y = ort_run(graph_to_onnx(graph), x)
        assert np.abs(onnx_y - ours).max() <= 1e-5, (kind, size, align, hpc)


# -- end to end ----------------------------------------------------------------------------------

def updown_model(mode: str = "nearest") -> onnx.ModelProto:
    """conv(s2) + ReLU → Resize ×2 (nearest or linear) → conv + ReLU → ReduceMean(H, W) →
    Gemm."""
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1], strides=[2, 2]),
        helper.make_node("Relu", ["c1"], ["r1"]),
        helper.make_node("Resize", ["r1", "", "sc"], ["up"], mode=mode,
                         coordinate_transformation_mode="asymmetric" if mode == "nearest"
                         else "half_pixel", nearest_mode="floor"),
        helper.make_node("Conv", ["up", "w2", "b2"], ["c2"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c2"], ["r2"]),
        helper.make_node("ReduceMean", ["r2"], ["m"], axes=[2, 3], keepdims=0),
        helper.make_node("Gemm", ["m", "fw", "fb"], ["y"], transB=1)]
    inits = [_w("w1", (8, 3, 3, 3)), _w("b1", (8,), 0.1), _w("w2", (12, 8, 3, 3), 0.2),
             _w("b2", (12,), 0.1), _w("fw", (10, 12)), _w("fb", (10,), 0.1),
             numpy_helper.from_array(np.array([1, 1, 2, 2], np.float32), "sc")]
    return _model(nodes, inits, [1, 3, 16, 16], y_shape=["N", 10])


@pytest.mark.parametrize("mode,sram", [("nearest", None), ("nearest", 3500), ("linear", 3500)])
def test_resize_and_mean_network_bit_exact_on_host(tmp_path: Path, mode: str,
                                                   sram: int | None) -> None:
    model = updown_model(mode).SerializeToString()
    (tmp_path / "probe.onnx").write_bytes(model)
    graph = load_model(tmp_path / "probe.onnx")
    assert [n.op for n in graph.nodes] == ["conv2d", "resize", "conv2d", "mean", "reshape",
                                           "fully_connected"]
    plan, graph, _ = _plan(tmp_path, model, "updown", _random(graph, 32), sram=sram)
    bits = {t.name: t.bits for t in plan.tensors}
    if sram is not None:  # the budget forces sub-byte maps through the resize and the mean
        assert bits["up"] == bits["r1"] < 8 and bits["r2"] < 8
    result = verify(plan, graph, _random(graph, 8), "host")
    assert result.samples == 8 and result.mismatches == 0


def test_conv1d_network_bit_exact_on_host(tmp_path: Path) -> None:
    model = _conv1d_model().SerializeToString()
    (tmp_path / "probe.onnx").write_bytes(model)
    graph = load_model(tmp_path / "probe.onnx")
    plan, graph, _ = _plan(tmp_path, model, "conv1d", _random(graph, 32))
    assert verify(plan, graph, _random(graph, 8), "host").mismatches == 0


def test_resize_and_mean_network_under_qemu(tmp_path: Path) -> None:
    if shutil.which("arm-none-eabi-gcc") is None or shutil.which("qemu-system-arm") is None:
        if os.environ.get("CI"):
            pytest.fail("cross tools missing in CI")
        pytest.skip("arm-none-eabi-gcc / qemu-system-arm not installed (see .ci/run)")
    model = updown_model().SerializeToString()
    (tmp_path / "probe.onnx").write_bytes(model)
    graph = load_model(tmp_path / "probe.onnx")
    plan, graph, _ = _plan(tmp_path, model, "updown", _random(graph, 32), sram=3500)
    result = verify(plan, graph, _random(graph, 3), "qemu-m4")
    assert result.samples == 3 and result.mismatches == 0
