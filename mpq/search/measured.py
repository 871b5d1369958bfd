"""The measured-sensitivity strategy (DESIGN §7.4): an ILP over measured damage, then whole
candidate plans measured and the best one kept.

Per patch schedule:
1. every activation group's and weight group's score is minus its measured damage
   (`Probe.group_damage` / `weight_damage`, each choice alone, the rest at 8 bits); the exact
   ILP (`solve_exact`: true-liveness SRAM rows, Flash) minimises the summed damage;
2. the candidates — that solution, the ILP's solutions at a ladder of smaller budgets, uniform
   4-bit activations and all-8-bit (when they fit) — are measured as whole plans;
3. interactions: damage is not additive (two 2-bit maps side by side cost more than the sum).
   For a few rounds, the options the best plan chose below 8 bits have their damage scaled by
   measured/predicted and the ILP is solved again; each new solution is measured; then the
   ILP's next-best solutions (no-good cuts on the best plan so far) are measured too;
4. measured QBR: raises that still fit are tried, the largest predicted gain first, and kept
   when the measured damage does not grow — the plan uses its budget.

Every ILP solve here is relaxed (`relaxed_solve`): the rows cannot credit overlap, the real
planner can. When few plans fit (`fitting_choices`) each is measured after step 2, so small
choice spaces get their measured optimum, exactly monotone in the budget per schedule.

The ladder makes the choice (nearly) monotone in the budget: a budget B considers the ILP
solutions at every ladder point in [B·LADDER_LOW, B], and ladder points are a fixed geometric
grid anchored at the schedule's floor (independent of B), so a larger budget sees the
candidates of a smaller one (within the window).
"""

from __future__ import annotations

import itertools
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from mpq.errors import MpqError
from mpq.fidelity import fidelity_summary
from mpq.interpreter import from_ir_layout, run_graph, to_ir_layout
from mpq.ir import Graph
from mpq.search.sensitivity import MEASURE_WORKERS, Probe, one_blas_thread
from mpq.search.solvers import Group, Problem, Solution, solve_exact
from mpq.sim import dequantize, quantize_input, run_int

LADDER_STEP = 1.05
LADDER_LOW = 0.6
INTERACTION_ROUNDS = 3
QBR_TRIES = 3
NEXT_SOLUTIONS = 2
RELAX_ROUNDS = 5
EXHAUSTIVE_SPACE = 729  # choices enumerated against the real planner (3^6; ~1 ms each)
EXHAUSTIVE_PLANS = 64  # fitting choices measured, every one, when no more fit


def weight_node(group: Group) -> str | None:
    """The layer of a weight group (`weights:NAME`), None for an activation group."""
    return group.name[len("weights:"):] if group.name.startswith("weights:") else None


def binding_tensors(problem: Problem) -> set[str]:
    """Tensors alive at a step whose live buffers exceed the SRAM budget with every tensor at
    8 bits (a shared buffer counted at its largest tensor): only lowering these can help the
    budget, so only their groups need measuring.

    Unless the real planner says otherwise: its arena can exceed every step's live bytes
    (a long-lived buffer placed above short ones), and then lowering a tensor of no such step
    can still lower the peak — on KWS DS-CNN's pooled stage at 4,832 B, uniform 4-bit fits only
    with the last depthwise pair lowered too. So when the arena with the binding groups at
    their smallest bits and the others at 8 is larger than with every group at its smallest,
    the tensors alive while the topmost buffers of that placement are count too."""
    out: set[str] = set()
    for buffers in problem.live:
        total = sum(max(problem.size(t, 8) for t in buf) for buf in buffers)
        if total > problem.sram_budget:
            out |= {t for buf in buffers for t in buf}
    rest = [g for g in problem.groups if weight_node(g) is None and not g.sram_free
            and len(g.options) > 1 and not out & set(g.tensors)]
    if out and rest and problem.placement is not None:
        low = {g.name: min(g.options) for g in problem.groups}
        part = problem.tensor_bits({**low, **{g.name: max(g.options) for g in rest}})
        if problem.arena(part) > problem.arena(problem.tensor_bits(low)):
            plan = problem.placement(part)
            steps = {t for b in plan.buffers if plan.offsets[b.name] + b.size == plan.size
                     for s in b.segments for t in range(s.first, s.last + 1)}
            out |= {t for step in sorted(steps) for buf in problem.live[step] for t in buf}
    return out


