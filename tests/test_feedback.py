"""Negative feedback: targets split by rating, the not-to-recommend objective against a direct computation
on materialised logits, and the counterfactual responsiveness measure."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import small_split, tiny
from unirec.data import TokenBuilder, TrainBatches, leave_one_out, synthetic
from unirec.models import ModelConfig, UniRec
from unirec.models.objectives import feedback_targets


@pytest.fixture(scope="module")
def small():
    return small_split()


def test_batches_carry_the_rating_of_each_target(small):
    ds, sp = small
    tb = TokenBuilder.for_config(sp, tiny())
    users = np.nonzero(sp.train_len >= 4)[0][:12]
    b = tb.train_batch(users, np.random.default_rng(0), candidates=False)
    for u in range(len(users)):
        s, e = int(b.offsets[u]), int(b.offsets[u + 1])
        for i in range(s, e - 1):  # inside a stream the next event is the next token
            if b.next_items[i] > 0:
                assert b.next_ratings[i] == b.ratings[i + 1]
        assert b.first_ratings[u] == b.ratings[s]
    # the last token's target is the event after the window: its rating from the split
    ev = sp.user_offsets[users] + sp.train_len[users] - 1
    last = b.offsets[1:] - 1
    assert torch.equal(b.next_items[last], torch.from_numpy(sp.items[ev]).long())
    assert torch.equal(b.next_ratings[last], torch.from_numpy(sp.ratings[ev]))


def test_augmented_copies_carry_the_rating_of_each_target(small):
    ds, sp = small
    cfg = tiny()
    tb = TrainBatches(TokenBuilder.for_config(sp, cfg), batch_size=16, seed=1, candidates=False,
                      augment={"crop": 0.5, "reorder": 0.5, "mask": 0.3})
    b = next(iter(tb.epoch(0)))
    n = b.batch_size // 2
    for u in range(n, 2 * n):
        s, e = int(b.offsets[u]), int(b.offsets[u + 1])
        for i in range(s, e - 1):
            if b.next_items[i] > 0:
                assert b.next_ratings[i] == b.ratings[i + 1]
        if e > s:  # the copy's last event predicts the original's last target
            o = int(b.offsets[u - n + 1]) - 1
            assert b.next_items[e - 1] == b.next_items[o]
            assert torch.equal(b.next_ratings[e - 1], b.next_ratings[o]) or (
                torch.isnan(b.next_ratings[e - 1]) and torch.isnan(b.next_ratings[o]))


def test_feedback_targets_split_by_rating():
    from unirec.data.batch import pack_streams
    items = np.array([1, 2, 3, 4, 5, 6], dtype=np.int64)
    ratings = np.array([5, 1, 2, np.nan, 4, 3], dtype=np.float32)
    b = pack_streams([0, 1], items, ratings, np.zeros(6, np.int64), [(0, 3), (3, 6)], [(3, 3), (6, 6)],
                     np.array([3, 6]))
    pos, neg = feedback_targets(b, 2.0, False), feedback_targets(b, 2.0, True)
    assert pos.next_items.tolist() == [0, 0, 0, 5, 6, 0] and neg.next_items.tolist() == [2, 3, 0, 0, 0, 0]
    assert pos.first_items.tolist() == [1, 4] and neg.first_items.tolist() == [0, 0]  # NaN counts as positive
    assert feedback_targets(b, None, False) is b
    assert int((feedback_targets(b, None, True).next_items > 0).sum()) == 0


def test_not_to_recommend_needs_a_negative_rating():
    with pytest.raises(ValueError, match="negative_max_rating"):
        ModelConfig(objectives={"retrieval": 1.0, "not_to_recommend": 0.5})


@pytest.mark.parametrize("repeat_bias", [False, True])
def test_feedback_losses_match_materialised_softmax(small, repeat_bias):
    """retrieval over the positive targets + w * mean over the negative ones of -log(1 - p), with p the
    softmax over the catalogue (with the repeat offsets of each token's seen items; profile targets
    without), equals the model's loss in value and in every gradient."""
    ds, sp = small
    torch.manual_seed(0)
    w, neg_max = 0.7, 3.0
    cfg = tiny(repeat_bias=repeat_bias, num_repeat_buckets=4, objectives={"retrieval": 1.0, "not_to_recommend": w},
               negative_max_rating=neg_max)
    m = UniRec.from_dataset(ds, cfg).eval()
    if repeat_bias:
        m.scorer.repeat_raw.data.copy_(torch.tensor([-2.0, 1.5, -0.5, 0.7]) / m.scorer.REPEAT_SCALE)
    tb = TokenBuilder.for_config(sp, cfg)
    b = tb.train_batch(np.nonzero(sp.train_len >= 6)[0][:10], None, candidates=False)
    assert bool((b.next_ratings <= neg_max).any()) and bool((b.next_ratings > neg_max).any())
    loss, parts = m(b)
    loss.backward()
    params = [p for p in m.parameters() if p.grad is not None]
    grads = [p.grad.clone() for p in params]
    m.zero_grad()

    enc = m.encode(b)
    z = enc.hidden @ enc.item_rep.T
    z[:, 0] = float("-inf")
    pos_rows, neg_rows = [], []

    def add(logits, target, rating):
        ce = F.cross_entropy(logits.unsqueeze(0), torch.tensor([target]))
        if rating <= neg_max:
            neg_rows.append(-torch.log1p(-torch.exp(-ce)))
        else:
            pos_rows.append(ce)

    for u in range(b.batch_size):
        s, e = int(b.offsets[u]), int(b.offsets[u + 1])
        for i in range(s, e):
            if b.next_items[i] == 0:
                continue
            bias = torch.zeros(ds.num_items + 1)
            if repeat_bias:
                seen = b.items[s:i + 1].tolist()
                for it in set(seen):
                    d = (i - s) - max(j for j, x in enumerate(seen) if x == it)
                    bias[it] = m.scorer.repeat_offsets()[min(int(math.log2(1 + d)), 3)]
            add(z[enc.hist_pos[i]] + bias, int(b.next_items[i]), float(b.next_ratings[i]))
        add(z[enc.profile_pos[u]], int(b.first_items[u]), float(b.first_ratings[u]))
    want = torch.stack(pos_rows).mean() + w * torch.stack(neg_rows).mean()
    torch.testing.assert_close(loss, want, rtol=1e-5, atol=1e-5)
    assert parts["not_to_recommend"] == pytest.approx(float(torch.stack(neg_rows).mean().detach()), rel=1e-4)
    want.backward()
    for p, g in zip(params, grads):
        torch.testing.assert_close(g, p.grad, rtol=1e-4, atol=1e-6)


