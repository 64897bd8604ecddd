"""The learner in bf16 on CPU (the 7B recipe's precision) agrees with fp32."""

from __future__ import annotations

import torch

from repic_ray.learner import LearnerEngine
from repic_ray.ports import free_port

from .helpers import tiny_config, train_batch, write_images


def test_bf16_learner_on_cpu_matches_fp32(tmp_path):
    images = write_images(tmp_path)
    runs = {}
    for dtype in ("fp32", "bf16"):
        learner = LearnerEngine(tiny_config(dtype=dtype), master_port=free_port())
        try:
            assert learner.device.type == "cpu"
            assert next(learner.module.parameters()).dtype == {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
            batch = train_batch(learner.processor, images, [1.0, -1.0, 0.5, -0.5])
            logprobs = learner.compute_logprobs(batch)
            batch.old_logprobs_BT = logprobs
            stats = [learner.train_step(batch) for _ in range(2)]
            runs[dtype] = (logprobs, batch.mask_BT.bool(), stats, learner.compute_logprobs(batch))
        finally:
            learner.close()
    (lp32, mask, st32, after32), (lp16, _, st16, after16) = runs["fp32"], runs["bf16"]
    # bf16 rounding of a 1M-parameter model: log-probs within 0.05 per token, 0.02 on average.
    diff = (lp32 - lp16).abs()[mask]
    assert diff.max() < 0.05 and diff.mean() < 0.02
    assert abs(st32[0].grad_norm - st16[0].grad_norm) < 0.02 * st32[0].grad_norm
    # Both updates moved the policy, by about the same amount.
    moved32, moved16 = (after32 - lp32).abs()[mask].mean(), (after16 - lp16).abs()[mask].mean()
    assert moved32 > 1e-3 and abs(moved16 - moved32) < 0.3 * moved32
