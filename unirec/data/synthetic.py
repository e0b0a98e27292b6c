"""Synthetic interactions with planted structure, vectorised to catalogues of 10^6 items.

The generative story (all numpy, no per-event Python loops):

- C taste clusters. Item i belongs to cluster ``item_cluster[i]``; users belong
  to ``user_cluster[u]``.
- Item popularity is Zipf: weight ``1 / rank**zipf_a`` over a random ranking.
- Each event of user u picks, with probability ``affinity``, an item of u's
  cluster (by popularity within the cluster), otherwise any item (by global
  popularity). Repeated (user, item) pairs are dropped, so sequences are sets in
  time order like MovieLens (events are over-drawn, de-duplicated, then cut to
  each user's length; a user ends up shorter only when its cluster has too few
  distinct items to draw from).
- Timestamps: a per-user start plus exponential gaps (seconds).
- Ratings 1..5: about 4.3 on items of the user's cluster, about 2.7 elsewhere.
- Item attributes: a genre bag whose first genre is the cluster's own with
  probability ``attr_signal`` (plus 0-2 random genres), a release year around a
  per-cluster mean, a brand token that is noise, and a title "item <id> <genre>".
- User profile: age around a per-cluster mean, gender, an occupation that equals
  the cluster's with probability ``attr_signal``, zip prefix noise.

The planted truth (cluster arrays) is attached to the Dataset; see ``cluster_truth``.
"""
from __future__ import annotations

from typing import Dict, Optional

import numpy as np

from .dataset import AGE_BOUNDARIES, PAD, Dataset, Feature, FeatureTable, bucket_labels


def _csr_single(codes: np.ndarray, present: Optional[np.ndarray] = None):
    """One value per entity row 1..n (row 0 padding, empty) -> (indices, offsets)."""
    n = len(codes)
    present = np.ones(n, bool) if present is None else present
    offsets = np.zeros(n + 2, dtype=np.int64)
    np.cumsum(present.astype(np.int64), out=offsets[2:])
    return codes[present].astype(np.int64), offsets


def _bucket_feature(name, values, boundaries) -> Feature:
    b = np.asarray(boundaries, dtype=np.float64)
    codes = np.searchsorted(b, values, side="right") + 1
    ind, off = _csr_single(codes)
    return Feature(name, "numeric", np.asarray([PAD] + bucket_labels(b)), ind, off, b)


