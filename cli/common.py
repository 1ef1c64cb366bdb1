"""Options every subcommand shares, the error/exit-code wrapper, and stderr progress reporting."""

from __future__ import annotations

import enum
import functools
import json
import os
import sys
import traceback
from pathlib import Path
from typing import Annotated, Any, Callable, Optional

import typer

# ------------------------------------------------------------------------------------------- shared options
Inputs = Annotated[list[str], typer.Argument(help="Image files, folders, or - to read paths from stdin.",
                                             show_default=False)]
def output_path(value: Any) -> Path:
    """``-o`` parser: an empty name is a usage error (it would silently mean the current folder)."""
    if isinstance(value, Path):
        return value
    if value is None or not str(value).strip():
        raise typer.BadParameter("must not be empty (give a folder name; '.' for the current folder)")
    return Path(value)


Output = Annotated[Path, typer.Option("--output", "-o", parser=output_path, help="Output folder (created; must not "
                                      "be inside an input folder).", show_default=False)]
Recursive = Annotated[bool, typer.Option("--recursive", "-r", help="Descend into subfolders (relative paths are "
                                         "kept in the output).")]
Overwrite = Annotated[bool, typer.Option("--overwrite", help="Recompute outputs that a previous run with the same "
                                         "parameters already wrote (default: skip them); files cloak did not write "
                                         "are never replaced (docs/contract.md).")]
Shard = Annotated[Optional[str], typer.Option("--shard", metavar="I/N|auto", help="Process only shard I of N "
                                              "(1-based, round-robin over the sorted inputs) so N processes can "
                                              "share a folder; auto: this array task's shard from Slurm "
                                              "(SLURM_ARRAY_TASK_*) or Grid Engine (SGE_TASK_*), e.g. under "
                                              "sbatch --array=0-31.")]
Device = Annotated[str, typer.Option("--device", help="auto, cpu, cuda, cuda:N or mps.")]
Dtype = Annotated[str, typer.Option("--dtype", help="auto (fp32 on CPU, bf16/fp16 on GPU), fp32, fp16 or bf16.")]
Seed = Annotated[int, typer.Option("--seed", help="Random seed; each file draws from (seed, its relative name), so "
                                   "shards and resumed runs give identical files.")]
BatchSize = Annotated[int, typer.Option("--batch-size", min=1, help="Images per batch (same-size images only).")]
JsonOut = Annotated[bool, typer.Option("--json", help="Print a JSON summary on stdout instead of the output path.")]
Debug = Annotated[bool, typer.Option("--debug", help="Show tracebacks for errors.")]
MaxPixels = Annotated[Optional[int], typer.Option("--max-pixels", min=1, help="Reject larger images as "
                                                  "decompression bombs (default 134,217,728).")]
Model = Annotated[Optional[str], typer.Option("--model", envvar="CLOAK_MODEL", help="Hub id, local diffusers folder, "
                                              ".safetensors file, 'tiny', 'toy' or "
                                              "'sd15-shaped' (random weights, for timing) (default "
                                              "stable-diffusion-v1-5/stable-diffusion-v1-5).")]
TrustPickle = Annotated[bool, typer.Option("--trust-pickle", help="Allow loading pickle checkpoints (.ckpt/.pt), "
                                           "which can execute code.")]


def choices(name: str, values: list[str]) -> type[enum.Enum]:
    """A string Enum for typer choices built from a registry's names."""
    return enum.Enum(name, {value: value for value in values}, type=str)  # type: ignore[return-value]


def value(option: Any) -> Any:
    """The plain value of an Enum choice (or the value itself)."""
    return option.value if isinstance(option, enum.Enum) else option


# ------------------------------------------------------------------------------------------------- errors
def handle_errors(function: Callable) -> Callable:
    """Run a command body: expected faults → one line on stderr and their exit code; ``--debug`` → traceback."""

    @functools.wraps(function)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        debug = kwargs.get("debug", False) or os.environ.get("CLOAK_DEBUG") == "1"
        try:
            from cloaklab.ops.validate import check_command_flags

            check_command_flags(function.__name__, kwargs)  # bad flag values: exit 2 before any work
            try:
                return function(*args, **kwargs)
            finally:
                from cloaklab.ops.manifest import close_all

                close_all()  # merge this run's record log into cloak.json, whatever the outcome
        except typer.Exit:
            raise
        except KeyboardInterrupt:
            sys.stderr.write("cloak: interrupted (finished files are kept; rerun to resume)\n")
            raise typer.Exit(130)
        except Exception as exc:  # noqa: BLE001 - the single place where faults become exit codes
            from cloaklab.ops.errors import CloakError

            if debug:
                traceback.print_exc()
            from cloaklab.ops.io import printable

            if isinstance(exc, CloakError):
                sys.stderr.write(f"cloak: error: {printable(exc)}\n")
                raise typer.Exit(exc.exit_code)
            sys.stderr.write(f"cloak: internal error: {type(exc).__name__}: {printable(exc)}"
                             f"{'' if debug else ' (rerun with --debug for the traceback)'}\n")
            raise typer.Exit(1)

    return wrapper


