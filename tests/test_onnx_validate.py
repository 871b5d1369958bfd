"""Each bad-ONNX class the fuzzer found (mpq issue 12) is one `error:` line naming the node and
attribute or tensor; unnamed and duplicate node names, which real exporters write, are accepted."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import onnx
import onnx_builders as B
import pytest
from conftest import REPO, ort_run, random_input, rel_err, run_mpq
from onnx import TensorProto, helper, numpy_helper

from mpq.errors import MpqError
from mpq.frontend.onnx_import import import_model

sys.path.insert(0, str(REPO))
from tools.mpq_fuzz.mutate import set_attribute  # noqa: E402


def _set_attr(model: onnx.ModelProto, op: str, name: str, value) -> onnx.ModelProto:
    set_attribute(next(n for n in model.graph.node if n.op_type == op), name, value)
    return model


def _fails(model: onnx.ModelProto, *fragments: str) -> str:
    with pytest.raises(MpqError) as info:
        import_model(model, "m.onnx")
    message = str(info.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message, message
    return message


@pytest.mark.parametrize("attr, value, fragment", [
    ("strides", [0, 0], "strides=[0, 0] values must be ≥ 1"),
    ("strides", [1], "must have 2 values"),
    ("dilations", [-1, -1], "dilations=[-1, -1] values must be ≥ 1"),
    ("dilations", [], "must have 2 values"),
    ("kernel_shape", [3], "kernel_shape=[3] must have 2 values"),
    ("kernel_shape", [0, 0], "values must be ≥ 1"),
    ("pads", [1, 1], "pads=[1, 1] must have 4 values"),
    ("group", 0, "group=0 must be ≥ 1"),
    ("auto_pad", "SIDEWAYS", "auto_pad='SIDEWAYS' must be one of"),
])
def test_conv_attribute_values(attr: str, value, fragment: str) -> None:
    model = _set_attr(B.conv_pad_model((1, 1, 1, 1)), "Conv", attr, value)
    _fails(model, "node '/conv/Conv' (Conv): attribute", fragment)


def test_conv_kernel_shape_must_match_weights() -> None:
    model = _set_attr(B.conv_pad_model((1, 1, 1, 1)), "Conv", "kernel_shape", [5, 5])
    _fails(model, "'/conv/Conv' (Conv): kernel_shape [5, 5] contradicts the weight shape "
                  "[8, 4, 3, 3]")


def test_auto_pad_with_explicit_pads() -> None:
    model = _set_attr(B.conv_pad_model((1, 1, 1, 1)), "Conv", "auto_pad", "SAME_UPPER")
    _fails(model, "auto_pad=SAME_UPPER and explicit pads are given together")


def test_graph_without_outputs() -> None:
    model = B.conv_pad_model((0, 0, 0, 0))
    del model.graph.output[:]
    _fails(model, "m.onnx: the graph has no outputs")


def test_unknown_initializer_dtype_and_short_data() -> None:
    model = B.conv_pad_model((0, 0, 0, 0))
    model.graph.initializer[0].data_type = 99
    _fails(model, "initializer 'conv.weight' has element type unknown type 99")
    model = B.conv_pad_model((0, 0, 0, 0))
    model.graph.initializer[0].dims[0] = 1 << 40  # no data behind it: refused, not allocated
    _fails(model, "initializer 'conv.weight': its data holds 288 elements of FLOAT, its dims")


def test_invalid_utf8_name(tmp_path: Path) -> None:
    model = B.conv_pad_model((0, 0, 0, 0))
    model.graph.node[0].name = "@@MARK@@"
    data = model.SerializeToString().replace(b"@@MARK@@", b"\xc3\x28\xff\xfebad!")
    path = tmp_path / "bad.onnx"
    path.write_bytes(data)
    result = run_mpq("import", path, "-o", tmp_path / "out.onnx")
    assert result.returncode == 1 and result.stderr.count("\n") == 1, result.stderr
    assert "node #0 name is not valid UTF-8 text" in result.stderr


@pytest.mark.parametrize("attribute, fragment", [
    (None, "has no value"),
    (helper.make_attribute("value_string", "abc"), "holds strings"),
    (helper.make_attribute("sparse_value", helper.make_sparse_tensor(
        numpy_helper.from_array(np.array([1.0], np.float32), "v"),
        numpy_helper.from_array(np.array([0], np.int64), "i"), [4])), "sparse tensor"),
])
def test_malformed_constant(attribute, fragment: str) -> None:
    model = B.identity_constant_model()
    node = next(n for n in model.graph.node if n.op_type == "Constant")
    del node.attribute[:]
    if attribute is not None:
        node.attribute.append(attribute)
    _fails(model, f"Constant node '{node.name}' {fragment}" if attribute is None
           else fragment)


def test_transpose_with_wrong_perm() -> None:
    model = B.tf2onnx_style_model()
    _set_attr(model, "Transpose", "perm", [0, 3, 1])
    _fails(model, "(Transpose)", "perm")


def test_gemm_bias_and_batchnorm_lengths() -> None:
    model = B.mobilenet_v2(0.35, 32, num_classes=10)
    gemm = next(n for n in model.graph.node if n.op_type == "Gemm")
    bias = next(t for t in model.graph.initializer if t.name == gemm.input[2])
    bias.CopyFrom(numpy_helper.from_array(np.zeros(7, np.float32), bias.name))
    _fails(model, "(Gemm): bias shape [7] does not broadcast to the 10 outputs")

    model = B.batchnorm_standalone_model()
    bn = next(n for n in model.graph.node if n.op_type == "BatchNormalization")
    var = next(t for t in model.graph.initializer if t.name == bn.input[4])
    var.CopyFrom(numpy_helper.from_array(np.ones(3, np.float32), var.name))
    _fails(model, "(BatchNormalization): var has shape [3], the input", "has 8 channels")


def test_int32_conv_bias_is_refused_not_cast() -> None:
    model = B.conv_pad_model((0, 0, 0, 0))
    bias = next(t for t in model.graph.initializer if t.name == "conv.bias")
    bias.CopyFrom(numpy_helper.from_array(np.zeros(8, np.int32), "conv.bias"))
    _fails(model, "(Conv): bias 'conv.bias' is int32; it must be float32")


def test_negative_flatten_axis_counts_from_the_end() -> None:
    model = B.mobilenet_v2(0.35, 32, num_classes=10)
    _set_attr(model, "Flatten", "axis", -3)  # rank 4: axis 1, the usual flatten
    graph = import_model(model, "m.onnx")
    assert graph.tensors[graph.outputs[0]].shape == (1, 10)
    _set_attr(model, "Flatten", "axis", 5)
    _fails(model, "(Flatten): axis 5 is out of range for rank 4")


def test_unnamed_and_duplicate_nodes_are_renamed_and_run(tmp_path: Path) -> None:
    """Exporters leave names empty or repeat them: import them with unique derived names, and
    the normalised model still runs in onnxruntime with the original's outputs."""
    model = B.batchnorm_standalone_model()
    # conv1 "c" gets a fused Relu, which the writer would call "c/act": the MaxPool's name.
    names = ["c", "", "", "c/act", "dup", "dup", "dup"]
    for node, name in zip(model.graph.node, names, strict=False):
        node.name = name
    src = tmp_path / "names.onnx"
    src.write_bytes(model.SerializeToString())
    out = tmp_path / "names.mpq.onnx"
    result = run_mpq("import", src, "-o", out)
    assert result.returncode == 0, result.stderr
    assert "unnamed or duplicate node named ×" in result.stdout
    graph = import_model(onnx.load(out), "n")
    assert len({n.name for n in graph.nodes}) == len(graph.nodes)
    x = random_input(model)
    assert rel_err(ort_run(onnx.load(out), x), ort_run(B.batchnorm_standalone_model(), x)) < 1e-4
    result = run_mpq("inspect", src, "--json")
    assert result.returncode == 0, result.stderr


