"""Tampered plans are refused on load (issue 12): one line naming the field, exit 1, nothing
written — whether the field is malformed (`mpq.plan_schema`) or does not fit the model
(`mpq.plan_check`). The security review's classes: offsets past the arena or overlapping
live tensors, bitwidths the kernels lack, bad scales and zero points, a non-positive arena, a
changed patch grid or `patch: null`, tensors and layers removed, renamed or added, a model
path with a directory, unknown keys, wrong types."""

from __future__ import annotations

import copy
import json
import math
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import REPO, run_mpq
from test_bad_input import assert_clean_failure

from mpq.cli import main
from mpq.errors import MpqError

FASHION = REPO / "examples" / "fashion"
MODEL = "fashion_cnn.onnx"


@pytest.fixture(scope="module")
def plans(tmp_path_factory) -> dict[str, Any]:
    """The Fashion model beside two valid plans: layer-based int8 and the demo's patch plan
    (3×3 grid with VDPC, 2-bit maps, in-place depthwise and fused adds)."""
    root = tmp_path_factory.mktemp("tampered")
    shutil.copy(FASHION / MODEL, root / MODEL)
    common = ("--board", "nano33ble", "--data", FASHION / "calib.npz", "-q")
    out = {"root": root}
    # The layer plan without overlap: these mutations test the placement checks on their own
    # (tampered overlaps: tests/test_overlap.py).
    for kind, extra in (("layer", ("--strategy", "int8", "--patches", "none", "--no-overlap")),
                        ("patch", ("--sram", "14000", "--strategy", "exact"))):
        path = root / f"{kind}.plan.json"
        code, _, stderr = cli("search", root / MODEL, *common, *extra, "-o", path)
        assert code == 0, stderr
        out[kind] = json.loads(path.read_text())
    assert out["patch"]["patch"]["vdpc"] is not None
    assert out["layer"]["patch"] is None
    return out


def cli(*args: Any) -> tuple[int, str, str]:
    """The CLI in-process (the subprocess tests below cover the real entry point)."""
    r = CliRunner().invoke(main, [str(a) for a in args])
    return r.exit_code, r.stdout, r.stderr


def setter(path: str, value: Any) -> Callable[[dict], None]:
    """A mutation that sets `a.b[2].c` (dotted keys, [i] indices) to `value`."""
    def mutate(plan: dict) -> None:
        *parents, last = _parse(path)
        node = plan
        for key in parents:
            node = node[key]
        node[last] = copy.deepcopy(value)
    return mutate


def with_fidelity(path: str, value: Any) -> Callable[[dict], None]:
    """A valid `predicted.fidelity` record (as the measured search writes it) with `path`
    inside it set to `value`."""
    summary = {"top1_agreement": 0.97, "cosine": 0.98, "sqnr_db": 14.1, "exact": False}

    def mutate(plan: dict) -> None:
        plan["predicted"]["fidelity"] = {
            "samples": 64, "data": "samples of --data", "damage": 0.0143,
            "outputs": {"logits": dict(summary)}, "int8": {"logits": dict(summary)}}
        setter(f"predicted.fidelity.{path}", value)(plan)
    return mutate


def deleter(path: str) -> Callable[[dict], None]:
    def mutate(plan: dict) -> None:
        *parents, last = _parse(path)
        node = plan
        for key in parents:
            node = node[key]
        del node[last]
    return mutate


def _parse(path: str) -> list[str | int]:
    keys: list[str | int] = []
    for part in path.split("."):
        name, *idx = part.split("[")
        if name:
            keys.append(name)
        keys += [int(i.rstrip("]")) for i in idx]
    return keys


def append_copy(listname: str, index: int, name: str) -> Callable[[dict], None]:
    def mutate(plan: dict) -> None:
        item = copy.deepcopy(plan[listname][index])
        item["name"] = name
        plan[listname].append(item)
    return mutate


def both(*mutations: Callable[[dict], None]) -> Callable[[dict], None]:
    def mutate(plan: dict) -> None:
        for m in mutations:
            m(plan)
    return mutate


LAYER_ARENA = "predicted.arena_bytes"
STAGE_CONV = "/features/0/0/Conv"  # the patch plan's first stage convolution (im2col scratch)

