"""Checks of an ONNX model's structure and attributes before the importer relies on them.

`onnx.checker` verifies attribute types against the op schemas but not their values: a Conv
with `strides=[0]`, a 1-element `kernel_shape` or negative dilations passes it, and so does an
initializer whose data does not fill its dims or whose element type is an unknown number. Each
of those used to surface as a Python exception deep in the importer (or later in onnxruntime);
here each becomes one MpqError line naming the node (or tensor) and the attribute.

Names: real exporters write empty and duplicate node names, so those are accepted and given
unique derived names; names that are not UTF-8 cannot be printed or written back and are refused.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
from onnx import AttributeProto, TensorProto, helper, numpy_helper

from mpq.errors import MpqError

AUTO_PADS = ("NOTSET", "SAME_UPPER", "SAME_LOWER", "VALID")

# Element types the importer can hold as numpy constants (weights are float32; shape arithmetic
# uses the integer types). FLOAT16 and external data get their own messages in the importer.
_NUMERIC = {
    TensorProto.FLOAT: np.float32, TensorProto.DOUBLE: np.float64,
    TensorProto.FLOAT16: np.float16, TensorProto.INT64: np.int64, TensorProto.INT32: np.int32,
    TensorProto.INT16: np.int16, TensorProto.INT8: np.int8, TensorProto.UINT8: np.uint8,
    TensorProto.UINT16: np.uint16, TensorProto.UINT32: np.uint32,
    TensorProto.UINT64: np.uint64, TensorProto.BOOL: np.bool_,
}


def show(text: str) -> str:
    """A message made safe to print on one line: control characters (a newline in a node name)
    become escapes, so a hostile name cannot split or recolour the error line."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() or c == " " else
                   c.encode("unicode_escape").decode("ascii") for c in text)


def dtype_name(elem_type: int) -> str:
    """The ONNX name of an element type, or its number when it is not a known type."""
    try:
        return TensorProto.DataType.Name(elem_type)
    except ValueError:
        return f"unknown type {elem_type}"


# -- names ----------------------------------------------------------------------------------------

def _not_utf8(value: object) -> bool:
    # The protobuf runtime hands back invalid UTF-8 in a string field as bytes.
    return isinstance(value, bytes)


def check_utf8(model: onnx.ModelProto, source: str) -> None:
    """Refuse names that are not valid UTF-8 (they cannot be shown or written back) and names
    longer than a plan file keeps (layer and tensor names are written into plans)."""
    from mpq.plan_schema import MAX_STR

    limit = MAX_STR - 64  # room for the suffixes of derived names (`_12`, `__preact`)

    g = model.graph
    fields: list[tuple[str, object]] = [("graph name", g.name)]
    for kind, coll in (("graph input", g.input), ("graph output", g.output),
                       ("initializer", g.initializer), ("value_info", g.value_info)):
        fields += [(f"{kind} #{i} name", v.name) for i, v in enumerate(coll)]
    for i, node in enumerate(g.node):
        where = f"node #{i}"
        fields += [(f"{where} name", node.name), (f"{where} op type", node.op_type),
                   (f"{where} domain", node.domain)]
        fields += [(f"{where} input #{k}", n) for k, n in enumerate(node.input)]
        fields += [(f"{where} output #{k}", n) for k, n in enumerate(node.output)]
        fields += [(f"{where} attribute #{k} name", a.name) for k, a in enumerate(node.attribute)]
    for what, value in fields:
        if _not_utf8(value):
            raise MpqError(f"{source}: {what} is not valid UTF-8 text")
        if len(value) > limit:
            raise MpqError(f"{source}: {what} is {len(value):,} characters long; mpq keeps "
                           f"names of up to {limit:,} (plans record them)")


def name_nodes(model: onnx.ModelProto) -> int:
    """Give every unnamed node, and every node after the first of a repeated name, a unique
    derived name (`<op>_<index>`); return how many were renamed.

    Exporters leave node names empty or repeat them, which ONNX allows; mpq names layers, plan
    entries and generated symbols after nodes, so they must be unique.
    """
    nodes = model.graph.node
    taken = {n.name for n in nodes if n.name}
    seen: set[str] = set()
    renamed = 0
    for i, node in enumerate(nodes):
        if node.name and node.name not in seen:
            seen.add(node.name)
            continue
        base = f"{node.name or node.op_type or 'node'}_{i}"
        name, k = base, 1
        while name in taken:
            name, k = f"{base}_{k}", k + 1
        node.name = name
        taken.add(name)
        seen.add(name)
        renamed += 1
    return renamed


