"""Map the repository's top-level folders into the single import package ``cloaklab``.

The repository keeps ``cli/``, ``ops/``, ``tests/``, ``completions/`` and ``man/`` at its top level (the product's
layout); installed, they become ``cloaklab.cli``, ``cloaklab.ops`` … so no generic top-level module names are taken.
``api/`` is the package ``cloaklab`` itself: its ``__init__`` is the Python API (docs/api.md).
"""

from setuptools import find_packages, setup

FOLDERS = ("cli", "ops", "tests", "completions", "man")  # + api/ as cloaklab itself

packages = ["cloaklab"]
package_dir = {"cloaklab": "api"}  # api/__init__.py is ``import cloaklab``: the Python API (lazy; no torch on import)
for folder in FOLDERS:
    package_dir[f"cloaklab.{folder}"] = folder
    packages.append(f"cloaklab.{folder}")
    packages += [f"cloaklab.{folder}.{sub}" for sub in find_packages(folder)]

setup(
    packages=packages,
    package_dir=package_dir,
    package_data={
        "cloaklab.ops": ["**/*.safetensors", "**/*.json", "**/*.txt"],
        "cloaklab.completions": ["*.bash", "*.zsh", "*.fish"],
        "cloaklab.man": ["*.1"],
        "cloaklab.tests": ["data/*"],
    },
)
