"""Two learner ranks (separate processes, gloo) on halves of a batch take the same
optimizer steps as one rank on the whole batch.

The loss is `token_mean`, whose normalizer (all tokens of the batch) each rank only
knows after an all-reduce: the halves here have different token counts, so a
per-rank normalization would give a different update.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from repic_ray.learner import LearnerEngine, LossConfig
from repic_ray.ports import free_port

from .helpers import tiny_config, train_batch, write_images

WORKER = Path(__file__).with_name("dp_worker.py")
STEPS = 2


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dp")
    images = write_images(tmp)
    cfg = tiny_config(zero_stage=2, loss=LossConfig(kl_beta=0.04, loss_agg="token_mean"))
    single = LearnerEngine(cfg, master_port=free_port())
    try:
        batch = train_batch(single.processor, images, [1.0, -1.0, 0.5, -0.5])
        batch.old_logprobs_BT = single.compute_logprobs(batch)
        shards = [batch.select([0, 1]), batch.select([2, 3])]
        assert shards[0].mask_BT.sum() != shards[1].mask_BT.sum()
        job = tmp / "job.pt"
        # The ranks use this process's thread count: a float sum split over another
        # number of threads rounds differently, and Adam turns that into visible steps.
        threads = torch.get_num_threads()
        torch.save({"cfg": cfg, "shards": shards, "steps": STEPS, "threads": threads}, job)

        # Both ranks must be in their setup at the same time to rendezvous.
        port = free_port()
        procs = [
            subprocess.Popen(
                [
                    sys.executable,
                    str(WORKER),
                    str(rank),
                    "2",
                    str(port),
                    str(job),
                    str(tmp / f"rank{rank}.pt"),
                ],
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
            for rank in range(2)
        ]
        for rank, proc in enumerate(procs):
            out, _ = proc.communicate(timeout=600)
            assert proc.returncode == 0, f"rank {rank} failed:\n{out[-4000:]}"

        stats = [single.train_step(batch) for _ in range(STEPS)]
        lora, _ = single.export_lora()
        reference = {"stats": stats, "lora": lora, "logprobs": single.compute_logprobs(batch)}
    finally:
        single.close()
    ranks = [torch.load(tmp / f"rank{r}.pt", weights_only=False) for r in range(2)]
    return reference, ranks, batch


def test_ranks_hold_identical_weights(runs):
    _, ranks, _ = runs
    for key in ranks[0]["lora"]:
        assert torch.equal(ranks[0]["lora"][key], ranks[1]["lora"][key]), key


def test_two_ranks_equal_one_rank_with_the_full_batch(runs):
    reference, ranks, _ = runs
    for key, want in reference["lora"].items():
        torch.testing.assert_close(ranks[0]["lora"][key], want, msg=key)
    assert any(v.abs().max() > 0 for k, v in reference["lora"].items() if "lora_B" in k)


def test_stats_are_global(runs):
    reference, ranks, batch = runs
    for rank in ranks:
        for got, want in zip(rank["stats"], reference["stats"]):
            assert got.tokens == want.tokens == int(batch.mask_BT.sum())
            for field in ("loss", "policy_loss", "kl", "entropy", "clip_frac", "grad_norm"):
                a, b = (torch.tensor(getattr(s, field), dtype=torch.float32) for s in (got, want))
                torch.testing.assert_close(a, b, msg=field)


def test_rank_logprobs_match_full_batch_rows(runs):
    reference, ranks, _ = runs
    for r, rows in enumerate(([0, 1], [2, 3])):
        got = ranks[r]["logprobs"]
        torch.testing.assert_close(got, reference["logprobs"][rows, : got.shape[1]])
