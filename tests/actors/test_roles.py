"""Tests for actors/roles.py's thread setting: what each role's actor starts with."""

from __future__ import annotations

from actors.roles import _thread_env, role_threads
from repic_ray.pipeline.config import RoleResources


def test_each_role_gets_one_thread_per_reserved_cpu_unless_it_names_its_threads():
    assert role_threads(RoleResources(num_cpus=0.5)) == 1
    assert role_threads(RoleResources(num_cpus=0)) == 1
    assert role_threads(RoleResources(num_cpus=3.7)) == 3
    assert role_threads(RoleResources(num_cpus=1, num_threads=2)) == 2


def test_the_thread_count_is_in_the_actors_environment_whatever_the_shell_says(monkeypatch):
    # Ray keeps an OMP_NUM_THREADS it finds in the environment that started the cluster;
    # the role's own value goes into the actor's runtime env, which Ray applies over it.
    monkeypatch.setenv("OMP_NUM_THREADS", "16")
    assert _thread_env(RoleResources(num_cpus=1)) == {"env_vars": {"OMP_NUM_THREADS": "1"}}
    assert _thread_env(RoleResources(num_cpus=1, num_threads=2)) == {"env_vars": {"OMP_NUM_THREADS": "2"}}
