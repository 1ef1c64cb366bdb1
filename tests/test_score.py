"""``cloak score``: offline metrics against their libraries, averaging order, table merge, tiny-backbone metrics."""

from __future__ import annotations

import csv
import io
import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from cloaklab.tests.conftest import photo, photo_tensor


def _jpeg(image: Image.Image, quality: int) -> np.ndarray:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=quality)
    return np.asarray(Image.open(buffer).convert("RGB"))


# ------------------------------------------------------------------------------------------- pixel metrics
def test_psnr_ssim_agree_with_skimage_on_photos():
    from skimage.metrics import peak_signal_noise_ratio, structural_similarity

    from cloaklab.ops.metrics.basic import psnr, ssim

    clean = np.asarray(photo("chelsea", 96))
    degraded = _jpeg(photo("chelsea", 96), 30)
    expected_psnr = peak_signal_noise_ratio(clean, degraded, data_range=255)
    expected_ssim = structural_similarity(clean, degraded, data_range=255, channel_axis=2)
    assert psnr(degraded, clean) == pytest.approx(expected_psnr, abs=1e-3)
    assert ssim(degraded, clean) == pytest.approx(expected_ssim, abs=1e-5)
    as_tensor = torch.from_numpy(degraded.astype(np.float32) / 255).permute(2, 0, 1)
    assert psnr(as_tensor, clean) == pytest.approx(expected_psnr, abs=1e-3)


def test_uint8_inputs_do_not_overflow():
    from cloaklab.ops.metrics.basic import psnr, rmse

    a = np.full((16, 16, 3), 10, np.uint8)
    b = np.full((16, 16, 3), 250, np.uint8)  # uint8 a - b wraps to 16: a naive PSNR would read ~24 dB
    assert psnr(a, b) == pytest.approx(20 * math.log10(255 / 240), abs=1e-3)
    assert rmse(a, b) == pytest.approx(240 / 255, abs=1e-6)


def test_brisque_rises_with_jpeg_degradation():
    from cloaklab.ops.metrics.brisque_score import brisque

    image = photo("astronaut", 128)
    scores = [brisque(_jpeg(image, q)) for q in (95, 15, 3)]
    assert scores[0] < scores[1] < scores[2]


# the brisque PyPI package 0.2.0 (libsvm; bench/brisque_check.py) on full-size skimage.data photos, 2026-12-01
BRISQUE_PACKAGE_SCORES = {"chelsea": 2.870766629424878, "coffee": 3.0479264284828957,
                          "immunohistochemistry": 29.516242493367116}  # the last has saturated (flat) areas


@pytest.mark.parametrize("name", sorted(BRISQUE_PACKAGE_SCORES))
def test_brisque_matches_the_brisque_package(name):
    from skimage import data

    from cloaklab.ops.metrics.brisque_score import brisque

    assert brisque(getattr(data, name)()) == pytest.approx(BRISQUE_PACKAGE_SCORES[name], abs=1e-6)


def test_brisque_of_a_greyscale_photo_matches_the_package_and_a_flat_image_has_none():
    from skimage import data

    from cloaklab.ops.metrics.brisque_score import BrisqueMetric, brisque

    camera = np.repeat(data.camera()[..., None], 3, axis=2)
    assert brisque(camera) == pytest.approx(-7.879404294309921, abs=1e-6)  # package value, as above
    assert BrisqueMetric().score([torch.full((3, 32, 32), 0.5)], [None]) == [None]  # no contrast: NaN → None


def test_aggd_fit_recovers_closed_form_shapes_and_asymmetry():
    from cloaklab.ops.metrics.brisque_score import aggd_fit

    rng = np.random.default_rng(0)
    alpha, eta, left, right = aggd_fit(rng.normal(0, 0.5, 400_000))  # Gaussian: shape 2, symmetric
    assert alpha == pytest.approx(2.0, abs=0.03) and abs(eta) < 0.005
    assert left == pytest.approx(0.5, rel=0.01) and right == pytest.approx(0.5, rel=0.01)
    alpha, _, _, _ = aggd_fit(rng.laplace(0, 1.0, 400_000))  # Laplace: shape 1
    assert alpha == pytest.approx(1.0, abs=0.02)
    # split normal, σ_l = 1 left of 0 and σ_r = 2 right of it (mass σ_l : σ_r, so the density is continuous at 0):
    # an AGGD of shape 2 with η = (σ_r − σ_l)·sqrt(2/π), its mean
    draws = np.abs(rng.normal(0, 1, 300_000))
    split = np.concatenate([-draws[:100_000] * 1.0, draws[100_000:] * 2.0])
    alpha, eta, left, right = aggd_fit(split)
    assert alpha == pytest.approx(2.0, abs=0.03)
    assert left == pytest.approx(1.0, rel=0.01) and right == pytest.approx(2.0, rel=0.01)
    assert eta == pytest.approx(math.sqrt(2 / math.pi), rel=0.02)


