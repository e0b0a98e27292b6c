"""Two domains inside one data set, split by genre (docs/protocol.md, "Genre domains (cross-domain)").

An item is in domain **B** when its multi-valued genre feature ("genre", or "class" as in RecBole's
MovieLens-100K) holds any of ``b_genres`` (default :data:`B_GENRES`: action, adventure, science fiction,
thrillers, war, westerns, crime, horror); every other item is in domain **A**. Users are shared.

- :func:`domain_dataset` (``domain="A"``): the events on A items only, as a Dataset of its own (items,
  users, their features and titles re-indexed to what it keeps) — the pretraining domain.
- :func:`domain_dataset` (``domain="B"``): the whole data set (A and B events: the A events are context
  in a user's history), each item marked by an extra categorical item feature "domain" ("A" / "B") and
  ``Dataset.target_items`` set to the B items, which makes the leave-one-out split, the training targets
  and the rankings target-domain only (:class:`unirec.data.LeaveOneOutSplit`).

:func:`subset_events` is the generic part: a Dataset cut down to a mask of its events.
"""
from __future__ import annotations

import dataclasses
from typing import Optional, Sequence

import numpy as np

from .dataset import PAD, Dataset, Feature, FeatureTable

B_GENRES = ("Action", "Adventure", "Sci-Fi", "Thriller", "War", "Western", "Crime", "Horror")
DOMAINS = ("A", "B")
GENRE_FEATURES = ("genre", "class")
DOMAIN_FEATURE = "domain"


def _genre_feature(dataset: Dataset) -> Feature:
    names = [] if dataset.item_features is None else [f.name for f in dataset.item_features.features]
    for name in GENRE_FEATURES:
        if name in names:
            return dataset.item_features[name]
    raise ValueError(f"data set {dataset.name!r} has no item genre feature ({' or '.join(map(repr, GENRE_FEATURES))})"
                     f" to split into domains; its item features are {names}")


def item_domains(dataset: Dataset, b_genres: Sequence[str] = B_GENRES) -> np.ndarray:
    """[num_items + 1] bool: True for the items whose genre bag holds any of ``b_genres`` (domain B);
    row 0 (padding) False.

    Raises ValueError naming the data set when it has no genre feature, and naming ``b_genres`` when it
    is not a list of strings or none of them is one of the data set's genres.
    """
    if isinstance(b_genres, str) or not all(isinstance(g, str) for g in b_genres):
        raise ValueError(f"b_genres must be a list of genre names, got {b_genres!r}")
    f = _genre_feature(dataset)
    if len(f.offsets) != dataset.num_items + 2:
        raise ValueError(f"data set {dataset.name!r}: feature {f.name!r} has {len(f.offsets) - 1} rows, expected "
                         f"{dataset.num_items + 1}")
    value_is_b = np.isin(f.vocab.astype(str), list(b_genres))
    value_is_b[0] = False
    if not value_is_b.any():
        raise ValueError(f"b_genres {list(b_genres)}: none is a genre of data set {dataset.name!r} "
                         f"(its genres: {f.vocab[1:].tolist()})")
    rows = np.repeat(np.arange(dataset.num_items + 1), np.diff(f.offsets))     # [nnz] item of each value
    out = np.zeros(dataset.num_items + 1, dtype=bool)
    out[rows[value_is_b[f.indices]]] = True
    out[0] = False
    return out


def _subset_rows(ft: FeatureTable, ids: np.ndarray) -> FeatureTable:
    """``ft`` restricted to the entity rows ``ids`` ([K + 1] int64, ids[0] = 0: padding), which become rows
    0..K. Feature vocabularies are kept whole (an unused value keeps its row); per-entity raw values
    (``Feature.values``, when present) follow the rows."""
    feats = []
    for f in ft.features:
        lens = np.diff(f.offsets)[ids]
        off = np.zeros(len(ids) + 1, dtype=np.int64)
        np.cumsum(lens, out=off[1:])
        pos = np.arange(int(off[-1]), dtype=np.int64) + np.repeat(f.offsets[ids] - off[:-1], lens)
        sub = dataclasses.replace(f, indices=f.indices[pos].astype(np.int64), offsets=off)
        if getattr(f, "values", None) is not None:
            sub.values = f.values[ids]
        feats.append(sub)
    return FeatureTable(ft.id_name, len(ids), feats)


