"""Bounded resources (mpq.limits) and no data loss: hostile inputs of a few hundred bytes are
refused in one line that names the limit and the option raising it, before anything big is
allocated; outputs never replace an input or a non-regular file; `mpq search` refuses an
impossible budget before it reads the data; an interrupted export leaves make's stamp old."""

from __future__ import annotations

import io
import os
import zipfile
from pathlib import Path

import numpy as np
import onnx
import onnx_builders as B
import pytest
from conftest import REPO, SHARED_ONNX, run_mpq, shared_model
from onnx import TensorProto, helper

from mpq import limits
from mpq.errors import MpqError

FASHION = REPO / "examples" / "fashion"


@pytest.fixture(autouse=True)
def default_limits():
    """In-process `mpq` runs install their limits for the process: restore the defaults."""
    yield
    limits.set_limits(limits.DEFAULTS)


def mpq(*args: object, env: dict[str, str] | None = None):
    """The CLI in-process (click's runner; `run_mpq` runs it as a subprocess): the result
    has returncode, stdout and stderr like a CompletedProcess."""
    from click.testing import CliRunner

    from mpq.cli import main

    result = CliRunner().invoke(main, [str(a) for a in args], env=env)
    result.returncode = result.exit_code
    return result


def one_line_error(result, *fragments: str) -> str:
    assert result.returncode == 1, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error:") and "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def onnx_model(nodes, inits, in_shape, out_name="y", out_shape=(1, 2)) -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes, "hostile", [helper.make_tensor_value_info("x", TensorProto.FLOAT, in_shape)],
        [helper.make_tensor_value_info(out_name, TensorProto.FLOAT, out_shape)], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


def scalar(name: str, value: int) -> TensorProto:
    return helper.make_tensor(name, TensorProto.INT64, [], [value])


def gemm_model(extra_nodes=(), extra_inits=()) -> onnx.ModelProto:
    """x[1,4] → Gemm → y[1,2], beside whatever constant nodes are added (folded, unused)."""
    w = helper.make_tensor("w", TensorProto.FLOAT, [4, 2], [0.5] * 8)
    return onnx_model([*extra_nodes, helper.make_node("Gemm", ["x", "w"], ["y"], name="fc")],
                      [w, *extra_inits], [1, 4])


def range_model(n: int) -> onnx.ModelProto:
    """A Range of `n` elements feeding a Reshape: constant folding would evaluate it."""
    nodes = [helper.make_node("Range", ["s", "l", "d"], ["r"], name="r"),
             helper.make_node("Reshape", ["x", "r"], ["y"], name="rs")]
    return onnx_model(nodes, [scalar("s", 0), scalar("l", n), scalar("d", 1)], [1, 4])


def npy_header(shape: tuple[int, ...], descr: str = "<f4") -> bytes:
    """Only the header of a .npy array: it claims `shape` and holds no data."""
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        buf, {"descr": descr, "fortran_order": False, "shape": shape})
    return buf.getvalue()


def npz_claiming(path: Path, shape: tuple[int, ...], descr: str = "<f4") -> Path:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("x.npy", npy_header(shape, descr))
    return path


def save(path: Path, model: onnx.ModelProto) -> Path:
    path.write_bytes(model.SerializeToString())
    return path


# -- limits on models ----------------------------------------------------------------------------

def test_folding_a_huge_range_is_refused_before_it_runs(tmp_path: Path) -> None:
    model = save(tmp_path / "range.onnx", range_model(300_000_000))
    assert model.stat().st_size < 500
    out = tmp_path / "out.onnx"
    one_line_error(run_mpq("import", model, "-o", out), "'r' (Range)", "300,000,000 elements",
                   "--max-elements", "MPQ_MAX_ELEMENTS")
    assert not out.exists()