def check_structure(model: onnx.ModelProto, source: str) -> None:
    """Graph-level rules: at least one output, declared float32 if typed; no repeated graph input
    or output; an ai.onnx opset onnxruntime runs (7 or later); every node with a named first
    output; no value produced twice."""
    g = model.graph
    if not g.output:
        raise MpqError(f"{source}: the graph has no outputs")
    for kind, coll in (("input", g.input), ("output", g.output)):
        names = [v.name for v in coll]
        for i, name in enumerate(names):
            if not name:
                raise MpqError(f"{source}: graph {kind} #{i} has an empty name")
            if name in names[:i]:
                raise MpqError(f"{source}: graph {kind} '{show(name)}' is listed twice")
    inits = {t.name: t for t in g.initializer}
    inputs = {v.name for v in g.input} - set(inits)
    for vi in g.output:
        if vi.name in inputs:
            raise MpqError(f"{source}: graph output '{show(vi.name)}' is a graph input; mpq "
                           "needs every output computed by the graph")
        t = vi.type.tensor_type
        if vi.type.HasField("tensor_type") and t.elem_type not in (0, TensorProto.FLOAT):
            raise MpqError(f"{source}: graph output '{show(vi.name)}' is declared "
                           f"{dtype_name(t.elem_type)}; mpq models compute float32 outputs")
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    latest = onnx.defs.onnx_opset_version()
    if opset is None or not 7 <= opset <= latest:
        raise MpqError(f"{source}: ONNX opset {opset if opset is not None else '(none)'} is "
                       f"not supported (mpq and onnxruntime read opsets 7 to {latest})")
    for vi in g.input:
        t = inits.get(vi.name)
        if t is None or not vi.type.HasField("tensor_type"):
            continue
        declared = vi.type.tensor_type
        dims = [d.dim_value if d.HasField("dim_value") else None for d in declared.shape.dim]
        if declared.elem_type not in (0, t.data_type) or (
                declared.HasField("shape") and (len(dims) != len(t.dims) or any(
                    d is not None and d != s for d, s in zip(dims, t.dims, strict=True)))):
            raise MpqError(f"{source}: graph input '{show(vi.name)}' is also an initializer "
                           f"but declares another type or shape than the initializer's "
                           f"{dtype_name(t.data_type)} {list(t.dims)}")
    produced: set[str] = set()
    for node in g.node:
        if not node.output or not node.output[0]:
            raise MpqError(f"{source}: node '{show(node.name)}' ({show(node.op_type)}) has no "
                           "output")
        for name in node.output:
            if name and name in produced:
                raise MpqError(f"{source}: value '{show(name)}' is produced by two nodes")
            produced.add(name)


# -- tensors --------------------------------------------------------------------------------------

def check_tensor(t: onnx.TensorProto, what: str) -> None:
    """Check a stored tensor's element type and that its data fills its dims exactly.

    Checking the element count before decoding also keeps a corrupt dims field (2**40
    elements, no data) from reaching an allocation. Raises MpqError with `what`.
    """
    if t.data_type == TensorProto.STRING:
        raise MpqError(f"{what} holds strings; only numeric tensors are supported")
    dtype = _NUMERIC.get(t.data_type)
    if dtype is None:
        raise MpqError(f"{what} has element type {dtype_name(t.data_type)}, which mpq does "
                       "not read")
    if any(d < 0 for d in t.dims):
        raise MpqError(f"{what} has a negative dimension {list(t.dims)}")
    count = math.prod(t.dims)
    if t.HasField("raw_data"):
        stored = len(t.raw_data) / np.dtype(dtype).itemsize
    else:
        field = helper.tensor_dtype_to_field(t.data_type)
        stored = len(getattr(t, field))
        if t.data_type == TensorProto.FLOAT16:
            stored = count if stored == count else -1
    if stored != count:
        raise MpqError(f"{what}: its data holds {stored:g} elements of "
                       f"{dtype_name(t.data_type)}, its dims {list(t.dims)} need {count}")


def initializers(model: onnx.ModelProto, source: str) -> None:
    """check_tensor on every initializer kept in the file (external data has its own error)."""
    for t in model.graph.initializer:
        if t.data_location != TensorProto.EXTERNAL:
            check_tensor(t, f"{source}: initializer '{show(t.name)}'")


def tensor_array(t: onnx.TensorProto, what: str) -> np.ndarray:
    """Decode a stored tensor after check_tensor."""
    check_tensor(t, what)
    try:
        return numpy_helper.to_array(t)
    except (ValueError, TypeError) as exc:  # anything the checks above did not foresee
        raise MpqError(f"{what}: cannot decode ({type(exc).__name__})") from None


