"""On-disk formats: concept databases, RePIC training samples, caption result files.

All three are the formats of the RePIC / RAP-MLLM code bases, so their data sets
load by path:

- **Concept database** (RAP-MLLM / RePIC)::

      {"concept_dict": {"<Bo>": {"name": "Bo", "image": ["concepts/Bo.png"],
                                 "info": "A red striped circle.", "category": "dog"}},
       "path_to_concept": {"concepts/Bo.png": "<Bo>"}}

  `image` may be one path or a list. Relative image paths are relative to the
  database file and are resolved to absolute paths on load; `save_database`
  writes them relative to the new file again.
- **Training samples** (RePIC GRPO), a JSON list or JSONL::

      {"image": str | [str], "problem": str, "solution": str | [str] | [x1, y1, x2, y2],
       "accu_reward_method": "yes_no" | "yes_no_name" | "yes_no_name_multi" | "iou"}

  With several images, the reference images come first and the query image is
  last. Relative paths resolve against the sample file's folder (or `image_root`).
  Optional fields understood here: `ref_names` (the name shown with each reference
  image), `ref_categories` (the category word of each reference image's concept, for
  the detector reward when names are not in a concept database), `concepts` (names
  present in the query), `target` (the ideal response, for SFT), `reference_captions`
  (ground-truth captions, for CIDEr), `objects` (every object drawn in the query, with
  its pixel box). Any other field is kept in `extra` and written back unchanged.
- **Caption results** (RePIC evaluation): a JSON list of
  `[image_path, [concepts], caption, prompt]` records; concepts are kept as given
  (`"Bo"` or `"<Bo>"`), image paths too (they identify the query).

Every validation failure raises `DataError`, whose message names the file, the
record and the field. Missing images are not checked on load: `check_images`
lists every missing file at once, and the trainer calls it before training.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from repic_ray.data.images import ImageError, load_image

METHODS: tuple[str, ...] = ("yes_no", "yes_no_name", "yes_no_name_multi", "iou")
"""RePIC's `accu_reward_method` values: object consistency, identity (one / several names),
visual localization."""

_SAMPLE_KEYS = ("image", "problem", "solution", "accu_reward_method")
_OPTIONAL_KEYS = ("ref_names", "ref_categories", "concepts", "target", "reference_captions", "objects")


class DataError(ValueError):
    """A data file that does not follow its format.

    `str(err)` reads `"<path>: record <index>, field '<field>': <message>"`; the record
    index (a list position, or a concept key for databases) and the field are left out
    when the problem concerns the whole file.
    """

    def __init__(
        self,
        path: str | os.PathLike | None,
        index: int | str | None,
        message: str,
        field: str | None = None,
    ):
        self.path = None if path is None else str(path)
        self.index = index
        self.field = field
        self.message = message
        where = [self.path or "<memory>"]
        if index is not None:
            where.append(f"record {index!r}" if isinstance(index, str) else f"record {index}")
        if field is not None:
            where.append(f"field '{field}'")
        super().__init__(f"{where[0]}: {', '.join(where[1:]) + ': ' if len(where) > 1 else ''}"
                         f"{message}")


# ---------------------------------------------------------------------------------------
# Helpers


def _read_json(path: Path) -> Any:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DataError(path, None, "no such file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(path, None, f"cannot read file: {exc}") from exc
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(path, None, f"invalid JSON at line {exc.lineno}: {exc.msg}") from exc


def _write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _dumps(obj: Any, indent: int | None = 2) -> str:
    return json.dumps(obj, indent=indent, sort_keys=True, ensure_ascii=False)


def _resolve(p: str, base: Path) -> str:
    """A stored path as an absolute, normalized path (relative paths are relative to `base`)."""
    return os.path.normpath(p if os.path.isabs(p) else os.path.join(base, p))


def _relativize(p: str, base: Path) -> str:
    return os.path.relpath(p, base) if os.path.isabs(p) else p


def _is_str_list(value: Any, *, allow_empty: bool = False) -> bool:
    return (
        isinstance(value, list)
        and (allow_empty or len(value) > 0)
        and all(isinstance(v, str) and v.strip() for v in value)
    )


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def check_box(box: Any) -> str | None:
    """Why `box` is not a valid `[x1, y1, x2, y2]` pixel box (None when it is)."""
    if not (isinstance(box, list) and len(box) == 4 and all(_is_number(v) for v in box)):
        return f"must be a list of 4 numbers [x1, y1, x2, y2], got {box!r}"
    x1, y1, x2, y2 = box
    if not (x1 < x2 and y1 < y2):
        return f"must have x1 < x2 and y1 < y2, got {box!r}"
    return None


# ---------------------------------------------------------------------------------------
# Concept database


@dataclass
class Concept:
    """One personal concept: `<Bo>` named "Bo", its reference images and a description."""

    key: str
    """Identifier in the database, by convention the name in angle brackets (`<Bo>`)."""
    name: str
    """The personal name a caption should use (may contain spaces)."""
    images: list[str]
    """Reference image paths (absolute once loaded)."""
    info: str
    """Short description of the concept's appearance."""
    category: str
    """Category word ("dog", "mug", ...)."""
    extra: dict[str, Any] = field(default_factory=dict)
    """Other fields of the record, written back unchanged."""


