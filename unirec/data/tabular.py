"""Readers of plain tables: CSV and Parquet files of (user, item, timestamp[, rating]) with optional
item and user tables, and :func:`read_path`, which detects a path's format. Same :class:`RawData`
and errors as :mod:`unirec.data.readers`."""
from __future__ import annotations

import csv
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from .readers import (FIELD_TYPES, KIND_FIELDS, DataFormatError, PathLike, RawData, Table, _read_text,
                      apply_event_kinds, read_atomic,
                      read_movielens_100k, read_movielens_1m, to_float_column, typed_column)

USER_ALIASES = ("user_id", "user", "userid", "uid", "customer_id", "visitorid")
ITEM_ALIASES = ("item_id", "item", "itemid", "iid", "movieid", "movie_id", "product_id", "article_id")
TIME_ALIASES = ("timestamp", "time", "ts", "t", "datetime", "date")
RATING_ALIASES = ("rating", "score", "label")


def _find(names: Sequence[str], aliases: Sequence[str]) -> Optional[int]:
    low = [n.lower() for n in names]
    for a in aliases:
        if a in low:
            return low.index(a)
    return None


def _typed_header(header: Sequence[str]):
    """Header cells, optionally ``name:type``; returns (names, explicit types or None)."""
    names, types = [], []
    for cell in header:
        cell = cell.strip()
        if ":" in cell and cell.rsplit(":", 1)[1] in FIELD_TYPES:
            n, t = cell.rsplit(":", 1)
            names.append(n)
            types.append(t)
        else:
            names.append(cell)
            types.append(None)
    return names, types


def _infer_type(values: Sequence[str], seq_sep: str) -> str:
    nonempty = [v for v in values if v != ""]
    try:
        np.asarray(nonempty, dtype=np.float64)
        return "float"
    except ValueError:
        pass
    if any(seq_sep in v for v in nonempty):
        return "token_seq"
    return "token"


def _read_csv_rows(path: Path, sep: str, encoding: str):
    """(header, rows, first line of each row). Lines are split as by every reader (at "\\n" only, a "\\r"
    before it dropped): the csv module alone would also end a record at a lone "\\r"."""
    if len(sep) != 1:
        raise ValueError(f"sep must be one character, got {sep!r}")
    reader = csv.reader((line + "\n" for line in _read_text(path, encoding)), delimiter=sep)
    rows, starts, start = [], [], 1
    try:
        for r in reader:
            rows.append(r)
            starts.append(start)
            start = reader.line_num + 1  # a quoted field may span lines
    except csv.Error as exc:  # e.g. a "\\r" inside an unquoted field, or a field over the csv size limit
        raise DataFormatError(path, reader.line_num, None, f"not valid CSV: {exc}") from None
    if not rows or not rows[0]:
        raise DataFormatError(path, 1, None, f"expected a header row, got an empty {'line' if rows else 'file'}")
    header = rows[0]
    names = _typed_header(header)[0]
    dup = next((n for n in names if names.count(n) > 1), None)
    if dup is not None:
        raise DataFormatError(path, 1, f"{names.index(dup) + 1} ({dup})", f"duplicate column name {dup!r}")
    kept, line_numbers = [], []
    for r, ln in zip(rows[1:], starts[1:]):
        if not r or all(not c.strip() for c in r):
            continue
        if len(r) != len(header):
            col = f"{len(r) + 1} ({header[len(r)]})" if len(r) < len(header) else f"{len(header) + 1} (extra field)"
            raise DataFormatError(path, ln, col, f"expected {len(header)} fields separated by {sep!r}, got {len(r)}")
        kept.append(r)
        line_numbers.append(ln)
    return header, kept, line_numbers


def _table_from_rows(path, header, rows, line_numbers, seq_sep: str, key_aliases, key_name: str, what: str) -> Table:
    names, explicit = _typed_header(header)
    k = _find(names, key_aliases)
    if k is None:
        raise DataFormatError(path, 1, None, f"{what} needs an id column named one of {list(key_aliases)}; header is {names}")
    cols = [list(c) for c in zip(*rows)] if rows else [[] for _ in names]
    columns, types = {}, {}
    for j, (n, t, c) in enumerate(zip(names, explicit, cols)):
        if j == k:
            n, t = key_name, "token"
        t = t or _infer_type(c, seq_sep)
        columns[n] = typed_column(path, c, t, f"{j + 1} ({names[j]})", line_numbers, seq_sep)
        types[n] = t
    return Table(columns, types, str(path))


