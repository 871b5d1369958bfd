"""What the CLI prints when names, files and data are hostile: names (legal, however odd) are
printed literally on one line, never read as rich markup or terminal escapes; every bad input is
one `error:` line and exit 1 — no traceback, no "internal error", no numpy RuntimeWarning; an
ASCII-only stdout does not crash the output."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import REPO, run_mpq
from onnx import TensorProto, helper, numpy_helper

from mpq.errors import MpqError
from mpq.evaluate import eval_labels
from mpq.frontend import load_model
from mpq.quant.calibrate import (
    CalibrationStats,
    calibrate,
    dataset_from_array,
    load_dataset,
    summarise,
)
from mpq.safetext import error_line, plain, shorten_names, visible

# Legal ONNX names that rich would read as markup ([/x] raises, [bold red] restyles) or emoji, that
# break a line, or that a terminal would execute (ESC sequences).
CONV = "[bold red]conv\nline2\x1b[31m"
GAP = "gap[/x]:cat:"  # rich would print a cat emoji for :cat:
INPUT = "in[/x]"
OUTPUT = "out[/x]\n"
CLASSES = 4


def hostile_model(conv_name: str = CONV, weight: float | None = None) -> onnx.ModelProto:
    """Conv 3→4 (+ReLU) → GlobalAveragePool → Flatten → Gemm 4→4 on [N, 3, 8, 8], its node and
    tensor names as above, plus an unused initializer. `weight` overwrites the conv's first
    weight (NaN, Inf...)."""
    rng = np.random.default_rng(0)
    w = (rng.standard_normal((4, 3, 3, 3)) * 0.3).astype(np.float32)
    if weight is not None:
        w.flat[0] = weight
    inits = [numpy_helper.from_array(w, "w[/x]"),
             numpy_helper.from_array(np.zeros(4, np.float32), "b[bold red]"),
             numpy_helper.from_array((rng.standard_normal((4, 4)) * 0.5).astype(np.float32),
                                     "fc[/x]"),
             numpy_helper.from_array(np.zeros(4, np.float32), "fcb"),
             # unused: onnxruntime would warn about it on stderr, quoting the raw name
             numpy_helper.from_array(np.zeros(2, np.float32), "unused\n\x1b[31m")]
    nodes = [
        helper.make_node("Conv", [INPUT, "w[/x]", "b[bold red]"], ["c[/x]\tout"], conv_name,
                         kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c[/x]\tout"], ["r\x1b[31m[/]"], "[/x]relu"),
        helper.make_node("GlobalAveragePool", ["r\x1b[31m[/]"], ["g\r[/x]"], GAP),
        helper.make_node("Flatten", ["g\r[/x]"], ["f[/x]"], "flat", axis=1),
        helper.make_node("Gemm", ["f[/x]", "fc[/x]", "fcb"], [OUTPUT], "gemm[/x]\n", transB=1),
    ]
    graph = helper.make_graph(
        nodes, "g[/x]", [helper.make_tensor_value_info(INPUT, TensorProto.FLOAT, ["N", 3, 8, 8])],
        [helper.make_tensor_value_info(OUTPUT, TensorProto.FLOAT, ["N", CLASSES])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)


@pytest.fixture(scope="module")
def hostile(tmp_path_factory) -> dict[str, Path]:
    """The model saved as `[/x].onnx` (a file `x].onnx` in a folder `[`) and labelled data."""
    root = tmp_path_factory.mktemp("hostile")
    (root / "[").mkdir()
    model = root / "[" / "x].onnx"
    model.write_bytes(hostile_model().SerializeToString())
    rng = np.random.default_rng(1)
    x = rng.random((16, 3, 8, 8)).astype(np.float32)
    data = root / "data.npz"
    np.savez(data, x=x, y=np.arange(16) % CLASSES)
    return {"root": root, "model": model, "data": data, "x": x}


def assert_clean_success(result: subprocess.CompletedProcess) -> None:
    assert result.returncode == 0, result.stderr
    assert result.stderr == "", result.stderr
    assert "\x1b" not in result.stdout  # no terminal escape reaches the terminal


def assert_one_line_error(result: subprocess.CompletedProcess, *fragments: str) -> str:
    assert result.returncode == 1, (result.stdout, result.stderr)
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for bad in ("Traceback", "internal error", "Warning", "\x1b"):
        assert bad not in result.stderr, result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def run_ascii(*args: object) -> subprocess.CompletedProcess:
    """The CLI with an ASCII-only stdout/stderr (a C locale pipe, PYTHONIOENCODING=ascii)."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONIOENCODING": "ascii"}
    return subprocess.run([sys.executable, "-m", "mpq.cli", *map(str, args)],
                           capture_output=True, text=True, encoding="ascii", env=env,
                           timeout=300)


# -- safetext ---------------------------------------------------------------------------------


