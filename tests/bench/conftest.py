"""Run a benchmark script end to end as a subprocess, in a reduced form."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def run_bench(tmp_path, child_env):
    """`run_bench("bench_x.py", *args)` -> the JSON the script wrote (fails with its output)."""

    def run(script: str, *args: str, timeout: int = 1500) -> dict:
        out = tmp_path / f"{Path(script).stem}.json"
        env = child_env(PYTHONPATH=str(REPO))
        for key, value in (("HF_HUB_OFFLINE", "1"), ("REPIC_CACHE", str(REPO / ".cache" / "repic")),
                           ("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions")),
                           ("TOKENIZERS_PARALLELISM", "false")):
            env.setdefault(key, value)
        proc = subprocess.run([sys.executable, str(REPO / "bench" / script), *args, "--out", str(out)],
                              cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout,
                              check=False)
        assert proc.returncode == 0, (
            f"{script} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}")
        assert out.exists(), f"{script} wrote no JSON:\n{proc.stdout[-2000:]}"
        result = json.loads(out.read_text())
        assert "|" in proc.stdout, "no markdown table printed"
        assert result["machine"]["cpu_count"] >= 1 and result["command"]
        return result

    return run


@pytest.fixture
def positive():
    """`positive(d, *keys)`: each key is present with a finite number > 0."""

    def check(d: dict, *keys: str) -> None:
        for key in keys:
            assert key in d, f"missing {key!r} in {sorted(d)}"
            value = d[key]
            assert isinstance(value, (int, float)) and 0 < value < float("inf"), (key, value)

    return check
