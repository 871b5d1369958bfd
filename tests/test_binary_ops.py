"""Mul, Sub and PRelu end to end: ONNX import against onnxruntime, clear refusals, and a
squeeze-excite network through search → export → host C (and qemu-m4) byte-identical to
`mpq.sim`, at 8 bits and with sub-byte activations.

The network (built with onnx.helper, random weights): Conv → Relu → x; squeeze-excite
GlobalAveragePool(x) → 1×1 Conv → Relu → 1×1 Conv → Clip(0, 6) → s; Mul(x, s) broadcasts
[1,C,H,W] × [1,C,1,1]; Sub(Mul, Conv(x)); PRelu with one slope per channel; then Conv,
GlobalAveragePool, Flatten, Gemm.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import with_stack
from onnx import TensorProto, helper, numpy_helper
from test_bad_input import import_fails, save
from test_import import check_model

from mpq.boards import get_board
from mpq.errors import MpqError
from mpq.frontend import load_model
from mpq.frontend.onnx_import import import_model
from mpq.quant.calibrate import dataset_from_array
from mpq.search.driver import SearchOptions, search
from mpq.verify import verify

C = 8


class _Net:
    """A tiny onnx.helper graph builder: initialisers and nodes with generated names."""

    def __init__(self, seed: int) -> None:
        self.rng = np.random.default_rng(seed)
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []

    def init(self, name: str, value: np.ndarray) -> str:
        self.inits.append(numpy_helper.from_array(np.asarray(value, np.float32), name))
        return name

    def node(self, op: str, inputs: list[str], name: str, **attrs) -> str:
        self.nodes.append(helper.make_node(op, inputs, [name], name=name, **attrs))
        return name

    def conv(self, x: str, cin: int, cout: int, k: int, name: str, stride: int = 1) -> str:
        w = self.init(f"{name}.w", self.rng.normal(0, (2 / (cin * k * k)) ** 0.5,
                                                   (cout, cin, k, k)))
        b = self.init(f"{name}.b", self.rng.normal(0, 0.1, cout))
        return self.node("Conv", [x, w, b], name, kernel_shape=[k, k], strides=[stride] * 2,
                         pads=[k // 2] * 4)

    def model(self, out: str, out_shape: list[int], in_shape: list[int]) -> onnx.ModelProto:
        g = helper.make_graph(
            self.nodes, "binary_ops",
            [helper.make_tensor_value_info("input", TensorProto.FLOAT, in_shape)],
            [helper.make_tensor_value_info(out, TensorProto.FLOAT, out_shape)], self.inits)
        m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])
        m.ir_version = 8
        onnx.checker.check_model(m)
        return m


def se_model(seed: int = 0, scalar_slope: bool = False) -> onnx.ModelProto:
    """The squeeze-excite network of the module docstring."""
    n = _Net(seed)
    x = n.node("Relu", [n.conv("input", 3, C, 3, "conv1")], "relu1")
    s = n.node("GlobalAveragePool", [x], "se_pool")
    s = n.node("Relu", [n.conv(s, C, 4, 1, "se_reduce")], "se_relu")
    lo, hi = n.init("clip.lo", np.array(0.0)), n.init("clip.hi", np.array(6.0))
    s = n.node("Clip", [n.conv(s, 4, C, 1, "se_expand"), lo, hi], "se_clip")
    m = n.node("Mul", [x, s], "se_mul")
    d = n.node("Sub", [m, n.conv(x, C, C, 3, "conv2")], "diff")
    slope = np.array([0.25]) if scalar_slope else n.rng.uniform(-0.5, 0.5, (C, 1, 1))
    p = n.node("PRelu", [d, n.init("slope", slope)], "prelu")
    y = n.node("GlobalAveragePool", [n.conv(p, C, C, 3, "conv3", stride=2)], "pool")
    y = n.node("Flatten", [y], "flat", axis=1)
    w, b = n.init("fc.w", n.rng.normal(0, 0.3, (10, C))), n.init("fc.b", np.zeros(10))
    y = n.node("Gemm", [y, w, b], "logits", transB=1)
    return n.model(y, ["batch", 10], ["batch", 3, 12, 12])


def const_model(seed: int = 1) -> onnx.ModelProto:
    """Conv → Mul by a per-channel constant → Sub of a per-channel constant (both fold into the
    conv) → PRelu with one slope for all → Mul of two equal-shape activations."""
    n = _Net(seed)
    y = n.conv("input", 3, C, 3, "conv1")
    y = n.node("Mul", [n.init("gamma", n.rng.uniform(0.5, 2, (1, C, 1, 1))), y], "scale")
    y = n.node("Sub", [y, n.init("beta", n.rng.normal(0, 0.5, (C, 1, 1)))], "shift")
    p = n.node("PRelu", [y, n.init("slope", np.array([0.1]))], "prelu")
    z = n.node("Mul", [p, n.conv("input", 3, C, 1, "conv2")], "gate")
    return n.model(z, ["batch", C, 8, 8], ["batch", 3, 8, 8])


def norm_model(seed: int = 5) -> onnx.ModelProto:
    """Constant operands anywhere: (input − mean) · (1/std) per channel at the graph input,
    Conv → Relu → ·0.5 (after a Relu: no fold), 1 − x with a constant [1,C,1,1] first, a
    constant of the full [C,H,W] shape, then GlobalAveragePool, Flatten, Gemm."""
    n = _Net(seed)
    x = n.node("Sub", ["input", n.init("mean", [[[0.2]], [[-0.1]], [[0.3]]])], "center")
    x = n.node("Mul", [x, n.init("inv_std", [[[[2.0]], [[1.5]], [[3.0]]]])], "normalise")
    y = n.node("Relu", [n.conv(x, 3, C, 3, "conv1")], "relu1")
    y = n.node("Mul", [y, n.init("half", np.array(0.5))], "halve")
    y = n.node("Sub", [n.init("one", n.rng.uniform(0, 2, (1, C, 1, 1))), y], "one_minus")
    y = n.node("Mul", [n.init("mask", n.rng.uniform(-1, 1, (C, 8, 8))), y], "mask_mul")
    y = n.node("Flatten", [n.node("GlobalAveragePool", [y], "pool")], "flat", axis=1)
    w, b = n.init("fc.w", n.rng.normal(0, 0.3, (10, C))), n.init("fc.b", np.zeros(10))
    return n.model(n.node("Gemm", [y, w, b], "logits", transB=1), ["batch", 10],
                   ["batch", 3, 8, 8])


def _x(shape: tuple[int, ...], n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).uniform(-1, 1, (n, *shape)).astype(np.float32)


@pytest.mark.parametrize("make", [se_model, lambda: se_model(2, True), const_model,
                                  norm_model])
def test_onnx_import_matches_onnxruntime(make) -> None:
    model = make()
    shape = [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim[1:]]
    check_model(model, _x(tuple(shape), 3))


def test_import_keeps_broadcast_and_folds_constants() -> None:
    g = import_model(se_model(), "se")
    mul = next(n for n in g.nodes if n.op == "mul")
    assert [g.tensors[t].shape for t in mul.inputs] == [(1, 12, 12, C), (1, 1, 1, C)]
    assert [n.op for n in g.nodes].count("sub") == 1
    prelu = next(n for n in g.nodes if n.op == "prelu")
    assert len(prelu.attrs["alpha"]) == C
    g = import_model(const_model(), "c")
    assert [n.op for n in g.nodes] == ["conv2d", "prelu", "conv2d", "mul"]
    assert g.notes["Mul by a constant folded"] == 1 and g.notes["Sub of a constant folded"] == 1
    assert g.nodes[1].attrs["alpha"] == (float(np.float32(0.1)),) * C


def _refused(model: onnx.ModelProto, *fragments: str) -> None:
    with pytest.raises(MpqError) as exc:
        import_model(model, "bad")
    assert all(f in str(exc.value) for f in fragments), str(exc.value)


def test_import_refusals_say_what_is_wrong(tmp_path: Path) -> None:
    n = _Net(3)
    a = n.conv("input", 3, C, 3, "a")
    b = n.conv("input", 3, C, 3, "b", stride=2)
    n.node("Mul", [a, b], "bad_mul")
    _refused(n.model("bad_mul", ["batch", C, 8, 8], ["batch", 3, 8, 8]), "bad_mul",
             "each dim equal or 1")
    n = _Net(3)
    y = n.node("Relu", [n.conv("input", 3, C, 3, "a")], "r")
    n.node("Sub", [y, n.init("k", np.ones((C, 8, 1)))], "k_wider_than_x")
    _refused(n.model("k_wider_than_x", ["batch", C, 8, 8], ["batch", 3, 4, 4]),
             "k_wider_than_x", "must broadcast to the activation")
    n = _Net(3)  # rank 3: the kernels' views cannot broadcast there
    n.node("Mul", ["input", n.init("k3", np.ones((1, C, 1)))], "rank3_mul")
    _refused(n.model("rank3_mul", ["batch", C, 64], ["batch", C, 64]), "rank3_mul",
             "rank 2 or 4 unless equal")
    n = _Net(3)
    y = n.conv("input", 3, C, 3, "a")
    n.node("PRelu", [y, n.init("s", np.linspace(0, 1, 8 * 8).reshape(1, 8, 8))], "p")
    model = n.model("p", ["batch", C, 8, 8], ["batch", 3, 8, 8])
    _refused(model, "'p' (PRelu)", "one value per channel")
    # Through the CLI: one line on stderr, exit 1.
    import_fails(tmp_path, save(tmp_path, model), "one value per channel")


def _plan(tmp_path: Path, model: onnx.ModelProto, **opts):
    path = tmp_path / "se.onnx"
    path.write_bytes(model.SerializeToString())
    graph = load_model(path)
    res = search(path, graph, get_board("nano33ble"),
                 dataset_from_array(_x((3, 12, 12), 48), "se"),
                 SearchOptions(patches="none", **{**opts, "sram": with_stack(graph,
                                                                            opts.get("sram"))}))
    return res.plan, graph


def test_se_network_sub_byte_bit_exact_on_host(tmp_path: Path) -> None:
    """A budget tight enough that the search takes the new ops' tensors below 8 bits."""
    plan, graph = _plan(tmp_path, se_model(), sram=2_500, scratch="separate")
    bits = {t.name: t.bits for t in plan.tensors}
    ours = [n for n in graph.nodes if n.op in ("mul", "sub", "prelu")]
    assert sum(bits[t] < 8 for n in ours for t in n.inputs + n.outputs) >= 4
    result = verify(plan, graph, _x((3, 12, 12), 6, seed=5), "host")
    assert result.samples == 6 and result.mismatches == 0


