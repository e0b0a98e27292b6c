import math

import pytest
import torch

from unirec.evaluation import (RankingAccumulator, auc, embedding_score_fn, evaluate_full_ranking, gauc,
                               hit_rate_at_k, like_metrics, mae, mrr_at_k, ndcg_at_k, ranking_metrics,
                               rating_metrics, rmse, target_ranks)


def brute_rank(scores_row, target, history, mask_history=True):
    """1 + number of other eligible items scored >= the target (pessimistic ties)."""
    t = scores_row[target]
    r = 1
    for i, s in enumerate(scores_row.tolist()):
        if i == 0 or i == target or (mask_history and i in history):
            continue
        r += s >= t
    return r


def test_ranks_hand_computed_with_ties():
    # item:             pad  1    2    3    4
    s = torch.tensor([[9.0, 0.9, 0.5, 0.5, 0.1]] * 4)
    ranks = target_ranks(s, torch.tensor([1, 2, 3, 4]))
    # items 2 and 3 tie: each is placed after the other (pessimistic), the padding item never counts.
    assert ranks.tolist() == [1, 3, 3, 4]


def test_constant_scores_rank_last():
    s = torch.zeros(3, 11)
    ranks = target_ranks(s, torch.tensor([1, 5, 10]))
    assert ranks.tolist() == [10, 10, 10]  # 10 real items: the target is after all 9 others


def test_history_masking_on_off_and_target_never_masked():
    s = torch.tensor([[0.0, 0.9, 0.5, 0.5, 0.1],
                      [0.0, 0.9, 0.5, 0.5, 0.1]])
    targets = torch.tensor([2, 3])
    hist = torch.tensor([1, 3, 2])  # user 0 saw item 1; user 1 saw items 3 (= its target, a repeat) and 2
    hoff = torch.tensor([0, 1, 3])
    masked = target_ranks(s, targets, hist, hoff, mask_history=True)
    unmasked = target_ranks(s, targets, hist, hoff, mask_history=False)
    assert masked.tolist() == [2, 2]  # user 1: item 2 masked, target 3 kept, item 1 above
    assert unmasked.tolist() == [3, 3]


def test_metric_values_hand_computed():
    ranks = torch.tensor([1, 2, 3, 11, 25])
    assert float(ndcg_at_k(ranks, 10).mean()) == pytest.approx((1 + 1 / math.log2(3) + 0.5) / 5)
    assert float(hit_rate_at_k(ranks, 10).mean()) == pytest.approx(3 / 5)
    assert float(mrr_at_k(ranks, 10).mean()) == pytest.approx((1 + 1 / 2 + 1 / 3) / 5)
    m = ranking_metrics(ranks, ks=(5, 10, 20))
    assert m["hr@5"] == pytest.approx(3 / 5)
    assert m["hr@20"] == pytest.approx(4 / 5)
    assert m["ndcg@20"] == pytest.approx((1 + 1 / math.log2(3) + 0.5 + 1 / math.log2(12)) / 5)
    assert m["mrr@20"] == pytest.approx((1 + 1 / 2 + 1 / 3 + 1 / 11) / 5)
    assert set(m) == {f"{n}@{k}" for n in ("ndcg", "hr", "mrr") for k in (5, 10, 20)}


@pytest.mark.parametrize("mask_history", [True, False])
def test_full_ranking_matches_brute_force_in_any_chunking(mask_history):
    B, N = 37, 23
    scores = torch.randint(0, 6, (B, N)).float()  # many ties
    targets = torch.randint(1, N, (B,))
    lens = torch.randint(0, 6, (B,))
    hoff = torch.cat([torch.zeros(1, dtype=torch.int64), torch.cumsum(lens, 0)])
    hist = torch.randint(1, N, (int(lens.sum()),))
    expected = torch.tensor([brute_rank(scores[b], int(targets[b]), set(hist[hoff[b]:hoff[b + 1]].tolist()),
                                        mask_history) for b in range(B)])
    full = evaluate_full_ranking(scores, targets, hist, hoff, mask_history=mask_history, return_ranks=True)
    assert torch.equal(full["ranks"], expected)
    assert full["mask_history"] is mask_history and full["num_users"] == B
    for chunk in (1, 5, 100):
        fn = lambda s, e: scores[s:e]  # noqa: E731
        out = evaluate_full_ranking(fn, targets, hist, hoff, mask_history=mask_history, chunk_size=chunk,
                                    return_ranks=True)
        assert torch.equal(out["ranks"], expected)
        assert out["ndcg@10"] == pytest.approx(full["ndcg@10"])
    small = evaluate_full_ranking(scores, targets, hist, hoff, mask_history=mask_history, max_elements=N * 3)
    assert small["hr@20"] == pytest.approx(full["hr@20"])


def test_embedding_score_fn_and_accumulator():
    q, w, b = torch.randn(9, 4), torch.randn(15, 4), torch.randn(15)
    fn = embedding_score_fn(q, w, b)
    torch.testing.assert_close(fn(2, 7), q[2:7] @ w.T + b)
    targets = torch.randint(1, 15, (9,))
    res = evaluate_full_ranking(fn, targets, num_items=15, chunk_size=4, return_ranks=True)
    acc = RankingAccumulator()
    acc.add(q @ w.T + b, targets)
    assert torch.equal(acc.ranks, res["ranks"])
    assert acc.compute()["ndcg@10"] == pytest.approx(res["ndcg@10"])


