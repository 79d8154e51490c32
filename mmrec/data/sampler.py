"""Training batches: shuffled positive interactions, each with one uniform negative.

Negatives follow MMRec's rule: drawn uniformly from the items that occur in the training split, never
a training positive of that user (they may be a validation/test item).  Sampling is vectorised
rejection sampling (no Python loop per interaction) from a dedicated torch Generator, whose state is
checkpointed so a resumed run continues the same data order and negatives.
"""
from __future__ import annotations

from typing import Iterator

import numpy as np
import torch


class NegativeSampler:
    """Uniform negatives over the training item set, rejecting each user's training positives."""

    def __init__(self, train_users: np.ndarray, train_items: np.ndarray, n_items: int):
        self.n_items = n_items
        self.candidates = torch.from_numpy(np.unique(train_items).astype(np.int64))
        keys = np.unique(train_users.astype(np.int64) * n_items + train_items.astype(np.int64))
        self.positive_keys = torch.from_numpy(keys)
        if self.candidates.numel() < 2:
            raise ValueError("negative sampling needs at least two distinct training items")

    def is_positive(self, users: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        keys = users * self.n_items + items
        pos = torch.searchsorted(self.positive_keys, keys).clamp_max(self.positive_keys.numel() - 1)
        return self.positive_keys[pos] == keys

    def sample(self, users: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """One negative per entry of ``users``."""
        n_cand = self.candidates.numel()
        neg = self.candidates[torch.randint(n_cand, users.shape, generator=generator)]
        bad = self.is_positive(users, neg)
        while bad.any():  # rejection rounds: vectorised over the still-rejected entries
            idx = bad.nonzero(as_tuple=True)[0]
            neg[idx] = self.candidates[torch.randint(n_cand, idx.shape, generator=generator)]
            bad_sub = self.is_positive(users[idx], neg[idx])
            bad = torch.zeros_like(bad)
            bad[idx] = bad_sub
        return neg


class TrainBatches:
    """Per epoch: a fresh permutation of the training interactions and fresh negatives.

    ``state_dict`` / ``load_state_dict`` carry the generator so a resumed run continues exactly."""

    def __init__(self, dataset, batch_size: int, seed: int):
        self.users = torch.from_numpy(dataset.train_users.astype(np.int64))
        self.items = torch.from_numpy(dataset.train_items.astype(np.int64))
        self.batch_size = int(batch_size)
        self.sampler = NegativeSampler(dataset.train_users, dataset.train_items, dataset.n_items)
        self.generator = torch.Generator().manual_seed(int(seed))

    def __len__(self) -> int:
        return (self.users.numel() + self.batch_size - 1) // self.batch_size

    def epoch(self) -> Iterator[dict[str, torch.Tensor]]:
        """Batches of {'users', 'pos_items', 'neg_items'}; the last batch is the short remainder."""
        order = torch.randperm(self.users.numel(), generator=self.generator)
        users = self.users[order]
        pos = self.items[order]
        neg = self.sampler.sample(users, self.generator)
        for s in range(0, users.numel(), self.batch_size):
            yield {"users": users[s:s + self.batch_size], "pos_items": pos[s:s + self.batch_size],
                   "neg_items": neg[s:s + self.batch_size]}

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])
