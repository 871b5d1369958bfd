"""ctypes access to mpq's C kernel library, `kernels/` (for the tests).

The library is plain C shipped in the package; `build(variant)` compiles every file of it, as
is, with host gcc into a shared library (once per variant and test session) and returns a
`Kernels` object with one method per kernel - nothing is rendered. Variant "portable" is the
plain C build; "dsp" defines MPQ_EMULATE_DSP, which runs the Cortex-M DSP (SXTB16/SMLAD) loops
on the host with C versions of the intrinsics, and "host" defines MPQ_HOST_FAST, the host-only
fast paths of `--engine c` (mpq.engine.C_FLAGS), so every code path is checked byte for byte.

Tensors live in `Stored` byte buffers packed with `mpq.quant.arith.pack` (DESIGN §4.2) and are
handed to the kernels as `mpq_view`s of any sub-region. Weights are `Weights`: b-bit codes in one
of the `mpq_filter` formats (LINEAR, CODEBOOK, POW2), packed by `pack_codes` as a little-endian
bit stream (3-bit codes straddle bytes).
"""

from __future__ import annotations

import atexit
import ctypes
import os
import shutil
import subprocess
import tempfile
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import reference_kernels as ref

from mpq.quant import arith
from mpq.resources import data_dir

I32 = ctypes.c_int32
P_I32 = ctypes.POINTER(I32)
CANARY = 8  # bytes after every buffer that no kernel may touch
CFLAGS = ("-std=c99", "-O2", "-Wall", "-Wextra", "-Werror")
VARIANTS = {"portable": (), "dsp": ("-DMPQ_EMULATE_DSP",),
            # the host-only fast paths `mpq eval --engine c` compiles (mpq.engine.C_FLAGS)
            "host": ("-DMPQ_HOST_FAST",)}


def _struct(name: str, *fields: str, first: tuple[str, type] | None = None) -> type:
    """A ctypes.Structure of int32 fields (after an optional leading pointer field)."""
    layout = ([first] if first else []) + [(f, I32) for f in fields]
    return type(name, (ctypes.Structure,), {"_fields_": layout})


View = _struct("View", "bits", "h", "w", "c", "y0", "x0", "stored_w",
               first=("data", ctypes.c_void_p))
WFMT_LINEAR, WFMT_CODEBOOK, WFMT_POW2 = 0, 1, 2


class Filter(ctypes.Structure):
    _fields_ = [("data", ctypes.c_void_p), ("bits", I32), ("n", I32), ("h", I32), ("w", I32),
                ("c", I32), ("format", I32), ("codebook", ctypes.c_void_p)]


ConvParams = _struct("ConvParams", "stride_h", "stride_w", "dilation_h", "dilation_w",
                     "pad_top", "pad_left", "groups", "input_zp", "output_zp", "act_min",
                     "act_max")
FcParams = _struct("FcParams", "input_zp", "output_zp", "act_min", "act_max")
AddParams = _struct("AddParams", "a_zp", "a_multiplier", "a_shift", "b_zp", "b_multiplier",
                    "b_shift", "left_shift", "output_zp", "output_multiplier", "output_shift",
                    "act_min", "act_max")
PoolParams = _struct("PoolParams", "kernel_h", "kernel_w", "stride_h", "stride_w", "pad_top",
                     "pad_left", "act_min", "act_max")
SoftmaxParams = _struct("SoftmaxParams", "multiplier", "left_shift", "diff_min")
MeanParams = _struct("MeanParams", "reduce_h", "reduce_w", "reduce_c", "count", "input_zp",
                     "output_zp", "multiplier", "shift", "act_min", "act_max")


class ResizeParams(ctypes.Structure):
    _fields_ = [("rows", P_I32), ("cols", P_I32)]


class BilinearParams(ctypes.Structure):
    _fields_ = [(n, P_I32) for n in ("y0", "y1", "fy", "x0", "x1", "fx")]
MulParams = _struct("MulParams", "a_zp", "b_zp", "output_zp", "output_multiplier",
                    "output_shift", "act_min", "act_max")


