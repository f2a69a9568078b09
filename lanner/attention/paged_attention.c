/* Paged attention for rows with few new tokens (decode, speculative verify), compiled at first use.
 *
 * One work item is (sequence, split of its context): it streams that split's keys and values through
 * the block table a chunk at a time -- whole rows of all KV heads, which lie contiguously in a block --
 * with FlashAttention's online softmax for every query row of the sequence (its new tokens times the
 * query heads). Splits run in parallel and are merged by their log-sum-exp, so one long sequence still
 * keeps every core busy (Flash-Decoding). Each KV byte is read once per step.
 *
 * Layouts: q [T, Hq, D] fp32 (and the same in bf16 for a bf16 model, or NULL); caches
 * [num_blocks, block_size, Hkv, D] fp32 or bf16; out [T, Hq, D] fp32;
 * lse [T, Hq] fp32; tree_mask, when given, [T, tree_width] bytes: draft row -> visible draft rows.
 * Row r of a sequence is query token r / Hq, query head r % Hq; it reads KV head (r % Hq) / group.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define CHUNK 32
#define INLINE static inline __attribute__((always_inline))

#if defined(__AVX512BF16__)
#include <immintrin.h>
#define HAVE_DPBF16 1
/* q . k of bf16 rows with VDPBF16PS: the products are exact in fp32, the sums fp32. D a multiple of 32. */
INLINE float dot_bf16(const uint16_t *q, const uint16_t *k, const int D) {
    __m512 acc = _mm512_setzero_ps();
    for (int d = 0; d < D; d += 32)
        acc = _mm512_dpbf16_ps(acc, (__m512bh)_mm512_loadu_si512(q + d), (__m512bh)_mm512_loadu_si512(k + d));
    return _mm512_reduce_add_ps(acc);
}
#else
#define HAVE_DPBF16 0
INLINE float dot_bf16(const uint16_t *q, const uint16_t *k, const int D) { (void)q; (void)k; (void)D; return 0; }
#endif

typedef struct {
    const float *q;
    const uint16_t *q_bf16;   /* q as bf16 (bf16 models), or NULL */
    const void *k_cache, *v_cache;
    int kv_bf16;
    const int32_t *block_tables, *seq_lens, *cu_seqlens_q;
    int table_width;
    const uint8_t *tree_mask;
    int tree_width, num_heads, num_kv_heads, head_dim, block_size;
    float scale;
} Problem;

typedef float v16 __attribute__((vector_size(64)));
typedef int32_t v16i __attribute__((vector_size(64)));

/* exp(x) for 16 lanes of x <= 0, in vector arithmetic (GCC's vector extensions, so it stays vectorized):
 * 2^t = 2^trunc(t) * 2^frac with a degree-7 polynomial for 2^frac, frac in (-1, 0] (relative error
 * ~2e-7). Lanes below -87 (and -inf) give exactly 0. */
INLINE v16 exp16_nonpositive(v16 x) {
    v16 t = x * 1.44269504088896341f;
    v16i low = t < -126.0f;                                          /* all-ones where true */
    t = (v16)(((v16i)t & ~low) | ((v16i)((v16){0} - 126.0f) & low));
    v16i whole = __builtin_convertvector(t, v16i);                  /* truncates toward 0 */
    v16 f = (t - __builtin_convertvector(whole, v16)) * 0.69314718055994531f;
    v16 poly = 1.0f + f * (1.0f + f * (0.5f + f * (1.6666667e-1f + f * (4.1666668e-2f
               + f * (8.3333338e-3f + f * (1.3888889e-3f + f * 1.9841270e-4f))))));
    v16i bits = ((whole + 127) << 23) & (x >= -87.0f);
    return poly * (v16)bits;
}

