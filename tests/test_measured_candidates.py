"""The measured strategy's candidate set (`mpq.search.measured`): the ILP relaxed where its
liveness rows ask more than the real planner (overlap), and every fitting plan when few fit."""

from __future__ import annotations

from mpq.search import measured as m
from mpq.search.solvers import Group, Problem

OPTIONS = (8, 4, 2)


def _problem(damage: list[dict[int, float]], arena, budget: int) -> Problem:
    """Groups a0, a1, … (one tensor each, t0, t1, …), score = −damage, the given planner."""
    groups = [Group(f"a{i}", (f"t{i}",), OPTIONS, {b: -d[b] for b in OPTIONS},
                    omega=dict(d)) for i, d in enumerate(damage)]
    # One step with every tensor alive: the linear rows count Σ bytes = Σ bits (1 elt each)
    live = [[(g.tensors[0],) for g in groups]]
    return Problem(groups=groups, live=live, size=lambda t, b: b, arena=arena,
                   sram_budget=budget, flash_budget=1 << 30)


DAMAGE = [{8: 0.0, 4: 0.01, 2: 0.5}, {8: 0.0, 4: 0.02, 2: 0.3}, {8: 0.0, 4: 0.05, 2: 0.4}]


def test_relaxed_solve_reaches_what_the_real_planner_fits() -> None:
    """A planner that overlaps (arena = 2/3 of the rows' sum) fits 4+4+4 under 10 while the
    rows (12 > 10) only admit mixed 2-bit plans: the relaxed ILP finds the 4-bit plan."""
    problem = _problem(DAMAGE, lambda bits: (2 * sum(bits.values())) // 3, 10)
    plain = m._solve_once(problem)
    assert sum(plain.values()) <= 10  # the rows' view: some map at 2 bits
    relaxed = m.relaxed_solve(problem)
    assert problem.fits(relaxed)
    assert problem.objective(relaxed) > problem.objective(plain)
    assert m.predicted_damage(problem, relaxed) == min(
        m.predicted_damage(problem, c) for c in m.fitting_choices(problem))


def test_relaxed_solve_is_the_ilp_when_rows_and_planner_agree() -> None:
    problem = _problem(DAMAGE, lambda bits: sum(bits.values()), 12)
    assert m.relaxed_solve(problem) == m._solve_once(problem) == {"a0": 4, "a1": 4, "a2": 4}


def test_fitting_choices_enumerates_exactly_what_fits() -> None:
    problem = _problem(DAMAGE, lambda bits: sum(bits.values()), 10)
    got = m.fitting_choices(problem)
    want = [{"a0": x, "a1": y, "a2": z} for x in OPTIONS for y in OPTIONS for z in OPTIONS
            if x + y + z <= 10]
    assert sorted(map(sorted, (c.items() for c in got))) == \
        sorted(map(sorted, (c.items() for c in want)))
    assert all(problem.fits(c) for c in got)


def test_fitting_choices_gives_up_on_large_spaces() -> None:
    many = [{8: 0.0, 4: 0.01, 2: 0.1}] * 7  # 3^7 > EXHAUSTIVE_SPACE combinations
    assert 3 ** 7 > m.EXHAUSTIVE_SPACE
    assert m.fitting_choices(_problem(many, lambda bits: sum(bits.values()), 40)) is None
    # few combinations but more than EXHAUSTIVE_PLANS of them fit
    roomy = [{8: 0.0, 4: 0.01, 2: 0.1}] * 5  # 243 combinations, all fit
    assert 3 ** 5 > m.EXHAUSTIVE_PLANS
    assert m.fitting_choices(_problem(roomy, lambda bits: sum(bits.values()), 1000)) is None