def test_not_to_recommend_is_skipped_without_negative_targets(small):
    ds, sp = small
    cfg = tiny(objectives={"retrieval": 1.0, "not_to_recommend": 1.0}, negative_max_rating=0.5)
    m = UniRec.from_dataset(ds, cfg)
    b = TokenBuilder.for_config(sp, cfg).train_batch(np.nonzero(sp.train_len >= 4)[0][:8], None, candidates=False)
    loss, parts = m(b)
    assert "not_to_recommend" not in parts and torch.isfinite(loss)


@pytest.fixture(scope="module")
def trained(small):
    from unirec.training import TrainConfig, Trainer
    ds, sp = small
    torch.manual_seed(0)
    cfg = tiny(repeat_bias=True)
    m = UniRec.from_dataset(ds, cfg)
    Trainer(m, TrainBatches(TokenBuilder.for_config(sp, cfg), 32, m.needs_candidates),
            TrainConfig(epochs=3, batch_size=32, lr=5e-3, warmup_steps=2), progress=False, log=lambda s: None).fit()
    return m


def test_responsiveness_single_user_matches_direct_scoring(small, trained):
    """One user at a time: x (drawn from the top 10, not the test item), its rank after a dislike token
    and the test item's NDCG, from scorer.item_scores over the whole catalogue."""
    from unirec.data import History, live_token_batch
    from unirec.evaluation.metrics import ndcg_at_k
    from unirec.evaluation.responsiveness import responsiveness
    ds, sp = small
    m = trained.eval()
    rep = m.item_representations().float()
    all_items = torch.arange(1, ds.num_items + 1).view(1, -1)
    for u in sp.eval_users[:4]:
        r = responsiveness(m, sp, users=[u], seed=3)
        h = History.of_user(sp, int(u), "valid")
        pos = sp.stage_positions("test", np.array([u]))[0]
        target = int(sp.items[pos])

        def scores(hist):
            b = live_token_batch([hist], m.config.max_len, m.config.num_time_buckets)
            q = m.predict(b, rep)["queries"]
            s = m.scorer.item_scores(q, rep, all_items, b.history_items, b.history_offsets)[0]
            s[torch.from_numpy(h.items - 1)] = float("-inf")
            return s
        s0 = scores(h)
        top = (torch.topk(s0, 10).indices + 1).tolist()
        cand = [i for i in top if i != target]
        x = cand[int(np.random.default_rng(3).random(1)[0] * len(cand))]
        ev = History(np.array([x]), np.array([float(sp.ratings.min())], np.float32), np.array([h.timestamps[-1] + 60]))
        s1 = scores(h.concat(ev))
        assert r["dislike"]["item_rank_median"] == int((s1 >= s1[x - 1]).sum())
        assert r["dislike"]["item_in_top10"] == float(x in (torch.topk(s1, 10).indices + 1).tolist())
        if sp.ratings[pos] > 2:
            want = float(ndcg_at_k(torch.tensor([int((s1 >= s1[target - 1]).sum())]), 10)[0])
            assert r["dislike"]["ndcg@10_positive"] == pytest.approx(want)


