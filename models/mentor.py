"""MENTOR: Multi-level Self-supervised Learning for Multimodal Recommendation
(Xu et al., AAAI 2025).  Reference: ``Jinfeng-Xu/MENTOR`` ``src/models/mentor.py``.

Per-modality graph module m (separate parameters each; Sec. 3.2): a free user preference table
``P_m`` (U x 64, Xavier-normal) and an item MLP ``f_m = W2 LeakyReLU(W1 x_m)`` (raw -> 256 -> 64) on
the *frozen* raw features; with ``A_hat = D^-1/2 A D^-1/2`` the train bipartite graph (no self loops):

    x = rownorm([P_m; f_m]),   h1 = A_hat x,   h2 = A_hat h1,   H_m = x + h1 + h2

Modules: visual (x_v), textual (x_t), ID (input: a learnable item table, I x 64) and, for the
graph-perturbation views, two more visual and two more textual modules whose h1 and h2 receive SimGCL
noise (h <- h + sign(h) * rownorm(U[0,1)) * 0.1; the perturbed h1 is also what is propagated).

Fusion (128-d, Sec. 3.3), with a free per-user weight pair ``w_u`` (softmax of Xavier-normal values at
initialisation) and ``S = 0.1 S_v + 0.9 S_t`` the KNN-BIN item graph (k = 10, one layer):

    Z_u = [w_u1 H_v,u ; w_u2 H_t,u],   Z_i = [H_v,i ; H_t,i] + S^L [H_v,i ; H_t,i],   y_ui = <Z_u, Z_i>

and likewise guide = [H_id; H_id], V = [H_v; H_v], T = [H_t; H_t] (no user weights), noisy views
N1, N2 as Z from the perturbed modules.

Loss: BPR-log2(Z) + reg_weight * (mean(P_v[u]^2) + mean(P_t[u]^2) + mean(w^2))
+ align_weight * sum over the 6 pairs of {Z, guide, V, T} of (|var a - var b| + |mean a - mean b|)
+ mask_weight_g * [NCE(N1_users, N2_users; temp) + NCE(N1_items, N2_items; temp)] over *all* users and
items (exact, in row blocks: no U x U matrix is held at once)
+ mask_weight_f * [2 - cos(dropout(Z_u), MLP(Z_u)) - cos(dropout(Z_i), MLP(Z_i))], which the reference
computes entirely under no-grad: it is logged but gives no gradient (``dropout`` and ``mask_weight_f``
therefore have no training effect).

Reference quirks (BASELINES.md section 11; docs/baselines.md):
- ``full_sort_predict`` does not run a forward: it scores with the fused embeddings cached by the
  *last training batch* (one optimiser step stale).  Matched by default; ``predict_fresh_forward: true``
  runs a fresh (deterministic) forward per evaluation pass instead.  Before any training batch (or after
  loading a checkpoint) there is no cached batch and a fresh forward is used.
- The user-user graph sampled in ``pre_epoch_processing`` and the dropped-edge graphs built in
  ``__init__`` are never used by the reference's computation; they are not built here.  Unused modules of
  the reference (trainable copies of the raw features, their projections, an item weight table, a user
  MLP) are omitted: they receive no gradient and do not change results.
"""
from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

from mmrec.graph import spmm
from mmrec.losses import dot_bpr, info_nce_blocked, mean_var_alignment, simgcl_perturb
from mmrec.recommender import GeneralRecommender

log = logging.getLogger("mmrec." + __name__)

NOISE_EPS = 0.1  # SimGCL magnitude, hard-coded in the reference


class ModalityGCN(nn.Module):
    """H = x + A x + A (A x), x = rownorm([P; MLP(features)]); optional SimGCL noise after each step."""

    def __init__(self, n_users: int, feature_dim: int, dim: int = 64):
        super().__init__()
        self.preference = nn.Parameter(nn.init.xavier_normal_(torch.empty(n_users, dim)))  # P_m
        self.mlp_in = nn.Linear(feature_dim, 4 * dim)
        self.mlp_out = nn.Linear(4 * dim, dim)

    def forward(self, adj: torch.Tensor, features: torch.Tensor, perturbed: bool = False) -> torch.Tensor:
        items = self.mlp_out(F.leaky_relu(self.mlp_in(features)))
        x = F.normalize(torch.cat([self.preference, items], dim=0), dim=1)
        h1 = spmm(adj, x)
        if perturbed:
            h1 = simgcl_perturb(h1, NOISE_EPS)
        h2 = spmm(adj, h1)
        if perturbed:
            h2 = simgcl_perturb(h2, NOISE_EPS)
        return x + h1 + h2


