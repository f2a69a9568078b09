/* Paged attention for sequences with up to a few hundred new tokens (decode, speculative verify, short
 * prompt chunks), compiled at first use.
 *
 * One work item is (sequence, piece of its context): it walks that piece's keys through the block table CHUNK (a
 * prompt's: WIDE_CHUNK) at a time with FlashAttention's online softmax for every query row of the sequence (its
 * new tokens times the query heads). A chunk's rows (all KV heads, contiguous in a block) of an fp32 cache are
 * first read through in address order; then, KV head by KV head, the rows that read that head (GQA group times
 * new tokens) go ROWS at a time, each row also prefetching a few lines of the next chunk: 16 scores per
 * shuffle-tree reduction, one online-softmax step per row, and P @ V with the rows' accumulators in registers,
 * so each K and V row is fetched once for all of them (a bf16 prompt on a CPU with AVX512-BF16: 16 rows at a time
 * through all the chunks they see, attend_groups, on AMX tiles where it has them). Pieces run in parallel and are
 * merged by their log-sum-exp, so one long sequence still keeps every core busy (Flash-Decoding).
 *
 * Layouts: q [T, Hq, D] fp32, or NULL where the scores take the bf16 query alone (query_in_bf16), and q_bf16 the
 * same in bf16 with a bf16 cache (else NULL); caches [num_blocks, block_size, Hkv, D] of element type kv_type (fp32,
 * bf16 or fp16: vec16.h's ELEM_*; the 2-byte ones widened to fp32 as they are read); out [T, Hq, D]
 * fp32 or bf16 (out_bf16); lse [T, Hq] fp32 or NULL; tree_mask, when given, [T, tree_width] bytes: draft row ->
 * visible draft rows.
 * Row r of a sequence is query token r / Hq, query head r % Hq; it reads KV head (r % Hq) / group.
 * With a sliding window (window > 0) the query at position t sees keys (t - window, t] only, and a
 * sequence's splits start at its first row's window: keys before it are never read. With softcap > 0 the
 * scaled scores are soft-capped, softcap * tanh(s / softcap), before masking (Gemma 2).
 */
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "../amx.h"
#include "../vec16.h"

#define CHUNK 32        /* keys per online-softmax step */
#define WIDE_CHUNK 64   /* the same for items of many rows a KV head (prompts): each row's softmax bookkeeping
                         * (reductions, rescaling its accumulator) comes half as often; 1.19x on 8 prompts of
                         * 256 tokens, where decode batches of 3 rows a head ran 6-10 % slower */
#define WIDE_ROWS 8     /* rows a KV head from which an item takes WIDE_CHUNK */
#define AHEAD 1     /* chunks between the one being prefetched and the one being read */
#define ROWS 4     /* query rows of one KV head done together: each K/V row is fetched once for all of them */
#define MAX_HEAD_DIM 256   /* head sizes the kernel takes (attention.native.MAX_HEAD_DIM): whole 16-lane vectors */
#if defined(__AVX512BF16__) && defined(__AVX512VL__)
#define HAVE_DPBF16 1
#else
#define HAVE_DPBF16 0
#endif

typedef struct {
    const float *q;           /* fp32 q, or NULL where the scores take q_bf16 only (query_in_bf16) */
    const uint16_t *q_bf16;   /* q as bf16 (bf16 models), or NULL */
    const void *k_cache, *v_cache;
    int kv_type;
    const int32_t *block_tables, *seq_lens, *cu_seqlens_q;
    int table_width;
    const uint8_t *tree_mask;
    int tree_width, num_heads, num_kv_heads, head_dim, block_size;
    float scale;
    int window;     /* 0: none */
    float softcap;  /* 0: none */
} Problem;

#if NATIVE == 8
/* Lane c of out (16 lanes: two v8) is the sum of the lanes of a[c]: sum_each8's tree for each half. */
INLINE void sum_each(const v8 *a, v8 *out) {
    out[0] = sum_each8(a), out[1] = sum_each8(a + 8);
}
#endif

#if defined(__AVX512F__)
/* Lane c of the result: the sum (take_max: the largest) of the 16 lanes of a[c]. A transpose-and-fold tree: pairs
 * of vectors interleave within 128-bit lanes (two rounds), then whole 128-bit lanes move (two more); 45 operations
 * for the 16 results. */
INLINE vn fold_each16(const __m512 *a, const int take_max) {
#define FOLD(x, y) (take_max ? _mm512_max_ps(x, y) : _mm512_add_ps(x, y))
    __m512 b[8], c[4], d[2];
    for (int i = 0; i < 8; i++)   /* per 128-bit lane: a[2i] and a[2i + 1], two partial results each */
        b[i] = FOLD(_mm512_unpacklo_ps(a[2 * i], a[2 * i + 1]), _mm512_unpackhi_ps(a[2 * i], a[2 * i + 1]));
    for (int i = 0; i < 4; i++)   /* per 128-bit lane: a[4i] .. a[4i + 3], one partial result each */
        c[i] = FOLD(_mm512_shuffle_ps(b[2 * i], b[2 * i + 1], 0x44),
                    _mm512_shuffle_ps(b[2 * i], b[2 * i + 1], 0xee));
    for (int i = 0; i < 2; i++)   /* 128-bit lanes: a[8i..8i+3] twice, a[8i+4..8i+7] twice */
        d[i] = FOLD(_mm512_shuffle_f32x4(c[2 * i], c[2 * i + 1], 0x88),
                    _mm512_shuffle_f32x4(c[2 * i], c[2 * i + 1], 0xdd));
    return (vn)FOLD(_mm512_shuffle_f32x4(d[0], d[1], 0x88), _mm512_shuffle_f32x4(d[0], d[1], 0xdd));
#undef FOLD
}

INLINE vn sum_each16(const __m512 *a) { return fold_each16(a, 0); }
#endif

/* Largest of the lanes, by halving as sum_lanes does. */
INLINE float max_lanes(vn x) {
    v8 y = NATIVE == 16 ? max8v(low8(x), high8(x)) : low8(x);
    y = max8v(y, SHUFFLE(y, y, v8i, 4, 5, 6, 7, 0, 1, 2, 3));
    y = max8v(y, SHUFFLE(y, y, v8i, 2, 3, 0, 1, 6, 7, 4, 5));
    return y[0] > y[1] ? y[0] : y[1];
}

/* cap * tanh(x / cap): tanh|y| = (1 - e) / (1 + e) with e = exp(-2|y|) <= 1, the sign put back. Absolute error
 * ~1e-6 of cap (exp16_nonpositive's polynomial). */
INLINE vn softcap_native(vn x, float cap) {
    const vni sign_bit = (vni){0} + INT32_MIN;
    vn y = x / cap;
    vn e = exp_native((vn)((vni)y & ~sign_bit) * -2.0f);
    vn t = (1.0f - e) / (1.0f + e) * cap;
    return (vn)((vni)t | ((vni)y & sign_bit));
}

/* Element offsets of the rows (all KV heads) of keys [k0, k0 + n) in the cache: one division per chunk,
 * then block by block. */
INLINE void row_offsets(const Problem *p, const int32_t *table, int k0, int n, int64_t *offs) {
    const int64_t width = (int64_t)p->num_kv_heads * p->head_dim;
    int block = k0 / p->block_size, pos = k0 % p->block_size;
    for (int c = 0; c < n; c++) {
        offs[c] = ((int64_t)table[block] * p->block_size + pos) * width;
        if (++pos == p->block_size) { pos = 0; block++; }
    }
}

/* Blocks are scattered, so the hardware prefetcher cannot guess the next chunk: its rows are asked for a
 * few lines at a time between pieces of the current chunk's work. A burst of them would stall the core
 * on full miss queues while nothing computes. The cursor walks the rows in address order, K and V. */
typedef struct { const int64_t *offs; int keys, row_lines, key, line; } Ahead;

INLINE void prefetch_some(const Problem *p, Ahead *a, int lines, const int kv) {
    const int elem = kv ? 2 : 4;
    while (lines > 0 && a->key < a->keys) {   /* a key's lines at a time: the cursor moves once a key */
        const char *k = (const char *)p->k_cache + a->offs[a->key] * elem;
        const char *v = (const char *)p->v_cache + a->offs[a->key] * elem;
        const int end = a->row_lines - a->line < lines ? a->row_lines : a->line + lines;
        for (int line = a->line; line < end; line++) {
            __builtin_prefetch(k + 64 * line, 0, 1);
            __builtin_prefetch(v + 64 * line, 0, 1);
        }
        lines -= end - a->line;
        if (end == a->row_lines) a->line = 0, a->key++;
        else a->line = end;
    }
}

/* Loads the chunk's K and V rows (all heads) of an fp32 cache in address order. The per-head passes that
 * follow hop between lines of each row; measured, reading the rows through once first made an fp32 cache
 * ~15 % faster, where a bf16 cache (half the bytes: its chunk fits L1) came out 5-10 % slower; an fp16 one skips
 * it too. */
