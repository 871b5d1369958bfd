/* mpq_conv.c: mpq_conv2d, mpq_conv2d_add and mpq_conv2d_scratch_size.
 *
 * Part of mpq's portable kernel library (API and formulas: mpq_kernels.h; shared helpers:
 * mpq_support.h).
 */
#include "mpq_support.h"

/* s_r = sum_{i<4*nq} W_r[i]*col[i] for the weight rows w0, w1 (at byte boundaries), returned as
   mpq__dot2_quads does: the quad loop over an im2col column. With the DSP the column holds
   SMLAD pairs (mpq__im2col): one word of it is (c0, c2), the next (c1, c3), as mpq__quad
   pairs weights. */
static MPQ_INLINE uint64_t mpq__dot2_col_quads(const int16_t *col, const uint8_t *w0,
                                               const uint8_t *w1, int32_t wbits, int32_t nq)
{
    const int32_t wstep = wbits / 2;
#if MPQ_USE_DSP
    const int32_t nzw = mpq__quad_bias(wbits, 0);
    int32_t s0 = 0, s1 = 0;
    for (; nq > 0; --nq, col += 4, w0 += wstep, w1 += wstep) {
        const int32_t ce = mpq__word(col);
        const int32_t co = mpq__word(col + 2);
        int32_t we, wo;
        mpq__quad(w0, wbits, nzw, 1, &we, &wo);
        s0 = mpq__smlad(ce, we, s0);
        s0 = mpq__smlad(co, wo, s0);
        mpq__quad(w1, wbits, nzw, 1, &we, &wo);
        s1 = mpq__smlad(ce, we, s1);
        s1 = mpq__smlad(co, wo, s1);
    }
    return (uint64_t)(uint32_t)s0 | ((uint64_t)(uint32_t)s1 << 32);
#else
    uint32_t a0 = 0, a1 = 0;
#if defined(MPQ_HOST_FAST)
    if (wbits == 8) {
        return mpq__host_dot2_col_w8(col, (const int8_t *)w0, (const int8_t *)w1, 4 * nq);
    }
#endif
    for (; nq > 0; --nq, col += 4, w0 += wstep, w1 += wstep) {
        int32_t wv[4], j;
        mpq__quad4(w0, wbits, 0, wv);
        for (j = 0; j < 4; ++j) {
            a0 += (uint32_t)(col[j] * wv[j]);
        }
        mpq__quad4(w1, wbits, 0, wv);
        for (j = 0; j < 4; ++j) {
            a1 += (uint32_t)(col[j] * wv[j]);
        }
    }
    return (uint64_t)a0 | ((uint64_t)a1 << 32);
#endif
}

static uint64_t mpq__quads_col_w4(const void *col, int32_t z, const uint8_t *w0,
                                  const uint8_t *w1, int32_t nq)
{
    (void)z;
    return mpq__dot2_col_quads((const int16_t *)col, w0, w1, 4, nq);
}

static uint64_t mpq__quads_col_w2(const void *col, int32_t z, const uint8_t *w0,
                                  const uint8_t *w1, int32_t nq)
{
    (void)z;
    return mpq__dot2_col_quads((const int16_t *)col, w0, w1, 2, nq);
}

static uint64_t mpq__tquads_col_w4(const void *col, int32_t z, const uint8_t *w0,
                                   const uint8_t *w1, const mpq__wtab *t, int32_t nq)
{
    (void)z;
    return mpq__dot2_tquads((const uint8_t *)col, 16, 0, w0, w1, 4, t, nq);
}

static uint64_t mpq__tquads_col_w3(const void *col, int32_t z, const uint8_t *w0,
                                   const uint8_t *w1, const mpq__wtab *t, int32_t nq)
{
    (void)z;
    return mpq__dot2_tquads((const uint8_t *)col, 16, 0, w0, w1, 3, t, nq);
}

static uint64_t mpq__tquads_col_w2(const void *col, int32_t z, const uint8_t *w0,
                                   const uint8_t *w1, const mpq__wtab *t, int32_t nq)
{
    (void)z;
    return mpq__dot2_tquads((const uint8_t *)col, 16, 0, w0, w1, 2, t, nq);
}

/* mpq__tquads_col[4 - bits]: the tabled column loops for 4, 3, 2-bit codes. */
static const mpq__tquads_fn mpq__tquads_col[3] = {
    mpq__tquads_col_w4, mpq__tquads_col_w3, mpq__tquads_col_w2,
};

/* acc[r] += sum_{i<n} W[wk_r + i]*col[i] modulo 2^32 for r = 0, 1, element by element: an
   im2col column (already x - zp, in natural order) against two rows of linear weights (t NULL)
   or of a tabled filter's codes (t its tables) whose rows do not start at byte boundaries. */
static void mpq__dot2_col(const int16_t *col, const uint8_t *w, int32_t wbits,
                          const mpq__wtab *t, uint32_t wk0, uint32_t wk1, int32_t n,
                          uint32_t acc[2])
{
    const uint64_t e = t == NULL
        ? mpq__elems2(NULL, 0, 0u, 0, col, w, wbits, NULL, wk0, wk1, 0, n)
        : mpq__elems2(NULL, 0, 0u, 0, col, w, wbits, t, wk0, wk1, 0, n);
    acc[0] += (uint32_t)e;
    acc[1] += (uint32_t)(e >> 32);
}