def synthetic(num_users: int = 1000, num_items: int = 2000, num_clusters: int = 10, mean_length: float = 30.0,
              min_length: int = 5, zipf_a: float = 1.0, affinity: float = 0.8, attr_signal: float = 0.8,
              num_genres: int = 20, seed: int = 0, features: bool = True, name: str = "synthetic") -> Dataset:
    """Generates a Dataset with planted taste clusters (see the module docstring).

    Args:
        num_users, num_items: sizes (items up to 10^6 and beyond; memory is O(events + items)).
        num_clusters: taste clusters C (<= num_genres so each cluster owns a genre).
        mean_length: mean events per user before de-duplication (geometric-like, >= min_length).
        zipf_a: popularity exponent; 0 gives uniform popularity.
        affinity: probability an event comes from the user's own cluster.
        attr_signal: probability an item's first genre / a user's occupation is its cluster's.
        features: build item and user features (off: ids only, faster).

    Returns:
        Dataset, with the planted truth attached as attributes ``item_cluster``
        [num_items + 1] and ``user_cluster`` [num_users + 1] (index 0 = -1); see cluster_truth.
    """
    if min_length < 1:
        raise ValueError(f"min_length must be >= 1, got {min_length}")
    if num_clusters > num_genres:
        raise ValueError(f"num_clusters ({num_clusters}) must be <= num_genres ({num_genres})")
    rng = np.random.default_rng(seed)
    U, I, C = num_users, num_items, num_clusters
    item_cluster = rng.integers(0, C, size=I)
    user_cluster = rng.integers(0, C, size=U)
    popularity = 1.0 / np.power(rng.permutation(I) + 1.0, zipf_a)

    # Sampling by popularity inside a cluster: items grouped by cluster, each cluster's
    # normalised CDF shifted by its cluster index, so one searchsorted serves all clusters.
    by_cluster = np.argsort(item_cluster, kind="stable")
    w = popularity[by_cluster]
    cl = item_cluster[by_cluster]
    csum = np.cumsum(w)
    cluster_total = np.bincount(cl, weights=w, minlength=C)
    cluster_before = np.concatenate([[0.0], np.cumsum(cluster_total)])[:-1]
    shifted_cdf = np.where(cluster_total[cl] > 0, (csum - cluster_before[cl]) / np.maximum(cluster_total[cl], 1e-300), 0) + cl
    # Pin each cluster's last CDF value to c + 1 so rounding never spills into the next cluster.
    counts = np.bincount(cl, minlength=C)
    ends = np.cumsum(counts) - 1
    shifted_cdf[ends[counts > 0]] = np.nonzero(counts > 0)[0] + 1.0
    global_cdf = np.cumsum(popularity) / popularity.sum()

    lengths = min_length + rng.geometric(1.0 / max(mean_length - min_length + 1, 1.0), size=U) - 1
    # Draw more events than needed, drop repeated (user, item) pairs, then cut each user
    # back to its length: sequences stay sets of distinct items, like MovieLens.
    draws = (lengths * 1.5 + 8).astype(np.int64)
    n = int(draws.sum())
    ev_user = np.repeat(np.arange(U), draws)
    own = rng.random(n) < affinity
    u_cl = user_cluster[ev_user]
    pos = np.searchsorted(shifted_cdf, u_cl + rng.random(n) * (1 - 1e-12), side="right")
    own_items = by_cluster[np.minimum(pos, I - 1)]
    glob = np.minimum(np.searchsorted(global_cdf, rng.random(n), side="right"), I - 1)
    # Clusters with no items fall back to global popularity.
    ev_item = np.where(own & (cluster_total[u_cl] > 0), own_items, glob)
    key = ev_user.astype(np.int64) * I + ev_item
    _, first = np.unique(key, return_index=True)
    keep = np.sort(first)
    ev_user, ev_item = ev_user[keep], ev_item[keep]
    got = np.bincount(ev_user, minlength=U)
    rank = np.arange(len(ev_user)) - np.repeat(np.cumsum(got) - got, got)
    keep = rank < lengths[ev_user]
    ev_user, ev_item = ev_user[keep], ev_item[keep]
    n = len(ev_user)
    lengths = np.bincount(ev_user, minlength=U)

    # Timestamps: a per-user start within a year, then gaps ~ Exp(1 day), in event order.
    start = rng.integers(0, 365 * 86400, size=U).astype(np.float64) + 8.8e8
    gaps = rng.exponential(86400.0, size=n)
    cg = np.cumsum(gaps)
    before = np.concatenate([[0.0], cg])[np.cumsum(lengths) - lengths]  # gap sum before each user's first event
    ev_time = np.floor(start[ev_user] + cg - before[ev_user])
    match = item_cluster[ev_item] == user_cluster[ev_user]
    rating = np.clip(np.rint(np.where(match, 4.3, 2.7) + rng.normal(0, 0.8, size=n)), 1, 5).astype(np.float32)

    # Every generated item is in the catalogue (vocabulary), drawn or not.
    used_items = np.arange(I)
    used_users = np.arange(U)
    item_map = np.arange(1, I + 1, dtype=np.int64)
    user_map = np.arange(1, U + 1, dtype=np.int64)
    item_vocab = np.concatenate([[PAD], np.char.add("i", used_items.astype(str))]).astype(str)
    user_vocab = np.concatenate([[PAD], np.char.add("u", used_users.astype(str))]).astype(str)

    ift = uft = text = None
    if features:
        ic = item_cluster[used_items]
        m = len(used_items)
        # Genres: cluster c owns genre c; the first genre is the own one with prob attr_signal.
        first_genre = np.where(rng.random(m) < attr_signal, ic, rng.integers(0, num_genres, size=m))
        n_extra = rng.integers(0, 3, size=m)
        extra = rng.integers(0, num_genres, size=int(n_extra.sum()))
        lens = 1 + n_extra
        offs = np.zeros(m + 2, dtype=np.int64)
        np.cumsum(lens, out=offs[2:])
        genre_idx = np.empty(int(lens.sum()), dtype=np.int64)
        firsts = offs[1:-1]
        genre_idx[firsts] = first_genre + 1
        is_extra = np.ones(len(genre_idx), bool)
        is_extra[firsts] = False
        genre_idx[is_extra] = extra + 1
        genre_vocab = np.asarray([PAD] + [f"genre{g}" for g in range(num_genres)])
        years = np.rint(1950 + 45 * (np.arange(C) + 0.5) / C)[ic] + rng.normal(0, 4, size=m)
        brand_vocab = np.asarray([PAD] + [f"brand{b}" for b in range(50)])
        bi, bo = _csr_single(rng.integers(1, 51, size=m))
        ift = FeatureTable("item_id", m + 1, [
            Feature("genre", "multi", genre_vocab, genre_idx, offs),
            _bucket_feature("release_year", years, np.arange(1955.0, 2000.0, 5.0)),
            Feature("brand", "categorical", brand_vocab, bi, bo),
        ])
        text = np.concatenate([[""], np.char.add(np.char.add(np.char.add("item ", used_items.astype(str)), " "),
                                                 genre_vocab[first_genre + 1])]).astype(str)
        uc = user_cluster[used_users]
        k = len(used_users)
        ages = np.clip(18 + 45 * (uc + 0.5) / C + rng.normal(0, 5, size=k), 10, 80)
        occ = np.where(rng.random(k) < attr_signal, uc, rng.integers(0, C, size=k))
        oi, oo = _csr_single(occ + 1)
        gi, go = _csr_single(rng.integers(1, 3, size=k))
        zi, zo = _csr_single(rng.integers(1, 11, size=k))
        uft = FeatureTable("user_id", k + 1, [
            _bucket_feature("age", ages, AGE_BOUNDARIES),
            Feature("gender", "categorical", np.asarray([PAD, "F", "M"]), gi, go),
            Feature("occupation", "categorical", np.asarray([PAD] + [f"job{c}" for c in range(C)]), oi, oo),
            Feature("zip_prefix", "categorical", np.asarray([PAD] + [f"{z:02d}" for z in range(10)]), zi, zo),
        ])

    ds = Dataset(name, user_vocab, item_vocab, user_map[ev_user], item_map[ev_item], ev_time, rating, ift, uft, text)
    ds.item_cluster = np.concatenate([[-1], item_cluster[used_items]])
    ds.user_cluster = np.concatenate([[-1], user_cluster[used_users]])
    return ds


def cluster_truth(ds: Dataset) -> Dict[str, np.ndarray]:
    """The planted clusters of a synthetic Dataset: item_cluster [num_items+1], user_cluster [num_users+1]."""
    return {"item_cluster": ds.item_cluster, "user_cluster": ds.user_cluster}
