"""HTML of ``cloak report``: one page, inline CSS and JS, thumbnails beside it — opens offline from a folder.

Markup choices for accessibility: a real ``<table>`` with ``scope`` headers, one ``<button>`` per cell (Tab and the
arrow keys move between cells) that opens a native ``<dialog>`` (Escape closes it, focus returns to the cell), alt
text on every image, text colour on the heatmap chosen for contrast, a palette that follows
``prefers-color-scheme``. Every thumbnail has ``loading="lazy"`` and its size, so a 100-concept grid loads only what
is on screen; detail views live in closed dialogs and poison previews in closed ``<details>``, so their images load
when opened.
"""

from __future__ import annotations

import hashlib
import html
import io
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .model import Cell, Grid, Run, Step

THUMB_DIR = "thumbs"

# matplotlib's viridis at 17 even stops (the colormap of `cloak score --table`'s heatmap)
VIRIDIS = ("#440154", "#48186a", "#472d7b", "#424086", "#3b528b", "#33638d", "#2c728e", "#26828e", "#21918c",
           "#1fa088", "#28ae80", "#3fbc73", "#5ec962", "#84d44b", "#addc30", "#d8e219", "#fde725")


def format_value(value: Any, digits: int = 2) -> str:
    """A table number exactly as ``cloak score --table`` writes it in the markdown table."""
    from ..score import _cell

    return _cell(value, digits)


def escape(value: Any) -> str:
    return html.escape("" if value is None else str(value), quote=True)


# --------------------------------------------------------------------------------------------------- colour
def _rgb(hex_colour: str) -> tuple[float, float, float]:
    return tuple(int(hex_colour[i:i + 2], 16) / 255 for i in (1, 3, 5))  # type: ignore[return-value]


def viridis(fraction: float) -> str:
    """The viridis colour at ``fraction`` in [0, 1] (linear between the stops)."""
    fraction = min(max(fraction, 0.0), 1.0) * (len(VIRIDIS) - 1)
    low = int(fraction)
    high = min(low + 1, len(VIRIDIS) - 1)
    weight = fraction - low
    mixed = [a + (b - a) * weight for a, b in zip(_rgb(VIRIDIS[low]), _rgb(VIRIDIS[high]))]
    return "#" + "".join(f"{round(c * 255):02x}" for c in mixed)


def _luminance(hex_colour: str) -> float:
    """WCAG 2 relative luminance."""
    def channel(c: float) -> float:
        return c / 12.92 if c <= 0.04045 else ((c + 0.055) / 1.055) ** 2.4

    r, g, b = (channel(c) for c in _rgb(hex_colour))
    return 0.2126 * r + 0.7152 * g + 0.0722 * b


def contrast(a: str, b: str) -> float:
    la, lb = sorted((_luminance(a), _luminance(b)), reverse=True)
    return (la + 0.05) / (lb + 0.05)


def text_colour(background: str) -> str:
    """Black or white, whichever contrasts more with ``background``."""
    return "#000000" if contrast(background, "#000000") >= contrast(background, "#ffffff") else "#ffffff"


# ----------------------------------------------------------------------------------------------- thumbnails
class Thumbnails:
    """Writes small PNGs under ``OUT/thumbs/`` named by their content hash (one file per distinct picture)."""

    def __init__(self, out_dir: Path, size: int) -> None:
        self.out_dir = Path(out_dir)
        self.size = size
        self.written: list[Path] = []
        self._by_source: dict[tuple[str, int], tuple[str, int, int] | None] = {}

    def _store(self, image, size: int) -> tuple[str, int, int]:
        from PIL import Image

        image = image.convert("RGB")
        if max(image.size) > size:
            image.thumbnail((size, size), Image.LANCZOS)
        buffer = io.BytesIO()
        image.save(buffer, "PNG", optimize=True)
        data = buffer.getvalue()
        name = hashlib.sha256(data).hexdigest()[:20] + ".png"
        path = self.out_dir / THUMB_DIR / name
        if not path.exists():
            from ..io import atomic_write_bytes

            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(path, data)
            self.written.append(path)
        return f"{THUMB_DIR}/{name}", image.size[0], image.size[1]

    def of_file(self, path: Path | None, size: int | None = None) -> tuple[str, int, int] | None:
        """``(relative src, width, height)`` of a thumbnail of ``path``, or None when it cannot be read."""
        if path is None:
            return None
        size = size or self.size
        key = (str(Path(path).resolve()), size)
        if key not in self._by_source:
            from PIL import Image, ImageOps, UnidentifiedImageError

            try:
                with Image.open(path) as opened:
                    self._by_source[key] = self._store(ImageOps.exif_transpose(opened), size)
            except (OSError, UnidentifiedImageError, ValueError):
                self._by_source[key] = None
        return self._by_source[key]

    def of_array(self, array, size: int | None = None) -> tuple[str, int, int] | None:
        """Same for an ``(H, W, 3)`` uint8 array."""
        if array is None:
            return None
        from PIL import Image

        return self._store(Image.fromarray(array), size or self.size)