def test_rank_input_errors():
    with pytest.raises(ValueError, match="NaN"):
        target_ranks(torch.tensor([[0.0, float("nan"), 1.0]]), torch.tensor([2]))
    with pytest.raises(ValueError, match=r"targets must lie in \[1, 3\)"):
        target_ranks(torch.zeros(1, 3), torch.tensor([0]))
    with pytest.raises(ValueError, match="num_items"):
        evaluate_full_ranking(lambda s, e: torch.zeros(e - s, 3), torch.tensor([1]))


def brute_auc(s, y):
    pos = [a for a, l in zip(s, y) if l]
    neg = [a for a, l in zip(s, y) if not l]
    if not pos or not neg:
        return math.nan
    return sum((p > n) + 0.5 * (p == n) for p in pos for n in neg) / (len(pos) * len(neg))


def test_auc_hand_computed_and_ties():
    assert auc(torch.tensor([0.1, 0.4, 0.35, 0.8]), torch.tensor([0, 0, 1, 1])) == pytest.approx(0.75)
    assert auc(torch.tensor([0.5, 0.5]), torch.tensor([0, 1])) == pytest.approx(0.5)
    assert auc(torch.tensor([1.0, 2.0, 3.0]), torch.tensor([0, 1, 1])) == pytest.approx(1.0)
    assert math.isnan(auc(torch.tensor([1.0, 2.0]), torch.tensor([1, 1])))
    s = torch.randint(0, 5, (200,)).float()
    y = torch.rand(200) < 0.4
    assert auc(s, y) == pytest.approx(brute_auc(s.tolist(), y.tolist()))


def test_gauc_weights_and_skips_single_class_users():
    s = torch.tensor([0.9, 0.1, 0.5, 0.2, 0.8, 0.3, 0.7, 0.6])
    y = torch.tensor([1, 0, 0, 1, 1, 1, 1, 0])
    g = torch.tensor([7, 7, 3, 3, 3, 9, 9, 5])
    # user 7: AUC 1 (2 samples); user 3: positives {0.2, 0.8} vs negative 0.5 -> 0.5 (3 samples);
    # user 9: only positives (skipped); user 5: only a negative (skipped).
    assert gauc(s, y, g) == pytest.approx((1.0 * 2 + 0.5 * 3) / 5)
    assert math.isnan(gauc(torch.tensor([0.1, 0.2]), torch.tensor([1, 1]), torch.tensor([0, 1])))
    # Against brute force with ties, groups interleaved.
    s = torch.randint(0, 4, (300,)).float()
    y = torch.rand(300) < 0.5
    g = torch.randint(0, 20, (300,))
    num = den = 0.0
    for u in g.unique().tolist():
        m = g == u
        a = brute_auc(s[m].tolist(), y[m].tolist())
        if not math.isnan(a):
            num += a * int(m.sum())
            den += int(m.sum())
    assert gauc(s, y, g) == pytest.approx(num / den)


def test_rmse_mae_and_groups():
    pred, true = torch.tensor([3.0, 4.0, 5.0, 1.0]), torch.tensor([4.0, 4.0, 3.0, 1.0])
    assert rmse(pred, true) == pytest.approx(math.sqrt((1 + 0 + 4 + 0) / 4))
    assert mae(pred, true) == pytest.approx(3 / 4)
    assert rating_metrics(pred, true) == {"rmse": rmse(pred, true), "mae": mae(pred, true)}
    lm = like_metrics(torch.tensor([0.9, 0.2, 0.6, 0.4]), torch.tensor([5.0, 2.0, 4.0, 4.0]),
                      torch.tensor([1, 1, 2, 2]))
    assert lm["auc"] == pytest.approx(brute_auc([0.9, 0.2, 0.6, 0.4], [1, 0, 1, 1]))
    assert lm["gauc"] == pytest.approx(1.0)  # user 2 has only likes: skipped


def test_feedback_metrics_split_disliked_from_liked_targets():
    from unirec.evaluation.model_eval import feedback_metrics
    ranks = torch.tensor([1, 5, 11, 30, 2, 1])
    ratings = [1.0, 2.0, 2.0, 5.0, 3.0, 4.0]   # three disliked (<= 2), three liked
    m = feedback_metrics(ranks, ratings)
    assert m["neghit@10"] == pytest.approx(2 / 3)  # ranks 1 and 5 are in the top 10, 11 is not
    expect = (0.0 + 1 / math.log2(3) + 1.0) / 3    # liked ranks 30, 2, 1
    assert m["ndcg@10_positive"] == pytest.approx(expect)
    assert (m["num_negative"], m["num_positive"]) == (3, 3)
    none = feedback_metrics(torch.tensor([3]), [4.0])
    assert math.isnan(none["neghit@10"]) and none["num_negative"] == 0
