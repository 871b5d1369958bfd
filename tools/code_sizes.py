"""Measure the Flash of mpq's generated code with arm-none-eabi-gcc: `kernels/code_sizes.json`.

    PYTHONPATH=. python -m tools.code_sizes PLAN.json [PLAN.json …]
    PYTHONPATH=. python -m tools.code_sizes --try cortex-m4/fpv4-sp-d16 PLAN.json …  # one CPU,
                                                        # to ./code_sizes.try.json

For each CPU of the shipped boards (their GCC flags), with the flags `mpq export --build` uses:

* ``families``: each kernel family of `mpq.codegen.export.KERNEL_SOURCES` linked alone (a main
  that only takes the address of ``mpq_<family>``, ``--gc-sections``): every symbol the family
  pulls in, ``file:name → bytes`` (code, constants; libgcc helpers as ``?:name``). A model's
  kernel code is the size of the union over its families (shared helpers counted once). The
  channel-group entry points of the sub-byte depthwise and pooling (``depthwise_inplace_grouped``,
  ``avgpool_grouped``, ``maxpool_grouped``; `mpq.budget.GROUPED_KERNELS`) are families of their
  own, so ``depthwise_inplace``, ``avgpool`` and ``maxpool`` hold only what int8 layers link.
  Their ``per_call`` (and stage ``per_call``) entries come from sample plans with 4- or 2-bit
  depthwise / pooling layers; without one the predictor takes the plain kernel's call.
* ``per_call``: the bytes one more call of a kernel adds to ``mpq_model.c`` (its call code and
  its static parameter blocks): the export of a plan given on the command line, re-rendered
  with that plan's first layer of the family repeated 1 and 3 times, linked, and the
  difference halved. ``base``: what ``mpq_model.c`` takes besides its calls (median over the
  samples).

* ``stage``: the same for the patch stage of the patch plans given, for stages with VDPC's
  outlier branch (``vdpc``) and without (``plain``): ``per_call``, one more stage call of a
  kernel, its geometry table taken out; ``base``, the patch loop (and the outlier test, its
  per-patch table taken out). A stage kernel no sample has is predicted from its layer call.
* ``stack``: the deepest stack a call of each family's entry takes and ``run``, the most
  ``mpq_model_run`` adds on top of its deepest kernel over the samples — from GCC's call graph
  (``-fcallgraph-info=su``) of the same builds.

The compiler's version is recorded; `mpq.budget` reads the table to predict Flash. Run it again
after a kernel changes (the test `test_budget.py::test_code_table_is_current` says when).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from mpq import firmware
from mpq.boards import list_boards
from mpq.budget import (
    HARNESS_FILES,
    STACK_FLAG,
    read_call_graph,
    stack_depth,
    symbol_breakdown_symbols,
)
from mpq.codegen.export import KERNEL_SOURCES, c_sources, export_context, library_sources
from mpq.codegen.render import render
from mpq.plan import load_plan_with_model
from mpq.resources import data_dir

OUT = data_dir("kernels") / "code_sizes.json"


def _cpus() -> dict[str, list[str]]:
    """GCC CPU flags of the shipped boards, keyed `core/fpu`."""
    return {f"{b.core}/{b.fpu}": b.cpu_flags for b in list_boards()}


def _board_for(key: str):
    return next(b for b in list_boards() if f"{b.core}/{b.fpu}" == key)


def _link(files: dict[str, str], main: str, board, tmp: Path) -> Path:
    work = Path(tempfile.mkdtemp(dir=tmp))
    for name, text in files.items():
        (work / name).write_text(text)
    (work / "main.c").write_text(main)
    sources = [work / n for n in ("main.c", *c_sources(files))]
    return firmware.build_elf(sources, [work], board, work / "build", extra_flags=[STACK_FLAG])


def _graph(elf: Path) -> tuple[dict[str, int], dict[str, set[str]]]:
    """GCC's call graph of a `_link` build (frames and callees)."""
    return read_call_graph(sorted(elf.parent.glob("*.ci")))


