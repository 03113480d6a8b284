"""The trained delta: save (safetensors only, never pickle), `far.load(pipe, path)`, diffusers-format export.

`models/far/` holds:
- `delta.safetensors`: only trained tensors: `unet.<name>` (names as in `unet.state_dict()`, LoRA names
  with adapter `far`) and `text_encoder.token_embedding` (N, D): the identifier tokens' rows, in the order
  of `far_delta.json` `token_rows`;
- `far_delta.json`: concepts (name, token, class word, token ids), modules preset, base model record,
  resolved train params, data hash, parameter counts, how to load the export;
- `README.md`: model card;
- `diffusers/`: the same weights in standard diffusers formats (see `export_diffusers`).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from far.concepts import add_concept_tokens
from far.errors import InvalidInputError
from far.io import atomic_dir, write_json, write_text
from far.modules import LORA_ADAPTER, add_lora

DELTA_FILE = "delta.safetensors"
META_FILE = "far_delta.json"
CARD_FILE = "README.md"
EXPORT_DIR = "diffusers"
CUSTOM_DIFFUSION_FILE = "pytorch_custom_diffusion_weights.safetensors"
LORA_FILE = "pytorch_lora_weights.safetensors"
EMBEDDING_KEY = "text_encoder.token_embedding"


class _Concept:
    def __init__(self, d: dict[str, Any]) -> None:
        self.name, self.token, self.class_word = d["name"], d["token"], d["class_word"]


def read_meta(path: Path | str) -> dict[str, Any]:
    path = Path(path)
    meta_file = path / META_FILE
    if not meta_file.is_file() or not (path / DELTA_FILE).is_file():
        raise InvalidInputError(f"{path}: not a far delta (needs {DELTA_FILE} and {META_FILE}; run the train stage)")
    return json.loads(meta_file.read_text())


def load(pipe, path: Path | str) -> dict[str, Any]:
    """Apply the delta in `path` to a StableDiffusionPipeline in place; returns its far_delta.json record.

    Adds the concept tokens to `pipe.tokenizer` (resizing the text encoder), writes their embedding rows,
    attaches the LoRA adapter for `modules: lora`, and copies the trained UNet tensors. Raises
    InvalidInputError naming the tensor when the pipeline does not match the base model it was trained on.
    """
    meta = read_meta(path)
    tensors = load_file(str(Path(path) / DELTA_FILE))
    if meta["modules"] == "lora":
        add_lora(pipe.unet, meta["lora_rank"])
    add_concept_tokens(pipe.tokenizer, pipe.text_encoder, [_Concept(c) for c in meta["concepts"]])
    if EMBEDDING_KEY in tensors:
        emb = pipe.text_encoder.get_input_embeddings().weight
        rows = tensors[EMBEDDING_KEY]
        if rows.shape[1] != emb.shape[1]:
            raise InvalidInputError(
                f"{path}: token embeddings have dim {rows.shape[1]}, this text encoder {emb.shape[1]}"
            )
        ids = pipe.tokenizer.convert_tokens_to_ids([r["token"] for r in meta["token_rows"]])
        with torch.no_grad():
            emb[ids] = rows.to(emb.device, emb.dtype)
    params = dict(pipe.unet.named_parameters())
    with torch.no_grad():
        for key, value in tensors.items():
            if not key.startswith("unet."):
                continue
            name = key.removeprefix("unet.")
            if name not in params or params[name].shape != value.shape:
                got = tuple(params[name].shape) if name in params else "missing"
                raise InvalidInputError(
                    f"{path}: {key} {tuple(value.shape)} does not match this pipeline's UNet ({got}); "
                    f"the delta was trained on {meta['base'].get('pretrained')!r}"
                )
            params[name].copy_(value.to(params[name].device, params[name].dtype))
    return meta


def _safe_name(token: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", token).strip("_") or "token"


def export_diffusers(out: Path, unet, text_encoder, tokenizer, meta: dict[str, Any]) -> dict[str, Any]:
    """Write `out` (a directory) in formats plain diffusers loads; returns how to load them.

    - new tokens: one textual-inversion file per token, `pipe.load_textual_inversion(file, token=...)`;
    - crossattn_kv / crossattn: Custom Diffusion attention processors (`to_k/to_v[/to_q/to_out]_custom_
      diffusion` for every attn2, empty entries for the other layers), loaded with
      `pipe.unet.load_attn_procs(dir, weight_name=..., _pipeline=pipe)` (diffusers 0.42 only installs the
      processors when `_pipeline` is passed);
    - lora: `pipe.load_lora_weights(dir)` (saved by `StableDiffusionPipeline.save_lora_weights`);
    - unet: a full diffusers UNet directory, `UNet2DConditionModel.from_pretrained(dir / "unet")`.
    Identifiers made of existing tokens have no textual-inversion form (diffusers refuses tokens already
    in the vocabulary); they are listed under `not_exported`.
    """
    out.mkdir(parents=True, exist_ok=True)
    how: dict[str, Any] = {"textual_inversion": [], "not_exported": []}
    emb = text_encoder.get_input_embeddings().weight
    for row in meta["token_rows"]:
        if not row["new"]:
            how["not_exported"].append(row["token"])
            continue
        file = f"ti_{_safe_name(row['token'])}.safetensors"
        save_file({row["token"]: emb[row["id"]].detach().float().cpu().contiguous()}, str(out / file))
        how["textual_inversion"].append({"file": file, "token": row["token"]})
    preset = meta["modules"]
    if preset in ("crossattn_kv", "crossattn"):
        state = {}
        for proc_name in unet.attn_processors:
            layer = proc_name.removesuffix(".processor")
            if ".attn2." not in proc_name:
                state[proc_name] = torch.zeros(0)  # diffusers' marker: this layer keeps the default processor
                continue
            attn = unet.get_submodule(layer)
            parts = {"to_k": attn.to_k, "to_v": attn.to_v}
            if preset == "crossattn":
                parts |= {"to_q": attn.to_q}
                state[f"{proc_name}.to_out_custom_diffusion.0.weight"] = attn.to_out[0].weight
                if attn.to_out[0].bias is not None:
                    state[f"{proc_name}.to_out_custom_diffusion.0.bias"] = attn.to_out[0].bias
            for short, lin in parts.items():
                if lin.bias is not None:
                    raise InvalidInputError(f"{layer}.{short} has a bias: not representable as Custom Diffusion")
                state[f"{proc_name}.{short}_custom_diffusion.weight"] = lin.weight
        flat = {k: v.detach().float().cpu().contiguous() for k, v in state.items()}
        save_file(flat, str(out / CUSTOM_DIFFUSION_FILE))
        how["unet"] = {"format": "custom_diffusion", "weight_name": CUSTOM_DIFFUSION_FILE}
    elif preset == "lora":
        from diffusers import StableDiffusionPipeline
        from diffusers.utils import convert_state_dict_to_diffusers
        from peft.utils import get_peft_model_state_dict

        layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet, adapter_name=LORA_ADAPTER))
        StableDiffusionPipeline.save_lora_weights(out, unet_lora_layers=layers, safe_serialization=True)
        how["unet"] = {"format": "lora", "weight_name": LORA_FILE}
    else:
        unet.save_pretrained(out / "unet", safe_serialization=True)
        how["unet"] = {"format": "unet", "subfolder": "unet"}
    return how


def model_card(meta: dict[str, Any]) -> str:
    concepts = "\n".join(
        f"| {c['name']} | `{c['token']}` | {c['class_word']} | {c['token_ids']} |" for c in meta["concepts"]
    )
    train = meta["params"]
    ti = meta["export"]["textual_inversion"]
    ti_lines = "".join(f'pipe.load_textual_inversion("{p}/diffusers/{t["file"]}", token="{t["token"]}")\n' for t in ti
                       for p in ["models/far"])
    unet_how = meta["export"]["unet"]
    unet_line = {
        "custom_diffusion": f'pipe.unet.load_attn_procs("models/far/diffusers", weight_name="{CUSTOM_DIFFUSION_FILE}",'
        " _pipeline=pipe)",
        "lora": 'pipe.load_lora_weights("models/far/diffusers")',
        "unet": 'pipe.unet = UNet2DConditionModel.from_pretrained("models/far/diffusers/unet")',
    }[unet_how["format"]]
    return f"""# far delta: Fuse-and-Refine personalization

