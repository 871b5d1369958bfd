"""The scores the bit search optimises (DESIGN §7.1 VDQS, §7.3 QE-Score; `mpq.search.scores`).

σ̂ must reproduce tinynas' STD_BITS_LUT from the closed form, Φ must be the BitOPs arithmetic
done by hand, the entropies must only fall as bits fall, and on the VWW model the numbers must
land where DESIGN §7.1's measurement put them.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from conftest import shared_model

from mpq.errors import MpqError
from mpq.frontend import load_model
from mpq.ir import Graph, Node, Tensor
from mpq.quant.calibrate import (
    CalibrationStats,
    calibrate,
    load_dataset,
    onnx_input_shape,
    summarise,
)
from mpq.search.scores import (
    SIGMA_A,
    SIGMA_W,
    entropy_fp,
    entropy_quantized,
    fan_in,
    feature_maps,
    full_precision_bitops,
    layer_bitops,
    layer_qe,
    normalising_map,
    qe_score,
    qe_scores,
    sigma_hat,
    vdqs_scores,
)

# ------------------------------------------------------------------------------------------------
# σ̂ (search-anchors §2.4)
# ------------------------------------------------------------------------------------------------

SIGMA_TABLE = {
    4.0: {2: 1.7388, 3: 2.8904, 4: 3.8505, 5: 4.0102, 6: 4.0104, 8: 4.0104},
    5.0: {2: 1.7924, 3: 3.1122, 4: 4.5282, 5: 5.0020, 6: 5.0083, 8: 5.0083},
}


@pytest.mark.parametrize("sigma", sorted(SIGMA_TABLE))
def test_sigma_hat_reproduces_the_tinynas_table(sigma):
    for bits, want in SIGMA_TABLE[sigma].items():
        assert round(sigma_hat(sigma, bits), 4) == pytest.approx(want, abs=1e-12), bits


def test_sigma_hat_without_clipping_is_rounding_noise():
    """At many bits only the unit rounding is left: σ̂² = σ² + 1/12 (Sheppard)."""
    for sigma in (2.0, 4.0, 5.0, 8.0):
        assert sigma_hat(sigma, 16) ** 2 == pytest.approx(sigma ** 2 + 1 / 12, abs=1e-6)


# ------------------------------------------------------------------------------------------------
# A hand-built two-layer graph
# ------------------------------------------------------------------------------------------------


def two_layer_graph() -> Graph:
    """x[1,4,4,2] -conv 3x3 (3 ch, pad 1)-> a[1,4,4,3] -conv 1x1 (5 ch)-> y[1,4,4,5] -avgpool-> p.

    MACs: conv1 3·4·4·3·3·2 = 864, conv2 5·4·4·1·1·3 = 240, pool 0.
    """
    rng = np.random.default_rng(0)
    conv = {"strides": (1, 1), "dilations": (1, 1), "groups": 1, "act_min": 0.0,
            "act_max": math.inf}
    nodes = [
        Node("conv1", "conv2d", ["x"], ["a"], {**conv, "kernel": (3, 3), "pads": (1, 1, 1, 1)},
             rng.standard_normal((3, 3, 3, 2)).astype(np.float32), np.zeros(3, np.float32)),
        Node("conv2", "conv2d", ["a"], ["y"], {**conv, "kernel": (1, 1), "pads": (0, 0, 0, 0)},
             rng.standard_normal((5, 1, 1, 3)).astype(np.float32), np.zeros(5, np.float32)),
        Node("pool", "avg_pool", ["y"], ["p"],
             {"kernel": (4, 4), "strides": (4, 4), "pads": (0, 0, 0, 0),
              "act_min": -math.inf, "act_max": math.inf}),
    ]
    shapes = {"x": (1, 4, 4, 2), "a": (1, 4, 4, 3), "y": (1, 4, 4, 5), "p": (1, 1, 1, 5)}
    return Graph("two_layer", {k: Tensor(k, v) for k, v in shapes.items()}, nodes, ["x"], ["p"])


def synthetic_stats(graph: Graph, constant: str | None = None) -> CalibrationStats:
    """Statistics of made-up activations: ReLU-like maps (half-normal with a spike at 0)."""
    rng = np.random.default_rng(1)
    tensors = {}
    for name in graph.tensors:
        values = np.maximum(rng.standard_normal(20_000), 0.0) * (1.0 + len(name))
        if name == constant:
            values = np.full(100, 0.5)
        tensors[name] = summarise(values)
    return CalibrationStats("synthetic", tensors, 1)


B_FULL = (864 + 240) * 32 * 32


def test_bitops_by_hand():
    g = two_layer_graph()
    assert full_precision_bitops(g) == B_FULL == 1_130_496
    assert layer_bitops(g, {"x": 8, "a": 4}) == {"conv1": 864 * 8 * 8, "conv2": 240 * 8 * 4,
                                                 "pool": 0}
    assert layer_bitops(g, {"x": 2, "a": 2}, {"conv1": 4}) == {"conv1": 864 * 4 * 2,
                                                               "conv2": 240 * 8 * 2, "pool": 0}
    assert layer_bitops(g, {}) == {"conv1": 864 * 64, "conv2": 240 * 64, "pool": 0}


def test_phi_by_hand_global_and_map():
    g = two_layer_graph()
    stats = synthetic_stats(g)
    glob = vdqs_scores(g, stats)
    assert set(glob) == {"a", "y", "p"} == set(feature_maps(g))  # the input x is not scored
    for b in (8, 4, 2):
        saved = 240 * 8 * (32 - b)  # only conv2 reads a
        assert glob["a"].delta_bitops[b] == saved
        assert glob["a"].phi[b] == saved / 1_130_496
        assert glob["y"].phi[b] == glob["p"].phi[b] == 0.0  # read by a pool / by nothing
        assert glob["y"].delta_bitops[b] == 0
    assert glob["a"].phi[4] == pytest.approx(0.0475543, abs=1e-7)

    per_map = vdqs_scores(g, stats, phi_norm="map")
    assert per_map["a"].phi == {8: 0.75, 4: 0.875, 2: 0.9375}
    assert per_map["y"].phi == {8: 0.0, 4: 0.0, 2: 0.0}

    w4 = vdqs_scores(g, stats, weight_bits={"conv2": 4})
    assert w4["a"].delta_bitops[4] == 240 * 4 * 28
    assert w4["a"].phi[4] == 240 * 4 * 28 / 1_130_496  # B stays the 32·32 full precision


def test_score_combines_omega_and_phi():
    g = two_layer_graph()
    stats = synthetic_stats(g)
    for lam in (0.0, 0.3, 0.6, 1.0):
        s = vdqs_scores(g, stats, lam=lam)
        for m in s.values():
            for b in m.bits:
                assert m.score[b] == pytest.approx(-lam * m.omega[b] + (1 - lam) * m.phi[b],
                                                   abs=1e-15)
    s = vdqs_scores(g, stats)
    h_out = entropy_quantized(stats.tensors["p"], 8)  # N = the output p (no softmax to skip)
    assert normalising_map(g) == "p"
    for b in (8, 4, 2):
        want = (entropy_fp(stats.tensors["a"]) - entropy_quantized(stats.tensors["a"], b)) / h_out
        assert s["a"].omega[b] == pytest.approx(want, abs=1e-12)


def test_constant_map_has_no_entropy_and_no_omega():
    g = two_layer_graph()
    s = vdqs_scores(g, synthetic_stats(g, constant="y"))
    assert s["y"].entropy_fp == 0.0
    assert s["y"].entropy == {8: 0.0, 4: 0.0, 2: 0.0}
    assert s["y"].omega == {8: 0.0, 4: 0.0, 2: 0.0}
    with pytest.raises(MpqError, match="'p' is constant"):
        vdqs_scores(g, synthetic_stats(g, constant="p"))


def test_entropy_of_uniform_values_in_closed_form():
    """Uniform [0, 1]: 2 bits keeps levels 0, ⅓, ⅔, 1 with mass ⅙, ⅓, ⅓, ⅙; the 256-bin float
    histogram (centred on a 255-step grid) has 254 bins of 1/255 and two end bins of 1/510."""
    s = summarise(np.random.default_rng(2).random(400_000))
    h2 = -2 * (1 / 6 * math.log(1 / 6) + 1 / 3 * math.log(1 / 3))
    hfp = 254 / 255 * math.log(255) + 2 / 510 * math.log(510)
    assert entropy_quantized(s, 2) == pytest.approx(h2, abs=5e-3)
    assert entropy_fp(s) == pytest.approx(hfp, abs=5e-3)
    assert entropy_quantized(s, 8) == pytest.approx(entropy_fp(s), abs=1e-6)


def test_qe_scores_by_hand():
    g = two_layer_graph()
    assert fan_in(g.nodes[0]) == 18 and fan_in(g.nodes[1]) == 3

    def qe(fan, sx, sw):
        return math.log(fan * sx ** 2 * sw ** 2 / SIGMA_A ** 2) + math.log(SIGMA_A ** 2)

    s8a, s8w = sigma_hat(SIGMA_A, 8), sigma_hat(SIGMA_W, 8)
    total = qe(18, s8a, s8w) + qe(3, s8a, s8w)
    assert qe_score(g) == pytest.approx(total, abs=1e-12)
    assert layer_qe(3, None, 8) == pytest.approx(qe(3, SIGMA_A, s8w), abs=1e-12)
    s = qe_scores(g, lam=0.6)
    for b in (8, 4, 2):
        want = (qe(3, SIGMA_A, s8w) - qe(3, sigma_hat(SIGMA_A, b), s8w)) / total
        assert s["a"].omega[b] == pytest.approx(want, abs=1e-12)
        assert s["a"].score[b] == pytest.approx(-0.6 * want + 0.4 * s["a"].phi[b], abs=1e-15)
        assert s["y"].omega[b] == s["p"].omega[b] == 0.0
    assert s["a"].omega[2] > s["a"].omega[4] > 0 > s["a"].omega[8]  # σ̂(5, 8) > 5: rounding
    assert s["a"].phi == vdqs_scores(g, synthetic_stats(g))["a"].phi


def test_bad_options_are_clear_errors():
    g = two_layer_graph()
    stats = synthetic_stats(g)
    for kwargs, message in [({"lam": 1.5}, "lambda"), ({"phi_norm": "local"}, "phi"),
                            ({"candidates": (8, 1)}, "bitwidth 1"), ({"candidates": ()}, "no "),
                            ({"weight_bits": {"nope": 4}}, "'nope'"),
                            ({"range_method": "median"}, "range method"), ({"bins": 1}, "bins")]:
        with pytest.raises(MpqError, match=message):
            vdqs_scores(g, stats, **kwargs)
    with pytest.raises(MpqError, match="no tensor 'y'"):
        vdqs_scores(g, CalibrationStats("x", {k: v for k, v in stats.tensors.items()
                                               if k != "y"}, 1))


# ------------------------------------------------------------------------------------------------
# The VWW model on random calibration data
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def vww(tmp_path_factory):
    """The VWW model calibrated on 64 random samples in [0, 1] (saved as an npz)."""
    graph = load_model(shared_model("vww_96_float.onnx"))
    x = np.random.default_rng(0).random((64, *onnx_input_shape(graph))).astype(np.float32)
    path = tmp_path_factory.mktemp("vww") / "calib.npz"
    np.savez(path, x=x)
    return graph, calibrate(graph, load_dataset(path, graph))


def test_quantised_entropy_never_exceeds_float_and_falls_with_bits(vww):
    graph, stats = vww
    scored = vdqs_scores(graph, stats)
    for name, m in scored.items():
        h = m.entropy
        assert h[8] <= m.entropy_fp + 1e-4, name  # float32 scales: equal up to 1e-5
        assert h[2] <= h[4] <= h[8], name
        assert m.omega[2] >= m.omega[4] >= m.omega[8] >= -1e-4, name


def test_phi_per_map_normalisation_on_vww(vww):
    graph, stats = vww
    bits = (8, 7, 6, 5, 4, 3, 2)
    s = vdqs_scores(graph, stats, candidates=bits, phi_norm="map")
    read = [m for m in s.values() if m.delta_bitops[8] > 0]
    assert len(read) == 27  # 26 conv outputs read by the next conv, the flatten by the FC
    for m in s.values():
        if m.delta_bitops[8] == 0:
            assert set(m.phi.values()) == {0.0}
            continue
        for b in bits:
            assert 0.75 <= m.phi[b] <= 0.9375
            assert m.phi[b] == pytest.approx((32 - b) / 32, abs=1e-15)


def test_vww_scores_land_in_design_71_ballpark(vww):
    """DESIGN §7.1 measured Ω(i,4) ≈ 0.35–0.52, Ω(i,2) ≈ 0.5–0.76 on the early maps (64 COCO
    images) and global Φ ≤ 0.018, so that S prefers 8 bits everywhere at λ = 0.6."""
    graph, stats = vww
    assert normalising_map(graph) == "Add__87:0"  # the logits, not the softmax output
    s = vdqs_scores(graph, stats)
    print(f"\n{'map':12s} {'H_fp':>6s} {'Ω(8)':>7s} {'Ω(4)':>6s} {'Ω(2)':>6s} {'Φ(4)':>7s} "
          f"{'Φ(2)':>7s}")
    for name, m in s.items():
        print(f"{name[:12]:12s} {m.entropy_fp:6.3f} {m.omega[8]:7.4f} {m.omega[4]:6.3f} "
              f"{m.omega[2]:6.3f} {m.phi[4]:7.4f} {m.phi[2]:7.4f}")
    early = list(s.values())[:6]
    for m in early:
        assert 0.3 <= m.omega[4] <= 0.7, m.name
        assert 0.4 <= m.omega[2] <= 1.0, m.name
        assert abs(m.omega[8]) < 1e-3, m.name
    for m in s.values():
        assert 0.0 <= m.phi[2] <= 0.02, m.name
        assert max(m.score, key=m.score.get) == 8, m.name


def test_qe_on_vww_depthwise_fan_in(vww):
    graph, _ = vww
    depthwise = [n for n in graph.nodes if n.is_depthwise]
    assert depthwise and all(fan_in(n) == 9 for n in depthwise)
    fc = [n for n in graph.nodes if n.op == "fully_connected"][0]
    assert fan_in(fc) == 256
    s = qe_scores(graph)
    conv_in = graph.nodes[1].inputs[0]  # read by one depthwise layer
    assert s[conv_in].omega[4] == pytest.approx(
        2 * math.log(SIGMA_A / sigma_hat(SIGMA_A, 4)) / abs(qe_score(graph)), abs=1e-12)


def test_scores_are_deterministic(vww):
    graph, stats = vww
    first = vdqs_scores(graph, stats, phi_norm="map", lam=0.4)
    assert vdqs_scores(graph, stats, phi_norm="map", lam=0.4) == first
    assert vdqs_scores(graph, stats, candidates=(2, 4, 8, 4), phi_norm="map", lam=0.4) == first
    assert qe_scores(graph) == qe_scores(graph)
    assert list(first) == feature_maps(graph)
