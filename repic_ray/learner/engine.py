"""The learner: one DeepSpeed engine around the policy (LoRA or full weights).

`LearnerEngine` is a plain class; the Ray pipeline runs K of them as actors,
data-parallel over gloo (CPU) or NCCL (GPU), each on its share of the batch. It
implements RePIC's GRPO update (PPO-clipped surrogate with a k3 KL to the reference
inside the loss, sequence-mean-token-mean aggregation), PPO with a value head on the
shared backbone, and SFT (cross-entropy on target tokens, optionally up-weighting
name tokens).

- The reference policy is the same network with the LoRA adapter disabled, or a
  frozen copy of the initial weights in full fine-tuning.
- One `train_step` call = one optimizer step over the whole batch: the batch is cut
  into micro-batches whose gradients accumulate, and every loss is normalized by the
  batch's global size (sequences or tokens, all-reduced over ranks), so the update is
  the same for any micro-batch size and any number of ranks.
- Log-probs come from the model's last hidden states at the completion positions
  only (the lm_head never sees the prompt), with Qwen2.5-VL's 3D M-RoPE positions
  built from `mm_token_type_ids`.
- Shared prompts (`shared_prompt_forward`): the sequences of a GRPO group share their
  prompt, so each distinct prompt of a micro-batch runs once (vision tower included)
  and the completions run on its keys and values, gathered per row; gradients flow
  through the gathered cache into the prompt's forward.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import random
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from repic_ray.data.images import load_image
from repic_ray.learner.batch import SFTBatch, TrainBatch, TrainStats
from repic_ray.learner.config import LearnerConfig
from repic_ray.learner.export import lora_state_dict, merged_state_dict
from repic_ray.models.loading import vision_special_token_ids
from repic_ray.rl.losses import (
    LossSettings,
    aggregate_loss,
    entropy_from_logits,
    policy_loss,
    value_loss,
)

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
_PROMPT_CACHE_SIZE = 256


@dataclasses.dataclass
class ModelInputs:
    """A right-padded batch ready for the model: `[prompt][completion][pad]` per row."""

    inputs: dict[str, torch.Tensor]
    """input_ids / attention_mask / mm_token_type_ids (B, L), pixel_values, image_grid_thw."""
    positions_BT: torch.Tensor
    """Index into L of the position whose logits predict completion token t."""
    targets_BT: torch.Tensor
    """Completion token ids, 0 on padding."""
    mask_BT: torch.Tensor
    """1.0 on completion tokens, 0.0 on padding."""
    shared: SharedPrompts | None = None
    """Set in shared-prompt mode: then `inputs` holds the distinct prompts only."""


@dataclasses.dataclass
class SharedPrompts:
    """A micro-batch as distinct prompts plus completions: `prompt_of_B[b]` is the row of
    `ModelInputs.inputs` (U distinct prompts, right-padded) that sequence b continues."""

    prompt_of_B: torch.Tensor
    """(B,) index of each sequence's prompt."""
    prompt_len_U: torch.Tensor
    """(U,) tokens of each prompt (without padding)."""
    completion_ids_BT: torch.Tensor
    """(B, T) completion tokens, right-padded with the pad id."""


#: Logit bias of never-sampled tokens: vLLM's largest allowed bias, as the rollout uses.
BLOCKED_TOKEN_BIAS = -100.0


