/* Greedy tokens straight from the lm_head on CPU: for each row b of hidden [B, H], the vocabulary id v whose
 * logit dot(hidden[b], weight[v]) is largest, without ever writing the [B, V] logits.
 *
 * Layout (greedy_kernel.py checks it): hidden [B, H] fp32 contiguous; weight [V, H] fp32 or bf16 with unit stride
 * along H and `row_stride` elements between vocabulary rows; out: best value (fp32) and id (int64) per row.
 * With `round_bf16` each logit is rounded to bfloat16 (to nearest, ties to even) before it is compared, as the
 * logits of a bf16 lm_head are. Ties keep the lower id (the first maximum, as torch's argmax/max); a NaN logit is
 * never chosen.
 *
 * With a `mask` [B, mask_words] of packed allowed tokens (bit v & 31 of word v >> 5 of row b set when row b may take
 * id v, as llguidance writes them; mask_words * 32 >= V) only allowed ids compete, so the result is the first
 * maximum of the masked logits (-inf where forbidden); a row that allows nothing gets id 0, as argmax over -inf.
 * Work that no row needs is skipped: a tile every row forbids (not even converted from bf16), and in the lanes loop
 * a step of KV vocabulary rows that every batch row of its block forbids.
 *
 * With `top_k` (>= 1, no mask) each row gets its top_k best ids instead, in the order (value descending, id
 * ascending): the first is the argmax above, and the first of them a grammar allows is the masked argmax whenever
 * one is allowed (structured output checks them instead of filling a mask). Each lane keeps a sorted list and its
 * last value as a threshold; a step's candidates are compared with it at once (their maximum), so that the lists
 * are touched only by the few candidates that enter them. A list slot never filled has value -inf and id -1.
 * `path_rows` (0: num_rows) picks the loop as for a batch of that many rows, so that rows recomputed apart (the
 * few whose checked ids a grammar all rejects) get the very logits they had in their batch.
 *
 * Work: the vocabulary is split into one contiguous range per thread, each walked in tiles of TILE_VOCAB rows
 * (bf16 tiles converted to fp32 once into a per-thread scratch, which then stays in L1/L2 while every batch row
 * meets it). Inside a tile two loops compete:
 * - rows in lanes (B >= LANES_FROM_ROWS): the hidden rows are transposed once to [H, B padded to LANES], so that
 *   one vector holds one hidden element of LANES batch rows; each weight element is broadcast and multiplied into
 *   KV x NB accumulators (KV vocabulary rows x NB vectors of batch rows), and a running maximum and its id are
 *   kept per lane with vector compares (skipped for a step none of whose candidates is above it): no horizontal
 *   sums. Without a mask, the next tile's rows are prefetched into L2 while a tile is computed, a line of each of
 *   the step's KV rows every 16 hidden elements: at 16 rows the FMAs and the weight's memory stream take about as
 *   long each, and without it they followed each other instead of overlapping;
 * - ids in lanes (fewer rows): groups of LANES vocabulary rows; per batch row, one vector of partial sums per id
 *   (hidden in blocks of HIDDEN_BLOCK, so that a group's rows stay in L1 while every batch row meets them), folded
 *   into one vector that holds the group's LANES logits, one per lane; a running maximum and its id are kept per
 *   lane, and the lanes are merged once per call. With `prefetch` the weight rows a tile ahead are asked for while
 *   a group is computed (off where the weight lies on huge pages: there it measured no better).
 * Threads are OpenMP's (the runtime torch itself loaded when it is libgomp), at most `num_threads`; the ranges'
 * winners are merged in vocabulary order, so the result does not depend on the number of threads. */

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include <omp.h>

#define LANES 16
#define TILE_VOCAB 64
#define KV 8 /* vocabulary rows per micro-kernel step */
#define NB 3 /* vectors of batch rows per micro-kernel step: KV x NB accumulators in registers */
#define LANES_FROM_ROWS 8
#define HIDDEN_BLOCK 256 /* ids in lanes: hidden elements per pass over a group's LANES rows (16 KB of fp32) */
#define PREFETCH_AHEAD TILE_VOCAB /* ids in lanes: vocabulary rows between a group and the rows it prefetches */
#define LINE 64
#define TOP_K_MAX 64
#define ALIGN 64

typedef float vfloat __attribute__((vector_size(LANES * sizeof(float))));
typedef int32_t vint __attribute__((vector_size(LANES * sizeof(int32_t))));
typedef uint32_t vuint __attribute__((vector_size(LANES * sizeof(uint32_t))));
typedef float vfloat_unaligned __attribute__((vector_size(LANES * sizeof(float)), aligned(4), may_alias));