def rescore(problem: Problem, probe: Probe) -> Problem:
    """The problem with every group's score = −damage and Ω = damage (DESIGN §7.4).

    An activation group none of whose tensors is alive at a binding step
    (`binding_tensors`) keeps only 8 bits, unmeasured: lowering it saves no byte any budget
    needs, so the ILP would never pick it (it only costs damage) — on MobileNetV2 this skips
    most of the network. Weight groups are measured (Flash binds on the whole sum)."""
    binding = binding_tensors(problem)
    probe.prefetch(single_variants(problem, binding))
    groups = []
    for g in problem.groups:
        node = weight_node(g)
        if node is not None:
            damage = {b: probe.weight_damage(node, b) for b in g.options}
        elif 8 in g.options and (g.sram_free or not binding & set(g.tensors)):
            groups.append(replace(g, options=(8,), score={8: 0.0}, omega={8: 0.0}))
            continue
        else:
            damage = {b: probe.group_damage(g.tensors, b) for b in g.options}
        groups.append(replace(g, score={b: -d for b, d in damage.items()}, omega=damage))
    return replace(problem, groups=groups)


def single_variants(problem: Problem, binding: set[str]
                    ) -> list[tuple[dict[str, int], dict[str, int]]]:
    """The single-choice variants `rescore` measures (as `Probe.damage_of` arguments), for
    `Probe.prefetch` to measure them side by side first."""
    out = []
    for g in problem.groups:
        node = weight_node(g)
        if node is not None:
            out += [({}, {node: b}) for b in g.options]
        elif not (8 in g.options and (g.sram_free or not binding & set(g.tensors))):
            out += [({t: b for t in g.tensors}, {}) for b in g.options if b < 8]
    return out


def choice_bits(problem: Problem, choice: dict[str, int]
                ) -> tuple[dict[str, int], dict[str, int]]:
    """A choice as the bits the model runs at: every group tensor at its group's bits (also
    those VDPC budgets at 8), and each weight group's layer at its bits."""
    acts: dict[str, int] = {}
    weights: dict[str, int] = {}
    for g in problem.groups:
        node = weight_node(g)
        if node is not None:
            weights[node] = choice[g.name]
        else:
            for t in g.tensors:
                acts[t] = choice[g.name]
    return acts, weights


def predicted_damage(problem: Problem, choice: dict[str, int]) -> float:
    """Σ of the single-choice damages (the ILP's objective, negated)."""
    return float(sum(g.omega.get(choice[g.name], 0.0) for g in problem.groups))


@dataclass
class Measured:
    """The best measured plan of one schedule."""

    choice: dict[str, int]
    damage: float  # measured, Σ over outputs
    predicted: float  # Σ of single-choice damages
    candidates: int  # distinct plans measured
    log: list[str] = field(default_factory=list)


class _Pool:
    """Measured candidates of one problem, each measured once."""

    def __init__(self, problem: Problem, probe: Probe) -> None:
        self.problem, self.probe = problem, probe
        self.seen: dict[tuple, float] = {}
        self.best: tuple[float, tuple, dict[str, int]] | None = None  # damage, key, choice
        self._best_rank: tuple | None = None

    def add(self, choice: dict[str, int]) -> float:
        key = tuple(sorted(choice.items()))
        if key not in self.seen:
            acts, weights = choice_bits(self.problem, choice)
            self.seen[key] = self.probe.damage_of(acts, weights)
            # Ties: more bits in total (the budget used), then the key, for determinism.
            rank = (self.seen[key], -sum(choice.values()), key)
            if self._best_rank is None or rank < self._best_rank:
                self._best_rank, self.best = rank, (self.seen[key], key, dict(choice))
        return self.seen[key]


def _solve(problem: Problem, budget: int | None = None) -> dict[str, int] | None:
    """The ILP's choice under `budget` (default: the problem's), relaxed (`relaxed_solve`)."""
    return relaxed_solve(problem if budget is None else replace(problem, sram_budget=budget))


def _solve_once(problem: Problem) -> dict[str, int] | None:
    try:
        return solve_exact(problem).choice
    except MpqError:
        return None


def rows_peak(problem: Problem, choice: dict[str, int]) -> int:
    """The ILP's view of a choice's arena: the largest Σ over a step's live buffers (a shared
    buffer at its largest tensor), as `solve_exact`'s liveness rows count it."""
    bits = problem.tensor_bits(choice)
    return max((sum(max(problem.size(t, bits.get(t, 8)) for t in buf) for buf in step)
                for step in problem.live), default=0)


