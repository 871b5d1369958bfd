"""The plan: the contract between `mpq search` and every later stage (DESIGN §1).

A plan is JSON with sorted keys and a schema version. It names the model by its path from the
plan's directory and its sha256 (export and eval refuse a model that changed), the board and
its budgets, the patch schedule (split layer, grid, VDPC thresholds and per-position outlier
rates), every tensor's bits and quantisation (and, inside the patch stage, the 8-bit
parameters of the outlier branch), every layer's bitwidths, MACs and BitOPs (layers listed in
the order they run: `schedule.order` when it differs from the model file's, `mpq.order`), the
arena offsets and, on boards that rank their SRAM regions, where the arena and the scratch go
(`schedule.regions`, `mpq.regions`), what the memory model predicts, and how the plan was
found. No wall-clock time and no
absolute path go into it, so the same inputs give the same bytes.

Weights are not stored: they are re-quantised deterministically from the model (whose sha256
the plan pins) at the plan's per-layer weight bits. A layer whose weights use another scheme than
linear (DESIGN §7.4) records it as `w_scheme`, with what rebuilds its weights exactly in
`w_params` (weighted entropy: the cluster boundaries and the int8 codebook; linear weights whose
rounding AdaRound chose: `{"rounding": base64 bit mask}`); a layer without these keys (every
layer of older plans) is linear, rounded to nearest. A bias-corrected layer records its
correction δ per output channel in real units (`bias_correction`, `mpq.quant.ptq`); its int32
bias is quantised from b − δ.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mpq.errors import MpqError
from mpq.fileio import write_atomic
from mpq.ir import Graph
from mpq.quant.qmodel import ActQuant, LayerQuant, QuantModel, quant_model_with_acts
from mpq.quant.weights import WeightSpec

SCHEMA = 1


@dataclass
class TensorPlan:
    """One activation tensor: bits and quantisation, packed bytes, arena offset."""

    name: str
    bits: int
    scale: float
    zero_point: int
    bytes: int  # packed bytes as allocated (per-patch maximum inside the patch stage)
    offset: int | None = None  # arena offset; None for the caller's input buffer
    outlier_branch: dict[str, Any] | None = None  # 8-bit parameters for VDPC outlier patches
    range8: list[float] | None = None  # calibrated real range at 8 bits (the int8 baseline)


@dataclass
class LayerPlan:
    """One layer: weight and activation bits, MACs and BitOPs (MACs·b_w·b_a_in)."""

    name: str
    op: str
    w_bits: int | None
    a_bits_in: int
    a_bits_out: int
    macs: int
    bitops: int
    w_scheme: str | None = None  # None: linear (DESIGN §7.4)
    w_params: dict[str, Any] | None = None  # e.g. wentropy boundaries and codebook
    bias_correction: list[float] | None = None  # δ per output channel (real units)

    def weight_spec(self) -> WeightSpec | None:
        """The scheme to rebuild this layer's weights with (None: linear at w_bits)."""
        if self.w_scheme is None or self.w_bits is None:
            return None
        return WeightSpec(self.w_scheme, int(self.w_bits), self.w_params)


OPTIONAL_LAYER_KEYS = ("w_scheme", "w_params", "bias_correction")


def layer_weight_fields(lq: LayerQuant | None) -> dict[str, Any]:
    """The `LayerPlan` keys recording a layer's weight scheme (none for linear weights rounded
    to nearest) and its bias correction (none without one)."""
    if lq is None or lq.weight is None:
        return {}
    out: dict[str, Any] = {}
    if lq.weight_scheme != "linear" or lq.weight_params:
        out = {"w_scheme": lq.weight_scheme, "w_params": lq.weight_params}
    if lq.bias_correction is not None:
        out["bias_correction"] = [float(v) for v in lq.bias_correction]
    return out


