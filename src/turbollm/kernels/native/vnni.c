/* AVX-512 VNNI (on 256-bit registers: AVX512VL) versions of the eight-block dot products of
 * eight_blocks.h for Q4_0, Q5_0, Q8_0 and IQ4_NL.
 *
 * vpdpbusd multiplies unsigned by signed bytes and adds each group of four products into an
 * int32 lane: one instruction where AVX2 needs maddubs + madd. `python benchmarks/kernels.py`,
 * 2 threads: Q4_0 36-37 GB/s in cache against AVX2's 30-33 (from memory both reach ~32, the
 * bandwidth); Q5_0 30-31 against 21-22.
 * Registered by tl_init only when the CPU reports avx512f/bw/vl/vnni.
 */
#if defined(__x86_64__)
#pragma GCC target("avx2,fma,f16c,avx512f,avx512vl,avx512bw,avx512vnni")
#include <immintrin.h>

#include "tl.h"

static inline float h2f(tl_half h) { return _cvtsh_ss(h); }

static inline float hsum_ps(__m256 x) {
    __m128 r = _mm_add_ps(_mm256_extractf128_ps(x, 1), _mm256_castps256_ps128(x));
    r = _mm_add_ps(r, _mm_movehl_ps(r, r));
    r = _mm_add_ss(r, _mm_movehdup_ps(r));
    return _mm_cvtss_f32(r);
}

static inline __m256i nibbles_32(const uint8_t *p) {
    const __m128i t = _mm_loadu_si128((const __m128i *)p);
    return _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(t, 4), t), _mm256_set1_epi8(0x0F));
}

/* 32 bits -> 32 bytes of 0x00 / 0x10 (the fifth bits of a q5 block) */
static inline __m256i fifth_bits(const uint8_t *qh) {
    uint32_t bits;
    __builtin_memcpy(&bits, qh, 4);
    return _mm256_maskz_mov_epi8((__mmask32)bits, _mm256_set1_epi8(0x10));
}

#define Q8_0_WEIGHTS(i) _mm256_loadu_si256((const __m256i *)w[i].qs)
#define Q5_0_WEIGHTS(i) _mm256_sub_epi8(_mm256_or_si256(nibbles_32(w[i].qs), fifth_bits(w[i].qh)), _mm256_set1_epi8(16))
#define IQ4_NL_WEIGHTS(i) _mm256_shuffle_epi8(table, nibbles_32(w[i].qs))

/* the eight-block kernels (eight_blocks.h) on vpdpbusd */
#define E8_DOT_U8S8(q, y) _mm256_dpbusd_epi32(_mm256_setzero_si256(), (q), (y))
#define E8_PREFIX vnni
#include "eight_blocks.h"

void tl_register_vnni(tl_kernels *t) { vnni_register(t); }
#else
#include "tl.h"
void tl_register_vnni(tl_kernels *t) { (void)t; }
#endif
