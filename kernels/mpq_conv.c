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

/* The convolution for what the quad loops do not take (mpq__conv_takes_any): 8-bit CODEBOOK
   weights, and sub-byte weight rows or 1x1 input runs that do not start at byte boundaries -
   element by element, with the im2col column in natural order (t: the tables of a tabled
   filter, built in this frame, else NULL). Out of line, called by the entry points themselves,
   so its frame never sits below mpq__conv's. */
static MPQ_NOINLINE void mpq__conv_any(const mpq_conv_params *p, const mpq_filter *f,
                          const mpq_channel_quant *q, const mpq_view *in,
                          const mpq_add_params *add, const mpq_view *skip, const mpq_view *out,
                          int16_t *scratch)
{
    mpq__wtab tab;
    const mpq__wtab *t = NULL;
    const uint8_t *src = (const uint8_t *)in->data;
    const uint8_t *wts = (const uint8_t *)f->data;
    uint8_t *dst = (uint8_t *)out->data;
    const uint8_t *sk = add != NULL ? (const uint8_t *)skip->data : NULL;
    const int32_t cout_g = f->n / p->groups;
    const int32_t klen = f->h * f->w * f->c;
    const int direct = mpq__conv_direct(p, f, in, out);
    /* Linear and tabled weights take two rows at a time; 8-bit CODEBOOK ones one by one. */
    const int paired = f->format == MPQ_WFMT_LINEAR || mpq__tabled(f);
    int32_t oy, ox, g, o, r, i;
    if (mpq__tabled(f)) {
        mpq__wtab_build(f, &tab);
        t = &tab;
    }
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
    int32_t cols8; /* mpq__conv's cols8: sub-byte inputs unpacked into int8 columns */
    /* Every channel's shift is in [-30, 0] with M >= 0: mpq__requantize32 with no left shift. */
    int32_t fast;
    /* Every channel's shift is in [-30, 31] with M >= 0: mpq__conv_s8's 32-bit requantisation,
       a left shift applied to the accumulator first (mpq__out2). */
    int32_t fast_s8;
    int32_t add_fast; /* mpq__add_fast_ok(add) */
};



/* mpq__requantize out of line, for the group loops' rare general case (a left shift, as 2-bit
   weights give: its 32-bit path too); three arguments, all passed in registers. */
