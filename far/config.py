"""params.yaml as typed config: one class per top-level section.

Every stage reads its section through `load_params`; nothing else parses params.yaml. A key's name is
the same here, in YAML and in the README. Validation is strict (unknown keys are errors) so that a typo
such as `trian:` or `train.steps: -1` stops the stage with one line naming the key path and the value.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from far.errors import InvalidInputError

DEFAULT_PARAMS = Path("params.yaml")

PositiveInt = Annotated[int, Field(gt=0)]
NonNegInt = Annotated[int, Field(ge=0)]
NonNegFloat = Annotated[float, Field(ge=0)]
Fraction = Annotated[float, Field(ge=0, le=1)]


class ParamsError(InvalidInputError):
    """A params file that cannot be used; `str(err)` is one line naming the file, key path and value."""


class Section(BaseModel):
    """Base for every params section: unknown keys are errors, values are validated on assignment."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=False)


# ----------------------------------------------------------------------------------------------- model
class TinyModelConfig(Section):
    """Sizes of the embedded Stable-Diffusion-architecture model built from code (`pretrained: tiny`)."""

    unet_channels: list[PositiveInt] = [32, 64, 64, 64]
    vae_channels: list[PositiveInt] = [16, 32, 64, 64]
    text_hidden_size: PositiveInt = 64
    text_layers: PositiveInt = 2
    attention_head_dim: PositiveInt = 8
    prediction_type: Literal["epsilon", "v_prediction"] = "epsilon"


class ModelConfig(Section):
    """The base model every later stage loads from `models/base` through `from_pretrained`."""

    pretrained: str = "tiny"  # "tiny", a Hugging Face id, or a local diffusers directory
    revision: str | None = None  # HF revision (branch, tag or commit) when `pretrained` is an id
    resolution: PositiveInt = 256  # training and sampling size in pixels (square)
    seed: int = 0
    tiny: TinyModelConfig = TinyModelConfig()

    @field_validator("resolution")
    @classmethod
    def _multiple_of_64(cls, v: int) -> int:
        if v % 64:
            raise ValueError(f"must be a multiple of 64 (the UNet halves the latent 3 times), got {v}")
        return v


# -------------------------------------------------------------------------------------------- concepts
class ConceptSpec(Section):
    """One subject to learn: its identifier token(s), class word and folder of reference images."""

    name: Annotated[str, Field(pattern=r"^[A-Za-z0-9_.-]+$")]
    token: Annotated[str, Field(min_length=1)]  # e.g. "<dog-a>" (new token) or "sks" (existing rare one)
    class_word: Annotated[str, Field(min_length=1)]  # e.g. "dog"
    images: Path

    @field_validator("images")
    @classmethod
    def _folder_exists(cls, v: Path) -> Path:
        if not v.is_dir():
            raise ValueError(f"image folder {str(v)!r} does not exist")
        return v


class ConceptsConfig(Section):
    subjects: Annotated[list[ConceptSpec], Field(min_length=1)]

    @model_validator(mode="after")
    def _unique(self) -> ConceptsConfig:
        for attr in ("name", "token"):
            seen: dict[str, int] = {}
            for i, c in enumerate(self.subjects):
                value = getattr(c, attr)
                if value in seen:
                    raise ValueError(
                        f"subjects.{i}.{attr}: {value!r} is already used by subjects.{seen[value]}"
                    )
                seen[value] = i
        return self

    def by_name(self, name: str) -> ConceptSpec:
        for c in self.subjects:
            if c.name == name:
                return c
        raise KeyError(f"no concept named {name!r}; known: {[c.name for c in self.subjects]}")


# --------------------------------------------------------------------------------------------- segment
class SegmentConfig(Section):
    backend: Literal["grabcut", "rembg", "provided", "auto"] = "grabcut"
    rembg_model: str = "u2net"  # any rembg model name
    rembg_model_path: Path | None = None  # explicit .onnx file; else where rembg keeps its models
    provided_suffix: str = "_mask.png"  # `provided`: masks next to the images, `<stem><suffix>`
    min_area: Fraction = 0.01  # below this mask area fraction the mask is flagged `empty`
    max_area: Fraction = 0.98  # above it, `full`
    on_bad_image: Literal["error", "skip"] = "error"


# ---------------------------------------------------------------------------------------------- priors
class PriorsConfig(Section):
    per_class: NonNegInt = 8  # class-prior images generated per distinct class word
    prompt: str = "a photo of a {class_word}"
    num_inference_steps: PositiveInt = 10
    guidance_scale: NonNegFloat = 5.0
    batch_size: PositiveInt = 4
    seed: int = 1


# ---------------------------------------------------------------------------------------------- fusion
class FusionConfig(Section):
    seed: int = 2
    num_single: NonNegInt = 32  # single subjects re-composed on new backgrounds
    num_multi: NonNegInt = 48  # composites of 2..K subjects
    include_references: bool = True
    include_priors: bool = True
    row_group_size: PositiveInt = 64


