"""Progress bars for long steps: tqdm on a terminal, silent under CI (`CI=true`) or when not a TTY.

Only the bars are silenced: log lines, warnings and errors still reach stderr.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable, Iterator
from typing import TypeVar

from tqdm.auto import tqdm

T = TypeVar("T")


def quiet() -> bool:
    """True under CI or when stderr is not a terminal (DVC and Prefect capture it: bars would be noise)."""
    return os.environ.get("CI", "").lower() in {"1", "true", "yes"} or not sys.stderr.isatty()


def progress(iterable: Iterable[T], desc: str, total: int | None = None, unit: str = "it") -> Iterator[T]:
    """Wrap a long loop in a progress bar (disabled when `quiet()`)."""
    return iter(tqdm(iterable, desc=desc, total=total, unit=unit, disable=quiet(), dynamic_ncols=True))


def silence_library_bars() -> None:
    """Under `quiet()`, turn off the bars of every tqdm user (diffusers, transformers, huggingface_hub, ...).

    tqdm reads TQDM_DISABLE when a bar is created, so this covers libraries we do not call directly.
    """
    if quiet():
        os.environ.setdefault("TQDM_DISABLE", "1")
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


def diffusers_progress_config() -> dict[str, bool]:
    """Kwargs for `pipe.set_progress_bar_config(**...)` matching `quiet()`."""
    return {"disable": quiet()}
