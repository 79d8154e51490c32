/* Sparse (CSR, float32 values, int64 indices) times dense [n_cols, d] products for graph propagation,
 * the compiled forms of mmrec.graph's products on CPU, parallel with no two threads writing one float:
 *
 *   csr_rows_mm:   out[i] = sum_j val[j] x[col[j]]   over row r = rows[i] of A (all rows when rows == NULL):
 *                  A x, or A[rows] x without slicing A.
 *   csr_rows_t_mm: out = alpha A[rows]^T g + (diag g + extra) at the listed rows, scattering the row block's
 *                  entries: the backward of A[rows] x, again without slicing or transposing the row block.
 *   rows_add:      out[rows[i]] += diag g[i] + extra[i], in place.
 * The output row is accumulated in a local block of CHUNK floats (registers), CHUNK columns at a time.
 * The rows of x read PREFETCH_AHEAD entries later are prefetched: each entry reads one scattered row of x
 * (256 bytes at d = 64) and, without the hint, waits for memory (benchmarks/bench_kernels.py).
 * Returns 0. */
#include <stdint.h>
#include <string.h>

#define CHUNK 64
#define PREFETCH_AHEAD 8

static inline void prefetch_floats(const float *p, int64_t w) {  /* the cache lines of p[0 .. w), to read */
    for (int64_t b = 0; b < w * (int64_t)sizeof(float); b += 64) __builtin_prefetch((const char *)p + b, 0);
}

static inline void prefetch_to_write(float *p, int64_t w) {  /* the cache lines of p[0 .. w), to update */
    for (int64_t b = 0; b < w * (int64_t)sizeof(float); b += 64) __builtin_prefetch((char *)p + b, 1);
}

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
        /* the entries ahead: the rest of this row, then the next rows' (all rows: they follow in memory;
         * listed rows: the start of the next one) */
        const int64_t end = crow[r + 1], last = rows ? end : crow[n_out];
        const int64_t next = (rows && i + 1 < n_out) ? crow[rows[i + 1]] : -1;
        const int64_t next_end = next >= 0 ? crow[rows[i + 1] + 1] : -1;
        for (int64_t q0 = 0; q0 < d; q0 += CHUNK) {
            const int64_t w = d - q0 < CHUNK ? d - q0 : CHUNK;
            float acc[CHUNK] = {0};
            for (int64_t j = crow[r]; j < end; ++j) {
                const int64_t k = j + PREFETCH_AHEAD, k_next = next + (k - end);
                if (k < last) prefetch_floats(x + col[k] * d + q0, w);
                else if (next >= 0 && k_next < next_end) prefetch_floats(x + col[k_next] * d + q0, w);
                axpy(acc, val[j], x + col[j] * d + q0, w);
            }
            memcpy(out + i * d + q0, acc, (size_t)w * sizeof(float));
        }
    }
    return 0;
}

/* Column slices for the kernels that scatter (several input rows may update one output row): threads split
 * the d columns, in slices of at least 16 floats (one cache line), so no two threads write the same float. */
static inline int64_t column_slices(int64_t d, int64_t n_threads, int64_t *width) {
    int64_t n = d / 16 < n_threads ? d / 16 : n_threads;
    if (n < 1) n = 1;
    *width = ((d + n - 1) / n + 15) / 16 * 16;
    return n;
}

/* out[rows[i], lo:hi] += diag g[i, lo:hi] (+ extra[i, lo:hi] when extra != NULL) */
static void rows_axpy_slice(float *restrict out, int64_t d, const int64_t *restrict rows, int64_t n_rows,
                            const float *restrict g, float diag, const float *restrict extra, int64_t lo, int64_t hi) {
    for (int64_t i = 0; i < n_rows; ++i) {
        float *restrict o = out + rows[i] * d;
        const float *restrict gi = g + i * d;
        if (diag != 0.0f)
            for (int64_t q = lo; q < hi; ++q) o[q] += diag * gi[q];
        if (extra)
            for (int64_t q = lo; q < hi; ++q) o[q] += extra[i * d + q];
    }
}

/* out = alpha A[rows]^T g + S^T (diag g + extra), [n_out, d] with n_out = A's columns and S the selection of
 * the listed rows (S^T h adds h[i] to output row rows[i]); extra may be NULL.  Each listed row's entries of A
 * are scattered into the output rows they name (only the row block's entries are read: a third of A for a
 * LightGCN batch).  Rows may repeat.  The S^T term is a propagation's readout share at the same rows, added
 * here instead of in a separate pass over the output. */
int csr_rows_t_mm(const int64_t *restrict crow, const int64_t *restrict col, const float *restrict val,
                  const float *restrict g, int64_t d, const int64_t *restrict rows, int64_t n_rows,
                  int64_t n_out, double alpha, double diag, const float *restrict extra, float *restrict out,
                  int64_t n_threads) {
    int64_t width;
    const int64_t n_slices = column_slices(d, n_threads, &width);
    const float a = (float)alpha;
#pragma omp parallel for schedule(static, 1) num_threads(n_slices)
    for (int64_t s = 0; s < n_slices; ++s) {
        const int64_t lo = s * width, hi = lo + width < d ? lo + width : d;
        if (lo >= hi) continue;
        for (int64_t c = 0; c < n_out; ++c) memset(out + c * d + lo, 0, (size_t)(hi - lo) * sizeof(float));
        for (int64_t q0 = lo; q0 < hi; q0 += CHUNK) {
            const int64_t w = hi - q0 < CHUNK ? hi - q0 : CHUNK;
            for (int64_t i = 0; i < n_rows; ++i) {
                const int64_t r = rows[i], end = crow[r + 1];
                const int64_t next = i + 1 < n_rows ? crow[rows[i + 1]] : -1;
                const int64_t next_end = next >= 0 ? crow[rows[i + 1] + 1] : -1;
                const float *restrict gi = g + i * d + q0;
                for (int64_t j = crow[r]; j < end; ++j) {
                    const int64_t k = j + PREFETCH_AHEAD, k_next = next + (k - end);
                    if (k < end) prefetch_to_write(out + col[k] * d + q0, w);
                    else if (next >= 0 && k_next < next_end) prefetch_to_write(out + col[k_next] * d + q0, w);
                    axpy(out + col[j] * d + q0, a * val[j], gi, w);
                }
            }
        }
        rows_axpy_slice(out, d, rows, n_rows, g, (float)diag, extra, lo, hi);
    }
    return 0;
}

/* out[rows[i]] += diag g[i] + extra[i] in place (extra may be NULL; rows may repeat): a readout share added at
 * a batch's rows of a [nodes, d] gradient. */
int rows_add(float *restrict out, int64_t d, const int64_t *restrict rows, int64_t n_rows,
             const float *restrict g, double diag, const float *restrict extra, int64_t n_threads) {
    int64_t width;
    const int64_t n_slices = column_slices(d, n_threads, &width);
#pragma omp parallel for schedule(static, 1) num_threads(n_slices)
    for (int64_t s = 0; s < n_slices; ++s) {
        const int64_t lo = s * width, hi = lo + width < d ? lo + width : d;
        if (lo < hi) rows_axpy_slice(out, d, rows, n_rows, g, (float)diag, extra, lo, hi);
    }
    return 0;
}
