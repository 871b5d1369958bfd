/* mpq_support.h: the helpers the kernel files share (internal; the API is mpq_kernels.h).
 *
 * Part of mpq's portable kernel library (plain C99, shipped as is and copied into every
 * export that needs it). Everything here is `static inline` - compiled into each kernel file
 * that uses it, so the hot loops keep their helpers inlined - except the few helpers kept out
 * of line on purpose, which live in mpq_support.c and mpq_dot.c and are declared below.
 *
 * Written to be free of undefined behaviour: every sum or shift that may wrap is done in
 * uint32_t and converted back with mpq__i32 (the C code this mirrors relies on int32 wrapping);
 * right shifts of negative values go through mpq__asr64 (implementation-defined in C99).
 * Build with -DMPQ_NO_DSP to force the portable loops on a DSP core; -DMPQ_EMULATE_DSP runs
 * the DSP loops on any host with C versions of the intrinsics (mpq's tests use it). Every
 * file of the library must be compiled with the same choice.
 */
#ifndef MPQ_SUPPORT_H
#define MPQ_SUPPORT_H

#include <stdint.h>
#include <string.h>

#include "mpq_kernels.h"

/* The SIMD loops pair values in 32-bit words, so they assume little-endian memory. */
#if defined(MPQ_EMULATE_DSP)
#define MPQ_USE_DSP 1
#elif !defined(MPQ_NO_DSP) && defined(__ARM_FEATURE_DSP) && defined(__ARM_FEATURE_SIMD32) \
    && !defined(__ARM_BIG_ENDIAN)
#define MPQ_USE_DSP 1
#include <arm_acle.h>
#else
#define MPQ_USE_DSP 0
#endif

/* SMLAL (ARMv7-M and later mainline cores, DSP extension or not) for mpq__requant_rs; the
   host and MPQ_EMULATE_DSP builds use the C form. */
#if (defined(__ARM_ARCH_7M__) || defined(__ARM_ARCH_7EM__) || defined(__ARM_ARCH_8M_MAIN__)) \
    && !defined(MPQ_EMULATE_DSP)
#define MPQ_HAVE_SMLAL 1
#else
#define MPQ_HAVE_SMLAL 0
#endif

/* -- integer helpers (DESIGN sec. 4.1) -------------------------------------------------------- */

/* The int32 whose two's complement bits are u (what a wrapping int32 expression gives). */
static inline int32_t mpq__i32(uint32_t u)
{
    return u <= 0x7FFFFFFFu ? (int32_t)u : -(int32_t)(~u) - 1;
}

/* floor(x / 2^n) for 0 <= n <= 62: an arithmetic shift without relying on how the compiler
   shifts negative values (gcc turns this into one shift). */
static inline int64_t mpq__asr64(int64_t x, int32_t n)
{
    return x >= 0 ? x >> n : ~(~x >> n);
}

/* floor(x / 2^n) for 0 <= n <= 31, as mpq__asr64. */
static inline int32_t mpq__asr32(int32_t x, int32_t n)
{
    return x >= 0 ? x >> n : ~(~x >> n);
}

/* RoundingDivideByPOT (gemmlowp; arm_nn_divide_by_power_of_two), 0 <= e <= 62: x / 2^e rounded
   half away from zero, as floor plus one when the remainder exceeds (2^e - 1)/2, + 1 if x < 0. */
static inline int64_t mpq__rdivpot(int64_t x, int32_t e)
{
    const int64_t mask = (INT64_C(1) << e) - 1;
    const int64_t threshold = (mask >> 1) + (x < 0 ? 1 : 0);
    return mpq__asr64(x, e) + ((x & mask) > threshold ? 1 : 0);
}

/* The SIMD-style loops are written once and instantiated for constant bit widths: that only
   works if they are inlined. */
#if defined(__GNUC__)
#define MPQ_INLINE inline __attribute__((always_inline))
#else
#define MPQ_INLINE inline
#endif

/* Kept out of line so that the loops that inline the common case stay small. */
#if defined(__GNUC__)
#define MPQ_NOINLINE __attribute__((noinline))
#else
#define MPQ_NOINLINE
#endif

/* mpq__requantize for the cases its inline part leaves: a left shift above 31, a right shift
   above 30 or a negative multiplier (64-bit rounding). In mpq_support.c. */
int32_t mpq__requantize_wide(int32_t acc, int32_t multiplier, int32_t shift);

/* mpq__requantize32's right shift s = sm1 + 1 in [1, 30] in one rounding (t = 2^(s-1), worked
   out once per channel): floor((acc*M + c) / 2^(31+s)) with c = 2^(30+s) + 2^30 - [acc < 0]*2^31.
   Why it equals the double rounding below: with y = acc*M + 2^30 and h = floor(y / 2^31), h/2^s
   rounded half away from zero is floor((q + 1) / 2) for q = floor((h - [h < 0]) / 2^(s-1)), and
   h - [h < 0] = floor((y - [y < 0]*2^31) / 2^31), so the nested floors make one:
   floor((y - [y < 0]*2^31 + 2^(30+s)) / 2^(31+s)). [y < 0] may be taken as [acc < 0] (M >= 0):
   they differ only for acc*M in [-2^30, 0), where both give 0. c's words: u = t - [acc < 0],
   c = u*2^31 + 2^30, i.e. hi u >> 1, lo (u << 31) | 2^30 - one SMLAL into them, then the high
   word shifted by s - 1 (31 + s >= 32). No overflow: |acc*M| < 2^62, c < 2^61. */
static inline int32_t mpq__requant_rs(int32_t acc, int32_t multiplier, uint32_t t, int32_t sm1)
{
    const uint32_t u = t + (uint32_t)mpq__asr32(acc, 31);
    uint32_t lo = (u << 31) | 0x40000000u, hi = u >> 1;
#if MPQ_HAVE_SMLAL
    /* by hand: knowing M >= 0, GCC 12 multiplies as int64 x uint64 (UMULL, MUL, MLA) */
    __asm__("smlal %0, %1, %2, %3" : "+r"(lo), "+r"(hi) : "r"(acc), "r"(multiplier));
#else
    const uint64_t c = ((uint64_t)hi << 32) | lo;
    hi = (uint32_t)((uint64_t)((int64_t)acc * multiplier + (int64_t)c) >> 32);
#endif
    return mpq__asr32(mpq__i32(hi), sm1);
}

/* arm_nn_requantize / TFLite MultiplyByQuantizedMultiplier, double rounding (DESIGN sec. 4.1;
   `mpq.quant.arith.requantize`): x = acc << max(S,0) wrapped to int32, hi = floor((x*M + 2^30)
   / 2^31), result = RoundingDivideByPOT(hi, max(-S,0)). Total over all S: a left shift of 32
   or more leaves 0 bits, and |hi| <= 2^31 rounds to 0 for any right shift above 33. This is the
   usual case - no left shift, a right shift up to 30, M >= 0 (every multiplier mpq makes), so
   hi fits in int32 - rounded in 32 bits (a right shift: mpq__requant_rs's single rounding):
   the same result as mpq__requantize_wide in a fraction of the instructions. */
