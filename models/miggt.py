"""MIG-GT: Modality-Independent Graph neural networks with Global Transformers for multimodal
recommendation (Hu et al., AAAI 2025; reference code CrawlScript/MIG-GT).

Notation: U users, I items, N = U + I nodes, d = ``embedding_size``.

Graph (self-loops, symmetric normalisation; in-degrees include the self-loop):

    A_hat = D^-1/2 (A + I) D^-1/2,        A = [[0, Y], [Y^T, 0]]

Modality-independent receptive fields: three APPNP-style propagations with their own hop counts
K_e (ID), K_t (text), K_v (visual), each with its own inverted edge dropout drawn once per training
forward and reused for its K hops:

    h^{k+1} = beta A_hat h^k + alpha h^0,        h = h^K / gamma_K,   gamma_K = beta^K + alpha sum_{j<K} beta^j
    h^0_e = [drop(E_u); 0],   h^0_t = [0; drop(enc_t(x_t))],   h^0_v = [0; drop(enc_v(P x_v))]
    h = z_drop(h_e + h_t + h_v)                  (a branch with K < 0 is absent; K = 0 returns h^0)

``enc_m`` = Linear-BN-PReLU-Dropout-Linear-BN-PReLU (BatchNorm over all I items per forward); ``P`` is a
fixed Gaussian random projection of the visual features to the text width, rows L2-normalised.

Sampling-based global transformer: every node n gets a token set T_n = [h_n, h_{s_1}, ..., h_{s_C}] of
itself and C items drawn uniformly with replacement; one single-head attention with Q = T W_q, K = T W_k
(d -> 4) and V = T, and the residual 0.9 T + 0.1 softmax(Q K^T / sqrt(4)) V; the node's own output token
is its representation z_n.  Score y_ui = <z_u, z_i>.

Loss (all parts summed over the batch, as in the reference):

    L = sum_b CE([<z_u, z_i>, <z_u, z_j>], 0)                              (BPR as 2-way softmax CE)
      + l2_coef * 0.5 * (||Z_users||^2 + ||Z_items||^2)                    (over all nodes)
      + sum_b CE([<z_u, t> for t in out_tokens(i)], 0)                     ("unsmooth": z_u must pick
                                                                             item i's own token)

Harness options: ``own_negatives`` replaces the harness's negatives by the reference's (uniform over all
items, positives not excluded, drawn from the torch RNG); ``eval_mask_other_split`` masks, besides the
training items, the test items when validating and the validation items when testing (the reference's
protocol).  Evaluation is stochastic (global sampling runs at evaluation too): the samples come from a
torch Generator re-seeded from ``seed`` at every evaluation pass, and one forward serves the whole pass,
so an evaluation is reproducible and independent of ``eval_batch_size``.
"""
from __future__ import annotations

import math

import numpy as np
import scipy.sparse as sp
import torch
import torch.nn.functional as F
from torch import nn

from mmrec import graph
from mmrec.losses import dot_bpr
from mmrec.recommender import GeneralRecommender


def self_loop_sym_adjacency(train: sp.spmatrix) -> sp.csr_matrix:
    """A_hat = D^-1/2 (A + I) D^-1/2 of the bipartite training graph (MIG-GT/MGDCF's graph)."""
    adj = graph.bipartite_adjacency(train)
    adj = adj + sp.identity(adj.shape[0], dtype=np.float32, format="csr")
    return graph.sym_normalize(adj)


def appnp_gamma(alpha: float, beta: float, k: int) -> float:
    """gamma_K = beta^K + alpha sum_{j<K} beta^j (the sum of the propagation's coefficients)."""
    return beta ** k + alpha * sum(beta ** j for j in range(k))


def appnp_propagate(adj: torch.Tensor, h0: torch.Tensor, k: int, alpha: float, beta: float,
                    edge_drop: float = 0.0, training: bool = False) -> torch.Tensor:
    """h^{k+1} = beta A h^k + alpha h^0 for k hops, divided by gamma_K; inverted dropout on the edge
    weights (self-loops included), one mask for all hops."""
    if training and edge_drop > 0.0 and k > 0:
        values = F.dropout(adj.values(), edge_drop, training=True)
        adj = torch.sparse_coo_tensor(adj.indices(), values, adj.shape, check_invariants=False)
    h = h0
    for _ in range(k):
        h = beta * torch.sparse.mm(adj, h) + alpha * h0
    return h / appnp_gamma(alpha, beta, k)


