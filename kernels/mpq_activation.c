/* mpq_activation.c: mpq_activation.
 *
 * Part of mpq's portable kernel library (API and formulas: mpq_kernels.h; shared helpers:
 * mpq_support.h).
 */
#include "mpq_support.h"

/* -- unary activations as a table lookup (`mpq.quant.lut`) ------------------------------------ */

int mpq_activation(const mpq_activation_params *p, const mpq_view *in, const mpq_view *out)
{
    const uint8_t *src;
    uint8_t *dst;
    int32_t y, x, ch, code;
    int err;
    if (p == NULL || p->table == NULL) {
        return MPQ_ERR_ARG;
    }
    if ((err = mpq__view_check(in)) != MPQ_OK || (err = mpq__view_check(out)) != MPQ_OK) {
        return err;
    }
    if (in->h != out->h || in->w != out->w || in->c != out->c) {
        return MPQ_ERR_ARG;
    }
    if (!mpq__alias_ok(in, out)) {
        return MPQ_ERR_BITS;
    }
    /* Every entry an input code can reach must be storable at the output's width. */
    for (code = -(1 << (in->bits - 1)); code < (1 << (in->bits - 1)); ++code) {
        if (!mpq__in_range(p->table[(uint8_t)code], out->bits)) {
            return MPQ_ERR_ARG;
        }
    }
    src = (const uint8_t *)in->data;
    dst = (uint8_t *)out->data;
    for (y = 0; y < out->h; ++y) {
        for (x = 0; x < out->w; ++x) {
            const uint32_t ki = mpq__at(in, y, x);
            const uint32_t ko = mpq__at(out, y, x);
            if (in->bits == 8 && out->bits == 8) {
                const int8_t *s = (const int8_t *)src + ki;
                int8_t *d = (int8_t *)dst + ko;
                for (ch = 0; ch < out->c; ++ch) {
                    d[ch] = p->table[(uint8_t)s[ch]];
                }
                continue;
            }
            for (ch = 0; ch < out->c; ++ch) {
                const int32_t v = mpq__ld(src, in->bits, ki + (uint32_t)ch);
                mpq__st(dst, out->bits, ko + (uint32_t)ch, p->table[(uint8_t)v]);
            }
        }
    }
    return MPQ_OK;
}
