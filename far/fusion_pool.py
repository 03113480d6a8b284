"""Worker processes for Concept Fusion: started before the inputs are loaded, given the assets once.

Start-up (a fresh interpreter, imports) overlaps with the parent loading and inpainting the inputs; each
example is then sent as (kind, index, seed) only and comes back as a finished row, in order (imap).

Workers come from a fork server, not a plain fork: forking a parent that already runs OpenMP/BLAS threads
(torch is loaded when the stage runs inside a bigger program, e.g. a test session or a Prefect worker)
can deadlock the children. Which worker makes which example never changes a row (per-example seeds).
"""

from __future__ import annotations

import multiprocessing as mp
import os
import pickle
import sys
import tempfile
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import cv2

_ASSETS_PATH: str | None = None  # in a worker: where the parent pickled (assets, cfg)
_COMPOSER: Any = None  # in a worker: the far.fusion.Composer built from them on first use


def _init_worker(assets_path: str) -> None:
    global _ASSETS_PATH
    cv2.setNumThreads(1)  # one process per core already; OpenCV's own threads would oversubscribe
    # albumentations imports its optional torch integration (ToTensorV2) whenever torch is installed; composing
    # never uses it, and importing torch costs seconds per process. A None entry makes that import fail, which
    # albumentations expects (it suppresses the ImportError). Only in these worker processes.
    sys.modules.setdefault("torch", None)  # type: ignore[arg-type]
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    import albumentations  # noqa: F401 - imported now, while the parent is still loading the inputs

    _ASSETS_PATH = assets_path


def _work(spec: tuple[str, int, int]) -> dict[str, Any]:
    global _COMPOSER
    if _COMPOSER is None:
        from far.fusion import Composer

        assert _ASSETS_PATH is not None
        with open(_ASSETS_PATH, "rb") as f:
            assets, cfg = pickle.load(f)
        _COMPOSER = Composer(assets, cfg)
    return _COMPOSER.make(spec)


class WorkerPool:
    """`workers` composing processes, started in the background at construction; use as a context manager."""

    def __init__(self, workers: int) -> None:
        self._tmp = tempfile.TemporaryDirectory(prefix="far-fuse-")
        self._assets_path = Path(self._tmp.name) / "assets.pkl"
        self._pool: Any = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._start, args=(workers,), daemon=True)
        self._thread.start()

    def _start(self, workers: int) -> None:
        try:
            ctx = mp.get_context("forkserver")
            ctx.set_forkserver_preload(["far.fusion"])
            self._pool = ctx.Pool(workers, initializer=_init_worker, initargs=(str(self._assets_path),))
        except BaseException as exc:  # noqa: BLE001 - re-raised in the caller's thread by imap()
            self._error = exc

    def imap(self, assets: Any, cfg: Any, specs: Sequence[tuple[str, int, int]], chunksize: int = 16) -> Iterator:
        """Rows of `specs`, in order. The assets are written for the workers before any task is sent."""
        with open(self._assets_path, "wb") as f:
            pickle.dump((assets, cfg), f, protocol=pickle.HIGHEST_PROTOCOL)
        self._thread.join()
        if self._error is not None:
            raise self._error
        return self._pool.imap(_work, specs, chunksize=chunksize)

    def close(self) -> None:
        self._thread.join()
        if self._pool is not None:
            self._pool.terminate()
            self._pool.join()
        self._tmp.cleanup()

    def __enter__(self) -> WorkerPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