INLINE void touch_rows(const Problem *p, const int64_t *offs, int n) {
    const int floats = p->num_kv_heads * p->head_dim;   /* whole 64-byte vectors: head_dim % 16 == 0 */
    float any = 0;   /* one float of each 64-byte line brings the line in (a 16-lane sum spilled on AVX2) */
    for (int c = 0; c < n; c++)
        for (int f = 0; f < floats; f += 16)
            any += ((const float *)p->k_cache)[offs[c] + f] + ((const float *)p->v_cache)[offs[c] + f];
    volatile float keep = any;   /* so the loads are not optimized away */
    (void)keep;
}

/* Unscaled scores of a query row against 16 of the chunk's keys (rows at offs + head) into out: lane c (of 16, in
 * 16 / NATIVE vectors) for key c.
 * A bf16 model with a bf16 cache on a CPU with AVX512-BF16 multiplies the bf16 query (q_bf16) with the
 * cache's bf16 rows directly (VDPBF16PS: exact products, fp32 sums); otherwise the fp32 query q in fp32. */
INLINE void chunk_scores(const Problem *p, const float *q, const uint16_t *q_bf16, const int64_t *offs, int head,
                         const int D, const int kv, const int direct, vn *out) {
#if NATIVE == 16
    /* 16-lane products (a bf16 query with a bf16 cache: 32 dims a VDPBF16PS), one tree for the 16 sums: 8-lane ones
     * folded by two 8-way trees took a fifth more time over a decode step's attention */
    __m512 dots[16];
    #pragma GCC unroll 16
    for (int c = 0; c < 16; c++) {
        v16 acc = {0};
#if HAVE_DPBF16
        if (direct) {
            const uint16_t *k = (const uint16_t *)p->k_cache + offs[c] + head;
            __m512 sum = _mm512_setzero_ps();
            for (int d = 0; d < D; d += 32)
                sum = _mm512_dpbf16_ps(sum, (__m512bh)_mm512_loadu_si512(q_bf16 + d),
                                       (__m512bh)_mm512_loadu_si512(k + d));
            acc = (v16)sum;
        } else
#endif
            for (int d = 0; d < D; d += 16) {
                v16 qd;
                memcpy(&qd, q + d, sizeof qd);
                acc += qd * load_native(p->k_cache, offs[c] + head + d, kv);
            }
        dots[c] = (__m512)acc;
    }
    out[0] = sum_each16(dots);
#else
    v8 dots[16];
    #pragma GCC unroll 16
    for (int c = 0; c < 16; c++) {
        v8 acc = {0};
        for (int d = 0; d < D; d += 8) {
            v8 qd;
            memcpy(&qd, q + d, sizeof qd);
            acc += qd * load8(p->k_cache, offs[c] + head + d, kv);
        }
        dots[c] = acc;
    }
    sum_each(dots, out);
#endif
    (void)q_bf16, (void)direct;
}

#if defined(__AVX512F__)
/* 16 x 16 32-bit values transposed in registers: r[i] lane j becomes r[j] lane i. Pairs of rows interleave by
 * 32 then 64 bits, which leaves 128-bit lane L of t[4g + k] holding column 4L + k of rows 4g..4g+3; two rounds of
 * 128-bit lane shuffles gather each column's four pieces. */
INLINE void transpose16(__m512i *r) {
    __m512i a[16], t[16];
    for (int i = 0; i < 16; i += 2) {
        a[i] = _mm512_unpacklo_epi32(r[i], r[i + 1]);
        a[i + 1] = _mm512_unpackhi_epi32(r[i], r[i + 1]);
    }
    for (int g = 0; g < 16; g += 4) {
        t[g] = _mm512_unpacklo_epi64(a[g], a[g + 2]);
        t[g + 1] = _mm512_unpackhi_epi64(a[g], a[g + 2]);
        t[g + 2] = _mm512_unpacklo_epi64(a[g + 1], a[g + 3]);
        t[g + 3] = _mm512_unpackhi_epi64(a[g + 1], a[g + 3]);
    }
    for (int k = 0; k < 4; k++) {
        const __m512i even01 = _mm512_shuffle_i32x4(t[k], t[4 + k], 0x88);
        const __m512i odd01 = _mm512_shuffle_i32x4(t[k], t[4 + k], 0xdd);
        const __m512i even23 = _mm512_shuffle_i32x4(t[8 + k], t[12 + k], 0x88);
        const __m512i odd23 = _mm512_shuffle_i32x4(t[8 + k], t[12 + k], 0xdd);
        r[k] = _mm512_shuffle_i32x4(even01, even23, 0x88);
        r[8 + k] = _mm512_shuffle_i32x4(even01, even23, 0xdd);
        r[4 + k] = _mm512_shuffle_i32x4(odd01, odd23, 0x88);
        r[12 + k] = _mm512_shuffle_i32x4(odd01, odd23, 0xdd);
    }
}

/* A wide chunk's keys for one KV head turned for tile_scores: 32-bit unit j of a key row (a bf16 dim pair, or an
 * fp32 dim; `units` of them, elem-byte elements) of key c at kt[j * WIDE_CHUNK + c], 16 keys by 16 units at a time. */
INLINE void turn_keys(const Problem *p, const int64_t *offs, int head, uint32_t *restrict kt, const int units,
                      const int elem) {
    for (int c0 = 0; c0 < WIDE_CHUNK; c0 += 16)
        for (int j0 = 0; j0 < units; j0 += 16) {
            __m512i r[16];
            for (int c = 0; c < 16; c++)
                r[c] = _mm512_loadu_si512((const char *)p->k_cache + (offs[c0 + c] + head) * elem + 4 * j0);
            transpose16(r);
            for (int j = 0; j < 16; j++) _mm512_store_si512(kt + (j0 + j) * WIDE_CHUNK + c0, r[j]);
        }
}

/* fp32 scores of `rows` query rows (at q[i]) against turned keys: one FMA adds a dim to 16 keys' scores. */
INLINE void tile_scores_f32(const float *kt, const float *const *q, v16 (*s)[WIDE_CHUNK / 16], const int rows,
                            const int D) {
    v16 acc[ROWS][WIDE_CHUNK / 16];
    for (int i = 0; i < rows; i++)
        for (int v = 0; v < WIDE_CHUNK / 16; v++) acc[i][v] = (v16){0};
    for (int d = 0; d < D; d++) {
        v16 k[WIDE_CHUNK / 16];
        memcpy(k, kt + d * WIDE_CHUNK, sizeof k);
        for (int i = 0; i < rows; i++) {
            const float qd = q[i][d];
            for (int v = 0; v < WIDE_CHUNK / 16; v++) acc[i][v] += qd * k[v];
        }
    }
    for (int i = 0; i < rows; i++) memcpy(s[i], acc[i], sizeof acc[i]);
}
#endif

#if HAVE_DPBF16
/* Unscaled scores of `rows` query rows (bf16, at q[i]) against a wide chunk's turned keys kt: lane c of s[i][v]
 * for key 16v + c. One VDPBF16PS adds a dim pair's products to 16 keys' scores, so no sum crosses lanes; each
 * register of keys serves every row (prompts: a head's keys turned once serve all its rows). */
INLINE void tile_scores(const uint32_t *kt, const uint16_t *const *q, v16 (*s)[WIDE_CHUNK / 16], const int rows,
                        const int D, const int width) {
    __m512 acc[ROWS][WIDE_CHUNK / 16];
    for (int i = 0; i < rows; i++)
        for (int v = 0; v < width / 16; v++) acc[i][v] = _mm512_setzero_ps();
    for (int j = 0; j < D / 2; j++) {
        __m512bh k[WIDE_CHUNK / 16];
        for (int v = 0; v < width / 16; v++) k[v] = (__m512bh)_mm512_load_si512(kt + j * WIDE_CHUNK + 16 * v);
        for (int i = 0; i < rows; i++) {
            int32_t pair;
            memcpy(&pair, q[i] + 2 * j, sizeof pair);
            const __m512bh qj = (__m512bh)_mm512_set1_epi32(pair);
            for (int v = 0; v < width / 16; v++) acc[i][v] = _mm512_dpbf16_ps(acc[i][v], qj, k[v]);
        }
    }
    for (int i = 0; i < rows; i++)
        for (int v = 0; v < width / 16; v++) s[i][v] = (v16)acc[i][v];
}
#endif

/* A row's scores s (chunk / NATIVE vectors) masked: -inf for lanes outside [start, limit] (the row's window and
 * causality) and for draft keys outside its tree branch. Returns the lanes' maxima. */