@dataclass
class ConceptDatabase:
    """A user's concepts, looked up by key (`<Bo>`), by name (`Bo`) or by reference image."""

    concepts: dict[str, Concept]
    """Concepts by key, in file order."""
    path_to_concept: dict[str, str] = field(default_factory=dict)
    """Reference image path -> concept key; completed from `concepts` when missing."""
    path: str | None = field(default=None, compare=False)
    """The file this database was loaded from (derived; not saved)."""

    def __post_init__(self) -> None:
        names: dict[str, str] = {}
        for key, concept in self.concepts.items():
            if concept.key != key:
                raise DataError(self.path, key, f"concept key mismatch ({concept.key!r})", "key")
            if concept.name in names:
                raise DataError(
                    self.path, key,
                    f"name {concept.name!r} is also used by {names[concept.name]!r}", "name",
                )
            names[concept.name] = key
            for img in concept.images:
                self.path_to_concept.setdefault(img, key)
        for img, key in self.path_to_concept.items():
            if key not in self.concepts:
                raise DataError(
                    self.path, "path_to_concept", f"{img!r} maps to unknown concept {key!r}"
                )
        self._by_name = names

    @classmethod
    def from_concepts(cls, concepts: Iterable[Concept], path: str | None = None) -> ConceptDatabase:
        return cls({c.key: c for c in concepts}, {}, path)

    def __len__(self) -> int:
        return len(self.concepts)

    def __iter__(self) -> Iterator[Concept]:
        return iter(self.concepts.values())

    def __contains__(self, key_or_name: object) -> bool:
        return key_or_name in self.concepts or key_or_name in self._by_name

    def __getitem__(self, key: str) -> Concept:
        try:
            return self.concepts[key]
        except KeyError:
            raise KeyError(f"no concept with key {key!r} in {self.path or 'database'}") from None

    def keys(self) -> list[str]:
        return list(self.concepts)

    def names(self) -> list[str]:
        return [c.name for c in self.concepts.values()]

    def by_name(self, name: str) -> Concept:
        """The concept called `name` ("Bo"; "<Bo>" is accepted too)."""
        key = self._by_name.get(name)
        if key is None and name.startswith("<") and name.endswith(">"):
            key = self._by_name.get(name[1:-1])
        if key is None:
            raise KeyError(f"no concept named {name!r} in {self.path or 'database'}")
        return self.concepts[key]

    def lookup(self, key_or_name: str) -> Concept:
        """By key if `key_or_name` is a key, else by name."""
        return self.concepts[key_or_name] if key_or_name in self.concepts else self.by_name(key_or_name)

    def concept_of_image(self, path: str) -> Concept:
        """The concept whose reference image is `path` (absolute or as stored)."""
        key = self.path_to_concept.get(os.path.normpath(os.path.abspath(path)))
        if key is None:
            key = self.path_to_concept.get(path)
        if key is None:
            raise KeyError(f"{path!r} is not a reference image of {self.path or 'database'}")
        return self.concepts[key]


def _parse_concept(key: Any, rec: Any, path: Path, base: Path) -> Concept:
    if not isinstance(key, str) or not key.strip():
        raise DataError(path, str(key), "concept key must be a non-empty string", "key")
    if not isinstance(rec, dict):
        raise DataError(path, key, f"must be an object, got {type(rec).__name__}")
    rec = dict(rec)
    name = rec.pop("name", None)
    if not isinstance(name, str) or not name.strip():
        raise DataError(path, key, f"must be a non-empty string, got {name!r}", "name")
    images = rec.pop("image", None)
    if isinstance(images, str) and images.strip():
        images = [images]
    if not _is_str_list(images):
        raise DataError(
            path, key, f"must be a path or a non-empty list of paths, got {images!r}", "image"
        )
    info = rec.pop("info", None)
    if not isinstance(info, str):
        raise DataError(path, key, f"must be a string, got {info!r}", "info")
    category = rec.pop("category", None)
    if not isinstance(category, str) or not category.strip():
        raise DataError(path, key, f"must be a non-empty string, got {category!r}", "category")
    return Concept(key, name, [_resolve(p, base) for p in images], info, category, rec)


