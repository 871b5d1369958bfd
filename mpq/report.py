"""`mpq report`: what a plan does, as figures, an HTML page and a JSON summary (DESIGN §1).

Four figures, each from numbers the search itself computes (never a second model of them):

(a) the per-step SRAM of the layer-based int8 schedule, of the int8 patch schedule with the
    plan's split, and of the plan, against the SRAM budget (DESIGN §5);
(b) the bits of every layer's output feature map and weights, patch stage shaded (QuantMCU's
    Fig. 6);
(c) the patch grid with each position's VDPC outlier-class rate on the calibration data (§6);
(d) BitOPs per layer, int8 vs the plan (§7.1).

`report_summary` computes everything as plain data (what `report.json` holds); the `figure_*`
functions draw it; `render_report` returns every output file as bytes. Output is
deterministic: same plan ⇒ same bytes (Agg backend, fixed dpi and fonts, no PNG metadata).
"""

from __future__ import annotations

import io
import json
import os
from pathlib import Path
from typing import Any

from mpq.errors import MpqError
from mpq.fileio import write_atomic
from mpq.ir import Graph, graph_fingerprint
from mpq.memory import SCRATCH_PREFIX
from mpq.patch import PatchMemory, PatchSchedule, plan_patches, plan_split
from mpq.plan import Plan, plan_io, plan_overlap, plan_raised, plan_scratch
from mpq.search.driver import stage_bitops
from mpq.search.scores import layer_bitops
from mpq.vdpc import VdpcResult

FIGURES = {
    "sram": "sram_profile.png",
    "bits": "bitwidths.png",
    "patches": "patch_grid.png",
    "bitops": "bitops.png",
}
DPI = 110
# The PNG's text chunks: matplotlib writes its version under "Software" unless told not to.
PNG_METADATA = {"Software": None}

COLORS = {"layer": "#7f7f7f", "patch": "#1f77b4", "plan": "#d62728", "budget": "#000000",
          "act": "#2ca02c", "weight": "#9467bd", "int8": "#7f7f7f", "stage": "#fff1c2"}


# -- numbers ------------------------------------------------------------------------------------

def sram_bits(plan: Plan) -> dict[str, int]:
    """Bits each tensor is stored at, as the search sized the arena (DESIGN §6: SRAM is budgeted
    for the worse branch, so patch-stage maps with a VDPC outlier branch count at its bits)."""
    return {t.name: int(t.outlier_branch["bits"]) if t.outlier_branch else int(t.bits)
            for t in plan.tensors}


def plan_schedule(plan: Plan, graph: Graph) -> PatchSchedule:
    """The plan's schedule rebuilt from the graph: its patch split, or the layer-based one."""
    if plan.graph_fingerprint and plan.graph_fingerprint != graph_fingerprint(graph):
        raise MpqError("the plan was made for a different model")
    if [layer.name for layer in plan.layers] != [n.name for n in graph.nodes]:
        raise MpqError("the plan's layers are not the model's nodes; run `mpq search` again")
    split = None if plan.patch is None else plan_split(plan.patch)
    return plan_patches(graph, split, plan_io(plan), plan_overlap(plan), plan_scratch(plan),
                        plan_raised(plan))


def arena_extent_per_step(memory: PatchMemory, n_steps: int) -> list[int]:
    """Highest arena byte in use at each step: max over buffers alive at t of offset + the
    largest segment alive at t. Its maximum is the arena size (DESIGN §5), since every
    buffer's largest segment is alive at some step."""
    extent = [0] * n_steps
    for buf in memory.plan.buffers:
        off = memory.plan.offsets[buf.name]
        for s in buf.segments:
            for t in range(s.first, s.last + 1):
                extent[t] = max(extent[t], off + s.shift + s.size)
    return extent