def test_se_network_int8_bit_exact_under_qemu_m4(tmp_path: Path) -> None:
    if shutil.which("arm-none-eabi-gcc") is None or shutil.which("qemu-system-arm") is None:
        if os.environ.get("CI"):
            pytest.fail("cross tools missing in CI")
        pytest.skip("arm-none-eabi-gcc / qemu-system-arm not installed (see .ci/run)")
    plan, graph = _plan(tmp_path, se_model())
    assert {t.bits for t in plan.tensors} == {8}
    assert verify(plan, graph, _x((3, 12, 12), 3, seed=6), "qemu-m4").mismatches == 0


def stage_model(seed: int = 4) -> onnx.ModelProto:
    """Conv → PRelu → p; Mul(Conv(p), Conv(p)) → Sub(·, p) at full resolution (the patch
    stage's part), then a strided Conv, GlobalAveragePool, Flatten, Gemm."""
    n = _Net(seed)
    p = n.node("PRelu", [n.conv("input", 3, C, 3, "conv1"),
                         n.init("slope", n.rng.uniform(-0.5, 0.5, (C, 1, 1)))], "prelu")
    m = n.node("Mul", [n.conv(p, C, C, 3, "conv_a"), n.conv(p, C, C, 1, "conv_b")], "gate")
    d = n.node("Sub", [m, p], "diff")
    y = n.node("Relu", [n.conv(d, C, 16, 3, "conv_s2", stride=2)], "relu_s2")
    y = n.node("Flatten", [n.node("GlobalAveragePool", [y], "pool")], "flat", axis=1)
    w, b = n.init("fc.w", n.rng.normal(0, 0.3, (10, 16))), n.init("fc.b", np.zeros(10))
    return n.model(n.node("Gemm", [y, w, b], "logits", transB=1), ["batch", 10],
                   ["batch", 3, 16, 16])


