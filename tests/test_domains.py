"""Genre domains inside one data set (unirec.data.domains): the domain data sets, the target-domain split,
training targets, ranking among the target items, loading and the command line."""
import json

import numpy as np
import pytest
import torch

from unirec.data import (PAD, ColdItemSplit, DataConfig, Dataset, Feature, FeatureTable, TokenBuilder,
                         leave_one_out, load_dataset)
from unirec.data.domains import B_GENRES, DOMAIN_FEATURE, domain_dataset, item_domains, subset_events
from unirec.evaluation import evaluate_model
from unirec.evaluation.metrics import target_ranks as brute_force_ranks
from unirec.evaluation.model_eval import popularity_baseline, target_ranks_within
from unirec.models import UniRec
from unirec.models.config import preset
from unirec.models.objectives import next_item_queries, restrict_training_items
from unirec.models.scorer import Scorer

from conftest import TINY_MODEL

GENRES = ["Action", "Comedy", "Drama", "Horror", "Romance", "War"]
# item id -> genres; B (default B_GENRES) = i2, i3, i5; A = i1, i4, i6 (i6 never rated)
ITEM_GENRES = {"i1": ["Comedy"], "i2": ["Action"], "i3": ["Drama", "War"], "i4": ["Drama"], "i5": ["Horror", "Comedy"],
               "i6": ["Romance"]}
B_IDS = {"i2", "i3", "i5"}
# user -> items in time order (timestamps 1, 2, ...)
EVENTS = {
    "u1": ["i1", "i2", "i4", "i3", "i6x", "i5", "i1"],  # "i6x" stands for an A event on i4 again (a repeat)
    "u2": ["i1", "i2", "i4"],                           # one target event: trains only, i4 after it dropped
    "u3": ["i4", "i1"],                                 # A only: not in domain B's split
    "u4": ["i2", "i5"],                                 # B only: not in domain A
    "u5": ["i4", "i5", "i1", "i2", "i3", "i4", "i2"],
}


def _csr(bags, vocab):
    """Per-row bags of strings -> (indices, offsets) local to ``vocab`` (row 0 = padding, empty)."""
    index = {v: i for i, v in enumerate(vocab)}
    lens = [0] + [len(b) for b in bags]
    return (np.asarray([index[v] for b in bags for v in b], dtype=np.int64),
            np.cumsum([0] + lens).astype(np.int64))


def toy(feature_name="genre", shuffle=True) -> Dataset:
    """A hand-built data set with a genre feature, a numeric year, titles and a user feature; events in a
    shuffled file order."""
    items = sorted(ITEM_GENRES)
    users = sorted(EVENTS)
    rows = [(u, ("i4" if it == "i6x" else it), float(t + 1)) for u in users for t, it in enumerate(EVENTS[u])]
    if shuffle:
        rows = [rows[i] for i in np.random.default_rng(0).permutation(len(rows))]
    item_vocab, user_vocab = np.asarray([PAD] + items), np.asarray([PAD] + users)
    gvocab = np.asarray([PAD] + GENRES)
    gi, go = _csr([ITEM_GENRES[i] for i in items], gvocab)
    yvocab = np.asarray([PAD, "<1990", ">=1990"])
    yi, yo = _csr([["<1990"] if k % 2 else [">=1990"] for k in range(len(items))], yvocab)
    sex = np.asarray([PAD, "F", "M"])
    si, so = _csr([["F"] if k % 2 else ["M"] for k in range(len(users))], sex)
    ift = FeatureTable("item_id", len(items) + 1, [Feature("year", "numeric", yvocab, yi, yo, np.asarray([1990.0])),
                                                   Feature(feature_name, "multi", gvocab, gi, go)])
    uft = FeatureTable("user_id", len(users) + 1, [Feature("gender", "categorical", sex, si, so)])
    return Dataset("toy", user_vocab, item_vocab,
                   np.asarray([users.index(u) + 1 for u, _, _ in rows], dtype=np.int64),
                   np.asarray([items.index(i) + 1 for _, i, _ in rows], dtype=np.int64),
                   np.asarray([t for _, _, t in rows]), np.arange(len(rows), dtype=np.float32) % 5 + 1,
                   ift, uft, np.asarray([""] + [f"title {i}" for i in items]))