INLINE vn mask_scores(vn *s, int start, int limit, const uint8_t *tree, int first_draft, const int chunk) {
    vni lane;
    for (int c = 0; c < NATIVE; c++) lane[c] = c;
    vn best = (vn){0} - INFINITY;
    /* a chunk the row sees whole (every one before its last, without a window or a tree): its max alone */
    const int all_seen = start <= 0 && limit >= chunk - 1 && tree == NULL;
    for (int v = 0; v < chunk / NATIVE; v++) {
        if (all_seen) {
            best = max_native(s[v], best);
            continue;
        }
        vni key = lane + NATIVE * v;   /* start <= key <= limit, by signs (see negative16) */
        s[v] = select_native(~(((key - start) | (limit - key)) >> 31), s[v], (vn){0} - INFINITY);
        if (tree != NULL)   /* draft keys the row's tree branch does not include */
            for (int c = first_draft > NATIVE * v ? first_draft : NATIVE * v; c <= limit && c < NATIVE * (v + 1); c++)
                if (!tree[c - first_draft]) s[v][c - NATIVE * v] = -INFINITY;
        best = max_native(s[v], best);
    }
    return best;
}

/* One row's online-softmax step over a chunk (scores s, masked; best: their lanes' maxima): the keys' weights
 * exp(s - m) into w (0 where masked), the running max m and normalizer l updated; returns the factor the row's
 * accumulator must be scaled by. */
INLINE float softmax_step(vn *s, vn best, float *m, float *l, float *restrict w, const int chunk) {
    float new_max = max_lanes(best);
    new_max = new_max > *m ? new_max : *m;
    if (new_max == -INFINITY) {   /* nothing visible yet */
        memset(w, 0, sizeof(float) * chunk);
        return 1.0f;
    }
    vn total = {0}, prev = {*m - new_max};
    for (int v = 0; v < chunk / NATIVE; v++) {
        vn e = exp_native(s[v] - new_max);
        memcpy(w + NATIVE * v, &e, sizeof e);
        total += e;
    }
    /* the max rarely moves once a few chunks are in; m = -inf gives 0, and acc, l are 0 anyway */
    float alpha = new_max == *m ? 1.0f : exp_native(prev)[0];
    *l = *l * alpha + sum_lanes(total);
    *m = new_max;
    return alpha;
}

/* The scores s of the row of query token t (the sequence's new tokens from q0, after ctx_len cached ones) over the
 * chunk of keys from c0 in a split ending at k1: scaled (and soft-capped), then masked by causality and the split's
 * end, its window and its tree branch (mask_scores). */
INLINE vn row_scores(const Problem *p, vn *s, int t, int q0, int ctx_len, int c0, int k1, const int chunk) {
    for (int v = 0; v < chunk / NATIVE; v++) {
        s[v] *= p->scale;
        if (p->softcap > 0.0f) s[v] = softcap_native(s[v], p->softcap);
    }
    const int last = ctx_len + t < k1 - 1 ? ctx_len + t : k1 - 1;   /* causal, and the split */
    const int window_start = p->window > 0 ? ctx_len + t - p->window + 1 : c0;
    const uint8_t *tree = p->tree_mask ? p->tree_mask + (int64_t)(q0 + t) * p->tree_width : NULL;
    return mask_scores(s, window_start - c0, last - c0, tree, ctx_len - c0, chunk);
}

/* softmax_step for the row of query token t (row_scores) */
INLINE float row_step(const Problem *p, vn *s, int t, int q0, int ctx_len, int c0, int k1, float *m, float *l,
                      float *restrict w, const int chunk) {
    return softmax_step(s, row_scores(p, s, t, q0, ctx_len, c0, k1, chunk), m, l, w, chunk);
}

/* acc[i] = acc[i] * alpha[i] + sum_c w[i][c] v[c] for `rows` accumulators, V rows at offs + head: each
 * register's worth of a V row is loaded (and widened) once for all of them, `slices` registers' worth of every
 * accumulator at a time so that they stay in registers (16-lane vectors on AVX2 went through the stack: 4x
 * slower). Several slices, because with one each key's FMAs waited on the previous key's (latency-bound);
 * each dim still sums its keys in order. SLICES: as many as the registers hold with ROWS rows (16 on AVX2,
 * 32 on AVX-512). */
#define SLICES (NATIVE == 16 ? 4 : 2)
INLINE void accumulate_slices(const Problem *p, const int64_t *offs, int head, int j, float *const *acc,
                              const float *alpha, float (*w)[WIDE_CHUNK], const int rows, const int slices,
                              const int kv, const int chunk) {
    vn a[ROWS][SLICES];
    for (int i = 0; i < rows; i++)
        for (int s = 0; s < slices; s++) {
            vn x;
            memcpy(&x, acc[i] + j + s * NATIVE, sizeof x);
            a[i][s] = x * alpha[i];
        }
    for (int c = 0; c < chunk; c++) {
        vn v[SLICES];
        for (int s = 0; s < slices; s++)
            v[s] = load_native(p->v_cache, offs[c] + head + j + s * NATIVE, kv);
        for (int i = 0; i < rows; i++) {
            const float weight = w[i][c];
            for (int s = 0; s < slices; s++)
                a[i][s] += weight * v[s];
        }
    }
    for (int i = 0; i < rows; i++)
        for (int s = 0; s < slices; s++)
            memcpy(acc[i] + j + s * NATIVE, &a[i][s], sizeof(vn));
}

/* acc[i] = alpha[i] * acc[i] + sum over the chunk's keys c of w[i][c] * V[c] (the head's dims at `head`) */
INLINE void accumulate(const Problem *p, const int64_t *offs, int head, float *const *acc, const float *alpha,
                       float (*w)[WIDE_CHUNK], const int rows, const int D, const int kv, const int chunk) {
    int j = 0;
    for (; j + SLICES * NATIVE <= D; j += SLICES * NATIVE)
        accumulate_slices(p, offs, head, j, acc, alpha, w, rows, SLICES, kv, chunk);
    for (; j < D; j += NATIVE)   /* head sizes that are not a whole number of passes */
        accumulate_slices(p, offs, head, j, acc, alpha, w, rows, 1, kv, chunk);
}

#if HAVE_DPBF16
/* The same in bf16, as torch's bf16 attention does it: weights rounded to bf16, products exact, sums
 * fp32. Keys go in pairs, their V rows interleaved (unpack), so one VDPBF16PS adds two keys' terms for
 * 16 dims. The interleave leaves each 32 dims of acc in pair order -- 8j..8j+3 then 8j+4..8j+7 of each
 * 128-bit lane, in two vectors -- until pair_order_to_dims puts them back. */
INLINE void accumulate_bf16(const Problem *p, const int64_t *offs, int head, float *const *acc, const float *alpha,
                            float (*w)[WIDE_CHUNK], const int rows, const int D, const int chunk) {
    __m512 a[ROWS][16];
    uint32_t pairs[ROWS][WIDE_CHUNK / 2];   /* the bf16 weights of keys 2c and 2c + 1 */
    for (int i = 0; i < rows; i++) {
        for (int c = 0; c < chunk; c += 32)
            _mm512_storeu_si512(pairs[i] + c / 2, (__m512i)_mm512_cvtne2ps_pbh(_mm512_loadu_ps(w[i] + c + 16),
                                                                               _mm512_loadu_ps(w[i] + c)));
        for (int j = 0; j < D / 16; j++) a[i][j] = _mm512_mul_ps(_mm512_loadu_ps(acc[i] + 16 * j), _mm512_set1_ps(alpha[i]));
    }
    const uint16_t *v = p->v_cache;
    for (int c = 0; c < chunk; c += 2)
        for (int j = 0; j < D / 32; j++) {
            __m512i even = _mm512_loadu_si512(v + offs[c] + head + 32 * j), odd = _mm512_loadu_si512(v + offs[c + 1] + head + 32 * j);
            __m512bh lo = (__m512bh)_mm512_unpacklo_epi16(even, odd), hi = (__m512bh)_mm512_unpackhi_epi16(even, odd);
            for (int i = 0; i < rows; i++) {
                __m512bh weight = (__m512bh)_mm512_set1_epi32((int)pairs[i][c / 2]);
                a[i][2 * j] = _mm512_dpbf16_ps(a[i][2 * j], lo, weight);
                a[i][2 * j + 1] = _mm512_dpbf16_ps(a[i][2 * j + 1], hi, weight);
            }
        }
    for (int i = 0; i < rows; i++)
        for (int j = 0; j < D / 16; j++) _mm512_storeu_ps(acc[i] + 16 * j, a[i][j]);
}

/* An accumulator row [D] from accumulate_bf16's pair order back to dims. */
INLINE void pair_order_to_dims(float *row, const int D) {
    const __m512i first = _mm512_setr_epi32(0, 1, 2, 3, 16, 17, 18, 19, 4, 5, 6, 7, 20, 21, 22, 23);
    const __m512i second = _mm512_setr_epi32(8, 9, 10, 11, 24, 25, 26, 27, 12, 13, 14, 15, 28, 29, 30, 31);
    for (int d = 0; d < D; d += 32) {
        __m512 lo = _mm512_loadu_ps(row + d), hi = _mm512_loadu_ps(row + d + 16);
        _mm512_storeu_ps(row + d, _mm512_permutex2var_ps(lo, first, hi));
        _mm512_storeu_ps(row + d + 16, _mm512_permutex2var_ps(lo, second, hi));
    }
}
#endif