# ----------------------------------------------------------------------------------------------- train
class RefineConfig(Section):
    """Localized Refinement: cross-attention of each concept's tokens vs. that concept's mask."""

    weight: NonNegFloat = 0.1
    exclusivity_weight: NonNegFloat = 0.0


class TrainConfig(Section):
    seed: int = 3
    steps: NonNegInt = 200
    batch_size: PositiveInt = 2
    learning_rate: Annotated[float, Field(gt=0)] = 1e-4
    modules: Literal["crossattn_kv", "crossattn", "lora", "unet"] = "crossattn_kv"
    train_token_embeddings: bool = True
    prior_weight: NonNegFloat = 1.0
    checkpoint_every: PositiveInt = 50
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    refine: RefineConfig = RefineConfig()


# ---------------------------------------------------------------------------------------------- sample
class SampleConfig(Section):
    seeds: Annotated[list[int], Field(min_length=1)] = [0, 1]
    num_inference_steps: PositiveInt = 20
    guidance_scale: NonNegFloat = 6.0
    batch_size: PositiveInt = 4
    negative_prompt: str = ""


# ------------------------------------------------------------------------------------------------ eval
class EvalConfig(Section):
    clip_model: str = "tiny"  # "tiny" (offline, built from code) or a clip-anytorch name / checkpoint path
    dino_model: str = "tiny"  # "tiny" or an HF id / local dir of a DINO ViT (e.g. facebook/dino-vits16)
    batch_size: PositiveInt = 16


# ---------------------------------------------------------------------------------------------- report
class ReportConfig(Section):
    max_samples_per_prompt: PositiveInt = 4
    fusion_preview: NonNegInt = 16


class Params(Section):
    model: ModelConfig = ModelConfig()
    concepts: ConceptsConfig
    segment: SegmentConfig = SegmentConfig()
    priors: PriorsConfig = PriorsConfig()
    fusion: FusionConfig = FusionConfig()
    train: TrainConfig = TrainConfig()
    sample: SampleConfig = SampleConfig()
    eval: EvalConfig = EvalConfig()
    report: ReportConfig = ReportConfig()


SECTIONS: tuple[str, ...] = tuple(Params.model_fields)


def _key_path(loc: tuple[Any, ...]) -> str:
    return ".".join(str(p) for p in loc) or "<root>"


def _lookup(raw: Any, loc: tuple[Any, ...]) -> Any:
    node = raw
    for part in loc:
        try:
            node = node[part]
        except (KeyError, IndexError, TypeError):
            return None
    return node


def _describe(err: dict[str, Any], raw: Any) -> str:
    loc = tuple(err["loc"])
    path = _key_path(loc)
    if err["type"] == "extra_forbidden":
        known = _known_keys(loc[:-1])
        hint = difflib.get_close_matches(str(loc[-1]), known, n=1)
        suggestion = f" (did you mean {'.'.join([*map(str, loc[:-1]), hint[0]])!r}?)" if hint else ""
        return f"unknown key {path!r}{suggestion}"
    if err["type"] == "missing":
        return f"missing key {path!r}"
    value = _lookup(raw, loc)
    msg = err["msg"].removeprefix("Value error, ")
    return f"{path}: {value!r} is invalid: {msg}"


def _known_keys(loc: tuple[Any, ...]) -> list[str]:
    """Field names of the config class reached by following `loc` from `Params`."""
    model: Any = Params
    for part in loc:
        if isinstance(part, int):
            continue
        field = getattr(model, "model_fields", {}).get(part)
        if field is None:
            return []
        annotation = field.annotation
        args = getattr(annotation, "__args__", ())
        model = next((a for a in (annotation, *args) if hasattr(a, "model_fields")), None)
        if model is None:
            return []
    return list(getattr(model, "model_fields", {}))


def load_params(path: Path | str = DEFAULT_PARAMS) -> Params:
    """Read and validate a params file.

    Raises ParamsError with one line, `<file>: <key path>: <value> is invalid: <why>`, on the first
    problem (further problems follow on the same line, separated by `; `).
    """
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ParamsError(f"{path}: params file not found") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise ParamsError(f"{path}:{where}: not valid YAML ({getattr(exc, 'problem', exc)})") from None
    if not isinstance(raw, dict):
        raise ParamsError(f"{path}: expected a mapping of sections {list(SECTIONS)}, got {type(raw).__name__}")
    try:
        return Params.model_validate(raw)
    except ValidationError as exc:
        problems = [_describe(e, raw) for e in exc.errors()]
        raise ParamsError(f"{path}: " + "; ".join(problems)) from None


def dump_resolved(params: Params) -> dict[str, Any]:
    """The fully resolved config (defaults filled in) as plain YAML-able data, saved beside outputs."""
    return params.model_dump(mode="json")
