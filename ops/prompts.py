"""Prompt sets for ``cloak generate`` and the prompt strings of DreamBooth / DiffShortcut training.

Templates hold a ``{token}`` placeholder that is replaced by the learned identifier (``R*``, ``sks``, a TI token,
or ``"sks dog"`` when a class word should follow it).

* ``objects24`` — our own 24 recontextualisation prompts in the spirit of the DreamBooth object prompts that paper
  000 §5.1.2 generates from (5 images each → 120 images per concept). Written for cloaklab; not the DreamBooth list.
* ``faces`` — the two identity prompts of papers 001 and 004: "a photo of sks person", "a DSLR portrait of sks
  person".
* a text file — one template per line; empty lines and lines starting with ``#`` are skipped.

DiffShortcut (paper 001, Alg. 1 line 7 and Eq. 6): instance prompt + ", {neg}", class prompt + ", without {neg}";
at sampling, the generation prompt also gets ", without {neg}" (paper 001 §4.2 "During the sampling process, we also
added this suffix"; DiffShortcut ``diffshortcut/train_dreambooth.py``, ``infer``: ``prompt += ', without ' +
args.inputNegTok_Str``) and the negative prompt is ``concat(neg, "noisy, abstract, pattern, low quality")`` (Alg. 1
line 14; the released ``infer`` uses "noisy, lowres, artifact, pattern" without the token instead — see
docs/generate.md).

Multi-vector TI tokens (``<R*>`` → ``<R*> <R*>_1 …``) are spelled out here too, for training (``ops/train/
textual_inversion``), generation (``ops/generate``) and SSM alike — a leaf module all three import downwards.
"""

from __future__ import annotations

import re
from pathlib import Path

from .errors import UsageError

PLACEHOLDER = "{token}"

OBJECT_PROMPTS_24: tuple[str, ...] = (
    "a {token} in the jungle",
    "a {token} on the beach",
    "a {token} with a wheat field in the background",
    "a {token} in the snow",
    "a {token} on a cobblestone street",
    "a {token} on a wooden table",
    "a {token} on top of a red carpet",
    "a {token} with a mountain range in the background",
    "a {token} with a city skyline in the background",
    "a {token} with a lighthouse in the background",
    "a {token} with autumn leaves in the background",
    "a {token} in front of a brick wall",
    "a {token} floating in a swimming pool",
    "a {token} on a kitchen counter",
    "a {token} on a desert sand dune",
    "a {token} in a field of sunflowers",
    "a {token} on a bookshelf",
    "a {token} on a mossy rock in a forest",
    "a {token} on a marble floor",
    "a {token} at night under neon lights",
    "a blue {token}",
    "a shiny {token}",
    "a {token} made of glass",
    "a watercolor painting of a {token}",
)

FACE_PROMPTS: tuple[str, ...] = (
    "a photo of {token} person",
    "a DSLR portrait of {token} person",
)

PROMPT_SETS: dict[str, tuple[str, ...]] = {"objects24": OBJECT_PROMPTS_24, "faces": FACE_PROMPTS}
DEFAULT_PROMPT_SET = "objects24"  # cloak generate --prompts
# Images per prompt when --num-per-prompt is not given: 5 for objects24 (paper 000 §5.1.2).
DEFAULT_NUM_PER_PROMPT: dict[str, int] = {"objects24": 5, "faces": 5}
DEFAULT_TOKEN = "sks"

# Paper 001 Eq. 6: the quality negative prompt c_neg.
QUALITY_NEGATIVE = "noisy, abstract, pattern, low quality"
# Paper 001 §B: best negative token; the public code's default was "bhj noisy pattern".
DIFFSHORTCUT_NEG_TOKEN = "UNKNOWN artifact masked"


def load_prompt_templates(source: str, option: str = "--prompts") -> list[str]:
    """Templates of a named set (``objects24``, ``faces``) or of a text file (one per line, ``#`` comments);
    ``option`` names the flag in error messages."""
    if source in PROMPT_SETS:
        return list(PROMPT_SETS[source])
    path = Path(source)
    if not path.is_file():
        raise UsageError(f"{option} {source!r}: not a prompt set ({', '.join(PROMPT_SETS)}) nor a file")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"{option} {source}: cannot read it as UTF-8 text ({exc})") from None
    templates = [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
    if not templates:
        raise UsageError(f"{option} {source}: the file holds no prompts (one per line; # starts a comment)")
    return templates


def fill(template: str, token: str) -> str:
    """Replace every ``{token}`` in ``template`` (other braces are left alone)."""
    return template.replace(PLACEHOLDER, token)


def decoupled_prompts(instance_prompt: str, class_prompt: str, neg_token: str | None) -> tuple[str, str]:
    """DiffShortcut contrastive decoupling (paper 001 Alg. 1 line 7).

    ``("a photo of sks person", "a photo of person", "UNKNOWN artifact masked")`` →
    ``("a photo of sks person, UNKNOWN artifact masked", "a photo of person, without UNKNOWN artifact masked")``.
    Without a negative token both prompts are returned unchanged.
    """
    if not neg_token:
        return instance_prompt, class_prompt
    return f"{instance_prompt}, {neg_token}", f"{class_prompt}, without {neg_token}"


def without_suffix(prompt: str, neg_token: str | None) -> str:
    """DiffShortcut sampling prompt: ``prompt + ", without " + neg`` (``train_dreambooth.py``, ``infer``); unchanged
    without a negative token."""
    return f"{prompt}, without {neg_token}" if neg_token else prompt


def quality_negative_prompt(neg_token: str | None = None, extra: str | None = None) -> str:
    """Paper 001 Alg. 1 line 14: ``concat(neg_token, "noisy, abstract, pattern, low quality")`` (+ ``extra``)."""
    parts = [part for part in (neg_token, QUALITY_NEGATIVE, extra) if part]
    return ", ".join(parts)


# ------------------------------------------------------------------------------ multi-vector TI tokens
def placeholder_tokens(token: str, num_vectors: int) -> list[str]:
    """``<R*>`` → ``["<R*>", "<R*>_1", …]`` (what diffusers' loader creates for a multi-row embedding)."""
    return [token] + [f"{token}_{i}" for i in range(1, num_vectors)]


def expand_multi_vector(tokenizer, text: str) -> str:
    """``"a <R*> dog"`` → ``"a <R*> <R*>_1 <R*>_2 dog"`` for every multi-vector TI token loaded into ``tokenizer``.

    diffusers' ``maybe_convert_prompt`` does this at generation time, but with transformers 5 the CLIP tokenizer
    lowercases added tokens in ``tokenize()``, so it never finds them and silently uses only the first vector.
    Already expanded text is left as it is."""
    vocab = tokenizer.get_vocab()
    for token in sorted(getattr(tokenizer, "added_tokens_encoder", {}), key=len, reverse=True):
        if f"{token}_1" not in vocab or f"{token}_1" in text:
            continue
        count = 1
        while f"{token}_{count}" in vocab:
            count += 1
        text = re.sub(re.escape(token) + r"(?!_\d)", " ".join(placeholder_tokens(token, count)), text)
    return text


def expand_prompt(prompt: str, token: str, num_vectors: int) -> str:
    """Write a multi-vector token out in full, as ``maybe_convert_prompt`` does at generation time."""
    return prompt.replace(token, " ".join(placeholder_tokens(token, num_vectors))) if num_vectors > 1 else prompt
