"""UniRec: config, shapes, masking of candidates, impl parity, ranks, and learning planted structure."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import small_split, tiny
from unirec.data import TokenBuilder, TrainBatches, leave_one_out, synthetic
from unirec.evaluation import evaluate_model, popularity_baseline, target_ranks
from unirec.models import DataSchema, ModelConfig, UniRec, gather_bags, preset, upgrade_legacy
from unirec.training import TrainConfig, Trainer


@pytest.fixture(scope="module")
def small():
    return small_split()


def test_presets_per_data_set():
    from unirec.models.config import preset_training
    for name in ("unified", "sasrec", "hstu"):
        base, ml1m = preset(name), preset(name, "ml-1m")
        assert ml1m.max_len == 200 and base.max_len < 200  # ML-1M's long histories
        assert (ml1m.dislike_rerank, base.dislike_rerank) == (1.5, 7.0)  # each chosen on its validation
        # only width, depth, window and the re-ranking weight change: what each preset models stays the same
        assert (ml1m.use_item_features, ml1m.use_profile, ml1m.attention, ml1m.objectives) == \
            (base.use_item_features, base.use_profile, base.attention, base.objectives)
        assert preset(name, "ml-1m", max_len=64).max_len == 64  # explicit overrides win
        assert preset(name, "ml-100k") == base and preset(name, "some/path.csv") == base
    assert preset_training("unified")["lr"] == pytest.approx(2.38e-3)
    t = preset_training("unified", "ml-1m")
    assert t["batch_size"] == 128 and t["time_budget_s"] <= 45 * 60


def test_config_json_roundtrip_and_presets():
    c = preset("hstu", dim=32)
    assert ModelConfig.from_json(c.to_json()) == c
    s = preset("sasrec")
    assert not (s.use_item_features or s.use_rating or s.use_time or s.use_profile or s.ranking)
    assert s.attention == "softmax" and s.objectives == {"retrieval": 1.0}
    with pytest.raises(ValueError, match="attention"):
        ModelConfig(attention="relu")
    with pytest.raises(ValueError, match="unknown key 'nope'"):
        ModelConfig.from_dict({"nope": 1})
    with pytest.raises(ValueError, match="unknown key 'num_itemz'"):
        DataSchema.from_dict({"num_itemz": 1})
    with pytest.raises(ValueError, match="unknown objective 'bogus'"):
        ModelConfig(objectives={"retrieval": 1.0, "bogus": 0.5})
    with pytest.raises(ValueError, match="weight of 'ranking'"):
        ModelConfig(objectives={"ranking": -1})


def test_weight_decay_groups_are_declared_by_modules(small):
    """Tables and dense weights decayed (the rel. position bias too); rating, gap and position
    embeddings, biases, norms and vectors not; renaming a module does not change it."""
    ds, _ = small
    m = UniRec.from_dataset(ds, tiny("hstu"))
    decay, no_decay = (set(map(id, g["params"])) for g in m.param_groups(0.1))
    names = {id(p): n for n, p in m.named_parameters()}
    assert not decay & no_decay and len(decay) + len(no_decay) == len(names)
    want_decay = {n for n, p in m.named_parameters() if p.dim() >= 2 and not n.startswith(
        ("stream.rating_emb", "stream.gap_emb", "stream.pos_emb"))}
    assert {names[i] for i in decay} == want_decay
    assert {"items.sources.0.tables.weight", "profile.attributes.tables.weight",
            "stream.blocks.0.attn.rel_bias"} <= want_decay
    m.stream.add_module("renamed_emb", m.stream.blocks)  # a name with "emb" in it decides nothing
    assert {names[i] for i in set(map(id, m.param_groups(0.1)[0]["params"]))} == want_decay


def test_backend_is_a_run_time_setting(small, monkeypatch):
    """set_impl("reference") makes every op family run its reference; the choice is in no config or state."""
    import unirec.ops.embedding as emb_mod
    ds, sp = small
    m = UniRec.from_dataset(ds, tiny())
    assert "impl" not in m.config.to_dict() and not any("impl" in k for k in m.state_dict())
    calls = []
    real = emb_mod.tbe_forward_ref
    monkeypatch.setattr(emb_mod, "tbe_forward_ref", lambda *a, **k: calls.append(1) or real(*a, **k))
    tb = TokenBuilder.for_config(sp, m.config)
    b = tb.train_batch(np.nonzero(sp.train_len >= 2)[0][:4], None)
    m(b)
    assert not calls
    m.set_impl("reference")
    assert {x.impl for x in m.modules() if hasattr(x, "impl")} == {"reference"}
    m(b)
    assert calls
    with pytest.raises(ValueError, match="impl"):
        m.set_impl("fast")


def test_legacy_state_dict_loads_into_the_parts(small):
    """A single-class checkpoint (flat config + its names) maps one to one onto the parts."""
    ds, _ = small
    m = UniRec.from_dataset(ds, tiny("unified", feature_mix="mix"))
    new_to_old = {new: old for old, new in [
        ("item_weight", "items.sources.0.tables.weight"), ("item_mix", "items.fusion.weights"),
        ("cand_emb", "token_types.candidate"), ("repeat_raw", "scorer.repeat_raw"),
        ("rank_mlp.0.weight", "objectives.ranking.mlp.0.weight"), ("blocks.0.attn.qkv.weight",
                                                                  "stream.blocks.0.attn.qkv.weight")]}
    old_state = {new_to_old.get(k, k.split(".", 1)[1] if k.startswith("stream.") else k): v
                 for k, v in m.state_dict().items()}
    flat = {**m.config.to_dict(), **m.schema.to_dict(), "impl": "cpp", "ranking_head": True, "ranking_weight": 0.25,
            "retrieval_loss": "full"}
    del flat["objectives"]
    cfg, schema, state = upgrade_legacy(flat, old_state)
    assert cfg.objectives == {"retrieval": 1.0, "ranking": 0.25} and schema == m.schema
    assert set(new_to_old) <= set(state)
    for k in new_to_old:
        assert torch.equal(state[k], m.state_dict()[k])


@pytest.mark.parametrize("name,kw", [("unified", {}), ("sasrec", {}), ("hstu", {}),
                                     ("unified", {"feature_mix": "mix",
                                                  "objectives": {"sampled_retrieval": 1.0, "ranking": 0.1}})])
def test_loss_backward_and_predict_shapes(small, name, kw):
    ds, sp = small
    cfg = tiny(name, **kw)
    m = UniRec.from_dataset(ds, cfg)
    tb = TokenBuilder.for_config(sp, cfg)
    users = np.nonzero(sp.train_len >= 2)[0][:16]
    b = tb.train_batch(users, np.random.default_rng(0), candidates=m.needs_candidates)
    loss, parts = m(b)
    assert math.isfinite(loss.item()) and set(parts) & {"retrieval", "sampled_retrieval"}
    loss.backward()
    w = m.items.sources[0].tables.weight
    assert w.grad is not None and torch.isfinite(w.grad).all()
    e = tb.eval_batch("valid", sp.eval_users[:10])
    p = m.predict(e)
    assert p["queries"].shape == (10, 16) and p["item_rep"].shape == (ds.num_items + 1, 16)
    assert torch.all(p["item_rep"][0] == 0)
    if cfg.ranking:
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
    out = m.objectives["ranking"].outputs(enc, b.cand_items)[0]
    b2 = tb.train_batch(users, None, candidates=True)
    b2.cand_items = b2.cand_items.clone()
    b2.cand_items[b2.cand_offsets[:-1] + 1] = (b2.cand_items[b2.cand_offsets[:-1] + 1] % ds.num_items) + 1
    enc2 = m.encode(b2)
    out2 = m.objectives["ranking"].outputs(enc2, b2.cand_items)[0]
    first = b.cand_offsets[:-1]
    torch.testing.assert_close(out[first], out2[first])  # another candidate changed: no effect
    torch.testing.assert_close(enc.hidden[enc.hist_pos], enc2.hidden[enc2.hist_pos])


@pytest.mark.parametrize("name,kw", [("unified", {}), ("sasrec", {}), ("hstu", {}), ("unified", {"num_blocks": 1}),
                                     ("unified", {"num_blocks": 0})])
def test_predict_computes_the_last_states_of_the_full_pass(small, name, kw):
    """predict skips the last block's work on the tokens it does not return: its queries, ratings and likes
    are the full pass's, with a profile token, candidates, silu attention with a bias, and 0 or 1 blocks."""
    ds, sp = small
    torch.manual_seed(3)
    m = UniRec.from_dataset(ds, tiny(name, **kw)).eval()
    with torch.no_grad():  # a trained-looking model: the zero-initialised type vectors and biases moved
        for p in m.parameters():
            p.add_(0.05 * torch.randn_like(p))
    tb = TokenBuilder.for_config(sp, m.config)
    users = np.nonzero(sp.train_len >= 2)[0][:13]
    for b in (tb.train_batch(users, None, candidates=m.needs_candidates), tb.eval_batch("test", sp.eval_users[:11])):
        full = m.encode(b)
        p = m.predict(b)
        torch.testing.assert_close(p["queries"], full.hidden[full.last_pos].float(), atol=1e-5, rtol=1e-5)
        if m.config.ranking and b.cand_items.numel():
            rating, like = m.objectives["ranking"].outputs(full, b.cand_items)
            torch.testing.assert_close(p["rating"], rating.clamp(m.schema.rating_min, m.schema.rating_max))
            torch.testing.assert_close(p["like"], torch.sigmoid(like))