/* -- convolution --------------------------------------------------------------------------- */

/* 1x1, stride 1, unpadded, output within the input: every tap is in view and the input pixel's
   channels are contiguous, so they are read in place and no scratch is needed. */
static inline int mpq__conv_direct(const mpq_conv_params *p, const mpq_filter *f,
                                   const mpq_view *in, const mpq_view *out)
{
    return f->h == 1 && f->w == 1 && p->stride_h == 1 && p->stride_w == 1 && p->pad_top == 0
           && p->pad_left == 0 && out->h <= in->h && out->w <= in->w;
}

/* Checks what every convolution kernel needs: views, filter and geometry. */
static int mpq__conv_check(const mpq_conv_params *p, const mpq_filter *f, const mpq_view *in,
                           const mpq_view *out)
{
    int err;
    if (p == NULL || f == NULL || f->data == NULL) {
        return MPQ_ERR_ARG;
    }
    if ((err = mpq__view_check(in)) != MPQ_OK || (err = mpq__view_check(out)) != MPQ_OK
        || (err = mpq__filter_ok(f)) != MPQ_OK) {
        return err;
    }
    if (f->n < 1 || f->h < 1 || f->w < 1 || f->c < 1 || p->groups < 1
        || in->c != f->c * p->groups || f->n % p->groups != 0 || out->c != f->n
        || p->stride_h < 1 || p->stride_w < 1 || p->dilation_h < 1 || p->dilation_w < 1
        || p->pad_top < 0 || p->pad_left < 0 || !mpq__in_range(p->input_zp, in->bits)) {
        return MPQ_ERR_ARG;
    }
    /* A convolution reads a window of pixels around each output: writing over its own input
       would destroy pixels still to be read (mpq_depthwise_inplace is the in-place kernel). */
    if (in->data == out->data) {
        return MPQ_ERR_ARG;
    }
    return MPQ_OK;
}

int32_t mpq_conv2d_scratch_size(const mpq_conv_params *p, const mpq_filter *f,
                                const mpq_view *in, const mpq_view *out)
{
    const int err = mpq__conv_check(p, f, in, out);
    if (err != MPQ_OK) {
        return err;
    }
    return mpq__conv_direct(p, f, in, out) ? 0 : 2 * f->h * f->w * f->c;
}

/* dst[i] = X[k + i] - z for i < n, a packed run of any bits: byte by byte once the run is at a
   byte boundary. */
static void mpq__unpack16(const uint8_t *src, int32_t bits, uint32_t k, int32_t n, int32_t z,
                          int16_t *dst)
{
    int32_t i = 0;
    if (bits == 8) {
        const int8_t *s = (const int8_t *)src + k;
        for (; i < n; ++i) {
            dst[i] = (int16_t)(s[i] - z);
        }
        return;
    }
    for (; i < n && !mpq__at_byte(k + (uint32_t)i, bits); ++i) {
        dst[i] = (int16_t)(mpq__ld(src, bits, k + (uint32_t)i) - z);
    }
    {
        const uint8_t *s = src + (((k + (uint32_t)i) * (uint32_t)bits) >> 3);
        const int32_t per = 8 / bits;
        const uint32_t sign = 1u << (bits - 1);
        const uint32_t mask = (sign << 1) - 1u;
        for (; i + per <= n; i += per, ++s) {
            uint32_t b = *s;
            int32_t j;
            for (j = 0; j < per; ++j, b >>= bits) {
                dst[i + j] = (int16_t)((int32_t)((b & mask) ^ sign) - (int32_t)sign - z);
            }
        }
    }
    for (; i < n; ++i) {
        dst[i] = (int16_t)(mpq__ld(src, bits, k + (uint32_t)i) - z);
    }
}

#if MPQ_USE_DSP
/* One tap's run of cg elements (a multiple of 4, from byte s on) as SMLAD pairs into dst. */
static MPQ_INLINE void mpq__quads_to_col(const uint8_t *s, int32_t bits, int32_t nz, int32_t cg,
                                         int16_t *dst)
{
    int32_t ci;
    for (ci = 0; ci < cg; ci += 4, s += bits / 2) {
        int32_t even, odd;
        mpq__quad(s, bits, nz, 0, &even, &odd);
        memcpy(dst + ci, &even, 4);
        memcpy(dst + ci + 2, &odd, 4);
    }
}
#endif

/* The im2col column of output pixel (oy, ox) for the group whose input channels start at c0:
   col[(ky*KW + kx)*Cg + ci] = X[iy, ix, c0 + ci] - input_zp, or 0 for taps out of view (which
   is what padding with input_zp contributes). With `pairs` (the DSP with linear weights) every
   whole block of four is stored as the SMLAD pairs (c0, c2), (c1, c3) that mpq__dot2_col_quads
   reads: directly from mpq__quad when every tap's run is whole quads (Cg a multiple of 4, so
   each run starts at a byte boundary of the input), else by swapping afterwards. */