def memory_series(schedule: PatchSchedule, bits: dict[str, int] | None) -> dict[str, Any]:
    """Per-step SRAM of a schedule at given bits, from `PatchSchedule.memory` (the search's).

    `sram_bytes[t]` = arena extent at t + the kernel scratch buffer (one static buffer of the
    largest scratch, as the export allocates it), so max_t sram_bytes = arena + scratch = the
    peak the search predicts. `live_bytes[t]` (tensors alive, `memory.live_bytes_per_step`) and
    `scratch_bytes[t]` (the step's own scratch: with the scratch in the arena its slots, which
    `live_bytes` then include) show what the step itself needs.
    """
    mem = schedule.memory(bits)
    n = len(schedule.steps)
    extent = arena_extent_per_step(mem, n)
    scratch = list(mem.per_step_scratch)
    if schedule.scratch_in_arena:
        scratch = [sum(s.size for b in mem.plan.buffers if b.name.startswith(SCRATCH_PREFIX)
                       for s in b.segments if s.first <= t <= s.last) for t in range(n)]
    return {
        "sram_bytes": [e + mem.scratch_bytes for e in extent],
        "live_bytes": list(mem.per_step_bytes),
        "scratch_bytes": scratch,
        "arena_bytes": mem.arena_bytes,
        "scratch_max_bytes": mem.scratch_bytes,
        "peak_sram_bytes": mem.peak_sram_bytes,
    }


def board_sram_budget(plan: Plan) -> int | None:
    """The plan's board's own SRAM budget (region − reserves); None for an older plan that
    names its board only, when mpq ships no board of that name."""
    from mpq.boards import plan_board

    try:
        return plan_board(plan.board).sram_budget
    except MpqError:
        if isinstance(plan.board, dict) and "memory" in plan.board:
            raise  # the plan's own board is invalid: as for export, say so
        return None


def sram_profiles(plan: Plan, graph: Graph, schedule: PatchSchedule) -> dict[str, Any]:
    """Figure (a)'s data: layer-based int8, patch-based int8 (the plan's split) and the plan."""
    layer = memory_series(plan_patches(graph, None, schedule.io), None)
    patch = memory_series(schedule, None) if schedule.split_tensor is not None else None
    mine = memory_series(schedule, sram_bits(plan))
    # the caller's buffers: the input, and the output (0 in plans older than its count)
    io_bytes = int(plan.predicted["input_bytes"]) + int(plan.predicted.get("output_bytes", 0))
    budget = int(plan.board["sram_budget"])
    return {
        "steps": list(schedule.steps),
        "layer_based_int8": layer,
        "patch_based_int8": patch,
        "plan": mine,
        "io_buffer_bytes": io_bytes,
        "sram_budget": budget,
        "budget_for_arena_and_scratch": budget - io_bytes,
        "board_sram_budget": board_sram_budget(plan),
    }


def bitwidth_rows(plan: Plan, graph: Graph) -> list[dict[str, Any]]:
    """Figure (b)'s data: per layer, weight bits, input/output map bits, whether the layer is
    in the patch stage, and there the output bits of VDPC's outlier (all-8-bit) branch."""
    stage = set(plan.patch["stage_nodes"]) if plan.patch else set()
    outlier = {t.name: int(t.outlier_branch["bits"]) for t in plan.tensors
               if t.outlier_branch is not None}
    rows = []
    for i, (layer, node) in enumerate(zip(plan.layers, graph.nodes, strict=True)):
        rows.append({"index": i, "name": layer.name, "op": layer.op, "w_bits": layer.w_bits,
                     "a_bits_in": layer.a_bits_in, "a_bits_out": layer.a_bits_out,
                     "patch_stage": layer.name in stage,
                     "outlier_branch_bits": outlier.get(node.outputs[0])})
    return rows


