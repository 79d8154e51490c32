"""ITCoHD-MRec -- OUR RECONSTRUCTION, not the original model.

Paper: "ITCoHD-MRec" (Hao et al., ACM TOIS 44(1), DOI 10.1145/3767337).  No code is public and the paper
text was not available to us; this file implements the labelled reconstruction of BASELINES.md section
13, built from what is known of the method: (a) topology-based pruning of noisy links, (b) generative
diffusion over a hypergraph, (c) independent visual / textual / collaborative branches, (d) a modal
contrastive objective.  Every design choice below is ours; results are "re-implementation
(reconstructed, no paper access)" and must never be presented as the original's numbers.

Notation: U users, I items, d = ``embedding_size``, m in {v, t}, norm = row-wise L2 normalisation.

(a) Pruning: each epoch, FREEDOM's degree-sensitive edge sampling keeps (1 - prune_ratio) of the training
    edges with probability ~ 1/sqrt(d_u d_i) -> pruned SYM graph A_p and kept interactions Y_p (training);
    the full graph is used at evaluation.
(c) Collaborative branch: C = LightGCN(A_p, [E_u; E_i], n_ui_layers), mean readout.
    Modality branch m (no ID embedding): f_m = x_m P_m;  i_m = S_m f_m (KNN-SIM, knn_k);
    u_m = mean of i_m over the user's kept items;  X_m = A_p^{n_mm_layers} [u_m; i_m] (last layer).
(b) Hypergraph per modality with H = hyper_num hyperedges (LGMRec-style): logits L_i = x_m W_m,
    L_u = Y L_i (full training matrix); memberships H = GumbelSoftmax(L, tau 0.2) in training,
    softmax(L / 0.2) at evaluation, then dropout (1 - keep_rate) in training;
    Lambda = H_i^T C_i,  G_i = H_i Lambda,  G_u = H_u Lambda  (n_hyper_layers times, from G_i).
    Diffusion denoiser per modality (DiffRec, linear-var schedule, T steps) on x_0 = norm(G_u):
        v_t = noise_scale * linspace(noise_min, noise_max, T),  abar_t = 1 - v_t,
        beta_1 = v_1,  beta_t = min(1 - abar_t / abar_{t-1}, 0.999),  alpha_t = 1 - beta_t,
        x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps                                  (forward)
        x <- c1_t f(x, t) + c2_t x for t = T..1, starting at x = x_0                  (denoising)
        c1_t = beta_t sqrt(abar_{t-1}) / (1 - abar_t),  c2_t = (1 - abar_{t-1}) sqrt(alpha_t) / (1 - abar_t)
    -> Gd_u (denoised hypergraph user embeddings).
Fusion:  Z_u = C_u + norm(X_v,u) + norm(X_t,u) + alpha norm(Gd_u,v + Gd_u,t)
         Z_i = C_i + norm(X_v,i) + norm(X_t,i) + alpha norm(G_i,v + G_i,t);       y_ui = <Z_u, Z_i>
Loss:    BPR-mean + reg_weight HalfSq + mc_weight L_mc + diff_weight (L_diff,v + L_diff,t), with
(d) L_mc = InfoNCE(X_v,u, X_t,u) + InfoNCE(X_v,i, X_t,i) + InfoNCE(Gd_u,v, Gd_u,t) + InfoNCE(G_i,v, G_i,t)
    over the batch rows (temperature 0.2), and L_diff,m = mean_b mean_dims (f(x_t, t) - x_0)^2 with
    t ~ U{1..T}, x_0 detached.
"""
from __future__ import annotations

import math

import numpy as np
import scipy.sparse as sp
import torch
import torch.nn.functional as F
from torch import nn

from mmrec import graph
from mmrec.layers import xavier_tables
from mmrec.losses import dot_bpr, half_sq, info_nce
from mmrec.recommender import GeneralRecommender