def test_dismiss_never_returns_and_demotion_moves_neighbours(small, trained):
    from unirec.evaluation.responsiveness import responsiveness
    ds, sp = small
    out = {d: responsiveness(trained, sp, demotion=d)["dismiss"] for d in (0.0, 1.5, 1e6)}
    assert all(o["item_in_top10"] == 0.0 for o in out.values())
    assert out[0.0]["neighbours_left"] == 0.0  # without demotion only x leaves: the others move up
    assert out[0.0]["neighbours_left"] <= out[1.5]["neighbours_left"] <= out[1e6]["neighbours_left"]
    assert out[1e6]["neighbours_left"] > 0.5 and out[1.5]["neighbours_in_top10"] > 0


def test_responsiveness_needs_ratings(small, trained):
    from unirec.evaluation.responsiveness import responsiveness
    ds, sp = small
    sp2 = leave_one_out(synthetic(num_users=120, num_items=150, num_clusters=5, mean_length=15, seed=3))
    sp2.ratings = None
    with pytest.raises(ValueError, match="ratings"):
        responsiveness(trained, sp2)


# --------------------------------------------------------------------------- the dislike head and re-ranking


def _dislike_model(ds, depth=7, b=2.5, **kw):
    torch.manual_seed(0)
    cfg = tiny(objectives={"retrieval": 1.0, "dislike": 0.6}, dislike_rerank=b, rerank_depth=depth, **kw)
    m = UniRec.from_dataset(ds, cfg).eval()
    with torch.no_grad():  # logits of a few units, so that re-ranking moves items
        m.objectives["dislike"].mlp[-1].weight.mul_(20.0)
    return m


def test_dislike_loss_matches_a_direct_computation(small):
    """BCE of mlp([h, h * e_t]) against rating <= dislike_max_rating over every rated next-item and profile
    target, beside the retrieval softmax over all targets, in value and in the head's gradient."""
    ds, sp = small
    w = 0.6
    m = _dislike_model(ds, dislike_max_rating=3.0)
    tb = TokenBuilder.for_config(sp, m.config)
    b = tb.train_batch(np.nonzero(sp.train_len >= 6)[0][:10], None, candidates=False)
    b.next_ratings[torch.nonzero(b.next_items)[::7, 0]] = float("nan")  # unrated targets are skipped
    loss, parts = m(b)
    head = m.objectives["dislike"].mlp
    loss.backward()
    grads = [p.grad.clone() for p in head.parameters()]
    m.zero_grad()
    enc = m.encode(b)
    rows, labels = [], []
    for u in range(b.batch_size):
        pairs = [(enc.hist_pos[i], b.next_items[i], b.next_ratings[i])
                 for i in range(int(b.offsets[u]), int(b.offsets[u + 1])) if b.next_items[i] > 0]
        pairs.append((enc.profile_pos[u], b.first_items[u], b.first_ratings[u]))
        for pos, item, rating in pairs:
            if torch.isnan(rating):
                continue
            h, e = enc.hidden[pos], enc.item_rep[item]
            logit = head(torch.cat([h, h * e]))[0]
            labels.append(bool(rating <= 3.0))
            rows.append(F.binary_cross_entropy_with_logits(logit, torch.tensor(float(labels[-1]))))
    want = torch.stack(rows).mean()
    assert 0 < sum(labels) < len(labels) < int((b.next_items > 0).sum()) + b.batch_size
    assert parts["dislike"] == pytest.approx(float(want.detach()), rel=1e-5)
    torch.testing.assert_close(loss, parts["retrieval"] + w * want, rtol=1e-5, atol=1e-5)
    (w * want).backward()
    for p, g in zip(head.parameters(), grads):
        torch.testing.assert_close(g, p.grad, rtol=1e-4, atol=1e-6)


@torch.no_grad()
def _brute_reranked_ranks(m, q, rep, targets, hi, ho, mask, kmax):
    """Stage one: the retrieval top rerank_depth of the ranked items (unseen + target when masked);
    stage two: score + b log sigmoid(-dislike logit); the target's pessimistic place in stage two."""
    n, depth, b = rep.shape[0] - 1, m.config.rerank_depth, m.config.dislike_rerank
    everything = torch.arange(1, n + 1).view(1, -1)
    out = []
    for r in range(q.shape[0]):
        h = hi[int(ho[r]):int(ho[r + 1])]
        s = m.scorer.item_scores(q[r:r + 1], rep, everything, h, torch.tensor([0, h.numel()]))[0]
        t = int(targets[r])
        pool = [i for i in range(1, n + 1) if i != t and not (mask and i in set(h.tolist()))]
        pool.sort(key=lambda i: -float(s[i - 1]))
        if sum(float(s[i - 1]) >= float(s[t - 1]) for i in pool) > depth - 1:
            out.append(kmax + 1)
            continue
        head = m.objectives["dislike"]
        f = lambda i: float(s[i - 1]) + b * float(F.logsigmoid(-head.logits(q[r], rep, torch.tensor(i))))  # noqa
        out.append(min(kmax + 1, 1 + sum(f(i) >= f(t) for i in pool[:depth - 1])))
    return out


