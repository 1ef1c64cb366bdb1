"""``cloak report``: the page's numbers equal ``cloak score --table``'s, rows × cols cells, images with alt text that
exist, nothing fetched from the network, lineage from the manifests, and the single-run (artist) mode."""

from __future__ import annotations

import json
import math
import re
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cloaklab.tests import report_grid


def _runner():
    from typer.testing import CliRunner

    from cloaklab.cli.main import app

    runner = CliRunner()

    def run(args):
        result = runner.invoke(app, [str(a) for a in args], catch_exceptions=False)
        return result.exit_code, result.stdout, result.stderr

    return run


@pytest.fixture(scope="module")
def grid(tmp_path_factory):
    """The toy grid and its report (average row "Psn Avg" over the poisons, without none)."""
    root = tmp_path_factory.mktemp("grid")
    cli = _runner()
    built = report_grid.build(root, cli)
    code, out, err = cli(["report", root / "scores", "-o", root / "report", "--metric", "psnr",
                          "--average-row", "Psn Avg", "--average-exclude", "none"])
    assert code == 0, err
    built["index"] = Path(out.strip())
    built["cli"] = cli
    return built


class Page(HTMLParser):
    """Collects the grid cells' values, the images and every URL-bearing attribute."""

    def __init__(self) -> None:
        super().__init__()
        self.cells: dict[tuple[str, str], dict[str, str]] = {}
        self.buttons = 0
        self.images: list[dict] = []
        self.urls: list[str] = []
        self._cell: tuple[str, str] | None = None
        self._metric: str | None = None
        self._depth = 0

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        for key in ("src", "href"):
            if key in attrs:
                self.urls.append(attrs[key])
        if tag == "img":
            self.images.append(attrs)
        if tag == "td" and "data-row" in attrs:
            self._cell = (attrs["data-row"], attrs["data-col"])
            self.cells[self._cell] = {}
        if tag == "button" and "cell" in (attrs.get("class") or "").split():
            self.buttons += 1
        if tag == "span" and attrs.get("class") == "value" and self._cell is not None:
            self._metric = attrs["data-metric"]

    def handle_endtag(self, tag):
        if tag == "td":
            self._cell = None
        if tag == "span":
            self._metric = None

    def handle_data(self, data):
        if self._metric is not None and self._cell is not None:
            self.cells[self._cell][self._metric] = data


def parse(path: Path) -> Page:
    page = Page()
    page.feed(path.read_text())
    return page


def table_cells(cli, scores, metric, tmp_path) -> dict[tuple[str, str], str]:
    """The cells of ``cloak score --table`` (its markdown file), parsed independently of the report code."""
    out = tmp_path / f"table-{metric}"
    code, stdout, err = cli(["score", "--table", *scores, "--rows", "poison", "--cols", "defense", "--metric", metric,
                             "--average-row", "Psn Avg", "--average-exclude", "none", "-o", out])
    assert code == 0, err
    return report_grid.markdown_cells(Path(stdout.strip()))


# ------------------------------------------------------------------------------------------------ the grid
def test_cells_are_rows_times_cols_and_numbers_equal_score_table(grid, tmp_path):
    page = parse(grid["index"])
    rows = [*report_grid.POISONS, "Psn Avg"]
    assert set(page.cells) == {(r, c) for r in rows for c in report_grid.DEFENCES}
    assert page.buttons == len(report_grid.POISONS) * len(report_grid.DEFENCES)  # the average row opens nothing
    for metric in ("psnr", "ssim", "rmse"):
        expected = table_cells(grid["cli"], grid["scores"], metric, tmp_path)
        assert {cell: values[metric] for cell, values in page.cells.items()} == expected
    # and the table really differs between cells (a constant page would not pass the comparison by luck)
    assert len({values["psnr"] for values in page.cells.values()}) >= 4


