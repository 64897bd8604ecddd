"""Tests for recipes/eval.py: `repic eval` output on hand-built result files."""

import json

import pytest

from recipes.eval import main

# Same records as test_eval_metric.MIXED, as a RePIC result file.
RECORDS = [
    ["img1.jpg", ["<Bo>"], "Bo's ball is red.", "Give a caption."],
    ["img2.jpg", ["<Anya>"], "Here <Bo> sits.", "Give a caption."],
    ["img3.jpg", ["<captain america>", "<Bo>"], "Captain America and bo.", "Give a caption."],
    ["img4.jpg", ["<Anya>", "<Bo>"], "A sunny day.", "Give a caption."],
]


@pytest.fixture
def result_file(tmp_path):
    path = tmp_path / "results.json"
    path.write_text(json.dumps(RECORDS))
    return path


def test_text_output_percent_one_decimal(result_file, capsys):
    assert main(["eval", "--captions", str(result_file)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "4 captions, mode default, case-insensitive" in lines[0]
    # all: P 3/4, R 3/6, F1 0.6; k=1: 1/2 each; k=2: P 1, R 1/2, F1 2/3 (see test_eval_metric).
    assert lines[2].split() == ["all", "75.0", "50.0", "60.0", "6"]
    assert lines[3].split() == ["1", "50.0", "50.0", "50.0", "2"]
    assert lines[4].split() == ["2", "100.0", "50.0", "66.7", "4"]


def test_degeneration_measures_are_printed_and_in_json(tmp_path, capsys):
    path = tmp_path / "loops.json"
    # "bo is here bo is here": 4-grams (bo is here bo) (is here bo is) (here bo is here) -> none
    # repeat; "a b c d a b c d": 1 of 5 repeats -> mean rep4 0.1; words (6 + 8) / 2 = 7
    records = [["i1.jpg", ["<Bo>"], "Bo is here, bo is here.", "q"], ["i2.jpg", ["<Bo>"], "a b c d a b c d", "q"]]
    path.write_text(json.dumps(records))
    assert main(["eval", "--captions", str(path)]) == 0
    assert "repeated 4-grams 0.100, distinct-2 0.583, mean words 7.0" in capsys.readouterr().out
    assert main(["eval", "--captions", str(path), "--json"]) == 0
    # bigrams: bo-is is-here here-bo bo-is is-here (3 distinct) + ab bc cd da ab bc cd (4) -> 7/12
    quality = json.loads(capsys.readouterr().out)["overall"]["quality"]
    assert quality == pytest.approx({"rep4": 0.1, "distinct2": 7 / 12, "mean_words": 7.0})


def test_json_output_compat(result_file, capsys):
    assert main(["--captions", str(result_file), "--mode", "compat", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["mode"] == "compat" and out["case_sensitive"] is False
    # compat: hits 1, MISS 1, slots 6 -> P 0.5, R 1/6, F1 0.25.
    assert out["overall"]["hits"] == 1 and out["overall"]["misses"] == 1
    assert out["overall"]["f1"] == pytest.approx(0.25)
    assert set(out["by_k"]) == {"1", "2"}


def test_bad_record_names_file_and_record(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps([RECORDS[0], ["img.jpg", "<Bo>", "caption", "q"]]))
    with pytest.raises(ValueError, match=r"bad.json: record 1, field 'concepts'"):
        main(["--captions", str(path)])


def test_missing_references_raise(result_file, tmp_path):
    refs = tmp_path / "refs.json"
    refs.write_text(json.dumps({"img1.jpg": ["a red ball"]}))
    with pytest.raises(ValueError, match="no references for image"):
        main(["--captions", str(result_file), "--references", str(refs)])
