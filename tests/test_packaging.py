"""A non-editable install carries every package folder and every C kernel source: pyproject.toml lists each
package under engine/, multimodal/ and scheduler/, and each folder holding a .c file has it as package data."""

from __future__ import annotations

import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SETUPTOOLS = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]


def _package(folder: Path) -> str:
    return ".".join(("omnistream", *folder.relative_to(ROOT).parts))


def test_every_package_folder_is_listed():
    folders = {_package(init.parent) for top in ("engine", "multimodal", "scheduler")
               for init in (ROOT / top).rglob("__init__.py")}
    assert folders - set(SETUPTOOLS["packages"]) == set()


def test_every_c_kernel_source_is_package_data():
    sources = [source for top in ("engine", "multimodal", "scheduler") for source in (ROOT / top).rglob("*.c")]
    assert sources
    missing = [str(source.relative_to(ROOT)) for source in sources
               if "*.c" not in SETUPTOOLS["package-data"].get(_package(source.parent), [])]
    assert not missing, f"not package data: {missing}"
