/* The log-mel work around the FFT. The FFT itself stays MKL's rfft, the one torch.fft.rfft and so HF's extractor
 * use. (Tried: a 400-point FFT of our own, vectorised across frames and fused with the rest, made a clip about 1.4x
 * faster still, but it rounds differently from MKL, and on steep spectra such as brown noise even an exact FFT
 * differs from HF's float32 one by more than the 1e-4 parity budget.)
 *
 * - mel_kernel_window: frames times the Hann window into a contiguous [n, 400] array (the same float products as
 *   torch.mul).
 * - mel_kernel_mel: the rfft's complex [n, 201] to the [128, n] output in one pass per tile of 8 frames: power,
 *   Slaney mel product over each mel's nonzero bins, log10, the running max and optionally Whisper's x / 4 + 1.
 *   Every arithmetic operation works on a vector holding the same quantity for the 8 frames of a tile, so a frame's
 *   result does not depend on its position in a tile or on how many frames a call gets (the last partial tile is
 *   zero-padded and goes through the same code): the offline and streaming front ends get bit-identical frames.
 * - mel_kernel_frames: both around MKL's DFTI called from here (entry points from torch's library, handed over by
 *   mel_kernel_use_mkl) on 64 frames at a time, so that the windowed frames and their spectrum stay in L2 and
 *   Python makes one call per chunk instead of three; the same floats as the two passes around torch.fft.rfft.
 *
 * Built by mel_kernel.py with the system C compiler (GCC or Clang vector extensions; no other dependency). */

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define LANES 8
#define N_FFT 400
#define BINS 201
#define MELS 128
#define BLOCK_TILES 4 /* tiles whose output rows are written together */

typedef float vf __attribute__((vector_size(LANES * 4)));
typedef int32_t vi __attribute__((vector_size(LANES * 4)));

#ifdef __clang__
#define SHUFFLE(a, b, ...) __builtin_shufflevector(a, b, __VA_ARGS__)
#else
#define SHUFFLE(a, b, ...) __builtin_shuffle(a, b, (vi){__VA_ARGS__})
#endif

static float window[N_FFT];
static float weights[MELS][BINS];
static int band_lo[MELS], band_hi[MELS];

/* Window [400], Slaney filters as [128 mels][201 bins] and each mel's nonzero bin range [lo, hi). */
void mel_kernel_init(const float *hann, const float *filters, const int32_t *lo, const int32_t *hi) {
    memcpy(window, hann, sizeof window);
    memcpy(weights, filters, sizeof weights);
    for (int m = 0; m < MELS; m++) {
        band_lo[m] = lo[m];
        band_hi[m] = hi[m];
    }
}

/* Frames [n, 400] (row i at frames + i * row_stride, unit sample stride) times the window into windowed [n, 400]. */
void mel_kernel_window(const float *frames, int64_t row_stride, int64_t n, float *restrict windowed) {
    for (int64_t i = 0; i < n; i++) {
        const float *restrict frame = frames + i * row_stride;
        float *restrict row = windowed + i * N_FFT;
        for (int s = 0; s < N_FFT; s++)
            row[s] = frame[s] * window[s];
    }
}

static inline __attribute__((always_inline)) vf splat(float x) { return (vf){0} + x; }

/* a where mask (all ones), b elsewhere. */
static inline __attribute__((always_inline)) vf blend(vi mask, vf a, vf b) {
    return (vf)(((vi)a & mask) | ((vi)b & ~mask));
}

