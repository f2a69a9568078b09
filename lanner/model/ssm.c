/* State-space mixer steps (Mamba-1 and Mamba-2) over packed rows of several sequences, compiled at first use.
 *
 * Rows cu[s] .. cu[s + 1] - 1 are consecutive tokens of sequence s; each starts from the state in its slot
 * (zeros where fresh[s]) and leaves the state after its last row there. Snapshots (snap_rows sorted, with
 * their snap_slots) also copy the state right after a row into another slot; those slots are not any
 * sequence's own.
 *
 * Plain loops the compiler vectorizes at any ISA level. Mamba-1's scan takes LANES channels at a time, a
 * block of channels through every sequence (so a block's weights are read once a step, and every block has
 * the same work), its state in registers lane by lane so that no reduction crosses lanes. Mamba-2's takes
 * (sequence, head, a few of the head's state rows) at a time, each row vectorized over N.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define LANES 16

/* Lanes of a where mask (0 or -1) is set, else of b, in integer arithmetic: a float ?: here can come out of
 * GCC's jump threading as a branch, which stops the loop around it from vectorizing. */
static inline float select_bits(int32_t mask, float a, float b) {
    int32_t ia, ib;
    memcpy(&ia, &a, 4);
    memcpy(&ib, &b, 4);
    ia = (ia & mask) | (ib & ~mask);
    memcpy(&a, &ia, 4);
    return a;
}

/* exp(x) for x <= 88 in arithmetic the compiler vectorizes: x = k ln2 + f with k rounded to nearest (by the
 * 1.5 * 2^23 trick, in the float's bits, so no float-to-int-to-float round trip the compiler would turn into
 * a branch), |f| <= ln2 / 2, a degree-7 polynomial for exp(f) and 2^k built in the exponent bits. Relative
 * error ~3e-7; below -87 it gives ~1.6e-38 rather than 0. */
static inline float exp_approx(float x) {
    float c = select_bits(-(int32_t)(x < -87.0f), -87.0f, x);
    float r = c * 1.44269504088896341f + 12582912.0f;
    int32_t k;
    memcpy(&k, &r, 4);
    k -= 0x4B400000;
    float kf = (float)k;
    float f = c - kf * 0.693145751953125f - kf * 1.428606765330187e-06f;   /* ln2 in two parts (Cody-Waite) */
    float p = 1.0f + f * (1.0f + f * (0.5f + f * (1.6666667e-1f + f * (4.1666668e-2f + f * (8.3333338e-3f
              + f * (1.3888889e-3f + f * 1.9841270e-4f))))));
    int32_t bits = (k + 127) << 23;
    float scale;
    memcpy(&scale, &bits, 4);
    return p * scale;
}

static inline float silu(float x) { return x / (1.0f + exp_approx(select_bits(-(int32_t)(x < -88.0f), 88.0f, -x))); }

/* softplus(x) = log(1 + exp(x)) = max(x, 0) + log1p(e) with e = exp(-|x|) in (0, 1], and log1p(e) =
 * 2 atanh(s) for s = e / (2 + e) <= 1/3: its odd series to s^13 (relative error < 1e-7, no cancellation
 * for tiny e). */
static inline float softplus(float x) {
    const float e = exp_approx(-fabsf(x)), s = e / (2.0f + e), s2 = s * s;
    const float series = 1.0f + s2 * (1.0f / 3 + s2 * (1.0f / 5 + s2 * (1.0f / 7 + s2 * (1.0f / 9 + s2 * (1.0f / 11
                         + s2 * (1.0f / 13))))));
    return 0.5f * (x + fabsf(x)) + 2.0f * s * series;   /* max(x, 0) without a branch the compiler keeps */
}

/* The first snapshot at or after `row`. */
static int64_t first_snapshot(const int64_t *snap_rows, int64_t n_snap, int64_t row) {
    int64_t lo = 0, hi = n_snap;
    while (lo < hi) {
        int64_t mid = (lo + hi) / 2;
        if (snap_rows[mid] < row) lo = mid + 1; else hi = mid;
    }
    return lo;
}

/* A block's lanes: its nl channels (nl < LANES only in the last block), zeros past them. Full blocks take
 * the branch-free loops. */
static inline void load_lanes(float *restrict lanes, const float *restrict src, int64_t nl) {
    if (nl == LANES) {
        for (int64_t l = 0; l < LANES; l++) lanes[l] = src[l];
    } else {
        for (int64_t l = 0; l < LANES; l++) lanes[l] = l < nl ? src[l] : 0.0f;
    }
}