INLINE float exp_nonpositive(float x) {
    v16 v = {x};
    return exp16_nonpositive(v)[0];
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

INLINE void load_row(const void *cache, int64_t at, int width, float *restrict dst, const int bf16) {
    if (bf16) {
        const uint16_t *restrict src = (const uint16_t *)cache + at;
        for (int i = 0; i < width; i++) {
            uint32_t bits = (uint32_t)src[i] << 16;
            memcpy(dst + i, &bits, sizeof bits);
        }
    } else {
        memcpy(dst, (const float *)cache + at, sizeof(float) * width);
    }
}

/* The K and V rows at offs[0..n) as fp32 [n, Hkv * D] each. Meanwhile the rows at next[0..n_next) (the
 * next chunk) are prefetched into L2, one per row loaded rather than in a burst ahead of the loads:
 * blocks are scattered, so the hardware prefetcher cannot guess them. */
INLINE void load_chunk(const Problem *p, const int64_t *offs, int n, const int64_t *next, int n_next,
                       float *restrict kbuf, float *restrict vbuf, const int D, const int bf16, const int with_k) {
    const int width = p->num_kv_heads * D, elem = bf16 ? 2 : 4;
    for (int c = 0; c < n; c++) {
        if (c < n_next)
            for (int b = 0; b < width * elem; b += 64) {
                __builtin_prefetch((const char *)p->k_cache + next[c] * elem + b, 0, 1);
                __builtin_prefetch((const char *)p->v_cache + next[c] * elem + b, 0, 1);
            }
        if (with_k) load_row(p->k_cache, offs[c], width, kbuf + c * width, bf16);
        load_row(p->v_cache, offs[c], width, vbuf + c * width, bf16);
    }
}

/* Scores of one query row against keys 0..last of the chunk (rows `stride` apart). */
INLINE void row_scores(const float *restrict qr, const float *restrict keys, int stride, int last,
                       float *restrict s, const int D) {
    for (int c = 0; c <= last; c++) {
        float dot = 0.0f;
        for (int d = 0; d < D; d++) dot += qr[d] * keys[c * stride + d];
        s[c] = dot;
    }
}

/* The same for a bf16 model and cache: bf16 q against the cache's bf16 key rows (offs[c] + head) with
 * dot_bf16, scaled afterwards; no fp32 copy of K is made. */
INLINE void row_scores_bf16(const uint16_t *qb, const uint16_t *k_cache, const int64_t *offs, int head,
                            float scale, int last, float *restrict s, const int D) {
    for (int c = 0; c <= last; c++) s[c] = dot_bf16(qb, k_cache + offs[c] + head, D) * scale;
}

/* -inf for the keys the row must not see (past last, or outside its tree); returns the largest score. */
INLINE float mask_scores(float *restrict s, int last, const uint8_t *tree, int first_draft) {
    for (int c = last + 1; c < CHUNK; c++) s[c] = -INFINITY;
    if (tree != NULL)
        for (int c = first_draft > 0 ? first_draft : 0; c <= last; c++)
            if (!tree[c - first_draft]) s[c] = -INFINITY;
    float best = -INFINITY;
    for (int c = 0; c < CHUNK; c++) best = s[c] > best ? s[c] : best;
    return best;
}

/* acc = acc * alpha + sum_c w[c] v[c], with two accumulators so consecutive keys do not wait on each other. */
INLINE void accumulate(float *restrict acc, float alpha, const float *restrict w, const float *restrict values,
                       int stride, int last, const int D) {
    float even[256], odd[256];
    for (int d = 0; d < D; d++) { even[d] = acc[d] * alpha; odd[d] = 0.0f; }
    int c = 0;
    for (; c + 1 <= last; c += 2)
        for (int d = 0; d < D; d++) {
            even[d] += w[c] * values[c * stride + d];
            odd[d] += w[c + 1] * values[(c + 1) * stride + d];
        }
    if (c == last)
        for (int d = 0; d < D; d++) even[d] += w[c] * values[c * stride + d];
    for (int d = 0; d < D; d++) acc[d] = even[d] + odd[d];
}

/* One work item: keys [k0, k1) of sequence seq for all its rows; acc [R, D] unnormalized, m/l the
 * running max and normalizer per row. kbuf/vbuf hold one chunk of all heads. */
INLINE void attend_split_d(const Problem *p, int seq, int k0, int k1, float *acc, float *m, float *l,
                           float *kbuf, float *vbuf, const int D, const int bf16) {
    const int Hq = p->num_heads, group = Hq / p->num_kv_heads, width = p->num_kv_heads * D;
    const int q0 = p->cu_seqlens_q[seq], q_len = p->cu_seqlens_q[seq + 1] - q0;
    const int ctx_len = p->seq_lens[seq] - q_len, R = q_len * Hq;
    const int32_t *table = p->block_tables + (int64_t)seq * p->table_width;
    float qr[256], s[CHUNK];
    int64_t offs[CHUNK], next[CHUNK];
    /* bf16 model and cache on a CPU with AVX512-BF16: scores straight from the cache's bf16 rows */
    const int direct = HAVE_DPBF16 && bf16 && p->q_bf16 != NULL && D % 32 == 0;
    for (int r = 0; r < R; r++) { m[r] = -INFINITY; l[r] = 0.0f; }
    memset(acc, 0, sizeof(float) * R * D);
    for (int c0 = k0; c0 < k1; c0 += CHUNK) {
        int n = k1 - c0 < CHUNK ? k1 - c0 : CHUNK, ahead = c0 + CHUNK;   /* rows prefetched */
        int n_ahead = k1 - ahead < CHUNK ? k1 - ahead : CHUNK;
        row_offsets(p, table, c0, n, offs);
        if (n_ahead > 0) row_offsets(p, table, ahead, n_ahead, next);
        load_chunk(p, offs, n, next, n_ahead, kbuf, vbuf, D, bf16, !direct);
        for (int r = 0; r < R; r++) {
            int t = r / Hq, kv_head = (r % Hq) / group, last = ctx_len + t - c0;  /* causal: keys <= last */
            if (last < 0) continue;
            last = last < n - 1 ? last : n - 1;
            const uint8_t *tree = p->tree_mask ? p->tree_mask + (int64_t)(q0 + t) * p->tree_width : NULL;
            if (direct) {
                row_scores_bf16(p->q_bf16 + ((int64_t)q0 * Hq + r) * D, p->k_cache, offs, kv_head * D, p->scale,
                                last, s, D);
            } else {
                const float *q = p->q + ((int64_t)q0 * Hq + r) * D;
                for (int d = 0; d < D; d++) qr[d] = q[d] * p->scale;
                row_scores(qr, kbuf + kv_head * D, width, last, s, D);
            }
            float chunk_max = mask_scores(s, last, tree, ctx_len - c0);
            if (chunk_max == -INFINITY) continue;
            float new_max = chunk_max > m[r] ? chunk_max : m[r], sum = 0.0f;
            float alpha = exp_nonpositive(m[r] - new_max);  /* m = -inf: 0, and acc, l are 0 anyway */
            for (int c = 0; c < CHUNK; c += 16) {
                v16 w;
                memcpy(&w, s + c, sizeof w);
                w = exp16_nonpositive(w - new_max);
                memcpy(s + c, &w, sizeof w);
                for (int i = 0; i < 16; i++) sum += w[i];
            }
            accumulate(acc + (int64_t)r * D, alpha, s, vbuf + kv_head * D, width, last, D);
            l[r] = l[r] * alpha + sum;
            m[r] = new_max;
        }
    }
}

/* Copies specialized by cache dtype and the common head sizes: constants let the loops unroll. */
static void attend_split(const Problem *p, int seq, int k0, int k1, float *acc, float *m, float *l,
                         float *kbuf, float *vbuf) {
    const int D = p->head_dim;
    if (p->kv_bf16 && D == 64) attend_split_d(p, seq, k0, k1, acc, m, l, kbuf, vbuf, 64, 1);
    else if (p->kv_bf16 && D == 128) attend_split_d(p, seq, k0, k1, acc, m, l, kbuf, vbuf, 128, 1);
    else if (p->kv_bf16) attend_split_d(p, seq, k0, k1, acc, m, l, kbuf, vbuf, D, 1);
    else if (D == 64) attend_split_d(p, seq, k0, k1, acc, m, l, kbuf, vbuf, 64, 0);
    else if (D == 128) attend_split_d(p, seq, k0, k1, acc, m, l, kbuf, vbuf, 128, 0);
    else attend_split_d(p, seq, k0, k1, acc, m, l, kbuf, vbuf, D, 0);
}

/* Combine the splits' partial results of row r (S splits, `row_stride` rows apart) into out/lse. */
static void merge_row(const float *acc, const float *m, const float *l, int splits, int64_t row_stride,
                      int D, float *restrict out, float *lse) {
    float big = -INFINITY, total = 0.0f;
    for (int sp = 0; sp < splits; sp++) big = m[sp * row_stride] > big ? m[sp * row_stride] : big;
    memset(out, 0, sizeof(float) * D);
    if (big == -INFINITY) { *lse = -INFINITY; return; }   /* fully masked row: zeros */
    for (int sp = 0; sp < splits; sp++) {
        if (m[sp * row_stride] == -INFINITY) continue;
        float w = expf(m[sp * row_stride] - big);
        total += l[sp * row_stride] * w;
        for (int d = 0; d < D; d++) out[d] += w * acc[sp * row_stride * D + d];
    }
    for (int d = 0; d < D; d++) out[d] /= total;
    *lse = big + logf(total);
}

/* Attention for the sequences seqs[0..num_seqs), each split into pieces of at most split_keys keys. */
void paged_attention(const float *q, const uint16_t *q_bf16, const void *k_cache, const void *v_cache, int kv_bf16,
                     const int32_t *block_tables, int table_width, const int32_t *seq_lens,
                     const int32_t *cu_seqlens_q, const int64_t *seqs, int num_seqs,
                     const uint8_t *tree_mask, int tree_width, int num_heads, int num_kv_heads, int head_dim,
                     int block_size, float scale, int split_keys, float *out, float *lse, int num_threads) {
    Problem p = {q, q_bf16, k_cache, v_cache, kv_bf16, block_tables, seq_lens, cu_seqlens_q, table_width, tree_mask,
                 tree_width, num_heads, num_kv_heads, head_dim, block_size, scale};
    const int D = head_dim;
    /* sequence i owns work items item_start[i] .. item_start[i+1] (its splits) and partial rows from
     * row_start[i] (split-major: split sp's rows are contiguous) */
    int64_t *item_start = malloc(sizeof(int64_t) * (num_seqs + 1));
    int64_t *row_start = malloc(sizeof(int64_t) * (num_seqs + 1));
    item_start[0] = row_start[0] = 0;
    for (int i = 0; i < num_seqs; i++) {
        int seq = (int)seqs[i], q_len = cu_seqlens_q[seq + 1] - cu_seqlens_q[seq];
        int splits = (seq_lens[seq] + split_keys - 1) / split_keys;
        splits = splits < 1 ? 1 : splits;
        item_start[i + 1] = item_start[i] + splits;
        row_start[i + 1] = row_start[i] + (int64_t)splits * q_len * num_heads;
    }
    float *acc = malloc(sizeof(float) * row_start[num_seqs] * D);
    float *mx = malloc(sizeof(float) * row_start[num_seqs]);
    float *nz = malloc(sizeof(float) * row_start[num_seqs]);

    #pragma omp parallel num_threads(num_threads)
    {
        float *kbuf = malloc(sizeof(float) * CHUNK * num_kv_heads * D);
        float *vbuf = malloc(sizeof(float) * CHUNK * num_kv_heads * D);
        #pragma omp for schedule(dynamic, 1)
        for (int64_t item = 0; item < item_start[num_seqs]; item++) {
            int i = 0;
            while (item_start[i + 1] <= item) i++;
            int seq = (int)seqs[i], split = (int)(item - item_start[i]);
            int R = (cu_seqlens_q[seq + 1] - cu_seqlens_q[seq]) * num_heads;
            int k0 = split * split_keys, k1 = k0 + split_keys < seq_lens[seq] ? k0 + split_keys : seq_lens[seq];
            int64_t r0 = row_start[i] + (int64_t)split * R;
            attend_split(&p, seq, k0, k1, acc + r0 * D, mx + r0, nz + r0, kbuf, vbuf);
        }
        free(kbuf);
        free(vbuf);
        /* merge each sequence's splits by their log-sum-exp */
        #pragma omp for schedule(static)
        for (int i = 0; i < num_seqs; i++) {
            int seq = (int)seqs[i], q0 = cu_seqlens_q[seq];
            int R = (cu_seqlens_q[seq + 1] - q0) * num_heads, splits = (int)(item_start[i + 1] - item_start[i]);
            for (int r = 0; r < R; r++) {
                int64_t k = row_start[i] + r, row = (int64_t)q0 * num_heads + r;
                merge_row(acc + k * D, mx + k, nz + k, splits, R, D, out + row * D, lse + row);
            }
        }
    }
    free(acc); free(mx); free(nz); free(item_start); free(row_start);
}