def difference_image(original: Path, processed: Path):
    """``(amplified, gain)``: 0.5 + gain·(processed − original) as uint8, the largest change mapped to full range."""
    import numpy as np

    from .model import load_pair

    a, b = load_pair(original, processed)
    delta = b - a
    largest = float(np.abs(delta).max())
    gain = 0.5 / largest if largest > 0 else 1.0
    return (np.clip(0.5 + gain * delta, 0, 1) * 255).round().astype(np.uint8), gain


# ---------------------------------------------------------------------------------------------------- pieces
CSS = """
:root{color-scheme:light dark;--bg:#ffffff;--fg:#1a1a1a;--muted:#4a4a4a;--line:#c8c8c8;--panel:#f3f3f3;
--accent:#0b57d0;--focus:#b3261e}
@media (prefers-color-scheme:dark){:root{--bg:#121212;--fg:#ececec;--muted:#b8b8b8;--line:#444;--panel:#1e1e1e;
--accent:#8ab4f8;--focus:#f2b8b5}}
*{box-sizing:border-box}
body{margin:0;padding:1rem 1.5rem;background:var(--bg);color:var(--fg);
font:15px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif}
h1{font-size:1.4rem;margin:.2rem 0 .4rem}h2{font-size:1.15rem;margin:1.6rem 0 .5rem}h3{font-size:1rem}
p,figcaption,.muted{color:var(--muted)}
table{border-collapse:collapse}th,td{border:1px solid var(--line);padding:.3rem .45rem;vertical-align:top}
th{background:var(--panel);text-align:left}
.grid td{padding:0;min-width:11rem}
.grid .cell{display:block;width:100%;border:0;margin:0;padding:.4rem .5rem;font:inherit;text-align:left;
cursor:pointer}
.grid .cell:focus-visible,button:focus-visible,summary:focus-visible,a:focus-visible{outline:3px solid var(--focus);
outline-offset:2px}
.cell .value{font-variant-numeric:tabular-nums;font-weight:600}
.cell .metric{font-size:.8rem}
.strip{display:flex;gap:2px;padding:3px;background:var(--panel);flex-wrap:nowrap}
.strip figure{margin:0;text-align:center}.strip figcaption{font-size:.68rem;line-height:1.1}
.strip img{display:block;width:48px;height:48px;object-fit:cover;image-rendering:auto}
.empty{padding:.4rem .5rem;color:var(--muted)}
.num{text-align:right;font-variant-numeric:tabular-nums}
.previews img,.samples img,.training img{display:block;max-width:100%;min-width:64px;height:auto}
.previews td,.samples td{font-size:.9rem}
dialog{max-width:min(1100px,96vw);max-height:92vh;border:1px solid var(--line);background:var(--bg);
color:var(--fg);padding:0 1.2rem 1rem}
dialog::backdrop{background:rgba(0,0,0,.55)}
.dialog-head{position:sticky;top:0;background:var(--bg);display:flex;justify-content:space-between;
align-items:center;gap:1rem;padding-top:.6rem;border-bottom:1px solid var(--line)}
.close{font:inherit;padding:.25rem .7rem}
pre{white-space:pre-wrap;word-break:break-all;background:var(--panel);padding:.5rem;font-size:.8rem}
.legend{display:inline-block;width:14rem;height:.8rem;vertical-align:middle;
background:linear-gradient(to right,VIRIDIS_STOPS)}
"""

