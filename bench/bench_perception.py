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
objects drawn with the world's code (`--images`); on `detect_categories`'s boxes
(per-category NMS at IoU 0.5) and, as `ap50_every_query`, on every query's box.

    python bench/bench_perception.py --out bench/results/perception.json
"""

from __future__ import annotations

import argparse
import io
import random
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench.common import finish, markdown_table, setup_env


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


def detector_reward_separation(spec: str, *, images: int, seed: int) -> dict:
    """The detector reward's verdict ("is there a <category>?", prompt "a <category>.",
    its default thresholds) for every category on random scenes: the share of present and
    of absent categories verified, and the AUC of its score between them."""
    import tempfile

    import numpy as np

    from repic_ray.models.perception import all_triples, draw_scene, shape_categories
    from repic_ray.rewards.detector import DetectorReward, DetectorRewardConfig

    mapping = shape_categories()
    categories = sorted(set(mapping.values()))
    rng = random.Random(seed)
    reward = DetectorReward(DetectorRewardConfig(checkpoint=spec))
    pairs, present = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(images):
            img, objects = draw_scene(rng, rng.sample(all_triples(), rng.randint(1, 4)))
            path = f"{tmp}/{i}.png"
            img.save(path)
            drawn = {mapping[t[0]] for t, _ in objects}
            for c in categories:
                pairs.append((path, c))
                present.append(c in drawn)
        scores = reward.detect(pairs)
    s = np.array([scores[p] for p in pairs])
    s = np.where(np.isfinite(s), s, -1.0)
    y = np.array(present)
    pos, neg = s[y], s[~y]
    auc = float((pos[:, None] > neg[None, :]).mean() + 0.5 * (pos[:, None] == neg[None, :]).mean())
    verified = s >= reward.cfg.text_threshold
    return {"checkpoint": spec, "auc": round(auc, 3),
            "verified_present": round(float(verified[y].mean()), 3),
            "verified_absent": round(float(verified[~y].mean()), 3), "images": images}


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
    setup_env()

    import torch

    from repic_ray.models.loading import load_clip, load_detector
    from repic_ray.models.perception import clip_retrieval_accuracy, detector_ap50

    torch.set_num_threads(args.threads)
    results: dict = {"torch_threads": args.threads, "clip": {}, "detector": {}}
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
        raw = detector_ap50(model, processor, images=args.images, seed=4242, nms_iou=None)
        results["detector"][label]["ap50_every_query"] = raw["ap50"]
        print(label, results["detector"][label], flush=True)
    results["detector_reward"] = {
        label: detector_reward_separation(spec, images=args.images // 4, seed=2024)
        for label, spec in (("shipped", args.detector), ("random", "tiny:grounding-dino"))}
    print("detector reward", results["detector_reward"], flush=True)
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
    rows = [[label, f"{c['top1_unseen_8']:.1%} / {c['top1_unseen_20']:.1%}",
             f"{d['ap50']} ({d['ap50_every_query']})",
             f"{r['verified_present']:.1%} / {r['verified_absent']:.1%}"]
            for label in ("shipped", "random")
            for c, d, r in [[results[k][label] for k in ("clip", "detector", "detector_reward")]]]
    command = ["python", "bench/bench_perception.py", *(sys.argv[1:] if argv is None else argv)]
    finish(results, markdown_table(["model", "CLIP top-1, 8 / 20 unseen",
                                    "detector AP50 (every query's box)",
                                    "reward verifies present / absent"], rows),
           args.out, command)
    return results


if __name__ == "__main__":
    main()
