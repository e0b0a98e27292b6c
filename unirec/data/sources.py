"""Where a data set comes from: the ``data`` section of a run's configuration, and loading it."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any, Dict

from .dataset import Dataset, encode, load_encoded, save_encoded
from .domains import B_GENRES, DOMAINS, domain_dataset
from .fetch import fetch_movielens_1m, fetch_movielens_100k
from .readers import read_atomic, read_recbole_movielens
from .synthetic import synthetic
from .tabular import read_path

BUILT_IN = ("ml-100k", "ml-1m", "synthetic")


def strict_from_dict(cls, d: dict, where: str):
    """``cls(**d)`` for a dataclass; a key that is not a field is a ValueError naming it and ``where``.
    The one rule for unknown keys of every configuration section (data, model, train)."""
    if not isinstance(d, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(d).__name__}")
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(d) - known)
    if unknown:
        raise ValueError(f"{where}: unknown key {unknown[0]!r}" + (f" (and {unknown[1:]})" if unknown[1:] else "")
                         + f"; known keys: {', '.join(sorted(known))}")
    return cls(**d)


@dataclass
class DataConfig:
    """The data set of a run: ``source`` is "ml-100k" or "ml-1m" (fetched on first use), "synthetic" (``options`` go
    to :func:`unirec.data.synthetic`), or a path for :func:`unirec.data.read_path` (``options`` go there).

    Two options are the loader's own, for any source: ``domain`` ("A" or "B") and ``b_genres`` (a list of
    genre names, default :data:`unirec.data.domains.B_GENRES`) take one domain of a genre split of the
    data set (:func:`unirec.data.domains.domain_dataset`; docs/protocol.md, "Genre domains (cross-domain)")."""

    source: str = "ml-100k"
    options: Dict[str, Any] = field(default_factory=dict)

    @property
    def name(self) -> str:
        """A short name for run folders and result records: the built-in name or the path's last part, with
        "-A" / "-B" for a domain ("ml-1m-B")."""
        from pathlib import Path
        base = self.source if self.source in BUILT_IN else Path(self.source).name
        domain = self.options.get("domain")
        return f"{base}-{domain}" if domain is not None else base

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "DataConfig":
        d = dict(d)
        if "kwargs" in d:  # the key's name in run folders written before options had its name
            d["options"] = d.pop("kwargs")
        return strict_from_dict(cls, d, "data config")


def load_dataset(source="ml-100k", **options) -> Dataset:
    """The Dataset of a DataConfig, or of a source name / path with its options."""
    if isinstance(source, DataConfig):
        source, options = source.source, {**source.options, **options}
    domain, b_genres = options.pop("domain", None), options.pop("b_genres", None)
    if domain is None and b_genres is not None:
        raise ValueError("data option b_genres needs the option domain ('A' or 'B')")
    if domain is not None and domain not in DOMAINS:  # before a fetch
        raise ValueError(f"data option domain must be one of {DOMAINS}, got {domain!r}")
    ds = _load(source, options)
    return ds if domain is None else domain_dataset(ds, domain, B_GENRES if b_genres is None else b_genres)


def _load(source: str, options: dict) -> Dataset:
    if source == "ml-100k":
        return _encoded_once(fetch_movielens_100k(), "ml-100k", read_atomic)
    if source == "ml-1m":
        return _encoded_once(fetch_movielens_1m(), "ml-1m", read_recbole_movielens)
    if source == "synthetic":
        return synthetic(**options)
    return encode(read_path(source, **options))


def _encoded_once(directory, name: str, read) -> Dataset:
    """``encode(read(directory, name))``, kept beside the files as an .npz keyed by their sizes and
    modification times, so that later loads skip parsing (ML-1M: 1M rows in ~7 s parsed, ~0.3 s cached)."""
    from pathlib import Path
    directory = Path(directory)
    stamp = "-".join(f"{st.st_size}.{st.st_mtime_ns}" for st in
                     ((directory / f"{name}.{ext}").stat() for ext in ("inter", "item", "user")))
    cache = directory / f".encoded-{stamp}.npz"
    if cache.exists():
        try:
            return load_encoded(cache)
        except (OSError, ValueError, KeyError):
            pass  # unreadable or an older format: encode again and replace it
    ds = encode(read(directory, name))
    for old in directory.glob(".encoded-*.npz"):
        old.unlink(missing_ok=True)
    try:
        save_encoded(ds, cache)
    except OSError:
        pass  # a read-only cache folder: the data set is still returned
    return ds
