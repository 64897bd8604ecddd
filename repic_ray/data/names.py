"""Open-world splits of the synthetic world: a pool of syllable names and a fixed
split of the shape x colour x pattern triples into training and held-out concepts.

In-context personalization is evaluated on concepts the model never saw, under names it
never saw. Two things make that measurable at tiny scale:

- **Names are built from syllable tokens.** A name is onset + vowel syllable + ending
  ("K" + "ar" + "mi" = "Karmi"), and each of the three pieces is one token of the tiny
  Qwen2.5-VL tokenizer in every context a name appears in (" Karmi", "Karmi,",
  "<Karmi>"; tested in tests/repic_ray/data/test_names.py). Evaluation names are
  strings never used in training, yet every token they are spelled with is produced as
  an output in training: a name token that is never an output has an untrained output
  row and is never emitted (measured: 0.00 on unseen name tokens).
- **The triple split is one constant split**, independent of a world's seed, so a
  vision tower or captioner trained on any world's training triples has never seen a
  held-out triple of any other world.

Both splits use their own random streams (`SPLIT_SEED`), never a world's.
"""

from __future__ import annotations

import random
from functools import cache

from repic_ray.data.vocab import COLOURS, PATTERNS, SHAPES

NAME_ONSETS: tuple[str, ...] = tuple("BCDFGHJKNPST")
"""First piece of a name: one capital letter (tokens "X" and " X")."""
NAME_VOWEL_SYLLABLES: tuple[str, ...] = (
    "ar", "ol", "ix", "ax", "az", "ex", "us", "el", "un", "ik", "il", "ab", "ad", "id", "ut", "ur",
    "am", "in", "on", "ig", "ok", "ic", "ag", "en", "as", "et", "iz", "og", "ep", "an", "ot",
)
"""Second piece: a vowel-consonant syllable token."""
NAME_ENDINGS: tuple[str, ...] = ("ro", "ri", "ki", "mi", "bo", "fu", "lu")
"""Third piece: a consonant-vowel syllable token."""
_MERGING_PREFIXES = frozenset({
    "Bag", "Ben", "Bep", "Big", "Bog", "Bok", "Can", "Car", "Dog", "Fig", "Gus", "Has", "Jax",
    "Pet", "Six", "Taz", "Tog", "Tok",
})
"""Onset + syllable pairs the tokenizer spells differently (they are words of the world,
or merge into one): names starting with them would not be three fixed tokens."""

SPLIT_SEED = 20261127
"""Seed of the fixed name and triple splits (not any world's seed)."""
EVAL_NAME_FRACTION = 0.2
"""Share of the name pool reserved for evaluation."""
HELD_OUT_TRIPLES = 80
"""Shape x colour x pattern triples (of 320) never used in training."""


def name_pieces(name: str) -> tuple[str, str, str]:
    """The three syllable pieces of a pool name ("Karmi" -> ("K", "ar", "mi"))."""
    onset, rest = name[0], name[1:]
    for ending in NAME_ENDINGS:
        if rest.endswith(ending) and rest[: -len(ending)] in NAME_VOWEL_SYLLABLES:
            return onset, rest[: -len(ending)], ending
    raise ValueError(f"{name!r} is not a pool name")


@cache
def name_pool() -> tuple[str, ...]:
    """Every pool name, sorted (2,478 names)."""
    names = {
        o + v + e
        for o in NAME_ONSETS
        for v in NAME_VOWEL_SYLLABLES
        for e in NAME_ENDINGS
        if o + v not in _MERGING_PREFIXES
    }
    return tuple(sorted(names))


@cache
def name_split() -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(training names, evaluation names): disjoint strings, each sorted.

    The evaluation share is drawn so that every syllable piece still occurs in training
    names (checked here, since only then are its output tokens trained)."""
    pool = list(name_pool())
    rng = random.Random(SPLIT_SEED)
    rng.shuffle(pool)
    n_eval = round(EVAL_NAME_FRACTION * len(pool))
    evals, train = sorted(pool[:n_eval]), sorted(pool[n_eval:])
    pieces = {p for n in train for p in name_pieces(n)}
    missing = {p for n in evals for p in name_pieces(n)} - pieces
    if missing:
        raise AssertionError(f"syllables {sorted(missing)} occur only in evaluation names")
    return tuple(train), tuple(evals)


Triple = tuple[str, str, str]


def all_triples() -> list[Triple]:
    """Every (shape, colour, pattern), in vocabulary order (320)."""
    return [(s, c, p) for s in SHAPES for c in COLOURS for p in PATTERNS]


@cache
def triple_split() -> tuple[tuple[Triple, ...], tuple[Triple, ...]]:
    """(training triples, held-out triples), each in vocabulary order.

    Held-out triples are drawn so that every single shape, colour and pattern value
    (and every pair of them) still occurs in training: a held-out concept is a new
    combination of attribute values the model has seen."""
    triples = all_triples()
    rng = random.Random(SPLIT_SEED)
    order = list(triples)
    rng.shuffle(order)
    held: set[Triple] = set()
    pairs_left: dict[tuple[int, str, str], int] = {}
    for t in triples:
        for key in ((0, t[0], t[1]), (1, t[0], t[2]), (2, t[1], t[2])):
            pairs_left[key] = pairs_left.get(key, 0) + 1
    for t in order:
        if len(held) == HELD_OUT_TRIPLES:
            break
        keys = ((0, t[0], t[1]), (1, t[0], t[2]), (2, t[1], t[2]))
        if all(pairs_left[k] > 1 for k in keys):
            held.add(t)
            for k in keys:
                pairs_left[k] -= 1
    return (tuple(t for t in triples if t not in held), tuple(t for t in triples if t in held))


def triple_key(triple: Triple) -> str:
    """A concept key that names the appearance ("<circle-red-plain>")."""
    return "<" + "-".join(triple) + ">"
