"""The wheel that ``pip install`` builds holds the whole package, every module and every paper config
(package data, which setuptools leaves out unless pyproject names it), under zotune's own version."""

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import zotune

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_the_wheel_holds_every_module_and_every_paper_config(tmp_path):
    # Built from a copy (the build writes build/ and *.egg-info beside the sources), offline: the
    # installed setuptools (dev extra) rather than an isolated build environment.
    project = tmp_path / "project"
    project.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, project / name)
    shutil.copytree(ROOT / "src", project / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                    "-w", str(tmp_path / "dist"), str(project)], check=True, capture_output=True)
    (wheel,) = (tmp_path / "dist").glob("zotune-*.whl")
    held = set(zipfile.ZipFile(wheel).namelist())
    package = project / "src"
    expected = {path.relative_to(package).as_posix() for path in package.rglob("*")
                if path.suffix in (".py", ".yaml")}
    assert any(name.startswith("zotune/configs/") for name in expected)
    assert expected - held == set()
    assert wheel.name.startswith(f"zotune-{zotune.__version__}-")  # the version pyproject reads from the package
