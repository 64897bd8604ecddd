"""The shipped tiny CLIP and Grounding DINO trained on the synthetic world
(`repic_ray.models.perception`): they load like real checkpoints and work on it."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from repic_ray.data.formats import load_samples
from repic_ray.data.synthetic import generate_world
from repic_ray.data.vocab import COLOURS, PATTERNS, SHAPES
from repic_ray.models.loading import (
    PROJECT_ROOT,
    SHIPPED_CLIP,
    SHIPPED_DETECTOR,
    load_clip,
    load_detector,
    resolve_checkpoint,
)
from repic_ray.models.perception import (
    BERT_SPECIAL_IDS,
    _target_classes_one_hot,
    bert_layout_tokenizer,
    clip_retrieval_accuracy,
    gdino_detection_loss,
    shape_categories,
    triple_split,
)


def test_triple_split_holds_out_new_combinations_of_seen_attributes():
    train, held = triple_split()
    assert (len(train), len(held)) == (240, 80) and not set(train) & set(held)
    assert triple_split() == (train, held)  # fixed, not drawn per call
    for i, j in ((0, 1), (0, 2), (1, 2)):
        seen = {(t[i], t[j]) for t in train}
        assert all((t[i], t[j]) in seen for t in held)
    assert {t[0] for t in train} == set(SHAPES) and {t[1] for t in train} == set(COLOURS)
    assert {t[2] for t in train} == set(PATTERNS)


def test_detector_tokenizer_puts_specials_at_the_ids_grounding_dino_hardcodes():
    from transformers.models.grounding_dino import modeling_grounding_dino as gd

    tok = bert_layout_tokenizer()
    ids = tok("lamp. shoe.")["input_ids"]
    assert ids[0] == tok.cls_token_id == BERT_SPECIAL_IDS["[CLS]"] == gd.SPECIAL_TOKENS[0]
    assert ids[-1] == tok.sep_token_id == gd.SPECIAL_TOKENS[1]
    assert ids[2] == ids[4] == gd.SPECIAL_TOKENS[2] and tok.pad_token_id == 0
    assert tok.unk_token_id not in ids and len(ids) == 6  # each category word is one token


def test_detection_loss_teaches_each_query_its_own_images_category_word():
    """Three prompts of different lengths in one batch: every matched query's class
    target is its object's category word in its own image's prompt (transformers' loss
    offsets the third image's phrases by its own phrase count and targets a word of
    another image's prompt)."""
    import torch
    from transformers.loss.loss_grounding_dino import GroundingDinoImageLoss
    from transformers.models.grounding_dino.modeling_grounding_dino import build_label_maps

    tok = bert_layout_tokenizer()
    prompts = ["lamp. shoe. dog. bag.", "car. toy.", "mug. hat. lamp."]
    objects = [["dog", "lamp"], ["toy"], ["hat", "lamp"]]
    enc = tok(prompts, padding=True, return_tensors="pt")
    logits = torch.zeros(3, 4, 64)
    label_maps = build_label_maps(logits, enc["input_ids"])
    targets = [{"class_labels": torch.tensor([p.rstrip(".").split(". ").index(c) for c in objs])}
               for p, objs in zip(prompts, objects)]
    indices = [(torch.arange(len(objs)), torch.arange(len(objs))) for objs in objects]
    outputs = {"logits": logits, "label_maps": label_maps}

    def words(onehot):
        out = []
        for i, objs in enumerate(objects):
            ids = enc["input_ids"][i]
            out.append([tok.decode(ids[onehot[i, q, : ids.shape[0]].bool()])
                        for q in range(len(objs))])
        return out

    assert words(_target_classes_one_hot(outputs, targets, indices)) == objects
    stock = GroundingDinoImageLoss(matcher=None, focal_alpha=0.25, losses=[])
    assert words(stock._get_target_classes_one_hot(outputs, targets, indices)) != objects


def test_fixed_detection_loss_equals_transformers_on_one_image():
    import random

    import torch

    from repic_ray.models.perception import GdinoTrainConfig, _gdino_model_and_processor, _gdino_sample

    model, processor = _gdino_model_and_processor(GdinoTrainConfig(d_model=32, num_queries=8))
    model.eval()
    img, prompt, target = _gdino_sample(random.Random(0), shape_categories(), 0.0)
    enc = processor(images=[img], text=[prompt], return_tensors="pt")
    with torch.no_grad():
        stock = model(**enc, labels=[target]).loss
        model.loss_function = gdino_detection_loss
        fixed = model(**enc, labels=[target]).loss
    assert torch.isclose(stock, fixed)


def test_category_map_marks_the_cells_inside_each_box_with_its_category():
    from repic_ray.models.perception import category_map

    # a large object (category 2) holding a small one (category 5) in its lower right
    m = category_map([(2, [0.0, 0.0, 0.75, 0.75]), (5, [0.5, 0.5, 0.75, 0.75])], 4, 4)
    assert m.tolist() == [[3, 3, 3, 0],
                          [3, 3, 3, 0],
                          [3, 3, 6, 0],
                          [0, 0, 0, 0]]


def test_the_category_map_loss_trains_a_head_the_checkpoint_does_not_keep(tmp_path):
    from repic_ray.models.perception import GdinoTrainConfig, train_gdino

    cfg = GdinoTrainConfig(steps=2, batch_size=2, d_model=32, num_queries=8, category_map_weight=5.0)
    out = train_gdino(tmp_path / "gd", cfg, log_every=1, eval_every=10_000)
    rows = [json.loads(x) for x in (out / "train_log.jsonl").read_text().splitlines()]
    assert all(r["loss_category_map"] > 0 for r in rows)
    _, model = load_detector(str(out))
    assert type(model).__name__ == "GroundingDinoForObjectDetection"


def test_box_distance_map_gives_each_inside_cell_its_distances_to_the_sides():
    from repic_ray.models.perception import box_distance_map

    dist, inside = box_distance_map([(0, [0.0, 0.0, 0.5, 0.5])], 4, 4)
    assert inside.int().tolist() == [[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]]
    assert dist[:, 0, 0].tolist() == [0.125, 0.125, 0.375, 0.375]  # left, top, right, bottom
    assert dist[:, 1, 1].tolist() == [0.375, 0.375, 0.125, 0.125]
    assert dist[:, 3, 3].tolist() == [0.0] * 4


def test_box_mean_averages_the_cells_a_box_covers():
    import torch

    from repic_ray.models.perception import _box_mean

    f = torch.arange(16.0).reshape(1, 4, 4)
    assert _box_mean(f, [0.0, 0.0, 0.5, 0.5]).item() == (0 + 1 + 4 + 5) / 4
    # a box smaller than a cell still reads the cell it starts in
    assert _box_mean(f, [0.76, 0.76, 0.8, 0.8]).item() == 15.0


def test_the_backbone_stage_trains_the_swin_before_detection_and_keeps_no_head(tmp_path):
    import torch

    from repic_ray.models.perception import GdinoTrainConfig, _gdino_model_and_processor, train_gdino

    # no detection steps: what changed in the saved detector, the backbone stage changed
    cfg = GdinoTrainConfig(steps=0, batch_size=2, d_model=32, num_queries=8, backbone_steps=3,
                           warmup=1)
    out = train_gdino(tmp_path / "gd", cfg, log_every=1, eval_every=10_000)
    rows = [json.loads(x) for x in (out / "train_log.jsonl").read_text().splitlines()]
    assert [r["stage"] for r in rows] == ["backbone"] * 3
    assert 0.0 <= rows[2]["object_accuracy"] <= 1.0
    _, model = load_detector(str(out))
    fresh, _ = _gdino_model_and_processor(cfg)
    # the saved detector has exactly the detector's parameters (no head), the Swin's changed
    assert set(model.state_dict()) == set(fresh.state_dict())
    name = "model.backbone.conv_encoder.model.swin.embeddings.patch_embeddings.projection.weight"
    torch.manual_seed(cfg.seed)
    fresh, _ = _gdino_model_and_processor(cfg)
    assert not torch.equal(model.state_dict()[name], fresh.state_dict()[name])


def test_shipped_checkpoints_resolve_from_any_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for spec in (SHIPPED_CLIP, SHIPPED_DETECTOR):
        assert resolve_checkpoint(spec) == str(PROJECT_ROOT / spec)
        assert (PROJECT_ROOT / spec / "config.json").exists()
        assert (PROJECT_ROOT / spec / "train_log.jsonl").exists()


def test_shipped_clip_retrieves_unseen_concepts():
    """Among 8 registered concepts of held-out triples, the nearest reference of a query
    object's crop is its own: the random tiny CLIP manages about half of that."""
    processor, model = load_clip(SHIPPED_CLIP)
    assert type(model).__name__ == "CLIPModel"
    acc = clip_retrieval_accuracy(model, processor, num_concepts=8, episodes=3,
                                  queries_per_episode=10, seed=5)
    assert acc >= 0.9


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    out = tmp_path_factory.mktemp("world")
    paths = generate_world(out, seed=3, num_train=0, num_sft=0, num_sft_aux=0,
                           num_eval_per_k=2)
    return paths


def test_every_world_uses_the_mapping_the_detector_learned(world, tmp_path):
    other = generate_world(tmp_path, seed=7, num_train=0, num_sft=0, num_sft_aux=0,
                           num_eval_per_k=0)
    for paths in (world, other):
        assert json.loads(paths.world.read_text())["shape_category"] == shape_categories()


def _iou(a, b):
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def test_shipped_detector_proposes_boxes_on_the_world_objects(world):
    """Its 4 best boxes for an image's categories lie on the image's objects (IoU >= 0.5
    with one; the random tiny detector 0 of 16)."""
    from repic_ray.serving.retriever import ConceptRetriever, RetrieverConfig

    detector, det_proc = load_detector(SHIPPED_DETECTOR)[::-1]
    assert type(detector).__name__ == "GroundingDinoForObjectDetection"
    clip_proc, clip = load_clip("tiny:clip")
    retriever = ConceptRetriever(RetrieverConfig(box_threshold=0.0, max_crops=4),
                                 detector=detector, detector_processor=det_proc, clip=clip,
                                 clip_processor=clip_proc)
    on_object = total = 0
    for k in (2, 3):
        for sample in load_samples(world.eval[k]):
            image = Image.open(sample.query_image).convert("RGB")
            boxes = retriever.detect(image, sorted({o["category"] for o in sample.objects}))
            total += len(boxes)
            on_object += sum(any(_iou(box, o["box"]) >= 0.5 for o in sample.objects)
                             for box, _ in boxes)
    assert total == 16 and on_object / total >= 0.75


def test_detect_categories_keeps_one_box_per_object_and_category():
    """Per-category NMS: every query's box without it (the tiny detector puts several
    queries on one object), and no two boxes of one category overlapping by more than
    IoU 0.5 with it, the best-scoring box of each object kept."""
    import random

    from repic_ray.models.perception import _box_iou, all_triples, detect_categories, draw_scene

    processor, model = load_detector(SHIPPED_DETECTOR)
    categories = sorted(set(shape_categories().values()))
    rng = random.Random(3)
    img, _ = draw_scene(rng, rng.sample(all_triples(), 5))
    every = detect_categories(model, processor, img, categories, nms_iou=None)
    kept = detect_categories(model, processor, img, categories)
    assert len(every) == model.config.num_queries and len(kept) < len(every)
    for i, a in enumerate(kept):
        assert a in every
        for b in kept[i + 1:]:
            assert a[0] != b[0] or _box_iou(a[2], b[2]) <= 0.5
    best = max(every, key=lambda d: d[1])
    assert best in kept


def test_shipped_detector_tells_the_categories_apart():
    """Prompted with all 8 category words, the best-scoring box on each object (IoU >= 0.5)
    carries the object's category word: a category-blind detector gets about 1 in 8 (the
    detector trained with transformers' batch offset of the class targets did)."""
    import random

    from repic_ray.models.perception import _box_iou, all_triples, detect_categories, draw_scene

    processor, model = load_detector(SHIPPED_DETECTOR)
    mapping = shape_categories()
    categories = sorted(set(mapping.values()))
    rng = random.Random(11)
    right = found = 0
    for _ in range(12):
        img, objects = draw_scene(rng, rng.sample(all_triples(), rng.randint(2, 5)))
        dets = detect_categories(model, processor, img, categories)
        for triple, box in objects:
            on = [d for d in dets if _box_iou(d[2], [float(v) for v in box]) >= 0.5]
            if on:
                found += 1
                right += max(on, key=lambda d: d[1])[0] == mapping[triple[0]]
    assert found >= 30 and right / found >= 0.6, (right, found)
