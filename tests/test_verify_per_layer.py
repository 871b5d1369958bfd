"""`mpq verify --per-layer`: every layer's instructions under QEMU, adding up exactly to the
whole-model count, with labels that cost no instruction."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import onnx_builders as B
import pytest
from conftest import run_mpq
from test_bad_input import assert_clean_failure

from mpq.boards import get_board
from mpq.frontend import load_model
from mpq.quant.calibrate import dataset_from_array, onnx_input_shape
from mpq.search.driver import SearchOptions, search


def _cross_tools() -> None:
    if shutil.which("arm-none-eabi-gcc") is None or shutil.which("qemu-system-arm") is None:
        if os.environ.get("CI"):
            pytest.fail("cross tools missing in CI")
        pytest.skip("arm-none-eabi-gcc / qemu-system-arm not installed (see .ci/run)")


@pytest.fixture(scope="module")
def patch_plan(tmp_path_factory):
    """A small MobileNetV2 with a patch stage, VDPC and sub-byte maps: every kind of segment."""
    tmp = tmp_path_factory.mktemp("per-layer")
    path = tmp / "m.onnx"
    path.write_bytes(B.mobilenet_v2(0.35, 48, num_classes=10).SerializeToString())
    graph = load_model(path)
    x = np.random.default_rng(1).random((16, *onnx_input_shape(graph))).astype(np.float32)
    res = search(path, graph, get_board("nano33ble"), dataset_from_array(x, "r"),
                 SearchOptions(strategy="vdqs", patches="k=10,n=2", sram=30_000))
    plan_path = tmp / "m.plan.json"
    res.plan.save(plan_path)
    np.savez(tmp / "x.npz", x=x[:2])
    return res.plan, graph, plan_path, x[:2]


def test_per_layer_counts_add_up_to_the_whole_model(patch_plan) -> None:
    _cross_tools()
    plan, _, plan_path, _ = patch_plan
    assert plan.patch is not None and plan.patch["vdpc"] is not None
    r = run_mpq("verify", plan_path, "--target", "qemu-m4", "--data",
                plan_path.parent / "x.npz", "--per-layer", "--json")
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout)
    assert result["mismatches"] == 0
    rows = result["per_layer"]
    assert sum(row["instructions_all"] for row in rows) == result["instructions_all"]
    assert result["instructions_all"] // 2 == result["instructions"]
    assert {"layer", "op", "w_bits", "a_bits_in", "a_bits_out", "macs", "bitops",
            "instructions", "instructions_per_mac"} <= set(rows[1])
    kinds = {row["segment"][0] for row in rows}
    assert kinds == {"h", "P", "S", "V", "L", "O"}  # harness, prologue, stage, VDPC, layers, out
    # Every MAC of the plan is in exactly one row, and each such row ran instructions.
    assert sum(row["macs"] for row in rows) == sum(layer.macs for layer in plan.layers)
    assert all(row["instructions_all"] > row["macs"] for row in rows if row["macs"])
    # The rows without a layer are a few instructions of glue, not hidden model work.
    assert sum(row["instructions"] for row in rows if row["segment"] in ("harness", "P", "O")) \
        < 200
    # The table prints the same rows.
    from mpq import cli
    from mpq.verify import VerifyResult

    with cli.out.capture() as cap:
        cli._print_per_layer(VerifyResult(**result))
    text = cap.get()
    assert "Instructions per layer on qemu-m4, measured" in text
    assert "harness" in text and "output copy and return" in text
    assert f"{result['instructions_all'] / 2:,.1f}" in text \
        or f"{result['instructions_all'] // 2:,}" in text


SEGMENT_PROGRAM = r"""
#include "mpq_semihost.h"
__attribute__((noinline)) int f1(int x) { for (int i = 0; i < 10; i++) x = x * 3 + i; return x; }
__attribute__((noinline)) int f2(int x) { for (int i = 0; i < 20; i++) x ^= x >> 1; return x; }
int main(void)
{
    int x = 1;
    for (int k = 0; k < 3; k++) {
        mpq_window_start();
        x = f1(x);
        x = f2(x);
        x = f1(x);
        mpq_window_stop();
    }
    return x == 12345;
}
"""


def test_plugin_segments_split_the_window_exactly(tmp_path: Path) -> None:
    """The plugin's marks only split the count: the window is the same with and without them,
    its segments add up to it, and each function's instructions land in its segment."""
    _cross_tools()
    from mpq import firmware

    src = tmp_path / "seg.c"
    src.write_text(SEGMENT_PROGRAM)
    elf = firmware.build_elf([src], [], "qemu-m4", tmp_path / "build")
    addr = firmware.symbol_addresses(elf, ["f1", "f2", "main"])
    plain = firmware.run_qemu(elf, "qemu-m4", tmp_path / "a", timeout=30)
    marked = firmware.run_qemu(elf, "qemu-m4", tmp_path / "b", timeout=30,
                               marks=[(addr["f1"], 1), (addr["f2"], 2)])
    assert marked.instructions_window == plain.instructions_window > 0
    assert marked.instructions_total == plain.instructions_total
    assert sum(marked.segments.values()) == marked.instructions_window
    assert set(marked.segments) == {0, 1, 2}
    # f2's 20 iterations run in segment 2 once per window, f1's 10 twice in segment 1.
    assert marked.segments[2] >= 3 * 20 * 3 and marked.segments[1] >= 3 * 2 * 10 * 3
    assert 0 < marked.segments[0] < 3 * 10  # window start up to f1's entry


def test_per_layer_refused_on_the_host(patch_plan) -> None:
    _, _, plan_path, _ = patch_plan
    assert_clean_failure(run_mpq("verify", plan_path, "--data", plan_path.parent / "x.npz",
                                 "--per-layer"), "--per-layer counts instructions under QEMU")
