"""The `ray job submit` recipe against a real Ray head node.

A head node is started with `ray start --head --block` as a subprocess of this test, on
free ports, with a private temp dir and token auth with a per-test token; jobs are
submitted to its dashboard with the project's runtime env (`deploy/job_runtime_env.yaml`)
and `deploy/submit_job.sh`. At the end only that head's processes are stopped (its
process group; `ray stop` would stop every cluster on the machine) and checked gone.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import psutil
import pytest
import yaml

from repic_ray.ports import free_ports

ROOT = Path(__file__).resolve().parents[2]
SUBMIT = ROOT / "deploy" / "submit_job.sh"
RUNTIME_ENV = ROOT / "deploy" / "job_runtime_env.yaml"
BIN = Path(sys.executable).parent
RAY = str(BIN / "ray")


class Head:
    """A single-node Ray cluster owned by this test (started with `--block`)."""

    def __init__(self, root: Path):
        self.root = root
        gcs, dash, client, agent, agent_grpc, rt_agent, metrics = free_ports(7)
        self.dashboard = f"http://127.0.0.1:{dash}"
        self.token = uuid.uuid4().hex
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
        env.update(
            PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}",  # `python` of the job = this venv
            RAY_TMPDIR=str(root),  # its own `ray_current_cluster` file
            RAY_AUTH_MODE="token",
            RAY_AUTH_TOKEN=self.token,
            RAY_USAGE_STATS_ENABLED="0",
        )
        self.env = env
        cmd = [
            RAY, "start", "--head", "--block", "--disable-usage-stats",
            "--node-ip-address", "127.0.0.1", "--port", str(gcs),
            "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dash), "--include-dashboard", "true",
            "--ray-client-server-port", str(client), "--dashboard-agent-listen-port", str(agent),
            "--dashboard-agent-grpc-port", str(agent_grpc), "--runtime-env-agent-port", str(rt_agent),
            "--metrics-export-port", str(metrics), "--num-cpus", "4", "--temp-dir", str(root / "ray"),
        ]
        self.log = open(root / "head.log", "w")  # noqa: SIM115 - held open for the head's lifetime
        # Own process group: the head's services (and the job processes) can be found and
        # stopped without touching any other Ray cluster on the machine.
        self.proc = subprocess.Popen(cmd, env=env, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)

    def client(self):
        from ray.job_submission import JobSubmissionClient

        return JobSubmissionClient(self.dashboard, headers={"Authorization": f"Bearer {self.token}"})

    def wait_ready(self, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                head_log = (self.root / "head.log").read_text()
                raise RuntimeError(f"ray start exited with {self.proc.returncode}: {head_log}")
            try:
                self.client().list_jobs()
                return
            except Exception:
                if time.monotonic() > deadline:
                    raise
                time.sleep(1)

    def processes(self) -> list[psutil.Process]:
        """Every live process of this head: the `ray start` process, its process group
        and all their descendants."""
        found: dict[int, psutil.Process] = {}
        for p in psutil.process_iter():
            try:
                if os.getpgid(p.pid) == self.proc.pid:
                    found[p.pid] = p
            except (ProcessLookupError, psutil.Error):
                continue
        try:
            top = psutil.Process(self.proc.pid)
            found[top.pid] = top
            found.update({c.pid: c for c in top.children(recursive=True)})
        except psutil.NoSuchProcess:
            pass
        return list(found.values())

    def stop(self) -> list[psutil.Process]:
        """SIGTERM the blocking `ray start` (it shuts its node down), SIGKILL what is left
        of the process group after 30 s; returns the processes that were running."""
        procs = self.processes()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                pass
        _, alive = psutil.wait_procs(procs, timeout=15)
        if alive:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            for p in alive:
                try:
                    p.kill()
                except psutil.NoSuchProcess:
                    pass
            psutil.wait_procs(alive, timeout=15)
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.log.close()
        return procs


@pytest.fixture(scope="module")
def head():
    root = Path(tempfile.mkdtemp(prefix="rj", dir="/tmp"))  # short: Unix socket paths
    h = Head(root)
    try:
        h.wait_ready()
        yield h
    finally:
        procs = h.stop()
        still = [p.pid for p in procs if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
        assert not still, f"head processes still running after stop: {still}"
        assert procs, "found no processes of the head node to stop"
        import shutil

        shutil.rmtree(root, ignore_errors=True)


def job_status(head: Head, submission_id: str) -> str:
    return str(head.client().get_job_status(submission_id).value)


PROBE = (
    "import json, os, sys, actors; "
    "json.dump({'cwd': os.getcwd(), 'listing': sorted(os.listdir('.')), 'actors': actors.__file__, "
    "'env': {k: os.environ.get(k) for k in ('HF_HUB_OFFLINE', 'TOKENIZERS_PARALLELISM', 'REPIC_CACHE')}}, "
    "open(sys.argv[1], 'w'))"
)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_world_job_runs_the_uploaded_project_with_the_runtime_env(head, tmp_path):
    out = tmp_path / "world"
    probe = tmp_path / "probe.json"
    sid = f"world-{uuid.uuid4().hex[:8]}"
    entry = (
        f"python -m recipes.cli world --out {out} --num-concepts 4 --num-train 8 --num-sft 4 "
        f"--num-eval-per-k 1 --max-concepts-per-image 2 && python -c \"{PROBE}\" {probe}"
    )
    proc = subprocess.run(
        [RAY, "job", "submit", "--address", head.dashboard, "--submission-id", sid,
         "--working-dir", str(ROOT), "--runtime-env", str(RUNTIME_ENV), "--", "bash", "-c", entry],
        env=head.env, cwd=ROOT, check=False, capture_output=True, text=True, timeout=240,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert job_status(head, sid) == "SUCCEEDED"
    logs = head.client().get_job_logs(sid)
    assert f"wrote {out}" in logs

    # The world the job generated, in the real formats.
    world = json.loads((out / "world.json").read_text())
    assert world["config"]["num_train"] == 8 and len(world["concepts"]) == 4
    train = (out / "train" / "train.jsonl").read_text().splitlines()
    assert len(train) == 8 and all(json.loads(line)["problem"] for line in train)
    db = json.loads((out / "concepts" / "database.json").read_text())
    assert len(db["concept_dict"]) == 4

    # It ran from the uploaded copy of the project, not from the checkout, with the
    # runtime env's variables, and without the excluded folders.
    seen = json.loads(probe.read_text())
    assert Path(seen["actors"]).resolve().is_relative_to(Path(seen["cwd"]).resolve())
    assert not Path(seen["cwd"]).resolve().is_relative_to(ROOT)
    assert {"actors", "repic_ray", "configs", "deploy"} <= set(seen["listing"])
    assert not {".venv", ".cache", ".git", "runs"} & set(seen["listing"])
    expected = yaml.safe_load(RUNTIME_ENV.read_text())["env_vars"]
    assert seen["env"] == {k: expected[k] for k in seen["env"]}


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_submit_job_sh_surfaces_a_bad_config_as_a_failed_job(head):
    sid = f"badcfg-{uuid.uuid4().hex[:8]}"
    env = {**head.env, "RAY_ADDRESS": head.dashboard, "RAY": RAY, "REPIC_JOB_ARGS": f"--submission-id {sid}"}
    proc = subprocess.run(
        [str(SUBMIT), "configs/tiny_cpu.yaml", "--trainer.steps", "-1"],
        env=env, cwd=tempfile.gettempdir(), check=False, capture_output=True, text=True, timeout=240,
    )
    # The driver started inside the cluster, parsed the recipe with the override, and
    # failed naming the file and the field; `ray job submit` passes the failure on.
    assert proc.returncode != 0
    assert job_status(head, sid) == "FAILED"
    logs = head.client().get_job_logs(sid)
    assert "config error: configs/tiny_cpu.yaml: trainer: steps must be >= 0, got -1" in logs
    info = head.client().get_job_info(sid)
    assert info.entrypoint.endswith("--trainer.steps -1 --address auto")
    assert "python -m recipes.cli train --config configs/tiny_cpu.yaml" in info.entrypoint


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_submit_job_sh_runs_a_two_step_training_job(head, tmp_path):
    """The README's multi-node path end to end: a real (2-step) `repic train` as a Ray job
    on the head node, from the uploaded project, with its outputs checked."""
    sid = f"train-{uuid.uuid4().hex[:8]}"
    out = tmp_path / "run"
    env = {**head.env, "RAY_ADDRESS": head.dashboard, "RAY": RAY, "REPIC_JOB_ARGS": f"--submission-id {sid}"}
    proc = subprocess.run(
        [str(SUBMIT), "configs/tiny_cpu.yaml", "--trainer.steps", "2", "--trainer.output_dir", str(out),
         "--trainer.eval_before", "false", "--data.eval_max_per_k", "1", "--algo.prompts_per_step", "2",
         "--trainer.progress_bar", "false"],
        env=env, cwd=tempfile.gettempdir(), check=False, capture_output=True, text=True, timeout=1100,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert job_status(head, sid) == "SUCCEEDED"
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    assert all(r["train/loss"] == r["train/loss"] and r["rollout/samples"] > 0 for r in rows)
    assert (out / "checkpoints" / "step_000002" / "manifest.json").exists()  # sealed
    assert (out / "final" / "model" / "model.safetensors").exists()
    assert (out / "report.md").exists()


def run_submit(args: list[str], **env: str) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    return subprocess.run([str(SUBMIT), *args], env={**base, **env}, check=False, capture_output=True,
                          text=True, timeout=30)


def test_submit_job_sh_needs_ray_address():
    proc = run_submit(["configs/tiny_cpu.yaml"])
    assert proc.returncode == 2
    assert "set RAY_ADDRESS" in proc.stderr


def test_submit_job_sh_rejects_a_missing_config():
    proc = run_submit(["configs/nope.yaml"], RAY_ADDRESS="http://127.0.0.1:1")
    assert proc.returncode == 2
    assert "config file not found: configs/nope.yaml" in proc.stderr


def test_submit_job_sh_without_arguments_prints_usage():
    proc = run_submit([])
    assert proc.returncode == 2
    assert "deploy/submit_job.sh configs/" in proc.stderr
