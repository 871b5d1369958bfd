"""Unary activations (Sigmoid, Tanh, HardSwish, HardSigmoid, LeakyRelu) end to end.

ONNX import against onnxruntime (float), the integer tables' invariants, and a small
conv → HardSwish → conv → Sigmoid/LeakyRelu/Tanh/HardSigmoid network through search → export →
host C, byte-identical to `mpq.sim` (`mpq.verify`), at 8 bits and with sub-byte maps, with and
without a patch stage. The TFLM oracle cases for LOGISTIC, TANH, HARD_SWISH and LEAKY_RELU are
in test_tflm_single_op.py.
"""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import onnx
import pytest
from conftest import ort_run, with_stack
from onnx import TensorProto, helper, numpy_helper

from mpq.boards import get_board
from mpq.codegen.export import render_export
from mpq.frontend.onnx_import import import_model
from mpq.interpreter import from_ir_layout, run_graph, to_ir_layout
from mpq.quant import lut
from mpq.quant.calibrate import dataset_from_array
from mpq.quant.qmodel import ActQuant, quantize_graph
from mpq.search.driver import SearchOptions, search
from mpq.sim import run_int
from mpq.verify import verify

ACTS = {  # ONNX op → attributes
    "Sigmoid": {}, "Tanh": {}, "HardSwish": {}, "HardSigmoid": {"alpha": 0.25, "beta": 0.4},
    "LeakyRelu": {"alpha": 0.1},
}


def _model(chain: list[tuple[str, dict]], channels: int = 6, size: int = 12,
           seed: int = 0) -> onnx.ModelProto:
    """input [1, 3, size, size] → (Conv 3×3 → activation) per entry of `chain`."""
    rng = np.random.default_rng(seed)
    nodes, inits = [], []
    x, cin = "input", 3
    for i, (op, attrs) in enumerate(chain):
        w = (rng.standard_normal((channels, cin, 3, 3)) * np.sqrt(2 / (cin * 9))).astype(
            np.float32)
        b = (rng.standard_normal(channels) * 0.1).astype(np.float32)
        inits += [numpy_helper.from_array(w, f"w{i}"), numpy_helper.from_array(b, f"b{i}")]
        nodes.append(helper.make_node("Conv", [x, f"w{i}", f"b{i}"], [f"c{i}"], name=f"conv{i}",
                                      kernel_shape=[3, 3], pads=[1, 1, 1, 1]))
        out = "output" if i == len(chain) - 1 else f"a{i}"
        nodes.append(helper.make_node(op, [f"c{i}"], [out], name=f"act{i}", **attrs))
        x, cin = out, channels
    graph = helper.make_graph(
        nodes, "acts", [helper.make_tensor_value_info("input", TensorProto.FLOAT,
                                                      [1, 3, size, size])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT,
                                       [1, channels, size, size])], initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 14)],
                              ir_version=8)
    onnx.checker.check_model(model, full_check=True)
    return model


@pytest.mark.parametrize("op", list(ACTS))
def test_onnx_import_matches_onnxruntime(op: str) -> None:
    model = _model([(op, ACTS[op])])
    graph = import_model(model)
    assert [n.op for n in graph.nodes] == ["conv2d", "activation"]
    x = np.random.default_rng(1).standard_normal((1, 3, 12, 12)).astype(np.float32) * 2
    ours = from_ir_layout(graph, "output",
                          run_graph(graph, {"input": to_ir_layout(graph, "input", x)})["output"])
    theirs = ort_run(model, x)
    np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-5)