def test_reference_impl_matches_fast_impl(small):
    ds, sp = small
    torch.manual_seed(0)
    m = UniRec.from_dataset(ds, tiny("hstu")).eval()
    ref = UniRec(m.config, m.schema, impl="reference").eval()
    ref.load_state_dict(m.state_dict())
    tb = TokenBuilder.for_config(sp, m.config)
    b = tb.train_batch(np.nonzero(sp.train_len >= 2)[0][:12], np.random.default_rng(1))
    l1, _ = m(b)
    l2, _ = ref(b)
    torch.testing.assert_close(l1, l2, atol=1e-4, rtol=1e-4)
    e = tb.eval_batch("test", sp.eval_users[:12])
    torch.testing.assert_close(m.recommend(e, 7)[1], ref.recommend(e, 7)[1])


def _history_with_repeats(g, B, N, max_len=9):
    lens = torch.randint(0, max_len, (B,), generator=g)
    lens[0] = 0  # an empty history
    off = torch.zeros(B + 1, dtype=torch.int64)
    off[1:] = torch.cumsum(lens, 0)
    return torch.randint(1, min(N, 12) + 1, (int(off[-1]),), generator=g), off  # few ids: many repeats


def _brute_scores(q, item_rep, beta, hist, off, max_len=20):
    """[B, N + 1] scores with the repeat offset of each seen item (by its last occurrence, distances
    clipped to the model's window)."""
    S = q @ item_rep.T
    S[:, 0] = float("-inf")
    for b in range(q.shape[0]):
        h = hist[off[b]:off[b + 1]].tolist()
        for i in set(h):
            d = min(len(h) - 1 - max(j for j, x in enumerate(h) if x == i), max_len - 1)
            S[b, i] += beta[min(int(math.floor(math.log2(1 + d))), beta.numel() - 1)]
    return S


