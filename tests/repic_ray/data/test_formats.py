"""Tests for repic_ray/data/formats.py: round trips, validation messages, image checks."""

import json
import os

import pytest
from PIL import Image

from repic_ray.data.formats import (
    CaptionRecord,
    DataError,
    check_images,
    load_captions,
    load_database,
    load_samples,
    save_captions,
    save_database,
    save_samples,
)


def _png(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (4, 4), (1, 2, 3)).save(path)
    return path


def _write_json(path, obj):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj))
    return path


DB = {
    "concept_dict": {
        "<Bo>": {"name": "Bo", "image": ["./refs/bo1.png", "refs/bo2.png"], "info": "A red dog.",
                 "category": "dog", "source": "kept"},
        "<Miss Daisy>": {"name": "Miss Daisy", "image": "./refs/daisy.png", "info": "",
                         "category": "cat"},
    },
    "path_to_concept": {"./refs/bo1.png": "<Bo>"},
}


# ---------------------------------------------------------------------------------------
# Concept database


def test_database_round_trip_and_lookups(tmp_path):
    src = _write_json(tmp_path / "a" / "database.json", DB)
    db = load_database(src)
    bo = db["<Bo>"]
    # Relative paths resolve against the database file's folder.
    assert bo.images == [str(tmp_path / "a" / "refs" / "bo1.png"), str(tmp_path / "a/refs/bo2.png")]
    assert db.by_name("Bo") is bo and db.by_name("<Bo>") is bo and db.lookup("Bo") is bo
    assert db.by_name("Miss Daisy").images == [str(tmp_path / "a" / "refs" / "daisy.png")]
    assert db.concept_of_image(str(tmp_path / "a/refs/bo2.png")) is bo  # completed mapping
    assert db.names() == ["Bo", "Miss Daisy"] and len(db) == 2 and "Bo" in db and "<Bo>" in db
    assert bo.extra == {"source": "kept"}
    with pytest.raises(KeyError, match="Rex"):
        db.by_name("Rex")

    dst = tmp_path / "b" / "sub" / "db.json"
    save_database(db, dst)
    stored = json.loads(dst.read_text())
    # Written relative to the new file, pointing at the same files.
    assert stored["concept_dict"]["<Bo>"]["image"] == ["../../a/refs/bo1.png", "../../a/refs/bo2.png"]
    assert stored["concept_dict"]["<Bo>"]["source"] == "kept"
    assert stored["path_to_concept"]["../../a/refs/daisy.png"] == "<Miss Daisy>"
    assert load_database(dst) == db


def _broken_db(mutate):
    db = json.loads(json.dumps(DB))
    mutate(db)
    return db


@pytest.mark.parametrize(
    "mutate, record, field",
    [
        (lambda d: d["concept_dict"]["<Bo>"].pop("name"), "'<Bo>'", "name"),
        (lambda d: d["concept_dict"]["<Bo>"].update(image=[]), "'<Bo>'", "image"),
        (lambda d: d["concept_dict"]["<Bo>"].update(image=[3]), "'<Bo>'", "image"),
        (lambda d: d["concept_dict"]["<Miss Daisy>"].pop("category"), "'<Miss Daisy>'", "category"),
        (lambda d: d["concept_dict"]["<Miss Daisy>"].update(info=None), "'<Miss Daisy>'", "info"),
        (lambda d: d["concept_dict"]["<Miss Daisy>"].update(name="Bo"), "'<Miss Daisy>'", "name"),
        (lambda d: d["concept_dict"].update({"<X>": "just a string"}), "'<X>'", None),
        (lambda d: d["path_to_concept"].update({"x.png": "<Nobody>"}), "'path_to_concept'", None),
        (lambda d: d.pop("concept_dict"), None, "concept_dict"),
    ],
    ids=["no-name", "empty-images", "image-not-str", "no-category", "info-null", "duplicate-name",
         "record-not-object", "unknown-key-in-mapping", "no-concept-dict"],
)
def test_broken_database_names_file_record_field(tmp_path, mutate, record, field):
    path = _write_json(tmp_path / "database.json", _broken_db(mutate))
    with pytest.raises(DataError) as exc:
        load_database(path)
    msg = str(exc.value)
    assert msg.startswith(str(path) + ": ")
    if record:
        assert f"record {record}" in msg
    if field:
        assert f"field '{field}'" in msg


def test_database_not_json(tmp_path):
    path = tmp_path / "database.json"
    path.write_text('{"concept_dict": {')
    with pytest.raises(DataError, match=r"database\.json: invalid JSON at line 1"):
        load_database(path)


# ---------------------------------------------------------------------------------------
# Training samples

