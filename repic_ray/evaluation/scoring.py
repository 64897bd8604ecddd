"""Scoring a caption result file: RePIC's name metric and, with references, the caption metrics."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from repic_ray.evaluation.metric import NameEvaluation, evaluate_names
from repic_ray.evaluation.quality import degeneration


def load_result_file(path: str | Path):
    """Records of a caption result file (validated by `repic_ray.data.formats.load_captions`)."""
    from repic_ray.data.formats import load_captions

    return load_captions(path)


def load_references(path: str | Path) -> dict[str, list[str]]:
    """`{image: [captions]}` JSON; a bad entry raises naming the file and image."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: cannot read references: {exc}") from exc
    if not isinstance(data, dict):
        raise ValueError(f"{path}: must be a JSON object {{image: [captions]}}")  # noqa: TRY004
    out = {}
    for image, refs in data.items():
        if isinstance(refs, str):
            refs = [refs]
        if not isinstance(refs, list) or not refs or not all(isinstance(r, str) for r in refs):
            raise ValueError(
                f"{path}: image {image!r}: expected a non-empty list of caption strings"
            )
        out[image] = refs
    return out


def evaluate_file(
    path: str | Path,
    *,
    mode: str = "default",
    candidates: Sequence[str] | None = None,
    case_sensitive: bool | None = None,
) -> NameEvaluation:
    """RePIC's name metric over one result file."""
    records = load_result_file(path)
    return evaluate_names(
        [r.caption for r in records],
        [r.concepts for r in records],
        mode=mode,
        candidates=candidates,
        case_sensitive=case_sensitive,
    )


def score_file(
    path: str | Path,
    *,
    mode: str = "default",
    candidates: Sequence[str] | None = None,
    case_sensitive: bool | None = None,
    references: Mapping[str, Sequence[str]] | None = None,
) -> dict[str, Any]:
    """Name metric (and, with `references`, caption metrics) of a result file as a dict:
    what `repic eval --captions path --json` prints, less the file name."""
    records = load_result_file(path)
    ev = evaluate_names(
        [r.caption for r in records],
        [r.concepts for r in records],
        mode=mode,
        candidates=candidates,
        case_sensitive=case_sensitive,
    )
    out = ev.as_dict()
    out["overall"]["quality"] = degeneration([r.caption for r in records])
    if references is not None:
        from repic_ray.evaluation.caption_metrics import caption_metrics

        missing = sorted({r.image for r in records} - set(references))
        if missing:
            raise ValueError(f"{path}: no references for image(s) {missing[:5]}")
        out["caption_metrics"] = caption_metrics(
            {str(i): r.caption for i, r in enumerate(records)},
            {str(i): list(references[r.image]) for i, r in enumerate(records)},
        ).as_dict()
    return out