def test_fixed_outputs_and_sub_byte_tables() -> None:
    """Sigmoid/tanh outputs take TFLM's fixed quantisation; a 4-bit input and a 4-bit output
    give a table whose reachable entries fit 4 bits and match the 8-bit arithmetic's
    definition (HardSigmoid: the rounded float function)."""
    graph = import_model(_model([("Sigmoid", {}), ("HardSigmoid", {"alpha": 0.25,
                                                                   "beta": 0.4})]))
    ranges = {t: (-3.0, 3.0) for t in graph.tensors}
    ranges["output"] = (0.0, 1.0)
    qm = quantize_graph(graph, ranges, act_bits={"a0": 8, "c1": 4, "output": 4})
    assert qm.acts["a0"] == ActQuant(float(np.float32(1 / 256)), -128, 8)
    table = qm.layers["act1"].table
    src, out = qm.acts["c1"], qm.acts["output"]
    codes = np.arange(-8, 8)
    y = lut.lookup(table, codes)
    assert y.min() >= -8 and y.max() <= 7
    real = np.clip(0.25 * (codes - src.zero_point) * np.float32(src.scale) + 0.4, 0, 1)
    want = np.clip(np.floor(real / np.float32(out.scale) + 0.5) + out.zero_point, -8, 7)
    np.testing.assert_array_equal(y, want)
    # The integer reference is the table lookup, any code in, a code of the output's bits out.
    x = np.random.default_rng(0).integers(-128, 128, (2, 12, 12, 3))
    got = run_int(qm, {"input": x}, keep=True)
    assert got["output"].min() >= -8 and got["output"].max() <= 7


@pytest.mark.parametrize("chain,sram,patches", [
    ([("HardSwish", {}), ("Sigmoid", {})], None, "none"),
    ([("HardSwish", {}), ("LeakyRelu", {"alpha": 0.1}), ("Tanh", {})], 6_548, "none"),
    ([("HardSigmoid", {"alpha": 0.2, "beta": 0.5}), ("LeakyRelu", {"alpha": 0.2}),
      ("Sigmoid", {})], 7_048, "k=3,n=2"),
])
def test_search_export_host_bit_exact(tmp_path, chain, sram, patches) -> None:
    model = _model(chain, channels=8, size=16)
    path = tmp_path / "acts.onnx"
    path.write_bytes(model.SerializeToString())
    graph = import_model(model)
    rng = np.random.default_rng(2)
    calib = rng.standard_normal((32, 3, 16, 16)).astype(np.float32)
    res = search(path, graph, get_board("nano33ble"), dataset_from_array(calib, "c"),
                 SearchOptions(patches=patches, sram=with_stack(graph, sram), io="external",
                               overlap=False))  # budgets tuned without it; CMSIS-NN calls
    plan = res.plan
    tables = sum(n.op == "activation" for n in graph.nodes) * lut.TABLE_BYTES
    weights = sum(n.weight.size * layer.w_bits // 8 + 12 * n.weight.shape[0]
                  for n, layer in zip(graph.nodes, plan.layers, strict=True)
                  if n.weight is not None)
    # VDPC's all-8-bit branch: its own bias/requantisation per stage conv, maybe tables
    stage = set(plan.patch["stage_nodes"]) if plan.patch and plan.patch["vdpc"] else set()
    branch = sum(12 * n.weight.shape[0] for n in graph.nodes
                 if n.name in stage and n.op == "conv2d")
    extra = plan.predicted["flash_bytes"] - (weights + tables + branch)
    assert extra % lut.TABLE_BYTES == 0 and 0 <= extra <= lut.TABLE_BYTES * sum(
        graph.nodes[i].op == "activation" and graph.nodes[i].name in stage
        for i in range(len(graph.nodes)))
    if sram is not None:
        assert min(t.bits for t in plan.tensors) < 8
    if patches != "none":
        stage = {n.name: n.op for n in graph.nodes if n.name in plan.patch["stage_nodes"]}
        assert "activation" in stage.values()
    else:  # each table overwrites its input in place (it dies there): one buffer, one width
        offsets = {t.name: (t.offset, t.bits) for t in plan.tensors}
        for n in graph.nodes:
            if n.op == "activation":
                assert n.name in plan.schedule["inplace_depthwise"]
                assert offsets[n.inputs[0]] == offsets[n.outputs[0]]
    if sram is None:  # all 8-bit: the cmsis-nn backend takes the convs, not the tables
        report = json.loads(render_export(plan, graph, "cmsis-nn")["mpq_report.json"])
        kinds = {n.name: n.op for n in graph.nodes}
        for layer in report["layers"]:
            if kinds[layer["name"]] == "activation":
                assert layer["backend"] == "portable" and layer["call"] == "mpq_activation"
                assert "no CMSIS-NN int8 kernel" in layer["reason"]
            else:
                assert layer["backend"] == "cmsis-nn"
    x = rng.standard_normal((4, 3, 16, 16)).astype(np.float32)
    assert verify(plan, graph, x, "host").mismatches == 0