typedef struct {
    const float *hidden;
    int64_t num_rows, hidden_size;
    const void *weight;
    int64_t vocab, row_stride;
    int bf16, round_bf16, prefetch;
    const uint32_t *mask; /* [B, mask_words] allowed ids, or NULL: every id allowed */
    int64_t mask_words;
    int top_k;        /* 0: the best id per row; else the top_k best (no mask) */
    int64_t path_rows; /* the batch size that picks the loop (rows or ids in lanes) */
} Problem;

/* Per-lane lists of the best candidates (top-k): list of lane j of vector i at values / ids + i * k * LANES + j,
 * entry r at stride LANES, sorted by value descending then id ascending; thresh[i][j]: the list's last value. */
typedef struct {
    float *values;
    int32_t *ids;
    vfloat *thresh;
    int k;
} TopLists;

/* The mask of one tile in lanes: bit v of lo (v < 32) or hi (v - 32) of lane j of vector i is whether batch row
 * 16i+j allows id v0 + v; `any` per vector: the 64 bits of its lanes or-ed. */
typedef struct {
    const vuint *lo, *hi;
    const uint64_t *any;
} LaneMask;

static inline float bf16_to_float(uint16_t x) {
    union { uint32_t i; float f; } bits = {.i = (uint32_t)x << 16};
    return bits.f;
}

static inline float round_to_bf16(float x) {
    union { float f; uint32_t i; } bits = {.f = x};
    bits.i = (bits.i + 0x7FFFu + ((bits.i >> 16) & 1u)) & 0xFFFF0000u;
    return bits.f;
}

static inline vfloat round_to_bf16_lanes(vfloat x) {
    vuint bits = (vuint)x;
    return (vfloat)((bits + 0x7FFFu + ((bits >> 16) & 1u)) & 0xFFFF0000u);
}

/* The fp32 rows v0 .. v0 + count - 1 of the weight, `*stride` elements apart: the weight itself for fp32, else
 * converted into scratch [TILE_VOCAB, H]. */
static const float *tile_rows(const Problem *p, int64_t v0, int64_t count, float *scratch, int64_t *stride) {
    if (!p->bf16) {
        *stride = p->row_stride;
        return (const float *)p->weight + v0 * p->row_stride;
    }
    const uint16_t *src = (const uint16_t *)p->weight + v0 * p->row_stride;
    for (int64_t v = 0; v < count; v++) {
        float *dst = scratch + v * p->hidden_size;
        const uint16_t *row = src + v * p->row_stride;
#pragma omp simd
        for (int64_t h = 0; h < p->hidden_size; h++)
            dst[h] = bf16_to_float(row[h]);
    }
    *stride = p->hidden_size;
    return scratch;
}

/* The allowed ids [v0, v0 + 64) of row b (v0 a multiple of 64, so words v0 >> 5 and the next): bit v is id v0 + v. */
static inline uint64_t tile_bits(const Problem *p, int64_t b, int64_t v0) {
    const uint32_t *row = p->mask + b * p->mask_words;
    int64_t w = v0 >> 5;
    uint64_t hi = w + 1 < p->mask_words ? row[w + 1] : 0;
    return row[w] | hi << 32;
}

/* The allowed ids of tile v0 of every row, or-ed. */
static uint64_t rows_bits(const Problem *p, int64_t v0) {
    uint64_t all = 0;
    for (int64_t b = 0; b < p->num_rows; b++)
        all |= tile_bits(p, b, v0);
    return all;
}

/* The mask of tiles [lo, lo + 64 * num_tiles) in lanes, built once per call and per thread before any weight is
 * read (gathered tile by tile between weight tiles, the 64 rows' words would miss the cache every time): tile t's
 * lo vectors at words + 2t * num_vectors, its hi vectors right after, its `any` at any + t * (num_vectors + 1),
 * and at any[t * (num_vectors + 1) + num_vectors] the bits of every row or-ed. Padding lanes allow nothing. */
static void lane_masks(const Problem *p, int64_t lo, int64_t num_tiles, int64_t num_vectors, vuint *words,
                       uint64_t *any) {
    memset(words, 0, (size_t)(2 * num_tiles * num_vectors) * sizeof(vuint));
    memset(any, 0, (size_t)(num_tiles * (num_vectors + 1)) * sizeof(uint64_t));
    for (int64_t t = 0; t < num_tiles; t++) { /* the 64 rows' cache lines serve 8 tiles in turn */
        int64_t w = (lo >> 5) + 2 * t;
        vuint *low = words + 2 * t * num_vectors, *high = low + num_vectors;
        uint64_t *tile_any = any + t * (num_vectors + 1);
        for (int64_t b = 0; b < p->num_rows; b++) {
            const uint32_t *row = p->mask + b * p->mask_words;
            uint64_t bits = row[w] | (w + 1 < p->mask_words ? (uint64_t)row[w + 1] << 32 : 0);
            low[b / LANES][b % LANES] = (uint32_t)bits;
            high[b / LANES][b % LANES] = (uint32_t)(bits >> 32);
            tile_any[b / LANES] |= bits;
        }
        for (int64_t i = 0; i < num_vectors; i++)
            tile_any[num_vectors] |= tile_any[i];
    }
}

