/* mpq_dot.c: the dot products of the convolution and fully connected kernels:
 * the quad loops compiled for every pair of bit widths, and the decode tables of
 * CODEBOOK/POW2 filters.
 *
 * Part of mpq's portable kernel library (API and formulas: mpq_kernels.h; shared helpers:
 * mpq_support.h).
 */
#include "mpq_support.h"

/* Fills t for filter f (mpq__tabled): its 2^b values. */
MPQ_NOINLINE void mpq__wtab_build(const mpq_filter *f, mpq__wtab *t)
{
    const uint32_t n = 1u << f->bits;
    uint32_t u;
    for (u = 0; u < n; ++u) {
        t->val[u] = mpq__wval(f, u);
    }
}

static uint64_t mpq__quads_x8_w8(const void *x, int32_t z, const uint8_t *w0,
                                    const uint8_t *w1, int32_t nq)
{
    return mpq__dot2_quads((const uint8_t *)x, 8, z, w0, w1, 8, nq);
}

static uint64_t mpq__quads_x8_w4(const void *x, int32_t z, const uint8_t *w0,
                                    const uint8_t *w1, int32_t nq)
{
    return mpq__dot2_quads((const uint8_t *)x, 8, z, w0, w1, 4, nq);
}

static uint64_t mpq__quads_x8_w2(const void *x, int32_t z, const uint8_t *w0,
                                    const uint8_t *w1, int32_t nq)
{
    return mpq__dot2_quads((const uint8_t *)x, 8, z, w0, w1, 2, nq);
}

static uint64_t mpq__quads_x4_w8(const void *x, int32_t z, const uint8_t *w0,
                                    const uint8_t *w1, int32_t nq)
{
    return mpq__dot2_quads((const uint8_t *)x, 4, z, w0, w1, 8, nq);
}

static uint64_t mpq__quads_x4_w4(const void *x, int32_t z, const uint8_t *w0,
                                    const uint8_t *w1, int32_t nq)
{
    return mpq__dot2_quads((const uint8_t *)x, 4, z, w0, w1, 4, nq);
}

static uint64_t mpq__quads_x4_w2(const void *x, int32_t z, const uint8_t *w0,
                                    const uint8_t *w1, int32_t nq)
{
    return mpq__dot2_quads((const uint8_t *)x, 4, z, w0, w1, 2, nq);
}

static uint64_t mpq__quads_x2_w8(const void *x, int32_t z, const uint8_t *w0,
                                    const uint8_t *w1, int32_t nq)
{
    return mpq__dot2_quads((const uint8_t *)x, 2, z, w0, w1, 8, nq);
}

static uint64_t mpq__quads_x2_w4(const void *x, int32_t z, const uint8_t *w0,
                                    const uint8_t *w1, int32_t nq)
{
    return mpq__dot2_quads((const uint8_t *)x, 2, z, w0, w1, 4, nq);
}

static uint64_t mpq__quads_x2_w2(const void *x, int32_t z, const uint8_t *w0,
                                    const uint8_t *w1, int32_t nq)
{
    return mpq__dot2_quads((const uint8_t *)x, 2, z, w0, w1, 2, nq);
}

static uint64_t mpq__tquads_x8_w4(const void *x, int32_t z, const uint8_t *w0,
                                     const uint8_t *w1, const mpq__wtab *t, int32_t nq)
{
    return mpq__dot2_tquads((const uint8_t *)x, 8, z, w0, w1, 4, t, nq);
}

static uint64_t mpq__tquads_x8_w3(const void *x, int32_t z, const uint8_t *w0,
                                     const uint8_t *w1, const mpq__wtab *t, int32_t nq)
{
    return mpq__dot2_tquads((const uint8_t *)x, 8, z, w0, w1, 3, t, nq);
}

static uint64_t mpq__tquads_x8_w2(const void *x, int32_t z, const uint8_t *w0,
                                     const uint8_t *w1, const mpq__wtab *t, int32_t nq)
{
    return mpq__dot2_tquads((const uint8_t *)x, 8, z, w0, w1, 2, t, nq);
}

static uint64_t mpq__tquads_x4_w4(const void *x, int32_t z, const uint8_t *w0,
                                     const uint8_t *w1, const mpq__wtab *t, int32_t nq)
{
    return mpq__dot2_tquads((const uint8_t *)x, 4, z, w0, w1, 4, t, nq);
}

static uint64_t mpq__tquads_x4_w3(const void *x, int32_t z, const uint8_t *w0,
                                     const uint8_t *w1, const mpq__wtab *t, int32_t nq)
{
    return mpq__dot2_tquads((const uint8_t *)x, 4, z, w0, w1, 3, t, nq);
}

static uint64_t mpq__tquads_x4_w2(const void *x, int32_t z, const uint8_t *w0,
                                     const uint8_t *w1, const mpq__wtab *t, int32_t nq)
{
    return mpq__dot2_tquads((const uint8_t *)x, 4, z, w0, w1, 2, t, nq);
}