static inline int32_t mpq__requantize32(int32_t acc, int32_t multiplier, int32_t shift)
{
    if (shift < 0) {
        return mpq__requant_rs(acc, multiplier, 1u << (-shift - 1), -shift - 1);
    }
    return (int32_t)mpq__asr64((int64_t)acc * multiplier + (INT64_C(1) << 30), 31);
}

/* The requantisation of any (M, S): mpq__requantize32 when -30 <= S <= 0 and M >= 0, and for a
   left shift 1 <= S <= 31 with M >= 0 (2-bit and some 4-bit weights give them) too, as
   mpq__requantize32(acc << S wrapped to int32, M, 0): x*M/2^31 fits int32 for |x| <= 2^31,
   M < 2^31, and a right shift of 0 rounds nothing. The common case is tested first. */
static inline int32_t mpq__requantize(int32_t acc, int32_t multiplier, int32_t shift)
{
    if (shift <= 0 && shift >= -30 && multiplier >= 0) {
        return mpq__requantize32(acc, multiplier, shift);
    }
    if (shift > 0 && shift <= 31 && multiplier >= 0) {
        return mpq__requantize32(mpq__i32((uint32_t)acc << shift), multiplier, 0);
    }
    return mpq__requantize_wide(acc, multiplier, shift);
}

/* clamp(v, lo, hi) for lo <= hi (np.clip). */
static inline int32_t mpq__clamp(int64_t v, int32_t lo, int32_t hi)
{
    return v < lo ? lo : (v > hi ? hi : (int32_t)v);
}

/* QADD: a + b saturated to int32 (one instruction with the DSP extension). */
static inline int32_t mpq__qadd(int32_t a, int32_t b)
{
#if MPQ_USE_DSP && !defined(MPQ_EMULATE_DSP)
    return __qadd(a, b);
#else
    const int64_t t = (int64_t)a + b;
    return t > INT32_MAX ? INT32_MAX : (t < INT32_MIN ? INT32_MIN : (int32_t)t);
#endif
}

/* clamp(v + zp, lo, hi), the same as with the reference's exact int64 sum: a sum that QADD
   saturates lies beyond [lo, hi] either way. */
static inline int32_t mpq__clamp_add(int32_t v, int32_t zp, int32_t lo, int32_t hi)
{
    const int32_t t = mpq__qadd(v, zp);
    return t < lo ? lo : (t > hi ? hi : t);
}

/* The stored output of an accumulator: clamp(requant(acc, M, S) + zp, lo, hi). */
static inline int32_t mpq__output(uint32_t acc, int32_t multiplier, int32_t shift, int32_t zp,
                                  int32_t lo, int32_t hi)
{
    return mpq__clamp_add(mpq__requantize(mpq__i32(acc), multiplier, shift), zp, lo, hi);
}

/* c, telling the compiler that it is rarely true: the code for it is laid out of the way. */
#if defined(__GNUC__)
#define MPQ_UNLIKELY(c) __builtin_expect((c) != 0, 0)
#else
#define MPQ_UNLIKELY(c) (c)
#endif

/* hi of mpq__requantize32: floor((acc * m + 2^30) / 2^31), acc as int32. */
static MPQ_INLINE int32_t mpq__mulhi(uint32_t acc, int32_t m)
{
    return (int32_t)mpq__asr64((int64_t)mpq__i32(acc) * m + (INT64_C(1) << 30), 31);
}

/* The outputs of two accumulators a, b of one channel (m, sh): mpq__requantize32 (the call's
   shifts are all in [-30, 31], M >= 0), then mpq__clamp_add; the shift's constant worked out
   once. A left shift sh > 0 is applied to the accumulators first (the reference's int32
   x = acc << S, wrapping), leaving a right shift of 0, as mpq__requantize does. */
static MPQ_INLINE void mpq__out2(uint32_t a, uint32_t b, int32_t m, int32_t sh, int32_t zp,
                                 int32_t lo, int32_t hi, int32_t *va, int32_t *vb)
{
    int32_t ra, rb;
    if (MPQ_UNLIKELY(sh > 0)) {
        a <<= sh;
        b <<= sh;
    }
    if (sh < 0) {
        const uint32_t t = 1u << (-sh - 1);
        ra = mpq__requant_rs(mpq__i32(a), m, t, -sh - 1);
        rb = mpq__requant_rs(mpq__i32(b), m, t, -sh - 1);
    } else {
        ra = mpq__mulhi(a, m);
        rb = mpq__mulhi(b, m);
    }
    *va = mpq__clamp_add(ra, zp, lo, hi);
    *vb = mpq__clamp_add(rb, zp, lo, hi);
}

/* -- packed storage (DESIGN sec. 4.2) --------------------------------------------------------- */

/* Element k of a packed buffer: bits k*b .. k*b+b-1, sign-extended. For b = 8 this is the
   int8 byte k; for b = 4 the low nibble holds the even element. */
static inline int32_t mpq__ld(const uint8_t *p, int32_t bits, uint32_t k)
{
    const uint32_t bit = k * (uint32_t)bits;
    const uint32_t sign = 1u << (bits - 1);
    if (bits == 8) {
        return ((const int8_t *)p)[k];
    }
    return (int32_t)((((uint32_t)p[bit >> 3] >> (bit & 7u)) & ((sign << 1) - 1u)) ^ sign)
           - (int32_t)sign;
}

/* Stores v (already inside the b-bit range) as element k, leaving the other elements that
   share its byte untouched: in-place kernels rely on that. */
static inline void mpq__st(uint8_t *p, int32_t bits, uint32_t k, int32_t v)
{
    if (bits == 8) {
        p[k] = (uint8_t)v;
    } else {
        const uint32_t bit = k * (uint32_t)bits;
        const uint32_t mask = ((1u << bits) - 1u) << (bit & 7u);
        uint8_t *b = p + (bit >> 3);
        *b = (uint8_t)((*b & ~mask) | (((uint32_t)v << (bit & 7u)) & mask));
    }
}

/* Is element k of a `bits`-bit packed run at a byte boundary? */
static inline int mpq__at_byte(uint32_t k, int32_t bits)
{
    return ((k * (uint32_t)bits) & 7u) == 0;
}

/* Stored element index of view element (y, x, 0). */
static inline uint32_t mpq__at(const mpq_view *v, int32_t y, int32_t x)
{
    return ((uint32_t)(v->y0 + y) * (uint32_t)v->stored_w + (uint32_t)(v->x0 + x))
           * (uint32_t)v->c;
}

static inline int mpq__bits_ok(int32_t bits)
{
    return bits == 8 || bits == 4 || bits == 2;
}

/* MPQ_OK for a usable view, else why not. */
static inline int mpq__view_check(const mpq_view *v)
{
    if (v == NULL || v->data == NULL) {
        return MPQ_ERR_ARG;
    }
    if (!mpq__bits_ok(v->bits)) {
        return MPQ_ERR_BITS;
    }
    if (v->h < 1 || v->w < 1 || v->c < 1 || v->y0 < 0 || v->x0 < 0
        || v->stored_w < v->x0 + v->w) {
        return MPQ_ERR_ARG;
    }
    return MPQ_OK;
}