# above this many InfoNCE logits per training step on a CPU, warn at the start (~1e9: seconds per step)
CPU_NCE_WARN_LOGITS = 1e9


class MENTOR(GeneralRecommender):
    """Multi-level self-supervision: modality graphs, feature masking and alignment between ID and modality
    views. Paper and equations: this module's docstring. Keys it reads (configs/model/MENTOR.yaml):
    align_weight, dropout, knn_k, mask_weight_f, mask_weight_g, mm_image_weight, n_mm_layers,
    nce_block_size, predict_fresh_forward, reg_weight, temp."""
    needs_both_modalities = True  # image and text features, checked before any data is loaded

    def __init__(self, config, dataset):
        super().__init__(config, dataset)
        d = self.embedding_size
        self.n_mm_layers = int(config["n_mm_layers"])
        self.reg_weight = float(config["reg_weight"])
        self.align_weight = float(config["align_weight"])
        self.mask_weight_g = float(config["mask_weight_g"])
        self.mask_weight_f = float(config["mask_weight_f"])
        self.dropout = float(config["dropout"])
        self.temp = float(config["temp"])
        self.nce_block_size = int(config["nce_block_size"])
        self.predict_fresh_forward = bool(config["predict_fresh_forward"])
        self._warn_all_node_nce_cost()

        self.adj = self.norm_adj("sym")  # PyG-style sum aggregation with 1/sqrt(d_i d_j), no self loops
        k, w = int(config["knn_k"]), float(config["mm_image_weight"])
        self.mm_adj = (w * self.item_knn("v", k, "bin", degree_eps=1e-7)
                       + (1.0 - w) * self.item_knn("t", k, "bin", degree_eps=1e-7)).coalesce()

        v_dim, t_dim = self.v_feat.shape[1], self.t_feat.shape[1]
        self.v_gcn = ModalityGCN(self.n_users, v_dim, d)
        self.t_gcn = ModalityGCN(self.n_users, t_dim, d)
        self.id_feat = nn.Parameter(nn.init.xavier_normal_(torch.empty(self.n_items, d)))
        self.id_gcn = ModalityGCN(self.n_users, d, d)
        self.v_gcn_n1 = ModalityGCN(self.n_users, v_dim, d)
        self.t_gcn_n1 = ModalityGCN(self.n_users, t_dim, d)
        self.v_gcn_n2 = ModalityGCN(self.n_users, v_dim, d)
        self.t_gcn_n2 = ModalityGCN(self.n_users, t_dim, d)
        # w_u: softmax over the two modalities of Xavier-normal values, then a free parameter
        self.weight_u = nn.Parameter(torch.softmax(nn.init.xavier_normal_(torch.empty(self.n_users, 2)), dim=1))
        self.mask_mlp = nn.Linear(2 * d, 2 * d)  # used only inside the no-grad mask_f term
        self._last_batch_scoring: torch.Tensor | None = None

    def _warn_all_node_nce_cost(self) -> None:
        """The graph-level InfoNCE (the reference's objective) contrasts every user with every user and every
        item with every item in each training step: U^2 + I^2 logits, exact and memory-bounded in blocks but
        not cheap.  Say so at the start when a CPU run will take minutes per step (Electronics: ~4e10)."""
        n_logits = float(self.n_users) ** 2 + float(self.n_items) ** 2
        if self.mask_weight_g > 0 and self.device.type == "cpu" and n_logits > CPU_NCE_WARN_LOGITS:
            log.warning("MENTOR: the graph-level InfoNCE scores %.2g logits per training step here (every user "
                        "against every user, every item against every item: %d users, %d items); on a CPU that "
                        "is minutes per step (docs/benchmarks.md, Electronics scale). Use a GPU, or accept "
                        "the time; mask_weight_g: 0 drops the term (no longer the reference's objective).",
                        n_logits, self.n_users, self.n_items)

    # -- forward --------------------------------------------------------------------------------
    def _item_graph(self, items: torch.Tensor) -> torch.Tensor:
        """items + S^L items (the residual item-graph layer of every 128-d item representation)."""
        h = items
        for _ in range(self.n_mm_layers):
            h = spmm(self.mm_adj, h)
        return items + h

    def _weighted(self, v_rep: torch.Tensor, t_rep: torch.Tensor) -> torch.Tensor:
        """[U+I, 128]: users [w_u1 v ; w_u2 t], items [v ; t] + item graph."""
        nu = self.n_users
        users = torch.cat([self.weight_u[:, :1] * v_rep[:nu], self.weight_u[:, 1:] * t_rep[:nu]], dim=1)
        items = self._item_graph(torch.cat([v_rep[nu:], t_rep[nu:]], dim=1))
        return torch.cat([users, items], dim=0)

    def _doubled(self, rep: torch.Tensor) -> torch.Tensor:
        """[U+I, 128]: [rep ; rep], items through the item graph (guide, V and T views)."""
        nu = self.n_users
        items = self._item_graph(torch.cat([rep[nu:], rep[nu:]], dim=1))
        return torch.cat([torch.cat([rep[:nu], rep[:nu]], dim=1), items], dim=0)

    def forward(self) -> dict[str, torch.Tensor]:
        v_rep = self.v_gcn(self.adj, self.v_feat)
        t_rep = self.t_gcn(self.adj, self.t_feat)
        id_rep = self.id_gcn(self.adj, self.id_feat)
        noisy1 = self._weighted(self.v_gcn_n1(self.adj, self.v_feat, True), self.t_gcn_n1(self.adj, self.t_feat, True))
        noisy2 = self._weighted(self.v_gcn_n2(self.adj, self.v_feat, True), self.t_gcn_n2(self.adj, self.t_feat, True))
        return {"fused": self._weighted(v_rep, t_rep), "guide": self._doubled(id_rep),
                "visual": self._doubled(v_rep), "text": self._doubled(t_rep), "noisy1": noisy1, "noisy2": noisy2}

    def fused_forward(self) -> torch.Tensor:
        """Z only (deterministic: no noisy modules)."""
        return self._weighted(self.v_gcn(self.adj, self.v_feat), self.t_gcn(self.adj, self.t_feat))

    # -- training ---------------------------------------------------------------------------------
    def calculate_loss(self, interaction: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        users, pos_items, neg_items = interaction["users"], interaction["pos_items"], interaction["neg_items"]
        out = self.forward()
        fused, nu = out["fused"], self.n_users
        self._last_batch_scoring = fused.detach()  # what the reference's full_sort_predict scores with
        u, p, n = fused[users], fused[nu + pos_items], fused[nu + neg_items]
        bpr = dot_bpr(u, p, n, "log2")
        reg = self.reg_weight * (self.v_gcn.preference[users].pow(2).mean()
                                 + self.t_gcn.preference[users].pow(2).mean() + self.weight_u.pow(2).mean())
        views = [out["fused"], out["guide"], out["visual"], out["text"]]
        align = sum(mean_var_alignment(views[a], views[b]) for a in range(4) for b in range(a + 1, 4))
        noisy1, noisy2 = out["noisy1"], out["noisy2"]
        mask_g = (info_nce_blocked(noisy1[:nu], noisy2[:nu], self.temp, self.nce_block_size)
                  + info_nce_blocked(noisy1[nu:], noisy2[nu:], self.temp, self.nce_block_size))
        return {"bpr": bpr, "reg": reg, "align": self.align_weight * align,
                "mask_g": self.mask_weight_g * mask_g, "mask_f": self.mask_weight_f * self._mask_f_loss(fused)}

    @torch.no_grad()
    def _mask_f_loss(self, fused: torch.Tensor) -> torch.Tensor:
        """2 - cos(dropout(Z_u), MLP(Z_u)) - cos(dropout(Z_i), MLP(Z_i)), no gradient (as the reference)."""
        total = fused.new_zeros(())
        for part in (fused[: self.n_users], fused[self.n_users:]):
            dropped = F.dropout(part, self.dropout)
            total = total + 1 - F.cosine_similarity(dropped, self.mask_mlp(part)).mean()
        return total

    def full_sort_predict(self, interaction: dict[str, torch.Tensor]) -> torch.Tensor:
        if self.predict_fresh_forward or self._last_batch_scoring is None:
            fused = self.cached("fused", self.fused_forward)
        else:
            fused = self._last_batch_scoring
        return fused[interaction["users"]] @ fused[self.n_users:].T
