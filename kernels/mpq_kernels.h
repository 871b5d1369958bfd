/* mpq_kernels.h: the integer kernels of mpq's portable backend.
 *
 * Plain C99 shipped with mpq (`kernels/` in its source tree); `mpq export` copies the files
 * a plan's kernels need into the export, unchanged. One file per kernel family:
 *   mpq_conv.c             mpq_conv2d, mpq_conv2d_add, mpq_conv2d_scratch_size,
 *                          mpq_conv2d_unpacked, mpq_conv2d_add_unpacked,
 *                          mpq_conv2d_unpacked_scratch_size
 *   mpq_depthwise.c        mpq_depthwise_inplace, mpq_depthwise_inplace_grouped,
 *                          mpq_depthwise_inplace_scratch_size
 *   mpq_fully_connected.c  mpq_fully_connected
 *   mpq_add.c              mpq_add
 *   mpq_pool.c             mpq_avgpool, mpq_maxpool, mpq_avgpool_grouped, mpq_maxpool_grouped,
 *                          mpq_avgpool_accumulate, mpq_avgpool_finish
 *   mpq_softmax.c          mpq_softmax
 *   mpq_copy.c             mpq_copy_view
 *   mpq_reduce.c           mpq_mean
 *   mpq_resize.c           mpq_resize_nearest, mpq_resize_bilinear
 *   mpq_elementwise.c      mpq_mul, mpq_sub, mpq_prelu
 *   mpq_block.c            mpq_copy_block, mpq_fill (slice, split, pad, concat on any axis)
 *   mpq_activation.c       mpq_activation
 * and what they share: mpq_support.h (inline helpers), mpq_support.c (requantisation and add
 * helpers kept out of line; conv, depthwise, fully connected, add) and mpq_dot.c (the dot
 * product loops per bit width and the weight decode tables; conv, fully connected). Compile
 * all the files an export holds with the same flags; unused functions are dropped by
 * -ffunction-sections -Wl,--gc-sections.
 *
 * Every kernel computes, byte for byte, what mpq's integer reference computes (mpq/sim.py and
 * mpq/quant/arith.py; DESIGN sec. 4): TensorFlow Lite Micro's int8 arithmetic, extended to 4- and
 * 2-bit activations and weights. C99, integer only, no allocation, no library beyond
 * <stdint.h> and <string.h>. On cores with the DSP extension (__ARM_FEATURE_DSP) the dot
 * products at every width use SXTB16/SMLAD (sub-byte operands are unpacked four at a time
 * straight into SMLAD's halfword pairs, two output channels share every unpacked input, and
 * 3x3 depthwise rows feed two outputs per word); elsewhere plain C gives the same bits.
 * Sub-byte outputs of a pixel's run of channels are written a byte at a time; bytes shared
 * with elements outside the run are merged, so the aliasing rules below hold as stated.
 *
 * Conventions shared by all kernels:
 *  - Tensors are NHWC with batch 1 and are read and written through `mpq_view`s, so a kernel
 *    can work on a sub-region of a larger stored tensor (patch-based inference, concat).
 *  - Activation bit widths are 8, 4 or 2, values signed in [-2^(b-1), 2^(b-1)-1]. Weights are
 *    stored as b-bit codes (b = 8, 4, 3 or 2) in one of three formats (mpq_filter below); a
 *    linear weight is signed in [-(2^(b-1)-1), 2^(b-1)-1] (DESIGN sec. 4.2, 7.4).
 *  - Requantisation is TFLM's double rounding (`mpq.quant.arith.requantize`):
 *        x  = acc << max(S, 0)                    (int32, wrapping)
 *        hi = floor((x * M + 2^30) / 2^31)
 *        y  = round_half_away_from_zero(hi / 2^max(-S, 0))
 *    For a right shift s = -S in [1, 30] and M >= 0 the kernels compute the same y in one
 *    rounding, y = floor((x * M + 2^(30+s) + 2^30 - [x < 0] * 2^31) / 2^(31+s)) (one SMLAL;
 *    mpq_support.h, mpq__requant_rs, says why they are equal).
 *  - Every kernel returns MPQ_OK or a negative MPQ_ERR_* code, having checked its arguments
 *    before touching any output.
 *  - Unless a kernel says otherwise, its output must not overlap its inputs.
 *  - Partial overlap (vMCU; mpq.memory.overlap_shift): mpq_conv2d, mpq_conv2d_unpacked,
 *    mpq_packed_conv2d, mpq_avgpool and mpq_maxpool (and their _grouped forms) write the
 *    output pixels in raster order, one or two (a pair of consecutive pixels) at a time, each
 *    only after reading every input element it needs;
 *    so an output stored D bytes before the input's start is exact when, for every pixel
 *    pair, its last written byte lies D bytes before the first input byte that pair or a later
 *    pixel still reads. The planner places outputs only there; any new fast path must keep
 *    that order (tests/test_overlap.py runs each such layer on host against the reference).
 *    Reverse form (mpq.memory.reverse_overlap_shift): an output stored S bytes after the
 *    input's start, computed by one call per output row from the last row to the first (each
 *    call's input view the row's window, pad_top its own), is exact when each row's first
 *    written byte lies after every input byte that row and the rows above it read.
 */
