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