/* The accumulate of the variant: rows a constant, so the accumulators get registers. */
INLINE void accumulate_rows(const Problem *p, const int64_t *offs, int head, float *const *acc, const float *alpha,
                            float (*w)[WIDE_CHUNK], const int rows, const int D, const int kv, const int direct,
                            const int chunk) {
#if HAVE_DPBF16
    if (direct) {
        accumulate_bf16(p, offs, head, acc, alpha, w, rows, D, chunk);
        return;
    }
#endif
    accumulate(p, offs, head, acc, alpha, w, rows, D, kv, chunk);
}

/* A run's next work item: keys [k0, k1) of sequence seq (seq < 0: none) */
typedef struct { int seq, k0, k1; } Span;

/* Element offsets of the rows of keys [a, a + chunk) of span s that it has: how many. */
INLINE int chunk_offsets(const Problem *p, Span s, int a, int64_t *offs, const int chunk) {
    const int n = s.seq < 0 || a >= s.k1 ? 0 : s.k1 - a < chunk ? s.k1 - a : chunk;
    if (n > 0) row_offsets(p, p->block_tables + (int64_t)s.seq * p->table_width, a, n, offs);
    return n;
}

#if defined(__AVX512F__)
/* Unscaled scores of `rows` query rows (element offsets q_rows into q) against the turned keys. */
INLINE void turned_scores(const Problem *p, const float *kt, const int64_t *q_rows, v16 (*tile)[WIDE_CHUNK / 16],
                          const int rows, const int D, const int direct) {
#if HAVE_DPBF16
    if (direct) {
        const uint16_t *q[ROWS];
        for (int i = 0; i < rows; i++) q[i] = p->q_bf16 + q_rows[i];
        tile_scores((const uint32_t *)kt, q, tile, rows, D, WIDE_CHUNK);
        return;
    }
#endif
    const float *q[ROWS];
    for (int i = 0; i < rows; i++) q[i] = p->q + q_rows[i];
    tile_scores_f32(kt, q, tile, rows, D);
}
#endif

/* Whether a wide chunk's scores come from turned keys: bf16 scoring with AVX512-BF16 (direct), fp32 on AVX-512.
 * Not on AVX2, where turning keys one value at a time and 8-lane tiles came out at 0.96-1.08x on prompts, nor for
 * a bf16 or fp16 cache widened to fp32. */
INLINE int turns(const int kv, const int direct) {
    return direct ? HAVE_DPBF16 : !kv && NATIVE == 16;
}

/* Row of a sequence's partial results for the i-th row reading a KV head (token i / group, that head's i % group-th
 * query head). */
INLINE int row_of(int i, int head, int group, int Hq) {
    return i / group * Hq + head * group + i % group;
}

#if HAVE_DPBF16 && defined(__AVX512F__)
/* ---- a bf16 prompt in groups of 16 rows -------------------------------------------------------------------------- *
 * A bf16 prompt's piece, KV head by KV head, 16 rows at a time through every wide chunk they see: the scores of the
 * rows' bf16 queries with the turned keys, the 16 rows' online-softmax steps together (group_softmax), then P V of
 * the weights in bf16 with the chunk's V rows interleaved by key pairs (accumulate_bf16's pair order, which
 * pair_order_to_dims undoes at the end). On AMX the products are TDPBF16PS (A tiles: 32 dims, or 32 keys, of 16 rows;
 * B tiles: kt's dim pairs of 16 keys, the V pairs), elsewhere VDPBF16PS, 4 rows at a time. The same products, exact,
 * in fp32 sums of another order. (Without AMX the order of attend_split_d -- chunks outermost, a row's softmax step at
 * a time, the V pairs interleaved again for every 4 rows -- took 1.4x as long on 8 prompts of 256 tokens, Zen 5.) */
#define GROUP_ATTENTION 1
#if defined(__AMX_TILE__) && defined(__AMX_BF16__)
#define AMX_ATTENTION 1
#else
#define AMX_ATTENTION 0
#endif

/* The chunk's V rows of one head as B tiles: for 32 keys (a K step) and 16 of accumulate_bf16's pair-ordered dims,
 * tile row r holds keys 2r and 2r + 1 of each dim; tile (step, group) at vt + (step * D / 16 + group) * 512. */
INLINE void v_tiles(const Problem *p, const int64_t *offs, int head, uint16_t *restrict vt, const int D) {
    const uint16_t *v = p->v_cache;
    for (int c = 0; c < WIDE_CHUNK; c += 2)
        for (int j = 0; j < D / 32; j++) {
            const __m512i even = _mm512_loadu_si512(v + offs[c] + head + 32 * j);
            const __m512i odd = _mm512_loadu_si512(v + offs[c + 1] + head + 32 * j);
            uint16_t *row = vt + ((int64_t)(c / 32) * (D / 16) + 2 * j) * 512 + (c % 32) / 2 * 32;
            _mm512_store_si512(row, _mm512_unpacklo_epi16(even, odd));
            _mm512_store_si512(row + 512, _mm512_unpackhi_epi16(even, odd));
        }
}

/* A group of up to 16 rows (from i0 of those reading `head`): their rows of the partial results (rs) and their bf16
 * queries as an A tile source (qa: 16 rows, zeros past the group); returns how many rows it has. */
INLINE int group_rows(const Problem *p, int i0, int per_head, int head, int group, int q0, int *rs, uint16_t *qa,
                      const int D) {
    const int Hq = p->num_heads, rows = per_head - i0 < 16 ? per_head - i0 : 16;
    for (int i = 0; i < 16; i++) {
        if (i < rows) {
            rs[i] = row_of(i0 + i, head, group, Hq);
            memcpy(qa + i * D, p->q_bf16 + ((int64_t)q0 * Hq + rs[i]) * D, 2 * D);
        } else memset(qa + i * D, 0, 2 * D);
    }
    return rows;
}

#if AMX_ATTENTION
/* A group's scores against the chunk's turned keys: 16 rows x 64 keys (C 0-3) into sc */
INLINE void tile_group_scores(const uint16_t *qa, const uint32_t *kt, float *sc, const int D, const int width) {
    (void)width;   /* (always WIDE_CHUNK here) */
    _tile_zero(0);
    _tile_zero(1);
    _tile_zero(2);
    _tile_zero(3);
    for (int d = 0; d < D; d += 32) {
        _tile_loadd(4, qa + d, 2 * D);
        _tile_loadd(6, kt + d / 2 * WIDE_CHUNK, 4 * WIDE_CHUNK);
        _tile_loadd(7, kt + d / 2 * WIDE_CHUNK + 16, 4 * WIDE_CHUNK);
        _tile_dpbf16ps(0, 4, 6);
        _tile_loadd(6, kt + d / 2 * WIDE_CHUNK + 32, 4 * WIDE_CHUNK);
        _tile_dpbf16ps(1, 4, 7);
        _tile_loadd(7, kt + d / 2 * WIDE_CHUNK + 48, 4 * WIDE_CHUNK);
        _tile_dpbf16ps(2, 4, 6);
        _tile_dpbf16ps(3, 4, 7);
    }
    _tile_stored(0, sc, 4 * WIDE_CHUNK);
    _tile_stored(1, sc + 16, 4 * WIDE_CHUNK);
    _tile_stored(2, sc + 32, 4 * WIDE_CHUNK);
    _tile_stored(3, sc + 48, 4 * WIDE_CHUNK);
}

/* ob (16 rows x D, the accumulators scaled) += pa (the weights in bf16) times the chunk's V tiles */
INLINE void tile_group_pv(const uint16_t *pa, const uint16_t *vt, float *ob, const int D, const int width) {
    (void)width;   /* (always WIDE_CHUNK here) */
    for (int g0 = 0; g0 < D / 16; g0 += 4) {   /* 16 rows x 64 pair-ordered dims at a time in C 0-3 */
        _tile_loadd(0, ob + 16 * g0, 4 * D);
        _tile_loadd(1, ob + 16 * (g0 + 1), 4 * D);
        _tile_loadd(2, ob + 16 * (g0 + 2), 4 * D);
        _tile_loadd(3, ob + 16 * (g0 + 3), 4 * D);
        for (int k = 0; k < WIDE_CHUNK / 32; k++) {
            const uint16_t *b = vt + ((int64_t)k * (D / 16) + g0) * 512;
            _tile_loadd(4, pa + 32 * k, 2 * WIDE_CHUNK);
            _tile_loadd(6, b, 64);
            _tile_loadd(7, b + 512, 64);
            _tile_dpbf16ps(0, 4, 6);
            _tile_loadd(6, b + 1024, 64);
            _tile_dpbf16ps(1, 4, 7);
            _tile_loadd(7, b + 1536, 64);
            _tile_dpbf16ps(2, 4, 6);
            _tile_dpbf16ps(3, 4, 7);
        }
        _tile_stored(0, ob + 16 * g0, 4 * D);
        _tile_stored(1, ob + 16 * (g0 + 1), 4 * D);
        _tile_stored(2, ob + 16 * (g0 + 2), 4 * D);
        _tile_stored(3, ob + 16 * (g0 + 3), 4 * D);
    }
}
#endif

