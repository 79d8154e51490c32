"""CMDL: Contrastive Modality-Disentangled Learning for Multimodal Recommendation (Lin et al., ACM TOIS
43(3), 2025, DOI 10.1145/3715876; reference code ruiliu2020/CMDL ``src/models/CMDL.py``).

Notation: U users, I items, d = ``embedding_size``, m in {v, t}, ``R`` the user-item block of the
symmetric training adjacency, ``S_m`` the KNN-SIM item graph of modality m (raw features, top-k).

Encoders (MGCN skeleton):

    C = LightGCN(A_sym, [E_u; E_i], n_ui_layers)                        collaborative "content" view
    e_m = E_i * sigmoid(W_m (P_m x_m + b) + b_m)                          behaviour purifier (x_m trainable)
    X_m = [R S_m e_m ; S_m e_m]                                           modality view of all nodes

Disentangling: S = a_v X_v + a_t X_t (scalar attention softmax over modalities, per node) is the shared
part, P_m = X_m - S the specific parts.  Fusion:

    side = w_1 g_v(C) * P_v + w_2 g_t(C) * P_t + w_3 g_s(C) * S,      Z = C + side,      y_ui = <Z_u, Z_i>
    w = softmax(max_n fc(C)_n1, max_n fc(C)_n2, max_n fc(C)_n3)          (detached: fc gets no gradient)

Main loss (one step of the encoders):

    BPR-mean(Z) + reg_weight * HalfSq(Z_u, Z_pos, Z_neg)
    + cl_loss * [InfoNCE(side_i[pos], C_i[pos], info_pos) + InfoNCE(side_u[u], C_u[u], info_neg)]
    + mi_loss * [CLUB(P_t; S) + CLUB(P_v; S) + CLUB(X_t; S, X_v) + CLUB(X_v; S, X_t)
                 - NCE(X_t; S) - NCE(X_v; S)]                            over the pos and neg rows

``CLUB(x; y)`` = mean f(y_i, x_i) - mean_{i,j} f(y_i, x_j) (an upper bound of MI, critic held fixed);
``NCE(x; y)`` = mean f(x_i, y_i) - (mean_i logsumexp_j f(x_j, y_i) - log B) (InfoNCE lower bound; its
critic learns with the encoders).  Critic f = Linear(in, 1) - ReLU - Linear(1, 1) on a concatenated pair.
A second step per batch trains only the four CLUB critics by maximising their NCE lower bound, from a
fresh forward after the main update (``critic_step``, with the model's own AdamW).

Reproduced reference quirks (each behind a flag where it is a choice): the critic pair grids are
computed exactly without materialising B x B copies (f's first layer is linear, so
f([a_i, b_j]) = w2 relu(A_i + B_j + b1) + b2); the MI terms index the (U+I)-row tensors with raw item ids
(``mi_index_quirk``: rows 0..I-1, i.e. user rows, as the reference does); the purifier gates and the
attention query are never updated (``freeze_unlisted``: they are missing from the reference's optimiser
list).  As in the reference, the main optimiser (AdamW, lr 1e-5, weight decay 0.01) is rebuilt at
every epoch start (``reset_optimizer_each_epoch``, honoured by the trainer).  Deviations from the
reference are listed in docs/baselines.md.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from mmrec import graph
from mmrec.layers import BehaviourPurifier, ScalarAttentionFuser, SigmoidGate, xavier_tables
from mmrec.losses import dot_bpr, half_sq, side_content_nce
from mmrec.recommender import GeneralRecommender


class PairCritic(nn.Module):
    """Concatenation critic f([a, b]) = W2 relu(W1 [a; b] + b1) + b2 (nn.Linear default init)."""

    def __init__(self, dim_a: int, dim_b: int, hidden: int = 1):
        super().__init__()
        self.dim_a = dim_a
        self.first = nn.Linear(dim_a + dim_b, hidden)
        self.second = nn.Linear(hidden, 1)

    def matched(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """f([a_i, b_i]) -> [B]."""
        return self.second(F.relu(self.first(torch.cat([a, b], dim=-1)))).squeeze(-1)

    def grid(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """G[i, j] = f([a_i, b_j]) -> [B, B], without materialising the B x B concatenations."""
        w_a, w_b = self.first.weight[:, : self.dim_a], self.first.weight[:, self.dim_a:]
        pre = (a @ w_a.T).unsqueeze(1) + (b @ w_b.T).unsqueeze(0) + self.first.bias  # [B, B, hidden]
        return self.second(F.relu(pre)).squeeze(-1)


def nce_lower_bound(matched: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    """mean_i T(i,i) - (mean_i logsumexp_j T(i,j) - log B); ``grid`` rows i are the anchors."""
    return matched.mean() - (torch.logsumexp(grid, dim=1).mean() - math.log(grid.shape[0]))


def infonce_critic_loss(critic: PairCritic, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """-NCE(x; y) with pairs [x, y]: for anchor y_i the candidates are [x_j, y_i] (reference InfoNCECritic)."""
    return -nce_lower_bound(critic.matched(x, y), critic.grid(x, y).T)


def club_upper_bound(critic: PairCritic, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """CLUB(x; y) = mean f([y_i, x_i]) - mean_{i,j} f([y_i, x_j]) (reference CLUBInfoNCECritic.forward)."""
    return critic.matched(y, x).mean() - critic.grid(y, x).mean()


def club_learning_loss(critic: PairCritic, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """-NCE with pairs [y, x] (reference CLUBInfoNCECritic.learning_loss): trains the CLUB critic."""
    return -nce_lower_bound(critic.matched(y, x), critic.grid(y, x))


class CMDL(GeneralRecommender):
    """Disentangles each modality into shared and specific parts with mutual-information and contrastive
    terms over a LightGCN backbone. Paper and equations: this module's docstring. Keys it reads
    (configs/model/CMDL.yaml): cl_loss, critic_hidden, critic_weight_decay, freeze_unlisted, info_neg,
    info_pos, knn_k, learning_rate, mi_index_quirk, mi_loss, n_ui_layers, reg_weight, train_batch_size,
    train_raw_features."""
    needs_both_modalities = True  # image and text features, checked before any data is loaded
    reset_optimizer_each_epoch = True  # the reference's trainer builds fresh AdamW optimisers every epoch

    def __init__(self, config, dataset):
        super().__init__(config, dataset)
        d = self.embedding_size
        self.n_ui_layers = int(config["n_ui_layers"])
        self.knn_k = int(config["knn_k"])
        self.reg_weight = float(config["reg_weight"])
        self.cl_loss = float(config["cl_loss"])
        self.mi_loss = float(config["mi_loss"])
        self.info_pos, self.info_neg = float(config["info_pos"]), float(config["info_neg"])
        self.batch_size = int(config["train_batch_size"])
        self.critic_lr = float(config["learning_rate"])
        self.critic_weight_decay = float(config["critic_weight_decay"])
        self.mi_index_quirk = bool(config["mi_index_quirk"])

        self.user_embedding, self.item_embedding = xavier_tables(self.n_users, self.n_items, dim=d)
        train_raw = bool(config["train_raw_features"])
        self.v_raw = nn.Parameter(self.v_feat.clone(), requires_grad=train_raw)
        self.t_raw = nn.Parameter(self.t_feat.clone(), requires_grad=train_raw)

        self.adj = self.norm_adj("sym")
        self.R = graph.to_torch_sparse(graph.user_item_block(graph.norm_adjacency(self.train_matrix, "sym"),
                                                             self.n_users), self.device)
        self.v_graph = self.item_knn("v", self.knn_k, "sim")
        self.t_graph = self.item_knn("t", self.knn_k, "sim")

        self.image_proj = nn.Linear(self.v_feat.shape[1], d)
        self.text_proj = nn.Linear(self.t_feat.shape[1], d)
        self.v_purifier = BehaviourPurifier(d)
        self.t_purifier = BehaviourPurifier(d)
        self.fuser = ScalarAttentionFuser(d)
        self.v_prefer, self.t_prefer, self.s_prefer = SigmoidGate(d), SigmoidGate(d), SigmoidGate(d)
        self.fc = nn.Sequential(nn.Linear(d, d), nn.Tanh(), nn.Linear(d, 3, bias=False))
        if bool(config["freeze_unlisted"]):  # absent from the reference's optimiser lists
            for module in (self.v_purifier, self.t_purifier, self.fuser):
                module.requires_grad_(False)

        hidden = int(config["critic_hidden"])
        # CLUB critics: f([y, x]); x = specific / conditional pair, y = shared / other modality
        self.club_t_s = PairCritic(d, d, hidden)          # I(P_t; S)
        self.club_v_s = PairCritic(d, d, hidden)          # I(P_v; S)
        self.club_t_sv = PairCritic(d, 2 * d, hidden)     # I(X_t; S, X_v)
        self.club_v_st = PairCritic(d, 2 * d, hidden)     # I(X_v; S, X_t)
        # InfoNCE critics: f([x, y]), trained with the encoders
        self.nce_t_s = PairCritic(d, d, hidden)           # I(X_t; S)
        self.nce_v_s = PairCritic(d, d, hidden)           # I(X_v; S)
        # the CLUB critics are trained only by critic_step, never by the harness's optimiser
        self.club_critics = [self.club_t_s, self.club_v_s, self.club_t_sv, self.club_v_st]
        for critic in self.club_critics:
            critic.requires_grad_(False)
        self._critic_optimizer: torch.optim.Optimizer | None = None
        self._pending_critic_batch: dict | None = None
        self._last_weights: torch.Tensor | None = None

    # ------------------------------------------------------------------------------------------
    def forward(self) -> dict[str, torch.Tensor]:
        item_id = self.item_embedding.weight
        content = graph.propagate(self.adj, torch.cat([self.user_embedding.weight, item_id]), self.n_ui_layers)
        views = {}
        for m, raw, proj, purifier, item_graph in (("v", self.v_raw, self.image_proj, self.v_purifier, self.v_graph),
                                                  ("t", self.t_raw, self.text_proj, self.t_purifier, self.t_graph)):
            items = graph.spmm(item_graph, purifier(item_id, proj(raw)))   # S_m e_m
            views[m] = torch.cat([graph.spmm(self.R, items), items])         # X_m = [R S_m e_m; S_m e_m]
        shared, _ = self.fuser([views["v"], views["t"]])                         # S
        spec_v, spec_t = views["v"] - shared, views["t"] - shared                # P_v, P_t
        w = torch.softmax(self.fc(content).max(dim=0).values.detach(), dim=0)   # global weights, no gradient
        side = (w[0] * self.v_prefer(content) * spec_v + w[1] * self.t_prefer(content) * spec_t
                + w[2] * self.s_prefer(content) * shared)
        return {"z": content + side, "content": content, "side": side, "x_v": views["v"], "x_t": views["t"],
                "shared": shared, "spec_v": spec_v, "spec_t": spec_t, "weights": w}

    def _mi_rows(self, items: torch.Tensor) -> torch.Tensor:
        """Rows of the (U+I)-row tensors used for the MI terms of a batch's items."""
        return items if self.mi_index_quirk else items + self.n_users

    def mi_upper_terms(self, out: dict, rows: torch.Tensor) -> torch.Tensor:
        """CLUB(P_t;S) + CLUB(P_v;S) + CLUB(X_t;S,X_v) + CLUB(X_v;S,X_t) - NCE(X_t;S) - NCE(X_v;S)."""
        s, xv, xt = out["shared"][rows], out["x_v"][rows], out["x_t"][rows]
        return (club_upper_bound(self.club_t_s, out["spec_t"][rows], s)
                + club_upper_bound(self.club_v_s, out["spec_v"][rows], s)
                + infonce_critic_loss(self.nce_t_s, xt, s) + infonce_critic_loss(self.nce_v_s, xv, s)
                + club_upper_bound(self.club_t_sv, torch.cat([s, xv], dim=1), xt)
                + club_upper_bound(self.club_v_st, torch.cat([s, xt], dim=1), xv))

    def club_learning_terms(self, out: dict, rows: torch.Tensor) -> torch.Tensor:
        s, xv, xt = out["shared"][rows], out["x_v"][rows], out["x_t"][rows]
        return (club_learning_loss(self.club_t_s, out["spec_t"][rows], s)
                + club_learning_loss(self.club_v_s, out["spec_v"][rows], s)
                + club_learning_loss(self.club_t_sv, torch.cat([s, xv], dim=1), xt)
                + club_learning_loss(self.club_v_st, torch.cat([s, xt], dim=1), xv))

    # ------------------------------------------------------------------------------------------
    def calculate_loss(self, interaction: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        # the reference's second step for the previous batch runs after that batch's main update
        self._run_pending_critic_step()
        users, pos, neg = interaction["users"], interaction["pos_items"], interaction["neg_items"]
        out = self.forward()
        zu, zi = out["z"][: self.n_users], out["z"][self.n_users:]
        u, p, n = zu[users], zi[pos], zi[neg]
        bpr = dot_bpr(u, p, n, "mean")
        reg = self.reg_weight * half_sq(u, p, n, batch_size=self.batch_size)
        cl = side_content_nce(out["side"], out["content"], self.n_users, users, pos, self.info_pos, self.info_neg)
        mi = self.mi_upper_terms(out, self._mi_rows(pos)) + self.mi_upper_terms(out, self._mi_rows(neg))
        self._pending_critic_batch = {"pos": pos.detach(), "neg": neg.detach()}
        self._last_weights = out["weights"]
        return {"bpr": bpr, "reg": reg, "cl": self.cl_loss * cl, "mi": self.mi_loss * mi}

    def critic_step(self, pos: torch.Tensor, neg: torch.Tensor) -> float:
        """Train the four CLUB critics by maximising their NCE lower bound on a fresh forward (the
        encoders are constants here: the reference discards the gradients this step leaves on them)."""
        with torch.no_grad():
            out = self.forward()
        params = [p for critic in self.club_critics for p in critic.parameters()]
        for p in params:
            p.requires_grad_(True)
        try:
            loss = self.club_learning_terms(out, self._mi_rows(pos)) + self.club_learning_terms(out, self._mi_rows(neg))
            grads = torch.autograd.grad(loss, params)
        finally:
            for p in params:
                p.requires_grad_(False)
        if self._critic_optimizer is None:
            self._new_critic_optimizer()
        for p, g in zip(params, grads):
            p.grad = g
        self._critic_optimizer.step()
        for p in params:
            p.grad = None
        return float(loss.detach())

    def _run_pending_critic_step(self) -> None:
        if self._pending_critic_batch is not None and self.training:
            batch, self._pending_critic_batch = self._pending_critic_batch, None
            self.critic_step(batch["pos"], batch["neg"])

    def _new_critic_optimizer(self) -> None:
        params = [p for critic in self.club_critics for p in critic.parameters()]
        self._critic_optimizer = torch.optim.AdamW(params, lr=self.critic_lr, weight_decay=self.critic_weight_decay)

    def pre_epoch_processing(self) -> None:
        self._new_critic_optimizer()  # the reference builds fresh AdamW optimisers every epoch
        self._pending_critic_batch = None

    def post_epoch_processing(self) -> str | None:
        self._run_pending_critic_step()  # the critic step of the epoch's last batch
        return None

    def epoch_stats(self) -> dict[str, float]:
        """The global combination weights (w_1, w_2, w_3) of the epoch's last batch."""
        w = self._last_weights
        return {} if w is None else {"w_v": float(w[0]), "w_t": float(w[1]), "w_s": float(w[2])}

    def full_sort_predict(self, interaction: dict[str, torch.Tensor]) -> torch.Tensor:
        z = self.cached("forward", self.forward)["z"]
        return z[: self.n_users][interaction["users"]] @ z[self.n_users:].T
