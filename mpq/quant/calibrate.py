"""Streaming calibration statistics and activation range selection (DESIGN §4.3).

`mpq calibrate MODEL --data D -o stats.npz` runs the float network over calibration data and keeps,
for every activation tensor of the IR (the graph inputs and every node output), its min/max, mean
and σ, a fixed-bin histogram and the percentiles read from it. Memory does not grow with the number
of samples: the data is read batch by batch (``.npy`` files memory-mapped) and two passes are made,

- pass 1: min, max, count, mean and M2 = Σ(x − mean)² per tensor, batch statistics merged with
  Chan et al.'s parallel update (the numerically stable form of "sum and sum of squares");
- pass 2: a histogram of each tensor over the [min, max] found in pass 1.

When the data set is one batch, its [min, max] is known as soon as the batch has run, so both
are made on that one run (the same numbers, half the network runs).

Histogram bins sit on a grid anchored at zero (edges at integer multiples of the bin width), so a
signed histogram folds exactly into a histogram of |x| for the symmetric KL search.

Range methods (`activation_range`): ``minmax`` (TFLite's), ``percentile``, ``entropy`` (the
TensorRT KL-divergence threshold search with 2^(b−1) target levels for b bits) and ``mse`` (the
range whose b-bit quantiser has the least mean squared error on the histogram, `mse_range`).
Every range is widened to contain 0, which TFLite needs to be exactly representable.

Which engine computes the activations: onnxruntime on the normalised ONNX written by
`graph_to_onnx`, with every IR tensor added as a graph output. Measured on the VWW model
(``vww_96_float.onnx``, 256 random samples, batch 64, 2 shared CPU cores): one pass of the
network alone takes 0.37–0.46 s in onnxruntime against 2.2–2.9 s in the IR float interpreter
(ResNet-8 0.44 s vs 0.8 s, DS-CNN KWS 0.3 s vs 0.8 s); a whole `calibrate` (two passes plus the
statistics) 2.1–3.2 s against 6.8–7.4 s. onnxruntime is therefore the default; the interpreter
(``engine="interpreter"``) stays available as the reference. The statistics kept here (min,
max, moments, histograms) do not depend on the memory layout, so onnxruntime's NCHW tensors are
used as they come, without transposing to the IR's NHWC.
"""

from __future__ import annotations

import io
import math
import mmap
import os
import threading
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from mpq import limits
from mpq.errors import MpqError
from mpq.fileio import write_atomic
from mpq.ir import LAYOUT_NCHW, LAYOUT_NCW, Graph, graph_fingerprint
from mpq.quant.arith import qrange, round_half_away
from mpq.quant.finite import check_finite_activation, check_finite_parameters

if TYPE_CHECKING:
    import onnx

ENGINES = ("onnxruntime", "interpreter")
RANGE_METHODS = ("minmax", "percentile", "entropy", "mse")
MSE_CANDIDATES = 512  # clip points `mse_range` tries (the range in 1/512 steps)
DEFAULT_BINS = 2048
STATS_FORMAT = "mpq-calibration"
STATS_VERSION = 1
_STATS_KEYS = ("format", "version", "fingerprint", "samples", "names", "min", "max", "mean",
               "std", "count", "hist_lo", "hist_hi", "hist")

Visit = Callable[[str, np.ndarray], None]
_FLOAT32_MAX = float(np.finfo(np.float32).max)
_BIN_CHUNK = 1 << 18  # values binned per step: temporaries of a few MB, kept in cache
# onnxruntime runs a batch in slices of about this many bytes of activations (all exposed
# tensors of the slice together), holding whole-batch values of groups of tensors of about
# _GROUP_BYTES at once; see `_ort_runner`.
_SLICE_BYTES = 128 << 20
_GROUP_BYTES = 512 << 20
#: Tensors of one onnxruntime group whose statistics are taken at once (threads): one per core,
#: at most two. Each tensor's moments and histogram are its own (`calibrate`'s observers keep
#: per-tensor state and per-thread scratch), so the numbers are those of one at a time.
VISIT_WORKERS = max(1, min(2, os.cpu_count() or 1))


def _visit_all(visit: Visit, items: list[tuple[str, np.ndarray]]) -> None:
    """`visit(t, value)` for every item, VISIT_WORKERS at a time: numpy's reductions on
    whole tensors release the GIL. The first failing item (in order) raises, as in a loop."""
    if VISIT_WORKERS < 2 or len(items) < 2:
        for t, value in items:
            visit(t, value)
        return
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(VISIT_WORKERS) as pool:
        list(pool.map(lambda item: visit(*item), items))


# ------------------------------------------------------------------------------------------------
# Data sets
# ------------------------------------------------------------------------------------------------


@dataclass
class _Part:
    """One stored array of the data set: an npz member or one ``.npy`` file (maybe mmapped)."""

    label: str  # how messages name it: "calib.npz" or "calib/img_003.npy"
    array: np.ndarray


def onnx_input_shape(graph: Graph) -> tuple[int, ...]:
    """Per-sample shape of the graph's input in the ONNX model's layout (batch axis dropped).

    The IR holds rank-4 inputs as NHWC; an NCHW ONNX input is (C, H, W) per sample.
    """
    name = graph.inputs[0]
    shape = tuple(graph.tensors[name].shape)
    if graph.input_layouts.get(name) == LAYOUT_NCHW and len(shape) == 4:
        return (shape[3], shape[1], shape[2])
    if graph.input_layouts.get(name) == LAYOUT_NCW and len(shape) == 4:
        return (shape[3], shape[2])
    return shape[1:]


def _guess_sample_shape(parts: list[_Part], from_npz: bool) -> tuple[int, ...]:
    """The per-sample shape before the model is known: npz ``x`` is always a batch; in a folder
    equal shapes mean one sample per file, shapes differing only in the first axis mean batches."""
    shapes = [tuple(p.array.shape) for p in parts]
    if from_npz:
        return shapes[0][1:]
    if len(set(shapes)) == 1:
        return shapes[0]
    if len({s[1:] for s in shapes}) == 1:
        return shapes[0][1:]
    return min(shapes, key=len)


