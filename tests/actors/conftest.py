"""The actor tests use the recipes' private local Ray cluster fixture (one per module)."""

from tests.recipes.conftest import ray_local  # noqa: F401  (a fixture, used by name)
