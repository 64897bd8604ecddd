"""The quiet console: library logs and warnings go to the run's log file, the recipes'
own messages to the console as well; worker processes (and their children) write to the
log file. Each case runs in a fresh interpreter (logging and file descriptors are global)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

SCRIPT = """
import logging, sys, warnings
lib = logging.getLogger("somelib")             # a library with its own console handler,
lib.addHandler(logging.StreamHandler(sys.stderr))  # as Ray, DeepSpeed and vLLM set up
lib.propagate = False
from recipes.console import setup_logging
setup_logging(sys.argv[1], verbose=sys.argv[2] == "1")
logging.getLogger("repic.train").info("phase summary")
lib.info("Successfully reset prefix cache")
logging.getLogger("vllm.engine").info("engine chatter")
warnings.warn("a library warning")
logging.getLogger("somelib").error("a library error")
"""


def run(tmp_path: Path, verbose: bool) -> tuple[str, str]:
    log = tmp_path / f"log{int(verbose)}.txt"
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(log), str(int(verbose))], cwd=REPO,
                          capture_output=True, text=True, check=True)
    return proc.stdout + proc.stderr, log.read_text()


def test_quiet_console_keeps_library_logs_in_the_file(tmp_path):
    console, log = run(tmp_path, verbose=False)
    assert "phase summary" in console and "a library error" in console
    for chatter in ("Successfully reset prefix cache", "engine chatter", "a library warning"):
        assert chatter not in console
        assert chatter in log
    assert "phase summary" in log


def test_verbose_console_shows_everything(tmp_path):
    console, log = run(tmp_path, verbose=True)
    for line in ("phase summary", "Successfully reset prefix cache", "engine chatter", "a library warning"):
        assert line in console and line in log


def test_worker_hook_sends_process_and_child_output_to_the_file(tmp_path):
    log = tmp_path / "log.txt"
    script = textwrap.dedent(f"""
        import os, subprocess, sys
        from recipes.console import worker_setup_hook
        worker_setup_hook({str(log)!r})()
        print("from the worker", flush=True)
        print("worker stderr", file=sys.stderr, flush=True)
        subprocess.run(["sh", "-c", "echo from a child process"], check=True)
    """)
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, check=True)
    assert proc.stdout == "" and proc.stderr == ""
    text = log.read_text()
    assert "from the worker" in text and "worker stderr" in text and "from a child process" in text
