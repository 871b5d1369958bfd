"""Weight quantisation schemes and their storage formats (DESIGN §4.2, §7.4).

The integer reference always computes with a layer's decoded int8 weight values; a scheme only
decides which values a layer's weights take and how they are stored:

- ``linear``: mpq's default, symmetric per output channel (TFLite spec, DESIGN §4.1–4.2),
  stored as the signed b-bit values themselves (format LINEAR, b = 8, 4, 2).
- ``wentropy``: weighted-entropy quantisation (Park, Ahn, Yoo, "Weighted-Entropy-based
  Quantization for Deep Neural Networks", CVPR 2017, §3.1): 2^b levels per layer whose cluster
  boundaries maximise S = −Σ_n I_n P_n log P_n with importance w²; the representatives are
  re-quantised to int8 and stored as a per-layer codebook of 2^b entries, the weights as
  unsigned b-bit codes (format CODEBOOK, b = 4, 3, 2).
- ``sym``, ``asym``, ``pow2``: the data-free quantisers of Nayak, Zhang, Chai ("Bit Efficient
  Quantization for Deep Neural Networks", EMC² 2019, §3): symmetric (LINEAR at 8/4/2 bits,
  CODEBOOK with the two's-complement table at 3) and asymmetric (a weight zero point the kernels
  do not have: reference only), one scale per layer as in the paper, and power of two (format
  POW2, b = 4, 3, 2: values 0, ±2^e; the kernels look them up in a per-call value table like a
  codebook, since x·2^e ≡ x << e modulo 2^32 and a MAC costs one cycle on Cortex-M).

Per-channel normalisation (our addition, not in either paper): ``wentropy`` chooses
its levels and codes on w / max|w[o]|, each output channel o divided by its own largest
magnitude, and the layer keeps one codebook (one set of pow2 levels); channel o's weight scale is
max|w[o]| times the level scale. The per-channel scale is absorbed into the per-channel
requantisation multiplier the kernels already have, so it is exact and costs nothing on the MCU.
Why: one scale per layer lets the widest channel set the grid, and at 4 bits the narrow channels
collapse onto a level or two. Top-1 at 4 bits, 8-bit activations (benchmarks/weight_schemes.py),
per layer → per channel: KWS wentropy 0.680 → 0.828, pow2 0.561 → 0.569; the Fashion example
wentropy 0.760 → 0.774, pow2 0.713 → 0.316 (linear:4, per channel: 0.903 and 0.907). The
Fashion pow2 drop is not explained by weight error, which falls in every layer (‖W−Q‖²/‖W‖²
≈ 0.04 → 0.02–0.04); it is left open, and ``pow2`` therefore keeps the paper's one scale per
layer (`quantize_pow2(per_channel=True)` is the measured alternative). A wentropy plan records
``"normalise": "channel"`` in ``w_params`` (the max|w[o]| come from the model's weights).

Codes are packed by `mpq.quant.arith.pack` (code k in bits k·b … k·b+b−1 of a little-endian bit
stream). `encode` is the one place that turns a layer's values into what export writes and what
`mpq inspect --compress` measures.
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass
from typing import Any

import numpy as np

from mpq.errors import MpqError
from mpq.quant import arith

SCHEMES = ("linear", "wentropy", "sym", "asym", "pow2")
# Bits each scheme quantises to in the integer reference (eval) ...
REFERENCE_BITS = {"linear": (8, 7, 6, 5, 4, 3, 2), "wentropy": (4, 3, 2),
                  "sym": (8, 7, 6, 5, 4, 3, 2), "asym": (8, 7, 6, 5, 4, 3, 2),
                  "pow2": (4, 3, 2)}
# ... and the bits the kernels can store it at (search and export).
EXPORT_BITS = {"linear": (8, 4, 2), "wentropy": (4, 3, 2), "sym": (8, 4, 3, 2), "asym": (),
               "pow2": (4, 3, 2)}

# mpq_filter.format values (kernels/mpq_kernels.h: MPQ_WFMT_*).
FORMATS = ("MPQ_WFMT_LINEAR", "MPQ_WFMT_CODEBOOK", "MPQ_WFMT_POW2")
LINEAR, CODEBOOK, POW2 = range(3)

# Candidate cut positions of the exact boundary search; larger layers are searched on this many
# count quantiles, then refined at full resolution by the paper's incremental search.
WENTROPY_GRID = 512


@dataclass(frozen=True)
class WeightSpec:
    """A scheme at a bitwidth, plus what a plan recorded to rebuild it (`params`)."""

    scheme: str
    bits: int
    params: dict[str, Any] | None = None

    @property
    def label(self) -> str:
        return f"{self.scheme}:{self.bits}"


@dataclass
class QuantizedWeights:
    """One layer's weights under a scheme: real ≈ scale[c]·values (IR layout)."""

    values: np.ndarray  # int8 (int16 for asym: value = code − zero point)
    scale: np.ndarray  # float32 per output channel
    scheme: str
    bits: int
    codebook: np.ndarray | None = None  # int8, 2^b entries (wentropy)
    params: dict[str, Any] | None = None  # what the plan stores to rebuild exactly


