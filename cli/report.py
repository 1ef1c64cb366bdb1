"""``cloak report``: one self-contained HTML page of a poison × defence grid, or of one poison/purify run."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from . import common


@common.handle_errors
def report(
    inputs: Annotated[list[str], typer.Argument(help="cloak score files (or folders holding them) of a grid, or one "
                                                "poison/purify output folder (single-run mode).", show_default=False)],
    output: Annotated[Path, typer.Option("--output", "-o", help="Report folder: index.html and thumbs/ (new, "
                                         "empty, or an earlier report).", show_default=False)],
    rows: Annotated[str, typer.Option(help="Label key for rows (the score files' --label).")] = "poison",
    cols: Annotated[str, typer.Option(help="Label key for columns.")] = "defense",
    metric: Annotated[str | None, typer.Option(help="Metric that colours the cells (default: the first "
                                                  "file's first); every metric is shown.")] = None,
    pick: Annotated[str | None, typer.Option(help="Metric that picks the best / median / worst samples "
                                                "(default: --metric; its registered direction decides best).")]
    = None,
    average_row: Annotated[str | None, typer.Option(help="Add a row averaging the rows, as score --table, e.g. "
                                                       "'Psn Avg'.")] = None,
    average_exclude: Annotated[list[str] | None, typer.Option(help="Rows left out of the average "
                                                                 "(repeatable), e.g. none.")] = None,
    thumb_size: Annotated[int, typer.Option(help="Longest side of the grid and sample thumbnails (px).")] = 128,
    preview_size: Annotated[int, typer.Option(help="Longest side of before/after previews (px).")] = 256,
    title: Annotated[str | None, typer.Option(help="Page title.")] = None,
    json_out: common.JsonOut = False,
    debug: common.Debug = False,
) -> None:
    """Write OUT/index.html (inline CSS/JS, thumbnails in OUT/thumbs/; opens offline from the folder).

    Grid mode: rows × cols of the score files' labels with the numbers of `cloak score --table`, cells coloured like
    its heatmap, thumbnails of the clean, poisoned and defended training image and the best/median/worst samples;
    a cell opens every sample with prompt, seed, per-image metrics, cost and the command lines from the cloak.json
    manifests. Single-run mode (a poison or purify output folder): each photo before/after, amplified difference,
    L∞, PSNR, SSIM.

    Examples:  cloak report work/scores -o report --metric toy-sim --average-row "Psn Avg" --average-exclude none
    ·  cloak report cloaked/ -o report
    """
    from cloaklab.ops.report import ReportSettings, run

    settings = ReportSettings(inputs=[Path(p) for p in inputs], output=output, rows=rows, cols=cols, metric=metric,
                              pick=pick, average_row=average_row, average_exclude=tuple(average_exclude or ()),
                              thumb_size=thumb_size, preview_size=preview_size, title=title)
    summary = run(settings)
    sys.stderr.write(f"report: {summary['index']} ({summary['mode']}, {summary['thumbnails']} thumbnails)\n")
    common.emit(Path(summary["index"]), summary, json_out)
    raise typer.Exit(0)


def register(app: typer.Typer) -> None:
    app.command("report")(report)