/* In-place 8 x 8 transpose: afterwards v[i] holds lane i of every input vector. */
static inline __attribute__((always_inline)) void transpose8(vf v[8]) {
    vf t[8], u[8];
    for (int j = 0; j < 8; j += 2) {
        t[j] = SHUFFLE(v[j], v[j + 1], 0, 8, 1, 9, 4, 12, 5, 13);
        t[j + 1] = SHUFFLE(v[j], v[j + 1], 2, 10, 3, 11, 6, 14, 7, 15);
    }
    for (int j = 0; j < 8; j += 4)
        for (int h = 0; h < 2; h++) {
            u[j + 2 * h] = SHUFFLE(t[j + h], t[j + h + 2], 0, 1, 8, 9, 4, 5, 12, 13);
            u[j + 2 * h + 1] = SHUFFLE(t[j + h], t[j + h + 2], 2, 3, 10, 11, 6, 7, 14, 15);
        }
    for (int i = 0; i < 4; i++) {
        v[i] = SHUFFLE(u[i], u[i + 4], 0, 1, 2, 3, 8, 9, 10, 11);
        v[i + 4] = SHUFFLE(u[i], u[i + 4], 4, 5, 6, 7, 12, 13, 14, 15);
    }
}

/* P(f) for log10_lanes: a weighted least-squares fit of (log(1 + f) - f + f^2 / 2) / f^3 on the reduced interval,
 * rounded to float (absolute error of the resulting log(1 + f) below 7e-8, about a float ulp of log10 near 1). */
static const float P[6] = {0.3333462178707123f, -0.24980856478214264f, 0.19911105930805206f, -0.17162147164344788f,
                           0.16139638423919678f, -0.10245660692453384f};

/* log10 of x > 0 for normal x: x = 2^e (1 + f) with 1 + f in [sqrt(1/2), sqrt(2)), log(1 + f) = f - f^2 / 2 +
 * f^3 P(f), then e ln 2 (ln 2 split in two parts) and ln to log10. */
static inline __attribute__((always_inline)) vf log10_normal(vf x) {
    const vi bits = (vi)x;
    vi e = ((bits >> 23) & 0xff) - 126;
    const vf m = (vf)((bits & 0x007fffff) | 0x3f000000); /* [0.5, 1) */
    const vi low = m < splat(0.70710678118654752440f);
    e = e + low;
    const vf f = blend(low, m + m, m) - splat(1.0f);
    vf p = splat(P[5]);
    for (int i = 4; i >= 0; i--)
        p = p * f + splat(P[i]);
    const vf z = f * f, ef = __builtin_convertvector(e, vf);
    const vf ln = f + (z * f * p - splat(0.5f) * z + ef * splat(-2.12194440e-4f)) + ef * splat(0.693359375f);
    return ln * splat(0.43429448190325182765f);
}

/* log10 of x >= 0 like libm's: 0 gives -inf, +inf gives +inf, NaN gives NaN, subnormals are scaled by 2^23 first
 * (a branch taken only for tiles holding such values). */
static inline __attribute__((always_inline)) vf log10_lanes(vf x) {
    const vi normal = (x >= splat(1.17549435e-38f)) & (x < splat(INFINITY));
    vi all_normal = normal;
    for (int half = LANES / 2; half > 0; half /= 2) /* and across the lanes (a few shuffles) */
        for (int lane = 0; lane < half; lane++)
            all_normal[lane] &= all_normal[lane + half];
    if (__builtin_expect(all_normal[0] != 0, 1))
        return log10_normal(x);
    const vi tiny = x < splat(1.17549435e-38f);
    vf out = log10_normal(blend(tiny, x * splat(8388608.0f), x)) - blend(tiny, splat(6.9236899002715674f), splat(0.0f));
    out = blend(x == splat(0.0f), splat(-INFINITY), out);
    return blend(normal | tiny, out, x); /* +inf and NaN stay as they are */
}

/* Power of bins 8c .. 8c + 7 of 8 spectrum rows (interleaved complex, row j at rows + j * 2 * BINS), one vector
 * per bin across the rows. The in-lane shuffles leave a row's bins in the order 0 1 4 5 2 3 6 7. */