/* Is v inside the signed range of a `bits`-bit value? */
static inline int mpq__in_range(int32_t v, int32_t bits)
{
    return v >= -(1 << (bits - 1)) && v <= (1 << (bits - 1)) - 1;
}

/* A clamp range that output values of `bits` bits can store. */
static inline int mpq__act_ok(int32_t lo, int32_t hi, int32_t bits)
{
    return lo <= hi && mpq__in_range(lo, bits) && mpq__in_range(hi, bits);
}

/* Views on the same storage must agree on its bit width: a sum written over its 4-bit skip
   at 8 bits would overwrite skip elements before they are read. */
static inline int mpq__alias_ok(const mpq_view *a, const mpq_view *b)
{
    return a->data != b->data || a->bits == b->bits;
}

/* -- weights (mpq_filter formats; DESIGN sec. 4.2, 7.4) --------------------------------------- */

/* Taps of a depthwise kernel the depthwise loops handle with small local tables (up to 5x5;
   mpq_depthwise_inplace decodes one channel's weights up front, mpq__conv_depthwise lists the
   in-view taps of a pixel). */
#define MPQ_DW_TAPS 25

/* MPQ_OK when the kernels can decode the filter's codes: its bits suit its format and a
   CODEBOOK filter has its table. */
static inline int mpq__filter_ok(const mpq_filter *f)
{
    switch (f->format) {
    case MPQ_WFMT_LINEAR:
        return mpq__bits_ok(f->bits) ? MPQ_OK : MPQ_ERR_BITS;
    case MPQ_WFMT_CODEBOOK:
        if (!mpq__bits_ok(f->bits) && f->bits != 3) {
            return MPQ_ERR_BITS;
        }
        return f->codebook != NULL ? MPQ_OK : MPQ_ERR_ARG;
    case MPQ_WFMT_POW2:
        /* b <= 4 keeps every power of two inside int8 (2^6 at most). */
        return f->bits == 4 || f->bits == 3 || f->bits == 2 ? MPQ_OK : MPQ_ERR_BITS;
    default:
        return MPQ_ERR_ARG;
    }
}

/* Unsigned code k of a little-endian bit stream: bits k*b .. k*b+b-1. Only a code that
   straddles a byte (b = 3) reads the next byte, so nothing past the last code is touched. */
static inline uint32_t mpq__code(const uint8_t *p, int32_t bits, uint32_t k)
{
    const uint32_t bit = k * (uint32_t)bits;
    const uint32_t sh = bit & 7u;
    uint32_t v = (uint32_t)p[bit >> 3] >> sh;
    if (sh + (uint32_t)bits > 8u) {
        v |= (uint32_t)p[(bit >> 3) + 1u] << (8u - sh);
    }
    return v & ((1u << bits) - 1u);
}

/* The int8 value of code u of a filter of any format (DESIGN sec. 7.4). POW2: mag = u &
   (2^(b-1) - 1), +-2^(mag-1), 0 for mag 0 (code 0 and the sign-only "-0"). The kernels multiply
   by this value: for |W| = 2^e and any int32 x, W*x and +-(x << e) are the same bits modulo 2^32,
   so a POW2 product is exactly the paper's shift. On a Cortex-M a multiply-accumulate takes one
   cycle like a shift; the shift only saves hardware on multiplier-less designs. */
static inline int32_t mpq__wval(const mpq_filter *f, uint32_t u)
{
    const uint32_t sign = 1u << (f->bits - 1);
    if (f->format == MPQ_WFMT_CODEBOOK) {
        return f->codebook[u];
    }
    if (f->format == MPQ_WFMT_POW2) {
        const uint32_t mag = u & (sign - 1u);
        const int32_t v = mag == 0u ? 0 : (int32_t)1 << (mag - 1u);
        return (u & sign) != 0u ? -v : v;
    }
    return (int32_t)(u ^ sign) - (int32_t)sign;
}

/* W[k]*x modulo 2^32 for weight k of any format, decoding its code on the spot (the paths
   that have no per-call table: 8-bit CODEBOOK, depthwise kernels above MPQ_DW_TAPS taps). */
static inline uint32_t mpq__wmul(const mpq_filter *f, uint32_t k, int32_t x)
{
    return (uint32_t)(mpq__wval(f, mpq__code((const uint8_t *)f->data, f->bits, k)) * x);
}

/* Does the filter take the table loops: CODEBOOK or POW2 codes of at most 4 bits. */
static inline int mpq__tabled(const mpq_filter *f)
{
    return f->format != MPQ_WFMT_LINEAR && f->bits <= 4;
}

/* -- SIMD (DSP extension) helpers ------------------------------------------------------------- */

#if MPQ_USE_DSP
#if defined(MPQ_EMULATE_DSP)
/* C versions of the ACLE intrinsics, for testing the DSP loops on a host. */
static inline int32_t mpq__lo16(int32_t v)
{
    return (int32_t)(((uint32_t)v & 0xFFFFu) ^ 0x8000u) - 0x8000;
}

static inline int32_t mpq__hi16(int32_t v)
{
    return (int32_t)(((uint32_t)v >> 16) ^ 0x8000u) - 0x8000;
}

static inline int32_t mpq__pack16(int32_t lo, int32_t hi)
{
    return mpq__i32(((uint32_t)lo & 0xFFFFu) | (((uint32_t)hi & 0xFFFFu) << 16));
}

/* SXTB16: bytes 0 and 2 sign-extended into the two halfwords. */
static inline int32_t mpq__sxtb16(int32_t v)
{
    const uint32_t u = (uint32_t)v;
    return mpq__pack16((int32_t)((u & 0xFFu) ^ 0x80u) - 0x80,
                       (int32_t)(((u >> 16) & 0xFFu) ^ 0x80u) - 0x80);
}

/* SADD16: halfword-wise wrapping add. */
static inline int32_t mpq__sadd16(int32_t a, int32_t b)
{
    return mpq__pack16(mpq__lo16(a) + mpq__lo16(b), mpq__hi16(a) + mpq__hi16(b));
}

/* SXTAB16: a + SXTB16(b), halfword-wise. */
static inline int32_t mpq__sxtab16(int32_t a, int32_t b)
{
    return mpq__sadd16(a, mpq__sxtb16(b));
}

/* SMLAD: acc + lo(a)*lo(b) + hi(a)*hi(b), wrapping. */
static inline int32_t mpq__smlad(int32_t a, int32_t b, int32_t acc)
{
    return mpq__i32((uint32_t)acc + (uint32_t)(mpq__lo16(a) * mpq__lo16(b))
                    + (uint32_t)(mpq__hi16(a) * mpq__hi16(b)));
}

/* SMLABB: acc + lo(a)*lo(b); SMLATB: acc + hi(a)*lo(b); wrapping. */
static inline int32_t mpq__smlabb(int32_t a, int32_t b, int32_t acc)
{
    return mpq__i32((uint32_t)acc + (uint32_t)(mpq__lo16(a) * mpq__lo16(b)));
}

