/* 16- and 8-lane float vectors in GCC's vector extensions, shared by the kernels that include this (the build
 * hashes included files with the source): 16 lanes are one register on AVX-512, elsewhere GCC splits them; vn
 * (at the end) is the width the target holds in one register. */
#ifndef LANNER_VEC16_H
#define LANNER_VEC16_H
#include <stdint.h>
#include <string.h>
#if defined(__AVX__)
#include <immintrin.h>
#endif
#ifndef INLINE
#define INLINE static inline __attribute__((always_inline))
#endif
/* SHUFFLE: lanes of a and b (indices past a's lanes pick b's), into a vector of their type; `mask` names
 * the integer vector type of the indices. CONCAT: a v16 from two v8. GCC has __builtin_shufflevector
 * only from version 12; older ones get __builtin_shuffle and a trip through memory. */
#if defined(__clang__) || __GNUC__ >= 12
#define SHUFFLE(a, b, mask, ...) __builtin_shufflevector(a, b, __VA_ARGS__)
#define CONCAT(lo, hi) __builtin_shufflevector(lo, hi, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15)
#else
#define SHUFFLE(a, b, mask, ...) __builtin_shuffle(a, b, (mask){__VA_ARGS__})
#define CONCAT(lo, hi) concat(lo, hi)
#endif

typedef float v16 __attribute__((vector_size(64)));
typedef int32_t v16i __attribute__((vector_size(64)));
typedef uint16_t v8h __attribute__((vector_size(16)));
typedef _Float16 v8f16 __attribute__((vector_size(16)));
typedef float v8 __attribute__((vector_size(32)));
typedef int32_t v8i __attribute__((vector_size(32)));

/* Element types of the arrays the loads below take (their `kind`; the stores take fp32 and bf16): activations are
 * fp32 or bf16 (a flag that is 0 or 1 is a kind), a KV cache is also fp16 (kv_cache_dtype="float16"). fp16 widens in
 * one instruction with F16C (every x86 kind this runs on has it), in library code without. */
enum { ELEM_F32 = 0, ELEM_BF16 = 1, ELEM_F16 = 2 };

/* Lanes of a where mask is set, else of b. */
INLINE v16 select16(v16i mask, v16 a, v16 b) {
    return (v16)(((v16i)a & mask) | ((v16i)b & ~mask));
}

/* All ones in the lanes whose sign bit is set (-0 and -inf too), else 0: a shift, where a float comparison of
 * 16 lanes on AVX2 (two registers) makes GCC compare lane by lane in scalar code. */
INLINE v16i negative16(v16 x) {
    return (v16i)x >> 31;
}

/* All ones in the NaN lanes (their magnitude bits above infinity's), by the same sign trick */
INLINE v16i nan16(v16 x) {
    return (0x7f800000 - ((v16i)x & 0x7fffffff)) >> 31;
}

/* The larger of a and b lane by lane, b where either is NaN: a NaN a never wins (as with a > b), and -inf against
 * -inf gives -inf. x86's max instructions do exactly this (b for a NaN, and for equal values); the sign-trick
 * select they replace cost prompt attention 1.2x its time (bitwise the same results). */
INLINE v16 max16v(v16 a, v16 b) {
#if defined(__AVX512F__)
    return (v16)_mm512_max_ps((__m512)a, (__m512)b);
#elif defined(__AVX__)
    __m256 a2[2], b2[2];
    memcpy(a2, &a, sizeof a), memcpy(b2, &b, sizeof b);
    a2[0] = _mm256_max_ps(a2[0], b2[0]), a2[1] = _mm256_max_ps(a2[1], b2[1]);
    memcpy(&a, a2, sizeof a);
    return a;
#else
    v16 d = a - b;
    return select16(negative16(d) | nan16(d), b, a);
#endif
}

/* exp(x) for 16 lanes of x <= 0, in vector arithmetic (GCC's vector extensions, so it stays vectorized):
 * 2^t = 2^round(t) * 2^frac with a degree-7 polynomial for 2^frac, frac in (-0.5, 0.5] (truncation error
 * ~6e-9, so float rounding dominates). Lanes below -87 (and -inf) give exactly 0, NaN lanes NaN. AVX-512 rounds
 * with one instruction and puts the power of two on with VSCALEFPS (bitwise the same values, 1.07x prompt
 * attention). */
