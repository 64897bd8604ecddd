"""Tests for repic_ray/data/synthetic.py: the generated world is correct, loadable and
deterministic."""

import hashlib
import json
import re
from pathlib import Path

import numpy as np
import pytest

from repic_ray.data.formats import check_images, load_database, load_samples
from repic_ray.data.images import load_image
from repic_ray.data.synthetic import GRID, WorldConfig, generate_world, main
from repic_ray.data.vocab import all_words

SMALL = {"num_train": 24, "num_sft": 30, "num_eval_per_k": 5}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return generate_world(tmp_path_factory.mktemp("world"), seed=3, **SMALL)


@pytest.fixture(scope="module")
def episode_world(tmp_path_factory):
    return generate_world(tmp_path_factory.mktemp("episode"), seed=3, names="per_episode", **SMALL)


def _all_samples(paths):
    out = load_samples(paths.train) + load_samples(paths.sft)
    for p in paths.eval.values():
        out += load_samples(p)
    return out


def _tree_digest(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*")) if p.is_file()
    }


def test_every_file_loads_and_every_image_exists(world):
    db = load_database(world.database)
    assert len(db) == 8
    samples = _all_samples(world)
    check_images(database=db, samples=samples, decode=True)
    assert world.contact_sheet.is_file() and world.world.is_file()
    assert sorted(world.eval) == [1, 2, 3, 4, 5]
    for c in db:
        assert load_image(c.images[0]).size == (28, 28)


