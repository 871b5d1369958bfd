"""`mpq export` and `mpq verify`: deterministic C that equals the integer reference, byte for
byte, on the host and on emulated Cortex-M4/M7 (layer-based plans)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx_builders as B
import pytest
from conftest import run_mpq
from test_bad_input import assert_clean_failure

from mpq.boards import get_board, plan_board
from mpq.codegen.export import KERNEL_SOURCES, c_sources, library_files
from mpq.frontend import load_model
from mpq.quant.calibrate import dataset_from_array, onnx_input_shape
from mpq.resources import data_dir
from mpq.search.driver import SearchOptions, search
from mpq.verify import verify


def _plan(tmp: Path, model_bytes_or_path, name: str, x: np.ndarray, **opts):
    path = tmp / f"{name}.onnx"
    if isinstance(model_bytes_or_path, Path):
        shutil.copy(model_bytes_or_path, path)
    else:
        path.write_bytes(model_bytes_or_path)
    graph = load_model(path)
    res = search(path, graph, get_board("nano33ble"), dataset_from_array(x, name),
                 SearchOptions(patches="none", **opts))
    plan_path = tmp / f"{name}.plan.json"
    res.plan.save(plan_path)
    return res.plan, graph, plan_path


def _random(graph, n: int) -> np.ndarray:
    return np.random.default_rng(1).random((n, *onnx_input_shape(graph))).astype(np.float32)


def test_export_is_deterministic_and_make_friendly(kws, tmp_path: Path) -> None:
    plan = tmp_path / "kws.plan.json"
    shutil.copy(kws["model"], tmp_path / "kws.onnx")
    assert run_mpq("search", tmp_path / "kws.onnx", "--board", "nano33ble", "--data",
                   kws["calib"], "--patches", "none", "-o", plan, "-q").returncode == 0
    a, b = tmp_path / "a", tmp_path / "b"
    assert run_mpq("export", plan, "-o", a).returncode == 0
    assert run_mpq("export", plan, "-o", b).returncode == 0
    names = sorted(p.name for p in a.iterdir())
    assert names == sorted(p.name for p in b.iterdir())
    # The kernels are the library's files, copied verbatim: those of the kernels the plan
    # calls (the CNN's convolutions need mpq_conv.c, its dot products and the shared helpers),
    # and no other (it has no concat: no mpq_copy.c).
    report = json.loads((a / "mpq_report.json").read_text())
    assert {"mpq_model.h", "mpq_model.c", "mpq_weights.c", "mpq_kernels.h", "mpq_support.h",
            "mpq_conv.c", "mpq_dot.c", "mpq_support.c"} <= set(names)
    library = set(names) & set(library_files(list(KERNEL_SOURCES)))
    assert library == set(library_files(report["kernels"])) and "mpq_copy.c" not in library
    for n in library:
        assert (a / n).read_bytes() == (data_dir("kernels") / n).read_bytes(), n
    assert set(report["files"]) == set(names) - {"mpq_report.json", "nano33ble.ld", "mpq.mk"}
    mk = (a / "mpq.mk").read_text()
    assert all(f"$(MPQ_DIR)/{n}" in mk for n in c_sources(names))
    for n in names:
        assert (a / n).read_bytes() == (b / n).read_bytes(), n
        assert str(tmp_path) not in (a / n).read_text()
    before = {n: os.stat(a / n).st_mtime_ns for n in names}
    r = run_mpq("export", plan, "-o", a)
    assert r.returncode == 0 and "0 written" in r.stdout
    assert before == {n: os.stat(a / n).st_mtime_ns for n in names}
    assert report["predicted"]["arena_bytes"] >= json.loads(plan.read_text())["predicted"][
        "arena_bytes"]


@pytest.mark.parametrize("sram", [None, 9_000])  # int8 layer-based needs 9,480 B
def test_kws_plans_bit_exact_on_host(kws, tmp_path: Path, sram: int | None) -> None:
    x = np.load(kws["test"])["x"][:24]
    calib = np.load(kws["calib"])["x"]
    plan, graph, _ = _plan(tmp_path, kws["model"], "kws", calib, sram=sram)
    if sram is not None:
        assert min(t.bits for t in plan.tensors) < 8
    result = verify(plan, graph, x, "host")
    assert result.samples == 24 and result.mismatches == 0


@pytest.mark.parametrize("sram", [None, 9_000])
def test_residual_network_with_fused_adds(tmp_path: Path, sram: int | None) -> None:
    model = B.mobilenet_v2(0.35, 32, num_classes=10)
    path = tmp_path / "m.onnx"
    path.write_bytes(model.SerializeToString())
    graph = load_model(path)
    plan, graph, _ = _plan(tmp_path, model.SerializeToString(), "mbv2", _random(graph, 32),
                           sram=sram)
    assert plan.schedule["fused_adds"] and plan.schedule["inplace_depthwise"]
    if sram is not None:
        assert min(t.bits for t in plan.tensors) < 8
    assert verify(plan, graph, _random(graph, 8), "host").mismatches == 0


def test_concat_pool_softmax_model(tmp_path: Path) -> None:
    model = B.concat_model()
    path = tmp_path / "c.onnx"
    path.write_bytes(model.SerializeToString())
    graph = load_model(path)
    plan, graph, _ = _plan(tmp_path, model.SerializeToString(), "concat", _random(graph, 32))
    assert verify(plan, graph, _random(graph, 8), "host").mismatches == 0


@pytest.mark.parametrize("target", ["qemu-m4", "qemu-m7"])
def test_kws_plans_bit_exact_under_qemu(kws, tmp_path: Path, target: str) -> None:
    if shutil.which("arm-none-eabi-gcc") is None or shutil.which("qemu-system-arm") is None:
        if os.environ.get("CI"):
            pytest.fail("cross tools missing in CI")
        pytest.skip("arm-none-eabi-gcc / qemu-system-arm not installed (see .ci/run)")
    x = np.load(kws["test"])["x"][:4]
    calib = np.load(kws["calib"])["x"]
    for sram in (None, 11_000):
        plan, graph, _ = _plan(tmp_path, kws["model"], f"kws{sram}", calib, sram=sram)
        result = verify(plan, graph, x, target)
        assert result.mismatches == 0
        assert result.instructions and result.instructions > 1_000_000
        assert result.flash_bytes and result.sram_bytes


def test_export_refusals(kws, tmp_path: Path) -> None:
    shutil.copy(kws["model"], tmp_path / "kws.onnx")
    plan = tmp_path / "kws.plan.json"
    assert run_mpq("search", tmp_path / "kws.onnx", "--board", "nano33ble", "--data",
                   kws["calib"], "--patches", "none", "-o", plan, "-q").returncode == 0
    (tmp_path / "kws.onnx").write_bytes((tmp_path / "kws.onnx").read_bytes() + b"\0")
    assert_clean_failure(run_mpq("export", plan, "-o", tmp_path / "o2"), "model changed")
    assert_clean_failure(run_mpq("export", plan, "-o", tmp_path / "o3", "--backend",
                                 "cmsis-nn"), "model changed")
    r = run_mpq("export", plan, "-o", tmp_path / "o4", "--backend", "tflm")
    assert r.returncode == 2 and "tflm" in r.stderr and not (tmp_path / "o4").exists()


@pytest.mark.parametrize("width,res,split,sram", [(0.35, 64, "k=10,n=2", None),
                                                  (0.35, 64, "k=13,n=3", 40_000)])
def test_patch_plans_bit_exact_on_host(tmp_path: Path, width: float, res: int, split: str,
                                       sram: int | None) -> None:
    """Patch stage with residual adds inside it, VDPC branches, and sub-byte maps."""
    model = B.mobilenet_v2(width, res, num_classes=10)
    path = tmp_path / "m.onnx"
    path.write_bytes(model.SerializeToString())
    graph = load_model(path)
    res_ = search(path, graph, get_board("nano33ble"),
                  dataset_from_array(_random(graph, 32), "r"),
                  SearchOptions(strategy="vdqs", patches=split, sram=sram))
    plan = res_.plan
    assert plan.patch is not None and plan.patch["vdpc"] is not None
    assert verify(plan, graph, _random(graph, 8), "host").mismatches == 0


def test_demo_plan_with_vdpc_under_qemu(tmp_path: Path) -> None:
    """The README's example: patches, VDPC, 2-bit maps — bit-exact on the emulated M4."""
    _cross_tools()
    from mpq.quant.calibrate import load_dataset

    example = Path(__file__).resolve().parent.parent / "examples" / "fashion"
    path = tmp_path / "fashion_cnn.onnx"
    shutil.copy(example / "fashion_cnn.onnx", path)
    graph = load_model(path)
    # `exact` at this budget chooses 2-bit maps (the measured default keeps them at 4 bits).
    res = search(path, graph, get_board("nano33ble"), load_dataset(example / "calib.npz", graph),
                 SearchOptions(strategy="exact", sram=14_000))
    plan = res.plan
    assert plan.patch is not None and min(t.bits for t in plan.tensors) == 2
    x = np.load(example / "test.npz")["x"][:6]
    result = verify(plan, graph, x, "qemu-m4")
    assert result.mismatches == 0 and result.instructions > 1_000_000
    # And the same export links for the real board, inside its memory.
    from mpq import firmware

    sizes = firmware.section_sizes(_board_build(plan, graph, tmp_path))
    board = get_board("nano33ble")
    assert sizes["flash_bytes"] <= board.flash_region_obj.length
    assert sizes["sram_bytes"] <= board.sram_region_obj.length
    assert sizes["mpq_arena"] >= plan.predicted["arena_bytes"]