# ----------------------------------------------------------------------------------------------- reporting
class Reporter:
    """Progress on stderr: a rich bar on a terminal, plain lines when stderr is redirected."""

    def __init__(self, command: str):
        from rich.console import Console

        self.command = command
        self.console = Console(stderr=True)
        self.progress = None
        self.task = None

    def __enter__(self) -> "Reporter":
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.progress is not None:
            self.progress.stop()

    def line(self, text: str) -> None:
        from cloaklab.ops.io import printable

        text = printable(text)  # a newline or escape sequence in a file name must not forge lines
        if self.progress is not None:
            self.progress.console.print(text, markup=False, highlight=False)
        else:
            sys.stderr.write(text + "\n")
            sys.stderr.flush()

    def event(self, kind: str, name: str, info: dict) -> None:
        if kind == "start":
            if self.console.is_terminal:
                from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

                self.progress = Progress(TextColumn(f"[bold]{self.command}"), BarColumn(), MofNCompleteColumn(),
                                         TimeRemainingColumn(), TextColumn("{task.description}"),
                                         console=self.console, transient=True)
                self.progress.start()
                self.task = self.progress.add_task("", total=info["total"])
            return
        if kind == "warn":
            self.line(f"cloak: warning: {name}: {info['message']}")
            return
        if kind == "reject":
            self.line(f"cloak: rejected {name}: {info['reason']}")
        elif kind == "error":
            self.line(f"cloak: failed {name}: {info['reason']}")
        elif kind == "done" and self.progress is None:
            self.line(f"{self.command}: wrote {name} ({info['seconds']:.2f} s)")
        if self.progress is not None:
            self.progress.update(self.task, advance=1, description=name)

    def summary(self, summary: Any, output: Path, as_json: bool) -> int:
        """Print the closing summary (stderr) and the data line (stdout); return the exit code."""
        counts = (f"{len(summary.done)} written, {len(summary.skipped)} skipped (already done), "
                  f"{len(summary.rejected)} rejected, {len(summary.failed)} failed")
        self.line(f"{self.command}: {counts} → {output}")
        for name, reason in summary.rejected:
            self.line(f"  rejected {name}: {reason}")
        for name, reason in summary.failed:
            self.line(f"  failed {name}: {reason}")
        emit(output, {"output": str(output), **summary.as_dict()}, as_json)
        return summary.exit_code


class StepProgress:
    """Training progress on stderr: a rich bar with the running loss on a terminal, a plain line every ~5 % of the
    steps otherwise. Use as a context manager and pass ``.update`` as ``on_progress(step, total, record)``."""

    def __init__(self, label: str, reporter: Reporter | None = None,
                 describe: Callable[[dict], str] | None = None):
        self.label = label
        self.reporter = reporter or Reporter(label)
        self.describe = describe or (lambda record: f"loss {record['loss']:.4f}")
        self.bar = None
        self.task = None

    def __enter__(self) -> "StepProgress":
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.bar is not None:
            self.bar.stop()

    def update(self, step: int, total: int, record: dict) -> None:
        text = self.describe(record)
        if self.reporter.console.is_terminal:
            if self.bar is None:
                from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

                self.bar = Progress(TextColumn(f"[bold]{self.label}"), BarColumn(), MofNCompleteColumn(),
                                    TimeRemainingColumn(), TextColumn("{task.description}"),
                                    console=self.reporter.console, transient=True)
                self.bar.start()
                self.task = self.bar.add_task("", total=total, completed=step - 1)
            self.bar.update(self.task, completed=step, description=text)
        elif step == total or step % max(1, total // 20) == 0:
            self.reporter.line(f"{self.label}: step {step}/{total} {text}")


def emit(output: Path, payload: dict, as_json: bool) -> None:
    """The data line on stdout: the output path, or ``payload`` as JSON with ``--json``."""
    sys.stdout.write((json.dumps(payload, default=str) if as_json else str(output)) + "\n")


def not_implemented(command: str) -> None:
    sys.stderr.write(f"cloak: {command} is not implemented yet\n")
    raise typer.Exit(2)
