/* One whole decode step of a Llama-layout model (and Gemma 3's: see LwBlock) in one call: every block's
 * norms, projections, rotary embedding, attention over the KV cache and MLP, then the final norm and
 * the head, inside ONE OpenMP
 * parallel region (threads split each matrix's rows, and meet at a barrier between dependent stages).
 *
 * Why: at batch 1 a SmolLM2-size step is ~700 small torch ops; their dispatch and the fork/join of
 * each op's parallel region cost more than the weights' reads. Here a step costs the reads, the
 * integer dot products and 5 barriers a block (after q/k/v, attention, o, gate/up and down).
 *
 * Weights stay in the layouts `native.c` documents (kind 0: fp32 [N, K]; 1: int8 codes [N, K] with an
 * fp16 scale per row; 2: int4 nibbles [N, K/2] with fp16 scale (and offset) per group; 3: int8 codes
 * [N, K] with an fp16 scale per group of a multiple of 32, GGUF's Q8_0 at 32). Activations
 * feeding an integer weight are rounded to int8 per block of 32, as `native.c` does.
 */
#include <immintrin.h>
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "native_simd.h"

typedef struct {
    int kind, N, K, group;
    const void *weight;      /* float [N, K] | int8 [N, K] | uint8 [N, K/2] */
    const uint16_t *scale;   /* fp16: [N] (int8) or [N, K/group] (int4) */
    const uint16_t *offset;  /* fp16 [N, K/group] or NULL (symmetric int4: code - 8) */
    const float *bias;       /* [N] or NULL */
} LwLinear;

/* Gemma 3's block is a Llama block with four more norms and its own rotary table and window: q_norm and
 * k_norm over each head before the rotation, attn_out_norm / mlp_out_norm over the attention's and the
 * MLP's outputs before they join the residual stream (post_norm is then its pre-feedforward norm), and
 * on its sliding-window layers a cache of `cache_len` positions used as a ring (position p in slot
 * p % cache_len: the window's positions, in whatever order; softmax does not care). Gemma's norms
 * scale by (1 + w): the description passes that sum as the weight. NULL / max_len: Llama's block. */
typedef struct {
    LwLinear q, k, v, o, gate, up, down;
    const float *input_norm, *post_norm;
    float *keys, *values; /* [kv_heads, cache_len, head_dim] */
    int heads, kv_heads;
    const float *q_norm, *k_norm;              /* [head_dim] or NULL */
    const float *attn_out_norm, *mlp_out_norm; /* [hidden] or NULL */
    const float *cos, *sin;                    /* this block's [max_len, head_dim], or NULL: the model's */
    int cache_len;                             /* max_len (or 0), or a sliding window's length */
} LwBlock;

typedef struct {
    int blocks, hidden, head_dim, max_len, threads;
    float eps, attention_scale;
    const float *cos, *sin; /* [max_len, head_dim] */
    const float *final_norm;
    LwLinear head;
    LwBlock *block;
    int max_rows;       /* the widest N of any block's linear (scratch sizes) */
    int max_features;   /* the widest K of any linear */
    int activation;     /* the MLP's: 0 SiLU, 1 GELU (tanh approximation, Gemma's gelu_pytorch_tanh) */
} LwModel;

/* --------------------------------------------------------------------------------------------- */

static inline __m256 dot_u8s8(__m256i u, __m256i s) {
    return _mm256_cvtepi32_ps(lw_dot_u8s8(u, s)); /* native_simd.h: maddubs + madd, or one vpdpbusd */
}

/* The activation x [K] as int8 blocks of 32: codes, scale per block, scale * sum(codes) per block. */
typedef struct {
    int8_t *q;       /* codes in order */
    int8_t *paired;  /* the codes in int4's nibble order (see `quantize`) */
    float *scale, *sum;
    /* For the 512-bit int8 rows (LW_AVX512), 8 lanes a block: the block's scale in each (`spread`), and
     * -128 x the block's code sum in its first lane, 0 in the others (`shift`, zeroed by the caller). */
    float *spread;
    int32_t *shift;
} Quantized;

