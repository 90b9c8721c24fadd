/* One-pass loops over bfloat16 tensors (as their uint16 bits) for mergeserve/merge/kernels.py.
 *
 * Each does torch's float32 operations in torch's order, so results are bit-identical to the
 * torch expressions named in kernels.py. Built by kernels.py with -ffp-contract=off (no multiply
 * fused into an add unless written as fmaf) and without -ffast-math (IEEE division, denormals).
 */
#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#define NORM_LANES 8 /* torch's CPU L2 norm: one Vectorized<float> accumulator of 8 lanes */
#define BLOCK 4096   /* float32 accumulator of weighted_sum: 16 KB, stays in L1 */

typedef float lanes_t __attribute__((vector_size(NORM_LANES * sizeof(float))));

static inline float f32_of(uint16_t b) {
    uint32_t u = (uint32_t)b << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

/* float32 -> bfloat16 as torch casts: nearest, ties to even; every NaN to all ones. */
static inline uint16_t bf16_of(float f) {
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    if ((u & 0x7FFFFFFFu) > 0x7F800000u) return 0xFFFF;
    return (uint16_t)((u + (((u >> 16) & 1u) + 0x7FFFu)) >> 16);
}

/* out[c] = || a[c*chunk : (c+1)*chunk] || for each chunk, summed as torch sums a norm: squares
 * into 8 lanes in order, the lanes added left to right, the leftover elements one by one. */
void chunk_norms(const uint16_t *a, int64_t n, int64_t chunk, float *out) {
    for (int64_t c = 0, start = 0; start < n; c++, start += chunk) {
        int64_t m = n - start < chunk ? n - start : chunk;
        int64_t body = m - m % NORM_LANES;
        lanes_t acc = {0};
        for (int64_t d = 0; d < body; d += NORM_LANES) {
            lanes_t x;
            for (int j = 0; j < NORM_LANES; j++) x[j] = f32_of(a[start + d + j]);
            acc += x * x;
        }
        float total = acc[0];
        for (int j = 1; j < NORM_LANES; j++) total = total + acc[j];
        for (int64_t i = start + body; i < start + m; i++) {
            float x = f32_of(a[i]);
            total += x * x;
        }
        out[c] = sqrtf(total);
    }
}

/* out[i] = (a[i] / na) * (b[i] / nb), float32 */
void scaled_product(const uint16_t *a, const uint16_t *b, int64_t n, float na, float nb, float *out) {
    for (int64_t i = 0; i < n; i++) out[i] = (f32_of(a[i]) / na) * (f32_of(b[i]) / nb);
}

/* out[i] = bf16(ca * a[i] + cb * b[i]) */
void combine(const uint16_t *a, const uint16_t *b, int64_t n, float ca, float cb, uint16_t *out) {
    for (int64_t i = 0; i < n; i++) out[i] = bf16_of(ca * f32_of(a[i]) + cb * f32_of(b[i]));
}

/* out[i] = bf16(acc / den), acc = 0 then acc = fma(xs[k][i], w[k], acc) for k in order */
void weighted_sum(const uint16_t *const *xs, const float *w, int64_t k, int64_t n, float den, uint16_t *out) {
    float acc[BLOCK];
    for (int64_t s = 0; s < n; s += BLOCK) {
        int64_t m = n - s < BLOCK ? n - s : BLOCK;
        for (int64_t i = 0; i < m; i++) acc[i] = 0.0f;
        for (int64_t j = 0; j < k; j++) {
            const uint16_t *x = xs[j] + s;
            float wj = w[j];
            for (int64_t i = 0; i < m; i++) acc[i] = fmaf(f32_of(x[i]), wj, acc[i]);
        }
        for (int64_t i = 0; i < m; i++) out[s + i] = bf16_of(acc[i] / den);
    }
}