INLINE void dp_group_scores_of(const uint16_t *qa, const uint32_t *kt, float *sc, const int D, const int width) {
    for (int i0 = 0; i0 < 16; i0 += ROWS) {
        const uint16_t *q[ROWS];
        for (int i = 0; i < ROWS; i++) q[i] = qa + (i0 + i) * D;
        tile_scores(kt, q, (v16 (*)[WIDE_CHUNK / 16])(sc + i0 * WIDE_CHUNK), ROWS, D, width);
    }
}

/* tile_group_scores on VDPBF16PS: 4 rows at a time (tile_scores), of the chunk's first width keys (WIDE_CHUNK or
 * half). Not inlined: inside attend_groups GCC reloaded the keys for every row (a load a product: 1.4x slower) */
__attribute__((noinline)) static void dp_group_scores(const uint16_t *qa, const uint32_t *kt, float *sc, const int D,
                                                      const int width) {
    if (width == WIDE_CHUNK)
        dp_group_scores_of(qa, kt, sc, D, WIDE_CHUNK);
    else
        dp_group_scores_of(qa, kt, sc, D, WIDE_CHUNK / 2);
}

INLINE void dp_group_pv_of(const uint16_t *pa, const uint16_t *vt, float *ob, const int D, const int width) {
    for (int g0 = 0; g0 < D / 16; g0 += 4)
        for (int i0 = 0; i0 < 16; i0 += ROWS) {
            __m512 a[ROWS][4];
            for (int i = 0; i < ROWS; i++)
                for (int g = 0; g < 4; g++) a[i][g] = _mm512_load_ps(ob + (i0 + i) * D + 16 * (g0 + g));
            for (int k = 0; k < width / 2; k++) {   /* keys 2k, 2k + 1 */
                const uint16_t *b = vt + ((int64_t)(k / 16) * (D / 16) + g0) * 512 + (k % 16) * 32;
                __m512bh v[4];
                for (int g = 0; g < 4; g++) v[g] = (__m512bh)_mm512_load_si512(b + 512 * g);
                for (int i = 0; i < ROWS; i++) {
                    int32_t pair;
                    memcpy(&pair, pa + (i0 + i) * WIDE_CHUNK + 2 * k, 4);
                    const __m512bh weight = (__m512bh)_mm512_set1_epi32(pair);
                    for (int g = 0; g < 4; g++) a[i][g] = _mm512_dpbf16_ps(a[i][g], v[g], weight);
                }
            }
            for (int i = 0; i < ROWS; i++)
                for (int g = 0; g < 4; g++) _mm512_store_ps(ob + (i0 + i) * D + 16 * (g0 + g), a[i][g]);
        }
}

/* tile_group_pv on VDPBF16PS: 4 rows x 64 dims of accumulators in registers at a time, a key pair's weights
 * broadcast to the V tiles' rows, for the chunk's first width keys (WIDE_CHUNK or half) */
__attribute__((noinline)) static void dp_group_pv(const uint16_t *pa, const uint16_t *vt, float *ob, const int D,
                                                  const int width) {
    if (width == WIDE_CHUNK)
        dp_group_pv_of(pa, vt, ob, D, WIDE_CHUNK);
    else
        dp_group_pv_of(pa, vt, ob, D, WIDE_CHUNK / 2);
}

/* The online-softmax steps of a group's rows at once (scores sc [16, WIDE_CHUNK], rows of them real; their token
 * t = (i0 + i) / group): each row's scores masked as row_step masks them, then the rows' maxima, old and new maxima,
 * normalizers and scale factors (alpha) as vectors of 16 rows -- one tree each instead of a reduction and a branch
 * per row, which took half of a long prompt's attention -- and the weights in bf16 into pa (zeros past the rows). */
INLINE void group_softmax(const Problem *p, float *sc, int rows, const int *rs, int i0, int group, int q0, int ctx_len,
                          int c0, int k1, float *m, float *l, uint16_t *pa, float *alpha, const int width) {
    __m512 best[16], sums[16];
    float old_m[16], old_l[16], new_m[16], new_l[16];
    for (int i = 0; i < 16; i++) {
        best[i] = _mm512_set1_ps(-INFINITY);
        old_m[i] = i < rows ? m[rs[i]] : -INFINITY;
        old_l[i] = i < rows ? l[rs[i]] : 0.0f;
        if (i < rows)
            best[i] = (__m512)row_scores(p, (vn *)(sc + i * WIDE_CHUNK), (i0 + i) / group, q0, ctx_len, c0, k1,
                                         width);
    }
    const __m512 prev = _mm512_loadu_ps(old_m), top = _mm512_max_ps((__m512)fold_each16(best, 1), prev);
    _mm512_storeu_ps(new_m, top);
    for (int i = 0; i < 16; i++) {
        const vn *s = (const vn *)(sc + i * WIDE_CHUNK);
        __m512 total = _mm512_setzero_ps();
        for (int v = 0; v < width / 16; v += 2) {
            __m512 e0 = _mm512_setzero_ps(), e1 = _mm512_setzero_ps();
            if (new_m[i] != -INFINITY) {   /* not a row past the group's, nor one that sees nothing yet */
                e0 = (__m512)exp_native(s[v] - new_m[i]), e1 = (__m512)exp_native(s[v + 1] - new_m[i]);
                total = _mm512_add_ps(_mm512_add_ps(total, e0), e1);
            }
            _mm512_store_si512(pa + i * WIDE_CHUNK + 16 * v, (__m512i)_mm512_cvtne2ps_pbh(e1, e0));
        }
        sums[i] = total;
    }
    /* 1 where the max did not move (rows that see nothing yet included), else exp(old - new) (0 from -inf) */
    const __m512 a = _mm512_mask_blend_ps(_mm512_cmp_ps_mask(prev, top, _CMP_EQ_OQ),
                                          (__m512)exp_native((vn)_mm512_sub_ps(prev, top)), _mm512_set1_ps(1.0f));
    _mm512_storeu_ps(alpha, a);
    _mm512_storeu_ps(new_l, _mm512_fmadd_ps(_mm512_loadu_ps(old_l), a, (__m512)sum_each16(sums)));
    for (int i = 0; i < rows; i++) m[rs[i]] = new_m[i], l[rs[i]] = new_l[i];
}

/* Keys [k0, k1) of sequence seq for all its rows in groups (on the tiles where `tiles`), in FlashAttention's order:
 * a KV head's keys are turned
 * and its V rows made B tiles once (kt, vt: a chunk's after another), then each group of 16 rows goes through the
 * chunks it sees with its accumulators in L1 (ob), written to acc once at the end. Chunks outermost instead (every
 * row's accumulator read and written once a chunk, a 2,048-token prompt's 4.7 MB of them from L3) took 1.75x as long.
 * acc, m, l: as attend_split_d's, set up by it. Returns 1 (nothing done) where kt and vt could not be allocated. */