static void quantize(const float *x, int K, Quantized *out) {
    /* per 128-bit lane: its 8 even-index bytes, then its 8 odd ones */
    const __m256i split = _mm256_setr_epi8(0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15,
                                           0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15);
    const __m256 sign = _mm256_set1_ps(-0.f);
    for (int b = 0; b < K / 32; b++) {
        const float *v = x + b * 32;
        __m256 f0 = _mm256_loadu_ps(v), f1 = _mm256_loadu_ps(v + 8), f2 = _mm256_loadu_ps(v + 16),
               f3 = _mm256_loadu_ps(v + 24);
        __m256 m = _mm256_max_ps(_mm256_max_ps(_mm256_andnot_ps(sign, f0), _mm256_andnot_ps(sign, f1)),
                                 _mm256_max_ps(_mm256_andnot_ps(sign, f2), _mm256_andnot_ps(sign, f3)));
        __m128 h = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
        h = _mm_max_ps(h, _mm_movehl_ps(h, h));
        float amax = _mm_cvtss_f32(_mm_max_ss(h, _mm_movehdup_ps(h)));
        float scale = amax / 127.f, inv = scale > 0.f ? 1.f / scale : 0.f;
        __m256 by = _mm256_set1_ps(inv);
        /* rounded to nearest even, as lrintf: |code| <= 127 */
        __m256i c0 = _mm256_cvtps_epi32(_mm256_mul_ps(f0, by)), c1 = _mm256_cvtps_epi32(_mm256_mul_ps(f1, by)),
                c2 = _mm256_cvtps_epi32(_mm256_mul_ps(f2, by)), c3 = _mm256_cvtps_epi32(_mm256_mul_ps(f3, by));
        __m256i total = _mm256_add_epi32(_mm256_add_epi32(c0, c1), _mm256_add_epi32(c2, c3));
        __m128i t = _mm_add_epi32(_mm256_castsi256_si128(total), _mm256_extracti128_si256(total, 1));
        t = _mm_add_epi32(t, _mm_shuffle_epi32(t, 0x4E));
        int sum = _mm_cvtsi128_si32(_mm_add_epi32(t, _mm_shuffle_epi32(t, 0xB1)));
        /* packs work within 128-bit lanes: codes 0-3 8-11 4-7 12-15 ..., put back in order */
        __m256i packed = _mm256_packs_epi16(_mm256_packs_epi32(c0, c1), _mm256_packs_epi32(c2, c3));
        __m256i codes = _mm256_permutevar8x32_epi32(packed, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
        _mm256_storeu_si256((__m256i *)(out->q + b * 32), codes);
        /* evens of both lanes, then odds: the 16 even-k codes, then the 16 odd-k ones */
        __m256i parts = _mm256_permute4x64_epi64(_mm256_shuffle_epi8(codes, split), 0xD8);
        /* a pair of blocks (2p, 2p+1) at 64p: 2p's even-k codes, 2p+1's even, 2p's odd, 2p+1's odd;
         * a last block without a partner at 32b: its even-k codes, then its odd ones */
        int8_t *pair = out->paired + (b & ~1) * 32;
        int partnered = (b | 1) < K / 32, half = partnered ? 32 : 16, at = partnered ? (b & 1) * 16 : 0;
        _mm_storeu_si128((__m128i *)(pair + at), _mm256_castsi256_si128(parts));
        _mm_storeu_si128((__m128i *)(pair + at + half), _mm256_extracti128_si256(parts, 1));
        out->scale[b] = scale;
        out->sum[b] = scale * (float)sum;
#if LW_AVX512
        _mm256_storeu_ps(out->spread + 8 * b, _mm256_set1_ps(scale));
        out->shift[8 * b] = -128 * sum;
#endif
    }
}

/* --- rows of one linear: y[n] (+)= w[n] . x for n in [n0, n1), four rows at a time --------------- */

/* Bytes ahead of the rows being read that are requested early: the hardware prefetcher alone left a
 * batch-1 int8 matmul at ~40% of the streaming rate (it computes between loads; misses stall it). */
#define AHEAD 4096

static float f32_dot(const float *w, const float *x, int K) {
    __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
    int k = 0;
    for (; k + 16 <= K; k += 16) {
        a0 = _mm256_fmadd_ps(_mm256_loadu_ps(w + k), _mm256_loadu_ps(x + k), a0);
        a1 = _mm256_fmadd_ps(_mm256_loadu_ps(w + k + 8), _mm256_loadu_ps(x + k + 8), a1);
    }
    float s = lw_hsum(_mm256_add_ps(a0, a1));
    for (; k < K; k++) s += w[k] * x[k];
    return s;
}

static void f32_rows(const LwLinear *L, const float *x, int n0, int n1, float *y) {
    const float *w = (const float *)L->weight;
    int K = L->K, n = n0;
    for (; n + 4 <= n1 && K % 8 == 0; n += 4) {
        const float *w0 = w + (size_t)n * K, *w1 = w0 + K, *w2 = w1 + K, *w3 = w2 + K;
        __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps(), a2 = _mm256_setzero_ps(),
               a3 = _mm256_setzero_ps();
        for (int k = 0; k < K; k += 8) {
            /* the four rows are 16K contiguous bytes: two lines a step cover them, 4 AHEAD on */
            _mm_prefetch((const char *)w0 + 16 * k + 4 * AHEAD, _MM_HINT_T0);
            _mm_prefetch((const char *)w0 + 16 * k + 4 * AHEAD + 64, _MM_HINT_T0);
            __m256 v = _mm256_loadu_ps(x + k);
            a0 = _mm256_fmadd_ps(_mm256_loadu_ps(w0 + k), v, a0);
            a1 = _mm256_fmadd_ps(_mm256_loadu_ps(w1 + k), v, a1);
            a2 = _mm256_fmadd_ps(_mm256_loadu_ps(w2 + k), v, a2);
            a3 = _mm256_fmadd_ps(_mm256_loadu_ps(w3 + k), v, a3);
        }
        y[n] = lw_hsum(a0), y[n + 1] = lw_hsum(a1), y[n + 2] = lw_hsum(a2), y[n + 3] = lw_hsum(a3);
    }
    for (; n < n1; n++) y[n] = f32_dot(w + (size_t)n * K, x, K);
}


#if LW_AVX512
/* int8 per row, 512 bits at a time: two blocks of a row a step. vpdpbusd multiplies unsigned by signed
 * bytes: the weights' codes go in as w + 128 (their top bit flipped), and the activations' extra
 * 128 x (code sum) per block is taken off by starting the block's first lane at -128 x its code sum
 * (`Quantized.shift`): each block's integer dot product comes out exact, as the AVX2 kernel's, then
 * weighs by its activation scale (`Quantized.spread`: 8 lanes a block). */
static inline __m512 pair_q8(const int8_t *w, __m512i v, __m512i shift, __m512 s, __m512 acc) {
    __m512i u = _mm512_xor_si512(_mm512_loadu_si512((const void *)w), _mm512_set1_epi8((char)0x80));
    return _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_dpbusd_epi32(shift, u, v)), s, acc);
}