static inline int32_t mpq__smlatb(int32_t a, int32_t b, int32_t acc)
{
    return mpq__i32((uint32_t)acc + (uint32_t)(mpq__hi16(a) * mpq__lo16(b)));
}
#else
static inline int32_t mpq__sxtb16(int32_t v)
{
    return __sxtb16(v);
}

static inline int32_t mpq__sadd16(int32_t a, int32_t b)
{
    return __sadd16(a, b);
}

static inline int32_t mpq__sxtab16(int32_t a, int32_t b)
{
    return __sxtab16(a, b);
}

static inline int32_t mpq__smlad(int32_t a, int32_t b, int32_t acc)
{
    return __smlad(a, b, acc);
}

static inline int32_t mpq__smlabb(int32_t a, int32_t b, int32_t acc)
{
    return __smlabb(a, b, acc);
}

static inline int32_t mpq__smlatb(int32_t a, int32_t b, int32_t acc)
{
    return __smlatb(a, b, acc);
}
#endif

/* v rotated right by 8 bits, so that SXTB16 picks bytes 1 and 3. */
static inline int32_t mpq__ror8(int32_t v)
{
    const uint32_t u = (uint32_t)v;
    return mpq__i32((u >> 8) | (u << 24));
}

/* SXTB16 and SXTAB16 of v rotated by 8 (bytes 1 and 3). GCC 12 neither has __ror nor folds a
   rotate into the intrinsics' operand, so on the target these are the one instruction each
   by inline assembly (as CMSIS-NN's __SXTB16_RORn). */
#if defined(MPQ_EMULATE_DSP)
static inline int32_t mpq__sxtb16_r8(int32_t v)
{
    return mpq__sxtb16(mpq__ror8(v));
}

static inline int32_t mpq__sxtab16_r8(int32_t a, int32_t v)
{
    return mpq__sxtab16(a, mpq__ror8(v));
}
#else
static inline int32_t mpq__sxtb16_r8(int32_t v)
{
    int32_t r;
    __asm__("sxtb16 %0, %1, ror #8" : "=r"(r) : "r"(v));
    return r;
}

static inline int32_t mpq__sxtab16_r8(int32_t a, int32_t v)
{
    int32_t r;
    __asm__("sxtab16 %0, %1, %2, ror #8" : "=r"(r) : "r"(a), "r"(v));
    return r;
}
#endif

/* The bytewise signed maximum of a and b: SSUB8 sets a GE flag per byte where a - b >= 0, SEL
   takes those bytes of a and the others of b (one asm block: nothing may touch the flags in
   between; CMSIS-NN's max pooling does the same). */
#if defined(MPQ_EMULATE_DSP)
static inline int32_t mpq__smax8(int32_t a, int32_t b)
{
    uint32_t r = 0;
    int32_t i;
    for (i = 0; i < 32; i += 8) {
        const int32_t x = (int32_t)(int8_t)(uint8_t)((uint32_t)a >> i);
        const int32_t y = (int32_t)(int8_t)(uint8_t)((uint32_t)b >> i);
        r |= (uint32_t)(uint8_t)(x >= y ? x : y) << i;
    }
    return mpq__i32(r);
}
#else
static inline int32_t mpq__smax8(int32_t a, int32_t b)
{
    int32_t r;
    __asm__("ssub8 %0, %1, %2\n\tsel %0, %1, %2" : "=&r"(r) : "r"(a), "r"(b) : "cc");
    return r;
}
#endif

/* Four consecutive bytes as a word (unaligned: weights rows start anywhere). */
static inline int32_t mpq__word(const void *p)
{
    int32_t v;
    memcpy(&v, p, 4);
    return v;
}

/* The halfword pair (lo, hi). */
static inline int32_t mpq__halves(int32_t lo, int32_t hi)
{
    return mpq__i32(((uint32_t)lo & 0xFFFFu) | ((uint32_t)hi << 16));
}

/* The halfword pair (v, v). */
static inline int32_t mpq__pair(int32_t v)
{
    return mpq__i32(((uint32_t)v & 0xFFFFu) * 0x10001u);
}

/* The constant mpq__quad adds to the pairs of `bits`-bit elements to subtract z from them. A
   sub-byte element is its code with the sign bit flipped, minus 2^(bits-1). */
static inline int32_t mpq__quad_bias(int32_t bits, int32_t z)
{
    return mpq__pair(bits == 8 ? -z : -z - (1 << (bits - 1)));
}

/* Elements e0..e3 (packed at `bits`, e0 in the low bits of byte p[0]) minus z as SMLAD's pairs:
   *even = (e0, e2), *odd = (e1, e3) - the pairs SXTB16 makes of four bytes, so that 8-bit and
   sub-byte operands pair up alike. nz = mpq__quad_bias(bits, z). Sub-byte elements are moved
   to bits 0 and 16 (4 bits: with h | h << 8 elements 0 and 2 sit at bits 0 and 16, 1 and 3 at
   bits 4 and 20; 2 bits: b | b << 12 likewise at 0/16 and 2/18), so one SADD16 finishes two
   of them. |e - z| <= 255 stays inside the halfwords. `z0`: z is 0 (weights), so 8-bit
   elements need no add. */
static MPQ_INLINE void mpq__quad(const uint8_t *p, int32_t bits, int32_t nz, int z0,
                                 int32_t *even, int32_t *odd)
{
    if (bits == 8 && z0) {
        const int32_t v = mpq__word(p);
        *even = mpq__sxtb16(v);
        *odd = mpq__sxtb16_r8(v);
    } else if (bits == 8) {
        const int32_t v = mpq__word(p);
        *even = mpq__sxtab16(nz, v);
        *odd = mpq__sxtab16_r8(nz, v);
    } else if (bits == 4) {
        uint16_t h16;
        uint32_t h;
        memcpy(&h16, p, 2);
        h = (uint32_t)h16 ^ 0x8888u;
        h |= h << 8;
        *even = mpq__sadd16(mpq__i32(h & 0x000F000Fu), nz);
        *odd = mpq__sadd16(mpq__i32((h >> 4) & 0x000F000Fu), nz);
    } else {
        uint32_t b = (uint32_t)p[0] ^ 0xAAu;
        b |= b << 12;
        *even = mpq__sadd16(mpq__i32(b & 0x00030003u), nz);
        *odd = mpq__sadd16(mpq__i32((b >> 2) & 0x00030003u), nz);
    }
}
#else

/* Elements e0..e3 (packed at `bits`, e0 in the low bits of byte p[0]) minus z: the plain C
   counterpart of the DSP build's SMLAD pairs. */
