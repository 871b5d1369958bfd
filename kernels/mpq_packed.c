/* mpq_packed.c: mpq_packed_conv2d, mpq_packed_conv2d_add, mpq_packed_fully_connected,
 * mpq_packed_pack and their size functions - sub-byte convolution (alone or fused with its
 * residual add) and fully connected layers with two MACs per SMLAD halfword (issue 15 item 2;
 * API and formulas: mpq_kernels.h, "packed sub-byte kernels").
 *
 * The convolution works on output pixels in pairs and channels in pairs (CMSIS-NN's 2x2
 * register block): the two pixels' columns are written to scratch once and read by every
 * channel pair; each unpacked weight operand meets both columns (W4 with the DSP: a
 * hand-scheduled block of 36 instructions per 64 MACs; W4A4, whose fields are extracted after
 * every block, runs its whole block loop and its 4-bit output stage as two assembly functions,
 * mpq__pk_w4e1_blocks and mpq__pk_put_pair4_asm). Outputs take the 32-bit requantisation
 * (mpq__requant_rs's single rounding for right shifts) when every channel's shift is in
 * [-30, 31] and M >= 0.
 *
 * Part of mpq's portable kernel library (shared helpers: mpq_support.h).
 *
 * Why it is exact (ULPPACK, Won et al. 2022; MCU-MixQ, 2024): a halfword lane of the column
 * holds a = (x_p + oa) + x_q * 2^12 and a lane of the filter h = (w_q + ow) + (w_p + oh) * 2^12
 * (element p = 2l, q = 2l + 1 of lane l). Their product is
 *     (x_p + oa)(w_q + ow) + [(x_p + oa)(w_p + oh) + x_q (w_q + ow)] * 2^12 + x_q (w_p + oh) * 2^24
 * whose middle field carries the two useful products plus offset terms that do not depend on
 * the output channel's activations (folded into a corrected bias) or on the channel (one sum
 * per column). SMLAD adds two lanes; after at most MPQ_PK_EVERY blocks of four SMLADs the low
 * field is still in [0, 2^12) and the middle one in [-2^11, 2^11), so bits 12..23 of the
 * accumulator, sign-extended (SBFX), are the middle field's sum exactly (the periods per bit
 * mix: mpq.codegen.packed.extraction_period). */
#include <stddef.h>

#include "mpq_support.h"

#define MPQ_PK_S 12                  /* the field shift */
#define MPQ_PK_MASK4 0xF00FF00Fu     /* 4-bit weights: lo field bits 0-3, hi field bits 12-15 */
#define MPQ_PK_MASK2 0x30033003u     /* 2-bit weights: lo field bits 0-1, hi field bits 12-13 */

/* The weight offsets of a filter: ow on the lo (q) field, oh on the hi (p) field. A 4-bit hi
   field is the weight's own two's complement code (bits 12-15 of the signed halfword), so
   oh = 0; a 2-bit one cannot carry its sign there and is stored offset like the lo field. */
static inline int32_t mpq__pk_ow(int32_t wbits)
{
    return 1 << (wbits - 1);
}

static inline int32_t mpq__pk_oh(int32_t wbits)
{
    return wbits == 4 ? 0 : 2;
}

/* The filter's lanes of elements 4j .. 4j+3 of a row as one SMLAD operand word (fields at
   bits 0 and 12 of each halfword). */
static uint32_t mpq__pk_opword(const int32_t *w4, int32_t wbits)
{
    const uint32_t fmask = (1u << wbits) - 1u;
    const int32_t ow = mpq__pk_ow(wbits), oh = mpq__pk_oh(wbits);
    uint32_t o = 0;
    int32_t l;
    for (l = 0; l < 2; ++l) {
        const uint32_t lo = (uint32_t)(w4[2 * l + 1] + ow) & fmask;
        const uint32_t hi = (uint32_t)(w4[2 * l] + oh) & fmask;
        o |= (lo | (hi << MPQ_PK_S)) << (16 * l);
    }
    return o;
}

static inline uint32_t mpq__rol(uint32_t v, int32_t n)
{
    return n == 0 ? v : (v << n) | (v >> (32 - n));
}

static inline uint32_t mpq__ror(uint32_t v, int32_t n)
{
    return n == 0 ? v : (v >> n) | (v << (32 - n));
}

int32_t mpq_packed_words(int32_t wbits, int32_t n, int32_t k)
{
    if ((wbits != 4 && wbits != 2) || n < 1 || k < 1) {
        return MPQ_ERR_ARG;
    }
    return n * ((k + 15) / 16) * (wbits / 2);
}

int mpq_packed_pack(const mpq_filter *f, const int32_t *bias, int32_t act_bits, int32_t input_zp,
                    uint32_t *data, int32_t *cbias)
{
    const int32_t k = f != NULL ? f->h * f->w * f->c : 0;
    int32_t o, b;
    if (f == NULL || f->data == NULL || data == NULL || cbias == NULL || f->n < 1 || k < 1
        || f->format != MPQ_WFMT_LINEAR || (act_bits != 4 && act_bits != 2)
        || !mpq__in_range(input_zp, act_bits)) {
        return MPQ_ERR_ARG;
    }
    if (f->bits != 4 && f->bits != 2) {
        return MPQ_ERR_BITS;
    }
    for (o = 0; o < f->n; ++o) {
        const int32_t nblk = (k + 15) / 16;
        const int32_t oa = 1 << (act_bits - 1);
        uint32_t sum = 0, even = 0;
        for (b = 0; b < nblk; ++b) {
            int32_t w[16], e, j;
            uint32_t ops[4];
            for (e = 0; e < 16; ++e) {
                const int32_t i = 16 * b + e;
                w[e] = i < k ? mpq__ld((const uint8_t *)f->data, f->bits,
                                       (uint32_t)o * (uint32_t)k + (uint32_t)i) : 0;
                sum += (uint32_t)w[e];
                even += (e % 2 == 0) ? (uint32_t)w[e] : 0u;
            }
            for (j = 0; j < 4; ++j) {
                ops[j] = mpq__pk_opword(w + 4 * j, f->bits);
            }
            if (f->bits == 4) {
                *data++ = ops[0] | mpq__rol(ops[1], 8);
                *data++ = ops[2] | mpq__rol(ops[3], 8);
            } else {
                *data++ = ops[0] | mpq__rol(ops[1], 2) | mpq__rol(ops[2], 8) | mpq__rol(ops[3], 10);
            }
        }
        /* cbias = bias - zp*sum(w) - oa*sum_{k even}(w)   (mod 2^32) */
        cbias[o] = mpq__i32((bias != NULL ? (uint32_t)bias[o] : 0u) - (uint32_t)input_zp * sum
                            - (uint32_t)oa * even);
    }
    return MPQ_OK;
}

/* -- the column --------------------------------------------------------------------------- */

/* A column being written: lane l = (x_{2l} + oa) + x_{2l+1} * 2^12 as int16; sp sums the
   offset even elements, sq the odd ones. */
typedef struct {
    int16_t *lane;
    int32_t n;    /* elements so far */
    int32_t oa;   /* 2^(act_bits - 1) */
    int32_t pend; /* the pending even element + oa */
    int32_t sp, sq;
    int want_sp;  /* sp is needed: the filter's hi fields are offset (oh != 0: 2-bit weights) */
} mpq__pk_col;

/* The sum of the four bytes of v (each below 256). */
static MPQ_INLINE uint32_t mpq__pk_bytes_sum(uint32_t v)
{
    const uint32_t h = (v & 0x00FF00FFu) + ((v >> 8) & 0x00FF00FFu);
    return (h & 0xFFFFu) + (h >> 16);
}

static MPQ_INLINE void mpq__pk_put(mpq__pk_col *c, int32_t x)
{
    if ((c->n & 1) == 0) {
        c->pend = x + c->oa;
        c->sp += c->pend;
    } else {
        c->lane[c->n >> 1] = (int16_t)(c->pend + x * (1 << MPQ_PK_S));
        c->sq += x;
    }
    c->n++;
}

/* Lanes of 8*nw 4-bit elements, four bytes (eight elements) per round, from s into dw; adds the
   sums of x_p + 8 (when want_sp) and x_q + 8 to *tp and *tq. Byte (x_q << 4 | x_p) gives the
   lane (code_p ^ 8) | code_q << 12, i.e. x_p + 8 + x_q*2^12: with a = bytes 0, 2 and b = bytes
   1, 3 of the word as halfwords, both lanes of a (of b) are made at once and the halfwords
   regrouped (bytes 0, 1 and 2, 3: PKHBT, PKHTB). The codes ^ 8 are summed per byte lane, at
   most 16 rounds of values below 16 (no carry between lanes), then the lanes added. */
