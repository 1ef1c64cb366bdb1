"""Textual Inversion (Gal et al. 2022, "An Image is Worth One Word") as a :class:`~.loop.Trainable`.

A new token ``R*`` (``num_vectors`` rows: ``R*``, ``R*_1``, … — the diffusers multi-vector convention) is added to
the tokenizer and its embedding initialised from ``init_token``. Only those rows train: the embedding matrix itself
stays frozen and a forward hook on the input-embedding layer swaps the new token's rows for a small trainable tensor
``(num_vectors, D)``, so every other row is bit-identical by construction and the optimizer state is tiny.
:meth:`finalize` writes the learned rows into the matrix (the pipeline can then generate with the token).

Defaults (paper 000 §5.1.2): lr 5e-4 constant, no warm-up, 5000 steps, batch 1, object templates.

Model families:
  * SD 1.x / 2.x (ε or v targets: the loop takes the target from the scheduler config) — one text encoder;
  * SDXL — both text encoders get the token (``clip_l`` 768-d and ``clip_g`` 1280-d rows); conditioning is the
    concatenated penultimate hidden states plus the pooled ``text_embeds`` and ``time_ids`` (no crop, size R);
  * rectified-flow UNets (paper 000 App. O) — the scheduler decides the target; nothing changes here.
Saved as ``learned_embeds.safetensors``: ``{token: (num_vectors, D)}`` (SDXL: ``{"clip_l": …, "clip_g": …}``),
loadable by diffusers ``load_textual_inversion`` (SDXL: once per encoder with ``token=``, ``text_encoder=``,
``tokenizer=``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ..errors import UsageError

# the multi-vector token spelling is shared with generation and SSM: it lives in ops/prompts (imported downwards)
from ..prompts import expand_prompt, placeholder_tokens

EMBEDS_NAME = "learned_embeds.safetensors"
SNAPSHOT_DIR = "snapshots"


class _TokenSlot:
    """One text encoder's new token rows: the trainable tensor and the hook that places it."""

    def __init__(self, tokenizer, encoder, token: str, init_token: str, num_vectors: int):
        names = placeholder_tokens(token, num_vectors)
        vocab = tokenizer.get_vocab()
        # a name that is already a token (or a whole word of the vocabulary) would hijack that word in every prompt
        clashes = [name for name in names if name in vocab or len(tokenizer.tokenize(name)) == 1]
        if clashes:
            raise UsageError(f"token {clashes[0]!r} already exists in the tokenizer: pick a new --token such as '<R*>'")
        init_ids = tokenizer.encode(init_token, add_special_tokens=False)
        if len(init_ids) != 1:
            raise UsageError(f"--init-token {init_token!r} is {len(init_ids)} tokens for this tokenizer; give a single "
                             "word that is one token (e.g. 'object', 'dog', 'toy')")
        tokenizer.add_tokens(names)
        self.ids = tokenizer.convert_tokens_to_ids(names)
        encoder.resize_token_embeddings(len(tokenizer), mean_resizing=False)  # the rows are set just below
        self.embedding = encoder.get_input_embeddings()
        self.embedding.weight.requires_grad_(False)
        with torch.no_grad():
            init = self.embedding.weight[init_ids[0]].detach().float().clone()
            self.embedding.weight[self.ids] = init.to(self.embedding.weight.dtype)
        self.vectors = torch.nn.Parameter(init.repeat(num_vectors, 1))
        self.hook = self.embedding.register_forward_hook(self._place)

    def _place(self, module, args, output):
        ids = args[0]
        for row, token_id in enumerate(self.ids):
            output = torch.where((ids == token_id)[..., None], self.vectors[row].to(output.dtype), output)
        return output

    def finalize(self) -> None:
        with torch.no_grad():
            self.embedding.weight[self.ids] = self.vectors.detach().to(self.embedding.weight.dtype)
        self.hook.remove()