def test_an_input_dimension_of_2_to_the_31_is_refused(tmp_path: Path) -> None:
    model = save(tmp_path / "wide.onnx", onnx_model(
        [helper.make_node("Relu", ["x"], ["y"], name="relu")], [], [1, 2**31]))
    assert model.stat().st_size < 200
    out = tmp_path / "out.onnx"
    one_line_error(mpq("inspect", model), "'x'", "2,147,483,648", "--max-elements")
    one_line_error(mpq("import", model, "-o", out), "--max-elements")
    assert not out.exists()


def test_the_fold_limit_adds_up_every_folded_value_and_the_option_raises_it(
        tmp_path: Path) -> None:
    # Two ConstantOfShape of 3,000 elements each: over a 5,000 limit only together.
    nodes = [helper.make_node("ConstantOfShape", ["n"], [f"c{i}"], name=f"fill{i}")
             for i in range(2)]
    shape = helper.make_tensor("n", TensorProto.INT64, [1], [3000])
    model = save(tmp_path / "fills.onnx", gemm_model(nodes, [shape]))
    out = tmp_path / "out.onnx"
    one_line_error(mpq("--max-fold-elements", "5000", "import", model, "-o", out),
                   "'fill1' (ConstantOfShape)", "6,000 elements", "--max-fold-elements",
                   "MPQ_MAX_FOLD_ELEMENTS")
    assert not out.exists()
    ok = mpq("--max-fold-elements", "6000", "import", model, "-o", out, "-q")
    assert ok.returncode == 0, ok.stderr
    assert out.exists()


def test_a_small_limit_refuses_a_normal_model_and_the_default_passes_it(
        tmp_path: Path) -> None:
    model = FASHION / "fashion_cnn.onnx"
    one_line_error(mpq("--max-elements", "1000", "inspect", model),
                   "fashion_cnn.onnx", "1,000 elements per tensor", "--max-elements")
    env_refused = mpq("inspect", model, env={"MPQ_MAX_MODEL_BYTES": "1000"})
    one_line_error(env_refused, "fashion_cnn.onnx", "161,464 bytes", "--max-model-bytes",
                   "MPQ_MAX_MODEL_BYTES")
    assert mpq("inspect", model).returncode == 0
    assert limits.current() == limits.DEFAULTS


def test_help_lists_the_limits_with_their_variables() -> None:
    text = mpq("--help").stdout
    for option, env, _ in limits.OPTIONS.values():
        assert option in text and env in text


def test_defaults_pass_the_real_models() -> None:
    """The four MLPerf Tiny models and a MobileNetV2-1.0@224 (3.5 M parameters, 224×224×3
    input, 112×112×96 maps) import under the default limits."""
    from mpq.frontend import load_model
    from mpq.frontend.onnx_import import import_model

    assert limits.current() == limits.DEFAULTS
    for name in SHARED_ONNX.values():
        load_model(shared_model(name))
    graph = import_model(B.mobilenet_v2(1.0, 224), "mobilenet_v2")
    assert max(t.size for t in graph.tensors.values()) > 1_000_000
    assert sum(n.weight.size for n in graph.nodes if n.weight is not None) > 3_000_000


@pytest.mark.parametrize("op, inputs, attrs, expected", [
    ("Range", [np.array(0), np.array(300_000_000), np.array(1)], {}, 300_000_000),
    ("Range", [np.array(10.0), np.array(0.0), np.array(-0.5)], {}, 20),
    ("Range", [np.array(0.0), np.array(np.inf), np.array(1.0)], {}, 1 << 62),
    ("ConstantOfShape", [np.array([1 << 20, 1 << 20])], {}, 1 << 40),
    ("Expand", [np.zeros((3, 1)), np.array([1, 1 << 30])], {}, 3 << 30),
    ("Mul", [np.zeros((1 << 12, 1)), np.zeros((1, 1 << 12))], {}, 1 << 24),
    ("Gather", [np.zeros((2, 1000)), np.zeros(5000, np.int64)], {"axis": 0}, 5_000_000),
    ("Concat", [np.zeros(3), np.zeros(4)], {"axis": 0}, 7),
    ("Transpose", [np.zeros((5, 6))], {}, 30),
])
def test_fold_elements_are_known_before_the_fold_runs(op, inputs, attrs, expected) -> None:
    assert limits.fold_elements(op, inputs, attrs) == expected


