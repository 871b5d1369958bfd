"""The benchmark suite's smoke subset (`benchmarks/run.py --smoke`), as CI runs it.

One real run into a temporary directory (never benchmarks/results): the paper tables and the
seed methods' side-by-side table on the shared ResNet-8 and KWS models, QEMU instruction counts
included, then the JSON and Markdown it writes are checked for the rows and for numbers a reader
relies on.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, shared_model

RUN = REPO / "benchmarks" / "run.py"


@pytest.fixture(scope="module")
def smoke(tmp_path_factory) -> Path:
    for name in ("kws01_mfcc_int8_1000.npz", "pretrainedResnet.onnx",
                 "pretrainedResnet_quant.tflite"):
        shared_model(name)
    if shutil.which("arm-none-eabi-gcc") is None or shutil.which("qemu-system-arm") is None:
        if os.environ.get("CI"):
            pytest.fail("cross tools missing in CI")
        pytest.skip("arm-none-eabi-gcc / qemu-system-arm not installed (see .ci/run)")
    out = tmp_path_factory.mktemp("bench")
    proc = subprocess.run([sys.executable, str(RUN), "--smoke", "--out", str(out)],
                          capture_output=True, text=True, timeout=1200, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def _rows(out: Path, name: str, key: str = "rows") -> list[dict]:
    data = json.loads((out / f"{name}.json").read_text())
    assert data["smoke"] is True and data["machine"]["cpus"] >= 1
    return data["result"][key]


def test_smoke_refuses_to_overwrite_the_suite_results() -> None:
    proc = subprocess.run([sys.executable, str(RUN), "--smoke"], capture_output=True,
                          text=True, timeout=300, cwd=REPO)
    assert proc.returncode == 2
    assert "--smoke needs --out DIR" in proc.stderr


def test_table1_counts_instructions_and_meets_the_tight_budget(smoke: Path) -> None:
    rows = _rows(smoke, "table1")
    assert [r["plan"] for r in rows] == ["int8 layer-based", "mpq plan (SRAM 26,000 B)"]
    base, plan = rows
    for r in rows:
        assert r["mismatches"] == 0  # the QEMU firmware computed the reference's bytes
        assert isinstance(r["instructions"], int) and r["instructions"] > 1_000_000
        assert r["elf_flash"] > r["flash_params"] > 0
    assert base["sram"] > 26_000 >= plan["sram"]  # the budget forced the plan below int8
    assert plan["bitops"] < base["bitops"]
    assert any(b in plan["act_bits"].split()[-1] for b in ("4:", "2:"))


def test_table2_accuracies_and_budgets(smoke: Path) -> None:
    rows = {r["strategy"]: r for r in _rows(smoke, "table2")}
    assert set(rows) == {"float (onnxruntime)", "uniform int8", "uniform 4-bit activations",
                         "rusci (memory-driven halving)", "exact (ILP)"}
    for r in rows.values():
        assert 0.0 < r["accuracy"] <= 1.0
    # KWS DS-CNN is ~91 % accurate in float; int8 stays within 2 pp of it.
    assert rows["float (onnxruntime)"]["accuracy"] > 0.85
    assert abs(rows["uniform int8"]["accuracy"] - rows["float (onnxruntime)"]["accuracy"]) < 0.02
    assert rows["uniform int8"]["sram"] > rows["uniform int8"]["sram_budget"]
    for name in ("uniform 4-bit activations", "rusci (memory-driven halving)", "exact (ILP)"):
        r = rows[name]
        assert r["sram"] <= r["sram_budget"] == 8_000
        assert r["bitops"] < rows["uniform int8"]["bitops"]
        assert r["search_seconds"] > 0
    assert set(rows["uniform 4-bit activations"]["act_bits"].split()) == {"8:2", "4:12"}


def test_table3_sweeps_trade_bitops_and_draw_fig5(smoke: Path) -> None:
    lam = {(r["phi_norm"], r["lambda"]): r for r in _rows(smoke, "table3", "lambda_rows")}
    assert set(lam) == {("global", 0.2), ("global", 0.8), ("map", 0.2), ("map", 0.8)}
    # DESIGN §7.1: with Φ per map λ trades BitOPs for accuracy; globally normalised it cannot.
    assert lam["map", 0.2]["bitops"] < lam["map", 0.8]["bitops"]
    assert lam["global", 0.2]["bitops"] == lam["global", 0.8]["bitops"]
    phi = {r["phi"]: r for r in _rows(smoke, "table3", "phi_rows")}
    assert set(phi) == {0.90, 0.99}
    for r in phi.values():
        assert 0.0 <= r["outlier_class_rate"] <= 1.0 and 0.0 < r["accuracy"] <= 1.0
        assert r["bitops"] <= r["expected_bitops"] <= r["bitops_int8"]
        assert r["sram"] <= r["sram_budget"]
    # A wider central mass φ leaves fewer outliers, so no more outlier-class patches.
    assert phi[0.99]["outlier_class_rate"] <= phi[0.90]["outlier_class_rate"]
    png = (smoke / "fig5_smoke.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 10_000


def test_methods_side_by_side_exports_and_verifies(smoke: Path) -> None:
    rows = {r["method"]: r for r in _rows(smoke, "methods")}
    assert set(rows) == {"float (onnxruntime)", "linear int8", "linear 4-bit weights",
                         "wentropy:4 (Park et al.)", "pow2:4 (Nayak et al.)",
                         "importance (Tang et al., LIMPQ ILP)"}
    searched = [r for name, r in rows.items() if name != "float (onnxruntime)"]
    for r in searched:
        assert r["mismatches"] == 0 and r["instructions"] > 1_000_000  # QEMU ran the firmware
        assert 0.0 < r["accuracy"] <= 1.0 and r["search_seconds"] > 0
    int8, lin4 = rows["linear int8"], rows["linear 4-bit weights"]
    assert int8["weight_bits"] == "8:10" and lin4["weight_bits"] == "4:10"
    # 4-bit codes halve the weights; wentropy adds one 16-entry int8 codebook per layer
    assert lin4["flash_params"] < int8["flash_params"]
    went = rows["wentropy:4 (Park et al.)"]
    assert went["flash_params"] == lin4["flash_params"] + 10 * 16
    assert rows["pow2:4 (Nayak et al.)"]["flash_params"] == lin4["flash_params"]
    imp = rows["importance (Tang et al., LIMPQ ILP)"]
    assert imp["sram"] <= imp["sram_budget"] == 8_000 < int8["sram"]
    # the budget: linear 4-bit's Flash plus the packed kernels' code the search reserves
    assert imp["flash_with_code_estimate"] <= imp["flash_budget"]
    assert imp["flash_budget"] >= lin4["flash_with_code_estimate"]


def test_markdown_has_every_table_and_the_figure(smoke: Path) -> None:
    md = (smoke / "RESULTS.md").read_text()
    assert "Last smoke subset (`--smoke`) run" in md and "QEMU" in md and "numpy" in md
    for name in ("table1", "table2", "table3", "tflm_arena", "methods"):
        result = json.loads((smoke / f"{name}.json").read_text())["result"]
        for table in result.get("tables", [result["table"]]):
            assert table["title"] in md
            for row in table["rows"]:
                assert "| " + " | ".join(row) + " |" in md
    assert "![fig5_smoke.png](fig5_smoke.png)" in md
    suite = json.loads((smoke / "suite.json").read_text())
    assert suite["smoke"] and suite["benchmarks"] == ["tflm_arena", "table1", "table2", "table3",
                                                "methods"]