def bag(ft, name, row):
    f = ft[name]
    return f.vocab[f.indices[f.offsets[row]:f.offsets[row + 1]]].tolist()


def events(ds):
    """{(user id, item id, time, rating)} of a data set, by the data set's own ids."""
    return sorted(zip(ds.user_vocab[ds.user].tolist(), ds.item_vocab[ds.item].tolist(), ds.timestamp.tolist(),
                      ds.rating.tolist()))


# --------------------------------------------------------------------------- the domains


@pytest.mark.parametrize("feature_name", ["genre", "class"])
def test_item_domains(feature_name):
    ds = toy(feature_name)
    b = item_domains(ds)
    assert b.dtype == np.bool_ and b.shape == (ds.num_items + 1,) and not b[0]
    assert set(ds.item_vocab[b].tolist()) == B_IDS and (item_domains(ds, list(B_GENRES)) == b).all()
    assert set(ds.item_vocab[item_domains(ds, ["Comedy"])].tolist()) == {"i1", "i5"}
    with pytest.raises(ValueError, match="b_genres"):
        item_domains(ds, "Action")  # a string, not a list
    with pytest.raises(ValueError, match="b_genres.*toy"):
        item_domains(ds, ["Musical"])  # no such genre


def test_item_domains_without_genres_names_the_data_set():
    ds = toy()
    ds.item_features = FeatureTable("item_id", ds.num_items + 1, [ds.item_features["year"]])
    with pytest.raises(ValueError, match="'toy'.*genre"):
        item_domains(ds)
    ds.item_features = None
    with pytest.raises(ValueError, match="'toy'"):
        domain_dataset(ds, "B")


def test_domain_a_is_a_consistent_subset():
    ds = toy()
    a = domain_dataset(ds, "A")
    assert a.name == "toy-A" and a.target_items is None
    assert a.item_vocab.tolist() == [PAD, "i1", "i4", "i6"]  # every A item, rated or not, in order
    assert a.user_vocab.tolist() == [PAD, "u1", "u2", "u3", "u5"]  # u4 has no A event
    want = [e for e in events(ds) if e[1] not in B_IDS]
    assert events(a) == want and a.num_interactions == len(want)
    for new, old_id in enumerate(a.item_vocab[1:].tolist(), 1):
        old = ds.item_index(old_id)
        for name in ("year", "genre"):
            assert bag(a.item_features, name, new) == bag(ds.item_features, name, old)
        assert a.item_text[new] == ds.item_text[old]
    for new, old_id in enumerate(a.user_vocab[1:].tolist(), 1):
        assert bag(a.user_features, "gender", new) == bag(ds.user_features, "gender", ds.user_index(old_id))
    assert a.item_features.num_rows == a.num_items + 1 and a.user_features.num_rows == a.num_users + 1
    assert bag(a.item_features, "genre", 0) == [] and a.item_text[0] == ""
    assert a.item_features["genre"].vocab.tolist() == ds.item_features["genre"].vocab.tolist()  # vocab kept whole
    leave_one_out(a)  # splits like any data set


def test_subset_events_defaults_to_the_items_of_the_kept_events():
    ds = toy()
    s = subset_events(ds, ds.user == ds.user_index("u4"), name="u4")
    assert s.name == "u4" and s.user_vocab.tolist() == [PAD, "u4"] and s.item_vocab.tolist() == [PAD, "i2", "i5"]
    assert bag(s.item_features, "genre", 2) == ["Horror", "Comedy"]
    with pytest.raises(ValueError, match="keep"):
        subset_events(ds, np.ones(3, bool))


def test_domain_b_marks_every_item_and_sets_the_target_items():
    ds = toy()
    b = domain_dataset(ds, "B")
    assert b.name == "toy-B" and events(b) == events(ds) and b.item_vocab.tolist() == ds.item_vocab.tolist()
    assert set(b.item_vocab[b.target_items].tolist()) == B_IDS and not b.target_items[0]
    ft = b.item_features
    assert ft.table_names(False) == ["year", "genre", DOMAIN_FEATURE]
    dom = ft[DOMAIN_FEATURE]
    assert dom.kind == "categorical" and dom.vocab.tolist() == [PAD, "A", "B"]
    assert bag(ft, DOMAIN_FEATURE, 0) == []
    assert [bag(ft, DOMAIN_FEATURE, i) for i in range(1, b.num_items + 1)] == \
        [["B"] if i in B_IDS else ["A"] for i in b.item_vocab[1:]]
    assert ds.item_features.table_names(False) == ["year", "genre"]  # the input is left alone
    with pytest.raises(ValueError, match="already"):
        domain_dataset(b, "B")


