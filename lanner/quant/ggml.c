/* Matmul and dequantization for weights kept in GGML's block formats, compiled at first use.
 *
 * A weight is [N, K] rows of blocks, exactly as a GGUF file stores it (row n is row_bytes bytes). The one
 * source builds for AVX-512, AVX2 + FMA + F16C, or plain x86-64 (SSE2), picked by the -march level that
 * lanner.native passes: it is written with GCC vector extensions of the target's width (VW floats) and
 * one widening load per target, so the paths differ only in vector width (and summation order).
 *
 * Activations stay fp32. Up to TILE activation rows: each block is decoded in registers and dotted with
 * every row at once, so a weight byte is read once per call (single-stream decode). More rows: each
 * weight row is decoded once into a per-thread buffer (L1) that every tile of rows then reads. Results
 * equal a dequantize-then-matmul in fp32 up to summation order.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define TILE 4   /* activation rows dotted with one decoded weight row together */
#define ROWS_PER_TASK 16   /* weight rows a thread takes at a time */

/* GGML type ids (ggml.h) */
enum { F32 = 0, F16 = 1, Q4_0 = 2, Q4_1 = 3, Q5_0 = 6, Q5_1 = 7, Q8_0 = 8, Q4_K = 12, Q5_K = 13, Q6_K = 14,
       BF16 = 30 };

static inline float h2f(const uint8_t *p) {
    _Float16 h;
    memcpy(&h, p, 2);
    return (float)h;
}

static inline float bf2f(uint16_t b) {
    uint32_t u = (uint32_t)b << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

/* ---- one block -> fp32 ------------------------------------------------------------------------------- */
/* Vectors of the target's width (VW floats): bytes are widened straight from memory to VW int32 lanes
 * (vpmovzxbd and the like), masked and shifted there, converted and scaled. Generic vectors wider than the
 * hardware's would make GCC go through the stack. */
#if defined(__AVX512F__)
#define VW 16
#elif defined(__AVX__)
#define VW 8
#else
#define VW 4
#endif
#define INLINE static inline __attribute__((always_inline))
typedef float vf __attribute__((vector_size(VW * 4)));
typedef int32_t vi __attribute__((vector_size(VW * 4)));

/* VW bytes (or 16-bit values) widened to int32 lanes: one vpmovzx/vpmovsx from memory where the target
 * has it (GCC's generic conversion goes byte by byte through general registers) */
#if defined(__AVX512F__)
#include <immintrin.h>
INLINE vi ubytes(const uint8_t *p) { return (vi)_mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)p)); }
INLINE vi sbytes(const uint8_t *p) { return (vi)_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)p)); }
INLINE vi uhalves(const uint8_t *p) { return (vi)_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p)); }
#elif defined(__AVX2__)
#include <immintrin.h>
INLINE vi ubytes(const uint8_t *p) { return (vi)_mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)p)); }
INLINE vi sbytes(const uint8_t *p) { return (vi)_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)p)); }
INLINE vi uhalves(const uint8_t *p) { return (vi)_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)p)); }
#else
INLINE vi ubytes(const uint8_t *p) { vi v; for (int i = 0; i < VW; i++) v[i] = p[i]; return v; }
INLINE vi sbytes(const uint8_t *p) { vi v; for (int i = 0; i < VW; i++) v[i] = (int8_t)p[i]; return v; }
INLINE vi uhalves(const uint8_t *p) {
    vi v;
    for (int i = 0; i < VW; i++) v[i] = p[2 * i] | p[2 * i + 1] << 8;
    return v;
}
#endif

INLINE vf tofloat(vi v) { return __builtin_convertvector(v, vf); }

INLINE void storev(float *p, vf v) { memcpy(p, &v, sizeof v); }

INLINE vi lane_index(int first) {
    vi v;
    for (int i = 0; i < VW; i++)
        v[i] = first + i;
    return v;
}

