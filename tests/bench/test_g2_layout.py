"""bench/g2_layout.py: the name-before-image prompt layout."""

from __future__ import annotations

import pytest


def test_name_first_layout_puts_each_name_before_its_image():
    from bench.g2_layout import name_first_messages

    (turn,) = name_first_messages(["a.png", "b.png", "q.png"], ["Garfu", "Funmi"], "Who is in the image?")
    parts = [(c["type"], c.get("text") or c.get("image")) for c in turn["content"]]
    assert parts == [("text", "This is <Garfu>:"), ("image", "a.png"), ("text", "This is <Funmi>:"),
                     ("image", "b.png"), ("text", "\n"), ("image", "q.png"), ("text", "Who is in the image?")]
    with pytest.raises(ValueError, match="reference names"):
        name_first_messages(["a.png", "q.png"], ["Garfu", "Funmi"], "?")


def test_identity_deepening_doubles_the_layers_and_keeps_the_function(tiny_qwen_dir, tmp_path):
    import torch

    from bench.g2_layout import deepen
    from repic_ray.models.loading import load_policy

    deepen(str(tiny_qwen_dir), str(tmp_path / "deep"), identity=True)
    base, deep = load_policy(str(tiny_qwen_dir)), load_policy(str(tmp_path / "deep"))
    n = base.config.text_config.num_hidden_layers
    assert deep.config.text_config.num_hidden_layers == len(deep.model.language_model.layers) == 2 * n
    ids = torch.randint(0, 1000, (1, 12))
    with torch.no_grad():
        torch.testing.assert_close(deep(input_ids=ids).logits, base(input_ids=ids).logits)
    inserted = deep.model.language_model.layers[1]
    assert not inserted.self_attn.o_proj.weight.any() and not inserted.mlp.down_proj.weight.any()
    assert inserted.self_attn.q_proj.weight.any()  # the rest is the copied layer, to learn from
