"""Measured sensitivity (DESIGN §7.4): the damage each bit choice does to the model's outputs,
measured through the bit-exact integer reference on the validation part of the calibration
data, and the damage of whole candidate plans.

The reference is the all-8-bit model (8-bit activations, the weights the search would use at
8 bits). A *variant* changes some tensors' activation bits and some layers' weight bits; only
the layers whose parameters change, and everything downstream of them, run again — the other
tensors come from the reference run, cached once as int8. Damage is summed over every output
(`mpq.fidelity.output_damage`): the KL divergence of the class distribution for classifiers,
the noise-to-signal ratio otherwise. An output produced by Softmax is measured at the
softmax's input (its logits): int8 softmax rounds small probabilities to 0, which makes the KL
of its quantised output a poor, noisy measure.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import fields

import numpy as np

from mpq.fidelity import is_classifier, output_damage
from mpq.interpreter import to_ir_layout
from mpq.ir import Graph, Node
from mpq.quant.qmodel import (
    ActQuant,
    LayerQuant,
    QuantModel,
    activation_quant,
    layer_params,
    weighted_layer,
)
from mpq.quant.weights import QuantizedWeights, WeightSpec, quantize_weights
from mpq.sim import dequantize, quantize_input, run_op

RangeOf = Callable[[str, int], tuple[float, float]]

#: Variants `Probe.prefetch` measures at once: one per core, at most two (each run holds a
#: few network-sized temporaries; the machines mpq targets for search have 2–8 cores).
MEASURE_WORKERS = max(1, min(2, os.cpu_count() or 1))


@contextlib.contextmanager
def one_blas_thread() -> Iterator[None]:
    """BLAS (OpenBLAS, MKL, …) held to one thread of its own for the body: while
    MEASURE_WORKERS Python threads each run numpy, a BLAS that also starts a thread per core
    in every call puts twice as many busy threads as cores on the machine, and they spin
    (MobileNetV2-1.0@224 on 2 cores: the single choices' measurements 12.5 → 7.3 s, the
    search's CPU time 45 → 29 s). The limit is process-wide and restored on exit. The
    integer reference's GEMMs are exact in any summation order (`mpq.sim.conv_float32`), so
    the values do not change."""
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=1, user_api="blas"):
        yield


def measured_tensors(graph: Graph) -> list[tuple[str, bool]]:
    """(tensor, is it a softmax's logits) measured for each graph output: the output itself, or
    the input of the Softmax that produces it."""
    producer = graph.producer()
    out = []
    for t in graph.outputs:
        node = producer.get(t)
        if node is not None and node.op == "softmax":
            out.append((node.inputs[0], True))
        else:
            out.append((t, False))
    return out


class Probe:
    """Damage of bit choices against the all-8-bit model on validation inputs."""

    def __init__(self, graph: Graph, x_val: np.ndarray, range_of: RangeOf,
                 specs: dict[str, WeightSpec]) -> None:
        self.graph = graph
        self.range_of = range_of
        self.specs = specs
        self.samples = len(x_val)
        self.measure = measured_tensors(graph)
        # Logits of a softmax are a class distribution; other outputs by `is_classifier`.
        self.classifier = {t: logits or is_classifier(graph, t) for t, logits in self.measure}
        self.classifier_any = any(self.classifier.values())
        self._weights: dict[tuple[str, int], QuantizedWeights] = {}
        self._layers: dict[tuple, LayerQuant] = {}
        self._single: dict[tuple, float] = {}
        self._memo: dict[tuple, float] = {}
        self._ref_w = {n.name: self._w_bits(n, {}) for n in graph.nodes if n.weight is not None}
        self.runs = 0
        self._readers = _readers(graph)
        for t, _ in self.measure:
            self._readers[t] += 1
        self._pending: dict[tuple, float] = {}  # measured ahead by `prefetch`, not yet asked
        # The measured tensors of every variant run (a few KB each: logits of the validation
        # samples), for `variant_outputs`: the chosen plan's PTQ needs them again.
        self._outputs: dict[tuple, dict[str, np.ndarray]] = {}
        self._float: tuple[dict[str, np.ndarray], dict[str, np.ndarray]] | None = None
        self.x_val = x_val
        self._lock = threading.Lock()
        self.base: QuantModel | None = None  # `model` builds the reference when it is None
        self.base = self.model({}, {})[0]
        name = graph.inputs[0]
        xq = quantize_input(self.base.acts[name], to_ir_layout(graph, name, x_val))
        self.cache = self._reference(xq)
        self.reference = {t: dequantize(self.base.acts[t], self.cache[t]) for t, _ in
                          self.measure}

    # -- models --------------------------------------------------------------------------

    def _quantized(self, node: Node, bits: int) -> QuantizedWeights:
        key = (node.name, bits)
        if key not in self._weights:
            spec = self.specs.get(node.name) or WeightSpec("linear", bits)
            self._weights[key] = quantize_weights(node.weight, spec)
        return self._weights[key]

    def _w_bits(self, node: Node, w_bits: dict[str, int]) -> int:
        spec = self.specs.get(node.name)
        return w_bits.get(node.name, spec.bits if spec else 8)

    def model(self, act_bits: dict[str, int], w_bits: dict[str, int]
              ) -> tuple[QuantModel, set[str]]:
        """The variant with `act_bits` (others 8) and `w_bits` (others at the reference's),
        and the names of the layers whose parameters differ from the reference's."""
        g = self.graph
        ranges = {t: self.range_of(t, act_bits.get(t, 8)) for t in g.tensors}
        acts = activation_quant(g, ranges, act_bits)
        base = self.base
        layers: dict[str, LayerQuant] = {}
        changed: set[str] = set()
        for node in g.nodes:
            wb = self._w_bits(node, w_bits) if node.weight is not None else 0
            same = base is not None and all(acts[t] == base.acts[t]
                                            for t in node.inputs + node.outputs) \
                and (node.weight is None or wb == self._w_bits(node, {}))
            if same:
                layers[node.name] = base.layers[node.name]
                continue
            changed.add(node.name)
            layers[node.name] = self._layer(node, acts, wb)
        return QuantModel(g, acts, layers), changed

    def _layer(self, node: Node, acts: dict[str, ActQuant], wb: int) -> LayerQuant:
        """A changed layer's parameters, built once per (weight bits, input and output
        quantisation): the variants of a search share most of them, and the per-channel
        multipliers are computed in Python."""
        key = (node.name, wb, tuple(acts[t] for t in node.inputs + node.outputs))
        lq = self._layers.get(key)
        if lq is None:
            if node.op in ("conv2d", "fully_connected"):
                lq = weighted_layer(node, acts, self._quantized(node, wb))
            else:
                lq = layer_params(node, acts)
            self._layers[key] = lq
        return lq

    # -- runs ----------------------------------------------------------------------------

    def _reference(self, xq: np.ndarray) -> dict[str, np.ndarray]:
        """Every tensor of the reference run, stored as int8 (all reference tensors are
        8-bit), computed layer by layer so no int64 copy of the whole network is held."""
        g, qm = self.graph, self.base
        env: dict[str, np.ndarray] = {g.inputs[0]: xq}
        cache = {g.inputs[0]: xq.astype(np.int8)}
        remaining = _readers(g)
        for node in g.nodes:
            xs = [env[t] for t in node.inputs]
            y = run_op(node, qm.layers[node.name], qm, xs, g.tensors[node.outputs[0]].shape)
            env[node.outputs[0]] = y
            cache[node.outputs[0]] = y.astype(np.int8)
            for t in node.inputs:
                remaining[t] -= 1
                if remaining[t] == 0:
                    env.pop(t, None)
        return cache

    def outputs(self, qm: QuantModel, changed: set[str]) -> dict[str, np.ndarray]:
        """The measured tensors (dequantised) of a variant: the changed layers and their
        descendants run, everything else comes from the reference cache."""
        g = self.graph
        dirty: dict[str, np.ndarray] = {}
        # A recomputed tensor is dropped after its last reader (the measured ones are kept):
        # a variant near the input would otherwise hold the int64 values of the whole
        # network at once.
        remaining = dict(self._readers)
        started = False
        for node in g.nodes:
            if not started and node.name not in changed:
                continue
            started = True
            if node.name not in changed and not any(t in dirty for t in node.inputs):
                continue
            xs = [dirty[t] if t in dirty else self.cache[t] for t in node.inputs]
            dirty[node.outputs[0]] = run_op(node, qm.layers[node.name], qm, xs,
                                            g.tensors[node.outputs[0]].shape)
            del xs
            for t in node.inputs:
                remaining[t] -= 1
                if remaining[t] <= 0:
                    dirty.pop(t, None)
        return {t: dequantize(qm.acts[t], dirty[t]) if t in dirty else self.reference[t]
                for t, _ in self.measure}

    def cached_outputs(self, qm: QuantModel, xq: np.ndarray) -> dict[str, np.ndarray] | None:
        """The graph outputs (int64) of `run_int(qm, {input: xq})` taken from the reference
        run, when `qm` has exactly the reference's parameters and `xq` is the input it ran on;
        else None."""
        g = self.graph
        name = g.inputs[0]
        ref = self.cache[name]
        if qm.graph is not g or xq.shape != ref.shape or not np.array_equal(xq, ref) \
                or not same_parameters(qm, self.base):
            return None
        return {t: self.cache[t].astype(np.int64) for t in g.outputs}

    def _key(self, act_bits: dict[str, int], w_bits: dict[str, int]) -> tuple:
        return (tuple(sorted((t, b) for t, b in act_bits.items() if b != 8)),
                tuple(sorted((n, b) for n, b in w_bits.items() if b != self._ref_w.get(n))))

    def _measure(self, act_bits: dict[str, int], w_bits: dict[str, int]) -> tuple[float, bool]:
        """The damage of a variant and whether it ran (False: it is the reference); its
        measured tensors are kept for `variant_outputs`."""
        qm, changed = self.model(act_bits, w_bits)
        if not changed:
            return 0.0, False
        outs = self.outputs(qm, changed)
        with self._lock:
            self._outputs[self._key(act_bits, w_bits)] = outs
        return self.damage_against(outs), True

    def damage_against(self, outs: dict[str, np.ndarray],
                       reference: dict[str, np.ndarray] | None = None) -> float:
        """Σ over the measured tensors of `output_damage(reference, outs)` (default
        reference: the all-8-bit model's)."""
        ref = reference or self.reference
        return float(sum(output_damage(ref[t], outs[t], self.classifier[t])
                         for t, _ in self.measure))

    def variant_outputs(self, act_bits: dict[str, int], w_bits: dict[str, int]
                        ) -> dict[str, np.ndarray]:
        """The measured tensors of a variant: those of its measurement when it was measured
        (the same integers a new run gives: the run is deterministic), else a new run (not
        counted in `runs`)."""
        key = self._key(act_bits, w_bits)
        if key not in self._outputs:
            qm, changed = self.model(act_bits, w_bits)
            return self.outputs(qm, changed) if changed else dict(self.reference)
        return self._outputs[key]

    def float_outputs(self) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        """The float model on the validation inputs (IR layout, batches of 64): its measured
        tensors (a softmax's logits, else the output) and its graph outputs. One run, shared
        by the PTQ choice and the plan's fidelity block; only those tensors are kept."""
        if self._float is None:
            from mpq.interpreter import run_graph

            g = self.graph
            name = g.inputs[0]
            wanted = {t for t, _ in self.measure}
            measured: dict[str, list[np.ndarray]] = {t: [] for t in wanted}
            outputs: dict[str, list[np.ndarray]] = {t: [] for t in g.outputs}

            def keep(t: str, value: np.ndarray) -> None:
                if t in wanted:
                    measured[t].append(value)

            for i in range(0, len(self.x_val), 64):
                out = run_graph(g, {name: to_ir_layout(g, name, self.x_val[i:i + 64])},
                                observe=keep)
                for t in g.outputs:
                    outputs[t].append(out[t])
            self._float = ({t: np.concatenate(v) for t, v in measured.items()},
                           {t: np.concatenate(v) for t, v in outputs.items()})
        return self._float

    def damage_of(self, act_bits: dict[str, int], w_bits: dict[str, int]) -> float:
        """Σ over outputs of the damage of a variant (0 for the reference itself); each
        distinct variant runs once (schedules often share a choice)."""
        key = self._key(act_bits, w_bits)
        if key in self._memo:
            return self._memo[key]
        if key in self._pending:
            damage = self._pending.pop(key)
            self.runs += 1
        else:
            damage, ran = self._measure(act_bits, w_bits)
            self.runs += ran
        self._memo[key] = damage
        return damage

    def prefetch(self, variants: list[tuple[dict[str, int], dict[str, int]]]) -> None:
        """Measure the variants not measured yet MEASURE_WORKERS at a time, for `damage_of`
        to take when asked (a cache warmer: what is never asked is never counted in `runs`).

        Threads, not processes: the runs are numpy and BLAS calls on large arrays, which
        release the GIL, and they share the reference cache without copying it. A variant's
        damage does not depend on which others run beside it (each run only reads the cache
        and its own arrays), so the values are those of one at a time."""
        todo, seen = [], set()
        for acts, weights in variants:
            key = self._key(acts, weights)
            if key in self._memo or key in self._pending or key in seen:
                continue
            qm_changes = self.model(acts, weights)[1]
            if qm_changes:
                seen.add(key)
                todo.append((key, acts, weights))
        if MEASURE_WORKERS < 2 or len(todo) < 2:
            return

        def one(job: tuple[tuple, dict[str, int], dict[str, int]]) -> None:
            key, acts, weights = job
            damage, _ = self._measure(acts, weights)
            with self._lock:
                self._pending[key] = damage

        with one_blas_thread(), ThreadPoolExecutor(MEASURE_WORKERS) as pool:
            list(pool.map(one, todo))

    def group_damage(self, tensors: tuple[str, ...], bits: int) -> float:
        """Damage of one tie group of activations at `bits`, everything else at 8."""
        key = ("a", tensors, bits)
        if key not in self._single:
            self._single[key] = 0.0 if bits >= 8 else \
                self.damage_of({t: bits for t in tensors}, {})
        return self._single[key]

    def weight_damage(self, node: str, bits: int) -> float:
        """Damage of one layer's weights at `bits`, everything else at the reference."""
        key = ("w", node, bits)
        if key not in self._single:
            self._single[key] = self.damage_of({}, {node: bits})
        return self._single[key]


def same_parameters(a: QuantModel, b: QuantModel) -> bool:
    """Whether two QuantModels of one graph carry the same activation quantisation and the same
    integer parameters in every layer (arrays compared by value)."""
    if a.acts != b.acts or a.layers.keys() != b.layers.keys():
        return False
    for name, la in a.layers.items():
        lb = b.layers[name]
        for f in fields(la):
            va, vb = getattr(la, f.name), getattr(lb, f.name)
            if isinstance(va, np.ndarray) or isinstance(vb, np.ndarray):
                if va is None or vb is None or not np.array_equal(va, vb):
                    return False
            elif isinstance(va, dict) or isinstance(vb, dict):
                if va is None or vb is None or va.keys() != vb.keys() or not all(
                        np.array_equal(va[k], vb[k]) for k in va):
                    return False
            elif va != vb:
                return False
    return True


def _readers(graph: Graph) -> dict[str, int]:
    """How many nodes read each tensor (outputs get one more, so they are never freed)."""
    count = {t: 0 for t in graph.tensors}
    for n in graph.nodes:
        for t in n.inputs:
            count[t] += 1
    for t in graph.outputs:
        count[t] += 1
    return count

