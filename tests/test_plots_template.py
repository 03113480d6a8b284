"""far/plots_template.py and .dvc/config: `dvc plots show` renders with no network, in headless Chromium."""

from __future__ import annotations

import re
import shutil
import sys
from pathlib import Path

import pytest
from PIL import Image

from far.plots_template import PACKAGES, TEMPLATE, build
from tests.conftest import ROOT, run
from tests.test_report import CHROMIUM, _chromium

DVC = [sys.executable, "-m", "dvc"]
# Every host name fails to resolve and every request goes to a closed port: a page that needs a CDN stays blank.
OFFLINE = ["--proxy-server=http://127.0.0.1:9", "--host-resolver-rules=MAP * ~NOTFOUND"]


def test_shipped_template_inlines_the_pinned_scripts_and_loads_nothing():
    page = TEMPLATE.read_text()
    assert "{plot_divs}" in page and "{scripts}" not in page  # DVC adds its CDN tags only at {scripts}
    for spec in PACKAGES:
        assert f"/* {spec.package}@{spec.version} (BSD-3-Clause) */" in page
        assert (ROOT / "far/templates/vega" / f"LICENSE.{spec.package}").is_file()
    assert not re.search(r"<script[^>]*\bsrc=", page) and "<link" not in page


def test_a_tarball_with_the_wrong_hash_is_refused(tmp_path: Path):
    fake = tmp_path / "vega-5.33.1.tgz"
    shutil.copy(ROOT / "tests/data/dreambench/candle/00.jpg", fake)  # not the tarball
    with pytest.raises(Exception, match="not a readable .tgz|sha512"):
        build({"vega": fake}, out=tmp_path / "t.html")
    assert not (tmp_path / "t.html").exists()


def _plots_project(root: Path) -> Path:
    """A git + DVC repository with the project's .dvc/config and template, and one CSV to plot."""
    shutil.copytree(ROOT / "far/templates", root / "far/templates")
    run(["git", "init", "-q"], root)
    run(DVC + ["init", "-q"], root)
    shutil.copy(ROOT / ".dvc/config", root / ".dvc/config")
    rows = ["prompt_idx,clip_t,clip_i,dino"] + [f"{i},{0.2 + i / 50:.3f},{0.5 + i / 40:.3f},{0.3 + i / 30:.3f}"
                                                for i in range(8)]
    (root / "per_prompt.csv").write_text("\n".join(rows) + "\n")
    return root


def _show(project: Path, *extra: str) -> Path:
    run(DVC + ["plots", "show", "per_prompt.csv", "-x", "prompt_idx", "-y", "clip_t", "--template", "scatter",
               "-o", "dvc_plots", *extra], project)
    return project / "dvc_plots" / "index.html"


@pytest.mark.slow
@pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's `chromium` (apt-get install -y chromium)")
def test_dvc_plots_show_renders_offline_in_headless_chromium(tmp_path: Path):
    project = _plots_project(tmp_path / "project")
    page = _show(project)
    assert "cdn.jsdelivr.net" not in page.read_text()
    dom = _chromium(*OFFLINE, "--virtual-time-budget=10000", "--dump-dom", page.as_uri(), user_dir=tmp_path / "a")
    assert dom.returncode == 0, dom.stderr[-2000:]
    # vega-embed draws into the plot's div: a <canvas> (its default renderer) or an <svg class="marks">
    assert re.search(r'<canvas[^>]*class="marks"|<svg[^>]*class="marks"', dom.stdout), dom.stdout[-3000:]

    shot = tmp_path / "plots.png"
    snap = _chromium(*OFFLINE, "--virtual-time-budget=10000", f"--screenshot={shot}", "--window-size=900,600",
                     page.as_uri(), user_dir=tmp_path / "b")
    assert snap.returncode == 0 and shot.is_file(), snap.stderr[-2000:]
    with Image.open(shot) as im:
        colours = im.convert("RGB").getcolors(maxcolors=1_000_000)
        assert colours is not None and len(colours) > 20  # axes, labels, points: not a blank page

    # The check can fail: DVC's own page (scripts from the CDN) draws nothing under the same flags.
    (tmp_path / "cdn.html").write_text("<html><head>{scripts}</head><body>{plot_divs}</body></html>")
    cdn = _show(project, "--html-template", str(tmp_path / "cdn.html"))
    assert "cdn.jsdelivr.net" in cdn.read_text()
    blank = _chromium(*OFFLINE, "--virtual-time-budget=10000", "--dump-dom", cdn.as_uri(), user_dir=tmp_path / "c")
    assert 'class="marks"' not in blank.stdout