/* A block without a partner (an odd count's last), 256 bits: its products, not yet summed. */
static inline __m256 block_q8(const int8_t *w, const Quantized *x, int b) {
    __m256i u = _mm256_xor_si256(_mm256_loadu_si256((const __m256i *)w), _mm256_set1_epi8((char)0x80));
    __m256i d = _mm256_dpbusd_epi32(_mm256_loadu_si256((const __m256i *)(x->shift + 8 * b)), u,
                                    _mm256_loadu_si256((const __m256i *)(x->q + 32 * b)));
    return _mm256_mul_ps(_mm256_cvtepi32_ps(d), _mm256_loadu_ps(x->spread + 8 * b));
}

/* The weight scales of blocks 2p, 2p+1 of a grouped row, 8 lanes each (vpermw spreads the two halves). */
static inline __m512 pair_scales(const uint16_t *s, int p, int per) {
    uint32_t both = (uint32_t)s[(2 * p) / per] | (uint32_t)s[(2 * p + 1) / per] << 16;
    const __m256i spread = _mm256_setr_epi16(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1);
    return _mm512_cvtph_ps(_mm256_permutexvar_epi16(spread, _mm256_castsi128_si256(_mm_cvtsi32_si128((int)both))));
}

/* `R` (4 or 1) rows from row n: four rows are 4K contiguous bytes, four cache lines a step cover them.
 * `grouped`: a scale per group of the row's inputs (Q8_0's layout) on each block pair; else one scale
 * a row, applied to its total. Inlined with constant R and grouped: one loop, four kernels. */
static inline __attribute__((always_inline)) void q8_row_set(const LwLinear *L, const Quantized *x, int n, float *y, const int R, const int grouped) {
    int K = L->K, blocks = K / 32, pairs = blocks / 2;
    int groups = grouped ? K / L->group : 1, per = grouped ? L->group / 32 : 1;
    const int8_t *row[4];
    const uint16_t *scale[4];
    __m512 a[4];
    for (int i = 0; i < R; i++) {
        row[i] = (const int8_t *)L->weight + (size_t)(n + i) * K;
        scale[i] = L->scale + (size_t)(n + i) * groups;
        a[i] = _mm512_setzero_ps();
    }
    for (int p = 0; p < pairs; p++) {
        if (R == 4) {
            const char *ahead = (const char *)row[0] + AHEAD + p * 256;
            _mm_prefetch(ahead, _MM_HINT_T0);
            _mm_prefetch(ahead + 64, _MM_HINT_T0);
            _mm_prefetch(ahead + 128, _MM_HINT_T0);
            _mm_prefetch(ahead + 192, _MM_HINT_T0);
        }
        __m512i v = _mm512_loadu_si512((const void *)(x->q + 64 * p));
        __m512i shift = _mm512_loadu_si512((const void *)(x->shift + 16 * p));
        __m512 s = _mm512_loadu_ps(x->spread + 16 * p);
        for (int i = 0; i < R; i++)
            a[i] = pair_q8(row[i] + 64 * p, v, shift, grouped ? _mm512_mul_ps(s, pair_scales(scale[i], p, per)) : s, a[i]);
    }
    for (int i = 0; i < R; i++) {
        float total = _mm512_reduce_add_ps(a[i]);
        if (blocks & 1) { /* the last block, without a partner */
            float last = lw_hsum(block_q8(row[i] + 32 * (blocks - 1), x, blocks - 1));
            total += grouped ? lw_half(scale[i][(blocks - 1) / per]) * last : last;
        }
        y[n + i] = grouped ? total : lw_half(scale[i][0]) * total;
    }
}

static void q8_rows(const LwLinear *L, const Quantized *x, int n0, int n1, float *y) {
    int n = n0;
    for (; n + 4 <= n1; n += 4) q8_row_set(L, x, n, y, 4, 0);
    for (; n < n1; n++) q8_row_set(L, x, n, y, 1, 0);
}
#else
static void q8_rows(const LwLinear *L, const Quantized *x, int n0, int n1, float *y) {
    const int8_t *w = (const int8_t *)L->weight;
    int K = L->K, blocks = K / 32, n = n0;
    for (; n + 4 <= n1; n += 4) {
        const int8_t *w0 = w + (size_t)n * K, *w1 = w0 + K, *w2 = w1 + K, *w3 = w2 + K;
        __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps(), a2 = _mm256_setzero_ps(),
               a3 = _mm256_setzero_ps();
        /* the four rows are 4K contiguous bytes: two cache lines a block step cover them */
        for (int b = 0; b < blocks; b++) {
            _mm_prefetch((const char *)w0 + AHEAD + b * 128, _MM_HINT_T0);
            _mm_prefetch((const char *)w0 + AHEAD + b * 128 + 64, _MM_HINT_T0);
            __m256i v = _mm256_loadu_si256((const __m256i *)(x->q + b * 32));
            __m256 s = _mm256_set1_ps(x->scale[b]);
            __m256i c0 = _mm256_loadu_si256((const __m256i *)(w0 + b * 32));
            __m256i c1 = _mm256_loadu_si256((const __m256i *)(w1 + b * 32));
            __m256i c2 = _mm256_loadu_si256((const __m256i *)(w2 + b * 32));
            __m256i c3 = _mm256_loadu_si256((const __m256i *)(w3 + b * 32));
            /* maddubs needs one unsigned side: |w| against x carrying w's sign */
            a0 = _mm256_fmadd_ps(dot_u8s8(_mm256_sign_epi8(c0, c0), _mm256_sign_epi8(v, c0)), s, a0);
            a1 = _mm256_fmadd_ps(dot_u8s8(_mm256_sign_epi8(c1, c1), _mm256_sign_epi8(v, c1)), s, a1);
            a2 = _mm256_fmadd_ps(dot_u8s8(_mm256_sign_epi8(c2, c2), _mm256_sign_epi8(v, c2)), s, a2);
            a3 = _mm256_fmadd_ps(dot_u8s8(_mm256_sign_epi8(c3, c3), _mm256_sign_epi8(v, c3)), s, a3);
        }
        y[n] = lw_half(L->scale[n]) * lw_hsum(a0);
        y[n + 1] = lw_half(L->scale[n + 1]) * lw_hsum(a1);
        y[n + 2] = lw_half(L->scale[n + 2]) * lw_hsum(a2);
        y[n + 3] = lw_half(L->scale[n + 3]) * lw_hsum(a3);
    }
    for (; n < n1; n++) {
        const int8_t *row = w + (size_t)n * K;
        __m256 a = _mm256_setzero_ps();
        for (int b = 0; b < blocks; b++) {
            __m256i c = _mm256_loadu_si256((const __m256i *)(row + b * 32));
            __m256i v = _mm256_loadu_si256((const __m256i *)(x->q + b * 32));
            a = _mm256_fmadd_ps(dot_u8s8(_mm256_sign_epi8(c, c), _mm256_sign_epi8(v, c)),
                                _mm256_set1_ps(x->scale[b]), a);
        }
        y[n] = lw_half(L->scale[n]) * lw_hsum(a);
    }
}