static MPQ_INLINE void mpq__pk_words4(uint32_t *dw, const uint8_t *s, int32_t nw, int want_sp,
                                      uint32_t *tp, uint32_t *tq)
{
    while (nw > 0) {
        const int32_t e = nw < 16 ? nw : 16;
        uint32_t vp = 0, vq = 0;
        int32_t j;
        nw -= e;
        for (j = 0; j < e; ++j, s += 4, dw += 2) {
            uint32_t w, fa, fb;
            memcpy(&w, s, 4);
            fa = ((w & 0x000F000Fu) ^ 0x00080008u) | ((w & 0x00F000F0u) << 8);
            fb = (((w >> 8) & 0x000F000Fu) ^ 0x00080008u) | (((w >> 8) & 0x00F000F0u) << 8);
            dw[0] = (fa & 0xFFFFu) | (fb << 16);
            dw[1] = (fa >> 16) | (fb & 0xFFFF0000u);
            vq += ((w >> 4) & 0x0F0F0F0Fu) ^ 0x08080808u;
            if (want_sp) {
                vp += (w & 0x0F0F0F0Fu) ^ 0x08080808u;
            }
        }
        *tp += mpq__pk_bytes_sum(vp);
        *tq += mpq__pk_bytes_sum(vq);
    }
}

/* Appends elements k .. k+len-1 of a packed buffer of `bits` (4 or 2) bits. */
static void mpq__pk_run(mpq__pk_col *c, const uint8_t *src, int32_t bits, uint32_t k, int32_t len)
{
    /* the common case first: 4-bit elements from a byte into a whole word of lanes */
    if (bits == 4 && len >= 8 && ((c->n | (int32_t)k) & 1) == 0
        && ((uintptr_t)(c->lane + (c->n >> 1)) & 3u) == 0) {
        const int32_t nw = len >> 3;
        uint32_t tp = 0, tq = 0;
        mpq__pk_words4((uint32_t *)(void *)(c->lane + (c->n >> 1)), src + (k >> 1), nw,
                       c->want_sp, &tp, &tq);
        c->sp += (int32_t)tp;
        c->sq += (int32_t)tq - 32 * nw;
        c->n += 8 * nw;
        k += (uint32_t)(8 * nw);
        len -= 8 * nw;
        if (len == 0) {
            return;
        }
    }
    while (len > 0 && ((c->n & 1) != 0 || !mpq__at_byte(k, bits))) {
        mpq__pk_put(c, mpq__ld(src, bits, k));
        ++k;
        --len;
    }
    if (bits == 4) {
        const uint8_t *s = src + (k >> 1);
        int16_t *d = c->lane + (c->n >> 1);
        int32_t sp = 0, sq = 0, i;
        const int32_t nb = len >> 1;
        /* byte by byte, what the word path above leaves (runs that start off a word of lanes
           or an element pair, and the bytes after the last whole word): byte
           (x_q << 4 | x_p) gives the lane (code_p ^ 8) | code_q << 12 = x_p + 8 + x_q*2^12 */
        for (i = 0; i < nb; ++i) {
            const uint32_t b = s[i];
            const uint32_t lo = (b & 15u) ^ 8u;
            d[i] = (int16_t)(uint16_t)(lo | ((b & 0xF0u) << 8));
            sp += (int32_t)lo;
            sq += (int32_t)(int8_t)b >> 4;
        }
        c->sp += sp;
        c->sq += sq;
        c->n += 2 * nb;
        k += (uint32_t)(2 * nb);
        len -= 2 * nb;
    } else {
        const uint8_t *s = src + (k >> 2);
        int16_t *d = c->lane + (c->n >> 1);
        int32_t sp = 0, sq = 0, i;
        const int32_t nb = len >> 2;
        for (i = 0; i < nb; ++i) {
            const uint32_t b = s[i];
            const int32_t p0 = (int32_t)((b & 3u) ^ 2u);
            const int32_t q0 = (int32_t)(((b >> 2) & 3u) ^ 2u) - 2;
            const int32_t p1 = (int32_t)(((b >> 4) & 3u) ^ 2u);
            const int32_t q1 = (int32_t)((b >> 6) ^ 2u) - 2;
            d[2 * i] = (int16_t)(p0 + q0 * (1 << MPQ_PK_S));
            d[2 * i + 1] = (int16_t)(p1 + q1 * (1 << MPQ_PK_S));
            sp += p0 + p1;
            sq += q0 + q1;
        }
        c->sp += sp;
        c->sq += sq;
        c->n += 4 * nb;
        k += (uint32_t)(4 * nb);
        len -= 4 * nb;
    }
    for (; len > 0; --len, ++k) {
        mpq__pk_put(c, mpq__ld(src, bits, k));
    }
}

/* Appends len copies of x (taps outside the input: x = input_zp contributes nothing). */
static void mpq__pk_fill(mpq__pk_col *c, int32_t x, int32_t len)
{
    for (; len > 0; --len) {
        mpq__pk_put(c, x);
    }
}

/* Closes a column of k elements into nblk blocks: a trailing odd element gets x_q = 0, the
   lanes up to 8*nblk are 0 (they add nothing whatever the filter holds there). Returns the
   column's correction oh*sp + ow*sq. */
static int32_t mpq__pk_close(mpq__pk_col *c, int32_t nblk, int32_t wbits)
{
    int32_t l = c->n >> 1;
    if ((c->n & 1) != 0) {
        c->lane[l++] = (int16_t)c->pend;
    }
    for (; l < 8 * nblk; ++l) {
        c->lane[l] = 0;
    }
    return mpq__i32((uint32_t)mpq__pk_oh(wbits) * (uint32_t)c->sp
                    + (uint32_t)mpq__pk_ow(wbits) * (uint32_t)c->sq);
}

/* -- the dot products ----------------------------------------------------------------------- */

static inline int32_t mpq__pk_smlad(uint32_t a, uint32_t b, int32_t acc)
{
#if MPQ_USE_DSP
    return mpq__smlad(mpq__i32(a), mpq__i32(b), acc);
#else
    return mpq__i32((uint32_t)acc
                    + (uint32_t)((int32_t)(int16_t)(uint16_t)a * (int32_t)(int16_t)(uint16_t)b)
                    + (uint32_t)((int32_t)(int16_t)(uint16_t)(a >> 16)
                                 * (int32_t)(int16_t)(uint16_t)(b >> 16)));
#endif
}

/* Bits 12..23 of the accumulator, sign-extended (SBFX): the middle field's sum. */
static inline int32_t mpq__pk_field(int32_t acc)
{
    const uint32_t u = ((uint32_t)acc >> MPQ_PK_S) & 0xFFFu;
    return (int32_t)(u ^ 0x800u) - 0x800;
}

/* s[r] = sum over the column's 16*nblk elements of the middle fields against rows w0, w1. */
static MPQ_INLINE void mpq__pk_dot2(const uint32_t *x, const uint32_t *w0, const uint32_t *w1,
                                    int32_t nblk, int32_t wbits, int32_t every, int32_t s[2])
{
    uint32_t t0 = 0, t1 = 0;
    while (nblk > 0) {
        int32_t e = nblk < every ? nblk : every;
        int32_t a0 = 0, a1 = 0;
        nblk -= e;
        for (; e > 0; --e, x += 4) {
            const uint32_t x0 = x[0], x1 = x[1], x2 = x[2], x3 = x[3];
            if (wbits == 4) {
                uint32_t u = w0[0], v = w0[1];
                a0 = mpq__pk_smlad(x0, u & MPQ_PK_MASK4, a0);
                a0 = mpq__pk_smlad(x1, mpq__ror(u, 8) & MPQ_PK_MASK4, a0);
                a0 = mpq__pk_smlad(x2, v & MPQ_PK_MASK4, a0);
                a0 = mpq__pk_smlad(x3, mpq__ror(v, 8) & MPQ_PK_MASK4, a0);
                u = w1[0];
                v = w1[1];
                a1 = mpq__pk_smlad(x0, u & MPQ_PK_MASK4, a1);
                a1 = mpq__pk_smlad(x1, mpq__ror(u, 8) & MPQ_PK_MASK4, a1);
                a1 = mpq__pk_smlad(x2, v & MPQ_PK_MASK4, a1);
                a1 = mpq__pk_smlad(x3, mpq__ror(v, 8) & MPQ_PK_MASK4, a1);
                w0 += 2;
                w1 += 2;
            } else {
                uint32_t u = w0[0];
                a0 = mpq__pk_smlad(x0, u & MPQ_PK_MASK2, a0);
                a0 = mpq__pk_smlad(x1, mpq__ror(u, 2) & MPQ_PK_MASK2, a0);
                a0 = mpq__pk_smlad(x2, mpq__ror(u, 8) & MPQ_PK_MASK2, a0);
                a0 = mpq__pk_smlad(x3, mpq__ror(u, 10) & MPQ_PK_MASK2, a0);
                u = w1[0];
                a1 = mpq__pk_smlad(x0, u & MPQ_PK_MASK2, a1);
                a1 = mpq__pk_smlad(x1, mpq__ror(u, 2) & MPQ_PK_MASK2, a1);
                a1 = mpq__pk_smlad(x2, mpq__ror(u, 8) & MPQ_PK_MASK2, a1);
                a1 = mpq__pk_smlad(x3, mpq__ror(u, 10) & MPQ_PK_MASK2, a1);
                w0 += 1;
                w1 += 1;
            }
        }
        t0 += (uint32_t)mpq__pk_field(a0);
        t1 += (uint32_t)mpq__pk_field(a1);
    }
    s[0] = mpq__i32(t0);
    s[1] = mpq__i32(t1);
}