def relaxed_solve(problem: Problem) -> dict[str, int] | None:
    """The ILP's best choice the real planner fits under `problem.sram_budget`.

    The ILP's liveness rows count an output written over its dying input (`--overlap`) as two
    buffers, so they ask more than the real planner (`problem.arena`) does: on KWS at 6,955 B
    uniform 4-bit fits the planner (6,173 B with I/O) while the rows only admit a 2-bit plan
    whose measured damage is 22× larger. So, when the ILP's choice leaves room in the real
    arena, its row bound is raised by bisection (up to 2× the budget, RELAX_ROUNDS solves) and
    the choice of highest objective that the real planner still fits under the true budget is
    kept. Without overlap the rows are exact per step and the first solve usually stands."""
    choice = _solve_once(problem)
    budget = problem.sram_budget
    if choice is None:
        return None
    arena = problem.arena(problem.tensor_bits(choice))
    if arena >= budget or rows_peak(problem, choice) <= arena:
        return choice  # no room in the arena, or the rows count what the planner does
    best = (problem.objective(choice), choice)
    lo, hi = budget, 2 * budget
    for _ in range(RELAX_ROUNDS):
        mid = (lo + hi) // 2
        trial = _solve_once(replace(problem, sram_budget=mid))
        if trial is not None and problem.fits(trial):
            if problem.objective(trial) > best[0]:
                best = (problem.objective(trial), trial)
            lo = mid
        else:
            hi = mid
    return best[1]


def ladder(floor_arena: int, budget: int) -> list[int]:
    """Arena budgets f·1.05^k (f the schedule's floor arena) within [LADDER_LOW·budget,
    budget): fixed points independent of the budget (see the module docstring)."""
    out = []
    b = float(max(floor_arena, 1))
    while b < budget:
        if b >= LADDER_LOW * budget:
            out.append(int(b))
        b *= LADDER_STEP
    return out


def uniform(problem: Problem, bits: int) -> dict[str, int] | None:
    """Every activation group at `bits` (its nearest option at or above), weights at their
    largest option; None unless it fits."""
    choice = {}
    for g in problem.groups:
        if weight_node(g) is not None:
            choice[g.name] = max(g.options)
        else:
            above = [b for b in g.options if b >= bits]
            choice[g.name] = min(above) if above else max(g.options)
    return choice if problem.fits(choice) else None


def fitting_choices(problem: Problem) -> list[dict[str, int]] | None:
    """Every choice the real planner (and Flash) fits, when the groups with a choice span at
    most EXHAUSTIVE_SPACE combinations and at most EXHAUSTIVE_PLANS of them fit; else None.

    The ILP ranks by the *sum* of single-choice damages, which misses interactions, and its
    liveness rows cannot credit overlap; when the space is this small, measuring each fitting
    plan is cheap (each run starts at its first changed layer) and finds the measured best.
    On the Fashion example at 13,024 B four groups have a choice and 18 of the 81 fit."""
    free = [g for g in problem.groups if len(g.options) > 1]
    space = 1
    for g in free:
        space *= len(g.options)
    if space > EXHAUSTIVE_SPACE:
        return None
    base = {g.name: g.options[0] for g in problem.groups}
    out = []
    for combo in itertools.product(*(g.options for g in free)):
        choice = {**base, **{g.name: b for g, b in zip(free, combo, strict=True)}}
        if problem.fits(choice):
            out.append(choice)
            if len(out) > EXHAUSTIVE_PLANS:
                return None
    return out


def initial(problem: Problem, solution: Solution, probe: Probe) -> _Pool:
    """A pool holding the ILP's solution at the full budget (one measurement)."""
    pool = _Pool(problem, probe)
    pool.add(solution.choice)
    return pool


def refine(pool: _Pool, floor: dict[str, int], qbr: bool = True) -> Measured:
    """Steps 2–4 of the module docstring on one schedule's pool (step 4 only with `qbr`)."""
    problem, log = pool.problem, []
    if pool.best[0] == 0.0:  # the all-8-bit reference fits: nothing can measure better
        return Measured(pool.best[2], 0.0, 0.0, len(pool.seen), log)
    floor_arena = problem.arena(problem.tensor_bits(floor))
    # The ladder's solutions and the uniform plans do not depend on any measurement: they
    # are measured side by side first (`Probe.prefetch`), then pooled in this order.
    first = [_solve(problem, point) for point in ladder(floor_arena, problem.sram_budget)]
    first += [uniform(problem, bits) for bits in (8, 4)]
    first = [choice for choice in first if choice is not None]
    pool.probe.prefetch([choice_bits(problem, choice) for choice in first])
    for choice in first:
        pool.add(choice)
    small = fitting_choices(problem)
    if small is not None:  # few enough to measure every one: the measured optimum
        pool.probe.prefetch([choice_bits(problem, c) for c in small])
        for choice in small:
            pool.add(choice)
        log.append(f"every fitting choice measured ({len(small)})")
    for _ in range(INTERACTION_ROUNDS):
        damage, _, best = pool.best
        predicted = predicted_damage(problem, best)
        if predicted <= 0 or damage <= predicted:
            break
        ratio = damage / predicted
        groups = [replace(g, score={b: s * ratio if b == best[g.name] and b < max(g.options)
                                    else s for b, s in g.score.items()})
                  for g in problem.groups]
        choice = _solve(replace(problem, groups=groups))
        if choice is None or tuple(sorted(choice.items())) in pool.seen:
            break
        new = pool.add(choice)
        log.append(f"interaction round: measured {damage:.5f} vs predicted {predicted:.5f}; "
                   f"re-solved → {new:.5f}")
    excluded: list[dict[str, int]] = []
    for _ in range(NEXT_SOLUTIONS):  # the ILP's next-best solutions under the full budget
        excluded.append(pool.best[2])
        choice = _solve(replace(problem, exclude=tuple(excluded)))
        if choice is None:
            break
        pool.add(choice)
    if qbr:
        _measured_qbr(pool, log)
    damage, _, best = pool.best
    return Measured(best, damage, predicted_damage(problem, best), len(pool.seen), log)


