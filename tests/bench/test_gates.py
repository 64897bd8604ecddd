"""bench/gates.py: the gate metric functions (hand-checked) and both gates end to end in
a reduced form."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from repic_ray.data.synthetic import generate_world


def _sample(refs, present, solution=None):
    """The fields of a `TrainSample` the gate metrics read."""
    return SimpleNamespace(ref_names=refs, concepts=present, solution=solution)


def test_name_scores_use_each_samples_own_reference_names():
    from bench.gates import name_scores

    samples = [
        _sample(["Karmi", "Dotfu"], ["Karmi"]),           # right name: 1 hit
        _sample(["Karmi", "Dotfu"], ["Karmi"]),           # wrong name only: 1 miss
        _sample(["Sonlu", "Pixro", "Gabki"], ["Sonlu", "Pixro"]),  # one right, none wrong: 1 hit, 1 unnamed
    ]
    captions = ["Karmi the red dog sits at the top.", "Dotfu the red dog.",
                "Sonlu, my cat, is here. Karmi is not a reference here."]
    got = name_scores(captions, samples)
    # slots 4, hits 2, misses 1 (sample 2) -> P 2/3, R 2/4; "Karmi" in caption 3 is not one
    # of that sample's references, so it is neither a hit nor a miss.
    assert (got["overall"]["slots"], got["overall"]["hits"], got["overall"]["misses"]) == (4, 2, 1)
    assert got["by_k"][1]["precision"] == 0.5 and got["by_k"][2]["recall"] == 0.5


def test_yes_no_accuracy_reads_the_first_word():
    from bench.gates import yes_no_accuracy

    samples = [_sample(["Karmi"], [], "yes"), _sample(["Karmi"], [], "no"), _sample(["Karmi"], [], "no")]
    got = yes_no_accuracy(["Yes.", "no", "Yes, it is"], samples)
    assert got["accuracy"] == 2 / 3 and got["accuracy_yes"] == 1.0 and got["accuracy_no"] == 0.5


@pytest.mark.slow
def test_gates_run_end_to_end(run_bench, tmp_path):
    g1 = run_bench("gates.py", "g1", "--checkpoint", "tiny:qwen2.5-vl", "--episodes", "8")
    assert g1["queries"] >= 8 and 0.0 <= g1["accuracy"] <= 1.0
    world = generate_world(tmp_path / "w", seed=2, names="open", num_concepts=12, num_train=4, num_sft=0,
                           num_sft_aux=0, num_eval_per_k=2, max_concepts_per_image=2,
                           max_absent_refs=1)
    res = run_bench("gates.py", "names", "--checkpoint", "tiny:qwen2.5-vl", "--data", str(world.root),
                    "--max-tokens", "8", "--max-yes-no", "2")
    assert res["names"]["overall"]["slots"] == 2 * 1 + 2 * 2 and res["yes_no"]["n"] == 2
    assert set(res["binding"]) == {"1", "2"}  # JSON keys
    assert res["binding"]["2"]["concepts"] == 4 and 0 <= res["binding"]["2"]["bound_rate"] <= 1
    g2 = run_bench("gates.py", "g2", "--checkpoint", "tiny:qwen2.5-vl", "--data", str(world.root))
    assert g2["n"] == 2 and len(g2["answers"]) == 2 and sum(g2["share"].values()) == pytest.approx(1.0)
    assert g2["swapped_references"]["n"] == 2 and 0.0 <= g2["answer_unchanged_when_swapped"] <= 1.0
    multi = run_bench("gates.py", "g2", "--checkpoint", "tiny:qwen2.5-vl", "--data", str(world.root),
                      "--concepts", "2", "--described")
    assert multi["n"] == 2 and 0.0 < multi["chance"] <= 0.5  # 2 present + at least 1 absent
    for a in multi["answers"]:
        assert a["asked"] in a["refs"] and a["question"].startswith("Who is the ")
    sig = run_bench("gates.py", "signal", "--checkpoint", "tiny:qwen2.5-vl", "--data", str(world.root),
                    "--n", "3", "--max-tokens", "8")
    (k2,) = sig["by_k"].values()  # only the 2-concept split: the signal is about several concepts
    assert k2["prompts"] == 2
    assert 0.0 <= k2["sampled_recall"] <= k2["best_of_n_recall"] <= 1.0


def test_first_name_choice_tells_wrong_binding_from_mixed_syllables():
    from bench.gates import first_name_choice

    samples = [_sample(["Garfu", "Funmi"], ["Garfu"])] * 4 + [_sample(["Garfu", "Funmi", "Tigbo"], ["Garfu", "Tigbo"])]
    captions = ["Garfu the red dog.", "There is Funmi.", "Farfu, my dog.", "A red dog sits here.",
                "Funmi and Garfu."]  # the 2-concept sample is not counted
    assert first_name_choice(captions, samples) == {
        "right": 0.25, "other_reference": 0.25, "mixed": 0.25, "none": 0.25}


def test_binding_accuracy_counts_exact_names_and_tells_wrong_reference_apart():
    from bench.gates import binding_accuracy

    samples = [_sample(["Garfu", "Funmi"], ["Garfu"])] * 4
    got = binding_accuracy(["Garfu", "<Funmi>.", "Farfu", ""], samples)
    assert got["accuracy"] == 0.25 and got["n"] == 4
    assert got["share"] == {"right": 0.25, "other_reference": 0.25, "other": 0.5}


def test_attributes_next_to_names_checks_the_named_concepts_own_words():
    from bench.gates import attributes_next_to_names

    sample = SimpleNamespace(concepts=["Holri", "Durro"], objects=[
        {"name": "Holri", "colour": "purple", "pattern": "striped", "category": "car"},
        {"name": "Durro", "colour": "cyan", "pattern": "checkered", "category": "car"},
        {"name": None, "colour": "white", "pattern": "dotted", "category": "shoe"}])
    counts = [0, 0]
    # Holri right; Durro with Holri's words; Durro again, right; a sentence without a name.
    attributes_next_to_names("Holri the purple striped car is at the top left. Durro, my purple "
                             "striped car, rests here. There is Durro the cyan checkered car. "
                             "A white dotted shoe.", sample, counts)
    assert counts == [2, 3]
