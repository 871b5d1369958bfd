"""Measure the latency table (kernels/latency_table.json) that `mpq.latency` predicts from.

    python tools/latency_table.py                 # every case, qemu-m4; rewrites the table
    python tools/latency_table.py --targets qemu-m4,qemu-m7
    python tools/latency_table.py --cases fashion --out /tmp/t.json   # a quick partial table

Per case (the shared models and the Fashion example) and per bit variant (int8; every map at 4
bits with 8-bit weights; 4-bit weights with 8-bit and with 4-bit maps; 2-bit maps and weights;
the default accuracy-first search's mixed plan at 0.5× of the int8 SRAM need), the plan is
searched layer-based (`--patches none`), exported and run under QEMU with `mpq verify
--per-layer` on 2 inputs (bit-exact or the tool stops). One more plan, `patch` (the default
search on the Fashion example at the demo's 14,000 B, calibrated on the tool's 64 samples: an
11-layer patch stage), gives the residual adds a patch stage
keeps unfused (layer-based plans fuse every add into its conv): each such add's instructions
divided by the stage's recomputation ratio (patched / whole-map MACs), the factor
`mpq.latency.search_prediction` multiplies stage layers by. Every layer row becomes a point
(MACs, outputs, instructions per inference) of its key (`mpq.latency.layer_key`); each key gets
a non-negative least-squares fit `a·MACs + b·outputs + c` (`mpq.latency.fit`). The table records
the machine, the tool versions and the plans measured. Regenerate it after changing a kernel.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from mpq.boards import get_board  # noqa: E402
from mpq.errors import MpqError  # noqa: E402
from mpq.frontend import load_model  # noqa: E402
from mpq.latency import (  # noqa: E402
    REGENERATE,
    TABLE_SCHEMA,
    check_table,
    evaluate,
    fit,
    layer_key,
    plan_layer_features,
    stage_ratio,
    table_path,
)
from mpq.quant.calibrate import dataset_from_array, load_dataset, onnx_input_shape  # noqa: E402
from mpq.search.driver import SearchOptions, search  # noqa: E402
from mpq.verify import verify  # noqa: E402
from tools.toolchain import cross_versions  # noqa: E402

SHARED = REPO.parent / "shared" / "models"
FASHION = REPO / "examples" / "fashion"

#: name -> (model file, input scale of the random calibration data, or None: the example's own)
CASES: dict[str, tuple[Path, float | None]] = {
    "fashion": (FASHION / "fashion_cnn.onnx", None),
    "resnet8": (SHARED / "pretrainedResnet.onnx", 255.0),
    "vww": (SHARED / "vww_96_float.onnx", 1.0),
    "kws": (SHARED / "kws_ref_model_fp32.onnx", 1.0),
    "ad": (SHARED / "ad01_fp32.onnx", 1.0),
}

#: variant -> search options (all layer-based); "mixed" is the default search at half the
#: int8 SRAM need.
VARIANTS: dict[str, dict] = {
    "int8": {"strategy": "int8"},
    "w8a4": {"strategy": "qe", "bits": (4,)},
    "w4a8": {"strategy": "qe", "bits": (8,), "weight_scheme": "linear", "weight_bits": (4,)},
    "w4a4": {"strategy": "qe", "bits": (4,), "weight_scheme": "linear", "weight_bits": (4,)},
    "w2a2": {"strategy": "qe", "bits": (2,), "weight_scheme": "linear", "weight_bits": (2,)},
    "mixed": {},
    "patch": {"patches": "auto", "sram": 14_000},  # stage adds only (module docstring)
}


def machine() -> dict:
    """What the counts depend on: the cross compiler and QEMU (not the host: counts are exact
    instructions), plus the kernels' source digest."""
    import hashlib

    from mpq.resources import data_dir

    h = hashlib.sha256()
    for p in sorted(data_dir("kernels").glob("*.[ch]")):
        h.update(p.name.encode() + b"\0" + p.read_bytes())
    return {**cross_versions(), "python": platform.python_version(),
            "kernels_sha256": h.hexdigest()[:16]}