static MPQ_INLINE void mpq__quad4(const uint8_t *p, int32_t bits, int32_t z, int32_t e[4])
{
    const int8_t *s = (const int8_t *)p;
    if (bits == 8) {
        e[0] = s[0] - z;
        e[1] = s[1] - z;
        e[2] = s[2] - z;
        e[3] = s[3] - z;
    } else if (bits == 4) {
        e[0] = (int32_t)(((uint32_t)p[0] & 15u) ^ 8u) - 8 - z;
        e[1] = (int32_t)(((uint32_t)p[0] >> 4) ^ 8u) - 8 - z;
        e[2] = (int32_t)(((uint32_t)p[1] & 15u) ^ 8u) - 8 - z;
        e[3] = (int32_t)(((uint32_t)p[1] >> 4) ^ 8u) - 8 - z;
    } else {
        e[0] = (int32_t)(((uint32_t)p[0] & 3u) ^ 2u) - 2 - z;
        e[1] = (int32_t)((((uint32_t)p[0] >> 2) & 3u) ^ 2u) - 2 - z;
        e[2] = (int32_t)((((uint32_t)p[0] >> 4) & 3u) ^ 2u) - 2 - z;
        e[3] = (int32_t)(((uint32_t)p[0] >> 6) ^ 2u) - 2 - z;
    }
}
#endif

/* -- dot products ---------------------------------------------------------------------------- */

/* The decode table of a CODEBOOK or POW2 filter of b <= 4 bits (mpq__tabled), built once per
   kernel call in the frame of the call's convolution or fully connected loop (mpq__conv,
   mpq__conv_any, mpq__fc_tab): 64 bytes. With both formats a small table of int8 values
   indexed by the code, the loops below are the linear sub-byte loops with the value lookup in
   place of the sign extension. The DSP loops form each SMLAD halfword pair from two lookups
   (mpq__tpair) rather than from a 2^(2b)-entry pair table: that table took 1,024 more bytes of
   stack, and the model's stack bound (GCC's static call graph, DESIGN sec. 5) counts the deepest
   frame any call could reach, so every build carried it, tabled weights or not. */
typedef struct {
    int32_t val[16];     /* val[u]: the value of code u (2^b entries) */
} mpq__wtab;

/* Fills t for filter f (mpq__tabled): its 2^b values. In mpq_dot.c. */
void mpq__wtab_build(const mpq_filter *f, mpq__wtab *t);

/* Weight k of a row of linear weights (t NULL) or of a tabled filter's codes (t its table). */
static inline int32_t mpq__wget(const uint8_t *w, int32_t bits, uint32_t k, const mpq__wtab *t)
{
    return t != NULL ? t->val[mpq__code(w, bits, k)] : mpq__ld(w, bits, k);
}

/* The pair indices of a quad of b-bit codes whose first code is at bit `sh` of byte p[0]
   (sh = 4 for the odd quads of a 3-bit row, else 0): *i0 = u0 | u1 << b, *i1 = u2 | u3 << b.
   Only bytes holding the quad's codes are read. */
static MPQ_INLINE void mpq__tidx(const uint8_t *p, int32_t bits, uint32_t sh, uint32_t *i0,
                                 uint32_t *i1)
{
    if (bits == 4) {
        *i0 = p[0];
        *i1 = p[1];
    } else if (bits == 2) {
        *i0 = p[0] & 15u;
        *i1 = (uint32_t)p[0] >> 4;
    } else {
        const uint32_t v = ((uint32_t)p[0] | ((uint32_t)p[1] << 8)) >> sh;
        *i0 = v & 63u;
        *i1 = (v >> 6) & 63u;
    }
}

#if MPQ_USE_DSP

/* (x0, x1) and (x2, x3) from mpq__quad's pairs (x0, x2), (x1, x3): PKHBT and PKHTB, so that an
   input quad meets the weight pairs' natural order. GCC does not form PKHBT/PKHTB from the C
   expressions, so on the target they are inline assembly (as CMSIS's __PKHBT/__PKHTB). */
static inline void mpq__natural(int32_t even, int32_t odd, int32_t *p01, int32_t *p23)
{
#if defined(MPQ_EMULATE_DSP)
    *p01 = mpq__i32(((uint32_t)even & 0xFFFFu) | ((uint32_t)odd << 16));
    *p23 = mpq__i32(((uint32_t)odd & 0xFFFF0000u) | ((uint32_t)even >> 16));
#else
    __asm__("pkhbt %0, %1, %2, lsl #16" : "=r"(*p01) : "r"(even), "r"(odd));
    __asm__("pkhtb %0, %1, %2, asr #16" : "=r"(*p23) : "r"(odd), "r"(even));
#endif
}

/* The SMLAD halfword pair (val[u0], val[u1]) of two codes indexed as i = u0 | u1 << b
   (mpq__tidx): PKHBT of the two table values. */
static MPQ_INLINE int32_t mpq__tpair(const int32_t *val, uint32_t i, int32_t bits)
{
    const int32_t lo = val[i & ((1u << bits) - 1u)];
    const int32_t hi = val[i >> bits];
#if defined(MPQ_EMULATE_DSP)
    return mpq__i32(((uint32_t)lo & 0xFFFFu) | ((uint32_t)hi << 16));
#else
    int32_t r;
    __asm__("pkhbt %0, %1, %2, lsl #16" : "=r"(r) : "r"(lo), "r"(hi));
    return r;
#endif
}

/* A quad loop's two sums: SMLAD accumulators with the DSP, wrapping uint32 without. */
typedef int32_t mpq__sums;
#else
typedef uint32_t mpq__sums;
#endif

/* s_r += sum_j X_j*W_r[j] over one quad, r = 0, 1: X the input quad at x - a packed run of
   xbits minus the zero point (z = mpq__quad_z) or, for xbits = 16, four int16 of an im2col
   column in natural order - and W_r the quad of codes at w0, w1 (mpq__tidx, first code at bit
   sh). With the DSP the input becomes the natural pairs (x0, x1), (x2, x3) once for both rows
   and meets two table-value pairs per row (mpq__tpair); without, values from t->val. */
static MPQ_INLINE void mpq__tstep(const uint8_t *x, int32_t xbits, int32_t z, const uint8_t *w0,
                                  const uint8_t *w1, int32_t wbits, uint32_t sh,
                                  const mpq__wtab *t, mpq__sums *s0, mpq__sums *s1)
{
    uint32_t i0, i1;
#if MPQ_USE_DSP
    const int32_t *val = t->val;
    int32_t a, b;
    if (xbits == 16) {
        a = mpq__word(x);
        b = mpq__word(x + 4);
    } else {
        int32_t even, odd;
        mpq__quad(x, xbits, z, 0, &even, &odd);
        mpq__natural(even, odd, &a, &b);
    }
    mpq__tidx(w0, wbits, sh, &i0, &i1);
    *s0 = mpq__smlad(b, mpq__tpair(val, i1, wbits), mpq__smlad(a, mpq__tpair(val, i0, wbits),
                                                               *s0));
    mpq__tidx(w1, wbits, sh, &i0, &i1);
    *s1 = mpq__smlad(b, mpq__tpair(val, i1, wbits), mpq__smlad(a, mpq__tpair(val, i0, wbits),
                                                               *s1));
#else
    const uint32_t m = (1u << wbits) - 1u;
    const int32_t *val = t->val;
    int32_t e[4];
    if (xbits == 16) {
        const int16_t *c = (const int16_t *)(const void *)x;
        e[0] = c[0];
        e[1] = c[1];
        e[2] = c[2];
        e[3] = c[3];
    } else {
        mpq__quad4(x, xbits, z, e);
    }
    mpq__tidx(w0, wbits, sh, &i0, &i1);
    *s0 += (uint32_t)(e[0] * val[i0 & m] + e[1] * val[i0 >> wbits] + e[2] * val[i1 & m]
                      + e[3] * val[i1 >> wbits]);
    mpq__tidx(w1, wbits, sh, &i0, &i1);
    *s1 += (uint32_t)(e[0] * val[i0 & m] + e[1] * val[i0 >> wbits] + e[2] * val[i1 & m]
                      + e[3] * val[i1 >> wbits]);
#endif
}