/* The outputs of one column: out element base + o for every channel o, two rows at a time
   (the dot loop inlined with its bit mix's constants). */
static MPQ_INLINE void mpq__pk_outputs_t(const mpq_packed_filter *f, const mpq_channel_quant *q,
                                         int32_t output_zp, int32_t act_min, int32_t act_max,
                                         const uint32_t *col, int32_t corr, const mpq_view *out,
                                         uint32_t base, int32_t wbits, int32_t every)
{
    const int32_t nblk = (f->k + 15) / 16;
    const int32_t stride = nblk * (wbits / 2);
    uint8_t *dst = (uint8_t *)out->data;
    int32_t o, r;
    for (o = 0; o < f->n; o += 2) {
        const int32_t rows = o + 1 < f->n ? 2 : 1;
        const uint32_t *w0 = f->data + o * stride;
        int32_t s[2], y[2];
        mpq__pk_dot2(col, w0, w0 + (rows - 1) * stride, nblk, wbits, every, s);
        for (r = 0; r < rows; ++r) {
            const uint32_t acc = (uint32_t)f->bias[o + r] + (uint32_t)s[r] - (uint32_t)corr;
            y[r] = mpq__output(acc, q->multiplier[o + r], q->shift[o + r], output_zp, act_min,
                               act_max);
        }
        if (out->bits == 8) {
            dst[base + (uint32_t)o] = (uint8_t)y[0];
            if (rows == 2) {
                dst[base + (uint32_t)o + 1u] = (uint8_t)y[1];
            }
        } else if (out->bits == 4 && rows == 2 && ((base + (uint32_t)o) & 1u) == 0) {
            /* a whole byte: both nibbles are this pair's */
            dst[(base + (uint32_t)o) >> 1] = (uint8_t)(((uint32_t)y[0] & 15u)
                                                       | (((uint32_t)y[1] & 15u) << 4));
        } else {
            for (r = 0; r < rows; ++r) {
                mpq__st(dst, out->bits, base + (uint32_t)(o + r), y[r]);
            }
        }
    }
}

static void mpq__pk_outputs_w4e1(const mpq_packed_filter *f, const mpq_channel_quant *q,
                                 int32_t zp, int32_t lo, int32_t hi, const uint32_t *col,
                                 int32_t corr, const mpq_view *out, uint32_t base)
{
    mpq__pk_outputs_t(f, q, zp, lo, hi, col, corr, out, base, 4, 1);
}

static void mpq__pk_outputs_w4e4(const mpq_packed_filter *f, const mpq_channel_quant *q,
                                 int32_t zp, int32_t lo, int32_t hi, const uint32_t *col,
                                 int32_t corr, const mpq_view *out, uint32_t base)
{
    mpq__pk_outputs_t(f, q, zp, lo, hi, col, corr, out, base, 4, 4);
}

static void mpq__pk_outputs_w2e3(const mpq_packed_filter *f, const mpq_channel_quant *q,
                                 int32_t zp, int32_t lo, int32_t hi, const uint32_t *col,
                                 int32_t corr, const mpq_view *out, uint32_t base)
{
    mpq__pk_outputs_t(f, q, zp, lo, hi, col, corr, out, base, 2, 3);
}

static void mpq__pk_outputs_w2e21(const mpq_packed_filter *f, const mpq_channel_quant *q,
                                  int32_t zp, int32_t lo, int32_t hi, const uint32_t *col,
                                  int32_t corr, const mpq_view *out, uint32_t base)
{
    mpq__pk_outputs_t(f, q, zp, lo, hi, col, corr, out, base, 2, 21);
}

typedef void (*mpq__pk_out_fn)(const mpq_packed_filter *, const mpq_channel_quant *, int32_t,
                               int32_t, int32_t, const uint32_t *, int32_t, const mpq_view *,
                               uint32_t);

/* The output loop of an (activation, weight) bit mix, with its extraction period (W4A4: 1
   block, A2W4: 4, A4W2: 3, W2A2: 21; mpq.codegen.packed.extraction_period derives them). */
static mpq__pk_out_fn mpq__pk_out_for(int32_t abits, int32_t wbits)
{
    if (wbits == 4) {
        return abits == 4 ? mpq__pk_outputs_w4e1 : mpq__pk_outputs_w4e4;
    }
    return abits == 4 ? mpq__pk_outputs_w2e3 : mpq__pk_outputs_w2e21;
}

static int mpq__pk_filter_ok(const mpq_packed_filter *f, const mpq_channel_quant *q)
{
    if (f == NULL || f->data == NULL || f->bias == NULL || q == NULL || q->multiplier == NULL
        || q->shift == NULL || f->n < 1 || f->h < 1 || f->w < 1 || f->c < 1
        || f->k != f->h * f->w * f->c) {
        return MPQ_ERR_ARG;
    }
    return f->bits == 4 || f->bits == 2 ? MPQ_OK : MPQ_ERR_BITS;
}

/* -- convolution ---------------------------------------------------------------------------- */

static int mpq__pk_conv_check(const mpq_conv_params *p, const mpq_packed_filter *f,
                              const mpq_view *in, const mpq_view *out)
{
    int err;
    if (p == NULL || f == NULL) {
        return MPQ_ERR_ARG;
    }
    if ((err = mpq__view_check(in)) != MPQ_OK || (err = mpq__view_check(out)) != MPQ_OK) {
        return err;
    }
    if (in->bits != 4 && in->bits != 2) {
        return MPQ_ERR_BITS;
    }
    if (f->bits != 4 && f->bits != 2) {
        return MPQ_ERR_BITS;
    }
    if (f->n < 1 || f->h < 1 || f->w < 1 || f->c < 1 || f->k != f->h * f->w * f->c
        || p->groups != 1 || in->c != f->c || out->c != f->n || p->stride_h < 1
        || p->stride_w < 1 || p->dilation_h < 1 || p->dilation_w < 1 || p->pad_top < 0
        || p->pad_left < 0 || !mpq__in_range(p->input_zp, in->bits)
        || !mpq__act_ok(p->act_min, p->act_max, out->bits) || in->data == out->data) {
        return MPQ_ERR_ARG;
    }
    return MPQ_OK;
}

int32_t mpq_packed_conv2d_scratch_size(const mpq_conv_params *p, const mpq_packed_filter *f,
                                       const mpq_view *in, const mpq_view *out)
{
    const int err = mpq__pk_conv_check(p, f, in, out);
    return err != MPQ_OK ? err : 32 * ((f->k + 15) / 16);
}

/* The column of output pixel (oy, ox) into `lane` (8*nblk halfwords); returns its
   correction (mpq__pk_close). */
static int32_t mpq__pk_column(const mpq_conv_params *p, const mpq_packed_filter *f,
                              const mpq_view *in, int32_t oy, int32_t ox, int16_t *lane,
                              int32_t nblk)
{
    const uint8_t *src = (const uint8_t *)in->data;
    mpq__pk_col c;
    int32_t ky, kx;
    c.lane = lane;
    c.n = 0;
    c.oa = 1 << (in->bits - 1);
    c.pend = c.sp = c.sq = 0;
    c.want_sp = mpq__pk_oh(f->bits) != 0;
    for (ky = 0; ky < f->h; ++ky) {
        const int32_t iy = oy * p->stride_h - p->pad_top + ky * p->dilation_h;
        const int32_t ix0 = ox * p->stride_w - p->pad_left;
        if (iy < 0 || iy >= in->h) {
            mpq__pk_fill(&c, p->input_zp, f->w * f->c);
            continue;
        }
        if (p->dilation_w == 1 && ix0 >= 0 && ix0 + f->w <= in->w) {
            /* a row of taps wholly in view: one run of KW*C elements */
            mpq__pk_run(&c, src, in->bits, mpq__at(in, iy, ix0), f->w * f->c);
            continue;
        }
        for (kx = 0; kx < f->w; ++kx) {
            const int32_t ix = ix0 + kx * p->dilation_w;
            if (ix < 0 || ix >= in->w) {
                mpq__pk_fill(&c, p->input_zp, f->c);
            } else {
                mpq__pk_run(&c, src, in->bits, mpq__at(in, iy, ix), f->c);
            }
        }
    }
    return mpq__pk_close(&c, nblk, f->bits);
}

