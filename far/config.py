"""params.yaml as typed config: one class per top-level section.

Every stage reads its section through `load_params`; nothing else parses params.yaml. A key's name is
the same here, in YAML and in the README. Validation is strict (unknown keys are errors) so that a typo
such as `trian:` or `train.steps: -1` stops the stage with one line naming the key path and the value.
"""

from __future__ import annotations

import difflib
import re
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
    # diffusers reads this UNet key as the number of heads (not their width): 1 head per layer, 32 dims at 32 channels
    # and 64 at 64 (SD 2.1's width). 8 heads of 4 dims made a training step 1.8x slower (bench/attention_layout.py).
    attention_head_dim: PositiveInt = 1
    prediction_type: Literal["epsilon", "v_prediction"] = "epsilon"


class ModelConfig(Section):
    """The base model every later stage loads from `models/base` through `from_pretrained`."""

    # "tiny" (random, built from code), "world" (the shipped world model, far/world/weights, 64 px, hash-checked),
    # a Hugging Face id, or a local diffusers directory
    pretrained: str = "tiny"
    revision: str | None = None  # HF revision (branch, tag or commit) when `pretrained` is an id
    resolution: PositiveInt = 256  # training and sampling size in pixels (square)
    seed: int = 0
    tiny: TinyModelConfig = TinyModelConfig()

    @model_validator(mode="after")
    def _resolution_suits_the_tiny_model(self) -> ModelConfig:
        # Only the tiny model is known here; any other is checked when loaded (far.models.check_resolution).
        if self.pretrained == "tiny":
            vae, halvings = 2 ** (len(self.tiny.vae_channels) - 1), len(self.tiny.unet_channels) - 1
            if self.resolution % (vae * 2**halvings):
                raise ValueError(
                    f"resolution: {self.resolution} is invalid: must be a multiple of {vae * 2**halvings} (the tiny "
                    f"VAE downsamples {vae}x and its UNet halves the latent {halvings} times)"
                )
        return self


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
    """Subject masks for reference (and prior) images; backends in far/segment.py, loading in far/images.py."""

    backend: Literal["grabcut", "rembg", "provided", "auto"] = "auto"  # auto: rembg if its model is here
    rembg_model: Annotated[str, Field(min_length=1)] = "u2netp"  # any rembg model name; `far weights` installs u2netp
    rembg_model_path: Path | None = None  # explicit `<rembg_model>.onnx`; else where rembg keeps its models
    provided_suffix: str = "_mask.png"  # `provided`: masks next to the images, `<stem><suffix>`
    min_area: Fraction = 0.01  # below this mask area fraction the mask is flagged `empty`
    max_area: Fraction = 0.98  # above it, `full`
    on_bad_image: Literal["error", "skip"] = "error"  # corrupt/non-image/tiny/duplicate reference files
    cosegment: bool = True  # grabcut: segment a concept's photos together (shared subject colours, far/cosegment.py)


# ---------------------------------------------------------------------------------------------- priors
class PriorsConfig(Section):
    """Class-prior images generated by the base model, then segmented with the `segment` backend."""

    per_class: NonNegInt = 8  # class-prior images generated per distinct class word
    prompt: str = "a photo of a {class_word}"
    num_inference_steps: PositiveInt = 10
    guidance_scale: NonNegFloat = 5.0
    batch_size: PositiveInt = 4  # images per pipeline call; the images do not depend on it (per-image seeds)
    seed: NonNegInt = 1

    @field_validator("prompt")
    @classmethod
    def _has_class_word(cls, v: str) -> str:
        if "{class_word}" not in v:
            raise ValueError("must contain '{class_word}'")
        return v


# ---------------------------------------------------------------------------------------------- fusion
def _ordered_range(v: tuple[float, float]) -> tuple[float, float]:
    if not 0 < v[0] <= v[1] <= 1:
        raise ValueError(f"must be [low, high] with 0 < low <= high <= 1, got {list(v)}")
    return v


PlateKind = Literal["plain", "gradient", "noise", "world"]  # far/composite.py plate()


class BackgroundMix(Section):
    """Relative weights of the background sources of `single` and `fusion` composites (0 disables one)."""

    reference: NonNegFloat = 1.0  # a reference photo with its subject inpainted away
    prior: NonNegFloat = 1.0  # a class-prior image with its object inpainted away
    plate: NonNegFloat = 1.0  # a procedural plate, one of `fusion.plates`

    @model_validator(mode="after")
    def _some(self) -> BackgroundMix:
        if self.reference + self.prior + self.plate <= 0:
            raise ValueError("at least one background weight must be > 0")
        return self


