"""Accuracy against SRAM (issue 13): every strategy at budgets from the int8 need down to the
smallest plan, on the KWS clips, the bundled Fashion example CNN and the suite's own
Fashion-MNIST CNN, plus the `make demo` plan.

    python benchmarks/run.py pareto

Budgets: the int8 need (the smallest SRAM `--strategy int8 --patches auto` fits), fractions
of it down to 0.35×, and the smallest budget any plan fits (the measured search's own error
names it). At each budget every strategy searches under the same SRAM (the board's Flash),
and its plan's top-1 is measured on the test set through the integer reference (`mpq eval`),
which no search saw. The best accuracy per budget is marked *. Targets (issue 13): the
default (`measured`) is best or within 0.3 pp of the best everywhere; its accuracy never
drops as the budget grows; KWS ≥ 90.0 % and Fashion ≥ 91.9 % at 0.5×; Fashion within 1 pp of
float at 0.35×; the demo plan at 14,000 B keeps ≥ 91.5 %.

The example's test.npz holds 1,000 images, so one image is 0.1 pp; the default's plans are
also measured on the whole Fashion-MNIST test split (10,000 images, test.npz's among them)
and its budget steps read there too.
"""

from __future__ import annotations

import re
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
from common import console, show
from fashion_train import load_split
from paper_tables import (
    REPO,
    Loaded,
    Task,
    fashion_task,
    kws_task,
    load_task,
    paired_gap,
    plan_accuracy,
    plan_correct,
    plan_tie_credit,
)

from mpq.boards import get_board
from mpq.errors import MpqError
from mpq.evaluate import accuracy, float_predictions
from mpq.quant.calibrate import load_dataset
from mpq.search.driver import SearchOptions, search

FRACTIONS = (1.0, 0.85, 0.7, 0.6, 0.5, 0.42, 0.35)
TINY = 64  # a budget nothing fits: the error names the true minimum
# The int8 need as mpq computed it when issue 13 was filed (before outputs were written over
# their dying inputs and the graph's input/outputs moved into the arena): its targets' 0.5×
# and 0.35× were fractions of these. Both readings are reported.
FILING_NEED = {"KWS DS-CNN": 18_448, "Fashion example CNN": 26_048}
FILING_FRACTIONS = (0.5, 0.35)


def filing_budgets(model: str) -> dict[int, float]:
    """The issue's filing-time budgets of `model` (budget → fraction of the filing need)."""
    need = FILING_NEED.get(model)
    return {} if need is None else {int(need * f): f for f in FILING_FRACTIONS}


def strategies() -> list[tuple[str, SearchOptions]]:
    """The default, the other searches, and the two simple plans the issue compares."""
    base = SearchOptions()
    return [("measured (default)", base),
            ("exact", replace(base, strategy="exact")),
            ("vdqs", replace(base, strategy="vdqs")),
            ("qe", replace(base, strategy="qe")),
            ("importance", replace(base, strategy="importance")),
            ("rusci", replace(base, strategy="rusci")),
            ("uniform 4-bit", replace(base, strategy="exact", bits=(4,))),
            ("int8 + patches", replace(base, strategy="int8"))]


def _needed(task: Task, t, opts: SearchOptions) -> int:
    """The smallest SRAM the search says `opts` needs (its BudgetError at a tiny budget)."""
    try:
        search(task.model, t.graph, get_board(task.board), t.calib, replace(opts, sram=TINY))
    except MpqError as exc:
        found = re.search(r"needs at least ([\d,]+) B SRAM", str(exc))
        if found:
            return int(found.group(1).replace(",", ""))
        raise
    raise MpqError(f"{task.label}: {TINY} B of SRAM was enough")


