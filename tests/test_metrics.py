"""Metrics against hand-computed values (MMRec's definitions), including |T_u| < K."""
import math

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from mmrec import native
from mmrec.evaluation import evaluate, topk_indices, topk_metrics


def test_metrics_by_hand_single_user():
    # ranking hits at ranks 1 and 3 out of top-4; the user has 3 relevant items
    hits = torch.tensor([[1, 0, 1, 0]], dtype=torch.bool)
    m = topk_metrics(hits, torch.tensor([3]), [2, 4])
    assert m["recall@2"].item() == pytest.approx(1 / 3)
    assert m["recall@4"].item() == pytest.approx(2 / 3)
    assert m["precision@2"].item() == pytest.approx(1 / 2)
    assert m["precision@4"].item() == pytest.approx(2 / 4)
    dcg4 = 1 / math.log2(2) + 1 / math.log2(4)
    idcg4 = 1 / math.log2(2) + 1 / math.log2(3) + 1 / math.log2(4)  # min(|T|=3, K=4) = 3 terms
    assert m["ndcg@4"].item() == pytest.approx(dcg4 / idcg4)
    idcg2 = 1 / math.log2(2) + 1 / math.log2(3)
    assert m["ndcg@2"].item() == pytest.approx(1.0 / idcg2)
    # MAP@4 = (P@1 * 1 + P@3 * 1) / min(3, 4) = (1 + 2/3) / 3
    assert m["map@4"].item() == pytest.approx((1 + 2 / 3) / 3)
    assert m["map@2"].item() == pytest.approx(1 / 2)  # (P@1) / min(3, 2)


def test_user_with_fewer_relevant_items_than_k():
    # one relevant item found at rank 2: IDCG uses only min(|T|, K) = 1 term
    hits = torch.tensor([[0, 1, 0, 0, 0]], dtype=torch.bool)
    m = topk_metrics(hits, torch.tensor([1]), [5])
    assert m["recall@5"].item() == pytest.approx(1.0)
    assert m["ndcg@5"].item() == pytest.approx((1 / math.log2(3)) / 1.0)
    assert m["map@5"].item() == pytest.approx(0.5)  # P@2 / min(1, 5)
    assert m["precision@5"].item() == pytest.approx(0.2)


class _FixedScores(torch.nn.Module):
    def __init__(self, scores):
        super().__init__()
        self.scores = torch.as_tensor(scores, dtype=torch.float32)
        self.device = torch.device("cpu")

    def start_evaluation(self, split=None):
        pass

    def end_evaluation(self):
        pass

    def full_sort_predict(self, interaction):
        return self.scores[interaction["users"]]


class _DS:
    def __init__(self, train, valid, test):
        self.train_matrix, self.valid_matrix, self.test_matrix = train, valid, test
        self.n_items = train.shape[1]

    def eval_matrix(self, split):
        return self.valid_matrix if split == "valid" else self.test_matrix


def _csr(rows, cols, shape):
    return sp.csr_matrix((np.ones(len(rows), np.float32), (rows, cols)), shape=shape)


def test_evaluate_masks_training_items_and_averages_over_users():
    # 3 users x 5 items. user 0 trained on item 0 (highest score) -> masked, so item 1 ranks first.
    scores = [[9, 8, 7, 6, 5], [5, 6, 7, 8, 9], [1, 2, 3, 4, 5]]
    train = _csr([0, 1], [0, 4], (3, 5))
    test = _csr([0, 1], [1, 0], (3, 5))  # user 2 has no test item: not evaluated
    ds = _DS(train, test, test)
    res = evaluate(_FixedScores(scores), ds, "test", [1, 2], batch_users=2, keep_topk=2)
    # user 0: ranking [1, 2, ...] -> hit at 1; user 1: ranking (4 masked) [3, 2, 1, 0] -> item 0 at rank 4
    assert res["metrics"]["recall@1"] == pytest.approx(0.5)
    assert res["metrics"]["recall@2"] == pytest.approx(0.5)
    assert list(res["users"]) == [0, 1]
    assert res["topk"].tolist() == [[1, 2], [3, 2]]
    # the validation pass does not mask test items: same matrices here, so only train is masked
    assert 0 not in res["topk"][0] and 4 not in res["topk"][1]


