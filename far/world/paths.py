"""Where the world's shipped weights live (issue 12): written once, read by base_model, evaluate and the tests."""

from __future__ import annotations

from pathlib import Path

WEIGHTS = Path(__file__).parent / "weights"
BASE = WEIGHTS / "base"  # a diffusers StableDiffusionPipeline directory (`model.pretrained: world`)
ORACLE = WEIGHTS / "oracle.safetensors"  # far/world/oracle.py (`eval.oracle: world`)
CLIP = WEIGHTS / "clip.pt"  # far/world/clip.py, read by clip.load (`eval.clip_model: world`)
MANIFEST = WEIGHTS / "MANIFEST.json"  # sha256 of every file above, and the command that made it