def test_visible_escapes_every_control_character() -> None:
    assert visible("a\nb\rc\td") == r"a\nb\rc\td"
    assert visible("\x1b[31m\x00\x7f\x85\u2028\u202e") == r"\x1b[31m\x00\x7f\x85\u2028\u202e"
    assert visible("plain [/x] é 中") == "plain [/x] é 中"
    for c in map(chr, [*range(0x20), *range(0x7f, 0xa0), 0x2028, 0x2029]):
        assert len(visible(f"a{c}b").splitlines()) == 1


def test_error_line_is_one_markup_safe_line_with_long_names_shortened() -> None:
    long = "n" * 5000 + "TAIL"
    line = error_line(f"node '{long}\n[/x]': op TopK is not supported; caller's model")
    assert "\n" not in line and "\\[/x]" in line and line.endswith("caller's model")
    assert len(line) < 300 and "TAIL" in line and "…" in line
    assert shorten_names("path /" + "p" * 400 + "/end.onnx: bad").endswith("end.onnx: bad")
    assert plain("[bold]x[/bold]") == "\\[bold]x\\[/bold]"


# -- valid hostile names: printed literally, exit 0 ---------------------------------------------


def test_import_prints_names_literally(hostile) -> None:
    out = hostile["root"] / "norm.mpq.onnx"
    result = run_mpq("import", hostile["model"], "-o", out)
    assert_clean_success(result)
    assert f"{hostile['model']} → {out}" in result.stdout
    assert f"input  {INPUT}:" in result.stdout
    assert "output out[/x]\\n:" in result.stdout  # the newline shown as \n, on the same line
    assert out.exists()


def test_inspect_table_and_json(hostile) -> None:
    result = run_mpq("inspect", hostile["model"], "--compress")
    assert_clean_success(result)
    assert "[bold red]conv\\nline2\\x1b[31m" in result.stdout and GAP in result.stdout
    assert "x].onnx: layers" in result.stdout
    result = run_mpq("inspect", hostile["model"], "--json")
    assert_clean_success(result)
    names = [layer["name"] for layer in json.loads(result.stdout)["layers"]]
    assert CONV in names and GAP in names  # JSON keeps the exact names


def test_search_and_eval_tables(hostile) -> None:
    plan = hostile["root"] / "[" / "p].json"
    result = run_mpq("search", hostile["model"], "--board", "stm32f746", "--data",
                     hostile["data"], "-o", plan, "-q")
    assert_clean_success(result)
    assert "x].onnx on stm32f746 (measured)" in result.stdout
    assert "[bold red]conv\\nline2\\x1b[31m" in result.stdout and str(plan) in result.stdout
    result = run_mpq("eval", plan, "--data", hostile["data"], "-q")
    assert_clean_success(result)
    assert "p].json: top-1 accuracy on 16 samples" in result.stdout


# -- errors quoting hostile names: one escaped line ---------------------------------------------


def test_error_quoting_a_hostile_node_name_is_one_line(hostile) -> None:
    model = hostile_model()
    model.graph.node[1].op_type = "Sin"  # unsupported: the error quotes the node's name
    model.graph.node[1].name = "bad[/x]\n" + "k" * 3000 + "\x1b[2J"
    path = hostile["root"] / "topk.onnx"
    path.write_bytes(model.SerializeToString())
    result = run_mpq("import", path, "-o", hostile["root"] / "topk.mpq.onnx")
    line = assert_one_line_error(result, "bad[/x]\\n", "Sin", "supported ops:")
    assert len(line) < 1000 and "\\x1b[2J" in line
    result = run_mpq("eval", hostile["model"], "--data", hostile["root"] / "no\n[/x].npz")
    assert_one_line_error(result, "no\\n[/x].npz", "no such file")


# -- ASCII-only stdout ----------------------------------------------------------------------------


def test_ascii_stdout(hostile) -> None:
    out = hostile["root"] / "ascii.mpq.onnx"
    result = run_ascii("import", hostile["model"], "-o", out)
    assert_clean_success(result)
    assert f"{hostile['model']} -> {out}" in result.stdout and "conv2d x1" in result.stdout
    result = run_ascii("inspect", hostile["model"])
    assert_clean_success(result)
    assert "8x8x3" in result.stdout and "[bold red]conv" in result.stdout
    result = run_ascii("eval", hostile["model"], "--data", hostile["root"] / "é.npz")
    assert_one_line_error(result, "\\xe9.npz", "no such file")


# -- labels ---------------------------------------------------------------------------------------


LABELS = np.arange(16) % CLASSES
BAD_LABELS = {
    "string": (LABELS.astype(str), "dtype <U"),
    "nan": (np.where(LABELS == 2, np.nan, LABELS), "sample 2 has label nan"),
    "too large": (np.where(LABELS == 3, CLASSES, LABELS), "sample 3 has label 4; the model "
                  "has 4 classes"),
    "negative": (LABELS - 1, "sample 0 has label -1"),
    "non-integer": (LABELS + 0.5, "sample 0 has label 0.5, not a class index"),
    "bad one-hot": (np.eye(CLASSES)[LABELS] * 0.5, "one-hot row of sample 0"),
    "wrong shape": (np.ones((16, 3)), "shape [16, 3]; expected [16] class indices or [16, 4]"),
    "bool": (LABELS > 1, "dtype bool"),
}


