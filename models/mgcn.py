"""MGCN: Multi-View Graph Convolutional Network for Multimedia Recommendation (Yu et al., ACM MM 2023).

Three views of every node, fused with behaviour information:

    x_m   = P_m f_m                                   projected raw features (f_m trainable, m in {v, t})
    e_m   = E_i * sigmoid(W_m x_m + b_m)              behaviour-guided purifier          (Eq. 3)
    i_m   = S_m e_m,  u_m = R i_m,  X_m = [u_m; i_m]  item-item view, KNN-SIM graph S_m  (Eq. 4-5)
    C     = mean_{l=0..L} A^l [E_u; E_i]              user-item view, LightGCN on sym(A) (Eq. 6-7)
    a_m   = softmax_m(w^T tanh(W X_m + b))            behaviour-aware fuser, common part (Eq. 8-9)
    common = a_v X_v + a_t X_t
    g_m   = sigmoid(W'_m C + b'_m)                    preference gates                   (Eq. 10-11)
    side  = (g_v * (X_v - common) + g_t * (X_t - common) + common) / 3
    Z     = C + side,   y_ui = <Z_u, Z_i>             (Eq. 12-13)

Loss: BPR-mean(Z) + reg_weight * HalfSq(Z_u[b], Z_i[pos], Z_i[neg]) (divided by the configured
train_batch_size) + cl_loss * [InfoNCE(side_i[pos], C_i[pos]) + InfoNCE(side_u[b], C_u[b])].

Parity with MMRec ``src/models/mgcn.py`` (= demonph10/MGCN): Xavier-uniform ID tables, default
``nn.Linear`` initialisation elsewhere, raw features trainable, KNN-SIM graphs (k = ``knn_k``, the item
itself among its neighbours, row sums on both sides, not symmetrised), ``sym`` adjacency with exact
degrees.  The InfoNCE temperature is hard-coded 0.2 in the reference (its ``tau = 0.5`` attribute is
never used); here it is the config key ``cl_temperature`` with default 0.2.
"""
from __future__ import annotations

import torch
from torch import nn

from mmrec import graph
from mmrec.layers import BehaviourPurifier, ScalarAttentionFuser, SigmoidGate, item_graph_view, xavier_tables
from mmrec.losses import dot_bpr, half_sq, side_content_nce
from mmrec.recommender import GeneralRecommender


class MGCNFamily(GeneralRecommender):
    """What MGCN and SMORE share (not a model itself): ID tables, the ``sym`` user-item graph and its user
    block R, trainable raw-feature tables with their projections, and the objective

        BPR-mean(Z) + reg_weight * HalfSq(Z_u[b], Z_i[pos], Z_i[neg]) / train_batch_size
                    + cl_loss * side_content_nce(side, content)      (MGCN Eq. 13-14)

    over ``forward() -> (Z_users, Z_items, side [U+I, d], content [U+I, d])``.  A subclass builds its item
    graphs in ``build_item_graphs`` and its own layers after ``super().__init__``; the order of creation is
    the references' (ID tables, graphs, feature tables, projections, then the model's layers), so a seed
    draws the same numbers as before the skeleton was shared."""
    abstract_model = True
    needs_both_modalities = True  # image and text features, checked before any data is loaded

    def __init__(self, config, dataset):
        super().__init__(config, dataset)
        d = self.embedding_size
        self.n_ui_layers = int(config["n_ui_layers"])
        self.n_layers = int(config["n_layers"])
        self.reg_weight = float(config["reg_weight"])
        self.cl_loss = float(config["cl_loss"])
        self.cl_temperature = float(config["cl_temperature"])
        self.batch_size = int(config["train_batch_size"])

        self.user_embedding, self.item_embedding = xavier_tables(self.n_users, self.n_items, dim=d)
        # graphs, from the training split only
        adj = graph.norm_adjacency(self.train_matrix, "sym")
        self.adj = graph.to_torch_sparse(adj, self.device)
        self.R = graph.to_torch_sparse(graph.user_item_block(adj, self.n_users), self.device)
        self.build_item_graphs(config, dataset)
        # raw features are trainable tables initialised to the loaded features
        self.image_embedding = nn.Embedding.from_pretrained(self.v_feat, freeze=False)
        self.text_embedding = nn.Embedding.from_pretrained(self.t_feat, freeze=False)
        self.image_proj = nn.Linear(self.v_feat.shape[1], d)
        self.text_proj = nn.Linear(self.t_feat.shape[1], d)

    def build_item_graphs(self, config, dataset) -> None:
        """Set the model's item-item graphs (frozen, from the features)."""
        raise NotImplementedError

    def forward(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Returns (Z_users, Z_items, side [U+I, d], content [U+I, d])."""
        raise NotImplementedError

    def calculate_loss(self, interaction: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        users, pos, neg = interaction["users"], interaction["pos_items"], interaction["neg_items"]
        zu, zi, side, content = self.forward()
        u, p, n = zu[users], zi[pos], zi[neg]
        cl = side_content_nce(side, content, self.n_users, users, pos, self.cl_temperature)
        return {"bpr": dot_bpr(u, p, n, "mean"), "reg": self.reg_weight * half_sq(u, p, n, batch_size=self.batch_size),
                "cl": self.cl_loss * cl}

    def full_sort_predict(self, interaction: dict[str, torch.Tensor]) -> torch.Tensor:
        zu, zi = self.cached("forward", lambda: self.forward()[:2])
        return zu[interaction["users"]] @ zi.T


class MGCN(MGCNFamily):
    """Purifies modality features with ID embeddings, propagates them on item-item and user-item graphs, and
    fuses views with attention and contrastive learning. Paper and equations: this module's docstring. Keys
    it reads (configs/model/MGCN.yaml): cl_loss, cl_temperature, knn_k, n_layers, n_ui_layers, reg_weight,
    train_batch_size."""

    def __init__(self, config, dataset):
        super().__init__(config, dataset)
        d = self.embedding_size
        self.fuser = ScalarAttentionFuser(d)
        self.purifier_v = BehaviourPurifier(d)
        self.purifier_t = BehaviourPurifier(d)
        self.prefer_v = SigmoidGate(d)
        self.prefer_t = SigmoidGate(d)

    def build_item_graphs(self, config, dataset) -> None:
        self.knn_k = int(config["knn_k"])
        self.image_graph = self.item_knn("v", self.knn_k, "sim")
        self.text_graph = self.item_knn("t", self.knn_k, "sim")

    def forward(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Returns (Z_users, Z_items, side [U+I, d], content [U+I, d])."""
        item_ids = self.item_embedding.weight
        image_feats = self.image_proj(self.image_embedding.weight)
        text_feats = self.text_proj(self.text_embedding.weight)
        e_v = self.purifier_v(item_ids, image_feats)  # Eq. 3
        e_t = self.purifier_t(item_ids, text_feats)

        ego = torch.cat([self.user_embedding.weight, item_ids], dim=0)
        content = graph.propagate(self.adj, ego, self.n_ui_layers)  # Eq. 6-7

        x_v = item_graph_view(self.image_graph, self.R, e_v, self.n_layers)  # Eq. 4-5
        x_t = item_graph_view(self.text_graph, self.R, e_t, self.n_layers)

        common, _ = self.fuser([x_v, x_t])  # Eq. 8-9
        specific_v = self.prefer_v(content) * (x_v - common)  # Eq. 10-11
        specific_t = self.prefer_t(content) * (x_t - common)
        side = (specific_v + specific_t + common) / 3
        z = content + side  # Eq. 12
        return z[: self.n_users], z[self.n_users:], side, content