/* The pairs' bias for an input of `bits` with zero point zp (DSP), or zp itself (plain C): the
   `z` argument of the quad loops. */
static inline int32_t mpq__quad_z(int32_t bits, int32_t zp)
{
#if MPQ_USE_DSP
    return mpq__quad_bias(bits, zp);
#else
    (void)bits;
    return zp;
#endif
}

#if defined(MPQ_HOST_FAST) && !MPQ_USE_DSP
/* -- host-only fast paths (MPQ_HOST_FAST: defined by `mpq eval --engine c`'s host build,
   never by a firmware build) -------------------------------------------------------------------
   The same sums modulo 2^32 as the portable loops, in an order the host's SIMD unit likes:
   integer sums wrap alike in any order, so the bytes are the same. */
#if defined(__SSE2__)
#include <emmintrin.h>

/* Eight int8 at p sign-extended to int16 lanes. */
static inline __m128i mpq__host_s8x8(const int8_t *p)
{
    const __m128i v = _mm_loadl_epi64((const __m128i *)(const void *)p);
    return _mm_srai_epi16(_mm_unpacklo_epi8(v, v), 8);
}

/* The four int32 lanes of v added up, modulo 2^32. */
static inline uint32_t mpq__host_hsum(__m128i v)
{
    v = _mm_add_epi32(v, _mm_shuffle_epi32(v, 0x4E));
    v = _mm_add_epi32(v, _mm_shuffle_epi32(v, 0xB1));
    return (uint32_t)_mm_cvtsi128_si32(v);
}
#endif

/* sum_{i<n} W_r[i]*(X[i] - z) modulo 2^32 for r = 0, 1, 8-bit X and W (mpq__dot2_quads): with
   SSE2, eight elements per step by PMADDWD (|X - z| <= 255 and |W| <= 128, so the int16
   products and their pairwise sums are exact). */
static inline uint64_t mpq__host_dot2_x8_w8(const int8_t *x, int32_t z, const int8_t *w0,
                                            const int8_t *w1, int32_t n)
{
    uint32_t a0 = 0, a1 = 0;
    int32_t i = 0;
#if defined(__SSE2__)
    {
        const __m128i zv = _mm_set1_epi16((int16_t)z);
        __m128i s0 = _mm_setzero_si128(), s1 = _mm_setzero_si128();
        for (; i + 8 <= n; i += 8) {
            const __m128i xv = _mm_sub_epi16(mpq__host_s8x8(x + i), zv);
            s0 = _mm_add_epi32(s0, _mm_madd_epi16(xv, mpq__host_s8x8(w0 + i)));
            s1 = _mm_add_epi32(s1, _mm_madd_epi16(xv, mpq__host_s8x8(w1 + i)));
        }
        a0 = mpq__host_hsum(s0);
        a1 = mpq__host_hsum(s1);
    }
#endif
    for (; i < n; ++i) {
        const int32_t xv = x[i] - z;
        a0 += (uint32_t)(xv * w0[i]);
        a1 += (uint32_t)(xv * w1[i]);
    }
    return (uint64_t)a0 | ((uint64_t)a1 << 32);
}
#endif

#if defined(MPQ_HOST_FAST) && !MPQ_USE_DSP
/* sum_{i<n} W_r[i]*(X[i] - z) modulo 2^32 for r = 0, 1, X a run of 4-bit elements (element 0
   in the low nibble of x[0]) and 8-bit W (mpq__dot2_quads): with SSE2 eight elements (four
   bytes) per step, the nibbles spread to bytes in element order, then PMADDWD as for 8 bits. */
static inline uint64_t mpq__host_dot2_x4_w8(const uint8_t *x, int32_t z, const int8_t *w0,
                                            const int8_t *w1, int32_t n)
{
    uint32_t a0 = 0, a1 = 0;
    int32_t i = 0;
#if defined(__SSE2__)
    {
        const __m128i zero = _mm_setzero_si128(), lo = _mm_set1_epi16(0x000F),
                      hi = _mm_set1_epi16(0x00F0), eight = _mm_set1_epi16(8),
                      off = _mm_set1_epi16((int16_t)(8 + z));
        __m128i s0 = _mm_setzero_si128(), s1 = _mm_setzero_si128();
        for (; i + 8 <= n; i += 8) {
            int32_t word;
            __m128i v, xv;
            memcpy(&word, x + i / 2, 4);
            v = _mm_unpacklo_epi8(_mm_cvtsi32_si128(word), zero);
            v = _mm_or_si128(_mm_and_si128(v, lo), _mm_slli_epi16(_mm_and_si128(v, hi), 4));
            xv = _mm_sub_epi16(_mm_xor_si128(_mm_unpacklo_epi8(v, zero), eight), off);
            s0 = _mm_add_epi32(s0, _mm_madd_epi16(xv, mpq__host_s8x8(w0 + i)));
            s1 = _mm_add_epi32(s1, _mm_madd_epi16(xv, mpq__host_s8x8(w1 + i)));
        }
        a0 = mpq__host_hsum(s0);
        a1 = mpq__host_hsum(s1);
    }
#endif
    for (; i < n; ++i) {
        const uint32_t code = ((uint32_t)x[i / 2] >> (4 * (i & 1))) & 15u;
        const int32_t xv = (int32_t)(code ^ 8u) - 8 - z;
        a0 += (uint32_t)(xv * w0[i]);
        a1 += (uint32_t)(xv * w1[i]);
    }
    return (uint64_t)a0 | ((uint64_t)a1 << 32);
}

/* sum_{i<n} W_r[i]*col[i] modulo 2^32 for r = 0, 1: an im2col column (int16, natural order)
   against two rows of 8-bit weights (mpq__dot2_col_quads), eight elements per step by PMADDWD
   with SSE2 (|col| <= 255, |W| <= 128: exact int16 products and pair sums). */
