"""The cmsis-nn export backend: which layers call CMSIS-NN, a deterministic export, and the
same bytes as the integer reference when the export is built with CMSIS-NN.

CMSIS-NN is not installable in CI (no Debian or PyPI package): the tests that build with it
run when CMSIS_NN_PATH names a CMSIS-NN checkout and are skipped, saying so, otherwise. The
export itself, its report and the refusals need no CMSIS-NN and always run.
"""

from __future__ import annotations

import ctypes
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx_builders as B
import pytest
from conftest import REPO, run_mpq, shared_model
from test_bad_input import assert_clean_failure

from mpq.boards import get_board
from mpq.codegen import cmsis
from mpq.codegen.export import c_sources, render_export, write_export
from mpq.frontend import load_model
from mpq.quant.calibrate import dataset_from_array, onnx_input_shape
from mpq.search.driver import SearchOptions, search
from mpq.verify import verify


def _cmsis_nn() -> Path:
    value = os.environ.get("CMSIS_NN_PATH")
    if not value:
        pytest.skip("CMSIS_NN_PATH is not set: CMSIS-NN has no Debian/PyPI package, so tests "
                    "that build with it need a checkout (CMSIS_NN_PATH=/path/to/CMSIS-NN)")
    return Path(value)


def _cross_tools() -> None:
    if shutil.which("arm-none-eabi-gcc") is None or shutil.which("qemu-system-arm") is None:
        if os.environ.get("CI"):
            pytest.fail("cross tools missing in CI")
        pytest.skip("arm-none-eabi-gcc / qemu-system-arm not installed (see .ci/run)")


def _random(graph, n: int, scale: float = 1.0) -> np.ndarray:
    shape = (n, *onnx_input_shape(graph))
    return (np.random.default_rng(1).random(shape) * scale).astype(np.float32)


def _int8_plan(tmp: Path, model, name: str, scale: float = 1.0, io: str = "arena"):
    """The int8 layer-based plan of `model`; `io` "external" keeps the graph input out of the
    arena (a single depthwise layer would otherwise run in place over it)."""
    path = tmp / f"{name}.onnx"
    path.write_bytes(model.SerializeToString())
    graph = load_model(path)
    plan = search(path, graph, get_board("nano33ble"),
                  dataset_from_array(_random(graph, 16, scale), name),
                  # overlapped layers keep the portable kernel (CMSIS-NN's write order is
                  # not the one the overlap assumes): these plans are made for CMSIS-NN
                  SearchOptions(strategy="int8", patches="none", io=io, overlap=False)).plan
    return plan, graph


def _with_weight_bits(plan, bits: int, graph):
    """The plan with every layer's weights at `bits` (int8 activations, int4 weights), its
    BitOPs and Flash recomputed as the search records them (plans are checked against their
    model before export)."""
    from mpq.search.driver import weight_flash
    from mpq.search.scores import layer_bitops

    ops = layer_bitops(graph, {t.name: t.bits for t in plan.tensors},
                       {layer.name: bits for layer in plan.layers if layer.w_bits})
    for layer in plan.layers:
        if layer.w_bits:
            layer.w_bits = bits
        layer.bitops = ops[layer.name]
    plan.predicted["bitops"] = plan.predicted["expected_bitops"] = sum(ops.values())
    plan.predicted["flash_bytes"] = sum(weight_flash(n.weight.size, n.weight.shape[0], bits)
                                        for n in graph.nodes if n.weight is not None)
    return plan


def _report(plan, graph, backend: str = "cmsis-nn") -> dict:
    return json.loads(render_export(plan, graph, backend)["mpq_report.json"])


def _calls(report: dict) -> dict[str, str]:
    return {layer["name"]: layer["call"] for layer in report["layers"]}


def residual_add_model(seed: int = 0):
    """conv → relu → conv, then add(first conv, second conv): the add reads the second conv's
    input, so the plan cannot fuse it (arm_elementwise_add_s8)."""
    b = B._Builder(seed)
    w = b.init("c1.weight", b.he((8, 3, 3, 3)))
    x = b.conv("input", w, b.init("c1.bias", b.small(8)), "/c1/Conv", 3, 1, (1, 1, 1, 1))
    x = b.node("Relu", [x], "/r1/Relu")
    w = b.init("c2.weight", b.he((8, 8, 3, 3)))
    y = b.conv(x, w, b.init("c2.bias", b.small(8)), "/c2/Conv", 3, 1, (1, 1, 1, 1))
    b.node("Add", [x, y], "/add/Add", outputs=["output"])
    return b.model("main_graph", [B._input("input", ["batch", 3, 10, 12])], ["output"])


