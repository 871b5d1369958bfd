/* mpq_support.c: the out-of-line requantisation and add helpers every kernel family shares.
 *
 * Part of mpq's portable kernel library (API and formulas: mpq_kernels.h; shared helpers:
 * mpq_support.h).
 */
#include "mpq_support.h"

/* mpq__requantize for the cases its inline part leaves: a left shift above 31, a right shift
   above 30 or a negative multiplier (64-bit rounding); total over all (M, S). */
MPQ_NOINLINE int32_t mpq__requantize_wide(int32_t acc, int32_t multiplier, int32_t shift)
{
    const int32_t left = shift > 0 ? shift : 0;
    const int32_t right = shift > 0 ? 0 : (shift < -40 ? 40 : -shift);
    const int32_t x = left < 32 ? mpq__i32((uint32_t)acc << left) : 0;
    const int64_t hi = mpq__asr64((int64_t)x * multiplier + (INT64_C(1) << 30), 31);
    return (int32_t)mpq__rdivpot(hi, right);
}

/* TFLM's add of one pair of values (DESIGN sec. 4.1, `mpq.quant.arith.add_quantized`):
   clamp(rq(rq((a - zp_a) << ls, Ma, Sa) + rq((b - zp_b) << ls, Mb, Sb), Mo, So) + zp_o). */
MPQ_NOINLINE int32_t mpq__add_one(const mpq_add_params *p, int32_t a, int32_t b)
{
    const int32_t ra = mpq__requantize(mpq__i32((uint32_t)(a - p->a_zp) << p->left_shift),
                                       p->a_multiplier, p->a_shift);
    const int32_t rb = mpq__requantize(mpq__i32((uint32_t)(b - p->b_zp) << p->left_shift),
                                       p->b_multiplier, p->b_shift);
    const int32_t sum = mpq__requantize(mpq__i32((uint32_t)ra + (uint32_t)rb),
                                        p->output_multiplier, p->output_shift);
    return mpq__clamp((int64_t)sum + p->output_zp, p->act_min, p->act_max);
}