def test_boxes_inside_image_and_cell_and_objects_drawn_only_there(world):
    cell = 28
    for s in _all_samples(world):
        img = np.asarray(load_image(s.query_image)).astype(int)
        assert img.shape == (GRID * cell, GRID * cell, 3)
        inside = np.zeros(img.shape[:2], dtype=bool)
        for o in s.objects:
            x1, y1, x2, y2 = o["box"]
            cx, cy = (o["cell"] % GRID) * cell, (o["cell"] // GRID) * cell
            assert cx <= x1 < x2 <= cx + cell and cy <= y1 < y2 <= cy + cell, (s.index, o)
            inside[y1:y2, x1:x2] = True
            # Something clearly not background is drawn in every box (every colour has a
            # channel far from the ~128 grey).
            assert (np.abs(img[y1:y2, x1:x2] - 128) > 45).any(), (s.query_image, o)
        # Outside all boxes: only the grey background (equal channels, near mid-grey).
        bg = img[~inside]
        assert (bg[:, 0] == bg[:, 1]).all() and (bg[:, 1] == bg[:, 2]).all()
        assert bg.min() >= 90 and bg.max() <= 170


def test_eval_splits_have_exactly_k_concepts(world):
    db = load_database(world.database)
    for k, path in world.eval.items():
        samples = load_samples(path)
        assert len(samples) == 5
        for s in samples:
            named = [o["name"] for o in s.objects if o["name"] is not None]
            assert len(named) == k and len(set(named)) == k
            assert sorted(s.concepts) == sorted(named)
            if k == 1:
                assert s.accu_reward_method == "yes_no_name" and s.solution == named[0]
            else:
                assert s.accu_reward_method == "yes_no_name_multi"
                assert sorted(s.solution) == sorted(named)
            # References: every present concept plus 1-2 absent ones.
            assert set(named) <= set(s.ref_names)
            assert 1 <= len(set(s.ref_names) - set(named)) <= 2
            assert len(s.images) == len(s.ref_names) + 1
            # Ground-truth captions: >= 3 distinct, long enough, naming every concept.
            caps = s.reference_captions
            assert len(caps) >= 3 and len(set(caps)) == len(caps)
            for cap in caps:
                assert len(cap) >= 100
                for o in s.objects:
                    if o["name"]:
                        c = db.by_name(o["name"])
                        assert o["name"] in cap and c.category in cap
                        assert f'{o["colour"]} {o["pattern"]} {o["category"]}' in cap


def test_fixed_mode_names_are_constant_per_concept(world):
    db = load_database(world.database)
    for s in _all_samples(world):
        for img, name in zip(s.reference_images, s.ref_names):
            assert db.concept_of_image(img).name == name
        for o in s.objects:
            if o["key"] is not None:
                assert o["name"] == db[o["key"]].name


def test_per_episode_names_are_redrawn_and_bound_to_references(episode_world):
    db = load_database(episode_world.database)
    names_of_key: dict[str, set[str]] = {}
    for s in _all_samples(episode_world):
        shown = dict(zip((db.concept_of_image(i).key for i in s.reference_images), s.ref_names))
        for o in s.objects:
            if o["key"] is not None:
                names_of_key.setdefault(o["key"], set()).add(o["name"])
                if o["key"] in shown:  # a present concept carries the name shown with its image
                    assert o["name"] == shown[o["key"]]
    assert all(len(v) > 1 for v in names_of_key.values())


def test_train_has_all_four_tasks_with_consistent_answers(world):
    samples = load_samples(world.train)
    methods = [s.accu_reward_method for s in samples]
    assert {m: methods.count(m) for m in set(methods)} == {
        "yes_no": 6, "yes_no_name": 6, "yes_no_name_multi": 6, "iou": 6}
    for s in samples:
        named = {o["name"]: o for o in s.objects if o["name"]}
        if s.accu_reward_method == "yes_no":
            asked = re.fullmatch(r"Is <(.+)> in this image\?", s.problem).group(1)
            assert s.ref_names == [asked]
            assert s.solution == ("yes" if asked in named else "no") == s.target
        elif s.accu_reward_method == "iou":
            asked = re.search(r"<(.+)>", s.problem).group(1)
            assert s.ref_names == [asked]
            assert s.solution == named[asked]["box"] and json.loads(s.target) == s.solution
        elif s.accu_reward_method == "yes_no_name":
            assert list(named) == [s.solution] and s.solution in s.target
        else:
            assert sorted(s.solution) == sorted(named) and len(named) >= 2
    assert {s.solution for s in samples if s.accu_reward_method == "yes_no"} == {"yes", "no"}


def test_train_captions_carry_distinct_references_naming_every_concept(world):
    # CIDEr-D rewards need several wordings of each training caption; the target is one of them.
    caption = [s for s in load_samples(world.train) if s.accu_reward_method.startswith("yes_no_name")]
    assert caption
    for s in caption:
        refs = s.reference_captions
        assert refs[0] == s.target and len(set(refs)) == len(refs) == 4
        for ref in refs:
            assert all(name in ref for name in s.concepts)
    assert all(s.reference_captions is None for s in load_samples(world.sft))


def test_sft_is_mostly_single_concept_with_targets():
    # Larger set so the fraction is meaningful; only the SFT split is generated.
    import tempfile
    with tempfile.TemporaryDirectory() as d:
        paths = generate_world(d, seed=1, num_train=0, num_sft=200, num_sft_aux=10,
                               num_eval_per_k=0)
        sft = load_samples(paths.sft)
    aux = sft[200:]
    assert [s.extra["task"] for s in aux] == ["yes_no", "iou"] * 5
    assert all(s.target == s.solution for s in aux if s.accu_reward_method == "yes_no")
    assert all(json.loads(s.target) == s.solution for s in aux if s.accu_reward_method == "iou")
    sft = sft[:200]
    assert all(s.extra["task"] == "caption" for s in sft)
    single = sum(len(s.concepts) == 1 for s in sft) / len(sft)
    assert 0.7 <= single <= 0.9
    assert all(s.target and len(s.target) >= 100 for s in sft)
    assert {len(s.concepts) for s in sft} == {1, 2, 3, 4, 5}


def test_texts_use_only_vocabulary_words(world, episode_world):
    words = set(all_words())
    for paths in (world, episode_world):
        for s in _all_samples(paths):
            texts = [s.problem, s.target or "", *(s.reference_captions or []), *s.ref_names]
            for t in texts:
                unknown = set(re.findall(r"[A-Za-z]+", t)) - words
                assert not unknown, (t, unknown)


def test_same_seed_is_byte_identical_and_different_seed_differs(tmp_path, world):
    a = generate_world(tmp_path / "a", seed=3, **SMALL)
    assert _tree_digest(a.root) == _tree_digest(world.root)
    # Regenerating into an existing world folder gives the same bytes too.
    generate_world(tmp_path / "a", seed=3, **SMALL)
    assert _tree_digest(a.root) == _tree_digest(world.root)
    b = generate_world(tmp_path / "b", seed=4, **SMALL)
    da, db = _tree_digest(a.root), _tree_digest(b.root)
    assert da["concepts/database.json"] != db["concepts/database.json"]
    assert da["train/train.jsonl"] != db["train/train.jsonl"]


def test_world_config_validation():
    with pytest.raises(ValueError, match="names"):
        WorldConfig(names="random")
    with pytest.raises(ValueError, match="num_concepts"):
        WorldConfig(num_concepts=1)
    with pytest.raises(ValueError, match="num_reference_captions"):
        WorldConfig(num_reference_captions=2)
    with pytest.raises(ValueError, match="max_distractors"):
        WorldConfig(max_concepts_per_image=8, max_distractors=2)


def test_small_world_caps_concepts_per_image(tmp_path):
    paths = generate_world(tmp_path, seed=0, num_concepts=3, num_train=8, num_sft=4,
                           num_eval_per_k=2)
    assert sorted(paths.eval) == [1, 2, 3]
    for s in load_samples(paths.eval[3]):
        assert s.ref_names and len(s.ref_names) == 3  # no absent concept is left to add


def test_cli(tmp_path, capsys):
    main(["--out", str(tmp_path), "--seed", "2", "--num-train", "4", "--num-sft", "2",
          "--num-eval-per-k", "1", "--names", "per_episode"])
    assert "wrote" in capsys.readouterr().out
    cfg = json.loads((tmp_path / "world.json").read_text())["config"]
    assert cfg["seed"] == 2 and cfg["names"] == "per_episode" and cfg["num_train"] == 4
    assert len(load_samples(tmp_path / "train" / "train.jsonl")) == 4


@pytest.fixture(scope="module")
def open_world(tmp_path_factory):
    return generate_world(tmp_path_factory.mktemp("open"), seed=3, names="open", num_concepts=20,
                          **SMALL)


def test_open_world_evaluates_unseen_triples_under_unseen_names(open_world):
    from repic_ray.data.names import name_split, triple_split

    train_triples, held_out = triple_split()
    train_names, eval_names = name_split()
    db = load_database(open_world.database)
    assert len(db) == 20 and all(c.name in eval_names for c in db)
    training = load_samples(open_world.train) + load_samples(open_world.sft)
    evals = [s for p in open_world.eval.values() for s in load_samples(p)]
    check_images(database=db, samples=training + evals, decode=False)

    def concepts_of(samples):
        keys = {o["key"] for s in samples for o in s.objects if o["key"]}
        names = {n for s in samples for n in s.ref_names}
        return keys, names

    keys, names = concepts_of(training)
    assert keys <= {f"<{'-'.join(t)}>" for t in train_triples} and names <= set(train_names)
    assert len(names) > 50  # names are drawn per sample
    keys, names = concepts_of(evals)
    assert keys <= {f"<{'-'.join(t)}>" for t in held_out} and names <= set(eval_names)
    # Distractor objects come from the same split and are never a sample's concept.
    for s, held in [(s, False) for s in training] + [(s, True) for s in evals]:
        concept_keys = {o["key"] for o in s.objects if o["key"]}
        for o in s.objects:
            t = (o["shape"], o["colour"], o["pattern"])
            assert (t in held_out) == held
            if o["key"] is None:
                assert f"<{'-'.join(t)}>" not in concept_keys
    # Every caption prompt shows the present concepts' references plus 1-2 absent ones.
    for s in evals:
        assert set(s.concepts) < set(s.ref_names) and len(s.ref_names) - len(s.concepts) <= 2


def test_open_world_answers_are_bound_to_the_shown_names(open_world):
    for s in load_samples(open_world.train):
        named = {o["name"]: o for o in s.objects if o["name"]}
        if s.accu_reward_method == "yes_no":
            asked = re.fullmatch(r"Is <(.+)> in this image\?", s.problem).group(1)
            assert s.solution == ("yes" if asked in named else "no")
        if s.accu_reward_method.startswith("yes_no_name"):  # caption prompts show every present concept
            assert set(named) <= set(s.ref_names)


def test_every_reference_carries_its_concepts_category(open_world):
    """Absent references too: the detector reward prompts with the category of any name a
    caption writes, and an absent reference's name is a wrong one it must be able to check."""
    from repic_ray.data.vocab import SHAPE_CATEGORY

    samples = load_samples(open_world.train) + [s for p in open_world.eval.values() for s in load_samples(p)]
    absent_seen = 0
    for s in samples:
        assert len(s.ref_categories) == len(s.ref_names)
        for path, name, category in zip(s.reference_images, s.ref_names, s.ref_categories):
            for o in s.objects:
                if o["name"] == name:
                    assert o["category"] == category
            shape = Path(path).stem.split("-")[0]
            if shape in SHAPE_CATEGORY:  # training references are stored under their triple
                assert category == SHAPE_CATEGORY[shape]
        absent_seen += len(set(s.ref_names) - set(s.concepts or []))
    assert absent_seen > 0


def test_open_world_is_byte_identical_per_seed(tmp_path, open_world):
    a = generate_world(tmp_path / "a", seed=3, names="open", num_concepts=20, **SMALL)
    assert _tree_digest(a.root) == _tree_digest(open_world.root)
    with pytest.raises(ValueError, match="num_concepts"):
        WorldConfig(names="open", num_concepts=81)


def test_who_samples_answer_with_the_present_concepts_name_only(tmp_path):
    from repic_ray.data.names import name_split, triple_split
    from repic_ray.data.synthetic import WHO_QUESTION

    w = generate_world(tmp_path, seed=4, names="open", num_concepts=12, num_train=0, num_sft=2,
                       num_sft_aux=0, num_sft_who=30, num_eval_per_k=0, max_concepts_per_image=1,
                       max_absent_refs=1)
    sft = load_samples(w.sft)
    who = [s for s in sft if s.extra["task"] == "who"]
    assert len(sft) == 32 and len(who) == 30
    train_names = set(name_split()[0])
    train_keys = {f"<{'-'.join(t)}>" for t in triple_split()[0]}
    for s in who:
        (present,) = [o for o in s.objects if o["name"]]
        assert s.problem == WHO_QUESTION and s.target == s.solution == present["name"] == s.concepts[0]
        assert len(s.ref_names) == 2 and present["name"] in s.ref_names and set(s.ref_names) <= train_names
        assert present["key"] in train_keys
        # the present concept's reference image is the one shown with its name
        ref = s.images[s.ref_names.index(present["name"])]
        assert Path(ref).name == present["key"][1:-1] + ".png"
    # both positions of the right reference occur
    assert {s.ref_names.index(s.concepts[0]) for s in who} == {0, 1}
    with pytest.raises(ValueError, match="num_sft_who"):
        WorldConfig(num_sft_who=-1)


def test_who_multi_samples_ask_for_one_object_among_several(tmp_path):
    w = generate_world(tmp_path, seed=4, names="open", num_concepts=12, num_train=0, num_sft=1,
                       num_sft_aux=0, num_sft_who=1, num_sft_who_multi=40, num_eval_per_k=0,
                       max_concepts_per_image=4, max_absent_refs=1)
    sft = load_samples(w.sft)
    multi = sft[2:]
    assert len(sft) == 42 and all(s.extra["task"] == "who" for s in sft[1:])
    with_attributes = 0
    for s in multi:
        assert 2 <= len(s.concepts) <= 4 and s.target == s.solution and s.solution in s.concepts
        (asked,) = [o for o in s.objects if o["name"] == s.target]
        # the question names the asked object's place, which no other object shares
        assert s.problem.endswith(f"at the {asked['position']}?")
        assert [o["position"] for o in s.objects].count(asked["position"]) == 1
        described = f"{asked['colour']} {asked['pattern']} {asked['category']}"
        with_attributes += s.problem == f"Who is the {described} at the {asked['position']}?"
        assert s.problem in (f"Who is at the {asked['position']}?",
                             f"Who is the {described} at the {asked['position']}?")
        # every present concept's reference is shown, under its name
        assert set(s.concepts) <= set(s.ref_names)
    # some questions give the place alone, so the query image has to be read
    assert 0 < with_attributes < len(multi)
    with pytest.raises(ValueError, match="num_sft_who_multi"):
        WorldConfig(num_sft_who_multi=-1)


def test_cell_queries_cut_each_query_to_its_concepts_cell(tmp_path):
    from repic_ray.data.cell_queries import convert

    src = generate_world(tmp_path / "src", seed=5, names="open", num_concepts=12, num_train=4,
                         num_sft=0, num_sft_aux=0, num_sft_who=6, num_eval_per_k=3,
                         max_concepts_per_image=2)
    counts = convert(src.root, tmp_path / "dst")
    assert counts == {"sft.jsonl": 6, "eval/concepts_1.json": 3}  # 2-concept samples skipped
    before = load_samples(src.sft)
    after = load_samples(tmp_path / "dst" / "sft.jsonl")
    for a, b in zip(after, before):
        assert (a.ref_names, a.target, a.problem) == (b.ref_names, b.target, b.problem)
        (obj,) = a.objects
        (orig,) = [o for o in b.objects if o["name"]]
        cell = load_image(a.images[-1])
        assert cell.size == (28, 28)
        # the cut cell is exactly the query's pixels at the concept's cell
        x0, y0 = (orig["cell"] % GRID) * 28, (orig["cell"] // GRID) * 28
        full = np.asarray(load_image(b.images[-1]))[y0:y0 + 28, x0:x0 + 28]
        assert np.array_equal(np.asarray(cell), full)
        assert obj["box"] == [orig["box"][0] - x0, orig["box"][1] - y0, orig["box"][2] - x0, orig["box"][3] - y0]
        assert all(Path(p).exists() for p in a.images)
    check_images(samples=load_samples(tmp_path / "dst" / "train" / "train.jsonl"), decode=False)
    with pytest.raises(ValueError, match="differ"):
        convert(src.root, src.root)


def test_object_first_captions_describe_then_name_same_images(tmp_path, open_world):
    from repic_ray.evaluation.binding import binding_counts

    a = generate_world(tmp_path / "a", seed=3, names="open", num_concepts=20,
                       caption_style="object_first", **SMALL)
    digest_a, digest_b = _tree_digest(a.root), _tree_digest(open_world.root)
    images = [k for k in digest_b if k.endswith(".png")]
    assert images and all(digest_a[k] == digest_b[k] for k in images)
    for k, path in a.eval.items():
        new, old = load_samples(path), load_samples(open_world.eval[k])
        assert [s.ref_names for s in new] == [s.ref_names for s in old]
        for s in new:
            for caption in s.reference_captions:
                # every concept's name comes after its description, every object in reading order
                for o in s.objects:
                    desc = f"{o['colour']} {o['pattern']} {o['category']}"
                    assert desc in caption
                    if o["name"]:
                        assert caption.index(desc) < caption.index(o["name"])
                cells = sorted(s.objects, key=lambda o: o["cell"])
                at = [caption.index(f"{o['colour']} {o['pattern']} {o['category']}") for o in cells]
                assert at == sorted(at)
            # the binding metric reads the description before the name
            assert binding_counts(s.reference_captions, [s] * len(s.reference_captions))["bound_rate"] == 1.0
    with pytest.raises(ValueError, match="caption_style"):
        WorldConfig(caption_style="random")


def test_several_references_per_concept(tmp_path, open_world):
    a = generate_world(tmp_path / "a", seed=3, names="open", num_concepts=20,
                       references_per_concept=3, **SMALL)
    db = load_database(a.database)
    for c in db:
        views = [load_image(p) for p in c.images]
        assert len(views) == 3 and len({v.tobytes() for v in views}) == 3
    digest_a, digest_b = _tree_digest(a.root), _tree_digest(open_world.root)
    # the scenes and the first view of every concept are those of the 1-reference world
    shared = [k for k in digest_b if k.endswith(".png")]
    assert shared and all(digest_a[k] == digest_b[k] for k in shared)
    counts, one_each, several = set(), 0, 0
    samples = _all_samples(a)
    check_images(database=db, samples=samples, decode=False)
    for s, old in zip(samples, _all_samples(open_world)):
        assert len(s.ref_names) == len(s.images) - 1
        # each reference concept's photos are shown together, 1-3 of them, under one name
        groups = []
        for name, path in zip(s.ref_names, s.images):
            stem = Path(path).stem.split("_")[0]
            if groups and groups[-1][0] == name:
                assert groups[-1][1] == stem
                groups[-1][2] += 1
            else:
                groups.append([name, stem, 1])
        assert [g[0] for g in groups] == old.ref_names
        assert [g[1] for g in groups] == [Path(p).stem for p in old.images[:-1]]
        counts |= {g[2] for g in groups}
        if len(groups) >= 3:
            one_each += all(g[2] == 1 for g in groups)
            several += any(g[2] > 1 for g in groups)
        assert s.concepts == old.concepts and s.objects == old.objects
    assert counts == {1, 2, 3}
    # some prompts show one photo of each concept, as for a user who registered one
    assert one_each >= 10 and several >= 10
    generate_world(tmp_path / "b", seed=3, names="open", num_concepts=20,
                   references_per_concept=3, **SMALL)
    assert _tree_digest(tmp_path / "b") == digest_a
    for bad in (0, 6):
        with pytest.raises(ValueError, match="references_per_concept"):
            WorldConfig(references_per_concept=bad)