static inline void store_lanes(float *restrict dst, const float *restrict lanes, int64_t nl) {
    if (nl == LANES) {
        for (int64_t l = 0; l < LANES; l++) dst[l] = lanes[l];
    } else {
        for (int64_t l = 0; l < nl; l++) dst[l] = lanes[l];
    }
}

/* tile[j][l] = m[l * stride + j] for j < cols: a block of channels' rows (state, A) as one lane per channel.
 * Whole 16 x 16 tiles in fixed-size loops, which the compiler turns into vector shuffles. */
static inline void rows_to_lanes(float *restrict tile, const float *restrict m, int64_t stride, int64_t cols,
                                 int64_t nl) {
    if (nl == LANES && cols % LANES == 0) {
        for (int64_t j0 = 0; j0 < cols; j0 += LANES)
            for (int64_t j = 0; j < LANES; j++)
                for (int64_t l = 0; l < LANES; l++)
                    tile[(j0 + j) * LANES + l] = m[l * stride + j0 + j];
    } else if (nl == LANES) {
        for (int64_t j = 0; j < cols; j++)
            for (int64_t l = 0; l < LANES; l++)
                tile[j * LANES + l] = m[l * stride + j];
    } else {
        for (int64_t j = 0; j < cols; j++)
            for (int64_t l = 0; l < LANES; l++)
                tile[j * LANES + l] = l < nl ? m[l * stride + j] : 0.0f;
    }
}

static inline void lanes_to_rows(float *restrict m, int64_t stride, const float *restrict tile, int64_t cols,
                                 int64_t nl) {
    if (nl == LANES && cols % LANES == 0) {
        for (int64_t j0 = 0; j0 < cols; j0 += LANES)
            for (int64_t l = 0; l < LANES; l++)
                for (int64_t j = 0; j < LANES; j++)
                    m[l * stride + j0 + j] = tile[(j0 + j) * LANES + l];
    } else {
        for (int64_t l = 0; l < nl; l++)
            for (int64_t j = 0; j < cols; j++)
                m[l * stride + j] = tile[j * LANES + l];
    }
}

/* The sequence of packed row t: the last s with cu[s] <= t. */
static int64_t sequence_of(const int64_t *cu, int64_t S, int64_t t) {
    int64_t lo = 0, hi = S;
    while (hi - lo > 1) {
        int64_t mid = (lo + hi) / 2;
        if (cu[mid] <= t) lo = mid; else hi = mid;
    }
    return lo;
}

/* dst [C, K - 1] = the K - 1 conv inputs of a sequence before its local position `end`: its rows of u from
 * row0 on, and before them its saved inputs `saved` [C, K - 1] (NULL: zeros). dst may be `saved` itself:
 * each value moves to a lower column, and columns are written in ascending order. */
static void save_inputs(float *dst, const float *saved, const float *u, int64_t u_stride, int64_t C, int64_t K,
                        int64_t row0, int64_t end) {
    const int64_t H = K - 1;
    for (int64_t j = 0; j < H; j++) {
        const int64_t q = end - H + j;
        if (q >= 0) {
            const float *x = u + (row0 + q) * u_stride;
            for (int64_t c = 0; c < C; c++) dst[c * H + j] = x[c];
        } else if (saved) {
            for (int64_t c = 0; c < C; c++) dst[c * H + j] = saved[c * H + H + q];
        } else {
            for (int64_t c = 0; c < C; c++) dst[c * H + j] = 0.0f;
        }
    }
}

/* Causal depthwise conv1d of u [T, C] (rows u_stride apart) with w [C, K] (+ bias [C], or NULL), silu'd
 * when `act`, into out [T, C]; a sequence's inputs before its rows come from its conv state
 * state [slots, C, K - 1] (the last K - 1 inputs, oldest first), updated after. The conv has no recurrence:
 * rows run in parallel, channels in vector lanes. Returns 1 when out of memory. */