@dataclass
class EncodedWeights:
    """What export writes for one layer: packed codes, the optional codebook, the format."""

    data: np.ndarray  # uint8, packed b-bit codes
    codebook: np.ndarray | None  # int8
    format: int

    @property
    def nbytes(self) -> int:
        return int(self.data.size + (0 if self.codebook is None else self.codebook.size))


def parse_weights(text: str, for_export: bool = False) -> WeightSpec:
    """`SCHEME:B` (e.g. ``wentropy:4``, ``pow2:4``, ``sym:6``) → a spec, or one clear line."""
    scheme, _, bits_text = text.partition(":")
    if scheme not in SCHEMES:
        raise MpqError(f"--weights: unknown scheme '{scheme}' (choose from "
                       f"{', '.join(SCHEMES)}; e.g. wentropy:4)")
    try:
        bits = int(bits_text) if bits_text else 8 if scheme in ("linear", "sym", "asym") else 4
    except ValueError:
        raise MpqError(f"--weights must be SCHEME:BITS (e.g. wentropy:4), not '{text}'") \
            from None
    spec = WeightSpec(scheme, bits)
    check_bits(spec)
    if for_export:
        check_exportable(spec, "--weights")
    return spec


def check_bits(spec: WeightSpec) -> None:
    """Refuse a bitwidth the scheme does not define."""
    allowed = REFERENCE_BITS.get(spec.scheme)
    if allowed is None:
        raise MpqError(f"unknown weight scheme '{spec.scheme}' (choose from "
                       f"{', '.join(SCHEMES)})")
    if spec.bits not in allowed:
        raise MpqError(f"{spec.scheme} weights take {', '.join(map(str, allowed))} bits, not "
                       f"{spec.bits}")


def check_exportable(spec: WeightSpec, where: str = "") -> None:
    """Refuse, in one line, a scheme/bitwidth the kernels cannot store (search and export)."""
    at = f"{where}: " if where else ""
    if spec.scheme == "asym":
        raise MpqError(f"{at}asymmetric weights are reference-only (the kernels have no weight "
                       "zero point); use them with `mpq eval`, or choose sym, pow2 or wentropy")
    allowed = EXPORT_BITS[spec.scheme]
    if spec.bits not in allowed:
        raise MpqError(f"{at}{spec.scheme} weights are stored at "
                       f"{', '.join(map(str, allowed))} bits, not {spec.bits}")


# -- the quantisers -----------------------------------------------------------------------------

def _per_channel(scale: float, cout: int) -> np.ndarray:
    return np.full(cout, scale, np.float32)


# The `w_params["normalise"]` value of per-channel normalised wentropy / pow2 weights.
CHANNEL = "channel"


def channel_max(w: np.ndarray) -> np.ndarray:
    """max|w[o]| of each output channel (axis 0) as float64; 1 for an all-zero channel, whose
    codes are all zero whatever the divisor (per-channel normalisation, module docstring)."""
    flat = np.abs(np.asarray(w, np.float64).reshape(np.shape(w)[0], -1))
    amax = flat.max(axis=1) if flat.shape[1] else np.zeros(flat.shape[0])
    return np.where(amax > 0, amax, 1.0)


