"""Settings of the DeepSpeed learner: model, LoRA, optimizer, loss and critic."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from repic_ray.rl.kl import KL_ESTIMATORS
from repic_ray.rl.losses import AGG_MODES

LM_LORA_TARGET = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"


@dataclass
class LoraConfig:
    enabled: bool = True
    """Train a LoRA adapter on the frozen base; False means full fine-tuning."""
    r: int = 64
    """LoRA rank."""
    alpha: float = 128.0
    """LoRA alpha; the update is scaled by alpha / r."""
    dropout: float = 0.05
    """Dropout on the LoRA input during training (not during log-prob evaluation)."""
    target_modules: str = LM_LORA_TARGET
    """Regex (peft `target_modules` as a string) over full module names. The default
    matches the language model only: the vision blocks also have gate/up/down_proj."""

    def __post_init__(self) -> None:
        if self.r < 1:
            raise ValueError(f"lora.r must be >= 1, got {self.r}")
        if self.alpha <= 0:
            raise ValueError(f"lora.alpha must be > 0, got {self.alpha}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"lora.dropout must be in [0, 1), got {self.dropout}")
        if not self.target_modules:
            raise ValueError("lora.target_modules must not be empty")


@dataclass
class LossConfig:
    clip_low: float = 0.2
    """PPO ratio clip below: ratio >= 1 - clip_low."""
    clip_high: float = 0.2
    """PPO ratio clip above: ratio <= 1 + clip_high (DAPO's clip-higher uses 0.28)."""
    dual_clip: float | None = None
    """Dual-clip constant c > 1 bounding the loss of negative-advantage tokens; None = off."""
    kl_beta: float = 0.04
    """Weight of the KL(policy || reference) term in the loss; 0 skips the reference pass."""
    kl_estimator: str = "k3"
    """KL estimator in the loss: k1, k2 or k3 (RePIC/GRPO use k3)."""
    loss_agg: str = "seq_mean_token_mean"
    """How token losses become one number: seq_mean_token_mean (mean per sequence, then
    over sequences; RePIC), token_mean (DAPO) or seq_mean_token_sum_norm (Dr.GRPO). The
    learner normalizes over the whole batch on all ranks, so micro-batching and data
    parallelism do not change the loss."""
    max_len: int | None = None
    """Generation budget dividing each sequence's token sum in seq_mean_token_sum_norm."""
    temperature: float = 1.0
    """Sampling temperature of the behaviour policy: logits are divided by it so the
    learner's log-probs are those the rollout sampled from. Derived: in an experiment,
    from `sampling.temperature`."""
    block_vision_tokens: bool = True
    """Add the rollout engines' -100 logit bias to the vision special tokens (they never
    sample them), so learner and rollout log-probs agree. Derived: in an experiment, from
    `sampling.block_vision_tokens`."""
    entropy_coef: float = 0.0
    """Entropy bonus weight (loss -= entropy_coef * entropy)."""
    name_token_weight: float = 1.0
    """SFT only: cross-entropy weight of target tokens listed in the batch's
    `upweight_token_ids` (concept names; x5-20 speeds up learning to copy names)."""

    def __post_init__(self) -> None:
        if not 0.0 <= self.clip_low < 1.0:
            raise ValueError(f"loss.clip_low must be in [0, 1), got {self.clip_low}")
        if self.clip_high < 0.0:
            raise ValueError(f"loss.clip_high must be >= 0, got {self.clip_high}")
        if self.dual_clip is not None and self.dual_clip <= 1.0:
            raise ValueError(f"loss.dual_clip must be > 1 or null, got {self.dual_clip}")
        if self.kl_beta < 0.0:
            raise ValueError(f"loss.kl_beta must be >= 0, got {self.kl_beta}")
        if self.kl_estimator not in KL_ESTIMATORS:
            raise ValueError(
                f"loss.kl_estimator must be one of {KL_ESTIMATORS}, got {self.kl_estimator!r}"
            )
        if self.loss_agg not in AGG_MODES:
            raise ValueError(f"loss.loss_agg must be one of {AGG_MODES}, got {self.loss_agg!r}")
        if self.max_len is not None and self.max_len < 1:
            raise ValueError(f"loss.max_len must be >= 1 or null, got {self.max_len}")
        if self.loss_agg == "seq_mean_token_sum_norm" and self.max_len is None:
            raise ValueError("loss.max_len is required with loss_agg seq_mean_token_sum_norm")
        if self.temperature <= 0.0:
            raise ValueError(f"loss.temperature must be > 0, got {self.temperature}")
        if self.name_token_weight <= 0.0:
            raise ValueError(f"loss.name_token_weight must be > 0, got {self.name_token_weight}")


@dataclass
class CriticConfig:
    enabled: bool = False
    """Add a scalar value head on the policy's last hidden state (PPO with GAE); the
    backbone (and its LoRA) is shared with the policy."""
    lr: float = 1e-4
    """Learning rate of the value head's parameters."""
    value_clip: float | None = 0.2
    """Clip the new value to old_value +- value_clip in the value loss; None = unclipped."""
    value_coef: float = 0.5
    """Weight of the value loss added to the policy loss."""

    def __post_init__(self) -> None:
        if self.lr <= 0.0:
            raise ValueError(f"critic.lr must be > 0, got {self.lr}")
        if self.value_clip is not None and self.value_clip <= 0.0:
            raise ValueError(f"critic.value_clip must be > 0 or null, got {self.value_clip}")
        if self.value_coef < 0.0:
            raise ValueError(f"critic.value_coef must be >= 0, got {self.value_coef}")


@dataclass
class LearnerConfig:
    model: str = "tiny:qwen2.5-vl"
    """Policy checkpoint spec for `repic_ray.models.loading` (a directory, a hub id or
    `tiny:qwen2.5-vl`)."""
    lora: LoraConfig = field(default_factory=LoraConfig)
    """LoRA adapter settings (`lora.enabled: false` = full fine-tuning)."""
    freeze_vision: bool = True
    """Keep the vision tower frozen in full fine-tuning (training it collapsed the tiny
    model's features). LoRA never targets it with the default regex."""
    zero_stage: int = 2
    """DeepSpeed ZeRO stage: 0, 1, 2 or 3."""
    zero3_persistence_threshold: int = 100_000
    """ZeRO-3 only: parameters with fewer elements stay whole on every rank (DeepSpeed's
    `stage3_param_persistence_threshold`); 0 partitions every parameter."""
    dtype: Literal["fp32", "bf16"] = "fp32"
    """Training precision: fp32 on CPU, bf16 on GPU."""
    lr: float = 1e-5
    """Peak learning rate (AdamW) of the policy parameters."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    """AdamW betas."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this value; 0 = no clipping."""
    warmup_steps: int = 0
    """Linear warm-up of the learning rate from 0 over this many optimizer steps."""
    micro_batch_size: int = 4
    """Sequences per forward/backward; a batch of B runs ceil(B / micro) micro-batches
    accumulated into ONE optimizer step."""
    gradient_checkpointing: bool = False
    """Recompute activations in backward (saves memory, costs ~30% time)."""
    shared_prompt_forward: bool = True
    """Run each distinct prompt (images included) once per micro-batch and the completions
    of its group on its cached keys and values, instead of the whole prompt once per
    sequence: the same log-probs and gradients (up to float rounding) with a GRPO group's
    prompt computed once instead of G times. Not used while training with
    `gradient_checkpointing` (Hugging Face drops the cache under checkpointing)."""
    seed: int = 0
    """Seed for LoRA/value-head initialization and dropout. Derived: in an experiment, from
    `trainer.seed`."""
    loss: LossConfig = field(default_factory=LossConfig)
    """Policy-loss settings."""
    critic: CriticConfig = field(default_factory=CriticConfig)
    """Value head for PPO."""

    def __post_init__(self) -> None:
        if not self.model:
            raise ValueError("model must name a checkpoint spec")
        if self.zero_stage not in (0, 1, 2, 3):
            raise ValueError(f"zero_stage must be 0, 1, 2 or 3, got {self.zero_stage}")
        if self.zero3_persistence_threshold < 0:
            raise ValueError(
                f"zero3_persistence_threshold must be >= 0, got {self.zero3_persistence_threshold}"
            )
        if self.dtype not in ("fp32", "bf16"):
            raise ValueError(f"dtype must be 'fp32' or 'bf16', got {self.dtype!r}")
        if self.lr <= 0.0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if self.weight_decay < 0.0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay}")
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise ValueError(f"betas must be two numbers in [0, 1), got {self.betas}")
        if self.grad_clip < 0.0:
            raise ValueError(f"grad_clip must be >= 0, got {self.grad_clip}")
        if self.warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {self.warmup_steps}")
        if self.micro_batch_size < 1:
            raise ValueError(f"micro_batch_size must be >= 1, got {self.micro_batch_size}")
