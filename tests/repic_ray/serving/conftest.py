"""Fixtures for the serving tests: a throwaway PostgreSQL server on loopback."""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[3]


def _pg_bindir() -> Path | None:
    for pattern in ("/usr/lib/postgresql/*/bin",):
        for d in sorted(glob.glob(pattern), reverse=True):
            if os.path.exists(os.path.join(d, "pg_ctl")):
                return Path(d)
    found = shutil.which("pg_ctl")
    return Path(found).resolve().parent if found else None


def _run(cmd: list[str]) -> None:
    res = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if res.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{res.stdout}\n{res.stderr}")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def postgres_url() -> str:
    """URL of a real PostgreSQL server started for this test session.

    Installs Debian's `postgresql` (.ci/setup-postgres.sh) when its binaries are
    missing; skips only when that install is impossible."""
    bindir = _pg_bindir()
    if bindir is None:
        res = subprocess.run(["bash", str(REPO / ".ci/setup-postgres.sh")],
                             capture_output=True, text=True, check=False)
        bindir = _pg_bindir()
        if bindir is None:
            pytest.skip(f"PostgreSQL cannot be installed here: {res.stderr[-500:]}")
    # Not under pytest's tmp dir: that one is private to root, and the server may
    # have to run as another user.
    base = Path(tempfile.mkdtemp(prefix="repic-pg-"))
    base.chmod(0o755)
    data = base / "data"
    run_as: list[str] = []
    if os.geteuid() == 0:
        # initdb refuses to run as root: use the package's `postgres` user.
        subprocess.run(["id", "postgres"], check=True, capture_output=True)
        run_as = ["runuser", "-u", "postgres", "--"]
    data.mkdir()
    if run_as:
        shutil.chown(data, "postgres", "postgres")
    port = _free_port()
    _run([*run_as, str(bindir / "initdb"), "-D", str(data), "-U", "repic",
          "--auth=trust", "-E", "UTF8"])
    log = data.parent / "pg.log"
    if run_as:
        log.touch()
        shutil.chown(log, "postgres", "postgres")
    opts = f"-c listen_addresses=127.0.0.1 -p {port} -k {data} -c fsync=off"
    _run([*run_as, str(bindir / "pg_ctl"), "-D", str(data), "-l", str(log),
          "-o", opts, "-w", "start"])
    try:
        import psycopg

        for _ in range(50):
            try:
                psycopg.connect(f"host=127.0.0.1 port={port} user=repic dbname=postgres").close()
                break
            except psycopg.OperationalError:
                time.sleep(0.2)
        yield f"postgresql://repic@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run([*run_as, str(bindir / "pg_ctl"), "-D", str(data), "-m", "fast", "stop"],
                       capture_output=True, check=False)
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def fresh_postgres_url(postgres_url: str) -> str:
    """A new, empty database on the session's server (one per test)."""
    import psycopg

    name = f"t{os.getpid()}_{time.monotonic_ns()}"
    with psycopg.connect(postgres_url, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    return postgres_url.rsplit("/", 1)[0] + "/" + name


@pytest.fixture(scope="session")
def tiny_retriever_models():
    """(detector, detector_processor, clip, clip_processor): the tiny random
    Grounding DINO and CLIP."""
    from repic_ray.models.loading import load_clip, load_detector

    det_proc, det = load_detector("tiny:grounding-dino")
    clip_proc, clip = load_clip("tiny:clip")
    return det, det_proc, clip, clip_proc