@pytest.mark.parametrize("case", BAD_LABELS)
def test_bad_labels_rejected(hostile, case: str) -> None:
    y, fragment = BAD_LABELS[case]
    graph = load_model(hostile["model"])
    with pytest.raises(MpqError, match="labels 'y'") as info:
        eval_labels(dataset_from_array(hostile["x"], "t.npz", y), graph)
    assert fragment in str(info.value) and "\n" not in str(info.value)


def test_labels_accepted_forms(hostile) -> None:
    graph = load_model(hostile["model"])
    for y in (LABELS, LABELS[:, None], LABELS.astype(np.float32), np.eye(CLASSES)[LABELS]):
        got = eval_labels(dataset_from_array(hostile["x"], "t.npz", y), graph)
        assert got.dtype == np.int64 and (got == LABELS).all()


@pytest.mark.parametrize("case", ["nan", "too large"])
def test_eval_bad_labels_cli(hostile, case: str) -> None:
    path = hostile["root"] / f"labels_{case}.npz"
    np.savez(path, x=hostile["x"], y=BAD_LABELS[case][0])
    result = run_mpq("eval", hostile["model"], "--data", path, "--calib", hostile["data"])
    assert_one_line_error(result, f"labels_{case}.npz: labels 'y'", BAD_LABELS[case][1])


def test_eval_one_hot_labels_same_accuracy(hostile) -> None:
    path = hostile["root"] / "onehot.npz"
    np.savez(path, x=hostile["x"], y=np.eye(CLASSES)[LABELS])
    results = []
    for data in (hostile["data"], path):
        result = run_mpq("eval", hostile["model"], "--data", data, "--calib", hostile["data"],
                         "--json")
        assert_clean_success(result)
        results.append(json.loads(result.stdout))
    assert results[0] == results[1]


# -- numbers numpy would warn about -------------------------------------------------------------


def test_nan_weight_is_one_line_without_warnings(hostile) -> None:
    path = hostile["root"] / "nanw.onnx"
    path.write_bytes(hostile_model(weight=float("nan")).SerializeToString())
    result = run_mpq("inspect", path, "--compress")
    # refused at import already (the frontend's check; quantisation checks again for models
    # built in memory)
    assert_one_line_error(result, "its weights contain NaN or infinite values")


def test_overflowing_data_is_one_line_without_warnings(hostile) -> None:
    path = hostile["root"] / "huge.npz"
    np.savez(path, x=hostile["x"] * np.float32(3e38), y=LABELS)
    result = run_mpq("calibrate", hostile["model"], "--data", path, "-o",
                     hostile["root"] / "s.npz")
    assert_one_line_error(result, "Inf at sample 0 during calibration", "overflows float32")
    assert not (hostile["root"] / "s.npz").exists()


def test_subnormal_and_extreme_data_calibrate_without_warnings(hostile) -> None:
    graph = load_model(hostile["model"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # any RuntimeWarning fails the test
        tiny = calibrate(graph, dataset_from_array(hostile["x"] * np.float32(1e-42), "tiny"))
        assert all(np.isfinite(t.hist_hi) and t.hist.sum() > 0 for t in tiny.tensors.values())
        edge = np.where(hostile["x"] > 0.5, np.float32(3e38), np.float32(-3e38))
        # ±3e38: x − mean overflows float32 (the model itself would overflow on such data)
        assert np.isfinite(summarise(edge).std)


def test_non_finite_stats_file_is_one_line(hostile) -> None:
    graph = load_model(hostile["model"])
    path = hostile["root"] / "stats.npz"
    calibrate(graph, load_dataset(hostile["data"], graph)).save(path)
    arrays = dict(np.load(path))
    arrays["max"] = arrays["max"].copy()
    arrays["max"][1] = np.inf
    np.savez(path, **arrays)
    with pytest.raises(MpqError, match="statistics of tensor .* are not valid"):
        CalibrationStats.load(path, graph)


# -- data errors of run and eval ------------------------------------------------------------------


def test_run_and_eval_data_errors(hostile) -> None:
    objects = hostile["root"] / "objects.npy"
    np.save(objects, np.array([hostile["x"][0], 1], dtype=object), allow_pickle=True)
    result = run_mpq("run", hostile["model"], "--input", objects, "--data", hostile["data"])
    assert_one_line_error(result, "objects.npy: holds Python objects")
    empty = hostile["root"] / "empty.npz"
    np.savez(empty, x=hostile["x"][:0], y=LABELS[:0])
    result = run_mpq("eval", hostile["model"], "--data", empty, "--calib", hostile["data"])
    assert_one_line_error(result, "empty.npz: empty data set")