def _cross_tools() -> None:
    if shutil.which("arm-none-eabi-gcc") is None:
        if os.environ.get("CI"):
            pytest.fail("cross tools missing in CI")
        pytest.skip("arm-none-eabi-gcc not installed (see .ci/run)")


def _board_build(plan, graph, tmp_path: Path) -> Path:
    """Link the export for the plan's board with a minimal main (what a user's build does)."""
    from mpq import firmware
    from mpq.codegen.export import render_export, write_export
    from mpq.codegen.render import render

    out = tmp_path / "export"
    files = render_export(plan, graph)
    write_export(files, out)
    (out / "main.c").write_text(render("firmware/verify_main.c.j2", target="board", samples=1))
    sources = [out / n for n in ("main.c", *c_sources(files))]
    return firmware.build_elf(sources, [out], plan_board(plan.board), tmp_path / "b")


def test_export_links_inside_the_board(kws, tmp_path: Path) -> None:
    _cross_tools()
    from mpq import firmware

    plan, graph, _ = _plan(tmp_path, kws["model"], "kws", np.load(kws["calib"])["x"],
                           sram=11_000)
    sizes = firmware.section_sizes(_board_build(plan, graph, tmp_path))
    board = get_board("nano33ble")
    assert sizes["mpq_arena"] >= plan.predicted["arena_bytes"]
    assert sizes["flash_bytes"] <= board.flash_region_obj.length
    assert sizes["sram_bytes"] <= board.sram_region_obj.length