#endif

/* int4: w = code * scale + offset per group (symmetric: offset = -8 * scale). A block's 16 bytes
 * hold k = 2i in the low nibble and 2i+1 in the high one. Two blocks are read at once: 32 bytes, whose
 * low nibbles are both blocks' even-k codes and whose high nibbles are their odd-k codes, against the
 * activations laid out in that order (`paired`); lanes 0-3 of the products then sum block b and lanes
 * 4-7 block b+1, so one conversion and one multiply-add serve two blocks. The offset term,
 * offset * (x scale * sum of the block's codes), is summed per group apart from the integer products. */
static inline __m256 pair_dot(const uint8_t *bytes, const int8_t *x) {
    __m256i v = _mm256_loadu_si256((const __m256i *)bytes), low4 = _mm256_set1_epi8(0x0F);
    /* u4 * s8 pairs are at most 2 * 15 * 127 in size: two of them summed stay within int16 */
    return _mm256_cvtepi32_ps(lw_dot2_u4s8(_mm256_and_si256(v, low4), _mm256_loadu_si256((const __m256i *)x),
                                           _mm256_and_si256(_mm256_srli_epi16(v, 4), low4),
                                           _mm256_loadu_si256((const __m256i *)(x + 32))));
}

/* One block alone (the last of an odd count): its 16 bytes, low nibbles then high ones. */
static inline __m256 block_dot(const uint8_t *bytes, const int8_t *x) {
    __m128i packed = _mm_loadu_si128((const __m128i *)bytes);
    __m256i both = _mm256_inserti128_si256(_mm256_castsi128_si256(packed), _mm_srli_epi16(packed, 4), 1);
    return dot_u8s8(_mm256_and_si256(both, _mm256_set1_epi8(0x0F)), _mm256_loadu_si256((const __m256i *)x));
}

