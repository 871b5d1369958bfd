"""Bit allocation solvers (DESIGN §7.2–7.3): exact ILP, QuantMCU's Algorithm 1, QBR.

The problem is stated once, independent of where the scores come from (VDQS entropy or the
data-free QE-Score): *groups* of tensors that must share a bitwidth (a pool's output and its
input, a concat's inputs and output) or a layer's weights, each with candidate bitwidths and a
score per candidate; the arena bytes each tensor takes at each bitwidth; which tensors are alive
at every step of the schedule; and the real planner to check a choice against.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import sys
import tempfile
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy.optimize import Bounds, LinearConstraint, milp
from scipy.sparse import lil_matrix

from mpq.errors import MpqError


@dataclass
class Group:
    """Tensors (or one layer's weights) that take one bitwidth together."""

    name: str
    tensors: tuple[str, ...]  # activation tensors; empty for a weight group
    options: tuple[int, ...]  # candidate bits, in decreasing order
    score: dict[int, float]  # objective per option (maximised)
    omega: dict[int, float] = field(default_factory=dict)  # accuracy loss proxy (for QBR)
    flash: dict[int, int] = field(default_factory=dict)  # Flash bytes per option (weights)
    sram_free: bool = False  # its tensors are budgeted at 8 bits whatever it picks (VDPC)


@dataclass
class BitopsTerm:
    """One MAC layer's BitOPs, MACs·b_w·b_a (DESIGN §7.1): each factor is a group's choice, or
    fixed bits when the group is None."""

    macs: float  # MACs, times the patch stage's recomputation factor inside the stage
    act_group: str | None
    act_bits: int  # used when act_group is None
    weight_group: str | None
    weight_bits: int  # used when weight_group is None


@dataclass
class BitopsBudget:
    """Σ_l MACs_l·b_w,l·b_a,l ≤ budget (LIMPQ's BitOPs constraint, search-anchors §2.5)."""

    terms: list[BitopsTerm]
    budget: float

    def total(self, choice: dict[str, int]) -> float:
        return float(sum(t.macs * (choice[t.act_group] if t.act_group else t.act_bits)
                         * (choice[t.weight_group] if t.weight_group else t.weight_bits)
                         for t in self.terms))


@dataclass
class Problem:
    """Everything a solver needs; `bits_of(choice)` expands a choice to per-tensor bits."""

    groups: list[Group]
    live: list[list[tuple[str, ...]]]  # per step: alive buffers, as the tensors alive in each
    size: Callable[[str, int], int]  # aligned arena bytes of a tensor at a bitwidth
    arena: Callable[[dict[str, int]], int]  # the real planner's arena for per-tensor bits
    sram_budget: int  # bytes available to the arena
    flash_budget: int  # bytes available to weights, biases and requantisation parameters
    flash_fixed: int = 0  # Flash bytes that do not depend on the choice
    bitops: BitopsBudget | None = None  # optional BitOPs constraint (`--strategy importance`)
    exclude: tuple[dict[str, int], ...] = ()  # choices `solve_exact` must not return (next-best)
    #: the real planner's placement (`memory.ArenaPlan`) for per-tensor bits, when known
    placement: Callable[[dict[str, int]], Any] | None = None

    def tensor_bits(self, choice: dict[str, int]) -> dict[str, int]:
        bits: dict[str, int] = {}
        for g in self.groups:
            for t in g.tensors:
                bits[t] = 8 if g.sram_free else choice[g.name]
        return bits

    def flash_bytes(self, choice: dict[str, int]) -> int:
        return self.flash_fixed + sum(g.flash.get(choice[g.name], 0) for g in self.groups)

    def objective(self, choice: dict[str, int]) -> float:
        return float(sum(g.score[choice[g.name]] for g in self.groups))

    def fits(self, choice: dict[str, int]) -> bool:
        return self.arena(self.tensor_bits(choice)) <= self.sram_budget \
            and self.flash_bytes(choice) <= self.flash_budget \
            and (self.bitops is None or self.bitops.total(choice) <= self.bitops.budget)


@dataclass
class Solution:
    choice: dict[str, int]
    objective: float
    arena: int
    flash: int
    iterations: int = 1
    repaired: int = 0  # groups lowered after the published algorithm to meet the true planner


#: Lines HiGHS prints on the C stdout even when told to be silent (seen with scipy 1.17's
#: HiGHS: "HighsMipSolverData::transformNewIntegerFeasibleSolution tmpSolver.run();", ERGO-Code/
#: HiGHS#2783). On `mpq search --json` they came before the JSON and broke its readers.
_HIGHS_NOISE = (b"HighsMipSolverData::",)
_STDOUT_LOCK = threading.Lock()


def _flush_c_stdout() -> None:
    """fflush(NULL): the C library buffers what HiGHS printed until then (a pipe or a file is
    fully buffered), so it must reach the redirected descriptor before fd 1 is restored."""
    try:
        ctypes.CDLL(None).fflush(None)
    except (OSError, AttributeError, TypeError):  # no C library to reach (not a POSIX host)
        pass


def drop_solver_noise(text: bytes) -> bytes:
    """`text` without the lines that start with one of `_HIGHS_NOISE`."""
    lines = text.splitlines(keepends=True)
    return b"".join(line for line in lines if not line.startswith(_HIGHS_NOISE))


@contextlib.contextmanager
def solver_stdout_filtered() -> Iterator[None]:
    """Run the body with file descriptor 1 sent to a temporary file, then write what it
    caught, less HiGHS's stray lines (`drop_solver_noise`), to the real descriptor 1. What
    other threads print meanwhile (a progress bar) is kept and only delayed. One body at a
    time: the descriptor is process-wide."""
    with _STDOUT_LOCK:
        try:
            sys.stdout.flush()
        except (AttributeError, ValueError, OSError):
            pass
        try:
            saved = os.dup(1)
        except OSError:  # no descriptor 1 (a detached process): nothing to keep clean
            yield
            return
        with tempfile.TemporaryFile() as caught:
            os.dup2(caught.fileno(), 1)
            try:
                yield
            finally:
                with contextlib.suppress(AttributeError, ValueError, OSError):
                    sys.stdout.flush()
                _flush_c_stdout()
                os.dup2(saved, 1)
                os.close(saved)
                caught.seek(0)
                kept = drop_solver_noise(caught.read())
                while kept:
                    kept = kept[os.write(1, kept):]


def _owner(problem: Problem) -> dict[str, Group]:
    return {t: g for g in problem.groups for t in g.tensors}


def solve_exact(problem: Problem, max_rounds: int = 12) -> Solution:
    """Maximise Σ S(i,b)·x[i,b] subject to one bitwidth per group, Σ_{live at t} Mem ≤ M_t at
    every step (true liveness: residuals and the patch stage included), Flash ≤ budget and,
    when `problem.bitops` is set, BitOPs ≤ its budget (`_bitops_rows`) — an ILP solved by
    HiGHS (`scipy.optimize.milp`), DESIGN §7.2.

    A buffer shared by several tensors (in-place depthwise, reshape views) counts as the max of
    its tensors' sizes through an auxiliary variable. The solution is checked against the real
    planner; if fragmentation pushes the arena over the budget, the liveness bound is bisected
    between the budget and the budget less the excess, keeping the best allocation that fits.
    """
    owner = _owner(problem)
    var: dict[tuple[str, int], int] = {}
    for g in problem.groups:
        for b in g.options:
            var[(g.name, b)] = len(var)
    aux: dict[tuple[int, int], int] = {}
    for t, buffers in enumerate(problem.live):
        for k, tensors in enumerate(buffers):
            if len(tensors) > 1:
                aux[(t, k)] = len(var) + len(aux)
    n = len(var) + len(aux)
    bitops_rows: list[tuple[dict[int, float], float, float]] = []
    if problem.bitops is not None:
        n, bitops_rows = _bitops_rows(problem.bitops, var, n)

    def mem_row(tensor: str) -> dict[int, float]:
        g = owner.get(tensor)
        if g is None:  # not a choice (fixed 8-bit tensor)
            return {-1: float(problem.size(tensor, 8))}
        if g.sram_free:
            return {-1: float(problem.size(tensor, 8))}
        return {var[(g.name, b)]: float(problem.size(tensor, b)) for b in g.options}

    c = np.zeros(n)
    for g in problem.groups:
        for b in g.options:
            c[var[(g.name, b)]] = -g.score[b]
    rows, lo, hi = [], [], []
    for g in problem.groups:  # exactly one option per group
        rows.append({var[(g.name, b)]: 1.0 for b in g.options})
        lo.append(1.0)
        hi.append(1.0)
    for (t, k), j in aux.items():  # aux ≥ each tensor of the shared buffer
        for tensor in problem.live[t][k]:
            row = mem_row(tensor)
            const = row.pop(-1, 0.0)
            rows.append({**{i: -v for i, v in row.items()}, j: 1.0})
            lo.append(const)
            hi.append(np.inf)
    step_rows = []
    for t, buffers in enumerate(problem.live):
        row: dict[int, float] = {}
        const = 0.0
        for k, tensors in enumerate(buffers):
            if len(tensors) > 1:
                row[aux[(t, k)]] = row.get(aux[(t, k)], 0.0) + 1.0
                continue
            for i, v in mem_row(tensors[0]).items():
                if i == -1:
                    const += v
                else:
                    row[i] = row.get(i, 0.0) + v
        step_rows.append((row, const))
    flash_row = {var[(g.name, b)]: float(g.flash[b]) for g in problem.groups
                 for b in g.options if g.flash}
    for choice in problem.exclude:  # no-good cut: at least one group differs from `choice`
        rows.append({var[(g.name, choice[g.name])]: 1.0 for g in problem.groups})
        lo.append(-np.inf)
        hi.append(len(problem.groups) - 1.0)
    n_joint = n - len(var) - len(aux)
    integrality = np.array([1] * len(var) + [0] * (len(aux) + n_joint))
    bounds = Bounds(np.zeros(n), np.array([1.0] * len(var) + [np.inf] * len(aux)
                                          + [1.0] * n_joint))
    def solve(budget: int) -> dict[str, int] | None:
        all_rows = rows + [r for r, _ in step_rows] + ([flash_row] if flash_row else []) \
            + [r for r, _, _ in bitops_rows]
        all_lo = lo + [-np.inf] * len(step_rows) + ([-np.inf] if flash_row else []) \
            + [v for _, v, _ in bitops_rows]
        all_hi = hi + [budget - const for _, const in step_rows] + (
            [problem.flash_budget - problem.flash_fixed] if flash_row else []) \
            + [v for _, _, v in bitops_rows]
        a = lil_matrix((len(all_rows), n))
        for r, row in enumerate(all_rows):
            for i, v in row.items():
                a[r, i] = v
        with solver_stdout_filtered():
            res = milp(c, constraints=LinearConstraint(a.tocsr(), all_lo, all_hi),
                       integrality=integrality, bounds=bounds)
        if res.x is None:
            return None
        return {g.name: max(g.options, key=lambda b, g=g: res.x[var[(g.name, b)]])
                for g in problem.groups}

    choice = solve(problem.sram_budget)
    arena = problem.arena(problem.tensor_bits(choice)) if choice is not None else None
    if arena is not None and arena <= problem.sram_budget:
        return Solution(choice, problem.objective(choice), arena, problem.flash_bytes(choice))
    # The rows count an output written over its dying input as a buffer of its own, so they
    # can refuse allocations the real planner fits (KWS at int8 with its pointwise outputs
    # overlapped). The optimum without the SRAM rows, when the planner fits it, is the answer.
    free = solve(np.inf)
    if free is not None:
        free_arena = problem.arena(problem.tensor_bits(free))
        if free_arena <= problem.sram_budget:
            return Solution(free, problem.objective(free), free_arena, problem.flash_bytes(free))
    if choice is None:
        raise MpqError("no bit allocation fits the budget")
    # The liveness bound is exact per step, but the greedy planner can fragment. Bisect the
    # bound between "tightened by the whole excess" and the budget, keeping the best allocation
    # the real planner accepts.
    best: tuple[float, dict[str, int], int] | None = None
    lo_b, hi_b = max(0, problem.sram_budget - (arena - problem.sram_budget)), problem.sram_budget
    rounds = 1
    for _ in range(max_rounds):
        mid = (lo_b + hi_b) // 2
        rounds += 1
        trial = solve(mid)
        fits = False
        if trial is not None:
            a_mid = problem.arena(problem.tensor_bits(trial))
            fits = a_mid <= problem.sram_budget
            if fits and (best is None or problem.objective(trial) > best[0]):
                best = (problem.objective(trial), trial, a_mid)
        if fits:
            lo_b = mid + 1
        else:
            hi_b = mid - 1
        if lo_b > hi_b:
            break
    if best is None:
        trial = solve(max(0, problem.sram_budget - (arena - problem.sram_budget)))
        if trial is None or problem.arena(problem.tensor_bits(trial)) > problem.sram_budget:
            raise MpqError("the ILP's allocations do not fit the real planner's arena")
        best = (problem.objective(trial), trial, problem.arena(problem.tensor_bits(trial)))
    _, choice, arena = best
    return Solution(choice, problem.objective(choice), arena, problem.flash_bytes(choice),
                    rounds)


def _bitops_rows(bitops: BitopsBudget, var: dict[tuple[str, int], int], n: int
                 ) -> tuple[int, list[tuple[dict[int, float], float, float]]]:
    """The BitOPs constraint as linear rows (lo ≤ row·x ≤ hi) over the ILP's variables.

    MACs·b_w·b_a is bilinear when both bitwidths are choices; as in LIMPQ's ILP (one binary per
    layer and (b_w, b_a) pair, search-anchors §2.5) the pair gets joint variables y[b_w, b_a]
    ∈ [0, 1], here tied to the groups' one-hot choices by Σ_{b_w} y = x_a[b_a] and Σ_{b_a} y =
    x_w[b_w], which forces y = x_w[b_w]·x_a[b_a] without making y integer. Returns the new
    variable count and the rows (the linking equalities, then the budget row).
    """
    options: dict[str, list[int]] = {}
    for (name, b) in var:
        options.setdefault(name, []).append(b)
    rows: list[tuple[dict[int, float], float, float]] = []
    budget_row: dict[int, float] = {}
    const = 0.0
    for term in bitops.terms:
        a, w = term.act_group, term.weight_group
        if a is None and w is None:
            const += term.macs * term.act_bits * term.weight_bits
        elif w is None:
            for b in options[a]:
                i = var[(a, b)]
                budget_row[i] = budget_row.get(i, 0.0) + term.macs * b * term.weight_bits
        elif a is None:
            for b in options[w]:
                i = var[(w, b)]
                budget_row[i] = budget_row.get(i, 0.0) + term.macs * term.act_bits * b
        else:
            joint = {}
            for bw in options[w]:
                for ba in options[a]:
                    joint[(bw, ba)] = n
                    budget_row[n] = term.macs * bw * ba
                    n += 1
            for ba in options[a]:
                rows.append(({**{joint[(bw, ba)]: 1.0 for bw in options[w]}, var[(a, ba)]: -1.0},
                             0.0, 0.0))
            for bw in options[w]:
                rows.append(({**{joint[(bw, ba)]: 1.0 for ba in options[a]}, var[(w, bw)]: -1.0},
                             0.0, 0.0))
    rows.append((budget_row, -np.inf, bitops.budget - const))
    return n, rows


def solve_vdqs(problem: Problem, order: list[str]) -> Solution:
    """QuantMCU Algorithm 1 as published (DESIGN §7.2): every map takes its best-scoring
    bitwidth; forward then backward traversals move the larger map of each adjacent pair whose
    Mem(i)+Mem(i+1) exceeds M to its next-best bitwidth, until every pair fits.

    `order` lists the activation groups in schedule order. The published check ignores true
    liveness; if the real planner still exceeds the budget, the group with the most bytes
    alive at the peak step is lowered to its next-best bitwidth until it fits (counted in
    `repaired`). Weight groups take their best option that Flash allows, largest layer first.
    """
    groups = {g.name: g for g in problem.groups}
    ranked = {g.name: sorted(g.options, key=lambda b, g=g: (-g.score[b], -b))
              for g in problem.groups}
    pos = {name: 0 for name in groups}
    choice = {name: ranked[name][0] for name in groups}

    def mem(name: str) -> int:
        g = groups[name]
        bits = 8 if g.sram_free else choice[name]
        return sum(problem.size(t, bits) for t in g.tensors)

    def lower(name: str) -> bool:
        if pos[name] + 1 >= len(ranked[name]):
            return False
        pos[name] += 1
        choice[name] = ranked[name][pos[name]]
        return True

    budget = problem.sram_budget
    changed = True
    while changed:
        changed = False
        pairs_fwd = list(zip(order[:-1], order[1:], strict=True))
        for pairs in (pairs_fwd, pairs_fwd[::-1]):
            for a, b in pairs:
                while mem(a) + mem(b) > budget:
                    big = a if mem(a) >= mem(b) else b
                    other = b if big == a else a
                    if not lower(big) and not lower(other):
                        break
                    changed = True
    _fit_flash(problem, choice, ranked, pos)
    repaired = 0
    while True:
        bits = problem.tensor_bits(choice)
        arena = problem.arena(bits)
        if arena <= problem.sram_budget:
            break
        culprit = _peak_group(problem, bits, choice, ranked, pos)
        if culprit is None:
            raise MpqError("no bit allocation fits the budget")
        lower(culprit)
        repaired += 1
    return Solution(choice, problem.objective(choice), arena, problem.flash_bytes(choice),
                    repaired=repaired)


def _fit_flash(problem: Problem, choice: dict[str, int], ranked: dict[str, list[int]],
               pos: dict[str, int]) -> None:
    weights = sorted((g for g in problem.groups if g.flash),
                     key=lambda g: (-g.flash[g.options[0]], g.name))
    for g in weights:
        if problem.flash_bytes(choice) <= problem.flash_budget:
            return
        smaller = [b for b in g.options if g.flash[b] < g.flash[choice[g.name]]]
        if smaller:
            choice[g.name] = max(smaller)
            pos[g.name] = ranked[g.name].index(choice[g.name])
    if problem.flash_bytes(choice) > problem.flash_budget:
        raise MpqError("no weight bitwidths fit the Flash budget")


def _peak_group(problem: Problem, bits: dict[str, int], choice: dict[str, int],
                ranked: dict[str, list[int]], pos: dict[str, int]) -> str | None:
    """The lowerable group with the most bytes alive at the step with the most live bytes."""
    owner = _owner(problem)
    totals = []
    for t, buffers in enumerate(problem.live):
        totals.append((sum(max(problem.size(x, bits.get(x, 8)) for x in buf) for buf in buffers),
                       t))
    for _, t in sorted(totals, reverse=True):
        candidates = {}
        for buf in problem.live[t]:
            for x in buf:
                g = owner.get(x)
                if g is not None and not g.sram_free and pos[g.name] + 1 < len(ranked[g.name]):
                    candidates[g.name] = candidates.get(g.name, 0) + problem.size(x, bits[x])
        if candidates:
            return max(sorted(candidates), key=lambda name: candidates[name])
    return None


def refine_bits(problem: Problem, solution: Solution,
                bitops: Callable[[dict[str, int]], int] | None = None,
                bitops_budget: int | None = None) -> tuple[Solution, list[str]]:
    """QBR (DESIGN §7.3): raise bits where the budgets have room, greedily.

    Activation groups (not those whose SRAM VDPC already budgets at 8 bits) are raised one
    step at a time, the raise that recovers the most accuracy proxy Ω first, as long as the
    real planner's arena, Flash and the optional BitOPs budget hold; weight groups are raised
    where Flash has room, largest Ω gain first. Returns the refined solution and a log.
    """
    choice = dict(solution.choice)
    log: list[str] = []
    while True:
        candidates = []
        for g in problem.groups:
            if g.sram_free:
                continue
            higher = [b for b in g.options if b > choice[g.name]]
            if not higher:
                continue
            b_next = min(higher)
            gain = g.omega.get(choice[g.name], 0.0) - g.omega.get(b_next, 0.0)
            candidates.append((-gain, g.name, b_next))
        accepted = False
        for _, name, b_next in sorted(candidates):
            trial = {**choice, name: b_next}
            if not problem.fits(trial):
                continue
            if bitops_budget is not None and bitops is not None \
                    and bitops(problem.tensor_bits(trial)) > bitops_budget:
                continue
            log.append(f"{name}: {choice[name]} → {b_next} bits")
            choice = trial
            accepted = True
            break
        if not accepted:
            break
    arena = problem.arena(problem.tensor_bits(choice))
    return Solution(choice, problem.objective(choice), arena, problem.flash_bytes(choice),
                    solution.iterations, solution.repaired), log
