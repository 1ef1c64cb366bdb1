"""Imports run downward only: the model loaders do not import the toy world built on them, and the toy world does not
import the metrics that score it (issue 21 item 5). Read from the source (ast), so lazy imports inside functions
count too."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

OPS = Path(__file__).resolve().parents[1] / "ops"

# (package under ops/, a package it must not import)
FORBIDDEN = [("models", "toy"), ("toy", "metrics")]


def imported_ops_packages(path: Path) -> set[str]:
    """The ops sub-packages/modules that ``path`` imports (first component under ops/), absolute or relative."""
    package = path.relative_to(OPS).parts[:-1]  # the folder under ops/ ("." imports resolve against it)
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = list(package[:len(package) - (node.level - 1)]) if node.level - 1 <= len(package) else None
                if base is None:
                    continue
                target = base + (node.module.split(".") if node.module else [])
                if not target:  # "from .. import x": x is a module of ops
                    found.update(alias.name for alias in node.names)
                    continue
                found.add(target[0])
            elif node.module and node.module.startswith("cloaklab.ops."):
                found.add(node.module.split(".")[2])
        elif isinstance(node, ast.Import):
            found.update(alias.name.split(".")[2] for alias in node.names if alias.name.startswith("cloaklab.ops."))
    return found


@pytest.mark.parametrize("lower, upper", FORBIDDEN)
def test_no_upward_import(lower, upper):
    offenders = [path.relative_to(OPS).as_posix() for path in sorted((OPS / lower).rglob("*.py"))
                 if upper in imported_ops_packages(path)]
    assert offenders == [], f"ops/{lower} must not import ops/{upper}"


def test_the_scan_sees_relative_and_lazy_imports():
    assert "validate" in imported_ops_packages(OPS / "metrics" / "base.py")  # from ..validate import …
    assert "toy" in imported_ops_packages(OPS / "metrics" / "toy.py")  # inside a function; the allowed direction
    assert "metrics" in imported_ops_packages(OPS / "metrics" / "fid.py")  # from .base import …
