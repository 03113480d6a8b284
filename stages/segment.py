"""DVC stage `segment`: cut every concept's reference subjects out -> masks, RGBA cut-outs, manifest.parquet.

Stage mode (dvc.yaml): `python -m stages.segment --out data/segmented`. Standalone mode, when image files or
folders are given: `far segment IMAGE_OR_DIR... --out DIR [--backend NAME]` writes `DIR/<stem>.png` (RGB),
`<stem>_mask.png` (binary mask) and `<stem>_cutout.png` (RGBA) per image, as the stage names them.
"""

from __future__ import annotations

from pathlib import Path

import typer

from far.config import DEFAULT_PARAMS, SegmentConfig, load_params
from stages import run_stage


def main(
    inputs: list[Path] = typer.Argument(None, help="Standalone mode: images or folders of images to segment."),
    out: Path = typer.Option(..., help="Output directory (stage: data/segmented)."),
    params: Path = typer.Option(DEFAULT_PARAMS, help="params.yaml (sections concepts, segment)."),
    backend: str = typer.Option(None, help="Override segment.backend: grabcut | rembg | provided | auto."),
) -> None:
    """Segment reference images (stage), or any images given as arguments (standalone)."""
    if inputs:
        # Standalone: params are optional (defaults when the file is absent); concepts are not needed.
        cfg = load_params(params).segment if Path(params).is_file() else SegmentConfig()
        from far.segment import segment_files

        records = segment_files(list(inputs), out, cfg, backend)
        flagged = sum(r["quality"] != "ok" for r in records)
        print(f"segment: {len(records)} images -> {out} ({records[0]['backend']}; {flagged} flagged)")
        return
    p = load_params(params)
    cfg = p.segment if backend is None else p.segment.model_copy(update={"backend": backend})
    from far.segment import segment_concepts

    rows = segment_concepts(p.concepts, cfg, out)
    flagged = sum(r["quality"] != "ok" for r in rows)
    print(f"segment: {len(rows)} reference images of {len(p.concepts.subjects)} concepts -> {out} "
          f"({rows[0]['backend']}; {flagged} flagged)")


if __name__ == "__main__":
    run_stage(main)
