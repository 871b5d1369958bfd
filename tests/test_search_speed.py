"""The measured search's speed-ups keep every number (issue 13 item 5): the float32
convolution and merged requantisation of the integer reference give the float64 path's
integers, the probe's side-by-side measurements give the one-at-a-time damages and run count,
and the fidelity block may reuse the probe's int8 run only for the very same model."""

from __future__ import annotations

import numpy as np
import pytest
from test_measured_search import fragile_probe_inputs

from mpq.ir import Node
from mpq.quant import arith
from mpq.quant.qmodel import ActQuant, LayerQuant
from mpq.search import sensitivity
from mpq.search.sensitivity import Probe
from mpq.sim import Conv2D, _exact, _requant_out, conv_float32, requantize_rows, run_op


def _layer(rng: np.random.Generator, cout: int, reals: np.ndarray, bits: int,
           bias_bits: int = 20) -> tuple[LayerQuant, ActQuant]:
    ms = [arith.quantize_multiplier(float(r)) for r in reals]
    lo, hi = arith.qrange(bits)
    lq = LayerQuant(bias=rng.integers(-(1 << bias_bits), 1 << bias_bits, cout),
                    multiplier=np.array([m for m, _ in ms]), shift=np.array([s for _, s in ms]),
                    act_min=lo, act_max=hi)
    return lq, ActQuant(0.1, int(rng.integers(lo, hi + 1)), bits)


@pytest.mark.parametrize("case", ["random", "ties", "mixed_shifts", "left_shift", "relu",
                                  "relu_ties", "relu_wide"])
def test_merged_requantisation_equals_the_reference_formula(case: str) -> None:
    """`requantize_rows` (one merged shift, chunked, in place) against `_requant_out`
    (`arith.requantize` + zero point + clamp) on every rounding case: halves of both signs
    (power-of-two multipliers make exact ties), channels with and without a right shift,
    zero points at the range ends, the left-shift fallback, and a clamp from the zero point up
    (a fused ReLU: the sign term is skipped there)."""
    rng = np.random.default_rng({"random": 0, "ties": 1, "mixed_shifts": 2,
                                 "left_shift": 3, "relu": 4, "relu_ties": 5,
                                 "relu_wide": 6}[case])
    for _ in range(40):
        cout = int(rng.integers(1, 40))
        acc = rng.integers(-(1 << 23), 1 << 23, (2, 3, 5, cout)).astype(np.float64)
        if case in ("ties", "relu_ties"):
            acc = rng.integers(-64, 64, acc.shape).astype(np.float64)
            reals = 2.0 ** -rng.integers(1, 8, cout)
        elif case == "mixed_shifts":
            reals = rng.choice([0.75, 0.3, 1e-4, 1e-9], cout)
        elif case == "left_shift":
            reals = rng.uniform(1.0, 3.0, cout)
            acc = np.rint(acc / 4096)
        else:
            reals = rng.uniform(1e-7, 0.99, cout)
        for bits in (8, 4, 2):
            lq, out = _layer(rng, cout, reals, bits, {"ties": 4, "relu_ties": 4,
                                                       "relu_wide": 30}.get(case, 20))
            lq.bias[0] = 0
            if case.startswith("relu"):
                lq.act_min = out.zero_point
            fast = requantize_rows(acc.astype(np.float32), lq, out)
            ref = _requant_out(np.rint(acc).astype(np.int64) + lq.bias, lq, out)
            # int16 on the merged path (the clamp range fits), int64 on the fallback
            assert fast.dtype in (np.int16, np.int64)
            assert np.array_equal(fast, ref)


