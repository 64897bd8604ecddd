"""Tiny perception models trained on the synthetic world: CLIP and Grounding DINO.

The random `tiny:clip` and `tiny:grounding-dino` checkpoints (`repic_ray.models.tiny`)
exercise the loading code but carry no signal. This module trains small models of the
same classes on scenes drawn with the world's own drawing code and writes ordinary
Hugging Face checkpoint directories (`checkpoints/tiny-clip`, `checkpoints/tiny-gdino`)
that `load_clip` / `load_detector` read like any real checkpoint:

- CLIP: contrastive between a jittered crop of a query object and its concept's
  reference image (crop <-> reference, whole scenes as extra negatives), and between
  each image and the text "<colour> <pattern> <shape>". Trained on the training triples
  only (`triple_split`); evaluated on the held-out ones, i.e. on attribute combinations
  it never saw.
- Grounding DINO: transformers' own set-prediction loss (Hungarian matching, focal
  loss on the text tokens, L1 + GIoU on boxes), with the world's category words as the
  prompt. Its uncased WordPiece vocabulary puts [CLS], [SEP], "." and "?" at BERT's ids
  (101, 102, 1012, 1029), which transformers' Grounding DINO hard-codes to split a
  prompt into phrases (text self-attention masks and the loss's label maps).

Every world maps shapes to the same categories (`repic_ray.data.vocab.SHAPE_CATEGORY`),
so the detector knows the categories of any world.

    python -m repic_ray.models.perception clip --out checkpoints/tiny-clip
    python -m repic_ray.models.perception gdino --out checkpoints/tiny-gdino
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from repic_ray.data.names import Triple, all_triples, triple_split
from repic_ray.data.synthetic import GRID, _background, draw_object
from repic_ray.data.vocab import CATEGORIES, SHAPE_CATEGORY
from repic_ray.threads import torch_threads


def shape_categories() -> dict[str, str]:
    """The world's shape -> category mapping (the same for every world seed)."""
    return dict(SHAPE_CATEGORY)


def triple_text(t: Triple) -> str:
    shape, colour, pattern = t
    return f"{colour} {pattern} {shape}"


# ---------------------------------------------------------------------------------------
# Scenes


def draw_reference(rng: random.Random, t: Triple, cell_px: int = 28) -> Image.Image:
    """A concept reference image as the world draws it: the object at 80 % of one cell."""
    img = _background(np.random.default_rng(rng.getrandbits(63)), cell_px, cell_px)
    s = round(cell_px * 0.8)
    off = (cell_px - s) // 2
    draw_object(img, [off, off, off + s, off + s], *t)
    return img


