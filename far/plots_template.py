"""`dvc plots show` offline: an HTML template with Vega, Vega-Lite and Vega-Embed inlined.

DVC's default page loads the three scripts from a CDN, so on a machine that reaches package registries only (or
none) the plots are blank. `far/templates/dvc_plots.html` holds the scripts themselves, taken from their npm
packages (BSD-3-Clause; licences in `far/templates/vega/`), and `.dvc/config` points `plots.html_template` at it.
DVC fills `{plot_divs}`; the template has no `{scripts}` placeholder, so DVC's CDN tags are never added.

Rebuild it (another version: change `PACKAGES`) with `python -m far.plots_template`; the tarballs' sha512 and the
scripts' sha256 are checked as `far weights` checks the segmentation weights.
"""

from __future__ import annotations

import hashlib
import urllib.request
from pathlib import Path

from far.io import write_text
from far.weights import NpmModel, WeightsError, _extract

TEMPLATE = Path(__file__).parent / "templates" / "dvc_plots.html"

# In load order: vega-lite and vega-embed use the globals `vega` (and `vegaLite`) defined before them.
PACKAGES = (
    NpmModel(name="vega", package="vega", version="5.33.1", member="package/build/vega.min.js",
             tarball_sha512="1fArfVDUqVbb5z8n+/nVQb+VNBzx8svY6CrsyTK4Ujm4yrd9I1auoKxBAPXLCavY1LcrbHUskQbGUP8gXOzyQw==",
             sha256="463f3db6a40b20e9747b4ed38f37ed0add508838f9141b1cf8366784b07b30c8", licence="BSD-3-Clause"),
    NpmModel(name="vega-lite", package="vega-lite", version="5.23.0", member="package/build/vega-lite.min.js",
             tarball_sha512="l4J6+AWE3DIjvovEoHl2LdtCUkfm4zs8Xxx7INwZEAv+XVb6kR6vIN1gt3t2gN2gs/y4DYTs/RPoTeYAuEg6mA==",
             sha256="58c27358e26f2d319cf62f45bc17a4c8362f08645001df2ec8d341eee4097c7f", licence="BSD-3-Clause"),
    NpmModel(name="vega-embed", package="vega-embed", version="6.29.0", member="package/build/vega-embed.min.js",
             tarball_sha512="PmlshTLtLFLgWtF/b23T1OwX53AugJ9RZ3qPE2c01VFAbgt3/GSNI/etzA/GzdrkceXFma+FDHNXUppKuM0U6Q==",
             sha256="12d02acfbe3ec59ef9a37dd4822a2e04e2961b5bbb671bbe661d2221715b99da", licence="BSD-3-Clause"),
)

PAGE = """<!DOCTYPE html>
<html>
<head>
  {refresh_tag}
  <meta charset="utf-8">
  <title>DVC plots (offline)</title>
  <!-- {versions}: inlined from their npm packages by far/plots_template.py; licences in far/templates/vega/ -->
{scripts}
  <style>table { border-spacing: 15px; } body { font-family: sans-serif; }</style>
</head>
<body>
  {plot_divs}
</body>
</html>
"""


def _script(spec: NpmModel, source: Path | None) -> str:
    if source is not None:
        with open(source, "rb") as f:
            data = _extract(spec, f, str(source))
    else:
        with urllib.request.urlopen(spec.tarball_url, timeout=60) as response:
            data = _extract(spec, response, spec.tarball_url)
    if hashlib.sha256(data).hexdigest() != spec.sha256:
        raise WeightsError(f"{spec.member} of {spec.package}@{spec.version} does not match its pinned sha256")
    text = data.decode("utf-8")
    if "</script" in text.lower() or any(f"{{{p}}}" in text for p in ("plot_divs", "scripts", "refresh_tag")):
        raise WeightsError(f"{spec.package}@{spec.version} holds </script or a DVC placeholder: cannot inline")
    return f"  <script>/* {spec.package}@{spec.version} ({spec.licence}) */\n{text}\n  </script>"


def build(tarballs: dict[str, Path] | None = None, out: Path = TEMPLATE) -> Path:
    """Write the template; `tarballs` ({package: .tgz}) instead of the registry (FAR_NPM_REGISTRY for a mirror)."""
    scripts = "\n".join(_script(spec, (tarballs or {}).get(spec.package)) for spec in PACKAGES)
    versions = ", ".join(f"{s.package}@{s.version}" for s in PACKAGES)
    # {refresh_tag} and {plot_divs} stay for DVC to fill; {scripts} (DVC's CDN tags) is replaced by ours here.
    write_text(out, PAGE.replace("{versions}", versions).replace("{scripts}", scripts))
    return out


if __name__ == "__main__":
    import sys

    given = {Path(p).name.rsplit("-", 1)[0]: Path(p) for p in sys.argv[1:]}  # vega-lite-5.23.0.tgz -> vega-lite
    print(build(given or None))