def test_brisque_scores_blurred_and_noisy_photos_worse():
    import cv2
    from skimage import data

    from cloaklab.ops.metrics.brisque_score import brisque

    clean = np.ascontiguousarray(data.rocket()[100:300, 200:456])
    blurred = cv2.GaussianBlur(clean, (0, 0), 2.5)
    noise = np.random.default_rng(0).normal(0, 20, clean.shape)
    noisy = np.clip(clean + noise, 0, 255).round().astype(np.uint8)
    assert brisque(clean) == pytest.approx(16.91857363971198, abs=1e-6)  # the package's value for this crop
    assert brisque(blurred) > brisque(clean) + 10
    assert brisque(noisy) > brisque(clean) + 10


def test_face_detection_finds_astronaut_and_fails_on_flat_image():
    from cloaklab.ops.metrics.faces import FaceMetric, detect_faces

    astronaut = photo_tensor("astronaut", 256)
    boxes = detect_faces(astronaut)
    assert len(boxes) >= 1
    x, y, w, h = boxes[0]
    assert 70 < x + w / 2 < 150 and 30 < y + h / 2 < 90  # Eileen Collins' face, upper middle of the photo
    flat = torch.full((3, 256, 256), 0.5)
    assert detect_faces(flat) == []
    fdfr = FaceMetric("fdfr")
    assert fdfr.score([astronaut, flat], [None, None]) == [0.0, 1.0]


# ----------------------------------------------------------------------------------------------- averaging
def test_per_concept_then_dataset_averaging_is_exact():
    from cloaklab.ops.score import aggregate

    records = [{"concept": "a", "metrics": {"m": 1.0}}, {"concept": "a", "metrics": {"m": 2.0}},
               {"concept": "a", "metrics": {"m": 3.0}}, {"concept": "a", "metrics": {"m": None}},
               {"concept": "b", "metrics": {"m": 10.0}}]
    concepts, dataset = aggregate(records, ["m", "fid"], {"fid": {"a": 4.0, "b": None}})
    assert concepts["a"]["m"] == 2.0 and concepts["b"]["m"] == 10.0
    assert dataset["m"] == 6.0  # mean of concept means, not the pooled mean 4.0
    assert dataset["fid"] == 4.0 and dataset["concepts"] == 2 and dataset["images"] == 5


def test_table_merge_produces_expected_cells(tmp_path):
    from cloaklab.ops.score import heatmap_png, merge_tables, table_csv, table_markdown

    runs = [("clean", "nominal", 0.46), ("adm+", "nominal", 0.21), ("adm+", "szt", 0.45), ("ea", "nominal", 0.29),
            ("ea", "szt", 0.47), ("clean", "szt", 0.50)]
    paths = []
    for poison, defense, value in runs:
        path = tmp_path / f"{poison}-{defense}.json"
        path.write_text(json.dumps({"metrics": ["dinov2"], "labels": {"poison": poison, "defense": defense},
                                    "dataset": {"dinov2": value}}))
        paths.append(path)
    table = merge_tables(paths, "poison", "defense", average_row="Psn Avg", exclude=["clean"])
    assert table["rows"] == ["clean", "adm+", "ea", "Psn Avg"] and table["cols"] == ["nominal", "szt"]
    assert table["cells"]["ea"]["szt"] == 0.47
    assert table["cells"]["Psn Avg"]["nominal"] == pytest.approx(0.25)
    assert table["cells"]["Psn Avg"]["szt"] == pytest.approx(0.46)
    assert "| adm+ | 0.21 | 0.45 |" in table_markdown(table)
    rows = list(csv.reader(io.StringIO(table_csv(table))))
    assert rows[0] == ["poison\\defense", "nominal", "szt"] and rows[2] == ["adm+", "0.210000", "0.450000"]
    with Image.open(io.BytesIO(heatmap_png(table))) as heatmap:
        assert heatmap.format == "PNG" and heatmap.size[0] > 100


