"""The seed papers' methods side by side (issue 7): on the KWS clips and on the Fashion-MNIST CNN
the suite trains, accuracy, Flash, SRAM, BitOPs, search time and QEMU instructions of

- linear int8 (the baseline) and linear 4-bit weights,
- Park et al.'s weighted-entropy weight codebooks at 4, 3 and 2 bits (`--weights wentropy:B`),
- Nayak et al.'s power-of-two weights at 4 bits (`--weights pow2:4`),
- Tang et al.'s learned layer importance with one ILP (`--strategy importance`),
- mpq's exact ILP over QuantMCU's scores (`--strategy exact`).

The weight-scheme rows keep every feature map at 8 bits and need what they need; the two
searches work under the task's SRAM budget (Table II's, which forces sub-byte maps) and the
Flash of the linear 4-bit row, and may choose 8, 4 or 2 bits per weight tensor. Every plan is
exported, built and run on one input under QEMU (cortex-m4) and compared with the integer
reference byte for byte.

    python benchmarks/run.py methods     # also in `--smoke` (KWS, five rows)
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
from common import console, show
from paper_tables import (
    UNBOUNDED,
    Loaded,
    Task,
    data_origins,
    fashion_task,
    kws_task,
    load_task,
    plan_accuracy,
    plan_numbers,
)

from mpq.boards import get_board
from mpq.evaluate import accuracy, float_predictions
from mpq.search.driver import SearchOptions, search
from mpq.verify import verify

TARGET = "qemu-m4"


def weight_rows() -> list[tuple[str, SearchOptions]]:
    """Every map at 8 bits, every weighted layer under one scheme: the budgets do not bind."""
    int8 = SearchOptions(strategy="int8", sram=UNBOUNDED, flash=UNBOUNDED)
    rows = [("linear int8", int8),
            ("linear 4-bit weights", replace(int8, weight_scheme="linear", weight_bits=(4,)))]
    rows += [(f"wentropy:{b} (Park et al.)",
              replace(int8, weight_scheme="wentropy", weight_bits=(b,))) for b in (4, 3, 2)]
    rows.append(("pow2:4 (Nayak et al.)", replace(int8, weight_scheme="pow2", weight_bits=(4,))))
    return rows


def search_rows(sram: int, flash: int) -> list[tuple[str, SearchOptions]]:
    """The two ILPs under the same SRAM and Flash budgets, weights 8/4/2 per layer."""
    opts = SearchOptions(sram=sram, flash=flash, weight_bits=(8, 4, 2))
    return [("importance (Tang et al., LIMPQ ILP)", replace(opts, strategy="importance")),
            ("exact (QuantMCU scores, ILP)", replace(opts, strategy="exact"))]


def _row(task: Task, what: str, opts: SearchOptions, t: Loaded, x1: np.ndarray) -> dict:
    board = get_board(task.board)
    t0 = time.perf_counter()
    # Search time includes calibration, as `mpq search` does (Table II's convention).
    plan = search(task.model, t.graph, board, t.calib, opts).plan
    seconds = time.perf_counter() - t0
    acc = plan_accuracy(plan, t)
    run = verify(plan, t.graph, x1, TARGET)
    nums = plan_numbers(plan, board)
    console.print(f"  {task.label} / {what}: {acc:.4f}, {run.instructions:,} instructions, "
                  f"{run.mismatches} mismatches")
    return {"model": task.label, "method": what, "accuracy": acc, "search_seconds": seconds,
            "sram_budget": opts.sram, "flash_budget": opts.flash, **nums,
            "weights": plan.search.get("weights", "linear"), "target": TARGET,
            "instructions": run.instructions, "elf_flash": run.flash_bytes,
            "mismatches": run.mismatches, "data": task.origin}


SMOKE_METHODS = ("linear int8", "linear 4-bit weights", "wentropy:4 (Park et al.)",
                 "pow2:4 (Nayak et al.)", "importance (Tang et al., LIMPQ ILP)")


def bench_methods(smoke: bool = False) -> dict:
    """One table: every method on both models (see the module docstring); `smoke`: KWS on 300
    clips, `SMOKE_METHODS` only (CI)."""
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tasks = [kws_task(Path(tmp) / "kws", smoke)] + ([] if smoke else [fashion_task()])
        for task in tasks:
            t = load_task(task)
            x1 = next(t.test.batches(1))
            fp = accuracy(float_predictions(task.model, t.graph, t.test), t.test.y)
            rows.append({"model": task.label, "method": "float (onnxruntime)", "accuracy": fp,
                         "data": task.origin})
            flash4 = None
            for what, opts in weight_rows():
                if smoke and what not in SMOKE_METHODS:
                    continue
                row = _row(task, what, opts, t, x1)
                rows.append(row)
                if what == "linear 4-bit weights":
                    # its parameters, plus the code the 8/4/2 search reserves when sub-byte
                    # activations and weights may meet (`driver.code_bound`: the packed,
                    # unpacked and channel-group kernels)
                    from mpq.search.driver import code_bound

                    board = get_board("nano33ble")
                    flash4 = row["flash_params"] \
                        + code_bound(t.graph, board, SearchOptions(weight_bits=(8, 4, 2)))
            for what, opts in search_rows(task.sram, flash4):
                if smoke and what not in SMOKE_METHODS:
                    continue
                rows.append(_row(task, what, opts, t, x1))

    def cells(r: dict) -> list[str]:
        if "sram" not in r:
            return [r["model"], r["method"], f"{r['accuracy']:.4f}"] + ["-"] * 8
        budget = "" if r["sram_budget"] >= UNBOUNDED else f" / {r['sram_budget']:,}"
        return [r["model"], r["method"], f"{r['accuracy']:.4f}", r["weight_bits"],
                r["act_bits"], f"{r['flash_params']:,}", f"{r['elf_flash']:,}",
                f"{r['sram']:,}{budget}", f"{r['bitops'] / 1e6:.1f} M",
                f"{r['search_seconds']:.1f}",
                f"{r['instructions']:,} ({r['mismatches']} mism.)"]

    note = (
        "Top-1 through mpq's integer reference (what the exported C computes; no retraining "
        f"for any method). Data: {data_origins(rows)}. "
        "Weight-scheme rows: every map at 8 bits, budgets unbounded (they report their need). "
        "importance and exact: the task's SRAM budget (as Table II) and the Flash of the linear "
        "4-bit row, weights 8/4/2 per layer, QBR on. Flash params: packed weights, codebooks, "
        "biases and requantisation constants; Flash ELF: the built firmware's text+data "
        "(kernels and the test harness included). Search time: `search()` end to end, "
        "calibration included. Instructions: one inference under QEMU, compared byte for byte "
        "with the integer reference.")
    table = show("Seed methods side by side: weight schemes and bit searches",
                 ["model", "method", "top-1", "weight bits (layers)", "act bits (maps)",
                  "Flash params (B)", "Flash ELF (B)", "peak SRAM (B) / budget", "BitOPs",
                  "search (s)", f"instructions ({TARGET})"],
                 [cells(r) for r in rows], note)
    return {"rows": rows, "table": table}
