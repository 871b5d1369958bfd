"""Randomised single-op oracle for MUL, SUB and PRELU: `mpq.sim` against TFLM, byte for byte.

The same method as `test_tflm_single_op.py` (whose helpers it reuses): a one-operator int8
`.tflite` per case, imported with `import_tflite_bytes`, run through `mpq.sim.run_int` with the
file's own parameters and through TFLM's Python interpreter (reference kernels) on the same
inputs. MUL and SUB cases broadcast in about half the cases (squeeze-excite's
[1,H,W,C] × [1,1,1,C], either operand, or other dims of 1); PRELU slopes are per channel or one
for all, int8 with any zero point. Scales are drawn so outputs mostly land inside the int8 range
(checked: `MIN_INTERIOR`), sometimes freely so multipliers exceed 1.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

pytest.importorskip("tflite_micro")

import tflite_builders as tb  # noqa: E402
from test_tflm_single_op import (  # noqa: E402
    INT8_STD,
    MIN_INTERIOR,
    Case,
    log_uniform,
    mpq_quant_model,
    near,
    pair,
    rand_act,
    rand_inputs,
    rand_q,
    tflm_outputs,
)

from mpq.sim import run_int  # noqa: E402

CASES = 120  # per operator


# -- builders ------------------------------------------------------------------------------------

def binary(code: int, a_shape: tuple[int, ...], b_shape: tuple[int, ...], a_q: tb.QParams,
           b_q: tb.QParams, y_q: tb.QParams, activation: str) -> bytes:
    """MUL or SUB of two int8 graph inputs (broadcasting allowed) with a fused activation."""
    y_shape = tuple(max(a, b) for a, b in zip(a_shape, b_shape, strict=True))
    w = tb.TfliteWriter()
    a = w.activation("a", a_shape, a_q)
    b = w.activation("b", b_shape, b_q)
    y = w.activation("y", y_shape, y_q)
    if code == tb.OP.MUL:
        o, kind = tb.FB.MulOptionsT(), tb.OPT.MulOptions
    else:
        o, kind = tb.FB.SubOptionsT(), tb.OPT.SubOptions
    o.fusedActivationFunction = tb.ACTIVATIONS[activation]
    w.op(code, [a, b], [y], kind, o)
    return w.finish([a, b], [y])


def binary_const(code: int, x_shape: tuple[int, ...], c: np.ndarray, x_q: tb.QParams,
                 c_q: tb.QParams, y_q: tb.QParams, activation: str, const_first: bool) -> bytes:
    """MUL or SUB of an int8 graph input and a constant int8 tensor (either order)."""
    w = tb.TfliteWriter()
    x = w.activation("x", x_shape, x_q)
    k = w.tensor("k", c.shape, tb.T_INT8, [c_q.scale], [c_q.zero_point], 0,
                 np.asarray(c, np.int8))
    y = w.activation("y", x_shape, y_q)
    if code == tb.OP.MUL:
        o, kind = tb.FB.MulOptionsT(), tb.OPT.MulOptions
    else:
        o, kind = tb.FB.SubOptionsT(), tb.OPT.SubOptions
    o.fusedActivationFunction = tb.ACTIVATIONS[activation]
    w.op(code, [k, x] if const_first else [x, k], [y], kind, o)
    return w.finish([x], [y])


def prelu(x_shape: tuple[int, ...], x_q: tb.QParams, alpha: np.ndarray, alpha_q: tb.QParams,
          y_q: tb.QParams) -> bytes:
    """PRELU of an int8 graph input with a constant int8 slope tensor."""
    w = tb.TfliteWriter()
    x = w.activation("x", x_shape, x_q)
    a = w.tensor("alpha", alpha.shape, tb.T_INT8, [alpha_q.scale], [alpha_q.zero_point], 0,
                 np.asarray(alpha, np.int8))
    y = w.activation("y", x_shape, y_q)
    w.op(tb.OP.PRELU, [x, a], [y])
    return w.finish([x], [y])


# -- random cases --------------------------------------------------------------------------------

def _shapes(rng: np.random.Generator) -> tuple[tuple[int, ...], tuple[int, ...]]:
    if rng.random() < 0.25:
        n = int(rng.integers(1, 33))
        return (1, n), (1, n)
    h, w = pair(rng, 1, 6)
    c = int(rng.integers(1, 9))
    full = (1, h, w, c)
    kind = rng.random()
    if kind < 0.45:
        return full, full
    small = (1, 1, 1, c) if kind < 0.8 else (1, h if rng.random() < 0.5 else 1,
                                             w if rng.random() < 0.5 else 1,
                                             c if rng.random() < 0.5 else 1)
    return (full, small) if rng.random() < 0.6 else (small, full)


def make_mul(rng: np.random.Generator) -> Case:
    sa, sb = _shapes(rng)
    a_q, b_q = rand_q(rng), rand_q(rng)
    if rng.random() < 0.8:  # an output range that fits the product
        y_q = tb.QParams(float(np.clip(a_q.scale * b_q.scale * INT8_STD
                                       * 10 ** rng.uniform(-0.7, 0.7), 1e-6, 10.0)),
                         int(rng.integers(-128, 128)))
    else:
        y_q = rand_q(rng)
    act = rand_act(rng)
    data = binary(tb.OP.MUL, sa, sb, a_q, b_q, y_q, act)
    return Case(data, [sa, sb], dict(a=sa, b=sb, a_q=a_q, b_q=b_q, y_q=y_q, activation=act))


def make_sub(rng: np.random.Generator) -> Case:
    sa, sb = _shapes(rng)
    a_q = rand_q(rng)
    b_q = a_q if rng.random() < 0.1 else tb.QParams(near(rng, a_q.scale, 1.5),
                                                    int(rng.integers(-128, 128)))
    if rng.random() < 0.8:
        y_q = tb.QParams(near(rng, 2 * max(a_q.scale, b_q.scale), 0.7),
                         int(rng.integers(-128, 128)))
    else:
        y_q = rand_q(rng)
    act = rand_act(rng)
    data = binary(tb.OP.SUB, sa, sb, a_q, b_q, y_q, act)
    return Case(data, [sa, sb], dict(a=sa, b=sb, a_q=a_q, b_q=b_q, y_q=y_q, activation=act))


def make_prelu(rng: np.random.Generator) -> Case:
    if rng.random() < 0.25:
        shape: tuple[int, ...] = (1, int(rng.integers(1, 33)))
    else:
        shape = (1, *pair(rng, 1, 6), int(rng.integers(1, 9)))
    c = shape[-1]
    alpha_shape = (1,) if rng.random() < 0.3 else ((c,) if rng.random() < 0.5
                                                   else (1,) * (len(shape) - 2) + (1, c))
    alpha = rng.integers(-128, 128, alpha_shape).astype(np.int8)
    alpha_q = tb.QParams(log_uniform(rng, 1e-3, 0.05), int(rng.integers(-128, 128)))
    x_q = rand_q(rng)
    y_q = tb.QParams(near(rng, x_q.scale, 0.5), int(rng.integers(-128, 128))) \
        if rng.random() < 0.85 else rand_q(rng)
    data = prelu(shape, x_q, alpha, alpha_q, y_q)
    return Case(data, [shape], dict(shape=shape, alpha=alpha.tolist(), alpha_q=alpha_q,
                                    x_q=x_q, y_q=y_q))


def _make_const(rng: np.random.Generator, code: int) -> Case:
    sa, sb = _shapes(rng)
    full = tuple(max(a, b) for a, b in zip(sa, sb, strict=True))
    c_shape = min(sa, sb, key=lambda s: int(np.prod(s))) if rng.random() < 0.7 else full
    if rng.random() < 0.3 and len(c_shape) == 4:  # a lower-rank constant: [C] or [W, C]
        c_shape = c_shape[-1 - int(rng.integers(0, 2)):]
    c = rng.integers(-128, 128, c_shape).astype(np.int8)
    x_q, c_q = rand_q(rng), rand_q(rng)
    if code == tb.OP.MUL:
        y_q = tb.QParams(float(np.clip(x_q.scale * c_q.scale * INT8_STD
                                       * 10 ** rng.uniform(-0.7, 0.7), 1e-6, 10.0)),
                         int(rng.integers(-128, 128)))
    else:
        c_q = tb.QParams(near(rng, x_q.scale, 1.5), c_q.zero_point)
        y_q = tb.QParams(near(rng, 2 * max(x_q.scale, c_q.scale), 0.7),
                         int(rng.integers(-128, 128)))
    act, first = rand_act(rng), bool(rng.random() < 0.4)
    data = binary_const(code, full, c, x_q, c_q, y_q, act, first)
    return Case(data, [full], dict(x=full, const=c_shape, const_first=first, x_q=x_q, c_q=c_q,
                                   y_q=y_q, activation=act))


def make_mul_const(rng: np.random.Generator) -> Case:
    return _make_const(rng, tb.OP.MUL)


def make_sub_const(rng: np.random.Generator) -> Case:
    return _make_const(rng, tb.OP.SUB)


MAKERS = {"MUL": make_mul, "SUB": make_sub, "PRELU": make_prelu, "MUL_CONST": make_mul_const,
          "SUB_CONST": make_sub_const}
SEEDS = {"MUL": 2000, "SUB": 2001, "PRELU": 2002, "MUL_CONST": 2003, "SUB_CONST": 2004}


def check(op: str, index: int) -> tuple[str | None, int, int, bool]:
    """(failure or None, outputs, interior outputs, broadcast) of case `index` of `op`."""
    rng = np.random.default_rng([SEEDS[op], index])
    case = MAKERS[op](rng)
    feeds = [rand_inputs(rng, s) for s in case.input_shapes]
    theirs = tflm_outputs(case.data, feeds)
    qm = mpq_quant_model(case.data, f"{op.lower()}_{index}.tflite")
    g = qm.graph
    ours = run_int(qm, {n: x.astype(np.int64) for n, x in zip(g.inputs, feeds, strict=True)})
    ours = ours[g.outputs[0]]
    lq = qm.layers[g.nodes[-1].name]
    interior = int(((theirs > lq.act_min) & (theirs < lq.act_max)).sum())
    broadcast = len({tuple(s) for s in case.input_shapes}) > 1
    if ours.shape != theirs.shape or (ours != theirs).any():
        bad = np.argwhere(ours != theirs)[:4].tolist() if ours.shape == theirs.shape else []
        return (f"{op} case {index}: differs at {bad} ({case.params}; {lq.extra})",
                ours.size, interior, broadcast)
    return None, ours.size, interior, broadcast


@pytest.mark.parametrize("op", list(MAKERS))
def test_binary_op_byte_identical_to_tflm(op: str) -> None:
    results = [check(op, i) for i in range(CASES)]
    failures = [r[0] for r in results if r[0]]
    assert not failures, f"{len(failures)} of {CASES} {op} cases fail:\n" + "\n".join(
        failures[:8])
    total, interior = sum(r[1] for r in results), sum(r[2] for r in results)
    assert interior >= MIN_INTERIOR * total, f"{op}: the cases mostly saturate"
    if op in ("MUL", "SUB"):
        assert sum(r[3] for r in results) >= CASES // 4, "too few broadcasting cases"


def test_prelu_scalar_and_channel_slopes_import_as_per_channel() -> None:
    x_q = tb.QParams(0.05, 3)
    data = prelu((1, 2, 2, 3), x_q, np.array([5], np.int8), tb.QParams(0.01, -2), x_q)
    node = mpq_quant_model(data, "p.tflite").graph.nodes[0]
    assert node.attrs["alpha_q"] == (5, 5, 5)
    assert math.isclose(node.attrs["alpha"][0], 0.07, rel_tol=1e-6)


def test_sub_constants_as_tflm_computes_them() -> None:
    """Scales where float32 and double ratios give different SUB constants: every (a, b) pair
    of int8 values must match TFLM (its build divides in double; `arith.sub_params`)."""
    from tflite_micro.python.tflite_micro import runtime

    from mpq.quant import arith

    a_q, b_q, y_q = tb.QParams(0.02355359122157097, -105), \
        tb.QParams(0.20332962274551392, 53), tb.QParams(0.621602475643158, -84)
    a = np.tile(np.arange(-128, 128), 256).astype(np.int8)[None]
    b = np.repeat(np.arange(-128, 128), 256).astype(np.int8)[None]
    interp = runtime.Interpreter.from_bytes(
        binary(tb.OP.SUB, a.shape, b.shape, a_q, b_q, y_q, "NONE"), arena_size=1 << 20)
    interp.set_input(a, 0)
    interp.set_input(b, 1)
    interp.invoke()
    theirs = np.array(interp.get_output(0)).astype(np.int64)
    p = arith.sub_params(a_q.scale, b_q.scale, y_q.scale)
    ours = arith.sub_quantized(a, a_q.zero_point, b, b_q.zero_point, p, y_q.zero_point, -128,
                               127)
    assert (ours == theirs).all()


def test_float_model_imports_and_matches_tflm() -> None:
    """A float `.tflite` chaining MUL (broadcast [1,H,W,C] × [1,1,1,C]), SUB and PRELU (float
    slopes [1,1,C]): mpq's float interpreter on the import equals TFLM's float kernels."""
    from tflite_micro.python.tflite_micro import runtime

    from mpq.frontend.tflite_import import import_tflite_bytes
    from mpq.interpreter import run_graph

    f32 = tb.FB.TensorType.FLOAT32
    rng = np.random.default_rng(0)
    w = tb.TfliteWriter()
    x = w.tensor("x", (1, 3, 4, 5), f32)
    s = w.tensor("s", (1, 1, 1, 5), f32)
    m = w.tensor("m", (1, 3, 4, 5), f32)
    d = w.tensor("d", (1, 3, 4, 5), f32)
    alpha = w.tensor("alpha", (1, 1, 5), f32, data=rng.uniform(-1, 1, (1, 1, 5)).astype(
        np.float32))
    y = w.tensor("y", (1, 3, 4, 5), f32)
    w.op(tb.OP.MUL, [x, s], [m], tb.OPT.MulOptions, tb.FB.MulOptionsT())
    w.op(tb.OP.SUB, [m, x], [d], tb.OPT.SubOptions, tb.FB.SubOptionsT())
    w.op(tb.OP.PRELU, [d, alpha], [y])
    data = w.finish([x, s], [y])
    xv = rng.normal(0, 1, (1, 3, 4, 5)).astype(np.float32)
    sv = rng.normal(0, 1, (1, 1, 1, 5)).astype(np.float32)
    interp = runtime.Interpreter.from_bytes(data)
    interp.set_input(xv, 0)
    interp.set_input(sv, 1)
    interp.invoke()
    theirs = np.array(interp.get_output(0))
    tm = import_tflite_bytes(data, "f.tflite")
    assert tm.quant is None and [n.op for n in tm.graph.nodes] == ["mul", "sub", "prelu"]
    ours = run_graph(tm.graph, dict(zip(tm.graph.inputs, (xv, sv), strict=True)))
    np.testing.assert_allclose(ours[tm.graph.outputs[0]], theirs, rtol=1e-6, atol=1e-6)
