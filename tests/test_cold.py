"""The cold-item split and its protocol (docs/protocol.md, "Cold items"): the split's invariants, the
restricted training softmax, case ranks against brute force, compare on per-case ranks, a tiny run."""
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import tiny as tiny_config
from unirec.data import (COLD_STAGES, ColdItemSplit, DataConfig, Dataset, History, TokenBuilder, TrainBatches,
                         cold_item_split, leave_one_out, live_token_batch, synthetic)
from unirec.evaluation import compare_runs, evaluate_cases, evaluate_cold, evaluate_model, format_comparison
from unirec.evaluation.compare import load_ranks
from unirec.models import UniRec
from unirec.models.objectives import next_item_queries, restrict_training_items
from unirec.runs import Run, TrainConfig
from unirec.training import train_run

SYN = dict(num_users=80, num_items=100, num_clusters=4, mean_length=12, seed=5)


@pytest.fixture(scope="module")
def ds():
    return synthetic(**SYN)


@pytest.fixture(scope="module")
def cold(ds):
    return cold_item_split(ds, 0.15, seed=0)


def tiny(**kw):
    return tiny_config(**{"max_len": 8, **kw})


def events_of(ds, u):
    """User u's (item, time, rating, file row) in time order, ties in file order: the reference."""
    rows = np.flatnonzero(ds.user == u)
    rows = rows[np.lexsort((rows, ds.timestamp[rows]))]
    return rows


# --------------------------------------------------------------------------- the split


def test_cold_items_are_those_first_rated_latest(ds, cold):
    first = {}
    for i, t in zip(ds.item, ds.timestamp):
        first[int(i)] = min(first.get(int(i), math.inf), float(t))
    n = math.ceil(0.15 * len(first) - 1e-9)
    latest = sorted(first, key=lambda i: (first[i], i))[-n:]
    assert cold.cold_items.tolist() == sorted(latest)
    assert len(cold.cold_items) == n
    c, v, t = set(cold.cold_items.tolist()), set(cold.valid_items.tolist()), set(cold.test_items.tolist())
    assert v | t == c and not v & t
    assert len(v) == round(n / 3) and len(t) == n - len(v)
    assert np.array_equal(cold.is_cold.nonzero()[0], cold.cold_items)
    assert set(cold.warm_items().tolist()) == set(range(1, ds.num_items + 1)) - c
    # every cold item was first rated no earlier than every warm item
    assert min(first[i] for i in c) >= max(first[i] for i in first if i not in c)


def test_ties_are_broken_by_item_index_and_share_rounds_up():
    # items 1..10 first rated at times 0,1,...,5,5,5,5,5 (items 6..10 tie); share 0.25 -> ceil(2.5) = 3 cold
    user = np.array([1] * 10 + [2] * 10)
    item = np.array(list(range(1, 11)) * 2)
    ts = np.array([0, 1, 2, 3, 4, 5, 5, 5, 5, 5] + [9] * 10, dtype=np.float64)
    d = Dataset("ties", np.array(["[PAD]", "a", "b"]), np.array(["[PAD]"] + [f"i{k}" for k in range(1, 11)]),
                user, item, ts)
    c = cold_item_split(d, 0.25, seed=3)
    assert c.cold_items.tolist() == [8, 9, 10]
    assert len(c.valid_items) == 1 and len(c.test_items) == 2
    with pytest.raises(ValueError, match="at least 2 cold items"):
        cold_item_split(d, 0.05)
    for bad in (0.0, 1.0, -0.1, 1.5):
        with pytest.raises(ValueError, match="share"):
            cold_item_split(d, bad)


def test_no_cold_item_in_any_training_input_or_target(ds, cold):
    tr = cold.train
    assert not cold.is_cold[tr.items].any()
    assert int(tr.train_len.sum()) == int((~cold.is_cold[ds.item]).sum())  # every warm event trains
    assert len(tr.eval_users) == 0
    cfg = tiny(max_len=4)  # short windows: "all" cuts several per user
    tb = TokenBuilder.for_config(tr, cfg)
    for windows in ("last", "all"):
        batches = TrainBatches(tb, 16, candidates=True, seed=1, windows=windows,
                               augment={"insert": 0.3, "substitute": 0.3})
        seen = 0
        for b in batches.epoch(0):
            for x in (b.items, b.next_items, b.first_items, b.cand_items):
                assert not cold.is_cold[x.numpy()].any()
            seen += b.items.numel()
        assert seen > 0


