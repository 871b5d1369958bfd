"""ONNX import: every supported pattern becomes the NHWC IR and computes what the model does.

Two checks per model: the IR's float interpreter against onnxruntime on the original model,
and the normalised ONNX written by `graph_to_onnx` against the original (≤ 1e-4 of the output
range), plus that re-importing the normalised ONNX gives the same IR.
"""

from __future__ import annotations

import math

import numpy as np
import onnx
import onnx_builders as B
import pytest
from conftest import SHARED_ONNX, ort_run, random_input, rel_err, shared_model

from mpq.frontend.onnx_import import import_model, load_onnx
from mpq.frontend.onnx_writer import graph_to_onnx
from mpq.interpreter import from_ir_layout, run_graph, to_ir_layout

TOL = 1e-4


def interpret(graph, x: np.ndarray) -> np.ndarray:
    name = graph.inputs[0]
    y = run_graph(graph, {name: to_ir_layout(graph, name, x)})[graph.outputs[0]]
    return from_ir_layout(graph, graph.outputs[0], y)


def same_ir(a, b) -> bool:
    if [(n.name, n.op, n.inputs, n.outputs) for n in a.nodes] != \
            [(n.name, n.op, n.inputs, n.outputs) for n in b.nodes]:
        return False
    for na, nb in zip(a.nodes, b.nodes, strict=True):
        if na.attrs != nb.attrs:
            return False
        for wa, wb in ((na.weight, nb.weight), (na.bias, nb.bias)):
            if (wa is None) != (wb is None) or (wa is not None and not np.array_equal(wa, wb)):
                return False
    return a.input_layouts == b.input_layouts and a.outputs == b.outputs


def check_model(model: onnx.ModelProto, x: np.ndarray) -> None:
    """Interpreter and normalised ONNX both reproduce onnxruntime on the original model."""
    ref = ort_run(model, x)
    graph = import_model(model, "test")
    assert rel_err(interpret(graph, x), ref) <= TOL
    normalised = graph_to_onnx(graph)
    assert rel_err(ort_run(normalised, x), ref) <= TOL
    assert same_ir(import_model(normalised, "normalised"), graph)


@pytest.mark.parametrize("key", sorted(SHARED_ONNX))
def test_shared_models(key: str) -> None:
    path = shared_model(SHARED_ONNX[key])
    model = load_onnx(path)
    scale = 255.0 if key == "resnet8" else 1.0
    check_model(model, random_input(model, batch=3, scale=scale))


def test_shared_model_structure() -> None:
    """tf2onnx's input Transpose disappears, Relu fuses, MatMul+Add becomes one FC layer."""
    graph = import_model(load_onnx(shared_model("vww_96_float.onnx")), "vww")
    kinds = [n.kind for n in graph.nodes]
    assert kinds.count("depthwise") == 13
    assert kinds[-3:] == ["reshape", "fully_connected", "softmax"]
    assert graph.input_layouts == {"input_1": "nhwc"}
    assert graph.tensors["input_1"].shape == (1, 96, 96, 3)
    first = graph.nodes[0]
    assert first.attrs["pads"] == (0, 0, 1, 1)  # TF SAME with stride 2 stays asymmetric
    assert first.act == "relu"
    kws = import_model(load_onnx(shared_model("kws_ref_model_fp32.onnx")), "kws")
    assert kws.nodes[0].attrs["pads"] == (4, 1, 5, 1)
    assert kws.nodes[0].inputs == ["serving_default_input_1:0"]  # the Reshape was a no-op


@pytest.mark.parametrize("kwargs", [{}, {"fold_bn": True}, {"layout": "nhwc"},
                                    {"layout": "nhwc", "same_pads": True}])
def test_mobilenet_v2_pytorch_and_tf_styles(kwargs: dict) -> None:
    model = B.mobilenet_v2(0.35, 96, num_classes=10, **kwargs)
    check_model(model, random_input(model, batch=2))
    graph = import_model(model, "mbv2")
    assert not any(n.op_type == "BatchNormalization" for n in graph_to_onnx(graph).graph.node)
    assert sum(n.act == "relu6" for n in graph.nodes) == 35
    assert sum(n.op == "add" for n in graph.nodes) == 10


