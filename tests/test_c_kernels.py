"""The C kernel library (`kernels/`, plain C) against the integer reference.

Every kernel runs ≥ 200 random cases spread over the (in, out) bitwidths in {8, 4, 2} — and the
kernels that take weights ≥ 200 per weight format (LINEAR at 8/4/2 bits, CODEBOOK at 8/4/3/2,
POW2 at 4/3/2; `mpq_filter`) — through views of sub-regions of larger stored tensors, and must
reproduce `mpq.sim` (single-node QuantModels, as in test_sim_ops.py, on the weights decoded by
reference_kernels.decode_weight) or `mpq.quant.arith` byte for byte — and leave every other
byte of its output buffer, and the byte past its scratch, untouched. Each case runs on two
builds: plain C, and the Cortex-M DSP loops (SXTB16/SMLAD) with the intrinsics emulated in C
(ckernels.py), compiled from the library's files as they ship. The last tests compile each file
alone, link the files an export selects per kernel, and cross-compile the library for
Cortex-M0+/M4/M7 with -Werror.
"""

from __future__ import annotations

import ctypes
import itertools
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import ckernels as ck
import numpy as np
import pytest
import reference_kernels as ref
from random_cases import rand_act, rand_clamp, random_pool_case, single_node_model

from mpq.codegen.export import KERNEL_SOURCES, c_sources, library_files
from mpq.ir import Graph, Node, Tensor, conv_out_size
from mpq.memory import scratch_bytes
from mpq.quant import arith
from mpq.quant.qmodel import ActQuant, LayerQuant, QuantModel, layer_params
from mpq.sim import run_int

BITS = (8, 4, 2)
# 27 bit combinations × 10 = 270 cases per kernel (fewer in the sanitizer run, which repeats
# the kernel tests on an instrumented build: test_kernels_clean_under_sanitizers).
PER_COMBO = int(os.environ.get("MPQ_CKERNELS_PER_COMBO", "10"))
# Every (format, bits) the kernels take; the suite decodes them with reference_kernels.
WFORMATS = ([(ck.WFMT_LINEAR, b) for b in BITS] + [(ck.WFMT_CODEBOOK, b) for b in (8, 4, 3, 2)]
            + [(ck.WFMT_POW2, b) for b in (4, 3, 2)])
W_COMBOS = list(itertools.product(BITS, BITS, WFORMATS))  # 90 combinations: 270+ per format
MPQ_OK, MPQ_ERR_ARG, MPQ_ERR_BITS = 0, -1, -2


@pytest.fixture(scope="module")
def libs() -> list[ck.Kernels]:
    return [ck.build(v) for v in ck.VARIANTS]


def cases(seed: int, combos: list[tuple] | None = None):
    """(rng, bits...) for PER_COMBO cases of every bit combination, reproducibly seeded."""
    combos = combos or list(itertools.product(BITS, BITS, BITS))
    for i, bits in enumerate(combos):
        for j in range(PER_COMBO):
            yield (np.random.default_rng(seed * 100000 + i * 100 + j), *bits)


def rand_values(rng: np.random.Generator, bits: int, shape: tuple[int, ...]) -> np.ndarray:
    lo, hi = arith.qrange(bits)
    return rng.integers(lo, hi + 1, shape)


def placed(rng: np.random.Generator, values: np.ndarray, bits: int,
           sub: bool | None = None) -> tuple[ck.Stored, ck.View]:
    """`values` (h, w, c) stored either as a whole tensor or, half the time, as a sub-region at
    a random (y0, x0) of a larger random tensor (stored_w > w), as patch inference stores it."""
    h, w, c = values.shape
    if sub is None:
        sub = bool(rng.random() < 0.5)
    sh, sw = (h + int(rng.integers(1, 4)), w + int(rng.integers(1, 4))) if sub else (h, w)
    y0, x0 = (int(rng.integers(0, sh - h + 1)), int(rng.integers(0, sw - w + 1)))
    store = ck.Stored.random(rng, sh * sw * c, bits)
    view = store.view(h, w, c, y0, x0, sw)
    store.elements[ck.Stored.indices(view)] = values
    store.restore()
    return store, view


def run_libs(libs: list[ck.Kernels], stores: list[ck.Stored], call) -> None:
    """Run `call(lib)` on every library build from the same initial buffers."""
    for lib in libs:
        for s in stores:
            s.restore()
        assert call(lib) == MPQ_OK


def check_bytes(store: ck.Stored, view: ck.View, expected: np.ndarray) -> bool:
    return bool(np.array_equal(store.buf, store.expected_bytes(view, expected)))


def scaled(n: int) -> int:
    """A coverage count the full run (PER_COMBO = 10) reaches, for this run's PER_COMBO."""
    return n * PER_COMBO // 10


def enough_per_format(counts: dict[int, int]) -> bool:
    """≥ 200 cases of every weight format."""
    return all(counts.get(fmt, 0) >= scaled(200) for fmt, _ in WFORMATS)


# -- convolution -------------------------------------------------------------------------------

CONV_KINDS = ("conv", "depthwise", "grouped", "pointwise")


