/* mpq_pool.c: mpq_avgpool and mpq_maxpool, and their channel-group forms for 4- and 2-bit
 * inputs (mpq_avgpool_grouped, mpq_maxpool_grouped); a global average pool in parts
 * (mpq_avgpool_accumulate, mpq_avgpool_finish).
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

/* The rounded mean of mpq_avgpool: sum / cnt rounded half away from zero (0 for cnt = 0),
   clamped. */
static inline int32_t mpq__avg(int32_t sum, int32_t cnt, int32_t lo, int32_t hi)
{
    int32_t v = 0;
    if (cnt > 0) {
        v = sum > 0 ? (sum + cnt / 2) / cnt : (sum - cnt / 2) / cnt;
    }
    return v < lo ? lo : (v > hi ? hi : v);  /* in int32: the mean of the window's values */
}

#if MPQ_USE_DSP
/* The low and high halfwords of an SXTAB16 sum, sign-extended. */
static inline int32_t mpq__pool_lo(int32_t v)
{
    return (int32_t)(((uint32_t)v & 0xFFFFu) ^ 0x8000u) - 0x8000;
}

static inline int32_t mpq__pool_hi(int32_t v)
{
    return mpq__asr32(v, 16);
}
#endif

/* mpq_avgpool's sums for 8-bit inputs and outputs, straight from the bytes: per output pixel
   the window's rows are walked with pointers. With the DSP and a channel count that is a
   multiple of 4, four channels at a time: SXTAB16 adds the bytes of a word to two halfword
   pairs (channels 0/2 and 1/3), which cannot wrap for windows of at most 256 taps
   (|sum| <= 256 * 128 = 2^15). Each avgpool body is a function of its own: inlined together,
   GCC spills inside their inner loops. */
static MPQ_NOINLINE void mpq__avgpool_s8(const mpq_pool_params *p, const mpq_view *in,
                                        const mpq_view *out)
{
    const int8_t *src = (const int8_t *)in->data;
    uint8_t *dst = (uint8_t *)out->data;
    const int32_t c = out->c, lo = p->act_min, hi = p->act_max;
    int32_t oy, ox, ch, y, x, ylo, yhi, xlo, xhi;
    for (oy = 0; oy < out->h; ++oy) {
        mpq__window(oy * p->stride_h - p->pad_top, p->kernel_h, in->h, &ylo, &yhi);
        for (ox = 0; ox < out->w; ++ox) {
            uint8_t *d = dst + mpq__at(out, oy, ox);
            int32_t cnt;
            mpq__window(ox * p->stride_w - p->pad_left, p->kernel_w, in->w, &xlo, &xhi);
            cnt = (yhi - ylo) * (xhi - xlo);
            ch = 0;
#if MPQ_USE_DSP
            if (c % 4 == 0 && cnt <= 256) {
                for (; ch < c; ch += 4) {
                    int32_t s02 = 0, s13 = 0;
                    for (y = ylo; y < yhi; ++y) {
                        const int8_t *s = src + mpq__at(in, y, xlo) + ch;
                        for (x = xlo; x < xhi; ++x, s += c) {
                            const int32_t v = mpq__word(s);
                            s02 = mpq__sxtab16(s02, v);
                            s13 = mpq__sxtab16_r8(s13, v);
                        }
                    }
                    d[ch] = (uint8_t)mpq__avg(mpq__pool_lo(s02), cnt, lo, hi);
                    d[ch + 1] = (uint8_t)mpq__avg(mpq__pool_lo(s13), cnt, lo, hi);
                    d[ch + 2] = (uint8_t)mpq__avg(mpq__pool_hi(s02), cnt, lo, hi);
                    d[ch + 3] = (uint8_t)mpq__avg(mpq__pool_hi(s13), cnt, lo, hi);
                }
            }
#endif
            for (; ch < c; ++ch) {
                int32_t sum = 0;
                for (y = ylo; y < yhi; ++y) {
                    const int8_t *s = src + mpq__at(in, y, xlo) + ch;
                    for (x = xlo; x < xhi; ++x, s += c) {
                        sum += *s;
                    }
                }
                d[ch] = (uint8_t)mpq__avg(sum, cnt, lo, hi);
            }
        }
    }
}

