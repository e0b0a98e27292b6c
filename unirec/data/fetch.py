"""MovieLens-100K on first use: RecBole's wheel from the package registry, verified, cached.

RecBole 1.2.1's wheel carries ``recbole/dataset_example/ml-100k/ml-100k.{inter,item,user}``
(RecBole atomic files). The wheel is fetched with ``python -m pip download --no-deps
recbole==1.2.1`` by the running interpreter, its sha256 checked, and the three files
extracted to ``$UNIREC_HOME/datasets/ml-100k`` (default ``~/.cache/unirec``).
No data is stored in the repository.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Optional

RECBOLE_VERSION = "1.2.1"
RECBOLE_WHEEL = f"recbole-{RECBOLE_VERSION}-py3-none-any.whl"
RECBOLE_SHA256 = "9c9948202011f37eb0a7c6768129313f00d6403ad221ec940d5e2d5d5f33a407"
ML100K_FILES = ("ml-100k.inter", "ml-100k.item", "ml-100k.user")
_MEMBER = "recbole/dataset_example/ml-100k/{}"


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


def extract_ml100k_from_wheel(wheel: Path, dest: Path, sha256: str = RECBOLE_SHA256) -> Path:
    """Verifies ``wheel`` against ``sha256`` and extracts the three ml-100k files into ``dest``."""
    wheel = Path(wheel)
    got = _sha256(wheel)
    if got != sha256:
        raise FetchError(f"{wheel}: sha256 {got} does not match the expected {sha256}; refusing to use it")
    dest.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=dest, prefix=".extract-"))
    try:
        with zipfile.ZipFile(wheel) as z:
            for name in ML100K_FILES:
                try:
                    data = z.read(_MEMBER.format(name))
                except KeyError:
                    raise FetchError(f"{wheel}: has no member {_MEMBER.format(name)}") from None
                (tmp / name).write_bytes(data)
        for name in ML100K_FILES:  # move into place only once all three are extracted
            os.replace(tmp / name, dest / name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    (dest / ".verified").write_text(f"{RECBOLE_WHEEL} sha256 {sha256}\n")
    return dest


def _how_to_use_local() -> str:
    return (
        "To use local files instead, pass a directory holding either RecBole's ml-100k.inter/.item/.user or "
        "GroupLens' u.data/u.item/u.user (from ml-100k.zip) as the data path, or place ml-100k.inter/.item/.user in "
        f"{unirec_home() / 'datasets' / 'ml-100k'}; or set UNIREC_RECBOLE_WHEEL to a downloaded {RECBOLE_WHEEL}."
    )


def fetch_movielens_100k(home: Optional[os.PathLike] = None, *, timeout: float = 120.0) -> Path:
    """Returns a directory holding ml-100k.{inter,item,user}, fetching them on first use.

    Order: the cache (``<home>/datasets/ml-100k``), then a wheel named by
    ``$UNIREC_RECBOLE_WHEEL``, then ``pip download --no-deps recbole==1.2.1``.

    Raises:
        FetchError: nothing worked; the message lists each attempt and how to point
            unirec at local files.
    """
    dest = Path(home) if home is not None else unirec_home()
    dest = dest / "datasets" / "ml-100k"
    if all((dest / n).exists() for n in ML100K_FILES):
        return dest
    tried = []
    local = os.environ.get("UNIREC_RECBOLE_WHEEL")
    if local:
        try:
            return extract_ml100k_from_wheel(Path(local), dest)
        except (FetchError, OSError, zipfile.BadZipFile) as exc:
            tried.append(f"UNIREC_RECBOLE_WHEEL={local}: {exc}")
    with tempfile.TemporaryDirectory(prefix="unirec-fetch-") as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
               f"recbole=={RECBOLE_VERSION}", "-d", tmp]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        except (OSError, subprocess.TimeoutExpired) as exc:
            tried.append(f"`{' '.join(cmd)}`: {exc}")
        else:
            wheel = Path(tmp) / RECBOLE_WHEEL
            if proc.returncode != 0 or not wheel.exists():
                err = (proc.stderr or proc.stdout).strip().splitlines()
                tried.append(f"`{' '.join(cmd)}` failed (exit {proc.returncode}): {' | '.join(err[-3:])}")
            else:
                try:
                    return extract_ml100k_from_wheel(wheel, dest)
                except (FetchError, zipfile.BadZipFile) as exc:
                    tried.append(str(exc))
    raise FetchError("MovieLens-100K could not be fetched. Tried:\n  - " + "\n  - ".join(tried) + "\n"
                     + _how_to_use_local())
