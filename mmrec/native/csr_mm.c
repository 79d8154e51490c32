/* Sparse (CSR, float32 values, int64 indices) times dense [n_cols, d] products for graph propagation,
 * the compiled forms of mmrec.graph's products on CPU, parallel over output rows (no write conflicts):
 *
 *   csr_rows_mm:   out[i] = sum_j val[j] x[col[j]]   over row r = rows[i] of A (all rows when rows == NULL):
 *                  A x, or A[rows] x without slicing A.
 *   csr_masked_mm: out[c] = sum_j val[j] g[pos[col[j]]] over row c of A^T, skipping pos[.] < 0:
 *                  A[rows]^T g from A^T and pos (pos[r] = i where rows[i] = r, else -1), again without
 *                  slicing or transposing the row block.
 * The output row is accumulated in a local block of CHUNK floats (registers), CHUNK columns at a time.
 * Returns 0. */
#include <stdint.h>
#include <string.h>

#define CHUNK 64

static inline void axpy(float *restrict acc, float v, const float *restrict x, int64_t w) {  /* acc += v x */
    if (w == CHUNK)
        for (int q = 0; q < CHUNK; ++q) acc[q] += v * x[q];   /* fixed length: unrolled and vectorised */
    else
        for (int64_t q = 0; q < w; ++q) acc[q] += v * x[q];
}

int csr_rows_mm(const int64_t *restrict crow, const int64_t *restrict col, const float *restrict val,
                const float *restrict x, int64_t d, const int64_t *restrict rows, int64_t n_out,
                float *restrict out, int64_t n_threads) {
#pragma omp parallel for schedule(dynamic, 64) num_threads(n_threads)
    for (int64_t i = 0; i < n_out; ++i) {
        const int64_t r = rows ? rows[i] : i;
        for (int64_t q0 = 0; q0 < d; q0 += CHUNK) {
            const int64_t w = d - q0 < CHUNK ? d - q0 : CHUNK;
            float acc[CHUNK] = {0};
            for (int64_t j = crow[r]; j < crow[r + 1]; ++j) axpy(acc, val[j], x + col[j] * d + q0, w);
            memcpy(out + i * d + q0, acc, (size_t)w * sizeof(float));
        }
    }
    return 0;
}

int csr_masked_mm(const int64_t *restrict crow, const int64_t *restrict col, const float *restrict val,
                  const float *restrict g, int64_t d, const int64_t *restrict pos, int64_t n_out,
                  float *restrict out, int64_t n_threads) {
#pragma omp parallel for schedule(dynamic, 64) num_threads(n_threads)
    for (int64_t c = 0; c < n_out; ++c) {
        for (int64_t q0 = 0; q0 < d; q0 += CHUNK) {
            const int64_t w = d - q0 < CHUNK ? d - q0 : CHUNK;
            float acc[CHUNK] = {0};
            for (int64_t j = crow[c]; j < crow[c + 1]; ++j) {
                const int64_t p = pos[col[j]];
                if (p >= 0) axpy(acc, val[j], g + p * d + q0, w);
            }
            memcpy(out + c * d + q0, acc, (size_t)w * sizeof(float));
        }
    }
    return 0;
}
