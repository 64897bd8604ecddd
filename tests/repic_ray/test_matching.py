"""Tests for repic_ray/matching.py: the name matcher shared by rewards and metrics."""

import pytest

from repic_ray.matching import compat_tokens, find_names, name_key, split_found, strip_brackets

NAMES = ["<Bo>", "<captain america>", "Anya", "<Baby_Q>"]


def test_default_mode_brackets_possessive_case_and_phrases():
    caption = "Bo's ball sits next to Captain   America while <anya> waves at Baby Q."
    assert find_names(caption, NAMES) == ["<Bo>", "<captain america>", "Anya", "<Baby_Q>"]


def test_default_mode_is_whole_word():
    # "Bob", "Anyas" and "Bonfire" contain the names but are other words.
    assert find_names("Bob lit a bonfire with Anyas.", NAMES) == []
    assert find_names("captain of america", NAMES) == []


def test_default_mode_case_sensitive_flag():
    assert find_names("bo plays", ["<Bo>"], case_sensitive=True) == []
    assert find_names("Bo plays", ["<Bo>"], case_sensitive=True) == ["<Bo>"]


def test_compat_mode_tokens_like_repic_scripts():
    # RePIC: strip .,!?;:()[]{}"'- from both ends of whitespace tokens, drop "</s>".
    assert compat_tokens('"<Bo>," (Anya)! x-</s>', case_sensitive=True) == {"<Bo>", "Anya", "x"}


def test_compat_mode_multi_word_names_never_match():
    caption = "captain america and <Bo> meet."
    assert find_names(caption, NAMES, mode="compat") == ["<Bo>"]


def test_compat_mode_possessive_does_not_match():
    # "Bo's" stays one token ("'" is stripped only at the ends): no match, as in RePIC.
    assert find_names("Bo's ball", ["<Bo>"], mode="compat") == []


def test_compat_mode_case_rule_is_explicit():
    # 2-concept script: case-sensitive; single / 4-concept scripts: lower-cased.
    assert find_names("bo and anya", ["<Bo>", "Anya"], mode="compat", case_sensitive=True) == []
    assert find_names("bo and anya", ["<Bo>", "Anya"], mode="compat", case_sensitive=False) == [
        "<Bo>",
        "Anya",
    ]


def test_keys_and_split_found():
    assert strip_brackets("<Bo>") == "Bo" and strip_brackets("<Bo") == "<Bo"
    assert name_key("<Bo>") == "bo" and name_key("<Bo>", case_sensitive=True) == "Bo"
    correct, wrong = split_found(["Bo", "<Anya>"], ["<Bo>"])
    assert correct == {"bo"} and wrong == {"anya"}


def test_bad_mode_and_caption_type():
    with pytest.raises(ValueError, match="mode"):
        find_names("x", ["a"], mode="fuzzy")
    with pytest.raises(TypeError, match="caption"):
        find_names(None, ["a"])


def test_count_mentions_counts_every_occurrence_as_find_names_matches():
    from repic_ray.matching import count_mentions

    cap = "Bo's ball. <Bo> and bo sleep; Bobby and Baby Q play, baby_q too."
    assert count_mentions(cap, ["Bo", "Baby Q", "Anya"]) == {"Bo": 3, "Baby Q": 2, "Anya": 0}
    assert count_mentions(cap, ["Bo"], case_sensitive=True) == {"Bo": 2}
    # compat: whitespace tokens, so "Bo's" is not Bo
    assert count_mentions(cap, ["<Bo>"], mode="compat") == {"<Bo>": 2}


def test_name_spans_in_text_order_longer_name_wins():
    from repic_ray.matching import name_spans

    text = "Miss Daisy met Bo. Daisy and <Bo> left."
    spans = name_spans(text, ["Daisy", "Bo", "Miss Daisy"])
    assert [(text[s:e], n) for s, e, n in spans] == [
        ("Miss Daisy", "Miss Daisy"), ("Bo", "Bo"), ("Daisy", "Daisy"), ("<Bo>", "Bo")]
