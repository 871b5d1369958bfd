"""Weight schemes (DESIGN §7.4): weighted-entropy codebooks (Park et al.), the data-free
symmetric / asymmetric / power-of-two quantisers (Nayak et al.), their storage as b-bit codes,
plans that rebuild them exactly, exports that compute what the reference computes, the
compressed size of the weight blob, and Park et al.'s log-domain activation levels."""

from __future__ import annotations

import gzip
import itertools
import json
import lzma
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import run_mpq
from test_bad_input import assert_clean_failure

from mpq.boards import get_board
from mpq.frontend import load_model
from mpq.plan import load_plan, plan_quant_model
from mpq.quant import arith, logquant
from mpq.quant import weights as W
from mpq.quant.calibrate import dataset_from_array
from mpq.search.driver import SearchOptions, search
from mpq.verify import verify

# -- packing -------------------------------------------------------------------------------------


def test_three_bit_codes_straddle_bytes_little_endian() -> None:
    # codes 1..7, 0: stream bits (LSB first) 100 010 110 001 101 011 111 000
    assert arith.pack(np.array([1, 2, 3, 4, 5, 6, 7, 0]), 3).tolist() == [209, 88, 31]
    rng = np.random.default_rng(0)
    for bits in (2, 3, 4, 8):
        for n in (1, 3, 8, 11, 64):
            codes = rng.integers(0, 1 << bits, n)
            buf = arith.pack(codes, bits)
            assert len(buf) == -(-n * bits // 8)
            assert np.array_equal(arith.unpack(buf, bits, n, signed=False), codes)
            signed = ((codes ^ (1 << (bits - 1))) - (1 << (bits - 1)))
            assert np.array_equal(arith.unpack(buf, bits, n), signed)


# -- weighted entropy ------------------------------------------------------------------------------

def _brute_force_best(w: np.ndarray, bits: int) -> float:
    mags = np.unique(np.abs(w.astype(np.float64)))
    clusters = min(1 << (bits - 1), len(mags))
    return max(W.weighted_entropy(w, [mags[i] for i in cut])
               for cut in itertools.combinations(range(1, len(mags)), clusters - 1))


@pytest.mark.parametrize("seed", range(8))
def test_wentropy_boundaries_maximise_weighted_entropy(seed: int) -> None:
    """On small layers the boundary search is exact: no choice of boundaries between distinct
    magnitudes has a larger S = −Σ I_n P_n log P_n."""
    rng = np.random.default_rng(seed)
    w = rng.laplace(size=(2, int(rng.integers(5, 8)))).astype(np.float32)
    w[1, :2] = -w[0, :2]  # equal magnitudes of both signs
    w[1, 2] = w[0, 3]
    for bits in (2, 3):
        best = W.weighted_entropy(w, W.wentropy_boundaries(w, bits))
        assert best == pytest.approx(_brute_force_best(w, bits), rel=1e-12, abs=1e-15)


def test_wentropy_large_layer_is_a_local_optimum() -> None:
    """Beyond the exact grid, no single boundary can move to a better place (the paper's
    incremental search has converged), and S beats equal-count clusters."""
    w = np.random.default_rng(3).normal(size=(32, 3, 3, 16)).astype(np.float32)
    bits = 3
    bounds = W.wentropy_boundaries(w, bits)
    s = W.weighted_entropy(w, bounds)
    mags = np.unique(np.abs(w.astype(np.float64)))
    assert len(mags) > W.WENTROPY_GRID
    for k in range(len(bounds)):
        lo = bounds[k - 1] if k else mags[0]
        hi = bounds[k + 1] if k + 1 < len(bounds) else np.inf
        for m in mags[(mags > lo) & (mags < hi)][::7]:
            moved = list(bounds)
            moved[k] = float(m)
            assert W.weighted_entropy(w, moved) <= s + 1e-12
    quantiles = np.quantile(np.abs(w), [0.25, 0.5, 0.75])
    equal = [float(mags[np.searchsorted(mags, q)]) for q in quantiles]
    assert s > W.weighted_entropy(w, equal)


@pytest.mark.parametrize("bits", [4, 3, 2])
def test_wentropy_codebook_is_int8_with_2_to_the_b_entries(bits: int) -> None:
    w = np.random.default_rng(bits).normal(size=(8, 3, 3, 4)).astype(np.float32)
    w *= np.array([1.0, 0.5, 4.0, 0.125, 2.0, 1.0, 0.25, 8.0], np.float32)[:, None, None, None]
    q = W.quantize_weights(w, W.WeightSpec("wentropy", bits))
    cb = q.codebook
    assert cb.dtype == np.int8 and len(cb) == 1 << bits
    assert cb.max() == 127 and np.array_equal(cb, -cb[::-1])  # ± pairs, largest level 127
    assert (np.diff(cb.astype(int)) >= 0).all()
    assert set(np.unique(q.values)) <= set(cb.tolist())
    assert (np.sign(q.values) * np.sign(w) >= 0).all()  # signs kept
    assert q.params["normalise"] == "channel"
    # clusters of w / max|w[o]|; representatives √(mean w'²), re-quantised with one level
    # scale s = max rep/127; channel o's weight scale is max|w[o]|·s
    amax = np.abs(w.astype(np.float64)).reshape(len(w), -1).max(axis=1)
    wn = w.astype(np.float64) / amax[:, None, None, None]
    k = np.searchsorted(q.params["boundaries"], np.abs(wn), side="right")
    reps = {c: np.sqrt((wn[k == c] ** 2).mean()) for c in np.unique(k)}
    s = float(np.float32(max(reps.values()) / 127))
    assert np.array_equal(q.scale, (amax * s).astype(np.float32))
    for c, rep in reps.items():
        assert abs(rep / s - np.abs(q.values[k == c])[0]) <= 0.5 + 1e-9
        assert len(np.unique(np.abs(q.values[k == c]))) == 1
    # recorded params rebuild the same weights; other params are refused
    again = W.quantize_weights(w, W.WeightSpec("wentropy", bits, q.params))
    assert np.array_equal(again.values, q.values) and np.array_equal(again.scale, q.scale)
    bad = dict(q.params, codebook=[0] * (1 << bits))
    with pytest.raises(W.MpqError, match="does not match"):
        W.quantize_weights(w, W.WeightSpec("wentropy", bits, bad))


@pytest.mark.parametrize("spec", ["wentropy:4", "wentropy:2"])
def test_per_channel_normalisation_makes_codes_independent_of_channel_range(spec: str) -> None:
    """Scaling one output channel by a power of two leaves every code and the codebook as they
    were and scales only that channel's weight scale (our per-channel normalisation)."""
    w = np.random.default_rng(11).normal(size=(6, 3, 3, 5)).astype(np.float32)
    w[4] = 0.0  # an all-zero channel keeps a finite scale
    q = W.quantize_weights(w, W.parse_weights(spec))
    assert np.isfinite(q.scale).all() and (q.scale > 0).all()
    # Park et al.'s codebook has no zero level, so 0 takes the smallest + level
    zero = q.codebook[len(q.codebook) // 2]
    assert (q.values[4] == zero).all()
    f = np.array([1, 16, 1, 1 / 32, 1, 1], np.float32)
    q2 = W.quantize_weights(w * f[:, None, None, None], W.parse_weights(spec))
    assert np.array_equal(q2.values, q.values) and q2.params == q.params
    assert np.array_equal(q2.scale, q.scale * f)
    assert np.array_equal(q2.codebook, q.codebook)
    per_layer = W.WeightSpec(spec.split(":")[0], int(spec[-1]), {"boundaries": [],
                                                                 "codebook": []})
    with pytest.raises(W.MpqError, match="older mpq"):
        W.quantize_weights(w, per_layer)


# -- data-free quantisers --------------------------------------------------------------------------

@pytest.mark.parametrize("bits,per_channel", [(4, False), (3, False), (2, False), (4, True)])
def test_pow2_values_are_powers_of_two_rounded_in_the_log_domain(bits: int,
                                                                 per_channel: bool) -> None:
    w = np.random.default_rng(bits).normal(size=(16, 50)).astype(np.float32)
    w *= np.geomspace(1 / 64, 4, 16).astype(np.float32)[:, None]  # channels of unequal range
    values, scale = W.quantize_pow2(w, bits, per_channel=per_channel)
    top = W.pow2_max_exponent(bits)
    mag = np.abs(values.astype(int))
    assert set(np.unique(mag)) <= {0} | {1 << e for e in range(top + 1)}
    if per_channel:  # every channel reaches the top level
        assert (mag.max(axis=1) == 1 << top).all()
        amax = np.abs(w.astype(np.float64)).max(axis=1, keepdims=True)
    else:  # the paper's one scale per layer: only the widest channel does
        assert mag.max() == 1 << top and mag[0].max() < 1 << top
        amax = np.full((16, 1), np.abs(w.astype(np.float64)).max())
    assert np.array_equal(scale, (amax[:, 0] / (1 << top)).astype(np.float32))
    assert (np.sign(values) * np.sign(w) >= 0).all()
    x = np.abs(w.astype(np.float64)) / amax * (1 << top)
    big = x >= 0.5
    assert (mag[~big] == 0).all() and (mag[big] > 0).all()
    e = np.clip(np.floor(np.log2(x[big]) + 0.5), 0, top)  # round(log2 x), away from ties
    assert np.array_equal(mag[big], 2 ** e.astype(int))


@pytest.mark.parametrize("bits", [8, 6, 5, 3])
def test_sym_and_asym_are_data_free_linear_grids(bits: int) -> None:
    w = np.random.default_rng(bits).normal(0.3, 1.0, size=(6, 40)).astype(np.float32)
    q, s = W.quantize_sym(w, bits)
    assert np.abs(q).max() == (1 << (bits - 1)) - 1 and np.all(s == s[0])
    assert np.abs(w - q * s[0]).max() <= s[0] / 2 * (1 + 1e-6)
    v, s, zp = W.quantize_asym(w, bits)
    assert 0 <= zp < 1 << bits and (v + zp).min() >= 0 and (v + zp).max() <= (1 << bits) - 1
    assert np.abs(w - v.astype(np.float64) * s[0]).max() <= s[0] / 2 * (1 + 1e-6)


@pytest.mark.parametrize("spec", ["linear:8", "linear:4", "linear:2", "wentropy:4",
                                  "wentropy:3", "wentropy:2", "sym:8", "sym:4", "sym:3",
                                  "sym:2", "pow2:4", "pow2:3", "pow2:2"])
def test_encoded_codes_decode_to_the_reference_values(spec: str) -> None:
    w = np.random.default_rng(7).normal(size=(5, 3, 3, 7)).astype(np.float32)
    q = W.quantize_weights(w, W.parse_weights(spec))
    enc = W.encode(q.values, q.scheme, q.bits, q.codebook)
    assert len(enc.data) == -(-w.size * q.bits // 8)
    codes = arith.unpack(enc.data, q.bits, w.size, signed=False)
    assert np.array_equal(W.decode(codes, enc.format, q.bits, enc.codebook),
                          q.values.reshape(-1))


def test_unsupported_specs_are_refused() -> None:
    for text, fragment in (("asym:4", "reference-only"), ("wentropy:8", "4, 3, 2 bits"),
                           ("pow2:5", "4, 3, 2 bits"), ("sym:6", "8, 4, 3, 2 bits"),
                           ("huffman:4", "unknown scheme"), ("wentropy:x", "SCHEME:BITS")):
        with pytest.raises(W.MpqError, match=fragment):
            W.parse_weights(text, for_export=True)
    assert W.parse_weights("asym:4").scheme == "asym"  # fine for the reference


# -- plans, export, verify -----------------------------------------------------------------------

FASHION = Path(__file__).resolve().parent.parent / "examples" / "fashion"


def _search(tmp: Path, kws: dict[str, Path], weights: str, **opts) -> tuple:
    """A plan with every layer under `weights`: KWS, or with `fashion=True` the example
    (which the demo's 14,000 B budget puts into patches)."""
    source = FASHION if opts.pop("fashion", False) else None
    model = tmp / ("fashion_cnn.onnx" if source else "kws.onnx")
    if not model.exists():
        shutil.copy(source / "fashion_cnn.onnx" if source else kws["model"], model)
    graph = load_model(model)
    scheme, bits = weights.split(":")
    calib = dataset_from_array(np.load(source / "calib.npz" if source else kws["calib"])["x"],
                               "calib")
    res = search(model, graph, get_board("nano33ble"), calib,
                 SearchOptions(weight_scheme=scheme, weight_bits=(int(bits),), **opts))
    path = tmp / f"{scheme}{bits}.plan.json"
    res.plan.save(path)
    return res, graph, path


def test_plan_records_the_scheme_and_rebuilds_the_same_weights(kws, tmp_path: Path) -> None:
    res, graph, path = _search(tmp_path, kws, "wentropy:3", patches="none")
    data = json.loads(path.read_text())
    weighted = [layer for layer in data["layers"] if layer["w_bits"]]
    assert weighted and all(layer["w_scheme"] == "wentropy" and layer["w_bits"] == 3
                            for layer in weighted)
    assert all(len(layer["w_params"]["codebook"]) == 8 for layer in weighted)
    assert all("w_scheme" not in layer for layer in data["layers"] if not layer["w_bits"])
    assert data["search"]["weights"] == "wentropy:3"
    rebuilt = plan_quant_model(load_plan(path), graph)
    for name, lq in res.quant.layers.items():
        if lq.weight is not None:
            assert np.array_equal(rebuilt.layers[name].weight, lq.weight)
            assert np.array_equal(rebuilt.layers[name].weight_codebook, lq.weight_codebook)
            assert np.array_equal(rebuilt.layers[name].bias, lq.bias)
    assert load_plan(path).to_json() == path.read_text()
    again, _, path2 = _search(tmp_path / "..", kws, "wentropy:3", patches="none")
    assert path2.read_bytes() == path.read_bytes()  # deterministic
    # Flash counts the packed 3-bit codes and an 8-entry codebook per layer
    n = {layer.name: layer for layer in graph.nodes if layer.weight is not None}
    expected = sum(-(-n[x["name"]].weight.size * 3 // 8) + 8 + 12 * n[x["name"]].weight.shape[0]
                   for x in weighted)
    assert data["predicted"]["flash_bytes"] == expected


def test_old_plans_without_the_field_are_linear(kws, tmp_path: Path) -> None:
    res, graph, path = _search(tmp_path, kws, "linear:4", patches="none")
    data = json.loads(path.read_text())
    assert all("w_scheme" not in layer and "w_params" not in layer for layer in data["layers"])
    qm = plan_quant_model(load_plan(path), graph)
    for node in graph.nodes:
        if node.weight is not None:
            q, _ = arith.quantize_weights_symmetric(node.weight, 4)
            assert qm.layers[node.name].weight_scheme == "linear"
            assert np.array_equal(qm.layers[node.name].weight, q)


def _have_cross_tools() -> bool:
    ok = shutil.which("arm-none-eabi-gcc") and shutil.which("qemu-system-arm")
    if not ok and os.environ.get("CI"):
        pytest.fail("cross tools missing in CI")
    return bool(ok)


@pytest.mark.parametrize("weights,fashion", [("wentropy:4", False), ("pow2:4", True),
                                             ("wentropy:3", True), ("sym:3", False),
                                             ("pow2:2", False)])
def test_exports_compute_what_the_reference_computes(kws, tmp_path: Path, weights: str,
                                                     fashion: bool) -> None:
    # VDPC (the paper's vdqs): its 8-bit outlier branch decodes the codes per patch too
    res, graph, path = _search(tmp_path, kws, weights, patches="auto" if fashion else "none",
                               sram=14_000 if fashion else None, fashion=fashion,
                               **({"strategy": "vdqs"} if fashion else {}))
    if fashion:
        assert res.plan.patch is not None and res.plan.patch["vdpc"]  # codes per patch too
    x = np.load(FASHION / "test.npz" if fashion else kws["test"])["x"][:12]
    assert verify(res.plan, graph, x, "host").mismatches == 0
    if not weights.startswith("sym") and _have_cross_tools():
        # The codebook / power-of-two decode on the DSP loops (PKHBT of two table values) is
        # code only the target runs: 4, 3 and 2-bit codes, on the Cortex-M4.
        result = verify(res.plan, graph, x[:3], "qemu-m4")
        assert result.mismatches == 0 and result.instructions


def test_export_writes_codes_and_codebooks_and_inspect_measures_that_blob(kws,
                                                                          tmp_path: Path) -> None:
    _, _, path = _search(tmp_path, kws, "wentropy:4", patches="none")
    out = tmp_path / "fw"
    assert run_mpq("export", path, "-o", out).returncode == 0
    src = (out / "mpq_weights.c").read_text()
    assert "const int8_t mpq_l0_cb[16]" in src
    assert "MPQ_WFMT_CODEBOOK, mpq_l0_cb" in (out / "mpq_model.c").read_text()
    arrays = re.findall(r"const (u?int8_t) (mpq_l\d+_(?:w|cb))\[\d+\][^{]*\{([^}]*)\}", src)
    blob = b"".join(np.array([int(v) for v in body.replace("\n", " ").split(",") if v.strip()],
                             np.int64).astype(np.uint8 if t == "uint8_t" else np.int8).tobytes()
                    for t, _, body in arrays)
    r = run_mpq("inspect", tmp_path / "kws.onnx", "--compress", "--weights", "wentropy:4",
                "--json")
    assert r.returncode == 0, r.stderr
    c = json.loads(r.stdout)["compress"]
    assert c["raw"] == len(blob)
    assert c["gzip"] == len(gzip.compress(blob, mtime=0))
    assert c["lzma"] == len(lzma.compress(blob))
    r8 = json.loads(run_mpq("inspect", tmp_path / "kws.onnx", "--compress", "--json").stdout)
    assert r8["compress"]["raw"] == r8["compress"]["parameters"]  # linear:8, one byte each


def test_refusals_are_one_line(kws, tmp_path: Path) -> None:
    _, _, path = _search(tmp_path, kws, "pow2:4", patches="none")
    model = tmp_path / "kws.onnx"
    plan = tmp_path / "p.json"
    assert_clean_failure(run_mpq("search", model, "--board", "nano33ble", "--data",
                                 kws["calib"], "--weights", "asym:4", "-o", plan),
                         "reference-only")
    assert_clean_failure(run_mpq("search", model, "--board", "nano33ble", "--data",
                                 kws["calib"], "--weights", "wentropy:8", "-o", plan), "4, 3, 2")
    assert_clean_failure(run_mpq("search", model, "--board", "nano33ble", "--data",
                                 kws["calib"], "--weights", "wentropy:4", "--weight-bits", "8,4",
                                 "-o", plan), "--weight-bits")
    assert not plan.exists()
    assert_clean_failure(run_mpq("export", path, "-o", tmp_path / "fw", "--backend", "cmsis-nn"),
                         "linear weights only", "pow2:4")
    assert not (tmp_path / "fw").exists()
    assert_clean_failure(run_mpq("inspect", model, "--compress", "--weights", "asym:4"),
                         "reference-only")
    assert_clean_failure(run_mpq("eval", path, "--data", kws["test"], "--weights", "sym:4"),
                         "--weights")
    assert_clean_failure(run_mpq("eval", model, "--data", kws["test"], "--act-quant", "log"),
                         "--calib")


# -- eval: reference-only schemes and log activations ---------------------------------------------

def test_eval_asym_weights_and_log_activations(kws, tmp_path: Path) -> None:
    d = np.load(kws["test"])
    small = tmp_path / "small.npz"
    np.savez(small, x=d["x"][:150], y=d["y"][:150])
    r = run_mpq("eval", kws["model"], "--data", small, "--calib", kws["calib"], "--act-bits",
                "8", "--weights", "asym:6", "--act-quant", "log", "--json", "-q")
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    assert res["weights"] == "asym:6" and res["samples"] == 150
    assert res["int8"] > 0.85 and res["log8"] > 0.85  # both near the float model
    assert abs(res["float"] - res["int8"]) < 0.05


def test_log_levels_maximise_the_weighted_entropy() -> None:
    x = np.random.default_rng(0).lognormal(-2.0, 1.5, 4000)
    hist = logquant.log_histogram(x)
    for bits, signed in ((3, False), (2, True), (4, False)):
        q = logquant.choose_log_levels(hist, bits, signed)
        levels = 1 << (bits - 1) if signed else 1 << bits
        nz = np.nonzero(hist)[0]
        best = max(logquant.weighted_log_entropy(hist, off + logquant.LOW, 2 * half, levels)
                   for half in range(1, logquant.MAX_HALF_STEP + 1)
                   for off in range(nz[0], max(nz[-1] - half * (2 * levels - 5), nz[0]) + 1))
        assert logquant.weighted_log_entropy(hist, q.offset, q.step, levels) == pytest.approx(best)
        y = q.apply(np.concatenate([x, -x]))
        vals = np.unique(np.abs(y[y != 0]))
        assert set(vals) <= set(q.level_values().astype(np.float32)) and len(vals) < levels
        assert (y[len(x):] == (-y[:len(x)] if signed else 0)).all()