@pytest.mark.parametrize("relu", [True, False])
def test_float64_requantisation_runs_and_refuses_where_it_cannot_be_exact(relu: bool) -> None:
    """The float64 form of the merged requantisation is taken on ordinary layers — with a
    fused ReLU (no sign term) and without (the sign term `_sign_term`: accumulators on both
    sides of each channel's threshold and exactly at it) — and gives `_requant_out`'s integers
    on accumulators at both ends of the float32-exact range; a bias so large that v could
    round across the clamp is refused."""
    from mpq.sim import _requant_float64, _sign_term

    rng = np.random.default_rng(7 + relu)
    cout = 24
    acc = rng.integers(-(1 << 24), 1 << 24, (4, 7, 7, cout)).astype(np.float64)
    acc[0, 0, 0] = (1 << 24) - 1
    acc[0, 0, 1] = -(1 << 24) + 1
    lq, out = _layer(rng, cout, rng.uniform(1e-6, 0.5, cout), 8, 12)
    if relu:
        lq.act_min = out.zero_point
    ms = [arith.quantize_multiplier(float(r)) for r in rng.uniform(1e-6, 0.5, cout)]
    lq.multiplier = np.array([m for m, _ in ms])
    lq.shift = np.array([s for _, s in ms])
    right = -lq.shift
    total = right + 31
    half = np.where(right > 0, np.left_shift(np.int64(1), np.maximum(right - 1, 0)), 0)
    add_r = lq.bias * lq.multiplier + (1 << 30)
    add_all = add_r + ((half + (np.int64(out.zero_point) << right)) << 31)
    sign = None if relu else _sign_term(add_r, lq.multiplier, right)
    if sign is not None:  # the threshold and its neighbours, where R changes sign
        t = sign[0].astype(np.int64)
        acc[1, :3] = np.stack([t - 1, t, t + 1])[:, None, :]
    flat = acc.astype(np.float32).reshape(-1, cout)
    y = np.empty(flat.shape, np.int16)
    assert _requant_float64(flat, y, lq.multiplier, add_all, total, lq.act_min, lq.act_max, 64,
                            sign)
    want = _requant_out(np.rint(acc).astype(np.int64) + lq.bias, lq, out)
    assert np.array_equal(y.reshape(acc.shape), want)
    huge = add_all.copy()
    huge[3] = 1 << 61
    assert not _requant_float64(flat, y, lq.multiplier, huge, total, lq.act_min, lq.act_max,
                                64, sign)


def _conv_node(cin: int, cout: int, k: int, stride: int, pad: int, groups: int) -> Node:
    return Node("c", "conv2d", ["x"], ["y"],
                {"pads": (pad, pad, pad, pad), "strides": (stride, stride),
                 "dilations": (1, 1), "groups": groups})


@pytest.mark.parametrize("shape", [(6, 10, 1, 1, 0, 1), (8, 8, 3, 2, 1, 8), (8, 8, 3, 1, 1, 8),
                                   (3, 7, 3, 2, 1, 1), (4, 6, 3, 1, 0, 2)])