def _measured_qbr(pool: _Pool, log: list[str]) -> None:
    """Raise bits where the budgets have room while the measured damage does not grow."""
    problem = pool.problem
    while True:
        damage, _, best = pool.best
        raises = []
        for g in problem.groups:
            higher = [b for b in g.options if b > best[g.name]]
            if not higher:
                continue
            trial = {**best, g.name: min(higher)}
            if problem.fits(trial):
                gain = g.omega.get(best[g.name], 0.0) - g.omega.get(min(higher), 0.0)
                raises.append((-gain, g.name, trial))
        if not raises:
            return
        improved = False
        tries = sorted(raises, key=lambda r: r[:2])[:QBR_TRIES]
        # the first tries side by side; the loop below asks for them in order
        pool.probe.prefetch([choice_bits(problem, t[2]) for t in tries[:MEASURE_WORKERS]])
        for _, name, trial in tries:
            before = pool.best[0]
            after = pool.add(trial)
            if after <= before:
                log.append(f"{name}: {best[name]} → {trial[name]} bits (measured "
                           f"{before:.5f} → {after:.5f})")
                improved = True
                break
        if not improved:
            return


def plan_fidelity(plan, graph: Graph, x_val: np.ndarray, classifier: bool, damage: float,
                  probe: Probe | None = None) -> dict[str, Any]:
    """`predicted.fidelity` (DESIGN §7.4): the plan and its all-8-bit model against float on
    the validation samples, every output (`fidelity_summary`), through the integer reference
    exactly as the firmware runs (`PlanRunner`, VDPC included), and the measured damage.
    `classifier` says whether a one-output model's output is a class distribution (the probe
    counts softmax logits); with several outputs each is judged by `is_classifier`. With
    `probe`, the all-8-bit outputs come from its reference run when it ran that very model
    on these inputs (`Probe.cached_outputs`)."""
    from mpq.evaluate import PlanRunner, plan_int8_ranges
    from mpq.fidelity import is_classifier
    from mpq.quant.qmodel import quantize_graph

    runner = PlanRunner(plan, graph)
    int8 = quantize_graph(graph, plan_int8_ranges(plan))
    name = graph.inputs[0]
    classes = {o: is_classifier(graph, o) for o in graph.outputs} if len(graph.outputs) > 1 \
        else {graph.outputs[0]: classifier}
    # The float reference and the plan run side by side (numpy releases the GIL; neither
    # depends on the other). The float outputs are the probe's float run when these are its
    # inputs (`Probe.float_outputs`: the PTQ choice ran it already).
    with one_blas_thread(), ThreadPoolExecutor(2) as pool:
        plan_run = pool.submit(runner.output_dict, x_val)
        if probe is not None and x_val.shape == probe.x_val.shape \
                and np.array_equal(x_val, probe.x_val):
            floats = probe.float_outputs()[1]
        else:
            refs = [run_graph(graph, {name: to_ir_layout(graph, name, x_val[i:i + 64])})
                    for i in range(0, len(x_val), 64)]
            floats = {o: np.concatenate([r[o] for r in refs]) for o in graph.outputs}
        mixed = plan_run.result()
    xq = quantize_input(int8.acts[name], to_ir_layout(graph, name, x_val))
    eight = probe.cached_outputs(int8, xq) if probe is not None else None
    if eight is None:
        eight = run_int(int8, {name: xq})
    outputs, int8_out = {}, {}
    for out in graph.outputs:
        ref = from_ir_layout(graph, out, floats[out])
        y = dequantize(runner.mixed.acts[out], mixed[out])
        y8 = dequantize(int8.acts[out], from_ir_layout(graph, out, eight[out]))
        outputs[out] = _rounded(fidelity_summary(ref, y, classes[out]))
        int8_out[out] = _rounded(fidelity_summary(ref, y8, classes[out]))
    return {"samples": int(len(x_val)),
            "data": "samples of --data (the search saw them; not a held-out accuracy)",
            "damage": round(float(damage), 9), "outputs": outputs, "int8": int8_out}


def _rounded(summary: dict[str, Any]) -> dict[str, Any]:
    return {k: round(v, 6) if isinstance(v, float) else v for k, v in summary.items()}
