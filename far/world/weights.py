"""The world's shipped weights (far/world/weights/): written by `far world export`, verified before every use.

The folder holds `base/` (the pretrained world model as a diffusers directory, unet/vae/text_encoder in fp16
safetensors to stay a few MB), `oracle.safetensors`, `clip.pt` and `MANIFEST.json`: the sha256 and size of
every file, and how each model was made (command, seed, steps, wall time, machine, date). Nothing is read
from the folder before its hashes are checked: a missing, truncated or altered file is one
`WorldWeightsError` naming the file, the expected and the found sha256, and the command that remakes it.

Provenance comes from JSON records (`run_record` writes one): for the base model the snapshot's own
`far_world_pretrain.json` (written by far/world/pretrain.py), for the oracle and the CLIP a `<file>.json`
beside the weights, each overridable with `--base-record`, `--oracle-record`, `--clip-record`.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import shlex
import shutil
from pathlib import Path
from typing import Any

import torch

from far.errors import InvalidInputError
from far.io import atomic_dir, file_sha256, write_json
from far.world import paths

FORMAT = 1
PROVENANCE = ("command", "seed", "steps", "wall_time_s", "machine")  # what every component's record must say
PRETRAIN_RECORD = "far_world_pretrain.json"  # inside a pretrain snapshot (far/world/pretrain.py)
COMPONENTS = ("unet", "vae", "text_encoder")  # stored in fp16 in base/, loaded as fp32
# Used when MANIFEST.json itself is unreadable; otherwise the manifest's own recorded `remake` is quoted.
DEFAULT_REMAKE = (
    "far world pretrain --work .world/pretrain && far world oracle --work .world/pretrain && "
    "far world clip --work .world/pretrain && far world export --snapshot .world/pretrain/snapshots/step-8000 "
    "--oracle .world/oracle.safetensors --clip .world/clip.pt"
)


class WorldWeightsError(InvalidInputError):
    """The world's weights are missing, do not match MANIFEST.json, or cannot be exported as asked."""


# ------------------------------------------------------------------------------------------ provenance
def machine() -> dict[str, Any]:
    """What this process runs on: CPU model, cores, torch threads, GPU (or None), platform, versions."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {"cpu": cpu, "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "gpu": gpu,
            "platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__}


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def run_record(command: str, seed: int, steps: int, wall_time_s: float, **extra: Any) -> dict[str, Any]:
    """The provenance a training command writes beside its weights (and export reads): with machine and date."""
    return {"command": command, "seed": seed, "steps": steps, "wall_time_s": round(float(wall_time_s), 1),
            "machine": machine(), "date": _now(), **extra}


def record_path(weights_file: Path) -> Path:
    """Where a training command writes its provenance record, and export looks for it: `<weights>.json`."""
    return weights_file.with_name(weights_file.name + ".json")


def write_record(weights_file: Path, record: dict[str, Any]) -> None:
    write_json(record_path(weights_file), record)


def _read_record(path: Path, what: str) -> dict[str, Any]:
    try:
        record = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise WorldWeightsError(f"{path}: the {what} record could not be read as JSON: {exc}") from None
    if not isinstance(record, dict):
        raise WorldWeightsError(f"{path}: the {what} record must be a JSON object, got {type(record).__name__}")
    return record


def base_provenance(snapshot: Path) -> dict[str, Any]:
    """What is known of how a base-model snapshot was made: the manifest's `base` entry for the shipped one,
    else the pretraining record inside it, else {}."""
    snapshot = Path(snapshot)
    if snapshot.resolve() == paths.BASE.resolve():
        return {k: v for k, v in load_manifest()["base"].items() if k not in ("snapshot", "dtype", "record")}
    pretrain_json = snapshot / PRETRAIN_RECORD
    return _read_record(pretrain_json, "pretrain") if pretrain_json.is_file() else {}


def _provenance(snapshot: Path, oracle: Path, clip_ckpt: Path, records: dict[str, Path | None]) -> dict[str, dict]:
    """Each component's provenance: what its weights say about themselves, overlaid by its record file."""
    from safetensors import safe_open

    own: dict[str, dict[str, Any]] = {"base": {}, "oracle": {}, "clip": {}}
    pretrain_json = snapshot / PRETRAIN_RECORD
    if pretrain_json.is_file():
        rec = _read_record(pretrain_json, "pretrain")
        cfg = rec.get("config", {})
        own["base"] = {"seed": cfg.get("seed"), "steps": rec.get("step"), "vae_steps": cfg.get("vae_steps")}
        own["base"] |= {k: v for k, v in rec.items() if k != "step"}
    with safe_open(str(oracle), framework="pt") as f:
        meta = f.metadata() or {}
    own["oracle"] = {k: int(meta[k]) for k in ("seed", "steps") if k in meta}
    defaults = {"base": None, "oracle": record_path(oracle), "clip": record_path(clip_ckpt)}
    out = {}
    for name, base in own.items():
        path = records.get(name) or defaults[name]
        explicit = records.get(name) is not None
        if path is not None and (explicit or path.is_file()):
            base = base | _read_record(path, name) | {"record": str(path)}
        out[name] = {k: v for k, v in base.items() if v is not None}
    return out


