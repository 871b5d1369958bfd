"""Turn (run seed, case index) into the bytes of one mutated ONNX model.

Two levels of mutation, as a careless exporter, a bit-rotted download or a hostile author would
produce: byte-level (flip, overwrite, insert, delete, duplicate, truncate bytes of the serialized
model) and protobuf-level (attribute values, lengths and types; dims; dtypes; initializer data;
dropped, duplicated and reordered nodes, inputs and outputs; hostile node and value names;
malformed Constant nodes). Each case draws from its own generator seeded by (run seed, index),
so any case can be regenerated alone (`--replay`).
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
from onnx import AttributeProto, TensorProto, helper, numpy_helper

# Names that have broken (or could break) messages, terminals, C comments and strings, shells,
# HTML and rich markup; "" and duplicates are what real exporters write.
HOSTILE_NAMES = [
    "", "*/", "/*", "*/ int pwned; /*", "\\\n", "a\\", "??/", "??=", "[/x]", "[bold]",
    "[red]x[/red]", "$(shell id)", "$(id)", "`id`", "<script>alert(1)</script>", "\n", "a\nb",
    "\r", "\t", "\x00", "a\x00b", "\x1b[31m", "%s%n%x", "{0}", "{{x}}", "../../etc/passwd",
    "name with spaces", "1abc", "int", "main", "mpq_model", "con", "-", ".", "é€😀",
    "\u202e", "x" * 300, "y" * 5000, "\"quoted\"", "'single'",
]
# Protobuf strings must be UTF-8 in Python; the marker is swapped for invalid bytes after
# serialization (same length, so the length prefixes stay right).
BAD_UTF8_MARKER = "@@BADUTF8@@"
BAD_UTF8_BYTES = b"\xc3\x28\xff\xfe" + b"bad\x80\xc0\xaf\x00"
assert len(BAD_UTF8_BYTES) == len(BAD_UTF8_MARKER)

INTERESTING_INTS = [0, 1, -1, 2, 3, -2, 4, 7, 8, 255, 256, 2**31 - 1, -2**31, 2**32, 2**40,
                    2**62, 2**63 - 1, -2**63]
INTERESTING_FLOATS = [0.0, -0.0, 1.0, -1.0, 1e-30, 1e30, 3.4e38, float("inf"), float("-inf"),
                      float("nan"), 0.5]
INT_ATTRS = ["strides", "pads", "dilations", "kernel_shape", "perm", "axis", "axes", "group",
             "transA", "transB", "ceil_mode", "count_include_pad", "allowzero", "to",
             "storage_order", "keepdims", "start", "end", "value_int", "value_ints"]
FLOAT_ATTRS = ["alpha", "beta", "epsilon", "momentum", "min", "max", "value_float"]
STRING_ATTRS = ["auto_pad", "mode", "value_string"]
OP_TYPES = ["Conv", "Gemm", "MatMul", "Add", "BatchNormalization", "Relu", "Clip", "MaxPool",
            "AveragePool", "GlobalAveragePool", "Pad", "Transpose", "Reshape", "Flatten",
            "Squeeze", "Unsqueeze", "Concat", "Softmax", "Identity", "Dropout", "Constant",
            "Shape", "Gather", "Cast", "Slice", "Mul", "Sub", "Div", "Range", "Expand",
            "ConstantOfShape", "Where", "ReduceProd", "TopK", "LSTM", "Loop", "If", "Foo"]
DTYPES = list(range(0, 26)) + [-1, 99, 2**20]


@dataclass
class Case:
    """One generated test input."""

    index: int
    seed_name: str
    data: bytes
    mutations: list[str]


def case_rng(run_seed: int, index: int) -> random.Random:
    """The generator of one case: independent of every other case and of the worker count."""
    return random.Random(run_seed * 1_000_003 + index)


# -- helpers ------------------------------------------------------------------------------------

def _values(model: onnx.ModelProto) -> list[str]:
    g = model.graph
    names = [v.name for v in g.input] + [v.name for v in g.output]
    names += [i.name for i in g.initializer]
    for n in g.node:
        names += list(n.input) + list(n.output)
    return sorted({n for n in names if n})


def _rename_value(model: onnx.ModelProto, old: str, new: str) -> None:
    g = model.graph
    for coll in (g.input, g.output, g.value_info, g.initializer):
        for v in coll:
            if v.name == old:
                v.name = new
    for n in g.node:
        for i, name in enumerate(n.input):
            if name == old:
                n.input[i] = new
        for i, name in enumerate(n.output):
            if name == old:
                n.output[i] = new


def _hostile(rng: random.Random, model: onnx.ModelProto) -> str:
    """A hostile name, or one colliding with an existing name or a name the writer derives."""
    pick = rng.random()
    if pick < 0.1:
        return BAD_UTF8_MARKER
    values = _values(model)
    nodes = [n.name for n in model.graph.node]
    if pick < 0.35 and values:
        base = rng.choice(values + nodes)
        suffix = rng.choice(["", "__preact", "__nchw", "__nhwc", "__nhwc_in", "/weight",
                             "/bias", "/act", "/act/min", "/act/max", "/shape", "/to_nchw",
                             "/to_nhwc"])
        return base + suffix
    return rng.choice(HOSTILE_NAMES)


def _int_list(rng: random.Random) -> list[int]:
    n = rng.choice([0, 1, 1, 2, 2, 3, 4, 4, 5, 8])
    small = rng.random() < 0.6
    return [rng.choice([0, 1, 2, 3, -1]) if small else rng.choice(INTERESTING_INTS)
            for _ in range(n)]


def _node(rng: random.Random, model: onnx.ModelProto) -> onnx.NodeProto | None:
    nodes = model.graph.node
    return nodes[rng.randrange(len(nodes))] if nodes else None


# -- protobuf-level mutations (each returns a description, or None when it does not apply) ------

def m_attr_value(rng: random.Random, model: onnx.ModelProto) -> str | None:
    node = _node(rng, model)
    if node is None:
        return None
    existing = [a.name for a in node.attribute]
    name = rng.choice(existing) if existing and rng.random() < 0.7 else \
        rng.choice(INT_ATTRS + FLOAT_ATTRS + STRING_ATTRS)
    kind = rng.random()
    if name in FLOAT_ATTRS and kind < 0.7:
        value = rng.choice(INTERESTING_FLOATS)
    elif name in STRING_ATTRS and kind < 0.7:
        value = rng.choice(["SAME_UPPER", "SAME_LOWER", "VALID", "NOTSET", "", "garbage",
                            "reflect", "edge", "constant", "\xff"])
    elif kind < 0.5:
        value = _int_list(rng)
    elif kind < 0.8:
        value = rng.choice(INTERESTING_INTS)
    elif kind < 0.9:
        value = rng.choice(INTERESTING_FLOATS)
    else:
        value = rng.choice(["x", "", "[bold]"])
    set_attribute(node, name, value)
    return f"attr {node.op_type}.{name}={value!r:.60}"


def set_attribute(node: onnx.NodeProto, name: str, value: Any) -> None:
    """Replace (or add) attribute `name` of `node`; an empty list becomes an empty INTS."""
    for i, a in enumerate(node.attribute):
        if a.name == name:
            del node.attribute[i]
            break
    if isinstance(value, list) and not value:
        node.attribute.append(AttributeProto(name=name, type=AttributeProto.INTS))
    else:
        node.attribute.append(helper.make_attribute(name, value))


def m_attr_drop(rng: random.Random, model: onnx.ModelProto) -> str | None:
    node = _node(rng, model)
    if node is None or not node.attribute:
        return None
    i = rng.randrange(len(node.attribute))
    name = node.attribute[i].name
    del node.attribute[i]
    return f"drop attr {node.op_type}.{name}"


def m_attr_type(rng: random.Random, model: onnx.ModelProto) -> str | None:
    """Keep the name, change the declared type (e.g. INTS where INT was expected)."""
    node = _node(rng, model)
    if node is None or not node.attribute:
        return None
    a = node.attribute[rng.randrange(len(node.attribute))]
    a.type = rng.choice([t for t in range(0, 15)])
    return f"attr type {node.op_type}.{a.name}={a.type}"


def m_dims(rng: random.Random, model: onnx.ModelProto) -> str | None:
    g = model.graph
    targets = [("input", v) for v in g.input] + [("output", v) for v in g.output] + \
        [("init", t) for t in g.initializer]
    if not targets:
        return None
    kind, t = rng.choice(targets)
    value = rng.choice([0, -1, -7, 1, 2, 3, 5, 1000, 2**31, 2**40, 2**62])
    if kind == "init":
        if rng.random() < 0.2 and t.dims:
            del t.dims[rng.randrange(len(t.dims))]
            return f"init {t.name} drop dim"
        if not t.dims or rng.random() < 0.2:
            t.dims.append(value)
        else:
            t.dims[rng.randrange(len(t.dims))] = value
        return f"init {t.name} dims={list(t.dims)}"
    shape = t.type.tensor_type.shape
    r = rng.random()
    if r < 0.1:
        t.type.tensor_type.ClearField("shape")
        return f"{kind} {t.name} no shape"
    if r < 0.2 and shape.dim:
        del shape.dim[rng.randrange(len(shape.dim))]
        return f"{kind} {t.name} drop dim"
    if r < 0.3:
        shape.dim.add().dim_value = max(value, 0)
        return f"{kind} {t.name} add dim"
    if not shape.dim:
        return None
    d = shape.dim[rng.randrange(len(shape.dim))]
    if r < 0.4:
        d.dim_param = rng.choice(["N", "", "[bold]", "h"])
        return f"{kind} {t.name} dim_param"
    d.dim_value = value
    return f"{kind} {t.name} dim={value}"


def _pick_initializer(rng: random.Random, model: onnx.ModelProto) -> TensorProto | None:
    """A random initializer of the graph (None when it has none)."""
    g = model.graph
    if not g.initializer:
        return None
    return g.initializer[rng.randrange(len(g.initializer))]


def m_dtype(rng: random.Random, model: onnx.ModelProto) -> str | None:
    g = model.graph
    dtype = rng.choice(DTYPES)
    r = rng.random()
    if r < 0.6 and g.initializer:
        t = g.initializer[rng.randrange(len(g.initializer))]
        t.data_type = dtype
        return f"init {t.name} dtype={dtype}"
    vis = list(g.input) + list(g.output)
    if not vis:
        return None
    v = rng.choice(vis)
    v.type.tensor_type.elem_type = dtype
    return f"value {v.name} elem_type={dtype}"


def m_init_data(rng: random.Random, model: onnx.ModelProto) -> str | None:
    t = _pick_initializer(rng, model)
    if t is None:
        return None
    arr_bytes = t.raw_data
    r = rng.random()
    if r < 0.25 and arr_bytes:
        t.raw_data = arr_bytes[: rng.randrange(len(arr_bytes))]
        return f"init {t.name} raw_data truncated"
    if r < 0.4:
        t.raw_data = arr_bytes + bytes(rng.randrange(256) for _ in range(rng.choice([1, 4, 8])))
        return f"init {t.name} raw_data extended"
    if r < 0.55:
        t.ClearField("raw_data")
        t.float_data.extend([rng.choice(INTERESTING_FLOATS) for _ in range(rng.randrange(4))])
        return f"init {t.name} float_data instead of raw"
    if r < 0.7:
        t.ClearField("raw_data")
        t.int64_data.extend([rng.choice(INTERESTING_INTS) for _ in range(rng.randrange(4))])
        return f"init {t.name} int64_data"
    if r < 0.8:
        t.data_location = TensorProto.EXTERNAL
        return f"init {t.name} data_location"
    # Reshape the stored data consistently: same bytes, another (plausible) shape.
    try:
        a = numpy_helper.to_array(t)
    except Exception:
        return None
    shapes = [(a.size,), (1, a.size), (a.size, 1), (1,) * 4 if a.size == 1 else (a.size, 1, 1)]
    new = numpy_helper.from_array(a.reshape(rng.choice(shapes)), t.name)
    t.CopyFrom(new)
    return f"init {t.name} reshaped {list(t.dims)}"


def m_init_values(rng: random.Random, model: onnx.ModelProto) -> str | None:
    """Special float values in weights (NaN, inf, huge, all zero)."""
    t = _pick_initializer(rng, model)
    if t is None:
        return None
    try:
        a = numpy_helper.to_array(t).copy()
    except Exception:
        return None
    if a.size == 0 or a.dtype.kind != "f":
        return None
    v = rng.choice(INTERESTING_FLOATS)
    if rng.random() < 0.5:
        a.reshape(-1)[rng.randrange(a.size)] = v
    else:
        a[...] = v
    t.CopyFrom(numpy_helper.from_array(a, t.name))
    return f"init {t.name} value {v}"


def m_nodes(rng: random.Random, model: onnx.ModelProto) -> str | None:
    nodes = model.graph.node
    if not nodes:
        return None
    r = rng.random()
    i = rng.randrange(len(nodes))
    if r < 0.3:
        name = nodes[i].op_type
        del nodes[i]
        return f"drop node {i} ({name})"
    if r < 0.5:
        nodes.insert(i, nodes[i])
        return f"duplicate node {i} ({nodes[i].op_type})"
    if r < 0.7:
        j = rng.randrange(len(nodes))
        a, b = onnx.NodeProto(), onnx.NodeProto()
        a.CopyFrom(nodes[i])
        b.CopyFrom(nodes[j])
        nodes[i].CopyFrom(b)
        nodes[j].CopyFrom(a)
        return f"swap nodes {i} {j}"
    if r < 0.8:
        order = list(nodes)
        rng.shuffle(order)
        copies = [onnx.NodeProto() for _ in order]
        for c, n in zip(copies, order, strict=True):
            c.CopyFrom(n)
        del nodes[:]
        nodes.extend(copies)
        return "shuffle nodes"
    node = nodes[i]
    node.op_type = rng.choice(OP_TYPES)
    if rng.random() < 0.1:
        node.domain = rng.choice(["com.microsoft", "ai.onnx.ml", "[bold]"])
    return f"node {i} op_type={node.op_type} domain={node.domain!r}"


def m_node_io(rng: random.Random, model: onnx.ModelProto) -> str | None:
    node = _node(rng, model)
    if node is None:
        return None
    values = _values(model)
    field = node.input if (rng.random() < 0.75 or not node.output) else node.output
    which = "input" if field is node.input else "output"
    r = rng.random()
    if r < 0.25 and len(field):
        del field[rng.randrange(len(field))]
        return f"{node.op_type} drop {which}"
    if r < 0.4 and len(field):
        field.append(field[rng.randrange(len(field))])
        return f"{node.op_type} duplicate {which}"
    if r < 0.5:
        field.append(rng.choice(["", "nonexistent"] + values))
        return f"{node.op_type} extra {which}"
    if r < 0.65 and len(field) > 1:
        a, b = rng.sample(range(len(field)), 2)
        field[a], field[b] = field[b], field[a]
        return f"{node.op_type} swap {which}s"
    if len(field) and values:
        k = rng.randrange(len(field))
        field[k] = rng.choice(values + [""])
        return f"{node.op_type} {which}[{k}] rewired"
    return None


def m_graph_io(rng: random.Random, model: onnx.ModelProto) -> str | None:
    g = model.graph
    r = rng.random()
    if r < 0.15:
        del g.output[:]
        return "no graph outputs"
    if r < 0.25:
        del g.input[:]
        return "no graph inputs"
    field = g.output if rng.random() < 0.5 else g.input
    which = "output" if field is g.output else "input"
    if r < 0.4 and len(field):
        del field[rng.randrange(len(field))]
        return f"drop graph {which}"
    if r < 0.55 and len(field):
        field.append(field[rng.randrange(len(field))])
        return f"duplicate graph {which}"
    values = _values(model)
    if r < 0.8 and values:
        name = rng.choice(values)
        field.append(helper.make_tensor_value_info(name, TensorProto.FLOAT,
                                                   rng.choice([None, [1, 4], [1, 3, 8, 8]])))
        return f"graph {which} += {name}"
    if len(field) > 1:
        field[0], field[-1] = field[-1], field[0]
        return f"reorder graph {which}s"
    return None


def m_names(rng: random.Random, model: onnx.ModelProto) -> str | None:
    g = model.graph
    r = rng.random()
    if r < 0.3 and g.node:
        node = _node(rng, model)
        node.name = _hostile(rng, model)
        return f"node name {node.name!r:.40}"
    if r < 0.4:
        for n in g.node:
            n.name = ""
        return "all node names empty"
    if r < 0.5 and len(g.node) > 1:
        name = rng.choice([g.node[0].name, "dup", ""])
        for n in rng.sample(list(g.node), rng.randrange(2, len(g.node) + 1)):
            n.name = name
        return f"duplicate node names {name!r:.40}"
    if r < 0.55:
        g.name = _hostile(rng, model)
        return f"graph name {g.name!r:.40}"
    values = _values(model)
    if not values:
        return None
    old = rng.choice(values)
    new = _hostile(rng, model)
    if r < 0.9:
        _rename_value(model, old, new)
        return f"rename value {old!r:.30} -> {new!r:.40}"
    # Rename in one place only: a dangling reference.
    for n in g.node:
        for i, name in enumerate(n.input):
            if name == old:
                n.input[i] = new
                return f"rename one use of {old!r:.30} -> {new!r:.40}"
    return None


def m_constant(rng: random.Random, model: onnx.ModelProto) -> str | None:
    """Move an initializer into a Constant node, well formed or not."""
    g = model.graph
    consts = [n for n in g.node if n.op_type == "Constant"]
    if consts and rng.random() < 0.4:
        node = rng.choice(consts)
    else:
        if not g.initializer:
            return None
        k = rng.randrange(len(g.initializer))
        t = onnx.TensorProto()
        t.CopyFrom(g.initializer[k])
        del g.initializer[k]
        for i in range(len(g.input) - 1, -1, -1):
            if g.input[i].name == t.name:
                del g.input[i]
        node = helper.make_node("Constant", [], [t.name], name=f"const_{t.name}", value=t)
        g.node.insert(0, node)
    variant = rng.choice(["keep", "none", "string", "strings", "sparse", "float", "floats",
                          "int", "ints", "two", "no_output", "tensor_int64", "graph"])
    if variant == "keep":
        return f"Constant {node.output[0] if node.output else ''!r:.30}"
    del node.attribute[:]
    if variant == "string":
        node.attribute.append(helper.make_attribute("value_string", "abc"))
    elif variant == "strings":
        node.attribute.append(helper.make_attribute("value_strings", ["a", "b"]))
    elif variant == "sparse":
        values = numpy_helper.from_array(np.array([1.0], np.float32), "v")
        indices = numpy_helper.from_array(np.array([0], np.int64), "i")
        sparse = helper.make_sparse_tensor(values, indices, [4])
        node.attribute.append(helper.make_attribute("sparse_value", sparse))
    elif variant == "float":
        node.attribute.append(helper.make_attribute("value_float", 1.5))
    elif variant == "floats":
        node.attribute.append(helper.make_attribute("value_floats", [1.0, 2.0]))
    elif variant == "int":
        node.attribute.append(helper.make_attribute("value_int", 3))
    elif variant == "ints":
        node.attribute.append(helper.make_attribute("value_ints", [1, -1]))
    elif variant == "two":
        node.attribute.append(helper.make_attribute("value_int", 3))
        node.attribute.append(helper.make_attribute("value_float", 1.0))
    elif variant == "no_output":
        node.attribute.append(helper.make_attribute("value_int", 3))
        del node.output[:]
    elif variant == "tensor_int64":
        node.attribute.append(helper.make_attribute(
            "value", numpy_helper.from_array(np.array([1, 2], np.int64), "t")))
    elif variant == "graph":
        node.attribute.append(helper.make_attribute(
            "value", helper.make_graph([], "g", [], [])))
    return f"Constant {variant}"


def m_opset(rng: random.Random, model: onnx.ModelProto) -> str | None:
    r = rng.random()
    if r < 0.5 and model.opset_import:
        v = rng.choice([0, 1, 6, 7, 9, 10, 11, 12, 17, 18, 21, 99, -1])
        model.opset_import[0].version = v
        return f"opset {v}"
    if r < 0.7:
        del model.opset_import[:]
        return "no opset_import"
    v = rng.choice([0, 1, 3, 7, 8, 10, 99, -1])
    model.ir_version = v
    return f"ir_version {v}"


def m_initializer_dup(rng: random.Random, model: onnx.ModelProto) -> str | None:
    t = _pick_initializer(rng, model)
    if t is None:
        return None
    if rng.random() < 0.5:
        model.graph.initializer.append(t)
        return f"duplicate initializer {t.name}"
    model.graph.input.append(helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
    return f"initializer {t.name} also a graph input"


PROTO_MUTATIONS: list[tuple[Callable[[random.Random, onnx.ModelProto], str | None], int]] = [
    (m_attr_value, 10), (m_attr_drop, 3), (m_attr_type, 2), (m_dims, 5), (m_dtype, 4),
    (m_init_data, 4), (m_init_values, 2), (m_nodes, 5), (m_node_io, 5), (m_graph_io, 4),
    (m_names, 8), (m_constant, 4), (m_opset, 2), (m_initializer_dup, 2),
]


# -- byte-level mutations -----------------------------------------------------------------------

def mutate_bytes(rng: random.Random, data: bytes) -> tuple[bytes, str]:
    """One byte-level change of a serialized model."""
    b = bytearray(data)
    r = rng.random()
    pos = rng.randrange(len(b)) if b else 0
    if r < 0.3:
        n = rng.choice([1, 1, 2, 4, 8])
        for _ in range(n):
            p = rng.randrange(len(b))
            b[p] ^= 1 << rng.randrange(8)
        return bytes(b), f"flip {n} bits"
    if r < 0.5:
        n = rng.choice([1, 2, 4])
        for k in range(n):
            if pos + k < len(b):
                b[pos + k] = rng.choice([0x00, 0xff, 0x7f, 0x80, 0x01, 0x0a, 0x5b])
        return bytes(b), f"overwrite {n} bytes at {pos}"
    if r < 0.65:
        chunk = bytes(rng.randrange(256) for _ in range(rng.choice([1, 2, 5, 16])))
        return bytes(b[:pos] + chunk + b[pos:]), f"insert {len(chunk)} bytes at {pos}"
    if r < 0.8:
        n = rng.choice([1, 2, 8, 64, 1024])
        return bytes(b[:pos] + b[pos + n:]), f"delete {n} bytes at {pos}"
    if r < 0.9:
        n = rng.choice([16, 64, 256])
        return bytes(b[:pos + n] + b[pos:]), f"duplicate {n} bytes at {pos}"
    return bytes(b[:pos]), f"truncate at {pos}"


def make_case(run_seed: int, index: int, seeds: dict[str, bytes]) -> Case:
    """Build case `index` of run `run_seed` (deterministic, independent of other cases)."""
    rng = case_rng(run_seed, index)
    seed_name = rng.choice(sorted(seeds))
    data = seeds[seed_name]
    mutations: list[str] = []
    level = rng.random()
    if level >= 0.3:  # protobuf level (70%), sometimes followed by a byte-level change
        model = onnx.load_from_string(data)
        funcs = [f for f, _ in PROTO_MUTATIONS]
        weights = [w for _, w in PROTO_MUTATIONS]
        want = rng.choice([1, 1, 1, 2, 2, 3])
        tries = 0
        while len(mutations) < want and tries < 20:
            tries += 1
            try:
                desc = rng.choices(funcs, weights)[0](rng, model)
            except (ValueError, TypeError):  # protobuf refused the value (a closed enum)
                desc = None
            if desc is not None:
                mutations.append(desc)
        data = model.SerializeToString().replace(BAD_UTF8_MARKER.encode(), BAD_UTF8_BYTES)
    if level < 0.3 or level > 0.92:
        for _ in range(rng.choice([1, 1, 2, 3])):
            data, desc = mutate_bytes(rng, data)
            mutations.append(desc)
    return Case(index, seed_name, data, mutations)
