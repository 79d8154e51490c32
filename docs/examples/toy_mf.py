"""ToyMF: matrix factorisation with a BPR loss, as a complete example of a model outside models/.

    python main.py -m docs/examples/toy_mf.py:ToyMF -d mini --config docs/examples/toy_mf.yaml
"""
import torch
from torch import nn

from mmrec.losses import bpr_loss, half_sq
from mmrec.recommender import GeneralRecommender


class ToyMF(GeneralRecommender):
    uses_features = False  # ID-only: no feature files needed
    config_schema = {"toy_reg": (">=", 0)}  # checked before any data is loaded

    def __init__(self, config, dataset):
        super().__init__(config, dataset)  # n_users, n_items, train_matrix, embedding_size, device
        self.reg = float(config["toy_reg"])  # this model's own key (toy_mf.yaml)
        self.user_embedding = nn.Embedding(self.n_users, self.embedding_size)
        self.item_embedding = nn.Embedding(self.n_items, self.embedding_size)
        nn.init.xavier_uniform_(self.user_embedding.weight)
        nn.init.xavier_uniform_(self.item_embedding.weight)

    def calculate_loss(self, interaction):
        """One batch of (user, positive, sampled negative) ids -> named loss parts (the trainer sums them)."""
        u = self.user_embedding(interaction["users"])
        i = self.item_embedding(interaction["pos_items"])
        j = self.item_embedding(interaction["neg_items"])
        y_pos, y_neg = (u * i).sum(-1), (u * j).sum(-1)
        return {"bpr": bpr_loss(y_pos, y_neg, "mean"),
                "reg": self.reg * half_sq(u, i, j, batch_size=u.shape[0])}

    def full_sort_predict(self, interaction):
        """Scores of every item for a block of users: [users, n_items] (training items are masked later)."""
        users = interaction["users"]
        items = self.cached("items", lambda: self.item_embedding.weight)  # once per evaluation pass
        return self.user_embedding(users) @ items.T

    def epoch_stats(self):
        """Optional: numbers logged after every training epoch."""
        return {"user_norm": float(self.user_embedding.weight.detach().norm(dim=1).mean())}