def test_evaluate_blocks_give_same_result():
    rng = np.random.default_rng(0)
    scores = rng.normal(size=(40, 30))
    train = _csr(rng.integers(0, 40, 80), rng.integers(0, 30, 80), (40, 30))
    train.data[:] = 1
    test = _csr(np.arange(40), rng.integers(0, 30, 40), (40, 30))
    test = test - test.multiply(train)
    test.eliminate_zeros()
    ds = _DS(train, test, test)
    a = evaluate(_FixedScores(scores), ds, "test", [5, 10], batch_users=7)["metrics"]
    b = evaluate(_FixedScores(scores), ds, "test", [5, 10], batch_users=1000)["metrics"]
    for k in a:
        assert a[k] == pytest.approx(b[k])


def test_cpu_score_blocks_stay_under_the_byte_cap(monkeypatch):
    """On CPU a block of scores holds at most CPU_SCORE_BLOCK_BYTES (Baby: 1,189 of 2,048 users at 7,050
    items); other devices keep eval_batch_size; and a capped pass scores like one block."""
    from mmrec import evaluation
    assert evaluation.block_users(2048, 7050, "cpu") == (32 << 20) // (4 * 7050) == 1189
    assert evaluation.block_users(2048, 100, "cpu") == 2048
    assert evaluation.block_users(2048, 10**9, "cpu") == 1
    assert evaluation.block_users(2048, 7050, "cuda") == 2048
    seen = []

    class Recording(_FixedScores):
        def full_sort_predict(self, interaction):
            seen.append(len(interaction["users"]))
            return super().full_sort_predict(interaction)

    rng = np.random.default_rng(1)
    scores = rng.normal(size=(12, 30))
    train = _csr(np.arange(12), rng.integers(0, 30, 12), (12, 30))
    test = _csr(np.arange(12), (rng.integers(1, 29, 12) + train.indices) % 30, (12, 30))
    ds = _DS(train, test, test)
    whole = evaluate(Recording(scores), ds, "test", [5])["metrics"]
    monkeypatch.setattr(evaluation, "CPU_SCORE_BLOCK_BYTES", 4 * 30 * 5)  # 5 users of 30 items per block
    seen.clear()
    capped = evaluate(Recording(scores), ds, "test", [5])["metrics"]
    assert seen == [5, 5, 2]
    assert capped == pytest.approx(whole)


def _hard_rows(n_items: int, seed: int = 0) -> torch.Tensor:
    """Score rows that break a careless top-k: ties, -inf rows (all training items), NaN, a short tail."""
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(12, n_items, generator=g)
    s[0] = -torch.inf
    s[0, n_items // 2] = 1.0                      # one rankable item
    s[1, 3:] = -torch.inf                         # three
    s[2] = torch.round(s[2])                      # many ties
    s[3, 7] = float("nan")
    s[4, -1] = 50.0                               # the best item in the short last block
    s[5] = 0.0                                    # all equal
    return s


@pytest.mark.skipif(native.row_topk(torch.zeros(1, 1), 1) is None, reason="no C compiler on this machine")
@pytest.mark.parametrize("n_items,k", [(7050, 20), (1000, 50), (33, 20), (20, 20), (5000, 1)])
def test_compiled_row_topk_ranks_like_torch_topk(n_items, k):
    """Same scores at every rank as torch.topk (equal scores may swap items), distinct valid items, NaN
    never ranked ahead of a number."""
    s = _hard_rows(n_items)
    got = native.row_topk(s, k)
    ref_scores = s.nan_to_num(nan=-torch.inf, posinf=torch.inf, neginf=-torch.inf)
    want = torch.topk(ref_scores, k, dim=1).indices
    assert got.shape == (12, k) and bool((got >= 0).all()) and bool((got < n_items).all())
    assert all(len(set(row.tolist())) == k for row in got)
    torch.testing.assert_close(ref_scores.gather(1, got), ref_scores.gather(1, want))
    assert got[4, 0] == n_items - 1 and got[0, 0] == n_items // 2
    if k > 1:
        assert got[5].tolist() == list(range(k))  # ties: the lower item first


def test_topk_indices_without_the_compiled_kernel_is_torch_topk(monkeypatch):
    s = _hard_rows(300)[1:3]
    monkeypatch.setattr(native, "row_topk", lambda scores, k: None)
    assert torch.equal(topk_indices(s, 20), torch.topk(s, 20, dim=1).indices)
    assert topk_indices(s, 500).shape == (2, 300)  # k beyond the row: every item
