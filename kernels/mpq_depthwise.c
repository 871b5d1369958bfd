/* mpq_depthwise.c: mpq_depthwise_inplace, its channel-group form for 4- and 2-bit tensors
 * (mpq_depthwise_inplace_grouped) and their scratch size.
 *
 * Part of mpq's portable kernel library (API and formulas: mpq_kernels.h; shared helpers:
 * mpq_support.h).
 */
#include "mpq_support.h"

/* -- in-place depthwise (TinyEngine; runtimes.md sec. 3) --------------------------------------- */

/* Checks the arguments of the in-place depthwise and gives the implied bottom/right padding
   (rows/columns of the padded channel below/right of the input that the output reaches). */
static int mpq__dw_inplace_check(const mpq_conv_params *p, const mpq_filter *f,
                                 const mpq_view *in, const mpq_view *out, int32_t *pad_bottom,
                                 int32_t *pad_right)
{
    int32_t reach;
    int err;
    if (p == NULL || f == NULL || f->data == NULL) {
        return MPQ_ERR_ARG;
    }
    if ((err = mpq__view_check(in)) != MPQ_OK || (err = mpq__view_check(out)) != MPQ_OK
        || (err = mpq__filter_ok(f)) != MPQ_OK) {
        return err;
    }
    if (in->bits != out->bits) {
        return MPQ_ERR_BITS;
    }
    if (f->c != 1 || f->n != in->c || out->c != in->c || p->groups != in->c || f->h < 1
        || f->w < 1 || p->stride_h < 1 || p->stride_w < 1 || p->dilation_h < 1
        || p->dilation_w < 1 || p->pad_top < 0 || p->pad_left < 0
        || !mpq__in_range(p->input_zp, in->bits)) {
        return MPQ_ERR_ARG;
    }
    reach = (out->h - 1) * p->stride_h + (f->h - 1) * p->dilation_h + 1;
    *pad_bottom = reach > p->pad_top + in->h ? reach - p->pad_top - in->h : 0;
    reach = (out->w - 1) * p->stride_w + (f->w - 1) * p->dilation_w + 1;
    *pad_right = reach > p->pad_left + in->w ? reach - p->pad_left - in->w : 0;
    return MPQ_OK;
}

int32_t mpq_depthwise_inplace_scratch_size(const mpq_conv_params *p, const mpq_filter *f,
                                           const mpq_view *in, const mpq_view *out)
{
    int32_t pb, pr;
    const int err = mpq__dw_inplace_check(p, f, in, out, &pb, &pr);
    if (err != MPQ_OK) {
        return err;
    }
    return (p->pad_top + in->h + pb) * (p->pad_left + in->w + pr);
}

/* Saves input row iy of channel ch into d[0 .. W-1] as int8 values: strided bytes at 8 bits;
   at sub-byte widths, when the pixel stride is whole bytes, the channel's element sits at the
   same bit of every pixel. Not inlined: inside mpq_depthwise_inplace's channel loop it costs the
   hot loops registers (KWS int8 depthwise layers 0.8 % more instructions). */
static MPQ_NOINLINE void mpq__dw_save_row(const mpq_view *in, int32_t iy, int32_t ch, int8_t *d)
{
    const uint8_t *src = (const uint8_t *)in->data;
    const uint32_t k0 = mpq__at(in, iy, 0) + (uint32_t)ch;
    const int32_t bits = in->bits;
    int32_t x;
    if (bits == 8) {
        const int8_t *s = (const int8_t *)src + k0;
        /* The view's width and pixel stride in locals: a byte store may alias any memory, so
           in->w and in->c would be read again after every store; four bytes per round. */
        const int32_t w = in->w, step = in->c;
#if defined(MPQ_HOST_FAST) && !MPQ_USE_DSP
        mpq__host_gather8(s, step, w, d);
        return;
#endif
        for (x = 0; x + 4 <= w; x += 4, s += 4 * step) {
            const int8_t v0 = s[0], v1 = s[step], v2 = s[2 * step], v3 = s[3 * step];
            d[x] = v0;
            d[x + 1] = v1;
            d[x + 2] = v2;
            d[x + 3] = v3;
        }
        for (; x < w; ++x, s += step) {
            d[x] = s[0];
        }
    } else if (mpq__at_byte((uint32_t)in->c, bits)) {
        const uint8_t *s = src + ((k0 * (uint32_t)bits) >> 3);
        const uint32_t sh = (k0 * (uint32_t)bits) & 7u;
        const int32_t step = in->c * bits / 8;
        const uint32_t sign = 1u << (bits - 1);
        const uint32_t mask = (sign << 1) - 1u;
        for (x = 0; x < in->w; ++x) {
            d[x] = (int8_t)((int32_t)((((uint32_t)s[x * step] >> sh) & mask) ^ sign)
                            - (int32_t)sign);
        }
    } else {
        for (x = 0; x < in->w; ++x) {
            d[x] = (int8_t)mpq__ld(src, bits, k0 + (uint32_t)(x * in->c));
        }
    }
}