class FusionConfig(Section):
    """Concept Fusion: how the training set is composed (kinds and counts, augmentation, prompts, encoding)."""

    seed: NonNegInt = 2
    num_single: NonNegInt = 32  # single subjects re-composed on new backgrounds
    num_multi: NonNegInt = 48  # composites of 2..K subjects
    include_references: bool = True  # every reference photo as it is (square crop around the subject)
    include_priors: bool = True  # every class-prior image, prompt = its generation prompt
    max_concepts: Annotated[int, Field(ge=2)] = 3  # K: a composite holds 2..min(K, #concepts) subjects
    single_scale: tuple[float, float] = (0.45, 0.85)  # subject's longer bbox side / output side
    multi_scale: tuple[float, float] = (0.3, 0.6)
    max_overlap: Fraction = 0.3  # most of a subject's mask that subjects above it may hide
    placement_tries: PositiveInt = 20
    flip: Fraction = 0.5  # probability of a horizontal flip
    rotate: Annotated[float, Field(ge=0, le=180)] = 10.0  # degrees, uniform in [-rotate, rotate]
    scale_jitter: Annotated[float, Field(ge=0, lt=1)] = 0.1  # albumentations Affine scale in 1 +- this
    colour: Fraction = 0.1  # brightness/contrast/saturation jitter; hue is left alone (it is identity)
    feather: NonNegFloat = 0.006  # soft-edge width as a fraction of the output side (0: hard edges)
    inpaint_dilate: Fraction = 0.02  # hole growth around the subject before inpainting, of the shorter side
    background_zoom: Annotated[float, Field(gt=0, le=1)] = 0.75  # backgrounds are random crops of >= this side
    backgrounds: BackgroundMix = BackgroundMix()
    plates: Annotated[list[PlateKind], Field(min_length=1)] = ["plain", "gradient", "noise"]
    templates: Annotated[list[str], Field(min_length=1)] = [
        "a photo of {subjects}",
        "a picture of {subjects}",
        "a close-up photo of {subjects}",
        "a rendition of {subjects}",
        "a photo of {subjects} in a scene",
    ]
    image_format: Literal["jpeg", "png"] = "jpeg"  # masks are always PNG
    jpeg_quality: Annotated[int, Field(ge=1, le=100)] = 95
    row_group_size: PositiveInt = 64
    workers: NonNegInt = 2  # processes composing examples (0 or 1: in-process); the output does not depend on it
    preview: NonNegInt = 16  # examples in data/fusion/preview.png

    _scale_range = field_validator("single_scale", "multi_scale")(_ordered_range)

    @field_validator("templates")
    @classmethod
    def _templates(cls, v: list[str]) -> list[str]:
        for t in v:
            if t.count("{subjects}") != 1:
                raise ValueError(f"template {t!r} must contain '{{subjects}}' exactly once")
        return v


# ----------------------------------------------------------------------------------------------- train
class RefineConfig(Section):
    """Localized Refinement: cross-attention of each concept's tokens vs. that concept's mask.

    `weight` 0 turns the loss off (the maps are then computed only on logging steps, for the score).
    """

    weight: NonNegFloat = 0.1
    exclusivity_weight: NonNegFloat = 0.0  # penalty on a concept's attention inside the other concepts' masks
    # Attention maps used, as image pixels per map cell: 32 -> the 16x16 layers at 512 px (8x8 at 256 px).
    downscale: Annotated[list[PositiveInt], Field(min_length=1)] = [32]
    blocks: Literal["all", "down", "mid", "up"] = "all"  # which UNet blocks at those resolutions
    normalize: Literal["max", "sum", "none"] = "max"  # A/max(A) (DESIGN.md); A/sum(A) vs M/sum(M); raw A vs M