def test_table_cli_names_missing_label(cli, tmp_path):
    path = tmp_path / "run.json"
    path.write_text(json.dumps({"metrics": ["psnr"], "labels": {"poison": "adm+"}, "dataset": {"psnr": 30.0}}))
    code, out, err = cli(["score", "--table", path, "--rows", "poison", "--cols", "defense", "-o", tmp_path / "t"])
    assert code == 2 and "defense" in err


def test_table_never_replaces_a_file_cloak_did_not_write(cli, tmp_path):
    path = tmp_path / "run.json"
    path.write_text(json.dumps({"metrics": ["psnr"], "labels": {"poison": "a", "defense": "b"},
                                "dataset": {"psnr": 30.0}}))
    args = ["score", "--table", path, "--rows", "poison", "--cols", "defense", "-o"]
    (tmp_path / "notes.csv").write_text("mine\n")
    code, out, err = cli([*args, tmp_path / "notes.md"])
    assert code == 2 and "not written by cloak" in err
    assert (tmp_path / "notes.csv").read_text() == "mine\n" and not (tmp_path / "notes.md").exists()
    code, out, err = cli([*args, tmp_path / "table.md"])
    assert code == 0, err
    code, out, err = cli([*args, tmp_path / "table"])  # an earlier table is cloak's own: replaced
    assert code == 0, err
    assert "30.00" in (tmp_path / "table.md").read_text()


def test_score_cleans_stale_temporaries_only_beside_its_file(cli, tmp_path):
    """A score file's folder is shared with anything: its manifest's start cleans old temporaries there, never in
    the folders below (a project root would be walked whole)."""
    import os

    path = tmp_path / "run.json"
    path.write_text(json.dumps({"metrics": ["psnr"], "labels": {"poison": "a", "defense": "b"},
                                "dataset": {"psnr": 30.0}}))
    (tmp_path / "elsewhere").mkdir()
    beside, below = tmp_path / "step-000001.tmp", tmp_path / "elsewhere" / "step-000001.tmp"
    for stale in (beside, below):
        stale.write_bytes(b"x")
        os.utime(stale, (1, 1))
    code, out, err = cli(["score", "--table", path, "--rows", "poison", "--cols", "defense", "-o", tmp_path / "t"])
    assert code == 0, err
    assert not beside.exists() and below.read_bytes() == b"x"


# ---------------------------------------------------------------------------------------- CLI, offline metrics
@pytest.fixture
def scored_folders(tmp_path):
    """gen/<concept>/*.png (noisy copies) and ref/<concept>/*.png (clean), 64 px."""
    rng = np.random.default_rng(0)
    for name, concept in (("astronaut", "person"), ("coffee", "person"), ("chelsea", "cat"), ("rocket", "cat")):
        clean = np.asarray(photo(name, 64))
        (tmp_path / "ref" / concept).mkdir(parents=True, exist_ok=True)
        (tmp_path / "gen" / concept).mkdir(parents=True, exist_ok=True)
        Image.fromarray(clean).save(tmp_path / "ref" / concept / f"{name}.png")
        noisy = np.clip(clean.astype(int) + rng.integers(-6, 7, clean.shape), 0, 255).astype(np.uint8)
        Image.fromarray(noisy).save(tmp_path / "gen" / concept / f"{name}.png")
    return tmp_path


def test_score_cli_records_means_csv_and_partial_exit(cli, scored_folders):
    root = scored_folders
    (root / "gen" / "cat" / "extra.png").write_bytes((root / "gen" / "cat" / "rocket.png").read_bytes())  # no pair
    (root / "gen" / "cat" / "broken.png").write_bytes(b"not an image")
    out = root / "scores.json"
    code, stdout, err = cli(["score", root / "gen", "-r", "--ref", root / "ref", "--metrics", "psnr,rmse", "-o", out,
                             "--csv", root / "scores.csv", "--label", "poison=noise"])
    assert code == 3, err
    assert stdout.strip() == str(out)
    data = json.loads(out.read_text())
    by_image = {r["image"]: r for r in data["images"]}
    assert by_image["cat/extra.png"]["status"] == "partial" and by_image["cat/extra.png"]["metrics"]["psnr"] is None
    assert {r["file"] for r in data["rejected"]} == {"cat/broken.png", "cat/extra.png"}
    expected = np.mean([by_image[f"cat/{n}.png"]["metrics"]["psnr"] for n in ("chelsea", "rocket")])
    assert data["concepts"]["cat"]["psnr"] == pytest.approx(expected)
    assert data["dataset"]["psnr"] == pytest.approx((data["concepts"]["cat"]["psnr"] +
                                                      data["concepts"]["person"]["psnr"]) / 2)
    assert 30 < data["dataset"]["psnr"] < 45 and data["labels"] == {"poison": "noise"}
    rows = list(csv.DictReader((root / "scores.csv").open()))
    assert rows[-1]["level"] == "dataset" and float(rows[-1]["psnr"]) == pytest.approx(data["dataset"]["psnr"],
                                                                                         abs=1e-5)


