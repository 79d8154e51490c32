"""BPR: Bayesian Personalized Ranking from Implicit Feedback (Rendle et al., UAI 2009).

Matrix factorisation scored by a dot product, trained with the pairwise BPR objective.  Matches MMRec's
``bpr.py``: Xavier-normal ID tables (std sqrt(2 / (rows + d)), so users and items differ), BPR-eps loss
plus ``reg_weight * EmbLoss`` (non-squared Frobenius norms / batch) on the batch embeddings.
"""
from __future__ import annotations

import torch

from mmrec.layers import xavier_tables
from mmrec.losses import bpr_loss, emb_loss
from mmrec.recommender import GeneralRecommender


class BPR(GeneralRecommender):
    """Matrix factorisation trained with the BPR loss: a user's score for an item is the dot product of
    their ID embeddings. Paper and equations: this module's docstring. Keys it reads
    (configs/model/BPR.yaml): reg_weight."""
    uses_features = False  # ID-only: runs on datasets without feature files

    def __init__(self, config, dataset):
        super().__init__(config, dataset)
        self.reg_weight = float(config["reg_weight"])
        self.user_embedding, self.item_embedding = xavier_tables(self.n_users, self.n_items,
                                                                 dim=self.embedding_size, init="normal")

    def calculate_loss(self, interaction: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        u = self.user_embedding(interaction["users"])
        p = self.item_embedding(interaction["pos_items"])
        n = self.item_embedding(interaction["neg_items"])
        pos, neg = (u * p).sum(-1), (u * n).sum(-1)
        return {"bpr": bpr_loss(pos, neg, "eps"), "reg": self.reg_weight * emb_loss(u, p, n)}

    def full_sort_predict(self, interaction: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.user_embedding(interaction["users"]) @ self.item_embedding.weight.T
