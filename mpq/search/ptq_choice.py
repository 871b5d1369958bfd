"""PTQ chosen by measurement in the measured strategy (DESIGN §7.4, issue 13 item 3).

Bias correction and AdaRound (`mpq.quant.ptq`) only change parameters, but they do not help
every plan: on the Fashion example's W4A4 model bias correction + AdaRound lift top-1 from
83.4 to 90.8 %, while on KWS with every map at 2 bits bias correction costs ~10 pp (the
per-channel mean shift of a 2-bit map is estimated from few samples and over-corrects). So the
measured strategy does not switch them on blindly: once the plan's bits are chosen, each
applicable fit is run and the plan's damage measured with and without it, and the best is
kept. The measure is the bit search's (Σ over outputs of the KL / NSR, `output_damage`) but
against the *float* model: PTQ aims at float, and with `--weights SCHEME:B` the search's
all-8-bit-activation reference already carries the B-bit weights, so against it the plain
plan would always measure 0.

Honest selection: the fits are made on the calibration samples the measurement does *not*
run on (the complement of `validation_indices`), so a fit is never judged on the samples it
was fitted to; with fewer than `MIN_FIT` such samples nothing is tried. Candidates:

- bias correction, on every plan — the all-8-bit one too: it measures 0 against the search's
  all-8-bit reference, but not against float, and 8-bit maps shift the mean as well. On the
  Fashion example's int8 plan it is kept (damage against float 0.0232 → 0.0156 on the
  validation samples; top-1 on all 10,000 test images 90.98 → 91.08 %, agreement with float
  97.07 → 97.66 %); on KWS's int8 plan it measures worse (0.00132 → 0.00239) and is not;
- AdaRound, and AdaRound + bias correction, when some layer has 4- or 2-bit linear weights.

Nothing is tried when the user set `--bias-correction` / `--adaround` themselves (then exactly
what they asked runs).
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from mpq.interpreter import run_graph, to_ir_layout
from mpq.quant.calibrate import Dataset, dataset_from_array
from mpq.quant.ptq import ADAROUND_ITERS, PtqOptions, PtqResult, apply_ptq
from mpq.quant.qmodel import QuantModel
from mpq.quant.weights import ROUNDING_BITS
from mpq.search.sensitivity import MEASURE_WORKERS, Probe, one_blas_thread

MIN_FIT = 16  # calibration samples outside the validation ones a fit needs

#: The most AdaRound work the measured strategy takes on by itself, in multiply-adds of the
#: Adam steps' Gram products (`adaround_macs`): ~10 s of BLAS on one core. Beyond it (the
#: MobileNetV2-1.0 classifier alone needs 8·10¹¹: minutes) AdaRound is left to `--adaround`,
#: which runs whatever it costs; issue 13 asks for a fit bounded to seconds per layer.
AUTO_ADAROUND_MACS = 5 * 10**10


@dataclass
class PtqChoice:
    """What the measured strategy kept, and what it measured."""

    model: QuantModel
    fitted: PtqResult | None  # None: no fit kept
    options: PtqOptions
    damage: float  # against the all-8-bit model (the search's measure)
    record: dict = field(default_factory=dict)  # plan.search["ptq"]


def roundable(qm: QuantModel) -> bool:
    """Whether some layer has 4- or 2-bit linear weights (what AdaRound rounds)."""
    return any(lq.weight is not None and lq.weight_scheme == "linear"
               and lq.weight_bits in ROUNDING_BITS for lq in qm.layers.values())


def adaround_macs(qm: QuantModel) -> int:
    """Multiply-adds of AdaRound's fit on this model: ADAROUND_ITERS · Σ c_out·d² over the
    layers with 4- or 2-bit linear weights, d the weights per output channel — each Adam step
    multiplies the (c_out × d) weights by the d × d Gram matrix (`mpq.quant.ptq.fit_adaround`;
    grouped layers split the same count over their groups)."""
    total = 0
    for lq in qm.layers.values():
        w = lq.weight
        if w is None or lq.weight_scheme != "linear" or lq.weight_bits not in ROUNDING_BITS:
            continue
        d = int(np.prod(w.shape[1:]))
        total += int(w.shape[0]) * d * d
    return total * ADAROUND_ITERS


def candidates(qm: QuantModel) -> list[tuple[str, PtqOptions]]:
    """The fits worth trying on this model (module docstring), labelled; AdaRound only within
    `AUTO_ADAROUND_MACS`."""
    out = [("bias correction", PtqOptions(bias_correction=True))]
    if roundable(qm) and adaround_macs(qm) <= AUTO_ADAROUND_MACS:
        out += [("AdaRound", PtqOptions(adaround=True)),
                ("AdaRound + bias correction", PtqOptions(bias_correction=True, adaround=True))]
    return out


def float_reference(probe: Probe, x_val: np.ndarray) -> dict[str, np.ndarray]:
    """The float model's measured tensors (a softmax's logits, else the output) on the
    validation inputs, in the IR layout the probe's outputs use: the probe's own float run
    (`Probe.float_outputs`) when `x_val` are its inputs."""
    if x_val.shape == probe.x_val.shape and np.array_equal(x_val, probe.x_val):
        return probe.float_outputs()[0]
    g = probe.graph
    name = g.inputs[0]
    wanted = {t for t, _ in probe.measure}
    runs: list[dict[str, np.ndarray]] = []
    for i in range(0, len(x_val), 64):
        kept: dict[str, np.ndarray] = {}
        run_graph(g, {name: to_ir_layout(g, name, x_val[i:i + 64])},
                  observe=lambda t, v, kept=kept: kept.update({t: v}) if t in wanted else None)
        runs.append(kept)
    return {t: np.concatenate([r[t] for r in runs]) for t, _ in probe.measure}


def model_outputs(probe: Probe, qm: QuantModel) -> dict[str, np.ndarray]:
    """The probe's measured tensors of `qm` on the validation samples; the whole network runs
    from the probe's cached input."""
    return probe.outputs(qm, {n.name for n in qm.graph.nodes})


