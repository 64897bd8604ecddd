"""The synthetic concept world: the embedded default data set.

A world is one user's database of N personal concepts. Each concept is a distinct
(shape, colour, pattern) drawn on a 28-px cell (one Qwen2.5-VL vision token) and
has a category word and a personal name. Query images are 3x3 grids of cells with
1-5 concepts and 0-2 distractor objects (shape/colour/pattern combinations that are
no concept); every object's pixel box is recorded.

Two naming modes:

- ``names="fixed"`` (default): every concept keeps its name across the whole data
  set, as when a model is personalized by training on the user's concepts (MyVLM,
  Yo'LLaVA). A tiny model can then learn recognition as appearance -> name.
- ``names="per_episode"``: names are re-drawn for every sample, so they can only be
  read from the reference images shown in the prompt (in-context binding, what the
  7B model does). Much harder for a tiny from-scratch model.
- ``names="open"``: per-episode names as above, evaluated on unseen concepts under
  unseen names (`repic_ray.data.names`). Training and SFT samples draw their concepts
  from the 240 training triples and their names from the training name pool; the
  database (the user's concepts) and the evaluation samples use held-out triples and
  evaluation names only. References of the training concepts are written under
  ``concepts/train/`` (they are not in the database).

The category of an object is a function of its shape (one world-wide mapping), so
categories are visible. Everything is written in the real formats
(`repic_ray.data.formats`) under `out/`::

    world.json                 settings and the concepts' appearance
    concepts/database.json     concept database (+ one 28x28 reference PNG per concept)
    train/train.jsonl          RePIC samples: yes_no, yes_no_name, yes_no_name_multi, iou;
                               caption ones carry `target` and reference captions (CIDEr)
    sft.jsonl                  samples with `target`: captions (mostly one concept), then
                               auxiliary yes/no and box questions (field `task` says which)
    eval/concepts_{k}.json     exactly k concepts per query, >= 3 reference captions each
    eval/yes_no.json           "open" worlds only: yes/no questions about held-out concepts
    images/...                 query PNGs
    contact_sheet.png          references and sample queries with boxes, for a human

Prompts carry reference images of the present concepts plus 1-2 absent concepts
(as RePIC's retrieval top-K does), so naming an absent concept is a precision error.
Generation is deterministic: the same settings and seed give byte-identical files.

    python -m repic_ray.data.synthetic --out /tmp/world --seed 0
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import random
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from repic_ray.data.formats import (
    Concept,
    ConceptDatabase,
    TrainSample,
    save_database,
    save_samples,
)
from repic_ray.data.names import name_split, triple_key, triple_split
from repic_ray.data.vocab import (
    CATEGORIES,
    COLOURS,
    NAMES,
    PATTERNS,
    POSITIONS,
    SHAPE_CATEGORY,
    SHAPES,
)

GRID = 3
"""Query images are GRID x GRID cells."""

CAPTION_QUESTIONS: tuple[str, ...] = (
    "Give a personalized caption of this image.",
    "Give a personal caption of the image.",
    "Provide a personalized caption of the given image.",
    "Can you provide a personalized caption of this photo?",
    "Give a caption of the image.",
)
"""RePIC's captioning questions (its evaluation scripts draw from these)."""

WHO_QUESTION = "Who is in the image?"
"""The short-answer binding question (`WorldConfig.num_sft_who`); the answer is one name."""


def who_at_question(obj: dict[str, Any], described: bool = False) -> str:
    """"Who is at the <position>?" about a drawn object (its `to_dict`), or with `described`
    "Who is the <colour> <pattern> <category> at the <position>?"."""
    what = f"the {obj['colour']} {obj['pattern']} {obj['category']} " if described else ""
    return f"Who is {what}at the {obj['position']}?"


NAME_MODES = ("fixed", "per_episode", "open")