Base model: `{meta['base'].get('pretrained')}` ({meta['base'].get('source')}); trained modules: `{meta['modules']}`
(+ token embeddings: {bool(train['train_token_embeddings'])}); {meta['counts']['total']:,} trained parameters;
{train['steps']} steps, lr {train['learning_rate']}, refine weight {train['refine']['weight']},
prior weight {train['prior_weight']}. Training data: `{meta['data']['path']}` (sha256 `{meta['data']['sha256']}`,
{meta['data']['rows']} rows).

| concept | identifier | class | token ids |
| --- | --- | --- | --- |
{concepts}

## Load
```python
import far
far.load(pipe, "models/far")          # any StableDiffusionPipeline of the same base model
```
or with plain diffusers calls:
```python
{ti_lines}{unet_line}
```
Files: `delta.safetensors` (only the trained tensors), `far_delta.json` (everything above, machine-readable).
"""


def save_delta(
    out: Path, tensors: dict[str, torch.Tensor], meta: dict[str, Any], unet, text_encoder, tokenizer
) -> None:
    """Write `out` atomically: delta.safetensors, the diffusers export, far_delta.json and the model card."""
    with atomic_dir(out) as tmp:
        save_file({k: v.detach().float().cpu().contiguous() for k, v in sorted(tensors.items())}, str(tmp / DELTA_FILE))
        meta = {**meta, "export": export_diffusers(tmp / EXPORT_DIR, unet, text_encoder, tokenizer, meta)}
        write_json(tmp / META_FILE, meta)
        write_text(tmp / CARD_FILE, model_card(meta))
        for f in tmp.rglob("*"):  # safetensors creates 0600 files
            f.chmod(0o755 if f.is_dir() else 0o644)