def model_damage(probe: Probe, qm: QuantModel,
                 reference: dict[str, np.ndarray] | None = None) -> float:
    """Σ over the probe's measured outputs of the damage of `qm` on the validation samples
    against `reference` (default: the probe's all-8-bit model)."""
    return probe.damage_against(model_outputs(probe, qm), reference)


def fit_data(data: Dataset, validation: np.ndarray) -> Dataset | None:
    """The calibration samples outside `validation` (indices), or None when fewer than
    MIN_FIT remain."""
    x = np.concatenate(list(data.batches(256)))
    rest = np.setdiff1d(np.arange(len(x)), validation)
    if len(rest) < MIN_FIT:
        return None
    return dataset_from_array(x[rest], f"{data.path} (samples not measured)")


def choose_ptq(qm: QuantModel, data: Dataset, validation: np.ndarray, probe: Probe,
               say: Callable[[str], None] | None = None,
               plain_outputs: dict[str, np.ndarray] | None = None) -> PtqChoice:
    """The plan's model with the fit of lowest measured damage against float (none
    included); ties keep the simpler (fewer fits, the order of `candidates`).
    `plain_outputs`: `qm`'s measured tensors when the caller has them (the search measured
    this very model: `Probe.variant_outputs`), else `qm` runs here. Each model runs once: its
    damage against float and against the all-8-bit model come from the same outputs."""
    say = say or (lambda message: None)
    tried = candidates(qm)

    def plain_run() -> dict[str, np.ndarray]:
        return plain_outputs if plain_outputs is not None else model_outputs(probe, qm)

    x_all = np.concatenate(list(data.batches(256)))
    fit_on = fit_data(data, validation)
    if fit_on is None:
        plain_outs = plain_run()
        best = PtqChoice(qm, None, PtqOptions(), probe.damage_against(plain_outs))
        best.record = {"kept": "none",
                       "note": f"fewer than {MIN_FIT} calibration samples outside the "
                               f"{len(validation)} measured; no fit tried"}
        return best
    # The plan's own outputs and the float reference do not depend on the fits: they run
    # beside them (threads; numpy releases the GIL), each exactly as it would alone.
    with one_blas_thread(), ThreadPoolExecutor(1) as pool:
        side = pool.submit(lambda: (plain_run(), float_reference(probe, x_all[validation])))
        fits = fit_all(qm, fit_on, tried)
        plain_outs, ref = side.result()
    plain = probe.damage_against(plain_outs, ref)
    best = PtqChoice(qm, None, PtqOptions(), plain)
    best_outs = plain_outs
    rows = [{"fit": "none", "damage_vs_float": round(plain, 9)}]
    kept = "none"
    for (label, opts), fitted in zip(tried, fits, strict=True):
        outs = model_outputs(probe, fitted.model)
        damage = probe.damage_against(outs, ref)
        rows.append({"fit": label, "damage_vs_float": round(damage, 9)})
        say(f"ptq: {label}: measured damage against float {damage:.5f} (none {plain:.5f})")
        if damage < best.damage:
            best, kept, best_outs = PtqChoice(fitted.model, fitted, opts, damage), label, outs
    best.damage = probe.damage_against(best_outs)  # the search's measure, for the plan
    best.record = {"fit_samples": len(fit_on), "validation_samples": len(validation),
                   "candidates": rows, "kept": kept}
    if roundable(qm) and adaround_macs(qm) > AUTO_ADAROUND_MACS:
        best.record["note"] = (f"AdaRound not tried: {adaround_macs(qm):.2e} multiply-adds, "
                               f"more than {AUTO_ADAROUND_MACS:.0e} (--adaround runs it)")
    return best


def fit_all(qm: QuantModel, data: Dataset, tried: list[tuple[str, PtqOptions]]
            ) -> list[PtqResult]:
    """`apply_ptq(qm, data, opts)` for every candidate, in `tried`'s order, MEASURE_WORKERS
    at a time. Threads, as in `Probe.prefetch`: each fit is a walk of numpy and BLAS calls on
    large arrays (AdaRound's Adam steps on MobileNetV2-1.0's layers: minutes), which release
    the GIL; a fit only reads `qm` and `data` and builds its own model, so its result is the
    one it has alone."""
    if MEASURE_WORKERS < 2 or len(tried) < 2:
        return [apply_ptq(qm, data, opts) for _, opts in tried]
    with one_blas_thread(), ThreadPoolExecutor(MEASURE_WORKERS) as pool:
        return list(pool.map(lambda item: apply_ptq(qm, data, item[1]), tried))
