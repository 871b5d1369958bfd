"""Streaming calibration statistics and range selection (DESIGN §4.3, `mpq.quant.calibrate`).

Streaming must not change the numbers (batch size, npz vs folder), the numbers must be numpy's on
the interpreter's activations, memory must not grow with the data, the KL search must be the
TensorRT divergence, and bad data must fail with one line naming the file.
"""

from __future__ import annotations

import time
import tracemalloc
from pathlib import Path

import numpy as np
import onnx_builders as B
import pytest
from conftest import shared_model

from mpq.errors import MpqError
from mpq.frontend.onnx_import import import_model, import_onnx
from mpq.interpreter import run_graph, to_ir_layout
from mpq.quant.calibrate import (
    CalibrationStats,
    TensorStats,
    activation_range,
    calibrate,
    check_dataset,
    entropy_threshold,
    kl_divergences,
    load_dataset,
    onnx_input_shape,
    summarise,
    total_steps,
)

BINS = 2048


@pytest.fixture(scope="module")
def nchw_graph():
    """Two conv branches, concat, avg-pool, FC, softmax; NCHW input [N, 3, 16, 12]."""
    return import_model(B.concat_model(), "concat_model")


@pytest.fixture(scope="module")
def nhwc_graph():
    """tf2onnx flavour: NHWC input [N, 16, 16, 3], conv, depthwise, pool, FC, softmax."""
    return import_model(B.tf2onnx_style_model(), "tf2onnx_style_model")


def random_x(graph, n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, *onnx_input_shape(graph))).astype(np.float32)


def save_npz(path: Path, **arrays: np.ndarray) -> Path:
    np.savez(path, **arrays)
    return path


def assert_same_stats(a: CalibrationStats, b: CalibrationStats, rel: float = 0.0) -> None:
    assert a.fingerprint == b.fingerprint and a.samples == b.samples
    assert list(a.tensors) == list(b.tensors)
    for name, sa in a.tensors.items():
        sb = b.tensors[name]
        assert (sa.min, sa.max, sa.count) == (sb.min, sb.max, sb.count), name
        assert (sa.hist_lo, sa.hist_hi) == (sb.hist_lo, sb.hist_hi), name
        np.testing.assert_array_equal(sa.hist, sb.hist, err_msg=name)
        np.testing.assert_allclose([sa.mean, sa.std], [sb.mean, sb.std], rtol=rel, atol=0)


# -- streaming --------------------------------------------------------------------------------


def test_streaming_equals_whole_batch(tmp_path: Path, nchw_graph) -> None:
    ds = load_dataset(save_npz(tmp_path / "d.npz", x=random_x(nchw_graph, 300)), nchw_graph)
    small = calibrate(nchw_graph, ds, batch_size=7)
    whole = calibrate(nchw_graph, ds, batch_size=1000)
    assert_same_stats(small, whole, rel=1e-6)
    assert all(len(s.hist) == BINS and s.hist.dtype == np.int64 for s in whole.tensors.values())


def test_every_activation_and_progress(tmp_path: Path, nhwc_graph) -> None:
    ds = load_dataset(save_npz(tmp_path / "d.npz", x=random_x(nhwc_graph, 50)), nhwc_graph)
    steps: list[int] = []
    stats = calibrate(nhwc_graph, ds, batch_size=16, progress=steps.append)
    assert steps == [16, 16, 16, 2] * 2 and sum(steps) == total_steps(ds) == 100
    expected = nhwc_graph.inputs + [t for n in nhwc_graph.nodes for t in n.outputs]
    assert list(stats.tensors) == expected and stats.samples == 50
    for name, s in stats.tensors.items():
        assert s.count == 50 * nhwc_graph.tensors[name].size
        assert s.hist.sum() == s.count
        assert s.hist_lo <= s.min <= s.max <= s.hist_hi


