"""The real CLIP BPE tokenizer, built offline from the vocabulary file that open-clip-torch ships.

OpenAI's CLIP vocabulary is: the 256 byte symbols, the same with an end-of-word marker, the first 48,894 BPE merges
joined, then the start/end-of-text tokens — 49,408 ids, identical to Stable Diffusion's ``tokenizer/vocab.json``.
We write ``vocab.json`` + ``merges.txt`` once into a cache folder and load them with transformers' own class.
"""

from __future__ import annotations

import gzip
import json
import os
from functools import lru_cache
from pathlib import Path

VOCAB_SIZE = 49408
_NUM_MERGES = VOCAB_SIZE - 256 * 2 - 2


def _byte_symbols() -> list[str]:
    """The reversible byte → printable-unicode table of GPT-2/CLIP BPE, in vocabulary order."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    codes = list(printable)
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            codes.append(256 + extra)
            extra += 1
    return [chr(code) for code in codes]


def _bundled_bpe_file() -> Path:
    import open_clip

    path = Path(open_clip.__file__).parent / "bpe_simple_vocab_16e6.txt.gz"
    if not path.exists():
        from ..errors import ModelNotFoundError

        raise ModelNotFoundError(f"open-clip-torch's BPE vocabulary is missing ({path}); reinstall open-clip-torch")
    return path


def tokenizer_folder(cache_dir: Path | None = None) -> Path:
    """Write (once) and return a folder holding the CLIP ``vocab.json`` and ``merges.txt``."""
    cache_dir = cache_dir or Path(os.environ.get("CLOAK_CACHE", Path.home() / ".cache" / "cloaklab"))
    folder = cache_dir / "clip-tokenizer"
    if (folder / "vocab.json").exists() and (folder / "merges.txt").exists():
        return folder
    lines = gzip.open(_bundled_bpe_file()).read().decode("utf-8").split("\n")
    merges = lines[1 : _NUM_MERGES + 1]
    symbols = _byte_symbols()
    vocab_list = symbols + [s + "</w>" for s in symbols] + ["".join(m.split()) for m in merges]
    vocab_list += ["<|startoftext|>", "<|endoftext|>"]
    if len(vocab_list) != VOCAB_SIZE:
        raise RuntimeError(f"CLIP vocabulary came out with {len(vocab_list)} entries, expected {VOCAB_SIZE}")
    folder.mkdir(parents=True, exist_ok=True)
    from ..io import atomic_write_bytes

    atomic_write_bytes(folder / "merges.txt", ("#version: 0.2\n" + "\n".join(merges) + "\n").encode("utf-8"))
    vocab = {token: index for index, token in enumerate(vocab_list)}
    atomic_write_bytes(folder / "vocab.json", json.dumps(vocab, ensure_ascii=False).encode("utf-8"))
    return folder


@lru_cache(maxsize=2)
def _load(folder: str):
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(folder, model_max_length=77)


def clip_tokenizer(cache_dir: Path | None = None):
    """A fresh ``transformers.CLIPTokenizer`` equal to Stable Diffusion 1.x's (callers may add tokens to it)."""
    import copy

    return copy.deepcopy(_load(str(tokenizer_folder(cache_dir))))
