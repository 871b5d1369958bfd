"""A quantised model: the IR plus per-tensor and per-layer integer parameters (DESIGN §4).

`QuantModel` is what the integer reference executes and what export will emit. It is built by
`build_quant_model` from activation (scale, zero point, bits) per tensor and quantised weights
per layer — from mpq's own quantiser (`quantize_graph`) or from an int8 `.tflite`'s own
parameters. Everything derived (requantisation multipliers, clamp ranges, add and softmax
constants) is computed here, once, by the functions of `mpq.quant.arith`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from mpq.errors import MpqError
from mpq.ir import Graph, Node, tensor_groups
from mpq.quant import arith
from mpq.quant.finite import check_finite_parameters, check_finite_ranges
from mpq.quant.weights import QuantizedWeights, WeightSpec, quantize_weights

# Ops whose output must carry exactly the input's quantisation (no requantisation happens).
SAME_AS_INPUT = ("max_pool", "avg_pool", "reshape", "resize", "pad", "slice")


@dataclass(frozen=True)
class ActQuant:
    """Quantisation of one activation tensor: real = scale·(q − zero_point), q in b bits."""

    scale: float
    zero_point: int
    bits: int = 8


@dataclass
class LayerQuant:
    """Integer parameters of one node."""

    weight: np.ndarray | None = None  # int8 values (b-bit range), IR layout
    weight_scale: np.ndarray | None = None  # float32 per output channel
    weight_bits: int = 8
    weight_scheme: str = "linear"  # how the values were chosen and are stored (DESIGN §7.4)
    weight_codebook: np.ndarray | None = None  # int8, 2^b entries (wentropy)
    weight_params: dict | None = None  # what a plan records to rebuild the weights exactly
    bias: np.ndarray | None = None  # int32 values (held as int64)
    bias_correction: np.ndarray | None = None  # real units, subtracted before quantising
    multiplier: np.ndarray | None = None  # per output channel
    shift: np.ndarray | None = None
    act_min: int = -128
    act_max: int = 127
    extra: dict[str, int] = field(default_factory=dict)  # add / softmax constants
    const: np.ndarray | None = None  # prelu slopes / mul, sub constant: int8 (zp in extra)
    table: np.ndarray | None = None  # activation: 256 int8 output codes (`mpq.quant.lut`)


@dataclass
class QuantModel:
    """The IR with integer parameters for every tensor and node."""

    graph: Graph
    acts: dict[str, ActQuant]
    layers: dict[str, LayerQuant]

    def input_quant(self) -> ActQuant:
        return self.acts[self.graph.inputs[0]]

    def output_quant(self) -> ActQuant:
        return self.acts[self.graph.outputs[0]]


def _check_same(node: Node, acts: dict[str, ActQuant]) -> None:
    a, b = acts[node.inputs[0]], acts[node.outputs[0]]
    if (a.scale, a.zero_point, a.bits) != (b.scale, b.zero_point, b.bits):
        raise MpqError(f"layer '{node.name}' ({node.op}): output quantisation must equal the "
                       f"input's ({b} vs {a})")


def layer_params(node: Node, acts: dict[str, ActQuant], weight: np.ndarray | None = None,
                 weight_scale: np.ndarray | None = None, weight_bits: int = 8,
                 bias: np.ndarray | None = None) -> LayerQuant:
    """Derive one node's integer parameters from its tensors' quantisation (DESIGN §4.1).

    conv/FC: (M, S) per channel from s_in·s_w[c]/s_out; all ops with a fused activation: the
    clamp range in the output's bits; add: TFLM's add constants; softmax: its fixed point
    constants (output must be 1/256, −128 at 8 bits, as TFLM requires).
    """
    out = acts[node.outputs[0]]
    lo = node.attrs.get("act_min", -np.inf)
    hi = node.attrs.get("act_max", np.inf)
    amin, amax = arith.clamp_activation(lo, hi, out.scale, out.zero_point, out.bits)
    if amin > amax:
        raise MpqError(f"layer '{node.name}': its activation range [{lo}, {hi}] lies outside "
                       f"what tensor '{node.outputs[0]}' can represent")
    lq = LayerQuant(act_min=amin, act_max=amax)
    if node.op in ("conv2d", "fully_connected"):
        src = acts[node.inputs[0]]
        lq.weight, lq.weight_scale, lq.weight_bits = weight, weight_scale, weight_bits
        lq.bias = np.asarray(bias, np.int64)
        lq.multiplier, lq.shift = arith.conv_multipliers(src.scale, weight_scale, out.scale)
    elif node.op == "add":
        a, b = acts[node.inputs[0]], acts[node.inputs[1]]
        lq.extra = arith.add_params(a.scale, b.scale, out.scale)
    elif node.op in SAME_AS_INPUT:
        _check_same(node, acts)
    elif node.op == "concat":
        for t in node.inputs:
            if acts[t] != out:
                raise MpqError(f"layer '{node.name}' (concat): every input must share the "
                               "output's quantisation")
    elif node.op == "softmax":
        if (out.scale, out.zero_point, out.bits) != (float(np.float32(1 / 256)), -128, 8):
            raise MpqError(f"layer '{node.name}' (softmax): output must be 8-bit with scale "
                           "1/256 and zero point −128")
        m, shift, diff_min = arith.softmax_params(acts[node.inputs[0]].scale)
        lq.extra = {"multiplier": m, "left_shift": shift, "diff_min": diff_min}
    elif node.op == "mean":
        lq.extra = mean_extra(node, acts)
    elif node.op in ("mul", "sub", "prelu"):
        _binary_params(node, acts, lq)
    elif node.op == "activation":
        lq.table = activation_layer_table(node, acts)
    return lq


def mean_extra(node: Node, acts: dict[str, ActQuant]) -> dict[str, int]:
    """MEAN's constants: the reduced element count n and TFLM's (M, S) of s_in/(s_out·n)
    (`arith.mean_params`)."""
    count = int(node.attrs["count"])
    m, s = arith.mean_params(acts[node.inputs[0]].scale, acts[node.outputs[0]].scale, count)
    return {"count": count, "multiplier": m, "shift": s}


def _binary_params(node: Node, acts: dict[str, ActQuant], lq: LayerQuant) -> None:
    """mul: TFLM's multiplier of s_a·s_b/s_o; sub: TFLM's sub constants (float32 ratios);
    prelu: the int8 slopes (the imported file's, else `arith.quantize_alpha`) and TFLM's two
    multipliers (`mpq.quant.arith`)."""
    out = acts[node.outputs[0]]
    if node.op == "prelu":
        if "alpha_q" in node.attrs:
            q = np.asarray(node.attrs["alpha_q"], np.int64)
            s_alpha, zp_alpha = float(node.attrs["alpha_scale"]), int(node.attrs["alpha_zp"])
        else:
            q, s_alpha, zp_alpha = arith.quantize_alpha(np.asarray(node.attrs["alpha"]))
        lq.const = q
        lq.extra = {**arith.prelu_params(acts[node.inputs[0]].scale, s_alpha, out.scale),
                    "alpha_zp": zp_alpha}
        return
    fn = arith.mul_params if node.op == "mul" else arith.sub_params
    if "const" not in node.attrs:
        a, b = acts[node.inputs[0]], acts[node.inputs[1]]
        lq.extra = fn(a.scale, b.scale, out.scale)
        return
    if "const_q" in node.attrs:
        q = np.asarray(node.attrs["const_q"], np.int64)
        s_c, zp_c = float(node.attrs["const_scale"]), int(node.attrs["const_zp"])
    else:
        q, s_c, zp_c = quantize_constant(np.asarray(node.attrs["const"], np.float64))
    s_x = acts[node.inputs[0]].scale
    s1, s2 = (s_c, s_x) if node.attrs.get("const_first") else (s_x, s_c)
    lq.const = q
    lq.extra = {**fn(s1, s2, out.scale), "const_zp": zp_c}


def quantize_constant(c: np.ndarray) -> tuple[np.ndarray, float, int]:
    """A constant mul/sub operand as an int8 tensor the way TFLite quantises a constant
    activation input: asymmetric per tensor from its min/max (range widened to contain 0),
    q = clamp(round_half_away(c/s) + zp) (`arith.choose_activation_params`)."""
    scale, zp = arith.choose_activation_params(float(c.min()), float(c.max()), 8)
    q = np.clip(arith.round_half_away(c / np.float32(scale)) + zp, -128, 127)
    return q.astype(np.int64), scale, zp


def activation_layer_table(node: Node, acts: dict[str, ActQuant]) -> np.ndarray:
    """The lookup table of an activation layer from its tensors' quantisation (`mpq.quant.lut`;
    sigmoid and tanh outputs must carry TFLM's fixed quantisation)."""
    from mpq.quant.lut import activation_table

    src, out = acts[node.inputs[0]], acts[node.outputs[0]]
    return activation_table(node.name, node.attrs["function"], node.attrs, src.scale,
                            src.zero_point, out.scale, out.zero_point, out.bits)


def fixed_output_quant(node: Node) -> ActQuant | None:
    """The output quantisation an op fixes whatever the data: softmax 1/256, −128; sigmoid
    1/256, −128 and tanh 1/128, 0 (TFLM int8; `mpq.quant.lut.FIXED_OUTPUT`); else None."""
    from mpq.quant.lut import FIXED_OUTPUT

    if node.op == "softmax":
        return softmax_output_quant()
    if node.op == "activation" and node.attrs["function"] in FIXED_OUTPUT:
        scale, zp = FIXED_OUTPUT[node.attrs["function"]]
        return ActQuant(scale, zp, 8)
    return None


def softmax_output_quant() -> ActQuant:
    """The fixed output quantisation of int8 softmax (TFLM softmax_common.cc)."""
    return ActQuant(float(np.float32(1 / 256)), -128, 8)


def quantize_graph(graph: Graph, ranges: dict[str, tuple[float, float]],
                   act_bits: dict[str, int] | None = None,
                   weight_bits: dict[str, int] | None = None,
                   weight_schemes: dict[str, WeightSpec] | None = None,
                   bias_corrections: dict[str, np.ndarray] | None = None) -> QuantModel:
    """mpq's own quantiser: TFLite-spec parameters at any per-tensor bitwidth (DESIGN §4.1–4.2).

    Activations: asymmetric from the calibrated real range; pool/reshape outputs inherit their
    input's parameters, concat inputs share the output's, softmax outputs are 1/256, −128.
    Weights: symmetric per output channel at the node's weight bits, or the node's scheme
    (`mpq.quant.weights`); bias int32 at s_in·s_w.
    """
    check_finite_parameters(graph)
    check_finite_ranges(ranges)
    acts = activation_quant(graph, ranges, act_bits)
    return quant_model_with_acts(graph, acts, weight_bits, weight_schemes, bias_corrections)


def activation_quant(graph: Graph, ranges: dict[str, tuple[float, float]],
                     act_bits: dict[str, int] | None = None) -> dict[str, ActQuant]:
    """Every tensor's activation parameters from its real range and bits (`quantize_graph`'s
    rules: concat shares the union range — through views too —, pool/reshape/pad/slice
    outputs inherit, softmax is fixed)."""
    act_bits = act_bits or {}
    ranges = dict(ranges)
    widen_hard_swish_ranges(graph, ranges, act_bits)
    acts: dict[str, ActQuant] = {}
    producer = graph.producer()
    for group in shared_quant_groups(graph):
        # One (scale, zp) per group: the union of its members' ranges (a concat's inputs
        # through any chain of views); an op with a fixed output (softmax, sigmoid, tanh)
        # fixes it. A view's output holds a subset of its input's values (plus real 0 for
        # pad, always representable), so only tensors not written by a SAME_AS_INPUT op
        # count — as before, a pool inherits.
        fixed = next((fixed_output_quant(producer[t]) for t in group if t in producer
                      and fixed_output_quant(producer[t]) is not None), None)
        if fixed is not None:
            q = fixed
        else:
            sources = [t for t in group
                       if not (t in producer and producer[t].op in SAME_AS_INPUT)]
            known = [ranges[t] for t in sources if t in ranges]
            lo = min(r[0] for r in known)
            hi = max(r[1] for r in known)
            # The bits of the group's first source (the search ties the whole group).
            bits = next((act_bits[t] for t in sources if t in act_bits), 8)
            q = ActQuant(*arith.choose_activation_params(lo, hi, bits), bits)
        for t in group:
            acts[t] = q
    return acts


def shared_quant_groups(graph: Graph) -> list[list[str]]:
    """Tensors that carry one quantisation (DESIGN §4.1): a SAME_AS_INPUT op's output with its
    input (pools, reshape, pad, slice copy values unchanged) and a concat's inputs with its
    output (TFLM's int8 concatenation does not requantise). Transitive, so a concat of
    reshaped heads shares its range with the heads' producers. Groups and their members in
    tensor order."""
    return tensor_groups(graph, ((t, n.outputs[0]) for n in graph.nodes
                                 if n.op in SAME_AS_INPUT or n.op == "concat"
                                 for t in n.inputs))


def widen_hard_swish_ranges(graph: Graph, ranges: dict[str, tuple[float, float]],
                            act_bits: dict[str, int]) -> None:
    """Widen (upwards, in place) a HardSwish output range too narrow for TFLM's int8 kernel,
    which needs s_out > s_in/128 (its output multiplier's exponent ≤ 0; hard_swish_common.cc):
    an input almost all negative has a tiny output range. The margin (1 %) keeps the float32
    quotient clear of the boundary."""
    for node in graph.nodes:
        if node.op != "activation" or node.attrs["function"] != "hard_swish":
            continue
        x, y = node.inputs[0], node.outputs[0]
        s_in, _ = arith.choose_activation_params(*ranges[x], act_bits.get(x, 8))
        lo, hi = min(float(ranges[y][0]), 0.0), max(float(ranges[y][1]), 0.0)
        steps = (1 << act_bits.get(y, 8)) - 1
        need = 1.01 * s_in / 128
        if (hi - lo) / steps < need:
            ranges[y] = (lo, lo + need * steps)


def weighted_layer(node: Node, acts: dict[str, ActQuant],
                   weights: WeightSpec | QuantizedWeights,
                   bias_correction: np.ndarray | None = None) -> LayerQuant:
    """One conv/FC layer's parameters: weights under a spec (or already quantised), int32
    bias at s_in·s_w[c] of b − δ (DESIGN §4.1), where δ (real units, per output channel) is
    the layer's bias correction (`mpq.quant.ptq`; none: δ = 0)."""
    qw = quantize_weights(node.weight, weights) if isinstance(weights, WeightSpec) else weights
    real_bias = node.bias if bias_correction is None else \
        np.asarray(node.bias, np.float64) - np.asarray(bias_correction, np.float64)
    bias = arith.quantize_bias(real_bias, acts[node.inputs[0]].scale, qw.scale)
    lq = layer_params(node, acts, qw.values, qw.scale, qw.bits, bias)
    lq.weight_scheme, lq.weight_codebook = qw.scheme, qw.codebook
    lq.weight_params = qw.params
    lq.bias_correction = None if bias_correction is None else \
        np.asarray(bias_correction, np.float64)
    return lq


def quant_model_with_acts(graph: Graph, acts: dict[str, ActQuant],
                          weight_bits: dict[str, int] | None = None,
                          weight_schemes: dict[str, WeightSpec] | None = None,
                          bias_corrections: dict[str, np.ndarray] | None = None) -> QuantModel:
    """The QuantModel for given activation parameters: weights quantised symmetrically per
    output channel at each layer's weight bits (default 8) — or by the layer's entry in
    `weight_schemes`, which then sets the bits too —, int32 biases at s_in·s_w[c] (after the
    layer's entry in `bias_corrections`, if any)."""
    weight_bits = weight_bits or {}
    weight_schemes = weight_schemes or {}
    bias_corrections = bias_corrections or {}
    layers: dict[str, LayerQuant] = {}
    for node in graph.nodes:
        if node.op in ("conv2d", "fully_connected"):
            spec = weight_schemes.get(node.name) or WeightSpec("linear",
                                                              weight_bits.get(node.name, 8))
            layers[node.name] = weighted_layer(node, acts, spec,
                                               bias_corrections.get(node.name))
        else:
            layers[node.name] = layer_params(node, acts)
    return QuantModel(graph=graph, acts=acts, layers=layers)


def with_weight_scheme(qm: QuantModel, spec: WeightSpec) -> QuantModel:
    """The same model with every weighted layer re-quantised under `spec` (activations kept)."""
    names = [n.name for n in qm.graph.nodes if n.op in ("conv2d", "fully_connected")]
    return quant_model_with_acts(qm.graph, qm.acts, None, {n: spec for n in names})


def quant_model_from_parameters(graph: Graph, acts: dict[str, ActQuant],
                                weights: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]
                                ) -> QuantModel:
    """A QuantModel from given parameters (e.g. an int8 `.tflite`'s own).

    `weights[node] = (int8 weights in IR layout, float32 scale per channel, int32 bias)`.
    """
    layers: dict[str, LayerQuant] = {}
    for node in graph.nodes:
        if node.op in ("conv2d", "fully_connected"):
            w, s, b = weights[node.name]
            layers[node.name] = layer_params(node, acts, w, np.asarray(s, np.float32), 8, b)
        else:
            layers[node.name] = layer_params(node, acts)
    return QuantModel(graph=graph, acts=acts, layers=layers)