INLINE void decode_q4_0(const uint8_t *b, float *restrict out) {
    float d = h2f(b);
    for (int j = 0; j < 16; j += VW) {
        vi q = ubytes(b + 2 + j);
        storev(out + j, tofloat((q & 15) - 8) * d);
        storev(out + j + 16, tofloat((q >> 4) - 8) * d);
    }
}

INLINE void decode_q4_1(const uint8_t *b, float *restrict out) {
    float d = h2f(b), m = h2f(b + 2);
    for (int j = 0; j < 16; j += VW) {
        vi q = ubytes(b + 4 + j);
        storev(out + j, tofloat(q & 15) * d + m);
        storev(out + j + 16, tofloat(q >> 4) * d + m);
    }
}

/* Q5_0 / Q5_1: the fifth bit of value j is bit j of qh */
INLINE void decode_q5(const uint8_t *b, const uint8_t *qs, uint32_t qh, float d, float m, int offset,
                      float *restrict out) {
    for (int j = 0; j < 16; j += VW) {
        vi q = ubytes(qs + j);
        vi lo = (q & 15) | ((((vi){0} + (int32_t)(qh & 0xFFFF)) >> lane_index(j)) & 1) << 4;
        vi hi = (q >> 4) | ((((vi){0} + (int32_t)(qh >> 16)) >> lane_index(j)) & 1) << 4;
        storev(out + j, tofloat(lo - offset) * d + m);
        storev(out + j + 16, tofloat(hi - offset) * d + m);
    }
}

INLINE void decode_q5_0(const uint8_t *b, float *restrict out) {
    uint32_t qh;
    memcpy(&qh, b + 2, 4);
    decode_q5(b, b + 6, qh, h2f(b), 0.0f, 16, out);
}

INLINE void decode_q5_1(const uint8_t *b, float *restrict out) {
    uint32_t qh;
    memcpy(&qh, b + 4, 4);
    decode_q5(b, b + 8, qh, h2f(b), h2f(b + 2), 0, out);
}

INLINE void decode_q8_0(const uint8_t *b, float *restrict out) {
    float d = h2f(b);
    for (int j = 0; j < 32; j += VW)
        storev(out + j, tofloat(sbytes(b + 2 + j)) * d);
}

/* the 6-bit scale and min of sub-block j of a Q4_K / Q5_K super-block, times the block's d and dmin */
INLINE void scale_min_k4(int j, const uint8_t *s, float d, float dmin, float *scale, float *min) {
    int sc, mn;
    if (j < 4) {
        sc = s[j] & 63;
        mn = s[j + 4] & 63;
    } else {
        sc = (s[j + 4] & 15) | ((s[j - 4] >> 6) << 4);
        mn = (s[j + 4] >> 4) | ((s[j] >> 6) << 4);
    }
    *scale = d * sc;
    *min = dmin * mn;
}

/* Q4_K and Q5_K: 4 chunks of 64 values; chunk c's low nibbles are sub-block 2c, its high nibbles 2c + 1,
 * and (Q5_K) bits 2c and 2c + 1 of qh their fifth bits */
INLINE void decode_k4(const uint8_t *b, const uint8_t *qh, const uint8_t *q, float *restrict out) {
    float d = h2f(b), dmin = h2f(b + 2);
    for (int c = 0; c < 4; c++, q += 32, out += 64) {
        float d1, m1, d2, m2;
        scale_min_k4(2 * c, b + 4, d, dmin, &d1, &m1);
        scale_min_k4(2 * c + 1, b + 4, d, dmin, &d2, &m2);
        for (int l = 0; l < 32; l += VW) {
            vi v = ubytes(q + l), lo = v & 15, hi = v >> 4;
            if (qh) {
                vi bits = ubytes(qh + l);
                lo |= ((bits >> (2 * c)) & 1) << 4;
                hi |= ((bits >> (2 * c + 1)) & 1) << 4;
            }
            storev(out + l, tofloat(lo) * d1 - m1);
            storev(out + 32 + l, tofloat(hi) * d2 - m2);
        }
    }
}

