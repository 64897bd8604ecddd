"""Tests for repic_ray/pipeline/report.py: names and caption quality side by side."""

import json

from repic_ray.data.formats import CaptionRecord, save_captions
from repic_ray.pipeline.report import write_report


def split(hits, misses, slots):
    p = hits / (hits + misses)
    r = hits / slots
    return {"precision": p, "recall": r, "f1": 2 * p * r / (p + r), "hits": hits, "misses": misses, "slots": slots}


def quality(cider, rep4, words, at_cap):
    return {"cider_d": cider, "bleu4": 0.3, "meteor": 0.25, "rouge_l": 0.5, "rep4": rep4,
            "distinct2": 0.4, "mean_words": words, "at_cap": at_cap}


def test_report_shows_quality_beside_names_flags_a_fall_and_quotes_captions(tmp_path):
    evals = {
        "before": {"k1": split(9, 1, 10), "k3": split(12, 1, 30),
                   "quality": {"k1": quality(2.0, 0.01, 27.0, 0.0), "k3": quality(1.5, 0.03, 36.0, 0.0),
                               "pooled": quality(1.7, 0.02, 31.5, 0.0)}},
        "after": {"k1": split(10, 0, 10), "k3": split(25, 1, 30),
                  "quality": {"k1": quality(2.1, 0.01, 28.0, 0.0), "k3": quality(0.4, 0.51, 63.0, 0.3),
                              "pooled": quality(1.2, 0.26, 45.0, 0.15)}},
    }
    for tag, text in (("before", "Bo the red cup is at the top."), ("after", "Bo, Bo, Bo, Bo, Bo, Bo.")):
        for k, concepts in ((1, ["Bo"]), (3, ["Bo", "Mia", "Kai"])):
            (tmp_path / "eval" / tag).mkdir(parents=True, exist_ok=True)
            save_captions([CaptionRecord(f"/w/eval_k{k}/00000.png", concepts, text, "q")],
                          tmp_path / "eval" / tag / f"captions_k{k}.json")
    report = write_report(tmp_path, evals).read_text()
    assert "## Names and caption quality (pooled)" in report
    # pooled row of "after": >=3 P 25/26, R 25/30, CIDEr-D pooled 1.20 and k1 2.10, rep4 0.260
    assert "| after | 96.2 | 83.3 | 89.3 | 100.0 | 1.20 | 2.10 | 0.260 | 45.0 | 15.0 |" in report
    assert ("**Quality fell on k3**: CIDEr-D 1.50 -> 0.40; repeated 4-grams 0.03 -> 0.51; "
            "mean words 36.0 -> 63.0") in report
    assert "**Quality fell on pooled**" in report and "Quality fell on k1" not in report
    assert "| k3 | after | 0.40 | 30.0 | 25.0 | 50.0 | 0.510 | 0.400 | 63.0 | 30.0 |" in report
    assert "## Sample captions (same images)" in report
    assert "- before: 'Bo the red cup is at the top.'" in report and "- after: 'Bo, Bo, Bo, Bo, Bo, Bo.'" in report
    assert "(Bo, Mia, Kai)" in report
    assert json.loads((tmp_path / "evals.json").read_text()) == evals


def test_report_without_quality_still_has_names(tmp_path):
    report = write_report(tmp_path, {"after": {"k1": split(9, 1, 10)}}).read_text()
    assert "P / R / F1" in report and "caption quality" not in report


def test_report_shows_binding_beside_names_when_measured(tmp_path):
    from repic_ray.evaluation.binding import with_rates

    def bound(concepts, named, b, mis, caps, described=20, true=15):
        return with_rates({"concepts": concepts, "named": named, "bound": b, "misbound": mis, "captions": caps,
                           "described": described, "described_true": true})

    evals = {
        "before": {"k1": split(9, 1, 10), "k3": split(12, 1, 30),
                   "quality": {"pooled": quality(1.7, 0.02, 31.5, 0.0)},
                   "binding": {"k1": bound(10, 9, 6, 0, 10), "k3": bound(30, 12, 3, 9, 10),
                               "k3plus": bound(30, 12, 3, 9, 10), "pooled": bound(40, 21, 9, 9, 20, 40, 10)}},
    }
    report = write_report(tmp_path, evals).read_text()
    assert "| eval | >=3 P | >=3 R | >=3 F1 | 1 F1 | >=3 bound | 1 bound | true desc | CIDEr-D |" in report
    # >=3 bound 3/30 = 10.0 %, 1 bound 6/10 = 60.0 %, true descriptions 10/40 = 25.0 %
    assert "| before | 92.3 | 40.0 | 55.8 | 90.0 | 10.0 | 60.0 | 25.0 | 1.70 |" in report