@pytest.mark.parametrize("bad", ["C", "b", None, 1])
def test_bad_domain_names_the_argument(bad):
    with pytest.raises(ValueError, match=r"domain must be one of \('A', 'B'\), got " + repr(bad).replace("'", ".")):
        domain_dataset(toy(), bad)


# --------------------------------------------------------------------------- the split


def test_target_domain_split():
    ds = domain_dataset(toy(), "B")
    sp = leave_one_out(ds)
    iv, uix = ds.item_vocab, ds.user_index
    assert sp.eval_users.tolist() == [uix("u1"), uix("u5")]  # 3+ target events
    assert iv[sp.targets("valid")].tolist() == ["i3", "i3"] and iv[sp.targets("test")].tolist() == ["i5", "i2"]
    assert ds.target_items[sp.targets("valid")].all() and ds.target_items[sp.targets("test")].all()

    def user_items(u):
        return iv[sp.items[sp.user_offsets[u]:sp.user_offsets[u + 1]]].tolist()
    # events after the last target event are dropped (u1's last i1, u2's i4); A-only users have none
    assert user_items(uix("u1")) == ["i1", "i2", "i4", "i3", "i4", "i5"]
    assert user_items(uix("u2")) == ["i1", "i2"] and user_items(uix("u3")) == []
    assert user_items(uix("u5")) == ["i4", "i5", "i1", "i2", "i3", "i4", "i2"]
    # training: the events before the validation event, both domains; users without 3 targets train on all
    assert sp.train_len[[uix("u1"), uix("u2"), uix("u3"), uix("u4"), uix("u5")]].tolist() == [3, 2, 0, 2, 4]
    # histories keep the A events (the test history includes the validation event and A events after it)
    hv, ov = sp.history("valid")
    ht, ot = sp.history("test")
    assert iv[hv[ov[0]:ov[1]]].tolist() == ["i1", "i2", "i4"]
    assert iv[ht[ot[0]:ot[1]]].tolist() == ["i1", "i2", "i4", "i3", "i4"]
    assert iv[ht[ot[1]:ot[2]]].tolist() == ["i4", "i5", "i1", "i2", "i3", "i4"]
    assert sp.is_target.tolist() == ds.target_items[sp.items].tolist()
    assert "target items" in repr(sp)
    # the data set without target_items splits as always
    plain = leave_one_out(toy())
    assert plain.train_len[uix("u1")] == 5 and len(plain.eval_users) == 3


def test_cold_item_split_refuses_a_target_domain():
    with pytest.raises(ValueError, match="target"):
        ColdItemSplit(domain_dataset(toy(), "B"), 0.3)


def test_training_targets_on_non_target_items_carry_no_loss():
    ds = domain_dataset(toy(), "B")
    sp = leave_one_out(ds)
    users = np.nonzero(sp.train_len >= 2)[0]
    builder = TokenBuilder(sp, max_len=16, num_rank_candidates=1, rank_shift=0)
    for candidates in (False, True):
        b = builder.train_batch(users, candidates=candidates)
        got, want = b.next_items.tolist(), []
        for k, u in enumerate(users):
            s, e = int(sp.user_offsets[u]), int(sp.user_offsets[u]) + int(sp.train_len[u])
            lo, hi = int(b.offsets[k]), int(b.offsets[k + 1])
            hist = sp.items[s:s + hi - lo]  # short users: the history starts at the first event
            assert b.items[lo:hi].tolist() == hist.tolist()
            for p in range(s, s + hi - lo):  # next item if it is a training event on a B item, else 0
                want.append(int(sp.items[p + 1]) if p + 1 < e and ds.target_items[sp.items[p + 1]] else 0)
            assert int(b.first_items[k]) == (int(hist[0]) if ds.target_items[hist[0]] else 0)
        assert got == want and any(got) and 0 in got
        assert ds.target_items[b.next_items[b.next_items > 0]].all()
        if candidates:  # a candidate on an A item has no rating label
            lab = ~torch.isnan(b.cand_ratings)
            assert lab.tolist() == ds.target_items[b.cand_items].tolist() and lab.any()
    # the restricted softmax takes the batch: every next-item target is a B item
    model = UniRec.from_dataset(ds, preset("unified", dim=16, num_blocks=1, num_heads=2, max_len=16, dropout=0.0))
    restrict_training_items(model, torch.from_numpy(ds.target_items).nonzero().view(-1))
    b = builder.train_batch(users, candidates=True)
    loss, parts = model(b)
    assert torch.isfinite(loss) and "retrieval" in parts
    _, tgt, _ = next_item_queries(model.encode(b), b)
    assert tgt.numel() == int((b.next_items > 0).sum() + (b.first_items > 0).sum() * model.config.use_profile)
    assert ds.target_items[tgt].all()