def linear_var_schedule(steps: int, noise_scale: float, noise_min: float, noise_max: float,
                        max_beta: float = 0.999) -> dict[str, torch.Tensor]:
    """DiffRec's "linear-var" schedule and the posterior coefficients of the denoising step.

    Returns float64 tensors indexed 0..T-1 for t = 1..T: beta, alpha, abar, abar_prev (abar_0 = 1),
    c1 (coefficient of the x_0 prediction) and c2 (coefficient of x_t)."""
    variance = noise_scale * np.linspace(noise_min, noise_max, steps, dtype=np.float64)
    abar_target = 1.0 - variance
    beta = np.empty(steps)
    beta[0] = 1.0 - abar_target[0]
    beta[1:] = np.minimum(1.0 - abar_target[1:] / abar_target[:-1], max_beta)
    alpha = 1.0 - beta
    abar = np.cumprod(alpha)
    abar_prev = np.concatenate([[1.0], abar[:-1]])
    c1 = beta * np.sqrt(abar_prev) / (1.0 - abar)
    c2 = (1.0 - abar_prev) * np.sqrt(alpha) / (1.0 - abar)
    return {k: torch.from_numpy(v) for k, v in
            dict(beta=beta, alpha=alpha, abar=abar, abar_prev=abar_prev, c1=c1, c2=c2).items()}


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding [cos(t w_k), sin(t w_k)], w_k = max_period^(-k / (dim/2))."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float().unsqueeze(1) * freqs.unsqueeze(0)
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


class Denoiser(nn.Module):
    """f(x, t): [x, Linear(temb(t))] -> Linear(d + e, hidden) -> tanh -> Linear(hidden, d) (DiffRec DNN);
    Xavier-normal weights, biases N(0, 0.001^2)."""

    def __init__(self, dim: int, hidden: int = 256, time_dim: int = 10):
        super().__init__()
        self.time_dim = time_dim
        self.time_layer = nn.Linear(time_dim, time_dim)
        self.hidden = nn.Linear(dim + time_dim, hidden)
        self.out = nn.Linear(hidden, dim)
        for layer in (self.time_layer, self.hidden, self.out):
            nn.init.xavier_normal_(layer.weight)
            nn.init.normal_(layer.bias, 0.0, 0.001)

    def forward(self, x: torch.Tensor, t_index: torch.Tensor) -> torch.Tensor:
        """x [B, d]; t_index [B] the 0-based step index (t - 1), DiffRec's convention."""
        temb = self.time_layer(timestep_embedding(t_index, self.time_dim))
        return self.out(torch.tanh(self.hidden(torch.cat([x, temb], dim=-1))))


def norm(x: torch.Tensor) -> torch.Tensor:
    return F.normalize(x, dim=-1)


