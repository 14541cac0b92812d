/* lwdsl's own CPU matmul kernels for packed weights in their STORED layout (no repacking), AVX2 + FMA
 * + F16C, threaded with OpenMP (the process's one libgomp, the one torch loads).
 *
 * y[m, n] = sum_k x[m, k] * w[n, k], with w given by:
 *   q4: codes [N, K/2] bytes, even k in the low nibble; fp16 scale [N, K/group] and, when asymmetric,
 *       fp16 offset [N, K/group]: w = code * scale + offset (symmetric: w = (code - 8) * scale).
 *   q8: codes [N, K] int8; fp16 scale [N]: w = code * scale.
 * The activations are rounded to int8 per block of 32 (absmax / 127, as llama.cpp's Q8 activations),
 * so the inner products run on integer multiply-adds (maddubs): 32 weights a few instructions.
 * group must be a multiple of 32; K a multiple of 32.
 */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>

#include "native_simd.h"


/* x [M, K] float -> xq [M, K] int8, xs [M, K/32] scales, xsum [M, K/32] block sums of the ROUNDED
 * values, so a weight's offset term sees the same activations as its codes: the result is exactly
 * sum_k w[k] * xq[k] * xs, whatever the offset (no error amplified by the codes' bias). */
static void quantize_rows(const float *x, int M, int K, int8_t *xq, float *xs, float *xsum) {
    int blocks = K / 32;
    for (int m = 0; m < M; m++) {
        for (int b = 0; b < blocks; b++) {
            const float *v = x + (size_t)m * K + b * 32;
            float amax = 0.f;
            for (int i = 0; i < 32; i++) { float a = fabsf(v[i]); amax = a > amax ? a : amax; }
            float scale = amax / 127.f, inv = scale > 0.f ? 1.f / scale : 0.f;
            int8_t *q = xq + (size_t)m * K + b * 32;
            int sum = 0;
            for (int i = 0; i < 32; i++) { q[i] = (int8_t)lrintf(v[i] * inv); sum += q[i]; }
            xs[m * blocks + b] = scale;
            xsum[m * blocks + b] = scale * (float)sum;
        }
    }
}

static inline __m256i unpack_nibbles(const uint8_t *bytes) {
    __m128i packed = _mm_loadu_si128((const __m128i *)bytes);
    __m128i mask = _mm_set1_epi8(0x0F);
    __m128i low = _mm_and_si128(packed, mask);
    __m128i high = _mm_and_si128(_mm_srli_epi16(packed, 4), mask);
    __m128i first = _mm_unpacklo_epi8(low, high);  /* k = 0..15 */
    __m128i second = _mm_unpackhi_epi8(low, high); /* k = 16..31 */
    return _mm256_set_m128i(second, first);
}

static inline __m256i dot_u8_s8(__m256i u, __m256i s) {
    return lw_dot_u8s8(u, s); /* native_simd.h: maddubs + madd, or one vpdpbusd */
}

/* One activation row (decode): one accumulator chain kept in registers. */
static float q4_row_dot(const uint8_t *row, const int8_t *xq, const float *xs, const float *xsum,
                        const uint16_t *scale, const uint16_t *offset, int groups, int per_group) {
    __m256 acc = _mm256_setzero_ps();
    float shift = 0.f;
    for (int g = 0; g < groups; g++) {
        float s = lw_half(scale[g]);
        float o = offset ? lw_half(offset[g]) : -8.f * s;
        for (int j = 0; j < per_group; j++) {
            int b = g * per_group + j;
            __m256i w = unpack_nibbles(row + b * 16);
            __m256i v = _mm256_loadu_si256((const __m256i *)(xq + b * 32));
            acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot_u8_s8(w, v)), _mm256_set1_ps(s * xs[b]), acc);
            shift += o * xsum[b];
        }
    }
    return lw_hsum(acc) + shift;
}

#define TILE 4 /* activation rows sharing one unpacking of the weights (prefill) */

typedef struct {
    int8_t *q;          /* [M, K] codes */
    float *scale, *sum; /* [M, K/32]: scale, and scale * sum of the block's codes */
} Rows;

static Rows quantized(const float *x, int M, int K) {
    Rows r = {(int8_t *)malloc((size_t)M * K), (float *)malloc(sizeof(float) * M * (K / 32)),
              (float *)malloc(sizeof(float) * M * (K / 32))};
    quantize_rows(x, M, K, r.q, r.scale, r.sum);
    return r;
}

static void release(Rows r) {
    free(r.q);
    free(r.scale);
    free(r.sum);
}

