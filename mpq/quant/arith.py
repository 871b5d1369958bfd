"""Exact integer arithmetic of TFLite Micro / CMSIS-NN, vectorised in numpy (DESIGN §4.1).

Every function here computes, element by element, the same bits as the C code it names
(`shared/research/runtimes.md` §1.4). Values are carried in int64 arrays; wherever the C code
works in int32 and may wrap, `wrap32` reproduces the wrap. The default requantisation is
double rounding (TFLM's default; CMSIS-NN without CMSIS_NN_USE_SINGLE_ROUNDING).
"""

from __future__ import annotations

import math

import numpy as np

INT32_MIN = -(1 << 31)
INT32_MAX = (1 << 31) - 1


def wrap32(x: np.ndarray) -> np.ndarray:
    """Two's-complement wrap of int64 values to int32 range (what a C int32 expression does)."""
    return ((np.asarray(x, np.int64) + (1 << 31)) & 0xFFFFFFFF) - (1 << 31)


def qrange(bits: int) -> tuple[int, int]:
    """Signed range of a b-bit activation: [−2^(b−1), 2^(b−1)−1] (DESIGN §4.2)."""
    return -(1 << (bits - 1)), (1 << (bits - 1)) - 1


def weight_qmax(bits: int) -> int:
    """Symmetric weight range bound: 127 (int8), 7 (int4), 1 (int2) (DESIGN §4.1–4.2)."""
    return (1 << (bits - 1)) - 1


def round_half_away(x: float | np.ndarray) -> np.ndarray:
    """C's std::round: halves go away from zero (NOT numpy's banker's rounding)."""
    x = np.asarray(x, np.float64)
    return np.sign(x) * np.floor(np.abs(x) + 0.5)


def quantize_multiplier(real: float) -> tuple[int, int]:
    """TFLite QuantizeMultiplier: real = M·2^(S−31), M in [2^30, 2^31) (runtimes.md §1.4).

    frexp gives q in [0.5, 1); M = round_half_away(q·2^31); M == 2^31 renormalises;
    S < −31 flushes to (0, 0).
    """
    if real == 0.0:
        return 0, 0
    q, shift = math.frexp(real)
    m = math.floor(q * (1 << 31) + 0.5) if q > 0 else -math.floor(-q * (1 << 31) + 0.5)
    if m == (1 << 31):
        m //= 2
        shift += 1
    if shift < -31:
        return 0, 0
    return int(m), int(shift)


def doubling_high_mult_no_sat(a: np.ndarray, m: np.ndarray) -> np.ndarray:
    """arm_nn_doubling_high_mult_no_sat: (a·m + 2^30) >> 31 with an arithmetic (floor) shift."""
    return (np.asarray(a, np.int64) * np.asarray(m, np.int64) + (1 << 30)) >> 31


