"""Evaluation prompts: DreamBench's single-subject prompt lists, and our multi-concept templates.

Single concepts use the prompt lists of the DreamBooth dataset (DreamBench, CC-BY-4.0, copy shipped in
`far/resources/`): 25 "object" prompts and 25 "live subject" prompts, each `'a {0} {1} ...'.format(
unique_token, class_token)`. As DreamBooth does, live subjects (the dogs and cats of DreamBench) get the
live-subject list (outfits, hats) and everything else the object list.

Multi-concept prompts name two or more concepts in one scene ("a <c1> dog and a <c2> dog playing in the
park"). DreamBench has none; the templates below are ours, written in the same style (the same scenes
where they make sense for several subjects). Choices the paper leaves open, ours:
- how many prompts per concept (`sample.prompts_per_concept`): taken evenly spaced through the list so a
  small subset still mixes backgrounds, outfits and property changes instead of only the first scenes;
- which concept groups (`sample.multi_max_concepts`): every combination of 2..max concepts.

`sample.prompt_set: world` replaces both lists by the world's prompts (`world_prompts`), in the world's
caption phrases (far/world/vocab.py): each concept alone on every background ("a <tok> dog on the beach"),
each ordered pair on every background ("a <a> dog and a <b> dog on the grass", both orders) and the plain
class ("a dog", "a dog in the snow", kind `class`, no concept) for prior drift. With two world concepts and
the world's 5 backgrounds: 10 single, 10 multi and 6 class prompts.

`sample.prompt_set: world-tune` is the set any tuning of training params reads, kept apart from the evaluation
set: every world evaluation prompt but "a dog" names a background, and no tuning prompt names one ("a <a> dog",
"a <a> dog and a <b> dog", both orders). It measures identity, both / leakage / duplicates, never backgrounds
(memorisation is not tuned on). With two concepts: 2 single and 2 multi prompts.
"""

from __future__ import annotations

import ast
import itertools
import re
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

from far.config import ConceptsConfig, SampleConfig
from far.errors import InvalidInputError

DREAMBENCH_PROMPTS = Path(__file__).parent / "resources" / "dreambench_prompts_and_classes.txt"

# Ours (DreamBench has no multi-subject prompts); `{subjects}` becomes "a <t1> dog and a <t2> dog".
MULTI_TEMPLATES: tuple[str, ...] = (
    "{subjects} in the snow",
    "{subjects} on the beach",
    "{subjects} playing in the park",
    "{subjects} sitting on a sofa",
    "{subjects} on a cobblestone street",
    "{subjects} with a city in the background",
    "{subjects} on top of a wooden floor",
    "{subjects} in the jungle",
    "{subjects} with a mountain in the background",
    "{subjects} on top of a purple rug in a forest",
)


@dataclass(frozen=True)
class DreamBenchPrompts:
    """The parsed prompt file: subject -> class, and the two template lists (`{0}` token, `{1}` class)."""

    classes: dict[str, str]
    object_prompts: tuple[str, ...]
    live_prompts: tuple[str, ...]


@dataclass(frozen=True)
class PromptSpec:
    """One prompt to sample: its text, the concepts it names (in order) and where it came from."""

    index: int
    prompt: str
    concepts: tuple[str, ...]
    kind: str  # "single" (one concept) | "multi" (several) | "class" (none: the plain class word)
    template: str = field(compare=False)
    background: str | None = None  # the world background the prompt asks for (far/world/vocab.py); None: none asked


_SECTION = re.compile(r"^(Object Prompts|Live Subject Prompts)\s*$", re.MULTILINE)
_TEMPLATE = re.compile(r"""('(?:[^'\\]|\\.)*'|"(?:[^"\\]|\\.)*")\s*\.format\(\s*unique_token\s*,\s*class_token\s*\)""")


def parse_dreambench(text: str, source: str = "prompts_and_classes.txt") -> DreamBenchPrompts:
    """Parse DreamBench's `prompts_and_classes.txt` (a CSV of classes, then two Python-ish prompt lists).

    Raises InvalidInputError naming `source` when a part is missing.
    """
    classes: dict[str, str] = {}
    head = text.split("Prompts", 1)[0]
    for line in head.splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) == 2 and all(parts) and parts[0] != "subject_name":
            classes[parts[0]] = parts[1]
    sections = list(_SECTION.finditer(text))
    found = {m.group(1): m for m in sections}
    lists: dict[str, tuple[str, ...]] = {}
    for i, m in enumerate(sections):
        end = sections[i + 1].start() if i + 1 < len(sections) else len(text)
        templates = [ast.literal_eval(t) for t in _TEMPLATE.findall(text[m.end() : end])]
        lists[m.group(1)] = tuple(t.replace("{0}", "{token}").replace("{1}", "{class_word}") for t in templates)
    for name in ("Object Prompts", "Live Subject Prompts"):
        if name not in found or not lists.get(name):
            raise InvalidInputError(f"{source}: no '{name}' prompt list found")
    if not classes:
        raise InvalidInputError(f"{source}: no 'subject_name,class' table found")
    return DreamBenchPrompts(classes, lists["Object Prompts"], lists["Live Subject Prompts"])


