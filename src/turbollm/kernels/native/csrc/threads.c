/* A small persistent thread pool: tl_parallel(fn, ctx) runs fn(ctx, i, n) on n threads, the
 * calling thread being i = 0, and returns when all are done.
 *
 * A decode step issues ~130 short parallel sections with Python work between them; waking a
 * sleeping thread (futex) costs ~100 us here, more than most sections. So after each section
 * the workers keep spinning for a time window (TL_HOT_NS) and only then sleep on a condition
 * variable. tl_rest() ends the window at once: the caller uses it before handing the cores to
 * another thread pool (torch's GEMM in prefill), which spinning workers would slow down.
 * One caller at a time (a mutex serializes concurrent callers). Nothing here knows what the
 * tasks compute.
 */
#include <pthread.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <stdint.h>
#include <time.h>

#include "tl_internal.h"

#define TL_MAX_THREADS 256
#define SECTION_GEN(s) ((s) >> 32)
#define SECTION_THREADS(s) ((int)((s) & 0xffffffffu))
#define TL_HOT_NS 2000000  /* 2 ms: covers the gap between the kernel calls of a decode step */

static inline int64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

static struct {
    pthread_mutex_t call_lock;  /* one tl_parallel at a time */
    pthread_mutex_t lock;
    pthread_cond_t wake;
    /* generation (high 32 bits, bumped for every section) and the number of threads taking
     * part in it (low 32 bits), in one word so that a worker never pairs a section with the
     * thread count of another one */
    atomic_ullong section;
    atomic_int pending;      /* workers still running the current section */
    atomic_llong hot_until;  /* workers spin until this time (ns), then sleep */
    tl_task_fn fn;
    void *ctx;
    int n_threads;  /* threads taking part, caller included */
    int n_started;  /* worker threads created so far */
    pthread_t workers[TL_MAX_THREADS];
    unsigned long long created_at[TL_MAX_THREADS];
} pool = {
    .call_lock = PTHREAD_MUTEX_INITIALIZER, .lock = PTHREAD_MUTEX_INITIALIZER,
    .wake = PTHREAD_COND_INITIALIZER, .n_threads = 1,
};

static inline void cpu_relax(void) {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#endif
}

static void *worker_main(void *arg) {
    const int ith = (int)(intptr_t)arg;
    /* the generation when this worker was created (no section runs then): a worker that read
     * it itself could start late, after the first section it belongs to, and miss it */
    unsigned long long seen = pool.created_at[ith];
    for (;;) {
        unsigned long long s = atomic_load_explicit(&pool.section, memory_order_acquire);
        for (int spins = 0; SECTION_GEN(s) == seen; spins++) {
            cpu_relax();
            if ((spins & 255) == 0 && now_ns() > atomic_load_explicit(&pool.hot_until, memory_order_relaxed)) break;
            s = atomic_load_explicit(&pool.section, memory_order_acquire);
        }
        if (SECTION_GEN(s) == seen) {
            pthread_mutex_lock(&pool.lock);
            while (SECTION_GEN(s = atomic_load(&pool.section)) == seen) pthread_cond_wait(&pool.wake, &pool.lock);
            pthread_mutex_unlock(&pool.lock);
        }
        /* A worker may skip sections it takes no part in; a section it takes part in cannot
         * end (nor fn and ctx change) before it has run its share. */
        seen = SECTION_GEN(s);
        const int n = SECTION_THREADS(s);
        if (ith < n) {
            pool.fn(pool.ctx, ith, n);
            atomic_fetch_sub_explicit(&pool.pending, 1, memory_order_release);
        }
    }
    return NULL;
}

void tl_set_num_threads(int n) {
    if (n < 1) n = 1;
    if (n > TL_MAX_THREADS) n = TL_MAX_THREADS;
    pthread_mutex_lock(&pool.call_lock);
    while (pool.n_started < n - 1) {
        const int ith = pool.n_started + 1;
        pool.created_at[ith] = SECTION_GEN(atomic_load(&pool.section));
        if (pthread_create(&pool.workers[pool.n_started], NULL, worker_main, (void *)(intptr_t)ith) != 0) break;
        pthread_detach(pool.workers[pool.n_started]);
        pool.n_started++;
    }
    pool.n_threads = pool.n_started + 1 < n ? pool.n_started + 1 : n;
    pthread_mutex_unlock(&pool.call_lock);
}

