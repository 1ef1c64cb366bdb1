"""Shared fixtures: the tiny pipeline (once per session), real photos from scikit-image, and the
``--device`` / ``--dtype`` options (environment fallbacks ``CLOAK_TEST_DEVICE`` / ``CLOAK_TEST_DTYPE``) so one suite
runs on the CPU here and on a GPU when one is lent."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

PHOTOS = ("astronaut", "chelsea", "coffee", "rocket")


def pytest_addoption(parser):
    parser.addoption("--device", default=os.environ.get("CLOAK_TEST_DEVICE", "cpu"),
                     help="torch device for tests (cpu, cuda, cuda:N, mps)")
    parser.addoption("--dtype", default=os.environ.get("CLOAK_TEST_DTYPE", "fp32"),
                     help="dtype for model tests (fp32, fp16, bf16)")


@pytest.fixture(scope="session")
def device(request):
    import torch

    return torch.device(request.config.getoption("--device"))


@pytest.fixture(scope="session")
def dtype(request):
    import torch

    return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[request.config.getoption("--dtype")]


@pytest.fixture(scope="session")
def tiny_pipe(device):
    """The calibrated tiny SD pipeline (shared: tests must not modify it — use ``fresh_tiny_pipe`` to train)."""
    from cloaklab.ops.models import load_pipeline

    return load_pipeline("tiny", device=device)


@pytest.fixture
def fresh_tiny_pipe(device):
    """A private copy of the tiny pipeline that a test may modify."""
    from cloaklab.ops.models import load_pipeline

    return load_pipeline("tiny", device=device)


def photo(name: str, size: int | None = None) -> Image.Image:
    """A real photo from scikit-image as an RGB PIL image, optionally resized to ``size``² (bicubic)."""
    from skimage import data

    image = Image.fromarray(getattr(data, name)()).convert("RGB")
    return image.resize((size, size), Image.BICUBIC) if size else image


def photo_tensor(name: str, size: int = 64):
    """``(3, size, size)`` float tensor in [0, 1] of a scikit-image photo."""
    import torch

    return torch.from_numpy(np.asarray(photo(name, size), dtype=np.float32) / 255).permute(2, 0, 1)


@pytest.fixture
def photo_dir(tmp_path) -> Path:
    """A folder of four small real photos (64–96 px, non-square ones included) as PNG and JPEG."""
    folder = tmp_path / "photos"
    folder.mkdir()
    photo("astronaut", 64).save(folder / "astronaut.png")
    photo("chelsea").resize((96, 64)).save(folder / "chelsea.jpg", quality=95)
    photo("coffee").resize((80, 72)).save(folder / "coffee.png")
    photo("rocket", 64).save(folder / "rocket.png")
    return folder


@pytest.fixture
def cli():
    """Run ``cloak`` in-process: ``cli(args, input=None) -> (exit_code, stdout, stderr)``."""
    from typer.testing import CliRunner

    from cloaklab.cli.main import app

    runner = CliRunner()

    def run(args, input=None):
        result = runner.invoke(app, [str(a) for a in args], input=input, catch_exceptions=False)
        return result.exit_code, result.stdout, result.stderr

    return run


@pytest.fixture(autouse=True, scope="session")
def _torch_threads():
    """Tiny models run many small sequential ops: one intra-op thread is faster than two and stops the tests from
    thrashing on a shared 2-core machine. ``CLOAK_TEST_THREADS`` overrides it (e.g. on a GPU host)."""
    import torch

    previous = torch.get_num_threads()
    threads = os.environ.get("CLOAK_TEST_THREADS", "1")
    torch.set_num_threads(int(threads))
    before = os.environ.get("CLOAK_THREADS")
    os.environ["CLOAK_THREADS"] = threads  # in-process CLI runs apply --threads' default (the CPUs we may use)
    yield
    torch.set_num_threads(previous)
    if before is None:
        os.environ.pop("CLOAK_THREADS", None)
    else:
        os.environ["CLOAK_THREADS"] = before