def test_restricted_retrieval_loss_with_non_target_history_is_exact():
    """The retrieval loss over the B items with the repeat offsets equals the brute-force softmax over the B
    items (each seen B item with its offset), though the histories hold A items."""
    from unirec.models.scorer import recency_bucket
    ds = domain_dataset(toy(), "B")
    sp = leave_one_out(ds)
    cfg = preset("unified", dim=16, num_blocks=1, num_heads=2, max_len=16, dropout=0.0, use_profile=False,
                 objectives={"retrieval": 1.0})
    model = UniRec.from_dataset(ds, cfg).eval()
    with torch.no_grad():
        model.scorer.repeat_raw.fill_(-0.5)  # seen items strongly demoted, as MovieLens (no repeats) trains them
    allowed = torch.from_numpy(ds.target_items).nonzero().view(-1)
    restrict_training_items(model, allowed)
    b = TokenBuilder.for_config(sp, model.config).train_batch(np.nonzero(sp.train_len >= 2)[0], candidates=False)
    with torch.no_grad():
        loss, _ = model(b)
        enc = model.encode(b)
        beta = model.scorer.repeat_offsets()
        terms = []
        for k in range(b.batch_size):
            lo, hi = int(b.offsets[k]), int(b.offsets[k + 1])
            for i in range(lo, hi):
                if int(b.next_items[i]) == 0:
                    continue
                z = enc.item_rep[allowed] @ enc.hidden[enc.hist_pos[i]]
                for j, it in enumerate(allowed.tolist()):
                    seen = [p for p in range(lo, i + 1) if int(b.items[p]) == it]
                    if seen:
                        z[j] += beta[recency_bucket(torch.tensor(i - seen[-1]), model.config.num_repeat_buckets,
                                                    model.config.max_len)]
                terms.append(torch.logsumexp(z, 0) - z[allowed.tolist().index(int(b.next_items[i]))])
    assert float(loss) == pytest.approx(float(torch.stack(terms).mean()), rel=1e-4)


# --------------------------------------------------------------------------- ranking among the target items


def reference_ranks(scorer, q, rep, targets, hi, ho, allowed, mask_history, kmax):
    """Every item scored (repeat offsets included), the non-target ones -inf, ranked pessimistically."""
    B, n = q.shape[0], rep.shape[0]
    items = torch.arange(n).repeat(B, 1)
    s = scorer.item_scores(q, rep, items.clamp(min=1), hi, ho)
    s[:, ~allowed] = float("-inf")
    return brute_force_ranks(s, targets, hi, ho, mask_history=mask_history).clamp(max=kmax + 1)