def load_database(path: str | os.PathLike, *, image_root: str | os.PathLike | None = None
                  ) -> ConceptDatabase:
    """Load and validate a concept database; image paths resolve against the file's folder
    (or `image_root`)."""
    path = Path(path)
    base = Path(image_root) if image_root is not None else path.parent.absolute()
    data = _read_json(path)
    if not isinstance(data, dict) or not isinstance(data.get("concept_dict"), dict):
        raise DataError(path, None, "must be an object with a 'concept_dict' object", "concept_dict")
    unknown = sorted(set(data) - {"concept_dict", "path_to_concept"})
    if unknown:
        raise DataError(path, None, f"unknown top-level keys {unknown}")
    concepts = {k: _parse_concept(k, v, path, base) for k, v in data["concept_dict"].items()}
    p2c_raw = data.get("path_to_concept", {})
    if not isinstance(p2c_raw, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in p2c_raw.items()
    ):
        raise DataError(path, "path_to_concept", "must be an object of path -> concept key")
    p2c = {_resolve(k, base): v for k, v in p2c_raw.items()}
    return ConceptDatabase(concepts, p2c, str(path))


def save_database(db: ConceptDatabase, path: str | os.PathLike) -> None:
    """Write `db` with image paths relative to the new file's folder (sorted keys)."""
    path = Path(path)
    base = path.parent.absolute()
    concept_dict = {
        c.key: {**c.extra, "name": c.name, "image": [_relativize(p, base) for p in c.images],
                "info": c.info, "category": c.category}
        for c in db
    }
    p2c = {_relativize(p, base): k for p, k in db.path_to_concept.items()}
    _write_text(path, _dumps({"concept_dict": concept_dict, "path_to_concept": p2c}) + "\n")


# ---------------------------------------------------------------------------------------
# Training samples


@dataclass
class TrainSample:
    """One RePIC training (or evaluation) sample.

    `images` holds every image of the prompt: reference images first, the query last.
    """

    images: list[str]
    """Image paths (absolute once loaded); references first, query last."""
    problem: str
    """The question, without RePIC's answer-format suffix (added by `repic_ray.prompts`)."""
    solution: str | list[str] | list[float]
    """"yes"/"no" (yes_no), a name (yes_no_name), names (yes_no_name_multi) or a box (iou)."""
    accu_reward_method: str
    """Which verifiable reward scores it: one of `METHODS`."""
    ref_names: list[str] | None = None
    """Name shown next to each reference image (len(images) - 1 entries), if any."""
    ref_categories: list[str] | None = None
    """Category word of each reference image's concept, beside `ref_names` (the detector
    reward's text prompt for a name, absent references included), if known."""
    concepts: list[str] | None = None
    """Names of the concepts present in the query image, if known."""
    target: str | None = None
    """The ideal response, used as the SFT target."""
    reference_captions: list[str] | None = None
    """Ground-truth captions of the query image (CIDEr references)."""
    objects: list[dict[str, Any]] | None = None
    """Every object drawn in the query image: name (or null), attributes, cell, pixel box."""
    extra: dict[str, Any] = field(default_factory=dict)
    """Other fields of the record, written back unchanged."""
    single_image: bool = False
    """The record stored `image` as one string rather than a list (kept on round trip)."""
    source: str | None = field(default=None, compare=False, repr=False)
    """File the sample was loaded from (derived)."""
    index: int | None = field(default=None, compare=False, repr=False)
    """Record index in that file (derived)."""

    @property
    def query_image(self) -> str:
        return self.images[-1]

    @property
    def reference_images(self) -> list[str]:
        return self.images[:-1]

    def __post_init__(self) -> None:
        validate_sample(self)


