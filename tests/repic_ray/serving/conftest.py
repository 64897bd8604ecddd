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
    res = subprocess.run(cmd, capture_output=True, text=True)
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
                             capture_output=True, text=True)
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
                       capture_output=True)
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
    """(detector, detector_processor, clip, clip_processor): tiny random Grounding
    DINO and CLIP, from `repic_ray.models.loading` when present."""
    try:
        from repic_ray.models.loading import load_clip, load_detector
    except ImportError:
        return _build_tiny_retriever_models()
    from repic_ray.serving.retriever import _pair

    return (*_pair(load_detector("tiny:grounding-dino")), *_pair(load_clip("tiny:clip")))


def _build_tiny_retriever_models():
    import torch
    from transformers import (
        BertTokenizer,
        CLIPConfig,
        CLIPImageProcessor,
        CLIPModel,
        GroundingDinoConfig,
        GroundingDinoForObjectDetection,
        GroundingDinoImageProcessor,
        GroundingDinoProcessor,
    )

    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ".", "dog", "cat", "object", "mug",
             "toy", "person"]
    vocab = Path(tempfile.mkdtemp(prefix="repic-bert-")) / "vocab.txt"
    vocab.write_text("\n".join(words))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        det = GroundingDinoForObjectDetection(GroundingDinoConfig(
            backbone_config=dict(model_type="swin", embed_dim=16, depths=[1, 1, 1, 1],
                                 num_heads=[1, 1, 1, 1], window_size=4, image_size=64,
                                 out_features=["stage2", "stage3", "stage4"]),
            text_config=dict(model_type="bert", vocab_size=len(words), hidden_size=32,
                             num_hidden_layers=1, num_attention_heads=2, intermediate_size=64),
            d_model=32, encoder_layers=1, decoder_layers=2, encoder_attention_heads=2,
            decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64, num_queries=20,
            num_feature_levels=3, encoder_n_points=2, decoder_n_points=2, max_text_len=32,
            use_timm_backbone=False, use_pretrained_backbone=False))
        clip = CLIPModel(CLIPConfig(
            text_config=dict(vocab_size=50, hidden_size=32, num_hidden_layers=1,
                             num_attention_heads=2, intermediate_size=64,
                             bos_token_id=0, eos_token_id=1, pad_token_id=1),
            vision_config=dict(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=1,
                               num_attention_heads=2, intermediate_size=64),
            projection_dim=16))
    proc = GroundingDinoProcessor(
        image_processor=GroundingDinoImageProcessor(size={"shortest_edge": 64, "longest_edge": 96}),
        tokenizer=BertTokenizer(vocab=str(vocab)))
    clip_proc = CLIPImageProcessor(size={"shortest_edge": 32},
                                   crop_size={"height": 32, "width": 32})
    return det, proc, clip, clip_proc