/* Splits channel quantisation (m, s) for the 32-bit requantisation: returns whether
   mpq__requantize32(acc << *ls, m, *rs) is mpq__requantize(acc, m, s) - M >= 0 and -30 <= S <= 31
   (for a left shift S > 0, x = acc << S wrapped to int32 and x*M/2^31 stays inside int32, so
   the 32-bit rounding at shift 0 is hi itself; 2-bit weights give such shifts). Otherwise
   *ls = 0 and *rs = s, for mpq__output. */
static MPQ_INLINE int mpq__dw_split(int32_t m, int32_t s, int32_t *ls, int32_t *rs)
{
    const int fast = m >= 0 && s >= -30 && s <= 31;
    *ls = fast && s > 0 ? s : 0;
    *rs = fast && s > 0 ? 0 : s;
    return fast;
}

/* The output value of accumulator acc with channel quantisation split by mpq__dw_split:
   clamp(requant(acc, M, S) + zp, lo, hi). */
static MPQ_INLINE int32_t mpq__dw_value(uint32_t acc, int32_t m, int32_t ls, int32_t rs,
                                        int fast, int32_t zp, int32_t lo, int32_t hi)
{
    if (fast) {
        return mpq__clamp_add(mpq__requantize32(mpq__i32(acc << ls), m, rs), zp, lo, hi);
    }
    return mpq__output(acc, m, rs, zp, lo, hi);
}

/* The output stage of one channel, copied into locals (a byte store may alias any memory). */
typedef struct {
    int32_t mult, shift, fast, lo, hi, zp, bits;
    uint8_t *data;
} mpq__dw_out;

/* Stores the output of accumulator acc as element k (mpq__output; fast: no left shift). */
static MPQ_INLINE void mpq__dw_put(const mpq__dw_out *o, uint32_t k, uint32_t acc)
{
    const int32_t v = mpq__dw_value(acc, o->mult, 0, o->shift, o->fast, o->zp, o->lo, o->hi);
    if (o->bits == 8) {
        o->data[k] = (uint8_t)v;
    } else {
        mpq__st(o->data, o->bits, k, v);
    }
}

/* W[wk + t] for t < taps, weights of any format decoded, into w32[t] when w32 is not NULL,
   else into w8[t] (every format's values are int8: mpq__wval; the channel pairs' frames keep
   a quarter of int32's stack); returns their sum (mod 2^32). */
static MPQ_NOINLINE uint32_t mpq__dw_weights(const mpq_filter *f, uint32_t wk, int32_t taps,
                                             int32_t *w32, int8_t *w8)
{
    const uint8_t *wts = (const uint8_t *)f->data;
    uint32_t wsum = 0;
    int32_t t;
    for (t = 0; t < taps; ++t) {
        const int32_t v = f->format == MPQ_WFMT_LINEAR
            ? mpq__ld(wts, f->bits, wk + (uint32_t)t)
            : mpq__wval(f, mpq__code(wts, f->bits, wk + (uint32_t)t));
        if (w32 != NULL) {
            w32[t] = v;
        } else {
            w8[t] = (int8_t)v;
        }
        wsum += (uint32_t)v;
    }
    return wsum;
}

/* -- sub-byte channel groups (4-bit pairs, 2-bit quads) ------------------------------------- */

/* The field of byte b that a left shift by `la` puts at the byte's top, as a signed byte: the
   field's value times 2^(8 - bits) (mask8 = the top `bits` bits). */
static MPQ_INLINE int32_t mpq__dw_field(int32_t b, int32_t la, uint32_t mask8)
{
    return (int32_t)(int8_t)(uint8_t)(((uint32_t)b << la) & mask8);
}

/* The fixed arguments of one channel pair's pass (mpq__dw_pass). */
typedef struct {
    const mpq_conv_params *p;
    const mpq_filter *f;
    const mpq_channel_quant *q;
    const mpq_view *out;
    const int8_t *plane;  /* the group's saved, padded plane: one byte per pixel */
    int32_t pw;           /* its row length */
    int32_t cg;           /* the group's first channel */
} mpq__dw_group;

/* One channel pair (ca, ca + 1) of a sub-byte channel group: its decoded weights (int8,
   mpq__dw_weights), the accumulators' start (bias - input_zp * sum(W)) and the
   requantisation (mpq__dw_split). */
typedef struct {
    int8_t wa[MPQ_DW_TAPS], wb[MPQ_DW_TAPS];
    uint32_t acca, accb;
    int32_t ma, mb, lsa, rsa, lsb, rsb, fa, fb;
} mpq__dw_pair;

