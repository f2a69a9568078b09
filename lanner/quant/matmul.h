/* ggml_matmul's (ggml_argmax's, ggml_dequantize's, ggml_team_matmul's) signature and flags, for the kernels that call it through a pointer (fused.c's
 * one-call step):
 * each library keeps its own ISA build, so the step takes the matmul as a function pointer. */
#ifndef LANNER_MATMUL_H
#define LANNER_MATMUL_H
#include <stdint.h>

#define MATMUL_INT8 1     /* may run on int8 activations (formats that have the path) */
#define MATMUL_X_BF16 2   /* x is bf16, else fp32 */
#define MATMUL_Y_BF16 4   /* y is bf16 (rounded to nearest even after the bias), else fp32 */
#define MATMUL_AMX_BF16 8   /* bf16 x: steps of more rows than ggml_amx_bf16 gives (16 with MATMUL_INT8, else 4)
                            * multiply the weights rounded to bf16 on AMX tiles, fp32 sums */
#define MATMUL_SILU_MUL 16  /* W's rows are gate | up (N = 2I): y [M, I] = silu(gate) * up, rounded as the separate
                             * ops round (gate and up to y's dtype, then silu to it); no bias */
#define MATMUL_ARGMAX 32    /* y is int64 [M]: each row's argmax (numpy's: the first largest, a NaN counting as
                             * largest) of the results as y would hold them (MATMUL_Y_BF16: rounded to bf16) */
#define MATMUL_BF16_PAIRS 64   /* bf16 x past 4 rows on the exact path: as bf16 pairs of the weights' integers, where
                               * ggml_bf16_pairs takes them */

/* type, w, packed, row_bytes, N, K, x, ldx, M, y, ldy, bias, threads, flags */
typedef int (*matmul_fn)(int, const uint8_t *, const uint8_t *, int64_t, int64_t, int64_t, const void *, int64_t,
                         int64_t, void *, int64_t, const float *, int, int);
/* ggml_argmax: type, w, packed, row_bytes, N, K, x, ldx, M, x_flags (MATMUL_X_BF16, MATMUL_BF16_PAIRS: as the
 * exact path's call), norms, round_bf16, scratch, threads, tokens */
typedef int (*argmax_fn)(int, const uint8_t *, const uint8_t *, int64_t, int64_t, int64_t, const void *, int64_t,
                         int64_t, int, const float *, int, float *, int, int64_t *);
/* ggml_dequantize: type, w, row_bytes, K, ids, rows, out, out_bf16, threads */
typedef int (*dequantize_fn)(int, const uint8_t *, int64_t, int64_t, const int64_t *, int64_t, void *, int, int);
/* ggml_team_takes: type, packed, N, K, M, flags */
typedef int (*team_takes_fn)(int, const uint8_t *, int64_t, int64_t, int64_t, int);
/* ggml_team_matmul: ggml_matmul's arguments less threads (the caller's region's) */
typedef int (*team_matmul_fn)(int, const uint8_t *, const uint8_t *, int64_t, int64_t, int64_t, const void *, int64_t,
                              int64_t, void *, int64_t, const float *, int);
#endif