static inline __attribute__((always_inline)) void power_block(const float *rows, int c, vf *power) {
    static const int order[8] = {0, 1, 4, 5, 2, 3, 6, 7};
    vf v[8];
    for (int j = 0; j < 8; j++) {
        vf a, b;
        memcpy(&a, rows + j * 2 * BINS + 16 * c, sizeof a);
        memcpy(&b, rows + j * 2 * BINS + 16 * c + 8, sizeof b);
        a *= a, b *= b;
        v[j] = SHUFFLE(a, b, 0, 2, 8, 10, 4, 6, 12, 14) + SHUFFLE(a, b, 1, 3, 9, 11, 5, 7, 13, 15);
    }
    transpose8(v);
    for (int i = 0; i < 8; i++)
        power[8 * c + order[i]] = v[i];
}

/* The rfft of n frames (complex64 [n, 201], contiguous) to out [128, n] (mel m of frame i at
 * out[m * out_stride + i]): log10 mel, or log10 mel / 4 + 1 when `scaled`. Returns the max of the unscaled log10
 * values (-inf for n = 0). */
float mel_kernel_mel(const float *spectrum, int64_t n, float *out, int64_t out_stride, int32_t scaled) {
    vf power[BINS], block[MELS][BLOCK_TILES];
    float padded[LANES][2 * BINS];
    vf peak = splat(-INFINITY);
    for (int64_t start = 0; start < n; start += BLOCK_TILES * LANES) {
        const int64_t stop = n - start < BLOCK_TILES * LANES ? n : start + BLOCK_TILES * LANES;
        for (int tile = 0; start + tile * LANES < stop; tile++) {
            const int64_t first = start + tile * LANES;
            const int count = stop - first < LANES ? (int)(stop - first) : LANES;
            const float *rows = spectrum + first * 2 * BINS;
            if (count < LANES) { /* the same code on a zero-padded copy: a frame's result never depends on the tile */
                memset(padded, 0, sizeof padded);
                memcpy(padded, rows, count * sizeof padded[0]);
                rows = &padded[0][0];
            }
            for (int c = 0; c < BINS / 8; c++)
                power_block(rows, c, power);
            for (int lane = 0; lane < LANES; lane++) { /* bin 200, the Nyquist bin */
                const float *bin = rows + lane * 2 * BINS + 2 * (BINS - 1);
                power[BINS - 1][lane] = bin[0] * bin[0] + bin[1] * bin[1];
            }
            for (int m = 0; m < MELS; m++) {
                vf acc = splat(0.0f);
                for (int k = band_lo[m]; k < band_hi[m]; k++)
                    acc += splat(weights[m][k]) * power[k];
                vf value = log10_lanes(acc);
                for (int lane = count; lane < LANES; lane++)
                    value[lane] = -INFINITY;
                peak = blend(value > peak, value, peak);
                block[m][tile] = scaled ? value * splat(0.25f) + splat(1.0f) : value;
            }
        }
        for (int m = 0; m < MELS; m++) /* whole cache lines of each output row at once, inlined when full */
            if (stop - start == BLOCK_TILES * LANES)
                memcpy(out + m * out_stride + start, block[m], sizeof block[m]);
            else
                memcpy(out + m * out_stride + start, block[m], (stop - start) * sizeof(float));
    }
    float best = -INFINITY;
    for (int lane = 0; lane < LANES; lane++)
        best = peak[lane] > best ? peak[lane] : best;
    return best;
}

/* MKL's DFTI entry points, as torch's own library exports them (set by mel_kernel_use_mkl; MKL_LONG is long). */
typedef long (*dfti_create_fn)(void **handle, int domain, long length);
typedef long (*dfti_set_fn)(void *handle, int param, ...);
typedef long (*dfti_commit_fn)(void *handle);
typedef long (*dfti_forward_fn)(void *handle, void *in, ...);
typedef long (*dfti_free_fn)(void **handle);
static dfti_create_fn dfti_create;
static dfti_set_fn dfti_set;
static dfti_commit_fn dfti_commit;
static dfti_forward_fn dfti_forward;
static dfti_free_fn dfti_free;
enum { DFTI_NUMBER_OF_TRANSFORMS = 7, DFTI_CONJUGATE_EVEN_STORAGE = 10, DFTI_PLACEMENT = 11, DFTI_INPUT_DISTANCE = 14,
       DFTI_OUTPUT_DISTANCE = 15, DFTI_THREAD_LIMIT = 27, DFTI_REAL = 33, DFTI_COMPLEX_COMPLEX = 39,
       DFTI_NOT_INPLACE = 44 };
