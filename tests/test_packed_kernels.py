"""The packed sub-byte kernels (kernels/mpq_packed.c) against the library's reference kernels.

tests/packed_cases.c runs 200 random layers per kernel (1x1 conv, KxK conv, fully connected,
conv fused with a residual add) and bit mix (a4w4, a2w2, a4w2, a2w4) through mpq_packed_* and
through mpq_conv2d / mpq_fully_connected / mpq_conv2d_add, byte for byte, in one program: on
the host (plain C, and the emulated DSP loops with -fsanitize=address,undefined) and as one
firmware run under QEMU's M4 and M7 (the real SMLAD). Every target must print the same lines,
i.e. the same outputs.
"""

from __future__ import annotations

import ctypes
import json
import re
import shutil
import subprocess
from functools import cache
from pathlib import Path
from types import SimpleNamespace

import ckernels as ck
import numpy as np
import onnx_builders as B
import pytest

from mpq import firmware
from mpq.boards import get_board
from mpq.codegen import packed
from mpq.codegen.export import render_export
from mpq.frontend import load_model
from mpq.quant import arith
from mpq.quant.calibrate import dataset_from_array, onnx_input_shape
from mpq.search.driver import SearchOptions, search
from mpq.verify import verify

REPO = Path(__file__).resolve().parents[1]
KERNELS = REPO / "kernels"
CASES_C = REPO / "tests" / "packed_cases.c"
FLAGS = ("-std=c99", "-O0", "-Wall", "-Wextra", "-Werror")  # -O0: compiles fast
SANITIZE = ("-fsanitize=address,undefined", "-fno-sanitize-recover=all")
KINDS = ("conv1x1", "convkxk", "fc", "convadd")
MIXES = ("a4w4", "a2w2", "a4w2", "a2w4")
#: mpq_conv2d_unpacked (sub-byte weights of every format, sub-byte inputs) against mpq_conv2d
UNPACK_KINDS = ("unpack1x1", "unpackkxk")
UNPACK_MIXES = ("a8w4", "a8w2", "a8w3", "a4w8", "a2w8", "a4w3")
#: the 4-/2-bit depthwise channel-group path (mpq_depthwise_inplace) against mpq_conv2d, per
#: activation and weight bits; 4-/2-bit average and max pooling (mpq_avgpool's and
#: mpq_maxpool's channel groups, outputs of any bits: "o0") against the formulas
DW_MIXES = ("a4w4", "a4w2", "a4w8", "a2w2", "a2w4", "a2w8")
POOL_MIXES = ("a4o0", "a2o0")
#: what the cases call: the packed kernels and the reference ones
SOURCES = tuple(KERNELS / n for n in ("mpq_packed.c", "mpq_conv.c", "mpq_dot.c",
                                      "mpq_fully_connected.c", "mpq_support.c",
                                      "mpq_depthwise.c", "mpq_pool.c"))
LINE = re.compile(r"^(\w+) (a\d[wo]\d) cases=(\d+) bad=(\d+) sum=(\d+)$")


def _check(stdout: str) -> list[tuple[str, ...]]:
    """The result lines: one per kind and mix, 200 cases each, none mismatching."""
    rows = [LINE.match(line) for line in stdout.splitlines()]
    assert all(rows), stdout
    got = [r.groups() for r in rows if r]
    assert [(k, m) for k, m, *_ in got] == [(k, m) for k in KINDS for m in MIXES] + [
        (k, m) for k in UNPACK_KINDS for m in UNPACK_MIXES] + [
        ("unpackadd", m) for m in ("a4w8", "a8w4", "a2w8")] + [
        ("dwinplace", m) for m in DW_MIXES] + [(k, m) for k in ("avgpool", "maxpool")
                                                for m in POOL_MIXES] + [("requant", "a8o8")], stdout
    for kind, mix, cases, bad, _ in got:
        assert int(cases) >= 200, (kind, mix)
        assert int(bad) == 0, f"{kind} {mix}: {bad} of {cases} cases differ from the reference"
    return got


@cache
def _host_run(dsp: bool, tmp: str) -> list[tuple[str, ...]]:
    exe = Path(tmp) / ("cases_dsp" if dsp else "cases")
    # the DSP loops (the code the Cortex-M runs) under the sanitizers; the plain ones as is
    cmd = ["gcc", *FLAGS, *(SANITIZE + ("-DMPQ_EMULATE_DSP",) if dsp else ()), "-DPACKED_HOST",
           f"-I{KERNELS}", str(CASES_C), *map(str, SOURCES), "-o", str(exe)]
    subprocess.run(cmd, check=True, capture_output=True, text=True)
    run = subprocess.run([str(exe)], capture_output=True, text=True, timeout=300,
                         env={"ASAN_OPTIONS": "detect_leaks=0"})
    assert run.returncode == 0 and "runtime error" not in run.stderr, run.stdout + run.stderr
    return _check(run.stdout)


