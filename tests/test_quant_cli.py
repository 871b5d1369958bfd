"""`mpq calibrate`, `mpq run`, `mpq eval` as a user runs them, and the KWS accuracy anchor."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx_builders as B
import pytest
from conftest import run_mpq, shared_model
from test_bad_input import assert_clean_failure

from mpq.evaluate import accuracy, quant_predictions
from mpq.frontend import load_model
from mpq.quant.calibrate import calibrate, load_dataset
from mpq.quant.pipeline import load_for_quantisation, quantise


def test_kws_int8_accuracy_at_least_tflite(kws) -> None:
    """mpq's own int8 quantisation of the float DS-CNN ≥ TFLite's int8 model, same 900 clips."""
    calib, test = kws["calib"], kws["test"]
    onnx_path = shared_model("kws_ref_model_fp32.onnx")
    graph = load_model(onnx_path)
    stats = calibrate(graph, load_dataset(calib, graph))
    ds = load_dataset(test, graph)
    ours = accuracy(quant_predictions(quantise(graph, stats, 8), ds), ds.y)
    tflite = load_for_quantisation(shared_model("kws_ref_model.tflite"))
    theirs = accuracy(quant_predictions(tflite.own_quant, load_dataset(test, tflite.graph)),
                      ds.y)
    print(f"KWS 900 clips: mpq int8 {ours:.4f}, TFLite int8 {theirs:.4f}")
    assert theirs > 0.85  # sanity: the TFLite model really is evaluated
    assert ours >= theirs


def test_calibrate_run_eval_commands(tmp_path: Path, kws) -> None:
    calib, test = kws["calib"], kws["test"]
    model = shared_model("kws_ref_model_fp32.onnx")
    stats = tmp_path / "stats.npz"
    r = run_mpq("calibrate", model, "--data", calib, "-o", stats)
    assert r.returncode == 0, r.stderr
    assert "100 samples" in r.stdout and stats.exists()
    x = np.load(test)["x"][:3]
    np.save(tmp_path / "x.npy", x)
    r = run_mpq("run", model, "--input", tmp_path / "x.npy", "--stats", stats, "-o",
                tmp_path / "y.npy")
    assert r.returncode == 0, r.stderr
    y = np.load(tmp_path / "y.npy")
    assert y.shape == (3, 12) and y.dtype == np.int8
    r = run_mpq("eval", model, "--data", test, "--stats", stats, "--act-bits", "8,4",
                "--json")
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    assert d["samples"] == 900 and {"float", "int8", "act4"} <= set(d)
    assert d["float"] > 0.9 and d["int8"] > 0.9 and d["act4"] < d["int8"]


def test_run_int8_tflite_uses_its_own_parameters(tmp_path: Path, kws) -> None:
    test = kws["test"]
    np.save(tmp_path / "x.npy", np.load(test)["x"][:4])
    r = run_mpq("run", shared_model("kws_ref_model.tflite"), "--input", tmp_path / "x.npy",
                "-o", tmp_path / "y.npy")
    assert r.returncode == 0, r.stderr
    assert "scale 0.00390625, zero point -128" in r.stdout


def _npz(path: Path, **arrays) -> Path:
    np.savez(path, **arrays)
    return path


@pytest.mark.parametrize("case", ["nan", "inf", "empty", "shape", "other_model_stats"])
def test_bad_calibration_input(tmp_path: Path, case: str) -> None:
    src = tmp_path / "m.onnx"
    src.write_bytes(B.tf2onnx_style_model().SerializeToString())
    good = np.random.default_rng(0).random((8, 16, 16, 3)).astype(np.float32)
    out = tmp_path / "stats.npz"
    if case == "other_model_stats":
        other = tmp_path / "other.onnx"
        other.write_bytes(B.kws_style_model().SerializeToString())
        kx = np.random.default_rng(0).random((4, 49, 10, 1)).astype(np.float32)
        assert run_mpq("calibrate", other, "--data", _npz(tmp_path / "k.npz", x=kx), "-o",
                       tmp_path / "kstats.npz").returncode == 0
        np.save(tmp_path / "x.npy", good[:1])
        r = run_mpq("run", src, "--input", tmp_path / "x.npy", "--stats",
                    tmp_path / "kstats.npz", "-o", out)
        assert_clean_failure(r, "different model")
        assert not out.exists()
        return
    data = {"nan": good.copy(), "inf": good.copy(), "empty": good[:0],
            "shape": good[:, :8]}[case]
    if case == "nan":
        data[3, 1, 1, 0] = np.nan
    if case == "inf":
        data[5, 0, 0, 2] = np.inf
    r = run_mpq("calibrate", src, "--data", _npz(tmp_path / "d.npz", x=data), "-o", out)
    fragment = {"nan": "NaN", "inf": "Inf", "empty": "empty", "shape": "shape"}[case]
    assert_clean_failure(r, "d.npz", fragment)
    assert not out.exists()


def test_eval_model_exported_with_a_fixed_batch_of_one(tmp_path: Path) -> None:
    """Many exporters pin the batch to 1: the float pass must not feed it batches of 64."""
    model = B.kws_style_model(channels=8, num_blocks=1)
    model.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 1
    path = tmp_path / "fixed_batch.onnx"
    path.write_bytes(model.SerializeToString())
    rng = np.random.default_rng(3)
    data = _npz(tmp_path / "d.npz", x=rng.standard_normal((70, 49, 10, 1)).astype(np.float32),
                y=rng.integers(0, 12, 70))
    r = run_mpq("eval", path, "--data", data, "--calib", data, "--json")
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    assert d["samples"] == 70 and 0.0 <= d["float"] <= 1.0