SCRIPT = """
(function(){
  var opener=null;
  function openCell(id,button){var d=document.getElementById(id);if(!d)return;opener=button||null;
    if(!d.open)d.showModal();var h=d.querySelector('h2');if(h)h.focus();
    if(history.replaceState)history.replaceState(null,'','#'+id);}
  document.querySelectorAll('button.cell').forEach(function(b){
    b.addEventListener('click',function(){openCell(b.getAttribute('aria-controls'),b);});});
  document.querySelectorAll('dialog').forEach(function(d){
    d.addEventListener('close',function(){if(history.replaceState)history.replaceState(null,'',location.pathname);
      if(opener)opener.focus();});
    d.querySelectorAll('button.close').forEach(function(b){b.addEventListener('click',function(){d.close();});});});
  var grid=document.querySelector('table.grid');
  if(grid)grid.addEventListener('keydown',function(e){
    var moves={ArrowRight:[0,1],ArrowLeft:[0,-1],ArrowDown:[1,0],ArrowUp:[-1,0]};var m=moves[e.key];
    var b=e.target.closest('button.cell');if(!m||!b)return;
    var r=+b.dataset.r+m[0],c=+b.dataset.c+m[1];
    var next=grid.querySelector('button.cell[data-r="'+r+'"][data-c="'+c+'"]');
    if(next){next.focus();e.preventDefault();}});
  if(location.hash.length>1){var t=document.getElementById(location.hash.slice(1));
    if(t&&t.tagName==='DIALOG'){var b=document.querySelector('button.cell[aria-controls="'+t.id+'"]');
      openCell(t.id,b);}}
})();
"""


def _img(thumb: tuple[str, int, int] | None, alt: str) -> str:
    if thumb is None:
        return f'<span class="muted">({escape(alt)}: not found)</span>'
    src, width, height = thumb
    return (f'<img src="{escape(src)}" alt="{escape(alt)}" width="{width}" height="{height}" loading="lazy" '
            f'decoding="async">')


def _number(value: Any, digits: int = 2, unit: str = "") -> str:
    if not isinstance(value, (int, float)):
        return "—"
    return f"{value:.{digits}f}{unit}"


def _page(title: str, body: str) -> str:
    css = CSS.replace("VIRIDIS_STOPS", ",".join(VIRIDIS))
    return ("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n"
            f"<title>{escape(title)}</title>\n<style>{css}</style>\n</head>\n<body>\n{body}\n"
            f"<script>{SCRIPT}</script>\n</body>\n</html>\n")


def _preview_rows(run: Run, thumbs: Thumbnails, size: int) -> str:
    rows = []
    for preview in run.previews:
        original = thumbs.of_file(preview.original, size)
        processed = thumbs.of_file(preview.processed, size)
        diff = gain = None
        if preview.original is not None:
            try:
                amplified, gain = difference_image(preview.original, preview.processed)
                diff = thumbs.of_array(amplified, size)
            except (OSError, ValueError):
                pass
        linf, psnr_value, ssim_value = preview.linf, preview.psnr, preview.ssim
        verb = "cloaked" if run.command == "poison" else "processed"
        rows.append(
            f"<tr><th scope=\"row\">{escape(preview.name)}</th>"
            f"<td>{_img(original, f'original {preview.name}')}</td>"
            f"<td>{_img(processed, f'{verb} {preview.name}')}</td>"
            f"<td>{_img(diff, f'difference of {preview.name}, amplified ×{gain:.0f}' if gain else 'difference')}"
            f"{f'<span class=muted>×{gain:.0f}</span>' if gain else ''}</td>"
            f"<td class=\"num\">{_number(linf, 1)}</td><td class=\"num\">{_number(psnr_value, 2)}</td>"
            f"<td class=\"num\">{_number(ssim_value, 4)}</td><td class=\"num\">{_number(preview.seconds, 2)}</td>"
            f"<td class=\"num\">{_number(preview.peak_rss_mb, 0)}</td></tr>")
    verb = "cloaked" if run.command == "poison" else "processed"
    head = ("<tr><th scope=\"col\">file</th><th scope=\"col\">original</th>"
            f"<th scope=\"col\">{verb}</th><th scope=\"col\">difference (amplified)</th>"
            "<th scope=\"col\">L∞ (/255)</th><th scope=\"col\">PSNR (dB)</th><th scope=\"col\">SSIM</th>"
            "<th scope=\"col\">seconds</th><th scope=\"col\">peak RSS (MiB)</th></tr>")
    return (f"<table class=\"previews\"><caption class=\"muted\">{escape(run.folder)}</caption>"
            f"<thead>{head}</thead><tbody>{''.join(rows)}</tbody></table>")