# ----------------------------------------------------------------------------------- tiny-backbone metrics
def test_dinov2_similarity_reference_features_computed_once():
    from cloaklab.ops.metrics.base import ImageContext
    from cloaklab.ops.metrics.dino import DinoSimilarity, tiny_dinov2

    model = tiny_dinov2()
    calls = []
    model.register_forward_hook(lambda module, args, output: calls.append(1))
    metric = DinoSimilarity(model=model)
    astronaut, rocket = photo_tensor("astronaut"), photo_tensor("rocket")
    metric.prepare({"a": [astronaut], "b": [astronaut]})  # a shared reference is embedded once
    assert len(calls) == 1
    values = metric.score([astronaut, rocket], [ImageContext("x", "a"), ImageContext("y", "a")])
    assert values[0] == pytest.approx(1.0, abs=1e-5) and values[1] < values[0] - 1e-4
    assert len(calls) == 2


def test_clip_score_reads_generate_manifest_and_removes_token(cli, tmp_path):
    from cloaklab.ops.metrics.clip import backbone
    from cloaklab.ops.similarity import cosine_matrix

    gen = tmp_path / "gen"
    gen.mkdir()
    photo("chelsea", 64).save(gen / "p00_i000.png")
    (gen / "cloak.json").write_text(json.dumps({"command": "generate", "params": {"token": "<R*>"}, "files": {
        "p00_i000.png": {"prompt": "a <R*> on the beach", "seed": 1, "status": "done"}}}))
    out = tmp_path / "s.json"
    code, _, err = cli(["score", gen, "--metrics", "clip,clip-iqa,clip-iqac,liqe,q", "--clip-model", "tiny",
                        "--class", "cat", "-o", out])
    assert code == 0, err
    record = json.loads(out.read_text())["images"][0]
    assert record["prompt"] == "a on the beach"
    clip = backbone("tiny", torch.device("cpu"))
    image = clip.images([photo_tensor("chelsea")], ("check",))
    expected = 2.5 * max(cosine_matrix(image, clip.text(["a on the beach"])).item(), 0)
    metrics = record["metrics"]
    assert metrics["clip"] == pytest.approx(expected, abs=1e-3)
    assert 0 <= metrics["clip-iqa"] <= 1 and -1 <= metrics["clip-iqac"] <= 1 and 1 <= metrics["liqe"] <= 5
    assert metrics["q"] == pytest.approx((((metrics["liqe"] - 1) / 4) * 2 - 1) / 2 + metrics["clip-iqac"] / 2,
                                         abs=1e-5)


class _FixedClip:
    """A stand-in CLIP backbone returning fixed embeddings (image by name, text by prompt)."""

    def __init__(self, images: dict, texts: dict):
        self._images, self._texts = images, texts

    def images(self, images, key):
        return torch.tensor([self._images[name] for name in key], dtype=torch.float32)

    def text(self, prompts):
        return torch.tensor([self._texts[prompt] for prompt in prompts], dtype=torch.float32)