static inline uint64_t mpq__host_dot2_col_w8(const int16_t *col, const int8_t *w0,
                                             const int8_t *w1, int32_t n)
{
    uint32_t a0 = 0, a1 = 0;
    int32_t i = 0;
#if defined(__SSE2__)
    {
        __m128i s0 = _mm_setzero_si128(), s1 = _mm_setzero_si128();
        for (; i + 8 <= n; i += 8) {
            const __m128i cv = _mm_loadu_si128((const __m128i *)(const void *)(col + i));
            s0 = _mm_add_epi32(s0, _mm_madd_epi16(cv, mpq__host_s8x8(w0 + i)));
            s1 = _mm_add_epi32(s1, _mm_madd_epi16(cv, mpq__host_s8x8(w1 + i)));
        }
        a0 = mpq__host_hsum(s0);
        a1 = mpq__host_hsum(s1);
    }
#endif
    for (; i < n; ++i) {
        a0 += (uint32_t)(col[i] * w0[i]);
        a1 += (uint32_t)(col[i] * w1[i]);
    }
    return (uint64_t)a0 | ((uint64_t)a1 << 32);
}

/* Input row iy of channel c of an 8-bit NHWC tensor, n pixels `step` bytes apart, into d
   (mpq__dw_save_row at 8 bits, the bounds in locals: a byte store may alias the view). */
static inline void mpq__host_gather8(const int8_t *s, int32_t step, int32_t n, int8_t *d)
{
    int32_t x;
    for (x = 0; x < n; ++x) {
        d[x] = s[x * step];
    }
}

/* One output row of one channel of a 3x3 depthwise (mpq_depthwise_inplace, 8-bit output whose
   requantisation is mpq__requantize32): out[ox*ostep] for ox < n from the saved, padded input
   rows b, b + rs, b + 2*rs (raw values; acc0 = bias - input_zp*sum(W)), column stride sw and
   dilation dw. The sums go to a block of int32 first - at unit stride and dilation a loop the
   compiler vectorises - and are requantised and stored in a second pass. */
static inline void mpq__host_dw3_row(const int8_t *b, int32_t rs, int32_t sw, int32_t dw,
                                     const int32_t *wv, uint32_t acc0, int32_t mult,
                                     int32_t shift, int32_t zp, int32_t lo, int32_t hi,
                                     uint8_t *out, int32_t ostep, int32_t n)
{
    enum { BLOCK = 64 };
    uint32_t acc[BLOCK];
    const int8_t *r0 = b, *r1 = b + rs, *r2 = b + 2 * rs;
    const int32_t w0 = wv[0], w1 = wv[1], w2 = wv[2], w3 = wv[3], w4 = wv[4], w5 = wv[5],
                  w6 = wv[6], w7 = wv[7], w8 = wv[8];
    int32_t x0, i;
    for (x0 = 0; x0 < n; x0 += BLOCK) {
        const int32_t m = n - x0 < BLOCK ? n - x0 : BLOCK;
        if (sw == 1 && dw == 1) {
            const int8_t *a = r0 + x0, *c = r1 + x0, *d = r2 + x0;
            for (i = 0; i < m; ++i) {
                acc[i] = acc0 + (uint32_t)(w0 * a[i] + w1 * a[i + 1] + w2 * a[i + 2]
                                           + w3 * c[i] + w4 * c[i + 1] + w5 * c[i + 2]
                                           + w6 * d[i] + w7 * d[i + 1] + w8 * d[i + 2]);
            }
        } else {
            for (i = 0; i < m; ++i) {
                const int32_t k = (x0 + i) * sw;
                acc[i] = acc0 + (uint32_t)(w0 * r0[k] + w1 * r0[k + dw] + w2 * r0[k + 2 * dw]
                                           + w3 * r1[k] + w4 * r1[k + dw] + w5 * r1[k + 2 * dw]
                                           + w6 * r2[k] + w7 * r2[k + dw]
                                           + w8 * r2[k + 2 * dw]);
            }
        }
        for (i = 0; i < m; ++i) {
            /* clamp(r + zp) with the exact sum: mpq__clamp_add's value (see there) */
            const int64_t v = (int64_t)mpq__requantize32(mpq__i32(acc[i]), mult, shift) + zp;
            out[(x0 + i) * ostep] = (uint8_t)(v < lo ? lo : (v > hi ? hi : (int32_t)v));
        }
    }
}
#endif

/* s_r = sum_{i<4*nq} W_r[i]*(X[i] - zp) modulo 2^32 for the two weight rows w0, w1 (r = 0, 1),
   all three runs starting at a byte boundary, z = mpq__quad_z(xbits, zp); returns
   s_0 + 2^32*s_1. Every input quad is decoded once for both rows. Instantiated for constant
   bit widths (mpq__quads_x). */
static MPQ_INLINE uint64_t mpq__dot2_quads(const uint8_t *x, int32_t xbits, int32_t z,
                                           const uint8_t *w0, const uint8_t *w1, int32_t wbits,
                                           int32_t nq)
{
    const int32_t xstep = xbits / 2;
    const int32_t wstep = wbits / 2;
#if MPQ_USE_DSP
    const int32_t nzw = mpq__quad_bias(wbits, 0);
    int32_t s0 = 0, s1 = 0;
    for (; nq > 0; --nq, x += xstep, w0 += wstep, w1 += wstep) {
        int32_t xe, xo, we, wo;
        mpq__quad(x, xbits, z, 0, &xe, &xo);
        mpq__quad(w0, wbits, nzw, 1, &we, &wo);
        s0 = mpq__smlad(xe, we, s0);
        s0 = mpq__smlad(xo, wo, s0);
        mpq__quad(w1, wbits, nzw, 1, &we, &wo);
        s1 = mpq__smlad(xe, we, s1);
        s1 = mpq__smlad(xo, wo, s1);
    }
    return (uint64_t)(uint32_t)s0 | ((uint64_t)(uint32_t)s1 << 32);
#else
    uint32_t a0 = 0, a1 = 0;
#if defined(MPQ_HOST_FAST)
    if (xbits == 8 && wbits == 8) {
        return mpq__host_dot2_x8_w8((const int8_t *)x, z, (const int8_t *)w0,
                                    (const int8_t *)w1, 4 * nq);
    }
    if (xbits == 4 && wbits == 8) {
        return mpq__host_dot2_x4_w8(x, z, (const int8_t *)w0, (const int8_t *)w1, 4 * nq);
    }
#endif
    for (; nq > 0; --nq, x += xstep, w0 += wstep, w1 += wstep) {
        int32_t xv[4], wv[4], j;
        mpq__quad4(x, xbits, z, xv);
        mpq__quad4(w0, wbits, 0, wv);
        for (j = 0; j < 4; ++j) {
            a0 += (uint32_t)(xv[j] * wv[j]);
        }
        mpq__quad4(w1, wbits, 0, wv);
        for (j = 0; j < 4; ++j) {
            a1 += (uint32_t)(xv[j] * wv[j]);
        }
    }
    return (uint64_t)a0 | ((uint64_t)a1 << 32);
#endif
}

/* s_r = sum_{i<4*nq} W_r[i]*X_i modulo 2^32 for the rows w0, w1 of a tabled filter's codes
   (at byte boundaries; t its tables) against a packed input run of xbits (z = mpq__quad_z) or,
   for xbits = 16, an im2col column in natural order; returned as mpq__dot2_quads does. Two
   quads of 3-bit codes take three bytes, the second starting mid-byte. */
