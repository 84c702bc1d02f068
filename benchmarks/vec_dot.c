/* One weight row type's dot kernel in a loop, without Python, threads or activation quantizing:
 * nanoseconds per 32-value block and GB/s of weights, best of 300 passes over `rows` rows.
 *
 *   cd src/turbollm/kernels/native/csrc && gcc -O3 -std=gnu11 -ffp-contract=off -fno-math-errno \
 *       -fno-trapping-math -pthread -I. ../../../../../benchmarks/vec_dot.c api.c threads.c scalar.c \
 *       arch/x86/avx2.c arch/x86/vnni.c ops.c gemma_blocks.c kv.c abi.c -lm -o /tmp/vec_dot
 *   /tmp/vec_dot TYPE ROWS COLS [SIMD]   e.g. /tmp/vec_dot 2 64 2816: Q4_0 (GGML type 2), in cache
 *
 * SIMD caps the code path (0 portable, 1 AVX2, 2 AVX-512 VNNI; default: the best the CPU has).
 * Weights are random bytes with a small fp16 scale at the start of every block, which suits
 * the 32-value formats (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, IQ4_NL). Timings on a shared machine
 * move from run to run: compare builds in alternating runs.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "tl_internal.h"

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + (double)t.tv_nsec * 1e-9;
}

int main(int argc, char **argv) {
    if (argc < 4) {
        fprintf(stderr, "usage: %s TYPE ROWS COLS [SIMD]\n", argv[0]);
        return 2;
    }
    const int type = atoi(argv[1]), rows = atoi(argv[2]), n = atoi(argv[3]), simd = argc > 4 ? atoi(argv[4]) : 2;
    static const int8_t iq4nl[16] = {-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113};
    static uint8_t iq3s_grid[2048];  /* not read by the 32-value formats */
    tl_init(iq3s_grid, iq4nl, simd);
    const tl_kernels *kt = tl_kernels_for(type);
    if (kt == NULL || n % kt->w_block) {
        fprintf(stderr, "type %d has no kernel here, or %d columns do not split into its blocks\n", type, n);
        return 2;
    }
    const int64_t row_bytes = n / kt->w_block * kt->w_block_bytes;
    uint8_t *w = malloc((size_t)(row_bytes * rows));
    for (int64_t i = 0; i < row_bytes * rows; i++) w[i] = (uint8_t)rand();
    const uint16_t scale = 0x2000;  /* fp16 2^-7 */
    for (int64_t b = 0; b < (int64_t)rows * (n / kt->w_block); b++) memcpy(w + b * kt->w_block_bytes, &scale, 2);
    float *x = malloc(sizeof(float) * (size_t)n);
    for (int i = 0; i < n; i++) x[i] = (float)rand() / (float)RAND_MAX - 0.5f;
    void *q = malloc((size_t)(n / kt->act_block * kt->act_block_bytes));
    kt->quantize_act(x, q, n);
    double best = 1e9;
    volatile float sink = 0.0f;
    for (int rep = 0; rep < 300; rep++) {
        const double t0 = now();
        for (int r = 0; r < rows; r++) sink += kt->vec_dot(n, w + r * row_bytes, q);
        const double dt = now() - t0;
        if (dt < best) best = dt;
    }
    printf("type %d, %d rows of %d, SIMD level %d: %.3f ns per block of 32, %.1f GB/s\n", type, rows, n,
           tl_simd_level(), best / rows / (n / 32) * 1e9, (double)(row_bytes * rows) / best / 1e9);
    free(w); free(x); free(q);
    return 0;
}