def sweep(task: Task, whole: Path | None = None) -> dict:
    """Every strategy at every budget of one task. `whole`: a larger test set (the Fashion
    example's whole test split) the default's plans are also measured on, as `whole`."""
    t = load_task(task, task.sweep_test)
    wide = None if whole is None else Loaded(task, t.graph, t.calib, load_dataset(whole, t.graph))
    default_plans = []  # the default's plan per budget, budgets descending (None: no plan)
    board = get_board(task.board)
    floats = accuracy(float_predictions(task.model, t.graph, t.test), t.test.y)
    int8_need = _needed(task, t, SearchOptions(strategy="int8"))
    minimum = _needed(task, t, SearchOptions())
    filing = {b: f for b, f in filing_budgets(task.label).items() if b >= minimum}
    budgets = sorted({int(int8_need * f) for f in FRACTIONS if int8_need * f >= minimum}
                     | {minimum} | set(filing), reverse=True)
    rows = []
    default_correct = []  # the default's per-sample top-1, budgets descending
    for budget in budgets:
        correct = {}
        for name, opts in strategies():
            t0 = time.perf_counter()
            try:
                plan = search(task.model, t.graph, board, t.calib, replace(opts, sram=budget)).plan
            except MpqError as exc:
                rows.append({"budget": budget, "strategy": name, "accuracy": None,
                             "error": str(exc)[:120]})
                if name == "measured (default)":
                    default_plans.append(None)
                continue
            seconds = time.perf_counter() - t0
            if name == "measured (default)":
                default_plans.append(plan)
            correct[name] = plan_correct(plan, t)
            acc = plan_accuracy(plan, t)
            credit = plan_tie_credit(plan, t)
            rows.append({"budget": budget, "fraction": round(budget / int8_need, 3),
                         "strategy": name, "accuracy": acc, "seconds": round(seconds, 2),
                         "tie_split_accuracy": round(float(credit.mean()), 6),
                         "tied_samples": int(((credit > 0) & (credit < 1)).sum()),
                         "sram": plan.predicted["sram_needed_bytes"],
                         "bitops": plan.predicted["bitops"]})
            console.print(f"  {task.label} @ {budget:,} B / {name}: {acc:.4f} "
                          f"({seconds:.1f} s)")
        _gaps(rows, budget, correct)
        default_correct.append(correct.get("measured (default)"))
    out = {"model": task.label, "float": floats, "int8_need": int8_need,
           "minimum": minimum, "budgets": budgets, "rows": rows, "test": len(t.test),
           "default_steps_pp": _steps(default_correct),
           "data": task.origin, "filing_need": FILING_NEED.get(task.label),
           "filing_budgets": {str(b): f for b, f in filing.items()}}
    if wide is not None:
        correct = [None if p is None else plan_correct(p, wide) for p in default_plans]
        out["whole"] = {"test": len(wide.test), "data": f"{whole.name}: {len(wide.test):,} "
                        "images (the test set above among them)",
                        "float": accuracy(float_predictions(task.model, t.graph, wide.test),
                                          wide.test.y),
                        "default_accuracy": [None if c is None else round(float(c.mean()), 6)
                                             for c in correct],
                        "default_steps_pp": _steps(correct)}
    return out


def _steps(correct: list[np.ndarray | None]) -> list[list[float] | None]:
    """Each step down the budget ladder: the smaller budget's plan's top-1 minus the larger's
    with its paired 95 % interval (`paired_gap`, pp); None where a plan is missing."""
    return [None if a is None or b is None else [round(100 * v, 2) for v in paired_gap(b, a)]
            for a, b in zip(correct[:-1], correct[1:], strict=True)]


def _gaps(rows: list[dict], budget: int, correct: dict) -> None:
    """Each plan's top-1 gap to the best plan at `budget` with its paired 95 % interval
    (`paired_gap`, in pp) into its row, as `gap_pp` = [gap, low, high]."""
    if not correct:
        return
    best = max(correct, key=lambda n: (correct[n].mean(), n == "measured (default)"))
    for r in rows:
        if r["budget"] == budget and r["strategy"] in correct:
            r["gap_pp"] = [round(100 * v, 2) for v in
                           paired_gap(correct[best], correct[r["strategy"]])]


def _table(result: dict) -> dict:
    names = [n for n, _ in strategies()]
    rows = []
    for budget in result["budgets"]:
        got = {r["strategy"]: r for r in result["rows"] if r["budget"] == budget}
        best = max((r["accuracy"] for r in got.values() if r["accuracy"] is not None),
                   default=None)
        cells = [f"{budget:,} ({budget / result['int8_need']:.2f}×)"]
        issue = result.get("filing_budgets", {}).get(str(budget))
        if issue is not None:
            cells[0] += f"; issue's {issue:.2f}× of {result['filing_need']:,}"
        for n in names:
            r = got[n]
            if r["accuracy"] is None:
                cells.append("—")
                continue
            mark = "*" if r["accuracy"] == best else \
                "≈" if r.get("gap_pp") and r["gap_pp"][1] <= 0 else ""
            cells.append(f"{100 * r['accuracy']:.1f}{mark} ({r['sram']:,} B, "
                         f"{r['bitops'] / 1e6:.0f} M, {r['seconds']:.0f} s)")
        rows.append(cells)
    return show(f"{result['model']}: top-1 % (peak SRAM, BitOPs, search s) per SRAM budget",
                ["budget (× int8 need)", *names], rows,
                f"Float {100 * result['float']:.1f} %; int8 need {result['int8_need']:,} B; "
                f"smallest plan {result['minimum']:,} B; {result['test']} test samples "
                f"({result['data']}). * = best at that budget; ≈ = behind the best by less "
                f"than the test set can resolve (the paired 95 % interval of the gap, "
                f"McNemar, contains 0); — = no plan fits."
                + (f" Rows marked \"issue's\" are the budgets of the issue's filing time "
                   f"(fractions of the int8 need mpq computed then, "
                   f"{result['filing_need']:,} B)." if result.get("filing_budgets") else "")
                + _whole_note(result))


