/* Matmul and dequantization for weights kept in GGML's block formats, compiled at first use.
 *
 * A weight is [N, K] rows of blocks, exactly as a GGUF file stores it (row n is row_bytes bytes). The one
 * source builds for AVX-512, AVX2 + FMA + F16C, or plain x86-64 (SSE2), picked by the -march level that
 * lanner.native passes: it is written with GCC vector extensions of the target's width (VW floats) and
 * one widening load per target, so the paths differ only in vector width (and summation order).
 *
 * Up to TILE activation rows (single-stream decode), by default: the rows are quantized to int8 blocks
 * once per call and each weight group is dotted with every row in integer dot products, so a weight byte
 * is read once per call. The exact path keeps activations fp32: up to TILE rows, each block is decoded in
 * registers and dotted with every row at once; more rows, each weight row is decoded once into a
 * per-thread buffer (L1) that every tile of rows then reads. Its results equal a dequantize-then-matmul in
 * fp32 up to summation order.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <math.h>
#include <omp.h>
#include "../amx.h"
#include "../vec16.h"
#include "matmul.h"

#define TILE 4   /* activation rows dotted with one decoded weight row together */
#define ROWS_PER_TASK 16   /* weight rows a thread takes at a time */
#define AHEAD_BYTES (8 << 10)   /* how far ahead a GEMV prefetches its weights (docs/quantization.md: 4 KB left a
                                 * batch-1 step 1.07-1.1x slower on an AMX host; 2-12 KB were even on Zen 4) */

/* GGML type ids (ggml.h) */
enum { F32 = 0, F16 = 1, Q4_0 = 2, Q4_1 = 3, Q5_0 = 6, Q5_1 = 7, Q8_0 = 8, Q2_K = 10, Q3_K = 11, Q4_K = 12,
       Q5_K = 13, Q6_K = 14, IQ2_XXS = 16, IQ2_XS = 17, IQ3_XXS = 18, IQ1_S = 19, IQ4_NL = 20, IQ3_S = 21,
       IQ2_S = 22, IQ4_XS = 23, IQ1_M = 29, BF16 = 30 };

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

/* f rounded to bf16, nearest even (as torch's .to(bfloat16)) */
static inline uint16_t f2bf(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    return (uint16_t)((u + 0x7FFF + ((u >> 16) & 1)) >> 16);
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

/* the values IQ4_NL's and IQ4_XS's 4-bit indices stand for (a non-linear grid, denser near zero) */
static const int8_t IQ4_VALUES[16] = {-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113};

/* 32 values of 16 index bytes laid out as Q4_0's nibbles, times d */
INLINE void decode_iq4(const uint8_t *qs, float d, float *restrict out) {
    for (int j = 0; j < 16; j++) {
        out[j] = d * IQ4_VALUES[qs[j] & 15];
        out[j + 16] = d * IQ4_VALUES[qs[j] >> 4];
    }
}

INLINE void decode_iq4_nl(const uint8_t *b, float *restrict out) {
    decode_iq4(b + 2, h2f(b), out);
}

/* IQ4_XS: d, then 8 sub-blocks of 32 IQ4_NL values, sub-block j's 6-bit scale (less 32) from nibble j of bytes 4..7
 * (low bits) and bits 2j of the 16-bit word at byte 2 (high bits) */
INLINE void decode_iq4_xs(const uint8_t *b, float *restrict out) {
    const float d = h2f(b);
    const int high = b[2] | b[3] << 8;
    for (int j = 0; j < 8; j++) {
        const int scale = (((b[4 + j / 2] >> 4 * (j % 2)) & 15) | (((high >> 2 * j) & 3) << 4)) - 32;
        decode_iq4(b + 8 + 16 * j, d * (float)scale, out + 32 * j);
    }
}

/* ---- i-quants below 4 bits: groups of 8 (or 4) values from a lattice grid ------------------------------- *
 * Each 8 values are one entry of a format's grid (IQ3: two entries of 4) and a byte of signs; IQ1's grid values
 * are -1, 0, 1 shifted by a delta of +-1/8. The grids are llama.cpp's tables, which the gguf package ships: the
 * loader hands them over once (ggml_set_iq_grids), as value bytes. A sub-block of 32 values has one scale, or
 * (IQ2_XS, IQ2_S, IQ1_M) one for each 16; its values come out as small integers (IQ1's in eighths, so they stay
 * integers), which the int8 path multiplies as they are. */
static uint64_t IQ2XXS_GRID[256], IQ2XS_GRID[512], IQ2S_GRID[1024], IQ1S_GRID[2048];
static uint32_t IQ3XXS_GRID[256], IQ3S_GRID[512];
static uint8_t KSIGNS[128];   /* 7 sign bits, the eighth making their count even */
static int iq_grids_set;

int ggml_set_iq_grids(const uint8_t *iq2xxs, const uint8_t *iq2xs, const uint8_t *iq2s, const uint8_t *iq3xxs,
                      const uint8_t *iq3s, const uint8_t *iq1s) {
    memcpy(IQ2XXS_GRID, iq2xxs, sizeof IQ2XXS_GRID), memcpy(IQ2XS_GRID, iq2xs, sizeof IQ2XS_GRID);
    memcpy(IQ2S_GRID, iq2s, sizeof IQ2S_GRID), memcpy(IQ1S_GRID, iq1s, sizeof IQ1S_GRID);
    memcpy(IQ3XXS_GRID, iq3xxs, sizeof IQ3XXS_GRID), memcpy(IQ3S_GRID, iq3s, sizeof IQ3S_GRID);
    for (int i = 0; i < 128; i++)
        KSIGNS[i] = (uint8_t)(i | (__builtin_popcount(i) & 1) << 7);
    iq_grids_set = 1;
    return 0;
}

static int is_low_iq(int type) {
    return type == IQ2_XXS || type == IQ2_XS || type == IQ2_S || type == IQ3_XXS || type == IQ3_S || type == IQ1_S
           || type == IQ1_M;
}

/* the K-quants with a scale a 16 values */
static int is_k16(int type) { return type == Q6_K || type == Q3_K || type == Q2_K; }

/* the scales a low i-quant's sub-block has: one, or one for each 16 values */
static int iq_parts_of(int type) { return type == IQ2_XS || type == IQ2_S || type == IQ1_M ? 2 : 1; }

/* the 4-byte words a row of a block decoded for a GEMM (decode_group) has before its values: its factor; for a
 * scale a 16 values, two columns of those; for Q2_K's mins, dmin and a column of its two mins */
#define DECODED_PLAIN 1
#define DECODED_SCALED 3
#define DECODED_MINS 5
static int decoded_words(int type) {
    return type == Q2_K ? DECODED_MINS : iq_parts_of(type) == 2 || type == Q6_K || type == Q3_K ? DECODED_SCALED
                                                                                             : DECODED_PLAIN;
}

INLINE uint32_t u32_at(const uint8_t *p) { uint32_t u; memcpy(&u, p, 4); return u; }
INLINE int u16_at(const uint8_t *p) { uint16_t u; memcpy(&u, p, 2); return u; }

typedef int8_t i8x32 __attribute__((vector_size(32)));

/* the grid entries of 8 values at 4 indices, as 32 value bytes */
INLINE i8x32 entries8(const uint64_t *grid, size_t a, size_t b, size_t c, size_t d) {
#if defined(__AVX2__)
    return (i8x32)_mm256_setr_epi64x((int64_t)grid[a], (int64_t)grid[b], (int64_t)grid[c], (int64_t)grid[d]);
#else
    const uint64_t e[4] = {grid[a], grid[b], grid[c], grid[d]};
    i8x32 r;
    memcpy(&r, e, sizeof r);
    return r;
#endif
}

/* IQ3: the grid entries of 4 values at 8 indices, as 32 value bytes */
INLINE i8x32 entries4(const uint32_t *grid, size_t i0, size_t i1, size_t i2, size_t i3, size_t i4, size_t i5,
                      size_t i6, size_t i7) {
#if defined(__AVX2__)
    return (i8x32)_mm256_setr_epi32((int)grid[i0], (int)grid[i1], (int)grid[i2], (int)grid[i3], (int)grid[i4],
                                    (int)grid[i5], (int)grid[i6], (int)grid[i7]);
#else
    const uint32_t e[8] = {grid[i0], grid[i1], grid[i2], grid[i3], grid[i4], grid[i5], grid[i6], grid[i7]};
    i8x32 r;
    memcpy(&r, e, sizeof r);
    return r;
#endif
}

/* the 4 sign bytes KSIGNS gives for 4 x 7 bits of aux */
INLINE uint32_t ksigns4(uint32_t aux) {
    return KSIGNS[aux & 127] | KSIGNS[aux >> 7 & 127] << 8 | KSIGNS[aux >> 14 & 127] << 16
           | (uint32_t)KSIGNS[aux >> 21 & 127] << 24;
}

/* what a low i-quant super-block b's sub-block scales (odd integers, iq_parts' sc) are worth: d over a power of two
 * (IQ2: (0.5 + nibble) / 4 of d; IQ3_XXS: (0.5 + nibble) / 2), or IQ1_M's d spread over its scale words' top
 * nibbles */
INLINE float iq_factor(const int type, const uint8_t *b) {
    if (type == IQ1_M) {
        const uint8_t *sc = b + 48;
        const uint16_t dbits = (uint16_t)(u16_at(sc) >> 12 | (u16_at(sc + 2) >> 8 & 0xF0)
                                          | (u16_at(sc + 4) >> 4 & 0xF00) | (u16_at(sc + 6) & 0xF000));
        return h2f((const uint8_t *)&dbits);
    }
    return h2f(b) * (type == IQ3_XXS ? 0.25f : type == IQ3_S || type == IQ1_S ? 1.0f : 0.125f);
}

/* Sub-block j (32 values) of a super-block b of an i-quant below 4 bits: its grid entries' 32 value bytes, bits (bit
 * i set: value i negative; IQ1: its delta), the odd integer scales sc of its two halves (equal where the format has
 * one a sub-block; iq_factor's units) */
INLINE i8x32 iq_parts(const int type, const uint8_t *b, int j, uint32_t *bits, int *sc) {
    switch (type) {
    case IQ2_XXS: {   /* d; per sub-block 4 grid index bytes, then 4 x 7 sign bits and a 4-bit scale */
        const uint8_t *q = b + 2 + 8 * j;
        const uint32_t aux = u32_at(q + 4);
        sc[0] = sc[1] = 2 * (int)(aux >> 28) + 1;
        *bits = ksigns4(aux);
        return entries8(IQ2XXS_GRID, q[0], q[1], q[2], q[3]);
    }
    case IQ2_XS: {   /* d; 32 words of a 9-bit grid index and 7 sign bits; a scale nibble a 16 values */
        size_t q[4];   /* (indices as wide as addresses: no sign extension before the loads) */
        *bits = 0;
        for (int l = 0; l < 4; l++) {
            q[l] = (size_t)u16_at(b + 2 + 8 * j + 2 * l);
            *bits |= (uint32_t)KSIGNS[q[l] >> 9] << 8 * l;
        }
        sc[0] = 2 * (b[66 + j] & 15) + 1, sc[1] = 2 * (b[66 + j] >> 4) + 1;
        return entries8(IQ2XS_GRID, q[0] & 511, q[1] & 511, q[2] & 511, q[3] & 511);
    }
    case IQ2_S: {   /* d; 32 low index bytes, 32 sign bytes, 8 bytes of 2-bit high index parts, scale nibbles */
        const uint8_t *q = b + 2 + 4 * j;
        const size_t high = b[66 + j];
        *bits = u32_at(b + 34 + 4 * j);
        sc[0] = 2 * (b[74 + j] & 15) + 1, sc[1] = 2 * (b[74 + j] >> 4) + 1;
        return entries8(IQ2S_GRID, q[0] | (high & 3) << 8, q[1] | (high >> 2 & 3) << 8, q[2] | (high >> 4 & 3) << 8,
                        q[3] | (high >> 6) << 8);
    }
    case IQ3_XXS: {   /* d; 64 grid index bytes (4 values each); per sub-block 4 x 7 sign bits and a 4-bit scale */
        const uint8_t *q = b + 2 + 8 * j;
        const uint32_t aux = u32_at(b + 66 + 4 * j);
        sc[0] = sc[1] = 2 * (int)(aux >> 28) + 1;
        *bits = ksigns4(aux);
        return entries4(IQ3XXS_GRID, q[0], q[1], q[2], q[3], q[4], q[5], q[6], q[7]);
    }
    case IQ3_S: {   /* d; 64 low index bytes, 8 bytes of ninth bits, 32 sign bytes, scale nibbles (d (1 + 2 s)) */
        const uint8_t *q = b + 2 + 8 * j;
        const size_t high = b[66 + j];   /* its bit l: index l's ninth bit */
        sc[0] = sc[1] = 2 * (b[106 + j / 2] >> 4 * (j % 2) & 15) + 1;
        *bits = u32_at(b + 74 + 4 * j);
#define IQ3S_AT(l) (q[l] | (high << (8 - l) & 256))
        return entries4(IQ3S_GRID, IQ3S_AT(0), IQ3S_AT(1), IQ3S_AT(2), IQ3S_AT(3), IQ3S_AT(4), IQ3S_AT(5), IQ3S_AT(6),
                        IQ3S_AT(7));
#undef IQ3S_AT
    }
    case IQ1_S: {   /* d; 32 low index bytes; per sub-block a word: 4 x 3 high index bits, a 3-bit scale, the
                     * delta's sign */
        const size_t qh = (size_t)u16_at(b + 34 + 2 * j);
        sc[0] = sc[1] = 2 * (int)(qh >> 12 & 7) + 1;
        const uint8_t *q = b + 2 + 4 * j;
        *bits = qh & 0x8000 ? ~0u : 0;
        return entries8(IQ1S_GRID, q[0] | (qh & 7) << 8, q[1] | (qh >> 3 & 7) << 8, q[2] | (qh >> 6 & 7) << 8,
                        q[3] | (qh >> 9 & 7) << 8);
    }
    case IQ1_M: {   /* 32 low index bytes; a nibble a group (3 high index bits, the delta's sign); 4 words of
                     * 3-bit scales (a 16 values) whose top nibbles make d (iq_factor) */
        for (int h = 0; h < 2; h++)
            sc[h] = 2 * (u16_at(b + 48 + 2 * (j / 2)) >> 3 * (2 * (j % 2) + h) & 7) + 1;
        size_t q[4];
        *bits = 0;
        for (int l = 0; l < 4; l++) {
            const size_t nibble = b[32 + 2 * j + l / 2] >> 4 * (l % 2) & 15;
            q[l] = b[4 * j + l] | (nibble & 7) << 8;
            *bits |= (nibble & 8 ? 0xFFu : 0) << 8 * l;
        }
        return entries8(IQ1S_GRID, q[0], q[1], q[2], q[3]);
    }
    }
    return (i8x32){0};   /* not a low i-quant: no caller asks */
}

#if defined(__AVX2__)
/* 0xFF in byte i where bit i of bits is set, else 0 */
INLINE __m256i bit_bytes(uint32_t bits) {
    const __m256i spread = _mm256_shuffle_epi8(_mm256_set1_epi32((int)bits),
                                               _mm256_set_epi64x(0x0303030303030303, 0x0202020202020202,
                                                                 0x0101010101010101, 0));
    const __m256i bit = _mm256_set1_epi64x((int64_t)0x8040201008040201);
    return _mm256_cmpeq_epi8(_mm256_and_si256(spread, bit), bit);
}
#endif

/* iq_parts' sub-block as magnitudes: its 32 values (IQ1: 8 grid + the delta, in eighths) are mag[i], negated where
 * neg[i] is -1 (else 0) */
INLINE i8x32 iq_magnitudes(const int type, const uint8_t *b, int j, i8x32 *neg, int *sc) {
    uint32_t bits;
    const i8x32 entries = iq_parts(type, b, j, &bits, sc);
    const int iq1 = type == IQ1_S || type == IQ1_M;
#if defined(__AVX2__)
    const __m256i negative = bit_bytes(bits);
    if (!iq1) {
        *neg = (i8x32)negative;
        return entries;
    }
    const __m256i values = _mm256_add_epi8(_mm256_sign_epi8(_mm256_set1_epi8(8), (__m256i)entries),
                                           _mm256_or_si256(negative, _mm256_set1_epi8(1)));   /* the delta: -1 or 1 */
    *neg = (i8x32)_mm256_cmpgt_epi8(_mm256_setzero_si256(), values);
    return (i8x32)_mm256_abs_epi8(values);
#else
    int8_t m[32], n[32];
    for (int i = 0; i < 32; i++) {
        const int x = entries[i], sign = bits >> i & 1 ? -1 : 1, v = iq1 ? 8 * x + sign : sign * x;
        m[i] = (int8_t)(v < 0 ? -v : v), n[i] = (int8_t)(v < 0 ? -1 : 0);
    }
    i8x32 r;
    memcpy(neg, n, sizeof n);
    memcpy(&r, m, sizeof r);
    return r;
#endif
}

/* 32 bytes x negated where neg is -1 (else 0) */
INLINE i8x32 negated_where(i8x32 x, i8x32 neg) {
#if defined(__AVX2__)
    return (i8x32)_mm256_sign_epi8((__m256i)x, _mm256_or_si256((__m256i)neg, _mm256_set1_epi8(1)));
#else
    return (x ^ neg) - neg;
#endif
}

/* the sub-block's 32 values and the scales s of its halves */
INLINE i8x32 iq_sub(const int type, const uint8_t *b, int j, float *s) {
    i8x32 neg;
    int sc[2];
    const i8x32 magnitudes = iq_magnitudes(type, b, j, &neg, sc);
    const float factor = iq_factor(type, b);
    s[0] = factor * (float)sc[0], s[1] = factor * (float)sc[1];   /* exact: d has 11 bits, sc 5 */
    return negated_where(magnitudes, neg);
}

/* what one unit of iq_sub's values is worth: IQ1's are eighths */
#define IQ_UNIT(type) ((type) == IQ1_S || (type) == IQ1_M ? 0.125f : 1.0f)

INLINE void decode_iq(const int type, const uint8_t *b, float *restrict out) {
    for (int j = 0; j < 8; j++, out += 32) {
        int8_t v[32];
        float s[2];
        const i8x32 values = iq_sub(type, b, j, s);
        memcpy(v, &values, sizeof v);
        for (int i = 0; i < 32; i++)
            out[i] = s[i / 16] * ((float)v[i] * IQ_UNIT(type));
    }
}

INLINE void decode_iq2_xxs(const uint8_t *b, float *restrict out) { decode_iq(IQ2_XXS, b, out); }
INLINE void decode_iq2_xs(const uint8_t *b, float *restrict out) { decode_iq(IQ2_XS, b, out); }
INLINE void decode_iq2_s(const uint8_t *b, float *restrict out) { decode_iq(IQ2_S, b, out); }
INLINE void decode_iq3_xxs(const uint8_t *b, float *restrict out) { decode_iq(IQ3_XXS, b, out); }
INLINE void decode_iq3_s(const uint8_t *b, float *restrict out) { decode_iq(IQ3_S, b, out); }
INLINE void decode_iq1_s(const uint8_t *b, float *restrict out) { decode_iq(IQ1_S, b, out); }
INLINE void decode_iq1_m(const uint8_t *b, float *restrict out) { decode_iq(IQ1_M, b, out); }

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

/* Q2_K and Q3_K: 2 halves of 128 values, each 32 bytes of 2-bit values at 4 shifts; at shift 2j value l of the
 * half is bits 2j of byte l, in sub-block 8 half + 2j + l / 16 (16 values each). Q2_K: 4-bit scale and min a
 * sub-block (d sc q - dmin mn); Q3_K: a third bit from hmask (bit 4 half + j of byte l; clear: q - 4) and a
 * 6-bit signed scale (less 32), its low 4 bits from the nibbles of bytes 0-7, its high 2 from bytes 8-11 */
INLINE void decode_q2_k(const uint8_t *b, float *restrict out) {
    const uint8_t *sc = b, *qs = b + 16;
    const float d = h2f(b + 80), dmin = h2f(b + 82);
    for (int half = 0; half < 2; half++, qs += 32)
        for (int j = 0; j < 4; j++, out += 32)
            for (int l = 0; l < 32; l += VW) {
                const int s = sc[8 * half + 2 * j + l / 16];
                storev(out + l, tofloat((ubytes(qs + l) >> 2 * j) & 3) * (d * (s & 15)) - dmin * (s >> 4));
            }
}

INLINE int q3_k_scale(const uint8_t *s, int i) {
    return ((i < 8 ? s[i] & 15 : s[i - 8] >> 4) | (((s[8 + i % 4] >> 2 * (i / 4)) & 3) << 4)) - 32;
}

INLINE void decode_q3_k(const uint8_t *b, float *restrict out) {
    const uint8_t *hmask = b, *qs = b + 32, *sc = b + 96;
    const float d = h2f(b + 108);
    for (int half = 0; half < 2; half++, qs += 32)
        for (int j = 0; j < 4; j++, out += 32)
            for (int l = 0; l < 32; l += VW) {
                const vi high = (ubytes(hmask + l) >> (4 * half + j)) & 1;
                const vi q = ((ubytes(qs + l) >> 2 * j) & 3) - 4 + (high << 2);
                storev(out + l, tofloat(q) * (d * q3_k_scale(sc, 8 * half + 2 * j + l / 16)));
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
    if (is_low_iq(type) && !iq_grids_set)   /* no grids yet: no kernel takes the type */
        return 0;
    switch (type) {
    case Q4_0: *bytes = 18; return 32;
    case Q4_1: *bytes = 20; return 32;
    case Q5_0: *bytes = 22; return 32;
    case Q5_1: *bytes = 24; return 32;
    case Q8_0: *bytes = 34; return 32;
    case Q2_K: *bytes = 84; return 256;
    case Q3_K: *bytes = 110; return 256;
    case Q4_K: *bytes = 144; return 256;
    case Q5_K: *bytes = 176; return 256;
    case Q6_K: *bytes = 210; return 256;
    case IQ4_NL: *bytes = 18; return 32;
    case IQ4_XS: *bytes = 136; return 256;
    case IQ2_XXS: *bytes = 66; return 256;
    case IQ2_XS: *bytes = 74; return 256;
    case IQ2_S: *bytes = 82; return 256;
    case IQ3_XXS: *bytes = 98; return 256;
    case IQ3_S: *bytes = 110; return 256;
    case IQ1_S: *bytes = 50; return 256;
    case IQ1_M: *bytes = 56; return 256;
    case F16: *bytes = 64; return 32;
    case BF16: *bytes = 64; return 32;
    case F32: *bytes = 128; return 32;
    default: return 0;
    }
}

/* Elements per block of a type (0: not a type this file handles). */
int ggml_block_size(int type) {
    int bytes;
    return block_shape(type, &bytes);
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
    case Q2_K: DECODE_ROW(decode_q2_k)
    case Q3_K: DECODE_ROW(decode_q3_k)
    case Q4_K: DECODE_ROW(decode_q4_k)
    case Q5_K: DECODE_ROW(decode_q5_k)
    case Q6_K: DECODE_ROW(decode_q6_k)
    case IQ4_NL: DECODE_ROW(decode_iq4_nl)
    case IQ4_XS: DECODE_ROW(decode_iq4_xs)
    case IQ2_XXS: DECODE_ROW(decode_iq2_xxs)
    case IQ2_XS: DECODE_ROW(decode_iq2_xs)
    case IQ2_S: DECODE_ROW(decode_iq2_s)
    case IQ3_XXS: DECODE_ROW(decode_iq3_xxs)
    case IQ3_S: DECODE_ROW(decode_iq3_s)
    case IQ1_S: DECODE_ROW(decode_iq1_s)
    case IQ1_M: DECODE_ROW(decode_iq1_m)
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
    case Q2_K: ROWS_OF(decode_q2_k, 256, 84)
    case Q3_K: ROWS_OF(decode_q3_k, 256, 110)
    case Q4_K: ROWS_OF(decode_q4_k, 256, 144)
    case Q5_K: ROWS_OF(decode_q5_k, 256, 176)
    case Q6_K: ROWS_OF(decode_q6_k, 256, 210)
    case IQ4_NL: ROWS_OF(decode_iq4_nl, 32, 18)
    case IQ4_XS: ROWS_OF(decode_iq4_xs, 256, 136)
    case IQ2_XXS: ROWS_OF(decode_iq2_xxs, 256, 66)
    case IQ2_XS: ROWS_OF(decode_iq2_xs, 256, 74)
    case IQ2_S: ROWS_OF(decode_iq2_s, 256, 82)
    case IQ3_XXS: ROWS_OF(decode_iq3_xxs, 256, 98)
    case IQ3_S: ROWS_OF(decode_iq3_s, 256, 110)
    case IQ1_S: ROWS_OF(decode_iq1_s, 256, 50)
    case IQ1_M: ROWS_OF(decode_iq1_m, 256, 56)
    case F16: ROWS_OF(decode_f16, 32, 64)
    case BF16: ROWS_OF(decode_bf16, 32, 64)
    case F32: ROWS_OF(decode_f32, 32, 128)
    }
}

/* ---- int8 activations (up to TILE rows) --------------------------------------------------------------- */
/* Each activation row is quantized once per call into blocks of 32 int8 values with an fp32 scale (ggml's
 * Q8_0 / Q8_1, the block sum kept too), and the weights' integer values are multiplied with them in integer
 * dot products of 4 byte pairs per int32 lane (vpdpbusd, or vpmaddubsw + vpmaddwd): about half the
 * instructions per weight of the fp32 path. Weight values are unsigned bytes: a format's zero point (8 for
 * Q4_0, 128 for Q8_0 under VNNI, ...) comes back as -zero * (sum of the lane's 4 activations), the lane's
 * starting value; a format's min as min * scale * block sum. A group is the 32 * GB weights of one vector
 * of bytes: two blocks on AVX-512BW, one elsewhere. Per-lane arrays of the activations (scale, block sum,
 * zero-point term) are indexed by k / 4, whatever the vector width. */
#if defined(__AVX512BW__)
#define GB 2
#else
#define GB 1
#endif
#define LANES (8 * GB)
typedef uint8_t b16 __attribute__((vector_size(16)));
typedef uint8_t b32 __attribute__((vector_size(32)));
typedef uint8_t lb __attribute__((vector_size(LANES * 4)));
typedef int8_t sb __attribute__((vector_size(LANES * 4)));
typedef int32_t li __attribute__((vector_size(LANES * 4)));
typedef float lf __attribute__((vector_size(LANES * 4)));

#if defined(__AVX512VNNI__) && GB == 2
#define VNNI 1
INLINE li dot(li acc, lb w, lb x) { return (li)_mm512_dpbusd_epi32((__m512i)acc, (__m512i)w, (__m512i)x); }
#elif GB == 2
#define VNNI 0
INLINE li dot(li acc, lb w, lb x) {
    return acc + (li)_mm512_madd_epi16(_mm512_maddubs_epi16((__m512i)w, (__m512i)x), _mm512_set1_epi16(1));
}
#elif defined(__AVXVNNI__)
#define VNNI 1
INLINE li dot(li acc, lb w, lb x) { return (li)_mm256_dpbusd_avx_epi32((__m256i)acc, (__m256i)w, (__m256i)x); }
#elif defined(__AVX2__)
#define VNNI 0
INLINE li dot(li acc, lb w, lb x) {
    return acc + (li)_mm256_madd_epi16(_mm256_maddubs_epi16((__m256i)w, (__m256i)x), _mm256_set1_epi16(1));
}
#else
#define VNNI 0
INLINE li dot(li acc, lb w, lb x) {   /* on plain arrays: GCC vectorizes these, not indexed vector lanes */
    uint8_t a[LANES * 4];
    int8_t b[LANES * 4];
    int32_t s[LANES];
    memcpy(a, &w, sizeof a);
    memcpy(b, &x, sizeof b);
    memcpy(s, &acc, sizeof s);
    for (int l = 0; l < LANES; l++)
        s[l] += a[4 * l] * b[4 * l] + a[4 * l + 1] * b[4 * l + 1] + a[4 * l + 2] * b[4 * l + 2] + a[4 * l + 3] * b[4 * l + 3];
    memcpy(&acc, s, sizeof s);
    return acc;
}
#endif
/* vpmaddubsw saturates at 16 bits: Q8_0's bytes go in as |w| against the activations signed by w */
#define Q8_ZERO (VNNI ? 128 : 0)

INLINE lb loadlb(const void *p) { lb v; memcpy(&v, p, sizeof v); return v; }
INLINE li loadli(const void *p) { li v; memcpy(&v, p, sizeof v); return v; }
INLINE lf loadlf(const void *p) { lf v; memcpy(&v, p, sizeof v); return v; }
INLINE b16 load_bytes16(const uint8_t *p) { b16 v; memcpy(&v, p, 16); return v; }
INLINE b32 load_bytes32(const uint8_t *p) { b32 v; memcpy(&v, p, 32); return v; }

/* Per target, for the GB blocks of a group, stride bytes apart: their values from 16 bytes of nibble pairs
 * each (low nibbles first), the 0x10 bits of Q5_0 / Q5_1's fifth bits, their 32 bytes (Q8_0), their fp16
 * scale (and min after it) as per-lane floats. Generic vector code for these went through the stack. */
#if GB == 2
INLINE lb nibble_group(const uint8_t *qs, int stride) {
    __m256i q = _mm256_inserti128_si256(_mm256_castsi128_si256(_mm_loadu_si128((const __m128i *)qs)),
                                        _mm_loadu_si128((const __m128i *)(qs + stride)), 1);
    __m512i twice = _mm512_permutexvar_epi64(_mm512_setr_epi64(0, 1, 0, 1, 2, 3, 2, 3), _mm512_castsi256_si512(q));
    const int64_t four = 0x0004000400040004;
    __m512i shifted = _mm512_srlv_epi16(twice, _mm512_setr_epi64(0, 0, four, four, 0, 0, four, four));
    return (lb)_mm512_and_si512(shifted, _mm512_set1_epi8(15));
}
INLINE lb fifth_group(const uint8_t *qh, int stride) {
    uint32_t a, b;
    memcpy(&a, qh, 4);
    memcpy(&b, qh + stride, 4);
    return (lb)_mm512_maskz_mov_epi8(a | (uint64_t)b << 32, _mm512_set1_epi8(16));
}
INLINE lb byte_group(const uint8_t *p, int stride) {
    return (lb)_mm512_inserti64x4(_mm512_castsi256_si512(_mm256_loadu_si256((const __m256i *)p)),
                                  _mm256_loadu_si256((const __m256i *)(p + stride)), 1);
}
INLINE void scale_lanes(const uint8_t *p, int stride, lf *d, lf *m) {
    uint32_t a, b;
    memcpy(&a, p, 4);
    memcpy(&b, p + stride, 4);
    __m512 f = _mm512_castps128_ps512(_mm_cvtph_ps(_mm_setr_epi32((int)a, (int)b, 0, 0)));   /* d0 m0 d1 m1 */
    *d = (lf)_mm512_permutexvar_ps(_mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 2, 2, 2, 2, 2, 2, 2, 2), f);
    *m = (lf)_mm512_permutexvar_ps(_mm512_setr_epi32(1, 1, 1, 1, 1, 1, 1, 1, 3, 3, 3, 3, 3, 3, 3, 3), f);
}
#else
#if defined(__AVX2__)
INLINE b32 nibbles(b16 q) { return (b32)_mm256_set_m128i((__m128i)(q >> 4), (__m128i)(q & 15)); }
INLINE b32 fifth_bits(uint32_t qh) { return (b32)_mm256_and_si256(bit_bytes(qh), _mm256_set1_epi8(16)); }
#else
INLINE b32 nibbles(b16 q) {
    b32 v;
    for (int j = 0; j < 16; j++)
        v[j] = q[j] & 15, v[j + 16] = q[j] >> 4;
    return v;
}
INLINE b32 fifth_bits(uint32_t qh) {
    b32 v;
    for (int j = 0; j < 32; j++)
        v[j] = (qh >> j & 1) << 4;
    return v;
}
#endif
INLINE lb nibble_group(const uint8_t *qs, int stride) { (void)stride; return nibbles(load_bytes16(qs)); }
INLINE lb fifth_group(const uint8_t *qh, int stride) {
    uint32_t bits;
    (void)stride;
    memcpy(&bits, qh, 4);
    return fifth_bits(bits);
}
INLINE lb byte_group(const uint8_t *p, int stride) { (void)stride; return load_bytes32(p); }
INLINE void scale_lanes(const uint8_t *p, int stride, lf *d, lf *m) {
    (void)stride;
    *d = (lf){0} + h2f(p);
    *m = (lf){0} + h2f(p + 2);
}
#endif