def test_clip_score_is_hessels_clipscore_on_fixed_embeddings():
    """CLIP-S = 2.5·max(cos, 0) (Hessel et al. 2021 Eq. 1), values typed by hand from the vectors."""
    from cloaklab.ops.metrics.base import ImageContext
    from cloaklab.ops.metrics.clip import ClipMetric

    clip = _FixedClip({"a": [3.0, 4.0, 0.0], "b": [1.0, 1.0, 0.0], "c": [1.0, 0.0, 0.0]},
                      {"p": [4.0, 3.0, 0.0], "q": [2.0, 0.0, 0.0], "r": [-1.0, 1.0, 0.0],
                       "A photo depicts q": [0.0, 5.0, 0.0]})
    contexts = [ImageContext("a", "x", prompt="p"), ImageContext("b", "x", prompt="q"),
                ImageContext("c", "x", prompt="r")]
    images = [torch.zeros(3, 8, 8)] * 3
    # cos = 24/25, 1/√2 and −1/√2 (clipped to 0)
    assert ClipMetric("clip", clip).score(images, contexts) == pytest.approx([2.4, 2.5 / 2**0.5, 0.0], abs=1e-6)
    assert ClipMetric("clip", clip, scale=100).score(images, contexts) == pytest.approx([96.0, 100 / 2**0.5, 0.0],
                                                                                       abs=1e-4)
    prefixed = ClipMetric("clip", clip, prefix="A photo depicts ").score(images[1:2], contexts[1:2])
    assert prefixed == pytest.approx([2.5 / 2**0.5], abs=1e-6)  # [1,1,0]·[0,5,0]: cos 1/√2


def test_clip_iqa_and_iqac_are_softmax_at_logit_scale_100_on_fixed_embeddings():
    """CLIP-IQA: softmax(100·cos) over ("Good photo.", "Bad photo."), P(good); IQAC: P(good {class}) − P(bad)."""
    import math

    from cloaklab.ops.metrics.base import ImageContext
    from cloaklab.ops.metrics.clip import ClipMetric

    # unit vectors: cos(image, good) = 0.3, cos(image, bad) = 0.28
    good, bad = [0.3, math.sqrt(1 - 0.09), 0.0], [0.28, 0.0, math.sqrt(1 - 0.28**2)]
    clip = _FixedClip({"a": [1.0, 0.0, 0.0]}, {"Good photo.": good, "Bad photo.": bad,
                                               "a good photo of a cat": bad, "a bad photo of a cat": good})
    context = [ImageContext("a", "x", class_name="cat")]
    p_good = 1 / (1 + math.exp(-100 * (0.3 - 0.28)))  # e^{30}/(e^{30}+e^{28})
    assert ClipMetric("clip-iqa", clip).score([torch.zeros(3, 8, 8)], context)[0] == pytest.approx(p_good, abs=1e-6)
    # the class prompts are swapped: P(good) − P(bad) = (1 − p) − p
    assert ClipMetric("clip-iqac", clip).score([torch.zeros(3, 8, 8)], context)[0] == pytest.approx(1 - 2 * p_good,
                                                                                                  abs=1e-6)


def test_q_formula_endpoints():
    from cloaklab.ops.metrics.clip import liqe_prompts, q_score

    assert q_score(5, 1) == 1 and q_score(1, -1) == -1 and q_score(3, 0) == 0
    assert len(liqe_prompts()) == 9 * 11 * 5


def test_lpips_and_fid_order_with_tiny_backbones():
    from cloaklab.ops.metrics.base import ImageContext
    from cloaklab.ops.metrics.fid import FidMetric
    from cloaklab.ops.metrics.lpips import LpipsMetric

    clean = photo_tensor("coffee")
    generator = torch.Generator().manual_seed(0)
    slight = (clean + 0.02 * torch.randn(clean.shape, generator=generator)).clamp(0, 1)
    strong = (clean + 0.3 * torch.randn(clean.shape, generator=generator)).clamp(0, 1)
    lpips = LpipsMetric("tiny")
    values = lpips.score([clean, slight, strong], [ImageContext(n, "c", clean) for n in "abc"])
    assert values[0] == pytest.approx(0, abs=1e-6) and values[0] < values[1] < values[2]

    refs = [photo_tensor(n) for n in ("astronaut", "chelsea", "coffee", "rocket")]
    fid = FidMetric("tiny")
    fid.prepare({"same": refs, "noisy": refs})
    fid.score(refs, [ImageContext(str(i), "same") for i in range(4)])
    fid.score([(r + 0.3 * torch.randn(r.shape, generator=generator)).clamp(0, 1) for r in refs],
              [ImageContext(str(i), "noisy") for i in range(4)])
    values = fid.concept_values()
    assert values["same"] == pytest.approx(0, abs=1e-3) and values["noisy"] > values["same"] + 1e-3