INLINE void decode_q4_k(const uint8_t *b, float *restrict out) { decode_k4(b, NULL, b + 16, out); }

INLINE void decode_q5_k(const uint8_t *b, float *restrict out) { decode_k4(b, b + 16, b + 48, out); }

INLINE void decode_q6_k(const uint8_t *b, float *restrict out) {
    const uint8_t *ql = b, *qh = b + 128;
    const int8_t *sc = (const int8_t *)(b + 192);
    float d = h2f(b + 208);
    for (int half = 0; half < 2; half++, ql += 64, qh += 32, sc += 8, out += 128) {
        for (int l = 0; l < 32; l += VW) {
            int is = l / 16;
            vi a = ubytes(ql + l), c = ubytes(ql + l + 32), h = ubytes(qh + l);
            storev(out + l, tofloat(((a & 15) | ((h & 3) << 4)) - 32) * (d * sc[is]));
            storev(out + l + 32, tofloat(((c & 15) | (((h >> 2) & 3) << 4)) - 32) * (d * sc[is + 2]));
            storev(out + l + 64, tofloat(((a >> 4) | (((h >> 4) & 3) << 4)) - 32) * (d * sc[is + 4]));
            storev(out + l + 96, tofloat(((c >> 4) | (((h >> 6) & 3) << 4)) - 32) * (d * sc[is + 6]));
        }
    }
}

INLINE void decode_f16(const uint8_t *b, float *restrict out) {
    for (int j = 0; j < 32; j++)
        out[j] = h2f(b + 2 * j);
}

INLINE void decode_bf16(const uint8_t *b, float *restrict out) {
    for (int j = 0; j < 32; j += VW) {
        vi wide = uhalves(b + 2 * j) << 16;
        memcpy(out + j, &wide, sizeof wide);
    }
}

INLINE void decode_f32(const uint8_t *b, float *restrict out) {
    memcpy(out, b, 32 * sizeof(float));
}

/* elements and bytes of one block; plain floats go 32 at a time */
static int block_shape(int type, int *bytes) {
    switch (type) {
    case Q4_0: *bytes = 18; return 32;
    case Q4_1: *bytes = 20; return 32;
    case Q5_0: *bytes = 22; return 32;
    case Q5_1: *bytes = 24; return 32;
    case Q8_0: *bytes = 34; return 32;
    case Q4_K: *bytes = 144; return 256;
    case Q5_K: *bytes = 176; return 256;
    case Q6_K: *bytes = 210; return 256;
    case F16: *bytes = 64; return 32;
    case BF16: *bytes = 64; return 32;
    case F32: *bytes = 128; return 32;
    default: return 0;
    }
}

/* A whole row (K values, a whole number of blocks) -> fp32. The switch sits outside the block loop so
 * each loop inlines its decoder. */
#define DECODE_ROW(fn)                                        \
    for (int64_t i = 0; i < nblocks; i++)                     \
        fn(src + i * bytes, out + i * qk);                    \
    return;

static void decode_row(int type, const uint8_t *src, int64_t K, float *restrict out) {
    int bytes, qk = block_shape(type, &bytes);
    int64_t nblocks = K / qk;
    switch (type) {
    case Q4_0: DECODE_ROW(decode_q4_0)
    case Q4_1: DECODE_ROW(decode_q4_1)
    case Q5_0: DECODE_ROW(decode_q5_0)
    case Q5_1: DECODE_ROW(decode_q5_1)
    case Q8_0: DECODE_ROW(decode_q8_0)
    case Q4_K: DECODE_ROW(decode_q4_k)
    case Q5_K: DECODE_ROW(decode_q5_k)
    case Q6_K: DECODE_ROW(decode_q6_k)
    case F16: DECODE_ROW(decode_f16)
    case BF16: DECODE_ROW(decode_bf16)
    case F32: DECODE_ROW(decode_f32)
    }
}

