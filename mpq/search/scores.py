"""The scores the bit search optimises, one per feature map and candidate bitwidth (DESIGN §7).

A *feature map* is an activation tensor of the IR; every node output is one (the graph inputs
are not scored). For map i and candidate activation bitwidth b:

- Φ(i, b), the compute saving (§7.1): ΔB(i, b) = Σ_{MAC layers l reading i} MACs_l·b_w,l·(32 − b),
  the BitOPs saved by running map i at b bits instead of 32. ``phi_norm="global"`` divides by
  B = Σ_l MACs_l·32·32 (the paper's normalisation), ``"map"`` by the map's own full-precision
  BitOPs B_i = Σ_{readers} MACs_l·b_w,l·32, so Φ = (32 − b)/32 ∈ [0.75, 0.9375] for b = 8…2.
- Ω(i, b), the information loss (§7.1): ΔH(i, b) = H_fp(i) − H(i, b), the drop in the Shannon
  entropy (natural log, k uniform bins spanning the map's calibrated range) when the map's
  calibration values are quantised to b bits and dequantised, over H(N, b_last), the entropy of
  the last feature map N at 8 bits (`normalising_map`: the graph's output, or the logits
  when the output is a softmax).
- S(i, b) = −λ·Ω(i, b) + (1 − λ)·Φ(i, b) (§7.1), larger is better.

The ``qe`` strategy (§7.3; `shared/research/search-anchors.md` §2.4) replaces Ω by the
data-free QE-Score: each MAC layer contributes qe_l = log[K_h·K_w·C_in·σ̂²(σ_A, b_x)·σ̂²(σ_W, b_W)
/σ_A²] + log σ_A², and Ω_qe(i, b) = Σ_{readers l of i} [qe_l(b_x = ∞) − qe_l(b_x = b)] / |QE(8)|.

Everything here is a pure function of the graph, the calibration statistics and the options:
the same inputs give identical dicts.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import cache

import numpy as np

from mpq.errors import MpqError
from mpq.ir import Graph, Node, node_macs
from mpq.quant.arith import choose_activation_params, qrange, round_half_away
from mpq.quant.calibrate import RANGE_METHODS, CalibrationStats, TensorStats, activation_range

FULL_BITS = 32  # the full-precision bitwidth BitOPs are measured against (§7.1)
DEFAULT_WEIGHT_BITS = 8  # QuantMCU is W8/A-mixed (§7)
DEFAULT_ACT_BITS = 8  # a tensor without a planned bitwidth runs at int8
OUTPUT_BITS = 8  # b_last: the bits of the output map that normalises Ω (§7.1)
PHI_NORMS = ("global", "map")
SIGMA_A = 5.0  # QE-Score activation σ (§7.3, tinynas config)
SIGMA_W = 4.0  # QE-Score weight σ (§7.3, tinynas config)
MIN_BITS, MAX_BITS = 2, 16


@dataclass
class MapScore:
    """Scores of one feature map for each candidate bitwidth (DESIGN §7.1).

    `phi`, `omega` and `score` are Φ(i, b), Ω(i, b) and S(i, b); `delta_bitops` is ΔB(i, b).
    For `vdqs_scores` `entropy_fp` is H_fp(i) and `entropy[b]` is H(i, b) (nats). For
    `qe_scores` they are the QE-Score terms of the map's readers, Σ_l qe_l at b_x = ∞ and at b.
    """

    name: str
    bits: tuple[int, ...]
    phi: dict[int, float]
    omega: dict[int, float]
    score: dict[int, float]
    entropy_fp: float
    entropy: dict[int, float]
    delta_bitops: dict[int, int]


# ------------------------------------------------------------------------------------------------
# Options
# ------------------------------------------------------------------------------------------------


def _check_candidates(candidates: Iterable[int]) -> tuple[int, ...]:
    """Candidate activation bitwidths, deduplicated, highest first; each in [2, 16] (§7)."""
    bits = tuple(sorted({int(b) for b in candidates}, reverse=True))
    if not bits:
        raise MpqError("no candidate bitwidths given (e.g. 8,4,2)")
    bad = [b for b in bits if not MIN_BITS <= b <= MAX_BITS]
    if bad:
        raise MpqError(f"candidate bitwidth {bad[0]} outside [{MIN_BITS}, {MAX_BITS}]")
    return bits


def _check_options(lam: float, phi_norm: str) -> None:
    """λ ∈ [0, 1] and a known Φ normalisation (§7.1)."""
    if not 0.0 <= lam <= 1.0:
        raise MpqError(f"lambda must be in [0, 1], not {lam}")
    if phi_norm not in PHI_NORMS:
        raise MpqError(f"unknown phi normalisation '{phi_norm}' (choose from "
                       f"{', '.join(PHI_NORMS)})")


def _check_weight_bits(graph: Graph, weight_bits: dict[str, int] | None) -> dict[str, int]:
    """Per-node weight bits (default 8, §7); names must be nodes of `graph`."""
    given = dict(weight_bits or {})
    names = {n.name for n in graph.nodes}
    for name, b in given.items():
        if name not in names:
            raise MpqError(f"weight bits given for '{name}', which is not a node of the graph")
        if not 1 <= int(b) <= FULL_BITS:
            raise MpqError(f"weight bits of '{name}' must be in [1, {FULL_BITS}], not {b}")
    return {n.name: int(given.get(n.name, DEFAULT_WEIGHT_BITS)) for n in graph.nodes}


def feature_maps(graph: Graph) -> list[str]:
    """The scored feature maps: every node output, in schedule order (graph inputs excluded)."""
    inputs = set(graph.inputs)
    return [t for n in graph.nodes for t in n.outputs if t not in inputs]


def mac_readers(graph: Graph) -> dict[str, list[tuple[Node, int]]]:
    """For every tensor, the MAC layers (MACs > 0) that read it, with their MACs (§7.1)."""
    out: dict[str, list[tuple[Node, int]]] = {t: [] for t in graph.tensors}
    for node in graph.nodes:
        macs = node_macs(node, graph)
        if macs > 0:
            for t in dict.fromkeys(node.inputs):  # a node reading a tensor twice counts once
                out[t].append((node, macs))
    return out


# ------------------------------------------------------------------------------------------------
# BitOPs and Φ (§7.1)
# ------------------------------------------------------------------------------------------------


def layer_bitops(graph: Graph, act_bits: dict[str, int],
                 weight_bits: dict[str, int] | None = None) -> dict[str, int]:
    """BitOPs of every node (§7.1): MACs·b_w·b_a, b_a the bits of the node's (first) input.

    Tensors missing from `act_bits` and nodes missing from `weight_bits` run at 8 bits; nodes
    without MACs (add, pooling, reshape, softmax, …) have 0 BitOPs.
    """
    wbits = _check_weight_bits(graph, weight_bits)
    out: dict[str, int] = {}
    for node in graph.nodes:
        macs = node_macs(node, graph)
        b_a = int(act_bits.get(node.inputs[0], DEFAULT_ACT_BITS)) if node.inputs else 0
        out[node.name] = macs * wbits[node.name] * b_a if macs else 0
    return out


def full_precision_bitops(graph: Graph) -> int:
    """B = Σ_layers MACs·32·32, the model's full-precision BitOPs (§7.1)."""
    return sum(node_macs(n, graph) for n in graph.nodes) * FULL_BITS * FULL_BITS