@pytest.mark.parametrize("repeat_bias", [False, True])
@pytest.mark.parametrize("mask_history", [True, False])
def test_model_ranks_and_topk_items_match_brute_force(small, repeat_bias, mask_history):
    ds, _ = small
    g = torch.Generator().manual_seed(int(repeat_bias) * 2 + int(mask_history))
    m = UniRec.from_dataset(ds, tiny(repeat_bias=repeat_bias, num_repeat_buckets=4, max_len=6)).eval()
    B, N, D = 40, ds.num_items, 16
    q = torch.randint(-2, 3, (B, D), generator=g).float()
    item_rep = torch.randint(-2, 3, (N + 1, D), generator=g).float()  # many ties
    beta = torch.randint(-3, 4, (4,), generator=g).float()
    if repeat_bias:
        m.scorer.repeat_raw.data.copy_(beta / m.scorer.REPEAT_SCALE)
    hist, off = _history_with_repeats(g, B, N, max_len=14)  # longer than the model's window of 6
    targets = torch.randint(1, 15, (B,), generator=g)  # often inside the history
    S = _brute_scores(q, item_rep, beta if repeat_bias else torch.zeros(1), hist, off, max_len=6)
    want = target_ranks(S, targets, hist, off, mask_history=mask_history).clamp(max=21)
    assert torch.equal(m.scorer.target_ranks(q, item_rep, targets, hist, off, mask_history, kmax=20), want)
    vals, idx = m.scorer.topk(q, item_rep, 25, hist, off, exclude_history=mask_history)
    if mask_history:
        for b in range(B):
            S[b, hist[off[b]:off[b + 1]]] = float("-inf")
    top = S.topk(25, dim=1).values
    torch.testing.assert_close(vals, top)
    got = S.gather(1, idx.clamp_min(0))
    torch.testing.assert_close(torch.where(idx >= 0, got, vals), vals)  # the items carry their scores
    cand = torch.randint(1, N + 1, (B, 7), generator=g)
    cand[:, :3] = torch.randint(1, 13, (B, 3), generator=g)
    full = _brute_scores(q, item_rep, beta if repeat_bias else torch.zeros(1), hist, off, max_len=6)
    torch.testing.assert_close(m.scorer.item_scores(q, item_rep, cand, hist, off), full.gather(1, cand))
    grown = torch.cat([item_rep, torch.randint(-2, 3, (5, D), generator=g).float()])  # a catalogue that grew
    v2, i2 = m.scorer.topk(q, grown, 25, hist, off, exclude_history=True)
    assert int(i2.max()) <= N + 5 and v2.shape == (B, 25)