# -- limits on data files ------------------------------------------------------------------------

def test_an_npz_claiming_terabytes_is_refused_from_its_header(tmp_path: Path) -> None:
    bomb = npz_claiming(tmp_path / "bomb.npz", (1 << 30, 1, 28, 28))
    assert bomb.stat().st_size < 1000
    out = tmp_path / "stats.npz"
    one_line_error(mpq("calibrate", FASHION / "fashion_cnn.onnx", "--data", bomb, "-o", out),
                   "bomb.npz", "3,367,254,360,064 bytes", "--max-data-bytes",
                   "MPQ_MAX_DATA_BYTES")
    assert not out.exists()


def test_data_limit_applies_to_npy_and_the_option_changes_the_outcome(tmp_path: Path) -> None:
    from mpq.quant.calibrate import load_dataset

    x = np.zeros((20, 1, 28, 28), np.float32)  # 62,720 bytes
    np.save(tmp_path / "x.npy", x)
    np.savez(tmp_path / "d.npz", x=x)
    assert len(load_dataset(tmp_path / "x.npy")) == 20
    limits.set_limits(limits.Limits(max_data_bytes=60_000))
    try:
        for name in ("x.npy", "d.npz"):
            with pytest.raises(limits.LimitError, match="62,720 bytes.*--max-data-bytes"):
                load_dataset(tmp_path / name)
    finally:
        limits.set_limits(limits.DEFAULTS)


def test_pickled_object_arrays_are_refused_by_name(tmp_path: Path) -> None:
    from mpq.quant.calibrate import load_dataset

    np.save(tmp_path / "obj.npy", np.array([1, "a", None], dtype=object), allow_pickle=True)
    objects = npz_claiming(tmp_path / "obj.npz", (3,), "|O")
    for path in (tmp_path / "obj.npy", objects):
        with pytest.raises(MpqError, match="pickled object array"):
            load_dataset(path)


def test_default_data_limit_passes_fashion_and_kws_sized_data(tmp_path: Path) -> None:
    fashion = npz_claiming(tmp_path / "fashion.npz", (10_000, 1, 28, 28))
    limits.check_data_file(fashion)  # 31 MB declared, nothing stored
    limits.check_data_file(shared_model("kws01_mfcc_int8_1000.npz"))
    with pytest.raises(limits.LimitError):
        limits.check_data_file(npz_claiming(tmp_path / "big.npz", (1 << 30,)))


# -- search: impossible budgets before the data -------------------------------------------------

def test_search_refuses_an_impossible_flash_budget_without_reading_the_data(
        tmp_path: Path) -> None:
    # The data would be refused by its own limit if the search read it before the budgets.
    bomb = npz_claiming(tmp_path / "bomb.npz", (1 << 30, 1, 28, 28))
    plan = tmp_path / "plan.json"
    for budget, what in (("--flash", "B Flash with 4-bit weights"),
                         ("--sram", "B SRAM with 2-bit activations")):
        line = one_line_error(mpq("search", FASHION / "fashion_cnn.onnx", "--board",
                                  "nano33ble", budget, "1000", "--data", bomb, "-o", plan),
                              "needs at least", what, "budget is 1,000 B")
        assert "max-data-bytes" not in line
    assert not plan.exists()


