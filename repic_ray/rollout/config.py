"""Settings of the rollout engines: how to build the inference engine, how to sample."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

LogprobsMode = Literal["processed_logprobs", "raw_logprobs"]


@dataclass
class SamplingConfig:
    """How completions are sampled (RePIC: 8 samples, temperature 1.0, 256 tokens)."""

    n: int = 8
    """Completions per prompt, used when a request does not set its own `n`. Derived: in an
    experiment's `sampling`, from `algo.group_size`."""
    temperature: float = 1.0
    """Sampling temperature in [0, 2] (vLLM's range); 0 means greedy decoding."""
    top_p: float = 1.0
    """Nucleus sampling mass in (0, 1]; 1 keeps the whole distribution."""
    max_tokens: int = 256
    """Most completion tokens per sample."""
    stop: list[str] = field(default_factory=list)
    """Strings that end a completion; the text is cut before them (token ids keep them)."""
    seed: int | None = None
    """Base seed. Set: each request's samples are reproducible, derived from the seed and the
    request uid (independent of batch order in vLLM). None: fresh randomness every call.
    Derived: in an experiment's `sampling`, from `trainer.seed`."""
    block_vision_tokens: bool = True
    """Never sample the vision special tokens (`<|image_pad|>`, `<|vision_start|>`, ...)."""
    greedy_member: bool = False
    """One of each prompt's `n` completions is decoded greedily (temperature 0), the rest
    sampled: the caption a user is served then gets a reward and an advantage in its group,
    as the greedy baseline of self-critical sequence training (Rennie et al., 2017) makes
    the sampled captions compete with it. Its log-probs are those of temperature 1, so the
    learner's `rollout/logprob_mismatch` is exact for it only at `temperature: 1`. vLLM
    engine only; needs n >= 2."""

    def __post_init__(self) -> None:
        if self.n < 1:
            raise ValueError(f"sampling.n must be >= 1, got {self.n}")
        if not 0 <= self.temperature <= 2:
            raise ValueError(f"sampling.temperature must be in [0, 2], got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"sampling.top_p must be in (0, 1], got {self.top_p}")
        if self.max_tokens < 1:
            raise ValueError(f"sampling.max_tokens must be >= 1, got {self.max_tokens}")
        if any(not s for s in self.stop):
            raise ValueError(f"sampling.stop must not contain empty strings, got {self.stop!r}")


@dataclass
class RolloutConfig:
    """The rollout (inference) engine: model, memory and engine limits, default sampling."""

    model: str = ""
    """Hugging Face checkpoint directory (or hub id) of the policy. Derived: in an
    experiment, from `learner.model` (the rollout serves the policy the learner trains)."""
    tokenizer: str | None = None
    """Tokenizer / processor directory; None uses `model`."""
    dtype: str = "bfloat16"
    """Weights and activations dtype: "bfloat16", "float16", "float32" or "auto"."""
    enable_lora: bool = True
    """Serve the policy as base weights plus a LoRA adapter that `update_lora` swaps."""
    max_lora_rank: int = 64
    """Largest LoRA rank the engine accepts (RePIC: r=64)."""
    max_model_len: int = 4096
    """Most tokens of prompt plus completion per sequence."""
    max_num_batched_tokens: int = 16384
    """Tokens prefilled per engine step (at least `max_model_len`). Prompts are never split
    across steps (chunked prefill is off), so a batch of any size works with any value."""
    max_num_seqs: int = 256
    """Most sequences decoded together."""
    limit_images_per_prompt: int = 5
    """Most images in one prompt (RePIC: up to 4 references plus the query image)."""
    kv_cache_gib: float | None = 1.0
    """KV cache size in GiB (vLLM `kv_cache_memory_bytes`). None: vLLM sizes it from
    `gpu_memory_utilization` (on CPU: that fraction of the machine's whole RAM)."""
    gpu_memory_utilization: float = 0.9
    """Fraction of GPU memory vLLM may use when `kv_cache_gib` is None (ignored on CPU)."""
    tensor_parallel_size: int = 1
    """Devices the model is sharded over."""
    logprobs_mode: LogprobsMode = "processed_logprobs"
    """"processed_logprobs": log-probs of the distribution actually sampled from (temperature,
    top_p and the vision-token block applied). "raw_logprobs": full-vocabulary log-softmax of the
    raw logits (temperature 1)."""
    enforce_eager: bool = True
    """Run the model eagerly: no torch.compile, no CUDA graphs. Faster to start; compiled
    runs faster per step (on CPU too: the tiny recipe sets False, 1.17x samples/s)."""
    seed: int = 0
    """Engine seed (initial sampler state). Derived: in an experiment, from `trainer.seed`."""
    mm_processor_kwargs: dict = field(default_factory=dict)
    """Extra image-processor arguments, e.g. {"min_pixels": 784, "max_pixels": 1003520}."""
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    """Default sampling settings of `generate`."""

    def __post_init__(self) -> None:
        if self.dtype not in ("bfloat16", "float16", "float32", "auto"):
            raise ValueError(f"rollout.dtype must be bfloat16/float16/float32/auto, got {self.dtype!r}")
        if self.max_lora_rank < 1:
            raise ValueError(f"rollout.max_lora_rank must be >= 1, got {self.max_lora_rank}")
        if self.max_model_len < 1:
            raise ValueError(f"rollout.max_model_len must be >= 1, got {self.max_model_len}")
        if self.max_num_batched_tokens < self.max_model_len:
            raise ValueError(
                f"rollout.max_num_batched_tokens ({self.max_num_batched_tokens}) must be >= "
                f"rollout.max_model_len ({self.max_model_len})"
            )
        if self.max_num_seqs < 1:
            raise ValueError(f"rollout.max_num_seqs must be >= 1, got {self.max_num_seqs}")
        if self.limit_images_per_prompt < 0:
            raise ValueError(
                f"rollout.limit_images_per_prompt must be >= 0, got {self.limit_images_per_prompt}"
            )
        if self.kv_cache_gib is not None and self.kv_cache_gib <= 0:
            raise ValueError(f"rollout.kv_cache_gib must be > 0, got {self.kv_cache_gib}")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError(
                f"rollout.gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}"
            )
        if self.tensor_parallel_size < 1:
            raise ValueError(
                f"rollout.tensor_parallel_size must be >= 1, got {self.tensor_parallel_size}"
            )
        if self.logprobs_mode not in ("processed_logprobs", "raw_logprobs"):
            raise ValueError(
                "rollout.logprobs_mode must be 'processed_logprobs' or 'raw_logprobs', "
                f"got {self.logprobs_mode!r}"
            )