@pytest.fixture(scope="module")
def host(tmp_path_factory) -> list[tuple[str, ...]]:
    if shutil.which("gcc") is None:
        pytest.skip("needs host gcc")
    tmp = str(tmp_path_factory.mktemp("packed"))
    plain = _host_run(False, tmp)
    # the DSP loops (emulated intrinsics) compute the very same bytes as the plain C ones
    assert _host_run(True, tmp) == plain
    return plain


def test_packed_kernels_match_reference_on_host(host) -> None:
    assert len(host) == len(KINDS) * len(MIXES) + len(UNPACK_KINDS) * len(UNPACK_MIXES) + 3 \
        + len(DW_MIXES) + 2 * len(POOL_MIXES) + 1


@pytest.mark.parametrize("target", ["qemu-m4", "qemu-m7"])
def test_packed_kernels_match_reference_under_qemu(host, tmp_path: Path, target: str) -> None:
    try:
        tools = firmware.require_tools(target)
    except Exception as exc:  # noqa: BLE001 - a missing toolchain skips, as test_firmware
        pytest.skip(str(exc))
    elf = firmware.build_elf([CASES_C, *SOURCES], [KERNELS], target, tmp_path / "build",
                             extra_flags=["-Werror", "-std=c99"], toolchain=tools)
    objdump = tools.nm[: -len("nm")] + "objdump"
    dis = subprocess.run([objdump, "-d", str(elf)], capture_output=True, text=True,
                         check=True).stdout
    assert "smlad" in dis  # the real DSP path runs here
    run = firmware.run_qemu(elf, target, tmp_path / "run", timeout=300, toolchain=tools)
    assert run.returncode == 0, run.stdout + run.stderr
    # the same outputs (checksums) as the host: bit-exact across targets
    assert _check(run.stdout) == host


# -- the export side: mpq.codegen.packed ---------------------------------------------------------

def test_extraction_periods_are_the_kernels() -> None:
    """The field bounds give the periods kernels/mpq_packed.c hard-codes (a4w4, a2w2, a4w2,
    a2w4); tests/packed_cases.c's extreme cases fail when one is raised."""
    assert [packed.extraction_period(a, w) for a, w in ((4, 4), (2, 2), (4, 2), (2, 4))] == \
        [1, 21, 3, 4]


