"""One data-parallel learner rank, run as a subprocess by test_data_parallel.py.

    python dp_worker.py RANK WORLD_SIZE PORT JOB.pt OUT.pt

JOB.pt holds `cfg` (LearnerConfig), `shards` (one TrainBatch per rank), `steps` and
`threads` (the parent's torch thread count);
OUT.pt receives this rank's TrainStats, exported LoRA tensors and final log-probs.
"""

from __future__ import annotations

import sys

import torch

from repic_ray.learner import LearnerEngine


def main(rank: int, world_size: int, port: int, job_path: str, out_path: str) -> None:
    job = torch.load(job_path, weights_only=False)
    torch.set_num_threads(job["threads"])
    learner = LearnerEngine(job["cfg"], rank=rank, world_size=world_size, master_port=port)
    batch = job["shards"][rank]
    stats = [learner.train_step(batch) for _ in range(job["steps"])]
    lora, _ = learner.export_lora()
    torch.save(
        {"stats": stats, "lora": lora, "logprobs": learner.compute_logprobs(batch)}, out_path
    )


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5])
