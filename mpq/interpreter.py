"""Float interpreter over the IR (numpy), batched over a leading sample axis.

It is the float side of everything after import: calibration statistics, the float column of
`mpq eval`, and the check that import preserved the network. One small class per op, like
onnx's reference evaluator; every kernel works on NHWC arrays of shape [N, H, W, C] (or
[N, K] after a flatten), where N is the number of samples in the batch.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from mpq.errors import MpqError
from mpq.ir import LAYOUT_NCHW, LAYOUT_NCW, Graph, Node, binary_operands, constant_operand


def _clamp(node: Node, y: np.ndarray) -> np.ndarray:
    lo = node.attrs.get("act_min", -math.inf)
    hi = node.attrs.get("act_max", math.inf)
    if lo == -math.inf and hi == math.inf:
        return y
    return np.clip(y, lo, hi)


def pad_nhwc(x: np.ndarray, pads: tuple[int, int, int, int], value: float = 0.0) -> np.ndarray:
    """Pad the spatial axes of an NHWC batch by (top, left, bottom, right)."""
    t, left, b, r = pads
    if not any(pads):
        return x
    return np.pad(x, ((0, 0), (t, b), (left, r), (0, 0)), constant_values=value)


def windows(x: np.ndarray, kernel: tuple[int, int], strides: tuple[int, int],
            dilations: tuple[int, int], out_hw: tuple[int, int]) -> np.ndarray:
    """Strided view [N, Ho, Wo, C, KH, KW] of the (already padded) input's sliding windows."""
    (kh, kw), (sh, sw), (dh, dw) = kernel, strides, dilations
    span_h, span_w = dh * (kh - 1) + 1, dw * (kw - 1) + 1
    v = sliding_window_view(x, (span_h, span_w), axis=(1, 2))
    v = v[:, ::sh, ::sw, :, ::dh, ::dw]
    return v[:, :out_hw[0], :out_hw[1]]


class Op:
    """One IR op in float: `run(node, inputs) -> output`."""

    @staticmethod
    def run(node: Node, xs: list[np.ndarray], out_shape: tuple[int, ...]) -> np.ndarray:
        raise NotImplementedError


def conv2d_nhwc(x: np.ndarray, w: np.ndarray, strides: tuple[int, int],
                dilations: tuple[int, int], groups: int, out_hw: tuple[int, int]) -> np.ndarray:
    """Convolution of an already padded NHWC batch with OHWI weights, no bias.

    Runs in the dtype of `x` and `w`: float32 for the float interpreter, float64 for the
    integer reference (exact while |acc| < 2^53, DESIGN §4.4).
    """
    ho, wo = out_hw
    cout, kh, kw, cin_g = w.shape
    n = x.shape[0]
    if (kh, kw) == (1, 1) and groups == 1 and strides == (1, 1):
        # Pointwise: one GEMM over all pixels, no window copies.
        return (x[:, :ho, :wo].reshape(-1, x.shape[3]) @ w.reshape(cout, -1).T).reshape(
            n, ho, wo, cout)
    if cin_g == 1 and groups == x.shape[3] and groups > 1:
        # Depthwise: accumulate tap by tap; far cheaper than a grouped GEMM.
        mult = cout // groups
        xr = np.repeat(x, mult, axis=3) if mult > 1 else x
        return depthwise_taps(xr, w, strides, dilations, out_hw)
    win = windows(x, (kh, kw), strides, dilations, (ho, wo))  # N,Ho,Wo,C,KH,KW
    cout_g = cout // groups
    outs = []
    for g in range(groups):
        patch = win[:, :, :, g * cin_g:(g + 1) * cin_g]  # N,Ho,Wo,Cin_g,KH,KW
        patch = patch.transpose(0, 1, 2, 4, 5, 3).reshape(n * ho * wo, kh * kw * cin_g)
        wg = w[g * cout_g:(g + 1) * cout_g].reshape(cout_g, -1)
        outs.append(patch @ wg.T)
    y = np.concatenate(outs, axis=1) if groups > 1 else outs[0]
    return y.reshape(n, ho, wo, cout)


#: Output elements per block of `depthwise_taps` (float32: 512 KB of sums).
DEPTHWISE_BLOCK = 1 << 17


