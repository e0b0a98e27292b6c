"""Encoded data set: id vocabularies, interactions, item and user features as TBE bags.

Index 0 of every vocabulary (users, items, each feature) is reserved for padding
("[PAD]"); real entries are 1..V-1. Users and items keep the data set's own id
strings in ``user_vocab`` / ``item_vocab`` for mapping back.

Features are stored per entity (item or user) in CSR form: for feature f,
entity e's bag is ``f.indices[f.offsets[e]:f.offsets[e+1]]`` (rows local to f's
table, in 1..len(f.vocab)-1). A missing attribute is an empty bag, pooled to
zeros by the embedding. :meth:`FeatureTable.bags` turns a batch of entity ids
into the (indices, offsets, table_offsets) of ``unirec.ops.table_batched_embedding``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, NamedTuple, Optional, Sequence, Tuple

import numpy as np
import torch

from .readers import DataFormatError, RawData, Table

PAD = "[PAD]"
# MovieLens-1M's age groups; also used to bucket MovieLens-100K's raw ages.
AGE_BOUNDARIES = (18.0, 25.0, 35.0, 45.0, 50.0, 56.0)
FEATURE_KINDS = ("categorical", "multi", "numeric", "text")


class UnknownIdError(KeyError):
    """An id the data set lacks: a KeyError that the CLI reports as the user's mistake, not as a bug."""


@dataclass
class FeatureSpec:
    """How to encode one attribute column.

    Args:
        source: the column in the item or user table.
        kind: "categorical" (one token), "multi" (a bag of tokens, e.g. genres),
            "numeric" (bucketised into a categorical), or "text" (kept as a string).
        name: the feature's name (defaults to ``source``).
        boundaries: numeric only; bucket b covers [boundaries[b-1], boundaries[b]).
            None: quantiles of the column into ``num_buckets`` buckets.
        prefix: categorical only; keep the first ``prefix`` characters (zip code regions).
    """

    source: str
    kind: str
    name: Optional[str] = None
    boundaries: Optional[Sequence[float]] = None
    num_buckets: int = 8
    prefix: Optional[int] = None

    def __post_init__(self):
        if self.kind not in FEATURE_KINDS:
            raise ValueError(f"FeatureSpec kind must be one of {FEATURE_KINDS}, got {self.kind!r}")
        self.name = self.name or self.source


@dataclass
class Feature:
    """One encoded feature over the entities of a FeatureTable.

    Attributes:
        vocab: [V] str, vocab[0] = "[PAD]"; for numeric features, bucket labels.
        indices: [nnz] int64 in [1, V).
        offsets: [num_rows + 1] int64, CSR over entities (row 0 = padding, empty).
        boundaries: numeric features: the [V - 2] bucket edges.
        values: numeric features: [num_rows] float64, each entity's value before bucketing (NaN when
            missing), e.g. a film's exact release year for matching items across data sets.
    """

    name: str
    kind: str
    vocab: np.ndarray
    indices: np.ndarray
    offsets: np.ndarray
    boundaries: Optional[np.ndarray] = None
    values: Optional[np.ndarray] = None

    @property
    def size(self) -> int:
        return len(self.vocab)


class TBEBags(NamedTuple):
    """Inputs of ``unirec.ops.table_batched_embedding`` for a batch of B entities and T tables.

    indices: [nnz] int64, row ids local to their table.
    offsets: [T * B + 1] int64, feature-major: bag (t, b) is indices[offsets[t*B+b]:offsets[t*B+b+1]].
    table_offsets: [T + 1] int64, table t owns weight rows table_offsets[t]:table_offsets[t+1].
    names: the T table names (the id table, if included, first).
    """

    indices: torch.Tensor
    offsets: torch.Tensor
    table_offsets: torch.Tensor
    names: List[str]


