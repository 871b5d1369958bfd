"""Packed sub-byte kernels at export: which layers take them and their packed filters.

`kernels/mpq_packed.c` (API and formulas: the "packed sub-byte kernels" block of
`kernels/mpq_kernels.h`) runs convolutions and fully connected layers whose activations and
weights are both 4 or 2 bits with two multiply-accumulates per 16-bit SMLAD lane (ULPPACK,
Won et al. 2022; MCU-MixQ 2024; issue 15 item 2). `packed_choice` is the selection rule, with
the reason when a layer cannot use them (it goes into `mpq_report.json`); `pack_filter`
computes, byte for byte, what the C library's `mpq_packed_pack` does (tests compare them).
"""

from __future__ import annotations

from typing import Any

import numpy as np

#: Cores whose ISA has the DSP extension (SMLAD); only there do the packed kernels pay.
DSP_CORES = ("cortex-m4", "cortex-m7", "cortex-m33", "cortex-m55")
FIELD_SHIFT = 12  # the middle field of a lane product starts at bit 12
#: weight bits -> rotations of the stored word that give the block's SMLAD operands
ROTATIONS = {4: (0, 8), 2: (0, 2, 8, 10)}


def weight_offsets(wbits: int) -> tuple[int, int]:
    """(ow, oh): the offsets of the lo (odd element) and hi (even element) weight fields. A
    4-bit hi field is the weight's two's complement code at bits 12-15, so it needs none."""
    return 1 << (wbits - 1), 0 if wbits == 4 else 2


def extraction_period(abits: int, wbits: int) -> int:
    """Blocks of 4 SMLADs (16 MACs) between two extractions of the middle field: the largest e
    with 8e·Lmax < 2^12 and 8e·Mmax ≤ 2^11 − 1, 8e·|Mmin| ≤ 2^11, where per element pair
    L = a'·r ∈ [0, (2^ab − 1)(2^wb − 1)] and M = a'·h + x_q·r (a' ∈ [0, 2^ab − 1],
    x_q ∈ [−2^(ab−1), 2^(ab−1) − 1], r ∈ [0, 2^wb − 1], h ∈ [−8, 7] for 4-bit weights,
    [0, 3] for 2-bit) - kernels/mpq_packed.c hard-codes these (1, 21, 3, 4)."""
    amax, qmin, qmax = (1 << abits) - 1, -(1 << (abits - 1)), (1 << (abits - 1)) - 1
    rmax = (1 << wbits) - 1
    hmin, hmax = (-8, 7) if wbits == 4 else (0, 3)
    lmax = amax * rmax
    mmax = amax * hmax + qmax * rmax
    mmin = min(amax * hmin, 0) + qmin * rmax
    e = 1
    while 8 * (e + 1) * lmax < 4096 and 8 * (e + 1) * mmax <= 2047 \
            and 8 * (e + 1) * -mmin <= 2048:
        e += 1
    return e


def _rol(v: np.ndarray, n: int) -> np.ndarray:
    return v if n == 0 else ((v << np.uint32(n)) | (v >> np.uint32(32 - n))).astype(np.uint32)