/* Fills pair `c` for channels ca, ca + 1 of the group's filter. */
static MPQ_NOINLINE void mpq__dw_pair_init(const mpq__dw_group *g, int32_t ca, mpq__dw_pair *c)
{
    const mpq_filter *f = g->f;
    const mpq_channel_quant *q = g->q;
    const int32_t taps = f->h * f->w;
    const uint32_t zp = (uint32_t)g->p->input_zp;
    const uint32_t suma = mpq__dw_weights(f, (uint32_t)(ca * taps), taps, NULL, c->wa);
    const uint32_t sumb = mpq__dw_weights(f, (uint32_t)((ca + 1) * taps), taps, NULL, c->wb);
    c->acca = (q->bias != NULL ? (uint32_t)q->bias[ca] : 0u) - zp * suma;
    c->accb = (q->bias != NULL ? (uint32_t)q->bias[ca + 1] : 0u) - zp * sumb;
    c->ma = q->multiplier[ca];
    c->mb = q->multiplier[ca + 1];
    c->fa = mpq__dw_split(c->ma, q->shift[ca], &c->lsa, &c->rsa);
    c->fb = mpq__dw_split(c->mb, q->shift[ca + 1], &c->lsb, &c->rsb);
}

/* Outputs ox0 .. W-1 of output row oy of a channel pair, tap by tap (any filter, stride and
   dilation; any requantisation): each output byte of the group gets the pair's two fields -
   channel ca's is the one a left shift by `la` puts at the top of a byte (times 2^(8 - bits)),
   ca + 1's the one by la - bits - written whole when `first` (zero above), else or-ed in. */
static MPQ_NOINLINE void mpq__dw_rest(const mpq__dw_group *g, const mpq__dw_pair *c,
                                      int32_t bits, int32_t la, int first, int32_t oy,
                                      int32_t ox0)
{
    const mpq_conv_params *p = g->p;
    const int32_t fh = g->f->h, fw = g->f->w, sw = p->stride_w, dw = p->dilation_w;
    const int32_t lb = la - bits, sc = 8 - bits, sa = 8 - bits - la, sb = sa + bits;
    const uint32_t omask = (1u << bits) - 1u, mask8 = (0xFFu << sc) & 0xFFu;
    const int32_t zp = p->output_zp, lo = p->act_min, hi = p->act_max, rs = p->dilation_h * g->pw;
    const int32_t out_w = g->out->w;
    const uint32_t kstep = (uint32_t)g->out->c * (uint32_t)bits >> 3;
    const int8_t *line = g->plane + oy * p->stride_h * g->pw;
    uint8_t *o = (uint8_t *)g->out->data
                 + ((mpq__at(g->out, oy, ox0) + (uint32_t)g->cg) * (uint32_t)bits >> 3);
    int32_t ox, ky, kx, t;
    for (ox = ox0; ox < out_w; ++ox, o += kstep) {
        const int8_t *base = line + ox * sw;
        int32_t x = 0, y = 0;
        uint32_t ya, yb, v;
        for (ky = 0, t = 0; ky < fh; ++ky) {
            const int8_t *row = base + ky * rs;
            for (kx = 0; kx < fw; ++kx, ++t) {
                const int32_t e = row[kx * dw];
                x += c->wa[t] * mpq__dw_field(e, la, mask8);
                y += c->wb[t] * mpq__dw_field(e, lb, mask8);
            }
        }
        ya = (uint32_t)mpq__dw_value(c->acca + (uint32_t)mpq__asr32(x, sc), c->ma, c->lsa,
                                     c->rsa, c->fa, zp, lo, hi);
        yb = (uint32_t)mpq__dw_value(c->accb + (uint32_t)mpq__asr32(y, sc), c->mb, c->lsb,
                                     c->rsb, c->fb, zp, lo, hi);
        v = ((ya & omask) << sa) | ((yb & omask) << sb);
        *o = (uint8_t)(first ? v : (uint32_t)*o | v);
    }
}

/* The outputs of channels ca and ca + 1 of a sub-byte channel group from its saved plane
   (mpq__dw_rest's fields and bytes; mask: the top `bits` bits of every byte of a word). Sums
   are kept times 2^sc = 2^(8 - bits) - a field at the top of a byte is that multiple of its
   value, which SXTB16 takes as is - and divided back exactly before the bias: |sum| <=
   25*128*128. Each output byte of the group is written whole by the pass with `first` set,
   or-ed into by the others (2-bit quads: the pass of channels cg + 2, cg + 3). Out-of-view
   padding is in the plane (the zero point in every field). With the DSP, 3x3 layers at stride
   1 or 2 and unit dilation along W take two neighbouring outputs per word of each row, as
   mpq_depthwise_inplace's int8 loops do; the rest of each row goes tap by tap. */
