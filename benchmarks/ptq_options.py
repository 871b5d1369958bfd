"""Post-training quantisation options (issue 13 item 3, DESIGN §4.5): top-1 with each one off
and on, through `mpq eval` and `mpq search` as a user runs them.

    python benchmarks/run.py ptq_options    # benchmarks/results/ptq_options.json

Models: the KWS DS-CNN on the shared clips (calibrate on the first 100, test on the other
900; float input = (x − 83)·0.5847029) and the Fashion example (examples/fashion: calib.npz
256 images, test.npz 1,000). For uniform 4-bit activations (input, output and softmax stay 8)
and every weighted layer at linear 4 or 2 bits, `mpq eval MODEL --act-bits 4 --weights
linear:B` with the range method (entropy, the default of `mpq search`, or mse), bias correction
and AdaRound switched one at a time and all together. Then `mpq search` (default strategy,
`--weight-bits 8,4,2`) at one tight SRAM budget per model with the options off and all on,
`mpq eval PLAN` on the test set, and `mpq verify --target host` of the all-on plan (integer
reference = C, byte for byte). The CLI runs in-process (click's runner), so every number is
what the command prints with `--json`.
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from click.testing import CliRunner

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from common import show  # noqa: E402

from mpq.cli import main  # noqa: E402

SHARED = REPO.parent / "shared" / "models"
FASHION = REPO / "examples" / "fashion"
KWS_ZP, KWS_SCALE = 83, np.float32(0.5847029)

# (label, --method, --bias-correction, --adaround)
VARIANTS = [("entropy (default)", "entropy", False, False),
            ("mse", "mse", False, False),
            ("entropy + bias corr.", "entropy", True, False),
            ("entropy + AdaRound", "entropy", False, True),
            ("entropy + bias corr. + AdaRound", "entropy", True, True),
            ("mse + bias corr.", "mse", True, False),
            ("mse + bias corr. + AdaRound", "mse", True, True)]
SEARCHES = [[], ["--bias-correction", "--adaround"],
            ["--method", "mse", "--bias-correction", "--adaround"]]


def _mpq(*args: object) -> dict:
    """One `mpq ... --json` run in-process; its JSON, or an error with the command's stderr."""
    result = CliRunner().invoke(main, [str(a) for a in args])
    if result.exit_code != 0:
        raise RuntimeError(f"mpq {' '.join(map(str, args))}: {result.stderr or result.output}")
    return json.loads(result.stdout)


def _cases(tmp: Path) -> list[dict]:
    """Model, calibration and test files, and the tight SRAM budget of each model."""
    d = np.load(SHARED / "kws01_mfcc_int8_1000.npz")
    x = (d["x"].astype(np.float32) - KWS_ZP) * KWS_SCALE
    np.savez(tmp / "kws_calib.npz", x=x[:100], y=d["y"][:100])
    np.savez(tmp / "kws_test.npz", x=x[100:], y=d["y"][100:])
    shutil.copy(SHARED / "kws_ref_model_fp32.onnx", tmp / "kws.onnx")
    shutil.copy(FASHION / "fashion_cnn.onnx", tmp / "fashion.onnx")
    return [{"label": "KWS DS-CNN (900 clips)", "model": tmp / "kws.onnx",
             "calib": tmp / "kws_calib.npz", "test": tmp / "kws_test.npz", "sram": 11332},
            {"label": "Fashion example (1,000 images)", "model": tmp / "fashion.onnx",
             "calib": FASHION / "calib.npz", "test": FASHION / "test.npz", "sram": 12800}]