/* a group of weights: unsigned bytes q, per-lane scales d and mins m; sign: Q8_0's bytes as stored */
typedef struct { lb q, sign; lf d, m; } wgroup;
typedef wgroup (*grouper)(const uint8_t *, int64_t);

INLINE wgroup group_q4(const uint8_t *row, int64_t g, const int bytes) {
    const uint8_t *b = row + g * GB * bytes;
    wgroup w = {.q = nibble_group(b + bytes - 16, bytes)};
    scale_lanes(b, bytes, &w.d, &w.m);
    return w;
}

INLINE wgroup group_q4_0(const uint8_t *row, int64_t g) { return group_q4(row, g, 18); }

INLINE wgroup group_q4_1(const uint8_t *row, int64_t g) { return group_q4(row, g, 20); }

INLINE wgroup group_q5(const uint8_t *row, int64_t g, const int bytes) {
    const uint8_t *b = row + g * GB * bytes;
    wgroup w = {.q = nibble_group(b + bytes - 16, bytes) | fifth_group(b + bytes - 20, bytes)};
    scale_lanes(b, bytes, &w.d, &w.m);
    return w;
}

INLINE wgroup group_q5_0(const uint8_t *row, int64_t g) { return group_q5(row, g, 22); }

INLINE wgroup group_q5_1(const uint8_t *row, int64_t g) { return group_q5(row, g, 24); }

INLINE wgroup group_q8_0(const uint8_t *row, int64_t g) {
    const uint8_t *b = row + g * GB * 34;
    wgroup w = {.sign = byte_group(b + 2, 34)};
    sb neg = (sb)w.sign < 0;
    w.q = VNNI ? w.sign ^ 0x80 : (lb)(((sb)w.sign ^ neg) - neg);
    scale_lanes(b, 34, &w.d, &w.m);
    return w;
}

/* x (signed bytes) negated where neg is -1 (else 0): Q8_0's magnitudes and the i-quants' multiply x carrying their
 * signs */
INLINE lb signed_by(lb x, sb neg) {
#if GB == 1
    return (lb)negated_where((i8x32)x, (i8x32)neg);
#else
    return (lb)(((sb)x ^ neg) - neg);
#endif
}

#if defined(__AVX2__)
/* a sub-block's two scales sc[0], sc[1] in the 16-bit lanes of its values' first and second halves */
INLINE __m256i scale_halves(const int *sc) {
    return _mm256_set_m128i(_mm_set1_epi16((int16_t)sc[1]), _mm_set1_epi16((int16_t)sc[0]));
}
#endif

/* the i-quants below 4 bits: GB sub-blocks' magnitudes (unsigned bytes), where they are negative, and their halves'
 * odd integer scales in the 16-bit lanes of their pair sums (vpmaddubsw's lane p: values 2p and 2p + 1) */
typedef int16_t ls __attribute__((vector_size(LANES * 4)));
typedef struct { lb q; sb neg; ls sc; } iq_group;
INLINE iq_group group_iq(const int type, const uint8_t *b, int j) {
    iq_group w;
    i8x32 q[GB], neg[GB];
    int sc[2 * GB];
    for (int t = 0; t < GB; t++)
        q[t] = iq_magnitudes(type, b, j + t, &neg[t], sc + 2 * t);
    /* each vector made in registers: lanes stored one by one and read back as one vector waited on the store
     * forwarding, which cannot join them (the AVX-512 decode rows ran 2.1-3.0x slower on Zen 5) */
#if GB == 2
    w.q = (lb)_mm512_inserti64x4(_mm512_castsi256_si512((__m256i)q[0]), (__m256i)q[1], 1);
    w.neg = (sb)_mm512_inserti64x4(_mm512_castsi256_si512((__m256i)neg[0]), (__m256i)neg[1], 1);
    w.sc = (ls)_mm512_inserti64x4(_mm512_castsi256_si512(scale_halves(sc)), scale_halves(sc + 2), 1);
#else
    memcpy(&w.q, q, sizeof w.q);
    memcpy(&w.neg, neg, sizeof w.neg);
#if defined(__AVX2__)
    w.sc = (ls)scale_halves(sc);
#else
    int16_t lanes[2 * LANES];
    for (int p = 0; p < 2 * LANES; p++)
        lanes[p] = (int16_t)sc[p / 8];
    memcpy(&w.sc, lanes, sizeof lanes);
#endif
#endif
    return w;
}

/* each int32 lane's 4 byte pairs w (unsigned) times x (signed), a pair's two products summed then times its 16-bit
 * lane's scale (vpmaddubsw, then vpmaddwd by the scales; neither saturates at the i-quants' magnitudes) */
INLINE li dot_scaled(lb w, lb x, ls sc) {
#if GB == 2
    return (li)_mm512_madd_epi16(_mm512_maddubs_epi16((__m512i)w, (__m512i)x), (__m512i)sc);
#elif defined(__AVX2__)
    return (li)_mm256_madd_epi16(_mm256_maddubs_epi16((__m256i)w, (__m256i)x), (__m256i)sc);
#else
    uint8_t wv[4 * LANES];
    int8_t xv[4 * LANES];
    int16_t s[2 * LANES];
    int32_t r[LANES];
    memcpy(wv, &w, sizeof wv), memcpy(xv, &x, sizeof xv), memcpy(s, &sc, sizeof s);
    for (int l = 0; l < LANES; l++)
        r[l] = (wv[4 * l] * xv[4 * l] + wv[4 * l + 1] * xv[4 * l + 1]) * s[2 * l]
               + (wv[4 * l + 2] * xv[4 * l + 2] + wv[4 * l + 3] * xv[4 * l + 3]) * s[2 * l + 1];
    li out;
    memcpy(&out, r, sizeof out);
    return out;
#endif
}

/* n bf16 values from x[at] as fp32 into dst */
static inline const float *widen(const void *x, int64_t at, int64_t n, float *restrict dst) {
    const uint16_t *src = (const uint16_t *)x + at;
    for (int64_t i = 0; i < n; i++)
        dst[i] = bf2f(src[i]);
    return dst;
}

/* x's row i (ld elements a row) */
static inline const void *row_of(const void *x, int64_t i, int64_t ld, int bf16) {
    return (const char *)x + i * ld * (bf16 ? 2 : 4);
}

/* Where a matmul's results go: y [M, ld], fp32 or bf16 (rounded to nearest even, as torch's .to() rounds), each
 * plus bias (fp32, or NULL) before the rounding; silu: the results are gate | up halves that go out as
 * silu(gate) * up (silu_rows) */
typedef struct {
    void *y;
    int64_t ld;
    int bf16;
    const float *bias;
    int silu;
    int argmax;    /* MATMUL_ARGMAX: y the rows' tokens; on the tiles each thread's running argmax in best, at */
    float *best;   /* (each row's largest result so far and its index, < 0: none yet) */
    int64_t *at;
} out_rows;

/* a ranks before b (at indices ia, ib) in argmax order: larger, a NaN counting as largest, then the lower index */
static int ranks_before(float a, int64_t ia, float b, int64_t ib) {
    if (a != a)
        return b == b || ia < ib;
    return b == b && (a > b || (a == b && ia < ib));
}

/* value v at index j (rounded to bf16 first where round_bf16) into a running argmax: best, *token (< 0: none yet) */
static void take(float v, int64_t j, int round_bf16, float *best, int64_t *token) {
    v = round_bf16 ? bf2f(f2bf(v)) : v;
    if (*token < 0 || ranks_before(v, j, *best, *token))
        *best = v, *token = j;
}

/* the argmax of n values v (each rounded to bf16 first where round_bf16), -1 where n is 0 */
static int64_t row_argmax(const float *v, int64_t n, int round_bf16) {
    int64_t token = -1;
    float best = 0;
    for (int64_t j = 0; j < n; j++)
        take(v[j], j, round_bf16, &best, &token);
    return token;
}

/* results t [rows, width] (ldt apart) of output rows m.., columns n.. into o: the kernels work in fp32 tiles
 * and each tile goes out as written, so a bf16 result needs no fp32 copy of the whole output */
static void store_tile(const float *t, int64_t ldt, int64_t rows, int64_t width, out_rows o, int64_t m, int64_t n) {
    for (int64_t r = 0; r < rows; r++) {
        const float *src = t + r * ldt;
        const int64_t at = (m + r) * o.ld + n;
        if (o.bf16) {
            uint16_t *dst = (uint16_t *)o.y + at;
            for (int64_t i = 0; i < width; i++)
                dst[i] = f2bf(o.bias ? src[i] + o.bias[n + i] : src[i]);
        } else {
            float *dst = (float *)o.y + at;
            for (int64_t i = 0; i < width; i++)
                dst[i] = o.bias ? src[i] + o.bias[n + i] : src[i];
        }
    }
}

/* y[m + r, n + i] = silu(g) * u for r < rows, i < width: g and u the sums of a gate row and its up row at t + r * ldt
 * + i and up elements on (fp32, or bf16: t_bf16), rounded to y's dtype first as the gate_up output is, so the
 * results are the separate calls', bitwise (silu_times) */
static void silu_rows(const void *t, int t_bf16, int64_t ldt, int64_t up, int64_t rows, int64_t width, out_rows o,
                      int64_t m, int64_t n) {
    for (int64_t r = 0; r < rows; r++) {
        const int64_t g = r * ldt, at = (m + r) * o.ld + n;
        int64_t i = 0;
        for (; i + NATIVE <= width; i += NATIVE) {
            const vn gate = round_native(load_native(t, g + i, t_bf16), o.bf16);
            const vn upv = round_native(load_native(t, g + up + i, t_bf16), o.bf16);
            store_native(o.y, at + i, silu_times(gate, upv, o.bf16), o.bf16);
        }
        for (; i < width; i++) {
            const uint16_t *tb = t;
            const float *tf = t;
            const vn gate = round_native((vn){0} + (t_bf16 ? bf2f(tb[g + i]) : tf[g + i]), o.bf16);
            const vn upv = round_native((vn){0} + (t_bf16 ? bf2f(tb[g + up + i]) : tf[g + up + i]), o.bf16);
            const float v = silu_times(gate, upv, o.bf16)[0];
            if (o.bf16)
                ((uint16_t *)o.y)[at + i] = f2bf(v);
            else
                ((float *)o.y)[at + i] = v;
        }
    }
}

/* the activations quantized: q [rows, K] int8; per block ([rows, K / 32]) its scale bd, the sum of its values bz
 * and bs = bd * bz (the packed kernel's), and for the scales of 16 values (Q6_K, Q3_K, Q2_K) and the groups decoded under
 * VNNI hs, each 16 values' sum ([rows, K / 16]; else NULL); for the row-major kernel (NULL where it does not run)
 * per lane (4 values, [rows, K / 4]) the block's scale d, its share s = d * block sum / 8 of the min term, and
 * -zero * the lane's sum */
typedef struct { int8_t *q; float *d, *s; int32_t *z; float *bd, *bs; int16_t *hs; int32_t *bz; } qacts;

/* the activation rows from m on */
static qacts rows_from(qacts a, int64_t m, int64_t K) {
    qacts r = a;
    r.q += m * K, r.bd += m * (K / 32), r.bs += m * (K / 32), r.bz += m * (K / 32);
    if (a.hs)
        r.hs += m * (K / 16);
    if (a.d)
        r.d += m * (K / 4), r.s += m * (K / 4), r.z += m * (K / 4);
    return r;
}

typedef int8_t qv __attribute__((vector_size(VW)));

/* int32 lanes (within int8's range) stored as VW bytes at q: on AVX2 by two packs, where GCC's conversion took
 * each lane through a general register (a third of a 2,048-row GEMM's quantization) */
INLINE void store_bytes(int8_t *q, vi r) {
#if VW == 8 && defined(__AVX2__)
    const __m128i words = _mm_packs_epi32(_mm256_castsi256_si128((__m256i)r), _mm256_extractf128_si256((__m256i)r, 1));
    _mm_storel_epi64((__m128i *)q, _mm_packs_epi16(words, words));
#else
    qv bytes = __builtin_convertvector(r, qv);
    memcpy(q, &bytes, VW);
#endif
}

INLINE vi larger_int(vi a, vi b) {
    vi more = a > b;
    return (a & more) | (b & ~more);
}

INLINE vi plus_int(vi a, vi b) { return a + b; }

/* VW vectors in, v[0] out with lane j the reduction (op) of vector j's lanes: log2(VW) rounds, each pairing
 * neighbouring vectors' even runs of h lanes against their odd ones (lo / hi). VW - 1 ops for VW reductions,
 * where reducing each vector alone takes log2(VW) ops and a chain of shuffles. Constant masks: GCC computed a
 * mask built in a loop lane by lane, at run time */
#define HALVING(v, n, op, lo, hi)                                                                             \
    for (int j = 0; j < (n); j++)                                                                            \
        v[j] = op(__builtin_shuffle(v[2 * j], v[2 * j + 1], (vi)lo), __builtin_shuffle(v[2 * j], v[2 * j + 1], (vi)hi));
#if VW == 16
#define TRANSPOSED(v, op)                                                                                      \
    HALVING(v, 8, op, ((vi){0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23}),                         \
            ((vi){8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31}))                               \
    HALVING(v, 4, op, ((vi){0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26, 27}),                       \
            ((vi){4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23, 28, 29, 30, 31}))                                 \
    HALVING(v, 2, op, ((vi){0, 1, 4, 5, 8, 9, 12, 13, 16, 17, 20, 21, 24, 25, 28, 29}),                       \
            ((vi){2, 3, 6, 7, 10, 11, 14, 15, 18, 19, 22, 23, 26, 27, 30, 31}))                                 \
    HALVING(v, 1, op, ((vi){0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30}),                      \
            ((vi){1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31}))
#elif VW == 8
#define TRANSPOSED(v, op)                                                                                      \
    HALVING(v, 4, op, ((vi){0, 1, 2, 3, 8, 9, 10, 11}), ((vi){4, 5, 6, 7, 12, 13, 14, 15}))                   \
    HALVING(v, 2, op, ((vi){0, 1, 4, 5, 8, 9, 12, 13}), ((vi){2, 3, 6, 7, 10, 11, 14, 15}))                   \
    HALVING(v, 1, op, ((vi){0, 2, 4, 6, 8, 10, 12, 14}), ((vi){1, 3, 5, 7, 9, 11, 13, 15}))
#else
#define TRANSPOSED(v, op)                                                                                      \
    HALVING(v, 2, op, ((vi){0, 1, 4, 5}), ((vi){2, 3, 6, 7}))                                                 \
    HALVING(v, 1, op, ((vi){0, 2, 4, 6}), ((vi){1, 3, 5, 7}))
#endif

/* n <= VW blocks of 32 values (xb) into q, with their scales (bd), sums (bz) and bs: all n blocks' largest magnitudes,
 * then all their sums, reduced across lanes at once. The largest magnitude is taken on the bits: for finite
 * values their order is the values' order, and NaN or infinity (bits from 0x7f800000 up) come out above
 * every finite value, so one reduction also finds a non-finite block. */
INLINE void quantize_blocks(const float *xb, int n, int8_t *q, float *bd, int32_t *bz, float *bs) {
    const vi magnitude = (vi){0} + 0x7fffffff, sign = ~magnitude;
    const vf below_half = (vf){0} + 0.49999997f;   /* + 0.5 - ulp, then truncation: half away from zero */
    vi top[VW], total[VW];
    for (int j = 0; j < VW; j++) {
        top[j] = (vi){0};
        for (int s = 0; s < STEP && j < n; s++)
            top[j] = larger_int((vi)loadv(xb + 32 * j + s * VW) & magnitude, top[j]);
    }
    TRANSPOSED(top, larger_int)
    /* a non-finite block gives NaN (d), as the exact path would, not rounded garbage */
    const vi finite = top[0] < 0x7f800000;
    const vf d = (vf)(((vi)((vf)top[0] / 127) & finite) | ((vi)((vf){0} + NAN) & ~finite));
    const vf inverse = (vf)((vi)(1 / d) & (finite & (d != 0)));
    float id[VW] __attribute__((aligned(64)));
    memcpy(id, &inverse, sizeof id);
    for (int j = 0; j < VW; j++) {
        total[j] = (vi){0};
        for (int s = 0; s < STEP && j < n; s++) {
            vf t = loadv(xb + 32 * j + s * VW) * id[j];
            vi r = __builtin_convertvector(t + (vf)(((vi)t & sign) | (vi)below_half), vi);
            store_bytes(q + 32 * j + s * VW, r);
            total[j] += r;
        }
    }
    TRANSPOSED(total, plus_int)
    const vf scaled = d * __builtin_convertvector(total[0], vf);
    memcpy(bd, &d, n * sizeof(float));
    memcpy(bz, &total[0], n * sizeof(int32_t));
    memcpy(bs, &scaled, n * sizeof(float));
}