def test_patch_stage_with_elementwise_ops_bit_exact_on_host(tmp_path: Path) -> None:
    """Mul, Sub and PRelu inside the patch stage (same rectangle of every input, like add),
    with VDPC branches and, under the tight budget, a sub-byte split tensor."""
    model = stage_model()
    check_model(model, _x((3, 16, 16), 2))
    path = tmp_path / "stage.onnx"
    path.write_bytes(model.SerializeToString())
    graph = load_model(path)
    ops = [nd.op for nd in graph.nodes]
    k = ops.index("sub") + 1
    res = search(path, graph, get_board("nano33ble"),
                 dataset_from_array(_x((3, 16, 16), 32), "s"),
                 SearchOptions(strategy="vdqs", patches=f"k={k},n=2",
                               sram=with_stack(graph, 4_000)))
    plan = res.plan
    assert plan.patch is not None
    assert {"mul", "sub", "prelu"} <= {nd.op for nd in graph.nodes
                                        if nd.name in plan.patch["stage_nodes"]}
    # the split tensor, written tile by tile by the stage's sub, below 8 bits
    assert plan.patch["vdpc"] is not None and {t.name: t.bits for t in plan.tensors}["diff"] < 8
    assert verify(plan, graph, _x((3, 16, 16), 6, seed=7), "host").mismatches == 0


