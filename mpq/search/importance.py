"""Learned layer importance and one ILP over (b_w, b_a) — `mpq search --strategy importance`.

LIMPQ (Tang et al., "Mixed-Precision Neural Network Quantization via Learned Layer-wise
Importance", ECCV 2022; DESIGN §7.4, `shared/research/search-anchors.md` §2.5) observes that
the step size s an LSQ quantiser learns for a layer at b bits says how hard that layer is to
quantise at b bits, and allocates bits with one ILP:

    min Σ_l x_l[b_w, b_a]·(I^a_l(b_a) + α·I^w_l(b_w)),  α = 2,  subject to BitOPs (and size).

What we do, per MAC layer l (conv, depthwise, fully connected) with input x and weights W:

1. **Fit.** For every candidate b, an LSQ step size (Esser et al., "Learned Step Size
   Quantization", ICLR 2020) is fitted by `LSQ_STEPS` steps of Adam on the layer's output
   reconstruction error ‖f(x; W) − f(Q(x); W)‖²/‖f(x; W)‖² (activation quantiser, weights
   float) or ‖f(x; W) − f(x; Q(W))‖²/‖f(x; W)‖² (weight quantiser, activations float), f being
   the layer with its bias and fused clamp, on output positions sampled (seeded) from the float
   activations of the first `LSQ_SAMPLES` calibration samples. The quantisers are the ones the
   plan deploys: activations asymmetric with 2^b levels above the tensor's calibrated lower end
   (0 after a ReLU), weights symmetric per output channel in [−(2^(b−1)−1), 2^(b−1)−1] (one s
   per channel). The gradient of s is LSQ's straight-through one (`lsq_with_gradient`, their
   Eq. 3) times their scale g = 1/√(N·Q_P) (§2.2); Adam is invariant to that constant scale, so
   g is kept only to state the paper's gradient. Initial s is whichever of LSQ's 2⟨|v|⟩/√Q_P
   and the min/max step max|v|/Q_P reconstructs better (the loss is not convex in s at 2 bits,
   and LSQ's start alone can stall in a poor minimum there), and the best s seen is kept, so a
   fit never ends worse than the min/max step.
2. **Importance.** I^a_l(b) = s_a,l(b)/RMS(x_l − lo) and I^w_l(b) = mean over output channels
   c of s_c(b)/RMS(W_c): the fitted step in units of the signal it quantises. LIMPQ uses the raw
   s; its indicators come from a network trained with BatchNorm, whose pre-activations have
   comparable scales, while our graphs have BN folded into the weights and ReLU's positive
   homogeneity lets every layer carry an arbitrary scale, so raw steps would rank layers by
   that scale instead of by how hard they are to quantise, and α would weigh weight steps
   (~0.01) against activation steps (~0.1–1) by their units. Measured (top-1, raw → normalised):
   KWS with W 8/4/2 under half of int8's BitOPs 0.577 → 0.863; Fashion-CNN under 150 M BitOPs
   0.826 → 0.840, at 12,000 B SRAM 0.876 → 0.827; five other SRAM budgets on the two models
   gave identical plans.
   Lower bits give larger steps; a table entry that is not (LIMPQ's "wired" points, set to 1e8
   there) gets `WIRED_FACTOR` × the table's largest entry: large enough that the ILP avoids it,
   small enough that HiGHS's relative gap tolerance still separates the other entries.
3. **Allocation.** Bits are per tensor here, not per layer input: a feature map read by
   several layers, and the tensors tied to it (`driver.tie_groups`), take one bitwidth, so the
   activation cost of a group is Σ I^a_l(b) over the MAC layers reading any of its tensors (a
   group no MAC layer reads — a map feeding only softmax or an add — is fitted on itself, f =
   identity). Weight groups cost α·I^w_l(b). The ILP is `solvers.solve_exact` — the same true-
   liveness SRAM rows, Flash row and fragmentation bisection as `--strategy exact` — with this
   cost and, when `--bitops` is given, LIMPQ's BitOPs row Σ_l MACs_l·b_w·b_a ≤ budget (layers
   inside a patch stage counted with their recomputation factor, so the bound holds for the
   plan's predicted BitOPs). Without `--bitops` there is no BitOPs row: the budgets that exist
   on a microcontroller (SRAM, Flash) bind, and the ILP keeps as many bits as they allow.

Where we differ from the paper: LIMPQ learns all indicators jointly in a few epochs of
quantisation-aware training with random bit configurations, so each s also reflects the other
layers' quantisation noise and the task loss; we fit each quantiser alone, post-training, on its
own layer's reconstruction error, which takes seconds and needs no labels.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np

from mpq.errors import MpqError
from mpq.interpreter import pad_nhwc, run_graph, to_ir_layout, windows
from mpq.ir import Graph, Node, node_macs
from mpq.patch import PatchSchedule
from mpq.quant.calibrate import CalibrationStats, Dataset
from mpq.quant.qmodel import fixed_output_quant
from mpq.search.solvers import BitopsBudget, BitopsTerm, Group, Problem, Solution, solve_exact

ALPHA = 2.0  # LIMPQ's weight/activation balance α (search-anchors §2.5)
LSQ_STEPS = 200  # Adam steps per fitted step size
LSQ_SAMPLES = 32  # calibration samples whose float activations the fits see
LSQ_LR = 0.02  # Adam learning rate on s/s0 (cosine-decayed to 0)
# Sampled output rows per layer: about ROW_MACS MACs and ROW_INPUTS quantised inputs in all,
# clamped to [MIN_ROWS, MAX_ROWS]; a map fitted on itself gets IDENTITY_ROWS elements.
ROW_MACS = 1 << 17
ROW_INPUTS = 1 << 13
MIN_ROWS, MAX_ROWS = 16, 1024
IDENTITY_ROWS = 4096
SEED = 0
WIRED_FACTOR = 10.0


# -- LSQ (Esser et al., ICLR 2020) --------------------------------------------------------------

def lsq_quantize(v: np.ndarray, s: np.ndarray | float, qn: int, qp: int) -> np.ndarray:
    """LSQ's quantiser (their Eq. 1–2): v̂ = s·clip(round(v/s), Q_N, Q_P)."""
    return s * np.clip(np.round(v / s), qn, qp)


