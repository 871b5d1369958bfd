"""The generated I/O helpers (mpq_model.h): mpq_quantize_input gives the very bytes mpq feeds
the model from the same float32 data, mpq_dequantize_output the float32 of mpq's dequantisation,
and the integer-only variants the exact fixed-point values the header states — on the host, and
they compile for the board (and for a core without an FPU) with -Werror."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO, run_mpq

from mpq.boards import get_board
from mpq.codegen.export import c_sources, export_context, io_quant
from mpq.frontend import load_model
from mpq.interpreter import to_ir_layout
from mpq.plan import load_plan, plan_quant_model
from mpq.quant.qmodel import ActQuant
from mpq.sim import dequantize, quantize_input, run_int

FASHION = REPO / "examples" / "fashion"
STRICT = ("-std=c99", "-O2", "-Wall", "-Wextra", "-Werror")

# Reads chunks of one tensor from stdin, writes the helper's results to stdout:
#   q: float[IN] -> int8[IN]      qq F: int32[IN] -> int8[IN]
#   d: int8[OUT] -> float[OUT]    dq F: int8[OUT] -> int32[OUT]
#   run: float[IN] -> int8[IN] (quantised), int8[OUT], float[OUT], int32[OUT] (frac 16)
HARNESS = r"""
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include "mpq_model.h"

static float xf[MPQ_INPUT_SIZE];
static int32_t xi[MPQ_INPUT_SIZE];
static int8_t xq[MPQ_INPUT_SIZE];
static int8_t yq[MPQ_OUTPUT0_SIZE];
static float yf[MPQ_OUTPUT0_SIZE];
static int32_t yi[MPQ_OUTPUT0_SIZE];
static int8_t *const outs[MPQ_NUM_OUTPUTS] = {yq};