def test_split_does_not_depend_on_the_training_seed(ds, cold):
    again = ColdItemSplit(ds, 0.15, 0)
    for s in COLD_STAGES:
        assert np.array_equal(again.case_ids(s), cold.case_ids(s))
        assert all(np.array_equal(a, b) for a, b in zip(again.cases(s), cold.cases(s)))
    other = ColdItemSplit(ds, 0.15, 1)  # another cold seed: the same cold items, drawn differently
    assert np.array_equal(other.cold_items, cold.cold_items)
    assert not np.array_equal(other.valid_items, cold.valid_items)


def test_cases_are_every_event_on_the_stage_items_with_the_full_history(ds, cold):
    cfg = tiny(max_len=5)
    tb = TokenBuilder.for_config(cold.full, cfg)
    fs = cold.full
    for stage, items in zip(COLD_STAGES, (cold.valid_items, cold.test_items)):
        users, pos = cold.cases(stage)
        hist, off = cold.history(stage)
        want, no_hist = [], 0
        for u in range(1, ds.num_users + 1):
            rows = events_of(ds, u)
            for j, r in enumerate(rows):
                if ds.item[r] in items:
                    if j == 0:
                        no_hist += 1
                    else:
                        want.append((u, int(ds.item[r]), ds.item[rows[:j]].tolist()))
        assert len(users) == len(want) > 0
        assert cold.summary()["num_no_history"][stage] == no_hist
        b = tb.case_batch(users, pos)
        for c, (u, target, h) in enumerate(want):
            assert users[c] == u and fs.items[pos[c]] == target and b.targets[c] == target
            assert hist[off[c]:off[c + 1]].tolist() == h  # all earlier events, warm and cold
            assert b.history_items[b.history_offsets[c]:b.history_offsets[c + 1]].tolist() == h
            assert b.items[b.offsets[c]:b.offsets[c + 1]].tolist() == h[-5:]  # the last max_len as tokens
            assert b.cand_items[c] == target
        assert any(cold.is_cold[h].any() for _, _, h in want) or stage == "cold_valid"
        ids = cold.case_ids(stage)
        assert len(set(ids)) == len(ids)
        assert all(i.split("@")[:2] == [ds.user_vocab[u], ds.item_vocab[t]] for i, (u, t, _) in zip(ids, want))
    s = cold.summary()
    assert s["num_cases"] == {st: len(cold.cases(st)[0]) for st in COLD_STAGES}
    assert s["num_train_events"] + s["num_cold_events"] == ds.num_interactions


def test_case_ids_count_repeated_pairs():
    # user a rates item 3 (cold) twice: ids a@i3@0 and a@i3@1; user b's first event is on item 3: no case
    user = np.array([1, 1, 1, 1, 2, 2, 2])
    item = np.array([1, 3, 2, 3, 3, 1, 2])
    ts = np.array([0, 10, 11, 12, 5, 6, 7], dtype=np.float64)
    d = Dataset("rep", np.array(["[PAD]", "a", "b"]), np.array(["[PAD]", "i1", "i2", "i3"]), user, item, ts)
    c = cold_item_split(d, 0.5, seed=0)  # first rated: i1 at 0, i3 at 5, i2 at 7; ceil(1.5) = 2 cold: i2, i3
    assert c.cold_items.tolist() == [2, 3]
    all_ids = sorted(np.concatenate([c.case_ids(s) for s in COLD_STAGES]).tolist())
    assert all_ids == ["a@i2@0", "a@i3@0", "a@i3@1", "b@i2@0"]
    assert sum(c.summary()["num_no_history"].values()) == 1


