"""Weight schemes (DESIGN §7.4): top-1 accuracy and weight bytes per scheme, and Park et al.'s
log-domain activations beside linear ones.

    python benchmarks/run.py weight_schemes    # benchmarks/results/weight_schemes.json

On the KWS clips (calibrated on the first 100, evaluated on the other 900, as the tests'
`kws` fixture) and on the Fashion-MNIST CNN the suite trains (`paper_tables.fashion_task`):
activations at 8 bits with entropy ranges, every weighted layer under one scheme — linear (per
channel), wentropy (Park et al.) and pow2 (Nayak et al.), both on per-channel normalised
weights, sym / asym (Nayak et al., per layer) — through the integer reference.
Weight bytes are those of the blob export writes (packed codes + codebooks; asym, which export
refuses, counts its b-bit codes), raw, gzip and lzma. Then the activations at 8 and 4 bits,
linear (integer reference) against log levels (float fake quantisation), weights linear:8.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from common import show  # noqa: E402
from paper_tables import fashion_task  # noqa: E402

from mpq.evaluate import LogActivations, accuracy, float_predictions, quant_predictions  # noqa: E402,E501
from mpq.frontend import load_model  # noqa: E402
from mpq.quant import arith  # noqa: E402
from mpq.quant.calibrate import calibrate, dataset_from_array  # noqa: E402
from mpq.quant.pipeline import quantise  # noqa: E402
from mpq.quant.qmodel import with_weight_scheme  # noqa: E402
from mpq.quant.weights import (  # noqa: E402
    EXPORT_BITS,
    WeightSpec,
    compressed_sizes,
    encode,
    weight_blob,
)

SHARED = REPO.parent / "shared" / "models"
SCHEMES = (["linear:8", "linear:4", "wentropy:4", "wentropy:3", "wentropy:2", "pow2:4",
            "pow2:3"] + [f"sym:{b}" for b in range(8, 2, -1)]
           + [f"asym:{b}" for b in range(8, 2, -1)])


def _cases() -> list[tuple[str, Path, tuple, tuple]]:
    d = np.load(SHARED / "kws01_mfcc_int8_1000.npz")
    x = (d["x"].astype(np.float32) - 83) * np.float32(0.5847029)
    fashion = fashion_task()
    fc, ft = np.load(fashion.calib), np.load(fashion.test)
    n = fashion.sweep_test  # 19 schemes: the first 2,000 test images keep the suite < 20 min
    return [("KWS DS-CNN (900 clips)", SHARED / "kws_ref_model_fp32.onnx",
             (x[:100], d["y"][:100]), (x[100:], d["y"][100:])),
            (f"{fashion.label} (first {n:,} test images)", fashion.model,
             (fc["x"], fc["y"]), (ft["x"][:n], ft["y"][:n]))]


def _blob_sizes(qm) -> dict[str, int]:
    layers = [lq for lq in qm.layers.values() if lq.weight is not None]
    first = layers[0]
    if first.weight_bits not in EXPORT_BITS[first.weight_scheme]:
        # no stored format (asym, sym at 7…5 bits): the values' b-bit codes alone
        raw = b"".join(arith.pack(lq.weight, lq.weight_bits).tobytes() for lq in layers)
        return compressed_sizes(raw)
    return compressed_sizes(weight_blob([encode(lq.weight, lq.weight_scheme, lq.weight_bits,
                                                lq.weight_codebook) for lq in layers]))


def bench_weight_schemes() -> dict:
    out: dict = {"models": []}
    tables = []
    for label, path, (cx, cy), (tx, ty) in _cases():
        graph = load_model(path)
        calib = dataset_from_array(cx, "calib", cy)
        test = dataset_from_array(tx, "test", ty)
        stats = calibrate(graph, calib)
        base = quantise(graph, stats, 8, "entropy")
        fp = accuracy(float_predictions(path, graph, test), ty)
        rows, records = [], []
        for text in SCHEMES:
            scheme, bits = text.split(":")
            t0 = time.perf_counter()
            qm = with_weight_scheme(base, WeightSpec(scheme, int(bits)))
            seconds = time.perf_counter() - t0
            acc = accuracy(quant_predictions(qm, test, batch_size=256), ty)
            sizes = _blob_sizes(qm)
            records.append({"weights": text, "top1": acc, **sizes,
                            "exportable": int(bits) in EXPORT_BITS[scheme],
                            "quantise_seconds": round(seconds, 2)})
            stored = int(bits) in EXPORT_BITS[scheme]
            rows.append([text + ("" if stored else " (ref. only)"), f"{acc:.4f}",
                         f"{sizes['raw']:,}", f"{sizes['gzip']:,}", f"{sizes['lzma']:,}"])
            print(f"{label} {text}: {acc:.4f} {sizes}", flush=True)
        tables.append(show(f"{label}: weights (activations 8-bit, entropy ranges); float "
                           f"{fp:.4f}", ["weights", "top-1", "raw B", "gzip B", "lzma B"], rows))
        log_acts = LogActivations(graph, calib)
        acts = []
        for b in (8, 4):
            qm = quantise(graph, stats, b, "entropy")
            lin = accuracy(quant_predictions(qm, test, batch_size=256), ty)
            log = accuracy(log_acts.predictions(qm, b, test), ty)
            acts.append({"act_bits": b, "linear": lin, "log": log})
            print(f"{label} act{b}: linear {lin:.4f} log {log:.4f}", flush=True)
        tables.append(show(f"{label}: activations (weights linear:8)",
                           ["act bits", "linear (integer ref.)", "log levels (Park et al.)"],
                           [[str(a["act_bits"]), f"{a['linear']:.4f}", f"{a['log']:.4f}"]
                            for a in acts]))
        out["models"].append({"model": label, "float": fp, "weights": records,
                              "activations": acts})
    out["tables"] = tables
    return out

