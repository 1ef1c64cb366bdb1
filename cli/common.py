"""Options every subcommand shares, the error/exit-code wrapper, and stderr progress reporting."""

from __future__ import annotations

import enum
import functools
import json
import os
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer

from cloaklab.ops.commands import COMMANDS

# OpenMP threads that spin while waiting for work burn the cores another thread (or another process on a shared
# machine) needs: measured on the shared 2-core machine, toy poison at --threads 2 took 82 s with libgomp's default
# wait policy and 30 s with PASSIVE (1 thread: 18 s). libgomp reads this when torch loads, which the CLI does after
# this module is imported; a value the user set is kept.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

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
Shard = Annotated[str | None, typer.Option("--shard", metavar="I/N|auto", help="Process only shard I of N "
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
MaxPixels = Annotated[int | None, typer.Option("--max-pixels", min=1, help="Reject larger images as "
                                                  "decompression bombs (default 134,217,728).")]
Model = Annotated[str | None, typer.Option("--model", envvar="CLOAK_MODEL", help="Hub id, local diffusers folder, "
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
Threads = Annotated[int | None, typer.Option("--threads", envvar="CLOAK_THREADS", min=1, show_default=False,
                                                 help="CPU threads for torch (default: the CPUs this process may "
                                                      "use — its affinity, capped by the cgroup CPU quota).")]
Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="No header and no progress on stderr (warnings, errors "
                                     "and the summary still print).")]
Verbose = Annotated[bool, typer.Option("--verbose", help="Let the libraries (diffusers, transformers, peft, "
                                       "huggingface_hub) print their warnings, logs and progress bars.")]
DryRun = Annotated[bool, typer.Option("--dry-run", help="Print what the run would do — the inputs after sharding, "
                                      "which are skipped as done, which are rejected and why, the resolved settings "
                                      "and the model that would load — without loading a model or writing anything "
                                      "(--json for machines).")]
Config = Annotated[Path | None, typer.Option("--config", metavar="FILE", show_default=False,
                                                help="Read settings from a TOML or YAML file (keys are the long flag "
                                                     "names, e.g. quality = 25 or jpeg-scale: 512; an optional table "
                                                     "named after the command applies to it only); flags given on "
                                                     "the command line win.")]
RUN_FLAGS = {"threads": Threads, "quiet": Quiet, "verbose": Verbose, "dry_run": DryRun, "config": Config}
# --dry-run and --config belong to the nine commands (ops/commands); report and rerun do not take them.
PLAN_FLAGS = ("dry_run", "config")
RUN_COMMANDS = tuple(COMMANDS.values())  # their function names (train_ti)


def _with_run_flags(function: Callable, wrapper: Callable) -> None:
    """Give ``wrapper`` the command's signature plus ``--threads``, ``--quiet`` and ``--verbose`` (before
    ``--debug``), so every command has them without repeating them in each module."""
    import inspect

    signature = inspect.signature(function, eval_str=True)
    params = list(signature.parameters.values())
    names = {p.name for p in params}
    extra = [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY if any(
        p.kind == inspect.Parameter.KEYWORD_ONLY for p in params) else inspect.Parameter.POSITIONAL_OR_KEYWORD,
        default=None if name in ("threads", "config") else False, annotation=annotation)
        for name, annotation in RUN_FLAGS.items()
        if name not in names and (name not in PLAN_FLAGS or function.__name__ in RUN_COMMANDS)]
    at = next((i for i, p in enumerate(params) if p.name == "debug"), len(params))
    wrapper.__signature__ = signature.replace(parameters=params[:at] + extra + params[at:])  # type: ignore[attr-defined]
    wrapper.__annotations__ = {**{p.name: p.annotation for p in params}, **{p.name: p.annotation for p in extra}}


def configure_run(threads: int | None, quiet: bool, verbose: bool) -> None:
    """Apply the run flags before any work: torch's thread count and the progress switches (library chatter is
    silenced around the command by :func:`handle_errors` unless ``--verbose``/``--debug``)."""
    RunOptions.quiet, RunOptions.verbose = bool(quiet), bool(verbose)
    from cloaklab.ops.device import apply_threads, resolve_threads

    RunOptions.threads = apply_threads(resolve_threads(threads))


def handle_errors(function: Callable) -> Callable:
    """Run a command body: expected faults → one line on stderr and their exit code; ``--debug`` → traceback.
    Adds ``--threads``, ``--quiet`` and ``--verbose`` to the command (:func:`configure_run`)."""

    @functools.wraps(function)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        debug = kwargs.get("debug", False) or os.environ.get("CLOAK_DEBUG") == "1"
        run_flags = {name: kwargs.pop(name, None) for name in RUN_FLAGS}
        if function.__name__ not in RUN_COMMANDS:
            run_flags["dry_run"] = run_flags["config"] = None
        try:
            from cloaklab.ops.models import quiet_libraries
            from cloaklab.ops.validate import check_command_flags

            verbose = bool(run_flags["verbose"]) or debug
            configure_run(run_flags["threads"], bool(run_flags["quiet"]), verbose)
            RunOptions.dry_run = bool(run_flags["dry_run"])
            if run_flags["config"] is not None:
                apply_config(function, kwargs, run_flags["config"])
            check_command_flags(function.__name__, kwargs)  # bad flag values: exit 2 before any work
            try:
                with quiet_libraries(not verbose):
                    return function(*args, **kwargs)
            finally:
                from cloaklab.ops.manifest import close_all

                close_all()  # merge this run's record log into cloak.json, whatever the outcome
        except typer.Exit:
            raise
        except KeyboardInterrupt:
            sys.stderr.write("cloak: interrupted (finished files are kept; rerun to resume)\n")
            raise typer.Exit(130) from None
        except Exception as exc:  # noqa: BLE001 - the single place where faults become exit codes
            from cloaklab.ops.errors import CloakError

            if debug:
                traceback.print_exc()
            from cloaklab.ops.io import printable

            if isinstance(exc, CloakError):
                sys.stderr.write(f"cloak: error: {printable(exc)}\n")
                raise typer.Exit(exc.exit_code) from exc
            sys.stderr.write(f"cloak: internal error: {type(exc).__name__}: {printable(exc)}"
                             f"{'' if debug else ' (rerun with --debug for the traceback)'}\n")
            raise typer.Exit(1) from exc

    _with_run_flags(function, wrapper)
    return wrapper


# ----------------------------------------------------------------------------------------------- reporting
class RunOptions:
    """The options every command gets from :func:`handle_errors` (``--threads``, ``--quiet``, ``--verbose``)."""

    quiet = False
    verbose = False
    dry_run = False
    threads: int | None = None


def apply_config(function: Callable, kwargs: dict[str, Any], path: Path) -> None:
    """Fill the flags not given on the command line from a TOML/YAML file (:func:`ops.commands.config.read_config`).

    Only values whose source is the flag's default are replaced, so a flag on the command line always wins; a key
    that is not a flag of this command is a usage error naming the valid ones."""
    import inspect

    try:  # recent typer parses with its own vendored click
        from typer._click.globals import get_current_context  # type: ignore[import-not-found]
    except ImportError:  # pragma: no cover - older typer on the real click
        from click import get_current_context

    from cloaklab.ops.commands.config import read_config

    command = function.__name__.replace("_", "-")
    values = read_config(Path(path), command)
    context = get_current_context(silent=True)
    names = [name for name in inspect.signature(function).parameters if name not in ("inputs", "debug")]
    unknown = sorted(set(values) - set(names))
    if unknown:
        raise _usage(f"--config {path}: unknown key(s) {', '.join(unknown)} for {command} "
                     f"(valid: {', '.join(sorted(n.replace('_', '-') for n in names))})")
    for name, value in values.items():
        source = context.get_parameter_source(name) if context is not None else None
        if source is None or source.name in ("DEFAULT", "DEFAULT_MAP"):
            annotation = inspect.signature(function, eval_str=True).parameters[name].annotation
            kwargs[name] = Path(value) if "Path" in str(annotation) and isinstance(value, str) else value


def _usage(message: str) -> Exception:
    from cloaklab.ops.errors import UsageError

    return UsageError(message)


def settings_from(cls: type, values: dict[str, Any], *, drop: tuple[str, ...] = ()) -> Any:
    """The command's settings from the CLI function's arguments: run/reporting arguments (inputs, output, --json,
    --debug and ``drop``) are left out and ``None`` means "not given" (the settings' default applies)."""
    skip = {"inputs", "output", "json_out", "debug", *drop}
    return cls.from_kwargs(**{key: value(item) for key, item in values.items()
                              if key not in skip and item is not None})


def execute(command: str, settings: Any, inputs: Any, output: Path, json_out: bool) -> None:
    """Run (or, with ``--dry-run``, plan) ``command`` with ``settings`` and report: the one place a command's CLI
    hands over to its ops module. Exits with the run's exit code."""
    from cloaklab.ops.commands import load, run_command

    if RunOptions.dry_run:
        emit_plan(load(command).plan(settings, inputs, output), json_out)
        raise typer.Exit(0)
    with Reporter(command) as reporter:
        summary = run_command(command, settings, inputs, output, on_event=reporter.event)
        code = reporter.summary(summary, summary.output or output, json_out)
    raise typer.Exit(code)


def emit_plan(plan: Any, as_json: bool) -> None:
    """A dry run's plan on stdout (JSON with ``--json``)."""
    if as_json:
        sys.stdout.write(json.dumps(plan.as_dict(), default=str) + "\n")
    else:
        sys.stdout.write("\n".join(plan.lines()) + "\n")


PROGRESS_SECONDS_ENV = "CLOAK_PROGRESS_SECONDS"  # plain-line progress interval (default 10 s; tests use 0)


def _clock(seconds: float) -> str:
    seconds = max(0, int(seconds + 0.5))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"


class Reporter:
    """Progress on stderr: a rich bar on a terminal, periodic plain lines with an ETA when stderr is redirected.

    One reporter serves a whole command: file events (``on_event(kind, name, info)`` from the folder runners:
    ``start``/``done``/``skip``/``reject``/``error``/``warn``, and ``step`` with ``{"step", "total"}`` for the inner
    PGD/sampling steps of the current file; ``header``, ``note`` and ``info`` — a progress line ``{"message"}``;
    ``text`` and ``table`` for result text and tables such as score's means; training runs report their steps as
    ``step`` events too). ``--quiet`` silences the header and the progress (warnings, notes, errors and the closing
    summary still print)."""

    def __init__(self, command: str, quiet: bool | None = None):
        from rich.console import Console

        self.command = command
        self.console = Console(stderr=True)
        self.quiet = RunOptions.quiet if quiet is None else quiet
        self.progress = None
        self.task = None  # the files bar
        self.step_task = None  # the inner-steps bar
        self.total_files = 0
        self.files_finished = 0
        self.current: str | None = None
        self.step_started = 0.0
        self.first_step = 1
        self.last_line = 0.0
        self.interval = float(os.environ.get(PROGRESS_SECONDS_ENV, "10") or 10)

    def __enter__(self) -> Reporter:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def stop(self) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None

    # -- output
    def line(self, text: str) -> None:
        from cloaklab.ops.io import printable

        text = printable(text)  # a newline or escape sequence in a file name must not forge lines
        if self.progress is not None:
            self.progress.console.print(text, markup=False, highlight=False)
        else:
            sys.stderr.write(text + "\n")
            sys.stderr.flush()

    def info(self, text: str) -> None:
        """A progress-level line (silenced by ``--quiet``)."""
        if not self.quiet:
            self.line(text)

    def header(self, *, model: str | None = None, device: Any = None, dtype: Any = None,
               size: Any = None, threads: int | None = None) -> None:
        """The first line: model, device, dtype, working size and threads in use."""
        import torch

        threads = threads or torch.get_num_threads()
        parts = []
        if model is not None:
            parts.append(f"model {model}")
        if device is not None:
            parts.append(f"device {device}")
        if dtype is not None:
            parts.append(f"dtype {str(dtype).replace('torch.', '')}")
        if size is not None:
            parts.append(f"working size {size}" + (" px" if isinstance(size, int) else ""))
        parts.append(f"threads {threads}")
        self.info(f"{self.command}: " + ", ".join(parts))

    def _bar(self):
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        if self.progress is None:
            self.progress = Progress(TextColumn("[bold]{task.fields[label]}"), BarColumn(), MofNCompleteColumn(),
                                     TimeRemainingColumn(), TextColumn("{task.description}"),
                                     console=self.console, transient=True)
            self.progress.start()
        return self.progress

    @property
    def live(self) -> bool:
        return self.console.is_terminal and not self.quiet

    # -- file events
    def event(self, kind: str, name: str, info: dict) -> None:

        if kind == "start":
            self.total_files = int(info.get("total", 0))
            if self.live:
                self.task = self._bar().add_task("", total=self.total_files, label=self.command)
            return
        if kind == "step":
            self.step(int(info["step"]), int(info["total"]), name or self.current or "", info.get("text", ""))
            return
        if kind == "warn":
            self.line(f"cloak: warning: {name}: {info['message']}")
            return
        if kind == "note":
            self.line(f"cloak: note: {info['message']}")
            return
        if kind == "info":  # a progress-level line, given whole (silenced by --quiet)
            self.info(info["message"])
            return
        if kind == "header":
            self.header(**info)
            return
        if kind == "text":  # a block of result text (score --table's markdown): as it is, not silenced
            self.stop()
            for text_line in str(info["text"]).rstrip("\n").split("\n"):
                self.line(text_line)
            return
        if kind == "table":  # a result table ({"columns", "rows"}) titled ``name``: not silenced
            self.table(name, info["columns"], info["rows"])
            return
        if kind == "reject":
            self.line(f"cloak: rejected {name}: {info['reason']}")
        elif kind == "error":
            self.line(f"cloak: failed {name}: {info['reason']}")
        elif kind == "done" and self.progress is None:
            self.info(f"{self.command}: wrote {name} ({info['seconds']:.2f} s)")
        if kind in ("done", "error", "reject", "skip"):
            self.files_finished += 1
            self.current = None
            self.step_started = 0.0
            if self.step_task is not None and self.progress is not None:
                self.progress.remove_task(self.step_task)
                self.step_task = None
        if self.progress is not None and self.task is not None:
            self.progress.update(self.task, advance=1, description=name)

    def table(self, title: str, columns: list[str], rows: list[list[str]]) -> None:
        """A rich table on stderr (the last row, a total such as score's dataset mean, in bold)."""
        from rich.table import Table

        self.stop()
        grid = Table(title=title)
        for index, column in enumerate(columns):
            grid.add_column(column, justify="left" if index == 0 else "right")
        for index, row in enumerate(rows):
            grid.add_row(*[str(cell) for cell in row], style="bold" if index == len(rows) - 1 else None)
        self.console.print(grid)

    def step(self, step: int, total: int, name: str = "", text: str = "") -> None:
        """Inner step ``step`` of ``total`` of the current file (or of a training run): a bar on a terminal, else a
        plain line at the first and last step and every ``CLOAK_PROGRESS_SECONDS`` (10 s) with the ETA of the
        whole run (this file's rate × the steps left here and in the files after it)."""
        import time

        if self.quiet or total <= 0:
            return
        now = time.perf_counter()
        if step <= 1 or not self.step_started:
            self.step_started, self.first_step = now, step  # the rate is measured from the first step seen
        if self.live:
            progress = self._bar()
            if self.step_task is None:
                self.step_task = progress.add_task("", total=total, completed=step - 1,
                                                   label=f"  {self.command} steps")
            progress.update(self.step_task, total=total, completed=step, description=text or name)
            return
        if not (step in (1, total) or now - self.last_line >= self.interval):
            return
        self.last_line = now
        where = f" (file {self.files_finished + 1}/{self.total_files})" if self.total_files > 1 else ""
        label = f" {name}" if name else ""
        extra = f" {text}" if text else ""
        timing = "ETA …"
        if step > self.first_step:
            rate = (now - self.step_started) / (step - self.first_step)
            files_after = max(0, self.total_files - self.files_finished - 1) if self.total_files else 0
            eta = rate * (total - step) + files_after * rate * total
            timing = f"{rate:.2f} s/step · ETA {_clock(eta)}"
        self.line(f"{self.command}:{label} step {step}/{total}{where}{extra} · {timing}")

    def summary(self, summary: Any, output: Path, as_json: bool) -> int:
        """Print the closing summary (stderr) and the data line (stdout); return the exit code."""
        counts = (f"{len(summary.done)} written, {len(summary.skipped)} skipped (already done), "
                  f"{len(summary.rejected)} rejected, {len(summary.failed)} failed")
        self.stop()
        self.line(f"{self.command}: {counts} → {output}")
        for name, reason in summary.rejected:
            self.line(f"  rejected {name}: {reason}")
        for name, reason in summary.failed:
            self.line(f"  failed {name}: {reason}")
        emit(output, {"output": str(output), **summary.as_dict()}, as_json)
        return summary.exit_code


def emit(output: Path, payload: dict, as_json: bool) -> None:
    """The data line on stdout: the output path, or ``payload`` as JSON with ``--json``."""
    sys.stdout.write((json.dumps(payload, default=str) if as_json else str(output)) + "\n")
