/* Top-k of every row of a dense float matrix (full-ranking evaluation): the compiled form of
 * torch.topk(scores, k, dim=1).indices, in two levels per row:
 *   1. the maximum of every block of BLOCK items (one vectorised pass over the row);
 *   2. thr = the k-th largest block maximum: an item in a block whose maximum is below thr has k other
 *      items (those maxima) at least as large, so it is not among the k largest;
 *   3. the k largest items of the blocks with maximum >= thr (at least k blocks, usually exactly k) and
 *      of the short last block, kept in a sorted list; only items >= thr can enter (the k-th largest
 *      item is >= thr), so a handful per block is inserted.
 * Ties keep the lower item index first; NaN scores are never ranked (torch.topk ranks them first; a
 * model that scores NaN has diverged); a row with fewer than k other scores ends with NaN items.
 * Returns 0, or 1 when k is out of range. */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define BLOCK 32
#define LANES 8
#define MAX_K 1024

typedef struct {
    float val[MAX_K];
    int64_t *idx;   /* NULL: values only */
    int64_t k, filled;
} TopK;

static inline void push(TopK *t, float v, int64_t i) {
    int64_t p;
    if (!(v == v)) return;                                /* NaN */
    if (t->filled < t->k) p = t->filled++;
    else if (v > t->val[t->k - 1]) p = t->k - 1;          /* strictly: an equal score keeps its earlier item */
    else return;
    while (p > 0 && t->val[p - 1] < v) {
        t->val[p] = t->val[p - 1];
        if (t->idx) t->idx[p] = t->idx[p - 1];
        --p;
    }
    t->val[p] = v;
    if (t->idx) t->idx[p] = i;
}

typedef float vf __attribute__((vector_size(LANES * sizeof(float))));
typedef int32_t vi __attribute__((vector_size(LANES * sizeof(float))));

static inline float block_max(const float *x) {      /* GCC/Clang vector extensions: one SIMD max per LANES */
    vf m, v;
    for (int q = 0; q < LANES; ++q) m[q] = -__builtin_inff();
    for (int b = 0; b < BLOCK; b += LANES) {
        memcpy(&v, x + b, sizeof v);
        vi gt = v > m;                                 /* NaN never wins */
        m = (vf)(((vi)v & gt) | ((vi)m & ~gt));
    }
    float r = m[0];
    for (int q = 1; q < LANES; ++q) r = m[q] > r ? m[q] : r;
    return r;
}

int row_topk(const float *scores, int64_t n_rows, int64_t n_cols, int64_t k, int64_t *out, int64_t n_threads) {
    if (k < 1 || k > n_cols || k > MAX_K) return 1;
    const int64_t n_blocks = n_cols / BLOCK;
    int failed = 0;
#pragma omp parallel num_threads(n_threads)
    {
        float *maxima = malloc((size_t)(n_blocks > 0 ? n_blocks : 1) * sizeof(float));
        TopK *t = malloc(sizeof(TopK)), *tb = malloc(sizeof(TopK));
        if (!maxima || !t || !tb) {
#pragma omp atomic write
            failed = 1;
        } else {
#pragma omp for schedule(static)
            for (int64_t r = 0; r < n_rows; ++r) {
                const float *row = scores + r * n_cols;
                float thr = -__builtin_inff();
                for (int64_t j = 0; j < n_blocks; ++j) maxima[j] = block_max(row + j * BLOCK);
                if (n_blocks >= k) {                          /* levels 1-2 */
                    tb->idx = NULL; tb->k = k; tb->filled = 0;
                    for (int64_t j = 0; j < n_blocks; ++j) push(tb, maxima[j], j);
                    if (tb->filled == k) thr = tb->val[k - 1];
                }
                t->idx = out + r * k; t->k = k; t->filled = 0;
                for (int64_t j = 0; j < n_blocks; ++j)        /* level 3 */
                    if (maxima[j] >= thr || n_blocks < k)
                        for (int64_t i = j * BLOCK; i < (j + 1) * BLOCK; ++i)
                            if (row[i] >= thr) push(t, row[i], i);
                for (int64_t i = n_blocks * BLOCK; i < n_cols; ++i)
                    if (row[i] >= thr) push(t, row[i], i);
                if (t->filled < k) {                          /* NaN items fill what is left */
                    for (int64_t i = 0; i < n_cols && t->filled < k; ++i) {
                        if (row[i] == row[i]) continue;
                        t->val[t->filled] = -__builtin_inff();
                        t->idx[t->filled++] = i;
                    }
                }
            }
        }
        free(maxima); free(t); free(tb);
    }
    return failed ? 1 : 0;
}