def _interactions_from_columns(path, names, getcol, line_numbers, unit: str = "line") -> Table:
    """Builds the interaction table from columns located by alias. Timestamps and ratings must be finite
    numbers (a NaN timestamp would surface deep in the model); ``unit`` names what line_numbers count."""
    idx = {what: _find(names, al) for what, al in
           (("user", USER_ALIASES), ("item", ITEM_ALIASES), ("time", TIME_ALIASES), ("rating", RATING_ALIASES))}
    for what, al in (("user", USER_ALIASES), ("item", ITEM_ALIASES), ("time", TIME_ALIASES)):
        if idx[what] is None:
            article = "an" if what[0] in "aeiou" else "a"
            raise DataFormatError(path, 1, None, f"interactions need {article} {what} column named one of {list(al)}; "
                                                 f"header is {list(names)}")
    cols = {k: np.asarray(["" if v is None else str(v) for v in getcol(idx[w])], dtype=str)
            for k, w in (("user_id", "user"), ("item_id", "item"))}
    types = {"user_id": "token", "item_id": "token"}
    k = _find(names, KIND_FIELDS)
    if k is not None:
        cols["kind"], types["kind"] = np.asarray(["" if v is None else str(v) for v in getcol(k)], dtype=str), "token"
    # The rating of a like, dislike, dismiss or skip row is not read (apply_event_kinds sets or drops it): it may be empty.
    rated = np.ones(len(cols["user_id"]), bool) if k is None else np.char.lower(np.char.strip(cols["kind"])) == "view"
    lines = np.asarray(line_numbers)
    for key, what in (("timestamp", "time"), ("rating", "rating")):
        j = idx[what]
        if j is None:
            continue
        vals, column = getcol(j), f"{j + 1} ({names[j]})"
        need = rated if key == "rating" else np.ones(len(rated), bool)
        cols[key] = np.full(len(need), np.nan)
        if isinstance(vals, np.ndarray) and vals.dtype.kind in "iuf":
            cols[key][need] = vals[need]
            bad = np.flatnonzero(~np.isfinite(cols[key]) & need)
            if len(bad):
                raise DataFormatError(path, line_numbers[bad[0]], column,
                                      f"expected a finite number, got {cols[key][bad[0]]}", unit=unit)
        else:
            cols[key][need] = to_float_column(path, [str(v) for v, n in zip(vals, need) if n], column,
                                              lines[need].tolist(), unit=unit)
        types[key] = "float"
    if k is None:
        return Table(cols, types, str(path))
    return apply_event_kinds(Table(cols, types, str(path), line_numbers), "kind", label=f"{k + 1} ({names[k]})",
                             unit=unit)


def read_csv(inter_path: PathLike, item_path: Optional[PathLike] = None, user_path: Optional[PathLike] = None, *,
             sep: str = ",", seq_sep: str = "|", encoding: str = "utf-8", name: Optional[str] = None) -> RawData:
    """CSV with a header: interactions (user, item, timestamp[, rating][, kind]) + optional item / user tables.

    Column names are matched case-insensitively against common aliases (user_id/user/userId,
    item_id/item/movieId, timestamp/time, rating). Attribute table columns may be typed with
    ``name:type`` headers; otherwise numbers -> float, cells containing ``seq_sep`` -> token_seq,
    else token. The first column named like an id is the key.
    """
    inter_path = Path(inter_path)
    header, rows, lns = _read_csv_rows(inter_path, sep, encoding)
    names, _ = _typed_header(header)
    inter = _interactions_from_columns(inter_path, names, lambda j: [r[j] for r in rows], lns)
    item = user = None
    if item_path is not None:
        h, r, ln = _read_csv_rows(Path(item_path), sep, encoding)
        item = _table_from_rows(item_path, h, r, ln, seq_sep, ITEM_ALIASES, "item_id", "an item table")
    if user_path is not None:
        h, r, ln = _read_csv_rows(Path(user_path), sep, encoding)
        user = _table_from_rows(user_path, h, r, ln, seq_sep, USER_ALIASES, "user_id", "a user table")
    text = next((f for f in ("title", "movie_title", "name") if item is not None and f in item), None)
    return RawData(name or inter_path.stem, inter, item, user, text_field=text)


def _parquet_columns(path: Path):
    """(names, {name: numpy array or list}) of a Parquet file via pyarrow (or pandas)."""
    if not path.exists():
        raise FileNotFoundError(f"data file not found: {path}")
    try:
        import pyarrow.parquet as pq
    except ImportError:
        pq = None
    if pq is not None:
        try:
            t = pq.read_table(path)
            return t.column_names, {n: t.column(n).to_pylist() for n in t.column_names}
        except Exception as exc:  # pyarrow raises assorted types (ArrowInvalid, OSError, ...) for a bad file
            raise DataFormatError(path, None, None, f"not a readable Parquet file: {exc}") from None
    try:
        import pandas as pd
    except ImportError:
        raise ImportError(
            f"reading {path} needs pyarrow (or pandas with a Parquet engine), which is not installed: "
            "`pip install pyarrow`, or convert the file to CSV and use read_csv") from None
    df = pd.read_parquet(path)
    return list(df.columns), {n: df[n].tolist() for n in df.columns}