static void q4_rows(const LwLinear *L, const Quantized *x, int n0, int n1, float *y) {
    int K = L->K, blocks = K / 32, groups = K / L->group, per = L->group / 32;
    float group_sum[K / 32 + 8];  /* per group: sum over its blocks of x scale * code sum */
    for (int g = 0; g < groups; g++) {
        float total = 0.f;
        for (int j = 0; j < per; j++) total += x->sum[g * per + j];
        group_sum[g] = total;
    }
    for (int g = groups; g < groups + 8; g++) group_sum[g] = 0.f;
    /* the combined scales of blocks j, j+1 spread over lanes 0-3 and 4-7 */
    const __m256i lanes01 = _mm256_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1), lanes23 = _mm256_setr_epi32(2, 2, 2, 2, 3, 3, 3, 3),
                  lanes45 = _mm256_setr_epi32(4, 4, 4, 4, 5, 5, 5, 5), lanes67 = _mm256_setr_epi32(6, 6, 6, 6, 7, 7, 7, 7);
    const __m256i pick[4] = {lanes01, lanes23, lanes45, lanes67};
    for (int n = n0; n < n1; n++) {
        const uint8_t *row = (const uint8_t *)L->weight + (size_t)n * (K / 2);
        const uint16_t *scale = L->scale + (size_t)n * groups;
        const uint16_t *offset = L->offset ? L->offset + (size_t)n * groups : NULL;
        /* the scales (and offsets) stream at 1/8 of the codes' pace: so does their prefetch distance */
        for (int at = 0; at < 2 * groups; at += 64) {
            _mm_prefetch((const char *)scale + AHEAD / 8 + at, _MM_HINT_T0);
            if (offset) _mm_prefetch((const char *)offset + AHEAD / 8 + at, _MM_HINT_T0);
        }
        /* Eight blocks a step. Past the row's end the vectors read the next rows' scales, times a zero
         * group sum or into lanes never used, as long as they stay in the tensor. */
        size_t left = (size_t)(L->N - n) * groups; /* scales from this row's first to the tensor's end */
        __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
        float tail = 0.f;
        if (per > 1) { /* the offset term, a group (8 of them a vector) at a time */
            int g = 0;
            for (; g < groups && (size_t)g + 8 <= left; g += 8) {
                __m256 o = offset ? _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(offset + g)))
                                  : _mm256_mul_ps(_mm256_set1_ps(-8.f),
                                                  _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(scale + g))));
                a0 = _mm256_fmadd_ps(o, _mm256_loadu_ps(group_sum + g), a0);
            }
            for (; g < groups; g++) tail += (offset ? lw_half(offset[g]) : -8.f * lw_half(scale[g])) * group_sum[g];
        }
        for (int b0 = 0; b0 < blocks; b0 += 8) {
            int count = blocks - b0 < 8 ? blocks - b0 : 8;
            _mm_prefetch((const char *)row + b0 * 16 + AHEAD, _MM_HINT_T0);
            _mm_prefetch((const char *)row + b0 * 16 + AHEAD + 64, _MM_HINT_T0);
            __m256 c;  /* weight scale * x scale of blocks b0 .. b0+7 */
            if (per == 1 && (size_t)b0 + 8 <= left) { /* groups of 32: the offset term here too */
                __m256 ws = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(scale + b0)));
                __m256 o = offset ? _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(offset + b0)))
                                  : _mm256_mul_ps(_mm256_set1_ps(-8.f), ws);
                a1 = _mm256_fmadd_ps(o, _mm256_loadu_ps(group_sum + b0), a1);
                c = _mm256_mul_ps(ws, _mm256_loadu_ps(x->scale + b0));
            } else if (per == 2 && (size_t)b0 / 2 + 4 <= left) { /* groups of 64: each scale twice */
                __m128 s4 = _mm_cvtph_ps(_mm_loadl_epi64((const __m128i *)(scale + b0 / 2)));
                c = _mm256_mul_ps(_mm256_set_m128(_mm_unpackhi_ps(s4, s4), _mm_unpacklo_ps(s4, s4)),
                                  _mm256_loadu_ps(x->scale + b0));
            } else if (per == 4 && (size_t)b0 / 4 + 2 <= left) { /* groups of 128: each scale 4 times */
                c = _mm256_mul_ps(_mm256_set_m128(_mm_set1_ps(lw_half(scale[b0 / 4 + 1])),
                                                  _mm_set1_ps(lw_half(scale[b0 / 4]))),
                                  _mm256_loadu_ps(x->scale + b0));
            } else { /* the tensor's last row: nothing read past it */
                float combined[8] = {0.f};
                for (int j = 0; j < count; j++) {
                    combined[j] = lw_half(scale[(b0 + j) / per]) * x->scale[b0 + j];
                    if (per == 1)
                        tail += (offset ? lw_half(offset[b0 + j]) : -8.f * lw_half(scale[b0 + j])) * group_sum[b0 + j];
                }
                c = _mm256_loadu_ps(combined);
            }
            const uint8_t *w = row + b0 * 16;
            const int8_t *v = x->paired + b0 * 32;
            if (count == 8) {
                __m256 d0 = pair_dot(w, v), d1 = pair_dot(w + 32, v + 64);
                __m256 d2 = pair_dot(w + 64, v + 128), d3 = pair_dot(w + 96, v + 192);
                a0 = _mm256_fmadd_ps(d0, _mm256_permutevar8x32_ps(c, lanes01), a0);
                a1 = _mm256_fmadd_ps(d1, _mm256_permutevar8x32_ps(c, lanes23), a1);
                a0 = _mm256_fmadd_ps(d2, _mm256_permutevar8x32_ps(c, lanes45), a0);
                a1 = _mm256_fmadd_ps(d3, _mm256_permutevar8x32_ps(c, lanes67), a1);
                continue;
            }
            int j = 0;
            for (; j + 2 <= count; j += 2)
                a0 = _mm256_fmadd_ps(pair_dot(w + j * 16, v + j * 32), _mm256_permutevar8x32_ps(c, pick[j / 2]), a0);
            if (j < count) { /* a last block without a partner */
                float combined[8];
                _mm256_storeu_ps(combined, c);
                a1 = _mm256_fmadd_ps(block_dot(w + j * 16, v + j * 32), _mm256_set1_ps(combined[j]), a1);
            }
        }
        y[n] = lw_hsum(_mm256_add_ps(a0, a1)) + tail;
    }
}

/* int8 in groups of a multiple of 32 (group 32: GGUF's Q8_0): codes [N, K], fp16 scale [N, K/group].
 * q8_rows' inner loop, each block weighed by its group's scale times the activation block's. */
