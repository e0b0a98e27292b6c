"""Comparing two arms (sets of runs) on per-user (or per-case) test ranks, with a paired two-level bootstrap.

Each evaluated run keeps ``RUN/ranks.npz`` (``users`` [U] str ids; ``test``, ``test_unmasked``,
``valid`` [U] int64 pessimistic 1-based ranks clipped at kmax + 1 = 21, so NDCG/HR/MRR@K are
exact for K <= 20) next to ``RUN/config.json`` (``train.seed``, ``data.source``). A stage may carry
its own ids, ``<stage>_ids``: the cold-item protocol's ``cold_valid`` / ``cold_test`` ranks are per
case (an event on a cold item, id "<user>@<item>@<k>"), not per user; "users" below then means cases.
Runs of the cold-item stages must share the split (``train.cold_share``, ``train.cold_seed``).

Method: arm A and arm B runs are paired by training seed (else by position), users are aligned
by id (only users present in every run are kept), and each user's metric is computed from its
rank. The statistic is the mean over seeds and users of d = a - b. Its uncertainty has two
sources, the finite test population and training noise, so the bootstrap resamples both: each
sample draws S seed pairs and U users with replacement and takes the mean of
d[seeds][:, users]. The interval is the percentile interval of those means. With one seed
only users are resampled, so the interval then ignores training noise.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import numpy as np

STAGES = ("test", "test_unmasked", "valid", "cold_test", "cold_valid")
_METRIC = re.compile(r"^(ndcg|hr|mrr)@([1-9][0-9]*)$")


def per_user_metric(ranks: np.ndarray, metric: str) -> np.ndarray:
    """Per-user "ndcg@K", "hr@K" or "mrr@K" from ranks: [...] ints >= 1; returns float64 of the same shape."""
    m = _METRIC.match(str(metric).strip().lower())
    if m is None:
        raise ValueError(f"unknown metric {metric!r}; expected ndcg@K, hr@K or mrr@K (e.g. 'ndcg@10')")
    name, k = m.group(1), int(m.group(2))
    r = np.asarray(ranks)
    if r.size and r.min() < 1:
        raise ValueError(f"ranks must be 1-based (>= 1), got a minimum of {r.min()}")
    r = r.astype(np.float64)
    hit = r <= k
    if name == "hr":
        return hit.astype(np.float64)
    val = 1.0 / np.log2(r + 1.0) if name == "ndcg" else 1.0 / r
    return np.where(hit, val, 0.0)


def paired_bootstrap(a: np.ndarray, b: np.ndarray, num_samples: int = 10000, level: float = 0.95,
                     seed: int = 0) -> dict:
    """Paired two-level bootstrap of mean(a - b).

    Args:
        a, b: [S, U] per-user metric values of arms A and B (row s of a pairs with row s of b,
            columns are the same users); a [U] array is taken as S = 1.
        num_samples: bootstrap samples; level: interval coverage in (0, 1); seed: resampling seed.
    Returns:
        dict with mean_a, mean_b, diff (mean of a - b), relative (diff / mean_b, None if mean_b == 0),
        low, high (percentile interval), num_seeds, num_users, num_samples, level.
    """
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    a, b = (x[None] if x.ndim == 1 else x for x in (a, b))
    for name, x in (("a", a), ("b", b)):
        if x.ndim != 2:
            raise ValueError(f"{name} must be [S, U] (seeds x users), got shape {x.shape}")
        if x.size == 0:
            raise ValueError(f"{name} is empty (shape {x.shape}); need at least one seed and one user")
    if a.shape != b.shape:
        raise ValueError(f"a and b must have the same [S, U] shape, got a {a.shape} and b {b.shape}")
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1), got {level}")
    if int(num_samples) < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    num_samples = int(num_samples)
    S, U = a.shape
    d = a - b
    rng = np.random.default_rng(seed)
    stats = np.empty(num_samples)
    # ~4M gathered values per chunk keeps memory at tens of MB whatever num_samples is.
    chunk = max(1, min(num_samples, (1 << 22) // U))
    for start in range(0, num_samples, chunk):
        n = min(chunk, num_samples - start)
        if S == 1:
            rows = np.broadcast_to(d[0], (n, U))
        else:
            # mean over resampled seeds = seed counts @ d / S; then the users are gathered from it.
            sidx = rng.integers(0, S, size=(n, S))
            counts = (sidx[:, :, None] == np.arange(S)).sum(1).astype(np.float64)
            rows = counts @ d / S
        uidx = rng.integers(0, U, size=(n, U))
        stats[start:start + n] = np.take_along_axis(rows, uidx, axis=1).mean(1)
    low, high = np.quantile(stats, [(1.0 - level) / 2.0, (1.0 + level) / 2.0])
    mean_a, mean_b, diff = float(a.mean()), float(b.mean()), float(d.mean())
    return {"mean_a": mean_a, "mean_b": mean_b, "diff": diff,
            "relative": None if mean_b == 0 else diff / mean_b,
            "low": float(low), "high": float(high), "num_seeds": S, "num_users": U,
            "num_samples": num_samples, "level": float(level)}


def load_ranks(run_dir, stage: str = "test") -> Tuple[int, np.ndarray, np.ndarray, str]:
    """Reads one run: returns (train seed, ids [U] str, ranks [U] int64 of ``stage``, data source). The ids
    are the array ``<stage>_ids`` when the file has one (the cold-item cases), else ``users``."""
    if stage not in STAGES:
        raise ValueError(f"stage must be one of {STAGES}, got {stage!r}")
    run = Path(run_dir)
    cfg_file, ranks_file = run / "config.json", run / "ranks.npz"
    if not cfg_file.exists():
        raise FileNotFoundError(f"{run}: no config.json; pass a folder written by `unirec train`")
    if not ranks_file.exists():
        raise FileNotFoundError(f"{run}: the run has no per-user ranks (ranks.npz); "
                                f"run `unirec evaluate {run}` to write them")
    cfg = json.loads(cfg_file.read_text())
    try:
        seed, source = int(cfg["train"]["seed"]), str(cfg["data"]["source"])
    except (KeyError, TypeError) as e:
        raise ValueError(f"{cfg_file}: needs train.seed and data.source ({e!r} missing)") from None
    with np.load(ranks_file, allow_pickle=False) as z:
        id_key = f"{stage}_ids" if f"{stage}_ids" in z.files else "users"
        if id_key not in z.files or stage not in z.files:
            hint = " (cold-item ranks come from a run trained with split='cold-items')" if stage.startswith("cold") \
                else ""
            raise ValueError(f"{ranks_file}: needs arrays {id_key!r} and {stage!r}, has {z.files}{hint}")
        users, ranks = z[id_key].astype(str), z[stage].astype(np.int64)
    if users.ndim != 1 or users.shape != ranks.shape:
        raise ValueError(f"{ranks_file}: {id_key} {users.shape} and {stage} {ranks.shape} must be equal-length 1-D")
    if np.unique(users).size != users.size:
        raise ValueError(f"{ranks_file}: {'user' if id_key == 'users' else 'case'} ids are not unique")
    return seed, users, ranks, source


def _cold_split_of(run_dir) -> tuple:
    """(split, cold_share, cold_seed) of a run's training config (defaults for folders without them)."""
    train = json.loads((Path(run_dir) / "config.json").read_text()).get("train") or {}
    return (train.get("split", "leave-one-out"), float(train.get("cold_share", 0.15)), int(train.get("cold_seed", 0)))