#if defined(__AVX512F__)
INLINE v16 exp16_nonpositive(v16 x) {
    const __m512 xs = (__m512)x;
    /* max gives its second operand for a NaN lane: NaN stays NaN, -inf becomes -127 */
    const __m512 t = _mm512_max_ps(_mm512_set1_ps(-127.0f), _mm512_mul_ps(xs, _mm512_set1_ps(1.44269504088896341f)));
    const __m512 whole = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const v16 f = (v16)_mm512_sub_ps(t, whole) * 0.69314718055994531f;
    const v16 poly = 1.0f + f * (1.0f + f * (0.5f + f * (1.6666667e-1f + f * (4.1666668e-2f
                     + f * (8.3333338e-3f + f * (1.3888889e-3f + f * 1.9841270e-4f))))));
    const __mmask16 kept = _mm512_cmp_ps_mask(xs, _mm512_set1_ps(-87.0f), _CMP_NLT_UQ);   /* and NaN lanes */
    return (v16)_mm512_maskz_scalef_ps(kept, (__m512)poly, whole);
}
#else
/* One body for both widths (the select, sign and NaN masks of select16, negative16 and nan16 written out) */
#define EXP_NONPOSITIVE(name, vf, vi)                                                                          \
    INLINE vf name(vf x) {                                                                                     \
        vf t = x * 1.44269504088896341f;                                                                       \
        const vi low = (vi)(t + 126.0f) >> 31;                                                                 \
        t = (vf)((low & (vi)((vf){0} - 126.0f)) | (~low & (vi)t));                                             \
        vi whole = __builtin_convertvector(t - 0.5f, vi);          /* truncates toward 0: t rounded */         \
        vf f = (t - __builtin_convertvector(whole, vf)) * 0.69314718055994531f;                                \
        vf poly = 1.0f + f * (1.0f + f * (0.5f + f * (1.6666667e-1f + f * (4.1666668e-2f                       \
                  + f * (8.3333338e-3f + f * (1.3888889e-3f + f * 1.9841270e-4f))))));                        \
        vi bits = ((whole + 127) << 23) & ~((vi)(x + 87.0f) >> 31);                                            \
        vi nan = (0x7f800000 - ((vi)x & 0x7fffffff)) >> 31;   /* NaN in, NaN out */                            \
        return (vf)(((vi)x & nan) | ((vi)(poly * (vf)bits) & ~nan));                                           \
    }
EXP_NONPOSITIVE(exp16_nonpositive, v16, v16i)
/* The same for 8 lanes, one AVX2 register: loops over 16-lane values spilled a register pair to the stack per
 * step of the polynomial (silu_mul 1.6x slower than PyTorch's silu and mul) */
EXP_NONPOSITIVE(exp8_nonpositive, v8, v8i)
#endif

/* Elements [at, at + 8) of a cache of element type `kind` as fp32 (bf16 and fp16 widen exactly; bf16's bits are
 * fp32's top half). */
INLINE v8 load8(const void *cache, int64_t at, const int kind) {
    v8 x;
    if (kind == ELEM_F16) {
#if defined(__F16C__)   /* one VCVTPH2PS: GCC 12 converts _Float16 vectors lane by lane */
        x = (v8)_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)((const uint16_t *)cache + at)));
#else
        v8f16 half;
        memcpy(&half, (const _Float16 *)cache + at, sizeof half);
        x = __builtin_convertvector(half, v8);
#endif
    } else if (kind) {
        v8h half;
        memcpy(&half, (const uint16_t *)cache + at, sizeof half);
        x = (v8)(__builtin_convertvector(half, v8i) << 16);
    } else {
        memcpy(&x, (const float *)cache + at, sizeof x);
    }
    return x;
}

INLINE v16 concat(v8 lo, v8 hi) {
    float lanes[16];
    memcpy(lanes, &lo, sizeof lo);
    memcpy(lanes + 8, &hi, sizeof hi);
    v16 x;
    memcpy(&x, lanes, sizeof x);
    return x;
}

/* The same for 16 elements. */
INLINE v16 load16(const void *cache, int64_t at, const int kind) {
    if (kind == ELEM_F16) {
#if defined(__AVX512F__)
        return (v16)_mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)((const uint16_t *)cache + at)));