/* mpq_avgpool_grouped for 4-bit inputs (an even C): the channels in pairs, which share
   every input byte, both sums from that byte (each nibble sign-extended times 16: the top of a
   signed byte). With the DSP and C a multiple of 8, eight channels per word: the words' low
   and high nibbles masked to the top of their bytes, SXTAB16 adds them to four halfword pairs,
   which hold 16 * sum exactly for windows of at most 256 taps (|16 * sum| <= 2^15). A 4-bit
   output pair is written as one byte. */
static MPQ_NOINLINE void mpq__avgpool_x4(const mpq_pool_params *p, const mpq_view *in,
                                        const mpq_view *out)
{
    const uint8_t *src = (const uint8_t *)in->data;
    uint8_t *dst = (uint8_t *)out->data;
    const int32_t c = out->c, lo = p->act_min, hi = p->act_max, obits = out->bits;
    const uint32_t step = (uint32_t)c >> 1;  /* bytes per input pixel */
    int32_t oy, ox, ch, y, x, ylo, yhi, xlo, xhi, i;
    for (oy = 0; oy < out->h; ++oy) {
        mpq__window(oy * p->stride_h - p->pad_top, p->kernel_h, in->h, &ylo, &yhi);
        for (ox = 0; ox < out->w; ++ox) {
            const uint32_t ko = mpq__at(out, oy, ox);
            int32_t cnt, v[8];
            mpq__window(ox * p->stride_w - p->pad_left, p->kernel_w, in->w, &xlo, &xhi);
            cnt = (yhi - ylo) * (xhi - xlo);
            for (ch = 0; ch < c; ch += 2) {
                int n = 2;
#if MPQ_USE_DSP
                if (c % 8 == 0 && cnt <= 256) {
                    int32_t l02 = 0, l13 = 0, h02 = 0, h13 = 0;
                    for (y = ylo; y < yhi; ++y) {
                        const uint8_t *s = src + ((mpq__at(in, y, xlo) + (uint32_t)ch) >> 1);
                        for (x = xlo; x < xhi; ++x, s += step) {
                            const uint32_t w = (uint32_t)mpq__word(s);
                            const int32_t l = mpq__i32((w << 4) & 0xF0F0F0F0u);
                            const int32_t h = mpq__i32(w & 0xF0F0F0F0u);
                            l02 = mpq__sxtab16(l02, l);
                            l13 = mpq__sxtab16_r8(l13, l);
                            h02 = mpq__sxtab16(h02, h);
                            h13 = mpq__sxtab16_r8(h13, h);
                        }
                    }
                    /* channel 2j: low nibble of byte j; 2j + 1: its high nibble */
                    v[0] = mpq__pool_lo(l02);
                    v[1] = mpq__pool_lo(h02);
                    v[2] = mpq__pool_lo(l13);
                    v[3] = mpq__pool_lo(h13);
                    v[4] = mpq__pool_hi(l02);
                    v[5] = mpq__pool_hi(h02);
                    v[6] = mpq__pool_hi(l13);
                    v[7] = mpq__pool_hi(h13);
                    n = 8;
                } else
#endif
                {
                    int32_t sl = 0, sh = 0;
                    for (y = ylo; y < yhi; ++y) {
                        const uint8_t *s = src + ((mpq__at(in, y, xlo) + (uint32_t)ch) >> 1);
                        for (x = xlo; x < xhi; ++x, s += step) {
                            sl += (int32_t)(int8_t)(uint8_t)((uint32_t)s[0] << 4);
                            sh += (int32_t)(int8_t)(uint8_t)(s[0] & 0xF0u);
                        }
                    }
                    v[0] = sl;
                    v[1] = sh;
                }
                for (i = 0; i < n; i += 2) {
                    const int32_t a = mpq__avg(mpq__asr32(v[i], 4), cnt, lo, hi);
                    const int32_t b = mpq__avg(mpq__asr32(v[i + 1], 4), cnt, lo, hi);
                    const uint32_t k = ko + (uint32_t)(ch + i);
                    if (obits == 4) {
                        dst[k >> 1] = (uint8_t)(((uint32_t)a & 15u) | ((uint32_t)b << 4));
                    } else {
                        mpq__st(dst, obits, k, a);
                        mpq__st(dst, obits, k + 1u, b);
                    }
                }
                ch += n - 2;
            }
        }
    }
}