def test_qemu_m4_bit_exact(tmp_path) -> None:
    """The same chain (sub-byte maps) on the emulated Cortex-M4: firmware = mpq.sim."""
    if shutil.which("arm-none-eabi-gcc") is None or shutil.which("qemu-system-arm") is None:
        if os.environ.get("CI"):
            pytest.fail("cross tools missing in CI")
        pytest.skip("arm-none-eabi-gcc / qemu-system-arm not installed (see .ci/run)")
    model = _model([("HardSwish", {}), ("LeakyRelu", {"alpha": 0.1}), ("Tanh", {})],
                   channels=8, size=16)
    path = tmp_path / "acts.onnx"
    path.write_bytes(model.SerializeToString())
    graph = import_model(model)
    rng = np.random.default_rng(3)
    calib = rng.standard_normal((32, 3, 16, 16)).astype(np.float32)
    plan = search(path, graph, get_board("nano33ble"), dataset_from_array(calib, "c"),
                  SearchOptions(patches="none", sram=with_stack(graph, 4_290), overlap=False,
                                scratch="separate")).plan
    assert min(t.bits for t in plan.tensors) < 8
    x = rng.standard_normal((2, 3, 16, 16)).astype(np.float32)
    assert verify(plan, graph, x, "qemu-m4").mismatches == 0


def test_hard_swish_output_range_widened_for_tflm() -> None:
    """An input range almost all negative gives HardSwish a tiny output range; mpq widens it
    until s_out > s_in/128, which TFLM's int8 HARD_SWISH requires, instead of failing."""
    graph = import_model(_model([("HardSwish", {})]))
    ranges = {"input": (-1.0, 1.0), "c0": (-100.0, 0.1), "output": (-0.375, 0.05)}
    qm = quantize_graph(graph, ranges)
    s_in, s_out = qm.acts["c0"].scale, qm.acts["output"].scale
    assert s_out > s_in / 128
    assert lut.hard_swish_params(s_in, s_out)["output_exponent"] <= 0


def test_activation_on_the_input_and_after_gemm(tmp_path) -> None:
    """input → LeakyRelu → Conv → GlobalAveragePool → Flatten → Gemm → Sigmoid: a table read
    straight from the caller's input buffer and one on a [1, K] vector, host C = mpq.sim."""
    rng = np.random.default_rng(4)
    w = (rng.standard_normal((6, 3, 3, 3)) * 0.4).astype(np.float32)
    fc = (rng.standard_normal((5, 6)) * 0.5).astype(np.float32)
    nodes = [
        helper.make_node("LeakyRelu", ["input"], ["l"], name="leaky", alpha=0.3),
        helper.make_node("Conv", ["l", "w", "b"], ["c"], name="conv", kernel_shape=[3, 3]),
        helper.make_node("GlobalAveragePool", ["c"], ["g"], name="gap"),
        helper.make_node("Flatten", ["g"], ["f"], name="flatten", axis=1),
        helper.make_node("Gemm", ["f", "fc", "fb"], ["z"], name="fc", transB=1),
        helper.make_node("Sigmoid", ["z"], ["output"], name="sigmoid"),
    ]
    inits = [numpy_helper.from_array(a, n) for a, n in (
        (w, "w"), (np.zeros(6, np.float32), "b"), (fc, "fc"),
        ((rng.standard_normal(5) * 0.1).astype(np.float32), "fb"))]
    graph_proto = helper.make_graph(
        nodes, "head", [helper.make_tensor_value_info("input", TensorProto.FLOAT,
                                                      ["batch", 3, 10, 10])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["batch", 5])],
        initializer=inits)
    model = helper.make_model(graph_proto, opset_imports=[helper.make_opsetid("", 13)],
                              ir_version=8)
    path = tmp_path / "head.onnx"
    path.write_bytes(model.SerializeToString())
    graph = import_model(model)
    assert graph.nodes[0].op == "activation" and graph.nodes[0].inputs == ["input"]
    calib = rng.standard_normal((32, 3, 10, 10)).astype(np.float32)
    plan = search(path, graph, get_board("nano33ble"), dataset_from_array(calib, "c"),
                  SearchOptions(patches="none")).plan
    x = rng.standard_normal((4, 3, 10, 10)).astype(np.float32)
    np.testing.assert_allclose(
        from_ir_layout(graph, "output",
                       run_graph(graph, {"input": to_ir_layout(graph, "input", x)})["output"]),
        ort_run(model, x), rtol=1e-5, atol=1e-6)
    assert verify(plan, graph, x, "host").mismatches == 0