@dataclass
class WorldConfig:
    """Settings of a synthetic concept world."""

    seed: int = 0
    """Random seed; the same seed and settings give byte-identical files."""
    num_concepts: int = 8
    """Concepts in the user's database."""
    names: str = "fixed"
    """"fixed": a concept keeps its name everywhere; "per_episode": names re-drawn per sample;
    "open": per-sample names, evaluation on held-out triples and held-out names."""
    num_train: int = 400
    """RePIC training samples, split evenly over the four task types."""
    num_sft: int = 800
    """SFT caption samples."""
    sft_single_fraction: float = 0.8
    """Fraction of SFT caption samples whose query holds exactly one concept."""
    num_sft_aux: int = 100
    """Auxiliary SFT samples appended to sft.jsonl, half "Is <Bo> in this image?" (yes/no),
    half "Where is <Bo>?" (box); each SFT record names its kind in `task`
    ("caption", "yes_no", "iou")."""
    num_sft_who: int = 0
    """Short-answer binding samples appended to sft.jsonl after the auxiliary ones: one
    present concept, its reference and 1..max_absent_refs absent ones, the question
    "Who is in the image?" and the target just the present concept's name (`task` "who")."""
    num_sft_who_multi: int = 0
    """Short-answer binding samples among several concepts, appended after the "who" ones:
    2..max_k present concepts with their references and absent ones, the question "Who is at
    the <position>?" (or "Who is the <colour> <pattern> <category> at the <position>?") about
    one present concept, the target its name alone (`task` "who"): which reference is this
    object, where a caption of several concepts has to tell them apart."""
    num_eval_per_k: int = 24
    """Evaluation queries per concept count k (files eval/concepts_{k}.json)."""
    max_concepts_per_image: int = 5
    """Most concepts in one query image (capped by num_concepts)."""
    max_distractors: int = 2
    """Most non-concept objects in one query image (0..this, uniformly)."""
    max_absent_refs: int = 2
    """Reference images of absent concepts added to a caption prompt (1..this)."""
    num_reference_captions: int = 4
    """Ground-truth captions per evaluation query (CIDEr references); at least 3."""
    min_caption_chars: int = 100
    """Captions are padded with scene sentences to at least this length (RePIC's identity
    reward gives 0 below 100 characters)."""
    cell_px: int = 28
    """Cell size in pixels; 28 px is one Qwen2.5-VL vision token. Query = 3 cells square."""
    references_per_concept: int = 1
    """Reference photos of each concept (1-5): the first shows the object centred at 80 %
    of a cell, the others at 60-90 % of it, at a random place, on their own noise. A
    prompt shows up to m of each of its reference concepts' photos (m drawn per prompt
    from 1..this; so 1 / this of the prompts show one photo per concept), each followed
    by the concept's name (RePIC's several references per concept). Views and their draw per
    prompt come from random streams of their own: with 1 the world is byte-identical to
    one generated without the option."""
    caption_style: str = "name_first"
    """How captions (SFT targets and reference captions) word a concept: "name_first"
    ("Bo the red striped dog sits at the top.", concepts before distractors) or
    "object_first" (every object in reading order, each concept described and then named:
    "The red striped dog at the top is Bo."); `make_caption`. Images and every other draw
    are the same for both."""

    def __post_init__(self) -> None:
        if self.names not in NAME_MODES:
            raise ValueError(f"names: must be one of {list(NAME_MODES)}, got {self.names!r}")
        max_concepts = (len(triple_split()[1]) if self.names == "open"
                        else min(len(NAMES), len(SHAPES) * len(COLOURS) * len(PATTERNS)))
        if not 2 <= self.num_concepts <= max_concepts:
            raise ValueError(f"num_concepts: must be in [2, {max_concepts}], got {self.num_concepts}")
        for name in ("num_train", "num_sft", "num_sft_aux", "num_sft_who", "num_sft_who_multi",
                     "num_eval_per_k"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}: must be >= 0, got {getattr(self, name)}")
        if self.caption_style not in CAPTION_STYLES:
            raise ValueError(
                f"caption_style: must be one of {list(CAPTION_STYLES)}, got {self.caption_style!r}"
            )
        if not 0.0 <= self.sft_single_fraction <= 1.0:
            raise ValueError(f"sft_single_fraction: must be in [0, 1], got {self.sft_single_fraction}")
        if not 1 <= self.max_concepts_per_image <= GRID * GRID:
            raise ValueError(
                f"max_concepts_per_image: must be in [1, {GRID * GRID}], "
                f"got {self.max_concepts_per_image}"
            )
        if not 0 <= self.max_distractors <= GRID * GRID - self.max_concepts_per_image:
            raise ValueError(
                f"max_distractors: must be in [0, {GRID * GRID - self.max_concepts_per_image}], "
                f"got {self.max_distractors}"
            )
        if self.max_absent_refs < 1:
            raise ValueError(f"max_absent_refs: must be >= 1, got {self.max_absent_refs}")
        if self.num_reference_captions < 3:
            raise ValueError(
                f"num_reference_captions: must be >= 3, got {self.num_reference_captions}"
            )
        if not 1 <= self.references_per_concept <= 5:
            raise ValueError(
                f"references_per_concept: must be in [1, 5], got {self.references_per_concept}"
            )
        if self.cell_px < 12:
            raise ValueError(f"cell_px: must be >= 12 to show patterns, got {self.cell_px}")

    @property
    def max_k(self) -> int:
        """Largest concept count per query that this world can produce."""
        return min(self.max_concepts_per_image, self.num_concepts)


@dataclass(frozen=True)
class ConceptSpec:
    """Appearance and identity of one world concept."""

    key: str
    name: str
    shape: str
    colour: str
    pattern: str
    category: str


@dataclass
class WorldObject:
    """One object drawn in a query image."""

    name: str | None
    """Personal name shown for this sample (None for a distractor)."""
    key: str | None
    """Concept key in the database (None for a distractor)."""
    shape: str
    colour: str
    pattern: str
    category: str
    cell: int
    """Grid cell, row-major (0 = top left, 8 = bottom right)."""
    box: list[int]
    """Pixel box [x1, y1, x2, y2] (x2, y2 exclusive), inside the cell."""

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["position"] = POSITIONS[self.cell]
        return d


@dataclass
class WorldPaths:
    """Files written by `generate_world`."""

    root: Path
    world: Path
    """world.json: settings and the concepts' appearance."""
    database: Path
    """concepts/database.json."""
    train: Path
    """train/train.jsonl: RePIC samples of all four task types."""
    sft: Path
    """sft.jsonl: caption samples with targets."""
    eval: dict[int, Path] = field(default_factory=dict)
    """k -> eval/concepts_{k}.json."""
    contact_sheet: Path | None = None
    eval_yes_no: Path | None = None
    """"open" worlds: eval/yes_no.json, yes/no questions about held-out concepts."""


