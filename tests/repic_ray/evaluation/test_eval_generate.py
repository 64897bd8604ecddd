"""Tests for repic_ray/evaluation/generate.py: splits, prompts of both retrieval modes,
result files and metrics, and clear errors on bad input."""

from __future__ import annotations

import json
import shutil

import pytest

from recipes.eval import main as eval_main
from repic_ray.data.formats import DataError, load_captions, load_database, load_samples
from repic_ray.evaluation.generate import (
    EvalConfig,
    find_database,
    retrieval_prompts,
    run_eval,
    skip_retrieval_prompts,
    split_files,
    write_results,
)


@pytest.fixture(scope="module")
def processor():
    from repic_ray.models.loading import load_processor

    return load_processor("tiny:qwen2.5-vl")


def test_split_files_from_world_or_eval_dir(world):
    assert split_files(world, [1, 3]) == {
        1: world / "eval" / "concepts_1.json",
        3: world / "eval" / "concepts_3.json",
    }
    assert split_files(world / "eval", [2]) == {2: world / "eval" / "concepts_2.json"}
    assert sorted(split_files(world)) == [1, 2, 3]  # every split by default
    # The database is found from the world or from its eval folder.
    assert find_database(world, None) == world / "concepts" / "database.json"
    assert find_database(world / "eval", None) == world / "concepts" / "database.json"


def test_unknown_split_k_names_the_folder_and_the_available_splits(world):
    with pytest.raises(
        FileNotFoundError, match=r"no split for k=\[4, 5\].*available: k=\[1, 2, 3\]"
    ):
        split_files(world, [1, 4, 5])
    with pytest.raises(FileNotFoundError, match="is not a directory"):
        split_files(world / "nowhere", [1])


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"retrieval": "oracle"}, "retrieval"),
        ({"top_k": 0}, "top_k"),
        ({"ks": [1, 1]}, "ks"),
        ({"ks": [0]}, "ks"),
        ({"engine": "tgi"}, "engine"),
        ({"max_per_k": 0}, "max_per_k"),
        ({"method": "runs/RL"}, "method"),
        ({"candidates": "all"}, "candidates"),
        ({"data": ""}, "data"),
    ],
)
def test_config_rejects_impossible_values(overrides, field):
    with pytest.raises(ValueError, match=rf"^{field}:"):
        EvalConfig(**{"data": "w", **overrides})


def test_results_folder_per_method_and_mode():
    assert str(EvalConfig(data="w", out="E", method="SFT").out_dir()) == "E/SFT/skip-retrieval"
    cfg = EvalConfig(
        data="w", out="E", checkpoint="ckpts/tiny-sft/", adapter="run/adapter", retrieval="topk"
    )
    assert str(cfg.out_dir()) == "E/tiny-sft+adapter/retrieval"


def test_skip_retrieval_prompts_show_the_split_references(world, processor):
    samples = load_samples(world / "eval" / "concepts_2.json")
    prompts = skip_retrieval_prompts(samples, processor, suffix="name", seed=0, uids=["a", "b"])
    for s, p in zip(samples, prompts):
        assert p.image_paths == s.images  # the split's references, then the query
        for name in s.ref_names:
            assert f"This is <{name}>." in p.text
        assert p.text.count("<|image_pad|>") == len(s.images)
        assert "Output the final answer including its name." in p.text


def test_retrieval_prompts_show_the_top_k_database_concepts(world, processor):
    from repic_ray.data.formats import TrainSample
    from repic_ray.serving.retriever import ConceptRetriever, RetrieverConfig

    db = load_database(world / "concepts" / "database.json")
    retriever = ConceptRetriever(RetrieverConfig(box_threshold=0.0, max_crops=2))
    split = load_samples(world / "eval" / "concepts_1.json")
    # A query that *is* a concept's reference image: its whole-image crop has cosine 1
    # with that reference, so the concept must be retrieved first.
    target = list(db)[2]
    exact = TrainSample(
        images=[target.images[0]],
        problem="Give a caption.",
        solution=target.name,
        accu_reward_method="yes_no_name",
        concepts=[target.name],
    )
    samples = [*split, exact]
    prompts, found = retrieval_prompts(
        samples, processor, db, retriever, top_k=2, suffix="none", seed=0, uids=["a", "b", "c"]
    )
    assert found[-1].names[0] == target.name
    for s, p, r in zip(samples, prompts, found):
        assert len(r.names) == 2 and set(r.names) <= set(db.names())
        assert r.scores == sorted(r.scores, reverse=True)
        # Each retrieved concept's reference images, best first, then the query.
        refs = [img for n in r.names for img in db.by_name(n).images]
        assert p.image_paths == [*refs, s.query_image]
        assert [f"This is <{n}>." in p.text for n in r.names] == [True, True]
    # top_k larger than the database: every concept once.
    _, everything = retrieval_prompts(
        split[:1], processor, db, retriever, top_k=10, suffix="none", seed=0, uids=["z"]
    )
    assert sorted(everything[0].names) == sorted(db.names())