def _is_number(x) -> bool:
    return isinstance(x, (int, float, np.number)) and not isinstance(x, (bool, np.bool_))


def _pylist_to_column(values):
    """A Parquet attribute column -> (column, type); a null is missing: an empty list, NaN or ""."""
    present = [v for v in values if v is not None]
    if present and all(isinstance(v, (list, tuple, np.ndarray)) for v in present):
        seqs = [[] if v is None else list(v) for v in values]
        if all(_is_number(x) for v in seqs for x in v):
            return [np.asarray(v, dtype=np.float64) for v in seqs], "float_seq"
        return [[str(x) for x in v] for v in seqs], "token_seq"
    if present and all(_is_number(v) for v in present):
        return np.asarray([np.nan if v is None else v for v in values], dtype=np.float64), "float"
    return np.asarray(["" if v is None else str(v) for v in values], dtype=str), "token"


def read_parquet(inter_path: PathLike, item_path: Optional[PathLike] = None, user_path: Optional[PathLike] = None,
                 *, name: Optional[str] = None) -> RawData:
    """Parquet versions of :func:`read_csv`'s tables (needs pyarrow or pandas)."""
    inter_path = Path(inter_path)
    names, cols = _parquet_columns(inter_path)
    lns = list(range(1, len(next(iter(cols.values()), [])) + 1))  # rows, 1-based, for messages

    def getcol(j):
        """Numbers and datetimes as float64 seconds, a null as NaN (refused, with its row, for timestamps and
        ratings); anything else as read (ids: ints stay "1", not "1.0")."""
        v = cols[names[j]]
        present = [x for x in v if x is not None]
        if j in (idx_user, idx_item) or not present:
            return v
        if all(_is_number(x) for x in present):
            return np.asarray([np.nan if x is None else x for x in v], dtype=np.float64)
        if all(hasattr(x, "timestamp") for x in present):
            return np.asarray([np.nan if x is None else x.timestamp() for x in v], dtype=np.float64)
        return v

    idx_user, idx_item = _find(names, USER_ALIASES), _find(names, ITEM_ALIASES)
    inter = _interactions_from_columns(inter_path, names, getcol, lns, unit="row")
    tables = []
    for p, aliases, key in ((item_path, ITEM_ALIASES, "item_id"), (user_path, USER_ALIASES, "user_id")):
        if p is None:
            tables.append(None)
            continue
        p = Path(p)
        n2, c2 = _parquet_columns(p)
        k = _find(n2, aliases)
        if k is None:
            raise DataFormatError(p, None, None, f"needs an id column named one of {list(aliases)}; columns are {n2}")
        columns, types = {}, {}
        for j, n in enumerate(n2):
            vals, t = _pylist_to_column(c2[n])
            if j == k:
                n, vals, t = key, np.asarray([str(v) for v in c2[n]], dtype=str), "token"
            columns[n], types[n] = vals, t
        tables.append(Table(columns, types, str(p)))
    item, user = tables
    text = next((f for f in ("title", "movie_title", "name") if item is not None and f in item), None)
    return RawData(name or inter_path.stem, inter, item, user, text_field=text)


def read_path(path: PathLike, *, item_path: Optional[PathLike] = None, user_path: Optional[PathLike] = None) -> RawData:
    """Reads a data set from a directory or file, detecting the format.

    - a directory with ``*.inter`` -> RecBole atomic files;
    - a directory with ``u.data`` -> GroupLens ml-100k; with ``ratings.dat`` -> ml-1m;
    - a ``.csv``/``.tsv``/``.txt`` file -> :func:`read_csv`; ``.parquet`` -> :func:`read_parquet`.
    """
    p = Path(path)
    if p.is_dir():
        if list(p.glob("*.inter")):
            return read_atomic(p)
        if (p / "u.data").exists():
            return read_movielens_100k(p)
        if (p / "ratings.dat").exists():
            return read_movielens_1m(p)
        raise FileNotFoundError(f"{p}: no *.inter (RecBole atomic), u.data (MovieLens-100K) or ratings.dat "
                                "(MovieLens-1M) file found")
    if not p.exists():
        raise FileNotFoundError(f"data path not found: {p}")
    suffix = p.suffix.lower()
    if suffix == ".parquet":
        return read_parquet(p, item_path, user_path)
    if suffix in (".csv", ".tsv", ".txt"):
        return read_csv(p, item_path, user_path, sep="\t" if suffix == ".tsv" else ",")
    if suffix == ".inter":
        return read_atomic(p.parent, p.stem)
    raise ValueError(f"{p}: unknown data format {suffix!r} (expected a directory, .csv, .tsv, .parquet or .inter)")
