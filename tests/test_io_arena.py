"""Input and outputs inside the arena (issue 16 item 1): the planner's lifetimes, byte-exact
exports in that layout on the host and qemu-m4 (a shared model and a patch plan), the SRAM
figure against the build, and plans from before `schedule.io` loading and exporting as they
did."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
from conftest import REPO, run_mpq

from mpq.frontend.onnx_import import import_onnx
from mpq.memory import io_buffer_bytes, layer_memory
from mpq.patch import PatchSplit, plan_patches

FASHION = REPO / "examples" / "fashion"
needs_arm = pytest.mark.skipif(shutil.which("arm-none-eabi-gcc") is None
                               or shutil.which("qemu-system-arm") is None,
                               reason="needs arm-none-eabi-gcc and qemu-system-arm")


def _buffer_of(buffers, tensor: str):
    return next(b for b in buffers if any(s.tensor == tensor for s in b.segments))


def test_the_input_lives_until_its_last_reader_and_through_the_patch_stage() -> None:
    """Arena mode: the input is an arena buffer from step 0 to its last reader (to the stage's
    last step with patches, which every patch reads it through); no tensor alive meanwhile
    shares its bytes; the caller's buffers are 0 B. External mode keeps it out of the arena."""
    graph = import_onnx(FASHION / "fashion_cnn.onnx")
    x = graph.inputs[0]
    assert io_buffer_bytes(graph, "arena") == (0, 0)
    assert io_buffer_bytes(graph, "external") == (28 * 28, 10)
    layer = plan_patches(graph, None, "arena")
    assert layer.lifetimes[x] == (0, 0)  # only the first conv reads it
    assert x not in plan_patches(graph, None).lifetimes
    patch = plan_patches(graph, PatchSplit(4, 3), "arena")
    assert patch.lifetimes[x] == (0, 3)
    for sched in (layer, patch):
        mem = sched.memory()
        buf = _buffer_of(mem.plan.buffers, x)
        assert buf.size == 28 * 28  # 8-bit, already a multiple of 16 B
        off = mem.plan.offsets[buf.name]
        for other in mem.plan.buffers:
            if other is buf:
                continue
            o = mem.plan.offsets[other.name]
            for s in other.segments:
                alive_together = s.first <= buf.segments[0].last
                shares_bytes = o < off + buf.size and off < o + s.size
                assert not (alive_together and shares_bytes), (s.tensor, sched.split_layer)
    ext, arena = layer_memory(graph, io="external"), layer_memory(graph, io="arena")
    assert arena.input_bytes == arena.output_bytes == 0
    assert ext.input_bytes == 28 * 28 and ext.output_bytes == 10


@pytest.fixture(scope="module")
def arena_plans(tmp_path_factory, kws) -> dict[str, Path]:
    """A shared model (KWS DS-CNN, int8, layer-based) and a Fashion int8 patch plan, both with
    the input in the arena (the default)."""
    root = tmp_path_factory.mktemp("io-arena")
    shutil.copy(kws["model"], root / "kws.onnx")
    shutil.copy(FASHION / "fashion_cnn.onnx", root / "fashion.onnx")
    plans = {}
    for name, data, extra in (("kws", kws["calib"], ["--patches", "none"]),
                              ("fashion", FASHION / "calib.npz", ["--patches", "k=4,n=3"])):
        plan = root / f"{name}.plan.json"
        r = run_mpq("search", f"{name}.onnx", "--board", "stm32h743", "--strategy", "int8",
                    "--data", data, *extra, "-o", plan, "-q", cwd=root)
        assert r.returncode == 0, r.stderr
        plans[name] = plan
    return plans


def _verify(plan: Path, data: Path, target: str) -> dict:
    r = run_mpq("verify", plan, "--data", data, "--target", target, "--samples", "2", "--json")
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


@needs_arm
@pytest.mark.parametrize("name", ["kws", "fashion"])
def test_arena_io_plans_are_byte_exact_on_host_and_qemu(arena_plans, kws, name) -> None:
    """Verify on the host and on qemu-m4 reads each input straight into mpq_model_input():
    0 mismatches, no test vectors in the firmware, and the model's measured SRAM is the plan's
    figure (the export rounds the scratch up to 16 B)."""
    plan = json.loads(arena_plans[name].read_text())
    assert plan["schedule"]["io"] == "arena"
    p = plan["predicted"]
    assert p["input_bytes"] == p["output_bytes"] == 0
    data = kws["test"] if name == "kws" else FASHION / "test.npz"
    host = _verify(arena_plans[name], data, "host")
    assert host["mismatches"] == 0 and host["samples"] == 2
    qemu = _verify(arena_plans[name], data, "qemu-m4")
    assert qemu["mismatches"] == 0 and qemu["test_vector_bytes"] == 0
    data = p["sram_needed_bytes"] - p["stack_bytes"]  # verify reports the data, not the stack
    assert data - 64 <= qemu["model_sram_bytes"] <= data + 15


def _strip_digest(text: str) -> str:
    return re.sub(r"[0-9a-f]{16}", "DIGEST", text)


def test_plans_without_io_load_and_export_as_external(tmp_path: Path) -> None:
    """A plan written before `schedule.io` existed (the key absent) loads, passes the plan
    check and exports exactly what the same plan marked "external" does: the caller's
    buffers and the old `mpq_model_run` contract, no mpq_model_input()."""
    shutil.copy(FASHION / "fashion_cnn.onnx", tmp_path / "fashion.onnx")
    plan = tmp_path / "ext.plan.json"
    r = run_mpq("search", "fashion.onnx", "--board", "nano33ble", "--strategy", "int8",
                "--patches", "none", "--data", FASHION / "calib.npz", "--io", "external",
                "-o", plan, "-q", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    data = json.loads(plan.read_text())
    assert data["schedule"]["io"] == "external" and data["predicted"]["input_bytes"] == 784
    del data["schedule"]["io"]
    old = tmp_path / "old.plan.json"
    old.write_text(json.dumps(data))
    for p, out in ((plan, "ext"), (old, "old")):
        r = run_mpq("export", p, "-o", tmp_path / out, "--target", "arduino", cwd=tmp_path)
        assert r.returncode == 0, r.stderr
    files = sorted(f.relative_to(tmp_path / "ext") for f in (tmp_path / "ext").rglob("*")
                   if f.is_file())
    assert files == sorted(f.relative_to(tmp_path / "old") for f in (tmp_path / "old").rglob("*")
                           if f.is_file())
    for f in files:
        a, b = ((tmp_path / d / f).read_text() for d in ("ext", "old"))
        assert _strip_digest(a) == _strip_digest(b), f
    header = (tmp_path / "old" / "mpq_model.h").read_text()
    assert "MPQ_IO_ARENA" not in header and "mpq_model_input" not in header
    assert "memcpy(outputs[0]" in (tmp_path / "old" / "mpq_model.c").read_text()