#ifndef MPQ_KERNELS_H
#define MPQ_KERNELS_H

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define MPQ_OK 0
#define MPQ_ERR_ARG (-1)   /* inconsistent shapes, strides, ranges, or a missing buffer */
#define MPQ_ERR_BITS (-2)  /* a bit width outside {8, 4, 2} (weights: the format's widths), or a
                              mix the kernel cannot take */

/* Weight formats (mpq_filter.format): how the unsigned b-bit code u of a weight decodes to its
   int8 value (DESIGN sec. 7.4).
   LINEAR   - u is the signed b-bit value itself; b = 8, 4 or 2.
   CODEBOOK - codebook[u], a per-layer table of 2^b int8 entries (weighted-entropy
              quantisation); b = 8, 4, 3 or 2.
   POW2     - u == 0: 0; otherwise sign = u >> (b-1), e = (u & (2^(b-1) - 1)) - 1 and the
              value is -2^e if sign else 2^e (b = 4: 0, +-1 .. +-64; b = 3: 0, +-1, +-2, +-4;
              b = 2: 0, +-1); u == 2^(b-1) (sign alone, "-0") is 0 too; b = 4, 3 or 2. The
              kernels multiply by the decoded value: +-2^e * x is bit for bit the shift
              +-(x << e) modulo 2^32 (a multiply-accumulate costs a cycle on a Cortex-M).
   CODEBOOK and POW2 filters of 4, 3 or 2 bits are decoded through a table of their code
   values that mpq_conv2d, mpq_conv2d_add and mpq_fully_connected build on their stack once
   per call (64 bytes; the convolutions' frames hold it for every filter, the fully connected
   layer's only for these). */
#define MPQ_WFMT_LINEAR 0
#define MPQ_WFMT_CODEBOOK 1
#define MPQ_WFMT_POW2 2

/* A view of a stored NHWC tensor, packed along the flattened order: element k of the stored
   tensor sits at bit (k*bits) - 8-bit: byte k (int8); 4-bit: low nibble first (element 2k in
   bits 0..3 of byte k); 2-bit: element 4k+j in bits 2j..2j+1. Values are signed two's
   complement in [-2^(bits-1), 2^(bits-1)-1]. Element (y, x, ch) of the view is stored element
   ((y0 + y)*stored_w + (x0 + x))*c + ch. */
typedef struct { void *data; int32_t bits; int32_t h, w, c; int32_t y0, x0, stored_w; } mpq_view;

/* Constant weights [n][h][w][c] as b-bit codes along their flattened order: code k is bits
   k*b .. k*b+b-1 of the little-endian bit stream (byte i holds stream bits 8i .. 8i+7), which
   is a view's packing for b = 8, 4, 2; a 3-bit code may straddle two bytes. `format` says how
   a code decodes (MPQ_WFMT_*); `codebook` is the CODEBOOK format's table (else unused, may be
   NULL). A positional initialiser { data, bits, n, h, w, c } leaves both zero: LINEAR.
   Convolutions: OHWI [Cout][KH][KW][Cin/groups]; fully connected: [Cout][1][1][K] (any h, w, c
   with h*w*c = K). Bad combinations are refused: an unknown format or a CODEBOOK without a
   codebook with MPQ_ERR_ARG, bits outside the format's widths with MPQ_ERR_BITS. */
typedef struct {
    const void *data;
    int32_t bits;
    int32_t n, h, w, c;
    int32_t format;
    const int8_t *codebook;
} mpq_filter;

/* Per output channel: int32 bias (NULL means zero) and the requantisation (M, S) of
   `mpq.quant.arith.conv_multipliers`. */
typedef struct {
    const int32_t *bias;
    const int32_t *multiplier;
    const int32_t *shift;
} mpq_channel_quant;

/* Convolution geometry and quantisation. Padding is given as top/left only: the bottom/right
   padding is implied by the output view's h/w, and taps outside the input view contribute
   nothing (the same as padding with input_zp). */
