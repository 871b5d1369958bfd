"""The kernels' scratch planned inside the arena (issue 16: TFLM plans its scratch buffers with
the lifetime of one op): one arena buffer per layer that needs scratch, alive at its step only,
recorded in the plan (`schedule.scratch`), recomputed by the plan check, handed to each kernel
as `arena + offset` by the export; byte-exact on the host and qemu-m4, the measured SRAM the
predicted, tampering refused, and plans with the separate scratch (every plan before) still
valid."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import run_mpq, shared_model
from onnx_builders import _Builder, _input
from test_overlap import _overlap_model

from mpq.errors import MpqError
from mpq.frontend.onnx_import import import_model, import_onnx
from mpq.memory import SCRATCH_PREFIX, kernel_scratch_bytes
from mpq.order import apply_order, best_order
from mpq.patch import plan_patches
from mpq.plan import load_plan_with_model

FASHION = Path(__file__).resolve().parents[1] / "examples" / "fashion"
needs_arm = pytest.mark.skipif(shutil.which("arm-none-eabi-gcc") is None
                               or shutil.which("qemu-system-arm") is None,
                               reason="needs arm-none-eabi-gcc and qemu-system-arm")


# -- the planner -------------------------------------------------------------------------------

@pytest.mark.parametrize("onnx_name,separate,arena", [
    ("vww_96_float.onnx", 39_748, 39_664),       # 37,248 + 2,500 (in-place depthwise, step 1)
    ("pretrainedResnet.onnx", 35_072, 33_056),   # 32,768 + 2,304 (step 10's conv)
    ("kws_ref_model_fp32.onnx", 8_701, 8_384),
])
def test_scratch_in_the_arena_lowers_the_int8_peak(onnx_name, separate, arena) -> None:
    """The int8 layer-based peak as `mpq search` plans it (memory-aware order, overlap, input
    and outputs in the arena): with each layer's scratch an arena buffer of its own step, the
    peak is the arena alone and lower than arena + one separate largest scratch."""
    graph = import_onnx(shared_model(onnx_name))
    graph = apply_order(graph, best_order(graph).order)
    sep = plan_patches(graph, None, "arena", True, "separate").memory()
    inside = plan_patches(graph, None, "arena", True, "arena").memory()
    assert sep.peak_sram_bytes == separate and sep.scratch_bytes > 0
    assert inside.scratch_bytes == 0 and inside.peak_sram_bytes == inside.arena_bytes == arena


def test_each_scratch_lives_at_its_step_only() -> None:
    """ResNet-8: every conv with scratch has one buffer of the export's size
    (`kernel_scratch_bytes`, aligned), alive at its own step — a conv fused with the residual
    add after it at the add's step too (one kernel call spans both)."""
    graph = import_onnx(shared_model("pretrainedResnet.onnx"))
    sched = plan_patches(graph, None, "arena", False, "arena")
    mem = sched.memory()
    fused = {conv for conv, _ in sched.fused_adds.values()}
    step = {n.name: i for i, n in enumerate(graph.nodes)}
    by_name = {n.name: n for n in graph.nodes}
    slots = [b for b in mem.plan.buffers if b.name.startswith(SCRATCH_PREFIX)]
    assert slots and fused
    for b in slots:
        node = by_name[b.name[len(SCRATCH_PREFIX):]]
        (seg,) = b.segments
        i = step[node.name]
        assert (seg.first, seg.last) == (i, i + 1 if node.name in fused else i)
        need = kernel_scratch_bytes(node, graph, node.name in mem.inplace)
        assert need > 0 and seg.size == -(-need // 16) * 16
    convs = {n.name for n in graph.nodes if n.op == "conv2d"
             and kernel_scratch_bytes(n, graph, n.name in mem.inplace)}
    assert {b.name[len(SCRATCH_PREFIX):] for b in slots} == convs


# -- searched plans ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def searched(tmp_path_factory, kws) -> dict[str, tuple[Path, Path]]:
    """name → (plan, test data). The overlap test model: int8 (default: scratch in the arena),
    the same with `--scratch separate` (the form of every plan before `schedule.scratch`) and
    a tight one (4-bit maps and weights: c3 on the packed sub-byte kernel; the caller's I/O
    buffers); ResNet-8 at int8 (fused residual adds) and KWS at int8 (in-place depthwise)."""
    root = tmp_path_factory.mktemp("scratch_arena")
    onnx.save(_overlap_model(), root / "ov.onnx")
    rng = np.random.default_rng(0)
    np.savez(root / "calib.npz", x=rng.standard_normal((32, 3, 16, 16)).astype(np.float32))
    np.savez(root / "test.npz", x=rng.standard_normal((4, 3, 16, 16)).astype(np.float32))
    np.savez(root / "rcalib.npz", x=rng.uniform(0, 1, (8, 32, 32, 3)).astype(np.float32))
    np.savez(root / "rtest.npz", x=rng.uniform(0, 1, (2, 32, 32, 3)).astype(np.float32))
    out = {}
    for name, model, calib, test, opts in (
            ("int8", "ov.onnx", "calib.npz", "test.npz", ["--strategy", "int8"]),
            ("separate", "ov.onnx", "calib.npz", "test.npz",
             ["--strategy", "int8", "--scratch", "separate"]),
            ("tight", "ov.onnx", "calib.npz", "test.npz",
             ["--strategy", "exact", "--sram", "5600", "--io", "external", "--weights",
              "linear:4"]),
            ("resnet", shared_model("pretrainedResnet.onnx"), "rcalib.npz", "rtest.npz",
             ["--strategy", "int8"]),
            ("kws", kws["model"], kws["calib"], kws["test"], ["--strategy", "int8"]),
            # patch stages: KWS's whole network to its global pool in rows (conv im2col and
            # depthwise calls in the stage), the Fashion example's 3×3 grid with VDPC
            # (in-place depthwise in the stage, both branches)
            ("kws_patch", kws["model"], kws["calib"], kws["test"],
             ["--strategy", "int8", "--patches", "k=10,n=25,m=1"]),
            ("kws_patch_separate", kws["model"], kws["calib"], kws["test"],
             ["--strategy", "int8", "--patches", "k=10,n=25,m=1", "--scratch", "separate"]),
            ("fashion_patch", FASHION / "fashion_cnn.onnx", FASHION / "calib.npz",
             FASHION / "test.npz", ["--strategy", "exact", "--sram", "14000"])):
        plan = root / f"{name}.plan.json"
        patches = [] if "--patches" in opts or "patch" in name else ["--patches", "none"]
        r = run_mpq("search", model, "--board", "nano33ble", *patches,
                    "--data", calib, *opts, "-o", plan, "-q", cwd=root)
        assert r.returncode == 0, r.stderr
        out[name] = (plan, root / test)
    return out


@pytest.fixture(scope="module")
def plans(searched) -> dict[str, Path]:
    return {name: plan for name, (plan, _) in searched.items()}


def _verify(searched, name: str, target: str, samples: int) -> dict:
    plan, test = searched[name]
    r = run_mpq("verify", plan, "--data", test, "--target", target,
                "--samples", str(samples), "--json")
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def test_plans_record_the_slots_and_peak_is_the_arena(plans) -> None:
    """Default plans record each layer's slot (`schedule.scratch`), predict no separate scratch
    and a peak equal to the arena, below the `--scratch separate` plan's arena + scratch; the
    tight plan's packed sub-byte conv gets a slot of the packed kernel's size."""
    p = {k: json.loads(v.read_text()) for k, v in plans.items()}
    for name in ("int8", "tight", "resnet", "kws"):
        rec = p[name]["schedule"]["scratch"]
        assert rec["mode"] == "arena" and rec["steps"], name
        assert p[name]["predicted"]["scratch_bytes"] == 0
        assert p[name]["predicted"]["peak_sram_bytes"] == p[name]["predicted"]["arena_bytes"]
    assert "scratch" not in p["separate"]["schedule"]
    sep = p["separate"]["predicted"]
    assert sep["scratch_bytes"] > 0
    assert p["int8"]["predicted"]["peak_sram_bytes"] < sep["arena_bytes"] + sep["scratch_bytes"]
    # c3 (3×3×16 at 4-bit input): the slot covers the packed kernel's 32·⌈144/16⌉ = 288 B
    bits = {t["name"]: t["bits"] for t in p["tight"]["tensors"]}
    assert bits["mp_output_0"] == 4
    assert p["tight"]["schedule"]["scratch"]["steps"]["c3"]["bytes"] == 288


def test_export_hands_each_kernel_its_arena_slot(plans) -> None:
    """The generated code passes `mpq_arena + offset` of the plan's slot to each kernel that
    needs scratch, NULL to the others, and declares no separate scratch array; the
    `--scratch separate` plan keeps the array."""
    from mpq.codegen.export import render_export

    plan, _, graph = load_plan_with_model(plans["int8"])
    code = render_export(plan, graph, "portable")["mpq_model.c"]
    for slot in plan.schedule["scratch"]["steps"].values():
        assert f"(void *)(mpq_arena + {slot['offset']})" in code
    assert "mpq_scratch" not in code and "static int16_t" not in code
    plan, _, graph = load_plan_with_model(plans["separate"])
    code = render_export(plan, graph, "portable")["mpq_model.c"]
    assert "static int16_t mpq_scratch[" in code and "mpq_arena + " in code


def test_patch_stages_keep_their_scratch_in_the_arena(plans) -> None:
    """A patch plan plans its stage's kernel scratch in the arena too (each stage node's slot
    the largest over the patches, alive at its step of every patch): the record lists the
    stage's convolutions, no separate scratch is predicted, and KWS's pooled stage needs
    less SRAM than with `--scratch separate` (its first conv's slot is one im2col column,
    80 B, where the separate buffer holds two, 160 B); the export hands every stage call its
    slot and declares no scratch array. With VDPC both branches' calls take the same slot."""
    from mpq.codegen.export import render_export

    for name in ("kws_patch", "fashion_patch"):
        p = json.loads(plans[name].read_text())
        stage = p["patch"]["stage_nodes"]
        steps = p["schedule"]["scratch"]["steps"]
        assert stage[0] in steps and any(n in steps for n in stage[1:]), name
        assert p["predicted"]["scratch_bytes"] == 0
        assert p["predicted"]["peak_sram_bytes"] == p["predicted"]["arena_bytes"]
        plan, _, graph = load_plan_with_model(plans[name])
        code = render_export(plan, graph, "portable")["mpq_model.c"]
        for node in stage:
            if node in steps:
                assert f"(void *)(mpq_arena + {steps[node]['offset']})" in code, node
        assert "mpq_scratch" not in code and "static int16_t" not in code
    assert json.loads(plans["fashion_patch"].read_text())["patch"]["vdpc"] is not None
    mine = json.loads(plans["kws_patch"].read_text())["predicted"]
    sep = json.loads(plans["kws_patch_separate"].read_text())["predicted"]
    assert "scratch" not in json.loads(plans["kws_patch_separate"].read_text())["schedule"]
    assert sep["scratch_bytes"] == 160
    assert mine["peak_sram_bytes"] <= sep["peak_sram_bytes"] - 80


@pytest.mark.parametrize("name", ["int8", "separate", "tight", "kws", "kws_patch",
                                  "fashion_patch"])
def test_plans_are_byte_exact_on_the_host(searched, name) -> None:
    result = _verify(searched, name, "host", 2)
    assert result["mismatches"] == 0 and result["samples"] == 2


@needs_arm
@pytest.mark.parametrize("name", ["int8", "tight", "resnet", "kws_patch"])
def test_plans_are_byte_exact_on_qemu_m4_with_the_predicted_sram(searched, plans,
                                                                 name) -> None:
    """Every output byte is the integer reference's, and the model's measured `.data`/`.bss`
    (the arena, no scratch array) is the plan's predicted peak."""
    result = _verify(searched, name, "qemu-m4", 1)
    assert result["mismatches"] == 0 and result["samples"] == 1
    p = json.loads(plans[name].read_text())["predicted"]
    assert result["model_sram_bytes"] == p["peak_sram_bytes"] == p["arena_bytes"]


def test_cmsis_nn_backend_keeps_its_own_scratch(plans) -> None:
    """With `--backend cmsis-nn` the CMSIS-NN calls get the separate array sized by their own
    getters' mirrors, the portable calls keep their arena slots."""
    from mpq.codegen.export import render_export

    plan, _, graph = load_plan_with_model(plans["int8"])
    files = render_export(plan, graph, "cmsis-nn")
    report = json.loads(files["mpq_report.json"])
    assert any(x["backend"] == "cmsis-nn" for x in report["layers"])
    assert report["predicted"]["scratch_bytes"] >= report["predicted"]["cmsis_nn_scratch_bytes"]
    assert "static int16_t mpq_scratch[" in files["mpq_model.c"]
    portable = {x["name"] for x in report["layers"] if x["backend"] == "portable"}
    steps = plan.schedule["scratch"]["steps"]
    for name in portable & set(steps):
        assert f"(void *)(mpq_arena + {steps[name]['offset']})" in files["mpq_model.c"]


# -- tampering ---------------------------------------------------------------------------------

def _refused(plans, tmp_path: Path, edit, cli: bool = False) -> str:
    data = json.loads(plans["int8"].read_text())
    edit(data)
    # beside the plan: it finds its model there
    path = plans["int8"].parent / f"tampered-{len(list(tmp_path.iterdir()))}.plan.json"
    (tmp_path / path.name).write_text("")  # counts the edits made so far
    path.write_text(json.dumps(data))
    if not cli:
        with pytest.raises(MpqError) as exc:
            load_plan_with_model(path)
        return str(exc.value)
    r = run_mpq("export", path, "-o", tmp_path / "out")
    assert r.returncode == 1 and not (tmp_path / "out").exists()
    assert r.stderr.startswith("error: ") and len(r.stderr.splitlines()) == 1
    return r.stderr


def test_plan_check_refuses_tampered_scratch(plans, tmp_path: Path) -> None:
    """A slot moved onto a live tensor, shrunk, moved off alignment or past the arena, a slot
    missing or added, an unknown mode: one clear error each (the CLI: one line, exit 1, nothing
    written)."""
    data = json.loads(plans["int8"].read_text())
    c1 = data["schedule"]["scratch"]["steps"]["c1"]
    x_off = next(t["offset"] for t in data["tensors"] if t["name"] == "x")

    def steps(d):
        return d["schedule"]["scratch"]["steps"]

    err = _refused(plans, tmp_path, lambda d: steps(d)["c1"].update(offset=x_off), cli=True)
    assert "schedule.scratch.steps.c1.offset" in err and "overlaps" in err
    err = _refused(plans, tmp_path, lambda d: steps(d)["c1"].update(bytes=c1["bytes"] - 16))
    assert "schedule.scratch.steps.c1.bytes: must be" in err
    err = _refused(plans, tmp_path, lambda d: steps(d)["c1"].update(offset=c1["offset"] + 8))
    assert "must be a multiple of 16" in err
    err = _refused(plans, tmp_path, lambda d: steps(d)["c1"].update(
        offset=d["predicted"]["arena_bytes"]))
    assert "ends past predicted.arena_bytes" in err
    err = _refused(plans, tmp_path, lambda d: steps(d).pop("c1"))
    assert "schedule.scratch.steps: must list" in err
    err = _refused(plans, tmp_path, lambda d: steps(d).update(pw2={"offset": 0, "bytes": 16}))
    assert "schedule.scratch.steps: must list" in err
    err = _refused(plans, tmp_path, lambda d: d["schedule"]["scratch"].update(mode="flash"))
    assert "schedule.scratch.mode" in err
    # without the record the plan's arena (and its tensors) no longer check out
    err = _refused(plans, tmp_path, lambda d: d["schedule"].pop("scratch"))
    assert "predicted." in err


def test_old_plans_without_the_record_stay_valid(plans, tmp_path: Path) -> None:
    """A plan with the separate scratch (no `schedule.scratch`: every plan written before it)
    loads, checks and exports as before: the kernels share the one scratch array."""
    plan, _, graph = load_plan_with_model(plans["separate"])
    assert "scratch" not in plan.schedule
    r = run_mpq("export", plans["separate"], "-o", tmp_path / "fw")
    assert r.returncode == 0, r.stderr
    report = json.loads((tmp_path / "fw" / "mpq_report.json").read_text())
    assert report["predicted"]["scratch_bytes"] > 0


# -- slots grown for mpq_conv2d_unpacked (issue 15: W4A4 plans faster than int8) ---------------

def _wide_model(seed: int = 0) -> onnx.ModelProto:
    """conv 3×3 3→32 → relu → maxpool → conv 3×3 32→16 → relu → avgpool → matmul: at all
    4 bits the first conv (8-bit input, 4-bit weights) is the one layer the packed kernels
    cannot take, and its unpacked scratch (864 decoded weights + two 27-value columns)
    raises the arena when its slot grows."""
    b = _Builder(seed)

    def conv(x, name, cout, cin):
        w = b.init(f"{name}_w", b.he((cout, cin, 3, 3)))
        return b.conv(x, w, b.init(f"{name}_b", b.small(cout)), name, 3, 1, (1, 1, 1, 1))
    x = b.node("Relu", [conv("x", "c1", 32, 3)], "r1")
    x = b.node("MaxPool", [x], "mp", kernel_shape=[2, 2], strides=[2, 2])
    x = b.node("Relu", [conv(x, "c2", 16, 32)], "r2")
    x = b.node("AveragePool", [x], "ap", kernel_shape=[8, 8], strides=[8, 8])
    x = b.node("Flatten", [x], "fl")
    b.node("MatMul", [x, b.init("wf", b.he((10, 16), gain=1.0).T.copy())], "fc",
           outputs=["y"])
    return b.model("wide", [_input("x", [1, 3, 16, 16])], ["y"])


#: every map and weight at 4 bits, layer-based (`benchmarks/firmware_bench.py` W4A4), first
#: without overlap (c1 is otherwise written above its input, row by row)
W4A4 = ["--strategy", "qe", "--bits", "4", "--weights", "linear:4", "--patches", "none",
        "--no-overlap"]


@pytest.fixture(scope="module")
def w4a4(tmp_path_factory) -> dict[str, Path]:
    """name → plan of the wide model at W4A4 without overlap: "room" on the board's SRAM
    budget, "tight" one byte below the SRAM the roomy plan needs (its bits fit, its grown slot
    does not); "overlap" and "overlap_tight" the same with overlap."""
    root = tmp_path_factory.mktemp("unpacked_slots")
    onnx.save(_wide_model(), root / "wide.onnx")
    rng = np.random.default_rng(0)
    np.savez(root / "calib.npz", x=rng.standard_normal((16, 3, 16, 16)).astype(np.float32))
    np.savez(root / "test.npz", x=rng.standard_normal((2, 3, 16, 16)).astype(np.float32))
    out = {"test": root / "test.npz"}
    roomy = {"tight": "room", "overlap_tight": "overlap"}  # tight plan -> its roomy one
    for name in ("room", "tight", "overlap", "overlap_tight"):
        opts = W4A4 if name in ("room", "tight") else W4A4[:-1]  # with --overlap (default)
        extra = [] if name not in roomy else [
            "--sram", str(json.loads(out[roomy[name]].read_text())["predicted"]
                          ["sram_needed_bytes"] - 1)]
        out[name] = root / f"{name}.plan.json"
        r = run_mpq("search", "wide.onnx", "--board", "nano33ble", "--data", "calib.npz",
                    *opts, *extra, "-o", out[name], "-q", cwd=root)
        assert r.returncode == 0, r.stderr
    return out


def _c1_need() -> int:
    """mpq_conv2d_unpacked's scratch for c1 at 8-bit input and 4-bit linear weights."""
    from mpq.codegen.packed import unpacked_scratch

    graph = import_model(_wide_model())
    c1 = next(n for n in graph.nodes if n.name == "c1")
    shapes = [graph.tensors[t].shape for t in (c1.inputs[0], c1.outputs[0])]
    return unpacked_scratch(c1, *shapes, 8, 4, True)


def test_w4a4_plan_grows_the_first_conv_slot_within_the_budget(w4a4) -> None:
    """With room, c1's slot holds the unpacked kernel's scratch (recorded in
    `schedule.scratch.unpacked`) and the export runs it through mpq_conv2d_unpacked; one
    byte less SRAM and the slot keeps its int8 size, c1 keeps mpq_conv2d, and the plan still
    meets its budget. Either plan's predicted code counts the kernels its export picks."""
    from mpq.budget import packed_padding_bytes
    from mpq.codegen.export import render_export
    from mpq.memory import code_bytes_estimate

    need = _c1_need()
    assert need == 32 * 27 + 2 * 27
    room, tight = (json.loads(w4a4[k].read_text()) for k in ("room", "tight"))
    for p in (room, tight):
        assert p["predicted"]["sram_needed_bytes"] <= p["board"]["sram_budget"]
    assert room["schedule"]["scratch"]["unpacked"] == ["c1"]
    assert room["schedule"]["scratch"]["steps"]["c1"]["bytes"] == -(-need // 16) * 16
    assert any("mpq_conv2d_unpacked's scratch" in n for n in room["notes"])
    assert "unpacked" not in tight["schedule"]["scratch"]
    assert tight["schedule"]["scratch"]["steps"]["c1"]["bytes"] < need
    assert tight["predicted"]["arena_bytes"] < room["predicted"]["arena_bytes"]
    assert tight["board"]["sram_budget"] == room["predicted"]["sram_needed_bytes"] - 1
    calls = {}
    for name, p in (("room", room), ("tight", tight)):
        plan, _, graph = load_plan_with_model(w4a4[name])
        layers = json.loads(render_export(plan, graph, "portable")["mpq_report.json"])["layers"]
        calls[name] = next(x for x in layers if x["name"] == "c1")
        # the predicted code is that of the kernels this export calls
        # the packed kernels' layers and those on the channel-group entry points
        packed = frozenset(x["name"] for x in layers if x.get("packed", {}).get("used")
                           or x.get("channel_groups", {}).get("used"))
        unpacked = frozenset(x["name"] for x in layers if x.get("unpacked", {}).get("used"))
        assert p["predicted"]["code_bytes_estimate"] == code_bytes_estimate(
            graph, "cortex-m4/fpv4-sp-d16", None, packed, unpacked=unpacked,
            unpacked_exact=True) + packed_padding_bytes(graph, packed, lambda n: 4)
    assert calls["room"]["call"] == "mpq_conv2d_unpacked"
    assert calls["room"]["unpacked"] == {"used": True}
    assert calls["tight"]["call"] == "mpq_conv2d" and not calls["tight"]["unpacked"]["used"]
    assert "more than the plan's" in calls["tight"]["unpacked"]["reason"]


def test_a_reversed_layer_gives_up_its_overlap_for_the_unpacked_kernel(w4a4) -> None:
    """With overlap, c1 is written above its input row by row (one kernel call per row, the
    weights decoded at each); with room its reverse overlap is dropped and its slot grown (one
    call of mpq_conv2d_unpacked); one byte below that SRAM it keeps both its overlap and its
    int8 slot."""
    room, tight = (json.loads(w4a4[k].read_text()) for k in ("overlap", "overlap_tight"))
    assert room["schedule"]["scratch"]["unpacked"] == ["c1"]
    assert room["schedule"].get("overlap", {}).get("c1", 0) >= 0
    assert "unpacked" not in tight["schedule"]["scratch"]
    assert tight["schedule"]["overlap"]["c1"] < 0
    assert tight["predicted"]["sram_needed_bytes"] <= tight["board"]["sram_budget"] \
        < room["predicted"]["sram_needed_bytes"]


@pytest.mark.parametrize("name", ["room", "tight", "overlap", "overlap_tight"])
def test_w4a4_plans_are_byte_exact_on_the_host(w4a4, name) -> None:
    r = run_mpq("verify", w4a4[name], "--data", w4a4["test"], "--target", "host",
                "--samples", "2", "--json")
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout)
    assert result["mismatches"] == 0 and result["samples"] == 2


@needs_arm
def test_w4a4_grown_slot_is_byte_exact_faster_and_measured_on_qemu_m4(w4a4) -> None:
    """On qemu-m4 both plans match the integer reference byte for byte, the model's measured
    `.data`/`.bss` is each plan's predicted arena, and the grown slot's plan (c1 on
    mpq_conv2d_unpacked) runs fewer instructions than the tight one."""
    results = {}
    for name in ("room", "tight"):
        r = run_mpq("verify", w4a4[name], "--data", w4a4["test"], "--target", "qemu-m4",
                    "--samples", "1", "--json")
        assert r.returncode == 0, r.stderr
        results[name] = json.loads(r.stdout)
        p = json.loads(w4a4[name].read_text())["predicted"]
        assert results[name]["mismatches"] == 0
        assert results[name]["model_sram_bytes"] == p["peak_sram_bytes"] == p["arena_bytes"]
    assert results["room"]["instructions"] < results["tight"]["instructions"]


def test_plan_check_refuses_a_tampered_grown_slot(w4a4, tmp_path: Path) -> None:
    """The grown slot's bytes shrunk or grown, its offset moved onto a live tensor or off
    alignment, the record of which slots grew dropped or naming a layer the unpacked kernel
    does not run: one clear error each."""
    def refused(edit) -> str:
        data = json.loads(w4a4["room"].read_text())
        edit(data["schedule"]["scratch"], data)
        path = w4a4["room"].parent / f"tampered-{len(list(tmp_path.iterdir()))}.plan.json"
        (tmp_path / path.name).write_text("")
        path.write_text(json.dumps(data))
        with pytest.raises(MpqError) as exc:
            load_plan_with_model(path)
        return str(exc.value)

    load_plan_with_model(w4a4["room"])  # untouched, it checks
    slot = json.loads(w4a4["room"].read_text())["schedule"]["scratch"]["steps"]["c1"]
    for delta in (-16, 16):
        err = refused(lambda s, d, k=delta: s["steps"]["c1"].update(bytes=slot["bytes"] + k))
        assert "schedule.scratch.steps.c1.bytes: must be" in err
    err = refused(lambda s, d: s.pop("unpacked"))
    assert "schedule.scratch.steps.c1.bytes: must be" in err
    out_off = next(t["offset"] for t in json.loads(w4a4["room"].read_text())["tensors"]
                   if t["name"] == "r1_output_0")  # c1's output (its relu fused), alive then
    err = refused(lambda s, d: s["steps"]["c1"].update(offset=out_off))
    assert "schedule.scratch.steps.c1.offset" in err and "overlaps" in err
    err = refused(lambda s, d: s["steps"]["c1"].update(offset=slot["offset"] + 16))
    assert "schedule.scratch.steps.c1" in err
    err = refused(lambda s, d: s.update(unpacked=["c1", "c2"]))
    assert "schedule.scratch.unpacked[1]" in err and "mpq_conv2d_unpacked" in err
    err = refused(lambda s, d: s.update(unpacked=["c1", "c1"]))
    assert "schedule.scratch.unpacked: must be sorted" in err


def test_grow_scratch_takes_the_layer_of_most_macs_first() -> None:
    """`memory.grow_scratch`: when only one slot may grow (here the `accept` test allows one),
    the layer of more MACs (c2, 8·8·16·288, against c1's 16·16·32·27) gets it; with room for
    both, both; with an arena limit at the ungrown arena, none; a need the slot already holds
    is no growth."""
    from mpq.memory import grow_scratch

    graph = import_model(_wide_model())
    sched = plan_patches(graph, None, "arena", False, "arena")
    bits = {t: 4 for t in graph.tensors} | {"x": 8}
    buffers, inplace, _ = sched._buffers(bits, True)

    def arena(grown):
        return sched.memory(bits, grown=grown).arena_bytes

    needs = {"c1": 4096, "c2": 4096}
    base = arena({})
    assert base < min(arena({"c1": 4096}), arena({"c2": 4096}))

    def grow(limit, accept=None, want=needs):
        return grow_scratch(graph, buffers, inplace, sched.fused_adds, bits, want, limit,
                            accept)

    assert grow(1 << 20, lambda grown, size: len(grown) == 1) == {"c2": 4096}
    assert grow(1 << 20, lambda grown, size: "c2" not in grown) == {"c1": 4096}
    assert grow(arena(needs)) == needs
    assert grow(base) == {}
    assert grow(1 << 20, want={"c2": 16}) == {}  # c2's int8 slot already holds 16 B


def test_stack_bound_counts_the_sub_byte_kernels_frames(monkeypatch) -> None:
    """`budget.predicted_stack_bytes` bounds every kernel a conv may take: with a table where
    mpq_conv2d_unpacked's frame is the deepest, a model of one regular conv counts it."""
    from mpq import budget

    graph = import_model(_wide_model())
    families = {"conv2d": 100, "conv2d_unpacked": 900, "packed_conv2d": 300, "maxpool": 10,
                "avgpool": 10, "fully_connected": 50, "packed_fully_connected": 60}
    monkeypatch.setattr(budget, "_cpu_entry",
                        lambda cpu: {"stack": {"run": 7, "families": families}})
    assert budget.predicted_stack_bytes(graph) == 7 + 900
    families["conv2d_unpacked"] = 1
    assert budget.predicted_stack_bytes(graph) == 7 + 300


def _shared_input_model() -> onnx.ModelProto:
    """A 1×1 conv whose output two stage nodes read: a dilated 3×3 conv (reads two rows and
    columns past the patch) and an in-place depthwise (one), summed. The depthwise's input
    view runs to the end of the stored tile, past its own reads."""
    b = _Builder(0)
    t = b.conv("input", b.init("c0.w", b.he((8, 4, 1, 1))), b.init("c0.b", b.small(8)),
               "/c0/Conv", 1)
    t = b.node("Relu", [t], "/r0/Relu")
    a = b.conv(t, b.init("cd.w", b.he((8, 8, 3, 3))), b.init("cd.b", b.small(8)), "/cd/Conv",
               3, 1, (2, 2, 2, 2), dilation=2)
    d = b.conv(t, b.init("dw.w", b.he((8, 1, 3, 3))), b.init("dw.b", b.small(8)), "/dw/Conv",
               3, 1, (1, 1, 1, 1), group=8)
    s = b.node("Add", [a, d], "/add/Add")
    x = b.conv(s, b.init("c2.w", b.he((8, 8, 3, 3))), b.init("c2.b", b.small(8)), "/c2/Conv",
               3, 2, (1, 1, 1, 1))
    x = b.node("Relu", [x], "/r2/Relu")
    b.conv(x, b.init("c3.w", b.he((16, 8, 3, 3))), b.init("c3.b", b.small(16)), "/c3/Conv", 3,
           2, (1, 1, 1, 1), output="output")
    return b.model("g", [_input("input", [1, 4, 32, 32])], ["output"])


def test_a_stage_depthwise_slot_holds_its_whole_input_view(tmp_path: Path) -> None:
    """The in-place depthwise saves its input *view* (the stored tile from its offset on), not
    only the rows it reads: a slot sized from its reads was 9 B short here and the export
    refused the plan. Planned from the view, the plan exports and runs byte-exact."""
    onnx.save(_shared_input_model(), tmp_path / "g.onnx")
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "c.npz", x=rng.standard_normal((16, 4, 32, 32)).astype(np.float32))
    plan = tmp_path / "g.plan.json"
    r = run_mpq("search", "g.onnx", "--board", "nano33ble", "--strategy", "qe", "--order",
                "file", "--patches", "k=4,n=4", "--data", "c.npz", "-o", plan, "-q",
                cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    p = json.loads(plan.read_text())
    assert "/dw/Conv" in p["patch"]["stage_nodes"] and "/dw/Conv" in p["schedule"]["scratch"][
        "steps"]
    r = run_mpq("verify", plan, "--data", tmp_path / "c.npz", "--samples", "2", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["mismatches"] == 0
