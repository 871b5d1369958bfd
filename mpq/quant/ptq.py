"""Post-training quantisation that only changes parameters (DESIGN §4.5): bias correction and
AdaRound, fitted on calibration data, recorded in the plan, bit-exact in export.

Both run in one walk through the network, layer by layer in graph order, with the float model
and the integer reference (`mpq.sim`) side by side on the same calibration samples. At each
conv/FC layer the walk sees the float input x (float model) and the quantised input x̃ (the
integer reference with every earlier layer already fitted), so each fit corrects the error that
reaches the layer, not only its own (Finkelstein et al., "Fighting Quantization Bias With
Bias", 2019, §3 — the layers are corrected in order for this reason).

- **AdaRound** (Nagel et al., "Up or Down? Adaptive Rounding for Post-Training Quantization",
  ICML 2020), for 4- and 2-bit linear weights: per weight, round down or up (q = ⌊w/s⌋ + h),
  chosen to minimise the layer's output error E‖W x − W̃ x̃‖² on calibration inputs, with h
  relaxed to the rectified sigmoid h(V) = clip(σ(V)(ζ − γ) + γ, 0, 1) (ζ = 1.1, γ = −0.1) and the
  regulariser Σ 1 − |2h − 1|^β, β annealed from 20 to 2 after a 20 % warm-up without it (§4–5
  of the paper). The error is a quadratic form in W̃, so it is computed from the Gram matrices
  C̃ = E[x̃ x̃ᵀ] and C = E[x x̃ᵀ] of the layer's input patches (per group), and the fit costs
  O(c_out·d²) per iteration for d weights per output channel — a fixed `ADAROUND_ITERS` Adam
  steps, no sampling after the patches are drawn (seeded), hence deterministic. The result is
  kept only if its hard rounding has a lower error than round-to-nearest on the same inputs.
- **Bias correction** (Nagel et al., "Data-Free Quantization Through Weight Equalization and
  Bias Correction", ICCV 2019, §4.2, in its empirical form; Finkelstein et al. §3): the
  expected shift of each output channel's pre-activation, δ_c = E[ŷ_c] − E[y_c], with
  ŷ = s_in·s_w[c]·(Σ W_q (x_q − z_in) + b_q) the integer layer's accumulator in real units and
  y = W x + b the float layer's, averaged over samples and positions (E[y] = W E[x_patch] + b:
  the mean input patch, not the convolution); the layer's bias becomes b − δ before it is
  quantised to int32. Sub-byte weights and activations (clipped ranges,
  coarse grids) shift these means; the correction removes the shift, not the noise.

The plan records what rebuilds the parameters: the rounding as a bit mask (`w_params.rounding`,
`weights.pack_rounding`) and δ per output channel (`bias_correction`, real units), so export
recomputes exactly the same integers from the model's float weights.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from mpq.interpreter import OPS, conv2d_nhwc, pad_nhwc, to_ir_layout, windows
from mpq.ir import Graph, Node
from mpq.quant.arith import round_half_away
from mpq.quant.calibrate import Dataset
from mpq.quant.qmodel import ActQuant, LayerQuant, QuantModel, weighted_layer
from mpq.quant.weights import (
    ROUNDING,
    ROUNDING_BITS,
    WeightSpec,
    pack_rounding,
    rounding_floor,
)
from mpq.sim import conv_float32, quantize_input, requantize_rows, run_op

PTQ_SAMPLES = 64  # calibration samples the walk uses (fewer when the tensors are large)
PTQ_ELEMENTS = 1 << 24  # bound on samples × the largest tensor's elements (memory)
ADAROUND_ROWS = 4096  # input patches per layer the Gram matrices are estimated from
ADAROUND_ITERS = 500
ADAROUND_LR = 0.05  # Adam step on V
# Weight of the mean rounding regulariser against the reconstruction error normalised by
# round-to-nearest's. The paper's λ = 0.01 weighs a sum over weights against an unnormalised
# error and does not carry over: measured on the three convs of tests' grouped/dilated/depthwise
# model at 2 bits, λ = 0.01 leaves nearest's rounding (error ratio 0.98–1.03), λ = 1 gives
# 0.63–0.97, λ = 20 gives 0.33–0.56 (100: no better).
ADAROUND_LAMBDA = 20.0
ADAROUND_WARMUP = 0.2
ADAROUND_BETA = (20.0, 2.0)
ZETA, GAMMA = 1.1, -0.1
WEIGHTED = ("conv2d", "fully_connected")


@dataclass(frozen=True)
class PtqOptions:
    """Which fits to run (`mpq search --bias-correction --adaround`)."""

    bias_correction: bool = False
    adaround: bool = False
    samples: int = PTQ_SAMPLES

    @property
    def any(self) -> bool:
        return self.bias_correction or self.adaround


@dataclass
class PtqResult:
    """The fitted model and what a plan records to rebuild it."""

    model: QuantModel
    specs: dict[str, WeightSpec] = field(default_factory=dict)  # AdaRound's layers
    corrections: dict[str, np.ndarray] = field(default_factory=dict)  # δ per layer
    log: list[str] = field(default_factory=list)


def walk_samples(qm: QuantModel, available: int, wanted: int) -> int:
    """Samples the walk holds at once: at most `wanted` and the data set's size, and at most
    PTQ_ELEMENTS / (elements of the largest tensor), but at least 8 (or all there are)."""
    largest = max(int(np.prod(t.shape[1:])) for t in qm.graph.tensors.values())
    cap = max(8, PTQ_ELEMENTS // max(largest, 1))
    return max(1, min(wanted, available, cap))


def apply_ptq(qm: QuantModel, data: Dataset, opts: PtqOptions,
              log: Callable[[str], None] | None = None) -> PtqResult:
    """Bias correction and/or AdaRound over `qm`'s conv/FC layers, in graph order (module
    docstring). Returns the fitted model (activations unchanged) and what the plan records."""
    say = log or (lambda message: None)
    graph = qm.graph
    n = walk_samples(qm, len(data), opts.samples)
    x = next(data.batches(n))
    name = graph.inputs[0]
    xf = to_ir_layout(graph, name, x).astype(np.float32)
    env_q: dict[str, np.ndarray] = {name: quantize_input(qm.acts[name], xf)}
    layers = dict(qm.layers)
    walk = QuantModel(graph, qm.acts, layers)
    result = PtqResult(walk)
    remaining = _readers(graph)
    # Bias correction alone reads the float model only through each weighted layer's mean
    # output, which no fit changes: the float walk then runs in a side thread (numpy releases
    # the GIL) and hands those means over; AdaRound needs the float inputs themselves, so the
    # two walks go in step.
    means = {nd.name: Future() for nd in graph.nodes if nd.op in WEIGHTED} \
        if not opts.adaround else None
    steps = None if means is not None else _float_walk(graph, xf)
    with ThreadPoolExecutor(1) as pool:
        side = pool.submit(_float_means, graph, xf, means) if means is not None else None
        for node in graph.nodes:
            x_float = next(steps)[0] if steps is not None else None
            acc = None
            if node.op in WEIGHTED:
                mean = means[node.name].result() if means is not None else None
                layers[node.name], acc = _fit_layer(node, layers[node.name], qm.acts,
                                                    x_float, env_q[node.inputs[0]], opts,
                                                    result, mean)
            out_shape = graph.tensors[node.outputs[0]].shape
            if acc is not None:  # `Conv2D.run` on the fitted layer, its accumulators reused
                env_q[node.outputs[0]] = requantize_rows(acc, layers[node.name],
                                                         qm.acts[node.outputs[0]])
            else:
                env_q[node.outputs[0]] = run_op(node, layers[node.name], walk,
                                                [env_q[t] for t in node.inputs], out_shape)
            for t in node.inputs:
                remaining[t] -= 1
                if remaining[t] == 0:
                    env_q.pop(t, None)
        if side is not None:
            side.result()
    fitted = sum(1 for s in result.specs)
    say(f"ptq: {n} calibration samples; AdaRound kept on {fitted} layer(s), bias corrected on "
        f"{len(result.corrections)} layer(s)")
    for line in result.log:
        say(f"ptq: {line}")
    return result


def _readers(graph: Graph) -> dict[str, int]:
    """How many nodes read each tensor (`Graph.consumers`)."""
    return {t: len(nodes) for t, nodes in graph.consumers().items()}


def _float_walk(graph: Graph, xf: np.ndarray) -> Iterator[list[np.ndarray]]:
    """The float model on the IR-layout batch `xf`, node by node in graph order: yields each
    node's float32 inputs, then runs it (a tensor is dropped after its last reader)."""
    env: dict[str, np.ndarray] = {graph.inputs[0]: xf}
    remaining = _readers(graph)
    for node in graph.nodes:
        xs = [env[t] for t in node.inputs]
        yield xs
        env[node.outputs[0]] = OPS[node.op].run(node, xs, graph.tensors[node.outputs[0]].shape
                                                ).astype(np.float32)
        del xs
        for t in node.inputs:
            remaining[t] -= 1
            if remaining[t] == 0:
                env.pop(t, None)