/* The 2x2 register block (CMSIS-NN's arm_nn_mat_mult_kernel shape): s[2p + r] = the middle
   fields of columns p = 0, 1 (x0, x1) against filter rows r = 0, 1 (w0, w1), 16*nblk
   elements. Each unpacked weight operand meets both columns, each column word both rows. */
static MPQ_INLINE void mpq__pk_dot22(const uint32_t *x0, const uint32_t *x1, const uint32_t *w0,
                                     const uint32_t *w1, int32_t nblk, int32_t wbits,
                                     int32_t every, uint32_t s[4])
{
    uint32_t t00 = 0, t01 = 0, t10 = 0, t11 = 0;
    while (nblk > 0) {
        int32_t e = nblk < every ? nblk : every;
        int32_t a00 = 0, a01 = 0, a10 = 0, a11 = 0;
        nblk -= e;
        for (; e > 0; --e, x0 += 4, x1 += 4) {
            int32_t j;
            if (wbits == 4) {
                for (j = 0; j < 2; ++j) {
                    const uint32_t u = w0[j], v = w1[j];
                    uint32_t ua = u & MPQ_PK_MASK4, va = v & MPQ_PK_MASK4;
                    uint32_t xa = x0[2 * j], xb = x1[2 * j];
                    a00 = mpq__pk_smlad(xa, ua, a00);
                    a01 = mpq__pk_smlad(xa, va, a01);
                    a10 = mpq__pk_smlad(xb, ua, a10);
                    a11 = mpq__pk_smlad(xb, va, a11);
                    ua = mpq__ror(u, 8) & MPQ_PK_MASK4;
                    va = mpq__ror(v, 8) & MPQ_PK_MASK4;
                    xa = x0[2 * j + 1];
                    xb = x1[2 * j + 1];
                    a00 = mpq__pk_smlad(xa, ua, a00);
                    a01 = mpq__pk_smlad(xa, va, a01);
                    a10 = mpq__pk_smlad(xb, ua, a10);
                    a11 = mpq__pk_smlad(xb, va, a11);
                }
                w0 += 2;
                w1 += 2;
            } else {
                const uint32_t u = w0[0], v = w1[0];
                for (j = 0; j < 4; ++j) {
                    const int32_t r = (j & 1) * 2 + (j >> 1) * 8; /* 0, 2, 8, 10 */
                    const uint32_t ua = mpq__ror(u, r) & MPQ_PK_MASK2;
                    const uint32_t va = mpq__ror(v, r) & MPQ_PK_MASK2;
                    const uint32_t xa = x0[j], xb = x1[j];
                    a00 = mpq__pk_smlad(xa, ua, a00);
                    a01 = mpq__pk_smlad(xa, va, a01);
                    a10 = mpq__pk_smlad(xb, ua, a10);
                    a11 = mpq__pk_smlad(xb, va, a11);
                }
                w0 += 1;
                w1 += 1;
            }
        }
        t00 += (uint32_t)mpq__pk_field(a00);
        t01 += (uint32_t)mpq__pk_field(a01);
        t10 += (uint32_t)mpq__pk_field(a10);
        t11 += (uint32_t)mpq__pk_field(a11);
    }
    s[0] = t00;
    s[1] = t01;
    s[2] = t10;
    s[3] = t11;
}

#if MPQ_USE_DSP && !defined(MPQ_EMULATE_DSP)
/* One stored word of each of two 4-bit filter rows (wp, wp + off) against two column words of
   each of two columns (xp, xp + 2*off), by hand: GCC 12 spills the 2x2 block's operands. F:
   the accumulators' first products (SMUAD at a block's start, else SMLAD). */
#define MPQ__PK_SMUAD(a, x, o) "smuad " a ", " x ", " o "\n\t"
#define MPQ__PK_SMLAD(a, x, o) "smlad " a ", " x ", " o ", " a "\n\t"
/* The word step in the registers named: U, V the rows' words (V the second row's), P, Q their
   masked operands, X the column word, WP/XP/OFF the pointers and offset, M the mask, Ajk the
   accumulators of column j and row k. */
#define MPQ__PK_W4_WORD_R(F, U, V, P, Q, X, WP, XP, OFF, M, A00, A01, A10, A11)              \
    "ldr " V ", [" WP ", " OFF "]\n\t"                                                    \
    "ldr " U ", [" WP "], #4\n\t"                                                         \
    "and " P ", " M ", " U "\n\t"                                                         \
    "and " Q ", " M ", " V "\n\t"                                                         \
    "ldr " X ", [" XP ", " OFF ", lsl #1]\n\t"                                            \
    F(A10, X, P) F(A11, X, Q)                                                               \
    "ldr " X ", [" XP "], #4\n\t"                                                         \
    F(A00, X, P) F(A01, X, Q)                                                               \
    "and " P ", " M ", " U ", ror #8\n\t"                                                 \
    "and " Q ", " M ", " V ", ror #8\n\t"                                                 \
    "ldr " X ", [" XP ", " OFF ", lsl #1]\n\t"                                            \
    MPQ__PK_SMLAD(A10, X, P) MPQ__PK_SMLAD(A11, X, Q)                                       \
    "ldr " X ", [" XP "], #4\n\t"                                                         \
    MPQ__PK_SMLAD(A00, X, P) MPQ__PK_SMLAD(A01, X, Q)
#define MPQ__PK_W4_WORD(F)                                                                  \
    MPQ__PK_W4_WORD_R(F, "%[u]", "%[v]", "%[p]", "%[q]", "%[x]", "%[wp]", "%[xp]", "%[off]", \
                      "%[m]", "%[a00]", "%[a01]", "%[a10]", "%[a11]")

/* mpq__pk_dot22 for 4-bit weights with the DSP: the second filter row `off` bytes after the
   first, the second column 2*off bytes after the first (off = 8*nblk: the columns' layout in
   scratch), 36 instructions per block of 64 MACs plus the extraction. */
static MPQ_INLINE void mpq__pk_dot22_w4(const uint32_t *xp, const uint32_t *wp, int32_t off,
                                        int32_t nblk, int32_t every, uint32_t s[4])
{
    const uint32_t m = MPQ_PK_MASK4;
    uint32_t t00 = 0, t01 = 0, t10 = 0, t11 = 0;
    while (nblk > 0) {
        int32_t e = nblk < every ? nblk : every;
        int32_t a00, a01, a10, a11;
        uint32_t u, v, p, q, x;
        nblk -= e;
        __asm__(MPQ__PK_W4_WORD(MPQ__PK_SMUAD) MPQ__PK_W4_WORD(MPQ__PK_SMLAD)
                : [a00] "=&r"(a00), [a01] "=&r"(a01), [a10] "=&r"(a10), [a11] "=&r"(a11),
                  [xp] "+r"(xp), [wp] "+r"(wp), [u] "=&r"(u), [v] "=&r"(v), [p] "=&r"(p),
                  [q] "=&r"(q), [x] "=&r"(x)
                : [off] "r"(off), [m] "r"(m)
                : "memory");
        for (--e; e > 0; --e) {
            __asm__(MPQ__PK_W4_WORD(MPQ__PK_SMLAD) MPQ__PK_W4_WORD(MPQ__PK_SMLAD)
                    : [a00] "+r"(a00), [a01] "+r"(a01), [a10] "+r"(a10), [a11] "+r"(a11),
                      [xp] "+r"(xp), [wp] "+r"(wp), [u] "=&r"(u), [v] "=&r"(v), [p] "=&r"(p),
                      [q] "=&r"(q), [x] "=&r"(x)
                    : [off] "r"(off), [m] "r"(m)
                    : "memory");
        }
        t00 += (uint32_t)mpq__pk_field(a00);
        t01 += (uint32_t)mpq__pk_field(a01);
        t10 += (uint32_t)mpq__pk_field(a10);
        t11 += (uint32_t)mpq__pk_field(a11);
    }
    s[0] = t00;
    s[1] = t01;
    s[2] = t10;
    s[3] = t11;
}
/* The word step in the registers of mpq__pk_w4e1_blocks: r9, r8 the rows' words (r1: the first
   row, r1 + off: the second), r10, r11 their operands, lr the column word (r0: the first
   column, r0 + 2*off: the second), r2 off, r12 the mask, r4-r7 the accumulators; F: SMUAD (a
   block's first word) or SMLAD. */
