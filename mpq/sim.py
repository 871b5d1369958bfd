"""The bit-exact integer reference (DESIGN §4.4): runs a `QuantModel` as the C kernels do.

One small class per op, like the float interpreter, over batches of integer activations
(values in each tensor's b-bit range): convolutions write int16 and read any integer type,
every other op gets int64 (`run_op`), and `run_int` returns int64. Convolutions go through a
float32 GEMM on zero-point-subtracted inputs when a bound proves it exact (`conv_float32`),
else float64, exact while |acc| < 2^53 — checked, not assumed. Everything after the
accumulator is `mpq.quant.arith`, the integer arithmetic of CMSIS-NN (`requantize_rows`: the
same integers, merged, in float64 or int64 steps). Packed buffers (DESIGN §4.2) enter and
leave through `run_packed`.
"""

from __future__ import annotations

import functools

import numpy as np

from mpq.errors import MpqError
from mpq.interpreter import (
    conv2d_nhwc,
    depthwise_taps,
    pad_nhwc,
    pool_windows,
    resize_nearest,
    slice_batch,
    with_constants,
)
from mpq.ir import Node
from mpq.quant import arith
from mpq.quant.qmodel import ActQuant, LayerQuant, QuantModel

EXACT_LIMIT = float(1 << 53)


class IntOp:
    """One IR op on integer batches: `run(node, lq, acts, xs, out_shape) -> output`."""

    @staticmethod
    def run(node: Node, lq: LayerQuant, qm: QuantModel, xs: list[np.ndarray],
            out_shape: tuple[int, ...]) -> np.ndarray:
        raise NotImplementedError


def _requant_out(acc: np.ndarray, lq: LayerQuant, out: ActQuant) -> np.ndarray:
    y = arith.requantize(acc, lq.multiplier, lq.shift) + out.zero_point
    return np.clip(y, lq.act_min, lq.act_max)


def _exact(acc: np.ndarray, node: Node) -> np.ndarray:
    if acc.size and float(np.abs(acc).max()) >= EXACT_LIMIT:
        raise MpqError(f"layer '{node.name}': accumulator exceeds 2^53; float64 GEMM not exact")
    return np.rint(acc).astype(np.int64)


class Conv2D(IntOp):
    """acc = bias[o] + Σ W[o,ky,kx,c]·(X[…] − zp_in); out-of-range taps add nothing."""

    @staticmethod
    def run(node, lq, qm, xs, out_shape):
        a = node.attrs
        src = qm.acts[node.inputs[0]]
        fast = conv_float32(node, lq, src.zero_point, xs[0], out_shape, src.bits)
        if fast is not None:
            return requantize_rows(fast, lq, qm.acts[node.outputs[0]])
        x = xs[0].astype(np.float64) - src.zero_point
        acc = conv2d_nhwc(pad_nhwc(x, a["pads"]), lq.weight.astype(np.float64), a["strides"],
                          a["dilations"], a["groups"], out_shape[1:3])
        return _requant_out(_exact(acc, node) + lq.bias, lq, qm.acts[node.outputs[0]])


#: float32 represents every integer of magnitude below 2^24 exactly.
FLOAT32_EXACT = float(1 << 24)
#: Elements requantised per chunk: the chunk's int64 temporaries stay in the L2 cache.
REQUANT_CHUNK = 1 << 16
#: Convolution outputs are held as int16 (every activation range mpq uses fits): a quarter of
#: int64's memory traffic for the next layer's reads. Other ops take int64 (`run_op`).
COMPACT = np.int16