@pytest.mark.parametrize("B, L, n", [(3, 7, 3), (5, 20, 4), (2, 1, 2), (4, 30, 50), (0, 5, 3), (3, 0, 2)])
def test_next_occurrence_is_the_nearest_later_position_of_the_same_item(B, L, n):
    from unirec.models.objectives import next_occurrence
    g = torch.Generator().manual_seed(B * 100 + L)
    items = torch.randint(0, n, (B, L), generator=g)
    want = torch.full((B, L), L, dtype=torch.int64)
    for b in range(B):
        for j in range(L):
            later = [k for k in range(j + 1, L) if items[b, k] == items[b, j]]
            if later:
                want[b, j] = later[0]
    assert torch.equal(next_occurrence(items), want)


def test_repeat_bias_loss_is_the_softmax_with_offsets(small):
    """The fused loss + log-sum-exp correction equals cross-entropy over materialised logits with
    the offsets added to each token's seen items, in value and in gradients."""
    ds, sp = small
    torch.manual_seed(0)
    cfg = tiny(repeat_bias=True, num_repeat_buckets=4, use_profile=False, objectives={"retrieval": 1.0})
    m = UniRec.from_dataset(ds, cfg).eval()
    m.scorer.repeat_raw.data.copy_(torch.tensor([-2.0, 1.5, -0.5, 0.7]) / m.scorer.REPEAT_SCALE)
    tb = TokenBuilder.for_config(sp, cfg)
    b = tb.train_batch(np.nonzero(sp.train_len >= 6)[0][:10], None, candidates=False)
    g = torch.Generator().manual_seed(5)
    # plant repeats: some events and some targets copy an earlier item of the stream
    items, nxt = b.items.clone(), b.next_items.clone()
    for u in range(10):
        s, e = int(b.offsets[u]), int(b.offsets[u + 1])
        for j in range(s + 1, e):
            if torch.rand(1, generator=g) < 0.3:
                items[j] = items[int(torch.randint(s, j, (1,), generator=g))]
        for j in range(s, e - 1):
            nxt[j] = items[j + 1]
        if e - s >= 3:
            nxt[e - 2] = items[s]  # a target that was seen
    b.items, b.next_items = items, nxt
    loss, _ = m(b)
    loss.backward()
    item_weight = m.items.sources[0].tables.weight
    grads = [p.grad.clone() for p in (m.scorer.repeat_raw, item_weight)]
    m.zero_grad()
    enc = m.encode(b)
    z = enc.hidden[enc.hist_pos] @ enc.item_rep.T
    z[:, 0] = float("-inf")
    rows = []
    for u in range(10):
        s, e = int(b.offsets[u]), int(b.offsets[u + 1])
        for i in range(s, e):
            if nxt[i] == 0:
                continue
            seen = items[s:i + 1].tolist()
            bias = torch.zeros(ds.num_items + 1)
            for it in set(seen):
                d = (i - s) - max(j for j, x in enumerate(seen) if x == it)
                bias = bias + F.one_hot(torch.tensor(it), ds.num_items + 1) * m.scorer.repeat_offsets()[min(int(math.log2(1 + d)), 3)]
            rows.append(F.cross_entropy((z[i] + bias).unsqueeze(0), nxt[i:i + 1]))
    want = torch.stack(rows).mean()
    torch.testing.assert_close(loss, want, rtol=1e-5, atol=1e-5)
    want.backward()
    torch.testing.assert_close(grads[0], m.scorer.repeat_raw.grad, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(grads[1], item_weight.grad, rtol=1e-4, atol=1e-6)


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
    tb = TokenBuilder.for_config(sp, cfg)
    Trainer(m, TrainBatches(tb, 64, m.needs_candidates), TrainConfig(epochs=6, batch_size=64, lr=5e-3,
                                                                      warmup_steps=5, patience=10),
            validate=lambda: evaluate_model(m, tb, "valid"), progress=False, log=lambda s: None).fit()
    got = evaluate_model(m, tb, "valid")
    pop = popularity_baseline(sp, "valid")
    assert got["ndcg@10"] > 1.5 * pop["ndcg@10"], (got["ndcg@10"], pop["ndcg@10"])
    assert got["auc"] > 0.6  # likes are planted (ratings high inside the user's cluster)


def test_fused_item_optimizer_updates_only_the_tables_in_backward(small):
    """item_optimizer="rowwise_adagrad": the item tables are a buffer updated inside the backward (no
    gradient, not in the model's optimizer groups); the rest trains as usual."""
    ds, sp = small
    m = UniRec.from_dataset(ds, tiny(item_optimizer="rowwise_adagrad", item_lr=0.1))
    tables = m.items.sources[0].tables
    assert "items.sources.0.tables.weight" not in dict(m.named_parameters())
    assert all(p is not tables.weight for g in m.param_groups(0.1) for p in g["params"])
    before = tables.weight.clone()
    b = TokenBuilder.for_config(sp, m.config).train_batch(np.nonzero(sp.train_len >= 2)[0][:8], None)
    loss, _ = m(b)
    loss.backward()
    moved = (tables.weight != before).any(1)
    assert moved.any() and not moved[0]  # row 0 (padding) is in no bag
    assert tables.optimizer_state.gt(0).any() and m.stream.emb_norm.weight.grad is not None
