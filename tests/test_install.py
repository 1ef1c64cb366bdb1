"""The install is reproducible: README, .ci/run and the Makefile use the lock, and the lock satisfies pyproject."""

from __future__ import annotations

import re
from pathlib import Path

import tomllib
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]


def _lock() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            requirement = Requirement(line)
            pins[canonicalize_name(requirement.name)] = str(requirement.specifier)
    return pins


def _readme_setup_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    block = re.search(r"## Set up\n\n```bash\n(.*?)```", text, re.S).group(1)
    return [line.strip().removeprefix("python3 ") for line in block.splitlines() if line.strip()]


def test_readme_ci_and_make_install_with_the_lock():
    install, test = _readme_setup_commands()
    assert "-c constraints.txt" in install and test == "-m pytest"
    ci = (ROOT / ".ci" / "run").read_text()
    assert f"python {install}" in ci, "CI must run the README's install command"
    assert re.search(r"^python -m pytest$", ci, re.M), "CI must run the README's test command"
    assert "-c constraints.txt" in (ROOT / "Makefile").read_text()


def test_every_declared_dependency_is_pinned_within_its_range():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = [Requirement(r) for r in project["dependencies"]]
    declared += [Requirement(r) for extra in project["optional-dependencies"].values() for r in extra
                 if not r.startswith("cloaklab")]
    pins = _lock()
    for requirement in declared:
        name = canonicalize_name(requirement.name)
        assert name in pins, f"{name} is not in constraints.txt"
        exact = re.fullmatch(r"==(\S+)", pins[name])
        if name == "torch":  # the one range: CPU or CUDA build
            assert Requirement("torch" + pins[name]).specifier == Requirement("torch>=2.13.0,<=2.14.1").specifier
            continue
        assert exact, f"{name} must be pinned exactly in constraints.txt, got {pins[name]!r}"
        assert requirement.specifier.contains(Version(exact.group(1)), prereleases=True), \
            f"the lock's {name}=={exact.group(1)} is outside pyproject's {requirement.specifier}"


def test_known_breakage_is_excluded():
    """transformers 5.24 needs peft >= 0.22, which does not exist: pyproject must keep it out."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    transformers = next(Requirement(r) for r in project["dependencies"] if r.startswith("transformers"))
    assert not transformers.specifier.contains("5.24.0")
    names = {canonicalize_name(Requirement(r).name) for r in project["dependencies"]}
    assert not names & {"brisque", "libsvm-official", "open-clip-torch", "torchvision", "segment-anything"}