class Dataset:
    """Calibration samples read lazily in the ONNX model's input layout, plus optional labels.

    Each stored array is one sample (its shape is the per-sample shape) or a batch (a leading
    sample axis). `check_dataset` fixes the per-sample shape from the model; before that it is
    guessed (see `_guess_sample_shape`).
    """

    def __init__(self, path: Path, parts: list[_Part], y: np.ndarray | None,
                 from_npz: bool) -> None:
        self.path = path
        self.parts = parts
        self.y = y
        self.sample_shape = _guess_sample_shape(parts, from_npz) if parts else ()

    def _as_batch(self, part: _Part) -> np.ndarray:
        """A stored array with a leading sample axis (a single sample gets one)."""
        a = part.array
        if tuple(a.shape) == self.sample_shape:
            return a.reshape((1, *a.shape))
        return a

    def __len__(self) -> int:
        return sum(len(self._as_batch(p)) for p in self.parts)

    def batches(self, batch_size: int) -> Iterator[np.ndarray]:
        """Yield float32 batches of at most `batch_size` samples, in file order.

        Samples are checked for NaN/Inf as they stream past; the error names the file and the
        sample index inside it.
        """
        if batch_size < 1:
            raise MpqError(f"batch size must be at least 1, not {batch_size}")
        pending: list[np.ndarray] = []
        filled = 0
        for part in self.parts:
            arr = self._as_batch(part)
            start = 0
            while start < len(arr):
                take = min(batch_size - filled, len(arr) - start)
                pending.append(_finite_float32(arr[start:start + take], part.label, start))
                filled += take
                start += take
                if filled == batch_size:
                    yield _join(pending)
                    pending, filled = [], 0
        if pending:
            yield _join(pending)


def _join(pieces: list[np.ndarray]) -> np.ndarray:
    """One batch from the pieces gathered across files (no copy for a single piece)."""
    return pieces[0] if len(pieces) == 1 else np.concatenate(pieces)


def _finite_float32(piece: np.ndarray, label: str, first: int) -> np.ndarray:
    """`piece` as float32 (integers converted as is, no scaling); MpqError on NaN/Inf."""
    with np.errstate(over="ignore"):  # float64 beyond float32's range becomes Inf: caught below
        out = np.ascontiguousarray(piece, dtype=np.float32)
    if piece.dtype.kind == "f":
        bad = ~np.isfinite(out.reshape(len(out), -1)).all(axis=1)
        if bad.any():
            i = int(np.argmax(bad))
            what = "NaN" if np.isnan(out[i]).any() else "Inf"
            raise MpqError(f"{label}: sample {first + i} contains {what}; calibration data "
                           "must be finite")
    return out


def _check_dtype(label: str, array: np.ndarray) -> None:
    """Only float and integer data is calibration data (integers are used as is)."""
    if array.dtype.kind not in "iuf":
        raise MpqError(f"{label}: has dtype {array.dtype}; calibration data must be numbers "
                       "(float or integer)")


def _load_npy(path: Path) -> np.ndarray:
    """A memory-mapped ``.npy`` (read lazily, batch by batch)."""
    limits.check_data_file(path)
    try:
        return np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError, EOFError) as exc:
        raise MpqError(f"{path}: {_unreadable('.npy', exc)}") from None


def _load_npz(path: Path) -> tuple[np.ndarray, np.ndarray | None]:
    """``x`` and the optional ``y`` of an ``.npz`` (members cannot be mapped: read once)."""
    limits.check_data_file(path)
    try:
        z = np.load(path, allow_pickle=False)
        if not isinstance(z, np.lib.npyio.NpzFile):
            raise MpqError(f"{path}: not an .npz archive (a single .npy array?)")
        with z:
            if "x" not in z.files:
                found = ", ".join(z.files) or "nothing"
                raise MpqError(f"{path}: no array 'x' (calibration inputs) in the archive; "
                               f"found {found}")
            x = z["x"]
            y = z["y"] if "y" in z.files else None
    except MpqError:
        raise
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise MpqError(f"{path}: {_unreadable('.npz', exc)}") from None
    return x, y


def _unreadable(kind: str, exc: Exception) -> str:
    """Why numpy refused a data file, in words: an object array needs unpickling, which mpq
    never does (a pickle runs code), so it gets its own message."""
    if "Object arrays" in str(exc) or "Python objects" in str(exc):
        return ("holds Python objects (a pickled array); mpq reads numeric arrays only, "
                "save x and y as numbers")
    return f"not a readable {kind} file ({type(exc).__name__})"


def dataset_from_array(x: np.ndarray, label: str, y: np.ndarray | None = None) -> Dataset:
    """A data set held in memory (a batch in the ONNX input layout), e.g. synthetic inputs."""
    return Dataset(Path(label), [_Part(label, np.asarray(x))], y, from_npz=True)


def load_dataset(path: str | Path, graph: Graph | None = None) -> Dataset:
    """Open calibration data: an ``.npz`` with ``x`` (and optional ``y``), a folder of ``.npy``
    files (sorted by name; each one sample or a batch), or a single ``.npy`` batch.

    With `graph`, `check_dataset` runs at once. An empty data set is an MpqError.
    """
    p = Path(path)
    if not p.exists():
        raise MpqError(f"{path}: no such file or directory")
    y = None
    if p.is_dir():
        files = sorted(f for f in p.iterdir() if f.suffix == ".npy" and f.is_file())
        parts = [_Part(str(f), _load_npy(f)) for f in files]
        from_npz = False
    elif p.suffix == ".npy":
        parts = [_Part(str(p), _load_npy(p))]
        from_npz = True
    else:
        x, y = _load_npz(p)
        parts = [_Part(str(p), x)]
        from_npz = True
        if x.ndim == 0:
            raise MpqError(f"{path}: 'x' is a scalar; it must hold samples along its first axis")
    for part in parts:
        _check_dtype(part.label, part.array)
    ds = Dataset(p, parts, y, from_npz)
    if not parts or len(ds) == 0:
        raise MpqError(f"{path}: empty data set (no calibration samples)")
    if y is not None and y.ndim == 0:
        raise MpqError(f"{path}: 'y' is a scalar; it must hold one label per sample")
    if y is not None and len(y) != len(ds):
        raise MpqError(f"{path}: 'y' has {len(y)} labels for {len(ds)} samples in 'x'")
    if graph is not None:
        check_dataset(ds, graph)
    return ds


def check_dataset(ds: Dataset, graph: Graph) -> None:
    """Check every stored array against the model's per-sample input shape (ONNX layout) and fix
    the data set's per-sample shape to it. Errors name the file and both shapes."""
    if len(graph.inputs) != 1:
        raise MpqError(f"model has {len(graph.inputs)} inputs; calibration supports "
                       "single-input models")
    expected = onnx_input_shape(graph)
    for part in ds.parts:
        shape = tuple(part.array.shape)
        if shape != expected and shape[1:] != expected:
            raise MpqError(f"{part.label}: samples have shape {list(shape[1:])} (array "
                           f"{list(shape)}); the model input '{graph.inputs[0]}' expects "
                           f"{list(expected)} per sample (ONNX layout)")
    ds.sample_shape = expected
    if len(ds) == 0:
        raise MpqError(f"{ds.path}: empty data set (no calibration samples)")


def total_steps(ds: Dataset) -> int:
    """Progress units `calibrate` reports: every sample once per pass, two passes."""
    return 2 * len(ds)


# ------------------------------------------------------------------------------------------------
# Statistics
# ------------------------------------------------------------------------------------------------


