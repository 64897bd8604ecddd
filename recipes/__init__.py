"""Recipes: the commands that compose the core (`repic_ray`) and the Ray roles (`actors`):
RL training, SFT, evaluation, and the `repic` CLI that dispatches to them."""
