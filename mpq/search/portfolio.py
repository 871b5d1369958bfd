"""Accuracy-first choice of the default search's plan (issue 13, DESIGN §7.4): the measured
strategy's plan competes with the plans the other strategies find under the same budgets, and
the plan that measures closest to the float model on the calibration samples is kept.

Why: the measured search minimises a smooth damage (the KL divergence of the class
distribution against the int8 model) summed from single choices, refined on a few whole
plans; a plan that another strategy finds (a different patch schedule, LIMPQ's step sizes, the
entropy ILP, uniform 4-bit) can keep more top-1 decisions although the smooth measure ranks it
lower (Fashion example at 0.85× of the int8 need: the measured plan keeps 94.5 % of float's
top-1 decisions on the 256 calibration images, the others 95.7 %, and 91.2 % vs 91.6 % on the
test set). So every candidate is run as the firmware runs it (`PlanRunner`, VDPC included) on
the selection samples, and ranked by

    (Σ over classifier outputs of the samples whose top-1 agrees with float,
     − the measured damage against int8 on the probe's samples (`Probe.damage_of`)),

the first key the one the user judges a classifier by, the second the smooth measure that
separates plans with equal agreement (and ranks non-classifiers alone). Ties keep the earlier
candidate: the measured strategy's own plan first.

The selection samples are the calibration data (never `mpq eval`'s data): all of it, up to
SELECT_MACS multiply-accumulates per plan. Models above PORTFOLIO_MACS per sample skip the
alternatives (each is a whole search): MobileNetV2-1.0@224 keeps the measured plan alone.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from mpq.fidelity import is_classifier
from mpq.interpreter import from_ir_layout, run_graph, to_ir_layout
from mpq.ir import Graph
from mpq.sim import dequantize

#: The other strategies whose plans the default measures against its own, in order (ties keep
#: the earlier): label, strategy, activation bits (None: the user's).
ALTERNATIVES: tuple[tuple[str, str, tuple[int, ...] | None], ...] = (
    ("importance", "importance", None),
    ("exact", "exact", None),
    ("qe", "qe", None),
    ("vdqs", "vdqs", None),
    ("rusci", "rusci", None),
    ("uniform 4-bit", "exact", (4,)),
)
#: Multiply-accumulates per sample above which the alternatives are not searched.
PORTFOLIO_MACS = 60 * 10**6
#: Multiply-accumulates per candidate plan the selection run spends at most.
SELECT_MACS = 8 * 10**9
MAX_SELECT = 1024


def portfolio_applies(macs_per_sample: int) -> bool:
    """Whether the alternatives are searched: small models only (each is a whole search)."""
    return macs_per_sample <= PORTFOLIO_MACS


def selection_count(macs_per_sample: int, available: int) -> int:
    """How many calibration samples each candidate plan runs on: SELECT_MACS / MACs, at most
    MAX_SELECT and what there is."""
    return int(min(available, MAX_SELECT, max(1, SELECT_MACS // max(macs_per_sample, 1))))


def plan_key(plan) -> str:
    """What a plan computes (tensors, layers, patches, schedule): plans equal in it are the
    same candidate, however they were searched."""
    data = json.loads(plan.to_json())
    return json.dumps({k: data[k] for k in ("tensors", "layers", "patch", "schedule")},
                      sort_keys=True)


@dataclass
class Judge:
    """The float model's top-1 on the selection samples, to score candidate plans against."""

    graph: Graph
    x: np.ndarray
    classes: dict[str, bool]
    float_top1: dict[str, np.ndarray]

    @classmethod
    def build(cls, graph: Graph, x: np.ndarray, classifier_one: bool) -> Judge:
        """Float outputs of `x` (batches of 64); `classifier_one` says whether a one-output
        model is a classifier (the probe's view: softmax logits count)."""
        name = graph.inputs[0]
        classes = {o: is_classifier(graph, o) for o in graph.outputs} \
            if len(graph.outputs) > 1 else {graph.outputs[0]: classifier_one}
        tops: dict[str, list[np.ndarray]] = {o: [] for o in graph.outputs if classes[o]}
        for i in range(0, len(x), 64):
            ref = run_graph(graph, {name: to_ir_layout(graph, name, x[i:i + 64])})
            for o in tops:
                y = from_ir_layout(graph, o, ref[o])
                tops[o].append(y.reshape(len(y), -1).argmax(axis=1))
        return cls(graph, x, classes, {o: np.concatenate(v) for o, v in tops.items()})

    def agreement(self, plan) -> int:
        """Σ over classifier outputs of the samples whose argmax equals float's, the plan run
        through the integer reference exactly as the firmware runs it."""
        if not self.float_top1:
            return 0
        from mpq.evaluate import PlanRunner

        runner = PlanRunner(plan, self.graph)
        total = 0
        for i in range(0, len(self.x), 256):
            out = runner.output_dict(self.x[i:i + 256])
            for o, top in self.float_top1.items():
                y = dequantize(runner.mixed.acts[o], out[o])
                y = y.reshape(len(y), -1)
                total += int((y.argmax(axis=1) == top[i:i + 256]).sum())
        return total


@dataclass
class Candidate:
    label: str
    result: Any  # SearchResult
    agree: int
    damage: float

    def rank(self) -> tuple[int, float]:
        return (self.agree, -round(self.damage, 12))

    def record(self, samples: int) -> dict[str, Any]:
        return {"from": self.label, "top1_agreement": round(self.agree / samples, 6)
                if samples else None, "damage": round(float(self.damage), 9)}


def choose(own: Any, alternatives: Callable[[], list[tuple[str, Any]]], judge: Judge,
           damage_of: Callable[[Any], float], say: Callable[[str], None]
           ) -> tuple[Candidate, list[Candidate]]:
    """The best measured of the measured strategy's result `own` and the `alternatives`'
    results (see the module docstring); every distinct plan measured once. Returns the winner
    and all candidates in order."""
    seen: set[str] = set()
    cands: list[Candidate] = []
    per_output = max(len(judge.float_top1), 1)

    def add(label: str, result: Any) -> None:
        key = plan_key(result.plan)
        if key in seen:
            return
        seen.add(key)
        c = Candidate(label, result, judge.agreement(result.plan), damage_of(result.plan))
        cands.append(c)
        say(f"selection: {label}: top-1 agreement {c.agree / (len(judge.x) * per_output):.4f}"
            f", damage {c.damage:.5f}")

    add("measured", own)
    for label, result in alternatives():
        add(label, result)
    best = cands[0]
    for c in cands[1:]:
        if c.rank() > best.rank():
            best = c
    return best, cands
