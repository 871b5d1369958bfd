"""Structural ops as block copies for the `mpq_copy_block` kernel (kernels/mpq_block.c).

Slice, split, strided slice, pad and concatenation along any axis move values without any
arithmetic (their output shares the input's quantisation, DESIGN §4.1): each is one or more
copies of an n-D block of elements between two packed buffers, the source and destination
elements given by an offset and a stride per axis (row-major over the IR shape, so NHWC).
Axes of count 1 are dropped and axes contiguous on both sides merged, so every rank the IR has
fits the kernel's four axes in practice; anything that does not is refused.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from mpq.errors import MpqError

BLOCK_DIMS = 4  # MPQ_BLOCK_DIMS in kernels/mpq_kernels.h


@dataclass(frozen=True)
class Block:
    """One `mpq_block`: which input it reads and the block's geometry (elements)."""

    input: int
    count: tuple[int, ...]
    src_stride: tuple[int, ...]
    dst_stride: tuple[int, ...]
    src_offset: int
    dst_offset: int
    src_size: int
    dst_size: int


def row_major_strides(shape: tuple[int, ...]) -> list[int]:
    """Element strides of a contiguous row-major (NHWC) tensor."""
    strides, acc = [], 1
    for d in reversed(shape):
        strides.append(acc)
        acc *= d
    return strides[::-1]


def make_block(input_index: int, count: list[int], src_stride: list[int],
               dst_stride: list[int], src_offset: int, dst_offset: int, src_size: int,
               dst_size: int, where: str) -> Block:
    """Normalise an n-D copy to the kernel's four axes: drop count-1 axes, merge axis d into
    d+1 when src_stride[d] = count[d+1]·src_stride[d+1] and likewise for dst, pad in front."""
    axes = [(c, s, d) for c, s, d in zip(count, src_stride, dst_stride, strict=True) if c != 1]
    merged: list[tuple[int, int, int]] = []
    for c, s, d in axes:
        if merged:
            pc, ps, pd = merged[-1]
            if ps == c * s and pd == c * d:
                merged[-1] = (pc * c, s, d)
                continue
        merged.append((c, s, d))
    if len(merged) > BLOCK_DIMS:
        raise MpqError(f"export: {where} needs a {len(merged)}-axis block copy; the kernel "
                       f"takes {BLOCK_DIMS}")
    merged = [(1, 0, 0)] * (BLOCK_DIMS - len(merged)) + merged
    return Block(input_index, tuple(m[0] for m in merged), tuple(m[1] for m in merged),
                 tuple(m[2] for m in merged), src_offset, dst_offset, src_size, dst_size)


def concat_blocks(in_shapes: list[tuple[int, ...]], out_shape: tuple[int, ...], axis: int,
                  where: str) -> list[Block]:
    """Concatenation along `axis`: input i lands at offset Σ_{j<i} n_j along that axis."""
    out_strides = row_major_strides(out_shape)
    blocks, start = [], 0
    for i, shape in enumerate(in_shapes):
        blocks.append(make_block(i, list(shape), row_major_strides(shape), out_strides, 0,
                                 start * out_strides[axis], math.prod(shape),
                                 math.prod(out_shape), where))
        start += shape[axis]
    return blocks


def slice_block(in_shape: tuple[int, ...], out_shape: tuple[int, ...], starts: tuple[int, ...],
                steps: tuple[int, ...], where: str) -> Block:
    """out[i] = in[starts + i·steps] per axis."""
    in_strides = row_major_strides(in_shape)
    return make_block(0, list(out_shape), [s * st for s, st in zip(in_strides, steps,
                                                                   strict=True)],
                      row_major_strides(out_shape),
                      sum(s * b for s, b in zip(in_strides, starts, strict=True)), 0,
                      math.prod(in_shape), math.prod(out_shape), where)


def pad_block(in_shape: tuple[int, ...], out_shape: tuple[int, ...],
              pads: tuple[tuple[int, int], ...], where: str) -> Block:
    """The interior of a pad: in[i] lands at out[i + before] (the rest is filled first)."""
    out_strides = row_major_strides(out_shape)
    return make_block(0, list(in_shape), row_major_strides(in_shape), out_strides, 0,
                      sum(s * p[0] for s, p in zip(out_strides, pads, strict=True)),
                      math.prod(in_shape), math.prod(out_shape), where)
