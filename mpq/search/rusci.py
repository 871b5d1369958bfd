"""Rusci et al.'s memory-driven bit allocation, the accuracy-blind baseline (search-anchors §1).

"Memory-Driven Mixed Low Precision Quantization for Enabling Deep Network Inference on
Microcontrollers" (Rusci, Capotondi, Benini, MLSys 2020) allocates bits by rules alone: every
tensor starts at 8 bits; wherever a layer's input plus output activations exceed the RAM budget,
the larger of them is cut (8 → 4 → 2), in forward and backward sweeps over the layers; while the
weights exceed Flash, the weight layer with the largest footprint is cut. It has no liveness
model (residual skips, the patch stage) — so, like `solve_vdqs`, a choice that the real planner
still rejects is repaired by lowering the group with the most bytes at the peak step (counted
in `Solution.repaired`), so the baseline always yields a plan that fits.
"""

from __future__ import annotations

from mpq.errors import MpqError
from mpq.ir import Graph
from mpq.search.solvers import Problem, Solution, _peak_group


def _cut(options: tuple[int, ...], bits: int) -> int | None:
    """The next option below `bits` (Rusci halves: 8 → 4 → 2), or None at the floor."""
    lower = [b for b in options if b < bits]
    return max(lower) if lower else None


def solve_rusci(problem: Problem, layers: list[list[str]]) -> Solution:
    """Rusci's rules (MLSys 2020 §4): per layer, Σ Mem(inputs) + Mem(output) ≤ M, cutting the
    largest activation first, forward then backward sweeps until no layer changes; then the
    weights: cut the largest weight layer until Flash ≤ budget.

    `layers` lists, per graph layer, the activation group names among its inputs and output.
    """
    groups = {g.name: g for g in problem.groups}
    choice = {g.name: max(g.options) for g in problem.groups}

    def mem(name: str) -> int:
        g = groups[name]
        bits = 8 if g.sram_free else choice[name]
        return sum(problem.size(t, bits) for t in g.tensors)

    budget = problem.sram_budget
    changed = True
    while changed:
        changed = False
        for sweep in (layers, layers[::-1]):
            for members in sweep:
                while sum(mem(m) for m in members) > budget:
                    lowerable = [m for m in members if not groups[m].sram_free
                                 and _cut(groups[m].options, choice[m]) is not None]
                    if not lowerable:
                        break
                    big = max(sorted(lowerable), key=mem)
                    choice[big] = _cut(groups[big].options, choice[big])  # type: ignore[assignment]
                    changed = True
    weights = [g for g in problem.groups if g.flash]
    while problem.flash_bytes(choice) > problem.flash_budget:
        lowerable = [g for g in weights if _cut(g.options, choice[g.name]) is not None]
        if not lowerable:
            raise MpqError("no weight bitwidths fit the Flash budget")
        big = max(sorted(lowerable, key=lambda g: g.name), key=lambda g: g.flash[choice[g.name]])
        choice[big.name] = _cut(big.options, choice[big.name])  # type: ignore[assignment]
    ranked = {g.name: sorted(g.options, reverse=True) for g in problem.groups}
    pos = {name: ranked[name].index(b) for name, b in choice.items()}
    repaired = 0
    while True:
        bits = problem.tensor_bits(choice)
        arena = problem.arena(bits)
        if arena <= budget:
            break
        culprit = _peak_group(problem, bits, choice, ranked, pos)
        if culprit is None:
            raise MpqError("no bit allocation fits the budget")
        pos[culprit] += 1
        choice[culprit] = ranked[culprit][pos[culprit]]
        repaired += 1
    return Solution(choice, problem.objective(choice), arena, problem.flash_bytes(choice),
                    repaired=repaired)


def layer_groups(graph: Graph, problem: Problem) -> list[list[str]]:
    """Per graph layer (in order), the activation groups among its inputs and outputs — the
    tensors Rusci's per-layer RAM rule counts (the caller's input buffer is not in the arena).
    Views (reshape) impose nothing."""
    owner = {t: g.name for g in problem.groups for t in g.tensors}
    layers = []
    for node in graph.nodes:
        members = sorted({owner[t] for t in (*node.inputs, *node.outputs) if t in owner})
        if node.op != "reshape" and members:
            layers.append(members)
    return layers