class PolicyWithValue(nn.Module):
    """The trained module: the policy (peft-wrapped or plain) plus an optional value
    head on its last hidden state. Its forward returns logits (and values) at the
    completion positions only."""

    def __init__(
        self,
        policy: nn.Module,
        value_head: nn.Module | None = None,
        blocked_token_ids: Sequence[int] = (),
        vocab_size: int = 0,
    ):
        super().__init__()
        self.policy = policy
        self.value_head = value_head
        # The rollout engines add a -100 logit bias to tokens they never sample (the
        # vision special tokens); the learner adds the same bias, so its log-probs are
        # those of the distribution the rollout sampled from.
        bias_V = torch.zeros(vocab_size or 1)
        bias_V[list(blocked_token_ids)] = BLOCKED_TOKEN_BIAS
        self.register_buffer("logit_bias_V", bias_V, persistent=False)

    @property
    def hf_model(self) -> nn.Module:
        """The Hugging Face `Qwen2_5_VLForConditionalGeneration` (LoRA layers injected)."""
        from peft import PeftModel

        return self.policy.get_base_model() if isinstance(self.policy, PeftModel) else self.policy

    def forward(
        self,
        inputs: dict[str, torch.Tensor],
        positions_BT: torch.Tensor,
        with_values: bool = False,
        shared: SharedPrompts | None = None,
        mask_BT: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        h_BTH = sequence_hidden_states(self.hf_model, inputs, positions_BT, shared, mask_BT)
        logits_BTV = self.hf_model.lm_head(h_BTH).float() + self.logit_bias_V
        values_BT = None
        if with_values:
            if self.value_head is None:
                raise RuntimeError(
                    "with_values=True but the learner has no value head (critic.enabled)"
                )
            values_BT = self.value_head(h_BTH).squeeze(-1).float()
        return logits_BTV, values_BT


def completion_hidden_states(
    hf_model: nn.Module, inputs: dict, positions_BT: torch.Tensor
) -> torch.Tensor:
    """Last hidden states `[B, T, H]` at `positions_BT` of a Qwen2.5-VL forward."""
    # transformers caches M-RoPE deltas on the model between calls; a stale value from
    # a previous batch (or a `generate`) must never leak into this one.
    hf_model.model.rope_deltas = None
    out = hf_model.model(**inputs, use_cache=False, return_dict=True)
    h_BLH = out.last_hidden_state
    idx = positions_BT[:, :, None].expand(-1, -1, h_BLH.shape[-1])
    return torch.gather(h_BLH, 1, idx)


def sequence_hidden_states(
    hf_model: nn.Module,
    inputs: dict,
    positions_BT: torch.Tensor,
    shared: SharedPrompts | None,
    mask_BT: torch.Tensor | None,
) -> torch.Tensor:
    """`completion_hidden_states`, or `shared_prompt_hidden_states` for shared-prompt inputs."""
    if shared is None:
        return completion_hidden_states(hf_model, inputs, positions_BT)
    return shared_prompt_hidden_states(hf_model, inputs, shared, mask_BT)


def shared_prompt_hidden_states(
    hf_model: nn.Module, prompt_inputs: dict, shared: SharedPrompts, mask_BT: torch.Tensor
) -> torch.Tensor:
    """Last hidden states `[B, T, H]` predicting each completion token, with every
    distinct prompt run once: the prompts' forward fills a key/value cache, which is
    gathered per sequence, and the completions run on it. Position t's state is the
    prompt's last one (t = 0) or completion token t - 1's."""
    from transformers.cache_utils import DynamicCache

    model = hf_model.model
    model.rope_deltas = None
    attn_UL = prompt_inputs["attention_mask"]
    if "image_grid_thw" in prompt_inputs:
        pos_3UL, _ = model.get_rope_index(
            prompt_inputs["input_ids"],
            mm_token_type_ids=prompt_inputs["mm_token_type_ids"],
            image_grid_thw=prompt_inputs["image_grid_thw"],
            attention_mask=attn_UL,
        )
    else:
        pos_3UL = ((attn_UL.long().cumsum(-1) - 1).clamp(min=0))[None].expand(3, -1, -1)
    out = model(**prompt_inputs, position_ids=pos_3UL, use_cache=True, return_dict=True)
    U = attn_UL.shape[0]
    last_UH = out.last_hidden_state[torch.arange(U, device=attn_UL.device), shared.prompt_len_U - 1]
    idx_B = shared.prompt_of_B
    cache = DynamicCache(
        ddp_cache_data=[(layer.keys[idx_B], layer.values[idx_B]) for layer in out.past_key_values.layers],
        config=model.language_model.config,
    )
    comp_BT = shared.completion_ids_BT
    T = comp_BT.shape[1]
    # Text after the prompt continues from its largest M-RoPE position (all three axes).
    next_B = (pos_3UL.amax(dim=(0, 2)) + 1)[idx_B]
    pos_BT = next_B[:, None] + torch.arange(T, device=comp_BT.device)[None]
    attn_BL = torch.cat([attn_UL[idx_B], mask_BT.to(attn_UL.dtype)], dim=1)
    h_BTH = model.language_model(
        input_ids=comp_BT,
        attention_mask=attn_BL,
        position_ids=pos_BT[None].expand(3, -1, -1),
        past_key_values=cache,
        use_cache=True,
    ).last_hidden_state
    return torch.cat([last_UH[idx_B][:, None], h_BTH[:, : T - 1]], dim=1)


def token_logprobs(
    logits_BTV: torch.Tensor, targets_BT: torch.Tensor, mask_BT: torch.Tensor
) -> torch.Tensor:
    """log p(target) per position in fp32, 0 on padding."""
    logp_BTV = torch.log_softmax(logits_BTV.float(), dim=-1)
    logp_BT = logp_BTV.gather(-1, targets_BT[..., None]).squeeze(-1)
    return torch.where(
        mask_BT.bool(), logp_BT, torch.zeros((), dtype=logp_BT.dtype, device=logp_BT.device)
    )


class _LinearWarmup:
    """LR factor for LambdaLR: (step + 1) / warmup up to 1 (picklable for checkpoints)."""

    def __init__(self, warmup_steps: int):
        self.warmup_steps = warmup_steps

    def __call__(self, step: int) -> float:
        if self.warmup_steps <= 0:
            return 1.0
        return min(1.0, (step + 1) / self.warmup_steps)


def _init_distributed(
    rank: int, world_size: int, master_addr: str, master_port: int, local_rank: int
) -> None:
    import deepspeed
    import torch.distributed as dist

    if dist.is_initialized():
        if dist.get_rank() != rank or dist.get_world_size() != world_size:
            raise RuntimeError(
                f"torch.distributed is already initialized as rank {dist.get_rank()}/{dist.get_world_size()}, "
                f"cannot start learner rank {rank}/{world_size} in this process"
            )
        return
    # DeepSpeed falls back to MPI discovery (mpi4py) unless these are set.
    os.environ.update(
        MASTER_ADDR=master_addr,
        MASTER_PORT=str(master_port),
        RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(local_rank),
    )
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False, verbose=False)