#if LW_AVX512
static void q8g_rows(const LwLinear *L, const Quantized *x, int n0, int n1, float *y) {
    int n = n0;
    for (; n + 4 <= n1; n += 4) q8_row_set(L, x, n, y, 4, 1);
    for (; n < n1; n++) q8_row_set(L, x, n, y, 1, 1);
}
#else
static void q8g_rows(const LwLinear *L, const Quantized *x, int n0, int n1, float *y) {
    const int8_t *w = (const int8_t *)L->weight;
    int K = L->K, blocks = K / 32, groups = K / L->group, per = L->group / 32, n = n0;
    for (; n + 4 <= n1; n += 4) {
        const int8_t *w0 = w + (size_t)n * K, *w1 = w0 + K, *w2 = w1 + K, *w3 = w2 + K;
        const uint16_t *s0 = L->scale + (size_t)n * groups, *s1 = s0 + groups, *s2 = s1 + groups,
                       *s3 = s2 + groups;
        __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps(), a2 = _mm256_setzero_ps(),
               a3 = _mm256_setzero_ps();
        for (int b = 0; b < blocks; b++) {
            _mm_prefetch((const char *)w0 + AHEAD + b * 128, _MM_HINT_T0);
            _mm_prefetch((const char *)w0 + AHEAD + b * 128 + 64, _MM_HINT_T0);
            __m256i v = _mm256_loadu_si256((const __m256i *)(x->q + b * 32));
            float xs = x->scale[b];
            int g = b / per;
            __m256i c0 = _mm256_loadu_si256((const __m256i *)(w0 + b * 32));
            __m256i c1 = _mm256_loadu_si256((const __m256i *)(w1 + b * 32));
            __m256i c2 = _mm256_loadu_si256((const __m256i *)(w2 + b * 32));
            __m256i c3 = _mm256_loadu_si256((const __m256i *)(w3 + b * 32));
            a0 = _mm256_fmadd_ps(dot_u8s8(_mm256_sign_epi8(c0, c0), _mm256_sign_epi8(v, c0)),
                                 _mm256_set1_ps(xs * lw_half(s0[g])), a0);
            a1 = _mm256_fmadd_ps(dot_u8s8(_mm256_sign_epi8(c1, c1), _mm256_sign_epi8(v, c1)),
                                 _mm256_set1_ps(xs * lw_half(s1[g])), a1);
            a2 = _mm256_fmadd_ps(dot_u8s8(_mm256_sign_epi8(c2, c2), _mm256_sign_epi8(v, c2)),
                                 _mm256_set1_ps(xs * lw_half(s2[g])), a2);
            a3 = _mm256_fmadd_ps(dot_u8s8(_mm256_sign_epi8(c3, c3), _mm256_sign_epi8(v, c3)),
                                 _mm256_set1_ps(xs * lw_half(s3[g])), a3);
        }
        y[n] = lw_hsum(a0), y[n + 1] = lw_hsum(a1), y[n + 2] = lw_hsum(a2), y[n + 3] = lw_hsum(a3);
    }
    for (; n < n1; n++) {
        const int8_t *row = w + (size_t)n * K;
        const uint16_t *s = L->scale + (size_t)n * groups;
        __m256 a = _mm256_setzero_ps();
        for (int b = 0; b < blocks; b++) {
            __m256i c = _mm256_loadu_si256((const __m256i *)(row + b * 32));
            __m256i v = _mm256_loadu_si256((const __m256i *)(x->q + b * 32));
            a = _mm256_fmadd_ps(dot_u8s8(_mm256_sign_epi8(c, c), _mm256_sign_epi8(v, c)),
                                _mm256_set1_ps(x->scale[b] * lw_half(s[b / per])), a);
        }
        y[n] = lw_hsum(a);
    }
}

#endif

/* y[n0:n1] = rows of L applied to x (fp32 weights read xf, integer weights read xq), + bias. */
static void rows(const LwLinear *L, const float *xf, const Quantized *xq, int n0, int n1, float *y) {
    if (n0 >= n1) return;
    if (L->kind == 0) f32_rows(L, xf, n0, n1, y);
    else if (L->kind == 1) q8_rows(L, xq, n0, n1, y);
    else if (L->kind == 3) q8g_rows(L, xq, n0, n1, y);
    else q4_rows(L, xq, n0, n1, y);
    if (L->bias)
        for (int n = n0; n < n1; n++) y[n] += L->bias[n];
}

/* This thread's share [*n0, *n1) of `total` rows, in multiples of 4. */
static void share(int total, int *n0, int *n1) {
    int threads = omp_get_num_threads(), me = omp_get_thread_num();
    int quads = (total + 3) / 4;
    int per = quads / threads, extra = quads % threads;
    int start = me * per + (me < extra ? me : extra);
    int count = per + (me < extra ? 1 : 0);
    *n0 = start * 4 < total ? start * 4 : total;
    *n1 = (start + count) * 4 < total ? (start + count) * 4 : total;
}

static void rms_norm(const float *x, const float *weight, int n, float eps, float *out) {
    double squares = 0.0;
    for (int i = 0; i < n; i++) squares += (double)x[i] * x[i];
    float inv = 1.f / sqrtf((float)(squares / n) + eps);
    for (int i = 0; i < n; i++) out[i] = weight[i] * (x[i] * inv);
}

/* HF Llama rotary embedding: x * cos + rotate_half(x) * sin, rotate_half(x) = (-x2, x1). */
static void rotate(float *x, const float *cos, const float *sin, int dim) {
    int h = dim / 2;
    for (int i = 0; i < h; i++) {
        float a = x[i], b = x[i + h];
        x[i] = a * cos[i] - b * sin[i];
        x[i + h] = b * cos[i + h] + a * sin[i + h];
    }
}

static float silu(float v) { return v / (1.f + expf(-v)); }

static float gelu_tanh(float v) { return 0.5f * v * (1.f + tanhf(0.7978845608028654f * (v + 0.044715f * v * v * v))); }

/* hidden[n0:n1] += norm(out) (the whole `out` [n] is read for its scale, this thread's rows added). */
static void add_normed(float *hidden, const float *out, const float *weight, int n, float eps, int n0, int n1) {
    double squares = 0.0;
    for (int i = 0; i < n; i++) squares += (double)out[i] * out[i];
    float inv = 1.f / sqrtf((float)(squares / n) + eps);
    for (int i = n0; i < n1; i++) hidden[i] += weight[i] * (out[i] * inv);
}

/* e^x for 8 floats: Cephes' expf (range reduction by ln 2, degree-6 polynomial, 2^n by exponent
 * bits), relative error ~1e-7 over the range softmax uses (x <= 0). */
