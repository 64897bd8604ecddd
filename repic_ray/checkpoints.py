"""Checkpoints on disk: crash-safe training checkpoint folders, and a trained policy
written as a plain Hugging Face checkpoint directory (SFT and RL).

Crash-safe checkpoint folders: `<root>/step_NNNNNN/` with a `manifest.json`.

A checkpoint is written into `step_NNNNNN.tmp/`, its manifest (size and SHA-256 of
every file) written last, and the folder renamed into place: a process killed at any
moment leaves either the previous complete checkpoints or a `*.tmp` folder, which
listing ignores and `clean_stale` removes. `latest_valid` re-hashes the newest
checkpoint and falls back to the one before when a file is missing, truncated or
altered (a disk that lost the tail of a write, a copy cut short).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
from pathlib import Path

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
_STEP_DIR = re.compile(r"step_(\d+)")
_CHUNK = 1 << 20


class CorruptCheckpoint(ValueError):
    """A checkpoint folder whose files do not match its manifest."""


def step_dir(root: Path, step: int) -> Path:
    return Path(root) / f"step_{step:06d}"


def list_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints under `root` (a manifest present), oldest step first.
    Temporaries (`*.tmp`) and other names are ignored."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = []
    for path in root.iterdir():
        m = _STEP_DIR.fullmatch(path.name)
        if m and path.is_dir() and (path / MANIFEST).is_file():
            found.append((int(m.group(1)), path))
    return [p for _, p in sorted(found)]


def clean_stale(root: Path) -> list[Path]:
    """Remove the `*.tmp` folders an interrupted save left under `root`; returns them."""
    root = Path(root)
    stale = sorted(root.glob("*.tmp")) if root.is_dir() else []
    for path in stale:
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
    return stale


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_manifest(folder: Path) -> dict:
    """Hash every file under `folder` (synced to disk first) into `folder/manifest.json`."""
    folder = Path(folder)
    files = {}
    for path in _files(folder):
        with path.open("rb") as f:
            os.fsync(f.fileno())
        files[path.relative_to(folder).as_posix()] = {"bytes": path.stat().st_size,
                                                      "sha256": _sha256(path)}
    manifest = {"files": files}
    tmp = folder / (MANIFEST + ".part")
    with tmp.open("w") as f:
        json.dump(manifest, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    tmp.rename(folder / MANIFEST)
    return manifest


def verify(folder: Path) -> None:
    """Raise `CorruptCheckpoint` naming the first file that is missing, of the wrong
    size or of the wrong hash (or the manifest itself when unreadable)."""
    folder = Path(folder)
    try:
        files = json.loads((folder / MANIFEST).read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CorruptCheckpoint(f"{folder}: unreadable {MANIFEST} ({exc})") from None
    for rel, meta in files.items():
        path = folder / rel
        if not path.is_file():
            raise CorruptCheckpoint(f"{folder}: {rel} is missing")
        if path.stat().st_size != meta["bytes"]:
            raise CorruptCheckpoint(f"{folder}: {rel} has {path.stat().st_size} bytes, "
                                    f"the manifest says {meta['bytes']}")
        if _sha256(path) != meta["sha256"]:
            raise CorruptCheckpoint(f"{folder}: {rel} does not match its SHA-256")


def commit(tmp: Path, final: Path) -> Path:
    """Seal the folder `tmp` (write its manifest) and rename it to `final`, replacing
    an older `final`. Until the rename, `final` (if any) stays complete."""
    tmp, final = Path(tmp), Path(final)
    write_manifest(tmp)
    if final.exists():
        old = final.with_name(final.name + ".old.tmp")
        shutil.rmtree(old, ignore_errors=True)
        final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(final)
    _fsync_dir(final.parent)
    return final


def latest_valid(root: Path) -> Path | None:
    """The newest checkpoint under `root` that matches its manifest; corrupt ones are
    logged and skipped (the previous checkpoint is used). None when there is none."""
    for path in reversed(list_checkpoints(root)):
        try:
            verify(path)
        except CorruptCheckpoint as exc:
            log.warning("skipping corrupt checkpoint: %s", exc)
            continue
        return path
    return None


def save_hf_checkpoint(state_dict: dict, base: str, out: Path) -> Path:
    """Write merged policy weights (a learner's `export_full()`) as a plain HF checkpoint
    directory, with the processor and tokenizer of `base` (written aside, then renamed)."""
    from repic_ray.models.loading import load_policy, load_processor

    out = Path(out)
    model = load_policy(base)
    missing, unexpected = model.load_state_dict(state_dict, strict=False)
    if unexpected or [m for m in missing if "lora" not in m]:
        raise RuntimeError(f"export does not match the model: missing={missing[:5]} unexpected={unexpected[:5]}")
    tmp = out.with_name(out.name + ".tmp")
    model.save_pretrained(tmp)
    load_processor(base).save_pretrained(tmp)
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return out