def _float_means(graph: Graph, xf: np.ndarray, means: dict[str, Future]) -> None:
    """`float_mean_output` of every weighted layer of the float walk, each set on its future
    as soon as it is known (the walk stops after the last); an error is set on every future
    still open (the integer walk waits on them) and raised."""
    left = len(means)
    try:
        for node, xs in zip(graph.nodes, _float_walk(graph, xf), strict=False):
            if left == 0:
                break
            if node.name in means:
                means[node.name].set_result(float_mean_output(node, xs[0]))
                left -= 1
    except BaseException as exc:
        for future in means.values():
            if not future.done():
                future.set_exception(exc)
        raise


def float_mean_output(node: Node, xf: np.ndarray) -> np.ndarray:
    """E[y] = W E[x_patch] + b of a conv/FC layer on its float input batch, per output channel
    in float64 (`_mean_linear`): bias correction's reference."""
    return _mean_linear(node, xf, node.weight.astype(np.float64)) + node.bias.astype(np.float64)


def _fit_layer(node: Node, lq: LayerQuant, acts: dict[str, ActQuant], xf: np.ndarray | None,
               xq: np.ndarray, opts: PtqOptions, result: PtqResult,
               mean: np.ndarray | None = None) -> tuple[LayerQuant, np.ndarray | None]:
    """One layer: AdaRound (4/2-bit linear weights), then bias correction on the result. Also
    the fitted layer's float32 accumulators (`mpq.sim.conv_float32`) when bias correction
    computed them and they are exact, else None: the correction changes only the bias, so the
    walk requantises them instead of running the convolution again. `xf`: the layer's float
    input (AdaRound's walk), or None with `mean`, its `float_mean_output`."""
    spec = WeightSpec(lq.weight_scheme, lq.weight_bits, lq.weight_params)
    src = acts[node.inputs[0]]
    if opts.adaround and lq.weight_scheme == "linear" and lq.weight_bits in ROUNDING_BITS:
        x_deq = (xq.astype(np.float64) - src.zero_point) * float(np.float32(src.scale))
        up, gain = fit_adaround(node, lq.weight_bits, xf, x_deq)
        if up is not None:
            spec = WeightSpec("linear", lq.weight_bits, {ROUNDING: pack_rounding(up)})
            result.specs[node.name] = spec
            lq = weighted_layer(node, acts, spec)
            result.log.append(f"{node.name}: AdaRound output error {gain:.3f}× of nearest")
        else:
            result.log.append(f"{node.name}: AdaRound no better than nearest; kept nearest")
    acc = None
    if opts.bias_correction:
        out_shape = (xq.shape[0], *_out_hw(node, xq), lq.weight.shape[0]) \
            if node.op == "conv2d" else None
        acc = conv_float32(node, lq, src.zero_point, xq, out_shape, src.bits) \
            if out_shape else None
        delta = expected_shift(node, lq, src, xf, xq, acc, mean)
        result.corrections[node.name] = delta
        fitted = weighted_layer(node, acts, spec, delta)
        if acc is not None and not np.array_equal(fitted.weight, lq.weight):
            acc = None  # (the same spec gives the same weights; never taken)
        lq = fitted
    return lq, acc