def _run_summary(run: Run) -> str:
    from ..score import mean

    parts = [f"{len(run.previews)} image(s)"]
    for label, key, digits in (("mean L∞", "linf", 1), ("mean PSNR", "psnr", 2), ("mean SSIM", "ssim", 4),
                               ("seconds/image", "seconds", 2)):
        value = mean([getattr(p, key) for p in run.previews])
        if value is not None:
            parts.append(f"{label} {value:.{digits}f}")
    return ", ".join(parts)


def _cost_table(steps: Sequence[Step]) -> str:
    rows = []
    for step in steps:
        rows.append(f"<tr><th scope=\"row\">{escape(step.kind)}</th><td>{escape(step.concept)}</td>"
                    f"<td class=\"num\">{_number(step.seconds_per_image, 3)} s/{escape(step.per)}</td>"
                    f"<td class=\"num\">{_number(step.seconds_total, 1)}</td>"
                    f"<td class=\"num\">{_number(step.peak_rss_mb, 0)}</td>"
                    f"<td class=\"num\">{_number(step.peak_cuda_mb, 0)}</td></tr>")
    return ("<table class=\"cost\"><thead><tr><th scope=\"col\">step</th><th scope=\"col\">concept</th>"
            "<th scope=\"col\">seconds per image (training: per step)</th><th scope=\"col\">seconds in all</th>"
            "<th scope=\"col\">peak RSS (MiB)</th><th scope=\"col\">peak CUDA (MiB)</th></tr></thead>"
            f"<tbody>{''.join(rows)}</tbody></table>")


# -------------------------------------------------------------------------------------------------- the grid
def _cell_id(r: int, c: int) -> str:
    return f"cell-{r}-{c}"


def _strip(cell: Cell, thumbs: Thumbnails) -> str:
    figures = []
    if cell.training:
        first = cell.training[0]
        for label, thumb in (("clean", thumbs.of_file(first.clean)), ("poisoned", thumbs.of_file(first.poisoned)),
                             ("defended", thumbs.of_array(first.defended))):
            if thumb is not None:
                figures.append(f"<figure>{_img(thumb, f'{label} training image {first.name} ({first.concept})')}"
                               f"<figcaption>{label}</figcaption></figure>")
    for label in ("best", "median", "worst"):
        sample = cell.picks.get(label)
        if sample is not None:
            thumb = thumbs.of_file(sample.path)
            if thumb is not None:
                figures.append(f"<figure>{_img(thumb, f'{label} sample {sample.image} ({sample.concept})')}"
                               f"<figcaption>{label}</figcaption></figure>")
    return f"<div class=\"strip\">{''.join(figures)}</div>" if figures else ""


def _values(cell: Cell, grid: Grid, tag: str = "span") -> str:
    parts = []
    for name in grid.metrics:
        if name in cell.values:
            parts.append(f"<{tag} class=\"metric\">{escape(name)}</{tag}> <span class=\"value\" "
                         f"data-metric=\"{escape(name)}\">{escape(format_value(cell.values[name]))}</span>")
    return "<br>".join(parts)