typedef struct {
    int32_t stride_h, stride_w;      /* >= 1 */
    int32_t dilation_h, dilation_w;  /* >= 1 */
    int32_t pad_top, pad_left;       /* >= 0 */
    int32_t groups;                  /* input channels = groups*filter.c; depthwise: groups = Cin */
    int32_t input_zp;                /* subtracted from every input value; in the input's range */
    int32_t output_zp;               /* added after requantisation */
    int32_t act_min, act_max;        /* fused activation clamp, inside the output's range */
} mpq_conv_params;

/* Fully connected quantisation (weights are symmetric: no filter offset). */
typedef struct { int32_t input_zp, output_zp, act_min, act_max; } mpq_fc_params;

/* TFLM's add constants (`mpq.quant.arith.add_params`): per input zero point, multiplier and
   shift, the common left shift (20), the output multiplier/shift/zero point and the clamp. */
typedef struct {
    int32_t a_zp, a_multiplier, a_shift;
    int32_t b_zp, b_multiplier, b_shift;
    int32_t left_shift;              /* 0..31 */
    int32_t output_zp, output_multiplier, output_shift;
    int32_t act_min, act_max;
} mpq_add_params;

/* Pooling window, stride, top/left padding (bottom/right implied by the output view) and clamp. */
typedef struct {
    int32_t kernel_h, kernel_w, stride_h, stride_w, pad_top, pad_left;
    int32_t act_min, act_max;
} mpq_pool_params;

/* int8 softmax constants (`mpq.quant.arith.softmax_params`). */
typedef struct { int32_t multiplier, left_shift, diff_min; } mpq_softmax_params;

/* Bytes of int16 scratch `mpq_conv2d` and `mpq_conv2d_add` need for these arguments:
 *   0                       for 1x1 kernels with stride 1, no padding and an output no larger
 *                           than the input (the input pixel is read in place);
 *   2*KH*KW*(Cin/groups)    otherwise (one im2col column of zero-point-subtracted inputs).
 * Returns a negative MPQ_ERR_* code when the arguments are inconsistent. */
int32_t mpq_conv2d_scratch_size(const mpq_conv_params *p, const mpq_filter *f,
                                const mpq_view *in, const mpq_view *out);

/* Convolution: regular, grouped, depthwise with any channel multiplier, strided, dilated
 * (DESIGN sec. 4.1; runtimes.md sec. 1.4). For output (oy, ox, o), group g = o / (Cout/groups):
 *   acc = bias[o] + sum_{ky,kx,ci} W[o,ky,kx,ci]*(X[oy*sh - pt + ky*dh, ox*sw - pl + kx*dw,
 *                                                g*(Cin/groups) + ci] - input_zp)
 *   Y[oy,ox,o] = clamp(requant(acc, M[o], S[o]) + output_zp, act_min, act_max)
 * with out-of-view taps skipped. Any mix of input, output and weight bits. `scratch` holds
 * mpq_conv2d_scratch_size() bytes (2-byte aligned; may be NULL when that is 0). An output
 * with the input's `data` pointer is refused (MPQ_ERR_ARG). */
int mpq_conv2d(const mpq_conv_params *p, const mpq_filter *f, const mpq_channel_quant *q,
               const mpq_view *in, const mpq_view *out, int16_t *scratch);

/* A convolution fused with the residual add that consumes it (mpq.memory.fused_residual_adds):
 *   res = clamp(requant(acc, M[o], S[o]) + p->output_zp, p->act_min, p->act_max)
 *         (the convolution of mpq_conv2d, quantised as the intermediate tensor `res`)
 *   Y   = clamp(requant(requant((skip - a_zp) << ls, Ma, Sa) + requant((res - b_zp) << ls,
 *               Mb, Sb), Mo, So) + output_zp, act_min, act_max)      (TFLM add, DESIGN sec. 4.1)
 * so `add` describes the skip as input a and the convolution result as input b (swap the
 * constants when the graph's add has them the other way round). `skip` and `out` have the
 * convolution's output shape. `out` may be the very same view as `skip` (same data, bits,
 * offsets and stored width): each output element is written right after its skip element is
 * read, so the sum takes the skip's storage. Neither may overlap `in` (the same `data` as `in`
 * is refused: the convolution would read pixels already overwritten), and views sharing `data`
 * must have the same bits (else MPQ_ERR_BITS). Scratch as mpq_conv2d. */
int mpq_conv2d_add(const mpq_conv_params *p, const mpq_filter *f, const mpq_channel_quant *q,
                   const mpq_view *in, const mpq_add_params *add, const mpq_view *skip,
                   const mpq_view *out, int16_t *scratch);