@dataclass
class TensorStats:
    """Statistics of one activation tensor over all calibration values.

    `hist` counts values in `len(hist)` equal bins spanning [hist_lo, hist_hi] (which contains
    [min, max]); bin edges are integer multiples of the bin width.
    """

    min: float
    max: float
    mean: float
    std: float
    count: int
    hist: np.ndarray = field(repr=False)
    hist_lo: float
    hist_hi: float

    @property
    def bin_width(self) -> float:
        return (self.hist_hi - self.hist_lo) / len(self.hist)

    def percentile(self, p: float) -> float:
        """The p-th percentile (0 ≤ p ≤ 100) read from the histogram.

        The value below which a fraction p/100 of the counts lies, interpolating linearly inside
        the bin where the cumulative count crosses it, clipped to [min, max]. Accurate to one bin.
        """
        if not 0.0 <= p <= 100.0:
            raise ValueError(f"percentile {p} outside [0, 100]")
        if p == 0.0:
            return self.min
        if p == 100.0:
            return self.max
        cum = np.cumsum(self.hist)
        target = p / 100.0 * float(cum[-1])
        i = int(np.searchsorted(cum, target, side="left"))
        i = min(i, len(cum) - 1)
        before = float(cum[i - 1]) if i > 0 else 0.0
        inside = float(self.hist[i])
        frac = (target - before) / inside if inside > 0 else 0.0
        value = self.hist_lo + (i + frac) * self.bin_width
        return float(min(max(value, self.min), self.max))


@dataclass
class CalibrationStats:
    """Per-tensor statistics of one model over one data set (the ``stats.npz`` of §1)."""

    fingerprint: str
    tensors: dict[str, TensorStats]
    samples: int

    def ranges(self, method: str = "minmax", bits: int = 8,
               percentile: float = 99.99) -> dict[str, tuple[float, float]]:
        """`activation_range` for every tensor."""
        return {name: activation_range(s, method, bits, percentile)
                for name, s in self.tensors.items()}

    def to_bytes(self) -> bytes:
        """The ``.npz`` bytes (deterministic: same statistics, same bytes)."""
        names = list(self.tensors)
        ts = [self.tensors[n] for n in names]
        bins = len(ts[0].hist) if ts else 0
        arrays = {
            "format": np.array(STATS_FORMAT),
            "version": np.array(STATS_VERSION, np.int64),
            "fingerprint": np.array(self.fingerprint),
            "samples": np.array(self.samples, np.int64),
            "names": np.array(names, dtype=str),
            "min": np.array([t.min for t in ts], np.float64),
            "max": np.array([t.max for t in ts], np.float64),
            "mean": np.array([t.mean for t in ts], np.float64),
            "std": np.array([t.std for t in ts], np.float64),
            "count": np.array([t.count for t in ts], np.int64),
            "hist_lo": np.array([t.hist_lo for t in ts], np.float64),
            "hist_hi": np.array([t.hist_hi for t in ts], np.float64),
            "hist": np.array([t.hist for t in ts], np.int64).reshape(len(ts), bins),
        }
        return _npz_bytes(arrays)

    def save(self, path: str | Path) -> None:
        """Write the statistics atomically (never a half-written file)."""
        write_atomic(path, self.to_bytes())

    @classmethod
    def load(cls, path: str | Path, graph: Graph | None = None) -> CalibrationStats:
        """Read a stats file; with `graph`, refuse one computed for a different model."""
        p = Path(path)
        if not p.is_file():
            raise MpqError(f"{path}: no such file")
        not_stats = MpqError(f"{path}: not a calibration statistics file (write one with "
                             "`mpq calibrate`)")
        limits.check_data_file(p)
        try:
            z = np.load(p, allow_pickle=False)
            if not isinstance(z, np.lib.npyio.NpzFile):
                raise not_stats
            with z:
                if not set(_STATS_KEYS) <= set(z.files) or str(z["format"]) != STATS_FORMAT:
                    raise not_stats
                if int(z["version"]) != STATS_VERSION:
                    raise MpqError(f"{path}: statistics format version {int(z['version'])}; "
                                   f"this mpq reads version {STATS_VERSION}")
                a = {k: z[k] for k in z.files}
        except MpqError:
            raise
        except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile):
            raise not_stats from None
        fingerprint = str(a["fingerprint"])
        if graph is not None and fingerprint != graph_fingerprint(graph):
            raise MpqError(f"{path} was computed for a different model")
        _check_stats_arrays(a, str(path))
        tensors = {
            str(name): TensorStats(float(a["min"][i]), float(a["max"][i]), float(a["mean"][i]),
                                   float(a["std"][i]), int(a["count"][i]), a["hist"][i].copy(),
                                   float(a["hist_lo"][i]), float(a["hist_hi"][i]))
            for i, name in enumerate(a["names"])
        }
        return cls(fingerprint, tensors, int(a["samples"]))


def _check_stats_arrays(a: dict[str, np.ndarray], path: str) -> None:
    """The arrays of a stats file are consistent and usable: one entry per name, finite
    numbers, min ≤ max, a histogram of ≥ 2 non-negative bins over hist_lo < hist_hi and a
    positive count. The file may have been edited; every range, scale and KL search after
    this trusts these numbers."""
    names = a["names"]
    if names.ndim != 1 or names.dtype.kind not in "US":
        raise MpqError(f"{path}: 'names' is not a list of tensor names")
    n = len(names)
    for key in ("min", "max", "mean", "std", "count", "hist_lo", "hist_hi"):
        if a[key].shape != (n,) or a[key].dtype.kind not in "iuf":
            raise MpqError(f"{path}: '{key}' must hold {n} numbers, one per tensor")
    hist = a["hist"]
    if hist.ndim != 2 or hist.shape[0] != n or hist.shape[1] < 2 or hist.dtype.kind not in "iu":
        raise MpqError(f"{path}: 'hist' must be {n} rows of at least 2 integer bin counts")
    for i, name in enumerate(names):
        values = [float(a[k][i]) for k in ("min", "max", "mean", "std", "hist_lo", "hist_hi")]
        if not all(math.isfinite(v) for v in values) or a["min"][i] > a["max"][i] \
                or a["hist_lo"][i] >= a["hist_hi"][i] or a["count"][i] < 1 \
                or a["std"][i] < 0 or (hist[i] < 0).any():
            raise MpqError(f"{path}: statistics of tensor '{name}' are not valid (non-finite "
                           "or inconsistent numbers); recompute them with `mpq calibrate`")


def _npz_bytes(arrays: dict[str, np.ndarray]) -> bytes:
    """A compressed ``.npz`` in memory. Deterministic: `np.savez_compressed` writes members in
    the given order and stamps each with zipfile's fixed default date (1980-01-01), not the
    clock (checked by the tests)."""
    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)
    return buf.getvalue()


# -- pass 1: moments ------------------------------------------------------------------------------


@dataclass
class _Moments:
    """Running count, mean, M2 = Σ(x − mean)², min and max of one tensor."""

    count: int = 0
    mean: float = 0.0
    m2: float = 0.0
    lo: float = math.inf
    hi: float = -math.inf