#else
        return CONCAT(load8(cache, at, ELEM_F16), load8(cache, at + 8, ELEM_F16));
#endif
    }
    if (!kind) {
        v16 x;
        memcpy(&x, (const float *)cache + at, sizeof x);
        return x;
    }
#if defined(__AVX512F__)   /* one widening load, where GCC splits the generic conversion into halves */
    return (v16)_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const void *)((const uint16_t *)cache + at))), 16);
#else
    return CONCAT(load8(cache, at, 1), load8(cache, at + 8, 1));
#endif
}

typedef uint32_t v16u __attribute__((vector_size(64)));

/* x rounded to bf16 (nearest even) and back, where bf16; x itself elsewhere */
INLINE v16 round16(v16 x, const int bf16) {
    v16u u = (v16u)x;
    return bf16 ? (v16)((u + 0x7FFF + ((u >> 16) & 1)) & 0xFFFF0000u) : x;
}

typedef uint32_t v8u __attribute__((vector_size(32)));

/* round16 and store16 for 8 lanes (AVX2: 16-lane values went through the stack lane by lane) */
INLINE v8 round8(v8 x, const int bf16) {
    v8u u = (v8u)x;
    return bf16 ? (v8)((u + 0x7FFF + ((u >> 16) & 1)) & 0xFFFF0000u) : x;
}

INLINE void store8(void *dst, int64_t at, v8 x, const int bf16) {
    if (!bf16) {
        memcpy((float *)dst + at, &x, sizeof x);
        return;
    }
    v8h h = __builtin_convertvector((v8u)round8(x, 1) >> 16, v8h);
    memcpy((uint16_t *)dst + at, &h, sizeof h);
}

/* 16 floats stored at dst[at..at+16) as fp32, or as bf16 rounded to nearest even */
INLINE void store16(void *dst, int64_t at, v16 x, const int bf16) {
    typedef uint16_t v16h __attribute__((vector_size(32)));
    if (!bf16) {
        memcpy((float *)dst + at, &x, sizeof x);
        return;
    }
    v16h h = __builtin_convertvector((v16u)round16(x, 1) >> 16, v16h);
    memcpy((uint16_t *)dst + at, &h, sizeof h);
}

/* The larger of a and b lane by lane for 8 lanes, as max16v (b where either is NaN or they are equal) */
INLINE v8 max8v(v8 a, v8 b) {
#if defined(__AVX__)
    return (v8)_mm256_max_ps((__m256)a, (__m256)b);
#else
    const v8i d = (v8i)(a - b);
    const v8i b_wins = (d >> 31) | ((0x7f800000 - (d & 0x7fffffff)) >> 31);
    return (v8)(((v8i)b & b_wins) | ((v8i)a & ~b_wins));
#endif
}

/* The widest vector the target holds in one register (vn, NATIVE lanes), for loops whose values must stay in
 * registers: 16-lane values on AVX2 went through the stack, half by half or lane by lane (attention's scores and
 * softmax, rotary, silu). */