def bitops_breakdown(plan: Plan, graph: Graph, schedule: PatchSchedule) -> dict[str, Any]:
    """Figure (d)'s data: BitOPs per layer (MACs·b_w·b_a, §7.1) at int8 and in the plan, and
    the patch overlap recomputation the driver charges (`driver.stage_bitops`), so that the
    totals are the plan's predicted `bitops_int8`, `bitops` and `expected_bitops`."""
    plan_layer = {layer.name: int(layer.bitops) for layer in plan.layers}
    w_bits = {layer.name: int(layer.w_bits) for layer in plan.layers if layer.w_bits}
    int8 = layer_bitops(graph, {t: 8 for t in graph.tensors}, {n: 8 for n in w_bits})
    vdpc = _vdpc_result(plan)
    extra = stage_bitops(schedule, graph, plan_layer, int8, vdpc)
    layers = [{"index": i, "name": n.name, "int8": int(int8[n.name]),
               "plan": plan_layer[n.name]} for i, n in enumerate(graph.nodes)]
    sum8 = sum(r["int8"] for r in layers)
    sum_plan = sum(r["plan"] for r in layers)
    return {
        "layers": layers,
        "patch_overlap": {"int8": extra["int8"], "plan": extra["mixed"],
                          "expected": extra["expected"]},
        "total": {"int8": sum8 + extra["int8"], "plan": sum_plan + extra["mixed"],
                  "expected": sum_plan + extra["expected"]},
    }


def _vdpc_result(plan: Plan) -> VdpcResult | None:
    """The plan's VDPC record as the driver's VdpcResult (only the rates matter here)."""
    v = (plan.patch or {}).get("vdpc")
    if not v:
        return None
    return VdpcResult(map=v["map"], phi=v["phi"], z=v["z"], mu=v["mu"], sigma=v["sigma"],
                      lo=v["lo_threshold"], hi=v["hi_threshold"],
                      min_outliers=v["min_outliers"], outlier_rate=v["outlier_rate"],
                      samples=v["samples"], regions=v["regions"])


def patch_grid(plan: Plan, graph: Graph) -> dict[str, Any] | None:
    """Figure (c)'s data: the split tensor's tiles and, with VDPC, each position's outlier-class
    rate (the fraction of calibration samples whose patch takes the 8-bit branch)."""
    if plan.patch is None:
        return None
    p = plan.patch
    # a stage ending in a global pool tiles the pool's input (`patch.pool`)
    tiled = p["pool"]["tensor"] if p.get("pool") else p["split_tensor"]
    _, h, w, _ = graph.tensors[tiled].shape
    v = p.get("vdpc")
    return {
        "n": int(p["n"]), "m": int(p.get("cols", p["n"])), "split_layer": int(p["split_layer"]),
        "split_tensor": p["split_tensor"], "tiled_tensor": tiled, "pooled": bool(p.get("pool")),
        "height": int(h), "width": int(w),
        "tiles": p["tiles"],
        "redundant_macs": int(p["redundant_macs"]),
        "redundant_macs_percent": float(p["redundant_macs_percent"]),
        "vdpc": None if not v else {
            "map": v["map"], "phi": v["phi"], "min_outliers": v["min_outliers"],
            "thresholds": [v["lo_threshold"], v["hi_threshold"]], "samples": v["samples"],
            "outlier_rate": v["outlier_rate"],
            "mean_outlier_rate": round(sum(map(sum, v["outlier_rate"]))
                                       / (len(v["outlier_rate"]) ** 2), 6)},
    }