#define MPQ__PK_R_WORD(F)                                                                   \
    MPQ__PK_W4_WORD_R(F, "r9", "r8", "r10", "r11", "lr", "r1", "r0", "r2", "r12", "r4",    \
                      "r5", "r6", "r7")
/* The block's four middle fields, sign-extended in place (r4-r7). */
#define MPQ__PK_R_FIELDS                                                                    \
    "sbfx r4, r4, #12, #12\n\t"                                                            \
    "sbfx r5, r5, #12, #12\n\t"                                                            \
    "sbfx r6, r6, #12, #12\n\t"                                                            \
    "sbfx r7, r7, #12, #12\n\t"

/* mpq__pk_dot22_w4 for an extraction period of one block (W4A4), the sums in memory: t[0..3] =
   the middle fields of columns 0, 1 against rows 0, 1 (t[2p + r]) over t[4] >= 1 blocks
   (counted down to 0). Every register is taken - four block accumulators, the operands, both
   pointers, off, the mask, t - so the function is written whole: per block the 36-instruction
   product, SBFX of each field, then the four sums and the count loaded, added and stored back
   with LDM/STM into the operand registers, dead by then (48 instructions per 64 MACs; the
   inlined form spills its sums: 58); the first block stores its fields as the sums. AAPCS:
   r0 = the first column, r1 = the first row, r2 = off (bytes per row), r3 = t. */
__attribute__((naked, noinline)) static void mpq__pk_w4e1_blocks(const uint32_t *col
                                                                __attribute__((unused)),
                                                                const uint32_t *row
                                                                __attribute__((unused)),
                                                                int32_t off __attribute__((unused)),
                                                                uint32_t *t __attribute__((unused)))
{
    /* the arguments are read in r0-r3 by the assembly (naked: no C statement may run) */
    __asm__ volatile(
        "push {r4, r5, r6, r7, r8, r9, r10, r11, lr}\n\t"
        "movw r12, #0xF00F\n\t"
        "movt r12, #0xF00F\n\t"
        /* the first block: its fields are the sums (STM of r4-r7 and the count) */
        MPQ__PK_R_WORD(MPQ__PK_SMUAD) MPQ__PK_R_WORD(MPQ__PK_SMLAD)
        MPQ__PK_R_FIELDS
        "ldr lr, [r3, #16]\n\t"
        "subs lr, lr, #1\n\t"
        "stm r3, {r4, r5, r6, r7, lr}\n\t"
        "beq 2f\n\t"
        "1:\n\t"
        MPQ__PK_R_WORD(MPQ__PK_SMUAD) MPQ__PK_R_WORD(MPQ__PK_SMLAD)
        MPQ__PK_R_FIELDS
        "ldm r3, {r8, r9, r10, r11, lr}\n\t"
        "add r8, r8, r4\n\t"
        "add r9, r9, r5\n\t"
        "add r10, r10, r6\n\t"
        "add r11, r11, r7\n\t"
        "subs lr, lr, #1\n\t"
        "stm r3, {r8, r9, r10, r11, lr}\n\t"
        "bne 1b\n\t"
        "2:\n\t"
        "pop {r4, r5, r6, r7, r8, r9, r10, r11, pc}\n\t");
}
#undef MPQ__PK_R_FIELDS
#undef MPQ__PK_R_WORD
#define MPQ__PK_ASM_W4 1
#else
#define MPQ__PK_ASM_W4 0
#endif

/* mpq__output for a channel whose shift is in [-30, 31] and multiplier >= 0 (the layer's
   `fast` case), the shift's constant worked out by the caller. A left shift S > 0 (2-bit
   weights give them) is applied to acc first, wrapping as the reference's int32 x = acc << S;
   x*M/2^31 then stays inside int32, which is hi, the result. */
static MPQ_INLINE int32_t mpq__pk_out_fast(uint32_t acc, int32_t m, int32_t sh, int32_t zp,
                                           int32_t lo, int32_t hi)
{
    const int32_t x = mpq__i32(acc << (sh > 0 ? sh : 0));
    const int32_t r = sh < 0 ? mpq__requant_rs(x, m, 1u << (-sh - 1), -sh - 1)
                             : (int32_t)mpq__asr64((int64_t)x * m + (INT64_C(1) << 30), 31);
    return mpq__clamp_add(r, zp, lo, hi);
}

/* The fused residual add of one element: skip value a, convolution result b (out of line:
   the add's three requantisations would swell every copy of the loop). */
static MPQ_NOINLINE int32_t mpq__pk_add(const mpq_add_params *add, int fast, int32_t a,
                                        int32_t b)
{
    return fast ? mpq__add_fast(add, a, b) : mpq__add_one(add, a, b);
}

/* mpq__output out of line: the general requantisation (a left shift, or a right shift above
   30) is rare and need not be inlined in the loops. */
static MPQ_NOINLINE int32_t mpq__pk_out_slow(uint32_t acc, int32_t m, int32_t sh, int32_t zp,
                                             int32_t lo, int32_t hi)
{
    return mpq__output(acc, m, sh, zp, lo, hi);
}

/* The output stage of one pixel pair when every channel takes the 32-bit requantisation, the
   output is 4-bit with an even channel count and there is no add (the W4A4 case): one byte per
   pixel and channel pair. Out of line: inside the channel loop GCC keeps none of these values
   in registers (the 2x2 dot takes eleven), and spills cost more than the call. */
typedef struct {
    const int32_t *bias, *mult, *shift;
    int32_t zp, lo, hi;
    int32_t corr0, corr1; /* the two columns' corrections (mpq__pk_close) */
    uint8_t *dst0, *dst1; /* the two pixels' channel 0 bytes; dst1 NULL: one pixel */
} mpq__pk_pair4;

#if MPQ_HAVE_SMLAL && MPQ_USE_DSP
/* The clamps of r10 (QADD of zp, r1; then [lo, hi]): any bounds (lo in r4, hi read from the
   stage), or the whole 4-bit range [-8, 7] in one SSAT. */
#define MPQ__PK_CLAMP_ANY                                  \
    "qadd r10, r10, r1\n\t"                                \
    "cmp r10, r4\n\t"                                      \
    "it lt\n\t"                                            \
    "movlt r10, r4\n\t"                                    \
    "ldr r11, [r0, #20]\n\t"                               \
    "cmp r10, r11\n\t"                                     \
    "it gt\n\t"                                            \
    "movgt r10, r11\n\t"
#define MPQ__PK_CLAMP_4                                    \
    "qadd r10, r10, r1\n\t"                                \
    "ssat r10, #4, r10\n\t"
/* The output of accumulator r9 of a channel with a right shift s (r6 = M, r7 = s - 1,
   r8 = 2^(s-1)) into r10: mpq__requant_rs (u = t + [acc < 0]'s -1, c = (u >> 1,
   u << 31 | 2^30), SMLAL, the high word >> (s - 1)), then the clamp C. */
#define MPQ__PK_RS_OUT(C)                                  \
    "add r10, r8, r9, asr #31\n\t"                         \
    "lsl r11, r10, #31\n\t"                                \
    "orr r11, r11, #0x40000000\n\t"                        \
    "lsr r10, r10, #1\n\t"                                 \
    "smlal r11, r10, r9, r6\n\t"                           \
    "asr r10, r10, r7\n\t" C
/* The same for a shift S >= 0 (r7 = S): x = acc << S (wrapping), floor((x*M + 2^30) / 2^31)
   from SMLAL's two words, then the clamp C. */
#define MPQ__PK_LS_OUT(C)                                  \
    "lsl r9, r9, r7\n\t"                                   \
    "mov r11, #0x40000000\n\t"                             \
    "movs r10, #0\n\t"                                     \
    "smlal r11, r10, r9, r6\n\t"                           \
    "lsl r10, r10, #1\n\t"                                 \
    "orr r10, r10, r11, lsr #31\n\t" C
/* Accumulator r9 of a pixel: bias (r5) - its column's correction (stage + OFF) + its sum (byte
   offset A of r2). */
#define MPQ__PK_RS_ACC(OFF, A)                             \
    "ldr r9, [r0, #" OFF "]\n\t"                           \
    "sub r9, r5, r9\n\t"                                   \
    "ldr r10, [r2, #" A "]\n\t"                            \
    "add r9, r9, r10\n\t"
