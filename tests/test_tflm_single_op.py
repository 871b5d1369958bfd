"""Randomised single-op oracle: `mpq.sim` against TensorFlow Lite Micro itself, byte for byte.

For every int8 operator mpq imports, `CASES` random cases (fixed seeds): a one-operator
`.tflite` is built in memory (`tflite_builders`), imported with `import_tflite_bytes`, turned
into a `QuantModel` with the file's own parameters (`quant_model_from_parameters`, as in
`test_tflm_oracle.py`) and run through `mpq.sim.run_int`; TFLM's Python interpreter (PyPI
`tflite-micro`, reference kernels) runs the same bytes on the same int8 inputs. Every output
byte must agree.

The cases randomise shapes, kernel sizes, strides, dilations, groups, depth multipliers,
SAME/VALID padding, scales (log-uniform 1e-3..1), zero points, weights, biases (or none) and
fused activations (NONE/RELU/RELU6). Weight scales are mostly chosen so that outputs spread over
the int8 range rather than saturate (checked: `MIN_INTERIOR`), sometimes drawn freely so the
requantisation multiplier exceeds 1 (a positive shift). Inputs per case (`SAMPLES`): uniform
int8, the extremes −128/127, and a narrow band. A failure counts the mismatching cases and
shows the first ten with their parameters, the derived integer constants and the first
differing bytes; `check_case(op, i)` rebuilds case `i` alone for debugging.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytest

pytest.importorskip("tflite_micro")

import tflite_builders as tb  # noqa: E402
from tflite_micro.python.tflite_micro import runtime  # noqa: E402

from mpq.errors import MpqError  # noqa: E402
from mpq.frontend.tflite_import import import_tflite_bytes  # noqa: E402
from mpq.ir import slice_window  # noqa: E402
from mpq.quant.qmodel import ActQuant, QuantModel, quant_model_from_parameters  # noqa: E402
from mpq.sim import run_int  # noqa: E402

CASES = 400  # per operator
SAMPLES = 6  # int8 inputs per case (one TFLM invoke each)
MIN_INTERIOR = 0.25  # share of output bytes strictly inside the clamp range, per operator
ACTS = ("NONE", "RELU", "RELU6")
INT8_STD = 73.6  # standard deviation of uniform int8 values


@dataclass
class Case:
    """One random single-op model: its bytes, its input shapes and a readable description."""

    data: bytes
    input_shapes: list[tuple[int, ...]]
    params: dict[str, Any] = field(default_factory=dict)


@dataclass
class Outcome:
    """What one case produced: a failure description (or None) and output statistics."""

    failure: str | None
    outputs: int = 0
    interior: int = 0
    positive_shift: bool = False


# -- random parameters ---------------------------------------------------------------------------

def log_uniform(rng: np.random.Generator, lo: float = 1e-3, hi: float = 1.0) -> float:
    return float(10 ** rng.uniform(math.log10(lo), math.log10(hi)))


def rand_q(rng: np.random.Generator) -> tb.QParams:
    """int8 activation quantisation: scale log-uniform in [1e-3, 1], any zero point."""
    return tb.QParams(log_uniform(rng), int(rng.integers(-128, 128)))


def near(rng: np.random.Generator, scale: float, spread: float) -> float:
    """A scale within 10^±spread of `scale`, kept inside [1e-3, 1]."""
    return float(np.clip(scale * 10 ** rng.uniform(-spread, spread), 1e-3, 1.0))


def rand_act(rng: np.random.Generator) -> str:
    return str(rng.choice(ACTS))


def rand_padding(rng: np.random.Generator) -> str:
    return str(rng.choice(["SAME", "VALID"]))


def pair(rng: np.random.Generator, lo: int, hi: int) -> tuple[int, int]:
    """Two integers in [lo, hi]."""
    a, b = rng.integers(lo, hi + 1, 2)
    return int(a), int(b)


def rand_weights(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """Symmetric int8 weights: mostly uniform in [−127, 127], sometimes small or extreme."""
    kind = rng.random()
    if kind < 0.7:
        return rng.integers(-127, 128, shape).astype(np.int8)
    if kind < 0.85:
        return rng.integers(-3, 4, shape).astype(np.int8)
    return rng.choice(np.array([-127, 0, 127], np.int8), shape)


def weight_scales(rng: np.random.Generator, x_q: tb.QParams, y_q: tb.QParams, taps: int,
                  n: int) -> np.ndarray:
    """Weight scales: mostly so the output spreads over int8 (output std ≈ 2..200 LSB),
    sometimes log-uniform in [1e-3, 1] whatever the multiplier becomes (often > 1)."""
    if rng.random() < 0.15:
        return (10 ** rng.uniform(-3, 0, n)).astype(np.float32)
    acc_std = INT8_STD * INT8_STD * math.sqrt(taps)
    target = 10 ** rng.uniform(math.log10(2), math.log10(200), n) / acc_std
    return (target * y_q.scale / x_q.scale).astype(np.float32)


def rand_bias(rng: np.random.Generator, taps: int, n: int) -> np.ndarray | None:
    """int32 bias of the accumulator's magnitude; none (no bias input) or large sometimes."""
    kind = rng.random()
    if kind < 0.15:
        return None
    bound = int(2 * INT8_STD * INT8_STD * math.sqrt(taps)) + 1
    if kind < 0.25:
        bound = 1 << 22
    return rng.integers(-bound, bound + 1, n).astype(np.int32)