def _grid_table(grid: Grid, thumbs: Thumbnails) -> str:
    main = grid.tables[grid.color_metric]
    values = [v for row in main["cells"].values() for v in row.values() if isinstance(v, (int, float))]
    low, high = (min(values), max(values)) if values else (0.0, 1.0)
    head = "".join(f"<th scope=\"col\">{escape(c)}</th>" for c in grid.cols)
    body = []
    for r, row in enumerate(grid.rows):
        cells = []
        for c, col in enumerate(grid.cols):
            cell = grid.cells.get((row, col))
            if cell is None:
                cells.append("<td><span class=\"empty\">no run</span></td>")
                continue
            value = cell.values.get(grid.color_metric)
            style = ""
            if isinstance(value, (int, float)):
                background = viridis((value - low) / (high - low) if high > low else 0.5)
                style = f" style=\"background:{background};color:{text_colour(background)}\""
            label = f"{grid.row_key} {row}, {grid.col_key} {col}"
            if cell.source is None:  # the average row: numbers only
                cells.append(f"<td{style} data-row=\"{escape(row)}\" data-col=\"{escape(col)}\">"
                             f"<div class=\"cell\">{_values(cell, grid)}</div></td>")
                continue
            cells.append(f"<td data-row=\"{escape(row)}\" data-col=\"{escape(col)}\"><button type=\"button\" "
                         f"class=\"cell\" data-r=\"{r}\" data-c=\"{c}\" aria-haspopup=\"dialog\" "
                         f"aria-controls=\"{_cell_id(r, c)}\" aria-label=\"{escape(label)}: "
                         f"{escape(', '.join(f'{k} {format_value(v)}' for k, v in cell.values.items()))}; "
                         f"open details\"{style}>{_values(cell, grid)}</button>{_strip(cell, thumbs)}</td>")
        body.append(f"<tr><th scope=\"row\">{escape(row)}</th>{''.join(cells)}</tr>")
    caption = (f"{escape(grid.color_metric)} (colour, like the --table heatmap: {format_value(low)} to "
               f"{format_value(high)}); rows {escape(grid.row_key)}, columns {escape(grid.col_key)}. "
               "Select a cell for its samples, prompts, seeds and commands.")
    return (f"<table class=\"grid\"><caption class=\"muted\">{caption}</caption><thead><tr>"
            f"<th scope=\"col\">{escape(grid.row_key)} \\ {escape(grid.col_key)}</th>{head}</tr></thead>"
            f"<tbody>{''.join(body)}</tbody></table>"
            f"<p class=\"muted\">{format_value(low)} <span class=\"legend\" role=\"img\" "
            f"aria-label=\"colour scale from {format_value(low)} (dark purple) to {format_value(high)} (yellow)\">"
            f"</span> {format_value(high)}</p>")


def _samples_table(cell: Cell, grid: Grid, thumbs: Thumbnails) -> str:
    metric_heads = "".join(f"<th scope=\"col\">{escape(m)}</th>" for m in grid.metrics)
    rows = []
    for sample in cell.samples:
        metric_cells = "".join(f"<td class=\"num\">{escape(format_value(sample.metrics.get(m), 4))}</td>"
                               for m in grid.metrics)
        rows.append(f"<tr><td>{_img(thumbs.of_file(sample.path), f'generated {sample.image} ({sample.concept})')}"
                    f"</td><th scope=\"row\">{escape(sample.image)}</th><td>{escape(sample.concept)}</td>"
                    f"<td>{escape(sample.prompt or '—')}</td><td class=\"num\">{escape(sample.seed or '—')}</td>"
                    f"{metric_cells}</tr>")
    return ("<table class=\"samples\"><thead><tr><th scope=\"col\">image</th><th scope=\"col\">file</th>"
            "<th scope=\"col\">concept</th><th scope=\"col\">prompt</th><th scope=\"col\">seed</th>"
            f"{metric_heads}</tr></thead><tbody>{''.join(rows)}</tbody></table>")


def _training_table(cell: Cell, thumbs: Thumbnails) -> str:
    if not cell.training:
        return "<p>No train-ti manifest found behind these images.</p>"
    rows = []
    for entry in cell.training:
        poisoned = (_img(thumbs.of_file(entry.poisoned), f"poisoned {entry.name} ({entry.concept})")
                    if entry.poisoned else "— (no poison)")
        defended = (_img(thumbs.of_array(entry.defended), f"defended {entry.name} ({entry.concept})")
                    if entry.defended is not None else "—")
        rows.append(
            f"<tr><th scope=\"row\">{escape(entry.concept)}</th>"
            f"<td>{_img(thumbs.of_file(entry.clean), f'clean {entry.name} ({entry.concept})')}</td>"
            f"<td>{poisoned}</td>"
            f"<td>{defended}"
            f"<br><span class=\"muted\">{escape(entry.defence)}</span></td></tr>")
    return ("<table class=\"training\"><thead><tr><th scope=\"col\">concept</th><th scope=\"col\">clean</th>"
            "<th scope=\"col\">poisoned</th><th scope=\"col\">defended (what training saw)</th></tr></thead>"
            f"<tbody>{''.join(rows)}</tbody></table>")