#: Values per float32 partial sum of `chunked_sum` (pairwise within it, float64 across).
_SUM_CHUNK = 1 << 14


def chunked_sum(x: np.ndarray) -> float:
    """Σx of a flat array: numpy's pairwise float32 sum over each run of _SUM_CHUNK values
    (error ≲ log2(_SUM_CHUNK)·ε32 of the run's Σ|x|), the runs' sums accumulated in float64.
    About 3.6× faster than converting every value to float64 (relative error ~1e−8 on
    MobileNetV2-sized activations)."""
    whole = len(x) // _SUM_CHUNK * _SUM_CHUNK
    runs = x[:whole].reshape(-1, _SUM_CHUNK).sum(axis=1) if whole else x[:0]
    return float(runs.sum(dtype=np.float64)) + float(x[whole:].sum(dtype=np.float64))


def batch_moments(x: np.ndarray, lo: float | None = None, hi: float | None = None,
                  scratch: np.ndarray | None = None) -> _Moments:
    """Moments of one batch: mean = Σx/n and M2 = Σ(x − m32)² − n·(mean − m32)², both sums
    by `chunked_sum` for float32 data (m32 is the mean rounded to float32, so the squares stay
    float32), in float64 otherwise. `lo`, `hi`: x's min and max when the caller has them
    already; `scratch`: a float32 buffer of at least x.size values for x − m32 and its squares
    (the same numbers as a new array, without touching fresh memory for every tensor)."""
    flat = x.reshape(-1)
    n = flat.size
    narrow = flat.dtype == np.float32
    mean = (chunked_sum(flat) if narrow else float(np.sum(flat, dtype=np.float64))) / n
    m32 = np.float32(mean)
    with np.errstate(over="ignore", invalid="ignore"):  # near FLT_MAX: redone in float64 below
        if scratch is not None and narrow and len(scratch) >= n:
            d = np.subtract(flat, m32, out=scratch[:n])
        else:
            d = flat - m32
        if d.dtype == np.float32:
            m2 = chunked_sum(np.square(d, out=d))
        else:
            m2 = float(np.einsum("i,i->", d, d, dtype=np.float64))
        m2 -= n * (mean - float(m32)) ** 2
    if not math.isfinite(m2):  # x − mean overflowed float32 (values near ±3.4e38)
        d64 = flat.astype(np.float64) - mean
        m2 = float(np.dot(d64, d64))
    return _Moments(n, mean, max(m2, 0.0), float(flat.min()) if lo is None else lo,
                    float(flat.max()) if hi is None else hi)


def merge_moments(a: _Moments, b: _Moments) -> _Moments:
    """Chan, Golub & LeVeque (1979) parallel update: δ = μ_b − μ_a, n = n_a + n_b,
    μ = μ_a + δ·n_b/n, M2 = M2_a + M2_b + δ²·n_a·n_b/n."""
    if a.count == 0:
        return b
    n = a.count + b.count
    delta = b.mean - a.mean
    mean = a.mean + delta * b.count / n
    m2 = a.m2 + b.m2 + delta * delta * a.count * b.count / n
    return _Moments(n, mean, m2, min(a.lo, b.lo), max(a.hi, b.hi))


# -- pass 2: histograms ---------------------------------------------------------------------------


def histogram_grid(lo: float, hi: float, bins: int) -> tuple[float, int]:
    """Bin width w and first grid index k0 of a `bins`-bin histogram covering [lo, hi] whose
    edges are the multiples of w: w = (hi − lo)/(bins − 1), k0 = ⌊lo/w⌋, so the histogram spans
    [k0·w, (k0 + bins)·w] ⊇ [lo, hi]. A constant tensor gets w = max(|lo|, 1)/(bins − 1)."""
    span = hi - lo
    if not span > 0.0:
        span = max(abs(lo), 1.0)
    width = span / (bins - 1)
    return width, math.floor(lo / width)


def bin_counts(x: np.ndarray, width: float, k0: int, bins: int) -> np.ndarray:
    """Counts of `x` in grid bins k0 … k0+bins−1 (bin k holds [k·w, (k+1)·w)), as int64.

    The bin index ⌊x/w⌋ − k0 is computed in float32 (twice as fast) while the grid indices stay
    below 2^22, where float32 still resolves a tenth of a bin; in float64 beyond. The values
    are binned in chunks of `_BIN_CHUNK`: every step is element-wise and counts add up, so the
    counts are those of one pass over all of `x`, without its full-size temporaries (the index
    array alone would be twice the tensor).
    """
    # float32 also needs 1/w in range: subnormal data gives a bin width below 1/FLT_MAX.
    small = max(abs(k0), abs(k0 + bins)) < 2 ** 22 and 1.0 / width < _FLOAT32_MAX
    dtype = np.float32 if small else np.float64
    inv = dtype(1.0 / width)
    flat = x.reshape(-1)
    counts = np.zeros(bins, np.int64)
    t = np.empty(min(flat.size, _BIN_CHUNK), dtype)
    for start in range(0, flat.size, _BIN_CHUNK):
        piece = flat[start:start + _BIN_CHUNK]
        tc = t[:len(piece)]
        np.multiply(piece, inv, out=tc, dtype=dtype)
        np.floor(tc, out=tc)
        tc -= k0
        np.clip(tc, 0, bins - 1, out=tc)
        counts += np.bincount(tc.astype(np.intp), minlength=bins)
    return counts


# -- the two passes -------------------------------------------------------------------------------


@dataclass
class _Group:
    """Consecutive exposed tensors whose whole-batch values are held at once: the session that
    computes them (the model cut after their last producer) and their buffers."""

    session: object
    exposed: list[str]  # every output of that session
    tensors: list[str]
    step: int  # samples per onnxruntime call
    buffers: dict[str, np.ndarray]
    inputs: list[str] = field(default_factory=list)  # a segment's (`_segment_model`) feeds


def _cut_model(model: onnx.ModelProto, names: list[str], last: int) -> onnx.ModelProto:
    """`model` (every IR tensor exposed) cut after the node producing names[last], exposing
    names[:last + 1]: the same nodes computing the same values, as in the whole model every
    one of these tensors is an output too (onnxruntime fuses no node across them)."""
    import onnx
    from onnx import TensorProto, helper

    cut = onnx.ModelProto()
    cut.CopyFrom(model)
    producer = next(i for i, n in enumerate(cut.graph.node) if names[last] in n.output)
    del cut.graph.node[producer + 1:]
    del cut.graph.output[:]
    cut.graph.output.extend(helper.make_tensor_value_info(t, TensorProto.FLOAT, None)
                            for t in names[:last + 1])
    used = {i for n in cut.graph.node for i in n.input}
    kept = [init for init in cut.graph.initializer if init.name in used]
    del cut.graph.initializer[:]
    cut.graph.initializer.extend(kept)
    return cut