def _chunks(n: int, size: int) -> list[list[int]]:
    return [list(range(i, min(i + size, n))) for i in range(0, n, size)]


Batch = TrainBatch | SFTBatch


class LearnerEngine:
    """A DeepSpeed engine training the policy; see the module docstring.

    All ranks of a data-parallel group must construct their engines concurrently
    (they rendezvous at `master_addr:master_port`) and call `train_step` /
    `sft_step` / `save_checkpoint` / `export_*` together, each with its own batch.
    """

    def __init__(
        self,
        cfg: LearnerConfig,
        *,
        rank: int = 0,
        world_size: int = 1,
        master_addr: str = "127.0.0.1",
        master_port: int = 29500,
        local_rank: int = 0,
    ):
        import deepspeed

        from repic_ray.models.loading import load_policy, load_processor, resolve_checkpoint

        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
        self.cfg = cfg
        self.rank, self.world_size = rank, world_size
        self.policy_version = 0
        self.dtype = _DTYPES[cfg.dtype]
        if torch.cuda.is_available():
            torch.cuda.set_device(local_rank)
            self.device = torch.device("cuda", local_rank)
        else:
            # bf16 works on CPU too (DeepSpeed's bf16 optimizer keeps fp32 master weights);
            # it is fast only where the CPU has AVX512-BF16 / AMX.
            self.device = torch.device("cpu")
        _init_distributed(rank, world_size, master_addr, master_port, local_rank)

        torch.manual_seed(cfg.seed)
        self.checkpoint_path = str(resolve_checkpoint(cfg.model))
        self.processor = load_processor(cfg.model)
        self._prompt_cache: OrderedDict[tuple, dict] = OrderedDict()

        # Full fine-tuning keeps a frozen copy as the reference; load it before ZeRO-3
        # is switched on below so that it stays a plain, unpartitioned model.
        self.ref_model: nn.Module | None = None
        if not cfg.lora.enabled and cfg.loss.kl_beta > 0:
            self.ref_model = load_policy(cfg.model, dtype=self.dtype).to(self.device).eval()
            self.ref_model.requires_grad_(False)

        ds_config = self._deepspeed_config()
        self._hf_ds_config = None
        if cfg.zero_stage == 3:
            # from_pretrained partitions the weights while this object is alive (a weakref
            # inside transformers); building under deepspeed.zero.Init fails for Qwen2.5-VL.
            from transformers.integrations import HfDeepSpeedConfig

            self._hf_ds_config = HfDeepSpeedConfig(ds_config)
        hf_model = load_policy(cfg.model, dtype=self.dtype)
        # Seed right before the new parameters (LoRA, value head) are drawn: loading
        # consumes the RNG differently per ZeRO stage, and ranks must agree.
        torch.manual_seed(cfg.seed)
        policy = self._prepare_policy(hf_model)
        value_head = None
        if cfg.critic.enabled:
            value_head = nn.Linear(hf_model.config.text_config.hidden_size, 1, dtype=self.dtype)
            nn.init.normal_(value_head.weight, std=1e-3)
            nn.init.zeros_(value_head.bias)
        blocked = (
            vision_special_token_ids(self.processor.tokenizer)
            if cfg.loss.block_vision_tokens
            else []
        )
        # out_features, not weight.shape: under ZeRO-3 the weight is an empty shell here
        vocab = hf_model.get_output_embeddings().out_features
        self.module = PolicyWithValue(policy, value_head, blocked, vocab)

        groups = [{"params": [p for p in policy.parameters() if p.requires_grad], "lr": cfg.lr}]
        if value_head is not None:
            groups.append({"params": list(value_head.parameters()), "lr": cfg.critic.lr})
        if not groups[0]["params"]:
            raise ValueError(
                "the policy has no trainable parameters (check lora.target_modules / freeze_vision)"
            )
        warmup = _LinearWarmup(cfg.warmup_steps)
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=self.module,
            model_parameters=groups,
            config=ds_config,
            lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, warmup),
        )
        self._stage0_grad_norm: float | None = None
        if cfg.zero_stage == 0 and cfg.dtype == "fp32":
            self._record_stage0_grad_norm()

    # ----------------------------------------------------------------- setup helpers
    def _deepspeed_config(self) -> dict[str, Any]:
        cfg = self.cfg
        zero: dict[str, Any] = {"stage": cfg.zero_stage, "overlap_comm": False}
        if cfg.zero_stage == 3:
            zero["stage3_gather_16bit_weights_on_model_save"] = False
            zero["stage3_param_persistence_threshold"] = cfg.zero3_persistence_threshold
        return {
            "train_micro_batch_size_per_gpu": cfg.micro_batch_size,
            "gradient_accumulation_steps": 1,
            "train_batch_size": cfg.micro_batch_size * self.world_size,
            # train_step owns accumulation: backward() per micro-batch, one step() per batch.
            "managed_gradient_accumulation": False,
            # ZeRO-0 computes the norm only when clipping: an infinite bound measures it
            # without clipping.
            "gradient_clipping": cfg.grad_clip
            if cfg.grad_clip > 0 or cfg.zero_stage != 0
            else float("inf"),
            "optimizer": {
                "type": "AdamW",
                "params": {
                    "lr": cfg.lr,
                    "betas": list(cfg.betas),
                    "eps": 1e-8,
                    "weight_decay": cfg.weight_decay,
                    # torch's AdamW: DeepSpeed's cpu_adam would compile for minutes on CPU.
                    "torch_adam": True,
                },
            },
            "zero_optimization": zero,
            "bf16": {"enabled": cfg.dtype == "bf16"},
            "zero_allow_untested_optimizer": True,
            "steps_per_print": 2**31 - 1,
            "wall_clock_breakdown": False,
        }

    def _record_stage0_grad_norm(self) -> None:
        """DeepSpeed clips fp32 ZeRO-0 gradients (after their all-reduce) with
        `clip_grad_norm_` but drops the norm it returns; keep it for `TrainStats`."""
        from deepspeed.runtime.utils import clip_grad_norm_

        engine = self.engine

        def clip_and_record() -> None:
            norm = clip_grad_norm_(
                engine.module.parameters(), max_norm=engine.gradient_clipping(), mpu=engine.mpu
            )
            self._stage0_grad_norm = float(norm)

        engine.clip_fp32_gradients = clip_and_record

    def _prepare_policy(self, hf_model: nn.Module) -> nn.Module:
        cfg = self.cfg
        if cfg.gradient_checkpointing:
            hf_model.gradient_checkpointing_enable(
                gradient_checkpointing_kwargs={"use_reentrant": False}
            )
            hf_model.config.use_cache = False
        if not cfg.lora.enabled:
            hf_model.requires_grad_(True)
            if cfg.freeze_vision:
                hf_model.model.visual.requires_grad_(False)
            return hf_model
        from peft import LoraConfig as PeftLoraConfig
        from peft import get_peft_model

        peft_cfg = PeftLoraConfig(
            r=cfg.lora.r,
            lora_alpha=cfg.lora.alpha,
            lora_dropout=cfg.lora.dropout,
            target_modules=cfg.lora.target_modules,
            bias="none",
        )
        peft_cfg.base_model_name_or_path = self.checkpoint_path
        return get_peft_model(hf_model, peft_cfg)

    @property
    def hf_model(self) -> nn.Module:
        return self.module.hf_model

    @property
    def lora_enabled(self) -> bool:
        return self.cfg.lora.enabled

    @functools.cached_property
    def dropout_active(self) -> bool:
        """Whether a training-mode forward is random (LoRA or attention dropout > 0)."""
        text = self.hf_model.config.text_config
        return getattr(text, "attention_dropout", 0.0) > 0 or any(
            isinstance(m, nn.Dropout) and m.p > 0 for m in self.module.modules()
        )

    def close(self) -> None:
        """Release the DeepSpeed engine. Under ZeRO-3 this also switches transformers'
        process-wide ZeRO-3 mode off again, so later `from_pretrained` calls in this
        process load plain, unpartitioned models."""
        self.engine.destroy()
        self._hf_ds_config = None

    # ---------------------------------------------------------------- input building
    def _encode_prompt(
        self, text: str, paths: Sequence[str], where: str
    ) -> dict[str, torch.Tensor]:
        key = (text, tuple(paths))
        hit = self._prompt_cache.get(key)
        if hit is not None:
            self._prompt_cache.move_to_end(key)
            return hit
        from repic_ray.models.loading import qwen_mm_inputs

        n_slots = text.count(self.processor.image_token)
        if n_slots != len(paths):
            raise ValueError(
                f"{where}: prompt has {n_slots} image placeholders but {len(paths)} image paths"
            )
        images = [load_image(p) for p in paths]
        enc = qwen_mm_inputs(self.processor, text, images)
        item = {"input_ids": enc["input_ids"][0], "mm_token_type_ids": enc["mm_token_type_ids"][0]}
        if images:
            item["pixel_values"] = enc["pixel_values"]
            item["image_grid_thw"] = enc["image_grid_thw"]
        self._prompt_cache[key] = item
        if len(self._prompt_cache) > _PROMPT_CACHE_SIZE:
            self._prompt_cache.popitem(last=False)
        return item

    def build_inputs(
        self,
        prompt_texts: list[str],
        image_paths: list[list[str]],
        completion_ids: list[list[int]],
        first_row: int = 0,
        shared: bool = False,
    ) -> ModelInputs:
        """Process prompts (text + images) and append completions, right-padded. Errors
        name the row as `sequence <first_row + b>` (its index in the caller's batch).
        `shared`: the distinct prompts only, plus the completions (`SharedPrompts`)."""
        prompts = [
            self._encode_prompt(t, p, f"sequence {first_row + b}")
            for b, (t, p) in enumerate(zip(prompt_texts, image_paths))
        ]
        # An <|image_pad|> in a completion would claim image features that do not exist
        # (a random policy samples them unless the rollout forbids them).
        placeholders = {self.processor.image_token_id, self.processor.video_token_id}
        vocab = self.hf_model.config.text_config.vocab_size
        for b, comp in enumerate(completion_ids):
            bad = sorted({t for t in comp if t in placeholders or t >= vocab})
            if bad:
                raise ValueError(
                    f"sequence {first_row + b}: completion holds token ids {bad} that are image/video "
                    f"placeholders or outside the vocabulary ({vocab})"
                )
        if shared:
            return self._shared_inputs(prompt_texts, image_paths, prompts, completion_ids)
        B = len(prompts)
        lengths = [len(p["input_ids"]) + len(c) for p, c in zip(prompts, completion_ids)]
        L, T = max(lengths), max(len(c) for c in completion_ids)
        pad_id = self.processor.tokenizer.pad_token_id or 0
        input_ids = torch.full((B, L), pad_id, dtype=torch.long)
        attention_mask = torch.zeros((B, L), dtype=torch.long)
        mm_types = torch.zeros((B, L), dtype=torch.long)
        positions_BT = torch.zeros((B, T), dtype=torch.long)
        targets_BT = torch.zeros((B, T), dtype=torch.long)
        mask_BT = torch.zeros((B, T), dtype=torch.float32)
        for b, (p, comp) in enumerate(zip(prompts, completion_ids)):
            n_p, n_c = len(p["input_ids"]), len(comp)
            comp_t = torch.tensor(comp, dtype=torch.long)
            input_ids[b, :n_p] = p["input_ids"]
            input_ids[b, n_p : n_p + n_c] = comp_t
            attention_mask[b, : n_p + n_c] = 1
            mm_types[b, :n_p] = p["mm_token_type_ids"]
            # logits at position i predict token i + 1; padded slots point at the last
            # prompt token (any valid index; they are masked out).
            positions_BT[b] = n_p - 1
            positions_BT[b, :n_c] = torch.arange(n_p - 1, n_p - 1 + n_c)
            targets_BT[b, :n_c] = comp_t
            mask_BT[b, :n_c] = 1.0
        inputs: dict[str, torch.Tensor] = {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "mm_token_type_ids": mm_types,
        }
        with_images = [p for p in prompts if "pixel_values" in p]
        if with_images:
            inputs["pixel_values"] = torch.cat([p["pixel_values"] for p in with_images]).to(
                self.dtype
            )
            inputs["image_grid_thw"] = torch.cat([p["image_grid_thw"] for p in with_images])
        inputs = {k: v.to(self.device) for k, v in inputs.items()}
        return ModelInputs(
            inputs,
            positions_BT.to(self.device),
            targets_BT.to(self.device),
            mask_BT.to(self.device),
        )

    def _shared_inputs(
        self,
        prompt_texts: list[str],
        image_paths: list[list[str]],
        prompts: list[dict[str, torch.Tensor]],
        completion_ids: list[list[int]],
    ) -> ModelInputs:
        """`build_inputs` in shared-prompt mode: U distinct prompts (right-padded) as the
        model inputs, the completions and each sequence's prompt index beside them."""
        index: dict[tuple, int] = {}
        prompt_of_B, distinct = [], []
        for t, paths, p in zip(prompt_texts, image_paths, prompts):
            key = (t, tuple(paths))
            if key not in index:
                index[key] = len(distinct)
                distinct.append(p)
            prompt_of_B.append(index[key])
        U, B = len(distinct), len(completion_ids)
        Lp = max(len(p["input_ids"]) for p in distinct)
        T = max(len(c) for c in completion_ids)
        pad_id = self.processor.tokenizer.pad_token_id or 0
        input_ids = torch.full((U, Lp), pad_id, dtype=torch.long)
        attention_mask = torch.zeros((U, Lp), dtype=torch.long)
        mm_types = torch.zeros((U, Lp), dtype=torch.long)
        for u, p in enumerate(distinct):
            n_p = len(p["input_ids"])
            input_ids[u, :n_p] = p["input_ids"]
            attention_mask[u, :n_p] = 1
            mm_types[u, :n_p] = p["mm_token_type_ids"]
        comp_BT = torch.full((B, T), pad_id, dtype=torch.long)
        targets_BT = torch.zeros((B, T), dtype=torch.long)
        mask_BT = torch.zeros((B, T), dtype=torch.float32)
        for b, comp in enumerate(completion_ids):
            comp_BT[b, : len(comp)] = torch.tensor(comp, dtype=torch.long)
            targets_BT[b, : len(comp)] = comp_BT[b, : len(comp)]
            mask_BT[b, : len(comp)] = 1.0
        inputs: dict[str, torch.Tensor] = {
            "input_ids": input_ids, "attention_mask": attention_mask, "mm_token_type_ids": mm_types,
        }
        with_images = [p for p in distinct if "pixel_values" in p]
        if with_images:
            inputs["pixel_values"] = torch.cat([p["pixel_values"] for p in with_images]).to(self.dtype)
            inputs["image_grid_thw"] = torch.cat([p["image_grid_thw"] for p in with_images])
        dev = self.device
        shared = SharedPrompts(
            prompt_of_B=torch.tensor(prompt_of_B, dtype=torch.long, device=dev),
            prompt_len_U=torch.tensor([len(p["input_ids"]) for p in distinct], dtype=torch.long, device=dev),
            completion_ids_BT=comp_BT.to(dev),
        )
        return ModelInputs(
            {k: v.to(dev) for k, v in inputs.items()},
            torch.zeros((B, T), dtype=torch.long, device=dev),
            targets_BT.to(dev),
            mask_BT.to(dev),
            shared=shared,
        )

    def _forward(self, mi: ModelInputs, with_values: bool = False):
        """The DeepSpeed engine's forward of `mi`: (logits, values) at the completion positions."""
        return self.engine(mi.inputs, mi.positions_BT, with_values=with_values, shared=mi.shared,
                           mask_BT=mi.mask_BT)

    def _shared_prompts(self, training: bool) -> bool:
        """Whether RL forwards share prompts: on unless disabled, or training under
        gradient checkpointing (which runs without a key/value cache)."""
        return self.cfg.shared_prompt_forward and not (training and self.cfg.gradient_checkpointing)

    # ---------------------------------------------------------------- distributed sums
    def _all_sum(self, values: list[float]) -> list[float]:
        if self.world_size == 1:
            return values
        import torch.distributed as dist

        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t.tolist()

    def _normalizer(self, batch: Batch, agg: str) -> float:
        """The global count of the aggregation unit, divided by the number of ranks
        (DeepSpeed averages gradients over ranks; micro-batch losses are summed)."""
        local = float(batch.mask_BT.sum()) if agg == "token_mean" else float(len(batch))
        (total,) = self._all_sum([local])
        return max(total, 1.0) / self.world_size

    # ---------------------------------------------------------------- evaluation passes
    @torch.no_grad()
    def _eval_pass(
        self, batch: Batch, *, reference: bool = False, values: bool = False
    ) -> torch.Tensor:
        B, T = len(batch), max(len(c) for c in batch.completion_ids)
        out_BT = torch.zeros((B, T), dtype=torch.float32)
        self.engine.eval()
        try:
            for idx in _chunks(B, self.cfg.micro_batch_size):
                mi = self.build_inputs(
                    [batch.prompt_texts[i] for i in idx],
                    [batch.image_paths[i] for i in idx],
                    [batch.completion_ids[i] for i in idx],
                    idx[0],
                    shared=self._shared_prompts(training=False),
                )
                if values:
                    _, chunk_BT = self._forward(mi, with_values=True)
                    chunk_BT = chunk_BT * mi.mask_BT
                elif reference:
                    chunk_BT = self._reference_logprobs(mi)
                else:
                    logits_BTV, _ = self._forward(mi)
                    chunk_BT = token_logprobs(
                        logits_BTV / self.cfg.loss.temperature, mi.targets_BT, mi.mask_BT
                    )
                out_BT[idx, : chunk_BT.shape[1]] = chunk_BT.float().cpu()
        finally:
            if self.cfg.zero_stage == 3:
                # after a no_grad forward ZeRO-3 keeps parameters gathered until told.
                self.engine.empty_partition_cache()
        return out_BT

    def _reference_logprobs(self, mi: ModelInputs) -> torch.Tensor:
        if self.lora_enabled:
            with self.module.policy.disable_adapter():
                logits_BTV, _ = self._forward(mi)
        elif self.ref_model is not None:
            h_BTH = sequence_hidden_states(self.ref_model, mi.inputs, mi.positions_BT, mi.shared, mi.mask_BT)
            logits_BTV = self.ref_model.lm_head(h_BTH).float() + self.module.logit_bias_V
        else:
            raise RuntimeError(
                "no reference policy: full fine-tuning with loss.kl_beta = 0 keeps none"
            )
        return token_logprobs(logits_BTV / self.cfg.loss.temperature, mi.targets_BT, mi.mask_BT)

    def compute_logprobs(self, batch: Batch) -> torch.Tensor:
        """logprobs_BT of the completion tokens under the current policy (no dropout,
        no grad), 0 on padding; on CPU in fp32."""
        return self._eval_pass(batch)

    def compute_ref_logprobs(self, batch: Batch) -> torch.Tensor:
        """logprobs_BT under the reference policy (adapter disabled / frozen copy)."""
        return self._eval_pass(batch, reference=True)

    def compute_values(self, batch: Batch) -> torch.Tensor:
        """values_BT of the value head at each completion token's input position."""
        if self.module.value_head is None:
            raise RuntimeError("compute_values needs critic.enabled")
        return self._eval_pass(batch, values=True)

    # ---------------------------------------------------------------- updates
    def train_step(self, batch: TrainBatch, ptx: SFTBatch | None = None, ptx_coef: float = 0.0) -> TrainStats:
        """One optimizer step of the RL objective over the whole batch (this rank's share),
        plus `ptx_coef` x the SFT cross-entropy of `ptx` when given (PPO-ptx)."""
        lr = self.engine.get_lr()[0]
        sums = self.accumulate_rl_gradients(batch)
        ptx_loss = float("nan")
        if ptx is not None:
            ptx_loss = self._stats(self.accumulate_sft_gradients(ptx, scale=ptx_coef), 0.0, lr).policy_loss
        grad_norm = self._optimizer_step()
        return dataclasses.replace(self._stats(sums, grad_norm, lr), ptx_loss=ptx_loss)

    def sft_step(self, batch: SFTBatch) -> TrainStats:
        """One optimizer step of token-mean cross-entropy on the target tokens; tokens
        in `batch.upweight_token_ids` count `loss.name_token_weight` times."""
        lr = self.engine.get_lr()[0]
        sums = self.accumulate_sft_gradients(batch)
        grad_norm = self._optimizer_step()
        return self._stats(sums, grad_norm, lr)

    def accumulate_rl_gradients(self, batch: TrainBatch) -> dict[str, float]:
        """Forward + backward of every micro-batch of `batch` (no optimizer step);
        returns this rank's sums of the loss terms for `TrainStats`."""
        cfg, lc = self.cfg, self.cfg.loss
        critic = self.module.value_head is not None
        if critic and (batch.returns_BT is None or batch.values_BT is None):
            raise ValueError(
                "train_step with critic.enabled needs batch.returns_BT and batch.values_BT"
            )
        # The reference pass runs before the update (adapter off; no dropout).
        if lc.kl_beta > 0 and batch.ref_logprobs_BT is None:
            batch = dataclasses.replace(batch, ref_logprobs_BT=self.compute_ref_logprobs(batch))
        normalizer = self._normalizer(batch, lc.loss_agg)
        # Old log-probs of an on-policy batch are the training forward's own, detached (the
        # ratio is exactly 1 and its gradient that of log p), as a separate pass on the same
        # weights would give. A forward with dropout is not the policy's distribution: then an
        # eval pass gives them, and the mismatch. (Off-policy batches keep the old log-probs
        # sent; their mismatch is measured on the training forward, dropout included.)
        sent_BT = batch.old_logprobs_BT
        eval_lp_BT = self.compute_logprobs(batch) if batch.on_policy and self.dropout_active else None
        forward_is_old = batch.on_policy and eval_lp_BT is None
        if eval_lp_BT is not None:
            batch = dataclasses.replace(batch, old_logprobs_BT=eval_lp_BT)

        settings = LossSettings(clip_low=lc.clip_low, clip_high=lc.clip_high, dual_clip=lc.dual_clip,
                                kl_beta=lc.kl_beta, kl_estimator=lc.kl_estimator,
                                entropy_coef=lc.entropy_coef, agg=lc.loss_agg, max_len=lc.max_len)
        self.engine.train()
        sums = dict.fromkeys(("loss", "pg", "vf", "kl", "clip", "ent", "tok", "mm"), 0.0)
        if eval_lp_BT is not None:
            sums["mm"] = float(((eval_lp_BT - sent_BT).abs() * batch.mask_BT).sum())
        for idx in _chunks(len(batch), cfg.micro_batch_size):
            mb = batch.select(idx)
            mi = self.build_inputs(mb.prompt_texts, mb.image_paths, mb.completion_ids, idx[0],
                                   shared=self._shared_prompts(training=True))
            logits_BTV, values_BT = self._forward(mi, with_values=critic)
            logits_BTV = logits_BTV / lc.temperature
            logp_BT = token_logprobs(logits_BTV, mi.targets_BT, mi.mask_BT)
            if eval_lp_BT is None:
                sent_mb_BT = sent_BT[idx, : logp_BT.shape[1]].to(self.device)
                sums["mm"] += float(((logp_BT.detach() - sent_mb_BT).abs() * mi.mask_BT).sum())
            if lc.entropy_coef != 0.0:
                entropy_BT = entropy_from_logits(logits_BTV)
            else:
                with torch.no_grad():
                    entropy_BT = entropy_from_logits(logits_BTV.detach())
            loss, st = policy_loss(
                logp_BT,
                logp_BT.detach() if forward_is_old else mb.old_logprobs_BT.to(self.device),
                mb.advantages_BT.to(self.device),
                mi.mask_BT,
                settings,
                ref_logprobs_BT=None
                if mb.ref_logprobs_BT is None
                else mb.ref_logprobs_BT.to(self.device),
                entropy_BT=entropy_BT,
                normalizer=normalizer,
            )
            if critic:
                vloss, _ = value_loss(
                    values_BT,
                    mb.values_BT.to(self.device),
                    mb.returns_BT.to(self.device),
                    mi.mask_BT,
                    clip=cfg.critic.value_clip,
                    agg=lc.loss_agg,
                    max_len=lc.max_len,
                    normalizer=normalizer,
                )
                loss = loss + cfg.critic.value_coef * vloss
                sums["vf"] += float(vloss.detach())
            self.engine.backward(loss, scale_wrt_gas=False)
            n_tok = float(mi.mask_BT.sum())
            sums["loss"] += float(loss.detach())
            sums["pg"] += float(st["pg_loss"])
            sums["kl"] += float(st.get("kl", 0.0)) * n_tok
            sums["clip"] += float(st["clip_frac"]) * n_tok
            sums["ent"] += float(st["entropy"]) * n_tok
            sums["tok"] += n_tok
        return sums

    def accumulate_sft_gradients(self, batch: SFTBatch, scale: float = 1.0) -> dict[str, float]:
        """Forward + backward of `scale` x the SFT loss over `batch` (no optimizer step);
        the sums returned are of the unscaled loss."""
        cfg = self.cfg
        normalizer = self._normalizer(batch, "token_mean")
        weights_BT = batch.token_weights_BT(cfg.loss.name_token_weight)
        self.engine.train()
        sums = dict.fromkeys(("loss", "pg", "vf", "kl", "clip", "ent", "tok"), 0.0)
        for idx in _chunks(len(batch), cfg.micro_batch_size):
            mb = batch.select(idx)
            mi = self.build_inputs(mb.prompt_texts, mb.image_paths, mb.completion_ids, idx[0])
            logits_BTV, _ = self._forward(mi)
            nll_BT = -token_logprobs(logits_BTV, mi.targets_BT, mi.mask_BT)
            w_BT = weights_BT[idx, : nll_BT.shape[1]].to(self.device)
            loss = aggregate_loss(w_BT * nll_BT, mi.mask_BT, "token_mean", normalizer=normalizer)
            self.engine.backward(loss * scale, scale_wrt_gas=False)
            with torch.no_grad():
                ent_BT = entropy_from_logits(logits_BTV.detach())
            sums["loss"] += float(loss.detach())
            sums["pg"] += float((nll_BT.detach() * mi.mask_BT).sum()) / (
                normalizer * self.world_size
            )
            sums["ent"] += float((ent_BT * mi.mask_BT).sum())
            sums["tok"] += float(mi.mask_BT.sum())
        return sums

    def _optimizer_step(self) -> float:
        self._stage0_grad_norm = None
        self.engine.step()
        self.policy_version += 1
        norm = self.engine.get_global_grad_norm()
        if norm is None:
            norm = self._stage0_grad_norm
        return float("nan") if norm is None else float(norm)

    def _stats(self, sums: dict[str, float], grad_norm: float, lr: float) -> TrainStats:
        keys = list(sums)
        total = dict(zip(keys, self._all_sum([sums[k] for k in keys])))
        tok = max(total["tok"], 1.0)
        # loss-like sums are each rank's share of the global loss (normalized by
        # global_count / K), so their sum over ranks is K times the global loss.
        k = self.world_size
        return TrainStats(
            loss=total["loss"] / k,
            policy_loss=total["pg"] / k,
            kl=total["kl"] / tok,
            clip_frac=total["clip"] / tok,
            entropy=total["ent"] / tok,
            grad_norm=grad_norm,
            lr=lr,
            tokens=int(total["tok"]),
            value_loss=total["vf"] / k,
            policy_version=self.policy_version,
            logprob_mismatch=total["mm"] / tok if "mm" in total else float("nan"),
        )

    # ---------------------------------------------------------------- weights out
    def export_lora(self) -> tuple[dict[str, torch.Tensor], dict]:
        """The adapter in peft's `save_pretrained` format: (tensors with keys like
        `base_model.model.model.language_model.layers.0.self_attn.q_proj.lora_A.weight`,
        adapter_config dict). Collective under ZeRO-3: call on every rank."""
        if not self.lora_enabled:
            raise RuntimeError("export_lora needs lora.enabled; use export_full")
        return lora_state_dict(self.module.policy)

    def export_full(self) -> dict[str, torch.Tensor]:
        """Merged weights `W + scaling * B @ A` (fp32 math) under the plain
        `Qwen2_5_VLForConditionalGeneration.state_dict()` names; the training model is
        not modified. Collective under ZeRO-3: call on every rank."""
        return merged_state_dict(self.hf_model)

    # ---------------------------------------------------------------- checkpoints
    def save_checkpoint(self, ckpt_dir: str | os.PathLike, tag: str | None = None) -> str:
        """Engine + optimizer + scheduler + RNG + step into `ckpt_dir/tag` (default
        `v<policy_version>`). Collective: call on every rank. Returns the tag."""
        tag = tag or f"v{self.policy_version}"
        client = {"policy_version": self.policy_version}
        # Frozen base weights are reloaded from the checkpoint spec, not saved.
        self.engine.save_checkpoint(
            str(ckpt_dir), tag=tag, client_state=client, exclude_frozen_parameters=self.lora_enabled
        )
        torch.save(_rng_state(), Path(ckpt_dir) / tag / f"rng_rank{self.rank}.pt")
        return tag

    def load_checkpoint(self, ckpt_dir: str | os.PathLike, tag: str | None = None) -> None:
        """Restore a `save_checkpoint` (latest tag by default); the next step then
        computes exactly what it would have computed without the interruption."""
        if tag is None:
            latest = Path(ckpt_dir) / "latest"
            if not latest.is_file():
                raise FileNotFoundError(f"no learner checkpoint in {ckpt_dir} (no 'latest' file)")
            tag = latest.read_text().strip()
        path, client = self.engine.load_checkpoint(
            str(ckpt_dir),
            tag=tag,
            load_module_strict=not self.lora_enabled,
            load_optimizer_states=True,
            load_lr_scheduler_states=True,
        )
        if path is None:
            raise FileNotFoundError(f"no learner checkpoint in {ckpt_dir} (tag {tag!r})")
        self.policy_version = int(client["policy_version"])
        _set_rng_state(
            torch.load(Path(ckpt_dir) / tag / f"rng_rank{self.rank}.pt", weights_only=False)
        )


def _rng_state() -> dict[str, Any]:
    state = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": np.random.get_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
