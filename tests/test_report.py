"""`mpq report`: the figures, page and JSON of real plans agree with the plans, byte for byte
the same on every run, and bad input fails with one line."""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO, run_mpq
from test_bad_input import assert_clean_failure

from mpq.frontend import load_model
from mpq.memory import layer_memory
from mpq.patch import PatchSplit, plan_patches

EXAMPLE = REPO / "examples" / "fashion"
PNGS = ("sram_profile.png", "bitwidths.png", "patch_grid.png", "bitops.png")


@pytest.fixture(scope="module")
def plans(tmp_path_factory) -> dict[str, Path]:
    """Two real plans of the example CNN: 14,000 B with `--strategy vdqs` forces patches with
    VDPC (the measured default's split there runs without it); 24,000 B with
    `--patches none` gives a layer-based mixed-precision plan (the int8 one, with its
    overlapped layer, needs 28,292 B)."""
    root = tmp_path_factory.mktemp("report")
    shutil.copy(EXAMPLE / "fashion_cnn.onnx", root / "fashion_cnn.onnx")
    out = {"root": root, "model": root / "fashion_cnn.onnx"}
    for key, extra in (("patch", ["--sram", "14000", "--strategy", "vdqs"]),
                       ("layer", ["--sram", "24000", "--patches", "none"])):
        out[key] = root / f"{key}.plan.json"
        r = run_mpq("search", out["model"], "--board", "nano33ble", "--data",
                    EXAMPLE / "calib.npz", "-o", out[key], "-q", *extra)
        assert r.returncode == 0, r.stderr
    return out


