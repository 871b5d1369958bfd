/* mpq_pool.c: mpq_avgpool and mpq_maxpool.
 *
 * Part of mpq's portable kernel library (API and formulas: mpq_kernels.h; shared helpers:
 * mpq_support.h).
 */
#include "mpq_support.h"

/* -- pooling --------------------------------------------------------------------------------- */

/* Checks a pooling call: views of equal C, a window and strides of at least 1, top/left pads
   >= 0, a clamp range the output can store. */
static int mpq__pool_check(const mpq_pool_params *p, const mpq_view *in, const mpq_view *out)
{
    int err;
    if (p == NULL) {
        return MPQ_ERR_ARG;
    }
    if ((err = mpq__view_check(in)) != MPQ_OK || (err = mpq__view_check(out)) != MPQ_OK) {
        return err;
    }
    if (in->c != out->c || p->kernel_h < 1 || p->kernel_w < 1 || p->stride_h < 1
        || p->stride_w < 1 || p->pad_top < 0 || p->pad_left < 0
        || !mpq__act_ok(p->act_min, p->act_max, out->bits)) {
        return MPQ_ERR_ARG;
    }
    return MPQ_OK;
}

/* The in-view part [lo, hi) of the window starting at `start` of length `len` along an axis of
   `size` elements. */
static inline void mpq__window(int32_t start, int32_t len, int32_t size, int32_t *lo,
                               int32_t *hi)
{
    *lo = start < 0 ? 0 : start;
    *hi = start + len > size ? size : start + len;
    if (*hi < *lo) {
        *hi = *lo;
    }
}

int mpq_avgpool(const mpq_pool_params *p, const mpq_view *in, const mpq_view *out)
{
    int32_t oy, ox, ch, y, x, ylo, yhi, xlo, xhi;
    const int err = mpq__pool_check(p, in, out);
    const uint8_t *src;
    uint8_t *dst;
    if (err != MPQ_OK) {
        return err;
    }
    src = (const uint8_t *)in->data;
    dst = (uint8_t *)out->data;
    for (oy = 0; oy < out->h; ++oy) {
        mpq__window(oy * p->stride_h - p->pad_top, p->kernel_h, in->h, &ylo, &yhi);
        for (ox = 0; ox < out->w; ++ox) {
            const uint32_t ko = mpq__at(out, oy, ox);
            int32_t cnt;
            mpq__window(ox * p->stride_w - p->pad_left, p->kernel_w, in->w, &xlo, &xhi);
            cnt = (yhi - ylo) * (xhi - xlo);
            for (ch = 0; ch < out->c; ++ch) {
                int32_t sum = 0;
                int32_t v = 0;
                for (y = ylo; y < yhi; ++y) {
                    for (x = xlo; x < xhi; ++x) {
                        sum += mpq__ld(src, in->bits, mpq__at(in, y, x) + (uint32_t)ch);
                    }
                }
                if (cnt > 0) {
                    v = sum > 0 ? (sum + cnt / 2) / cnt : (sum - cnt / 2) / cnt;
                }
                mpq__st(dst, out->bits, ko + (uint32_t)ch, mpq__clamp(v, p->act_min, p->act_max));
            }
        }
    }
    return MPQ_OK;
}

int mpq_maxpool(const mpq_pool_params *p, const mpq_view *in, const mpq_view *out)
{
    int32_t oy, ox, ch, y, x, ylo, yhi, xlo, xhi;
    const int err = mpq__pool_check(p, in, out);
    const uint8_t *src;
    uint8_t *dst;
    if (err != MPQ_OK) {
        return err;
    }
    src = (const uint8_t *)in->data;
    dst = (uint8_t *)out->data;
    for (oy = 0; oy < out->h; ++oy) {
        mpq__window(oy * p->stride_h - p->pad_top, p->kernel_h, in->h, &ylo, &yhi);
        for (ox = 0; ox < out->w; ++ox) {
            const uint32_t ko = mpq__at(out, oy, ox);
            mpq__window(ox * p->stride_w - p->pad_left, p->kernel_w, in->w, &xlo, &xhi);
            for (ch = 0; ch < out->c; ++ch) {
                /* Below every value, so an empty window clamps to act_min. */
                int32_t m = -129;
                for (y = ylo; y < yhi; ++y) {
                    for (x = xlo; x < xhi; ++x) {
                        const int32_t v = mpq__ld(src, in->bits, mpq__at(in, y, x) + (uint32_t)ch);
                        m = v > m ? v : m;
                    }
                }
                mpq__st(dst, out->bits, ko + (uint32_t)ch, mpq__clamp(m, p->act_min, p->act_max));
            }
        }
    }
    return MPQ_OK;
}
