"""Unary activations as 256-entry tables: TFLM's int8 arithmetic, evaluated once per input code.

The IR op `activation` (attrs `function` and, where the function has them, `alpha`/`beta`)
covers Sigmoid/Logistic, Tanh, HardSwish, HardSigmoid and LeakyRelu. An int8 (or narrower)
input has at most 256 codes, so the integer reference evaluates the op's integer arithmetic for
every code into a table `T[(uint8)x]` (x the signed code) and the C kernel is a lookup —
bit-exact by construction. The table always has 256 entries, whatever the input's bits (a
b-bit code only reads 2^b of them), so its Flash is a constant 256 B per layer (`TABLE_BYTES`).

Integer semantics, per function (each names the TFLM source it reproduces):

- sigmoid: `reference_integer_ops::Logistic` (integer_ops/logistic.h) with the constants of
  `CalculateArithmeticOpDataLogistic` (micro/kernels/logistic_common.cc): x − zp beyond
  ±radius saturates; else x − zp is rescaled to Q4.27 by (M, S) from frexp(s_in·2^27), run
  through gemmlowp's fixed-point logistic and rounded to units of 1/256 minus 128. Output
  quantisation is fixed at 1/256, −128, 8 bits.
- tanh: `reference_integer_ops::Tanh` (integer_ops/tanh.h; constants of micro/kernels/tanh.cc):
  the same rescaling, gemmlowp's tanh, rounded to units of 1/128. Output fixed at 1/128, 0.
- hard_swish: `reference_ops::HardSwish<int8_t>` (reference/hard_swish.h) with the int16
  fixed-point "reluish" and output multipliers of `HardSwishPrepare`
  (micro/kernels/hard_swish_common.cc). Output calibrated; TFLM needs s_out > s_in/128 (the
  output multiplier's exponent ≤ 0).
- leaky_relu: `reference_ops::QuantizeLeakyRelu` (reference/leaky_relu.h) with the identity and
  alpha multipliers of `CalculateOpDataLeakyRelu` (micro/kernels/leaky_relu_common.cc), float32
  products as TFLM forms them. Output calibrated.
- hard_sigmoid (ONNX HardSigmoid; TFLM has no int8 kernel): mpq's own definition, the float
  function on the dequantised input rounded to the nearest output code:
  q = clamp(round_half_away(clip(α·s_in·(x − zp) + β, 0, 1) / s_out) + zp_out), computed in
  float64 from the float32 scales, α and β. Output calibrated.

For outputs narrower than 8 bits the final clamp is to the output's b-bit range instead of
int8's (the rest of the arithmetic does not depend on the width).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np

from mpq.errors import MpqError
from mpq.quant import arith

if TYPE_CHECKING:
    from mpq.ir import Graph

FUNCTIONS = ("sigmoid", "tanh", "hard_swish", "hard_sigmoid", "leaky_relu")
#: Output quantisation TFLM fixes for int8: (scale, zero point) (logistic_common.cc, tanh.cc).
FIXED_OUTPUT = {"sigmoid": (float(np.float32(1 / 256)), -128),
                "tanh": (float(np.float32(1 / 128)), 0)}
TABLE_BYTES = 256  # one int8 entry per int8 input code, whatever the input's bits
CODES = np.arange(-128, 128, dtype=np.int64)  # the input codes, in table order after (uint8)

_INT16_MIN, _INT16_MAX = -(1 << 15), (1 << 15) - 1


# -- float functions (the float interpreter) ------------------------------------------------------

def float_activation(function: str, x: np.ndarray, alpha: float = 0.0,
                     beta: float = 0.0) -> np.ndarray:
    """The real function: sigmoid 1/(1+e^−x), tanh, hard_swish x·relu6(x+3)/6,
    hard_sigmoid clip(αx+β, 0, 1), leaky_relu x if x ≥ 0 else αx (ONNX and TFLite agree)."""
    x = np.asarray(x, np.float32)
    if function == "sigmoid":
        with np.errstate(over="ignore"):
            return (1.0 / (1.0 + np.exp(-x))).astype(np.float32)
    if function == "tanh":
        return np.tanh(x)
    if function == "hard_swish":
        return x * np.clip(x + np.float32(3), 0, 6) / np.float32(6)
    if function == "hard_sigmoid":
        return np.clip(np.float32(alpha) * x + np.float32(beta), 0, 1)
    if function == "leaky_relu":
        return np.where(x >= 0, x, np.float32(alpha) * x)
    raise MpqError(f"unknown activation function '{function}'")


# -- gemmlowp fixed point (fixedpoint.h), vectorised ----------------------------------------------

def exp_on_negative_values_q(a: np.ndarray, integer_bits: int) -> np.ndarray:
    """gemmlowp exp_on_negative_values for a Q(ib).(31−ib) input ≤ 0, result in Q0.31: the
    Taylor step on [−1/4, 0) times exp(−2^k) for each remainder bit k with k < ib; 0 ↦ 1.
    (`arith.exp_on_negative_values` is the ib = 5 case.)"""
    a = np.asarray(a, np.int64)
    frac = 31 - integer_bits
    quarter = 1 << (frac - 2)
    mod_minus_quarter = (a & (quarter - 1)) - quarter
    remainder = mod_minus_quarter - a
    mul, div = arith.doubling_high_mult, arith.divide_by_power_of_two
    x = arith.wrap32(mod_minus_quarter << integer_bits) + (1 << 28)
    x2 = mul(x, x)
    inner = div(mul(div(mul(x2, x2), 2) + mul(x2, x), 715827883) + x2, 1)
    result = 1895147668 + mul(1895147668, x + inner)
    factors = (1672461947, 1302514674, 790015084, 290630308, 39332535, 720401, 242)
    for exponent, factor in zip(range(-2, 5), factors, strict=True):
        if integer_bits > exponent:
            hit = (remainder & (1 << (frac + exponent))) != 0
            result = np.where(hit, mul(result, factor), result)
    if integer_bits > 5:
        result = np.where(a < -(1 << (36 - integer_bits)), 0, result)
    return np.where(a == 0, arith.INT32_MAX, result)


def _newton_half_reciprocal(a: np.ndarray) -> np.ndarray:
    """The Q2.29 Newton iterate of gemmlowp's one_over_one_plus_x_for_x_in_0_1 and
    one_minus_x_over_one_plus_x_for_x_in_0_1: ≈ 1/half_denominator, half_den = (a + 1)/2."""
    mul = arith.doubling_high_mult
    s = np.asarray(a, np.int64) + arith.INT32_MAX
    half_den = np.where(s >= 0, (s + 1) // 2, -((-(s - 1)) // 2))
    x = 1515870810 + mul(half_den, -1010580540)
    for _ in range(3):
        x = x + arith._mult_by_power_of_two(mul(x, (1 << 29) - mul(half_den, x)), 2)
    return x


def gemmlowp_logistic(a: np.ndarray, integer_bits: int) -> np.ndarray:
    """gemmlowp logistic of a Q(ib) value, Q0.31 result: 1/(1 + exp(−|a|)) for a > 0,
    One − that for a < 0, exactly 1/2 (2^30) for a = 0."""
    a = np.asarray(a, np.int64)
    pos = a > 0
    e = exp_on_negative_values_q(np.where(pos, -a, a), integer_bits)
    r_pos = arith._mult_by_power_of_two(_newton_half_reciprocal(e), 1)
    return np.where(a == 0, 1 << 30, np.where(pos, r_pos, arith.INT32_MAX - r_pos))


def gemmlowp_tanh(a: np.ndarray) -> np.ndarray:
    """gemmlowp tanh of a Q4.27 value, Q0.31 result: (1 − e)/(1 + e) with e = exp(−2|a|)
    (the input's raw value read as Q5.26, i.e. times two), sign restored, 0 ↦ 0."""
    a = np.asarray(a, np.int64)
    neg = a < 0
    e = exp_on_negative_values_q(np.where(neg, a, -a), 5)
    t = arith._mult_by_power_of_two(_newton_half_reciprocal(e) - (1 << 29), 2)
    return np.where(a == 0, 0, np.where(neg, -t, t))


# -- TFLM's constants -----------------------------------------------------------------------------

def input_rescale(input_scale: float, integer_bits: int = 4) -> tuple[int, int, int]:
    """(multiplier, left shift, input radius) of int8 Logistic and Tanh: frexp of
    s_in·2^(31−ib) with the mantissa rounded half away to 31 bits, and
    radius = floor((2^ib − 1)·2^(31−ib) / 2^shift) (CalculateInputRadius). A mantissa that
    rounds to 2^31 (undefined in TFLM's int32 cast) is renormalised."""
    real = float(np.float32(input_scale)) * float(1 << (31 - integer_bits))
    q, shift = math.frexp(real)
    m = int(arith.round_half_away(q * (1 << 31)))
    if m == (1 << 31):
        m, shift = m // 2, shift + 1
    radius = math.floor(((1 << integer_bits) - 1) * float(1 << (31 - integer_bits))
                        / math.ldexp(1.0, shift))
    return m, shift, radius


def _downscale16(m32: int) -> int:
    """DownScaleInt32ToInt16Multiplier (kernels/internal/common.h)."""
    if m32 >= arith.INT32_MAX - (1 << 15):
        return _INT16_MAX
    return (m32 + (1 << 15)) >> 16


def hard_swish_params(input_scale: float, output_scale: float) -> dict[str, int]:
    """HardSwishPrepare's int16 multipliers: hires = s_in/128 (float32), output multiplier
    QM(hires/s_out), reluish multiplier QM(hires/(3/32768)), both downscaled to 16 bits."""
    s_in, s_out = np.float32(input_scale), np.float32(output_scale)
    hires = np.float32(np.float32(1.0 / 128.0) * s_in)
    m_out, e_out = arith.quantize_multiplier(float(np.float32(hires / s_out)))
    m_rel, e_rel = arith.quantize_multiplier(
        float(np.float32(hires / np.float32(3.0 / 32768.0))))
    return {"output_multiplier": _downscale16(m_out), "output_exponent": e_out,
            "reluish_multiplier": _downscale16(m_rel), "reluish_exponent": e_rel}


def leaky_relu_params(input_scale: float, output_scale: float,
                      alpha: float) -> dict[str, int]:
    """CalculateOpDataLeakyRelu: QM(float32(s_in·α)/s_out) and QM(s_in/s_out), the products
    and quotients in float32 as TFLM forms them."""
    s_in, s_out, a = np.float32(input_scale), np.float32(output_scale), np.float32(alpha)
    m_a, s_a = arith.quantize_multiplier(float(np.float32(np.float32(s_in * a) / s_out)))
    m_i, s_i = arith.quantize_multiplier(float(np.float32(s_in / s_out)))
    return {"alpha_multiplier": m_a, "alpha_shift": s_a,
            "identity_multiplier": m_i, "identity_shift": s_i}


# -- int16 helpers of hard_swish.h ----------------------------------------------------------------

def _i16(v: np.ndarray) -> np.ndarray:
    return ((np.asarray(v, np.int64) + (1 << 15)) & 0xFFFF) - (1 << 15)


def _srdhm16(a: np.ndarray, b: int) -> np.ndarray:
    """gemmlowp SaturatingRoundingDoublingHighMul for int16: (a·b ± 2^14)/2^15, truncating."""
    a = np.asarray(a, np.int64)
    ab = a * b
    num = ab + np.where(ab >= 0, 1 << 14, 1 - (1 << 14))
    q = np.where(num >= 0, num >> 15, -((-num) >> 15))
    return np.where((a == b) & (a == _INT16_MIN), _INT16_MAX, _i16(q))


def _sdhm16(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """hard_swish.h SaturatingDoublingHighMul: a·b/2^15 truncated toward zero (no nudge)."""
    a, b = np.asarray(a, np.int64), np.asarray(b, np.int64)
    ab = a * b
    q = np.where(ab >= 0, ab >> 15, -((-ab) >> 15))
    return np.where((a == b) & (a == _INT16_MIN), _INT16_MAX, _i16(q))


def _sat_left_shift16(v: np.ndarray, amount: int) -> np.ndarray:
    return np.clip(np.asarray(v, np.int64) * (1 << amount), _INT16_MIN, _INT16_MAX)


def _rdivpot16(x: np.ndarray, exponent: int) -> np.ndarray:
    """gemmlowp RoundingDivideByPOT on int16: the mask (2^e − 1) is cast to int16 as the C
    template does, so exponents ≥ 16 behave as TFLM's do."""
    x = np.asarray(x, np.int64)
    mask = int(_i16(np.int64((1 << exponent) - 1)))
    threshold = (mask >> 1) + (x < 0)
    return _i16((x >> exponent) + ((x & mask) > threshold))


# -- the integer functions ------------------------------------------------------------------------

def logistic_codes(x: np.ndarray, zero_point: int, input_scale: float) -> np.ndarray:
    """int8 Logistic of input codes `x` (output 1/256, −128)."""
    m, shift, radius = input_rescale(input_scale)
    d = np.asarray(x, np.int64) - zero_point
    inner = np.clip(d, -radius + 1, radius - 1) if radius > 0 else np.zeros_like(d)
    q0 = gemmlowp_logistic(arith.requantize(inner, m, shift), 4)
    y = np.clip(arith.divide_by_power_of_two(q0, 23) - 128, -128, 127)
    return np.where(d <= -radius, -128, np.where(d >= radius, 127, y))


def tanh_codes(x: np.ndarray, zero_point: int, input_scale: float) -> np.ndarray:
    """int8 Tanh of input codes `x` (output 1/128, 0)."""
    m, shift, radius = input_rescale(input_scale)
    d = np.asarray(x, np.int64) - zero_point
    inner = np.clip(d, -radius + 1, radius - 1) if radius > 0 else np.zeros_like(d)
    q0 = gemmlowp_tanh(arith.requantize(inner, m, shift))
    y = np.clip(arith.divide_by_power_of_two(q0, 24), -128, 127)
    return np.where(d <= -radius, -128, np.where(d >= radius, 127, y))


def hard_swish_codes(x: np.ndarray, in_zp: int, out_zp: int, p: dict[str, int],
                     lo: int, hi: int) -> np.ndarray:
    """int8 HardSwish of input codes `x` (hard_swish.h, int16 fixed point throughout)."""
    hires = _i16((np.asarray(x, np.int64) - in_zp) * (1 << 7))
    preshift = _srdhm16(hires, p["output_multiplier"])
    e = p["reluish_exponent"]
    rel = _sat_left_shift16(hires, e - 1) if e > 0 else hires
    rel = _srdhm16(rel, p["reluish_multiplier"])
    if e > 0:
        rel = _sat_left_shift16(rel, 1)
    elif e < 0:
        rel = _rdivpot16(rel, -e)
    rel = (rel + (1 << 15)) >> 1
    out = _rdivpot16(_sdhm16(rel, preshift), -p["output_exponent"])
    return np.clip(_i16(out + out_zp), lo, hi)


def leaky_relu_codes(x: np.ndarray, in_zp: int, out_zp: int, p: dict[str, int],
                     lo: int, hi: int) -> np.ndarray:
    """int8 LeakyRelu of input codes `x`: zp_out + rq(x − zp, identity) for x ≥ zp, else
    zp_out ± rq(x − zp, |alpha multiplier|) (the sign of α applied after)."""
    d = np.asarray(x, np.int64) - in_zp
    ident = arith.requantize(d, p["identity_multiplier"], p["identity_shift"])
    m_a = p["alpha_multiplier"]
    scaled = arith.requantize(d, abs(m_a), p["alpha_shift"])
    alpha = -scaled if m_a < 0 else scaled
    return np.clip(out_zp + np.where(d >= 0, ident, alpha), lo, hi)


def hard_sigmoid_codes(x: np.ndarray, in_scale: float, in_zp: int, out_scale: float,
                       out_zp: int, alpha: float, beta: float, lo: int,
                       hi: int) -> np.ndarray:
    """mpq's HardSigmoid: the float function of the dequantised input, rounded half away to
    the output grid (float64 from float32 scale, α, β)."""
    real = (np.asarray(x, np.float64) - in_zp) * float(np.float32(in_scale))
    y = np.clip(float(np.float32(alpha)) * real + float(np.float32(beta)), 0.0, 1.0)
    q = arith.round_half_away(y / float(np.float32(out_scale))) + out_zp
    return np.clip(q, lo, hi).astype(np.int64)


def activation_table(name: str, function: str, attrs: dict, in_scale: float, in_zp: int,
                     out_scale: float, out_zp: int, out_bits: int) -> np.ndarray:
    """The 256-entry int8 table of one activation layer: entry (uint8)x is the output code of
    input code x (module docstring). MpqError when TFLM could not run the layer."""
    lo, hi = arith.qrange(out_bits)
    if function in FIXED_OUTPUT:
        if (float(np.float32(out_scale)), out_zp, out_bits) != (*FIXED_OUTPUT[function], 8):
            scale, zp = FIXED_OUTPUT[function]
            raise MpqError(f"layer '{name}' ({function}): output must be 8-bit with scale "
                           f"{scale} and zero point {zp}")
        codes = logistic_codes if function == "sigmoid" else tanh_codes
        y = codes(CODES, in_zp, in_scale)
    elif function == "hard_swish":
        p = hard_swish_params(in_scale, out_scale)
        if p["output_exponent"] > 0:
            raise MpqError(f"layer '{name}' (hard_swish): output scale {out_scale:g} must exceed "
                           f"the input scale / 128 ({in_scale / 128:g}), as TFLM requires")
        y = hard_swish_codes(CODES, in_zp, out_zp, p, lo, hi)
    elif function == "leaky_relu":
        p = leaky_relu_params(in_scale, out_scale, attrs["alpha"])
        y = leaky_relu_codes(CODES, in_zp, out_zp, p, lo, hi)
    elif function == "hard_sigmoid":
        y = hard_sigmoid_codes(CODES, in_scale, in_zp, out_scale, out_zp, attrs["alpha"],
                               attrs["beta"], lo, hi)
    else:
        raise MpqError(f"layer '{name}': unknown activation function '{function}'")
    table = np.empty(TABLE_BYTES, np.int8)
    table[CODES & 0xFF] = y
    return table


def tables_flash(graph: Graph) -> int:
    """Flash of the activation layers' tables: `TABLE_BYTES` each (part of the predicted
    parameter Flash, beside weights, biases and multipliers)."""
    return TABLE_BYTES * sum(1 for n in graph.nodes if n.op == "activation")


def lookup(table: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Apply a table to signed codes: T[(uint8)x] (what mpq_activation does)."""
    return np.asarray(table, np.int64)[np.asarray(x, np.int64) & 0xFF]
