"""The real CLIP tokenizer, built offline from the BPE vocabulary shipped inside clip-anytorch.

OpenAI CLIP's `SimpleTokenizer` derives its vocabulary from `bpe_simple_vocab_16e6.txt.gz`; writing the
same vocabulary and merges as `vocab.json` / `merges.txt` gives a `transformers.CLIPTokenizer` that
tokenizes exactly like it (and like Stable Diffusion's tokenizer).
"""

from __future__ import annotations

import gzip
import importlib.util
import inspect
import json
import tempfile
from pathlib import Path

from transformers import CLIPTokenizer

MODEL_MAX_LENGTH = 77  # CLIP's context length; a CLIPTokenizer built from files does not know it
_N_MERGES = 49152 - 256 - 2  # as in clip.simple_tokenizer: the vocab is 49408 entries


def clip_bpe_path() -> Path:
    """Path of `bpe_simple_vocab_16e6.txt.gz` inside the installed clip-anytorch (without importing it)."""
    spec = importlib.util.find_spec("clip")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("clip-anytorch is not installed: `pip install clip-anytorch`")
    path = Path(next(iter(spec.submodule_search_locations))) / "bpe_simple_vocab_16e6.txt.gz"
    if not path.is_file():
        raise RuntimeError(f"CLIP BPE vocabulary not found at {path}")
    return path


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte -> printable unicode map."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    bs += list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs), strict=True))


def clip_vocab_and_merges() -> tuple[dict[str, int], list[str]]:
    """CLIP's 49408-token BPE vocabulary (token -> id) and its merges ("a b" strings), in rank order."""
    lines = gzip.open(clip_bpe_path()).read().decode("utf-8").split("\n")
    merges = lines[1 : _N_MERGES + 1]
    byte_chars = list(_bytes_to_unicode().values())
    tokens = byte_chars + [c + "</w>" for c in byte_chars]
    tokens += ["".join(m.split()) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    return {tok: i for i, tok in enumerate(tokens)}, merges


def build_clip_tokenizer() -> CLIPTokenizer:
    """A CLIPTokenizer that splits text exactly like OpenAI CLIP.

    Padding uses `<|endoftext|>` (CLIP's and SD 1.x's choice). SD 2.x pads with "!", which makes "!" a
    special token and so tokenizes a literal "!" differently from CLIP; only the padding ids differ here.
    """
    vocab, merges = clip_vocab_and_merges()
    kwargs = {"model_max_length": MODEL_MAX_LENGTH}
    if "vocab" in inspect.signature(CLIPTokenizer.__init__).parameters:  # transformers >= 5
        return CLIPTokenizer(vocab=vocab, merges=[tuple(m.split()) for m in merges], **kwargs)
    with tempfile.TemporaryDirectory() as tmp:  # transformers 4 reads the vocabulary from files
        vocab_file, merges_file = Path(tmp) / "vocab.json", Path(tmp) / "merges.txt"
        vocab_file.write_text(json.dumps(vocab, ensure_ascii=False))
        merges_file.write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
        return CLIPTokenizer(vocab_file=str(vocab_file), merges_file=str(merges_file), **kwargs)