SAMPLES = [
    {"image": ["refs/bo.png", "q/1.png"], "problem": "Is <Bo> in this image?", "solution": "yes",
     "accu_reward_method": "yes_no", "ref_names": ["Bo"], "my_field": {"kept": [1, 2]}},
    {"image": "q/2.png", "problem": "Give a caption of the image.", "solution": "Bo",
     "accu_reward_method": "yes_no_name", "target": "Bo the red dog sits at the top."},
    {"image": ["refs/bo.png", "refs/mia.png", "q/3.png"], "problem": "Give a caption.",
     "solution": ["Bo", "Mia"], "accu_reward_method": "yes_no_name_multi",
     "concepts": ["Bo", "Mia"], "reference_captions": ["one", "two", "three"]},
    {"image": ["refs/bo.png", "q/4.png"], "problem": "Where is <Bo>?", "solution": [1, 2.5, 30, 40],
     "accu_reward_method": "iou", "objects": [{"name": "Bo", "box": [1, 2.5, 30, 40]}]},
]


@pytest.mark.parametrize("suffix", [".json", ".jsonl"])
def test_samples_round_trip(tmp_path, suffix):
    src = tmp_path / "data" / f"train{suffix}"
    src.parent.mkdir()
    if suffix == ".json":
        src.write_text(json.dumps(SAMPLES))
    else:
        src.write_text("\n".join(json.dumps(r) for r in SAMPLES) + "\n\n")
    samples = load_samples(src)
    assert [s.accu_reward_method for s in samples] == ["yes_no", "yes_no_name",
                                                      "yes_no_name_multi", "iou"]
    assert samples[0].images == [str(tmp_path / "data/refs/bo.png"), str(tmp_path / "data/q/1.png")]
    assert samples[0].query_image == str(tmp_path / "data/q/1.png")
    assert samples[0].reference_images == [str(tmp_path / "data/refs/bo.png")]
    assert samples[0].extra == {"my_field": {"kept": [1, 2]}} and samples[0].ref_names == ["Bo"]
    assert samples[1].single_image and samples[1].target.startswith("Bo the")
    assert (samples[3].source, samples[3].index) == (str(src), 3)

    # Save into another folder and as the other format: same samples, records unchanged.
    other = ".jsonl" if suffix == ".json" else ".json"
    dst = tmp_path / "out" / f"copy{other}"
    save_samples(samples, dst)
    assert load_samples(dst) == samples
    save_samples(samples, tmp_path / "data" / f"again{suffix}")
    records = load_samples(tmp_path / "data" / f"again{suffix}")
    assert records == samples
    stored = [json.loads(line) for line in (tmp_path / "out" / "copy.jsonl").read_text().splitlines()
              ] if other == ".jsonl" else json.loads(dst.read_text())
    assert stored[1]["image"] == "../data/q/2.png"  # one string stays one string
    assert stored[0]["my_field"] == {"kept": [1, 2]}


@pytest.mark.parametrize(
    "change, field",
    [
        ({"solution": "maybe"}, "solution"),
        ({"solution": ["yes"]}, "solution"),
        ({"accu_reward_method": "iou", "solution": [1, 2, 3]}, "solution"),
        ({"accu_reward_method": "iou", "solution": [10, 2, 5, 8]}, "solution"),
        ({"accu_reward_method": "iou", "solution": [1, 8, 5, 8]}, "solution"),
        ({"accu_reward_method": "iou", "solution": [1, 2, True, 8]}, "solution"),
        ({"accu_reward_method": "yes_no_name", "solution": ""}, "solution"),
        ({"accu_reward_method": "yes_no_name", "solution": ["Bo"]}, "solution"),
        ({"accu_reward_method": "yes_no_name_multi", "solution": []}, "solution"),
        ({"accu_reward_method": "yes_no_name_multi", "solution": "Bo"}, "solution"),
        ({"accu_reward_method": "yes_no_name_multi", "solution": ["Bo", ""]}, "solution"),
        ({"accu_reward_method": "caption"}, "accu_reward_method"),
        ({"problem": ""}, "problem"),
        ({"image": []}, "image"),
        ({"image": ["a.png", 5]}, "image"),
        ({"ref_names": ["Bo", "Mia"]}, "ref_names"),
        ({"concepts": "Bo"}, "concepts"),
        ({"reference_captions": []}, "reference_captions"),
        ({"objects": [{"name": "Bo", "box": [0, 0, 0, 4]}]}, "objects[0].box"),
    ],
)
def test_broken_sample_names_file_record_field(tmp_path, change, field):
    good = dict(SAMPLES[0])
    bad = {**good, **change}
    path = _write_json(tmp_path / "train.json", [good, bad])
    with pytest.raises(DataError) as exc:
        load_samples(path)
    assert str(exc.value).startswith(f"{path}: record 1, field '{field}': ")


