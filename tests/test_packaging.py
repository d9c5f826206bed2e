"""The wheel carries what a non-editable install needs: every module, the recipes and the data specs."""

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    pytest.importorskip("setuptools")
    source = tmp_path_factory.mktemp("source")
    # A copy, so that the build's egg-info and build/ folders never land in the checkout.
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in ("vlmtune", "recipes", "data_specs"):
        shutil.copytree(ROOT / name, source / name, symlinks=True, ignore=ignore)
    dist = tmp_path_factory.mktemp("dist")
    command = [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(dist), "."]
    subprocess.run(command, cwd=source, check=True, capture_output=True)
    (wheel,) = dist.glob("vlmtune-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        entry_points = next(n for n in archive.namelist() if n.endswith(".dist-info/entry_points.txt"))
        return set(archive.namelist()), archive.read(entry_points).decode()


def test_wheel_ships_the_recipes_and_data_specs(wheel):
    wheel_files, _ = wheel
    for folder in ("recipes", "data_specs"):
        shipped = {p.name for p in (ROOT / folder).iterdir() if p.suffix in (".py", ".yaml")}
        assert shipped and {f"vlmtune/{folder}/{name}" for name in shipped} <= wheel_files
    assert "vlmtune/recipes/__init__.py" in wheel_files and "vlmtune/data_specs/latex_ocr.yaml" in wheel_files


def test_wheel_ships_every_module_and_the_command(wheel):
    wheel_files, entry_points = wheel
    modules = {p.relative_to(ROOT).as_posix() for p in (ROOT / "vlmtune").rglob("*.py") if "__pycache__" not in p.parts}
    assert modules - wheel_files == set()
    assert "vlmtune = vlmtune.cli:main" in entry_points
