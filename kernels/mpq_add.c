/* mpq_add.c: mpq_add.
 *
 * Part of mpq's portable kernel library (API and formulas: mpq_kernels.h; shared helpers:
 * mpq_support.h).
 */
#include "mpq_support.h"

/* -- elementwise add ------------------------------------------------------------------------ */

int mpq_add(const mpq_add_params *p, const mpq_view *a, const mpq_view *b, const mpq_view *out)
{
    const uint8_t *pa, *pb;
    uint8_t *po;
    int32_t y, x, ch;
    int err, fast, bytes;
    if (p == NULL) {
        return MPQ_ERR_ARG;
    }
    if ((err = mpq__view_check(a)) != MPQ_OK || (err = mpq__view_check(b)) != MPQ_OK
        || (err = mpq__view_check(out)) != MPQ_OK) {
        return err;
    }
    if (a->h != out->h || a->w != out->w || a->c != out->c || b->h != out->h || b->w != out->w
        || b->c != out->c || !mpq__in_range(p->a_zp, a->bits) || !mpq__in_range(p->b_zp, b->bits)
        || p->left_shift < 0 || p->left_shift > 31
        || !mpq__act_ok(p->act_min, p->act_max, out->bits)) {
        return MPQ_ERR_ARG;
    }
    if (!mpq__alias_ok(a, out) || !mpq__alias_ok(b, out)) {
        return MPQ_ERR_BITS;
    }
    pa = (const uint8_t *)a->data;
    pb = (const uint8_t *)b->data;
    po = (uint8_t *)out->data;
    /* The usual constants take the 32-bit requantisation (mpq__add_fast); all 8-bit, bytes. */
    fast = mpq__add_fast_ok(p);
    bytes = fast && a->bits == 8 && b->bits == 8 && out->bits == 8;
    for (y = 0; y < out->h; ++y) {
        for (x = 0; x < out->w; ++x) {
            const uint32_t ka = mpq__at(a, y, x);
            const uint32_t kb = mpq__at(b, y, x);
            const uint32_t ko = mpq__at(out, y, x);
            if (bytes) {
                const int8_t *sa = (const int8_t *)pa + ka, *sb = (const int8_t *)pb + kb;
                uint8_t *so = po + ko;
                for (ch = 0; ch < out->c; ++ch) {
                    so[ch] = (uint8_t)mpq__add_fast(p, sa[ch], sb[ch]);
                }
                continue;
            }
            for (ch = 0; ch < out->c; ++ch) {
                const uint32_t c = (uint32_t)ch;
                const int32_t va = mpq__ld(pa, a->bits, ka + c), vb = mpq__ld(pb, b->bits, kb + c);
                mpq__st(po, out->bits, ko + c,
                        fast ? mpq__add_fast(p, va, vb) : mpq__add_one(p, va, vb));
            }
        }
    }
    return MPQ_OK;
}
