"""The `cmsis-nn` export backend (DESIGN §8): which layers call CMSIS-NN, with which arguments,
and how much scratch they need.

A layer-based layer goes to CMSIS-NN when its activations are int8 in and out and its weights
int8 or int4, and CMSIS-NN has a kernel that computes exactly what `mpq.sim` computes there:

- convolution (groups 1): `arm_convolve_wrapper_s8` / `_s4`;
- depthwise (groups = Cin, any channel multiplier): `arm_depthwise_conv_wrapper_s8` / `_s4`,
  with the filter transposed from mpq's [C·m][KH][KW][1] to CMSIS-NN's [1][KH][KW][C·m];
- fully connected: `arm_fully_connected_per_channel_s8`; `arm_fully_connected_s4` only takes one
  multiplier, so 4-bit weights go there when every output channel has the same (M, S);
- add, average / max pooling, softmax: `arm_elementwise_add_s8`, `arm_avgpool_s8`,
  `arm_max_pool_s8`, `arm_softmax_s8`;
- mul of two equal-shaped activations: `arm_elementwise_mul_s8` (no broadcast; sub and prelu
  have no CMSIS-NN s8 kernel).

Everything else keeps mpq's portable kernels, for a reason the export report names: sub-byte
activations; 2-bit weights and non-linear weight schemes (codebooks, powers of two); the plan's
in-place depthwise convolutions (CMSIS-NN writes a separate output, and the plan's arena has no
room for one); grouped convolutions; two shapes whose CMSIS-NN fast paths read taps unchecked
(1x1 convolutions with implied bottom/right padding, 3x3 depthwise with more than one implied
bottom/right row or column: 3,425 and 144 wrong bytes in single-layer tests); and the whole
patch stage, whose kernels read and write views into larger stored tensors (CMSIS-NN takes
contiguous NHWC tensors only).

A convolution fused with its residual add (`mpq.memory.fused_residual_adds`: the sum overwrites
the skip, and the arena holds no room for the convolution's own output) calls CMSIS-NN band by
band of output rows (`plan_fused_call`): the convolution of a band into the scratch, then
`arm_elementwise_add_s8` over the band with the skip as input 2 and output (in place: it reads
each word of both inputs before it writes that word of the output).

The static scratch is sized here with Python mirrors of CMSIS-NN's `*_get_buffer_size` for a
core with the DSP extension and without MVE (Cortex-M4/M7); the generated code asks CMSIS-NN's
own getter before every call and returns `MPQ_ERR_CMSIS_SCRATCH` if it wants more.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mpq.errors import MpqError
from mpq.ir import Graph, Node
from mpq.quant.qmodel import QuantModel

BACKENDS = ("portable", "cmsis-nn")
ENV = "CMSIS_NN_PATH"

# The CMSIS-NN sources each called function needs: its call closure, read off the object files
# of CMSIS-NN (arm_nnfunctions.h V.19.1.0) built for Cortex-M4 and for the host. Paths are
# relative to the checkout; `mpq.mk` prefixes them with $(CMSIS_NN_PATH).
_CONV = "Source/ConvolutionFunctions/"
_SUPPORT = "Source/NNSupportFunctions/"
SOURCES: dict[str, tuple[str, ...]] = {
    "arm_convolve_wrapper_s8": (
        _CONV + "arm_convolve_wrapper_s8.c", _CONV + "arm_convolve_get_buffer_sizes_s8.c",
        _CONV + "arm_convolve_1_x_n_s8.c", _CONV + "arm_convolve_1x1_s8.c",
        _CONV + "arm_convolve_1x1_s8_fast.c", _CONV + "arm_convolve_s8.c",
        _CONV + "arm_nn_mat_mult_kernel_row_offset_s8_s16.c",
        _CONV + "arm_nn_mat_mult_kernel_s8_s16.c", _SUPPORT + "arm_nn_mat_mult_nt_t_s8.c",
        _SUPPORT + "arm_q7_to_q15_with_offset.c",
        _SUPPORT + "arm_s8_to_s16_unordered_with_offset.c"),
    "arm_convolve_wrapper_s4": (
        _CONV + "arm_convolve_wrapper_s4.c", _CONV + "arm_convolve_get_buffer_sizes_s4.c",
        _CONV + "arm_convolve_1_x_n_s4.c", _CONV + "arm_convolve_1x1_s4.c",
        _CONV + "arm_convolve_1x1_s4_fast.c", _CONV + "arm_convolve_s4.c",
        _CONV + "arm_nn_mat_mult_kernel_s4_s16.c", _SUPPORT + "arm_nn_mat_mult_nt_t_s4.c",
        _SUPPORT + "arm_q7_to_q15_with_offset.c"),
    "arm_depthwise_conv_wrapper_s8": (
        _CONV + "arm_depthwise_conv_wrapper_s8.c",
        _CONV + "arm_depthwise_conv_get_buffer_sizes_s8.c",
        _CONV + "arm_convolve_get_buffer_sizes_s8.c", _CONV + "arm_depthwise_conv_3x3_s8.c",
        _CONV + "arm_depthwise_conv_s8.c", _CONV + "arm_depthwise_conv_s8_opt.c",
        _SUPPORT + "arm_q7_to_q15_with_offset.c"),
    "arm_depthwise_conv_wrapper_s4": (
        _CONV + "arm_depthwise_conv_wrapper_s4.c",
        _CONV + "arm_depthwise_conv_get_buffer_sizes_s4.c",
        _CONV + "arm_depthwise_conv_get_buffer_sizes_s8.c",
        _CONV + "arm_convolve_get_buffer_sizes_s8.c", _CONV + "arm_depthwise_conv_s4.c",
        _CONV + "arm_depthwise_conv_s4_opt.c", _SUPPORT + "arm_q7_to_q15_with_offset.c"),
    "arm_fully_connected_per_channel_s8": (
        "Source/FullyConnectedFunctions/arm_fully_connected_per_channel_s8.c",
        "Source/FullyConnectedFunctions/arm_fully_connected_get_buffer_sizes_s8.c",
        _SUPPORT + "arm_nn_vec_mat_mult_t_per_ch_s8.c"),
    "arm_fully_connected_s4": (
        "Source/FullyConnectedFunctions/arm_fully_connected_s4.c",
        _SUPPORT + "arm_nn_vec_mat_mult_t_s4.c"),
    "arm_elementwise_add_s8": ("Source/BasicMathFunctions/arm_elementwise_add_s8.c",),
    "arm_avgpool_s8": ("Source/PoolingFunctions/arm_avgpool_s8.c",
                       "Source/PoolingFunctions/arm_avgpool_get_buffer_sizes_s8.c"),
    "arm_max_pool_s8": ("Source/PoolingFunctions/arm_max_pool_s8.c",),
    "arm_softmax_s8": ("Source/SoftmaxFunctions/arm_softmax_s8.c",
                       "Source/SoftmaxFunctions/arm_nn_softmax_common_s8.c"),
    "arm_elementwise_mul_s8": ("Source/BasicMathFunctions/arm_elementwise_mul_s8.c",),
}
HEADER = "Include/arm_nnfunctions.h"


def check_backend(backend: str) -> str:
    """`backend` if it is one of BACKENDS, else a one-line MpqError."""
    if backend not in BACKENDS:
        raise MpqError(f"unknown backend '{backend}' (choose from {', '.join(BACKENDS)})")
    return backend


def sources_for(functions: set[str] | list[str]) -> list[str]:
    """The CMSIS-NN sources (relative to the checkout) that `functions` need, sorted."""
    return sorted({s for f in functions for s in SOURCES[f]})


def cmsis_nn_root(sources: list[str] | None = None) -> Path:
    """The CMSIS-NN checkout named by $CMSIS_NN_PATH, checked to hold the header and `sources`
    (default: every source the backend may call); a one-line MpqError otherwise."""
    value = os.environ.get(ENV, "").strip()
    if not value:
        raise MpqError(f"the cmsis-nn backend builds with CMSIS-NN: set {ENV} to a CMSIS-NN "
                       "checkout (https://github.com/ARM-software/CMSIS-NN)")
    root = Path(value).expanduser()
    if not root.is_dir():
        raise MpqError(f"{ENV}={value}: no such directory")
    if not (root / HEADER).is_file():
        raise MpqError(f"{ENV}={value}: not a CMSIS-NN checkout (no {HEADER})")
    for rel in sources if sources is not None else sources_for(SOURCES):
        if not (root / rel).is_file():
            raise MpqError(f"{ENV}={value}: this CMSIS-NN has no {rel} (mpq needs the layout "
                           "of CMSIS-NN 7.x)")
    return root.resolve()


# -- scratch: mirrors of CMSIS-NN's *_get_buffer_size for DSP cores without MVE -----------------

def _align4(n: int) -> int:
    return -(-n // 4) * 4


def conv_s8_scratch(kh: int, kw: int, cin: int, stride_w: int, pads: tuple[int, int],
                    dilations: tuple[int, int], armclang: bool = False) -> int:
    """`arm_convolve_wrapper_s8_get_buffer_size_dsp` (arm_convolve_get_buffer_sizes_s8.c):
    1x1 unpadded undilated: 0 with stride ≠ 1, else `arm_convolve_1x1_s8_fast`'s 4·Cin under Arm
    Compiler ≥ 6.10.50 and 0 under GCC; every other shape (1_x_n included):
    `arm_convolve_s8_get_buffer_size` = 2·align4(KH·KW·Cin) int16."""
    if (kh, kw) == (1, 1) and pads == (0, 0) and dilations == (1, 1):
        return 4 * cin if armclang and stride_w == 1 else 0
    return 2 * _align4(kh * kw * cin) * 2


def conv_s4_scratch(kh: int, kw: int, cin: int, pads: tuple[int, int],
                    dilations: tuple[int, int]) -> int:
    """`arm_convolve_wrapper_s4_get_buffer_size` without MVE (arm_convolve_get_buffer_sizes_s4.c):
    0 for 1x1 unpadded undilated, else `arm_convolve_s4_get_buffer_size` = 2·KH·KW·Cin int16."""
    if (kh, kw) == (1, 1) and pads == (0, 0) and dilations == (1, 1):
        return 0
    return 2 * kh * kw * cin * 2


def dw_s8_scratch(kh: int, kw: int, cin: int, cout: int, pads: tuple[int, int],
                  dilations: tuple[int, int]) -> int:
    """`arm_depthwise_conv_wrapper_s8_get_buffer_size_dsp` (arm_depthwise_conv_get_buffer_sizes_s8
    .c): channel multiplier 1 and no dilation: 0 for 3x3 with top/left padding ≤ 1 (the 3x3
    kernel), else `arm_depthwise_conv_s8_opt`'s Cin·KH·KW int16; the generic kernel needs none."""
    if cin != cout or dilations != (1, 1):
        return 0
    if (kh, kw) == (3, 3) and max(pads) <= 1:
        return 0
    return cin * kh * kw * 2


