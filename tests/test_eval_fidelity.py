"""`mpq eval` without labels: per-output top-1 agreement, cosine similarity and SQNR of the
int8 model and the plan against the float model, checked against numpy on the same outputs."""

from __future__ import annotations

import json
import math
import re
import shutil
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest
from click.testing import CliRunner
from conftest import REPO, run_mpq, shared_model
from test_bad_input import assert_clean_failure

from mpq.cli import main
from mpq.errors import MpqError
from mpq.evaluate import (
    PlanRunner,
    evaluate,
    output_tasks,
    plan_int8_ranges,
    quant_output_dict,
)
from mpq.fidelity import FidelitySums, fidelity_summary, is_classifier
from mpq.frontend import load_model
from mpq.plan import load_plan_with_model
from mpq.quant.calibrate import load_dataset
from mpq.quant.qmodel import quantize_graph
from mpq.sim import dequantize

FASHION = REPO / "examples" / "fashion"
SAMPLES = 64  # a fast subset of the 1000 test images


@pytest.fixture(scope="module")
def fashion(tmp_path_factory) -> dict[str, Path]:
    """The Fashion model, a patch plan at the demo's 14,000 B (VDPC, 2-bit maps) and the
    first test images with and without labels."""
    root = tmp_path_factory.mktemp("evalfid")
    model = root / "fashion_cnn.onnx"
    shutil.copy(FASHION / "fashion_cnn.onnx", model)
    plan = root / "fashion.plan.json"
    r = run_mpq("search", model, "--board", "nano33ble", "--sram", "14000", "--data",
                FASHION / "calib.npz", "--strategy", "exact", "-o", plan, "-q")
    assert r.returncode == 0, r.stderr
    d = np.load(FASHION / "test.npz")
    np.savez(root / "nolabels.npz", x=d["x"][:SAMPLES])
    np.savez(root / "labels.npz", x=d["x"][:SAMPLES], y=d["y"][:SAMPLES])
    r = run_mpq("eval", plan, "--data", root / "nolabels.npz", "--json", "-q")
    assert r.returncode == 0, r.stderr
    return {"root": root, "model": model, "plan": plan, "nolabels": root / "nolabels.npz",
            "labels": root / "labels.npz", "json": json.loads(r.stdout)}


def cli(*args: Any) -> SimpleNamespace:
    """`mpq ARGS` in-process (imports once; the fixture runs the real entry point), with the
    fields of a finished subprocess."""
    r = CliRunner().invoke(main, [str(a) for a in args])
    return SimpleNamespace(returncode=r.exit_code, stdout=r.stdout, stderr=r.stderr)


def by_hand(ref: np.ndarray, y: np.ndarray) -> dict[str, float]:
    """The three measures written out in numpy."""
    ref, y = ref.astype(np.float64), y.astype(np.float64)
    cos = (ref * y).sum(1) / (np.linalg.norm(ref, axis=1) * np.linalg.norm(y, axis=1))
    return {"top1_agreement": float(np.mean(ref.argmax(1) == y.argmax(1))),
            "cosine": float(cos.mean()),
            "sqnr_db": float(10 * np.log10((ref ** 2).sum() / ((y - ref) ** 2).sum())),
            "exact": False}


def test_label_free_plan_eval_matches_numpy(fashion) -> None:
    got = fashion["json"]  # `mpq eval PLAN --data nolabels.npz --json`
    assert got["samples"] == SAMPLES and got["classifier"] == {"logits": True}
    assert not {"float", "int8", "plan"} & set(got)  # no labels: no accuracy
    x = np.load(fashion["nolabels"])["x"]
    sess = ort.InferenceSession(str(fashion["model"]), providers=["CPUExecutionProvider"])
    ref = sess.run(None, {sess.get_inputs()[0].name: x})[0]
    plan, _, graph = load_plan_with_model(fashion["plan"], None)
    runner = PlanRunner(plan, graph)
    planned = dequantize(runner.mixed.acts["logits"], runner.outputs(x))
    int8 = quantize_graph(graph, plan_int8_ranges(plan))
    eight = dequantize(int8.acts["logits"], quant_output_dict(int8, x)["logits"])
    for key, y in (("int8", eight), ("plan", planned)):
        want = by_hand(ref, y)
        assert got["fidelity"]["logits"][key] == pytest.approx(want, rel=1e-9), key
    # the plan (2-bit maps) is further from float than all-int8, yet close to it
    f = got["fidelity"]["logits"]
    assert f["plan"]["sqnr_db"] < f["int8"]["sqnr_db"] and f["plan"]["top1_agreement"] > 0.8


def test_label_free_eval_prints_the_measures(fashion) -> None:
    r = cli("eval", fashion["plan"], "--data", fashion["nolabels"], "-q")
    assert r.returncode == 0 and r.stderr == "", r.stderr
    assert "top-1 accuracy" not in r.stdout
    assert f"fashion.plan.json: output 'logits' against the float model on {SAMPLES} " \
           "samples" in r.stdout
    assert "top-1 agreement" in r.stdout and "cosine" in r.stdout and "SQNR dB" in r.stdout
    rows = {}
    for line in r.stdout.splitlines():
        cells = [c.strip() for c in re.split(r"[│|]", line)[1:-1]]
        if cells and cells[0] in ("int8", "plan"):
            rows[cells[0]] = cells[1:]
    f = fashion["json"]["fidelity"]["logits"]
    assert rows == {k: [f"{m['top1_agreement']:.4f}", f"{m['cosine']:.5f}",
                        f"{m['sqnr_db']:.2f}"] for k, m in f.items()}