static void quantize_rows(const void *x, int64_t ldx, int bf16, int64_t M, int64_t K, int zero, qacts a) {
    float wide[32 * VW] __attribute__((aligned(64)));
    const int64_t blocks = K / 32;
    /* rows one after another are one run of blocks, VW at a time across the rows' ends: alone, a row of the default
     * model's 18 blocks went as 16 then 2, at 1.5x the cost a value of its 48-block rows (Zen 4) */
    const int64_t runs = ldx == K ? 1 : M, run_blocks = ldx == K ? M * blocks : blocks;
    for (int64_t r = 0; r < runs; r++)
        for (int64_t b = 0; b < run_blocks; b += VW) {
            const int n = run_blocks - b < VW ? (int)(run_blocks - b) : VW;
            const int64_t at = r * ldx + 32 * b, o = r * blocks + b;
            const float *xb = bf16 ? widen(x, at, 32 * n, wide) : (const float *)x + at;
            if (n == VW)   /* (a constant count: the blocks' vectors stay in registers, no memset of them) */
                quantize_blocks(xb, VW, a.q + 32 * o, a.bd + o, a.bz + o, a.bs + o);
            else
                quantize_blocks(xb, n, a.q + 32 * o, a.bd + o, a.bz + o, a.bs + o);
        }
    for (int64_t m = 0; m < M; m++) {
        for (int64_t h = 0; h < K / 16 && a.hs; h++) {
            int16_t sum = 0;
            for (int i = 0; i < 16; i++)
                sum += a.q[m * K + 16 * h + i];
            a.hs[m * (K / 16) + h] = sum;
        }
        for (int64_t b = 0; b < blocks && a.d; b++) {
            const float d = a.bd[m * blocks + b], sum = a.bs[m * blocks + b];
            const int8_t *q = a.q + m * K + 32 * b;
            for (int l = 0; l < 8; l++) {
                int64_t o = m * (K / 4) + 8 * b + l;
                a.d[o] = d;
                a.s[o] = sum / 8;
                a.z[o] = -zero * (q[4 * l] + q[4 * l + 1] + q[4 * l + 2] + q[4 * l + 3]);
            }
        }
    }
}

/* each row's accumulator's lanes summed into y[m * ldy] */
INLINE void qdot_sums(const lf *acc, const int rows, float *restrict y, int64_t ldy) {
    for (int m = 0; m < rows; m++) {
        float sum = 0;
        for (int l = 0; l < LANES; l++)
            sum += acc[m][l];
        y[m * ldy] = sum;
    }
}

/* y[m * ldy] = W[n] . x[m] for m < rows (a compile-time constant once inlined) on the int8 activations */
INLINE void qdot_rows(grouper group, const int has_zero, const int has_min, const int sign, const uint8_t *row,
                      qacts a, const int rows, int64_t K, float *restrict y, int64_t ldy) {
    lf acc[TILE], accm[TILE];   /* the min terms apart: two FMAs a row, no adds */
    for (int m = 0; m < rows; m++)
        acc[m] = accm[m] = (lf){0};
    for (int64_t g = 0; g < K / (32 * GB); g++) {
        wgroup w = group(row, g);
        for (int m = 0; m < rows; m++) {
            int64_t o = m * (K / 4) + g * LANES;
            lb x = loadlb(a.q + m * K + g * 32 * GB);
            if (sign)
                x = signed_by(x, (sb)w.sign < 0);
            li d = dot(has_zero ? loadli(a.z + o) : (li){0}, w.q, x);
            acc[m] += __builtin_convertvector(d, lf) * (loadlf(a.d + o) * w.d);
            if (has_min)
                accm[m] += w.m * loadlf(a.s + o);
        }
    }
    for (int m = 0; m < rows; m++)
        acc[m] += accm[m];
    qdot_sums(acc, rows, y, ldy);
}

/* qdot_rows for the i-quants below 4 bits, a super-block (256 values) at a time: what a sub-block's decoding shares
 * with its super-block's others (the address, d, the scale bytes) is worked out once, and its sub-blocks' integer
 * scales multiply in vpmaddwd (the activations' block scale, per 32 values, then the super-block's factor) */
INLINE void qdot_iq_rows(const int type, const int bytes, const uint8_t *row, qacts a, const int rows, int64_t K,
                         float *restrict y, int64_t ldy) {
    lf acc[TILE];
    for (int m = 0; m < rows; m++)
        acc[m] = (lf){0};
    for (int64_t sup = 0; sup < K / 256; sup++) {
        const uint8_t *b = row + sup * bytes;
        lf part[TILE];   /* the super-block's sums in units of its iq_factor */
        for (int m = 0; m < rows; m++)
            part[m] = (lf){0};
#pragma GCC unroll 8
        for (int j = 0; j < 8; j += GB) {
            const iq_group w = group_iq(type, b, j);
            const int64_t g = sup * (8 / GB) + j / GB;
            for (int m = 0; m < rows; m++) {
                const li d = dot_scaled(w.q, signed_by(loadlb(a.q + m * K + g * 32 * GB), w.neg), w.sc);
                part[m] += __builtin_convertvector(d, lf) * loadlf(a.d + m * (K / 4) + g * LANES);
            }
        }
        const float unit = iq_factor(type, b) * IQ_UNIT(type);
        for (int m = 0; m < rows; m++)
            acc[m] += part[m] * unit;
    }
    qdot_sums(acc, rows, y, ldy);
}

#define QIQ_ROWS_OF(type, bytes)                                                                              \
    for (int64_t n = n0; n < n1; n++) {                                                                    \
        const uint8_t *row = w + n * row_bytes;                                                             \
        switch (M) {                                                                                        \
        case 4: qdot_iq_rows(type, bytes, row, a, 4, K, y + n, ldy); break;                                \
        case 3: qdot_iq_rows(type, bytes, row, a, 3, K, y + n, ldy); break;                                \
        case 2: qdot_iq_rows(type, bytes, row, a, 2, K, y + n, ldy); break;                                \
        default: qdot_iq_rows(type, bytes, row, a, 1, K, y + n, ldy);                                       \
        }                                                                                                   \
    }                                                                                                       \
    return;

#define QROWS_OF(fn, has_zero, has_min, sign)                                                                 \
    for (int64_t n = n0; n < n1; n++) {                                                                    \
        const uint8_t *row = w + n * row_bytes;                                                             \
        switch (M) {                                                                                        \
        case 4: qdot_rows(fn, has_zero, has_min, sign, row, a, 4, K, y + n, ldy); break;                   \
        case 3: qdot_rows(fn, has_zero, has_min, sign, row, a, 3, K, y + n, ldy); break;                   \
        case 2: qdot_rows(fn, has_zero, has_min, sign, row, a, 2, K, y + n, ldy); break;                   \
        default: qdot_rows(fn, has_zero, has_min, sign, row, a, 1, K, y + n, ldy);                          \
        }                                                                                                   \
    }                                                                                                       \
    return;

static void qmatmul_rows(int type, const uint8_t *w, int64_t row_bytes, int64_t n0, int64_t n1, int64_t K,
                         qacts a, int64_t M, float *y, int64_t ldy) {
    switch (type) {
    case Q4_0: QROWS_OF(group_q4_0, 1, 0, 0)
    case Q4_1: QROWS_OF(group_q4_1, 0, 1, 0)
    case Q5_0: QROWS_OF(group_q5_0, 1, 0, 0)
    case Q5_1: QROWS_OF(group_q5_1, 0, 1, 0)
    case Q8_0: QROWS_OF(group_q8_0, VNNI, 0, !VNNI)
    case IQ2_XXS: QIQ_ROWS_OF(IQ2_XXS, 66)
    case IQ2_XS: QIQ_ROWS_OF(IQ2_XS, 74)
    case IQ2_S: QIQ_ROWS_OF(IQ2_S, 82)
    case IQ3_XXS: QIQ_ROWS_OF(IQ3_XXS, 98)
    case IQ3_S: QIQ_ROWS_OF(IQ3_S, 110)
    case IQ1_S: QIQ_ROWS_OF(IQ1_S, 50)
    case IQ1_M: QIQ_ROWS_OF(IQ1_M, 56)
    }
}

/* ---- int8 activations on packed weights ---------------------------------------------------------------- */
/* Q4_0, Q4_1, Q5_0, Q5_1 and Q8_0 weights repacked at load (ggml_pack) so that one integer dot product advances
 * LANES rows: a group of LANES rows is stored block by block, each block as the rows' fp16 scales, then their fp16
 * mins (Q4_1, Q5_1), then their values in columns of 4 bytes: column c holds bytes 4c..4c+3 of every row's block,
 * row r in lane r (a 4-bit column: values 4c..4c+3 in the low nibbles, 16+4c..19+4c in the high ones; Q5's first
 * column is each row's qh, the fifth bits). Each 4
 * activation values are broadcast to every lane, so a block's LANES sums end in LANES lanes and its scales
 * convert LANES at a time: no horizontal sums per row, no scalar scale loads per block, about a quarter of
 * the instructions per weight of the row-major kernel above. Rows past the last whole group stay in GGML's
 * layout at the end; the byte count is GGML's. */
#define PACK_ROWS LANES
/* A tile: up to PTILE activation rows against one group, or PTILE / 2 against two side by side (SIDE), each
 * activation broadcast then feeding two dot products. Zen 5 ran vpdpbusd at 67 % of its register-only rate with a
 * broadcast load per instruction, at 82 % with one per two. On AVX2 (16 registers) the same tiles, though their sums
 * no longer all fit, beat 4 rows of one group: the weights' nibble split and the activations' broadcasts serve twice
 * the dot products (Zen 3, one thread: 1.1-1.4x at 16-512 rows; the 64-request workload 1.07x). */
#define PTILE 8
#define SIDE 2
/* GEMMs of this many rows or more take SIDE groups a tile (qmatmul). 128 until session 49, when on Zen 5 the 120 layer
 * linears of the default model in a row (weights from memory) ran 1.08-1.21x faster on pairs of groups from 20-64 rows
 * (avx512 without VNNI 1.06-1.16x, avx2-vnni 1.05-1.09x, avx2 1.07-1.10x from 24), even at 12, 0.97x at 16; on Zen 4
 * (session 50) 1.0-1.05x at 24-64 rows, even at 12-20 */
#define PAIR_ROWS 24
#if defined(__AVX2__)
#define PACKED_PATH 1
typedef int16_t lh __attribute__((vector_size(LANES * 4)));
INLINE lb bcast4(const int8_t *p) {
    int32_t v;
    memcpy(&v, p, 4);
    return (lb)((li){0} + v);
}
#if GB == 2
INLINE lf halves(const uint8_t *p) { return (lf)_mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)p)); }
INLINE lh dot16(lb w, lb x) { return (lh)_mm512_maddubs_epi16((__m512i)w, (__m512i)x); }
INLINE li widen16(lh s) { return (li)_mm512_madd_epi16((__m512i)s, _mm512_set1_epi16(1)); }
INLINE li scaled16(lh s, li scale) { return (li)_mm512_madd_epi16((__m512i)s, (__m512i)scale); }
#else
INLINE lf halves(const uint8_t *p) { return (lf)_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)p)); }
INLINE lh dot16(lb w, lb x) { return (lh)_mm256_maddubs_epi16((__m256i)w, (__m256i)x); }
INLINE li widen16(lh s) { return (li)_mm256_madd_epi16((__m256i)s, _mm256_set1_epi16(1)); }
/* 16-bit sums s times scale: each 32-bit lane s's pair dotted with scale's (the two halves of an int32) */
INLINE li scaled16(lh s, li scale) { return (li)_mm256_madd_epi16((__m256i)s, (__m256i)scale); }
#endif

/* v stays in a vector register here, in program order: GCC otherwise reassociates a block's 32 integer pair
 * sums into one tree, keeps them all live and spilled a third of the AVX2 loop's instructions to the stack */
#define KEEP_IN_REGISTER(v) __asm__("" : "+v"(v))

/* the weights AHEAD_BYTES past p, asked for now, into L2: a decode step's GEMV streams each weight once, and the
 * hardware prefetcher alone let it fall behind memory. Into L1 (hint 3) the K-quants' GEMVs streamed 1.2-2x slower
 * on Zen 4, the 32-value formats' no faster (docs/quantization.md, session 47). */
INLINE void stream_ahead(const uint8_t *p, int64_t bytes) {
    for (int64_t l = 0; l < bytes; l += 64)
        __builtin_prefetch(p + AHEAD_BYTES + l, 0, 2);
}

/* Q5_0 / Q5_1 packed: a row's qh (bit j: value j's fifth bit) is its lane of the block's first column. The 0x10
 * bits of the 4 values a nibble column holds in a lane (values shift.. shift + 3: the low nibbles' at 4c, the high
 * ones' at 16 + 4c), each at bit 4 of its byte: one multishift on AVX512-VBMI, else a multiply that puts bit i of
 * the 4 at bit 8i + 4 (no two of its partial products overlap, so nothing carries) */
INLINE lb fifth_column(li h, const int shift) {
#if defined(__AVX512VBMI__) && GB == 2
    uint64_t at = 0;   /* byte i of lane 2q + s takes qword q's bits from 32s + shift + i - 4 */
    for (int i = 0; i < 8; i++)
        at |= (uint64_t)((32 * (i / 4) + shift + i % 4 - 4) & 63) << (8 * i);
    return (lb)_mm512_and_si512(_mm512_multishift_epi64_epi8(_mm512_set1_epi64((int64_t)at), (__m512i)h),
                                _mm512_set1_epi8(16));
#else
    return (lb)((((h >> shift) & 15) * 0x02040810) & 0x10101010);
#endif
}

/* a block's 4-bit values (bits 5: with their fifth bits, the qh column first) of groups groups (gstride bytes apart)
 * against rows activation rows: d[g][m] lane r = row r's integer dot product. Without VNNI the 16-bit pair sums
 * of a block add up before widening: 8 of at most 2 * 15 * 127 fit, 4 of 2 * 31 * 127. */
INLINE void dot_q4_block(const int bits, const uint8_t *vals, int64_t gstride, const int groups, qacts a,
                         const int rows, int64_t K, int64_t b, li d[SIDE][PTILE]) {
    lh s[SIDE][PTILE];
    const uint8_t *nibbles = vals + (bits == 5 ? 4 * LANES : 0);
    for (int g = 0; g < groups; g++)
        for (int m = 0; m < rows; m++)
            d[g][m] = (li){0}, s[g][m] = (lh){0};
    for (int c = 0; c < 4; c++) {
        lb lo[SIDE], hi[SIDE];
        for (int g = 0; g < groups; g++) {
            lb v = loadlb(nibbles + g * gstride + c * 4 * LANES);
            lo[g] = v & 15, hi[g] = (lb)((li)v >> 4) & 15;
            if (bits == 5) {
                li h = loadli(vals + g * gstride);
                lo[g] |= fifth_column(h, 4 * c), hi[g] |= fifth_column(h, 16 + 4 * c);
            }
        }
        for (int m = 0; m < rows; m++) {
            const int8_t *x = a.q + m * K + 32 * b + 4 * c;
            lb xlo = bcast4(x), xhi = bcast4(x + 16);
            for (int g = 0; g < groups; g++) {
                if (VNNI)
                    d[g][m] = dot(dot(d[g][m], lo[g], xlo), hi[g], xhi);
                else {
                    s[g][m] += dot16(lo[g], xlo) + dot16(hi[g], xhi);
                    KEEP_IN_REGISTER(s[g][m]);
                }
            }
        }
        if (!VNNI && (c == 3 || (bits == 5 && c == 1)))
            for (int g = 0; g < groups; g++)
                for (int m = 0; m < rows; m++)
                    d[g][m] += widen16(s[g][m]), s[g][m] = (lh){0};
    }
}


/* IQ4_VALUES[i] for the index i (0..15) in each byte: one in-lane byte shuffle */
INLINE lb nl_bytes(lb i) {
    const __m128i values = _mm_loadu_si128((const __m128i *)IQ4_VALUES);
#if GB == 2
    return (lb)_mm512_shuffle_epi8(_mm512_broadcast_i32x4(values), (__m512i)i);
#else
    return (lb)_mm256_shuffle_epi8(_mm256_broadcastsi128_si256(values), (__m256i)i);
#endif
}

/* values 4c..4c + 3 of a block in every lane as int8: Q8_0's column c, or (nl: IQ4_NL in Q4_0's layout) the values
 * IQ4_VALUES holds for the low (c < 4) or high nibbles of column c % 4 */
INLINE lb int8_column(const int nl, const uint8_t *vals, const int c) {
    if (!nl)
        return loadlb(vals + c * 4 * LANES);
    const lb v = loadlb(vals + c % 4 * 4 * LANES);
    return nl_bytes(c < 4 ? v & 15 : (lb)((li)v >> 4) & 15);
}

/* a block of int8 weights (Q8_0; nl: IQ4_NL's values) against rows activation rows: under VNNI offset to unsigned
 * by 128 (the zero point), else (or where magnitudes is set) their magnitudes against x carrying their signs. scale
 * (or NULL): group g's values 16h.. times the 16-bit integers scale[g][h] (their pair sums' vpmaddwd) */
INLINE void dot_int8_block(const int nl, const uint8_t *vals, int64_t gstride, const int groups, qacts a,
                           const int rows, int64_t K, int64_t b, li d[SIDE][PTILE], const int magnitudes,
                           const ls scale[SIDE][2]) {
    for (int g = 0; g < groups; g++)
        for (int m = 0; m < rows; m++)
            d[g][m] = (li){0};
    for (int c = 0; c < 8; c++) {
        lb w[SIDE], magnitude[SIDE];
        sb neg[SIDE];
        for (int g = 0; g < groups; g++) {
            w[g] = int8_column(nl, vals + g * gstride, c), neg[g] = (sb)w[g] < 0;
            magnitude[g] = (lb)(((sb)w[g] ^ neg[g]) - neg[g]);
        }
        for (int m = 0; m < rows; m++) {
            lb x = bcast4(a.q + m * K + 32 * b + 4 * c);
            for (int g = 0; g < groups; g++) {
                if (scale) {
                    d[g][m] += dot_scaled(magnitude[g], signed_by(x, neg[g]), scale[g][c / 4]);
                    KEEP_IN_REGISTER(d[g][m]);
                } else if (VNNI && !magnitudes)
                    d[g][m] = dot(d[g][m], w[g] ^ 0x80, x);
                else {
                    d[g][m] = dot(d[g][m], magnitude[g], signed_by(x, neg[g]));
                    KEEP_IN_REGISTER(d[g][m]);
                }
            }
        }
    }
}

/* integers a and b of each lane as the lane's two 16-bit halves (vpmaddwd's pairs) */
INLINE li pair16(li a, li b) { return (a & 0xFFFF) | b << 16; }

/* a decoded block (qdot_decoded's) under VNNI: each 16 values' vpdpbusd sums of (v + 128) x times their integer
 * scale (sc: group g's for values 16h.., sign-extended; NULL: 1), less 128 times the scales against the 16 values'
 * activation sums (a.hs): one instruction a column where dot_int8_block takes three or four (magnitudes' signs onto
 * x, vpmaddubsw, vpmaddwd); the same integers */
INLINE void dot_decoded_vnni(const uint8_t *vals, int64_t gstride, const int groups, qacts a, const int rows,
                             int64_t K, int64_t b, li d[SIDE][PTILE], const li sc[SIDE][2]) {
    for (int g = 0; g < groups; g++)
        for (int m = 0; m < rows; m++)
            d[g][m] = (li){0};
    for (int h = 0; h < 2; h++) {
        li s[SIDE][PTILE];
        for (int g = 0; g < groups; g++)
            for (int m = 0; m < rows; m++)
                s[g][m] = (li){0};
        for (int c = 4 * h; c < 4 * h + 4; c++) {
            lb w[SIDE];
            for (int g = 0; g < groups; g++)
                w[g] = loadlb(vals + g * gstride + c * 4 * LANES) ^ 0x80;
            for (int m = 0; m < rows; m++) {
                const lb x = bcast4(a.q + m * K + 32 * b + 4 * c);
                for (int g = 0; g < groups; g++)
                    s[g][m] = dot(s[g][m], w[g], x);
            }
        }
        for (int g = 0; g < groups; g++)
            for (int m = 0; m < rows; m++)
                d[g][m] += sc ? s[g][m] * sc[g][h] : s[g][m];
    }
    for (int g = 0; g < groups; g++) {
        const li pair = sc ? pair16(sc[g][0], sc[g][1]) : (li){0} + 0x10001;
        for (int m = 0; m < rows; m++) {
            int32_t sums;   /* the block's two 16-value activation sums */
            memcpy(&sums, a.hs + 2 * (m * (K / 32) + b), sizeof sums);
            d[g][m] -= scaled16((lh)((li){0} + sums), pair) << 7;
        }
    }
}

/* IQ4_VALUES[i] for the index i (0..15) in each lane, as floats */
INLINE lf nl_floats(li i) {
    const __m128i bytes = _mm_loadu_si128((const __m128i *)IQ4_VALUES);
#if GB == 2
    const __m512 values = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(bytes));
    return (lf)_mm512_permutexvar_ps((__m512i)i, values);
#else
    const __m256 low = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(bytes));
    const __m256 high = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(bytes, 8)));
    return (lf)_mm256_blendv_ps(_mm256_permutevar8x32_ps(low, (__m256i)i), _mm256_permutevar8x32_ps(high, (__m256i)i),
                                (__m256)(i << 28));   /* index bit 3 as the sign: the high half */
#endif
}

/* a * b + c, as one instruction: GCC's reassociation (-fassociative-math) turned the epilogue's two FMAs a row
 * into multiplies and adds */
#if GB == 2
INLINE lf fmadd(lf a, lf b, lf c) { return (lf)_mm512_fmadd_ps((__m512)a, (__m512)b, (__m512)c); }
#else
INLINE lf fmadd(lf a, lf b, lf c) { return (lf)_mm256_fmadd_ps((__m256)a, (__m256)b, (__m256)c); }
#endif

/* Q4_K packed (ggml_pack, the same bytes): a group's super-block is its rows' fp16 d, then their dmin, then 3
 * columns of their 12 scale bytes, then 32 columns of their 128 value bytes (chunk c's 32 bytes in columns 8c..8c+7:
 * the low nibbles sub-block 2c's values, the high ones sub-block 2c + 1's). Sub-block j's 6-bit scale and min in
 * each lane, as scale_min_k4 reads them from the bytes s0 = 0..3, s1 = 4..7, s2 = 8..11. */
INLINE void k4_scale_min(li s0, li s1, li s2, const int j, lf *sc, lf *mn) {
    const int i = 8 * (j % 4);
    li a = j < 4 ? (s0 >> i) & 63 : ((s2 >> i) & 15) | (((s0 >> (i + 6)) & 3) << 4);
    li b = j < 4 ? (s1 >> i) & 63 : ((s2 >> (i + 4)) & 15) | (((s1 >> (i + 6)) & 3) << 4);
    *sc = __builtin_convertvector(a, lf), *mn = __builtin_convertvector(b, lf);
}

/* LANES 16-bit integers at p, widened */
INLINE li lane_halves(const uint8_t *p) {
#if GB == 2
    return (li)_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p));
#else
    return (li)_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)p));
#endif
}

/* sub-block j's scale (6 bits less 32) of a packed IQ4_XS super-block, each lane's: the high bits from the rows'
 * 16-bit words after their d, the low ones from the column of their 4 nibble bytes after those */
INLINE lf iq4_scale(const uint8_t *blk, const int j) {
    const li low = (loadli(blk + 4 * LANES) >> 4 * j) & 15, high = (lane_halves(blk + 2 * LANES) >> 2 * j) & 3;
    return __builtin_convertvector((low | high << 4) - 32, lf);
}

/* An IQ4_XS super-block (ggml_pack, the same bytes: its rows' d, their 16-bit high scale bits, a column of their
 * low scale nibbles, then 32 columns of their 128 index bytes, sub-block j's 4 columns as Q4_0's nibbles): each
 * 32-value sub-block as dot_int8_block multiplies IQ4_NL's, times d (scale - 32) */
INLINE void kiq4_super(const uint8_t *blk, int64_t gstride, const int groups, qacts a, const int rows, int64_t K,
                       int64_t b, lf acc[SIDE][PTILE]) {
    for (int j = 0; j < 8; j++) {
        li dots[SIDE][PTILE];
        dot_int8_block(1, blk + (8 + 16 * j) * LANES, gstride, groups, a, rows, K, 8 * b + j, dots, 0, NULL);
        for (int g = 0; g < groups; g++) {
            const lf w = halves(blk + g * gstride) * iq4_scale(blk + g * gstride, j);
            for (int m = 0; m < rows; m++) {
                const int64_t o = m * (K / 32) + 8 * b + j;
                /* (the values offset by 128 under VNNI: qdot_packed's zero point) */
                const li sum = dots[g][m] - ((li){0} + a.bz[o]) * Q8_ZERO;
                acc[g][m] = fmadd(__builtin_convertvector(sum, lf), w * a.bd[o], acc[g][m]);
            }
        }
    }
}