def headline(plan: Plan, sram: dict[str, Any], bitops: dict[str, Any],
             grid: dict[str, Any] | None) -> dict[str, Any]:
    """The numbers the HTML table leads with: SRAM and Flash vs budgets, BitOPs vs int8,
    patches and VDPC."""
    p, b = plan.predicted, plan.board
    flash = int(p["flash_bytes"]) + int(p["code_bytes_estimate"])
    total = bitops["total"]
    return {
        "peak_sram_bytes": int(p["peak_sram_bytes"]),
        "input_bytes": int(p["input_bytes"]),
        "output_bytes": int(p.get("output_bytes", 0)),
        "model_stack_bytes": int(p.get("stack_bytes", 0)),
        "stack_bytes": int(b.get("reserve", {}).get("stack", 0)),
        "runtime_sram_bytes": int(b.get("reserve", {}).get("runtime_sram", 0)),
        "sram_needed_bytes": int(p["sram_needed_bytes"]),
        "sram_budget": int(b["sram_budget"]),
        "sram_margin": int(b["sram_budget"]) - int(p["sram_needed_bytes"]),
        "layer_based_int8_peak_sram_bytes": sram["layer_based_int8"]["peak_sram_bytes"],
        "patch_based_int8_peak_sram_bytes": None if sram["patch_based_int8"] is None
        else sram["patch_based_int8"]["peak_sram_bytes"],
        "flash_bytes": int(p["flash_bytes"]),
        "code_bytes_estimate": int(p["code_bytes_estimate"]),
        "flash_needed_bytes": flash,
        "flash_budget": int(b["flash_budget"]),
        "flash_margin": int(b["flash_budget"]) - flash,
        "bitops": total["plan"],
        "bitops_int8": total["int8"],
        "expected_bitops": total["expected"],
        "bitops_percent_of_int8": round(100.0 * total["plan"] / total["int8"], 2)
        if total["int8"] else None,
        "expected_bitops_percent_of_int8": round(100.0 * total["expected"] / total["int8"], 2)
        if total["int8"] else None,
        "patches": None if grid is None else {
            "split_layer": grid["split_layer"], "n": grid["n"], "m": grid["m"],
            "pooled": grid["pooled"],
            "redundant_macs": grid["redundant_macs"],
            "redundant_macs_percent": grid["redundant_macs_percent"]},
        "vdpc": None if grid is None or grid["vdpc"] is None else {
            "map": grid["vdpc"]["map"], "phi": grid["vdpc"]["phi"],
            "mean_outlier_rate": grid["vdpc"]["mean_outlier_rate"]},
    }


#: The plan's board as report.json shows it: what the page and figures use (a plan also carries
#: the whole board description, which the report has no use for).
SUMMARY_BOARD_KEYS = ("name", "core", "sram_budget", "flash_budget")


def report_summary(plan: Plan, graph: Graph, plan_name: str) -> dict[str, Any]:
    """Everything the figures and the page show, as JSON-ready data (`report.json`)."""
    schedule = plan_schedule(plan, graph)
    sram = sram_profiles(plan, graph, schedule)
    bitops = bitops_breakdown(plan, graph, schedule)
    grid = patch_grid(plan, graph)
    notes = []
    got, want = sram["plan"]["peak_sram_bytes"], int(plan.predicted["peak_sram_bytes"])
    if got != want:
        notes.append(f"this mpq's memory model gives the plan a peak of {got:,} B, the plan "
                     f"predicted {want:,} B: it was made by another version; search again")
    if bitops["total"]["plan"] != int(plan.predicted["bitops"]):
        notes.append(f"the layers' BitOPs add up to {bitops['total']['plan']:,}, the plan "
                     f"predicted {int(plan.predicted['bitops']):,}: search again")
    if grid is None:
        notes.append("no patch grid: the plan runs layer by layer (no patch stage, no VDPC)")
    elif grid["vdpc"] is None:
        notes.append("VDPC is off in this plan: every patch runs the mixed-precision branch")
    figures = {k: (None if k == "patches" and grid is None else v) for k, v in FIGURES.items()}
    return {
        "plan": plan_name,
        "model": plan.model,
        "board": {k: v for k, v in plan.board.items() if k in SUMMARY_BOARD_KEYS},
        "strategy": plan.strategy,
        "headline": headline(plan, sram, bitops, grid),
        "sram_profile": sram,
        "bitwidths": bitwidth_rows(plan, graph),
        "patch_grid": grid,
        "bitops": bitops,
        "instructions": instructions_breakdown(plan, graph),
        "figures": figures,
        "notes": notes,
    }


