"""Accuracy of a model in float and through the integer reference (`mpq eval`).

Float runs on onnxruntime for ONNX files (the original model, as the user trained it) and on
the IR float interpreter otherwise; quantised runs go through `mpq.sim`, batch by batch, so
memory stays bounded on large test sets.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

from mpq.interpreter import from_ir_layout, run_batches, to_ir_layout
from mpq.ir import Graph
from mpq.quant.calibrate import Dataset
from mpq.quant.qmodel import QuantModel
from mpq.sim import quantize_input, run_int

Progress = Callable[[int], None]


def float_predictions(model_path: Path, graph: Graph, data: Dataset, batch_size: int = 64,
                      progress: Progress | None = None) -> np.ndarray:
    """Top-1 class per sample of the float model."""
    preds = []
    if model_path.suffix.lower() == ".onnx":
        import onnxruntime as ort

        sess = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
        name = sess.get_inputs()[0].name
        for batch in data.batches(batch_size):
            out = sess.run(None, {name: batch})[0]
            preds.append(out.reshape(len(batch), -1).argmax(axis=1))
            if progress:
                progress(len(batch))
    else:
        for batch in data.batches(batch_size):
            out = next(run_batches(graph, batch, batch_size=len(batch)))
            preds.append(out.reshape(len(batch), -1).argmax(axis=1))
            if progress:
                progress(len(batch))
    return np.concatenate(preds)


def quant_outputs(qm: QuantModel, batch: np.ndarray) -> np.ndarray:
    """Integer outputs of one float batch (ONNX layout) through the integer reference."""
    g = qm.graph
    name = g.inputs[0]
    xq = quantize_input(qm.acts[name], to_ir_layout(g, name, batch))
    out = run_int(qm, {name: xq})[g.outputs[0]]
    return from_ir_layout(g, g.outputs[0], out)


def quant_predictions(qm: QuantModel, data: Dataset, batch_size: int = 64,
                      progress: Progress | None = None) -> np.ndarray:
    """Top-1 class per sample through the integer reference (argmax of the integer output;
    dequantisation is monotonic, so it is the same class)."""
    preds = []
    for batch in data.batches(batch_size):
        out = quant_outputs(qm, batch)
        preds.append(out.reshape(len(batch), -1).argmax(axis=1))
        if progress:
            progress(len(batch))
    return np.concatenate(preds)


def accuracy(preds: np.ndarray, labels: np.ndarray) -> float:
    """Fraction of samples whose top-1 class equals the label."""
    return float((np.asarray(preds) == np.asarray(labels).reshape(-1)).mean())
