"""The real CLIP BPE tokenizer, offline: the 49,408-token ``tokenizer.json`` that ships with the toy model.

OpenAI's CLIP vocabulary (256 byte symbols, the same with an end-of-word marker, 48,894 BPE merges, then the
start/end-of-text tokens) is identical to Stable Diffusion 1.x's ``tokenizer/``; the toy model's folder already
carries it as one ``tokenizer.json``, so no other package (open-clip-torch used to supply the vocabulary) is needed.
"""

from __future__ import annotations

import copy
from functools import lru_cache

from .toy_weights import BUNDLED_FOLDER

VOCAB_SIZE = 49408
TOKENIZER_FOLDER = BUNDLED_FOLDER / "tokenizer"  # the bundled toy weights, whatever CLOAK_TOY_WEIGHTS says


@lru_cache(maxsize=1)
def _load():
    from transformers import CLIPTokenizer

    from ..errors import ModelNotFoundError

    if not (TOKENIZER_FOLDER / "tokenizer.json").is_file():
        raise ModelNotFoundError(f"the bundled CLIP tokenizer is missing ({TOKENIZER_FOLDER}); reinstall cloaklab")
    tokenizer = CLIPTokenizer.from_pretrained(str(TOKENIZER_FOLDER), model_max_length=77)
    if len(tokenizer) != VOCAB_SIZE:
        raise RuntimeError(f"the bundled CLIP tokenizer has {len(tokenizer)} tokens, expected {VOCAB_SIZE}")
    return tokenizer


def clip_tokenizer():
    """A fresh ``transformers.CLIPTokenizer`` equal to Stable Diffusion 1.x's (callers may add tokens to it)."""
    return copy.deepcopy(_load())