def test_value_named_like_a_derived_name(tmp_path: Path) -> None:
    """`v1__preact` and `conv/weight` exist already: the writer picks other derived names."""
    model = B.batchnorm_standalone_model()
    relu = next(n for n in model.graph.node if n.op_type == "Relu")
    conv = model.graph.node[0]
    old = conv.output[0]
    for n in model.graph.node:
        n.input[:] = [f"{relu.output[0]}__preact" if i == old else i for i in n.input]
    conv.output[0] = f"{relu.output[0]}__preact"
    src = tmp_path / "collide.onnx"
    src.write_bytes(model.SerializeToString())
    out = tmp_path / "collide.mpq.onnx"
    result = run_mpq("import", src, "-o", out)
    assert result.returncode == 0, result.stderr
    onnx.checker.check_model(onnx.load(out))
    x = random_input(model)
    assert rel_err(ort_run(onnx.load(out), x), ort_run(B.batchnorm_standalone_model(), x)) < 1e-4


def test_graph_output_declared_non_float() -> None:
    model = B.conv_pad_model((0, 0, 0, 0))
    model.graph.output[0].type.tensor_type.elem_type = TensorProto.UINT8
    _fails(model, "graph output 'output' is declared UINT8")


def test_clip_bound_near_float_max_saturates() -> None:
    """A finite Clip max of 3.4e38 (fuzzer case) divides to inf in float32: it saturates to the
    type's limit like an unbounded side instead of failing with an OverflowError."""
    import math
    import warnings

    from mpq.quant.arith import clamp_activation

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert clamp_activation(0.0, 3.4e38, 1e-3, -128, 8) == (-128, 127)
        assert clamp_activation(-3.4e38, 6.0, 1e-3, -128, 8) == (-128, 127)
        assert clamp_activation(-math.inf, math.inf, 0.05, 0, 8) == (-128, 127)
        assert clamp_activation(0.0, 6.0, 6.0 / 255, -128, 8) == (-128, 127)
        assert clamp_activation(0.0, 1.0, 6.0 / 255, -128, 8) == (-128, -128 + 43)


def test_overlong_name_is_refused_at_import() -> None:
    """Plans keep names of up to 4096 characters: a longer node name is refused at import,
    not after a search, by export reading the plan."""
    model = B.conv_pad_model((0, 0, 0, 0))
    model.graph.node[0].name = "n" * 5000
    _fails(model, "node #0 name is 5,000 characters long; mpq keeps names of up to 4,032")


def test_constant_graph_output() -> None:
    model = B.conv_pad_model((0, 0, 0, 0))
    model.graph.output.append(helper.make_tensor_value_info("conv.bias", TensorProto.FLOAT, [8]))
    _fails(model, "graph output 'conv.bias' is a constant")