@dataclass
class FeatureTable:
    """Features of one entity type (items or users); rows are entity ids 0..num_rows-1 (0 = padding)."""

    id_name: str
    num_rows: int
    features: List[Feature]
    _cache: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def table_names(self, include_id: bool = True) -> List[str]:
        return ([self.id_name] if include_id else []) + [f.name for f in self.features]

    def table_sizes(self, include_id: bool = True) -> List[int]:
        """Rows of each embedding table (vocabulary sizes, padding row included)."""
        return ([self.num_rows] if include_id else []) + [f.size for f in self.features]

    def table_offsets(self, include_id: bool = True) -> torch.Tensor:
        """[T + 1] int64 cumulative table sizes."""
        sizes = torch.tensor([0] + self.table_sizes(include_id), dtype=torch.int64)
        return torch.cumsum(sizes, 0)

    def __getitem__(self, name: str) -> Feature:
        for f in self.features:
            if f.name == name:
                return f
        raise KeyError(f"no feature {name!r}; have {[f.name for f in self.features]}")

    def _torch(self, device):
        key = str(device)
        if key not in self._cache:
            self._cache[key] = [(torch.from_numpy(f.indices).to(device), torch.from_numpy(f.offsets).to(device))
                                for f in self.features]
        return self._cache[key]

    def bags(self, ids: torch.Tensor, include_id: bool = True) -> TBEBags:
        """Bags of a batch of entities for ``table_batched_embedding``.

        Args:
            ids: [B] int64 entity ids in [0, num_rows); id 0 (padding) gives empty bags.
            include_id: make the entity id itself table 0 (one row per entity).

        Returns:
            TBEBags with T = len(features) + include_id tables, on ids' device.
        """
        ids = ids.reshape(-1).to(torch.int64)
        device = ids.device
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.num_rows):
            raise IndexError(f"{self.id_name} ids must lie in [0, {self.num_rows}), got range "
                             f"[{int(ids.min())}, {int(ids.max())}]")
        parts, lengths = [], []
        if include_id:
            valid = ids != 0
            parts.append(ids[valid])
            lengths.append(valid.to(torch.int64))
        for ind, off in self._torch(device):
            start = off[ids]
            lens = off[ids + 1] - start
            total = int(lens.sum())
            # Position p of bag b maps to start[b] + (p - first position of bag b).
            bag_first = torch.cumsum(lens, 0) - lens
            pos = torch.arange(total, device=device) + torch.repeat_interleave(start - bag_first, lens, output_size=total)
            parts.append(ind[pos])
            lengths.append(lens)
        indices = torch.cat(parts) if parts else torch.zeros(0, dtype=torch.int64, device=device)
        all_lens = torch.cat(lengths) if lengths else torch.zeros(0, dtype=torch.int64, device=device)
        offsets = torch.zeros(all_lens.numel() + 1, dtype=torch.int64, device=device)
        torch.cumsum(all_lens, 0, out=offsets[1:])
        return TBEBags(indices, offsets, self.table_offsets(include_id).to(device), self.table_names(include_id))

    def bags_of_values(self, rows: Sequence[Mapping[str, Any]], ignore: Sequence[str] = (),
                       skipped: Optional[List[Tuple[int, str, Any]]] = None) -> TBEBags:
        """Bags of entities outside the table (items added after encoding), from their raw attribute values.

        Args:
            rows: one mapping per entity, feature name -> value: a categorical feature takes a string
                (or a number, matched as the encoding formats it: 1998.0 -> "1998"), a multi-valued one a
                list of strings (or one string), a numeric one a finite number (bucketed by the feature's
                boundaries). A feature left out, None or an empty list is an empty bag.
            ignore: other names the rows may hold (e.g. "title"), left alone.
            skipped: when given, (row, feature, value) is appended for each value not in the feature's
                vocabulary; such values are left out of the bag (as an unseen category would be).

        Returns:
            TBEBags over the features only (the layout of :meth:`bags` with ``include_id=False``:
            feature-major, offsets [len(features) * len(rows) + 1]).

        Raises:
            FeatureValueError (a ValueError) naming the field: an unknown name, a value of the wrong type
            (or an empty string, or a number that is not finite).
        """
        known = {f.name for f in self.features}
        allowed = known | set(ignore)
        for row in rows:
            for name in row:
                if name not in allowed:
                    raise FeatureValueError(str(name), f"unknown field; the fields are {sorted(allowed)}")
        lookups = self._value_index()
        indices: List[int] = []
        lengths: List[int] = []
        for f in self.features:
            index = lookups[f.name]
            for r, row in enumerate(rows):
                codes = []
                for v in _feature_values(f, row.get(f.name)):
                    code = _bucket(f, v) if f.kind == "numeric" else index.get(v)
                    if code is None:
                        if skipped is not None:
                            skipped.append((r, f.name, v))
                        continue
                    codes.append(code)
                indices.extend(codes)
                lengths.append(len(codes))
        offsets = torch.zeros(len(lengths) + 1, dtype=torch.int64)
        if lengths:
            torch.cumsum(torch.tensor(lengths, dtype=torch.int64), 0, out=offsets[1:])
        return TBEBags(torch.tensor(indices, dtype=torch.int64), offsets, self.table_offsets(False),
                       self.table_names(False))

    def _value_index(self) -> Dict[str, Dict[str, int]]:
        if "values" not in self._cache:
            self._cache["values"] = {f.name: {str(v): i for i, v in enumerate(f.vocab) if i} for f in self.features}
        return self._cache["values"]