def _whole_note(result: dict) -> str:
    """The default's plans on the larger test set, budget by budget (`sweep`'s `whole`)."""
    w = result.get("whole")
    if w is None:
        return ""
    cells = [f"{b:,} B " + ("no plan" if a is None else f"{100 * a:.2f} %")
             for b, a in zip(result["budgets"], w["default_accuracy"], strict=True)]
    return (f" The default's plans on {w['data']} (float {100 * w['float']:.2f} %): "
            + ", ".join(cells) + ".")


def _targets(results: list[dict], demo: float) -> dict:
    """The issue's targets, each met or missed with the measured distance."""
    out = []
    for res in results:
        by = {}
        for r in res["rows"]:
            by.setdefault(r["budget"], {})[r["strategy"]] = r["accuracy"]
        mine = [r for r in res["rows"]
                if r["strategy"] == "measured (default)" and r["accuracy"] is not None]
        worst = max(mine, key=lambda r: r["gap_pp"][0], default=None)
        out.append([res["model"], "default within 0.3 pp of the best at every budget",
                    "—" if worst is None else
                    f"worst gap {worst['gap_pp'][0]:.1f} pp at {worst['budget']:,} B "
                    f"({_interval(worst['gap_pp'])})",
                    str(worst is not None and worst["gap_pp"][0] <= 0.3)])
        # budgets descend: a positive step is a smaller budget's plan scoring higher
        steps = [(s, b) for s, b in zip(res["default_steps_pp"], res["budgets"][1:], strict=True)
                 if s]
        rise = max(steps, key=lambda sb: sb[0][0], default=None)
        # the same with ties at the top broken at random (`plan_tie_credit`): first-index
        # argmax also rewards how the classes happen to be numbered
        by_budget: dict[int, list[dict]] = {}
        for r in res["rows"]:
            if r["accuracy"] is not None:
                by_budget.setdefault(r["budget"], []).append(r)
        split = [(max(x["tie_split_accuracy"] for x in rs) - r["tie_split_accuracy"], b, r)
                 for b, rs in by_budget.items() for r in rs
                 if r["strategy"] == "measured (default)"]
        gap, at, _ = max(split, key=lambda g: g[0], default=(None, None, None))
        tied = max((x["tied_samples"] for rs in by_budget.values() for x in rs), default=0)
        out.append([res["model"], "the same, ties at the top split evenly",
                    "—" if gap is None else
                    ("best at every budget" if gap <= 0 else
                     f"worst gap {100 * gap:.1f} pp at {at:,} B")
                    + f" (at most {tied} of {res['test']} test samples tied in a plan)",
                    str(gap is not None and gap <= 0.003)])
        out.append([res["model"], "default never worse with more memory",
                    "no step" if rise is None else
                    f"largest gain from less memory {max(rise[0][0], 0.0):.1f} pp"
                    + (f" (down to {rise[1]:,} B; {_interval(rise[0])})"
                       if rise[0][0] > 0 else ""),
                    str(rise is None or rise[0][0] <= 0)])
        if "whole" in res:  # the same on a test set ten times larger
            w = res["whole"]
            wsteps = [(s, b) for s, b in zip(w["default_steps_pp"], res["budgets"][1:],
                                             strict=True) if s]
            wrise = max(wsteps, key=lambda sb: sb[0][0], default=None)
            out.append([res["model"], f"the same on {w['test']:,} test images",
                        "no step" if wrise is None else
                        f"largest gain from less memory {max(wrise[0][0], 0.0):.2f} pp"
                        + (f" (down to {wrise[1]:,} B; {_interval(wrise[0])})"
                           if wrise[0][0] > 0 else ""),
                        str(wrise is None or wrise[0][0] <= 0)])
        if not res.get("filing_need"):  # not one of the issue's models: its goals do not apply
            example = next((r["float"] for r in results if r["model"] == "Fashion example CNN"),
                           None)
            out.append([res["model"], "the issue's 0.5× / 0.35× goals",
                        "the goals are KWS's and the Fashion example's"
                        + ("" if example is None else f" (float {100 * example:.1f} %)")
                        + "; this "
                        f"model's float is {100 * res['float']:.1f} %, its smallest plan "
                        f"{res['minimum']:,} B ({res['minimum'] / res['int8_need']:.2f}× of "
                        "its int8 need)", "n/a"])
            continue
        goal = 0.900 if "KWS" in res["model"] else 0.919  # the issue's KWS and Fashion goals
        readings = _readings(res, 0.5)
        out.append([res["model"], f"≥ {100 * goal:.1f} % at 0.5× int8 need",
                    "; ".join(f"{where}: {_pct(acc)}" for where, acc in readings),
                    _met([acc is not None and acc >= goal for _, acc in readings])])
        if "Fashion" in res["model"]:
            readings = _readings(res, 0.35)
            out.append([res["model"], "within 1 pp of float at 0.35×",
                        "; ".join(f"{where}: " + ("no plan" if acc is None else
                                                  f"{100 * (res['float'] - acc):.1f} pp below "
                                                  "float") for where, acc in readings),
                        _met([acc is not None and res["float"] - acc <= 0.01
                              for _, acc in readings])])
    out.append(["Fashion example (make demo)", "plan at 14,000 B keeps ≥ 91.5 %",
                f"{100 * demo:.1f} %", str(demo >= 0.915)])
    return show("Issue 13 targets", ["model", "target", "measured", "met"], out)