def rand_conv(rng: np.random.Generator, kind: str, bi: int, bo: int, wf: tuple[int, int],
              tiny: float = 0.3) -> dict:
    """A random conv node with its quantisation and weights of format/bits `wf` ("weight" the
    decoded int8 values, "codes" the ck.Weights); None when the output would be empty."""
    mult = 1
    if kind == "depthwise":
        groups = int(rng.integers(2, 6))
        cin, mult = groups, int(rng.integers(1, 4))
        cout = groups * mult
    elif kind == "grouped":
        groups = int(rng.integers(2, 4))
        cin = groups * int(rng.integers(2, 5))
        cout = groups * int(rng.integers(1, 3))
    elif kind == "pointwise":  # read in place (no scratch), grouped half the time
        groups = int(rng.choice([1, 1, 2, 3]))
        cin = groups * int(rng.integers(1, 13 if groups == 1 else 6))
        cout = groups * int(rng.integers(1, 4))
    else:
        groups = 1
        cin = int(rng.integers(1, 9))
        cout = int(rng.integers(1, 7))
    if kind == "pointwise":
        (kh, kw), (sh, sw), (dh, dw), pads = (1, 1), (1, 1), (1, 1), (0, 0, 0, 0)
    else:
        kh, kw = (int(v) for v in rng.integers(1, 4, 2))
        sh, sw = (int(v) for v in rng.integers(1, 3, 2))
        dh, dw = (int(v) for v in rng.integers(1, 3, 2))
        pads = tuple(int(v) for v in rng.integers(0, 3, 4))
    h, w = (int(v) for v in rng.integers(dh * (kh - 1) + 1, 8, 2))
    ho = conv_out_size(h, kh, sh, dh, pads[0], pads[2])
    wo = conv_out_size(w, kw, sw, dw, pads[1], pads[3])
    if ho <= 0 or wo <= 0:
        return None
    codes = ck.Weights.random(rng, (cout, kh, kw, cin // groups), wf[1], wf[0])
    return {
        "cin": cin, "cout": cout, "groups": groups, "mult": mult, "h": h, "w": w, "ho": ho,
        "wo": wo, "pads": pads, "a_in": rand_act(rng, bi), "a_out": rand_act(rng, bo, tiny),
        "weight": codes.values, "codes": codes,
        "wscale": (10 ** rng.uniform(-3, 0, cout)).astype(np.float32),
        "bias": rng.integers(-5000, 5000, cout), "bw": wf[1],
        "attrs": {"kernel": (kh, kw), "strides": (sh, sw), "dilations": (dh, dw),
                  "pads": pads, "groups": groups},
    }


def conv_node(c: dict, lo: float, hi: float, out: str = "y") -> Node:
    return Node("conv", "conv2d", ["x"], [out], {**c["attrs"], "act_min": lo, "act_max": hi},
                weight=c["weight"].astype(np.float32), bias=c["bias"].astype(np.float32))


def conv_params(c: dict, lq: LayerQuant, out_zp: int) -> ck.ConvParams:
    a = c["attrs"]
    return ck.ConvParams(*a["strides"], *a["dilations"], a["pads"][0], a["pads"][1], c["groups"],
                         c["a_in"].zero_point, out_zp, lq.act_min, lq.act_max)


def conv_model(rng: np.random.Generator, c: dict, weight_bits: int) -> tuple[Node, Any]:
    """The random conv `c` as a one-node quantised model (a random clamp on its output)."""
    node = conv_node(c, *rand_clamp(rng, c["a_out"]))
    qm = single_node_model(node, {"x": (1, c["h"], c["w"], c["cin"]),
                                  "y": (1, c["ho"], c["wo"], c["cout"])},
                           {"x": c["a_in"], "y": c["a_out"]}, weight=c["weight"],
                           weight_scale=c["wscale"], weight_bits=weight_bits, bias=c["bias"])
    return node, qm


def run_conv(libs: list[ck.Kernels], rng: np.random.Generator, c: dict, qm: Any, bi: int,
             bo: int) -> tuple[int, ck.ConvParams, Any, Any]:
    """A random bi-bit input through every library's mpq_conv2d into a placed bo-bit output:
    (libraries whose bytes differ from the integer reference, the params, input and output
    views)."""
    lq = qm.layers["conv"]
    x = rand_values(rng, bi, (c["h"], c["w"], c["cin"]))
    want = run_int(qm, {"x": x[None]})["y"][0]
    _, v_in = placed(rng, x, bi)
    s_out, v_out = placed(rng, np.zeros(want.shape, np.int64), bo)
    p = conv_params(c, lq, c["a_out"].zero_point)
    bad = 0
    for lib in libs:
        s_out.restore()
        assert lib.conv2d(p, c["codes"], None, c["bias"], lq.multiplier, lq.shift, v_in,
                          v_out) == MPQ_OK
        bad += not check_bytes(s_out, v_out, want)
    return bad, p, v_in, v_out


def test_conv2d_random(libs: list[ck.Kernels]) -> None:
    n = bad = positive_shift = direct = 0
    per_format: dict[int, int] = {}
    for rng, bi, bo, wf in cases(1, W_COMBOS):
        kind = CONV_KINDS[n % len(CONV_KINDS)]
        c = rand_conv(rng, kind, bi, bo, wf)
        if c is None:
            continue
        node, qm = conv_model(rng, c, c["bw"])
        lq = qm.layers["conv"]
        miss, p, v_in, v_out = run_conv(libs, rng, c, qm, bi, bo)
        bad += miss
        size = libs[0].conv_scratch_size(p, c["codes"], None, v_in, v_out)
        kk = int(np.prod(c["weight"].shape[1:]))
        assert size == (0 if kind == "pointwise" else 2 * kk)
        # The memory model (mpq.memory.scratch_bytes) must budget at least what the kernel uses.
        graph = qm.graph
        assert size <= scratch_bytes(node, graph, inplace=False)
        direct += size == 0
        positive_shift += bool((lq.shift > 0).any())
        per_format[wf[0]] = per_format.get(wf[0], 0) + 1
        n += 1
    assert enough_per_format(per_format) and bad == 0, (per_format, bad)
    assert positive_shift >= scaled(20) and direct >= scaled(40)


def test_conv2d_int8_left_shifts(libs: list[ck.Kernels]) -> None:
    """int8 convolutions (8-bit inputs and linear weights, one group: mpq_conv2d's 2x2 SMLAD
    path) whose channels mix left shifts S in 1..31 with right shifts in [-30, 0] and S = 0, as
    2- and 4-bit weights give; the left-shifted channels stay on that path (acc << S, wrapping,
    then the 32-bit requantisation). Outputs of every bits, against the integer reference."""
    n = bad = i = 0
    while n < scaled(200):
        i += 1
        assert i <= 3 * scaled(200), "too few usable random layers"
        rng = np.random.default_rng(700000 + i)
        bo = BITS[i % len(BITS)]
        c = rand_conv(rng, ("conv", "pointwise")[i % 2], 8, bo, (ck.WFMT_LINEAR, 8))
        if c is None or c["groups"] != 1:
            continue
        _, qm = conv_model(rng, c, 8)
        lq = qm.layers["conv"]
        cout = c["cout"]
        # small left shifts mostly (large ones wrap acc << S almost always), now and then 31
        shift = rng.integers(-3, 6, cout)
        shift[rng.random(cout) < 0.1] = 31
        shift[rng.random(cout) < 0.1] = -30
        shift[int(rng.integers(0, cout))] = int(rng.integers(1, 32))
        lq.shift = shift.astype(np.int64)
        lq.multiplier = rng.integers(1 << 30, 1 << 31, cout).astype(np.int64)
        bad += run_conv(libs, rng, c, qm, 8, bo)[0]
        n += 1
    assert bad == 0, (n, bad)


def test_requantize_extremes(libs: list[ck.Kernels]) -> None:
    """acc = bias over the whole int32 range with S in [−31, 31]: the int32 wrap of acc << S,
    both roundings and the int64 zero-point add, against `arith.requantize`."""
    rng = np.random.default_rng(5)
    cout = 4000
    bias = rng.integers(arith.INT32_MIN, arith.INT32_MAX, cout, endpoint=True)
    bias[:8] = [arith.INT32_MIN, arith.INT32_MAX, 0, -1, 1, 1 << 30, -(1 << 30), 12345]
    mult = rng.integers(1 << 30, 1 << 31, cout)
    mult[:4] = [0, (1 << 31) - 1, 1 << 30, (1 << 31) - 1]
    shift = rng.integers(-31, 32, cout)
    zp = int(rng.integers(-128, 128))
    want = np.clip(arith.requantize(bias, mult, shift) + zp, -128, 127)
    x = np.zeros((1, 1, 1), np.int64)
    s_in, v_in = placed(rng, x, 8, sub=False)
    s_out, v_out = placed(rng, np.zeros((1, 1, cout), np.int64), 8, sub=False)
    for lib in libs:
        s_out.restore()
        rc = lib.fully_connected(ck.FcParams(0, zp, -128, 127), np.zeros((cout, 1), np.int8), 8,
                                 bias, mult, shift, v_in, v_out)
        assert rc == MPQ_OK and np.array_equal(s_out.read(v_out).reshape(-1), want)


# -- fully connected ----------------------------------------------------------------------------

def test_fully_connected_random(libs: list[ck.Kernels]) -> None:
    n = bad = 0
    per_format: dict[int, int] = {}
    for rng, bi, bo, (fmt, bw) in cases(2, W_COMBOS):
        h, w, c = (int(v) for v in rng.integers(1, 5, 3))
        c += int(rng.integers(0, 8))
        k, cout = h * w * c, int(rng.integers(1, 12))
        a_in, a_out = rand_act(rng, bi), rand_act(rng, bo, 0.3)
        codes = ck.Weights.random(rng, (cout, k), bw, fmt)
        wq = codes.values
        bias = rng.integers(-20000, 20000, cout)
        node = Node("fc", "fully_connected", ["x"], ["y"],
                    dict(zip(("act_min", "act_max"), rand_clamp(rng, a_out), strict=True)))
        qm = single_node_model(node, {"x": (1, h, w, c), "y": (1, cout)}, {"x": a_in, "y": a_out},
                         weight=wq, weight_scale=(10 ** rng.uniform(-3, 0, cout)).astype(
                             np.float32), weight_bits=bw, bias=bias)
        lq = qm.layers["fc"]
        x = rand_values(rng, bi, (h, w, c))
        want = run_int(qm, {"x": x[None]})["y"].reshape(1, 1, cout)
        s_in, v_in = placed(rng, x, bi)
        s_out, v_out = placed(rng, np.zeros((1, 1, cout), np.int64), bo)
        p = ck.FcParams(a_in.zero_point, a_out.zero_point, lq.act_min, lq.act_max)
        for lib in libs:
            s_out.restore()
            assert lib.fully_connected(p, codes, None, bias, lq.multiplier, lq.shift, v_in,
                                       v_out) == MPQ_OK
            bad += not check_bytes(s_out, v_out, want)
        per_format[fmt] = per_format.get(fmt, 0) + 1
        n += 1
    assert enough_per_format(per_format) and bad == 0, (per_format, bad)


# -- tabled weights on real row lengths ---------------------------------------------------------

TABLED = [(fmt, b) for fmt, b in WFORMATS if fmt != ck.WFMT_LINEAR and b <= 4]


@pytest.mark.parametrize("layer", ["pointwise", "conv3x3", "fully_connected"])
def test_tabled_weights_long_rows(libs: list[ck.Kernels], layer: str) -> None:
    """CODEBOOK and POW2 weights of 4/3/2 bits (the kernels' per-call decode tables) on the row
    lengths of the example models' layers — a 64-channel 1x1 conv (KWS DS-CNN), a 3x3 conv over
    16 channels (the Fashion CNN), a fully connected layer of K = 200 — with an odd number of
    outputs (a last row without a partner), from 8/4/2-bit inputs: dozens of quads per row,
    3-bit codes straddling bytes, against the integer reference byte for byte."""
    rng = np.random.default_rng(23)
    for (fmt, bw), bi in itertools.product(TABLED, BITS):
        bo = int(rng.choice(BITS))
        a_in, a_out = rand_act(rng, bi), rand_act(rng, bo, 0.2)
        lo, hi = rand_clamp(rng, a_out)
        if layer == "fully_connected":
            h, w, c, cout = 2, 4, 25, 5
            codes = ck.Weights.random(rng, (cout, h * w * c), bw, fmt)
            node = Node("fc", "fully_connected", ["x"], ["y"], {"act_min": lo, "act_max": hi})
            yshape = (1, cout)
        else:
            k, (h, w, c, cout) = (1, (3, 4, 64, 9)) if layer == "pointwise" else (3, (5, 6, 16, 7))
            codes = ck.Weights.random(rng, (cout, k, k, c), bw, fmt)
            attrs = {"kernel": (k, k), "strides": (1, 1), "dilations": (1, 1),
                     "pads": (k // 2,) * 4, "groups": 1}
            node = Node("conv", "conv2d", ["x"], ["y"], {**attrs, "act_min": lo, "act_max": hi},
                        weight=codes.values.astype(np.float32))
            yshape = (1, h, w, cout)
        bias = rng.integers(-5000, 5000, cout)
        qm = single_node_model(node, {"x": (1, h, w, c), "y": yshape}, {"x": a_in, "y": a_out},
                               weight=codes.values,
                               weight_scale=(10 ** rng.uniform(-3, 0, cout)).astype(np.float32),
                               weight_bits=bw, bias=bias)
        lq = qm.layers[node.name]
        x = rand_values(rng, bi, (h, w, c))
        want = run_int(qm, {"x": x[None]})["y"]
        want = want.reshape(1, 1, cout) if layer == "fully_connected" else want[0]
        s_in, v_in = placed(rng, x, bi)
        s_out, v_out = placed(rng, np.zeros(want.shape, np.int64), bo)
        for lib in libs:
            s_out.restore()
            if layer == "fully_connected":
                p = ck.FcParams(a_in.zero_point, a_out.zero_point, lq.act_min, lq.act_max)
                rc = lib.fully_connected(p, codes, None, bias, lq.multiplier, lq.shift, v_in,
                                         v_out)
            else:
                p = ck.ConvParams(1, 1, 1, 1, k // 2, k // 2, 1, a_in.zero_point,
                                  a_out.zero_point, lq.act_min, lq.act_max)
                rc = lib.conv2d(p, codes, None, bias, lq.multiplier, lq.shift, v_in, v_out)
            assert rc == MPQ_OK
            assert check_bytes(s_out, v_out, want), (fmt, bw, bi, bo)


# -- elementwise add ----------------------------------------------------------------------------

def add_params(lq: LayerQuant, za: int, zb: int, out: ActQuant, swap: bool = False
               ) -> ck.AddParams:
    """The C struct from TFLM's add constants; `swap` when the graph's first input is b."""
    e = lq.extra
    first, second = (e["m1"], e["s1"]), (e["m2"], e["s2"])
    if swap:
        first, second = second, first
    return ck.AddParams(za, *first, zb, *second, e["left_shift"], out.zero_point, e["mo"],
                        e["so"], lq.act_min, lq.act_max)


def test_add_random(libs: list[ck.Kernels]) -> None:
    n = bad = aliased = 0
    for rng, b1, b2, bo in cases(3):
        h, w, c = (int(v) for v in rng.integers(1, 6, 3))
        a1, a2, ao = rand_act(rng, b1), rand_act(rng, b2), rand_act(rng, bo, 0.2)
        node = Node("add", "add", ["x", "x2"], ["y"],
                    dict(zip(("act_min", "act_max"), rand_clamp(rng, ao), strict=True)))
        acts = {"x": a1, "x2": a2, "y": ao}
        graph = Graph("op", {t: Tensor(t, (1, h, w, c)) for t in ("x", "x2", "y")}, [node],
                      ["x", "x2"], ["y"])
        lq = layer_params(node, acts)
        qm = QuantModel(graph, acts, {"add": lq})
        x1, x2 = rand_values(rng, b1, (h, w, c)), rand_values(rng, b2, (h, w, c))
        want = run_int(qm, {"x": x1[None], "x2": x2[None]})["y"][0]
        s1, v1 = placed(rng, x1, b1)
        s2, v2 = placed(rng, x2, b2)
        alias = bo == b1 and rng.random() < 0.5
        s_out, v_out = (s1, v1) if alias else placed(rng, np.zeros((h, w, c), np.int64), bo)
        p = add_params(lq, a1.zero_point, a2.zero_point, ao)
        for lib in libs:
            for s in (s1, s_out):
                s.restore()
            assert lib.add(p, v1, v2, v_out) == MPQ_OK
            bad += not check_bytes(s_out, v_out, want)
        aliased += alias
        n += 1
    assert n >= scaled(200) and bad == 0 and aliased >= scaled(20)


# -- fused conv + residual add ------------------------------------------------------------------

def test_conv2d_add_random(libs: list[ck.Kernels]) -> None:
    """conv x → r, add(s, r) or add(r, s) → y, against the unfused pair in the reference; the
    sum overwrites the skip's storage in most cases (mpq.memory.fused_residual_adds)."""
    n = bad = aliased = 0
    per_format: dict[int, int] = {}
    for rng, bi, bo, wf in cases(4, W_COMBOS):
        kind = CONV_KINDS[n % len(CONV_KINDS)]
        c = rand_conv(rng, kind, bi, int(rng.choice(BITS)), wf, tiny=0.2)
        if c is None:
            continue
        bw = c["bw"]
        alias = rng.random() < 0.7
        shape = (c["ho"], c["wo"], c["cout"])
        a_res = c["a_out"]
        a_skip = rand_act(rng, bo if alias else int(rng.choice(BITS)))
        a_y = rand_act(rng, bo, 0.2)
        conv = conv_node(c, *rand_clamp(rng, a_res), out="r")
        skip_first = bool(rng.random() < 0.5)
        add = Node("add", "add", ["s", "r"] if skip_first else ["r", "s"], ["y"],
                   dict(zip(("act_min", "act_max"), rand_clamp(rng, a_y), strict=True)))
        acts = {"x": c["a_in"], "r": a_res, "s": a_skip, "y": a_y}
        graph = Graph("op", {"x": Tensor("x", (1, c["h"], c["w"], c["cin"])),
                             **{t: Tensor(t, (1, *shape)) for t in ("r", "s", "y")}},
                      [conv, add], ["x", "s"], ["y"])
        lq_conv = layer_params(conv, acts, weight=c["weight"], weight_scale=c["wscale"],
                               weight_bits=bw, bias=c["bias"])
        lq_add = layer_params(add, acts)
        qm = QuantModel(graph, acts, {"conv": lq_conv, "add": lq_add})
        x = rand_values(rng, bi, (c["h"], c["w"], c["cin"]))
        skip = rand_values(rng, a_skip.bits, shape)
        want = run_int(qm, {"x": x[None], "s": skip[None]})["y"][0]
        s_in, v_in = placed(rng, x, bi)
        s_skip, v_skip = placed(rng, skip, a_skip.bits)
        s_out, v_out = (s_skip, v_skip) if alias else placed(rng, np.zeros(shape, np.int64), bo)
        p = conv_params(c, lq_conv, a_res.zero_point)
        pa = add_params(lq_add, a_skip.zero_point, a_res.zero_point, a_y, swap=not skip_first)
        for lib in libs:
            for s in (s_skip, s_out):
                s.restore()
            assert lib.conv2d_add(p, c["codes"], None, c["bias"], lq_conv.multiplier,
                                  lq_conv.shift, v_in, pa, v_skip, v_out) == MPQ_OK
            bad += not check_bytes(s_out, v_out, want)
        aliased += alias
        per_format[wf[0]] = per_format.get(wf[0], 0) + 1
        n += 1
    assert enough_per_format(per_format) and bad == 0 and aliased >= scaled(100), (per_format, bad)


# -- in-place depthwise -------------------------------------------------------------------------

def _depthwise_inplace_case(libs: list[ck.Kernels], rng: np.random.Generator, bits: int,
                            fmt: int, bw: int, geometry: tuple) -> bool | None:
    """One random in-place depthwise case of `geometry` ((kh, kw), (sh, sw), (dh, dw), pads,
    (h, w)) on every build: None when the output is empty, else whether every build wrote the
    reference's bytes (and nothing else) and reported the scratch formula. The output view
    starts at the input's first element — either a plain contiguous tensor (the layer-based
    arena) or the input's own sub-region layout — or, raised, a whole number of pixels
    (whole bytes) above it, its `data` pointer that far into the buffer (a patch stage's
    output tile ending where its input's tile ends, `PatchSchedule.raise_shift`)."""
    (kh, kw), (sh, sw), (dh, dw), pads, (h, w) = geometry
    ho = conv_out_size(h, kh, sh, dh, pads[0], pads[2])
    wo = conv_out_size(w, kw, sw, dw, pads[1], pads[3])
    if ho <= 0 or wo <= 0:
        return None
    ch = int(rng.integers(1, 7))
    a_in, a_out = rand_act(rng, bits), rand_act(rng, bits, 0.2)
    codes = ck.Weights.random(rng, (ch, kh, kw, 1), bw, fmt)
    wq = codes.values
    bias = rng.integers(-5000, 5000, ch)
    attrs = {"kernel": (kh, kw), "strides": (sh, sw), "dilations": (dh, dw), "pads": pads,
             "groups": ch}
    lo, hi = rand_clamp(rng, a_out)
    node = Node("conv", "conv2d", ["x"], ["y"], {**attrs, "act_min": lo, "act_max": hi},
                weight=wq.astype(np.float32), bias=bias.astype(np.float32))
    qm = single_node_model(node, {"x": (1, h, w, ch), "y": (1, ho, wo, ch)},
                           {"x": a_in, "y": a_out}, weight=wq,
                           weight_scale=(10 ** rng.uniform(-3, 0, ch)).astype(np.float32),
                           weight_bits=bw, bias=bias)
    lq = qm.layers["conv"]
    x = rand_values(rng, bits, (h, w, ch))
    want = run_int(qm, {"x": x[None]})["y"][0]
    sub = rng.random() < 0.5
    same_layout = sub and rng.random() < 0.5
    sh_, sw_ = (h + 2, max(w, wo if same_layout else 0) + 3) if sub else (h, w)
    y0, x0 = (int(rng.integers(0, 3)), int(rng.integers(0, 4))) if sub else (0, 0)
    raised = 0
    if not sub and rng.random() < 0.4:  # k pixels above the input, k·C·bits a whole byte
        unit = 8 // int(np.gcd(ch * bits, 8))
        raised = int(rng.integers(1, max(h * w // unit, 1) + 1)) * unit * ch
    out_extent = ((y0 + ho) * sw_ + x0 + wo) * ch if same_layout else raised + ho * wo * ch
    store = ck.Stored.random(rng, max(sh_ * sw_ * ch, out_extent), bits)
    v_in = store.view(h, w, ch, y0, x0, sw_)
    store.elements[ck.Stored.indices(v_in)] = x
    store.restore()
    v_out = store.view(ho, wo, ch, y0, x0, sw_) if same_layout else \
        store.view(ho, wo, ch, start=raised)
    p = ck.ConvParams(sh, sw, dh, dw, pads[0], pads[1], ch, a_in.zero_point,
                      a_out.zero_point, lq.act_min, lq.act_max)
    good = True
    # mpq_depthwise_inplace_grouped's rule: 4- or 2-bit, C filling whole bytes, <= 25 taps
    grouped = bits != 8 and ch % (8 // bits) == 0 and kh * kw <= 25
    for lib in libs:
        store.restore()
        assert lib.depthwise_inplace(p, codes, None, bias, lq.multiplier, lq.shift, v_in,
                                     v_out) == MPQ_OK
        good &= check_bytes(store, v_out, want)
        store.restore()
        rc = lib.depthwise_inplace(p, codes, None, bias, lq.multiplier, lq.shift, v_in, v_out,
                                   grouped=True)
        if grouped:
            assert rc == MPQ_OK
            good &= check_bytes(store, v_out, want)
        else:
            assert rc == (MPQ_ERR_BITS if bits == 8 else MPQ_ERR_ARG)
            assert check_bytes(store, v_in, x)  # refused before touching the output
    size = libs[0].depthwise_inplace_scratch_size(p, codes, None, v_in, v_out)
    pb = max(0, (ho - 1) * sh + (kh - 1) * dh + 1 - pads[0] - h)
    pr = max(0, (wo - 1) * sw + (kw - 1) * dw + 1 - pads[1] - w)
    assert size == (pads[0] + h + pb) * (pads[1] + w + pr)
    if node.is_depthwise:  # C = 1 is an ordinary conv to mpq (groups = 1)
        assert size <= scratch_bytes(node, qm.graph, inplace=True)
    return good


def test_depthwise_inplace_random(libs: list[ck.Kernels]) -> None:
    """Depthwise (multiplier 1) whose output view starts at the input's first element (see
    _depthwise_inplace_case). A third of the cases are 3x3 with unit stride and dilation along
    W, the DSP build's two-outputs-per-word loop."""
    n = bad = paired = 0
    per_format: dict[int, int] = {}
    combos = [(b, b, wf) for b in BITS for wf in WFORMATS] * 3
    for rng, bits, _, (fmt, bw) in cases(5, combos):
        kh, kw = (int(v) for v in rng.integers(1, 4, 2))
        sh, sw = (int(v) for v in rng.integers(1, 3, 2))
        if rng.random() < 0.1:
            sh = sw = 3
        dh, dw = (int(v) for v in rng.integers(1, 3, 2))
        if rng.random() < 0.33:
            kh, kw, sw, dw = 3, 3, 1, 1
        pads = tuple(int(v) for v in rng.integers(0, 3, 4))
        h, w = (int(v) for v in rng.integers(dh * (kh - 1) + 1, 9, 2))
        good = _depthwise_inplace_case(libs, rng, bits, fmt, bw,
                                       ((kh, kw), (sh, sw), (dh, dw), pads, (h, w)))
        if good is None:
            continue
        bad += not good
        per_format[fmt] = per_format.get(fmt, 0) + 1
        paired += kh == kw == 3 and sw == dw == 1 and conv_out_size(w, 3, 1, 1, pads[1],
                                                                      pads[3]) >= 2
        n += 1
    assert enough_per_format(per_format) and bad == 0, (per_format, bad)
    assert paired >= scaled(150)


def test_depthwise_inplace_3x3_stride2_random(libs: list[ck.Kernels]) -> None:
    """3x3 depthwise with stride 2 and unit dilation along W (MobileNet's downsampling layers),
    the DSP build's two-outputs-per-word-and-byte loop: ≥ 200 cases per weight format, every
    bitwidth, any stride/dilation along H, padding 0–2 on every side (the last pair reaches the
    padded row's last column), widths with an odd output count (the scalar tail)."""
    per_format: dict[int, int] = {}
    bad = pairs = tails = 0
    combos = [(b, b, wf) for b in BITS for wf in WFORMATS] * 3
    for rng, bits, _, (fmt, bw) in cases(6, combos):
        sh, dh = int(rng.integers(1, 3)), int(rng.choice([1, 1, 2]))
        pads = tuple(int(v) for v in rng.integers(0, 3, 4))
        h, w = int(rng.integers(2 * dh + 1, 9)), int(rng.integers(3, 14))
        good = _depthwise_inplace_case(libs, rng, bits, fmt, bw,
                                       ((3, 3), (sh, 2), (dh, 1), pads, (h, w)))
        if good is None:
            continue
        bad += not good
        per_format[fmt] = per_format.get(fmt, 0) + 1
        wo = conv_out_size(w, 3, 2, 1, pads[1], pads[3])
        pairs += wo >= 2
        tails += wo % 2
    assert enough_per_format(per_format) and bad == 0, (per_format, bad)
    assert pairs >= scaled(600) and tails >= scaled(300), (pairs, tails)


# -- pooling ------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["max", "avg"])
def test_pool_random(libs: list[ck.Kernels], kind: str) -> None:
    """Pooling against the reference at every bits, through mpq_<kind>pool and, where its rule
    holds, mpq_<kind>pool_grouped (which refuses the rest)."""
    n = bad = n_grouped = 0
    combos = [(b, b, b) for b in BITS] * 9
    for rng, bits, _, _ in cases(6 + (kind == "avg"), combos):
        qm, (kh, kw, sh, sw, pt, pl, _, _), (h, w, c) = random_pool_case(rng, kind, bits, 8, 6)
        lq = qm.layers["pool"]
        x = rand_values(rng, bits, (h, w, c))
        want = run_int(qm, {"x": x[None]})["y"][0]
        s_in, v_in = placed(rng, x, bits)
        s_out, v_out = placed(rng, np.zeros(want.shape, np.int64), bits)
        p = ck.PoolParams(kh, kw, sh, sw, pt, pl, lq.act_min, lq.act_max)
        grouped = bits != 8 and c % (8 // bits) == 0  # mpq_<kind>pool_grouped's rule
        for lib in libs:
            fn = lib.maxpool if kind == "max" else lib.avgpool
            s_out.restore()
            assert fn(p, v_in, v_out) == MPQ_OK
            bad += not check_bytes(s_out, v_out, want)
            s_out.restore()
            rc = fn(p, v_in, v_out, grouped=True)
            if grouped:
                assert rc == MPQ_OK
                bad += not check_bytes(s_out, v_out, want)
                n_grouped += 1
            else:
                assert rc == (MPQ_ERR_BITS if bits == 8 else MPQ_ERR_ARG)
        n += 1
    assert n >= scaled(200) and bad == 0 and n_grouped >= scaled(20), n_grouped


def test_global_avgpool_in_parts_random(libs: list[ck.Kernels]) -> None:
    """mpq_avgpool_accumulate over random row/column tiles, then mpq_avgpool_finish, equals the
    reference's global average pool (mpq.sim AvgPool, window = the whole map) byte for byte,
    at every bits, each tile read through a view of a larger stored buffer; bad arguments are
    refused before anything is written."""
    n = bad = 0
    combos = [(b, b, b) for b in BITS] * 9
    for rng, bits, _, _ in cases(31, combos):
        h, w, c = int(rng.integers(1, 9)), int(rng.integers(1, 7)), int(rng.integers(1, 9))
        q = rand_act(rng, bits)
        lo, hi = rand_clamp(rng, q)
        node = Node("pool", "avg_pool", ["x"], ["y"], {
            "kernel": (h, w), "strides": (1, 1), "pads": (0, 0, 0, 0), "act_min": lo,
            "act_max": hi})
        qm = single_node_model(node, {"x": (1, h, w, c), "y": (1, 1, 1, c)}, {"x": q, "y": q})
        lq = qm.layers["pool"]
        x = rand_values(rng, bits, (h, w, c))
        want = run_int(qm, {"x": x[None]})["y"][0]
        rows = sorted({0, h, *(int(v) for v in rng.integers(0, h + 1, 2))})
        cols = sorted({0, w, *(int(v) for v in rng.integers(0, w + 1, 2))})
        s_out, v_out = placed(rng, np.zeros(want.shape, np.int64), bits)
        for lib in libs:
            sums = np.zeros(c, np.int32)
            tiles = itertools.product(itertools.pairwise(rows), itertools.pairwise(cols))
            for (y0, y1), (x0, x1) in tiles:
                _, v_tile = placed(rng, x[y0:y1, x0:x1], bits)
                assert lib.avgpool_accumulate(v_tile, sums) == MPQ_OK
            assert sums.tolist() == x.sum(axis=(0, 1)).tolist()
            s_out.restore()
            assert lib.avgpool_finish(sums, h * w, lq.act_min, lq.act_max, v_out) == MPQ_OK
            bad += not check_bytes(s_out, v_out, want)
            s_out.restore()
            assert lib.avgpool_finish(sums, 0, lq.act_min, lq.act_max, v_out) == MPQ_ERR_ARG
            assert lib.avgpool_finish(sums, h * w, lq.act_max, lq.act_min - 1, v_out) \
                == MPQ_ERR_ARG
            assert check_bytes(s_out, v_out, s_out.read(v_out))
        n += 1
    assert n >= scaled(200) and bad == 0


# -- softmax ------------------------------------------------------------------------------------

def test_softmax_random(libs: list[ck.Kernels]) -> None:
    n = bad = cut = 0
    combos = [(b, 8, 8) for b in BITS] * 9
    for rng, bits, _, _ in cases(8, combos):
        h, w = (int(v) for v in rng.integers(1, 4, 2))
        c = int(rng.integers(1, 40))
        scale = float(np.float32(10 ** rng.uniform(-3, 1.3)))
        m, shift, diff_min = arith.softmax_params(scale)
        x = rand_values(rng, bits, (h, w, c))
        if rng.random() < 0.2:  # near-uniform rows: the largest sums
            x = np.minimum(x, x.min() + 1)
        want = arith.softmax_s8(x, m, shift, diff_min)
        s_in, v_in = placed(rng, x, bits)
        s_out, v_out = placed(rng, np.zeros(x.shape, np.int64), 8)
        for lib in libs:
            s_out.restore()
            assert lib.softmax(ck.SoftmaxParams(m, shift, diff_min), v_in, v_out) == MPQ_OK
            bad += not check_bytes(s_out, v_out, want)
        cut += bool(((x - x.max(axis=-1, keepdims=True)) < diff_min).any())
        n += 1
    assert n >= scaled(200) and bad == 0 and cut >= scaled(10)


def test_softmax_many_rows(libs: list[ck.Kernels]) -> None:
    """Thousands of rows in one call, so that rare roundings of the fixed-point exp and
    reciprocal (whose last bits seldom reach an 8-bit output) are exercised too."""
    rng = np.random.default_rng(11)
    for bits, scale in ((8, 0.02), (8, 0.1), (4, 0.3), (2, 1.5), (8, 0.004)):
        x = rand_values(rng, bits, (60, 50, int(rng.integers(3, 12))))
        m, shift, diff_min = arith.softmax_params(float(np.float32(scale)))
        want = arith.softmax_s8(x, m, shift, diff_min)
        s_in, v_in = placed(rng, x, bits, sub=False)
        s_out, v_out = placed(rng, np.zeros(x.shape, np.int64), 8, sub=False)
        for lib in libs:
            s_out.restore()
            assert lib.softmax(ck.SoftmaxParams(m, shift, diff_min), v_in, v_out) == MPQ_OK
            assert check_bytes(s_out, v_out, want)


@pytest.mark.parametrize("c", [255, 700, 2000, 5000])
def test_softmax_long_rows(libs: list[ck.Kernels], c: int) -> None:
    """Long, nearly uniform rows: the sum's headroom shrinks and the final division by 2^(35 −
    headroom) goes past 2^31 (still exact below 8192 elements)."""
    rng = np.random.default_rng(c)
    x = np.where(rng.random((2, 1, c)) < 0.9, 5, rng.integers(-128, 6, (2, 1, c)))
    m, shift, diff_min = arith.softmax_params(float(np.float32(0.05)))
    want = arith.softmax_s8(x, m, shift, diff_min)
    s_in, v_in = placed(rng, x, 8, sub=False)
    s_out, v_out = placed(rng, np.zeros(x.shape, np.int64), 8, sub=False)
    for lib in libs:
        s_out.restore()
        assert lib.softmax(ck.SoftmaxParams(m, shift, diff_min), v_in, v_out) == MPQ_OK
        assert check_bytes(s_out, v_out, want)


# -- copy ---------------------------------------------------------------------------------------

def test_copy_view_random(libs: list[ck.Kernels]) -> None:
    n = bad = 0
    for rng, bits, _, _ in cases(9, [(b, b, b) for b in BITS] * 9):
        h, w, c = (int(v) for v in rng.integers(1, 6, 3))
        extra = int(rng.integers(0, 4)) if rng.random() < 0.6 else 0
        c0 = int(rng.integers(0, extra + 1))
        x = rand_values(rng, bits, (h, w, c))
        s_src, v_src = placed(rng, x, bits)
        s_dst, v_dst = placed(rng, rand_values(rng, bits, (h, w, c + extra)), bits)
        want = s_dst.read(v_dst)
        want[:, :, c0:c0 + c] = x
        for lib in libs:
            s_dst.restore()
            assert lib.copy_view(v_src, v_dst, c0) == MPQ_OK
            bad += not check_bytes(s_dst, v_dst, want)
        n += 1
    assert n >= scaled(200) and bad == 0


# -- mean and nearest resize ---------------------------------------------------------------------

MEAN_AXES = ((1, 2), (3,), (1,), (2,), (1, 2, 3), (2, 3))


def test_mean_random(libs: list[ck.Kernels]) -> None:
    """mpq_mean against mpq.sim's MEAN (TFLM's arithmetic) over every axis set, any bits."""
    n = bad = 0
    for rng, bi, bo, _ in cases(12, [(a, b, 8) for a in BITS for b in BITS] * 3):
        h, w, c = (int(v) for v in rng.integers(1, 9, 3))
        axes = MEAN_AXES[int(rng.integers(len(MEAN_AXES)))]
        shape = (1, h, w, c)
        keep = tuple(1 if i in axes else d for i, d in enumerate(shape))
        count = int(np.prod([shape[a] for a in axes]))
        acts = {"x": rand_act(rng, bi), "y": rand_act(rng, bo)}
        node = Node("mean", "mean", ["x"], ["y"], {"axes": axes, "count": count})
        qm = single_node_model(node, {"x": shape, "y": keep}, acts)
        lq = qm.layers["mean"]
        x = rand_values(rng, bi, (h, w, c))
        want = run_int(qm, {"x": x[None]})["y"][0]
        s_in, v_in = placed(rng, x, bi)
        s_out, v_out = placed(rng, np.zeros(want.shape, np.int64), bo)
        e = lq.extra
        p = ck.MeanParams(1 in axes, 2 in axes, 3 in axes, count, acts["x"].zero_point,
                          acts["y"].zero_point, e["multiplier"], e["shift"], lq.act_min,
                          lq.act_max)
        for lib in libs:
            s_out.restore()
            assert lib.mean(p, v_in, v_out) == MPQ_OK
            bad += not check_bytes(s_out, v_out, want)
        n += 1
    assert n >= scaled(200) and bad == 0


def test_resize_nearest_random(libs: list[ck.Kernels]) -> None:
    """mpq_resize_nearest against mpq.sim on random index maps (up and down), any bits."""
    n = bad = 0
    for rng, bits, _, _ in cases(13, [(b, b, b) for b in BITS] * 9):
        h, w, c = (int(v) for v in rng.integers(1, 6, 3))
        ho, wo = (int(v) for v in rng.integers(1, 11, 2))
        rows = tuple(int(v) for v in np.sort(rng.integers(0, h, ho)))
        cols = tuple(int(v) for v in np.sort(rng.integers(0, w, wo)))
        q = rand_act(rng, bits)
        node = Node("up", "resize", ["x"], ["y"], {"mode": "nearest", "rows": rows,
                                                   "cols": cols})
        qm = single_node_model(node, {"x": (1, h, w, c), "y": (1, ho, wo, c)},
                               {"x": q, "y": q})
        x = rand_values(rng, bits, (h, w, c))
        want = run_int(qm, {"x": x[None]})["y"][0]
        s_in, v_in = placed(rng, x, bits)
        s_out, v_out = placed(rng, np.zeros(want.shape, np.int64), bits)
        for lib in libs:
            s_out.restore()
            assert lib.resize_nearest(np.array(rows), np.array(cols), v_in, v_out) == MPQ_OK
            bad += not check_bytes(s_out, v_out, want)
        n += 1
    bad_rows = np.array([0, h])  # an index outside the input is refused before any write
    assert libs[0].resize_nearest(bad_rows, np.zeros(1), v_in,
                                  ck.View(v_out.data, bits, 2, 1, c, 0, 0, 1)) == MPQ_ERR_ARG
    assert n >= scaled(200) and bad == 0


def test_resize_bilinear_random(libs: list[ck.Kernels]) -> None:
    """mpq_resize_bilinear against mpq.sim (TFLM's integer bilinear) for every flag, any bits."""
    n = bad = 0
    for rng, bits, _, _ in cases(14, [(b, b, b) for b in BITS] * 9):
        h, w, c = (int(v) for v in rng.integers(1, 6, 3))
        ho, wo = (int(v) for v in rng.integers(1, 12, 2))
        align, hpc = [(False, False), (True, False), (False, True)][int(rng.integers(3))]
        q = rand_act(rng, bits)
        node = Node("up", "resize", ["x"], ["y"], {"mode": "bilinear", "align_corners": align,
                                                   "half_pixel_centers": hpc})
        qm = single_node_model(node, {"x": (1, h, w, c), "y": (1, ho, wo, c)},
                               {"x": q, "y": q})
        x = rand_values(rng, bits, (h, w, c))
        want = run_int(qm, {"x": x[None]})["y"][0]
        s_in, v_in = placed(rng, x, bits)
        s_out, v_out = placed(rng, np.zeros(want.shape, np.int64), bits)
        rows = arith.bilinear_int_taps(h, ho, align, hpc)
        cols = arith.bilinear_int_taps(w, wo, align, hpc)
        for lib in libs:
            s_out.restore()
            assert lib.resize_bilinear(rows, cols, v_in, v_out) == MPQ_OK
            bad += not check_bytes(s_out, v_out, want)
        n += 1
    assert n >= scaled(200) and bad == 0


def _block_node(rng: np.random.Generator, op: str, shape: tuple[int, ...]) -> tuple[Node, tuple]:
    """A random pad or slice node over `shape` (batch axis untouched) and its output shape."""
    if op == "pad":
        pads = ((0, 0),) + tuple((int(rng.integers(0, 3)), int(rng.integers(0, 3)))
                                 for _ in shape[1:])
        out = tuple(d + lo + hi for d, (lo, hi) in zip(shape, pads, strict=True))
        return Node("p", "pad", ["x"], ["y"], {"pads": pads}), out
    starts, steps, out = [0], [1], [1]
    for d in shape[1:]:
        s = int(rng.integers(0, d))
        st = int(rng.integers(1, 4))
        starts.append(s)
        steps.append(st)
        out.append(int(rng.integers(1, (d - 1 - s) // st + 2)))
    return Node("s", "slice", ["x"], ["y"], {"starts": tuple(starts), "steps": tuple(steps)}), \
        tuple(out)


def test_block_copies_random(libs: list[ck.Kernels]) -> None:
    """Pad (fill with the zero point, then the interior), slice and concatenation along any
    axis, as export emits them (`mpq.codegen.blocks`), at 8/4/2 bits: every output byte as
    `mpq.sim` computes it, the canary past the buffer untouched."""
    from mpq.codegen.blocks import concat_blocks, pad_block, slice_block

    n = bad = 0
    for rng, bits, _, _ in cases(10, [(b, b, b) for b in BITS] * 9):
        shape = (1, *(int(d) for d in rng.integers(1, 6, int(rng.integers(1, 4)))))
        op = ("pad", "slice", "concat")[n % 3]
        zp = int(rng.integers(*arith.qrange(bits))) if op == "pad" else 0
        if op == "concat":
            axis = int(rng.integers(1, len(shape)))
            shapes = [tuple(int(rng.integers(1, 4)) if a == axis else d
                            for a, d in enumerate(shape)) for _ in range(int(rng.integers(2, 4)))]
            xs = [rand_values(rng, bits, s) for s in shapes]
            want = np.concatenate(xs, axis=axis)
            blocks = concat_blocks(shapes, want.shape, axis, "test")
            srcs = [ck.Stored(x, bits) for x in xs]
        else:
            node, out_shape = _block_node(rng, op, shape)
            x = rand_values(rng, bits, shape)
            graph = Graph("g", {"x": Tensor("x", shape), "y": Tensor("y", out_shape)}, [node],
                          ["x"], ["y"])
            q = ActQuant(0.1, zp, bits)
            qm = QuantModel(graph, {"x": q, "y": q}, {node.name: LayerQuant()})
            want = run_int(qm, {"x": x})["y"]
            blocks = [pad_block(shape, out_shape, node.attrs["pads"], "test") if op == "pad"
                      else slice_block(shape, out_shape, node.attrs["starts"],
                                       node.attrs["steps"], "test")]
            srcs = [ck.Stored(x, bits)]
        dst = ck.Stored(rand_values(rng, bits, want.shape), bits)
        expected = np.concatenate([arith.pack(want.reshape(-1), bits),
                                   np.full(ck.CANARY, 0xA5, np.uint8)])
        for lib in libs:
            dst.restore()
            if op == "pad":
                assert lib.fill(dst, want.size, zp) == MPQ_OK
            for b in blocks:
                i4 = ctypes.c_int32 * 4
                blk = ck.Block(i4(*b.count), i4(*b.src_stride), i4(*b.dst_stride),
                               b.src_offset, b.dst_offset, b.src_size, b.dst_size)
                assert lib.copy_block(blk, srcs[b.input], dst) == MPQ_OK
            bad += not np.array_equal(dst.buf, expected)
        n += 1
    assert n >= scaled(200) and bad == 0


def test_block_copy_refuses_blocks_outside_the_buffers(libs: list[ck.Kernels]) -> None:
    lib = libs[0]
    src, dst = ck.Stored(np.zeros(12, np.int64), 8), ck.Stored(np.zeros(12, np.int64), 8)
    I4 = ctypes.c_int32 * 4

    def block(count, ss, ds, so=0, do=0, sn=12, dn=12):
        return ck.Block(I4(*count), I4(*ss), I4(*ds), so, do, sn, dn)

    assert lib.copy_block(block((1, 1, 3, 4), (0, 0, 4, 1), (0, 0, 4, 1)), src, dst) == MPQ_OK
    assert lib.copy_block(block((1, 1, 3, 4), (0, 0, 4, 1), (0, 0, 4, 1), do=1), src, dst) \
        == MPQ_ERR_ARG  # one element past the destination
    assert lib.copy_block(block((1, 1, 4, 4), (0, 0, 4, 1), (0, 0, 4, 1)), src, dst) \
        == MPQ_ERR_ARG
    assert lib.copy_block(block((1, 1, 0, 4), (0, 0, 4, 1), (0, 0, 4, 1)), src, dst) \
        == MPQ_ERR_ARG  # counts must be >= 1
    assert lib.copy_block(block((1, 1, 3, 4), (0, 0, -4, 1), (0, 0, 4, 1)), src, dst) \
        == MPQ_ERR_ARG
    assert lib.lib.mpq_copy_block(block((1, 1, 3, 4), (0, 0, 4, 1), (0, 0, 4, 1)),
                                  src.buf.ctypes.data, dst.buf.ctypes.data, 3) == MPQ_ERR_BITS
    assert lib.fill(dst, 12, 200) == MPQ_ERR_ARG  # not an 8-bit value
    assert lib.fill(dst, -1, 0) == MPQ_ERR_ARG
    assert np.array_equal(dst.buf[:12], np.zeros(12, np.uint8))


# -- activation (table lookup) ------------------------------------------------------------------

def test_activation_random(libs: list[ck.Kernels]) -> None:
    """mpq_activation against `mpq.quant.lut.lookup` for every (in, out) bit pair, tables of
    every function (sigmoid/tanh: 8-bit outputs, as TFLM fixes them), a quarter in place."""
    from mpq.quant import lut

    n = bad = 0
    for rng, bi, bo, _ in cases(10, [(bi, bo, 8) for bi in BITS for bo in BITS] * 3):
        function = str(rng.choice(lut.FUNCTIONS if bo == 8 else
                                  ("hard_swish", "hard_sigmoid", "leaky_relu")))
        s_in = float(np.float32(10 ** rng.uniform(-2.5, 0)))
        zp_in = int(rng.integers(*arith.qrange(bi)))
        if function in lut.FIXED_OUTPUT:
            s_out, zp_out = lut.FIXED_OUTPUT[function]
        else:
            s_out, zp_out = s_in * 2 ** (8 - bo), int(rng.integers(*arith.qrange(bo)))
        table = lut.activation_table("t", function, {"alpha": 0.15, "beta": 0.5}, s_in, zp_in,
                                     s_out, zp_out, bo)
        h, w, c = (int(v) for v in rng.integers(1, 5, 3))
        x = rand_values(rng, bi, (h, w, c))
        want = lut.lookup(table, x)
        st_in, v_in = placed(rng, x, bi)
        inplace = bi == bo and rng.random() < 0.25
        st_out, v_out = (st_in, v_in) if inplace else placed(rng, rand_values(rng, bo, x.shape),
                                                             bo)
        for lib in libs:
            st_in.restore()
            st_out.restore()
            assert lib.activation(table, v_in, v_out) == MPQ_OK
            bad += not check_bytes(st_out, v_out, want)
        n += 1
    assert n >= scaled(200) and bad == 0


def test_activation_refuses_bad_arguments(libs: list[ck.Kernels]) -> None:
    lib = libs[0]
    rng = np.random.default_rng(3)
    s_in, v_in = placed(rng, rand_values(rng, 8, (2, 2, 3)), 8, sub=False)
    s_out, v_out = placed(rng, np.zeros((2, 2, 3), np.int64), 4, sub=False)
    table = np.zeros(256, np.int8)
    assert lib.activation(table, v_in, v_out) == MPQ_OK
    assert lib.activation(None, v_in, v_out) == MPQ_ERR_ARG
    table[200] = 8  # reachable by an 8-bit input, too wide for a 4-bit output
    assert lib.activation(table, v_in, v_out) == MPQ_ERR_ARG
    wider = ck.View(v_in.data, 4, 2, 2, 3, 0, 0, 2)  # same storage, other bits
    assert lib.activation(np.zeros(256, np.int8), v_in, wider) == MPQ_ERR_BITS
    wrong = ck.View(v_out.data, 4, 2, 2, 2, 0, 0, 2)
    assert lib.activation(np.zeros(256, np.int8), v_in, wrong) == MPQ_ERR_ARG


# -- argument checks ----------------------------------------------------------------------------

def test_bad_arguments_are_refused(libs: list[ck.Kernels]) -> None:
    lib = libs[0]
    rng = np.random.default_rng(0)
    s_in, v_in = placed(rng, rand_values(rng, 8, (4, 4, 2)), 8, sub=False)
    s_out, v_out = placed(rng, np.zeros((4, 4, 3), np.int64), 8, sub=False)
    wq = np.ones((3, 3, 3, 2), np.int8)
    one = np.ones(3, np.int64)
    p = ck.ConvParams(1, 1, 1, 1, 1, 1, 1, 0, 0, -128, 127)
    args = (wq, 8, None, one << 30, -one, v_in)
    assert lib.conv2d(p, *args, v_out) == MPQ_OK
    odd = ck.View(v_out.data, 3, 4, 4, 3, 0, 0, 4)
    assert lib.conv2d(p, *args, odd) == MPQ_ERR_BITS
    assert lib.conv2d(p, wq, 5, None, one << 30, -one, v_in, v_out) == MPQ_ERR_BITS
    wrong_c = ck.View(v_out.data, 8, 4, 4, 2, 0, 0, 4)
    assert lib.conv2d(p, *args, wrong_c) == MPQ_ERR_ARG
    assert lib.conv2d(ck.ConvParams(1, 1, 1, 1, 1, 1, 1, 0, 0, 5, 4), *args, v_out) \
        == MPQ_ERR_ARG
    assert lib.conv2d(ck.ConvParams(1, 1, 1, 1, 1, 1, 1, 300, 0, -128, 127), *args, v_out) \
        == MPQ_ERR_ARG
    f, _keep = ck.Kernels._filter(wq, 8)
    q, _qkeep = ck.Kernels._quant(None, one << 30, -one)
    assert lib.lib.mpq_conv2d(p, f, q, v_in, v_out, None) == MPQ_ERR_ARG  # scratch needed
    s4, v4 = placed(rng, np.zeros((4, 4, 2), np.int64), 4, sub=False)
    assert lib.softmax(ck.SoftmaxParams(1 << 30, 1, -10), v_in, v4) == MPQ_ERR_BITS
    assert lib.copy_view(v_in, v4, 0) == MPQ_ERR_BITS
    assert lib.copy_view(v_in, v_out, 2) == MPQ_ERR_ARG
    dw = ck.ConvParams(1, 1, 1, 1, 1, 1, 2, 0, 0, -128, 127)
    assert lib.depthwise_inplace_scratch_size(dw, np.ones((2, 3, 3, 1), np.int8), 8, v_in,
                                              v4) == MPQ_ERR_BITS
    # Storage shared in ways that cannot work: a conv over its own input, a sum written at
    # other bits than the skip it overwrites (mpq.memory does not rule these out by itself).
    same = ck.View(v_in.data, 8, 4, 4, 3, 0, 0, 4)
    assert lib.conv2d(p, *args, same) == MPQ_ERR_ARG
    pa = ck.AddParams(0, 1 << 30, -1, 0, 1 << 30, -1, 20, 0, 1 << 30, -18, -8, 7)
    s_skip, v_skip = placed(rng, np.zeros((4, 4, 3), np.int64), 4, sub=False)
    wider = ck.View(v_skip.data, 8, 4, 4, 3, 0, 0, 4)
    assert lib.conv2d_add(p, *args, pa, v_skip, v_skip) == MPQ_OK
    assert lib.conv2d_add(p, *args, pa, v_skip, wider) == MPQ_ERR_BITS
    assert lib.conv2d_add(p, *args, pa, v_in, v_out) == MPQ_ERR_ARG
    assert lib.add(pa, v_skip, v_skip, wider) == MPQ_ERR_BITS
    assert np.array_equal(s_out.buf, s_out.expected_bytes(v_out, s_out.read(v_out)))


@pytest.mark.parametrize("kind", ["pointwise", "conv3x3", "depthwise", "fully_connected"])
def test_extreme_output_zero_point(libs: list[ck.Kernels], kind: str) -> None:
    """An output zero point far outside any tensor's range (|zp| >= 2^24), with accumulators
    and multipliers that bring the requantised value near -zp: the kernels' exact int64 output
    stage against reference_kernels (the usual 32-bit clamp would be wrong here)."""
    rng = np.random.default_rng(17)
    for zp_out in (-(1 << 29), -(1 << 29) - 77, (1 << 24) + 3):
        h, w, c = 5, 6, 8
        cout = c if kind == "depthwise" else 6
        zp_in = int(rng.integers(-100, 100))
        x = zp_in + rng.integers(-20, 21, (h, w, c))
        k = 1 if kind in ("pointwise", "fully_connected") else 3
        groups = c if kind == "depthwise" else 1
        wq = rng.integers(-3, 4, (cout, k, k, c // groups))
        # requant(acc) = acc/2 (M = 2^30, S = 0) lands near -zp_out, around the clamp range.
        bias = -2 * zp_out + rng.integers(-300, 300, cout)
        mult, shift = np.full(cout, 1 << 30), np.zeros(cout, np.int64)
        if kind == "fully_connected":
            flat = x.reshape(-1).tolist()
            wf = rng.integers(-1, 2, (cout, len(flat)))
            want = np.array(ref.fully_connected(flat, zp_in, wf.tolist(), bias.tolist(),
                                                mult.tolist(), shift.tolist(), zp_out, -128,
                                                127)).reshape(1, 1, cout)
            s_in, v_in = placed(rng, x, 8, sub=False)
            s_out, v_out = placed(rng, np.zeros((1, 1, cout), np.int64), 8, sub=False)
            for lib in libs:
                s_out.restore()
                assert lib.fully_connected(ck.FcParams(zp_in, zp_out, -128, 127), wf, 8, bias,
                                           mult, shift, v_in, v_out) == MPQ_OK
                assert check_bytes(s_out, v_out, want)
            continue
        pad = k // 2
        want = np.array(ref.conv(x.tolist(), zp_in, wq.tolist(), bias.tolist(), mult.tolist(),
                                 shift.tolist(), zp_out, -128, 127, (1, 1), (1, 1),
                                 (pad, pad, pad, pad), groups))
        assert 0 < int((np.abs(want) < 127).sum()) < want.size  # both clamped and not
        p = ck.ConvParams(1, 1, 1, 1, pad, pad, groups, zp_in, zp_out, -128, 127)
        for lib in libs:
            if kind == "depthwise":
                store = ck.Stored(x, 8)
                v = store.view(h, w, c)
                assert lib.depthwise_inplace(p, wq, 8, bias, mult, shift, v, v) == MPQ_OK
                assert check_bytes(store, v, want)
            else:
                s_in, v_in = placed(rng, x, 8)
                s_out, v_out = placed(rng, np.zeros(want.shape, np.int64), 8)
                assert lib.conv2d(p, wq, 8, bias, mult, shift, v_in, v_out) == MPQ_OK
                assert check_bytes(s_out, v_out, want)


def test_bad_weight_formats_are_refused(libs: list[ck.Kernels]) -> None:
    """Every kernel that takes a filter refuses a (format, bits, codebook) it cannot decode —
    before writing anything — and takes each valid one."""
    lib = libs[0]
    rng = np.random.default_rng(1)
    s_in, v_in = placed(rng, rand_values(rng, 8, (4, 4, 2)), 8, sub=False)
    s_out, v_out = placed(rng, np.zeros((4, 4, 2), np.int64), 8, sub=False)
    one = np.ones(2, np.int64)
    book = np.arange(-8, 8)
    conv = ck.ConvParams(1, 1, 1, 1, 1, 1, 1, 0, 0, -128, 127)
    dw = ck.ConvParams(1, 1, 1, 1, 1, 1, 2, 0, 0, -128, 127)
    fc = ck.FcParams(0, 0, -128, 127)
    s_fc, v_fc = placed(rng, np.zeros((1, 1, 2), np.int64), 8, sub=False)
    calls = {
        "conv2d": lambda w: lib.conv2d(conv, w, None, None, one << 30, -one, v_in, v_out),
        "depthwise": lambda w: lib.depthwise_inplace(dw, w, None, None, one << 30, -one, v_in,
                                                     v_in),
        "fc": lambda w: lib.fully_connected(fc, w, None, None, one << 30, -one, v_in, v_fc),
    }
    shapes = {"conv2d": (2, 3, 3, 2), "depthwise": (2, 3, 3, 1), "fc": (2, 32)}

    def weights(name: str, fmt: int, bits: int) -> ck.Weights:
        """All-zero codes, described as (fmt, bits) whether or not that is valid."""
        w = ck.Weights(np.zeros(shapes[name], np.int64), 2)
        w.fmt, w.bits, w.codebook = fmt, bits, book
        return w

    for name, call in calls.items():
        before = [s.buf.copy() for s in (s_in, s_out, s_fc)]
        for fmt, bits, rc in [
                (ck.WFMT_LINEAR, 3, MPQ_ERR_BITS), (ck.WFMT_LINEAR, 5, MPQ_ERR_BITS),
                (ck.WFMT_POW2, 8, MPQ_ERR_BITS), (ck.WFMT_POW2, 1, MPQ_ERR_BITS),
                (ck.WFMT_CODEBOOK, 5, MPQ_ERR_BITS), (3, 4, MPQ_ERR_ARG), (-1, 8, MPQ_ERR_ARG)]:
            assert call(weights(name, fmt, bits)) == rc, (name, fmt, bits)
        no_book = weights(name, ck.WFMT_CODEBOOK, 4)
        no_book.codebook = None
        assert call(no_book) == MPQ_ERR_ARG, name
        assert all(np.array_equal(s.buf, b) for s, b in
                   zip((s_in, s_out, s_fc), before, strict=True)), name
        for fmt, bits in WFORMATS:
            assert call(weights(name, fmt, bits)) == MPQ_OK, (name, fmt, bits)


# -- the library's files and cross-compilation ---------------------------------------------------

def _objects(tmp_path, cc: str, flags: list[str] | tuple[str, ...]) -> dict[str, Path]:
    """Every library file compiled alone (-c) with `cc`, CFLAGS, -Wpedantic and `flags`."""
    objs = {}
    for src in ck.library_sources():
        objs[src.name] = tmp_path / f"{src.stem}.o"
        ck.compile_c([cc, *ck.CFLAGS, "-Wpedantic", *flags, f"-I{ck.LIBRARY}", "-c", "-o",
                      str(objs[src.name]), str(src)])
    return objs


def test_library_is_plain_c_and_exports_link_their_kernels(tmp_path) -> None:
    """The library is the C under `kernels/`, with no template syntax: every file compiles
    alone with host gcc -Werror (plain and DSP-emulated), and for each kernel the files an
    export copies for it (`library_files`) link into a program calling it - so the selection
    misses nothing, and unused files stay out."""
    names = sorted(p.name for p in ck.LIBRARY.iterdir() if p.suffix in (".c", ".h"))
    assert set(library_files(list(KERNEL_SOURCES))) == set(names)
    # besides the C, only the measured code-size table (`tools/code_sizes.py`) lives there
    assert {p.name for p in ck.LIBRARY.iterdir()} - set(names) == {"code_sizes.json",
                                                                  "latency_table.json"}
    for name in names:
        text = (ck.LIBRARY / name).read_text()
        assert not any(t in text for t in ("{{", "{%", "{#")), name
    for flags in ((), ("-DMPQ_EMULATE_DSP",)):
        out = tmp_path / ("dsp" if flags else "plain")
        out.mkdir()
        objs = _objects(out, "gcc", flags)
        for kernel in KERNEL_SOURCES:
            main = out / f"main_{kernel}.c"
            main.write_text('#include <stddef.h>\n#include "mpq_kernels.h"\n'
                            f"int main(void) {{ return (int)(size_t)&mpq_{kernel}; }}\n")
            files = [objs[n] for n in c_sources(library_files([kernel]))]
            ck.compile_c(["gcc", *ck.CFLAGS, f"-I{ck.LIBRARY}", "-o", str(out / kernel),
                          str(main), *map(str, files)])
    assert "mpq_softmax.c" not in library_files(["conv2d"])


ARM_TARGETS = {
    "cortex-m4": ["-mcpu=cortex-m4", "-mthumb", "-mfloat-abi=hard", "-mfpu=fpv4-sp-d16"],
    "cortex-m7": ["-mcpu=cortex-m7", "-mthumb", "-mfloat-abi=hard", "-mfpu=fpv5-d16"],
    "cortex-m0plus": ["-mcpu=cortex-m0plus", "-mthumb"],  # no DSP: the portable loops
}


@pytest.mark.parametrize("target", list(ARM_TARGETS))
def test_cross_compiles_for_cortex_m(tmp_path, target: str) -> None:
    """Every library file compiles for the core with arm-none-eabi-gcc -Wall -Wextra -Werror
    -Wpedantic; together they need nothing beyond <string.h> (and on v6-M libgcc's integer
    helpers), have no floating point, and use SMLAD/SXTB16 exactly where the DSP exists."""
    if shutil.which("arm-none-eabi-gcc") is None:
        pytest.skip("arm-none-eabi-gcc is not installed (apt-get install gcc-arm-none-eabi)")
    objs = list(_objects(tmp_path, "arm-none-eabi-gcc", ARM_TARGETS[target]).values())
    nm = subprocess.run(["arm-none-eabi-nm", *map(str, objs)], capture_output=True,
                        text=True, check=True).stdout.splitlines()
    rows = [line.split() for line in nm if line and not line.endswith(":")]
    defined = {r[-1] for r in rows if len(r) == 3 and r[1] != "U"}
    undefined = {r[-1] for r in rows if r[0] == "U"} - defined
    # Only <string.h>; on v6-M also libgcc's integer helpers (no SDIV, no 32x32->64 multiply),
    # but no 64-bit division and nothing in floating point.
    allowed = {"memcpy", "memset"}
    if target == "cortex-m0plus":
        allowed |= {f"__aeabi_{f}" for f in ("idiv", "idivmod", "lmul", "llsl", "llsr", "lasr")}
    assert undefined <= allowed, undefined
    dis = subprocess.run(["arm-none-eabi-objdump", "-d", *map(str, objs)], capture_output=True,
                         text=True, check=True).stdout
    assert not any(op in dis for op in (".f32", ".f64", "vmov", "vldr", "vstr")), "float code"
    simd = "smlad" in dis and ("sxtb16" in dis or "sxtab16" in dis)
    assert simd == (target != "cortex-m0plus")


# -- elementwise: mul, sub (broadcasting), prelu (mpq_elementwise.c) ---------------------------

def _broadcast_shape(rng: np.random.Generator, shape: tuple[int, int, int]
                     ) -> tuple[int, int, int]:
    """`shape`, or it with some dims set to 1 (squeeze-excite's 1×1×C half the time)."""
    if rng.random() < 0.4:
        return shape
    if rng.random() < 0.5:
        return (1, 1, shape[2])
    return tuple(d if rng.random() < 0.5 else 1 for d in shape)  # type: ignore[return-value]


@pytest.mark.parametrize("op", ["mul", "sub"])
def test_mul_sub_random(libs: list[ck.Kernels], op: str) -> None:
    """mpq_mul / mpq_sub against mpq.sim at every bit combination, either operand broadcast,
    through views of larger tensors, the output sometimes the very same view as operand a."""
    n = bad = aliased = broadcast = 0
    for rng, b1, b2, bo in cases(11 if op == "mul" else 12):
        out_shape = tuple(int(v) for v in rng.integers(1, 6, 3))
        sa, sb = out_shape, _broadcast_shape(rng, out_shape)
        if rng.random() < 0.3:
            sa, sb = sb, sa
        a1, a2, ao = rand_act(rng, b1), rand_act(rng, b2), rand_act(rng, bo, 0.2)
        node = Node(op, op, ["x", "x2"], ["y"],
                    dict(zip(("act_min", "act_max"), rand_clamp(rng, ao), strict=True)))
        acts = {"x": a1, "x2": a2, "y": ao}
        graph = Graph("op", {"x": Tensor("x", (1, *sa)), "x2": Tensor("x2", (1, *sb)),
                             "y": Tensor("y", (1, *out_shape))}, [node], ["x", "x2"], ["y"])
        lq = layer_params(node, acts)
        qm = QuantModel(graph, acts, {op: lq})
        x1, x2 = rand_values(rng, b1, sa), rand_values(rng, b2, sb)
        want = run_int(qm, {"x": x1[None], "x2": x2[None]})["y"][0]
        s1, v1 = placed(rng, x1, b1)
        s2, v2 = placed(rng, x2, b2)
        alias = bo == b1 and sa == out_shape and rng.random() < 0.5
        s_out, v_out = (s1, v1) if alias else placed(rng, np.zeros(out_shape, np.int64), bo)
        e = lq.extra
        if op == "mul":
            p = ck.MulParams(a1.zero_point, a2.zero_point, ao.zero_point, e["mo"], e["so"],
                             lq.act_min, lq.act_max)
        else:
            p = add_params(lq, a1.zero_point, a2.zero_point, ao)
        for lib in libs:
            for s in (s1, s_out):
                s.restore()
            assert getattr(lib, op)(p, v1, v2, v_out) == MPQ_OK
            bad += not check_bytes(s_out, v_out, want)
        aliased += alias
        broadcast += sa != sb
        n += 1
    assert n >= scaled(200) and bad == 0 and aliased >= scaled(10) and broadcast >= scaled(80)


def test_prelu_random(libs: list[ck.Kernels]) -> None:
    """mpq_prelu against mpq.sim at every (in, out) bit combination, per-channel int8 slopes
    with any zero point (as an int8 .tflite gives them), in place sometimes."""
    n = bad = aliased = 0
    for rng, bi, bo, _ in cases(13):
        shape = tuple(int(v) for v in rng.integers(1, 6, 3))
        c = shape[2]
        a_in, a_out = rand_act(rng, bi), rand_act(rng, bo, 0.2)
        attrs = {"alpha": tuple(float(v) for v in rng.uniform(-1, 1, c))}
        if rng.random() < 0.5:
            attrs.update(alpha_q=tuple(int(v) for v in rng.integers(-128, 128, c)),
                         alpha_scale=float(np.float32(10 ** rng.uniform(-3, -1))),
                         alpha_zp=int(rng.integers(-128, 128)))
        node = Node("prelu", "prelu", ["x"], ["y"], attrs)
        acts = {"x": a_in, "y": a_out}
        graph = Graph("op", {t: Tensor(t, (1, *shape)) for t in ("x", "y")}, [node], ["x"],
                      ["y"])
        lq = layer_params(node, acts)
        qm = QuantModel(graph, acts, {"prelu": lq})
        x = rand_values(rng, bi, shape)
        want = run_int(qm, {"x": x[None]})["y"][0]
        s_in, v_in = placed(rng, x, bi)
        alias = bo == bi and rng.random() < 0.4
        s_out, v_out = (s_in, v_in) if alias else placed(rng, np.zeros(shape, np.int64), bo)
        alpha = np.ascontiguousarray(lq.const, np.int8)
        e = lq.extra
        p = ck.PreluParams(a_in.zero_point, e["m1"], e["s1"], e["m2"], e["s2"],
                           alpha.ctypes.data, e["alpha_zp"], a_out.zero_point, lq.act_min,
                           lq.act_max)
        for lib in libs:
            for s in (s_in, s_out):
                s.restore()
            assert lib.prelu(p, v_in, v_out) == MPQ_OK
            bad += not check_bytes(s_out, v_out, want)
        aliased += alias
        n += 1
    assert n >= scaled(200) and bad == 0 and aliased >= scaled(10)


def test_elementwise_bad_arguments_are_refused(libs: list[ck.Kernels]) -> None:
    """Shapes that do not broadcast, zero points outside the input's range, a clamp the output
    cannot hold, aliasing at different bits, a missing slope array: refused before writing."""
    a = ck.Stored(np.zeros(24, np.int64), 8)
    b = ck.Stored(np.zeros(24, np.int64), 4)
    out = ck.Stored(np.zeros(24, np.int64), 8)
    va, vo = a.view(2, 3, 4), out.view(2, 3, 4)
    mp = ck.MulParams(0, 0, 0, 1 << 30, 0, -128, 127)
    sp = ck.AddParams(0, 1 << 30, 0, 0, 1 << 30, 0, 20, 0, 1 << 30, -20, -128, 127)
    slopes = np.zeros(4, np.int8)
    pp = ck.PreluParams(0, 1 << 30, 1, 1 << 30, -7, slopes.ctypes.data, 0, 0, -128, 127)
    for lib in libs:
        assert lib.mul(mp, va, b.view(2, 2, 4), vo) == MPQ_ERR_ARG  # 2 vs 3: no broadcast
        assert lib.sub(sp, va, b.view(1, 3, 3), vo) == MPQ_ERR_ARG
        assert lib.mul(ck.MulParams(0, 9, 0, 1 << 30, 0, -128, 127), va, b.view(1, 1, 4),
                       vo) == MPQ_ERR_ARG  # 9 is no 4-bit zero point
        assert lib.mul(ck.MulParams(0, 0, 0, 1 << 30, 0, -128, 127), va, b.view(1, 1, 4),
                       b.view(2, 3, 4)) == MPQ_ERR_ARG  # clamp beyond 4 bits
        assert lib.sub(sp, va, b.view(1, 1, 4), a.view(2, 3, 4, 0, 0)) == MPQ_OK
        assert lib.mul(ck.MulParams(0, 0, 0, 1 << 30, 0, -8, 7), b.view(2, 3, 4), va,
                       ck.View(b.buf.ctypes.data, 8, 2, 3, 4, 0, 0, 3)) == MPQ_ERR_BITS
        assert lib.prelu(pp, va, out.view(2, 3, 3)) == MPQ_ERR_ARG
        assert lib.prelu(ck.PreluParams(0, 1 << 30, 1, 1 << 30, -7, None, 0, 0, -128, 127),
                         va, vo) == MPQ_ERR_ARG
        assert (out.buf[:-ck.CANARY] == 0).all()


SANITIZE = "-fsanitize=address,undefined -fno-sanitize-recover=all -fno-omit-frame-pointer"


def test_kernels_clean_under_sanitizers() -> None:
    """The kernel tests above again (1 case per bit combination), on the library built with
    -fsanitize=address,undefined: no kernel reads or writes outside its buffers and none has
    undefined behaviour (signed overflow, bad shifts, misaligned access) on any path. Python is
    not instrumented, so the ASan runtime is preloaded into a child pytest."""
    if os.environ.get("MPQ_CKERNELS_CFLAGS"):
        pytest.skip("already the sanitizer run")
    asan = subprocess.run(["gcc", "-print-file-name=libasan.so"], capture_output=True,
                          text=True).stdout.strip()
    if not Path(asan).is_file():
        pytest.skip("gcc has no libasan.so (apt-get install libasan8)")
    env = {**os.environ, "MPQ_CKERNELS_CFLAGS": SANITIZE, "MPQ_CKERNELS_PER_COMBO": "1",
           "LD_PRELOAD": asan, "ASAN_OPTIONS": "detect_leaks=0", "UBSAN_OPTIONS":
           "print_stacktrace=1"}
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider",
                          __file__, "-k", "not library and not cross and not sanitizers"],
                         env=env, capture_output=True, text=True, timeout=600)
    out = run.stdout + run.stderr
    assert run.returncode == 0, out[-4000:]
    assert "AddressSanitizer" not in out and "runtime error" not in out, out[-4000:]
    # every kernel test ran in the child (a floor, so new kernels' tests only add to it)
    ran = re.search(r"\b(\d+) passed", out)
    assert ran and int(ran.group(1)) >= 20 and " skipped" not in out, out[-2000:]
