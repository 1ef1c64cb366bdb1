"""What the training commands (``train-ti``, ``train-db``) share at the command level: the settings of Safe-Zone
Training, the run summary with the training's numbers, the instance-image preamble and the step-progress bridge.
The trainers and the loop are library code in :mod:`ops.train`. Stdlib only at import time."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from ..errors import UsageError
from ..train.presets import MASK_MODES, PRESETS, TIMESTEP_SAMPLERS
from .base import Event, RunSummary, Settings, as_input_list, gather, header_problem, resolve_model


@dataclass(frozen=True, kw_only=True)
class SztSettings(Settings):
    """The Safe-Zone Training options of paper 000 (``--preset`` … ``--dilate``); ``None`` = the preset's value
    (:data:`ops.train.presets.NOMINAL` without a preset). Resolved by :meth:`szt`."""

    masks_imply_lm: ClassVar[bool] = False  # train-ti: masks without a mask mode mean loss masking
    preset: str | None = None
    jpeg: int | None = None
    t_sampler: str | None = None
    t_param: float | None = None
    masks: Path | None = None
    mask_mode: str | None = None
    dilate: int | None = None

    def check(self) -> None:
        for flag, value, valid in (("--preset", self.preset, PRESETS), ("--t-sampler", self.t_sampler,
                                                                         TIMESTEP_SAMPLERS),
                                   ("--mask-mode", self.mask_mode, MASK_MODES)):
            if value is not None and value not in valid:
                raise UsageError(f"{flag} {value!r}: choose one of {', '.join(valid)}")
        if self.masks is not None and not Path(self.masks).is_dir():
            raise UsageError(f"--masks {self.masks}: not a folder")
        mode = self.szt()["mask_mode"]
        if mode != "none" and self.masks is None:
            raise UsageError(f"mask mode {mode} (from --preset/--mask-mode) needs --masks DIR (make them with "
                             "`cloak mask IMAGES -o DIR`)")

    def szt(self) -> dict[str, Any]:
        """``jpeg``, ``t_sampler``, ``t_param``, ``mask_mode``, ``dilate``: the preset with the given flags on top
        (and ``lm`` for masks without a mask mode, here or in the preset, where ``masks_imply_lm``)."""
        from ..train.presets import resolve_preset

        given = {"jpeg": self.jpeg, "t_sampler": self.t_sampler, "t_param": self.t_param,
                 "mask_mode": self.mask_mode, "dilate": self.dilate}
        szt = resolve_preset(self.preset, given)
        if self.masks_imply_lm and self.masks is not None and self.mask_mode is None and szt["mask_mode"] == "none":
            szt["mask_mode"] = "lm"
        return szt


@dataclass
class TrainSummary(RunSummary):
    """A training run's summary: ``done`` lists the final artefacts written (a file or folder name under the output),
    plus the steps trained, the last logged loss, the step a ``--resume`` continued from and the seconds spent."""

    steps: int | None = None
    final_loss: float | None = None
    resumed_from: int | None = None
    seconds: float | None = None

    def as_dict(self) -> dict[str, Any]:
        return {**super().as_dict(), "files": self.done, "steps": self.steps, "final_loss": self.final_loss,
                "resumed_from": self.resumed_from, "seconds": self.seconds}


@dataclass
class Instances:
    """What a training run and its plan both resolve before any model loads: the training images (every input, no
    shards: one run learns from all of them), the collection notes, the model, its manifest record and the working
    size."""

    items: list[Any]
    notes: list[str]
    model: str
    record: dict[str, Any]
    resolution: int


def gather_instances(settings: Any, inputs: Any, output: Path) -> Instances:
    """The :class:`Instances` of ``settings`` (its ``recursive``, ``model`` and ``resolution``); a missing model
    raises its one-line error here, before an output folder is made (:func:`.base.resolve_model`)."""
    items, notes, _ = gather(as_input_list(inputs), output, recursive=settings.recursive, shard=None)
    model, resolution, record = resolve_model(settings)
    return Instances(items, notes, model, record, resolution)


def unreadable(items: Sequence[Any], max_pixels: int | None) -> list[tuple[str, str]]:
    """The inputs the run would reject judging from their headers (dry run: no pixel decoded)."""
    found = []
    for item in items:
        reason = header_problem(item.path, max_pixels=max_pixels)
        if reason:
            found.append((item.rel.as_posix(), reason))
    return found


def step_events(on_event: Event, describe=None):
    """An ``on_progress(step, total, record)`` for :func:`ops.train.loop.train` that reports ``step`` events (with
    the running loss as ``text``)."""
    describe = describe or (lambda record: f"loss {record['loss']:.4f}")

    def update(step: int, total: int, record: dict[str, Any]) -> None:
        on_event("step", "", {"step": step, "total": total, "text": describe(record)})

    return update


def checkpoint_notes(output: Path, *, resume: bool, overwrite: bool) -> list[str]:
    """What a training run would do with checkpoints an earlier run left in ``output`` (for ``--dry-run``)."""
    from ..train.loop import latest_checkpoint

    checkpoint = latest_checkpoint(output)
    if checkpoint is None:
        return []
    if overwrite:
        return [f"{checkpoint.name} of an earlier run is discarded"]
    if resume:
        return [f"resume from {checkpoint.name}"]
    return [f"{output} holds checkpoints of an earlier run: the run stops (give resume or overwrite)"]
