"""Model frontends: every supported file format becomes the same IR (`mpq.ir.Graph`)."""

from __future__ import annotations

from pathlib import Path

from mpq.errors import MpqError
from mpq.ir import Graph


def load_model(path: str | Path) -> Graph:
    """Read a model file into the IR, choosing the frontend by the file's suffix."""
    p = Path(path)
    suffix = p.suffix.lower()
    if suffix == ".onnx":
        from mpq.frontend.onnx_import import import_onnx

        return import_onnx(p)
    if suffix == ".tflite":
        from mpq.frontend.tflite_import import import_tflite

        return import_tflite(p).graph
    raise MpqError(f"{path}: unknown model format '{suffix or p.name}' "
                   "(expected .onnx or .tflite)")