static MPQ_INLINE void mpq__dw_pass(const mpq__dw_group *g, int32_t ca, int32_t bits,
                                    int32_t la, uint32_t mask, int first)
{
    const int32_t out_h = g->out->h;
    mpq__dw_pair c;
    int32_t oy, ox;
#if MPQ_USE_DSP
    const mpq_conv_params *p = g->p;
    const int k3 = g->f->h == 3 && g->f->w == 3;
    const int32_t lb = la - bits, sc = 8 - bits, sa = 8 - bits - la, sb = sa + bits;
    const uint32_t omask = (1u << bits) - 1u, mask8 = mask & 0xFFu;
    const int32_t out_w = g->out->w;
    const int32_t sh = p->stride_h, sw = p->stride_w, dw = p->dilation_w;
    const int32_t pw = g->pw, rs = p->dilation_h * pw;
    const int32_t lo = p->act_min, hi = p->act_max, ozp = p->output_zp;
    uint8_t *dst = (uint8_t *)g->out->data;
    const uint32_t kstep = (uint32_t)g->out->c * (uint32_t)bits >> 3;  /* bytes per pixel */
    int32_t a02a, a1a, a02b, a1b, a02c, a1c, b02a, b1a, b02b, b1b, b02c, b1c;
    int32_t a2a, a2b, a2c, b2a, b2b, b2c;
    uint32_t acca, accb;
    int32_t ma, mb, lsa, rsa, lsb, rsb, fa, fb;
#endif
#if !MPQ_USE_DSP
    (void)mask;
#endif
    mpq__dw_pair_init(g, ca, &c);
#if MPQ_USE_DSP
    acca = c.acca;
    accb = c.accb;
    ma = c.ma;
    mb = c.mb;
    lsa = c.lsa;
    rsa = c.rsa;
    lsb = c.lsb;
    rsb = c.rsb;
    fa = c.fa;
    fb = c.fb;
    a02a = k3 ? mpq__halves(c.wa[0], c.wa[2]) : 0;
    a1a = k3 ? c.wa[1] : 0;
    a02b = k3 ? mpq__halves(c.wa[3], c.wa[5]) : 0;
    a1b = k3 ? c.wa[4] : 0;
    a02c = k3 ? mpq__halves(c.wa[6], c.wa[8]) : 0;
    a1c = k3 ? c.wa[7] : 0;
    b02a = k3 ? mpq__halves(c.wb[0], c.wb[2]) : 0;
    b1a = k3 ? c.wb[1] : 0;
    b02b = k3 ? mpq__halves(c.wb[3], c.wb[5]) : 0;
    b1b = k3 ? c.wb[4] : 0;
    b02c = k3 ? mpq__halves(c.wb[6], c.wb[8]) : 0;
    b1c = k3 ? c.wb[7] : 0;
    a2a = k3 ? c.wa[2] : 0;
    a2b = k3 ? c.wa[5] : 0;
    a2c = k3 ? c.wa[8] : 0;
    b2a = k3 ? c.wb[2] : 0;
    b2b = k3 ? c.wb[5] : 0;
    b2c = k3 ? c.wb[8] : 0;
#endif
    for (oy = 0; oy < out_h; ++oy) {
#if MPQ_USE_DSP
        const int8_t *line = g->plane + oy * sh * pw;
        uint8_t *o = dst + ((mpq__at(g->out, oy, 0) + (uint32_t)g->cg) * (uint32_t)bits >> 3);
#endif
        ox = 0;
#if MPQ_USE_DSP
        /* 3x3 along W at unit dilation, two neighbouring outputs of both channels per step, as
           mpq_depthwise_inplace's int8 loops, on the word's fields: stride 1 reads the word
           [e0 e1 e2 e3] of each row (out0 = (e0, e2).(w0, w2) + e1*w1, out1 = (e1, e3).(w0, w2)
           + e2*w1), stride 2 also its fifth byte e4 (out1 = e2*w0 + e3*w1 + e4*w2). Only for
           channels whose requantisation is the 32-bit one (the others take the loop below). */
        if (k3 && dw == 1 && fa && fb && (sw == 1 || sw == 2)) {
#define MPQ__DW_LOAD(OFF)                                                                      \
    v = mpq__word(b + (OFF));                                                                  \
    l = mpq__i32(((uint32_t)v << la) & mask);                                                  \
    h = mpq__i32(((uint32_t)v << lb) & mask);                                                  \
    l02 = mpq__sxtb16(l);                                                                      \
    l13 = mpq__sxtb16_r8(l);                                                                   \
    h02 = mpq__sxtb16(h);                                                                      \
    h13 = mpq__sxtb16_r8(h);
#define MPQ__DW_FIELDS(OFF)                                                                    \
    MPQ__DW_LOAD(OFF)                                                                          \
    x0 = mpq__smlabb(l13, A1, mpq__smlad(l02, A02, x0));                                       \
    y0 = mpq__smlabb(h13, B1, mpq__smlad(h02, B02, y0));
#define MPQ__DW_FAST(X, ACC, M, LS, RS)                                                        \
    ((uint32_t)mpq__clamp_add(mpq__requantize32(mpq__i32(((ACC) + (uint32_t)mpq__asr32((X), sc)) \
                                                         << (LS)), (M), (RS)), ozp, lo, hi)    \
     & omask)
#define MPQ__DW_PUT2(O, X, Y)                                                                  \
    do {                                                                                       \
        const uint32_t v_ = (MPQ__DW_FAST(X, acca, ma, lsa, rsa) << sa)                        \
                            | (MPQ__DW_FAST(Y, accb, mb, lsb, rsb) << sb);                     \
        *(O) = (uint8_t)(first ? v_ : (uint32_t)*(O) | v_);                                    \
    } while (0)
            if (sw == 1) {
                for (; ox + 2 <= out_w; ox += 2, o += 2u * kstep) {
                    const int8_t *b = line + ox;
                    int32_t x0 = 0, x1 = 0, y0 = 0, y1 = 0, v, l, h, l02, l13, h02, h13;
#define MPQ__DW_ROW1(OFF, A02_, A1_, B02_, B1_)                                                \
    {                                                                                          \
        const int32_t A02 = (A02_), A1 = (A1_), B02 = (B02_), B1 = (B1_);                      \
        MPQ__DW_FIELDS(OFF)                                                                    \
        x1 = mpq__smlatb(l02, A1, mpq__smlad(l13, A02, x1));                                   \
        y1 = mpq__smlatb(h02, B1, mpq__smlad(h13, B02, y1));                                   \
    }
                    MPQ__DW_ROW1(0, a02a, a1a, b02a, b1a)
                    MPQ__DW_ROW1(rs, a02b, a1b, b02b, b1b)
                    MPQ__DW_ROW1(2 * rs, a02c, a1c, b02c, b1c)
#undef MPQ__DW_ROW1
                    MPQ__DW_PUT2(o, x0, y0);
                    MPQ__DW_PUT2(o + kstep, x1, y1);
                }
            } else {
                for (; ox + 2 <= out_w; ox += 2, o += 2u * kstep) {
                    const int8_t *b = line + 2 * ox;
                    int32_t x0 = 0, x1 = 0, y0 = 0, y1 = 0, v, l, h, l02, l13, h02, h13;
#define MPQ__DW_ROW2(OFF, A02_, A1_, A2, B02_, B1_, B2)                                        \
    {                                                                                          \
        const int32_t A02 = (A02_), A1 = (A1_), B02 = (B02_), B1 = (B1_);                      \
        const int32_t e = b[(OFF) + 4];                                                        \
        MPQ__DW_FIELDS(OFF)                                                                    \
        x1 = mpq__smlabb(mpq__dw_field(e, la, mask8), A2,                                      \
                         mpq__smlatb(l13, A1, mpq__smlatb(l02, A02, x1)));                     \
        y1 = mpq__smlabb(mpq__dw_field(e, lb, mask8), B2,                                      \
                         mpq__smlatb(h13, B1, mpq__smlatb(h02, B02, y1)));                     \
    }
                    MPQ__DW_ROW2(0, a02a, a1a, a2a, b02a, b1a, b2a)
                    MPQ__DW_ROW2(rs, a02b, a1b, a2b, b02b, b1b, b2b)
                    MPQ__DW_ROW2(2 * rs, a02c, a1c, a2c, b02c, b1c, b2c)
#undef MPQ__DW_ROW2
                    MPQ__DW_PUT2(o, x0, y0);
                    MPQ__DW_PUT2(o + kstep, x1, y1);
                }
            }
            /* the row's last output when W is odd (W >= 3): the second output of the pair
               that starts one output earlier - its words are the ones that pair's step reads,
               inside the padded row - only the second output's products taken */
            if (ox < out_w && ox > 0) {
                const int8_t *b = line + sw * (ox - 1);
                int32_t x1 = 0, y1 = 0, v, l, h, l02, l13, h02, h13;
#define MPQ__DW_LAST(OFF, A02, A1, A2, B02, B1, B2)                                            \
    {                                                                                          \
        MPQ__DW_LOAD(OFF)                                                                      \
        if (sw == 1) {                                                                         \
            x1 = mpq__smlatb(l02, A1, mpq__smlad(l13, A02, x1));                               \
            y1 = mpq__smlatb(h02, B1, mpq__smlad(h13, B02, y1));                               \
        } else {                                                                               \
            const int32_t e = b[(OFF) + 4];                                                    \
            x1 = mpq__smlabb(mpq__dw_field(e, la, mask8), A2,                                  \
                             mpq__smlatb(l13, A1, mpq__smlatb(l02, A02, x1)));                 \
            y1 = mpq__smlabb(mpq__dw_field(e, lb, mask8), B2,                                  \
                             mpq__smlatb(h13, B1, mpq__smlatb(h02, B02, y1)));                 \
        }                                                                                      \
    }
                MPQ__DW_LAST(0, a02a, a1a, a2a, b02a, b1a, b2a)
                MPQ__DW_LAST(rs, a02b, a1b, a2b, b02b, b1b, b2b)
                MPQ__DW_LAST(2 * rs, a02c, a1c, a2c, b02c, b1c, b2c)
#undef MPQ__DW_LAST
                MPQ__DW_PUT2(o, x1, y1);
                ++ox;
            }
#undef MPQ__DW_PUT2
#undef MPQ__DW_FAST
#undef MPQ__DW_FIELDS
#undef MPQ__DW_LOAD
        }
#endif
        if (ox < g->out->w) {
            mpq__dw_rest(g, &c, bits, la, first, oy, ox);
        }
    }
}

