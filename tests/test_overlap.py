"""Partial input/output overlap (issue 16 item 2, vMCU): the safe shift against a brute-force
check, the C kernels writing in the order it assumes (an output stored that many bytes below
its input gives the same bytes as a separate output, sub-byte maps included; one pixel less
breaks the int8 pixel-pair path), the planner's use of it, the plan check refusing a tampered
overlap, and searched plans with overlapped layers (8- and 4-bit maps) byte-exact against the
integer reference on the host and on qemu-m4."""

from __future__ import annotations

import ctypes
import json
import shutil
from pathlib import Path

import ckernels as ck
import numpy as np
import onnx
import pytest
from conftest import run_mpq, shared_model
from onnx_builders import _Builder, _input

from mpq.errors import MpqError
from mpq.frontend.onnx_import import import_onnx
from mpq.memory import (
    ALIGN,
    buffers_conflict,
    node_overlap_shift,
    node_reverse_shift,
    overlap_shift,
    reverse_overlap_shift,
)
from mpq.patch import plan_patches
from mpq.plan import load_plan_with_model
from mpq.quant import arith

needs_arm = pytest.mark.skipif(shutil.which("arm-none-eabi-gcc") is None
                               or shutil.which("qemu-system-arm") is None,
                               reason="needs arm-none-eabi-gcc and qemu-system-arm")


# -- the shift ---------------------------------------------------------------------------------