# (id, base plan, mutation, fragment the one error line must contain). Tensor 1 of the
# layer-based plan is the first conv's output (12,544 B, not a fused conv output); tensor 2,
# the next conv's output, is alive with it at step 1.
CASES: list[tuple[str, str, Callable[[dict], None], str]] = [
    # offsets
    ("offset-arena-minus-1", "layer", lambda p: setter(
        "tensors[1].offset", p["predicted"]["arena_bytes"] - 1)(p),
     "tensors[1].offset: must be a non-negative multiple of 16"),
    ("offset-arena-minus-16", "layer", lambda p: setter(
        "tensors[1].offset", p["predicted"]["arena_bytes"] - 16)(p),
     "tensors[1].offset: 37616 + 12544 bytes ends past predicted.arena_bytes"),
    ("offset-overlaps-live-tensor", "layer", setter("tensors[1].offset", 0), "overlaps"),
    ("offset-negative", "layer", setter("tensors[1].offset", -16), "tensors[1].offset"),
    ("offset-huge", "layer", setter("tensors[1].offset", 1 << 40), "tensors[1].offset"),
    ("offset-fractional", "layer", setter("tensors[1].offset", 16.5), "tensors[1].offset"),
    ("offset-string", "layer", setter("tensors[1].offset", "16"), "tensors[1].offset"),
    ("offset-on-graph-input", "layer",
     both(setter("schedule.io", "external"), setter("tensors[0].offset", 0)),
     "tensors[0].offset: must be null for a graph input"),
    ("offset-missing-on-arena-input", "layer", setter("tensors[0].offset", None),
     "tensors[0].offset: 'input' needs an arena offset"),
    ("io-unknown", "layer", setter("schedule.io", "heap"),
     'schedule.io: must be "arena" or "external"'),
    ("io-external-with-arena-offsets", "layer", setter("schedule.io", "external"),
     "tensors[0].offset: must be null for a graph input"),
    ("offset-missing-on-arena-tensor", "layer", setter("tensors[3].offset", None),
     "tensors[3].offset: '/features/1/conv/1/2/Clip_output_0' needs an arena offset"),
    ("offset-patch-split-tensor-past-arena", "patch", setter("tensors[4].offset", 10496),
     "tensors[4].offset"),
    # bits
    *[(f"bits-{b}", "layer", setter("tensors[1].bits", b),
       "tensors[1].bits: must be one of 8, 4, 2") for b in (1, 3, 7, 16)],
    ("bits-string", "layer", setter("tensors[1].bits", "8"), "tensors[1].bits"),
    ("bits-bool", "layer", setter("tensors[1].bits", True), "tensors[1].bits"),
    ("bits-float", "layer", setter("tensors[1].bits", 8.0), "tensors[1].bits"),
    ("bits-graph-input-4", "layer", both(setter("tensors[0].bits", 4),
                                         setter("tensors[0].zero_point", 0)),
     "tensors[0].bits: 'input' must be 8-bit"),
    ("bits-without-bytes", "layer", both(setter("tensors[1].bits", 4),
                                         setter("tensors[1].zero_point", -8),
                                         setter("layers[0].a_bits_out", 4),
                                         setter("layers[1].a_bits_in", 4)),
     "tensors[1].bytes: must be 6272"),
    ("bytes-too-small", "layer", setter("tensors[2].bytes", 100), "tensors[2].bytes: must be"),
    ("w-bits-3-linear", "layer", setter("layers[0].w_bits", 3), "layers[0].w_bits"),
    ("w-bits-on-add", "layer", setter("layers[7].w_bits", 8), "layers[7].w_bits"),
    ("w-bits-4-not-in-bitops", "layer", setter("layers[0].w_bits", 4), "layers[0].bitops"),
    ("a-bits-out-disagrees", "layer", setter("layers[1].a_bits_out", 4),
     "layers[1].a_bits_out: must be the bits of its output"),
    ("w-scheme-asym", "layer", setter("layers[0].w_scheme", "asym"), "layers[0].w_scheme"),
    ("tied-bits-differ", "patch", both(setter("tensors[6].bits", 4),
                                       setter("tensors[6].zero_point", -8)),
     "tensors[6].bits: must equal the bits of"),
    ("outlier-branch-4-bit", "patch", both(setter("tensors[2].outlier_branch.bits", 4),
                                           setter("tensors[2].outlier_branch.zero_point", 0)),
     "tensors[2].outlier_branch.bits: must be 8"),
    # scale and zero point
    ("scale-zero", "layer", setter("tensors[1].scale", 0), "tensors[1].scale: must be > 0"),
    ("scale-nan", "layer", setter("tensors[1].scale", math.nan), "tensors[1].scale"),
    ("scale-inf", "layer", setter("tensors[1].scale", math.inf), "tensors[1].scale"),
    ("scale-negative", "layer", setter("tensors[1].scale", -0.5), "tensors[1].scale"),
    ("zero-point-128", "layer", setter("tensors[1].zero_point", 128),
     "tensors[1].zero_point: must be in [-128, 127], got 128"),
    ("zero-point-2bit-range", "patch", setter("tensors[5].zero_point", 2),
     "tensors[5].zero_point: must be in [-2, 1]"),
    ("zero-point-fractional", "layer", setter("tensors[1].zero_point", 0.5),
     "tensors[1].zero_point"),
    ("outlier-scale-nan", "patch", setter("tensors[1].outlier_branch.scale", math.nan),
     "tensors[1].outlier_branch.scale"),
    # arena and predictions
    ("arena-zero", "layer", setter(LAYER_ARENA, 0), LAYER_ARENA),
    ("arena-negative", "layer", setter(LAYER_ARENA, -16), LAYER_ARENA),
    ("arena-shrunk", "layer", lambda p: setter(LAYER_ARENA, p["predicted"]["arena_bytes"]
                                               - 16)(p), "ends past predicted.arena_bytes"),
    ("arena-grown", "layer", lambda p: setter(LAYER_ARENA, p["predicted"]["arena_bytes"]
                                              + 16)(p), LAYER_ARENA),
    ("macs-changed", "layer", setter("layers[0].macs", 1), "layers[0].macs: must be"),
    ("predicted-macs-changed", "patch", setter("predicted.macs", 1), "predicted.macs"),
    ("predicted-scratch-changed", "patch",
     lambda p: setter("predicted.scratch_bytes", p["predicted"]["scratch_bytes"] + 16)(p),
     "predicted.scratch_bytes"),
    # the patch stage's kernel scratch in the arena (`schedule.scratch`)
    ("stage-scratch-bytes", "patch", setter(f"schedule.scratch.steps.{STAGE_CONV}.bytes", 16),
     f"schedule.scratch.steps.{STAGE_CONV}.bytes: must be"),
    ("stage-scratch-offset", "patch", setter(f"schedule.scratch.steps.{STAGE_CONV}.offset", 0),
     f"schedule.scratch.steps.{STAGE_CONV}.offset: the scratch of"),
    ("stage-scratch-missing", "patch",
     lambda p: p["schedule"]["scratch"]["steps"].pop(STAGE_CONV), "schedule.scratch.steps:"),
    ("stage-scratch-with-line-buffers", "patch",
     setter("patch.cache", {"order": "column-major", "redundant_macs_recompute": 0,
                            "line_buffers": []}),
     "schedule.scratch: must be absent in a plan with line buffers"),
    # the measured search's record (shown only; malformed values are still refused)
    ("fidelity-samples-zero", "patch", with_fidelity("samples", 0),
     "predicted.fidelity.samples"),
    ("fidelity-agreement-above-1", "patch",
     with_fidelity("outputs.logits.top1_agreement", 1.5),
     "predicted.fidelity.outputs.logits.top1_agreement"),
    ("fidelity-sqnr-nan", "patch", with_fidelity("int8.logits.sqnr_db", math.nan),
     "predicted.fidelity.int8.logits.sqnr_db"),
    ("fidelity-unknown-key", "patch", with_fidelity("accuracy", 0.99),
     "predicted.fidelity.accuracy: unknown key"),
    # the patch schedule
    ("patch-null", "patch", setter("patch", None), "schedule.inplace_depthwise"),
    ("patch-grid-n", "patch", setter("patch.n", 2), "patch."),
    ("patch-grid-n-too-big", "patch", setter("patch.n", 20), "patch.split_layer: patch split"),
    ("patch-tiles", "patch", setter("patch.tiles[0][0][1]", 5), "patch.tiles: does not match"),
    ("patch-tiles-shape", "patch", setter("patch.tiles[1]", [[0, 4, 0, 4]]),
     "patch.tiles[1]: must have 3 entries"),
    ("patch-split-layer", "patch",
     lambda p: setter("patch.split_layer", p["patch"]["split_layer"] + 1)(p), "patch."),
    ("patch-split-layer-zero", "patch", setter("patch.split_layer", 0), "patch.split_layer"),
    ("patch-stage-nodes", "patch", setter("patch.stage_nodes[0]", "/features/1/conv/0/0/Conv"),
     "patch.stage_nodes: does not match"),
    ("patch-on-layer-plan", "layer", lambda p: setter("patch", PATCH_OF["patch"])(p),
     "schedule.inplace_depthwise"),
    ("vdpc-regions", "patch", setter("patch.vdpc.regions[0][0][1]", 27),
     "patch.vdpc.regions: do not match"),
    ("vdpc-rate-shape", "patch", setter("patch.vdpc.outlier_rate", [[0.5]]),
     "patch.vdpc.outlier_rate"),
    ("vdpc-rate-range", "patch", setter("patch.vdpc.outlier_rate[0][0]", 1.5),
     "patch.vdpc.outlier_rate[0][0]"),
    ("vdpc-map", "patch", setter("patch.vdpc.map", "/features/1/conv/0/2/Clip_output_0"),
     "patch.vdpc.map"),
    ("vdpc-thresholds-reversed", "patch", setter("patch.vdpc.hi_threshold", -300),
     "patch.vdpc.hi_threshold"),
    ("schedule-inplace", "layer", setter("schedule.inplace_depthwise", []),
     "schedule.inplace_depthwise"),
    ("schedule-fused-adds", "layer", setter("schedule.fused_adds", {}),
     "schedule.fused_adds"),
    # tensors and layers
    ("tensor-removed", "layer", deleter("tensors[5]"), "tensors: missing the model's tensor"),
    ("tensor-renamed", "layer", setter("tensors[5].name", "evil"),
     "tensors[5].name: 'evil' is not a tensor of the model"),
    ("tensor-extra", "layer", append_copy("tensors", 5, "extra"), "tensors[20].name"),
    ("tensor-duplicate", "layer", append_copy("tensors", 5,
                                              "/features/2/conv/0/2/Clip_output_0"),
     "tensors[20].name: duplicate"),
    ("layer-removed", "layer", deleter("layers[3]"), "layers: must list the model's 19 nodes"),
    ("layer-renamed", "layer", setter("layers[3].name", "evil"), "layers[3].name"),
    ("layer-extra", "layer", append_copy("layers", 3, "extra"), "layers: must list"),
    ("layer-op", "layer", setter("layers[3].op", "depthwise"), "layers[3].op"),
    # model and strings
    ("model-elsewhere", "layer", setter("model", "../fashion_cnn.onnx"),
     "model file of the plan not found"),
    ("model-dotdot", "layer", setter("model", "models/.."),
     "model: must be the model file's path relative to the plan"),
    ("model-absolute", "layer", setter("model", "/etc/passwd"),
     "model: must be the model file's path relative to the plan"),
    ("model-control-char", "layer", setter("model", "fashion\ncnn.onnx"),
     "model file of the plan not found"),
    ("name-control-char", "layer", setter("tensors[2].name", "a\x1b[2Jb"),
     "is not a tensor of the model"),
    ("sha-not-hex", "layer", setter("model_sha256", "zz"), "model_sha256"),
    ("fingerprint-changed", "layer", setter("graph_fingerprint", "0" * 64),
     "graph_fingerprint: the plan was made for a different model"),
    ("strategy-unknown", "layer", setter("strategy", "evil"), "strategy"),
    # keys and types
    ("unknown-top-key", "layer", setter("extra", 1), "extra: unknown key"),
    ("unknown-tensor-key", "layer", setter("tensors[1].extra", 1), "tensors[1].extra"),
    ("missing-tensor-key", "layer", deleter("tensors[1].scale"), "tensors[1].scale: missing"),
    ("missing-top-key", "layer", deleter("predicted"), "predicted: missing"),
    ("tensors-not-list", "layer", setter("tensors", {}), "tensors: must be a list"),
    ("tensor-not-object", "layer", setter("tensors[1]", 5), "tensors[1]: must be an object"),
    ("macs-string", "layer", setter("layers[0].macs", "12"), "layers[0].macs"),
    ("schedule-list", "layer", setter("schedule", []), "schedule: must be an object"),
    ("patch-list", "patch", setter("patch", []), "patch: must be an object"),
    ("board-string", "layer", setter("board", "nano33ble"), "board: must be an object"),
    ("board-without-name", "layer", deleter("board.name"), "board.name: missing"),
    ("search-number", "layer", setter("search", 5), "search: must be an object"),
    ("notes-string", "layer", setter("notes", "x"), "notes: must be a list"),
    ("notes-huge", "layer", setter("notes", ["x"] * 100_001), "notes: must have at most"),
    ("range8-reversed", "layer", setter("tensors[1].range8", [1.0, 0.0]),
     "tensors[1].range8[1]"),
    ("range8-null", "layer", setter("tensors[1].range8", None),
     "tensors[1].range8: must be a list"),
    ("schema-string", "layer", setter("schema", "1"), "schema: must be a positive integer"),
    # post-training quantisation (mpq.quant.ptq): AdaRound masks and bias corrections
    ("rounding-on-8-bit", "layer", both(setter("layers[0].w_scheme", "linear"),
                                        setter("layers[0].w_params", {"rounding": "AA=="})),
     "layers[0].w_params.rounding: AdaRound rounding is for 4 and 2-bit weights, not 8"),
    ("rounding-not-base64", "layer", both(setter("layers[0].w_bits", 4),
                                          setter("layers[0].w_scheme", "linear"),
                                          setter("layers[0].w_params", {"rounding": "a b!"})),
     "layers[0].w_params.rounding: must be base64 text"),
    ("rounding-short", "layer", both(setter("layers[0].w_bits", 4),
                                     setter("layers[0].w_scheme", "linear"),
                                     setter("layers[0].w_params", {"rounding": "AA=="})),
     "layers[0].w_params.rounding: rounding holds 1 bytes; the layer's"),
    ("rounding-extra-key", "layer", both(setter("layers[0].w_bits", 4),
                                         setter("layers[0].w_scheme", "linear"),
                                         setter("layers[0].w_params",
                                                {"rounding": "AA==", "x": 1})),
     "layers[0].w_params.x: unknown key"),
    ("rounding-without-scheme", "layer", setter("layers[0].w_params", {"rounding": "AA=="}),
     "layers[0].w_params: set without w_scheme"),
    ("bias-correction-short", "layer", setter("layers[0].bias_correction", [0.5]),
     "layers[0].bias_correction: must have"),
    ("bias-correction-nan", "layer", setter("layers[0].bias_correction", [math.nan]),
     "layers[0].bias_correction[0]: must be finite"),
    ("bias-correction-string", "layer", setter("layers[0].bias_correction", ["0.5"]),
     "layers[0].bias_correction[0]: must be a number"),
    ("bias-correction-object", "layer", setter("layers[0].bias_correction", {"a": 1}),
     "layers[0].bias_correction: must be a list"),
    ("bias-correction-on-add", "layer", setter("layers[7].bias_correction", [0.0]),
     "layers[7].bias_correction: set on a layer without weights"),
]