def subset_events(dataset: Dataset, keep: np.ndarray, items: Optional[np.ndarray] = None,
                  name: Optional[str] = None) -> Dataset:
    """The Dataset of the events ``keep`` ([num_interactions] bool), re-indexed.

    Items: ``items`` ([num_items + 1] bool, row 0 ignored; it must hold the item of every kept event) or,
    by default, the items of the kept events; users: those with a kept event. Both keep their order
    (new index = rank among the kept), and their vocabularies, feature rows (CSR), ``item_text`` and a
    synthetic data set's planted clusters follow. Feature vocabularies are unchanged. ``target_items``
    is not carried (None). ``name``: the result's name (default: the data set's).
    """
    ds = dataset
    keep = np.asarray(keep)
    if keep.dtype != np.bool_ or keep.shape != (ds.num_interactions,):
        raise ValueError(f"keep must be a bool mask of the {ds.num_interactions} events, got {keep.dtype} {keep.shape}")
    rows = np.flatnonzero(keep)
    if items is None:
        item_on = np.zeros(ds.num_items + 1, dtype=bool)
        item_on[ds.item[rows]] = True
    else:
        item_on = np.asarray(items, dtype=bool).copy()
        if item_on.shape != (ds.num_items + 1,):
            raise ValueError(f"items must be a bool mask of shape ({ds.num_items + 1},), got {item_on.shape}")
        if not item_on[ds.item[rows]].all():
            raise ValueError("items must hold the item of every kept event")
    item_on[0] = False
    user_on = np.zeros(ds.num_users + 1, dtype=bool)
    user_on[ds.user[rows]] = True
    item_ids = np.concatenate([[0], np.flatnonzero(item_on)]).astype(np.int64)  # new index -> old, [K + 1]
    user_ids = np.concatenate([[0], np.flatnonzero(user_on)]).astype(np.int64)
    item_new = np.cumsum(item_on).astype(np.int64)                               # old index -> new (kept ones)
    user_new = np.cumsum(user_on).astype(np.int64)
    out = Dataset(
        name or ds.name, ds.user_vocab[user_ids], ds.item_vocab[item_ids], user_new[ds.user[rows]],
        item_new[ds.item[rows]], ds.timestamp[rows], None if ds.rating is None else ds.rating[rows],
        None if ds.item_features is None else _subset_rows(ds.item_features, item_ids),
        None if ds.user_features is None else _subset_rows(ds.user_features, user_ids),
        None if ds.item_text is None else ds.item_text[item_ids])
    for attr, ids in (("item_cluster", item_ids), ("user_cluster", user_ids)):  # synthetic data's planted truth
        if getattr(ds, attr, None) is not None:
            setattr(out, attr, getattr(ds, attr)[ids])
    return out


def domain_dataset(dataset: Dataset, domain: str, b_genres: Sequence[str] = B_GENRES) -> Dataset:
    """The data set of one domain (module docstring), named "<name>-A" / "<name>-B".

    domain "A": :func:`subset_events` to the events on A items, with every A item (rated or not) kept;
    ``target_items`` None. domain "B": every event and item, the item features plus "domain"
    (categorical, vocab ["[PAD]", "A", "B"], one value per item), ``target_items`` = :func:`item_domains`
    ([num_items + 1] bool, True for B items).

    Raises ValueError naming ``domain`` for another value, naming ``b_genres`` when the domain is empty,
    and the errors of :func:`item_domains`.
    """
    if domain not in DOMAINS:
        raise ValueError(f"domain must be one of {DOMAINS}, got {domain!r}")
    if dataset.target_items is not None:
        raise ValueError(f"data set {dataset.name!r} is already a target-domain data set (target_items is set)")
    is_b = item_domains(dataset, b_genres)
    if domain == "A":
        keep = ~is_b[dataset.item]
        if not keep.any():
            raise ValueError(f"domain 'A' of data set {dataset.name!r} has no events: every rated item has one of "
                             f"b_genres {list(b_genres)}")
        a_items = ~is_b
        a_items[0] = False
        return subset_events(dataset, keep, items=a_items, name=f"{dataset.name}-A")
    if not is_b[dataset.item].any():
        raise ValueError(f"domain 'B' of data set {dataset.name!r} has no events: no rated item has one of "
                         f"b_genres {list(b_genres)}")
    ft = dataset.item_features
    if DOMAIN_FEATURE in ft.table_names(include_id=False):
        raise ValueError(f"data set {dataset.name!r} already has an item feature {DOMAIN_FEATURE!r}")
    n = dataset.num_items
    offsets = np.concatenate([[0, 0], np.arange(1, n + 1)]).astype(np.int64)   # one value per item, none for row 0
    mark = Feature(DOMAIN_FEATURE, "categorical", np.asarray([PAD, "A", "B"]),
                   np.where(is_b[1:], 2, 1).astype(np.int64), offsets)
    out = dataclasses.replace(dataset, name=f"{dataset.name}-B",
                              item_features=FeatureTable(ft.id_name, ft.num_rows, list(ft.features) + [mark]),
                              target_items=is_b)
    for attr in ("item_cluster", "user_cluster"):  # synthetic data's planted truth
        if getattr(dataset, attr, None) is not None:
            setattr(out, attr, getattr(dataset, attr))
    return out


__all__ = ["B_GENRES", "DOMAINS", "DOMAIN_FEATURE", "item_domains", "domain_dataset", "subset_events"]