/* mpq__dw_pass with its constants, each a function of its own (GCC allocates the registers of
   one pass's loops better alone: fewer spills than with the passes inlined together). A 4-bit
   pair; the first and the second pair of a 2-bit quad. */
static MPQ_NOINLINE void mpq__dw_pass4(const mpq__dw_group *g)
{
    mpq__dw_pass(g, g->cg, 4, 4, 0xF0F0F0F0u, 1);
}

static MPQ_NOINLINE void mpq__dw_pass2_hi(const mpq__dw_group *g)
{
    mpq__dw_pass(g, g->cg, 2, 6, 0xC0C0C0C0u, 1);
}

static MPQ_NOINLINE void mpq__dw_pass2_lo(const mpq__dw_group *g)
{
    mpq__dw_pass(g, g->cg + 2, 2, 2, 0xC0C0C0C0u, 0);
}

/* The work of mpq_depthwise_inplace_grouped: 4- and 2-bit input and output with a channel
   count that fills whole bytes (C a multiple of 8/bits) and decodable weights of at most
   MPQ_DW_TAPS taps: channels in groups (pairs at 4 bits, quads at 2) that share every byte of
   the tensor. The group's padded input plane is saved as those raw bytes (one byte per pixel:
   the scratch of one 8-bit channel), then each pair of channels is computed from it
   (mpq__dw_pass); output bytes hold the group's results and are written over input bytes of
   the same group, already saved (so the in-place rule holds). */
