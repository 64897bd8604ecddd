"""The served captioner personalizes: concepts it never saw, registered over the HTTP API
under names it never saw, named in captions of new photos.

    python bench/service_gate.py --checkpoint checkpoints/tiny-open \
        --out bench/results/gate_service_tiny_open.json

starts `repic serve` on the checkpoint (a fresh HOME, a free loopback port), draws a
synthetic world with a seed no training used (12 concepts of held-out attribute
combinations), registers each concept's reference image under a held-out name the world
did not use, then for 20 photos (10 with one concept, 10 with two):

- explicit mode: the photo's references (present and absent ones, as in RePIC) named in
  `concepts=`; RePIC's name precision / recall over the ground-truth slots;
- retrieval mode: the user asks for the concepts in the photo without naming any; the
  concepts in it are all of the user's registered concepts drawn in it (a photo's
  distractor objects are the world's other concepts, all registered), `top_k` = their
  number; the share of them the retriever chose;
- renaming: every concept renamed (`PATCH /v1/concepts/{name}`, same images, another fresh
  name) and every photo captioned again: recall and precision under the new names, and how
  many old names the captions still write (none, for a model that reads names from the
  prompt).

`--references N` draws N photos of every concept (`WorldConfig.references_per_concept`)
and registers all of them: each caption prompt then shows N photos per named concept.

`tests/deploy/test_serve_newcomer.py` runs `personalization` against the README's
`repic serve` command.
"""

from __future__ import annotations

import argparse
import json
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

REPO = Path(__file__).resolve().parents[1]
# A world drawn with a seed no training used: held-out attribute combinations, registered
# under held-out names other than the world's own.
WORLD_SEED = 20261128


def unseen_world(out: Path, references: int = 1
                 ) -> tuple[dict[str, str], list[dict], dict[str, str]]:
    """(world concept name -> the user's fresh name, 20 evaluation samples with 1-2
    concepts, world concept name -> another fresh name to rename it to). Reference files
    are named by the world's concept names; the user registers each under a held-out name
    the world did not use."""
    from repic_ray.data.formats import load_database
    from repic_ray.data.names import name_split
    from repic_ray.data.synthetic import generate_world

    generate_world(out, seed=WORLD_SEED, names="open", num_concepts=12, num_train=0,
                   num_sft=0, num_sft_aux=0, num_eval_per_k=10,
                   references_per_concept=references)
    world_names = sorted(c.name for c in load_database(out / "concepts" / "database.json"))
    samples = [x for k in (1, 2)
               for x in json.loads((out / "eval" / f"concepts_{k}.json").read_text())]
    used = set(world_names).union(*(x["ref_names"] for x in samples))
    fresh = random.Random(WORLD_SEED).sample([n for n in name_split()[1] if n not in used],
                                             2 * len(world_names))
    return (dict(zip(world_names, fresh)), samples,
            dict(zip(world_names, fresh[len(world_names):])))