static int attend_groups(const Problem *p, int seq, int k0, int k1, float *acc, float *m, float *l, const int D,
                         const int tiles) {
    const int Hq = p->num_heads, group = Hq / p->num_kv_heads;
    const int q0 = p->cu_seqlens_q[seq], q_len = p->cu_seqlens_q[seq + 1] - q0;
    const int ctx_len = p->seq_lens[seq] - q_len, per_head = q_len * group;
    const int32_t *table = p->block_tables + (int64_t)seq * p->table_width;
    const int chunks = (k1 - k0 + WIDE_CHUNK - 1) / WIDE_CHUNK;
    const int64_t kt_chunk = (int64_t)D / 2 * WIDE_CHUNK, vt_chunk = (int64_t)(WIDE_CHUNK / 32) * (D / 16) * 512;
    uint32_t *kt = aligned_alloc(64, sizeof(uint32_t) * kt_chunk * chunks);
    uint16_t *vt = aligned_alloc(64, sizeof(uint16_t) * vt_chunk * chunks);
    if (kt == NULL || vt == NULL) {
        free(kt), free(vt);
        return 1;
    }
    uint16_t qa[16 * D] __attribute__((aligned(64))), pa[16 * WIDE_CHUNK] __attribute__((aligned(64)));
    float sc[16 * WIDE_CHUNK] __attribute__((aligned(64))), ob[16 * D] __attribute__((aligned(64)));
    /* rows are token-major: those of tokens before k0 - ctx_len see none of these keys (their accumulators 0, the
     * only ones not written below) */
    const int first_row = k0 - ctx_len > 0 ? (k0 - ctx_len) * group : 0;
    memset(acc, 0, sizeof(float) * first_row / group * Hq * D);
    /* the products on AMX tiles where granted, else VDPBF16PS */
    void (*scores)(const uint16_t *, const uint32_t *, float *, int, int) = dp_group_scores;
    void (*pv)(const uint16_t *, const uint16_t *, float *, int, int) = dp_group_pv;
#if AMX_ATTENTION
    if (tiles)
        scores = tile_group_scores, pv = tile_group_pv, amx_configure();
#endif
    for (int head = 0; head < p->num_kv_heads; head++) {
        for (int c = 0; c < chunks; c++) {   /* block by block: the hardware's prefetchers see these reads */
            const int c0 = k0 + c * WIDE_CHUNK, n = k1 - c0 < WIDE_CHUNK ? k1 - c0 : WIDE_CHUNK;
            int64_t offs[WIDE_CHUNK];
            row_offsets(p, table, c0, n, offs);
            for (int j = n; j < WIDE_CHUNK; j++) offs[j] = offs[0];   /* past the split: real rows, weight 0 */
            turn_keys(p, offs, head * D, kt + c * kt_chunk, D / 2, 2);
            v_tiles(p, offs, head * D, vt + c * vt_chunk, D);
        }
        for (int i0 = first_row; i0 < per_head; i0 += 16) {
            int rs[16];
            const int rows = group_rows(p, i0, per_head, head, group, q0, rs, qa, D);
            /* the keys the group's last row sees (causal: its own key the last), from its first row's window on */
            const int seen = ctx_len + (i0 + rows - 1) / group - k0 + 1, visible = seen < k1 - k0 ? seen : k1 - k0;
            const int start = p->window > 0 ? ctx_len + i0 / group - p->window + 1 - k0 : 0;
            memset(ob, 0, sizeof ob);
            for (int c = start > 0 ? start / WIDE_CHUNK : 0; c * WIDE_CHUNK < visible; c++) {
                float alpha[16];
                /* a chunk of which the group sees no more than the first half (its last, on the causal diagonal)
                 * takes that half alone, where the products go by VDPBF16PS (AMX's tiles take whole chunks) */
                const int width = !tiles && visible - c * WIDE_CHUNK <= WIDE_CHUNK / 2 ? WIDE_CHUNK / 2 : WIDE_CHUNK;
                scores(qa, kt + c * kt_chunk, sc, D, width);
                if (width == WIDE_CHUNK)
                    group_softmax(p, sc, rows, rs, i0, group, q0, ctx_len, k0 + c * WIDE_CHUNK, k1, m, l, pa, alpha,
                                  WIDE_CHUNK);
                else
                    group_softmax(p, sc, rows, rs, i0, group, q0, ctx_len, k0 + c * WIDE_CHUNK, k1, m, l, pa, alpha,
                                  WIDE_CHUNK / 2);
                for (int i = 0; i < rows; i++)   /* the accumulators scaled */
                    for (int d = 0; d < D; d += 16)
                        _mm512_store_ps(ob + i * D + d, _mm512_mul_ps(_mm512_load_ps(ob + i * D + d),
                                                                      _mm512_set1_ps(alpha[i])));
                pv(pa, vt + c * vt_chunk, ob, D, width);
            }
            for (int i = 0; i < rows; i++) {
                pair_order_to_dims(ob + i * D, D);
                memcpy(acc + (int64_t)rs[i] * D, ob + i * D, 4 * D);
            }
        }
    }
#if AMX_ATTENTION
    if (tiles)
        _tile_release();   /* the tiles' state back to init: a context switch need not save it */
#endif
    free(kt), free(vt);
    (void)tiles;
    return 0;
}
#else
#define GROUP_ATTENTION 0
#define AMX_ATTENTION 0
#endif

/* One work item: keys [k0, k1) of sequence seq for all its rows; acc [R, D] unnormalized, m/l the
 * running max and normalizer per row. A bf16 prompt with AVX512-BF16 goes to attend_groups; otherwise a chunk is done KV head by
 * KV head, the rows reading that head (its query heads times the new tokens) ROWS at a time, and while the last chunk
 * is read, the first of the run's next item (after) is prefetched: a batch's decode sequences are a few chunks each,
 * and with no prefetch across them every sequence's first chunk came from memory cold. */
INLINE void attend_split_d(const Problem *p, int seq, int k0, int k1, Span after, float *acc, float *m, float *l,
                           float *kt, const int D, const int kv, const int direct, const int chunk) {
    const int Hq = p->num_heads, group = Hq / p->num_kv_heads;
    const int q0 = p->cu_seqlens_q[seq], q_len = p->cu_seqlens_q[seq + 1] - q0;
    const int ctx_len = p->seq_lens[seq] - q_len, R = q_len * Hq, per_head = q_len * group;
    const int32_t *table = p->block_tables + (int64_t)seq * p->table_width;
    int64_t rows_a[WIDE_CHUNK], rows_b[WIDE_CHUNK], *offs = rows_a, *next = rows_b;
    float w[ROWS][WIDE_CHUNK], alpha[ROWS];
    /* a prompt's scores come from its keys turned into kt (tile_scores): a turn serves all its rows */
    const int turned = chunk == WIDE_CHUNK && turns(kv, direct);
    float *acc_rows[ROWS];
    for (int r = 0; r < R; r++) { m[r] = -INFINITY; l[r] = 0.0f; }
#if GROUP_ATTENTION
    /* a bf16 prompt in groups of 16 rows (D a whole number of 64-dim passes), on AMX tiles where granted; where its
     * buffers cannot be had, the path below. Without tiles, only rows that fill a group: a decode step's 8 rows a KV
     * head (a GQA group of 8) in half-empty groups ran up to 1.3x slower than below (16 x 512 keys, D = 128) */
    const int tiles = AMX_ATTENTION && tiles_granted();
    if (turned && direct && D % 64 == 0 && (tiles || per_head >= 16)
        && attend_groups(p, seq, k0, k1, acc, m, l, D, tiles) == 0)
        return;
#endif
    memset(acc, 0, sizeof(float) * R * D);
    const Span here = {seq, k0, k1};
    for (int c0 = k0; c0 < k1; c0 += chunk) {
        const int n = k1 - c0 < chunk ? k1 - c0 : chunk, ahead = c0 + AHEAD * chunk;
        if (c0 == k0 || AHEAD != 1)
            row_offsets(p, table, c0, n, offs);
        else {   /* the chunk the last one asked ahead for: its rows' offsets are next's */
            int64_t *done = offs;
            offs = next, next = done;
        }
        for (int c = n; c < chunk; c++) offs[c] = offs[0];   /* past the split: real rows, weight 0 */
        const int n_ahead = ahead < k1 ? chunk_offsets(p, here, ahead, next, chunk)
                                       : chunk_offsets(p, after, after.k0, next, chunk);
        if (!kv) touch_rows(p, offs, n);
        /* rows are token-major: those of tokens before c0 - ctx_len cannot see this chunk (prompts) */
        const int first_row = c0 - ctx_len > 0 ? (c0 - ctx_len) * group : 0;
        Ahead ahead_rows = {next, n_ahead, (p->num_kv_heads * D * (kv ? 2 : 4) + 63) / 64, 0, 0};
        const int slots = p->num_kv_heads * (per_head - first_row);   /* rows of this chunk: one call each */
        const int quota = (n_ahead * ahead_rows.row_lines + slots - 1) / slots;
        for (int head = 0; head < p->num_kv_heads; head++) {
#if defined(__AVX512F__)
            if (turned) turn_keys(p, offs, head * D, (uint32_t *)kt, direct ? D / 2 : D, direct ? 2 : 4);
#endif
            for (int i0 = first_row; i0 < per_head; i0 += ROWS) {
                const int rows = per_head - i0 < ROWS ? per_head - i0 : ROWS;
                v16 tile[ROWS][WIDE_CHUNK / 16];
#if defined(__AVX512F__)
                if (turned) {
                    int64_t q_rows[ROWS];
                    for (int i = 0; i < rows; i++) q_rows[i] = ((int64_t)q0 * Hq + row_of(i0 + i, head, group, Hq)) * D;
                    switch (rows) {   /* constant rows: the accumulators get registers */
                        case 4: turned_scores(p, kt, q_rows, tile, 4, D, direct); break;
                        case 3: turned_scores(p, kt, q_rows, tile, 3, D, direct); break;
                        case 2: turned_scores(p, kt, q_rows, tile, 2, D, direct); break;
                        default: turned_scores(p, kt, q_rows, tile, 1, D, direct); break;
                    }
                }
#endif
                for (int i = 0; i < rows; i++) {
                    const int t = (i0 + i) / group, r = row_of(i0 + i, head, group, Hq);
                    const int64_t row = (int64_t)q0 * Hq + r;
                    vn s[WIDE_CHUNK / NATIVE];
                    for (int v = 0; v < chunk / 16; v++) {
#if NATIVE == 16
                        if (turned) s[v] = tile[i][v];
                        else
#endif
                            chunk_scores(p, direct ? NULL : p->q + row * D, p->q_bf16 + row * D, offs + 16 * v,
                                         head * D, D, kv, direct, s + v * (16 / NATIVE));
                    }
                    prefetch_some(p, &ahead_rows, quota, kv);
                    alpha[i] = row_step(p, s, t, q0, ctx_len, c0, k1, m + r, l + r, w[i], chunk);
                    acc_rows[i] = acc + (int64_t)r * D;
                }
                switch (rows) {
                    case 4: accumulate_rows(p, offs, head * D, acc_rows, alpha, w, 4, D, kv, direct, chunk); break;
                    case 3: accumulate_rows(p, offs, head * D, acc_rows, alpha, w, 3, D, kv, direct, chunk); break;
                    case 2: accumulate_rows(p, offs, head * D, acc_rows, alpha, w, 2, D, kv, direct, chunk); break;
                    default: accumulate_rows(p, offs, head * D, acc_rows, alpha, w, 1, D, kv, direct, chunk); break;
                }
            }
        }
    }
#if HAVE_DPBF16
    if (direct)
        for (int r = 0; r < R; r++) pair_order_to_dims(acc + (int64_t)r * D, D);
#endif
}

