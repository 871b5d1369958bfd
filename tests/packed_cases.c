/* Random cases for the packed sub-byte kernels (kernels/mpq_packed.c), all in one program so a
 * single host run or QEMU firmware run checks them all (tests/test_packed_kernels.py).
 *
 * For every kernel kind (1x1 conv, KxK conv, fully connected, conv fused with a residual add)
 * and bit mix (a4w4, a2w2, a4w2,
 * a2w4), CASES random layers - shapes, strides, dilations, padding, view offsets, zero points,
 * requantisation, output bits; some with every operand at an extreme of its range, which is
 * what bounds the packed fields - are run through mpq_packed_* (filter packed by
 * mpq_packed_pack) and through the library's reference kernel (mpq_conv2d /
 * mpq_fully_connected) on identically pre-filled output buffers; every byte must agree. One
 * line per kind and mix: "<kind> a<b>w<b> cases=<n> bad=<mismatching cases> sum=<checksum of
 * the outputs>", the same on every target. Exit code 0 when no case mismatched. Then the same
 * for mpq_conv2d_unpacked (8-bit input with 4-, 2- and 3-bit weights of every format, 4- and
 * 2-bit input with 8-bit weights, 4-bit input with 3-bit weights; 1x1 and KxK; and fused with
 * a residual add, mpq_conv2d_add_unpacked against mpq_conv2d_add: kind unpackadd)
 * against mpq_conv2d's sub-byte weight loops: kinds unpack1x1 and unpackkxk; CASES 4- and
 * 2-bit depthwise layers per activation and weight bits (a4w4, a4w2, a4w8, a2w2, a2w4, a2w8;
 * sub-byte weights of every format) through mpq_depthwise_inplace_grouped (in
 * place) against mpq_conv2d (groups = C): kind dwinplace; and CASES 4- and 2-bit average and
 * max poolings (mpq_avgpool_grouped / mpq_maxpool_grouped) against the formulas
 * computed in this file: kinds avgpool and maxpool, mixes a4o0 and a2o0 (o0: outputs of any
 * bits). Last, kind requant (mix a8o8: 8-bit outputs): CASES draws of 64 (accumulator,
 * multiplier, right shift 0..30) each - a third of them at the ends of their ranges - through the
 * kernels' inline requantisation (mpq__requantize32: one rounding, SMLAL on the Cortex-M) and the
 * 64-bit double rounding of mpq__requantize_wide, plus the zero point and the int8 clamp.
 */
#include <stdint.h>
#include <string.h>

#include "mpq_kernels.h"
#include "mpq_support.h" /* mpq__requantize32 and mpq__requantize_wide: kind requant */

#ifndef CASES
#define CASES 200
#endif

#ifdef PACKED_HOST
#include <stdio.h>
static void emit(const char *s)
{
    fputs(s, stdout);
}
#else
#include "mpq_semihost.h"
static void emit(const char *s)
{
    mpq_sh_write0(s);
}
#endif

static uint32_t rng_state = 12345u;

static uint32_t rnd(void)
{
    rng_state ^= rng_state << 13;
    rng_state ^= rng_state >> 17;
    rng_state ^= rng_state << 5;
    return rng_state;
}

/* uniform in [lo, hi] */
static int32_t rint_(int32_t lo, int32_t hi)
{
    return lo + (int32_t)(rnd() % (uint32_t)(hi - lo + 1));
}

static void put(uint8_t *p, int32_t bits, uint32_t k, int32_t v)
{
    const uint32_t bit = k * (uint32_t)bits;
    const uint32_t mask = ((1u << bits) - 1u) << (bit & 7u);
    if (bits == 8) {
        p[k] = (uint8_t)v;
        return;
    }
    p[bit >> 3] = (uint8_t)((p[bit >> 3] & ~mask) | (((uint32_t)v << (bit & 7u)) & mask));
}

#define MAX_IN 4096      /* bytes of input storage */
#define MAX_OUT 2048     /* bytes of output storage */
#define MAX_W 8192       /* bytes of weights */
#define MAX_N 64         /* output channels */
#define MAX_K 1024       /* elements per filter row */

static uint8_t in_buf[MAX_IN];
static uint8_t out_ref[MAX_OUT], out_pk[MAX_OUT];
static uint8_t wts[MAX_W];
static uint32_t packed[MAX_N * MAX_K / 8];
static int32_t bias[MAX_N], cbias[MAX_N], mult[MAX_N], shift[MAX_N];
static int16_t scratch16[MAX_K];
static int32_t scratch32[MAX_K / 4 + 4];

/* A value of `bits` bits: uniform, or (mode 1/2) the range's minimum/maximum. */
static int32_t value(int32_t bits, int mode)
{
    const int32_t lo = -(1 << (bits - 1)), hi = (1 << (bits - 1)) - 1;
    return mode == 1 ? lo : mode == 2 ? hi : rint_(lo, hi);
}

/* Half the layers have every shift in [-9, 0] (the kernels' 32-bit requantisation path), the
   others some left shifts too (up to 1, or now and then up to 31: the packed kernels' 32-bit
   path with the left shift first). */
static void fill_quant(int32_t n)
{
    const int32_t smax = rint_(0, 1) == 0 ? 0 : rint_(0, 3) == 0 ? 31 : 1;
    int32_t o;
    for (o = 0; o < n; ++o) {
        bias[o] = rint_(0, 3) == 0 ? (int32_t)rnd() : rint_(-5000, 5000);
        mult[o] = rint_(1 << 30, 0x7FFFFFFF);
        shift[o] = rint_(-9, smax);
    }
}

/* Random weights of n rows of k values: uniform or all at an extreme of the linear range
   (and, rarely, the code -2^(b-1) too: the packed fields are sized for it). */