class PreluParams(ctypes.Structure):
    _fields_ = [("input_zp", I32), ("pos_multiplier", I32), ("pos_shift", I32),
                ("neg_multiplier", I32), ("neg_shift", I32), ("alpha", ctypes.c_void_p),
                ("alpha_zp", I32), ("output_zp", I32), ("act_min", I32), ("act_max", I32)]


class Block(ctypes.Structure):
    """mpq_block (kernels/mpq_kernels.h): four axes, outermost first."""

    _fields_ = [("count", I32 * 4), ("src_stride", I32 * 4), ("dst_stride", I32 * 4),
                ("src_offset", I32), ("dst_offset", I32), ("src_size", I32), ("dst_size", I32)]


class ActivationParams(ctypes.Structure):
    _fields_ = [("table", ctypes.c_void_p)]


class ChannelQuant(ctypes.Structure):
    _fields_ = [("bias", P_I32), ("multiplier", P_I32), ("shift", P_I32)]


#: The kernel library, compiled straight from where mpq ships it.
LIBRARY = data_dir("kernels")
#: Extra flags of a build from the environment (e.g. the sanitizer run of test_c_kernels).
EXTRA_CFLAGS = tuple(os.environ.get("MPQ_CKERNELS_CFLAGS", "").split())


def library_sources() -> list[Path]:
    """Every C source of the library."""
    return sorted(LIBRARY.glob("*.c"))


@cache
def workdir() -> Path:
    """A temporary directory for this session's builds, removed at exit."""
    path = Path(tempfile.mkdtemp(prefix="mpq-ckernels-"))
    atexit.register(shutil.rmtree, path, ignore_errors=True)
    return path