/* Copies specialized by cache dtype, bf16 scoring, the common head sizes and the chunk: constants let the
 * loops unroll. A bf16 cache with a bf16 query (an fp32 model's rounded) on a CPU with AVX512-BF16 scores in
 * bf16 (see chunk_scores). */
#define CHUNKS(D, kv, direct) \
    if (wide) { \
        float kt[(D) * WIDE_CHUNK] __attribute__((aligned(64)));   /* a chunk's turned keys */ \
        attend_split_d(p, seq, k0, k1, after, acc, m, l, kt, D, kv, direct, WIDE_CHUNK); \
    } else attend_split_d(p, seq, k0, k1, after, acc, m, l, NULL, D, kv, direct, CHUNK);
#define HEAD_SIZES(kv, direct) \
    if (D == 64) { CHUNKS(64, kv, direct) } \
    else if (D == 128) { CHUNKS(128, kv, direct) } \
    else { CHUNKS(D, kv, direct) }

/* Whether scores multiply a bf16 query with a bf16 cache's rows directly (VDPBF16PS; a query in bf16 given) */
INLINE int bf16_scores(int kv_type, int head_dim) {
    return HAVE_DPBF16 && kv_type == ELEM_BF16 && head_dim % 32 == 0;
}

static void attend_split(const Problem *p, int seq, int k0, int k1, Span after, float *acc, float *m, float *l) {
    const int D = p->head_dim;
    const int rows_a_head = (p->cu_seqlens_q[seq + 1] - p->cu_seqlens_q[seq]) * (p->num_heads / p->num_kv_heads);
    const int wide = rows_a_head >= WIDE_ROWS;
    if (bf16_scores(p->kv_type, D) && p->q_bf16 != NULL) { HEAD_SIZES(ELEM_BF16, 1) }
    else if (p->kv_type == ELEM_BF16) { HEAD_SIZES(ELEM_BF16, 0) }
    else if (p->kv_type == ELEM_F16) { HEAD_SIZES(ELEM_F16, 0) }
    else { HEAD_SIZES(ELEM_F32, 0) }
}

/* Combine the splits' partial results of row r (S splits, `row_stride` rows apart) into out (bf16, rounded to nearest
 * even as torch rounds, where out_bf16) and lse (where given). A row of one split is its accumulator over its
 * normalizer: no exp, and no log where no lse is asked (16 prompts of 128 tokens, 30 layers: 1.04-1.08x). */
static void merge_row(const float *acc, const float *m, const float *l, int splits, int64_t row_stride,
                      int D, void *out, int out_bf16, float *lse) {
    float big = -INFINITY, total = 0.0f, row[MAX_HEAD_DIM];
    for (int sp = 0; sp < splits; sp++) big = m[sp * row_stride] > big ? m[sp * row_stride] : big;
    memset(row, 0, sizeof(float) * D);
    if (big != -INFINITY && splits == 1) {
        total = l[0];
        for (int d = 0; d < D; d++) row[d] = acc[d] / total;
    } else if (big != -INFINITY) {
        for (int sp = 0; sp < splits; sp++) {
            if (m[sp * row_stride] == -INFINITY) continue;
            float w = expf(m[sp * row_stride] - big);
            total += l[sp * row_stride] * w;
            for (int d = 0; d < D; d++) row[d] += w * acc[sp * row_stride * D + d];
        }
        for (int d = 0; d < D; d++) row[d] /= total;
    }
    if (lse)   /* a fully masked row: -inf (and zeros) */
        *lse = big == -INFINITY ? -INFINITY : big + logf(total);
    for (int d = 0; d < D; d += 16)   /* (D a multiple of 16) */
        store16(out, d, load16(row, d, 0), out_bf16);
}

/* Rows of partial results an item of R rows takes: whole cache lines of floats. Items run on different
 * threads and update their running max and normalizer every chunk; two items sharing a line would bounce
 * it between the cores (measured: the 32 x 2048 decode step up to 1.6x slower when the VM's two cores
 * do not share a cache). */
static int64_t padded_rows(int R) {
    return (R + 15) & ~15;
}

/* The first key any row of a sequence sees: the start of its first row's window. */
static int first_key(int seq_len, int q_len, int window) {
    const int start = seq_len - q_len - window + 1;
    return window > 0 && start > 0 ? start : 0;
}

#define MIN_RUN_WORK 64   /* a run's least work (keys x rows): shorter ones cost more to merge than they save */

/* Work of a sequence's keys [first, first + k): one unit for each row that sees a key. Every row sees the context
 * (keys before ctx_len); the prompt's own keys are causal, key ctx_len + j seen by its last q_len - j rows. */
static int64_t keys_work(int64_t k, int first, int ctx_len, int q_len) {
    const int64_t end = first + k, context = (end < ctx_len ? end : ctx_len) - first;
    int64_t work = context > 0 ? context * q_len : 0;
    const int64_t own0 = first > ctx_len ? first : ctx_len, own = end - own0;   /* own keys in the range */
    if (own > 0)
        work += own * (q_len - (own0 - ctx_len)) - own * (own - 1) / 2;
    return work;
}

/* The work items. The sequences' keys (each from its first row's window on), one after another, are cut
 * into runs of equal work, one per thread (a key costs one unit per query row that sees it: a prompt's later keys
 * fewer), and each run's part of a sequence into pieces of at most split_keys keys. Piece j is sequence
 * seqs[pieces[4j]]'s keys [pieces[4j + 1], pieces[4j + 2]), done by run pieces[4j + 3]; pieces come in sequence
 * order, and a sequence's in key order. Equal runs, rather than equal pieces, keep both cores busy to the end: one
 * sequence of 1,100 keys in 256-key pieces left one core idle for a fifth of the kernel, and a piece costs
 * its first keys' cache misses, so more pieces than threads were slower (measured, docs/attention.md); a prompt
 * cut by keys alone gave the run with its first half three times the work of the other.
 * Writes at most max_pieces pieces (none when pieces is NULL) and returns how many there are. */
int attention_pieces(const int32_t *seq_lens, const int32_t *cu_seqlens_q, const int64_t *seqs, int num_seqs,
                     int window, int split_keys, int num_threads, int32_t *pieces, int max_pieces) {
    int64_t total = 0;
    for (int i = 0; i < num_seqs; i++) {
        const int seq = (int)seqs[i], q_len = cu_seqlens_q[seq + 1] - cu_seqlens_q[seq];
        const int first = first_key(seq_lens[seq], q_len, window);
        total += keys_work(seq_lens[seq] - first, first, seq_lens[seq] - q_len, q_len);
    }
    int64_t run_work = (total + num_threads - 1) / (num_threads > 0 ? num_threads : 1);
    run_work = run_work > MIN_RUN_WORK ? run_work : MIN_RUN_WORK;
    int count = 0;
    int64_t done = 0;   /* work before the current sequence */
    for (int i = 0; i < num_seqs; i++) {
        const int seq = (int)seqs[i], q_len = cu_seqlens_q[seq + 1] - cu_seqlens_q[seq];
        const int first = first_key(seq_lens[seq], q_len, window), keys = seq_lens[seq] - first;
        const int ctx_len = seq_lens[seq] - q_len;
        for (int k0 = 0, k1; k0 < keys; k0 = k1) {   /* q_len >= 1: the caller passes no other */
            const int64_t run = (done + keys_work(k0, first, ctx_len, q_len)) / run_work;
            const int64_t target = (run + 1) * run_work - done;   /* the work at which the next run starts */
            int lo = k0 + 1, hi = keys;   /* the first key count whose work reaches it (monotonic: bisect) */
            while (lo < hi) {
                const int mid = lo + (hi - lo) / 2;
                if (keys_work(mid, first, ctx_len, q_len) >= target) hi = mid;
                else lo = mid + 1;
            }
            k1 = lo - k0 > split_keys ? k0 + split_keys : lo;
            if (pieces != NULL && count < max_pieces) {
                int32_t *piece = pieces + 4 * count;
                piece[0] = i, piece[1] = first + k0, piece[2] = first + k1, piece[3] = (int32_t)run;
            }
            count++;
        }
        done += keys_work(keys, first, ctx_len, q_len);
    }
    return count;
}

