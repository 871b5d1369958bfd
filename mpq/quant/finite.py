"""Non-finite numbers caught where they enter quantisation, as one clear MpqError each.

A NaN or Inf weight, or an activation that overflows float32 on the given data, makes every
scale, zero point and histogram after it meaningless: numpy would only print RuntimeWarnings
and the run would end in an unrelated internal error (or, worse, a plan of garbage). These
checks name the layer or tensor and the sample, so the user can tell a broken model from
out-of-range data.
"""

from __future__ import annotations

import numpy as np

from mpq.errors import MpqError
from mpq.ir import Graph


def _first_bad(values: np.ndarray) -> str | None:
    """'NaN' or 'Inf' for the first non-finite kind present in `values`, else None."""
    if np.isnan(values).any():
        return "NaN"
    if np.isinf(values).any():
        return "Inf"
    return None


def check_finite_parameters(graph: Graph) -> None:
    """Every weight and bias of `graph` is finite; else MpqError naming the layer.

    Quantisation divides by max|w| and rounds w/s to integers: one NaN or Inf spoils the whole
    output channel, so such a model cannot be quantised at all.
    """
    for node in graph.nodes:
        for what, values in (("weight", node.weight), ("bias", node.bias)):
            if values is None or values.dtype.kind != "f":
                continue
            bad = _first_bad(values)
            if bad is not None:
                raise MpqError(f"layer '{node.name}': {what} contains {bad}; a model with "
                               "non-finite parameters cannot be quantised")


def check_finite_activation(tensor: str, value: np.ndarray, first_sample: int,
                            is_input: bool) -> None:
    """An activation seen during calibration is finite; else MpqError naming the tensor and the
    batch. Finite inputs that overflow float32 inside the model (huge data or weights) end
    here: no range can be chosen for an Inf."""
    bad = _first_bad(value) if value.dtype.kind == "f" else None
    if bad is None:
        return
    rows = ~np.isfinite(value.reshape(len(value), -1)).all(axis=1) if value.ndim else [True]
    where = f"sample {first_sample + int(np.argmax(rows))}"
    cause = "the input data" if is_input else \
        "the model overflows float32 on this data (inputs or weights too large)"
    raise MpqError(f"tensor '{tensor}': {bad} at {where} during calibration; {cause}")


def check_finite_ranges(ranges: dict[str, tuple[float, float]]) -> None:
    """Every activation range is a pair of finite numbers (ranges come from statistics files
    too, which a user may have edited)."""
    for name, (lo, hi) in ranges.items():
        if not (np.isfinite(lo) and np.isfinite(hi)):
            raise MpqError(f"tensor '{name}': activation range [{lo}, {hi}] is not finite")
