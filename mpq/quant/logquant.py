"""Log-domain activation quantisation of Park et al. (CVPR 2017, §3.2) — reference only.

The paper's activation levels are 0 and powers of a base 2^(step/16): level i (i = 1 … N−1) is
2^((offset + (i−1)·step)/16) and a positive x takes level round((16·log2 x − offset)/step) + 1,
clipped to N−1, or 0 below level 1's rounding range. `offset` and `step` are chosen per tensor
to maximise the weighted entropy −Σ_{i≥1} r_i·P_i·ln P_i of the levels (importance of a level =
its value r_i, P_i = share of the positive values in it), searched on a histogram of log2 x at
1/16-octave resolution with step ∈ {2, 4, …, 32}/16 octave.

mpq's kernels are linear; these levels have no integer kernel. `mpq eval --act-quant log` runs
them as fake quantisation in float (the IR interpreter, weights dequantised from the same weight
scheme as the linear run) so their top-1 accuracy can be read beside the integer reference's.
Signed tensors (min < 0) use sign + magnitude: 2^(b−1) magnitude levels (with 0) and a sign.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np

from mpq.interpreter import OPS, to_ir_layout
from mpq.ir import Graph
from mpq.quant.arith import round_half_away
from mpq.quant.calibrate import Dataset

BASE = 16  # histogram bins per octave (the paper's 2^(1/16) resolution)
LOW = -40 * BASE  # lowest histogram bin: 2^-40; values below count there
BINS = 80 * BASE  # up to 2^40
MAX_HALF_STEP = 16  # step = 2·half ≤ 32/16 = 2 octaves


@dataclass(frozen=True)
class LogQuantizer:
    """One tensor's log levels: magnitude levels 0 and 2^((offset + k·step)/16), k < levels−1."""

    offset: int  # in 1/16 octaves
    step: int  # in 1/16 octaves, even
    levels: int  # magnitude levels including 0
    signed: bool

    def level_values(self) -> np.ndarray:
        """The non-zero magnitude levels, ascending."""
        k = np.arange(self.levels - 1)
        return np.exp2((self.offset + k * self.step) / BASE)

    def apply(self, x: np.ndarray) -> np.ndarray:
        """Fake-quantise: each value to its level (sign kept for signed tensors)."""
        x = np.asarray(x, np.float64)
        mag = np.abs(x) if self.signed else np.maximum(x, 0.0)
        pos = mag > 0
        idx = np.full(x.shape, -1, np.int64)
        idx[pos] = round_half_away((BASE * np.log2(mag[pos]) - self.offset) / self.step)
        idx = np.minimum(idx, self.levels - 2)
        value = np.where(idx >= 0, np.exp2((self.offset + idx * self.step) / BASE), 0.0)
        return (np.sign(x) * value if self.signed else value).astype(np.float32)


def log_histogram(x: np.ndarray) -> np.ndarray:
    """Counts of floor(16·log2|x|) over the non-zero values, bins LOW … LOW+BINS−1 (clamped)."""
    mag = np.abs(np.asarray(x, np.float64)).reshape(-1)
    mag = mag[mag > 0]
    g = np.clip(np.floor(BASE * np.log2(mag)).astype(np.int64) - LOW, 0, BINS - 1)
    return np.bincount(g, minlength=BINS)


