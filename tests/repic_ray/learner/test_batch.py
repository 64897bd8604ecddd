"""TrainBatch / SFTBatch validation and helpers (no model)."""

from __future__ import annotations

import pytest
import torch

from repic_ray.learner import SFTBatch, TrainBatch, completion_mask


def _batch(**kw) -> TrainBatch:
    base = {
        "prompt_texts": ["p0", "p1"],
        "image_paths": [["a.png"], []],
        "completion_ids": [[5, 6, 7], [8]],
        "old_logprobs_BT": torch.zeros(2, 3),
        "advantages_BT": torch.tensor([1.0, -1.0]),
    }
    base.update(kw)
    return TrainBatch(**base)


def test_advantages_B_broadcast_over_tokens():
    b = _batch()
    torch.testing.assert_close(b.advantages_BT, torch.tensor([[1.0, 1.0, 1.0], [-1.0, -1.0, -1.0]]))
    torch.testing.assert_close(b.mask_BT, torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]]))


def test_select_cuts_tensors_to_the_sub_batch_width():
    b = _batch(ref_logprobs_BT=torch.arange(6.0).reshape(2, 3))
    sub = b.select([1])
    assert sub.completion_ids == [[8]] and sub.image_paths == [[]]
    torch.testing.assert_close(sub.ref_logprobs_BT, torch.tensor([[3.0]]))
    torch.testing.assert_close(sub.advantages_BT, torch.tensor([[-1.0]]))


@pytest.mark.parametrize(
    "kw, match",
    [
        ({"image_paths": [["a.png"]]}, "image_paths: expected 2 entries"),
        ({"completion_ids": [[5, 6, 7], []]}, r"completion_ids\[1\]: expected a non-empty list"),
        (
            {"completion_ids": [[5, -1], [8]]},
            r"completion_ids\[0\]: token ids must be non-negative",
        ),
        ({"old_logprobs_BT": torch.zeros(2, 4)}, r"old_logprobs_BT: expected shape \(2, 3\)"),
        ({"advantages_BT": torch.zeros(3)}, r"advantages_BT: expected shape \(2, 3\) or \(2,\)"),
        ({"returns_BT": torch.full((2, 3), float("nan"))}, "returns_BT: contains NaN"),
        ({"prompt_texts": [], "image_paths": [], "completion_ids": []}, "empty batch"),
    ],
)
def test_bad_batches_name_the_field(kw, match):
    with pytest.raises(ValueError, match=match):
        _batch(**kw)


def test_sft_token_weights():
    b = SFTBatch(["p0", "p1"], [[], []], [[5, 9, 5], [9, 7]], upweight_token_ids=[[5], [7]])
    # row 0: tokens 5, 9, 5 -> 5 is up-weighted; row 1: 9, 7, pad -> 7 is up-weighted
    torch.testing.assert_close(
        b.token_weights_BT(10.0), torch.tensor([[10.0, 1.0, 10.0], [1.0, 10.0, 0.0]])
    )
    torch.testing.assert_close(b.token_weights_BT(1.0), b.mask_BT)
    assert b.select([1]).upweight_token_ids == [[7]]


def test_completion_mask_width():
    torch.testing.assert_close(
        completion_mask([[1], [1, 2]], width=3), torch.tensor([[1.0, 0, 0], [1, 1, 0]])
    )
