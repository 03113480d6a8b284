"""DVC stage `sample`: declared in dvc.yaml; its real work lands with issue #5."""

from __future__ import annotations

from far.errors import NotImplementedStageError
from stages import run_stage


def main() -> None:
    """Not implemented yet: fails clearly and writes no output."""
    raise NotImplementedStageError("stage 'sample' is not implemented yet (issue #5); it wrote nothing")


if __name__ == "__main__":
    run_stage(main)