static void mpq__im2col(const mpq_conv_params *p, const mpq_filter *f, const mpq_view *in,
                        int32_t oy, int32_t ox, int32_t c0, int pairs, int16_t *col)
{
    const uint8_t *src = (const uint8_t *)in->data;
    const int32_t cg = f->c;
    const int32_t bits = in->bits;
    const int32_t zp = p->input_zp;
    const int quad_runs = MPQ_USE_DSP && pairs && cg % 4 == 0;
    const int32_t ix0 = ox * p->stride_w - p->pad_left;
    int16_t *dst = col;
    int32_t ky, kx, ci;
    for (ky = 0; ky < f->h; ++ky) {
        const int32_t iy = oy * p->stride_h - p->pad_top + ky * p->dilation_h;
        uint32_t krow;
        if (iy < 0 || iy >= in->h) {
            memset(dst, 0, (size_t)(f->w * cg) * sizeof(int16_t));
            dst += f->w * cg;
            continue;
        }
        krow = mpq__at(in, iy, 0) + (uint32_t)c0;
        for (kx = 0; kx < f->w; ++kx, dst += cg) {
            const int32_t ix = ix0 + kx * p->dilation_w;
            const uint32_t k = krow + (uint32_t)(ix * in->c);
            if (ix < 0 || ix >= in->w) {
                memset(dst, 0, (size_t)cg * sizeof(int16_t));
            } else if (quad_runs) {
#if MPQ_USE_DSP
                const uint8_t *s = src + ((k * (uint32_t)bits) >> 3);
                const int32_t nz = mpq__quad_bias(bits, zp);
                switch (bits) {
                case 8: mpq__quads_to_col(s, 8, nz, cg, dst); break;
                case 4: mpq__quads_to_col(s, 4, nz, cg, dst); break;
                default: mpq__quads_to_col(s, 2, nz, cg, dst); break;
                }
#endif
            } else if (bits == 8) {
                const int8_t *s = (const int8_t *)src + k;
                for (ci = 0; ci < cg; ++ci) {
                    dst[ci] = (int16_t)(s[ci] - zp);
                }
            } else {
                mpq__unpack16(src, bits, k, cg, zp, dst);
            }
        }
    }
    if (pairs && !quad_runs) {
        const int32_t n = f->h * f->w * cg;
        int32_t i;
        for (i = 0; i + 4 <= n; i += 4) {
            const int16_t t = col[i + 1];
            col[i + 1] = col[i + 2];
            col[i + 2] = t;
        }
    }
}

/* mpq__conv for what the quad loops do not take: 8-bit CODEBOOK weights, and sub-byte weight
   rows or 1x1 input runs that do not start at byte boundaries - element by element, with the
   im2col column in natural order (t: the tables of a tabled filter, else NULL). */
static void mpq__conv_any(const mpq_conv_params *p, const mpq_filter *f,
                          const mpq_channel_quant *q, const mpq_view *in,
                          const mpq_add_params *add, const mpq_view *skip, const mpq_view *out,
                          int16_t *scratch, const mpq__wtab *t)
{
    const uint8_t *src = (const uint8_t *)in->data;
    const uint8_t *wts = (const uint8_t *)f->data;
    uint8_t *dst = (uint8_t *)out->data;
    const uint8_t *sk = add != NULL ? (const uint8_t *)skip->data : NULL;
    const int32_t cout_g = f->n / p->groups;
    const int32_t klen = f->h * f->w * f->c;
    const int direct = mpq__conv_direct(p, f, in, out);
    /* Linear and tabled weights take two rows at a time; 8-bit CODEBOOK ones one by one. */
    const int paired = f->format == MPQ_WFMT_LINEAR || t != NULL;
    int32_t oy, ox, g, o, r, i;
    for (oy = 0; oy < out->h; ++oy) {
        for (ox = 0; ox < out->w; ++ox) {
            const uint32_t ko = mpq__at(out, oy, ox);
            const uint32_t ks = add != NULL ? mpq__at(skip, oy, ox) : 0u;
            for (g = 0; g < p->groups; ++g) {
                const int32_t c0 = g * f->c;
                const uint32_t xk = direct ? mpq__at(in, oy, ox) + (uint32_t)c0 : 0u;
                if (!direct) {
                    mpq__im2col(p, f, in, oy, ox, c0, 0, scratch);
                }
                for (o = g * cout_g; o < (g + 1) * cout_g; o += 2) {
                    const int32_t rows = o + 1 < (g + 1) * cout_g ? 2 : 1;
                    const uint32_t wk0 = (uint32_t)o * (uint32_t)klen;
                    const uint32_t wk1 = wk0 + (uint32_t)(rows - 1) * (uint32_t)klen;
                    uint32_t acc[2];
                    acc[0] = q->bias != NULL ? (uint32_t)q->bias[o] : 0u;
                    acc[1] = q->bias != NULL ? (uint32_t)q->bias[o + rows - 1] : 0u;
                    if (paired && direct) {
                        mpq__dot2(src, in->bits, xk, p->input_zp, wts, f->bits, t, wk0, wk1,
                                  klen, acc);
                    } else if (paired) {
                        mpq__dot2_col(scratch, wts, f->bits, t, wk0, wk1, klen, acc);
                    } else {
                        for (r = 0; r < rows; ++r) {
                            const uint32_t wk = r == 0 ? wk0 : wk1;
                            if (direct) {
                                acc[r] += mpq__dot_any(src, in->bits, xk, p->input_zp, f, wk,
                                                       klen);
                            } else {
                                for (i = 0; i < klen; ++i) {
                                    acc[r] += mpq__wmul(f, wk + (uint32_t)i, scratch[i]);
                                }
                            }
                        }
                    }
                    for (r = 0; r < rows; ++r) {
                        const uint32_t oc = (uint32_t)(o + r);
                        int32_t v = mpq__output(acc[r], q->multiplier[o + r], q->shift[o + r],
                                                p->output_zp, p->act_min, p->act_max);
                        if (add != NULL) {
                            v = mpq__add_one(add, mpq__ld(sk, skip->bits, ks + oc), v);
                        }
                        mpq__st(dst, out->bits, ko + oc, v);
                    }
                }
            }
        }
    }
}