def _pair(runs_a: list, runs_b: list, seeds_a: List[int], seeds_b: List[int]) -> List[Tuple[int, int]]:
    """Index pairs (i, j) of runs_a[i] with runs_b[j]: by seed when possible, else by position."""
    distinct = len(set(seeds_a)) == len(seeds_a) and len(set(seeds_b)) == len(seeds_b)
    if distinct and set(seeds_a) == set(seeds_b):
        where_b = {s: j for j, s in enumerate(seeds_b)}
        return [(i, where_b[s]) for i, s in enumerate(seeds_a)]
    if len(runs_a) == len(runs_b):
        return [(i, i) for i in range(len(runs_a))]
    raise ValueError(f"cannot pair the runs: arm A has {len(runs_a)} runs with seeds {seeds_a} and arm B "
                     f"{len(runs_b)} with seeds {seeds_b}; give both arms the same seeds or the same number of runs")


def compare_runs(runs_a: list, runs_b: list, metrics: Sequence[str] = ("ndcg@10", "hr@10"), stage: str = "test",
                 num_samples: int = 10000, level: float = 0.95, seed: int = 0,
                 only: Optional[Sequence[str]] = None) -> dict:
    """Compares arm A (runs_a) with arm B (runs_b) on ``stage`` ranks; see the module docstring.
    ``only``: compare these user (or case) ids alone, e.g. the users whose held-out item is disliked.

    Returns {"metrics": {metric: paired_bootstrap dict}, "pairs": [(run_a, run_b, seed_a, seed_b)],
    "stage", "data_source", "num_users" (users kept), "users_dropped" (users not in every run),
    "only" (whether ``only`` chose the users)}.
    """
    if not runs_a or not runs_b:
        raise ValueError(f"both arms need at least one run (A has {len(runs_a)}, B has {len(runs_b)})")
    metrics = [metrics] if isinstance(metrics, str) else list(metrics)
    for m in metrics:
        per_user_metric(np.ones(1, dtype=np.int64), m)  # fail on a bad name before loading anything
    loaded = [load_ranks(r, stage) for r in list(runs_a) + list(runs_b)]
    runs = [str(r) for r in list(runs_a) + list(runs_b)]
    sources = {}
    for r, (_, _, _, src) in zip(runs, loaded):
        sources.setdefault(src, r)
    if len(sources) > 1:
        (s1, r1), (s2, r2) = list(sources.items())[:2]
        raise ValueError(f"runs are on different data sets: {r1} on {s1!r}, {r2} on {s2!r}")
    if stage.startswith("cold"):
        splits = {}
        for r in runs:
            splits.setdefault(_cold_split_of(r), r)
        if len(splits) > 1:
            (s1, r1), (s2, r2) = list(splits.items())[:2]
            raise ValueError(f"runs use different cold-item splits: {r1} (split, cold_share, cold_seed) = {s1}, "
                             f"{r2} {s2}; compare runs evaluated on the same cases")
    na = len(runs_a)
    seeds = [x[0] for x in loaded]
    pairs = _pair(runs_a, runs_b, seeds[:na], seeds[na:])

    all_users = [x[1] for x in loaded]
    keep = np.ones(all_users[0].size, dtype=bool)
    for u in all_users[1:]:
        keep &= np.isin(all_users[0], u)
    union = np.unique(np.concatenate(all_users)).size
    dropped = int(union - keep.sum())
    if only is not None:
        keep &= np.isin(all_users[0], np.asarray(only, dtype=str))
    common = all_users[0][keep]  # the first run's order
    if common.size == 0:
        raise ValueError(f"no {'case' if stage.startswith('cold') else 'user'} is present in every run"
                         f"{'' if only is None else ' and in only'}; were they evaluated on the same data?")
    aligned = []
    for users, (_, _, ranks, _) in zip(all_users, loaded):
        order = np.argsort(users)
        aligned.append(ranks[order[np.searchsorted(users, common, sorter=order)]])
    ra = np.stack([aligned[i] for i, _ in pairs])
    rb = np.stack([aligned[na + j] for _, j in pairs])
    out = {m: paired_bootstrap(per_user_metric(ra, m), per_user_metric(rb, m), num_samples, level, seed)
           for m in metrics}
    return {"metrics": out, "pairs": [(runs[i], runs[na + j], seeds[i], seeds[na + j]) for i, j in pairs],
            "stage": stage, "data_source": next(iter(sources)), "num_users": int(common.size),
            "users_dropped": dropped, "only": only is not None}


