"""`resolve(cfg)`: one source of truth for every setting of an experiment.

Several components need a copy of one setting: the rollout samples `algo.group_size`
completions per prompt, the learner divides logits by the rollout's temperature, every
component is seeded. `resolve` fills each copy (a field whose docstring starts with
"Derived:") from its source, and checks the rules that span sections, so a config that
cannot run fails when it is loaded, with a message naming both fields.

A derived field may be written in a recipe only with the value it derives to; any other
value is an error naming the field and its source. Pure: no files, no imports of Ray.
"""

from __future__ import annotations

import copy
from collections.abc import Collection
from typing import TYPE_CHECKING, Any

from repic_ray.config import ConfigError

if TYPE_CHECKING:  # `ExperimentConfig.resolved` calls `resolve`: no import at run time
    from repic_ray.pipeline.config import ExperimentConfig

GROUP_ESTIMATORS = ("grpo", "drgrpo", "rloo")


def _get(cfg: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        cfg = getattr(cfg, part)
    return cfg


def _set(cfg: Any, dotted: str, value: Any) -> None:
    *parents, last = dotted.split(".")
    for part in parents:
        cfg = getattr(cfg, part)
    setattr(cfg, last, value)


def derived_fields(cfg: ExperimentConfig) -> dict[str, tuple[str, Any]]:
    """`{derived field: (source field, value)}` of this config."""
    seed = cfg.trainer.seed
    return {
        "sampling.n": ("algo.group_size", cfg.algo.group_size),
        "sampling.seed": ("trainer.seed", seed),
        "rollout.seed": ("trainer.seed", seed),
        "learner.seed": ("trainer.seed", seed),
        "learner.loss.temperature": ("sampling.temperature", cfg.sampling.temperature),
        "learner.loss.block_vision_tokens": ("sampling.block_vision_tokens",
                                             cfg.sampling.block_vision_tokens),
        "rollout.model": ("learner.model", cfg.learner.model),
    }


def max_world_images(cfg: ExperimentConfig) -> int | None:
    """Most images in one prompt of the generated world (up to references_per_concept
    photos of each present and absent concept, then the query); None when the data are
    files of a real dataset."""
    if cfg.data.train_file or cfg.data.world_dir:
        return None
    world = cfg.data.world
    concepts = min(world.max_k + world.max_absent_refs, world.num_concepts)
    return concepts * world.references_per_concept + 1


def check_rules(cfg: ExperimentConfig) -> None:
    """Cross-section rules; each error names both fields."""
    if cfg.sampling.temperature == 0:
        raise ConfigError(
            f"sampling.temperature: 0 (greedy) makes all algo.group_size={cfg.algo.group_size} "
            "samples of a prompt identical, so every advantage is zero; use a temperature > 0 "
            "(eval_sampling is the greedy one)"
        )
    if cfg.sampling.greedy_member and cfg.algo.mode == "async" and cfg.sampling.temperature != 1:
        raise ConfigError(
            f"sampling.greedy_member with algo.mode=async needs sampling.temperature 1 (got "
            f"{cfg.sampling.temperature}): the greedy completion's log-probs, the old ones "
            "off-policy, are those of temperature 1"
        )
    if cfg.eval_sampling.greedy_member:
        raise ConfigError("eval_sampling.greedy_member: evaluation samples one completion per prompt")
    lora = cfg.learner.lora
    if cfg.cluster.weight_sync == "lora" and lora.enabled != cfg.rollout.enable_lora:
        raise ConfigError(
            f"cluster.weight_sync=lora needs learner.lora.enabled ({lora.enabled}) and "
            f"rollout.enable_lora ({cfg.rollout.enable_lora}) both true"
        )
    if lora.enabled and cfg.rollout.enable_lora and lora.r > cfg.rollout.max_lora_rank:
        raise ConfigError(
            f"learner.lora.r ({lora.r}) exceeds rollout.max_lora_rank "
            f"({cfg.rollout.max_lora_rank}): the rollout engine could not load the adapter"
        )
    batch = cfg.algo.prompts_per_step * cfg.algo.group_size
    if batch % cfg.cluster.num_learners:
        raise ConfigError(
            f"algo.prompts_per_step x algo.group_size ({batch}) must split evenly over "
            f"cluster.num_learners ({cfg.cluster.num_learners})"
        )
    algo = cfg.algo
    if algo.ptx_coef > 0 and algo.ptx_batch_size % cfg.cluster.num_learners:
        raise ConfigError(
            f"algo.ptx_batch_size ({algo.ptx_batch_size}) must split evenly over "
            f"cluster.num_learners ({cfg.cluster.num_learners})"
        )
    if algo.kl_in_reward and algo.estimator in GROUP_ESTIMATORS:
        raise ConfigError(
            f"algo.kl_in_reward has no effect with algo.estimator={algo.estimator!r} (its "
            "advantages use sequence rewards only); put the KL in the loss "
            "(learner.loss.kl_beta) or use reinforce_pp / gae"
        )
    if algo.estimator == "gae" and not cfg.learner.critic.enabled:
        raise ConfigError(
            "algo.estimator=gae needs a value model: set learner.critic.enabled true "
            "(or use a critic-free estimator: grpo, drgrpo, rloo, reinforce_pp)"
        )
    if cfg.learner.critic.enabled and algo.estimator != "gae":
        raise ConfigError(
            f"learner.critic.enabled trains a value model that algo.estimator={algo.estimator!r} "
            "does not use; set algo.estimator gae or learner.critic.enabled false"
        )
    if algo.kl_in_reward and algo.kl_reward_beta <= 0:
        raise ConfigError("algo.kl_in_reward needs algo.kl_reward_beta > 0 (0 folds in nothing)")
    if not algo.kl_in_reward and algo.kl_reward_beta > 0:
        raise ConfigError(
            f"algo.kl_reward_beta ({algo.kl_reward_beta}) is used only with algo.kl_in_reward: true"
        )
    for section in ("sampling", "eval_sampling"):
        max_tokens = _get(cfg, section).max_tokens
        if max_tokens >= cfg.rollout.max_model_len:
            raise ConfigError(
                f"{section}.max_tokens ({max_tokens}) leaves no room for the prompt in "
                f"rollout.max_model_len ({cfg.rollout.max_model_len})"
            )
    images = max_world_images(cfg)
    if images is not None and images > cfg.rollout.limit_images_per_prompt:
        world = cfg.data.world
        raise ConfigError(
            f"rollout.limit_images_per_prompt ({cfg.rollout.limit_images_per_prompt}) is below "
            f"the {images} images of the largest prompt of the generated world "
            f"(data.world.max_concepts_per_image={world.max_concepts_per_image} present + "
            f"data.world.max_absent_refs={world.max_absent_refs} absent concepts, up to "
            f"data.world.references_per_concept={world.references_per_concept} photos each, "
            f"+ the query)"
        )


def resolve(cfg: ExperimentConfig, explicit: Collection[str] = ()) -> ExperimentConfig:
    """A copy of `cfg` with every derived field filled from its source, after the
    cross-section rules. `explicit`: the dotted keys the recipe and overrides wrote; a
    derived one among them must hold the value it derives to."""
    out = copy.deepcopy(cfg)
    for dotted, (source, value) in derived_fields(out).items():
        current = _get(out, dotted)
        if dotted in explicit and current != value:
            raise ConfigError(
                f"{dotted} ({current!r}) is derived from {source} ({value!r}); set {source} "
                f"instead, or leave {dotted} out"
            )
        _set(out, dotted, value)
    check_rules(out)
    return out
