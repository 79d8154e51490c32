"""BPR: Bayesian Personalized Ranking from Implicit Feedback (Rendle et al., UAI 2009).

Matrix factorisation scored by a dot product, trained with the pairwise BPR objective.  Matches MMRec's
``bpr.py``: Xavier-normal ID tables (std sqrt(2 / (rows + d)), so users and items differ), BPR-eps loss
plus ``reg_weight * EmbLoss`` (non-squared Frobenius norms / batch) on the batch embeddings.
"""
from __future__ import annotations

from torch import nn

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
        self.user_embedding = nn.Embedding(self.n_users, self.embedding_size)
        self.item_embedding = nn.Embedding(self.n_items, self.embedding_size)
        nn.init.xavier_normal_(self.user_embedding.weight)
        nn.init.xavier_normal_(self.item_embedding.weight)

    def calculate_loss(self, interaction):
        u = self.user_embedding(interaction["users"])
        p = self.item_embedding(interaction["pos_items"])
        n = self.item_embedding(interaction["neg_items"])
        pos, neg = (u * p).sum(-1), (u * n).sum(-1)
        return {"bpr": bpr_loss(pos, neg, "eps"), "reg": self.reg_weight * emb_loss(u, p, n)}

    def full_sort_predict(self, interaction):
        return self.user_embedding(interaction["users"]) @ self.item_embedding.weight.T