/* Keep the larger of best/candidate per lane where ok (all bits set) allows it (the earlier id on ties: each lane's
 * candidates come in increasing id); id: the candidates' ids. A forbidden candidate is as one of -inf: it never wins. */
static inline void keep_max_ids(vfloat *best, vint *best_id, vfloat candidate, vint id, vint ok, int round_bf16) {
    if (round_bf16)
        candidate = round_to_bf16_lanes(candidate);
    vint better = (candidate > *best) & ok;
    *best = (vfloat)(((vint)candidate & better) | ((vint)*best & ~better));
    *best_id = (better & id) | (*best_id & ~better);
}

/* Whether some lane of m is set. */
static inline int any_lane(vint m) {
    uint64_t words[LANES / 2];
    memcpy(words, &m, sizeof(m));
    uint64_t all = 0;
    for (int i = 0; i < LANES / 2; i++)
        all |= words[i];
    return all != 0;
}

/* Enter candidate (id) into lane j's list of vector i where it beats the list's last value; `allowed` gates lanes
 * (all bits set: may enter). Equal values stay behind the ones entered before (lower ids: each lane's candidates
 * come in increasing id), a NaN never enters. */
static inline void keep_top(const TopLists *top, int64_t i, vfloat candidate, vint id, vint allowed, int round_bf16) {
    if (round_bf16)
        candidate = round_to_bf16_lanes(candidate);
    vint enter = (candidate > top->thresh[i]) & allowed;
    if (!any_lane(enter))
        return;
    int k = top->k;
    float *values = top->values + i * k * LANES;
    int32_t *ids = top->ids + i * k * LANES;
    for (int j = 0; j < LANES; j++) {
        if (!enter[j])
            continue;
        int r = k - 1;
        for (; r > 0 && values[(r - 1) * LANES + j] < candidate[j]; r--) {
            values[r * LANES + j] = values[(r - 1) * LANES + j];
            ids[r * LANES + j] = ids[(r - 1) * LANES + j];
        }
        values[r * LANES + j] = candidate[j];
        ids[r * LANES + j] = id[j];
        top->thresh[i][j] = values[(k - 1) * LANES + j];
    }
}

/* The larger of a and b per lane, never a NaN of a (b: a running maximum that starts finite or -inf). */
static inline vfloat max_lanes(vfloat a, vfloat b) {
    vint larger = a > b;
    return (vfloat)(((vint)a & larger) | ((vint)b & ~larger));
}

/* The lanes of batch vector b whose rows allow id r of the tile (r < 64), as all bits set. */
static inline vint allowed_lanes(const LaneMask *lm, int64_t r, int64_t b) {
    const vuint *words = r < 32 ? lm->lo : lm->hi;
    return (vint)((words[b] & (1u << (r & 31))) != 0);
}

/* The weight rows of the next tile, in the weight's own dtype, for the rows in lanes loop to prefetch while it
 * computes this one: rows [0, count) at `rows`, `stride` bytes apart, `elem` bytes per element. */
typedef struct {
    const char *rows;
    int64_t stride, count, elem;
} Ahead;

/* Rows in lanes, one block: vocabulary rows [v, v + kv) of w (ids v0 + v ..) against the nb vectors of batch rows
 * starting at vector b of the transposed hidden ht [H, num_vectors], each id competing only in the lanes of lm
 * that allow it (lm NULL: in all); kv and nb are constants where it is inlined. With `ahead`, the lines of the next
 * tile's rows [v, v + kv) are asked for, a line per row every LINE / 4 hidden elements, so that the memory stream
 * overlaps the FMAs instead of following them. */