/* Bytes of int8 scratch mpq_depthwise_inplace needs: one input channel with its padding,
 *   (pad_top + H + pad_bottom)*(pad_left + W + pad_right),
 * where pad_bottom/right are the rows/columns the output view reaches below/right of the input
 * (0 when it does not). Returns a negative MPQ_ERR_* code for inconsistent arguments. */
int32_t mpq_depthwise_inplace_scratch_size(const mpq_conv_params *p, const mpq_filter *f,
                                           const mpq_view *in, const mpq_view *out);

/* Depthwise convolution with channel multiplier 1 whose output overwrites its input's storage
 * (TinyEngine's in-place depthwise; runtimes.md sec. 3). Same arithmetic as mpq_conv2d with
 * groups = C. Channel by channel: the input channel is copied to `scratch` (surrounded by
 * input_zp padding), then that channel's outputs are written. An output element of channel ch
 * is stored at an index == ch (mod C), i.e. over input channel ch, which is already saved; so
 * `out` may share storage with `in` when both views start at the same element (same `data`,
 * equal bits and C), whatever their offsets, widths and strides, or when `out->data` is a
 * whole number of pixels (C*bits/8 bytes, C*bits a multiple of 8) above or below `in->data`:
 * a patch stage ends a tile's output where its larger input tile ends. Weights are
 * [C][KH][KW][1].
 * Any bits; 4- and 2-bit tensors one element at a time (mpq_depthwise_inplace_grouped is
 * their fast form). */
int mpq_depthwise_inplace(const mpq_conv_params *p, const mpq_filter *f,
                          const mpq_channel_quant *q, const mpq_view *in, const mpq_view *out,
                          int8_t *scratch);

/* mpq_depthwise_inplace, byte for byte, for 4- and 2-bit tensors whose C fills whole bytes
 * (even at 4 bits, a multiple of 4 at 2) and filters of at most MPQ_DW_TAPS (5x5) taps, by
 * channel groups (pairs at 4 bits, quads at 2): the group's bytes are saved - the same
 * scratch, mpq_depthwise_inplace_scratch_size, a byte per padded pixel - and each output byte
 * holds the group's results, written over bytes of the same group (3x3 stride 1/2 rows on
 * SMLAD with the DSP, as the int8 loops). The same in-place rule. MPQ_ERR_BITS for 8-bit
 * tensors, MPQ_ERR_ARG for a C or filter outside the rule. A separate entry point so that a
 * model without such layers does not link its code. */
int mpq_depthwise_inplace_grouped(const mpq_conv_params *p, const mpq_filter *f,
                                  const mpq_channel_quant *q, const mpq_view *in,
                                  const mpq_view *out, int8_t *scratch);

/* Fully connected (runtimes.md sec. 1.4): the input view is flattened in (y, x, ch) order into K
 * values, the output view's h*w*c elements are the Cout outputs in the same order:
 *   acc = bias[o] + sum_k W[o,k]*(X[k] - input_zp)
 *   Y[o] = clamp(requant(acc, M[o], S[o]) + output_zp, act_min, act_max)
 * No scratch: the input is read in place. Output and input must not share `data`. */
int mpq_fully_connected(const mpq_fc_params *p, const mpq_filter *f, const mpq_channel_quant *q,
                        const mpq_view *in, const mpq_view *out);

/* Elementwise add with TFLM's arithmetic (DESIGN sec. 4.1, `mpq.quant.arith.add_quantized`):
 *   Y = clamp(requant(requant((A - a_zp) << ls, Ma, Sa) + requant((B - b_zp) << ls, Mb, Sb),
 *             Mo, So) + output_zp, act_min, act_max)
 * All three views have the same h, w, c; any bits. `out` may be the very same view as `a` or
 * `b` (same data, bits, offsets, stored width): elements are read before they are written;
 * views sharing `data` with different bits are refused (MPQ_ERR_BITS). */
int mpq_add(const mpq_add_params *p, const mpq_view *a, const mpq_view *b, const mpq_view *out);

/* Average pooling (runtimes.md sec. 1.4): over the cnt in-view taps of each window,
 *   v = sum > 0 ? (sum + cnt/2)/cnt : (sum - cnt/2)/cnt   (C truncating division)
 *   Y = clamp(v, act_min, act_max)
 * The sum is kept in a register: no scratch. Input and output share the quantisation (no
 * requantisation); a window with no tap in view gives clamp(0). Any bits; 4- and 2-bit inputs
 * one element at a time (mpq_avgpool_grouped is their fast form). */
int mpq_avgpool(const mpq_pool_params *p, const mpq_view *in, const mpq_view *out);

