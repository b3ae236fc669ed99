/* Paged attention of a flat batch (prefill chunks and decodes mixed) on CPU, reading K/V pages where they lie.
 *
 * Layout (cpu_kernel.py checks it): queries [T, Hq, D] fp32 with unit head and dim strides; the cache of one layer
 * [2, pages, block_size, Hkv, D] fp32 or bf16, contiguous; out [T, Hq, D] fp32 contiguous. Request b owns query rows
 * query_start_loc[b] .. query_start_loc[b + 1] - 1, sits at context length seq_lens[b] after this step, and its
 * pages are block_table[b, 0 ..]. Query i of request b is at position seq_len - q_len + i and sees keys 0 .. that
 * position. A request with seq_len 0 (a padded row) reads nothing and gets zeros.
 *
 * Work: one item = a group of KV heads of one request (all of them, or one when there are too few requests to keep
 * the threads busy) and a tile of up to TILE_ROWS query rows, a row being (query, one of the query heads of the
 * group); one pass over the request's pages then reads whole token rows of the group's heads, in address order
 * within a page (reading one head at a time skips through every page once per head, which measured up to twice
 * slower on pages scattered over the cache), and one load of a key or value serves the G query heads that share
 * it (GQA). Each row keeps an fp32 online softmax (running max, sum, weighted values) over
 * chunks of up to KEY_CHUNK = LANES keys of one page. A chunk's scores are computed in vector lanes: per key, the
 * products of a row with the key are summed lane-wise over the head (LANES partial sums per key), and the LANES
 * keys' partial sums are then folded into one vector of their LANES scores by a tree of shuffles (LANES - 1
 * shuffle-add steps for LANES keys instead of one horizontal reduction per key); the softmax of the chunk and its
 * weighted sum of values run on whole vectors too (values: up to ACC_VECTORS vector accumulators of a row held in
 * registers across the chunk's keys). Head dims that are not a multiple of LANES finish the last dims in scalars.
 * Items run on `num_threads` threads: OpenMP (the runtime torch
 * itself loaded when it is libgomp: one thread pool, no second runtime spinning beside it), or with
 * -DATTN_PTHREADS threads started per call, or with -DATTN_SERIAL on the calling thread only (the caller
 * splits the batch); benchmarks/attention.py measures the three.
 *
 * exp is a polynomial of our own (relative error below 1e-7 over the range used), so that the compiler can
 * vectorise it without -ffast-math (which would break the arithmetic the masking relies on). */

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#if defined(ATTN_PTHREADS)
#include <pthread.h>
#elif !defined(ATTN_SERIAL)
#include <omp.h>
#endif

#define TILE_ROWS 32
#define LANES 16 /* floats per vector (GCC/Clang vector extension: 512 bits, split by the compiler where narrower) */
#define KEY_CHUNK LANES
#define ACC_VECTORS 4 /* vector accumulators of a row's weighted values kept in registers at once */
#define MAX_HEAD_DIM 256
#ifndef PREFETCH_KEYS
#define PREFETCH_KEYS 16 /* how far ahead of the keys being computed their cache lines are asked for */
#endif
#define NO_SCORE -3.0e38f

typedef float vfloat __attribute__((vector_size(LANES * sizeof(float))));
typedef int32_t vint __attribute__((vector_size(LANES * sizeof(int32_t))));
/* the same vector read from or written to memory of any alignment, aliasing plain floats */
typedef float vfloat_u __attribute__((vector_size(LANES * sizeof(float)), aligned(4), may_alias));

typedef struct {
    const float *q;
    int64_t q_token_stride; /* elements between consecutive tokens of q */
    const void *k, *v;      /* the cache's key and value planes */
    int bf16;               /* cache elements are bfloat16 (else float32) */
    int block_size, num_heads, num_kv_heads, head_dim;
    const int32_t *query_start_loc, *seq_lens, *block_table;
    int64_t table_stride;
    float scale;
    float *out;
    const int64_t *tile_start; /* [num_reqs + 1]: first work item of each request */
    int num_reqs;
    int group_heads; /* KV heads per item: num_kv_heads or 1 */
} Batch;

/* e^x for x <= 0, vectorisable: x = n ln2 + r with |r| <= ln2 / 2, e^r by its Taylor series to r^7, times 2^n
 * built in the exponent bits. Below -87 (where e^x underflows fp32's normal range) the result is 0. */