def constant_value(node: onnx.NodeProto, source: str) -> np.ndarray:
    """The value of a Constant node: exactly one numeric value attribute."""
    where = f"{source}: Constant node '{show(node.name)}'"
    if len(node.attribute) != 1:
        what = "no value" if not node.attribute else \
            f"{len(node.attribute)} value attributes (one is allowed)"
        raise MpqError(f"{where} has {what}")
    a = node.attribute[0]
    if a.name == "value" and a.type == AttributeProto.TENSOR:
        return tensor_array(a.t, f"{where}")
    if a.name in ("value_string", "value_strings"):
        raise MpqError(f"{where} holds strings; only numeric constants are supported")
    if a.name == "sparse_value":
        raise MpqError(f"{where} holds a sparse tensor, which mpq does not support")
    kinds = {"value_float": AttributeProto.FLOAT, "value_floats": AttributeProto.FLOATS,
             "value_int": AttributeProto.INT, "value_ints": AttributeProto.INTS}
    if kinds.get(a.name) != a.type:
        raise MpqError(f"{where} has an unsupported value attribute '{show(a.name)}'")
    v = helper.get_attribute_value(a)
    dtype = np.int64 if a.name.startswith("value_int") else np.float32
    return np.array(v, dtype=dtype)


# -- attributes -----------------------------------------------------------------------------------

Rule = Callable[[object], str | None]  # returns what is wrong, or None


def _ints(length: int | None, low: int | None, what: str = "2-D ops only") -> Rule:
    def rule(v: object) -> str | None:
        if not isinstance(v, list) or not all(isinstance(x, int) for x in v):
            return "must be a list of integers"
        if length is not None and len(v) != length:
            return f"must have {length} values ({what})"
        if low is not None and any(x < low for x in v):
            return f"values must be ≥ {low}"
        return None
    return rule


def _int(choices: tuple[int, ...] | None = None, low: int | None = None) -> Rule:
    def rule(v: object) -> str | None:
        if not isinstance(v, int):
            return "must be an integer"
        if choices is not None and v not in choices:
            return "must be " + " or ".join(map(str, choices))
        if low is not None and v < low:
            return f"must be ≥ {low}"
        return None
    return rule


def _float(low: float | None = None) -> Rule:
    def rule(v: object) -> str | None:
        if not isinstance(v, float) or not math.isfinite(v):
            return "must be a finite number"
        if low is not None and v < low:
            return f"must be ≥ {low:g}"
        return None
    return rule


def _string(choices: tuple[str, ...]) -> Rule:
    def rule(v: object) -> str | None:
        text = v.decode("utf-8", "replace") if isinstance(v, bytes) else v
        if text not in choices:
            return "must be one of " + ", ".join(c or "''" for c in choices)
        return None
    return rule


_SPATIAL = {"kernel_shape": _ints(2, 1), "strides": _ints(2, 1), "dilations": _ints(2, 1),
            "pads": _ints(4, 0), "auto_pad": _string(AUTO_PADS + ("",))}
ATTRIBUTE_RULES: dict[str, dict[str, Rule]] = {
    "Conv": {**_SPATIAL, "group": _int(low=1)},
    "MaxPool": {**_SPATIAL, "ceil_mode": _int((0, 1)), "storage_order": _int((0, 1))},
    "AveragePool": {**_SPATIAL, "ceil_mode": _int((0, 1)), "count_include_pad": _int((0, 1))},
    "Gemm": {"transA": _int((0, 1)), "transB": _int((0, 1)), "alpha": _float(),
             "beta": _float()},
    "BatchNormalization": {"epsilon": _float(0.0), "momentum": _float(),
                           "training_mode": _int((0,))},
    "Transpose": {"perm": _ints(None, 0)},
    "Flatten": {"axis": _int()}, "Concat": {"axis": _int()}, "Softmax": {"axis": _int()},
    "Squeeze": {"axes": _ints(None, None)}, "Unsqueeze": {"axes": _ints(None, None)},
    "Reshape": {"allowzero": _int((0, 1))},
    "Pad": {"pads": _ints(None, None), "mode": _string(("constant", "reflect", "edge", "wrap")),
            "value": _float()},
    "Clip": {"min": _float(), "max": _float()},
    "Shape": {"start": _int(), "end": _int()},
    "LeakyRelu": {"alpha": _float()},
    "HardSigmoid": {"alpha": _float(), "beta": _float()},
}


_SPATIAL_1D = {"kernel_shape": _ints(1, 1, "a 1-D op"), "strides": _ints(1, 1, "a 1-D op"),
               "dilations": _ints(1, 1, "a 1-D op"), "pads": _ints(2, 0, "a 1-D op")}


