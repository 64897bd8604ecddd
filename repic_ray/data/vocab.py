"""The closed vocabulary of the synthetic concept world.

Everything the world can draw or say is listed here, so that the offline tokenizer
(`repic_ray.models.tiny`) can be trained on exactly these words and the generator
(`repic_ray.data.synthetic`) draws only from them.
"""

from __future__ import annotations

SHAPES: tuple[str, ...] = (
    "circle", "square", "triangle", "diamond", "star", "cross", "hexagon", "ring",
)
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "orange": (245, 140, 30),
    "yellow": (240, 220, 40),
    "green": (50, 170, 60),
    "cyan": (40, 200, 210),
    "blue": (40, 80, 220),
    "purple": (140, 60, 190),
    "pink": (245, 130, 190),
    "white": (245, 245, 245),
    "brown": (130, 80, 40),
}
PATTERNS: tuple[str, ...] = ("plain", "striped", "dotted", "checkered")
CATEGORIES: tuple[str, ...] = (
    "dog", "cat", "mug", "toy", "bag", "plant", "lamp", "car", "bottle", "book", "hat", "shoe",
)
# What each shape is: one mapping for every world, so that categories are visible and a
# detector trained once (checkpoints/tiny-gdino) knows every world's categories. (It is
# the mapping the seed-0 world used to draw.)
SHAPE_CATEGORY: dict[str, str] = {
    "circle": "lamp", "square": "shoe", "triangle": "dog", "diamond": "bag",
    "star": "car", "cross": "toy", "hexagon": "mug", "ring": "hat",
}
# Personal names. A few have two words so that multi-word matching is exercised.
NAMES: tuple[str, ...] = (
    "Bo", "Mia", "Rex", "Lulu", "Kiki", "Max", "Ziggy", "Nala", "Otto", "Pip", "Juno", "Milo",
    "Coco", "Finn", "Luna", "Ollie", "Rosie", "Taz", "Yuki", "Zara", "Bruno", "Daisy", "Echo",
    "Fig", "Gus", "Hazel", "Iggy", "Jax", "Kobe", "Lola", "Mochi", "Nemo", "Olive", "Pico",
    "Quinn", "Rumi", "Sasha", "Tofu", "Uma", "Vito", "Wren", "Xena", "Yoda", "Zeus",
    "Captain Fluff", "Miss Daisy", "Sir Wag", "Big Ben",
)
# Grid positions of a 3x3 query image, row-major.
POSITIONS: tuple[str, ...] = (
    "top left", "top", "top right",
    "left", "center", "right",
    "bottom left", "bottom", "bottom right",
)
# Words used by caption templates and prompts (RePIC's prompt texts included).
TEMPLATE_WORDS: tuple[str, ...] = tuple(
    """a an the is are at in on of and with next to beside near this image picture photo
    there one two three four five objects object also sits stands rests lies shows show
    give caption personalized describe where which who what colour color pattern yes no
    it its name names including final answer output without duplicating given information
    for bounding box coordinates return json format must be either or additional
    here you can see can see together scene background grey gray left right top bottom center
    middle corner of from to by as has have my your our friend pet favourite favorite
    provide personal six seven eight nine zero else empty rest nothing JSON
    A An The This There Here In At It Is Where Give Provide Can You Also Nothing Output For""".split()  # noqa: SIM905
)


def all_words() -> list[str]:
    """Every word the world can produce, deduplicated, in a stable order."""
    words: list[str] = []
    for group in (SHAPES, tuple(COLOURS), PATTERNS, CATEGORIES, TEMPLATE_WORDS):
        words.extend(group)
    for name in NAMES:
        words.extend(name.split())
    for pos in POSITIONS:
        words.extend(pos.split())
    seen: set[str] = set()
    return [w for w in words if not (w in seen or seen.add(w))]