def pack_filter(weight: np.ndarray, wbits: int, bias: np.ndarray | None, act_bits: int,
                input_zp: int) -> tuple[np.ndarray, np.ndarray]:
    """(words, corrected bias) of a linear filter [n, ...] (rows flattened to K values) for the
    packed kernels, as `mpq_packed_pack`: rows of ceil(K/16) blocks; in a block, operand word j
    holds elements 4j..4j+3 as two lanes lo | hi << 12 with lo = W[odd] + ow, hi = W[even] + oh
    (wbits-bit fields, `weight_offsets`), and the block's wbits/2 stored words are the OR of
    the operands rotated left by `ROTATIONS` (so the kernel's AND of a right rotation gets each
    back). Corrected bias: bias − zp·Σ_k W − oa·Σ_{k even} W (mod 2^32), oa = 2^(act_bits−1)."""
    w = np.asarray(weight, dtype=np.int64).reshape(weight.shape[0], -1)
    n, k = w.shape
    nblk = (k + 15) // 16
    ow, oh = weight_offsets(wbits)
    fmask = (1 << wbits) - 1
    padded = np.zeros((n, nblk * 16), dtype=np.int64)
    padded[:, :k] = w
    pairs = padded.reshape(n, nblk, 4, 2, 2)  # block, operand word, lane, (even, odd)
    lanes = ((pairs[..., 1] + ow) & fmask) | (((pairs[..., 0] + oh) & fmask) << FIELD_SHIFT)
    ops = (lanes[..., 0] | (lanes[..., 1] << 16)).astype(np.uint32)  # [n, nblk, 4]
    rots = ROTATIONS[wbits]
    per = len(rots)  # operands per stored word
    words = np.zeros((n, nblk, 4 // per), dtype=np.uint32)
    for j in range(4):
        words[:, :, j // per] |= _rol(ops[:, :, j], rots[j % per])
    oa = 1 << (act_bits - 1)
    b = np.zeros(n, dtype=np.int64) if bias is None else np.asarray(bias, dtype=np.int64)
    cb = (b - input_zp * w.sum(axis=1) - oa * w[:, 0::2].sum(axis=1)) % (1 << 32)
    return words.reshape(-1), cb.astype(np.uint32).view(np.int32)


def packed_choice(node: Any, core: str, in_bits: int, weight_bits: int, weight_format: int,
                  fused: bool, inplace: bool) -> str | None:
    """None when the packed kernel takes this conv2d / fully_connected layer, else why not
    (a sentence for `mpq_report.json`). Needs: a core with the DSP extension, a layer-based
    conv (groups 1, not the in-place depthwise; one `fused` with its residual add takes
    mpq_packed_conv2d_add) or fully connected layer, 4- or 2-bit activations and 4- or 2-bit
    linear weights."""
    if core not in DSP_CORES:
        return f"core {core} has no DSP extension (SMLAD)"
    if node.op == "conv2d":
        if inplace or node.attrs["groups"] != 1:
            return "grouped or depthwise convolution"
    if in_bits not in (4, 2):
        return f"{in_bits}-bit activations (packed kernels take 4 or 2)"
    if weight_bits not in (4, 2):
        return f"{weight_bits}-bit weights (packed kernels take 4 or 2)"
    if weight_format != 0:
        return "non-linear weight format (codebook/pow2 codes are decoded through tables)"
    return None


# -- sub-byte operands unpacked to int8: mpq_conv2d_unpacked (issue 15) --------------------------

def unpacked_scratch(node: Any, in_shape: tuple[int, ...], out_shape: tuple[int, ...],
                     in_bits: int = 8, weight_bits: int = 4, linear: bool = True) -> int:
    """Bytes of scratch `mpq_conv2d_unpacked` takes (`mpq_conv2d_unpacked_scratch_size`):
    align4(n·KH·KW·Cin) for the weights decoded to int8 (none for 8-bit linear ones) plus the
    int8 path's two im2col columns, 2·K (none for an 8-bit input a 1×1 unit-stride unpadded
    convolution within its input reads in place)."""
    n, kh, kw, cin = node.weight.shape
    k = kh * kw * cin
    a = node.attrs
    direct = (kh, kw) == (1, 1) and a["strides"] == (1, 1) and not any(a["pads"][:2]) \
        and out_shape[1] <= in_shape[1] and out_shape[2] <= in_shape[2]
    weights = (n * k + 3) // 4 * 4 if weight_bits < 8 or not linear else 0
    return weights + (0 if direct and in_bits == 8 else 2 * k)


def unpack_eligible(node: Any, in_bits: int, weight_bits: int, fused: bool, inplace: bool,
                    linear: bool = True) -> str | None:
    """None when a layer's operands suit `mpq_conv2d_unpacked` (`mpq_conv2d_add_unpacked` when
    `fused` with its residual add): a conv2d with groups 1 and a 4- or 2-bit input or weights
    other than 8-bit linear; else why not. Whether its scratch is free is `unpack_choice`'s
    second test."""
    if node.op != "conv2d" or (in_bits == 8 and weight_bits == 8 and linear):
        return "8-bit input and 8-bit linear weights: mpq_conv2d's own int8 path"
    if inplace or node.attrs["groups"] != 1:
        return "grouped or depthwise convolution"
    return None  # a conv fused with its residual add takes mpq_conv2d_add_unpacked


def unpack_choice(node: Any, in_bits: int, weight_bits: int, fused: bool, inplace: bool,
                  need: int, available: int, linear: bool = True) -> str | None:
    """None when the export runs this layer through `mpq_conv2d_unpacked` (sub-byte weights
    decoded to int8 once per call, sub-byte inputs unpacked into int8 columns, then
    mpq_conv2d's int8 SMLAD path), else why not. The bound: its scratch `need`
    (`unpacked_scratch`) must fit in the scratch the plan reserves (`available`: its arena
    slot — grown for this kernel where the budget had room, `memory.grow_scratch` — or the one
    separate scratch), so the plan's SRAM figure stays true with no extra byte."""
    why = unpack_eligible(node, in_bits, weight_bits, fused, inplace, linear)
    if why is not None:
        return why
    if need > available:
        return (f"unpacked int8 operands need {need:,} B of scratch, more than the plan's "
                f"{available:,} B")
    return None


# -- sub-byte depthwise and pooling in channel groups (issue 15 item 2) -------------------------

#: Taps of a depthwise filter the kernels decode into a per-channel table (MPQ_DW_TAPS).
DW_TAPS = 25


def group_choice(node: Any, kernel: str, in_bits: int, channels: int, core: str,
                 same_storage: bool = False) -> str | None:
    """None when a layer with a 4- or 2-bit input runs its channels in byte groups (pairs at 4
    bits, quads at 2: every byte of the tensor decoded once for all its channels; on a core with
    the DSP extension with SXTB16/SMLAD, SXTAB16 or SSUB8/SEL lanes), else why not (a sentence
    for `mpq_report.json`). `kernel` is the export's call: `depthwise_inplace`
    (mpq_depthwise_inplace: C a multiple of 8/bits, at most DW_TAPS taps), `avgpool` / `maxpool`
    (C a multiple of 8/bits and not in place; `same_storage`), anything else has no such
    path."""
    group = 8 // in_bits
    if kernel == "conv2d":
        return "not the in-place depthwise: mpq_conv2d's grouped loops take one element at a time"
    if kernel not in ("depthwise_inplace", "avgpool", "maxpool"):
        return f"no channel-group path in mpq_{kernel}"
    if channels % group:
        return (f"{channels} channels do not fill whole bytes of {in_bits}-bit "
                f"{'pairs' if group == 2 else 'quads'}")
    if kernel == "depthwise_inplace":
        kh, kw = node.weight.shape[1:3]
        if kh * kw > DW_TAPS:
            return f"{kh}x{kw} filter: more than {DW_TAPS} taps"
    elif same_storage:
        return "output over its own input (pooled in place: one element at a time)"
    return None  # without the DSP extension the groups run in plain C (`group_simd`)


def group_simd(node: Any, kernel: str, in_bits: int, channels: int, core: str) -> bool:
    """Whether a layer that `group_choice` admits also takes the SIMD rows on `core`: 3x3
    depthwise at stride 1 or 2 along W and unit dilation; pooling with C a multiple of 32/bits
    (a word of channels), average pooling with windows of at most 256 taps."""
    if core not in DSP_CORES:
        return False
    a = node.attrs
    if kernel == "depthwise_inplace":
        return tuple(node.weight.shape[1:3]) == (3, 3) and a["strides"][1] in (1, 2) \
            and a.get("dilations", (1, 1))[1] == 1
    kh, kw = a["kernel"]
    return channels % (32 // in_bits) == 0 and (kernel == "maxpool" or kh * kw <= 256)