class TrainConfig(Section):
    seed: int = 3
    steps: NonNegInt = 200  # optimizer updates (each over batch_size * gradient_accumulation rows per process)
    batch_size: PositiveInt = 2  # rows per process per micro-batch
    gradient_accumulation: PositiveInt = 1
    learning_rate: Annotated[float, Field(gt=0)] = 1e-4
    # The identifier rows' own rate (null: learning_rate). Textual inversion trains a token at ~10x the rate a
    # UNet fine-tune can take without being damaged; Custom Diffusion uses one rate for both.
    token_learning_rate: Annotated[float, Field(gt=0)] | None = None
    lr_warmup_steps: NonNegInt = 0  # linear warm-up, then constant
    weight_decay: NonNegFloat = 1e-2  # AdamW, UNet parameters only (never the token embeddings)
    max_grad_norm: NonNegFloat = 1.0  # 0 = no clipping
    modules: Literal["crossattn_kv", "crossattn", "lora", "unet"] = "crossattn_kv"
    lora_rank: PositiveInt = 4  # `modules: lora` only; lora_alpha = rank (scale 1)
    train_token_embeddings: bool = True
    prior_weight: NonNegFloat = 1.0
    # Prior rows per instance row in every micro-batch (DreamBooth: 1, one class image per instance image);
    # the rows are dealt in this fixed ratio, so prior_weight is the prior term's real weight. 0: no prior rows.
    prior_ratio: NonNegFloat = 1.0
    masked_loss: bool = False  # diffusion loss only inside the union of the concept masks (rows with masks)
    latent: Literal["mean", "sample"] = "mean"  # cached VAE latent: posterior mean, or one seeded sample per row
    gradient_checkpointing: bool = False
    checkpoint_every: PositiveInt = 50
    keep_checkpoints: PositiveInt = 2
    log_every: PositiveInt = 10
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    refine: RefineConfig = RefineConfig()


# ---------------------------------------------------------------------------------------------- sample
class SampleConfig(Section):
    """Evaluation images: DreamBench prompts per concept, multi-concept prompts, fixed seeds (far/sample.py)."""

    # dreambench: DreamBench + our multi-concept templates; world: the world's prompts (far/prompts.py
    # world_prompts; every concept folder needs a world.json; the four counts below are then unused)
    # world-tune: the world's tuning prompts (no background named; what tuning reads instead of the evaluation set)
    prompt_set: Literal["dreambench", "world", "world-tune"] = "dreambench"
    seeds: Annotated[list[int], Field(min_length=1)] = [0, 1]  # one image per prompt and seed
    num_inference_steps: PositiveInt = 20
    guidance_scale: NonNegFloat = 6.0  # classifier-free guidance is off at <= 1, as in diffusers
    batch_size: PositiveInt = 4  # images per UNet batch (x2 with guidance)
    negative_prompt: str = ""  # passed to the pipeline as `negative_prompt`; "" = diffusers' default
    scheduler: Literal["default", "ddim", "dpm_solver", "euler", "euler_ancestral", "pndm"] = "default"
    prompts_per_concept: PositiveInt = 2  # DreamBench prompts per concept (of 25), evenly spaced
    multi_prompts: NonNegInt = 2  # multi-concept templates per group of concepts (of 10)
    multi_max_concepts: Annotated[int, Field(ge=2)] = 2  # groups of 2..this many concepts
    live_classes: list[str] = ["dog", "cat"]  # DreamBench's live subjects get its live-subject prompts
    # Attention maps kept, as image pixels per map cell (like train.refine.downscale): 32 -> the 16x16
    # layers at 512 px (8x8 at 256 px); several values are averaged at the finest one's size.
    attention_downscale: Annotated[list[PositiveInt], Field(min_length=1)] = [32]


# ------------------------------------------------------------------------------------------------ eval
class EvalConfig(Section):
    """CLIP-T / CLIP-I / DINO, multi-concept identity and attention leakage (far/metrics.py, far/identity.py)."""

    # "tiny" (offline, built from code), "world" (far/world/weights/clip.pt), a clip-anytorch name or checkpoint path
    clip_model: str = "tiny"
    dino_model: str = "tiny"  # "tiny" or an HF id / local dir of a DINO ViT (e.g. facebook/dino-vits16)
    batch_size: PositiveInt = 16  # images per backbone forward pass
    tiny_seed: int = 0  # seed of the tiny backbones (ignored for real ones)
    device: Annotated[str, Field(pattern=r"^(auto|cpu|cuda(:\d+)?)$")] = "auto"  # auto = cuda if available
    subject_finder: Literal["segment", "owlv2", "oracle"] = "segment"  # from pixels only (far/subjects.py)
    detector_model: str = "google/owlv2-base-patch16-ensemble"  # subject_finder owlv2: HF id or local directory
    detector_threshold: Fraction = 0.1  # subject_finder owlv2: lowest box score kept
    min_subject_area: Fraction = 0.01  # subject_finder segment: smaller foreground components are dropped
    crop_padding: Fraction = 0.1  # identity crops: bbox grown by this fraction of its side on each side
    # attn_* diagnostics only (they read the attention maps that training optimises):
    regions: Literal["attention", "segment"] = "attention"  # a concept's region: its map, or the foreground split
    region_threshold: Annotated[float, Field(gt=0, lt=1)] = 0.5  # region = its min-max-scaled map >= this
    # The world verdict (far/world/verdict.py): auto = when every concept folder has a world.json
    world: bool | Literal["auto"] = "auto"
    oracle: str = "world"  # world (the shipped far/world/weights/oracle.safetensors) or an oracle safetensors path