def _readings(res: dict, fraction: float) -> list[tuple[str, float | None]]:
    """The default's top-1 at `fraction` of today's int8 need and, for the issue's models, at
    `fraction` of the need of the issue's filing time (None: no plan fits / not swept)."""
    def default_at(budget: int) -> float | None:
        got = [r["accuracy"] for r in res["rows"]
               if r["strategy"] == "measured (default)" and r["budget"] == budget]
        return got[0] if got else None

    today = int(res["int8_need"] * fraction)
    out = [(f"at {fraction}× of today's need ({today:,} B)", default_at(today))]
    if res.get("filing_need"):
        then = int(res["filing_need"] * fraction)
        out.append((f"at the issue's {then:,} B ({fraction}× of {res['filing_need']:,})",
                    default_at(then)))
    return out


def _interval(gap: list[float]) -> str:
    """A paired gap's 95 % interval, and whether the test set resolves it from 0."""
    lo, hi = gap[1], gap[2]
    return (f"95 % interval {lo:+.1f} … {hi:+.1f} pp"
            + (": within what the test set can resolve" if lo <= 0 <= hi else ""))


def _pct(acc: float | None) -> str:
    return "no plan" if acc is None else f"{100 * acc:.1f} %"


def _met(flags: list[bool]) -> str:
    """One reading met or not; with two, say which."""
    if len(flags) == 1:
        return str(flags[0])
    return "both" if all(flags) else "neither" if not any(flags) else \
        ("today's only" if flags[0] else "issue's only")


def demo_accuracy() -> float:
    """The `make demo` plan: the bundled Fashion example at 14,000 B on nano33ble."""
    task = example_task()
    t = load_task(task)
    plan = search(task.model, t.graph, get_board("nano33ble"), t.calib,
                  SearchOptions(sram=14_000)).plan
    return plan_accuracy(plan, t)


def example_task() -> Task:
    """The bundled Fashion example (`make demo`'s model: float 92.9 %, int8 92.0 %)."""
    ex = REPO / "examples" / "fashion"
    return Task("Fashion example CNN", ex / "fashion_cnn.onnx", ex / "calib.npz",
                ex / "test.npz", 14_000,
                origin="examples/fashion: calibrate on calib.npz (256), test on test.npz (1000)")


def whole_test_split(path: Path) -> Path:
    """The Fashion-MNIST test split, all 10,000 images (the example's test.npz is its first
    1,000), as the example's model takes them (NCHW, [0, 1])."""
    x, y = load_split("t10k")
    np.savez(path, x=x.transpose(0, 3, 1, 2), y=y)
    return path


def bench_pareto() -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        whole = whole_test_split(Path(tmp) / "fashion_test_10000.npz")
        results = [sweep(kws_task(Path(tmp) / "kws")), sweep(example_task(), whole),
                   sweep(fashion_task())]
    demo = demo_accuracy()
    tables = [_table(r) for r in results]
    tables.append(_targets(results, demo))
    return {"results": results, "demo_accuracy": demo, "tables": tables}
