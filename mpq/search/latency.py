"""`mpq search --latency`: the fewest predicted instructions within the accuracy-first plan's
budgets and an accuracy tolerance (issue 15 item 4).

The accuracy-first (`measured`) search is run as the user asked, then again with fewer
candidate activation bitwidths — each subset of `--bits` that keeps the widest (e.g. 8,4,2 →
8,4 and 8) — and, when `--weight-bits` offers several, with each single weight bitwidth. Every
run meets the same SRAM/Flash budgets (the search refuses what does not fit) and measures its
plan's fidelity on the same validation samples (`predicted.fidelity`). A plan is admissible when,
for every output, it stays within the tolerance of the accuracy-first plan:

* classifier outputs: top-1 agreement with float ≥ the accuracy-first plan's − `tolerance` pp;
* other outputs: cosine similarity ≥ the accuracy-first plan's − `tolerance` / 100.

Among admissible plans the one with the fewest predicted instructions (`predicted.instructions`,
`mpq.latency`) wins; ties go to the smaller measured damage. The accuracy-first plan itself is
always admissible, so `--latency` never returns a plan predicted slower than it. What was
compared is recorded in the plan's `search.latency`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from itertools import combinations
from pathlib import Path
from typing import Any

from mpq.errors import MpqError


def variants(bits: tuple[int, ...], weight_bits: tuple[int, ...]
             ) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
    """(activation bits, weight bits) candidate sets, the user's first: every subset of `bits`
    holding its widest, crossed with `weight_bits` itself and (when it offers several) each
    single weight bitwidth."""
    top = max(bits)
    rest = sorted(set(bits) - {top}, reverse=True)
    acts = [tuple(sorted((top, *c), reverse=True)) for k in range(len(rest), -1, -1)
            for c in combinations(rest, k)]
    weights = [tuple(weight_bits)]
    if len(weight_bits) > 1:
        weights += [(w,) for w in sorted(weight_bits, reverse=True)]
    out = []
    for a in acts:
        for w in weights:
            if (a, w) not in out:
                out.append((a, w))
    first = (tuple(bits), tuple(weight_bits))
    return [first] + [v for v in out if v != first]


def admissible(candidate: dict[str, Any], reference: dict[str, Any], tolerance: float) -> bool:
    """Whether a plan's `predicted.fidelity` stays within `tolerance` of the reference's on
    every output (module docstring: top-1 agreement in pp, else cosine ± tolerance/100)."""
    for name, ref in reference["outputs"].items():
        got = candidate["outputs"][name]
        if ref["top1_agreement"] is not None and got["top1_agreement"] is not None:
            if 100.0 * got["top1_agreement"] < 100.0 * ref["top1_agreement"] - tolerance - 1e-9:
                return False
        elif got["cosine"] < ref["cosine"] - tolerance / 100.0 - 1e-12:
            return False
    return True


def choose(rows: list[dict[str, Any]]) -> int:
    """Index of the admissible row with the fewest instructions (ties: smaller damage, then
    the earlier row)."""
    ok = [i for i, r in enumerate(rows) if r["admissible"]]
    return min(ok, key=lambda i: (rows[i]["instructions"], rows[i]["damage"], i))


def latency_search(model_path: Path, graph: Any, board: Any, data: Any, opts: Any,
                   tolerance: float, log: Callable[[str], None] | None = None,
                   search_fn: Callable[..., Any] | None = None) -> Any:
    """Run the candidate searches (module docstring) and return the chosen SearchResult, its
    plan's `search.latency` recording every candidate."""
    from mpq.search.driver import search

    search_fn = search_fn or search
    say = log or (lambda message: None)
    if opts.strategy != "measured":
        raise MpqError("--latency needs the accuracy-first search (--strategy measured): the "
                       "tolerance is judged on its measured fidelity")
    if tolerance < 0:
        raise MpqError("--latency-tolerance must be ≥ 0 (percentage points)")
    results, rows = [], []
    for acts, weights in variants(opts.bits, opts.weight_bits):
        label = f"bits {','.join(map(str, acts))} / weights {','.join(map(str, weights))}"
        try:
            r = search_fn(model_path, graph, board, data,
                          replace(opts, bits=acts, weight_bits=weights))
        except MpqError as exc:
            if not results:
                raise  # the accuracy-first search itself failed: that is the user's error
            say(f"latency: {label}: {exc}")
            continue
        p = r.plan.predicted
        if "instructions" not in p:
            raise MpqError("--latency: the latency table cannot predict this model's "
                           "instructions (" + "; ".join(r.plan.notes[-1:]) + ")")
        fid = p["fidelity"]
        row = {"bits": list(acts), "weight_bits": list(weights),
               "instructions": int(p["instructions"]["total"]), "bitops": int(p["bitops"]),
               "damage": float(fid["damage"]),
               "outputs": {k: {"top1_agreement": v["top1_agreement"], "cosine": v["cosine"]}
                           for k, v in fid["outputs"].items()}}
        row["admissible"] = not rows or admissible(fid, results[0].plan.predicted["fidelity"],
                                                   tolerance)
        say(f"latency: {label}: {row['instructions']:,} instructions predicted, "
            f"{'admissible' if row['admissible'] else 'outside the tolerance'}")
        results.append(r)
        rows.append(row)
    best = choose(rows)
    chosen = results[best]
    chosen.plan.search["latency"] = {
        "tolerance_pp": tolerance, "objective": "fewest predicted instructions",
        "reference": 0, "chosen": best, "candidates": rows}
    return chosen