/* What the convolution loop needs, worked out once per call. */
typedef struct mpq__conv_ctx mpq__conv_ctx;

/* The output channels of one group at one pixel (see mpq__conv_group), compiled per bit widths. */
typedef void (*mpq__group_fn)(const mpq__conv_ctx *c, int32_t g, const void *x, uint32_t xk,
                              uint32_t ko, uint32_t ks);

struct mpq__conv_ctx {
    const mpq_conv_params *p;
    const mpq_filter *f;
    const mpq_channel_quant *q;
    const mpq_view *in, *out, *skip;
    const mpq_add_params *add;
    mpq__group_fn group;
    mpq__quads_fn quads;   /* the linear sub-byte loop, or NULL */
    mpq__tquads_fn tquads; /* the tabled loop, or NULL */
    const mpq__wtab *tab;  /* a tabled filter's tables, else NULL */
    int32_t direct, klen, cout_g, z;
    /* Every channel's requantisation takes mpq__requantize's 32-bit path (mpq__requantize32). */
    int32_t fast;
    int32_t add_fast; /* mpq__add_fast_ok(add) */
};

/* mpq__output out of line, for the group loops' rare general case. */
static MPQ_NOINLINE int32_t mpq__output_call(uint32_t acc, int32_t multiplier, int32_t shift,
                                             int32_t zp, int32_t lo, int32_t hi)
{
    return mpq__output(acc, multiplier, shift, zp, lo, hi);
}

/* The output stage of one group's run of channels, copied out of the call's structures so that
   the compiler can keep it in registers across the output stores (a byte store may alias any
   memory it would otherwise reload). 8-bit outputs go straight to their bytes; sub-byte ones
   are gathered into whole bytes (buf holds `bit` bits of the byte at ob). */
typedef struct {
    const int32_t *mult, *shift;
    int32_t fast, lo, hi, zp, obits;
    const mpq_add_params *add;
    const uint8_t *skip;
    int32_t skip_bits, add_fast;
    uint32_t ks;
    uint8_t *out;
    uint8_t *ob;
    uint32_t buf, bit;
} mpq__emitter;

/* sum_{i0<=i<n} W[wk_r + i]*X_i for r = 0, 1 (low and high word, modulo 2^32), X_i being input
   element xk + i minus zp of the packed run src (1x1) or else col[i]: the last klen % 4
   elements of two weight rows, one by one. */
static MPQ_NOINLINE uint64_t mpq__tail2(const uint8_t *src, int32_t xbits, uint32_t xk,
                                        int32_t zp, const int16_t *col, const uint8_t *w,
                                        int32_t wbits, uint32_t wk0, uint32_t wk1, int32_t i0,
                                        int32_t n)
{
    uint32_t a0 = 0, a1 = 0;
    int32_t i;
    if (src == NULL && wbits == 8) {
        const int8_t *v0 = (const int8_t *)w + wk0, *v1 = (const int8_t *)w + wk1;
        for (i = i0; i < n; ++i) {
            a0 += (uint32_t)(col[i] * v0[i]);
            a1 += (uint32_t)(col[i] * v1[i]);
        }
        return (uint64_t)a0 | ((uint64_t)a1 << 32);
    }
    return mpq__elems2(src, xbits, xk, zp, col, w, wbits, NULL, wk0, wk1, i0, n);
}

/* mpq__tail2 for a tabled filter's codes (t its tables). */
static MPQ_NOINLINE uint64_t mpq__ttail2(const uint8_t *src, int32_t xbits, uint32_t xk,
                                         int32_t zp, const int16_t *col, const uint8_t *w,
                                         int32_t wbits, const mpq__wtab *t, uint32_t wk0,
                                         uint32_t wk1, int32_t i0, int32_t n)
{
    return mpq__elems2(src, xbits, xk, zp, col, w, wbits, t, wk0, wk1, i0, n);
}

/* The fused add of mpq__emit, out of line: v plus element k of the skip (`bits`), by
   mpq__add_fast when `fast` (mpq__add_fast_ok). Takes values, not the emitter, so that the
   emitter stays in registers. */
static MPQ_NOINLINE int32_t mpq__emit_add(const mpq_add_params *add, int32_t fast,
                                          const uint8_t *skip, int32_t bits, uint32_t k,
                                          int32_t v)
{
    if (fast) {
        return mpq__add_fast(add, mpq__ld(skip, bits, k), v);
    }
    return mpq__add_one(add, mpq__ld(skip, bits, k), v);
}

