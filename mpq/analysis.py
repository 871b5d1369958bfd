"""Per-layer analysis of a model: shapes, MACs, parameters and the int8 memory model.

This is what `mpq inspect` prints. It only reads the IR and the memory model (DESIGN §5); the
numbers are those of the layer-based schedule with every tensor at 8 bits. `--compress` adds
the size of the weight blob export would write under a weight scheme — raw, gzip and lzma
(Nayak et al.'s "file size" measure; DESIGN §7.4).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from mpq.boards import Board
from mpq.budget import predicted_stack_bytes
from mpq.ir import Graph, node_macs, node_params
from mpq.memory import code_bytes_estimate, flash_bytes, layer_memory, step_scratch_bytes
from mpq.quant.finite import check_finite_parameters
from mpq.quant.weights import WeightSpec, compressed_sizes, encode, quantize_weights, weight_blob


@dataclass
class LayerInfo:
    """One IR node as `mpq inspect` reports it."""

    name: str
    op: str
    act: str
    in_shape: list[int]
    out_shape: list[int]
    macs: int
    params: int
    act_bytes: int  # int8 input(s) + output bytes of this layer
    scratch_bytes: int


@dataclass
class BoardFit:
    """Whether the layer-based int8 model fits a board's budgets."""

    board: str
    sram_budget: int
    sram_needed: int  # peak SRAM + the input buffer the application passes in
    sram_margin: int
    flash_budget: int
    flash_needed: int  # parameters + code estimate
    flash_margin: int

    @property
    def fits(self) -> bool:
        return self.sram_margin >= 0 and self.flash_margin >= 0


@dataclass
class ModelSummary:
    """Totals and per-layer rows of a model at int8, layer-based schedule."""

    model: str
    inputs: dict[str, list[int]]
    outputs: dict[str, list[int]]
    layers: list[LayerInfo]
    macs: int
    params: int
    arena_bytes: int
    scratch_bytes: int
    peak_sram_bytes: int
    input_bytes: int
    output_bytes: int
    flash_bytes: int
    code_bytes_estimate: int
    stack_bytes: int  # the model's stack bound (GCC's call graph of the kernels, `mpq.budget`)
    io: str  # "arena" (input and outputs inside the arena) or "external" (the caller's buffers)
    overlapped: int  # layers whose output starts inside their dying input (`memory.overlap_shift`)
    inplace_depthwise: int
    fit: BoardFit | None = None
    compress: dict[str, Any] | None = None  # `--compress`: the weight blob's sizes
    # "arena": each layer's scratch planned in the arena for its step (scratch_bytes 0);
    # "separate": one buffer of the largest scratch beside it (`memory.SCRATCH_MODES`)
    scratch: str = "separate"

    def to_dict(self) -> dict:
        d = asdict(self)
        if self.fit is not None:
            d["fit"]["fits"] = self.fit.fits
        return d


def summarise(graph: Graph, model_name: str, board: Board | None = None,
              io: str = "arena", overlap: bool = True,
              scratch: str = "arena") -> ModelSummary:
    """Analyse a graph at int8 in the layer-based schedule, optionally against a board; `io`
    and `overlap` as `mpq search --io/--overlap` (DESIGN §5: the input and outputs as arena
    tensors; outputs written over their dying inputs where that lowers the arena); `scratch`
    as `mpq search --scratch`."""
    from mpq.patch import plan_patches

    mem = layer_memory(graph, io=io)
    schedule = plan_patches(graph, None, io, overlap, scratch)
    planned, planned_in_arena = schedule.memory(), schedule.scratch_in_arena
    layers = []
    for node, step in zip(graph.nodes, mem.steps, strict=True):
        tensors = [graph.tensors[t] for t in node.inputs + node.outputs]
        layers.append(LayerInfo(
            name=node.name, op=node.kind, act=node.act,
            in_shape=list(graph.tensors[node.inputs[0]].shape),
            out_shape=list(graph.tensors[node.outputs[0]].shape),
            macs=node_macs(node, graph), params=node_params(node),
            act_bytes=sum(t.size for t in tensors),
            # with the scratch in the arena: the slot the plan gives it (the export's kernels)
            scratch_bytes=step_scratch_bytes(node, graph, node.name in planned.inplace)
            if planned_in_arena else step.scratch))
    cpu = "cortex-m4/fpv4-sp-d16" if board is None else f"{board.core}/{board.fpu}"
    code = code_bytes_estimate(graph, cpu)
    stack = predicted_stack_bytes(graph, cpu)
    flash = flash_bytes(graph)
    summary = ModelSummary(
        model=model_name,
        inputs={t: list(graph.tensors[t].shape) for t in graph.inputs},
        outputs={t: list(graph.tensors[t].shape) for t in graph.outputs},
        layers=layers, macs=sum(x.macs for x in layers), params=sum(x.params for x in layers),
        arena_bytes=planned.arena_bytes, scratch_bytes=planned.scratch_bytes,
        peak_sram_bytes=planned.peak_sram_bytes, input_bytes=mem.input_bytes,
        output_bytes=mem.output_bytes, flash_bytes=flash, code_bytes_estimate=code,
        stack_bytes=stack, io=io,
        inplace_depthwise=len(mem.inplace), overlapped=len(planned.overlap), scratch=scratch)
    if board is not None:
        sram_needed = planned.peak_sram_bytes + mem.input_bytes + mem.output_bytes + stack
        flash_needed = flash + code
        summary.fit = BoardFit(
            board=board.name, sram_budget=board.sram_budget, sram_needed=sram_needed,
            sram_margin=board.sram_budget - sram_needed, flash_budget=board.flash_budget,
            flash_needed=flash_needed, flash_margin=board.flash_budget - flash_needed)
    return summary


def weight_compression(graph: Graph, spec: WeightSpec) -> dict[str, Any]:
    """Raw, gzip and lzma bytes of the weight blob export writes with every weighted layer under
    `spec`: the packed codes and codebooks of `mpq.quant.weights.encode`, in layer order."""
    check_finite_parameters(graph)
    encoded = []
    for node in graph.nodes:
        if node.weight is not None:
            q = quantize_weights(node.weight, spec)
            encoded.append(encode(q.values, q.scheme, q.bits, q.codebook, f"layer '{node.name}'"))
    sizes = compressed_sizes(weight_blob(encoded))
    params = sum(int(n.weight.size) for n in graph.nodes if n.weight is not None)
    return {"weights": spec.label, "layers": len(encoded), "parameters": params, **sizes}