# ---------------------------------------------------------------------------------------------- report
class ReportConfig(Section):
    """reports/index.html: one static page, every asset local (far/report.py)."""

    max_samples_per_prompt: PositiveInt = 4  # seeds shown per prompt
    fusion_preview: NonNegInt = 16  # fused training examples shown
    thumbnail_size: Annotated[int, Field(ge=32)] = 256  # px, longest side of every image in the page
    overlay_alpha: Fraction = 0.6  # opacity of the attention heat map over the sample
    experiments: bool = True  # add every DVC experiment's metrics (`dvc exp show --json`) when available


# ----------------------------------------------------------------------------------------- orchestrate
class StageRetryConfig(Section):
    """Per-stage override of the retry policy; an unset field keeps the section-wide value."""

    retries: NonNegInt | None = None
    retry_delay: NonNegFloat | None = None


class OrchestrateConfig(Section):
    """Prefect orchestration (pipelines/): schedule, retries, GPU tag, shared DVC remote, ablation queue.

    No DVC stage reads this section, so changing it never makes a stage stale.
    """

    cron: str = "0 3 * * *"  # `python -m pipelines.serve`: when the pipeline flow re-runs (cron syntax)
    timezone: str = "UTC"  # IANA name the cron is read in
    retries: NonNegInt = 2  # retries of a stage that failed transiently (exit code != 2)
    retry_delay: NonNegFloat = 30.0  # seconds before the first retry; doubled for every further one
    stages: dict[str, StageRetryConfig] = {}  # per-stage overrides, e.g. {train: {retries: 1}}
    gpu_stages: list[str] = ["priors", "train", "sample", "evaluate"]  # their tasks carry `gpu_tag`
    gpu_tag: str = "gpu"  # Prefect tag with a concurrency limit (`prefect concurrency-limit create gpu 1`)
    remote: str | None = None  # DVC remote URL or directory shared by workers; null = no pull/push
    ablations: Path = Path("ablations.yaml")  # the variant grid of the `ablation` flow
    queue_jobs: PositiveInt = 1  # `dvc queue start -j`: experiments run at once (one per GPU)
    queue_timeout: Annotated[float, Field(gt=0)] = 24 * 3600.0  # seconds the ablation flow waits for the queue

    @field_validator("cron")
    @classmethod
    def _cron(cls, v: str) -> str:
        from datetime import datetime

        from cronsim import CronSim, CronSimError  # ships with prefect; small

        try:
            CronSim(v, datetime(2000, 1, 1))
        except CronSimError as exc:
            raise ValueError(f"not a cron expression ({exc})") from None
        return v

    @field_validator("timezone")
    @classmethod
    def _timezone(cls, v: str) -> str:
        from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

        try:
            ZoneInfo(v)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError("not an IANA time zone name (e.g. UTC, Europe/Berlin)") from None
        return v

    def retry_policy(self, stage: str) -> tuple[int, list[float]]:
        """(retries, delays in seconds) for `stage`: exponential backoff, delay * 2**i before retry i+1."""
        override = self.stages.get(stage, StageRetryConfig())
        retries = self.retries if override.retries is None else override.retries
        delay = self.retry_delay if override.retry_delay is None else override.retry_delay
        return retries, [delay * 2**i for i in range(retries)]


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
    orchestrate: OrchestrateConfig = OrchestrateConfig()


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
    if isinstance(value, dict):  # a section's own validator: its message starts with the key path inside it
        return f"{path}.{msg}" if msg.split(":", 1)[0].split(".", 1)[0] in value else f"{path}: {msg}"
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


class Yaml12Loader(yaml.SafeLoader):
    """YAML 1.2 booleans: only true/false. `dvc exp run -S` rewrites params.yaml as YAML 1.2, which writes
    the string "no" unquoted; PyYAML's YAML 1.1 default would read it back as False."""


Yaml12Loader.yaml_implicit_resolvers = {
    first: [r for r in resolvers if r[0] != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
Yaml12Loader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
)


def load_params(path: Path | str = DEFAULT_PARAMS) -> Params:
    """Read and validate a params file.

    Raises ParamsError with one line, `<file>: <key path>: <value> is invalid: <why>`, on the first
    problem (further problems follow on the same line, separated by `; `).
    """
    path = Path(path)
    try:
        raw = yaml.load(path.read_text(), Loader=Yaml12Loader)  # noqa: S506 - a SafeLoader subclass
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