def test_python_packing_is_the_c_packing(tmp_path: Path) -> None:
    """`packed.pack_filter` (what mpq exports) gives mpq_packed_pack's words and biases."""
    lib_path = tmp_path / "libpk.so"
    subprocess.run(["gcc", "-std=c99", "-O1", "-shared", "-fPIC", f"-I{KERNELS}",
                    str(KERNELS / "mpq_packed.c"), str(KERNELS / "mpq_support.c"), "-o",
                    str(lib_path)], check=True)
    lib = ctypes.CDLL(str(lib_path))
    rng = np.random.default_rng(3)
    for _ in range(40):
        wbits, abits = int(rng.choice([4, 2])), int(rng.choice([4, 2]))
        n, k = int(rng.integers(1, 9)), int(rng.integers(1, 70))
        lim = (1 << (wbits - 1)) - 1
        w = rng.integers(-lim, lim + 1, size=(n, k))
        bias = rng.integers(-2**31, 2**31, size=n).astype(np.int32)
        zp = int(rng.integers(-(1 << (abits - 1)), 1 << (abits - 1)))
        codes = arith.pack(np.asarray(w, np.int64) & ((1 << wbits) - 1), wbits)
        filt = ck.Filter(codes.ctypes.data, wbits, n, 1, 1, k, 0, None)
        words = np.zeros(n * ((k + 15) // 16) * wbits // 2, np.uint32)
        cb = np.zeros(n, np.int32)
        rc = lib.mpq_packed_pack(ctypes.byref(filt), bias.ctypes.data_as(ck.P_I32), abits, zp,
                                 words.ctypes.data_as(ctypes.c_void_p), cb.ctypes.data_as(ck.P_I32))
        assert rc == 0
        py_words, py_cb = packed.pack_filter(w, wbits, bias, abits, zp)
        assert np.array_equal(py_words, words) and np.array_equal(py_cb, cb)


def test_packed_choice_says_why_not() -> None:
    conv = SimpleNamespace(op="conv2d", attrs={"groups": 1})
    assert packed.packed_choice(conv, "cortex-m4", 4, 4, 0, False, False) is None
    assert packed.packed_choice(conv, "cortex-m7", 2, 4, 0, False, False) is None
    assert "no DSP" in packed.packed_choice(conv, "cortex-m0plus", 4, 4, 0, False, False)
    assert "8-bit activations" in packed.packed_choice(conv, "cortex-m4", 8, 4, 0, False, False)
    assert "8-bit weights" in packed.packed_choice(conv, "cortex-m4", 4, 8, 0, False, False)
    assert "non-linear" in packed.packed_choice(conv, "cortex-m4", 4, 4, 1, False, False)
    # a convolution fused with its residual add takes mpq_packed_conv2d_add
    assert packed.packed_choice(conv, "cortex-m4", 4, 4, 0, True, False) is None
    dw = SimpleNamespace(op="conv2d", attrs={"groups": 8})
    assert "depthwise" in packed.packed_choice(dw, "cortex-m4", 4, 4, 0, False, False)


def test_group_choice_says_why_not() -> None:
    """Sub-byte depthwise and pooling run their channels in byte groups; the report says when
    a layer cannot (mpq_conv2d's depthwise, channels that do not fill whole bytes, filters above
    25 taps, pooling in place, other kernels) and whether the SIMD rows apply."""
    dw = SimpleNamespace(op="conv2d", weight=np.zeros((8, 3, 3, 1), np.int8),
                         attrs={"groups": 8, "strides": (2, 2), "dilations": (1, 1)})
    assert packed.group_choice(dw, "depthwise_inplace", 2, 8, "cortex-m4") is None
    assert packed.group_simd(dw, "depthwise_inplace", 2, 8, "cortex-m4")
    assert not packed.group_simd(dw, "depthwise_inplace", 2, 8, "cortex-m0plus")
    assert packed.group_choice(dw, "depthwise_inplace", 4, 8, "cortex-m0plus") is None
    assert "quads" in packed.group_choice(dw, "depthwise_inplace", 2, 6, "cortex-m4")
    assert packed.group_choice(dw, "depthwise_inplace", 4, 6, "cortex-m4") is None
    assert "in-place" in packed.group_choice(dw, "conv2d", 4, 8, "cortex-m4")
    big = SimpleNamespace(op="conv2d", weight=np.zeros((8, 7, 7, 1), np.int8), attrs=dw.attrs)
    assert "25 taps" in packed.group_choice(big, "depthwise_inplace", 4, 8, "cortex-m4")
    pool = SimpleNamespace(op="avg_pool", attrs={"kernel": (3, 3), "strides": (1, 1)})
    assert packed.group_choice(pool, "avgpool", 2, 12, "cortex-m7") is None
    assert not packed.group_simd(pool, "avgpool", 2, 12, "cortex-m7")  # < 16 channels a word
    assert packed.group_simd(pool, "avgpool", 2, 32, "cortex-m7")
    assert "in place" in packed.group_choice(pool, "avgpool", 4, 8, "cortex-m4", True)
    assert packed.group_choice(pool, "maxpool", 4, 8, "cortex-m4") is None
    assert packed.group_simd(pool, "maxpool", 4, 8, "cortex-m4")
    assert "in place" in packed.group_choice(pool, "maxpool", 2, 8, "cortex-m4", True)
    assert "channel-group" in packed.group_choice(pool, "mean", 4, 8, "cortex-m4")


def test_unpack_choice_says_why_not() -> None:
    """mpq_conv2d_unpacked takes 8-bit-input convolutions with sub-byte weights whose unpacked
    weights fit the plan's scratch; mpq_report.json gets the reason otherwise."""
    w = np.zeros((16, 3, 3, 2), dtype=np.int8)
    conv = SimpleNamespace(op="conv2d", attrs={"groups": 1, "strides": (1, 1),
                                               "pads": (1, 1, 1, 1)}, weight=w)
    need = packed.unpacked_scratch(conv, (1, 8, 8, 2), (1, 8, 8, 16))
    assert need == 16 * 18 + 2 * 18  # the int8 weights + the int8 path's two columns
    one = SimpleNamespace(op="conv2d", attrs={"groups": 1, "strides": (1, 1),
                                              "pads": (0, 0, 0, 0)},
                          weight=np.zeros((3, 1, 1, 5), dtype=np.int8))
    assert packed.unpacked_scratch(one, (1, 4, 4, 5), (1, 4, 4, 3)) == 16  # read in place
    assert packed.unpack_choice(conv, 8, 4, False, False, need, need) is None
    assert packed.unpack_choice(conv, 8, 3, False, False, need, 4096) is None
    assert "more than the plan's" in packed.unpack_choice(conv, 8, 2, False, False, need,
                                                          need - 1)
    # fused with its residual add: mpq_conv2d_add_unpacked
    assert packed.unpack_choice(conv, 8, 4, True, False, need, 4096) is None
    # sub-byte inputs are unpacked into the int8 columns, also for a 1x1 layer
    assert packed.unpack_choice(conv, 4, 8, False, False, 36, 36) is None
    assert packed.unpacked_scratch(one, (1, 4, 4, 5), (1, 4, 4, 3), 4, 8) == 10
    assert packed.unpacked_scratch(conv, (1, 8, 8, 2), (1, 8, 8, 16), 2, 8) == 36
    assert "8-bit input and 8-bit linear" in packed.unpack_choice(conv, 8, 8, False, False,
                                                                  need, 4096)
    assert packed.unpack_choice(conv, 8, 8, False, False, need, 4096, linear=False) is None
    dw = SimpleNamespace(op="conv2d", attrs={"groups": 8})
    assert "depthwise" in packed.unpack_choice(dw, 8, 4, False, True, need, 4096)


@pytest.mark.parametrize("bits", [4, 2])
def test_sub_byte_plan_exports_packed_kernels_bit_exact(tmp_path: Path, bits: int) -> None:
    """An all-`bits` plan on a Cortex-M4 board calls the packed kernels for its conv and fully
    connected layers, says in mpq_report.json why the others do not, and its export equals the
    integer reference on the host (and, for 4 bits, under qemu-m4)."""
    model = B.kws_style_model(channels=24, num_blocks=1)
    path = tmp_path / "m.onnx"
    path.write_bytes(model.SerializeToString())
    graph = load_model(path)
    x = np.random.default_rng(1).random((16, *onnx_input_shape(graph))).astype(np.float32)
    plan = search(path, graph, get_board("nano33ble"), dataset_from_array(x, "m"),
                  SearchOptions(strategy="int8", bits=(bits,), weight_bits=(bits,),
                                weight_scheme="linear", patches="none")).plan
    layers = json.loads(render_export(plan, graph)["mpq_report.json"])["layers"]
    used = [e for e in layers if e.get("packed", {}).get("used")]
    assert {e["call"] for e in used} >= {"mpq_packed_conv2d", "mpq_packed_fully_connected"}
    for e in layers:
        if "packed" in e and not e["packed"]["used"]:
            assert e["packed"]["reason"] and not e["call"].startswith("mpq_packed")
    # the depthwise (in place) and the average pooling take the channel groups, the 3x3
    # depthwise with SIMD rows; the pooling's 24 channels fill words of 4-bit channels (8) but
    # not of 2-bit ones (16)
    # (their own entry points, mpq_<kernel>_grouped: an int8 export does not link them)
    groups = {e["call"]: e["channel_groups"] for e in layers if "channel_groups" in e}
    assert groups == {"mpq_depthwise_inplace_grouped": {"used": True, "simd": True},
                      "mpq_avgpool_grouped": {"used": True, "simd": bits == 4}}, groups
    plan8 = search(path, graph, get_board("nano33ble"), dataset_from_array(x, "m"),
                   SearchOptions(strategy="int8", patches="none")).plan
    model_c = render_export(plan8, graph)["mpq_model.c"]
    assert "mpq_depthwise_inplace(" in model_c and "mpq_avgpool(" in model_c
    assert "_grouped" not in model_c
    assert verify(plan, graph, x[:4], "host").mismatches == 0
    if bits == 4 and shutil.which("qemu-system-arm") and shutil.which("arm-none-eabi-gcc"):
        assert verify(plan, graph, x[:2], "qemu-m4").mismatches == 0


def test_residual_w4a4_plan_exports_packed_conv_add_bit_exact() -> None:
    """The Fashion example's all-4-bit plan runs its convolutions fused with a residual add
    through mpq_packed_conv2d_add, bit-exact with the integer reference (host and qemu-m4)."""
    path = REPO / "examples" / "fashion" / "fashion_cnn.onnx"
    graph = load_model(path)
    x = np.load(REPO / "examples" / "fashion" / "test.npz")["x"][:16].astype(np.float32)
    plan = search(path, graph, get_board("nano33ble"), dataset_from_array(x, "fashion"),
                  SearchOptions(strategy="qe", bits=(4,), weight_bits=(4,),
                                weight_scheme="linear", patches="none",
                                scratch="separate")).plan
    layers = json.loads(render_export(plan, graph)["mpq_report.json"])["layers"]
    calls = [e["call"] for e in layers]
    assert calls.count("mpq_packed_conv2d_add") == len(plan.schedule["fused_adds"]) >= 1
    # the first layer (8-bit input, 4-bit weights) runs the int8 path on unpacked weights,
    # within the plan's scratch
    assert calls[0] == "mpq_conv2d_unpacked" and layers[0]["unpacked"] == {"used": True}
    report = json.loads(render_export(plan, graph)["mpq_report.json"])["predicted"]
    assert report["scratch_bytes"] <= report["plan_scratch_bytes"]
    assert verify(plan, graph, x[:4], "host").mismatches == 0
    if shutil.which("qemu-system-arm") and shutil.which("arm-none-eabi-gcc"):
        assert verify(plan, graph, x[:2], "qemu-m4").mismatches == 0
