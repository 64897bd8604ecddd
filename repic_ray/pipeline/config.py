"""The experiment configuration: one dataclass tree for `repic train` and `repic sft`.

Sections owned by the core modules (learner, rollout, reward) are composed here
with the pipeline's own sections (data, algorithm, cluster, trainer, SFT stage).
YAML recipes under `configs/` override these defaults; see `repic_ray.config`.
"""

from __future__ import annotations

import os
from collections.abc import Collection
from dataclasses import dataclass, field
from typing import Literal

from repic_ray.data.synthetic import WorldConfig
from repic_ray.learner.config import LearnerConfig
from repic_ray.rewards import RewardConfig
from repic_ray.rollout.config import RolloutConfig, SamplingConfig

TASKS = ("yes_no", "yes_no_name", "yes_no_name_multi", "iou")


@dataclass
class DataConfig:
    world_dir: str | None = None
    """Directory of a synthetic world (`python -m repic_ray.data.synthetic --out DIR`).
    When None and no real-data paths are given, a world is generated under
    `$REPIC_CACHE/worlds/` from `world` below (cached by its settings)."""
    world: WorldConfig = field(default_factory=WorldConfig)
    """The synthetic world generated (and cached) when neither `world_dir` nor real-data
    paths are given (`repic_ray.data.synthetic.WorldConfig`: seed, concepts, name mode,
    sample counts)."""
    train_file: str | None = None
    """RePIC-format training samples (JSON / JSONL) of a real dataset; overrides the world."""
    sft_file: str | None = None
    """SFT samples of a real dataset."""
    eval_dir: str | None = None
    """Directory holding `concepts_{k}.json` evaluation splits of a real dataset."""
    concept_db: str | None = None
    """Concept database (RAP/RePIC `concept_dict` schema) of a real dataset."""
    train_tasks: list[str] = field(default_factory=lambda: ["yes_no_name", "yes_no_name_multi"])
    """Which `accu_reward_method`s of the training file to train on."""
    eval_ks: list[int] = field(default_factory=lambda: [1, 2, 3, 4, 5])
    """Concept counts whose evaluation splits are run."""
    eval_max_per_k: int = 30
    """At most this many evaluation images per split (0 = all)."""

    def __post_init__(self) -> None:
        bad = [t for t in self.train_tasks if t not in TASKS]
        if bad or not self.train_tasks:
            raise ValueError(f"train_tasks must be a non-empty subset of {list(TASKS)}, got {self.train_tasks}")
        if any(k < 1 or k > 5 for k in self.eval_ks):
            raise ValueError(f"eval_ks must be within 1..5, got {self.eval_ks}")


@dataclass
class AlgoConfig:
    estimator: Literal["grpo", "drgrpo", "rloo", "reinforce_pp", "gae"] = "grpo"
    """Advantage estimator. `grpo`: (r - group mean) / (group std + eps) (RePIC);
    `drgrpo`: without the std; `rloo`; `reinforce_pp`: batch-normalized;
    `gae`: PPO with the learner's value head."""
    group_size: int = 8
    """Samples (generations) per prompt, G. RePIC: 8."""
    prompts_per_step: int = 8
    """Prompts per training step, P; a step trains on P x G sequences."""
    std_eps: float = 1e-4
    """Epsilon in the GRPO std normalization (RePIC: 1e-4)."""
    gamma: float = 1.0
    """Discount for GAE / REINFORCE++."""
    lam: float = 0.95
    """GAE lambda."""
    kl_in_reward: bool = False
    """Fold the KL-to-reference into the token rewards (REINFORCE++/PPO style) instead
    of the loss (`learner.loss.kl_beta`, GRPO style)."""
    kl_reward_beta: float = 0.0
    """Beta of the KL folded into the reward when `kl_in_reward`."""
    updates_per_batch: int = 1
    """Optimizer passes over each rollout batch (PPO epochs); 1 = on-policy GRPO."""
    mode: Literal["sync", "async"] = "sync"
    """`sync`: generate with the newest weights (RePIC). `async`: one-step off-policy:
    generation and reward scoring of step t+1 overlap the update of step t; the importance
    ratio uses the rollout-time log-probs and staleness is logged."""
    ptx_coef: float = 0.0
    """Supervised cross-entropy on the SFT data mixed into every RL update: loss = RL loss
    + ptx_coef x token-mean cross-entropy of `ptx_batch_size` SFT samples, in the same
    optimizer step (InstructGPT's PPO-ptx, OpenRLHF's `--ptx_coef`). It holds the warm
    start's captions where the reward alone would pull the text away. 0 = off."""
    ptx_batch_size: int = 16
    """SFT samples per update when `ptx_coef` > 0 (split over the learner ranks)."""
    ptx_tasks: list[str] = field(default_factory=lambda: ["caption"])
    """Which SFT sample kinds (`task` in the world's sft.jsonl) the ptx term trains on."""

    def __post_init__(self) -> None:
        if self.ptx_coef < 0 or self.ptx_batch_size < 1:
            raise ValueError("algo: ptx_coef >= 0 and ptx_batch_size >= 1 required")
        if self.group_size < 1 or self.prompts_per_step < 1:
            raise ValueError("group_size and prompts_per_step must be >= 1")
        if self.estimator in ("grpo", "drgrpo", "rloo") and self.group_size < 2:
            raise ValueError(f"estimator {self.estimator!r} needs group_size >= 2")
        if self.updates_per_batch < 1:
            raise ValueError(f"updates_per_batch must be >= 1, got {self.updates_per_batch}")