int ssm_conv(const float *u, int64_t u_stride, const float *w, const float *bias, float *state, int64_t C, int64_t K,
             const int64_t *cu, const int64_t *slots, const uint8_t *fresh, int64_t S, const int64_t *snap_rows,
             const int64_t *snap_slots, int64_t n_snap, int threads, float *out, int act) {
    const int64_t H = K - 1;
    float *wt = malloc(K * C * sizeof(float));   /* [K, C]: each tap's weights contiguous */
    if (!wt)
        return 1;
    for (int64_t c = 0; c < C; c++)
        for (int64_t k = 0; k < K; k++)
            wt[k * C + c] = w[c * K + k];
#pragma omp parallel num_threads(threads)
    {
#pragma omp for schedule(static)
        for (int64_t t = 0; t < cu[S]; t++) {
            const int64_t s = sequence_of(cu, S, t), p = t - cu[s];
            const float *saved = state + slots[s] * C * H;
            float *restrict o = out + t * C;
            for (int64_t c = 0; c < C; c++)
                o[c] = bias ? bias[c] : 0.0f;
            for (int64_t k = 0; k < K; k++) {
                const int64_t q = p - H + k;   /* the tap's local position */
                const float *restrict wk = wt + k * C;
                if (q >= 0) {
                    const float *restrict x = u + (t - p + q) * u_stride;
                    for (int64_t c = 0; c < C; c++) o[c] += wk[c] * x[c];
                } else if (!fresh[s]) {
                    for (int64_t c = 0; c < C; c++) o[c] += wk[c] * saved[c * H + H + q];
                }
            }
            if (act)
                for (int64_t c = 0; c < C; c++) o[c] = silu(o[c]);
        }
        /* snapshots before the sequences' own states: both read the inputs saved before this step */
#pragma omp for schedule(static)
        for (int64_t i = 0; i < n_snap; i++) {
            const int64_t s = sequence_of(cu, S, snap_rows[i]);
            save_inputs(state + snap_slots[i] * C * H, fresh[s] ? NULL : state + slots[s] * C * H, u, u_stride, C,
                        K, cu[s], snap_rows[i] - cu[s] + 1);
        }
#pragma omp for schedule(static)
        for (int64_t s = 0; s < S; s++) {
            float *own = state + slots[s] * C * H;
            save_inputs(own, fresh[s] ? NULL : own, u, u_stride, C, K, cu[s], cu[s + 1] - cu[s]);
        }
    }
    free(wt);
    return 0;
}

/* Mamba-1's selective scan over LANES channels from d0 of every sequence: per row t and channel d, with
 * delta = softplus(dt[t, d]) and A = -exp(A_log),
 *   h[d, n] = exp(delta A[d, n]) h[d, n] + delta u[t, d] B[t, n]
 *   y[t, d] = (sum_n h[d, n] C[t, n] + D[d] u[t, d]) silu(z[t, d])
 * u, dt, y [T, I]; B, C rows bc_stride apart; z rows z_stride apart; A_log [I, N]; state [slots, I, N]. */
static void scan_block(const float *u, const float *dt_raw, const float *A_log, const float *B, const float *C,
                       int64_t bc_stride, const float *D, const float *z, int64_t z_stride, float *state, int64_t I,
                       int64_t N, int64_t d0, const int64_t *cu, const int64_t *slots, const uint8_t *fresh, int64_t S,
                       const int64_t *snap_rows, const int64_t *snap_slots, int64_t n_snap, float *y) {
    const int64_t nl = I - d0 < LANES ? I - d0 : LANES;
    float h[N * LANES], a[N * LANES], dskip[LANES];   /* [n][lane] */
    rows_to_lanes(a, A_log + d0 * N, N, N, nl);
    for (int64_t i = 0; i < N * LANES; i++)
        a[i] = -exp_approx(a[i]);
    load_lanes(dskip, D + d0, nl);
    for (int64_t s = 0; s < S; s++) {
        float *own = state + (slots[s] * I + d0) * N;
        if (fresh[s])
            memset(h, 0, sizeof(h));
        else
            rows_to_lanes(h, own, N, N, nl);
        int64_t snap = first_snapshot(snap_rows, n_snap, cu[s]);
        for (int64_t t = cu[s]; t < cu[s + 1]; t++) {
            float dt[LANES], ut[LANES], gate[LANES], du[LANES], acc[LANES];
            load_lanes(dt, dt_raw + t * I + d0, nl);
            load_lanes(ut, u + t * I + d0, nl);
            load_lanes(gate, z + t * z_stride + d0, nl);
            for (int64_t l = 0; l < LANES; l++) {
                dt[l] = softplus(dt[l]);
                du[l] = dt[l] * ut[l];
                acc[l] = 0.0f;
            }
            const float *bt = B + t * bc_stride, *ct = C + t * bc_stride;
            for (int64_t n = 0; n < N; n++) {
                const float bn = bt[n], cn = ct[n];
                for (int64_t l = 0; l < LANES; l++) {
                    float hn = exp_approx(dt[l] * a[n * LANES + l]) * h[n * LANES + l] + du[l] * bn;
                    h[n * LANES + l] = hn;
                    acc[l] += hn * cn;
                }
            }
            for (int64_t l = 0; l < LANES; l++)
                acc[l] = (acc[l] + dskip[l] * ut[l]) * silu(gate[l]);
            store_lanes(y + t * I + d0, acc, nl);
            for (; snap < n_snap && snap_rows[snap] == t; snap++)
                lanes_to_rows(state + (snap_slots[snap] * I + d0) * N, N, h, N, nl);
        }
        lanes_to_rows(own, N, h, N, nl);
    }
}