PATCH_OF: dict[str, Any] = {}  # `patch-on-layer-plan` grafts the patch plan's `patch`


def write_tampered(plans: dict[str, Any], kind: str,
                   mutate: Callable[[dict], None], name: str = "bad.plan.json") -> Path:
    PATCH_OF["patch"] = plans["patch"]["patch"]
    plan = copy.deepcopy(plans[kind])
    mutate(plan)
    path = plans["root"] / name
    path.write_text(json.dumps(plan, indent=2, sort_keys=True))
    return path


@pytest.mark.parametrize("kind,mutate,fragment",
                         [pytest.param(k, m, f, id=i) for i, k, m, f in CASES])
def test_tampered_plan_refused_by_export(plans, tmp_path: Path, kind: str,
                                         mutate: Callable[[dict], None], fragment: str) -> None:
    plan = write_tampered(plans, kind, mutate)
    out = tmp_path / "firmware"
    code, stdout, stderr = cli("export", plan, "-o", out)
    lines = stderr.strip().splitlines()
    assert code == 1, stderr
    assert len(lines) == 1 and stdout == "", stderr
    assert lines[0].startswith(f"error: {plan}: "), lines[0]
    assert fragment in lines[0], lines[0]
    assert "Traceback" not in stderr and "internal error" not in stderr
    assert not out.exists()