/* mpq_avgpool, byte for byte, for 4- and 2-bit inputs whose C fills whole bytes (even at 4
 * bits, a multiple of 4 at 2) and an output that does not share their storage: 4-bit inputs
 * summed by channel pairs (both nibbles of each byte; eight channels a word with the DSP, for
 * windows of at most 256 taps), 2-bit inputs by channel quads (the four fields of each byte;
 * sixteen channels a word with the DSP, windows of at most 256 taps). MPQ_ERR_BITS for 8-bit
 * inputs, MPQ_ERR_ARG outside the rule. A separate entry point so that a model without such
 * layers does not link its code. */
int mpq_avgpool_grouped(const mpq_pool_params *p, const mpq_view *in, const mpq_view *out);

/* A global average pool in parts, for a patch stage that ends in one (DESIGN sec. 6): each
 * patch adds its tile, sums[ch] += Σ over the view's pixels of in(y, x, ch) (any bits; the
 * caller zeroes sums[0..c) before the first tile), and after the last tile
 *   Y(0, 0, ch) = clamp(v, act_min, act_max), v = mpq_avgpool's rounded mean of sums[ch]
 *                 over count = H*W
 * into a 1x1 view. Since the tiles cover the input once, Y is mpq_avgpool's output over the
 * whole input, byte for byte. int32 sums hold any input of up to 2^24 pixels. */
int mpq_avgpool_accumulate(const mpq_view *in, int32_t *sums);
int mpq_avgpool_finish(const int32_t *sums, int32_t count, int32_t act_min, int32_t act_max,
                       const mpq_view *out);

/* Max pooling: Y = clamp(max over the in-view taps, act_min, act_max); a window with no tap
 * in view gives act_min. No scratch. Any bits; 4- and 2-bit inputs one element at a time
 * (mpq_maxpool_grouped is their fast form). */
int mpq_maxpool(const mpq_pool_params *p, const mpq_view *in, const mpq_view *out);

/* mpq_maxpool, byte for byte, under mpq_avgpool_grouped's rule, by channel groups (every byte
 * read once for its 8/bits channels; a word of them at a time by SSUB8/SEL with the DSP when a
 * pixel is whole words). MPQ_ERR_BITS for 8-bit inputs, MPQ_ERR_ARG outside the rule. */
int mpq_maxpool_grouped(const mpq_pool_params *p, const mpq_view *in, const mpq_view *out);

/* int8 softmax along C for every pixel, exactly `mpq.quant.arith.softmax_s8` (the gemmlowp
 * fixed point of TFLM and CMSIS-NN arm_softmax_s8, runtimes.md sec. 1.4): diff = x - max(row);
 * taps with diff >= diff_min get exp(diff*2^left_shift*M) in Q0.31, summed in Q12; each
 * output is that exp times the reciprocal of the sum, in units of 1/256, minus 128; the others
 * get -128. Input of any bits; the output view must be 8-bit (scale 1/256, zero point -128).
 * Exact for rows shorter than 8192 elements (the sum must fit in 32 bits). */
int mpq_softmax(const mpq_softmax_params *p, const mpq_view *in, const mpq_view *out);

/* Copies `src` into `dst` channels dst_c0 .. dst_c0 + src->c - 1: Y[y, x, dst_c0 + ch] =
 * X[y, x, ch]. Equal bits and h, w. Concatenation (along H or W through the views' y0/x0,
 * along C through dst_c0) and stitching patch tiles into a whole tensor. No overlap. */
int mpq_copy_view(const mpq_view *src, const mpq_view *dst, int32_t dst_c0);

/* Mean over any of H, W, C (TFLM's int8 MEAN, reference_ops::QuantizedMeanOrSum;
 * `mpq.quant.arith.mean_quantized`). For each output element, over the `count` input elements
 * of the reduced axes (reduce_* = 1; the output view has extent 1 there, the input's
 * elsewhere):
 *   acc = int32(sum(X) - count*input_zp)                  (wrapping, as TFLM's int32 sum)
 *   Y   = clamp(requant(acc, M, S) + output_zp, act_min, act_max)
 * where (M, S) fold s_in/s_out with 1/count exactly as TFLM does (`arith.mean_params`: not
 * the (M, S) of s_in/(s_out*count)). Any bits; no scratch; no overlap. */
typedef struct {
    int32_t reduce_h, reduce_w, reduce_c;  /* 0 or 1 */
    int32_t count;                         /* product of the reduced input extents */
    int32_t input_zp, output_zp;
    int32_t multiplier, shift;
    int32_t act_min, act_max;
} mpq_mean_params;
int mpq_mean(const mpq_mean_params *p, const mpq_view *in, const mpq_view *out);