def conv_float32(node: Node, lq: LayerQuant, zero_point: int, x: np.ndarray,
                 out_shape: tuple[int, ...], bits: int | None = None) -> np.ndarray | None:
    """The convolution's accumulators (bias excluded) in float32 when that is provably exact,
    else None (the caller runs float64).

    Every partial sum of output channel o — in any summation order, with or without FMA — is
    bounded by B_o = max|X − zp| · Σ_k |W[o,k]|; when max_o B_o < 2^24 every partial sum and
    product is an integer float32 holds exactly, so the float32 GEMM equals the integer one
    (half the memory traffic of float64, twice the SIMD width). Depthwise 3×3 on 8-bit data is
    always below (255·9·128 < 2^19); wide pointwise layers depend on their weights.

    `bits`: X's activation bits; every value then lies in their range (`arith.qrange`), which
    bounds max|X − zp| without reading X — read only when that bound is too loose."""
    if x.size == 0 or lq.weight is None or x.ndim != 4:
        return None
    w = lq.weight
    w_abs = int(np.abs(w.reshape(w.shape[0], -1).astype(np.int64)).sum(axis=1).max()) \
        if w.size else 0
    lo, hi = arith.qrange(bits) if bits is not None else (0, 0)
    if bits is None or max(abs(lo - zero_point), abs(hi - zero_point)) * w_abs >= FLOAT32_EXACT:
        lo, hi = int(x.min()), int(x.max())
    x_abs = max(abs(lo - zero_point), abs(hi - zero_point))
    # X itself in float32's exact range too, whichever loop numpy picks for X − zp below.
    if x_abs * w_abs >= FLOAT32_EXACT or max(x_abs, abs(lo), abs(hi)) >= FLOAT32_EXACT:
        return None
    a = node.attrs
    t, left, b, r = a["pads"]
    n, h, wd, c = x.shape
    xf = np.zeros((n, h + t + b, wd + left + r, c), np.float32) if any(a["pads"]) \
        else np.empty(x.shape, np.float32)
    # X − zp straight into the padded buffer (exact: |X − zp| < 2^24); padding stays 0. A
    # narrow X (int8 cache, int16 outputs) subtracts in float32: in its own type it could wrap.
    zp = zero_point if x.dtype == np.int64 else np.float32(zero_point)
    np.subtract(x, zp, out=xf[:, t:t + h, left:left + wd], casting="unsafe")
    wf = w.astype(np.float32)
    cout, kh, kw, cin_g = w.shape
    if cin_g == 1 and a["groups"] == c and cout == c and c > 1:
        return depthwise_taps(xf, wf, a["strides"], a["dilations"], out_shape[1:3],
                              zero_start=False)
    return conv2d_nhwc(xf, wf, a["strides"], a["dilations"], a["groups"], out_shape[1:3])