@pytest.mark.parametrize("mask", [True, False])
def test_reranked_target_ranks_match_a_direct_computation(small, mask):
    ds, sp = small
    m = _dislike_model(ds, repeat_bias=True, num_repeat_buckets=4)
    # the latest item is not pushed down: as a target it is often in the top, outside the masked list
    m.scorer.repeat_raw.data.copy_(torch.tensor([0.0, -2.0, -0.5, 0.7]) / m.scorer.REPEAT_SCALE)
    users = sp.eval_users[:40]
    b = TokenBuilder.for_config(sp, m.config).case_batch(users, sp.stage_positions("test", users))
    rep = m.item_representations().float()
    q = m.predict(b, rep)["queries"]
    # half the targets from the retrieval top 5, so that stage two decides their rank
    top = m.scorer.topk(q, rep, 5, b.history_items, b.history_offsets, exclude_history=mask)[1]
    # and a quarter of them the user's latest item (a seen target: excluded from the list when masked)
    row = torch.arange(len(users))
    targets = torch.where(row % 2 == 0, top[:, 4], b.targets)
    targets = torch.where(row % 4 == 1, b.history_items[b.history_offsets[1:] - 1], targets)
    got = m.reranked_target_ranks(q, rep, targets, b.history_items, b.history_offsets, mask, kmax=10)
    want = _brute_reranked_ranks(m, q, rep, targets, b.history_items, b.history_offsets, mask, 10)
    assert got.tolist() == want
    plain = m.scorer.target_ranks(q, rep, targets, b.history_items, b.history_offsets, mask, kmax=10)
    assert not torch.equal(got, plain)  # the head moved some targets
    m.config.dislike_rerank = 0.0       # without re-ranking: the retrieval ranks
    assert torch.equal(m.reranked_target_ranks(q, rep, targets, b.history_items, b.history_offsets, mask, kmax=5),
                       m.scorer.target_ranks(q, rep, targets, b.history_items, b.history_offsets, mask, kmax=5))


def test_recommend_reranks_the_retrieval_top(small):
    ds, sp = small
    m = _dislike_model(ds, depth=12)
    users = sp.eval_users[:6]
    b = TokenBuilder.for_config(sp, m.config).case_batch(users, sp.stage_positions("test", users))
    vals, items = m.recommend(b, 5)
    p = m.predict(b)
    v12, i12 = m.scorer.topk(p["queries"], p["item_rep"], 12, b.history_items, b.history_offsets)
    f = m.rerank_scores(p["queries"], p["item_rep"], i12, v12)
    order = f.argsort(1, descending=True)[:, :5]
    assert torch.equal(items, i12.gather(1, order))
    torch.testing.assert_close(vals, f.gather(1, order))
    assert not torch.equal(items, i12[:, :5])
    # an empty catalogue list past its end stays -1
    v, i = m.rerank_top(p["queries"][:1], p["item_rep"], torch.tensor([[1.0, float("-inf")]]), torch.tensor([[3, -1]]), 2)
    assert i.tolist() == [[3, -1]] and v[0, 1] == float("-inf")


def test_rerank_catalogue_orders_like_rerank_top(small):
    """The explicit-score form of the re-ranking: its top equals rerank_top's, the items past the depth keep
    their retrieval order below it, and excluded items stay -inf."""
    ds, sp = small
    m = _dislike_model(ds, depth=9)
    users = sp.eval_users[:5]
    b = TokenBuilder.for_config(sp, m.config).case_batch(users, sp.stage_positions("test", users))
    p = m.predict(b)
    q, rep = p["queries"], p["item_rep"]
    s = q @ rep[1:].T
    s[:, :3] = float("-inf")
    out = m.rerank_catalogue(q, rep, s)
    v, i = s.topk(9, dim=1)
    want_v, want_i = m.rerank_top(q, rep, v, i + 1, 9)
    got_v, got_i = out.topk(9, dim=1)
    assert torch.equal(got_i + 1, want_i)
    torch.testing.assert_close(got_v, want_v)
    rest = torch.ones_like(s, dtype=torch.bool).scatter(1, i, False) & torch.isfinite(s)
    for r in range(len(users)):
        assert torch.equal(out[r][rest[r]].argsort(), s[r][rest[r]].argsort())
        assert float(out[r][rest[r]].max()) < float(got_v[r].min())
    assert bool(torch.isinf(out[:, :3]).all())