def _segment_model(model: onnx.ModelProto, names: list[str], first: int, last: int,
                   shapes: dict[str, tuple[int, ...]]
                   ) -> tuple[onnx.ModelProto, list[str]] | None:
    """The nodes of `model` (every IR tensor exposed) after the producer of names[first − 1]
    up to the producer of names[last], as a model of their own: fed the tensors they read
    that earlier nodes produce (IR tensors, which the earlier groups computed), exposing
    names[first:last + 1]. A fed tensor is declared with its per-sample shape (`shapes`) and
    a free batch axis, so onnxruntime knows what the whole model told it. None when such a
    tensor is not an IR tensor (then the groups are cut from the input, `_cut_model`).

    The same nodes compute the same values: every IR tensor is an output of the whole model,
    so onnxruntime fuses no node across them there, and a node reads the same float32 values
    whether an earlier node or a feed holds them (checked value for value: the tests, and
    MobileNetV2-1.0@224's statistics byte-identical to the cut-from-the-input groups')."""
    import onnx
    from onnx import TensorProto, helper

    nodes = list(model.graph.node)
    producer = {o: i for i, n in enumerate(nodes) for o in n.output}
    lo = producer[names[first - 1]] + 1 if first > 0 else 0
    hi = producer[names[last]]
    part = nodes[lo:hi + 1]
    made = {o for n in part for o in n.output}
    inits = {init.name for init in model.graph.initializer}
    feeds: list[str] = []
    for n in part:
        for i in n.input:
            if i and i not in made and i not in inits and i not in feeds:
                feeds.append(i)
    graph_inputs = {i.name: i for i in model.graph.input}
    if any(i not in graph_inputs and i not in names[:first] for i in feeds):
        return None
    seg = onnx.ModelProto()
    seg.CopyFrom(model)
    del seg.graph.node[:]
    seg.graph.node.extend(part)
    del seg.graph.input[:]
    seg.graph.input.extend(graph_inputs[i] if i in graph_inputs
                           else helper.make_tensor_value_info(i, TensorProto.FLOAT,
                                                              ["N", *shapes[i]])
                           for i in feeds)
    del seg.graph.output[:]
    seg.graph.output.extend(helper.make_tensor_value_info(t, TensorProto.FLOAT, None)
                            for t in names[first:last + 1])
    used = {i for n in part for i in n.input}
    kept = [init for init in seg.graph.initializer if init.name in used]
    del seg.graph.initializer[:]
    seg.graph.initializer.extend(kept)
    return seg, feeds


_ARENA: list[bool] = []  # whether the process-wide onnxruntime CPU arena is registered


def _shared_arena(ort: object) -> bool:
    """Register one CPU arena in onnxruntime's process-wide environment (once), for the
    sessions that opt in: `_ort_runner`'s sessions then reuse the same memory instead of
    each growing its own (MobileNetV2-1.0@224: peak RSS of calibration 1.5 → 0.95 GB)."""
    if not _ARENA:
        try:
            info = ort.OrtMemoryInfo("Cpu", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0,
                                     ort.OrtMemType.DEFAULT)
            ort.create_and_register_allocator(info, ort.OrtArenaCfg(0, -1, -1, -1))
            _ARENA.append(True)
        except Exception:  # noqa: BLE001 - an onnxruntime without it: one arena per session
            _ARENA.append(False)
    return _ARENA[0]


def small_pages_float32(count: int) -> np.ndarray:
    """`count` float32 values (uninitialised) in an anonymous mapping of ordinary pages. numpy
    asks for transparent huge pages on large arrays, and their first use in a process can wait
    for the kernel to compact memory: for calibration's pool, touched once per batch and group,
    that cost more than the faults of small pages (MobileNetV2-1.0@224 on the 2-core benchmark
    machine: calibration 2.9–3.2 → 2.2–2.6 s, sys 1.6–2.2 → 0.7–1.2 s, the same peak RSS;
    MAP_POPULATE was no faster and made resident the part of the pool no group writes,
    +135 MB). np.empty where mmap has no anonymous private mappings or refuses the mapping (it
    then fails, or not, exactly as it would have)."""
    private, anonymous = getattr(mmap, "MAP_PRIVATE", None), getattr(mmap, "MAP_ANONYMOUS", None)
    if private is not None and anonymous is not None and count > 0:
        try:
            pages = mmap.mmap(-1, count * 4, flags=private | anonymous)
        except OSError:
            pass
        else:
            return np.frombuffer(pages, np.float32, count)
    return np.empty(max(count, 0), np.float32)


