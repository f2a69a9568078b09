/* Decode-step attention timed from C, for bench/attention_ab.py: the kernel source is included (-DKERNEL="path"),
 * so a call costs what it costs inside fused.c's step, without the ~5 us of ctypes argument conversion that a
 * Python loop adds to each call. With -DTEAM=1 (kernels that have paged_attention_team) every layer's call runs in
 * one parallel region a round, as the step's one region runs it; else in a region of its own.
 *
 *     attention_ab B CONTEXT LAYERS THREADS ROUNDS HEADS KV_HEADS HEAD_DIM KV_TYPE
 *
 * B sequences of CONTEXT cached tokens decode one token each, through LAYERS layers' caches (KV_TYPE: vec16.h's
 * ELEM_*, 0 fp32, 1 bf16, 2 fp16; blocks of 16 in a shuffled table, as after churn) in turn, 3 MB of "weights" read
 * between calls, each layer its own (as a step's linears stream ~100 MB, so that a small context's KV comes from
 * memory, not from an L3 that one 3 MB reread left it in). Prints the median and the minimum over ROUNDS of the
 * mean microseconds a call, and a checksum of the first layer's output (variants that should agree print the same
 * one). */
#include KERNEL
#include <omp.h>
#include <stdio.h>

static unsigned next(unsigned *state) {
    *state = *state * 1664525u + 1013904223u;
    return *state >> 8;
}

static float uniform(unsigned *state) {
    return (float)next(state) / 16777216.0f * 2 - 1;
}

static int ascending(const void *a, const void *b) {
    const double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

/* a layer's caches, query and block table, filled from state */
typedef struct { void *k, *v; float *q; int32_t *table; } Layer;

/* x into element i of a cache of element type kind (numbers, not ELEM_*: older kernels, fp32 only, lack them) */
static void put(void *cache, size_t i, float x, int kind) {
    if (kind == 2)
        ((_Float16 *)cache)[i] = (_Float16)x;
    else if (kind == 1) {
        uint32_t u;
        memcpy(&u, &x, 4);
        ((uint16_t *)cache)[i] = (uint16_t)(u >> 16);
    } else
        ((float *)cache)[i] = x;
}

static Layer make_layer(int B, int blocks, int block_size, int H, int Hkv, int D, int kind, unsigned *state) {
    const size_t n = (size_t)blocks * block_size * Hkv * D, bytes = n * (kind ? 2 : 4);
    Layer l = {aligned_alloc(64, bytes), aligned_alloc(64, bytes), aligned_alloc(64, (size_t)B * H * D * 4),
               malloc(sizeof(int32_t) * blocks)};
    for (size_t i = 0; i < n; i++) put(l.k, i, uniform(state), kind), put(l.v, i, uniform(state), kind);
    for (int i = 0; i < B * H * D; i++) l.q[i] = uniform(state);
    for (int i = 0; i < blocks; i++) l.table[i] = i;
    for (int i = blocks - 1; i > 0; i--) {
        const int j = (int)(next(state) % (unsigned)(i + 1)), t = l.table[i];
        l.table[i] = l.table[j], l.table[j] = t;
    }
    return l;
}

int main(int argc, char **argv) {
    if (argc != 10) {
        fprintf(stderr, "usage: %s B CONTEXT LAYERS THREADS ROUNDS HEADS KV_HEADS HEAD_DIM KV_TYPE\n", argv[0]);
        return 2;
    }
    const int B = atoi(argv[1]), ctx = atoi(argv[2]), L = atoi(argv[3]), threads = atoi(argv[4]);
    const int rounds = atoi(argv[5]), H = atoi(argv[6]), Hkv = atoi(argv[7]), D = atoi(argv[8]), block_size = 16;
    const int kind = atoi(argv[9]);
    const int width = (ctx + block_size - 1) / block_size, blocks = B * width;
    unsigned state = 1;
    Layer *layers = malloc(sizeof(Layer) * L);
    for (int l = 0; l < L; l++) layers[l] = make_layer(B, blocks, block_size, H, Hkv, D, kind, &state);
    int32_t *seq_lens = malloc(4 * B), *cu = malloc(4 * (B + 1));
    int64_t *seqs = malloc(8 * B);
    for (int b = 0; b < B; b++) seq_lens[b] = ctx, cu[b] = b, seqs[b] = b;
    cu[B] = B;
    float *out = aligned_alloc(64, (size_t)B * H * D * 4), *weights = malloc(sizeof(float) * L * (3 << 18));
    for (size_t i = 0; i < (size_t)L * (3 << 18); i++) weights[i] = 1;
    double *seconds = malloc(sizeof(double) * rounds), checksum = 0;
    volatile float sink;
    const size_t slice = 3 << 18;   /* a layer's "weights", floats */
    int failed = 0;
    for (int r = 0; r < rounds; r++) {
        double total = 0;
#if TEAM
        /* as fused.c's one region a step: each thread reads its share of a layer's weights (the GEMVs), then every
         * thread runs the attention together; thread 0's clock */
#pragma omp parallel num_threads(threads) reduction(+ : total) reduction(| : failed)
        for (int l = 0; l < L; l++) {
            float s = 0;
            for (size_t i = slice * omp_get_thread_num() / threads / 16 * 16;
                 i < slice * (omp_get_thread_num() + 1) / threads; i += 16)
                s += weights[l * slice + i];
            if (omp_get_thread_num() == 0)
                sink = s;
#pragma omp barrier
            const double start = omp_get_wtime();
            failed |= paged_attention_team(layers[l].q, NULL, layers[l].k, layers[l].v, kind, layers[l].table, width,
                                           seq_lens, cu, seqs, B, NULL, 0, H, Hkv, D, block_size,
                                           1.0f / sqrtf((float)D), 0, 0.0f, 1 << 30, out, 0, NULL, threads);
            if (omp_get_thread_num() == 0)
                total += omp_get_wtime() - start;
#pragma omp master
            for (int i = 0; r == 0 && l == 0 && i < B * H * D; i++) checksum += out[i];
        }
#else   /* kernels before paged_attention_team: a region a call */
        for (int l = 0; l < L; l++) {
            float s = 0;
#pragma omp parallel for reduction(+ : s) num_threads(threads)
            for (size_t i = 0; i < slice; i += 16) s += weights[l * slice + i];
            sink = s;
            const double start = omp_get_wtime();
            failed |= paged_attention(layers[l].q, NULL, layers[l].k, layers[l].v, kind, layers[l].table, width,
                                      seq_lens, cu, seqs, B, NULL, 0, H, Hkv, D, block_size, 1.0f / sqrtf((float)D),
                                      0, 0.0f, 1 << 30, out, 0, NULL, threads);
            total += omp_get_wtime() - start;
            for (int i = 0; r == 0 && l == 0 && i < B * H * D; i++) checksum += out[i];
        }
#endif
        if (failed) {
            fprintf(stderr, "paged_attention failed\n");
            return 1;
        }
        seconds[r] = total / L;
    }
    (void)sink;
    qsort(seconds, rounds, sizeof(double), ascending);
    printf("%.3f %.3f %.9g\n", seconds[rounds / 2] * 1e6, seconds[0] * 1e6, checksum);
    return 0;
}