/* Channel o + j (r3 = 4*(o + j)): its constants, then its outputs for both pixels (the sums
   s[j] and s[2 + j] at byte offsets A and B of r2) into the nibbles of r12 and lr (PUT0,
   PUT1); clamp C. */
#define MPQ__PK_RS_CHAN(A, B, PUT0, PUT1, C)               \
    "ldr r9, [r0, #0]\n\t"                                 \
    "ldr r5, [r9, r3]\n\t"                                 \
    "ldr r9, [r0, #4]\n\t"                                 \
    "ldr r6, [r9, r3]\n\t"                                 \
    "ldr r9, [r0, #8]\n\t"                                 \
    "ldr r7, [r9, r3]\n\t"                                 \
    "cmp r7, #0\n\t"                                       \
    "bge 2f\n\t"                                           \
    "mvn r7, r7\n\t"                                       \
    "movs r8, #1\n\t"                                      \
    "lsl r8, r8, r7\n\t"                                   \
    MPQ__PK_RS_ACC("24", A) MPQ__PK_RS_OUT(C) PUT0         \
    MPQ__PK_RS_ACC("28", B) MPQ__PK_RS_OUT(C) PUT1         \
    "b 3f\n\t"                                             \
    "2:\n\t"                                               \
    MPQ__PK_RS_ACC("24", A) MPQ__PK_LS_OUT(C) PUT0         \
    MPQ__PK_RS_ACC("28", B) MPQ__PK_LS_OUT(C) PUT1         \
    "3:\n\t"
/* The whole output stage of a channel pair with clamp C. */
#define MPQ__PK_PAIR4_BODY(C)                                                              \
    __asm__ volatile(                                                                      \
        "push {r4, r5, r6, r7, r8, r9, r10, r11, lr}\n\t"                                  \
        "lsl r3, r1, #2\n\t"                                                               \
        "ldr r1, [r0, #12]\n\t"                                                            \
        "ldr r4, [r0, #16]\n\t"                                                            \
        MPQ__PK_RS_CHAN("0", "8", "and r12, r10, #15\n\t", "and lr, r10, #15\n\t", C)      \
        "add r3, r3, #4\n\t"                                                               \
        MPQ__PK_RS_CHAN("4", "12", "and r10, r10, #15\n\torr r12, r12, r10, lsl #4\n\t",  \
                        "and r10, r10, #15\n\torr lr, lr, r10, lsl #4\n\t", C)             \
        "lsr r3, r3, #3\n\t"                                                               \
        "ldr r9, [r0, #32]\n\t"                                                            \
        "strb r12, [r9, r3]\n\t"                                                           \
        "ldr r5, [r0, #36]\n\t"                                                            \
        "cbz r5, 1f\n\t"                                                                   \
        "strb lr, [r5, r3]\n\t"                                                            \
        "1:\n\t"                                                                           \
        "pop {r4, r5, r6, r7, r8, r9, r10, r11, pc}\n\t")

/* mpq__pk_put_pair4 by hand (every channel's shift in [-30, 31], M >= 0: the layer's `fast`):
   the C form spills the channel constants and the clamp bounds (126 instructions per call;
   this: about 117, and about 92 when the clamp is the whole 4-bit range, measured). AAPCS: r0 = e
   (mpq__pk_pair4: bias, mult, shift, zp, lo, hi, corr0, corr1, dst0, dst1 at 0, 4, ..., 36),
   r1 = o (even), r2 = s; the arguments are read by the assembly (naked: no C statement may
   run). */
typedef char mpq__pk_pair4_layout[offsetof(mpq__pk_pair4, dst1) == 36 ? 1 : -1];
__attribute__((naked, noinline)) static void mpq__pk_put_pair4_asm(
    const mpq__pk_pair4 *e __attribute__((unused)), int32_t o __attribute__((unused)),
    const uint32_t s[4] __attribute__((unused)))
{
    MPQ__PK_PAIR4_BODY(MPQ__PK_CLAMP_ANY);
}

/* mpq__pk_put_pair4_asm for [lo, hi] = [-8, 7]: clamp(qadd(v, zp), -8, 7) is SSAT #4. */
__attribute__((naked, noinline)) static void mpq__pk_put_pair4_asm8(
    const mpq__pk_pair4 *e __attribute__((unused)), int32_t o __attribute__((unused)),
    const uint32_t s[4] __attribute__((unused)))
{
    MPQ__PK_PAIR4_BODY(MPQ__PK_CLAMP_4);
}
#undef MPQ__PK_PAIR4_BODY
#undef MPQ__PK_RS_CHAN
#undef MPQ__PK_RS_ACC
#undef MPQ__PK_LS_OUT
#undef MPQ__PK_RS_OUT
#undef MPQ__PK_CLAMP_4
#undef MPQ__PK_CLAMP_ANY
#define MPQ__PK_PAIR4_ASM 1
#else
static MPQ_NOINLINE void mpq__pk_put_pair4(const mpq__pk_pair4 *e, int32_t o, const uint32_t s[4])
{
    const uint32_t b0 = (uint32_t)e->bias[o] - (uint32_t)e->corr0;
    const uint32_t b1 = (uint32_t)e->bias[o + 1] - (uint32_t)e->corr0;
    const uint32_t d = (uint32_t)e->corr0 - (uint32_t)e->corr1; /* column 1's bias - column 0's */
    int32_t y00, y01, y10, y11;
    /* an odd last pixel's column is its own again (dst1 NULL): its values are not stored */
    mpq__out2(b0 + s[0], b0 + d + s[2], e->mult[o], e->shift[o], e->zp, e->lo, e->hi, &y00,
              &y10);
    mpq__out2(b1 + s[1], b1 + d + s[3], e->mult[o + 1], e->shift[o + 1], e->zp, e->lo, e->hi,
              &y01, &y11);
    e->dst0[o >> 1] = (uint8_t)(((uint32_t)y00 & 15u) | (((uint32_t)y01 & 15u) << 4));
    if (e->dst1 != NULL) {
        e->dst1[o >> 1] = (uint8_t)(((uint32_t)y10 & 15u) | (((uint32_t)y11 & 15u) << 4));
    }
}

/* mpq__pk_put_pair4 when every channel shifts right (S in [-30, -1], the layer's `fast` 2):
   mpq__requant_rs alone, no left-shift or zero-shift case to carry. */
static MPQ_NOINLINE void mpq__pk_put_pair4_rs(const mpq__pk_pair4 *e, int32_t o,
                                              const uint32_t s[4])
{
    const int32_t zp = e->zp, lo = e->lo, hi = e->hi;
    const uint32_t c0 = (uint32_t)e->corr0, c1 = (uint32_t)e->corr1;
    uint32_t v0 = 0, v1 = 0;
    int32_t j;
    for (j = 0; j < 2; ++j) {
        const uint32_t b = (uint32_t)e->bias[o + j];
        const int32_t m = e->mult[o + j], sm1 = -e->shift[o + j] - 1;
        const uint32_t t = 1u << sm1;
        const int32_t y0 = mpq__clamp_add(mpq__requant_rs(mpq__i32(b - c0 + s[j]), m, t, sm1),
                                          zp, lo, hi);
        const int32_t y1 = mpq__clamp_add(
            mpq__requant_rs(mpq__i32(b - c1 + s[2 + j]), m, t, sm1), zp, lo, hi);
        v0 |= ((uint32_t)y0 & 15u) << (4 * j);
        v1 |= ((uint32_t)y1 & 15u) << (4 * j);
    }
    e->dst0[o >> 1] = (uint8_t)v0;
    if (e->dst1 != NULL) {
        e->dst1[o >> 1] = (uint8_t)v1;
    }
}
#define MPQ__PK_PAIR4_ASM 0
#endif

/* Stores y0, y1 as channels o, o + 1 (o + 1 only when two) at element base + o. */
static MPQ_INLINE void mpq__pk_put2(uint8_t *dst, int32_t bits, uint32_t k, int32_t y0,
                                    int32_t y1, int two)
{
    if (bits == 8) {
        dst[k] = (uint8_t)y0;
        if (two) {
            dst[k + 1u] = (uint8_t)y1;
        }
    } else if (bits == 4 && two && (k & 1u) == 0) {
        dst[k >> 1] = (uint8_t)(((uint32_t)y0 & 15u) | (((uint32_t)y1 & 15u) << 4));
    } else {
        mpq__st(dst, bits, k, y0);
        if (two) {
            mpq__st(dst, bits, k + 1u, y1);
        }
    }
}