/* The field of byte b that a left shift by `la` puts at the byte's top, as a signed byte: a
   2-bit value times 64. */
static inline int32_t mpq__pool_f2(uint32_t b, int32_t la)
{
    return (int32_t)(int8_t)(uint8_t)((b << la) & 0xC0u);
}

/* mpq_avgpool_grouped for 2-bit inputs (C a multiple of 4): the channels in quads, which share
   every input byte, the four sums from that byte (each field sign-extended times 64: the top of a
   signed byte). With the DSP and C a multiple of 16, sixteen channels per word: each of the
   word's four fields masked to the top of its bytes, SXTAB16 adds them to eight halfword pairs,
   which hold 64 * sum exactly for windows of at most 256 taps (|64 * sum| <= 2^15). A 2-bit
   output quad is written as one byte. */
static MPQ_NOINLINE void mpq__avgpool_x2(const mpq_pool_params *p, const mpq_view *in,
                                        const mpq_view *out)
{
    const uint8_t *src = (const uint8_t *)in->data;
    uint8_t *dst = (uint8_t *)out->data;
    const int32_t c = out->c, lo = p->act_min, hi = p->act_max, obits = out->bits;
    const uint32_t step = (uint32_t)c >> 2;  /* bytes per input pixel */
    int32_t oy, ox, ch, y, x, ylo, yhi, xlo, xhi, i, j;
    for (oy = 0; oy < out->h; ++oy) {
        mpq__window(oy * p->stride_h - p->pad_top, p->kernel_h, in->h, &ylo, &yhi);
        for (ox = 0; ox < out->w; ++ox) {
            const uint32_t ko = mpq__at(out, oy, ox);
            int32_t cnt, v[16];
            mpq__window(ox * p->stride_w - p->pad_left, p->kernel_w, in->w, &xlo, &xhi);
            cnt = (yhi - ylo) * (xhi - xlo);
            for (ch = 0; ch < c; ch += 4) {
                int n = 4;
#if MPQ_USE_DSP
                if (c % 16 == 0 && cnt <= 256) {
                    int32_t a02 = 0, a13 = 0, b02 = 0, b13 = 0, c02 = 0, c13 = 0, d02 = 0,
                            d13 = 0;
                    for (y = ylo; y < yhi; ++y) {
                        const uint8_t *s = src + ((mpq__at(in, y, xlo) + (uint32_t)ch) >> 2);
                        for (x = xlo; x < xhi; ++x, s += step) {
                            const uint32_t w = (uint32_t)mpq__word(s);
                            const int32_t fa = mpq__i32((w << 6) & 0xC0C0C0C0u);
                            const int32_t fb = mpq__i32((w << 4) & 0xC0C0C0C0u);
                            const int32_t fc = mpq__i32((w << 2) & 0xC0C0C0C0u);
                            const int32_t fd = mpq__i32(w & 0xC0C0C0C0u);
                            a02 = mpq__sxtab16(a02, fa);
                            a13 = mpq__sxtab16_r8(a13, fa);
                            b02 = mpq__sxtab16(b02, fb);
                            b13 = mpq__sxtab16_r8(b13, fb);
                            c02 = mpq__sxtab16(c02, fc);
                            c13 = mpq__sxtab16_r8(c13, fc);
                            d02 = mpq__sxtab16(d02, fd);
                            d13 = mpq__sxtab16_r8(d13, fd);
                        }
                    }
                    /* channel 4j + f: field f (bits 2f, 2f + 1) of byte j */
                    v[0] = mpq__pool_lo(a02);
                    v[1] = mpq__pool_lo(b02);
                    v[2] = mpq__pool_lo(c02);
                    v[3] = mpq__pool_lo(d02);
                    v[4] = mpq__pool_lo(a13);
                    v[5] = mpq__pool_lo(b13);
                    v[6] = mpq__pool_lo(c13);
                    v[7] = mpq__pool_lo(d13);
                    v[8] = mpq__pool_hi(a02);
                    v[9] = mpq__pool_hi(b02);
                    v[10] = mpq__pool_hi(c02);
                    v[11] = mpq__pool_hi(d02);
                    v[12] = mpq__pool_hi(a13);
                    v[13] = mpq__pool_hi(b13);
                    v[14] = mpq__pool_hi(c13);
                    v[15] = mpq__pool_hi(d13);
                    n = 16;
                } else
#endif
                {
                    int32_t s0 = 0, s1 = 0, s2 = 0, s3 = 0;
                    for (y = ylo; y < yhi; ++y) {
                        const uint8_t *s = src + ((mpq__at(in, y, xlo) + (uint32_t)ch) >> 2);
                        for (x = xlo; x < xhi; ++x, s += step) {
                            const uint32_t b = s[0];
                            s0 += mpq__pool_f2(b, 6);
                            s1 += mpq__pool_f2(b, 4);
                            s2 += mpq__pool_f2(b, 2);
                            s3 += mpq__pool_f2(b, 0);
                        }
                    }
                    v[0] = s0;
                    v[1] = s1;
                    v[2] = s2;
                    v[3] = s3;
                }
                for (i = 0; i < n; i += 4) {
                    const uint32_t k = ko + (uint32_t)(ch + i);
                    int32_t a[4];
                    for (j = 0; j < 4; ++j) {
                        a[j] = mpq__avg(mpq__asr32(v[i + j], 6), cnt, lo, hi);
                    }
                    if (obits == 2) {
                        dst[k >> 2] = (uint8_t)(((uint32_t)a[0] & 3u) | (((uint32_t)a[1] & 3u) << 2)
                                                | (((uint32_t)a[2] & 3u) << 4)
                                                | ((uint32_t)a[3] << 6));
                    } else {
                        for (j = 0; j < 4; ++j) {
                            mpq__st(dst, obits, k + (uint32_t)j, a[j]);
                        }
                    }
                }
                ch += n - 4;
            }
        }
    }
}