def png_size(path: Path) -> tuple[int, int]:
    """Width and height from a PNG's IHDR chunk (after checking the signature)."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR", path
    return struct.unpack(">II", data[16:24])


def check_pngs(directory: Path, names: tuple[str, ...]) -> None:
    import matplotlib.image

    for name in names:
        w, h = png_size(directory / name)
        assert 600 <= w <= 2000 and 400 <= h <= 1200, (name, w, h)
        pixels = matplotlib.image.imread(directory / name)  # decodes every chunk
        assert pixels.shape[:2] == (h, w) and float(np.std(pixels)) > 0.05, name


def test_patch_plan_report(plans) -> None:
    r = run_mpq("report", plans["patch"])
    assert r.returncode == 0, r.stderr
    out = plans["root"] / "patch.report"  # default: <plan stem>.report beside the plan
    check_pngs(out, PNGS)
    plan = json.loads(plans["patch"].read_text())
    pred, rep = plan["predicted"], json.loads((out / "report.json").read_text())

    # (a) the plan's per-step SRAM peaks at exactly what the search predicted, under budget;
    # the int8 schedules are the memory model's own (inspect's layer-based peak).
    graph = load_model(plans["model"])
    prof = rep["sram_profile"]
    assert max(prof["plan"]["sram_bytes"]) == prof["plan"]["peak_sram_bytes"] \
        == pred["peak_sram_bytes"]
    assert prof["plan"]["arena_bytes"] == pred["arena_bytes"]
    io = pred["input_bytes"] + pred["output_bytes"]
    assert max(prof["plan"]["sram_bytes"]) + io <= plan["board"]["sram_budget"]
    assert all(a >= b for a, b in zip(prof["plan"]["sram_bytes"], prof["plan"]["live_bytes"],
                                      strict=True))
    assert max(prof["layer_based_int8"]["sram_bytes"]) == layer_memory(graph).peak_sram_bytes
    split = PatchSplit(plan["patch"]["split_layer"], plan["patch"]["n"])
    scratch = "arena" if "scratch" in plan["schedule"] else "separate"
    assert max(prof["patch_based_int8"]["sram_bytes"]) \
        == plan_patches(graph, split, plan["schedule"]["io"], plan["schedule"].get("overlap", {}),
                        scratch).memory().peak_sram_bytes
    assert prof["budget_for_arena_and_scratch"] == 14000 - io
    assert len(prof["steps"]) == len(plan["layers"])

    # (b) bits per layer are the plan's; (c) the grid and its rates are the plan's VDPC record.
    assert [(b["w_bits"], b["a_bits_out"]) for b in rep["bitwidths"]] \
        == [(layer["w_bits"], layer["a_bits_out"]) for layer in plan["layers"]]
    stage = [b["name"] for b in rep["bitwidths"] if b["patch_stage"]]
    assert stage == plan["patch"]["stage_nodes"]
    assert rep["patch_grid"]["tiles"] == plan["patch"]["tiles"]
    assert rep["patch_grid"]["vdpc"]["outlier_rate"] == plan["patch"]["vdpc"]["outlier_rate"]

    # (d) per-layer BitOPs + the overlap recomputation sum to the predicted totals.
    b = rep["bitops"]
    assert sum(x["plan"] for x in b["layers"]) + b["patch_overlap"]["plan"] == pred["bitops"]
    assert sum(x["int8"] for x in b["layers"]) + b["patch_overlap"]["int8"] \
        == pred["bitops_int8"]
    assert b["total"]["expected"] == pred["expected_bitops"]
    assert b["patch_overlap"]["int8"] > 0
    assert rep["headline"]["bitops"] == pred["bitops"] < pred["bitops_int8"]

    html = (out / "report.html").read_text()
    for name in PNGS:
        assert f'<img src="{name}"' in html
    assert f"{pred['sram_needed_bytes']:,} B" in html and "14,000 B" in html
    for text in (html, (out / "report.json").read_text()):
        assert str(plans["root"]) not in text and "/tmp" not in text

    # Same plan, same bytes.
    again = plans["root"] / "again"
    assert run_mpq("report", plans["patch"], "-o", again).returncode == 0
    for f in sorted(out.iterdir()):
        assert (again / f.name).read_bytes() == f.read_bytes(), f.name
    assert sorted(p.name for p in again.iterdir()) == sorted(p.name for p in out.iterdir())


def test_layer_based_plan_report(plans) -> None:
    out = plans["root"] / "layer_report"
    r = run_mpq("report", plans["layer"], "-o", out)
    assert r.returncode == 0, r.stderr
    check_pngs(out, ("sram_profile.png", "bitwidths.png", "bitops.png"))
    assert not (out / "patch_grid.png").exists()
    plan = json.loads(plans["layer"].read_text())
    pred, rep = plan["predicted"], json.loads((out / "report.json").read_text())
    assert plan["patch"] is None and rep["patch_grid"] is None
    assert rep["sram_profile"]["patch_based_int8"] is None and rep["figures"]["patches"] is None
    assert max(rep["sram_profile"]["plan"]["sram_bytes"]) == pred["peak_sram_bytes"]
    assert pred["peak_sram_bytes"] < max(rep["sram_profile"]["layer_based_int8"]["sram_bytes"])
    assert sum(x["plan"] for x in rep["bitops"]["layers"]) == pred["bitops"]
    assert rep["bitops"]["patch_overlap"] == {"int8": 0, "plan": 0, "expected": 0}
    assert any(b["a_bits_out"] < 8 for b in rep["bitwidths"])  # the budget forced lower bits
    html = (out / "report.html").read_text()
    assert "Patch grid omitted" in html and "patch_grid.png" not in html


def test_bad_input_one_line(plans, tmp_path: Path) -> None:
    assert_clean_failure(run_mpq("report", tmp_path / "missing.plan.json"), "no such file")
    not_plan = tmp_path / "x.json"
    not_plan.write_text("[1, 2]")
    assert_clean_failure(run_mpq("report", not_plan), "not an mpq plan")

    # The model changed since the plan was made.
    shutil.copy(plans["patch"], tmp_path / "p.plan.json")
    (tmp_path / "fashion_cnn.onnx").write_bytes(plans["model"].read_bytes() + b"\0")
    assert_clean_failure(run_mpq("report", tmp_path / "p.plan.json"), "model changed")
    assert not (tmp_path / "p.report").exists()

    # Output that cannot be a directory: nothing written, the file untouched.
    blocker = tmp_path / "file.txt"
    blocker.write_text("keep")
    for target in (blocker, blocker / "sub"):
        r = run_mpq("report", plans["patch"], "-o", target)
        assert_clean_failure(r, str(target))
    assert blocker.read_text() == "keep"
    assert run_mpq("report", "--help").returncode == 0


def test_readme_figures_are_the_demo_plans_report(tmp_path: Path) -> None:
    """docs/report (embedded in the README) is what `make demo`'s plan reports today: the
    figures and numbers a reader sees are not left behind by a change to the search or the
    memory model."""
    model = tmp_path / "fashion_cnn.mpq.onnx"
    plan = tmp_path / "fashion.plan.json"
    assert run_mpq("import", EXAMPLE / "fashion_cnn.onnx", "-o", model, "-q").returncode == 0
    r = run_mpq("search", model, "--board", "nano33ble", "--sram", "14000", "--data",
                EXAMPLE / "calib.npz", "-o", plan, "-q")
    assert r.returncode == 0, r.stderr
    assert run_mpq("report", plan, "-o", tmp_path / "report", "-q").returncode == 0
    docs = REPO / "docs" / "report"
    for f in sorted(docs.iterdir()):
        assert (tmp_path / "report" / f.name).read_bytes() == f.read_bytes(), \
            f"docs/report/{f.name} is stale: regenerate it with `make demo` and " \
            "`mpq report out/fashion.plan.json -o docs/report`"