class ITCoHDMRec(GeneralRecommender):
    """ITCoHD-MRec, reconstructed (no code or paper text available; see the module docstring)."""
    needs_both_modalities = True  # image and text features, checked before any data is loaded

    def __init__(self, config, dataset):
        super().__init__(config, dataset)
        d = self.embedding_size
        self.n_ui_layers = int(config["n_ui_layers"])
        self.n_mm_layers = int(config["n_mm_layers"])
        self.n_hyper_layers = int(config["n_hyper_layers"])
        self.hyper_num = int(config["hyper_num"])
        self.keep_rate = float(config["keep_rate"])
        self.hyper_temperature = float(config["hyper_temperature"])
        self.alpha = float(config["alpha"])
        self.prune_ratio = float(config["prune_ratio"])
        self.reg_weight = float(config["reg_weight"])
        self.mc_weight = float(config["mc_weight"])
        self.diff_weight = float(config["diff_weight"])
        self.cl_temperature = float(config["cl_temperature"])
        self.batch_size = int(config["train_batch_size"])
        self.steps = int(config["diff_steps"])

        self.user_embedding, self.item_embedding = xavier_tables(self.n_users, self.n_items, dim=d)
        self.proj = nn.ModuleDict({m: nn.Linear(f.shape[1], d, bias=False)
                                   for m, f in (("v", self.v_feat), ("t", self.t_feat))})
        self.hyper = nn.ParameterDict({m: nn.Parameter(torch.empty(f.shape[1], self.hyper_num))
                                       for m, f in (("v", self.v_feat), ("t", self.t_feat))})
        for m in ("v", "t"):
            nn.init.xavier_uniform_(self.proj[m].weight)
            nn.init.xavier_uniform_(self.hyper[m])
        self.denoiser = nn.ModuleDict({m: Denoiser(d, int(config["denoiser_hidden"]), int(config["time_dim"]))
                                       for m in ("v", "t")})
        schedule = linear_var_schedule(self.steps, float(config["noise_scale"]), float(config["noise_min"]),
                                       float(config["noise_max"]))
        for k in ("abar", "c1", "c2"):
            self.register_buffer(f"sched_{k}", schedule[k].float().to(self.device), persistent=False)

        knn_k = int(config["knn_k"])
        self.item_graph = {m: self.item_knn(m, knn_k, "sim") for m in ("v", "t")}
        self.full_adj = self.norm_adj("sym_eps")
        self.full_user_mean = graph.to_torch_sparse(self._row_mean(self.train_matrix), self.device)
        self.train_sum = graph.to_torch_sparse(sp.csr_matrix(self.train_matrix, dtype=np.float32), self.device)
        self.edge_users, self.edge_items = self.train_edges()
        self.pruned_adj: torch.Tensor | None = None
        self.pruned_user_mean: torch.Tensor | None = None

    # -- (a) pruning -----------------------------------------------------------------------------
    @staticmethod
    def _row_mean(matrix: sp.spmatrix) -> sp.csr_matrix:
        """Row-normalised interactions (mean over the user's items; empty rows stay zero)."""
        m = sp.csr_matrix(matrix, dtype=np.float32)
        deg = np.asarray(m.sum(axis=1)).ravel()
        inv = np.divide(1.0, deg, out=np.zeros_like(deg), where=deg > 0)
        return sp.csr_matrix(sp.diags(inv) @ m, dtype=np.float32)

    def resample_pruned_graph(self) -> None:
        """A_p by degree-sensitive pruning, and Y_p's row-mean operator from A_p's user->item edges."""
        adj = graph.degree_sensitive_prune(self.edge_users, self.edge_items, self.n_users, self.n_items,
                                           self.prune_ratio).to(self.device)
        self.pruned_adj = adj
        rows, cols = adj.indices()
        keep = rows < self.n_users
        users, items = rows[keep], cols[keep] - self.n_users
        deg = torch.bincount(users, minlength=self.n_users).float()
        self.pruned_user_mean = graph.sparse_from_edges(users, items, 1.0 / deg[users],
                                                        (self.n_users, self.n_items), self.device)

    def pre_epoch_processing(self) -> None:
        self.resample_pruned_graph()

    def _graphs(self) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.training:
            return self.full_adj, self.full_user_mean
        if self.pruned_adj is None:
            self.resample_pruned_graph()
        return self.pruned_adj, self.pruned_user_mean

    # -- (b) hypergraph and diffusion --------------------------------------------------------------
    def memberships(self, m: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(H_u [U, H], H_i [I, H]): soft Gumbel-softmax (training) or softmax (evaluation) of the logits
        L_i = x_m W_m and L_u = Y L_i, at temperature tau; dropout (1 - keep_rate) in training."""
        feats = self.v_feat if m == "v" else self.t_feat
        logits_i = feats @ self.hyper[m]
        logits_u = graph.spmm(self.train_sum, logits_i)
        out = []
        for logits in (logits_u, logits_i):
            if self.training:
                h = F.gumbel_softmax(logits, tau=self.hyper_temperature, hard=False, dim=-1)
                h = F.dropout(h, 1.0 - self.keep_rate, training=True)
            else:
                h = torch.softmax(logits / self.hyper_temperature, dim=-1)
            out.append(h)
        return out[0], out[1]

    def hypergraph(self, m: str, collab_items: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(G_u, G_i): Lambda = H_i^T G_i^(l-1) (G_i^(0) = C_i), G_i = H_i Lambda, G_u = H_u Lambda."""
        h_u, h_i = self.memberships(m)
        g_i = collab_items
        for _ in range(self.n_hyper_layers):
            lam = h_i.T @ g_i  # [H, d]
            g_i = h_i @ lam
        return h_u @ lam, g_i

    def denoise(self, m: str, x0: torch.Tensor) -> torch.Tensor:
        """DiffRec inference without sampling noise: x = x_0, then x = c1_t f(x, t) + c2_t x, t = T..1."""
        x = x0
        for t in range(self.steps - 1, -1, -1):
            idx = torch.full((x.shape[0],), t, dtype=torch.long, device=x.device)
            x = self.sched_c1[t] * self.denoiser[m](x, idx) + self.sched_c2[t] * x
        return x

    def diffusion_loss(self, m: str, x0: torch.Tensor) -> torch.Tensor:
        """mean_b mean_dims (f(x_t, t) - x_0)^2, t ~ U{1..T}, x_0 detached (trains the denoiser only)."""
        x0 = x0.detach()
        t = torch.randint(self.steps, (x0.shape[0],), device=x0.device)
        abar = self.sched_abar[t].unsqueeze(1)
        xt = abar.sqrt() * x0 + (1.0 - abar).sqrt() * torch.randn_like(x0)
        return (self.denoiser[m](xt, t) - x0).pow(2).mean()

    # -- forward -----------------------------------------------------------------------------------
    def forward(self) -> dict[str, torch.Tensor]:
        adj, user_mean = self._graphs()
        nu = self.n_users
        collab = graph.propagate(adj, torch.cat([self.user_embedding.weight, self.item_embedding.weight]),
                                 self.n_ui_layers)
        out = {"collab": collab}
        for m, feats in (("v", self.v_feat), ("t", self.t_feat)):
            items = graph.spmm(self.item_graph[m], self.proj[m](feats))      # i_m = S_m f_m
            users = graph.spmm(user_mean, items)                              # mean over kept items
            out[f"x_{m}"] = graph.propagate(adj, torch.cat([users, items]), self.n_mm_layers, "last")
            g_u, g_i = self.hypergraph(m, collab[nu:])
            out[f"g0_{m}"] = norm(g_u)                                             # x_0 of the diffusion
            out[f"gd_{m}"] = self.denoise(m, out[f"g0_{m}"])
            out[f"gi_{m}"] = g_i
        z_u = (collab[:nu] + norm(out["x_v"][:nu]) + norm(out["x_t"][:nu])
               + self.alpha * norm(out["gd_v"] + out["gd_t"]))
        z_i = (collab[nu:] + norm(out["x_v"][nu:]) + norm(out["x_t"][nu:])
               + self.alpha * norm(out["gi_v"] + out["gi_t"]))
        out["z_u"], out["z_i"] = z_u, z_i
        return out

    def calculate_loss(self, interaction: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        users, pos, neg = interaction["users"], interaction["pos_items"], interaction["neg_items"]
        out = self.forward()
        u, p, n = out["z_u"][users], out["z_i"][pos], out["z_i"][neg]
        bpr = dot_bpr(u, p, n, "mean")
        reg = self.reg_weight * half_sq(u, p, n, batch_size=self.batch_size)
        nu, tau = self.n_users, self.cl_temperature
        mc = (info_nce(out["x_v"][:nu][users], out["x_t"][:nu][users], tau)
              + info_nce(out["x_v"][nu:][pos], out["x_t"][nu:][pos], tau)
              + info_nce(out["gd_v"][users], out["gd_t"][users], tau)
              + info_nce(out["gi_v"][pos], out["gi_t"][pos], tau))
        diff = self.diffusion_loss("v", out["g0_v"][users]) + self.diffusion_loss("t", out["g0_t"][users])
        return {"bpr": bpr, "reg": reg, "mc": self.mc_weight * mc, "diff": self.diff_weight * diff}

    def full_sort_predict(self, interaction: dict[str, torch.Tensor]) -> torch.Tensor:
        out = self.cached("forward", self.forward)
        return out["z_u"][interaction["users"]] @ out["z_i"].T
