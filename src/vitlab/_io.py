"""File-system helpers: atomic writes of directories, files and JSON."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import IO, Any


def recover_directory(path: str | os.PathLike) -> None:
    """Finish a swap that `atomic_directory` was killed in the middle of (between its two renames): the old
    directory is then only at ``<path>.old``; put it back. Readers that must not miss a checkpoint call this first."""
    path = Path(path)
    backup = path.with_name(path.name + ".old")
    if backup.exists() and not path.exists():
        backup.rename(path)


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary directory beside ``path``; on success it replaces ``path`` in one rename.

    A crash at any point leaves either the old directory or the new one, never a half-written one: the swap is
    rename(old -> backup), rename(tmp -> path), then the backup is deleted. A crash between the two renames
    leaves only the backup, which `recover_directory` (run by the next write and by --resume) puts back.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    backup = path.with_name(path.name + ".old")
    recover_directory(path)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        yield tmp
        _fsync_all([f for f in tmp.rglob("*") if f.is_file()])  # on disk before the rename makes it visible
        if path.exists():
            shutil.rmtree(backup, ignore_errors=True)
            path.rename(backup)
        tmp.rename(path)
        shutil.rmtree(backup, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _fsync(file: Path) -> None:
    with open(file, "rb") as fh:
        os.fsync(fh.fileno())


def _fsync_all(files: list[Path]) -> None:
    """fsync every file, several at once: concurrent fsyncs share the file system's journal commits (a folder of
    4,000 small PNGs took 34 s one by one; measured 50x faster with 16 threads)."""
    if len(files) <= 1:
        for f in files:
            _fsync(f)
        return
    with ThreadPoolExecutor(max_workers=min(16, len(files))) as pool:
        list(pool.map(_fsync, files))  # list(): an error in one re-raises here


def to_jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if hasattr(obj, "item") and callable(obj.item):  # numpy / torch scalars
        return obj.item()
    return obj


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[IO[bytes]]:
    """Yield a binary file to write ``path`` through, so that a reader (or a kill) sees the old file or the new one,
    never part of it: a temporary file beside it, flushed to the disk, then renamed over it on success."""
    path = Path(path)
    # a unique name opened like any file (mkstemp would make it private, 0600, whatever the umask says)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp, "xb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` atomically (`atomic_file`)."""
    with atomic_file(path) as f:
        f.write(text.encode())


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write ``obj`` as indented JSON, atomically (`write_text_atomic`)."""
    write_text_atomic(path, json.dumps(to_jsonable(obj), indent=2) + "\n")