def test_written_metrics_equal_repic_eval_on_the_written_files(world, tmp_path, capsys):
    splits = {k: load_samples(world / "eval" / f"concepts_{k}.json") for k in (1, 2)}
    names = sorted(load_database(world / "concepts" / "database.json").names())
    (a1,), _ = (s.concepts for s in splits[1])
    (a2, c2), (b2, d2) = (s.concepts for s in splits[2])
    wrong = next(n for n in names if n not in (a2, c2))
    captions = {
        1: [f"{a1} sits here.", "Nothing to see."],
        2: [f"{a2} and {wrong} play.", f"{b2} and {d2} rest."],
    }
    prompts = {k: ["q"] * 2 for k in captions}
    metrics = write_results(
        tmp_path,
        splits,
        captions,
        prompts,
        candidates=names,
        caption_metrics=False,
        settings={"method": "hand"},
    )
    # k=1: slot a1 hit; slot b1 none -> P 1/1, R 1/2.
    # k=2: query 1: a2 hit, c2 MISS (wrong name present); query 2: both hit
    #      -> hits 3, MISS 1: P 3/4, R 3/4.  All: hits 4, MISS 1, slots 6 -> P 4/5, R 2/3.
    assert (metrics["by_k"]["1"]["precision"], metrics["by_k"]["1"]["recall"]) == (1.0, 0.5)
    assert (metrics["by_k"]["2"]["precision"], metrics["by_k"]["2"]["recall"]) == (0.75, 0.75)
    assert metrics["overall"]["precision"] == pytest.approx(0.8)
    assert metrics["overall"]["recall"] == pytest.approx(2 / 3)

    # The result files hold one RePIC record per query of each split.
    for k in (1, 2):
        records = load_captions(tmp_path / f"captions_k{k}.json")
        assert [r.image for r in records] == [s.query_image for s in splits[k]]
        assert [r.concepts for r in records] == [s.concepts for s in splits[k]]
        assert [r.caption for r in records] == captions[k]
    assert len(load_captions(tmp_path / "captions_all.json")) == 4
    assert json.loads((tmp_path / "candidates.json").read_text()) == names
    assert json.loads((tmp_path / "metrics.json").read_text()) == metrics

    # `repic eval --captions` on each written file prints exactly the same numbers.
    for key, name in (
        ("1", "captions_k1.json"),
        ("2", "captions_k2.json"),
        ("all", "captions_all.json"),
    ):
        eval_main(
            [
                "--captions",
                str(tmp_path / name),
                "--candidates",
                str(tmp_path / "candidates.json"),
                "--json",
            ]
        )
        printed = json.loads(capsys.readouterr().out)["overall"]
        written = metrics["overall"] if key == "all" else metrics["by_k"][key]
        assert {k: v for k, v in written.items() if k != "caption_metrics"} == printed


def test_missing_checkpoint_is_named(world, tmp_path):
    cfg = EvalConfig(
        checkpoint=str(tmp_path / "no-such-ckpt"), data=str(world), engine="hf", out=str(tmp_path)
    )
    with pytest.raises(FileNotFoundError, match="no-such-ckpt"):
        run_eval(cfg)
    # Shaped like a hub id ("org/name") but neither local nor fetchable offline.
    cfg = EvalConfig(
        checkpoint="checkpoints/no-such-sft", data=str(world), engine="hf", out=str(tmp_path)
    )
    with pytest.raises(OSError, match="cannot load checkpoint 'checkpoints/no-such-sft'"):
        run_eval(cfg)


def test_incomplete_adapter_is_named(world, tmp_path):
    (tmp_path / "adapter").mkdir()
    (tmp_path / "adapter" / "adapter_config.json").write_text("{}")
    cfg = EvalConfig(
        data=str(world), adapter=str(tmp_path / "adapter"), engine="hf", out=str(tmp_path)
    )
    with pytest.raises(FileNotFoundError, match="has no adapter_model.safetensors"):
        run_eval(cfg)


def test_corrupt_query_image_names_file_record_and_image(world, tmp_path):
    copy = tmp_path / "world"
    shutil.copytree(world, copy)
    samples = load_samples(copy / "eval" / "concepts_2.json")
    bad = samples[1].query_image
    with open(bad, "r+b") as f:  # keep the PNG header, garble the pixel data
        f.seek(40)
        f.write(b"\x00" * 64)
    cfg = EvalConfig(data=str(copy), ks=[1, 2], engine="hf", out=str(tmp_path / "out"))
    with pytest.raises(DataError) as err:
        run_eval(cfg)
    msg = str(err.value)
    assert "concepts_2.json: record 1, field 'image'" in msg and bad in msg
    assert not (tmp_path / "out").exists()  # nothing generated or written


def test_retrieval_without_a_database_is_an_error(world, tmp_path):
    eval_only = tmp_path / "evalonly"
    shutil.copytree(world / "eval", eval_only)
    cfg = EvalConfig(data=str(eval_only), retrieval="topk", ks=[1], engine="hf", out=str(tmp_path))
    with pytest.raises(FileNotFoundError, match="retrieval mode needs the concept database"):
        run_eval(cfg)
    cfg = EvalConfig(
        data=str(eval_only), database=str(tmp_path / "db.json"), engine="hf", out=str(tmp_path)
    )
    with pytest.raises(FileNotFoundError, match="db.json does not exist"):
        run_eval(cfg)