void lwdsl_q4_gemm(const float *x, int M, int K, const uint8_t *codes, const uint16_t *scale,
                   const uint16_t *offset, int N, int group, float *y) {
    int blocks = K / 32, groups = K / group, per_group = group / 32;
    Rows rows_q = quantized(x, M, K);
    const int8_t *xq = rows_q.q;
    const float *xs = rows_q.scale, *xsum = rows_q.sum;
#pragma omp parallel for schedule(static)
    for (int n = 0; n < N; n++) {
        const uint8_t *row = codes + (size_t)n * (K / 2);
        if (M == 1) {
            y[n] = q4_row_dot(row, xq, xs, xsum, scale + (size_t)n * groups,
                              offset ? offset + (size_t)n * groups : 0, groups, per_group);
            continue;
        }
        for (int m0 = 0; m0 < M; m0 += TILE) {
            int rows = M - m0 < TILE ? M - m0 : TILE;
            __m256 acc[TILE];
            float shift[TILE];
            for (int t = 0; t < TILE; t++) { acc[t] = _mm256_setzero_ps(); shift[t] = 0.f; }
            for (int g = 0; g < groups; g++) {
                float s = lw_half(scale[(size_t)n * groups + g]);
                float o = offset ? lw_half(offset[(size_t)n * groups + g]) : -8.f * s;
                for (int j = 0; j < per_group; j++) {
                    int b = g * per_group + j;
                    __m256i w = unpack_nibbles(row + b * 16);
                    for (int t = 0; t < rows; t++) {
                        int m = m0 + t;
                        __m256i v = _mm256_loadu_si256((const __m256i *)(xq + (size_t)m * K + b * 32));
                        __m256 dot = _mm256_cvtepi32_ps(dot_u8_s8(w, v));
                        acc[t] = _mm256_fmadd_ps(dot, _mm256_set1_ps(s * xs[m * blocks + b]), acc[t]);
                        shift[t] += o * xsum[m * blocks + b];
                    }
                }
            }
            for (int t = 0; t < rows; t++) y[(size_t)(m0 + t) * N + n] = lw_hsum(acc[t]) + shift[t];
        }
    }
    release(rows_q);
}

void lwdsl_q8_gemm(const float *x, int M, int K, const int8_t *codes, const uint16_t *scale, int N,
                   float *y) {
    int blocks = K / 32;
    Rows rows_q = quantized(x, M, K);
    const int8_t *xq = rows_q.q;
    const float *xs = rows_q.scale;
#pragma omp parallel for schedule(static)
    for (int n = 0; n < N; n++) {
        const int8_t *row = codes + (size_t)n * K;
        float s = lw_half(scale[n]);
        if (M == 1) {
            __m256 acc = _mm256_setzero_ps();
            for (int b = 0; b < blocks; b++) {
                __m256i w = _mm256_loadu_si256((const __m256i *)(row + b * 32));
                __m256i v = _mm256_loadu_si256((const __m256i *)(xq + b * 32));
                __m256i dot = dot_u8_s8(_mm256_sign_epi8(w, w), _mm256_sign_epi8(v, w));
                acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), _mm256_set1_ps(xs[b]), acc);
            }
            y[n] = s * lw_hsum(acc);
            continue;
        }
        for (int m0 = 0; m0 < M; m0 += TILE) {
            int rows = M - m0 < TILE ? M - m0 : TILE;
            __m256 acc[TILE];
            for (int t = 0; t < TILE; t++) acc[t] = _mm256_setzero_ps();
            for (int b = 0; b < blocks; b++) {
                __m256i w = _mm256_loadu_si256((const __m256i *)(row + b * 32));
                __m256i magnitude = _mm256_sign_epi8(w, w);
                for (int t = 0; t < rows; t++) {
                    int m = m0 + t;
                    __m256i v = _mm256_loadu_si256((const __m256i *)(xq + (size_t)m * K + b * 32));
                    /* maddubs needs one unsigned side: |w| and x carrying w's sign (llama.cpp's trick). */
                    __m256i dot = dot_u8_s8(magnitude, _mm256_sign_epi8(v, w));
                    acc[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), _mm256_set1_ps(xs[m * blocks + b]), acc[t]);
                }
            }
            for (int t = 0; t < rows; t++) y[(size_t)(m0 + t) * N + n] = s * lw_hsum(acc[t]);
        }
    }
    release(rows_q);
}

/* The float32 weight [N, K] of a stored int4 / int8 weight, for prefill: a batch of activation rows
 * then runs on the float matmul (sgemm) over one transient dequantized matrix, faster than integer
 * dot products per row once there are more than a few rows, and without rounding the activations. */