int main(int argc, char **argv)
{
    const char *mode = argc > 1 ? argv[1] : "";
    int frac = argc > 2 ? atoi(argv[2]) : 0;
    for (;;) {
        if (!strcmp(mode, "q") || !strcmp(mode, "run")) {
            if (fread(xf, sizeof xf, 1, stdin) != 1) return 0;
            mpq_quantize_input(xf, xq);
            fwrite(xq, sizeof xq, 1, stdout);
            if (!strcmp(mode, "run")) {
                if (mpq_model_run(xq, outs) != 0) return 2;
                mpq_dequantize_output(0, yq, yf);
                mpq_dequantize_output_q(0, yq, yi, 16);
                fwrite(yq, sizeof yq, 1, stdout);
                fwrite(yf, sizeof yf, 1, stdout);
                fwrite(yi, sizeof yi, 1, stdout);
            }
        } else if (!strcmp(mode, "qq")) {
            if (fread(xi, sizeof xi, 1, stdin) != 1) return 0;
            mpq_quantize_input_q(xi, frac, xq);
            fwrite(xq, sizeof xq, 1, stdout);
        } else if (!strcmp(mode, "d") || !strcmp(mode, "dq")) {
            if (fread(yq, sizeof yq, 1, stdin) != 1) return 0;
            if (mode[1] == 'q') {
                mpq_dequantize_output_q(0, yq, yi, frac);
                fwrite(yi, sizeof yi, 1, stdout);
            } else {
                mpq_dequantize_output(0, yq, yf);
                fwrite(yf, sizeof yf, 1, stdout);
            }
        } else {
            return 3;
        }
    }
}
"""


@pytest.fixture(scope="module")
def fashion(tmp_path_factory) -> dict:
    """The Fashion example planned int8 for nano33ble, exported, and a host harness built."""
    root = tmp_path_factory.mktemp("io")
    shutil.copy(FASHION / "fashion_cnn.onnx", root / "fashion_cnn.onnx")
    plan_path, out = root / "f.plan.json", root / "out"
    r = run_mpq("search", root / "fashion_cnn.onnx", "--board", "nano33ble", "--strategy", "int8",
                "--patches", "none", "--data", FASHION / "calib.npz", "-o", plan_path)
    assert r.returncode == 0, r.stderr
    r = run_mpq("export", plan_path, "-o", out)
    assert r.returncode == 0, r.stderr
    plan, graph = load_plan(plan_path), load_model(root / "fashion_cnn.onnx")
    ctx = export_context(plan, graph)
    return {"root": root, "out": out, "plan": plan, "graph": graph, "ctx": ctx,
            "exe": _build_host(out, root / "harness")}


def _build_host(src: Path, exe: Path) -> Path:
    (exe.parent / "harness.c").write_text(HARNESS)
    subprocess.run(["gcc", *STRICT, "-I", str(src), "-o", str(exe), str(exe.parent / "harness.c"),
                    *(str(src / f) for f in c_sources([p.name for p in src.iterdir()]))],
                   check=True, capture_output=True, text=True)
    return exe


def _run(exe: Path, data: bytes, *args: str) -> bytes:
    return subprocess.run([str(exe), *args], input=data, capture_output=True, check=True).stdout


def _chunks(values: np.ndarray, size: int, fill) -> np.ndarray:
    """`values` padded with `fill` to whole tensors of `size` elements."""
    pad = (-len(values)) % size
    return np.concatenate([values, np.full(pad, fill, values.dtype)])


def _edge_floats(scale: float, zp: int) -> np.ndarray:
    """Ties (x/scale exactly k + 1/2 where float32 allows it), their float neighbours, the clamp
    edges and beyond, signed zeros, infinities, subnormals and random values."""
    s = np.float32(scale)
    ks = np.arange(-300, 300, dtype=np.float64)
    near = ((ks + 0.5) * np.float64(s)).astype(np.float32)
    ties = np.array([s / 2, -s / 2, s * np.float32(1.5), -s * np.float32(1.5)], np.float32)
    specials = np.array([0.0, -0.0, np.inf, -np.inf, 1e30, -1e30, 1e-45, -1e-45, 3.4e38,
                         (127 - zp) * s, (-128 - zp) * s, (127.5 - zp) * s, (-128.5 - zp) * s],
                        np.float32)
    rnd = np.random.default_rng(7).uniform(-3, 3, 5000).astype(np.float32)
    base = np.concatenate([near, ties, specials, rnd])
    return np.concatenate([base, np.nextafter(base, np.float32(np.inf)),
                           np.nextafter(base, np.float32(-np.inf))]).astype(np.float32)


def _py_quantize(x: np.ndarray, scale: float, zp: int) -> np.ndarray:
    """mpq's own quantisation (what `mpq run`/`verify` feed the model); NaN → zp as documented."""
    nan = np.isnan(x)
    q = quantize_input(ActQuant(scale, zp), np.where(nan, 0, x))
    return np.where(nan, zp, q).astype(np.int8)


def _round_away(v: Fraction) -> int:
    n = (abs(v) + Fraction(1, 2)).__floor__()
    return n if v >= 0 else -n


def _py_quantize_q(x: int, frac: int, scale: float, zp: int) -> int:
    v = Fraction(x) / Fraction(2) ** frac / Fraction(float(np.float32(scale)))
    return max(-128, min(127, _round_away(v) + zp))


def _py_dequantize_q(q: int, frac: int, scale: float, zp: int) -> int:
    v = Fraction(q - zp) * Fraction(float(np.float32(scale))) * Fraction(2) ** frac
    return max(-(2**31), min(2**31 - 1, _round_away(v)))