class TextualInversion:
    """Trainable for :func:`ops.train.loop.train`: the new token's rows in every text encoder of ``pipe``.

    Args:
        pipe: a diffusers SD / SDXL pipeline (text encoders are frozen and set to eval mode).
        token: the placeholder string, e.g. ``"<R*>"`` (must be new to the tokenizer).
        init_token: a single-token word whose embedding initialises the new rows.
        num_vectors: rows per token (1 in paper 000).
        resolution: training size, used for SDXL's ``time_ids``.
    """

    def __init__(self, pipe, token: str, init_token: str, num_vectors: int = 1, resolution: int = 512):
        if num_vectors < 1:
            raise UsageError("--num-vectors must be >= 1")
        self.pipe, self.token, self.num_vectors, self.resolution = pipe, token, num_vectors, resolution
        self.sdxl = getattr(pipe, "text_encoder_2", None) is not None
        for module in (pipe.unet, pipe.vae, pipe.text_encoder, getattr(pipe, "text_encoder_2", None)):
            if module is not None:
                module.requires_grad_(False)
                module.eval()
        self.slots = [_TokenSlot(pipe.tokenizer, pipe.text_encoder, token, init_token, num_vectors)]
        if self.sdxl:
            self.slots.append(_TokenSlot(pipe.tokenizer_2, pipe.text_encoder_2, token, init_token, num_vectors))

    # ------------------------------------------------------------------------------------------- Trainable
    def parameters(self) -> list[torch.Tensor]:
        return [slot.vectors for slot in self.slots]

    def condition(self, prompts: list[str]) -> tuple[torch.Tensor, dict[str, Any]]:
        """Prompts → ``(encoder_hidden_states (B, 77, D), unet kwargs)`` with the trainable rows in place."""
        prompts = [expand_prompt(prompt, self.token, self.num_vectors) for prompt in prompts]
        if not self.sdxl:
            from ..diffusion import encode_prompts

            return encode_prompts(self.pipe, prompts), {}
        hidden, pooled = [], None
        for tokenizer, encoder in ((self.pipe.tokenizer, self.pipe.text_encoder),
                                   (self.pipe.tokenizer_2, self.pipe.text_encoder_2)):
            ids = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                            return_tensors="pt").input_ids.to(encoder.device)
            output = encoder(ids, output_hidden_states=True)
            hidden.append(output.hidden_states[-2])
            pooled = output[0]  # the projected pooled embedding of the second encoder
        size = self.resolution
        time_ids = torch.tensor([[size, size, 0, 0, size, size]] * len(prompts), dtype=hidden[0].dtype,
                                device=hidden[0].device)
        return torch.cat(hidden, -1), {"added_cond_kwargs": {"text_embeds": pooled, "time_ids": time_ids}}

    def after_step(self) -> None:
        """Nothing to restore: the frozen matrix never changes (the hook keeps the new rows outside it)."""

    def extra_loss(self, generator: torch.Generator, rows: slice | None = None) -> torch.Tensor | None:
        return None

    def grad_norm(self) -> float:
        """L2 norm of the gradient of the new rows (all encoders), for ``--log-grad-by-t``."""
        grads = [slot.vectors.grad for slot in self.slots if slot.vectors.grad is not None]
        total = sum(float(grad.float().pow(2).sum()) for grad in grads)
        return total ** 0.5

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {f"vectors_{i}": slot.vectors.detach() for i, slot in enumerate(self.slots)}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for i, slot in enumerate(self.slots):
                slot.vectors.copy_(state[f"vectors_{i}"])

    def embeddings(self) -> dict[str, torch.Tensor]:
        """What ``learned_embeds.safetensors`` holds: ``{token: (n, D)}``, or ``{"clip_l", "clip_g"}`` for SDXL."""
        vectors = [slot.vectors.detach().float().cpu().contiguous() for slot in self.slots]
        return {"clip_l": vectors[0], "clip_g": vectors[1]} if self.sdxl else {self.token: vectors[0]}

    def save(self, folder: Path, step: int, final: bool) -> list[str]:
        from ..io import output_path, save_safetensors

        name = EMBEDS_NAME if final else f"{SNAPSHOT_DIR}/learned_embeds-step-{step:06d}.safetensors"
        path = output_path(Path(folder), name)  # no write through a symlink inside OUTPUT
        save_safetensors(self.embeddings(), path, {"token": self.token, "step": str(step),
                                                   "num_vectors": str(self.num_vectors)})
        return [name]

    def finalize(self) -> None:
        """Copy the learned rows into the embedding matrices and remove the hooks (the pipeline is then ready to
        generate with the token)."""
        for slot in self.slots:
            slot.finalize()
