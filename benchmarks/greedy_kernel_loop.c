/* The compiled greedy lm_head alone, from C: no Python, no torch, so that variants of greedy_kernel.c can be timed
 * against each other to a few percent. A random [vocab, 128] weight (fp32, or bf16 with a third argument 1) on
 * transparent huge pages, random hidden rows; per batch size, the best of three means of `repeats` calls on one
 * thread, process CPU ms, then a checksum of the ids (equal between variants that pick the same ids). A vocabulary
 * of 2048 rows keeps the weight in L2 (the FMAs alone), the lm_head's 152064 streams it from memory.
 *
 *     cc -O3 -march=native -fopenmp -o /tmp/greedy_loop benchmarks/greedy_kernel_loop.c engine/worker/greedy_kernel.c
 *     /tmp/greedy_loop 152064 5 && /tmp/greedy_loop 2048 400 && /tmp/greedy_loop 152064 5 1
 */

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>

#define HIDDEN 128
#define HUGE_PAGE (2 << 20)

int greedy_lm_head(const float *hidden, int64_t num_rows, int64_t hidden_size, const void *weight, int64_t vocab,
                   int64_t row_stride, int bf16, int round_bf16, int prefetch, const uint32_t *mask,
                   int64_t mask_words, int top_k, int64_t path_rows, float *out_value, int64_t *out_id,
                   int num_threads);

static double cpu_seconds(void) {
    struct timespec t;
    clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &t);
    return (double)t.tv_sec + (double)t.tv_nsec * 1e-9;
}

static float uniform(void) { return (float)rand() / (float)RAND_MAX - 0.5f; }

int main(int argc, char **argv) {
    if (argc < 3) {
        fprintf(stderr, "usage: %s VOCAB REPEATS [BF16]\n", argv[0]);
        return 2;
    }
    int64_t vocab = atol(argv[1]);
    int repeats = atoi(argv[2]), bf16 = argc > 3 && atoi(argv[3]);
    size_t bytes = (size_t)(vocab * HIDDEN) * (bf16 ? 2 : 4);
    void *weight = aligned_alloc(HUGE_PAGE, (bytes + HUGE_PAGE - 1) / HUGE_PAGE * HUGE_PAGE);
    if (!weight)
        return 1;
    madvise(weight, bytes, MADV_HUGEPAGE);
    srand(1);
    for (int64_t i = 0; i < vocab * HIDDEN; i++) {
        float value = uniform();
        uint32_t bits;
        memcpy(&bits, &value, sizeof(bits));
        if (bf16)
            ((uint16_t *)weight)[i] = (uint16_t)(bits >> 16);
        else
            ((float *)weight)[i] = value;
    }
    static const int batches[] = {1, 8, 16, 24, 32, 40, 48, 64};
    static float hidden[64 * HIDDEN], values[64];
    static int64_t ids[64];
    for (int i = 0; i < 64 * HIDDEN; i++)
        hidden[i] = uniform();
    unsigned long long checksum = 0;
    for (size_t n = 0; n < sizeof(batches) / sizeof(batches[0]); n++) {
        int rows = batches[n];
        double best = 1e9;
        for (int round = 0; round < 3; round++) {
            double start = cpu_seconds();
            for (int r = 0; r < repeats; r++)
                greedy_lm_head(hidden, rows, HIDDEN, weight, vocab, HIDDEN, bf16, bf16, 0, NULL, 0, 0, 0, values, ids,
                               1);
            double mean = (cpu_seconds() - start) / repeats;
            best = mean < best ? mean : best;
        }
        for (int b = 0; b < rows; b++)
            checksum = checksum * 31 + (unsigned long long)ids[b];
        printf("%d:%.3f ", rows, best * 1e3);
    }
    printf(" ids checksum %llx\n", checksum);
    free(weight);
    return 0;
}
