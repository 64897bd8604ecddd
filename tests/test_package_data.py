"""The wheel ships the serving package's web page, and the API finds it without a checkout."""

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from repic_ray.serving.api import default_static_dir

ROOT = Path(__file__).resolve().parents[1]
PAGE = ("index.html", "app.js", "style.css")


def test_api_finds_the_page_through_importlib_resources():
    static = default_static_dir()
    assert static.parent.name == "serving"
    assert all((static / name).is_file() for name in PAGE)


@pytest.mark.slow
def test_wheel_contains_the_web_page_and_the_recipes(tmp_path):
    src = tmp_path / "src"  # setuptools builds in the source tree: build a copy
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, src / name)
    for pkg in ("repic_ray", "actors", "recipes", "deploy"):
        shutil.copytree(ROOT / pkg, src / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path),
         str(src)], capture_output=True, text=True, check=False, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (wheel,) = tmp_path.glob("repic_ray-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {f"repic_ray/serving/static/{n}" for n in PAGE} <= names
    assert {"recipes/cli.py", "recipes/train.py", "recipes/sft.py", "recipes/eval.py"} <= names
    entry = next(n for n in names if n.endswith("entry_points.txt"))
    assert "repic = recipes.cli:main" in zipfile.ZipFile(wheel).read(entry).decode()
