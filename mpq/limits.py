"""Resource limits on untrusted input, and the checks that enforce them before any work.

A model or a data file is a few bytes that can ask for unbounded work: an ONNX Range of 3e8
elements folded at import, an input dimension of 2^31, an ``.npz`` whose members decompress
to gigabytes. Each check below compares what the input *declares* (file size, shapes, .npy
headers) with a limit before anything is allocated, and fails with one line that names the
limit and how to raise it.

=====================  ==========================  =====================  ===================
limit                  `mpq` option                environment variable   default
=====================  ==========================  =====================  ===================
model file size        ``--max-model-bytes N``     MPQ_MAX_MODEL_BYTES    256 MiB
elements per tensor    ``--max-elements N``        MPQ_MAX_ELEMENTS       16,777,216 (2^24)
folded elements        ``--max-fold-elements N``   MPQ_MAX_FOLD_ELEMENTS  33,554,432 (2^25)
data file bytes        ``--max-data-bytes N``      MPQ_MAX_DATA_BYTES     1 GiB
=====================  ==========================  =====================  ===================

The options belong to the `mpq` group (``mpq --max-elements 50000000 import big.onnx``); the
CLI installs them with `set_limits`, and library code reads `current()`.
"""

from __future__ import annotations

import math
import os
import zipfile
from dataclasses import dataclass, fields
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from mpq.errors import MpqError

if TYPE_CHECKING:
    import numpy as np

MiB = 1 << 20


@dataclass(frozen=True)
class Limits:
    """The limits in force; the defaults let every real model and data set mpq targets pass."""

    max_model_bytes: int = 256 * MiB
    """Size of a model file (ONNX or TFLite), checked before it is read. The largest board
    has 4 MiB of Flash; a 256 MiB float32 model holds 64 M parameters, 16 MiB even at 2 bits,
    four times any board (the shared MLPerf Tiny models are at most 1 MiB, MobileNetV2-1.0
    is 14 MiB)."""

    max_elements: int = 1 << 24
    """Elements in any one tensor of a model (and any one dimension): graph inputs,
    initializers, constants, folded values and every intermediate shape, checked as each is
    declared. 2^24 is ten times MobileNetV2-1.0@224's largest map (112×112×96 = 1.2 M) and
    largest weight (1280×1000); at int8 it is four times the largest board's 4 MiB SRAM, so
    no deployable model comes near it, while a float32 batch of such maps stays in memory."""

    max_fold_elements: int = 1 << 25
    """Elements that constant folding at ONNX import may produce, all folded values of one
    import together, checked before each fold runs. Exporters leave shape arithmetic (a few
    elements) and sometimes weight casts or transposes (at most the model's parameters, 3.5 M
    for MobileNetV2) to fold; 2^25 bounds folding to a few hundred MB of float64."""

    max_data_bytes: int = 1 << 30
    """Bytes one ``.npz``/``.npy`` data or statistics file expands to, read from the arrays'
    headers before anything is decompressed. Fashion-MNIST's 10,000 28×28 float32 images are
    31 MB, the KWS clips 2 MB; 1000 ImageNet images at 224×224×3 float32 are 602 MB."""


DEFAULTS = Limits()

# field -> (option of `mpq`, environment variable, what the message calls the limit)
# (numpy is imported only where a check needs it: `mpq --help` reads this table)
OPTIONS: dict[str, tuple[str, str, str]] = {
    "max_model_bytes": ("--max-model-bytes", "MPQ_MAX_MODEL_BYTES", "bytes per model file"),
    "max_elements": ("--max-elements", "MPQ_MAX_ELEMENTS", "elements per tensor"),
    "max_fold_elements": ("--max-fold-elements", "MPQ_MAX_FOLD_ELEMENTS",
                          "elements folded per import"),
    "max_data_bytes": ("--max-data-bytes", "MPQ_MAX_DATA_BYTES", "bytes per data file"),
}
assert set(OPTIONS) == {f.name for f in fields(Limits)}

# The one-line help of each option (the dataclass says why each default is what it is).
HELP: dict[str, str] = {
    "max_model_bytes": "Largest model file (ONNX, TFLite) mpq reads, in bytes.",
    "max_elements": "Most elements (and largest dimension) of any one tensor of a model: "
                    "inputs, weights, constants, intermediate maps.",
    "max_fold_elements": "Most elements ONNX constant folding may produce in one import.",
    "max_data_bytes": "Most bytes one .npz/.npy data or statistics file may expand to "
                      "(from its array headers, before reading).",
}

_current = DEFAULTS