static inline __m256 exp8(__m256 x) {
    x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.3f)), _mm256_set1_ps(88.3f));
    __m256 n = _mm256_floor_ps(_mm256_fmadd_ps(x, _mm256_set1_ps(1.44269504088896341f), _mm256_set1_ps(0.5f)));
    x = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
    x = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), x);
    __m256 y = _mm256_set1_ps(1.9875691500e-4f);
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.3981999507e-3f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(8.3334519073e-3f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(4.1665795894e-2f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.6666665459e-1f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(5.0000001201e-1f));
    y = _mm256_add_ps(_mm256_fmadd_ps(y, _mm256_mul_ps(x, x), x), _mm256_set1_ps(1.f));
    __m256i bits = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(y, _mm256_castsi256_ps(bits));
}

/* One query head over its kv head's positions: softmax(q.k * scale) . v, into out[D]. Cache slots
 * 0 .. last-1 except `skip` (-1: none; the slot this step's entry is going into, in a full ring), then
 * this step's key_now / value_now as entry `last` (not yet in the cache as far as this thread knows). */
static void attend(const float *q, const float *keys, const float *values, const float *key_now,
                   const float *value_now, int last, int skip, int D, float scale, float *score, float *out) {
    float top = -INFINITY;
    for (int t = 0; t <= last; t++) {
        score[t] = t == skip ? -INFINITY : f32_dot(q, t < last ? keys + (size_t)t * D : key_now, D) * scale;
        top = score[t] > top ? score[t] : top;
    }
    int t = 0;
    __m256 sum8 = _mm256_setzero_ps(), top8 = _mm256_set1_ps(top);
    for (; t + 8 <= last + 1; t += 8) {
        __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(score + t), top8));
        _mm256_storeu_ps(score + t, e);
        sum8 = _mm256_add_ps(sum8, e);
    }
    float total = lw_hsum(sum8);
    for (; t <= last; t++) total += (score[t] = expf(score[t] - top));
    if (skip >= 0) total -= score[skip], score[skip] = 0.f; /* exp8 clamps: -inf gave e^-87, not 0 */
    float inv = 1.f / total;
    if (D % 8 == 0 && D <= 256) {
        __m256 acc[32];
        for (int j = 0; j < D / 8; j++) acc[j] = _mm256_setzero_ps();
        for (t = 0; t <= last; t++) {
            if (t == skip) continue; /* its slot may be being written */
            __m256 p = _mm256_set1_ps(score[t]);
            const float *v = t < last ? values + (size_t)t * D : value_now;
            for (int j = 0; j < D / 8; j++) acc[j] = _mm256_fmadd_ps(p, _mm256_loadu_ps(v + 8 * j), acc[j]);
        }
        for (int j = 0; j < D / 8; j++) _mm256_storeu_ps(out + 8 * j, _mm256_mul_ps(acc[j], _mm256_set1_ps(inv)));
        return;
    }
    for (int i = 0; i < D; i++) out[i] = 0.f;
    for (t = 0; t <= last; t++) {
        if (t == skip) continue;
        float p = score[t] * inv;
        const float *v = t < last ? values + (size_t)t * D : value_now;
        for (int i = 0; i < D; i++) out[i] += p * v[i];
    }
}

/* --------------------------------------------------------------------------------------------- */

/* hidden [H]: the token's embedding in, the final hidden state out; logits [head.N] out.
 * Returns 0, or -1 when scratch memory could not be had.
 *
 * Each thread normalises and quantizes the shared vectors into its own scratch (`normed`, `xq`) right
 * after the barrier that completed them: a microsecond of repeated work instead of a `single` and the
 * barrier after it, four times a block. */