def test_eval_batch_is_case_batch_at_the_stage_positions(ds):
    sp = leave_one_out(ds)
    tb = TokenBuilder.for_config(sp, tiny(max_len=5))
    users = sp.eval_users[:30]
    for stage in ("valid", "test"):
        b = tb.eval_batch(stage, users)
        hi, ho = sp.history(stage, users)
        assert torch.equal(b.history_items, torch.from_numpy(hi))
        assert torch.equal(b.history_offsets, torch.from_numpy(ho))
        assert torch.equal(b.targets, torch.from_numpy(sp.targets(stage)[:30]))
        for c, u in enumerate(users):
            p = sp.stage_positions(stage, np.array([u]))[0]
            want = sp.items[max(sp.user_offsets[u], p - 5):p].tolist()
            assert b.items[b.offsets[c]:b.offsets[c + 1]].tolist() == want
    with pytest.raises(ValueError, match="not an event of user"):
        tb.case_batch([users[0]], [sp.user_offsets[users[0] + 1]])


# --------------------------------------------------------------------------- the restricted softmax


def _retrieval_setup(ds, cold, repeat_bias):
    torch.manual_seed(0)
    cfg = tiny(repeat_bias=repeat_bias, num_repeat_buckets=4, use_profile=False, objectives={"retrieval": 1.0})
    m = UniRec.from_dataset(ds, cfg).eval()
    if repeat_bias:
        m.scorer.repeat_raw.data.copy_(torch.tensor([-2.0, 1.5, -0.5, 0.7]) / m.scorer.REPEAT_SCALE)
    tr = cold.train
    tb = TokenBuilder.for_config(tr, cfg)
    b = tb.train_batch(np.nonzero(tr.train_len >= 4)[0][:12], None, candidates=False)
    if repeat_bias:  # plant repeats of warm items, so that the offsets matter
        items, nxt = b.items.clone(), b.next_items.clone()
        for u in range(b.batch_size):
            s, e = int(b.offsets[u]), int(b.offsets[u + 1])
            for j in range(s + 2, e, 3):
                items[j] = items[s]
            nxt[s:e - 1] = items[s + 1:e]
            if e - s >= 3:
                nxt[e - 2] = items[s]
        b.items, b.next_items = items, nxt
    return m, b


def _grads(m, loss):
    params = [p for p in m.parameters() if p.requires_grad]
    return torch.autograd.grad(loss, params, allow_unused=True)


def _reference_loss(m, b, allowed):
    """Cross-entropy over materialised logits, the items outside ``allowed`` removed, the repeat offsets
    added to each token's seen items."""
    enc = m.encode(b)
    q, tgt, _ = next_item_queries(enc, b)
    N = enc.item_rep.shape[0] - 1
    z = q @ enc.item_rep.T
    keep = torch.zeros(N + 1, dtype=torch.bool)
    keep[allowed] = True
    z = z.masked_fill(~keep, float("-inf"))
    beta = m.scorer.repeat_offsets()
    if beta is not None:
        items, nxt = b.items, b.next_items
        rows = []
        for u in range(b.batch_size):
            s, e = int(b.offsets[u]), int(b.offsets[u + 1])
            for i in range(s, e):
                if nxt[i] == 0:
                    continue
                seen = items[s:i + 1].tolist()
                bias = torch.zeros(N + 1)
                for it in set(seen):
                    d = (i - s) - max(j for j, x in enumerate(seen) if x == it)
                    bias = bias + F.one_hot(torch.tensor(it), N + 1) * beta[min(int(math.log2(1 + d)), 3)]
                rows.append(bias)
        z = z + torch.stack(rows)
    return F.cross_entropy(z, tgt)


@pytest.mark.parametrize("repeat_bias", [False, True])
def test_restricted_softmax_equals_the_loss_over_warm_items(ds, cold, repeat_bias):
    m, b = _retrieval_setup(ds, cold, repeat_bias)
    warm = torch.from_numpy(cold.warm_items())
    restrict_training_items(m, warm)
    loss, parts = m(b)
    got = _grads(m, loss)
    want_loss = _reference_loss(m, b, warm)
    torch.testing.assert_close(loss, want_loss, rtol=1e-5, atol=1e-5)
    for g, w in zip(got, _grads(m, want_loss)):
        if w is None:
            assert g is None or not g.abs().any()
        else:
            torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-6)
    # the cold items' rows get no gradient from the loss (they are not in the softmax)
    rep = m.item_representations().detach().requires_grad_(True)
    enc_loss = m.objectives["retrieval"].loss(m.encode(b, rep), b)[0]
    g_rep, = torch.autograd.grad(enc_loss, rep)
    cold_ids = torch.from_numpy(cold.cold_items)
    # rows of cold items get gradient only through the stream's inputs, never from the softmax: no
    # batch input is cold, so they get none at all
    assert not g_rep[cold_ids].abs().any()
    assert g_rep[warm].abs().sum() > 0
    # the full catalogue again: the default path
    restrict_training_items(m, None)
    full, _ = m(b)
    assert not torch.allclose(full, loss)
    torch.testing.assert_close(full, _reference_loss(m, b, torch.arange(1, ds.num_items + 1)), rtol=1e-5, atol=1e-5)