def fused_block_model(stride: int, seed: int = 0, group: int = 1):
    """A residual block whose add the plan fuses into the conv before it: s = relu(conv(x)),
    skip = 1x1 conv of s (stride `stride`), then add(skip, conv3x3(s, stride `stride`, padding
    1, `group` groups)): the 3x3 conv reads s, never the skip, so the sum overwrites the skip."""
    b = B._Builder(seed)
    w = b.init("c0.weight", b.he((8, 3, 3, 3)))
    s = b.conv("input", w, b.init("c0.bias", b.small(8)), "/c0/Conv", 3, 1, (1, 1, 1, 1))
    s = b.node("Relu", [s], "/r0/Relu")
    w = b.init("sk.weight", b.he((8, 8, 1, 1)))
    skip = b.conv(s, w, b.init("sk.bias", b.small(8)), "/sk/Conv", 1, stride, (0, 0, 0, 0))
    w = b.init("c1.weight", b.he((8, 8 // group, 3, 3)))
    y = b.conv(s, w, b.init("c1.bias", b.small(8)), "/c1/Conv", 3, stride, (1, 1, 1, 1),
               group=group)
    b.node("Add", [skip, y], "/add/Add", outputs=["output"])
    return b.model("main_graph", [B._input("input", ["batch", 3, 11, 13])], ["output"])


def uniform_fc_model(seed: int = 0):
    """Gemm 64 → 10 whose rows share their largest |weight|, so every output channel gets the
    same requantisation: 4-bit weights can go to the per-tensor arm_fully_connected_s4."""
    b = B._Builder(seed)
    w = b.rng.uniform(-0.5, 0.5, (10, 64)).astype(np.float32)
    w[:, 0] = 0.75
    x = b.node("Gemm", ["input", b.init("fc.weight", w), b.init("fc.bias", b.small(10))],
               "/fc/Gemm", alpha=1.0, beta=1.0, transB=1)
    b.node("Relu", [x], "/relu/Relu", outputs=["output"])
    return b.model("main_graph", [B._input("input", ["batch", 64])], ["output"])


# -- export: backend choice, report, determinism (no CMSIS-NN needed) ---------------------------

def test_backend_choice_report_and_deterministic_export(tmp_path: Path) -> None:
    model = B.mobilenet_v2(0.35, 32, num_classes=10)
    plan, graph = _int8_plan(tmp_path, model, "mbv2")
    assert plan.schedule["fused_adds"] and plan.schedule["inplace_depthwise"]
    report = _report(plan, graph)
    assert report["backend"] == "cmsis-nn"
    by_backend = {"cmsis-nn": [], "portable": []}
    for layer in report["layers"]:
        by_backend[layer["backend"]].append(layer)
    inplace, fused = set(plan.schedule["inplace_depthwise"]), plan.schedule["fused_adds"]
    for layer in by_backend["portable"]:
        assert layer["call"] == "mpq_depthwise_inplace"
        assert layer["name"] in inplace and "in-place" in layer["reason"]
    # Every conv fused with its residual add calls CMSIS-NN's conv, then its add in place.
    fused_calls = [x for x in by_backend["cmsis-nn"] if " + " in x["name"]]
    assert sorted(x["name"].split(" + ")[1] for x in fused_calls) == sorted(fused)
    assert {x["call"] for x in fused_calls} == {"arm_convolve_wrapper_s8 + arm_elementwise_add_s8"}
    cmsis_calls = {layer["call"] for layer in by_backend["cmsis-nn"]}
    assert cmsis_calls == {"arm_convolve_wrapper_s8", "arm_avgpool_s8",
                           "arm_fully_connected_per_channel_s8",
                           "arm_convolve_wrapper_s8 + arm_elementwise_add_s8"}
    cmsis_calls = {f for call in cmsis_calls for f in call.split(" + ")}
    # The export's scratch covers both kinds of kernel; the plan's prediction is reported too.
    p = report["predicted"]
    assert p["scratch_bytes"] >= max(p["cmsis_nn_scratch_bytes"], p["portable_scratch_bytes"])
    assert p["plan_arena_bytes"] == plan.predicted["arena_bytes"] <= p["arena_bytes"]
    assert report["cmsis_nn"]["sources"] == cmsis.sources_for(cmsis_calls)

    # Same plan ⇒ same bytes; the CLI says how many layers call CMSIS-NN.
    plan_path = tmp_path / "mbv2.plan.json"
    plan.save(plan_path)
    a, b = tmp_path / "a", tmp_path / "b"
    r = run_mpq("export", plan_path, "-o", a, "--backend", "cmsis-nn")
    assert r.returncode == 0, r.stderr
    assert f"{len(by_backend['cmsis-nn'])} of {len(report['layers'])} layers call CMSIS-NN" \
        in r.stdout
    assert run_mpq("export", plan_path, "-o", b, "--backend", "cmsis-nn").returncode == 0
    names = sorted(p.name for p in a.iterdir())
    for n in names:
        assert (a / n).read_bytes() == (b / n).read_bytes(), n
        assert str(tmp_path) not in (a / n).read_text()
    model_c = (a / "mpq_model.c").read_text()
    assert '#include "arm_nnfunctions.h"' in model_c
    assert model_c.count("arm_convolve_wrapper_s8(") == len(
        [x for x in by_backend["cmsis-nn"] if x["call"].startswith("arm_convolve_wrapper_s8")])
    assert model_c.count("arm_elementwise_add_s8(") == len(fused_calls)
    # Every CMSIS-NN call with a scratch getter checks it against the static scratch (a fused
    # conv+add against the part of the scratch its convolution may use).
    assert model_c.count("mpq_cmsis_scratch(arm_") == len(by_backend["cmsis-nn"]) \
        - len(fused_calls)
    assert model_c.count("_get_buffer_size(&p, &in_dims, &f_dims, &out_dims);") == \
        len(fused_calls)
    header = (a / "mpq_model.h").read_text()
    assert f"#define MPQ_CMSIS_SCRATCH_BYTES {p['cmsis_nn_scratch_bytes']}\n" in header
    mk = (a / "mpq.mk").read_text()
    for src in report["cmsis_nn"]["sources"]:
        assert f"$(CMSIS_NN_PATH)/{src}" in mk
    # The portable export of the same plan does not mention CMSIS-NN at all.
    portable = render_export(plan, graph)
    assert "arm_" not in portable["mpq_model.c"] and "CMSIS" not in portable["mpq.mk"]
    assert all(x["backend"] == "portable" and "reason" not in x
               for x in json.loads(portable["mpq_report.json"])["layers"])


def test_sub_byte_and_patch_stage_layers_stay_portable(tmp_path: Path) -> None:
    for res, opts in ((64, SearchOptions(patches="k=13,n=3", sram=40_000)),
                      (32, SearchOptions(patches="none", sram=9_000))):
        model = B.mobilenet_v2(0.35, res, num_classes=10)
        path = tmp_path / f"m{res}.onnx"
        path.write_bytes(model.SerializeToString())
        graph = load_model(path)
        plan = search(path, graph, get_board("nano33ble"),
                      dataset_from_array(_random(graph, 16), "r"), opts).plan
        report = _report(plan, graph)
        stage = set(plan.patch["stage_nodes"]) if plan.patch else set()
        assert bool(stage) == (res == 64)
        sub_byte = 0
        for layer in report["layers"]:
            node = layer["name"].split(" + ")[0]
            lp = plan.layer(node)
            if node in stage:
                assert layer["backend"] == "portable" and "patch stage" in layer["reason"]
            elif min(lp.a_bits_in, lp.a_bits_out) < 8:
                sub_byte += 1
                assert layer["backend"] == "portable"
        assert sub_byte > 0 or res == 64
        assert any(layer["backend"] == "cmsis-nn" for layer in report["layers"])


def test_plan_without_8bit_layers_exports_portable(tmp_path: Path) -> None:
    plan, graph = _int8_plan(tmp_path, B.conv_pad_model((1, 1, 1, 1)), "one")
    _with_weight_bits(plan, 2, graph)
    report = _report(plan, graph)
    assert [x["backend"] for x in report["layers"]] == ["portable"]
    assert report["layers"][0]["reason"] == "2-bit weights"
    assert report["cmsis_nn"] is None
    files = render_export(plan, graph, "cmsis-nn")
    assert "arm_nnfunctions.h" not in files["mpq_model.c"] and "CMSIS" not in files["mpq.mk"]


def test_refusals(tmp_path: Path) -> None:
    plan, graph = _int8_plan(tmp_path, B.conv_pad_model((1, 1, 1, 1)), "one")
    plan_path = tmp_path / "one.plan.json"
    plan.save(plan_path)
    data = tmp_path / "x.npy"
    np.save(data, _random(graph, 2))
    env = {k: v for k, v in os.environ.items() if k != cmsis.ENV}
    env["PYTHONPATH"] = str(REPO)
    for value, fragment in ((None, "set CMSIS_NN_PATH"),
                            (str(tmp_path / "nowhere"), "no such directory"),
                            (str(tmp_path), "not a CMSIS-NN checkout")):
        e = env if value is None else {**env, cmsis.ENV: value}
        for args in (["verify", plan_path, "--input", data, "--backend", "cmsis-nn"],
                     ["export", plan_path, "-o", tmp_path / "fw", "--backend", "cmsis-nn",
                      "--build"]):
            r = subprocess.run([sys.executable, "-m", "mpq.cli", *map(str, args)],
                               capture_output=True, text=True, env=e)
            assert_clean_failure(r, fragment)
        assert not (tmp_path / "fw").exists()
    for cmd in ("export", "verify"):
        r = run_mpq(cmd, plan_path, "-o" if cmd == "export" else "--input",
                    tmp_path / "o" if cmd == "export" else data, "--backend", "tflm")
        assert r.returncode == 2 and "tflm" in r.stderr


# -- CMSIS-NN's own scratch getters ---------------------------------------------------------

class _Dims(ctypes.Structure):
    _fields_ = [("n", ctypes.c_int32), ("h", ctypes.c_int32), ("w", ctypes.c_int32),
                ("c", ctypes.c_int32)]


class _Tile(ctypes.Structure):
    _fields_ = [("w", ctypes.c_int32), ("h", ctypes.c_int32)]


class _ConvParams(ctypes.Structure):
    _fields_ = [("input_offset", ctypes.c_int32), ("output_offset", ctypes.c_int32),
                ("stride", _Tile), ("padding", _Tile), ("dilation", _Tile),
                ("act_min", ctypes.c_int32), ("act_max", ctypes.c_int32)]


class _DwParams(ctypes.Structure):
    _fields_ = [("input_offset", ctypes.c_int32), ("output_offset", ctypes.c_int32),
                ("ch_mult", ctypes.c_int32), ("stride", _Tile), ("padding", _Tile),
                ("dilation", _Tile), ("act_min", ctypes.c_int32), ("act_max", ctypes.c_int32)]


def test_scratch_mirrors_equal_cmsis_nn_getters(tmp_path: Path) -> None:
    """mpq's Python mirrors == CMSIS-NN's `*_get_buffer_size_dsp` (the Cortex-M4/M7 sizes),
    built from the checkout for the host and called on random shapes."""
    root = _cmsis_nn()
    if shutil.which("gcc") is None:
        pytest.skip("host gcc not installed")
    srcs = ["Source/ConvolutionFunctions/arm_convolve_get_buffer_sizes_s8.c",
            "Source/ConvolutionFunctions/arm_convolve_get_buffer_sizes_s4.c",
            "Source/ConvolutionFunctions/arm_depthwise_conv_get_buffer_sizes_s8.c",
            "Source/ConvolutionFunctions/arm_depthwise_conv_get_buffer_sizes_s4.c",
            "Source/PoolingFunctions/arm_avgpool_get_buffer_sizes_s8.c"]
    lib_path = tmp_path / "getters.so"
    subprocess.run(["gcc", "-O1", "-shared", "-fPIC", f"-I{root / 'Include'}", "-o",
                    str(lib_path), *(str(root / s) for s in srcs)], check=True)
    lib = ctypes.CDLL(str(lib_path))
    rng = np.random.default_rng(0)
    for _ in range(400):
        kh, kw = (int(v) for v in rng.choice([1, 2, 3, 5], 2))
        cin = int(rng.integers(1, 24))
        mult = int(rng.choice([1, 1, 2]))
        sh, sw = (int(v) for v in rng.integers(1, 3, 2))
        dh, dw = (int(v) for v in rng.choice([1, 1, 2], 2))
        pt, pl = (int(v) for v in rng.integers(0, 3, 2))
        h = int(rng.choice([1, 7]))
        w = 9
        x = _Dims(1, h, w, cin)
        out = _Dims(1, 4, 4, cin * mult)
        conv = _ConvParams(0, 0, _Tile(sw, sh), _Tile(pl, pt), _Tile(dw, dh), -128, 127)
        f = _Dims(cin * mult, kh, kw, cin)
        args = (ctypes.byref(conv), ctypes.byref(x), ctypes.byref(f), ctypes.byref(out))
        assert lib.arm_convolve_wrapper_s8_get_buffer_size_dsp(*args) == \
            cmsis.conv_s8_scratch(kh, kw, cin, sw, (pt, pl), (dh, dw))
        assert lib.arm_convolve_wrapper_s4_get_buffer_size_dsp(*args) == \
            cmsis.conv_s4_scratch(kh, kw, cin, (pt, pl), (dh, dw))
        dwp = _DwParams(0, 0, mult, _Tile(sw, sh), _Tile(pl, pt), _Tile(dw, dh), -128, 127)
        fd = _Dims(1, kh, kw, cin * mult)
        args = (ctypes.byref(dwp), ctypes.byref(x), ctypes.byref(fd), ctypes.byref(out))
        assert lib.arm_depthwise_conv_wrapper_s8_get_buffer_size_dsp(*args) == \
            cmsis.dw_s8_scratch(kh, kw, cin, cin * mult, (pt, pl), (dh, dw))
        assert lib.arm_depthwise_conv_wrapper_s4_get_buffer_size_dsp(*args) == \
            cmsis.dw_s4_scratch(kh, kw, cin, cin * mult, (dh, dw))
        assert lib.arm_avgpool_s8_get_buffer_size_dsp(4, cin) == cmsis.avgpool_s8_scratch(cin)


# -- bit-exact with CMSIS-NN ----------------------------------------------------------------

# Single layers that reach each CMSIS-NN kernel variant: (name, conv_pad_model arguments,
# CMSIS-NN function or None when the layer must stay portable).
LAYERS = [
    ("conv3x3", dict(pads=(1, 1, 1, 1)), "arm_convolve_wrapper_s8"),
    ("conv3x3_s2_same", dict(pads=(0, 0, 1, 1), stride=2), "arm_convolve_wrapper_s8"),
    ("conv_dilated", dict(pads=(2, 2, 2, 2), dilation=2), "arm_convolve_wrapper_s8"),
    ("conv_odd_k", dict(pads=(1, 1, 1, 1), cin=3, cout=5), "arm_convolve_wrapper_s8"),
    ("conv1x1", dict(pads=(0, 0, 0, 0), kernel=1), "arm_convolve_wrapper_s8"),
    ("conv1x1_s2", dict(pads=(0, 0, 0, 0), kernel=1, stride=2), "arm_convolve_wrapper_s8"),
    ("conv1xn", dict(pads=(0, 1, 0, 1), kernel=(1, 3), hw=(1, 12)), "arm_convolve_wrapper_s8"),
    ("conv1x1_padded", dict(pads=(0, 0, 1, 1), kernel=1), None),
    ("dw3x3", dict(pads=(1, 1, 1, 1), group=8, cin=8, cout=8),
     "arm_depthwise_conv_wrapper_s8"),
    ("dw3x3_c6_s2_same", dict(pads=(0, 0, 1, 1), stride=2, group=6, cin=6, cout=6),
     "arm_depthwise_conv_wrapper_s8"),
    ("dw3x3_s2", dict(pads=(1, 1, 1, 1), stride=2, group=8, cin=8, cout=8),
     "arm_depthwise_conv_wrapper_s8"),
    ("dw3x3_pad2", dict(pads=(2, 2, 2, 2), group=4, cin=4, cout=4),
     "arm_depthwise_conv_wrapper_s8"),
    ("dw3x3_right2", dict(pads=(0, 0, 2, 2), group=4, cin=4, cout=4), None),
    ("dw5x5", dict(pads=(2, 2, 2, 2), kernel=5, group=6, cin=6, cout=6),
     "arm_depthwise_conv_wrapper_s8"),
    ("dw_dilated", dict(pads=(2, 2, 2, 2), dilation=2, group=4, cin=4, cout=4),
     "arm_depthwise_conv_wrapper_s8"),
    ("dw_mult2", dict(pads=(1, 1, 1, 1), group=4, cin=4, cout=8),
     "arm_depthwise_conv_wrapper_s8"),
]


def _layer_model(name: str):
    args = next(a for n, a, _ in LAYERS if n == name)
    return B.conv_pad_model(**args)


@pytest.mark.parametrize("name", [n for n, _, _ in LAYERS])
def test_single_layers_bit_exact_on_host(tmp_path: Path, name: str) -> None:
    """CMSIS-NN's plain-C paths (host gcc), int8 and int4 weights, against the reference."""
    _cmsis_nn()
    expected = next(f for n, _, f in LAYERS if n == name)
    plan, graph = _int8_plan(tmp_path, _layer_model(name), name, io="external")
    x = _random(graph, 4)
    for bits in (8, 4):
        _with_weight_bits(plan, bits, graph)
        (call,) = _calls(_report(plan, graph)).values()
        want = expected.replace("_s8", f"_s{bits}") if expected else "mpq_conv2d"
        assert call == want
        assert verify(plan, graph, x, "host", "cmsis-nn").mismatches == 0, (name, bits)


@pytest.mark.parametrize("model", ["residual_add", "uniform_fc", "concat", "pool_softmax",
                                   "batchnorm_maxpool"])
def test_other_kernels_bit_exact_on_host(tmp_path: Path, model: str) -> None:
    """Add, fully connected (per-channel s8, per-tensor s4), pools, softmax."""
    _cmsis_nn()
    build = {"residual_add": residual_add_model, "uniform_fc": uniform_fc_model,
             "concat": B.concat_model, "pool_softmax": B.tf2onnx_style_model,
             "batchnorm_maxpool": B.batchnorm_standalone_model}[model]
    plan, graph = _int8_plan(tmp_path, build(), model)
    x = _random(graph, 4)
    calls = set(_calls(_report(plan, graph)).values())
    expected = {"residual_add": {"arm_elementwise_add_s8"},
                "uniform_fc": {"arm_fully_connected_per_channel_s8"},
                "concat": {"arm_avgpool_s8", "arm_softmax_s8", "mpq_copy_view"},
                "pool_softmax": {"arm_avgpool_s8", "arm_softmax_s8"},
                "batchnorm_maxpool": {"arm_max_pool_s8"}}[model]
    assert expected <= calls
    assert verify(plan, graph, x, "host", "cmsis-nn").mismatches == 0
    if model == "uniform_fc":
        _with_weight_bits(plan, 4, graph)
        assert set(_calls(_report(plan, graph)).values()) == {"arm_fully_connected_s4"}
        assert verify(plan, graph, x, "host", "cmsis-nn").mismatches == 0


QEMU_LAYERS = ["conv3x3_s2_same", "conv_odd_k", "conv1x1", "dw3x3_c6_s2_same", "dw3x3_s2",
               "dw5x5", "dw_mult2"]


@pytest.mark.parametrize("name", QEMU_LAYERS)
def test_single_layers_bit_exact_on_cortex_m4(tmp_path: Path, name: str) -> None:
    """The DSP (SMLAD) paths of the convolution kernels, int8 and int4 weights."""
    _cmsis_nn()
    _cross_tools()
    plan, graph = _int8_plan(tmp_path, _layer_model(name), name, io="external")
    x = _random(graph, 2)
    for bits in (8, 4):
        _with_weight_bits(plan, bits, graph)
        assert verify(plan, graph, x, "qemu-m4", "cmsis-nn").mismatches == 0, (name, bits)


SHARED = [("pretrainedResnet.onnx", 255.0), ("vww_96_float.onnx", 1.0),
          ("kws_ref_model_fp32.onnx", 1.0), ("ad01_fp32.onnx", 1.0)]


@pytest.mark.parametrize("name,scale", SHARED)
def test_shared_models_int8_bit_exact_on_cortex_m4(name: str, scale: float) -> None:
    _cmsis_nn()
    _cross_tools()
    path = shared_model(name)
    graph = load_model(path)
    x = _random(graph, 16, scale)
    plan = search(path, graph, get_board("nano33ble"), dataset_from_array(x, "random"),
                  # overlapped layers keep the portable kernel (CMSIS-NN's write order is
                  # not the one the overlap assumes): these plans are made for CMSIS-NN
                  SearchOptions(strategy="int8", patches="none", overlap=False)).plan
    report = _report(plan, graph)
    assert sum(x["backend"] == "cmsis-nn" for x in report["layers"]) >= 4
    cm = verify(plan, graph, x[:2], "qemu-m4", "cmsis-nn")
    assert cm.mismatches == 0 and cm.backend == "cmsis-nn" and cm.instructions > 100_000


def test_mixed_plans_bit_exact_on_cortex_m4_and_m7() -> None:
    """A searched mixed plan (patch stage, 4-bit maps) and KWS with int4 weights on int8
    activations (the `_s4` kernels)."""
    _cmsis_nn()
    _cross_tools()
    path = shared_model("vww_96_float.onnx")
    graph = load_model(path)
    x = _random(graph, 16)
    plan = search(path, graph, get_board("nano33ble"), dataset_from_array(x, "random"),
                  # 38,000 B and up now fit 8-bit patches (the default's wider patch space)
                  SearchOptions(sram=36_000)).plan
    assert plan.patch is not None and min(t.bits for t in plan.tensors) < 8
    assert verify(plan, graph, x[:2], "qemu-m4", "cmsis-nn").mismatches == 0

    path = shared_model("kws_ref_model_fp32.onnx")
    graph = load_model(path)
    x = _random(graph, 16)
    plan = search(path, graph, get_board("nano33ble"), dataset_from_array(x, "random"),
                  # overlapped layers keep the portable kernel (CMSIS-NN's write order is
                  # not the one the overlap assumes): these plans are made for CMSIS-NN
                  SearchOptions(strategy="int8", patches="none", overlap=False)).plan
    _with_weight_bits(plan, 4, graph)
    assert "arm_convolve_wrapper_s4" in _calls(_report(plan, graph)).values()
    for target in ("qemu-m4", "qemu-m7"):
        assert verify(plan, graph, x[:2], target, "cmsis-nn").mismatches == 0, target


def test_mpq_mk_and_export_build(tmp_path: Path) -> None:
    """A make build that includes mpq.mk compiles exactly the CMSIS-NN sources it lists, and
    refuses with one message without CMSIS_NN_PATH; `mpq export --build` links them."""
    root = _cmsis_nn()
    _cross_tools()
    if shutil.which("make") is None:
        pytest.skip("make not installed")
    plan, graph = _int8_plan(tmp_path, B.concat_model(), "concat")
    plan_path = tmp_path / "concat.plan.json"
    plan.save(plan_path)
    out = tmp_path / "fw"
    write_export(render_export(plan, graph, "cmsis-nn"), out)
    (tmp_path / "Makefile").write_text(
        "include fw/mpq.mk\n"
        "OBJS := $(patsubst %.c,%.o,$(notdir $(MPQ_SRCS)))\n"
        "vpath %.c $(sort $(dir $(MPQ_SRCS)))\n"
        "all: $(OBJS)\n"
        "%.o: %.c\n"
        "\tarm-none-eabi-gcc $(MPQ_CPU_FLAGS) $(MPQ_INCLUDES) -O2 -c $< -o $@\n")
    env = {k: v for k, v in os.environ.items() if k != cmsis.ENV}
    r = subprocess.run(["make", "-s"], cwd=tmp_path, capture_output=True, text=True, env=env)
    assert r.returncode != 0 and "set CMSIS_NN_PATH" in r.stderr
    r = subprocess.run(["make", "-s", "-j2", f"CMSIS_NN_PATH={root}"], cwd=tmp_path,
                       capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr
    report = json.loads((out / "mpq_report.json").read_text())
    built = sorted(p.name for p in tmp_path.glob("*.o"))
    assert built == sorted(Path(s).stem + ".o" for s in report["cmsis_nn"]["sources"]
                           + c_sources(report["files"]))
    r = run_mpq("export", plan_path, "-o", tmp_path / "fw2", "--backend", "cmsis-nn", "--build")
    assert r.returncode == 0, r.stderr
    measured = json.loads((tmp_path / "fw2" / "mpq_report.json").read_text())["measured"]
    assert measured["mpq_arena"] >= report["predicted"]["arena_bytes"]
    assert 0 < measured["flash_bytes"] <= get_board("nano33ble").flash_region_obj.length


def test_measured_stack_counts_cmsis_nn_frames(tmp_path: Path) -> None:
    """`export --build`'s stack bound walks CMSIS-NN's frames too (its sources are compiled
    apart, with their own call graphs): a model whose only layer is a CMSIS-NN fully
    connected call is bounded at least by that call's deepest chain plus the caller's frame
    (without the library's call graph the bound stopped at mpq_model_run's own frame)."""
    from mpq import firmware
    from mpq.budget import STACK_FLAG, read_call_graph, stack_depth
    from mpq.codegen.export import measure_build

    root = _cmsis_nn()
    _cross_tools()
    plan, graph = _int8_plan(tmp_path, uniform_fc_model(), "fc")
    files = render_export(plan, graph, "cmsis-nn")
    report = json.loads(files["mpq_report.json"])
    called = {layer["call"] for layer in report["layers"] if layer["backend"] == "cmsis-nn"}
    assert called and all(c.startswith("arm_") for c in called)
    board = get_board("nano33ble")
    objects = firmware.library_objects([root / s for s in report["cmsis_nn"]["sources"]],
                                       [root / "Include"], board, tmp_path / "lib",
                                       extra_flags=[STACK_FLAG])
    frames, calls = read_call_graph([firmware.call_graph_file(o) for o in objects])
    deepest = max(stack_depth(frames, calls, c) for c in called)
    assert deepest > 0
    measured = measure_build(files, board)
    assert measured["model_stack_bytes"] >= deepest + 8  # + mpq_model_run's frame (LR at least)


def softmax_only_cmsis_model(seed: int = 0):
    """Gemm 16 → 10 with weights of uneven row ranges, then Softmax: at 4-bit weights the Gemm
    stays portable (no per-channel s4 fully connected in CMSIS-NN), so softmax is the only
    CMSIS-NN call, and it takes no context."""
    b = B._Builder(seed)
    w = b.rng.uniform(-0.5, 0.5, (10, 16)).astype(np.float32)
    x = b.node("Gemm", ["input", b.init("fc.weight", w), b.init("fc.bias", b.small(10))],
               "/fc/Gemm", alpha=1.0, beta=1.0, transB=1)
    b.node("Softmax", [x], "/Softmax", outputs=["output"], axis=1)
    return b.model("main_graph", [B._input("input", ["batch", 16])], ["output"])


def test_softmax_only_export_compiles_with_werror(tmp_path: Path) -> None:
    """The model source builds with -Wall -Wextra -Werror when the only CMSIS-NN call takes no
    context (the shared cmsis_nn_context must not be an unused variable)."""
    root = _cmsis_nn()
    if shutil.which("gcc") is None:
        pytest.skip("gcc not installed")
    plan, graph = _int8_plan(tmp_path, softmax_only_cmsis_model(), "softmax_only")
    _with_weight_bits(plan, 4, graph)
    assert set(_calls(_report(plan, graph)).values()) == {"mpq_fully_connected", "arm_softmax_s8"}
    out = tmp_path / "fw"
    write_export(render_export(plan, graph, "cmsis-nn"), out)
    r = subprocess.run(["gcc", "-std=c99", "-O1", "-Wall", "-Wextra", "-Werror", f"-I{out}",
                        f"-I{root / 'Include'}", "-c", str(out / "mpq_model.c"),
                        "-o", str(tmp_path / "mpq_model.o")], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


# -- conv fused with its residual add: CMSIS-NN conv band by band + arm_elementwise_add_s8 ------

def test_fused_add_rows() -> None:
    """Bands take the plan's scratch beside the conv's own (16-byte aligned), 1 row at least,
    the whole output at most."""
    assert cmsis.fused_add_rows(32, 16, 32, 576, 2304) == 3  # (2304 - 576) // 512
    assert cmsis.fused_add_rows(8, 64, 8, 2304, 2304) == 1  # no room left: one row
    assert cmsis.fused_add_rows(8, 64, 8, 570, 0) == 1
    assert cmsis.fused_add_rows(7, 8, 6, 100, 10_000) == 6
    assert cmsis.fused_add_rows(7, 8, 6, 104, 112 + 2 * 56) == 2  # 104 → 112 aligned


# (name, stride, groups of the 3x3 conv, the conv the plan fuses with the add): with a
# depthwise 3x3 the order puts the 1x1 skip conv last, so the 1x1 stride-2 conv is fused.
FUSED = [("s1", 1, 1, "/c1/Conv"), ("s2", 2, 1, "/c1/Conv"), ("1x1_s2", 2, 8, "/sk/Conv")]


def _fused_plan(tmp: Path, stride: int, group: int, conv: str):
    plan, graph = _int8_plan(tmp, fused_block_model(stride, group=group), f"fused{stride}")
    assert plan.schedule["fused_adds"] == {"/add/Add": {
        "conv": conv, "skip": ({"/c1/Conv", "/sk/Conv"} - {conv}).pop() + "_output_0"}}
    return plan, graph


@pytest.mark.parametrize("name,stride,group,conv", FUSED)
def test_fused_conv_add_bit_exact_on_host(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                          name: str, stride: int, group: int, conv: str) -> None:
    """The fused conv+add through CMSIS-NN for bands of 1, 2 (the top padding in the first
    band only) and all rows; int8 and int4 weights; bytes equal to the integer reference."""
    _cmsis_nn()
    plan, graph = _fused_plan(tmp_path, stride, group, conv)
    x = _random(graph, 3)
    for bits in (8, 4):
        _with_weight_bits(plan, bits, graph)
        calls = _calls(_report(plan, graph))
        assert calls[f"{conv} + /add/Add"] == \
            f"arm_convolve_wrapper_s{bits} + arm_elementwise_add_s8"
        for rows in (1, 2, 99):
            monkeypatch.setattr(cmsis, "fused_add_rows", lambda *a, r=rows: min(r, a[2]))
            model_c = render_export(plan, graph, "cmsis-nn")["mpq_model.c"]
            assert f"per band of {min(rows, 11 if stride == 1 else 6)} output row" in model_c
            assert verify(plan, graph, x, "host", "cmsis-nn").mismatches == 0, (bits, rows)


@pytest.mark.parametrize("name,stride,group,conv", FUSED[1:])
def test_fused_conv_add_bit_exact_on_cortex_m4(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                               name: str, stride: int, group: int,
                                               conv: str) -> None:
    """The same on the DSP paths (qemu-m4), bands of 2 rows."""
    _cmsis_nn()
    _cross_tools()
    plan, graph = _fused_plan(tmp_path, stride, group, conv)
    monkeypatch.setattr(cmsis, "fused_add_rows", lambda *a: 2)
    assert verify(plan, graph, _random(graph, 2), "qemu-m4", "cmsis-nn").mismatches == 0