def _check_helpers(exe: Path, inp: dict, out: dict) -> None:
    """All four helpers of one build against the Python models of what the header says."""
    n_in, n_out = int(np.prod(inp["dims"])), int(np.prod(out["dims"]))
    s_in, zp_in, s_out, zp_out = inp["scale_f32"], inp["zero_point"], out["scale_f32"], \
        out["zero_point"]
    x = np.concatenate([_edge_floats(s_in, zp_in), np.array([np.nan, -np.nan], np.float32)])
    x = _chunks(x, n_in, np.float32(0))
    got = np.frombuffer(_run(exe, x.tobytes(), "q"), np.int8)
    want = _py_quantize(x, s_in, zp_in)
    bad = np.flatnonzero(got != want)
    assert bad.size == 0, [(float(x[i]), int(got[i]), int(want[i])) for i in bad[:5]]
    # the edge set really holds exact ties, and they rounded away from zero
    finite = x[np.isfinite(x)]
    ties = np.float64(finite) / np.float64(np.float32(s_in)) % 1 == 0.5
    assert ties.sum() >= 2

    q = _chunks(np.arange(-128, 128, dtype=np.int8), n_out, np.int8(0))
    got_f = np.frombuffer(_run(exe, q.tobytes(), "d"), np.float32)
    want_f = dequantize(ActQuant(s_out, zp_out), q).astype(np.float32)
    assert got_f.tobytes() == want_f.tobytes()

    rng = np.random.default_rng(3)
    xi = np.concatenate([rng.integers(-2**31, 2**31, 300), rng.integers(-2**18, 2**18, 300),
                         [0, 1, -1, 2**31 - 1, -2**31]]).astype(np.int64)
    for frac in (0, 8, 16, 24, 31, 32, 40, -5, 64, -64):
        # exact ties for this frac_bits: x·2^−f / scale = k + 1/2 wherever that x is an integer
        m, e = inp["scale_mantissa"], inp["scale_exponent"]
        if e + frac - 1 >= 0:
            k = np.arange(-20, 20)
            tie = (2 * k + 1) * m * 2 ** (e + frac - 1)
            vals = np.concatenate([xi, tie, tie + 1, tie - 1])
        else:
            vals = xi
        vals = vals[(vals >= -2**31) & (vals < 2**31)].astype(np.int32)
        vals = _chunks(vals, n_in, np.int32(0))
        got = np.frombuffer(_run(exe, vals.tobytes(), "qq", str(frac)), np.int8)
        want = [_py_quantize_q(int(v), frac, s_in, zp_in) for v in vals]
        assert got.tolist() == want, frac
        got_i = np.frombuffer(_run(exe, q.tobytes(), "dq", str(frac)), np.int32)
        assert got_i.tolist() == [_py_dequantize_q(int(v), frac, s_out, zp_out) for v in q], frac


def test_helpers_match_mpq_on_the_fashion_export(fashion) -> None:
    ctx = fashion["ctx"]
    _check_helpers(fashion["exe"], ctx["input"], ctx["outputs"][0])


def test_helpers_exact_for_other_scales_and_zero_points(fashion, tmp_path: Path) -> None:
    """Small mantissas make every half-integer a tie; extreme zero points test the clamps."""
    src = tmp_path / "src"
    shutil.copytree(fashion["out"], src)
    header = (src / "mpq_model.h").read_text()
    inp = {**fashion["ctx"]["input"], **io_quant(0.5, 127, "in")}
    out = {**fashion["ctx"]["outputs"][0], **io_quant(0.75 * 2.0 ** -20, -128, "out")}
    for side, d in (("INPUT", inp), ("OUTPUT0", out)):
        for key, text in (("SCALE", f"{d['scale_f32']:.9g}f"),
                          ("ZERO_POINT", f"({d['zero_point']})"),
                          ("SCALE_MANTISSA", str(d["scale_mantissa"])),
                          ("SCALE_EXPONENT", f"({d['scale_exponent']})")):
            header, n = re.subn(rf"(#define MPQ_{side}_{key}) .*", rf"\1 {text}", header)
            assert n == 1
    (src / "mpq_model.h").write_text(header)
    _check_helpers(_build_host(src, tmp_path / "harness"), inp, out)