def validate_sample(s: TrainSample) -> None:
    """Raise `DataError` (naming source, index and field) if `s` is not a valid sample."""

    def fail(fld: str, msg: str) -> DataError:
        return DataError(s.source, s.index, msg, fld)

    if not _is_str_list(s.images):
        raise fail("image", f"must be a path or a non-empty list of paths, got {s.images!r}")
    if s.single_image and len(s.images) != 1:
        raise fail("image", "single_image is set but there are several images")
    if not isinstance(s.problem, str) or not s.problem.strip():
        raise fail("problem", f"must be a non-empty string, got {s.problem!r}")
    m, sol = s.accu_reward_method, s.solution
    if m not in METHODS:
        raise fail("accu_reward_method", f"must be one of {list(METHODS)}, got {m!r}")
    if m == "yes_no":
        if not (isinstance(sol, str) and sol.strip().lower() in ("yes", "no")):
            raise fail("solution", f"must be 'yes' or 'no' for yes_no, got {sol!r}")
    elif m == "yes_no_name":
        if not (isinstance(sol, str) and sol.strip()):
            raise fail("solution", f"must be a non-empty name string for yes_no_name, got {sol!r}")
    elif m == "yes_no_name_multi":
        if not _is_str_list(sol):
            raise fail(
                "solution",
                f"must be a non-empty list of non-empty names for yes_no_name_multi, got {sol!r}",
            )
    else:
        why = check_box(sol)
        if why:
            raise fail("solution", f"{why} (iou)")
    for fld, noun in (("ref_names", "names"), ("ref_categories", "categories")):
        values = getattr(s, fld)  # one entry per reference image
        if values is None:
            continue
        if not _is_str_list(values, allow_empty=True):
            raise fail(fld, f"must be a list of non-empty strings, got {values!r}")
        if len(values) != len(s.images) - 1:
            raise fail(
                fld,
                f"has {len(values)} {noun} for {len(s.images) - 1} reference images "
                "(all images but the last, the query)",
            )
    if s.concepts is not None and not _is_str_list(s.concepts, allow_empty=True):
        raise fail("concepts", f"must be a list of non-empty strings, got {s.concepts!r}")
    if s.target is not None and not isinstance(s.target, str):
        raise fail("target", f"must be a string, got {s.target!r}")
    if s.reference_captions is not None and not _is_str_list(s.reference_captions):
        raise fail("reference_captions", "must be a non-empty list of non-empty strings")
    if s.objects is not None:
        if not isinstance(s.objects, list):
            raise fail("objects", f"must be a list, got {type(s.objects).__name__}")
        for j, obj in enumerate(s.objects):
            why = check_box(obj.get("box")) if isinstance(obj, dict) else "must be an object"
            if why:
                raise fail(f"objects[{j}].box" if isinstance(obj, dict) else f"objects[{j}]", why)


def sample_from_record(
    rec: Any, *, source: str | os.PathLike | None = None, index: int | None = None,
    base: str | os.PathLike | None = None,
) -> TrainSample:
    """Parse one record (a dict as stored); relative image paths resolve against `base`."""
    src = None if source is None else str(source)
    if not isinstance(rec, dict):
        raise DataError(src, index, f"must be an object, got {type(rec).__name__}")
    for key in _SAMPLE_KEYS:
        if key not in rec:
            raise DataError(src, index, "missing required field", key)
    image = rec["image"]
    single = isinstance(image, str)
    images = [image] if single else image
    if not _is_str_list(images):
        raise DataError(src, index, f"must be a path or a non-empty list of paths, got {image!r}",
                        "image")
    if base is not None:
        images = [_resolve(p, Path(base)) for p in images]
    extra = {k: v for k, v in rec.items() if k not in _SAMPLE_KEYS and k not in _OPTIONAL_KEYS}
    return TrainSample(
        images=list(images),
        problem=rec["problem"],
        solution=rec["solution"],
        accu_reward_method=rec["accu_reward_method"],
        extra=extra,
        single_image=single,
        source=src,
        index=index,
        **{k: rec[k] for k in _OPTIONAL_KEYS if k in rec and rec[k] is not None},
    )


def sample_to_record(s: TrainSample, *, base: str | os.PathLike | None = None) -> dict[str, Any]:
    """The stored form of `s`; absolute image paths are written relative to `base`."""
    images = [_relativize(p, Path(base)) for p in s.images] if base is not None else list(s.images)
    rec: dict[str, Any] = dict(s.extra)
    rec.update(
        image=images[0] if s.single_image else images,
        problem=s.problem,
        solution=s.solution,
        accu_reward_method=s.accu_reward_method,
    )
    for key in _OPTIONAL_KEYS:
        value = getattr(s, key)
        if value is not None:
            rec[key] = value
    return rec