def test_unrestricted_path_unchanged_and_all_items_allowed_is_the_same(ds, cold):
    m, b = _retrieval_setup(ds, cold, True)
    assert m.objectives["retrieval"].allowed_items is None
    base = m(b)[0]
    g0 = _grads(m, base)
    restrict_training_items(m, torch.arange(ds.num_items, 0, -1))  # every item (any order): the same loss
    same = m(b)[0]
    torch.testing.assert_close(same, base, rtol=1e-6, atol=1e-6)
    for a, c in zip(g0, _grads(m, same)):
        if a is not None:
            torch.testing.assert_close(a, c, rtol=1e-5, atol=1e-7)
    # the restriction is not part of the checkpoint
    assert not any("allowed" in k for k in m.state_dict())
    restrict_training_items(m, torch.tensor([1, 2, 3]))
    with pytest.raises(ValueError, match="not among the allowed items"):
        m(b)


def test_restriction_refuses_a_catalogue_objective_it_cannot_reach(ds):
    m = UniRec.from_dataset(ds, tiny(objectives={"retrieval": 1.0, "cloze": 0.5}))
    with pytest.raises(ValueError, match="cloze"):
        restrict_training_items(m, torch.arange(1, 10))
    m2 = UniRec.from_dataset(ds, tiny(objectives={"sampled_retrieval": 1.0, "ranking": 0.1}))
    restrict_training_items(m2, torch.arange(1, 10))  # in-batch negatives only: nothing to restrict


# --------------------------------------------------------------------------- evaluation


def test_cold_case_ranks_match_brute_force(ds, cold):
    torch.manual_seed(1)
    m = UniRec.from_dataset(ds, tiny()).eval()
    tb = TokenBuilder.for_config(cold.full, m.config)
    for stage in COLD_STAGES:
        users, pos = cold.cases(stage)
        out = evaluate_cases(m, tb, users, pos, stage=stage, batch_size=7, return_ranks=True)
        ranks = out["ranks"]
        assert out["num_cases"] == len(users) == ranks.numel()
        # queries from the serving path: each case's history as a live History
        hs = []
        for u, p in zip(users, pos):
            s = cold.full.user_offsets[u]
            hs.append(History(cold.full.items[s:p].copy(), cold.full.ratings[s:p].copy(),
                              cold.full.timestamps[s:p].copy(), int(u)))
        lb = live_token_batch(hs, m.config.max_len, m.config.num_time_buckets)
        with torch.no_grad():
            pred = m.predict(lb)
        torch.testing.assert_close(pred["queries"], m.predict(tb.case_batch(users, pos))["queries"])
        S = (pred["queries"] @ pred["item_rep"].T).double()  # [n, N + 1], every item, cold and warm
        want, eps = [], 1e-4  # (a near tie may fall either way between two float paths)
        for c, h in enumerate(hs):
            t = int(cold.full.items[pos[c]])
            elig = torch.ones(ds.num_items + 1, dtype=torch.bool)
            elig[0] = False
            elig[torch.from_numpy(h.items)] = False  # the history masked
            elig[t] = False
            lo = min(1 + int((S[c][elig] >= S[c, t] + eps).sum()), 21)
            hi = min(1 + int((S[c][elig] >= S[c, t] - eps).sum()), 21)
            assert lo <= int(ranks[c]) <= hi, (stage, c, int(ranks[c]), lo, hi)
            want.append(int(ranks[c]))
        # metrics are the usual ones over these ranks
        r = torch.tensor(want, dtype=torch.float64)
        assert out["hr@10"] == pytest.approx(float((r <= 10).double().mean()))
        assert out["ndcg@10"] == pytest.approx(float(torch.where(r <= 10, 1 / torch.log2(r + 1), 0).mean()))
        assert out["stage"] == stage and out["mask_history"] is True
        assert out["rmse"] is not None and out["gauc"] is not None


