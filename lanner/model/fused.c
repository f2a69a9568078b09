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

static inline float round_to(float f, int bf16) {   /* f as the activations' dtype holds it */
    if (!bf16)
        return f;
    uint16_t h;
    store(&h, 0, f, 1);
    return load(&h, 0, 1);
}

/* Rotary on the q and k heads of qkv [T, (hq + 2 hkv) * D] in place (HF's half-split layout; cos_sin
 * [T, D] = cos | sin in the activations' dtype; every product and sum rounded as HF's bf16 ops round),
 * then k and v of token t written to row slots[t] of the caches [slots, hkv, D] (slot < 0: skipped). */
void rope_store(void *qkv, const void *cos_sin, int64_t T, int hq, int hkv, int D, const int64_t *slots,
                void *k_cache, void *v_cache, int bf16) {
    const int half = D / 2, width = (hq + 2 * hkv) * D, es = bf16 ? 2 : 4;
    for (int64_t t = 0; t < T; t++) {
        const int64_t row = t * width;
        for (int h = 0; h < hq + hkv; h++) {
            const int64_t at = row + (int64_t)h * D;
            for (int i = 0; i < half; i++) {
                float c = load(cos_sin, t * D + i, bf16), s = load(cos_sin, t * D + half + i, bf16);
                float x1 = load(qkv, at + i, bf16), x2 = load(qkv, at + half + i, bf16);
                float r1 = round_to(round_to(x1 * c, bf16) - round_to(x2 * s, bf16), bf16);
                float r2 = round_to(round_to(x2 * c, bf16) + round_to(x1 * s, bf16), bf16);
                store(qkv, at + i, r1, bf16);
                store(qkv, at + half + i, r2, bf16);
            }
        }
        if (slots[t] < 0)
            continue;
        const int64_t kv = (int64_t)hkv * D;
        memcpy((char *)k_cache + slots[t] * kv * es, (char *)qkv + (row + (int64_t)hq * D) * es, kv * es);
        memcpy((char *)v_cache + slots[t] * kv * es, (char *)qkv + (row + (int64_t)(hq + hkv) * D) * es, kv * es);
    }
}

/* out[t, i] = silu(gate[t, i]) * up[t, i] for gate | up = x[t, :2I], rounded as HF's bf16 ops round */
void silu_mul(const void *x, void *out, int64_t T, int64_t I, int bf16) {
    for (int64_t t = 0; t < T; t++) {
        for (int64_t i = 0; i < I; i++) {
            float g = load(x, t * 2 * I + i, bf16), u = load(x, t * 2 * I + I + i, bf16);
            store(out, t * I + i, round_to(g / (1.0f + expf(-g)), bf16) * u, bf16);
        }
    }
}

/* Grammar masks: the logits [R, V] (rows `stride` floats apart) of tokens whose bit is clear in bits [R, W]
 * (token t is bit t % 32 of word t / 32) become -inf. Reading the bits directly beats unpacking them into
 * a boolean row for a masked_fill; most words of a mask are all ones or all zeros. */
void mask_logits(float *logits, int64_t stride, const uint32_t *bits, int64_t R, int64_t W, int64_t V) {
    for (int64_t r = 0; r < R; r++) {
        float *row = logits + r * stride;
        for (int64_t w = 0; w < W && 32 * w < V; w++) {
            uint32_t word = bits[r * W + w];
            if (word == 0xffffffffu)
                continue;
            int64_t end = 32 * w + 32 < V ? 32 * w + 32 : V;
            for (int64_t t = 32 * w; t < end; t++)
                if (!((word >> (t - 32 * w)) & 1u)) row[t] = -INFINITY;
        }
    }
}