static void fill_weights(int32_t wbits, int32_t n, int32_t k, int mode)
{
    const int32_t lim = (1 << (wbits - 1)) - 1;
    int32_t i;
    memset(wts, 0, sizeof wts);
    for (i = 0; i < n * k; ++i) {
        int32_t v = mode == 1 ? -lim - (rint_(0, 1)) : mode == 2 ? lim : rint_(-lim, lim);
        put(wts, wbits, (uint32_t)i, v);
    }
}

static uint32_t checksum(uint32_t sum, const uint8_t *p, int32_t n)
{
    int32_t i;
    for (i = 0; i < n; ++i) {
        sum = sum * 31u + p[i];
    }
    return sum;
}

static void fmt_u(char *dst, uint32_t v)
{
    char t[12];
    int n = 0;
    do {
        t[n++] = (char)('0' + v % 10u);
        v /= 10u;
    } while (v != 0u);
    while (n > 0) {
        *dst++ = t[--n];
    }
    *dst = '\0';
}

/* Appends src to dst (no <string.h> string functions: the firmware has no C library). */
static void append(char *dst, const char *src)
{
    while (*dst != '\0') {
        ++dst;
    }
    while ((*dst++ = *src++) != '\0') {
    }
}

static void report(const char *kind, int32_t abits, int32_t wbits, int32_t cases, int32_t bad,
                   uint32_t sum)
{
    char line[96], num[12];
    line[0] = '\0';
    append(line, kind);
    append(line, abits == 4 ? " a4" : " a2");
    append(line, wbits == 4 ? "w4 cases=" : "w2 cases=");
    fmt_u(num, (uint32_t)cases);
    append(line, num);
    append(line, " bad=");
    fmt_u(num, (uint32_t)bad);
    append(line, num);
    append(line, " sum=");
    fmt_u(num, sum);
    append(line, num);
    append(line, "\n");
    emit(line);
}

static uint8_t skip_buf[MAX_OUT];

/* Random TFLM add constants (left shift 20; the 32-bit path or, with smax 1, the general one). */
static void fill_add(mpq_add_params *a, int32_t skip_bits, int32_t b_zp, int32_t obits)
{
    const int32_t smax = rint_(0, 3) == 0;
    const int32_t r1 = value(obits, 0), r2 = value(obits, 0);
    a->a_zp = value(skip_bits, 0);
    a->a_multiplier = rint_(1 << 30, 0x7FFFFFFF);
    a->a_shift = rint_(-2, smax);
    a->b_zp = b_zp;
    a->b_multiplier = rint_(1 << 30, 0x7FFFFFFF);
    a->b_shift = rint_(-2, 0);
    a->left_shift = 20;
    a->output_zp = value(obits, 0);
    a->output_multiplier = rint_(1 << 30, 0x7FFFFFFF);
    a->output_shift = rint_(-22, -17);
    a->act_min = rint_(0, 1) ? -(1 << (obits - 1)) : (r1 < r2 ? r1 : r2);
    a->act_max = rint_(0, 1) ? (1 << (obits - 1)) - 1 : (r1 < r2 ? r2 : r1);
}

/* One random convolution (kind 0: 1x1, 1: KxK; with_add: fused with a residual add, the skip
   either the output's own storage or a view of its own); returns 1 when the kernels
   disagree. */