/* The convolution with the output pixels in pairs (row-major; an odd last one is paired with
   itself and stored once) and the channels in pairs (mpq__pk_dot22): both columns are written
   to scratch once per pair and read by every channel pair. `fast`: every channel's shift is in
   [-30, 0] and its multiplier >= 0. */
static MPQ_INLINE void mpq__pk_conv_t(const mpq_conv_params *p, const mpq_packed_filter *f,
                                      const mpq_channel_quant *q, const mpq_view *in,
                                      const mpq_view *out, int32_t *scratch, int32_t wbits,
                                      int32_t every, int fast, const mpq_add_params *add,
                                      const mpq_view *skip, int add_fast, const int w4a4)
{
    const int32_t nblk = (f->k + 15) / 16, stride = nblk * (wbits / 2);
    const int32_t npix = out->h * out->w, ow = out->w, cout = f->n;
    const int32_t ozp = p->output_zp, lo = p->act_min, hi = p->act_max;
    /* 4-bit outputs with an even channel count: every pair of channels is one whole byte */
    const int pairs4 = out->bits == 4 && (out->c & 1) == 0;
    const int32_t *bias = f->bias, *mult = q->multiplier, *shift = q->shift;
    uint32_t *col0 = (uint32_t *)scratch, *col1 = col0 + 4 * nblk;
    uint8_t *dst = (uint8_t *)out->data;
    int32_t pix, o;
    for (pix = 0; pix < npix; pix += 2) {
        const int two_px = pix + 1 < npix;
        const int32_t oy0 = pix / ow, ox0 = pix - oy0 * ow;
        const int32_t oy1 = two_px ? (pix + 1) / ow : oy0;
        const int32_t ox1 = two_px ? pix + 1 - oy1 * ow : ox0;
        const uint32_t ko0 = mpq__at(out, oy0, ox0), ko1 = mpq__at(out, oy1, ox1);
        const uint32_t ks0 = add != NULL ? mpq__at(skip, oy0, ox0) : 0u;
        const uint32_t ks1 = add != NULL ? mpq__at(skip, oy1, ox1) : 0u;
        const int32_t corr0 = mpq__pk_column(p, f, in, oy0, ox0, (int16_t *)col0, nblk);
        /* an odd last pixel: its own column again (the pair's second is never stored) */
        const int32_t corr1 = mpq__pk_column(p, f, in, oy1, ox1, (int16_t *)col1, nblk);
        if (w4a4 && pairs4 && fast) {
            /* W4A4 without an add (the w4e1 copy alone carries this code), 4-bit outputs with
               an even channel count (every pair whole), 32-bit requantisation */
            mpq__pk_pair4 e;
#if MPQ__PK_PAIR4_ASM
            const int full4 = lo == -8 && hi == 7;
#endif
            e.bias = bias;
            e.mult = mult;
            e.shift = shift;
            e.zp = ozp;
            e.lo = lo;
            e.hi = hi;
            e.corr0 = corr0;
            e.corr1 = corr1;
            e.dst0 = dst + (ko0 >> 1);
            e.dst1 = two_px ? dst + (ko1 >> 1) : NULL;
            for (o = 0; o < cout; o += 2) {
                uint32_t s[5];
#if MPQ__PK_ASM_W4
                if (wbits == 4 && every == 1) {
                    s[4] = (uint32_t)nblk;
                    mpq__pk_w4e1_blocks(col0, f->data + o * stride, 4 * stride, s);
                } else if (wbits == 4) {
                    mpq__pk_dot22_w4(col0, f->data + o * stride, 4 * stride, nblk, every, s);
                } else
#endif
                {
                    const uint32_t *w0 = f->data + o * stride;
                    mpq__pk_dot22(col0, col1, w0, w0 + stride, nblk, wbits, every, s);
                }
#if MPQ__PK_PAIR4_ASM
                if (full4) {
                    mpq__pk_put_pair4_asm8(&e, o, s);
                } else {
                    mpq__pk_put_pair4_asm(&e, o, s);
                }
#else
                if (fast == 2) {
                    mpq__pk_put_pair4_rs(&e, o, s);
                } else {
                    mpq__pk_put_pair4(&e, o, s);
                }
#endif
            }
            continue;
        }
        for (o = 0; o < cout; o += 2) {
            const int two_ch = o + 1 < cout;
            uint32_t s[5], b0, b1;
            int32_t y00, y01, y10, y11, o1;
            if (!two_ch && cout > 1) {
                /* an odd last channel: the pair (o - 1, o), its second half stored */
                --o;
            }
            o1 = o + (cout > 1);
#if MPQ__PK_ASM_W4
            if (wbits == 4 && cout > 1 && every == 1) {
                s[4] = (uint32_t)nblk;
                mpq__pk_w4e1_blocks(col0, f->data + o * stride, 4 * stride, s);
            } else if (wbits == 4 && cout > 1) {
                mpq__pk_dot22_w4(col0, f->data + o * stride, 4 * stride, nblk, every, s);
            } else
#endif
            {
                const uint32_t *w0 = f->data + o * stride;
                mpq__pk_dot22(col0, col1, w0, w0 + (o1 - o) * stride, nblk, wbits, every, s);
            }
            b0 = (uint32_t)bias[o];
            b1 = (uint32_t)bias[o1];
            if (fast) {
                const int32_t m0 = mult[o], m1 = mult[o1], sh0 = shift[o], sh1 = shift[o1];
                y00 = mpq__pk_out_fast(b0 + s[0] - (uint32_t)corr0, m0, sh0, ozp, lo, hi);
                y01 = mpq__pk_out_fast(b1 + s[1] - (uint32_t)corr0, m1, sh1, ozp, lo, hi);
                y10 = mpq__pk_out_fast(b0 + s[2] - (uint32_t)corr1, m0, sh0, ozp, lo, hi);
                y11 = mpq__pk_out_fast(b1 + s[3] - (uint32_t)corr1, m1, sh1, ozp, lo, hi);
            } else {
                y00 = mpq__pk_out_slow(b0 + s[0] - (uint32_t)corr0, mult[o], shift[o], ozp, lo,
                                       hi);
                y01 = mpq__pk_out_slow(b1 + s[1] - (uint32_t)corr0, mult[o1], shift[o1], ozp,
                                       lo, hi);
                y10 = mpq__pk_out_slow(b0 + s[2] - (uint32_t)corr1, mult[o], shift[o], ozp, lo,
                                       hi);
                y11 = mpq__pk_out_slow(b1 + s[3] - (uint32_t)corr1, mult[o1], shift[o1], ozp,
                                       lo, hi);
            }
            /* all four values before any store: a byte store may alias the constants */
            if (!two_ch && cout > 1) {
                ++o;
                y00 = y01;
                y10 = y11;
            }
            if (add != NULL) {
                /* the fused add: skip element (input a) + this result (input b), every skip
                   element read before any store (the sum may take the skip's storage) */
                const uint8_t *sk = (const uint8_t *)skip->data;
                const int32_t sb = skip->bits;
                const uint32_t k0 = ks0 + (uint32_t)o, k1 = ks1 + (uint32_t)o;
                y00 = mpq__pk_add(add, add_fast, mpq__ld(sk, sb, k0), y00);
                if (two_ch) {
                    y01 = mpq__pk_add(add, add_fast, mpq__ld(sk, sb, k0 + 1u), y01);
                }
                if (two_px) {
                    y10 = mpq__pk_add(add, add_fast, mpq__ld(sk, sb, k1), y10);
                    if (two_ch) {
                        y11 = mpq__pk_add(add, add_fast, mpq__ld(sk, sb, k1 + 1u), y11);
                    }
                }
            }
            if (pairs4) {
                dst[(ko0 + (uint32_t)o) >> 1] = (uint8_t)(((uint32_t)y00 & 15u)
                                                          | (((uint32_t)y01 & 15u) << 4));
                if (two_px) {
                    dst[(ko1 + (uint32_t)o) >> 1] = (uint8_t)(((uint32_t)y10 & 15u)
                                                              | (((uint32_t)y11 & 15u) << 4));
                }
                continue;
            }
            mpq__pk_put2(dst, out->bits, ko0 + (uint32_t)o, y00, y01, two_ch);
            if (two_px) {
                mpq__pk_put2(dst, out->bits, ko1 + (uint32_t)o, y10, y11, two_ch);
            }
        }
    }
}

/* Does every channel take the 32-bit requantisation (shift in [-30, 31], multiplier >= 0)?
   0: no; 2: yes, every shift a right shift (mpq__pk_put_pair4_rs); 1: yes, some not. */
