"""The rollout engine on vLLM: batched multi-image sampling with log-probs, live weight updates.

A plain class around `vllm.LLM` (no Ray; `actors/` wraps it). The policy is either the base
checkpoint plus a LoRA adapter (`update_lora`, the RePIC recipe) or full weights reloaded in
place (`update_full`). Every completion records the policy version that produced it.

Why the update paths look the way they do (measured on vLLM 0.32, CPU):
- A LoRA adapter is identified by its integer id: loading new files under an old id serves
  the old weights, so each version gets a fresh id and the previous adapter is removed.
- `model.load_weights` fails on CPU (weights are repacked after loading); the worker's
  `reload_weights` re-runs the loader's post-processing and works. It reads the new weights
  from a safetensors file written per update (simple and exact; a GPU deployment with large
  models would rather use vLLM's NCCL weight-transfer engine).
- After any weight change the prefix cache (KV blocks of the old weights) and the encoder
  cache (image embeddings of the old vision tower) must be dropped; stale prefix blocks give
  wrong output and re-sent images otherwise kill the engine.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from repic_ray.ports import pin_vllm_port
from repic_ray.rollout.common import (
    check_full_state_dict,
    checkpoint_parameter_names,
    load_images,
    num_samples,
    request_seed,
    validate_requests,
    vision_token_ids,
    write_peft_adapter,
)
from repic_ray.rollout.config import RolloutConfig, SamplingConfig
from repic_ray.rollout.types import Completion, RolloutRequest, RolloutResult

if TYPE_CHECKING:
    from vllm import LLM

# vLLM clamps logit_bias to [-100, 100]; exp(-100) ~ 4e-44 of mass is a block in practice.
_BLOCK_BIAS = -100.0


def llm_kwargs(cfg: RolloutConfig) -> dict[str, Any]:
    """Arguments of `vllm.LLM(...)` for this config (shared with test fixtures)."""
    kwargs: dict[str, Any] = {
        "model": cfg.model,
        "tokenizer": cfg.tokenizer or cfg.model,
        "dtype": cfg.dtype,
        "max_model_len": cfg.max_model_len,
        "max_num_batched_tokens": cfg.max_num_batched_tokens,
        # A prompt is prefilled whole or waits for the next step: a prompt split across
        # steps discards a sampled token and rewinds its seeded generator, which vLLM on
        # CPU cannot do ("CPU Generator does not use offset") once a batch's prompts
        # exceed `max_num_batched_tokens`.
        "enable_chunked_prefill": False,
        "max_num_seqs": cfg.max_num_seqs,
        "limit_mm_per_prompt": {"image": cfg.limit_images_per_prompt},
        "tensor_parallel_size": cfg.tensor_parallel_size,
        "logprobs_mode": cfg.logprobs_mode,
        "enforce_eager": cfg.enforce_eager,
        "seed": cfg.seed,
        "gpu_memory_utilization": cfg.gpu_memory_utilization,
    }
    if cfg.kv_cache_gib is not None:
        kwargs["kv_cache_memory_bytes"] = int(cfg.kv_cache_gib * (1 << 30))
    if cfg.mm_processor_kwargs:
        kwargs["mm_processor_kwargs"] = dict(cfg.mm_processor_kwargs)
    if cfg.enable_lora:
        kwargs.update(enable_lora=True, max_lora_rank=cfg.max_lora_rank, max_loras=1)
    return kwargs


class VLLMRolloutEngine:
    """Samples completions with vLLM and takes new policy weights between batches.

    `llm`: an existing `vllm.LLM` to wrap (tests share one engine); it must have been built
    with the same `logprobs_mode` and, for `update_lora`, with LoRA enabled.
    """

    def __init__(self, cfg: RolloutConfig, llm: LLM | None = None) -> None:
        self.cfg = cfg
        if llm is None:
            from vllm import LLM

            from repic_ray.reaper import watch_children

            # vLLM's engine core runs in child processes: they end with this one, even
            # when it is killed outright (no orphaned engine holding memory and threads).
            watch_children()
            pin_vllm_port()
            llm = LLM(**llm_kwargs(cfg))
        self.llm = llm
        model_config = llm.llm_engine.model_config
        if model_config.logprobs_mode != cfg.logprobs_mode:
            raise ValueError(
                f"rollout.logprobs_mode={cfg.logprobs_mode!r} but the given engine was built "
                f"with {model_config.logprobs_mode!r}"
            )
        self._lora_enabled = llm.llm_engine.vllm_config.lora_config is not None
        self.tokenizer = llm.get_tokenizer()
        self._blocked = vision_token_ids(self.tokenizer)
        self._known_names = checkpoint_parameter_names(model_config.model)
        self.policy_version = 0
        self._lora_request = None
        self._next_lora_id = 1
        self._next_full_id = 1
        self._full_dir: Path | None = None
        self._update_root = Path(tempfile.mkdtemp(prefix="repic-rollout-"))

    # -- sampling ---------------------------------------------------------------------------

    def generate(
        self, requests: list[RolloutRequest], sampling: SamplingConfig | None = None
    ) -> list[RolloutResult]:
        """Sample `n` completions per request; results come back in request order."""
        sampling = sampling or self.cfg.sampling
        validate_requests(requests, self.cfg.limit_images_per_prompt)
        if not requests:
            return []
        prompts = []
        params = []
        for r in requests:
            prompt: dict[str, Any] = {"prompt": r.prompt_text}
            if r.image_paths:
                prompt["multi_modal_data"] = {"image": load_images(r)}
            n = num_samples(r, sampling)
            if sampling.greedy_member:
                if n < 2:
                    raise ValueError(
                        f"request {r.uid!r}: sampling.greedy_member needs n >= 2 completions, got {n}"
                    )
                # n - 1 sampled, then the greedy one: two vLLM requests on the same prompt
                # (its prefix and images are cached for the second).
                prompts += [prompt, prompt]
                params += [self._sampling_params(r, sampling, n - 1),
                           self._sampling_params(r, sampling, 1, greedy=True)]
            else:
                prompts.append(prompt)
                params.append(self._sampling_params(r, sampling, n))
        outputs = self.llm.generate(
            prompts, params, lora_request=self._lora_request, use_tqdm=False
        )
        if sampling.greedy_member:
            return [self._result(r, sampling, outputs[2 * i], outputs[2 * i + 1])
                    for i, r in enumerate(requests)]
        return [self._result(r, sampling, out) for r, out in zip(requests, outputs)]

    def _sampling_params(self, request: RolloutRequest, sampling: SamplingConfig, n: int,
                         greedy: bool = False):
        from vllm import SamplingParams

        return SamplingParams(
            n=n,
            temperature=0.0 if greedy else sampling.temperature,
            top_p=sampling.top_p,
            max_tokens=sampling.max_tokens,
            stop=list(sampling.stop) or None,
            seed=None if sampling.seed is None else request_seed(sampling.seed, request.uid),
            # Without stop strings nothing needs the text while decoding: vLLM's incremental
            # detokenizer (and the decoding of every log-prob's token) is skipped and each
            # completion is decoded once at the end (`_result`); 1.01x samples/s on CPU.
            detokenize=bool(sampling.stop),
            logprobs=0,
            logit_bias={t: _BLOCK_BIAS for t in self._blocked} if sampling.block_vision_tokens else None,
        )

    def _result(self, request: RolloutRequest, sampling: SamplingConfig, *outs: Any) -> RolloutResult:
        completions = []
        for c in [c for out in outs for c in sorted(out.outputs, key=lambda c: c.index)]:
            token_ids = list(c.token_ids)
            if c.logprobs is None or len(c.logprobs) != len(token_ids):
                raise RuntimeError(
                    f"request {request.uid!r}: vLLM returned {0 if c.logprobs is None else len(c.logprobs)} "
                    f"log-prob entries for {len(token_ids)} tokens"
                )
            logprobs = [float(step[tok].logprob) for tok, step in zip(token_ids, c.logprobs)]
            completions.append(
                Completion(
                    # vLLM wrote the text (cut at a stop string) only when asked to detokenize
                    text=c.text if sampling.stop else self._decode(token_ids),
                    token_ids=token_ids,
                    logprobs=logprobs,
                    finish_reason=str(c.finish_reason),
                    policy_version=self.policy_version,
                )
            )
        return RolloutResult(uid=request.uid, completions=completions)

    def _decode(self, token_ids: list[int]) -> str:
        """A completion's text as vLLM's detokenizer writes it: special tokens skipped, and
        the bytes of a character cut off by the token limit left out (decode would write
        U+FFFD for them, the incremental detokenizer holds them back)."""
        return self.tokenizer.decode(token_ids, skip_special_tokens=True).rstrip("\ufffd")

    # -- weight updates ---------------------------------------------------------------------

    def update_lora(
        self, tensors: dict[str, torch.Tensor], peft_config: dict[str, Any], version: int
    ) -> None:
        """Serve a new LoRA adapter (peft `save_pretrained` names and config) as `version`."""
        from vllm.lora.request import LoRARequest

        if not self._lora_enabled:
            raise ValueError("update_lora: the vLLM engine was built without enable_lora")
        rank = int(peft_config.get("r", 0))
        if rank > self.cfg.max_lora_rank:
            raise ValueError(
                f"update_lora: adapter rank {rank} exceeds rollout.max_lora_rank={self.cfg.max_lora_rank}"
            )
        lora_id = self._next_lora_id
        directory = self._update_root / f"v{version}-id{lora_id}"
        write_peft_adapter(directory, tensors, peft_config)
        request = LoRARequest(f"policy-v{version}-id{lora_id}", lora_id, str(directory))
        engine = self.llm.llm_engine
        if not engine.add_lora(request):
            raise RuntimeError(f"update_lora: vLLM refused adapter {directory}")
        self._next_lora_id += 1
        self._drop_lora()
        self._lora_request = request
        self._weights_changed(version)

    def update_full(self, state_dict: dict[str, torch.Tensor], version: int) -> None:
        """Reload the full weights in place (Hugging Face parameter names) as `version`.

        The weights travel as a safetensors file that the workers' `reload_weights` reads:
        tensors nested in an RPC argument reach the engine process as plain lists (vLLM's
        msgpack decoder restores tensors only where a type says so). The current LoRA adapter,
        if any, is dropped: the new weights are the whole policy."""
        from safetensors.torch import save_file

        check_full_state_dict(state_dict, self._known_names)
        directory = self._update_root / f"full-v{version}-{self._next_full_id}"
        self._next_full_id += 1
        directory.mkdir(parents=True)
        tensors = {name: t.detach().to("cpu").clone() for name, t in state_dict.items()}
        save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})
        self.llm.collective_rpc(
            "reload_weights", kwargs={"weights_path": str(directory), "is_checkpoint_format": True}
        )
        # The workers now point at this directory; the previous one can go.
        if self._full_dir is not None:
            shutil.rmtree(self._full_dir, ignore_errors=True)
        self._full_dir = directory
        self._drop_lora()
        self._weights_changed(version)

    def load_base(self) -> None:
        """Serve the checkpoint the engine was built from (`cfg.model`) again, as version 0:
        the adapter is dropped and replaced full weights are reloaded from disk."""
        if self._full_dir is not None:
            self.llm.collective_rpc(
                "reload_weights", kwargs={"weights_path": self.cfg.model, "is_checkpoint_format": True}
            )
            shutil.rmtree(self._full_dir, ignore_errors=True)
            self._full_dir = None
        self._drop_lora()
        self._weights_changed(0)

    def _drop_lora(self) -> None:
        old = self._lora_request
        self._lora_request = None
        if old is not None:
            self.llm.llm_engine.remove_lora(old.lora_int_id)
            shutil.rmtree(old.lora_path, ignore_errors=True)

    def _weights_changed(self, version: int) -> None:
        self.llm.reset_prefix_cache()
        self.llm.llm_engine.reset_encoder_cache()
        self.policy_version = int(version)

    def close(self) -> None:
        """Delete the adapter and weight files (the engine belongs to whoever built it)."""
        shutil.rmtree(self._update_root, ignore_errors=True)