static inline __attribute__((always_inline)) void lanes_block(const Problem *p, const float *w, int64_t stride,
                                                              int64_t v, int kv, int64_t v0, const vfloat *ht,
                                                              int64_t num_vectors, int64_t b, int nb,
                                                              const LaneMask *lm, const Ahead *ahead,
                                                              vfloat *best, vint *best_id, const TopLists *top) {
    vfloat acc[KV][NB];
    for (int k = 0; k < kv; k++)
        for (int j = 0; j < nb; j++)
            acc[k][j] = (vfloat){0};
    for (int64_t h0 = 0; h0 < p->hidden_size; h0 += LINE / (int64_t)sizeof(float)) {
        int64_t end = h0 + LINE / (int64_t)sizeof(float) < p->hidden_size ? h0 + LINE / (int64_t)sizeof(float)
                                                                          : p->hidden_size;
        for (int k = 0; ahead && (h0 * ahead->elem) % LINE == 0 && k < kv && v + k < ahead->count; k++)
            __builtin_prefetch(ahead->rows + (v + k) * ahead->stride + h0 * ahead->elem, 0, 2); /* into L2 */
        for (int64_t h = h0; h < end; h++) {
            vfloat x[NB];
            for (int j = 0; j < nb; j++)
                x[j] = ht[h * num_vectors + b + j];
            for (int k = 0; k < kv; k++) {
                float wk = w[(v + k) * stride + h];
                for (int j = 0; j < nb; j++)
                    acc[k][j] += wk * x[j];
            }
        }
    }
    if (top) { /* the step's maximum per lane against the lists' thresholds first: most steps stop there */
        for (int j = 0; j < nb; j++) {
            vfloat most = (vfloat){0} - __builtin_inff(); /* not acc[0]: a NaN there would hide the step */
            for (int k = 0; k < kv; k++)
                most = max_lanes(acc[k][j], most);
            if (p->round_bf16)
                most = round_to_bf16_lanes(most);
            if (!any_lane(most > top->thresh[b + j]))
                continue;
            for (int k = 0; k < kv; k++)
                keep_top(top, b + j, acc[k][j], (vint){0} + (int32_t)(v0 + v + k), (vint){0} - 1, p->round_bf16);
        }
        return;
    }
    vint beats = (vint){0}; /* a candidate that is not above its lane's maximum (even rounded) changes nothing */
    for (int k = 0; k < kv; k++)
        for (int j = 0; j < nb; j++)
            beats |= acc[k][j] > best[b + j];
    if (!any_lane(beats))
        return;
    for (int k = 0; k < kv; k++) /* in increasing id, so that ties keep the first */
        for (int j = 0; j < nb; j++) {
            vint ok = lm ? allowed_lanes(lm, v + k, b + j) : (vint){0} - 1;
            keep_max_ids(&best[b + j], &best_id[b + j], acc[k][j], (vint){0} + (int32_t)(v0 + v + k), ok,
                         p->round_bf16);
        }
}

/* Whether some batch row of vectors [b, b + nb) allows one of the tile's ids [v, v + kv) (always without a mask). */
static inline int block_needed(const LaneMask *lm, int64_t b, int nb, int64_t v, int kv) {
    if (!lm)
        return 1;
    uint64_t bits = 0;
    for (int j = 0; j < nb; j++)
        bits |= lm->any[b + j];
    return ((bits >> v) & ((1ull << kv) - 1)) != 0;
}

/* Rows in lanes: tile rows [0, count) of w (ids v0 ..) against the transposed hidden ht [H, num_vectors], in
 * blocks of NB vectors of batch rows (a rest of 4 as 2 + 2, of 2 or 1 alone); steps no row of a block allows are
 * skipped. With `top`, its lists take the candidates instead of best / best_id. */
static void tile_lanes(const Problem *p, const float *w, int64_t stride, int64_t count, int64_t v0,
                       const vfloat *ht, int64_t num_vectors, const LaneMask *lm, const Ahead *ahead,
                       vfloat *best, vint *best_id, const TopLists *top) {
    for (int64_t b = 0; b < num_vectors;) {
        int64_t rest = num_vectors - b, v = 0;
        const Ahead *first = b == 0 ? ahead : NULL; /* the first block of batch rows prefetches for all */
        int nb = rest >= NB && rest != 4 ? NB : rest >= 2 ? 2 : 1;
        if (nb == NB) {
            for (; v + KV <= count; v += KV)
                if (block_needed(lm, b, NB, v, KV))
                    lanes_block(p, w, stride, v, KV, v0, ht, num_vectors, b, NB, lm, first, best, best_id, top);
            for (; v < count; v++)
                if (block_needed(lm, b, NB, v, 1))
                    lanes_block(p, w, stride, v, 1, v0, ht, num_vectors, b, NB, lm, first, best, best_id, top);
        } else if (nb == 2) {
            for (; v + KV <= count; v += KV)
                if (block_needed(lm, b, 2, v, KV))
                    lanes_block(p, w, stride, v, KV, v0, ht, num_vectors, b, 2, lm, first, best, best_id, top);
            for (; v < count; v++)
                if (block_needed(lm, b, 2, v, 1))
                    lanes_block(p, w, stride, v, 1, v0, ht, num_vectors, b, 2, lm, first, best, best_id, top);
        } else {
            for (; v + KV <= count; v += KV)
                if (block_needed(lm, b, 1, v, KV))
                    lanes_block(p, w, stride, v, KV, v0, ht, num_vectors, b, 1, lm, first, best, best_id, top);
            for (; v < count; v++)
                if (block_needed(lm, b, 1, v, 1))
                    lanes_block(p, w, stride, v, 1, v0, ht, num_vectors, b, 1, lm, first, best, best_id, top);
        }
        b += nb;
    }
}