static int mpq__pk_fast(const mpq_channel_quant *q, int32_t n)
{
    int32_t o;
    int right = 1;
    for (o = 0; o < n; ++o) {
        if (q->shift[o] > 31 || q->shift[o] < -30 || q->multiplier[o] < 0) {
            return 0;
        }
        right &= q->shift[o] < 0;
    }
    return right ? 2 : 1;
}

/* The loops of each weight width, with the requantisation path (`fast`), the fused add and
   the extraction period as run-time arguments (one copy of the loop per width keeps the
   code small); W4A4 without an add, the common case, gets its own copy. */
#define MPQ__PK_CONV(name, wb, ev)                                                         \
    static MPQ_NOINLINE void name(const mpq_conv_params *p, const mpq_packed_filter *f,    \
                                  const mpq_channel_quant *q, const mpq_view *in,          \
                                  const mpq_view *out, int32_t *scratch, int32_t every,    \
                                  int fast, const mpq_add_params *add,                     \
                                  const mpq_view *skip, int add_fast)                      \
    {                                                                                      \
        mpq__pk_conv_t(p, f, q, in, out, scratch, wb, ev > 0 ? ev : every, fast,           \
                       ev > 0 ? NULL : add, skip, add_fast, ev == 1);                      \
    }

MPQ__PK_CONV(mpq__pk_conv_w4e1, 4, 1) /* W4A4 without an add */
MPQ__PK_CONV(mpq__pk_conv_w4, 4, 0)
MPQ__PK_CONV(mpq__pk_conv_w2, 2, 0)

/* The convolution of an (activation, weight) bit mix (extraction periods: W4A4 1 block, A2W4
   4, A4W2 3, W2A2 21; mpq.codegen.packed.extraction_period derives them). */
static void mpq__pk_conv_run(const mpq_conv_params *p, const mpq_packed_filter *f,
                             const mpq_channel_quant *q, const mpq_view *in, const mpq_view *out,
                             int32_t *scratch, const mpq_add_params *add, const mpq_view *skip)
{
    const int fast = mpq__pk_fast(q, f->n), add_fast = add != NULL && mpq__add_fast_ok(add);
    if (f->bits == 4 && in->bits == 4 && add == NULL) {
        mpq__pk_conv_w4e1(p, f, q, in, out, scratch, 1, fast, NULL, NULL, 0);
    } else if (f->bits == 4) {
        mpq__pk_conv_w4(p, f, q, in, out, scratch, in->bits == 4 ? 1 : 4, fast, add, skip,
                        add_fast);
    } else {
        mpq__pk_conv_w2(p, f, q, in, out, scratch, in->bits == 4 ? 3 : 21, fast, add, skip,
                        add_fast);
    }
}

int mpq_packed_conv2d(const mpq_conv_params *p, const mpq_packed_filter *f,
                      const mpq_channel_quant *q, const mpq_view *in, const mpq_view *out,
                      int32_t *scratch)
{
    int err;
    if ((err = mpq__pk_conv_check(p, f, in, out)) != MPQ_OK
        || (err = mpq__pk_filter_ok(f, q)) != MPQ_OK) {
        return err;
    }
    if (scratch == NULL) {
        return MPQ_ERR_ARG;
    }
    mpq__pk_conv_run(p, f, q, in, out, (int32_t *)scratch, NULL, NULL);
    return MPQ_OK;
}

int mpq_packed_conv2d_add(const mpq_conv_params *p, const mpq_packed_filter *f,
                          const mpq_channel_quant *q, const mpq_view *in,
                          const mpq_add_params *add, const mpq_view *skip, const mpq_view *out,
                          int32_t *scratch)
{
    int err;
    if (p == NULL || f == NULL || add == NULL) {
        return MPQ_ERR_ARG;
    }
    if ((err = mpq__view_check(in)) != MPQ_OK || (err = mpq__view_check(out)) != MPQ_OK
        || (err = mpq__view_check(skip)) != MPQ_OK || (err = mpq__pk_filter_ok(f, q)) != MPQ_OK) {
        return err;
    }
    if (in->bits != 4 && in->bits != 2) {
        return MPQ_ERR_BITS;
    }
    /* as mpq_conv2d_add: the intermediate result only needs a clamp the add can take */
    if (f->k != f->h * f->w * f->c || p->groups != 1 || in->c != f->c || out->c != f->n
        || p->stride_h < 1 || p->stride_w < 1 || p->dilation_h < 1 || p->dilation_w < 1
        || p->pad_top < 0 || p->pad_left < 0 || !mpq__in_range(p->input_zp, in->bits)
        || !mpq__act_ok(p->act_min, p->act_max, 8)
        || !mpq__act_ok(add->act_min, add->act_max, out->bits)
        || !mpq__in_range(add->a_zp, skip->bits) || !mpq__in_range(add->b_zp, 8)
        || add->left_shift < 0 || add->left_shift > 31 || skip->h != out->h
        || skip->w != out->w || skip->c != out->c || in->data == out->data
        || skip->data == in->data || scratch == NULL) {
        return MPQ_ERR_ARG;
    }
    if (!mpq__alias_ok(skip, out)) {
        return MPQ_ERR_BITS;
    }
    /* a sum written over its skip: only in the very same elements (pairs are read first) */
    if (skip->data == out->data
        && (skip->y0 != out->y0 || skip->x0 != out->x0 || skip->stored_w != out->stored_w)) {
        return MPQ_ERR_ARG;
    }
    mpq__pk_conv_run(p, f, q, in, out, scratch, add, skip);
    return MPQ_OK;
}

/* -- fully connected ------------------------------------------------------------------------ */

int32_t mpq_packed_fully_connected_scratch_size(const mpq_packed_filter *f)
{
    if (f == NULL || f->k < 1) {
        return MPQ_ERR_ARG;
    }
    return 16 * ((f->k + 15) / 16);
}

int mpq_packed_fully_connected(const mpq_fc_params *p, const mpq_packed_filter *f,
                               const mpq_channel_quant *q, const mpq_view *in,
                               const mpq_view *out, int32_t *scratch)
{
    mpq__pk_col c;
    int32_t y, corr, o;
    int err;
    if (p == NULL || f == NULL || scratch == NULL) {
        return MPQ_ERR_ARG;
    }
    if ((err = mpq__view_check(in)) != MPQ_OK || (err = mpq__view_check(out)) != MPQ_OK
        || (err = mpq__pk_filter_ok(f, q)) != MPQ_OK) {
        return err;
    }
    if (in->bits != 4 && in->bits != 2) {
        return MPQ_ERR_BITS;
    }
    if (f->k != in->h * in->w * in->c || f->n != out->h * out->w * out->c
        || !mpq__in_range(p->input_zp, in->bits)
        || !mpq__act_ok(p->act_min, p->act_max, out->bits) || in->data == out->data) {
        return MPQ_ERR_ARG;
    }
    c.lane = (int16_t *)scratch;
    c.n = 0;
    c.oa = 1 << (in->bits - 1);
    c.pend = c.sp = c.sq = 0;
    c.want_sp = mpq__pk_oh(f->bits) != 0;
    for (y = 0; y < in->h; ++y) {
        mpq__pk_run(&c, (const uint8_t *)in->data, in->bits, mpq__at(in, y, 0), in->w * in->c);
    }
    corr = mpq__pk_close(&c, (f->k + 15) / 16, f->bits);
    if (out->h == 1 && out->w == 1) {
        mpq__pk_out_for(in->bits, f->bits)(f, q, p->output_zp, p->act_min, p->act_max,
                                           (const uint32_t *)scratch, corr, out,
                                           mpq__at(out, 0, 0));
        return MPQ_OK;
    }
    /* Outputs spread over several pixels: one channel at a time, stored where it belongs. */
    for (o = 0; o < f->n; ++o) {
        const int32_t nblk = (f->k + 15) / 16;
        const uint32_t *w0 = f->data + o * nblk * (f->bits / 2);
        const int32_t oc = o % out->c, ox = (o / out->c) % out->w, oy = o / (out->c * out->w);
        int32_t s[2];
        if (f->bits == 4) {
            mpq__pk_dot2((const uint32_t *)scratch, w0, w0, nblk, 4, in->bits == 4 ? 1 : 4, s);
        } else {
            mpq__pk_dot2((const uint32_t *)scratch, w0, w0, nblk, 2, in->bits == 4 ? 3 : 21, s);
        }
        mpq__st((uint8_t *)out->data, out->bits, mpq__at(out, oy, ox) + (uint32_t)oc,
                mpq__output((uint32_t)f->bias[o] + (uint32_t)s[0] - (uint32_t)corr,
                            q->multiplier[o], q->shift[o], p->output_zp, p->act_min,
                            p->act_max));
    }
    return MPQ_OK;
}