static int conv_case(int kind, int32_t abits, int32_t wbits, int with_add, uint32_t *sum)
{
    const int mode = rint_(0, 5) < 4 ? 0 : rint_(1, 2);
    const int32_t obits = rint_(0, 2) == 0 ? 8 : rint_(0, 1) ? 4 : 2;
    mpq_conv_params p;
    mpq_filter f;
    mpq_packed_filter pf;
    mpq_channel_quant q;
    mpq_view in, out;
    mpq_add_params add;
    mpq_view skip;
    int32_t kh, kw, h, w, cin, cout, pb, pr, oh, ow, i, r1, r2, nbytes, in_elems, inplace = 0;
    kh = kind == 0 ? 1 : rint_(1, 3);
    kw = kind == 0 ? 1 : rint_(1, 3);
    h = rint_(1, 5);
    w = rint_(1, 5);
    cin = rint_(1, kind == 0 ? 40 : 12);
    cout = rint_(1, 12);
    memset(&p, 0, sizeof p);
    p.stride_h = rint_(1, 2);
    p.stride_w = rint_(1, 2);
    p.dilation_h = kind == 0 ? 1 : rint_(1, 2);
    p.dilation_w = kind == 0 ? 1 : rint_(1, 2);
    p.pad_top = kind == 0 ? 0 : rint_(0, kh - 1);
    p.pad_left = kind == 0 ? 0 : rint_(0, kw - 1);
    pb = kind == 0 ? 0 : rint_(0, kh - 1);
    pr = kind == 0 ? 0 : rint_(0, kw - 1);
    oh = (h + p.pad_top + pb - p.dilation_h * (kh - 1) - 1) / p.stride_h + 1;
    ow = (w + p.pad_left + pr - p.dilation_w * (kw - 1) - 1) / p.stride_w + 1;
    if (h + p.pad_top + pb - p.dilation_h * (kh - 1) < 1
        || w + p.pad_left + pr - p.dilation_w * (kw - 1) < 1) {
        kh = kw = 1;
        p.dilation_h = p.dilation_w = 1;
        p.pad_top = p.pad_left = 0;
        oh = (h - 1) / p.stride_h + 1;
        ow = (w - 1) / p.stride_w + 1;
    }
    p.groups = 1;
    p.input_zp = value(abits, mode);
    p.output_zp = value(obits, 0);
    r1 = value(obits, 0);
    r2 = value(obits, 0);
    p.act_min = rint_(0, 1) ? -(1 << (obits - 1)) : (r1 < r2 ? r1 : r2);
    p.act_max = rint_(0, 1) ? (1 << (obits - 1)) - 1 : (r1 < r2 ? r2 : r1);
    /* the input: a view at an offset inside a wider stored tensor */
    in.data = in_buf;
    in.bits = abits;
    in.h = h;
    in.w = w;
    in.c = cin;
    in.y0 = rint_(0, 1);
    in.x0 = rint_(0, 1);
    in.stored_w = in.x0 + w + rint_(0, 1);
    in_elems = (in.y0 + h) * in.stored_w * cin;
    for (i = 0; i < in_elems; ++i) {
        put(in_buf, abits, (uint32_t)i, value(abits, mode == 0 ? 0 : (rint_(0, 3) ? mode : 0)));
    }
    out.data = out_ref;
    out.bits = obits;
    out.h = oh;
    out.w = ow;
    out.c = cout;
    out.y0 = rint_(0, 1);
    out.x0 = rint_(0, 1);
    out.stored_w = out.x0 + ow + rint_(0, 1);
    nbytes = ((out.y0 + oh) * out.stored_w * cout * obits + 7) / 8;
    if (in_elems * abits > 8 * MAX_IN || nbytes > MAX_OUT || cout * kh * kw * cin * 4 > 8 * MAX_W
        || kh * kw * cin > MAX_K) {
        return -1;
    }
    fill_weights(wbits, cout, kh * kw * cin, mode);
    fill_quant(cout);
    f.data = wts;
    f.bits = wbits;
    f.n = cout;
    f.h = kh;
    f.w = kw;
    f.c = cin;
    f.format = MPQ_WFMT_LINEAR;
    f.codebook = NULL;
    q.bias = bias;
    q.multiplier = mult;
    q.shift = shift;
    if (mpq_packed_pack(&f, bias, abits, p.input_zp, packed, cbias) != MPQ_OK) {
        return 1;
    }
    pf.data = packed;
    pf.bias = cbias;
    pf.bits = wbits;
    pf.n = cout;
    pf.h = kh;
    pf.w = kw;
    pf.c = cin;
    pf.k = kh * kw * cin;
    for (i = 0; i < nbytes; ++i) {
        out_ref[i] = out_pk[i] = (uint8_t)rnd();
    }
    if (with_add) {
        inplace = rint_(0, 1);
        if (inplace) {
            skip = out;
        } else {
            skip.data = skip_buf;
            skip.bits = rint_(0, 2) == 0 ? 8 : rint_(0, 1) ? 4 : 2;
            skip.h = oh;
            skip.w = ow;
            skip.c = cout;
            skip.y0 = rint_(0, 1);
            skip.x0 = rint_(0, 1);
            skip.stored_w = skip.x0 + ow + rint_(0, 1);
            for (i = 0; i < MAX_OUT; ++i) {
                skip_buf[i] = (uint8_t)rnd();
            }
            if (((skip.y0 + oh) * skip.stored_w * cout * skip.bits + 7) / 8 > MAX_OUT) {
                return -1;
            }
        }
        fill_add(&add, skip.bits, p.output_zp, obits);
        if (mpq_conv2d_add(&p, &f, &q, &in, &add, &skip, &out, scratch16) != MPQ_OK) {
            return 1;
        }
        out.data = out_pk;
        if (inplace) {
            skip.data = out_pk;
        }
        if (mpq_packed_conv2d_scratch_size(&p, &pf, &in, &out) > (int32_t)sizeof scratch32
            || mpq_packed_conv2d_add(&p, &pf, &q, &in, &add, &skip, &out, scratch32) != MPQ_OK) {
            return 1;
        }
    } else {
        if (mpq_conv2d(&p, &f, &q, &in, &out, scratch16) != MPQ_OK) {
            return 1;
        }
        out.data = out_pk;
        if (mpq_packed_conv2d_scratch_size(&p, &pf, &in, &out) > (int32_t)sizeof scratch32
            || mpq_packed_conv2d(&p, &pf, &q, &in, &out, scratch32) != MPQ_OK) {
            return 1;
        }
    }
    *sum = checksum(*sum, out_pk, nbytes);
    return memcmp(out_ref, out_pk, (size_t)nbytes) != 0;
}

