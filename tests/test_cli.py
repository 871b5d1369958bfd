"""The commands as a user runs them: `mpq boards`, `mpq import`, `mpq inspect`, `--help`."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import onnx_builders as B
import pytest
from conftest import ort_run, random_input, rel_err, run_mpq, shared_model

from mpq.boards import get_board, list_boards


def save(path: Path, model) -> Path:
    path.write_bytes(model.SerializeToString())
    return path


@pytest.mark.parametrize("cmd", [[], ["boards"], ["import"], ["inspect"]])
def test_help_everywhere(cmd: list[str]) -> None:
    result = run_mpq(*cmd, "--help")
    assert result.returncode == 0 and "Usage:" in result.stdout
    assert "Exit codes" in result.stdout


def test_boards_table_and_json() -> None:
    table = run_mpq("boards")
    assert table.returncode == 0
    for name in ("nano33ble", "stm32h743", "stm32f746", "stm32f412", "mps2-an386", "mps2-an500"):
        assert name in table.stdout
    data = json.loads(run_mpq("boards", "--json").stdout)
    by_name = {b["name"]: b for b in data}
    assert by_name["nano33ble"]["sram_budget"] == get_board("nano33ble").sram_budget
    assert len(data) == len(list_boards())


def test_import_writes_a_model_onnxruntime_runs(tmp_path: Path) -> None:
    src = save(tmp_path / "mbv2.onnx", B.mobilenet_v2(0.35, 64, num_classes=10))
    result = run_mpq("import", src)
    assert result.returncode == 0, result.stderr
    out = tmp_path / "mbv2.mpq.onnx"  # default name beside the input
    assert out.exists() and "BatchNormalization folded ×52" in result.stdout
    x = random_input(B.mobilenet_v2(0.35, 64, num_classes=10))
    assert rel_err(ort_run(out, x), ort_run(src, x)) <= 1e-4
    first = out.read_bytes()
    quiet = run_mpq("import", src, "-o", out, "-q")
    assert quiet.returncode == 0 and quiet.stdout == quiet.stderr == ""
    assert out.read_bytes() == first  # same input, same bytes


def test_inspect_json_keys_and_totals(tmp_path: Path) -> None:
    src = save(tmp_path / "mbv2.onnx", B.mobilenet_v2(1.0, 224))
    result = run_mpq("inspect", src, "--json", "--no-overlap")
    assert result.returncode == 0, result.stderr
    d = json.loads(result.stdout)
    for key in ("macs", "params", "arena_bytes", "scratch_bytes", "peak_sram_bytes",
                "flash_bytes", "layers"):
        assert key in d
    assert d["arena_bytes"] == 112 * 112 * (16 + 96)
    assert d["peak_sram_bytes"] == d["arena_bytes"] + d["scratch_bytes"]
    assert d["macs"] == B.mobilenet_v2_macs(1.0, 224) == sum(x["macs"] for x in d["layers"])
    assert d["params"] == sum(x["params"] for x in d["layers"])
    for layer in d["layers"]:
        assert {"name", "op", "macs", "params", "in_shape", "out_shape"} <= set(layer)
    # Flash = int8 weights + int32 bias + int32 (M, S) per output channel.
    weights = sum(x["params"] for x in d["layers"])
    channels = sum(x["out_shape"][-1] for x in d["layers"] if x["op"] in
                   ("conv2d", "depthwise", "fully_connected"))
    assert d["flash_bytes"] == weights - channels + 4 * channels + 8 * channels


def test_inspect_board_fit(tmp_path: Path) -> None:
    path = shared_model("vww_96_float.onnx")
    d = json.loads(run_mpq("inspect", path, "--board", "nano33ble", "--json").stdout)
    fit, board = d["fit"], get_board("nano33ble")
    assert fit["sram_budget"] == board.sram_budget
    assert fit["sram_needed"] == d["peak_sram_bytes"] + d["input_bytes"] + d["output_bytes"] \
        + d["stack_bytes"]
    assert fit["sram_margin"] == fit["sram_budget"] - fit["sram_needed"]
    assert fit["fits"] is True
    big = save(tmp_path / "big.onnx", B.mobilenet_v2(1.0, 224))
    d = json.loads(run_mpq("inspect", big, "--board", "nano33ble", "--json").stdout)
    assert d["fit"]["fits"] is False and d["fit"]["sram_margin"] < 0
    table = run_mpq("inspect", big, "--board", "nano33ble")
    assert table.returncode == 0 and "does not fit" in table.stdout


def test_inspect_table_lists_every_layer() -> None:
    result = run_mpq("inspect", shared_model("kws_ref_model_fp32.onnx"), "--no-overlap")
    assert result.returncode == 0
    assert result.stdout.count("│ depthwise ") == 4
    assert "peak SRAM" in result.stdout and "16,000" in result.stdout


def test_inspect_peak_is_the_int8_search_peak(tmp_path: Path) -> None:
    # Defaults as `mpq search`: input in the arena, memory order, overlap — the same peak.
    kws = shared_model("kws_ref_model_fp32.onnx")
    d = json.loads(run_mpq("inspect", kws, "--json").stdout)
    plan, data = tmp_path / "kws.plan.json", tmp_path / "x.npz"
    shape = [1 if isinstance(s, str) else s for s in d["inputs"][next(iter(d["inputs"]))]]
    np.savez(data, x=np.random.default_rng(0).standard_normal([8, *shape[1:]]).astype(np.float32))
    r = run_mpq("search", kws, "--board", "nano33ble", "--strategy", "int8", "--patches",
                "none", "--data", data, "-o", plan, "-q")
    assert r.returncode == 0, r.stderr
    predicted = json.loads(plan.read_text())["predicted"]
    assert d["overlapped"] > 0 and d["peak_sram_bytes"] == predicted["peak_sram_bytes"]
    assert d["peak_sram_bytes"] < 16_000  # below the arena without overlap


def test_float_interpreter_matches_on_inspected_model(tmp_path: Path) -> None:
    # The normalised model and the original agree on many random inputs, not just one.
    src = save(tmp_path / "m.onnx", B.concat_model())
    assert run_mpq("import", src, "-o", tmp_path / "n.onnx").returncode == 0
    x = random_input(B.concat_model(), batch=16, seed=3)
    assert np.allclose(ort_run(tmp_path / "n.onnx", x), ort_run(src, x), atol=1e-5)


def test_verbose_prints_the_search_phases_and_quiet_runs_print_no_progress(tmp_path: Path) -> None:
    """`mpq -v` explains the search on stderr; without a terminal no progress bar is drawn."""
    repo = Path(__file__).resolve().parent.parent
    model, calib = repo / "examples/fashion/fashion_cnn.onnx", repo / "examples/fashion/calib.npz"
    plan = tmp_path / "p.json"
    r = run_mpq("-v", "search", model, "--board", "nano33ble", "--sram", "20000", "--data",
                calib, "-o", plan)
    assert r.returncode == 0, r.stderr
    solving = [ln for ln in r.stderr.splitlines() if ln.startswith("solving: ")]
    assert solving and solving[0].startswith("solving: no patches: ")
    assert any("patches: arena" in ln for ln in solving)
    # One line per phase, in order, each ending with its wall seconds; then the total.
    lines = r.stderr.splitlines()
    phases = [ln.split(":")[0] for ln in lines]
    vdpc = json.loads(plan.read_text())["patch"]["vdpc"] is not None
    measuring = [ln for ln in lines if ln.startswith("measuring: ")]
    # the schedules' ILP solutions measured side by side, then the two best refined
    assert measuring[0].startswith("measuring: the ILP solutions of ")
    assert 2 <= len(measuring) <= 3
    order = ["order"] if any(ln.startswith("order: ") for ln in lines) else []
    # Among the schedules' `solving:` lines, a `sensitivity:` line for each schedule whose
    # single choices were measured (the time the measuring took, not the solver's).
    start = phases.index("scoring") + 1
    scheduled = phases[start:start + len(solving) + phases[start:].count("sensitivity")]
    assert sorted(set(scheduled)) == ["sensitivity", "solving"], r.stderr
    assert scheduled.count("solving") == len(solving)
    expected = ["import", *order, "calibrated", "sensitivity", "scoring", *scheduled,
                *["measuring"] * len(measuring),
                # bias correction, tried on every plan (`search.ptq_choice`)
                "ptq",
                "quantisation", *(["VDPC"] if vdpc else []),
                "fidelity", "plan", "total"]
    assert phases == expected, r.stderr
    assert all(re.search(r" \(\d+\.\d\d s\)$", ln) for ln in lines[:-1]), r.stderr
    assert re.fullmatch(r"total: \d+\.\d\d s", lines[-1])
    r = run_mpq("search", model, "--board", "nano33ble", "--sram", "20000", "--data", calib,
                "-o", tmp_path / "q.json")
    assert r.returncode == 0 and r.stderr == ""
    assert "\x1b[" not in r.stdout and "\r" not in r.stdout  # no bar, no colour in a pipe
    assert (tmp_path / "q.json").read_bytes() == plan.read_bytes()
    # the summary names the PTQ fit kept and what each candidate measured
    kept = json.loads(plan.read_text())["search"]["measured"]["ptq"]["kept"]
    assert re.search(rf"^PTQ: {kept} kept — damage against float on the validation samples: "
                     r"none \d\.\d{5}, bias correction \d\.\d{5} \(fitted on the 192 samples",
                     r.stdout, re.M), r.stdout


def test_version_names_the_command() -> None:
    from mpq import __version__

    result = run_mpq("--version")
    assert result.returncode == 0
    assert result.stdout.strip() == f"mpq, version {__version__}"