def family_symbols(family: str, board, tmp: Path, nm: str) -> tuple[dict[str, int], int]:
    """Symbols (`file:name` → bytes) that linking `mpq_<family>` alone pulls in, and the
    deepest stack a call of it takes."""
    files = library_sources([family])
    main = ('#include <stdint.h>\n#include "mpq_kernels.h"\n'
            f"int main(void) {{ return (int)(uintptr_t)&mpq_{family} == 1; }}\n")
    elf = _link(files, main, board, tmp)
    return {k: v for k, v in symbol_breakdown_symbols(elf, nm).items()
            if k.split(":", 1)[0] not in HARNESS_FILES}, stack_depth(*_graph(elf), f"mpq_{family}")


def model_c_bytes(ctx: dict, layers: list, board, tmp: Path, nm: str,
                  stage: dict | None = None, frames: list | None = None) -> int:
    """Flash of mpq_model.c's symbols when linked with `layers` as its calls (and `stage` as
    its patch stage); `frames` receives `mpq_model_run`'s own stack: its deepest call less the
    deepest kernel entry it reaches."""
    c = {**ctx, "layers": layers, "stage": stage, "arena_static": False}
    files = {"mpq_model.h": render("c/mpq_model.h.j2", **c),
             "mpq_model.c": render("c/mpq_model.c.j2", **c),
             "mpq_weights.h": render("c/mpq_weights.h.j2", **c),
             "mpq_weights.c": render("c/mpq_weights.c.j2", **c),
             **library_sources(sorted({la.kernel for la in layers} | set(ctx["kernels"])))}
    main = ('#include <stdint.h>\n#include "mpq_model.h"\n'
            "static int8_t in[MPQ_INPUT_BYTES], out[MPQ_OUTPUTS_BYTES];\n"
            "int main(void) {\n"
            "    int8_t *outs[MPQ_NUM_OUTPUTS];\n"
            "    int32_t at = 0;\n"
            "    for (int k = 0; k < MPQ_NUM_OUTPUTS; k++) {\n"
            "        outs[k] = out + at;\n"
            "        at += mpq_outputs[k].bytes;\n"
            "    }\n"
            "    return mpq_model_run(in, outs);\n"
            "}\n")
    elf = _link(files, main, board, tmp)
    if frames is not None:
        graph = _graph(elf)
        kernels = {f"mpq_{la.kernel}" for la in layers} | {
            f"mpq_{k}" for c in (stage or {}).get("calls", [])
            for k in (c.kernel, *c.branch_kernels.values())}
        frames.append(stack_depth(*graph, "mpq_model_run") - max(
            (stack_depth(*graph, k) for k in kernels if k in graph[0]), default=0))
    return sum(v for k, v in symbol_breakdown_symbols(elf, nm).items()
               if k.startswith("mpq_model.c:"))


def geometry_bytes(call, patches: int) -> int:
    """Bytes of a stage call's geometry table (`mpq_geo_<i>`: int16 per field)."""
    return 2 * patches * len(call.geometry[0])