def test_search_floor_is_exact_and_checked_before_calibration(monkeypatch) -> None:
    """The floor refuses a budget one byte under what the full search then meets, and
    `search` checks it before it calibrates."""
    import mpq.search.driver as driver
    from mpq.boards import get_board
    from mpq.frontend import load_model

    graph = load_model(FASHION / "fashion_cnn.onnx")
    board = get_board("nano33ble")
    opts = driver.SearchOptions(strategy="qe", sram=1000)
    with pytest.raises(driver.BudgetError) as info:
        driver.feasible_candidates(graph, board, opts)
    floor = info.value.sram_needed
    assert f"{floor:,} B SRAM" in str(info.value)

    def no_calibration(*args, **kwargs):
        raise AssertionError("calibrated before the budget check")

    with monkeypatch.context() as m:
        m.setattr(driver, "calibrate", no_calibration)
        with pytest.raises(driver.BudgetError):
            driver.search(Path("fashion_cnn.onnx"), graph, board, None,
                          driver.SearchOptions(strategy="qe", sram=floor - 1))
    result = driver.search(FASHION / "fashion_cnn.onnx", graph, board, None,
                           driver.SearchOptions(strategy="qe", sram=floor))
    assert result.plan.predicted["sram_needed_bytes"] <= floor


# -- no data loss ---------------------------------------------------------------------------------

def test_search_refuses_to_write_its_plan_over_the_model(tmp_path: Path) -> None:
    model = tmp_path / "k.onnx"
    model.write_bytes((FASHION / "fashion_cnn.onnx").read_bytes())
    before = model.read_bytes()
    (tmp_path / "link.onnx").symlink_to(model)
    os.link(model, tmp_path / "hard.onnx")
    one_line_error(run_mpq("search", model, "--board", "nano33ble", "--data",
                           FASHION / "calib.npz", "-o", model),
                   "k.onnx: is an input of this command", "refusing to overwrite")
    for target in (tmp_path / "link.onnx", tmp_path / "hard.onnx"):
        one_line_error(mpq("search", model, "--board", "nano33ble", "--data",
                               FASHION / "calib.npz", "-o", target),
                       "is an input of this command", "refusing to overwrite")
    assert model.read_bytes() == before
    one_line_error(mpq("calibrate", model, "--data", FASHION / "calib.npz",
                       "-o", tmp_path / "." / "k.onnx"), "is an input")
    one_line_error(mpq("import", model, "-o", tmp_path / "hard.onnx"), "is an input")
    assert model.read_bytes() == before


def test_output_onto_a_fifo_is_refused_before_the_work(tmp_path: Path) -> None:
    fifo = tmp_path / "plan.json"
    os.mkfifo(fifo)
    one_line_error(mpq("search", FASHION / "fashion_cnn.onnx", "--board", "nano33ble",
                       "--data", npz_claiming(tmp_path / "bomb.npz", (1 << 40,)),
                       "-o", fifo), "named pipe", "refusing to replace")
    assert fifo.is_fifo()


def test_an_interrupted_export_leaves_the_make_stamp_old(tmp_path: Path, monkeypatch) -> None:
    import mpq.codegen.export as export

    names = ["mpq_model.h", "mpq_model.c", "mpq_weights.c", "mpq_report.json",
             "nano33ble.ld", "mpq.mk"]
    assert export.write_order(names)[-1] == "mpq.mk"
    out = tmp_path / "export"
    old = {name: f"old {name}\n" for name in names}
    export.write_export(old, out)
    os.utime(out / "mpq.mk", (1_000_000, 1_000_000))  # older than any new plan
    new = {name: f"new {name}\n" for name in names}
    real = export.write_if_changed
    written: list[str] = []

    def dies_after_three(path: Path, data: bytes) -> bool:
        if len(written) == 3:
            raise KeyboardInterrupt
        written.append(path.name)
        return real(path, data)

    monkeypatch.setattr(export, "write_if_changed", dies_after_three)
    with pytest.raises(KeyboardInterrupt):
        export.write_export(new, out)
    assert (out / "mpq.mk").read_text() == "old mpq.mk\n"
    assert (out / "mpq.mk").stat().st_mtime == 1_000_000
    written.clear()
    fresh = tmp_path / "fresh"
    with pytest.raises(KeyboardInterrupt):
        export.write_export(new, fresh)
    assert not (fresh / "mpq.mk").exists() and len(list(fresh.iterdir())) == 3
