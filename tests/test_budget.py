"""Budgets that hold after the build (issue 14 item 4): the labelled SRAM figure, Flash predicted
within 1 % of what arm-none-eabi-gcc links, `export --build` refusing an over-budget build in
one line, and verify's test vectors reported apart from the model."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess

import pytest
from conftest import REPO, run_mpq

pytestmark = pytest.mark.skipif(shutil.which("arm-none-eabi-gcc") is None,
                                reason="needs arm-none-eabi-gcc")

FASHION = REPO / "examples" / "fashion"


@pytest.fixture(scope="module")
def layer_plans(tmp_path_factory, kws) -> dict[str, dict]:
    """Layer-based plans of the Fashion CNN (nano33ble, 2-bit weights allowed, a Flash budget
    that forces some; input and outputs in the arena, and once more as the caller's buffers)
    and the shared KWS DS-CNN (stm32h743), each exported with --build."""
    root = tmp_path_factory.mktemp("budget")
    shutil.copy(FASHION / "fashion_cnn.onnx", root / "fashion.onnx")
    shutil.copy(kws["model"], root / "kws.onnx")
    out = {}
    shutil.copy(root / "fashion.onnx", root / "fashion_external.onnx")
    for name, board, extra in (("fashion", "nano33ble", ["--flash", "97000"]),
                               ("fashion_external", "nano33ble",
                                ["--flash", "97000", "--io", "external"]),
                               ("kws", "stm32h743", [])):
        plan = root / f"{name}.plan.json"
        r = run_mpq("search", f"{name}.onnx", "--board", board, "--strategy", "qe",
                    "--weight-bits", "8,4,2", "--patches", "none", *extra, "-o", plan, "-q",
                    cwd=root)
        assert r.returncode == 0, r.stderr
        r = run_mpq("export", plan, "-o", root / name, "--build", cwd=root)
        assert r.returncode == 0, r.stderr
        out[name] = {"plan": json.loads(plan.read_text()), "path": plan, "root": root,
                     "report": json.loads((root / name / "mpq_report.json").read_text()),
                     "stdout": r.stdout}
    return out


@pytest.mark.parametrize("name", ["fashion", "fashion_external", "kws"])
def test_predicted_flash_within_one_percent_of_the_build(layer_plans, name):
    """params + code as the plan predicts it vs the model's symbols in the linked ELF."""
    d = layer_plans[name]
    p = d["plan"]["predicted"]
    predicted = p["flash_bytes"] + p["code_bytes_estimate"]
    measured = d["report"]["measured"]["model_flash_bytes"]
    assert abs(predicted - measured) <= 0.01 * measured, (name, predicted, measured)
    assert predicted <= d["plan"]["board"]["flash_budget"]
    assert "predicted" in d["stdout"] and f"{measured:,}" in d["stdout"]


def test_sram_figure_counts_every_buffer_and_holds_after_the_build(layer_plans):
    """sram_needed = arena + scratch + input + output ≤ budget, and the build's model SRAM
    (arena and scratch arrays, the model's .bss, the I/O buffers) is within it."""
    for d in layer_plans.values():
        p, b = d["plan"]["predicted"], d["plan"]["board"]
        assert p["sram_needed_bytes"] == p["arena_bytes"] + p["scratch_bytes"] \
            + p["input_bytes"] + p["output_bytes"] + p["stack_bytes"] <= b["sram_budget"]
        m = d["report"]["measured"]
        # the export rounds the scratch array up to 16 B; the search plans against that too
        assert m["model_sram_bytes"] + m["model_stack_bytes"] \
            <= p["sram_needed_bytes"] + 15 <= b["sram_budget"] + 15
        # the model's stack: GCC's call graph of the very build, bounded by the prediction
        assert 0 < m["model_stack_bytes"] <= p["stack_bytes"] <= m["model_stack_bytes"] + 256
        assert m["io_buffer_bytes"] >= p["input_bytes"] + p["output_bytes"]
        if d["plan"]["schedule"].get("io") == "arena":  # no buffers beside the arena
            assert p["input_bytes"] == p["output_bytes"] == m["io_buffer_bytes"] == 0
        assert m["stack_bytes"] == b["reserve"]["stack"]
        assert m["model_sram_bytes"] + m["stack_bytes"] <= m["sram_bytes"]


def test_over_budget_build_fails_in_one_line_and_writes_nothing(layer_plans, tmp_path):
    """A plan whose budgets the real build exceeds: exit 1, one `error:` line naming both
    overruns, no output directory; --allow-over writes it with one warning line."""
    d = layer_plans["fashion"]
    plan = json.loads(d["path"].read_text())
    measured = d["report"]["measured"]
    plan["board"]["flash_budget"] = measured["model_flash_bytes"] - 100
    plan["board"]["sram_budget"] = measured["model_sram_bytes"] - 100
    tampered = tmp_path / "over.plan.json"
    tampered.write_text(json.dumps(plan))
    model = d["root"] / "fashion.onnx"
    r = run_mpq("export", tampered, "--model", model, "-o", tmp_path / "fw", "--build")
    assert r.returncode == 1
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: build for nano33ble is over budget")
    assert "model Flash" in lines[0] and "100 B over" in lines[0] and "model SRAM" in lines[0]
    assert "Traceback" not in r.stderr and not (tmp_path / "fw").exists()
    r = run_mpq("export", tampered, "--model", model, "-o", tmp_path / "fw", "--build",
                "--allow-over")
    assert r.returncode == 0, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("warning: build for nano33ble is over")
    assert (tmp_path / "fw" / "mpq_model.c").is_file()


def test_arena_io_counts_the_input_once(layer_plans):
    """The same search with the input and outputs in the arena (default) and as the caller's
    buffers (--io external): the arena plan has no I/O buffers, its arena holds the input at an
    offset of its own, and the built model's SRAM is what it predicts."""
    arena, ext = layer_plans["fashion"], layer_plans["fashion_external"]
    assert arena["plan"]["schedule"]["io"] == "arena"
    assert ext["plan"]["schedule"]["io"] == "external"
    p, q = arena["plan"]["predicted"], ext["plan"]["predicted"]
    assert q["input_bytes"] == 28 * 28 and q["output_bytes"] == 10
    offsets = {t["name"]: t["offset"] for t in arena["plan"]["tensors"]}
    assert offsets["input"] is not None and offsets["input"] + 28 * 28 <= p["arena_bytes"]
    assert {t["name"]: t["offset"] for t in ext["plan"]["tensors"]}["input"] is None
    m = arena["report"]["measured"]
    built = m["model_sram_bytes"] + m["model_stack_bytes"]
    assert p["sram_needed_bytes"] <= built + 64 + p["stack_bytes"] - m["model_stack_bytes"]
    assert built <= p["sram_needed_bytes"] + 15  # scratch: the export's 16-B rounding
    # verify on qemu-m4 reads each input straight into the arena: byte-exact, no test vectors
    r = run_mpq("verify", arena["path"], "--target", "qemu-m4", "--data", FASHION / "test.npz",
                "--samples", "3", "--json")
    assert r.returncode == 0, r.stderr
    v = json.loads(r.stdout)
    assert v["mismatches"] == 0 and v["samples"] == 3 and v["test_vector_bytes"] == 0
    assert v["model_sram_bytes"] == m["model_sram_bytes"]


def test_verify_reports_test_vectors_apart(layer_plans):
    """verify --target qemu-m4 links every sample into the harness: those bytes are reported
    as test vectors, not as the model's SRAM (which stays what the plan predicted)."""
    d = layer_plans["fashion_external"]
    r = run_mpq("verify", d["path"], "--target", "qemu-m4", "--data", FASHION / "test.npz",
                "--samples", "3", "--json")
    assert r.returncode == 0, r.stderr
    v = json.loads(r.stdout)
    assert v["mismatches"] == 0 and v["test_vector_bytes"] == 3 * (28 * 28 + 10)
    assert v["model_sram_bytes"] + v["test_vector_bytes"] + v["stack_bytes"] <= v["sram_bytes"]
    p = d["plan"]["predicted"]
    assert v["model_sram_bytes"] <= p["arena_bytes"] + p["scratch_bytes"] + 15  # 16-B aligned
    r = run_mpq("verify", d["path"], "--target", "qemu-m4", "--data", FASHION / "test.npz",
                "--samples", "3")
    assert f"test vectors {v['test_vector_bytes']:,}" in r.stdout


def test_code_table_is_current():
    """kernels/code_sizes.json was measured from today's kernel sources (else run
    `PYTHONPATH=. python -m tools.code_sizes PLAN…`, see its docstring)."""
    table = json.loads((REPO / "kernels" / "code_sizes.json").read_text())
    assert table["compiler"].startswith("arm-none-eabi-gcc")
    for name, digest in table["sources_sha256"].items():
        path = REPO / "kernels" / name
        if name.endswith(".c") and path.exists():
            assert hashlib.sha256(path.read_bytes()).hexdigest() == digest, \
                f"{name} changed since tools/code_sizes.py measured it"


@pytest.fixture(scope="module")
def patch_plan(tmp_path_factory) -> dict:
    """A patch plan of the Fashion CNN with VDPC's all-8-bit outlier branch (what `make demo`
    builds), exported with --build."""
    root = tmp_path_factory.mktemp("patch_budget")
    shutil.copy(FASHION / "fashion_cnn.onnx", root / "fashion.onnx")
    plan = root / "p.plan.json"
    r = run_mpq("search", "fashion.onnx", "--board", "nano33ble", "--strategy", "qe",
                "--sram", "16000", "--patches", "k=4,n=3", "--data", FASHION / "calib.npz",
                "-o", plan, "-q", cwd=root)
    assert r.returncode == 0, r.stderr
    r = run_mpq("export", plan, "-o", root / "fw", "--build", cwd=root)
    assert r.returncode == 0, r.stderr
    return {"plan": json.loads(plan.read_text()),
            "report": json.loads((root / "fw" / "mpq_report.json").read_text())}


def test_patch_plan_flash_within_one_percent_of_the_build(patch_plan):
    """The patch stage's calls, geometry tables, patch loop and VDPC test, and the outlier
    branch's own biases and requantisation, are all in the prediction."""
    plan = patch_plan["plan"]
    assert plan["patch"] is not None and plan["patch"]["vdpc"] is not None
    p = plan["predicted"]
    predicted = p["flash_bytes"] + p["code_bytes_estimate"]
    measured = patch_plan["report"]["measured"]["model_flash_bytes"]
    assert abs(predicted - measured) <= 0.01 * measured, (predicted, measured)
    m = patch_plan["report"]["measured"]
    assert m["model_sram_bytes"] + m["model_stack_bytes"] <= p["sram_needed_bytes"] + 15


CALLS = """
#include <stdint.h>
__attribute__((noinline)) int leaf(volatile int8_t *p) { volatile int8_t b[100]; b[0] = *p;
    return b[0]; }
__attribute__((noinline)) int mid(int8_t *p) { volatile int8_t a[400]; a[1] = *p;
    return leaf(&a[1]) + a[1]; }
int top(int8_t *p) { return mid(p) + leaf(p); }
"""


def test_stack_depth_follows_the_call_graph(tmp_path):
    """The deepest path's frames add up (top → mid → leaf, not top → leaf); a frame of
    unknown size is refused in one line."""
    from mpq.budget import STACK_FLAG, read_call_graph, stack_depth
    from mpq.errors import MpqError

    (tmp_path / "calls.c").write_text(CALLS)
    subprocess.run(["arm-none-eabi-gcc", "-mcpu=cortex-m4", "-mthumb", "-O2", "-c",
                    STACK_FLAG, "calls.c"], cwd=tmp_path, check=True)
    frames, calls = read_call_graph([tmp_path / "calls.ci"])
    assert frames["mid"] >= 400 and frames["leaf"] >= 100
    assert stack_depth(frames, calls, "top") == frames["top"] + frames["mid"] + frames["leaf"]
    (tmp_path / "vla.c").write_text("int f(int n) { volatile char a[n]; a[0] = 1; "
                                    "return a[0]; }\n")
    subprocess.run(["arm-none-eabi-gcc", "-mcpu=cortex-m4", "-mthumb", "-O2", "-c",
                    STACK_FLAG, "vla.c"], cwd=tmp_path, check=True)
    with pytest.raises(MpqError, match="dynamic"):
        read_call_graph([tmp_path / "vla.ci"])


def test_indirect_calls_reach_their_targets(tmp_path):
    """The kernels' indirect calls (GCC's `__indirect_call`): every caller is listed in
    `INDIRECT_TARGETS`, every function whose address the kernels take (GCC's own cgraph dump:
    "Address is taken") matches one of its prefixes, and the bound counts the deepest target —
    mpq_fully_connected reaches a quad dot product through mpq__dot2, deeper than its direct
    calls alone. An indirect call from a caller not listed is refused in one line."""
    from mpq.budget import (
        INDIRECT_CALL,
        INDIRECT_TARGETS,
        STACK_FLAG,
        bare_name,
        read_call_graph,
        stack_depth,
    )
    from mpq.errors import MpqError

    if shutil.which("arm-none-eabi-gcc") is None:
        pytest.skip("needs arm-none-eabi-gcc")
    sources = sorted((REPO / "kernels").glob("mpq_*.c"))
    for src in sources:
        subprocess.run(["arm-none-eabi-gcc", "-mcpu=cortex-m4", "-mthumb", "-mfloat-abi=hard",
                        "-mfpu=fpv4-sp-d16", "-O2", "-ffreestanding", "-ffunction-sections",
                        f"-I{REPO / 'kernels'}", STACK_FLAG, "-fdump-ipa-cgraph", "-c", str(src),
                        "-o", f"{src.stem}.o"], cwd=tmp_path, check=True)
    frames, calls = read_call_graph(sorted(tmp_path.glob("*.ci")))
    callers = {bare_name(f) for f, gs in calls.items() if INDIRECT_CALL in gs}
    assert callers and callers <= set(INDIRECT_TARGETS), callers - set(INDIRECT_TARGETS)
    taken = set()
    for dump in tmp_path.glob("*.cgraph"):
        name = None
        for line in dump.read_text().splitlines():
            if line and not line[0].isspace() and "/" in line.split(" ", 1)[0]:
                name = line.split("/", 1)[0]
            elif line.strip() == "Address is taken." and name is not None:
                taken.add(name)
    prefixes = tuple(p for ps in INDIRECT_TARGETS.values() for p in ps)
    assert taken and all(t.startswith(prefixes) for t in taken), \
        sorted(t for t in taken if not t.startswith(prefixes))
    direct = {f: gs - {INDIRECT_CALL} for f, gs in calls.items()}
    assert stack_depth(frames, calls, "mpq_fully_connected") \
        > stack_depth(frames, direct, "mpq_fully_connected")
    unknown = {"top": {INDIRECT_CALL}}
    with pytest.raises(MpqError, match="indirect call"):
        stack_depth({"top": 8}, unknown, "top")
