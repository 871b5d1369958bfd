"""An independent, deliberately plain implementation of the integer kernels for the tests.

Scalar Python integers and explicit loops, written from the C code's semantics
(`shared/research/runtimes.md` §1.4) without sharing a line with `mpq.quant.arith` or
`mpq.sim`, so that agreement between the two means something.
"""

from __future__ import annotations

import math


def to_i32(v: int) -> int:
    v &= 0xFFFFFFFF
    return v - (1 << 32) if v >= (1 << 31) else v


def rounding_divide_by_pot(x: int, e: int) -> int:
    mask = (1 << e) - 1
    remainder = x & mask
    result = x >> e
    threshold = (mask >> 1) + (1 if result < 0 else 0)
    return result + (1 if remainder > threshold else 0)


def requantize(acc: int, m: int, s: int) -> int:
    left = s if s > 0 else 0
    right = -s if s < 0 else 0
    x = to_i32(acc * (1 << left))
    hi = (x * m + (1 << 30)) >> 31
    return rounding_divide_by_pot(hi, right)


def quantize_multiplier(real: float) -> tuple[int, int]:
    if real == 0:
        return 0, 0
    q, s = math.frexp(real)
    m = int(math.floor(q * 2**31 + 0.5))
    if m == 2**31:
        m //= 2
        s += 1
    if s < -31:
        return 0, 0
    return m, s


def conv(x, zp_in, w, bias, m, s, zp_out, act_min, act_max, stride, dil, pads, groups):
    """x[H][W][C], w[O][KH][KW][C/g] lists; pads (t, l, b, r). Returns out[Ho][Wo][O]."""
    h, wd, c = len(x), len(x[0]), len(x[0][0])
    o_ch, kh, kw, cg = len(w), len(w[0]), len(w[0][0]), len(w[0][0][0])
    t, left, b, r = pads
    ho = (h + t + b - (dil[0] * (kh - 1) + 1)) // stride[0] + 1
    wo = (wd + left + r - (dil[1] * (kw - 1) + 1)) // stride[1] + 1
    og = o_ch // groups
    out = [[[0] * o_ch for _ in range(wo)] for _ in range(ho)]
    for oy in range(ho):
        for ox in range(wo):
            for o in range(o_ch):
                g = o // og
                acc = bias[o]
                for ky in range(kh):
                    iy = oy * stride[0] - t + ky * dil[0]
                    if iy < 0 or iy >= h:
                        continue
                    for kx in range(kw):
                        ix = ox * stride[1] - left + kx * dil[1]
                        if ix < 0 or ix >= wd:
                            continue
                        for ci in range(cg):
                            acc += w[o][ky][kx][ci] * (x[iy][ix][g * cg + ci] - zp_in)
                v = requantize(acc, m[o], s[o]) + zp_out
                out[oy][ox][o] = min(max(v, act_min), act_max)
    assert c == cg * groups
    return out


def fully_connected(x, zp_in, w, bias, m, s, zp_out, act_min, act_max):
    out = []
    for o in range(len(w)):
        acc = bias[o] + sum(w[o][k] * (x[k] - zp_in) for k in range(len(x)))
        out.append(min(max(requantize(acc, m[o], s[o]) + zp_out, act_min), act_max))
    return out


def add(x1, zp1, s1, x2, zp2, s2, zp_out, s_out, act_min, act_max):
    twice = 2 * max(s1, s2)
    m1, e1 = quantize_multiplier(s1 / twice)
    m2, e2 = quantize_multiplier(s2 / twice)
    mo, eo = quantize_multiplier(twice / ((1 << 20) * s_out))
    out = []
    for a, b in zip(x1, x2, strict=True):
        ra = requantize((a - zp1) << 20, m1, e1)
        rb = requantize((b - zp2) << 20, m2, e2)
        out.append(min(max(requantize(ra + rb, mo, eo) + zp_out, act_min), act_max))
    return out


def pool(x, kernel, stride, pads, kind, act_min, act_max):
    h, wd, c = len(x), len(x[0]), len(x[0][0])
    t, left, b, r = pads
    ho = (h + t + b - kernel[0]) // stride[0] + 1
    wo = (wd + left + r - kernel[1]) // stride[1] + 1
    out = [[[0] * c for _ in range(wo)] for _ in range(ho)]
    for oy in range(ho):
        for ox in range(wo):
            for ch in range(c):
                vals = []
                for ky in range(kernel[0]):
                    for kx in range(kernel[1]):
                        iy, ix = oy * stride[0] - t + ky, ox * stride[1] - left + kx
                        if 0 <= iy < h and 0 <= ix < wd:
                            vals.append(x[iy][ix][ch])
                if kind == "max":
                    v = max(vals)
                else:
                    total, cnt = sum(vals), len(vals)
                    num = total + cnt // 2 if total > 0 else total - cnt // 2
                    v = int(num / cnt)  # C division truncates toward zero
                out[oy][ox][ch] = min(max(v, act_min), act_max)
    return out


def decode_weight(u: int, bits: int, fmt: int, codebook=None) -> int:
    """The int8 value of weight code u in an `mpq_filter` format (DESIGN §7.4): 0 LINEAR (u is
    the signed b-bit value), 1 CODEBOOK (codebook[u]), 2 POW2 (±2^e with the sign in the top
    bit and e = low bits − 1; 0 when the low bits are 0, i.e. u = 0 and the "−0" code)."""
    assert 0 <= u < (1 << bits)
    if fmt == 0:
        return u - (1 << bits) if u >= (1 << (bits - 1)) else u
    if fmt == 1:
        return int(codebook[u])
    assert fmt == 2
    half = 1 << (bits - 1)
    if u % half == 0:
        return 0
    magnitude = 2 ** ((u % half) - 1)
    return -magnitude if u >= half else magnitude
