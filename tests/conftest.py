"""Shared test helpers: where the repository and the shared models are, and running the CLI."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

REPO = Path(__file__).resolve().parent.parent

# pytest-xdist's workers export COLUMNS=80 (a terminal they do not have); the CLI's tables
# would then wrap differently under `make test` than in a plain run. Without a terminal the
# CLI uses its documented default width (160) unless a test sets COLUMNS itself.
os.environ.pop("COLUMNS", None)
os.environ.pop("LINES", None)
SHARED_MODELS = REPO.parent / "shared" / "models"

SHARED_ONNX = {
    "resnet8": "pretrainedResnet.onnx",
    "vww": "vww_96_float.onnx",
    "kws": "kws_ref_model_fp32.onnx",
    "ad": "ad01_fp32.onnx",
}


def with_stack(graph, sram: int | None) -> int | None:
    """A test's SRAM budget for the model's data plus its stack on nano33ble (the SRAM figure
    counts `mpq_model_run`'s stack: `mpq.budget.predicted_stack_bytes`)."""
    from mpq.budget import predicted_stack_bytes

    return None if sram is None else sram + predicted_stack_bytes(graph, "cortex-m4/fpv4-sp-d16")


def shared_model(name: str) -> Path:
    """Path of a file in ../shared/models; skipped outside CI when the folder is absent."""
    path = SHARED_MODELS / name
    if not path.exists():
        if os.environ.get("CI"):
            pytest.fail(f"shared model {path} is missing in CI")
        pytest.skip(f"{path} not present (tests read ../shared/models beside the repository)")
    return path


@pytest.fixture(scope="session")
def fashion_demo(tmp_path_factory) -> dict[str, Path]:
    """The Fashion example beside `make demo`'s plan (nano33ble, --sram 14000: patches),
    searched once per session. Tests read these; they write their own outputs
    elsewhere."""
    import shutil

    example = REPO / "examples" / "fashion"
    root = tmp_path_factory.mktemp("fashion-demo")
    shutil.copy(example / "fashion_cnn.onnx", root / "fashion_cnn.onnx")
    plan = root / "fashion.plan.json"
    r = run_mpq("search", "fashion_cnn.onnx", "--board", "nano33ble", "--sram", "14000",
                "--data", example / "calib.npz", "-o", plan, "-q", cwd=root)
    assert r.returncode == 0, r.stderr
    return {"root": root, "model": root / "fashion_cnn.onnx", "plan": plan}


@pytest.fixture(scope="session")
def fashion_vdpc(fashion_demo) -> dict[str, Path]:
    """The demo's model and budget under `--strategy vdqs`: a patch plan with VDPC's two
    branches (the measured default's split at 14,000 B runs without it)."""
    root = fashion_demo["root"]
    plan = root / "fashion.vdpc.plan.json"
    r = run_mpq("search", "fashion_cnn.onnx", "--board", "nano33ble", "--sram", "14000",
                "--strategy", "vdqs", "--data", REPO / "examples" / "fashion" / "calib.npz",
                "-o", plan, "-q", cwd=root)
    assert r.returncode == 0, r.stderr
    return {"root": root, "model": root / "fashion_cnn.onnx", "plan": plan}


KWS_ZP, KWS_SCALE = 83, 0.5847029  # the int8 quantisation the shared KWS clips were stored in


@pytest.fixture(scope="session")
def kws(tmp_path_factory) -> dict[str, Path]:
    """The shared KWS clips as float MFCCs — the first 100 to calibrate, the other 900 to
    test — and a copy of the float DS-CNN beside them (plans find their model next to them)."""
    import shutil

    d = np.load(shared_model("kws01_mfcc_int8_1000.npz"))
    x = (d["x"].astype(np.float32) - KWS_ZP) * np.float32(KWS_SCALE)
    root = tmp_path_factory.mktemp("kws")
    np.savez(root / "calib.npz", x=x[:100], y=d["y"][:100])
    np.savez(root / "test.npz", x=x[100:], y=d["y"][100:])
    model = root / "kws.onnx"
    shutil.copy(shared_model("kws_ref_model_fp32.onnx"), model)
    return {"calib": root / "calib.npz", "test": root / "test.npz", "model": model,
            "root": root}


def run_mpq(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """Run the real `mpq` CLI in a subprocess (as a user or a Makefile would)."""
    return subprocess.run([sys.executable, "-m", "mpq.cli", *map(str, args)], cwd=cwd,
                          capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHONPATH": str(REPO)})


def ort_run(model: onnx.ModelProto | Path, x: np.ndarray) -> np.ndarray:
    """First output of onnxruntime on one input batch."""
    src = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    sess = ort.InferenceSession(src, providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x})[0]


def random_input(model: onnx.ModelProto, batch: int = 2, seed: int = 0,
                 scale: float = 1.0) -> np.ndarray:
    """Random float input in [0, scale) for the model's first input (batch dim replaced)."""
    vi = model.graph.input[0]
    dims = [d.dim_value for d in vi.type.tensor_type.shape.dim][1:]
    rng = np.random.default_rng(seed)
    return (rng.random([batch, *dims]) * scale).astype(np.float32)


def rel_err(a: np.ndarray, b: np.ndarray) -> float:
    """max |a − b| relative to the range of b."""
    return float(np.abs(a - b).max() / max(float(np.ptp(b)), 1e-12))
