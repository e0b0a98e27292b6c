"""Matching the items and attribute values of one data set to another's, for transfer between them.

An item's key is its title, case-folded with runs of non-alphanumerics made one space, and its
release year: ("toy story", 1995). Two items match when their keys are equal; an item without a
year matches a title that no two base items share. Bare titles repeat ("Cape Fear" 1962 and 1991),
so a title alone never overrides a year. The year is the raw value of a numeric feature named
"release_year" or "year", else a "(YYYY)" at the end of the item's id or text.

Attribute values match by their strings (genres, gender, occupations); a numeric feature's buckets
match the base bucket that holds their middle (the two data sets bucket a year differently).
"""
from __future__ import annotations

import re
from typing import List, Optional, Tuple

import numpy as np

from .dataset import Dataset, Feature, FeatureTable

YEAR_FIELDS = ("release_year", "year")
_YEAR_AT_END = re.compile(r"\((\d{4})\)\s*$")
_NOT_ALNUM = re.compile(r"[^0-9a-z]+")

ItemKey = Optional[Tuple[str, Optional[int]]]


def normalize_title(title: str) -> str:
    """"Toy Story (1995)" -> "toy story"; "Seven (Se7en)" -> "seven se7en"."""
    title = _YEAR_AT_END.sub("", str(title))
    return _NOT_ALNUM.sub(" ", title.casefold()).strip()


def _year_feature(table: Optional[FeatureTable]) -> Optional[Feature]:
    for f in table.features if table is not None else ():
        if f.name.lower() in YEAR_FIELDS and f.kind == "numeric" and f.values is not None:
            return f
    return None


def item_keys(dataset: Dataset) -> List[ItemKey]:
    """[num_items + 1] each item's (normalized title, year or None); None for the padding row and for
    items without a title. The title is ``item_text``, else the item's id."""
    year_f = _year_feature(dataset.item_features)
    keys: List[ItemKey] = [None]
    for i in range(1, dataset.num_items + 1):
        ident = str(dataset.item_vocab[i])
        text = str(dataset.item_text[i]) if dataset.item_text is not None else ""
        title = normalize_title(text or ident)
        year: Optional[int] = None
        if year_f is not None and np.isfinite(year_f.values[i]):
            year = int(year_f.values[i])
        else:
            m = _YEAR_AT_END.search(ident) or _YEAR_AT_END.search(text)
            year = int(m.group(1)) if m else None
        keys.append((title, year) if title else None)
    return keys


def match_items(base: Dataset, target: Dataset) -> np.ndarray:
    """[target.num_items + 1] int64: the base item each target item matches (see the module docstring),
    0 where none does (and for the padding row). Among base items with one key the first is taken."""
    by_key, by_title = {}, {}
    for i, key in enumerate(item_keys(base)):
        if key is None:
            continue
        by_key.setdefault(key, i)
        by_title.setdefault(key[0], []).append(i)
    out = np.zeros(target.num_items + 1, dtype=np.int64)
    for i, key in enumerate(item_keys(target)):
        if key is None:
            continue
        if key[1] is not None:
            out[i] = by_key.get(key, 0)
        elif len(by_title.get(key[0], ())) == 1:
            out[i] = by_title[key[0]][0]
    return out


def _representative(f: Feature, code: int) -> float:
    """A value inside bucket ``code`` of a numeric feature (its middle; the edge of an open bucket)."""
    b = f.boundaries
    k = code - 1
    if k == 0:
        return float(b[0]) - 0.5
    if k == len(b):
        return float(b[-1])
    return (float(b[k - 1]) + float(b[k])) / 2


def match_values(base: Feature, target: Feature) -> np.ndarray:
    """[target.size] int64: the row of ``base``'s table each row of ``target``'s matches, 0 where none
    does (the padding row maps to 0). Categorical and multi-valued features match by value
    (case-folded); numeric ones by the base bucket holding the middle of the target's."""
    out = np.zeros(target.size, dtype=np.int64)
    if target.kind == "numeric" and base.kind == "numeric":
        if target.boundaries is None or base.boundaries is None or not len(target.boundaries):
            return out
        for code in range(1, target.size):
            out[code] = int(np.searchsorted(base.boundaries, _representative(target, code), side="right")) + 1
        return out
    index = {str(v).casefold(): j for j, v in enumerate(base.vocab) if j}
    for j, v in enumerate(target.vocab):
        if j:
            out[j] = index.get(str(v).casefold(), 0)
    return out


def matching_feature(base: Optional[FeatureTable], target: Feature) -> Optional[Feature]:
    """The base feature that stands for ``target``: the one of the same name and kind, else the one of
    the same kind sharing the most values with it (at least half of the target's), else None
    (RecBole's MovieLens-100K calls its genres "class", MovieLens-1M "genre")."""
    if base is None:
        return None
    same = [f for f in base.features if f.kind == target.kind]
    for f in same:
        if f.name == target.name:
            return f
    if target.kind == "numeric":
        return None
    best, best_hits = None, 0
    for f in same:
        hits = int((match_values(f, target)[1:] > 0).sum())
        if hits > best_hits:
            best, best_hits = f, hits
    return best if best_hits * 2 >= target.size - 1 and best_hits > 0 else None
