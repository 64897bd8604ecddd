"""repic-ray: RL post-training of multimodal LLMs for personalized captions, on Ray.

`repic_ray` is the pure core: configs, data, prompts, rewards, advantage and loss
math, the rollout and learner engines, evaluation and the concept store. It never
imports `ray`; `actors/` wraps these classes as Ray actors, `deploy/` serves them, and
`recipes/` composes them into the `repic` commands.

Tensor names carry their shape as a suffix, one letter per dimension:

    B  sequences in a batch (prompts x generations, flattened)
    P  prompts
    G  generations (samples) per prompt
    T  completion tokens (right-padded; a mask says which are real)
    L  full sequence tokens (prompt + completion)
    V  vocabulary
    K  concepts

e.g. `logprobs_BT`, `rewards_B`, `advantages_BT`, `mask_BT`, `rewards_PG`.
"""

__version__ = "0.1.0"
