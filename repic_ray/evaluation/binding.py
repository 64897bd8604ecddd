"""Whether each name in a caption sits on its own object: the binding the name metric
cannot see.

RePIC's metric counts a present concept as recalled when its name occurs anywhere in the
caption. A caption that writes the right names on the wrong objects ("Bo the blue mug"
when Bo is the red dog and the mug is Anya) scores full recall. Where the evaluation
samples know each concept's category (the synthetic world's `objects`, or a registered
concept's category), a present concept is *bound* when the sentence of one of its
mentions, cut at the other names in it, holds its own category word ("Bo the red dog
sits at the top." or "The red dog at the top is Bo.")
(`repic_ray.rewards.names.grounded_names`, the same rule as the reward's grounding).

Per set of captions:

    bound       present concepts named with their own category / present concepts
    named_bound of the present concepts named at all, the share named with their category
    misbound    mentions of a present concept described as another concept's category,
                per caption

    true_descriptions  of the caption's "<colour> <pattern> <category>" phrases (the
                synthetic world's attribute words), the share that match an object drawn
                in the image: a hallucination rate's complement (as CHAIR counts objects
                that are not in the image), with or without a name next to the phrase

Counts are kept beside the rates so that splits pool by summing.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from repic_ray.rewards.description import drawn, phrases
from repic_ray.rewards.names import grounded_names, name_scores


def sample_categories(sample: Any) -> dict[str, str]:
    """Concept name -> category of the sample's drawn objects ({} when it has none)."""
    return {o["name"]: o["category"] for o in getattr(sample, "objects", None) or []
            if isinstance(o, dict) and o.get("name") and o.get("category")}


def descriptions(caption: str, sample: Any) -> tuple[int, int]:
    """(attribute phrases in `caption`, those matching an object of `sample`)."""
    found = phrases(caption)
    in_image = drawn([o for o in getattr(sample, "objects", None) or [] if isinstance(o, dict)])
    return len(found), sum(f in in_image for f in found)


def binding_counts(captions: Sequence[str], samples: Sequence[Any]) -> dict[str, float] | None:
    """Counts and rates of `captions` against `samples` (same order); None when no sample
    with concepts carries their categories."""
    if len(captions) != len(samples):
        raise ValueError(f"captions ({len(captions)}) and samples ({len(samples)}) differ in length")
    counts = {"concepts": 0, "named": 0, "bound": 0, "misbound": 0, "captions": 0,
              "described": 0, "described_true": 0}
    for caption, s in zip(captions, samples):
        concepts = list(s.concepts or [])
        cats = sample_categories(s)
        if not concepts or not all(c in cats for c in concepts):
            continue
        refs = list(dict.fromkeys(s.ref_names or concepts))
        keys, misbound = grounded_names(caption, concepts, refs, cats)
        correct, _, n = name_scores(caption, concepts, refs)
        counts["concepts"] += n
        counts["named"] += correct
        counts["bound"] += len(keys)
        counts["misbound"] += misbound
        counts["captions"] += 1
        described, true = descriptions(caption, s)
        counts["described"] += described
        counts["described_true"] += true
    return with_rates(counts) if counts["captions"] else None


def with_rates(counts: dict[str, float]) -> dict[str, float]:
    """`counts` plus the rates `bound_rate`, `named_bound_rate`, `misbound_per_caption`,
    `true_descriptions`."""
    out = dict(counts)
    out["bound_rate"] = counts["bound"] / counts["concepts"] if counts["concepts"] else 0.0
    out["named_bound_rate"] = counts["bound"] / counts["named"] if counts["named"] else 0.0
    out["misbound_per_caption"] = counts["misbound"] / counts["captions"] if counts["captions"] else 0.0
    out["true_descriptions"] = (counts["described_true"] / counts["described"]
                                if counts["described"] else 0.0)
    return out


def pool(parts: Sequence[dict[str, float]]) -> dict[str, float] | None:
    """Several splits' `binding_counts` summed, rates recomputed (None for no parts)."""
    if not parts:
        return None
    keys = ("concepts", "named", "bound", "misbound", "captions", "described", "described_true")
    return with_rates({k: sum(p[k] for p in parts) for k in keys})
