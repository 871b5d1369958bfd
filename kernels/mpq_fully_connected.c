/* mpq_fully_connected.c: mpq_fully_connected.
 *
 * Part of mpq's portable kernel library (API and formulas: mpq_kernels.h; shared helpers:
 * mpq_support.h).
 */
#include "mpq_support.h"

/* -- fully connected ------------------------------------------------------------------------ */

/* The outputs of mpq_fully_connected (arguments checked), in pairs as the convolution's
   channels (mpq__dot2): linear weights (t NULL), a tabled filter's codes (t its tables), or
   8-bit CODEBOOK codes one by one. */
static void mpq__fc(const mpq_fc_params *p, const mpq_filter *f, const mpq_channel_quant *q,
                    const mpq_view *in, const mpq_view *out, const mpq__wtab *t)
{
    const uint8_t *src = (const uint8_t *)in->data;
    const uint8_t *wts = (const uint8_t *)f->data;
    uint8_t *dst = (uint8_t *)out->data;
    const int32_t k = f->h * f->w * f->c;
    const int pairs = f->format == MPQ_WFMT_LINEAR || t != NULL;
    int32_t o, r, y, run, rows_in;
    /* The flattened input is one run when the view covers whole stored rows, else one run of
       W*C elements per row. */
    if (in->x0 == 0 && in->stored_w == in->w) {
        run = k;
        rows_in = 1;
    } else {
        run = in->w * in->c;
        rows_in = in->h;
    }
    for (o = 0; o < f->n; o += 2) {
        const int32_t rows = o + 1 < f->n ? 2 : 1;
        const uint32_t wk0 = (uint32_t)o * (uint32_t)k;
        const uint32_t wk1 = wk0 + (uint32_t)(rows - 1) * (uint32_t)k;
        uint32_t acc[2];
        acc[0] = q->bias != NULL ? (uint32_t)q->bias[o] : 0u;
        acc[1] = q->bias != NULL ? (uint32_t)q->bias[o + rows - 1] : 0u;
        for (y = 0; y < rows_in; ++y) {
            const uint32_t xk = mpq__at(in, y, 0);
            const uint32_t off = (uint32_t)(y * run);
            if (pairs) {
                mpq__dot2(src, in->bits, xk, p->input_zp, wts, f->bits, t, wk0 + off,
                          wk1 + off, run, acc);
            } else {
                for (r = 0; r < rows; ++r) {
                    acc[r] += mpq__dot_any(src, in->bits, xk, p->input_zp, f,
                                           (r == 0 ? wk0 : wk1) + off, run);
                }
            }
        }
        for (r = 0; r < rows; ++r) {
            const int32_t oc = (o + r) % out->c;
            const int32_t ox = ((o + r) / out->c) % out->w;
            const int32_t oy = (o + r) / (out->c * out->w);
            mpq__st(dst, out->bits, mpq__at(out, oy, ox) + (uint32_t)oc,
                    mpq__output(acc[r], q->multiplier[o + r], q->shift[o + r], p->output_zp,
                                p->act_min, p->act_max));
        }
    }
}

/* mpq__fc with the tables of a tabled filter, built in this frame. */
static MPQ_NOINLINE void mpq__fc_tab(const mpq_fc_params *p, const mpq_filter *f,
                                     const mpq_channel_quant *q, const mpq_view *in,
                                     const mpq_view *out)
{
    mpq__wtab tab;
    mpq__wtab_build(f, &tab);
    mpq__fc(p, f, q, in, out, &tab);
}

int mpq_fully_connected(const mpq_fc_params *p, const mpq_filter *f, const mpq_channel_quant *q,
                        const mpq_view *in, const mpq_view *out)
{
    int32_t k;
    int err;
    if (p == NULL || f == NULL || f->data == NULL || q == NULL || q->multiplier == NULL
        || q->shift == NULL) {
        return MPQ_ERR_ARG;
    }
    if ((err = mpq__view_check(in)) != MPQ_OK || (err = mpq__view_check(out)) != MPQ_OK
        || (err = mpq__filter_ok(f)) != MPQ_OK) {
        return err;
    }
    k = f->h * f->w * f->c;
    if (f->n < 1 || f->h < 1 || f->w < 1 || f->c < 1 || k != in->h * in->w * in->c
        || f->n != out->h * out->w * out->c || !mpq__in_range(p->input_zp, in->bits)
        || !mpq__act_ok(p->act_min, p->act_max, out->bits) || in->data == out->data) {
        return MPQ_ERR_ARG;
    }
    if (mpq__tabled(f)) {
        mpq__fc_tab(p, f, q, in, out);
    } else {
        mpq__fc(p, f, q, in, out, NULL);
    }
    return MPQ_OK;
}
