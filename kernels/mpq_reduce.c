/* mpq_reduce.c: mpq_mean.
 *
 * Part of mpq's portable kernel library (API and formulas: mpq_kernels.h; shared helpers:
 * mpq_support.h).
 */
#include "mpq_support.h"

/* -- mean ------------------------------------------------------------------------------------- */

/* The extent of one output axis: 1 where the axis is reduced, else the input's. */
static inline int32_t mpq__kept(int32_t reduce, int32_t size)
{
    return reduce ? 1 : size;
}

int mpq_mean(const mpq_mean_params *p, const mpq_view *in, const mpq_view *out)
{
    int32_t oy, ox, oc, y, x, c;
    int32_t nh, nw, nc;
    const uint8_t *src;
    uint8_t *dst;
    int err;
    if (p == NULL) {
        return MPQ_ERR_ARG;
    }
    if ((err = mpq__view_check(in)) != MPQ_OK || (err = mpq__view_check(out)) != MPQ_OK) {
        return err;
    }
    nh = p->reduce_h ? in->h : 1;
    nw = p->reduce_w ? in->w : 1;
    nc = p->reduce_c ? in->c : 1;
    if (out->h != mpq__kept(p->reduce_h, in->h) || out->w != mpq__kept(p->reduce_w, in->w)
        || out->c != mpq__kept(p->reduce_c, in->c) || (int64_t)nh * nw * nc != p->count
        || p->count < 1 || !mpq__act_ok(p->act_min, p->act_max, out->bits)
        || !mpq__in_range(p->input_zp, in->bits) || in->data == out->data) {
        return MPQ_ERR_ARG;
    }
    src = (const uint8_t *)in->data;
    dst = (uint8_t *)out->data;
    for (oy = 0; oy < out->h; ++oy) {
        for (ox = 0; ox < out->w; ++ox) {
            const uint32_t ko = mpq__at(out, oy, ox);
            for (oc = 0; oc < out->c; ++oc) {
                /* TFLM sums in int32 and subtracts n*zp, both wrapping: done in uint32. */
                uint32_t sum = 0u;
                int32_t v;
                for (y = 0; y < nh; ++y) {
                    for (x = 0; x < nw; ++x) {
                        const uint32_t k = mpq__at(in, p->reduce_h ? y : oy, p->reduce_w ? x : ox);
                        for (c = 0; c < nc; ++c) {
                            sum += (uint32_t)mpq__ld(src, in->bits,
                                                     k + (uint32_t)(p->reduce_c ? c : oc));
                        }
                    }
                }
                sum -= (uint32_t)p->input_zp * (uint32_t)p->count;
                v = mpq__requantize(mpq__i32(sum), p->multiplier, p->shift);
                mpq__st(dst, out->bits, ko + (uint32_t)oc,
                        mpq__clamp((int64_t)v + p->output_zp, p->act_min, p->act_max));
            }
        }
    }
    return MPQ_OK;
}
