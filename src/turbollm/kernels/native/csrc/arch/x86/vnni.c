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
#include "x86_simd.h"

/* 32 bits -> 32 bytes of 0x00 / 0x10 (the fifth bits of a q5 block) */
static inline __m256i fifth_bits(const uint8_t *qh) {
    uint32_t bits;
    __builtin_memcpy(&bits, qh, 4);
    return _mm256_maskz_mov_epi8((__mmask32)bits, _mm256_set1_epi8(0x10));
}

/* the eight-block kernels (eight_blocks.h) on vpdpbusd */
#define E8_DOT_U8S8(q, y) _mm256_dpbusd_epi32(_mm256_setzero_si256(), (q), (y))
#define E8_DOT2_U8S8(a, x, b, y) _mm256_dpbusd_epi32(_mm256_dpbusd_epi32(_mm256_setzero_si256(), (a), (x)), (b), (y))
#define E8_PREFIX vnni
#include "eight_blocks.h"

void tl_register_vnni(tl_kernels *t) { vnni_register(t); }
#else
#include "../../tl_internal.h"
void tl_register_vnni(tl_kernels *t) { (void)t; }
#endif