/* ---- dot products over a decoded row ----------------------------------------------------------------- */

#define STEP (32 / VW)   /* vectors in 32 floats, each summed in its own register */

INLINE vf loadv(const float *p) {
    vf v;
    memcpy(&v, p, sizeof v);
    return v;
}

typedef void (*decoder)(const uint8_t *, float *restrict);

/* y[m * ldy] = W[n] . x[m * ldx] for m < rows (a compile-time constant once inlined), decoding the weight
 * row block by block into `blk` and dotting each block at once: the decoded values never leave L1 (or the
 * registers), and every activation row reuses them */
INLINE void dot_rows(decoder decode, const int qk, const int bytes, const uint8_t *restrict src,
                     const float *restrict x, int64_t ldx, const int rows, int64_t K, float *restrict y,
                     int64_t ldy) {
    vf acc[TILE][STEP];
    float blk[256] __attribute__((aligned(64)));
    for (int m = 0; m < rows; m++)
        for (int s = 0; s < STEP; s++)
            acc[m][s] = (vf){0};
    for (int64_t k = 0; k < K; k += qk, src += bytes) {
        decode(src, blk);
        for (int j = 0; j < qk; j += 32) {
            for (int s = 0; s < STEP; s++) {
                vf wv = loadv(blk + j + s * VW);
                for (int m = 0; m < rows; m++)
                    acc[m][s] += wv * loadv(x + m * ldx + k + j + s * VW);
            }
        }
    }
    for (int m = 0; m < rows; m++) {
        vf t = acc[m][0];
        for (int s = 1; s < STEP; s++)
            t += acc[m][s];
        float sum = 0;
        for (int i = 0; i < VW; i++)
            sum += t[i];
        y[m * ldy] = sum;
    }
}

/* one weight row against every activation row, TILE at a time */
INLINE void dot_all(decoder decode, const int qk, const int bytes, const uint8_t *restrict src,
                    const float *restrict x, int64_t ldx, int64_t M, int64_t K, float *restrict y, int64_t ldy) {
    int64_t m = 0;
    for (; m + TILE <= M; m += TILE)
        dot_rows(decode, qk, bytes, src, x + m * ldx, ldx, TILE, K, y + m * ldy, ldy);
    switch (M - m) {
    case 3: dot_rows(decode, qk, bytes, src, x + m * ldx, ldx, 3, K, y + m * ldy, ldy); break;
    case 2: dot_rows(decode, qk, bytes, src, x + m * ldx, ldx, 2, K, y + m * ldy, ldy); break;
    case 1: dot_rows(decode, qk, bytes, src, x + m * ldx, ldx, 1, K, y + m * ldy, ldy); break;
    }
}

/* weight rows n0..n1; the switch sits outside the loops so each format's loop inlines its decoder */
#define ROWS_OF(fn, qk, bytes)                                                                     \
    for (int64_t n = n0; n < n1; n++)                                                              \
        dot_all(fn, qk, bytes, w + n * row_bytes, x, ldx, M, K, y + n, ldy);                       \
    return;

static void matmul_rows(int type, const uint8_t *w, int64_t row_bytes, int64_t n0, int64_t n1, int64_t K,
                        const float *x, int64_t ldx, int64_t M, float *y, int64_t ldy) {
    switch (type) {
    case Q4_0: ROWS_OF(decode_q4_0, 32, 18)
    case Q4_1: ROWS_OF(decode_q4_1, 32, 20)
    case Q5_0: ROWS_OF(decode_q5_0, 32, 22)
    case Q5_1: ROWS_OF(decode_q5_1, 32, 24)
    case Q8_0: ROWS_OF(decode_q8_0, 32, 34)
    case Q4_K: ROWS_OF(decode_q4_k, 256, 144)
    case Q5_K: ROWS_OF(decode_q5_k, 256, 176)
    case Q6_K: ROWS_OF(decode_q6_k, 256, 210)
    case F16: ROWS_OF(decode_f16, 32, 64)
    case BF16: ROWS_OF(decode_bf16, 32, 64)
    case F32: ROWS_OF(decode_f32, 32, 128)
    }
}