/* One random fully connected layer; returns 1 when the kernels disagree. */
static int fc_case(int32_t abits, int32_t wbits, uint32_t *sum)
{
    const int mode = rint_(0, 5) < 4 ? 0 : rint_(1, 2);
    const int32_t obits = rint_(0, 2) == 0 ? 8 : rint_(0, 1) ? 4 : 2;
    mpq_fc_params p;
    mpq_filter f;
    mpq_packed_filter pf;
    mpq_channel_quant q;
    mpq_view in, out;
    int32_t k, n, i, nbytes, in_elems;
    const int long_row = rint_(0, 3) == 0;
    in.data = in_buf;
    in.bits = abits;
    in.h = rint_(1, 3);
    in.w = rint_(1, 3);
    in.c = long_row ? rint_(40, 110) : rint_(1, 24);
    in.y0 = rint_(0, 1);
    in.x0 = rint_(0, 1);
    in.stored_w = in.x0 + in.w + rint_(0, 1);
    k = in.h * in.w * in.c;
    n = long_row ? rint_(1, 6) : rint_(1, 20);
    in_elems = (in.y0 + in.h) * in.stored_w * in.c;
    for (i = 0; i < in_elems; ++i) {
        put(in_buf, abits, (uint32_t)i, value(abits, mode == 0 ? 0 : (rint_(0, 3) ? mode : 0)));
    }
    out.data = out_ref;
    out.bits = obits;
    if (rint_(0, 3) == 0 && n % 2 == 0) {  /* outputs spread over a 1 x 2 x n/2 view */
        out.h = 1;
        out.w = 2;
        out.c = n / 2;
    } else {
        out.h = out.w = 1;
        out.c = n;
    }
    out.y0 = 0;
    out.x0 = 0;
    out.stored_w = out.w;
    nbytes = (n * obits + 7) / 8;
    if (in_elems * abits > 8 * MAX_IN || k > MAX_K || n * k * 4 > 8 * MAX_W) {
        return -1;
    }
    memset(&p, 0, sizeof p);
    p.input_zp = value(abits, mode);
    p.output_zp = value(obits, 0);
    p.act_min = -(1 << (obits - 1));
    p.act_max = (1 << (obits - 1)) - 1;
    fill_weights(wbits, n, k, mode);
    fill_quant(n);
    f.data = wts;
    f.bits = wbits;
    f.n = n;
    f.h = in.h;
    f.w = in.w;
    f.c = in.c;
    f.format = MPQ_WFMT_LINEAR;
    f.codebook = NULL;
    q.bias = bias;
    q.multiplier = mult;
    q.shift = shift;
    if (mpq_packed_pack(&f, bias, abits, p.input_zp, packed, cbias) != MPQ_OK) {
        return 1;
    }
    pf.data = packed;
    pf.bias = cbias;
    pf.bits = wbits;
    pf.n = n;
    pf.h = in.h;
    pf.w = in.w;
    pf.c = in.c;
    pf.k = k;
    for (i = 0; i < nbytes; ++i) {
        out_ref[i] = out_pk[i] = (uint8_t)rnd();
    }
    if (mpq_fully_connected(&p, &f, &q, &in, &out) != MPQ_OK) {
        return 1;
    }
    out.data = out_pk;
    if (mpq_packed_fully_connected_scratch_size(&pf) > (int32_t)sizeof scratch32
        || mpq_packed_fully_connected(&p, &pf, &q, &in, &out, scratch32) != MPQ_OK) {
        return 1;
    }
    *sum = checksum(*sum, out_pk, nbytes);
    return memcmp(out_ref, out_pk, (size_t)nbytes) != 0;
}

static int16_t scratch_u[4096];
static int8_t codebook[16];

/* Random codes of n rows of k weights of `wbits` bits in format fmt (CODEBOOK: a random
   table of int8 entries; POW2 and LINEAR codes: any code the format's decoding takes). */
static void fill_codes(int32_t wbits, int32_t fmt, int32_t n, int32_t k, int mode)
{
    int32_t i;
    if (fmt == MPQ_WFMT_LINEAR) {
        fill_weights(wbits, n, k, mode);
        return;
    }
    memset(wts, 0, sizeof wts);
    for (i = 0; i < 16; ++i) {
        codebook[i] = (int8_t)(mode == 1 ? -128 : mode == 2 ? 127 : rint_(-128, 127));
    }
    for (i = 0; i < n * k; ++i) {
        const uint32_t u = (uint32_t)rint_(0, (1 << wbits) - 1);
        const uint32_t bit = (uint32_t)i * (uint32_t)wbits;
        /* codes of any width, 3-bit ones straddling bytes */
        wts[bit >> 3] |= (uint8_t)(u << (bit & 7u));
        if ((bit & 7u) + (uint32_t)wbits > 8u) {
            wts[(bit >> 3) + 1u] |= (uint8_t)(u >> (8u - (bit & 7u)));
        }
    }
}

/* One random convolution with an `abits`-bit input and `wbits`-bit weights (kind 0: 1x1, 1:
   KxK; sub-byte weights LINEAR, CODEBOOK or POW2 at random where the width allows it) through
   mpq_conv2d and through mpq_conv2d_unpacked; returns 1 when they disagree. */