def load_samples(path: str | os.PathLike, *, image_root: str | os.PathLike | None = None
                 ) -> list[TrainSample]:
    """Load training samples from a JSON list or a JSONL file (detected from the content)."""
    path = Path(path)
    base = Path(image_root) if image_root is not None else path.parent.absolute()
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DataError(path, None, "no such file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(path, None, f"cannot read file: {exc}") from exc
    if text.lstrip().startswith("["):
        records = _read_json(path)
    else:
        records = []
        for lineno, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise DataError(
                    path, len(records), f"invalid JSON on line {lineno}: {exc.msg}"
                ) from exc
    if not records:
        raise DataError(path, None, "contains no samples")
    return [sample_from_record(r, source=path, index=i, base=base) for i, r in enumerate(records)]


def save_samples(samples: Sequence[TrainSample], path: str | os.PathLike) -> None:
    """Write samples as JSONL if `path` ends in .jsonl, else as a JSON list; image paths are
    written relative to the file's folder."""
    path = Path(path)
    base = path.parent.absolute()
    records = [sample_to_record(s, base=base) for s in samples]
    if path.suffix == ".jsonl":
        text = "".join(_dumps(r, indent=None) + "\n" for r in records)
    else:
        text = _dumps(records) + "\n"
    _write_text(path, text)


# ---------------------------------------------------------------------------------------
# Caption result files


@dataclass
class CaptionRecord:
    """One generated caption: RePIC's `[image_path, [concepts], caption, prompt]`."""

    image: str
    """Query image path, as given (it identifies the query)."""
    concepts: list[str]
    """Ground-truth concepts of the query, names or keys, as given."""
    caption: str
    """The generated caption."""
    prompt: str
    """The question asked."""


def load_captions(path: str | os.PathLike) -> list[CaptionRecord]:
    """Load and validate a caption result file."""
    path = Path(path)
    data = _read_json(path)
    if not isinstance(data, list):
        raise DataError(path, None, "must be a JSON list of [image, [concepts], caption, prompt]")
    out = []
    for i, rec in enumerate(data):
        if not isinstance(rec, list) or len(rec) != 4:
            raise DataError(path, i, f"must be [image, [concepts], caption, prompt], got {rec!r}")
        image, concepts, caption, prompt = rec
        if not isinstance(image, str) or not image.strip():
            raise DataError(path, i, f"must be a non-empty string, got {image!r}", "image")
        if not _is_str_list(concepts):
            raise DataError(
                path, i, f"must be a non-empty list of non-empty strings, got {concepts!r}",
                "concepts",
            )
        if not isinstance(caption, str):
            raise DataError(path, i, f"must be a string, got {caption!r}", "caption")
        if not isinstance(prompt, str):
            raise DataError(path, i, f"must be a string, got {prompt!r}", "prompt")
        out.append(CaptionRecord(image, list(concepts), caption, prompt))
    return out


def save_captions(records: Sequence[CaptionRecord], path: str | os.PathLike) -> None:
    """Write a caption result file in RePIC's list-of-lists form."""
    _write_text(
        Path(path),
        _dumps([[r.image, list(r.concepts), r.caption, r.prompt] for r in records], indent=4)
        + "\n",
    )


# ---------------------------------------------------------------------------------------
# Image checks


def check_images(
    *,
    database: ConceptDatabase | None = None,
    samples: Iterable[TrainSample] = (),
    paths: Iterable[str] = (),
    decode: bool = False,
) -> None:
    """Check that every image of a database and of samples exists, reporting all at once.

    With `decode=True` every image is also fully decoded, so corrupt files are listed too.

    Raises:
        DataError: one error listing every missing (or unreadable) image with the file,
            record and field that refers to it.
    """
    refs: list[tuple[str | None, int | str | None, str, str]] = []
    if database is not None:
        for c in database:
            refs.extend((database.path, c.key, "image", p) for p in c.images)
    for s in samples:
        refs.extend((s.source, s.index, "image", p) for p in s.images)
    refs.extend((None, None, "path", p) for p in paths)

    checked: dict[str, str | None] = {}
    problems: list[str] = []
    first_source: str | None = None
    for src, idx, fld, p in refs:
        if p not in checked:
            why = None
            if not os.path.isfile(p):
                why = "missing"
            elif decode:
                try:
                    load_image(p)
                except ImageError as exc:
                    why = exc.reason
            checked[p] = why
        if checked[p] is not None:
            first_source = first_source or src
            problems.append(str(DataError(src or "<paths>", idx, f"{p} ({checked[p]})", fld)))
    if problems:
        bad = sum(1 for v in checked.values() if v is not None)
        err = DataError(
            first_source or "<paths>", None,
            f"{bad} image file(s) cannot be used ({len(problems)} references):\n  "
            + "\n  ".join(problems),
        )
        err.problems = problems
        raise err
