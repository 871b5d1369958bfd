/* mpq_block.c: mpq_copy_block, mpq_fill.
 *
 * Part of mpq's portable kernel library (API and formulas: mpq_kernels.h; shared helpers:
 * mpq_support.h). The structural ops that move values without arithmetic: slice, split and
 * strided slice (one block copy), pad (a fill with the zero point, then a block copy) and
 * concatenation along any axis (one block copy per input).
 */
#include "mpq_support.h"

/* -- block copy ------------------------------------------------------------------------------ */

/* Largest element index the block reaches from `offset` with these strides (counts >= 1). */
static int64_t mpq__block_last(const int32_t count[MPQ_BLOCK_DIMS],
                               const int32_t stride[MPQ_BLOCK_DIMS], int32_t offset)
{
    int64_t last = offset;
    int32_t d;
    for (d = 0; d < MPQ_BLOCK_DIMS; ++d) {
        last += (int64_t)(count[d] - 1) * (int64_t)stride[d];
    }
    return last;
}

int mpq_copy_block(const mpq_block *b, const void *src, void *dst, int32_t bits)
{
    const uint8_t *ps = (const uint8_t *)src;
    uint8_t *pd = (uint8_t *)dst;
    int32_t d, i0, i1, i2, i3, n;
    if (b == NULL || src == NULL || dst == NULL) {
        return MPQ_ERR_ARG;
    }
    if (!mpq__bits_ok(bits)) {
        return MPQ_ERR_BITS;
    }
    for (d = 0; d < MPQ_BLOCK_DIMS; ++d) {
        if (b->count[d] < 1 || b->src_stride[d] < 0 || b->dst_stride[d] < 0) {
            return MPQ_ERR_ARG;
        }
    }
    if (b->src_offset < 0 || b->dst_offset < 0 || b->src_size < 0 || b->dst_size < 0
        || mpq__block_last(b->count, b->src_stride, b->src_offset) >= b->src_size
        || mpq__block_last(b->count, b->dst_stride, b->dst_offset) >= b->dst_size) {
        return MPQ_ERR_ARG;
    }
    n = b->count[3];
    for (i0 = 0; i0 < b->count[0]; ++i0) {
        for (i1 = 0; i1 < b->count[1]; ++i1) {
            for (i2 = 0; i2 < b->count[2]; ++i2) {
                const uint32_t ks = (uint32_t)(b->src_offset + i0 * b->src_stride[0]
                                               + i1 * b->src_stride[1] + i2 * b->src_stride[2]);
                const uint32_t kd = (uint32_t)(b->dst_offset + i0 * b->dst_stride[0]
                                               + i1 * b->dst_stride[1] + i2 * b->dst_stride[2]);
                /* A unit-stride run of whole bytes on both sides copies as bytes. */
                if (b->src_stride[3] == 1 && b->dst_stride[3] == 1
                    && ((ks * (uint32_t)bits) & 7u) == 0 && ((kd * (uint32_t)bits) & 7u) == 0
                    && (((uint32_t)n * (uint32_t)bits) & 7u) == 0) {
                    memcpy(pd + (kd * (uint32_t)bits >> 3), ps + (ks * (uint32_t)bits >> 3),
                           (size_t)n * (size_t)bits / 8u);
                } else {
                    for (i3 = 0; i3 < n; ++i3) {
                        mpq__st(pd, bits, kd + (uint32_t)(i3 * b->dst_stride[3]),
                                mpq__ld(ps, bits, ks + (uint32_t)(i3 * b->src_stride[3])));
                    }
                }
            }
        }
    }
    return MPQ_OK;
}

/* -- fill ------------------------------------------------------------------------------------ */

int mpq_fill(void *dst, int32_t bits, int32_t n, int32_t value)
{
    uint8_t *pd = (uint8_t *)dst;
    uint32_t pattern, full, k;
    int32_t j, per_byte;
    if (dst == NULL || n < 0) {
        return MPQ_ERR_ARG;
    }
    if (!mpq__bits_ok(bits)) {
        return MPQ_ERR_BITS;
    }
    if (!mpq__in_range(value, bits)) {
        return MPQ_ERR_ARG;
    }
    /* One byte holds 8/bits copies of the value: fill whole bytes, then the last elements. */
    per_byte = bits == 8 ? 1 : bits == 4 ? 2 : 4; /* no division: v6-M has no divider */
    pattern = 0;
    for (j = 0; j < per_byte; ++j) {
        pattern |= ((uint32_t)value & ((1u << bits) - 1u)) << (j * bits);
    }
    full = (uint32_t)n * (uint32_t)bits >> 3;
    memset(pd, (int)(pattern & 0xFFu), (size_t)full);
    for (k = full * (uint32_t)per_byte; k < (uint32_t)n; ++k) {
        mpq__st(pd, bits, k, value);
    }
    return MPQ_OK;
}