def test_arena_larger_than_the_board_fails_at_link_time(tmp_path: Path) -> None:
    _cross_tools()
    model = B.mobilenet_v2(0.35, 224, num_classes=10)
    path = tmp_path / "big.onnx"
    path.write_bytes(model.SerializeToString())
    graph = load_model(path)
    plan, graph, _ = _plan(tmp_path, model.SerializeToString(), "big", _random(graph, 4),
                           strategy="int8", sram=10**9, flash=10**9)
    from mpq.errors import MpqError

    with pytest.raises(MpqError) as err:
        _board_build(plan, graph, tmp_path)
    message = str(err.value)
    assert "\n" not in message and "RAM" in message and "overflowed" in message


SHARED_CASES = [("pretrainedResnet.onnx", 255.0, 40_000), ("vww_96_float.onnx", 1.0, 45_000),
                ("kws_ref_model_fp32.onnx", 1.0, 11_000), ("ad01_fp32.onnx", 1.0, None)]


@pytest.mark.parametrize("name,scale,sram", SHARED_CASES)
def test_shared_models_int8_and_mixed_on_both_cores(tmp_path: Path, name: str, scale: float,
                                                    sram: int | None) -> None:
    _cross_tools()
    from conftest import shared_model

    path = shared_model(name)
    graph = load_model(path)
    x = (_random(graph, 16) * scale).astype(np.float32)
    data = dataset_from_array(x, "random")
    for strategy, budget in (("int8", None), ("exact", sram)):
        plan = search(path, graph, get_board("nano33ble"), data,
                      SearchOptions(strategy=strategy, sram=budget)).plan
        for target in ("qemu-m4", "qemu-m7"):
            result = verify(plan, graph, x[:2], target)
            assert result.mismatches == 0, (name, strategy, target)