@pytest.mark.parametrize("engine", ["interpreter", "onnxruntime"])
def test_moments_equal_numpy(tmp_path: Path, nchw_graph, engine: str) -> None:
    x = random_x(nchw_graph, 120, seed=3)
    ds = load_dataset(save_npz(tmp_path / "d.npz", x=x), nchw_graph)
    stats = calibrate(nchw_graph, ds, batch_size=32, engine=engine)
    name = nchw_graph.inputs[0]
    acts = run_graph(nchw_graph, {name: to_ir_layout(nchw_graph, name, x)}, keep=True)
    assert set(acts) == set(stats.tensors)
    exact = engine == "interpreter"
    for t, a in acts.items():
        s = stats.tensors[t]
        span = float(a.max() - a.min())
        tol = 0.0 if exact else 1e-5 * span
        assert abs(s.min - float(a.min())) <= tol and abs(s.max - float(a.max())) <= tol, t
        assert s.count == a.size
        assert s.mean == pytest.approx(float(a.mean(dtype=np.float64)),
                                       rel=1e-6 if exact else 1e-4, abs=1e-7 * span)
        assert s.std == pytest.approx(float(a.std(dtype=np.float64)), rel=1e-6 if exact else 1e-4)


def test_percentile_within_one_bin(tmp_path: Path, nchw_graph) -> None:
    x = random_x(nchw_graph, 100, seed=5)
    ds = load_dataset(save_npz(tmp_path / "d.npz", x=x), nchw_graph)
    stats = calibrate(nchw_graph, ds, engine="interpreter")
    name = nchw_graph.inputs[0]
    acts = run_graph(nchw_graph, {name: to_ir_layout(nchw_graph, name, x)}, keep=True)
    for t, a in acts.items():
        s = stats.tensors[t]
        w = s.bin_width * 1.0001
        for p in (0.0, 0.1, 1.0, 25.0, 50.0, 90.0, 99.0, 99.9, 100.0):
            # The order statistic at rank ⌈p·n/100⌉ lies in the bin the histogram interpolates
            # in; numpy's default linear rule may interpolate across a gap in a sparse tail.
            assert abs(s.percentile(p) - np.percentile(a, p, method="inverted_cdf")) <= w, (t, p)
        if s.count < 20 * len(s.hist):
            continue  # too sparse for the default rule (e.g. the 1000 logits)
        for p in (1.0, 25.0, 50.0, 75.0, 99.0):
            assert abs(s.percentile(p) - np.percentile(a, p)) <= w, (t, p)


def test_memory_does_not_grow(tmp_path: Path, nhwc_graph) -> None:
    peaks = []
    for n in (200, 2000):
        folder = tmp_path / f"d{n}"
        folder.mkdir()
        np.save(folder / "batch.npy", random_x(nhwc_graph, n))
        ds = load_dataset(folder, nhwc_graph)
        assert len(ds) == n
        calibrate(nhwc_graph, ds, batch_size=50)  # warm up imports and caches
        tracemalloc.start()
        try:
            calibrate(nhwc_graph, ds, batch_size=50)
            peaks.append(tracemalloc.get_traced_memory()[1])
        finally:
            tracemalloc.stop()
    assert peaks[1] <= 1.5 * peaks[0], peaks


# -- range selection --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def gaussian_outliers() -> np.ndarray:
    rng = np.random.default_rng(0)
    body = rng.standard_normal(200_000)
    outliers = np.array([-40.0, -35.0, 30.0, 38.0, 45.0] * 4)
    return np.concatenate([body, outliers]).astype(np.float32)


def test_entropy_clips_outliers(gaussian_outliers: np.ndarray) -> None:
    s = summarise(gaussian_outliers)
    assert activation_range(s, "minmax") == (s.min, s.max) == (-40.0, 45.0)
    lo8, hi8 = activation_range(s, "entropy", bits=8)
    lo4, hi4 = activation_range(s, "entropy", bits=4)
    lo2, hi2 = activation_range(s, "entropy", bits=2)
    assert 3.0 < hi8 < s.max and lo8 == -hi8  # symmetric on |x|, keeps the body, clips outliers
    assert hi2 <= hi4 <= hi8 and lo4 == -hi4
    relu = summarise(np.maximum(gaussian_outliers, 0))
    lo, hi = activation_range(relu, "entropy", bits=8)
    assert lo == 0.0 and 3.0 < hi < relu.max
    assert activation_range(relu, "entropy", bits=4)[1] <= hi