def delta_bitops(readers: Sequence[tuple[Node, int]], bits: int,
                 weight_bits: dict[str, int]) -> int:
    """ΔB(i, b) = Σ_{readers l} MACs_l·b_w,l·(32 − b): BitOPs saved at b bits vs 32 (§7.1)."""
    return sum(macs * weight_bits[node.name] * (FULL_BITS - bits) for node, macs in readers)


def map_bitops(readers: Sequence[tuple[Node, int]], weight_bits: dict[str, int]) -> int:
    """B_i = Σ_{readers l} MACs_l·b_w,l·32, the readers' BitOPs with map i at 32 bits (§7.1)."""
    return sum(macs * weight_bits[node.name] * FULL_BITS for node, macs in readers)


def phi(delta: int, norm: int) -> float:
    """Φ = ΔB/norm (norm = B for ``global``, B_i for ``map``); 0 when norm is 0 (§7.1)."""
    return delta / norm if norm > 0 else 0.0


def _phis(graph: Graph, bits: tuple[int, ...], phi_norm: str,
          wbits: dict[str, int]) -> dict[str, tuple[dict[int, int], dict[int, float]]]:
    """ΔB(i, b) and Φ(i, b) of every feature map (§7.1)."""
    readers = mac_readers(graph)
    total = full_precision_bitops(graph)
    out = {}
    for name in feature_maps(graph):
        norm = total if phi_norm == "global" else map_bitops(readers[name], wbits)
        deltas = {b: delta_bitops(readers[name], b, wbits) for b in bits}
        out[name] = (deltas, {b: phi(d, norm) for b, d in deltas.items()})
    return out