/* Sixteen vectors of partial sums folded into one: lane `fold_order[k]` of the result holds the sum of the lanes of
 * acc[k] (each step adds the halves of two vectors into one). */
static inline vfloat fold_lanes(const vfloat acc[LANES]) {
    const vint half_lo = {0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23};
    const vint half_hi = {8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31};
    const vint quarter_lo = {0, 1, 2, 3, 16, 17, 18, 19, 8, 9, 10, 11, 24, 25, 26, 27};
    const vint quarter_hi = {4, 5, 6, 7, 20, 21, 22, 23, 12, 13, 14, 15, 28, 29, 30, 31};
    const vint pair_lo = {0, 1, 16, 17, 4, 5, 20, 21, 8, 9, 24, 25, 12, 13, 28, 29};
    const vint pair_hi = {2, 3, 18, 19, 6, 7, 22, 23, 10, 11, 26, 27, 14, 15, 30, 31};
    const vint single_lo = {0, 16, 2, 18, 4, 20, 6, 22, 8, 24, 10, 26, 12, 28, 14, 30};
    const vint single_hi = {1, 17, 3, 19, 5, 21, 7, 23, 9, 25, 11, 27, 13, 29, 15, 31};
    vfloat s8[8], s4[4], s2[2];
    for (int i = 0; i < 8; i++)
        s8[i] = __builtin_shuffle(acc[2 * i], acc[2 * i + 1], half_lo) +
                __builtin_shuffle(acc[2 * i], acc[2 * i + 1], half_hi);
    for (int i = 0; i < 4; i++)
        s4[i] = __builtin_shuffle(s8[2 * i], s8[2 * i + 1], quarter_lo) +
                __builtin_shuffle(s8[2 * i], s8[2 * i + 1], quarter_hi);
    for (int i = 0; i < 2; i++)
        s2[i] = __builtin_shuffle(s4[2 * i], s4[2 * i + 1], pair_lo) +
                __builtin_shuffle(s4[2 * i], s4[2 * i + 1], pair_hi);
    return __builtin_shuffle(s2[0], s2[1], single_lo) + __builtin_shuffle(s2[0], s2[1], single_hi);
}

/* The id offset of each lane after fold_lanes: fold_lanes of vectors whose lanes sum to k. */
static vint fold_order(void) {
    vfloat acc[LANES];
    for (int k = 0; k < LANES; k++)
        for (int j = 0; j < LANES; j++)
            acc[k][j] = j == 0 ? (float)k : 0.0f;
    vfloat order = fold_lanes(acc);
    vint ids;
    for (int j = 0; j < LANES; j++)
        ids[j] = (int32_t)order[j];
    return ids;
}

/* acc[k] += the products of rows w + k * stride and x over hidden elements [0, n) (acc zeroed first when `fresh`);
 * elements past the last full vector go to lane 0. */
static inline __attribute__((always_inline)) void group_dots(const float *w, int64_t stride, const float *x, int64_t n,
                                                             vfloat acc[LANES], int fresh) {
    vfloat a[LANES];
    for (int k = 0; k < LANES; k++)
        a[k] = fresh ? (vfloat){0} : acc[k];
    int64_t h = 0;
    for (; h + LANES <= n; h += LANES) {
        vfloat xv = *(const vfloat_unaligned *)(x + h);
        for (int k = 0; k < LANES; k++)
            a[k] += *(const vfloat_unaligned *)(w + k * stride + h) * xv;
    }
    for (; h < n; h++)
        for (int k = 0; k < LANES; k++)
            a[k][0] += w[k * stride + h] * x[h];
    for (int k = 0; k < LANES; k++)
        acc[k] = a[k];
}

/* Ask for the weight rows [v, v + count) (in the weight's own dtype) to be brought into the cache. */
static inline void prefetch_rows(const Problem *p, int64_t v, int64_t count) {
    int64_t size = p->bf16 ? 2 : 4, bytes = p->hidden_size * size;
    const char *base = (const char *)p->weight;
    for (int64_t r = v; r < v + count && r < p->vocab; r++)
        for (int64_t offset = 0; offset < bytes; offset += LINE)
            __builtin_prefetch(base + (r * p->row_stride) * size + offset, 0, 3);
}

/* Ids in lanes: tile rows [0, count) of w (ids v0 ..) against each batch row that allows them, in groups of LANES
 * rows (a last group of fewer rows copied into pad [LANES, H] after zeros, its missing lanes never winning);
 * best / best_id [B]: per batch row, the running maximum of each lane and its id (or `top`'s lists, one vector of
 * lanes per row). acc: [B, LANES] scratch. */
