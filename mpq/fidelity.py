"""How close a quantised model's outputs are to a reference's (DESIGN §7.4): the measures the
measured-sensitivity search minimises and `mpq eval` reports without labels.

Every function takes two batches of one output, real-valued (dequantised), with the sample on
axis 0, and returns one number over the batch. They are pure so that the search, `mpq eval`
and the tests compute the same thing.
"""

from __future__ import annotations

import math

import numpy as np

from mpq.errors import MpqError
from mpq.quant.calibrate import Dataset, dataset_from_array


def _rows(a: np.ndarray) -> np.ndarray:
    a = np.asarray(a, np.float64)
    return a.reshape(len(a), -1)


def softmax_rows(logits: np.ndarray) -> np.ndarray:
    """p_i = exp(z_i − max z) / Σ_j exp(z_j − max z), per sample (shifted: no overflow)."""
    z = _rows(logits)
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def as_distribution(y: np.ndarray, probabilities: bool) -> np.ndarray:
    """A classifier output as per-sample class probabilities: the output itself when the model
    ends in Softmax (renormalised, floored at 1e-12 so the log is finite), else softmax of the
    logits."""
    if not probabilities:
        return softmax_rows(y)
    p = np.maximum(_rows(y), 1e-12)
    return p / p.sum(axis=1, keepdims=True)


def kl_divergence(p_ref: np.ndarray, p: np.ndarray) -> float:
    """Mean over samples of KL(p_ref ‖ p) = Σ_i p_ref,i · log(p_ref,i / p_i), in nats
    (the output-distribution damage of DESIGN §7.4; 0 when the distributions agree)."""
    p_ref, p = _rows(p_ref), _rows(p)
    safe_ref = np.maximum(p_ref, 1e-12)
    terms = np.where(p_ref > 0, p_ref * (np.log(safe_ref) - np.log(np.maximum(p, 1e-12))), 0.0)
    return float(max(terms.sum(axis=1).mean(), 0.0))


def noise_to_signal(ref: np.ndarray, y: np.ndarray) -> float:
    """‖y − ref‖² / ‖ref‖² over the whole batch (the linear form of SQNR); the error energy
    alone when the reference is all zeros."""
    ref, y = _rows(ref), _rows(y)
    noise = float(np.sum((y - ref) ** 2))
    signal = float(np.sum(ref ** 2))
    return noise / signal if signal > 0 else noise


def sqnr_db(ref: np.ndarray, y: np.ndarray) -> float:
    """SQNR = 10·log10(‖ref‖² / ‖y − ref‖²) in dB over the batch; +inf when y equals ref."""
    nsr = noise_to_signal(ref, y)
    return math.inf if nsr == 0 else -10.0 * math.log10(nsr)


def cosine_similarity(ref: np.ndarray, y: np.ndarray) -> float:
    """Mean over samples of ⟨ref, y⟩ / (‖ref‖·‖y‖); a sample where either is all zeros counts
    1 if both are, else 0."""
    ref, y = _rows(ref), _rows(y)
    nr, ny = np.linalg.norm(ref, axis=1), np.linalg.norm(y, axis=1)
    dot = np.sum(ref * y, axis=1)
    both = (nr > 0) & (ny > 0)
    cos = np.where(both, dot / np.where(both, nr * ny, 1.0), (nr == 0) & (ny == 0))
    return float(np.mean(cos))


def top1_agreement(ref: np.ndarray, y: np.ndarray) -> float:
    """Fraction of samples whose argmax class is the same in both outputs."""
    return float(np.mean(_rows(ref).argmax(axis=1) == _rows(y).argmax(axis=1)))


def output_damage(ref: np.ndarray, y: np.ndarray, classifier: bool, probabilities: bool
                  ) -> float:
    """The damage of one output against the reference (DESIGN §7.4): for a classifier, the
    mean KL divergence of the class distributions; otherwise the noise-to-signal ratio. Both
    are 0 for identical outputs and grow with the error; the search sums them over outputs."""
    if classifier:
        return kl_divergence(as_distribution(ref, probabilities), as_distribution(y, probabilities))
    return noise_to_signal(ref, y)


def fidelity_summary(ref: np.ndarray, y: np.ndarray, classifier: bool) -> dict[str, float | None]:
    """The label-free measures of one output against a reference: top-1 agreement
    (classifiers only, else None), mean cosine similarity and SQNR in dB (None when exact,
    as JSON has no infinity; `exact` says so)."""
    sqnr = sqnr_db(ref, y)
    return {"top1_agreement": top1_agreement(ref, y) if classifier else None,
            "cosine": cosine_similarity(ref, y),
            "sqnr_db": None if math.isinf(sqnr) else sqnr,
            "exact": bool(np.array_equal(_rows(ref), _rows(y)))}


#: The measured search's sample counts: at least MIN_SAMPLES in --data; at most
#: MAX_MEASURED of them measured (the cost of every measurement grows with it).
MIN_SAMPLES = 16
MAX_MEASURED = 64


def validation_indices(n: int, where: str, cap: int = MAX_MEASURED) -> np.ndarray:
    """The samples the measured search runs each candidate on: min(n, cap) indices spread
    evenly over the file (round(i·n/m)), so a file sorted by class gives every class.
    MpqError below MIN_SAMPLES samples."""
    if n < MIN_SAMPLES:
        raise MpqError(f"{where}: {n} calibration samples are too few for the measured search; "
                       f"it needs at least {MIN_SAMPLES} (or choose --strategy exact)")
    m = min(n, cap)
    return np.unique((np.arange(m) * n) // m)


def validation_dataset(ds: Dataset) -> Dataset:
    """The validation samples of `ds` (`validation_indices`), in memory."""
    x = np.concatenate(list(ds.batches(256)))
    idx = validation_indices(len(x), str(ds.path))
    y = None if ds.y is None else np.asarray(ds.y)
    return dataset_from_array(x[idx], f"{ds.path} (validation samples)",
                              None if y is None or len(y) != len(x) else y[idx])