static inline float exp_nonpositive(float x) {
    const float log2e = 1.44269504f, ln2_hi = 0.693145752f, ln2_lo = 1.42860677e-6f, shifter = 12582912.0f;
    float clamped = x < -87.0f ? -87.0f : x;
    float t = clamped * log2e + shifter; /* round to nearest integer in the low mantissa bits */
    float n = t - shifter;
    float r = clamped - n * ln2_hi - n * ln2_lo;
    float p = 1.0f / 5040.0f + r * (1.0f / 40320.0f);
    p = 1.0f / 720.0f + r * p;
    p = 1.0f / 120.0f + r * p;
    p = 1.0f / 24.0f + r * p;
    p = 1.0f / 6.0f + r * p;
    p = 0.5f + r * p;
    p = 1.0f + r * p;
    p = 1.0f + r * p;
    union { float f; int32_t i; } bits = {.f = t}, scale;
    scale.i = (bits.i - 0x4B400000 + 127) << 23;
    return x < -87.0f ? 0.0f : p * scale.f;
}

static inline vfloat load(const float *p) { return *(const vfloat_u *)p; }

static inline void store(float *p, vfloat x) { *(vfloat_u *)p = x; }

static inline vfloat broadcast(float x) { return (vfloat){0} + x; }

/* Halves, quarters, eighths and single lanes of two vectors summed pairwise: (a0+a1, b0+b1, a2+a3, b2+b3, ...) in
 * pieces of 8, 4, 2 and 1 lanes. */
static inline vfloat fold8(vfloat a, vfloat b) {
    return __builtin_shufflevector(a, b, 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23) +
           __builtin_shufflevector(a, b, 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31);
}
static inline vfloat fold4(vfloat a, vfloat b) {
    return __builtin_shufflevector(a, b, 0, 1, 2, 3, 16, 17, 18, 19, 8, 9, 10, 11, 24, 25, 26, 27) +
           __builtin_shufflevector(a, b, 4, 5, 6, 7, 20, 21, 22, 23, 12, 13, 14, 15, 28, 29, 30, 31);
}
static inline vfloat fold2(vfloat a, vfloat b) {
    return __builtin_shufflevector(a, b, 0, 1, 16, 17, 4, 5, 20, 21, 8, 9, 24, 25, 12, 13, 28, 29) +
           __builtin_shufflevector(a, b, 2, 3, 18, 19, 6, 7, 22, 23, 10, 11, 26, 27, 14, 15, 30, 31);
}
static inline vfloat fold1(vfloat a, vfloat b) {
    return __builtin_shufflevector(a, b, 0, 16, 2, 18, 4, 20, 6, 22, 8, 24, 10, 26, 12, 28, 14, 30) +
           __builtin_shufflevector(a, b, 1, 17, 3, 19, 5, 21, 7, 23, 9, 25, 11, 27, 13, 29, 15, 31);
}

/* Lane j of the result = the sum of the lanes of part[j]. The tree leaves key 8s + bitreverse3(k) in lane 2k + s;
 * the last shuffle puts every key back in its own lane. */
static inline vfloat sum_lanes_of_each(const vfloat part[LANES]) {
    vfloat halves[8], quarters[4], eighths[2];
    for (int i = 0; i < 8; i++)
        halves[i] = fold8(part[2 * i], part[2 * i + 1]);
    for (int i = 0; i < 4; i++)
        quarters[i] = fold4(halves[2 * i], halves[2 * i + 1]);
    for (int i = 0; i < 2; i++)
        eighths[i] = fold2(quarters[2 * i], quarters[2 * i + 1]);
    vfloat mixed = fold1(eighths[0], eighths[1]);
    return __builtin_shufflevector(mixed, mixed, 0, 8, 4, 12, 2, 10, 6, 14, 1, 9, 5, 13, 3, 11, 7, 15);
}

/* Scores of one row q (scaled, head_dim D) against `count` <= LANES keys `stride` apart; lanes at and past `valid`
 * hold NO_SCORE. */
