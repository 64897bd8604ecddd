"""The rollout engine on transformers `generate`: same interface as `VLLMRolloutEngine`.

For comparison with vLLM and for machines without it. Slower, but every step is plain
PyTorch. Qwen2.5-VL specifics (transformers 5.19): prompts are left-padded, the processor's
`mm_token_type_ids` go into `generate` (without them the model silently falls back to 1D
positions), and `model.model.rope_deltas` is reset before each batch (it caches the M-RoPE
offsets of the previous batch).

Seeded sampling reseeds torch once per `generate` call, so samples are reproducible for the
same batch in the same order (vLLM's are per request, independent of the batch).
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import torch

from repic_ray.rollout.common import (
    check_full_state_dict,
    checkpoint_name,
    cut_at_stop,
    load_images,
    num_samples,
    validate_requests,
    vision_token_ids,
    write_peft_adapter,
)
from repic_ray.rollout.config import RolloutConfig, SamplingConfig
from repic_ray.rollout.types import Completion, RolloutRequest, RolloutResult

_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


class HFRolloutEngine:
    """Samples completions with transformers `generate` and takes new policy weights."""

    def __init__(self, cfg: RolloutConfig, device: str | torch.device = "cpu") -> None:
        from transformers import AutoModelForImageTextToText, AutoProcessor

        self.cfg = cfg
        self.device = torch.device(device)
        self.processor = AutoProcessor.from_pretrained(cfg.tokenizer or cfg.model)
        self.tokenizer = self.processor.tokenizer
        dtype = _DTYPES.get(cfg.dtype, "auto")
        self.base_model = AutoModelForImageTextToText.from_pretrained(cfg.model, dtype=dtype)
        self.base_model.to(self.device).eval()
        self.model: Any = self.base_model
        self._peft_config: dict[str, Any] | None = None
        self._blocked = vision_token_ids(self.tokenizer)
        eos = self.base_model.generation_config.eos_token_id
        self._eos = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        self._eos.add(self.tokenizer.eos_token_id)
        self.policy_version = 0

    # -- sampling ---------------------------------------------------------------------------

    @torch.no_grad()
    def generate(
        self, requests: list[RolloutRequest], sampling: SamplingConfig | None = None
    ) -> list[RolloutResult]:
        """Sample `n` completions per request; results come back in request order."""
        sampling = sampling or self.cfg.sampling
        if sampling.greedy_member:
            raise ValueError("sampling.greedy_member is supported by the vLLM rollout engine only")
        validate_requests(requests, self.cfg.limit_images_per_prompt)
        if not requests:
            return []
        counts = [num_samples(r, sampling) for r in requests]
        texts, images = [], []
        for r, n in zip(requests, counts):
            loaded = load_images(r)
            for _ in range(n):
                texts.append(r.prompt_text)
                images.extend(loaded)
        self.tokenizer.padding_side = "left"
        inputs = self.processor(
            text=texts,
            images=images or None,
            padding=True,
            return_tensors="pt",
            **self.cfg.mm_processor_kwargs,
        ).to(self.device)
        if sampling.seed is not None:
            torch.manual_seed(sampling.seed)
        self._reset_rope_cache()
        greedy = sampling.temperature == 0
        processed = self.cfg.logprobs_mode == "processed_logprobs"
        out = self.model.generate(
            **inputs,
            do_sample=not greedy,
            temperature=None if greedy else sampling.temperature,
            top_p=None if greedy else sampling.top_p,
            top_k=None,
            max_new_tokens=sampling.max_tokens,
            suppress_tokens=self._blocked if sampling.block_vision_tokens else None,
            stop_strings=list(sampling.stop) or None,
            tokenizer=self.tokenizer,
            pad_token_id=self.tokenizer.pad_token_id,
            return_dict_in_generate=True,
            # Only the per-step tensor the log-probs come from.
            output_scores=processed,
            output_logits=not processed,
        )
        prompt_len = inputs["input_ids"].shape[1]
        tokens_BT = out.sequences[:, prompt_len:].cpu()
        # "processed": the distribution sampled from (temperature, top_p, blocked tokens);
        # "raw": the model's own log-softmax.
        steps = out.scores if processed else out.logits
        logits_BTV = torch.stack(steps, dim=1).float().cpu()
        logprobs_BT = torch.log_softmax(logits_BTV, dim=-1).gather(-1, tokens_BT[..., None])[..., 0]
        results, row = [], 0
        for r, n in zip(requests, counts):
            completions = [
                self._completion(tokens_BT[row + i], logprobs_BT[row + i], sampling) for i in range(n)
            ]
            results.append(RolloutResult(uid=r.uid, completions=completions))
            row += n
        return results

    def _completion(
        self, tokens_T: torch.Tensor, logprobs_T: torch.Tensor, sampling: SamplingConfig
    ) -> Completion:
        ids = tokens_T.tolist()
        length, finish = len(ids), "length"
        for t, tok in enumerate(ids):
            if tok in self._eos:
                length, finish = t + 1, "stop"
                break
        if sampling.stop and cut_at_stop(self._decode(ids[:length]), sampling.stop)[1]:
            # Generation ended on the token that completed a stop string: the shortest prefix
            # whose text holds one (positions after it are padding).
            length = next(
                k for k in range(1, length + 1) if cut_at_stop(self._decode(ids[:k]), sampling.stop)[1]
            )
            finish = "stop"
        text = cut_at_stop(self._decode(ids[:length]), sampling.stop)[0]
        return Completion(
            text=text,
            token_ids=ids[:length],
            logprobs=logprobs_T[:length].tolist(),
            finish_reason=finish,
            policy_version=self.policy_version,
        )

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def _reset_rope_cache(self) -> None:
        for module in self.base_model.modules():
            if hasattr(module, "rope_deltas"):
                module.rope_deltas = None

    # -- weight updates ---------------------------------------------------------------------

    def update_lora(
        self, tensors: dict[str, torch.Tensor], peft_config: dict[str, Any], version: int
    ) -> None:
        """Apply a new LoRA adapter (peft `save_pretrained` names and config) as `version`."""
        from peft import LoraConfig, get_peft_model, set_peft_model_state_dict

        with tempfile.TemporaryDirectory(prefix="repic-lora-") as tmp:
            # Same validation and JSON round trip as the vLLM path.
            write_peft_adapter(Path(tmp), tensors, peft_config)
            lora_config = LoraConfig.from_pretrained(tmp)
        if self._peft_config != lora_config.to_dict():
            self._unwrap()
            self.model = get_peft_model(self.base_model, lora_config)
            self.model.eval()
            self._peft_config = lora_config.to_dict()
        result = set_peft_model_state_dict(self.model, tensors)
        if result.unexpected_keys:
            raise ValueError(
                f"update_lora: {len(result.unexpected_keys)} tensor(s) match no LoRA module, "
                f"e.g. {result.unexpected_keys[:3]}"
            )
        missing = [k for k in result.missing_keys if "lora_" in k]
        if missing:
            raise ValueError(f"update_lora: LoRA tensors missing, e.g. {missing[:3]}")
        self.policy_version = int(version)

    def update_full(self, state_dict: dict[str, torch.Tensor], version: int) -> None:
        """Load full weights (Hugging Face names) as `version`; drops any LoRA adapter."""
        self._unwrap()
        own = self.base_model.state_dict()
        check_full_state_dict(state_dict, set(own) | {checkpoint_name(k) for k in own})
        by_checkpoint_name = {checkpoint_name(k): k for k in own}
        renamed = {k if k in own else by_checkpoint_name[k]: v for k, v in state_dict.items()}
        self.base_model.load_state_dict(renamed, strict=False)
        self.policy_version = int(version)

    def _unwrap(self) -> None:
        if self.model is not self.base_model:
            self.base_model = self.model.unload()
            self.model = self.base_model
            self._peft_config = None

