"""Crash-safe checkpoint folders: listing ignores temporaries, manifests catch
corruption, and the newest intact checkpoint is the resume point."""

from __future__ import annotations

import json

import pytest

from repic_ray.checkpoints import (
    MANIFEST,
    CorruptCheckpoint,
    clean_stale,
    commit,
    latest_valid,
    list_checkpoints,
    step_dir,
    verify,
)


def save(root, step: int, payload: bytes = b"weights") -> None:
    tmp = root / f"step_{step:06d}.tmp"
    (tmp / "learner").mkdir(parents=True)
    (tmp / "learner" / "model.pt").write_bytes(payload * 100)
    (tmp / "driver.json").write_text(json.dumps({"step": step}))
    commit(tmp, step_dir(root, step))


def test_listing_ignores_temporaries_and_unsealed_folders(tmp_path):
    save(tmp_path, 2)
    save(tmp_path, 10)  # numeric order, not string order: 2 < 10
    (tmp_path / "step_000012.tmp" / "learner").mkdir(parents=True)  # a save killed midway
    (tmp_path / "step_000014").mkdir()  # no manifest: never sealed
    (tmp_path / "notes").mkdir()
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_000002", "step_000010"]
    assert [p.name for p in clean_stale(tmp_path)] == ["step_000012.tmp"]
    assert not (tmp_path / "step_000012.tmp").exists()
    assert list_checkpoints(tmp_path / "missing") == [] and latest_valid(tmp_path / "missing") is None


def test_manifest_names_the_damaged_file(tmp_path):
    save(tmp_path, 1)
    ckpt = step_dir(tmp_path, 1)
    verify(ckpt)
    manifest = json.loads((ckpt / MANIFEST).read_text())["files"]
    assert sorted(manifest) == ["driver.json", "learner/model.pt"]
    assert manifest["learner/model.pt"]["bytes"] == 700
    model = ckpt / "learner" / "model.pt"
    model.write_bytes(b"x" * 700)  # same size, other bytes
    with pytest.raises(CorruptCheckpoint, match="learner/model.pt does not match"):
        verify(ckpt)
    model.write_bytes(b"weights")  # truncated
    with pytest.raises(CorruptCheckpoint, match="7 bytes, the manifest says 700"):
        verify(ckpt)
    model.unlink()
    with pytest.raises(CorruptCheckpoint, match="learner/model.pt is missing"):
        verify(ckpt)
    (ckpt / MANIFEST).write_text("{")
    with pytest.raises(CorruptCheckpoint, match="unreadable"):
        verify(ckpt)


def test_resume_falls_back_to_the_previous_intact_checkpoint(tmp_path):
    for step in (2, 4, 6):
        save(tmp_path, step)
    assert latest_valid(tmp_path) == step_dir(tmp_path, 6)
    (step_dir(tmp_path, 6) / "learner" / "model.pt").write_bytes(b"torn")
    assert latest_valid(tmp_path) == step_dir(tmp_path, 4)
    (step_dir(tmp_path, 4) / "driver.json").unlink()
    assert latest_valid(tmp_path) == step_dir(tmp_path, 2)


def test_commit_replaces_an_existing_checkpoint_whole(tmp_path):
    save(tmp_path, 3, b"old")
    save(tmp_path, 3, b"new")
    ckpt = step_dir(tmp_path, 3)
    assert (ckpt / "learner" / "model.pt").read_bytes() == b"new" * 100
    verify(ckpt)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_000003"]