/* Prepares e for a run of outputs whose first element is k0 (skip elements from ks on). */
static MPQ_INLINE void mpq__emit_start(const mpq__conv_ctx *c, mpq__emitter *e, uint32_t k0,
                                       uint32_t ks)
{
    e->mult = c->q->multiplier;
    e->shift = c->q->shift;
    e->fast = c->fast;
    e->lo = c->p->act_min;
    e->hi = c->p->act_max;
    e->zp = c->p->output_zp;
    e->obits = c->out->bits;
    e->add = c->add;
    e->skip = c->add != NULL ? (const uint8_t *)c->skip->data : NULL;
    e->skip_bits = c->add != NULL ? c->skip->bits : 8;
    e->add_fast = c->add_fast;
    e->ks = ks;
    e->out = (uint8_t *)c->out->data;
    e->ob = NULL;
    e->buf = 0;
    e->bit = 0;
    if (e->obits != 8) {
        const uint32_t bit = k0 * (uint32_t)e->obits;
        e->ob = e->out + (bit >> 3);
        e->bit = bit & 7u;
        e->buf = e->bit != 0 ? *e->ob & ((1u << e->bit) - 1u) : 0u;
    }
}

/* Writes the last, partial byte of a sub-byte run, keeping the elements after the run. */
static MPQ_INLINE void mpq__emit_end(mpq__emitter *e)
{
    if (e->obits != 8 && e->bit != 0) {
        *e->ob = (uint8_t)((*e->ob & ~((1u << e->bit) - 1u)) | e->buf);
    }
}

/* Output channel o's value from its accumulator (mpq__output; plus the fused add with skip
   element ks + o), stored as element ko + o - the next of the run. `simple` (a constant): an
   8-bit output without add whose requantisation is mpq__requantize32. */
static MPQ_INLINE void mpq__emit(mpq__emitter *e, int32_t o, uint32_t acc, uint32_t ko,
                                 const int simple)
{
    int32_t v;
    if (simple) {
        const int32_t r = mpq__requantize32(mpq__i32(acc), e->mult[o], e->shift[o]);
        e->out[ko + (uint32_t)o] = (uint8_t)mpq__clamp_add(r, e->zp, e->lo, e->hi);
        return;
    }
    if (e->fast) {
        const int32_t r = mpq__requantize32(mpq__i32(acc), e->mult[o], e->shift[o]);
        v = mpq__clamp_add(r, e->zp, e->lo, e->hi);
    } else {
        v = mpq__output_call(acc, e->mult[o], e->shift[o], e->zp, e->lo, e->hi);
    }
    if (e->add != NULL) {
        v = mpq__emit_add(e->add, e->add_fast, e->skip, e->skip_bits, e->ks + (uint32_t)o, v);
    }
    if (e->obits == 8) {
        e->out[ko + (uint32_t)o] = (uint8_t)v;
    } else {
        e->buf |= ((uint32_t)v & ((1u << e->obits) - 1u)) << e->bit;
        e->bit += (uint32_t)e->obits;
        if (e->bit == 8u) {
            *e->ob++ = (uint8_t)e->buf;
            e->buf = 0;
            e->bit = 0;
        }
    }
}

/* The output channels of group g at one pixel (outputs from element ko, skip from ks): pairs
   of weight rows (linear or tabled, wbits, rows at byte boundaries) against x - the input run at
   element xk (direct 1x1, xbits) or the im2col column - by the quad loops, the klen % 4 last
   elements one by one. Sub-byte outputs are gathered into whole bytes: the run of channels is
   contiguous and written by this loop alone; the bytes it shares with its neighbours are
   merged, and (fused over the skip) every byte is written only after its skip elements were
   read. Compiled with the quad loop inlined for 8-bit weights (mpq__group_*, and again for
   `simple` outputs, mpq__emit's common case: mpq__group_*_s), once with the call's quad loop
   `quads` for linear sub-byte weights (mpq__group_quads) and once with its tabled loop
   `tquads` (mpq__group_tquads; c->tab the tables, also for the tail). */
