/* mpq_resize.c: mpq_resize_nearest, mpq_resize_bilinear.
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

/* -- bilinear resize (TFLM's int8 arithmetic) -------------------------------------------------- */

/* Checks one axis of taps: lower/upper inside [0, size), |fraction| <= 1024 (TFLM's taps have
   0 <= f < 1024, or -512 <= f < 0 where lower == upper at a half-pixel border). */
static int mpq__taps_ok(const int32_t *lo, const int32_t *hi, const int32_t *f, int32_t n,
                        int32_t size)
{
    int32_t i;
    for (i = 0; i < n; ++i) {
        if (lo[i] < 0 || lo[i] >= size || hi[i] < 0 || hi[i] >= size || f[i] < -1024
            || f[i] > 1024) {
            return 0;
        }
    }
    return 1;
}

int mpq_resize_bilinear(const mpq_bilinear_params *p, const mpq_view *in, const mpq_view *out)
{
    int32_t oy, ox, ch;
    const uint8_t *src;
    uint8_t *dst;
    int err;
    if (p == NULL || p->y0 == NULL || p->y1 == NULL || p->fy == NULL || p->x0 == NULL
        || p->x1 == NULL || p->fx == NULL) {
        return MPQ_ERR_ARG;
    }
    if ((err = mpq__view_check(in)) != MPQ_OK || (err = mpq__view_check(out)) != MPQ_OK) {
        return err;
    }
    if (out->bits != in->bits) {
        return MPQ_ERR_BITS;
    }
    if (out->c != in->c || in->data == out->data
        || !mpq__taps_ok(p->y0, p->y1, p->fy, out->h, in->h)
        || !mpq__taps_ok(p->x0, p->x1, p->fx, out->w, in->w)) {
        return MPQ_ERR_ARG;
    }
    src = (const uint8_t *)in->data;
    dst = (uint8_t *)out->data;
    for (oy = 0; oy < out->h; ++oy) {
        const int64_t wy0 = 1024 - p->fy[oy], wy1 = p->fy[oy];
        for (ox = 0; ox < out->w; ++ox) {
            const int64_t wx0 = 1024 - p->fx[ox], wx1 = p->fx[ox];
            const uint32_t k00 = mpq__at(in, p->y0[oy], p->x0[ox]);
            const uint32_t k10 = mpq__at(in, p->y1[oy], p->x0[ox]);
            const uint32_t k01 = mpq__at(in, p->y0[oy], p->x1[ox]);
            const uint32_t k11 = mpq__at(in, p->y1[oy], p->x1[ox]);
            const uint32_t ko = mpq__at(out, oy, ox);
            for (ch = 0; ch < in->c; ++ch) {
                const uint32_t c = (uint32_t)ch;
                const int64_t s = mpq__ld(src, in->bits, k00 + c) * wy0 * wx0
                                  + mpq__ld(src, in->bits, k10 + c) * wy1 * wx0
                                  + mpq__ld(src, in->bits, k01 + c) * wy0 * wx1
                                  + mpq__ld(src, in->bits, k11 + c) * wy1 * wx1;
                /* (s +- 2^19) / 2^20 truncating: halves away from zero, without a 64-bit
                   division. */
                const int64_t v = s >= 0 ? (s + (1 << 19)) >> 20 : -((-s + (1 << 19)) >> 20);
                mpq__st(dst, in->bits, ko + c, (int32_t)v);
            }
        }
    }
    return MPQ_OK;
}
