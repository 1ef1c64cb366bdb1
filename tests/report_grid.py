"""A toy poison × defence grid on disk for the ``cloak report`` tests: tiny images written directly, the
``cloak.json`` manifests that poison / train-ti / generate write (same fields), and real ``cloak score`` files made
with ``--label``. Two concepts, poisons ``none`` and ``adm+``, defences ``nominal`` and ``jpeg``; 32 px images."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

from cloaklab.tests.conftest import photo

CONCEPTS = {"cat": "chelsea", "mug": "coffee"}
POISONS = ("none", "adm+")
DEFENCES = ("nominal", "jpeg")
SIZE = 32


def _manifest(folder: Path, command: str, argv: list[str], params: dict, files: dict) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "cloak.json").write_text(json.dumps({
        "format": 1, "command": command, "argv": argv, "cwd": str(folder.anchor), "params": params,
        "runs": [{"argv": argv}], "files": files}, indent=1))


def _save(array: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def build(root: Path, cli) -> dict:
    """Write the grid under ``root``; returns ``{"scores": [paths], "root": root}``."""
    rng = np.random.default_rng(0)
    data = root / "data"
    clean = {}
    for concept, name in CONCEPTS.items():
        for index in range(2):
            image = np.asarray(photo(name, SIZE + 8))[index * 4:index * 4 + SIZE, index * 4:index * 4 + SIZE]
            clean[(concept, index)] = image
            _save(image, data / concept / f"{concept}_{index:02d}.png")
    for concept in CONCEPTS:  # poison adm+: ±8/255 noise, records as cloak poison writes them
        folder = root / "poisoned" / "adm+" / concept
        files = {}
        for index in range(2):
            original = clean[(concept, index)].astype(int)
            cloaked = np.clip(original + rng.choice([-8, 8], original.shape), 0, 255).astype(np.uint8)
            _save(cloaked, folder / f"{concept}_{index:02d}.png")
            files[f"{concept}_{index:02d}.png"] = {"source": str(data / concept / f"{concept}_{index:02d}.png"),
                                                   "output": f"{concept}_{index:02d}.png",
                                         "status": "done", "seconds": 1.5 + index, "peak_rss_mb": 900.0 + index}
        _manifest(folder, "poison", ["cloak", "poison", str(data / concept), "-o", str(folder), "-a", "adm+",
                                     "--eps", "8"], {"attack": "adm+", "eps": 8.0}, files)
    scores = []
    for p_index, poison in enumerate(POISONS):
        for d_index, defence in enumerate(DEFENCES):
            gen_folders = []
            for concept in CONCEPTS:
                train_input = data / concept if poison == "none" else root / "poisoned" / poison / concept
                ti = root / "ti" / poison / defence / concept
                ti.mkdir(parents=True, exist_ok=True)
                (ti / "learned_embeds.safetensors").write_bytes(b"")
                _manifest(ti, "train-ti", ["cloak", "train-ti", str(train_input), "-o", str(ti), "--preset", defence,
                                           "--token", "<R*>"],
                          {"preset": defence, "jpeg": 25 if defence == "jpeg" else None, "t_sampler": "uniform",
                           "mask_mode": "none", "dilate": 0, "resolution": None, "masks": None,
                           "inputs": [f"{concept}_00.png", f"{concept}_01.png"]},
                          {"learned_embeds.safetensors": {"status": "done", "steps": 10, "seconds": 20.0,
                                                          "peak_rss_mb": 1500.0}})
                gen = root / "gen" / poison / defence / concept
                files = {}
                for index in range(2):  # named like the references so psnr/ssim pair them
                    noise = 4 + 6 * p_index + 3 * d_index + 5 * index
                    jitter = rng.integers(-noise, noise + 1, (SIZE, SIZE, 3))
                    image = np.clip(clean[(concept, index)].astype(int) + jitter,
                                    0, 255).astype(np.uint8)
                    _save(image, gen / f"{concept}_{index:02d}.png")
                    files[f"{concept}_{index:02d}.png"] = {"output": f"{concept}_{index:02d}.png", "status": "done",
                                                           "seconds": 0.25,
                                                 "prompt": f"a <R*> number {index}", "token": "<R*>",
                                                 "seed": 1000 + index, "peak_rss_mb": 700.0}
                _manifest(gen, "generate", ["cloak", "generate", "-o", str(gen), "--embedding",
                                            str(ti / "learned_embeds.safetensors"), "-n", "2", "--seed", "0"],
                          {"steps": 4}, files)
                gen_folders.append(gen)
            out = root / "scores" / f"{poison}__{defence}.json"
            out.parent.mkdir(exist_ok=True)
            code, _, err = cli(["score", *gen_folders, "--ref", data, "-r", "--metrics", "psnr,ssim,rmse", "-o", out,
                                "--label", f"poison={poison}", "--label", f"defense={defence}"])
            assert code == 0, err
            scores.append(out)
    return {"root": root, "scores": scores, "data": data}


def markdown_cells(path: Path) -> dict[tuple[str, str], str]:
    """The cells of a ``cloak score --table`` markdown file, parsed independently of the report code."""
    lines = [line for line in path.read_text().splitlines() if line.startswith("|")]
    cols = [c.strip() for c in lines[0].strip("|").split("|")][1:]
    cells = {}
    for line in lines[2:]:
        row, *values = [c.strip() for c in line.strip("|").split("|")]
        cells.update({(row, col): value for col, value in zip(cols, values)})
    return cells
