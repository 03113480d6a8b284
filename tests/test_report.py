"""far/report.py: the static HTML report, from inputs in the documented formats, checked in real Chromium."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import pytest
from PIL import Image

from far.config import ReportConfig
from far.errors import InvalidInputError
from far.report import Inputs, build_report, dvc_experiments, experiments_table
from tests import report_fixtures as fx
from tests.conftest import ROOT, run

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
# Flags that work in this container (no sandbox, no GPU, nothing fetched from the network).
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--hide-scrollbars"]


class Links(HTMLParser):
    """Every URL the page loads (img/script/link/source) and every anchor href."""

    def __init__(self) -> None:
        super().__init__()
        self.loads: list[str] = []
        self.anchors: list[str] = []
        self.imgs = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if tag == "img":
            self.imgs += 1
        if tag in {"img", "script", "source", "iframe"} and a.get("src"):
            self.loads.append(a["src"])
        if tag == "link" and a.get("href"):
            self.loads.append(a["href"])
        if tag == "a" and a.get("href"):
            self.anchors.append(a["href"])


def build(root: Path, cfg: ReportConfig | None = None, **changes) -> tuple[Path, object]:
    inputs = {**fx.all_inputs(root), **changes}
    page = root / "reports/index.html"
    ctx = build_report(Inputs(**inputs), page, root / "reports/assets", cfg or ReportConfig(), repo=root)
    return page, ctx


def parse(page: Path) -> Links:
    links = Links()
    links.feed(page.read_text())
    return links


def test_page_shows_every_part_with_local_relative_assets(tmp_path: Path):
    page, ctx = build(tmp_path)
    html = page.read_text()
    links = parse(page)
    # 2 refs x 2 concepts x (photo + mask outline) + 6 fusion + 2 curves + samples: 2 seeds x (1 + 1) + 2 x (1 + 2)
    assert links.imgs == 8 + 6 + 2 + 10 == len(links.loads)
    for src in links.loads:
        assert not re.match(r"^([a-z]+:)?//", src) and not src.startswith("/"), src
        assert (page.parent / src).is_file(), src
        with Image.open(page.parent / src) as im:
            assert min(im.size) > 0
    assert all(a.startswith("#") for a in links.anchors)
    # backbones (reports/eval/backbones.json) are prominent, with the warning that tiny-backbone numbers are not
    # real scores; hashes shortened
    assert "tiny-clip (seed 0; random init, offline)" in html and "tiny-dino-vit (seed 0; random init" in html
    assert "not</b> comparable with published" in html and ">ab12ab12ab12<" in html and "ab12" * 4 not in html
    assert html.index("tiny-clip") < html.index('id="metrics"')
    # metric tables of every section, attention overlays named by token, prompts, curves
    for text in ("0.2512", "25.12", "identity_accuracy", "dog-&gt;dog3", "per concept", "a &lt;far-dog&gt; dog and a "
                 "&lt;far-dog3&gt; dog playing in the park", "train/loss", "train/refine_loss", "base model: <b>tiny",
                 "20 steps, guidance 6.0", "attention maps 8&times;8", "<td>identity_margin</td><td>n/a</td>"):
        assert text in html, text
    assert html.count('alt="attention of &lt;far-dog3&gt;"') == 2
    assert html.count('alt="attention of &lt;far-dog&gt;"') == 4
    assert ctx.missing == [] and "not inside of a DVC repository" in ctx.experiments_note
    # no reports/eval/world.csv (a configuration without the world verdict): no oracle figure, legend or asset
    assert "oracle" not in html and not ctx.oracle_legend and not (page.parent / "assets/oracle").exists()


def test_same_inputs_give_identical_bytes(tmp_path: Path):
    page_a, _ = build(tmp_path / "a")
    inputs = {k: v for k, v in fx.all_inputs(tmp_path / "a").items()}
    page_b = tmp_path / "b/index.html"
    build_report(Inputs(**inputs), page_b, tmp_path / "b/assets", ReportConfig(), repo=tmp_path / "a")
    assets_a, assets_b = page_a.parent / "assets", tmp_path / "b/assets"
    files_a = sorted(p.relative_to(assets_a) for p in assets_a.rglob("*.*"))
    assert files_a and files_a == sorted(p.relative_to(assets_b) for p in assets_b.rglob("*.*"))
    assert page_a.read_bytes() == page_b.read_bytes()
    for f in files_a:
        assert (page_a.parent / "assets" / f).read_bytes() == (tmp_path / "b/assets" / f).read_bytes(), f


def test_real_backbones_get_no_tiny_warning_and_params_are_honoured(tmp_path: Path):
    real = fx.eval_dir(tmp_path / "real", tiny=False)
    cfg = ReportConfig(max_samples_per_prompt=1, fusion_preview=2, thumbnail_size=64, experiments=False)
    page, ctx = build(tmp_path, cfg, eval=real)
    html = page.read_text()
    assert "clip ViT-B/32" in html and "dino facebook/dino-vits16" in html and "tiny offline" not in html
    assert 'class="banner ok"' in html and "not</b> comparable" not in html
    assert all(len(p["seeds"]) == 1 for p in ctx.samples) and len(ctx.fusion) == 2
    assert [f["kind"] for f in ctx.fusion] == ["fusion", "reference"]  # round robin over kinds, fusion first
    with Image.open(tmp_path / "reports/assets/samples/000_0.jpg") as im:
        assert max(im.size) == 64
    assert "Experiments side by side" not in html


def test_missing_inputs_are_noted_bad_ones_are_errors(tmp_path: Path):
    page, ctx = build(tmp_path, live=tmp_path / "no-dvclive", fusion=tmp_path / "no-fusion", eval=tmp_path / "no-eval")
    assert any("no-dvclive/plots/metrics" in m for m in ctx.missing)
    assert any("no-fusion/train.parquet" in m for m in ctx.missing)
    assert any("no-eval/backbones.json (run the `evaluate` stage)" in m for m in ctx.missing)
    html = page.read_text()
    assert "Missing inputs" in html and ctx.samples and not ctx.curves
    assert "Metric backbones unknown" in html and not ctx.tiny_backbones
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(InvalidInputError, match="bad.json: not valid JSON"):
        build(tmp_path / "x", metrics=bad)
    bad_eval = fx.eval_dir(tmp_path / "bad-eval")
    (bad_eval / "backbones.json").write_text("[1, 2]")
    with pytest.raises(InvalidInputError, match="bad-eval/backbones.json: expected a JSON object"):
        build(tmp_path / "x2", eval=bad_eval)
    samples = fx.samples(tmp_path / "s")
    (samples / "attn/001_1_dog3.npy").unlink()
    with pytest.raises(InvalidInputError, match="attention map attn/001_1_dog3.npy of 001_1.png does not exist"):
        build(tmp_path / "y", samples=samples)
    assert not (tmp_path / "y/reports/index.html").exists()


def test_oracle_reading_beside_each_sample(tmp_path: Path):
    """reports/eval/world.csv (written by the world verdict's own image_rows): boxes on the enlarged sample, coloured
    by what each subject is, and a caption line per subject with the oracle's background."""
    samples = fx.samples(tmp_path / "world/samples")  # 256 px
    world = fx.eval_dir(tmp_path / "world/eval")
    fx.world(world, samples)
    page, ctx = build(tmp_path, ReportConfig(thumbnail_size=512, experiments=False), samples=samples, eval=world)
    html = page.read_text()
    assert html.count('alt="oracle reading of seed') == 4 and len(ctx.oracle_legend) == 3
    one = html[html.index('alt="oracle reading of seed 0"', html.index("#1 &ldquo;")):]
    one = one[:one.index("</figure>")]  # the caption of prompt 1, seed 0
    assert ">background grass<br>" in one
    for line in ("dog red/blue spots = dog", "dog yellow/purple stripes = dog3",
                 "dog red/purple stripes = mix:dog+dog3"):
        assert f"</span>{line}" in one, line
    assert "</span>car yellow/purple plain</figcaption>" in html  # prompt 0: a subject named nothing: no `=`
    assert 'title="confidence 0.8123"' in one
    assert all((page.parent / src).is_file() for src in parse(page).loads)

    with Image.open(page.parent / "assets/oracle/001_0.jpg") as im:  # prompt 1: a concept and a mix
        assert im.size == (512, 512)  # enlarged x2 from the 256 px sample
        rgb = im.convert("RGB")
    width = 5  # round(512 / 96): the box line, just inside the bbox scaled x2
    for (x0, y0, x1, y1), colour in (((10, 80, 110, 220), (0, 255, 255)), ((100, 10, 160, 60), (255, 0, 255))):
        mid = y0 + y1  # the middle of the box's left and right sides, scaled x2
        for x in (2 * x0 + width // 2, 2 * x1 - 1 - width // 2):  # the left and right sides
            assert all(abs(a - b) <= 40 for a, b in zip(rgb.getpixel((x, mid)), colour, strict=True)), (x, mid)
        assert max(rgb.getpixel((2 * x0 - 1, mid))) <= 60  # the black rim just outside
    with Image.open(page.parent / "assets/oracle/000_0.jpg") as im:  # the car: any other subject, white
        assert min(im.convert("RGB").getpixel((2 * 180 + width // 2, 190 + 240))) >= 215


def test_malformed_world_csv_is_an_error_naming_file_line_and_column(tmp_path: Path):
    samples = fx.samples(tmp_path / "world/samples")
    world = fx.eval_dir(tmp_path / "world/eval")
    csv = fx.world(world, samples)
    good = csv.read_text()
    lines = good.splitlines(keepends=True)
    lines[3] = lines[3].replace('[{""cls""', '[{cls', 1)  # line 4: 001_0.png, its subjects no longer JSON
    csv.write_text("".join(lines))
    with pytest.raises(InvalidInputError, match=r"world/eval/world.csv: line 4 \(001_0.png\), column subjects: "
                                                "not valid JSON"):
        build(tmp_path / "a", samples=samples, eval=world)
    csv.write_text(good.replace('""bbox"": [10, 80, 110, 220]', '""bbox"": [10, 80]', 1))
    with pytest.raises(InvalidInputError, match=r"world.csv: line 4 \(001_0.png\), column subjects: expected a JSON "
                                                "list of subjects, each with cls, body"):
        build(tmp_path / "b", samples=samples, eval=world)
    csv.write_text(good.replace("oracle_background", "background_read", 1))
    with pytest.raises(InvalidInputError, match="world/eval/world.csv: no column oracle_background"):
        build(tmp_path / "c", samples=samples, eval=world)
    assert not (tmp_path / "a/reports/index.html").exists() and not (tmp_path / "c/reports/assets").exists()


EXP_SCRIPT = """
import json, pathlib, yaml
w = yaml.safe_load(open("params.yaml"))["train"]["weight"]
pathlib.Path("reports").mkdir(exist_ok=True)
json.dump({"backbones": {"clip": "tiny"}, "overall": {"clip_t": round(0.2 + w, 3)},  # text: as older commits had
           "per_concept": {"dog": {"dino": round(0.5 - w, 3)}}}, open("reports/metrics.json", "w"))
"""


@pytest.mark.slow
def test_every_dvc_experiment_side_by_side(tmp_path: Path):
    """A real DVC repo with two `dvc exp run`s: the table has one row per run and the params that differ."""
    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / "params.yaml").write_text("train:\n  weight: 0.1\n  steps: 3\n")
    (repo / "make.py").write_text(EXP_SCRIPT)
    (repo / "dvc.yaml").write_text("stages:\n  make:\n    cmd: python make.py\n    deps: [make.py]\n"
                                   "    params: [train]\n    metrics:\n      - reports/metrics.json:\n"
                                   "          cache: false\n")
    dvc = [sys.executable, "-m", "dvc"]
    for cmd in (["git", "init", "-q", "-b", "main"], ["git", "config", "user.email", "t@far.invalid"],
                ["git", "config", "user.name", "t"], [*dvc, "init", "-q"], ["git", "add", "-A"],
                ["git", "commit", "-qm", "init"], [*dvc, "exp", "run", "-n", "w03", "-S", "train.weight=0.3"],
                [*dvc, "exp", "run", "-n", "w00", "-S", "train.weight=0.0"]):
        run(cmd, repo)
    table, note = dvc_experiments(repo / "reports/metrics.json", repo)
    assert table is not None, note
    rows = {r[0]: r for r in table["rows"]}
    assert set(rows) == {"workspace (this run)", "w03", "w00"}  # main has no metrics committed: left out
    # the headline metric first, then the param that differs, then the other metrics; text metrics left out
    assert table["columns"] == ["experiment", "overall.clip_t", "train.weight", "per_concept.dog.dino"]
    assert rows["w03"][1:] == ["0.5", "0.3", "0.2"] and rows["w00"][1:] == ["0.2", "0", "0.5"]
    assert table["n_head"] == 1 and table["n_params"] == 1 and "3 runs" in note
    ctx2 = build_report(Inputs(**{**fx.all_inputs(tmp_path / "site"), "metrics": repo / "reports/metrics.json"}),
                        tmp_path / "site2/index.html", tmp_path / "site2/assets", ReportConfig(), repo=repo)
    html = (tmp_path / "site2/index.html").read_text()
    assert ctx2.experiments and "Experiments side by side" in html and "w03" in html and "w00" in html
    assert '<th class="head">overall.clip_t</th><th class="param">train.weight</th><th>per_concept' in html

    # `far report --experiments`: only experiments.html, with an experiment run after the report
    run([*dvc, "exp", "run", "-n", "w05", "-S", "train.weight=0.5"], repo)
    before = {p: p.read_bytes() for p in (tmp_path / "site2").rglob("*") if p.is_file()}
    proc = run([sys.executable, "-m", "far.cli", "report", "--experiments", "--repo", str(repo), "--metrics",
                str(repo / "reports/metrics.json"), "--out", str(tmp_path / "site2/index.html")], ROOT)
    assert proc.stdout.startswith(f"report: {tmp_path / 'site2/experiments.html'} [4 runs"), proc.stdout
    page = (tmp_path / "site2/experiments.html").read_text()
    assert "w05" in page and '<td class="head">0.7</td>' in page and "w03" in page and 'href="index.html"' in page
    assert {p: p.read_bytes() for p in before} == before  # the stage's outputs are untouched


def test_experiments_table_tolerates_odd_dvc_output(tmp_path: Path):
    metrics = tmp_path / "reports/metrics.json"
    assert experiments_table([], metrics, tmp_path)[0] is None
    commits = [{"rev": "workspace", "data": {"metrics": {"reports/metrics.json": {"data": {"overall": {"a": 1.0}}}}}},
               {"rev": "abc1234", "name": "main", "data": {"metrics": {"reports/metrics.json": {"error": {}}}},
                "experiments": [{"name": "running", "executor": {"state": "running"},
                                 "revs": [{"rev": "workspace", "data": {}}]},
                                {"name": "e1", "revs": [{"rev": "f00", "data": {
                                    "params": {"params.yaml": {"data": {"x": 2}}},
                                    "metrics": {"reports/metrics.json": {"data": {"overall": {"a": 0.5}}}}}}]}]}]
    table, _ = experiments_table(commits, metrics, tmp_path)
    assert [r[0] for r in table["rows"]] == ["workspace (this run)", "e1"]
    assert table["columns"] == ["experiment", "x", "overall.a"] and table["rows"][1] == ["e1", "2", "0.5"]


def _chromium(*args: str, user_dir: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([CHROMIUM, *CHROMIUM_FLAGS, f"--user-data-dir={user_dir}", *args],
                          capture_output=True, text=True, timeout=120)


# Loaded first in a test copy of the page: records failed resource loads and script errors, then after
# `load` writes every image's decoded size into the DOM that --dump-dom prints.
PROBE = """<script>
window.__errors = [];
window.addEventListener("error", e => window.__errors.push(e.target && e.target.src ? "load " + e.target.src
                                                            : "script " + e.message), true);
window.addEventListener("load", () => {
  const imgs = [...document.images].map(i => ({src: i.getAttribute("src"), ok: i.complete && i.naturalWidth > 0,
                                               w: i.naturalWidth}));
  const pre = document.createElement("pre"); pre.id = "__probe";
  pre.textContent = JSON.stringify({imgs, errors: window.__errors});
  document.body.appendChild(pre);
});
</script>"""


@pytest.mark.slow
@pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's `chromium` (apt-get install -y chromium)")
def test_page_loads_in_headless_chromium_without_errors(tmp_path: Path):
    page, _ = build(tmp_path)
    probe = page.with_name("probe.html")  # same directory: same relative asset links
    probe.write_text(page.read_text().replace("<head>", "<head>\n" + PROBE, 1))
    dom = _chromium("--virtual-time-budget=10000", "--enable-logging=stderr", "--v=0", "--dump-dom",
                    probe.as_uri(), user_dir=tmp_path / "profile-a")
    assert dom.returncode == 0, dom.stderr[-2000:]
    found = re.search(r'<pre id="__probe">(.*?)</pre>', dom.stdout, re.S)
    assert found, dom.stdout[-2000:]
    result = json.loads(found.group(1).replace("&quot;", '"').replace("&lt;", "<").replace("&gt;", ">")
                        .replace("&amp;", "&"))
    assert result["errors"] == []
    assert len(result["imgs"]) == parse(page).imgs == 26
    assert all(i["ok"] and i["w"] > 0 for i in result["imgs"]), [i for i in result["imgs"] if not i["ok"]]
    console = [line for line in dom.stderr.splitlines() if "CONSOLE" in line or "Uncaught" in line
               or "Failed to load resource" in line or "ERR_FILE_NOT_FOUND" in line]
    assert console == []

    shot = tmp_path / "screenshot.png"
    snap = _chromium(f"--screenshot={shot}", "--window-size=1400,3000", page.as_uri(), user_dir=tmp_path / "profile-b")
    assert snap.returncode == 0 and shot.is_file(), snap.stderr[-2000:]
    with Image.open(shot) as im:
        assert im.size == (1400, 3000)
        colours = im.convert("RGB").resize((70, 150)).getcolors(maxcolors=100_000)
        assert colours is not None and len(colours) > 500  # a rendered page with pictures, not a blank canvas


@pytest.mark.slow
def test_report_stage_script(tmp_path: Path, params_file):
    inputs = fx.all_inputs(tmp_path)
    params = params_file()
    args = [sys.executable, "-m", "stages.report", "--segmented", str(inputs["segmented"]),
            "--fusion", str(inputs["fusion"]), "--samples", str(inputs["samples"]), "--metrics", str(inputs["metrics"]),
            "--live", str(inputs["live"]), "--out", str(tmp_path / "reports/index.html"),
            "--assets", str(tmp_path / "reports/assets"), "--eval", str(inputs["eval"]),
            "--repo", str(tmp_path), "--params", str(params)]
    proc = run(args, ROOT)
    assert proc.stdout.strip() == (f"report: {tmp_path / 'reports/index.html'} [4 samples, 2 curves, 6 training "
                                   "examples, 4 references, this run only]"), proc.stdout
    html = (tmp_path / "reports/index.html").read_text()
    assert "per_prompt.csv" in html and "two dogs" in html
    bad = params_file(lambda p: p["report"].update(thumbnail_size=8))
    proc = run([*args[:-1], str(bad)], ROOT, check=False)
    assert proc.returncode == 2 and "report.thumbnail_size: 8 is invalid" in proc.stderr
