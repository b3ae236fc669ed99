/* Paged attention of a flat batch (prefill chunks and decodes mixed) on CPU, reading K/V pages where they lie.
 *
 * Layout (cpu_kernel.py checks it): queries [T, Hq, D] fp32 with unit head and dim strides; the cache of one layer
 * [2, pages, block_size, Hkv, D] fp32 or bf16, contiguous; out [T, Hq, D] fp32 contiguous. Request b owns query rows
 * query_start_loc[b] .. query_start_loc[b + 1] - 1, sits at context length seq_lens[b] after this step, and its
 * pages are block_table[b, 0 ..]. Query i of request b is at position seq_len - q_len + i and sees keys 0 .. that
 * position. A request with seq_len 0 (a padded row) reads nothing and gets zeros.
 *
 * Work: one item = one KV head of one request and a tile of up to TILE_ROWS query rows, a row being (query, one
 * of the G query heads that share the KV head); the G heads of a query are adjacent rows, so one load of a key or
 * value serves all of them (GQA). Each row keeps an fp32 online softmax (running max, sum, weighted values) over
 * chunks of up to KEY_CHUNK keys of one page. Items run on `num_threads` threads: OpenMP (the runtime torch
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

#define TILE_ROWS 16
#define KEY_CHUNK 32
#define MAX_HEAD_DIM 256
#define NO_SCORE -3.0e38f

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

static inline float dot(const float *restrict a, const float *restrict b, int n) {
    float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
    for (int d = 0; d < n; d++)
        sum += a[d] * b[d];
    return sum;
}

/* Rows of `count` keys (or values) of one KV head starting at token `first` of `page`, as fp32 rows `stride`
 * apart: the cache itself for fp32, else converted into `scratch` [KEY_CHUNK, head_dim]. */
static const float *chunk_rows(const Batch *bt, const void *plane, int32_t page, int first, int count, int h,
                               float *scratch, int64_t *stride) {
    int64_t token_stride = (int64_t)bt->num_kv_heads * bt->head_dim;
    int64_t offset = ((int64_t)page * bt->block_size + first) * token_stride + (int64_t)h * bt->head_dim;
    if (!bt->bf16) {
        *stride = token_stride;
        return (const float *)plane + offset;
    }
    const uint16_t *src = (const uint16_t *)plane + offset;
    for (int j = 0; j < count; j++) {
        uint32_t *dst = (uint32_t *)(scratch + (int64_t)j * bt->head_dim);
        const uint16_t *row = src + j * token_stride;
        for (int d = 0; d < bt->head_dim; d++)
            dst[d] = (uint32_t)row[d] << 16;
    }
    *stride = bt->head_dim;
    return scratch;
}

/* Ask for the cache lines of `count` keys and values of one KV head from token `first` of `page` (the next chunk,
 * while this one is computed: pages are scattered, so the hardware prefetchers cannot guess them). */