#define Q2_K_VALUES 20   /* where a packed Q2_K block's qs columns start (after d, dmin, 4 scale columns) */
#define Q3_K_HMASK 14   /* where a packed Q3_K block's hmask and qs columns start, in bytes a lane */
#define Q3_K_VALUES 46
/* Column c (values 4c..4c + 3 of every row) of 32-value sub-block j of a packed K-quant super-block, as integers
 * q: Q6_K 0..63 (w = d scale (q - 32); ql and qh columns as k6_super reads them), Q4_K / Q5_K 0..15 / 0..31 (w = d sc
 * q - dmin mn; chunk j / 2's nibbles, Q5_K's fifth bits bit j of its qh columns) */
INLINE li k_column(const int type, const uint8_t *blk, const int j, const int c) {
    if (type == IQ4_XS)   /* (IQ4_VALUES + 128) sub-block j's as IQ4_NL's */
        return (li)(int8_column(1, blk + (8 + 16 * j) * LANES, c) ^ 0x80);
    if (type == Q2_K)   /* the 2 bits of qs column 8 (j / 4) + c at 2 (j % 4) */
        return (loadli(blk + (Q2_K_VALUES + 4 * (8 * (j / 4) + c)) * LANES) >> 2 * (j % 4)) & 0x03030303;
    if (type == Q3_K) {   /* (q + 4: 0..7) the 2 bits of qs column 8 (j / 4) + c at 2 (j % 4), hmask column c's bit j */
        const li qs = loadli(blk + (Q3_K_VALUES + 4 * (8 * (j / 4) + c)) * LANES);
        const li high = loadli(blk + (Q3_K_HMASK + 4 * c) * LANES);
        return ((qs >> 2 * (j % 4)) & 0x03030303) | (((high >> j) & 0x01010101) << 2);
    }
    if (type == Q6_K) {
        const uint8_t *cols = blk + 18 * LANES;
        const int half = j / 4, s = j % 4;
        const li low = loadli(cols + 4 * (16 * half + 8 * (s % 2) + c) * LANES);
        const li high = loadli(cols + 4 * (32 + 8 * half + c) * LANES);
        return ((s < 2 ? low : low >> 4) & 0x0F0F0F0F) | (((high >> 2 * s) & 0x03030303) << 4);
    }
    const int five = type == Q5_K;
    const li v = loadli(blk + (16 + 32 * five + 4 * (8 * (j / 2) + c)) * LANES);
    const li q = (j % 2 ? v >> 4 : v) & 0x0F0F0F0F;
    return five ? q | ((loadli(blk + (16 + 4 * c) * LANES) >> j) & 0x01010101) << 4 : q;
}

/* the scale of 16-value group k of a packed Q6_K super-block's rows (an int8 in byte k % 4 of scale column k / 4), a
 * Q3_K one's (6 bits less 32: the low 4 from byte k % 8's nibble k / 8 of columns 0-1, the high 2 from byte 8 +
 * k % 4's bits 2 (k / 4) of column 2) or a Q2_K one's (byte k's low nibble), as integers */
INLINE li k16_scale(const int type, const uint8_t *blk, const int k) {
    if (type == Q2_K)
        return (loadli(blk + 4 * LANES + 4 * (k / 4) * LANES) >> 8 * (k % 4)) & 15;
    if (type == Q3_K) {
        const int at = 8 * (k % 4);
        const li low = (loadli(blk + 2 * LANES + 4 * (k % 8 / 4) * LANES) >> (at + 4 * (k / 8))) & 15;
        const li high = (loadli(blk + 10 * LANES) >> (at + 2 * (k / 4))) & 3;
        return (low | high << 4) - 32;
    }
    const li col = loadli(blk + 2 * LANES + 4 * (k / 4) * LANES);
    return (col << (24 - 8 * (k % 4))) >> 24;
}

/* A Q4_K or (five) Q5_K super-block (qdot_packed_super): each 32-value sub-block's integer sums times its scale
 * d * sc, less its min dmin * mn times the activations' block sum: Q4_1's arithmetic, the scale and min made from the
 * super-block's. Q5_K's 32 qh bytes are 8 columns after the scales' (column j: bit 2c of each byte the fifth bit of
 * sub-block 2c's value, bit 2c + 1 sub-block 2c + 1's). Without VNNI a sub-block's pair sums add up in 16 bits, 8
 * of at most 2 * 15 * 127 (4 of 2 * 31 * 127). */
INLINE void k_super(const int five, const uint8_t *blk, int64_t gstride, const int groups, qacts a, const int rows,
                    int64_t K, int64_t b, lf acc[SIDE][PTILE]) {
    const int values = 16 + (five ? 32 : 0);   /* where the nibble columns start, in bytes a lane */
    for (int c = 0; c < 4; c++) {
        li dl[SIDE][PTILE], dh[SIDE][PTILE];
        lh sl[SIDE][PTILE], sh[SIDE][PTILE];
        for (int g = 0; g < groups; g++)
            for (int m = 0; m < rows; m++)
                dl[g][m] = dh[g][m] = (li){0}, sl[g][m] = sh[g][m] = (lh){0};
        for (int j = 0; j < 8; j++) {
            lb lo[SIDE], hi[SIDE];
            for (int g = 0; g < groups; g++) {
                lb v = loadlb(blk + g * gstride + (values + 4 * (8 * c + j)) * LANES);
                lo[g] = v & 15, hi[g] = (lb)((li)v >> 4) & 15;
                if (five) {
                    const li h = loadli(blk + g * gstride + (16 + 4 * j) * LANES);
                    lo[g] |= (lb)(((h >> 2 * c) & 0x01010101) << 4);
                    hi[g] |= (lb)(((h >> (2 * c + 1)) & 0x01010101) << 4);
                }
            }
            for (int m = 0; m < rows; m++) {
                const int8_t *x = a.q + m * K + 256 * b + 64 * c + 4 * j;
                lb xlo = bcast4(x), xhi = bcast4(x + 32);
                for (int g = 0; g < groups; g++) {
                    if (VNNI)
                        dl[g][m] = dot(dl[g][m], lo[g], xlo), dh[g][m] = dot(dh[g][m], hi[g], xhi);
                    else {
                        sl[g][m] += dot16(lo[g], xlo), sh[g][m] += dot16(hi[g], xhi);
                        KEEP_IN_REGISTER(sl[g][m]);
                        KEEP_IN_REGISTER(sh[g][m]);
                    }
                }
            }
            if (!VNNI && (j == 7 || (five && j == 3)))
                for (int g = 0; g < groups; g++)
                    for (int m = 0; m < rows; m++) {
                        dl[g][m] += widen16(sl[g][m]), dh[g][m] += widen16(sh[g][m]);
                        sl[g][m] = sh[g][m] = (lh){0};
                    }
        }
        for (int g = 0; g < groups; g++) {
            const uint8_t *head = blk + g * gstride;
            const lf d = halves(head), dmin = halves(head + 2 * LANES);
            const li s0 = loadli(head + 4 * LANES), s1 = loadli(head + 8 * LANES), s2 = loadli(head + 12 * LANES);
            lf sc[2], mn[2];
            k4_scale_min(s0, s1, s2, 2 * c, &sc[0], &mn[0]);
            k4_scale_min(s0, s1, s2, 2 * c + 1, &sc[1], &mn[1]);
            for (int m = 0; m < rows; m++) {
                const int64_t o = m * (K / 32) + 8 * b + 2 * c;
                acc[g][m] = fmadd(__builtin_convertvector(dl[g][m], lf), d * sc[0] * a.bd[o], acc[g][m]);
                acc[g][m] = fmadd(dmin * mn[0], (lf){0} - a.bs[o], acc[g][m]);
                acc[g][m] = fmadd(__builtin_convertvector(dh[g][m], lf), d * sc[1] * a.bd[o + 1], acc[g][m]);
                acc[g][m] = fmadd(dmin * mn[1], (lf){0} - a.bs[o + 1], acc[g][m]);
            }
        }
    }
}

INLINE void k4_super(const uint8_t *blk, int64_t gstride, const int groups, qacts a, const int rows, int64_t K,
                     int64_t b, lf acc[SIDE][PTILE]) {
    k_super(0, blk, gstride, groups, a, rows, K, b, acc);
}

INLINE void k5_super(const uint8_t *blk, int64_t gstride, const int groups, qacts a, const int rows, int64_t K,
                     int64_t b, lf acc[SIDE][PTILE]) {
    k_super(1, blk, gstride, groups, a, rows, K, b, acc);
}

/* Q2_K's min of 16-value group k (byte k's high nibble), as integers (w = d scale q - dmin min) */
INLINE li k2_min(const uint8_t *blk, const int k) {
    return (loadli(blk + 4 * LANES + 4 * (k / 4) * LANES) >> (8 * (k % 4) + 4)) & 15;
}

/* column j of each 32 values 128 half.. of a packed Q6_K, Q3_K or Q2_K super-block (k16_super's bytes): values
 * 128 half + 32 q + 4 j.. of every row in v[q] (unsigned: Q6_K 0..63, Q3_K 0..7, Q2_K 0..3) */
INLINE void k16_values(const int type, const uint8_t *blk, const int half, const int j, lb v[4]) {
    if (type == Q2_K) {
        const li qs = loadli(blk + (Q2_K_VALUES + 4 * (8 * half + j)) * LANES);
        for (int q = 0; q < 4; q++)
            v[q] = (lb)((qs >> 2 * q) & 0x03030303);
    } else if (type == Q3_K) {   /* k_column's, each column loaded once */
        const li qs = loadli(blk + (Q3_K_VALUES + 4 * (8 * half + j)) * LANES);
        const li high = loadli(blk + (Q3_K_HMASK + 4 * j) * LANES) >> 4 * half;
        for (int q = 0; q < 4; q++)
            v[q] = (lb)(((qs >> 2 * q) & 0x03030303) | (((high >> q) & 0x01010101) << 2));
    } else {
        const uint8_t *cols = blk + 18 * LANES;
        const li A = loadli(cols + 4 * (16 * half + j) * LANES);
        const li B = loadli(cols + 4 * (16 * half + 8 + j) * LANES);
        const li H = loadli(cols + 4 * (32 + 8 * half + j) * LANES);
        v[0] = (lb)((A & 0x0F0F0F0F) | ((H << 4) & 0x30303030));
        v[1] = (lb)((B & 0x0F0F0F0F) | ((H << 2) & 0x30303030));
        v[2] = (lb)(((A >> 4) & 0x0F0F0F0F) | (H & 0x30303030));
        v[3] = (lb)(((B >> 4) & 0x0F0F0F0F) | ((H >> 2) & 0x30303030));
    }
}

/* block q of a half of a Q6_K, Q3_K or Q2_K super-block's rows (head) into acc: each row's integer sum (scale * q x)
 * less the zero point (Q6_K 32, Q3_K 4) or, apart, Q2_K's mins against the activations' 16-value sums (a.hs); sc0, sc1
 * the block's two integer scales */
INLINE void k16_block_out(const int type, const uint8_t *head, const int half, const int q, const li sc0, const li sc1,
                          const li t[PTILE], qacts a, const int rows, int64_t K, int64_t b, lf acc[PTILE]) {
    const int k = 8 * half + 2 * q;   /* the block's groups k, k + 1 */
    const lf d = halves(head), dmin = halves(head + 2 * LANES);
    const li pair = type == Q2_K ? pair16(k2_min(head, k), k2_min(head, k + 1)) : pair16(sc0, sc1);
    for (int m = 0; m < rows; m++) {
        const int64_t o = m * (K / 32) + 8 * b + 4 * half + q;
        int32_t sums;   /* the block's two 16-value activation sums */
        memcpy(&sums, a.hs + 2 * o, sizeof sums);
        const li against = scaled16((lh)((li){0} + sums), pair);
        if (type == Q2_K) {
            acc[m] = fmadd(__builtin_convertvector(t[m], lf), d * a.bd[o], acc[m]);
            acc[m] = fmadd(__builtin_convertvector(against, lf), dmin * -a.bd[o], acc[m]);
        } else {
            const li sum = t[m] - (against << (type == Q6_K ? 5 : 2));
            acc[m] = fmadd(__builtin_convertvector(sum, lf), d * a.bd[o], acc[m]);
        }
    }
}

/* 16-value group jh of 32-value block j of a super-block's rows (k16_super_blockwise's), each row's sums times the
 * group's integer scales sc[.][jh] added to t: under VNNI in 32 bits, multiplied once at the end. (One loop for this
 * and k16_group_pairs, the 16-bit sums dead under VNNI, ran Q2_K's 5-8 VNNI rows 0.85x.) */
INLINE void k16_group_vnni(const int type, const uint8_t *blk, int64_t gstride, const int groups, qacts a,
                           const int rows, int64_t K, int64_t b, const int j, const int jh, li sc[SIDE][2],
                           li t[SIDE][PTILE]) {
    li s[SIDE][PTILE];
    for (int g = 0; g < groups; g++)
        for (int m = 0; m < rows; m++)
            s[g][m] = (li){0};
    for (int c = 4 * jh; c < 4 * jh + 4; c++) {
        lb v[SIDE];
        for (int g = 0; g < groups; g++)
            v[g] = (lb)k_column(type, blk + g * gstride, j, c);
        for (int m = 0; m < rows; m++) {
            const lb x = bcast4(a.q + m * K + 256 * b + 32 * j + 4 * c);
            for (int g = 0; g < groups; g++)
                s[g][m] = dot(s[g][m], v[g], x);
        }
    }
    for (int g = 0; g < groups; g++)
        for (int m = 0; m < rows; m++)
            t[g][m] += s[g][m] * sc[g][jh];
}

/* the same without VNNI: pair sums in 16 bits (k16_super's run of columns at a time), times the scale in vpmaddwd */
INLINE void k16_group_pairs(const int type, const uint8_t *blk, int64_t gstride, const int groups, qacts a,
                            const int rows, int64_t K, int64_t b, const int j, const int jh, li sc[SIDE][2],
                            li t[SIDE][PTILE]) {
    const int run = type == Q6_K ? 2 : 4;
    lh s[SIDE][PTILE];
    li scale[SIDE];
    for (int g = 0; g < groups; g++) {
        scale[g] = pair16(sc[g][jh], sc[g][jh]);
        for (int m = 0; m < rows; m++)
            s[g][m] = (lh){0};
    }
    for (int c = 4 * jh; c < 4 * jh + 4; c++) {
        lb v[SIDE];
        for (int g = 0; g < groups; g++)
            v[g] = (lb)k_column(type, blk + g * gstride, j, c);
        for (int m = 0; m < rows; m++) {
            const lb x = bcast4(a.q + m * K + 256 * b + 32 * j + 4 * c);
            for (int g = 0; g < groups; g++) {
                s[g][m] += dot16(v[g], x);
                KEEP_IN_REGISTER(s[g][m]);
                if (c % run == run - 1)
                    t[g][m] += scaled16(s[g][m], scale[g]), s[g][m] = (lh){0};
            }
        }
    }
}

/* k16_super from 5 rows (Q2_K's from 4): one 32-value block at a time, so that only its sums live (all 4 blocks' sums
 * of 4 rows and their scales took half again the registers there are: Q2_K at 4 rows read 19 GB/s where 1 row read
 * 43, on Zen 5). Its columns are decoded once a block rather than once for all 4: with VNNI at 1-3 rows 0.9-0.98x,
 * and Q3_K's (two bit planes) and Q6_K's at 4 rows 0.83x and 0.96x */
INLINE void k16_super_blockwise(const int type, const uint8_t *blk, int64_t gstride, const int groups, qacts a,
                                const int rows, int64_t K, int64_t b, lf acc[SIDE][PTILE]) {
    for (int half = 0; half < 2; half++)
        for (int q = 0; q < 4; q++) {
            li t[SIDE][PTILE], sc[SIDE][2];
            for (int g = 0; g < groups; g++)
                for (int m = 0; m < rows; m++)
                    t[g][m] = (li){0};
            for (int jh = 0; jh < 2; jh++) {   /* values 16 jh.. of the block */
                for (int g = 0; g < groups; g++)
                    sc[g][jh] = k16_scale(type, blk + g * gstride, 8 * half + 2 * q + jh);
                if (VNNI)
                    k16_group_vnni(type, blk, gstride, groups, a, rows, K, b, 4 * half + q, jh, sc, t);
                else
                    k16_group_pairs(type, blk, gstride, groups, a, rows, K, b, 4 * half + q, jh, sc, t);
            }
            for (int g = 0; g < groups; g++)
                k16_block_out(type, blk + g * gstride, half, q, sc[g][0], sc[g][1], t[g], a, rows, K, b, acc[g]);
        }
}

/* A Q6_K, Q3_K or Q2_K super-block (qdot_packed_super; ggml_pack, the same bytes). A Q6_K group's is its rows' fp16 d,
 * then 4 columns of their 16 int8 scales, then 32 columns of their 128 ql bytes and 16 of their 64 qh bytes. ql
 * column j of a half (128 values) holds values 4j.. in its low nibbles, 64 + 4j.. in its high ones; column 8 + j
 * values 32 + 4j.. and 96 + 4j..; qh column j their 2 high bits each, in that order. A Q3_K group's is its rows' d,
 * 3 columns of their 12 scale bytes, 8 of their 32 hmask bytes and 16 of their 64 qs bytes (k_column); a Q2_K
 * group's their d, dmin, 4 columns of their 16 scale | min bytes and 16 of their qs bytes.
 * A 32-value block's sum stays an integer until its activation scale: each 16-value group's sums of q x times its
 * integer scale (without VNNI in vpmaddwd, which widens the 16-bit sums anyway), less the zero point (32, 4) times
 * the scales against the groups' activation sums (a.hs); Q2_K's mins against those sums take dmin apart. */
INLINE void k16_super(const int type, const uint8_t *blk, int64_t gstride, const int groups, qacts a, const int rows,
                      int64_t K, int64_t b, lf acc[SIDE][PTILE]) {
    if (rows >= (type == Q2_K ? 4 : 5)) {
        k16_super_blockwise(type, blk, gstride, groups, a, rows, K, b, acc);
        return;
    }
    /* without VNNI this many columns' pair sums add up in 16 bits: Q6_K's at most 2 * 63 * 127 each, Q3_K's 2 * 7 *
     * 127, Q2_K's 2 * 3 * 127 */
    const int run = VNNI ? 4 : type == Q6_K ? 2 : 4;
    for (int half = 0; half < 2; half++) {
        li t[SIDE][PTILE][4];   /* block q's sum of scale * q x */
        li sc[SIDE][4][2];      /* block q's groups' integer scales: group 8 half + 2 q + jh */
        for (int g = 0; g < groups; g++)
            for (int q = 0; q < 4; q++) {
                for (int m = 0; m < rows; m++)
                    t[g][m][q] = (li){0};
                for (int jh = 0; jh < 2; jh++)
                    sc[g][q][jh] = k16_scale(type, blk + g * gstride, 8 * half + 2 * q + jh);
            }
        for (int jh = 0; jh < 2; jh++) {   /* values 16 jh.. of each 32 */
            li scale[SIDE][4];
            for (int g = 0; g < groups; g++)
                for (int q = 0; q < 4; q++)
                    scale[g][q] = VNNI ? sc[g][q][jh] : pair16(sc[g][q][jh], sc[g][q][jh]);
            li s[SIDE][PTILE][4];
            lh s16[SIDE][PTILE][4];
            for (int g = 0; g < groups; g++)
                for (int m = 0; m < rows; m++)
                    for (int q = 0; q < 4; q++)
                        s[g][m][q] = (li){0}, s16[g][m][q] = (lh){0};
            for (int j = 4 * jh; j < 4 * jh + 4; j++) {
                lb v[SIDE][4];
                for (int g = 0; g < groups; g++)
                    k16_values(type, blk + g * gstride, half, j, v[g]);
                const int last = j % run == run - 1;
                for (int m = 0; m < rows; m++)
                    for (int q = 0; q < 4; q++) {
                        lb x = bcast4(a.q + m * K + 256 * b + 128 * half + 32 * q + 4 * j);
                        for (int g = 0; g < groups; g++) {
                            if (VNNI) {
                                s[g][m][q] = dot(s[g][m][q], v[g][q], x);
                                if (last)
                                    t[g][m][q] += s[g][m][q] * scale[g][q], s[g][m][q] = (li){0};
                                continue;
                            }
                            s16[g][m][q] += dot16(v[g][q], x);
                            KEEP_IN_REGISTER(s16[g][m][q]);
                            if (last)
                                t[g][m][q] += scaled16(s16[g][m][q], scale[g][q]), s16[g][m][q] = (lh){0};
                        }
                    }
            }
        }
        for (int g = 0; g < groups; g++)
            for (int q = 0; q < 4; q++) {
                li sums[PTILE];
                for (int m = 0; m < rows; m++)
                    sums[m] = t[g][m][q];
                k16_block_out(type, blk + g * gstride, half, q, sc[g][q][0], sc[g][q][1], sums, a, rows, K, b, acc[g]);
            }
    }
}

INLINE void k6_super(const uint8_t *blk, int64_t gstride, const int groups, qacts a, const int rows, int64_t K,
                     int64_t b, lf acc[SIDE][PTILE]) {
    k16_super(Q6_K, blk, gstride, groups, a, rows, K, b, acc);
}

INLINE void k2_super(const uint8_t *blk, int64_t gstride, const int groups, qacts a, const int rows, int64_t K,
                     int64_t b, lf acc[SIDE][PTILE]) {
    k16_super(Q2_K, blk, gstride, groups, a, rows, K, b, acc);
}

INLINE void k3_super(const uint8_t *blk, int64_t gstride, const int groups, qacts a, const int rows, int64_t K,
                     int64_t b, lf acc[SIDE][PTILE]) {
    k16_super(Q3_K, blk, gstride, groups, a, rows, K, b, acc);
}

/* a super-block's work of a K-quant (k2_super .. k6_super): its products added to acc */
typedef void (*super_block)(const uint8_t *, int64_t, int, qacts, int, int64_t, int64_t, lf[SIDE][PTILE]);

/* a tile's sums (groups x rows vectors of LANES outputs): set to 0; stored to y (row m at y + m * ldy) */
INLINE void tile_zero(lf acc[SIDE][PTILE], const int groups, const int rows) {
    for (int g = 0; g < groups; g++)
        for (int m = 0; m < rows; m++)
            acc[g][m] = (lf){0};
}

INLINE void tile_store(lf acc[SIDE][PTILE], const int groups, const int rows, float *restrict y, int64_t ldy) {
    for (int g = 0; g < groups; g++)
        for (int m = 0; m < rows; m++)
            memcpy(y + m * ldy + g * LANES, &acc[g][m], sizeof acc[g][m]);
}

/* qdot_packed for the K-quants: super-blocks of 256 values, bytes each a row */
INLINE void qdot_packed_super(super_block work, const int bytes, const uint8_t *grp, int64_t gstride, const int groups,
                              qacts a, const int rows, int64_t K, float *restrict y, int64_t ldy, const int stream) {
    lf acc[SIDE][PTILE];
    tile_zero(acc, groups, rows);
    for (int64_t b = 0; b < K / 256; b++) {
        const uint8_t *blk = grp + b * LANES * bytes;
        for (int g = 0; g < groups && stream; g++)
            stream_ahead(blk + g * gstride, LANES * bytes);
        work(blk, gstride, groups, a, rows, K, b, acc);
    }
    tile_store(acc, groups, rows, y, ldy);
}

#define K_SCALES 2   /* qdot_packed's has_min for a super-block's scales and mins (Q4_K) */
#define NL4 40   /* qdot_packed's and fdot_packed's bits for IQ4_NL: 4-bit indices into IQ4_VALUES */
#define NL4_XS 41   /* qdot_packed's for IQ4_XS: the same in super-blocks */

/* y[m * ldy + g * LANES + r] = W[r] . x[m] for the rows r < LANES of groups groups (gstride bytes apart) and
 * m < rows. stream: the first tile against the groups, which reads their weights from memory (or L3), asks for
 * them ahead; later tiles find them in L1. Without it a GEMM's first tile waited on each group: 30 layers' linears
 * at 16-64 rows ran 1.2-1.45x slower. */