def test_valid_plans_still_export(plans, tmp_path: Path) -> None:
    """The untampered base plans pass both checks (a check that rejects them is wrong)."""
    for kind in ("layer", "patch"):
        plan = write_tampered(plans, kind, lambda p: None, f"{kind}.ok.json")
        code, _, stderr = cli("export", plan, "-o", tmp_path / kind)
        assert code == 0, stderr
        assert (tmp_path / kind / "mpq_model.c").is_file()


EVERY_COMMAND = {"export": ("-o", "OUT"), "eval": ("--data", FASHION / "test.npz"),
                 "report": ("-o", "OUT"), "verify": ("--data", FASHION / "test.npz"),
                 "run": ("--input", "X", "-o", "OUT")}


@pytest.mark.parametrize("command", sorted(EVERY_COMMAND))
def test_every_command_checks_the_plan(plans, tmp_path: Path, command: str) -> None:
    """Every command that uses a plan with its model refuses a plan whose offsets put two live
    tensors at one address (each field well-formed: only the model check sees it)."""
    plan = write_tampered(plans, "layer", setter("tensors[1].offset", 0), "overlap.plan.json")
    out = tmp_path / "out"
    x = tmp_path / "x.npy"
    np.save(x, np.load(FASHION / "test.npz")["x"][:2])
    args = [{"OUT": out, "X": x}.get(a, a) if isinstance(a, str) else a
            for a in EVERY_COMMAND[command]]
    code, stdout, stderr = cli(command, plan, *args)
    assert code == 1 and stdout == "" and stderr.count("\n") == 1, stderr
    assert "overlap.plan.json: tensors[" in stderr and "overlaps" in stderr, stderr
    assert not out.exists()