def instructions_breakdown(plan: Plan, graph: Graph) -> dict[str, Any] | None:
    """The plan's predicted instructions (`predicted.instructions`, `mpq.latency`) per layer in
    graph order (None for a node that is no kernel call: a reshape view or a fused add), or
    None for a plan made before the latency model."""
    p = plan.predicted.get("instructions")
    if p is None:
        return None
    return {"target": p["target"], "model": p["model"], "total": p["total"],
            "layers": [p["layers"].get(n.name) for n in graph.nodes]}


# -- figures ------------------------------------------------------------------------------------

OP_SHORT = {"conv2d": "conv", "depthwise": "dw", "grouped_conv": "gconv",
            "fully_connected": "fc", "avg_pool": "avgpool", "max_pool": "maxpool"}


def _new_figure(width: float, height: float) -> Any:
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout="constrained")


def _png(fig: Any) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, metadata=PNG_METADATA)
    return buf.getvalue()


def _layer_axis(ax: Any, rows: list[dict[str, Any]], extra: list[str] | None = None) -> None:
    """x axis of the per-layer figures: one tick per layer, 'index op' (indices only when the
    network is too long to label every layer)."""
    labels = [f"{r['index']} {OP_SHORT.get(r['op'], r['op'])}" for r in rows] + (extra or [])
    ax.set_xlim(-0.6, len(labels) - 0.4)
    if len(labels) <= 48:
        ax.set_xticks(range(len(labels)))
        ax.set_xticklabels(labels, rotation=90, fontsize=8)
    else:
        from matplotlib.ticker import MaxNLocator

        ax.xaxis.set_major_locator(MaxNLocator(nbins=24, integer=True))
    ax.set_xlabel("layer (index and op; names in the table of report.html)")


def _shade_stage(ax: Any, split_layer: int | None) -> None:
    if split_layer:
        ax.axvspan(-0.5, split_layer - 0.5, color=COLORS["stage"], zorder=0,
                   label=f"patch stage (layers 0–{split_layer - 1}, run per patch)")


def _plain(text: Any) -> str:
    """Text from the plan or the model for a figure, drawn as it is: matplotlib reads `$…$` as
    mathtext, so a model file named `a$\\frac$.onnx` would be typeset or fail to parse."""
    return str(text).replace("$", r"\$")


def _note(ax: Any, text: str) -> None:
    """A legend line with no symbol: a fact the figure cannot draw."""
    ax.plot([], [], " ", label=text)


def _legend(ax: Any, **kwargs: Any) -> None:
    """The legend with the symbol-less notes last, each group in drawing order."""
    handles, labels = ax.get_legend_handles_labels()
    notes = [getattr(h, "get_linestyle", lambda: "")() == "None" for h in handles]
    order = [i for i, n in enumerate(notes) if not n] + [i for i, n in enumerate(notes) if n]
    ax.legend([handles[i] for i in order], [labels[i] for i in order], fontsize=8.5,
              framealpha=0.95, **kwargs)


def _thousands(ax: Any, axis: str = "y", scale: float = 1.0, digits: int = 0) -> None:
    from matplotlib.ticker import FuncFormatter

    fmt = FuncFormatter(lambda v, _pos: f"{v / scale:,.{digits}f}")
    (ax.yaxis if axis == "y" else ax.xaxis).set_major_formatter(fmt)