@pytest.mark.parametrize("repeat", [False, True])
@pytest.mark.parametrize("mask_history", [True, False])
def test_ranks_among_target_items_match_brute_force(repeat, mask_history):
    g = torch.Generator().manual_seed(3)
    N, D, B, kmax = 60, 8, 12, 20
    allowed = torch.rand(N + 1, generator=g) < 0.4
    allowed[0] = False
    ids = allowed.nonzero().view(-1)
    rep = torch.randn(N + 1, D, generator=g)
    rep[0] = 0
    q = torch.randn(B, D, generator=g)
    rep[~allowed] += 3 * q.mean(0)  # the non-target items score far above: they must not count
    targets = ids[torch.randint(len(ids), (B,), generator=g)]
    lens = torch.randint(0, 9, (B,), generator=g)
    ho = torch.cat([torch.zeros(1, dtype=torch.int64), torch.cumsum(lens, 0)])
    hi = torch.randint(1, N + 1, (int(ho[-1]),), generator=g)
    hi[:3] = targets[0]  # a repeat of the target in row 0's history (when it has one)
    scorer = Scorer(repeat, 4, 16, impl="reference")
    if repeat:
        with torch.no_grad():
            scorer.repeat_raw.copy_(torch.tensor([0.05, -0.02, 0.03, -0.1]))
    got = target_ranks_within(scorer, q, rep, targets, hi, ho, allowed, mask_history=mask_history, kmax=kmax)
    want = reference_ranks(scorer, q, rep, targets, hi, ho, allowed, mask_history, kmax)
    assert got.tolist() == want.tolist()
    full = scorer.target_ranks(q, rep, targets, hi, ho, mask_history=mask_history, kmax=kmax)
    assert (full >= got).all() and (full > got).any()  # the whole catalogue would rank the A items ahead
    with pytest.raises(ValueError, match="not target items"):
        target_ranks_within(scorer, q, rep, ids.new_tensor([int((~allowed[1:]).nonzero()[0]) + 1]),
                            hi[:0], torch.zeros(2, dtype=torch.int64), allowed)


def test_evaluation_never_ranks_a_non_target_item():
    ds = domain_dataset(toy(), "B")
    sp = leave_one_out(ds)
    model = UniRec.from_dataset(ds, preset("unified", dim=16, num_blocks=1, num_heads=2, max_len=16, dropout=0.0))
    model.eval()
    builder = TokenBuilder.for_config(sp, model.config)
    allowed = torch.from_numpy(ds.target_items)
    with torch.no_grad():  # the A items' representations pushed along the users' states: they would rank first
        rep = model.item_representations().float()
        q = model.predict(builder.eval_batch("test", sp.eval_users), rep)["queries"]
        rep[~allowed & (torch.arange(len(allowed)) > 0)] += 50 * q.mean(0)
    model.item_representations = lambda: rep
    for stage in ("valid", "test"):
        for mask in (True, False):
            m = evaluate_model(model, builder, stage, mask_history=mask, return_ranks=True)
            b = builder.eval_batch(stage, sp.eval_users)
            with torch.no_grad():
                p = model.predict(b, rep)
            args = (p["queries"], p["item_rep"], b.targets, b.history_items, b.history_offsets)
            want = reference_ranks(model.scorer, *args, allowed, mask, 20)
            assert m["ranks"].tolist() == want.tolist() and m["num_ranked_items"] == 3
            assert int(m["ranks"].max()) <= 3  # three B items: no rank can pass them
            # over the whole catalogue an A item (at least the unrated i6) would rank ahead of every target
            assert (model.scorer.target_ranks(*args, mask_history=mask) > m["ranks"]).all()
    pop = popularity_baseline(sp, "test")
    assert pop["num_users"] == 2 and pop["hr@5"] == 1.0  # ranked among the 3 B items only


# --------------------------------------------------------------------------- loading and the command line


def test_load_dataset_with_a_domain():
    cfg = DataConfig("synthetic", {"num_users": 30, "num_items": 40, "mean_length": 8, "domain": "B",
                                   "b_genres": ["genre0", "genre1", "genre2"]})
    assert cfg.name == "synthetic-B" and DataConfig("ml-1m", {"domain": "A"}).name == "ml-1m-A"
    assert DataConfig("/x/y/toy").name == "toy"
    ds = load_dataset(cfg)
    assert ds.name == "synthetic-B" and ds.target_items is not None and ds.target_items.any()
    assert ds.item_cluster.shape == (ds.num_items + 1,)
    a = load_dataset("synthetic", num_users=30, num_items=40, mean_length=8, domain="A", b_genres=["genre0"])
    assert a.name == "synthetic-A" and a.item_cluster.shape == (a.num_items + 1,)
    with pytest.raises(ValueError, match="b_genres"):  # synthetic genres are not MovieLens'
        load_dataset("synthetic", num_users=30, num_items=40, mean_length=8, domain="B")
    with pytest.raises(ValueError, match="domain must be one of.*'X'"):
        load_dataset("synthetic", num_users=30, domain="X")
    with pytest.raises(ValueError, match="b_genres needs"):
        load_dataset("synthetic", num_users=30, b_genres=["genre0"])


