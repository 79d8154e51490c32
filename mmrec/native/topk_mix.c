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
 * so the compiler vectorises every step: the k-th largest logit of each pair by a running top-k (one
 * max/min exchange per slot and expert), then one pass that keeps l_e >= that threshold and mixes.  A pair
 * where ties at the threshold keep more than k experts, or whose weights underflowed, is redone exactly:
 * k rounds of "the largest not yet kept, the lower index first", weights exp(l_e - max l). */
#include <math.h>
#include <float.h>
#include <stdint.h>

#define TILE 128
#define MAX_EXPERTS 32

/* One pair done exactly: logit_col[e * stride] and y_col[e * y_stride] for e < n_exp. */
static float exact_pair(const float *logit_col, int64_t stride, const float *y_col, int64_t y_stride,
                        int64_t n_exp, int64_t k) {
    int kept[MAX_EXPERTS] = {0};
    float top = -INFINITY;
    for (int64_t j = 0; j < k; ++j) {
        int64_t best_at = -1;
        for (int64_t e = 0; e < n_exp; ++e)
            if (!kept[e] && (best_at < 0 || logit_col[e * stride] > logit_col[best_at * stride])) best_at = e;
        kept[best_at] = 1;
        if (logit_col[best_at * stride] > top) top = logit_col[best_at * stride];
    }
    float s = 0.0f, w_sum = 0.0f;
    for (int64_t e = 0; e < n_exp; ++e)
        if (kept[e]) {
            const float w = expf(logit_col[e * stride] - top);
            s += w * y_col[e * y_stride];
            w_sum += w;
        }
    return s / w_sum;
}

int topk_mix(const float *y, const float *a, const float *b, const float *ea, const float *eb, float *out,
             int64_t n_users, int64_t n_items, int64_t n_exp, int64_t k, int64_t n_threads) {
    if (n_exp > MAX_EXPERTS || k < 1 || k > n_exp) return 1;
#pragma omp parallel for schedule(static) num_threads(n_threads)
    for (int64_t u = 0; u < n_users; ++u) {
        float logit[MAX_EXPERTS][TILE], top[MAX_EXPERTS][TILE];
        float carry[TILE], num[TILE], den[TILE], count[TILE];
        for (int64_t i0 = 0; i0 < n_items; i0 += TILE) {
            const int64_t n = n_items - i0 < TILE ? n_items - i0 : TILE;
            for (int64_t j = 0; j < k; ++j)
                for (int64_t t = 0; t < n; ++t) top[j][t] = -INFINITY;
            for (int64_t e = 0; e < n_exp; ++e) {  /* running top-k: top[0] >= top[1] >= ... >= top[k-1] */
                const float ae = a[e * n_users + u];
                const float *be = b + e * n_items + i0;
                for (int64_t t = 0; t < n; ++t) carry[t] = logit[e][t] = ae + be[t];
                for (int64_t j = 0; j < k; ++j)
                    for (int64_t t = 0; t < n; ++t) {  /* branch-free, so it vectorises across items */
                        const float held = top[j][t], x = carry[t];
                        top[j][t] = x > held ? x : held;
                        carry[t] = x > held ? held : x;
                    }
            }
            const float *threshold = top[k - 1];
            for (int64_t t = 0; t < n; ++t) num[t] = den[t] = count[t] = 0.0f;
            for (int64_t e = 0; e < n_exp; ++e) {
                const float eae = ea[e * n_users + u];
                const float *ebe = eb + e * n_items + i0, *ye = y + (e * n_users + u) * n_items + i0;
                for (int64_t t = 0; t < n; ++t) {
                    const float keep = logit[e][t] >= threshold[t] ? 1.0f : 0.0f;
                    const float w = keep * (eae * ebe[t]);
                    num[t] += w * ye[t];
                    den[t] += w;
                    count[t] += keep;
                }
            }
            float *row = out + u * n_items + i0;
            for (int64_t t = 0; t < n; ++t)
                row[t] = count[t] == (float)k && den[t] > FLT_MIN
                             ? num[t] / den[t]
                             : exact_pair(&logit[0][t], TILE, y + u * n_items + i0 + t, n_users * n_items, n_exp, k);
        }
    }
    return 0;
}

/* The concat-MLP expert heads' scores for every user x item pair of a block (MAGNET, Eqs. 11 and 21 with
 * expert_head concat_mlp; the b2 term is added by the caller):
 *
 *   y[e, u, i] = sum_h w[e, h] * relu(hu[e, u, h] + hi_t[e, h, i])
 *
 * hu [E, U, H] = x_u W1_user + b1, hi_t [E, H, I] = (x_i W1_item) transposed, w [E, H] = W2_e v.  The inner
 * loop runs across items (hi_t is item-contiguous), so each accumulator is independent and vectorises
 * without reassociating a sum; the [U, I, E, H] hidden layer is never stored. */
int relu_head_scores(const float *hu, const float *hi_t, const float *w, float *y, int64_t n_exp,
                     int64_t n_users, int64_t n_items, int64_t n_hidden, int64_t n_threads) {
#pragma omp parallel for collapse(2) schedule(static) num_threads(n_threads)
    for (int64_t e = 0; e < n_exp; ++e)
        for (int64_t u = 0; u < n_users; ++u) {
            const float *a = hu + (e * n_users + u) * n_hidden, *we = w + e * n_hidden;
            float *row = y + (e * n_users + u) * n_items;
            for (int64_t i0 = 0; i0 < n_items; i0 += TILE) {
                const int64_t n = n_items - i0 < TILE ? n_items - i0 : TILE;
                float acc[TILE];
                for (int64_t t = 0; t < n; ++t) acc[t] = 0.0f;
                for (int64_t h = 0; h < n_hidden; ++h) {
                    const float ah = a[h], wh = we[h];
                    const float *b = hi_t + (e * n_hidden + h) * n_items + i0;
                    for (int64_t t = 0; t < n; ++t) {
                        const float s = ah + b[t];
                        acc[t] += wh * (s > 0.0f ? s : 0.0f);
                    }
                }
                for (int64_t t = 0; t < n; ++t) row[i0 + t] = acc[t];
            }
        }
    return 0;
}
