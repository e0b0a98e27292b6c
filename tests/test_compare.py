import json
import math

import numpy as np
import pytest

from unirec.evaluation.compare import compare_runs, format_comparison, load_ranks, paired_bootstrap, per_user_metric


def write_run(path, seed, users, test, source="ml-100k", arm=None):
    """A run folder as `unirec evaluate` leaves it: ranks.npz + config.json."""
    path.mkdir(parents=True)
    users = np.asarray(users, dtype=str)
    test = np.asarray(test, dtype=np.int64)
    np.savez(path / "ranks.npz", users=users, test=test, test_unmasked=np.minimum(test + 1, 21),
             valid=np.minimum(test + 2, 21))
    cfg = {"train": {"seed": seed, "epochs": 1}, "data": {"source": source}}
    if arm is not None:
        cfg["arm"] = arm
    (path / "config.json").write_text(json.dumps(cfg))
    return path


# --------------------------------------------------------------------------- per-user metrics


def test_per_user_metric_hand_computed():
    r = np.array([1, 2, 3, 10, 11, 21])
    np.testing.assert_allclose(per_user_metric(r, "ndcg@10"),
                               [1.0, 1 / math.log2(3), 0.5, 1 / math.log2(11), 0.0, 0.0])
    np.testing.assert_array_equal(per_user_metric(r, "hr@10"), [1, 1, 1, 1, 0, 0])
    np.testing.assert_allclose(per_user_metric(r, "mrr@10"), [1.0, 0.5, 1 / 3, 0.1, 0.0, 0.0])
    np.testing.assert_array_equal(per_user_metric(r, "hr@1"), [1, 0, 0, 0, 0, 0])
    np.testing.assert_allclose(per_user_metric(r, "NDCG@20")[-2:], [1 / math.log2(12), 0.0])
    assert per_user_metric(r.reshape(2, 3), "hr@2").shape == (2, 3)


@pytest.mark.parametrize("bad", ["recall@10", "ndcg@0", "ndcg", "hr@x", "auc"])
def test_per_user_metric_rejects_unknown(bad):
    with pytest.raises(ValueError, match=bad):
        per_user_metric(np.array([1, 2]), bad)


def test_per_user_metric_rejects_zero_rank():
    with pytest.raises(ValueError, match="1-based"):
        per_user_metric(np.array([0, 2]), "hr@10")


# --------------------------------------------------------------------------- bootstrap


def test_planted_difference_interval_above_zero():
    rng = np.random.default_rng(1)
    S, U, delta = 3, 3000, 0.05
    b = rng.random((S, U))
    a = b + delta + rng.normal(0.0, 0.2, (S, U))
    r = paired_bootstrap(a, b, num_samples=2000, seed=3)
    assert 0 < r["low"] <= delta <= r["high"]
    assert r["low"] <= r["diff"] <= r["high"]
    assert r["diff"] == pytest.approx((a - b).mean())
    assert r["mean_a"] == pytest.approx(a.mean()) and r["mean_b"] == pytest.approx(b.mean())
    assert r["relative"] == pytest.approx(r["diff"] / r["mean_b"])
    assert (r["num_seeds"], r["num_users"], r["num_samples"], r["level"]) == (S, U, 2000, 0.95)
    assert paired_bootstrap(a, b, num_samples=2000, seed=3) == r  # reproducible


def test_identical_arms_give_zero():
    rng = np.random.default_rng(2)
    a = rng.random((4, 300))
    r = paired_bootstrap(a, a.copy(), num_samples=500)
    assert r["diff"] == 0.0 and r["low"] == 0.0 and r["high"] == 0.0


def test_zero_baseline_relative_is_none():
    r = paired_bootstrap(np.ones((2, 5)), np.zeros((2, 5)), num_samples=50)
    assert r["relative"] is None and r["diff"] == 1.0


def test_swapping_arms_negates():
    rng = np.random.default_rng(3)
    a, b = rng.random((3, 400)), rng.random((3, 400))
    ab = paired_bootstrap(a, b, num_samples=1000, seed=7)
    ba = paired_bootstrap(b, a, num_samples=1000, seed=7)
    assert ba["diff"] == pytest.approx(-ab["diff"])
    assert ba["low"] == pytest.approx(-ab["high"]) and ba["high"] == pytest.approx(-ab["low"])
    assert (ba["mean_a"], ba["mean_b"]) == (ab["mean_b"], ab["mean_a"])


