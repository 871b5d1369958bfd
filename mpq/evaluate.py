"""Accuracy of a model in float and through the integer reference (`mpq eval`).

Float runs on onnxruntime for ONNX files (the original model, as the user trained it) and on
the IR float interpreter otherwise; quantised runs go through `mpq.sim`, batch by batch, so
memory stays bounded on large test sets.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

from mpq.errors import MpqError
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
        from mpq.frontend.onnx_validate import ort_run, ort_session

        sess = ort_session(model_path)
        name = sess.get_inputs()[0].name
        fixed = sess.get_inputs()[0].shape[0]
        if isinstance(fixed, int) and fixed > 0:  # a model exported with a fixed batch size
            batch_size = fixed
        for batch in data.batches(batch_size):
            out = ort_run(sess, {name: batch}, model_path)
            preds.append(_top1(out, len(batch), sum(map(len, preds))))
            if progress:
                progress(len(batch))
    else:
        for batch in data.batches(batch_size):
            # Huge (finite) inputs can overflow float32 inside the model: _top1 reports it.
            with np.errstate(over="ignore", invalid="ignore"):
                out = next(run_batches(graph, batch, batch_size=len(batch)))
            preds.append(_top1(out, len(batch), sum(map(len, preds))))
            if progress:
                progress(len(batch))
    return np.concatenate(preds)


def _top1(out: np.ndarray, n: int, first: int) -> np.ndarray:
    """Top-1 class per sample of a float output batch; MpqError on a NaN or Inf output, whose
    argmax would be a meaningless class counted as a prediction."""
    flat = out.reshape(n, -1)
    bad = ~np.isfinite(flat).all(axis=1)
    if bad.any():
        raise MpqError(f"float model output is not finite (NaN/Inf) for sample "
                       f"{first + int(np.argmax(bad))}: the data overflows float32 in the model")
    return flat.argmax(axis=1)


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


def output_classes(graph: Graph) -> int:
    """Number of classes a top-1 prediction ranges over: the per-sample size of the output
    (predictions are the argmax of the flattened output)."""
    return int(np.prod(graph.tensors[graph.outputs[0]].shape[1:], dtype=np.int64))


def eval_labels(ds: Dataset, graph: Graph) -> np.ndarray:
    """The labels of a test set as int64 class indices, or MpqError naming the first bad one.

    `y` holds one class index per sample (shape [N] or [N, 1]; integers, or floats with
    integral values), or one-hot rows (shape [N, classes], every row 0/1 with a single 1),
    taken by argmax. A label that is not a class index of the model (negative, too large,
    NaN, 2.5, a string) would never equal a prediction and silently count as wrong, so the
    accuracy would be a number that means nothing.
    """
    where = f"{ds.path}: labels 'y'"
    if ds.y is None:
        raise MpqError(f"{ds.path}: evaluation needs labels (y in the .npz)")
    y, n, classes = np.asarray(ds.y), len(ds), output_classes(graph)
    if y.dtype.kind not in "iuf":
        raise MpqError(f"{where} have dtype {y.dtype}; they must be integer class indices")
    if y.ndim == 2 and y.shape == (n, classes) and classes > 1:
        return _from_one_hot(y, where)
    if y.ndim == 2 and y.shape[1:] == (1,):
        y = y[:, 0]
    if y.ndim != 1 or len(y) != n:
        raise MpqError(f"{where} have shape {list(y.shape)}; expected [{n}] class indices or "
                       f"[{n}, {classes}] one-hot rows")
    if y.dtype.kind == "f":
        bad = ~np.isfinite(y) | (y != np.round(y))
        if bad.any():
            i = int(np.argmax(bad))
            raise MpqError(f"{where}: sample {i} has label {y[i]!s}, not a class index")
    out = (y < 0) | (y >= classes)
    if out.any():
        i = int(np.argmax(out))
        raise MpqError(f"{where}: sample {i} has label {y[i]!s}; the model has {classes} "
                       f"classes (0 to {classes - 1})")
    return y.astype(np.int64)


def _from_one_hot(y: np.ndarray, where: str) -> np.ndarray:
    """Class indices of one-hot rows; each row must be 0/1 with exactly one 1 (a row of
    probabilities or an all-zero row has no single class)."""
    ok = np.isin(y, (0, 1)).all(axis=1) & (y.sum(axis=1) == 1)
    if not ok.all():
        i = int(np.argmin(ok))
        raise MpqError(f"{where}: one-hot row of sample {i} is not 0/1 with a single 1")
    return y.argmax(axis=1).astype(np.int64)


def accuracy(preds: np.ndarray, labels: np.ndarray) -> float:
    """Fraction of samples whose top-1 class equals the label."""
    return float((np.asarray(preds) == np.asarray(labels).reshape(-1)).mean())


class PlanRunner:
    """Runs a plan through the integer reference exactly as the firmware will (DESIGN §6).

    Without VDPC the plan is one QuantModel. With VDPC, the patch stage runs twice over the
    whole image — once with the mixed-precision parameters, once with the 8-bit outlier
    branch's — and each patch's tile of the split tensor is taken from the branch its
    classification picks. Patch inference computes exactly the full-image values on each
    region, so stitching tiles of whole-image runs is the same as running patch by patch.
    """

    def __init__(self, plan, graph: Graph) -> None:
        from mpq.plan import plan_quant_model

        self.graph = graph
        self.plan = plan
        self.mixed = plan_quant_model(plan, graph, "mixed")
        self.vdpc = plan.patch.get("vdpc") if plan.patch else None
        self.outlier = plan_quant_model(plan, graph, "outlier") if self.vdpc else None

    def int_outputs(self, x_ir: np.ndarray) -> np.ndarray:
        """Integer outputs for a batch of integer inputs in the IR layout."""
        g = self.graph
        name = g.inputs[0]
        if self.vdpc is None:
            return run_int(self.mixed, {name: x_ir})[g.outputs[0]]
        from mpq.ir import Graph as IrGraph
        from mpq.quant.qmodel import QuantModel

        patch = self.plan.patch
        k, split, cmap = patch["split_layer"], patch["split_tensor"], self.vdpc["map"]
        stage = IrGraph(g.name, g.tensors, g.nodes[:k], g.inputs, [split, cmap],
                        g.input_layouts, {})
        mixed = run_int(QuantModel(stage, self.mixed.acts, self.mixed.layers), {name: x_ir})
        eight = run_int(QuantModel(stage, self.outlier.acts, self.outlier.layers),
                        {name: x_ir})
        from mpq.vdpc import patch_outlier_counts

        counts = patch_outlier_counts(mixed[cmap], self.vdpc["lo_threshold"],
                                      self.vdpc["hi_threshold"], self.vdpc["regions"])
        outlier = counts >= self.vdpc["min_outliers"]
        stitched = mixed[split].copy()
        for i, row in enumerate(patch["tiles"]):
            for j, (y0, y1, x0, x1) in enumerate(row):
                pick = outlier[:, i, j]
                stitched[pick, y0:y1, x0:x1] = eight[split][pick, y0:y1, x0:x1]
        rest = IrGraph(g.name, g.tensors, g.nodes[k:], [split] + list(g.inputs), g.outputs,
                       g.input_layouts, g.output_layouts)
        feeds = {split: stitched, name: x_ir}
        return run_int(QuantModel(rest, self.mixed.acts, self.mixed.layers), feeds)[g.outputs[0]]

    def outputs(self, batch: np.ndarray) -> np.ndarray:
        """Integer outputs of one float batch in the model's (ONNX) input layout."""
        g = self.graph
        name = g.inputs[0]
        xq = quantize_input(self.mixed.acts[name], to_ir_layout(g, name, batch))
        return from_ir_layout(g, g.outputs[0], self.int_outputs(xq))

    def predictions(self, data: Dataset, batch_size: int = 64,
                    progress: Progress | None = None) -> np.ndarray:
        preds = []
        for batch in data.batches(batch_size):
            preds.append(self.outputs(batch).reshape(len(batch), -1).argmax(axis=1))
            if progress:
                progress(len(batch))
        return np.concatenate(preds)


