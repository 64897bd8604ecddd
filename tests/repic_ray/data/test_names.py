"""Tests for repic_ray/data/names.py: the syllable name pool and the fixed splits."""

import itertools

import pytest

from repic_ray.data.names import (
    all_triples,
    name_pieces,
    name_pool,
    name_split,
    triple_key,
    triple_split,
)
from repic_ray.data.vocab import NAMES, all_words


def test_pool_has_500_names_and_the_split_is_disjoint_strings_over_shared_syllables():
    pool = name_pool()
    assert len(pool) >= 500 and len(set(pool)) == len(pool)
    train, evals = name_split()
    assert set(train).isdisjoint(evals) and sorted(train + evals) == sorted(pool)
    assert len(evals) >= 100
    train_pieces = {p for n in train for p in name_pieces(n)}
    assert {p for n in evals for p in name_pieces(n)} <= train_pieces
    # No pool name is a world word or one of the fixed-mode names.
    assert set(pool).isdisjoint({*all_words(), *NAMES})
    assert name_split() == (train, evals)  # constant, whatever world uses it


def test_every_pool_name_is_its_three_syllable_tokens_in_every_context():
    from tokenizers import Tokenizer

    from repic_ray.models.tiny import build_tiny_qwen2_5_vl

    tok = Tokenizer.from_file(str(build_tiny_qwen2_5_vl() / "tokenizer.json"))
    tid = tok.token_to_id
    for name in name_pool():
        o, v, e = name_pieces(name)
        bare = [tid(o), tid(v), tid(e)]
        spaced = [tid("Ġ" + o), tid(v), tid(e)]
        assert None not in bare + spaced, name
        assert tok.encode(name).ids == bare, name
        assert tok.encode(f"{name}, my").ids[:4] == [*bare, tid(",")], name
        assert tok.encode(f"There is {name} the").ids[2:5] == spaced, name
        assert tok.encode(f"<{name}>").ids == [tid("<"), *bare, tid(">")], name


def test_name_pieces_rejects_other_names():
    assert name_pieces("Karmi") == ("K", "ar", "mi")
    with pytest.raises(ValueError, match="pool name"):
        name_pieces("Bruno")


def test_triple_split_holds_out_new_combinations_of_seen_values():
    train, held = triple_split()
    assert len(train) == 240 and len(held) == 80
    assert set(train).isdisjoint(held) and sorted(train + held) == sorted(all_triples())
    # Every attribute pair of a held-out triple still occurs in training.
    for a, b in itertools.combinations(range(3), 2):
        seen = {(t[a], t[b]) for t in train}
        assert all((t[a], t[b]) in seen for t in held)
    assert triple_key(("circle", "red", "plain")) == "<circle-red-plain>"