@dataclass
class Plan:
    """A whole plan; `to_json` gives the file's bytes."""

    model: str
    model_sha256: str
    graph_fingerprint: str
    board: dict[str, Any]
    strategy: str
    patch: dict[str, Any] | None
    schedule: dict[str, Any]  # in-place depthwise, fused adds; order, regions (optional)
    tensors: list[TensorPlan]
    layers: list[LayerPlan]
    predicted: dict[str, Any]
    search: dict[str, Any]
    schema: int = SCHEMA
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> str:
        data = asdict(self)
        for layer in data["layers"]:  # linear layers keep the keys older plans have
            for key in OPTIONAL_LAYER_KEYS:
                if layer[key] is None:
                    del layer[key]
        return json.dumps(data, indent=2, sort_keys=True) + "\n"

    def save(self, path: str | Path) -> None:
        """Write atomically (never a half-written plan)."""
        write_atomic(path, self.to_json().encode())

    def tensor(self, name: str) -> TensorPlan:
        for t in self.tensors:
            if t.name == name:
                return t
        raise MpqError(f"plan has no tensor '{name}'")

    def layer(self, name: str) -> LayerPlan:
        for layer in self.layers:
            if layer.name == name:
                return layer
        raise MpqError(f"plan has no layer '{name}'")


def file_sha256(path: str | Path) -> str:
    """sha256 of a file's bytes (the plan pins the model this way)."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def load_plan(path: str | Path) -> Plan:
    """Read a plan file; refuse other files and newer schemas with one line."""
    p = Path(path)
    if not p.is_file():
        raise MpqError(f"{path}: no such file")
    try:
        data = json.loads(p.read_text())
    except (UnicodeDecodeError, ValueError, RecursionError):  # ValueError: bad JSON, huge ints
        raise MpqError(f"{path}: not a plan (not JSON)") from None
    if not isinstance(data, dict) or "schema" not in data or "model_sha256" not in data:
        raise MpqError(f"{path}: not an mpq plan")
    schema = data["schema"]
    if not isinstance(schema, int) or isinstance(schema, bool) or schema < 1:
        raise MpqError(f"{path}: schema: must be a positive integer")
    if schema > SCHEMA:
        raise MpqError(f"{path}: plan schema {schema} is newer than this mpq reads "
                       f"({SCHEMA}); upgrade mpq")
    from mpq.plan_schema import PlanFieldError, check_plan_data

    try:
        check_plan_data(data)
    except PlanFieldError as exc:
        raise MpqError(f"{path}: {exc}") from None
    data["tensors"] = [TensorPlan(**t) for t in data["tensors"]]
    data["layers"] = [LayerPlan(**layer) for layer in data["layers"]]
    return Plan(**data)


def check_model_matches(plan: Plan, model_path: str | Path) -> None:
    """Refuse a model file whose bytes differ from the one the plan was made for."""
    if file_sha256(model_path) != plan.model_sha256:
        raise MpqError(f"{model_path}: model changed since the plan was made (sha256 differs); "
                       "run `mpq search` again")


def model_reference(model_path: str | Path, plan_path: str | Path) -> str:
    """How a plan written to `plan_path` names its model: the path from the plan's directory,
    `/`-separated, so the same layout gives the same bytes wherever it sits on disk and plans
    and models may live in different directories (`../models/x.onnx`)."""
    rel = os.path.relpath(os.path.abspath(model_path),
                          os.path.dirname(os.path.abspath(plan_path)))
    return Path(rel).as_posix()


def resolve_model(plan: Plan, plan_path: str | Path, model: str | Path | None = None) -> Path:
    """The model file of a plan: given explicitly, or where the plan's `model` path leads from
    the plan's directory."""
    path = Path(model) if model is not None else Path(plan_path).parent / plan.model
    if not path.is_file():
        if model is not None:
            raise MpqError(f"{path}: no such model file")
        raise MpqError(f"{plan_path}: model file of the plan not found: {path} "
                       "(give it with --model)")
    check_model_matches(plan, path)
    return path


def load_plan_with_model(path: str | Path, model: str | Path | None = None
                         ) -> tuple[Plan, Path, Graph]:
    """The one way the CLI reads a plan it runs with its model: the plan (schema-checked), its
    model file (sha256-checked) and graph, and the plan checked against the graph
    (`plan_check.check_plan`), so no command can use a plan that does not fit its model."""
    from mpq.frontend import load_model

    plan = load_plan(path)
    model_path = resolve_model(plan, path, model)
    graph = load_model(model_path)
    check_plan_against(plan, graph, str(path))
    return plan, model_path, _in_plan_order(plan, graph)