static void tile_ids(const Problem *p, const float *w, int64_t stride, int64_t count, int64_t v0, vint order,
                     float *pad, vfloat *acc, vfloat *best, vint *best_id, const TopLists *top) {
    int64_t B = p->num_rows, H = p->hidden_size;
    for (int64_t g = 0; g < count; g += LANES) {
        int64_t n = count - g < LANES ? count - g : LANES, group_stride = stride;
        const float *rows = w + g * stride;
        if (p->prefetch)
            prefetch_rows(p, v0 + g + PREFETCH_AHEAD, LANES);
        if (n < LANES) {
            memset(pad, 0, (size_t)(LANES * H) * sizeof(float));
            for (int64_t k = 0; k < n; k++)
                memcpy(pad + k * H, rows + k * stride, (size_t)H * sizeof(float));
            rows = pad;
            group_stride = H;
        }
        uint32_t wanted[LANES_FROM_ROWS];
        for (int64_t b = 0; b < B; b++) {
            uint32_t bits = n < LANES ? (1u << n) - 1u : 0xFFFFu;
            int64_t id = v0 + g;
            if (p->mask)
                bits &= p->mask[b * p->mask_words + (id >> 5)] >> (id & 31);
            wanted[b] = bits;
        }
        for (int64_t h0 = 0; h0 < H; h0 += HIDDEN_BLOCK) {
            int64_t n_h = H - h0 < HIDDEN_BLOCK ? H - h0 : HIDDEN_BLOCK;
            for (int64_t b = 0; b < B; b++)
                if (wanted[b])
                    group_dots(rows + h0, group_stride, p->hidden + b * H + h0, n_h, acc + b * LANES, h0 == 0);
        }
        vint ids = order + (int32_t)(v0 + g);
        for (int64_t b = 0; b < B; b++) {
            if (!wanted[b])
                continue;
            vfloat logits = fold_lanes(acc + b * LANES);
            vint ok = -(vint)(((vuint){0} + wanted[b]) >> (vuint)order & 1u);
            if (top)
                keep_top(top, b, logits, ids, ok, p->round_bf16);
            else
                keep_max_ids(&best[b], &best_id[b], logits, ids, ok, p->round_bf16);
        }
    }
}

/* This thread's scratch of at least `size` bytes, kept between calls (grown when too small; NULL when that fails):
 * the lane masks of 64 rows take 1.2 MB, and allocated afresh at every call their pages were faulted in and zeroed
 * by the OS each time. */
static __thread void *kept_scratch;
static __thread size_t kept_size;

static void *thread_buffer(size_t size) {
    if (size > kept_size) {
        free(kept_scratch);
        kept_scratch = aligned_alloc(ALIGN, (size + ALIGN - 1) / ALIGN * ALIGN);
        kept_size = kept_scratch ? size : 0;
    }
    return kept_scratch;
}

/* Whether entry (va, ia) comes before (vb, ib): the larger value, then the lower id. */
static inline int comes_first(float va, int64_t ia, float vb, int64_t ib) {
    return va > vb || (va == vb && ia < ib);
}

/* The k first entries of two lists of k in order (a and b), into out (which may be a). */
static void merge_two(int k, const float *a_value, const int64_t *a_id, const float *b_value, const int64_t *b_id,
                      float *out_value, int64_t *out_id) {
    float value[TOP_K_MAX];
    int64_t id[TOP_K_MAX];
    for (int r = 0, i = 0, j = 0; r < k; r++) {
        int take_a = !comes_first(b_value[j], b_id[j], a_value[i], a_id[i]);
        value[r] = take_a ? a_value[i] : b_value[j];
        id[r] = take_a ? a_id[i++] : b_id[j++];
    }
    memcpy(out_value, value, (size_t)k * sizeof(float));
    memcpy(out_id, id, (size_t)k * sizeof(int64_t));
}

/* One thread's vocabulary range [lo, hi): its best value and id per row into best / best_id [B] (with top_k: its
 * top_k best per row, in order, into [B, top_k]). Returns nonzero when scratch memory could not be allocated. */