static inline vfloat chunk_scores(const float *restrict q, const float *restrict keys, int64_t stride, int count,
                                  int valid, int D) {
    int full = D / LANES * LANES;
    vfloat part[LANES];
    for (int j = 0; j < LANES; j++) {
        vfloat sum = {0};
        if (j < count) {
            const float *key = keys + j * stride;
            for (int d = 0; d < full; d += LANES)
                sum += load(q + d) * load(key + d);
        }
        part[j] = sum;
    }
    vfloat scores = sum_lanes_of_each(part);
    if (full < D) {
        float tail[LANES];
        store(tail, scores);
        for (int j = 0; j < count; j++) {
            const float *key = keys + j * stride;
            for (int d = full; d < D; d++)
                tail[j] += q[d] * key[d];
        }
        scores = load(tail);
    }
    vint lane = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};
    vint seen = lane < valid; /* all bits set in the lanes of keys the row sees */
    vint masked = ((vint)scores & seen) | ((vint)broadcast(NO_SCORE) & ~seen);
    return (vfloat)masked;
}

/* acc[0 .. D) += sum over keys j < count of weight[j] * values[j * stride + d]; ACC_VECTORS vectors of acc at a
 * time stay in registers over all keys. */
static inline void add_weighted_values(float *restrict acc, const float *restrict weight,
                                       const float *restrict values, int64_t stride, int count, int D) {
    int full = D / LANES * LANES, d = 0;
    for (; d + ACC_VECTORS * LANES <= full; d += ACC_VECTORS * LANES) {
        vfloat a[ACC_VECTORS];
        for (int c = 0; c < ACC_VECTORS; c++)
            a[c] = load(acc + d + c * LANES);
        for (int j = 0; j < count; j++) {
            vfloat w = broadcast(weight[j]);
            for (int c = 0; c < ACC_VECTORS; c++)
                a[c] += w * load(values + j * stride + d + c * LANES);
        }
        for (int c = 0; c < ACC_VECTORS; c++)
            store(acc + d + c * LANES, a[c]);
    }
    for (; d < full; d += LANES) {
        vfloat a = load(acc + d);
        for (int j = 0; j < count; j++)
            a += broadcast(weight[j]) * load(values + j * stride + d);
        store(acc + d, a);
    }
    for (; d < D; d++)
        for (int j = 0; j < count; j++)
            acc[d] += weight[j] * values[j * stride + d];
}

/* Rows of `count` keys (or values) of the KV heads h0 .. h0 + group_heads - 1 starting at token `first` of `page`,
 * as fp32 rows `stride` apart (head h at + (h - h0) * head_dim): the cache itself for fp32, else converted into
 * `scratch` [KEY_CHUNK, group_heads * head_dim]. */
static const float *chunk_rows(const Batch *bt, const void *plane, int32_t page, int first, int count, int h0,
                               float *scratch, int64_t *stride) {
    int64_t token_stride = (int64_t)bt->num_kv_heads * bt->head_dim;
    int64_t offset = ((int64_t)page * bt->block_size + first) * token_stride + (int64_t)h0 * bt->head_dim;
    if (!bt->bf16) {
        *stride = token_stride;
        return (const float *)plane + offset;
    }
    int width = bt->group_heads * bt->head_dim;
    const uint16_t *src = (const uint16_t *)plane + offset;
    for (int j = 0; j < count; j++) {
        uint32_t *dst = (uint32_t *)(scratch + (int64_t)j * width);
        const uint16_t *row = src + j * token_stride;
        for (int d = 0; d < width; d++)
            dst[d] = (uint32_t)row[d] << 16;
    }
    *stride = width;
    return scratch;
}

/* Ask for the cache lines of the keys and values at positions from .. to - 1 of the KV heads h0 .. h0 +
 * group_heads - 1 of a request (pages `pages`), PREFETCH_KEYS positions before they are computed: pages are
 * scattered, so the hardware prefetchers cannot guess them. Always inlined: GCC deems a static function made of
 * prefetches free of side effects and drops the calls to it. */
static inline __attribute__((always_inline)) void prefetch_keys(const Batch *bt, const int32_t *pages, int from,
                                                                int to, int h0) {
    int64_t token_stride = (int64_t)bt->num_kv_heads * bt->head_dim;
    int element = bt->bf16 ? 2 : 4, bytes = bt->group_heads * bt->head_dim * element;
    for (int p = from; p < to; p++) {
        int64_t offset = ((int64_t)pages[p / bt->block_size] * bt->block_size + p % bt->block_size) * token_stride +
                         (int64_t)h0 * bt->head_dim;
        const char *k = (const char *)bt->k + offset * element, *v = (const char *)bt->v + offset * element;
        for (int line = 0; line < bytes; line += 64) {
            __builtin_prefetch(k + line);
            __builtin_prefetch(v + line);
        }
    }
}

