/* mpq_softmax.c: mpq_softmax.
 *
 * Part of mpq's portable kernel library (API and formulas: mpq_kernels.h; shared helpers:
 * mpq_support.h).
 */
#include "mpq_support.h"

/* -- softmax (gemmlowp fixed point; `mpq.quant.arith.softmax_s8`) ---------------------------- */

#define MPQ_SOFTMAX_ACCUM_BITS 12

/* SaturatingRoundingDoublingHighMul (gemmlowp; arm_nn_doubling_high_mult): (a*b +- 2^30)/2^31
   with C truncating division, the nudge 1 - 2^30 when the signs differ, and
   INT32_MIN*INT32_MIN saturating to INT32_MAX. */
static inline int32_t mpq__dhm(int32_t a, int32_t b)
{
    int64_t prod;
    if (a == INT32_MIN && b == INT32_MIN) {
        return INT32_MAX;
    }
    prod = (int64_t)a * b + (((a < 0) != (b < 0)) ? 1 - (INT64_C(1) << 30) : INT64_C(1) << 30);
    return (int32_t)(prod >= 0 ? prod >> 31 : -((-prod) >> 31));
}

/* arm_nn_mult_by_power_of_two: v*2^e saturated to int32 (e = 1 or 2 here). */
static inline int32_t mpq__mul_pot_sat(int32_t v, int32_t e)
{
    const int32_t thresh = (int32_t)((1u << (31 - e)) - 1u);
    if (v > thresh) {
        return INT32_MAX;
    }
    if (v < -thresh) {
        return INT32_MIN;
    }
    return mpq__i32((uint32_t)v << e);
}

/* gemmlowp exp_on_negative_values for a Q5.26 input <= 0, result in Q0.31
   (`mpq.quant.arith.exp_on_negative_values`): a 4th-order Taylor expansion around -1/8 on
   [-1/4, 0), times exp(-2^k/4) for every bit k of the remainder. The intermediate sums stay
   within int32 by construction of the Q formats (x in [-2^28, 2^28)). */
static int32_t mpq__exp_on_negative(int32_t val)
{
    static const int32_t factors[7] = {1672461947, 1302514674, 790015084, 290630308, 39332535,
                                       720401, 242};
    const int32_t mod_minus_quarter = (val & ((1 << 24) - 1)) - (1 << 24);
    const int32_t remainder = mod_minus_quarter - val;
    const int32_t x = mpq__i32((uint32_t)mod_minus_quarter << 5) + (1 << 28);
    const int32_t x2 = mpq__dhm(x, x);
    const int32_t inner = (int32_t)mpq__rdivpot(
        mpq__dhm((int32_t)mpq__rdivpot(mpq__dhm(x2, x2), 2) + mpq__dhm(x2, x), 715827883) + x2,
        1);
    int32_t result = 1895147668 + mpq__dhm(1895147668, x + inner);
    int32_t i;
    for (i = 0; i < 7; ++i) {
        if (remainder & (1 << (24 + i))) {
            result = mpq__dhm(result, factors[i]);
        }
    }
    return val == 0 ? INT32_MAX : result;
}

/* gemmlowp one_over_one_plus_x_for_x_in_0_1: 1/(1 + x) for x in [0, 1) in Q0.31, by three
   Newton iterations on the half denominator (`mpq.quant.arith.one_over_one_plus_x`). */
static int32_t mpq__one_over_one_plus_x(int32_t val)
{
    const int64_t s = (int64_t)val + INT32_MAX;
    /* (s +- 1)/2 truncated toward zero, without a 64-bit division. */
    const int32_t half_den = (int32_t)(s >= 0 ? (s + 1) >> 1 : -((1 - s) >> 1));
    int32_t x = 1515870810 + mpq__dhm(half_den, -1010580540);
    int32_t i;
    for (i = 0; i < 3; ++i) {
        x = x + mpq__mul_pot_sat(mpq__dhm(x, (1 << 29) - mpq__dhm(half_den, x)), 2);
    }
    return mpq__mul_pot_sat(x, 1);
}

/* exp(diff*beta*s_in) of one row element in Q0.31: the input scaled to Q5.26 by 2^left_shift*M. */
static inline int32_t mpq__softmax_exp(const mpq_softmax_params *p, int32_t diff)
{
    return mpq__exp_on_negative(mpq__dhm(mpq__i32((uint32_t)diff << p->left_shift),
                                         p->multiplier));
}

int mpq_softmax(const mpq_softmax_params *p, const mpq_view *in, const mpq_view *out)
{
    const uint8_t *src;
    uint8_t *dst;
    int32_t y, x, ch;
    int err;
    if (p == NULL) {
        return MPQ_ERR_ARG;
    }
    if ((err = mpq__view_check(in)) != MPQ_OK || (err = mpq__view_check(out)) != MPQ_OK) {
        return err;
    }
    if (out->bits != 8) {
        return MPQ_ERR_BITS;
    }
    if (in->h != out->h || in->w != out->w || in->c != out->c || p->left_shift < 0
        || p->left_shift > 31 || p->diff_min > 0) {
        return MPQ_ERR_ARG;
    }
    src = (const uint8_t *)in->data;
    dst = (uint8_t *)out->data;
    for (y = 0; y < in->h; ++y) {
        for (x = 0; x < in->w; ++x) {
            const uint32_t ki = mpq__at(in, y, x);
            const uint32_t ko = mpq__at(out, y, x);
            int32_t max = -128;
            uint32_t sum = 0;
            int32_t headroom = 0;
            int32_t scale;
            for (ch = 0; ch < in->c; ++ch) {
                const int32_t v = mpq__ld(src, in->bits, ki + (uint32_t)ch);
                max = v > max ? v : max;
            }
            /* sum exp/2^12 (Q12): positive, since the maximum itself contributes 2^19. */
            for (ch = 0; ch < in->c; ++ch) {
                const int32_t diff = mpq__ld(src, in->bits, ki + (uint32_t)ch) - max;
                if (diff >= p->diff_min) {
                    sum += (uint32_t)mpq__rdivpot(mpq__softmax_exp(p, diff),
                                                  MPQ_SOFTMAX_ACCUM_BITS);
                }
            }
            while (!(sum & (0x80000000u >> headroom))) {
                ++headroom;
            }
            /* 1/sum: the sum normalised to [1, 2) as 1 + x with x in Q0.31. */
            scale = mpq__one_over_one_plus_x(mpq__i32((sum << headroom) - 0x80000000u));
            for (ch = 0; ch < in->c; ++ch) {
                const int32_t diff = mpq__ld(src, in->bits, ki + (uint32_t)ch) - max;
                int32_t v = -128;
                if (diff >= p->diff_min) {
                    const int64_t r = mpq__rdivpot(mpq__dhm(scale, mpq__softmax_exp(p, diff)),
                                                   MPQ_SOFTMAX_ACCUM_BITS + 23 - headroom);
                    v = mpq__clamp(r - 128, -128, 127);
                }
                dst[ko + (uint32_t)ch] = (uint8_t)v;
            }
        }
    }
    return MPQ_OK;
}
