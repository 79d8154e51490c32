"""Shared neural building blocks of the MGCN family (MGCN, SMORE, GUME, SOIL, CMDL, MAGNET ...).

Each block is a small ``nn.Module`` (or a pure function) with the reference initialisation: every
linear layer keeps PyTorch's default ``nn.Linear`` initialisation (Kaiming-uniform, a = sqrt(5);
bias uniform +-1/sqrt(fan_in)), as in MMRec's models.  Notation: ``E_i`` item ID embeddings
[I, d], ``x_m`` a modality's projected item features [I, d], ``R`` the user-item block of the
normalised training adjacency [U, I], ``S_m`` an item-item kNN graph [I, I].

- ``SigmoidGate(d)``:               g(x) = sigmoid(W x + b), element-wise gate in (0, 1)^d.
- ``BehaviourPurifier(d)``:         e_m = E_i * sigmoid(W_m x_m + b_m)   (MGCN Eq. 3, "behaviour-guided
                                    purifier": ID embeddings filter the modality features).
- ``ScalarAttentionFuser(d)``:      a_m = q(X_m) = w^T tanh(W X_m + b) (one network shared by all
                                    modalities), softmax over modalities per node,
                                    common = sum_m a_m X_m   (MGCN Eq. 8-9, GUME's attribute separation).
- ``item_graph_view(S, R, e, L)``:  i = S^L e, u = R i, returns [u; i]   (the item-item view of MGCN,
                                    SMORE, GUME, SOIL: propagate on the item graph, pull to users).
- ``xavier_tables(*rows, dim)``:    the ID embedding tables every model starts from, Xavier-initialised
                                    (MMRec's convention), in the references' random-stream order.
"""
from __future__ import annotations

import torch
from torch import nn

from mmrec.graph import spmm

__all__ = ["SigmoidGate", "BehaviourPurifier", "ScalarAttentionFuser", "item_graph_view", "xavier_tables"]


class SigmoidGate(nn.Module):
    """g(x) = sigmoid(W x + b) with W: [dim_out, dim_in] (dim_out defaults to dim_in)."""

    def __init__(self, dim_in: int, dim_out: int | None = None):
        super().__init__()
        self.linear = nn.Linear(dim_in, dim_out or dim_in)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.linear(x))


class BehaviourPurifier(nn.Module):
    """MGCN's behaviour-guided purifier: e_m = E_i * sigmoid(W_m x_m + b_m).

    ``forward(id_embeddings [I, d], modality_features [I, d_in]) -> [I, d]``."""

    def __init__(self, dim: int, feature_dim: int | None = None):
        super().__init__()
        self.gate = SigmoidGate(feature_dim or dim, dim)

    def forward(self, id_embeddings: torch.Tensor, modality_features: torch.Tensor) -> torch.Tensor:
        return id_embeddings * self.gate(modality_features)


class ScalarAttentionFuser(nn.Module):
    """MGCN's behaviour-aware fuser (common part): one scalar score per node and modality from a shared
    query network q = Linear(d, d) - Tanh - Linear(d, 1, no bias); softmax across modalities.

    ``forward([X_1, ..., X_M]) -> (common [N, d], weights [N, M])`` with common = sum_m a_m X_m."""

    def __init__(self, dim: int):
        super().__init__()
        self.query = nn.Sequential(nn.Linear(dim, dim), nn.Tanh(), nn.Linear(dim, 1, bias=False))

    def forward(self, views: list[torch.Tensor] | tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        scores = torch.cat([self.query(v) for v in views], dim=-1)  # [N, M]
        weights = torch.softmax(scores, dim=-1)
        common = sum(weights[:, m:m + 1] * v for m, v in enumerate(views))
        return common, weights


def item_graph_view(item_graph: torch.Tensor, user_item: torch.Tensor, item_embeddings: torch.Tensor,
                    n_layers: int = 1) -> torch.Tensor:
    """Item-item view: i = S^L e (sparse S [I, I]), u = R i (sparse R [U, I]); returns [u; i] ([U+I, d])."""
    h = item_embeddings
    for _ in range(n_layers):
        h = spmm(item_graph, h)
    users = spmm(user_item, h)
    return torch.cat([users, h], dim=0)


def xavier_tables(*rows: int, dim: int, init: str = "uniform") -> list[nn.Embedding]:
    """``nn.Embedding(rows_k, dim)`` tables with Xavier-uniform (or ``init="normal"``: Xavier-normal) weights.

    Every table is created before any is re-initialised, the order MMRec's models use, so a seed draws the
    same numbers as the reference code (and as this toolkit's runs before the tables were shared)."""
    if init not in ("uniform", "normal"):
        raise ValueError(f"xavier_tables: init must be 'uniform' or 'normal', got {init!r}")
    tables = [nn.Embedding(n, dim) for n in rows]
    fill = nn.init.xavier_uniform_ if init == "uniform" else nn.init.xavier_normal_
    for table in tables:
        fill(table.weight)
    return tables