static MPQ_INLINE uint64_t mpq__dot2_tquads(const uint8_t *x, int32_t xbits, int32_t z,
                                            const uint8_t *w0, const uint8_t *w1, int32_t wbits,
                                            const mpq__wtab *t, int32_t nq)
{
    const int32_t xstep = xbits == 16 ? 8 : xbits / 2;
    mpq__sums s0 = 0, s1 = 0;
    if (wbits == 3) {
        for (; nq >= 2; nq -= 2, x += 2 * xstep, w0 += 3, w1 += 3) {
            mpq__tstep(x, xbits, z, w0, w1, 3, 0u, t, &s0, &s1);
            mpq__tstep(x + xstep, xbits, z, w0 + 1, w1 + 1, 3, 4u, t, &s0, &s1);
        }
        if (nq > 0) {
            mpq__tstep(x, xbits, z, w0, w1, 3, 0u, t, &s0, &s1);
        }
    } else {
        for (; nq > 0; --nq, x += xstep, w0 += wbits / 2, w1 += wbits / 2) {
            mpq__tstep(x, xbits, z, w0, w1, wbits, 0u, t, &s0, &s1);
        }
    }
    return (uint64_t)(uint32_t)s0 | ((uint64_t)(uint32_t)s1 << 32);
}

/* A quad loop for one pair of bit widths: x is the packed input run (mpq__dot2_quads,
   mpq__dot2_tquads) or an im2col column (mpq__dot2_col_quads, mpq__dot2_tquads at xbits 16),
   z its mpq__quad_z, t the filter's tables (tabled loops only); the two sums come back as the low
   and high words (registers, not memory). Chosen once per kernel call from the tables of
   mpq_dot.c, so the loops are compiled once per bit width and not inlined everywhere. */
typedef uint64_t (*mpq__quads_fn)(const void *x, int32_t z, const uint8_t *w0,
                                  const uint8_t *w1, int32_t nq);
typedef uint64_t (*mpq__tquads_fn)(const void *x, int32_t z, const uint8_t *w0,
                                   const uint8_t *w1, const mpq__wtab *t, int32_t nq);
/* 0, 1, 2 for 8, 4, 2 bits: the tables' index. */
static inline int32_t mpq__bits_index(int32_t bits)
{
    return bits == 8 ? 0 : (bits == 4 ? 1 : 2);
}

/* The quad loops compiled for every pair of bit widths (mpq_dot.c), by mpq__bits_index:
   mpq__quads_x[input bits][weight bits] for linear weights, mpq__tquads_x[input bits][4 -
   weight bits] (4, 3, 2) for a tabled filter's codes. */
extern const mpq__quads_fn mpq__quads_x[3][3];
extern const mpq__tquads_fn mpq__tquads_x[3][3];

/* sum_{i0<=i<n} W[wk_r + i]*X_i for r = 0, 1 (low and high word, modulo 2^32), one by one:
   X_i = X[xk + i] - zp of the packed run x (xbits), or col[i] when x is NULL; W linear (t
   NULL) or a tabled filter's codes (t its tables). */
static MPQ_INLINE uint64_t mpq__elems2(const uint8_t *x, int32_t xbits, uint32_t xk, int32_t zp,
                                       const int16_t *col, const uint8_t *w, int32_t wbits,
                                       const mpq__wtab *t, uint32_t wk0, uint32_t wk1,
                                       int32_t i0, int32_t n)
{
    uint32_t a0 = 0, a1 = 0;
    int32_t i;
    for (i = i0; i < n; ++i) {
        const int32_t xv = x != NULL ? mpq__ld(x, xbits, xk + (uint32_t)i) - zp : col[i];
        a0 += (uint32_t)(xv * mpq__wget(w, wbits, wk0 + (uint32_t)i, t));
        a1 += (uint32_t)(xv * mpq__wget(w, wbits, wk1 + (uint32_t)i, t));
    }
    return (uint64_t)a0 | ((uint64_t)a1 << 32);
}

/* acc[r] += sum_{i<n} W[wk_r + i]*(X[xk + i] - zp) for r = 0, 1, modulo 2^32: a packed input run
   (xbits) against two rows of linear weights (t NULL) or of a tabled filter's codes (t its
   tables) of wbits. In mpq_dot.c. */
void mpq__dot2(const uint8_t *x, int32_t xbits, uint32_t xk, int32_t zp, const uint8_t *w,
               int32_t wbits, const mpq__wtab *t, uint32_t wk0, uint32_t wk1, int32_t n,
               uint32_t acc[2]);

/* sum_{i<n} W[wk + i]*(X[xk + i] - zp) modulo 2^32 for weights of any format, element by
   element (8-bit CODEBOOK filters, which have no per-call table). */
static inline uint32_t mpq__dot_any(const uint8_t *x, int32_t xbits, uint32_t xk,
                                    int32_t zp, const mpq_filter *f, uint32_t wk, int32_t n)
{
    uint32_t acc = 0;
    int32_t i;
    for (i = 0; i < n; ++i) {
        acc += mpq__wmul(f, wk + (uint32_t)i, mpq__ld(x, xbits, xk + (uint32_t)i) - zp);
    }
    return acc;
}

/* -- add arithmetic (DESIGN sec. 4.1) ---------------------------------------------------------- */

/* TFLM's add of one pair of values (DESIGN sec. 4.1, `mpq.quant.arith.add_quantized`):
   clamp(rq(rq((a - zp_a) << ls, Ma, Sa) + rq((b - zp_b) << ls, Mb, Sb), Mo, So) + zp_o). In
   mpq_support.c. */
int32_t mpq__add_one(const mpq_add_params *p, int32_t a, int32_t b);

/* Do the add constants take mpq__add_fast: every shift in [-30, 0] and multipliers >= 0? */
static inline int mpq__add_fast_ok(const mpq_add_params *p)
{
    return p->a_shift <= 0 && p->a_shift >= -30 && p->a_multiplier >= 0 && p->b_shift <= 0
           && p->b_shift >= -30 && p->b_multiplier >= 0 && p->output_shift <= 0
           && p->output_shift >= -30 && p->output_multiplier >= 0;
}

/* mpq__add_one for constants that passed mpq__add_fast_ok: the same value through
   mpq__requantize32 (as mpq__output). */
static inline int32_t mpq__add_fast(const mpq_add_params *p, int32_t a, int32_t b)
{
    const int32_t ra = mpq__requantize32(mpq__i32((uint32_t)(a - p->a_zp) << p->left_shift),
                                         p->a_multiplier, p->a_shift);
    const int32_t rb = mpq__requantize32(mpq__i32((uint32_t)(b - p->b_zp) << p->left_shift),
                                         p->b_multiplier, p->b_shift);
    const int32_t sum = mpq__requantize32(mpq__i32((uint32_t)ra + (uint32_t)rb),
                                          p->output_multiplier, p->output_shift);
    return mpq__clamp_add(sum, p->output_zp, p->act_min, p->act_max);
}

#endif /* MPQ_SUPPORT_H */