def test_every_image_has_alt_text_and_exists_and_nothing_is_fetched(grid):
    page = parse(grid["index"])
    text = grid["index"].read_text()
    assert len(page.images) >= 20
    for image in page.images:
        assert image.get("alt", "").strip(), image
        assert image.get("loading") == "lazy" and int(image["width"]) > 0
        assert not Path(image["src"]).is_absolute() and (grid["index"].parent / image["src"]).is_file()
    assert not re.search(r"https?://", text)
    assert not re.search(r"<(script|link)[^>]+(src|href)=", text)  # CSS and JS are inline
    assert "prefers-color-scheme:dark" in text
    total = sum(p.stat().st_size for p in grid["index"].parent.rglob("*") if p.is_file())
    assert total < 1_000_000  # a toy grid fits in an e-mail


def test_best_median_worst_follow_the_metric_direction(grid):
    from cloaklab.ops.report.model import build_grid

    model = build_grid(grid["scores"], metric="psnr", render_defended=False)
    data = json.loads(grid["scores"][3].read_text())
    by_psnr = sorted(data["images"], key=lambda r: r["metrics"]["psnr"])
    cell = model.cells[("adm+", "jpeg")]
    assert cell.picks["best"].image == by_psnr[-1]["image"] and cell.picks["worst"].image == by_psnr[0]["image"]
    rmse = build_grid(grid["scores"], metric="psnr", pick="rmse", render_defended=False)  # lower is better
    by_rmse = sorted(data["images"], key=lambda r: r["metrics"]["rmse"])
    picks = rmse.cells[("adm+", "jpeg")].picks
    assert picks["best"].path.name == Path(by_rmse[0]["path"]).name
    assert picks["worst"].path.name == Path(by_rmse[-1]["path"]).name
    assert picks["median"].metrics["rmse"] == by_rmse[(len(by_rmse) - 1) // 2]["metrics"]["rmse"]


def test_lineage_prompts_seeds_commands_and_the_defended_image(grid):
    from cloaklab.ops.report.model import build_grid

    model = build_grid(grid["scores"], metric="psnr")
    cell = model.cells[("adm+", "jpeg")]
    assert {s.prompt for s in cell.samples} == {"a <R*> number 0", "a <R*> number 1"}
    assert {s.seed for s in cell.samples} == {1000, 1001}
    kinds = [step.kind for step in cell.steps]
    assert kinds.count("poison") == 2 and kinds.count("train-ti") == 2 and kinds.count("generate") == 2
    poison_step = next(s for s in cell.steps if s.kind == "poison")
    assert poison_step.seconds_per_image == pytest.approx(2.0) and poison_step.peak_rss_mb == 901.0
    train_step = next(s for s in cell.steps if s.kind == "train-ti")
    assert train_step.seconds_per_image == pytest.approx(2.0) and train_step.per == "step"  # 20 s / 10 steps
    score_step = next(s for s in cell.steps if s.kind == "score")  # its time: the score file's cloak.json record
    assert score_step.argv and score_step.seconds_total > 0
    assert score_step.seconds_per_image == pytest.approx(score_step.seconds_total / len(cell.samples))
    entry = next(t for t in cell.training if t.concept == "cat")
    root = grid["root"]
    assert entry.clean == root / "data" / "cat" / "cat_00.png"
    assert entry.poisoned == root / "poisoned" / "adm+" / "cat" / "cat_00.png"
    # jpeg preset: the defended image is the poisoned one after a Pillow JPEG q25 round trip
    import io

    buffer = io.BytesIO()
    Image.open(entry.poisoned).convert("RGB").save(buffer, "JPEG", quality=25)
    expected = np.asarray(Image.open(buffer).convert("RGB"), dtype=int)
    poisoned = np.asarray(Image.open(entry.poisoned).convert("RGB"), dtype=int)
    assert np.abs(entry.defended.astype(int) - expected).max() <= 2
    assert np.abs(poisoned - expected).mean() > 3  # the JPEG really changed it
    nominal = next(t for t in model.cells[("none", "nominal")].training if t.concept == "cat")
    assert nominal.poisoned is None and nominal.clean == root / "data" / "cat" / "cat_00.png"
    assert np.abs(nominal.defended.astype(int) - np.asarray(Image.open(nominal.clean).convert("RGB"))).max() <= 2
    page = grid["index"].read_text()
    assert "cloak generate -o" in page and "--embedding" in page and "cloak train-ti" in page
    assert "cloak poison" in page and "a &lt;R*&gt; number 1" in page


# --------------------------------------------------------------------------------------------- single run
def test_single_run_mode_shows_before_after_with_measured_numbers(grid, tmp_path):
    folder = grid["root"] / "poisoned" / "adm+" / "mug"
    code, out, err = grid["cli"](["report", folder, "-o", tmp_path / "artist", "--json"])
    assert code == 0, err
    summary = json.loads(out)
    assert summary["mode"] == "run" and summary["images"] == 2
    index = Path(summary["index"])
    page = parse(index)
    assert len(page.images) == 6  # original | cloaked | difference, per photo
    before = np.asarray(Image.open(grid["data"] / "mug" / "mug_00.png").convert("RGB"), dtype=np.float64) / 255
    after = np.asarray(Image.open(folder / "mug_00.png").convert("RGB"), dtype=np.float64) / 255
    linf = np.abs(after - before).max() * 255
    psnr = 10 * math.log10(1 / np.mean((after - before) ** 2))
    row = re.search(r"<th scope=\"row\">mug_00.png</th>(.*?)</tr>", index.read_text(), re.DOTALL).group(1)
    numbers = re.findall(r"<td class=\"num\">([^<]+)</td>", row)
    assert float(numbers[0]) == pytest.approx(linf, abs=0.05) and linf == pytest.approx(8, abs=1e-6)
    assert float(numbers[1]) == pytest.approx(psnr, abs=0.01)
    from cloaklab.ops.report.model import Manifests, read_run

    preview = read_run(folder, Manifests()).previews[0]  # the record has no stats: measured from the files
    assert preview.linf == pytest.approx(linf, abs=1e-9) and preview.psnr == pytest.approx(psnr, abs=1e-3)
    # the difference image: no change → mid grey; the largest change → full range
    diff_src = next(img["src"] for img in page.images if img["alt"].startswith("difference of mug_00"))
    diff = np.asarray(Image.open(index.parent / diff_src).convert("RGB"), dtype=int)
    delta = (after - before) * 255
    expected = 255 * (0.5 + delta / (2 * np.abs(delta).max()))
    assert np.abs(diff - expected).max() <= 1 and diff[delta == delta.max()].min() == 255


def test_report_refuses_an_output_that_is_not_a_report(grid, tmp_path):
    cli = grid["cli"]
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    code, _, err = cli(["report", grid["root"] / "scores", "-o", tmp_path / "busy"])
    assert code == 2 and "did not write" in err
    code, _, err = cli(["report", grid["root"] / "scores", "-o", grid["root"] / "scores" / "r"])
    assert code == 2 and "inside the input" in err
    code, _, err = cli(["report", grid["scores"][0], "-o", tmp_path / "r", "--metric", "nope"])
    assert code == 2 and "--metric nope" in err
    code, _, err = cli(["report", grid["index"].parent, "-o", grid["index"].parent])  # a rerun into itself
    assert code == 2


def test_rerun_replaces_its_own_report(grid, tmp_path):
    cli = grid["cli"]
    out = tmp_path / "again"
    assert cli(["report", *grid["scores"], "-o", out])[0] == 0
    stale = out / "thumbs" / ("0" * 20 + ".png")
    stale.write_bytes(b"old")
    assert cli(["report", *grid["scores"], "-o", out, "--metric", "ssim"])[0] == 0
    assert not stale.exists() and "psnr" in (out / "index.html").read_text()


def test_rerun_never_prunes_through_a_symlinked_thumbs_folder(grid, tmp_path):
    cli = grid["cli"]
    out = tmp_path / "linked"
    assert cli(["report", *grid["scores"], "-o", out])[0] == 0
    elsewhere = tmp_path / "mine"
    (out / "thumbs").rename(elsewhere)
    (out / "thumbs").symlink_to(elsewhere, target_is_directory=True)
    kept = elsewhere / ("0" * 20 + ".png")
    kept.write_bytes(b"the user's")
    code, _, err = cli(["report", *grid["scores"], "-o", out, "--metric", "ssim"])
    assert code == 2 and "symlink" in err
    assert kept.read_bytes() == b"the user's"


def test_single_run_mode_reads_the_records_of_a_run_still_going(tmp_path):
    """A run's records sit in its record log until the run ends: the report reads them as cloak score does."""
    from cloaklab.ops.manifest import Manifest
    from cloaklab.ops.report.model import Manifests, read_run

    source, out = tmp_path / "clean.png", tmp_path / "out"
    Image.fromarray(np.full((8, 8, 3), 100, np.uint8)).save(source)
    out.mkdir()
    Image.fromarray(np.full((8, 8, 3), 104, np.uint8)).save(out / "clean.png")
    manifest = Manifest(out, "poison", {"eps": 4})
    manifest.start_run()
    manifest.record("clean.png", output="clean.png", status="done", source=str(source))
    assert "clean.png" not in json.loads((out / "cloak.json").read_text())["files"]  # only in the log so far
    previews = read_run(out, Manifests()).previews
    manifest.close()
    assert [p.name for p in previews] == ["clean.png"] and previews[0].linf == pytest.approx(4, abs=1e-9)


def test_manifest_records_cwd_and_peak_memory(tmp_path):
    from cloaklab.ops.manifest import Manifest

    manifest = Manifest(tmp_path / "out", "poison", {"eps": 8})
    manifest.start_run()
    manifest.record("a.png", status="done")
    manifest.close()  # records go to the process's log first; closing merges them into cloak.json
    data = json.loads((tmp_path / "out" / "cloak.json").read_text())
    assert data["cwd"] == str(Path.cwd())
    assert data["files"]["a.png"]["peak_rss_mb"] > 10  # this Python process holds well over 10 MiB


def test_report_files_get_the_users_umask(grid, tmp_path):
    import os
    import stat

    previous = os.umask(0o022)
    try:
        assert grid["cli"](["report", grid["scores"][0], "-o", tmp_path / "shared"])[0] == 0
    finally:
        os.umask(previous)
    files = [p for p in (tmp_path / "shared").rglob("*") if p.is_file()]
    assert files and {stat.S_IMODE(p.stat().st_mode) for p in files} == {0o644}  # mkstemp alone gives 0o600


def test_defended_image_with_a_loss_mask_darkens_what_the_loss_ignores(tmp_path):
    from cloaklab.ops.report.model import defended_image
    from cloaklab.tests.conftest import photo

    image = np.asarray(photo("astronaut", 32))
    Image.fromarray(image).save(tmp_path / "a.png")
    mask = np.zeros((32, 32), np.uint8)
    mask[8:24, 4:20] = 255
    (tmp_path / "masks").mkdir()
    Image.fromarray(mask).save(tmp_path / "masks" / "a.png")
    shown = defended_image(tmp_path / "a.png", {"preset": "lm", "mask_mode": "lm", "dilate": 0},
                           tmp_path / "masks").astype(float)
    inside, outside = mask > 0, mask == 0
    assert np.abs(shown[inside] - image[inside]).max() <= 2  # what the loss sees, unchanged (no JPEG in lm)
    assert np.abs(shown[outside] - 0.3 * image[outside]).max() <= 2  # the rest at 30 %
    unmasked = defended_image(tmp_path / "a.png", {"preset": "lm", "mask_mode": "none"}, tmp_path / "masks")
    assert np.abs(unmasked.astype(float) - image).max() <= 2
