"""Curriculum data for in-context binding: every query image cut down to the grid cell of
its one concept (a 28-px image, one vision token, like a reference image).

    python -m repic_ray.data.cell_queries SRC_WORLD DST_WORLD

Reads SRC's `sft.jsonl` and `eval/concepts_1.json` (single-concept samples only; others
are skipped), writes the same samples with the query replaced by the concept's cell
(boxes shifted into it, distractors dropped) under DST, with the reference images, the
database and the RL training samples of SRC. The names, references and targets are unchanged, so a model trained
on DST is evaluated on the full query grids of SRC by the same gate.
"""

from __future__ import annotations

import argparse
import dataclasses
import shutil
from pathlib import Path

from repic_ray.data.formats import TrainSample, load_samples, save_samples
from repic_ray.data.images import load_image


def cell_sample(sample: TrainSample, out_image: Path, cell_px: int) -> TrainSample | None:
    """`sample` with its query cut to the cell of its one concept (None if it has not
    exactly one concept)."""
    present = [o for o in sample.objects or [] if o.get("name")]
    if len(present) != 1:
        return None
    obj = present[0]
    grid = load_image(sample.images[-1]).width // cell_px
    x0, y0 = (obj["cell"] % grid) * cell_px, (obj["cell"] // grid) * cell_px
    crop = load_image(sample.images[-1]).crop((x0, y0, x0 + cell_px, y0 + cell_px))
    out_image.parent.mkdir(parents=True, exist_ok=True)
    crop.save(out_image, format="PNG")
    box = [obj["box"][0] - x0, obj["box"][1] - y0, obj["box"][2] - x0, obj["box"][3] - y0]
    return dataclasses.replace(sample, images=[*sample.images[:-1], str(out_image.absolute())],
                               objects=[{**obj, "box": box}])


def convert(src: str | Path, dst: str | Path, cell_px: int = 28) -> dict[str, int]:
    """Write DST from SRC (see the module docstring); returns samples written per file."""
    src, dst = Path(src).absolute(), Path(dst).absolute()
    if src == dst:
        raise ValueError("cell_queries: DST must differ from SRC")
    if not (src / "world.json").exists():
        raise FileNotFoundError(f"{src}: not a synthetic world (no world.json)")
    dst.mkdir(parents=True, exist_ok=True)
    for name in ("world.json",):
        shutil.copy(src / name, dst / name)
    # the references, and the RL training samples unchanged (a run's data loader reads them)
    for rel in ("concepts", "train", "images/train"):
        if (dst / rel).exists():
            shutil.rmtree(dst / rel)
        if (src / rel).exists():
            shutil.copytree(src / rel, dst / rel)
    counts = {}
    for rel in ("sft.jsonl", "eval/concepts_1.json"):
        if not (src / rel).exists():
            continue
        samples = load_samples(src / rel)
        out = []
        for i, s in enumerate(samples):
            # references keep pointing at SRC's concept images, copied to DST
            refs = [str(dst / Path(p).relative_to(src)) for p in s.images[:-1]]
            s = dataclasses.replace(s, images=[*refs, s.images[-1]])
            c = cell_sample(s, dst / "images" / Path(rel).stem / f"{i:05d}.png", cell_px)
            if c is not None:
                out.append(c)
        (dst / rel).parent.mkdir(parents=True, exist_ok=True)
        save_samples(out, dst / rel)
        counts[rel] = len(out)
    return counts


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("src", help="synthetic world directory")
    p.add_argument("dst", help="output directory")
    p.add_argument("--cell-px", type=int, default=28)
    args = p.parse_args(argv)
    print(convert(args.src, args.dst, args.cell_px))


if __name__ == "__main__":
    main()
