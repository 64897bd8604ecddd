"""`repic pretrain-vision`: pretrain the policy's vision tower on the synthetic world.

Real VLMs bind a reference name to an object in the query because their vision encoder
is pretrained; a tiny tower with random weights separates concepts only weakly, and
trained jointly with the language model from scratch it collapses (DESIGN.md). The
synthetic world gives exact supervision instead: every object's cell, shape, colour and
pattern. This stage trains the tower (its merger output, the tokens the language model
reads) plus three linear heads that predict each vision token's shape, colour and
pattern ("none" for an empty cell) with summed cross-entropy:

- query images are drawn as the world draws them (3x3 grid of 28-px cells, objects at
  65-85 % of a cell at a random place, noisy grey background), so cell i is merged
  vision token i; reference images are centred objects, one token each;
- only the 240 training triples (`repic_ray.data.names.triple_split`) are drawn; the 80
  held-out triples are what the gate measures.

Gate G1 (`nearest_reference_accuracy`): an episode shows 2-5 references of held-out
concepts and a query image holding some of them (at least one reference is absent) plus
0-2 other held-out objects; for each present concept, the query token of its cell must
be nearest by cosine to its own reference's token. The written checkpoint is the whole
policy with the trained tower (language model untouched), loadable as `learner.model`.
"""

from __future__ import annotations

import json
import logging
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from repic_ray.data.names import Triple, triple_split
from repic_ray.data.synthetic import GRID, draw_query, draw_reference, place_in_cell
from repic_ray.data.vocab import COLOURS, PATTERNS, SHAPES
from repic_ray.threads import torch_threads

log = logging.getLogger("repic.pretrain_vision")

ATTRIBUTES: tuple[tuple[str, ...], ...] = (SHAPES, tuple(COLOURS), PATTERNS)
"""Values of the three predicted attributes; class len(values) means "no object"."""


class AttributeHeads(nn.Module):
    """Three linear heads on a vision token: shape, colour and pattern logits (+ "none")."""

    def __init__(self, dim: int):
        super().__init__()
        self.heads = nn.ModuleList(nn.Linear(dim, len(values) + 1) for values in ATTRIBUTES)

    def forward(self, tokens_ND: torch.Tensor) -> list[torch.Tensor]:
        return [h(tokens_ND) for h in self.heads]


def attribute_labels(triple: Triple | None) -> list[int]:
    """Class indices of (shape, colour, pattern), or the "none" class of each head."""
    if triple is None:
        return [len(values) for values in ATTRIBUTES]
    return [values.index(v) for values, v in zip(ATTRIBUTES, triple)]


@dataclass
class Episode:
    """One G1 episode: reference images, a query image, and which query cell holds
    which reference."""

    references: list[Any]
    query: Any
    cell_of_ref: dict[int, int]
    """Reference index -> the query cell its concept is drawn in (present ones only)."""


def draw_scene(rng: random.Random, triples: list[Triple], cell_px: int) -> tuple[Any, list[Triple | None]]:
    """A query image with `triples` in random cells; returns it and each cell's triple."""
    cells = rng.sample(range(GRID * GRID), len(triples))
    boxes = [place_in_cell(rng, cell, cell_px) for cell in cells]
    img = draw_query(np.random.default_rng(rng.getrandbits(63)), list(zip(triples, boxes)), cell_px)
    per_cell: list[Triple | None] = [None] * (GRID * GRID)
    for t, cell in zip(triples, cells):
        per_cell[cell] = t
    return img, per_cell


def make_episode(rng: random.Random, pool: list[Triple], cell_px: int) -> Episode:
    """2-5 references, 1..(refs - 1) of them present in the query, 0-2 other objects."""
    n_refs = rng.randint(2, 5)
    n_present = rng.randint(1, n_refs - 1)
    n_other = rng.randint(0, 2)
    chosen = rng.sample(pool, n_refs + n_other)
    refs, others = chosen[:n_refs], chosen[n_refs:]
    present = rng.sample(range(n_refs), n_present)
    img, per_cell = draw_scene(rng, [refs[i] for i in present] + others, cell_px)
    cell_of_ref = {i: per_cell.index(refs[i]) for i in present}
    references = [draw_reference(np.random.default_rng(rng.getrandbits(63)), *t, cell_px) for t in refs]
    return Episode(references, img, cell_of_ref)