def requantize_rows(acc: np.ndarray, lq: LayerQuant, out: ActQuant) -> np.ndarray:
    """`_requant_out(acc + bias)` for float accumulators holding exact integers, computed in
    cache-sized chunks with in-place int64 steps.

    The same integers as `arith.requantize` then `+ zp`, with its two shifts merged: with
    R = (acc + bias)·M + 2^30 and e = −S ≥ 0, hi = ⌊R / 2^31⌋ and RoundingDivideByPOT gives
    ⌊(hi + h_e − [hi < 0 ∧ e > 0]) / 2^e⌋ (h_e = 2^(e−1), 0 for e = 0); as ⌊⌊a/m⌋ + k)/n⌋ =
    ⌊(a + k·m)/(m·n)⌋ for integer k, and hi < 0 ⟺ R < 0, the output is
    ⌊(R + 2^31·(h_e − [R < 0 ∧ e > 0] + zp·2^e)) / 2^(31+e)⌋ — one shift, exact in int64
    while |R| + the added terms stay below 2^63 (checked; else `_requant_out`). Layers with a
    left shift (S > 0) or an accumulator that could leave int32 take `_requant_out` too.

    The sign term [R < 0] is skipped when the clamp's lower end is at or above zp (a fused
    ReLU/ReLU6: most layers): for R < 0, (R + 2^31·h_e)/2^(31+e) < 1/2, so the output is at
    most zp with or without the term (which lowers it by at most 1), and the clamp makes both
    act_min. The chunks reuse two preallocated buffers (no fresh pages per chunk). The result
    is int16 (`COMPACT`) when the clamp range fits it; then the formula runs in float64
    (`_requant_float64`, sign term included) wherever a per-layer bound proves it exact."""
    cout = acc.shape[-1]
    bias = np.broadcast_to(np.asarray(lq.bias if lq.bias is not None else 0, np.int64), (cout,))
    shift = np.broadcast_to(np.asarray(lq.shift, np.int64), (cout,))
    mult = np.broadcast_to(np.asarray(lq.multiplier, np.int64), (cout,))
    right = -shift
    acc_max = int(FLOAT32_EXACT) + int(np.abs(bias).max(initial=0))
    fits = (shift <= 0).all() and acc_max <= arith.INT32_MAX and right.max(initial=0) <= 31
    if fits:
        zp = int(out.zero_point)
        worst = acc_max * int(np.abs(mult).max(initial=0)) + (1 << 30) + (1 << 31) \
            + (1 << 30 + int(right.max(initial=0))) + abs(zp) * (1 << 31 + int(right.max()))
        fits = worst < (1 << 62)
    if not fits:
        return _requant_out(np.rint(acc).astype(np.int64) + bias, lq, out)
    half = np.where(right > 0, np.left_shift(np.int64(1), np.maximum(right - 1, 0)), 0)
    add_r = bias * mult + (1 << 30)  # R = acc·M + (bias·M + 2^30)
    add_out = (half + (np.int64(zp) << right)) << 31
    neg = np.where(right > 0, np.int64(-1) << 31, np.int64(0))  # −2^31 where R < 0, e > 0
    total = right + 31
    all_right = bool((right > 0).all())
    signed = lq.act_min < zp and bool((right > 0).any())  # else the sign term cannot show
    add_all = add_r + add_out
    flat = acc.reshape(-1, cout)
    compact = np.iinfo(COMPACT)
    narrow = compact.min <= lq.act_min and lq.act_max <= compact.max
    y = np.empty(flat.shape, COMPACT if narrow else np.int64)
    rows = max(1, REQUANT_CHUNK // cout)
    if narrow and _requant_float64(flat, y, mult, add_all, total, lq.act_min, lq.act_max, rows,
                                   _sign_term(add_r, mult, right) if signed else None):
        return y.reshape(acc.shape)
    xbuf = np.empty((min(rows, len(flat)), cout), np.int64)
    tbuf = np.empty_like(xbuf) if signed else None
    for start in range(0, len(flat), rows):
        piece = flat[start:start + rows]
        x = xbuf[:len(piece)]
        np.copyto(x, piece, casting="unsafe")  # exact: the floats hold integers
        x *= mult
        if signed:
            x += add_r
            t = np.right_shift(x, 63, out=tbuf[:len(piece)])  # −1 where R < 0
            if all_right:
                t <<= 31
            else:
                t &= neg
            x += t
            x += add_out
        else:
            x += add_all
        x >>= total
        np.maximum(x, lq.act_min, out=x)
        np.minimum(x, lq.act_max, out=y[start:start + len(piece)])
    return y.reshape(acc.shape)


#: float64 holds every integer of magnitude below 2^53 exactly.
FLOAT64_EXACT = 1 << 53
#: |acc| of the float32-exact accumulators is below 2^24; a sign threshold beyond ±2^25 is
#: never crossed, and ±2^25 is a float32.
_SIGN_LIMIT = 1 << 25


def _sign_term(add_r: np.ndarray, mult: np.ndarray, right: np.ndarray
               ) -> tuple[np.ndarray, np.ndarray]:
    """The merged formula's sign term per channel, for `_requant_float64`: R = acc·M + add_r
    is negative exactly when the integer acc is below t = −⌊add_r / M⌋ (M > 0; never for
    M = 0, where R = 2^30), held as float32 within ±2^25; and 2^−e, what the term takes off v
    there (the numerator's −2^31 over 2^(31+e)), 0 on channels without a right shift."""
    t = np.where(mult > 0, -(add_r // np.maximum(mult, 1)), -_SIGN_LIMIT)
    below = np.clip(t, -_SIGN_LIMIT, _SIGN_LIMIT).astype(np.float32)
    step = np.where(right > 0, np.ldexp(1.0, -np.maximum(right, 0)), 0.0)
    return below, step


def _requant_float64(flat: np.ndarray, y: np.ndarray, mult: np.ndarray, add_all: np.ndarray,
                     total: np.ndarray, lo: int, hi: int, rows: int,
                     sign: tuple[np.ndarray, np.ndarray] | None = None) -> bool:
    """`requantize_rows`' merged formula, y = ⌊(acc·M + A − s·2^31) / 2^T⌋ clamped to
    [lo, hi] (s = [R < 0 ∧ e > 0], the sign term; `sign` = `_sign_term`, None where it cannot
    show), in float64 when that is provably exact (True; False: nothing written, the int64
    steps run). Written as y = lo + clamp(⌊v⌋, 0, hi − lo) with v = acc·m + c − s·2^−e,
    m = M·2^−T and c = (A − lo·2^T)·2^−T, all exact (M < 2^31; |A − lo·2^T| + 2^31 < 2^53
    checked).

    Where |acc·M + A − s·2^31 − lo·2^T| < 2^53 every product and sum is exact, and on
    [0, hi − lo] truncation is the floor. Elsewhere |v| ≥ 2^(53−T) − |c| − 1/2, which is
    required to exceed hi − lo + 1 on every channel: rounding is monotone and the threshold
    representable, so the computed v lands on the same side of the clamp as the true one.
    About 1.7× as fast as the int64 steps on MobileNetV2's maps (x86 has no vectorised int64
    multiply)."""
    span = hi - lo
    if int(total.max(initial=0)) > 44:  # 2^53 < (span + 1)·2^T already: never exact enough
        return False
    c_int = add_all - (np.int64(lo) << total)  # |·| < 2^62 + 2^51: int64 holds it
    margin = (1 << 31) if sign is not None else 0  # c − 2^−e is exact too
    if (np.abs(c_int) + margin >= FLOAT64_EXACT - (np.int64(span + 2) << total)).any():
        return False
    m = np.ldexp(mult.astype(np.float64), -total)  # exact: M < 2^31, |c_int| < 2^53
    c = np.ldexp(c_int.astype(np.float64), -total)
    buf = np.empty((min(rows, len(flat)), len(m)), np.float64)
    mask = np.empty(buf.shape, bool) if sign is not None else None
    drop = np.empty_like(buf) if sign is not None else None
    for start in range(0, len(flat), rows):
        piece = flat[start:start + rows]
        v = buf[:len(piece)]
        np.multiply(piece, m, out=v)
        v += c
        if sign is not None:  # v −= s·2^−e (a product and a subtraction: `where=` is slower)
            negative = np.less(piece, sign[0], out=mask[:len(piece)])
            v -= np.multiply(negative, sign[1], out=drop[:len(piece)])
        np.clip(v, 0, span, out=v)
        out = y[start:start + len(piece)]
        np.copyto(out, v, casting="unsafe")  # truncation: the floor on [0, span]
        out += lo
    return True


class FullyConnected(IntOp):
    """acc = bias[o] + Σ_k W[o,k]·(X[k] − zp_in)."""

    @staticmethod
    def run(node, lq, qm, xs, out_shape):
        src = qm.acts[node.inputs[0]]
        x = (xs[0].reshape(xs[0].shape[0], -1) - src.zero_point).astype(np.float64)
        acc = x @ lq.weight.astype(np.float64).T
        return _requant_out(_exact(acc, node) + lq.bias, lq, qm.acts[node.outputs[0]])


class Add(IntOp):
    """clamp(rq(rq((x1−zp1)<<20, M1) + rq((x2−zp2)<<20, M2), Mo) + zp_o) (`add_quantized`);
    same-shape inputs of at most 16 bits together go through `arith.add_table` instead (the
    same integers, one gather: ~10× faster on MobileNetV2's residual adds)."""

    @staticmethod
    def run(node, lq, qm, xs, out_shape):
        a, b = qm.acts[node.inputs[0]], qm.acts[node.inputs[1]]
        out = qm.acts[node.outputs[0]]
        x1, x2 = xs
        if a.bits + b.bits <= ADD_TABLE_BITS and x1.shape == x2.shape \
                and _within(x1, a.bits) and _within(x2, b.bits):
            table = _add_table(a.zero_point, a.bits, b.zero_point, b.bits,
                               tuple(sorted(lq.extra.items())), out.zero_point, lq.act_min,
                               lq.act_max)
            index = np.left_shift(x1, b.bits, dtype=np.intp)
            index += x2
            index -= arith.qrange(a.bits)[0] * (1 << b.bits) + arith.qrange(b.bits)[0]
            return np.take(table, index, mode="clip")  # in range: `_within` checked it
        return arith.add_quantized(x1.astype(np.int64), a.zero_point, x2.astype(np.int64),
                                   b.zero_point, lq.extra, out.zero_point, lq.act_min,
                                   lq.act_max)


#: The widest input pair (bits of x1 + bits of x2) `Add` runs from a table: 2^16 entries.
ADD_TABLE_BITS = 16


def _within(x: np.ndarray, bits: int) -> bool:
    """Whether every value of x lies in the `bits`-bit activation range (a table's domain)."""
    lo, hi = arith.qrange(bits)
    return x.size == 0 or (int(x.min()) >= lo and int(x.max()) <= hi)


@functools.lru_cache(maxsize=256)
def _add_table(zp1: int, bits1: int, zp2: int, bits2: int, params: tuple, zp_out: int,
               act_min: int, act_max: int) -> np.ndarray:
    """`arith.add_table`, built once per layer's parameters (a search measures each Add
    under many variants)."""
    table = arith.add_table(zp1, bits1, zp2, bits2, dict(params), zp_out, act_min, act_max)
    table.flags.writeable = False
    return table


class MaxPool(IntOp):
    @staticmethod
    def run(node, lq, qm, xs, out_shape):
        win, _ = pool_windows(xs[0], node, out_shape[1:3], np.iinfo(np.int64).min)
        return np.clip(win.max(axis=(4, 5)), lq.act_min, lq.act_max)


class AvgPool(IntOp):
    """Sum over in-bounds taps, rounded division by their count, then clamp."""

    @staticmethod
    def run(node, lq, qm, xs, out_shape):
        win, count = pool_windows(xs[0], node, out_shape[1:3], 0)
        total = win.sum(axis=(4, 5))
        return np.clip(arith.avgpool_round(total, count), lq.act_min, lq.act_max)


class Reshape(IntOp):
    @staticmethod
    def run(node, lq, qm, xs, out_shape):
        return xs[0].reshape((xs[0].shape[0],) + tuple(out_shape[1:]))


class Concat(IntOp):
    """TFLM concatenation.cc: a copy (inputs share the output's quantisation); constants are
    quantised with the output's parameters (`quantize_input`'s formula)."""

    @staticmethod
    def run(node, lq, qm, xs, out_shape):
        out = qm.acts[node.outputs[0]]
        parts = with_constants(node, xs, lambda c: quantize_input(out, c))
        return np.concatenate(parts, axis=node.attrs["axis"])


class Softmax(IntOp):
    @staticmethod
    def run(node, lq, qm, xs, out_shape):
        e = lq.extra
        return arith.softmax_s8(xs[0], e["multiplier"], e["left_shift"], e["diff_min"])


class Mean(IntOp):
    """TFLM's int8 MEAN (reference_ops::QuantizedMeanOrSum): the int32 sum over the n
    reduced elements minus n·zp_in, requantised with (M, S) of s_in/s_out folded with 1/n
    (`arith.mean_params`), plus zp_out, clamped to the output's range."""

    @staticmethod
    def run(node, lq, qm, xs, out_shape):
        e = lq.extra
        src = qm.acts[node.inputs[0]]
        total = xs[0].sum(axis=tuple(node.attrs["axes"]), keepdims=True)
        return arith.mean_quantized(total, e["count"], src.zero_point, e["multiplier"],
                                    e["shift"], qm.acts[node.outputs[0]].zero_point,
                                    lq.act_min, lq.act_max)


class Resize(IntOp):
    """Nearest neighbour: a pure copy; bilinear: TFLM's integer interpolation
    (`arith.resize_bilinear_int`). Either way the output shares the input's quantisation."""

    @staticmethod
    def run(node, lq, qm, xs, out_shape):
        if node.attrs["mode"] == "bilinear":
            a = node.attrs
            rows = arith.bilinear_int_taps(xs[0].shape[1], out_shape[1], a["align_corners"],
                                           a["half_pixel_centers"])
            cols = arith.bilinear_int_taps(xs[0].shape[2], out_shape[2], a["align_corners"],
                                           a["half_pixel_centers"])
            return arith.resize_bilinear_int(xs[0], rows, cols)
        return resize_nearest(xs[0], node)


def _binary_int(node: Node, lq: LayerQuant, qm: QuantModel,
                 xs: list[np.ndarray]) -> tuple[np.ndarray, int, np.ndarray, int]:
    """(first values, its zero point, second values, its zero point) of a mul/sub: two
    activations, or the activation and the int8 constant (`LayerQuant.const`)."""
    zx = qm.acts[node.inputs[0]].zero_point
    if "const" not in node.attrs:
        return xs[0], zx, xs[1], qm.acts[node.inputs[1]].zero_point
    c = lq.const.reshape(node.attrs["const_shape"])
    zc = lq.extra["const_zp"]
    return (c, zc, xs[0], zx) if node.attrs.get("const_first") else (xs[0], zx, c, zc)


class Mul(IntOp):
    """TFLM int8 mul (any bits), broadcasting like the float op."""

    @staticmethod
    def run(node, lq, qm, xs, out_shape):
        a, za, b, zb = _binary_int(node, lq, qm, xs)
        return arith.mul_quantized(a, za, b, zb, lq.extra, qm.acts[node.outputs[0]].zero_point,
                                   lq.act_min, lq.act_max)


class Sub(IntOp):
    """TFLM int8 sub (any bits), broadcasting like the float op."""

    @staticmethod
    def run(node, lq, qm, xs, out_shape):
        a, za, b, zb = _binary_int(node, lq, qm, xs)
        return arith.sub_quantized(a, za, b, zb, lq.extra, qm.acts[node.outputs[0]].zero_point,
                                   lq.act_min, lq.act_max)


class PRelu(IntOp):
    """TFLM int8 prelu with one int8 slope per channel (`LayerQuant.const`)."""

    @staticmethod
    def run(node, lq, qm, xs, out_shape):
        zp_in = qm.acts[node.inputs[0]].zero_point
        return arith.prelu_quantized(xs[0], zp_in, lq.const, lq.extra["alpha_zp"], lq.extra,
                                     qm.acts[node.outputs[0]].zero_point, lq.act_min,
                                     lq.act_max)


class Pad(IntOp):
    """TFLM pad.cc: the padding holds the output zero point (real 0), the rest is a copy."""

    @staticmethod
    def run(node, lq, qm, xs, out_shape):
        zp = qm.acts[node.outputs[0]].zero_point
        return np.pad(xs[0], ((0, 0),) + tuple(node.attrs["pads"][1:]), constant_values=zp)


class Slice(IntOp):
    """TFLM slice.cc / strided_slice.cc / split.cc: a plain copy of the selected elements."""

    @staticmethod
    def run(node, lq, qm, xs, out_shape):
        return slice_batch(xs[0], node, out_shape)


class Activation(IntOp):
    """Table lookup T[(uint8)x] of the layer's 256-entry table (`mpq.quant.lut`)."""

    @staticmethod
    def run(node, lq, qm, xs, out_shape):
        from mpq.quant.lut import lookup

        return lookup(lq.table, xs[0])


INT_OPS: dict[str, type[IntOp]] = {
    "conv2d": Conv2D,
    "fully_connected": FullyConnected,
    "add": Add,
    "max_pool": MaxPool,
    "avg_pool": AvgPool,
    "reshape": Reshape,
    "concat": Concat,
    "softmax": Softmax,
    "mean": Mean,
    "resize": Resize,
    "mul": Mul,
    "sub": Sub,
    "prelu": PRelu,
    "pad": Pad,
    "slice": Slice,
    "activation": Activation,
}


#: Ops that read narrow integer inputs as they are (the rest get int64).
NARROW_INPUTS = frozenset({"conv2d", "add"})


def run_op(node: Node, lq: LayerQuant, qm: QuantModel, xs: list[np.ndarray],
           out_shape: tuple[int, ...]) -> np.ndarray:
    """`INT_OPS[node.op].run` on inputs of any integer type: convolutions (`conv_float32`) and
    adds (`Add`) read narrow activations as they are, every other op gets int64, the type its
    arithmetic (shifts, products of multipliers) needs."""
    if node.op not in NARROW_INPUTS:
        xs = [x if x.dtype == np.int64 else x.astype(np.int64) for x in xs]
    return INT_OPS[node.op].run(node, lq, qm, xs, out_shape)


def run_int(qm: QuantModel, feeds: dict[str, np.ndarray],
            keep: bool = False) -> dict[str, np.ndarray]:
    """Run the integer reference on IR-layout integer batches; returns int64 outputs.

    With `keep`, every intermediate tensor is returned too (for debugging and scoring).
    """
    g = qm.graph
    env: dict[str, np.ndarray] = {}
    for name, x in feeds.items():
        lo, hi = arith.qrange(qm.acts[name].bits)
        x = np.asarray(x, np.int64)
        if x.size and (x.min() < lo or x.max() > hi):
            raise MpqError(f"input '{name}' holds values outside the {qm.acts[name].bits}-bit "
                           f"range [{lo}, {hi}]")
        env[name] = x
    remaining = {t: 0 for t in g.tensors}
    for n in g.nodes:
        for t in n.inputs:
            remaining[t] += 1
    for node in g.nodes:
        xs = [env[t] for t in node.inputs]
        env[node.outputs[0]] = run_op(node, qm.layers[node.name], qm, xs,
                                      g.tensors[node.outputs[0]].shape)
        if not keep:
            for t in node.inputs:
                remaining[t] -= 1
                if remaining[t] == 0 and t not in g.outputs:
                    env.pop(t, None)
    return {t: env[t].astype(np.int64, copy=False) for t in (env if keep else g.outputs)}


def quantize_input(q: ActQuant, x: np.ndarray) -> np.ndarray:
    """Real → b-bit integers: clamp(round_half_away(x/scale) + zp) (TFLite Quantize)."""
    lo, hi = arith.qrange(q.bits)
    v = arith.round_half_away(np.asarray(x, np.float64) / np.float64(np.float32(q.scale)))
    return np.clip(v + q.zero_point, lo, hi).astype(np.int64)


def dequantize(q: ActQuant, y: np.ndarray) -> np.ndarray:
    """b-bit integers → real: scale·(q − zp)."""
    return (np.asarray(y, np.float64) - q.zero_point) * np.float32(q.scale)


def run_packed(qm: QuantModel, packed_input: np.ndarray) -> np.ndarray:
    """One sample through the reference, input and output as packed buffers (DESIGN §4.2)."""
    g = qm.graph
    name, out = g.inputs[0], g.outputs[0]
    shape = g.tensors[name].shape
    x = arith.unpack(packed_input, qm.acts[name].bits, int(np.prod(shape))).reshape(shape)
    y = run_int(qm, {name: x})[out]
    return arith.pack(y, qm.acts[out].bits)