def wait_ready(base: str, proc: subprocess.Popen, log: Path, timeout: float = 600) -> None:
    """Until `repic serve` at `base` answers `/readyz`; RuntimeError with the end of its log
    when it exits first or is not ready in `timeout` s."""
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None or time.monotonic() > deadline:
            why = f"exited with {proc.returncode}" if proc.poll() is not None else (
                f"not ready in {timeout:.0f} s")
            raise RuntimeError(f"repic serve {why}:\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(f"{base}/readyz", timeout=10).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(2)


def personalization(base: str, key: dict, world: Path, references: int = 1) -> dict[str, Any]:
    """Register the unseen world's concepts over HTTP under fresh names (`references`
    photos each), caption its 20 photos naming each photo's references (present and absent,
    as in RePIC), and score the names with RePIC's metric; then rename every concept and
    caption every photo again."""
    from repic_ray.data.formats import load_database
    from repic_ray.evaluation.metric import NameMetrics, slot_outcomes
    from repic_ray.matching import find_names

    user_names, samples, renames = unseen_world(world, references)
    db = load_database(world / "concepts" / "database.json")

    def owner(path: str) -> str:  # the world concept a sample's reference photo shows
        return db.concept_of_image(str(world / "eval" / path)).name

    triple = {c["name"]: (c["shape"], c["colour"], c["pattern"])
              for c in json.loads((world / "world.json").read_text())["concepts"]}
    for concept in db:
        name = user_names[concept.name]
        files = [("images", (f"{name}_{i}.png", Path(path).read_bytes(), "image/png"))
                 for i, path in enumerate(concept.images)]
        # The user says what each concept is ("dog"): the detector's prompt in retrieval mode.
        res = httpx.post(f"{base}/v1/concepts", headers=key,
                         data={"name": name, "category": concept.category},
                         files=files, timeout=60)
        assert res.status_code == 201, res.text
    explicit, chosen, slots = NameMetrics(), 0, 0
    captions = []
    for x in samples:
        query = (world / "eval" / x["image"][-1]).resolve().read_bytes()
        shown = list(dict.fromkeys(owner(p) for p in x["image"][:-1]))
        refs = [user_names[w] for w in shown]
        present = list(dict.fromkeys(
            user_names[owner(p)] for p, n in zip(x["image"][:-1], x["ref_names"])
            if n in x["concepts"]))
        res = httpx.post(f"{base}/v1/captions", headers=key, data={"concepts": ",".join(refs)},
                         files={"image": ("q.png", query, "image/png")}, timeout=300)
        assert res.status_code == 200, res.text
        caption = res.json()["caption"]
        captions.append({"present": present, "caption": caption, "shown": shown})
        found = find_names(caption, list(user_names.values()))
        explicit.add(slot_outcomes(found, present, user_names.values(), case_sensitive=False))
        drawn = {(o["shape"], o["colour"], o["pattern"]) for o in x["objects"]}
        visible = {name for world_name, name in user_names.items()
                   if triple[world_name] in drawn}
        assert set(present) <= visible
        res = httpx.post(f"{base}/v1/captions", headers=key, data={"top_k": str(len(visible))},
                         files={"image": ("q.png", query, "image/png")}, timeout=300)
        assert res.status_code == 200, res.text
        retrieved = [m["name"] for m in res.json()["concepts"]]
        captions[-1].update(visible=sorted(visible), retrieved=retrieved)
        chosen += len(set(retrieved) & visible)
        slots += len(visible)
    # Renamed (same images, new names): every concept renamed, every photo captioned again;
    # the captions should follow the new names as well as they followed the first ones.
    for world_name, name in user_names.items():
        res = httpx.patch(f"{base}/v1/concepts/{name}", headers=key,
                          json={"name": renames[world_name]}, timeout=60)
        assert res.status_code == 200, res.text
    renamed, old_after = NameMetrics(), 0
    new_names = {user_names[w]: n for w, n in renames.items()}
    for x, before in zip(samples, captions):
        query = (world / "eval" / x["image"][-1]).resolve().read_bytes()
        refs = [renames[w] for w in before["shown"]]
        present = [new_names[n] for n in before["present"]]
        res = httpx.post(f"{base}/v1/captions", headers=key, data={"concepts": ",".join(refs)},
                         files={"image": ("q.png", query, "image/png")}, timeout=300)
        assert res.status_code == 200, res.text
        caption = res.json()["caption"]
        before["renamed"] = caption
        found = find_names(caption, list(renames.values()))
        renamed.add(slot_outcomes(found, present, renames.values(), case_sensitive=False))
        old_after += len(find_names(caption, list(user_names.values())))
    first = captions[0]
    return {"recall": explicit.recall, "precision": explicit.precision,
            "retrieval": chosen / slots, "retrieval_slots": slots,
            "renamed_recall": renamed.recall, "renamed_precision": renamed.precision,
            "old_names_after_renaming": old_after,
            "old": first["present"][0], "new": new_names[first["present"][0]],
            "before": first["caption"], "renamed": first["renamed"], "captions": captions}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", default="checkpoints/tiny-open")
    p.add_argument("--out", default=None, help="result JSON")
    p.add_argument("--references", type=int, default=1,
                   help="photos registered per concept (1-5)")
    args = p.parse_args(argv)
    sys.path.insert(0, str(REPO))
    from repic_ray.ports import free_port

    with tempfile.TemporaryDirectory() as tmp:
        home = Path(tmp)
        env = {"PATH": f"{Path(sys.executable).parent}:/usr/local/bin:/usr/bin:/bin",
               "HOME": str(home)}
        repic = [sys.executable, "-m", "recipes.cli"]
        add = subprocess.run([*repic, "serve", "add-user", "alice", "--admin"], cwd=REPO,
                             env=env, capture_output=True, text=True, timeout=120, check=True)
        key = {"X-API-Key": add.stdout.strip()}
        port = free_port()
        log = (home / "serve.log").open("w")
        proc = subprocess.Popen([*repic, "serve", "--checkpoint", args.checkpoint,
                                 "--port", str(port)], cwd=REPO, env=env, stdout=log,
                                stderr=subprocess.STDOUT)
        base = f"http://127.0.0.1:{port}"
        try:
            try:
                wait_ready(base, proc, home / "serve.log")
            except RuntimeError as exc:
                print(exc, file=sys.stderr)
                return 1
            start = time.monotonic()
            got = personalization(base, key, home / "world", args.references)
            got["seconds"] = round(time.monotonic() - start, 1)
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=120)
    got.update(checkpoint=args.checkpoint, world_seed=WORLD_SEED, references=args.references,
               command=" ".join(["python", "bench/service_gate.py", *(argv or sys.argv[1:])]))
    print(json.dumps({k: v for k, v in got.items() if k != "captions"}, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(got, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
