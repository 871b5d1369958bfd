"""Real network shapes end to end (issue 14 item 3), as a user runs them from the terminal.

Each network of `real_networks` (MobileNetV3-Small's squeeze-excite and HardSwish, BlazeFace's
channel-Pad residuals and two Reshape + Concat heads, a YOLO-tiny head with Resize, Concat,
LeakyRelu and two outputs) goes through `mpq search` (int8, and a tight SRAM budget that forces
sub-byte maps where the ops allow them) → `mpq export` → `mpq verify` on the host and under
QEMU's Cortex-M4. Every output of every sample must equal the integer reference byte for byte,
and verify must have compared every output.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import real_networks as R
from conftest import run_mpq

from mpq.frontend import load_model
from mpq.quant.calibrate import onnx_input_shape


def _cross_tools() -> bool:
    if shutil.which("arm-none-eabi-gcc") and shutil.which("qemu-system-arm"):
        return True
    if os.environ.get("CI"):
        pytest.fail("cross tools missing in CI")
    return False


@pytest.fixture(scope="module", params=sorted(R.REAL_NETWORKS))
def network(request, tmp_path_factory) -> dict:
    """The model, 48 calibration and 6 test inputs, and its int8 plan."""
    name = request.param
    root = tmp_path_factory.mktemp(name)
    model = root / f"{name}.onnx"
    model.write_bytes(R.REAL_NETWORKS[name]().SerializeToString())
    graph = load_model(model)
    rng = np.random.default_rng(7)
    shape = onnx_input_shape(graph)
    np.savez(root / "calib.npz", x=rng.random((48, *shape), dtype=np.float32))
    np.savez(root / "test.npz", x=rng.random((6, *shape), dtype=np.float32))
    plan = root / "int8.plan.json"
    r = run_mpq("search", model, "--board", "nano33ble", "--data", root / "calib.npz",
                "--strategy", "int8", "--patches", "none", "-o", plan, "-q")
    assert r.returncode == 0, r.stderr
    return {"name": name, "root": root, "model": model, "graph": graph, "int8": plan}


def _verify(plan: Path, data: Path, target: str) -> dict:
    r = run_mpq("verify", plan, "--data", data, "--target", target, "--json")
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def _assert_every_output_exact(result: dict, graph, samples: int) -> None:
    assert result["mismatches"] == 0
    assert result["samples"] == samples
    # verify compared every output of the model, not only the first one
    compared = {o["name"]: o for o in result["outputs"]}
    assert set(compared) == set(graph.outputs)
    assert all(o["mismatches"] == 0 for o in compared.values())


def test_int8_plan_exact_on_host_and_qemu(network) -> None:
    graph = network["graph"]
    data = network["root"] / "test.npz"
    _assert_every_output_exact(_verify(network["int8"], data, "host"), graph, 6)
    if _cross_tools():
        _assert_every_output_exact(_verify(network["int8"], data, "qemu-m4"), graph, 6)


def test_tight_budget_plan_exact_on_host_and_qemu(network) -> None:
    """A budget of 0.85 of the int8 need: the search must lower bits (or patch) to fit it."""
    root, graph = network["root"], network["graph"]
    int8 = json.loads(network["int8"].read_text())
    budget = int(int8["predicted"]["sram_needed_bytes"] * 0.85)
    plan = root / "tight.plan.json"
    r = run_mpq("search", network["model"], "--board", "nano33ble", "--data",
                root / "calib.npz", "--sram", budget, "-o", plan, "-q")
    assert r.returncode == 0, r.stderr
    tight = json.loads(plan.read_text())
    assert tight["predicted"]["sram_needed_bytes"] <= budget
    out = root / "fw"
    assert run_mpq("export", plan, "-o", out).returncode == 0
    assert (out / "mpq_model.h").exists()
    data = root / "test.npz"
    _assert_every_output_exact(_verify(plan, data, "host"), graph, 6)
    if _cross_tools():
        _assert_every_output_exact(_verify(plan, data, "qemu-m4"), graph, 6)


def test_predicted_flash_within_one_percent_of_the_build(network) -> None:
    """The int8 plan's Flash (parameters, tables, constants + measured kernel code) against
    the model's symbols in the firmware arm-none-eabi-gcc links (`mpq export --build`)."""
    if not _cross_tools():
        pytest.skip("arm-none-eabi-gcc not installed")
    out = network["root"] / "fw-build"
    r = run_mpq("export", network["int8"], "-o", out, "--build")
    assert r.returncode == 0, r.stderr
    p = json.loads(network["int8"].read_text())["predicted"]
    predicted = p["flash_bytes"] + p["code_bytes_estimate"]
    measured = json.loads((out / "mpq_report.json").read_text())["measured"]["model_flash_bytes"]
    assert abs(predicted - measured) <= 0.01 * measured, (predicted, measured)