def test_export_build_records_measured_sizes(kws, tmp_path: Path) -> None:
    _cross_tools()
    plan = tmp_path / "kws.plan.json"
    shutil.copy(kws["model"], tmp_path / "kws.onnx")
    assert run_mpq("search", tmp_path / "kws.onnx", "--board", "nano33ble", "--data",
                   kws["calib"], "--patches", "none", "-o", plan, "-q").returncode == 0
    r = run_mpq("export", plan, "-o", tmp_path / "fw", "--build")
    assert r.returncode == 0, r.stderr
    report = json.loads((tmp_path / "fw" / "mpq_report.json").read_text())
    measured, predicted = report["measured"], report["predicted"]
    assert measured["mpq_arena"] >= predicted["arena_bytes"] + predicted["scratch_bytes"] - 16
    assert 0 < measured["flash_bytes"] <= get_board("nano33ble").flash_region_obj.length


def test_export_and_verify_bad_input_one_line(kws, tmp_path: Path) -> None:
    """Newer schema, an invalid board, unwritable output, missing cross tools: one line, exit 1."""
    shutil.copy(kws["model"], tmp_path / "kws.onnx")
    plan = tmp_path / "kws.plan.json"
    assert run_mpq("search", tmp_path / "kws.onnx", "--board", "nano33ble", "--data",
                   kws["calib"], "--patches", "none", "-o", plan, "-q").returncode == 0
    d = json.loads(plan.read_text())
    newer = tmp_path / "newer.plan.json"
    newer.write_text(json.dumps({**d, "schema": 99}))
    assert_clean_failure(run_mpq("export", newer, "-o", tmp_path / "a"), "schema")
    # The plan's own board is checked like a board file; an older plan's board is a name only,
    # which must be a shipped board's.
    name_only = {k: d["board"][k] for k in ("core", "sram_budget", "flash_budget")}
    for cmd in (("export", "-o", tmp_path / "b"), ("verify", "--data", kws["test"])):
        for bad, words in (({**d["board"], "name": "no/such/board"}, ("board", "'name'")),
                           ({**name_only, "name": "no-such-board"}, ("no-such-board",))):
            board = tmp_path / "noboard.plan.json"
            board.write_text(json.dumps({**d, "board": bad}))
            assert_clean_failure(run_mpq(cmd[0], board, *cmd[1:]), *words)
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert_clean_failure(run_mpq("export", plan, "-o", blocker / "sub"))
    assert blocker.read_text() == "x"
    # No cross tools on PATH (only the Python running mpq): the missing program is named.
    bare = tmp_path / "bin"
    bare.mkdir()
    r = subprocess.run([sys.executable, "-m", "mpq.cli", "verify", str(plan), "--data",
                        str(kws["test"]), "--target", "qemu-m4"], capture_output=True,
                       text=True, env={**os.environ, "PATH": str(bare),
                                       "PYTHONPATH": str(Path(__file__).parent.parent)})
    assert_clean_failure(r, "not found on PATH", "apt-get install")