int tl_get_num_threads(void) { return pool.n_threads; }

/* runs one section; the caller holds call_lock */
static void run_section(tl_task_fn fn, void *ctx, int n) {
    if (n == 1) {
        fn(ctx, 0, 1);
        return;
    }
    pool.fn = fn;
    pool.ctx = ctx;
    atomic_store(&pool.pending, n - 1);
    pthread_mutex_lock(&pool.lock);
    const unsigned long long gen = SECTION_GEN(atomic_load(&pool.section)) + 1;
    atomic_store_explicit(&pool.section, (gen << 32) | (unsigned)n, memory_order_release);
    pthread_cond_broadcast(&pool.wake);
    pthread_mutex_unlock(&pool.lock);
    fn(ctx, 0, n);
    while (atomic_load_explicit(&pool.pending, memory_order_acquire) > 0) cpu_relax();
    atomic_store_explicit(&pool.hot_until, now_ns() + TL_HOT_NS, memory_order_relaxed);
}

void tl_parallel(tl_task_fn fn, void *ctx) {
    pthread_mutex_lock(&pool.call_lock);
    run_section(fn, ctx, pool.n_threads);
    pthread_mutex_unlock(&pool.call_lock);
}

/* ---- items with stealing ------------------------------------------------------------------------
 *
 * tl_parallel_for gives each thread one contiguous range of the items, as a static split does
 * (long sequential reads keep the prefetchers streaming), but a thread that finishes its range
 * takes the items left at the far end of the others' ranges, one at a time, instead of
 * spinning until they finish. Decode on the synthetic 26B-A4B spent ~10% of the calling
 * thread's time waiting at the end of sections the static split had made uneven (perf). A
 * range is one word, next item (low 32 bits) and end (high 32 bits), so its owner (from the
 * front) and a thief (from the back) never both take the item where they meet. */

typedef struct {
    _Alignas(64) atomic_ullong range;  /* one cache line each: the owner's updates do not disturb the others */
} item_range;

static item_range ranges[TL_MAX_THREADS];

typedef struct {
    tl_item_fn fn;
    void *ctx;
} items_job;

static int take_item(atomic_ullong *range, int from_back, int64_t *item) {
    unsigned long long v = atomic_load_explicit(range, memory_order_relaxed);
    for (;;) {
        const uint32_t next = (uint32_t)v, end = (uint32_t)(v >> 32);
        if (next >= end) return 0;
        const unsigned long long taken = from_back ? ((unsigned long long)(end - 1) << 32) | next
                                                   : ((unsigned long long)end << 32) | (next + 1);
        if (atomic_compare_exchange_weak_explicit(range, &v, taken, memory_order_relaxed, memory_order_relaxed)) {
            *item = from_back ? end - 1 : next;
            return 1;
        }
    }
}

static void items_task(void *vctx, int ith, int nth) {
    const items_job *j = vctx;
    int64_t item;
    while (take_item(&ranges[ith].range, 0, &item)) j->fn(j->ctx, item);
    for (int d = 1; d < nth; d++) {
        atomic_ullong *other = &ranges[(ith + d) % nth].range;
        while (take_item(other, 1, &item)) j->fn(j->ctx, item);
    }
}

void tl_parallel_for(tl_item_fn fn, void *ctx, int64_t n_items) {
    if (n_items <= 0) return;
    pthread_mutex_lock(&pool.call_lock);
    int n = pool.n_threads;
    if (n > n_items) n = (int)n_items;
    if (n_items > UINT32_MAX || n == 1) {  /* one thread, or too many items for a range word: in order */
        pthread_mutex_unlock(&pool.call_lock);
        for (int64_t i = 0; i < n_items; i++) fn(ctx, i);
        return;
    }
    for (int i = 0; i < n; i++) {
        const unsigned long long lo = (unsigned long long)(n_items * i / n), hi = (unsigned long long)(n_items * (i + 1) / n);
        atomic_store_explicit(&ranges[i].range, (hi << 32) | lo, memory_order_relaxed);
    }
    items_job job = {fn, ctx};
    run_section(items_task, &job, n);  /* the section's release store publishes the ranges */
    pthread_mutex_unlock(&pool.call_lock);
}

void tl_rest(void) { atomic_store_explicit(&pool.hot_until, 0, memory_order_relaxed); }
