"""Per-layer instruction counts of `mpq verify --target qemu-m4|qemu-m7 --per-layer`.

The generated `mpq_model_run` (templates/c/mpq_model.c.j2) holds a comment line
`/* segment K */` where the code of each layer starts, with keys

* `S<k>` — the k-th call of the patch stage (run once per patch), `V` — the VDPC branch choice,
* `L<k>` — the k-th layer-based kernel call (`export_context()["layers"][k]`),
* `O` — copying the outputs to the caller and returning;

the lines before the first one (`P`) are the function's prologue and the patch loop. The
firmware is the ordinary `mpq verify` build (`-g`): its DWARF line table maps every address of
`mpq_model_run` to a source line (for inlined code: the line of the call in `mpq_model_run`)
and so to a segment. Each address that starts a line-table row of a segment becomes a mark of
the icount plugin (`tools/icount/icount.c`, `marks=`): executing it makes that segment
current, and every instruction executed until the next mark (the kernel the layer calls
included) counts for it; code of other files sets no mark. Segment 0 is the harness (from the
window's start to `mpq_model_run`'s first instruction). The segments are summed over all
inferences and add up to the whole-model count exactly; as nothing is added to the code, the
count is the default build's.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path
from typing import Any

from mpq.errors import MpqError
from mpq.ir import Graph
from mpq.plan import Plan

MODEL_FILE = "mpq_model.c"
HARNESS = "harness: window markers, call of mpq_model_run"
_ANCHOR = re.compile(r"^\s*/\* segment ([SLVO]\d*) \*/\s*$")
_ROW = re.compile(r"^" + re.escape(MODEL_FILE) + r"\s+(\d+)\s+(0x[0-9a-f]+|\d+)\b")


def segment_keys(context: dict[str, Any]) -> list[str]:
    """The segment keys of an export context in program order (see the module docstring)."""
    keys = ["P"]
    stage = context.get("stage")
    if stage:
        for k in range(len(stage["calls"])):
            keys.append(f"S{k}")
            if k == 0 and stage.get("vdpc"):
                keys.append("V")
    keys += [f"L{k}" for k in range(len(context["layers"]))]
    keys.append("O")
    return keys


def line_segments(source: str) -> dict[int, str]:
    """{line number (1-based): segment key} for every line of `mpq_model_run` in the generated
    source: `P` from its signature to the first anchor, then each anchor's key up to the next
    anchor, `O` up to the function's closing brace."""
    lines = source.splitlines()
    try:
        first = next(i for i, t in enumerate(lines) if t.startswith("int mpq_model_run("))
        last = next(i for i in range(first, len(lines)) if lines[i] == "}")
    except StopIteration:
        raise MpqError(f"verify --per-layer: no mpq_model_run in {MODEL_FILE}") from None
    out: dict[int, str] = {}
    key = "P"
    for i in range(first, last + 1):
        m = _ANCHOR.match(lines[i])
        if m:
            key = m.group(1)
        out[i + 1] = key
    return out


def code_lines(elf: Path, objdump: str, addr2line: str) -> list[tuple[int, int]]:
    """(address, line of `mpq_model.c`) for every address that starts a row of the DWARF line
    table of `mpq_model.c` (`objdump --dwarf=decodedline`), the line being the outermost one of
    the address's inline chain (`addr2line -i`): for code inlined into `mpq_model_run` (the
    patch stage's and VDPC's static functions) the line of the call there. Addresses whose
    outermost line lies in another file are left out."""
    proc = subprocess.run([objdump, "--dwarf=decodedline", str(elf)], capture_output=True,
                          text=True)
    if proc.returncode != 0:
        raise MpqError(f"{Path(objdump).name} failed on {elf}: "
                       f"{(proc.stderr.strip().splitlines() or ['?'])[0]}")
    addrs = sorted({int(m.group(2), 16) for m in map(_ROW.match, proc.stdout.splitlines())
                    if m})
    proc = subprocess.run([addr2line, "-a", "-i", "-e", str(elf)], capture_output=True,
                          text=True, input="".join(f"0x{a:x}\n" for a in addrs))
    if proc.returncode != 0:
        raise MpqError(f"{Path(addr2line).name} failed on {elf}: "
                       f"{(proc.stderr.strip().splitlines() or ['?'])[0]}")
    out: list[tuple[int, int]] = []
    addr, last = None, None
    for text in [*proc.stdout.splitlines(), "0x0"]:
        if text.startswith("0x"):
            if addr is not None and last is not None:
                where, _, line = last.split(" ")[0].rpartition(":")
                if Path(where).name == MODEL_FILE and line.isdigit():
                    out.append((addr, int(line)))
            addr, last = int(text, 16), None
        else:
            last = text
    return out