def _eval_variants(case: dict, stats: Path) -> tuple[float, list[dict]]:
    records = []
    fp = None
    for w_bits in (4, 2):
        for label, method, bc, ada in VARIANTS:
            args = ["eval", case["model"], "--data", case["test"], "--stats", stats,
                    "--calib", case["calib"], "--act-bits", "4", "--method", method,
                    "--weights", f"linear:{w_bits}", "--json", "-q"]
            args += ["--bias-correction"] if bc else []
            args += ["--adaround"] if ada else []
            t0 = time.perf_counter()
            out = _mpq(*args)
            seconds = time.perf_counter() - t0
            fp = out["float"]
            records.append({"weights": f"linear:{w_bits}", "act_bits": 4, "variant": label,
                            "method": method, "bias_correction": bc, "adaround": ada,
                            "top1": out["act4"], "seconds": round(seconds, 1)})
            print(f"{case['label']} W{w_bits}A4 {label}: {out['act4']:.4f} "
                  f"({seconds:.1f} s)", flush=True)
    return fp, records


def _search(case: dict, tmp: Path, options: list[str]) -> dict:
    on = bool(options)
    plan = tmp / f"{case['model'].stem}_{len(options)}.plan.json"
    args = ["search", case["model"], "--board", "nano33ble", "--data", case["calib"],
            "--sram", case["sram"], "--weight-bits", "8,4,2", "-o", plan, "--json", "-q"]
    t0 = time.perf_counter()
    summary = _mpq(*args, *options)
    seconds = time.perf_counter() - t0
    acc = _mpq("eval", plan, "--data", case["test"], "--json", "-q")
    data = json.loads(plan.read_text())
    w_bits = sorted({layer["w_bits"] for layer in data["layers"] if layer["w_bits"]})
    a_bits = sorted({t["bits"] for t in data["tensors"]})
    record = {"options": " ".join(options) if on else "(none)", "plan": acc["plan"],
              "int8": acc["int8"], "float": acc["float"],
              "sram_needed": summary["predicted"]["sram_needed_bytes"],
              "weight_bits": w_bits, "act_bits": a_bits, "search_seconds": round(seconds, 1)}
    if on:
        check = _mpq("verify", plan, "--target", "host", "--data", case["test"],
                     "--samples", 16, "--json")
        record["verify_host_mismatches"] = check["mismatches"]
        record["verify_samples"] = check["samples"]
    print(f"{case['label']} search: {record}", flush=True)
    return record


def bench_ptq_options() -> dict:
    out: dict = {"models": []}
    tables = []
    with tempfile.TemporaryDirectory() as tmp_dir:
        tmp = Path(tmp_dir)
        for case in _cases(tmp):
            stats = tmp / f"{case['model'].stem}.stats.npz"
            CliRunner().invoke(main, ["calibrate", str(case["model"]), "--data",
                                      str(case["calib"]), "-o", str(stats), "-q"])
            fp, records = _eval_variants(case, stats)
            searches = [_search(case, tmp, options) for options in SEARCHES]
            rows = []
            for label, *_ in VARIANTS:
                accs = {r["weights"]: r for r in records if r["variant"] == label}
                rows.append([label, f"{accs['linear:4']['top1']:.4f}",
                             f"{accs['linear:2']['top1']:.4f}",
                             f"{accs['linear:4']['seconds']:.0f} / "
                             f"{accs['linear:2']['seconds']:.0f}"])
            tables.append(show(f"{case['label']}: uniform 4-bit activations, linear weights "
                               f"(mpq eval; float {fp:.4f})",
                               ["PTQ", "W4A4 top-1", "W2A4 top-1", "eval s (W4 / W2)"], rows))
            tables.append(show(
                f"{case['label']}: mpq search --sram {case['sram']:,} --weight-bits 8,4,2 "
                "(nano33ble), then mpq eval PLAN",
                ["options", "plan top-1", "int8 top-1", "SRAM needed B", "weight bits",
                 "act bits", "search s", "verify host"],
                [[s["options"], f"{s['plan']:.4f}", f"{s['int8']:.4f}", f"{s['sram_needed']:,}",
                  ",".join(map(str, s["weight_bits"])), ",".join(map(str, s["act_bits"])),
                  f"{s['search_seconds']:.0f}",
                  f"{s['verify_host_mismatches']} mismatches / {s['verify_samples']}"
                  if "verify_host_mismatches" in s else "—"] for s in searches]))
            out["models"].append({"model": case["label"], "float": fp, "eval": records,
                                  "search": searches})
    out["tables"] = tables
    return out