def figure_sram(summary: dict[str, Any]) -> bytes:
    """(a) SRAM per step: layer-based int8, patch-based int8, the plan; the budget line."""
    s = summary["sram_profile"]
    rows = summary["bitwidths"]
    grid = summary["patch_grid"]
    fig = _new_figure(10.5, 5.6)
    ax = fig.add_subplot()
    edges = [i - 0.5 for i in range(len(s["steps"]) + 1)]
    _shade_stage(ax, grid["split_layer"] if grid else None)
    series = [("layer_based_int8", "layer-based, int8", COLORS["layer"], 4.0),
              ("patch_based_int8", f"{grid['n']}×{grid['m']} patches, int8" if grid else "",
               COLORS["patch"], 2.8),
              ("plan", "the plan (mixed precision)", COLORS["plan"], 1.8)]
    top = 0
    for key, label, color, width in series:
        data = s[key]
        if data is None:
            continue
        ax.stairs(data["sram_bytes"], edges, color=color, lw=width, alpha=0.85, baseline=None,
                  label=f"{label}: peak {data['peak_sram_bytes']:,} B")
        top = max(top, max(data["sram_bytes"]))
    ax.stairs(s["plan"]["live_bytes"], edges, fill=True, color=COLORS["plan"], alpha=0.15,
              lw=0, label="the plan: bytes of live tensors (no gaps, no scratch)")
    if grid is None:
        _note(ax, "no patch split in this plan")
    budget = s["budget_for_arena_and_scratch"]
    ax.axhline(budget, color=COLORS["budget"], ls="--", lw=1.5,
               label=f"SRAM budget {s['sram_budget']:,} B − I/O buffers {s['io_buffer_bytes']:,} B "
                     f"= {budget:,} B")
    top = max(top, budget)
    board = s["board_sram_budget"]
    if board is not None and board != s["sram_budget"]:
        board_line = board - s["io_buffer_bytes"]
        if board_line <= 1.5 * top:
            ax.axhline(board_line, color=COLORS["budget"], ls=":", lw=1.2,
                       label=f"board {_plain(summary['board']['name'])}'s own budget − I/O buffers "
                             f"= {board_line:,} B")
            top = max(top, board_line)
        else:
            _note(ax, f"board {_plain(summary['board']['name'])}'s own budget {board:,} B: "
                      "off the scale")
    ax.set_ylim(0, top * 1.45)
    _thousands(ax)
    ax.set_ylabel("SRAM (bytes): arena in use + kernel scratch")
    _layer_axis(ax, rows)
    ax.set_xlabel("step = layer (index and op); the input image is the caller's buffer")
    ax.set_title(f"(a) SRAM per step: {_plain(summary['model'])} "
                 f"on {_plain(summary['board']['name'])}")
    ax.grid(axis="y", alpha=0.3)
    _legend(ax, loc="upper right")
    return _png(fig)


def figure_bits(summary: dict[str, Any]) -> bytes:
    """(b) Output feature-map bits and weight bits per layer, patch stage shaded."""
    rows = summary["bitwidths"]
    grid = summary["patch_grid"]
    fig = _new_figure(10.5, 4.8)
    ax = fig.add_subplot()
    _shade_stage(ax, grid["split_layer"] if grid else None)
    w = 0.38
    xs = [r["index"] for r in rows]
    outl = [(r["index"], r["outlier_branch_bits"]) for r in rows
            if r["outlier_branch_bits"] is not None and r["outlier_branch_bits"] != r["a_bits_out"]]
    if outl:
        ax.bar([i - w / 2 for i, _ in outl], [b for _, b in outl], w, fill=False,
               edgecolor=COLORS["act"], ls="--", lw=1.2,
               label="output map in VDPC outlier patches")
    ax.bar([i - w / 2 for i in xs], [r["a_bits_out"] for r in rows], w, color=COLORS["act"],
           label="output feature map")
    wx = [(r["index"], r["w_bits"]) for r in rows if r["w_bits"]]
    ax.bar([i + w / 2 for i, _ in wx], [b for _, b in wx], w, color=COLORS["weight"],
           label="weights (no bar: the layer has none)")
    ax.set_yticks([0, 2, 4, 8])
    ax.set_ylim(0, 11.5)
    ax.set_ylabel("bits")
    _layer_axis(ax, rows)
    ax.set_title(f"(b) Bitwidth per layer: {_plain(summary['model'])} "
                 f"({'patch stage + layer-based rest' if grid else 'layer-based'})")
    ax.grid(axis="y", alpha=0.3)
    _legend(ax, loc="upper right", ncol=2)
    return _png(fig)