def current() -> Limits:
    """The limits in force (the CLI's options, else the defaults)."""
    return _current


def set_limits(limits: Limits) -> None:
    """Install `limits` for the rest of the process (the `mpq` group does this once)."""
    global _current
    _current = limits


class LimitError(MpqError):
    """An input declares more than a limit allows."""


def exceeded(what: str, name: str) -> LimitError:
    """One line: what the input declares, the limit, and the option/variable that raises it."""
    option, env, label = OPTIONS[name]
    limit = getattr(current(), name)
    return LimitError(f"{what}; the limit is {limit:,} {label} (raise it with "
                      f"`mpq {option} N` or {env}=N)")


# -- model files and tensors -----------------------------------------------------------------

def check_model_file(path: str | Path) -> None:
    """Refuse a model file larger than `max_model_bytes` before reading it."""
    try:
        size = os.stat(path).st_size
    except OSError:
        return  # the reader reports a missing or unreadable file in its own words
    if size > current().max_model_bytes:
        raise exceeded(f"{path}: the model file has {size:,} bytes", "max_model_bytes")


def check_shape(shape: Any, where: str) -> None:
    """Refuse a tensor shape with more than `max_elements` elements or a dimension larger than
    that (a zero elsewhere must not hide a 2^40 dimension from loops over one axis)."""
    dims = [int(d) for d in shape]
    limit = current().max_elements
    big = max(dims, default=0)
    if big > limit:
        raise exceeded(f"{where} has shape {dims}, a dimension of {big:,}", "max_elements")
    n = math.prod(d for d in dims if d > 0)
    if n > limit:
        raise exceeded(f"{where} has shape {dims}, {n:,} elements", "max_elements")


# -- ONNX constant folding -------------------------------------------------------------------

def _scalar(a: np.ndarray | None) -> float:
    import numpy as np

    if a is None or a.size < 1:
        raise ValueError("no scalar")
    return float(np.asarray(a).reshape(-1)[0])


def _broadcast_elements(shapes: list[tuple[int, ...]]) -> int:
    """Elements of the broadcast of `shapes` (an upper bound when they do not broadcast)."""
    rank = max((len(s) for s in shapes), default=0)
    dims = [1] * rank
    for s in shapes:
        for i, d in enumerate(s, start=rank - len(s)):
            dims[i] = max(dims[i], int(d))
    return math.prod(dims)


def _values(a: np.ndarray | None) -> list[int]:
    import numpy as np

    return [max(int(v), 0) for v in np.asarray(a).reshape(-1)] if a is not None else []


def fold_elements(op: str, inputs: list[np.ndarray | None], attrs: dict[str, Any]) -> int:
    """How many elements the ONNX op `op` produces from constant `inputs`, computed from the
    inputs' shapes and values without running it (an upper bound where the op would fail).

    Ops whose output can exceed their inputs are computed exactly (Range, ConstantOfShape,
    Expand, Tile, Gather, broadcasting arithmetic, Concat); the others produce at most their
    largest input.
    """
    present = [a for a in inputs if a is not None]
    largest = max((int(a.size) for a in present), default=1)
    try:
        if op == "Range":
            start, limit, delta = (_scalar(a) for a in inputs[:3])
            if delta == 0 or math.isnan(start + limit + delta):
                return 0  # the evaluator refuses these itself
            count = (limit - start) / delta
            return max(math.ceil(count), 0) if math.isfinite(count) else 1 << 62
        if op == "ConstantOfShape":
            return math.prod(_values(inputs[0])) if inputs else 1
        if op == "Expand":
            return _broadcast_elements([inputs[0].shape, tuple(_values(inputs[1]))])
        if op == "Tile":
            return int(inputs[0].size) * math.prod(_values(inputs[1]))
        if op == "Gather":
            data, index = inputs[0], inputs[1]
            axis = int(attrs.get("axis", 0)) % max(data.ndim, 1)
            rest = math.prod(data.shape[:axis]) * math.prod(data.shape[axis + 1:])
            return rest * int(index.size)
        if op in ("Add", "Sub", "Mul", "Div", "Equal", "Where", "Pow", "Max", "Min", "Mod"):
            return _broadcast_elements([a.shape for a in present])
        if op == "Concat":
            return sum(int(a.size) for a in present)
        if op == "Shape":
            return max(int(present[0].ndim), 1) if present else 1
    except (ValueError, TypeError, IndexError, OverflowError, AttributeError):
        return largest  # malformed inputs: the evaluator fails on them with its own message
    return largest