# ------------------------------------------------------------------------------------------------
# Entropy and Ω (§7.1)
# ------------------------------------------------------------------------------------------------


def histogram_entropy(counts: np.ndarray) -> float:
    """H = −Σ_j p̂_j ln p̂_j with p̂_j = counts_j/Σ counts (nats); 0 for an empty histogram."""
    c = np.asarray(counts, np.float64)
    total = float(c.sum())
    if total <= 0.0:
        return 0.0
    p = c[c > 0] / total
    return float(max(-(p * np.log(p)).sum(), 0.0))


def bin_centres(stats: TensorStats) -> np.ndarray:
    """Centres of the fine calibration histogram's bins over [hist_lo, hist_hi] (§4.3)."""
    n = len(stats.hist)
    return stats.hist_lo + (np.arange(n, dtype=np.float64) + 0.5) * stats.bin_width


def entropy_grid(stats: TensorStats, bins: int) -> tuple[float, int]:
    """The k-bin grid of §7.1's entropies: step δ and index offset j0 of `bins` uniform bins
    spanning the map's calibrated range R = [min, max] (widened to contain 0, as every range).

    Bin j is centred on the grid point (j + j0)·δ, δ = |R|/(k − 1), j0 = round(R_lo/δ): the grid
    is the k-level quantiser of R, anchored at 0 like every quantiser's grid. So for k = 2^b' the
    b-bit grids of R (b ≤ b', (2^b − 1) | (2^b' − 1)) are sub-grids whose rounding boundaries are
    bin boundaries, and a value quantised to such a grid lands on a bin centre, never on an edge.
    """
    lo, hi = min(stats.min, 0.0), max(stats.max, 0.0)
    step = (hi - lo) / (bins - 1)
    return step, int(round_half_away(lo / step))


def rebin(values: np.ndarray, counts: np.ndarray, step: float, offset: int,
          bins: int) -> np.ndarray:
    """Counts of `values` (each weighted by `counts`) in the bins of `entropy_grid`: bin
    round(x/δ) − j0; values beyond the range fall in the end bins (§7.1)."""
    idx = round_half_away(values / step) - offset
    idx = np.clip(idx, 0, bins - 1).astype(np.intp)
    return np.bincount(idx, weights=np.asarray(counts, np.float64), minlength=bins)


def fake_quantize(values: np.ndarray, scale: float, zero_point: int, bits: int) -> np.ndarray:
    """scale·(clamp(round(x/scale) + zp, qmin, qmax) − zp): quantise then dequantise (§4.1)."""
    qmin, qmax = qrange(bits)
    q = np.clip(round_half_away(values / scale) + zero_point, qmin, qmax)
    return scale * (q - zero_point)


def entropy_fp(stats: TensorStats, bins: int = 256) -> float:
    """H_fp(i): entropy of the map's float values in `bins` uniform bins spanning its
    calibrated range (`entropy_grid`) (§7.1).

    Built from the fine calibration histogram, each fine bin's count assigned by its centre.
    A constant map has entropy 0.
    """
    if not stats.max > stats.min:
        return 0.0
    step, offset = entropy_grid(stats, bins)
    return histogram_entropy(rebin(bin_centres(stats), stats.hist, step, offset, bins))


def entropy_quantized(stats: TensorStats, bits: int, bins: int = 256,
                      range_method: str = "minmax") -> float:
    """H(i, b): entropy of the map's b-bit quantised-then-dequantised values in the same bins
    as `entropy_fp` (§7.1).

    Each fine histogram bin centre is quantised with the asymmetric b-bit parameters of the
    map's range (`activation_range` with `range_method`, `choose_activation_params`) and its
    count lands in the bin of the dequantised value. A constant map has entropy 0.
    """
    if not stats.max > stats.min:
        return 0.0
    lo, hi = activation_range(stats, range_method, bits)
    scale, zp = choose_activation_params(lo, hi, bits)
    values = fake_quantize(bin_centres(stats), scale, zp, bits)
    step, offset = entropy_grid(stats, bins)
    return histogram_entropy(rebin(values, stats.hist, step, offset, bins))