def plan_int8_ranges(plan) -> dict[str, tuple[float, float]]:
    """The calibrated 8-bit range of every plan tensor: the all-int8 model the plan is
    measured against, without the calibration data."""
    return {t.name: (float(t.range8[0]), float(t.range8[1])) for t in plan.tensors}


class LogActivations:
    """Park et al.'s log-domain activation levels (`mpq.quant.logquant`), reference only:
    fitted per tensor on calibration data, run as fake quantisation in float with the weights
    of a QuantModel dequantised, so the only difference to the integer reference of that
    QuantModel is how activations are quantised."""

    def __init__(self, graph: Graph, calib: Dataset) -> None:
        from mpq.quant.logquant import collect_log_histograms

        self.graph = graph
        self.hists, self.signed = collect_log_histograms(graph, calib)

    def predictions(self, qm: QuantModel, bits: int, data: Dataset, batch_size: int = 64,
                    progress: Progress | None = None) -> np.ndarray:
        """Top-1 class per sample with every activation at `bits` log levels (the input stays
        at its linear 8-bit quantisation)."""
        from mpq.quant.logquant import choose_log_levels, run_log_quantised
        from mpq.sim import dequantize

        g = self.graph
        name = g.inputs[0]
        quantizers = {t: choose_log_levels(self.hists[t], bits, self.signed[t])
                      for t in g.tensors if t != name}
        weights = {n: (lq.weight.astype(np.float64) * lq.weight_scale.astype(np.float64)
                       .reshape((-1,) + (1,) * (lq.weight.ndim - 1))).astype(np.float32)
                   for n, lq in qm.layers.items() if lq.weight is not None}
        inq = qm.acts[name]

        def input_fq(x: np.ndarray) -> np.ndarray:
            return dequantize(inq, quantize_input(inq, x)).astype(np.float32)

        preds = []
        for batch in data.batches(batch_size):
            y = run_log_quantised(g, quantizers, weights, to_ir_layout(g, name, batch), input_fq)
            y = from_ir_layout(g, g.outputs[0], y)
            preds.append(y.reshape(len(batch), -1).argmax(axis=1))
            if progress:
                progress(len(batch))
        return np.concatenate(preds)
