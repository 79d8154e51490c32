/* Top-K softmax mixing of expert scores for full ranking with an additive router (MAGNET, Eqs. 17-21):
 * the compiled form of models.magnet.topk_softmax_mix, fused so that every pair's logits, selection and
 * weights stay in registers and cache.  For users u < n_users (of a chunk) and items i < n_items:
 *
 *   l_e(u, i)  = a[e, u] + b[e, i]                         router logits, e < n_exp
 *   G(u, i)    = the k experts with the largest l_e         (ties: the lower expert index)
 *   out[u, i]  = sum_{e in G} w_e y[e, u, i] / sum_{e in G} w_e,   w_e = ea[e, u] * eb[e, i]
 *
 * ea = exp(a - max_e a[:, u]) and eb = exp(b - max_e b[:, i]), so w_e = exp(l_e - const(u, i)): the
 * softmax over the kept logits with no exp per pair; where those products underflow, the pair is redone
 * with exp(l_e - max l).  Items are processed in tiles of TILE with the inner loops running across items,
 * so the compiler vectorises every step (selection, weights, mixing). */
#include <math.h>
#include <float.h>
#include <stdint.h>

#define TILE 128
#define MAX_EXPERTS 32

int topk_mix(const float *y, const float *a, const float *b, const float *ea, const float *eb, float *out,
             int64_t n_users, int64_t n_items, int64_t n_exp, int64_t k, int64_t n_threads) {
    if (n_exp > MAX_EXPERTS || k < 1 || k > n_exp) return 1;
#pragma omp parallel for schedule(static) num_threads(n_threads)
    for (int64_t u = 0; u < n_users; ++u) {
        float logit[MAX_EXPERTS][TILE], kept[MAX_EXPERTS][TILE];
        float best[TILE], best_at[TILE], num[TILE], den[TILE];
        for (int64_t i0 = 0; i0 < n_items; i0 += TILE) {
            const int64_t n = n_items - i0 < TILE ? n_items - i0 : TILE;
            for (int64_t e = 0; e < n_exp; ++e) {
                const float ae = a[e * n_users + u];
                const float *be = b + e * n_items + i0;
                for (int64_t t = 0; t < n; ++t) {
                    logit[e][t] = ae + be[t];
                    kept[e][t] = 0.0f;
                }
            }
            for (int64_t j = 0; j < k; ++j) {  /* k rounds: mark the largest logit not yet kept */
                for (int64_t t = 0; t < n; ++t) {
                    best[t] = -INFINITY;
                    best_at[t] = 0.0f;
                }
                for (int64_t e = 0; e < n_exp; ++e) {
                    const float fe = (float)e;
                    for (int64_t t = 0; t < n; ++t) {  /* branch-free, so it vectorises across items */
                        const float candidate = kept[e][t] == 0.0f ? logit[e][t] : -INFINITY;
                        best_at[t] = candidate > best[t] ? fe : best_at[t];
                        best[t] = candidate > best[t] ? candidate : best[t];
                    }
                }
                for (int64_t e = 0; e < n_exp; ++e)
                    for (int64_t t = 0; t < n; ++t) kept[e][t] = best_at[t] == (float)e ? 1.0f : kept[e][t];
            }
            for (int64_t t = 0; t < n; ++t) num[t] = den[t] = 0.0f;
            for (int64_t e = 0; e < n_exp; ++e) {
                const float eae = ea[e * n_users + u];
                const float *ebe = eb + e * n_items + i0, *ye = y + (e * n_users + u) * n_items + i0;
                for (int64_t t = 0; t < n; ++t) {
                    const float w = kept[e][t] * (eae * ebe[t]);
                    num[t] += w * ye[t];
                    den[t] += w;
                }
            }
            float *row = out + u * n_items + i0;
            for (int64_t t = 0; t < n; ++t) {
                if (den[t] > FLT_MIN) {
                    row[t] = num[t] / den[t];
                } else {  /* the shifted exps underflowed: the kept logits' own softmax */
                    float top = -INFINITY, s = 0.0f, w_sum = 0.0f;
                    for (int64_t e = 0; e < n_exp; ++e)
                        if (kept[e][t] != 0.0f && logit[e][t] > top) top = logit[e][t];
                    for (int64_t e = 0; e < n_exp; ++e)
                        if (kept[e][t] != 0.0f) {
                            const float w = expf(logit[e][t] - top);
                            s += w * y[(e * n_users + u) * n_items + i0 + t];
                            w_sum += w;
                        }
                    row[t] = s / w_sum;
                }
            }
        }
    }
    return 0;
}