void lwdsl_q4_dequant(const uint8_t *codes, const uint16_t *scale, const uint16_t *offset, int N, int K,
                      int group, float *w) {
    int groups = K / group;
#pragma omp parallel for schedule(static)
    for (int n = 0; n < N; n++) {
        const uint8_t *row = codes + (size_t)n * (K / 2);
        float *out = w + (size_t)n * K;
        for (int g = 0; g < groups; g++) {
            float s = lw_half(scale[(size_t)n * groups + g]);
            float o = offset ? lw_half(offset[(size_t)n * groups + g]) : -8.f * s;
            __m256 s8 = _mm256_set1_ps(s), o8 = _mm256_set1_ps(o);
            for (int k = g * group; k < (g + 1) * group; k += 32) {
                __m256i c = unpack_nibbles(row + k / 2); /* 32 codes, in order */
                __m128i lo = _mm256_castsi256_si128(c), hi = _mm256_extracti128_si256(c, 1);
                __m256 c0 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(lo));
                __m256 c1 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(lo, 8)));
                __m256 c2 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(hi));
                __m256 c3 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(hi, 8)));
                _mm256_storeu_ps(out + k, _mm256_fmadd_ps(c0, s8, o8));
                _mm256_storeu_ps(out + k + 8, _mm256_fmadd_ps(c1, s8, o8));
                _mm256_storeu_ps(out + k + 16, _mm256_fmadd_ps(c2, s8, o8));
                _mm256_storeu_ps(out + k + 24, _mm256_fmadd_ps(c3, s8, o8));
            }
        }
    }
}

void lwdsl_q8_dequant(const int8_t *codes, const uint16_t *scale, int N, int K, float *w) {
#pragma omp parallel for schedule(static)
    for (int n = 0; n < N; n++) {
        __m256 s8 = _mm256_set1_ps(lw_half(scale[n]));
        const int8_t *row = codes + (size_t)n * K;
        float *out = w + (size_t)n * K;
        int k = 0;
        for (; k + 8 <= K; k += 8) {
            __m256i c = _mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(row + k)));
            _mm256_storeu_ps(out + k, _mm256_mul_ps(_mm256_cvtepi32_ps(c), s8));
        }
        for (; k < K; k++) out[k] = row[k] * lw_half(scale[n]);
    }
}

/* int8 in groups (a multiple of 32; group 32 is GGUF's Q8_0): codes [N, K] int8, fp16 scale
 * [N, K/group]: w = code * scale. The same integer products as q8, each block of 32 weighed by its own
 * group's scale times the activation block's. */
void lwdsl_q8g_gemm(const float *x, int M, int K, const int8_t *codes, const uint16_t *scale, int N,
                    int group, float *y) {
    int blocks = K / 32, groups = K / group, per = group / 32;
    Rows rows_q = quantized(x, M, K);
    const int8_t *xq = rows_q.q;
    const float *xs = rows_q.scale;
#pragma omp parallel for schedule(static)
    for (int n = 0; n < N; n++) {
        const int8_t *row = codes + (size_t)n * K;
        const uint16_t *ws = scale + (size_t)n * groups;
        for (int m = 0; m < M; m++) {
            __m256 acc = _mm256_setzero_ps();
            const int8_t *xm = xq + (size_t)m * K;
            for (int b = 0; b < blocks; b++) {
                __m256i w = _mm256_loadu_si256((const __m256i *)(row + b * 32));
                __m256i v = _mm256_loadu_si256((const __m256i *)(xm + b * 32));
                __m256i dot = dot_u8_s8(_mm256_sign_epi8(w, w), _mm256_sign_epi8(v, w));
                acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot),
                                      _mm256_set1_ps(xs[m * blocks + b] * lw_half(ws[b / per])), acc);
            }
            y[(size_t)m * N + n] = lw_hsum(acc);
        }
    }
    release(rows_q);
}

void lwdsl_q8g_dequant(const int8_t *codes, const uint16_t *scale, int N, int K, int group, float *w) {
    int groups = K / group;
#pragma omp parallel for schedule(static)
    for (int n = 0; n < N; n++) {
        const int8_t *row = codes + (size_t)n * K;
        float *out = w + (size_t)n * K;
        for (int g = 0; g < groups; g++) {
            __m256 s8 = _mm256_set1_ps(lw_half(scale[(size_t)n * groups + g]));
            for (int k = g * group; k < (g + 1) * group; k += 8) {
                __m256i c = _mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(row + k)));
                _mm256_storeu_ps(out + k, _mm256_mul_ps(_mm256_cvtepi32_ps(c), s8));
            }
        }
    }
}