INLINE void qdot_packed(const int bits, const int has_min, const int zero, const uint8_t *grp, int64_t gstride,
                        const int groups, qacts a, const int rows, int64_t K, float *restrict y, int64_t ldy,
                        const int stream) {
    if (has_min == K_SCALES || bits == 6 || bits <= 3 || bits == NL4_XS) {   /* Q4_K .. Q2_K, IQ4_XS */
        qdot_packed_super(bits == NL4_XS ? kiq4_super : bits == 6 ? k6_super : bits == 5 ? k5_super
                          : bits == 3 ? k3_super : bits == 2 ? k2_super : k4_super,
                          bits == NL4_XS ? 136 : bits == 6 ? 210 : bits == 5 ? 176 : bits == 3 ? 110 : bits == 2 ? 84
                          : 144, grp, gstride, groups, a, rows, K, y, ldy, stream);
        return;
    }
    const int scales = has_min ? 2 : 1;
    const int64_t bytes = LANES * (2 * scales + (bits == NL4 ? 4 : bits) * 4);   /* one block of a group */
    lf acc[SIDE][PTILE];
    tile_zero(acc, groups, rows);
    for (int64_t b = 0; b < K / 32; b++) {
        const uint8_t *blk = grp + b * bytes;
        li d[SIDE][PTILE];
        for (int g = 0; g < groups && stream; g++)
            stream_ahead(blk + g * gstride, bytes);
        if (bits == 8 || bits == NL4)
            dot_int8_block(bits == NL4, blk + 2 * scales * LANES, gstride, groups, a, rows, K, b, d, 0, NULL);
        else
            dot_q4_block(bits, blk + 2 * scales * LANES, gstride, groups, a, rows, K, b, d);
        for (int g = 0; g < groups; g++) {
            const lf wd = halves(blk + g * gstride), wm = has_min ? halves(blk + g * gstride + 2 * LANES) : (lf){0};
            for (int m = 0; m < rows; m++) {
                int64_t o = m * (K / 32) + b;
                /* a zero point (w = d (q - zero)) comes off the integer sums: a shift and a subtraction beside the
                 * dot products, where an FMA would share their pipe (Zen 4: the Q8_0 head 1.05-1.08x at 64 rows) */
                const li sum = zero ? d[g][m] - ((li){0} + a.bz[o]) * zero : d[g][m];
                acc[g][m] = fmadd(__builtin_convertvector(sum, lf), wd * a.bd[o], acc[g][m]);
                if (has_min)
                    acc[g][m] = fmadd(wm, (lf){0} + a.bs[o], acc[g][m]);
            }
        }
    }
    tile_store(acc, groups, rows, y, ldy);
}

#define PACKED_WIDE(bits, has_min, zero, groups)                                                            \
    case 8: qdot_packed(bits, has_min, zero, grp, gstride, groups, a, 8, K, y, ldy, stream); return;         \
    case 7: qdot_packed(bits, has_min, zero, grp, gstride, groups, a, 7, K, y, ldy, stream); return;         \
    case 6: qdot_packed(bits, has_min, zero, grp, gstride, groups, a, 6, K, y, ldy, stream); return;         \
    case 5: qdot_packed(bits, has_min, zero, grp, gstride, groups, a, 5, K, y, ldy, stream); return;
#define PACKED_ROWS(bits, has_min, zero, groups, wide)                                                      \
    switch (M) {                                                                                           \
    wide                                                                                                   \
    case 4: qdot_packed(bits, has_min, zero, grp, gstride, groups, a, 4, K, y, ldy, stream); return;         \
    case 3: qdot_packed(bits, has_min, zero, grp, gstride, groups, a, 3, K, y, ldy, stream); return;         \
    case 2: qdot_packed(bits, has_min, zero, grp, gstride, groups, a, 2, K, y, ldy, stream); return;         \
    default: qdot_packed(bits, has_min, zero, grp, gstride, groups, a, 1, K, y, ldy, stream); return;        \
    }
#define PACKED_OF(bits, has_min, zero)                                                                      \
    if (groups == 2)                                                                                       \
        PACKED_ROWS(bits, has_min, zero, 2, )                                                              \
    PACKED_ROWS(bits, has_min, zero, 1, PACKED_WIDE(bits, has_min, zero, 1))

/* The formats whose values take the most work to decode in a GEMM (the i-quants below 4 bits, Q6_K, Q3_K and Q2_K):
 * each group of LANES rows is decoded once a call (decode_group) into int8 values laid out as Q8_0's packed blocks,
 * each block led by words (decoded_words) of its rows: their fp32 factors; for a scale a 16 values, two columns of
 * their integer scales (each in both 16-bit halves of its row's lane); for Q2_K, dmin and the two 16 values' mins
 * (a row's lane's halves), against the activations' 16-value sums (a.hs). They are multiplied as Q8_0's (their
 * values' magnitudes against x carrying their signs), the scales in vpmaddwd. Decoding a sub-block costs ~10 times
 * its int8 dot with one activation row, so a GEMM decodes each once, not once a tile of rows. */
INLINE void qdot_decoded(const int words, const uint8_t *grp, int64_t gstride, const int groups, qacts a,
                         const int rows, int64_t K, float *restrict y, int64_t ldy) {
    const int64_t bytes = LANES * (4 * words + 32);
    lf acc[SIDE][PTILE];
    tile_zero(acc, groups, rows);
    for (int64_t b = 0; b < K / 32; b++) {
        const uint8_t *blk = grp + b * bytes;
        li d[SIDE][PTILE];
        ls scale[SIDE][2];
        li sc[SIDE][2];   /* (VNNI) the scales sign-extended from one half */
        for (int g = 0; g < groups && words > DECODED_PLAIN; g++)
            for (int h = 0; h < 2; h++) {
                const li both = loadli(blk + g * gstride + 4 * (1 + h) * LANES);
                scale[g][h] = (ls)both, sc[g][h] = (both << 16) >> 16;
            }
        if (VNNI)
            dot_decoded_vnni(blk + 4 * words * LANES, gstride, groups, a, rows, K, b, d,
                             words > DECODED_PLAIN ? sc : NULL);
        else
            dot_int8_block(0, blk + 4 * words * LANES, gstride, groups, a, rows, K, b, d, 1,
                           words > DECODED_PLAIN ? scale : NULL);
        for (int g = 0; g < groups; g++) {
            const lf wd = loadlf(blk + g * gstride);
            for (int m = 0; m < rows; m++) {
                const int64_t o = m * (K / 32) + b;
                acc[g][m] = fmadd(__builtin_convertvector(d[g][m], lf), wd * a.bd[o], acc[g][m]);
                if (words == DECODED_MINS) {   /* less dmin (min0 x0 + min1 x1), x the 16 values' sums */
                    int32_t sums;
                    memcpy(&sums, a.hs + 2 * o, sizeof sums);
                    const li mins = scaled16((lh)((li){0} + sums), loadli(blk + g * gstride + 16 * LANES));
                    acc[g][m] = fmadd(__builtin_convertvector(mins, lf), loadlf(blk + g * gstride + 12 * LANES) * -a.bd[o],
                                      acc[g][m]);
                }
            }
        }
    }
    tile_store(acc, groups, rows, y, ldy);
}

#define DECODED_ROWS(words, groups)                                                                           \
    switch (M) {                                                                                           \
    case 8: qdot_decoded(words, grp, gstride, groups, a, 8, K, y, ldy); return;                             \
    case 7: qdot_decoded(words, grp, gstride, groups, a, 7, K, y, ldy); return;                             \
    case 6: qdot_decoded(words, grp, gstride, groups, a, 6, K, y, ldy); return;                             \
    case 5: qdot_decoded(words, grp, gstride, groups, a, 5, K, y, ldy); return;                             \
    case 4: qdot_decoded(words, grp, gstride, groups, a, 4, K, y, ldy); return;                             \
    case 3: qdot_decoded(words, grp, gstride, groups, a, 3, K, y, ldy); return;                             \
    case 2: qdot_decoded(words, grp, gstride, groups, a, 2, K, y, ldy); return;                             \
    default: qdot_decoded(words, grp, gstride, groups, a, 1, K, y, ldy); return;                            \
    }
#define DECODED_OF(words)                                                                                   \
    if (groups == 2)                                                                                       \
        DECODED_ROWS(words, 2)                                                                             \
    DECODED_ROWS(words, 1)

static void __attribute__((noinline)) qmatmul_group_decoded(int words, const uint8_t *grp, int64_t gstride,
                                                            int groups, int64_t K, qacts a, int64_t M, float *y,
                                                            int64_t ldy) {
    switch (words) {
    case DECODED_MINS: DECODED_OF(DECODED_MINS)
    case DECODED_SCALED: DECODED_OF(DECODED_SCALED)
    default: DECODED_OF(DECODED_PLAIN)
    }
}

/* qmatmul_group for the i-quants, a function of its own: in qmatmul_group's switch their kernels made the Q4_0 and
 * Q8_0 GEMMs at 64 rows 0.92-0.93x as fast (code layout) */
static void __attribute__((noinline)) qmatmul_group_iq4(int type, const uint8_t *grp, int64_t gstride, int groups,
                                                        int64_t K, qacts a, int64_t M, float *y, int64_t ldy,
                                                        int stream) {
    switch (type) {
    case IQ4_NL: PACKED_OF(NL4, 0, Q8_ZERO)
    case IQ4_XS: PACKED_OF(NL4_XS, 0, Q8_ZERO)
    }
}

/* groups (<= SIDE) packed groups gstride bytes apart against M <= PTILE / groups rows of all from row m on (their
 * outputs at y, side by side); all by address: copied by value for each tile's call, the struct cost Zen 4 ~2 % of a
 * GEMM (the 120 layer linears at 64 and 2,048 rows) */
static void qmatmul_group(int type, const uint8_t *grp, int64_t gstride, int groups, int64_t K, const qacts *all,
                          int64_t m, int64_t M, float *y, int64_t ldy, int stream, int decoded) {
    const qacts a = rows_from(*all, m, K);
    if (decoded) {   /* grp: decode_group's */
        qmatmul_group_decoded(decoded_words(type), grp, gstride, groups, K, a, M, y, ldy);
        return;
    }
    if (type == IQ4_NL || type == IQ4_XS) {
        qmatmul_group_iq4(type, grp, gstride, groups, K, a, M, y, ldy, stream);
        return;
    }
    switch (type) {
    case Q4_0: PACKED_OF(4, 0, 8)
    case Q4_1: PACKED_OF(4, 1, 0)
    case Q5_0: PACKED_OF(5, 0, 16)
    case Q5_1: PACKED_OF(5, 1, 0)
    case Q8_0: PACKED_OF(8, 0, Q8_ZERO)
    case Q4_K: PACKED_OF(4, K_SCALES, 0)
    case Q5_K: PACKED_OF(5, K_SCALES, 0)
    case Q6_K: PACKED_OF(6, 0, 32)
    case Q3_K: PACKED_OF(3, 0, 4)
    case Q2_K: PACKED_OF(2, 0, 0)
    }
}
/* y[m * ldy + r] = W[r] . x[m * ldx] in fp32 for the group's rows r < LANES and m < rows: the exact path's
 * decode rows on the packed layout, each weight widened from its byte (or nibble) in the group's lanes. A
 * block's products are summed before its scale multiplies them, d * sum(q x) (+ min * sum(x) for Q4_1) rather
 * than sum((d q) x): the same up to rounding. The row-major exact kernel widened a row's block to fp32 in memory
 * and then read it back: an LM head's GEMV ran compute-bound there (1.2 ms a call on one core), ~2x the
 * instructions per weight of this one. xsum [rows, K / 32]: the activations' block sums (Q4_1 only). */
INLINE void fdot_packed(const int bits, const int has_min, const int zero, const uint8_t *grp, const float *x,
                        int64_t ldx, const float *xsum, const int rows, int64_t K, float *restrict y, int64_t ldy) {
    const int scales = has_min ? 2 : 1;
    const int64_t bytes = LANES * (2 * scales + (bits == NL4 ? 4 : bits) * 4);
    lf acc[TILE];
    for (int m = 0; m < rows; m++)
        acc[m] = (lf){0};
    for (int64_t b = 0; b < K / 32; b++) {
        const uint8_t *blk = grp + b * bytes, *vals = blk + 2 * scales * LANES;
        const float *xb = x + 32 * b;
        const li h = bits == 5 ? loadli(vals) : (li){0};   /* Q5: the fifth bits' column, then the nibbles' */
        stream_ahead(blk, bytes);
        lf sum[TILE][2];   /* two chains a row: the FMAs of one would wait on each other */
        for (int m = 0; m < rows; m++)
            sum[m][0] = sum[m][1] = (lf){0};
        for (int c = 0; c < (bits == 8 ? 8 : 4); c++) {   /* Q8_0: 8 columns of 4 bytes a row; Q4, Q5: 4 of pairs */
            li v = loadli(vals + (c + (bits == 5)) * 4 * LANES);
            for (int j = 0; j < 4; j++) {
                if (bits == 8) {
                    lf w = __builtin_convertvector((v << (24 - 8 * j)) >> 24, lf);
                    for (int m = 0; m < rows; m++) {
                        sum[m][j & 1] += w * xb[m * ldx + 4 * c + j];
                        KEEP_IN_REGISTER(sum[m][j & 1]);
                    }
                } else {
                    li qlo = (v >> 8 * j) & 15, qhi = (v >> (8 * j + 4)) & 15;
                    if (bits == 5)
                        qlo |= ((h >> (4 * c + j)) & 1) << 4, qhi |= ((h >> (16 + 4 * c + j)) & 1) << 4;
                    lf lo = bits == NL4 ? nl_floats(qlo) : __builtin_convertvector(qlo - zero, lf);
                    lf hi = bits == NL4 ? nl_floats(qhi) : __builtin_convertvector(qhi - zero, lf);
                    for (int m = 0; m < rows; m++) {
                        sum[m][0] += lo * xb[m * ldx + 4 * c + j];
                        sum[m][1] += hi * xb[m * ldx + 16 + 4 * c + j];
                        KEEP_IN_REGISTER(sum[m][0]);
                        KEEP_IN_REGISTER(sum[m][1]);
                    }
                }
            }
        }
        lf wd = halves(blk), wm = has_min ? halves(blk + 2 * LANES) : (lf){0};
        for (int m = 0; m < rows; m++) {
            acc[m] += wd * (sum[m][0] + sum[m][1]);
            if (has_min)
                acc[m] += wm * xsum[m * (K / 32) + b];
        }
    }
    for (int m = 0; m < rows; m++)
        memcpy(y + m * ldy, &acc[m], sizeof acc[m]);
}

/* fdot_packed for the K-quants (super-blocks of 256 values, bytes each a row, the layouts k_super and k16_super
 * read): each 32-value sub-block's (Q6_K, Q3_K, Q2_K: 16-value group's) sums of q x in fp32, times its scale, less
 * (Q4_K, Q5_K) its min times the activations' block sum (Q2_K: a group's min times its 16 activations' sum) --
 * fdot_packed's arithmetic, the scales made per sub-block */
INLINE void fdot_packed_k(const int type, const uint8_t *grp, const float *x, int64_t ldx, const float *xsum,
                          const int rows, int64_t K, float *restrict y, int64_t ldy) {
    const int six = is_k16(type);   /* (scales of 16 values) */
    int block_bytes;
    block_shape(type, &block_bytes);
    const int64_t bytes = LANES * block_bytes;
    const int zero = type == Q6_K ? 32 : type == Q3_K ? 4 : type == IQ4_XS ? 128 : 0;
    lf acc[TILE];
    for (int m = 0; m < rows; m++)
        acc[m] = (lf){0};
    for (int64_t b = 0; b < K / 256; b++) {
        const uint8_t *blk = grp + b * bytes;
        stream_ahead(blk, bytes);
        const lf d = halves(blk);
        for (int j = 0; j < 8; j++) {   /* sub-block j: values 32j.. of the super-block */
            const float *xb = x + 256 * b + 32 * j;
            /* four chains a row (one FMA's latency would bound them); Q6_K: two for values 0-15, two for 16-31 */
            lf sum[TILE][4];
            for (int m = 0; m < rows; m++)
                sum[m][0] = sum[m][1] = sum[m][2] = sum[m][3] = (lf){0};
#pragma GCC unroll 8   /* (constant chains: a sum indexed at run time lives on the stack) */
            for (int c = 0; c < 8; c++) {   /* column c: values 4c..4c + 3 of every row */
                const li q = k_column(type, blk, j, c);
#pragma GCC unroll 4
                for (int e = 0; e < 4; e++) {
                    const lf w = __builtin_convertvector(((q >> 8 * e) & 255) - zero, lf);
                    const int chain = six ? 2 * (c / 4) + (e & 1) : e;
                    for (int m = 0; m < rows; m++) {
                        sum[m][chain] += w * xb[m * ldx + 4 * c + e];
                        KEEP_IN_REGISTER(sum[m][chain]);
                    }
                }
            }
            if (six) {
                for (int i = 0; i < 2; i++) {
                    const lf scale = d * __builtin_convertvector(k16_scale(type, blk, 2 * j + i), lf);
                    for (int m = 0; m < rows; m++)
                        acc[m] += scale * (sum[m][2 * i] + sum[m][2 * i + 1]);
                    if (type != Q2_K)
                        continue;
                    /* less dmin * min * the 16 activations' sum */
                    const lf min = halves(blk + 2 * LANES) * __builtin_convertvector(k2_min(blk, 2 * j + i), lf);
                    for (int m = 0; m < rows; m++) {
                        float xs = 0;
                        for (int t = 0; t < 16; t++)
                            xs += xb[m * ldx + 16 * i + t];
                        acc[m] -= min * xs;
                    }
                }
            } else if (type == IQ4_XS) {
                const lf scale = d * iq4_scale(blk, j);
                for (int m = 0; m < rows; m++)
                    acc[m] += scale * ((sum[m][0] + sum[m][1]) + (sum[m][2] + sum[m][3]));
            } else {
                lf sc, mn;
                k4_scale_min(loadli(blk + 4 * LANES), loadli(blk + 8 * LANES), loadli(blk + 12 * LANES), j, &sc, &mn);
                const lf scale = d * sc, min = halves(blk + 2 * LANES) * mn;
                for (int m = 0; m < rows; m++)
                    acc[m] += scale * ((sum[m][0] + sum[m][1]) + (sum[m][2] + sum[m][3]))
                              - min * xsum[m * (K / 32) + 8 * b + j];
            }
        }
    }
    for (int m = 0; m < rows; m++)
        memcpy(y + m * ldy, &acc[m], sizeof acc[m]);
}

#define FPACKED_OF(bits, has_min, zero)                                                                     \
    switch (M) {                                                                                           \
    case 4: fdot_packed(bits, has_min, zero, grp, x, ldx, xsum, 4, K, y, ldy); return;                    \
    case 3: fdot_packed(bits, has_min, zero, grp, x, ldx, xsum, 3, K, y, ldy); return;                    \
    case 2: fdot_packed(bits, has_min, zero, grp, x, ldx, xsum, 2, K, y, ldy); return;                    \
    default: fdot_packed(bits, has_min, zero, grp, x, ldx, xsum, 1, K, y, ldy); return;                   \
    }

/* one packed group on fp32 activations, M <= TILE rows */
static void fmatmul_group(int type, const uint8_t *grp, int64_t K, const float *x, int64_t ldx, const float *xsum,
                          int64_t M, float *y, int64_t ldy) {
    switch (type) {
    case Q4_0: FPACKED_OF(4, 0, 8)
    case Q4_1: FPACKED_OF(4, 1, 0)
    case Q5_0: FPACKED_OF(5, 0, 16)
    case Q5_1: FPACKED_OF(5, 1, 0)
    case Q8_0: FPACKED_OF(8, 0, 0)
    case IQ4_NL: FPACKED_OF(NL4, 0, 0)
    case Q2_K: case Q3_K: case Q4_K: case Q5_K: case Q6_K: case IQ4_XS:
        switch (M) {
        case 4: fdot_packed_k(type, grp, x, ldx, xsum, 4, K, y, ldy); return;
        case 3: fdot_packed_k(type, grp, x, ldx, xsum, 3, K, y, ldy); return;
        case 2: fdot_packed_k(type, grp, x, ldx, xsum, 2, K, y, ldy); return;
        default: fdot_packed_k(type, grp, x, ldx, xsum, 1, K, y, ldy); return;
        }
    }
}
#else
#define PACKED_PATH 0
static void qmatmul_group(int type, const uint8_t *grp, int64_t gstride, int groups, int64_t K, const qacts *all,
                          int64_t m, int64_t M, float *y, int64_t ldy, int stream, int decoded) {
    (void)type, (void)grp, (void)gstride, (void)groups, (void)K, (void)all, (void)m, (void)M, (void)y, (void)ldy;
    (void)stream;
    (void)decoded;
}
static void fmatmul_group(int type, const uint8_t *grp, int64_t K, const float *x, int64_t ldx, const float *xsum,
                          int64_t M, float *y, int64_t ldy) {
    (void)type, (void)grp, (void)K, (void)x, (void)ldx, (void)xsum, (void)M, (void)y, (void)ldy;
}
#endif

/* the bytes of one 32-value block of a group decoded for qdot_decoded */
static int64_t decoded_block_bytes(int type) { return PACK_ROWS * (4 * decoded_words(type) + 32); }

#if PACKED_PATH
/* rows r < LANES (row_bytes apart) of a low i-quant decoded into qdot_decoded's layout at out */
INLINE void decode_iq_rows(const int type, const int bytes, const uint8_t *w, int64_t row_bytes, int64_t K,
                           uint8_t *restrict out) {
    const int scaled = decoded_words(type) == DECODED_SCALED;
    for (int r = 0; r < LANES; r++)
        for (int64_t sup = 0; sup < K / 256; sup++)
            for (int j = 0; j < 8; j++) {
                const uint8_t *b = w + r * row_bytes + sup * bytes;
                i8x32 neg = {0};
                int sc[2];
                const i8x32 magnitudes = iq_magnitudes(type, b, j, &neg, sc), values = negated_where(magnitudes, neg);
                const float factor = iq_factor(type, b) * IQ_UNIT(type), d = scaled ? factor : factor * (float)sc[0];
                uint8_t *o = out + (sup * 8 + j) * decoded_block_bytes(type);
                memcpy(o + 4 * r, &d, 4);
                for (int h = 0; h < 2 && scaled; h++) {
                    const int32_t both = sc[h] | sc[h] << 16;   /* (odd, 1..31) */
                    memcpy(o + 4 * ((1 + h) * LANES + r), &both, 4);
                }
                int8_t v[32];
                memcpy(v, &values, sizeof v);
                for (int c = 0; c < 8; c++)
                    memcpy(o + 4 * decoded_words(type) * LANES + 4 * (c * LANES + r), v + 4 * c, 4);
            }
}

/* a packed Q6_K, Q3_K or Q2_K group (k16_super's bytes) decoded into qdot_decoded's layout at out: each block's
 * rows' d, its two 16 values' scales (Q2_K: then dmin and their mins), its values less the zero point (32, 4) */
INLINE void decode_k16_group(const int type, const int bytes, const uint8_t *grp, int64_t K, uint8_t *restrict out) {
    const int zero = type == Q6_K ? 32 : type == Q3_K ? 4 : 0, words = decoded_words(type);
    const int64_t block = decoded_block_bytes(type);
    for (int64_t sup = 0; sup < K / 256; sup++) {
        const uint8_t *head = grp + sup * LANES * bytes;
        uint8_t *o = out + sup * 8 * block;
        const lf d = halves(head);
        for (int jb = 0; jb < 8; jb++) {   /* block jb: groups 2 jb, 2 jb + 1 */
            memcpy(o + jb * block, &d, sizeof d);
            for (int h = 0; h < 2; h++) {
                const li sc = k16_scale(type, head, 2 * jb + h), both = pair16(sc, sc);
                memcpy(o + jb * block + 4 * (1 + h) * LANES, &both, sizeof both);
            }
            if (type == Q2_K) {
                const lf dmin = halves(head + 2 * LANES);
                const li mins = pair16(k2_min(head, 2 * jb), k2_min(head, 2 * jb + 1));
                memcpy(o + jb * block + 12 * LANES, &dmin, sizeof dmin);
                memcpy(o + jb * block + 16 * LANES, &mins, sizeof mins);
            }
        }
        for (int half = 0; half < 2; half++)
            for (int j = 0; j < 8; j++) {
                lb v[4];
                k16_values(type, head, half, j, v);
                for (int q = 0; q < 4; q++) {
                    const sb value = (sb)v[q] - (int8_t)zero;
                    memcpy(o + (4 * half + q) * block + 4 * (words + j) * LANES, &value, sizeof value);
                }
            }
    }
}

/* group g (PACK_ROWS rows from row g * PACK_ROWS) of W decoded for qdot_decoded at out: the low i-quants from their
 * rows, Q6_K and Q3_K from their packed copy */