static void run_item(const Batch *bt, int64_t item) {
    int lo = 0, hi = bt->num_reqs; /* the request whose items include `item`: tile_start[b] <= item < [b + 1] */
    while (hi - lo > 1) {
        int mid = (lo + hi) / 2;
        if (bt->tile_start[mid] <= item)
            lo = mid;
        else
            hi = mid;
    }
    int b = lo, D = bt->head_dim, G = bt->num_heads / bt->num_kv_heads;
    int groups = bt->num_kv_heads / bt->group_heads, group_rows = bt->group_heads * G; /* query heads per group */
    int64_t tiles_per_group = (bt->tile_start[b + 1] - bt->tile_start[b]) / groups;
    int64_t local = item - bt->tile_start[b];
    int h0 = (int)(local / tiles_per_group) * bt->group_heads, first_row = (int)(local % tiles_per_group) * TILE_ROWS;
    int q0 = bt->query_start_loc[b], q_len = bt->query_start_loc[b + 1] - q0, seq_len = bt->seq_lens[b];
    int rows = q_len * group_rows - first_row < TILE_ROWS ? q_len * group_rows - first_row : TILE_ROWS;
    int context = seq_len - q_len;

    float q[TILE_ROWS][MAX_HEAD_DIM], acc[TILE_ROWS][MAX_HEAD_DIM];
    int scratch = bt->bf16 ? KEY_CHUNK * bt->group_heads * D : 1;
    float kbuf[scratch], vbuf[scratch];
    float row_max[TILE_ROWS], row_sum[TILE_ROWS];
    int limit[TILE_ROWS];  /* keys each row sees */
    int64_t offset[TILE_ROWS]; /* of its KV head's row in a chunk's keys or values */
    int max_limit = 0;
    for (int r = 0; r < rows; r++) {
        int i = (first_row + r) / group_rows, head = h0 * G + (first_row + r) % group_rows; /* query head */
        offset[r] = (int64_t)(head / G - h0) * D;
        const float *src = bt->q + (int64_t)(q0 + i) * bt->q_token_stride + (int64_t)head * D;
        for (int d = 0; d < D; d++) {
            q[r][d] = src[d] * bt->scale;
            acc[r][d] = 0.0f;
        }
        int seen = seq_len > 0 ? context + i + 1 : 0;
        limit[r] = seen < 0 ? 0 : seen > seq_len ? seq_len : seen;
        max_limit = limit[r] > max_limit ? limit[r] : max_limit;
        row_max[r] = NO_SCORE;
        row_sum[r] = 0.0f;
    }
    const int32_t *pages = bt->block_table + (int64_t)b * bt->table_stride;
    prefetch_keys(bt, pages, 0, PREFETCH_KEYS < max_limit ? PREFETCH_KEYS : max_limit, h0);
    for (int start = 0; start < max_limit;) {
        int32_t page = pages[start / bt->block_size];
        int in_page = start % bt->block_size;
        int count = bt->block_size - in_page;
        count = count > KEY_CHUNK ? KEY_CHUNK : count;
        count = count > max_limit - start ? max_limit - start : count;
        int ahead = start + PREFETCH_KEYS, ahead_end = ahead + count;
        prefetch_keys(bt, pages, ahead < max_limit ? ahead : max_limit, ahead_end < max_limit ? ahead_end : max_limit,
                      h0);
        int64_t k_stride, v_stride;
        const float *keys = chunk_rows(bt, bt->k, page, in_page, count, h0, kbuf, &k_stride);
        const float *values = chunk_rows(bt, bt->v, page, in_page, count, h0, vbuf, &v_stride);
        for (int r = 0; r < rows; r++) {
            int valid = limit[r] - start;
            valid = valid > count ? count : valid;
            if (valid <= 0)
                continue;
            float scores[LANES];
            store(scores, chunk_scores(q[r], keys + offset[r], k_stride, count, valid, D));
            float chunk_max = NO_SCORE;
#pragma omp simd reduction(max : chunk_max)
            for (int j = 0; j < LANES; j++)
                chunk_max = scores[j] > chunk_max ? scores[j] : chunk_max;
            float new_max = chunk_max > row_max[r] ? chunk_max : row_max[r];
            float correction = exp_nonpositive(row_max[r] - new_max), sum = 0.0f;
#pragma omp simd reduction(+ : sum)
            for (int j = 0; j < LANES; j++) {
                scores[j] = j < valid ? exp_nonpositive(scores[j] - new_max) : 0.0f;
                sum += scores[j];
            }
            row_sum[r] = row_sum[r] * correction + sum;
            row_max[r] = new_max;
            float *restrict a = acc[r];
            if (correction != 1.0f) {
#pragma omp simd
                for (int d = 0; d < D; d++)
                    a[d] *= correction;
            }
            add_weighted_values(a, scores, values + offset[r], v_stride, valid, D);
        }
        start += count;
    }
    for (int r = 0; r < rows; r++) {
        int i = (first_row + r) / group_rows, head = h0 * G + (first_row + r) % group_rows;
        float *dst = bt->out + ((int64_t)(q0 + i) * bt->num_heads + head) * D;
        float inverse = row_sum[r] > 0.0f ? 1.0f / row_sum[r] : 0.0f;
        for (int d = 0; d < D; d++)
            dst[d] = acc[r][d] * inverse;
    }
}