class XavierLinear(nn.Linear):
    """nn.Linear initialised Xavier-uniform with a zero bias (one RNG draw per layer, as the reference)."""

    def reset_parameters(self) -> None:
        nn.init.xavier_uniform_(self.weight)
        if self.bias is not None:
            nn.init.zeros_(self.bias)


class FeatureEncoder(nn.Sequential):
    """in -> hidden -> out: Linear-BN-PReLU-Dropout-Linear-BN-PReLU, Xavier-uniform weights, zero biases,
    one PReLU slope per activation initialised to 0.25."""

    def __init__(self, in_dim: int, hidden: int, out_dim: int, dropout: float):
        super().__init__(XavierLinear(in_dim, hidden), nn.BatchNorm1d(hidden), nn.PReLU(1, 0.25), nn.Dropout(dropout),
                         XavierLinear(hidden, out_dim), nn.BatchNorm1d(out_dim), nn.PReLU(1, 0.25))


class SampledGlobalAttention(nn.Module):
    """Single-head attention inside each node's token set, V = tokens, residual 0.9 x + 0.1 att."""

    def __init__(self, dim: int, att_dim: int = 4, residual: float = 0.9):
        super().__init__()
        self.q = XavierLinear(dim, att_dim)
        self.k = XavierLinear(dim, att_dim)
        self.residual = residual

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens [N, C+1, d] -> output tokens [N, C+1, d]."""
        q, k = self.q(tokens), self.k(tokens)
        att = torch.softmax(q @ k.transpose(1, 2) / math.sqrt(q.shape[-1]), dim=-1)  # [N, C+1, C+1]
        return self.residual * tokens + (1.0 - self.residual) * (att @ tokens)


class MIGGT(GeneralRecommender):
    """Modality-independent graph networks per modality with global transformer sampling and a seeded
    stochastic evaluation. Paper and equations: this module's docstring. Keys it reads
    (configs/model/MIGGT.yaml): alpha, att_dim, beta, edge_drop_rate, eval_mask_other_split, feat_drop_rate,
    feat_hidden, input_feat_drop_rate, item_x_drop_rate, k_e, k_t, k_v, l2_coef, num_samples, own_negatives,
    seed, use_rp, user_x_drop_rate, z_drop_rate."""
    needs_both_modalities = True  # image and text features, checked before any data is loaded
    #: the global sampling runs at evaluation too, so the harness must not cache across passes
    deterministic_eval = False

    def __init__(self, config, dataset):
        super().__init__(config, dataset)
        d = self.embedding_size
        self.k_e, self.k_t, self.k_v = int(config["k_e"]), int(config["k_t"]), int(config["k_v"])
        self.alpha, self.beta = float(config["alpha"]), float(config["beta"])
        self.edge_drop = float(config["edge_drop_rate"])
        self.num_samples = int(config["num_samples"])
        self.l2_coef = float(config["l2_coef"])
        self.own_negatives = bool(config["own_negatives"])
        self.eval_mask_other_split = bool(config["eval_mask_other_split"])
        self.seed = int(config["seed"])

        # user ID table ~ N(0, 1/d); items have no ID embedding (use_item_emb = False)
        self.user_embedding = nn.Parameter(torch.randn(self.n_users, d) / math.sqrt(d))
        # fixed Gaussian random projection of the visual features to the text width (use_rp)
        t_dim = self.t_feat.shape[1]
        if bool(config["use_rp"]):
            proj = torch.randn(self.v_feat.shape[1], t_dim, device=self.device)
            v = self.v_feat @ proj
            v = v / (v.norm(dim=-1, keepdim=True) + 1e-8)
        else:
            v = self.v_feat
        self.register_buffer("v_input", v.contiguous())
        self.register_buffer("t_input", self.t_feat.contiguous())

        hidden, feat_drop = int(config["feat_hidden"]), float(config["feat_drop_rate"])
        self.input_dropout = nn.Dropout(float(config["input_feat_drop_rate"]))
        self.user_x_dropout = nn.Dropout(float(config["user_x_drop_rate"]))
        self.item_x_dropout = nn.Dropout(float(config["item_x_drop_rate"]))
        self.z_dropout = nn.Dropout(float(config["z_drop_rate"]))
        self.t_encoder = FeatureEncoder(self.t_input.shape[1], hidden, d, feat_drop)
        self.v_encoder = FeatureEncoder(self.v_input.shape[1], hidden, d, feat_drop)
        self.global_attention = SampledGlobalAttention(d, int(config["att_dim"]))

        self.adj = graph.to_torch_sparse(self_loop_sym_adjacency(self.train_matrix), self.device)
        self.eval_generator = torch.Generator(device=self.device)
        self._pass_forward = None
        self._in_pass = False

    # ------------------------------------------------------------------------------------------
    def propagate_branches(self) -> torch.Tensor:
        """h = z_drop(h_e + h_t + h_v): the three modality-independent receptive fields, [N, d].
        Random draws follow the reference's order (feature dropouts, then branch by branch)."""
        v_in, t_in = self.input_dropout(self.v_input), self.input_dropout(self.t_input)
        enc_t, enc_v = self.t_encoder(t_in), self.v_encoder(v_in)
        users0 = enc_t.new_zeros(self.n_users, enc_t.shape[1])
        items0 = enc_t.new_zeros(self.n_items, enc_t.shape[1])
        h = 0
        for k, branch_input in ((self.k_e, lambda: torch.cat([self.user_x_dropout(self.user_embedding), items0])),
                                (self.k_t, lambda: torch.cat([users0, self.item_x_dropout(enc_t)])),
                                (self.k_v, lambda: torch.cat([users0, self.item_x_dropout(enc_v)]))):
            if k >= 0:  # K < 0 removes a branch; K = 0 keeps its (dropped-out) input
                h = h + appnp_propagate(self.adj, branch_input(), k, self.alpha, self.beta, self.edge_drop,
                                        self.training)
        return self.z_dropout(h)

    def forward(self, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(z [N, d], output token sets [N, C+1, d]); samples from ``generator`` (None: torch RNG)."""
        h = self.propagate_branches()
        n_nodes = h.shape[0]
        sampled = torch.randint(self.n_items, (n_nodes, self.num_samples), device=h.device, generator=generator)
        tokens = torch.cat([h.unsqueeze(1), h[self.n_users:][sampled]], dim=1)  # [N, C+1, d]
        out = self.global_attention(tokens)
        return out[:, 0], out

    # ------------------------------------------------------------------------------------------
    def calculate_loss(self, interaction: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        users, pos_items = interaction["users"], interaction["pos_items"]
        z, tokens = self.forward()
        if self.own_negatives:  # reference sampler (drawn after the forward, as there): uniform over all
            neg_items = torch.randint(self.n_items, pos_items.shape, device=pos_items.device)  # items
        else:
            neg_items = interaction["neg_items"]
        zu, zi = z[: self.n_users], z[self.n_users:]
        u = zu[users]
        batch = users.shape[0]
        # BPR as 2-way softmax cross-entropy, summed: sum softplus(s_neg - s_pos)
        mf = dot_bpr(u, zi[pos_items], zi[neg_items], "mean") * batch
        l2 = self.l2_coef * 0.5 * z.pow(2).sum()
        # unsmooth: z_u must select item i's own output token among its C+1 tokens
        logits = torch.einsum("bd,bcd->bc", u, tokens[pos_items + self.n_users])
        unsmooth = F.cross_entropy(logits, torch.zeros(batch, dtype=torch.long, device=logits.device),
                                   reduction="sum")
        return {"mf": mf, "l2": l2, "unsmooth": unsmooth}

    # ------------------------------------------------------------------------------------------
    def start_evaluation(self, split: str | None = None) -> None:
        super().start_evaluation(split)
        self.eval_generator.manual_seed(self.seed)  # every pass draws the same global samples
        self._pass_forward = None
        self._in_pass = True

    def end_evaluation(self) -> None:
        super().end_evaluation()
        self._pass_forward = None
        self._in_pass = False

    def _eval_embeddings(self) -> torch.Tensor:
        """Inside an evaluation pass: one stochastic forward serves every user block (the reference
        runs one forward per evaluation); outside a pass: a fresh forward per call."""
        if self._in_pass and self._pass_forward is not None:
            return self._pass_forward
        z, _ = self.forward(self.eval_generator)
        if self._in_pass:
            self._pass_forward = z
        return z

    def full_sort_predict(self, interaction: dict[str, torch.Tensor]) -> torch.Tensor:
        users = interaction["users"]
        z = self._eval_embeddings()
        scores = z[: self.n_users][users] @ z[self.n_users:].T
        split = self.eval_split
        if self.eval_mask_other_split and split in ("valid", "test"):
            other = self.dataset.test_matrix if split == "valid" else self.dataset.valid_matrix
            sub = other[users.cpu().numpy()].tocoo()
            rows = torch.from_numpy(sub.row.astype(np.int64)).to(scores.device)
            cols = torch.from_numpy(sub.col.astype(np.int64)).to(scores.device)
            scores[rows, cols] = -torch.inf
        return scores