def dw_s4_scratch(kh: int, kw: int, cin: int, cout: int, dilations: tuple[int, int]) -> int:
    """`arm_depthwise_conv_wrapper_s4_get_buffer_size` without MVE (arm_depthwise_conv_get_buffer_
    sizes_s4.c): `arm_depthwise_conv_s4_opt`'s Cin·KH·KW int16 for channel multiplier 1 and no
    dilation, else 0."""
    if cin != cout or dilations != (1, 1):
        return 0
    return cin * kh * kw * 2


def avgpool_s8_scratch(channels: int) -> int:
    """`arm_avgpool_s8_get_buffer_size_dsp`: one int32 sum per channel, 4·C bytes."""
    return 4 * channels


# -- which layers go to CMSIS-NN ------------------------------------------------------------------

@dataclass
class CmsisCall:
    """One CMSIS-NN call of the generated `mpq_model_run` (numbers only; the template lays out
    the C)."""

    function: str
    kind: str  # conv, dw, fc, fc_s4, add, avgpool, maxpool, softmax
    scratch: int  # bytes the target's getter returns (DSP, no MVE)
    getter: str | None = None  # CMSIS-NN's *_get_buffer_size for the run-time check
    params: dict[str, Any] = field(default_factory=dict)
    weight_layout: str | None = None  # "ohwi" (as mpq stores it) or "1hwc" (depthwise)
    add: dict[str, int] | None = None  # conv+add (plan_fused_call): the add and the bands

    @property
    def functions(self) -> tuple[str, ...]:
        """Every CMSIS-NN function the call makes (a fused conv+add also adds)."""
        return (self.function, "arm_elementwise_add_s8") if self.add else (self.function,)

    @property
    def label(self) -> str:
        """The call as the export report names it."""
        return " + ".join(self.functions)