static int unpack_case(int kind, int32_t abits, int32_t wbits, int with_add, uint32_t *sum)
{
    const int mode = rint_(0, 5) < 4 ? 0 : rint_(1, 2);
    const int32_t obits = rint_(0, 2) == 0 ? 8 : rint_(0, 1) ? 4 : 2;
    const int32_t fmt = wbits == 8   ? MPQ_WFMT_LINEAR
                        : wbits == 3 ? rint_(1, 2)
                        : rint_(0, 3) < 2 ? MPQ_WFMT_LINEAR : rint_(1, 2);
    mpq_conv_params p;
    mpq_filter f;
    mpq_channel_quant q;
    mpq_view in, out;
    int32_t kh, kw, h, w, cin, cout, pb, pr, oh, ow, i, r1, r2, nbytes, in_elems;
    kh = kind == 0 ? 1 : rint_(1, 3);
    kw = kind == 0 ? 1 : rint_(1, 3);
    h = rint_(1, 6);
    w = rint_(1, 6);
    cin = rint_(1, kind == 0 ? 40 : 12);
    cout = rint_(1, 16);
    memset(&p, 0, sizeof p);
    p.stride_h = rint_(1, 2);
    p.stride_w = rint_(1, 2);
    p.dilation_h = kind == 0 ? 1 : rint_(1, 2);
    p.dilation_w = kind == 0 ? 1 : rint_(1, 2);
    p.pad_top = kind == 0 ? 0 : rint_(0, kh - 1);
    p.pad_left = kind == 0 ? 0 : rint_(0, kw - 1);
    pb = kind == 0 ? 0 : rint_(0, kh - 1);
    pr = kind == 0 ? 0 : rint_(0, kw - 1);
    oh = (h + p.pad_top + pb - p.dilation_h * (kh - 1) - 1) / p.stride_h + 1;
    ow = (w + p.pad_left + pr - p.dilation_w * (kw - 1) - 1) / p.stride_w + 1;
    if (h + p.pad_top + pb - p.dilation_h * (kh - 1) < 1
        || w + p.pad_left + pr - p.dilation_w * (kw - 1) < 1) {
        kh = kw = 1;
        p.dilation_h = p.dilation_w = 1;
        p.pad_top = p.pad_left = 0;
        oh = (h - 1) / p.stride_h + 1;
        ow = (w - 1) / p.stride_w + 1;
    }
    p.groups = 1;
    p.input_zp = value(abits, mode);
    p.output_zp = value(obits, 0);
    r1 = value(obits, 0);
    r2 = value(obits, 0);
    p.act_min = rint_(0, 1) ? -(1 << (obits - 1)) : (r1 < r2 ? r1 : r2);
    p.act_max = rint_(0, 1) ? (1 << (obits - 1)) - 1 : (r1 < r2 ? r2 : r1);
    in.data = in_buf;
    in.bits = abits;
    in.h = h;
    in.w = w;
    in.c = cin;
    in.y0 = rint_(0, 1);
    in.x0 = rint_(0, 1);
    in.stored_w = in.x0 + w + rint_(0, 1);
    in_elems = (in.y0 + h) * in.stored_w * cin;
    out.data = out_ref;
    out.bits = obits;
    out.h = oh;
    out.w = ow;
    out.c = cout;
    out.y0 = rint_(0, 1);
    out.x0 = rint_(0, 1);
    out.stored_w = out.x0 + ow + rint_(0, 1);
    nbytes = ((out.y0 + oh) * out.stored_w * cout * obits + 7) / 8;
    if (in_elems * abits > 8 * MAX_IN || nbytes > MAX_OUT
        || cout * kh * kw * cin * wbits > 8 * MAX_W || kh * kw * cin > MAX_K) {
        return -1;
    }
    for (i = 0; i < in_elems; ++i) {
        put(in_buf, abits, (uint32_t)i, value(abits, mode == 0 ? 0 : (rint_(0, 3) ? mode : 0)));
    }
    fill_codes(wbits, fmt, cout, kh * kw * cin, mode);
    fill_quant(cout);
    f.data = wts;
    f.bits = wbits;
    f.n = cout;
    f.h = kh;
    f.w = kw;
    f.c = cin;
    f.format = fmt;
    f.codebook = fmt == MPQ_WFMT_CODEBOOK ? codebook : NULL;
    q.bias = rint_(0, 7) == 0 ? NULL : bias;
    q.multiplier = mult;
    q.shift = shift;
    for (i = 0; i < nbytes; ++i) {
        out_ref[i] = out_pk[i] = (uint8_t)rnd();
    }
    if (with_add) {
        mpq_add_params add;
        mpq_view skip;
        const int inplace = rint_(0, 1);
        if (inplace) {
            skip = out;
        } else {
            skip.data = skip_buf;
            skip.bits = rint_(0, 2) == 0 ? 8 : rint_(0, 1) ? 4 : 2;
            skip.h = oh;
            skip.w = ow;
            skip.c = cout;
            skip.y0 = rint_(0, 1);
            skip.x0 = rint_(0, 1);
            skip.stored_w = skip.x0 + ow + rint_(0, 1);
            for (i = 0; i < MAX_OUT; ++i) {
                skip_buf[i] = (uint8_t)rnd();
            }
            if (((skip.y0 + oh) * skip.stored_w * cout * skip.bits + 7) / 8 > MAX_OUT) {
                return -1;
            }
        }
        /* the conv's own clamp: the add's 8-bit input */
        p.output_zp = value(8, 0);
        p.act_min = -128;
        p.act_max = 127;
        fill_add(&add, skip.bits, p.output_zp, obits);
        if (mpq_conv2d_add(&p, &f, &q, &in, &add, &skip, &out, scratch16) != MPQ_OK) {
            return 1;
        }
        out.data = out_pk;
        if (inplace) {
            skip.data = out_pk;
        }
        if (mpq_conv2d_unpacked_scratch_size(&p, &f, &in, &out) > (int32_t)sizeof scratch_u
            || mpq_conv2d_add_unpacked(&p, &f, &q, &in, &add, &skip, &out, scratch_u)
                   != MPQ_OK) {
            return 1;
        }
    } else {
        if (mpq_conv2d(&p, &f, &q, &in, &out, scratch16) != MPQ_OK) {
            return 1;
        }
        out.data = out_pk;
        if (mpq_conv2d_unpacked_scratch_size(&p, &f, &in, &out) > (int32_t)sizeof scratch_u
            || mpq_conv2d_unpacked(&p, &f, &q, &in, &out, scratch_u) != MPQ_OK) {
            return 1;
        }
    }
    *sum = checksum(*sum, out_pk, nbytes);
    return memcmp(out_ref, out_pk, (size_t)nbytes) != 0;
}

static uint8_t dw_buf[MAX_OUT];
static int8_t dw_scratch[2048];

static int32_t get(const uint8_t *p, int32_t bits, uint32_t k)
{
    const uint32_t bit = k * (uint32_t)bits;
    const uint32_t u = ((uint32_t)p[bit >> 3] >> (bit & 7u)) & ((1u << bits) - 1u);
    const uint32_t sign = 1u << (bits - 1);
    return (int32_t)(u ^ sign) - (int32_t)sign;
}

/* One random abits-bit (4 or 2) depthwise layer with a channel count that fills whole bytes
   (mpq_depthwise_inplace_grouped; 3x3 at strides 1 and 2 half the time, else any
   kernel up to 5x5, any stride and dilation; wbits-bit weights, sub-byte ones of every format;
   requantisation with right shifts, left shifts up to 31 - the 32-bit path's pre-shift - and
   now and then beyond the 32-bit path), run in place and through mpq_conv2d (groups = C, a
   separate output): every output element must agree, and the input elements the output does
   not cover keep their values. Returns 1 when they disagree. */