@pytest.mark.parametrize("pads", [(0, 0, 1, 1), (1, 0, 0, 2), (2, 1, 0, 0), (0, 3, 2, 1)])
@pytest.mark.parametrize("stride", [1, 2])
def test_asymmetric_pads_kept_exact(pads: tuple, stride: int) -> None:
    model = B.conv_pad_model(list(pads), stride=stride)
    check_model(model, random_input(model))
    assert import_model(model, "m").nodes[0].attrs["pads"] == pads


@pytest.mark.parametrize("pads", [(1, 1, 1, 1), (0, 2, 1, 0)])
def test_pad_folded_into_conv(pads: tuple) -> None:
    model = B.pad_then_conv_model(list(pads))
    check_model(model, random_input(model))
    graph = import_model(model, "m")
    assert [n.op for n in graph.nodes] == ["conv2d"]
    assert graph.nodes[0].attrs["pads"] == pads


def test_pad_folded_into_maxpool_after_relu() -> None:
    model = B.pad_then_maxpool_model()
    check_model(model, random_input(model))
    assert "Pad folded" in import_model(model, "m").notes


def test_identity_and_constant_nodes_resolved() -> None:
    model = B.identity_constant_model()
    check_model(model, random_input(model))
    notes = import_model(model, "m").notes
    assert notes.get("Constant resolved", 0) > 0 and notes.get("Identity removed", 0) > 0


def test_standalone_batchnorm_and_relu() -> None:
    model = B.batchnorm_standalone_model()
    check_model(model, random_input(model))
    graph = import_model(model, "m")
    assert graph.notes["BatchNormalization folded"] == 2
    assert [n.act for n in graph.nodes if n.op == "conv2d"] == ["relu", "relu6"]


def test_grouped_dilated_depthwise_multiplier() -> None:
    model = B.grouped_dilated_model()
    check_model(model, random_input(model))
    kinds = [n.kind for n in import_model(model, "m").nodes]
    assert "grouped_conv" in kinds and "depthwise" in kinds


def test_concat_avgpool_and_nchw_flatten_into_gemm() -> None:
    """Flatten of an NCHW map with H,W > 1 reorders the FC weights, not the data."""
    model = B.concat_model()
    check_model(model, random_input(model))
    ops = [n.op for n in import_model(model, "m").nodes]
    assert "concat" in ops and ops[-1] == "softmax"


def test_tf2onnx_and_kws_styles() -> None:
    for model in (B.tf2onnx_style_model(), B.kws_style_model()):
        check_model(model, random_input(model))
        graph = import_model(model, "m")
        assert graph.input_layouts[graph.inputs[0]] == "nhwc"


def test_symbolic_batch_set_to_one() -> None:
    model = B.mobilenet_v2(0.35, 64, num_classes=10)
    graph = import_model(model, "m")
    assert graph.tensors[graph.inputs[0]].shape == (1, 64, 64, 3)
    assert all(t.shape[0] == 1 for t in graph.tensors.values())


def test_normalised_onnx_is_deterministic() -> None:
    model = B.mobilenet_v2(0.35, 64, num_classes=10)
    a = graph_to_onnx(import_model(model, "m")).SerializeToString()
    b = graph_to_onnx(import_model(model, "m")).SerializeToString()
    assert a == b


def test_fused_activations_are_exact_clamps() -> None:
    graph = import_model(B.mobilenet_v2(0.35, 64, num_classes=10), "m")
    relu6 = [n for n in graph.nodes if n.act == "relu6"]
    assert relu6 and all(n.attrs["act_min"] == 0.0 and n.attrs["act_max"] == 6.0 for n in relu6)
    last = graph.nodes[-1]
    assert last.op == "fully_connected" and last.attrs.get("act_max", math.inf) == math.inf