def constant_elements(attrs: dict[str, Any]) -> tuple[list[int], str]:
    """The shape a Constant node declares (before its value is decoded) and the attribute."""
    for name, value in attrs.items():
        dims = getattr(value, "dims", None)
        if dims is not None:
            return [int(d) for d in dims], name
        if isinstance(value, (list, tuple, bytes, str)) and name.endswith("s"):
            return [len(value)], name
    return [], ""


@dataclass
class FoldBudget:
    """Elements folded so far in one import, against `max_fold_elements` (and each value
    against `max_elements`)."""

    used: int = 0

    def charge(self, node: Any, inputs: list[np.ndarray | None], attrs: dict[str, Any],
               source: str) -> int:
        """Refuse, before it runs, a fold of `node` (an ONNX NodeProto) that would produce
        too many elements; else count them. Returns the elements counted."""
        where = f"{source}: node '{node.name}' ({node.op_type})"
        if node.op_type == "Constant":
            check_shape(constant_elements(attrs)[0], where)
            return 0
        n = fold_elements(node.op_type, inputs, attrs)
        if n > current().max_elements:
            raise exceeded(f"{where} would fold to a constant of {n:,} elements",
                           "max_elements")
        if self.used + n > current().max_fold_elements:
            raise exceeded(f"{where} would bring constant folding to {self.used + n:,} "
                           "elements", "max_fold_elements")
        self.used += n
        return n

    def settle(self, counted: int, results: list[Any], node: Any, source: str) -> None:
        """After a fold ran: count what it really produced in place of `counted`, so an op
        `fold_elements` does not know cannot slip past the limits twice."""
        real = sum(int(getattr(r, "size", 1)) for r in results)
        self.used += real - counted
        where = f"{source}: node '{node.name}' ({node.op_type})"
        if real > current().max_elements:
            raise exceeded(f"{where} folded to a constant of {real:,} elements",
                           "max_elements")
        if self.used > current().max_fold_elements:
            raise exceeded(f"{where} brought constant folding to {self.used:,} elements",
                           "max_fold_elements")


# -- data files (.npy / .npz) ----------------------------------------------------------------

_NPY_MAGIC = b"\x93NUMPY"
_ZIP_MAGIC = b"PK\x03\x04"


def _npy_header(fp: IO[bytes]) -> tuple[tuple[int, ...], np.dtype] | None:
    """Shape and dtype from a .npy header (numpy's own reader; the data is not read), or None
    when `fp` does not start like a .npy array."""
    import numpy as np

    try:
        version = np.lib.format.read_magic(fp)
        reader = np.lib.format.read_array_header_1_0 if version == (1, 0) \
            else np.lib.format.read_array_header_2_0
        shape, _, dtype = reader(fp)
    except (ValueError, OSError, EOFError, SyntaxError, TypeError):
        return None
    return tuple(int(d) for d in shape), dtype


def _array_bytes(label: str, shape: tuple[int, ...], dtype: np.dtype) -> int:
    if dtype.hasobject:
        raise MpqError(f"{label}: holds Python objects (a pickled object array), which mpq "
                       "never loads; store numeric arrays")
    return math.prod(shape) * dtype.itemsize


def check_data_file(path: str | Path) -> None:
    """Refuse a ``.npy``/``.npz`` whose arrays, as their headers declare them, hold more than
    `max_data_bytes` (an ``.npz`` adds up its members; a member that is not an array counts
    its declared uncompressed size), or that holds pickled objects. Reads only the headers:
    a few bytes of each member are decompressed. A file that cannot be parsed is left to the
    loader, which reports it in its own words (it uses the same header reader)."""
    p = Path(path)
    try:
        with open(p, "rb") as f:
            magic = f.read(len(_NPY_MAGIC))
            f.seek(0)
            if magic.startswith(_NPY_MAGIC):
                header = _npy_header(f)
                total = _array_bytes(str(p), *header) if header else 0
            elif magic.startswith(_ZIP_MAGIC):
                total = _npz_bytes(p, f)
            else:
                return
    except (OSError, zipfile.BadZipFile, EOFError, RuntimeError, NotImplementedError):
        return
    if total > current().max_data_bytes:
        raise exceeded(f"{p}: its arrays hold {total:,} bytes once read", "max_data_bytes")


def _npz_bytes(p: Path, f: IO[bytes]) -> int:
    total = 0
    with zipfile.ZipFile(f) as z:
        for info in z.infolist():
            with z.open(info) as member:
                header = _npy_header(member)
            if header is None:
                total += info.file_size
            else:
                total += _array_bytes(f"{p}: member '{info.filename}'", *header)
    return total