#if defined(ATTN_PTHREADS)
typedef struct {
    const Batch *batch;
    int64_t num_items;
    int64_t next; /* taken with __atomic_fetch_add */
} Queue;

static void *drain(void *arg) {
    Queue *queue = arg;
    for (int64_t item; (item = __atomic_fetch_add(&queue->next, 1, __ATOMIC_RELAXED)) < queue->num_items;)
        run_item(queue->batch, item);
    return NULL;
}
#endif

static void run_items(const Batch *bt, int64_t num_items, int num_threads) {
#if defined(ATTN_PTHREADS)
    Queue queue = {bt, num_items, 0};
    pthread_t threads[256];
    int started = 0;
    for (int t = 1; t < num_threads && t < 256 && t < num_items; t++)
        started += pthread_create(&threads[started], NULL, drain, &queue) == 0;
    drain(&queue);
    for (int t = 0; t < started; t++)
        pthread_join(threads[t], NULL);
#elif defined(ATTN_SERIAL)
    (void)num_threads;
    for (int64_t item = 0; item < num_items; item++)
        run_item(bt, item);
#else
    int threads = num_items < num_threads ? (int)num_items : num_threads;
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads) if (threads > 1)
    for (int64_t item = 0; item < num_items; item++)
        run_item(bt, item);
#endif
}

/* Attention of every query row; returns 0, or -1 when the work list could not be allocated. */
int attention_cpu(const float *q, int64_t q_token_stride, const void *k, const void *v, int bf16, int block_size,
                  int num_heads, int num_kv_heads, int head_dim, const int32_t *query_start_loc,
                  const int32_t *seq_lens, const int32_t *block_table, int64_t table_stride, int num_reqs,
                  float scale, float *out, int num_threads) {
    int64_t *tile_start = malloc(sizeof(int64_t) * (num_reqs + 1));
    if (tile_start == NULL)
        return -1;
    /* one KV head per item only where whole requests would leave threads idle */
    int group_heads = num_threads > 1 && num_reqs < 4 * num_threads ? 1 : num_kv_heads;
    int groups = num_kv_heads / group_heads, group_rows = group_heads * (num_heads / num_kv_heads);
    tile_start[0] = 0;
    for (int b = 0; b < num_reqs; b++) {
        int rows = (query_start_loc[b + 1] - query_start_loc[b]) * group_rows;
        tile_start[b + 1] = tile_start[b] + (int64_t)groups * ((rows + TILE_ROWS - 1) / TILE_ROWS);
    }
    Batch batch = {q, q_token_stride, k, v, bf16, block_size, num_heads, num_kv_heads, head_dim, query_start_loc,
                   seq_lens, block_table, table_stride, scale, out, tile_start, num_reqs, group_heads};
    run_items(&batch, tile_start[num_reqs], num_threads);
    free(tile_start);
    return 0;
}