def one_d_nodes(model: onnx.ModelProto) -> set[str]:
    """Names of the 1-D convolutions and pools (imported as 2-D with H = 1): a Conv whose
    weight initializer has rank 3, a MaxPool/AveragePool whose kernel_shape has one value."""
    ranks = {i.name: len(i.dims) for i in model.graph.initializer}
    out = set()
    for node in model.graph.node:
        if node.op_type == "Conv" and len(node.input) > 1 and ranks.get(node.input[1]) == 3:
            out.add(node.name)
        if node.op_type in ("MaxPool", "AveragePool") and any(
                a.name == "kernel_shape" and len(a.ints) == 1 for a in node.attribute):
            out.add(node.name)
    return out


def attributes(node: onnx.NodeProto, source: str, one_d: bool = False) -> dict:
    """A node's attributes as Python values, each checked against ATTRIBUTE_RULES.

    Also refuses auto_pad together with explicit pads (ONNX forbids it; onnxruntime fails on
    it at run time) and kernel_shape on pooling ops that lack it.
    """
    where = f"{source}: node '{show(node.name)}' ({show(node.op_type)})"
    rules = ATTRIBUTE_RULES.get(node.op_type, {})
    if one_d:
        rules = {**rules, **_SPATIAL_1D}
    values: dict = {}
    for a in node.attribute:
        try:
            v = helper.get_attribute_value(a)
        except Exception:  # an attribute of UNDEFINED or unknown type
            raise MpqError(f"{where}: attribute '{show(a.name)}' has no valid value") from None
        if a.name in values:
            raise MpqError(f"{where}: attribute '{show(a.name)}' is given twice")
        rule = rules.get(a.name)
        problem = rule(v) if rule is not None else None
        if problem is not None:
            shown = v if not isinstance(v, bytes) else v.decode("utf-8", "replace")
            raise MpqError(f"{where}: attribute {a.name}={show(repr(shown))[:80]} {problem}")
        values[a.name] = v
    auto_pad = values.get("auto_pad", b"NOTSET")
    if isinstance(auto_pad, bytes) and auto_pad.decode() not in ("NOTSET", "") \
            and any(values.get("pads", [])):
        raise MpqError(f"{where}: auto_pad={auto_pad.decode()} and explicit pads are given "
                       "together (ONNX allows one or the other)")
    if node.op_type in ("MaxPool", "AveragePool") and "kernel_shape" not in values:
        raise MpqError(f"{where}: attribute kernel_shape is missing")
    return values


def finite_weights(nodes: list, source: str) -> None:
    """Refuse NaN or infinite weights and biases (after BatchNorm folding, so a negative
    variance counts too): no quantisation scale exists for them, and calibration would turn
    them into NaN statistics far from the cause."""
    for node in nodes:
        for label, array in (("weights", node.weight), ("bias", node.bias)):
            if array is not None and not np.all(np.isfinite(array)):
                raise MpqError(show(f"{source}: node '{node.name}': its {label} contain NaN "
                                    "or infinite values (after folding BatchNormalization, "
                                    "if any)"))


def ort_session(path: str | Path):  # -> onnxruntime.InferenceSession
    """An onnxruntime session on the user's ONNX model as mpq imports it.

    Node names are made unique first (onnxruntime refuses duplicates that mpq accepts), and a
    model onnxruntime still cannot load is the model's fault: one MpqError line, not a trace.
    """
    import onnxruntime as ort

    from mpq.frontend.onnx_import import load_onnx

    model = load_onnx(path)
    name_nodes(model)
    options = ort.SessionOptions()
    options.log_severity_level = 3  # errors only: its warnings quote raw names in colour
    try:
        return ort.InferenceSession(model.SerializeToString(), options,
                                    providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime's Fail, InvalidGraph, NotImplemented, …
        text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise MpqError(show(f"{path}: onnxruntime cannot load this model: {text[:300]}")) \
            from None


def ort_run(session, feeds: dict, path: str | Path) -> np.ndarray:
    """First output of `session` on `feeds` (`ort_run_all`)."""
    return ort_run_all(session, feeds, path)[0]


def ort_run_all(session, feeds: dict, path: str | Path) -> list[np.ndarray]:
    """Every output of `session` on `feeds`, in the model's output order; a failure of the
    user's model on valid data (a Reshape that hard-codes batch 1 under a symbolic batch
    dimension) is one MpqError line."""
    try:
        return list(session.run(None, feeds))
    except Exception as exc:  # onnxruntime's InvalidArgument, Fail, RuntimeException, …
        text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        batch = next(iter(feeds.values())).shape[0]
        raise MpqError(show(f"{path}: onnxruntime failed to run this model on a batch of "
                            f"{batch}: {text[:300]}")) from None