static void mpq__dw_groups(const mpq_conv_params *p, const mpq_filter *f,
                           const mpq_channel_quant *q, const mpq_view *in, const mpq_view *out,
                           int8_t *scratch, int32_t ph, int32_t pw, int32_t pr)
{
    const int32_t bits = in->bits, group = 8 / bits;
    const uint8_t pad = (uint8_t)(((uint32_t)p->input_zp & ((1u << bits) - 1u))
                                  * (bits == 4 ? 0x11u : 0x55u));
    const uint8_t *src = (const uint8_t *)in->data;
    const int32_t w = in->w, step = in->c * bits / 8, pl = p->pad_left;
    mpq__dw_group g;
    int32_t r, x;
    g.p = p;
    g.f = f;
    g.q = q;
    g.out = out;
    g.plane = scratch;
    g.pw = pw;
    for (g.cg = 0; g.cg < in->c; g.cg += group) {
        /* the group's padded plane: byte per pixel, padding = the zero point in every field */
        for (r = 0; r < ph; ++r) {
            int8_t *row = scratch + r * pw;
            const int32_t iy = r - p->pad_top;
            const uint8_t *s;
            int8_t *d;
            if (iy < 0 || iy >= in->h) {
                memset(row, pad, (size_t)pw);
                continue;
            }
            memset(row, pad, (size_t)pl);
            s = src + ((mpq__at(in, iy, 0) + (uint32_t)g.cg) * (uint32_t)bits >> 3);
            d = row + pl;
            for (x = 0; x + 4 <= w; x += 4, s += 4 * step) {
                const uint8_t v0 = s[0], v1 = s[step], v2 = s[2 * step], v3 = s[3 * step];
                d[x] = (int8_t)v0;
                d[x + 1] = (int8_t)v1;
                d[x + 2] = (int8_t)v2;
                d[x + 3] = (int8_t)v3;
            }
            for (; x < w; ++x, s += step) {
                d[x] = (int8_t)s[0];
            }
            memset(row + pl + w, pad, (size_t)pr);
        }
        if (bits == 4) {
            mpq__dw_pass4(&g);
        } else {
            mpq__dw_pass2_hi(&g);
            mpq__dw_pass2_lo(&g);
        }
    }
}

int mpq_depthwise_inplace_grouped(const mpq_conv_params *p, const mpq_filter *f,
                                  const mpq_channel_quant *q, const mpq_view *in,
                                  const mpq_view *out, int8_t *scratch)
{
    int32_t pb, pr;
    const int err = mpq__dw_inplace_check(p, f, in, out, &pb, &pr);
    if (err != MPQ_OK) {
        return err;
    }
    if (in->bits == 8) {
        return MPQ_ERR_BITS;
    }
    if (q == NULL || q->multiplier == NULL || q->shift == NULL || scratch == NULL
        || !mpq__act_ok(p->act_min, p->act_max, out->bits) || in->c % (8 / in->bits) != 0
        || f->h * f->w > MPQ_DW_TAPS) {
        return MPQ_ERR_ARG;
    }
    mpq__dw_groups(p, f, q, in, out, scratch, p->pad_top + in->h + pb, p->pad_left + in->w + pr,
                   pr);
    return MPQ_OK;
}

