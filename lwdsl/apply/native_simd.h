/* Small SIMD helpers shared by native.c and native_step.c, per instruction-set level: the same sources
 * are compiled once per level (`native.py` LEVELS), and the level's differences live here.
 * - AVX2 + FMA + F16C: integer dot products by maddubs (u8 x s8 pairs into int16) then madd (into int32).
 * - AVX-512 VNNI (with VL): one vpdpbusd does both, u8 x s8 quads straight into int32. The callers'
 *   operands never saturate maddubs' int16 pairs (|w| <= 127 against |x| <= 127, or 4-bit codes), so
 *   both give the same exact integers: results do not depend on the level. */
#ifndef LWDSL_NATIVE_SIMD_H
#define LWDSL_NATIVE_SIMD_H
#include <immintrin.h>
#include <stdint.h>

#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
#define LW_VNNI 1
#else
#define LW_VNNI 0
#endif

/* 512-bit integer kernels (the fused step's int8 rows): AVX-512 F + BW + VNNI. */
#if LW_VNNI && defined(__AVX512F__) && defined(__AVX512BW__)
#define LW_AVX512 1
#else
#define LW_AVX512 0
#endif

/* The sum of a vector's 8 floats. */
static inline float lw_hsum(__m256 v) {
    __m128 lo = _mm256_castps256_ps128(v), hi = _mm256_extractf128_ps(v, 1);
    lo = _mm_add_ps(lo, hi);
    lo = _mm_add_ps(lo, _mm_movehl_ps(lo, lo));
    lo = _mm_add_ss(lo, _mm_movehdup_ps(lo));
    return _mm_cvtss_f32(lo);
}

/* An fp16 value (its bits) as a float. */
static inline float lw_half(uint16_t h) { return _cvtsh_ss(h); }

/* Per int32 lane: the sum of its four u8 x s8 products. */
static inline __m256i lw_dot_u8s8(__m256i u, __m256i s) {
#if LW_VNNI
    return _mm256_dpbusd_epi32(_mm256_setzero_si256(), u, s);
#else
    return _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1));
#endif
}

/* Per int32 lane: the sums of u1 x s1 and u2 x s2's four products each (u: 4-bit values, so the AVX2
 * path may add the int16 pairs first: 4 x 15 x 127 fits). */
static inline __m256i lw_dot2_u4s8(__m256i u1, __m256i s1, __m256i u2, __m256i s2) {
#if LW_VNNI
    return _mm256_dpbusd_epi32(_mm256_dpbusd_epi32(_mm256_setzero_si256(), u1, s1), u2, s2);
#else
    __m256i p = _mm256_add_epi16(_mm256_maddubs_epi16(u1, s1), _mm256_maddubs_epi16(u2, s2));
    return _mm256_madd_epi16(p, _mm256_set1_epi16(1));
#endif
}

#endif
