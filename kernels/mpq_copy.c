/* mpq_copy.c: mpq_copy_view.
 *
 * Part of mpq's portable kernel library (API and formulas: mpq_kernels.h; shared helpers:
 * mpq_support.h).
 */
#include "mpq_support.h"

/* -- copy ------------------------------------------------------------------------------------- */

int mpq_copy_view(const mpq_view *src, const mpq_view *dst, int32_t dst_c0)
{
    const uint8_t *ps;
    uint8_t *pd;
    int32_t y, x, i, n, cols;
    const int32_t bits = src != NULL ? src->bits : 0;
    int err;
    if ((err = mpq__view_check(src)) != MPQ_OK || (err = mpq__view_check(dst)) != MPQ_OK) {
        return err;
    }
    if (dst->bits != bits) {
        return MPQ_ERR_BITS;
    }
    if (src->h != dst->h || src->w != dst->w || dst_c0 < 0 || dst_c0 + src->c > dst->c) {
        return MPQ_ERR_ARG;
    }
    ps = (const uint8_t *)src->data;
    pd = (uint8_t *)dst->data;
    /* Whole rows are contiguous on both sides when every channel is copied. */
    if (src->c == dst->c) {
        n = src->w * src->c;
        cols = 1;
    } else {
        n = src->c;
        cols = src->w;
    }
    for (y = 0; y < src->h; ++y) {
        for (x = 0; x < cols; ++x) {
            const uint32_t ks = mpq__at(src, y, x);
            const uint32_t kd = mpq__at(dst, y, x) + (uint32_t)dst_c0;
            /* Byte-aligned runs of whole bytes copy as bytes, at any bit width. */
            if (((ks * (uint32_t)bits) & 7u) == 0 && ((kd * (uint32_t)bits) & 7u) == 0
                && (((uint32_t)n * (uint32_t)bits) & 7u) == 0) {
                memcpy(pd + (kd * (uint32_t)bits >> 3), ps + (ks * (uint32_t)bits >> 3),
                       (size_t)n * (size_t)bits / 8u);
            } else {
                for (i = 0; i < n; ++i) {
                    mpq__st(pd, bits, kd + (uint32_t)i, mpq__ld(ps, bits, ks + (uint32_t)i));
                }
            }
        }
    }
    return MPQ_OK;
}