def test_torch_opset13_hardswish_is_one_table() -> None:
    """torch exports Hardswish below opset 14 as x · HardSigmoid(x; α = 1/6, β = 1/2): that
    pair imports as one hard_swish layer (TFLM's HARD_SWISH arithmetic), float as onnxruntime."""
    rng = np.random.default_rng(5)
    w = (rng.standard_normal((4, 3, 3, 3)) * 0.5).astype(np.float32)
    nodes = [
        helper.make_node("Conv", ["input", "w"], ["c"], name="/conv/Conv", kernel_shape=[3, 3]),
        helper.make_node("HardSigmoid", ["c"], ["hs"], name="/act/HardSigmoid",
                         alpha=1 / 6, beta=0.5),
        helper.make_node("Mul", ["c", "hs"], ["output"], name="/act/Mul"),
    ]
    g = helper.make_graph(
        nodes, "torch", [helper.make_tensor_value_info("input", TensorProto.FLOAT,
                                                       [1, 3, 8, 8])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, [1, 4, 6, 6])],
        initializer=[numpy_helper.from_array(w, "w")])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)
    graph = import_model(model)
    assert [(n.op, n.attrs.get("function")) for n in graph.nodes] == [
        ("conv2d", None), ("activation", "hard_swish")]
    assert graph.notes["HardSigmoid + Mul fused into HardSwish"] == 1
    x = (rng.standard_normal((1, 3, 8, 8)) * 3).astype(np.float32)
    ours = from_ir_layout(graph, "output",
                          run_graph(graph, {"input": to_ir_layout(graph, "input", x)})["output"])
    np.testing.assert_allclose(ours, ort_run(model, x), rtol=1e-5, atol=1e-5)


def test_in_place_only_when_the_storage_dies() -> None:
    """A table writes over its input only when nothing else in that storage is read later:
    not when the input is a reshape view of a tensor an add reads afterwards."""
    from mpq.ir import Graph, Node, Tensor
    from mpq.memory import layer_schedule_buffers

    def graph(reread: bool) -> Graph:
        t = {n: Tensor(n, s) for n, s in (("x", (1, 4, 4, 2)), ("c", (1, 4, 4, 2)),
                                           ("r", (1, 32)), ("a", (1, 32)),
                                           ("a4", (1, 4, 4, 2)), ("y", (1, 4, 4, 2)))}
        w = np.ones((2, 1, 1, 2), np.float32)
        nodes = [Node("conv", "conv2d", ["x"], ["c"], {"kernel": (1, 1), "strides": (1, 1),
                                                       "dilations": (1, 1), "groups": 1,
                                                       "pads": (0, 0, 0, 0)}, w, np.zeros(2)),
                 Node("flat", "reshape", ["c"], ["r"], {"shape": (1, 32)}),
                 Node("act", "activation", ["r"], ["a"], {"function": "sigmoid"}),
                 Node("back", "reshape", ["a"], ["a4"], {"shape": (1, 4, 4, 2)}),
                 Node("add", "add", ["c" if reread else "a4", "a4"], ["y"])]
        return Graph("g", t, nodes, ["x"], ["y"])

    assert "act" in layer_schedule_buffers(graph(False))[1]
    assert "act" not in layer_schedule_buffers(graph(True))[1]