/* Nearest-neighbour resize as an index map (ONNX Resize / Upsample nearest, TFLite
 * RESIZE_NEAREST_NEIGHBOR; the model's coordinate rule is resolved into the maps by mpq):
 *   Y[oy, ox, ch] = X[rows[oy], cols[ox], ch]
 * rows has out->h entries in [0, in->h), cols out->w entries in [0, in->w). A copy: equal
 * bits (any) and C, the quantisation is the input's. No overlap. */
typedef struct { const int32_t *rows, *cols; } mpq_resize_params;
int mpq_resize_nearest(const mpq_resize_params *p, const mpq_view *in, const mpq_view *out);

/* Bilinear resize with TFLM's int8 arithmetic (reference_ops::ResizeBilinearInteger;
 * `mpq.quant.arith.resize_bilinear_int`), the taps per output row and column precomputed by
 * mpq (`arith.bilinear_int_taps`: lower/upper input index, fraction f in 1/1024):
 *   s = X[y0,x0]*(1024-fy)*(1024-fx) + X[y1,x0]*fy*(1024-fx) + X[y0,x1]*(1024-fy)*fx
 *       + X[y1,x1]*fy*fx
 *   Y = (s +- 2^19) / 2^20   (C division: halves away from zero)
 * A convex combination: Y stays in the input's range. Equal bits (any) and C; the output is
 * quantised like the input. No scratch; no overlap. */
typedef struct {
    const int32_t *y0, *y1, *fy;  /* out->h entries each */
    const int32_t *x0, *x1, *fx;  /* out->w entries each */
} mpq_bilinear_params;
int mpq_resize_bilinear(const mpq_bilinear_params *p, const mpq_view *in, const mpq_view *out);

/* -- elementwise: mul, sub, prelu (mpq_elementwise.c) ----------------------------------------- */

/* TFLM's mul constants (`mpq.quant.arith.mul_params`): the inputs' zero points, the output's
   multiplier/shift of s_a*s_b/s_out and zero point, and the clamp. */
typedef struct {
    int32_t a_zp, b_zp;
    int32_t output_zp, output_multiplier, output_shift;
    int32_t act_min, act_max;
} mpq_mul_params;

/* PRelu constants (`mpq.quant.arith.prelu_params`): the input zero point, the requantisation
   of x >= 0 (s_in/s_out) and of x < 0 (s_in*s_alpha/s_out), the int8 slope per channel
   (`alpha[c]`, c < the views' channels) with its zero point, the output zero point and clamp. */
typedef struct {
    int32_t input_zp;
    int32_t pos_multiplier, pos_shift;
    int32_t neg_multiplier, neg_shift;
    const int8_t *alpha;
    int32_t alpha_zp;
    int32_t output_zp, act_min, act_max;
} mpq_prelu_params;

/* Elementwise mul with TFLM's arithmetic (reference_integer_ops::MulElementwise;
 * `mpq.quant.arith.mul_quantized`), broadcasting: each of a's and b's h, w, c equals out's or
 * is 1 (squeeze-excite: a [H][W][C] times b [1][1][C]); the element at a broadcast dim is read
 * at index 0.
 *   Y = clamp(requant((A - a_zp) * (B - b_zp), M, S) + output_zp, act_min, act_max)
 * Any bits. An operand may be a constant array in Flash (an 8-bit view of it; only read).
 * `out` may be the very same view as an operand of its own shape (read before written); views
 * sharing `data` with different bits are refused (MPQ_ERR_BITS). */
int mpq_mul(const mpq_mul_params *p, const mpq_view *a, const mpq_view *b, const mpq_view *out);

/* Elementwise sub with TFLM's arithmetic (reference_ops::SubElementwise;
 * `mpq.quant.arith.sub_quantized`), the add constants of mpq_add (sub's own values), the same
 * broadcasting and aliasing rules as mpq_mul:
 *   Y = clamp(requant(requant((A - a_zp) << ls, Ma, Sa) - requant((B - b_zp) << ls, Mb, Sb),
 *             Mo, So) + output_zp, act_min, act_max)   (the difference wraps as int32) */
int mpq_sub(const mpq_add_params *p, const mpq_view *a, const mpq_view *b, const mpq_view *out);

/* PRelu with TFLM's arithmetic (reference_ops::BroadcastPrelu4DSlow;
 * `mpq.quant.arith.prelu_quantized`), one int8 slope per channel: with v = X - input_zp,
 *   Y = clamp((v >= 0 ? requant(v, Mp, Sp) : requant(v * (alpha[c] - alpha_zp), Mn, Sn))
 *             + output_zp, act_min, act_max)
 * `in` and `out` have the same h, w, c; any bits; `out` may be the very same view as `in`. */
int mpq_prelu(const mpq_prelu_params *p, const mpq_view *in, const mpq_view *out);