def gate_episodes(n: int, *, seed: int = 0, cell_px: int = 28) -> list[Episode]:
    """The G1 measurement set: `n` episodes over the held-out triples only."""
    rng = random.Random(seed)
    held_out = list(triple_split()[1])
    return [make_episode(rng, held_out, cell_px) for _ in range(n)]


def nearest_reference_correct(query_QD: torch.Tensor, refs_QRD: torch.Tensor, ref_mask_QR: torch.Tensor,
                              target_Q: torch.Tensor) -> torch.Tensor:
    """For each query feature, whether its most cosine-similar reference (among the
    unmasked ones of its episode) is `target`. Shapes: Q queries, R references, D dims."""
    q = torch.nn.functional.normalize(query_QD, dim=-1)
    r = torch.nn.functional.normalize(refs_QRD, dim=-1)
    sim_QR = torch.einsum("qd,qrd->qr", q, r).masked_fill(~ref_mask_QR, float("-inf"))
    return sim_QR.argmax(dim=-1) == target_Q


def encode_images(model: Any, processor: Any, images: list[Any]) -> list[torch.Tensor]:
    """Merged vision tokens (what the language model reads) of each image: (tokens, D)."""
    inputs = processor.image_processor(images=images, return_tensors="pt")
    grid = inputs["image_grid_thw"]
    out = model.model.visual(inputs["pixel_values"].to(model.model.visual.dtype), grid_thw=grid)
    sizes = (grid.prod(-1) // model.model.visual.spatial_merge_size**2).tolist()
    return list(torch.split(out.pooler_output, sizes))


@torch.no_grad()
def nearest_reference_accuracy(model: Any, processor: Any, episodes: list[Episode]) -> dict[str, Any]:
    """Gate G1 on `episodes`: share of present concepts whose query token is nearest to
    their own reference, overall and by number of references."""
    was_training = model.training
    model.eval()
    correct: dict[int, list[bool]] = {}
    for start in range(0, len(episodes), 32):
        chunk = episodes[start:start + 32]
        images = [im for e in chunk for im in (*e.references, e.query)]
        feats = encode_images(model, processor, images)
        at = 0
        queries, refs, masks, targets, n_refs = [], [], [], [], []
        for e in chunk:
            r = torch.cat(feats[at:at + len(e.references)])
            q = feats[at + len(e.references)]
            at += len(e.references) + 1
            for i, cell in e.cell_of_ref.items():
                pad = torch.zeros(5 - len(r), r.shape[1])
                queries.append(q[cell])
                refs.append(torch.cat([r, pad]))
                masks.append(torch.arange(5) < len(r))
                targets.append(i)
                n_refs.append(len(r))
        ok = nearest_reference_correct(torch.stack(queries), torch.stack(refs), torch.stack(masks),
                                       torch.tensor(targets))
        for n, c in zip(n_refs, ok.tolist()):
            correct.setdefault(n, []).append(c)
    model.train(was_training)
    flat = [c for v in correct.values() for c in v]
    return {
        "accuracy": sum(flat) / len(flat),
        "queries": len(flat),
        "by_num_refs": {n: round(sum(v) / len(v), 4) for n, v in sorted(correct.items())},
    }


def training_batch(rng: random.Random, pool: list[Triple], n: int, cell_px: int
                   ) -> tuple[list[Any], torch.Tensor]:
    """`n` query images (1-5 objects) and `n` centred references of training triples;
    labels (tokens, 3) in token order (each query's 9 cells, then each reference)."""
    images, labels = [], []
    for _ in range(n):
        img, per_cell = draw_scene(rng, rng.sample(pool, rng.randint(1, 5)), cell_px)
        images.append(img)
        labels += [attribute_labels(t) for t in per_cell]
    for _ in range(n):
        t = rng.choice(pool)
        images.append(draw_reference(np.random.default_rng(rng.getrandbits(63)), *t, cell_px))
        labels.append(attribute_labels(t))
    return images, torch.tensor(labels)


def pretrain_step(model: Any, heads: AttributeHeads, processor: Any, opt: torch.optim.Optimizer,
                  images: list[Any], labels_N3: torch.Tensor) -> dict[str, float]:
    """One optimizer step of the summed attribute cross-entropy; returns loss and accuracy."""
    tokens_ND = torch.cat(encode_images(model, processor, images))
    logits = heads(tokens_ND)
    loss = sum(nn.functional.cross_entropy(lg, labels_N3[:, i]) for i, lg in enumerate(logits))
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    hits = torch.stack([lg.argmax(-1) == labels_N3[:, i] for i, lg in enumerate(logits)], -1)
    return {"loss": loss.item(), "token_accuracy": hits.all(-1).float().mean().item()}


@torch.no_grad()
def reinit_language_model(model: Any, seed: int) -> int:
    """Re-initialise every linear layer and the token embeddings of `model`'s language
    model, and its output layer, with PyTorch's default init (Kaiming-uniform linear
    weights and uniform biases, normal(0, 1) embeddings), seeded; norms and the vision
    tower are kept. Returns the number of modules re-initialised."""
    gen_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    n = 0
    for module in (model.model.language_model, model.lm_head):
        for sub in module.modules():
            if isinstance(sub, (nn.Linear, nn.Embedding)):
                sub.reset_parameters()
                n += 1
    torch.random.set_rng_state(gen_state)
    return n


def run_pretrain_vision(cfg: Any) -> Path:
    """Train `cfg.pretrain_vision.steps` steps from `cfg.learner.model`; returns the
    written checkpoint directory (log next to it as `<name>_log.jsonl`)."""
    with torch_threads(cfg.pretrain_vision.num_threads):
        return _run_pretrain_vision(cfg)


def _run_pretrain_vision(cfg: Any) -> Path:
    from repic_ray.models.loading import load_policy, load_processor, resolve_checkpoint

    pv = cfg.pretrain_vision
    torch.manual_seed(cfg.trainer.seed)
    base = resolve_checkpoint(cfg.learner.model)
    out = Path(pv.output or Path(cfg.output_dir) / "vision")
    out.parent.mkdir(parents=True, exist_ok=True)
    model = load_policy(base)
    processor = load_processor(base)
    cell_px = 28
    train_pool = list(triple_split()[0])
    episodes = gate_episodes(pv.eval_episodes, seed=cfg.trainer.seed + 1, cell_px=cell_px)
    model.requires_grad_(False)
    model.model.visual.requires_grad_(True)
    heads = AttributeHeads(model.config.text_config.hidden_size)
    params = [*model.model.visual.parameters(), *heads.parameters()]
    opt = torch.optim.AdamW(params, lr=pv.lr)
    rng = random.Random(cfg.trainer.seed)
    log_path = out.parent / f"{out.name}_log.jsonl"
    start = time.perf_counter()
    with log_path.open("w") as logf:
        def record(rec: dict[str, Any]) -> None:
            rec["elapsed_s"] = round(time.perf_counter() - start, 1)
            logf.write(json.dumps(rec) + "\n")
            logf.flush()
            log.info("pretrain-vision %s", rec)

        record({"step": 0, "gate_g1": nearest_reference_accuracy(model, processor, episodes)})
        model.model.visual.train()
        for step in range(1, pv.steps + 1):
            images, labels = training_batch(rng, train_pool, pv.batch_size, cell_px)
            stats = pretrain_step(model, heads, processor, opt, images, labels)
            rec: dict[str, Any] = {"step": step, **stats}
            if step % pv.eval_every == 0 or step == pv.steps:
                rec["gate_g1"] = nearest_reference_accuracy(model, processor, episodes)
            if step % pv.log_every == 0 or "gate_g1" in rec:
                record(rec)
    model.eval()
    if pv.language_init == "torch":
        n = reinit_language_model(model, cfg.trainer.seed)
        log.info("pretrain-vision: %d language-model modules re-initialised (PyTorch default init)", n)
    tmp = out.with_name(out.name + ".tmp")
    model.save_pretrained(tmp)
    processor.save_pretrained(tmp)
    if out.exists():
        import shutil

        shutil.rmtree(out)
    tmp.rename(out)
    return out