def test_labelled_eval_keeps_accuracy_and_adds_fidelity(fashion) -> None:
    r = cli("eval", fashion["plan"], "--data", fashion["labels"], "-q")
    assert r.returncode == 0 and r.stderr == "", r.stderr
    assert f"fashion.plan.json: top-1 accuracy on {SAMPLES} samples" in r.stdout
    assert "output 'logits' against the float model" in r.stdout
    r = cli("eval", fashion["plan"], "--data", fashion["labels"], "--json", "-q")
    got = json.loads(r.stdout)
    assert {"float", "int8", "plan", "samples", "fidelity"} <= set(got)
    # the same numbers as without labels: fidelity does not depend on y
    assert got["fidelity"] == fashion["json"]["fidelity"]
    # a sample the plan and float agree on is right or wrong for both
    for key in ("int8", "plan"):
        agree = got["fidelity"]["logits"][key]["top1_agreement"]
        assert abs(got[key] - got["float"]) <= 1 - agree + 1e-12


def test_float_against_float_is_exact_and_json_safe(fashion) -> None:
    """The float model compared with itself: agreement 1, cosine 1, SQNR infinite → null with
    exact (JSON has no infinity)."""
    graph = load_model(fashion["model"])
    ds = load_dataset(fashion["nolabels"], graph)
    sess = ort.InferenceSession(str(fashion["model"]), providers=["CPUExecutionProvider"])
    again = lambda b: {"logits": sess.run(None, {"input": b})[0]}  # noqa: E731
    ev = evaluate(fashion["model"], graph, ds, {"float again": again},
                  output_tasks(graph), None)
    m = ev.fidelity["logits"]["float again"]
    assert m == {"top1_agreement": 1.0, "cosine": pytest.approx(1.0), "sqnr_db": None,
                 "exact": True}
    assert ev.accuracy == {}
    json.dumps(ev.as_json(), allow_nan=False)


def test_streamed_sums_equal_the_whole_batch_summary() -> None:
    rng = np.random.default_rng(0)
    ref = rng.standard_normal((50, 7))
    y = ref + 0.1 * rng.standard_normal((50, 7))
    y[3] = 0.0  # an all-zero sample: cosine 0 by the rule
    for classifier in (True, False):
        sums = FidelitySums(classifier)
        for start in range(0, 50, 16):
            sums.add(ref[start:start + 16], y[start:start + 16])
        got, want = sums.summary(), fidelity_summary(ref, y, classifier)
        assert set(got) == set(want) and got["exact"] is want["exact"] is False
        for key in ("top1_agreement", "cosine", "sqnr_db"):
            if want[key] is None:
                assert got[key] is None and key == "top1_agreement" and not classifier
            else:
                assert got[key] == pytest.approx(want[key], rel=1e-12), key
    assert math.isclose(by_hand(ref[4:], y[4:])["sqnr_db"],
                        fidelity_summary(ref[4:], y[4:], True)["sqnr_db"])


def test_classifier_rule(fashion) -> None:
    fashion_graph = load_model(fashion["model"])  # Gemm logits [N, 10] from 784 inputs
    assert is_classifier(fashion_graph, "logits")
    assert not is_classifier(fashion_graph, "logits", "regress")
    kws = load_model(shared_model("kws_ref_model_fp32.onnx"))  # ends in Softmax
    assert all(output_tasks(kws).values())
    ad = load_model(shared_model("ad01_fp32.onnx"))  # autoencoder [N, 640] → [N, 640]
    assert not any(output_tasks(ad).values())
    assert all(output_tasks(ad, "classify").values())
    with pytest.raises(MpqError, match="--task"):
        is_classifier(ad, ad.outputs[0], "segment")


def test_autoencoder_eval_ignores_labels_and_reports_sqnr(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    data = tmp_path / "ad.npz"
    np.savez(data, x=rng.standard_normal((24, 640)).astype(np.float32),
             y=rng.integers(0, 2, 24))
    r = cli("eval", shared_model("ad01_fp32.onnx"), "--data", data, "--calib", data,
                "--json", "-q")
    assert r.returncode == 0, r.stderr
    got: dict[str, Any] = json.loads(r.stdout)
    assert "float" not in got and got["classifier"] == {"Identity": False}
    m = got["fidelity"]["Identity"]["int8"]
    assert m["top1_agreement"] is None and m["sqnr_db"] > 10 and 0.9 < m["cosine"] <= 1
    assert "y ignored" in r.stderr and "not a classifier" in r.stderr


# -- bad input: one line, exit 1, nothing on stdout ---------------------------------------------

def test_float_model_overflow_without_labels_is_one_line(tmp_path: Path) -> None:
    """The autoencoder has no Clip to stop a huge input: its float output overflows."""
    rng = np.random.default_rng(2)
    calib, data = tmp_path / "calib.npz", tmp_path / "huge.npz"
    np.savez(calib, x=rng.standard_normal((16, 640)).astype(np.float32))
    x = rng.standard_normal((8, 640)).astype(np.float32)
    x[5] = np.float32(3e38)
    np.savez(data, x=x)
    r = cli("eval", shared_model("ad01_fp32.onnx"), "--data", data, "--calib", calib,
                "--json", "-q")
    assert_clean_failure(r, "float model output is not finite (NaN/Inf) for sample 5")


def test_labels_of_the_wrong_shape_are_one_line(fashion, tmp_path: Path) -> None:
    data = tmp_path / "badlabels.npz"
    np.savez(data, x=np.load(fashion["nolabels"])["x"][:8], y=np.zeros((8, 3)))
    r = cli("eval", fashion["plan"], "--data", data, "--json", "-q")
    assert_clean_failure(r, "badlabels.npz: labels 'y' have shape [8, 3]; expected [8] class "
                            "indices or [8, 10] one-hot rows")