def test_identity_metrics_exclude_or_penalize_faceless_images():
    from cloaklab.ops.metrics.base import ImageContext
    from cloaklab.ops.metrics.faces import FaceMetric

    face, flat = photo_tensor("astronaut", 256), torch.full((3, 256, 256), 0.5)
    ism, ims = FaceMetric("ism", arcface="tiny"), FaceMetric("ims", arcface="tiny", vggface="tiny")
    for metric in (ism, ims):
        metric.prepare({"p": [face]})
    contexts = [ImageContext("a", "p"), ImageContext("b", "p")]
    assert ism.score([face, flat], contexts)[0] == pytest.approx(1.0, abs=1e-5)
    assert ism.score([face, flat], contexts)[1] is None  # excluded from the mean, not counted as 0
    assert ims.score([face, flat], contexts) == [pytest.approx(1.0, abs=1e-5), -1.0]


def test_missing_backbone_weights_give_one_line(cli, tmp_path):
    photo("rocket", 64).save(tmp_path / "a.png")
    code, out, err = cli(["score", tmp_path / "a.png", "--ref", tmp_path / "a.png", "--metrics", "dinov2",
                          "--dinov2-model", str(tmp_path / "no-such-dinov2"), "-o", tmp_path / "s.json"])
    assert code == 1 and out == ""
    assert err.strip().startswith("cloak: error: DINOv2 weights") and len(err.strip().splitlines()) == 1
    code, _, err = cli(["score", tmp_path / "a.png", "--metrics", "ism", "-o", tmp_path / "s.json"])
    assert code == 2 and "--ref" in err


def test_concepts_from_folders_fields_and_patterns(tmp_path):
    from pathlib import PurePosixPath

    from cloaklab.ops.errors import RejectedInput, UsageError
    from cloaklab.ops.io import InputItem
    from cloaklab.ops.score import check_group_by, concept_of, remove_token

    nested = InputItem(tmp_path / "gen" / "dog" / "p00_i000.png", PurePosixPath("dog/p00_i000.png"))
    flat = InputItem(tmp_path / "cat_gen" / "p01_i002.png", PurePosixPath("p01_i002.png"))
    assert concept_of(nested, "folder", {}, {}) == "dog" and concept_of(flat, "folder", {}, {}) == "cat_gen"
    assert concept_of(flat, "none", {}, {}) == "all"
    assert concept_of(flat, "regex:p(\\d+)_", {}, {}) == "01"
    assert concept_of(flat, "field:token", {"token": "<dog>"}, {}) == "<dog>"
    assert concept_of(flat, "field:token", {}, {"params": {"token": "<cat>"}}) == "<cat>"
    with pytest.raises(RejectedInput):
        concept_of(flat, "field:class", {}, {})
    with pytest.raises(UsageError):
        check_group_by("regex:(")
    assert remove_token("a <R*> on the  beach", "<R*>") == "a on the beach"


def test_dinov2_similarity_is_the_mean_cosine_to_each_clean_image_on_fixed_embeddings(monkeypatch):
    """Paper 000 §5.1.3: mean over the concept's clean images of cos(CLS(gen), CLS(clean)); typed by hand."""
    from cloaklab.ops.metrics.base import ImageContext
    from cloaklab.ops.metrics.dino import DinoSimilarity

    vectors = {1: [1.0, 0.0], 2: [0.0, 2.0], 3: [3.0, 4.0]}  # image "value" → its embedding
    metric = DinoSimilarity(model=object())
    monkeypatch.setattr(metric, "embed", lambda images: torch.tensor([vectors[int(i[0, 0, 0])] for i in images]))
    images = {k: torch.full((3, 4, 4), float(k)) for k in vectors}
    metric.prepare({"c": [images[1], images[2]]})
    # cos([3,4], [1,0]) = 0.6, cos([3,4], [0,2]) = 0.8 → 0.7; cos([1,0], [1,0]) = 1, cos([1,0], [0,2]) = 0 → 0.5
    values = metric.score([images[3], images[1]], [ImageContext("a", "c"), ImageContext("b", "c")])
    assert values == pytest.approx([0.7, 0.5], abs=1e-6)