static int run_range(const Problem *p, int64_t lo, int64_t hi, const vfloat *ht, vint order, float *best,
                     int64_t *best_id) {
    int64_t B = p->num_rows, H = p->hidden_size;
    int lanes = p->path_rows >= LANES_FROM_ROWS, k = p->top_k;
    int64_t num_vectors = (B + LANES - 1) / LANES;
    int64_t num_best = lanes ? num_vectors : B; /* rows in lanes: a lane per row; ids in lanes: a vector per row */
    float *scratch = NULL, *pad = NULL;
    vfloat *lane_best = NULL, *acc = NULL;
    vint *lane_id = NULL;
    vuint *mask_words = NULL;
    uint64_t *mask_any = NULL;
    TopLists lists = {NULL, NULL, NULL, k}, *top = NULL;
    int64_t range_tiles = (hi - lo + TILE_VOCAB - 1) / TILE_VOCAB;
    int status = 0;
    if (p->bf16 && !(scratch = aligned_alloc(ALIGN, (size_t)(TILE_VOCAB * H * sizeof(float) + ALIGN))))
        status = 1;
    if (!status) {
        lane_best = aligned_alloc(ALIGN, (size_t)num_best * sizeof(vfloat));
        lane_id = aligned_alloc(ALIGN, (size_t)num_best * sizeof(vint));
        status = !lane_best || !lane_id;
    }
    if (!lanes && !status) {
        pad = aligned_alloc(ALIGN, (size_t)(LANES * H * sizeof(float) + ALIGN));
        acc = aligned_alloc(ALIGN, (size_t)(B * LANES) * sizeof(vfloat));
        status = !pad || !acc;
    }
    if (k && !status) { /* the lanes' running maxima serve as the lists' thresholds */
        lists.values = malloc((size_t)(num_best * k * LANES) * sizeof(float));
        lists.ids = malloc((size_t)(num_best * k * LANES) * sizeof(int32_t));
        lists.thresh = lane_best;
        status = !lists.values || !lists.ids;
        for (int64_t i = 0; i < num_best * k * LANES && !status; i++) {
            lists.values[i] = -__builtin_inff();
            lists.ids[i] = -1;
        }
        top = &lists;
    }
    if (lanes && p->mask && !status && range_tiles > 0) {
        size_t words_size = (size_t)(2 * range_tiles * num_vectors) * sizeof(vuint);
        mask_words = thread_buffer(words_size + (size_t)(range_tiles * (num_vectors + 1)) * sizeof(uint64_t));
        mask_any = mask_words ? (uint64_t *)((char *)mask_words + words_size) : NULL;
        status = !mask_words;
        if (!status)
            lane_masks(p, lo, range_tiles, num_vectors, mask_words, mask_any);
    }
    for (int64_t i = 0; i < num_best && !status; i++) {
        lane_best[i] = (vfloat){0} - __builtin_inff();
        lane_id[i] = (vint){0} + (int32_t)(lo < hi ? lo : 0);
    }
    for (int64_t v0 = lo; v0 < hi && !status; v0 += TILE_VOCAB) {
        int64_t count = hi - v0 < TILE_VOCAB ? hi - v0 : TILE_VOCAB, stride;
        int64_t t = (v0 - lo) / TILE_VOCAB;
        LaneMask tile_mask, *lm = NULL;
        if (mask_words) {
            tile_mask = (LaneMask){mask_words + 2 * t * num_vectors, mask_words + (2 * t + 1) * num_vectors,
                                   mask_any + t * (num_vectors + 1)};
            lm = &tile_mask;
        }
        if (p->mask && !(lm ? lm->any[num_vectors] : rows_bits(p, v0)))
            continue; /* every row forbids the whole tile */
        const float *w = tile_rows(p, v0, count, scratch, &stride);
        int64_t next = v0 + TILE_VOCAB, elem = p->bf16 ? 2 : 4;
        Ahead ahead = {(const char *)p->weight + (next < hi ? next : v0) * p->row_stride * elem,
                       p->row_stride * elem, next < hi ? (hi - next < TILE_VOCAB ? hi - next : TILE_VOCAB) : 0, elem};
        if (lanes) /* unmasked: the next tile is prefetched (masked, it may well be skipped) */
            tile_lanes(p, w, stride, count, v0, ht, num_vectors, lm, lm ? NULL : &ahead, lane_best, lane_id, top);
        else
            tile_ids(p, w, stride, count, v0, order, pad, acc, lane_best, lane_id, top);
    }
    for (int64_t b = 0; b < B && !status && top; b++) { /* a lane's list, or the lists of a row's lanes merged */
        float *row_value = best + b * k;
        int64_t *row_id = best_id + b * k, lane_ids[TOP_K_MAX];
        float lane_values[TOP_K_MAX];
        int first = lanes ? (int)(b % LANES) : 0, last = lanes ? first : LANES - 1;
        const float *values = lists.values + (lanes ? b / LANES : b) * k * LANES;
        const int32_t *ids = lists.ids + (lanes ? b / LANES : b) * k * LANES;
        for (int j = first; j <= last; j++) {
            for (int r = 0; r < k; r++) {
                lane_values[r] = values[r * LANES + j];
                lane_ids[r] = ids[r * LANES + j];
            }
            if (j == first) {
                memcpy(row_value, lane_values, (size_t)k * sizeof(float));
                memcpy(row_id, lane_ids, (size_t)k * sizeof(int64_t));
            } else {
                merge_two(k, row_value, row_id, lane_values, lane_ids, row_value, row_id);
            }
        }
    }
    for (int64_t b = 0; b < B && !status && !top; b++) {
        if (lanes) {
            best[b] = lane_best[b / LANES][b % LANES];
            best_id[b] = lane_id[b / LANES][b % LANES];
            continue;
        }
        best[b] = lane_best[b][0]; /* the lanes merged: the largest value, the lowest id among equals */
        best_id[b] = lane_id[b][0];
        for (int j = 1; j < LANES; j++)
            if (lane_best[b][j] > best[b] || (lane_best[b][j] == best[b] && lane_id[b][j] < best_id[b])) {
                best[b] = lane_best[b][j];
                best_id[b] = lane_id[b][j];
            }
    }
    free(scratch);
    free(pad);
    free(acc);
    free(lane_best);
    free(lane_id);
    free(lists.values);
    free(lists.ids);
    return status;
}