def _data(name: str, graph, scale: float | None):
    if scale is None:
        ds = load_dataset(FASHION / "calib.npz", graph)
        x = np.concatenate(list(ds.batches(256)))[:64].astype(np.float32)
        test = np.load(FASHION / "test.npz")["x"][:2].astype(np.float32)
        return dataset_from_array(x, name), test
    x = (np.random.default_rng(0).random((32, *onnx_input_shape(graph))) * scale)
    x = x.astype(np.float32)
    return dataset_from_array(x, name), x[:2]


def measure_plan(case: str, variant: str, path: Path, scale: float | None,
                 targets: list[str], log=print) -> dict:
    """Search one variant of one case, run it per layer on every target; the points."""
    graph = load_model(path)
    data, x = _data(case, graph, scale)
    board = get_board("nano33ble")
    opts = VARIANTS[variant]
    if variant == "mixed":
        int8 = search(path, graph, board, data,
                      SearchOptions(strategy="int8", patches="none")).plan
        sram = int(0.5 * int8.predicted["sram_needed_bytes"])
        try:
            plan = search(path, graph, board, data,
                          SearchOptions(patches="none", sram=sram)).plan
        except MpqError:  # half the int8 need is out of reach layer-based: the unconstrained
            plan = search(path, graph, board, data, SearchOptions(patches="none")).plan
    else:
        plan = search(path, graph, board, data,
                      SearchOptions(**{"patches": "none", **opts})).plan
    if variant == "patch" and plan.patch is None:
        raise MpqError(f"{case}: the {variant} variant's plan has no patch stage")
    ratio = 1.0
    if plan.patch is not None:
        stage = set(plan.patch["stage_nodes"])
        ratio = stage_ratio(sum(layer.macs for layer in plan.layers if layer.name in stage),
                            plan.patch["redundant_macs"])
    fused = {add: v["conv"] for add, v in plan.schedule.get("fused_adds", {}).items()}
    features = plan_layer_features(graph, fused)
    by_name = {n.name: n for n in graph.nodes}
    add_of_conv = {conv: add for add, conv in fused.items()}
    bits = {t.name: t.bits for t in plan.tensors}
    w_bits = {layer.name: layer.w_bits for layer in plan.layers}
    out = {"case": case, "variant": variant, "points": {}}
    for target in targets:
        result = verify(plan, graph, x, target, per_layer=True)
        if result.mismatches:
            raise SystemExit(f"{case}/{variant} on {target}: {result.mismatches} mismatched "
                             "bytes: not measuring a wrong export")
        points = []
        for row in result.per_layer:
            name = row["layer"].split(" + ")[0]
            if variant == "patch":  # the stage's unfused adds only
                if not (row["segment"].startswith("S") and features[name]["kind"] == "add"):
                    continue
            elif not row["segment"].startswith("L"):
                continue
            node, f = by_name[name], features[name]
            out_node = by_name[add_of_conv[name]] if name in add_of_conv else node
            key = layer_key(f["kind"], f["shape"], w_bits.get(name) if node.weight is not None
                            else None, bits.get(node.inputs[0], 8),
                            bits.get(out_node.outputs[0], 8))
            per = row["instructions_all"] // result.samples  # layer-based: identical runs
            if row["segment"].startswith("S"):
                per = round(per / ratio)  # per whole map, as the search scales it back
            points.append((key, name, f["macs"], f["outputs"], per))
        out["points"][target] = points
        out.setdefault("instructions", {})[target] = result.instructions
        log(f"{case:8} {variant:6} {target}: {result.instructions:,} instructions, "
            f"{len(points)} layers", flush=True)
    return out