@dataclass
class RoleResources:
    num_cpus: float = 1.0
    """CPUs reserved per actor of this role."""
    num_gpus: float = 0.0
    """GPUs per actor of this role (rollout: times tensor_parallel_size is reserved)."""
    resources: dict[str, float] = field(default_factory=dict)
    """Custom Ray resources per actor (e.g. `{"rollout_node": 1}` to pin a role to nodes)."""
    num_threads: int = 0
    """CPU threads of each actor of this role (0 = one per reserved CPU, at least one: each
    actor starts with OMP_NUM_THREADS set to it, whatever the environment that started the
    cluster holds; a rollout worker's vLLM engine binds this many cores). Measured on 2 cores, tiny recipe,
    sync mode: 2 learner threads train a batch in 0.59 s alone (1 thread: 0.87 s) but
    10-12 s inside the pipeline, and 2 vLLM threads generate in 1.5 s (1: 0.56 s): vLLM's
    CPU worker busy-polls its core for ~1 s after every call and wants a core of its own
    for the engine loop, so threads beyond the reserved CPUs fight over cores."""

    def __post_init__(self) -> None:
        if self.num_cpus < 0 or self.num_gpus < 0 or self.num_threads < 0:
            raise ValueError("num_cpus, num_gpus and num_threads must be >= 0")


