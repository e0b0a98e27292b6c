"""Fuzzing the data readers: malformed files end in DataFormatError, ValueError or FileNotFoundError, never
in another exception and never in a hang.

Each reader gets CASES inputs made by mutating small valid files (byte flips, truncation, deleted or
duplicated separators, random bytes, invalid UTF-8, huge and non-finite numbers, NUL bytes, line-break
look-alikes, empty and header-only files), read and then encoded. Seeded (UNIREC_TEST_SEED shifts the
seed) and bounded: every case runs under a time limit, and a failure names the input to replay it.
"""
import io
import os
import random
import re
import signal
from pathlib import Path

import numpy as np
import pytest

from unirec.data import encode, read_atomic, read_atomic_file, read_csv, read_movielens_100k, read_movielens_1m

CASES = int(os.environ.get("UNIREC_FUZZ_CASES", "300"))
SEED = int(os.environ.get("UNIREC_TEST_SEED", "0"))
LIMIT_S = 2.0  # per case; a valid case takes milliseconds
ALLOWED = (ValueError, FileNotFoundError)  # DataFormatError is a ValueError

GENRES = "|".join(["0"] * 5 + ["1"] + ["0"] * 13)
VALID = {
    "atomic": {
        "toy.inter": b"user_id:token\titem_id:token\trating:float\ttimestamp:float\n"
                     b"u1\t2\t4\t300\nu2\t10\t5\t100\nu1\t10\t1\t100\nu2\t2\t3.5\t200\n",
        "toy.item": b"item_id:token\ttitle:token_seq\tyear:token\tprice:float\temb:float_seq\n"
                    b"2\tSome Film\t1990\t3.5\t0.5 1\n10\tOther\t2001\t1.0\t2 3\n",
        "toy.user": b"user_id:token\tage:token\tgender:token\tzip_code:token\nu1\t23\tF\t85711\nu2\t61\tM\t02139\n",
    },
    "ml-100k": {
        "u.data": b"1\t10\t4\t881250949\n2\t10\t3\t891717742\n1\t20\t1\t878887116\n",
        "u.item": f"10|Toy Story (1995)|01-Jan-1995||http://x|{GENRES}\n20|Caf\xe9 (1994)||||{GENRES}\n"
                  .encode("latin-1"),
        "u.user": b"1|24|M|technician|85711\n2|53|F|other|94043\n",
    },
    "ml-1m": {
        "ratings.dat": b"1::1193::5::978300760\r\n1::661::3::978302109\r\n2::1193::4::978298413\r\n",
        "movies.dat": b"1193::One Flew Over (1975)::Drama\r\n661::James (1996)::Animation|Musical\r\n",
        "users.dat": b"1::F::1::10::48067\r\n2::M::56::16::70072\r\n",
    },
    "csv": {
        "events.csv": b"userId,movieId,rating,timestamp\na,x,5,10\nb,y,3,11\na,y,4,12\n",
        "items.csv": b'item_id,genres,year,title\nx,Drama|War,1990,"X, the film"\ny,Comedy,2000,Y\n',
        "users.csv": b"user,country:token,age\na,FR,30\nb,001,70\n",
    },
}


def _read(fmt, d: Path):
    if fmt == "atomic":
        return read_atomic(d, "toy")
    if fmt == "ml-100k":
        return read_movielens_100k(d)
    if fmt == "ml-1m":
        return read_movielens_1m(d)
    return read_csv(d / "events.csv", d / "items.csv", d / "users.csv")


SEPARATORS = [b"\t", b"|", b"::", b",", b"\n", b"\r\n", b":", b" ", b'"']
SPECIAL = [b"nan", b"-NaN", b"inf", b"-Infinity", b"1e999", b"-1e400", b"9" * 400, b"1" * 5000, b"1e-999", b"",
           b"\x00", b"\xff\xfe", b"\xc3", b"\xc2\x85", b"\xe2\x80\xa8", b"\x85", b"\r", b"\x0b", b"\x0c", b"\x1c",
           b'"', b"\xef\xbb\xbf", b"\xb2", b"\xd9\xa1", b"\xef\xbc\x91", b"1_0", b" 1 ", b"0x10", b"True"]


def _mutate_once(data: bytes, rng: random.Random) -> bytes:
    kind = rng.randrange(11)
    p = rng.randrange(len(data) + 1)
    if kind == 0 and data:  # flip bits of one byte
        p = min(p, len(data) - 1)
        return data[:p] + bytes([data[p] ^ (1 << rng.randrange(8))]) + data[p + 1:]
    if kind == 1:  # truncate
        return data[:p]
    if kind in (2, 3):  # delete or duplicate one separator
        sep = rng.choice(SEPARATORS)
        spots = [m.start() for m in re.finditer(re.escape(sep), data)]
        if not spots:
            return data
        s = rng.choice(spots)
        return data[:s] + data[s + len(sep):] if kind == 2 else data[:s] + sep + data[s:]
    if kind == 4:  # random bytes
        return data[:p] + bytes(rng.randrange(256) for _ in range(rng.randint(1, 16))) + data[p:]
    if kind == 5:  # a special token anywhere
        return data[:p] + rng.choice(SPECIAL) + data[p:]
    if kind == 6:  # a number replaced by a huge, non-finite or odd one
        spots = list(re.finditer(rb"\d+(\.\d+)?", data))
        if spots:
            m = rng.choice(spots)
            return data[:m.start()] + rng.choice(SPECIAL) + data[m.end():]
        return data
    if kind == 7:  # empty file
        return b""
    if kind == 8:  # the header (first line) only
        return data.split(b"\n", 1)[0] + b"\n"
    lines = data.split(b"\n")
    if kind == 9 and lines:  # duplicate or delete a line
        i = rng.randrange(len(lines))
        lines[i:i + 1] = [lines[i]] * rng.choice((0, 2))
        return b"\n".join(lines)
    return data.replace(b"\n", rng.choice([b"\r", b"\r\n", b"\x85", b"\n\n"]))  # other line endings