def compile_c(args: list[str]) -> subprocess.CompletedProcess:
    """Run a compiler command; the failure message carries the compiler's output."""
    done = subprocess.run(args, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, f"{' '.join(args)}\n{done.stdout}{done.stderr}"
    return done


class Stored:
    """A stored tensor: `n` packed elements at `bits` in a byte buffer followed by canaries."""

    def __init__(self, values: np.ndarray, bits: int) -> None:
        self.bits = bits
        self.elements = np.asarray(values, np.int64).reshape(-1).copy()
        packed = arith.pack(self.elements, bits)
        self.buf = np.concatenate([packed, np.full(CANARY, 0xA5, np.uint8)])

    @classmethod
    def random(cls, rng: np.random.Generator, n: int, bits: int) -> Stored:
        lo, hi = arith.qrange(bits)
        return cls(rng.integers(lo, hi + 1, n), bits)

    def view(self, h: int, w: int, c: int, y0: int = 0, x0: int = 0,
             stored_w: int | None = None, start: int = 0) -> View:
        """A view of element (y, x, ch) at start + ((y0 + y)·stored_w + x0 + x)·c + ch; its
        `data` points `start` elements (whole bytes) into the buffer."""
        stored_w = w if stored_w is None else stored_w
        assert start * self.bits % 8 == 0
        assert start + ((y0 + h - 1) * stored_w + x0 + w) * c <= self.elements.size
        v = View(self.buf.ctypes.data + int(start) * self.bits // 8, self.bits, h, w, c, y0, x0,
                 stored_w)
        v.start = start
        return v

    @staticmethod
    def indices(v: View) -> np.ndarray:
        """Stored element index of every view element, shape (h, w, c)."""
        y = np.arange(v.h)[:, None, None]
        x = np.arange(v.w)[None, :, None]
        ch = np.arange(v.c)[None, None, :]
        return getattr(v, "start", 0) + ((v.y0 + y) * v.stored_w + v.x0 + x) * v.c + ch

    def read(self, v: View) -> np.ndarray:
        """The view's current values, (h, w, c) int64."""
        flat = arith.unpack(self.buf, self.bits, self.elements.size).astype(np.int64)
        return flat[self.indices(v)]

    def expected_bytes(self, v: View, values: np.ndarray) -> np.ndarray:
        """The whole buffer as it must be after writing `values` through `v` and nothing else."""
        flat = self.elements.copy()
        flat[self.indices(v)] = np.asarray(values, np.int64).reshape(v.h, v.w, v.c)
        return np.concatenate([arith.pack(flat, self.bits), np.full(CANARY, 0xA5, np.uint8)])

    def restore(self) -> None:
        """Back to the initial contents (to run another library on the same case)."""
        self.buf[:] = np.concatenate([arith.pack(self.elements, self.bits),
                                      np.full(CANARY, 0xA5, np.uint8)])


def pack_codes(codes: np.ndarray, bits: int) -> np.ndarray:
    """Unsigned b-bit codes as a little-endian bit stream: code k in stream bits k·b … k·b+b−1,
    byte i holding stream bits 8i … 8i+7 (the last byte zero-filled)."""
    flat = np.asarray(codes, np.int64).reshape(-1)
    assert flat.size == 0 or (flat.min() >= 0 and flat.max() < (1 << bits))
    stream = ((flat[:, None] >> np.arange(bits)) & 1).reshape(-1).astype(np.uint8)
    return np.packbits(stream, bitorder="little")


class Weights:
    """A filter's weights as codes of one format: `codes` (int64, the filter's shape) decode
    through `reference_kernels.decode_weight` to `values`, the int8 weights the integer
    reference computes with."""

    def __init__(self, codes: np.ndarray, bits: int, fmt: int = WFMT_LINEAR,
                 codebook: np.ndarray | None = None) -> None:
        self.codes = np.asarray(codes, np.int64)
        self.bits, self.fmt = bits, fmt
        self.codebook = None if codebook is None else np.asarray(codebook, np.int8)
        self.values = np.asarray(
            [ref.decode_weight(int(u), bits, fmt, self.codebook) for u in self.codes.reshape(-1)],
            np.int64).reshape(self.codes.shape).astype(np.int8)

    @classmethod
    def linear(cls, values: np.ndarray, bits: int) -> Weights:
        return cls(np.asarray(values, np.int64) & ((1 << bits) - 1), bits)

    @classmethod
    def random(cls, rng: np.random.Generator, shape: tuple[int, ...], bits: int,
               fmt: int) -> Weights:
        """Random codes of a format: linear values in ±(2^(b−1)−1), any code otherwise, with
        a random int8 codebook of 2^b entries for CODEBOOK."""
        codebook = None
        if fmt == WFMT_LINEAR:
            wmax = (1 << (bits - 1)) - 1
            return cls.linear(rng.integers(-wmax, wmax + 1, shape), bits)
        if fmt == WFMT_CODEBOOK:
            codebook = rng.integers(-128, 128, 1 << bits)
        return cls(rng.integers(0, 1 << bits, shape), bits, fmt, codebook)


AnyWeights = np.ndarray | Weights  # plain values are linear weights at the given bits


def _i32(values: np.ndarray) -> np.ndarray:
    arr = np.ascontiguousarray(np.asarray(values, np.int64))
    assert arr.size == 0 or (arr.min() >= arith.INT32_MIN and arr.max() <= arith.INT32_MAX)
    return arr.astype(np.int32)


class Kernels:
    """The compiled library with one Python method per kernel.

    Methods take the kernel's structs (built by the caller from the classes above) plus numpy
    weights and per-channel parameters; they keep every array alive during the call, size and
    allocate the scratch with the library's own `*_scratch_size` (checking that no byte past it
    is written) and return the kernel's status code.
    """

    def __init__(self, lib: ctypes.CDLL) -> None:
        self.lib = lib
        ptr = ctypes.POINTER
        sigs = {
            "mpq_conv2d_scratch_size": [ptr(ConvParams), ptr(Filter), ptr(View), ptr(View)],
            "mpq_conv2d": [ptr(ConvParams), ptr(Filter), ptr(ChannelQuant), ptr(View),
                           ptr(View), ctypes.c_void_p],
            "mpq_conv2d_add": [ptr(ConvParams), ptr(Filter), ptr(ChannelQuant), ptr(View),
                               ptr(AddParams), ptr(View), ptr(View), ctypes.c_void_p],
            "mpq_depthwise_inplace_scratch_size": [ptr(ConvParams), ptr(Filter), ptr(View),
                                                   ptr(View)],
            "mpq_depthwise_inplace": [ptr(ConvParams), ptr(Filter), ptr(ChannelQuant),
                                      ptr(View), ptr(View), ctypes.c_void_p],
            "mpq_depthwise_inplace_grouped": [ptr(ConvParams), ptr(Filter), ptr(ChannelQuant),
                                              ptr(View), ptr(View), ctypes.c_void_p],
            "mpq_fully_connected": [ptr(FcParams), ptr(Filter), ptr(ChannelQuant), ptr(View),
                                    ptr(View)],
            "mpq_add": [ptr(AddParams), ptr(View), ptr(View), ptr(View)],
            "mpq_avgpool": [ptr(PoolParams), ptr(View), ptr(View)],
            "mpq_maxpool": [ptr(PoolParams), ptr(View), ptr(View)],
            "mpq_avgpool_grouped": [ptr(PoolParams), ptr(View), ptr(View)],
            "mpq_maxpool_grouped": [ptr(PoolParams), ptr(View), ptr(View)],
            "mpq_avgpool_accumulate": [ptr(View), ctypes.c_void_p],
            "mpq_avgpool_finish": [ctypes.c_void_p, I32, I32, I32, ptr(View)],
            "mpq_softmax": [ptr(SoftmaxParams), ptr(View), ptr(View)],
            "mpq_copy_view": [ptr(View), ptr(View), I32],
            "mpq_mean": [ptr(MeanParams), ptr(View), ptr(View)],
            "mpq_resize_nearest": [ptr(ResizeParams), ptr(View), ptr(View)],
            "mpq_resize_bilinear": [ptr(BilinearParams), ptr(View), ptr(View)],
            "mpq_copy_block": [ptr(Block), ctypes.c_void_p, ctypes.c_void_p, I32],
            "mpq_fill": [ctypes.c_void_p, I32, I32, I32],
            "mpq_activation": [ptr(ActivationParams), ptr(View), ptr(View)],
        }
        for name, argtypes in sigs.items():
            fn = getattr(lib, name)
            fn.argtypes = argtypes
            fn.restype = ctypes.c_int

    @staticmethod
    def _filter(weight: AnyWeights, bits: int | None = None
                ) -> tuple[Filter, list[np.ndarray]]:
        """The C filter of `weight`: Weights, or plain linear int values at `bits`. The packed
        codes are followed by 0xFF bytes, so a kernel that took bits past the last code into a
        sum would get it wrong."""
        if not isinstance(weight, Weights):
            weight = Weights.linear(weight, bits)
        w = weight.codes
        shape = w.shape if w.ndim == 4 else (w.shape[0], 1, 1, int(np.prod(w.shape[1:])))
        packed = np.concatenate([pack_codes(w, weight.bits), np.full(CANARY, 0xFF, np.uint8)])
        keep = [packed]
        book = None
        if weight.codebook is not None:
            keep.append(np.ascontiguousarray(weight.codebook))
            book = keep[-1].ctypes.data
        f = Filter(packed.ctypes.data, weight.bits, *shape, weight.fmt, book)
        return f, keep

    @staticmethod
    def _quant(bias: np.ndarray | None, mult: np.ndarray,
               shift: np.ndarray) -> tuple[ChannelQuant, list[np.ndarray]]:
        arrays = [_i32(mult), _i32(shift)]
        b = None
        if bias is not None:
            arrays.append(_i32(bias))
            b = arrays[-1].ctypes.data_as(P_I32)
        q = ChannelQuant(b, arrays[0].ctypes.data_as(P_I32), arrays[1].ctypes.data_as(P_I32))
        return q, arrays

    @staticmethod
    def _scratch(size: int) -> tuple[int | None, np.ndarray]:
        """A scratch buffer of `size` bytes plus canaries; NULL when the size is 0 or the size
        query failed (a negative code: the kernel then reports the error itself)."""
        # numpy buffers are at least 8-byte aligned, as int16 scratch requires.
        raw = np.full(max(size, 0) + CANARY, 0x5A, np.uint8)
        return (None if size <= 0 else raw.ctypes.data), raw

    @staticmethod
    def _check_scratch(raw: np.ndarray) -> None:
        assert (raw[-CANARY:] == 0x5A).all(), "kernel wrote past its scratch"

    def conv_scratch_size(self, p: ConvParams, weight: AnyWeights, bits: int | None, inp: View,
                          out: View) -> int:
        f, _keep = self._filter(weight, bits)
        return self.lib.mpq_conv2d_scratch_size(p, f, inp, out)

    def conv2d(self, p: ConvParams, weight: AnyWeights, w_bits: int | None, bias: np.ndarray | None,
               mult: np.ndarray, shift: np.ndarray, inp: View, out: View) -> int:
        f, _wk = self._filter(weight, w_bits)
        q, _qk = self._quant(bias, mult, shift)
        ptr, raw = self._scratch(self.lib.mpq_conv2d_scratch_size(p, f, inp, out))
        rc = self.lib.mpq_conv2d(p, f, q, inp, out, ptr)
        self._check_scratch(raw)
        return rc

    def conv2d_add(self, p: ConvParams, weight: AnyWeights, w_bits: int | None,
                   bias: np.ndarray | None, mult: np.ndarray, shift: np.ndarray, inp: View,
                   add: AddParams, skip: View, out: View) -> int:
        f, _wk = self._filter(weight, w_bits)
        q, _qk = self._quant(bias, mult, shift)
        ptr, raw = self._scratch(self.lib.mpq_conv2d_scratch_size(p, f, inp, out))
        rc = self.lib.mpq_conv2d_add(p, f, q, inp, add, skip, out, ptr)
        self._check_scratch(raw)
        return rc

    def depthwise_inplace_scratch_size(self, p: ConvParams, weight: AnyWeights, bits: int | None,
                                       inp: View, out: View) -> int:
        f, _keep = self._filter(weight, bits)
        return self.lib.mpq_depthwise_inplace_scratch_size(p, f, inp, out)

    def depthwise_inplace(self, p: ConvParams, weight: AnyWeights, w_bits: int | None,
                          bias: np.ndarray | None, mult: np.ndarray, shift: np.ndarray,
                          inp: View, out: View, grouped: bool = False) -> int:
        """mpq_depthwise_inplace, or with `grouped` mpq_depthwise_inplace_grouped (the same
        scratch)."""
        f, _wk = self._filter(weight, w_bits)
        q, _qk = self._quant(bias, mult, shift)
        size = self.lib.mpq_depthwise_inplace_scratch_size(p, f, inp, out)
        ptr, raw = self._scratch(size)
        fn = self.lib.mpq_depthwise_inplace_grouped if grouped else self.lib.mpq_depthwise_inplace
        rc = fn(p, f, q, inp, out, ptr)
        self._check_scratch(raw)
        return rc

    def fully_connected(self, p: FcParams, weight: AnyWeights, w_bits: int | None,
                        bias: np.ndarray | None, mult: np.ndarray, shift: np.ndarray,
                        inp: View, out: View) -> int:
        f, _wk = self._filter(weight, w_bits)
        q, _qk = self._quant(bias, mult, shift)
        return self.lib.mpq_fully_connected(p, f, q, inp, out)

    def add(self, p: AddParams, a: View, b: View, out: View) -> int:
        return self.lib.mpq_add(p, a, b, out)

    def avgpool(self, p: PoolParams, inp: View, out: View, grouped: bool = False) -> int:
        """mpq_avgpool, or with `grouped` mpq_avgpool_grouped."""
        return (self.lib.mpq_avgpool_grouped if grouped else self.lib.mpq_avgpool)(p, inp, out)

    def maxpool(self, p: PoolParams, inp: View, out: View, grouped: bool = False) -> int:
        """mpq_maxpool, or with `grouped` mpq_maxpool_grouped."""
        return (self.lib.mpq_maxpool_grouped if grouped else self.lib.mpq_maxpool)(p, inp, out)

    def avgpool_accumulate(self, inp: View, sums: np.ndarray) -> int:
        """mpq_avgpool_accumulate into `sums` (int32, updated in place)."""
        assert sums.dtype == np.int32 and sums.flags.c_contiguous
        return self.lib.mpq_avgpool_accumulate(inp, sums.ctypes.data)

    def avgpool_finish(self, sums: np.ndarray, count: int, act_min: int, act_max: int,
                       out: View) -> int:
        assert sums.dtype == np.int32 and sums.flags.c_contiguous
        return self.lib.mpq_avgpool_finish(sums.ctypes.data, count, act_min, act_max, out)

    def softmax(self, p: SoftmaxParams, inp: View, out: View) -> int:
        return self.lib.mpq_softmax(p, inp, out)

    def copy_view(self, src: View, dst: View, dst_c0: int) -> int:
        return self.lib.mpq_copy_view(src, dst, dst_c0)

    def mean(self, p: MeanParams, inp: View, out: View) -> int:
        return self.lib.mpq_mean(p, inp, out)

    def resize_nearest(self, rows: np.ndarray, cols: np.ndarray, inp: View, out: View) -> int:
        r = np.ascontiguousarray(rows, np.int32)
        c = np.ascontiguousarray(cols, np.int32)
        p = ResizeParams(r.ctypes.data_as(P_I32), c.ctypes.data_as(P_I32))
        return self.lib.mpq_resize_nearest(p, inp, out)

    def resize_bilinear(self, rows: tuple, cols: tuple, inp: View, out: View) -> int:
        """`rows` / `cols`: (lower, upper, fraction) arrays of `arith.bilinear_int_taps`."""
        keep = [np.ascontiguousarray(a, np.int32) for a in (*rows, *cols)]
        p = BilinearParams(*(a.ctypes.data_as(P_I32) for a in keep))
        return self.lib.mpq_resize_bilinear(p, inp, out)

    def _elementwise(self, name: str, params: type, n_views: int) -> Any:
        fn = getattr(self.lib, name)
        fn.argtypes = [ctypes.POINTER(params)] + [ctypes.POINTER(View)] * n_views
        fn.restype = ctypes.c_int
        return fn

    def mul(self, p: MulParams, a: View, b: View, out: View) -> int:
        return self._elementwise("mpq_mul", MulParams, 3)(p, a, b, out)

    def sub(self, p: AddParams, a: View, b: View, out: View) -> int:
        return self._elementwise("mpq_sub", AddParams, 3)(p, a, b, out)

    def prelu(self, p: PreluParams, inp: View, out: View) -> int:
        """`p.alpha` must point at int8 slopes the caller keeps alive."""
        return self._elementwise("mpq_prelu", PreluParams, 2)(p, inp, out)

    def copy_block(self, b: Block, src: Stored, dst: Stored) -> int:
        return self.lib.mpq_copy_block(b, src.buf.ctypes.data, dst.buf.ctypes.data, dst.bits)

    def fill(self, dst: Stored, n: int, value: int) -> int:
        return self.lib.mpq_fill(dst.buf.ctypes.data, dst.bits, n, value)

    def activation(self, table: np.ndarray | None, inp: View, out: View) -> int:
        """mpq_activation with a 256-entry int8 table (None: a NULL table)."""
        t = None if table is None else np.ascontiguousarray(table, np.int8)
        return self.lib.mpq_activation(ActivationParams(None if t is None else t.ctypes.data),
                                       inp, out)


@cache
def build(variant: str = "portable") -> Kernels:
    """Compile (-O2 -shared -fPIC -Wall -Wextra -Werror) every library file and load one
    variant."""
    lib = workdir() / f"mpq_kernels_{variant}.so"
    compile_c(["gcc", *CFLAGS, *VARIANTS[variant], *EXTRA_CFLAGS, "-shared", "-fPIC",
               f"-I{LIBRARY}", "-o", str(lib), *map(str, library_sources())])
    return Kernels(ctypes.CDLL(str(lib)))