def test_real_cli_refuses_a_tampered_plan(plans, tmp_path: Path) -> None:
    """The installed entry point (a subprocess, as a Makefile runs it): one line, exit 1."""
    plan = write_tampered(plans, "patch", setter("patch.tiles[1][1][0]", 3), "tiles.plan.json")
    out = tmp_path / "firmware"
    assert_clean_failure(run_mpq("export", plan, "-o", out),
                         "tiles.plan.json: patch.tiles: does not match")
    assert not out.exists()


def test_library_paths_check_the_plan(plans) -> None:
    """`plan_quant_model` (export, verify and eval's library entry) refuses a tampered plan
    even when the caller skipped `load_plan_with_model`."""
    from mpq.frontend import load_model
    from mpq.plan import load_plan, plan_quant_model

    ok = write_tampered(plans, "layer", lambda p: None, "lib.ok.json")
    plan = load_plan(ok)
    graph = load_model(plans["root"] / MODEL)
    plan_quant_model(plan, graph)
    plan.tensors[1].offset = plan.predicted["arena_bytes"] - 16
    with pytest.raises(MpqError, match=r"^plan: tensors\[1\]\.offset: .* ends past"):
        plan_quant_model(plan, graph)


def test_not_json_and_huge_numbers(plans, tmp_path: Path) -> None:
    """Text that is not JSON, or numbers Python's JSON reader refuses, are one line too."""
    for i, text in enumerate(["{", "[" * 100_000, '{"schema": 1, "model_sha256": ' +
                              "9" * 5000 + "}"]):
        path = tmp_path / f"p{i}.json"
        path.write_text(text)
        code, _, stderr = cli("export", path, "-o", tmp_path / "out")
        assert code == 1 and stderr.count("\n") == 1 and "not a plan" in stderr, stderr
        assert not (tmp_path / "out").exists()