def lsq_with_gradient(v: np.ndarray, s: np.ndarray | float, qn: int, qp: int
                      ) -> tuple[np.ndarray, np.ndarray]:
    """v̂ (LSQ Eq. 1–2) and ∂v̂/∂s with the straight-through estimator (LSQ Eq. 3):
    −v/s + round(v/s) inside the range, Q_N below it and Q_P above it (= the clipped level)."""
    r = v / s
    q = np.clip(np.round(r), qn, qp)
    return s * q, q - r * ((r > qn) & (r < qp))


def lsq_grad_scale(n: int, qp: int) -> float:
    """LSQ's step-size gradient scale g = 1/√(N·Q_P), N the number of quantised values (§2.2)."""
    return 1.0 / math.sqrt(max(n, 1) * max(qp, 1))


def lsq_init(v: np.ndarray, qp: int, axis: int | None = None) -> np.ndarray:
    """LSQ's initial step 2⟨|v|⟩/√Q_P (§2.1)."""
    return 2.0 * np.abs(v).mean(axis=axis) / math.sqrt(qp)


def act_levels(bits: int) -> tuple[int, int]:
    """(Q_N, Q_P) of a b-bit asymmetric activation measured from its lower end: 2^b levels."""
    return 0, (1 << bits) - 1


def weight_levels(bits: int) -> tuple[int, int]:
    """(Q_N, Q_P) of b-bit symmetric weights, [−(2^(b−1)−1), 2^(b−1)−1] (DESIGN §4.1–4.2)."""
    q = (1 << (bits - 1)) - 1
    return -q, q


