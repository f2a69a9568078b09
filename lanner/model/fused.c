/* Small fused steps of a decoder layer, compiled at first use: at decode batch sizes each PyTorch op
 * costs microseconds of dispatch, and RMSNorm alone is six of them.
 *
 * rms_norm: x[T, H] (+ residual, written back as the sum) -> out = x / rms(x) * w, for fp32 or bf16
 * rows (bf16 0 / 1); statistics in fp32, and bf16 rounding where HF's RMSNorm rounds.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

static inline float load(const void *p, int64_t i, int bf16) {
    if (!bf16)
        return ((const float *)p)[i];
    uint32_t u = (uint32_t)((const uint16_t *)p)[i] << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline void store(void *p, int64_t i, float f, int bf16) {
    if (!bf16) {
        ((float *)p)[i] = f;
        return;
    }
    uint32_t u;
    memcpy(&u, &f, 4);
    ((uint16_t *)p)[i] = (uint16_t)((u + 0x7FFF + ((u >> 16) & 1)) >> 16);
}

void rms_norm(const void *x, void *residual, const void *weight, void *out, int64_t T, int64_t H, float eps,
              int bf16) {
    for (int64_t t = 0; t < T; t++) {
        const int64_t row = t * H;
        float sum = 0;
        for (int64_t i = 0; i < H; i++) {
            float v = load(x, row + i, bf16);
            if (residual) {
                v += load(residual, row + i, bf16);
                store(residual, row + i, v, bf16);
                v = load(residual, row + i, bf16);   /* the sum as stored, rounded like HF's */
            }
            sum += v * v;
        }
        float scale = 1.0f / sqrtf(sum / H + eps);
        const void *src = residual ? residual : x;
        for (int64_t i = 0; i < H; i++) {
            uint16_t normed;   /* HF rounds the normalized row to the model dtype before the weight */
            store(&normed, 0, load(src, row + i, bf16) * scale, 1);
            float n = bf16 ? load(&normed, 0, 1) : load(src, row + i, 0) * scale;
            store(out, row + i, n * load(weight, i, bf16), bf16);
        }
    }
}
