"""`repic eval`: name precision / recall / F1 (RePIC's metric) and caption metrics of a result file.

    repic eval --captions results.json [--mode compat] [--json] [--references refs.json]

`results.json` is a RePIC caption result file (`[image, [concepts], caption,
prompt]` records). Scores print in percent with one decimal, overall and per
number of ground-truth concepts. `--references` (`{image: [captions]}`) adds
BLEU-4 / METEOR / ROUGE-L / CIDEr (SPICE reported as unavailable offline).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from repic_ray.evaluation.metric import NameEvaluation, evaluate_names


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


def _pct(x: float) -> str:
    return f"{100 * x:.1f}"


def format_text(path: str, ev: NameEvaluation, caption: dict | None = None) -> str:
    case = "case-sensitive" if ev.case_sensitive else "case-insensitive"
    lines = [f"{path}: {ev.overall.records} captions, mode {ev.mode}, {case}"]
    lines.append(f"{'concepts':<9} {'P':>6} {'R':>6} {'F1':>6} {'slots':>6}")
    rows = [("all", ev.overall)] + [(str(k), m) for k, m in sorted(ev.by_k.items())]
    for label, m in rows:
        lines.append(
            f"{label:<9} {_pct(m.precision):>6} {_pct(m.recall):>6} {_pct(m.f1):>6} {m.slots:>6}"
        )
    if caption is not None:
        for name, value in caption["scores"].items():
            lines.append(f"{name:<9} {_pct(value):>6}")
        for name, reason in caption["unavailable"].items():
            lines.append(f"{name:<9} unavailable: {reason}")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="repic eval", description=__doc__.split("\n")[0])
    p.add_argument("--captions", required=True, help="RePIC caption result file (JSON)")
    p.add_argument(
        "--mode",
        choices=["default", "compat"],
        default="default",
        help="name matching: default (whole-word phrases) or compat (RePIC's scripts)",
    )
    p.add_argument(
        "--references", help="reference captions {image: [captions]} for caption metrics"
    )
    p.add_argument(
        "--candidates", help="JSON list of candidate names (default: all ground-truth names)"
    )
    case = p.add_mutually_exclusive_group()
    case.add_argument("--case-sensitive", dest="case_sensitive", action="store_true", default=None)
    case.add_argument("--ignore-case", dest="case_sensitive", action="store_false")
    p.add_argument("--json", action="store_true", help="print machine-readable JSON")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["eval"]:
        argv = argv[1:]
    args = build_parser().parse_args(argv)
    candidates = None
    if args.candidates:
        candidates = json.loads(Path(args.candidates).read_text(encoding="utf-8"))
        if not isinstance(candidates, list) or not all(isinstance(c, str) for c in candidates):
            raise ValueError(f"{args.candidates}: expected a JSON list of names")
    records = load_result_file(args.captions)
    ev = evaluate_names(
        [r.caption for r in records],
        [r.concepts for r in records],
        mode=args.mode,
        candidates=candidates,
        case_sensitive=args.case_sensitive,
    )
    caption = None
    if args.references:
        from repic_ray.evaluation.caption_metrics import caption_metrics

        refs = load_references(args.references)
        missing = sorted({r.image for r in records} - set(refs))
        if missing:
            raise ValueError(f"{args.references}: no references for image(s) {missing[:5]}")
        caption = caption_metrics(
            {str(i): r.caption for i, r in enumerate(records)},
            {str(i): refs[r.image] for i, r in enumerate(records)},
        ).as_dict()
    if args.json:
        out = {"captions": args.captions, **ev.as_dict()}
        if caption is not None:
            out["caption_metrics"] = caption
        print(json.dumps(out, indent=2))
    else:
        print(format_text(args.captions, ev, caption))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