/* A block of elements of two packed buffers (element k at bits k*b .. k*b+b-1, as mpq_view),
 * up to four nested axes, outermost first: element (i0, i1, i2, i3) of the block is source
 * element src_offset + sum(i_d * src_stride[d]) and destination element dst_offset +
 * sum(i_d * dst_stride[d]). Counts >= 1 (pad unused axes with count 1), strides >= 0;
 * src_size and dst_size are the buffers' element counts, which the block must stay inside. */
#define MPQ_BLOCK_DIMS 4
typedef struct {
    int32_t count[MPQ_BLOCK_DIMS];
    int32_t src_stride[MPQ_BLOCK_DIMS];
    int32_t dst_stride[MPQ_BLOCK_DIMS];
    int32_t src_offset, dst_offset;
    int32_t src_size, dst_size;
} mpq_block;

/* Copies the block: dst[dst element] = src[src element], values unchanged (slice, split,
 * strided slice, the interior of a pad, one input of a concatenation along any axis). Any
 * bits (8, 4, 2) on both sides alike; other elements of the destination keep their values.
 * No overlap. */
int mpq_copy_block(const mpq_block *b, const void *src, void *dst, int32_t bits);

/* Sets elements 0 .. n-1 of a packed `bits`-bit buffer to `value` (pad: the zero point). */
int mpq_fill(void *dst, int32_t bits, int32_t n, int32_t value);

/* A unary activation's lookup table (`mpq.quant.lut.activation_table`): entry (uint8_t)x is the
   output code of signed input code x, 256 int8 entries whatever the input's bits. */
typedef struct { const int8_t *table; } mpq_activation_params;

/* Sigmoid/Logistic, Tanh, HardSwish, HardSigmoid, LeakyRelu: elementwise
 *   Y[y, x, ch] = table[(uint8_t)X[y, x, ch]]
 * where mpq computed the table with TFLM's int8 arithmetic for each input code (mpq/quant/lut.py),
 * so the lookup is that arithmetic, bit for bit. Equal h, w, c; any input and output bits (each
 * table entry an input code can reach must fit the output's bits, else MPQ_ERR_ARG). `out` may
 * be the very same view as `in` (each element is read before it is written); views sharing
 * `data` with different bits are refused (MPQ_ERR_BITS). No scratch. */
int mpq_activation(const mpq_activation_params *p, const mpq_view *in, const mpq_view *out);

/* -- sub-byte operands unpacked to int8 (mpq_conv.c; issue 15) ------------------------------
 *
 * mpq_conv2d's arithmetic (groups = 1) through its int8 path (2 output channels x 2 pixels per
 * SMLAD block) for layers whose weights are sub-byte or tabled (any format; typically a
 * model's 8-bit-input first layer) and/or whose input is 4- or 2-bit: the weights are decoded
 * once per call to int8 at the front of `scratch`, and a sub-byte input is unpacked into the
 * int8 path's two im2col columns (also for 1x1 layers, which mpq_conv2d reads in place).
 * Outputs of any bits, stored in the same pair order. Same bits as mpq_conv2d, for the scratch
 * below. MPQ_ERR_BITS for groups > 1 or 8-bit input with 8-bit linear weights. */

/* Bytes of 4-byte aligned scratch of mpq_conv2d_unpacked: align4(n*KH*KW*Cin) for the int8
   weights (0 for 8-bit linear ones) plus 2*KH*KW*Cin for the columns (0 for an 8-bit input
   that mpq_conv2d reads in place). */
int32_t mpq_conv2d_unpacked_scratch_size(const mpq_conv_params *p, const mpq_filter *f,
                                         const mpq_view *in, const mpq_view *out);

/* mpq_conv2d (groups = 1) through the int8 path on unpacked operands. */
int mpq_conv2d_unpacked(const mpq_conv_params *p, const mpq_filter *f,
                        const mpq_channel_quant *q, const mpq_view *in, const mpq_view *out,
                        int16_t *scratch);

/* mpq_conv2d_add (the same arguments, views and aliasing rules) through the int8 path on
   unpacked operands; scratch as mpq_conv2d_unpacked_scratch_size. */
int mpq_conv2d_add_unpacked(const mpq_conv_params *p, const mpq_filter *f,
                            const mpq_channel_quant *q, const mpq_view *in,
                            const mpq_add_params *add, const mpq_view *skip,
                            const mpq_view *out, int16_t *scratch);

