"""The integer reference against TensorFlow Lite Micro, byte for byte (DESIGN §4.4).

Each shared int8 `.tflite` is imported with its own quantisation parameters and run through
`mpq.sim`; TFLM's interpreter (PyPI `tflite-micro`, reference kernels) runs the same file on
the same int8 inputs. Real KWS clips for the keyword model, random inputs for the others.
"""

from __future__ import annotations

import numpy as np
import pytest
from conftest import shared_model

from mpq.frontend.tflite_import import import_tflite
from mpq.quant.qmodel import ActQuant, quant_model_from_parameters
from mpq.sim import run_int

MODELS = ["pretrainedResnet_quant.tflite", "vww_96_int8.tflite", "kws_ref_model.tflite",
          "ad01_int8.tflite"]


def mpq_quant_model(path):
    tm = import_tflite(path)
    q = tm.quant
    acts = {name: ActQuant(float(t.scale), int(t.zero_point), 8)
            for name, t in q.activations.items()}
    weights = {name: (w.weight, w.scale, w.bias) for name, w in q.weights.items()}
    return quant_model_from_parameters(tm.graph, acts, weights)


def tflm_outputs(path, xs: np.ndarray) -> np.ndarray:
    from tflite_micro.python.tflite_micro import runtime

    interp = runtime.Interpreter.from_file(str(path))
    outs = []
    for x in xs:
        interp.set_input(x[None].astype(np.int8), 0)
        interp.invoke()
        outs.append(interp.get_output(0).copy())
    return np.concatenate(outs).astype(np.int64)


def inputs_for(name: str, shape: tuple[int, ...], n: int) -> np.ndarray:
    if name.startswith("kws"):
        clips = np.load(shared_model("kws01_mfcc_int8_1000.npz"))["x"]
        return clips[:n].astype(np.int64)
    rng = np.random.default_rng(0)
    return rng.integers(-128, 128, (n, *shape[1:]))


@pytest.mark.parametrize("name", MODELS)
def test_byte_identical_to_tflm(name: str) -> None:
    path = shared_model(name)
    qm = mpq_quant_model(path)
    g = qm.graph
    n = 200 if name.startswith("kws") else 40
    xs = inputs_for(name, g.tensors[g.inputs[0]].shape, n)
    ours = run_int(qm, {g.inputs[0]: xs})[g.outputs[0]]
    theirs = tflm_outputs(path, xs)
    assert ours.shape == theirs.shape
    mismatched = int((ours != theirs).sum())
    assert mismatched == 0, f"{mismatched} of {ours.size} output bytes differ from TFLM"