def depthwise_taps(x: np.ndarray, w: np.ndarray, strides: tuple[int, int],
                   dilations: tuple[int, int], out_hw: tuple[int, int],
                   zero_start: bool = True) -> np.ndarray:
    """Σ over taps (ky, kx), in that order, of x[tap] · w[:, ky, kx, 0] (one output channel
    per input channel of the padded NHWC `x`), in the dtype of x and w: one sample and one
    block of DEPTHWISE_BLOCK output elements at a time, so the block's sums and one product
    buffer stay in the cache through all taps instead of streaming a whole map per tap (1.5–2×
    on MobileNetV2's maps). `zero_start`: the sums start at 0 and every tap is added (the
    float model's exact order); else the first tap is written (integers: the same sums)."""
    ho, wo = out_hw
    n, c = x.shape[0], x.shape[3]
    kh, kw = w.shape[1], w.shape[2]
    sh, sw = strides
    dh, dw = dilations
    dtype = np.result_type(x, w)
    acc = (np.zeros if zero_start else np.empty)((n, ho, wo, c), dtype)
    rows = max(1, DEPTHWISE_BLOCK // max(1, wo * c))
    prod = np.empty((min(rows, ho), wo, c), dtype)
    taps = [np.ascontiguousarray(w[:, ky, kx, 0]) for ky in range(kh) for kx in range(kw)]
    for i in range(n):
        xi = x[i]
        for r0 in range(0, ho, rows):
            m = min(rows, ho - r0)
            block, p = acc[i, r0:r0 + m], prod[:m]
            for t, tap_w in enumerate(taps):
                ky, kx = divmod(t, kw)
                y0 = ky * dh + sh * r0
                tap = xi[y0: y0 + sh * (m - 1) + 1: sh,
                         kx * dw: kx * dw + sw * (wo - 1) + 1: sw, :]
                if t == 0 and not zero_start:
                    np.multiply(tap, tap_w, out=block)
                else:
                    np.multiply(tap, tap_w, out=p)
                    block += p
    return acc


def pool_windows(x: np.ndarray, node: Node, out_hw: tuple[int, int],
                 pad_value: float) -> tuple[np.ndarray, np.ndarray]:
    """Pooling windows [N,Ho,Wo,C,KH,KW] of the padded input, and the in-bounds tap counts."""
    a = node.attrs
    xp = pad_nhwc(x, a["pads"], pad_value)
    ones = pad_nhwc(np.ones((1,) + x.shape[1:3] + (1,), np.int64), a["pads"])
    win = windows(xp, a["kernel"], a["strides"], (1, 1), out_hw)
    count = windows(ones, a["kernel"], a["strides"], (1, 1), out_hw).sum(axis=(4, 5))
    return win, count


class Conv2D(Op):
    @staticmethod
    def run(node: Node, xs: list[np.ndarray], out_shape: tuple[int, ...]) -> np.ndarray:
        a = node.attrs
        y = conv2d_nhwc(pad_nhwc(xs[0], a["pads"]), node.weight, a["strides"], a["dilations"],
                        a["groups"], out_shape[1:3])
        return _clamp(node, y + node.bias)


class FullyConnected(Op):
    @staticmethod
    def run(node: Node, xs: list[np.ndarray], out_shape: tuple[int, ...]) -> np.ndarray:
        x = xs[0].reshape(xs[0].shape[0], -1)
        return _clamp(node, x @ node.weight.T + node.bias)


class Add(Op):
    @staticmethod
    def run(node: Node, xs: list[np.ndarray], out_shape: tuple[int, ...]) -> np.ndarray:
        return _clamp(node, xs[0] + xs[1])


class MaxPool(Op):
    @staticmethod
    def run(node: Node, xs: list[np.ndarray], out_shape: tuple[int, ...]) -> np.ndarray:
        win, _ = pool_windows(xs[0], node, out_shape[1:3], -np.inf)
        return _clamp(node, win.max(axis=(4, 5)))


class AvgPool(Op):
    @staticmethod
    def run(node: Node, xs: list[np.ndarray], out_shape: tuple[int, ...]) -> np.ndarray:
        win, count = pool_windows(xs[0], node, out_shape[1:3], 0.0)
        return _clamp(node, win.sum(axis=(4, 5)) / count)


class Reshape(Op):
    @staticmethod
    def run(node: Node, xs: list[np.ndarray], out_shape: tuple[int, ...]) -> np.ndarray:
        return xs[0].reshape((xs[0].shape[0],) + tuple(out_shape[1:]))


def with_constants(node: Node, xs: list[np.ndarray],
                   convert: Callable[[np.ndarray], np.ndarray]) -> list[np.ndarray]:
    """A concat's parts: its activation batches with its constants (`convert`ed, repeated
    over the batch) put back at their positions."""
    parts = list(xs)
    n = xs[0].shape[0]
    for pos, c in node.attrs.get("constants", ()):
        v = convert(c)
        parts.insert(pos, np.broadcast_to(v, (n,) + v.shape[1:]).astype(xs[0].dtype))
    return parts


class Concat(Op):
    @staticmethod
    def run(node: Node, xs: list[np.ndarray], out_shape: tuple[int, ...]) -> np.ndarray:
        return np.concatenate(with_constants(node, xs, lambda c: c), axis=node.attrs["axis"])


class Softmax(Op):
    @staticmethod
    def run(node: Node, xs: list[np.ndarray], out_shape: tuple[int, ...]) -> np.ndarray:
        x = xs[0] - xs[0].max(axis=-1, keepdims=True)
        e = np.exp(x)
        return e / e.sum(axis=-1, keepdims=True)


class Mean(Op):
    """Arithmetic mean over `axes`, which stay as size 1 (ONNX ReduceMean, TFLite MEAN)."""

    @staticmethod
    def run(node: Node, xs: list[np.ndarray], out_shape: tuple[int, ...]) -> np.ndarray:
        return xs[0].mean(axis=tuple(node.attrs["axes"]), keepdims=True)


class Resize(Op):
    """Nearest-neighbour resize: output row i copies input row rows[i], column j cols[j];
    bilinear: TFLite's float ResizeBilinear (`bilinear_float_taps`)."""

    @staticmethod
    def run(node: Node, xs: list[np.ndarray], out_shape: tuple[int, ...]) -> np.ndarray:
        if node.attrs["mode"] == "bilinear":
            return resize_bilinear_float(xs[0], node, out_shape)
        return resize_nearest(xs[0], node)


def bilinear_float_taps(in_size: int, out_size: int, align_corners: bool,
                        half_pixel_centers: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(lower, upper, fraction) per output index of TFLite's float ResizeBilinear
    (reference_ops/resize_bilinear.h, ComputeInterpolationValues), in float32: scale =
    (in−1)/(out−1) with align_corners (out > 1), else in/out; v = (o + ½)·scale − ½ with
    half-pixel centres, else o·scale; lower = max(floor v, 0), upper = min(ceil v, in−1),
    fraction = v − lower."""
    if align_corners and out_size > 1:
        scale = np.float32(in_size - 1) / np.float32(out_size - 1)
    else:
        scale = np.float32(in_size) / np.float32(out_size)
    o = np.arange(out_size, dtype=np.float32)
    half = np.float32(0.5)
    v = (o + half) * scale - half if half_pixel_centers else o * scale
    lo = np.maximum(np.floor(v), 0).astype(np.int64)
    hi = np.minimum(np.ceil(v).astype(np.int64), in_size - 1)
    return lo, hi, (v - lo.astype(np.float32)).astype(np.float32)


def resize_bilinear_float(x: np.ndarray, node: Node, out_shape: tuple[int, ...]) -> np.ndarray:
    """Bilinear resize of an NHWC batch with TFLite's float taps (rows, then columns)."""
    a = node.attrs
    y0, y1, fy = bilinear_float_taps(x.shape[1], out_shape[1], a["align_corners"],
                                     a["half_pixel_centers"])
    x0, x1, fx = bilinear_float_taps(x.shape[2], out_shape[2], a["align_corners"],
                                     a["half_pixel_centers"])
    fy = fy[None, :, None, None]
    fx = fx[None, None, :, None]
    top, bottom = x[:, y0], x[:, y1]
    return (top[:, :, x0] * (1 - fy) * (1 - fx) + bottom[:, :, x0] * fy * (1 - fx)
            + top[:, :, x1] * (1 - fy) * fx + bottom[:, :, x1] * fy * fx)


def resize_nearest(x: np.ndarray, node: Node) -> np.ndarray:
    """x[:, rows][:, :, cols] of an NHWC batch (the index maps resolved at import)."""
    rows = np.asarray(node.attrs["rows"], np.int64)
    cols = np.asarray(node.attrs["cols"], np.int64)
    return x[:, rows][:, :, cols]


class Mul(Op):
    """a·b with numpy broadcasting (either input may have 1 where the output has a dim; one
    operand may be the node's constant)."""

    @staticmethod
    def run(node: Node, xs: list[np.ndarray], out_shape: tuple[int, ...]) -> np.ndarray:
        a, b = binary_operands(node, xs[0], constant_operand(node), xs[1:])
        return _clamp(node, a * b)


class Sub(Op):
    """a − b with numpy broadcasting (one operand may be the node's constant)."""

    @staticmethod
    def run(node: Node, xs: list[np.ndarray], out_shape: tuple[int, ...]) -> np.ndarray:
        a, b = binary_operands(node, xs[0], constant_operand(node), xs[1:])
        return _clamp(node, a - b)


class PRelu(Op):
    """x ≥ 0 ? x : α[c]·x, one slope per channel (last axis)."""

    @staticmethod
    def run(node: Node, xs: list[np.ndarray], out_shape: tuple[int, ...]) -> np.ndarray:
        alpha = np.asarray(node.attrs["alpha"], np.float32)
        return np.where(xs[0] >= 0, xs[0], xs[0] * alpha)


class Pad(Op):
    """Constant zero padding of any axes (TFLite PAD, ONNX Pad with value 0)."""

    @staticmethod
    def run(node: Node, xs: list[np.ndarray], out_shape: tuple[int, ...]) -> np.ndarray:
        return np.pad(xs[0], ((0, 0),) + tuple(node.attrs["pads"][1:]))


def slice_batch(x: np.ndarray, node: Node, out_shape: tuple[int, ...]) -> np.ndarray:
    """out[n, i1, …] = x[n, starts[1] + i1·steps[1], …]: the strided window of a slice node
    (batch axis kept whole)."""
    a = node.attrs
    index = (slice(None),) + tuple(
        slice(s, s + st * (k - 1) + 1, st)
        for s, st, k in zip(a["starts"][1:], a["steps"][1:], out_shape[1:], strict=True))
    return x[index]


class Slice(Op):
    @staticmethod
    def run(node: Node, xs: list[np.ndarray], out_shape: tuple[int, ...]) -> np.ndarray:
        return slice_batch(xs[0], node, out_shape)


class Activation(Op):
    """A unary activation (`mpq.quant.lut.float_activation`)."""

    @staticmethod
    def run(node: Node, xs: list[np.ndarray], out_shape: tuple[int, ...]) -> np.ndarray:
        from mpq.quant.lut import float_activation

        a = node.attrs
        return float_activation(a["function"], xs[0], a.get("alpha", 0.0), a.get("beta", 0.0))


OPS: dict[str, type[Op]] = {
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


def to_ir_layout(graph: Graph, name: str, x: np.ndarray) -> np.ndarray:
    """Convert a batch given in the original model's input layout to the IR layout."""
    expected = graph.tensors[name].shape
    if graph.input_layouts.get(name) == LAYOUT_NCHW and x.ndim == 4:
        x = x.transpose(0, 2, 3, 1)
    if graph.input_layouts.get(name) == LAYOUT_NCW and x.ndim == 3:
        x = x.transpose(0, 2, 1)[:, None]
    if tuple(x.shape[1:]) != tuple(expected[1:]):
        raise MpqError(f"input '{name}' has shape {list(x.shape[1:])} per sample; the model "
                       f"expects {list(expected[1:])} (IR layout)")
    return np.ascontiguousarray(x, dtype=np.float32)


def from_ir_layout(graph: Graph, name: str, y: np.ndarray) -> np.ndarray:
    """Convert an output batch from the IR layout back to the original model's layout."""
    if graph.output_layouts.get(name) == LAYOUT_NCHW and y.ndim == 4:
        return y.transpose(0, 3, 1, 2)
    if graph.output_layouts.get(name) == LAYOUT_NCW and y.ndim == 4:
        return y[:, 0].transpose(0, 2, 1)
    return y


def run_graph(graph: Graph, feeds: dict[str, np.ndarray],
              observe: Callable[[str, np.ndarray], None] | None = None,
              keep: bool = False) -> dict[str, np.ndarray]:
    """Run the IR in float on IR-layout batches; returns the graph outputs.

    `observe(tensor_name, batch)` sees every activation as it is produced (calibration hook).
    With `keep`, every intermediate tensor is returned as well.
    """
    env = dict(feeds)
    if observe is not None:
        for name, value in feeds.items():
            observe(name, value)
    consumers_left = {name: 0 for name in graph.tensors}
    for n in graph.nodes:
        for t in n.inputs:
            consumers_left[t] += 1
    for node in graph.nodes:
        xs = [env[t] for t in node.inputs]
        y = OPS[node.op].run(node, xs, graph.tensors[node.outputs[0]].shape).astype(np.float32)
        env[node.outputs[0]] = y
        if observe is not None:
            observe(node.outputs[0], y)
        if not keep:
            for t in node.inputs:
                consumers_left[t] -= 1
                if consumers_left[t] == 0 and t not in graph.outputs:
                    del env[t]
    if keep:
        return env
    return {name: env[name] for name in graph.outputs}


def run_batches(graph: Graph, x: np.ndarray, batch_size: int = 64) -> Iterator[np.ndarray]:
    """Yield the first output for consecutive batches of a single-input model (ONNX layout)."""
    name = graph.inputs[0]
    for start in range(0, len(x), batch_size):
        feed = to_ir_layout(graph, name, x[start:start + batch_size])
        out = run_graph(graph, {name: feed})[graph.outputs[0]]
        yield from_ir_layout(graph, graph.outputs[0], out)