/* ---- exported ---------------------------------------------------------------------------------------- */

/* Elements per block of a type (0: not a type this file handles). */
int ggml_block_size(int type) {
    int bytes;
    return block_shape(type, &bytes);
}

/* y[m, n] = sum_k W[n, k] x[m, k] for m < M, n < N; x [M, ldx] and y [M, ldy] fp32.
 * Returns 1 when a thread's row buffer cannot be allocated, 2 for a type or K this file cannot take. */
int ggml_matmul(int type, const uint8_t *w, int64_t row_bytes, int64_t N, int64_t K, const float *x,
                int64_t ldx, int64_t M, float *y, int64_t ldy, int threads) {
    if (!ggml_block_size(type) || K % ggml_block_size(type) || K % 32)
        return 2;
    int64_t tasks = (N + ROWS_PER_TASK - 1) / ROWS_PER_TASK;
    int failed = 0;
#pragma omp parallel num_threads(threads) reduction(| : failed)
    {
        /* more rows than a tile: each weight row is decoded once into buf, then read as F32 by every tile */
        float *buf = M > TILE ? aligned_alloc(64, ((K * sizeof(float) + 63) / 64) * 64) : NULL;
        failed = M > TILE && !buf;
#pragma omp for schedule(static)
        for (int64_t t = 0; t < tasks; t++) {
            int64_t n0 = t * ROWS_PER_TASK, n1 = n0 + ROWS_PER_TASK < N ? n0 + ROWS_PER_TASK : N;
            for (int64_t n = n0; n < n1 && !failed; n++) {
                if (buf) {
                    decode_row(type, w + n * row_bytes, K, buf);
                    matmul_rows(F32, (const uint8_t *)buf, 0, 0, 1, K, x, ldx, M, y + n, ldy);
                } else {
                    matmul_rows(type, w, row_bytes, n, n + 1, K, x, ldx, M, y, ldy);
                }
            }
        }
        free(buf);
    }
    return failed;
}

/* out[i, :] = W[ids[i], :] as fp32, or as bf16 (round to nearest even) when out_bf16; ids NULL: every row.
 * The dequantized weight of a large-batch matmul, and the rows of an embedding lookup. */
int ggml_dequantize(int type, const uint8_t *w, int64_t row_bytes, int64_t K, const int64_t *ids, int64_t rows,
                    void *out, int out_bf16, int threads) {
    if (!ggml_block_size(type) || K % ggml_block_size(type))
        return 2;
    int failed = 0;
#pragma omp parallel num_threads(threads) reduction(| : failed)
    {
        float *buf = out_bf16 ? aligned_alloc(64, ((K * sizeof(float) + 63) / 64) * 64) : NULL;
        if (out_bf16 && !buf) {
            failed = 1;
        } else {
#pragma omp for schedule(static)
            for (int64_t i = 0; i < rows; i++) {
                const uint8_t *src = w + (ids ? ids[i] : i) * row_bytes;
                if (!out_bf16) {
                    decode_row(type, src, K, (float *)out + i * K);
                    continue;
                }
                decode_row(type, src, K, buf);
                uint16_t *dst = (uint16_t *)out + i * K;
                for (int64_t k = 0; k < K; k++) {
                    uint32_t u;
                    memcpy(&u, buf + k, 4);
                    dst[k] = (uint16_t)((u + 0x7FFF + ((u >> 16) & 1)) >> 16);
                }
            }
            free(buf);
        }
    }
    return failed;
}