@pytest.mark.parametrize("missing", ["image", "problem", "solution", "accu_reward_method"])
def test_sample_missing_field(tmp_path, missing):
    bad = {k: v for k, v in SAMPLES[0].items() if k != missing}
    path = _write_json(tmp_path / "train.json", [SAMPLES[0], SAMPLES[1], bad])
    with pytest.raises(DataError, match=rf"record 2, field '{missing}': missing required field"):
        load_samples(path)


def test_jsonl_bad_line_and_empty_file(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text(json.dumps(SAMPLES[0]) + "\n\n" + '{"image": "x.png",\n')
    with pytest.raises(DataError, match=r"train\.jsonl: record 1: invalid JSON on line 3"):
        load_samples(path)
    path.write_text("\n")
    with pytest.raises(DataError, match="contains no samples"):
        load_samples(path)
    with pytest.raises(DataError, match="no such file"):
        load_samples(tmp_path / "absent.jsonl")


def test_image_root_overrides_file_folder(tmp_path):
    path = _write_json(tmp_path / "meta" / "train.json", [SAMPLES[1]])
    (s,) = load_samples(path, image_root=tmp_path / "imgs")
    assert s.images == [str(tmp_path / "imgs" / "q" / "2.png")]


# ---------------------------------------------------------------------------------------
# Caption result files


def test_captions_round_trip_keeps_concepts_as_given(tmp_path):
    recs = [
        CaptionRecord("./multi/a_1.jpg", ["<Anya>", "<Bond>"], "In this image, <Anya> ...",
                      "Give a caption of the image."),
        CaptionRecord("q/2.png", ["Bo"], "Bo the red dog.", "Give a personalized caption."),
    ]
    path = tmp_path / "captions.json"
    save_captions(recs, path)
    assert json.loads(path.read_text())[0] == ["./multi/a_1.jpg", ["<Anya>", "<Bond>"],
                                               "In this image, <Anya> ...",
                                               "Give a caption of the image."]
    assert load_captions(path) == recs


@pytest.mark.parametrize(
    "record, field",
    [
        (["a.png", ["Bo"], "cap"], None),
        ({"image": "a.png"}, None),
        (["", ["Bo"], "cap", "p"], "image"),
        (["a.png", [], "cap", "p"], "concepts"),
        (["a.png", "Bo", "cap", "p"], "concepts"),
        (["a.png", ["Bo"], None, "p"], "caption"),
        (["a.png", ["Bo"], "cap", 3], "prompt"),
    ],
)
def test_broken_caption_file(tmp_path, record, field):
    path = _write_json(tmp_path / "res.json", [["ok.png", ["Bo"], "c", "p"], record])
    with pytest.raises(DataError) as exc:
        load_captions(path)
    expected = f"{path}: record 1, field '{field}': " if field else f"{path}: record 1: "
    assert str(exc.value).startswith(expected)


# ---------------------------------------------------------------------------------------
# Image checks


def test_check_images_lists_every_missing_file_at_once(tmp_path):
    db_path = _write_json(tmp_path / "database.json", DB)
    _png(tmp_path / "refs" / "bo1.png")  # bo2.png and daisy.png are missing
    db = load_database(db_path)
    s_path = _write_json(tmp_path / "train.json", SAMPLES[:2])
    _png(tmp_path / "refs" / "bo.png")
    _png(tmp_path / "q" / "1.png")  # q/2.png is missing
    samples = load_samples(s_path)

    with pytest.raises(DataError) as exc:
        check_images(database=db, samples=samples, paths=[str(tmp_path / "extra.png")])
    msg = str(exc.value)
    assert "4 image file(s) cannot be used" in msg
    for name in ("refs/bo2.png", "refs/daisy.png", "q/2.png", "extra.png"):
        assert os.path.join(str(tmp_path), name) + " (missing)" in msg
    assert f"{db_path}: record '<Miss Daisy>', field 'image': " in msg
    assert f"{s_path}: record 1, field 'image': " in msg
    assert len(exc.value.problems) == 4

    for name in ("refs/bo2.png", "refs/daisy.png", "q/2.png", "extra.png"):
        _png(tmp_path / name)
    check_images(database=db, samples=samples, paths=[str(tmp_path / "extra.png")])


def test_check_images_decode_reports_corrupt_files(tmp_path):
    s_path = _write_json(tmp_path / "train.json", SAMPLES[:1])
    _png(tmp_path / "refs" / "bo.png")
    (tmp_path / "q").mkdir()
    (tmp_path / "q" / "1.png").write_bytes(b"garbage")
    samples = load_samples(s_path)
    check_images(samples=samples)  # exists: fine without decoding
    with pytest.raises(DataError, match=r"q/1\.png \(UnidentifiedImageError"):
        check_images(samples=samples, decode=True)