def _mutated(files: dict, rng: random.Random):
    """A copy of files with one file mutated 1-3 times (or, rarely, removed)."""
    files = dict(files)
    name = rng.choice(sorted(files))
    if rng.random() < 0.05:
        files[name] = None
        return files, name
    data = files[name]
    for _ in range(rng.randint(1, 3)):
        data = _mutate_once(data, rng)
    files[name] = data
    return files, name


class Hang(BaseException):
    """A case ran past LIMIT_S (a BaseException, so that no reader's `except Exception` swallows it)."""


def _on_alarm(signum, frame):
    raise Hang()


def _check(label, call, failures):
    """Runs call() under the time limit; records a failure unless it returns or raises an allowed error."""
    old = signal.signal(signal.SIGALRM, _on_alarm)
    signal.setitimer(signal.ITIMER_REAL, LIMIT_S)
    try:
        call()
    except ALLOWED:
        pass
    except Hang:
        failures.append(f"{label[:500]}: no result after {LIMIT_S}s")
    except Exception as exc:  # the point of the test: any other type is a bug in a reader
        failures.append(f"{label[:500]}: {type(exc).__name__}: {str(exc)[:300]}")
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def _assert_sane(raw):
    """What a successful read promises: finite timestamps and ratings, and an encoding that keeps them."""
    assert np.isfinite(raw.inter["timestamp"]).all()
    if "rating" in raw.inter:
        assert np.isfinite(raw.inter["rating"]).all()
    ds = encode(raw)
    assert ds.num_interactions == len(raw.inter) and (ds.user >= 1).all() and (ds.item >= 1).all()
    assert np.isfinite(ds.timestamp).all()


def _report(failures):
    assert not failures, f"{len(failures)} of {CASES} cases failed; first ones:\n" + "\n".join(failures[:5])


def test_valid_inputs_read():
    """The seeds themselves are valid (else the mutations would test little)."""
    import tempfile
    for fmt, files in VALID.items():
        with tempfile.TemporaryDirectory() as d:
            for n, data in files.items():
                Path(d, n).write_bytes(data)
            _assert_sane(_read(fmt, Path(d)))


@pytest.mark.parametrize("fmt", sorted(VALID))
def test_reader_survives_malformed_files(fmt, tmp_path):
    rng = random.Random(f"{fmt}-{SEED}")
    failures = []
    for case in range(CASES):
        d = tmp_path / str(case)
        d.mkdir()
        files, name = _mutated(VALID[fmt], rng)
        for n, data in files.items():
            if data is not None:
                (d / n).write_bytes(data)
        _check(f"{fmt} case {case}, {name} = {files[name]!r}", lambda: _assert_sane(_read(fmt, d)), failures)
    _report(failures)


def test_atomic_file_survives_malformed_files(tmp_path):
    """read_atomic_file on its own, on the item file's richer types (token_seq, float, float_seq)."""
    rng = random.Random(f"atomic-file-{SEED}")
    failures = []
    p = tmp_path / "x.item"

    def read():
        t = read_atomic_file(p)
        for n in t.columns:
            t.numbers(n)

    for case in range(CASES):
        data = VALID["atomic"]["toy.item"]
        for _ in range(rng.randint(1, 3)):
            data = _mutate_once(data, rng)
        p.write_bytes(data)
        _check(f"read_atomic_file case {case}: {data!r}", read, failures)
    _report(failures)


def test_parquet_survives_malformed_files(tmp_path):
    """Corrupted bytes of a valid file, and valid files whose columns hold nulls, NaN, inf, text, lists,
    datetimes or booleans."""
    pa = pytest.importorskip("pyarrow")
    import datetime

    import pyarrow.parquet as pq

    from unirec.data import read_parquet
    rng = random.Random(f"parquet-{SEED}")
    pools = [[1.0, 2.0, 3.0], [1, 2, None], [float("nan"), 1.0, 2.0], [float("inf"), 1.0, 2.0], ["a", "b", "nan"],
             [[1, 2], None, []], [["x"], ["y", "z"], None], [True, False, True], [None, None, None],
             [datetime.datetime(2020, 1, 1), None, datetime.datetime(2021, 1, 1)], [1e308, -1e308, 0.0]]
    base = io.BytesIO()
    pq.write_table(pa.table({"user_id": ["a", "b", "a"], "item_id": [1, 2, 2], "timestamp": [5.0, 6.0, 7.0]}), base)
    failures = []
    for case in range(CASES):
        inter, item = tmp_path / f"e{case}.parquet", tmp_path / f"i{case}.parquet"
        if rng.random() < 0.5:
            data = base.getvalue()
            for _ in range(rng.randint(1, 3)):
                data = _mutate_once(data, rng)
            inter.write_bytes(data)
            label = f"parquet case {case}: {data!r}"
        else:
            cols = {n: rng.choice(pools) for n in ("user_id", "item_id", "timestamp", "rating")}
            try:
                pq.write_table(pa.table(cols), inter)
            except (pa.ArrowInvalid, pa.ArrowTypeError):  # pyarrow itself refuses the mix
                continue
            label = f"parquet case {case}: {cols}"
        attrs = {"item_id": [1, 2, 3], "feat": rng.choice(pools)}
        try:
            pq.write_table(pa.table(attrs), item)
        except (pa.ArrowInvalid, pa.ArrowTypeError):
            item = None
        _check(label + f", items {attrs}", lambda: _assert_sane(read_parquet(inter, item)), failures)
    _report(failures)