static int dw_case(int32_t abits, int32_t wbits, uint32_t *sum)
{
    const int mode = rint_(0, 5) < 4 ? 0 : rint_(1, 2);
    const int32_t group = 8 / abits;
    const int32_t fmt = wbits == 8 ? MPQ_WFMT_LINEAR
                        : rint_(0, 3) < 2 ? MPQ_WFMT_LINEAR : rint_(1, 2);
    const int k3 = rint_(0, 1);
    mpq_conv_params p;
    mpq_filter f;
    mpq_channel_quant q;
    mpq_view in, out, ref;
    int32_t kh, kw, h, w, c, oh, ow, pb, pr, i, y, x, ch, r1, r2, elems, bad = 0;
    kh = k3 ? 3 : rint_(1, 5);
    kw = k3 ? 3 : rint_(1, 5);
    h = rint_(1, 9);
    w = rint_(1, 9);
    c = group * rint_(1, 24 / group);
    memset(&p, 0, sizeof p);
    p.stride_h = rint_(1, 2);
    p.stride_w = rint_(1, 2);
    p.dilation_h = k3 ? 1 : rint_(1, 2);
    p.dilation_w = k3 ? 1 : rint_(1, 2);
    p.pad_top = rint_(0, kh - 1);
    p.pad_left = rint_(0, kw - 1);
    pb = rint_(0, kh - 1);
    pr = rint_(0, kw - 1);
    if (h + p.pad_top + pb - p.dilation_h * (kh - 1) < 1
        || w + p.pad_left + pr - p.dilation_w * (kw - 1) < 1) {
        return -1;
    }
    oh = (h + p.pad_top + pb - p.dilation_h * (kh - 1) - 1) / p.stride_h + 1;
    ow = (w + p.pad_left + pr - p.dilation_w * (kw - 1) - 1) / p.stride_w + 1;
    if (oh > h || ow > w) {  /* in place: the output inside the input's storage */
        return -1;
    }
    p.groups = c;
    p.input_zp = value(abits, mode);
    p.output_zp = value(abits, 0);
    r1 = value(abits, 0);
    r2 = value(abits, 0);
    p.act_min = rint_(0, 1) ? -(1 << (abits - 1)) : (r1 < r2 ? r1 : r2);
    p.act_max = rint_(0, 1) ? (1 << (abits - 1)) - 1 : (r1 < r2 ? r2 : r1);
    in.data = dw_buf;
    in.bits = abits;
    in.h = h;
    in.w = w;
    in.c = c;
    in.y0 = rint_(0, 1);
    in.x0 = rint_(0, 1);
    in.stored_w = in.x0 + w + rint_(0, 1);
    elems = (in.y0 + h) * in.stored_w * c;
    if (elems * abits > 8 * MAX_IN || elems * abits > 8 * MAX_OUT
        || (p.pad_top + h + kh) * (p.pad_left + w + kw) * 2 > (int32_t)sizeof dw_scratch) {
        return -1;
    }
    for (i = 0; i < elems; ++i) {
        put(in_buf, abits, (uint32_t)i, value(abits, mode == 0 ? 0 : (rint_(0, 3) ? mode : 0)));
    }
    fill_codes(wbits, fmt, c, kh * kw, mode);
    fill_quant(c);
    if (rint_(0, 3) == 0) {  /* left shifts up to 31, and some beyond the 32-bit path */
        for (i = 0; i < c; ++i) {
            shift[i] = rint_(0, 7) == 0 ? rint_(-40, 40) : rint_(0, 1) ? rint_(1, 31) : shift[i];
            mult[i] = rint_(0, 15) == 0 ? -(int32_t)(rnd() >> 1) : mult[i];
        }
    }
    f.data = wts;
    f.bits = wbits;
    f.n = c;
    f.h = kh;
    f.w = kw;
    f.c = 1;
    f.format = fmt;
    f.codebook = fmt == MPQ_WFMT_CODEBOOK ? codebook : NULL;
    q.bias = rint_(0, 7) == 0 ? NULL : bias;
    q.multiplier = mult;
    q.shift = shift;
    /* the reference: mpq_conv2d from the input's copy into a separate buffer */
    ref = in;
    ref.data = in_buf;
    out = in;
    out.data = out_ref;
    out.h = oh;
    out.w = ow;
    for (i = 0; i < MAX_OUT; ++i) {
        out_ref[i] = (uint8_t)rnd();
    }
    if (mpq_conv2d(&p, &f, &q, &ref, &out, scratch16) != MPQ_OK) {
        return 1;
    }
    memcpy(dw_buf, in_buf, (size_t)((elems * abits + 7) / 8));
    out.data = dw_buf;
    if (mpq_depthwise_inplace_grouped(&p, &f, &q, &in, &out, dw_scratch) != MPQ_OK) {
        return 1;
    }
    for (y = 0; y < in.y0 + h; ++y) {
        for (x = 0; x < in.stored_w; ++x) {
            const int covered = y >= in.y0 && y < in.y0 + oh && x >= in.x0 && x < in.x0 + ow;
            for (ch = 0; ch < c; ++ch) {
                const uint32_t k = (uint32_t)((y * in.stored_w + x) * c + ch);
                const int32_t want = covered ? get(out_ref, abits, k) : get(in_buf, abits, k);
                const int32_t got = get(dw_buf, abits, k);
                bad |= want != got;
                *sum = *sum * 31u + (uint32_t)(got & 15);
            }
        }
    }
    return bad;
}