def test_fid_equals_the_frechet_distance_computed_with_scipy():
    """FID = ‖μ_r − μ_g‖² + Tr(Σ_r + Σ_g − 2 (Σ_r Σ_g)^{1/2}) (Heusel et al. 2017), unbiased covariances, on a
    stand-in 6-d feature (per-channel mean and spread) so scipy can compute it independently."""
    from scipy import linalg

    from cloaklab.ops.metrics.base import ImageContext
    from cloaklab.ops.metrics.fid import FidMetric

    class ChannelStats(torch.nn.Module):
        num_features = 6

        def forward(self, images):
            images = images.double() / 255 if images.dtype == torch.uint8 else images.double()
            return torch.cat([images.mean((2, 3)), images.std((2, 3))], 1)

    generator = torch.Generator().manual_seed(0)
    names = ("astronaut", "chelsea", "coffee", "rocket", "camera", "cat", "hubble_deep_field", "immunohistochemistry")
    real = [photo_tensor(n, 32) for n in names]
    fake = [(r * 0.8 + 0.1 * torch.rand(r.shape, generator=generator)).clamp(0, 1) for r in real]
    metric = FidMetric("tiny")
    metric.extractor = ChannelStats()
    metric.prepare({"c": real})
    metric.score(fake, [ImageContext(str(i), "c") for i in range(len(fake))])
    ours = metric.concept_values()["c"]

    def stats_of(images):  # a custom extractor gets the float images as they are (no uint8 step)
        stacked = torch.stack(images).double()
        feats = torch.cat([stacked.mean((2, 3)), stacked.std((2, 3))], 1).numpy()
        return feats.mean(0), np.cov(feats, rowvar=False)

    (mu_r, cov_r), (mu_g, cov_g) = stats_of(real), stats_of(fake)
    root = linalg.sqrtm(cov_r @ cov_g).real
    expected = float(((mu_r - mu_g) ** 2).sum() + np.trace(cov_r + cov_g - 2 * root))
    assert ours == pytest.approx(expected, rel=1e-4, abs=1e-8)


def test_liqe_is_the_expected_level_under_softmax_100_on_fixed_embeddings():
    """LIQE: softmax(100·cos) over the 495 scene × distortion × level prompts, marginalized to levels 1..5, expected
    level. Only the "good" prompts (level 4) are aligned with the image (cos 0.1 vs 0): with 99 prompts per level,
    E = (4·99·e^{10} + (1+2+3+5)·99) / (99·e^{10} + 4·99)."""
    import math

    from cloaklab.ops.metrics.base import ImageContext
    from cloaklab.ops.metrics.clip import ClipMetric, liqe_prompts

    aligned = [0.1, math.sqrt(1 - 0.01), 0.0]
    texts = {prompt: (aligned if prompt.endswith("of good quality") else [0.0, 0.0, 1.0]) for prompt in liqe_prompts()}

    class Fixed:
        def images(self, images, key):
            return torch.tensor([[1.0, 0.0, 0.0]] * len(images))

        def text(self, prompts):
            return torch.tensor([texts[p] for p in prompts])

    value = ClipMetric("liqe", Fixed()).score([torch.zeros(3, 8, 8)], [ImageContext("a", "c")])[0]
    e = math.exp(10)
    assert value == pytest.approx((4 * e + 11) / (e + 4), abs=1e-5)


def test_toy_metrics_by_hand_on_a_stand_in_judge():
    """toy-sim = mean cosine of shape features to every clean reference; toy-acc = 1 when the predicted shape is the
    concept's (``--class`` if a toy shape, else the references' majority vote) — typed by hand."""
    from cloaklab.ops.metrics.base import ImageContext
    from cloaklab.ops.metrics.toy import ToyMetric

    class Judge:  # an image's mean brightness picks its features and its shape
        def features(self, batch):
            table = {0: [1.0, 0.0], 1: [0.0, 1.0], 2: [1.0, 1.0]}
            return torch.tensor([table[int(round(float(b.mean()) * 2))] for b in batch])

        def predict(self, batch):
            return [{"shape": ("circle", "square", "star")[int(round(float(b.mean()) * 2))]} for b in batch]

    level = {k: torch.full((3, 64, 64), k / 2) for k in (0, 1, 2)}
    sim, acc = ToyMetric("toy-sim", judge=Judge()), ToyMetric("toy-acc", judge=Judge())
    references = {"c": [level[0], level[0], level[1]]}  # majority vote: circle
    sim.prepare(references)
    acc.prepare(references)
    contexts = [ImageContext("a", "c"), ImageContext("b", "c")]
    # [1,1] vs [1,0],[1,0],[0,1]: (1/√2)·3/3; [0,1] vs the same: (0 + 0 + 1)/3
    assert sim.score([level[2], level[1]], contexts) == pytest.approx([2**-0.5, 1 / 3], abs=1e-6)
    assert acc.score([level[0], level[1]], contexts) == [1.0, 0.0]
    assert acc.score([level[0], level[1]], [ImageContext("a", "c", class_name="square")] * 2) == [0.0, 1.0]


