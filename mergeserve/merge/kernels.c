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

#define E4M3_MAX 448.0f /* largest finite float8_e4m3fn */
#define FP8_BLOCK 128   /* the scale blocks: 128 x 128 */

/* float32 -> float8_e4m3fn bits as torch casts a value in [-448, 448] (or NaN): nearest, ties
 * to even; below 2**-6 the subnormals, multiples of 2**-9. */
static inline uint8_t e4m3_of(float x) {
    uint32_t u;
    memcpy(&u, &x, sizeof u);
    uint32_t sign = (u >> 24) & 0x80u, a = u & 0x7FFFFFFFu;
    float f;
    memcpy(&f, &a, sizeof f);
    /* 2**-6 and up: 3 mantissa bits, the exponent rebiased from 127 to 7 */
    uint32_t normal = ((a + (((a >> 20) & 1u) + 0x7FFFFu)) >> 20) - ((127u - 7u) << 3);
    /* below: multiples of 2**-9 (the operand capped so that every lane converts cleanly) */
    uint32_t sub = (uint32_t)(int32_t)rintf((f < 0x1p-6f ? f : 0x1p-6f) * 512.0f);
    uint32_t mag = a >= 0x3C800000u ? normal : sub;
    return (uint8_t)(sign | (a > 0x7F800000u ? 0x7Fu : mag));
}

/* Block FP8 of a bfloat16 [rows, cols] matrix: scale[R, C] = amax(|block|) / 448 (1 where the
 * block is all zeros), q = e4m3(clamp(w / scale, -448, 448)); as quantize.py's torch form. */
void quantize_e4m3_blocks(const uint16_t *w, int64_t rows, int64_t cols, uint8_t *q, float *scale) {
    int64_t nc = (cols + FP8_BLOCK - 1) / FP8_BLOCK;
    for (int64_t r0 = 0; r0 < rows; r0 += FP8_BLOCK) {
        int64_t r1 = rows - r0 < FP8_BLOCK ? rows : r0 + FP8_BLOCK;
        float *s = scale + (r0 / FP8_BLOCK) * nc;
        for (int64_t c = 0; c < nc; c++) {
            int64_t c0 = c * FP8_BLOCK, c1 = cols - c0 < FP8_BLOCK ? cols : c0 + FP8_BLOCK;
            uint16_t top = 0; /* |x| of non-negative bfloat16 orders as its bits */
            for (int64_t i = r0; i < r1; i++)
                for (int64_t j = c0; j < c1; j++) {
                    uint16_t m = w[i * cols + j] & 0x7FFF;
                    top = m > top ? m : top;
                }
            float amax = f32_of(top);
            s[c] = amax > 0.0f ? amax / E4M3_MAX : 1.0f;
        }
        for (int64_t i = r0; i < r1; i++)
            for (int64_t c = 0; c < nc; c++) {
                int64_t c0 = c * FP8_BLOCK, c1 = cols - c0 < FP8_BLOCK ? cols : c0 + FP8_BLOCK;
                float sc = s[c];
                const uint16_t *row = w + i * cols;
                uint8_t *out = q + i * cols;
                for (int64_t j = c0; j < c1; j++) {
                    float x = f32_of(row[j]) / sc;
                    out[j] = e4m3_of(x > E4M3_MAX ? E4M3_MAX : (x < -E4M3_MAX ? -E4M3_MAX : x));
                }
            }
    }
}

/* e4m3_of over n values, for the tests */
void e4m3_cast(const float *x, int64_t n, uint8_t *out) {
    for (int64_t i = 0; i < n; i++) out[i] = e4m3_of(x[i]);
}
