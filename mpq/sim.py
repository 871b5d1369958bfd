"""The bit-exact integer reference (DESIGN §4.4): runs a `QuantModel` as the C kernels do.

One small class per op, like the float interpreter, over batches of integer activations held
as int64 arrays (values in each tensor's b-bit range). Convolutions go through float64 GEMM on
zero-point-subtracted inputs, which is exact while |acc| < 2^53 — checked, not assumed.
Everything after the accumulator is `mpq.quant.arith`, the integer arithmetic of CMSIS-NN.
Packed buffers (DESIGN §4.2) enter and leave through `run_packed`.
"""

from __future__ import annotations

import numpy as np

from mpq.errors import MpqError
from mpq.interpreter import (
    conv2d_nhwc,
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
        x = (xs[0] - src.zero_point).astype(np.float64)
        acc = conv2d_nhwc(pad_nhwc(x, a["pads"]), lq.weight.astype(np.float64), a["strides"],
                          a["dilations"], a["groups"], out_shape[1:3])
        return _requant_out(_exact(acc, node) + lq.bias, lq, qm.acts[node.outputs[0]])


class FullyConnected(IntOp):
    """acc = bias[o] + Σ_k W[o,k]·(X[k] − zp_in)."""

    @staticmethod
    def run(node, lq, qm, xs, out_shape):
        src = qm.acts[node.inputs[0]]
        x = (xs[0].reshape(xs[0].shape[0], -1) - src.zero_point).astype(np.float64)
        acc = x @ lq.weight.astype(np.float64).T
        return _requant_out(_exact(acc, node) + lq.bias, lq, qm.acts[node.outputs[0]])


class Add(IntOp):
    @staticmethod
    def run(node, lq, qm, xs, out_shape):
        a, b = qm.acts[node.inputs[0]], qm.acts[node.inputs[1]]
        out = qm.acts[node.outputs[0]]
        return arith.add_quantized(xs[0], a.zero_point, xs[1], b.zero_point, lq.extra,
                                   out.zero_point, lq.act_min, lq.act_max)


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
        env[node.outputs[0]] = INT_OPS[node.op].run(node, qm.layers[node.name], qm, xs,
                                                    g.tensors[node.outputs[0]].shape)
        if not keep:
            for t in node.inputs:
                remaining[t] -= 1
                if remaining[t] == 0 and t not in g.outputs:
                    env.pop(t, None)
    return env if keep else {t: env[t] for t in g.outputs}


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
