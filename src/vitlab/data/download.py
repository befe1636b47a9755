"""Where datasets are cached, and checksum-verified downloads into that cache."""

from __future__ import annotations

import hashlib
import http.client
import os
import tempfile
import urllib.request
from collections.abc import Sequence
from pathlib import Path

from vitlab.errors import VitlabError


def cache_dir() -> Path:
    """``$XDG_CACHE_HOME/vitlab``, by default ``~/.cache/vitlab``."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "vitlab"


def file_md5(path: str | Path) -> str:
    digest = hashlib.md5(usedforsecurity=False)  # an integrity check, not security: allowed on FIPS systems too
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def verify_md5(path: str | Path, md5: str) -> None:
    """`VitlabError` unless the file at ``path`` has MD5 ``md5``."""
    got = file_md5(path)
    if got != md5:
        raise VitlabError(
            f"checksum mismatch for {path}: md5 {got}, expected {md5}; the file is corrupt or not the official one,"
            " delete it and get it again"
        )


def _fetch(url: str, dest: Path, md5: str, timeout: float) -> None:
    # Download into a temporary file beside ``dest`` and rename only once the checksum matches, so an interrupted
    # or corrupt download never sits where the next run would take it for the real file.
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)
    try:
        digest = hashlib.md5(usedforsecurity=False)
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=timeout) as response:
            while chunk := response.read(1 << 20):
                out.write(chunk)
                digest.update(chunk)
            out.flush()
            os.fsync(out.fileno())
        if digest.hexdigest() != md5:
            raise VitlabError(f"checksum mismatch for {url}: md5 {digest.hexdigest()}, expected {md5}")
        os.replace(tmp, dest)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def download(urls: Sequence[str], dest: str | Path, *, md5: str, timeout: float = 60.0) -> Path:
    """Download the first of ``urls`` (mirrors of one file) that succeeds and has MD5 ``md5`` to ``dest``."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    errors = []
    for url in urls:
        try:
            _fetch(url, dest, md5, timeout)
            return dest
        except VitlabError as e:
            errors.append(str(e))
        except (OSError, http.client.HTTPException) as e:  # URLError, HTTPError and timeouts are all OSError
            errors.append(f"{url}: {getattr(e, 'reason', None) or e}")
    raise VitlabError(f"could not download {dest.name} ({'; '.join(errors)})")