/* The rule of the channel-group pooling entry points: a 4- or 2-bit input whose C fills whole
   bytes (MPQ_ERR_BITS at 8 bits) and an output that does not share its storage. */
static int mpq__pool_groups_check(const mpq_pool_params *p, const mpq_view *in,
                                  const mpq_view *out)
{
    const int err = mpq__pool_check(p, in, out);
    if (err != MPQ_OK) {
        return err;
    }
    if (in->bits == 8) {
        return MPQ_ERR_BITS;
    }
    if (in->c % (8 / in->bits) != 0 || in->data == out->data) {
        return MPQ_ERR_ARG;
    }
    return MPQ_OK;
}

int mpq_avgpool_grouped(const mpq_pool_params *p, const mpq_view *in, const mpq_view *out)
{
    const int err = mpq__pool_groups_check(p, in, out);
    if (err != MPQ_OK) {
        return err;
    }
    if (in->bits == 4) {
        mpq__avgpool_x4(p, in, out);
    } else {
        mpq__avgpool_x2(p, in, out);
    }
    return MPQ_OK;
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
    if (in->bits == 8 && out->bits == 8) {
        mpq__avgpool_s8(p, in, out);
        return MPQ_OK;
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
                for (y = ylo; y < yhi; ++y) {
                    for (x = xlo; x < xhi; ++x) {
                        sum += mpq__ld(src, in->bits, mpq__at(in, y, x) + (uint32_t)ch);
                    }
                }
                mpq__st(dst, out->bits, ko + (uint32_t)ch,
                        mpq__avg(sum, cnt, p->act_min, p->act_max));
            }
        }
    }
    return MPQ_OK;
}