# ---------------------------------------------------------------------------------------
# Drawing


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _secondary(colour: str) -> tuple[int, int, int]:
    """Contrasting colour for stripes, dots and checks."""
    r, g, b = COLOURS[colour]
    return (30, 30, 30) if 0.299 * r + 0.587 * g + 0.114 * b > 120 else (235, 235, 235)


def _shape_mask(shape: str, s: int) -> Image.Image:
    """An s x s mask (255 inside the shape)."""
    mask = Image.new("L", (s, s), 0)
    d = ImageDraw.Draw(mask)
    c, r = (s - 1) / 2, (s - 1) / 2

    def ring(n: int, radius: float, phase: float) -> list[tuple[float, float]]:
        return [
            (c + radius * math.cos(phase + 2 * math.pi * i / n),
             c + radius * math.sin(phase + 2 * math.pi * i / n))
            for i in range(n)
        ]

    if shape == "circle":
        d.ellipse([0, 0, s - 1, s - 1], fill=255)
    elif shape == "square":
        m = max(1, s // 10)
        d.rectangle([m, m, s - 1 - m, s - 1 - m], fill=255)
    elif shape == "triangle":
        d.polygon([(c, 0), (s - 1, s - 1), (0, s - 1)], fill=255)
    elif shape == "diamond":
        d.polygon([(c, 0), (s - 1, c), (c, s - 1), (0, c)], fill=255)
    elif shape == "star":
        outer, inner = ring(5, r, -math.pi / 2), ring(5, r * 0.45, -math.pi / 2 + math.pi / 5)
        d.polygon([p for pair in zip(outer, inner) for p in pair], fill=255)
    elif shape == "cross":
        w = s / 3
        d.rectangle([w, 0, s - 1 - w, s - 1], fill=255)
        d.rectangle([0, w, s - 1, s - 1 - w], fill=255)
    elif shape == "hexagon":
        d.polygon(ring(6, r, 0.0), fill=255)
    elif shape == "ring":
        t = max(3, round(s * 0.28))
        d.ellipse([0, 0, s - 1, s - 1], fill=255)
        d.ellipse([t, t, s - 1 - t, s - 1 - t], fill=0)
    else:
        raise ValueError(f"unknown shape {shape!r}")
    return mask


def _texture(pattern: str, colour: str, s: int) -> Image.Image:
    """An s x s RGB fill: the colour with the pattern in a contrasting colour."""
    base = np.empty((s, s, 3), dtype=np.uint8)
    base[:] = COLOURS[colour]
    sec = np.array(_secondary(colour), dtype=np.uint8)
    yy, xx = np.mgrid[0:s, 0:s]
    if pattern == "plain":
        pass
    elif pattern == "striped":
        w = max(2, round(s / 8))
        base[(yy // w) % 2 == 1] = sec
    elif pattern == "checkered":
        w = max(2, round(s / 5))
        base[((yy // w) + (xx // w)) % 2 == 1] = sec
    elif pattern == "dotted":
        step = max(4, round(s / 4))
        rad = max(1.0, step / 4)
        cy = (yy % step) - (step - 1) / 2
        cx = (xx % step) - (step - 1) / 2
        base[cy * cy + cx * cx <= rad * rad] = sec
    else:
        raise ValueError(f"unknown pattern {pattern!r}")
    return Image.fromarray(base, "RGB")


def draw_object(img: Image.Image, box: list[int], shape: str, colour: str, pattern: str) -> None:
    """Draw one object filling the square pixel box [x1, y1, x2, y2) of `img`."""
    x1, y1, x2, _ = box
    s = x2 - x1
    img.paste(_texture(pattern, colour, s), (x1, y1), _shape_mask(shape, s))


def _background(np_rng: np.random.Generator, w: int, h: int) -> Image.Image:
    """Plain grey with a slight per-image tint and per-pixel noise."""
    level = int(np_rng.integers(118, 139))
    noise = np_rng.normal(0.0, 4.0, size=(h, w, 1))
    arr = np.clip(level + noise, 0, 255).astype(np.uint8).repeat(3, axis=2)
    return Image.fromarray(arr, "RGB")


def draw_reference(np_rng: np.random.Generator, shape: str, colour: str, pattern: str,
                   cell_px: int) -> Image.Image:
    """A concept's reference image: the object centred at 80 % of one cell on the noisy
    grey background."""
    img = _background(np_rng, cell_px, cell_px)
    s = round(cell_px * 0.8)
    off = (cell_px - s) // 2
    draw_object(img, [off, off, off + s, off + s], shape, colour, pattern)
    return img


def draw_reference_view(rng: random.Random, shape: str, colour: str, pattern: str,
                        cell_px: int) -> Image.Image:
    """Another photo of a concept: the object at 60-90 % of one cell, at a random place,
    on its own noisy grey background."""
    img = _background(np.random.default_rng(rng.getrandbits(63)), cell_px, cell_px)
    s = rng.randint(round(cell_px * 0.6), round(cell_px * 0.9))
    x, y = rng.randint(0, cell_px - s), rng.randint(0, cell_px - s)
    draw_object(img, [x, y, x + s, y + s], shape, colour, pattern)
    return img


def place_in_cell(rng: random.Random, cell: int, cell_px: int) -> list[int]:
    """A query object's box in grid cell `cell`: 65-85 % of the cell, at a random place."""
    c = cell_px
    s = rng.randint(round(0.65 * c), round(0.85 * c))
    x0, y0 = (cell % GRID) * c, (cell // GRID) * c
    x1 = x0 + rng.randint(1, c - s - 1)
    y1 = y0 + rng.randint(1, c - s - 1)
    return [x1, y1, x1 + s, y1 + s]


def draw_query(np_rng: np.random.Generator, objects: list[tuple[tuple[str, str, str], list[int]]],
               cell_px: int) -> Image.Image:
    """A GRID x GRID query image with each (shape, colour, pattern) drawn in its box."""
    img = _background(np_rng, GRID * cell_px, GRID * cell_px)
    for (shape, colour, pattern), box in objects:
        draw_object(img, box, shape, colour, pattern)
    return img


# ---------------------------------------------------------------------------------------
# Captions


def _position_phrase(cell: int, rng: random.Random) -> str:
    pos = POSITIONS[cell]
    if pos == "center":
        return rng.choice(("in the center", "in the middle"))
    return f"at the {pos}"


_VERBS = ("sits", "stands", "rests", "lies", "is")


_CONCEPT_FORMS: dict[str, tuple[str, ...]] = {
    "name_first": (
        "{name} the {desc} {verb} {where}.",
        "{Where} {verb} {name}, {a} {desc}.",
        "{name}, my {desc}, {verb} {where}.",
        "There is {name} the {desc} {where}.",
        "You can see {name}, the {desc}, {where}.",
    ),
    "object_first": (
        "{A} {desc} {verb} {where}: that is {name}.",
        "{Where} {verb} {a} {desc}, {name}.",
        "The {desc} {where} is {name}.",
        "There is {a} {desc} {where}, my {name}.",
        "You can see {a} {desc} {where}; it is {name}.",
    ),
}
"""The five wordings of a concept's sentence per caption style (`make_caption`)."""
CAPTION_STYLES = tuple(_CONCEPT_FORMS)


def _concept_sentence(o: WorldObject, rng: random.Random, style: str = "name_first") -> str:
    desc = f"{o.colour} {o.pattern} {o.category}"
    where = _position_phrase(o.cell, rng)
    verb = rng.choice(_VERBS)
    forms = _CONCEPT_FORMS[style]
    a = _article(desc)
    return forms[rng.randrange(len(forms))].format(
        name=o.name, desc=desc, verb=verb, where=where, Where=where[0].upper() + where[1:],
        a=a, A=a.capitalize(),
    )


def _distractor_sentence(o: WorldObject, form: int, rng: random.Random) -> str:
    desc = f"{o.colour} {o.pattern} {o.category}"
    where = _position_phrase(o.cell, rng)
    if form == 0:
        return f"There is also {_article(desc)} {desc} {where}."
    if form == 1:
        return f"{_article(desc).capitalize()} {desc} {rng.choice(_VERBS)} {where}."
    return f"Also in the image is {_article(desc)} {desc} {where}."


_COUNT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
_FILLERS = (
    "The background is plain grey.",
    "It is a plain grey scene.",
    "Nothing else is in the image.",
    "The rest of the picture is an empty grey background.",
)


def make_caption(objects: list[WorldObject], rng: random.Random, *, min_chars: int = 100,
                 style: str = "name_first") -> str:
    """A natural caption naming every concept with its category, colour, pattern and position,
    and describing the distractors; padded with scene sentences to `min_chars`.

    `style` "name_first": the concepts' sentences, each opening with the name ("Bo the red
    striped dog sits at the top."), then the distractors'. "object_first": every object in
    reading order (top left to bottom right), a concept described first and named after
    ("The red striped dog at the top is Bo."), so a model writing it decides which reference
    an object is once it has described that object. Both draw the same random numbers."""
    if style not in CAPTION_STYLES:
        raise ValueError(f"style: must be one of {CAPTION_STYLES}, got {style!r}")
    n = len(objects)
    count = f"{_COUNT_WORDS[n]} {'object' if n == 1 else 'objects'}"
    openings = (
        f"This image shows {count} on a grey background.",
        f"Here you can see {count}.",
        f"In this picture there {'is' if n == 1 else 'are'} {count}.",
        "",
    )
    parts = [rng.choice(openings)]
    concepts = [o for o in objects if o.name is not None]
    distractors = [o for o in objects if o.name is None]
    said = [(o.cell, _concept_sentence(o, rng, style)) for o in concepts]
    forms = rng.sample(range(3), 3)  # different wording for each distractor
    said += [(o.cell, _distractor_sentence(o, forms[i % 3], rng)) for i, o in enumerate(distractors)]
    if style == "object_first":
        said.sort(key=lambda x: x[0])
    parts += [sentence for _, sentence in said]
    fillers = list(_FILLERS)
    rng.shuffle(fillers)
    caption = " ".join(p for p in parts if p)
    while len(caption) < min_chars and fillers:
        caption += " " + fillers.pop()
    return caption


# ---------------------------------------------------------------------------------------
# The world


class _World:
    """Generator state: settings, concepts and the one random stream."""

    def __init__(self, cfg: WorldConfig, out: Path):
        self.cfg = cfg
        self.out = out
        self.rng = random.Random(cfg.seed)
        self.cell = cfg.cell_px
        shapes = list(SHAPES)
        # One shape -> category mapping for every world (vocab.SHAPE_CATEGORY), so
        # categories are visible. The draw that once chose a per-world mapping is kept so
        # every world's random stream (and the seed-0 world's files) stay as they were.
        self.rng.sample(CATEGORIES, len(shapes))
        self.shape_category = {s: SHAPE_CATEGORY[s] for s in shapes}
        triples = [(s, c, p) for s in SHAPES for c in COLOURS for p in PATTERNS]
        self.train_concepts: list[ConceptSpec] = []
        if cfg.names == "open":
            train_triples, held_out = triple_split()
            chosen = self._diverse_triples(list(held_out), cfg.num_concepts)
            train_names, eval_names = name_split()
            names = self.rng.sample(eval_names, cfg.num_concepts)
            self.concepts = [
                ConceptSpec(triple_key(t), name, *t, self.shape_category[t[0]])
                for name, t in zip(names, chosen)
            ]
            self.train_concepts = [
                ConceptSpec(triple_key(t), "", *t, self.shape_category[t[0]]) for t in train_triples
            ]
            self.name_pools = {"train": train_names, "eval": eval_names}
        else:
            chosen = self._diverse_triples(triples, cfg.num_concepts)
            names = self.rng.sample(NAMES, cfg.num_concepts)
            self.concepts = [
                ConceptSpec(f"<{name}>", name, s, c, p, self.shape_category[s])
                for name, (s, c, p) in zip(names, chosen)
            ]
            self.name_pools = {"train": NAMES, "eval": NAMES}
        self.concept_triples = {(c.shape, c.colour, c.pattern) for c in self.concepts}
        self.distractor_triples = [t for t in triples if t not in self.concept_triples]
        self.ref_paths: dict[str, list[Path]] = {}
        self.use("eval")

    def use(self, phase: str) -> None:
        """Draw the following samples' concepts and names for `phase` ("train" covers the
        training and SFT samples, "eval" the evaluation ones). Only "open" worlds differ:
        there the phases use disjoint triples and disjoint names."""
        open_train = phase == "train" and self.cfg.names == "open"
        self.active = self.train_concepts if open_train else self.concepts
        self.active_names = self.name_pools[phase]

    def _diverse_triples(self, triples: list[tuple[str, str, str]], n: int):
        """n distinct triples, preferring unused shapes, then unused colours (easier to tell apart)."""
        pool = list(triples)
        self.rng.shuffle(pool)
        chosen: list[tuple[str, str, str]] = []
        for _ in range(n):
            used_s = {t[0] for t in chosen}
            used_c = {t[1] for t in chosen}
            best = min(pool, key=lambda t: (t[0] in used_s) + (t[1] in used_c))
            pool.remove(best)
            chosen.append(best)
        return chosen

    # -- images -------------------------------------------------------------------------

    def _np_rng(self) -> np.random.Generator:
        return np.random.default_rng(self.rng.getrandbits(63))

    def _write_reference(self, spec: ConceptSpec, path: Path) -> list[Path]:
        """The concept's reference photos: `path`, then `<stem>_<i>.png` for the other views
        (`references_per_concept`), drawn from a stream seeded by the world seed and key."""
        img = draw_reference(self._np_rng(), spec.shape, spec.colour, spec.pattern, self.cell)
        img.save(path, format="PNG")
        paths = [path.absolute()]
        views = random.Random(f"{self.cfg.seed}:views:{spec.key}")
        for i in range(1, self.cfg.references_per_concept):
            view = path.with_name(f"{path.stem}_{i}.png")
            draw_reference_view(views, spec.shape, spec.colour, spec.pattern,
                                self.cell).save(view, format="PNG")
            paths.append(view.absolute())
        self.ref_paths[spec.key] = paths
        return paths

    def write_references(self) -> ConceptDatabase:
        cdir = self.out / "concepts"
        cdir.mkdir(parents=True, exist_ok=True)
        concepts = []
        for spec in self.concepts:
            path = cdir / f"{spec.name.replace(' ', '_')}.png"
            views = self._write_reference(spec, path)
            info = f"{_article(spec.colour).capitalize()} {spec.colour} {spec.pattern} {spec.shape}."
            concepts.append(Concept(spec.key, spec.name, [str(v) for v in views], info, spec.category))
        db = ConceptDatabase.from_concepts(concepts)
        save_database(db, cdir / "database.json")
        if self.train_concepts:
            (cdir / "train").mkdir(exist_ok=True)
            for spec in self.train_concepts:
                self._write_reference(spec, cdir / "train" / f"{spec.key[1:-1]}.png")
        return db

    def _place(self, cell: int) -> list[int]:
        return place_in_cell(self.rng, cell, self.cell)

    def make_scene(self, present: list[ConceptSpec], names: dict[str, str], path: Path,
                   exclude: list[ConceptSpec] = ()) -> list[WorldObject]:
        """Draw `present` concepts plus 0..max_distractors distractors; save the PNG.

        In an open world, distractors are the phase's other triples, never one of the
        sample's concepts (`present` and `exclude`, the absent references)."""
        nd = self.rng.randint(0, self.cfg.max_distractors)
        distractors = self.distractor_triples
        if self.cfg.names == "open":
            taken = {(c.shape, c.colour, c.pattern) for c in [*present, *exclude]}
            distractors = [(c.shape, c.colour, c.pattern) for c in self.active
                           if (c.shape, c.colour, c.pattern) not in taken]
        cells = self.rng.sample(range(GRID * GRID), len(present) + nd)
        objects = [
            WorldObject(names[spec.key], spec.key, spec.shape, spec.colour, spec.pattern,
                        spec.category, cell, self._place(cell))
            for spec, cell in zip(present, cells)
        ]
        for cell in cells[len(present):]:
            s, c, p = self.rng.choice(distractors)
            objects.append(
                WorldObject(None, None, s, c, p, self.shape_category[s], cell, self._place(cell))
            )
        objects.sort(key=lambda o: o.cell)
        img = draw_query(self._np_rng(), [((o.shape, o.colour, o.pattern), o.box) for o in objects],
                         self.cell)
        path.parent.mkdir(parents=True, exist_ok=True)
        img.save(path, format="PNG")
        return objects

    # -- samples ------------------------------------------------------------------------

    def _names(self, specs: list[ConceptSpec]) -> dict[str, str]:
        if self.cfg.names == "fixed":
            return {s.key: s.name for s in self.concepts}
        drawn = self.rng.sample(self.active_names, len(specs))
        return {s.key: n for s, n in zip(specs, drawn)}

    def _pick(self, k: int, exclude: tuple[ConceptSpec, ...] = ()) -> list[ConceptSpec]:
        pool = [c for c in self.active if c not in exclude]
        return self.rng.sample(pool, k)

    def _reference_views(self, refs: list[ConceptSpec], query: Path) -> list[tuple[Path, str]]:
        """(photo, concept key) of each reference shown: up to m of each concept's photos
        (1..m drawn per concept), m drawn per prompt from 1..references_per_concept, so a
        share of the prompts shows one photo of every concept as a user who registered one
        would; from a stream seeded by the world seed and the query file (so the world's
        main stream, and every other file, do not depend on it)."""
        n = self.cfg.references_per_concept
        if n == 1:
            return [(self.ref_paths[r.key][0], r.key) for r in refs]
        rng = random.Random(f"{self.cfg.seed}:references:{query.parent.name}/{query.name}")
        most = rng.randint(1, n)  # so that 1 / n of the prompts show one photo per concept
        shown = []
        for r in refs:
            views = sorted(rng.sample(range(n), rng.randint(1, most)))
            shown += [(self.ref_paths[r.key][v], r.key) for v in views]
        return shown

    def _sample(self, problem: str, solution: Any, method: str, refs: list[ConceptSpec],
                names: dict[str, str], query: Path, objects: list[WorldObject],
                **optional: Any) -> TrainSample:
        shown = self._reference_views(refs, query)
        category = {r.key: r.category for r in refs}
        return TrainSample(
            images=[str(path) for path, _ in shown] + [str(query.absolute())],
            problem=problem,
            solution=solution,
            accu_reward_method=method,
            ref_names=[names[key] for _, key in shown],
            ref_categories=[category[key] for _, key in shown],
            concepts=[o.name for o in objects if o.name is not None],
            objects=[o.to_dict() for o in objects],
            **optional,
        )

    def caption_sample(self, k: int, query: Path, *, num_captions: int = 0,
                       train_references: bool = False) -> TrainSample:
        """A personalized-caption sample: k present concepts, references of those plus
        1..max_absent_refs absent ones, shuffled.

        `num_captions`: evaluation sample, that many reference captions instead of a target.
        `train_references`: also `reference_captions` (the target plus other wordings, from a
        random stream of their own, so every other file of the world is unchanged)."""
        present = self._pick(k)
        n_absent = min(self.rng.randint(1, self.cfg.max_absent_refs), len(self.active) - k)
        absent = self._pick(n_absent, exclude=tuple(present))
        refs = present + absent
        self.rng.shuffle(refs)
        names = self._names(refs)
        objects = self.make_scene(present, names, query, exclude=absent)
        present_names = [o.name for o in objects if o.name is not None]
        mc = self.cfg.min_caption_chars
        style = self.cfg.caption_style
        optional: dict[str, Any] = {"target": make_caption(objects, self.rng, min_chars=mc, style=style)}
        if num_captions:
            caps: list[str] = []
            for _ in range(50 * num_captions):
                cap = make_caption(objects, self.rng, min_chars=mc, style=style)
                if cap not in caps:
                    caps.append(cap)
                if len(caps) == num_captions:
                    break
            optional = {"reference_captions": caps}
        elif train_references:
            optional["reference_captions"] = self._other_wordings(objects, optional["target"], query)
        method, solution = (
            ("yes_no_name", present_names[0]) if k == 1 else ("yes_no_name_multi", present_names)
        )
        return self._sample(self.rng.choice(CAPTION_QUESTIONS), solution, method, refs, names,
                            query, objects, **optional)

    def _other_wordings(self, objects: list[WorldObject], first: str, query: Path) -> list[str]:
        """`first` and up to num_reference_captions - 1 other distinct captions of the same
        scene, drawn from a stream seeded by the world seed and the query file name."""
        rng = random.Random(f"{self.cfg.seed}:references:{query.name}")
        caps = [first]
        for _ in range(50 * self.cfg.num_reference_captions):
            if len(caps) == self.cfg.num_reference_captions:
                break
            cap = make_caption(objects, rng, min_chars=self.cfg.min_caption_chars,
                               style=self.cfg.caption_style)
            if cap not in caps:
                caps.append(cap)
        return caps

    def who_sample(self, query: Path) -> TrainSample:
        """"Who is in the image?" about a query with one present concept; the target is its
        name alone, so the whole loss is on choosing the right reference."""
        sample = self.caption_sample(1, query)
        sample.problem = WHO_QUESTION
        sample.target = sample.solution
        return sample

    def who_multi_sample(self, query: Path) -> TrainSample:
        """"Who is at the <position>?" or "Who is the <colour> <pattern> <category> at the
        <position>?" about one of the 2..max_k concepts of a query; the target is that
        concept's name alone."""
        sample = self.caption_sample(self.rng.randint(2, self.cfg.max_k), query)
        asked = self.rng.choice([o for o in sample.objects if o.get("name")])
        # half of the questions give the place alone, so that the answer needs the query image
        sample.problem = who_at_question(asked, described=self.rng.random() < 0.5)
        sample.accu_reward_method = "yes_no_name"
        sample.target = sample.solution = asked["name"]
        return sample

    def yes_no_sample(self, query: Path) -> TrainSample:
        """"Is <Bo> in this image?" with Bo's reference; yes half of the time."""
        asked = self.rng.choice(self.active)
        k = self.rng.randint(1, min(3, self.cfg.max_k))
        if self.rng.random() < 0.5:
            present = [asked] + self._pick(k - 1, exclude=(asked,))
            self.rng.shuffle(present)
            answer = "yes"
        else:
            present = self._pick(min(k, len(self.active) - 1), exclude=(asked,))
            answer = "no"
        names = self._names([asked] + [p for p in present if p != asked])
        objects = self.make_scene(present, names, query, exclude=[asked])
        return self._sample(f"Is <{names[asked.key]}> in this image?", answer, "yes_no", [asked],
                            names, query, objects, target=answer)

    def iou_sample(self, query: Path) -> TrainSample:
        """"Where is <Bo>?" with Bo's reference; the answer is Bo's pixel box."""
        k = self.rng.randint(1, min(3, self.cfg.max_k))
        present = self._pick(k)
        asked = self.rng.choice(present)
        names = self._names([asked] + [p for p in present if p != asked])
        objects = self.make_scene(present, names, query)
        box = next(o.box for o in objects if o.key == asked.key)
        question = self.rng.choice(
            (f"Where is <{names[asked.key]}>?", f"Give the bounding box of <{names[asked.key]}>.")
        )
        return self._sample(question, box, "iou", [asked], names, query, objects,
                            target=json.dumps(box))

    # -- contact sheet ------------------------------------------------------------------

    def contact_sheet(self, samples: list[TrainSample], path: Path) -> None:
        scale, pad, label = 3, 8, 14
        font = ImageFont.load_default()
        ref_tile = self.cell * scale
        q_tile = GRID * self.cell * scale
        n_q = min(4, len(samples))
        width = max(len(self.concepts) * (ref_tile + pad), n_q * (q_tile + pad)) + pad
        height = pad + ref_tile + 2 * label + pad + (q_tile + 3 * label + pad if n_q else 0)
        sheet = Image.new("RGB", (width, height), (255, 255, 255))
        d = ImageDraw.Draw(sheet)
        for i, spec in enumerate(self.concepts):
            x = pad + i * (ref_tile + pad)
            ref = Image.open(self.ref_paths[spec.key][0]).convert("RGB")
            sheet.paste(ref.resize((ref_tile, ref_tile), Image.NEAREST), (x, pad))
            d.text((x, pad + ref_tile + 1), spec.name, fill=(0, 0, 0), font=font)
            d.text((x, pad + ref_tile + label), spec.category, fill=(90, 90, 90), font=font)
        y = pad + ref_tile + 2 * label + pad
        for i, s in enumerate(samples[:n_q]):
            x = pad + i * (q_tile + pad)
            q = Image.open(s.query_image).convert("RGB")
            sheet.paste(q.resize((q_tile, q_tile), Image.NEAREST), (x, y))
            for o in s.objects or []:
                bx = [x + o["box"][0] * scale, y + o["box"][1] * scale,
                      x + o["box"][2] * scale - 1, y + o["box"][3] * scale - 1]
                colour = (255, 0, 0) if o["name"] else (0, 0, 255)
                d.rectangle(bx, outline=colour, width=2)
                d.text((bx[0] + 2, bx[1] + 1), o["name"] or o["category"], fill=colour, font=font)
            d.text((x, y + q_tile + 1), "refs: " + ", ".join(dict.fromkeys(s.ref_names or [])), fill=(0, 0, 0),
                   font=font)
            d.text((x, y + q_tile + label), "present: " + ", ".join(s.concepts or []),
                   fill=(0, 0, 0), font=font)
        sheet.save(path, format="PNG")


def generate_world(out_dir: str | Path, *, config: WorldConfig | None = None,
                   **overrides: Any) -> WorldPaths:
    """Generate a synthetic concept world under `out_dir` (see the module docstring).

    `overrides` are `WorldConfig` fields (seed=..., num_concepts=..., names=...,
    num_train=..., num_sft=..., num_eval_per_k=..., cell_px=...) applied on `config`.
    """
    cfg = dataclasses.replace(config or WorldConfig(), **overrides)
    out = Path(out_dir).absolute()
    if (out / "world.json").exists():
        # A previous world: clear what it wrote so no stale file survives.
        for sub in ("concepts", "images", "train", "eval"):
            shutil.rmtree(out / sub, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    w = _World(cfg, out)
    w.write_references()
    img_dir = out / "images"
    w.use("train")

    # Training samples: the four RePIC task types, evenly, interleaved.
    makers = ("yes_no", "yes_no_name", "yes_no_name_multi", "iou")
    train = []
    for i in range(cfg.num_train):
        kind, query = makers[i % 4], img_dir / "train" / f"{i:05d}.png"
        if kind == "yes_no":
            train.append(w.yes_no_sample(query))
        elif kind == "iou":
            train.append(w.iou_sample(query))
        elif kind == "yes_no_name" or cfg.max_k < 2:
            train.append(w.caption_sample(1, query, train_references=True))
        else:
            train.append(w.caption_sample(w.rng.randint(2, cfg.max_k), query, train_references=True))
    w.rng.shuffle(train)
    paths = WorldPaths(out, out / "world.json", out / "concepts" / "database.json",
                       out / "train" / "train.jsonl", out / "sft.jsonl")
    save_samples(train, paths.train)

    # SFT: mostly single-concept captions.
    sft = []
    for i in range(cfg.num_sft):
        single = w.rng.random() < cfg.sft_single_fraction or cfg.max_k < 2
        k = 1 if single else w.rng.randint(2, cfg.max_k)
        sft.append(w.caption_sample(k, img_dir / "sft" / f"{i:05d}.png"))
        sft[-1].extra["task"] = "caption"
    for i in range(cfg.num_sft, cfg.num_sft + cfg.num_sft_aux):
        query = img_dir / "sft" / f"{i:05d}.png"
        sft.append(w.yes_no_sample(query) if i % 2 == 0 else w.iou_sample(query))
        sft[-1].extra["task"] = sft[-1].accu_reward_method
    start = cfg.num_sft + cfg.num_sft_aux
    for i in range(start, start + cfg.num_sft_who):
        sft.append(w.who_sample(img_dir / "sft" / f"{i:05d}.png"))
        sft[-1].extra["task"] = "who"
    start += cfg.num_sft_who
    for i in range(start, start + cfg.num_sft_who_multi):
        sft.append(w.who_multi_sample(img_dir / "sft" / f"{i:05d}.png"))
        sft[-1].extra["task"] = "who"
    save_samples(sft, paths.sft)

    # Evaluation: exactly k concepts per query, several reference captions each.
    w.use("eval")
    eval_samples: list[TrainSample] = []
    for k in range(1, cfg.max_k + 1):
        split = [
            w.caption_sample(k, img_dir / f"eval_k{k}" / f"{i:05d}.png",
                             num_captions=cfg.num_reference_captions)
            for i in range(cfg.num_eval_per_k)
        ]
        if split:
            paths.eval[k] = out / "eval" / f"concepts_{k}.json"
            save_samples(split, paths.eval[k])
            eval_samples.append(split[0])

    if cfg.names == "open" and cfg.num_eval_per_k:
        # Recognition on unseen concepts under unseen names: "Is <Bo> in this image?".
        yes_no = [w.yes_no_sample(img_dir / "eval_yes_no" / f"{i:05d}.png")
                  for i in range(cfg.num_eval_per_k)]
        paths.eval_yes_no = out / "eval" / "yes_no.json"
        save_samples(yes_no, paths.eval_yes_no)

    paths.contact_sheet = out / "contact_sheet.png"
    w.contact_sheet(eval_samples, paths.contact_sheet)
    world = {
        "config": dataclasses.asdict(cfg),
        "concepts": [dataclasses.asdict(c) for c in w.concepts],
        "shape_category": w.shape_category,
    }
    paths.world.write_text(json.dumps(world, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return paths


def main(argv: list[str] | None = None) -> None:
    defaults = WorldConfig()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="output folder")
    for f in dataclasses.fields(WorldConfig):
        p.add_argument(f"--{f.name.replace('_', '-')}", type=type(getattr(defaults, f.name)),
                       default=getattr(defaults, f.name))
    args = vars(p.parse_args(argv))
    out = args.pop("out")
    try:
        paths = generate_world(out, config=WorldConfig(**args))
    except ValueError as exc:
        p.error(str(exc))
    print(f"wrote {paths.root} (database {paths.database}, train {paths.train}, sft {paths.sft}, "
          f"eval {sorted(paths.eval)})")


if __name__ == "__main__":
    main()