def format_comparison(result: dict, name_a: str = "A", name_b: str = "B", lower_is_better: bool = False) -> str:
    """A short table of a compare_runs result: means, difference, relative difference and interval.
    ``lower_is_better``: the metrics count a miss (e.g. hr@10 over users whose held-out item is disliked)."""
    rows = list(result["metrics"].items())
    first = rows[0][1] if rows else {}
    pct = f"{first.get('level', 0.95) * 100:g}%"
    w = max([len(name_a), len(name_b), 8])
    unit = "cases" if str(result.get("stage", "test")).startswith("cold") else "users"
    lines = [f"{name_a} vs {name_b} on {result.get('stage', 'test')} ranks: {first.get('num_users')} {unit} "
             f"({result.get('users_dropped', 0)} dropped), {first.get('num_seeds')} paired seeds, "
             f"{first.get('num_samples')} bootstrap samples",
             f"{'metric':<10} {name_a:>{w}} {name_b:>{w}} {'diff':>9} {'rel':>8}  {pct} interval"]
    verdicts = []
    for m, r in rows:
        rel = "n/a" if r["relative"] is None else f"{100 * r['relative']:+.2f}%"
        lines.append(f"{m:<10} {r['mean_a']:>{w}.4f} {r['mean_b']:>{w}.4f} {r['diff']:>+9.4f} {rel:>8}  "
                     f"[{r['low']:+.4f}, {r['high']:+.4f}]")
        above, below = ("worse", "better") if lower_is_better else ("better", "worse")
        if r["low"] > 0:
            verdicts.append(f"{m}: interval above zero ({name_a} {above} than {name_b})")
        elif r["high"] < 0:
            verdicts.append(f"{m}: interval below zero ({name_a} {below} than {name_b})")
        else:
            verdicts.append(f"{m}: interval contains zero (no clear difference)")
    return "\n".join(lines + verdicts)