static MPQ_INLINE void mpq__conv_group(const mpq__conv_ctx *c, int32_t g, const void *x,
                                       uint32_t xk, uint32_t ko, uint32_t ks,
                                       const int32_t xbits, const int32_t wbits,
                                       const int direct, const mpq__quads_fn quads,
                                       const mpq__tquads_fn tquads,
                                       const int simple)
{
    const int32_t klen = c->klen;
    const int32_t nq = klen / 4;
    const int32_t rowbytes = klen * wbits / 8;
    const int32_t o_end = (g + 1) * c->cout_g;
    const int32_t *bias = c->q->bias;
    const uint8_t *wts = (const uint8_t *)c->f->data;
    const uint8_t *w0 = wts + g * c->cout_g * rowbytes;
    const uint8_t *src = (const uint8_t *)c->in->data;
    const int32_t z = c->z, zp_in = c->p->input_zp;
    const mpq__wtab *tab = c->tab;
    mpq__emitter e;
    int32_t o = g * c->cout_g;
    mpq__emit_start(c, &e, ko + (uint32_t)o, ks);
    for (; o < o_end; o += 2, w0 += 2 * rowbytes) {
        const int32_t two = o + 1 < o_end;
        const uint8_t *w1 = two ? w0 + rowbytes : w0;
        const uint64_t s = tquads != NULL ? tquads(x, z, w0, w1, tab, nq)
            : quads != NULL ? quads(x, z, w0, w1, nq)
            : direct ? mpq__dot2_quads((const uint8_t *)x, xbits, z, w0, w1, wbits, nq)
                     : mpq__dot2_col_quads((const int16_t *)x, w0, w1, wbits, nq);
        uint32_t acc0 = (uint32_t)s + (bias != NULL ? (uint32_t)bias[o] : 0u);
        uint32_t acc1 = (uint32_t)(s >> 32) + (bias != NULL && two ? (uint32_t)bias[o + 1] : 0u);
        if (4 * nq < klen) {
            const uint32_t wk = (uint32_t)o * (uint32_t)klen;
            const uint32_t wk1 = wk + (two ? (uint32_t)klen : 0u);
            const uint64_t t = tquads != NULL
                ? mpq__ttail2(direct ? src : NULL, xbits, xk, zp_in, (const int16_t *)x, wts,
                              wbits, tab, wk, wk1, 4 * nq, klen)
                : mpq__tail2(direct ? src : NULL, xbits, xk, zp_in, (const int16_t *)x, wts,
                             wbits, wk, wk1, 4 * nq, klen);
            acc0 += (uint32_t)t;
            acc1 += (uint32_t)(t >> 32);
        }
        mpq__emit(&e, o, acc0, ko, simple);
        if (two) {
            mpq__emit(&e, o + 1, acc1, ko, simple);
        }
    }
    mpq__emit_end(&e);
}

static void mpq__group_x8_w8(const mpq__conv_ctx *c, int32_t g, const void *x,
                             uint32_t xk, uint32_t ko, uint32_t ks)
{
    mpq__conv_group(c, g, x, xk, ko, ks, 8, 8, 1, NULL, NULL, 0);
}

static void mpq__group_x4_w8(const mpq__conv_ctx *c, int32_t g, const void *x,
                             uint32_t xk, uint32_t ko, uint32_t ks)
{
    mpq__conv_group(c, g, x, xk, ko, ks, 4, 8, 1, NULL, NULL, 0);
}

static void mpq__group_x2_w8(const mpq__conv_ctx *c, int32_t g, const void *x,
                             uint32_t xk, uint32_t ko, uint32_t ks)
{
    mpq__conv_group(c, g, x, xk, ko, ks, 2, 8, 1, NULL, NULL, 0);
}

static void mpq__group_col_w8(const mpq__conv_ctx *c, int32_t g, const void *x,
                                uint32_t xk, uint32_t ko, uint32_t ks)
{
    mpq__conv_group(c, g, x, xk, ko, ks, 8, 8, 0, NULL, NULL, 0);
}

static void mpq__group_x8_w8_s(const mpq__conv_ctx *c, int32_t g, const void *x,
                             uint32_t xk, uint32_t ko, uint32_t ks)
{
    mpq__conv_group(c, g, x, xk, ko, ks, 8, 8, 1, NULL, NULL, 1);
}

static void mpq__group_x4_w8_s(const mpq__conv_ctx *c, int32_t g, const void *x,
                             uint32_t xk, uint32_t ko, uint32_t ks)
{
    mpq__conv_group(c, g, x, xk, ko, ks, 4, 8, 1, NULL, NULL, 1);
}

static void mpq__group_x2_w8_s(const mpq__conv_ctx *c, int32_t g, const void *x,
                             uint32_t xk, uint32_t ko, uint32_t ks)
{
    mpq__conv_group(c, g, x, xk, ko, ks, 2, 8, 1, NULL, NULL, 1);
}

static void mpq__group_col_w8_s(const mpq__conv_ctx *c, int32_t g, const void *x,
                                uint32_t xk, uint32_t ko, uint32_t ks)
{
    mpq__conv_group(c, g, x, xk, ko, ks, 8, 8, 0, NULL, NULL, 1);
}

static void mpq__group_quads(const mpq__conv_ctx *c, int32_t g, const void *x, uint32_t xk,
                             uint32_t ko, uint32_t ks)
{
    mpq__conv_group(c, g, x, xk, ko, ks, c->in->bits, c->f->bits, c->direct, c->quads, NULL,
                    0);
}

static void mpq__group_tquads(const mpq__conv_ctx *c, int32_t g, const void *x, uint32_t xk,
                              uint32_t ko, uint32_t ks)
{
    mpq__conv_group(c, g, x, xk, ko, ks, c->in->bits, c->f->bits, c->direct, NULL, c->tquads,
                    0);
}

/* sum_{j<nt} W[wk + tix[j]]*(X[koff[j] + ch] - zp) modulo 2^32: one channel of a depthwise
   output pixel over its in-view taps, weights linear (t NULL) or tabled (t their tables). */
static MPQ_INLINE uint32_t mpq__dw_taps(const uint8_t *src, int32_t xbits, const uint32_t *koff,
                                        uint32_t ch, int32_t zp, const uint8_t *w, int32_t wbits,
                                        uint32_t wk, const int32_t *tix, int32_t nt,
                                        const mpq__wtab *t)
{
    uint32_t acc = 0;
    int32_t j;
    for (j = 0; j < nt; ++j) {
        acc += (uint32_t)(mpq__wget(w, wbits, wk + (uint32_t)tix[j], t)
                          * (mpq__ld(src, xbits, koff[j] + ch) - zp));
    }
    return acc;
}

