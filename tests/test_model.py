"""UniRec: config, shapes, masking of candidates, impl parity, ranks, and learning planted structure."""
import math

import numpy as np
import pytest
import torch

from unirec.data import leave_one_out, synthetic
from unirec.evaluation import evaluate_model, popularity_baseline, target_ranks, topk_ranks
from unirec.models import TokenBuilder, UniRec, UniRecConfig, gather_bags, preset
from unirec.training import TrainConfig, Trainer


@pytest.fixture(scope="module")
def small():
    ds = synthetic(num_users=120, num_items=150, num_clusters=5, mean_length=15, seed=3)
    return ds, leave_one_out(ds)


def tiny(name="unified", **kw):
    return preset(name, **{"dim": 16, "num_blocks": 1, "num_heads": 2, "max_len": 20, "dropout": 0.0, **kw})


def test_config_json_roundtrip_and_presets():
    c = preset("hstu", dim=32)
    assert UniRecConfig.from_json(c.to_json()) == c
    s = preset("sasrec")
    assert not (s.use_item_features or s.use_rating or s.use_time or s.use_profile or s.ranking_head)
    assert s.attention == "softmax"
    with pytest.raises(ValueError, match="attention"):
        UniRecConfig(attention="relu")
    with pytest.raises(ValueError, match="unknown"):
        UniRecConfig.from_dict({"nope": 1})


@pytest.mark.parametrize("name,kw", [("unified", {}), ("sasrec", {}), ("hstu", {}),
                                     ("unified", {"feature_mix": "mix", "retrieval_loss": "sampled"})])
def test_loss_backward_and_predict_shapes(small, name, kw):
    ds, sp = small
    cfg = tiny(name, **kw)
    m = UniRec.from_dataset(ds, cfg)
    tb = TokenBuilder.for_config(sp, cfg)
    users = np.nonzero(sp.train_len >= 2)[0][:16]
    b = tb.train_batch(users, np.random.default_rng(0), candidates=cfg.ranking_head)
    loss, parts = m.loss(b)
    assert math.isfinite(loss.item()) and "retrieval" in parts
    loss.backward()
    assert m.item_weight.grad is not None and torch.isfinite(m.item_weight.grad).all()
    e = tb.eval_batch("valid", sp.eval_users[:10])
    p = m.predict(e)
    assert p["queries"].shape == (10, 16) and p["item_rep"].shape == (ds.num_items + 1, 16)
    assert torch.all(p["item_rep"][0] == 0)
    if cfg.ranking_head:
        assert p["rating"].shape == (10,) and ((p["like"] >= 0) & (p["like"] <= 1)).all()
    vals, idx = m.recommend(e, 5)
    assert idx.shape == (10, 5) and (idx >= 1).all()
    for r in range(10):  # history never recommended
        h = set(e.history_items[e.history_offsets[r]:e.history_offsets[r + 1]].tolist())
        assert not h & set(idx[r].tolist())


def test_candidates_do_not_see_each_other_nor_leak_into_history(small):
    ds, sp = small
    cfg = tiny()
    m = UniRec.from_dataset(ds, cfg).eval()
    tb = TokenBuilder.for_config(sp, cfg)
    users = np.nonzero(sp.train_len >= 8)[0][:4]
    b = tb.train_batch(users, None, candidates=True)
    assert (torch.diff(b.cand_offsets) >= 2).all()
    enc = m.encode(b)
    out = m.rank_outputs(enc, b.cand_items)[0]
    b2 = tb.train_batch(users, None, candidates=True)
    b2.cand_items = b2.cand_items.clone()
    b2.cand_items[b2.cand_offsets[:-1] + 1] = (b2.cand_items[b2.cand_offsets[:-1] + 1] % ds.num_items) + 1
    enc2 = m.encode(b2)
    out2 = m.rank_outputs(enc2, b2.cand_items)[0]
    first = b.cand_offsets[:-1]
    torch.testing.assert_close(out[first], out2[first])  # another candidate changed: no effect
    torch.testing.assert_close(enc["hidden"][enc["hist_pos"]], enc2["hidden"][enc2["hist_pos"]])


def test_reference_impl_matches_fast_impl(small):
    ds, sp = small
    torch.manual_seed(0)
    m = UniRec.from_dataset(ds, tiny("hstu")).eval()
    ref = UniRec(UniRecConfig.from_dict({**m.config.to_dict(), "impl": "reference"})).eval()
    ref.load_state_dict(m.state_dict())
    tb = TokenBuilder.for_config(sp, m.config)
    b = tb.train_batch(np.nonzero(sp.train_len >= 2)[0][:12], np.random.default_rng(1))
    l1, _ = m.loss(b)
    l2, _ = ref.loss(b)
    torch.testing.assert_close(l1, l2, atol=1e-4, rtol=1e-4)
    e = tb.eval_batch("test", sp.eval_users[:12])
    torch.testing.assert_close(m.recommend(e, 7)[1], ref.recommend(e, 7)[1])


def test_topk_ranks_match_pessimistic_full_ranks():
    g = torch.Generator().manual_seed(0)
    B, N, D = 40, 60, 4
    q = torch.randint(-2, 3, (B, D), generator=g).float()
    items = torch.randint(-2, 3, (N, D), generator=g).float()  # many ties
    targets = torch.randint(0, N, (B,), generator=g)
    full = target_ranks(q @ items.T, targets, exclude_padding=False)
    got = topk_ranks(q, items, targets, kmax=20)
    assert torch.equal(got, full.clamp(max=21))
    # with exclusions (never the target)
    lens = torch.randint(0, 6, (B,), generator=g)
    off = torch.zeros(B + 1, dtype=torch.int64)
    off[1:] = torch.cumsum(lens, 0)
    ex = torch.randint(0, N, (int(off[-1]),), generator=g)
    rows = torch.repeat_interleave(torch.arange(B), lens)
    ex = torch.where(ex == targets[rows], (ex + 1) % N, ex)
    keep_off = off
    full = target_ranks(q @ items.T, targets, ex, keep_off, exclude_padding=False)
    assert torch.equal(topk_ranks(q, items, targets, keep_off, ex, kmax=20), full.clamp(max=21))


def test_gather_bags_matches_feature_table(small):
    ds, _ = small
    ft = ds.user_features
    allb = ft.bags(torch.arange(ft.num_rows), include_id=False)
    ids = torch.tensor([5, 0, 3, 3, 17])
    ind, off = gather_bags(allb.indices, allb.offsets, len(ft.features), ft.num_rows, ids)
    want = ft.bags(ids, include_id=False)
    assert torch.equal(ind, want.indices) and torch.equal(off, want.offsets)


def test_learns_planted_structure_above_popularity():
    ds = synthetic(num_users=400, num_items=300, num_clusters=6, mean_length=25, affinity=0.9, seed=1)
    sp = leave_one_out(ds)
    torch.manual_seed(0)
    cfg = preset("unified", dim=32, num_blocks=1, num_heads=2, max_len=30, dropout=0.1)
    m = UniRec.from_dataset(ds, cfg)
    Trainer(m, sp, TrainConfig(epochs=6, batch_size=64, lr=5e-3, warmup_steps=5, patience=10),
            progress=False, log=lambda s: None).fit()
    got = evaluate_model(m, TokenBuilder.for_config(sp, cfg), "valid")
    pop = popularity_baseline(sp, "valid")
    assert got["ndcg@10"] > 1.5 * pop["ndcg@10"], (got["ndcg@10"], pop["ndcg@10"])
    assert got["auc"] > 0.6  # likes are planted (ratings high inside the user's cluster)