def test_float32_convolution_is_the_exact_integer_one(shape) -> None:
    """Pointwise, depthwise (stride 1 and 2, padded), full and grouped convolutions: the
    float32 path's accumulators equal the float64 path's integers, and the layer output is the
    same."""
    cin, cout, k, stride, pad, groups = shape
    rng = np.random.default_rng(cout * 31 + k)
    node = _conv_node(cin, cout, k, stride, pad, groups)
    x = rng.integers(-128, 128, (3, 9, 9, cin)).astype(np.int64)
    w = rng.integers(-127, 128, (cout, k, k, cin // groups)).astype(np.int8)
    ho = (9 + 2 * pad - k) // stride + 1
    out_shape = (3, ho, ho, cout)
    lq, out = _layer(rng, cout, rng.uniform(1e-5, 1e-3, cout), 8)
    lq.weight = w
    zp = int(rng.integers(-20, 20))
    acc32 = conv_float32(node, lq, zp, x, out_shape)
    assert acc32 is not None and acc32.dtype == np.float32
    from mpq.interpreter import conv2d_nhwc, pad_nhwc

    acc64 = conv2d_nhwc(pad_nhwc((x - zp).astype(np.float64), node.attrs["pads"]),
                        w.astype(np.float64), (stride, stride), (1, 1), groups, (ho, ho))
    assert np.array_equal(acc32.astype(np.float64), acc64)
    ref = _requant_out(_exact(acc64, node) + lq.bias, lq, out)
    assert np.array_equal(requantize_rows(acc32, lq, out), ref)


def test_float32_is_refused_when_a_sum_could_leave_its_exact_range() -> None:
    """A wide layer whose Σ|W|·max|X − zp| reaches 2^24 keeps the float64 path (None here),
    and `Conv2D.run` still gives the exact integers."""
    rng = np.random.default_rng(5)
    node = _conv_node(1024, 4, 1, 1, 0, 1)
    x = np.full((1, 2, 2, 1024), 127, np.int64)
    w = np.full((4, 1, 1, 1024), 127, np.int8)  # 255·127·1024 > 2^24
    lq, out = _layer(rng, 4, np.full(4, 1e-7), 8)
    lq.weight = w
    assert conv_float32(node, lq, -128, x, (1, 2, 2, 4)) is None
    from mpq.quant.qmodel import QuantModel

    qm = QuantModel(None, {"x": ActQuant(0.1, -128, 8), "y": out}, {"c": lq})
    y = Conv2D.run(node, lq, qm, [x], (1, 2, 2, 4))
    acc = np.full((1, 2, 2, 4), 255 * 127 * 1024, np.int64)
    assert np.array_equal(y, _requant_out(acc + lq.bias, lq, out))


@pytest.mark.parametrize("dtype", [np.int8, np.int16])
@pytest.mark.parametrize("zp", [-128, 127])
def test_narrow_inputs_give_the_int64_results(dtype, zp: int, monkeypatch) -> None:
    """The probe's int8 cache and int16 conv outputs enter `run_op` as they are: a depthwise
    (blocked tap loop, stride 2, padded) and a pointwise conv on values at both range ends with
    zero points at both ends (X − zp = ±255 would wrap in int8) give the int64 input's integers,
    and a non-conv op other than add (mul) gets int64 inputs."""
    from mpq.quant.qmodel import QuantModel

    rng = np.random.default_rng(zp & 0xFF)
    for cin, cout, k, stride, groups in ((16, 16, 3, 2, 16), (16, 8, 1, 1, 1)):
        node = _conv_node(cin, cout, k, stride, k // 2, groups)
        x = rng.choice(np.array([-128, 127, 0, -1]), (2, 11, 11, cin))
        lq, out = _layer(rng, cout, rng.uniform(1e-4, 1e-2, cout), 8)
        lq.weight = rng.integers(-127, 128, (cout, k, k, cin // groups)).astype(np.int8)
        qm = QuantModel(None, {"x": ActQuant(0.1, zp, 8), "y": out}, {"c": lq})
        ho = (11 + 2 * (k // 2) - k) // stride + 1
        want = run_op(node, lq, qm, [x.astype(np.int64)], (2, ho, ho, cout))
        got = run_op(node, lq, qm, [x.astype(dtype)], (2, ho, ho, cout))
        assert got.dtype == np.int16 and np.array_equal(got, want)
    mul = Node("m", "mul", ["x", "x2"], ["y"], {})
    seen = []

    class Spy:
        @staticmethod
        def run(node, lq, qm, xs, out_shape):
            seen.extend(x.dtype for x in xs)
            return xs[0]

    from mpq import sim

    monkeypatch.setitem(sim.INT_OPS, "mul", Spy)
    run_op(mul, LayerQuant(), None, [np.zeros(3, dtype), np.zeros(3, np.int64)], (3,))
    assert seen == [np.int64, np.int64]


@pytest.mark.parametrize("bits1,bits2", [(8, 8), (4, 8), (8, 2), (2, 4)])
def test_add_table_gives_add_quantized(bits1: int, bits2: int) -> None:
    """`Add` from its table (`arith.add_table`) gives `add_quantized`'s integers on every
    input pair (zero points at the range ends, a clamp inside the range), narrow or int64;
    inputs outside their range or of different shapes take `add_quantized` itself."""
    from mpq.quant.qmodel import QuantModel
    from mpq.sim import ADD_TABLE_BITS

    assert bits1 + bits2 <= ADD_TABLE_BITS
    lo1, hi1 = arith.qrange(bits1)
    lo2, hi2 = arith.qrange(bits2)
    g1, g2 = np.meshgrid(np.arange(lo1, hi1 + 1), np.arange(lo2, hi2 + 1), indexing="ij")
    node = Node("a", "add", ["x1", "x2"], ["y"], {})
    for zp1, zp2, s1, s2, so in ((lo1, hi2, 0.05, 0.013, 0.04), (hi1, lo2, 0.002, 0.3, 0.31)):
        acts = {"x1": ActQuant(s1, zp1, bits1), "x2": ActQuant(s2, zp2, bits2),
                "y": ActQuant(so, -3, 8)}
        lq = LayerQuant(act_min=-100, act_max=120, extra=arith.add_params(s1, s2, so))
        qm = QuantModel(None, acts, {"a": lq})
        want = arith.add_quantized(g1, zp1, g2, zp2, lq.extra, -3, -100, 120)
        for dtype in (np.int8, np.int16, np.int64):
            got = run_op(node, lq, qm, [g1.astype(dtype), g2.astype(dtype)], g1.shape)
            assert np.array_equal(got, want)
        outside = g1.copy()
        outside[0, 0] = hi1 + 1
        got = run_op(node, lq, qm, [outside, g2], g1.shape)
        assert np.array_equal(got, arith.add_quantized(outside, zp1, g2, zp2, lq.extra, -3,
                                                       -100, 120))
        row = g2[:1]
        got = run_op(node, lq, qm, [g1, row], g1.shape)
        assert np.array_equal(got, arith.add_quantized(g1, zp1, row, zp2, lq.extra, -3,
                                                       -100, 120))


@pytest.fixture(scope="module")
def small_probe_inputs(tmp_path_factory):
    return fragile_probe_inputs(tmp_path_factory.mktemp("speed"))


def test_prefetch_gives_the_one_at_a_time_damages_and_runs(small_probe_inputs,
                                                            monkeypatch) -> None:
    """Variants measured side by side (threads) give the damages and the run count of the
    same variants measured one at a time; a prefetched variant nobody asks for is not
    counted."""
    graph, x, range_of = small_probe_inputs
    weights = [n.name for n in graph.nodes if n.weight is not None]
    variants = [({"fragile": 2}, {}), ({"robust": 4}, {}), ({}, {weights[0]: 4}),
                ({}, {weights[-1]: 2}), ({"fragile": 8}, {})]
    one = Probe(graph, x, range_of, {})
    expected = [one.damage_of(a, w) for a, w in variants]
    monkeypatch.setattr(sensitivity, "MEASURE_WORKERS", 2)
    both = Probe(graph, x, range_of, {})
    both.prefetch(variants + [({"robust": 2}, {})])
    assert both.runs == 0
    assert [both.damage_of(a, w) for a, w in variants] == expected
    assert both.runs == one.runs == 4


def test_fidelity_reuses_the_reference_run_only_for_the_same_model(small_probe_inputs) -> None:
    """`Probe.cached_outputs` returns the reference's outputs for its own model and inputs,
    and None for another model or other inputs."""
    from mpq.interpreter import to_ir_layout
    from mpq.quant.qmodel import quantize_graph
    from mpq.sim import quantize_input, run_int

    graph, x, range_of = small_probe_inputs
    probe = Probe(graph, x, range_of, {})
    int8 = quantize_graph(graph, {t: range_of(t, 8) for t in graph.tensors})
    name = graph.inputs[0]
    xq = quantize_input(int8.acts[name], to_ir_layout(graph, name, x))
    cached = probe.cached_outputs(int8, xq)
    assert cached is not None
    run = run_int(int8, {name: xq})
    assert all(np.array_equal(cached[o], run[o]) for o in graph.outputs)
    assert probe.cached_outputs(int8, xq[:-1]) is None
    other = quantize_graph(graph, {t: range_of(t, 8) for t in graph.tensors},
                           weight_bits={graph.nodes[0].name: 4})
    assert probe.cached_outputs(other, xq) is None


def _descent_as_written(v, free, forced, floor, s, cqq, target, e_near, iters):
    """AdaRound's Adam steps as plain array expressions (the form `adaround_descent` was
    written in before its buffers): the reference its numbers must equal bit for bit."""
    from mpq.quant.ptq import (
        ADAROUND_BETA,
        ADAROUND_LAMBDA,
        ADAROUND_LR,
        ADAROUND_WARMUP,
        GAMMA,
        ZETA,
    )

    m1, m2 = np.zeros_like(v), np.zeros_like(v)
    count = max(int(free.sum()), 1)
    warm = int(iters * ADAROUND_WARMUP)
    for it in range(iters):
        sig = 1.0 / (1.0 + np.exp(-v))
        raw = sig * (ZETA - GAMMA) + GAMMA
        h = np.clip(raw, 0.0, 1.0)
        up = np.where(free, h, forced)
        wt = s * (floor + up)
        a = wt @ cqq
        grad_w = 2.0 * (a - target) / e_near
        dh = (ZETA - GAMMA) * sig * (1.0 - sig) * ((raw > 0) & (raw < 1))
        grad = grad_w * s * dh
        if it >= warm:
            beta = ADAROUND_BETA[0] + (ADAROUND_BETA[1] - ADAROUND_BETA[0]) \
                * (it - warm) / max(iters - warm - 1, 1)
            u = 2.0 * h - 1.0
            dreg = -beta * np.abs(u) ** (beta - 1.0) * np.sign(u) * 2.0
            grad = grad + ADAROUND_LAMBDA / count * dreg * dh
        grad = np.where(free, grad, 0.0)
        m1 = 0.9 * m1 + 0.1 * grad
        m2 = 0.999 * m2 + 0.001 * grad * grad
        step = ADAROUND_LR * (m1 / (1 - 0.9 ** (it + 1))) \
            / (np.sqrt(m2 / (1 - 0.999 ** (it + 1))) + 1e-8)
        v = v - step
    return v


@pytest.mark.parametrize("case", ["all_free", "clamped", "grouped"])
def test_adaround_descent_equals_the_plain_expressions(case: str) -> None:
    """`ptq.adaround_descent` (buffers reused, |u|^(β−1) only where 0 < r < 1) ends at the
    very V of the plain expressions, bit for bit, through the warm-up and the annealed
    regulariser: with every weight free, with weights clamped at the grid's ends (fixed,
    some forced up), and with several groups."""
    from mpq.quant.ptq import adaround_descent

    rng = np.random.default_rng({"all_free": 0, "clamped": 1, "grouped": 2}[case])
    groups, cout, d = (3, 4, 9) if case == "grouped" else (1, 12, 20)
    floor = rng.integers(-7, 7, (groups, cout, d)).astype(np.float64)
    if case == "clamped":
        floor[0, :3] = 7.0  # at the top level: fixed
        floor[0, 3:5] = -9.0  # below the bottom: forced up
    free = (floor < 7) & (floor >= -7)
    forced = (floor < -7).astype(np.float64)
    s = rng.uniform(0.01, 0.1, (groups, cout, 1))
    x = rng.normal(size=(groups, 64, d))
    cqq = x.transpose(0, 2, 1) @ x / 64
    target = (s * (floor + rng.random(floor.shape))) @ cqq
    v = rng.normal(scale=2.0, size=floor.shape)
    args = (free, forced, floor, s, cqq, target, 3.7)
    got = adaround_descent(v, *args, iters=60)
    want = _descent_as_written(v, *args, iters=60)
    assert np.array_equal(got, want)
    assert not np.array_equal(got, v)  # the steps moved V
    if case == "clamped":
        assert np.array_equal(got[~free], v[~free])  # fixed weights keep their V


@pytest.mark.parametrize("stride,dilation", [(1, 1), (2, 1), (1, 2)])
def test_blocked_depthwise_is_the_tap_by_tap_sum_bit_for_bit(stride: int, dilation: int,
                                                             monkeypatch) -> None:
    """`interpreter.depthwise_taps` (per sample, in cache-sized row blocks) gives the float
    interpreter's whole-map tap loop bit for bit in float32 (zero start: the same additions in
    the same order, signed zeros included), with blocks of a few rows and a ragged last one."""
    from mpq import interpreter

    monkeypatch.setattr(interpreter, "DEPTHWISE_BLOCK", 3 * 13 * 24)  # 3 rows a block
    rng = np.random.default_rng(stride * 10 + dilation)
    x = rng.standard_normal((3, 27, 27, 24)).astype(np.float32)
    x[0, :4] = -0.0
    w = rng.standard_normal((24, 3, 3, 1)).astype(np.float32)
    w[:, 0, 0, 0] = 0.0
    span = dilation * 2 + 1
    ho = (27 - span) // stride + 1
    want = np.zeros((3, ho, ho, 24), np.float32)
    for ky in range(3):
        for kx in range(3):
            tap = x[:, ky * dilation: ky * dilation + stride * (ho - 1) + 1: stride,
                    kx * dilation: kx * dilation + stride * (ho - 1) + 1: stride, :]
            want += tap * w[:, ky, kx, 0]
    got = interpreter.depthwise_taps(x, w, (stride, stride), (dilation, dilation), (ho, ho))
    assert got.tobytes() == want.tobytes()