/* Depthwise with channel multiplier 1 and linear or tabled weights (one input and one output
   channel per group): per output pixel the in-view taps are listed once, then every channel
   sums over them reading the input in place - instead of an im2col column and a group call per
   channel. The channels of a pixel are contiguous in the output, so the emitter gathers
   sub-byte outputs as in mpq__conv_group. */
static void mpq__conv_depthwise(const mpq__conv_ctx *c)
{
    const mpq_conv_params *p = c->p;
    const mpq_filter *f = c->f;
    const mpq_view *in = c->in, *out = c->out;
    const uint8_t *src = (const uint8_t *)in->data;
    const uint8_t *wts = (const uint8_t *)f->data;
    const int32_t taps = f->h * f->w;
    const int32_t zp = p->input_zp;
    const int bytes = in->bits == 8 && f->bits == 8;
    uint32_t koff[MPQ_DW_TAPS];
    int32_t tix[MPQ_DW_TAPS];
    int32_t oy, ox, ky, kx, ch, j, nt;
    for (oy = 0; oy < out->h; ++oy) {
        for (ox = 0; ox < out->w; ++ox) {
            const uint32_t ko = mpq__at(out, oy, ox);
            mpq__emitter e;
            for (ky = 0, nt = 0; ky < f->h; ++ky) {
                const int32_t iy = oy * p->stride_h - p->pad_top + ky * p->dilation_h;
                for (kx = 0; kx < f->w; ++kx) {
                    const int32_t ix = ox * p->stride_w - p->pad_left + kx * p->dilation_w;
                    if (iy >= 0 && iy < in->h && ix >= 0 && ix < in->w) {
                        koff[nt] = mpq__at(in, iy, ix);
                        tix[nt++] = ky * f->w + kx;
                    }
                }
            }
            mpq__emit_start(c, &e, ko, c->add != NULL ? mpq__at(c->skip, oy, ox) : 0u);
            for (ch = 0; ch < out->c; ++ch) {
                const uint32_t wk = (uint32_t)(ch * taps);
                uint32_t acc = c->q->bias != NULL ? (uint32_t)c->q->bias[ch] : 0u;
                if (bytes) {
                    const int8_t *w8 = (const int8_t *)wts + wk;
                    const int8_t *x8 = (const int8_t *)src + ch;
                    for (j = 0; j < nt; ++j) {
                        acc += (uint32_t)(w8[tix[j]] * (x8[koff[j]] - zp));
                    }
                } else if (c->tab == NULL) {
                    acc += mpq__dw_taps(src, in->bits, koff, (uint32_t)ch, zp, wts, f->bits, wk,
                                        tix, nt, NULL);
                } else {
                    acc += mpq__dw_taps(src, in->bits, koff, (uint32_t)ch, zp, wts, f->bits, wk,
                                        tix, nt, c->tab);
                }
                mpq__emit(&e, ch, acc, ko, 0);
            }
            mpq__emit_end(&e);
        }
    }
}

/* The convolution of mpq_conv2d; with `add` it is mpq_conv2d_add: each channel's result is
   added to the skip element right away, and the sum written where the skip element was.
   Linear weights and tabled ones (t: their tables, built by mpq__conv_tab) whose rows start at
   byte boundaries (and 1x1 input runs that do) go through the group loops, two output channels
   at a time; the rest through mpq__conv_any. */