static void decode_group(int type, const uint8_t *w, const uint8_t *packed, int64_t row_bytes, int64_t K, int64_t g,
                         uint8_t *out) {
    const uint8_t *rows = w + g * PACK_ROWS * row_bytes, *grp = packed + g * PACK_ROWS * row_bytes;
    switch (type) {
    case Q6_K: decode_k16_group(Q6_K, 210, grp, K, out); return;
    case Q3_K: decode_k16_group(Q3_K, 110, grp, K, out); return;
    case Q2_K: decode_k16_group(Q2_K, 84, grp, K, out); return;
    case IQ2_XXS: decode_iq_rows(IQ2_XXS, 66, rows, row_bytes, K, out); return;
    case IQ2_XS: decode_iq_rows(IQ2_XS, 74, rows, row_bytes, K, out); return;
    case IQ2_S: decode_iq_rows(IQ2_S, 82, rows, row_bytes, K, out); return;
    case IQ3_XXS: decode_iq_rows(IQ3_XXS, 98, rows, row_bytes, K, out); return;
    case IQ3_S: decode_iq_rows(IQ3_S, 110, rows, row_bytes, K, out); return;
    case IQ1_S: decode_iq_rows(IQ1_S, 50, rows, row_bytes, K, out); return;
    case IQ1_M: decode_iq_rows(IQ1_M, 56, rows, row_bytes, K, out); return;
    }
}
#else
static void decode_group(int type, const uint8_t *w, const uint8_t *packed, int64_t row_bytes, int64_t K, int64_t g,
                         uint8_t *out) {
    (void)type, (void)w, (void)packed, (void)row_bytes, (void)K, (void)g, (void)out;
}
#endif

/* the formats ggml_pack interleaves for the int8 kernel (a packed pointer with another format is ignored) */
static int packable(int type) {
    return PACKED_PATH && (type == Q4_0 || type == Q4_1 || type == Q5_0 || type == Q5_1 || type == Q8_0 || type == Q2_K
                           || type == Q3_K || type == Q4_K || type == Q5_K || type == Q6_K || type == IQ4_NL
                           || type == IQ4_XS);
}

/* the formats the row-major int8 kernel takes (qmatmul_rows); the others' int8 path runs on whole packed groups */
static int row_major_int8(int type) {
    return type == Q4_0 || type == Q4_1 || type == Q5_0 || type == Q5_1 || type == Q8_0 || is_low_iq(type);
}

/* whether a format's blocks carry a min (fp16, after the scale) */
static int with_min(int type) {
    return type == Q4_1 || type == Q5_1;
}

/* whether the exact packed kernel takes the activations' 32-value block sums (a min's term) */
static int takes_sums(int type) {
    return with_min(type) || type == Q4_K || type == Q5_K;
}

/* the zero point a format's weight bytes carry, or -1 for a format without an int8 path (F16, BF16, F32; the
 * K-quants have one on their packed copy alone: decoding their scales per group in the row-major kernel made them
 * slower than their fp32 path) */
static int int8_zero(int type) {
    switch (type) {
    case Q4_0: return 8;
    case Q5_0: return 16;
    case Q8_0: case IQ4_NL: case IQ4_XS: return Q8_ZERO;
    case Q4_1: case Q5_1: case Q4_K: case Q5_K: return 0;
    case Q6_K: return 32;
    case Q3_K: return 4;
    case Q2_K: return 0;
    default: return is_low_iq(type) ? 0 : -1;
    }
}

/* the most rows of such a K-quant a call multiplies on its packed blocks (k16_super) rather than on groups decoded
 * once a call: k16_super a block at a time beat the decoded groups on Zen 5, in one process (GB/s, 12 x 16,384 x
 * 2,048 from memory). With VNNI: 5 rows Q2_K 19.7 vs 9.6, Q3_K 18.8 vs 11.5, Q6_K 27.5 vs 16.1; 8 rows Q2_K 13.2 vs
 * 7.8, Q3_K 7.7 vs 10.5, Q6_K 16.6 vs 15.8; Q2_K at 32 rows 3.4 vs 3.1. Without (LANNER_ISA=avx2): 8 rows 1.34-1.46x
 * faster, 16 rows Q2_K 1.20x, Q3_K 1.08x, Q6_K 1.07x; 32 rows Q3_K 0.89x, Q6_K 0.92x */
static int packed_rows_k16(int type) { return type == Q2_K ? (VNNI ? 32 : 16) : type == Q3_K && VNNI ? 6 : 8; }

/* whether a call of M rows decodes each group once (decode_group) rather than a row at a time per tile: the low
 * i-quants, and Q6_K, Q3_K and Q2_K packed */
static int decodes_groups(int type, const uint8_t *packed, int64_t M) {
    return PACKED_PATH && (is_low_iq(type) ? M > TILE : packed && is_k16(type) && M > packed_rows_k16(type));
}

/* the bytes of SIDE groups decode_group decodes */
static int64_t decoded_bytes(int type, int64_t K) { return SIDE * K / 32 * decoded_block_bytes(type); }

/* the whole groups of PACK_ROWS rows a call of M rows multiplies as packed blocks */
static int64_t whole_groups(int type, const uint8_t *packed, int64_t N, int64_t M) {
    return (packed && packable(type)) || decodes_groups(type, packed, M) ? N / PACK_ROWS : 0;
}

/* activation rows a GEMM takes against every group before the next ones: their int8 values and block scales
 * stay in L2 (a core's 1-2 MiB) while the weights stream past */
#define GEMM_ACT_BYTES (256 << 10)

/* qmatmul's scratch for M activation rows: their int8 values and scales (qacts) in one buffer, NULL when out of
 * memory (free it) */
static char *qacts_buffer(int type, const uint8_t *packed, int64_t N, int64_t K, int64_t M, qacts *a) {
    const int64_t groups = whole_groups(type, packed, N, M);
    const int64_t lanes = N > groups * PACK_ROWS ? M * K / 4 : 0, blocks = M * K / 32;   /* per-lane: row-major */
    /* 16-value groups' activation sums (M * K: whole blocks, so hs is aligned) */
    const int halves16 = groups && (type == Q2_K || (decodes_groups(type, packed, M)
                                                     ? VNNI   /* dot_decoded_vnni */
                                                     : type == Q6_K || type == Q3_K));
    char *buf = malloc(lanes * 12 + blocks * 12 + M * K + (halves16 ? blocks * 4 : 0));
    float *f = (float *)buf;
    *a = (qacts){(int8_t *)(buf + lanes * 12 + blocks * 12), lanes ? f : NULL, lanes ? f + lanes : NULL,
                 lanes ? (int32_t *)f + 2 * lanes : NULL, f + 3 * lanes, f + 3 * lanes + blocks,
                 halves16 ? (int16_t *)(buf + lanes * 12 + blocks * 12 + M * K) : NULL,
                 (int32_t *)f + 3 * lanes + 2 * blocks};
    return buf;
}

/* where thread id's share of [0, n) (in steps of step) starts, split as a static OpenMP loop splits it (its end:
 * thread id + 1's start) */
static int64_t share_start(int64_t n, int step, int64_t id) {
    const int64_t steps = (n + step - 1) / step, threads = omp_get_num_threads();
    const int64_t at = steps / threads * id + (id < steps % threads ? id : steps % threads);
    return at * step < n ? at * step : n;
}

/* where this thread's share starts (end 0) or ends (end 1): no worksharing construct, so a thread may skip its share
 * (out of memory) without the others waiting on it */
static int64_t share_of(int64_t n, int step, int end) {
    return share_start(n, step, omp_get_thread_num() + end);
}

/* spacing of a GEMM's claim counters (int64_t), one cache line each: a thread's own claims stay in its cache */
#define CLAIM_STRIDE 8

/* tiles a GEMM asks ahead for the output lines it will write (claim_rows) */
#define CLAIM_TILES 2

/* the lines of o's rows [m, m + rows) (below end), columns [n, n + width), asked for with intent to write. A GEMM's
 * tiles write results into lines no cache holds yet (the output of a 2,048-row prefill is megabytes); waiting on
 * those store misses cost Zen 4 a third of the tiles' time (4 x 2 tiles of 960 x 576, 2,048 rows: 16.3 cycles a
 * unit against 12.5 with the lines claimed two tiles ahead, 12.3 with streaming stores) */
static void claim_rows(out_rows o, int64_t m, int64_t rows, int64_t end, int64_t n, int64_t width) {
    const int64_t size = o.bf16 ? 2 : 4;
    for (int64_t r = m; r < m + rows && r < end; r++) {
        const char *at = (const char *)o.y + (r * o.ld + n) * size;
        for (int64_t b = 0; b < width * size; b += 64)
            __builtin_prefetch(at + b, 1, 3);
        __builtin_prefetch(at + width * size - 1, 1, 3);
    }
}

/* qmatmul's work on the quantized activations a, this thread's share of it in the region it runs in (the caller
 * waits for the others). decoded: where decodes_groups, this thread's decoded_bytes, into which its groups are
 * decoded SIDE at a time, once a call: all M rows then run against them (in L2 while they do). o.silu (whole
 * groups only, an even number: silu_in_tiles): each gate group's tile beside its up group's, from which silu_rows
 * writes silu(gate) * up, so the gate | up results are never stored (Zen 4, 2,048 rows: 1.1x the gate_up call
 * writing them, then silu_rows over them) */
static void qmatmul_share(int type, const uint8_t *w, const uint8_t *packed, int64_t row_bytes, int64_t N, int64_t K,
                          qacts a, int64_t M, out_rows o, uint8_t *decoded, int64_t *claims) {
    const int64_t groups = whole_groups(type, packed, N, M), first = groups * PACK_ROWS;
    const int64_t group_bytes = decoded_bytes(type, K) / SIDE;
    const int64_t tasks = (N - first + ROWS_PER_TASK - 1) / ROWS_PER_TASK;
    const int plain = !o.bf16 && !o.bias && !o.silu;
    /* groups a tile takes: two where enough rows make the GEMM compute-bound. Below, one group's 8-row tile reads
     * the weights from memory at twice the work per byte: 30 layers' linears at 8 rows ran 1.37x slower in pairs */
    const int step = M >= PAIR_ROWS ? SIDE : 1;
    const int64_t chunk = decoded ? M : (GEMM_ACT_BYTES / (K + K / 32 * 8) / PTILE + 1) * PTILE;
    /* a unit of columns: step groups side by side, or (silu) a gate group and its up group, apart groups later */
    const int64_t units = o.silu ? groups / 2 : groups, per_unit = o.silu ? 1 : step, apart = o.silu ? groups / 2 : 1;
    const int64_t ldt = o.silu ? SIDE * PACK_ROWS : step * PACK_ROWS;
    float tile[2 * PTILE * PACK_ROWS > TILE * ROWS_PER_TASK ? 2 * PTILE * PACK_ROWS : TILE * ROWS_PER_TASK]
        __attribute__((aligned(64)));
    const int64_t chunks = (M + chunk - 1) / chunk;
    const int threads = omp_get_num_threads(), me = omp_get_thread_num();
    /* items: (chunk of rows, unit) pairs of a thread's share, chunk by chunk. With claims, each is claimed from its
     * owner's counter, and a thread done with its own share takes what is left of the others': a thread the host
     * slowed down leaves no core waiting at the region's end */
    for (int v = 0; v < (claims ? threads : 1); v++) {
        const int owner = (me + v) % threads;
        const int64_t g0 = share_start(units, per_unit, owner), g1 = share_start(units, per_unit, owner + 1);
        const int64_t per_chunk = (g1 - g0 + per_unit - 1) / per_unit, items = chunks * per_chunk;
        for (int64_t mine = 0;;) {
            const int64_t i = claims ? __atomic_fetch_add(claims + owner * CLAIM_STRIDE, 1, __ATOMIC_RELAXED) : mine++;
            if (i >= items)
                break;
            const int64_t m0 = i / per_chunk * chunk, m1 = m0 + chunk < M ? m0 + chunk : M;
            const int64_t g = g0 + i % per_chunk * per_unit;
            const int side = o.silu ? SIDE : groups - g < step ? groups - g : step;
            const uint8_t *grp = decoded ? decoded : packed + g * PACK_ROWS * row_bytes;
            const int64_t gstride = decoded ? group_bytes : apart * PACK_ROWS * row_bytes;
            for (int t = 0; decoded && t < side; t++)
                decode_group(type, w, packed, row_bytes, K, g + t * apart, decoded + t * group_bytes);
            const int64_t tile_rows = PTILE / step, width = o.silu ? PACK_ROWS : side * PACK_ROWS;
            claim_rows(o, m0, CLAIM_TILES * tile_rows, m1, g * PACK_ROWS, width);
            for (int64_t m = m0; m < m1; m += tile_rows) {
                const int64_t rows = m1 - m < tile_rows ? m1 - m : tile_rows;
                claim_rows(o, m + CLAIM_TILES * tile_rows, tile_rows, m1, g * PACK_ROWS, width);
                if (plain) {   /* fp32 without a bias: straight into y */
                    qmatmul_group(type, grp, gstride, side, K, &a, m, rows,
                                  (float *)o.y + m * o.ld + g * PACK_ROWS, o.ld, m == m0, decoded != NULL);
                    continue;
                }
                /* (a silu unit's two groups in one tile of PTILE / 2 rows, or in two of PTILE rows side by side) */
                for (int t = 0; t < side; t += step)
                    qmatmul_group(type, grp + t * gstride, gstride, side - t < step ? side - t : step, K,
                                  &a, m, rows, tile + t * PACK_ROWS, ldt, m == m0, decoded != NULL);
                if (o.silu)
                    silu_rows(tile, 0, ldt, PACK_ROWS, rows, PACK_ROWS, o, m, g * PACK_ROWS);
                else
                    store_tile(tile, ldt, rows, side * PACK_ROWS, o, m, g * PACK_ROWS);
            }
        }
    }
    for (int64_t t = share_of(tasks, 1, 0), t1 = share_of(tasks, 1, 1); t < t1; t++) {
        int64_t n0 = first + t * ROWS_PER_TASK, n1 = n0 + ROWS_PER_TASK < N ? n0 + ROWS_PER_TASK : N;
        for (int64_t m = 0; m < M; m += TILE) {
            const int64_t rows = M - m < TILE ? M - m : TILE;
            qmatmul_rows(type, w + n0 * row_bytes, row_bytes, 0, n1 - n0, K, rows_from(a, m, K), rows, tile,
                         ROWS_PER_TASK);
            store_tile(tile, ROWS_PER_TASK, rows, n1 - n0, o, m, n0);
        }
    }
}

/* y = W x on int8 activations, W row-major or packed (its whole groups). More rows than a tile (prefill, big
 * batches: compute-bound) run tile by tile against each group while its weights are in L1, a chunk of rows
 * (GEMM_ACT_BYTES) against every group at a time. 1: out of memory */
static int qmatmul(int type, const uint8_t *w, const uint8_t *packed, int64_t row_bytes, int64_t N, int64_t K,
                   const void *x, int64_t ldx, int x_bf16, int64_t M, out_rows o, int threads) {
    qacts a;
    char *buf = qacts_buffer(type, packed, N, K, M, &a);
    uint8_t *decoded = decodes_groups(type, packed, M) ? malloc(threads * decoded_bytes(type, K)) : NULL;
    int64_t *claims = aligned_alloc(64, threads * CLAIM_STRIDE * sizeof(int64_t));
    if (!buf || (decodes_groups(type, packed, M) && !decoded) || !claims) {
        free(buf), free(decoded), free(claims);
        return 1;
    }
    memset(claims, 0, threads * CLAIM_STRIDE * sizeof(int64_t));
    const int zero = int8_zero(type);
    if (M <= TILE)   /* a decode step's few rows: not worth a barrier */
        quantize_rows(x, ldx, x_bf16, M, K, zero, a);
#pragma omp parallel num_threads(threads)
    {
        if (M > TILE) {   /* each thread's rows in one call: one run of blocks where they are contiguous */
            const int64_t m0 = share_of(M, 1, 0), m1 = share_of(M, 1, 1);
            quantize_rows(row_of(x, m0, ldx, x_bf16), ldx, x_bf16, m1 - m0, K, zero, rows_from(a, m0, K));
#pragma omp barrier
        }
        /* the region's end waits: one barrier a call, not two (30 layers' 1-row GEMVs 1.04-1.10x, 16 sweeps) */
        qmatmul_share(type, w, packed, row_bytes, N, K, a, M, o,
                      decoded ? decoded + omp_get_thread_num() * decoded_bytes(type, K) : NULL, claims);
    }
    free(buf), free(decoded), free(claims);
    return 0;
}

#define AMX_BF16_ROWS 16   /* rows past which MATMUL_AMX_BF16 takes the tiles (up to them: the int8 kernel) */
#define AMX_EXACT_ROWS 4   /* the same for calls without MATMUL_INT8: past 4 rows the exact kernel loses to the tiles
                            * (the LM head at 5-16 rows 1.6-4.5 ms, on the tiles 1.27-1.31) */

/* MATMUL_ARGMAX on kernels whose threads keep a running argmax of every row (the tiles', the bf16 pairs'): each
 * thread's best value and index of each row [threads, M] (index < 0: none yet), or 1 (out of memory) */
static int argmax_begin(int threads, int64_t M, float **best, int64_t **at) {
    *best = malloc(sizeof(float) * threads * M);
    *at = malloc(sizeof(int64_t) * threads * M);
    for (int64_t i = 0; *best && *at && i < threads * M; i++)
        (*at)[i] = -1, (*best)[i] = 0;
    return !*best || !*at;
}

/* the threads' running argmaxes merged into each row's token (the first largest over all of them) */
static void argmax_end(const float *best, const int64_t *at, int threads, int64_t M, int64_t *tokens) {
    for (int64_t m = 0; m < M; m++) {
        float top = 0;
        tokens[m] = -1;
        for (int th = 0; th < threads; th++)
            if (at[th * M + m] >= 0)
                take(best[th * M + m], at[th * M + m], 0, &top, tokens + m);
    }
}

#if GB == 2
/* A pair's results (t [rows, 32]: rows m.., outputs n..) into each row's running argmax (o.best, o.at), as y would
 * hold them (plus the bias, rounded to bf16 where o.bf16): for a greedy step's LM head no logit is written. Rounding
 * keeps order and a best is a rounded value, so a row none of whose sums is NaN or above its best (later outputs win
 * no ties) is passed over unrounded: two compares. */
__attribute__((noinline)) static void argmax_rows(const float *t, int64_t rows, out_rows o, int64_t m, int64_t n) {
    for (int64_t r = 0; r < rows; r++) {
        __m512 v[2];
        __mmask16 wins = 0;
        const __m512 best = _mm512_set1_ps(o.best[m + r]);
        for (int h = 0; h < 2; h++) {
            v[h] = _mm512_load_ps(t + r * 32 + 16 * h);
            if (o.bias)
                v[h] = _mm512_add_ps(v[h], _mm512_loadu_ps(o.bias + n + 16 * h));
            wins |= _mm512_cmp_ps_mask(v[h], best, _CMP_NLE_UQ);   /* above, or NaN */
        }
        if (wins || o.at[m + r] < 0)
            for (int i = 0; i < 32; i++)
                take(v[i / 16][i % 16], n + i, o.bf16, o.best + m + r, o.at + m + r);
    }
}
#endif

/* ---- bf16 activations on AMX tiles ------------------------------------------------------------------------- *
 * A bf16 model's big steps (MATMUL_AMX_BF16): each packed block of 16 weight rows is dequantized into bf16 as a B
 * tile (tile row r: every weight row's values 2r and 2r + 1, side by side), once per chunk of activation rows, and
 * TDPBF16PS multiplies it with r <= 16 bf16 activation rows read in place, a partial last tile's from a zero-padded
 * copy (r x 16 x 32 products, fp32 sums that stay in the tile across the whole of K). The weights are those of a
 * dense bf16 copy (each value rounded to bf16 once), so the results are oneDNN's on that copy up to summation order,
 * with no copy kept: the packed blocks stream. */
#if GB == 2 && defined(__AMX_TILE__) && defined(__AMX_BF16__) && defined(__AVX512BF16__) && defined(__AVX512VBMI__)
#define AMX_BF16 1
#define AMX_ACT_BYTES (1 << 20)   /* activation rows a chunk takes against every group: they stay in L2 */

/* tiles (amx.h, r rows: a_tile_rows): 0-3 C, r x 16 fp32 (rows m..m+r-1 and m+r.., against groups g and g + 1);
 * 4-5 A, r rows x 32 bf16; 6-7 B, 16 rows x 16 pairs */

/* Where the tile wants each byte of 64 bytes q holding 4 values of each of 16 weight rows (row n's at 4n): tile
 * row 2c takes values (0, 1) of every row, row 2c + 1 values (2, 3); as 16 lanes j of a tile row's half h (rows
 * 8h..8h + 7, value pairs side by side), lane j of half h in tile row e takes byte B(e, h, j) = 4(8h + j / 2) + 2e
 * + j % 2 */
static const uint8_t b_order[4][16] = {
    {0, 1, 4, 5, 8, 9, 12, 13, 16, 17, 20, 21, 24, 25, 28, 29}, {32, 33, 36, 37, 40, 41, 44, 45, 48, 49, 52, 53, 56, 57, 60, 61},
    {2, 3, 6, 7, 10, 11, 14, 15, 18, 19, 22, 23, 26, 27, 30, 31}, {34, 35, 38, 39, 42, 43, 46, 47, 50, 51, 54, 55, 58, 59, 62, 63}};

/* vpermb indices that put byte B(e, h, j) of q in lane j (its low byte; its high byte for signed values, which a
 * shift then extends): one shuffle per 16 values, no extract or widening */
INLINE void b_indices(const int sign, __m512i idx[4]) {
    for (int i = 0; i < 4; i++) {
        const __m512i lanes = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)b_order[i]));
        idx[i] = sign ? _mm512_slli_epi32(lanes, 24) : lanes;
    }
}

/* the bytes idx picks from q, as fp32 times d plus m */
INLINE __m512 b_values(__m512i q, __m512i idx, const int sign, __m512 d, __m512 m) {
    __m512i ints = _mm512_maskz_permutexvar_epi8(sign ? 0x8888888888888888ull : 0x1111111111111111ull, idx, q);
    if (sign)
        ints = _mm512_srai_epi32(ints, 24);
    return _mm512_fmadd_ps(_mm512_cvtepi32_ps(ints), d, m);
}

/* Two B tile rows from 64 bytes q holding 4 values of each of 16 weight rows (as unsigned or signed bytes): values
 * (0, 1) of every row into tile row out, (2, 3) into the next; times d plus m per weight row, lanes as the tile's
 * (row n in lanes 2n and 2n + 1 of the pair of halves dh, mh). */
INLINE void b_rows(__m512i q, const int sign, const __m512i *idx, const __m512 *dh, const __m512 *mh, uint16_t *out) {
    for (int e = 0; e < 2; e++)
        _mm512_store_si512(out + 32 * e, (__m512i)_mm512_cvtne2ps_pbh(b_values(q, idx[2 * e + 1], sign, dh[1], mh[1]),
                                                                      b_values(q, idx[2 * e], sign, dh[0], mh[0])));
}

/* Block b of a packed group (16 weight rows) as a B tile: 16 rows x 64 bytes into bt. */
INLINE void b_tile(const int type, const uint8_t *blk, uint16_t *restrict bt) {
    const __m512 d = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)blk));
    __m512 m = with_min(type) ? _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(blk + 32)))
             : type == Q4_0 || type == Q5_0 ? _mm512_mul_ps(d, _mm512_set1_ps(type == Q4_0 ? -8.0f : -16.0f))
             : _mm512_setzero_ps();
    const __m512i lo = _mm512_setr_epi32(0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7);
    const __m512i hi = _mm512_add_epi32(lo, _mm512_set1_epi32(8));
    const __m512 dh[2] = {_mm512_permutexvar_ps(lo, d), _mm512_permutexvar_ps(hi, d)};
    const __m512 mh[2] = {_mm512_permutexvar_ps(lo, m), _mm512_permutexvar_ps(hi, m)};
    const uint8_t *vals = blk + (with_min(type) ? 64 : 32);
    __m512i idx[4];
    b_indices(type == Q8_0, idx);
    if (type == Q8_0) {   /* chunk c: values 4c..4c+3 of every row -> tile rows 2c, 2c + 1 */
        for (int c = 0; c < 8; c++)
            b_rows(_mm512_loadu_si512(vals + 64 * c), 1, idx, dh, mh, bt + 64 * c);
        return;
    }
    const int five = type == Q5_0 || type == Q5_1;   /* the fifth bits' 64 bytes before the nibbles */
    const li h = five ? (li)_mm512_loadu_si512(vals) : (li){0};
    for (int c = 0; c < 4; c++) {   /* chunk c's nibbles: values 4c.. (low) and 16 + 4c.. (high) */
        const __m512i q = _mm512_loadu_si512(vals + 64 * (c + five)), mask = _mm512_set1_epi8(15);
        __m512i lo = _mm512_and_si512(q, mask), hi = _mm512_and_si512(_mm512_srli_epi16(q, 4), mask);
        if (five)
            lo = _mm512_or_si512(lo, (__m512i)fifth_column(h, 4 * c)),
            hi = _mm512_or_si512(hi, (__m512i)fifth_column(h, 16 + 4 * c));
        b_rows(lo, 0, idx, dh, mh, bt + 64 * c);
        b_rows(hi, 0, idx, dh, mh, bt + 64 * (c + 4));
    }
}

