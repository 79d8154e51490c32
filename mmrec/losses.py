"""Shared loss functions (BASELINES.md section 1.3).  Every model calls these.

- ``bpr_loss(pos, neg, variant)``: ``mean`` (-logsigmoid, no epsilon), ``eps`` (-ln(1e-10 + sigmoid):
  MMRec BPR/LightGCN), ``log2`` (-log2 sigmoid: MENTOR); ``dot_bpr(u, p, n, variant)`` on dot-product scores.
- ``emb_loss``: MMRec's EmbLoss, the sum of *non-squared* Frobenius norms divided by the batch size.
- ``half_sq``: 0.5 * sum of squared norms / configured batch size.
- ``info_nce``: in-batch InfoNCE on L2-normalised views, positives on the diagonal (``info_nce_both_ways``:
  both directions from one similarity matrix).
- ``side_content_nce``: the MGCN family's contrastive term between two [U+I, d] representations, on the
  batch's users and items.
- ``mean_var_alignment``: |var(X) - var(Y)| + |mean(X) - mean(Y)| over whole tensors.
- ``simgcl_perturb``: x + sign(x) * normalize(U[0,1) noise) * eps.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def bpr_loss(pos_scores: torch.Tensor, neg_scores: torch.Tensor, variant: str = "mean") -> torch.Tensor:
    diff = pos_scores - neg_scores
    if variant == "mean":
        return -F.logsigmoid(diff).mean()
    if variant == "eps":
        return -torch.log(1e-10 + torch.sigmoid(diff)).mean()
    if variant == "log2":
        return -(F.logsigmoid(diff) / math.log(2.0)).mean()
    raise ValueError(f"unknown BPR variant {variant!r}; use mean, eps or log2")


def dot_bpr(users: torch.Tensor, pos_items: torch.Tensor, neg_items: torch.Tensor,
            variant: str = "mean") -> torch.Tensor:
    """BPR on dot-product scores: ``bpr_loss(<u, p>, <u, n>, variant)`` for rows of [batch, d] tensors."""
    return bpr_loss((users * pos_items).sum(-1), (users * neg_items).sum(-1), variant)


def emb_loss(*embeddings: torch.Tensor) -> torch.Tensor:
    """MMRec EmbLoss: (sum of Frobenius norms, not squared) / batch size (rows of the first tensor)."""
    total = sum(torch.norm(e, p=2) for e in embeddings)
    return total / embeddings[0].shape[0]


def emb_loss_rows(table: torch.Tensor, *indices: torch.Tensor) -> torch.Tensor:
    """``emb_loss(table[i_1], table[i_2], ...)`` without gathering the rows: the squared Frobenius norm of
    table[i] is sum_r count_i(r) |table_r|^2, so the gradient is one elementwise pass over ``table`` instead
    of a scatter of every gathered row (rows repeat within a batch)."""
    sq = table.pow(2).sum(1)
    total = sum((torch.bincount(idx, minlength=table.shape[0]).to(sq.dtype) * sq).sum()
                .clamp_min(torch.finfo(sq.dtype).tiny).sqrt() for idx in indices)  # (clamp: no 0 * inf at 0)
    return total / indices[0].numel()


def half_sq(*embeddings: torch.Tensor, batch_size: int) -> torch.Tensor:
    """0.5 * (sum of squared Frobenius norms) / the configured train batch size."""
    return 0.5 * sum(e.pow(2).sum() for e in embeddings) / batch_size


def _cosine_logits(view1: torch.Tensor, view2: torch.Tensor, temperature: float) -> torch.Tensor:
    return F.normalize(view1, dim=1) @ F.normalize(view2, dim=1).T / temperature


def info_nce(view1: torch.Tensor, view2: torch.Tensor, temperature: float) -> torch.Tensor:
    """In-batch InfoNCE: row i of view1 against all rows of view2 (positive = row i), mean over rows."""
    logits = _cosine_logits(view1, view2, temperature)
    return F.cross_entropy(logits, torch.arange(logits.shape[0], device=logits.device))


def info_nce_both_ways(view1: torch.Tensor, view2: torch.Tensor, temperature: float) -> torch.Tensor:
    """info_nce(view1, view2) + info_nce(view2, view1) from one similarity matrix (the second direction
    is the first's transpose): half the products of calling ``info_nce`` twice, same value."""
    logits = _cosine_logits(view1, view2, temperature)
    target = torch.arange(logits.shape[0], device=logits.device)
    return F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)


def side_content_nce(side: torch.Tensor, content: torch.Tensor, n_users: int, users: torch.Tensor,
                     items: torch.Tensor, temperature: float, user_temperature: float | None = None) -> torch.Tensor:
    """InfoNCE(side_i[items], content_i[items]) + InfoNCE(side_u[users], content_u[users]) on [U+I, d]
    representations (users first): MGCN Eq. 14 and its descendants (SMORE, GUME's b-m term, SOIL, CMDL).
    ``user_temperature`` defaults to ``temperature`` (CMDL uses two)."""
    user_t = temperature if user_temperature is None else user_temperature
    return (info_nce(side[n_users + items], content[n_users + items], temperature)
            + info_nce(side[users], content[users], user_t))


NCE_BLOCK_ELEMENTS = 1 << 26  # logits of one InfoNCE block at most (256 MiB of float32)


def info_nce_blocked(view1: torch.Tensor, view2: torch.Tensor, temperature: float,
                     block_size: int = 4096, max_block_elements: int = NCE_BLOCK_ELEMENTS) -> torch.Tensor:
    """Exact ``info_nce`` computed in row blocks, so no n x n matrix is held at once (each block is
    recomputed in the backward pass via checkpointing).  A block has at most ``block_size`` rows and at
    most ``max_block_elements`` logits: at Electronics' 192,403 users, 4,096 rows were 3.1 GB of logits
    per block (and several times that in the softmax), which broke a 16 GB budget; the cap makes it 348."""
    block_size = max(1, min(int(block_size), max_block_elements // max(view2.shape[0], 1)))
    if view1.shape[0] <= block_size:  # one block: the plain form, no recomputation
        return info_nce(view1, view2, temperature)
    from torch.utils.checkpoint import checkpoint

    z1 = F.normalize(view1, dim=1)
    z2 = F.normalize(view2, dim=1)

    def block_loss(a: torch.Tensor, b: torch.Tensor, start: torch.Tensor) -> torch.Tensor:
        logits = a @ b.T / temperature
        s = int(start.item())
        pos = logits[torch.arange(a.shape[0], device=a.device), torch.arange(s, s + a.shape[0], device=a.device)]
        return (torch.logsumexp(logits, dim=1) - pos).sum()

    total = z1.new_zeros(())
    for s in range(0, z1.shape[0], block_size):
        part = z1[s:s + block_size]
        total = total + checkpoint(block_loss, part, z2, torch.tensor(s), use_reentrant=False)
    return total / z1.shape[0]


def mean_var_alignment(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """|var(x) - var(y)| + |mean(x) - mean(y)|, scalars over all elements (unbiased variance)."""
    return (x.var() - y.var()).abs() + (x.mean() - y.mean()).abs()


def simgcl_perturb(x: torch.Tensor, eps: float = 0.1, generator: torch.Generator | None = None) -> torch.Tensor:
    noise = torch.rand(x.shape, device=x.device, dtype=x.dtype, generator=generator)
    return x + torch.sign(x) * F.normalize(noise, dim=-1) * eps