# -- bias correction ----------------------------------------------------------------------------

def _linear(node: Node, x: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Σ W x of a conv (NHWC output) or FC layer in float64, no bias, as [samples·positions,
    c_out]."""
    if node.op == "fully_connected":
        return x.reshape(x.shape[0], -1) @ w.reshape(w.shape[0], -1).T
    a = node.attrs
    y = conv2d_nhwc(pad_nhwc(x, a["pads"]), w, a["strides"], a["dilations"], a["groups"],
                    _out_hw(node, x))
    return y.reshape(-1, w.shape[0])


def _out_hw(node: Node, x: np.ndarray) -> tuple[int, int]:
    """Output height and width of a conv on input `x` (NHWC)."""
    a = node.attrs
    (kh, kw), (sh, sw), (dh, dw) = node.weight.shape[1:3], a["strides"], a["dilations"]
    t, left, b, r = a["pads"]
    h = (x.shape[1] + t + b - dh * (kh - 1) - 1) // sh + 1
    w = (x.shape[2] + left + r - dw * (kw - 1) - 1) // sw + 1
    return h, w


def expected_shift(node: Node, lq: LayerQuant, src: ActQuant, xf: np.ndarray | None,
                   xq: np.ndarray, acc32: np.ndarray | None = None,
                   mean: np.ndarray | None = None) -> np.ndarray:
    """δ_c = mean over samples and positions of ŷ_c − y_c (module docstring): the integer
    accumulator s_in·s_w[c]·(Σ W_q (x_q − z_in) + b_q) against the float W x + b, per output
    channel, in real units (float64). `acc32`: the layer's accumulators Σ W_q (x_q − z_in)
    from `mpq.sim.conv_float32` when it had them (exact integers, so the float64 sums' values).
    `mean`: `float_mean_output(node, xf)` when the caller has it (then `xf` is not read)."""
    cout = lq.weight.shape[0]
    if acc32 is None:
        acc32 = _linear(node, xq.astype(np.float64) - src.zero_point,
                        lq.weight.astype(np.float64))
    # The mean of the integer accumulators, then scaled: mean(s·(acc + b)) = s·(mean(acc) + b)
    # (the sums of exact integers are exact in float64 while below 2^53).
    flat = acc32.reshape(-1, cout)
    mean_acc = flat.sum(axis=0, dtype=np.float64) / len(flat) + lq.bias
    real = mean_acc * (np.float64(np.float32(src.scale)) * lq.weight_scale.astype(np.float64))
    ref = mean if mean is not None else float_mean_output(node, xf)
    return real - ref


def mean_patch(node: Node, x: np.ndarray) -> np.ndarray:
    """The mean over samples and output positions of the input patch each output reads,
    [KH, KW, C_in] for a conv (padding as zeros), [features] for a fully connected layer:
    mean_{n,p} Σ W x_patch(n, p) = Σ W mean_{n,p} x_patch(n, p), so the float layer's mean
    output (`expected_shift`'s reference) costs a sum over the input per tap instead of a
    convolution."""
    if node.op == "fully_connected":
        return x.reshape(x.shape[0], -1).mean(axis=0, dtype=np.float64)
    a = node.attrs
    kh, kw = node.weight.shape[1:3]
    (sh, sw), (dh, dw) = a["strides"], a["dilations"]
    top, left = a["pads"][:2]
    ho, wo = _out_hw(node, x)
    total = x.sum(axis=0, dtype=np.float64)  # [H, W, C]: every tap sums over the samples
    out = np.zeros((kh, kw, x.shape[3]), np.float64)
    for ky in range(kh):
        rows = _tap_slice(ky * dh - top, sh, ho, x.shape[1])
        for kx in range(kw):
            cols = _tap_slice(kx * dw - left, sw, wo, x.shape[2])
            if rows is not None and cols is not None:  # else the tap reads only padding
                out[ky, kx] = total[rows, cols].sum(axis=(0, 1))
    return out / (x.shape[0] * ho * wo)


def _tap_slice(offset: int, stride: int, outputs: int, size: int) -> slice | None:
    """The input positions one tap reads, offset + i·stride for the outputs i in [0, outputs),
    that fall inside [0, size) (the rest read padding, zeros); None when none does."""
    first = max(0, -(offset // stride))  # ⌈−offset/stride⌉: the first i reading row ≥ 0
    last = min(outputs - 1, (size - 1 - offset) // stride)  # floor: negative when none fits
    if first > last:
        return None
    return slice(offset + first * stride, offset + last * stride + 1, stride)


def _mean_linear(node: Node, x: np.ndarray, w: np.ndarray) -> np.ndarray:
    """mean over samples and positions of `_linear(node, x, w)`, per output channel, from
    `mean_patch` (groups: each output channel against its own group's input channels)."""
    m = mean_patch(node, x)
    if node.op == "fully_connected":
        return w.reshape(w.shape[0], -1) @ m
    cout, kh, kw, cin_g = w.shape
    groups = node.attrs["groups"]
    mg = m.reshape(kh, kw, groups, cin_g).transpose(2, 0, 1, 3)  # [groups, KH, KW, cin_g]
    wg = w.reshape(groups, cout // groups, kh, kw, cin_g)
    return np.einsum("gyxc,goyxc->go", mg, wg).reshape(cout)


# -- AdaRound -----------------------------------------------------------------------------------

def layer_patches(node: Node, xs: list[np.ndarray], rows: int = ADAROUND_ROWS,
                  seed: int = 0) -> list[np.ndarray]:
    """The input patches each output channel's weights multiply, [groups, R, d] per input in
    `xs` (the same R positions for all, at most `rows`, drawn with a seeded generator);
    column order is the weights' (ky, kx, c_in) so row · w_c.reshape(−1) is one output."""
    if node.op == "fully_connected":
        flat = [x.reshape(x.shape[0], -1) for x in xs]
        pick = _pick(len(flat[0]), rows, seed)
        return [f[pick][None] for f in flat]
    a = node.attrs
    cout, kh, kw, cin_g = node.weight.shape
    groups = a["groups"]
    hw = _out_hw(node, xs[0])
    out = []
    n = xs[0].shape[0]
    pick = _pick(n * hw[0] * hw[1], rows, seed)
    ni, rest = np.divmod(pick, hw[0] * hw[1])
    hi, wi = np.divmod(rest, hw[1])
    for x in xs:
        win = windows(pad_nhwc(x, a["pads"]), (kh, kw), a["strides"], a["dilations"], hw)
        p = win[ni, hi, wi]  # R, C, KH, KW
        p = p.reshape(len(pick), groups, cin_g, kh, kw).transpose(1, 0, 3, 4, 2)
        out.append(np.ascontiguousarray(p.reshape(groups, len(pick), kh * kw * cin_g)))
    return out


def _pick(total: int, rows: int, seed: int) -> np.ndarray:
    """All row indices, or `rows` of them drawn without replacement (seeded), ascending."""
    if total <= rows:
        return np.arange(total)
    return np.sort(np.random.default_rng(seed).choice(total, rows, replace=False))


def _h(v: np.ndarray) -> np.ndarray:
    """Rectified sigmoid h(V) = clip(σ(V)(ζ − γ) + γ, 0, 1) (AdaRound Eq. 23)."""
    return np.clip(1.0 / (1.0 + np.exp(-v)) * (ZETA - GAMMA) + GAMMA, 0.0, 1.0)


def adaround_descent(v: np.ndarray, free: np.ndarray, forced: np.ndarray, floor: np.ndarray,
                     s: np.ndarray, cqq: np.ndarray, target: np.ndarray, e_near: float,
                     iters: int = ADAROUND_ITERS) -> np.ndarray:
    """AdaRound's `iters` Adam steps on V (`fit_adaround`'s docstring), returning the final V.

    Per step, with h = clip(r, 0, 1), r = σ(V)(ζ − γ) + γ, W̃ = s·(⌊w/s⌋ + h) on free weights:
    ∂/∂W̃ = 2(W̃ C̃ − W C)/E_nearest, ∂h/∂V = (ζ − γ)σ(1 − σ)·[0 < r < 1], and after the warm-up
    the regulariser's −β|u|^(β−1)·sign(u)·2 (u = 2h − 1) scaled by λ/#free. Every number is
    the same float64 operation, in the same order, as the plain array expressions; the steps
    write into buffers allocated once (no fresh pages per operation: MobileNetV2-1.0's
    1280 × 320 layer allocated ~40 arrays of 3.3 MB per step), and |u|^(β−1) is computed only
    where 0 < r < 1: elsewhere h is exactly 0 or 1, so |u| = 1 and the power is exactly 1.
    Weights that are not free keep V, m₁ = m₂ = 0 (their gradient is set to 0)."""
    v = v.copy()
    m1, m2 = np.zeros_like(v), np.zeros_like(v)
    count = max(int(free.sum()), 1)
    warm = int(iters * ADAROUND_WARMUP)
    fixed = None if free.all() else ~free
    sig, raw, h, wt, grad_w, dh, grad, tmp, power = (np.empty_like(v) for _ in range(9))
    inside, below = np.empty(v.shape, bool), np.empty(v.shape, bool)
    for it in range(iters):
        np.negative(v, out=sig)
        np.exp(sig, out=sig)
        np.add(1.0, sig, out=sig)
        np.divide(1.0, sig, out=sig)  # σ(V)
        np.multiply(ZETA - GAMMA, sig, out=raw)
        raw += GAMMA
        np.clip(raw, 0.0, 1.0, out=h)
        up = h if fixed is None else np.where(free, h, forced)
        np.add(floor, up, out=wt)
        np.multiply(s, wt, out=wt)
        np.matmul(wt, cqq, out=grad_w)
        grad_w -= target
        np.multiply(2.0, grad_w, out=grad_w)
        grad_w /= e_near
        np.greater(raw, 0, out=inside)
        np.less(raw, 1, out=below)
        inside &= below
        np.multiply(ZETA - GAMMA, sig, out=dh)
        np.subtract(1.0, sig, out=tmp)
        dh *= tmp
        dh *= inside
        np.multiply(grad_w, s, out=grad)
        grad *= dh
        if it >= warm:
            beta = ADAROUND_BETA[0] + (ADAROUND_BETA[1] - ADAROUND_BETA[0]) \
                * (it - warm) / max(iters - warm - 1, 1)
            np.multiply(2.0, h, out=tmp)
            tmp -= 1.0  # u
            power.fill(1.0)
            power[inside] = np.abs(tmp[inside]) ** (beta - 1.0)
            np.multiply(-beta, power, out=power)
            np.sign(tmp, out=tmp)
            power *= tmp
            power *= 2.0  # dreg
            np.multiply(ADAROUND_LAMBDA / count, power, out=power)
            power *= dh
            grad += power
        if fixed is not None:
            grad[fixed] = 0.0
        m1 *= 0.9
        np.multiply(0.1, grad, out=tmp)
        m1 += tmp
        m2 *= 0.999
        np.multiply(0.001, grad, out=tmp)
        tmp *= grad
        m2 += tmp
        np.divide(m1, 1 - 0.9 ** (it + 1), out=tmp)
        np.multiply(ADAROUND_LR, tmp, out=tmp)
        np.divide(m2, 1 - 0.999 ** (it + 1), out=grad)
        np.sqrt(grad, out=grad)
        grad += 1e-8
        tmp /= grad
        v -= tmp
    return v


def fit_adaround(node: Node, bits: int, xf: np.ndarray, xq: np.ndarray,
                 iters: int = ADAROUND_ITERS) -> tuple[np.ndarray | None, float]:
    """AdaRound's round-up flags for one layer's weights (IR shape), or None when they do not
    beat round-to-nearest on the calibration patches; and their error as a fraction of
    nearest's. `xf`: the float input, `xq`: the dequantised integer input (module docstring).

    Minimises E‖W x − W̃ x̃‖² / E_nearest + λ·mean(1 − |2h − 1|^β) over V by Adam (lr
    `ADAROUND_LR`, β₁ = 0.9, β₂ = 0.999), W̃ = s_c·(⌊w/s_c⌋ + h(V)); weights whose grid
    point below is already the top level (or below the bottom one) are fixed, since clamping
    makes their choice moot."""
    cout = node.weight.shape[0]
    pf, pq = layer_patches(node, [xf.astype(np.float64), xq])
    groups, rows, d = pq.shape
    pqt = pq.transpose(0, 2, 1)
    cqq = pqt @ pq / rows
    cfq = pf.transpose(0, 2, 1) @ pq / rows
    cff = pf.transpose(0, 2, 1) @ pf / rows
    w = node.weight.astype(np.float64).reshape(groups, cout // groups, d)
    floor, scale = rounding_floor(node.weight, bits)
    floor = floor.reshape(groups, cout // groups, d)
    s = scale.astype(np.float64).reshape(groups, cout // groups, 1)
    qmax = (1 << (bits - 1)) - 1
    target = w @ cfq  # W C: the cross term's gradient
    const = float(np.einsum("gcd,gde,gce->", w, cff, w))

    def error(wt: np.ndarray) -> tuple[float, np.ndarray]:
        a = wt @ cqq
        return float((a * wt).sum() - 2.0 * (target * wt).sum() + const), a

    def hard(up: np.ndarray) -> np.ndarray:
        return s * np.clip(floor + up, -qmax, qmax)

    nearest = np.clip(round_half_away(w / s) - floor, 0, 1)  # round-to-nearest's up/down
    e_near, _ = error(hard(nearest))
    if not e_near > 0:
        return None, 1.0
    free = (floor < qmax) & (floor >= -qmax)
    forced = (floor < -qmax).astype(np.float64)  # below the bottom level: must go up
    rest = np.clip(w / s - floor, 0.0, 1.0)
    v = -np.log((ZETA - GAMMA) / (np.clip(rest, 1e-6, 1 - 1e-6) - GAMMA) - 1.0)
    v = adaround_descent(v, free, forced, floor, s, cqq, target, e_near, iters)
    final = np.where(free, (_h(v) >= 0.5).astype(np.float64), forced)
    e_ada, _ = error(hard(final))
    if not e_ada < e_near:
        return None, e_ada / e_near
    return final.reshape(node.weight.shape).astype(bool), e_ada / e_near
