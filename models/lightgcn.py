"""LightGCN: Simplifying and Powering Graph Convolution Network for Recommendation (He et al., SIGIR 2020).

    H^{(l+1)} = D^{-1/2} A D^{-1/2} H^{(l)},      z = 1/(L+1) sum_{l=0..L} H^{(l)},     y_ui = <z_u, z_i>

Matches MMRec's ``lightgcn.py``: Xavier-uniform ID tables, the symmetric adjacency with degrees + 1e-7
(``sym_eps``), BPR-eps on the final embeddings plus ``reg_weight * EmbLoss`` on the layer-0 (ego)
embeddings of the batch.
"""
from __future__ import annotations

import torch

from mmrec.graph import batch_rows, propagate
from mmrec.layers import xavier_tables
from mmrec.losses import dot_bpr, emb_loss_rows
from mmrec.recommender import GeneralRecommender


class LightGCN(GeneralRecommender):
    """Linear propagation of ID embeddings over the normalised user-item graph, layers averaged; no feature
    use. Paper and equations: this module's docstring. Keys it reads (configs/model/LightGCN.yaml):
    n_layers, reg_weight."""
    uses_features = False  # ID-only: runs on datasets without feature files

    def __init__(self, config, dataset):
        super().__init__(config, dataset)
        self.n_layers = int(config["n_layers"])
        self.reg_weight = float(config["reg_weight"])
        self.user_embedding, self.item_embedding = xavier_tables(self.n_users, self.n_items, dim=self.embedding_size)
        self.adj = self.norm_adj("sym_eps")

    def forward(self) -> tuple[torch.Tensor, torch.Tensor]:
        ego = torch.cat([self.user_embedding.weight, self.item_embedding.weight], dim=0)
        z = propagate(self.adj, ego, self.n_layers)  # Eq. (mean over layers 0..L)
        return z[: self.n_users], z[self.n_users:]

    def calculate_loss(self, interaction: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        users, pos_items, neg_items = interaction["users"], interaction["pos_items"], interaction["neg_items"]
        # the batch's rows only: the last layer is A[rows] H_{L-1} (the same values as the full forward's rows,
        # at the cost of those rows of A, forward and backward)
        batch = batch_rows(users, pos_items, neg_items)
        ego = torch.cat([self.user_embedding.weight, self.item_embedding.weight], dim=0)
        z, ego_rows = propagate(self.adj, ego, self.n_layers, rows=batch.node_rows(self.n_users),
                                return_ego_rows=True)
        pairs = batch.pair_rows()  # each pair's user, positive and negative among the batch's rows
        u, p, n = z.index_select(0, pairs).chunk(3)
        loss = dot_bpr(u, p, n, "eps")
        # EmbLoss on the batch's layer-0 rows: the same vectors as the ID tables' rows for users/pos/neg
        reg = emb_loss_rows(ego_rows, *pairs.chunk(3))
        return {"bpr": loss, "reg": self.reg_weight * reg}

    def full_sort_predict(self, interaction: dict[str, torch.Tensor]) -> torch.Tensor:
        zu, zi = self.cached("forward", self.forward)
        return zu[interaction["users"]] @ zi.T