def rand_inputs(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """`SAMPLES` int8 samples `[SAMPLES, *shape[1:]]`: uniform, then extremes (−128/127),
    then a narrow band around a random value."""
    dims = shape[1:]
    centre = int(rng.integers(-128, 128))
    samples = [rng.integers(-128, 128, dims) for _ in range(SAMPLES - 2)]
    samples += [rng.choice(np.array([-128, 127]), dims),
                np.clip(rng.integers(centre - 6, centre + 7, dims), -128, 127)]
    return np.stack(samples).astype(np.int8)


# -- one maker per operator ----------------------------------------------------------------------

def make_conv(rng: np.random.Generator) -> Case:
    groups = 1 if rng.random() < 0.75 else int(rng.integers(2, 4))
    cin_g = int(rng.integers(1, 5))
    cin = groups * cin_g
    cout = groups * int(rng.integers(1, 4)) if groups > 1 else int(rng.integers(1, 7))
    kernel = pair(rng, 1, 4)
    stride = pair(rng, 1, 3)
    dilation = (1, 1) if rng.random() < 0.6 else pair(rng, 1, 3)
    padding = rand_padding(rng)
    eff = [(k - 1) * d + 1 for k, d in zip(kernel, dilation, strict=True)]
    lo = eff if padding == "VALID" else [1, 1]
    h, w = (int(rng.integers(m, m + 7)) for m in lo)
    x_q, y_q = rand_q(rng), rand_q(rng)
    taps = kernel[0] * kernel[1] * cin_g
    weight = rand_weights(rng, (cout, *kernel, cin_g))
    scales = weight_scales(rng, x_q, y_q, taps, cout)
    bias = rand_bias(rng, taps, cout)
    act = rand_act(rng)
    data = tb.conv_2d((1, h, w, cin), x_q, weight, scales, bias, y_q, padding=padding,
                      stride=stride, dilation=dilation, activation=act)
    return Case(data, [(1, h, w, cin)], dict(
        x_shape=(1, h, w, cin), weight_shape=weight.shape, groups=groups, padding=padding,
        stride=stride, dilation=dilation, activation=act, x_q=x_q, y_q=y_q,
        weight_scale=scales.tolist(), bias=None if bias is None else bias.tolist()))


def make_depthwise(rng: np.random.Generator) -> Case:
    cin = int(rng.integers(1, 7))
    mult = int(rng.integers(1, 3))
    cout = cin * mult
    kernel = pair(rng, 1, 4)
    stride = pair(rng, 1, 3)
    dilation = (1, 1) if rng.random() < 0.6 else pair(rng, 1, 3)
    padding = rand_padding(rng)
    eff = [(k - 1) * d + 1 for k, d in zip(kernel, dilation, strict=True)]
    lo = eff if padding == "VALID" else [1, 1]
    h, w = (int(rng.integers(m, m + 7)) for m in lo)
    x_q, y_q = rand_q(rng), rand_q(rng)
    taps = kernel[0] * kernel[1]
    weight = rand_weights(rng, (1, *kernel, cout))
    scales = weight_scales(rng, x_q, y_q, taps, cout)
    bias = rand_bias(rng, taps, cout)
    act = rand_act(rng)
    data = tb.depthwise_conv_2d((1, h, w, cin), x_q, weight, scales, bias, y_q,
                                padding=padding, stride=stride, dilation=dilation,
                                activation=act)
    return Case(data, [(1, h, w, cin)], dict(
        x_shape=(1, h, w, cin), weight_shape=weight.shape, depth_multiplier=mult,
        padding=padding, stride=stride, dilation=dilation, activation=act, x_q=x_q, y_q=y_q,
        weight_scale=scales.tolist(), bias=None if bias is None else bias.tolist()))


def make_fully_connected(rng: np.random.Generator) -> Case:
    if rng.random() < 0.75:
        k = int(rng.integers(1, 65))
        x_shape: tuple[int, ...] = (1, k)
    else:  # a rank-4 input, flattened by TFLM (and by a flatten node in mpq)
        x_shape = (1, *(int(v) for v in rng.integers(1, 5, 3)))
        k = math.prod(x_shape)
    cout = int(rng.integers(1, 17))
    x_q, y_q = rand_q(rng), rand_q(rng)
    weight = rand_weights(rng, (cout, k))
    scale = float(weight_scales(rng, x_q, y_q, k, 1)[0])
    bias = rand_bias(rng, k, cout)
    act = rand_act(rng)
    data = tb.fully_connected(x_shape, x_q, weight, scale, bias, y_q, activation=act)
    return Case(data, [x_shape], dict(
        x_shape=x_shape, weight_shape=weight.shape, activation=act, x_q=x_q, y_q=y_q,
        weight_scale=scale, bias=None if bias is None else bias.tolist()))


def make_add(rng: np.random.Generator) -> Case:
    if rng.random() < 0.7:
        shape: tuple[int, ...] = (1, *pair(rng, 1, 6), int(rng.integers(1, 9)))
    else:
        shape = (1, int(rng.integers(1, 65)))
    a_q = rand_q(rng)
    kind = rng.random()
    if kind < 0.1:
        b_q = a_q
    elif kind < 0.7:
        b_q = tb.QParams(near(rng, a_q.scale, 1.5), int(rng.integers(-128, 128)))
    else:
        b_q = rand_q(rng)
    if rng.random() < 0.8:  # an output range that fits the sum
        y_q = tb.QParams(near(rng, 2 * max(a_q.scale, b_q.scale), 0.7),
                         int(rng.integers(-128, 128)))
    else:
        y_q = rand_q(rng)
    act = rand_act(rng)
    data = tb.add(shape, a_q, b_q, y_q, activation=act)
    return Case(data, [shape, shape], dict(shape=shape, a_q=a_q, b_q=b_q, y_q=y_q,
                                           activation=act))


def _make_pool(rng: np.random.Generator, kind: str) -> Case:
    kernel = pair(rng, 1, 4)
    stride = pair(rng, 1, 3)
    padding = rand_padding(rng)
    lo = kernel if padding == "VALID" else (1, 1)
    h, w = (int(rng.integers(m, m + 7)) for m in lo)
    c = int(rng.integers(1, 7))
    q = rand_q(rng)
    act = rand_act(rng)
    build = tb.average_pool_2d if kind == "avg" else tb.max_pool_2d
    data = build((1, h, w, c), q, kernel=kernel, stride=stride, padding=padding,
                 activation=act)
    return Case(data, [(1, h, w, c)], dict(x_shape=(1, h, w, c), kernel=kernel, stride=stride,
                                           padding=padding, activation=act, q=q))


def make_avg_pool(rng: np.random.Generator) -> Case:
    return _make_pool(rng, "avg")


def make_max_pool(rng: np.random.Generator) -> Case:
    return _make_pool(rng, "max")


def make_softmax(rng: np.random.Generator) -> Case:
    if rng.random() < 0.7:
        shape: tuple[int, ...] = (1, int(rng.integers(1, 41)))
    else:
        shape = (1, *pair(rng, 1, 4), int(rng.integers(1, 17)))
    x_q = rand_q(rng)
    return Case(tb.softmax(shape, x_q), [shape], dict(shape=shape, x_q=x_q))


def _factor(rng: np.random.Generator, n: int, parts: int) -> tuple[int, ...]:
    """`n` as a product of `parts` positive integers, in random order."""
    dims = [1] * parts
    for p in (2, 3, 5, 7):
        while n % p == 0:
            n //= p
            dims[int(rng.integers(parts))] *= p
    dims[int(rng.integers(parts))] *= n
    return tuple(dims)


def make_reshape(rng: np.random.Generator) -> Case:
    n = int(rng.integers(2, 97))
    x_shape = (1, *_factor(rng, n, int(rng.integers(1, 4))))
    new_shape = x_shape
    while new_shape == x_shape:
        new_shape = (1, *_factor(rng, n, int(rng.integers(1, 4))))
        if new_shape == x_shape and len(x_shape) == 2:
            new_shape = (1, 1, n)
    q = rand_q(rng)
    return Case(tb.reshape(x_shape, new_shape, q), [x_shape],
                dict(x_shape=x_shape, new_shape=new_shape, q=q))


def make_mean(rng: np.random.Generator) -> Case:
    """Global over H, W (squeeze-excite, classifier heads) most often; else channels, one
    spatial axis or all three; keep_dims either way; output scale near s_in or free."""
    h, w = pair(rng, 1, 9)
    c = int(rng.integers(1, 17))
    axes = [(1, 2), (2, 1), (1, 2), (3,), (-1,), (1,), (2,), (1, 2, 3)][int(rng.integers(8))]
    x_q = rand_q(rng)
    kind = rng.random()
    if kind < 0.2:
        y_q = x_q
    elif kind < 0.85:
        y_q = tb.QParams(near(rng, x_q.scale, 0.5), int(rng.integers(-128, 128)))
    else:
        y_q = rand_q(rng)
    keep = bool(rng.random() < 0.6)
    data = tb.mean((1, h, w, c), axes, x_q, y_q, keep_dims=keep)
    return Case(data, [(1, h, w, c)], dict(x_shape=(1, h, w, c), axes=axes, keep_dims=keep,
                                           x_q=x_q, y_q=y_q))


def make_resize_nearest(rng: np.random.Generator) -> Case:
    """×2 most often, else any output size (down- or upsampling); both flags."""
    h, w = pair(rng, 1, 7)
    c = int(rng.integers(1, 6))
    size = (2 * h, 2 * w) if rng.random() < 0.5 else pair(rng, 1, 15)
    align, hpc = [(False, False), (True, False), (False, True), (True, True)][
        int(rng.integers(4))]
    q = rand_q(rng)
    data = tb.resize_nearest_neighbor((1, h, w, c), size, q, align_corners=align,
                                      half_pixel_centers=hpc)
    return Case(data, [(1, h, w, c)], dict(x_shape=(1, h, w, c), size=size,
                                           align_corners=align, half_pixel_centers=hpc, q=q))


def make_resize_bilinear(rng: np.random.Generator) -> Case:
    """×2 most often, else any output size; no flag, align_corners or half-pixel centres."""
    h, w = pair(rng, 1, 7)
    c = int(rng.integers(1, 6))
    size = (2 * h, 2 * w) if rng.random() < 0.5 else pair(rng, 1, 15)
    align, hpc = [(False, False), (True, False), (False, True)][int(rng.integers(3))]
    q = rand_q(rng)
    data = tb.resize_bilinear((1, h, w, c), size, q, align_corners=align,
                              half_pixel_centers=hpc)
    return Case(data, [(1, h, w, c)], dict(x_shape=(1, h, w, c), size=size,
                                           align_corners=align, half_pixel_centers=hpc, q=q))


def _shape(rng: np.random.Generator) -> tuple[int, ...]:
    """A batch-1 activation shape of rank 2..4 with small dimensions."""
    return (1, *(int(d) for d in rng.integers(1, 7, int(rng.integers(1, 4)))))


def make_pad(rng: np.random.Generator) -> Case:
    """PAD/PADV2 of channels (TFLite's residual widening), of H/W, or of any axis but batch."""
    shape = _shape(rng) if rng.random() < 0.4 else (1, *pair(rng, 1, 6), int(rng.integers(1, 9)))
    kind = rng.choice(["channels", "spatial", "any"]) if len(shape) == 4 else "any"
    pads = [(0, 0)] * len(shape)
    for a in range(1, len(shape)):
        if kind == "any" or (kind == "channels") == (a == 3):
            pads[a] = (int(rng.integers(0, 4)), int(rng.integers(0, 4)))
    q = rand_q(rng)
    v2 = bool(rng.random() < 0.3)
    return Case(tb.pad(shape, pads, q, v2=v2), [shape], dict(shape=shape, pads=pads, q=q,
                                                             v2=v2))


def make_concatenation(rng: np.random.Generator) -> Case:
    """CONCATENATION along any axis of 2..3 inputs (TFLM's int8 kernel needs one shared
    quantisation); sometimes one input is a constant of zeros, sometimes of any values."""
    base = _shape(rng)
    axis = int(rng.integers(1, len(base)))
    shapes = []
    for _ in range(int(rng.integers(2, 4))):
        s = list(base)
        s[axis] = int(rng.integers(1, 6))
        shapes.append(tuple(s))
    zeros = (int(rng.integers(len(shapes))),) if rng.random() < 0.3 else ()
    consts = {}
    k = int(rng.integers(len(shapes)))
    if not zeros and rng.random() < 0.3:  # a constant of any int8 values
        consts[k] = rng.integers(-128, 128, shapes[k])
    q = rand_q(rng)
    return Case(tb.concatenation(shapes, axis, q, zeros, consts),
                [s for i, s in enumerate(shapes) if i not in zeros and i not in consts],
                dict(shapes=shapes, axis=axis, q=q, zeros=zeros, constant=list(consts)))


def make_slice(rng: np.random.Generator) -> Case:
    shape = _shape(rng)
    begin = [0] + [int(rng.integers(0, d)) for d in shape[1:]]
    size = [1] + [-1 if rng.random() < 0.2 else int(rng.integers(1, d - b + 1))
                  for d, b in zip(shape[1:], begin[1:], strict=True)]
    q = rand_q(rng)
    return Case(tb.slice_(shape, begin, size, q), [shape], dict(shape=shape, begin=begin,
                                                                size=size, q=q))


def make_strided_slice(rng: np.random.Generator) -> Case:
    """Positive strides, negative and out-of-range begin/end, begin/end masks, shrink axes."""
    shape = (1, *(int(d) for d in rng.integers(1, 9, int(rng.integers(1, 4)))))
    begin, end, strides, y_shape = [0], [1], [1], [1]
    bm = em = sm = 0
    for a, d in enumerate(shape[1:], start=1):
        b, e, st = int(rng.integers(-d, d)), int(rng.integers(-d, d + 3)), int(rng.integers(1, 4))
        if rng.random() < 0.2:
            bm |= 1 << a
        if rng.random() < 0.2:
            em |= 1 << a
        if rng.random() < 0.15 and a < len(shape) - 1:
            sm |= 1 << a
        bb = -(1 << 31) if bm >> a & 1 else b
        ee = (1 << 31) - 1 if em >> a & 1 else e
        first, count = slice_window(d, bb, ee, st)
        if sm >> a & 1:
            bm &= ~(1 << a)
            b = int(rng.integers(0, d))
        elif count == 0:  # keep the output non-empty
            b, e, bm, em = 0, d, bm & ~(1 << a), em & ~(1 << a)
            count = -(-d // st)
        begin.append(b)
        end.append(e)
        strides.append(st)
        if not sm >> a & 1:
            y_shape.append(count)
    q = rand_q(rng)
    return Case(tb.strided_slice(shape, begin, end, strides, tuple(y_shape), q, begin_mask=bm,
                                 end_mask=em, shrink_axis_mask=sm),
                [shape], dict(shape=shape, begin=begin, end=end, strides=strides, bm=bm, em=em,
                              sm=sm, q=q))


def _make_split(rng: np.random.Generator, v: bool) -> Case:
    shape = list(_shape(rng))
    axis = int(rng.integers(1, len(shape)))
    parts = int(rng.integers(1, 4))
    if v:
        sizes = [int(rng.integers(1, 5)) for _ in range(parts)]
    else:
        sizes = [int(rng.integers(1, 4))] * parts
    shape[axis] = sum(sizes)
    q = rand_q(rng)
    k = int(rng.integers(parts))
    return Case(tb.split(tuple(shape), axis, sizes, q, k, v=v), [tuple(shape)],
                dict(shape=shape, axis=axis, sizes=sizes, output=k, q=q))


def _unary_shape(rng: np.random.Generator) -> tuple[int, ...]:
    if rng.random() < 0.5:
        return (1, int(rng.integers(1, 65)))
    return (1, *pair(rng, 1, 5), int(rng.integers(1, 9)))


def _make_unary(rng: np.random.Generator, op: str) -> Case:
    """LOGISTIC/TANH (output fixed by TFLM) or HARD_SWISH/LEAKY_RELU (output calibrated-like:
    a scale near the input's, above s_in/128 as TFLM's HARD_SWISH requires). Input scales of
    the fixed-output ops mostly keep the inputs inside the curved part (few saturated bytes)."""
    shape = _unary_shape(rng)
    alpha = None
    if op in ("LOGISTIC", "TANH"):
        x_q = tb.QParams(log_uniform(rng, 1e-3, 0.2), int(rng.integers(-128, 128)))
        y_q = tb.QParams(1 / 256, -128) if op == "LOGISTIC" else tb.QParams(1 / 128, 0)
    else:
        x_q = rand_q(rng)
        y_q = tb.QParams(x_q.scale * 10 ** rng.uniform(-1.5, 0.3), int(rng.integers(-128, 128)))
        if op == "LEAKY_RELU":
            alpha = float(rng.choice([0.01, 0.1, 0.2, 0.3])) if rng.random() < 0.7 \
                else float(rng.uniform(-1.0, 2.0))
    return Case(tb.unary(op, shape, x_q, y_q, alpha), [shape],
                dict(shape=shape, x_q=x_q, y_q=y_q, alpha=alpha))


MAKERS: dict[str, Callable[[np.random.Generator], Case]] = {
    "CONV_2D": make_conv,
    "DEPTHWISE_CONV_2D": make_depthwise,
    "FULLY_CONNECTED": make_fully_connected,
    "ADD": make_add,
    "AVERAGE_POOL_2D": make_avg_pool,
    "MAX_POOL_2D": make_max_pool,
    "SOFTMAX": make_softmax,
    "RESHAPE": make_reshape,
    "MEAN": make_mean,
    "RESIZE_NEAREST_NEIGHBOR": make_resize_nearest,
    "RESIZE_BILINEAR": make_resize_bilinear,
    "PAD": make_pad,
    "CONCATENATION": make_concatenation,
    "SLICE": make_slice,
    "STRIDED_SLICE": make_strided_slice,
    "SPLIT": lambda rng: _make_split(rng, False),
    "SPLIT_V": lambda rng: _make_split(rng, True),
    "LOGISTIC": lambda rng: _make_unary(rng, "LOGISTIC"),
    "TANH": lambda rng: _make_unary(rng, "TANH"),
    "HARD_SWISH": lambda rng: _make_unary(rng, "HARD_SWISH"),
    "LEAKY_RELU": lambda rng: _make_unary(rng, "LEAKY_RELU"),
}
SEEDS = {op: 1000 + i for i, op in enumerate(MAKERS)}


# -- running both sides --------------------------------------------------------------------------

def mpq_quant_model(data: bytes, source: str) -> QuantModel:
    """Import the bytes and build the QuantModel from the file's own parameters."""
    tm = import_tflite_bytes(data, source)
    q = tm.quant
    assert q is not None, "an int8 model must import with its quantisation"
    acts = {name: ActQuant(float(t.scale), int(t.zero_point), 8)
            for name, t in q.activations.items()}
    weights = {name: (w.weight, w.scale, w.bias) for name, w in q.weights.items()}
    return quant_model_from_parameters(tm.graph, acts, weights)


def tflm_outputs(data: bytes, feeds: list[np.ndarray]) -> np.ndarray:
    """TFLM output 0 for each sample (one invoke per sample), stacked along axis 0."""
    interp = runtime.Interpreter.from_bytes(data)
    outs = []
    for k in range(len(feeds[0])):
        for i, x in enumerate(feeds):
            interp.set_input(np.ascontiguousarray(x[k:k + 1]), i)
        interp.invoke()
        outs.append(np.array(interp.get_output(0)))
    return np.concatenate(outs).astype(np.int64)


def _constants(qm: QuantModel) -> dict[str, Any]:
    """The derived integer constants of the model's one node (for failure messages)."""
    node = qm.graph.nodes[-1]
    lq = qm.layers[node.name]
    info: dict[str, Any] = {"node": node.op, "act_min": lq.act_min, "act_max": lq.act_max}
    if lq.multiplier is not None:
        info["multiplier"] = lq.multiplier.tolist()
        info["shift"] = None if lq.shift is None else lq.shift.tolist()
    if lq.extra:
        info.update(lq.extra)
    if "pads" in node.attrs:
        info["pads"] = node.attrs["pads"]
    return info


def _describe(op: str, index: int, case: Case, problem: str) -> str:
    params = ", ".join(f"{k}={v}" for k, v in case.params.items())
    return f"{op} case {index}: {problem}\n    {params}"


def check_case(op: str, index: int) -> Outcome:
    """Build, run and compare case `index` of `op`."""
    rng = np.random.default_rng([SEEDS[op], index])
    case = MAKERS[op](rng)
    feeds = [rand_inputs(rng, s) for s in case.input_shapes]
    theirs = tflm_outputs(case.data, feeds)
    try:
        qm = mpq_quant_model(case.data, f"{op.lower()}_{index}.tflite")
    except MpqError as exc:
        return Outcome(_describe(op, index, case, f"mpq rejects the model: {exc}"))
    g = qm.graph
    if len(g.inputs) != len(feeds):
        return Outcome(_describe(op, index, case, f"mpq sees inputs {g.inputs}"))
    ours = run_int(qm, {name: x.astype(np.int64) for name, x in
                        zip(g.inputs, feeds, strict=True)})[g.outputs[0]]
    consts = _constants(qm)
    lq = qm.layers[g.nodes[-1].name]
    positive = bool(lq.shift is not None and (np.asarray(lq.shift) > 0).any())
    interior = int(((theirs > lq.act_min) & (theirs < lq.act_max)).sum())
    if ours.shape != theirs.shape:
        return Outcome(_describe(op, index, case, f"output shape {ours.shape} vs TFLM "
                                 f"{theirs.shape}; {consts}"))
    diff = np.argwhere(ours != theirs)
    if len(diff):
        first = [(tuple(int(v) for v in d), int(ours[tuple(d)]), int(theirs[tuple(d)]))
                 for d in diff[:6]]
        problem = (f"{len(diff)} of {ours.size} bytes differ (index, mpq, TFLM): {first}; "
                   f"{consts}")
        return Outcome(_describe(op, index, case, problem), ours.size, interior, positive)
    return Outcome(None, ours.size, interior, positive)


@pytest.mark.parametrize("op", list(MAKERS))
def test_single_op_byte_identical_to_tflm(op: str) -> None:
    outcomes = [check_case(op, i) for i in range(CASES)]
    failures = [o.failure for o in outcomes if o.failure]
    assert not failures, (f"{len(failures)} of {CASES} {op} cases fail:\n"
                          + "\n".join(failures[:10]))
    total = sum(o.outputs for o in outcomes)
    interior = sum(o.interior for o in outcomes)
    assert interior >= MIN_INTERIOR * total, (
        f"{op}: only {interior} of {total} outputs lie inside the clamp range; the cases "
        "mostly saturate and test little")
    if op in ("CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED"):
        assert sum(o.positive_shift for o in outcomes) >= 5, "no multiplier above 1 was tried"