def build_table(measured: list[dict], targets: list[str]) -> dict:
    """Fit every key of every target over the measured points."""
    table = {"schema": TABLE_SCHEMA, "generated_by": REGENERATE, "machine": machine(),
             "model": "instructions = a·MACs + b·outputs + c per key (NNLS)",
             "plans": [{"case": m["case"], "variant": m["variant"],
                        "instructions": m["instructions"],
                        "stage_adds_only": m["variant"] == "patch",
                        "layers": {t: [[key, int(macs), int(outputs), int(per)]
                                       for key, _, macs, outputs, per in m["points"][t]]
                                   for t in targets}} for m in measured],
             "targets": {}}
    for target in targets:
        pts: dict[str, list[list[int]]] = {}
        for m in measured:
            for key, _, macs, outputs, per in m["points"][target]:
                pts.setdefault(key, []).append([int(macs), int(outputs), int(per)])
        entries = {}
        for key in sorted(pts):
            p = sorted(pts[key])
            f = fit([tuple(q) for q in p])
            err = max(abs(evaluate(f, m_, o) - i) / max(i, 1) for m_, o, i in p)
            entries[key] = {"fit": {k: round(v, 6) for k, v in f.items()}, "points": p,
                            "max_rel_error": round(err, 4)}
        table["targets"][target] = {"entries": entries}
    check_table(table)
    return table


#: What the shipped table measures (the AD autoencoder's FC layers and the "mixed" variant are
#: covered by the others' keys; add them with --cases/--variants).
DEFAULT_CASES = ("fashion", "resnet8", "kws", "vww")
DEFAULT_VARIANTS = ("int8", "w8a4", "w4a8", "w4a4", "w2a2")
DEFAULT_EXTRA = (("fashion", "patch"),)  # (case, variant) measured besides the grid


def regenerate(cases=DEFAULT_CASES, variants=DEFAULT_VARIANTS, targets=("qemu-m4",),
               out: Path | None = None, extra=DEFAULT_EXTRA) -> dict:
    """Measure every case × variant (and each `extra` (case, variant) of those cases) on
    every target, fit, write the table to `out` (default: the shipped
    kernels/latency_table.json) and return it."""
    measured = []
    for case in cases:
        path, scale = CASES[case]
        if not path.is_file():
            print(f"{case}: {path} missing, skipped", file=sys.stderr)
            continue
        for variant in [*variants, *(v for c, v in extra if c == case and v not in variants)]:
            try:
                measured.append(measure_plan(case, variant, path, scale, list(targets)))
            except MpqError as exc:
                print(f"{case:8} {variant:6}: skipped ({exc})", file=sys.stderr, flush=True)
    table = build_table(measured, list(targets))
    out = out or table_path()
    out.write_text(json.dumps(table, indent=1, sort_keys=True) + "\n")
    return table


def summary_rows(table: dict, target: str = "qemu-m4") -> tuple[list[list[str]], list[list[str]]]:
    """Two tables' rows: per key its fit and points; per measured plan the measured
    instructions beside the sum of its layers' fits (+ the glue outside layers, unmodelled)."""
    entries = table["targets"][target]["entries"]
    keys = [[k, f"{e['fit']['a']:.3f}", f"{e['fit']['b']:.2f}", f"{e['fit']['c']:.0f}",
             str(len(e["points"])),
             f"{min(p[2] / p[0] for p in e['points'] if p[0]):.2f}" if any(
                 p[0] for p in e["points"]) else "",
             f"{100 * e['max_rel_error']:.1f} %"] for k, e in sorted(entries.items())]
    plans = []
    for p in table["plans"]:
        if p.get("stage_adds_only"):
            continue  # its points are the stage's adds, not a whole plan
        measured = p["instructions"][target]
        pred = sum(evaluate(entries[k]["fit"], m, o) for k, m, o, _ in p["layers"][target])
        plans.append([p["case"], p["variant"], f"{measured:,}", f"{pred:,.0f}",
                      f"{100 * (pred - measured) / measured:+.1f} %"])
    return keys, plans


def main(argv: list[str]) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", default=",".join(DEFAULT_CASES),
                    help=f"of {', '.join(CASES)}")
    ap.add_argument("--variants", default=",".join(DEFAULT_VARIANTS),
                    help=f"of {', '.join(VARIANTS)}")
    ap.add_argument("--targets", default="qemu-m4")
    ap.add_argument("--out", type=Path, default=table_path())
    args = ap.parse_args(argv)
    table = regenerate(args.cases.split(","), args.variants.split(","),
                       args.targets.split(","), args.out)
    n = sum(len(t["entries"]) for t in table["targets"].values())
    print(f"{len(table['plans'])} plans, {n} keys → {args.out}")


if __name__ == "__main__":
    main(sys.argv[1:])