static uint64_t mpq__tquads_x2_w4(const void *x, int32_t z, const uint8_t *w0,
                                     const uint8_t *w1, const mpq__wtab *t, int32_t nq)
{
    return mpq__dot2_tquads((const uint8_t *)x, 2, z, w0, w1, 4, t, nq);
}

static uint64_t mpq__tquads_x2_w3(const void *x, int32_t z, const uint8_t *w0,
                                     const uint8_t *w1, const mpq__wtab *t, int32_t nq)
{
    return mpq__dot2_tquads((const uint8_t *)x, 2, z, w0, w1, 3, t, nq);
}

static uint64_t mpq__tquads_x2_w2(const void *x, int32_t z, const uint8_t *w0,
                                     const uint8_t *w1, const mpq__wtab *t, int32_t nq)
{
    return mpq__dot2_tquads((const uint8_t *)x, 2, z, w0, w1, 2, t, nq);
}

/* mpq__quads_x[input bits][weight bits], by mpq__bits_index. */
const mpq__quads_fn mpq__quads_x[3][3] = {
    { mpq__quads_x8_w8, mpq__quads_x8_w4, mpq__quads_x8_w2 },
    { mpq__quads_x4_w8, mpq__quads_x4_w4, mpq__quads_x4_w2 },
    { mpq__quads_x2_w8, mpq__quads_x2_w4, mpq__quads_x2_w2 },
};

/* mpq__tquads_x[input bits][weight bits], by mpq__bits_index and 4 - bits (4, 3, 2). */
const mpq__tquads_fn mpq__tquads_x[3][3] = {
    { mpq__tquads_x8_w4, mpq__tquads_x8_w3, mpq__tquads_x8_w2 },
    { mpq__tquads_x4_w4, mpq__tquads_x4_w3, mpq__tquads_x4_w2 },
    { mpq__tquads_x2_w4, mpq__tquads_x2_w3, mpq__tquads_x2_w2 },
};

/* acc[r] += sum_{i<n} W[wk_r + i]*(X[xk + i] - zp) for r = 0, 1, modulo 2^32: a packed input run
   (xbits) against two rows of linear weights (t NULL) or of a tabled filter's codes (t its
   tables) of wbits, e.g. two outputs of a fully connected layer. Elements up to the input's
   next byte boundary go one by one; from there on, when both weight rows are at a byte
   boundary too, four at a time; the rest one by one. */
void mpq__dot2(const uint8_t *x, int32_t xbits, uint32_t xk, int32_t zp, const uint8_t *w,
               int32_t wbits, const mpq__wtab *t, uint32_t wk0, uint32_t wk1, int32_t n,
               uint32_t acc[2])
{
    int32_t i = 0;
    uint64_t e;
    while (i < n && !mpq__at_byte(xk + (uint32_t)i, xbits)) {
        ++i;
    }
    /* t is tested here, not per element: each loop is compiled for one format. */
    e = t == NULL ? mpq__elems2(x, xbits, xk, zp, NULL, w, wbits, NULL, wk0, wk1, 0, i)
                  : mpq__elems2(x, xbits, xk, zp, NULL, w, wbits, t, wk0, wk1, 0, i);
    acc[0] += (uint32_t)e;
    acc[1] += (uint32_t)(e >> 32);
    if (n - i >= 4 && mpq__at_byte(wk0 + (uint32_t)i, wbits)
        && mpq__at_byte(wk1 + (uint32_t)i, wbits)) {
        const int32_t nq = (n - i) / 4;
        const uint8_t *xq = x + (((xk + (uint32_t)i) * (uint32_t)xbits) >> 3);
        const uint8_t *w0 = w + (((wk0 + (uint32_t)i) * (uint32_t)wbits) >> 3);
        const uint8_t *w1 = w + (((wk1 + (uint32_t)i) * (uint32_t)wbits) >> 3);
        const int32_t z = mpq__quad_z(xbits, zp);
        const uint64_t s = t != NULL
            ? mpq__tquads_x[mpq__bits_index(xbits)][4 - wbits](xq, z, w0, w1, t, nq)
            : mpq__quads_x[mpq__bits_index(xbits)][mpq__bits_index(wbits)](xq, z, w0, w1, nq);
        acc[0] += (uint32_t)s;
        acc[1] += (uint32_t)(s >> 32);
        i += 4 * nq;
    }
    e = t == NULL ? mpq__elems2(x, xbits, xk, zp, NULL, w, wbits, NULL, wk0, wk1, i, n)
                  : mpq__elems2(x, xbits, xk, zp, NULL, w, wbits, t, wk0, wk1, i, n);
    acc[0] += (uint32_t)e;
    acc[1] += (uint32_t)(e >> 32);
}