def _brute_shift(in_hwc, out_hwc, window, dil, in_bits, out_bits, group,
                 origin=None) -> int:
    """The least D from which on every shift is safe, by simulation: pixels in raster order,
    `group` per unit; with the output D bytes below the input, a unit may not write a byte
    holding any input element that unit or a later pixel still reads (every tap of every
    window enumerated, dilation included). `origin` (y0, x0, stored width): the input is a
    view whose element (0, 0) is that element of a wider stored map, D counted from the
    stored map's first byte."""
    h, w, c = in_hwc
    ho, wo, co = out_hwc
    sh, sw, pt, pl, kh, kw = window
    y0, x0, stored_w = origin or (0, 0, w)
    reads = []
    for oy in range(ho):
        for ox in range(wo):
            reads.append({(((y0 + iy) * stored_w + x0 + ix) * c + ch) * in_bits // 8
                          for ky in range(kh) for kx in range(kw)
                          for iy in [oy * sh - pt + ky * dil] for ix in [ox * sw - pl + kx * dil]
                          if 0 <= iy < h and 0 <= ix < w for ch in range(c)})
    n = ho * wo
    units = []
    for start in range(0, n, group):
        end = min(start + group, n)
        units.append((range(start * co * out_bits // 8, -(-end * co * out_bits // 8)),
                      set().union(*reads[start:])))

    def safe(d: int) -> bool:
        return not any(b - d in needed for written, needed in units for b in written)

    top = -(-n * co * out_bits // 8)  # from here on nothing written can reach the input
    for d in range(top, -1, -1):
        if not safe(d):
            return d + 1
    return 0


@pytest.mark.parametrize("in_hwc,out_hwc,window,dil,bits,group", [
    ((4, 3, 8), (4, 3, 8), (1, 1, 0, 0, 1, 1), 1, (8, 8), 2),     # pointwise 8 → 8, pairs
    ((4, 3, 8), (4, 3, 8), (1, 1, 0, 0, 1, 1), 1, (8, 8), 1),
    ((3, 5, 6), (3, 5, 10), (1, 1, 0, 0, 1, 1), 1, (4, 8), 2),    # expanding, 4-bit in
    ((3, 5, 6), (3, 5, 5), (1, 1, 0, 0, 1, 1), 1, (8, 2), 2),     # odd sub-byte run
    ((6, 5, 3), (3, 3, 4), (2, 2, 1, 1, 3, 3), 1, (8, 8), 2),     # 3×3 stride 2, padded
    ((6, 6, 2), (6, 6, 4), (1, 1, 2, 2, 3, 3), 2, (4, 4), 2),     # dilated, "same" pads
    ((6, 4, 4), (3, 2, 4), (2, 2, 0, 0, 2, 2), 1, (4, 2), 1),     # pooling
    ((5, 5, 3), (3, 3, 3), (2, 2, 1, 1, 3, 3), 1, (2, 8), 1),
])
def test_overlap_shift_is_the_least_safe_shift(in_hwc, out_hwc, window, dil, bits, group):
    """`overlap_shift` equals the least D the simulation of the write order accepts (a safe
    D is one where no written byte reaches an input byte still to be read)."""
    got = overlap_shift(in_hwc, out_hwc, window, bits[0], bits[1], group)
    assert got == _brute_shift(in_hwc, out_hwc, window, dil, bits[0], bits[1], group)


def test_pointwise_shift_is_one_pair_of_pixels() -> None:
    """8-bit C → C pointwise: the output starts two pixels (the int8 kernel's pair) below the
    input; 16 B aligned by the planner."""
    assert overlap_shift((25, 5, 64), (25, 5, 64), (1, 1, 0, 0, 1, 1), 8, 8, 2) == 128
    assert overlap_shift((25, 5, 64), (25, 5, 64), (1, 1, 0, 0, 1, 1), 8, 8, 1) == 64
    # 8 → 4 bits halves what each pixel writes; the input still moves 64 B a pixel
    assert overlap_shift((25, 5, 64), (25, 5, 64), (1, 1, 0, 0, 1, 1), 8, 4, 2) == 64


# -- the C kernels write in that order ---------------------------------------------------------

def _with_pad_top(p, pad_top):
    """`p`, or a copy with another top padding (one output row's call)."""
    if pad_top is None:
        return p
    q = type(p).from_buffer_copy(p)
    q.pad_top = pad_top
    return q


def _conv_case(rng, h, w, cin, cout, k, stride, pad, groups, in_bits, out_bits, w_bits,
               fmt=ck.WFMT_LINEAR):
    ho = (h + 2 * pad - k) // stride + 1
    wo = (w + 2 * pad - k) // stride + 1
    weight = ck.Weights.random(rng, (cout, k, k, cin // groups), w_bits, fmt)
    lo, hi = arith.qrange(out_bits)
    p = ck.ConvParams(stride, stride, 1, 1, pad, pad, groups, int(rng.integers(-3, 3)),
                      int(rng.integers(-2, 2)), lo, hi)
    mult = rng.integers(1 << 29, 1 << 30, cout)
    shift = rng.integers(-9, -5, cout)
    bias = rng.integers(-500, 500, cout)

    def run(kern, vin, vout, pad_top=None):
        return kern.conv2d(_with_pad_top(p, pad_top), weight, None, bias, mult, shift, vin,
                           vout)
    return (h, w, cin), (ho, wo, cout), (stride, stride, pad, pad, k, k), 2, run


class _PackedFilter(ctypes.Structure):
    """mpq_packed_filter (kernels/mpq_kernels.h)."""
    _fields_ = [("data", ctypes.c_void_p), ("bias", ctypes.c_void_p),
                *((f, ctypes.c_int32) for f in ("bits", "n", "h", "w", "c", "k"))]


def _packed_case(rng, h, w, cin, cout, k, stride, pad, groups, in_bits, out_bits, w_bits):
    """A convolution on the packed sub-byte kernel (mpq_packed_conv2d: 4/2-bit input and
    weights, filter packed by the library's own mpq_packed_pack), as `_conv_case`."""
    assert groups == 1
    ho = (h + 2 * pad - k) // stride + 1
    wo = (w + 2 * pad - k) // stride + 1
    weight = ck.Weights.random(rng, (cout, k, k, cin), w_bits, ck.WFMT_LINEAR)
    lo, hi = arith.qrange(out_bits)
    zp = int(rng.integers(-2, 2))
    p = ck.ConvParams(stride, stride, 1, 1, pad, pad, 1, zp, int(rng.integers(-2, 2)), lo, hi)
    mult = rng.integers(1 << 29, 1 << 30, cout)
    shift = rng.integers(-9, -5, cout)
    bias = rng.integers(-500, 500, cout).astype(np.int32)
    n_k = k * k * cin

    def run(kern, vin, vout, pad_top=None):
        lib, ref, ptr = kern.lib, ctypes.byref, ctypes.c_void_p
        f, _keep = kern._filter(weight)
        words = np.zeros(lib.mpq_packed_words(w_bits, cout, n_k), np.uint32)
        cbias = np.zeros(cout, np.int32)
        assert lib.mpq_packed_pack(ref(f), ptr(bias.ctypes.data), in_bits, zp,
                                   ptr(words.ctypes.data), ptr(cbias.ctypes.data)) == 0
        pf = _PackedFilter(words.ctypes.data, cbias.ctypes.data, w_bits, cout, k, k, cin, n_k)
        q, _qk = kern._quant(None, mult, shift)
        scratch = np.zeros(32 * ((n_k + 15) // 16) + 16, np.uint32)
        return lib.mpq_packed_conv2d(ref(_with_pad_top(p, pad_top)), ref(pf), ref(q),
                                     ref(vin), ref(vout), ptr(scratch.ctypes.data))
    return (h, w, cin), (ho, wo, cout), (stride, stride, pad, pad, k, k), 2, run


def _pool_case(rng, h, w, c, k, stride, pad, bits, kind):
    ho = (h + 2 * pad - k) // stride + 1
    wo = (w + 2 * pad - k) // stride + 1
    lo, hi = arith.qrange(bits)
    p = ck.PoolParams(k, k, stride, stride, pad, pad, lo, hi)

    def run(kern, vin, vout, pad_top=None):
        return getattr(kern, kind)(_with_pad_top(p, pad_top), vin, vout)
    return (h, w, c), (ho, wo, c), (stride, stride, pad, pad, k, k), 1, run


CASES = {
    # name: (builder, args, in_bits, out_bits)
    "pointwise s8 pairs": (_conv_case, (5, 5, 16, 16, 1, 1, 0, 1, 8, 8, 8)),
    "pointwise expanding s8": (_conv_case, (4, 5, 8, 24, 1, 1, 0, 1, 8, 8, 8)),
    "pointwise 4→8": (_conv_case, (4, 5, 8, 12, 1, 1, 0, 1, 4, 8, 8)),
    "pointwise 8→4 odd": (_conv_case, (4, 5, 8, 5, 1, 1, 0, 1, 8, 4, 8)),
    "pointwise 2→4 w4": (_conv_case, (5, 3, 8, 8, 1, 1, 0, 1, 2, 4, 4)),
    "3x3 s2 s8 im2col": (_conv_case, (7, 6, 8, 16, 3, 2, 1, 1, 8, 8, 8)),
    "3x3 s1 4→4 w4": (_conv_case, (5, 5, 8, 8, 3, 1, 1, 1, 4, 4, 4)),
    "3x3 codebook": (_conv_case, (5, 4, 4, 6, 3, 1, 1, 1, 8, 8, 8, ck.WFMT_CODEBOOK)),
    "grouped 3x3": (_conv_case, (5, 5, 8, 8, 3, 1, 1, 2, 8, 8, 8)),
    "depthwise 3x3 s2 4-bit": (_conv_case, (7, 7, 8, 8, 3, 2, 1, 8, 4, 4, 8)),
    "packed 3x3 4→4 w4": (_packed_case, (5, 5, 8, 8, 3, 1, 1, 1, 4, 4, 4)),
    "packed pointwise 2→8 w2": (_packed_case, (4, 5, 8, 12, 1, 1, 0, 1, 2, 8, 2)),
    "packed 3x3 s2 4→2 w4": (_packed_case, (7, 6, 8, 6, 3, 2, 1, 1, 4, 2, 4)),
    "maxpool 2x2 s2": (_pool_case, (6, 6, 8, 2, 2, 0, 8, "maxpool")),
    "maxpool 3x3 s2 p1 4-bit": (_pool_case, (7, 5, 6, 3, 2, 1, 4, "maxpool")),
    "avgpool 2x2 s2 dsp": (_pool_case, (6, 6, 8, 2, 2, 0, 8, "avgpool")),
    "avgpool 3x3 s1 p1 2-bit": (_pool_case, (5, 5, 4, 3, 1, 1, 2, "avgpool")),
}


def _bits(name: str, args) -> tuple[int, int]:
    if CASES[name][0] in (_conv_case, _packed_case):
        return args[8], args[9]
    return args[6], args[6]


def _run_overlapped(kern, run, in_hwc, out_hwc, x, in_bits, out_bits, d) -> np.ndarray:
    """The kernel with its output at byte 0 and its input at byte d of one buffer: the
    output values it leaves."""
    n_in, n_out = int(np.prod(in_hwc)), int(np.prod(out_hwc))
    in_bytes = -(-n_in * in_bits // 8)
    mem = np.full(d + max(in_bytes, -(-n_out * out_bits // 8)) + 16, 0xA5, np.uint8)
    mem[d:d + in_bytes] = arith.pack(x, in_bits)
    base = mem.ctypes.data
    vin = ck.View(ctypes.c_void_p(base + d).value, in_bits, *in_hwc, 0, 0, in_hwc[1])
    vout = ck.View(base, out_bits, *out_hwc, 0, 0, out_hwc[1])
    assert run(kern, vin, vout) == 0
    return arith.unpack(mem, out_bits, n_out).astype(np.int64)


@pytest.mark.parametrize("variant", ["portable", "dsp"])
@pytest.mark.parametrize("name", list(CASES))
def test_kernels_write_in_the_order_the_shift_assumes(name, variant) -> None:
    """Each overlapped layer kind, sub-byte maps included: the output written `overlap_shift`
    bytes below its input (unaligned: the exact bound, not the planner's rounded one) is, value
    for value, the output of the same call into a separate buffer — on the plain C and the
    DSP (emulated SXTB16/SMLAD) paths."""
    builder, args = CASES[name]
    rng = np.random.default_rng(len(name))
    in_hwc, out_hwc, window, group, run = builder(rng, *args)
    in_bits, out_bits = _bits(name, args)
    kern = ck.build(variant)
    lo, hi = arith.qrange(in_bits)
    x = rng.integers(lo, hi + 1, int(np.prod(in_hwc)))
    d = overlap_shift(in_hwc, out_hwc, window, in_bits, out_bits, group)
    assert d < -(-int(np.prod(out_hwc)) * out_bits // 8), "the case must really overlap"
    far = _run_overlapped(kern, run, in_hwc, out_hwc, x, in_bits, out_bits,
                          d + -(-int(np.prod(out_hwc)) * out_bits // 8) + 64)
    near = _run_overlapped(kern, run, in_hwc, out_hwc, x, in_bits, out_bits, d)
    np.testing.assert_array_equal(near, far)


def test_one_pixel_less_breaks_the_int8_pair_path() -> None:
    """The int8 convolution writes a pixel pair's channels while it still reads the pair's
    second input pixel: a shift of one pixel (what a pixel-at-a-time order would allow)
    corrupts the output — so the test above can fail, and the pair is in the formula."""
    rng = np.random.default_rng(1)
    in_hwc, out_hwc, window, _, run = _conv_case(rng, 5, 5, 16, 16, 1, 1, 0, 1, 8, 8, 8)
    kern = ck.build("portable")
    x = rng.integers(-128, 128, int(np.prod(in_hwc)))
    one_pixel = overlap_shift(in_hwc, out_hwc, window, 8, 8, 1)
    assert one_pixel == 16 and overlap_shift(in_hwc, out_hwc, window, 8, 8, 2) == 32
    far = _run_overlapped(kern, run, in_hwc, out_hwc, x, 8, 8, 1024)
    near = _run_overlapped(kern, run, in_hwc, out_hwc, x, 8, 8, one_pixel)
    assert (near != far).any()


# -- reverse rows: the output above its input ---------------------------------------------------

def _brute_reverse_shift(in_hwc, out_hwc, window, dil, in_bits, out_bits, group) -> int:
    """The least S from which on every shift is safe, by simulation: output rows from the last
    to the first, each row's pixels forward, `group` per unit; with the output S bytes above
    the input, a unit may not write a byte holding any input element that unit or a later one
    still reads (every tap enumerated, dilation included)."""
    h, w, c = in_hwc
    ho, wo, co = out_hwc
    sh, sw, pt, pl, kh, kw = window
    reads = {(oy, ox): {((iy * w + ix) * c + ch) * in_bits // 8
                        for ky in range(kh) for kx in range(kw)
                        for iy in [oy * sh - pt + ky * dil[0]]
                        for ix in [ox * sw - pl + kx * dil[1]]
                        if 0 <= iy < h and 0 <= ix < w for ch in range(c)}
             for oy in range(ho) for ox in range(wo)}
    units = [[(oy, ox) for ox in range(start, min(start + group, wo))]
             for oy in range(ho - 1, -1, -1) for start in range(0, wo, group)]
    steps = []
    for k, unit in enumerate(units):
        (y, x0), x1 = unit[0], unit[-1][1] + 1
        written = range((y * wo + x0) * co * out_bits // 8, -(-(y * wo + x1) * co * out_bits // 8))
        steps.append((written, set().union(*(reads[q] for u in units[k:] for q in u))))

    def safe(s: int) -> bool:
        return not any(b + s in needed for written, needed in steps for b in written)

    for s in range(-(-h * w * c * in_bits // 8), -1, -1):  # from the input's end down
        if not safe(s):
            return s + 1
    return 0


@pytest.mark.parametrize("in_hwc,out_hwc,window,dil,bits,group", [
    ((4, 3, 8), (4, 3, 8), (1, 1, 0, 0, 1, 1), (1, 1), (8, 8), 2),    # pointwise 8 → 8: one row
    ((3, 5, 6), (3, 5, 12), (1, 1, 0, 0, 1, 1), (1, 1), (8, 8), 2),   # expanding
    ((3, 5, 6), (3, 5, 5), (1, 1, 0, 0, 1, 1), (1, 1), (4, 2), 1),    # odd sub-byte run
    ((7, 6, 3), (4, 3, 4), (2, 2, 1, 1, 3, 3), (1, 1), (8, 8), 2),    # 3×3 stride 2, padded
    ((6, 6, 3), (3, 3, 8), (2, 2, 0, 0, 3, 3), (1, 1), (8, 8), 2),    # "same" s2, pad bottom
    ((6, 7, 2), (6, 7, 4), (1, 1, 2, 2, 3, 3), (2, 2), (4, 4), 2),    # dilated, "same" pads
    ((7, 5, 2), (4, 3, 2), (2, 2, 1, 1, 3, 3), (2, 2), (2, 8), 1),    # dilated, last tap cut
    ((6, 4, 4), (3, 2, 4), (2, 2, 0, 0, 2, 2), (1, 1), (4, 2), 1),    # pooling
])
def test_reverse_shift_is_the_least_safe_shift(in_hwc, out_hwc, window, dil, bits, group):
    """`reverse_overlap_shift` equals the least S the simulation of the reversed row order
    accepts, whatever the grouping of pixels within a row."""
    got = reverse_overlap_shift(in_hwc, out_hwc, window, dil, bits[0], bits[1])
    assert got == _brute_reverse_shift(in_hwc, out_hwc, window, dil, bits[0], bits[1], group)


def _run_reversed(kern, run, in_hwc, out_hwc, window, x, in_bits, out_bits, s) -> np.ndarray:
    """The kernel called once per output row, last row first (as the generated code does for
    a layer above its input: the row's input window as the view, its own top padding), with
    the input at byte 0 and the output at byte s of one buffer: the output values it leaves."""
    (h, w, c), (ho, wo, co) = in_hwc, out_hwc
    sh, _, pt, _, kh, _ = window
    n_in, n_out = h * w * c, ho * wo * co
    in_bytes = -(-n_in * in_bits // 8)
    mem = np.full(max(in_bytes, s + -(-n_out * out_bits // 8)) + 16, 0xA5, np.uint8)
    mem[:in_bytes] = arith.pack(x, in_bits)
    base = mem.ctypes.data
    for oy in range(ho - 1, -1, -1):
        y0 = oy * sh - pt
        top = max(y0, 0)
        vin = ck.View(base, in_bits, min(y0 + kh, h) - top, w, c, top, 0, w)
        vout = ck.View(base + s, out_bits, 1, wo, co, oy, 0, wo)
        assert run(kern, vin, vout, max(-y0, 0)) == 0
    return arith.unpack(mem[s:], out_bits, n_out).astype(np.int64)


@pytest.mark.parametrize("variant", ["portable", "dsp"])
@pytest.mark.parametrize("name", list(CASES))
def test_kernels_run_rows_in_reverse_at_the_shift(name, variant) -> None:
    """Each overlapped layer kind, sub-byte maps included, its rows run last to first with the
    output `reverse_overlap_shift` bytes above its input (unaligned: the exact bound) gives,
    value for value, the output of one whole call into a separate buffer."""
    builder, args = CASES[name]
    rng = np.random.default_rng(len(name))
    in_hwc, out_hwc, window, _, run = builder(rng, *args)
    in_bits, out_bits = _bits(name, args)
    kern = ck.build(variant)
    lo, hi = arith.qrange(in_bits)
    x = rng.integers(lo, hi + 1, int(np.prod(in_hwc)))
    s = reverse_overlap_shift(in_hwc, out_hwc, window, (1, 1), in_bits, out_bits)
    assert s < -(-int(np.prod(in_hwc)) * in_bits // 8), "the case must really overlap"
    far = _run_overlapped(kern, run, in_hwc, out_hwc, x, in_bits, out_bits,
                          -(-int(np.prod(out_hwc)) * out_bits // 8) + 64)
    near = _run_reversed(kern, run, in_hwc, out_hwc, window, x, in_bits, out_bits, s)
    np.testing.assert_array_equal(near, far)


def test_one_byte_less_breaks_the_reverse_order() -> None:
    """A pointwise 8 → 8 layer rows reversed may start one input row above its input, not a
    byte less: each row's first pixel then overwrites the last channel its last pixel still
    reads — so the test above can fail."""
    rng = np.random.default_rng(1)
    in_hwc, out_hwc, window, _, run = _conv_case(rng, 5, 5, 16, 16, 1, 1, 0, 1, 8, 8, 8)
    kern = ck.build("portable")
    x = rng.integers(-128, 128, int(np.prod(in_hwc)))
    s = reverse_overlap_shift(in_hwc, out_hwc, window, (1, 1), 8, 8)
    assert s == 5 * 16  # one input row
    far = _run_overlapped(kern, run, in_hwc, out_hwc, x, 8, 8, 1024)
    np.testing.assert_array_equal(
        _run_reversed(kern, run, in_hwc, out_hwc, window, x, 8, 8, s), far)
    assert (_run_reversed(kern, run, in_hwc, out_hwc, window, x, 8, 8, s - 1) != far).any()


# -- the planner -------------------------------------------------------------------------------

@pytest.mark.parametrize("model,at_most", [("kws_ref_model_fp32.onnx", 0.55),
                                           ("vww_96_float.onnx", 0.7),
                                           ("pretrainedResnet.onnx", 1.0)])
def test_planner_overlaps_where_it_pays(model, at_most) -> None:
    """Layer-based, int8, input in the arena: overlap never makes the arena larger (KWS: the
    pointwise layers share their buffers, the arena about halves; VWW: its expanding pointwise
    written above its input, rows reversed, stops the chain drifting downward), each
    overlapped output starts exactly its aligned shift below its input (D > 0) or above it
    (D < 0, `node_reverse_shift`), and no two buffers alive together share a byte."""
    graph = import_onnx(shared_model(model))
    plain = plan_patches(graph, None, "arena").memory()
    sched = plan_patches(graph, None, "arena", overlap=True)
    mem = sched.memory()
    assert mem.arena_bytes <= at_most * plain.arena_bytes
    offsets = mem.plan.tensor_offsets()
    by_name = {n.name: n for n in graph.nodes}
    for name, d in mem.overlap.items():
        node = by_name[name]
        assert d % ALIGN == 0
        assert d == node_overlap_shift(node, graph, 8, 8) if d > 0 else \
            -d == node_reverse_shift(node, graph, 8, 8)
        assert offsets[node.outputs[0]] == offsets[node.inputs[0]] - d
    bufs = mem.plan.buffers
    for i, a in enumerate(bufs):
        for b in bufs[i + 1:]:
            assert not buffers_conflict(a, mem.plan.offsets[a.name], b, mem.plan.offsets[b.name])
    if model.startswith("kws"):
        assert len(mem.overlap) == 4 and set(mem.overlap.values()) == {128}
    if model.startswith("vww"):  # the expanding pointwise 8 → 16 above its input, one row up
        assert -384 in mem.overlap.values()


# -- searched plans, export and verify ---------------------------------------------------------

def _overlap_model(seed: int = 0) -> onnx.ModelProto:
    """conv 3×3 → relu → pointwise 8→16 → relu → maxpool 2×2 → conv 3×3 s2 → relu →
    pointwise 16→24 → avgpool → flatten → matmul: the pointwise and the maxpool sit at the
    peak, so they are the layers the planner overlaps."""
    b = _Builder(seed)

    def conv(x, name, cout, cin, k, stride, pads):
        w = b.init(f"{name}_w", b.he((cout, cin, k, k)))
        return b.conv(x, w, b.init(f"{name}_b", b.small(cout)), name, k, stride, pads)
    x = b.node("Relu", [conv("x", "c1", 8, 3, 3, 1, (1, 1, 1, 1))], "r1")
    x = b.node("Relu", [conv(x, "pw1", 16, 8, 1, 1, (0, 0, 0, 0))], "r2")
    x = b.node("MaxPool", [x], "mp", kernel_shape=[2, 2], strides=[2, 2])
    x = b.node("Relu", [conv(x, "c3", 16, 16, 3, 2, (1, 1, 1, 1))], "r3")
    x = conv(x, "pw2", 24, 16, 1, 1, (0, 0, 0, 0))
    x = b.node("AveragePool", [x], "ap", kernel_shape=[2, 2], strides=[2, 2])
    x = b.node("Flatten", [x], "fl")
    w = b.init("wf", b.he((10, 96), gain=1.0).T.copy())
    b.node("MatMul", [x, w], "fc", outputs=["y"])
    return b.model("overlap", [_input("x", [1, 3, 16, 16])], ["y"])


@pytest.fixture(scope="module")
def plans(tmp_path_factory) -> dict[str, Path]:
    """int8 plans with and without overlap (input in the arena) and a tight one (4-bit maps on
    the overlapped layers; the caller's I/O buffers so the maps may go sub-byte)."""
    root = tmp_path_factory.mktemp("overlap")
    onnx.save(_overlap_model(), root / "ov.onnx")
    rng = np.random.default_rng(0)
    np.savez(root / "calib.npz", x=rng.standard_normal((32, 3, 16, 16)).astype(np.float32))
    np.savez(root / "test.npz", x=rng.standard_normal((6, 3, 16, 16)).astype(np.float32))
    out = {}
    for name, opts in (("int8", ["--strategy", "int8"]),
                       ("plain", ["--strategy", "int8", "--no-overlap"]),
                       ("tight", ["--strategy", "exact", "--sram", "5600", "--io", "external"])):
        out[name] = root / f"{name}.plan.json"
        r = run_mpq("search", "ov.onnx", "--board", "nano33ble", "--patches", "none",
                    "--data", "calib.npz", *opts, "-o", out[name], "-q", cwd=root)
        assert r.returncode == 0, r.stderr
    return out


def _verify(plan: Path, target: str, samples: int = 6) -> dict:
    r = run_mpq("verify", plan, "--data", plan.parent / "test.npz", "--target", target,
                "--samples", str(samples), "--json")
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def test_search_records_the_overlap_and_the_smaller_arena(plans) -> None:
    """The default search overlaps the pointwise conv (8 → 16 channels over 16×16 pixels at
    int8: its output starts 256·8 + 16 B below its input) and the maxpool (16 B), the arena
    shrinks against `--no-overlap`, whose plan has no record; the tight plan overlaps 4-bit
    maps."""
    p = {k: json.loads(v.read_text()) for k, v in plans.items()}
    assert p["int8"]["schedule"]["overlap"] == {"mp": 16, "pw1": 256 * 8 + 16}
    assert "overlap" not in p["plain"]["schedule"]
    assert p["int8"]["predicted"]["arena_bytes"] < p["plain"]["predicted"]["arena_bytes"]
    assert set(p["tight"]["schedule"]["overlap"]) == {"mp", "pw1"}
    bits = {t["name"]: t["bits"] for t in p["tight"]["tensors"]}
    assert bits["r2_output_0"] == bits["mp_output_0"] == 4  # pw1's output, mp's in and out


@pytest.mark.parametrize("name", ["int8", "tight"])
def test_overlapped_plans_are_byte_exact_on_the_host(plans, name) -> None:
    result = _verify(plans[name], "host")
    assert result["mismatches"] == 0 and result["samples"] == 6


@needs_arm
def test_overlapped_sub_byte_plan_is_byte_exact_on_qemu_m4(plans) -> None:
    result = _verify(plans["tight"], "qemu-m4", 2)
    assert result["mismatches"] == 0 and result["samples"] == 2


def _tampered(plans, tmp_path: Path, edit, cli: bool = False) -> str:
    """The error the edited int8 plan gets: from `mpq export` (`cli`: one line, exit 1,
    nothing written) or from loading it with its model (what every command does first)."""
    data = json.loads(plans["int8"].read_text())
    edit(data)
    path = plans["int8"].parent / f"tampered-{tmp_path.name}.plan.json"
    path.write_text(json.dumps(data))
    if not cli:
        with pytest.raises(MpqError) as exc:
            load_plan_with_model(path)
        return str(exc.value)
    r = run_mpq("export", path, "-o", tmp_path / "out")
    assert r.returncode == 1 and not (tmp_path / "out").exists()
    assert r.stderr.startswith("error: ") and len(r.stderr.splitlines()) == 1
    return r.stderr


def test_plan_check_refuses_an_unsafe_overlap(plans, tmp_path: Path) -> None:
    """An output moved closer to its input than the safe shift — recorded shift and offset
    edited together, or the offset alone — or an overlap the planner does not make, is one
    clear error, nothing written."""
    def closer(data, also_record: bool) -> None:
        t = next(t for t in data["tensors"] if t["name"] == "r2_output_0")
        t["offset"] += 16
        if also_record:
            data["schedule"]["overlap"]["pw1"] -= 16

    assert "schedule.overlap" in _tampered(plans, tmp_path, lambda d: closer(d, True), cli=True)
    assert "tensors[" in _tampered(plans, tmp_path, lambda d: closer(d, False))
    err = _tampered(plans, tmp_path, lambda d: d["schedule"]["overlap"].update({"c3": 16}))
    assert "schedule.overlap" in err


def test_cmsis_nn_export_keeps_overlapped_layers_portable(plans) -> None:
    """CMSIS-NN's kernels do not promise the raster write order the shift assumes: with
    `--backend cmsis-nn` the overlapped layers call the portable kernels, and the report says
    why; the other int8 layers still call CMSIS-NN."""
    from mpq.codegen.export import render_export

    plan, _, graph = load_plan_with_model(plans["int8"])
    report = json.loads(render_export(plan, graph, "cmsis-nn")["mpq_report.json"])
    by_name = {layer["name"]: layer for layer in report["layers"]}
    for name in ("pw1", "mp"):
        assert by_name[name]["backend"] == "portable"
        assert "overlaps its input" in by_name[name]["reason"]
    assert by_name["c3"]["backend"] == "cmsis-nn"


# -- a searched VWW plan with a layer above its input (rows reversed) ----------------------------

@pytest.fixture(scope="module")
def vww_plan(tmp_path_factory) -> Path:
    """The default int8 layer-based VWW plan (input in the arena): its expanding pointwise
    8 → 16 writes above its input, rows last to first."""
    root = tmp_path_factory.mktemp("overlap_vww")
    rng = np.random.default_rng(0)
    np.savez(root / "calib.npz", x=rng.uniform(0, 1, (8, 96, 96, 3)).astype(np.float32))
    np.savez(root / "test.npz", x=rng.uniform(0, 1, (2, 96, 96, 3)).astype(np.float32))
    plan = root / "vww.plan.json"
    r = run_mpq("search", shared_model("vww_96_float.onnx"), "--board", "nano33ble",
                "--patches", "none", "--strategy", "int8", "--data", "calib.npz", "-o", plan,
                "-q", cwd=root)
    assert r.returncode == 0, r.stderr
    return plan


def _reversed_node(data: dict) -> tuple[str, int]:
    return next((n, d) for n, d in data["schedule"]["overlap"].items() if d < 0)


def test_vww_plan_reverses_rows_and_is_byte_exact_on_the_host(vww_plan) -> None:
    """The VWW plan records a layer above its input (D = −384: one 48×8 input row) and a
    peak of at most 39,664 B, the kernels' scratch planned inside the arena (the tensors alone
    37,248 B: 55,296 without overlap, 46,128 with outputs only below their inputs), the export
    runs that layer's rows last to first (with `--backend cmsis-nn` too: the portable kernel,
    as for the other form), and the firmware's output is the integer reference's."""
    from mpq.codegen.export import render_export

    data = json.loads(vww_plan.read_text())
    name, d = _reversed_node(data)
    assert d == -384 and data["predicted"]["peak_sram_bytes"] <= 39_664
    plan, _, graph = load_plan_with_model(vww_plan)
    model_c = render_export(plan, graph, "portable")["mpq_model.c"]
    assert model_c.count("Rows last to first") == 1
    cmsis = render_export(plan, graph, "cmsis-nn")  # that layer keeps the portable kernel
    layer = next(x for x in json.loads(cmsis["mpq_report.json"])["layers"] if x["name"] == name)
    assert layer["backend"] == "portable" and "overlaps its input" in layer["reason"]
    assert cmsis["mpq_model.c"].count("Rows last to first") == 1
    result = _verify(vww_plan, "host", 2)
    assert result["mismatches"] == 0 and result["samples"] == 2


@needs_arm
def test_vww_reversed_plan_is_byte_exact_on_qemu_m4(vww_plan) -> None:
    result = _verify(vww_plan, "qemu-m4", 1)
    assert result["mismatches"] == 0 and result["samples"] == 1


def test_plan_check_refuses_a_tampered_reverse_overlap(vww_plan, tmp_path: Path) -> None:
    """A layer above its input moved one aligned step closer to its input's start (record and
    offset together), recorded as the below form, or its offset alone moved: one clear
    error, nothing written."""
    data = json.loads(vww_plan.read_text())
    name, d = _reversed_node(data)
    _, _, graph = load_plan_with_model(vww_plan)
    tensor = next(n.outputs[0] for n in graph.nodes if n.name == name)

    def edit(delta_offset: int, new_d: int | None):
        def apply(data: dict) -> None:
            t = next(t for t in data["tensors"] if t["name"] == tensor)
            t["offset"] += delta_offset
            if new_d is not None:
                data["schedule"]["overlap"][name] = new_d
        return apply

    def refused(apply, cli: bool = False) -> str:
        edited = json.loads(vww_plan.read_text())
        apply(edited)
        path = tmp_path / f"tampered{len(list(tmp_path.iterdir()))}.plan.json"
        path.write_text(json.dumps(edited))
        if not cli:
            with pytest.raises(MpqError) as exc:
                load_plan_with_model(path)
            return str(exc.value)
        r = run_mpq("export", path, "-o", tmp_path / "out")
        assert r.returncode == 1 and not (tmp_path / "out").exists()
        assert r.stderr.startswith("error: ") and len(r.stderr.splitlines()) == 1
        return r.stderr

    assert "schedule.overlap" in refused(edit(-16, d + 16), cli=True)
    assert "schedule.overlap" in refused(edit(0, -d))
    assert "tensors[" in refused(edit(-16, None))
