"""Value-driven patch classification (QuantMCU §III-A; DESIGN §6).

A value of the classified feature map is an outlier when it lies outside the central
probability mass φ of N(μ, σ²): |x − μ| > z·σ with z = Φ⁻¹((1 + φ)/2). (The paper's Eq. 1 writes
the test on the density with the inequality reversed; we use the mass reading.) A patch is
outlier-class when its region of the map holds at least `min_outliers` outliers; outlier
patches take the all-8-bit branch, the others the mixed-precision branch.

On the microcontroller the test runs on the map's 8-bit integers, so the thresholds are
integers: a value q is an outlier when q < lo or q > hi. The outlier rates reported per patch
position are measured on the calibration data with exactly that integer test on the integer
reference's own values of the map.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from statistics import NormalDist

import numpy as np

from mpq.ir import Graph
from mpq.quant.qmodel import ActQuant, QuantModel
from mpq.sim import quantize_input, run_int

VDPC_SLICE = 8  # samples the integer reference runs at once in `classify_rates`


def z_for_mass(phi: float) -> float:
    """z = Φ⁻¹((1 + φ)/2): half-width in σ of the central mass φ (φ = 0.96 ⇒ z ≈ 2.054)."""
    return NormalDist().inv_cdf((1.0 + phi) / 2.0)


def integer_thresholds(mu: float, sigma: float, z: float, q: ActQuant) -> tuple[int, int]:
    """Integer bounds (lo, hi) such that q is an outlier iff q < lo or q > hi.

    x = s·(q − zp) is an outlier iff x < μ − zσ or x > μ + zσ, i.e. q < zp + (μ − zσ)/s or
    q > zp + (μ + zσ)/s; the first integer not below / last not above those bounds.
    """
    s = float(np.float32(q.scale))
    lo = math.ceil(q.zero_point + (mu - z * sigma) / s)
    hi = math.floor(q.zero_point + (mu + z * sigma) / s)
    return int(lo), int(hi)


@dataclass
class VdpcResult:
    """What the plan records about the classification."""

    map: str
    phi: float
    z: float
    mu: float
    sigma: float
    lo: int
    hi: int
    min_outliers: int
    outlier_rate: list[list[float]]  # [i][j] fraction of calibration samples
    samples: int
    regions: list[list[tuple[int, int, int, int]]]  # [i][j] (y0, y1, x0, x1) of the map

    def to_dict(self) -> dict:
        return {"map": self.map, "phi": self.phi, "z": self.z, "mu": self.mu,
                "sigma": self.sigma, "lo_threshold": self.lo, "hi_threshold": self.hi,
                "min_outliers": self.min_outliers, "outlier_rate": self.outlier_rate,
                "samples": self.samples, "regions": [[list(r) for r in row]
                                                     for row in self.regions]}


def patch_outlier_counts(values: np.ndarray, lo: int, hi: int,
                         regions: list[list[tuple[int, int, int, int]]]) -> np.ndarray:
    """Outliers per sample and patch: count of q < lo or q > hi inside each region.

    `values` is [N, H, W, C]; regions are (y0, y1, x0, x1). Returns [N, n, n] counts.
    """
    out = (values < lo) | (values > hi)
    per_pixel = out.sum(axis=3)
    n = len(regions)
    counts = np.zeros((values.shape[0], n, len(regions[0])), np.int64)
    for i in range(n):
        for j, (y0, y1, x0, x1) in enumerate(regions[i]):
            counts[:, i, j] = per_pixel[:, y0:y1, x0:x1].sum(axis=(1, 2))
    return counts


def classify_rates(graph: Graph, qm: QuantModel, classified: str, mu: float, sigma: float,
                   phi: float, min_outliers: int,
                   regions: list[list[tuple[int, int, int, int]]],
                   batches: Iterable[np.ndarray]) -> VdpcResult:
    """Outlier rate per patch position on calibration data (DESIGN §6).

    The classified map is computed by the integer reference (8-bit, as on the device) for each
    batch of float inputs given in the IR layout.
    """
    z = z_for_mass(phi)
    q = qm.acts[classified]
    lo, hi = integer_thresholds(mu, sigma, z, q)
    name = graph.inputs[0]
    producer = next(i for i, n in enumerate(graph.nodes) if classified in n.outputs)
    sub = Graph(graph.name, graph.tensors, graph.nodes[:producer + 1], graph.inputs,
                [classified], graph.input_layouts, {})
    sub_qm = QuantModel(sub, qm.acts, qm.layers)
    hits = None
    total = 0
    for batch in batches:
        # Slices of a few samples: each sample's integers and counts are its own, so the
        # rates are those of the whole batch, without the batch's int64 temporaries.
        for start in range(0, len(batch), VDPC_SLICE):
            piece = batch[start:start + VDPC_SLICE]
            values = run_int(sub_qm, {name: quantize_input(qm.acts[name], piece)})[classified]
            counts = patch_outlier_counts(values, lo, hi, regions)
            flagged = (counts >= min_outliers).sum(axis=0)
            hits = flagged if hits is None else hits + flagged
            total += len(piece)
    if hits is None:
        hits = np.zeros((len(regions), len(regions[0])), np.int64)
    rates = (hits / max(total, 1)).round(6).tolist()
    return VdpcResult(classified, phi, z, mu, sigma, lo, hi, min_outliers, rates, total,
                      regions)
