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
from mpq.ir import Graph
from mpq.quant.calibrate import Dataset


def _rows(a: np.ndarray) -> np.ndarray:
    a = np.asarray(a, np.float64)
    return a.reshape(len(a), -1)


def softmax_rows(logits: np.ndarray) -> np.ndarray:
    """p_i = exp(z_i − max z) / Σ_j exp(z_j − max z), per sample (shifted: no overflow)."""
    z = _rows(logits)
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


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


def sample_cosines(ref: np.ndarray, y: np.ndarray) -> np.ndarray:
    """⟨ref, y⟩ / (‖ref‖·‖y‖) per sample; a sample where either is all zeros gets 1 if both
    are, else 0."""
    ref, y = _rows(ref), _rows(y)
    nr, ny = np.linalg.norm(ref, axis=1), np.linalg.norm(y, axis=1)
    dot = np.sum(ref * y, axis=1)
    both = (nr > 0) & (ny > 0)
    return np.where(both, dot / np.where(both, nr * ny, 1.0), (nr == 0) & (ny == 0))


def cosine_similarity(ref: np.ndarray, y: np.ndarray) -> float:
    """Mean over samples of ⟨ref, y⟩ / (‖ref‖·‖y‖) (`sample_cosines`)."""
    return float(np.mean(sample_cosines(ref, y)))


def top1_agreement(ref: np.ndarray, y: np.ndarray) -> float:
    """Fraction of samples whose argmax class is the same in both outputs."""
    return float(np.mean(_rows(ref).argmax(axis=1) == _rows(y).argmax(axis=1)))


def output_damage(ref: np.ndarray, y: np.ndarray, classifier: bool) -> float:
    """The damage of one output against the reference (DESIGN §7.4): for a classifier, the
    mean KL divergence of the softmax of its logits; otherwise the noise-to-signal ratio.
    Both are 0 for identical outputs and grow with the error; the search sums them over
    outputs."""
    if classifier:
        return kl_divergence(softmax_rows(ref), softmax_rows(y))
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


class FidelitySums:
    """The running sums behind `fidelity_summary`, fed batch by batch (`mpq eval` streams its
    test set: only these few numbers per output and compared model stay in memory).

    Over the concatenated batches, `summary()` equals `fidelity_summary` up to float summation
    order: agreement = matching argmax / N, cosine = Σ per-sample cosine / N, and SQNR from the
    total noise ‖y − ref‖² and signal ‖ref‖² energies.
    """

    def __init__(self, classifier: bool) -> None:
        self.classifier = classifier
        self.samples = 0
        self.agree = 0
        self.cosine_sum = 0.0
        self.noise = 0.0
        self.signal = 0.0
        self.exact = True

    def add(self, ref: np.ndarray, y: np.ndarray) -> None:
        """Account one batch of the reference and the compared output (same shape)."""
        ref, y = _rows(ref), _rows(y)
        self.samples += len(ref)
        if self.classifier:
            self.agree += int(np.sum(ref.argmax(axis=1) == y.argmax(axis=1)))
        self.cosine_sum += float(np.sum(sample_cosines(ref, y)))
        self.noise += float(np.sum((y - ref) ** 2))
        self.signal += float(np.sum(ref ** 2))
        self.exact = self.exact and bool(np.array_equal(ref, y))

    def summary(self) -> dict[str, float | None]:
        """The measures of `fidelity_summary` over every batch added (at least one sample)."""
        if self.samples == 0:
            raise ValueError("FidelitySums.summary: no samples were added")
        nsr = self.noise / self.signal if self.signal > 0 else self.noise
        return {"top1_agreement": self.agree / self.samples if self.classifier else None,
                "cosine": self.cosine_sum / self.samples,
                "sqnr_db": None if nsr == 0 else -10.0 * math.log10(nsr),
                "exact": self.exact}


#: The values of `mpq eval --task`: `auto` applies `is_classifier`'s rule.
TASKS = ("auto", "classify", "regress")


def made_by_softmax(graph: Graph, output: str) -> bool:
    """Whether a Softmax node produces `output` (its values are probabilities already)."""
    return any(n.op == "softmax" and output in n.outputs for n in graph.nodes)


def is_classifier(graph: Graph, output: str, task: str = "auto") -> bool:
    """Whether `output` holds class scores, so that top-1 agreement (and accuracy against
    labels) means something. `task` "classify" or "regress" decides outright; "auto" applies
    this rule: the output is produced by a Softmax node, or its per-sample shape (sizes of 1
    dropped) is one axis of C values with 2 ≤ C < the input's per-sample element count.

    The bound on C keeps reconstructions out: an autoencoder (the anomaly-detection model
    AD01, [N, 640] → [N, 640]) outputs as many values as it reads and is not a classifier,
    while a classifier condenses its input into fewer class scores; a single value (C = 1) is
    a regression. A vector regression head with fewer values than its input (keypoints, a
    box) needs `--task regress`.
    """
    if task not in TASKS:
        raise MpqError(f"--task must be one of {', '.join(TASKS)}, not '{task}'")
    if task != "auto":
        return task == "classify"
    if made_by_softmax(graph, output):
        return True
    per_sample = [int(d) for d in graph.tensors[output].shape[1:] if int(d) != 1]
    inputs = int(np.prod(graph.tensors[graph.inputs[0]].shape[1:], dtype=np.int64))
    return len(per_sample) == 1 and 2 <= per_sample[0] < inputs


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


#: Multiply-accumulates the measured search spends per candidate run at most (MACs per
#: sample × samples): 64 samples of a KWS- or VWW-sized model, 8 of MobileNetV2-1.0@224.
MEASURE_MACS = 2 * 10**9
MIN_MEASURED = 8


def measured_samples(macs_per_sample: int) -> int:
    """How many samples each measurement runs: MEASURE_MACS / MACs per sample, within
    [MIN_MEASURED, MAX_MEASURED] — large models get fewer so a search stays in seconds."""
    return max(MIN_MEASURED, min(MAX_MEASURED, MEASURE_MACS // max(macs_per_sample, 1)))


def validation_inputs(ds: Dataset, cap: int = MAX_MEASURED) -> np.ndarray:
    """The inputs of the samples of `ds` the measured search runs on (`validation_indices`, at
    most `cap`), in memory."""
    x = np.concatenate(list(ds.batches(256)))
    return x[validation_indices(len(x), str(ds.path), cap)]