def omega(h_fp: float, h_b: float, h_out: float) -> float:
    """Ω(i, b) = ΔH(i, b)/H(N, b_last) = (H_fp(i) − H(i, b))/H(N, b_last) (§7.1)."""
    return (h_fp - h_b) / h_out


def score(omega_ib: float, phi_ib: float, lam: float) -> float:
    """S(i, b) = −λ·Ω(i, b) + (1 − λ)·Φ(i, b) (§7.1)."""
    return -lam * omega_ib + (1.0 - lam) * phi_ib


def _map_stats(stats: CalibrationStats, name: str) -> TensorStats:
    """The statistics of one map; a clear error when the statistics lack it."""
    try:
        return stats.tensors[name]
    except KeyError:
        raise MpqError(f"calibration statistics have no tensor '{name}' (statistics made for "
                       "another model?)") from None


def normalising_map(graph: Graph) -> str:
    """N of §7.1, the map whose entropy normalises Ω: the last feature map of the network.

    That is the graph's first output, except that a trailing softmax is stepped over: its
    output is a probability vector (in TFLite int8 on a fixed 1/256 grid, whatever the data),
    not a feature map, and its few, sum-to-one values carry little entropy (VWW: 2 classes).
    """
    name = graph.outputs[0]
    producer = graph.producer().get(name)
    if producer is not None and producer.op == "softmax":
        return producer.inputs[0]
    return name


def vdqs_scores(graph: Graph, stats: CalibrationStats, candidates: Iterable[int] = (8, 4, 2),
                lam: float = 0.6, bins: int = 256, phi_norm: str = "global",
                weight_bits: dict[str, int] | None = None, range_method: str = "minmax",
                output: str | None = None,
                output_bits: int = OUTPUT_BITS) -> dict[str, MapScore]:
    """VDQS scores S(i, b) = −λ·Ω(i, b) + (1 − λ)·Φ(i, b) of every feature map (DESIGN §7.1).

    Ω uses the entropy of the calibration values (`entropy_fp`, `entropy_quantized`) normalised
    by H(N, b_last): N is `output` (default `normalising_map`) at `output_bits`. Φ follows
    `phi_norm` ("global": ΔB/B, "map": ΔB/B_i).
    """
    bits = _check_candidates(candidates)
    _check_options(lam, phi_norm)
    if bins < 2:
        raise MpqError(f"entropy needs at least 2 bins, not {bins}")
    if range_method not in RANGE_METHODS:
        raise MpqError(f"unknown range method '{range_method}' (choose from "
                       f"{', '.join(RANGE_METHODS)})")
    wbits = _check_weight_bits(graph, weight_bits)
    out_name = normalising_map(graph) if output is None else output
    out_bits = _check_candidates([output_bits])[0]
    h_out = entropy_quantized(_map_stats(stats, out_name), out_bits, bins, range_method)
    if h_out <= 0.0:
        raise MpqError(f"feature map '{out_name}' is constant over the calibration data "
                       "(entropy 0), so the entropy score cannot be normalised; use more "
                       "varied calibration data")
    phis = _phis(graph, bits, phi_norm, wbits)
    result: dict[str, MapScore] = {}
    for name in feature_maps(graph):
        s = _map_stats(stats, name)
        h_fp = entropy_fp(s, bins)
        h = {b: entropy_quantized(s, b, bins, range_method) for b in bits}
        om = {b: omega(h_fp, h[b], h_out) for b in bits}
        deltas, ph = phis[name]
        result[name] = MapScore(name, bits, ph, om, {b: score(om[b], ph[b], lam) for b in bits},
                                h_fp, h, deltas)
    return result


# ------------------------------------------------------------------------------------------------
# QE-Score (§7.3)
# ------------------------------------------------------------------------------------------------


def _upper_tail(x: float) -> float:
    """2·(1 − Φ_norm(x)) = erfc(x/√2), exact in the tail (Φ_norm the standard normal CDF)."""
    return math.erfc(x / math.sqrt(2.0))