def _dims(shape: tuple[int, ...]) -> list[int]:
    """[n, h, w, c] of a tensor: rank-4 NHWC, or [1, K] as 1×1×K."""
    if len(shape) == 4:
        return [int(v) for v in shape]
    return [1, 1, 1, int(np.prod(shape[1:]))]


def plan_call(node: Node, graph: Graph, qm: QuantModel, inplace: set[str],
              fused: set[str]) -> CmsisCall | str:
    """The CMSIS-NN call for a layer-based node, or why it keeps the portable kernel."""
    acts = qm.acts
    if node.op in ("reshape", "concat"):
        return "no CMSIS-NN kernel (a view / channel copy)"
    if node.op in ("mean", "resize"):
        return "no CMSIS-NN kernel (mpq's portable mean / nearest resize)"
    if node.op in ("pad", "slice"):
        return "no CMSIS-NN kernel (a block copy, mpq_copy_block)"
    if node.op == "activation":
        return "no CMSIS-NN int8 kernel (portable table lookup, mpq_activation)"
    in_bits = [acts[t].bits for t in node.inputs]
    out_t = node.outputs[0]
    if any(b != 8 for b in in_bits) or acts[out_t].bits != 8:
        return "sub-byte activations"
    lq = qm.layers[node.name]
    scheme = getattr(lq, "weight_scheme", "linear")
    if lq.weight is not None and scheme != "linear":
        return f"{scheme} weights (CMSIS-NN takes linear int8/int4 weights)"
    x = _dims(graph.tensors[node.inputs[0]].shape)
    y = _dims(graph.tensors[out_t].shape)
    zp_in, zp_out = acts[node.inputs[0]].zero_point, acts[out_t].zero_point
    act = {"act_min": lq.act_min, "act_max": lq.act_max}
    if node.op == "conv2d":
        return _conv_call(node, qm, x, y, zp_in, zp_out, act, inplace, fused)
    if node.op == "fully_connected":
        cout, k = lq.weight.shape
        params = {"input_offset": -zp_in, "output_offset": zp_out, "k": int(k),
                  "cout": int(cout), **act}
        if lq.weight_bits == 8:
            return CmsisCall("arm_fully_connected_per_channel_s8", "fc", 0,
                             "arm_fully_connected_s8_get_buffer_size", params, "ohwi")
        if lq.weight_bits == 4:
            m, s = np.unique(lq.multiplier), np.unique(lq.shift)
            if m.size != 1 or s.size != 1:
                return "4-bit weights with per-channel scales (arm_fully_connected_s4 is " \
                       "per-tensor)"
            params.update(multiplier=int(m[0]), shift=int(s[0]))
            return CmsisCall("arm_fully_connected_s4", "fc_s4", 0, None, params, "ohwi")
        return f"{lq.weight_bits}-bit weights"
    if node.op == "add":
        e = lq.extra
        za, zb = (acts[t].zero_point for t in node.inputs)
        return CmsisCall("arm_elementwise_add_s8", "add", 0, None, {
            "a_offset": -za, "a_multiplier": e["m1"], "a_shift": e["s1"],
            "b_offset": -zb, "b_multiplier": e["m2"], "b_shift": e["s2"],
            "left_shift": e["left_shift"], "output_offset": zp_out,
            "output_multiplier": e["mo"], "output_shift": e["so"],
            "size": int(np.prod(y)), **act})
    if node.op in ("avg_pool", "max_pool"):
        a = node.attrs
        params = {"input": x, "output": y, "kernel_h": a["kernel"][0],
                  "kernel_w": a["kernel"][1], "stride_h": a["strides"][0],
                  "stride_w": a["strides"][1], "pad_top": a["pads"][0],
                  "pad_left": a["pads"][1], **act}
        if node.op == "max_pool":
            return CmsisCall("arm_max_pool_s8", "maxpool", 0, None, params)
        if acts[node.inputs[0]] != acts[out_t]:
            return "input and output quantised differently (arm_avgpool_s8 does not requantise)"
        return CmsisCall("arm_avgpool_s8", "avgpool", avgpool_s8_scratch(x[3]),
                         "arm_avgpool_s8_get_buffer_size", params)
    if node.op == "softmax":
        e = lq.extra
        return CmsisCall("arm_softmax_s8", "softmax", 0, None, {
            "rows": x[0] * x[1] * x[2], "row_size": x[3], "multiplier": e["multiplier"],
            "shift": e["left_shift"], "diff_min": e["diff_min"]})
    if node.op == "mul":
        # TFLM's MulElementwise over equal-shaped int8 operands (CMSIS-NN has no broadcast).
        shapes = {graph.tensors[t].shape for t in node.inputs + node.outputs}
        if "const" in node.attrs or len(shapes) != 1:
            return "broadcast or constant operand (arm_elementwise_mul_s8 takes equal shapes)"
        e = lq.extra
        za, zb = (acts[t].zero_point for t in node.inputs)
        return CmsisCall("arm_elementwise_mul_s8", "mul", 0, None, {
            "a_offset": -za, "b_offset": -zb, "output_offset": zp_out,
            "output_multiplier": e["mo"], "output_shift": e["so"], "size": int(np.prod(y)),
            **act})
    if node.op in ("sub", "prelu"):
        return f"no CMSIS-NN s8 kernel for '{node.op}'"
    return f"no CMSIS-NN kernel for '{node.op}'"  # pragma: no cover - the IR has no other ops