def write_atomic(d, num_users=40, num_items=30, length=14, seed=0):
    """A tiny RecBole atomic data set with MovieLens genre names."""
    rng = np.random.default_rng(seed)
    genres = ["Action", "Comedy", "Drama", "Sci-Fi", "Romance", "Horror", "Animation"]
    d.mkdir()
    lines = ["user_id:token\titem_id:token\trating:float\ttimestamp:float"]
    for u in range(num_users):
        for t, i in enumerate(rng.choice(num_items, length, replace=False)):
            lines.append(f"u{u}\t{i}\t{rng.integers(1, 6)}\t{1000 * u + t}")
    (d / "toy.inter").write_text("\n".join(lines) + "\n")
    items = ["item_id:token\tmovie_title:token_seq\tgenre:token_seq"]
    for i in range(num_items):
        g = " ".join(rng.choice(genres, rng.integers(1, 3), replace=False))
        items.append(f"{i}\tFilm {i}\t{g}")
    (d / "toy.item").write_text("\n".join(items) + "\n")


def test_cli_train_on_domain_b(tmp_path, capsys):
    from unirec.cli import main
    data = tmp_path / "toy"
    write_atomic(data)
    out = tmp_path / "run"
    assert main(["train", "--data", str(data), "--domain", "B", *TINY_MODEL, "--epochs", "1", "--max-len", "16",
                 "--out", str(out)]) == 0
    m = json.loads((out / "metrics.json").read_text())
    ds = load_dataset(str(data), domain="B")
    n_b = int(ds.target_items.sum())
    assert 0 < n_b < ds.num_items
    for stage in ("valid", "test", "test_unmasked"):
        assert m[stage]["num_ranked_items"] == n_b and m[stage]["num_users"] > 0
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["data"]["options"] == {"domain": "B"}
    assert f"ranking among the {n_b} target-domain items" in capsys.readouterr().out  # the table says so
    assert main(["evaluate", str(out), "--json", "--no-record"]) == 0  # the run reloads its domain
    assert f'"num_ranked_items": {n_b}' in capsys.readouterr().out


def test_recommend_and_serve_a_domain_run_answer_from_its_domain(tmp_path, capsys):
    """`unirec recommend` and the service rank the target domain's items alone, as evaluation does, even
    when the other domain's items would score far above them."""
    from unirec.cli import _top_for_user, main
    from unirec.serving.engine import RecommendJob, Recommender, load_run
    from unirec.serving.store import EventStore
    data = tmp_path / "toy"
    write_atomic(data)
    out = tmp_path / "run"
    assert main(["train", "--data", str(data), "--domain", "B", *TINY_MODEL, "--epochs", "1", "--max-len", "16",
                 "--out", str(out)]) == 0
    model, split, version = load_run(out)
    ds = split.dataset
    target = set(np.flatnonzero(ds.target_items).tolist())
    with torch.no_grad():  # the A items pushed along every user's state: a whole-catalogue top-k takes them first
        rep = model.item_representations().float()
        b = TokenBuilder.for_config(split, model.config).eval_batch("test", split.eval_users)
        rep[~torch.from_numpy(ds.target_items) & (torch.arange(len(rep)) > 0)] += 50 * model.predict(b, rep)[
            "queries"].mean(0)
    model.item_representations = lambda: rep
    users = [str(ds.user_vocab[u]) for u in split.eval_users[:4]]
    for user in users:
        for exclude in (True, False):
            u, _, top = _top_for_user(model, split, user, 5, exclude=exclude)
            hist = set(split.items[split.user_offsets[u]:split.user_offsets[u + 1]].tolist())
            assert len(top) == min(5, len(target - hist) if exclude else len(target))
            assert {i for i, _ in top} <= target and (not exclude or not {i for i, _ in top} & hist)
            assert [s for _, s in top] == sorted((s for _, s in top), reverse=True)
    rec = Recommender(model, split, EventStore(tmp_path / "e.sqlite3"), version, cache_size=0)
    jobs = [RecommendJob(k=5, user_id=u) for u in users] + [RecommendJob(k=3, history=[1, 2]),
                                                             RecommendJob(k=3, candidates=np.asarray([1, 2, 3]))]
    res = rec.run_batch(jobs)
    for r in res[:-1]:
        assert not isinstance(r, Exception) and r.items and set(r.items) <= target
    assert set(res[-1].items) == {1, 2, 3}  # explicit candidates are the caller's, domain or not
