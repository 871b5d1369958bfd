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
from mpq.ir import LAYOUT_NCHW, Graph, Node


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
        sh, sw = strides
        dh, dw = dilations
        xr = np.repeat(x, mult, axis=3) if mult > 1 else x
        acc = np.zeros((n, ho, wo, cout), np.result_type(x, w))
        for ky in range(kh):
            for kx in range(kw):
                tap = xr[:, ky * dh: ky * dh + sh * (ho - 1) + 1: sh,
                         kx * dw: kx * dw + sw * (wo - 1) + 1: sw, :]
                acc += tap * w[:, ky, kx, 0]
        return acc
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


class Concat(Op):
    @staticmethod
    def run(node: Node, xs: list[np.ndarray], out_shape: tuple[int, ...]) -> np.ndarray:
        return np.concatenate(xs, axis=node.attrs["axis"])


class Softmax(Op):
    @staticmethod
    def run(node: Node, xs: list[np.ndarray], out_shape: tuple[int, ...]) -> np.ndarray:
        x = xs[0] - xs[0].max(axis=-1, keepdims=True)
        e = np.exp(x)
        return e / e.sum(axis=-1, keepdims=True)


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
    "activation": Activation,
}


def to_ir_layout(graph: Graph, name: str, x: np.ndarray) -> np.ndarray:
    """Convert a batch given in the original model's input layout to the IR layout."""
    expected = graph.tensors[name].shape
    if graph.input_layouts.get(name) == LAYOUT_NCHW and x.ndim == 4:
        x = x.transpose(0, 2, 3, 1)
    if tuple(x.shape[1:]) != tuple(expected[1:]):
        raise MpqError(f"input '{name}' has shape {list(x.shape[1:])} per sample; the model "
                       f"expects {list(expected[1:])} (IR layout)")
    return np.ascontiguousarray(x, dtype=np.float32)


def from_ir_layout(graph: Graph, name: str, y: np.ndarray) -> np.ndarray:
    """Convert an output batch from the IR layout back to the original model's layout."""
    if graph.output_layouts.get(name) == LAYOUT_NCHW and y.ndim == 4:
        return y.transpose(0, 3, 1, 2)
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
