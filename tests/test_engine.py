"""`--engine c`: `mpq eval` / `mpq run` of a plan through its exported C compiled for the host
and loaded with ctypes — byte for byte the numpy integer reference (the oracle here), on the
Fashion demo plan (patches, VDPC) and a mixed-precision plan of the shared KWS DS-CNN; `auto`
falls back to numpy with a note when there is no compiler, `c` then stops with one line."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO, run_mpq

from mpq.boards import get_board
from mpq.engine import CPlanRunner, _cache_dir, host_compiler, plan_runner
from mpq.evaluate import PlanRunner, accuracy
from mpq.frontend import load_model
from mpq.plan import load_plan
from mpq.quant.calibrate import load_dataset
from mpq.search.driver import SearchOptions, search

EX = REPO / "examples" / "fashion"


@pytest.fixture(scope="module")
def demo(fashion_vdpc, tmp_path_factory) -> dict:
    """The Fashion demo budget (--sram 14000) under vdqs, so patches and VDPC, and 100
    labelled test images."""
    work = tmp_path_factory.mktemp("engine")
    test = np.load(EX / "test.npz")
    np.savez(work / "test100.npz", x=test["x"][:100], y=test["y"][:100])
    np.save(work / "x20.npy", test["x"][:20])
    return {"root": fashion_vdpc["root"], "plan": fashion_vdpc["plan"],
            "test": work / "test100.npz", "x": work / "x20.npy"}


def _need_cc() -> str:
    cc = host_compiler()
    if cc is None:
        pytest.skip("no host C compiler")
    return cc


def test_c_engine_gives_the_reference_bytes_on_the_fashion_demo_plan(demo) -> None:
    """100 test images through the plan's C and through the numpy reference: the same int8
    outputs, sample for sample (the plan runs patches and VDPC's two branches)."""
    cc = _need_cc()
    plan, graph = load_plan(demo["plan"]), load_model(demo["root"] / "fashion_cnn.onnx")
    assert plan.patch and plan.patch.get("vdpc")  # the paths this test is meant to cover
    x = np.load(EX / "test.npz")["x"][:100]
    ref = PlanRunner(plan, graph).outputs(x)
    got = CPlanRunner(plan, graph, cc).outputs(x)
    assert got.dtype == ref.dtype and got.shape == ref.shape
    assert np.array_equal(got, ref)
    # Built again: every object comes from the content-keyed cache, same bytes out.
    cache = _cache_dir()
    before = sorted(cache.iterdir()) if cache else None
    assert np.array_equal(CPlanRunner(plan, graph, cc).outputs(x[:20]), ref[:20])
    assert (sorted(cache.iterdir()) if cache else None) == before


def test_c_engine_gives_the_reference_bytes_on_a_mixed_kws_plan(kws, tmp_path: Path) -> None:
    """A mixed-precision plan of the shared KWS DS-CNN (SRAM squeezed so the search lowers
    bits): the C engine's outputs on 200 clips equal the reference's."""
    cc = _need_cc()
    graph = load_model(kws["model"])
    res = search(kws["model"], graph, get_board("nano33ble"),
                 load_dataset(kws["calib"], graph),
                 SearchOptions(patches="none", sram=9000))  # int8 needs ~11,000 B
    plan = res.plan
    assert min(t.bits for t in plan.tensors) < 8  # mixed precision, sub-byte packing
    x = np.load(kws["test"])["x"][:200]
    ref = PlanRunner(plan, graph).outputs(x)
    got = CPlanRunner(plan, graph, cc).outputs(x)
    assert np.array_equal(got, ref), int((got != ref).sum())


def test_cli_engines_agree_byte_for_byte(demo, tmp_path: Path) -> None:
    """`mpq run PLAN --engine c -o` writes the .npy of the numpy reference's outputs, byte for
    byte, and `mpq eval PLAN` (default engine: c when a compiler is present, with no note)
    prints the reference's plan accuracy."""
    _need_cc()
    plan, graph = load_plan(demo["plan"]), load_model(demo["root"] / "fashion_cnn.onnx")
    runner = PlanRunner(plan, graph)
    buf = io.BytesIO()
    np.save(buf, runner.outputs(np.load(demo["x"])).astype(np.int8))
    r = run_mpq("run", demo["plan"], "--input", demo["x"], "-o", tmp_path / "c.npy",
                "--engine", "c", "-q")
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "c.npy").read_bytes() == buf.getvalue()
    r = run_mpq("eval", demo["plan"], "--data", demo["test"], "--json", "-q")
    assert r.returncode == 0 and "note:" not in r.stderr, r.stderr
    ds = load_dataset(demo["test"], graph)
    result = json.loads(r.stdout)
    assert result["samples"] == 100
    assert result["plan"] == accuracy(runner.predictions(ds), ds.y)


def test_no_compiler_auto_falls_back_and_c_refuses(demo, tmp_path: Path) -> None:
    """With no cc or gcc on PATH, `--engine auto` runs numpy with one note line on stderr and
    `--engine c` is one error line, exit 1; `--engine c` with a model (not a plan) is refused."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "PATH": str(tmp_path)}  # no compiler there
    base = [sys.executable, "-m", "mpq.cli", "run", str(demo["plan"]), "--input",
            str(demo["x"]), "-q"]
    r = subprocess.run([*base, "--engine", "auto"], capture_output=True, text=True, env=env,
                       timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stderr.startswith("note: no host C compiler") and len(r.stderr.splitlines()) == 1
    r = subprocess.run([*base, "--engine", "c"], capture_output=True, text=True, env=env,
                       timeout=300)
    assert r.returncode == 1 and r.stderr.startswith("error: --engine c: no host C compiler")
    assert len(r.stderr.splitlines()) == 1, r.stderr
    r = run_mpq("run", demo["root"] / "fashion_cnn.onnx", "--input", demo["x"], "--data",
                EX / "calib.npz", "--engine", "c")
    assert r.returncode == 1 and "--engine c runs a plan" in r.stderr
    assert len(r.stderr.splitlines()) == 1, r.stderr


def test_plan_runner_numpy_engine_is_the_reference(demo) -> None:
    """--engine numpy is the reference itself, whatever compilers exist."""
    plan, graph = load_plan(demo["plan"]), load_model(demo["root"] / "fashion_cnn.onnx")
    assert type(plan_runner(plan, graph, "numpy")) is PlanRunner


def test_auto_falls_back_when_the_export_refuses_the_plan(demo, monkeypatch) -> None:
    """A plan the numpy reference runs but the export refuses: `auto` runs numpy and says why
    in its note; `c` reports the export's error."""
    import mpq.engine
    from mpq.errors import MpqError

    def refuse(*args, **kwargs):
        raise MpqError("export: concat 'x' is not along channels")

    monkeypatch.setattr(mpq.engine, "render_export", refuse)
    plan, graph = load_plan(demo["plan"]), load_model(demo["root"] / "fashion_cnn.onnx")
    notes: list[str] = []
    if host_compiler() is not None:
        assert type(plan_runner(plan, graph, "auto", notes.append)) is PlanRunner
        assert len(notes) == 1 and "not along channels" in notes[0]
        with pytest.raises(MpqError, match="not along channels"):
            plan_runner(plan, graph, "c")
