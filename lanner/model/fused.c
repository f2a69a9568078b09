/* Small fused steps of a decoder layer, compiled at first use: at decode batch sizes each PyTorch op
 * costs microseconds of dispatch, and RMSNorm alone is six of them.
 *
 * rms_norm: x[T, H] (+ residual, written back as the sum) -> out = x / rms(x) * w, for fp32 or bf16
 * rows (bf16 0 / 1); statistics in fp32, and bf16 rounding where HF's RMSNorm rounds.
 */
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "../quant/matmul.h"
#include "../vec16.h"

/* element i of an array of element type `kind` (vec16.h's ELEM_*), as fp32 */
static inline float load(const void *p, int64_t i, int kind) {
    if (kind == ELEM_F16)
        return (float)((const _Float16 *)p)[i];
    if (!kind)
        return ((const float *)p)[i];
    uint32_t u = (uint32_t)((const uint16_t *)p)[i] << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

/* f into element i of such an array, rounded to nearest even where it holds 2-byte values (as torch's .to()) */
static inline void store(void *p, int64_t i, float f, int kind) {
    if (kind == ELEM_F16) {
        ((_Float16 *)p)[i] = (_Float16)f;
        return;
    }
    if (!kind) {
        ((float *)p)[i] = f;
        return;
    }
    uint32_t u;
    memcpy(&u, &f, 4);
    ((uint16_t *)p)[i] = (uint16_t)((u + 0x7FFF + ((u >> 16) & 1)) >> 16);
}

static inline float round_to(float f, int bf16) {   /* f as the activations' dtype holds it */
    if (!bf16)
        return f;
    uint16_t h;
    store(&h, 0, f, 1);
    return load(&h, 0, 1);
}

/* row t of rms_norm, a register at a time: element by element, GCC left the bf16 rows scalar (3.7x the fp32 ones'
 * time at a 2,048-token prefill on Zen 5) */
static void rms_norm_row(const void *x, void *residual, const void *weight, void *out, int64_t t, int64_t H,
                         float eps, int bf16) {
    const int64_t row = t * H;
    vn squares = {0};
    float sum = 0;
    int64_t i = 0;
    for (; i + NATIVE <= H; i += NATIVE) {
        vn v = load_native(x, row + i, bf16);
        if (residual) {   /* the sum as stored, rounded like HF's */
            v = round_native(v + load_native(residual, row + i, bf16), bf16);
            store_native(residual, row + i, v, bf16);
        }
        squares += v * v;
    }
    for (; i < H; i++) {
        float v = load(x, row + i, bf16);
        if (residual) {
            v += load(residual, row + i, bf16);
            store(residual, row + i, v, bf16);
            v = load(residual, row + i, bf16);
        }
        sum += v * v;
    }
    const float scale = 1.0f / sqrtf((sum_lanes(squares) + sum) / H + eps);
    const void *src = residual ? residual : x;
    for (i = 0; i + NATIVE <= H; i += NATIVE) {   /* HF rounds the normalized row to the model dtype before the weight */
        vn normed = round_native(load_native(src, row + i, bf16) * scale, bf16);
        store_native(out, row + i, normed * load_native(weight, i, bf16), bf16);
    }
    for (; i < H; i++)
        store(out, row + i, round_to(load(src, row + i, bf16) * scale, bf16) * load(weight, i, bf16), bf16);
}

void rms_norm(const void *x, void *residual, const void *weight, void *out, int64_t T, int64_t H, float eps,
              int bf16) {
    FOR_ROWS(T, omp_get_max_threads(), rms_norm_row(x, residual, weight, out, t, H, eps, bf16));
}

/* n values from src to dst in dst's element type (2-byte ones rounded to nearest even, as torch's .to() rounds) */
static void convert(const void *src, void *dst, int64_t n, int from, int to) {
    if (from == to) {
        memcpy(dst, src, n * (from ? 2 : 4));
        return;
    }
    for (int64_t i = 0; i < n; i++)
        store(dst, i, load(src, i, from), to);
}

/* Rotary on one head (D values at head, the activations' dtype) of row t in place: HF's half-split layout, cos_sin
 * [T, D] = cos | sin in the activations' dtype, every product and sum rounded as HF's bf16 ops round */
static void rotate_head(void *head, const void *cos_sin, int64_t t, int D, int bf16) {
    const int half = D / 2;
    int i = 0;
    for (; i + NATIVE <= half; i += NATIVE) {   /* the loop below, a register at a time */
        vn c = load_native(cos_sin, t * D + i, bf16), s = load_native(cos_sin, t * D + half + i, bf16);
        vn x1 = load_native(head, i, bf16), x2 = load_native(head, half + i, bf16);
        store_native(head, i, round_native(round_native(x1 * c, bf16) - round_native(x2 * s, bf16), bf16), bf16);
        store_native(head, half + i, round_native(round_native(x2 * c, bf16) + round_native(x1 * s, bf16), bf16),
                     bf16);
    }
    for (; i < half; i++) {
        float c = load(cos_sin, t * D + i, bf16), s = load(cos_sin, t * D + half + i, bf16);
        float x1 = load(head, i, bf16), x2 = load(head, half + i, bf16);
        float r1 = round_to(round_to(x1 * c, bf16) - round_to(x2 * s, bf16), bf16);
        float r2 = round_to(round_to(x2 * c, bf16) + round_to(x1 * s, bf16), bf16);
        store(head, i, r1, bf16);
        store(head, half + i, r2, bf16);
    }
}

/* Rotary (rotate_head) on the q and k heads of qkv [T, (hq + 2 hkv) * D] in place, then k and v of token t written
 * to row slots[t] of the caches [slots, hkv, D] (slot < 0: skipped), in the caches' element type (kv_type: vec16.h's
 * ELEM_F32, ELEM_BF16 or ELEM_F16). */
void rope_store(void *qkv, const void *cos_sin, int64_t T, int hq, int hkv, int D, const int64_t *slots,
                void *k_cache, void *v_cache, int bf16, int kv_type) {
    const int width = (hq + 2 * hkv) * D, es = bf16 ? 2 : 4;
    FOR_ROWS(T, omp_get_max_threads(), {
        const int64_t row = t * width;
        for (int h = 0; h < hq + hkv; h++)
            rotate_head((char *)qkv + (row + (int64_t)h * D) * es, cos_sin, t, D, bf16);
        if (slots[t] < 0)
            continue;
        const int64_t kv = (int64_t)hkv * D, kv_es = kv_type ? 2 : 4;
        const char *k = (char *)qkv + (row + (int64_t)hq * D) * es, *v = k + kv * es;
        convert(k, (char *)k_cache + slots[t] * kv * kv_es, kv, bf16, kv_type);
        convert(v, (char *)v_cache + slots[t] * kv * kv_es, kv, bf16, kv_type);
    });
}

/* out[t, i] = silu(gate[t, i]) * up[t, i] for gate | up = x[t, :2I], rounded as HF's bf16 ops round */
void silu_mul(const void *x, void *out, int64_t T, int64_t I, int bf16) {
    FOR_ROWS(T, omp_get_max_threads(), {
        int64_t i = 0;
        for (; i + NATIVE <= I; i += NATIVE) {
            vn g = load_native(x, t * 2 * I + i, bf16), u = load_native(x, t * 2 * I + I + i, bf16);
            store_native(out, t * I + i, silu_times(g, u, bf16), bf16);
        }
        for (; i < I; i++) {
            vn g = (vn){0} + load(x, t * 2 * I + i, bf16), u = (vn){0} + load(x, t * 2 * I + I + i, bf16);
            store(out, t * I + i, silu_times(g, u, bf16)[0], bf16);
        }
    });
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

/* ---- a few-row step through every decoder layer in one call ------------------------------------------ *
 * What the PyTorch path does for a layer of GGML linears, in the same order and with the same roundings, so
 * the results are bitwise equal: per op, PyTorch's dispatch and the Python around it cost more than the op
 * at decode sizes. The matmul (ggml.c) and attention (paged_attention.c) come as function pointers: each
 * library keeps its own ISA build. Activations are fp32 or bf16 (bf16 1); linears and attention sum in fp32 and
 * write their outputs in the activations' dtype, rounded as the PyTorch path rounds them. */
typedef int (*attention_fn)(const float *, const uint16_t *, const void *, const void *, int, const int32_t *, int,
                            const int32_t *, const int32_t *, const int64_t *, int, const uint8_t *, int, int, int,
                            int, int, float, int, float, int, void *, int, float *, int);

/* A linear's adapter slots (lanner.lora.ops.LoRAWeights). LoRA: A [slots + 1, R, k] and B [slots + 1, n, R] in the
 * activations' dtype, ranks[slot] rows of A in use, laid out block-diagonally over `parts` output slices (the fused
 * linear's modules: q | k | v, gate | up) of equal rank: part i's output rows from starts[i] (to the next part's
 * start, or n) take A's rows and B's columns i r .. (i + 1) r for r = ranks[slot] / parts (B's other columns there
 * are zeros). IA3: in_scales[slot] ([k] fp32) scales a row's input, out_scales[slot] ([n]) its output (NULL: not
 * this slot). a NULL: no adapters on this linear. */
typedef struct {
    const void *a, *b;
    const int32_t *ranks;
    int64_t R;
    int parts;
    int64_t starts[4];
    const float *const *in_scales, *const *out_scales;
} LoRAStack;

typedef struct GGMLLinear {
    int type, flags;   /* the matmul flags it may take: MATMUL_INT8, MATMUL_AMX_BF16, MATMUL_BF16_PAIRS */
    const uint8_t *w, *packed;   /* packed: the int8 kernel's layout of w, or NULL */
    int64_t row_bytes, n, k;     /* n: the linear's outputs, all its parts' */
    const float *bias;   /* fp32 or NULL */
    LoRAStack lora;
    /* a linear of parts in formats no one of them holds (a fused qkv of Q4_K q, k and a Q6_K v): this part's
     * outputs (the first ones), and the next part (its type, weights and bias; its outputs next in y), or NULL */
    int64_t rows;
    const struct GGMLLinear *next;
} GGMLLinear;

typedef struct {
    const void *input_norm, *post_norm;   /* RMSNorm weights, activations' dtype */
    GGMLLinear qkv, o, gate_up, down;
    void *k_cache, *v_cache;              /* [blocks, block_size, hkv, D], activations' dtype */
    int window, split;                    /* the attention kernel's sliding window and keys per work item */
    const void *q_norm, *k_norm;          /* RMSNorm weights of each q and k head (Qwen3), or NULL */
} DecoderLayer;

typedef struct {
    matmul_fn matmul;
    attention_fn attention;
    int threads, bf16, kv_type, hq, hkv, D, H, I, block_size;   /* kv_type: the caches' ELEM_* */
    float eps, scale, softcap;
    int64_t T;
    const int64_t *slots;
    const void *cos_sin;
    const int32_t *tables, *seq_lens, *cu;
    int table_width, num_seqs, tree_width;
    const int64_t *seqs;
    const uint8_t *tree;
    const void *final_norm;   /* the model's last RMSNorm weight, activations' dtype */
    GGMLLinear head;          /* the LM head: decode_layers' logits where logits is not NULL, a burst's tokens */
    float *logits;            /* [T, head.n] */
    argmax_fn argmax;         /* ggml_argmax, for a burst's tokens where head_norms is set */
    const float *head_norms;  /* upper bounds of the head's row norms, or NULL */
    const int32_t *row_slots; /* [T]: each row's adapter slot (0: none), or NULL: no adapters in the step */
    double *timings;          /* [parts below]: each part's seconds added up (the profiler's), or NULL */
    /* the same kernels run by every thread of one region for all the layers (team_layers), or NULL */
    team_matmul_fn team_matmul;
    team_takes_fn team_takes;
    attention_fn team_attention;
} DecodeStep;

/* the parts of a step the profiler sees (decode_step.STEP_PARTS names them in this order) */
enum { PART_NORMS, PART_QKV, PART_ROTARY, PART_ATTENTION, PART_O, PART_GATE_UP, PART_MLP_ACT, PART_DOWN, PART_HEAD };

/* run `call`, its seconds added to part's timing where the step is timed */
#define TIMED(part, call)                                                                                             \
    do {                                                                                                              \
        const double start_ = s->timings ? omp_get_wtime() : 0;                                                       \
        call;                                                                                                         \
        if (s->timings)                                                                                               \
            s->timings[part] += omp_get_wtime() - start_;                                                             \
    } while (0)

/* The step's own per-row stages, split as above (row t of the step s in scope) */
#define EACH_ROW(...) FOR_ROWS(s->T, s->threads, __VA_ARGS__)

/* sum of a[i] b[i] for i < n, a and b in fp32 or bf16 (a_bf16, b_bf16), in fp32 */
static inline float dot(const void *a, int a_bf16, const void *b, int b_bf16, int64_t n) {
    vn part[4] = {{0}, {0}, {0}, {0}};   /* four chains: each FMA waited on the previous one's result */
    int64_t i = 0;
    for (; i + 4 * NATIVE <= n; i += 4 * NATIVE)
        for (int c = 0; c < 4; c++)
            part[c] += load_native(a, i + c * NATIVE, a_bf16) * load_native(b, i + c * NATIVE, b_bf16);
    for (; i + NATIVE <= n; i += NATIVE)
        part[0] += load_native(a, i, a_bf16) * load_native(b, i, b_bf16);
    float sum = sum_lanes((part[0] + part[1]) + (part[2] + part[3]));
    for (; i < n; i++)
        sum += load(a, i, a_bf16) * load(b, i, b_bf16);
    return sum;
}

/* out lane i = a[i] . x for 8 rows a[i] = b + i * stride of r elements (the activations' dtype) and x fp32: each row's
 * products in 8 lanes, then sum_each8 for the 8 sums */
static inline v8 dots8(const void *b, int bf16, int64_t stride, const float *x, int64_t r) {
    v8 a[8];
    for (int i = 0; i < 8; i++) {
        v8 acc = {0};
        int64_t c = 0;
        for (; c + 8 <= r; c += 8) {
            v8 xc;
            memcpy(&xc, x + c, sizeof xc);
            acc += load8(b, i * stride + c, bf16) * xc;
        }
        for (; c < r; c++)
            acc[0] += load(b, i * stride + c, bf16) * x[c];
        a[i] = acc;
    }
    return sum_each8(a);
}

/* this thread's share [*i0, *i1) of [0, n) */
static inline void share(int64_t n, int64_t *i0, int64_t *i1) {
    const int64_t threads = omp_get_num_threads(), id = omp_get_thread_num();
    *i0 = n * id / threads, *i1 = n * (id + 1) / threads;
}

/* y[t] += B_s (A_s x[t]) for each row t whose slot s has an adapter on the linear l ([T, k] -> [T, n]), each product
 * rounded to the activations' dtype and then the sum, as LoRAWeights.add_delta computes it in PyTorch (up to the
 * order of each dot product's terms): every row's A products, then its B products by output rows (B's zero blocks
 * skipped), each split over the threads. Returns 1 when out of memory. */
static int lora_add(const DecodeStep *s, const LoRAStack *l, const void *x, void *y, int64_t k, int64_t n) {
    const int64_t T = s->T, R = l->R, es = s->bf16 ? 2 : 4;
    const int bf16 = s->bf16;
    float *ax = malloc(sizeof(float) * (T * R + 1));   /* [T, R]: A_s x[t], each rounded */
    if (!ax)
        return 1;
#pragma omp parallel num_threads(s->threads)
    {
        int64_t i0, i1;
        for (int64_t t = 0; t < T; t++) {
            const int slot = s->row_slots[t];
            share(slot > 0 ? l->ranks[slot] : 0, &i0, &i1);
            for (int64_t j = i0; j < i1; j++)
                ax[t * R + j] = round_to(dot((const char *)l->a + (slot * R + j) * k * es, bf16,
                                             (const char *)x + t * k * es, bf16, k), bf16);
        }
#pragma omp barrier
        for (int64_t t = 0; t < T; t++) {
            const int slot = s->row_slots[t];
            const int64_t r = slot > 0 ? l->ranks[slot] / l->parts : 0;
            for (int part = 0; r && part < l->parts; part++) {
                const int64_t first = l->starts[part], end = part + 1 < l->parts ? l->starts[part + 1] : n;
                share((end - first) / 8, &i0, &i1);   /* 8 rows at a time; the last ones below */
                for (int64_t o = first + 8 * i0; o < first + 8 * i1; o += 8) {
                    const v8 delta = dots8((const char *)l->b + ((slot * n + o) * R + part * r) * es, bf16, R,
                                           ax + t * R + part * r, r);
                    store8(y, t * n + o, round8(load8(y, t * n + o, bf16) + round8(delta, bf16), bf16), bf16);
                }
                if (omp_get_thread_num() == 0)
                    for (int64_t o = first + (end - first) / 8 * 8; o < end; o++) {
                        const float delta = round_to(dot((const char *)l->b + ((slot * n + o) * R + part * r) * es,
                                                         bf16, ax + t * R + part * r, 0, r), bf16);
                        store(y, t * n + o, load(y, t * n + o, bf16) + delta, bf16);
                    }
            }
        }
    }
    free(ax);
    return 0;
}

/* rows [T, n] (n values a row, the activations' dtype) times each row's vector scales[slot] where its slot has one,
 * in fp32 and rounded back, as lanner.lora.ops.scale_rows computes it */
static void scale_rows(const DecodeStep *s, const float *const *scales, void *rows, int64_t n) {
    for (int64_t t = 0; t < s->T; t++) {
        const float *v = s->row_slots[t] > 0 ? scales[s->row_slots[t]] : NULL;
        for (int64_t i = 0; v && i < n; i++)
            store(rows, t * n + i, load(rows, t * n + i, s->bf16) * v[i], s->bf16);
    }
}

/* how many of the step's rows have each kind of adapter on linear l: LoRA ranks, IA3 input and output scales */
static void adapter_rows(const DecodeStep *s, const GGMLLinear *l, int *ranks, int *inputs, int *outputs) {
    for (int64_t t = 0; l->lora.a && s->row_slots && t < s->T; t++) {
        const int slot = s->row_slots[t];
        *ranks += slot > 0 && l->lora.ranks[slot] > 0;
        *inputs += slot > 0 && l->lora.in_scales[slot] != NULL;
        *outputs += slot > 0 && l->lora.out_scales[slot] != NULL;
    }
}

/* the matmul flags of linear l's call in step s: its own, and the activations' dtype in and (unless y_fp32) out */
static int matmul_flags(const DecodeStep *s, const GGMLLinear *l, int y_fp32) {
    return l->flags | (s->bf16 ? MATMUL_X_BF16 : 0) | (s->bf16 && !y_fp32 ? MATMUL_Y_BF16 : 0);
}

/* y [T, l->n] = x W^T (+ b) of linear l, part by part (one call each, into its columns of y) */
static int matmul_parts(const DecodeStep *s, const GGMLLinear *l, const void *x, void *y, int y_fp32) {
    const int64_t es = s->bf16 && !y_fp32 ? 2 : 4;
    int failed = 0;
    int64_t at = 0;
    for (const GGMLLinear *p = l; p && !failed; at += p->rows, p = p->next)
        failed = s->matmul(p->type, p->w, p->packed, p->row_bytes, p->rows, p->k, x, p->k, s->T, (char *)y + at * es,
                           l->n, p->bias, s->threads, matmul_flags(s, p, y_fp32));
    return failed;
}

/* silu(gate) * up of the MLP's input h into a [T, I] in one matmul call (MATMUL_SILU_MUL: on the tiles the gate_up
 * output is never written), where no row adapts gate_up and it has no bias; else 0 and nothing done */
static int fused_silu(const DecodeStep *s, const GGMLLinear *l, const void *h, void *a, int *failed) {
    int ranks = 0, inputs = 0, outputs = 0;
    adapter_rows(s, l, &ranks, &inputs, &outputs);
    if (ranks || inputs || outputs || l->bias || l->next)
        return 0;
    *failed |= s->matmul(l->type, l->w, l->packed, l->row_bytes, l->n, l->k, h, l->k, s->T, a, l->n / 2, NULL,
                         s->threads, matmul_flags(s, l, 0) | MATMUL_SILU_MUL);
    return 1;
}

/* y = x W^T (+ b) for T rows of x in the activations' dtype, into y in fp32 or in that dtype (as
 * GGMLLinear.small: in fp32, rounded once at the end), with the rows' adapters applied as Linear.forward applies
 * them: IA3 input scales on a copy of x, then LoRA deltas (from x unscaled) and IA3 output scales */
static int linear(const DecodeStep *s, const GGMLLinear *l, const void *x, void *y, int y_fp32) {
    int ranks = 0, inputs = 0, outputs = 0;   /* rows with each kind of adapter on this linear (not the head's) */
    if (!y_fp32)
        adapter_rows(s, l, &ranks, &inputs, &outputs);
    const int64_t bytes = s->T * l->k * (s->bf16 ? 2 : 4);
    void *scaled = inputs ? malloc(bytes) : NULL;
    if (inputs && !scaled)
        return 1;
    if (scaled) {
        memcpy(scaled, x, bytes);
        scale_rows(s, l->lora.in_scales, scaled, l->k);
    }
    int failed = matmul_parts(s, l, scaled ? scaled : x, y, y_fp32);
    free(scaled);
    if (!failed && ranks)
        failed = lora_add(s, &l->lora, x, y, l->k, l->n);
    if (!failed && outputs)
        scale_rows(s, l->lora.out_scales, y, l->n);
    return failed;
}

/* logits [T, V] of the normed hidden states h in fp32, rounded to bf16 where the activations are bf16: the
 * PyTorch path's head output in the activations' dtype, widened again */
static int head_logits(const DecodeStep *s, const void *h) {
    int failed = linear(s, &s->head, h, s->logits, 1);
    if (!s->bf16)
        return failed;
    EACH_ROW({
        float *row = s->logits + t * s->head.n;
        int64_t i = 0;
        for (; i + 16 <= s->head.n; i += 16)
            store16(row, i, round16(load16(row, i, 0), 1), 0);
        for (; i < s->head.n; i++) {
            uint16_t b;
            store(&b, 0, row[i], 1);
            row[i] = load(&b, 0, 1);
        }
    });
    return failed;
}

/* RMSNorm of every q and k head of qkv [T, (hq + 2 hkv) D] in place, each head as rms_norm normalizes a row
 * (Attention.norm_heads: Qwen3's, before rotary) */
static void norm_heads(const DecodeStep *s, const DecoderLayer *l, void *qkv) {
    const int64_t D = s->D, width = (s->hq + 2 * s->hkv) * D, es = s->bf16 ? 2 : 4;
    EACH_ROW({
        char *q = (char *)qkv + t * width * es, *k = q + s->hq * D * es;
        for (int h = 0; h < s->hq; h++)
            rms_norm_row(q, NULL, l->q_norm, q, h, D, s->eps, s->bf16);
        for (int h = 0; h < s->hkv; h++)
            rms_norm_row(k, NULL, l->k_norm, k, h, D, s->eps, s->bf16);
    });
}

/* attention of the q rows (width values apart, the activations' dtype) into out [T, hq D] by the kernel fn (the
 * step's attention, or its team_attention inside team_layers' region); qf, qb: room for q in fp32 and bf16 */
static int attend(const DecodeStep *s, const DecoderLayer *l, attention_fn fn, const void *q, int64_t width, void *out,
                  float *qf, uint16_t *qb) {
    const int64_t qn = (int64_t)s->hq * s->D;
    EACH_ROW({
        convert((const char *)q + t * width * (s->bf16 ? 2 : 4), qf + t * qn, qn, s->bf16, 0);
        if (s->kv_type == ELEM_BF16)
            convert((const char *)q + t * width * (s->bf16 ? 2 : 4), qb + t * qn, qn, s->bf16, 1);
    });
    /* with a bf16 cache the query scores in bf16 (rounded where it is fp32), as attention.native passes it */
    return fn(qf, s->kv_type == ELEM_BF16 ? qb : NULL, l->k_cache, l->v_cache, s->kv_type, s->tables, s->table_width,
              s->seq_lens, s->cu, s->seqs, s->num_seqs, s->tree, s->tree_width, s->hq, s->hkv, s->D, s->block_size,
              s->scale, l->window, s->softcap, l->split, out, s->bf16, NULL, s->threads);
}

/* ---- a step's layers in one parallel region ------------------------------------------------------------ *
 * At a decode step's few rows every linear is a GEMV that streams its weights, and starting a parallel region
 * for each call (with one thread alone between them: norms, rotary, quantizing the row) cost those GEMVs ~10 %:
 * a fork and join, and each stream's restart. Here every thread runs every stage: the stages before a linear
 * (the norm, rotary of the q heads, silu) each thread computes for itself into its own buffers, so it never
 * waits for another; the linears and attention share their work out and end at a barrier, the one
 * synchronization a stage. The residual stream alternates between two buffers (thread 0 writes the new one
 * while every thread reads the old). The results are decode_layers' other path's, bitwise. */

/* whether every call of the step's layers can run so: a few rows (the int8 GEMV), no adapters, single-part
 * linears, and the team kernels at hand */
static int team_step(const DecodeStep *s, const DecoderLayer *layers, int num_layers) {
    if (!s->team_matmul || !s->team_takes || !s->team_attention)
        return 0;
    for (int i = 0; i < num_layers; i++) {
        const GGMLLinear *linears[4] = {&layers[i].qkv, &layers[i].o, &layers[i].gate_up, &layers[i].down};
        for (int j = 0; j < 4; j++) {
            const GGMLLinear *l = linears[j];
            int ranks = 0, inputs = 0, outputs = 0;
            adapter_rows(s, l, &ranks, &inputs, &outputs);
            if (ranks || inputs || outputs || l->next
                || !s->team_takes(l->type, l->packed, l->n, l->k, s->T, matmul_flags(s, l, 0)))
                return 0;
        }
    }
    return 1;
}

/* rows [T, H] of x, plus the stream r_in where given (the sum rounded as stored), into sum (this thread's), and
 * by thread 0 into r_out; then their RMSNorm into h (this thread's): rms_norm's results */
static void team_norm(const DecodeStep *s, const void *x, const void *r_in, void *r_out, void *sum,
                      const void *weight, void *h) {
    const int64_t n = s->T * s->H;
    int64_t i = 0;
    for (; r_in && i + NATIVE <= n; i += NATIVE)
        store_native(sum, i, round_native(load_native(x, i, s->bf16) + load_native(r_in, i, s->bf16), s->bf16),
                     s->bf16);
    for (; i < n; i++)
        store(sum, i, r_in ? load(x, i, s->bf16) + load(r_in, i, s->bf16) : load(x, i, s->bf16), s->bf16);
    if (omp_get_thread_num() == 0)
        memcpy(r_out, sum, n * (s->bf16 ? 2 : 4));
    for (int64_t t = 0; t < s->T; t++)
        rms_norm_row(sum, NULL, weight, h, t, s->H, s->eps, s->bf16);
}

/* the q heads of qkv normed (Qwen3) and rotated into q [T, hq D] (this thread's), and this thread's share of the
 * k heads the same into the caches with their v heads (head: room for one): rope_store's (and norm_heads')
 * results, qkv only read */
static void team_rope(const DecodeStep *s, const DecoderLayer *l, const void *qkv, void *q, void *head) {
    const int64_t D = s->D, width = (s->hq + 2 * s->hkv) * D, qn = s->hq * D, es = s->bf16 ? 2 : 4;
    const int64_t kv_es = s->kv_type ? 2 : 4, kv = s->hkv * D;
    int64_t h0, h1;
    share(s->hkv, &h0, &h1);
    for (int64_t t = 0; t < s->T; t++) {
        char *qt = (char *)q + t * qn * es;
        memcpy(qt, (const char *)qkv + t * width * es, qn * es);
        for (int h = 0; h < s->hq; h++) {
            if (l->q_norm)
                rms_norm_row(qt, NULL, l->q_norm, qt, h, D, s->eps, s->bf16);
            rotate_head(qt + h * D * es, s->cos_sin, t, D, s->bf16);
        }
        for (int64_t h = h0; h < h1 && s->slots[t] >= 0; h++) {
            const char *k = (const char *)qkv + (t * width + qn + h * D) * es, *v = k + kv * es;
            memcpy(head, k, D * es);
            if (l->q_norm)   /* (norm_heads' condition: both or neither) */
                rms_norm_row(head, NULL, l->k_norm, head, 0, D, s->eps, s->bf16);
            rotate_head(head, s->cos_sin, t, D, s->bf16);
            convert(head, (char *)l->k_cache + (s->slots[t] * kv + h * D) * kv_es, D, s->bf16, s->kv_type);
            convert(v, (char *)l->v_cache + (s->slots[t] * kv + h * D) * kv_es, D, s->bf16, s->kv_type);
        }
    }
}

/* the bytes of each thread's own buffers in team_layers (whole: all of them; else where its fp32 q starts): the
 * stream's sum, the normed rows, q, silu * up and one k head in the activations' dtype, then q in fp32 and bf16 */
static int64_t team_bytes(const DecodeStep *s, int whole) {
    const int64_t T = s->T, qn = (int64_t)s->hq * s->D;
    const int64_t floats_at = ((T * (2 * s->H + qn + s->I) + s->D) * (s->bf16 ? 2 : 4) + 63) / 64 * 64;
    return whole ? (floats_at + T * qn * 6 + 63) / 64 * 64 : floats_at;
}

/* linear l of x (this thread's or shared) into y (shared), by every thread (no bias of y_fp32 or adapters here) */
static int team_linear(const DecodeStep *s, const GGMLLinear *l, const void *x, void *y) {
    return s->team_matmul(l->type, l->w, l->packed, l->row_bytes, l->n, l->k, x, l->k, s->T, y, l->n, l->bias,
                          matmul_flags(s, l, 0));
}

/* decode_layers' layers (the final norm and head aside) when team_step: x [T, H] in, the last layer's output in
 * x and its residual stream in residual; stream: room for the other buffer of that stream, shared: the step's
 * qkv | attention out | gate_up (the act buffer), mine: each thread's own buffers */
static int team_layers(const DecodeStep *step, const DecoderLayer *layers, int num_layers, void *x, void *residual,
                       void *stream, char *shared, char *mine) {
    const int64_t T = step->T, es = step->bf16 ? 2 : 4, qn = (int64_t)step->hq * step->D;
    const int64_t width = qn + 2 * (int64_t)step->hkv * step->D;
    int failed = 0;
#pragma omp parallel num_threads(step->threads) reduction(| : failed)
    {
        DecodeStep me = *step;   /* the timings are thread 0's */
        me.timings = omp_get_thread_num() ? NULL : step->timings;
        const DecodeStep *s = &me;
        char *own = mine + omp_get_thread_num() * team_bytes(s, 1);
        void *sum = own, *h = own + T * s->H * es, *q = (char *)h + T * s->H * es, *a = (char *)q + T * qn * es;
        void *head = (char *)a + T * s->I * es;
        float *qf = (float *)(own + team_bytes(s, 0));
        uint16_t *qb = (uint16_t *)(qf + T * qn);
        void *qkv = shared, *attn = shared + T * width * es, *gu = (char *)attn + T * qn * es;
        /* (no early exit on a failure: every thread must reach every barrier) */
        for (int i = 0; i < num_layers; i++) {
            const DecoderLayer *l = &layers[i];
            TIMED(PART_NORMS, team_norm(s, x, i ? residual : NULL, stream, sum, l->input_norm, h));
            TIMED(PART_QKV, failed |= team_linear(s, &l->qkv, h, qkv));
            TIMED(PART_ROTARY, team_rope(s, l, qkv, q, head));
            TIMED(PART_ATTENTION, failed |= attend(s, l, s->team_attention, q, qn, attn, qf, qb));
            TIMED(PART_O, failed |= team_linear(s, &l->o, attn, x));
            TIMED(PART_NORMS, team_norm(s, x, stream, residual, sum, l->post_norm, h));
            TIMED(PART_GATE_UP, failed |= team_linear(s, &l->gate_up, h, gu));
            TIMED(PART_MLP_ACT, silu_mul(gu, a, T, s->I, s->bf16));
            TIMED(PART_DOWN, failed |= team_linear(s, &l->down, a, x));
        }
    }
    return failed;
}

/* x [T, H]: the embeddings in; out [T, H]: the final norm of the last layer's output plus the residual
 * stream (residual [T, H]: scratch for that stream); and the logits of every row where s->logits is set.
 * Returns nonzero when a kernel failed (out of memory). */
int decode_layers(const DecodeStep *s, const DecoderLayer *layers, int num_layers, void *x, void *residual,
                  void *out) {
    const int64_t T = s->T, es = s->bf16 ? 2 : 4, qn = (int64_t)s->hq * s->D, H = s->H, I = s->I;
    const int64_t width = qn + 2 * (int64_t)s->hkv * s->D;
    /* act: normed input | qkv | attention out | gate_up | silu * up; fp32: q */
    const int64_t act_n = T * (s->H + width + qn + 2 * s->I + s->I), f_n = T * qn;
    char *act = malloc(act_n * es);
    float *f = malloc(f_n * 4);
    uint16_t *qb = malloc(T * qn * 2);
    if (!act || !f || !qb) {
        free(act), free(f), free(qb);
        return 1;
    }
    void *h = act, *qkv = act + T * s->H * es, *attn = (char *)qkv + T * width * es;
    void *gu = (char *)attn + T * qn * es, *a = (char *)gu + T * 2 * s->I * es;
    float *qf = f;
    int failed = 0;
    char *team = team_step(s, layers, num_layers) ? malloc(T * H * es + s->threads * team_bytes(s, 1) + 128) : NULL;
    if (team) {   /* (the other buffer of the stream, then each thread's own, 64-byte aligned) */
        char *mine = team + (T * H * es + 63) / 64 * 64 + (64 - (uintptr_t)team % 64) % 64;
        failed = team_layers(s, layers, num_layers, x, residual, team, qkv, mine);
        num_layers = 0;
    } else
        memcpy(residual, x, T * H * es);
    for (int i = 0; i < num_layers && !failed; i++) {
        const DecoderLayer *l = &layers[i];
        TIMED(PART_NORMS, rms_norm(x, i ? residual : NULL, l->input_norm, h, T, H, s->eps, s->bf16));
        TIMED(PART_QKV, failed |= linear(s, &l->qkv, h, qkv, 0));
        if (l->q_norm)
            TIMED(PART_NORMS, norm_heads(s, l, qkv));
        TIMED(PART_ROTARY, rope_store(qkv, s->cos_sin, T, s->hq, s->hkv, s->D, s->slots, l->k_cache, l->v_cache,
                                      s->bf16, s->kv_type));
        TIMED(PART_ATTENTION, failed |= attend(s, l, s->attention, qkv, width, attn, qf, qb));
        TIMED(PART_O, failed |= linear(s, &l->o, attn, x, 0));
        TIMED(PART_NORMS, rms_norm(x, residual, l->post_norm, h, T, H, s->eps, s->bf16));
        int fused = 0;   /* (the profiler then sees the activation inside gate_up's time) */
        TIMED(PART_GATE_UP, fused = fused_silu(s, &l->gate_up, h, a, &failed));
        if (!fused) {
            TIMED(PART_GATE_UP, failed |= linear(s, &l->gate_up, h, gu, 0));
            TIMED(PART_MLP_ACT, silu_mul(gu, a, T, I, s->bf16));
        }
        TIMED(PART_DOWN, failed |= linear(s, &l->down, a, x, 0));
    }
    TIMED(PART_NORMS, rms_norm(x, residual, s->final_norm, out, T, H, s->eps, s->bf16));
    if (s->logits && !failed)
        TIMED(PART_HEAD, failed |= head_logits(s, out));
    free(act), free(f), free(qb), free(team);
    return failed;
}

/* ---- decode steps of the same rows in one call (a burst) ---------------------------------------------- *
 * Each step is decode_layers as above; then every row's token -- its argmax (numpy's: the first largest, a NaN
 * counting as largest), or drawn as sample_rows below draws it at the row's uniform number of that step -- is
 * looked up in the embedding table as that row's next input, at the next position of its sequence. The Python
 * around a step (scheduling, metadata, sampling) is paid once per burst: at batch 1 it was 0.4-0.6 ms of a
 * 3.6-4 ms step. */
typedef struct {
    dequantize_fn dequantize;
    int embed_type;
    const uint8_t *embed;       /* the token embeddings, rows of GGML blocks */
    int64_t embed_row_bytes;
    const void *rotary;         /* cos | sin [positions, D] in the activations' dtype */
    const int64_t *positions;   /* [T]: each row's position at the first step */
    const int64_t *stops;       /* tokens that end a row */
    int num_stops, steps;
    int64_t *tokens;            /* [steps, T]: each step's tokens */
    const float *temps, *top_p, *min_p;   /* each row's sampling (sample_rows), or NULL: every row greedy */
    const int64_t *top_k;
    const float *uniforms;      /* [steps, T]: each step's uniform number of each row */
    const float *repetition, *presence, *frequency;   /* each row's penalties, or NULL: none */
    uint8_t *seen;              /* [T, V]: the tokens of each row's prompt and output, updated step by step */
    int32_t *counts;            /* [T, V]: how often each token is in the row's output, the same */
    const int32_t *keep;        /* [T]: where each row's logits go in kept (rows asking logprobs), -1: nowhere */
    int64_t num_kept;
    float *kept;                /* [steps, num_kept, V]: those rows' logits of each step, before penalties */
} Burst;

static int64_t argmax(const float *row, int64_t n) {
    v16 best16 = (v16){0} - INFINITY;
    v16i nan = {0};
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) {
        v16 v;
        memcpy(&v, row + i, sizeof v);
        best16 = max16v(v, best16);
        nan |= nan16(v);
    }
    float best = -INFINITY;
    int any_nan = 0;
    for (int l = 0; l < 16; l++)
        best = best16[l] > best ? best16[l] : best, any_nan |= nan[l] != 0;
    for (int64_t j = i; j < n; j++)
        best = row[j] > best ? row[j] : best, any_nan |= row[j] != row[j];
    for (i = 0; i + 16 <= n; i += 16) {   /* the first 16 values holding it, then the lane */
        v16 v;
        memcpy(&v, row + i, sizeof v);
        v16i hit = any_nan ? nan16(v) : (v16i)(v == best);
        int any = 0;
        for (int l = 0; l < 16; l++)
            any |= hit[l] != 0;
        if (any)
            break;
    }
    for (; i < n; i++)
        if (any_nan ? row[i] != row[i] : row[i] == best)
            return i;
    return 0;
}

static int is_stop(const Burst *b, int64_t token) {
    for (int i = 0; i < b->num_stops; i++)
        if (b->stops[i] == token)
            return 1;
    return 0;
}

/* ---- sampling ------------------------------------------------------------------------------------------ *
 * A row's token as Sampler draws it (lanner/engine/sampler.py, which has the PyTorch path): logits / temperature;
 * the top-k, then the top-p nucleus of those renormalized (the most likely token always kept; top_p 1 cuts
 * nothing); tokens under min_p times the most likely one's probability dropped; then the first token, in
 * vocabulary order, whose cumulative probability passes u times the total. Two passes over the row (its largest
 * value; each token's weight exp(x - max) and their sum), and a row that truncates sorts only its candidates:
 * the tokens whose weight is at least `cutoff`, widened while they hold fewer than k tokens or (no top-k) less
 * than top_p of the mass. PyTorch's ops took 6 full passes and more at 49k tokens: 28 ms for 64 rows. */
typedef struct {
    float w;
    int32_t id;
} Weighted;

static int heavier_first(const void *a, const void *b) {   /* ties: the lower token first */
    const Weighted *x = a, *y = b;
    return x->w != y->w ? (x->w < y->w) - (x->w > y->w) : (x->id > y->id) - (x->id < y->id);
}

static int lower_id_first(const void *a, const void *b) {
    const Weighted *x = a, *y = b;
    return (x->id > y->id) - (x->id < y->id);
}

/* weights w[i] = exp(x_i - max) of x = row / temp into w; returns their sum (0 where every logit is -inf) */
static double weigh(const float *row, int64_t V, float temp, float *w) {
    vn best = (vn){0} - INFINITY;
    int64_t i = 0;
    for (; i + NATIVE <= V; i += NATIVE)
        best = max_native(load_native(row, i, 0) / temp, best);
    float top = -INFINITY;
    for (int l = 0; l < NATIVE; l++)
        top = best[l] > top ? best[l] : top;
    for (; i < V; i++)
        top = row[i] / temp > top ? row[i] / temp : top;
    if (top == -INFINITY)
        return 0.0;
    double total = 0.0;
    for (i = 0; i + NATIVE <= V; i += NATIVE) {
        vn e = exp_native(load_native(row, i, 0) / temp - top);
        store_native(w, i, e, 0);
        for (int l = 0; l < NATIVE; l++)
            total += e[l];
    }
    for (; i < V; i++) {
        w[i] = expf(row[i] / temp - top);
        total += w[i];
    }
    return total;
}

/* The kept tokens of a truncating row, heaviest first, into cand; returns how many (k: top-k, V for none) */
static int64_t nucleus(const float *w, int64_t V, double total, int64_t k, float top_p, Weighted *cand) {
    int64_t n = 0;
    for (float cutoff = 1e-3f;; cutoff = cutoff > 1e-30f ? cutoff * 1e-4f : 0.0f) {   /* few to sort first */
        double mass = 0.0;
        n = 0;
        for (int64_t i = 0; i < V; i++)
            if (w[i] >= cutoff) {
                cand[n++] = (Weighted){w[i], (int32_t)i};
                mass += w[i];
            }
        if (cutoff == 0.0f || (k < V ? n >= k : mass >= top_p * total))
            break;
    }
    qsort(cand, n, sizeof *cand, heavier_first);
    n = n < k ? n : k;
    double norm = 0.0, before = 0.0;
    for (int64_t j = 0; j < n; j++)
        norm += cand[j].w;
    int64_t kept = 0;
    for (; kept < n; kept++) {   /* mass strictly above token `kept` of the top-k renormalized */
        if (kept > 0 && top_p < 1.0f && before >= top_p * norm)
            break;
        before += cand[kept].w;
    }
    return kept;
}

static int64_t sample_row(const float *row, int64_t V, float temp, int64_t top_k, float top_p, float min_p, float u,
                          float *w, Weighted *cand) {
    if (!(temp > 0.0f))   /* a greedy row */
        return argmax(row, V);
    const double total = weigh(row, V, temp, w);
    if (!(total > 0.0))   /* nothing allowed (or NaN logits): the first token */
        return 0;
    const int64_t k = top_k > 0 && top_k < V ? top_k : V;
    int64_t kept = 0;
    if (k == V && top_p >= 1.0f) {   /* no truncation: the tokens min-p keeps (the best weighs 1), in order */
        for (int64_t i = 0; i < V; i++)
            if (w[i] >= min_p)
                cand[kept++] = (Weighted){w[i], (int32_t)i};
    } else {
        kept = nucleus(w, V, total, k, top_p, cand);
        while (kept > 1 && cand[kept - 1].w < min_p * cand[0].w)
            kept--;
        qsort(cand, kept, sizeof *cand, lower_id_first);
    }
    double mass = 0.0, acc = 0.0;
    for (int64_t j = 0; j < kept; j++)
        mass += cand[j].w;
    for (int64_t j = 0; j < kept; j++)
        if ((acc += cand[j].w) > u * mass)
            return cand[j].id;
    return cand[kept - 1].id;
}

/* tokens[r] for rows r < R of logits [R, V] (row stride `stride`): temps (0: greedy, the argmax), top_k (<= 0:
 * none), top_p, min_p and the uniform u in [0, 1) per row. Returns nonzero when scratch memory ran out (tokens not written). */
int sample_rows(const float *logits, int64_t stride, int64_t R, int64_t V, const float *temps, const int64_t *top_k,
                const float *top_p, const float *min_p, const float *u, int threads, int64_t *tokens) {
    int failed = 0;
#pragma omp parallel num_threads(threads) if (R >= 2) reduction(| : failed)
    {
        float *w = malloc(V * sizeof *w);
        Weighted *cand = malloc(V * sizeof *cand);
        failed = !w || !cand;
#pragma omp for schedule(dynamic, 1)
        for (int64_t r = 0; r < R; r++)
            if (!failed)
                tokens[r] = sample_row(logits + r * stride, V, temps[r], top_k[r], top_p[r], min_p[r], u[r], w, cand);
        free(w), free(cand);
    }
    return failed;
}

/* v rounded to fp32 here, as PyTorch's separate ops round it: no FMA or reassociation across (-fassociative-math) */
#define ROUNDED(v) __asm__("" : "+v"(v))

/* The penalties of Sampler (apply_penalties) on each row's logits, in place and bitwise as PyTorch applies them:
 * repetition (HF's) on every token of the prompt and output, then frequency per occurrence and presence once for
 * each token of the output (OpenAI's). */
static void penalize(const Burst *b, float *logits, int64_t T, int64_t V) {
    for (int64_t t = 0; t < T; t++) {
        const float rep = b->repetition[t], pres = b->presence[t], freq = b->frequency[t];
        float *row = logits + t * V;
        const uint8_t *seen = b->seen + t * V;
        const int32_t *counts = b->counts + t * V;
        for (int64_t i = 0; rep != 1.0f && i < V; i++)
            if (seen[i])
                row[i] = row[i] > 0.0f ? row[i] / rep : row[i] * rep;
        for (int64_t i = 0; (pres != 0.0f || freq != 0.0f) && i < V; i++)
            if (counts[i]) {   /* (a token not in the output loses freq * 0 + pres * 0: nothing) */
                float cut = freq * (float)counts[i];
                ROUNDED(cut);
                cut += pres;
                ROUNDED(cut);
                row[i] -= cut;
            }
    }
}

/* Up to b->steps steps of every layer and the LM head (s->logits set; row t is sequence t of the tables, its
 * one new token) from the embeddings x [T, H]. Stops after a step where any row gave a stop token: the next
 * step's batch would be one row smaller. Returns the steps run, or -1 when a kernel failed (out of memory). */
int decode_burst(const DecodeStep *s, const DecoderLayer *layers, int num_layers, const Burst *b, void *x,
                 void *residual, void *out) {
    const int64_t T = s->T, D = s->D, es = s->bf16 ? 2 : 4, bs = s->block_size;
    DecodeStep step = *s;
    int64_t *slots = malloc(T * sizeof *slots);
    int32_t *lens = malloc(T * sizeof *lens);
    char *cos_sin = malloc(T * D * es);
    int ran = 0, failed = !slots || !lens || !cos_sin;
    step.slots = slots, step.seq_lens = lens, step.cos_sin = cos_sin;
    for (int i = 0; i < b->steps && !failed; i++) {
        int64_t *tokens = b->tokens + i * T;
        for (int64_t t = 0; t < T; t++) {
            const int64_t pos = b->positions[t] + i;
            const int32_t *table = s->tables + t * s->table_width;
            slots[t] = (int64_t)table[pos / bs] * bs + pos % bs;
            lens[t] = s->seq_lens[t] + i;
            memcpy(cos_sin + t * D * es, (const char *)b->rotary + pos * D * es, D * es);
        }
        if (i)
            failed |= b->dequantize(b->embed_type, b->embed, b->embed_row_bytes, s->H, tokens - T, T, x, s->bf16, 1);
        if (s->head_norms) {   /* the tokens the logits' argmax gives, from the int8 head and the exact one's few */
            step.logits = NULL;
            failed |= decode_layers(&step, layers, num_layers, x, residual, out);
            const GGMLLinear *h = &s->head;
            if (!failed)
                TIMED(PART_HEAD, failed = s->argmax(h->type, h->w, h->packed, h->row_bytes, h->n, h->k, out, h->k, T,
                                                    matmul_flags(s, h, 1), s->head_norms, s->bf16, s->logits,
                                                    s->threads, tokens));
        } else if (b->temps) {   /* rows that sample or have penalties: every row's logits */
            const int64_t V = s->head.n;
            failed |= decode_layers(&step, layers, num_layers, x, residual, out);
            for (int64_t t = 0; b->keep && t < T; t++)
                if (b->keep[t] >= 0)
                    memcpy(b->kept + (i * b->num_kept + b->keep[t]) * V, s->logits + t * V, V * sizeof(float));
            if (b->seen && !failed)
                penalize(b, s->logits, T, V);
            failed = failed || sample_rows(s->logits, V, T, V, b->temps, b->top_k, b->top_p, b->min_p,
                                           b->uniforms + i * T, s->threads, tokens);
            for (int64_t t = 0; b->seen && !failed && t < T; t++)   /* the new tokens are history for the next step */
                b->seen[t * V + tokens[t]] = 1, b->counts[t * V + tokens[t]]++;
        } else {   /* the argmax of the head's logits as a step has them (on the tiles none is written) */
            step.logits = NULL;
            failed |= decode_layers(&step, layers, num_layers, x, residual, out);
            const GGMLLinear *h = &s->head;
            const int flags = matmul_flags(s, h, 0) | MATMUL_ARGMAX;   /* (bf16: the logits' rounding) */
            if (!failed)
                TIMED(PART_HEAD, failed = s->matmul(h->type, h->w, h->packed, h->row_bytes, h->n, h->k, out, h->k, T,
                                                    tokens, 1, h->bias, s->threads, flags));
        }
        if (failed)
            break;
        int stopped = 0;
        for (int64_t t = 0; t < T; t++)
            stopped |= is_stop(b, tokens[t]);
        ran++;
        if (stopped)
            break;
    }
    free(slots), free(lens), free(cos_sin);
    return failed ? -1 : ran;
}
