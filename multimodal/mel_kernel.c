/* The log-mel work around the FFT, as two compiled passes (the FFT itself stays torch's MKL rfft, which is what
 * HF's extractor uses: an FFT of our own was about twice as fast but rounds differently, and on steep spectra such
 * as brown noise even an exact FFT differs from HF's float32 one by more than the 1e-4 parity budget).
 *
 * - mel_kernel_window: frames times the Hann window into a contiguous [n, 400] array (the same float products as
 *   torch.mul).
 * - mel_kernel_mel: the rfft's complex [n, 201] to the [128, n] output in one pass per tile of 8 frames: power,
 *   Slaney mel product over each mel's nonzero bins, log10, the running max and optionally Whisper's x / 4 + 1.
 *   Every arithmetic operation works on a vector holding the same quantity for the 8 frames of a tile, so a frame's
 *   result does not depend on its position in a tile or on how many frames a call gets (the last partial tile is
 *   zero-padded and goes through the same code): the offline and streaming front ends get bit-identical frames.
 *
 * Built by mel_kernel.py with the system C compiler (GCC or Clang vector extensions; no other dependency). */

#include <math.h>
#include <stdint.h>
#include <string.h>

#define LANES 8
#define N_FFT 400
#define BINS 201
#define MELS 128

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
static inline __attribute__((always_inline)) vf select(vi mask, vf a, vf b) {
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

/* log10 of x >= 0 (0 gives -inf, +inf gives +inf, subnormals handled): x = 2^e (1 + f) with 1 + f in
 * [sqrt(1/2), sqrt(2)), log(1 + f) = f - f^2 / 2 + f^3 P(f), then e ln 2 (ln 2 split in two parts) and ln to log10. */
static inline __attribute__((always_inline)) vf log10_lanes(vf x) {
    const vi tiny = x < splat(1.17549435e-38f);
    x = select(tiny, x * splat(8388608.0f), x);
    const vi bits = (vi)x;
    vi e = ((bits >> 23) & 0xff) - 126;
    const vf m = (vf)((bits & 0x007fffff) | 0x3f000000); /* [0.5, 1) */
    const vi low = m < splat(0.70710678118654752440f);
    e = e + low - (tiny & 23);
    const vf f = select(low, m + m, m) - splat(1.0f);
    vf p = splat(P[5]);
    for (int i = 4; i >= 0; i--)
        p = p * f + splat(P[i]);
    const vf z = f * f, ef = __builtin_convertvector(e, vf);
    const vf ln = f + (z * f * p - splat(0.5f) * z + ef * splat(-2.12194440e-4f)) + ef * splat(0.693359375f);
    const vf out = select(x == splat(0.0f), splat(-INFINITY), ln * splat(0.43429448190325182765f));
    return select(x == splat(INFINITY), splat(INFINITY), out);
}

/* Power of bins 8c .. 8c + 7 of 8 spectrum rows (interleaved complex, row j at rows + j * 2 * BINS), one vector
 * per bin across the rows. */
static inline __attribute__((always_inline)) void power_block(const float *rows, int c, vf *power) {
    vf v[8];
    for (int j = 0; j < 8; j++) {
        vf a, b;
        memcpy(&a, rows + j * 2 * BINS + 16 * c, sizeof a);
        memcpy(&b, rows + j * 2 * BINS + 16 * c + 8, sizeof b);
        a *= a, b *= b;
        v[j] = SHUFFLE(a, b, 0, 2, 4, 6, 8, 10, 12, 14) + SHUFFLE(a, b, 1, 3, 5, 7, 9, 11, 13, 15);
    }
    transpose8(v);
    memcpy(power + 8 * c, v, sizeof v);
}

/* The rfft of n frames (complex64 [n, 201], contiguous) to out [128, n] (mel m of frame i at
 * out[m * out_stride + i]): log10 mel, or log10 mel / 4 + 1 when `scaled`. Returns the max of the unscaled log10
 * values (-inf for n = 0). */
float mel_kernel_mel(const float *spectrum, int64_t n, float *out, int64_t out_stride, int32_t scaled) {
    vf power[BINS];
    float padded[LANES][2 * BINS];
    vf peak = splat(-INFINITY);
    for (int64_t first = 0; first < n; first += LANES) {
        const int count = n - first < LANES ? (int)(n - first) : LANES;
        const float *rows = spectrum + first * 2 * BINS;
        if (count < LANES) { /* the same code on a zero-padded copy, so a frame's result never depends on the tile */
            memset(padded, 0, sizeof padded);
            memcpy(padded, rows, count * sizeof padded[0]);
            rows = &padded[0][0];
        }
        for (int c = 0; c < BINS / 8; c++)
            power_block(rows, c, power);
        for (int lane = 0; lane < LANES; lane++) { /* bin 200, the Nyquist bin */
            const float re = rows[lane * 2 * BINS + 2 * (BINS - 1)], im = rows[lane * 2 * BINS + 2 * (BINS - 1) + 1];
            power[BINS - 1][lane] = re * re + im * im;
        }
        for (int m = 0; m < MELS; m++) {
            vf acc = splat(0.0f);
            for (int k = band_lo[m]; k < band_hi[m]; k++)
                acc += splat(weights[m][k]) * power[k];
            vf value = log10_lanes(acc);
            for (int lane = count; lane < LANES; lane++)
                value[lane] = -INFINITY;
            peak = select(value > peak, value, peak);
            if (scaled)
                value = value * splat(0.25f) + splat(1.0f);
            float *row = out + m * out_stride + first;
            if (count == LANES)
                memcpy(row, &value, sizeof value);
            else
                for (int lane = 0; lane < count; lane++)
                    row[lane] = value[lane];
        }
    }
    float best = -INFINITY;
    for (int lane = 0; lane < LANES; lane++)
        best = peak[lane] > best ? peak[lane] : best;
    return best;
}
