/* AMX tiles for the kernels that use them (the build hashes included files with the source); where the compiler
 * does not target them, tiles_granted() is 0. */
#ifndef LANNER_AMX_H
#define LANNER_AMX_H
#if defined(__AMX_TILE__) && defined(__AMX_BF16__)
#include <stdint.h>
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>

/* Whether this process may use the tile registers (Linux grants them per process, on request). */
static int tiles_granted(void) {
    static int granted = -1;
    if (granted < 0)
        granted = syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XFEATURE_XTILEDATA */) == 0;
    return granted;
}

/* Every tile 64 bytes wide (the kernels use C 0-3, A 4-5, B 6-7), the C and A tiles `rows` rows (a product's time
 * goes with its rows), the B tiles 16. Set per call or work item: oneDNN and the other kernels set their own between
 * ours. */
static void amx_configure_rows(int rows) {
    struct __attribute__((packed, aligned(64))) {
        uint8_t palette, start_row, reserved[14];
        uint16_t colsb[16];
        uint8_t rows[16];
    } cfg = {1, 0, {0}, {64, 64, 64, 64, 64, 64, 64, 64}, {0}};
    for (int t = 0; t < 8; t++)
        cfg.rows[t] = t < 6 ? rows : 16;
    _tile_loadconfig(&cfg);
}

static void amx_configure(void) {
    amx_configure_rows(16);
}
#else
static int tiles_granted(void) { return 0; }   /* a build without the tiles */
#endif
#endif