def test_single_seed_resamples_users_only():
    rng = np.random.default_rng(4)
    U = 4000
    d = rng.normal(0.1, 1.0, U)
    r = paired_bootstrap(d[None], np.zeros((1, U)), num_samples=4000, seed=1)
    assert r["num_seeds"] == 1
    assert paired_bootstrap(d, np.zeros(U), num_samples=4000, seed=1) == r  # [U] is S = 1
    # The percentile interval of a user-only bootstrap is about mean +- 1.96 standard errors.
    se = d.std() / math.sqrt(U)
    assert (r["high"] - r["low"]) == pytest.approx(2 * 1.96 * se, rel=0.1)
    assert r["low"] < d.mean() < r["high"]


def test_seed_resampling_widens_interval():
    rng = np.random.default_rng(5)
    S, U = 3, 2000
    # Seed-to-seed noise dominates: pooling the seeds as users would hide it.
    d = np.array([[0.0], [0.1], [0.2]]) + rng.normal(0.0, 0.01, (S, U))
    two_level = paired_bootstrap(d, np.zeros((S, U)), num_samples=2000)
    users_only = paired_bootstrap(d.reshape(1, -1), np.zeros((1, S * U)), num_samples=2000)
    assert two_level["high"] - two_level["low"] > 10 * (users_only["high"] - users_only["low"])
    assert two_level["low"] >= d.mean(1).min() - 0.01 and two_level["high"] <= d.mean(1).max() + 0.01


@pytest.mark.parametrize("a_shape, b_shape, level, match", [
    ((2, 5), (2, 6), 0.95, "a and b"),
    ((3, 5), (2, 5), 0.95, "a and b"),
    ((2, 2, 5), (2, 2, 5), 0.95, "a must be"),
    ((0, 5), (0, 5), 0.95, "a is empty"),
    ((2, 5), (2, 0), 0.95, "b is empty"),
    ((2, 5), (2, 5), 0.0, "level"),
    ((2, 5), (2, 5), 1.0, "level"),
    ((2, 5), (2, 5), 1.5, "level"),
])
def test_bad_inputs_raise(a_shape, b_shape, level, match):
    rng = np.random.default_rng(6)
    with pytest.raises(ValueError, match=match):
        paired_bootstrap(rng.random(a_shape), rng.random(b_shape), num_samples=10, level=level)


# --------------------------------------------------------------------------- runs


def make_arms(tmp_path, rng, U=400):
    """Arm A ranks are better; B's ranks depend strongly on the seed, so a wrong pairing shows."""
    users = np.array([str(i) for i in range(1, U + 1)])
    base = rng.integers(1, 22, U)
    ranks_a = {s: np.clip(base - 2 + rng.integers(-1, 2, U), 1, 21) for s in (1, 2, 3)}
    ranks_b = {s: np.clip(base + 3 * s, 1, 21) for s in (1, 2, 3)}
    return users, ranks_a, ranks_b


def test_compare_runs_pairs_by_seed_and_aligns_users(tmp_path):
    rng = np.random.default_rng(7)
    users, ranks_a, ranks_b = make_arms(tmp_path, rng)
    runs_a = [write_run(tmp_path / f"a{s}", s, users, ranks_a[s], arm="A") for s in (1, 2, 3)]
    runs_b = []
    for s in (3, 1, 2):  # other order on B's side
        u, r = users, ranks_b[s]
        if s == 1:  # user "7" missing and the rows shuffled in one B run
            keep = u != "7"
            perm = rng.permutation(keep.sum())
            u, r = u[keep][perm], r[keep][perm]
        runs_b.append(write_run(tmp_path / f"b{s}", s, u, r))
    # an extra user in one A run only
    (tmp_path / "a2" / "ranks.npz").unlink()
    np.savez(tmp_path / "a2" / "ranks.npz", users=np.append(users, "999"), test=np.append(ranks_a[2], 1),
             test_unmasked=np.append(ranks_a[2], 1), valid=np.append(ranks_a[2], 1))

    res = compare_runs(runs_a, runs_b, metrics=("ndcg@10", "hr@5"), num_samples=500, seed=11)
    assert [(p[2], p[3]) for p in res["pairs"]] == [(1, 1), (2, 2), (3, 3)]
    assert [p[1] for p in res["pairs"]] == [str(tmp_path / f"b{s}") for s in (1, 2, 3)]
    assert res["num_users"] == len(users) - 1 and res["users_dropped"] == 2
    assert res["stage"] == "test" and res["data_source"] == "ml-100k"
    keep = users != "7"
    for m in ("ndcg@10", "hr@5"):
        a = per_user_metric(np.stack([ranks_a[s][keep] for s in (1, 2, 3)]), m)
        b = per_user_metric(np.stack([ranks_b[s][keep] for s in (1, 2, 3)]), m)
        assert res["metrics"][m] == paired_bootstrap(a, b, num_samples=500, seed=11)
        assert res["metrics"][m]["low"] > 0
    text = format_comparison(res, "sasrec", "base")
    assert "ndcg@10" in text and "hr@5" in text and "interval above zero" in text and "399 users" in text