/* One random ibits-bit (4 or 2) average (maxp 0) or max (maxp 1) pooling with a channel count
   that fills whole bytes (mpq_avgpool_grouped / mpq_maxpool_grouped; C a multiple of
   32/ibits half the time: the DSP's words of channels), against the formula computed here
   element by element: over the in-view taps v = sum > 0 ? (sum + cnt/2)/cnt : (sum - cnt/2)/cnt,
   or their maximum (act_min for a window with none), clamped; output of any bits. Returns 1
   when they disagree. */
static int pool_case(int32_t ibits, int maxp, uint32_t *sum)
{
    const int mode = rint_(0, 5) < 4 ? 0 : rint_(1, 2);
    const int32_t obits = rint_(0, 2) == 0 ? 8 : rint_(0, 1) ? 4 : 2;
    mpq_pool_params p;
    mpq_view in, out;
    int32_t h, w, c, oh, ow, i, y, x, ch, ky, kx, r1, r2, elems, nbytes, bad = 0;
    h = rint_(1, 9);
    w = rint_(1, 9);
    c = rint_(0, 1) ? 32 / ibits * rint_(1, 6) : 8 / ibits * rint_(1, 12);
    p.kernel_h = rint_(0, 3) == 0 ? h : rint_(1, 3);
    p.kernel_w = rint_(0, 3) == 0 ? w : rint_(1, 3);
    p.stride_h = rint_(1, 2);
    p.stride_w = rint_(1, 2);
    p.pad_top = rint_(0, p.kernel_h - 1);
    p.pad_left = rint_(0, p.kernel_w - 1);
    oh = (h + p.pad_top - p.kernel_h) / p.stride_h + 1;
    ow = (w + p.pad_left - p.kernel_w) / p.stride_w + 1;
    if (oh < 1 || ow < 1) {
        return -1;
    }
    r1 = value(obits, 0);
    r2 = value(obits, 0);
    p.act_min = rint_(0, 1) ? -(1 << (obits - 1)) : (r1 < r2 ? r1 : r2);
    p.act_max = rint_(0, 1) ? (1 << (obits - 1)) - 1 : (r1 < r2 ? r2 : r1);
    if (!maxp && p.act_min < -(1 << (ibits - 1))) {
        p.act_min = -(1 << (ibits - 1));  /* the mean stays in the input's range */
    }
    if (!maxp && p.act_max > (1 << (ibits - 1)) - 1) {
        p.act_max = (1 << (ibits - 1)) - 1;
    }
    if (p.act_max < p.act_min) {
        p.act_max = p.act_min;
    }
    in.data = in_buf;
    in.bits = ibits;
    in.h = h;
    in.w = w;
    in.c = c;
    in.y0 = rint_(0, 1);
    in.x0 = rint_(0, 1);
    in.stored_w = in.x0 + w + rint_(0, 1);
    elems = (in.y0 + h) * in.stored_w * c;
    out.data = out_pk;
    out.bits = obits;
    out.h = oh;
    out.w = ow;
    out.c = c;
    out.y0 = rint_(0, 1);
    out.x0 = rint_(0, 1);
    out.stored_w = out.x0 + ow + rint_(0, 1);
    nbytes = ((out.y0 + oh) * out.stored_w * c * obits + 7) / 8;
    if (elems * ibits > 8 * MAX_IN || nbytes > MAX_OUT) {
        return -1;
    }
    for (i = 0; i < elems; ++i) {
        put(in_buf, ibits, (uint32_t)i, value(ibits, mode == 0 ? 0 : (rint_(0, 3) ? mode : 0)));
    }
    for (i = 0; i < nbytes; ++i) {
        out_ref[i] = out_pk[i] = (uint8_t)rnd();
    }
    for (y = 0; y < oh; ++y) {
        for (x = 0; x < ow; ++x) {
            for (ch = 0; ch < c; ++ch) {
                int32_t s = 0, cnt = 0, v = 0, mx = p.act_min;
                for (ky = 0; ky < p.kernel_h; ++ky) {
                    for (kx = 0; kx < p.kernel_w; ++kx) {
                        const int32_t iy = y * p.stride_h - p.pad_top + ky;
                        const int32_t ix = x * p.stride_w - p.pad_left + kx;
                        if (iy >= 0 && iy < h && ix >= 0 && ix < w) {
                            const int32_t e = get(in_buf, ibits, (uint32_t)(((in.y0 + iy)
                                * in.stored_w + in.x0 + ix) * c + ch));
                            s += e;
                            mx = cnt == 0 || e > mx ? e : mx;
                            ++cnt;
                        }
                    }
                }
                if (maxp) {
                    v = mx;
                } else if (cnt > 0) {
                    v = s > 0 ? (s + cnt / 2) / cnt : (s - cnt / 2) / cnt;
                }
                v = v < p.act_min ? p.act_min : v > p.act_max ? p.act_max : v;
                put(out_ref, obits, (uint32_t)(((out.y0 + y) * out.stored_w + out.x0 + x) * c
                                               + ch), v);
            }
        }
    }
    if ((maxp ? mpq_maxpool_grouped(&p, &in, &out) : mpq_avgpool_grouped(&p, &in, &out))
        != MPQ_OK) {
        return 1;
    }
    *sum = checksum(*sum, out_pk, nbytes);
    bad = memcmp(out_ref, out_pk, (size_t)nbytes) != 0;
    return bad;
}

static void report_unpack(int kind, int32_t abits, int32_t wbits, int32_t cases, int32_t bad,
                          uint32_t sum)
{
    char line[96], num[12];
    line[0] = '\0';
    append(line, kind == 0   ? "unpack1x1 a"
                 : kind == 1 ? "unpackkxk a"
                 : kind == 2 ? "dwinplace a"
                 : kind == 3 ? "avgpool a"
                 : kind == 5 ? "maxpool a"
                 : kind == 6 ? "requant a"
                             : "unpackadd a");
    fmt_u(num, (uint32_t)abits);
    append(line, num);
    append(line, kind == 3 || kind >= 5 ? "o" : "w");
    fmt_u(num, (uint32_t)wbits);
    append(line, num);
    append(line, " cases=");
    fmt_u(num, (uint32_t)cases);
    append(line, num);
    append(line, " bad=");
    fmt_u(num, (uint32_t)bad);
    append(line, num);
    append(line, " sum=");
    fmt_u(num, sum);
    append(line, num);
    append(line, "\n");
    emit(line);
}