def test_round_trip_through_the_model_equals_the_reference(fashion) -> None:
    """Floats in NHWC → the C chain → the int8 and floats mpq's integer reference gives."""
    graph, ctx = fashion["graph"], fashion["ctx"]
    qm = plan_quant_model(fashion["plan"], graph, "mixed")
    name, out = graph.inputs[0], graph.outputs[0]
    x = to_ir_layout(graph, name, np.load(FASHION / "test.npz")["x"][:8].astype(np.float32))
    raw = _run(fashion["exe"], x.tobytes(), "run")
    n_in, n_out = x[0].size, int(np.prod(ctx["outputs"][0]["dims"]))
    per = n_in + n_out + 8 * n_out
    xq = quantize_input(qm.acts[name], x)
    y = run_int(qm, {name: xq})[out].reshape(len(x), -1)
    for i in range(len(x)):
        rec = raw[i * per:(i + 1) * per]
        assert np.frombuffer(rec[:n_in], np.int8).tolist() == xq[i].ravel().tolist()
        yq = np.frombuffer(rec[n_in:n_in + n_out], np.int8)
        assert yq.tolist() == y[i].tolist()
        yf = np.frombuffer(rec[n_in + n_out:n_in + 5 * n_out], np.float32)
        assert yf.tobytes() == dequantize(qm.acts[out], yq).astype(np.float32).tobytes()
        yi = np.frombuffer(rec[n_in + 5 * n_out:], np.int32)
        assert yi.tolist() == [_py_dequantize_q(int(v), 16, ctx["outputs"][0]["scale_f32"],
                                                ctx["outputs"][0]["zero_point"]) for v in yq]


def _cross() -> str:
    cc = shutil.which("arm-none-eabi-gcc")
    if cc is None:
        if os.environ.get("CI"):
            pytest.fail("cross tools missing in CI")
        pytest.skip("arm-none-eabi-gcc not installed")
    return cc


@pytest.mark.parametrize("abi", ["board", "soft"])
def test_helpers_build_for_the_board_with_werror(fashion, tmp_path: Path, abi: str) -> None:
    """The board's own flags, and the same core with -mfloat-abi=soft (a core without an FPU):
    with only the integer helpers called, the linked image uses no floating point at all."""
    cc, out = _cross(), fashion["out"]
    flags = get_board("nano33ble").cpu_flags
    if abi == "soft":
        flags = [f for f in flags if not f.startswith(("-mfloat-abi", "-mfpu"))] + \
            ["-mfloat-abi=soft"]
    app = tmp_path / "app.c"
    app.write_text('#include <stddef.h>\n#include "mpq_model.h"\n'
                   # the C library a firmware brings (byte loops: volatile keeps them loops)
                   "void *memcpy(void *d, const void *s, size_t n)\n{\n"
                   "    for (size_t i = 0; i < n; ++i)\n"
                   "        ((volatile char *)d)[i] = ((const char *)s)[i];\n"
                   "    return d;\n}\n"
                   "void *memset(void *d, int c, size_t n)\n{\n"
                   "    for (size_t i = 0; i < n; ++i) ((volatile char *)d)[i] = (char)c;\n"
                   "    return d;\n}\n"
                   + ("" if abi == "soft" else "static float f[MPQ_INPUT_SIZE];\n") +
                   "static int32_t xi[MPQ_INPUT_SIZE], yi[MPQ_OUTPUT0_SIZE];\n"
                   "static int8_t xq[MPQ_INPUT_SIZE], yq[MPQ_OUTPUT0_SIZE];\n"
                   "static int8_t *const outs[MPQ_NUM_OUTPUTS] = {yq};\n"
                   "void _start(void)\n{\n"
                   "    mpq_quantize_input_q(xi, 8, xq);\n    (void)mpq_model_run(xq, outs);\n"
                   "    mpq_dequantize_output_q(0, yq, yi, 8);\n"
                   + ("" if abi == "soft" else "    mpq_quantize_input(f, xq);\n"
                      "    mpq_dequantize_output(0, yq, f);\n")
                   + "    for (;;) {}\n}\n")
    elf = tmp_path / "app.elf"
    r = subprocess.run([cc, *flags, "-std=c99", "-O2", "-ffreestanding", "-ffunction-sections",
                        "-fdata-sections", "-Wall", "-Wextra", "-Werror", "-nostdlib",
                        "-Wl,--gc-sections", "-I", str(out), "-o", str(elf), str(app),
                        *(str(out / f) for f in c_sources([p.name for p in out.iterdir()])),
                        "-lgcc"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    syms = subprocess.run([cc.replace("gcc", "nm"), str(elf)], capture_output=True, text=True,
                          check=True).stdout
    if abi == "soft":
        assert re.findall(r"__aeabi_[df]\w+", syms) == []
