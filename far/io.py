"""Atomic outputs: every stage writes to a temporary sibling, then renames it into place.

A killed or failed stage therefore never leaves a half-written output that DVC could cache; the old
output (if any) stays untouched until the new one is complete.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any


def _tmp_sibling(final: Path, is_dir: bool) -> Path:
    final.parent.mkdir(parents=True, exist_ok=True)
    prefix = f".{final.name}.tmp-"
    if is_dir:
        return Path(tempfile.mkdtemp(prefix=prefix, dir=final.parent))
    fd, name = tempfile.mkstemp(prefix=prefix, dir=final.parent)
    os.close(fd)
    return Path(name)


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def remove_stale_tmp(final: Path) -> list[Path]:
    """Delete temporaries a killed run left beside `final` (they are never outputs); returns them."""
    leftovers = sorted(final.parent.glob(f".{final.name}.tmp-*"))
    for leftover in leftovers:
        if leftover.is_dir():
            shutil.rmtree(leftover, ignore_errors=True)
        else:
            leftover.unlink(missing_ok=True)
    return leftovers


@contextlib.contextmanager
def atomic_dir(final: Path | str) -> Iterator[Path]:
    """Yield an empty temporary directory; on success it replaces `final` in one rename.

    On an exception the temporary directory is removed and `final` is left as it was.
    """
    final = Path(final)
    remove_stale_tmp(final)
    tmp = _tmp_sibling(final, is_dir=True)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    os.chmod(tmp, 0o755)  # mkdtemp makes 0700 directories
    old = None
    if final.exists():
        old = final.parent / f".{final.name}.tmp-old"
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
    os.replace(tmp, final)
    _fsync_dir(final.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def atomic_file(final: Path | str) -> Iterator[Path]:
    """Yield a temporary path to write; on success it is renamed onto `final`."""
    final = Path(final)
    tmp = _tmp_sibling(final, is_dir=False)
    try:
        yield tmp
        os.chmod(tmp, 0o644)  # mkstemp makes 0600 files
        os.replace(tmp, final)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(final.parent)


def write_bytes(path: Path | str, data: bytes) -> None:
    with atomic_file(path) as tmp:
        tmp.write_bytes(data)


def write_text(path: Path | str, text: str) -> None:
    write_bytes(path, text.encode())


def file_sha256(path: Path | str) -> str:
    """Hex sha256 of a file's bytes, read in 1 MiB chunks (model files can be GBs)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_json(path: Path | str, obj: Any) -> None:
    """Deterministic JSON (sorted keys, fixed indent, trailing newline) so DVC hashes are stable."""
    write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")