def test_compare_runs_other_stage_and_position_pairing(tmp_path):
    rng = np.random.default_rng(8)
    users, ranks_a, ranks_b = make_arms(tmp_path, rng, U=50)
    runs_a = [write_run(tmp_path / f"a{s}", s, users, ranks_a[s]) for s in (1, 2)]
    runs_b = [write_run(tmp_path / f"b{s}", s + 10, users, ranks_b[s]) for s in (2, 1)]
    res = compare_runs(runs_a, runs_b, metrics="mrr@20", stage="valid", num_samples=100)
    assert [(p[2], p[3]) for p in res["pairs"]] == [(1, 12), (2, 11)]  # by position: seeds differ
    a = per_user_metric(np.stack([np.minimum(ranks_a[s] + 2, 21) for s in (1, 2)]), "mrr@20")
    b = per_user_metric(np.stack([np.minimum(ranks_b[s] + 2, 21) for s in (2, 1)]), "mrr@20")
    assert res["metrics"]["mrr@20"] == paired_bootstrap(a, b, num_samples=100)
    with pytest.raises(ValueError, match="cannot pair"):
        compare_runs(runs_a, runs_b[:1], num_samples=10)


def test_compare_runs_only_some_users(tmp_path):
    rng = np.random.default_rng(9)
    users, ranks_a, ranks_b = make_arms(tmp_path, rng, U=60)
    runs_a = [write_run(tmp_path / f"a{s}", s, users, ranks_a[s]) for s in (1, 2)]
    runs_b = [write_run(tmp_path / f"b{s}", s, users, ranks_b[s]) for s in (1, 2)]
    only = users[::3]
    res = compare_runs(runs_a, runs_b, metrics="hr@10", num_samples=200, only=list(only) + ["not a user"])
    pick = np.isin(users, only)
    a = per_user_metric(np.stack([ranks_a[s][pick] for s in (1, 2)]), "hr@10")
    b = per_user_metric(np.stack([ranks_b[s][pick] for s in (1, 2)]), "hr@10")
    assert res["metrics"]["hr@10"] == paired_bootstrap(a, b, num_samples=200)
    assert res["num_users"] == 20 and res["users_dropped"] == 0 and res["only"]
    text = format_comparison(res, "A", "B", lower_is_better=True)
    assert ("A worse than B" in text) == (res["metrics"]["hr@10"]["low"] > 0)
    with pytest.raises(ValueError, match="and in only"):
        compare_runs(runs_a, runs_b, num_samples=10, only=["nobody"])


def test_compare_runs_different_data_sources_raise(tmp_path):
    users = ["1", "2", "3"]
    ra = write_run(tmp_path / "a", 1, users, [1, 2, 3])
    rb = write_run(tmp_path / "b", 1, users, [1, 2, 3], source="ml-1m")
    with pytest.raises(ValueError, match="ml-100k") as e:
        compare_runs([ra], [rb], num_samples=10)
    assert "ml-1m" in str(e.value)


def test_compare_runs_no_common_users_raise(tmp_path):
    ra = write_run(tmp_path / "a", 1, ["1", "2"], [1, 2])
    rb = write_run(tmp_path / "b", 1, ["3", "4"], [1, 2])
    with pytest.raises(ValueError, match="no user"):
        compare_runs([ra], [rb], num_samples=10)


def test_missing_ranks_is_a_clear_error(tmp_path):
    ra = write_run(tmp_path / "a", 1, ["1", "2"], [1, 2])
    rb = write_run(tmp_path / "b", 1, ["1", "2"], [1, 2])
    (rb / "ranks.npz").unlink()
    with pytest.raises(FileNotFoundError, match="unirec evaluate"):
        compare_runs([ra], [rb], num_samples=10)


def test_load_ranks(tmp_path):
    run = write_run(tmp_path / "r", 5, ["10", "20"], [3, 21], source="ml-1m")
    seed, users, ranks, source = load_ranks(run, "test_unmasked")
    assert (seed, users.tolist(), ranks.tolist(), source) == (5, ["10", "20"], [4, 21], "ml-1m")
    assert ranks.dtype == np.int64
    with pytest.raises(ValueError, match="stage"):
        load_ranks(run, "train")
