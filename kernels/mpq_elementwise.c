/* mpq_elementwise.c: mpq_mul, mpq_sub, mpq_prelu.
 *
 * Part of mpq's portable kernel library (API and formulas: mpq_kernels.h; shared helpers:
 * mpq_support.h).
 */
#include "mpq_support.h"

/* -- broadcasting binary ops ---------------------------------------------------------------- */

/* An operand view that broadcasts to `out`: each of h, w, c equal to the output's or 1. */
static int mpq__broadcasts(const mpq_view *v, const mpq_view *out)
{
    return (v->h == out->h || v->h == 1) && (v->w == out->w || v->w == 1)
           && (v->c == out->c || v->c == 1);
}

/* The checks mpq_mul and mpq_sub share: usable views, broadcastable operands, zero points in
   their inputs' ranges, a storable clamp, aliasing only at equal bits. */
static int mpq__binary_check(const mpq_view *a, const mpq_view *b, const mpq_view *out,
                             int32_t a_zp, int32_t b_zp, int32_t act_min, int32_t act_max)
{
    int err;
    if ((err = mpq__view_check(a)) != MPQ_OK || (err = mpq__view_check(b)) != MPQ_OK
        || (err = mpq__view_check(out)) != MPQ_OK) {
        return err;
    }
    if (!mpq__broadcasts(a, out) || !mpq__broadcasts(b, out) || !mpq__in_range(a_zp, a->bits)
        || !mpq__in_range(b_zp, b->bits) || !mpq__act_ok(act_min, act_max, out->bits)) {
        return MPQ_ERR_ARG;
    }
    if (!mpq__alias_ok(a, out) || !mpq__alias_ok(b, out)) {
        return MPQ_ERR_BITS;
    }
    return MPQ_OK;
}

/* TFLM's mul of one pair of values: clamp(rq((a - zp_a)(b - zp_b), M, S) + zp_o). */
static int32_t mpq__mul_one(const mpq_mul_params *p, int32_t a, int32_t b)
{
    const int32_t prod = (a - p->a_zp) * (b - p->b_zp);
    return mpq__output((uint32_t)prod, p->output_multiplier, p->output_shift, p->output_zp,
                       p->act_min, p->act_max);
}

/* TFLM's sub of one pair of values: add's arithmetic with the scaled operands subtracted (the
   difference wraps like the C int32 expression of the reference). */
static int32_t mpq__sub_one(const mpq_add_params *p, int32_t a, int32_t b)
{
    const int32_t ra = mpq__requantize(mpq__i32((uint32_t)(a - p->a_zp) << p->left_shift),
                                       p->a_multiplier, p->a_shift);
    const int32_t rb = mpq__requantize(mpq__i32((uint32_t)(b - p->b_zp) << p->left_shift),
                                       p->b_multiplier, p->b_shift);
    const int32_t diff = mpq__requantize(mpq__i32((uint32_t)ra - (uint32_t)rb),
                                         p->output_multiplier, p->output_shift);
    return mpq__clamp((int64_t)diff + p->output_zp, p->act_min, p->act_max);
}

/* Walks the output, reading each operand at the broadcast position: mul (sub == NULL) or sub. */
static void mpq__binary_loop(const mpq_mul_params *mul, const mpq_add_params *sub,
                             const mpq_view *a, const mpq_view *b, const mpq_view *out)
{
    const uint8_t *pa = (const uint8_t *)a->data, *pb = (const uint8_t *)b->data;
    uint8_t *po = (uint8_t *)out->data;
    const uint32_t ca = a->c == 1 ? 0u : 1u, cb = b->c == 1 ? 0u : 1u;
    int32_t y, x, ch;
    for (y = 0; y < out->h; ++y) {
        for (x = 0; x < out->w; ++x) {
            const uint32_t ka = mpq__at(a, a->h == 1 ? 0 : y, a->w == 1 ? 0 : x);
            const uint32_t kb = mpq__at(b, b->h == 1 ? 0 : y, b->w == 1 ? 0 : x);
            const uint32_t ko = mpq__at(out, y, x);
            for (ch = 0; ch < out->c; ++ch) {
                const uint32_t c = (uint32_t)ch;
                const int32_t va = mpq__ld(pa, a->bits, ka + c * ca);
                const int32_t vb = mpq__ld(pb, b->bits, kb + c * cb);
                mpq__st(po, out->bits, ko + c,
                        sub != NULL ? mpq__sub_one(sub, va, vb) : mpq__mul_one(mul, va, vb));
            }
        }
    }
}

int mpq_mul(const mpq_mul_params *p, const mpq_view *a, const mpq_view *b, const mpq_view *out)
{
    int err;
    if (p == NULL) {
        return MPQ_ERR_ARG;
    }
    if ((err = mpq__binary_check(a, b, out, p->a_zp, p->b_zp, p->act_min, p->act_max))
        != MPQ_OK) {
        return err;
    }
    mpq__binary_loop(p, NULL, a, b, out);
    return MPQ_OK;
}

int mpq_sub(const mpq_add_params *p, const mpq_view *a, const mpq_view *b, const mpq_view *out)
{
    int err;
    if (p == NULL) {
        return MPQ_ERR_ARG;
    }
    if ((err = mpq__binary_check(a, b, out, p->a_zp, p->b_zp, p->act_min, p->act_max))
        != MPQ_OK) {
        return err;
    }
    if (p->left_shift < 0 || p->left_shift > 31) {
        return MPQ_ERR_ARG;
    }
    mpq__binary_loop(NULL, p, a, b, out);
    return MPQ_OK;
}

/* -- prelu ---------------------------------------------------------------------------------- */

int mpq_prelu(const mpq_prelu_params *p, const mpq_view *in, const mpq_view *out)
{
    const uint8_t *pi;
    uint8_t *po;
    int32_t y, x, ch;
    int err;
    if (p == NULL || p->alpha == NULL) {
        return MPQ_ERR_ARG;
    }
    if ((err = mpq__view_check(in)) != MPQ_OK || (err = mpq__view_check(out)) != MPQ_OK) {
        return err;
    }
    if (in->h != out->h || in->w != out->w || in->c != out->c
        || !mpq__in_range(p->input_zp, in->bits) || !mpq__in_range(p->alpha_zp, 8)
        || !mpq__act_ok(p->act_min, p->act_max, out->bits)) {
        return MPQ_ERR_ARG;
    }
    if (!mpq__alias_ok(in, out)) {
        return MPQ_ERR_BITS;
    }
    pi = (const uint8_t *)in->data;
    po = (uint8_t *)out->data;
    for (y = 0; y < out->h; ++y) {
        for (x = 0; x < out->w; ++x) {
            const uint32_t ki = mpq__at(in, y, x), ko = mpq__at(out, y, x);
            for (ch = 0; ch < out->c; ++ch) {
                const uint32_t c = (uint32_t)ch;
                const int32_t v = mpq__ld(pi, in->bits, ki + c) - p->input_zp;
                const int32_t r = v >= 0
                    ? mpq__requantize(v, p->pos_multiplier, p->pos_shift)
                    : mpq__requantize(v * ((int32_t)p->alpha[ch] - p->alpha_zp),
                                      p->neg_multiplier, p->neg_shift);
                mpq__st(po, out->bits, ko + c,
                        mpq__clamp((int64_t)r + p->output_zp, p->act_min, p->act_max));
            }
        }
    }
    return MPQ_OK;
}