def weighted_log_entropy(hist: np.ndarray, offset: int, step: int, levels: int) -> float:
    """−Σ_{i≥1} r_i·P_i·ln P_i of the log levels (Park et al. §3.2) on a `log_histogram`."""
    return float(_entropies(np.cumsum(hist), np.array([offset - LOW]), step // 2, levels)[0])


def _entropies(cum: np.ndarray, offsets: np.ndarray, half: int, levels: int) -> np.ndarray:
    """Weighted entropy for every offset (histogram bin units) at one step = 2·half: level i
    (1 … N−1) holds bins [offset + half·(2i−3), offset + half·(2i−1)); the top level holds
    everything above its lower edge."""
    total = float(cum[-1])

    def below(edge: np.ndarray) -> np.ndarray:
        return np.where(edge <= 0, 0, cum[np.clip(edge, 1, len(cum)) - 1])

    i = np.arange(1, levels)[None, :]
    lo = offsets[:, None] + half * (2 * i - 3)
    hi = np.where(i == levels - 1, len(cum), offsets[:, None] + half * (2 * i - 1))
    p = (below(hi) - below(lo)) / total
    r = np.exp2((offsets[:, None] + LOW + (i - 1) * 2 * half) / BASE)
    safe = np.where(p > 0, p, 1.0)
    return -(r * p * np.log(safe)).sum(axis=1)


def choose_log_levels(hist: np.ndarray, bits: int, signed: bool) -> LogQuantizer:
    """The paper's search: every step (2 … 32 sixteenths of an octave) and every offset whose
    top level starts inside the data's span; the largest weighted entropy wins (ties: the
    smaller step, then the smaller offset). A tensor without positive values gets level 0
    only."""
    levels = 1 << (bits - 1) if signed else 1 << bits
    nz = np.nonzero(hist)[0]
    if len(nz) == 0 or levels < 2:
        return LogQuantizer(0, 2, max(levels, 2), signed)
    cum = np.cumsum(hist)
    first, last = int(nz[0]), int(nz[-1])
    best: tuple[float, int, int] | None = None
    for half in range(1, MAX_HALF_STEP + 1):
        top = last - half * (2 * levels - 5)  # top level's lower edge must not pass the data
        offsets = np.arange(first, max(top, first) + 1)
        s = _entropies(cum, offsets, half, levels)
        j = int(np.argmax(s))
        if best is None or s[j] > best[0]:
            best = (float(s[j]), int(offsets[j]) + LOW, 2 * half)
    return LogQuantizer(best[1], best[2], levels, signed)


def collect_log_histograms(graph: Graph, data: Dataset, batch_size: int = 64
                           ) -> tuple[dict[str, np.ndarray], dict[str, bool]]:
    """Per tensor: the `log_histogram` of its float values over `data`, and whether it holds
    negative values (float IR interpreter)."""
    from mpq.interpreter import run_graph

    hists = {t: np.zeros(BINS, np.int64) for t in graph.tensors}
    signed = {t: False for t in graph.tensors}

    def observe(t: str, value: np.ndarray) -> None:
        hists[t] += log_histogram(value)
        signed[t] = signed[t] or bool((value < 0).any())

    name = graph.inputs[0]
    for batch in data.batches(batch_size):
        run_graph(graph, {name: to_ir_layout(graph, name, batch)}, observe=observe)
    return hists, signed


def run_log_quantised(graph: Graph, quantizers: dict[str, LogQuantizer],
                      weights: dict[str, np.ndarray], x_ir: np.ndarray,
                      input_fq: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
    """The first output of `run_log_quantised_outputs`, in the IR layout."""
    return run_log_quantised_outputs(graph, quantizers, weights, x_ir,
                                     input_fq)[graph.outputs[0]]


def run_log_quantised_outputs(graph: Graph, quantizers: dict[str, LogQuantizer],
                              weights: dict[str, np.ndarray], x_ir: np.ndarray,
                              input_fq: Callable[[np.ndarray], np.ndarray]
                              ) -> dict[str, np.ndarray]:
    """The float network with every node output fake-quantised by its tensor's log levels
    (softmax outputs excepted), the input by `input_fq` and the weights replaced by `weights`
    (dequantised). Returns every graph output in the IR layout, by name."""
    env = {graph.inputs[0]: input_fq(x_ir)}
    for node in graph.nodes:
        run_node = replace(node, weight=weights[node.name]) if node.name in weights else node
        y = OPS[node.op].run(run_node, [env[t] for t in node.inputs],
                             graph.tensors[node.outputs[0]].shape).astype(np.float32)
        q = quantizers.get(node.outputs[0])
        env[node.outputs[0]] = q.apply(y) if q is not None and node.op != "softmax" else y
    return {o: env[o] for o in graph.outputs}