void mamba_scan(const float *u, const float *dt, const float *A_log, const float *B, const float *C, int64_t bc_stride,
                const float *D, const float *z, int64_t z_stride, float *state, int64_t I, int64_t N,
                const int64_t *cu, const int64_t *slots, const uint8_t *fresh, int64_t S, const int64_t *snap_rows,
                const int64_t *snap_slots, int64_t n_snap, int threads, float *y) {
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t d0 = 0; d0 < I; d0 += LANES)
        scan_block(u, dt, A_log, B, C, bc_stride, D, z, z_stride, state, I, N, d0, cu, slots, fresh, S, snap_rows,
                   snap_slots, n_snap, y);
}

/* Mamba-2's scan of one sequence for head h (its group: h / (H / G)), state rows p0 .. p0 + np - 1, on the
 * slot's state in place: per row t, with delta = softplus(dt[t, h] + dt_bias[h]) clamped to [lo, hi] and
 * A = -exp(A_log[h]),
 *   state[p, n] = exp(delta A) state[p, n] + delta x[t, h, p] B[t, g, n]
 *   y[t, h, p] = sum_n state[p, n] C[t, g, n] + D[h] x[t, h, p]
 * x, dt rows x_stride, dt_stride apart; B, C [T, G * N] rows bc_stride apart; y [T, H * P];
 * state [slots, H, P, N]. */
static void scan2_rows(const float *x, int64_t x_stride, const float *dt, int64_t dt_stride, const float *dt_bias,
                       float lo, float hi, const float *A_log, const float *B, const float *C, int64_t bc_stride,
                       const float *D, float *state, int64_t H, int64_t P, int64_t N, int64_t G, int64_t s, int64_t h,
                       int64_t p0, int64_t np, const int64_t *cu, const int64_t *slots, const uint8_t *fresh,
                       const int64_t *snap_rows, const int64_t *snap_slots, int64_t n_snap, float *y) {
    const int64_t g = h / (H / G), at = (h * P + p0) * N;   /* the rows' offset in a slot's state */
    const float A = -exp_approx(A_log[h]);
    float *own = state + slots[s] * H * P * N + at;
    if (fresh[s])
        memset(own, 0, np * N * sizeof(float));
    int64_t snap = first_snapshot(snap_rows, n_snap, cu[s]);
    for (int64_t t = cu[s]; t < cu[s + 1]; t++) {
        float delta = softplus(dt[t * dt_stride + h] + dt_bias[h]);
        delta = delta < lo ? lo : (delta > hi ? hi : delta);
        const float dA = exp_approx(delta * A);
        const float *restrict bt = B + t * bc_stride + g * N, *restrict ct = C + t * bc_stride + g * N;
        for (int64_t p = 0; p < np; p++) {
            const float xv = x[t * x_stride + h * P + p0 + p], xdt = xv * delta;
            float *restrict hp = own + p * N, acc = 0.0f;
            for (int64_t n = 0; n < N; n++) {
                hp[n] = hp[n] * dA + xdt * bt[n];
                acc += hp[n] * ct[n];
            }
            y[t * H * P + h * P + p0 + p] = acc + D[h] * xv;
        }
        for (; snap < n_snap && snap_rows[snap] == t; snap++)
            memcpy(state + snap_slots[snap] * H * P * N + at, own, np * N * sizeof(float));
    }
}

#define P_ROWS 16   /* state rows of a head per work item: more items than heads to share among threads */

void mamba2_scan(const float *x, int64_t x_stride, const float *dt, int64_t dt_stride, const float *dt_bias, float lo,
                 float hi, const float *A_log, const float *B, const float *C, int64_t bc_stride, const float *D,
                 float *state, int64_t H, int64_t P, int64_t N, int64_t G, const int64_t *cu, const int64_t *slots,
                 const uint8_t *fresh, int64_t S, const int64_t *snap_rows, const int64_t *snap_slots, int64_t n_snap,
                 int threads, float *y) {
    const int64_t parts = (P + P_ROWS - 1) / P_ROWS;
#pragma omp parallel for collapse(3) num_threads(threads) schedule(dynamic)
    for (int64_t s = 0; s < S; s++)
        for (int64_t h = 0; h < H; h++)
            for (int64_t part = 0; part < parts; part++) {
                const int64_t p0 = part * P_ROWS, np = P - p0 < P_ROWS ? P - p0 : P_ROWS;
                scan2_rows(x, x_stride, dt, dt_stride, dt_bias, lo, hi, A_log, B, C, bc_stride, D, state, H, P, N, G,
                           s, h, p0, np, cu, slots, fresh, snap_rows, snap_slots, n_snap, y);
            }
}