def test_evaluate_model_unchanged_by_the_case_path(ds):
    """evaluate_model (now on case_batch) gives the ranks of the scorer on eval_batch streams."""
    torch.manual_seed(2)
    sp = leave_one_out(ds)
    m = UniRec.from_dataset(ds, tiny()).eval()
    tb = TokenBuilder.for_config(sp, m.config)
    out = evaluate_model(m, tb, "test", batch_size=13, return_ranks=True)
    want = []
    for chunk in np.array_split(sp.eval_users, -(-len(sp.eval_users) // 13)):  # evaluate_model's batches
        b = tb.eval_batch("test", chunk)
        p = m.predict(b)
        want.append(m.scorer.target_ranks(p["queries"], p["item_rep"], b.targets, b.history_items,
                                          b.history_offsets, True))
    assert torch.equal(out["ranks"], torch.cat(want))
    assert out["num_users"] == len(sp.eval_users) and out["gauc_stages"] == "valid+test"


def test_evaluate_cold_returns_ranks_with_case_ids(ds, cold):
    torch.manual_seed(3)
    m = UniRec.from_dataset(ds, tiny()).eval()
    metrics, ranks = evaluate_cold(m, cold, batch_size=50)
    assert set(metrics) == {"cold_valid", "cold_test"}
    for s in COLD_STAGES:
        assert np.array_equal(ranks[f"{s}_ids"], cold.case_ids(s))
        assert ranks[s].shape == (len(cold.case_ids(s)),) and ranks[s].min() >= 1 and ranks[s].max() <= 21
        assert metrics[s]["num_cases"] == len(ranks[s])
    only_valid, r2 = evaluate_cold(m, cold, test=False)
    assert set(only_valid) == {"cold_valid"} and set(r2) == {"cold_valid", "cold_valid_ids"}


# --------------------------------------------------------------------------- compare


def _write_cold_run(path, seed, ids, ranks, cold_seed=0, users_test=None):
    path.mkdir(parents=True)
    arrays = {"cold_test_ids": np.asarray(ids, dtype=str), "cold_test": np.asarray(ranks, dtype=np.int64)}
    if users_test is not None:
        arrays.update(users=np.asarray(users_test[0], dtype=str), test=np.asarray(users_test[1], dtype=np.int64))
    np.savez(path / "ranks.npz", **arrays)
    (path / "config.json").write_text(json.dumps({"train": {"seed": seed, "split": "cold-items", "cold_share": 0.15,
                                                            "cold_seed": cold_seed}, "data": {"source": "ml-100k"}}))
    return path


def test_compare_on_cold_stage(tmp_path):
    rng = np.random.default_rng(0)
    ids = np.array([f"u{u}@i{i}@0" for u, i in zip(range(400), rng.integers(1, 50, 400))])
    a, b = [], []
    for s in range(2):
        rb = rng.integers(1, 22, 400)
        ra = np.maximum(rb - 3, 1)  # arm A ranks every case better
        perm = rng.permutation(400)  # the case order of a file does not matter
        a.append(_write_cold_run(tmp_path / f"a{s}", s, ids[perm], ra[perm]))
        b.append(_write_cold_run(tmp_path / f"b{s}", s, ids, rb))
    r = compare_runs(a, b, stage="cold_test", num_samples=300)
    assert r["stage"] == "cold_test" and r["num_users"] == 400 and r["users_dropped"] == 0
    assert r["metrics"]["ndcg@10"]["low"] > 0
    assert "400 cases" in format_comparison(r)
    seed, got_ids, got_ranks, _ = load_ranks(a[0], "cold_test")
    assert seed == 0 and len(got_ids) == 400
    # the old stages still read "users"; an old run folder has no cold ranks
    old = tmp_path / "old"
    old.mkdir()
    np.savez(old / "ranks.npz", users=np.array(["1", "2"]), test=np.array([1, 5]), valid=np.array([2, 3]),
             test_unmasked=np.array([1, 5]))
    (old / "config.json").write_text(json.dumps({"train": {"seed": 0}, "data": {"source": "ml-100k"}}))
    assert load_ranks(old, "test")[1].tolist() == ["1", "2"]
    with pytest.raises(ValueError, match="cold_test"):
        load_ranks(old, "cold_test")
    with pytest.raises(ValueError, match="stage must be one of"):
        load_ranks(old, "warm")
    other = _write_cold_run(tmp_path / "c0", 0, ids, rb, cold_seed=1)
    with pytest.raises(ValueError, match="different cold-item splits"):
        compare_runs([a[0]], [other], stage="cold_test", num_samples=10)


# --------------------------------------------------------------------------- config and the run


def test_train_config_validates_the_protocol():
    assert TrainConfig().split == "leave-one-out"
    TrainConfig(split="cold-items", cold_share=0.2, cold_seed=3)
    for kw, msg in ((dict(split="cold"), "split must be one of"), (dict(cold_share=0.0), "cold_share"),
                    (dict(cold_share=1.0), "cold_share"), (dict(cold_share="0.1"), "cold_share"),
                    (dict(cold_seed=-1), "cold_seed"), (dict(cold_seed=1.5), "cold_seed")):
        with pytest.raises(ValueError, match=msg):
            TrainConfig(**kw)
    old = {"epochs": 3, "seed": 1}  # a config.json written before the fields existed
    assert TrainConfig.from_dict(old).split == "leave-one-out"


def test_train_run_cold_items_end_to_end(tmp_path):
    data = DataConfig("synthetic", dict(SYN))
    cfg = tiny()
    out = {}
    for seed in (0, 1):
        tc = TrainConfig(epochs=2, batch_size=32, lr=3e-3, warmup_steps=2, seed=seed, split="cold-items")
        m = train_run(data, cfg, tc, tmp_path / f"run{seed}", progress=False, log=lambda s: None)
        out[seed] = m
        assert set(m) >= {"cold_valid", "cold_test", "num_cases", "num_cold_items", "cold_split", "protocol",
                          "best_epoch", "history"}
        assert "test" not in m and "valid" not in m
        assert m["num_cases"]["cold_test"] == m["cold_test"]["num_cases"] > 0
        assert m["num_cold_items"] == m["cold_split"]["num_cold_items"] == math.ceil(0.15 * 100)
        assert all("val_ndcg@10" in h for h in m["history"])
        assert m["protocol"]["selection"] == "best cold-validation NDCG@10"
        run = Run.open(tmp_path / f"run{seed}")
        assert run.config.train.split == "cold-items"
        assert json.loads((tmp_path / f"run{seed}" / "metrics.json").read_text())["cold_test"]["ndcg@10"] == \
            pytest.approx(m["cold_test"]["ndcg@10"])
        with np.load(tmp_path / f"run{seed}" / "ranks.npz") as z:
            assert set(z.files) == {"cold_valid_ids", "cold_valid", "cold_test_ids", "cold_test"}
            assert len(z["cold_test"]) == m["num_cases"]["cold_test"]
    lines = [json.loads(x) for x in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert len(lines) == 2 and set(lines[0]["metrics"]) == {"cold_valid", "cold_test"}
    assert lines[0]["metrics"]["cold_test"]["ndcg@10"] == pytest.approx(out[0]["cold_test"]["ndcg@10"])
    # the same cases whatever the training seed: the runs pair case by case
    ids0, ids1 = (load_ranks(tmp_path / f"run{s}", "cold_test")[1] for s in (0, 1))
    assert np.array_equal(ids0, ids1)
    r = compare_runs([tmp_path / "run0"], [tmp_path / "run0"], stage="cold_test", num_samples=50)
    assert r["metrics"]["ndcg@10"]["diff"] == 0.0 and r["users_dropped"] == 0
    r = compare_runs([tmp_path / "run0"], [tmp_path / "run1"], stage="cold_test", num_samples=50)
    assert r["num_users"] == len(ids0)
    # the reloaded best model reproduces the recorded cold test metrics
    model = Run.open(tmp_path / "run0").load_model()
    again, _ = evaluate_cold(model, cold_item_split(synthetic(**SYN), 0.15, 0))
    assert again["cold_test"]["ndcg@10"] == pytest.approx(out[0]["cold_test"]["ndcg@10"], abs=1e-6)