#define NATIVE_WIDTH(n)                                                                                         \
    typedef v##n vn;                                                                                            \
    typedef v##n##i vni;                                                                                        \
    INLINE vn load_native(const void *src, int64_t at, const int kind) { return load##n(src, at, kind); }      \
    INLINE void store_native(void *dst, int64_t at, vn x, const int bf16) { store##n(dst, at, x, bf16); }      \
    INLINE vn round_native(vn x, const int bf16) { return round##n(x, bf16); }                                  \
    INLINE vn exp_native(vn x) { return exp##n##_nonpositive(x); }                                              \
    INLINE vn max_native(vn a, vn b) { return max##n##v(a, b); }
#if defined(__AVX512F__)
#define NATIVE 16
NATIVE_WIDTH(16)
#else
#define NATIVE 8
NATIVE_WIDTH(8)
#endif

INLINE vn select_native(vni mask, vn a, vn b) {
    return (vn)(((vni)a & mask) | ((vni)b & ~mask));
}

/* silu(g) = g * sigmoid(g), from e = exp(-|g|) <= 1 (no overflow): sigmoid is 1 / (1 + e) for g >= 0 and
 * e / (1 + e) below */
INLINE vn silu_native(vn g) {
    vn e = exp_native((vn)((vni)g | ((vni){0} + INT32_MIN)));
    vn sigmoid = 1 / (1 + e);
    return g * select_native((vni)g >> 31, e * sigmoid, sigmoid);
}

/* silu(g) * u as the separate ops round it: silu(g) rounded to the activations' dtype before the product. fused.c's
 * silu_mul and ggml.c's gate_up call with MATMUL_SILU_MUL both take it, so their results are the same bits. */
INLINE vn silu_times(vn g, vn u, const int bf16) {
    return round_native(silu_native(g), bf16) * u;
}

/* Rows from which a per-row step splits its rows over the threads (OpenMP's, which PyTorch's thread count sets):
 * below, the fork costs more than it saves. A batch's decode step of 64 rows spent more time in its serial norms,
 * conversions and rotary than in its GEMMs. Each row is computed as alone, so results do not depend on the split. */
#define PAR_ROWS 8

/* body for rows t = 0 .. T-1, split over `threads` threads from PAR_ROWS rows. Fewer run on the calling thread
 * without entering OpenMP at all: a region whose if clause is false still builds and frees a team of one, 0.8 us
 * a call on Zen 3, and a batch-1 decode step made six such calls a layer. */
#define FOR_ROWS(T, threads, ...)                                                                                \
    do {                                                                                                        \
        const int64_t rows_ = (T);                                                                              \
        const int threads_ = (threads);                                                                         \
        if (rows_ >= PAR_ROWS) {                                                                                \
            _Pragma("omp parallel for schedule(static) num_threads(threads_)")                                 \
            for (int64_t t = 0; t < rows_; t++) { __VA_ARGS__; }                                                \
        } else {                                                                                                \
            for (int64_t t = 0; t < rows_; t++) { __VA_ARGS__; }                                                \
        }                                                                                                       \
    } while (0)

/* The first and the last 8 lanes of a native vector (the same 8 where it holds 8). */
INLINE v8 low8(vn x) {
    v8 y;
    memcpy(&y, &x, sizeof y);
    return y;
}

INLINE v8 high8(vn x) {
    v8 y;
    memcpy(&y, (const char *)&x + sizeof x - sizeof y, sizeof y);
    return y;
}

/* The total of the lanes, by halving (the 16 lanes of AVX-512 folded to 8 first): log2(NATIVE) steps. */
INLINE float sum_lanes(vn x) {
    v8 y = NATIVE == 16 ? low8(x) + high8(x) : low8(x);
    y += SHUFFLE(y, y, v8i, 4, 5, 6, 7, 0, 1, 2, 3);
    y += SHUFFLE(y, y, v8i, 2, 3, 0, 1, 6, 7, 4, 5);
    return y[0] + y[1];
}

/* Lane c: the sum of the lanes of a[c], for 8 vectors: a transpose-and-add tree, 21 in-lane shuffles and adds for
 * the 8 sums instead of 8 separate horizontal reductions. */
INLINE v8 sum_each8(const v8 *a) {
    v8 b[4], c[2];
    for (int i = 0; i < 4; i++)   /* lanes: [a0 01, a0 23, a1 01, a1 23 | a0 45, a0 67, a1 45, a1 67] */
        b[i] = SHUFFLE(a[2 * i], a[2 * i + 1], v8i, 0, 2, 8, 10, 4, 6, 12, 14)
               + SHUFFLE(a[2 * i], a[2 * i + 1], v8i, 1, 3, 9, 11, 5, 7, 13, 15);
    for (int i = 0; i < 2; i++)   /* [a0 0-3, a1 0-3, a2 0-3, a3 0-3 | the same of lanes 4-7] */
        c[i] = SHUFFLE(b[2 * i], b[2 * i + 1], v8i, 0, 2, 8, 10, 4, 6, 12, 14)
               + SHUFFLE(b[2 * i], b[2 * i + 1], v8i, 1, 3, 9, 11, 5, 7, 13, 15);
    return SHUFFLE(c[0], c[1], v8i, 0, 1, 2, 3, 8, 9, 10, 11) + SHUFFLE(c[0], c[1], v8i, 4, 5, 6, 7, 12, 13, 14, 15);
}
#endif