/* 16 per-row values v as the tile's lanes: row n's in lanes 2n and 2n + 1 of the pair of halves */
INLINE void b_lanes(__m512 v, __m512 out[2]) {
    const __m512i lo = _mm512_setr_epi32(0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7);
    out[0] = _mm512_permutexvar_ps(lo, v);
    out[1] = _mm512_permutexvar_ps(_mm512_add_epi32(lo, _mm512_set1_epi32(8)), v);
}

/* Sub-block j (values 32j..32j + 31) of a packed K-quant super-block (k_super, k6_super read the same bytes) as a
 * B tile: each weight row's sub-block scale and min made from the super-block's, then its values' columns as
 * b_tile's (column c: values 4c..4c + 3 of every row -> tile rows 2c, 2c + 1). */
INLINE void b_tile_k(const int type, const uint8_t *blk, const int j, uint16_t *restrict bt) {
    __m512i idx[4];
    __m512 dh[2][2], mh[2][2];   /* [scale of values 0-15, 16-31] (Q4_K / Q5_K: one scale) */
    b_indices(0, idx);
    const __m512 d = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)blk));
    if (type == Q6_K) {   /* values 16i.. of the sub-block: scale 2j + i, w = d scale (q - 32) */
        for (int i = 0; i < 2; i++) {
            const __m512 scale = _mm512_mul_ps(d, (__m512)__builtin_convertvector(k16_scale(Q6_K, blk, 2 * j + i), lf));
            b_lanes(scale, dh[i]);
            b_lanes(_mm512_mul_ps(scale, _mm512_set1_ps(-32.0f)), mh[i]);
        }
        for (int c = 0; c < 8; c++)
            b_rows((__m512i)k_column(type, blk, j, c), 0, idx, dh[c / 4], mh[c / 4], bt + 64 * c);
        return;
    }
    const __m512 dmin = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(blk + 2 * LANES)));
    lf sc, mn;
    k4_scale_min(loadli(blk + 4 * LANES), loadli(blk + 8 * LANES), loadli(blk + 12 * LANES), j, &sc, &mn);
    b_lanes(_mm512_mul_ps(d, (__m512)sc), dh[0]);
    b_lanes(_mm512_mul_ps(dmin, _mm512_sub_ps(_mm512_setzero_ps(), (__m512)mn)), mh[0]);
    for (int c = 0; c < 8; c++)
        b_rows((__m512i)k_column(type, blk, j, c), 0, idx, dh[0], mh[0], bt + 64 * c);
}

/* The B tiles a pair of groups (w: its packed blocks, the second group's `group` bytes after the first's; a packed
 * block is `block` bytes, of `per` 32-value blocks: 8 for a K-quant's super-block) makes for 32-value block b in bt,
 * where w is given (NULL: made already) */
typedef struct { int type; const uint8_t *w; int64_t group, block; int per; } b_source;

INLINE void b_make(b_source src, int g, int64_t b, int64_t blocks, uint16_t *bt) {
    if (!src.w || b >= blocks)
        return;
    const uint8_t *blk = src.w + g * src.group + b / src.per * src.block;
    if (src.per == 1)
        b_tile(src.type, blk, bt + 512 * (g * blocks + b));
    else
        b_tile_k(src.type, blk, (int)(b % src.per), bt + 512 * (g * blocks + b));
}

/* Activation rows (ld elements apart) into tile t. Read once per pair, they come with the streaming hint where the
 * pair's B tiles (2 KB a block) fit L1 beside them, so they no longer push those out (K = 576 at 2,048 rows
 * 1.2-1.3x); past that (K = 1,536: 96 KB) the B tiles live in L2 either way and the hint cost 1.04x. */
#define STREAM_BLOCKS 20
#define load_rows(t, x, ld, blocks)                \
    do {                                           \
        if ((blocks) <= STREAM_BLOCKS)             \
            _tile_stream_loadd(t, x, (ld) * 2);    \
        else                                       \
            _tile_loadd(t, x, (ld) * 2);           \
    } while (0)


/* A pair's results (t [rows, 32]: rows m.., columns n.. of y; with silu the pair's gates and ups, for 16 outputs)
 * waiting to be stored. They go out a few rows at a time while the next pair's products run, spread over all its
 * blocks: loading them right after the tile stores waited for the tile unit to drain, then left it idle while they
 * were converted (bf16 TTFT at 512-2,048 tokens 1.01-1.04x); spread over the first 4 blocks only, the silu's
 * vector work outran the products there (30 layers' gate_up + silu at 2,048 rows 1.16x spread over all). */
typedef struct { const float *t; int64_t rows, m, n, done; } pending;

/* pending rows up to `upto` stored */
INLINE void store_some(pending *s, out_rows o, int64_t upto) {
    const int64_t end = upto < s->rows ? upto : s->rows;
    if (end <= s->done)
        return;
    if (o.argmax)
        argmax_rows(s->t + s->done * 32, end - s->done, o, s->m + s->done, s->n);
    else if (o.silu)   /* the pair's groups are gate rows and their up rows: 16 outputs */
        silu_rows(s->t + s->done * 32, 0, 32, 16, end - s->done, 16, o, s->m + s->done, s->n);
    else
        store_tile(s->t + s->done * 32, 32, end - s->done, 32, o, s->m + s->done, s->n);
    s->done = end;
}

/* 2r rows of x (ld elements apart; r the rows of a tile, amx_configure_rows) against groups g, g + 1 (their B tiles
 * bt, one per block, 1 KB each, the second group's blocks after the first's) into t [2r, 32]. With a source, the B
 * tiles are made as the products go, block b + 1's while block b's run on the tile unit. The pair before's results
 * (before) go out meanwhile. */
INLINE void amx_pair(const uint16_t *x, int64_t ld, int r, uint16_t *bt, int64_t blocks, float *t, b_source src,
                     pending *before, out_rows o) {
    _tile_zero(0);
    _tile_zero(1);
    _tile_zero(2);
    _tile_zero(3);
    b_make(src, 0, 0, blocks, bt);
    b_make(src, 1, 0, blocks, bt);
    /* a tile is loaded again right after its last product: the tile unit has no renaming, so a load waits for
     * the products that read the tile it overwrites */
    load_rows(4, x, ld, blocks);
    _tile_loadd(6, bt, 64);
    load_rows(5, x + r * ld, ld, blocks);
    _tile_loadd(7, bt + 512 * blocks, 64);
    for (int64_t b = 0; b < blocks; b++) {
        const int64_t next = b + 1 < blocks ? b + 1 : b;
        _tile_dpbf16ps(0, 4, 6);
        _tile_dpbf16ps(2, 5, 6);
        b_make(src, 0, b + 1, blocks, bt);
        _tile_loadd(6, bt + 512 * next, 64);
        _tile_dpbf16ps(1, 4, 7);
        load_rows(4, x + 32 * next, ld, blocks);
        _tile_dpbf16ps(3, 5, 7);
        load_rows(5, x + r * ld + 32 * next, ld, blocks);
        b_make(src, 1, b + 1, blocks, bt);
        _tile_loadd(7, bt + 512 * (blocks + next), 64);
        store_some(before, o, (before->rows * (b + 1) + blocks - 1) / blocks);
    }
    store_some(before, o, before->rows);
    _tile_stored(0, t, 128);
    _tile_stored(1, t + 16, 128);
    _tile_stored(2, t + r * 32, 128);
    _tile_stored(3, t + r * 32 + 16, 128);
}

/* r rows of x against groups g, g + 1 into t [r, 32]: a step's last r rows or fewer, half amx_pair's products (the
 * pair before's results stored as there) */
INLINE void amx_single(const uint16_t *x, int64_t ld, uint16_t *bt, int64_t blocks, float *t, b_source src,
                       pending *before, out_rows o) {
    _tile_zero(0);
    _tile_zero(1);
    b_make(src, 0, 0, blocks, bt);
    b_make(src, 1, 0, blocks, bt);
    for (int64_t b = 0; b < blocks; b++) {
        load_rows(4, x + 32 * b, ld, blocks);
        _tile_loadd(6, bt + 512 * b, 64);
        _tile_loadd(7, bt + 512 * (blocks + b), 64);
        _tile_dpbf16ps(0, 4, 6);
        _tile_dpbf16ps(1, 4, 7);
        b_make(src, 0, b + 1, blocks, bt);
        b_make(src, 1, b + 1, blocks, bt);
        store_some(before, o, (before->rows * (b + 1) + blocks - 1) / blocks);
    }
    store_some(before, o, before->rows);
    _tile_stored(0, t, 128);
    _tile_stored(1, t + 16, 128);
}

/* The rows of an A tile for M rows: as few tiles as 16 rows give, in pairs past one (amx_single's products wait on
 * its loads), their rows shared out evenly, since a product's time goes with its rows: 24 rows as 2 x 12, not
 * 16 + 8 and 8 of zeros; 40 as 4 x 10, not 16 + 16 + 8 (the 4 linears of 30 layers at 17 / 24 / 40 rows 1.14x /
 * 1.3x / 1.12x). Past 64 rows the tiles are whole: the few rows saved are not worth chunks of an odd size. */
static int a_tile_rows(int64_t M) {
    int64_t tiles = (M + 15) / 16;
    if (M > 64)
        return 16;
    tiles += tiles > 1 && tiles % 2;
    return (int)((M + tiles - 1) / tiles);
}

/* y = W x for bf16 x [M, ldx] and packed W (N a multiple of 32), on the tile unit (o.silu: silu(gate) * up of its
 * gate | up rows). Rows go a chunk at a time (AMX_ACT_BYTES) against every pair of groups, whose B tiles are made
 * once per chunk, 2r at a time (r = a_tile_rows); a last partial 2r rows from a zero-padded copy. 1: out of memory */
static int amx_bf16_matmul(int type, const uint8_t *packed, int64_t row_bytes, int64_t N, int64_t K,
                           const uint16_t *x, int64_t ldx, int64_t M, out_rows o, int threads) {
    const int r = a_tile_rows(M);
    const int per = ggml_block_size(type) / 32;   /* 32-value blocks a packed block holds */
    const int64_t blocks = K / 32, bytes = row_bytes / (blocks / per), pairs = N / 32, whole = M / (2 * r) * (2 * r);
    /* pair p: groups 2p and 2p + 1 (outputs 32p..), or with silu group p of the gate rows and its up rows N / 2 rows
     * on (outputs 16p..) */
    const int64_t groups_per_pair = o.silu ? 1 : 2, partner_rows = o.silu ? N / 2 : PACK_ROWS;
    int64_t chunk = AMX_ACT_BYTES / (2 * K) / (2 * r) * (2 * r);
    chunk = chunk < 2 * r ? 2 * r : chunk;
    uint16_t *tail = M > whole ? aligned_alloc(64, 2 * r * K * 2) : NULL;
    if (M > whole && !tail)
        return 1;
    if (tail) {
        memset(tail, 0, 2 * r * K * 2);
        for (int64_t m = whole; m < M; m++)
            memcpy(tail + (m - whole) * K, x + m * ldx, K * 2);
    }
    /* each thread's B tiles for a pair of groups (allocated here: every thread must reach every omp for) */
    uint16_t *tiles = aligned_alloc(64, threads * 2 * blocks * 1024);
    if (!tiles) {
        free(tail);
        return 1;
    }
    /* MATMUL_ARGMAX: each thread's running argmax of each row, merged after */
    float *best = NULL;
    int64_t *at = NULL;
    if (o.argmax && argmax_begin(threads, M, &best, &at)) {
        free(tiles), free(tail), free(best), free(at);
        return 1;
    }
#pragma omp parallel num_threads(threads) firstprivate(o)
    {
        uint16_t *bt = tiles + omp_get_thread_num() * 2 * blocks * 512;
        if (o.argmax)
            o.best = best + omp_get_thread_num() * M, o.at = at + omp_get_thread_num() * M;
        float t[2][32 * 32] __attribute__((aligned(64)));   /* a pair's results, and the one before's */
        pending before = {t[1], 0, 0, 0, 0};
        int cur = 0;   /* the buffer this pair's results go to: the other one's are pending */
        amx_configure_rows(r);
        for (int64_t m0 = 0; m0 < M; m0 += chunk) {
            const int64_t m1 = m0 + chunk < M ? m0 + chunk : M;
#pragma omp for schedule(static) nowait
            for (int64_t p = 0; p < pairs; p++) {
                for (int64_t m = m0; m < m1; m += 2 * r) {
                    const int64_t rows = m1 - m < 2 * r ? m1 - m : 2 * r;
                    /* the chunk's first rows make the pair's B tiles, the others reuse them */
                    const b_source src = {type, m == m0 ? packed + groups_per_pair * p * PACK_ROWS * row_bytes : NULL,
                                          partner_rows * row_bytes, PACK_ROWS * bytes, per};
                    float *out = t[cur];
                    if (m + 2 * r <= whole)
                        amx_pair(x + m * ldx, ldx, r, bt, blocks, out, src, &before, o);
                    else if (rows <= r)
                        amx_single(tail, K, bt, blocks, out, src, &before, o);
                    else
                        amx_pair(tail, K, r, bt, blocks, out, src, &before, o);
                    before = (pending){out, rows, m, groups_per_pair * PACK_ROWS * p, 0};
                    cur ^= 1;
                }
            }
        }
        store_some(&before, o, before.rows);
        _tile_release();
    }
    if (at)
        argmax_end(best, at, threads, M, o.y);
    free(tiles), free(tail), free(best), free(at);
    return 0;
}
#else
#define AMX_BF16 0
static int amx_bf16_matmul(int type, const uint8_t *packed, int64_t row_bytes, int64_t N, int64_t K,
                           const uint16_t *x, int64_t ldx, int64_t M, out_rows o, int threads) {
    (void)type, (void)packed, (void)row_bytes, (void)N, (void)K, (void)x, (void)ldx, (void)M, (void)o, (void)threads;
    return 2;
}
#endif

/* The rows past which ggml_matmul takes MATMUL_AMX_BF16 calls of packed weights of this type and shape to the
 * tiles, or 0 where it never does (this build lacks the tile unit's bf16 path, or the process may not use it). */
/* (int8: for calls with MATMUL_INT8, which the int8 kernel takes up to more rows than the exact one) */
int ggml_amx_bf16(int type, int64_t N, int64_t K, int int8) {
    const int tiles = AMX_BF16 && packable(type) && type != Q3_K && type != Q2_K && type != IQ4_NL
                      && type != IQ4_XS   /* (no AMX host to test those) */
                      && N % 32 == 0 && K % ggml_block_size(type) == 0 && N >= 32 && tiles_granted();
    return tiles ? (int8 ? AMX_BF16_ROWS : AMX_EXACT_ROWS) : 0;
}

/* ---- exported ---------------------------------------------------------------------------------------- */

/* the 32-value block sums [M, K / 32] of fp32 rows x (Q4_1's min term on the packed exact path), or NULL (out of
 * memory) */
static float *block_sums(const float *x, int64_t ldx, int64_t M, int64_t K) {
    float *xsum = malloc(sizeof(float) * M * (K / 32));
    for (int64_t m = 0; m < M && xsum; m++)
        for (int64_t b = 0; b < K / 32; b++) {
            float t = 0;
            for (int i = 0; i < 32; i++)
                t += x[m * ldx + 32 * b + i];
            xsum[m * (K / 32) + b] = t;
        }
    return xsum;
}

/* ggml_matmul's exact path on fp32 rows */
static int exact_matmul(int type, const uint8_t *w, const uint8_t *packed, int64_t row_bytes, int64_t N, int64_t K,
                        const float *x, int64_t ldx, int64_t M, float *y, int64_t ldy, int threads) {
    /* packed weights: whole groups on fp32 activations, TILE rows at a time while the group's blocks are in L1;
     * the rows after them row-major */
    int64_t groups = packed && packable(type) && M >= 1 ? N / PACK_ROWS : 0, first = groups * PACK_ROWS;
    int64_t tasks = (N - first + ROWS_PER_TASK - 1) / ROWS_PER_TASK;
    float *xsum = groups && takes_sums(type) ? block_sums(x, ldx, M, K) : NULL;
    if (groups && takes_sums(type) && !xsum)
        return 1;
    int failed = 0;
#pragma omp parallel num_threads(threads) reduction(| : failed)
    {
        /* more rows than a tile: each weight row is decoded once into buf, then read as F32 by every tile */
        float *buf = M > TILE ? aligned_alloc(64, ((K * sizeof(float) + 63) / 64) * 64) : NULL;
        failed = M > TILE && !buf;
#pragma omp for schedule(static) nowait
        for (int64_t g = 0; g < groups; g++)
            for (int64_t m = 0; m < M; m += TILE)
                fmatmul_group(type, packed + g * PACK_ROWS * row_bytes, K, x + m * ldx, ldx,
                              xsum ? xsum + m * (K / 32) : NULL, M - m < TILE ? M - m : TILE,
                              y + m * ldy + g * PACK_ROWS, ldy);
#pragma omp for schedule(static) nowait   /* the region's end waits */
        for (int64_t t = 0; t < tasks; t++) {
            int64_t n0 = first + t * ROWS_PER_TASK, n1 = n0 + ROWS_PER_TASK < N ? n0 + ROWS_PER_TASK : N;
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
    free(xsum);
    return failed;
}

/* ---- bf16 rows on bf16 pairs: the exact path past TILE rows, where the CPU has AVX512-BF16 ------------------- *
 * A Q8_0 value is d q with q an 8-bit integer, which bf16 holds exactly, and its product with a bf16 activation is
 * exact in fp32. Each pair of packed groups is made once a call into bf16 pairs of those integers (pair vector p of
 * a block, lane l: row l's values 2p, 2p + 1) beside the rows' fp32 scales, in a buffer of the thread's (L1/L2), and
 * every activation row is dotted with it there: vdpbf16ps multiplies 2 values a lane an instruction, twice an fp32
 * FMA's, at the int8 dot product's rate on Zen 5, and the weights stream as the packed copy's bytes. Each block's
 * sums are scaled once, as the fp32 path scales them: the results equal dequantize-then-matmul up to summation order
 * (vdpbf16ps reads bf16 denormals as zero), each one's order fixed by K alone, whatever rows are beside it. An LM
 * head's greedy batches need that: a bf16 batch's head past TILE rows was oneDNN's on a copy of the weights rounded
 * to bf16, whose argmax the exact kernels could not give a burst. */
#define PAIR_BLOCK_BYTES (64 * 17)   /* a block of a group's pairs: 16 pair vectors, then the rows' scales */
#define DP_ROWS 8   /* activation rows a tile dots with two groups: 16 sums in flight (vdpbf16ps's latency) */

/* Whether ggml_matmul multiplies bf16 rows past TILE of this format and shape on pairs (MATMUL_BF16_PAIRS): a
 * build with AVX512-BF16, Q8_0 in whole packed pairs of groups. */
int ggml_bf16_pairs(int type, int64_t N, int64_t K) {
#if defined(__AVX512BF16__) && GB == 2
    return type == Q8_0 && N % (2 * PACK_ROWS) == 0 && K % 32 == 0 && N > 0;
#else
    (void)type, (void)N, (void)K;
    return 0;
#endif
}

#if defined(__AVX512BF16__) && GB == 2
/* the packed Q8_0 group at grp (K / 32 blocks of its rows' fp16 scales, then 8 columns of 4 values a row) as pairs
 * into out. A column's values as fp32 in their order, 4 lanes' at a time, rounded to bf16 (exactly) two vectors into
 * one, hold lane l's pairs 2c and 2c + 1 side by side; a permute parts them. (Shifting each lane's bytes out and
 * joining the fp32 values' top halves took 1.15-1.37x as long over the default model's head at 8-64 rows.) */
static void make_pairs(const uint8_t *grp, int64_t blocks, uint8_t *out) {
    const __m512i even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
    const __m512i odd = _mm512_add_epi32(even, _mm512_set1_epi32(1));
    for (int64_t b = 0; b < blocks; b++, grp += PACK_ROWS * 34, out += PAIR_BLOCK_BYTES) {
        _mm512_store_ps(out + 1024, _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)grp)));
        for (int c = 0; c < 8; c++) {
            const uint8_t *col = grp + 32 + 64 * c;
            __m512 f[4];
            for (int q = 0; q < 4; q++)   /* lanes 4q..4q + 3 */
                f[q] = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(col + 16 * q))));
            const __m512i lo = (__m512i)_mm512_cvtne2ps_pbh(f[1], f[0]), hi = (__m512i)_mm512_cvtne2ps_pbh(f[3], f[2]);
            _mm512_store_si512(out + 64 * (2 * c), _mm512_permutex2var_epi32(lo, even, hi));
            _mm512_store_si512(out + 64 * (2 * c + 1), _mm512_permutex2var_epi32(lo, odd, hi));
        }
    }
}

/* the two packed groups from grp on as pairs into out: the second K / 32 * PAIR_BLOCK_BYTES after the first */
static void make_group_pairs(const uint8_t *grp, int64_t row_bytes, int64_t blocks, uint8_t *out) {
    make_pairs(grp, blocks, out);
    make_pairs(grp + PACK_ROWS * row_bytes, blocks, out + blocks * PAIR_BLOCK_BYTES);
}

/* rows (<= DP_ROWS) bf16 activation rows x against two groups' pairs (the second `group` bytes after the first) into
 * t [rows, 32]. The running totals live in t (L1): in registers beside 16 sums they spilled. */
INLINE void pairs_tile(const uint8_t *grp, int64_t group, int64_t blocks, const uint16_t *x, int64_t ldx,
                       const int rows, float *t) {
    for (int i = 0; i < rows * 32; i += 16)
        _mm512_store_ps(t + i, _mm512_setzero_ps());
    for (int64_t b = 0; b < blocks; b++) {
        const uint8_t *blk[2] = {grp + b * PAIR_BLOCK_BYTES, grp + group + b * PAIR_BLOCK_BYTES};
        __m512 sum[DP_ROWS][2];
        for (int r = 0; r < rows; r++)
            sum[r][0] = sum[r][1] = _mm512_setzero_ps();
#pragma GCC unroll 2
        for (int p = 0; p < 16; p++) {
            const __m512bh w0 = (__m512bh)_mm512_load_si512(blk[0] + 64 * p);
            const __m512bh w1 = (__m512bh)_mm512_load_si512(blk[1] + 64 * p);
            for (int r = 0; r < rows; r++) {
                int32_t pair;
                memcpy(&pair, x + r * ldx + 32 * b + 2 * p, 4);
                const __m512bh xv = (__m512bh)_mm512_set1_epi32(pair);
                sum[r][0] = _mm512_dpbf16_ps(sum[r][0], w0, xv);
                sum[r][1] = _mm512_dpbf16_ps(sum[r][1], w1, xv);
            }
        }
        for (int h = 0; h < 2; h++) {
            const __m512 d = _mm512_load_ps(blk[h] + 1024);
            for (int r = 0; r < rows; r++)
                _mm512_store_ps(t + 32 * r + 16 * h,
                                _mm512_fmadd_ps(d, sum[r][h], _mm512_load_ps(t + 32 * r + 16 * h)));
        }
    }
}

#define PAIRS_TILE(n) pairs_tile(pairs, group, blocks, x + m * ldx, ldx, n, t)

/* y = W x for bf16 rows x [M, ldx] and Q8_0 W packed: each pair of groups made into pairs once, then dotted with
 * every row, DP_ROWS at a time. 1: out of memory */
