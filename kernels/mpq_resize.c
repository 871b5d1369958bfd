/* mpq_resize.c: mpq_resize_nearest.
 *
 * Part of mpq's portable kernel library (API and formulas: mpq_kernels.h; shared helpers:
 * mpq_support.h).
 */
#include "mpq_support.h"

/* -- nearest-neighbour resize ----------------------------------------------------------------- */

int mpq_resize_nearest(const mpq_resize_params *p, const mpq_view *in, const mpq_view *out)
{
    int32_t oy, ox, i;
    const uint8_t *src;
    uint8_t *dst;
    int err;
    if (p == NULL || p->rows == NULL || p->cols == NULL) {
        return MPQ_ERR_ARG;
    }
    if ((err = mpq__view_check(in)) != MPQ_OK || (err = mpq__view_check(out)) != MPQ_OK) {
        return err;
    }
    if (out->bits != in->bits) {
        return MPQ_ERR_BITS;
    }
    if (out->c != in->c || in->data == out->data) {
        return MPQ_ERR_ARG;
    }
    for (oy = 0; oy < out->h; ++oy) {
        if (p->rows[oy] < 0 || p->rows[oy] >= in->h) {
            return MPQ_ERR_ARG;
        }
    }
    for (ox = 0; ox < out->w; ++ox) {
        if (p->cols[ox] < 0 || p->cols[ox] >= in->w) {
            return MPQ_ERR_ARG;
        }
    }
    src = (const uint8_t *)in->data;
    dst = (uint8_t *)out->data;
    for (oy = 0; oy < out->h; ++oy) {
        for (ox = 0; ox < out->w; ++ox) {
            const uint32_t ks = mpq__at(in, p->rows[oy], p->cols[ox]);
            const uint32_t kd = mpq__at(out, oy, ox);
            /* A pixel's channels are contiguous: whole bytes copy as bytes at any bit width. */
            if (((ks * (uint32_t)in->bits) & 7u) == 0 && ((kd * (uint32_t)in->bits) & 7u) == 0
                && (((uint32_t)in->c * (uint32_t)in->bits) & 7u) == 0) {
                memcpy(dst + (kd * (uint32_t)in->bits >> 3), src + (ks * (uint32_t)in->bits >> 3),
                       (size_t)in->c * (size_t)in->bits / 8u);
            } else {
                for (i = 0; i < in->c; ++i) {
                    mpq__st(dst, in->bits, kd + (uint32_t)i, mpq__ld(src, in->bits, ks + (uint32_t)i));
                }
            }
        }
    }
    return MPQ_OK;
}
