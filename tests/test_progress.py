"""far/progress.py: library progress bars are silent under CI in every command we own (issue 14)."""

from __future__ import annotations

import sys

from tests.conftest import ROOT, run

# diffusers' own "Loading pipeline components..." bar (DiffusionPipeline.from_pretrained), inside a command run
# the way stages, `far` and `python -m pipelines.flows` run theirs (far.errors.run_app).
BAR = """
import sys, typer
from far.errors import run_app

def main() -> None:
    from diffusers.utils import logging
    for _ in logging.tqdm(range(3), desc="Loading pipeline components..."):
        pass

app = typer.Typer(add_completion=False)
app.command()(main)
if sys.argv[1:] == ["--direct"]:
    main()
else:
    run_app(app, prog="bar")
"""


def test_diffusers_loading_bar_is_silent_under_ci_in_commands():
    assert "Loading pipeline components" not in run([sys.executable, "-c", BAR], ROOT, CI="true").stderr
    # the same bar outside run_app prints: the check above can fail
    assert "Loading pipeline components" in run([sys.executable, "-c", BAR, "--direct"], ROOT, CI="true").stderr
