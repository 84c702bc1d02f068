/* Small AVX2 helpers shared by avx2.c and vnni.c (and kv.c's AVX2 decoders, ../../kv.c). Each
 * includes this after its own target pragma, so the helpers are compiled for that file's
 * target; all are static inline. x86 only: nothing portable includes it. */
#ifndef TL_X86_SIMD_H
#define TL_X86_SIMD_H
#include <immintrin.h>

#include "../../tl_internal.h"

static inline float h2f(tl_half h) { return _cvtsh_ss(h); }

static inline float hsum_ps(__m256 x) {
    __m128 r = _mm_add_ps(_mm256_extractf128_ps(x, 1), _mm256_castps256_ps128(x));
    r = _mm_add_ps(r, _mm_movehl_ps(r, r));
    r = _mm_add_ss(r, _mm_movehdup_ps(r));
    return _mm_cvtss_f32(r);
}

/* 16 bytes of nibbles -> 32 bytes: low nibbles first, then high nibbles (ggml order) */
static inline __m256i nibbles_32(const uint8_t *p) {
    const __m128i t = _mm_loadu_si128((const __m128i *)p);
    return _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(t, 4), t), _mm256_set1_epi8(0x0F));
}

/* IQ4_NL's 16 levels in both 128-bit lanes, for _mm256_shuffle_epi8 */
static inline __m256i iq4nl_table(void) {
    const __m128i t = _mm_loadu_si128((const __m128i *)tl_iq4nl_values);
    return _mm256_set_m128i(t, t);
}

/* WEIGHTS(i): block i of a 32-block format as 32 signed weight bytes, read from `w`. Q5_0's
 * needs the including file's fifth_bits (32 bits -> 0x00 / 0x10 bytes), IQ4_NL's a `table`
 * from iq4nl_table(). */
#define Q4_0_WEIGHTS(i) _mm256_sub_epi8(nibbles_32(w[i].qs), _mm256_set1_epi8(8))
#define Q5_0_WEIGHTS(i) _mm256_sub_epi8(_mm256_or_si256(nibbles_32(w[i].qs), fifth_bits(w[i].qh)), _mm256_set1_epi8(16))
#define Q8_0_WEIGHTS(i) _mm256_loadu_si256((const __m256i *)w[i].qs)
#define IQ4_NL_WEIGHTS(i) _mm256_shuffle_epi8(table, nibbles_32(w[i].qs))

/* Weights stream from memory once per token, through 4 KiB pages (the GGUF is mmapped, page
 * cache pages are not huge pages), and the hardware prefetcher stops at every page boundary:
 * asking for the lines TL_PREFETCH_BYTES ahead of each step's weights doubled the from-memory
 * rate on the development machine (Q4_0, 65536 x 2816, 2 threads: 14.6 -> 32.4 GB/s; 1 KiB
 * ahead: 24.2, 2 KiB: 30.4). */
#define TL_PREFETCH_BYTES 4096
#define TL_PREFETCH(p, n_bytes) \
    for (int pf_ = 0; pf_ < (int)(n_bytes); pf_ += 64) _mm_prefetch((const char *)(p) + TL_PREFETCH_BYTES + pf_, _MM_HINT_T0)

#endif