# ---------------------------------------------------------------------------------------------- export
def _file_table(root: Path) -> dict[str, dict[str, Any]]:
    """{relative posix path: {sha256, size}} of every file under root but the manifest itself."""
    return {
        p.relative_to(root).as_posix(): {"sha256": file_sha256(p), "size": p.stat().st_size}
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.relative_to(root).as_posix() != paths.MANIFEST.name
    }


def export_command(snapshot: Path, oracle: Path, clip_ckpt: Path, records: dict[str, Path | None],
                   dest: Path | None, allow_unknown: bool) -> str:
    """The `far world export` command line that makes exactly this export (recorded in the manifest)."""
    argv = ["far", "world", "export", "--snapshot", str(snapshot), "--oracle", str(oracle), "--clip", str(clip_ckpt)]
    for name, path in records.items():
        if path is not None:
            argv += [f"--{name}-record", str(path)]
    if dest is not None:
        argv += ["--dest", str(dest)]
    if allow_unknown:
        argv.append("--allow-unknown-provenance")
    return shlex.join(argv)


def export_weights(
    snapshot: Path, oracle: Path, clip_ckpt: Path, records: dict[str, Path | None] | None = None,
    dest: Path | None = None, allow_unknown: bool = False,
) -> dict[str, Any]:
    """Write the shipped weights into `dest` (default far/world/weights) atomically; returns the manifest.

    `snapshot`: a pretrain snapshot (diffusers directory); `oracle`: far/world/oracle.Oracle.save's safetensors
    (widths and resolution in its metadata); `clip_ckpt`: far/world/clip.save_clip's file.
    Refuses (before writing anything) when a component's provenance lacks any of PROVENANCE, unless
    `allow_unknown`; the manifest then lists what is unknown.
    """
    import warnings

    import clip

    from far.models import verify_diffusers_dir
    from far.world.oracle import Oracle

    snapshot, oracle, clip_ckpt = Path(snapshot), Path(oracle), Path(clip_ckpt)
    records = {name: records.get(name) if records else None for name in ("base", "oracle", "clip")}
    for path, what in ((snapshot, "--snapshot"), (oracle, "--oracle"), (clip_ckpt, "--clip")):
        if not path.exists():
            raise WorldWeightsError(f"{what} {path}: does not exist")
    provenance = _provenance(snapshot, oracle, clip_ckpt, records)
    unknown = {name: [k for k in PROVENANCE if k not in rec] for name, rec in provenance.items()}
    unknown = {name: keys for name, keys in unknown.items() if keys}
    if unknown and not allow_unknown:
        where = "; ".join(f"{name}: {keys} (--{name}-record)" for name, keys in unknown.items())
        raise WorldWeightsError(
            f"the provenance of the exported weights is incomplete: {where}. Give record files (JSON objects "
            f"with {list(PROVENANCE)}; far.world.weights.run_record writes one) or --allow-unknown-provenance"
        )
    pipe = verify_diffusers_dir(snapshot)
    try:
        Oracle.load(oracle)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            clip.load(str(clip_ckpt), device="cpu", jit=False)
    except Exception as exc:  # noqa: BLE001 - any load failure is reported with the file named
        raise WorldWeightsError(f"{exc.__class__.__name__} while loading the oracle or the CLIP: {exc}") from exc
    command = export_command(snapshot, oracle, clip_ckpt, records, dest, allow_unknown)
    remake = " && ".join([rec["command"] for rec in provenance.values() if "command" in rec] + [command])
    dest = Path(dest) if dest is not None else paths.WEIGHTS
    with atomic_dir(dest) as tmp:
        for name in COMPONENTS:
            getattr(pipe, name).half()
        pipe.save_pretrained(tmp / paths.BASE.name, safe_serialization=True)
        shutil.copyfile(oracle, tmp / paths.ORACLE.name)
        shutil.copyfile(clip_ckpt, tmp / paths.CLIP.name)
        manifest = {
            "format": FORMAT, "date": _now(), "command": command, "remake": remake, "export_machine": machine(),
            "base": provenance["base"] | {"snapshot": str(snapshot), "dtype": "float16"},
            "oracle": provenance["oracle"] | {"source": str(oracle)},
            "clip": provenance["clip"] | {"source": str(clip_ckpt)},
            "unknown": unknown, "files": _file_table(tmp),
        }
        write_json(tmp / paths.MANIFEST.name, manifest)
    return manifest


