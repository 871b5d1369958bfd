"""Post-training quantisation options (issue 13 item 3): the MSE range (`--method mse`), bias
correction and AdaRound. Each changes parameters, lowers the error it targets on a case where
it must, and keeps export + verify bit-exact because the plan records what it chose."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx_builders as B
import pytest
from conftest import REPO, run_mpq, shared_model
from test_bad_input import assert_clean_failure

from mpq.boards import get_board
from mpq.errors import MpqError
from mpq.frontend import load_model
from mpq.interpreter import conv2d_nhwc, pad_nhwc, run_graph, to_ir_layout
from mpq.plan import load_plan, plan_quant_model
from mpq.quant.arith import choose_activation_params, qrange, round_half_away
from mpq.quant.calibrate import (
    _grid_errors,
    activation_range,
    calibrate,
    dataset_from_array,
    load_dataset,
    onnx_input_shape,
    summarise,
)
from mpq.quant.pipeline import uniform_act_bits
from mpq.quant.ptq import PtqOptions, apply_ptq, fit_adaround, layer_patches, mean_patch
from mpq.quant.qmodel import quantize_graph
from mpq.quant.weights import WeightSpec, pack_rounding, unpack_rounding
from mpq.search.driver import SearchOptions, search
from mpq.sim import dequantize, quantize_input, run_int, run_op
from mpq.verify import verify


def _quant_mse(x: np.ndarray, lo: float, hi: float, bits: int) -> float:
    """Mean squared error of the b-bit asymmetric quantiser of [lo, hi] on the values x."""
    scale, zp = choose_activation_params(lo, hi, bits)
    qmin, qmax = qrange(bits)
    q = np.clip(round_half_away(x / np.float64(np.float32(scale))) + zp, qmin, qmax)
    return float(np.mean((x - np.float32(scale) * (q - zp)) ** 2))


def test_grid_errors_equal_the_direct_sum() -> None:
    """The prefix-sum form of Σ n (c − Q(c))² equals the direct sum for several quantisers."""
    rng = np.random.default_rng(0)
    c = np.sort(rng.normal(size=400))
    n = rng.integers(1, 30, 400).astype(np.float64)
    scale, zp = np.array([0.05, 0.3, 0.9]), np.array([0.0, -2.0, 1.0])
    for bits in (2, 4, 8):
        qmin, qmax = qrange(bits)
        q = np.clip(round_half_away(c[None] / scale[:, None]) + zp[:, None], qmin, qmax)
        direct = ((c[None] - scale[:, None] * (q - zp[:, None])) ** 2 * n).sum(axis=1)
        np.testing.assert_allclose(_grid_errors(c, n, scale, zp, qmin, qmax), direct,
                                   rtol=1e-9)


@pytest.mark.parametrize("bits", [2, 4])
def test_mse_range_is_the_least_squares_clip(bits: int) -> None:
    """On heavy-tailed data (Laplace, signed; and its ReLU), the MSE range's quantiser has a
    lower error on the data than min/max and KL, and within 2 % of the best of a fine
    brute-force search over the same family of ranges."""
    x = np.random.default_rng(1).laplace(size=40_000).astype(np.float32)
    for values in (x, np.maximum(x, 0)):
        stats = summarise(values)
        lo, hi = activation_range(stats, "mse", bits)
        err = _quant_mse(values, lo, hi, bits)
        assert err < _quant_mse(values, *activation_range(stats, "minmax", bits), bits)
        assert err <= _quant_mse(values, *activation_range(stats, "entropy", bits), bits)
        lo0, hi0 = min(float(values.min()), 0.0), float(values.max())
        best = min(_quant_mse(values, a * lo0, a * hi0, bits) for a in np.linspace(0.02, 1, 400))
        assert err <= best * 1.02
        assert lo0 <= lo <= 0.0 <= hi < hi0  # clipped, and 0 stays representable


def test_mse_range_at_8_bits_keeps_a_uniform_tensor_whole() -> None:
    """Nothing to clip on uniform data at 8 bits: the range stays (nearly) [min, max]."""
    stats = summarise(np.random.default_rng(2).uniform(-1, 3, 20_000))
    lo, hi = activation_range(stats, "mse", 8)
    assert lo < -0.98 and hi > 2.95


# -- AdaRound ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def grouped(tmp_path_factory) -> dict:
    """A grouped conv, a dilated conv and a depthwise conv with multiplier 2 (onnx_builders)."""
    path = tmp_path_factory.mktemp("ptq") / "grouped.onnx"
    path.write_bytes(B.grouped_dilated_model().SerializeToString())
    graph = load_model(path)
    rng = np.random.default_rng(3)
    x = rng.random((48, *onnx_input_shape(graph))).astype(np.float32)
    return {"path": path, "graph": graph, "x": x, "calib": x[:32], "check": x[32:]}


def test_layer_patches_reproduce_every_conv(grouped) -> None:
    """Each patch row times an output channel's weights is that channel's output at the
    sampled position (grouped, dilated, strided, depthwise ×2): the Gram matrices AdaRound
    fits on are those of the real convolution."""
    graph = grouped["graph"]
    feeds = {graph.inputs[0]: to_ir_layout(graph, graph.inputs[0], grouped["x"][:4])}
    env = run_graph(graph, feeds, keep=True)
    for node in graph.nodes:
        if node.op != "conv2d":
            continue
        (p,) = layer_patches(node, [env[node.inputs[0]].astype(np.float64)], rows=10**9)
        cout, groups = node.weight.shape[0], node.attrs["groups"]
        w = node.weight.astype(np.float64).reshape(groups, cout // groups, -1)
        y = np.einsum("grd,gcd->rgc", p, w).reshape(p.shape[1], cout) + node.bias
        y = np.clip(y, node.attrs.get("act_min", -np.inf), node.attrs.get("act_max", np.inf))
        np.testing.assert_allclose(y, env[node.outputs[0]].reshape(-1, cout), atol=1e-4)


def test_adaround_beats_nearest_and_is_deterministic(grouped) -> None:
    """At 2 bits, AdaRound's rounding has a lower output error than round-to-nearest on the
    layer's calibration inputs, differs from nearest, and is the same on a second run."""
    graph = grouped["graph"]
    feeds = {graph.inputs[0]: to_ir_layout(graph, graph.inputs[0], grouped["calib"])}
    env = run_graph(graph, feeds, keep=True)
    node = graph.nodes[0]  # the grouped conv: its input is exact, so x̃ = x here
    x = env[node.inputs[0]]
    up, ratio = fit_adaround(node, 2, x, x.astype(np.float64))
    assert up is not None and ratio < 0.95
    again, _ = fit_adaround(node, 2, x, x.astype(np.float64))
    assert np.array_equal(up, again)
    nearest = WeightSpec("linear", 2)
    from mpq.quant.weights import quantize_weights

    chosen = quantize_weights(node.weight, WeightSpec("linear", 2, {"rounding":
                                                                   pack_rounding(up)}))
    assert not np.array_equal(chosen.values, quantize_weights(node.weight, nearest).values)