def _ort_runner(graph: Graph) -> Callable[[np.ndarray, Visit], None]:
    """onnxruntime on `graph_to_onnx(graph)` with every node output exposed as a graph output.

    Each tensor is visited whole, as one run on the batch would give it, but neither all
    tensors of the batch nor one big run are held at once: one run with every tensor of every
    sample exposed costs far more than the network (MobileNetV2-1.0@224, 64 samples: 1.8 GB
    of outputs; ≈ 9 s, mostly the kernel handing out fresh pages, against < 2 s for the
    network). Instead

    - the tensors are taken in groups of consecutive tensors of at most `_GROUP_BYTES` for the
      whole batch (or one tensor); a group's session is the segment of nodes producing its
      tensors (`_segment_model`; when a segment would need a tensor that is not an IR
      tensor, the model cut after the group's last producer, `_cut_model`, the last group's
      the whole model);
    - a batch runs in slices of about `_SLICE_BYTES` of activations, onnxruntime writing the
      group's tensors straight into whole-batch buffers (IO binding), allocated once and
      reused by every group, batch and pass (the tensors a later segment is fed keep their
      own buffers).

    onnxruntime's CPU kernels compute each sample independently of the others in its batch
    and a node's values do not depend on the nodes after it, so neither changes a number
    (checked by the tests, and value for value on the benchmark models). Each group after the
    first runs only its own nodes, fed the earlier tensors it reads (`_segment_model`), so the
    network runs once, not once per group. The input is visited first, then each group's
    tensors once it has run, side by side (`_visit_all`: no order within a group). Visited
    arrays are only valid until the next call.
    """
    import onnxruntime as ort
    from onnx import TensorProto, helper

    from mpq.frontend.onnx_writer import graph_to_onnx

    model = graph_to_onnx(graph)
    declared = {o.name for o in model.graph.output}
    names = [t for n in graph.nodes for t in n.outputs]
    for t in names:
        if t not in declared:
            model.graph.output.append(helper.make_tensor_value_info(t, TensorProto.FLOAT, None))
    options = ort.SessionOptions()
    options.log_severity_level = 3
    if _shared_arena(ort):  # the groups' sessions share one arena, not one each
        options.add_session_config_entry("session.use_env_allocators", "1")

    def open_session(m: onnx.ModelProto) -> object:
        return ort.InferenceSession(m.SerializeToString(), options,
                                    providers=["CPUExecutionProvider"])

    session = open_session(model)
    name = graph.inputs[0]
    groups: list[_Group] = []
    carried_values: dict[str, np.ndarray] = {}  # tensors a later group is fed

    def plan(batch: np.ndarray) -> bool:
        """Groups, sessions and buffers for batches of up to len(batch); False when some
        output is not one float32 row per sample (then batches run whole)."""
        probe = session.run(names, {name: batch[:1]})
        if any(v.ndim == 0 or len(v) != 1 or v.dtype != np.float32 for v in probe):
            return False
        n = len(batch)
        shapes = {t: v.shape[1:] for t, v in zip(names, probe, strict=True)}
        row = {t: v[0].nbytes for t, v in zip(names, probe, strict=True)}
        budget = max(_GROUP_BYTES, n * max(row.values()))
        spans: list[list[int]] = [[]]
        for i, t in enumerate(names):
            if spans[-1] and n * (sum(row[names[j]] for j in spans[-1]) + row[t]) > budget:
                spans.append([])
            spans[-1].append(i)
        # Each group after the first runs only its own nodes, fed the earlier tensors it
        # reads (`_segment_model`); those are carried in buffers of their own, the others
        # share one pool reused by every group.
        segments = [_segment_model(model, names, span[0], span[-1], shapes) for span in spans]
        if any(seg is None for seg in segments):
            segments = [None] * len(spans)
        carried = {t for seg in segments if seg is not None for t in seg[1] if t != name}
        pool = small_pages_float32(max(sum(n * row[names[j]] for j in span
                                         if names[j] not in carried) for span in spans) // 4)
        groups.clear()
        for span, seg in zip(spans, segments, strict=True):
            last = span[-1]
            whole = last == len(names) - 1
            buffers, offset = {}, 0
            for j in span:
                t = names[j]
                size = n * row[t] // 4
                if t in carried:
                    buffers[t] = carried_values[t] = np.empty((n, *shapes[t]), np.float32)
                    continue
                buffers[t] = pool[offset:offset + size].reshape((n, *shapes[t]))
                offset += size
            # Slices as when every group ran from the input (the same onnxruntime calls).
            per_sample = sum(row[t] for t in names[:last + 1]) or 1
            step = max(1, _SLICE_BYTES // per_sample)
            if seg is not None:
                groups.append(_Group(open_session(seg[0]), names[span[0]:last + 1],
                                     [names[j] for j in span], step, buffers, seg[1]))
            else:
                exposed = names if whole else names[:last + 1]
                groups.append(_Group(session if whole else open_session(_cut_model(model, names,
                                                                                   last)),
                                     exposed, [names[j] for j in span], step, buffers, [name]))
        return True

    def run_group(g: _Group, batch: np.ndarray) -> None:
        for start in range(0, len(batch), g.step):
            stop = min(start + g.step, len(batch))
            binding = g.session.io_binding()
            for t in g.inputs:
                binding.bind_cpu_input(t, np.ascontiguousarray(
                    batch[start:stop] if t == name else carried_values[t][start:stop]))
            for t in g.exposed:
                if t in g.buffers:
                    view = g.buffers[t][start:stop]
                    binding.bind_output(t, "cpu", 0, np.float32, list(view.shape),
                                        view.ctypes.data)
                else:  # computed on the way, held by onnxruntime's own (reused) arena
                    binding.bind_output(t, "cpu")
            g.session.run_with_iobinding(binding)

    def run_whole(batch: np.ndarray, visit: Visit) -> None:
        for t, value in zip(names, session.run(names, {name: batch}), strict=True):
            visit(t, value)

    def run(batch: np.ndarray, visit: Visit) -> None:
        visit(name, batch)
        n = len(batch)
        if not groups or len(next(iter(groups[0].buffers.values()))) < n:
            if not plan(batch):
                run_whole(batch, visit)
                return
        for g in groups:
            try:
                run_group(g, batch)
            except Exception:  # noqa: BLE001 - a shape the probe did not foresee: run it whole
                if g is not groups[0]:
                    raise  # tensors were visited already: an internal error, not a fallback
                groups.clear()
                run_whole(batch, visit)
                return
            _visit_all(visit, [(t, g.buffers[t][:n]) for t in g.tensors])

    return run


def _interpreter_runner(graph: Graph) -> Callable[[np.ndarray, Visit], None]:
    """The IR's float interpreter (`run_graph` with an observer)."""
    from mpq.interpreter import run_graph, to_ir_layout

    name = graph.inputs[0]

    def run(batch: np.ndarray, visit: Visit) -> None:
        run_graph(graph, {name: to_ir_layout(graph, name, batch)}, observe=visit)

    return run


def calibrate(graph: Graph, data: Dataset, batch_size: int = 64, bins: int = DEFAULT_BINS,
              progress: Callable[[int], None] | None = None,
              engine: str = "onnxruntime") -> CalibrationStats:
    """Statistics of every activation tensor of `graph` over `data` (DESIGN §4.3).

    Two streaming passes (moments, then histograms over each tensor's [min, max]), one when the
    data is a single batch; memory is independent of the number of samples. `progress(n)` is
    called after every batch of n samples in either pass (twice for a single batch),
    `total_steps(data)` in all.
    """
    if bins < 2:
        raise MpqError(f"histogram needs at least 2 bins, not {bins}")
    if engine not in ENGINES:
        raise MpqError(f"unknown engine '{engine}' (choose from {', '.join(ENGINES)})")
    check_dataset(data, graph)
    check_finite_parameters(graph)
    run = _ort_runner(graph) if engine == "onnxruntime" else _interpreter_runner(graph)
    order = [graph.inputs[0]] + [t for n in graph.nodes for t in n.outputs]

    moments = {t: _Moments() for t in order}
    seen = 0  # samples before the current batch, for the error of a non-finite activation
    grids: dict[str, tuple[float, int]] = {}
    hists = {t: np.zeros(bins, np.int64) for t in order}
    local = threading.local()  # each visiting thread's scratch (`_visit_all`)

    def observe_moments(t: str, value: np.ndarray) -> None:
        lo, hi = value.min(), value.max()  # NaN propagates through min/max, ±Inf shows there
        if not (math.isfinite(lo) and math.isfinite(hi)):
            check_finite_activation(t, value, seen, t == order[0])
        scratch = getattr(local, "scratch", None)
        if scratch is None or len(scratch) < value.size:
            scratch = local.scratch = np.empty(value.size, np.float32)
        moments[t] = merge_moments(moments[t],
                                   batch_moments(value, float(lo), float(hi), scratch))

    def observe_hist(t: str, value: np.ndarray) -> None:
        width, k0 = grids[t]
        hists[t] += bin_counts(value, width, k0, bins)

    def observe_both(t: str, value: np.ndarray) -> None:
        # One batch holds all the data: its [min, max] is the histogram's, no second pass.
        observe_moments(t, value)
        m = moments[t]
        grids[t] = histogram_grid(m.lo, m.hi, bins)
        observe_hist(t, value)

    single = len(data) <= batch_size
    for batch in data.batches(batch_size):
        run(batch, observe_both if single else observe_moments)
        seen += len(batch)
        if progress is not None:
            progress(len(batch))
    if single:
        if progress is not None:
            progress(len(data))
    else:
        grids = {t: histogram_grid(m.lo, m.hi, bins) for t, m in moments.items()}
        for batch in data.batches(batch_size):
            run(batch, observe_hist)
            if progress is not None:
                progress(len(batch))

    tensors = {t: _tensor_stats(moments[t], grids[t], hists[t]) for t in order}
    return CalibrationStats(graph_fingerprint(graph), tensors, len(data))


def _tensor_stats(m: _Moments, grid: tuple[float, int], hist: np.ndarray) -> TensorStats:
    """Final statistics: σ = sqrt(M2/n) (population σ, as numpy's default)."""
    width, k0 = grid
    return TensorStats(m.lo, m.hi, m.mean, math.sqrt(m.m2 / m.count), m.count, hist,
                       k0 * width, (k0 + len(hist)) * width)


def summarise(x: np.ndarray, bins: int = DEFAULT_BINS) -> TensorStats:
    """`TensorStats` of one in-memory array: the same two passes on a single batch."""
    values = np.asarray(x, dtype=np.float32)
    if values.size == 0:
        raise MpqError("cannot summarise an empty array")
    m = batch_moments(values)
    grid = histogram_grid(m.lo, m.hi, bins)
    return _tensor_stats(m, grid, bin_counts(values, grid[0], grid[1], bins))


# ------------------------------------------------------------------------------------------------
# Range selection
# ------------------------------------------------------------------------------------------------


def abs_histogram(stats: TensorStats, max_bins: int | None = None) -> tuple[np.ndarray, float]:
    """Histogram of |x| from the signed one, bins starting at 0, and its bin width.

    Grid bin g (holding [g·w, (g+1)·w)) folds to |x| bin g for g ≥ 0 and −g−1 for g < 0, exactly,
    because the edges are multiples of w. A tensor far from 0 (e.g. all in [5, 6]) would need many
    empty bins from 0 upwards; then groups of f adjacent bins are merged so that at most
    `max_bins` (default: the signed histogram's bin count) remain.
    """
    bins = len(stats.hist)
    width = stats.bin_width
    k0 = round(stats.hist_lo / width)
    g = np.arange(k0, k0 + bins)
    folded = np.where(g >= 0, g, -g - 1)
    n = int(folded.max()) + 1
    counts = np.bincount(folded, weights=stats.hist.astype(np.float64), minlength=n)
    limit = max_bins or bins
    if n > limit:
        f = -(-n // limit)
        counts = np.pad(counts, (0, -n % f)).reshape(-1, f).sum(axis=1)
        width *= f
    return np.rint(counts).astype(np.int64), width


def _xlogx(v: np.ndarray) -> np.ndarray:
    """v·ln v with 0·ln 0 = 0."""
    safe = np.where(v > 0, v, 1.0)
    return np.where(v > 0, v * np.log(safe), 0.0)


def kl_divergences(hist: np.ndarray, levels: int) -> np.ndarray:
    """KL(P‖Q) for every candidate count of kept bins i = levels … len(hist) (TensorRT).

    P is the first i bins with the clipped outliers Σ_{k≥i} h_k added to bin i−1; Q splits the
    same i bins into `levels` contiguous chunks (edges ⌊j·i/levels⌋) and spreads each chunk's
    count C_j (outliers excluded) evenly over its N_j bins where P is non-zero. With
    S_p = Σ P, S_q = Σ Q:  KL = (1/S_p)·Σ p ln p − ln S_p + ln S_q − (1/S_p)·Σ_j P_j ln(C_j/N_j),
    evaluated for all candidates at once from cumulative sums (O(candidates · levels)). A chunk
    with P_j > 0 but C_j = 0 (only outliers) gets C_j = 1e-6, a large but finite penalty, where
    TensorRT's smoothing plays the same role; a candidate whose kept bins are all empty gets ∞.
    """
    h = hist.astype(np.float64)
    n = len(h)
    total = float(h.sum())
    zero = np.zeros(1)
    cs = np.concatenate([zero, np.cumsum(h)])
    nz = np.concatenate([zero, np.cumsum(h > 0)])
    chl = np.concatenate([zero, np.cumsum(_xlogx(h))])
    i = np.arange(levels, n + 1)
    edges = (i[:, None] * np.arange(levels + 1)[None, :]) // levels
    c = cs[edges[:, 1:]] - cs[edges[:, :-1]]
    nonzero = nz[edges[:, 1:]] - nz[edges[:, :-1]]
    outliers = total - cs[i]
    last = h[i - 1]
    nonzero[:, -1] += (last == 0) & (outliers > 0)
    p_chunk = c.copy()
    p_chunk[:, -1] += outliers
    q = np.where(c > 0, c, 1e-6) / np.maximum(nonzero, 1.0)
    sum_plogp = chl[i - 1] + _xlogx(last + outliers)
    sum_plogq = (p_chunk * np.log(q)).sum(axis=1)
    sq = np.maximum(cs[i], 1e-6)
    kl = sum_plogp / total - math.log(total) + np.log(sq) - sum_plogq / total
    return np.where(cs[i] > 0, kl, np.inf)  # keeping only empty bins approximates nothing


def entropy_threshold(stats: TensorStats, bits: int) -> float:
    """TensorRT's calibration threshold T for |x| with 2^(bits−1) target levels (Migacz, "8-bit
    Inference with TensorRT", GTC 2017): over the |x| histogram, keep i bins, fold the rest into
    the last kept bin (P), quantise the kept bins to the target levels (Q), and take the i with
    the least KL(P‖Q); T = i·w (the upper edge of the kept bins), at most max|x|.

    Before the search the count of the bin at 0 is replaced by its neighbour's (as NVIDIA's
    pytorch-quantization does): 0 is exactly representable, yet ReLU's spike there would be
    smeared over a whole level in Q and, at few levels, drive T down to a sliver of the range.
    A tensor with fewer values than histogram bins (e.g. the logits of a few hundred samples)
    has a histogram too sparse for the search — keeping one lone bin and folding every other
    value into it scores KL = 0 — so it is not clipped: T = max|x|.

    T never clips more than 1 % of the values: it is at least the larger of |P1| and |P99|.
    On a map with most of its mass near zero and a second cluster at a clamp (ReLU6's
    saturated 6.0), KL alone picks a sliver of the range and folds the cluster into it (the
    Fashion-MNIST example's first map: T = 0.69 of 6.0 at 8 bits, top-1 0.80 instead of 0.92;
    at 4 bits 0.10 instead of 0.91); the floor keeps KWS's gains intact (measured).
    """
    hist, width = abs_histogram(stats)
    absmax = max(abs(stats.min), abs(stats.max))
    levels = 2 ** (bits - 1)
    if len(hist) <= levels or stats.count < len(stats.hist):
        return absmax
    hist[0] = hist[1]
    if hist.sum() == 0:
        return absmax
    kl = kl_divergences(hist, levels)
    best = levels + int(np.argmin(kl))
    floor = max(abs(stats.percentile(1.0)), abs(stats.percentile(99.0)))
    return float(min(max(best * width, floor), absmax))


def mse_range(stats: TensorStats, bits: int, candidates: int = MSE_CANDIDATES
              ) -> tuple[float, float]:
    """The clipping range [α·lo, α·hi] (lo = min(min, 0), hi = max(max, 0)) whose b-bit
    asymmetric quantiser has the least mean squared error on the tensor's histogram.

    For each candidate α = j/J (j = 1 … J, J = `candidates`) the quantiser is exactly the one
    `arith.choose_activation_params` builds for that range: s = float32((α·hi − α·lo)/(2^b − 1)),
    z = clamp(round(q_min − α·lo/s)), Q(x) = s·(clamp(round(x/s) + z, q_min, q_max) − z). With
    the histogram's bin centres c_k (clipped to [min, max]) standing for its n_k values,

        MSE(α) = Σ_k n_k·(c_k − Q_α(c_k))² / Σ_k n_k,

    evaluated for every candidate (an exact grid search; the within-bin spread adds w²/12 to
    every candidate alike and does not move the minimum). Ties keep the widest range. Scaling
    both ends by one α keeps the zero point's place for signed tensors; a tensor ≥ 0 (after
    ReLU) has lo = 0 and the search is over its upper clip alone. Unlike KL (which compares
    level *distributions*), MSE weighs the clipped tail by how far it is clipped, which is
    what the next layer's accumulator sees (Banner et al., "Post training 4-bit quantization
    of convolutional networks for rapid-deployment", NeurIPS 2019, §3; Nagel et al., "A
    White Paper on Neural Network Quantization", 2021, §3.5 "MSE-based range setting").
    """
    lo0, hi0 = _with_zero(stats.min, stats.max)
    if not hi0 > lo0:
        return lo0, hi0
    qmin, qmax = qrange(bits)
    counts = stats.hist.astype(np.float64)
    nz = counts > 0
    centres = stats.hist_lo + (np.arange(len(counts)) + 0.5) * stats.bin_width
    c = np.clip(centres[nz], stats.min, stats.max)  # ascending
    n = counts[nz]
    alpha = np.arange(1, candidates + 1, dtype=np.float64) / candidates
    lo, hi = alpha * lo0, alpha * hi0
    scale = ((hi - lo) / (qmax - qmin)).astype(np.float32).astype(np.float64)
    zp = np.clip(round_half_away(qmin - lo / scale), qmin, qmax)
    err = _grid_errors(c, n, scale, zp, qmin, qmax)
    best = candidates - 1 - int(np.argmin(err[::-1]))  # ties: the widest range
    return _with_zero(float(lo[best]), float(hi[best]))


def _grid_errors(c: np.ndarray, n: np.ndarray, scale: np.ndarray, zp: np.ndarray, qmin: int,
                 qmax: int) -> np.ndarray:
    """Σ_k n_k·(c_k − Q(c_k))² for every quantiser (scale[j], zp[j]) at once, from prefix sums.

    Q sends c to level q where round(c/s) + z = q: the cells between the boundaries
    s·(q − z + ½) (q = q_min … q_max − 1; the outer cells take the clipped tails). Over a cell
    with level value l = s·(q − z), Σ n·(c − l)² = Σ n c² − 2 l Σ n c + l² Σ n, so with prefix
    sums of n, n·c and n·c² over the ascending c each quantiser costs O(2^b·log K) instead of
    O(K) for K bins. (A c exactly on a boundary counts in the upper cell; rounding half away
    from zero sends a negative one down: a measure-zero difference.)"""
    zero = np.zeros(1)
    p0 = np.concatenate([zero, np.cumsum(n)])
    p1 = np.concatenate([zero, np.cumsum(n * c)])
    p2 = np.concatenate([zero, np.cumsum(n * c * c)])
    q = np.arange(qmin, qmax + 1, dtype=np.float64)
    bounds = scale[:, None] * (q[None, :-1] - zp[:, None] + 0.5)
    idx = np.searchsorted(c, bounds, side="left")
    edges = np.concatenate([np.zeros((len(scale), 1), np.intp), idx,
                            np.full((len(scale), 1), len(c), np.intp)], axis=1)
    s0 = p0[edges[:, 1:]] - p0[edges[:, :-1]]
    s1 = p1[edges[:, 1:]] - p1[edges[:, :-1]]
    s2 = p2[edges[:, 1:]] - p2[edges[:, :-1]]
    level = scale[:, None] * (q[None, :] - zp[:, None])
    return np.maximum(s2 - 2.0 * level * s1 + level * level * s0, 0.0).sum(axis=1)


def _with_zero(lo: float, hi: float) -> tuple[float, float]:
    """Widen [lo, hi] to contain 0 (TFLite: zero must be exactly representable)."""
    return float(min(lo, 0.0)), float(max(hi, 0.0))


def activation_range(stats: TensorStats, method: str, bits: int = 8,
                     percentile: float = 99.99) -> tuple[float, float]:
    """The quantisation range of one activation tensor (DESIGN §4.3), always containing 0.

    - ``minmax``: [min, max] (TFLite's converter).
    - ``percentile``: [P_(100−p), P_p] from the histogram.
    - ``entropy``: the KL threshold T of `entropy_threshold` (2^(bits−1) levels: 128 at 8 bits,
      8 at 4, 2 at 2). A tensor that is all ≥ 0 (after ReLU) keeps its lower end (min) and gets
      T as its upper end; a signed tensor gets [−T, T] from the search on |x|, each end
      clipped to the observed [min, max].
    - ``mse``: the range of least mean squared quantisation error at `bits` (`mse_range`).
    """
    if method == "minmax":
        return _with_zero(stats.min, stats.max)
    if method == "percentile":
        if not 50.0 < percentile <= 100.0:
            raise MpqError(f"percentile must be in (50, 100], not {percentile}")
        return _with_zero(stats.percentile(100.0 - percentile), stats.percentile(percentile))
    if method == "entropy":
        if not 2 <= bits <= 16:
            raise MpqError(f"bits must be between 2 and 16 for entropy calibration, not {bits}")
        t = entropy_threshold(stats, bits)
        return _with_zero(max(-t, stats.min), min(t, stats.max))
    if method == "mse":
        if not 2 <= bits <= 16:
            raise MpqError(f"bits must be between 2 and 16 for MSE range search, not {bits}")
        return mse_range(stats, bits)
    raise MpqError(f"unknown range method '{method}' (choose from {', '.join(RANGE_METHODS)})")