def stage_sizes(ctx: dict, board, tmp: Path, nm: str, variants: dict[str, dict],
                frames: list[int]) -> None:
    """The patch stage of one sample plan, in `variants["vdpc"]` or `variants["plain"]` (with
    VDPC the calls keep both branches' parameters, without it the compiler folds branch 1
    away): per kernel, the bytes one more stage call adds (its function and parameter
    blocks; the stage rendered with its first call of the kernel once and three times, the
    difference halved, the geometry table taken out), and the rest of the stage (`bases`: the
    patch loop, with VDPC its outlier test and per-patch byte table)."""
    stage = ctx["stage"]
    patches = stage["patches"]
    v = variants.setdefault("vdpc" if stage["vdpc"] is not None else "plain",
                            {"per_call": {}, "bases": []})
    without = model_c_bytes(ctx, ctx["layers"], board, tmp, nm)
    model_c_bytes(ctx, ctx["layers"], board, tmp, nm, stage, frames)  # the whole model's

    def with_calls(calls: list) -> int:
        return model_c_bytes(ctx, ctx["layers"], board, tmp, nm, {**stage, "calls": calls})

    for call in stage["calls"]:
        if call.kernel in v["per_call"]:
            continue
        copies = [dataclasses.replace(call, index=1000 + i) for i in range(3)]
        one = with_calls(copies[:1])
        three = with_calls(copies)
        geo = geometry_bytes(call, patches)
        v["per_call"][call.kernel] = (three - one) // 2 - geo
        vdpc_table = 4 * patches if stage["vdpc"] is not None else 0  # `stage_table_bytes`
        v["bases"].append(one - without - v["per_call"][call.kernel] - geo - vdpc_table)


def main(argv: list[str]) -> int:
    out, only = OUT, None
    if argv[:1] == ["--try"]:  # a trial on one CPU, into the current directory, not the table
        out, only, argv = Path("code_sizes.try.json"), argv[1], argv[2:]
    tools = firmware.require_tools()
    version = subprocess.run([tools.cc, "--version"], capture_output=True,
                             text=True).stdout.splitlines()[0]
    kernels = data_dir("kernels")
    table: dict = {"compiler": version, "flags": list(firmware._CFLAGS),
                   "sources_sha256": {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
                                      for p in sorted(kernels.glob("*.[ch]"))},
                   "cpus": {}}
    samples, stage_samples = [], []
    for path in argv:
        plan, _, graph = load_plan_with_model(Path(path))
        (stage_samples if plan.patch is not None else samples).append(
            export_context(plan, graph))
    with tempfile.TemporaryDirectory(prefix="mpq-code-sizes-") as t:
        tmp = Path(t)
        for key in sorted(k for k in _cpus() if only in (None, k)):
            board = _board_for(key)
            measured = {f: family_symbols(f, board, tmp, tools.nm) for f in sorted(KERNEL_SOURCES)}
            fams = {f: m[0] for f, m in measured.items()}
            frames: list[int] = []
            per_call: dict[str, int] = {}
            bases: list[int] = []
            for ctx in samples:
                model_c_bytes(ctx, ctx["layers"], board, tmp, tools.nm, None, frames)
                for layer in ctx["layers"]:
                    if layer.kernel in per_call or layer.kernel == "cmsis":
                        continue
                    one = model_c_bytes(ctx, [layer], board, tmp, tools.nm)
                    three = model_c_bytes(ctx, [layer, dataclasses.replace(layer),
                                                dataclasses.replace(layer)], board, tmp,
                                          tools.nm)
                    per_call[layer.kernel] = (three - one) // 2
                    bases.append(one - per_call[layer.kernel])
            variants: dict[str, dict] = {}
            for ctx in stage_samples:
                stage_sizes(ctx, board, tmp, tools.nm, variants, frames)
            table["cpus"][key] = {"families": fams, "per_call": dict(sorted(per_call.items())),
                                  "base": int(statistics.median(bases)) if bases else 0,
                                  "stage": {k: {"per_call": dict(sorted(v["per_call"].items())),
                                                "base": int(statistics.median(v["bases"]))}
                                            for k, v in sorted(variants.items())},
                                  "stack": {"families": {f: m[1] for f, m in measured.items()},
                                            "run": max(frames, default=0)}}
            print(f"{key}: " + ", ".join(f"{f} {sum(s.values()):,} B"
                                         for f, s in fams.items())
                  + f"; per call {per_call}; base {table['cpus'][key]['base']}"
                  + f"; stage {table['cpus'][key]['stage']}")
    out.write_text(json.dumps(table, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    print(f"→ {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