def test_lpips_wrapper_hands_torchmetrics_unit_range_images_with_normalize():
    """torchmetrics' LPIPS network expects [-1, 1] unless ``normalize=True`` (then [0, 1] is rescaled): our images are
    [0, 1], so the wrapper must pass them unchanged with ``normalize=True`` — a stand-in network records the call."""
    from cloaklab.ops.metrics.lpips import LPIPSNet

    calls = []

    class Recorder(torch.nn.Module):
        def forward(self, a, b, normalize=False):
            calls.append((a.clone(), b.clone(), normalize))
            return (a - b).abs().mean((1, 2, 3), keepdim=True)

    a, b = torch.full((2, 3, 8, 8), 0.75), torch.full((2, 3, 8, 8), 0.25)
    values = LPIPSNet(Recorder())(a, b)
    assert values.shape == (2,) and torch.allclose(values, torch.full((2,), 0.5))
    assert calls[0][2] is True and torch.equal(calls[0][0], a) and torch.equal(calls[0][1], b)


# ------------------------------------------------------------------------------- one home (issue 21): file output
def test_api_and_cli_write_the_same_score_and_csv_bytes_and_rerun_writes_beside_the_new_output(cli, scored_folders):
    """The score file and its CSV hold no command line, working folder or timing, so the Python API, the CLI and
    ``cloak rerun`` write identical bytes; those go to the folder's cloak.json, whose record of the score file
    lets ``cloak rerun FILE`` repeat it, the CSV moving next to the new ``-o``."""
    import cloaklab

    root = scored_folders
    args = ["-r", "--ref", root / "ref", "--metrics", "psnr,rmse", "--label", "poison=noise"]
    assert cli(["score", root / "gen", "-o", root / "cli" / "s.json", "--csv", root / "cli" / "s.csv", *args])[0] == 0
    summary = cloaklab.score([str(root / "gen")], root / "api" / "s.json", csv=root / "api" / "s.csv",
                             recursive=True, ref=root / "ref", metrics="psnr,rmse", label=["poison=noise"])
    assert summary.exit_code == 0 and summary.done == ["s.json", "s.csv"]
    assert summary.dataset["psnr"] == json.loads((root / "api" / "s.json").read_text())["dataset"]["psnr"]
    for name in ("s.json", "s.csv"):
        assert (root / "cli" / name).read_bytes() == (root / "api" / name).read_bytes(), name
    data = json.loads((root / "cli" / "s.json").read_text())
    assert "argv" not in data and "cwd" not in data and all("seconds" not in row for row in data["images"])
    record = json.loads((root / "cli" / "cloak.json").read_text())["files"]["s.json"]
    assert record["argv"][0] == "cloak" and record["images"] == 4 and record["seconds"] > 0
    before = (root / "cli" / "s.csv").stat().st_mtime_ns
    code, _, err = cli(["rerun", root / "cli" / "s.json", "-o", root / "again" / "s.json"])
    assert code == 0, err
    for name in ("s.json", "s.csv"):
        assert (root / "again" / name).read_bytes() == (root / "cli" / name).read_bytes(), name
    assert (root / "cli" / "s.csv").stat().st_mtime_ns == before  # the recorded run's CSV is left alone
    assert cli(["rerun", root / "cli" / "s.csv", "-o", root / "third" / "s.json"])[0] == 0  # the CSV's run: the same
    assert (root / "third" / "s.csv").read_bytes() == (root / "cli" / "s.csv").read_bytes()


def test_a_score_file_in_another_commands_folder_leaves_its_manifest_alone(cli, scored_folders):
    root = scored_folders
    gen = root / "gen" / "cat"
    (gen / "cloak.json").write_text(json.dumps({"command": "generate", "files": {}}))
    before = (gen / "cloak.json").read_bytes()
    code, _, err = cli(["score", gen, "--ref", root / "ref" / "cat", "--metrics", "psnr", "-o", gen / "s.json"])
    assert code == 0, err
    assert "not recorded for cloak rerun" in err and "belongs to cloak generate" in err
    assert (gen / "cloak.json").read_bytes() == before and json.loads((gen / "s.json").read_text())["dataset"]