#define FFT_FRAMES 64 /* frames per MKL call: their windowed samples and spectrum stay in L2 */

void mel_kernel_use_mkl(void *create, void *set, void *commit, void *forward, void *release) {
    dfti_create = (dfti_create_fn)create, dfti_set = (dfti_set_fn)set, dfti_commit = (dfti_commit_fn)commit;
    dfti_forward = (dfti_forward_fn)forward, dfti_free = (dfti_free_fn)release;
}

/* A committed single-precision real-to-complex descriptor for `count` frames [count, 400] -> [count, 201]. */
static void *plan(long count) {
    void *handle = NULL;
    if (dfti_create(&handle, DFTI_REAL, (long)N_FFT) != 0)
        return NULL;
    if (dfti_set(handle, DFTI_PLACEMENT, DFTI_NOT_INPLACE) || dfti_set(handle, DFTI_CONJUGATE_EVEN_STORAGE,
                                                                        DFTI_COMPLEX_COMPLEX) ||
        dfti_set(handle, DFTI_NUMBER_OF_TRANSFORMS, count) || dfti_set(handle, DFTI_INPUT_DISTANCE, (long)N_FFT) ||
        dfti_set(handle, DFTI_OUTPUT_DISTANCE, (long)BINS) || dfti_set(handle, DFTI_THREAD_LIMIT, 1L) ||
        dfti_commit(handle)) {
        dfti_free(&handle);
        return NULL;
    }
    return handle;
}

/* Frames [n, 400] (row i at frames + i * row_stride) to out like mel_kernel_mel, calling MKL's rfft from here on
 * FFT_FRAMES frames at a time (the last few one by one) with descriptors of this call, set up like torch's (the
 * same transform kernel, so the same floats as torch.fft.rfft) but limited to the calling thread. Returns the max
 * of the unscaled log10 values (-inf for n = 0), or NaN when MKL or malloc fails. */
float mel_kernel_frames(const float *frames, int64_t row_stride, int64_t n, float *out, int64_t out_stride,
                        int32_t scaled) {
    float *windowed = malloc(sizeof(float) * FFT_FRAMES * (N_FFT + 2 * BINS));
    void *full = n >= FFT_FRAMES ? plan(FFT_FRAMES) : NULL, *single = n % FFT_FRAMES ? plan(1) : NULL;
    float best = windowed && (full || n < FFT_FRAMES) && (single || n % FFT_FRAMES == 0) ? -INFINITY : NAN;
    for (int64_t first = 0; first < n && !isnan(best); first += FFT_FRAMES) {
        const int64_t count = n - first < FFT_FRAMES ? n - first : FFT_FRAMES;
        float *spectrum = windowed + FFT_FRAMES * N_FFT;
        mel_kernel_window(frames + first * row_stride, row_stride, count, windowed);
        long status = count == FFT_FRAMES ? dfti_forward(full, windowed, spectrum) : 0;
        for (int64_t i = 0; count < FFT_FRAMES && i < count && status == 0; i++)
            status = dfti_forward(single, windowed + i * N_FFT, spectrum + i * 2 * BINS);
        const float peak = status == 0 ? mel_kernel_mel(spectrum, count, out + first, out_stride, scaled) : NAN;
        best = isnan(peak) || peak > best ? peak : best;
    }
    if (full)
        dfti_free(&full);
    if (single)
        dfti_free(&single);
    free(windowed);
    return best;
}
