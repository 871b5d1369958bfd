"""The seed models the fuzzer mutates: small, valid, and each exercising different import paths.

Built in code with onnx.helper (no test helpers, no shared models) plus the shipped Fashion
example, so the fuzzer runs from a bare checkout. Sizes stay tiny (8×8 inputs, a few channels)
so that a mutated case that imports cleanly can also go through `mpq search` and `mpq export`
in well under a second.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

FASHION = Path(__file__).resolve().parents[2] / "examples" / "fashion" / "fashion_cnn.onnx"


def _init(name: str, array: np.ndarray) -> onnx.TensorProto:
    return numpy_helper.from_array(array, name)


def _model(nodes: list, inputs: list, outputs: list, inits: list, name: str) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, name, inputs, outputs, initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)],
                              producer_name="mpq_fuzz")
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


def cnn_nchw() -> onnx.ModelProto:
    """PyTorch-style: Conv+BatchNorm+Relu, MaxPool, strided Conv+Clip, GAP, Flatten, Gemm,
    Softmax."""
    rng = np.random.default_rng(1)
    f = np.float32
    inits = [
        _init("conv1.weight", rng.normal(0, 0.3, (4, 3, 3, 3)).astype(f)),
        _init("conv1.bias", rng.normal(0, 0.1, 4).astype(f)),
        _init("bn1.scale", rng.uniform(0.5, 1.5, 4).astype(f)),
        _init("bn1.shift", rng.normal(0, 0.1, 4).astype(f)),
        _init("bn1.mean", rng.normal(0, 0.1, 4).astype(f)),
        _init("bn1.var", rng.uniform(0.5, 1.5, 4).astype(f)),
        _init("conv2.weight", rng.normal(0, 0.3, (8, 4, 3, 3)).astype(f)),
        _init("clip.min", np.array(0.0, f)),
        _init("clip.max", np.array(6.0, f)),
        _init("fc.weight", rng.normal(0, 0.3, (10, 8)).astype(f)),
        _init("fc.bias", rng.normal(0, 0.1, 10).astype(f)),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "conv1.weight", "conv1.bias"], ["c1"], name="/conv1/Conv",
                         kernel_shape=[3, 3], pads=[1, 1, 1, 1], strides=[1, 1],
                         dilations=[1, 1], group=1),
        helper.make_node("BatchNormalization", ["c1", "bn1.scale", "bn1.shift", "bn1.mean",
                                                "bn1.var"], ["b1"], name="/bn1/BN",
                         epsilon=1e-5),
        helper.make_node("Relu", ["b1"], ["r1"], name="/relu1/Relu"),
        helper.make_node("MaxPool", ["r1"], ["p1"], name="/pool/MaxPool", kernel_shape=[2, 2],
                         strides=[2, 2], pads=[0, 0, 0, 0]),
        helper.make_node("Conv", ["p1", "conv2.weight"], ["c2"], name="/conv2/Conv",
                         kernel_shape=[3, 3], pads=[1, 1, 1, 1], strides=[2, 2]),
        helper.make_node("Clip", ["c2", "clip.min", "clip.max"], ["r2"], name="/clip/Clip"),
        helper.make_node("GlobalAveragePool", ["r2"], ["g"], name="/gap/GAP"),
        helper.make_node("Flatten", ["g"], ["flat"], name="/flatten/Flatten", axis=1),
        helper.make_node("Gemm", ["flat", "fc.weight", "fc.bias"], ["logits"], name="/fc/Gemm",
                         transB=1, alpha=1.0, beta=1.0),
        helper.make_node("Softmax", ["logits"], ["y"], name="/softmax/Softmax", axis=-1),
    ]
    return _model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                        ["N", 3, 8, 8])],
                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 10])],
                  inits, "cnn_nchw")


def tf_nhwc() -> onnx.ModelProto:
    """tf2onnx-style: NHWC input + Transpose, Constant-fed Pad folded into a Conv, AveragePool,
    dilated depthwise Conv, Reshape from a Constant shape, MatMul + bias Add."""
    rng = np.random.default_rng(2)
    f = np.float32
    inits = [
        _init("conv/w", rng.normal(0, 0.3, (6, 3, 3, 3)).astype(f)),
        _init("conv/b", rng.normal(0, 0.1, 6).astype(f)),
        _init("dw/w", rng.normal(0, 0.3, (6, 1, 3, 3)).astype(f)),
        _init("dense/w", rng.normal(0, 0.3, (6 * 4 * 4, 5)).astype(f)),
        _init("dense/b", rng.normal(0, 0.1, 5).astype(f)),
    ]
    nodes = [
        helper.make_node("Transpose", ["input"], ["t"], name="transpose", perm=[0, 3, 1, 2]),
        helper.make_node("Constant", [], ["pads"], name="pads_const",
                         value=numpy_helper.from_array(
                             np.array([0, 0, 1, 1, 0, 0, 1, 1], np.int64), "pads")),
        helper.make_node("Pad", ["t", "pads"], ["padded"], name="pad", mode="constant"),
        helper.make_node("Conv", ["padded", "conv/w", "conv/b"], ["c"], name="conv",
                         kernel_shape=[3, 3], auto_pad="VALID"),
        helper.make_node("Relu", ["c"], ["r"], name="relu"),
        helper.make_node("AveragePool", ["r"], ["p"], name="avgpool", kernel_shape=[2, 2],
                         strides=[2, 2], auto_pad="SAME_UPPER", count_include_pad=0),
        helper.make_node("Conv", ["p", "dw/w"], ["d"], name="depthwise", kernel_shape=[3, 3],
                         pads=[2, 2, 2, 2], dilations=[2, 2], group=6),
        helper.make_node("Relu", ["d"], ["dr"], name="relu_dw"),
        helper.make_node("Constant", [], ["shape"], name="shape_const",
                         value=numpy_helper.from_array(np.array([1, -1], np.int64), "shape")),
        helper.make_node("Reshape", ["dr", "shape"], ["flat"], name="reshape"),
        helper.make_node("MatMul", ["flat", "dense/w"], ["mm"], name="dense"),
        helper.make_node("Add", ["mm", "dense/b"], ["out"], name="dense_bias"),
    ]
    return _model(nodes, [helper.make_tensor_value_info("input", TensorProto.FLOAT,
                                                        [1, 8, 8, 3])],
                  [helper.make_tensor_value_info("out", TensorProto.FLOAT, [1, 5])],
                  inits, "tf_nhwc")


def residual_concat() -> onnx.ModelProto:
    """Residual Add of two activations, Concat of two branches, SAME_UPPER Conv, Identity and
    Dropout, a constant-folded Shape/Gather/Unsqueeze/Concat feeding Reshape, Gemm with a
    broadcast [1, N] bias."""
    rng = np.random.default_rng(3)
    f = np.float32
    inits = [
        _init("a.w", rng.normal(0, 0.3, (4, 4, 3, 3)).astype(f)),
        _init("b.w", rng.normal(0, 0.3, (4, 4, 3, 3)).astype(f)),
        _init("b.b", rng.normal(0, 0.1, 4).astype(f)),
        _init("side.w", rng.normal(0, 0.3, (2, 4, 1, 1)).astype(f)),
        _init("mix.w", rng.normal(0, 0.3, (3, 6, 3, 3)).astype(f)),
        _init("head.w", rng.normal(0, 0.3, (3, 3)).astype(f)),
        _init("head.b", rng.normal(0, 0.1, (1, 3)).astype(f)),
        _init("zero", np.array([0], np.int64)),
        _init("minus1", np.array([-1], np.int64)),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "a.w"], ["a"], name="block/a", kernel_shape=[3, 3],
                         pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["a"], ["ar"], name="block/a_relu"),
        helper.make_node("Conv", ["ar", "b.w", "b.b"], ["b"], name="block/b",
                         kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
        helper.make_node("Add", ["b", "x"], ["s"], name="block/add"),
        helper.make_node("Relu", ["s"], ["sr"], name="block/relu"),
        helper.make_node("Conv", ["sr", "side.w"], ["side"], name="side", kernel_shape=[1, 1]),
        helper.make_node("Concat", ["sr", "side"], ["cat"], name="concat", axis=1),
        helper.make_node("Conv", ["cat", "mix.w"], ["mix"], name="mix", kernel_shape=[3, 3],
                         strides=[2, 2], auto_pad="SAME_UPPER"),
        helper.make_node("Identity", ["mix"], ["mix_id"], name="identity"),
        helper.make_node("Dropout", ["mix_id"], ["mix_do"], name="dropout"),
        helper.make_node("GlobalAveragePool", ["mix_do"], ["g"], name="gap"),
        helper.make_node("Shape", ["g"], ["g_shape"], name="shape"),
        helper.make_node("Gather", ["g_shape", "zero"], ["batch"], name="gather", axis=0),
        helper.make_node("Concat", ["batch", "minus1"], ["flat_shape"], name="shape_concat",
                         axis=0),
        helper.make_node("Reshape", ["g", "flat_shape"], ["flat"], name="flatten"),
        helper.make_node("Gemm", ["flat", "head.w", "head.b"], ["y"], name="head",
                         alpha=1.0, beta=1.0),
    ]
    return _model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 6, 6])],
                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3])],
                  inits, "residual_concat")


def seed_models() -> dict[str, bytes]:
    """Every seed, serialized, by name (sorted, so case generation is stable)."""
    seeds = {"cnn_nchw": cnn_nchw(), "tf_nhwc": tf_nhwc(), "residual_concat": residual_concat()}
    out = {name: m.SerializeToString() for name, m in seeds.items()}
    if FASHION.is_file():
        out["fashion_cnn"] = FASHION.read_bytes()
    return dict(sorted(out.items()))
