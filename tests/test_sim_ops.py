"""Randomised per-op suite: the integer reference against the plain kernels of
`reference_kernels.py`, ≥ 200 cases per op, every input/output/weight bitwidth in {8, 4, 2},
through packed buffers (DESIGN §4.2)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import reference_kernels as R
from random_cases import rand_act, rand_clamp, random_pool_case, single_node_model

from mpq.ir import Graph, Node, Tensor, conv_out_size
from mpq.quant import arith
from mpq.quant.qmodel import QuantModel, layer_params
from mpq.sim import run_packed

BITS = (8, 4, 2)
CASES = 270  # 10 per (in, out, weight) bit combination


def qrange(bits: int) -> tuple[int, int]:
    return -(1 << (bits - 1)), (1 << (bits - 1)) - 1


def run(qm: QuantModel, x: np.ndarray) -> np.ndarray:
    name = qm.graph.inputs[0]
    packed = arith.pack(x, qm.acts[name].bits)
    out = qm.graph.outputs[0]
    buf = run_packed(qm, packed)
    assert buf.size == -(-qm.graph.tensors[out].size * qm.acts[out].bits // 8)
    return arith.unpack(buf, qm.acts[out].bits, qm.graph.tensors[out].size).astype(np.int64)


def combos():
    for i, (bi, bo, bw) in enumerate(itertools.product(BITS, BITS, BITS)):
        for j in range(CASES // 27):
            yield i * 100 + j, bi, bo, bw


@pytest.mark.parametrize("kind", ["conv", "depthwise", "grouped"])
def test_conv_random(kind: str) -> None:
    mismatches = cases = 0
    for seed, bi, bo, bw in combos():
        rng = np.random.default_rng(seed + {"conv": 0, "depthwise": 1, "grouped": 2}[kind] * 10000)
        cin = int(rng.integers(1, 5))
        groups = 1
        mult = 1
        if kind == "depthwise":
            groups, mult = cin + 1, int(rng.integers(1, 3))
            cin = groups
        elif kind == "grouped":
            groups = int(rng.integers(2, 4))
            cin = groups * int(rng.integers(1, 3))
        cout = groups * mult if kind == "depthwise" else groups * int(rng.integers(1, 3))
        kh, kw = (int(v) for v in rng.integers(1, 4, 2))
        sh, sw = (int(v) for v in rng.integers(1, 3, 2))
        dh, dw = (int(v) for v in rng.integers(1, 3, 2))
        pads = tuple(int(v) for v in rng.integers(0, 3, 4))
        h, w = (int(v) for v in rng.integers(dh * (kh - 1) + 1, 7, 2))
        ho = conv_out_size(h, kh, sh, dh, pads[0], pads[2])
        wo = conv_out_size(w, kw, sw, dw, pads[1], pads[3])
        if ho <= 0 or wo <= 0:
            continue
        cases += 1
        a_in, a_out = rand_act(rng, bi), rand_act(rng, bo)
        lo, hi = rand_clamp(rng, a_out)
        wmax = arith.weight_qmax(bw)
        wq = rng.integers(-wmax, wmax + 1, (cout, kh, kw, cin // groups)).astype(np.int8)
        ws = (10 ** rng.uniform(-3, 0, cout)).astype(np.float32)
        bias = rng.integers(-5000, 5000, cout)
        node = Node("conv", "conv2d", ["x"], ["y"], {
            "kernel": (kh, kw), "strides": (sh, sw), "dilations": (dh, dw), "pads": pads,
            "groups": groups, "act_min": lo, "act_max": hi})
        qm = single_node_model(node, {"x": (1, h, w, cin), "y": (1, ho, wo, cout)},
                               {"x": a_in, "y": a_out}, weight=wq, weight_scale=ws,
                               weight_bits=bw, bias=bias)
        lq = qm.layers["conv"]
        x = rng.integers(*qrange(bi), (1, h, w, cin), endpoint=True)
        got = run(qm, x).reshape(ho, wo, cout)
        ref = R.conv(x[0].tolist(), a_in.zero_point, wq.tolist(), bias.tolist(),
                     lq.multiplier.tolist(), lq.shift.tolist(), a_out.zero_point, lq.act_min,
                     lq.act_max, (sh, sw), (dh, dw), pads, groups)
        mismatches += int((got != np.array(ref)).sum())
    assert cases >= 200 and mismatches == 0


def test_fully_connected_random() -> None:
    mismatches = 0
    for seed, bi, bo, bw in combos():
        rng = np.random.default_rng(seed)
        k, cout = int(rng.integers(1, 40)), int(rng.integers(1, 12))
        a_in, a_out = rand_act(rng, bi), rand_act(rng, bo)
        lo, hi = rand_clamp(rng, a_out)
        wmax = arith.weight_qmax(bw)
        wq = rng.integers(-wmax, wmax + 1, (cout, k)).astype(np.int8)
        ws = (10 ** rng.uniform(-3, 0, cout)).astype(np.float32)
        bias = rng.integers(-20000, 20000, cout)
        node = Node("fc", "fully_connected", ["x"], ["y"], {"act_min": lo, "act_max": hi})
        qm = single_node_model(node, {"x": (1, k), "y": (1, cout)}, {"x": a_in, "y": a_out},
                               weight=wq, weight_scale=ws, weight_bits=bw, bias=bias)
        lq = qm.layers["fc"]
        x = rng.integers(*qrange(bi), (1, k), endpoint=True)
        ref = R.fully_connected(x[0].tolist(), a_in.zero_point, wq.tolist(), bias.tolist(),
                                lq.multiplier.tolist(), lq.shift.tolist(), a_out.zero_point,
                                lq.act_min, lq.act_max)
        mismatches += int((run(qm, x) != np.array(ref)).sum())
    assert mismatches == 0


def test_add_random() -> None:
    mismatches = 0
    for seed, b1, b2, bo in combos():
        rng = np.random.default_rng(seed)
        shape = (1, int(rng.integers(1, 5)), int(rng.integers(1, 5)), int(rng.integers(1, 6)))
        a1, a2, ao = rand_act(rng, b1), rand_act(rng, b2), rand_act(rng, bo)
        lo, hi = rand_clamp(rng, ao)
        node = Node("add", "add", ["x", "x2"], ["y"], {"act_min": lo, "act_max": hi})
        graph = Graph("op", {t: Tensor(t, shape) for t in ("x", "x2", "y")}, [node],
                      ["x", "x2"], ["y"])
        acts = {"x": a1, "x2": a2, "y": ao}
        lq = layer_params(node, acts)
        qm = QuantModel(graph, acts, {"add": lq})
        x1 = rng.integers(*qrange(b1), shape, endpoint=True)
        x2 = rng.integers(*qrange(b2), shape, endpoint=True)
        from mpq.sim import run_int

        got = run_int(qm, {"x": x1, "x2": x2})["y"].reshape(-1)
        ref = R.add(x1.reshape(-1).tolist(), a1.zero_point, a1.scale, x2.reshape(-1).tolist(),
                    a2.zero_point, a2.scale, ao.zero_point, ao.scale, lq.act_min, lq.act_max)
        mismatches += int((got != np.array(ref)).sum())
    assert mismatches == 0


@pytest.mark.parametrize("kind", ["max", "avg"])
def test_pool_random(kind: str) -> None:
    mismatches = 0
    for seed, bits, _, _ in combos():
        rng = np.random.default_rng(seed + 7)
        qm, (kh, kw, sh, sw, *pads), (h, w, c) = random_pool_case(rng, kind, bits, 7, 5)
        ho, wo = qm.graph.tensors["y"].shape[1:3]
        lq = qm.layers["pool"]
        x = rng.integers(*qrange(bits), (1, h, w, c), endpoint=True)
        ref = R.pool(x[0].tolist(), (kh, kw), (sh, sw), pads, kind, lq.act_min, lq.act_max)
        mismatches += int((run(qm, x).reshape(ho, wo, c) != np.array(ref)).sum())
    assert mismatches == 0


def test_requantize_matches_scalar_reference() -> None:
    rng = np.random.default_rng(1)
    acc = rng.integers(-(1 << 24), 1 << 24, 5000)
    reals = 10 ** rng.uniform(-8, 0.6, 5000)
    pairs = [arith.quantize_multiplier(float(r)) for r in reals]
    m = np.array([p[0] for p in pairs])
    s = np.array([p[1] for p in pairs])
    got = arith.requantize(acc, m, s)
    ref = [R.requantize(int(a), int(mm), int(ss)) for a, mm, ss in zip(acc, m, s, strict=True)]
    assert np.array_equal(got, ref)
    assert all(arith.quantize_multiplier(float(r)) == R.quantize_multiplier(float(r))
               for r in reals[:500])
    assert (s > 0).any() and (s < -20).any()


def test_pack_unpack_roundtrip_and_order() -> None:
    assert arith.pack(np.array([1, 2, 3, 4]), 4).tolist() == [0x21, 0x43]
    assert arith.pack(np.array([1, -1, 0, -2]), 2).tolist() == [0b10_00_11_01]
    rng = np.random.default_rng(0)
    for bits in BITS:
        for n in (1, 3, 7, 64, 101):
            v = rng.integers(*qrange(bits), n, endpoint=True)
            buf = arith.pack(v, bits)
            assert buf.size == -(-n * bits // 8)
            assert np.array_equal(arith.unpack(buf, bits, n), v)
