"""Accuracy of a model in float and through the integer reference, and how close the
quantised outputs are to the float ones (`mpq eval`; the measures are `mpq.fidelity`'s).

Float runs on onnxruntime for ONNX files (the original model, as the user trained it) and on
the IR float interpreter otherwise; its outputs are kept as the reference. Quantised runs go
through `mpq.sim`, batch by batch, and are compared with the reference as they stream past
(only running sums stay), so memory stays bounded on large test sets.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mpq.errors import MpqError
from mpq.fidelity import FidelitySums, is_classifier
from mpq.interpreter import from_ir_layout, run_graph, to_ir_layout
from mpq.ir import Graph
from mpq.quant.calibrate import Dataset
from mpq.quant.qmodel import QuantModel
from mpq.sim import dequantize, quantize_input, run_int

Progress = Callable[[int], None]


Outputs = dict[str, np.ndarray]
#: A model compared with the float one: a float batch (ONNX layout) → its real-valued
#: (dequantised) outputs by graph output name, in the model's (ONNX) layout.
Variant = Callable[[np.ndarray], Outputs]


def float_outputs(model_path: Path, graph: Graph, data: Dataset, batch_size: int = 64,
                  progress: Progress | None = None) -> Outputs:
    """Every output of the float model over the whole data set, float32 [N, …] in the
    model's (ONNX) layout, keyed by graph output; MpqError on a NaN or Inf output.

    onnxruntime runs ONNX files (its outputs are the graph's, by position); the IR float
    interpreter runs the rest. The outputs are kept whole: they are the reference every
    quantised model is compared with batch by batch, and a model's outputs are no larger than
    the data it reads (a classifier's far smaller).
    """
    names = list(graph.outputs)
    parts: dict[str, list[np.ndarray]] = {name: [] for name in names}
    done = 0
    if model_path.suffix.lower() == ".onnx":
        from mpq.frontend.onnx_validate import ort_run_all, ort_session

        sess = ort_session(model_path)
        feed = sess.get_inputs()[0].name
        fixed = sess.get_inputs()[0].shape[0]
        if isinstance(fixed, int) and fixed > 0:  # a model exported with a fixed batch size
            batch_size = fixed
        run = lambda batch: ort_run_all(sess, {feed: batch}, model_path)  # noqa: E731
    else:
        inp = graph.inputs[0]

        def run(batch: np.ndarray) -> list[np.ndarray]:
            # Huge (finite) inputs can overflow float32 inside the model: _check_finite says so.
            with np.errstate(over="ignore", invalid="ignore"):
                env = run_graph(graph, {inp: to_ir_layout(graph, inp, batch)})
            return [from_ir_layout(graph, name, env[name]) for name in names]
    for batch in data.batches(batch_size):
        outs = run(batch)
        if len(outs) != len(names):
            raise MpqError(f"{model_path}: the float model gives {len(outs)} outputs; the "
                           f"imported graph has {len(names)}")
        for name, out in zip(names, outs, strict=True):
            parts[name].append(_check_float_output(graph, name, out, len(batch), done,
                                                   model_path))
        done += len(batch)
        if progress:
            progress(len(batch))
    return {name: np.concatenate(parts[name]) for name in names}


def _check_float_output(graph: Graph, name: str, out: np.ndarray, n: int, first: int,
                        model_path: Path) -> np.ndarray:
    """One float output batch as float32, after checking it is the graph's output `name`
    (same values per sample) and finite: a NaN or Inf output has no meaningful argmax class
    and no defined error against a quantised model."""
    want = int(np.prod(graph.tensors[name].shape[1:], dtype=np.int64))
    if out.size != n * want:
        raise MpqError(f"{model_path}: the float model's output '{name}' has "
                       f"{out.size // max(n, 1)} values per sample; the imported graph's has "
                       f"{want}")
    out = np.asarray(out, np.float32)
    bad = ~np.isfinite(out.reshape(n, -1)).all(axis=1)
    if bad.any():
        which = f" '{name}'" if len(graph.outputs) > 1 else ""
        raise MpqError(f"float model output{which} is not finite (NaN/Inf) for sample "
                       f"{first + int(np.argmax(bad))}: the data overflows float32 in the model")
    return out


def top1(out: np.ndarray) -> np.ndarray:
    """Top-1 class per sample: the argmax of each sample's flattened output."""
    return out.reshape(len(out), -1).argmax(axis=1)


def float_predictions(model_path: Path, graph: Graph, data: Dataset, batch_size: int = 64,
                      progress: Progress | None = None) -> np.ndarray:
    """Top-1 class per sample of the float model (its first output)."""
    return top1(float_outputs(model_path, graph, data, batch_size, progress)[graph.outputs[0]])


def quant_output_dict(qm: QuantModel, batch: np.ndarray) -> Outputs:
    """Integer outputs of one float batch (ONNX layout) through the integer reference, every
    graph output in the ONNX layout."""
    g = qm.graph
    name = g.inputs[0]
    xq = quantize_input(qm.acts[name], to_ir_layout(g, name, batch))
    outs = run_int(qm, {name: xq})
    return {o: from_ir_layout(g, o, outs[o]) for o in g.outputs}


def quant_outputs(qm: QuantModel, batch: np.ndarray) -> np.ndarray:
    """Integer first output of one float batch (ONNX layout) through the integer reference."""
    return quant_output_dict(qm, batch)[qm.graph.outputs[0]]


def dequantised(acts: dict, outs: Outputs) -> Outputs:
    """Integer outputs as real values, scale·(q − zp) with each output's ActQuant."""
    return {name: dequantize(acts[name], q) for name, q in outs.items()}


def quant_variant(qm: QuantModel) -> Variant:
    """The dequantised outputs of `qm`'s integer reference, as a `Variant`."""
    return lambda batch: dequantised(qm.acts, quant_output_dict(qm, batch))


def quant_predictions(qm: QuantModel, data: Dataset, batch_size: int = 64,
                      progress: Progress | None = None) -> np.ndarray:
    """Top-1 class per sample through the integer reference (argmax of the integer output;
    dequantisation is monotonic, so it is the same class)."""
    preds = []
    for batch in data.batches(batch_size):
        preds.append(top1(quant_outputs(qm, batch)))
        if progress:
            progress(len(batch))
    return np.concatenate(preds)


def compare_with_float(variant: Variant, data: Dataset, ref: Outputs,
                       classifier: dict[str, bool], batch_size: int = 64,
                       progress: Progress | None = None, label_output: str | None = None
                       ) -> tuple[np.ndarray, dict[str, FidelitySums]]:
    """One pass of a quantised model over the data set: the top-1 class per sample of
    `label_output` (default: the first output), and the fidelity sums
    (`mpq.fidelity.FidelitySums`) of every output it gives against the float reference `ref`
    (`float_outputs` of the same data). The argmax of the dequantised output is the integer
    output's: dequantisation is increasing."""
    first = label_output if label_output is not None else next(iter(ref))
    sums: dict[str, FidelitySums] = {}
    preds, done = [], 0
    for batch in data.batches(batch_size):
        outs = variant(batch)
        n = len(batch)
        for name, y in outs.items():
            sums.setdefault(name, FidelitySums(classifier[name])).add(ref[name][done:done + n], y)
        preds.append(top1(outs[first]))
        done += n
        if progress:
            progress(n)
    return np.concatenate(preds), sums


def output_classes(graph: Graph, output: str | None = None) -> int:
    """Number of classes a top-1 prediction ranges over: the per-sample size of the output
    (default the first; predictions are the argmax of the flattened output)."""
    name = output if output is not None else graph.outputs[0]
    return int(np.prod(graph.tensors[name].shape[1:], dtype=np.int64))


def eval_labels(ds: Dataset, graph: Graph, output: str | None = None) -> np.ndarray:
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
    y, n, classes = np.asarray(ds.y), len(ds), output_classes(graph, output)
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


def output_tasks(graph: Graph, task: str = "auto") -> dict[str, bool]:
    """Whether each graph output is a classifier's (`mpq.fidelity.is_classifier`)."""
    return {name: is_classifier(graph, name, task) for name in graph.outputs}


def label_output(graph: Graph, classifier: dict[str, bool], chosen: str | None = None) -> str:
    """The output top-1 accuracy against labels is scored on: `chosen` (`mpq eval --output`;
    MpqError when the graph has no such output), else the first output that is a classifier's,
    else the first output. Labels name one class per sample, so they fit one output only."""
    if chosen is not None:
        if chosen not in graph.outputs:
            raise MpqError(f"--output '{chosen}': the model has no such output (its outputs: "
                           f"{', '.join(graph.outputs)})")
        return chosen
    return next((o for o in graph.outputs if classifier[o]), graph.outputs[0])


def usable_labels(ds: Dataset, graph: Graph, classifier: dict[str, bool],
                  output: str | None = None) -> np.ndarray | None:
    """The test set's labels as class indices (`eval_labels`) when it has labels and the
    labelled `output` (default the first) is a classifier's; None otherwise — top-1 accuracy
    of an autoencoder's or a regression's output against labels would be a number that means
    nothing."""
    name = output if output is not None else graph.outputs[0]
    if ds.y is None or not classifier[name]:
        return None
    return eval_labels(ds, graph, name)


@dataclass
class Evaluation:
    """What `mpq eval` measured: top-1 accuracy against labels (when usable) of the float
    model and of each compared model, and per output the fidelity of each compared model to
    the float one (`mpq.fidelity.FidelitySums.summary`)."""

    samples: int
    classifier: dict[str, bool]
    accuracy: dict[str, float] = field(default_factory=dict)
    fidelity: dict[str, dict[str, dict[str, Any]]] = field(default_factory=dict)
    label_output: str | None = None  # the output the accuracies are scored on

    def as_json(self) -> dict[str, Any]:
        """The `mpq eval --json` object: `samples`, the accuracies by model name at the top
        (as before fidelity was added), `classifier` and `fidelity` by output name. SQNR is
        null with `exact: true` when the outputs are identical (JSON has no infinity)."""
        extra = {"label_output": self.label_output} if self.accuracy else {}
        return {"samples": self.samples, **self.accuracy, "classifier": self.classifier,
                "fidelity": self.fidelity, **extra}


ProgressBar = Callable[[str, int], AbstractContextManager[Progress]]


def evaluate(model_path: Path, graph: Graph, data: Dataset, variants: dict[str, Variant],
             classifier: dict[str, bool], labels: np.ndarray | None,
             bar: ProgressBar | None = None, output: str | None = None) -> Evaluation:
    """The float model once (`float_outputs`), then each quantised variant in one pass
    (`compare_with_float`): accuracies of `output` (default the first) when `labels` are
    given, fidelity to float of every output always."""
    output = output if output is not None else graph.outputs[0]
    def phase(name: str) -> AbstractContextManager[Progress | None]:
        return bar(name, len(data)) if bar is not None else nullcontext(None)

    ev = Evaluation(len(data), dict(classifier), label_output=output)
    with phase("float") as advance:
        ref = float_outputs(model_path, graph, data, progress=advance)
    if labels is not None:
        ev.accuracy["float"] = accuracy(top1(ref[output]), labels)
    for key, variant in variants.items():
        with phase(key) as advance:
            preds, sums = compare_with_float(variant, data, ref, classifier, progress=advance,
                                             label_output=output)
        if labels is not None:
            ev.accuracy[key] = accuracy(preds, labels)
        for name, s in sums.items():
            ev.fidelity.setdefault(name, {})[key] = s.summary()
    return ev


class PlanRunner:
    """Runs a plan through the integer reference exactly as the firmware will (DESIGN §6).

    Without VDPC the plan is one QuantModel. With VDPC, the patch stage runs twice over the
    whole image — once with the mixed-precision parameters, once with the 8-bit outlier
    branch's — and each patch's tile of the split tensor is taken from the branch its
    classification picks. Patch inference computes exactly the full-image values on each
    region, so stitching tiles of whole-image runs is the same as running patch by patch.
    """

    def __init__(self, plan, graph: Graph) -> None:
        from mpq.order import plan_graph
        from mpq.plan import plan_quant_model

        self.graph = plan_graph(plan, graph)  # the patch stage is a prefix of the plan's order
        self.plan = plan
        self.mixed = plan_quant_model(plan, graph, "mixed")
        self.vdpc = plan.patch.get("vdpc") if plan.patch else None
        self.outlier = plan_quant_model(plan, graph, "outlier") if self.vdpc else None

    def int_outputs(self, x_ir: np.ndarray) -> np.ndarray:
        """Integer first output for a batch of integer inputs in the IR layout."""
        return self.int_output_dict(x_ir)[self.graph.outputs[0]]

    def int_output_dict(self, x_ir: np.ndarray) -> dict[str, np.ndarray]:
        """Integer outputs (every graph output the run gives) for a batch of integer inputs in
        the IR layout."""
        g = self.graph
        name = g.inputs[0]
        if self.vdpc is None:
            return run_int(self.mixed, {name: x_ir})
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
        return run_int(QuantModel(rest, self.mixed.acts, self.mixed.layers), feeds)

    def output_dict(self, batch: np.ndarray) -> Outputs:
        """Integer outputs of one float batch (ONNX layout), each in the ONNX layout."""
        g = self.graph
        name = g.inputs[0]
        xq = quantize_input(self.mixed.acts[name], to_ir_layout(g, name, batch))
        return {o: from_ir_layout(g, o, y) for o, y in self.int_output_dict(xq).items()}

    def outputs(self, batch: np.ndarray) -> np.ndarray:
        """Integer first output of one float batch in the model's (ONNX) input layout."""
        return self.output_dict(batch)[self.graph.outputs[0]]

    def real_outputs(self, batch: np.ndarray) -> Outputs:
        """The dequantised outputs of one float batch (the plan as a `Variant`); outputs are
        computed by the mixed-precision model, whose ActQuant they carry."""
        return dequantised(self.mixed.acts, self.output_dict(batch))

    def predictions(self, data: Dataset, batch_size: int = 64,
                    progress: Progress | None = None) -> np.ndarray:
        preds = []
        for batch in data.batches(batch_size):
            preds.append(top1(self.outputs(batch)))
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
        run = self.variant(qm, bits)
        out = self.graph.outputs[0]
        preds = []
        for batch in data.batches(batch_size):
            preds.append(top1(run(batch)[out]))
            if progress:
                progress(len(batch))
        return np.concatenate(preds)

    def variant(self, qm: QuantModel, bits: int) -> Variant:
        """Every output with every activation at `bits` log levels, as a `Variant` (the log
        levels are fake quantisation: the outputs are real-valued already)."""
        from mpq.quant.logquant import choose_log_levels, run_log_quantised_outputs

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

        def run(batch: np.ndarray) -> Outputs:
            ys = run_log_quantised_outputs(g, quantizers, weights, to_ir_layout(g, name, batch),
                                           input_fq)
            return {o: from_ir_layout(g, o, y) for o, y in ys.items()}

        return run