int mpq_avgpool_accumulate(const mpq_view *in, int32_t *sums)
{
    int32_t y, x, ch;
    const uint8_t *src;
    const int err = mpq__view_check(in);
    if (err != MPQ_OK) {
        return err;
    }
    if (sums == NULL) {
        return MPQ_ERR_ARG;
    }
    src = (const uint8_t *)in->data;
    for (y = 0; y < in->h; ++y) {
        for (x = 0; x < in->w; ++x) {
            const uint32_t k = mpq__at(in, y, x);
            if (in->bits == 8) {
                const int8_t *s = (const int8_t *)src + k;
                for (ch = 0; ch < in->c; ++ch) {
                    sums[ch] += s[ch];
                }
            } else {
                for (ch = 0; ch < in->c; ++ch) {
                    sums[ch] += mpq__ld(src, in->bits, k + (uint32_t)ch);
                }
            }
        }
    }
    return MPQ_OK;
}

int mpq_avgpool_finish(const int32_t *sums, int32_t count, int32_t act_min, int32_t act_max,
                       const mpq_view *out)
{
    int32_t ch;
    uint8_t *dst;
    const int err = mpq__view_check(out);
    if (err != MPQ_OK) {
        return err;
    }
    if (sums == NULL || count < 1 || out->h != 1 || out->w != 1
        || !mpq__act_ok(act_min, act_max, out->bits)) {
        return MPQ_ERR_ARG;
    }
    dst = (uint8_t *)out->data;
    for (ch = 0; ch < out->c; ++ch) {
        mpq__st(dst, out->bits, mpq__at(out, 0, 0) + (uint32_t)ch,
                mpq__avg(sums[ch], count, act_min, act_max));
    }
    return MPQ_OK;
}

/* mpq_maxpool_grouped: 4- and 2-bit inputs whose C fills whole bytes (even at 4 bits, a multiple
   of 4 at 2): every input byte is read once for its 8/bits channels, each field compared at the
   top of a signed byte (its value times 2^(8 - bits): the order is the values'). With the DSP
   and a pixel of whole words, four bytes at a time: each field of the word masked to the top
   of its bytes, SSUB8/SEL keep the bytewise maxima (mpq__smax8). A window with no tap in view
   gives act_min; output of any bits, a byte of the input's width written whole. */