@lru_cache(maxsize=1)
def dreambench() -> DreamBenchPrompts:
    """The shipped DreamBench prompt lists."""
    return parse_dreambench(DREAMBENCH_PROMPTS.read_text(), str(DREAMBENCH_PROMPTS))


def evenly_spaced(items: tuple[str, ...], k: int, key: str) -> list[str]:
    """`k` items, the centres of `k` equal slices of the list (all of them, in order, when k == len).

    `key` names the param in the error when `k` is larger than the list.
    """
    if k > len(items):
        raise InvalidInputError(f"params.yaml: {key}: {k} is invalid: only {len(items)} prompts are available")
    return [items[(2 * i + 1) * len(items) // (2 * k)] for i in range(k)]


def subject_phrase(token: str, class_word: str) -> str:
    """How a concept is named in a prompt, as in DreamBench: 'a <token> <class>'."""
    return f"a {token} {class_word}"


def join_subjects(phrases: list[str]) -> str:
    """'A and B', 'A, B and C'."""
    return phrases[0] if len(phrases) == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]


def build_prompts(
    concepts: list[tuple[str, str, str]],
    prompts_per_concept: int,
    multi_prompts: int,
    multi_max_concepts: int,
    live_classes: list[str],
) -> list[PromptSpec]:
    """All prompts of a run, single-concept first (concept order), then each concept group's.

    `concepts`: (name, token, class_word) triples, in params order. The result is a pure function of its
    arguments, so prompt indices (and file names derived from them) are stable across runs.
    """
    bench = dreambench()
    specs: list[PromptSpec] = []
    for name, token, class_word in concepts:
        live = class_word.lower() in {c.lower() for c in live_classes}
        pool = bench.live_prompts if live else bench.object_prompts
        for template in evenly_spaced(pool, prompts_per_concept, "sample.prompts_per_concept"):
            text = template.format(token=token, class_word=class_word)
            specs.append(PromptSpec(len(specs), text, (name,), "single", template))
    for size in range(2, min(multi_max_concepts, len(concepts)) + 1):
        for group in itertools.combinations(concepts, size):
            subjects = join_subjects([subject_phrase(token, cw) for _, token, cw in group])
            for template in evenly_spaced(MULTI_TEMPLATES, multi_prompts, "sample.multi_prompts"):
                text = template.format(subjects=subjects)
                specs.append(PromptSpec(len(specs), text, tuple(n for n, _, _ in group), "multi", template))
    return specs


def world_prompts(concepts: list[tuple[str, str, str]], classes: dict[str, str],
                  tuning: bool = False) -> list[PromptSpec]:
    """The world's prompts: single (each concept on each background), multi (each ordered pair on each
    background) and class (the plain class word alone and on each background), in that order. `tuning`: the
    tuning set instead (each concept and each ordered pair with no background; no class prompts).

    `concepts`: (name, token, class_word) triples in params order; `classes`: each concept's class in its
    world.json, which must be its class word (the word the delta was trained with).
    """
    from far.world.vocab import BACKGROUND_PHRASES, BACKGROUNDS

    for name, _, class_word in concepts:
        if classes[name] != class_word:
            raise InvalidInputError(f"concepts: {name} has class_word {class_word!r} but its world.json says "
                                    f"{classes[name]!r}; use the world class")
    specs: list[PromptSpec] = []
    backgrounds = (None,) if tuning else BACKGROUNDS

    def add(subjects: str, names: tuple[str, ...], kind: str, background: str | None) -> None:
        template = subjects + (" {background}" if background else "")
        text = template.format(background=BACKGROUND_PHRASES[background]) if background else subjects
        specs.append(PromptSpec(len(specs), text, names, kind, template, background))

    for name, token, class_word in concepts:
        for bg in backgrounds:
            add(subject_phrase(token, class_word), (name,), "single", bg)
    for group in itertools.permutations(concepts, 2):
        for bg in backgrounds:
            names = tuple(n for n, _, _ in group)
            add(join_subjects([subject_phrase(t, cw) for _, t, cw in group]), names, "multi", bg)
    if tuning:
        return specs
    for class_word in dict.fromkeys(cw for _, _, cw in concepts):
        for bg in (None, *BACKGROUNDS):
            add(f"a {class_word}", (), "class", bg)
    return specs


def prompts_for(cfg: SampleConfig, concepts: ConceptsConfig) -> list[PromptSpec]:
    """The prompts `sample.prompt_set` names for these concepts (world: from each concept folder's world.json)."""
    triples = [(c.name, c.token, c.class_word) for c in concepts.subjects]
    if cfg.prompt_set in ("world", "world-tune"):
        from far.world.concepts import world_truths

        truths = world_truths(concepts.subjects, required=True)
        return world_prompts(triples, {n: t.cls for n, t in truths.items()}, tuning=cfg.prompt_set == "world-tune")
    return build_prompts(triples, cfg.prompts_per_concept, cfg.multi_prompts, cfg.multi_max_concepts,
                         cfg.live_classes)