/* Whether bf16 prompts run on AMX tiles here (this build has them and the process may use them). */
int attention_tiles(void) {
    return tiles_granted();
}

/* Whether prompts on a cache of this kind are scored by turned keys (a bf16 cache with AVX512-BF16, an fp32 one
 * with AVX-512): then the kernel beats torch's flash attention on prompts of any length (attention.cpu). */
int turns_keys(int kv_type, int head_dim) {
    return turns(kv_type, bf16_scores(kv_type, head_dim));
}

/* Whether the scores multiply q_bf16 alone on a cache of this kind (the fp32 q may then be NULL). */
int query_in_bf16(int kv_type, int head_dim) {
    return bf16_scores(kv_type, head_dim);
}

/* paged_attention's work list: the pieces attention_pieces cuts, and their partial results */
typedef struct {
    int n, runs;
    int32_t *pieces;
    /* piece j's partial rows start at row_at[j]; sequence i's pieces are first_piece[i] .. first_piece[i+1], their
     * rows padded_rows apart; run r's pieces are run_start[r] .. run_start[r+1] */
    int64_t *row_at;
    int *first_piece, *run_start;
    float *acc, *mx, *nz;
} Plan;

static void free_plan(Plan *w) {
    if (w == NULL)
        return;
    free(w->acc); free(w->mx); free(w->nz); free(w->pieces); free(w->row_at); free(w->first_piece);
    free(w->run_start); free(w);
}

/* the pieces of the sequences seqs[0..num_seqs) and room for their partial results, or NULL (out of memory) */
static Plan *plan_pieces(const int32_t *seq_lens, const int32_t *cu_seqlens_q, const int64_t *seqs, int num_seqs,
                         int num_heads, int head_dim, int window, int split_keys, int num_threads) {
    Plan *w = calloc(1, sizeof(Plan));
    if (w == NULL)
        return NULL;
    const int n = w->n = attention_pieces(seq_lens, cu_seqlens_q, seqs, num_seqs, window, split_keys, num_threads,
                                          NULL, 0);
    w->pieces = malloc(sizeof(int32_t) * 4 * (n + 1));
    w->row_at = malloc(sizeof(int64_t) * (n + 1));
    w->first_piece = malloc(sizeof(int) * (num_seqs + 1)), w->run_start = malloc(sizeof(int) * (n + 1));
    if (w->pieces == NULL || w->row_at == NULL || w->first_piece == NULL || w->run_start == NULL) {
        free_plan(w);
        return NULL;
    }
    attention_pieces(seq_lens, cu_seqlens_q, seqs, num_seqs, window, split_keys, num_threads, w->pieces, n);
    int i = -1;
    const int32_t *pieces = w->pieces;
    w->row_at[0] = 0;
    for (int j = 0; j < n; j++) {
        const int seq = (int)seqs[pieces[4 * j]];
        w->row_at[j + 1] = w->row_at[j] + padded_rows((cu_seqlens_q[seq + 1] - cu_seqlens_q[seq]) * num_heads);
        while (i < pieces[4 * j]) w->first_piece[++i] = j;
        if (j == 0 || pieces[4 * j + 3] != pieces[4 * j - 1]) w->run_start[w->runs++] = j;
    }
    while (i < num_seqs) w->first_piece[++i] = n;
    w->run_start[w->runs] = n;
    w->acc = aligned_alloc(64, sizeof(float) * (w->row_at[n] + 1) * head_dim);   /* sizes: whole lines */
    w->mx = aligned_alloc(64, sizeof(float) * (w->row_at[n] + 16));
    w->nz = aligned_alloc(64, sizeof(float) * (w->row_at[n] + 16));
    if (w->acc == NULL || w->mx == NULL || w->nz == NULL) {
        free_plan(w);
        return NULL;
    }
    return w;
}

/* The plan's pieces, then each sequence's merged, shared out over the threads of the region it runs in; the
 * caller's region waits at the end */
static void attend_pieces(const Problem *p, const Plan *w, const int64_t *seqs, int num_seqs, void *out,
                          int out_bf16, float *lse) {
    const int D = p->head_dim;
    #pragma omp for schedule(dynamic, 1)
    for (int r = 0; r < w->runs; r++)
        for (int j = w->run_start[r]; j < w->run_start[r + 1]; j++) {
            const int32_t *piece = w->pieces + 4 * j, *next = piece + 4;
            const Span after = j + 1 < w->run_start[r + 1] ? (Span){(int)seqs[next[0]], next[1], next[2]}
                                                           : (Span){-1, 0, 0};
            attend_split(p, (int)seqs[piece[0]], piece[1], piece[2], after, w->acc + w->row_at[j] * D,
                         w->mx + w->row_at[j], w->nz + w->row_at[j]);
        }
    /* merge each sequence's pieces by their log-sum-exp */
    #pragma omp for schedule(static) nowait
    for (int i = 0; i < num_seqs; i++) {
        int seq = (int)seqs[i], q0 = p->cu_seqlens_q[seq];
        int R = (p->cu_seqlens_q[seq + 1] - q0) * p->num_heads, splits = w->first_piece[i + 1] - w->first_piece[i];
        for (int r = 0; r < R; r++) {
            int64_t k = w->row_at[w->first_piece[i]] + r, row = (int64_t)q0 * p->num_heads + r;
            merge_row(w->acc + k * D, w->mx + k, w->nz + k, splits, padded_rows(R), D,
                      (char *)out + row * D * (out_bf16 ? 2 : 4), out_bf16, lse ? lse + row : NULL);
        }
    }
}

/* paged_attention run by every thread of the caller's parallel region (decode_layers' one region a step), each
 * with its own q and q_bf16 (the same values), out written when every thread returns; one thread plans the pieces.
 * Returns as paged_attention, the same on every thread. */
int paged_attention_team(const float *q, const uint16_t *q_bf16, const void *k_cache, const void *v_cache,
                         int kv_type, const int32_t *block_tables, int table_width, const int32_t *seq_lens,
                         const int32_t *cu_seqlens_q, const int64_t *seqs, int num_seqs, const uint8_t *tree_mask,
                         int tree_width, int num_heads, int num_kv_heads, int head_dim, int block_size, float scale,
                         int window, float softcap, int split_keys, void *out, int out_bf16, float *lse,
                         int num_threads) {
    (void)num_threads;   /* the region's */
    if (q == NULL && !(q_bf16 != NULL && bf16_scores(kv_type, head_dim)))
        return 2;   /* this build scores in fp32 and has no fp32 query */
    Problem p = {q, q_bf16, k_cache, v_cache, kv_type, block_tables, seq_lens, cu_seqlens_q, table_width, tree_mask,
                 tree_width, num_heads, num_kv_heads, head_dim, block_size, scale, window, softcap};
    Plan *w;
    #pragma omp single copyprivate(w)
    w = plan_pieces(seq_lens, cu_seqlens_q, seqs, num_seqs, num_heads, head_dim, window, split_keys,
                    omp_get_num_threads());
    if (w == NULL)
        return 1;
    attend_pieces(&p, w, seqs, num_seqs, out, out_bf16, lse);
    #pragma omp barrier
    #pragma omp master
    free_plan(w);
    return 0;
}

/* Attention for the sequences seqs[0..num_seqs), in the pieces attention_pieces cuts: out [T, Hq, D] in bf16 where
 * out_bf16, else fp32; lse [T, Hq] fp32, or NULL where not asked: paged_attention_team in a region of its own.
 * Returns 0, 1 when the pieces' partial results could not be allocated, 2 when q is NULL and this build scores in
 * fp32 (nothing written then). */
int paged_attention(const float *q, const uint16_t *q_bf16, const void *k_cache, const void *v_cache, int kv_type,
                    const int32_t *block_tables, int table_width, const int32_t *seq_lens,
                    const int32_t *cu_seqlens_q, const int64_t *seqs, int num_seqs,
                    const uint8_t *tree_mask, int tree_width, int num_heads, int num_kv_heads, int head_dim,
                    int block_size, float scale, int window, float softcap, int split_keys, void *out, int out_bf16,
                    float *lse, int num_threads) {
    int failed = 0;
    #pragma omp parallel num_threads(num_threads) reduction(| : failed)
    failed |= paged_attention_team(q, q_bf16, k_cache, v_cache, kv_type, block_tables, table_width, seq_lens,
                                   cu_seqlens_q, seqs, num_seqs, tree_mask, tree_width, num_heads, num_kv_heads,
                                   head_dim, block_size, scale, window, softcap, split_keys, out, out_bf16, lse,
                                   num_threads);
    return failed;
}
