"""utils/signal_check: its similarities by hand, and its figures are the evaluator's (loader, masking, metrics)."""
import numpy as np
import pytest
import scipy.sparse as sp

from tests.helpers import random_interactions, write_dataset
from utils.signal_check import cooc_sim, evaluate_all, feature_sim, load


def test_cooc_and_feature_similarities_by_hand():
    train = sp.csr_matrix(np.array([[1, 1, 0], [1, 1, 1], [0, 0, 1]], dtype=np.float32))  # users x items
    sim = cooc_sim(train, k=1).toarray()
    # items 0 and 1 share 2 users, each has 2: cosine 1; item 2 shares 1 user with each (1 / sqrt(2 * 2))
    assert sim[0, 1] == pytest.approx(1.0) and sim[1, 0] == pytest.approx(1.0)
    assert (sim > 0).sum(1).tolist() == [1, 1, 1] and sim[2, :2].sum() == pytest.approx(0.5)  # top-1 of a tie
    assert np.all(np.diag(sim) == 0)
    feats = np.array([[1.0, 0.0], [1.0, 1.0], [-1.0, 0.0]], dtype=np.float32)
    fs = feature_sim(feats, k=2).toarray()
    assert fs[0, 1] == pytest.approx(2 ** -0.5) and fs[0, 2] == 0.0  # cos -1 clipped to 0
    assert np.all(np.diag(fs) == 0)


def test_figures_are_the_evaluators_on_the_loaded_split(tmp_path):
    users, items, labels = random_interactions(30, 20, seed=2)
    rng = np.random.default_rng(0)
    write_dataset(tmp_path, "toy", users, items, labels, rng.random((20, 6)), rng.random((20, 4)))
    dataset = load(tmp_path, "toy")
    res = evaluate_all(dataset, topk=5, verbose=False)
    # popularity by hand: rank unseen items by train count (ties by lower id), Recall@20 on test
    train = dataset.train_matrix.toarray() > 0
    test = dataset.eval_matrix("test").toarray() > 0
    pop = train.sum(0)
    recalls = []
    for u in np.flatnonzero(test.any(1)):
        order = [i for i in sorted(range(20), key=lambda i: (-pop[i], i)) if not train[u, i]][:20]
        recalls.append(test[u, order].sum() / test[u].sum())
    assert res["pop (reference)"]["test_R"] == pytest.approx(np.mean(recalls))
    tuned = next(k for k in res if k.startswith("sum"))
    assert res[tuned]["valid_R"] >= res["cooc"]["valid_R"] - 1e-12  # (0, 0) is in the grid: never worse on valid
