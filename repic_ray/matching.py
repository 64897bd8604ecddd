"""Which concept names occur in a caption — the one matcher shared by rewards and metrics.

Rewards (`repic_ray.rewards`) and the evaluation metric (`repic_ray.evaluation`)
both call `find_names`, so what the policy is rewarded for and what it is judged
by never drift apart.

Two modes:

- ``"default"``: a name matches as a whole-word phrase, case-insensitively
  unless ``case_sensitive=True``. The name may be written with or without its
  angle brackets (``<Bo>`` / ``Bo``), followed by a possessive (``Bo's``) or
  punctuation; multi-word names (``captain america``) match across any run of
  whitespace or underscores, so ``Baby_Q`` also matches "Baby Q".
- ``"compat"``: RePIC's evaluation scripts, reproduced in logic
  (oyt9306/RePIC ``evaluation/eval_single_concept.py``,
  ``evaluation/eval_multi_2_concept.py``, ``evaluation/eval_multi_4_concept.py``):
  remove ``</s>``, split on whitespace, strip ``.,!?;:()[]{}"'-`` from both ends
  of each token, drop empty tokens; a name matches when the name itself or the
  name without its brackets equals a token. Multi-word names therefore never
  match, and ``Bo's`` does not match ``Bo``. The single-concept and 4-concept
  scripts lower-case caption and names; the 2-concept script does not. That
  choice is the explicit ``case_sensitive`` argument here.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from functools import lru_cache

MODES = ("default", "compat")

# Characters RePIC's scripts strip from both ends of each whitespace token.
COMPAT_PUNCT_STRIP = ".,!?;:()[]{}\"'-"


def strip_brackets(name: str) -> str:
    """`<Bo>` -> `Bo`; anything not wrapped in both brackets is returned unchanged."""
    return name[1:-1] if name.startswith("<") and name.endswith(">") else name


def name_key(name: str, case_sensitive: bool = False) -> str:
    """The form two names are compared in: brackets removed, lower-cased unless case-sensitive.

    In compat mode this is exactly the scripts' `strip_brackets(c.lower())` (or
    `strip_brackets(c)` for the case-sensitive 2-concept script).
    """
    return strip_brackets(name if case_sensitive else name.lower())


def lookup_name(mapping: dict[str, str], name: str) -> str | None:
    """`mapping[name]`, else the value of the first key that is the same name by `name_key`
    ("<Bo>" for "Bo", "bo" for "Bo"); None when there is none."""
    if name in mapping:
        return mapping[name]
    key = name_key(name)
    return next((value for other, value in mapping.items() if name_key(other) == key), None)


def _compat_token_list(caption: str, case_sensitive: bool) -> list[str]:
    """RePIC's `tokenize_caption`, in order and with repeats."""
    caption = caption.replace("</s>", "")
    if not case_sensitive:
        caption = caption.lower()
    return [t for t in (w.strip(COMPAT_PUNCT_STRIP) for w in caption.split()) if t]


def compat_tokens(caption: str, case_sensitive: bool) -> set[str]:
    """RePIC's `tokenize_caption`, as a set (the scripts only test membership)."""
    return set(_compat_token_list(caption, case_sensitive))


@lru_cache(maxsize=4096)
def _name_pattern(name: str, case_sensitive: bool) -> re.Pattern[str] | None:
    words = [w for w in re.split(r"[\s_]+", strip_brackets(name.strip())) if w]
    if not words:
        return None
    phrase = r"[\s_]+".join(re.escape(w) for w in words)
    # Look-arounds instead of \b so names that start or end with punctuation
    # ("C-3PO!", "<Bo>") still work; "Bo's" passes because "'" is not a word char.
    body = rf"(?<![\w])<?{phrase}>?(?![\w])"
    return re.compile(body, 0 if case_sensitive else re.IGNORECASE)


def find_names(
    caption: str,
    names: Iterable[str],
    *,
    mode: str = "default",
    case_sensitive: bool = False,
) -> list[str]:
    """Return the names (as given, in the given order, without duplicates) that occur in `caption`.

    Args:
        caption: generated text.
        names: candidate concept names, with or without angle brackets.
        mode: ``"default"`` (whole-word phrase match) or ``"compat"`` (RePIC's
            whitespace-token match); see the module docstring.
        case_sensitive: compare letter case exactly. RePIC's compat scripts use
            True only for the 2-concept set.
    """
    if mode not in MODES:
        raise ValueError(f"mode: must be one of {MODES}, got {mode!r}")
    if not isinstance(caption, str):
        raise TypeError(f"caption: expected str, got {type(caption).__name__}")
    found: list[str] = []
    seen: set[str] = set()
    tokens = compat_tokens(caption, case_sensitive) if mode == "compat" else None
    for name in names:
        if name in seen:
            continue
        seen.add(name)
        if tokens is not None:
            cand = name if case_sensitive else name.lower()
            hit = cand in tokens or strip_brackets(cand) in tokens
        else:
            pattern = _name_pattern(name, case_sensitive)
            hit = pattern is not None and pattern.search(caption) is not None
        if hit:
            found.append(name)
    return found


def count_mentions(
    caption: str, names: Iterable[str], *, mode: str = "default", case_sensitive: bool = False
) -> dict[str, int]:
    """How often each of `names` occurs in `caption` (0 when absent), matched as `find_names`
    matches: whole-word phrases ("default") or RePIC's whitespace tokens ("compat")."""
    if mode not in MODES:
        raise ValueError(f"mode: must be one of {MODES}, got {mode!r}")
    counts: dict[str, int] = {}
    if mode == "compat":
        tokens = _compat_token_list(caption, case_sensitive)
    for name in names:
        if name in counts:
            continue
        if mode == "compat":
            cand = name if case_sensitive else name.lower()
            counts[name] = sum(t == cand or t == strip_brackets(cand) for t in tokens)
        else:
            pattern = _name_pattern(name, case_sensitive)
            counts[name] = len(pattern.findall(caption)) if pattern is not None else 0
    return counts


def name_spans(
    caption: str, names: Iterable[str], *, case_sensitive: bool = False
) -> list[tuple[int, int, str]]:
    """Every mention of `names` in `caption` as (start, end, name), in text order, matched as
    `find_names` matches in the default mode; where two names overlap ("Miss Daisy" and
    "Daisy") the longer mention wins."""
    hits: list[tuple[int, int, str]] = []
    for name in dict.fromkeys(names):
        pattern = _name_pattern(name, case_sensitive)
        if pattern is not None:
            hits += [(m.start(), m.end(), name) for m in pattern.finditer(caption)]
    hits.sort(key=lambda h: (h[0], -(h[1] - h[0])))
    out: list[tuple[int, int, str]] = []
    for hit in hits:
        if out and hit[0] < out[-1][1]:
            continue
        out.append(hit)
    return out


def split_found(
    found: Iterable[str], gt_names: Sequence[str], case_sensitive: bool = False
) -> tuple[set[str], set[str]]:
    """Split found names into (correct keys, wrong keys) against the ground-truth names.

    Keys are `name_key` forms, so `<Bo>` and `Bo` count as one name.
    """
    gt = {name_key(g, case_sensitive) for g in gt_names}
    keys = {name_key(f, case_sensitive) for f in found}
    return keys & gt, keys - gt
