"""Quantise the first COUNT samples of a labelled .npz to a plan's int8 input; write a C header.

    python images.py --plan PLAN --model MODEL --data TEST.npz --count 8 -o images.h

Each image is converted exactly as `mpq verify` and `mpq run` convert their inputs: to the IR
layout (NHWC), then clamp(round_half_away(x / scale) + zero_point) with the scale and zero point
the plan records for the model's input tensor. The header comes from images.h.j2 beside this
script. Needs an interpreter that can import mpq (and with it numpy and jinja2).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import jinja2
import numpy as np

from mpq.frontend import load_model
from mpq.interpreter import to_ir_layout
from mpq.plan import load_plan, resolve_model
from mpq.quant.calibrate import load_dataset
from mpq.quant.qmodel import ActQuant
from mpq.sim import quantize_input

HERE = Path(__file__).resolve().parent


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--plan", required=True, type=Path)
    ap.add_argument("--model", type=Path, help="The plan's model (default: next to the plan).")
    ap.add_argument("--data", required=True, type=Path, help=".npz with x and y")
    ap.add_argument("--count", type=int, default=8)
    ap.add_argument("-o", "--output", required=True, type=Path)
    args = ap.parse_args()

    plan = load_plan(args.plan)
    graph = load_model(resolve_model(plan, args.plan, args.model))
    name = graph.inputs[0]
    t = next(t for t in plan.tensors if t.name == name)
    q = ActQuant(float(t.scale), int(t.zero_point), int(t.bits))
    ds = load_dataset(args.data, graph)
    x = np.concatenate(list(ds.batches(256)))[:args.count]
    images = quantize_input(q, to_ir_layout(graph, name, x)).reshape(len(x), -1)
    labels = ds.y[:len(x)] if ds.y is not None else np.full(len(x), -1)

    env = jinja2.Environment(loader=jinja2.FileSystemLoader(HERE), keep_trailing_newline=True,
                             undefined=jinja2.StrictUndefined)
    text = env.get_template("images.h.j2").render(
        source=args.data.name, count=len(images), bytes=images.shape[1], scale=q.scale,
        zero_point=q.zero_point, images=images.tolist(), labels=[int(v) for v in labels])
    args.output.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.output.with_suffix(".tmp")
    tmp.write_text(text)
    tmp.replace(args.output)  # make must never see a half-written header


if __name__ == "__main__":
    main()