def draw_scene(rng: random.Random, triples: list[Triple], cell_px: int = 28
               ) -> tuple[Image.Image, list[tuple[Triple, list[int]]]]:
    """A GRID x GRID query image with `triples` in random cells, placed as the world
    places them (65-85 % of a cell, random offset); returns (image, [(triple, box)])."""
    cells = rng.sample(range(GRID * GRID), len(triples))
    c = cell_px
    objects = []
    for t, cell in zip(triples, cells):
        s = rng.randint(round(0.65 * c), round(0.85 * c))
        x0, y0 = (cell % GRID) * c, (cell // GRID) * c
        x1 = x0 + rng.randint(1, c - s - 1)
        y1 = y0 + rng.randint(1, c - s - 1)
        objects.append((t, [x1, y1, x1 + s, y1 + s]))
    img = _background(np.random.default_rng(rng.getrandbits(63)), GRID * c, GRID * c)
    for t, box in objects:
        draw_object(img, box, *t)
    return img, objects


def jitter_box(rng: random.Random, box: list[int], size: int, amount: float) -> list[int]:
    """`box` with each side moved by up to `amount` of its width, clipped to the image."""
    w = box[2] - box[0]
    d = max(1, round(amount * w))
    x1 = min(max(0, box[0] + rng.randint(-d, d)), box[0] + w // 2 - 1)
    y1 = min(max(0, box[1] + rng.randint(-d, d)), box[1] + w // 2 - 1)
    x2 = max(min(size, box[2] + rng.randint(-d, d)), box[0] + w // 2 + 1)
    y2 = max(min(size, box[3] + rng.randint(-d, d)), box[1] + w // 2 + 1)
    return [x1, y1, x2, y2]


# ---------------------------------------------------------------------------------------
# CLIP


@dataclass
class ClipTrainConfig:
    """Training settings of the tiny CLIP."""

    steps: int = 1500
    batch_size: int = 64
    """Query objects (and their concepts' references) per step."""
    lr: float = 2e-3
    weight_decay: float = 0.05
    warmup: int = 100
    jitter: float = 0.2
    """Crop boxes move each side by up to this fraction of the object's width."""
    text_weight: float = 0.5
    """Weight of the image <-> attribute-text losses next to crop <-> reference."""
    image_size: int = 32
    patch_size: int = 4
    width: int = 64
    layers: int = 2
    heads: int = 4
    projection_dim: int = 64
    seed: int = 0
    threads: int = 1


def _clip_model_and_processor(cfg: ClipTrainConfig):
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    from repic_ray.models.tiny import _clip_vocab_and_merges

    vocab, merges = _clip_vocab_and_merges()
    tokenizer = CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77)
    size = cfg.image_size
    processor = CLIPProcessor(
        image_processor=CLIPImageProcessor(
            size={"shortest_edge": size}, crop_size={"height": size, "width": size},
            # Crops are rarely square: squash them to the square input instead of
            # cutting off the object's sides.
            do_center_crop=False,
        ),
        tokenizer=tokenizer,
    )
    processor.image_processor.size = {"height": size, "width": size}
    tower = {
        "hidden_size": cfg.width,
        "intermediate_size": 4 * cfg.width,
        "num_hidden_layers": cfg.layers,
        "num_attention_heads": cfg.heads,
    }
    config = CLIPConfig(
        text_config={
            **tower,
            "vocab_size": len(tokenizer),
            "max_position_embeddings": 16,
            "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id,
        },
        vision_config={**tower, "image_size": size, "patch_size": cfg.patch_size},
        projection_dim=cfg.projection_dim,
    )
    tokenizer.model_max_length = 16
    return CLIPModel(config), processor


def _clip_batch(rng: random.Random, triples: list[Triple], n: int, jitter: float):
    """n query-object crops of distinct triples, their references, and 8 whole scenes."""
    chosen = rng.sample(triples, n)
    crops, refs = [], []
    for t in chosen:
        others = rng.sample(triples, rng.randint(0, 4))
        others = [o for o in others if o != t]
        img, objects = draw_scene(rng, [t, *others])
        box = jitter_box(rng, objects[0][1], img.size[0], jitter)
        crops.append(img.crop(tuple(box)))
        refs.append(draw_reference(rng, t))
    scenes = [draw_scene(rng, rng.sample(triples, rng.randint(2, 6)))[0] for _ in range(8)]
    return chosen, crops, refs, scenes


def _image_embeds(model, processor, images) -> torch.Tensor:
    pix = processor(images=images, return_tensors="pt")["pixel_values"]
    out = model.get_image_features(pixel_values=pix)
    emb = out if isinstance(out, torch.Tensor) else out.pooler_output
    return F.normalize(emb, dim=-1)


def _text_embeds(model, processor, texts) -> torch.Tensor:
    enc = processor.tokenizer(texts, padding=True, return_tensors="pt")
    out = model.get_text_features(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])
    emb = out if isinstance(out, torch.Tensor) else out.pooler_output
    return F.normalize(emb, dim=-1)


def _lr(step: int, total: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    return peak * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def train_clip(out: str | Path, cfg: ClipTrainConfig, log_every: int = 50) -> Path:
    """Train the tiny CLIP on the training triples and save it (with its config and
    log) to `out`."""
    with torch_threads(cfg.threads):
        return _train_clip(out, cfg, log_every)


def _train_clip(out: str | Path, cfg: ClipTrainConfig, log_every: int = 50) -> Path:
    torch.manual_seed(cfg.seed)
    rng = random.Random(cfg.seed)
    train_triples = list(triple_split()[0])
    model, processor = _clip_model_and_processor(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    log = []
    t0 = time.time()
    for step in range(cfg.steps):
        for g in opt.param_groups:
            g["lr"] = _lr(step, cfg.steps, cfg.lr, cfg.warmup)
        model.train()
        chosen, crops, refs, scenes = _clip_batch(rng, train_triples, cfg.batch_size, cfg.jitter)
        emb = _image_embeds(model, processor, crops + refs + scenes)
        n = len(chosen)
        crop_e, ref_e, scene_e = emb[:n], emb[n:2 * n], emb[2 * n:]
        txt_e = _text_embeds(model, processor, [triple_text(t) for t in chosen])
        scale = model.logit_scale.exp().clamp(max=100)
        target = torch.arange(n)
        cr = scale * crop_e @ ref_e.T
        # reference -> crop also ranks the whole scenes, which must never match.
        rc = scale * ref_e @ torch.cat([crop_e, scene_e]).T
        loss_img = F.cross_entropy(cr, target) + F.cross_entropy(rc, target)
        loss_txt = sum(F.cross_entropy(scale * e @ txt_e.T, target)
                       + F.cross_entropy(scale * txt_e @ e.T, target) for e in (crop_e, ref_e)) / 2
        loss = loss_img + cfg.text_weight * loss_txt
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % log_every == 0 or step == cfg.steps - 1:
            acc = float((cr.argmax(-1) == target).float().mean())
            row = {"step": step, "loss": round(float(loss), 4), "loss_img": round(float(loss_img), 4),
                   "loss_txt": round(float(loss_txt), 4), "train_top1": round(acc, 4),
                   "seconds": round(time.time() - t0, 1)}
            if step % (log_every * 4) == 0 or step == cfg.steps - 1:
                model.eval()
                row["heldout_top1_20"] = clip_retrieval_accuracy(model, processor, num_concepts=20,
                                                                  episodes=5, seed=1000 + step)
            log.append(row)
            print(json.dumps(row), flush=True)
    model.eval()
    model.save_pretrained(out)
    processor.save_pretrained(out)
    (out / "train_config.json").write_text(json.dumps(asdict(cfg), indent=2) + "\n")
    with open(out / "train_log.jsonl", "w") as f:
        for row in log:
            f.write(json.dumps(row) + "\n")
    return out


@torch.no_grad()
def clip_retrieval_accuracy(model, processor, *, num_concepts: int = 20, episodes: int = 20,
                            queries_per_episode: int = 20, jitter: float = 0.1,
                            seed: int = 0, triples: list[Triple] | None = None) -> float:
    """Top-1 accuracy of picking a query object's concept among `num_concepts`
    registered concepts (one reference each) by nearest CLIP image embedding.

    Each episode registers `num_concepts` random `triples` (default: the held-out
    ones) and draws `queries_per_episode` scenes, each with one registered concept and
    0-3 other objects of any triple; the query is the concept's box, jittered."""
    rng = random.Random(seed)
    pool = list(triples if triples is not None else triple_split()[1])
    every = all_triples()
    hits = total = 0
    for _ in range(episodes):
        concepts = rng.sample(pool, num_concepts)
        ref_e = _image_embeds(model, processor, [draw_reference(rng, t) for t in concepts])
        crops, truth = [], []
        for _ in range(queries_per_episode):
            i = rng.randrange(num_concepts)
            others = [o for o in rng.sample(every, rng.randint(0, 3)) if o != concepts[i]]
            img, objects = draw_scene(rng, [concepts[i], *others])
            crops.append(img.crop(tuple(jitter_box(rng, objects[0][1], img.size[0], jitter))))
            truth.append(i)
        pred = (_image_embeds(model, processor, crops) @ ref_e.T).argmax(-1)
        hits += int((pred == torch.tensor(truth)).sum())
        total += len(truth)
    return round(hits / total, 4)


# ---------------------------------------------------------------------------------------
# Grounding DINO

BERT_SPECIAL_IDS = {"[PAD]": 0, "[CLS]": 101, "[SEP]": 102, "[MASK]": 103, ".": 1012, "?": 1029}
"""Ids transformers' Grounding DINO hard-codes for its BERT tokenizer (besides [UNK])."""


@dataclass
class GdinoTrainConfig:
    """Training settings of the tiny Grounding DINO."""

    steps: int = 3000
    batch_size: int = 8
    lr: float = 4e-4
    weight_decay: float = 1e-4
    warmup: int = 100
    single_prompt: float = 0.3
    """Fraction of prompts "a <category>." (the detector reward's form); the others list
    a random subset of the categories, present ones first shuffled in."""
    image_size: int = 128
    embed_dim: int = 32
    d_model: int = 64
    encoder_layers: int = 2
    decoder_layers: int = 3
    num_queries: int = 16
    first_level: int = 2
    """The Swin stage of the detector's finest feature level (1: stride 4, 2: stride 8);
    the levels are this stage, the two after it, and one more convolved from the last."""
    dropout: float = 0.1
    """Dropout of the detection transformer (Grounding DINO's default 0.1); the world's
    scenes are drawn fresh every step, so there is little to overfit."""
    text_embedding_std: float = 1.0
    """Initial std of the text tower's word embeddings, which the frozen text path (below)
    keeps. At BERT's 0.02 a word's own embedding is no larger than the position and type
    embeddings every category word shares; at 1.0 the 8 category words' features start
    apart (mean cosine -0.02), as a pretrained text tower's would."""
    freeze_text: bool = True
    """Keep the text path at its initial weights: BERT and its projection, as a
    pretrained text encoder is kept in fine-tuning, and the encoder's updates of the text
    features (text enhancer layers; the image-to-text half of each fusion layer). Trained,
    that path learned to add one image-wide vector to every word and the words' features
    became one (cosine 0.98 after 500 steps), so every category scored alike; frozen,
    the words stay apart and the image side learns to match them."""
    init: str = ""
    """Continue from this checkpoint directory (its architecture wins over the above)."""
    category_map_weight: float = 0.0
    """Weight of an auxiliary dense loss during training: a 1x1 convolution on the
    backbone's finest feature level predicts, for every cell, the category of the object
    whose box holds the cell's centre (or background), cross-entropy against the world's
    boxes. It asks the backbone for shape-telling features at every location, which the
    set-prediction loss teaches only through the matched queries. The head is dropped
    from the saved checkpoint (0: off)."""
    backbone_steps: int = 0
    """Steps of a backbone stage before detection training (0: none): the Swin learns the
    world's category of every drawn object, from its box's mean features on the two
    finest levels (a linear head) and for every cell of the finest level (a 1x1
    convolution, as `category_map_weight`), batch `batch_size`, AdamW at `backbone_lr`.
    It plays the part of the ImageNet-pretrained Swin a real Grounding DINO starts from:
    the set-prediction loss alone teaches shapes only through the matched queries, and
    the round shapes (circle, hexagon, square) stayed confused. The heads are dropped."""
    backbone_lr: float = 1e-3
    backbone_lr_scale: float = 1.0
    """Learning-rate factor of the Swin in detection training (DETR and Grounding DINO
    train their pretrained backbone at a tenth of the rest's)."""
    backbone_box_weight: float = 0.0
    """Weight of a box term in the backbone stage: for every cell of the finest level
    whose centre lies in an object's box, a 1x1 convolution predicts the distances from
    the cell's centre to the box's four sides (L1, in image widths), as FCOS does; it
    asks the features for the objects' extent as well as their category."""
    seed: int = 0
    threads: int = 1


def _text_path_parameters(model) -> list:
    """The parameters that make the text features the detector's class logits read."""
    m = model.model
    params = [*m.text_backbone.parameters(), *m.text_projection.parameters()]
    for layer in m.encoder.layers:
        params += [*layer.text_enhancer_layer.parameters(), layer.fusion_layer.text_param,
                   *layer.fusion_layer.attn.out_text_proj.parameters()]
    return params


def bert_layout_tokenizer():
    """An uncased WordPiece tokenizer over the world's words whose special tokens sit at
    BERT's ids; unused ids are `[unusedN]`."""
    from transformers import BertTokenizer

    from repic_ray.models.tiny import _lowercase_words

    chars = "abcdefghijklmnopqrstuvwxyz0123456789"
    punct = ",;:!'\"()[]{}<>-_/*+=#@&%"
    words = ["[UNK]", *punct, *chars, *(f"##{c}" for c in chars), *_lowercase_words()]
    size = max(BERT_SPECIAL_IDS.values()) + 1 + 8
    vocab: list[str | None] = [None] * size
    for tok, i in BERT_SPECIAL_IDS.items():
        vocab[i] = tok
    free = (i for i in range(size) if vocab[i] is None)
    for w in dict.fromkeys(words):
        vocab[next(free)] = w
    n_unused = 0
    for i in range(size):
        if vocab[i] is None:
            vocab[i] = f"[unused{n_unused}]"
            n_unused += 1
    return BertTokenizer(vocab={t: i for i, t in enumerate(vocab)}, do_lower_case=True)


def _gdino_model_and_processor(cfg: GdinoTrainConfig):
    from transformers import (
        GroundingDinoConfig,
        GroundingDinoForObjectDetection,
        GroundingDinoImageProcessor,
        GroundingDinoProcessor,
    )

    tokenizer = bert_layout_tokenizer()
    processor = GroundingDinoProcessor(
        image_processor=GroundingDinoImageProcessor(
            size={"shortest_edge": cfg.image_size, "longest_edge": cfg.image_size}
        ),
        tokenizer=tokenizer,
    )
    e = cfg.embed_dim
    config = GroundingDinoConfig(
        backbone_config={
            "model_type": "swin",
            "image_size": cfg.image_size,
            "patch_size": 4,
            "embed_dim": e,
            "depths": [1, 1, 2, 1],
            "num_heads": [1, 2, 4, 4],
            "window_size": 4,
            "out_indices": [cfg.first_level + i for i in range(3)],
        },
        text_config={
            "model_type": "bert",
            "vocab_size": len(tokenizer),
            "hidden_size": cfg.d_model,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "intermediate_size": 2 * cfg.d_model,
            "max_position_embeddings": 64,
            "pad_token_id": tokenizer.pad_token_id,
        },
        use_pretrained_backbone=False,
        use_timm_backbone=False,
        d_model=cfg.d_model,
        encoder_layers=cfg.encoder_layers,
        encoder_ffn_dim=2 * cfg.d_model,
        encoder_attention_heads=4,
        decoder_layers=cfg.decoder_layers,
        decoder_ffn_dim=2 * cfg.d_model,
        decoder_attention_heads=4,
        num_queries=cfg.num_queries,
        dropout=cfg.dropout,
        max_text_len=64,
        auxiliary_loss=True,
        disable_custom_kernels=True,
    )
    return GroundingDinoForObjectDetection(config), processor


def _target_classes_one_hot(outputs, targets, indices):
    """Each matched query's target over the text tokens: the token map of its object's
    phrase in its own image's prompt. transformers' GroundingDinoImageLoss offsets image
    i's phrase indices by the phrase count of image i itself rather than of the images
    before it, so from the third image of a batch on (or the second, when prompts differ
    in length) queries were taught another image's phrase, and the detector learned
    where objects are but not which category word they are."""
    logits = outputs["logits"]
    label_maps = outputs["label_maps"]
    offsets = [0]
    for m in label_maps[:-1]:
        offsets.append(offsets[-1] + len(m))
    class_labels = torch.cat([t["class_labels"][J] + off
                              for t, (_, J), off in zip(targets, indices, offsets)])
    flat = torch.cat(label_maps, dim=0)
    batch_idx = torch.cat([torch.full_like(src, i) for i, (src, _) in enumerate(indices)])
    src_idx = torch.cat([src for src, _ in indices])
    onehot = torch.zeros_like(logits, dtype=torch.long)
    onehot[batch_idx, src_idx] = flat[class_labels].to(torch.long)
    return onehot


def gdino_detection_loss(logits, labels, device, pred_boxes, config, label_maps, text_mask,
                         outputs_class=None, outputs_coord=None, encoder_logits=None,
                         encoder_pred_boxes=None):
    """transformers' `GroundingDinoForObjectDetectionLoss` (same matcher, losses and
    weights) with the batch offset of the class targets fixed
    (`_target_classes_one_hot`). Set as the model's `loss_function` for training."""
    from transformers.loss.loss_grounding_dino import (
        GroundingDinoHungarianMatcher,
        GroundingDinoImageLoss,
        _set_aux_loss,
    )

    class _Loss(GroundingDinoImageLoss):
        def _get_target_classes_one_hot(self, outputs, targets, indices):
            return _target_classes_one_hot(outputs, targets, indices)

    matcher = GroundingDinoHungarianMatcher(class_cost=config.class_cost,
                                            bbox_cost=config.bbox_cost,
                                            giou_cost=config.giou_cost)
    criterion = _Loss(matcher=matcher, focal_alpha=config.focal_alpha,
                      losses=["labels", "boxes", "cardinality"]).to(device)
    outputs = {"logits": logits, "pred_boxes": pred_boxes, "label_maps": label_maps,
               "text_mask": text_mask}
    aux = None
    if config.auxiliary_loss:
        aux = _set_aux_loss(outputs_class, outputs_coord)
        for a in aux:
            a["label_maps"], a["text_mask"] = label_maps, text_mask
        outputs["auxiliary_outputs"] = aux
    loss_dict = criterion(outputs, labels)
    weights = {"loss_ce": 2.0, "loss_bbox": config.bbox_loss_coefficient,
               "loss_giou": config.giou_loss_coefficient}
    if config.two_stage:
        enc = criterion({"logits": encoder_logits, "pred_boxes": encoder_pred_boxes,
                         "label_maps": label_maps, "text_mask": text_mask}, labels)
        loss_dict.update({k + "_enc": v for k, v in enc.items()})
        weights.update({k + "_enc": v for k, v in list(weights.items())})
    if config.auxiliary_loss:
        base = {k: v for k, v in weights.items() if not k.endswith("_enc")}
        for i in range(config.decoder_layers - 1):
            weights.update({f"{k}_{i}": v for k, v in base.items()})
    loss = sum(loss_dict[k] * weights[k] for k in loss_dict if k in weights)
    return loss, loss_dict, aux


def _gdino_sample(rng: random.Random, mapping: dict[str, str], single: float, with_objects: bool = False):
    """(image, prompt, labels): a random scene of 1-7 objects of any triple, a prompt of
    categories and the targets of the prompted categories (cx, cy, w, h in [0, 1]); with
    `with_objects`, also every object's (category index in CATEGORIES, box in [0, 1] as
    x1, y1, x2, y2)."""
    every = all_triples()
    img, objects = draw_scene(rng, rng.sample(every, rng.randint(1, 7)))
    size = img.size[0]
    present = list(dict.fromkeys(mapping[t[0]] for t, _ in objects))
    if rng.random() < single:
        cats = [rng.choice(present) if rng.random() < 0.8 else rng.choice(CATEGORIES)]
        prompt = f"a {cats[0]}."
    else:
        absent = [c for c in CATEGORIES if c not in present]
        cats = rng.sample(present, rng.randint(1, len(present)))
        cats += rng.sample(absent, rng.randint(0, min(4, len(absent))))
        rng.shuffle(cats)
        prompt = ". ".join(cats) + "."
    labels, boxes = [], []
    for t, (x1, y1, x2, y2) in objects:
        cat = mapping[t[0]]
        if cat in cats:
            labels.append(cats.index(cat))
            boxes.append([(x1 + x2) / 2 / size, (y1 + y2) / 2 / size, (x2 - x1) / size,
                          (y2 - y1) / size])
    target = {"class_labels": torch.tensor(labels, dtype=torch.long),
              "boxes": torch.tensor(boxes, dtype=torch.float).reshape(-1, 4)}
    if with_objects:
        every_object = [(CATEGORIES.index(mapping[t[0]]), [v / size for v in box]) for t, box in objects]
        return img, prompt, target, every_object
    return img, prompt, target


def _cell_grid(height: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(height, width) y and x of each cell's centre of a feature map over the image, in
    [0, 1]."""
    ys = (torch.arange(height, dtype=torch.float) + 0.5) / height
    xs = (torch.arange(width, dtype=torch.float) + 0.5) / width
    return ys[:, None].expand(height, width), xs[None, :].expand(height, width)


def _largest_first(objects: list[tuple[int, list[float]]]) -> list[tuple[int, list[float]]]:
    """Objects by box area, largest first, so that a smaller box drawn later wins its cells."""
    return sorted(objects, key=lambda o: -(o[1][2] - o[1][0]) * (o[1][3] - o[1][1]))


def category_map(objects: list[tuple[int, list[float]]], height: int, width: int) -> torch.Tensor:
    """(height, width) long tensor: for each cell of a feature map over the image, 1 + the
    category index of the smallest object box holding the cell's centre, else 0."""
    out = torch.zeros(height, width, dtype=torch.long)
    ys, xs = _cell_grid(height, width)
    for cat, (x1, y1, x2, y2) in _largest_first(objects):
        out[(ys >= y1) & (ys <= y2) & (xs >= x1) & (xs <= x2)] = cat + 1
    return out


class _FinestFeatures:
    """Keeps the backbone's finest feature map of the last forward (a forward hook)."""

    def __init__(self, model) -> None:
        self.features: torch.Tensor | None = None
        self.handle = model.model.backbone.register_forward_hook(self._keep)

    def _keep(self, module, args, output) -> None:
        feature_maps, _ = output
        self.features = feature_maps[0][0]


def box_distance_map(objects: list[tuple[int, list[float]]], height: int, width: int
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """((4, height, width) distances from each cell's centre to the left, top, right and
    bottom sides of the smallest object box holding it, in image widths; (height, width)
    bool mask of the cells inside a box)."""
    dist = torch.zeros(4, height, width)
    inside_any = torch.zeros(height, width, dtype=torch.bool)
    ys, xs = _cell_grid(height, width)
    for _, (x1, y1, x2, y2) in _largest_first(objects):
        inside = (ys >= y1) & (ys <= y2) & (xs >= x1) & (xs <= x2)
        sides = torch.stack([xs - x1, ys - y1, x2 - xs, y2 - ys])
        dist[:, inside] = sides[:, inside]
        inside_any |= inside
    return dist, inside_any


def _box_mean(features_CHW: torch.Tensor, box: list[float]) -> torch.Tensor:
    """Mean of a (C, H, W) feature map over the cells a box in [0, 1] (x1, y1, x2, y2)
    covers (at least one)."""
    _, h, w = features_CHW.shape
    y0, x0 = min(int(box[1] * h), h - 1), min(int(box[0] * w), w - 1)
    y1, x1 = max(y0 + 1, round(box[3] * h)), max(x0 + 1, round(box[2] * w))
    return features_CHW[:, y0:y1, x0:x1].mean((1, 2))


def _object_logits(swin, head: torch.nn.Module, pixel_values: torch.Tensor,
                   objects: list[list[tuple[int, list[float]]]]
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(finest feature map, per-object category logits, per-object category) for a batch
    of images and their objects (category index, box in [0, 1])."""
    maps = swin(pixel_values).feature_maps
    pooled, labels = [], []
    for i, objs in enumerate(objects):
        for cat, box in objs:
            pooled.append(torch.cat([_box_mean(maps[0][i], box), _box_mean(maps[1][i], box)]))
            labels.append(cat)
    return maps[0], head(torch.stack(pooled)), torch.tensor(labels)


def pretrain_gdino_backbone(model, processor, cfg: GdinoTrainConfig, log_path: Path,
                            log_every: int = 50, eval_every: int = 500) -> float:
    """The backbone stage (`GdinoTrainConfig.backbone_steps`); returns the held-out
    object accuracy (40 scenes, seed 777) at the end. Rows go to `log_path` with
    "stage": "backbone"."""
    swin = model.model.backbone.conv_encoder.model
    channels = model.model.backbone.conv_encoder.intermediate_channel_sizes
    n = len(CATEGORIES)
    head = torch.nn.Linear(channels[0] + channels[1], n)
    dense = torch.nn.Conv2d(channels[0], 1 + n, 1)
    sides = torch.nn.Conv2d(channels[0], 4, 1)
    params = [*swin.parameters(), *head.parameters(), *dense.parameters()]
    if cfg.backbone_box_weight > 0:
        params += list(sides.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.backbone_lr, weight_decay=cfg.weight_decay)
    mapping = shape_categories()
    rng = random.Random(cfg.seed + 1)

    def batch(r: random.Random, size: int):
        samples = [_gdino_sample(r, mapping, cfg.single_prompt, with_objects=True)
                   for _ in range(size)]
        pixels = processor.image_processor([s[0] for s in samples],
                                           return_tensors="pt")["pixel_values"]
        return pixels, [s[3] for s in samples]

    held_rng = random.Random(777)
    held_out = [batch(held_rng, 8) for _ in range(5)]

    def accuracy() -> float:
        swin.eval()
        right = total = 0
        with torch.no_grad():
            for pixels, objects in held_out:
                _, logits, labels = _object_logits(swin, head, pixels, objects)
                right += int((logits.argmax(-1) == labels).sum())
                total += len(labels)
        swin.train()
        return right / total

    t0 = time.time()
    acc = 0.0
    for step in range(cfg.backbone_steps):
        for g in opt.param_groups:
            g["lr"] = _lr(step, cfg.backbone_steps, cfg.backbone_lr, cfg.warmup)
        pixels, objects = batch(rng, cfg.batch_size)
        finest, logits, labels = _object_logits(swin, head, pixels, objects)
        want = torch.stack([category_map(o, finest.shape[2], finest.shape[3]) for o in objects])
        loss = F.cross_entropy(logits, labels) + F.cross_entropy(dense(finest), want)
        if cfg.backbone_box_weight > 0:
            maps = [box_distance_map(o, finest.shape[2], finest.shape[3]) for o in objects]
            dist = torch.stack([m[0] for m in maps])
            inside = torch.stack([m[1] for m in maps])[:, None].expand_as(dist)
            loss = loss + cfg.backbone_box_weight * F.l1_loss(sides(finest)[inside], dist[inside])
        opt.zero_grad()
        loss.backward()
        opt.step()
        last = step == cfg.backbone_steps - 1
        if step % log_every == 0 or last:
            row = {"stage": "backbone", "step": step, "loss": round(float(loss), 4),
                   "seconds": round(time.time() - t0, 1)}
            if (step % eval_every == 0 and step) or last:
                acc = accuracy()
                row["object_accuracy"] = round(acc, 4)
            with open(log_path, "a") as f:
                f.write(json.dumps(row) + "\n")
            print(json.dumps(row), flush=True)
    return acc


def train_gdino(out: str | Path, cfg: GdinoTrainConfig, log_every: int = 25,
                eval_every: int = 500) -> Path:
    """Train the tiny Grounding DINO with transformers' own detection loss; save it
    (with its config and log) to `out`, and a copy every `eval_every` steps."""
    with torch_threads(cfg.threads):
        return _train_gdino(out, cfg, log_every, eval_every)


def _train_gdino(out: str | Path, cfg: GdinoTrainConfig, log_every: int = 25,
                eval_every: int = 500) -> Path:
    torch.manual_seed(cfg.seed)
    rng = random.Random(cfg.seed)
    mapping = shape_categories()
    model, processor = _gdino_model_and_processor(cfg)
    with torch.no_grad():
        model.model.text_backbone.embeddings.word_embeddings.weight.normal_(
            0.0, cfg.text_embedding_std)
    if cfg.init:
        from repic_ray.models.loading import load_detector

        processor, model = load_detector(cfg.init)
    model.loss_function = gdino_detection_loss
    if cfg.freeze_text:
        for q in _text_path_parameters(model):
            q.requires_grad_(False)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "train_config.json").write_text(json.dumps(asdict(cfg), indent=2) + "\n")
    log_path = out / "train_log.jsonl"
    log_path.write_text("")
    if cfg.backbone_steps > 0:
        pretrain_gdino_backbone(model, processor, cfg, log_path, log_every, eval_every)
    trained = [q for q in model.parameters() if q.requires_grad]
    head = finest = None
    if cfg.category_map_weight > 0:
        finest = _FinestFeatures(model)
        channels = model.model.backbone.conv_encoder.intermediate_channel_sizes[0]
        head = torch.nn.Conv2d(channels, 1 + len(CATEGORIES), 1)
        trained += list(head.parameters())
    swin = {id(q) for q in model.model.backbone.conv_encoder.model.parameters()}
    groups = [{"params": [q for q in trained if id(q) not in swin], "scale": 1.0},
              {"params": [q for q in trained if id(q) in swin], "scale": cfg.backbone_lr_scale}]
    opt = torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
    t0 = time.time()
    for step in range(cfg.steps):
        for g in opt.param_groups:
            g["lr"] = g["scale"] * _lr(step, cfg.steps, cfg.lr, cfg.warmup)
        model.train()
        if cfg.freeze_text:
            model.model.text_backbone.eval()
        batch = [_gdino_sample(rng, mapping, cfg.single_prompt, with_objects=True)
                 for _ in range(cfg.batch_size)]
        enc = processor(images=[b[0] for b in batch], text=[b[1] for b in batch],
                        return_tensors="pt", padding=True)
        outputs = model(**enc, labels=[b[2] for b in batch])
        loss = outputs.loss
        map_loss = None
        if head is not None:
            feats = finest.features
            want = torch.stack([category_map(b[3], feats.shape[2], feats.shape[3]) for b in batch])
            map_loss = F.cross_entropy(head(feats), want)
            loss = loss + cfg.category_map_weight * map_loss
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.1)
        opt.step()
        if step % log_every == 0 or step == cfg.steps - 1:
            ld = outputs.loss_dict
            row = {"step": step, "loss": round(float(loss), 4),
                   **{k: round(float(ld[k]), 4) for k in ("loss_ce", "loss_bbox", "loss_giou")
                      if k in ld},
                   **({"loss_category_map": round(float(map_loss), 4)} if map_loss is not None else {}),
                   "seconds": round(time.time() - t0, 1)}
            if (step % eval_every == 0 and step) or step == cfg.steps - 1:
                model.eval()
                # every query's box, as in the logs of the runs before NMS
                row["ap50"] = detector_ap50(model, processor, images=40, seed=777,
                                            nms_iou=None)["ap50"]
                model.save_pretrained(out)
                processor.save_pretrained(out)
            with open(log_path, "a") as f:
                f.write(json.dumps(row) + "\n")
            print(json.dumps(row), flush=True)
    model.eval()
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out


def _box_iou(a: list[float], b: list[float]) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def _average_precision(scored: list[tuple[float, bool]], n_gt: int) -> float:
    """All-point interpolated AP (VOC 2010+ / COCO style at one IoU threshold)."""
    if n_gt == 0:
        return float("nan")
    scored = sorted(scored, key=lambda s: -s[0])
    tp = np.cumsum([s[1] for s in scored])
    fp = np.cumsum([not s[1] for s in scored])
    recall = tp / n_gt if len(scored) else np.zeros(0)
    precision = tp / np.maximum(tp + fp, 1e-9) if len(scored) else np.zeros(0)
    mrec = np.concatenate([[0.0], recall, [1.0]])
    mpre = np.concatenate([[0.0], precision, [0.0]])
    for i in range(len(mpre) - 2, -1, -1):
        mpre[i] = max(mpre[i], mpre[i + 1])
    idx = np.where(mrec[1:] != mrec[:-1])[0]
    return float(np.sum((mrec[idx + 1] - mrec[idx]) * mpre[idx + 1]))


def phrase_spans(tokenizer, phrases: list[str]) -> list[tuple[str, int, int]]:
    """(phrase, first token, end token) of each phrase in the Grounding DINO prompt
    "p1. p2. ..." that `tokenizer` makes of them ([CLS] first, a "." after each)."""
    spans, pos = [], 1
    for phrase in phrases:
        n = len(tokenizer(phrase, add_special_tokens=False)["input_ids"])
        spans.append((phrase, pos, pos + n))
        pos += n + 1  # the "." after it
    return spans


def phrase_scores(probs_QT: torch.Tensor, spans: list[tuple[str, int, int]]
                  ) -> list[dict[str, float]]:
    """Each query's score for each phrase (its best token score in the phrase); phrases
    cut off by the text length are left out."""
    spans = [s for s in spans if s[2] <= probs_QT.shape[1]]
    if not spans:
        return [{} for _ in range(probs_QT.shape[0])]
    best_QP = torch.stack([probs_QT[:, a:b].amax(-1) for _, a, b in spans], dim=-1)
    return [{p: float(v) for (p, _, _), v in zip(spans, row)} for row in best_QP.tolist()]


def query_phrases(probs_QT: torch.Tensor, spans: list[tuple[str, int, int]]
                  ) -> list[tuple[str, float]]:
    """Each query's phrase (the one holding its best token score) and that score."""
    return [max(s.items(), key=lambda kv: kv[1]) if s else ("", 0.0)
            for s in phrase_scores(probs_QT, spans)]


@torch.no_grad()
def detect_categories(model, processor, image: Image.Image, categories: list[str],
                      nms_iou: float | None = 0.5) -> list[tuple[str, float, list[float]]]:
    """The queries' (category, score, [x1, y1, x2, y2] pixels) for the prompt
    "c1. c2. ...": a query's category is the phrase with its best token score. With
    `nms_iou`, per-category non-maximum suppression: of boxes of one category
    overlapping by more than that IoU only the best-scoring stays (the tiny detector puts
    several queries on one object; None keeps every query)."""
    prompt = ". ".join(categories) + "."
    enc = processor(images=image, text=prompt, return_tensors="pt")
    out = model(**enc)
    probs = torch.sigmoid(out.logits[0])  # (queries, text tokens)
    labels = query_phrases(probs, phrase_spans(processor.tokenizer, categories))
    w, h = image.size
    dets = []
    for q, (cat, score) in enumerate(labels):
        cx, cy, bw, bh = out.pred_boxes[0, q].tolist()
        dets.append((cat, score, [(cx - bw / 2) * w, (cy - bh / 2) * h,
                                  (cx + bw / 2) * w, (cy + bh / 2) * h]))
    if nms_iou is None or not dets:
        return dets
    from torchvision.ops import batched_nms

    index = {c: i for i, c in enumerate(dict.fromkeys(d[0] for d in dets))}
    keep = batched_nms(torch.tensor([d[2] for d in dets]), torch.tensor([d[1] for d in dets]),
                       torch.tensor([index[d[0]] for d in dets]), nms_iou)
    return [dets[i] for i in keep.tolist()]


def detector_ap50(model, processor, *, images: int = 100, seed: int = 0,
                  scenes: list[tuple[Image.Image, list[tuple[Triple, list[int]]]]] | None = None,
                  nms_iou: float | None = 0.5) -> dict[str, Any]:
    """Mean over categories of AP at IoU 0.5, prompting each image with all of the
    world's categories (the 8 its shapes map to), on `detect_categories`'s boxes
    (per-category NMS at IoU `nms_iou`; None: every query's box). `scenes` default to
    `images` random scenes of 1-7 objects."""
    mapping = shape_categories()
    categories = sorted(set(mapping.values()))
    if scenes is None:
        rng = random.Random(seed)
        every = all_triples()
        scenes = [draw_scene(rng, rng.sample(every, rng.randint(1, 7))) for _ in range(images)]
    scored: dict[str, list[tuple[float, bool]]] = {c: [] for c in categories}
    n_gt = dict.fromkeys(categories, 0)
    for img, objects in scenes:
        gts = [(mapping[t[0]], [float(v) for v in box]) for t, box in objects]
        for c, _ in gts:
            n_gt[c] += 1
        used = [False] * len(gts)
        for cat, score, box in sorted(detect_categories(model, processor, img, categories,
                                                        nms_iou),
                                      key=lambda d: -d[1]):
            best, best_iou = -1, 0.5
            for j, (gc, gbox) in enumerate(gts):
                if gc == cat and not used[j]:
                    iou = _box_iou(box, gbox)
                    if iou >= best_iou:
                        best, best_iou = j, iou
            if best >= 0:
                used[best] = True
            scored[cat].append((score, best >= 0))
    per_cat = {c: round(_average_precision(scored[c], n_gt[c]), 4) for c in categories if n_gt[c]}
    return {"ap50": round(float(np.mean(list(per_cat.values()))), 4), "per_category": per_cat,
            "images": len(scenes)}


# ---------------------------------------------------------------------------------------
# CLI


def _add_fields(p: argparse.ArgumentParser, cls) -> None:
    for f in fields(cls):
        kind = _parse_bool if isinstance(f.default, bool) else type(f.default)
        p.add_argument(f"--{f.name.replace('_', '-')}", type=kind, default=f.default)


def _parse_bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="model", required=True)
    pc = sub.add_parser("clip", help="train the tiny CLIP")
    pc.add_argument("--out", required=True)
    _add_fields(pc, ClipTrainConfig)
    pg = sub.add_parser("gdino", help="train the tiny Grounding DINO")
    pg.add_argument("--out", required=True)
    _add_fields(pg, GdinoTrainConfig)
    args = vars(parser.parse_args(argv))
    kind, out = args.pop("model"), args.pop("out")
    if kind == "clip":
        train_clip(out, ClipTrainConfig(**args))
    else:
        train_gdino(out, GdinoTrainConfig(**args))


if __name__ == "__main__":
    main()
