"""far: Fuse-and-Refine multi-concept personalization of Stable Diffusion.

`far.load(pipe, "models/far")` applies a trained delta to a StableDiffusionPipeline (see far.delta.load).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


def load(pipe: Any, path: str | Path) -> dict[str, Any]:
    """Apply the far delta in `path` to `pipe` in place; returns its far_delta.json record."""
    from far.delta import load as _load  # torch/diffusers only when used: `import far` stays light

    return _load(pipe, path)


__all__ = ["load"]