static int pairs_matmul(const uint8_t *packed, int64_t row_bytes, int64_t N, int64_t K, const uint16_t *x,
                        int64_t ldx, int64_t M, out_rows o, int threads) {
    const int64_t blocks = K / 32, group = blocks * PAIR_BLOCK_BYTES;
    uint8_t *buffers = aligned_alloc(64, threads * 2 * group);
    float *best = NULL;
    int64_t *at = NULL;
    if (!buffers || (o.argmax && argmax_begin(threads, M, &best, &at))) {
        free(buffers), free(best), free(at);
        return 1;
    }
    /* the next pair's packed bytes asked for a share a tile: the hardware prefetcher alone left the products waiting
     * on each pair's first tile (the default model's head 1.2x at 8-64 rows; into L1, not L2: 1.18x more at 8) */
    const int64_t packed_pair = 2 * PACK_ROWS * row_bytes, tiles = (M + DP_ROWS - 1) / DP_ROWS;
    const int64_t share = (packed_pair / tiles + 63) / 64 * 64;
#pragma omp parallel num_threads(threads) firstprivate(o)
    {
        uint8_t *pairs = buffers + omp_get_thread_num() * 2 * group;
        float t[DP_ROWS * 32] __attribute__((aligned(64)));
        if (o.argmax)
            o.best = best + omp_get_thread_num() * M, o.at = at + omp_get_thread_num() * M;
#pragma omp for schedule(static)
        for (int64_t n = 0; n < N; n += 2 * PACK_ROWS) {
            const uint8_t *grp = packed + n * row_bytes;
            make_group_pairs(grp, row_bytes, blocks, pairs);
            for (int64_t m = 0; m < M; m += DP_ROWS) {
                for (int64_t l = m / DP_ROWS * share; l < (m / DP_ROWS + 1) * share && l < packed_pair; l += 64)
                    __builtin_prefetch(grp + packed_pair + l, 0, 3);
                const int64_t rows = M - m < DP_ROWS ? M - m : DP_ROWS;
                switch (rows) {
                case 8: PAIRS_TILE(8); break;
                case 7: PAIRS_TILE(7); break;
                case 6: PAIRS_TILE(6); break;
                case 5: PAIRS_TILE(5); break;
                case 4: PAIRS_TILE(4); break;
                case 3: PAIRS_TILE(3); break;
                case 2: PAIRS_TILE(2); break;
                default: PAIRS_TILE(1); break;
                }
                if (o.argmax)   /* (a greedy step's head: no logit written) */
                    argmax_rows(t, rows, o, m, n);
                else
                    store_tile(t, 32, rows, 32, o, m, n);
            }
        }
    }
    if (at)
        argmax_end(best, at, threads, M, o.y);
    free(buffers), free(best), free(at);
    return 0;
}
#else
static int pairs_matmul(const uint8_t *packed, int64_t row_bytes, int64_t N, int64_t K, const uint16_t *x,
                        int64_t ldx, int64_t M, out_rows o, int threads) {
    (void)packed, (void)row_bytes, (void)N, (void)K, (void)x, (void)ldx, (void)M, (void)o, (void)threads;
    return 2;
}
#endif

int ggml_matmul(int type, const uint8_t *w, const uint8_t *packed, int64_t row_bytes, int64_t N, int64_t K,
                const void *x, int64_t ldx, int64_t M, void *y, int64_t ldy, const float *bias, int threads,
                int flags);

/* t [rows, PACK_ROWS] = packed Q8_0 group g's rows against bf16 rows x [rows, ldx] (rows <= TILE) as pairs_matmul
 * computes them (bitwise: each lane's sums its own), for ggml_argmax's candidates: the pair of groups holding g made
 * into pairs (2 * K / 32 * PAIR_BLOCK_BYTES) unless it is the one made last (*made_at) */
static void pairs_group(const uint8_t *packed, int64_t row_bytes, int64_t K, int64_t g, const uint16_t *x, int64_t ldx,
                        int rows, uint8_t *pairs, int64_t *made_at, float *t) {
#if defined(__AVX512BF16__) && GB == 2
    const int64_t blocks = K / 32, group = blocks * PAIR_BLOCK_BYTES, first = g / 2 * 2;
    float both[DP_ROWS * 32] __attribute__((aligned(64)));
    if (*made_at != first)
        make_group_pairs(packed + first * PACK_ROWS * row_bytes, row_bytes, blocks, pairs), *made_at = first;
    pairs_tile(pairs, group, blocks, x, ldx, rows, both);
    for (int r = 0; r < rows; r++)
        memcpy(t + r * PACK_ROWS, both + 32 * r + 16 * (g - first), 16 * sizeof(float));
#else
    (void)packed, (void)row_bytes, (void)K, (void)g, (void)x, (void)ldx, (void)rows, (void)pairs, (void)made_at,
        (void)t;
#endif
}

/* whether ggml_matmul's int8 path takes a call's weights (MATMUL_INT8 and rows given): a format with the path, on
 * whole vectors of blocks or whole packed groups (the K-quants: packed only) */
static int int8_path(int type, const uint8_t *packed, int64_t N, int64_t K) {
    const int whole_groups = K % (32 * GB) == 0 || (packed && packable(type) && N % PACK_ROWS == 0);
    return int8_zero(type) >= 0 && (row_major_int8(type) ? whole_groups : packed && packable(type));
}

/* Whether qmatmul takes MATMUL_SILU_MUL in its tiles: every column in whole groups, gate's as many as up's */
static int silu_in_tiles(int type, const uint8_t *packed, int64_t N, int64_t K, int64_t M, int flags) {
    return flags & MATMUL_INT8 && int8_path(type, packed, N, K) && whole_groups(type, packed, N, M) * PACK_ROWS == N
           && N % (2 * PACK_ROWS) == 0;
}

/* Whether ggml_team_matmul takes such a call: ggml_matmul's int8 path for a decode step's few rows (M <= TILE),
 * without MATMUL_SILU_MUL or MATMUL_ARGMAX. (The tiles take more rows than that.) */
int ggml_team_takes(int type, const uint8_t *packed, int64_t N, int64_t K, int64_t M, int flags) {
    return flags & MATMUL_INT8 && !(flags & (MATMUL_SILU_MUL | MATMUL_ARGMAX)) && M > 0 && M <= TILE
           && ggml_block_size(type) && K % ggml_block_size(type) == 0 && K % 32 == 0 && int8_path(type, packed, N, K);
}

/* ggml_matmul for a call ggml_team_takes, run by every thread of the caller's parallel region (a decode step's one
 * region for all its layers: starting a region a call cost the batch-1 GEMVs ~10 % of their time): each thread
 * quantizes x for itself, computes its share of y, and waits for the others. Returns 1 where this thread ran out of
 * memory (its share then not computed; it still waits). */
int ggml_team_matmul(int type, const uint8_t *w, const uint8_t *packed, int64_t row_bytes, int64_t N, int64_t K,
                     const void *x, int64_t ldx, int64_t M, void *y, int64_t ldy, const float *bias, int flags) {
    const out_rows o = {y, ldy, !!(flags & MATMUL_Y_BF16), bias, 0, 0, NULL, NULL};
    qacts a;
    char *buf = qacts_buffer(type, packed, N, K, M, &a);
    if (buf) {
        quantize_rows(x, ldx, !!(flags & MATMUL_X_BF16), M, K, int8_zero(type), a);
        qmatmul_share(type, w, packed, row_bytes, N, K, a, M, o, NULL, NULL);   /* M <= TILE: no decoding */
    }
#pragma omp barrier
    free(buf);
    return !buf;
}

/* MATMUL_SILU_MUL where the tiles do not take it: gate | up [M, N] in y's dtype (as the separate call writes it),
 * then silu_rows row by row. 1: out of memory */
static int matmul_then_silu(int type, const uint8_t *w, const uint8_t *packed, int64_t row_bytes, int64_t N, int64_t K,
                            const void *x, int64_t ldx, int64_t M, out_rows o, int threads, int flags) {
    const int64_t es = o.bf16 ? 2 : 4;
    char *sums = malloc(es * (M * N + 1));
    const int failed = sums ? ggml_matmul(type, w, packed, row_bytes, N, K, x, ldx, M, sums, N, NULL, threads,
                                          flags & ~MATMUL_SILU_MUL) : 1;
    if (!failed)
        FOR_ROWS(M, threads, silu_rows(sums + t * N * es, o.bf16, N, N / 2, 1, N / 2, o, t, 0));
    free(sums);
    return failed;
}

/* MATMUL_ARGMAX where the tiles do not take it: the results [M, N] in fp32, then each row's argmax into tokens
 * (take rounds them as a bf16 y would hold them). 1: out of memory */
static int matmul_then_argmax(int type, const uint8_t *w, const uint8_t *packed, int64_t row_bytes, int64_t N,
                              int64_t K, const void *x, int64_t ldx, int64_t M, out_rows o, int threads, int flags) {
    float *sums = malloc(sizeof(float) * (M * N + 1));
    const int failed = sums ? ggml_matmul(type, w, packed, row_bytes, N, K, x, ldx, M, sums, N, o.bias, threads,
                                          flags & ~(MATMUL_ARGMAX | MATMUL_Y_BF16)) : 1;
    for (int64_t m = 0; m < M && !failed; m++)
        ((int64_t *)o.y)[m] = row_argmax(sums + m * N, N, o.bf16);
    free(sums);
    return failed;
}

/* y[m, n] = sum_k W[n, k] x[m, k] (+ bias[n]) for m < M, n < N; x [M, ldx] and y [M, ldy] fp32 or bf16 (flags),
 * bias fp32 or NULL. MATMUL_INT8: the rows of a format with an int8 path (and K a whole number of groups) run
 * on int8 activations, on `packed` (W as ggml_pack wrote it, or NULL) where given; else (or without it) the
 * result equals dequantize-then-matmul up to summation order, also reading `packed` where given. Returns 1 when
 * a buffer cannot be allocated, 2 for a type or K this file cannot take (or MATMUL_SILU_MUL with a bias or with
 * MATMUL_ARGMAX). */
int ggml_matmul(int type, const uint8_t *w, const uint8_t *packed, int64_t row_bytes, int64_t N, int64_t K,
                const void *x, int64_t ldx, int64_t M, void *y, int64_t ldy, const float *bias, int threads,
                int flags) {
    if (!ggml_block_size(type) || K % ggml_block_size(type) || K % 32)
        return 2;
    const int x_bf16 = !!(flags & MATMUL_X_BF16), silu = !!(flags & MATMUL_SILU_MUL);
    const int argmax = !!(flags & MATMUL_ARGMAX);
    if ((silu && (bias || N % 2)) || (silu && argmax))
        return 2;
    const out_rows o = {y, ldy, !!(flags & MATMUL_Y_BF16), bias, silu, argmax, NULL, NULL};
    const int tile_rows = ggml_amx_bf16(type, N, K, !!(flags & MATMUL_INT8));
    if (flags & MATMUL_AMX_BF16 && x_bf16 && packed && tile_rows && M > tile_rows)   /* (N / 2: whole groups) */
        return amx_bf16_matmul(type, packed, row_bytes, N, K, x, ldx, M, o, threads);
    /* exact bf16 rows past TILE on W's pairs (the int8 path's rows never: they take it below) */
    if (flags & MATMUL_BF16_PAIRS && x_bf16 && packed && M > TILE && !silu && ggml_bf16_pairs(type, N, K)
        && !(flags & MATMUL_INT8 && int8_path(type, packed, N, K)))
        return pairs_matmul(packed, row_bytes, N, K, x, ldx, M, o, threads);
    if (argmax)
        return matmul_then_argmax(type, w, packed, row_bytes, N, K, x, ldx, M, o, threads, flags);
    if (silu && !silu_in_tiles(type, packed, N, K, M, flags))   /* gate | up first, as the separate call writes it */
        return matmul_then_silu(type, w, packed, row_bytes, N, K, x, ldx, M, o, threads, flags);
    if (flags & MATMUL_INT8 && M > 0 && int8_path(type, packed, N, K))
        return qmatmul(type, w, packed, row_bytes, N, K, x, ldx, x_bf16, M, o, threads);
    /* the exact path works in fp32: bf16 rows widened first, results through an fp32 copy where they round
     * (+ 1: no zero-byte requests for a step without rows) */
    const int through = o.bf16 || bias;
    float *xf = x_bf16 ? malloc(sizeof(float) * (M * K + 1)) : NULL;
    float *yf = through ? malloc(sizeof(float) * (M * N + 1)) : NULL;
    int failed = (x_bf16 && !xf) || (through && !yf);
    for (int64_t m = 0; m < M && xf; m++)
        widen(x, m * ldx, K, xf + m * K);
    if (!failed)
        failed = exact_matmul(type, w, packed, row_bytes, N, K, xf ? xf : x, xf ? K : ldx, M, yf ? yf : y,
                              yf ? N : ldy, threads);
    if (!failed && yf)
        store_tile(yf, N, M, N, o, 0, 0);
    free(xf), free(yf);
    return failed;
}

/* ---- greedy tokens: the exact path's argmax at the int8 path's cost ------------------------------------- *
 * The int8 path gives y_j = w_j . x' for x' = x in int8 blocks, so |y_j - exact_j| <= |w_j| (|x - x'| + c |x|)
 * (Cauchy-Schwarz; c covers both paths' float rounding; norms[j] >= |w_j|). Only rows j whose interval reaches
 * the best lower bound can hold the largest exact value; the exact path recomputes the packed groups holding them,
 * by the very call it makes on the tile of activation rows that holds this one (its values, bitwise). The default
 * model's LM head (49,152 rows): 1-2 candidates for a median row, 0.1-0.2 % of the groups on average. */
#define SCAN 64   /* values a candidate scan takes at a time: most chunks hold none */

INLINE float lane_max(vf v) {
    float best = v[0];
    for (int l = 1; l < VW; l++)
        best = v[l] > best ? v[l] : best;
    return best;
}

INLINE vf larger(vf a, vf b) {   /* b where either is NaN */
    vi more = a > b;
    return (vf)(((vi)a & more) | ((vi)b & ~more));
}

/* E such that |y_j - exact_j| <= norms[j] * E for activation row x (fp32), from its int8 blocks as qmatmul makes
 * them; NaN where x is not finite */
static float error_scale(const float *x, int64_t K, int zero) {
    int8_t *q = malloc(K + K / 32 * 12);
    if (!q)
        return NAN;
    float *bd = (float *)(q + K), *bs = bd + K / 32;
    qacts a = {q, NULL, NULL, NULL, bd, bs, NULL, (int32_t *)(bs + K / 32)};
    quantize_rows(x, K, 0, 1, K, zero, a);
    double e2 = 0, x2 = 0;
    for (int64_t i = 0; i < K; i++) {
        const double r = (double)x[i] - (double)bd[i / 32] * q[i];
        e2 += r * r, x2 += (double)x[i] * x[i];
    }
    free(q);
    const double e = sqrt(e2), rounding = (2.0 * K + 256) * 0x1p-24 * (sqrt(x2) + e);
    return (float)((e + rounding) * (1 + 0x1p-20));
}

/* the best lower bound of row y's exact values, and the threshold that a value's upper bound must reach to be a
 * candidate (-inf: every value, where y or E is not finite); highs[c]: the largest upper bound of the SCAN values
 * from c * SCAN, so that the scan for candidates reads y again only where they are (one pass over the results, not
 * two: at 64 rows they are 12.6 MB of the LM head's, from L3 or memory) */
static float candidate_threshold(const float *y, const float *norms, int64_t N, float E, int round_bf16,
                                 float *highs) {
    vf lo = (vf){0} - INFINITY, top = (vf){0}, bound = (vf){0};
    vi bad = (vi){0};
    for (int64_t c = 0; c < N; c += SCAN) {
        vf high = (vf){0} - INFINITY;
        for (int64_t j = c; j < c + SCAN && j < N; j += VW) {
            vf v = loadv(y + j), b = loadv(norms + j) * E;
            lo = larger(v - b, lo), high = larger(v + b, high);
            top = larger((vf)((vi)v & 0x7fffffff), top), bound = larger(b, bound);
            bad |= (v - v) != 0;   /* NaN or infinity */
        }
        highs[c / SCAN] = lane_max(high);
    }
    int any_bad = E != E;
    for (int l = 0; l < VW; l++)
        any_bad |= bad[l] != 0;
    /* the rounding slack of the float sums here; where results round to bf16, values two bf16 steps below the best
     * lower bound could still round onto the winner's value */
    const float L = lane_max(lo), slack = 0x1p-20f * (lane_max(top) + lane_max(bound)) + 0x1p-100f;
    return any_bad ? -INFINITY : L - slack - (round_bf16 ? fabsf(L) * 0x1p-6f : 0);
}

/* the tokens of the tile of activation rows m0.. (rows of them) from their int8 results approx: the exact values of
 * every group holding a candidate of any of them, computed once for the tile as the exact path computes it */
static void exact_argmax_tile(int type, const uint8_t *packed, int64_t row_bytes, int64_t N, int64_t K,
                              const float *x, int64_t ldx, const float *xsum, const uint16_t *xb, int64_t ldxb,
                              uint8_t *pairs, int64_t m0, int rows, const float *approx, const float *norms,
                              int round_bf16, int64_t *tokens) {
    float E[TILE], threshold[TILE], best[TILE], tile[TILE * PACK_ROWS], highs[TILE][(N + SCAN - 1) / SCAN];
    int64_t made_at = -1;   /* (xb: the first group of the pair last made into pairs) */
    for (int r = 0; r < rows; r++) {
        E[r] = error_scale(x + (m0 + r) * ldx, K, int8_zero(type));
        threshold[r] = candidate_threshold(approx + (m0 + r) * N, norms, N, E[r], round_bf16, highs[r]);
        tokens[m0 + r] = -1, best[r] = 0;
    }
    for (int64_t c = 0; c < N; c += SCAN) {
        const int64_t end = c + SCAN < N ? c + SCAN : N;
        int hit = 0;
        for (int r = 0; r < rows && !hit; r++)
            hit = threshold[r] == -INFINITY || highs[r][c / SCAN] >= threshold[r];
        for (int64_t g = c / PACK_ROWS; hit && g < end / PACK_ROWS; g++) {
            int wanted = 0;
            for (int r = 0; r < rows; r++)
                for (int64_t j = g * PACK_ROWS; j < (g + 1) * PACK_ROWS; j++)
                    wanted |= threshold[r] == -INFINITY || approx[(m0 + r) * N + j] + norms[j] * E[r] >= threshold[r];
            if (!wanted)
                continue;
            /* every value of the group: the values that are not candidates cannot win, exact or not */
            if (xb)
                pairs_group(packed, row_bytes, K, g, xb + m0 * ldxb, ldxb, rows, pairs, &made_at, tile);
            else
                fmatmul_group(type, packed + g * PACK_ROWS * row_bytes, K, x + m0 * ldx, ldx,
                              xsum ? xsum + m0 * (K / 32) : NULL, rows, tile, PACK_ROWS);
            for (int r = 0; r < rows; r++)
                for (int64_t j = g * PACK_ROWS; j < (g + 1) * PACK_ROWS; j++)
                    take(tile[r * PACK_ROWS + j % PACK_ROWS], j, round_bf16, &best[r], &tokens[m0 + r]);
        }
    }
}

/* tokens[m] = the first largest of y[m] = W x[m] as ggml_matmul's exact path computes it (rounded to bf16 first
 * where round_bf16), a NaN counting as largest, for m < M; x_flags: MATMUL_X_BF16 for bf16 rows, with
 * MATMUL_BF16_PAIRS where that path's call takes W's pairs; norms [N]: upper bounds of W's row norms; scratch
 * [M, N] fp32. Where the int8 path does not run (no packed weights, a format or shape without it), the exact
 * path's results themselves. Returns as ggml_matmul. */
int ggml_argmax(int type, const uint8_t *w, const uint8_t *packed, int64_t row_bytes, int64_t N, int64_t K,
                const void *x, int64_t ldx, int64_t M, int x_flags, const float *norms, int round_bf16, float *scratch,
                int threads, int64_t *tokens) {
    const int bounded = packed && packable(type) && int8_zero(type) >= 0 && N % PACK_ROWS == 0
                        && K % ggml_block_size(type) == 0;
    const int x_bf16 = !!(x_flags & MATMUL_X_BF16);
    /* the exact path's values for bf16 rows past TILE where it takes W's pairs (as ggml_matmul decides) */
    const int on_pairs = bounded && x_flags & MATMUL_BF16_PAIRS && x_bf16 && M > TILE && ggml_bf16_pairs(type, N, K);
    const int flags = (bounded ? MATMUL_INT8 : x_flags & MATMUL_BF16_PAIRS) | (x_bf16 ? MATMUL_X_BF16 : 0);
    int failed = ggml_matmul(type, w, packed, row_bytes, N, K, x, ldx, M, scratch, N, NULL, threads, flags);
    if (failed)
        return failed;
    if (!bounded) {
        for (int64_t m = 0; m < M; m++)
            tokens[m] = row_argmax(scratch + m * N, N, round_bf16);
        return 0;
    }
    const int64_t pair_bytes = 2 * K / 32 * PAIR_BLOCK_BYTES;
    uint8_t *pairs = on_pairs ? aligned_alloc(64, threads * pair_bytes) : NULL;
    if (on_pairs && !pairs)
        return 1;
    /* the exact path's fp32 rows and (Q4_1) block sums */
    float *xf = x_bf16 ? malloc(sizeof(float) * M * K) : NULL;
    for (int64_t m = 0; m < M && xf; m++)
        widen(x, m * ldx, K, xf + m * K);
    const float *xs = x_bf16 ? xf : x;
    const int64_t lds = x_bf16 ? K : ldx;
    float *xsum = takes_sums(type) && (xf || !x_bf16) ? block_sums(xs, lds, M, K) : NULL;
    if ((x_bf16 && !xf) || (takes_sums(type) && !xsum)) {
        free(xf), free(xsum), free(pairs);
        return 1;
    }
    const uint16_t *xb = on_pairs ? x : NULL;
    if (M <= TILE)   /* one tile (a batch-1 step): no fork for a second thread that would wait */
        exact_argmax_tile(type, packed, row_bytes, N, K, xs, lds, xsum, xb, ldx, pairs, 0, (int)M, scratch, norms,
                          round_bf16, tokens);
    else {
#pragma omp parallel for num_threads(threads) schedule(dynamic, 1)
        for (int64_t m0 = 0; m0 < M; m0 += TILE)
            exact_argmax_tile(type, packed, row_bytes, N, K, xs, lds, xsum, xb, ldx,
                              pairs ? pairs + omp_get_thread_num() * pair_bytes : NULL, m0,
                              M - m0 < TILE ? M - m0 : TILE, scratch, norms, round_bf16, tokens);
    }
    free(xf), free(xsum), free(pairs);
    return 0;
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
                for (int64_t k = 0; k < K; k++)
                    dst[k] = f2bf(buf[k]);
            }
            free(buf);
        }
    }
    return failed;
}

/* W [N, K] rows of GGML blocks into dst (N * row_bytes bytes) in the packed layout of qmatmul_group: the rows
 * per group, or 0 (nothing written) where this build or type has no packed path */
int ggml_pack(int type, const uint8_t *w, int64_t row_bytes, int64_t N, int64_t K, uint8_t *dst, int threads) {
    int bytes;
    const int qk = block_shape(type, &bytes);
    if (!packable(type) || !qk || K % qk || N < PACK_ROWS
        || (N % PACK_ROWS && (K % (32 * GB) || !row_major_int8(type))))   /* rows left over run row-major: */
        return 0;                                   /* whole groups of K, and a kernel (the K-quants have none) */
    /* (IQ4_XS: d and the 16-bit high scale bits; its scales' low nibbles the first column) */
    const int head = with_min(type) || type == Q4_K || type == Q5_K || type == Q2_K || type == IQ4_XS ? 4 : 2;
    const int R = PACK_ROWS;
    /* where a block's scale(s) and its columns start: Q6_K keeps d last, its 16 scales after its 192 value bytes;
     * Q3_K d last, its 12 scale bytes after its 96 value bytes; Q2_K d and dmin last */
    const int six = type == Q6_K, three = type == Q3_K, head_at = six ? 208 : three ? 108 : type == Q2_K ? 80 : 0;
    const int values_at = six || three || type == Q2_K ? 0 : head, scale_columns = six ? 4 : three ? 3 : 0;
    const int scales_at = six ? 192 : 96;
    int64_t groups = N / R;
    /* threads: the pages both sides fault in at load (the file's and the fresh copy's) more than the copying */
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t g = 0; g < groups; g++)
        for (int64_t b = 0; b < K / qk; b++) {
            uint8_t *out = dst + g * R * row_bytes + b * R * bytes;
            for (int r = 0; r < R; r++) {
                const uint8_t *blk = w + (g * R + r) * row_bytes + b * bytes;
                for (int h = 0; h < head; h += 2)
                    memcpy(out + h * R + 2 * r, blk + head_at + h, 2);
                for (int c = 0; c < (bytes - head) / 4; c++)
                    memcpy(out + head * R + c * 4 * R + 4 * r,
                           blk + (c < scale_columns ? scales_at + 4 * c : values_at + 4 * (c - scale_columns)), 4);
            }
        }
    memcpy(dst + groups * R * row_bytes, w + groups * R * row_bytes, (N - groups * R) * row_bytes);
    return PACK_ROWS;
}
