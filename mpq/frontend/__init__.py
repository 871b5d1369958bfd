"""Model frontends: every supported file format becomes the same IR (`mpq.ir.Graph`)."""

from __future__ import annotations

from pathlib import Path

from mpq.errors import MpqError
from mpq.ir import Graph


def require_one_input(graph: Graph, path: str | Path) -> Graph:
    """The graph, if it has exactly one input; MpqError naming them otherwise. Calibration,
    the search, `mpq run`/`verify` and the generated `mpq_model_run(input, outputs)` take one
    input tensor (outputs may be many); a model with several inputs is refused when it is read,
    in one line, rather than half-supported further down."""
    if len(graph.inputs) != 1:
        raise MpqError(f"{path}: the model has {len(graph.inputs)} inputs "
                       f"({', '.join(graph.inputs)}); mpq supports models with one input "
                       "(any number of outputs)")
    return graph


def load_model(path: str | Path) -> Graph:
    """Read a model file into the IR, choosing the frontend by the file's suffix; a model
    with more than one input is refused (`require_one_input`)."""
    p = Path(path)
    suffix = p.suffix.lower()
    if suffix == ".onnx":
        from mpq.frontend.onnx_import import import_onnx

        return require_one_input(import_onnx(p), path)
    if suffix == ".tflite":
        from mpq.frontend.tflite_import import import_tflite

        return require_one_input(import_tflite(p).graph, path)
    raise MpqError(f"{path}: unknown model format '{suffix or p.name}' "
                   "(expected .onnx or .tflite)")