def normalise_channels(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(w / max|w[o]| in float64, max|w[o]|): every output channel scaled to max magnitude 1."""
    amax = channel_max(w)
    return np.asarray(w, np.float64) / amax.reshape((-1,) + (1,) * (np.ndim(w) - 1)), amax


def channel_scales(amax: np.ndarray, level_scale: float) -> np.ndarray:
    """Weight scale of channel o: s_o = max|w[o]| · s_level as float32 (real ≈ s_o · value)."""
    return (np.asarray(amax, np.float64) * float(level_scale)).astype(np.float32)


def _check_normalise(params: dict[str, Any] | None, scheme: str) -> None:
    """Refuse params of a plan whose levels were chosen without per-channel normalisation."""
    if params is not None and params.get("normalise") != CHANNEL:
        raise MpqError(f"the plan's {scheme} weights were chosen per layer by an older mpq; run "
                       "`mpq search` again")


def quantize_sym(w: np.ndarray, bits: int) -> tuple[np.ndarray, np.ndarray]:
    """Nayak et al. §3 symmetric, one scale per layer: Δ = max|W|/(2^(b−1)−1) (float32),
    q = clamp(round_half_away(W/Δ), ±(2^(b−1)−1)). Returns (int8 values, scale per channel)."""
    qmax = arith.weight_qmax(bits)
    amax = float(np.abs(w).max()) if w.size else 0.0
    scale = float(np.float32(amax / qmax)) if amax > 0 else 1.0
    q = np.clip(arith.round_half_away(w.astype(np.float64) / scale), -qmax, qmax)
    return q.astype(np.int8), _per_channel(scale, w.shape[0])


def quantize_asym(w: np.ndarray, bits: int) -> tuple[np.ndarray, np.ndarray, int]:
    """Nayak et al. §3 asymmetric, one scale per layer: over [min(W,0), max(W,0)],
    Δ = (max − min)/(2^b − 1) (float32), z = clamp(round_half_away(−min/Δ), 0, 2^b − 1),
    u = clamp(round_half_away(W/Δ) + z, 0, 2^b − 1), real = Δ·(u − z).

    Returns (u − z as int16 — what a kernel with a weight zero point would multiply —, the
    scale per channel, z)."""
    top = (1 << bits) - 1
    lo = min(float(w.min()), 0.0) if w.size else 0.0
    hi = max(float(w.max()), 0.0) if w.size else 0.0
    if hi == lo:
        return np.zeros(w.shape, np.int16), _per_channel(1.0, w.shape[0]), 0
    scale = float(np.float32((hi - lo) / top))
    zp = int(np.clip(arith.round_half_away(-lo / scale), 0, top))
    u = np.clip(arith.round_half_away(w.astype(np.float64) / scale) + zp, 0, top)
    return (u - zp).astype(np.int16), _per_channel(scale, w.shape[0]), zp


def pow2_max_exponent(bits: int) -> int:
    """Largest exponent of the POW2 format: codes 1 … 2^(b−1)−1 carry e = 0 … 2^(b−1)−2."""
    return (1 << (bits - 1)) - 2


def quantize_pow2(w: np.ndarray, bits: int,
                  per_channel: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Nayak et al. §3 power-of-two quantisation, one scale per layer as in the paper (or, with
    `per_channel`, on per-channel normalised weights — measured worse, module docstring):
    levels 0 and ±2^e, e = 0 … E = 2^(b−1)−2, with Δ = max|W|/2^E so the layer's largest
    weight is the top level; the weight scale of every channel is Δ (float32).

    x = |W[o]|/Δ_o = 2^E·|W[o]|/max|W[o]| (in float64; 2^E is exact) takes e = round(log2 x)
    clipped to [0, E] — rounded in the log domain, i.e. at the geometric midpoints 2^(e+½),
    compared as constants so the result does not depend on a libm's log2 — and 0 below ½, the
    midpoint between 0 and the smallest power. (Nearest-level rounding, at 1.5·2^e, measured at
    4 bits with 8-bit activations and one scale per layer: KWS 0.191 against 0.561 with log
    rounding, the Fashion example 0.730 against 0.713; the paper's log rounding is kept.)
    """
    top = pow2_max_exponent(bits)
    if per_channel:
        wn, amax = normalise_channels(w)
    else:  # the paper's one scale per layer (the default: see the module docstring)
        peak = float(np.abs(np.asarray(w, np.float64)).max()) if np.size(w) else 0.0
        peak = peak if peak > 0 else 1.0
        wn, amax = np.asarray(w, np.float64) / peak, np.full(np.shape(w)[0], peak)
    x = np.abs(wn) * float(1 << top)
    mids = np.array([2.0 ** (e + 0.5) for e in range(top)], np.float64)
    e = np.searchsorted(mids, x, side="right")
    mag = np.where(x < 0.5, 0, np.left_shift(1, e))
    values = np.where(w < 0, -mag, mag)
    return values.astype(np.int8), channel_scales(amax, 1.0 / (1 << top))


@dataclass
class _Magnitudes:
    """Sorted distinct |w| of a layer with per-sign prefix counts and prefix sums of w²."""

    values: np.ndarray  # distinct magnitudes, ascending (float64)
    count: np.ndarray  # [2, m+1] prefix counts: row 0 w ≥ 0, row 1 w < 0
    square: np.ndarray  # [2, m+1] prefix sums of w²
    total: int


def _magnitudes(w: np.ndarray) -> _Magnitudes:
    flat = np.asarray(w, np.float64).reshape(-1)
    mags = np.abs(flat)
    values, inverse = np.unique(mags, return_inverse=True)
    m = len(values)
    count = np.zeros((2, m + 1), np.int64)
    square = np.zeros((2, m + 1), np.float64)
    for row, sel in enumerate((flat >= 0, flat < 0)):
        c = np.bincount(inverse[sel], minlength=m)
        count[row, 1:] = np.cumsum(c)
        square[row, 1:] = np.cumsum(c * values ** 2)
    return _Magnitudes(values, count, square, flat.size)


def _cluster_terms(mg: _Magnitudes, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """Σ over the two signed levels of magnitude cluster [lo, hi) of −I·P·ln P (Park et al.
    §3.1), with I·P = (Σ w²)/N and P = n/N; an empty level adds 0."""
    n = mg.count[:, hi] - mg.count[:, lo]
    q = mg.square[:, hi] - mg.square[:, lo]
    p = n / mg.total
    safe = np.where(n > 0, p, 1.0)
    return (-(q / mg.total) * np.log(safe)).sum(axis=0)


def weighted_entropy(w: np.ndarray, boundaries: list[float] | np.ndarray) -> float:
    """S = −Σ_n I_n P_n log P_n (Park et al. §3.1, Eq. 3) of the 2^b signed levels that the
    magnitude boundaries make: level (k, sign) holds the weights of that sign with
    boundaries[k−1] ≤ |w| < boundaries[k]; I_n is the mean importance w² of its weights and P_n
    their share of all weights."""
    flat = np.asarray(w, np.float64).reshape(-1)
    k = np.searchsorted(np.asarray(boundaries, np.float64), np.abs(flat), side="right")
    level = 2 * k + (flat < 0)
    n = np.bincount(level)
    q = np.bincount(level, weights=flat ** 2)
    used = n > 0
    p = n[used] / flat.size
    return float(-((q[used] / n[used]) * p * np.log(p)).sum())


def _exact_cuts(mg: _Magnitudes, positions: np.ndarray, clusters: int) -> list[int]:
    """The cut positions (indices into the distinct magnitudes) among `positions` that maximise
    S for `clusters` non-empty clusters: S is a sum of per-cluster terms, so dynamic programming
    over the candidate cuts finds the global maximum (O(clusters·P²)). Ties keep the earliest
    cut, so the result is deterministic."""
    p = len(positions)
    lo, hi = np.meshgrid(positions, positions, indexing="ij")
    valid = lo < hi
    terms = np.where(valid, _cluster_terms(mg, np.where(valid, lo, 0),
                                           np.where(valid, hi, 0)), -np.inf)
    best = terms[0].copy()  # best[c]: one cluster covering [0, positions[c])
    back = []
    for _ in range(clusters - 1):
        total = best[:, None] + terms
        arg = np.argmax(total, axis=0)
        back.append(arg)
        best = total[arg, np.arange(p)]
    cuts = []
    c = p - 1
    for arg in reversed(back):
        c = int(arg[c])
        cuts.append(int(positions[c]))
    return sorted(cuts)


def _refine_cuts(mg: _Magnitudes, cuts: list[int]) -> list[int]:
    """Park et al.'s Algorithm 1 incremental search: move each boundary, one at a time, to the
    position between its neighbours that maximises S, until S stops increasing."""
    m = len(mg.values)
    cuts = list(cuts)
    for _ in range(100):
        moved = False
        for k in range(len(cuts)):
            left = cuts[k - 1] if k else 0
            right = cuts[k + 1] if k + 1 < len(cuts) else m
            cand = np.arange(left + 1, right)
            if len(cand) < 2:
                continue
            s = _cluster_terms(mg, np.full_like(cand, left), cand) \
                + _cluster_terms(mg, cand, np.full_like(cand, right))
            here = int(np.searchsorted(cand, cuts[k]))
            j = int(np.argmax(s))
            if s[j] > s[here]:
                cuts[k] = int(cand[j])
                moved = True
        if not moved:
            break
    return cuts


def wentropy_boundaries(w: np.ndarray, bits: int) -> list[float]:
    """Magnitude boundaries of the 2^(b−1) clusters of |w| (each cluster is a ± pair of
    levels, 2^b levels in all) that maximise the weighted entropy S (Park et al. §3.1).

    Boundaries sit between distinct magnitudes, so a threshold test on |w| reproduces the
    clusters. Up to `WENTROPY_GRID` distinct magnitudes the search is exact (dynamic
    programming over every cut); beyond, it is exact over that many count quantiles, then the
    paper's incremental search refines each boundary at full resolution. Returns the smallest
    magnitude of clusters 1 … (at most 2^(b−1)−1 values; fewer when the layer has fewer
    distinct magnitudes)."""
    mg = _magnitudes(w)
    m = len(mg.values)
    clusters = min(1 << (bits - 1), m)
    if clusters <= 1:
        return []
    if m <= WENTROPY_GRID:
        positions = np.arange(m + 1)
        cuts = _exact_cuts(mg, positions, clusters)
    else:
        every = mg.count.sum(axis=0)
        targets = np.arange(WENTROPY_GRID + 1) * (mg.total / WENTROPY_GRID)
        positions = np.unique(np.concatenate([[0, m], np.searchsorted(every, targets)]))
        positions = positions[(positions >= 0) & (positions <= m)]
        cuts = _refine_cuts(mg, _exact_cuts(mg, positions, clusters))
    return [float(mg.values[c]) for c in cuts]


def wentropy_codebook(w: np.ndarray, boundaries: list[float], bits: int
                      ) -> tuple[np.ndarray, np.ndarray, float]:
    """Codes, int8 codebook and scale of a layer for given magnitude boundaries.

    Cluster k's representative r_k = √I_k (Park et al. Algorithm 1: the inverse importance of the
    cluster's mean importance); the representatives are re-quantised to int8 with one scale
    s = max r/127 (float32): c_k = round_half_away(r_k/s). Codebook entry h−1−k is −c_k and h+k
    is +c_k (h = 2^(b−1)); a weight of cluster k takes code h+k (w ≥ 0) or h−1−k (w < 0).
    Unused entries (a layer with fewer distinct magnitudes than clusters) repeat the top level.
    """
    flat = np.asarray(w, np.float64).reshape(-1)
    mags = np.abs(flat)
    h = 1 << (bits - 1)
    k = np.searchsorted(np.asarray(boundaries, np.float64), mags, side="right")
    used = len(boundaries) + 1
    sums = np.bincount(k, weights=mags ** 2, minlength=used)
    counts = np.bincount(k, minlength=used)
    if (counts[:used] == 0).any():
        raise MpqError("weighted-entropy boundaries leave a cluster empty (the plan does not "
                       "match the model's weights)")
    reps = np.sqrt(sums[:used] / counts[:used])
    top = float(reps.max()) if used else 0.0
    scale = float(np.float32(top / 127)) if top > 0 else 1.0
    levels = np.clip(arith.round_half_away(reps / scale), 0, 127).astype(np.int64)
    levels = np.concatenate([levels, np.full(h - used, levels[-1], np.int64)])
    codebook = np.concatenate([-levels[::-1], levels]).astype(np.int8)
    codes = np.where(flat < 0, h - 1 - k, h + k).reshape(np.shape(w))
    return codes.astype(np.uint8), codebook, scale


def quantize_wentropy(w: np.ndarray, bits: int, params: dict[str, Any] | None = None
                      ) -> QuantizedWeights:
    """Weighted-entropy weights (Park et al. §3.1) on per-channel normalised weights (module
    docstring): with w' = w / max|w[o]|, the boundary search of `wentropy_boundaries` over the
    whole layer's w' (or the boundaries a plan recorded, on that same scale), then
    `wentropy_codebook` of w'; channel o's weight scale is max|w[o]| · s.

    With recorded params, the rebuilt codebook must equal the recorded one."""
    _check_normalise(params, "wentropy")
    wn, amax = normalise_channels(w)
    if params is not None:
        boundaries = [float(b) for b in params["boundaries"]]
    else:
        boundaries = wentropy_boundaries(wn, bits)
    codes, codebook, scale = wentropy_codebook(wn, boundaries, bits)
    if params is not None and [int(v) for v in params["codebook"]] != codebook.tolist():
        raise MpqError("weighted-entropy codebook of the plan does not match the model's "
                       "weights; run `mpq search` again")
    values = codebook[codes.astype(np.int64)]
    return QuantizedWeights(values.astype(np.int8), channel_scales(amax, scale), "wentropy",
                            bits, codebook, {"normalise": CHANNEL, "boundaries": boundaries,
                                             "codebook": codebook.tolist()})


# The `w_params` key of linear weights whose rounding AdaRound chose (`mpq.quant.ptq`).
ROUNDING = "rounding"
ROUNDING_BITS = (4, 2)  # the weight bits AdaRound fits (8-bit rounding error is negligible)


def rounding_floor(w: np.ndarray, bits: int) -> tuple[np.ndarray, np.ndarray]:
    """(⌊w/s_c⌋ as float64, s_c float32) of per-channel symmetric weights: the grid point
    below each weight, which AdaRound's up/down choice adds 0 or 1 to; s_c is exactly
    `arith.quantize_weights_symmetric`'s scale."""
    _, scale = arith.quantize_weights_symmetric(w, bits)
    flat = np.asarray(w, np.float64).reshape(np.shape(w)[0], -1)
    return np.floor(flat / scale.astype(np.float64)[:, None]).reshape(np.shape(w)), scale


def pack_rounding(up: np.ndarray) -> str:
    """AdaRound's choices (1: round up) as text for the plan: one bit per weight in IR order,
    packed little-endian (`np.packbits(bitorder="little")`), base64."""
    bits = np.asarray(up, bool).reshape(-1).astype(np.uint8)
    return base64.b64encode(np.packbits(bits, bitorder="little").tobytes()).decode("ascii")


def unpack_rounding(text: str, count: int) -> np.ndarray:
    """The `count` round-up flags of `pack_rounding`'s text; MpqError when the text is not
    base64 of exactly ⌈count/8⌉ bytes with zero padding bits."""
    try:
        raw = base64.b64decode(text.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError, ValueError):
        raise MpqError("rounding is not base64 text") from None
    if len(raw) != (count + 7) // 8:
        raise MpqError(f"rounding holds {len(raw)} bytes; the layer's {count} weights need "
                       f"{(count + 7) // 8}")
    flags = np.unpackbits(np.frombuffer(raw, np.uint8), bitorder="little")
    if flags[count:].any():
        raise MpqError("rounding has padding bits set past the layer's last weight")
    return flags[:count].astype(bool)


def quantize_rounded(w: np.ndarray, bits: int, up: np.ndarray) -> np.ndarray:
    """Per-channel symmetric weight values with the given rounding:
    q = clamp(⌊w/s_c⌋ + up, ±(2^(b−1)−1)) (int8)."""
    floor, _ = rounding_floor(w, bits)
    qmax = arith.weight_qmax(bits)
    q = floor + np.asarray(up, np.float64).reshape(floor.shape)
    return np.clip(q, -qmax, qmax).astype(np.int8)


def quantize_weights(w: np.ndarray, spec: WeightSpec) -> QuantizedWeights:
    """One layer's weights under `spec` (axis 0 = output channel, IR layout)."""
    check_bits(spec)
    w = np.asarray(w, np.float32)
    if spec.scheme == "linear":
        q, s = arith.quantize_weights_symmetric(w, spec.bits)
        if spec.params is not None and ROUNDING in spec.params:
            if spec.bits not in ROUNDING_BITS:
                raise MpqError(f"AdaRound rounding is for {' and '.join(map(str, ROUNDING_BITS))}"
                               f"-bit weights, not {spec.bits}")
            up = unpack_rounding(spec.params[ROUNDING], w.size)
            return QuantizedWeights(quantize_rounded(w, spec.bits, up), s, "linear", spec.bits,
                                    params={ROUNDING: spec.params[ROUNDING]})
        return QuantizedWeights(q, s, "linear", spec.bits)
    if spec.scheme == "wentropy":
        return quantize_wentropy(w, spec.bits, spec.params)
    if spec.scheme == "sym":
        q, s = quantize_sym(w, spec.bits)
        return QuantizedWeights(q, s, "sym", spec.bits)
    if spec.scheme == "asym":
        q, s, zp = quantize_asym(w, spec.bits)
        return QuantizedWeights(q, s, "asym", spec.bits, params={"zero_point": zp})
    q, s = quantize_pow2(w, spec.bits)
    return QuantizedWeights(q, s, "pow2", spec.bits)


def relative_error(w: np.ndarray, spec: WeightSpec) -> float:
    """‖W − Q(W)‖²/‖W‖² of a scheme on one layer (the data-free accuracy proxy)."""
    q = quantize_weights(w, spec)
    deq = q.values.astype(np.float64) * q.scale.reshape((-1,) + (1,) * (w.ndim - 1))
    norm = float((np.asarray(w, np.float64) ** 2).sum())
    return float(((w - deq) ** 2).sum()) / norm if norm > 0 else 0.0


# -- storage ------------------------------------------------------------------------------------

def storage(scheme: str, bits: int) -> tuple[int, np.ndarray | None]:
    """(format, fixed codebook or None) of a scheme at b bits. sym at 3 bits has no LINEAR
    width, so it is a CODEBOOK whose table is the two's-complement decoding of the code."""
    if scheme in ("linear", "sym") and bits in (8, 4, 2):
        return LINEAR, None
    if scheme == "sym":
        u = np.arange(1 << bits)
        return CODEBOOK, np.where(u >= 1 << (bits - 1), u - (1 << bits), u).astype(np.int8)
    if scheme == "pow2":
        return POW2, None
    return CODEBOOK, None


def codebook_bytes(scheme: str, bits: int) -> int:
    """Flash a layer's codebook takes (0 when the format has none)."""
    fmt, _ = storage(scheme, bits)
    return (1 << bits) if fmt == CODEBOOK else 0


def pow2_codes(values: np.ndarray, bits: int) -> np.ndarray:
    """POW2 codes: 0 → 0; ±2^e → (sign << (b−1)) | (e + 1) (DESIGN §7.4)."""
    v = np.asarray(values, np.int64)
    mag = np.abs(v)
    e = np.zeros(v.shape, np.int64)
    nz = mag > 0
    e[nz] = np.log2(mag[nz]).round().astype(np.int64)
    if not np.array_equal(np.where(nz, 1 << e, 0), mag) or \
            (e[nz] > pow2_max_exponent(bits)).any():
        raise MpqError(f"weights are not 0 or ±2^e with e ≤ {pow2_max_exponent(bits)}")
    return np.where(nz, ((v < 0).astype(np.int64) << (bits - 1)) | (e + 1), 0)


def codebook_codes(values: np.ndarray, codebook: np.ndarray) -> np.ndarray:
    """The code of each value: the first codebook entry equal to it."""
    table = np.full(256, -1, np.int64)
    for u in range(len(codebook) - 1, -1, -1):
        table[int(codebook[u]) + 128] = u
    codes = table[np.asarray(values, np.int64) + 128]
    if (codes < 0).any():
        raise MpqError("a weight value is missing from its layer's codebook")
    return codes


def decode(codes: np.ndarray, fmt: int, bits: int, codebook: np.ndarray | None) -> np.ndarray:
    """The int8 value of each unsigned code, as the kernels decode it (DESIGN §7.4)."""
    u = np.asarray(codes, np.int64)
    if fmt == LINEAR:
        sign = 1 << (bits - 1)
        return ((u ^ sign) - sign).astype(np.int8)
    if fmt == CODEBOOK:
        return np.asarray(codebook, np.int8)[u]
    m = u & ((1 << (bits - 1)) - 1)
    mag = np.where(m > 0, 1 << np.maximum(m - 1, 0), 0)
    return np.where(u >> (bits - 1), -mag, mag).astype(np.int8)


def encode(values: np.ndarray, scheme: str, bits: int,
           codebook: np.ndarray | None = None, where: str = "") -> EncodedWeights:
    """A layer's stored form: b-bit codes packed by `arith.pack` plus its codebook, refusing
    a scheme the kernels cannot store. Decoding the result gives back `values` exactly."""
    check_exportable(WeightSpec(scheme, bits), where)
    fmt, fixed = storage(scheme, bits)
    table = fixed if fixed is not None else codebook
    if fmt == LINEAR:
        codes = np.asarray(values, np.int64) & ((1 << bits) - 1)
    elif fmt == POW2:
        codes = pow2_codes(values, bits)
    else:
        if table is None or len(table) != 1 << bits:
            raise MpqError(f"{where}: a {bits}-bit codebook needs {1 << bits} entries")
        codes = codebook_codes(values, table)
    return EncodedWeights(arith.pack(codes, bits),
                          None if table is None else np.asarray(table, np.int8), fmt)


def weight_blob(encoded: list[EncodedWeights]) -> bytes:
    """The exported weight blob: every layer's packed codes, then its codebook, in layer
    order (the `_w` and `_cb` arrays of mpq_weights.c)."""
    parts = []
    for e in encoded:
        parts.append(e.data.astype(np.uint8).tobytes())
        if e.codebook is not None:
            parts.append(e.codebook.astype(np.int8).tobytes())
    return b"".join(parts)


def compressed_sizes(blob: bytes) -> dict[str, int]:
    """Raw, gzip (level 9) and lzma (xz, preset 6) bytes of a blob — Nayak et al.'s "file
    size" measure of how far a weight format compresses further."""
    import gzip
    import lzma

    return {"raw": len(blob), "gzip": len(gzip.compress(blob, compresslevel=9, mtime=0)),
            "lzma": len(lzma.compress(blob))}


def require_linear_storage(layers: list[tuple[str, str, int]], backend: str) -> None:
    """Refuse, in one line, a backend that reads weights as plain signed values (CMSIS-NN)
    for layers (name, scheme, bits) stored as codebook or power-of-two codes."""
    for name, scheme, bits in layers:
        if storage(scheme, bits)[0] != LINEAR:
            raise MpqError(f"the {backend} backend takes linear weights only; layer '{name}' "
                           f"has {scheme}:{bits} weights (export with --backend portable)")