/* -- packed sub-byte kernels (mpq_packed.c; issue 15 item 2) ----------------------------------
 *
 * Convolution (groups = 1; 1x1 and KxK, any stride, dilation, padding; also fused with its
 * residual add) and fully connected layers whose activations and weights are both 4 or 2
 * bits (W4A4, W2A2 and the 4x2 mixes), with linear weights. Two multiply-accumulates share
 * each 16-bit SMLAD lane (ULPPACK / MCU-MixQ packing): per output pixel the input column is
 * written once to `scratch` as lanes
 *     a_l = (X[2l] + oa) + X[2l+1] * 2^12                     (oa = 2^(act_bits-1))
 * and each row of the filter is stored (by mpq, or mpq_packed_pack) as lanes
 *     h_l = (W[2l+1] + ow) + (W[2l] + oh) * 2^12   (ow = 2^(wbits-1); oh = 0 for 4-bit, 2 for 2-bit)
 * bit-interleaved so that one word gives two (4-bit) or four (2-bit) SMLAD operands with an AND
 * of a rotated copy. Bits 12..23 of sum(a_l * h_l) are extracted (sign-extended) before the
 * low field can carry into them; with
 *     bias'[o] = bias[o] - input_zp*sum_k W[o,k] - oa*sum_{k even} W[o,k]   (mpq_packed_pack)
 *     corr     = oh*sum_{k even}(X[k] + oa) + ow*sum_{k odd} X[k]           (per column)
 * the accumulator is acc = bias'[o] + fields - corr, exactly mpq_conv2d's / mpq_fully_connected's
 * (mod 2^32), then requantised and clamped the same way. Out-of-view taps are input_zp. Output
 * of any bits. On a core without the DSP extension the same arithmetic runs in plain C (same
 * bits, no speed-up: mpq selects these kernels only for cores with DSP). */
typedef struct {
    const uint32_t *data;  /* n rows of ceil(k/16) blocks; a block is wbits/2 words */
    const int32_t *bias;   /* bias' above, n entries */
    int32_t bits;          /* weight bits: 4 or 2 */
    int32_t n, h, w, c;    /* OHWI dims as mpq_filter's (fully connected: h*w*c = K) */
    int32_t k;             /* h*w*c */
} mpq_packed_filter;

/* Words of packed filter data for n rows of k weights of `wbits` bits: n*ceil(k/16)*wbits/2. */
int32_t mpq_packed_words(int32_t wbits, int32_t n, int32_t k);

/* Packs a LINEAR 4- or 2-bit mpq_filter for activations of act_bits (4 or 2) with zero point
 * input_zp: mpq_packed_words() words into `data`, f->n corrected biases into `cbias`. mpq does
 * this at export time (mpq/codegen/packed.py computes the same bytes); kept in C for tests. */
int mpq_packed_pack(const mpq_filter *f, const int32_t *bias, int32_t act_bits, int32_t input_zp,
                    uint32_t *data, int32_t *cbias);

/* Bytes of 4-byte aligned scratch of mpq_packed_conv2d: 32*ceil(K/16), K = KH*KW*Cin (the
   columns of two output pixels). */
int32_t mpq_packed_conv2d_scratch_size(const mpq_conv_params *p, const mpq_packed_filter *f,
                                       const mpq_view *in, const mpq_view *out);

/* mpq_conv2d (groups = 1, 4- or 2-bit input, packed filter) with the packed dot product.
 * q supplies multiplier and shift (its bias is unused: f->bias holds the corrected one). */
int mpq_packed_conv2d(const mpq_conv_params *p, const mpq_packed_filter *f,
                      const mpq_channel_quant *q, const mpq_view *in, const mpq_view *out,
                      int32_t *scratch);

/* mpq_conv2d_add (the convolution fused with the residual add that consumes it; the same
 * arithmetic and views) with the packed convolution. `out` may be the very same view as
 * `skip`; other views sharing its `data` are refused (MPQ_ERR_ARG). Scratch as
 * mpq_packed_conv2d. */
int mpq_packed_conv2d_add(const mpq_conv_params *p, const mpq_packed_filter *f,
                          const mpq_channel_quant *q, const mpq_view *in,
                          const mpq_add_params *add, const mpq_view *skip, const mpq_view *out,
                          int32_t *scratch);

/* Bytes of 4-byte aligned scratch of mpq_packed_fully_connected: 16*ceil(K/16). */
int32_t mpq_packed_fully_connected_scratch_size(const mpq_packed_filter *f);

/* mpq_fully_connected (4- or 2-bit input, packed filter) with the packed dot product. */
int mpq_packed_fully_connected(const mpq_fc_params *p, const mpq_packed_filter *f,
                               const mpq_channel_quant *q, const mpq_view *in,
                               const mpq_view *out, int32_t *scratch);

#ifdef __cplusplus
}
#endif

#endif /* MPQ_KERNELS_H */
