"""The core package never imports Ray (actors/ and deploy/ wrap it) nor the recipes."""

import ast
from pathlib import Path

CORE = Path(__file__).resolve().parents[1] / "repic_ray"


def test_repic_ray_never_imports_ray():
    offenders = []
    for path in CORE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            offenders += [f"{path}:{node.lineno} {n}" for n in names
                          if n == "ray" or n.startswith(("ray.", "actors", "deploy", "recipes"))]
    assert not offenders, offenders