int lwdsl_llama_step(const LwModel *m, float *hidden, int pos, float *logits) {
    int H = m->hidden, D = m->head_dim, F = m->max_features, T = m->threads, Fb = F / 32 + 8;
    float *normed_all = (float *)malloc(sizeof(float) * (size_t)F * T);
    float *wide = (float *)malloc(sizeof(float) * (size_t)m->max_rows * 4);
    float *out = (float *)malloc(sizeof(float) * (size_t)m->max_rows);
    size_t per_thread = (size_t)m->max_len + 8 + D; /* attention scores, then a rotated key */
    float *scores = (float *)malloc(sizeof(float) * per_thread * T);
    int8_t *codes = (int8_t *)malloc((size_t)2 * F * T);
    float *block_figures = (float *)calloc((size_t)18 * Fb * T, sizeof(float)); /* + spread, shift */
    if (!normed_all || !wide || !out || !scores || !codes || !block_figures) {
        free(normed_all), free(wide), free(out), free(scores), free(codes), free(block_figures);
        return -1;
    }
#pragma omp parallel num_threads(T)
    {
        int n0, n1, t = omp_get_thread_num();
        float *normed = normed_all + (size_t)t * F;
        float *figures = block_figures + (size_t)18 * Fb * t;
        Quantized xq = {codes + (size_t)2 * F * t, codes + (size_t)2 * F * t + F, figures, figures + Fb,
                        figures + 2 * Fb, (int32_t *)(figures + 10 * Fb)};
        for (int l = 0; l < m->blocks; l++) {
            const LwBlock *B = &m->block[l];
            int Nq = B->q.N, Nk = B->k.N, Nv = B->v.N, I = B->gate.N;
            float *q = wide, *k = wide + Nq, *v = k + Nk, *attended = v + Nv;
            const float *cos = (B->cos ? B->cos : m->cos) + (size_t)pos * D;
            const float *sin = (B->sin ? B->sin : m->sin) + (size_t)pos * D;
            /* the cache's slot for this position; the entries attention reads (see `attend`) */
            int C = B->cache_len > 0 ? B->cache_len : m->max_len;
            int slot = pos % C, last = pos < C ? pos : C, skip = pos < C ? -1 : slot;
            rms_norm(hidden, B->input_norm, H, m->eps, normed);
            quantize(normed, H, &xq);
            /* q, k, v: one pass over their rows together */
            share(Nq + Nk + Nv, &n0, &n1);
            if (n0 < Nq) rows(&B->q, normed, &xq, n0, n1 < Nq ? n1 : Nq, q);
            if (n1 > Nq && n0 < Nq + Nk) {
                int a = n0 > Nq ? n0 - Nq : 0, b = (n1 < Nq + Nk ? n1 : Nq + Nk) - Nq;
                rows(&B->k, normed, &xq, a, b, k);
            }
            if (n1 > Nq + Nk) {
                int a = n0 > Nq + Nk ? n0 - Nq - Nk : 0;
                rows(&B->v, normed, &xq, a, n1 - Nq - Nk, v);
            }
#pragma omp barrier
            /* This position's (normed,) rotated key and value into the cache, for the steps after this
             * one; no thread reads that slot now (each rotates its own copy of the key), so no barrier. */
#pragma omp for schedule(static) nowait
            for (int g = 0; g < B->kv_heads; g++) {
                float *key = B->keys + ((size_t)g * C + slot) * D;
                memcpy(key, k + g * D, sizeof(float) * D);
                if (B->k_norm) rms_norm(key, B->k_norm, D, m->eps, key);
                rotate(key, cos, sin, D);
                memcpy(B->values + ((size_t)g * C + slot) * D, v + g * D, sizeof(float) * D);
            }
            /* attention, one query head a thread at a time */
#pragma omp for schedule(static)
            for (int h = 0; h < B->heads; h++) {
                int g = h / (B->heads / B->kv_heads);
                float *score = scores + (size_t)t * per_thread, *key = score + m->max_len + 8;
                memcpy(key, k + g * D, sizeof(float) * D);
                if (B->k_norm) rms_norm(key, B->k_norm, D, m->eps, key);
                rotate(key, cos, sin, D);
                if (B->q_norm) rms_norm(q + h * D, B->q_norm, D, m->eps, q + h * D);
                rotate(q + h * D, cos, sin, D);
                attend(q + h * D, B->keys + (size_t)g * C * D, B->values + (size_t)g * C * D,
                       key, v + g * D, last, skip, D, m->attention_scale, score, attended + h * D);
            }
            quantize(attended, B->o.K, &xq);
            /* o_proj into the residual stream (Gemma: normed first, which needs all of its rows) */
            share(B->o.N, &n0, &n1);
            rows(&B->o, attended, &xq, n0, n1, out);
            if (B->attn_out_norm) {
#pragma omp barrier
                add_normed(hidden, out, B->attn_out_norm, H, m->eps, n0, n1);
            } else {
                for (int n = n0; n < n1; n++) hidden[n] += out[n];
            }
#pragma omp barrier
            rms_norm(hidden, B->post_norm, H, m->eps, normed);
            quantize(normed, H, &xq);
            /* gate and up together: act = silu(gate) * up (Gemma: GELU) */
            share(I, &n0, &n1);
            rows(&B->gate, normed, &xq, n0, n1, wide);
            rows(&B->up, normed, &xq, n0, n1, wide + I);
            if (m->activation == 1)
                for (int n = n0; n < n1; n++) wide[2 * I + n] = gelu_tanh(wide[n]) * wide[I + n];
            else
                for (int n = n0; n < n1; n++) wide[2 * I + n] = silu(wide[n]) * wide[I + n];
#pragma omp barrier
            quantize(wide + 2 * I, I, &xq);
            share(H, &n0, &n1);
            rows(&B->down, wide + 2 * I, &xq, n0, n1, out);
            if (B->mlp_out_norm) {
#pragma omp barrier
                add_normed(hidden, out, B->mlp_out_norm, H, m->eps, n0, n1);
            } else {
                for (int n = n0; n < n1; n++) hidden[n] += out[n];
            }
#pragma omp barrier
        }
        rms_norm(hidden, m->final_norm, H, m->eps, normed);
        quantize(normed, H, &xq);
        share(m->head.N, &n0, &n1);
        rows(&m->head, normed, &xq, n0, n1, logits);
    }
    free(normed_all), free(wide), free(out), free(scores), free(codes), free(block_figures);
    return 0;
}

/* One linear on one activation row, outside a fused step: y [L->N] = L applied to x [L->K] (+ bias),
 * with the step's own kernels (four rows at a time, prefetched ahead, the threads sharing the rows).
 * What an eager decode step (a layout the fused step does not compute) runs for each int layer.
 * Returns 0, or -1 when scratch memory could not be had. */
int lwdsl_linear_row(const LwLinear *L, const float *x, float *y, int threads) {
    int K = L->K, Kb = K / 32 + 8;
    int8_t *codes = (int8_t *)malloc((size_t)2 * K + 64);
    float *figures = (float *)calloc((size_t)18 * Kb, sizeof(float)); /* scale, sum, spread, shift */
    if (!codes || !figures) {
        free(codes), free(figures);
        return -1;
    }
    Quantized xq = {codes, codes + K, figures, figures + Kb, figures + 2 * Kb, (int32_t *)(figures + 10 * Kb)};
    if (L->kind != 0) quantize(x, K, &xq);
#pragma omp parallel num_threads(threads)
    {
        int n0, n1;
        share(L->N, &n0, &n1);
        rows(L, x, &xq, n0, n1, y);
    }
    free(codes), free(figures);
    return 0;
}
