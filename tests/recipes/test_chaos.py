"""Chaos: a seeded 10-step run in which a rollout worker, the reward actor and the learner
are each killed once, in a seeded order at seeded moments (mid-generate, mid-score,
mid-train or mid-save), ends with every metric of the same run undisturbed; past
`cluster.max_actor_restarts` learner failures, the run stops with a message naming the
role."""

from __future__ import annotations

import math
import random
import threading
import time

import pytest
import ray

from recipes import train as driver
from tests.recipes.test_train import tiny_cfg

pytestmark = pytest.mark.slow
# Three kills wait for three seeded steps among the first STEPS - 2 and leave the last
# step alone, so the last kill (at most 0.8 s after its step starts) has room to land.
STEPS = 10
ROLES = ("rollout", "reward", "learner")


class Killer(threading.Thread):
    """Kills one actor of each role (order, actor and delay drawn from `seed`) while the
    driver runs."""

    def __init__(self, run, seed: int):
        super().__init__(daemon=True)
        self.run_, self.rng, self.killed = run, random.Random(seed), []

    def run(self) -> None:
        # Each kill is tied to the run's progress, not to wall time (a fast machine would
        # finish before a timed kill): wait for a seeded step, then a seeded fraction of a
        # second into it, so the kill lands mid-phase (generate, score, train or save).
        targets = sorted(self.rng.sample(range(STEPS - 2), len(ROLES)))
        for target, role in zip(targets, self.rng.sample(ROLES, len(ROLES))):
            while self.run_.step < target:
                time.sleep(0.02)
            time.sleep(self.rng.uniform(0.05, 0.8))
            if self.run_.step >= STEPS - 1:  # leave the last step, final export and eval alone
                return
            handles = self.run_.handles
            actors = {"rollout": handles.rollout, "reward": handles.rewards,
                      "learner": handles.learners.actors}[role]
            # Rollout workers and reward actors are restarted by Ray (their calls retried);
            # a learner is not: the driver rebuilds the group from the last checkpoint.
            ray.kill(self.rng.choice(actors), no_restart=role == "learner")
            self.killed.append((role, self.run_.step))


@pytest.fixture(scope="module")
def run(tmp_path_factory, ray_local):
    cfg = tiny_cfg(tmp_path_factory.mktemp("chaos"), **{
        "trainer.steps": STEPS, "trainer.keep_checkpoints": STEPS + 2, "trainer.eval_before": "false"})
    r = driver.start_run(cfg)
    r.data.eval_splits = {}
    yield r
    driver.shutdown(r)


def logged(row: dict) -> dict:
    """A metrics row without wall-clock timings and throughputs."""
    return {k: v for k, v in row.items()
            if not k.startswith(("time/", "perf/")) and k not in ("rollout/worker_generate_s",
                                                                  "rollout/worker_tokens_per_s")}


def test_killed_roles_leave_the_metrics_of_an_undisturbed_run(run):
    driver.save_checkpoint(run)  # step 0: both runs start here
    driver.fit(run)
    undisturbed = run.metrics.read()
    driver.restore_checkpoint(run, run.out / "checkpoints" / "step_000000")
    killer = Killer(run, seed=0)
    killer.start()
    driver.fit(run)
    killer.join()
    disturbed = run.metrics.read()
    assert sorted(role for role, _ in killer.killed) == sorted(ROLES), killer.killed
    assert [r["step"] for r in disturbed] == list(range(1, STEPS + 1))
    # Every metric, post-update ones included (loss, KL, entropy, grad norm, clip fraction,
    # log-prob mismatch, every reward component, lengths, sample counts). The two runs are
    # the same computation on the same processes' settings and came out bitwise equal here;
    # the tolerance only allows for reduction-order noise. abs_tol is for values that are
    # ~0 by construction (the policy loss at ratio 1 is a mean of group-normalized
    # advantages, ~1e-9..1e-8 of float noise); the rewards of this random model are ~1e-6,
    # so a looser abs_tol would hide a different batch.
    for a, b in zip(undisturbed, disturbed):
        a, b = logged(a), logged(b)
        assert a.keys() == b.keys(), (a["step"], a.keys() ^ b.keys())
        for key in a:
            assert math.isclose(a[key], b[key], rel_tol=1e-5, abs_tol=1e-9), (a["step"], key, a[key], b[key])


def test_learner_failures_past_the_cap_stop_the_run_naming_the_role(run):
    run.cfg.cluster.max_actor_restarts = 0
    run.cfg.trainer.steps = run.step + 1
    ray.kill(run.handles.learners.actors[0])
    with pytest.raises(RuntimeError, match=r"learner failed 1 times, more than cluster.max_actor_restarts=0"):
        driver.fit(run)
