/* A prefill's dequantized layer written straight as bfloat16 (for torch's bf16 matmul: oneDNN's AMX
 * or AVX512-BF16 paths), in the stored layouts `native.c` documents. Each weight is the float32 value
 * `lwdsl_q4_dequant` / `lwdsl_q8_dequant` write (code * scale + offset in one rounding), then rounded to
 * the nearest bfloat16, ties to even, as torch's `.to(torch.bfloat16)` rounds: one pass writing 2 bytes
 * a weight instead of a float32 matrix and a conversion. */
#include <immintrin.h>
#include <stdint.h>

#include "native_simd.h"

/* 8 floats to 8 bfloat16 (nearest, ties to even; finite values). */
static inline __m128i bf16_of(__m256 v) {
#if defined(__AVX512BF16__) && defined(__AVX512VL__)
    return (__m128i)_mm256_cvtneps_pbh(v);
#else
    __m256i bits = _mm256_castps_si256(v);
    __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
    bits = _mm256_srli_epi32(_mm256_add_epi32(bits, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7FFF))), 16);
    /* 32-bit lanes holding 16-bit values: pack within lanes, then gather the two halves */
    __m256i packed = _mm256_packus_epi32(bits, bits);
    return _mm256_castsi256_si128(_mm256_permute4x64_epi64(packed, 0xD8));
#endif
}

void lwdsl_q4_dequant_bf16(const uint8_t *codes, const uint16_t *scale, const uint16_t *offset, int N, int K,
                           int group, uint16_t *w) {
    int groups = K / group;
#pragma omp parallel for schedule(static)
    for (int n = 0; n < N; n++) {
        const uint8_t *row = codes + (size_t)n * (K / 2);
        uint16_t *out = w + (size_t)n * K;
        for (int g = 0; g < groups; g++) {
            float s = lw_half(scale[(size_t)n * groups + g]);
            float o = offset ? lw_half(offset[(size_t)n * groups + g]) : -8.f * s;
            __m256 s8 = _mm256_set1_ps(s), o8 = _mm256_set1_ps(o);
            for (int k = g * group; k < (g + 1) * group; k += 16) {
                /* 8 bytes: 16 codes, even k in the low nibble */
                __m128i packed = _mm_loadl_epi64((const __m128i *)(row + k / 2));
                __m128i low = _mm_and_si128(packed, _mm_set1_epi8(0x0F));
                __m128i high = _mm_and_si128(_mm_srli_epi16(packed, 4), _mm_set1_epi8(0x0F));
                __m128i ordered = _mm_unpacklo_epi8(low, high); /* k .. k+15 in order */
                __m256 c0 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(ordered));
                __m256 c1 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(ordered, 8)));
                _mm_storeu_si128((__m128i *)(out + k), bf16_of(_mm256_fmadd_ps(c0, s8, o8)));
                _mm_storeu_si128((__m128i *)(out + k + 8), bf16_of(_mm256_fmadd_ps(c1, s8, o8)));
            }
        }
    }
}

void lwdsl_q8_dequant_bf16(const int8_t *codes, const uint16_t *scale, int N, int K, uint16_t *w) {
#pragma omp parallel for schedule(static)
    for (int n = 0; n < N; n++) {
        __m256 s8 = _mm256_set1_ps(lw_half(scale[n]));
        const int8_t *row = codes + (size_t)n * K;
        uint16_t *out = w + (size_t)n * K;
        int k = 0;
        for (; k + 8 <= K; k += 8) {
            __m256i c = _mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(row + k)));
            _mm_storeu_si128((__m128i *)(out + k), bf16_of(_mm256_mul_ps(_mm256_cvtepi32_ps(c), s8)));
        }
        for (; k < K; k++) {
            union { float f; uint32_t u; } v = {row[k] * lw_half(scale[n])};
            out[k] = (uint16_t)((v.u + 0x7FFF + ((v.u >> 16) & 1)) >> 16);
        }
    }
}