def figure_patches(summary: dict[str, Any]) -> bytes:
    """(c) The patch grid over the split tensor; with VDPC each position's outlier rate."""
    from matplotlib import colormaps
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize
    from matplotlib.patches import Rectangle
    from matplotlib.ticker import PercentFormatter

    g = summary["patch_grid"]
    v = g["vdpc"]
    fig = _new_figure(7.4, 6.6)
    ax = fig.add_subplot()
    cmap, norm = colormaps["Reds"], Normalize(0.0, 1.0)
    for i, row in enumerate(g["tiles"]):
        for j, (y0, y1, x0, x1) in enumerate(row):
            rate = v["outlier_rate"][i][j] if v else None
            face = cmap(norm(rate)) if rate is not None else "#dddddd"
            ax.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, facecolor=face,
                                   edgecolor="white", lw=3))
            color = "white" if rate is not None and rate > 0.6 else "black"
            small = max(g["n"], g["m"]) > 4
            cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
            if rate is not None:
                ax.text(cx, cy, f"{100 * rate:.0f} %", ha="center", va="bottom",
                        fontsize=10 if small else 15, fontweight="bold", color=color)
            if g["n"] <= 12:  # a label per tile while they stay legible
                ax.text(cx, cy, f"\n({i},{j}) {y1 - y0}×{x1 - x0} px", ha="center",
                        va="top" if rate is not None else "center",
                        fontsize=7 if small else 9, color=color)
    ax.set_xlim(0, g["width"])
    ax.set_ylim(g["height"], 0)
    ax.set_aspect("equal")
    what = "the global pool's input" if g["pooled"] else "the split tensor"
    ax.set_xlabel(f"column of {what} (pixels, width {g['width']})")
    ax.set_ylabel(f"row of {what} (pixels, height {g['height']})")
    title = (f"(c) {g['n']}×{g['m']} patches, first {g['split_layer']} layers per patch"
             f"{', summed into the global pool' if g['pooled'] else ''}; "
             f"redundant MACs {g['redundant_macs_percent']:.1f} %")
    if v:
        bar = fig.colorbar(ScalarMappable(norm=norm, cmap=cmap), ax=ax, shrink=0.8,
                           label="outlier-class rate: share of calibration samples\n"
                                 "whose patch runs the all-8-bit branch")
        bar.ax.yaxis.set_major_formatter(PercentFormatter(1.0))
        mean = 100 * v["mean_outlier_rate"]
        ax.set_title(f"{title}\nVDPC: φ = {v['phi']}, ≥ {v['min_outliers']} outlier(s) per "
                     f"patch, {v['samples']} samples, mean rate {mean:.1f} %", fontsize=10)
    else:
        ax.set_title(f"{title}\nVDPC off: every patch runs the mixed-precision branch",
                     fontsize=10)
    return _png(fig)


