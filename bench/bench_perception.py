"""The shipped tiny perception models on the synthetic world: CLIP retrieval and
Grounding DINO AP50, next to the random-weight tiny models they replace.

CLIP: a user registers N concepts (one reference image each) whose shape x colour x
pattern triples were held out of CLIP training (`repic_ray.models.perception.triple_split`);
each query is a scene with one of them and 0-3 other objects, cropped to the concept's
box jittered by up to 10 % per side; top-1 = the nearest reference is the right one.
Also through the service's `ConceptRetriever` (detector crops + CLIP, top_k 1) on the
whole scene, with the crop box of the detector instead of the true box.

Grounding DINO: AP at IoU 0.5 per category, averaged over the world's 8 categories
(one mapping for every world), prompting every image with all 8 category words; random scenes of 1-7
objects drawn with the world's code (`--images`).

    python bench/bench_perception.py --out bench/results/perception.json
"""

from __future__ import annotations

import argparse
import io
import json
import random
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def retriever_accuracy(retriever, *, num_concepts: int, episodes: int, queries: int,
                       seed: int) -> float:
    """Top-1 concept chosen by `ConceptRetriever.match` (whole scenes as queries)."""
    from repic_ray.models.perception import (
        all_triples,
        draw_reference,
        draw_scene,
        shape_categories,
        triple_split,
    )
    from repic_ray.serving.types import ReferenceConcept

    def png(img) -> bytes:
        buf = io.BytesIO()
        img.save(buf, "PNG")
        return buf.getvalue()

    rng = random.Random(seed)
    mapping = shape_categories()
    held = list(triple_split()[1])
    every = all_triples()
    hits = total = 0
    for e in range(episodes):
        chosen = rng.sample(held, num_concepts)
        concepts = [ReferenceConcept(name=f"c{e}_{i}", category=mapping[t[0]], info="",
                                     images=[png(draw_reference(rng, t))],
                                     image_sha256=[f"{e}-{i}"])
                    for i, t in enumerate(chosen)]
        for _ in range(queries):
            i = rng.randrange(num_concepts)
            others = [o for o in rng.sample(every, rng.randint(0, 3)) if o not in chosen]
            img, _ = draw_scene(rng, [chosen[i], *others])
            best = retriever.match(png(img), concepts, top_k=1)
            hits += int(best[0].name == concepts[i].name)
            total += 1
    return round(hits / total, 4)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clip", default="checkpoints/tiny-clip")
    p.add_argument("--detector", default="checkpoints/tiny-gdino")
    p.add_argument("--episodes", type=int, default=20, help="users per concept count")
    p.add_argument("--queries", type=int, default=20, help="query crops per user")
    p.add_argument("--images", type=int, default=200, help="detector eval images")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--box-threshold", type=float, default=0.15,
                   help="the retriever's detector threshold")
    p.add_argument("--skip-retriever", action="store_true")
    p.add_argument("--out", help="write the results as JSON here")
    args = p.parse_args(argv)

    import torch

    from repic_ray.models.loading import load_clip, load_detector
    from repic_ray.models.perception import clip_retrieval_accuracy, detector_ap50

    torch.set_num_threads(args.threads)
    results: dict = {"command": "python bench/bench_perception.py " + " ".join(argv or sys.argv[1:]),
                     "torch_threads": args.threads, "clip": {}, "detector": {}}
    t0 = time.time()
    for label, spec in (("shipped", args.clip), ("random", "tiny:clip")):
        processor, model = load_clip(spec)
        results["clip"][label] = {"checkpoint": spec, **{
            f"top1_unseen_{n}": clip_retrieval_accuracy(
                model, processor, num_concepts=n, episodes=args.episodes,
                queries_per_episode=args.queries, seed=12345 + n)
            for n in (8, 12, 16, 20)}}
        print(label, results["clip"][label], flush=True)
    for label, spec in (("shipped", args.detector), ("random", "tiny:grounding-dino")):
        processor, model = load_detector(spec)
        results["detector"][label] = {"checkpoint": spec, **detector_ap50(
            model, processor, images=args.images, seed=4242)}
        print(label, results["detector"][label], flush=True)
    if not args.skip_retriever:
        from repic_ray.serving.retriever import ConceptRetriever, RetrieverConfig

        retriever = ConceptRetriever(RetrieverConfig(detector=args.detector, clip=args.clip,
                                                     box_threshold=args.box_threshold))
        results["retriever"] = {"box_threshold": args.box_threshold, **{
            f"top1_unseen_{n}": retriever_accuracy(retriever, num_concepts=n,
                                                   episodes=max(1, args.episodes // 4),
                                                   queries=args.queries, seed=999 + n)
            for n in (8, 20)}}
        print("retriever", results["retriever"], flush=True)
    results["seconds"] = round(time.time() - t0, 1)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    return results


if __name__ == "__main__":
    main()