static void prefetch_chunk(const Batch *bt, int32_t page, int first, int count, int h) {
    int64_t token_stride = (int64_t)bt->num_kv_heads * bt->head_dim;
    int64_t offset = ((int64_t)page * bt->block_size + first) * token_stride + (int64_t)h * bt->head_dim;
    int element = bt->bf16 ? 2 : 4;
    const char *k = (const char *)bt->k + offset * element, *v = (const char *)bt->v + offset * element;
    for (int j = 0; j < count; j++)
        for (int line = 0; line < bt->head_dim * element; line += 64) {
            __builtin_prefetch(k + j * token_stride * element + line);
            __builtin_prefetch(v + j * token_stride * element + line);
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
    int64_t tiles_per_head = (bt->tile_start[b + 1] - bt->tile_start[b]) / bt->num_kv_heads;
    int64_t local = item - bt->tile_start[b];
    int h = (int)(local / tiles_per_head), first_row = (int)(local % tiles_per_head) * TILE_ROWS;
    int q0 = bt->query_start_loc[b], q_len = bt->query_start_loc[b + 1] - q0, seq_len = bt->seq_lens[b];
    int rows = q_len * G - first_row < TILE_ROWS ? q_len * G - first_row : TILE_ROWS;
    int context = seq_len - q_len;

    float q[TILE_ROWS][MAX_HEAD_DIM], acc[TILE_ROWS][MAX_HEAD_DIM], scores[KEY_CHUNK];
    float kbuf[KEY_CHUNK * MAX_HEAD_DIM], vbuf[KEY_CHUNK * MAX_HEAD_DIM];
    float row_max[TILE_ROWS], row_sum[TILE_ROWS];
    int limit[TILE_ROWS]; /* keys each row sees */
    int max_limit = 0;
    for (int r = 0; r < rows; r++) {
        int i = (first_row + r) / G, g = (first_row + r) % G;
        const float *src = bt->q + (int64_t)(q0 + i) * bt->q_token_stride + (int64_t)(h * G + g) * D;
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
    for (int start = 0; start < max_limit;) {
        int32_t page = pages[start / bt->block_size];
        int in_page = start % bt->block_size;
        int count = bt->block_size - in_page;
        count = count > KEY_CHUNK ? KEY_CHUNK : count;
        count = count > max_limit - start ? max_limit - start : count;
        int next = start + count;
        if (next < max_limit) {
            int next_count = bt->block_size - next % bt->block_size;
            next_count = next_count > KEY_CHUNK ? KEY_CHUNK : next_count;
            next_count = next_count > max_limit - next ? max_limit - next : next_count;
            prefetch_chunk(bt, pages[next / bt->block_size], next % bt->block_size, next_count, h);
        }
        int64_t k_stride, v_stride;
        const float *keys = chunk_rows(bt, bt->k, page, in_page, count, h, kbuf, &k_stride);
        const float *values = chunk_rows(bt, bt->v, page, in_page, count, h, vbuf, &v_stride);
        for (int r = 0; r < rows; r++) {
            int valid = limit[r] - start;
            valid = valid > count ? count : valid;
            if (valid <= 0)
                continue;
            float chunk_max = NO_SCORE;
            for (int j = 0; j < valid; j++) {
                scores[j] = dot(q[r], keys + j * k_stride, D);
                chunk_max = scores[j] > chunk_max ? scores[j] : chunk_max;
            }
            float new_max = chunk_max > row_max[r] ? chunk_max : row_max[r];
            float correction = exp_nonpositive(row_max[r] - new_max), sum = 0.0f;
#pragma omp simd reduction(+ : sum)
            for (int j = 0; j < valid; j++) {
                scores[j] = exp_nonpositive(scores[j] - new_max);
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
            for (int j = 0; j < valid; j++) {
                const float *restrict value = values + j * v_stride;
                float weight = scores[j];
#pragma omp simd
                for (int d = 0; d < D; d++)
                    a[d] += weight * value[d];
            }
        }
        start += count;
    }
    for (int r = 0; r < rows; r++) {
        int i = (first_row + r) / G, g = (first_row + r) % G;
        float *dst = bt->out + ((int64_t)(q0 + i) * bt->num_heads + h * G + g) * D;
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
    int G = num_heads / num_kv_heads;
    tile_start[0] = 0;
    for (int b = 0; b < num_reqs; b++) {
        int rows = (query_start_loc[b + 1] - query_start_loc[b]) * G;
        tile_start[b + 1] = tile_start[b] + (int64_t)num_kv_heads * ((rows + TILE_ROWS - 1) / TILE_ROWS);
    }
    Batch batch = {q, q_token_stride, k, v, bf16, block_size, num_heads, num_kv_heads, head_dim, query_start_loc,
                   seq_lens, block_table, table_stride, scale, out, tile_start, num_reqs};
    run_items(&batch, tile_start[num_reqs], num_threads);
    free(tile_start);
    return 0;
}