def figure_bitops(summary: dict[str, Any]) -> bytes:
    """(d) BitOPs per layer at int8 and in the plan (+ the patch overlap recomputation)."""
    b = summary["bitops"]
    rows = summary["bitwidths"]
    grid = summary["patch_grid"]
    fig = _new_figure(10.5, 5.0)
    ax = fig.add_subplot()
    _shade_stage(ax, grid["split_layer"] if grid else None)
    w = 0.4
    xs = [r["index"] for r in b["layers"]]
    int8 = [r["int8"] for r in b["layers"]]
    mine = [r["plan"] for r in b["layers"]]
    extra = []
    if grid is not None:
        xs = xs + [len(xs)]
        int8 = int8 + [b["patch_overlap"]["int8"]]
        mine = mine + [b["patch_overlap"]["plan"]]
        extra = ["overlap (patches)"]
    t = b["total"]
    pct = 100.0 * t["plan"] / t["int8"] if t["int8"] else 0.0
    ax.bar([i - w / 2 for i in xs], int8, w, color=COLORS["int8"],
           label=f"int8: total {t['int8'] / 1e6:,.1f} M")
    ax.bar([i + w / 2 for i in xs], mine, w, color=COLORS["plan"],
           label=f"the plan: total {t['plan'] / 1e6:,.1f} M ({pct:.1f} % of int8)")
    if summary["patch_grid"] and summary["patch_grid"]["vdpc"]:
        _note(ax, f"expected with VDPC's outlier patches at 8 bits: "
                  f"{t['expected'] / 1e6:,.1f} M")
    ax.set_ylim(0, max(int8 + mine + [1]) * 1.3)
    _thousands(ax, scale=1e6, digits=0)
    ax.set_ylabel("BitOPs (millions) = MACs × b$_w$ × b$_a$")
    _layer_axis(ax, rows, extra)
    ax.set_title(f"(d) BitOPs per layer: {_plain(summary['model'])}, int8 vs the plan")
    ax.grid(axis="y", alpha=0.3)
    _legend(ax, loc="upper right")
    return _png(fig)


# -- files --------------------------------------------------------------------------------------

def render_report(plan: Plan, graph: Graph, plan_name: str) -> dict[str, bytes]:
    """Every file of the report (name → bytes): four PNGs (three without patches), the HTML
    page and report.json."""
    import matplotlib
    import matplotlib.style

    from mpq.codegen.render import render

    summary = report_summary(plan, graph, plan_name)
    files: dict[str, bytes] = {}
    # matplotlib's defaults, whatever the user's matplotlibrc says: same plan, same pixels.
    with matplotlib.style.context("default"), \
            matplotlib.rc_context({"font.family": "DejaVu Sans", "font.size": 10}):
        files[FIGURES["sram"]] = figure_sram(summary)
        files[FIGURES["bits"]] = figure_bits(summary)
        if summary["patch_grid"] is not None:
            files[FIGURES["patches"]] = figure_patches(summary)
        files[FIGURES["bitops"]] = figure_bitops(summary)
    files["report.html"] = render("report/report.html.j2", s=summary, h=summary["headline"],
                                  plan=plan).encode()
    files["report.json"] = (json.dumps(summary, indent=2, sort_keys=True) + "\n").encode()
    return files


def default_output_dir(plan_path: Path) -> Path:
    """`<plan stem>.report/` beside the plan: fashion.plan.json → fashion.report/."""
    name = plan_path.name
    for suffix in (".json", ".plan"):
        if name.lower().endswith(suffix) and len(name) > len(suffix):
            name = name[: -len(suffix)]
    return plan_path.with_name(name + ".report")


def check_output_dir(out_dir: Path) -> None:
    """Refuse, before any work, a directory that cannot be created or written: an existing
    non-directory on the way, or an ancestor without write permission."""
    if out_dir.exists() and not out_dir.is_dir():
        raise MpqError(f"{out_dir}: exists and is not a directory")
    probe = out_dir
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        raise MpqError(f"{out_dir}: cannot create the directory ('{probe}' is not a directory)")
    if probe.exists() and not os.access(probe, os.W_OK | os.X_OK):
        raise MpqError(f"{out_dir}: cannot write ('{probe}' is not writable)")


def write_report(files: dict[str, bytes], out_dir: Path) -> None:
    """Create `out_dir` if needed and write every file atomically."""
    if out_dir.exists() and not out_dir.is_dir():
        raise MpqError(f"{out_dir}: exists and is not a directory")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise MpqError(f"{out_dir}: cannot create the directory ({exc.strerror})") from None
    for name, data in files.items():
        write_atomic(out_dir / name, data)