class FeatureValueError(ValueError):
    """A raw attribute value that :meth:`FeatureTable.bags_of_values` cannot encode; ``field`` names it
    (``genre`` or ``genre[1]``)."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field, self.message = field, message


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, (bool, np.bool_))


def _feature_values(f: Feature, value: Any) -> List[Any]:
    """The raw values of one entity's feature ``f``, checked: strings for categorical / multi (a number for a
    categorical is formatted as :func:`encode_feature` formats a float column), floats for numeric."""
    if value is None:
        return []
    if f.kind == "multi":
        vals = [value] if isinstance(value, str) else value
        if not isinstance(vals, (list, tuple)):
            raise FeatureValueError(f.name, f"expected a list of strings, got {type(value).__name__}")
        for j, v in enumerate(vals):
            if not isinstance(v, str):
                raise FeatureValueError(f"{f.name}[{j}]", f"expected a string, got {type(v).__name__}")
            if not v.strip():
                raise FeatureValueError(f"{f.name}[{j}]", "empty string")
        return list(vals)
    if f.kind == "numeric":
        if not _is_number(value):
            raise FeatureValueError(f.name, f"expected a number, got {type(value).__name__}")
        if not np.isfinite(float(value)):
            raise FeatureValueError(f.name, f"expected a finite number, got {value}")
        return [float(value)]
    if _is_number(value):
        if not np.isfinite(float(value)):
            raise FeatureValueError(f.name, f"expected a string or a finite number, got {value}")
        return [f"{float(value):g}"]
    if not isinstance(value, str):
        raise FeatureValueError(f.name, f"expected a string, got {type(value).__name__}")
    if not value.strip():
        raise FeatureValueError(f.name, "empty string")
    return [value]


def _bucket(f: Feature, value: float) -> int:
    b = f.boundaries if f.boundaries is not None else np.zeros(0)
    return int(np.searchsorted(np.asarray(b, dtype=np.float64), value, side="right")) + 1


@dataclass
class Dataset:
    """An encoded interaction data set.

    Attributes:
        user_vocab: [num_users + 1] str, the data set's user ids; [0] = "[PAD]".
        item_vocab: [num_items + 1] str, the data set's item ids; [0] = "[PAD]".
        user, item: [n] int64 encoded ids (>= 1), one per interaction, in file order.
        timestamp: [n] float64.
        rating: [n] float32, or None when the data has no ratings.
        item_features / user_features: per-entity feature bags (None when absent).
        item_text: [num_items + 1] str (e.g. titles; "" when unknown), or None.
        target_items: [num_items + 1] bool, the target domain's items (row 0 False), or None: set on a
            cross-domain data set (:func:`unirec.data.domains.domain_dataset`, domain "B"), it makes the
            leave-one-out split, the training targets and the rankings target-domain only. Derived in
            memory; :func:`save_encoded` does not write it.
    """

    name: str
    user_vocab: np.ndarray
    item_vocab: np.ndarray
    user: np.ndarray
    item: np.ndarray
    timestamp: np.ndarray
    rating: Optional[np.ndarray] = None
    item_features: Optional[FeatureTable] = None
    user_features: Optional[FeatureTable] = None
    item_text: Optional[np.ndarray] = None
    target_items: Optional[np.ndarray] = None
    _index: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    @property
    def num_users(self) -> int:
        """Real users (the user vocabulary has one more row, the padding)."""
        return len(self.user_vocab) - 1

    @property
    def num_items(self) -> int:
        """Real items; item embedding tables need num_items + 1 rows."""
        return len(self.item_vocab) - 1

    @property
    def num_interactions(self) -> int:
        return len(self.user)

    def _lookup(self, which: str, key: str) -> int:
        vocab = self.user_vocab if which == "user" else self.item_vocab
        if which not in self._index:
            self._index[which] = {str(v): i for i, v in enumerate(vocab) if i}
        try:
            return self._index[which][str(key)]
        except KeyError:
            raise UnknownIdError(f"unknown {which} id {key!r} in data set {self.name!r}"
                                 + (f" ({which} ids look like {vocab[1]!r})" if len(vocab) > 1 else "")) from None

    def user_index(self, user_id: str) -> int:
        """The encoded index (>= 1) of a data-set user id."""
        return self._lookup("user", user_id)

    def item_index(self, item_id: str) -> int:
        """The encoded index (>= 1) of a data-set item id."""
        return self._lookup("item", item_id)


# --------------------------------------------------------------------------- encoding


def _natural_vocab(values: np.ndarray):
    """Unique ids, numeric order when all are integers, else lexicographic: (vocab [V+1] PAD first, codes in 1..V)."""
    uniq, inv = np.unique(values, return_inverse=True)
    # ASCII digits only ("²".isdigit() holds, but int() refuses it); < 19 digits fit in int64.
    if len(uniq) and all(u.isascii() and u.isdigit() and len(u) < 19 for u in uniq.tolist()):
        order = np.argsort(uniq.astype(np.int64), kind="stable")
        rank = np.empty_like(order)
        rank[order] = np.arange(len(order))
        uniq, inv = uniq[order], rank[inv]
    vocab = np.concatenate([np.asarray([PAD]), uniq.astype(str)])
    return vocab, inv.astype(np.int64) + 1


def _lookup_keys(vocab: np.ndarray, keys: np.ndarray) -> np.ndarray:
    """Entity index of each key (0 when the key is not in vocab[1:])."""
    real = vocab[1:]
    order = np.argsort(real, kind="stable")
    sorted_real = real[order]
    pos = np.searchsorted(sorted_real, keys)
    pos_c = np.minimum(pos, max(len(real) - 1, 0))
    found = (pos < len(real)) & (sorted_real[pos_c] == keys) if len(real) else np.zeros(len(keys), bool)
    out = np.zeros(len(keys), dtype=np.int64)
    out[found] = order[pos_c[found]] + 1
    return out


def _csr_rows_to_entities(row_entity: np.ndarray, row_lengths: np.ndarray, flat: np.ndarray, num_rows: int):
    """Reorders per-table-row bags (flat values + lengths) into per-entity CSR; rows with entity 0 dropped."""
    row_start = np.cumsum(row_lengths) - row_lengths
    keep = np.nonzero(row_entity > 0)[0]
    keep = keep[np.argsort(row_entity[keep], kind="stable")]
    lens = row_lengths[keep]
    ent_len = np.zeros(num_rows, dtype=np.int64)
    ent_len[row_entity[keep]] = lens
    offsets = np.zeros(num_rows + 1, dtype=np.int64)
    np.cumsum(ent_len, out=offsets[1:])
    total = int(lens.sum())
    first = np.cumsum(lens) - lens
    pos = np.arange(total, dtype=np.int64) + np.repeat(row_start[keep] - first, lens)
    return flat[pos].astype(np.int64), offsets


def bucket_labels(b: np.ndarray) -> List[str]:
    """Labels of the buckets that ``boundaries`` b make: "<b0", "[b0,b1)", ..., ">=b_last"."""
    fmt = "{:g}".format
    if len(b) == 0:
        return ["all"]
    return [f"<{fmt(b[0])}"] + [f"[{fmt(lo)},{fmt(hi)})" for lo, hi in zip(b[:-1], b[1:])] + [f">={fmt(b[-1])}"]


def encode_feature(table: Table, row_entity: np.ndarray, spec: FeatureSpec, num_rows: int) -> Feature:
    """Encodes one column of ``table`` (rows mapped to entities by ``row_entity``) per ``spec``."""
    if spec.source not in table:
        raise KeyError(f"{table.source}: no column {spec.source!r} for feature {spec.name!r}; "
                       f"columns are {list(table.columns)}")
    col, ftype = table[spec.source], table.types[spec.source]
    boundaries = None
    if spec.kind == "numeric":
        values = table.numbers(spec.source)
        if values is None:
            raise DataFormatError(table.source, None, spec.source, f"feature {spec.name!r} is numeric but the column "
                                                                   "holds non-numbers")
        ok = ~np.isnan(values)
        if spec.boundaries is not None:
            boundaries = np.asarray(spec.boundaries, dtype=np.float64)
        else:
            qs = np.quantile(values[ok], np.linspace(0, 1, spec.num_buckets + 1)[1:-1]) if ok.any() else []
            qs = np.asarray(qs, dtype=np.float64)
            boundaries = np.unique(qs[np.isfinite(qs)])  # interpolating between +-1e308 can overflow
        codes = np.searchsorted(boundaries, np.where(ok, values, 0.0), side="right") + 1
        flat, lens = codes[ok], ok.astype(np.int64)
        vocab = np.asarray([PAD] + bucket_labels(boundaries))
    elif spec.kind == "categorical":
        if ftype not in ("token", "float"):
            raise DataFormatError(table.source, None, spec.source, f"feature {spec.name!r} is categorical but the "
                                                                   f"column has type {ftype}")
        vals = np.asarray([f"{v:g}" if np.isfinite(v) else "" for v in col] if ftype == "float" else col, dtype=str)
        if spec.prefix is not None:
            vals = np.asarray([v[: spec.prefix] for v in vals.tolist()])
        ok = vals != ""
        uniq, inv = np.unique(vals[ok], return_inverse=True)
        flat, lens = inv.astype(np.int64) + 1, ok.astype(np.int64)
        vocab = np.concatenate([[PAD], uniq.astype(str)])
    elif spec.kind == "multi":
        if ftype != "token_seq":
            raise DataFormatError(table.source, None, spec.source, f"feature {spec.name!r} is multi-valued but the "
                                                                   f"column has type {ftype}, not token_seq")
        lens = np.asarray([len(v) for v in col], dtype=np.int64)
        allv = np.asarray([t for v in col for t in v], dtype=str)
        uniq, inv = np.unique(allv, return_inverse=True)
        flat = inv.astype(np.int64) + 1
        vocab = np.concatenate([[PAD], uniq.astype(str)])
    else:
        raise ValueError(f"feature {spec.name!r}: text features are not bags (use Dataset.item_text)")
    indices, offsets = _csr_rows_to_entities(row_entity, lens, flat, num_rows)
    raw = None
    if spec.kind == "numeric":
        raw = np.full(num_rows, np.nan)
        hit = row_entity > 0
        raw[row_entity[hit]] = values[hit]
    return Feature(spec.name, spec.kind, vocab, indices, offsets, boundaries, raw)


def default_feature_specs(table: Table, key: str, text_field: Optional[str] = None) -> List[FeatureSpec]:
    """Guesses specs: ages bucketed by MovieLens' groups, years and floats by quantiles, zip codes by
    2-character prefix, token_seq as multi-valued, other tokens categorical; float_seq is skipped."""
    specs = []
    for name, ftype in table.types.items():
        low = name.lower()
        if name == key or name == text_field or ftype == "float_seq":
            continue
        if low == "age" and table.numbers(name) is not None:
            specs.append(FeatureSpec(name, "numeric", boundaries=AGE_BOUNDARIES))
        elif (ftype == "float" or low in ("year", "release_year")) and table.numbers(name) is not None:
            specs.append(FeatureSpec(name, "numeric"))
        elif low in ("zip", "zip_code", "zipcode", "zip-code") and ftype == "token":
            specs.append(FeatureSpec(name, "categorical", name="zip_prefix", prefix=2))
        elif ftype == "token_seq":
            specs.append(FeatureSpec(name, "multi"))
        else:
            specs.append(FeatureSpec(name, "categorical"))
    return specs


def _feature_table(table: Table, key: str, vocab: np.ndarray, specs: Sequence[FeatureSpec], id_name: str):
    keys = np.asarray(table[key], dtype=str)
    row_entity = _lookup_keys(vocab, keys)
    hit = row_entity[row_entity > 0]
    if len(np.unique(hit)) != len(hit):
        dup_ent = np.unique(hit)[np.bincount(hit)[np.unique(hit)] > 1][0]
        row = int(np.nonzero(row_entity == dup_ent)[0][1])
        raise DataFormatError(table.source, row + 2, key, f"duplicate id {vocab[dup_ent]!r}")
    feats = [encode_feature(table, row_entity, s, len(vocab)) for s in specs if s.kind != "text"]
    return FeatureTable(id_name, len(vocab), feats), row_entity


def encode(raw: RawData, item_features: Optional[Sequence[FeatureSpec]] = None,
           user_features: Optional[Sequence[FeatureSpec]] = None) -> Dataset:
    """Builds vocabularies and features from a RawData.

    Items and users are those of the interactions (attribute rows for unknown ids
    are dropped). ``item_features``/``user_features`` default to
    :func:`default_feature_specs`; pass [] for none.
    """
    inter = raw.inter
    if len(inter) == 0:
        raise DataFormatError(inter.source, None, None, "no interactions: expected at least one row of events")
    user_vocab, user = _natural_vocab(np.asarray(inter["user_id"], dtype=str))
    item_vocab, item = _natural_vocab(np.asarray(inter["item_id"], dtype=str))
    timestamp = np.asarray(inter["timestamp"], dtype=np.float64)
    with np.errstate(over="ignore"):  # past float32's range a rating is inf, refused below
        rating = np.asarray(inter["rating"], dtype=np.float32) if "rating" in inter else None
    # The readers refuse these with their line; this guards other tables (a NaN timestamp ends in an IndexError).
    for name, v, what in (("timestamp", timestamp, "a finite number"), ("rating", rating, "a finite float32")):
        bad = np.flatnonzero(~np.isfinite(v)) if v is not None else []
        if len(bad):
            raise DataFormatError(inter.source, int(bad[0]) + 1, name, f"expected {what}, got {inter[name][bad[0]]}",
                                  unit="row")
    ift = uft = text = None
    if raw.item is not None:
        specs = default_feature_specs(raw.item, "item_id", raw.text_field) if item_features is None else item_features
        ift, row_entity = _feature_table(raw.item, "item_id", item_vocab, specs, "item_id")
        text_src = raw.text_field if raw.text_field in raw.item else None
        text_src = next((s.source for s in specs if s.kind == "text"), text_src)
        if text_src is not None:
            col = raw.item[text_src]
            strings = [" ".join(v) if isinstance(v, list) else str(v) for v in col]
            text = np.full(len(item_vocab), "", dtype=object)
            ok = row_entity > 0
            text[row_entity[ok]] = np.asarray(strings, dtype=object)[ok]
            text = text.astype(str)
    if raw.user is not None:
        specs = default_feature_specs(raw.user, "user_id") if user_features is None else user_features
        uft, _ = _feature_table(raw.user, "user_id", user_vocab, specs, "user_id")
    return Dataset(raw.name, user_vocab, item_vocab, user, item, timestamp, rating, ift, uft, text)


# --------------------------------------------------------------------------- the encoded form on disk

_NPZ_VERSION = 2  # 2: numeric features keep their raw values


def save_encoded(ds: Dataset, path) -> None:
    """Writes ``ds`` as one .npz of plain arrays (no pickled objects), atomically."""
    import os
    import tempfile
    from pathlib import Path
    arrays = {"version": np.asarray(_NPZ_VERSION), "name": np.asarray(ds.name), "user_vocab": ds.user_vocab,
              "item_vocab": ds.item_vocab, "user": ds.user, "item": ds.item, "timestamp": ds.timestamp}
    if ds.rating is not None:
        arrays["rating"] = ds.rating
    if ds.item_text is not None:
        arrays["item_text"] = np.asarray(ds.item_text, dtype=str)
    for side, ft in (("item", ds.item_features), ("user", ds.user_features)):
        if ft is None:
            continue
        arrays[f"{side}.table"] = np.asarray([ft.id_name, str(ft.num_rows), str(len(ft.features))])
        for j, f in enumerate(ft.features):
            k = f"{side}.{j}."
            arrays[k + "meta"] = np.asarray([f.name, f.kind])
            arrays[k + "vocab"], arrays[k + "indices"], arrays[k + "offsets"] = f.vocab, f.indices, f.offsets
            if f.boundaries is not None:
                arrays[k + "boundaries"] = f.boundaries
            if f.values is not None:
                arrays[k + "values"] = f.values
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".encoding-", suffix=".npz")
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def load_encoded(path) -> Dataset:
    """The Dataset :func:`save_encoded` wrote (ValueError for another format version)."""
    with np.load(path, allow_pickle=False) as z:
        a = {k: z[k] for k in z.files}
    if int(a["version"]) != _NPZ_VERSION:
        raise ValueError(f"{path}: encoded data format {int(a['version'])}, expected {_NPZ_VERSION}")
    tables = {}
    for side in ("item", "user"):
        if f"{side}.table" not in a:
            tables[side] = None
            continue
        id_name, num_rows, nf = a[f"{side}.table"].tolist()
        feats = []
        for j in range(int(nf)):
            k = f"{side}.{j}."
            name, kind = a[k + "meta"].tolist()
            feats.append(Feature(name, kind, a[k + "vocab"], a[k + "indices"], a[k + "offsets"], a.get(k + "boundaries"),
                                 a.get(k + "values")))
        tables[side] = FeatureTable(id_name, int(num_rows), feats)
    return Dataset(str(a["name"]), a["user_vocab"], a["item_vocab"], a["user"], a["item"], a["timestamp"],
                   a.get("rating"), tables["item"], tables["user"], a.get("item_text"))