/* One draw of 64 requantisations (kind requant): mpq__requantize32 against
   mpq__requantize_wide. Returns 1 when any differs. */
static int32_t rq_value(int32_t lo, int32_t hi)
{
    const int32_t pick = rint_(0, 5);
    return pick == 0 ? lo : pick == 1 ? hi : pick == 2 ? lo + rint_(0, 2) : (int32_t)rnd();
}

static int requant_case(uint32_t *sum)
{
    int bad = 0, i;
    for (i = 0; i < 64; ++i) {
        const int32_t acc = rint_(0, 1) ? rq_value(INT32_MIN, INT32_MAX) : rint_(-40000, 40000);
        const int32_t m = rint_(0, 3) == 0 ? rq_value(0, INT32_MAX)
                                           : (int32_t)(0x40000000u | (rnd() & 0x3FFFFFFFu));
        const int32_t s = -rint_(0, 30), zp = rint_(-128, 127);
        const int32_t got = mpq__clamp_add(mpq__requantize32(acc, m, s), zp, -128, 127);
        const int32_t want = mpq__clamp((int64_t)mpq__requantize_wide(acc, m, s) + zp, -128, 127);
        bad |= got != want;
        *sum = *sum * 31u + (uint32_t)got;
    }
    return bad;
}

int main(void)
{
    static const char *const kinds[4] = {"conv1x1", "convkxk", "fc", "convadd"};
    static const int32_t mixes[4][2] = {{4, 4}, {2, 2}, {4, 2}, {2, 4}};
    int total_bad = 0, kind, m;
    for (kind = 0; kind < 4; ++kind) {
        for (m = 0; m < 4; ++m) {
            const int32_t abits = mixes[m][0], wbits = mixes[m][1];
            int32_t cases = 0, bad = 0;
            uint32_t sum = 0;
            while (cases < CASES) {
                const int r = kind < 2    ? conv_case(kind, abits, wbits, 0, &sum)
                              : kind == 2 ? fc_case(abits, wbits, &sum)
                                          : conv_case(rint_(0, 1), abits, wbits, 1, &sum);
                if (r >= 0) {
                    ++cases;
                    bad += r;
                }
            }
            report(kinds[kind], abits, wbits, cases, bad, sum);
            total_bad += bad;
        }
    }
    /* 8-bit inputs with sub-byte weights: mpq_conv2d_unpacked */
    for (kind = 0; kind < 2; ++kind) {
        static const int32_t mix_u[6][2] = {{8, 4}, {8, 2}, {8, 3}, {4, 8}, {2, 8}, {4, 3}};
        for (m = 0; m < 6; ++m) {
            int32_t cases = 0, bad = 0;
            uint32_t sum = 0;
            while (cases < CASES) {
                const int r = unpack_case(kind, mix_u[m][0], mix_u[m][1], 0, &sum);
                if (r >= 0) {
                    ++cases;
                    bad += r;
                }
            }
            report_unpack(kind, mix_u[m][0], mix_u[m][1], cases, bad, sum);
            total_bad += bad;
        }
    }
    /* fused with the residual add: mpq_conv2d_add_unpacked against mpq_conv2d_add */
    for (m = 0; m < 3; ++m) {
        static const int32_t mix_a[3][2] = {{4, 8}, {8, 4}, {2, 8}};
        int32_t cases = 0, bad = 0;
        uint32_t sum = 0;
        while (cases < CASES) {
            const int r = unpack_case(rint_(0, 1), mix_a[m][0], mix_a[m][1], 1, &sum);
            if (r >= 0) {
                ++cases;
                bad += r;
            }
        }
        report_unpack(4, mix_a[m][0], mix_a[m][1], cases, bad, sum);
        total_bad += bad;
    }
    /* 4- and 2-bit depthwise in place, channel groups: per activation and weight bits */
    for (m = 0; m < 6; ++m) {
        static const int32_t mix_d[6][2] = {{4, 4}, {4, 2}, {4, 8}, {2, 2}, {2, 4}, {2, 8}};
        int32_t cases = 0, bad = 0;
        uint32_t sum = 0;
        while (cases < CASES) {
            const int r = dw_case(mix_d[m][0], mix_d[m][1], &sum);
            if (r >= 0) {
                ++cases;
                bad += r;
            }
        }
        report_unpack(2, mix_d[m][0], mix_d[m][1], cases, bad, sum);
        total_bad += bad;
    }
    /* 4- and 2-bit average and max pooling, channel groups (any output bits: "o" 0) */
    for (kind = 3; kind <= 5; kind += 2) {
        for (m = 4; m >= 2; m -= 2) {
            int32_t cases = 0, bad = 0;
            uint32_t sum = 0;
            while (cases < CASES) {
                const int r = pool_case(m, kind == 5, &sum);
                if (r >= 0) {
                    ++cases;
                    bad += r;
                }
            }
            report_unpack(kind, m, 0, cases, bad, sum);
            total_bad += bad;
        }
    }
    {
        int32_t cases = 0, bad = 0;
        uint32_t sum = 0;
        for (; cases < CASES; ++cases) {
            bad += requant_case(&sum);
        }
        report_unpack(6, 8, 8, cases, bad, sum);
        total_bad += bad;
    }
    return total_bad != 0;
}