def test_broadcasting_mul_ends_the_patch_stage() -> None:
    from mpq.patch import locality_problem

    g = import_model(se_model(), "se")
    mul = next(n for n in g.nodes if n.op == "mul")
    assert "broadcasts" in locality_problem(mul, g)


def test_constant_operands_bit_exact_on_host(tmp_path: Path) -> None:
    """Constant Mul/Sub operands (either order, per channel, scalar, full shape) through
    search → export (Flash arrays as 8-bit views) → host C, byte-identical to mpq.sim."""
    model = norm_model()
    path = tmp_path / "norm.onnx"
    path.write_bytes(model.SerializeToString())
    graph = load_model(path)
    consts = [nd for nd in graph.nodes if "const" in nd.attrs]
    assert len(consts) == 5 and any(nd.attrs["const_first"] for nd in consts)
    res = search(path, graph, get_board("nano33ble"),
                 dataset_from_array(_x((3, 8, 8), 32), "n"), SearchOptions(patches="none"))
    assert verify(res.plan, graph, _x((3, 8, 8), 6, seed=8), "host").mismatches == 0


def test_cmsis_nn_backend_calls_elementwise_mul(tmp_path: Path) -> None:
    """--backend cmsis-nn: the equal-shape int8 Mul calls arm_elementwise_mul_s8, PRelu stays
    portable (no CMSIS-NN s8 kernel), and the export is byte-identical to mpq.sim on the host
    and (DSP paths) on qemu-m4. Needs a CMSIS-NN checkout in $CMSIS_NN_PATH."""
    if not os.environ.get("CMSIS_NN_PATH"):
        pytest.skip("CMSIS_NN_PATH is not set (CMSIS-NN has no Debian/PyPI package)")
    import json

    from mpq.codegen.export import render_export

    model = const_model()
    path = tmp_path / "c.onnx"
    path.write_bytes(model.SerializeToString())
    graph = load_model(path)
    res = search(path, graph, get_board("nano33ble"),
                 dataset_from_array(_x((3, 8, 8), 32), "c"), SearchOptions(patches="none"))
    report = json.loads(render_export(res.plan, graph, "cmsis-nn")["mpq_report.json"])
    calls = {e["name"]: e["call"] for e in report["layers"]}
    assert calls["gate"] == "arm_elementwise_mul_s8" and calls["prelu"] == "mpq_prelu"
    x = _x((3, 8, 8), 4, seed=9)
    assert verify(res.plan, graph, x, "host", "cmsis-nn").mismatches == 0
    if shutil.which("arm-none-eabi-gcc") and shutil.which("qemu-system-arm"):
        assert verify(res.plan, graph, x[:2], "qemu-m4", "cmsis-nn").mismatches == 0


def test_rank3_prelu_and_equal_shape_mul_bit_exact_on_host(tmp_path: Path) -> None:
    """A rank-3 graph ([1, 4, 6]): PRelu slopes per last-axis channel (the kernel sees one
    1×1×24 view, so the export repeats them) and a Mul by an equal-shape constant."""
    n = _Net(6)
    p = n.node("PRelu", ["input", n.init("slope", n.rng.uniform(-1, 1, 6))], "prelu3")
    n.node("Mul", [p, n.init("k", n.rng.uniform(-1, 1, (1, 4, 6)))], "mul3")
    model = n.model("mul3", ["batch", 4, 6], ["batch", 4, 6])
    check_model(model, _x((4, 6), 3))
    path = tmp_path / "r3.onnx"
    path.write_bytes(model.SerializeToString())
    graph = load_model(path)
    res = search(path, graph, get_board("nano33ble"), dataset_from_array(_x((4, 6), 16), "r"),
                 SearchOptions(patches="none"))
    assert verify(res.plan, graph, _x((4, 6), 4, seed=3), "host").mismatches == 0