def adam_fit(loss_grad, s0: np.ndarray, steps: int = LSQ_STEPS, lr: float = LSQ_LR
             ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Minimise by Adam (β = 0.9, 0.999) on u = s/s0 with a cosine-decayed rate, B independent
    problems at once (axis 0 of s0: one per bitwidth). `loss_grad(s)` returns (loss[B],
    ∂loss/∂s). Returns the best s seen per problem, its loss, and the loss at s0."""
    u = np.ones_like(s0)
    m = np.zeros_like(s0)
    v = np.zeros_like(s0)
    b1, b2, eps = 0.9, 0.999, 1e-12
    best_s = s0.copy()
    best_loss = np.full(len(s0), np.inf)
    first = best_loss
    for t in range(steps + 1):
        s = s0 * u
        loss, grad = loss_grad(s)
        if t == 0:
            first = loss.copy()
        better = loss < best_loss
        best_s[better] = s[better]
        best_loss = np.where(better, loss, best_loss)
        if t == steps:
            break
        g = grad * s0
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        rate = lr * 0.5 * (1 + math.cos(math.pi * t / steps))
        mh, vh = m / (1 - b1 ** (t + 1)), v / (1 - b2 ** (t + 1))
        u = np.maximum(u - rate * mh / (np.sqrt(vh) + eps), 1e-4)
    return best_s, best_loss, first


def _better_start(loss_grad, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per bitwidth, whichever start reconstructs better (ties: the first)."""
    la, lb = loss_grad(a)[0], loss_grad(b)[0]
    pick = (la <= lb).reshape((-1,) + (1,) * (a.ndim - 1))
    return np.where(pick, a, b)


# -- one layer's data ---------------------------------------------------------------------------

@dataclass
class LayerSample:
    """Sampled rows of one MAC layer as a grouped matrix product: output y[g, p, o] =
    clamp(Σ_k x[g, p, k]·w[g, o, k] + bias[g, o]); padding taps are 0 with mask False."""

    name: str
    tensor: str  # the input activation tensor
    x: np.ndarray  # [G, P, K] float64
    mask: np.ndarray  # [G, P, K] bool: real input values (not padding)
    w: np.ndarray  # [G, O, K] float64
    bias: np.ndarray  # [G, 1, O]
    lo: float  # the input quantiser's lower end (calibrated min, ≤ 0)
    act_min: float
    act_max: float
    y: np.ndarray = field(init=False)
    energy: float = field(init=False)
    clamped: bool = field(init=False)
    padded: bool = field(init=False)

    def __post_init__(self) -> None:
        self.y = self.forward(self.x, self.w)
        self.energy = max(float((self.y ** 2).sum()), 1e-30)
        self.clamped = math.isfinite(self.act_min) or math.isfinite(self.act_max)
        self.padded = not bool(self.mask.all())

    def forward(self, x: np.ndarray, w: np.ndarray) -> np.ndarray:
        return np.clip(x @ w.transpose(0, 2, 1) + self.bias, self.act_min, self.act_max)

    def backward(self, x: np.ndarray, w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Relative reconstruction error and its gradient w.r.t. the pre-clamp output; `x` or
        `w` may carry a leading axis of bitwidths (one error each)."""
        z = x @ w.swapaxes(-1, -2) + self.bias
        r = (np.clip(z, self.act_min, self.act_max) if self.clamped else z) - self.y
        loss = (r * r).sum(axis=(-3, -2, -1)) / self.energy
        dz = (2.0 / self.energy) * r
        if self.clamped:
            dz *= (z > self.act_min) & (z < self.act_max)
        return loss, dz


def _rows(total: int, per_row_macs: int, per_row_inputs: int, rng: np.random.Generator
          ) -> np.ndarray:
    """Seeded sorted sample of output rows (the ROW_MACS/ROW_INPUTS bounds above)."""
    want = min(ROW_MACS // max(per_row_macs, 1), ROW_INPUTS // max(per_row_inputs, 1))
    want = min(total, max(MIN_ROWS, min(MAX_ROWS, want)))
    return np.sort(rng.choice(total, size=want, replace=False))


def layer_sample(node: Node, x: np.ndarray, lo: float, rng: np.random.Generator
                 ) -> LayerSample:
    """Sample output rows of a conv/fully connected node from its float input batch `x`."""
    a = node.attrs
    act_min, act_max = a.get("act_min", -math.inf), a.get("act_max", math.inf)
    w = node.weight.astype(np.float64)
    if node.op == "fully_connected":
        xs = x.reshape(len(x), -1).astype(np.float64)
        idx = _rows(len(xs), w.size, xs.shape[1], rng)
        xs = xs[idx][None]
        return LayerSample(node.name, node.inputs[0], xs, np.ones_like(xs, bool), w[None],
                           node.bias.astype(np.float64)[None, None], lo, act_min, act_max)
    cout, kh, kw, cin_g = w.shape
    groups = a["groups"]
    n, h, wd, c = x.shape
    ho, wo = _out_hw(node, h, wd)
    win = windows(pad_nhwc(x, a["pads"]), a["kernel"], a["strides"], a["dilations"], (ho, wo))
    ones = pad_nhwc(np.ones((1, h, wd, 1), np.float32), a["pads"])
    mwin = windows(ones, a["kernel"], a["strides"], a["dilations"], (ho, wo))
    idx = _rows(n * ho * wo, cout * kh * kw * cin_g, c * kh * kw, rng)
    s_i, y_i, x_i = np.unravel_index(idx, (n, ho, wo))
    p = len(idx)
    patches = np.asarray(win[s_i, y_i, x_i], np.float64)  # [P, C, KH, KW]
    patches = patches.reshape(p, groups, cin_g, kh, kw).transpose(1, 0, 3, 4, 2)
    mask = np.asarray(mwin[0, y_i, x_i, 0]) > 0  # [P, KH, KW]
    mask = np.broadcast_to(mask[None, :, :, :, None], (groups, p, kh, kw, cin_g))
    k = kh * kw * cin_g
    return LayerSample(node.name, node.inputs[0], patches.reshape(groups, p, k),
                       mask.reshape(groups, p, k).copy(), w.reshape(groups, cout // groups, k),
                       node.bias.astype(np.float64).reshape(groups, 1, cout // groups), lo,
                       act_min, act_max)


def _out_hw(node: Node, h: int, w: int) -> tuple[int, int]:
    from mpq.ir import conv_out_size

    a = node.attrs
    t, left, b, r = a["pads"]
    return (conv_out_size(h, a["kernel"][0], a["strides"][0], a["dilations"][0], t, b),
            conv_out_size(w, a["kernel"][1], a["strides"][1], a["dilations"][1], left, r))


def identity_sample(tensor: str, x: np.ndarray, lo: float, rng: np.random.Generator
                    ) -> LayerSample:
    """A map no MAC layer reads, fitted on itself: f = identity on sampled elements."""
    flat = x.reshape(-1).astype(np.float64)
    idx = np.sort(rng.choice(flat.size, size=min(flat.size, IDENTITY_ROWS), replace=False))
    xs = flat[idx].reshape(1, -1, 1)
    return LayerSample(f"identity:{tensor}", tensor, xs, np.ones_like(xs, bool),
                       np.ones((1, 1, 1)), np.zeros((1, 1, 1)), lo, -math.inf, math.inf)


# -- fits ---------------------------------------------------------------------------------------

@dataclass
class StepFit:
    """One fitted quantiser: its step(s), the normalised importance, the relative
    reconstruction error at the fitted step and at the starting step."""

    step: np.ndarray
    importance: float
    error: float
    error_init: float


def _levels(bits: tuple[int, ...], levels) -> tuple[np.ndarray, np.ndarray]:
    qs = [levels(b) for b in bits]
    shape = (len(bits), 1, 1, 1)
    return (np.array([q[0] for q in qs], np.float64).reshape(shape),
            np.array([q[1] for q in qs], np.float64).reshape(shape))


def fit_activation(sample: LayerSample, bits: tuple[int, ...], steps: int = LSQ_STEPS
                   ) -> dict[int, StepFit]:
    """LSQ step of the layer's input quantiser at each of `bits` (weights float), fitted side
    by side (the problems are independent)."""
    qn, qp = _levels(bits, act_levels)
    v = sample.x - sample.lo
    real = v[sample.mask]
    rms = float(np.sqrt((real ** 2).mean())) if real.size else 0.0
    if rms == 0.0:
        return {b: StepFit(np.zeros(1), 0.0, 0.0, 0.0) for b in bits}
    g = np.array([lsq_grad_scale(real.size, act_levels(b)[1]) for b in bits])
    keep = sample.mask.astype(np.float64)

    def loss_grad(s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        vq, dvq = lsq_with_gradient(v, s, qn, qp)
        xq = vq + sample.lo
        if sample.padded:  # padding taps stay exactly 0 (the zero point), as in the kernels
            xq *= keep
            dvq *= keep
        loss, dz = sample.backward(xq, sample.w)
        ds = ((dz @ sample.w) * dvq).sum(axis=(1, 2, 3))
        return loss, (g * ds).reshape(s.shape)

    lsq0 = np.array([lsq_init(real, act_levels(b)[1]) for b in bits]).reshape(qp.shape)
    s0 = _better_start(loss_grad, lsq0, float(real.max()) / qp)
    s, err, err0 = adam_fit(loss_grad, s0, steps)
    return {b: StepFit(s[i].reshape(1), float(s[i].item()) / rms, float(err[i]),
                       float(err0[i])) for i, b in enumerate(bits)}


def fit_weights(sample: LayerSample, bits: tuple[int, ...], steps: int = LSQ_STEPS
                ) -> dict[int, StepFit]:
    """LSQ steps (one per output channel) of the layer's weight quantiser at each of `bits`."""
    qn, qp = _levels(bits, weight_levels)
    w = sample.w
    rms = np.sqrt((w ** 2).mean(axis=2, keepdims=True))  # [G, O, 1]
    live = rms[..., 0] > 0
    if not live.any():
        return {b: StepFit(np.zeros(rms.shape[:2]), 0.0, 0.0, 0.0) for b in bits}
    safe = np.where(rms > 0, rms, 1.0)
    g = np.array([lsq_grad_scale(w.shape[2], weight_levels(b)[1]) for b in bits]
                 ).reshape(qp.shape)

    def loss_grad(s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        wq, dwq = lsq_with_gradient(w, s, qn, qp)
        loss, dz = sample.backward(sample.x, wq)
        dw = dz.swapaxes(-1, -2) @ sample.x  # [B, G, O, K]
        return loss, g * (dw * dwq).sum(axis=3, keepdims=True)

    amax = np.abs(w).max(axis=2, keepdims=True)
    lsq0 = np.where(rms > 0, lsq_init(w, 1, axis=2)[..., None], 1.0) / np.sqrt(qp)
    s0 = _better_start(loss_grad, lsq0, np.where(rms > 0, amax, 1.0) / qp)
    s, err, err0 = adam_fit(loss_grad, s0, steps)
    return {b: StepFit(s[i], float((s[i] / safe)[..., 0][live].mean()), float(err[i]),
                       float(err0[i])) for i, b in enumerate(bits)}


def minmax_activation_error(sample: LayerSample, bits: int) -> float:
    """Relative reconstruction error with TFLite's min/max step (max − lo)/(2^b − 1): the
    baseline an LSQ fit must beat."""
    qn, qp = act_levels(bits)
    v = sample.x - sample.lo
    s = float(v[sample.mask].max()) / qp
    xq = np.where(sample.mask, lsq_quantize(v, s, qn, qp) + sample.lo, 0.0)
    return float(sample.backward(xq, sample.w)[0])


# -- the table ----------------------------------------------------------------------------------

def _monotone(entries: dict[int, float], ceiling: float) -> dict[int, float]:
    """LIMPQ's wired points: an entry below the next higher bitwidth's becomes `ceiling`."""
    out = dict(entries)
    bits = sorted(entries, reverse=True)
    for hi, lo in zip(bits[:-1], bits[1:], strict=True):
        if entries[lo] < entries[hi]:
            out[lo] = ceiling
    return out


class ImportanceTable:
    """Fitted importances I^a (per MAC layer's input, or per map fitted on itself) at
    `act_bits` ∪ {8} and I^w (per MAC layer) at `weight_bits` ∪ {8, 4} (4: what a Flash
    shortage offers, `driver.build_problem`), each quantiser's bitwidths fitted together on
    first use and cached: the same inputs give the same table."""

    def __init__(self, graph: Graph, data: Dataset, stats: CalibrationStats,
                 act_bits: Iterable[int] = (8, 4, 2), weight_bits: Iterable[int] = (8,),
                 steps: int = LSQ_STEPS, samples: int = LSQ_SAMPLES) -> None:
        self.graph = graph
        self.act_bits = tuple(sorted(set(act_bits) | {8}, reverse=True))
        self.weight_bits = tuple(sorted(set(weight_bits) | {8, 4}, reverse=True))
        self.steps = steps
        self.samples = samples
        name = graph.inputs[0]
        batch = next(iter(data.batches(samples)), None)
        if batch is None:
            raise MpqError("strategy 'importance' needs at least one calibration sample")
        env = run_graph(graph, {name: to_ir_layout(graph, name, batch)}, keep=True)
        self.n_samples = len(batch)
        consumers = graph.consumers()
        self.readers = {t: [n.name for n in consumers[t] if node_macs(n, graph) > 0]
                        for t in graph.tensors}
        self._samples: dict[str, LayerSample] = {}
        for i, node in enumerate(graph.nodes):
            t = node.inputs[0] if node.inputs else None
            rng = np.random.default_rng([SEED, i])
            if node_macs(node, graph) > 0:
                self._samples[node.name] = layer_sample(node, env[t], _lower_end(stats, t), rng)
        for i, t in enumerate(graph.tensors):
            if not self.readers[t] and t not in graph.inputs:
                rng = np.random.default_rng([SEED, len(graph.nodes) + i])
                self._samples[f"identity:{t}"] = identity_sample(t, env[t], _lower_end(stats, t),
                                                                  rng)
        self._act: dict[tuple[str, int], StepFit] = {}
        self._w: dict[tuple[str, int], StepFit] = {}

    def sample(self, key: str) -> LayerSample:
        return self._samples[key]

    def act_fit(self, key: str, bits: int) -> StepFit:
        """Fit of the activation quantiser of MAC layer `key` (or `identity:<map>`)."""
        if (key, bits) not in self._act:
            fits = fit_activation(self._samples[key], self.act_bits, self.steps)
            self._act.update({(key, b): f for b, f in fits.items()})
        return self._act[(key, bits)]

    def weight_fit(self, node: str, bits: int) -> StepFit:
        """Fit of the weight quantiser of MAC layer `node`."""
        if (node, bits) not in self._w:
            fits = fit_weights(self._samples[node], self.weight_bits, self.steps)
            self._w.update({(node, b): f for b, f in fits.items()})
        return self._w[(node, bits)]

    def group_keys(self, tensors: Iterable[str]) -> list[str]:
        """The quantisers whose cost a group of tied tensors carries (module docstring, 3)."""
        keys = [n for t in tensors for n in self.readers[t]]
        if keys:
            return list(dict.fromkeys(keys))
        first = next(iter(tensors))
        return [f"identity:{first}"]

    def group_cost(self, tensors: Iterable[str], options: Iterable[int]) -> dict[int, float]:
        keys = self.group_keys(list(tensors))
        return {b: sum(self.act_fit(k, b).importance for k in keys) for b in options}

    def weight_cost(self, node: str, options: Iterable[int]) -> dict[int, float]:
        return {b: ALPHA * self.weight_fit(node, b).importance for b in options}

    def to_dict(self) -> dict:
        """The fitted entries, rounded (plan JSON): importance and relative error per bits."""
        def entry(f: StepFit) -> dict:
            return {"importance": _round(f.importance), "error": _round(f.error)}

        acts: dict[str, dict[str, dict]] = {}
        for (key, b), f in sorted(self._act.items()):
            acts.setdefault(key, {})[str(b)] = entry(f)
        weights: dict[str, dict[str, dict]] = {}
        for (key, b), f in sorted(self._w.items()):
            weights.setdefault(key, {})[str(b)] = entry(f)
        return {"activations": acts, "weights": weights, "alpha": ALPHA,
                "normalisation": "step / RMS of the quantised signal",
                "lsq": {"steps": self.steps, "samples": self.n_samples, "lr": LSQ_LR,
                        "optimiser": "adam", "seed": SEED, "row_macs": ROW_MACS,
                        "rows": [MIN_ROWS, MAX_ROWS]}}


def _round(v: float) -> float:
    return float(f"{v:.6g}")


def _lower_end(stats: CalibrationStats, tensor: str | None) -> float:
    """The activation quantiser's lower end: the calibrated min, widened to contain 0."""
    if tensor is None or tensor not in stats.tensors:
        return 0.0
    return min(float(stats.tensors[tensor].min), 0.0)


# -- the ILP ------------------------------------------------------------------------------------

def importance_problem(problem: Problem, table: ImportanceTable, graph: Graph,
                       stage_nodes: Iterable[str], stage_factor: float,
                       bitops_budget: int | None) -> Problem:
    """`problem` (the true-liveness SRAM and Flash model `driver.build_problem` made) with the
    LIMPQ cost — each group's score is −cost, maximised by `solve_exact` — and the optional
    BitOPs row (module docstring, 3). Ω (QBR's raise order) becomes the cost too."""
    groups = []
    for g in problem.groups:
        if g.name.startswith("weights:"):
            cost = table.weight_cost(g.name[len("weights:"):], g.options)
        else:
            cost = table.group_cost(g.tensors, g.options)
        groups.append(Group(g.name, g.tensors, g.options, {}, {}, g.flash, g.sram_free))
        groups[-1].omega = cost
    ceiling = WIRED_FACTOR * max([max(g.omega.values()) for g in groups] + [1e-12])
    for g in groups:
        g.omega = _monotone(g.omega, ceiling)
        g.score = {b: -c for b, c in g.omega.items()}
    bitops = None
    if bitops_budget is not None:
        bitops = BitopsBudget(bitops_terms(graph, groups, set(stage_nodes), stage_factor),
                              bitops_budget - 0.5)  # the plan rounds its overlap term
    return Problem(groups=groups, live=problem.live, size=problem.size, arena=problem.arena,
                   sram_budget=problem.sram_budget, flash_budget=problem.flash_budget,
                   flash_fixed=problem.flash_fixed, bitops=bitops)


def bitops_terms(graph: Graph, groups: list[Group], stage: set[str], stage_factor: float
                 ) -> list[BitopsTerm]:
    """One MACs·b_w·b_a term per MAC layer (DESIGN §7.1; b_a = the bits of its first input),
    patch-stage layers weighted by their recomputation factor as the plan's BitOPs are."""
    owner = {t: g.name for g in groups for t in g.tensors}
    weight_groups = {g.name[len("weights:"):] for g in groups if g.name.startswith("weights:")}
    terms = []
    for node in graph.nodes:
        macs = node_macs(node, graph)
        if not macs:
            continue
        factor = stage_factor if node.name in stage else 1.0
        wg = f"weights:{node.name}" if node.name in weight_groups else None
        terms.append(BitopsTerm(macs * factor, owner.get(node.inputs[0]), 8, wg, 8))
    return terms


def total_importance(table: ImportanceTable, graph: Graph, problem: Problem,
                     choice: dict[str, int]) -> float:
    """Σ cost of a whole allocation: the groups' costs at their choice plus, at 8 bits, the
    inputs of MAC layers that this schedule holds at 8 (VDPC's classified map), so totals are
    comparable across patch schedules (the driver keeps the smallest). Maps every schedule
    holds at 8 (graph inputs and outputs) are left out."""
    owned = {t for g in problem.groups for t in g.tensors}
    always = set(graph.inputs) | set(graph.outputs) \
        | {n.outputs[0] for n in graph.nodes if n.op == "softmax"}
    always |= {n.outputs[0] for n in graph.nodes if fixed_output_quant(n) is not None}
    total = sum(g.omega[choice[g.name]] for g in problem.groups)
    for node in graph.nodes:
        t = node.inputs[0] if node.inputs else None
        if node_macs(node, graph) > 0 and t not in owned and t not in always:
            total += table.act_fit(node.name, 8).importance
    return float(total)


class BitopsBudgetError(MpqError):
    """No allocation meets the BitOPs budget; `sram_needed` ranks it among the schedules'
    failures as `driver.BudgetError` does."""

    def __init__(self, message: str, sram_needed: int) -> None:
        super().__init__(message)
        self.sram_needed = sram_needed


def solve_importance(problem: Problem, table: ImportanceTable, graph: Graph,
                     schedule: PatchSchedule, bitops_budget: int | None, sram_floor: int
                     ) -> tuple[Problem, Solution]:
    """The LIMPQ ILP on one schedule (module docstring, 3): the cost problem, a one-line error
    naming the smallest BitOPs reachable when `bitops_budget` is below it, then `solve_exact`.
    `sram_floor` is the SRAM this schedule needs at its smallest bits."""
    patched = schedule.split_tensor is not None
    stage = schedule.stage_nodes if patched else []
    factor = schedule.stage_macs_patched / max(schedule.stage_macs_full, 1) if patched else 1.0
    problem = importance_problem(problem, table, graph, stage, factor, bitops_budget)
    if problem.bitops is not None:
        low = {g.name: min(g.options) for g in problem.groups}
        floor = int(round(problem.bitops.total(low)))
        if floor > bitops_budget:
            raise BitopsBudgetError(f"needs at least {floor:,} BitOPs with the smallest "
                                    f"candidate bits; --bitops is {bitops_budget:,}", sram_floor)
    try:
        return problem, solve_exact(problem)
    except MpqError:
        if problem.bitops is None:
            raise
        raise BitopsBudgetError(f"no allocation meets the SRAM and Flash budgets and "
                                f"{bitops_budget:,} BitOPs together", sram_floor) from None
