/* Small AVX2/F16C helpers shared by native.c and native_step.c. */
#ifndef LWDSL_NATIVE_SIMD_H
#define LWDSL_NATIVE_SIMD_H
#include <immintrin.h>
#include <stdint.h>

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

#endif