def _conv_call(node: Node, qm: QuantModel, x: list[int], y: list[int], zp_in: int, zp_out: int,
               act: dict[str, int], inplace: set[str], fused: set[str]) -> CmsisCall | str:
    """Convolution and depthwise convolution (see the module docstring for what stays portable)."""
    if node.name in fused:
        return "fused with its residual add (CMSIS-NN has no conv+add; the sum overwrites the skip)"
    if node.name in inplace:
        return "in-place depthwise (CMSIS-NN writes a separate output)"
    lq = qm.layers[node.name]
    if lq.weight_bits not in (8, 4):
        return f"{lq.weight_bits}-bit weights"
    a = node.attrs
    cout, kh, kw, cin_g = lq.weight.shape
    cin = x[3]
    sh, sw = a["strides"]
    dh, dw = a["dilations"]
    pt, pl = a["pads"][0], a["pads"][1]
    depthwise = a["groups"] == cin and cin_g == 1 and cin > 1
    if a["groups"] != 1 and not depthwise:
        return "grouped convolution"
    # Bottom/right padding CMSIS-NN infers from the output size; its 1x1 kernels read every tap
    # and its 3x3 depthwise kernel the centre column, unchecked.
    pb = max(0, (y[1] - 1) * sh + dh * (kh - 1) + 1 - pt - x[1])
    pr = max(0, (y[2] - 1) * sw + dw * (kw - 1) + 1 - pl - x[2])
    params = {"input_offset": -zp_in, "output_offset": zp_out, "stride_h": sh, "stride_w": sw,
              "pad_top": pt, "pad_left": pl, "dilation_h": dh, "dilation_w": dw,
              "input": x, "output": y, **act}
    one = (kh, kw) == (1, 1) and (pt, pl) == (0, 0) and (dh, dw) == (1, 1)
    if one and (pb or pr):
        return "1x1 convolution with bottom/right padding (CMSIS-NN's 1x1 kernels read every tap)"
    if depthwise:
        mult = cout // cin
        three = (kh, kw) == (3, 3) and max(pt, pl) <= 1 and mult == 1 and (dh, dw) == (1, 1)
        if three and max(pb, pr) > 1:
            return "3x3 depthwise with bottom/right padding > 1 (arm_depthwise_conv_3x3_s8)"
        params.update(ch_mult=mult, filter=[1, kh, kw, cout])
        if lq.weight_bits == 8:
            return CmsisCall("arm_depthwise_conv_wrapper_s8", "dw",
                             dw_s8_scratch(kh, kw, cin, cout, (pt, pl), (dh, dw)),
                             "arm_depthwise_conv_wrapper_s8_get_buffer_size", params, "1hwc")
        return CmsisCall("arm_depthwise_conv_wrapper_s4", "dw",
                         dw_s4_scratch(kh, kw, cin, cout, (dh, dw)),
                         "arm_depthwise_conv_wrapper_s4_get_buffer_size", params, "1hwc")
    params["filter"] = [cout, kh, kw, cin]
    if lq.weight_bits == 8:
        scratch = max(conv_s8_scratch(kh, kw, cin, sw, (pt, pl), (dh, dw), armclang)
                      for armclang in (False, True))
        return CmsisCall("arm_convolve_wrapper_s8", "conv", scratch,
                         "arm_convolve_wrapper_s8_get_buffer_size", params, "ohwi")
    return CmsisCall("arm_convolve_wrapper_s4", "conv",
                     conv_s4_scratch(kh, kw, cin, (pt, pl), (dh, dw)),
                     "arm_convolve_wrapper_s4_get_buffer_size", params, "ohwi")