static void mpq__maxpool_groups(const mpq_pool_params *p, const mpq_view *in,
                                const mpq_view *out)
{
    const uint8_t *src = (const uint8_t *)in->data;
    uint8_t *dst = (uint8_t *)out->data;
    const int32_t bits = in->bits, obits = out->bits, sc = 8 - bits, group = 8 / bits;
    const int32_t lo = p->act_min, hi = p->act_max;
    const uint32_t step = (uint32_t)(out->c / group);  /* bytes per input pixel */
    const uint32_t top = (0xFFu << sc) & 0xFFu;        /* a field at the top of a byte */
    int32_t oy, ox, y, x, ylo, yhi, xlo, xhi, j, f;
    uint32_t b;
    for (oy = 0; oy < out->h; ++oy) {
        mpq__window(oy * p->stride_h - p->pad_top, p->kernel_h, in->h, &ylo, &yhi);
        for (ox = 0; ox < out->w; ++ox) {
            const uint32_t ko = mpq__at(out, oy, ox);
            mpq__window(ox * p->stride_w - p->pad_left, p->kernel_w, in->w, &xlo, &xhi);
            for (b = 0; b < step; b += (uint32_t)j) {
                /* m[f][i]: the maximum of field f of byte b + i, times 2^sc, as a signed byte */
                int32_t m[4][4];
                j = 1;
#if MPQ_USE_DSP
                if (step % 4 == 0) {
                    int32_t w0 = mpq__i32(0x80808080u), w1 = w0, w2 = w0, w3 = w0;
                    for (y = ylo; y < yhi; ++y) {
                        const uint8_t *s = src + (mpq__at(in, y, xlo) * (uint32_t)bits >> 3) + b;
                        for (x = xlo; x < xhi; ++x, s += step) {
                            const uint32_t v = (uint32_t)mpq__word(s);
                            if (bits == 4) {
                                w0 = mpq__smax8(w0, mpq__i32((v << 4) & 0xF0F0F0F0u));
                                w1 = mpq__smax8(w1, mpq__i32(v & 0xF0F0F0F0u));
                            } else {
                                w0 = mpq__smax8(w0, mpq__i32((v << 6) & 0xC0C0C0C0u));
                                w1 = mpq__smax8(w1, mpq__i32((v << 4) & 0xC0C0C0C0u));
                                w2 = mpq__smax8(w2, mpq__i32((v << 2) & 0xC0C0C0C0u));
                                w3 = mpq__smax8(w3, mpq__i32(v & 0xC0C0C0C0u));
                            }
                        }
                    }
                    for (j = 0; j < 4; ++j) {
                        m[0][j] = (int8_t)(uint8_t)((uint32_t)w0 >> (8 * j));
                        m[1][j] = (int8_t)(uint8_t)((uint32_t)w1 >> (8 * j));
                        m[2][j] = (int8_t)(uint8_t)((uint32_t)w2 >> (8 * j));
                        m[3][j] = (int8_t)(uint8_t)((uint32_t)w3 >> (8 * j));
                    }
                } else
#endif
                {
                    m[0][0] = m[1][0] = m[2][0] = m[3][0] = -128;
                    for (y = ylo; y < yhi; ++y) {
                        const uint8_t *s = src + (mpq__at(in, y, xlo) * (uint32_t)bits >> 3) + b;
                        for (x = xlo; x < xhi; ++x, s += step) {
                            for (f = 0; f < group; ++f) {
                                const int32_t v = (int8_t)(uint8_t)(((uint32_t)s[0]
                                                                     << (sc - bits * f)) & top);
                                m[f][0] = v > m[f][0] ? v : m[f][0];
                            }
                        }
                    }
                }
                /* byte b + i holds channels group*(b + i) + f */
                for (x = 0; x < j; ++x) {
                    const uint32_t k = ko + (b + (uint32_t)x) * (uint32_t)group;
                    uint32_t byte = 0;
                    for (f = 0; f < group; ++f) {
                        const int32_t v = yhi > ylo && xhi > xlo
                                          ? mpq__clamp(mpq__asr32(m[f][x], sc), lo, hi) : lo;
                        if (obits == bits) {
                            byte |= ((uint32_t)v & ((1u << bits) - 1u)) << (bits * f);
                        } else {
                            mpq__st(dst, obits, k + (uint32_t)f, v);
                        }
                    }
                    if (obits == bits) {
                        dst[k * (uint32_t)bits >> 3] = (uint8_t)byte;
                    }
                }
            }
        }
    }
}

int mpq_maxpool_grouped(const mpq_pool_params *p, const mpq_view *in, const mpq_view *out)
{
    const int err = mpq__pool_groups_check(p, in, out);
    if (err != MPQ_OK) {
        return err;
    }
    mpq__maxpool_groups(p, in, out);
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
