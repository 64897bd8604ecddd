"""Pure pieces of the training pipeline: prompt sampling, experience assembly,
metrics and the run report. The RL recipe (`recipes/train.py`) composes them."""