def test_rounding_mask_round_trip_and_refusals() -> None:
    flags = np.random.default_rng(4).random(13) > 0.5
    assert np.array_equal(unpack_rounding(pack_rounding(flags), 13), flags)
    with pytest.raises(MpqError, match="17 weights need 3"):
        unpack_rounding(pack_rounding(flags), 17)
    padded = pack_rounding(np.ones(16, bool))  # 16 ones, read as 13: padding bits set
    with pytest.raises(MpqError, match="padding bits"):
        unpack_rounding(padded, 13)
    with pytest.raises(MpqError, match="not base64"):
        unpack_rounding("**", 13)


# -- bias correction ---------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["kws_ref_model_fp32.onnx", "vww_96_float.onnx"])
def test_mean_patch_gives_the_mean_output(name: str) -> None:
    """Bias correction's float reference is the mean over samples and positions of W x + b:
    W times the mean input patch (`mean_patch`) equals the mean of the convolution itself, on
    every conv (KWS's 10×4 stride-2 first layer with asymmetric padding, depthwise 3×3 at
    strides 1 and 2, pointwise) and fully connected layer of two real models."""
    graph = load_model(shared_model(name))
    x = np.random.default_rng(3).random((3, *onnx_input_shape(graph))).astype(np.float32)
    inputs: dict[str, np.ndarray] = {}
    name_in = graph.inputs[0]
    inputs[name_in] = to_ir_layout(graph, name_in, x)
    run_graph(graph, dict(inputs), observe=lambda t, v: inputs.__setitem__(t, v))
    layers = [n for n in graph.nodes if n.op in ("conv2d", "fully_connected")]
    assert {n.attrs.get("groups", 1) > 1 for n in layers} == {True, False}
    for node in layers:
        xi = inputs[node.inputs[0]].astype(np.float64)
        w = node.weight.astype(np.float64)
        m = mean_patch(node, xi)
        if node.op == "fully_connected":
            got = w.reshape(w.shape[0], -1) @ m
            want = (xi.reshape(len(xi), -1) @ w.reshape(w.shape[0], -1).T).mean(axis=0)
        else:
            a = node.attrs
            y = conv2d_nhwc(pad_nhwc(xi, a["pads"]), w, a["strides"], a["dilations"],
                            a["groups"], graph.tensors[node.outputs[0]].shape[1:3])
            want = y.reshape(-1, w.shape[0]).mean(axis=0)
            cout, kh, kw, cin_g = w.shape
            groups = a["groups"]
            mg = m.reshape(kh, kw, groups, cin_g)
            got = np.array([np.sum(w[o] * mg[:, :, o // (cout // groups)])
                            for o in range(cout)])
        np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-9, err_msg=node.name)

def _output_shift(qm, graph, x: np.ndarray) -> np.ndarray:
    """Mean per output channel of (integer model − float model) on inputs x (ONNX layout)."""
    name = graph.inputs[0]
    xf = to_ir_layout(graph, name, x)
    out = graph.outputs[0]
    yq = dequantize(qm.acts[out], run_int(qm, {name: quantize_input(qm.acts[name], xf)})[out])
    yf = run_graph(graph, {name: xf})[out]
    return (yq - yf).reshape(-1, yf.shape[-1]).mean(axis=0)


def test_bias_correction_removes_the_mean_shift(grouped) -> None:
    """2-bit weights and 4-bit activations shift the outputs' means; bias correction, fitted
    on calibration samples, changes the biases and shrinks that shift on held-out samples."""
    graph = grouped["graph"]
    stats = calibrate(graph, dataset_from_array(grouped["calib"], "calib"))
    bits = uniform_act_bits(graph, 4)
    ranges = {t: activation_range(stats.tensors[t], "mse", bits[t]) for t in graph.tensors}
    w2 = {n.name: 2 for n in graph.nodes if n.weight is not None}
    qm = quantize_graph(graph, ranges, act_bits=bits, weight_bits=w2)
    fitted = apply_ptq(qm, dataset_from_array(grouped["calib"], "calib"),
                       PtqOptions(bias_correction=True))
    assert set(fitted.corrections) == set(w2)
    assert any(not np.array_equal(fitted.model.layers[n].bias, qm.layers[n].bias) for n in w2)
    before = np.abs(_output_shift(qm, graph, grouped["check"])).mean()
    after = np.abs(_output_shift(fitted.model, graph, grouped["check"])).mean()
    assert after < 0.5 * before, (before, after)


def test_bias_correction_beside_the_float_walk(grouped, monkeypatch) -> None:
    """With bias correction alone the float walk runs in a side thread and hands over each
    layer's mean output: the corrections are those of computing each mean in the integer
    walk itself (`expected_shift` without `mean`), and an error in the float walk is raised
    by `apply_ptq` instead of leaving it waiting."""
    import mpq.quant.ptq as ptq

    graph = grouped["graph"]
    data = dataset_from_array(grouped["calib"], "calib")
    stats = calibrate(graph, data)
    bits = uniform_act_bits(graph, 4)
    ranges = {t: activation_range(stats.tensors[t], "mse", bits[t]) for t in graph.tensors}
    qm = quantize_graph(graph, ranges, act_bits=bits,
                        weight_bits={n.name: 2 for n in graph.nodes if n.weight is not None})
    fitted = apply_ptq(qm, data, PtqOptions(bias_correction=True))
    beside, walk = fitted.corrections, fitted.model
    inline = {}
    n = ptq.walk_samples(qm, len(data), PtqOptions().samples)
    x = next(data.batches(n))
    env_q = {graph.inputs[0]: quantize_input(qm.acts[graph.inputs[0]],
                                             to_ir_layout(graph, graph.inputs[0], x))}
    for node, xs in zip(graph.nodes, ptq._float_walk(graph, to_ir_layout(
            graph, graph.inputs[0], x).astype(np.float32)), strict=False):
        if node.op in ptq.WEIGHTED:
            lq = qm.layers[node.name]
            inline[node.name] = ptq.expected_shift(node, lq, qm.acts[node.inputs[0]], xs[0],
                                                   env_q[node.inputs[0]])
        env_q[node.outputs[0]] = run_op(node, walk.layers[node.name], walk,
                                        [env_q[t] for t in node.inputs],
                                        graph.tensors[node.outputs[0]].shape)
    assert beside.keys() == inline.keys()
    for name in beside:
        assert np.array_equal(beside[name], inline[name]), name

    def broken(node, x):
        raise MpqError("float walk failed")

    monkeypatch.setattr(ptq, "float_mean_output", broken)
    with pytest.raises(MpqError, match="float walk failed"):
        apply_ptq(qm, data, PtqOptions(bias_correction=True))


# -- plans: recorded, rebuilt, bit-exact ---------------------------------------------------------

def _search_and_check(path: Path, x: np.ndarray, opts: SearchOptions, tmp_path: Path):
    """Search, save, reload: the model rebuilt from the plan file has the search's very
    integers, and the exported C matches the integer reference on the host."""
    graph = load_model(path)
    res = search(path, graph, get_board("nano33ble"), dataset_from_array(x, "calib"), opts)
    plan_path = tmp_path / f"{path.stem}.plan.json"
    res.plan.save(plan_path)
    plan = load_plan(plan_path)
    for branch in ("mixed", "outlier"):
        rebuilt = plan_quant_model(plan, graph, branch)
        for name, lq in rebuilt.layers.items():
            if lq.weight is not None and branch == "mixed":
                assert np.array_equal(res.quant.layers[name].weight, lq.weight), name
                assert np.array_equal(res.quant.layers[name].bias, lq.bias), name
    check = np.random.default_rng(9).random((4, *onnx_input_shape(graph))).astype(np.float32)
    assert verify(plan, graph, check, "host").mismatches == 0
    return res, plan


def test_bias_corrected_patch_plan_verifies_bit_exact(tmp_path: Path) -> None:
    """A MobileNetV2-style model (residual adds; patches with VDPC's 8-bit outlier branch,
    which takes the same corrections) at 2-bit weights with `mse` and bias correction."""
    path = tmp_path / "m.onnx"
    path.write_bytes(B.mobilenet_v2(0.35, 32, num_classes=10).SerializeToString())
    x = np.random.default_rng(5).random((32, 3, 32, 32)).astype(np.float32)
    opts = SearchOptions(strategy="vdqs", weight_bits=(2,), weight_scheme="linear",
                         range_method="mse", bias_correction=True, sram=9_000)
    _, plan = _search_and_check(path, x, opts, tmp_path)
    assert plan.patch is not None and plan.patch["vdpc"] is not None
    assert plan.search["bias_correction"] and plan.search["range_method"] == "mse"
    assert "adaround" not in plan.search
    assert all(layer.bias_correction is not None for layer in plan.layers
               if layer.w_bits is not None)


def test_adaround_plan_verifies_bit_exact_and_is_deterministic(grouped, tmp_path: Path
                                                               ) -> None:
    """Grouped, dilated and depthwise ×2 convs at 2-bit weights with AdaRound and bias
    correction: every layer records its mask and correction, export is bit-exact, and the
    same inputs give the same plan bytes."""
    opts = SearchOptions(weight_bits=(2,), weight_scheme="linear", bias_correction=True,
                         adaround=True, patches="none")
    res, plan = _search_and_check(grouped["path"], grouped["calib"], opts, tmp_path)
    assert plan.search["adaround"] and plan.search["bias_correction"]
    weighted = [layer for layer in plan.layers if layer.w_bits is not None]
    assert all("rounding" in (layer.w_params or {}) and layer.bias_correction is not None
               for layer in weighted)
    again = search(grouped["path"], grouped["graph"], get_board("nano33ble"),
                   dataset_from_array(grouped["calib"], "calib"), opts)
    assert again.plan.to_json() == res.plan.to_json()


def test_plans_without_ptq_keep_their_keys(grouped, tmp_path: Path) -> None:
    """Without PTQ (no options, --no-auto-ptq) a plan has no PTQ keys (older plans' bytes are
    unchanged)."""
    res = search(grouped["path"], grouped["graph"], get_board("nano33ble"),
                 dataset_from_array(grouped["calib"], "calib"),
                 SearchOptions(patches="none", auto_ptq=False))
    data = json.loads(res.plan.to_json())
    assert "bias_correction" not in data["search"] and "adaround" not in data["search"]
    assert all("bias_correction" not in layer and "w_params" not in layer
               for layer in data["layers"])


# -- the CLI -----------------------------------------------------------------------------------

def test_ptq_options_refuse_misuse_in_one_line(grouped, tmp_path: Path) -> None:
    """AdaRound on weights it cannot round, PTQ without calibration samples: one line, exit 1,
    no plan written."""
    data = tmp_path / "d.npz"
    np.savez(data, x=grouped["check"], y=np.zeros(len(grouped["check"]), np.int64))
    calib = tmp_path / "c.npz"
    np.savez(calib, x=grouped["calib"])
    model = grouped["path"]
    r = run_mpq("eval", model, "--data", data, "--calib", calib, "--act-bits", "4",
                "--adaround", "--weights", "sym:4", "-q")
    assert_clean_failure(r, "--adaround rounds 4- and 2-bit linear weights")
    r = run_mpq("eval", model, "--data", data, "--act-bits", "4", "--bias-correction",
                "--stats", tmp_path / "none.npz", "-q")
    assert_clean_failure(r, "give --calib")
    r = run_mpq("search", model, "--board", "nano33ble", "--data", calib, "--adaround",
                "--weights", "wentropy:4", "-o", tmp_path / "p.json", "-q")
    assert_clean_failure(r, "--adaround rounds linear weights")
    assert not (tmp_path / "p.json").exists()


# -- PTQ chosen by the measured strategy (search.ptq_choice) -----------------------------------

def test_measured_search_keeps_the_fit_that_measures_best(grouped, tmp_path: Path) -> None:
    """At 2-bit weights the measured strategy tries bias correction, AdaRound and both, fitted
    on the calibration samples it does not measure on; it keeps the one of least measured
    damage (here one beats none), records every candidate, and the plan it writes is
    bit-exact in export (fits judged against float); with auto_ptq off no fit is tried and
    the plan has no PTQ keys."""
    graph = grouped["graph"]
    x = np.random.default_rng(11).random((96, *onnx_input_shape(graph))).astype(np.float32)
    opts = SearchOptions(weight_bits=(2,), weight_scheme="linear", patches="none")
    _, plan = _search_and_check(grouped["path"], x, opts, tmp_path)
    record = plan.search["measured"]["ptq"]
    assert record["fit_samples"] == 96 - 64 and record["validation_samples"] == 64
    damages = {row["fit"]: row["damage_vs_float"] for row in record["candidates"]}
    assert set(damages) == {"none", "bias correction", "AdaRound",
                            "AdaRound + bias correction"}
    assert record["kept"] != "none" and damages[record["kept"]] == min(damages.values())
    weighted = [layer for layer in plan.layers if layer.w_bits is not None]
    assert plan.search.get("adaround", False) == ("AdaRound" in record["kept"])
    assert plan.search.get("bias_correction", False) == ("bias" in record["kept"])
    if "bias" in record["kept"]:
        assert all(layer.bias_correction is not None for layer in weighted)
    off = search(grouped["path"], graph, get_board("nano33ble"), dataset_from_array(x, "calib"),
                 SearchOptions(weight_bits=(2,), weight_scheme="linear", patches="none",
                               auto_ptq=False)).plan
    assert "ptq" not in off.search["measured"] and "bias_correction" not in off.search
    assert all(layer.bias_correction is None and "rounding" not in (layer.w_params or {})
               for layer in off.layers)
    # Against the all-8-bit-activation reference (which has the 2-bit weights) the plain plan
    # measures 0: why the fits are judged against float.
    assert off.search["measured"]["damage"] == 0.0 < damages["none"]


def test_measured_int8_plan_is_fitted_against_float_too(tmp_path: Path) -> None:
    """An all-8-bit plan measures 0 against the search's all-8-bit reference but not against
    float: the measured strategy tries bias correction on it as on any plan and keeps it when
    the validation samples measure it closer to float — on the Fashion example's int8 plan it
    does (top-1 on all 10,000 test images 90.98 → 91.08 %) — and the plan stays bit-exact."""
    ex = REPO / "examples" / "fashion"
    graph = load_model(ex / "fashion_cnn.onnx")
    res = search(ex / "fashion_cnn.onnx", graph, get_board("nano33ble"),
                 load_dataset(ex / "calib.npz", graph), SearchOptions())
    plan = res.plan
    assert all(layer.a_bits_out == 8 for layer in plan.layers)
    record = plan.search["measured"]["ptq"]
    damages = {row["fit"]: row["damage_vs_float"] for row in record["candidates"]}
    assert set(damages) == {"none", "bias correction"}
    assert record["kept"] == "bias correction" and damages["bias correction"] < damages["none"]
    assert plan.search["bias_correction"] is True
    # against the all-8-bit reference: the bits measure 0, the fitted model does not
    assert plan.search["measured"]["damage_before_ptq"] == 0 < plan.search["measured"]["damage"]
    assert all(layer.bias_correction is not None for layer in plan.layers
               if layer.w_bits is not None)
    plan.save(tmp_path / "p.json")
    with np.load(ex / "test.npz") as d:
        check = d["x"][:4]
    assert verify(load_plan(tmp_path / "p.json"), graph, check, "host").mismatches == 0


def test_measured_search_bounds_the_adaround_it_tries(grouped, monkeypatch) -> None:
    """AdaRound's cost grows with c_out·d² per Adam step (minutes on MobileNetV2-1.0's
    classifier): beyond AUTO_ADAROUND_MACS the measured strategy tries only bias correction,
    and the plan says why AdaRound was not tried."""
    from mpq.search import ptq_choice
    graph = grouped["graph"]
    x = np.random.default_rng(11).random((96, *onnx_input_shape(graph))).astype(np.float32)
    monkeypatch.setattr(ptq_choice, "AUTO_ADAROUND_MACS", 0)
    plan = search(grouped["path"], graph, get_board("nano33ble"), dataset_from_array(x, "calib"),
                  SearchOptions(weight_bits=(2,), weight_scheme="linear", patches="none")).plan
    record = plan.search["measured"]["ptq"]
    assert {row["fit"] for row in record["candidates"]} == {"none", "bias correction"}
    assert record["note"].startswith("AdaRound not tried:") and "--adaround" in record["note"]
    assert not plan.search.get("adaround", False)