def cmsis_weights(weight: np.ndarray, layout: str) -> np.ndarray:
    """A layer's weights in CMSIS-NN's layout: OHWI as mpq stores them, or, for depthwise
    convolutions, [C·m][KH][KW][1] transposed to [1][KH][KW][C·m] (runtimes.md §1.3)."""
    if layout == "1hwc":
        return np.ascontiguousarray(weight[:, :, :, 0].transpose(1, 2, 0))
    return weight


def fused_add_rows(out_w: int, out_c: int, out_h: int, conv_scratch: int, budget: int) -> int:
    """Output rows per band of a fused conv+add: as many as fit in the scratch the plan reserved
    (`budget`, the plan's `scratch_bytes`) beside the convolution's own CMSIS-NN scratch
    (`conv_scratch`, 16-byte aligned), at least one, at most the whole output."""
    room = budget - _align16(conv_scratch)
    return max(1, min(out_h, room // (out_w * out_c)))


def _align16(n: int) -> int:
    return -(-n // 16) * 16


def plan_fused_call(conv: Node, add: Node, skip: str, graph: Graph, qm: QuantModel,
                    inplace: set[str], budget: int) -> CmsisCall | str:
    """A convolution fused with its residual add (add → (conv, skip) of
    `mpq.memory.fused_residual_adds`) as CMSIS-NN calls, or why it keeps `mpq_conv2d_add`.

    Per band of `fused_add_rows` output rows r0 … r1−1: the convolution of those rows (input
    rows max(0, r0·sh − pt) … min(H, (r1−1)·sh − pt + dh·(KH−1) + 1), the top padding only
    where the band reaches above the input) into the scratch after the convolution's own, then
    `arm_elementwise_add_s8(res, skip, …)` writes the band's sums over the skip rows r0 … r1−1.
    The band's convolution never reads the skip (the plan fuses only then), so the order is
    free. The add's constants are TFLM's (`quant.arith` add), input 1 = the convolution's result.
    """
    call = plan_call(conv, graph, qm, inplace, set())
    if isinstance(call, str):
        return call
    acts = qm.acts
    out = add.outputs[0]
    if acts[skip].bits != 8 or acts[out].bits != 8:
        return "sub-byte activations"
    res = conv.outputs[0]
    lq = qm.layers[add.name]
    e = lq.extra
    m1, s1, m2, s2 = (e["m1"], e["s1"], e["m2"], e["s2"]) if res == add.inputs[0] \
        else (e["m2"], e["s2"], e["m1"], e["s1"])
    y = call.params["output"]
    rows = fused_add_rows(y[2], y[3], y[1], call.scratch, budget)
    call.add = {"res_offset": -acts[res].zero_point, "res_multiplier": m1, "res_shift": s1,
                "skip_offset": -acts[skip].zero_point, "skip_multiplier": m2,
                "skip_shift": s2, "left_shift": e["left_shift"],
                "output_offset": acts[out].zero_point, "output_multiplier": e["mo"],
                "output_shift": e["so"], "act_min": lq.act_min, "act_max": lq.act_max,
                "rows": rows, "conv_scratch": _align16(call.scratch),
                "kernel_h": int(qm.layers[conv.name].weight.shape[1])}
    call.scratch = _align16(call.scratch) + rows * y[2] * y[3]
    return call