@dataclass
class ClusterConfig:
    address: str | None = "local"
    """`local` starts a private local cluster; `auto` or `ray://host:port` joins one."""
    num_cpus: int | None = None
    """CPUs of the local cluster (None = detected); ignored when joining."""
    num_rollout_workers: int = 1
    """vLLM rollout workers, N."""
    num_reward_actors: int = 1
    """Reward actors, M."""
    num_learners: int = 1
    """DeepSpeed learner ranks, K (data parallel)."""
    rollout: RoleResources = field(default_factory=lambda: RoleResources(num_cpus=1))
    """Resources per rollout worker."""
    reward: RoleResources = field(default_factory=lambda: RoleResources(num_cpus=0.5))
    """Resources per reward actor."""
    learner: RoleResources = field(default_factory=lambda: RoleResources(num_cpus=1))
    """Resources per learner rank."""
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"
    """Placement-group strategy of each role's bundles."""
    weight_sync: Literal["lora", "full"] = "lora"
    """What the learner sends to rollout workers after each update: LoRA tensors (no
    merge) or merged full weights (through the object store)."""
    placement_timeout_s: float = 600.0
    """How long to wait for a role's placement group before failing with the cluster's
    resources in the message (a role demanding resources no node has never places)."""
    max_actor_restarts: int = 3
    """Restarts of a rollout worker or reward actor, and recoveries of the learner group
    from its last checkpoint, before the run fails with a message naming the role."""
    master_port: int = 0
    """Port of the learners' process group (0 = pick a free one)."""
    sync_learner_takes_rollout_cpus: bool = False
    """Sync mode on a private local cluster (`address: local`) with one CPU learner and
    `learner.num_threads` 0: the learner's torch threads also take the CPUs the rollout
    workers reserve, idle while it trains (generation and the update alternate). Measured on
    2 cores, tiny recipe, 4 x 8 samples (`bench/bench_rl_step.py`): train phase 0.54 -> 0.38 s,
    step 1.01 -> 0.92 s. Ignored in async mode, where generation runs beside the update (2
    learner threads there: step 0.66 -> 1.16 s)."""

    def learner_threads(self, mode: str, cpus: int | None = None) -> int:
        """Torch threads of each learner rank (0: one per reserved CPU) for
        `algo.mode` `mode` on a node of `cpus` cores (None: the local cluster's `num_cpus`,
        else this machine's)."""
        if cpus is None:
            cpus = self.num_cpus or os.cpu_count() or 1
        res = self.learner
        if res.num_threads or not self.sync_learner_takes_rollout_cpus:
            return res.num_threads
        if mode != "sync" or self.address != "local" or self.num_learners != 1 or res.num_gpus > 0:
            return 0
        taken = res.num_cpus + self.rollout.num_cpus * self.num_rollout_workers
        return max(1, min(int(taken), cpus))

    def __post_init__(self) -> None:
        for name in ("num_rollout_workers", "num_reward_actors", "num_learners"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")


@dataclass
class TrainerConfig:
    steps: int = 20
    """RL training steps."""
    output_dir: str = "runs/{name}"
    """Where metrics, checkpoints, evaluation and the report go (`{name}` = experiment name)."""
    eval_every: int = 0
    """Evaluate on the held-out splits every N steps (0 = only before and after)."""
    eval_before: bool = True
    """Evaluate the starting policy before the first step."""
    checkpoint_every: int = 10
    """Save learner + optimizer + driver state every N steps (0 = only at the end)."""
    keep_checkpoints: int = 2
    """How many recent checkpoints to keep."""
    resume: bool = False
    """Continue from the newest checkpoint in `output_dir`."""
    seed: int = 0
    """The one seed of a run: prompt order and suffixes, and (derived from it) `sampling.seed`,
    `rollout.seed` and `learner.seed`."""
    tensorboard: bool = True
    """Write TensorBoard event files beside the JSONL metrics."""
    progress_bar: bool = True
    """Show a progress bar on stderr."""
    verbose: bool = False
    """Library logs (vLLM, Ray, DeepSpeed, transformers, warnings) on the console too; by
    default they go only to `{output_dir}/log.txt` (`repic train --verbose` sets this)."""
    drift_length_tolerance: float = 0.5
    """Warn when the mean rollout length leaves the first steps' mean by more than this
    fraction (`response/length_drift` in the metrics)."""
    drift_rep4_rise: float = 0.1
    """Warn when the rollouts' repeated-4-gram rate rises more than this above the first
    steps' rate (`response/repeated_4gram_drift`)."""

    def __post_init__(self) -> None:
        if self.steps < 0:
            raise ValueError(f"steps must be >= 0, got {self.steps}")


@dataclass
class SFTConfig:
    steps: int = 0
    """SFT warm-start steps before RL (0 = start RL from `learner.model` as is)."""
    batch_size: int = 16
    """Sequences per SFT step."""
    lr: float = 1e-3
    """SFT learning rate (the learner's optimizer, same engine)."""
    full_finetune: bool = True
    """Train all language-model weights in SFT (LoRA settings apply to RL only)."""
    name_token_weight: float = 1.0
    """Up-weight the cross-entropy of concept-name tokens by this factor."""
    tasks: list[str] = field(default_factory=lambda: ["caption"])
    """Which SFT sample kinds to train on (as written in the SFT file's `task`)."""
    output: str | None = None
    """Where the SFT checkpoint is written (default `{output_dir}/sft`)."""
    log_every: int = 50
    """Log SFT loss every N steps."""
    save_every: int = 0
    """Also write the checkpoint every N steps (0 = only at the end)."""
    num_threads: int = 0
    """Torch intra-op threads of the SFT process (0 = torch's default). On a small,
    shared CPU machine 1 thread avoids oversubscription (measured 4x faster here)."""
    bare_layout_steps: int = 0
    """Curriculum: the first N steps show each sample in the bare layout (each reference
    image directly followed by its name, then the query image, then the target; no chat
    template, no question), the rest in the real prompt. A small language model learns
    to bind names to images in the bare layout first and then carries it over to the
    chat template, which it does not learn from the start (see BENCHMARKS.md, G2)."""

    def __post_init__(self) -> None:
        if self.steps < 0 or self.batch_size < 1 or self.lr <= 0:
            raise ValueError("sft: steps >= 0, batch_size >= 1 and lr > 0 required")
        if self.bare_layout_steps < 0:
            raise ValueError(f"sft.bare_layout_steps must be >= 0, got {self.bare_layout_steps}")


@dataclass
class VisionPretrainConfig:
    """`repic pretrain-vision`: supervised pretraining of the vision tower on the world's
    boxes and attributes (`repic_ray.pipeline.pretrain_vision`)."""

    steps: int = 0
    """Optimizer steps (0 = no vision pretraining)."""
    batch_size: int = 16
    """Query images per step (each 9 vision tokens, one per grid cell); as many centred
    reference images ride along."""
    lr: float = 3e-4
    """AdamW learning rate of the tower and the attribute heads."""
    output: str | None = None
    """Where the checkpoint (the whole policy, tower trained) is written (default
    `{output_dir}/vision`)."""
    log_every: int = 100
    """Log loss and head accuracy every N steps."""
    eval_every: int = 500
    """Measure the G1 gate (nearest reference on held-out triples) every N steps."""
    eval_episodes: int = 400
    """Episodes of the G1 gate measurement."""
    num_threads: int = 0
    """Torch intra-op threads (0 = torch's default)."""
    language_init: str = "keep"
    """The language model written with the tower: `keep` (as loaded) or `torch` (its
    linear layers, token embeddings and output layer re-initialised at PyTorch's
    defaults: Kaiming-uniform, normal(0, 1) embeddings; seeded by `trainer.seed`).
    Measured (`bench/g2_probe.py`): a 4-layer hidden-128 language model at the Hugging
    Face init (normal, std 0.02) stays at chance on in-context binding (which
    reference's name goes with the query object); at PyTorch's defaults it learns it
    (DESIGN.md, BENCHMARKS.md "Gates")."""

    def __post_init__(self) -> None:
        if self.language_init not in ("keep", "torch"):
            raise ValueError(f"pretrain_vision.language_init: expected keep or torch, got {self.language_init!r}")
        if self.steps < 0 or self.batch_size < 1 or self.lr <= 0 or self.eval_episodes < 1:
            raise ValueError(
                "pretrain_vision: steps >= 0, batch_size >= 1, lr > 0, eval_episodes >= 1 required")


@dataclass
class ExperimentConfig:
    name: str = "repic"
    """Experiment name (used in `trainer.output_dir`)."""
    data: DataConfig = field(default_factory=DataConfig)
    """Training and evaluation data."""
    learner: LearnerConfig = field(default_factory=LearnerConfig)
    """Policy, LoRA, DeepSpeed and loss settings of the learner."""
    rollout: RolloutConfig = field(default_factory=lambda: RolloutConfig(limit_images_per_prompt=8))
    """vLLM engine settings of each rollout worker (8 images per prompt: the default world's
    largest prompt, 5 present and 2 absent concepts' references, then the query)."""
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    """Sampling settings of training rollouts."""
    eval_sampling: SamplingConfig = field(default_factory=lambda: SamplingConfig(n=1, temperature=0.0))
    """Sampling settings of evaluation (greedy by default)."""
    reward: RewardConfig = field(default_factory=RewardConfig)
    """Reward components and weights."""
    algo: AlgoConfig = field(default_factory=AlgoConfig)
    """Advantage estimator and step shape."""
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    """Ray cluster and per-role resources."""
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    """Loop length, evaluation, checkpoints, logging."""
    sft: SFTConfig = field(default_factory=SFTConfig)
    """Supervised warm start (`repic sft`, or a stage of `repic train` when steps > 0)."""
    pretrain_vision: VisionPretrainConfig = field(default_factory=VisionPretrainConfig)
    """Vision-tower pretraining (`repic pretrain-vision`)."""

    def __post_init__(self) -> None:
        if not self.name or "/" in self.name:
            raise ValueError(f"name must be a non-empty string without '/', got {self.name!r}")

    def resolved(self, explicit: Collection[str] = ()) -> ExperimentConfig:
        """A copy with derived fields filled and cross-section rules checked
        (`repic_ray.pipeline.resolve.resolve`); run by `load_config`."""
        from repic_ray.pipeline.resolve import resolve

        return resolve(self, explicit)

    @property
    def output_dir(self) -> str:
        """Derived: `trainer.output_dir` with `{name}` filled in."""
        return self.trainer.output_dir.format(name=self.name)