int greedy_lm_head(const float *hidden, int64_t num_rows, int64_t hidden_size, const void *weight, int64_t vocab,
                   int64_t row_stride, int bf16, int round_bf16, int prefetch, const uint32_t *mask,
                   int64_t mask_words, int top_k, int64_t path_rows, float *out_value, int64_t *out_id,
                   int num_threads) {
    if (top_k < 0 || top_k > TOP_K_MAX || (top_k && mask))
        return 2;
    Problem p = {hidden, num_rows, hidden_size, weight, vocab, row_stride, bf16, round_bf16, prefetch, mask,
                 mask_words, top_k, path_rows > 0 ? path_rows : num_rows};
    vint order = fold_order();
    int64_t num_tiles = (vocab + TILE_VOCAB - 1) / TILE_VOCAB;
    int threads = num_threads < 1 ? 1 : num_threads;
    if (threads > num_tiles)
        threads = (int)num_tiles;
    int64_t num_vectors = (num_rows + LANES - 1) / LANES, per_row = top_k ? top_k : 1;
    int64_t per_thread = num_rows * per_row;
    vfloat *ht = NULL;
    float *values = malloc((size_t)(threads * per_thread) * sizeof(float));
    int64_t *ids = malloc((size_t)(threads * per_thread) * sizeof(int64_t));
    int status = !values || !ids;
    if (!status && p.path_rows >= LANES_FROM_ROWS) { /* hidden transposed: ht[h * num_vectors + i][j] = row 16i+j */
        ht = aligned_alloc(ALIGN, (size_t)(hidden_size * num_vectors) * sizeof(vfloat));
        status = !ht;
        if (ht) {
            memset(ht, 0, (size_t)(hidden_size * num_vectors) * sizeof(vfloat));
            for (int64_t b = 0; b < num_rows; b++)
                for (int64_t h = 0; h < hidden_size; h++)
                    ht[h * num_vectors + b / LANES][b % LANES] = hidden[b * hidden_size + h];
        }
    }
    int failed = 0, team = threads;
    if (!status) {
#pragma omp parallel num_threads(threads) if (threads > 1) reduction(| : failed)
        {
            int t = omp_get_thread_num(), n = omp_get_num_threads();
            if (t == 0)
                team = n; /* OpenMP may grant fewer threads than asked */
            int64_t lo = num_tiles * t / n * TILE_VOCAB, hi = num_tiles * (t + 1) / n * TILE_VOCAB;
            if (hi > vocab)
                hi = vocab;
            failed |= run_range(&p, lo, hi, ht, order, values + t * per_thread, ids + t * per_thread);
        }
        /* ranges in vocabulary order; a later range wins only with a strictly larger value */
        for (int64_t b = 0; b < num_rows && top_k; b++) {
            memcpy(out_value + b * top_k, values + b * top_k, (size_t)top_k * sizeof(float));
            memcpy(out_id + b * top_k, ids + b * top_k, (size_t)top_k * sizeof(int64_t));
            for (int t = 1; t < team; t++)
                merge_two(top_k, out_value + b * top_k, out_id + b * top_k, values + t * per_thread + b * top_k,
                          ids + t * per_thread + b * top_k, out_value + b * top_k, out_id + b * top_k);
        }
        for (int64_t b = 0; b < num_rows && !top_k; b++) {
            float best = values[b];
            int64_t best_id = ids[b];
            for (int t = 1; t < team; t++)
                if (values[(int64_t)t * num_rows + b] > best) {
                    best = values[(int64_t)t * num_rows + b];
                    best_id = ids[(int64_t)t * num_rows + b];
                }
            out_value[b] = best;
            out_id[b] = best_id;
        }
    }
    free(ht);
    free(values);
    free(ids);
    return status || failed;
}
