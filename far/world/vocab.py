"""The world's vocabulary: subject classes with one named part each, colours, patterns, backgrounds.

Everything the renderer draws, the captions say and the oracle reads is an index into these tuples, so a
scene's ground truth is a handful of small integers. Colours are saturated and far apart (and far from
every background's own colours) so that a 4x VAE round trip and a tiny diffusion model keep them apart.
"""

from __future__ import annotations

CLASSES: tuple[str, ...] = ("dog", "cat", "car", "cup")
PART_NAMES: dict[str, str] = {"dog": "ears", "cat": "ears", "car": "wheels", "cup": "handle"}

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (205, 35, 35),
    "orange": (245, 140, 25),
    "yellow": (240, 220, 40),
    "blue": (35, 75, 215),
    "purple": (135, 50, 185),
    "pink": (250, 125, 190),
}
COLOUR_NAMES: tuple[str, ...] = tuple(COLOURS)

# The pattern is drawn in the part colour on the body ("a spotted red dog with blue ears": blue spots).
PATTERNS: tuple[str, ...] = ("plain", "spots", "stripes")
PATTERN_ADJECTIVES: dict[str, str] = {"plain": "", "spots": "spotted", "stripes": "striped"}

BACKGROUNDS: tuple[str, ...] = ("grass", "beach", "snow", "room", "night")
BACKGROUND_PHRASES: dict[str, str] = {
    "grass": "on the grass",
    "beach": "on the beach",
    "snow": "in the snow",
    "room": "in a room",
    "night": "at night",
}

MAX_SUBJECTS = 3
