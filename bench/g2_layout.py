"""G2 experiments: the reference name placed BEFORE its image ("This is <Bo>:" [image]),
smaller vision tokens, a deeper language model.

The default layout (`repic_ray.prompts`) puts each name after its image. With the name
first, the image token itself can take in its name, so that matching the query against
the reference tokens reads the name directly (a two-step rather than a three-step
circuit). This script runs `repic` (training) or `bench/gates.py` (measuring) with that
layout, and can write a copy of a checkpoint whose vision features are scaled down to
the text embeddings' size (the frozen tower's merged tokens have norm ~50, the text
embeddings ~0.2), so that an image token's residual stream can be changed by attention.

    python bench/g2_layout.py scale CKPT OUT --factor 0.02
    python bench/g2_layout.py deepen CKPT OUT        # language model layers repeated twice
    python bench/g2_layout.py deepen CKPT OUT --identity  # each layer followed by a zeroed copy
    python bench/g2_layout.py repic sft --config configs/sft_tiny_who.yaml \\
        --data.world_dir runs/worlds/open_who_cell --learner.model OUT --sft.output RUN
    python bench/g2_layout.py gates g2 --checkpoint RUN --data runs/worlds/open_who_cell
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def name_first_messages(image_paths: Sequence[str], ref_names: Sequence[str] | None,
                        question: str) -> list[dict[str, Any]]:
    """Like `repic_ray.prompts.build_messages`, with each name before its image."""
    if not image_paths:
        raise ValueError("a prompt needs at least the query image")
    refs, query = list(image_paths[:-1]), image_paths[-1]
    if ref_names is not None and len(ref_names) != len(refs):
        raise ValueError(f"{len(ref_names)} reference names for {len(refs)} reference images")
    content: list[dict[str, Any]] = []
    for i, path in enumerate(refs):
        if ref_names is not None:
            content.append({"type": "text", "text": f"This is <{ref_names[i]}>:"})
        content.append({"type": "image", "image": str(path)})
    content.append({"type": "text", "text": "\n"})
    content.append({"type": "image", "image": str(query)})
    content.append({"type": "text", "text": question})
    return [{"role": "user", "content": content}]


def scale_vision(checkpoint: str, out: str, factor: float) -> None:
    """Copy `checkpoint` with the vision merger's output multiplied by `factor`."""
    import torch

    from repic_ray.models.loading import load_policy, load_processor, resolve_checkpoint

    path = resolve_checkpoint(checkpoint)
    model, processor = load_policy(path), load_processor(path)
    last = model.model.visual.merger.mlp[-1]
    with torch.no_grad():
        last.weight.mul_(factor)
        last.bias.mul_(factor)
    model.save_pretrained(out)
    processor.save_pretrained(out)


def deepen(checkpoint: str, out: str, identity: bool = False) -> None:
    """Copy `checkpoint` with its language model's layers stacked twice (4 -> 8 layers),
    a warm start for a deeper model. `identity`: instead, a copy of each layer right after
    it with its attention output and MLP down projections zeroed, so each new layer adds
    nothing to the residual stream at first and the deeper model computes what the
    checkpoint does (function-preserving; the new layers learn from there)."""
    import copy

    import torch

    from repic_ray.models.loading import load_policy, load_processor, resolve_checkpoint

    path = resolve_checkpoint(checkpoint)
    model, processor = load_policy(path), load_processor(path)
    lm = model.model.language_model
    if identity:
        layers = []
        for layer in lm.layers:
            new = copy.deepcopy(layer)
            with torch.no_grad():
                new.self_attn.o_proj.weight.zero_()
                new.mlp.down_proj.weight.zero_()
                for lin in (new.self_attn.o_proj, new.mlp.down_proj):
                    if lin.bias is not None:
                        lin.bias.zero_()
            layers += [copy.deepcopy(layer), new]
    else:
        layers = [copy.deepcopy(layer) for _ in range(2) for layer in lm.layers]
    for i, layer in enumerate(layers):
        layer.self_attn.layer_idx = i
    lm.layers = torch.nn.ModuleList(layers)
    text = model.config.text_config
    text.num_hidden_layers = len(layers)
    text.max_window_layers = len(layers)
    if getattr(text, "layer_types", None):
        text.layer_types = list(text.layer_types) * 2
    model.save_pretrained(out)
    processor.save_pretrained(out)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in ("scale", "deepen", "repic", "gates"):
        raise SystemExit(__doc__)
    from repic_ray import prompts

    prompts.build_messages = name_first_messages
    cmd, rest = argv[0], argv[1:]
    if cmd == "deepen":
        identity = "--identity" in rest
        rest = [a for a in rest if a != "--identity"]
        if len(rest) != 2:
            raise SystemExit("usage: g2_layout.py deepen CKPT OUT [--identity]")
        deepen(*rest, identity=identity)
        return 0
    if cmd == "scale":
        import argparse

        p = argparse.ArgumentParser(prog="g2_layout.py scale")
        p.add_argument("checkpoint")
        p.add_argument("out")
        p.add_argument("--factor", type=float, default=0.02)
        a = p.parse_args(rest)
        scale_vision(a.checkpoint, a.out, a.factor)
        return 0
    if cmd == "repic":
        from recipes.cli import main as repic_main

        return repic_main(rest)
    from bench.gates import main as gates_main

    return gates_main(rest)


if __name__ == "__main__":
    sys.exit(main())