def marks(rows: list[tuple[int, int]], lines: dict[int, str], keys: list[str]
          ) -> list[tuple[int, int]]:
    """(address, segment id) marks for the plugin, id = position in `keys` + 1, for the
    addresses (`code_lines`) whose line lies in `mpq_model_run`. MpqError when a segment has no
    address at all (its instructions would count elsewhere)."""
    ids = {k: i + 1 for i, k in enumerate(keys)}
    at: dict[int, int] = {}
    for addr, line in rows:
        if line in lines:
            at[addr] = ids[lines[line]]
    missing = sorted(set(ids.values()) - set(at.values()))
    if missing:
        raise MpqError("verify --per-layer: no code found for segment(s) "
                       + ", ".join(keys[i - 1] for i in missing[:5]) + " in the line table")
    return sorted(at.items())


def _plan_totals(plan: Plan, names: list[str]) -> dict[str, Any]:
    """MACs, BitOPs and bitwidths of the plan layers of one kernel call (a fused conv + add is
    two plan layers: MACs and BitOPs add, the bits are the conv's)."""
    by_name = {layer.name: layer for layer in plan.layers}
    found = [by_name[n] for n in names if n in by_name]
    if not found:
        return {"op": None, "w_bits": None, "a_bits_in": None, "a_bits_out": None,
                "macs": 0, "bitops": 0}
    first = found[0]
    return {"op": " + ".join(x.op for x in found), "w_bits": first.w_bits,
            "a_bits_in": first.a_bits_in, "a_bits_out": found[-1].a_bits_out,
            "macs": sum(int(x.macs) for x in found), "bitops": sum(int(x.bitops) for x in found)}


def rows(plan: Plan, graph: Graph, context: dict[str, Any], segments: dict[int, int],
         samples: int) -> list[dict[str, Any]]:
    """One row per segment: what ran there (layer name, kernel, op, bits, MACs and BitOPs from
    the plan) and its instructions, `instructions_all` summed over the `samples` inferences and
    `instructions` per inference (their mean). Rows without a layer say what they are."""
    keys = segment_keys(context)
    out: list[dict[str, Any]] = []

    def add(key: str, name: str, kernel: str | None, names: list[str], sid: int) -> None:
        total = int(segments.get(sid, 0))
        row = {"segment": key, "layer": name, "kernel": kernel, **_plan_totals(plan, names),
               "instructions_all": total, "instructions": total / samples}
        row["instructions_per_mac"] = (round(row["instructions"] / row["macs"], 4)
                                       if row["macs"] else None)
        out.append(row)

    add("harness", HARNESS, None, [], 0)
    for sid, key in enumerate(keys, start=1):
        if key == "P":
            add(key, "mpq_model_run prologue" + (" and patch loop" if context.get("stage")
                                                 else ""), None, [], sid)
        elif key.startswith("S"):
            c = context["stage"]["calls"][int(key[1:])]
            add(key, c.name, f"{c.kernel} (patch stage)", [c.name], sid)
        elif key == "V":
            add(key, "VDPC branch choice (patch stage)", None, [], sid)
        elif key.startswith("L"):
            layer = context["layers"][int(key[1:])]
            kernel = layer.cmsis.label if layer.cmsis is not None else layer.kernel
            add(key, layer.name, kernel, layer.name.split(" + "), sid)
        else:
            add(key, "output copy and return", None, [], sid)
    if sum(r["instructions_all"] for r in out) != sum(segments.values()):
        raise MpqError("verify --per-layer: the plugin reported segments the build has no "
                       "label for")
    return out
