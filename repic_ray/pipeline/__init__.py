"""Pure pieces of the training pipeline: prompt sampling, experience assembly,
metrics and the run report. The Ray driver in `actors/` composes them."""