static int mpq__conv(const mpq_conv_params *p, const mpq_filter *f, const mpq_channel_quant *q,
                     const mpq_view *in, const mpq_add_params *add, const mpq_view *skip,
                     const mpq_view *out, int16_t *scratch, const mpq__wtab *t)
{
    const int direct = mpq__conv_direct(p, f, in, out);
    const int32_t klen = f->h * f->w * f->c;
    const uint8_t *src = (const uint8_t *)in->data;
    const int depthwise = f->c == 1 && f->n == p->groups && p->groups > 1
                          && f->h * f->w <= MPQ_DW_TAPS;
    mpq__conv_ctx c;
    int32_t oy, ox, g, o;
    if ((f->format != MPQ_WFMT_LINEAR && t == NULL)
        || (!depthwise && (!mpq__at_byte((uint32_t)klen, f->bits)
                           || (direct && !(mpq__at_byte((uint32_t)in->c, in->bits)
                                           && mpq__at_byte((uint32_t)f->c, in->bits)))))) {
        mpq__conv_any(p, f, q, in, add, skip, out, scratch, t);
        return MPQ_OK;
    }
    c.p = p;
    c.f = f;
    c.q = q;
    c.in = in;
    c.out = out;
    c.skip = skip;
    c.add = add;
    c.direct = direct;
    c.quads = NULL;
    c.tquads = NULL;
    c.tab = t;
    c.fast = 1;
    for (o = 0; o < f->n && c.fast; ++o) {
        c.fast = q->shift[o] <= 0 && q->shift[o] >= -30 && q->multiplier[o] >= 0;
    }
    if (f->bits == 8 && c.fast && add == NULL && out->bits == 8) {
        c.group = !direct ? mpq__group_col_w8_s
                          : in->bits == 8 ? mpq__group_x8_w8_s
                                          : in->bits == 4 ? mpq__group_x4_w8_s : mpq__group_x2_w8_s;
    } else if (f->bits == 8) {
        c.group = !direct ? mpq__group_col_w8
                          : in->bits == 8 ? mpq__group_x8_w8
                                          : in->bits == 4 ? mpq__group_x4_w8 : mpq__group_x2_w8;
    } else if (t != NULL) {
        c.group = mpq__group_tquads;
        c.tquads = direct ? mpq__tquads_x[mpq__bits_index(in->bits)][4 - f->bits]
                          : mpq__tquads_col[4 - f->bits];
    } else {
        c.group = mpq__group_quads;
        c.quads = direct ? mpq__quads_x[mpq__bits_index(in->bits)][mpq__bits_index(f->bits)]
                         : f->bits == 4 ? mpq__quads_col_w4 : mpq__quads_col_w2;
    }
    c.z = mpq__quad_z(in->bits, p->input_zp);
    c.klen = klen;
    c.cout_g = f->n / p->groups;
    c.add_fast = add != NULL && mpq__add_fast_ok(add);
    if (depthwise) {
        mpq__conv_depthwise(&c);
        return MPQ_OK;
    }
    for (oy = 0; oy < out->h; ++oy) {
        for (ox = 0; ox < out->w; ++ox) {
            const uint32_t ko = mpq__at(out, oy, ox);
            const uint32_t ks = add != NULL ? mpq__at(skip, oy, ox) : 0u;
            const uint32_t xk = direct ? mpq__at(in, oy, ox) : 0u;
            for (g = 0; g < p->groups; ++g) {
                const uint32_t xg = xk + (uint32_t)(g * f->c);
                if (direct) {
                    c.group(&c, g, src + ((xg * (uint32_t)in->bits) >> 3), xg, ko, ks);
                } else {
                    mpq__im2col(p, f, in, oy, ox, g * f->c, MPQ_USE_DSP && t == NULL,
                                scratch);
                    c.group(&c, g, scratch, 0u, ko, ks);
                }
            }
        }
    }
    return MPQ_OK;
}

/* mpq__conv with the tables of a tabled filter, built in this frame (mpq__wtab: 1088 bytes of
   stack with the DSP, 64 without) - or without, for any other filter, so that those calls do
   not carry the tables' stack. */
static MPQ_NOINLINE int mpq__conv_tab(const mpq_conv_params *p, const mpq_filter *f,
                                      const mpq_channel_quant *q, const mpq_view *in,
                                      const mpq_add_params *add, const mpq_view *skip,
                                      const mpq_view *out, int16_t *scratch)
{
    mpq__wtab tab;
    mpq__wtab_build(f, &tab);
    return mpq__conv(p, f, q, in, add, skip, out, scratch, &tab);
}

/* mpq__conv, through mpq__conv_tab for a tabled filter. */
static int mpq__conv_run(const mpq_conv_params *p, const mpq_filter *f,
                         const mpq_channel_quant *q, const mpq_view *in,
                         const mpq_add_params *add, const mpq_view *skip, const mpq_view *out,
                         int16_t *scratch)
{
    if (mpq__tabled(f)) {
        return mpq__conv_tab(p, f, q, in, add, skip, out, scratch);
    }
    return mpq__conv(p, f, q, in, add, skip, out, scratch, NULL);
}

int mpq_conv2d(const mpq_conv_params *p, const mpq_filter *f, const mpq_channel_quant *q,
               const mpq_view *in, const mpq_view *out, int16_t *scratch)
{
    const int err = mpq__conv_check(p, f, in, out);
    if (err != MPQ_OK) {
        return err;
    }
    if (q == NULL || q->multiplier == NULL || q->shift == NULL
        || !mpq__act_ok(p->act_min, p->act_max, out->bits)
        || (scratch == NULL && !mpq__conv_direct(p, f, in, out))) {
        return MPQ_ERR_ARG;
    }
    return mpq__conv_run(p, f, q, in, NULL, NULL, out, scratch);
}

int mpq_conv2d_add(const mpq_conv_params *p, const mpq_filter *f, const mpq_channel_quant *q,
                   const mpq_view *in, const mpq_add_params *add, const mpq_view *skip,
                   const mpq_view *out, int16_t *scratch)
{
    int err = mpq__conv_check(p, f, in, out);
    if (err != MPQ_OK || (err = mpq__view_check(skip)) != MPQ_OK) {
        return err;
    }
    /* The intermediate result is never stored, so only its clamp range must be a value the
       add can take (at most 8 bits); its zero point is add->b_zp. */
    if (q == NULL || q->multiplier == NULL || q->shift == NULL || add == NULL
        || !mpq__act_ok(p->act_min, p->act_max, 8)
        || !mpq__act_ok(add->act_min, add->act_max, out->bits)
        || !mpq__in_range(add->a_zp, skip->bits) || !mpq__in_range(add->b_zp, 8)
        || add->left_shift < 0 || add->left_shift > 31
        || skip->h != out->h || skip->w != out->w || skip->c != out->c
        || skip->data == in->data || (scratch == NULL && !mpq__conv_direct(p, f, in, out))) {
        return MPQ_ERR_ARG;
    }
    if (!mpq__alias_ok(skip, out)) {
        return MPQ_ERR_BITS;
    }
    return mpq__conv_run(p, f, q, in, add, skip, out, scratch);
}