@cache
def sigma_hat(sigma: float, bits: int) -> float:
    """σ̂(σ, N): std of N(0, σ²) rounded to unit steps and clipped to ±2^(N−1) (§7.3).

    Closed form (search-anchors §2.4): σ̂² = Σ_{k=1..B} k²·P_k, B = 2^(N−1),
    P_k = 2[Φ((k+½)/σ) − Φ((k−½)/σ)] for k < B and P_B = 2[1 − Φ((B−½)/σ)].
    """
    if not sigma > 0.0:
        raise MpqError(f"sigma must be positive, not {sigma}")
    if not 1 <= bits <= 30:
        raise MpqError(f"bits must be in [1, 30] for sigma_hat, not {bits}")
    top = 1 << (bits - 1)
    total = 0.0
    for k in range(1, top):
        p_k = _upper_tail((k - 0.5) / sigma) - _upper_tail((k + 0.5) / sigma)
        total += k * k * p_k
    total += top * top * _upper_tail((top - 0.5) / sigma)
    return math.sqrt(total)


def fan_in(node: Node) -> int:
    """K_h·K_w·C_in of a MAC layer (§7.3): conv KH·KW·Cin/groups (depthwise: C_in = 1 per group),
    fully connected K."""
    if node.weight is None:
        raise MpqError(f"node '{node.name}' ({node.op}) has no weights, so no QE-Score term")
    return int(math.prod(node.weight.shape[1:]))


def layer_qe(fan: int, act_bits: int | None, w_bits: int) -> float:
    """qe_l = log[K_h·K_w·C_in·σ̂²(σ_A, b_x)·σ̂²(σ_W, b_W)/σ_A²] + log σ_A² (§7.3).

    `act_bits` None means a full-precision input (σ̂ = σ_A).
    """
    s_x = SIGMA_A if act_bits is None else sigma_hat(SIGMA_A, act_bits)
    s_w = sigma_hat(SIGMA_W, w_bits)
    return math.log(fan * s_x * s_x * s_w * s_w / (SIGMA_A * SIGMA_A)) + math.log(SIGMA_A ** 2)


def qe_score(graph: Graph, act_bits: dict[str, int] | None = None,
             weight_bits: dict[str, int] | None = None) -> float:
    """QE(net) = Σ_{MAC layers l} qe_l, b_x the bits of l's input (8 where `act_bits` has none),
    b_W its weight bits (8 by default) (§7.3)."""
    abits = act_bits or {}
    wbits = _check_weight_bits(graph, weight_bits)
    total = 0.0
    for node in graph.nodes:
        if node_macs(node, graph) > 0:
            b_x = int(abits.get(node.inputs[0], DEFAULT_ACT_BITS))
            total += layer_qe(fan_in(node), b_x, wbits[node.name])
    return total


def qe_scores(graph: Graph, candidates: Iterable[int] = (8, 4, 2), lam: float = 0.6,
              phi_norm: str = "global",
              weight_bits: dict[str, int] | None = None) -> dict[str, MapScore]:
    """Data-free scores S_qe(i, b) = −λ·Ω_qe(i, b) + (1 − λ)·Φ(i, b) of every feature map (§7.3).

    Ω_qe(i, b) = Σ_{readers l of i} [qe_l(b_x = ∞) − qe_l(b_x = b)] / |QE(net at 8 bits)|, where
    "8 bits" means every activation at 8 bits and weights at `weight_bits` (default 8). In the
    returned `MapScore`, `entropy_fp` = Σ_readers qe_l(∞) and `entropy[b]` = Σ_readers qe_l(b).
    """
    bits = _check_candidates(candidates)
    _check_options(lam, phi_norm)
    wbits = _check_weight_bits(graph, weight_bits)
    norm = abs(qe_score(graph, None, wbits))
    readers = mac_readers(graph)
    phis = _phis(graph, bits, phi_norm, wbits)
    result: dict[str, MapScore] = {}
    for name in feature_maps(graph):
        terms = [(fan_in(node), wbits[node.name]) for node, _ in readers[name]]
        q_fp = sum((layer_qe(f, None, w) for f, w in terms), 0.0)
        q = {b: sum((layer_qe(f, b, w) for f, w in terms), 0.0) for b in bits}
        om = {b: (q_fp - q[b]) / norm if norm > 0 else 0.0 for b in bits}
        deltas, ph = phis[name]
        result[name] = MapScore(name, bits, ph, om, {b: score(om[b], ph[b], lam) for b in bits},
                                q_fp, q, deltas)
    return result
