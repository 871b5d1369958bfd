"""From a model file to a `QuantModel`: the model's own int8 parameters (`.tflite`) or mpq's
quantiser over calibration statistics (ONNX), at uniform activation bits.

Used by `mpq run` and `mpq eval` until plans exist; the search will produce per-tensor bits.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from mpq.errors import MpqError
from mpq.frontend import load_model, require_one_input
from mpq.ir import Graph
from mpq.quant.calibrate import CalibrationStats, activation_range
from mpq.quant.qmodel import (
    ActQuant,
    QuantModel,
    fixed_output_quant,
    quant_model_from_parameters,
    quantize_graph,
)


@dataclass
class LoadedModel:
    """A model file read for quantised execution."""

    graph: Graph
    own_quant: QuantModel | None  # an int8 .tflite's own parameters, else None


def load_for_quantisation(path: str | Path) -> LoadedModel:
    """Read ONNX or `.tflite`; an int8 `.tflite` brings its own quantisation."""
    p = Path(path)
    if p.suffix.lower() == ".tflite":
        from mpq.frontend.tflite_import import import_tflite

        tm = import_tflite(p)
        require_one_input(tm.graph, path)
        if tm.quant is None:
            return LoadedModel(tm.graph, None)
        acts = {name: ActQuant(float(t.scale), int(t.zero_point), 8)
                for name, t in tm.quant.activations.items()}
        weights = {name: (w.weight, w.scale, w.bias) for name, w in tm.quant.weights.items()}
        return LoadedModel(tm.graph, quant_model_from_parameters(tm.graph, acts, weights))
    return LoadedModel(load_model(p), None)


def uniform_act_bits(graph: Graph, bits: int) -> dict[str, int]:
    """Every activation at `bits`, except the graph input (the sensor's 8-bit data) and the
    softmax, sigmoid and tanh outputs (fixed at 8 bits by TFLM)."""
    softmax_out = {n.outputs[0] for n in graph.nodes if n.op == "softmax"}
    softmax_out |= {n.outputs[0] for n in graph.nodes if fixed_output_quant(n) is not None}
    return {t: (8 if t in graph.inputs or t in softmax_out else bits) for t in graph.tensors}


def quantise(graph: Graph, stats: CalibrationStats, act_bits: int = 8,
             method: str = "minmax") -> QuantModel:
    """mpq's quantiser at uniform activation bits (weights 8-bit) from calibration ranges."""
    if act_bits not in (8, 4, 2):
        raise MpqError(f"activation bits must be 8, 4 or 2, not {act_bits}")
    bits = uniform_act_bits(graph, act_bits)
    missing = [t for t in graph.tensors if t not in stats.tensors]
    if missing:
        raise MpqError(f"statistics have no entry for tensor '{missing[0]}'")
    ranges = {t: activation_range(stats.tensors[t], method, bits[t]) for t in graph.tensors}
    return quantize_graph(graph, ranges, act_bits=bits)