int mpq_depthwise_inplace(const mpq_conv_params *p, const mpq_filter *f,
                          const mpq_channel_quant *q, const mpq_view *in, const mpq_view *out,
                          int8_t *scratch)
{
    const int32_t taps = f->h * f->w;
    /* With the weights decoded up front (any format, mpq__wval) the inner loop multiplies the
       saved raw inputs, and the zero point comes out once per channel as input_zp * sum(W). */
    const int table = taps <= MPQ_DW_TAPS;
    const int k3 = table && f->h == 3 && f->w == 3;
#if MPQ_USE_DSP
    /* The paired loop's bounds in locals: an output byte store may alias any memory, so
       out->w and out->c would be read again after every store. */
    const int32_t out_w = out->w, out_c = out->c;
#endif
    int32_t wv[MPQ_DW_TAPS];
    int32_t pb, pr, pw, ph, ch, r, t, oy, ox, ky, kx;
    mpq__dw_out o;
    const int err = mpq__dw_inplace_check(p, f, in, out, &pb, &pr);
    if (err != MPQ_OK) {
        return err;
    }
    if (q == NULL || q->multiplier == NULL || q->shift == NULL || scratch == NULL
        || !mpq__act_ok(p->act_min, p->act_max, out->bits)) {
        return MPQ_ERR_ARG;
    }
    ph = p->pad_top + in->h + pb;
    pw = p->pad_left + in->w + pr;
    o.lo = p->act_min;
    o.hi = p->act_max;
    o.zp = p->output_zp;
    o.bits = out->bits;
    o.data = (uint8_t *)out->data;
    for (ch = 0; ch < in->c; ++ch) {
        const uint32_t wk = (uint32_t)ch * (uint32_t)taps;
        uint32_t acc0 = q->bias != NULL ? (uint32_t)q->bias[ch] : 0u;
        o.mult = q->multiplier[ch];
        o.shift = q->shift[ch];
        o.fast = o.shift <= 0 && o.shift >= -30 && o.mult >= 0;
        if (table) {
            acc0 -= (uint32_t)p->input_zp * mpq__dw_weights(f, wk, taps, wv, NULL);
        }
#if MPQ_USE_DSP
        /* The 3x3 loops' weights, packed once per channel: (w0, w2) halves and w1, w2 of each
           filter row a, b, c. */
        const int32_t w02a = k3 ? mpq__halves(wv[0], wv[2]) : 0, w1a = k3 ? wv[1] : 0;
        const int32_t w02b = k3 ? mpq__halves(wv[3], wv[5]) : 0, w1b = k3 ? wv[4] : 0;
        const int32_t w02c = k3 ? mpq__halves(wv[6], wv[8]) : 0, w1c = k3 ? wv[7] : 0;
        const int32_t w2a = k3 ? wv[2] : 0, w2b = k3 ? wv[5] : 0, w2c = k3 ? wv[8] : 0;
#endif
        /* Save input channel ch with its padding (raw values, padding = input_zp, so the
           inner loop needs no bounds checks) before any output of channel ch overwrites it. */
        for (r = 0; r < ph; ++r) {
            int8_t *row = scratch + r * pw;
            const int32_t iy = r - p->pad_top;
            if (iy < 0 || iy >= in->h) {
                memset(row, (uint8_t)p->input_zp, (size_t)pw);
                continue;
            }
            memset(row, (uint8_t)p->input_zp, (size_t)p->pad_left);
            mpq__dw_save_row(in, iy, ch, row + p->pad_left);
            memset(row + p->pad_left + in->w, (uint8_t)p->input_zp, (size_t)pr);
        }
        for (oy = 0; oy < out->h; ++oy) {
            const int8_t *line = scratch + oy * p->stride_h * pw;
            const int32_t rs = p->dilation_h * pw;
            uint32_t k = mpq__at(out, oy, 0) + (uint32_t)ch;
            ox = 0;
#if defined(MPQ_HOST_FAST) && !MPQ_USE_DSP
            if (k3 && o.fast && o.bits == 8) {
                mpq__host_dw3_row(line, rs, p->stride_w, p->dilation_w, wv, acc0, o.mult,
                                  o.shift, o.zp, o.lo, o.hi, o.data + k, out->c, out->w);
                continue;
            }
#endif
#if MPQ_USE_DSP
            /* 3x3, unit stride and dilation along W: two neighbouring outputs share a word of
               each row, [a0 a1 a2 a3]: out0 = (a0, a2).(w0, w2) + a1*w1, out1 = (a1, a3).(w0,
               w2) + a2*w1 (SMLAD, SMLABB, SMLATB). The word stays inside the padded row. */
            if (k3 && p->stride_w == 1 && p->dilation_w == 1) {
                const uint32_t kstep = (uint32_t)out_c;
                for (; ox + 2 <= out_w; ox += 2, k += 2u * kstep) {
                    const int8_t *b = line + ox;
                    int32_t a0 = mpq__i32(acc0), a1 = a0, v, e02, e13;
                    v = mpq__word(b);
                    e02 = mpq__sxtb16(v);
                    e13 = mpq__sxtb16_r8(v);
                    a0 = mpq__smlabb(e13, w1a, mpq__smlad(e02, w02a, a0));
                    a1 = mpq__smlatb(e02, w1a, mpq__smlad(e13, w02a, a1));
                    v = mpq__word(b + rs);
                    e02 = mpq__sxtb16(v);
                    e13 = mpq__sxtb16_r8(v);
                    a0 = mpq__smlabb(e13, w1b, mpq__smlad(e02, w02b, a0));
                    a1 = mpq__smlatb(e02, w1b, mpq__smlad(e13, w02b, a1));
                    v = mpq__word(b + 2 * rs);
                    e02 = mpq__sxtb16(v);
                    e13 = mpq__sxtb16_r8(v);
                    a0 = mpq__smlabb(e13, w1c, mpq__smlad(e02, w02c, a0));
                    a1 = mpq__smlatb(e02, w1c, mpq__smlad(e13, w02c, a1));
                    mpq__dw_put(&o, k, (uint32_t)a0);
                    mpq__dw_put(&o, k + kstep, (uint32_t)a1);
                }
            }
            /* 3x3, stride 2 and unit dilation along W: two neighbouring outputs read columns
               0-2 and 2-4 of each row, the word [a0 a1 a2 a3] and the byte a4: out0 = (a0, a2).
               (w0, w2) + a1*w1 (SMLAD, SMLABB), out1 = a2*w0 + a3*w1 + a4*w2 (SMLATB, SMLATB,
               SMLABB). Column 4 is the second output's last tap, inside the padded row. */
            if (k3 && p->stride_w == 2 && p->dilation_w == 1) {
                const uint32_t kstep = (uint32_t)out_c;
                for (; ox + 2 <= out_w; ox += 2, k += 2u * kstep) {
                    const int8_t *b = line + 2 * ox;
                    int32_t a0 = mpq__i32(acc0), a1 = a0, v, e02, e13;
                    v = mpq__word(b);
                    e02 = mpq__sxtb16(v);
                    e13 = mpq__sxtb16_r8(v);
                    a0 = mpq__smlabb(e13, w1a, mpq__smlad(e02, w02a, a0));
                    a1 = mpq__smlabb(b[4], w2a,
                                     mpq__smlatb(e13, w1a, mpq__smlatb(e02, w02a, a1)));
                    v = mpq__word(b + rs);
                    e02 = mpq__sxtb16(v);
                    e13 = mpq__sxtb16_r8(v);
                    a0 = mpq__smlabb(e13, w1b, mpq__smlad(e02, w02b, a0));
                    a1 = mpq__smlabb(b[rs + 4], w2b,
                                     mpq__smlatb(e13, w1b, mpq__smlatb(e02, w02b, a1)));
                    v = mpq__word(b + 2 * rs);
                    e02 = mpq__sxtb16(v);
                    e13 = mpq__sxtb16_r8(v);
                    a0 = mpq__smlabb(e13, w1c, mpq__smlad(e02, w02c, a0));
                    a1 = mpq__smlabb(b[2 * rs + 4], w2c,
                                     mpq__smlatb(e13, w1c, mpq__smlatb(e02, w02c, a1)));
                    mpq__dw_put(&o, k, (uint32_t)a0);
                    mpq__dw_put(&o, k + kstep, (uint32_t)a1);
                }
            }
#endif
            for (; ox < out->w; ++ox, k += (uint32_t)out->c) {
                const int8_t *base = line + ox * p->stride_w;
                uint32_t acc = acc0;
                if (k3) {
                    const int8_t *r0 = base, *r1 = base + rs, *r2 = base + 2 * rs;
                    const int32_t d1 = p->dilation_w, d2 = 2 * p->dilation_w;
                    acc += (uint32_t)(wv[0] * r0[0] + wv[1] * r0[d1] + wv[2] * r0[d2]
                                      + wv[3] * r1[0] + wv[4] * r1[d1] + wv[5] * r1[d2]
                                      + wv[6] * r2[0] + wv[7] * r2[d1] + wv[8] * r2[d2]);
                } else if (table) {
                    for (ky = 0, t = 0; ky < f->h; ++ky) {
                        const int8_t *row = base + ky * rs;
                        for (kx = 0; kx < f->w; ++kx, ++t) {
                            acc += (uint32_t)(wv[t] * row[kx * p->dilation_w]);
                        }
                    }
                } else {
                    for (ky = 0, t = 0; ky < f->h; ++ky) {
                        const int8_t *row = base + ky * rs;
                        for (kx = 0; kx < f->w; ++kx, ++t) {
                            acc += mpq__wmul(f, wk + (uint32_t)t,
                                             row[kx * p->dilation_w] - p->input_zp);
                        }
                    }
                }
                mpq__dw_put(&o, k, acc);
            }
        }
    }
    return MPQ_OK;
}