_CHECKED: set[tuple[str, str]] = set()  # (plan digest, graph fingerprint) already checked


def check_plan_against(plan: Plan, graph: Graph, where: str = "plan") -> None:
    """`plan_check.check_plan` with `where: ` before the field, once per plan and graph (the
    library calls it again from `plan_quant_model`; a plan changed since is checked anew)."""
    from mpq.plan_check import check_plan
    from mpq.plan_schema import PlanFieldError

    key = (hashlib.sha256(plan.to_json().encode()).hexdigest(), _fingerprint(graph))
    if key in _CHECKED:
        return
    try:
        check_plan(plan, graph)
    except PlanFieldError as exc:
        raise MpqError(f"{where}: {exc}") from None
    _CHECKED.add(key)


def plan_quant_model(plan: Plan, graph: Graph, branch: str = "mixed") -> QuantModel:
    """Rebuild the QuantModel a plan describes (weights re-quantised at the plan's bits).

    `branch="outlier"` gives the all-8-bit parameters that VDPC's outlier patches use inside
    the patch stage; outside the stage both branches are the same. The plan is checked
    against the graph first (every library path to the kernels comes through here).
    """
    check_plan_against(plan, graph)
    graph = _in_plan_order(plan, graph)
    acts: dict[str, ActQuant] = {}
    for t in plan.tensors:
        if branch == "outlier" and t.outlier_branch is not None:
            o = t.outlier_branch
            acts[t.name] = ActQuant(float(o["scale"]), int(o["zero_point"]), int(o["bits"]))
        else:
            acts[t.name] = ActQuant(float(t.scale), int(t.zero_point), int(t.bits))
    w_bits = {layer.name: int(layer.w_bits) for layer in plan.layers if layer.w_bits}
    schemes = {layer.name: spec for layer in plan.layers
               if (spec := layer.weight_spec()) is not None}
    corrections = {layer.name: np.asarray(layer.bias_correction, np.float64)
                   for layer in plan.layers if layer.bias_correction is not None}
    return quant_model_with_acts(graph, acts, w_bits, schemes, corrections)


def _in_plan_order(plan: Plan, graph: Graph) -> Graph:
    """`graph` with its nodes in the order the plan runs them (`mpq.order.plan_graph`)."""
    from mpq.order import plan_graph

    return plan_graph(plan, graph)


def _fingerprint(graph: Graph) -> str:
    from mpq.ir import graph_fingerprint

    return graph_fingerprint(graph)


def plan_io(plan: Plan) -> str:
    """Where the plan keeps the graph input and outputs (`schedule.io`, `memory.IO_MODES`):
    "arena", or "external" — the caller's buffers — for plans written before `io` existed."""
    return str(plan.schedule.get("io", "external"))


def plan_scratch(plan: Plan) -> str:
    """Where the plan keeps the kernels' scratch (`memory.SCRATCH_MODES`): "arena" when it
    records each layer's slot (`schedule.scratch`), else "separate" — one buffer beside the
    arena, as every plan before `schedule.scratch` existed."""
    return "arena" if "scratch" in plan.schedule else "separate"


def plan_scratch_slots(plan: Plan) -> dict[str, tuple[int, int]]:
    """node → (arena offset, bytes) of its kernel scratch (`schedule.scratch.steps`); empty
    for a plan with the separate scratch."""
    rec = plan.schedule.get("scratch")
    if not rec:
        return {}
    return {n: (int(v["offset"]), int(v["bytes"])) for n, v in rec["steps"].items()}


def plan_raised(plan: Plan) -> dict[str, int]:
    """A patch stage's in-place depthwise nodes whose output the plan starts U bytes above
    their input's start (`schedule.inplace_raised`, `mpq.patch.PatchSchedule.raise_shift`);
    none for plans without it."""
    return dict(plan.schedule.get("inplace_raised", {}))


def plan_overlap(plan: Plan) -> dict[str, int]:
    """The nodes whose output the plan writes inside their input, with their shift D
    (`schedule.overlap`: D ≥ 0 bytes below the input, `memory.overlap_shift`; D < 0: −D bytes
    above it, rows run last to first, `memory.reverse_overlap_shift`); none for plans without
    it."""
    return dict(plan.schedule.get("overlap", {}))