# ---------------------------------------------------------------------------------------------- verify
def _shown(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def _portable(path: Path) -> str:
    """`path` relative to the folder holding the `far` package (far/world/weights/...), else its name alone."""
    root = Path(__file__).resolve().parents[2]
    try:
        return path.resolve().relative_to(root).as_posix()
    except ValueError:
        return path.name


def load_manifest() -> dict[str, Any]:
    path = paths.WEIGHTS / paths.MANIFEST.name
    try:
        manifest = json.loads(path.read_text())
        manifest["files"].items()
    except (OSError, ValueError, KeyError, AttributeError) as exc:
        problem = "is missing" if not path.is_file() else f"is unreadable ({exc.__class__.__name__}: {exc})"
        raise WorldWeightsError(
            f"{_shown(path)} {problem}, so no world weights can be verified. Remake them: {DEFAULT_REMAKE}"
        ) from None
    return manifest


def check(prefix: str, manifest: dict[str, Any] | None = None) -> dict[str, dict[str, Any]]:
    """Verify every manifest file under `prefix` ('base' or a file name); returns their manifest entries.

    A missing, resized or altered file, or a file in `prefix` the manifest does not list, raises one
    WorldWeightsError naming the first such file, its expected and found sha256, and the remake command.
    """
    manifest = manifest or load_manifest()
    root = paths.WEIGHTS
    expected = {rel: e for rel, e in manifest["files"].items() if rel == prefix or rel.startswith(prefix + "/")}
    top = root / prefix
    on_disk = {prefix} if top.is_file() else {p.relative_to(root).as_posix() for p in top.rglob("*") if p.is_file()}
    problems = []
    for rel in sorted(set(expected) | on_disk):
        want = expected.get(rel)
        path = root / rel
        if want is None:
            problems.append(f"{_shown(path)}: not in {paths.MANIFEST.name}: expected no such file, "
                            f"found sha256 {file_sha256(path)}")
        elif not path.is_file():
            problems.append(f"{_shown(path)}: missing: expected sha256 {want['sha256']}, found no file")
        else:
            found, size = file_sha256(path), path.stat().st_size
            if found != want["sha256"]:
                how = "truncated" if size < want["size"] else "altered"
                problems.append(f"{_shown(path)}: {how} ({size} bytes, expected {want['size']}): expected sha256 "
                                f"{want['sha256']}, found {found}")
    if not expected and not problems:
        problems.append(f"{_shown(root / prefix)}: not in {paths.MANIFEST.name}: expected it listed, found nothing")
    if problems:
        more = f" (and {len(problems) - 1} more file(s) fail)" if len(problems) > 1 else ""
        remake = manifest.get("remake", DEFAULT_REMAKE)
        raise WorldWeightsError(f"{problems[0]}{more}. Remake the world weights: {remake}")
    return expected


def verified_path(name: str) -> Path:
    """The path of shipped file `name` ('oracle.safetensors', 'clip.pt', or 'base'), after its hashes check out."""
    check(name)
    return paths.WEIGHTS / name


def install_base(dest: Path, resolution: int) -> dict[str, Any]:
    """Verify base/ against the manifest, then write it into `dest` in fp32; returns the provenance record.

    Nothing is read as a model before every file's hash matches. `resolution` (model.resolution) must be
    the one the world model was trained at.
    """
    from diffusers import StableDiffusionPipeline

    manifest = load_manifest()
    files = check(paths.BASE.name, manifest)
    pipe = StableDiffusionPipeline.from_pretrained(
        paths.WEIGHTS / paths.BASE.name, safety_checker=None, feature_extractor=None, requires_safety_checker=False
    )
    trained = pipe.unet.config.sample_size * 2 ** (len(pipe.vae.config.block_out_channels) - 1)
    if resolution != trained:
        raise WorldWeightsError(
            f"model.resolution: {resolution} is invalid for model.pretrained: world: the world model was trained "
            f"at {trained} px; set model.resolution: {trained}"
        )
    for name in COMPONENTS:
        getattr(pipe, name).float()  # every stage loads models/base in fp32
    # diffusers records the absolute folder it loaded from, which differs per clone: models/base (a DVC output
    # every later stage depends on) must be the same bytes wherever the repository lives.
    shown = _portable(paths.WEIGHTS / paths.BASE.name)
    pipe.register_to_config(_name_or_path=shown)
    for name, component in pipe.components.items():  # the diffusers models; transformers does not save it
        if "_name_or_path" in getattr(component, "config", {}) and hasattr(component, "register_to_config"):
            component.register_to_config(_name_or_path=f"{shown}/{name}")
    pipe.save_pretrained(dest, safe_serialization=True)
    # Only the base model's own files and provenance: models/base is every later stage's input, so a re-export
    # that changes only the oracle or the CLIP (the manifest's date, command, their entries) must not retrain.
    return {"source": "world", "weights": _shown(paths.WEIGHTS), "provenance": manifest.get("base", {}),
            "files": files}
