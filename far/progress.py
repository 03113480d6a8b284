"""Progress bars for long steps: tqdm on a terminal, silent under CI (`CI=true`) or when not a TTY.

Only the bars are silenced: log lines, warnings and errors still reach stderr.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")


def quiet() -> bool:
    """True under CI or when stderr is not a terminal (DVC and Prefect capture it: bars would be noise)."""
    return os.environ.get("CI", "").lower() in {"1", "true", "yes"} or not sys.stderr.isatty()


def progress(iterable: Iterable[T], desc: str, total: int | None = None, unit: str = "it") -> Iterator[T]:
    """Wrap a long loop in a progress bar (disabled when `quiet()`)."""
    from tqdm.auto import tqdm  # not at import: silence_library_bars() must run before tqdm is first imported

    return iter(tqdm(iterable, desc=desc, total=total, unit=unit, disable=quiet(), dynamic_ncols=True))


def silence_library_bars() -> None:
    """Under `quiet()`, turn off the bars of every tqdm user (diffusers, transformers, huggingface_hub, ...).

    tqdm reads TQDM_DISABLE once, when it is first imported (`tqdm.utils.envwrap`), and huggingface_hub its
    variable likewise: so this runs before either is imported (`run_stage`, `far.cli.main`), and then covers
    the bars of libraries we do not call directly, such as diffusers' "Loading pipeline components".
    """
    if quiet():
        os.environ.setdefault("TQDM_DISABLE", "1")
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


def diffusers_progress_config() -> dict[str, bool]:
    """Kwargs for `pipe.set_progress_bar_config(**...)` matching `quiet()`."""
    return {"disable": quiet()}
