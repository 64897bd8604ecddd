"""Tests for repic_ray/evaluation/metric.py: RePIC's name P/R/F1 in default and compat modes."""

import pytest

from repic_ray.evaluation.metric import HIT, MISS, evaluate_names, slot_outcomes

# A mixed file: 1- and 2-concept records; candidates = <Anya>, <Bo>, <captain america>.
MIXED = [
    (["<Bo>"], "Bo's ball is red."),
    (["<Anya>"], "Here <Bo> sits."),
    (["<captain america>", "<Bo>"], "Captain America and bo."),
    (["<Anya>", "<Bo>"], "A sunny day."),
]
# A 2-concept file (RePIC's 2-concept script is case-sensitive).
PAIRS = [
    (["<Bo>", "<Anya>"], "bo and Anya play."),
    (["<Q>", "<Anya>"], "Q and Bo."),
]


def _eval(rows, **kw):
    return evaluate_names([c for _, c in rows], [g for g, _ in rows], **kw)


def test_slot_outcomes_hit_miss_none():
    cands = ["<A>", "<B>", "<C>"]
    assert slot_outcomes(["<A>"], ["<A>", "<B>"], cands, False) == [HIT, None]
    assert slot_outcomes(["<A>", "<C>"], ["<A>", "<B>"], cands, False) == [HIT, MISS]
    assert slot_outcomes([], ["<A>"], cands, False) == [None]


def test_default_mode_mixed_file():
    ev = _eval(MIXED)
    # r1 Bo's -> hit; r2 Bo present, not Anya -> MISS; r3 both hit (phrase + lower case);
    # r4 nothing -> 2x None. slots 6, hits 3, MISS 1:
    # P = 3/4, R = 3/6, F1 = 2*.75*.5/1.25 = 0.6.
    o = ev.overall
    assert (o.slots, o.hits, o.misses) == (6, 3, 1)
    assert (o.precision, o.recall, o.f1) == pytest.approx((0.75, 0.5, 0.6))
    # k=1: slots 2, hit 1, MISS 1 -> P = R = F1 = 0.5.
    assert (ev.by_k[1].precision, ev.by_k[1].recall) == pytest.approx((0.5, 0.5))
    # k=2: slots 4, hits 2, MISS 0 -> P 1, R 0.5, F1 2/3.
    assert (ev.by_k[2].precision, ev.by_k[2].recall, ev.by_k[2].f1) == pytest.approx(
        (1.0, 0.5, 2 / 3)
    )


def test_compat_mode_mixed_file_is_lower_cased_whitespace_tokens():
    ev = _eval(MIXED, mode="compat")
    assert ev.case_sensitive is False  # not every record has 2 concepts
    # r1 "bo's" is one token -> None; r2 MISS; r3 "captain america" can never match -> None,
    # "bo" matches "<bo>" lower-cased -> hit; r4 None, None.
    # hits 1, MISS 1, slots 6: P = 1/2, R = 1/6, F1 = 2*(1/2)(1/6)/(2/3) = 1/4.
    o = ev.overall
    assert (o.slots, o.hits, o.misses) == (6, 1, 1)
    assert (o.precision, o.recall, o.f1) == pytest.approx((0.5, 1 / 6, 0.25))


def test_compat_case_rule_for_two_concept_files():
    ev = _eval(PAIRS, mode="compat")
    assert ev.case_sensitive is True
    # r1: "bo" != "Bo" -> Bo slot: present {Anya}, wrong present? no -> None; Anya hit.
    # r2: Q hit; Anya absent, Bo (not in this record's GT) present -> MISS.
    # hits 2, MISS 1, slots 4: P = 2/3, R = 1/2, F1 = (2/3)/(7/6) = 4/7.
    o = ev.overall
    assert (o.hits, o.misses) == (2, 1)
    assert (o.precision, o.recall, o.f1) == pytest.approx((2 / 3, 0.5, 4 / 7))
    # Overriding the rule: "bo" now matches -> hits 3, MISS 1 -> P = R = F1 = 3/4.
    ev = _eval(PAIRS, mode="compat", case_sensitive=False)
    assert (ev.overall.precision, ev.overall.recall) == pytest.approx((0.75, 0.75))


def test_explicit_candidates_add_misses():
    # "<Zed>" is not in any GT: only an explicit candidate list makes it count as a wrong name.
    rows = [(["<Bo>"], "Zed waves.")]
    assert _eval(rows).overall.misses == 0
    assert _eval(rows, candidates=["<Zed>"]).overall.misses == 1


def test_bad_input():
    with pytest.raises(ValueError, match="record 0: empty"):
        evaluate_names(["x"], [[]])
    with pytest.raises(ValueError, match="differ in length"):
        evaluate_names(["x", "y"], [["<A>"]])
    with pytest.raises(ValueError, match="mode"):
        evaluate_names(["x"], [["<A>"]], mode="loose")