def test_ranges_contain_zero(gaussian_outliers: np.ndarray) -> None:
    for values in (gaussian_outliers + 60.0, gaussian_outliers - 60.0, gaussian_outliers):
        s = summarise(values)
        for method in ("minmax", "percentile", "entropy", "mse"):
            for bits in (8, 4, 2):
                lo, hi = activation_range(s, method, bits=bits)
                assert lo <= 0.0 <= hi and lo < hi, (method, bits)
                assert s.min - 1e-9 <= lo or lo == 0.0
                assert hi <= s.max + 1e-9 or hi == 0.0
    positive = summarise(gaussian_outliers + 60.0)
    assert activation_range(positive, "minmax") == (0.0, positive.max)
    lo, hi = activation_range(summarise(gaussian_outliers), "percentile", percentile=99.0)
    assert lo == pytest.approx(np.percentile(gaussian_outliers, 1.0), abs=0.05)
    assert hi == pytest.approx(np.percentile(gaussian_outliers, 99.0), abs=0.05)
    with pytest.raises(MpqError, match="unknown range method 'kl'"):
        activation_range(positive, "kl")


def reference_kl(hist: np.ndarray, levels: int, i: int) -> float:
    """KL(P‖Q) for keeping i bins, built bin by bin as TensorRT describes it."""
    h = hist.astype(np.float64)
    p = h[:i].copy()
    p[-1] += h[i:].sum()
    q = np.zeros(i)
    edges = [(j * i) // levels for j in range(levels + 1)]
    for j in range(levels):
        a, b = edges[j], edges[j + 1]
        nonzero = p[a:b] > 0
        if nonzero.any():
            q[a:b][nonzero] = max(h[a:b].sum(), 1e-6) / nonzero.sum()
    p, q = p / p.sum(), q / q.sum()
    m = p > 0
    return float(np.sum(p[m] * np.log(p[m] / q[m])))


def test_kl_closed_form_matches_direct_computation() -> None:
    rng = np.random.default_rng(1)
    hist = rng.poisson(rng.exponential(40.0, 96)).astype(np.int64)
    hist[[5, 17, 30, 31, 60, 95]] = 0
    for levels in (8, 16):
        kl = kl_divergences(hist, levels)
        assert len(kl) == len(hist) - levels + 1
        for i in range(levels, len(hist) + 1):
            assert kl[i - levels] == pytest.approx(reference_kl(hist, levels, i), rel=1e-9,
                                                   abs=1e-12), (levels, i)


def test_entropy_levels_follow_bits(gaussian_outliers: np.ndarray) -> None:
    s = summarise(np.abs(gaussian_outliers))
    thresholds = [entropy_threshold(s, b) for b in (2, 3, 4, 6, 8)]
    assert thresholds == sorted(thresholds)  # fewer levels, more clipping
    sparse = summarise(np.array([0.1, 0.2, 5.0, -7.0], np.float32))
    assert activation_range(sparse, "entropy") == (-7.0, 5.0)  # too few values: no clipping


# -- data sets ---------------------------------------------------------------------------------


def test_npz_and_folder_give_identical_stats(tmp_path: Path, nchw_graph) -> None:
    x = random_x(nchw_graph, 30, seed=7)
    y = np.arange(30) % 10
    ds_npz = load_dataset(save_npz(tmp_path / "d.npz", x=x, y=y), nchw_graph)
    assert np.array_equal(ds_npz.y, y)
    singles = tmp_path / "singles"
    singles.mkdir()
    for i in range(30):
        np.save(singles / f"s{i:03d}.npy", x[i])
    batches = tmp_path / "batches"
    batches.mkdir()
    for name, (a, b) in zip(("a", "b", "c"), ((0, 12), (12, 13), (13, 30)), strict=True):
        np.save(batches / f"{name}.npy", x[a:b])
    ref = calibrate(nchw_graph, ds_npz, batch_size=8)
    for folder in (singles, batches):
        ds = load_dataset(folder, nchw_graph)
        assert len(ds) == 30 and ds.y is None
        assert calibrate(nchw_graph, ds, batch_size=8).to_bytes() == ref.to_bytes()


def test_integer_data_taken_as_is(tmp_path: Path, nhwc_graph) -> None:
    rng = np.random.default_rng(2)
    x8 = rng.integers(0, 256, (20, *onnx_input_shape(nhwc_graph)), dtype=np.uint8)
    a = calibrate(nhwc_graph, load_dataset(save_npz(tmp_path / "u8.npz", x=x8), nhwc_graph))
    b = calibrate(nhwc_graph, load_dataset(save_npz(tmp_path / "f.npz", x=x8.astype(np.float32)),
                                           nhwc_graph))
    assert a.to_bytes() == b.to_bytes()
    assert a.tensors[nhwc_graph.inputs[0]].max == 255.0


def test_save_load_round_trip_and_deterministic_bytes(tmp_path: Path, nchw_graph,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    ds = load_dataset(save_npz(tmp_path / "d.npz", x=random_x(nchw_graph, 40)), nchw_graph)
    stats = calibrate(nchw_graph, ds)
    stats.save(tmp_path / "a.npz")
    back = CalibrationStats.load(tmp_path / "a.npz", nchw_graph)
    assert_same_stats(stats, back)
    for name, s in stats.tensors.items():
        t = back.tensors[name]
        assert (s.mean, s.std) == (t.mean, t.std) and isinstance(t, TensorStats)
    real_time = time.time
    monkeypatch.setattr(time, "time", lambda: real_time() + 3 * 86400)
    calibrate(nchw_graph, ds).save(tmp_path / "b.npz")
    assert (tmp_path / "a.npz").read_bytes() == (tmp_path / "b.npz").read_bytes()


def test_shared_kws_model_real_data(tmp_path: Path) -> None:
    """Real DS-CNN and real MFCC clips: both engines agree, the entropy ranges are sane."""
    graph = import_onnx(shared_model("kws_ref_model_fp32.onnx"))
    with np.load(shared_model("kws01_mfcc_int8_1000.npz")) as z:
        x = (z["x"][:96].astype(np.float32) - 83.0) * 0.5847029
    ds = load_dataset(save_npz(tmp_path / "kws.npz", x=x), graph)
    ort_stats = calibrate(graph, ds, batch_size=32)
    ref_stats = calibrate(graph, ds, batch_size=32, engine="interpreter")
    for name, s in ort_stats.tensors.items():
        r = ref_stats.tensors[name]
        span = max(r.max - r.min, 1e-6)
        assert abs(s.min - r.min) <= 1e-4 * span and abs(s.max - r.max) <= 1e-4 * span, name
        assert s.mean == pytest.approx(r.mean, rel=1e-3, abs=1e-5 * span), name
        lo, hi = activation_range(s, "entropy", bits=8)
        assert min(s.min, 0.0) <= lo <= 0.0 <= hi <= max(s.max, 0.0), name


# -- bad input ---------------------------------------------------------------------------------


def fails(fragments: tuple[str, ...], fn, *args, **kwargs) -> str:
    with pytest.raises(MpqError) as info:
        fn(*args, **kwargs)
    message = str(info.value)
    assert "\n" not in message, message
    for fragment in fragments:
        assert fragment in message, message
    return message


def test_nan_and_inf_name_file_and_sample(tmp_path: Path, nchw_graph) -> None:
    x = random_x(nchw_graph, 40)
    x[17, 1, 2, 3] = np.nan
    ds = load_dataset(save_npz(tmp_path / "nan.npz", x=x), nchw_graph)
    out = tmp_path / "stats.npz"

    def run() -> None:
        calibrate(nchw_graph, ds, batch_size=8).save(out)

    fails(("nan.npz", "sample 17", "NaN"), run)
    assert not out.exists()
    folder = tmp_path / "inf"
    folder.mkdir()
    good = random_x(nchw_graph, 3)
    bad = random_x(nchw_graph, 5)
    bad[4, 0, 0, 0] = -np.inf
    np.save(folder / "a.npy", good)
    np.save(folder / "b.npy", bad)
    ds = load_dataset(folder, nchw_graph)
    fails((str(folder / "b.npy"), "sample 4", "Inf"), calibrate, nchw_graph, ds)
    big = save_npz(tmp_path / "big.npz", x=np.full((2, *onnx_input_shape(nchw_graph)), 1e300))
    fails(("big.npz", "sample 0", "Inf"), calibrate, nchw_graph, load_dataset(big))


def test_empty_data(tmp_path: Path, nchw_graph) -> None:
    empty = save_npz(tmp_path / "empty.npz", x=np.zeros((0, *onnx_input_shape(nchw_graph))))
    fails(("empty.npz", "empty data set"), load_dataset, empty)
    nothing = tmp_path / "nothing.npz"
    np.savez(nothing)
    fails(("nothing.npz", "no array 'x'"), load_dataset, nothing)
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "notes.txt").write_text("no arrays here")
    fails(("folder", "empty data set"), load_dataset, folder)


def test_wrong_shape_names_file_and_both_shapes(tmp_path: Path, nchw_graph) -> None:
    nhwc = np.zeros((4, 16, 12, 3), np.float32)  # NHWC data for an NCHW model
    path = save_npz(tmp_path / "nhwc.npz", x=nhwc)
    fails(("nhwc.npz", "[16, 12, 3]", "[3, 16, 12]"), load_dataset, path, nchw_graph)
    folder = tmp_path / "mixed"
    folder.mkdir()
    np.save(folder / "a.npy", random_x(nchw_graph, 2))
    np.save(folder / "b.npy", np.zeros((3, 16, 16), np.float32))
    ds = load_dataset(folder)
    fails((str(folder / "b.npy"), "[3, 16, 16]", "[3, 16, 12]"), check_dataset, ds, nchw_graph)


def test_bad_files(tmp_path: Path, nchw_graph) -> None:
    fails(("no_x.npz", "no array 'x'", "found images"), load_dataset,
          save_npz(tmp_path / "no_x.npz", images=random_x(nchw_graph, 2)))
    fails(("missing.npz", "no such file"), load_dataset, tmp_path / "missing.npz")
    junk = tmp_path / "junk.npz"
    junk.write_bytes(b"not a zip file at all")
    fails(("junk.npz", "not a readable .npz"), load_dataset, junk)
    labels = save_npz(tmp_path / "labels.npz", x=random_x(nchw_graph, 4), y=np.arange(3))
    fails(("labels.npz", "3 labels for 4 samples"), load_dataset, labels)
    text = save_npz(tmp_path / "text.npz", x=np.array([["a"] * 3] * 2))
    fails(("text.npz", "dtype"), load_dataset, text)
    renamed = tmp_path / "array.npz"
    np.save(tmp_path / "array.npy", random_x(nchw_graph, 2))
    (tmp_path / "array.npy").rename(renamed)
    fails(("array.npz", "not an .npz archive"), load_dataset, renamed)
    not_npy = tmp_path / "d"
    not_npy.mkdir()
    (not_npy / "a.npy").write_bytes(b"garbage")
    fails((str(not_npy / "a.npy"), "not a readable .npy"), load_dataset, not_npy)


def test_stats_file_for_another_model(tmp_path: Path, nchw_graph, nhwc_graph) -> None:
    ds = load_dataset(save_npz(tmp_path / "d.npz", x=random_x(nchw_graph, 8)), nchw_graph)
    path = tmp_path / "stats.npz"
    calibrate(nchw_graph, ds).save(path)
    fails((f"{path} was computed for a different model",), CalibrationStats.load, path,
          nhwc_graph)
    fails(("d.npz", "not a calibration statistics file"), CalibrationStats.load,
          tmp_path / "d.npz", nchw_graph)
    junk = tmp_path / "junk.npz"
    junk.write_bytes(b"\x00" * 10)
    fails(("junk.npz", "not a calibration statistics file"), CalibrationStats.load, junk)
    np.save(tmp_path / "array.npy", np.arange(3))
    fails(("array.npy", "not a calibration statistics file"), CalibrationStats.load,
          tmp_path / "array.npy")
    partial = save_npz(tmp_path / "partial.npz", format=np.array("mpq-calibration"))
    fails(("partial.npz", "not a calibration statistics file"), CalibrationStats.load, partial)


def test_entropy_keeps_a_saturated_cluster() -> None:
    """ReLU6 maps: mass near 0 plus a cluster at 6.0 — KL alone clips the cluster away."""
    from mpq.quant.calibrate import activation_range, summarise

    rng = np.random.default_rng(0)
    x = np.concatenate([rng.exponential(0.05, 95_000).clip(0, 6), np.full(5_000, 6.0)])
    for bits in (8, 4):
        lo, hi = activation_range(summarise(x.astype(np.float32)), "entropy", bits)
        assert lo == 0.0 and hi >= 6.0 * 0.99


# -- speed without changing a number (issue 13 item 5) -----------------------------------------


def _bin_counts_one_pass(x: np.ndarray, width: float, k0: int, bins: int) -> np.ndarray:
    """The histogram formula before chunking, all values at once (the reference)."""
    small = max(abs(k0), abs(k0 + bins)) < 2 ** 22 and 1.0 / width < float(np.finfo(np.float32).max)
    dtype = np.float32 if small else np.float64
    t = np.multiply(x.reshape(-1), dtype(1.0 / width), dtype=dtype)
    np.floor(t, out=t)
    t -= k0
    np.clip(t, 0, bins - 1, out=t)
    return np.bincount(t.astype(np.intp), minlength=bins).astype(np.int64)


@pytest.mark.parametrize("offset", [0.0, 3.0e6])  # float32 bin indices, then float64 ones
def test_chunked_binning_equals_one_pass(offset: float) -> None:
    from mpq.quant.calibrate import _BIN_CHUNK, bin_counts, histogram_grid

    rng = np.random.default_rng(7)
    x = (rng.standard_normal(2 * _BIN_CHUNK + 12_345) * 3 + offset).astype(np.float32)
    x[::1000] = 40.0 + offset  # a few far values, so some bins hold many and most few
    lo, hi = float(x.min()), float(x.max())
    width, k0 = histogram_grid(lo, hi, BINS)
    got = bin_counts(x, width, k0, BINS)
    np.testing.assert_array_equal(got, _bin_counts_one_pass(x, width, k0, BINS))
    assert got.sum() == x.size


def test_moments_scratch_buffer_changes_no_bit() -> None:
    from mpq.quant.calibrate import batch_moments

    x = np.random.default_rng(1).standard_normal((5, 7, 9, 11)).astype(np.float32) + 2.5
    fresh = batch_moments(x)
    scratch = np.full(x.size + 17, np.nan, np.float32)  # larger and dirty: only a view is used
    again = batch_moments(x, float(x.min()), float(x.max()), scratch)
    assert (again.count, again.mean, again.m2, again.lo, again.hi) == \
        (fresh.count, fresh.mean, fresh.m2, fresh.lo, fresh.hi)


def test_onnxruntime_slices_give_the_statistics_of_one_run(tmp_path: Path, nchw_graph,
                                                           nhwc_graph, monkeypatch) -> None:
    """Slices of 1 sample, one tensor per group (each from the model cut after it), and one
    slice and one group per batch give the same bits (min, max, mean, σ and every histogram
    count), on one batch (one pass) and on several (two passes)."""
    import mpq.quant.calibrate as C

    for graph in (nchw_graph, nhwc_graph):
        ds = load_dataset(save_npz(tmp_path / "d.npz", x=random_x(graph, 40, seed=4)), graph)
        for batch in (40, 16):
            monkeypatch.setattr(C, "_SLICE_BYTES", 1 << 40)
            monkeypatch.setattr(C, "_GROUP_BYTES", 1 << 40)
            whole = calibrate(graph, ds, batch_size=batch)
            monkeypatch.setattr(C, "_SLICE_BYTES", 1)
            sliced = calibrate(graph, ds, batch_size=batch)
            monkeypatch.setattr(C, "_GROUP_BYTES", 1)
            grouped = calibrate(graph, ds, batch_size=batch)
            for other in (sliced, grouped):
                assert_same_stats(other, whole)
                assert other.to_bytes() == whole.to_bytes()


def test_onnxruntime_runner_visits_what_one_plain_run_gives(nchw_graph, monkeypatch) -> None:
    """Sliced, grouped and IO-bound, every visited tensor is the array one `session.run` of
    the whole batch returns, bit for bit."""
    import onnxruntime as ort
    from onnx import TensorProto, helper

    import mpq.quant.calibrate as C
    from mpq.frontend.onnx_writer import graph_to_onnx

    monkeypatch.setattr(C, "_SLICE_BYTES", 1)
    monkeypatch.setattr(C, "_GROUP_BYTES", 1)
    x = random_x(nchw_graph, 9, seed=8)
    seen: dict[str, np.ndarray] = {}
    C._ort_runner(nchw_graph)(x, lambda t, v: seen.setdefault(t, v.copy()))
    model = graph_to_onnx(nchw_graph)
    names = [t for n in nchw_graph.nodes for t in n.outputs]
    declared = {o.name for o in model.graph.output}
    model.graph.output.extend(helper.make_tensor_value_info(t, TensorProto.FLOAT, None)
                              for t in names if t not in declared)
    session = ort.InferenceSession(model.SerializeToString(),
                                   providers=["CPUExecutionProvider"])
    plain = dict(zip(names, session.run(names, {nchw_graph.inputs[0]: x}), strict=True))
    # Every tensor once; a group's tensors are visited side by side (`_visit_all`), so only
    # the input's place (first) is fixed.
    assert list(seen)[0] == nchw_graph.inputs[0]
    assert sorted(seen) == sorted([nchw_graph.inputs[0], *names])
    for t in names:
        np.testing.assert_array_equal(seen[t], plain[t], err_msg=t)


def test_groups_after_the_first_run_only_their_own_nodes(nchw_graph) -> None:
    """Each group's session is the segment of nodes after the previous group's (fed the
    earlier tensors it reads), not the model cut from the input: one tensor per group, every
    segment holds just the nodes producing its tensor."""
    import onnxruntime as ort
    from onnx import TensorProto, helper

    import mpq.quant.calibrate as C
    from mpq.frontend.onnx_writer import graph_to_onnx

    model = graph_to_onnx(nchw_graph)
    names = [t for n in nchw_graph.nodes for t in n.outputs]
    declared = {o.name for o in model.graph.output}
    model.graph.output.extend(helper.make_tensor_value_info(t, TensorProto.FLOAT, None)
                              for t in names if t not in declared)
    session = ort.InferenceSession(model.SerializeToString(),
                                   providers=["CPUExecutionProvider"])
    x = random_x(nchw_graph, 1, seed=2)
    shapes = {t: v.shape[1:] for t, v in zip(names, session.run(names, {nchw_graph.inputs[0]: x}),
                                             strict=True)}
    producer = {o: i for i, n in enumerate(model.graph.node) for o in n.output}
    for i, t in enumerate(names):
        seg = C._segment_model(model, names, i, i, shapes)
        assert seg is not None, t
        lo = producer[names[i - 1]] + 1 if i else 0
        assert len(seg[0].graph.node) == producer[t] - lo + 1
        assert [o.name for o in seg[0].graph.output] == [t]
        assert all(f == nchw_graph.inputs[0] or f in names[:i] for f in seg[1])


def test_pool_pages_fall_back_to_numpy_when_the_mapping_is_refused(monkeypatch) -> None:
    """Calibration's pool is an anonymous mapping of ordinary pages; when the kernel refuses
    the mapping it is np.empty's array, as before (writable, the size asked)."""
    import mmap

    from mpq.quant import calibrate as C

    mapped = C.small_pages_float32(1000)
    assert mapped.dtype == np.float32 and mapped.shape == (1000,) and mapped.flags.writeable

    def refuse(*args, **kwargs):
        raise OSError(12, "Cannot allocate memory")

    monkeypatch.setattr(mmap, "mmap", refuse)
    fallback = C.small_pages_float32(1000)
    assert fallback.shape == (1000,) and fallback.flags.writeable
    assert C.small_pages_float32(0).shape == (0,)