def _commands(cell: Cell) -> str:
    lines = []
    seen = set()
    for step in cell.steps:
        if step.argv and step.command_line not in seen:
            seen.add(step.command_line)
            lines.append(f"# {step.kind} ({step.concept})\n{step.command_line}")
    return f"<pre>{escape(chr(10).join(lines)) or 'no command lines recorded'}</pre>"


def _dialog(cell: Cell, r: int, c: int, grid: Grid, thumbs: Thumbnails) -> str:
    heading = f"{grid.row_key} {cell.row} × {grid.col_key} {cell.col}"
    ident = _cell_id(r, c)
    full = ", ".join(f"{k} = {v!r}" for k, v in cell.values.items())
    return (f"<dialog id=\"{ident}\" aria-labelledby=\"{ident}-h\"><div class=\"dialog-head\">"
            f"<h2 id=\"{ident}-h\" tabindex=\"-1\">{escape(heading)}</h2>"
            f"<button type=\"button\" class=\"close\">Close</button></div>"
            f"<p>{_values(cell, grid)}</p><p class=\"muted\">Exact values: {escape(full)}. Score file: "
            f"{escape(cell.source)}.</p>"
            f"<h3>Training images</h3>{_training_table(cell, thumbs)}"
            f"<h3>Generated samples ({len(cell.samples)})</h3>{_samples_table(cell, grid, thumbs)}"
            f"<h3>Cost</h3>{_cost_table(cell.steps)}"
            f"<h3>Commands</h3>{_commands(cell)}</dialog>")


def grid_page(grid: Grid, thumbs: Thumbnails, title: str, preview_size: int) -> str:
    dialogs = [_dialog(grid.cells[(row, col)], r, c, grid, thumbs)
               for r, row in enumerate(grid.rows) for c, col in enumerate(grid.cols)
               if (row, col) in grid.cells and grid.cells[(row, col)].source is not None]
    poisons = "".join(f"<details><summary>{escape(run.label)}: {escape(_run_summary(run))}</summary>"
                      f"{_preview_rows(run, thumbs, preview_size)}</details>" for run in grid.runs)
    costs = _cost_table([step for row in grid.rows for col in grid.cols
                         for step in (grid.cells[(row, col)].steps if (row, col) in grid.cells else [])])
    cells = len([1 for cell in grid.cells.values() if cell.source is not None])
    body = (f"<header><h1>{escape(title)}</h1><p>{cells} run(s); cells show "
            f"{escape(', '.join(grid.metrics))} (the numbers of <code>cloak score --table</code>); samples picked "
            f"best / median / worst by {escape(grid.pick_metric)}.</p></header><main>"
            f"<section aria-labelledby=\"grid-h\"><h2 id=\"grid-h\">{escape(grid.row_key)} × "
            f"{escape(grid.col_key)}</h2>{_grid_table(grid, thumbs)}</section>"
            f"<section aria-labelledby=\"poisons-h\"><h2 id=\"poisons-h\">Poisons: original, cloaked, amplified "
            f"difference</h2>{poisons or '<p>No poison manifests found.</p>'}</section>"
            f"<section aria-labelledby=\"cost-h\"><h2 id=\"cost-h\">Cost</h2>{costs}</section>"
            f"{''.join(dialogs)}</main>")
    return _page(title, body)


def run_page(runs: Sequence[Run], thumbs: Thumbnails, title: str, preview_size: int) -> str:
    """The artist's page: each photo before and after, with its numbers."""
    sections = []
    for index, run in enumerate(runs):
        command = Step(run.command, "", run.argv).command_line if run.argv else ""
        sections.append(f"<section aria-labelledby=\"run-{index}\"><h2 id=\"run-{index}\">{escape(run.label)}</h2>"
                        f"<p>{escape(_run_summary(run))}</p>{_preview_rows(run, thumbs, preview_size)}"
                        f"<h3>Command</h3><pre>{escape(command) or 'not recorded'}</pre></section>")
    body = (f"<header><h1>{escape(title)}</h1><p>Each photo before and after, the change amplified so it can be "
            "seen, and how far it moved: L∞ in 1/255 steps (the budget), PSNR and SSIM against the original "
            f"(higher = closer).</p></header><main>{''.join(sections)}</main>")
    return _page(title, body)