static MPQ_NOINLINE int32_t mpq__requantize_call(uint32_t acc, int32_t multiplier, int32_t shift)
{
    return mpq__requantize(mpq__i32(acc), multiplier, shift);
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
   8-bit output without add whose requantisation is mpq__requantize32 (no left shift). */
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
        v = mpq__clamp_add(mpq__requantize_call(acc, e->mult[o], e->shift[o]), e->zp, e->lo,
                           e->hi);
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
                                        uint32_t wk, const uint8_t *tix, int32_t nt,
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
   sub-byte outputs as in mpq__conv_group. Out of line: its tap lists would otherwise sit in
   mpq__conv's frame, on the stack of every convolution. */
static MPQ_NOINLINE void mpq__conv_depthwise(const mpq__conv_ctx *c)
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
    uint8_t tix[MPQ_DW_TAPS]; /* tap indices, < MPQ_DW_TAPS: bytes keep the frame small */
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
                        tix[nt++] = (uint8_t)(ky * f->w + kx);
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

/* -- the int8 path: 2 output channels x 2 pixels per inner loop ---------------------------- */

/* Four signed 4-bit fields of halfword h (element 0 in bits 0-3) as four int8 lanes of a word
   (lane i = element i, little-endian): the fields spread to one byte each, then each field's
   sign bit copied through the top of its byte: (f & 8) * 0x1E is 0xF0 or 0 per lane, so no
   carry crosses a lane. */
static inline uint32_t mpq__spread4(uint32_t h)
{
    uint32_t t = (h | (h << 8)) & 0x00FF00FFu;
    t = (t | (t << 4)) & 0x0F0F0F0Fu;
    return t | ((t & 0x08080808u) * 0x1Eu);
}

/* Four signed 2-bit fields of byte b (element 0 in bits 0-1) as four int8 lanes, as
   mpq__spread4: (f & 2) * 0x7E is 0xFC or 0 per lane. */
static inline uint32_t mpq__spread2(uint32_t b)
{
    uint32_t t = (b | (b << 12)) & 0x000F000Fu;
    t = (t | (t << 6)) & 0x03030303u;
    return t | ((t & 0x02020202u) * 0x7Eu);
}

/* dst[i] = X[k + i] for i < n, elements of a packed buffer of 4 or 2 bits as int8: element by
   element up to a byte boundary, then four elements per step (mpq__spread4 from two bytes,
   mpq__spread2 from one), then the rest element by element. (Eight or sixteen elements per
   loaded word were 0.5 % faster on ResNet-8's mixed plan and 278 B larger.) */
static void mpq__expand_s8(const uint8_t *src, int32_t bits, uint32_t k, int32_t n, int8_t *dst)
{
    const uint8_t *s;
    uint32_t v;
    int32_t i = 0;
    for (; i < n && !mpq__at_byte(k + (uint32_t)i, bits); ++i) {
        dst[i] = (int8_t)mpq__ld(src, bits, k + (uint32_t)i);
    }
    s = src + (((k + (uint32_t)i) * (uint32_t)bits) >> 3);
    if (bits == 4) {
        for (; i + 4 <= n; i += 4, s += 2) {
            v = mpq__spread4((uint32_t)s[0] | ((uint32_t)s[1] << 8));
            memcpy(dst + i, &v, 4);
        }
    } else {
        for (; i + 4 <= n; i += 4, ++s) {
            v = mpq__spread2(s[0]);
            memcpy(dst + i, &v, 4);
        }
    }
    for (; i < n; ++i) {
        dst[i] = (int8_t)mpq__ld(src, bits, k + (uint32_t)i);
    }
}

/* mpq__im2col_s8 for 4- and 2-bit inputs (mpq_conv2d_unpacked): the same column, each
   element unpacked to int8. */
static void mpq__im2col_sub(const mpq_conv_params *p, const mpq_filter *f, const mpq_view *in,
                            int32_t oy, int32_t ox, int8_t *col)
{
    const uint8_t *src = (const uint8_t *)in->data;
    const int32_t cg = in->c, kw = f->w, run = f->w * in->c, bits = in->bits;
    const int32_t ix0 = ox * p->stride_w - p->pad_left;
    const int whole = p->dilation_w == 1 && ix0 >= 0 && ix0 + kw <= in->w;
    int8_t *dst = col;
    int32_t ky, kx;
    for (ky = 0; ky < f->h; ++ky, dst += run) {
        const int32_t iy = oy * p->stride_h - p->pad_top + ky * p->dilation_h;
        if (iy < 0 || iy >= in->h) {
            memset(dst, (uint8_t)p->input_zp, (size_t)run);
            continue;
        }
        if (whole) {
            mpq__expand_s8(src, bits, mpq__at(in, iy, ix0), run, dst);
            continue;
        }
        for (kx = 0; kx < kw; ++kx) {
            const int32_t ix = ix0 + kx * p->dilation_w;
            if (ix < 0 || ix >= in->w) {
                memset(dst + kx * cg, (uint8_t)p->input_zp, (size_t)cg);
            } else {
                mpq__expand_s8(src, bits, mpq__at(in, iy, ix), cg, dst + kx * cg);
            }
        }
    }
}

/* The im2col column of output pixel (oy, ox) as raw int8 inputs (groups = 1): col[(ky*KW +
   kx)*C + ci] = X[iy, ix, ci], or input_zp for taps out of view (so x - zp is 0 there, what
   padding contributes). A row of taps wholly in view with unit dilation along W is one
   contiguous run of KW*C bytes of the input (the few-channel first layers: one copy per row
   instead of one per tap). */
static void mpq__im2col_x8(const mpq_conv_params *p, const mpq_filter *f, const mpq_view *in,
                           int32_t oy, int32_t ox, int8_t *col)
{
    const int8_t *src = (const int8_t *)in->data;
    const int32_t cg = in->c, kw = f->w, run = f->w * in->c;
    const int32_t zp = p->input_zp;
    const int32_t ix0 = ox * p->stride_w - p->pad_left;
    const int whole = p->dilation_w == 1 && ix0 >= 0 && ix0 + kw <= in->w;
    int8_t *dst = col;
    int32_t ky, kx, i;
    for (ky = 0; ky < f->h; ++ky, dst += run) {
        const int32_t iy = oy * p->stride_h - p->pad_top + ky * p->dilation_h;
        const int8_t *row;
        if (iy < 0 || iy >= in->h) {
            memset(dst, (uint8_t)zp, (size_t)run);
            continue;
        }
        row = src + mpq__at(in, iy, 0);
        if (whole) {
            const int8_t *s = row + ix0 * cg;
            if (run >= 16) {
                memcpy(dst, s, (size_t)run);
            } else {
                for (i = 0; i < run; ++i) {
                    dst[i] = s[i];
                }
            }
            continue;
        }
        for (kx = 0; kx < kw; ++kx) {
            const int32_t ix = ix0 + kx * p->dilation_w;
            int8_t *d = dst + kx * cg;
            if (ix < 0 || ix >= in->w) {
                memset(d, (uint8_t)zp, (size_t)cg);
            } else {
                memcpy(d, row + ix * cg, (size_t)cg);
            }
        }
    }
}

/* The int8 column of output pixel (oy, ox) from an input of any bits. */
static void mpq__im2col_s8(const mpq_conv_params *p, const mpq_filter *f, const mpq_view *in,
                           int32_t oy, int32_t ox, int8_t *col)
{
    if (in->bits != 8) {
        mpq__im2col_sub(p, f, in, oy, ox, col);
    } else {
        mpq__im2col_x8(p, f, in, oy, ox, col);
    }
}

#if MPQ_USE_DSP && !defined(MPQ_EMULATE_DSP)
/* One quad of mpq__block22 by hand (operands named as there): the weight words at w and
   w + kl, the input words at x + kl and x, split into SMLAD pairs and multiplied crosswise;
   w and x step by 4. */
#define MPQ__QUAD22                                   \
    "ldr %[t0], [%[w], %[kl]]\n\t"                    \
    "ldr %[t1], [%[w]], #4\n\t"                       \
    "sxtb16 %[t2], %[t1]\n\t"                         \
    "sxtb16 %[t1], %[t1], ror #8\n\t"                 \
    "sxtb16 %[t3], %[t0]\n\t"                         \
    "sxtb16 %[t0], %[t0], ror #8\n\t"                 \
    "ldr %[t4], [%[x], %[kl]]\n\t"                    \
    "sxtab16 %[t5], %[nz], %[t4]\n\t"                 \
    "smlad %[s10], %[t5], %[t2], %[s10]\n\t"          \
    "smlad %[s11], %[t5], %[t3], %[s11]\n\t"          \
    "sxtab16 %[t4], %[nz], %[t4], ror #8\n\t"         \
    "smlad %[s10], %[t4], %[t1], %[s10]\n\t"          \
    "smlad %[s11], %[t4], %[t0], %[s11]\n\t"          \
    "ldr %[t4], [%[x]], #4\n\t"                       \
    "sxtab16 %[t5], %[nz], %[t4]\n\t"                 \
    "smlad %[s00], %[t5], %[t2], %[s00]\n\t"          \
    "smlad %[s01], %[t5], %[t3], %[s01]\n\t"          \
    "sxtab16 %[t4], %[nz], %[t4], ror #8\n\t"         \
    "smlad %[s00], %[t4], %[t1], %[s00]\n\t"          \
    "smlad %[s01], %[t4], %[t0], %[s01]\n\t"
#endif

/* s[2p + r] += sum_{i<n} W_r[i]*(X_p[i] - zp) modulo 2^32 for the weight rows r = 0, 1 (w0,
   w1 = w0 + kl) and the input runs p = 0, 1 (x0, x1 = x0 + dx): the 2x2 register block of
   CMSIS-NN's arm_nn_mat_mult_kernel_s8_s16, here on int8 runs. With the DSP every word of each
   operand is split once into SMLAD pairs (SXTAB16 adds -zp to the inputs' halfwords) and meets
   two operands of the other kind: 4 loads, 8 extends, 8 SMLAD per 16 MACs. `same` (a
   constant): dx == kl, so that one offset register serves both second operands and the loop
   fits the core's registers. nz = mpq__quad_z(8, zp). */
static MPQ_INLINE void mpq__block22(const int8_t *x0, int32_t dx, const int8_t *w0, int32_t kl,
                                    int32_t n, int32_t zp, int32_t nz, uint32_t s[4],
                                    const int same)
{
    const int32_t d = same ? kl : dx;
#if MPQ_USE_DSP
    int32_t s00 = 0, s01 = 0, s10 = 0, s11 = 0;
    const int8_t *end = w0 + (n & ~3);
#if !defined(MPQ_EMULATE_DSP)
    /* The same loop scheduled by hand: GCC 12 keeps the pointers and the offset on the stack
       (15 live values for 14 registers); here only the loop end is. Two quads per pass:
       47 instructions per 32 MACs. */
    if (same) {
        const int8_t *end8 = w0 + (n & ~7);
        int32_t t0, t1, t2, t3, t4, t5;
        if (w0 != end8) {
            __asm__("1:\n\t" MPQ__QUAD22 MPQ__QUAD22
                    "ldr %[t5], %[end]\n\t"
                    "cmp %[w], %[t5]\n\t"
                    "bne 1b"
                    : [s00] "+r"(s00), [s01] "+r"(s01), [s10] "+r"(s10), [s11] "+r"(s11),
                      [w] "+r"(w0), [x] "+r"(x0), [t0] "=&r"(t0), [t1] "=&r"(t1),
                      [t2] "=&r"(t2), [t3] "=&r"(t3), [t4] "=&r"(t4), [t5] "=&r"(t5)
                    : [kl] "r"(kl), [nz] "r"(nz), [end] "m"(end8)
                    : "cc");
        }
        if (n & 4) {
            __asm__(MPQ__QUAD22
                    : [s00] "+r"(s00), [s01] "+r"(s01), [s10] "+r"(s10), [s11] "+r"(s11),
                      [w] "+r"(w0), [x] "+r"(x0), [t0] "=&r"(t0), [t1] "=&r"(t1),
                      [t2] "=&r"(t2), [t3] "=&r"(t3), [t4] "=&r"(t4), [t5] "=&r"(t5)
                    : [kl] "r"(kl), [nz] "r"(nz)
                    : "cc");
        }
    }
#endif
    for (; w0 != end; x0 += 4, w0 += 4) {
        const int32_t u = mpq__word(w0), v = mpq__word(w0 + kl);
        const int32_t ue = mpq__sxtb16(u), uo = mpq__sxtb16_r8(u);
        const int32_t ve = mpq__sxtb16(v), vo = mpq__sxtb16_r8(v);
        int32_t a = mpq__word(x0), ae, ao;
        ae = mpq__sxtab16(nz, a);
        ao = mpq__sxtab16_r8(nz, a);
        s00 = mpq__smlad(ao, uo, mpq__smlad(ae, ue, s00));
        s01 = mpq__smlad(ao, vo, mpq__smlad(ae, ve, s01));
        a = mpq__word(x0 + d);
        ae = mpq__sxtab16(nz, a);
        ao = mpq__sxtab16_r8(nz, a);
        s10 = mpq__smlad(ao, uo, mpq__smlad(ae, ue, s10));
        s11 = mpq__smlad(ao, vo, mpq__smlad(ae, ve, s11));
    }
    n &= 3;
    s[0] += (uint32_t)s00;
    s[1] += (uint32_t)s01;
    s[2] += (uint32_t)s10;
    s[3] += (uint32_t)s11;
#else
    (void)nz;
#endif
    {
        uint32_t s00 = 0, s01 = 0, s10 = 0, s11 = 0;
        int32_t i;
        for (i = 0; i < n; ++i) {
            const int32_t a = x0[i] - zp, b = x0[d + i] - zp;
            s00 += (uint32_t)(a * w0[i]);
            s01 += (uint32_t)(a * w0[kl + i]);
            s10 += (uint32_t)(b * w0[i]);
            s11 += (uint32_t)(b * w0[kl + i]);
        }
        s[0] += s00;
        s[1] += s01;
        s[2] += s10;
        s[3] += s11;
    }
}


/* Stores v as element ko + o (a byte; with `sub` merged into a 4- or 2-bit output's byte),
   after the fused add of skip element ks + o when `add`. */
static MPQ_INLINE void mpq__put_s8(const mpq__conv_ctx *c, uint8_t *dst, int32_t o, int32_t v,
                                   uint32_t ko, uint32_t ks, const int add, const int sub)
{
    if (add) {
        v = mpq__emit_add(c->add, c->add_fast, (const uint8_t *)c->skip->data, c->skip->bits,
                          ks + (uint32_t)o, v);
    }
    if (sub) {
        mpq__st(dst, c->out->bits, ko + (uint32_t)o, v);
    } else {
        dst[ko + (uint32_t)o] = (uint8_t)v;
    }
}

/* Stores the outputs v0 (channel o) and, when `two`, v1 (channel o + 1) of the pixel at
   element ko of a 4- or 2-bit output: one whole byte when both nibbles of a 4-bit byte are
   this pair's, one merge of a nibble when both fields of a 2-bit pair share it, else element
   by element (mpq__st merges the byte's other elements). */
static MPQ_INLINE void mpq__put2_sub(uint8_t *dst, int32_t bits, uint32_t ko, int32_t o,
                                     int32_t v0, int32_t v1, int two)
{
    const uint32_t k = ko + (uint32_t)o;
    if (bits == 4 && two && (k & 1u) == 0) {
        dst[k >> 1] = (uint8_t)(((uint32_t)v0 & 15u) | (((uint32_t)v1 & 15u) << 4));
        return;
    }
    if (bits == 2 && two && (k & 1u) == 0) { /* one nibble of the byte: one merge */
        const uint32_t sh = (k & 2u) << 1;
        uint8_t *b = dst + (k >> 2);
        *b = (uint8_t)((*b & ~(15u << sh))
                       | ((((uint32_t)v0 & 3u) | (((uint32_t)v1 & 3u) << 2)) << sh));
        return;
    }
    mpq__st(dst, bits, k, v0);
    if (two) {
        mpq__st(dst, bits, k + 1u, v1);
    }
}

/* mpq__conv for 8-bit inputs, weights and outputs, groups = 1 and every shift in [-30, 31]:
   the output pixels in pairs (row-major, a pair may span two rows), each pair against the
   weight rows in pairs (mpq__block22). A 1x1 unit-stride unpadded convolution reads the input
   in place; any other one first copies the pair's two im2col columns, raw int8 (2*klen bytes:
   the scratch mpq_conv2d_scratch_size asks for), so the quad loop is the same. An odd last
   pixel or channel is computed as a pair with itself and stored once. `add`: mpq_conv2d_add.
   `sub`: a 4- or 2-bit output, stored in the same pair order (mpq__put2_sub, after the fused
   add of all four values). */
static MPQ_INLINE void mpq__conv_s8_loop(const mpq__conv_ctx *c, int8_t *scratch,
                                         const int add, const int sub)
{
    const mpq_conv_params *p = c->p;
    const mpq_view *in = c->in, *out = c->out;
    const int8_t *src = (const int8_t *)in->data;
    const int8_t *wts = (const int8_t *)c->f->data;
    const int32_t *bias = c->q->bias;
    const int32_t *mult = c->q->multiplier, *shift = c->q->shift;
    const int32_t klen = c->klen, cout = c->f->n;
    const int32_t zp = p->input_zp, nz = mpq__quad_z(8, zp);
    const int32_t ozp = p->output_zp, lo = p->act_min, hi = p->act_max;
    const int32_t ow = out->w, npix = out->h * out->w;
    uint8_t *dst = (uint8_t *)out->data;
    int32_t pix, o;
    for (pix = 0; pix < npix; pix += 2) {
        const int two_px = pix + 1 < npix;
        const int32_t oy0 = pix / ow, ox0 = pix - oy0 * ow;
        const int32_t oy1 = two_px ? (pix + 1) / ow : oy0;
        const int32_t ox1 = two_px ? pix + 1 - oy1 * ow : ox0;
        const uint32_t ko0 = mpq__at(out, oy0, ox0), ko1 = mpq__at(out, oy1, ox1);
        const uint32_t ks0 = add ? mpq__at(c->skip, oy0, ox0) : 0u;
        const uint32_t ks1 = add ? mpq__at(c->skip, oy1, ox1) : 0u;
        const int8_t *x0, *x1;
        if (c->direct) {
            x0 = src + mpq__at(in, oy0, ox0);
            x1 = src + mpq__at(in, oy1, ox1);
        } else {
            x0 = scratch;
            x1 = scratch + klen;
            mpq__im2col_s8(p, c->f, in, oy0, ox0, scratch);
            if (two_px) {
                mpq__im2col_s8(p, c->f, in, oy1, ox1, scratch + klen);
            } else {
                x1 = x0;
            }
        }
        /* The second run one row of weights after the first: one offset for both. */
        const int same = x1 - x0 == klen;
        const int32_t dx = (int32_t)(x1 - x0);
        for (o = 0; o < cout; o += 2) {
            const int two_ch = o + 1 < cout;
            const int8_t *w0 = wts + o * klen;
            const int32_t kl = two_ch ? klen : 0;
            int32_t v00, v01, v10, v11;
            uint32_t s[4];
            s[0] = s[2] = bias != NULL ? (uint32_t)bias[o] : 0u;
            s[1] = s[3] = bias != NULL && two_ch ? (uint32_t)bias[o + 1] : 0u;
            if (same && two_ch) {
                mpq__block22(x0, dx, w0, kl, klen, zp, nz, s, 1);
            } else {
                mpq__block22(x0, dx, w0, kl, klen, zp, nz, s, 0);
            }
            /* All four values before any store: a byte store may alias the constants. */
            mpq__out2(s[0], s[2], mult[o], shift[o], ozp, lo, hi, &v00, &v10);
            mpq__out2(s[1], s[3], mult[o + two_ch], shift[o + two_ch], ozp, lo, hi, &v01,
                         &v11);
            if (sub) {
                if (add) {
                    /* the four skip elements read before any of the four sums is stored:
                       in place, each is still read before its own sum overwrites it */
                    const uint8_t *sk = (const uint8_t *)c->skip->data;
                    const int32_t sb = c->skip->bits;
                    v00 = mpq__emit_add(c->add, c->add_fast, sk, sb, ks0 + (uint32_t)o, v00);
                    if (two_ch) {
                        v01 = mpq__emit_add(c->add, c->add_fast, sk, sb, ks0 + (uint32_t)o + 1u,
                                            v01);
                    }
                    if (two_px) {
                        v10 = mpq__emit_add(c->add, c->add_fast, sk, sb, ks1 + (uint32_t)o,
                                            v10);
                        if (two_ch) {
                            v11 = mpq__emit_add(c->add, c->add_fast, sk, sb,
                                                ks1 + (uint32_t)o + 1u, v11);
                        }
                    }
                }
                mpq__put2_sub(dst, out->bits, ko0, o, v00, v01, two_ch);
                if (two_px) {
                    mpq__put2_sub(dst, out->bits, ko1, o, v10, v11, two_ch);
                }
                continue;
            }
            mpq__put_s8(c, dst, o, v00, ko0, ks0, add, sub);
            if (two_ch) {
                mpq__put_s8(c, dst, o + 1, v01, ko0, ks0, add, sub);
            }
            if (two_px) {
                mpq__put_s8(c, dst, o, v10, ko1, ks1, add, sub);
                if (two_ch) {
                    mpq__put_s8(c, dst, o + 1, v11, ko1, ks1, add, sub);
                }
            }
        }
    }
}

/* Out of line, so that the loop's registers are allocated apart from mpq__conv's other
   paths. */
static MPQ_NOINLINE void mpq__conv_s8(const mpq__conv_ctx *c, int8_t *scratch)
{
    mpq__conv_s8_loop(c, scratch, 0, 0);
}

static MPQ_NOINLINE void mpq__conv_s8_add(const mpq__conv_ctx *c, int8_t *scratch)
{
    mpq__conv_s8_loop(c, scratch, 1, 0);
}

static MPQ_NOINLINE void mpq__conv_s8_sub(const mpq__conv_ctx *c, int8_t *scratch)
{
    mpq__conv_s8_loop(c, scratch, 0, 1);
}

static MPQ_NOINLINE void mpq__conv_s8_add_sub(const mpq__conv_ctx *c, int8_t *scratch)
{
    mpq__conv_s8_loop(c, scratch, 1, 1);
}

/* Does the call take mpq__conv_s8: 8-bit linear weights and inputs (or int8 columns, cols8),
   outputs of any bits (4-/2-bit ones merged element by element: mpq__conv_s8_sub and
   mpq__conv_s8_add_sub), one group, the 32-bit requantisation (fast_s8), and a fused add whose
   skip is either apart from the output or the very same elements (the pair order then still
   reads each skip element just before its sum overwrites it; a sub-byte store keeps the byte's
   other elements)? */
static int mpq__conv_s8_ok(const mpq__conv_ctx *c)
{
    const mpq_view *out = c->out, *sk = c->skip;
    if (c->f->bits != 8 || c->f->format != MPQ_WFMT_LINEAR || c->tab != NULL
        || (c->in->bits != 8 && !c->cols8) || c->p->groups != 1 || !c->fast_s8) {
        return 0;
    }
    return c->add == NULL || sk->data != out->data
           || (sk->y0 == out->y0 && sk->x0 == out->x0 && sk->stored_w == out->stored_w);
}

/* Does the call take mpq__conv_any: 8-bit CODEBOOK weights (no table), or weight rows or 1x1
   input runs that do not start at byte boundaries (a depthwise filter excepted: its taps are
   read one by one)? */
static int mpq__conv_takes_any(const mpq_conv_params *p, const mpq_filter *f,
                               const mpq_view *in, const mpq_view *out)
{
    const int depthwise = f->c == 1 && f->n == p->groups && p->groups > 1
                          && f->h * f->w <= MPQ_DW_TAPS;
    const int direct = mpq__conv_direct(p, f, in, out);
    if (f->format != MPQ_WFMT_LINEAR && !mpq__tabled(f)) {
        return 1;
    }
    return !depthwise && (!mpq__at_byte((uint32_t)(f->h * f->w * f->c), f->bits)
                          || (direct && !(mpq__at_byte((uint32_t)in->c, in->bits)
                                          && mpq__at_byte((uint32_t)f->c, in->bits))));
}

/* The convolution of mpq_conv2d; with `add` it is mpq_conv2d_add: each channel's result is
   added to the skip element right away, and the sum written where the skip element was.
   Linear weights and tabled ones (t: their tables, built in this frame) whose rows start at
   byte boundaries (and 1x1 input runs that do) go through the group loops, two output channels
   at a time. The callers send the rest to mpq__conv_any (mpq__conv_takes_any) before this
   frame exists: the model's stack bound counts the deepest path any call could take, and
   mpq__conv_any's below this frame was the deepest of every convolution. */
static MPQ_NOINLINE int mpq__conv(const mpq_conv_params *p, const mpq_filter *f,
                                  const mpq_channel_quant *q, const mpq_view *in,
                                  const mpq_add_params *add, const mpq_view *skip,
                                  const mpq_view *out, int16_t *scratch, int cols8)
{
    /* cols8 (mpq_conv2d_unpacked): the int8 path on columns unpacked from any input bits,
       never read in place (the caller has the two columns' scratch) */
    const int direct = !cols8 && mpq__conv_direct(p, f, in, out);
    const int32_t klen = f->h * f->w * f->c;
    const uint8_t *src = (const uint8_t *)in->data;
    const int depthwise = f->c == 1 && f->n == p->groups && p->groups > 1
                          && f->h * f->w <= MPQ_DW_TAPS;
    mpq__conv_ctx c;
    mpq__wtab tab;
    const mpq__wtab *t = NULL;
    int32_t oy, ox, g, o;
    if (mpq__tabled(f)) {
        mpq__wtab_build(f, &tab);
        t = &tab;
    }
    c.p = p;
    c.f = f;
    c.q = q;
    c.in = in;
    c.out = out;
    c.skip = skip;
    c.add = add;
    c.direct = direct;
    c.cols8 = cols8;
    c.quads = NULL;
    c.tquads = NULL;
    c.tab = t;
    c.fast_s8 = 1;
    c.fast = 1; /* and no left shift */
    for (o = 0; o < f->n; ++o) {
        const int32_t s = q->shift[o];
        if (s > 31 || s < -30 || q->multiplier[o] < 0) {
            c.fast_s8 = c.fast = 0;
            break;
        }
        if (s > 0) {
            c.fast = 0;
        }
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
    if (mpq__conv_s8_ok(&c)) {
        if (add != NULL && out->bits != 8) {
            mpq__conv_s8_add_sub(&c, (int8_t *)scratch);
        } else if (add != NULL) {
            mpq__conv_s8_add(&c, (int8_t *)scratch);
        } else if (out->bits != 8) {
            mpq__conv_s8_sub(&c, (int8_t *)scratch);
        } else {
            mpq__conv_s8(&c, (int8_t *)scratch);
        }
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
    if (mpq__conv_takes_any(p, f, in, out)) {
        mpq__conv_any(p, f, q, in, NULL, NULL, out, scratch);
        return MPQ_OK;
    }
    return mpq__conv(p, f, q, in, NULL, NULL, out, scratch, 0);
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
    if (mpq__conv_takes_any(p, f, in, out)) {
        mpq__conv_any(p, f, q, in, add, skip, out, scratch);
        return MPQ_OK;
    }
    return mpq__conv(p, f, q, in, add, skip, out, scratch, 0);
}

/* -- sub-byte operands unpacked to int8: mpq_conv2d_unpacked ---------------------------------- */

/* Does the filter need decoding to int8 (anything but 8-bit linear weights)? */
static int mpq__needs_decode(const mpq_filter *f)
{
    return f->bits != 8 || f->format != MPQ_WFMT_LINEAR;
}

/* Bytes of int8 weights mpq_conv2d_unpacked unpacks into the front of its scratch (4-byte
   aligned, so the columns after them stay aligned); 0 for 8-bit linear weights. */
static int32_t mpq__unpacked_bytes(const mpq_filter *f)
{
    return mpq__needs_decode(f) ? (f->n * f->h * f->w * f->c + 3) & ~3 : 0;
}

/* Is the call one mpq_conv2d_unpacked takes: one group and a sub-byte (or tabled) operand. */
static int mpq__unpacked_check(const mpq_conv_params *p, const mpq_filter *f,
                               const mpq_view *in, const mpq_view *out)
{
    const int err = mpq__conv_check(p, f, in, out);
    if (err != MPQ_OK) {
        return err;
    }
    return p->groups == 1 && (in->bits != 8 || mpq__needs_decode(f)) ? MPQ_OK : MPQ_ERR_BITS;
}

int32_t mpq_conv2d_unpacked_scratch_size(const mpq_conv_params *p, const mpq_filter *f,
                                         const mpq_view *in, const mpq_view *out)
{
    const int err = mpq__unpacked_check(p, f, in, out);
    const int cols = in != NULL && in->bits != 8;
    if (err != MPQ_OK) {
        return err;
    }
    return mpq__unpacked_bytes(f)
           + (!cols && mpq__conv_direct(p, f, in, out) ? 0 : 2 * f->h * f->w * f->c);
}

/* `f` as the int8 filter the unpacked kernels run (into *f8): a filter that needs decoding
   (mpq__needs_decode) has every code decoded to its int8 value (mpq__wval: linear, codebook or
   power of two) at the start of `scratch`, so the int8 path's products are the filter's, bit
   for bit; any other is `f` itself. Returns the scratch bytes the decoded weights take. */
static int32_t mpq__decode_filter(const mpq_filter *f, int16_t *scratch, mpq_filter *f8)
{
    const int32_t wbytes = mpq__unpacked_bytes(f);
    const uint8_t *codes = (const uint8_t *)f->data;
    int8_t *w8 = (int8_t *)scratch;
    uint32_t k;
    const uint32_t nk = (uint32_t)(f->n * f->h * f->w * f->c);
    *f8 = *f;
    if (wbytes == 0) {
        return 0;
    }
    for (k = 0; k < nk; ++k) {
        w8[k] = (int8_t)mpq__wval(f, mpq__code(codes, f->bits, k));
    }
    f8->data = w8;
    f8->bits = 8;
    f8->format = MPQ_WFMT_LINEAR;
    f8->codebook = NULL;
    return wbytes;
}

int mpq_conv2d_unpacked(const mpq_conv_params *p, const mpq_filter *f,
                        const mpq_channel_quant *q, const mpq_view *in, const mpq_view *out,
                        int16_t *scratch)
{
    const int err = mpq__unpacked_check(p, f, in, out);
    mpq_filter f8;
    int32_t wbytes;
    if (err != MPQ_OK) {
        return err;
    }
    if (q == NULL || q->multiplier == NULL || q->shift == NULL || scratch == NULL
        || !mpq__act_ok(p->act_min, p->act_max, out->bits)) {
        return MPQ_ERR_ARG;
    }
    wbytes = mpq__decode_filter(f, scratch, &f8);
    return mpq__conv(p, &f8, q, in, NULL, NULL, out,
                     (int16_t *)(void *)((uint8_t *)scratch + wbytes), in->bits != 8);
}

int mpq_conv2d_add_unpacked(const mpq_conv_params *p, const mpq_filter *f,
                            const mpq_channel_quant *q, const mpq_view *in,
                            const mpq_add_params *add, const mpq_view *skip,
                            const mpq_view *out, int16_t *scratch)
{
    int err = mpq__unpacked_check(p, f, in, out);
    mpq_filter f8;
    int32_t wbytes;
    if (err != MPQ_OK || (err = mpq__view_check(skip)) != MPQ_OK) {
        return err;
    }
    /* mpq_conv2d_add's argument rules */
    if (q == NULL || q->multiplier == NULL || q->shift == NULL || add == NULL || scratch == NULL
        || !mpq__act_ok(p->act_min, p->act_max, 8)
        || !mpq__act_ok(add->act_min, add->act_max, out->bits)
        || !mpq__in_range(add->a_zp, skip->bits) || !mpq__in_range(add->b_zp, 8)
        || add->left_shift < 0 || add->left_shift > 31
        || skip->h != out->h || skip->w != out->w || skip->c != out->c
        || skip->data == in->data) {
        return MPQ_ERR_ARG;
    }
    if (!mpq__alias_ok(skip, out)) {
        return MPQ_ERR_BITS;
    }
    wbytes = mpq__decode_filter(f, scratch, &f8);
    return mpq__conv(p, &f8, q, in, add, skip, out,
                     (int16_t *)(void *)((uint8_t *)scratch + wbytes), in->bits != 8);
}