def doubling_high_mult(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """arm_nn_doubling_high_mult (gemmlowp SaturatingRoundingDoublingHighMul).

    (a·b ± 2^30) / 2^31 with C truncating division; the nudge is 1 − 2^30 when signs differ;
    INT32_MIN·INT32_MIN saturates to INT32_MAX.
    """
    a = np.asarray(a, np.int64)
    b = np.asarray(b, np.int64)
    nudge = np.where((a < 0) ^ (b < 0), 1 - (1 << 30), 1 << 30)
    prod = a * b + nudge
    q = np.where(prod >= 0, prod >> 31, -((-prod) >> 31))  # truncation toward zero
    return np.where((a == b) & (a == INT32_MIN), INT32_MAX, q)


def divide_by_power_of_two(x: np.ndarray, exponent: np.ndarray | int) -> np.ndarray:
    """arm_nn_divide_by_power_of_two (gemmlowp RoundingDivideByPOT): halves away from zero.

    The C code is floor(x/2^e) plus one when the remainder exceeds (2^e−1)>>1 (+1 when the
    result is negative); that is exactly round-half-away-from-zero of x/2^e, which for e ≥ 1
    is (x + 2^(e−1) − [x < 0]) >> e with an arithmetic shift (a negative exact half rounds
    down, anything above it up), and x itself for e = 0.
    """
    x = np.asarray(x, np.int64)
    e = np.asarray(exponent, np.int64)
    half = np.where(e > 0, np.left_shift(np.int64(1), np.maximum(e - 1, 0)), 0)
    return (x + half - ((x < 0) & (e > 0))) >> e


def requantize(acc: np.ndarray, multiplier: np.ndarray | int,
               shift: np.ndarray | int) -> np.ndarray:
    """arm_nn_requantize / TFLite MultiplyByQuantizedMultiplier, double rounding (DESIGN §4.1).

    x = acc·2^max(S,0) in int32 (wraps like C), hi = (x·M + 2^30) >> 31,
    y = RoundingDivideByPOT(hi, max(−S, 0)).
    """
    s = np.asarray(shift, np.int64)
    left = np.maximum(s, 0)
    right = np.maximum(-s, 0)
    x = np.asarray(acc, np.int64)
    if left.any():
        x = x << left
    if x.size and (x.max() > INT32_MAX or x.min() < INT32_MIN):
        x = wrap32(x)
    return divide_by_power_of_two(doubling_high_mult_no_sat(x, multiplier), right)


def clamp_activation(lo: float, hi: float, scale: float, zero_point: int,
                     bits: int) -> tuple[int, int]:
    """Fused activation range in the quantised domain (TFLite CalculateActivationRangeQuantized).

    act_min = max(qmin, zp + round(lo/s)), act_max = min(qmax, zp + round(hi/s)), the division
    in float32 and round half away from zero; unbounded sides stay at the type's limits.
    """
    qmin, qmax = qrange(bits)
    s = np.float32(scale)

    def steps(bound: float) -> float:
        # A finite bound near FLT_MAX (a corrupt Clip max) divides to ±inf in float32: it lies
        # beyond the type's range, so it saturates like an unbounded side.
        with np.errstate(over="ignore"):
            q = np.float32(bound) / s
        return float(q) if np.isfinite(q) else (math.inf if q > 0 else -math.inf)

    qlo, qhi = steps(lo), steps(hi)
    amin = qmin if qlo == -math.inf else qmax if qlo == math.inf else max(
        qmin, zero_point + int(round_half_away(np.float32(qlo))))
    amax = qmax if qhi == math.inf else qmin if qhi == -math.inf else min(
        qmax, zero_point + int(round_half_away(np.float32(qhi))))
    return int(amin), int(amax)


def choose_activation_params(lo: float, hi: float, bits: int) -> tuple[float, int]:
    """Asymmetric (scale, zero point) for a real range, TFLite's nudged zero point.

    The range is widened to contain 0; scale = (hi − lo)/(qmax − qmin), stored as float32;
    zp = round(qmin − lo/scale) clamped to [qmin, qmax], so real 0 is exactly representable.
    """
    qmin, qmax = qrange(bits)
    lo, hi = min(float(lo), 0.0), max(float(hi), 0.0)
    if hi == lo:
        return 1.0, 0
    scale = float(np.float32((hi - lo) / (qmax - qmin)))
    zp = int(round_half_away(qmin - lo / scale))
    return scale, int(min(max(zp, qmin), qmax))


def quantize_weights_symmetric(w: np.ndarray, bits: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-output-channel symmetric weights (TFLite spec; DESIGN §4.1–4.2).

    s_c = max|w_c| / (2^(b−1)−1) as float32; q = clamp(round_half_away(w/s_c)) in
    [−(2^(b−1)−1), 2^(b−1)−1]. Axis 0 is the output channel. Returns (q int8, s float32).
    """
    qmax = weight_qmax(bits)
    flat = w.reshape(w.shape[0], -1).astype(np.float64)
    amax = np.abs(flat).max(axis=1)
    scale = np.where(amax > 0, amax / qmax, 1.0).astype(np.float32)
    q = round_half_away(flat / scale.astype(np.float64)[:, None])
    q = np.clip(q, -qmax, qmax).astype(np.int8).reshape(w.shape)
    return q, scale


def quantize_bias(bias: np.ndarray, input_scale: float, weight_scale: np.ndarray) -> np.ndarray:
    """int32 bias at scale s_in·s_w[c] (TFLite spec), rounded half away from zero."""
    s = np.float64(np.float32(input_scale)) * weight_scale.astype(np.float64)
    q = round_half_away(bias.astype(np.float64) / s)
    return np.clip(q, INT32_MIN, INT32_MAX).astype(np.int64)


def conv_multipliers(input_scale: float, weight_scale: np.ndarray,
                     output_scale: float) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel (M, S) for conv/depthwise/FC: real = (double)s_in·(double)s_w[c]/(double)s_out.

    Scales enter as float32 values widened to double (TFLM PopulateConvolutionQuantizationParams).
    """
    s_in = float(np.float32(input_scale))
    s_out = float(np.float32(output_scale))
    pairs = [quantize_multiplier(s_in * float(np.float32(sw)) / s_out) for sw in weight_scale]
    return (np.array([p[0] for p in pairs], np.int64), np.array([p[1] for p in pairs], np.int64))


LEFT_SHIFT_ADD = 20


def add_params(s1: float, s2: float, s_out: float) -> dict[str, int]:
    """TFLM add constants: left_shift 20, t = 2·max(s1,s2), M_i = QM(s_i/t),
    M_o = QM(t/(2^20·s_o)) (add_common.cc; DESIGN §4.1)."""
    s1, s2, s_out = (float(np.float32(v)) for v in (s1, s2, s_out))
    twice_max = 2.0 * max(s1, s2)
    m1, sh1 = quantize_multiplier(s1 / twice_max)
    m2, sh2 = quantize_multiplier(s2 / twice_max)
    mo, sho = quantize_multiplier(twice_max / ((1 << LEFT_SHIFT_ADD) * s_out))
    return {"m1": m1, "s1": sh1, "m2": m2, "s2": sh2, "mo": mo, "so": sho,
            "left_shift": LEFT_SHIFT_ADD}


def add_quantized(x1: np.ndarray, zp1: int, x2: np.ndarray, zp2: int, p: dict[str, int],
                  zp_out: int, act_min: int, act_max: int) -> np.ndarray:
    """Elementwise add: clamp(rq(rq((x1−zp1)<<20, M1) + rq((x2−zp2)<<20, M2), Mo) + zp_o)."""
    a = requantize((np.asarray(x1, np.int64) - zp1) << p["left_shift"], p["m1"], p["s1"])
    b = requantize((np.asarray(x2, np.int64) - zp2) << p["left_shift"], p["m2"], p["s2"])
    y = requantize(a + b, p["mo"], p["so"]) + zp_out
    return np.clip(y, act_min, act_max)


def add_table(zp1: int, bits1: int, zp2: int, bits2: int, p: dict[str, int], zp_out: int,
              act_min: int, act_max: int) -> np.ndarray:
    """`add_quantized` of every pair of inputs in their activation ranges, as a table
    T[(x1 − lo1)·2^b2 + (x2 − lo2)] (lo the low end of `qrange`): the add is a function of
    its two integer inputs, so one gather from T gives its exact result. 2^(b1+b2) entries;
    int16, which holds every clamp range of 16 bits or fewer."""
    a = np.arange(*np.add(qrange(bits1), (0, 1)), dtype=np.int64)
    b = np.arange(*np.add(qrange(bits2), (0, 1)), dtype=np.int64)
    table = add_quantized(a[:, None], zp1, b[None, :], zp2, p, zp_out, act_min, act_max)
    return table.reshape(-1).astype(np.int16)


def mul_params(s1: float, s2: float, s_out: float) -> dict[str, int]:
    """TFLM mul constants: (M, S) = QuantizeMultiplier((double)s1·(double)s2/(double)s_o)
    (mul_common.cc CalculateOpDataMul)."""
    s1, s2, s_out = (float(np.float32(v)) for v in (s1, s2, s_out))
    m, shift = quantize_multiplier(s1 * s2 / s_out)
    return {"mo": m, "so": shift}


def mul_quantized(x1: np.ndarray, zp1: int, x2: np.ndarray, zp2: int, p: dict[str, int],
                  zp_out: int, act_min: int, act_max: int) -> np.ndarray:
    """Elementwise (broadcasting) mul, TFLM reference_integer_ops::MulElementwise:
    clamp(rq((x1−zp1)·(x2−zp2), M, S) + zp_o)."""
    prod = (np.asarray(x1, np.int64) - zp1) * (np.asarray(x2, np.int64) - zp2)
    return np.clip(requantize(prod, p["mo"], p["so"]) + zp_out, act_min, act_max)


def sub_params(s1: float, s2: float, s_out: float) -> dict[str, int]:
    """TFLM sub constants: the add constants (`add_params`, ratios in double, left shift 20).

    sub_common.cc has at times divided in float32 before widening (the #1501 fix, reverted in
    #1536); the `tflite-micro` build mpq is checked against divides in double, which the
    single-op oracle (tests/test_tflm_binary_ops.py) tells apart from every float variant."""
    return add_params(s1, s2, s_out)


def sub_quantized(x1: np.ndarray, zp1: int, x2: np.ndarray, zp2: int, p: dict[str, int],
                  zp_out: int, act_min: int, act_max: int) -> np.ndarray:
    """Elementwise (broadcasting) sub, TFLM reference_ops::SubElementwise:
    clamp(rq(rq((x1−zp1)<<20, M1) − rq((x2−zp2)<<20, M2), Mo) + zp_o); the difference wraps
    like the C int32 expression."""
    a = requantize((np.asarray(x1, np.int64) - zp1) << p["left_shift"], p["m1"], p["s1"])
    b = requantize((np.asarray(x2, np.int64) - zp2) << p["left_shift"], p["m2"], p["s2"])
    y = requantize(wrap32(a - b), p["mo"], p["so"]) + zp_out
    return np.clip(y, act_min, act_max)


def prelu_params(s_in: float, s_alpha: float, s_out: float) -> dict[str, int]:
    """TFLM prelu constants (prelu_common.cc CalculatePreluParams): (M1, S1) from
    (double)s_in/(double)s_o for x ≥ 0, (M2, S2) from (double)s_in·(double)s_α/(double)s_o."""
    si, sa, so = (float(np.float32(v)) for v in (s_in, s_alpha, s_out))
    m1, sh1 = quantize_multiplier(si / so)
    m2, sh2 = quantize_multiplier(si * sa / so)
    return {"m1": m1, "s1": sh1, "m2": m2, "s2": sh2}


def prelu_quantized(x: np.ndarray, zp_in: int, alpha: np.ndarray, zp_alpha: int,
                    p: dict[str, int], zp_out: int, act_min: int, act_max: int) -> np.ndarray:
    """PRelu, TFLM reference_ops::BroadcastPrelu4DSlow with `alpha` broadcast over the last
    axis: v = x − zp_in; v ≥ 0: rq(v, M1, S1), else rq(v·(α − zp_α), M2, S2); + zp_o, clamp."""
    v = np.asarray(x, np.int64) - zp_in
    a = np.asarray(alpha, np.int64) - zp_alpha
    pos = requantize(v, p["m1"], p["s1"])
    neg = requantize(v * a, p["m2"], p["s2"])
    return np.clip(np.where(v >= 0, pos, neg) + zp_out, act_min, act_max)


def quantize_alpha(alpha: np.ndarray) -> tuple[np.ndarray, float, int]:
    """PRelu slopes as one int8 constant tensor: symmetric per tensor, s = max|α|/127 (1 when
    every α is 0), q = round_half_away(α/s) (the TFLite spec's int8 constant rule)."""
    a = np.asarray(alpha, np.float64)
    amax = float(np.abs(a).max()) if a.size else 0.0
    scale = float(np.float32(amax / 127.0)) if amax > 0 else 1.0
    q = np.clip(round_half_away(a / scale), -127, 127).astype(np.int64)
    return q, scale, 0


def avgpool_round(total: np.ndarray, count: np.ndarray) -> np.ndarray:
    """CMSIS-NN/TFLM average: sum>0 ? (sum+cnt/2)/cnt : (sum−cnt/2)/cnt, C truncating division."""
    total = np.asarray(total, np.int64)
    count = np.asarray(count, np.int64)
    half = count // 2
    num = np.where(total > 0, total + half, total - half)
    return np.where(num >= 0, num // count, -((-num) // count))


# -- softmax (gemmlowp fixed point; identical in TFLM reference and CMSIS-NN arm_softmax_s8) --

SOFTMAX_INPUT_INTEGER_BITS = 5
SOFTMAX_ACCUM_BITS = 12


def softmax_params(input_scale: float, beta: float = 1.0) -> tuple[int, int, int]:
    """(multiplier, left_shift, diff_min) from TFLite PreprocessSoftmaxScaling and
    CalculateInputRadius with 5 integer bits (softmax_common.cc)."""
    ib = SOFTMAX_INPUT_INTEGER_BITS
    real = min(beta * float(np.float32(input_scale)) * (1 << (31 - ib)), (1 << 31) - 1.0)
    m, shift = quantize_multiplier(real)
    max_input_rescaled = 1.0 * ((1 << ib) - 1) * (1 << (31 - ib)) / (1 << shift)
    return m, shift, -int(math.floor(max_input_rescaled))


def exp_on_negative_values(val: np.ndarray) -> np.ndarray:
    """arm_nn_exp_on_negative_values / gemmlowp exp_on_negative_values for Q5.26 → Q0.31."""
    val = np.asarray(val, np.int64)
    mul = doubling_high_mult
    div = divide_by_power_of_two
    mod_minus_quarter = (val & ((1 << 24) - 1)) - (1 << 24)
    remainder = mod_minus_quarter - val
    x = wrap32(mod_minus_quarter << 5) + (1 << 28)
    x2 = mul(x, x)
    inner = div(mul(div(mul(x2, x2), 2) + mul(x2, x), 715827883) + x2, 1)
    result = 1895147668 + mul(1895147668, x + inner)
    for i, factor in enumerate((1672461947, 1302514674, 790015084, 290630308, 39332535,
                                720401, 242)):
        hit = (remainder & (1 << (24 + i))) != 0
        result = np.where(hit, mul(result, factor), result)
    return np.where(val == 0, INT32_MAX, result)


def _mult_by_power_of_two(val: np.ndarray, exp: int) -> np.ndarray:
    """arm_nn_mult_by_power_of_two: saturating left shift."""
    val = np.asarray(val, np.int64)
    thresh = (1 << (31 - exp)) - 1
    result = wrap32(val << exp)
    result = np.where(val > thresh, INT32_MAX, result)
    return np.where(val < -thresh, INT32_MIN, result)


def one_over_one_plus_x(val: np.ndarray) -> np.ndarray:
    """arm_nn_one_over_one_plus_x_for_x_in_0_1 (gemmlowp): Newton reciprocal, 3 iterations."""
    mul = doubling_high_mult
    s = np.asarray(val, np.int64) + INT32_MAX
    half_den = np.where(s >= 0, (s + 1) // 2, -((-(s - 1)) // 2))
    x = 1515870810 + mul(half_den, -1010580540)
    for _ in range(3):
        x = x + _mult_by_power_of_two(mul(x, (1 << 29) - mul(half_den, x)), 2)
    return _mult_by_power_of_two(x, 1)


def _clz32(v: np.ndarray) -> np.ndarray:
    v = np.asarray(v, np.int64) & 0xFFFFFFFF
    out = np.full(v.shape, 32, np.int64)
    nz = v > 0
    out[nz] = 31 - np.floor(np.log2(v[nz].astype(np.float64))).astype(np.int64)
    # log2 of values just below a power of two can round up in float64; fix exactly.
    too_far = nz & ((v >> (31 - out).clip(0, 31)) == 0)
    out[too_far] += 1
    return out


def softmax_s8(x: np.ndarray, multiplier: int, left_shift: int, diff_min: int,
               out_bits: int = 8) -> np.ndarray:
    """arm_softmax_s8 / TFLM int8 softmax over the last axis; output zp −128, scale 1/256.

    For b-bit outputs the same result is produced at 8 bits and then requires the caller's
    output parameters to be 1/256, −128 (TFLM's constraint).
    """
    x = np.asarray(x, np.int64)
    diff = x - x.max(axis=-1, keepdims=True)
    valid = diff >= diff_min
    scaled = doubling_high_mult(wrap32(diff * (1 << left_shift)), multiplier)
    exps = exp_on_negative_values(scaled)
    total = np.where(valid, divide_by_power_of_two(exps, SOFTMAX_ACCUM_BITS), 0).sum(
        axis=-1, keepdims=True)
    headroom = _clz32(total)
    shifted = np.where(total > 0, wrap32(total << headroom), 0) - (1 << 31)
    shifted_scale = one_over_one_plus_x(wrap32(shifted))
    bits_over_unit = SOFTMAX_ACCUM_BITS - headroom + 23
    res = divide_by_power_of_two(doubling_high_mult(shifted_scale, exps), bits_over_unit) - 128
    res = np.clip(res, -128, 127)
    return np.where(valid, res, -128)


# -- sub-byte packing (DESIGN §4.2) --------------------------------------------------------------

def pack(values: np.ndarray, bits: int) -> np.ndarray:
    """Pack b-bit values along the flattened order: element k in bits k·b … k·b+b−1 of a
    little-endian bit stream (byte i holds stream bits 8i … 8i+7) (DESIGN §4.2, §7.4).

    int4: element 2k in the low nibble of byte k (CMSIS-NN's order); int2: element 4k+j in bits
    2j..2j+1; 8 bits: plain int8 bytes; 3-bit weight codes straddle bytes. Signed values keep
    their low b bits (two's complement), unsigned codes are stored as they are. No per-row
    padding; the last byte is zero-filled.
    """
    flat = np.asarray(values, np.int64).reshape(-1)
    if bits == 8:
        return flat.astype(np.int8).view(np.uint8)
    mask = (1 << bits) - 1
    if 8 % bits:
        stream = (((flat & mask)[:, None] >> np.arange(bits)) & 1).astype(np.uint8)
        return np.packbits(stream.reshape(-1), bitorder="little")
    per = 8 // bits
    padded = np.zeros(-(-flat.size // per) * per, np.int64)
    padded[:flat.size] = flat & mask
    lanes = padded.reshape(-1, per) << (np.arange(per) * bits)
    return lanes.sum(axis=1).astype(np.uint8)


def unpack(buf: np.ndarray, bits: int, count: int, signed: bool = True) -> np.ndarray:
    """Inverse of `pack`: the first `count` b-bit values, sign-extended to int8 (`signed`) or
    as unsigned codes (uint8)."""
    raw = np.asarray(buf, np.uint8)
    if bits == 8:
        return (raw.view(np.int8) if signed else raw)[:count].copy()
    if 8 % bits:
        stream = np.unpackbits(raw, bitorder="little")[:count * bits].astype(np.int64)
        vals = (stream.reshape(count, bits) << np.arange(bits)).sum(axis=1)
    else:
        per = 8 // bits
        lanes = (raw[:, None].astype(np.int64) >> (np.arange(per) * bits)) & ((1 << bits) - 1)
        vals = lanes.reshape(-1)[:count]
    if not signed:
        return vals.astype(np.uint8)
    sign = 1 << (bits - 1)
    return ((vals ^ sign) - sign).astype(np.int8)


def mean_params(input_scale: float, output_scale: float, count: int) -> tuple[int, int]:
    """TFLM int8 MEAN's (M, S) (reference_ops::QuantizedMeanOrSum, reduce.h).

    (M0, S0) = QuantizeMultiplier(s_in/s_out) with both scales float32 widened to double;
    then with k = min(floor(log2 n), 32, 31 + S0): M = (M0·2^k) div n (int64, truncating),
    S = S0 − k, so that requant(sum, M, S) ≈ (s_in/s_out)·sum/n.
    """
    m0, s0 = quantize_multiplier(float(np.float64(np.float32(input_scale))
                                       / np.float64(np.float32(output_scale))))
    k = min(int(count).bit_length() - 1, 32, 31 + s0)
    return int((m0 << k) // int(count)), int(s0 - k)


def mean_quantized(total: np.ndarray, count: int, input_zp: int, multiplier: int, shift: int,
                   output_zp: int, act_min: int, act_max: int) -> np.ndarray:
    """TFLM int8 MEAN after the sum: clamp(requant(int32(sum − n·zp_in), M, S) + zp_out)."""
    shifted = wrap32(np.asarray(total, np.int64) - int(input_zp) * int(count))
    y = requantize(shifted, multiplier, shift) + output_zp
    return np.clip(y, act_min, act_max)


def bilinear_int_taps(in_size: int, out_size: int, align_corners: bool,
                      half_pixel_centers: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(lower, upper, fraction in 1/1024) per output index of TFLM's int8 ResizeBilinear
    (reference_ops::ResizeBilinearInteger, ComputeInterpolationValuesInteger): scale_10 =
    (1024·in + out/2) div out, or (1024·(in−1) + (out−1)/2) div (out−1) with align_corners;
    v = o·scale_10 (+ scale_10/2 − 512 with half-pixel centres); lower = max(v div 1024, 0),
    upper = min((v + 1023) div 1024, in−1) (C division, truncating); fraction = v − 1024·lower."""
    def cdiv(a: np.ndarray, b: int) -> np.ndarray:
        return np.sign(a) * (np.abs(a) // b)

    if align_corners and out_size > 1:
        scale = (1024 * (in_size - 1) + (out_size - 1) // 2) // (out_size - 1)
    else:
        scale = (1024 * in_size + out_size // 2) // out_size
    o = np.arange(out_size, dtype=np.int64)
    v = o * scale + (scale // 2 - 512 if half_pixel_centers else 0)
    lo = np.maximum(cdiv(v, 1024), 0)
    hi = np.minimum(cdiv(v + 1023, 1024), in_size - 1)
    return lo, hi, v - 1024 * lo


def resize_bilinear_int(x: np.ndarray, rows: tuple, cols: tuple) -> np.ndarray:
    """TFLM's int8 bilinear on an NHWC batch, given `bilinear_int_taps` per axis:
    s = Σ X[y_i, x_j]·wy_i·wx_j (weights 1024 − f and f), then (s ± 2^19) / 2^20 with C's
    truncating division (halves away from zero; TFLM without TFLITE_SINGLE_ROUNDING)."""
    y0, y1, fy = (np.asarray(a, np.int64) for a in rows)
    x0, x1, fx = (np.asarray(a, np.int64) for a in cols)
    x = np.asarray(x, np.int64)
    wy0, wy1 = (1024 - fy)[None, :, None, None], fy[None, :, None, None]
    wx0, wx1 = (1024 - fx)[None, None, :, None], fx[None, None, :, None]
    top, bottom = x[:, y0], x[:, y1]
    s = (top[:, :, x0] * wy0 * wx0 + bottom[:, :, x0] * wy1 * wx0
         + top[:, :, x1] * wy0 * wx1 + bottom[:, :, x1] * wy1 * wx1)
    r = np.where(s > 0, s + (1 << 19), s - (1 << 19))
    return np.sign(r) * (np.abs(r) >> 20)
