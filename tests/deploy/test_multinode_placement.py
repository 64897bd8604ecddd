"""Multi-node placement: each role lands on the nodes its resources demand.

Two parts:

- The deployment recipes agree with the multi-node experiment config: every bundle the
  roles of `configs/multinode/repic_7b_2x8gpu.yaml` ask for (built by `actors.roles._bundle`,
  as the driver builds them) fits on the nodes that `deploy/cluster.yaml` and
  `deploy/kuberay_rayjob.yaml` declare.
- A simulated multi-node cluster (`ray.cluster_utils.Cluster`: a head, two "rollout"
  nodes offering `rollout_node`, one "learner" node offering `learner_node`; custom
  resources stand in for GPUs) runs the real placement code of `actors/roles.py`:
  `create_rollout_workers`, `create_reward_actors` and `LearnerGroup`. The vLLM rollout
  worker and the DeepSpeed learner engine are too heavy for four nodes on two cores, so
  those two classes are replaced by a trivial actor that reports
  `ray.get_runtime_context().get_node_id()`; the reward actor is the real one. The
  placement groups, bundles, scheduling strategies and the learner rendezvous are the
  project's own.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import jsonschema
import pytest
import ray
import yaml
from ray.util.placement_group import placement_group_table, remove_placement_group

from actors import roles
from repic_ray.config import load_config
from repic_ray.learner.config import LearnerConfig
from repic_ray.pipeline.config import ClusterConfig, ExperimentConfig, RoleResources

ROOT = Path(__file__).resolve().parents[2]
MULTINODE = ROOT / "configs" / "multinode" / "repic_7b_2x8gpu.yaml"
CLUSTER_YAML = ROOT / "deploy" / "cluster.yaml"
RAYJOB_YAML = ROOT / "deploy" / "kuberay_rayjob.yaml"
RUNTIME_ENV_YAML = ROOT / "deploy" / "job_runtime_env.yaml"


# --------------------------------------------------------------- recipes vs. config


def role_bundles(cfg: ExperimentConfig) -> dict[str, list[dict[str, float]]]:
    """The bundles each role's placement group asks for (as in actors/roles.py)."""
    c = cfg.cluster
    rollout_gpus = c.rollout.num_gpus * cfg.rollout.tensor_parallel_size
    return {
        "rollout": [roles._bundle(c.rollout, rollout_gpus)] * c.num_rollout_workers,
        "reward": [roles._bundle(c.reward)] * c.num_reward_actors,
        "learner": [roles._bundle(c.learner)] * c.num_learners,
    }


def place(nodes: list[dict[str, float]], bundles: dict[str, list[dict[str, float]]]) -> dict[str, list[int]]:
    """First-fit-decreasing of every bundle onto the nodes' resources.

    Returns the node index of each bundle per role; raises AssertionError naming the
    first bundle that fits nowhere (with what is left on every node)."""
    free = [dict(n) for n in nodes]
    order = sorted(
        ((role, i, b) for role, bs in bundles.items() for i, b in enumerate(bs)),
        key=lambda t: (-len(t[2]), -t[2].get("GPU", 0), -t[2].get("CPU", 0)),
    )
    where: dict[str, list[int]] = {role: [-1] * len(bs) for role, bs in bundles.items()}
    for role, i, bundle in order:
        for n, left in enumerate(free):
            if all(left.get(k, 0) >= v for k, v in bundle.items()):
                for k, v in bundle.items():
                    left[k] -= v
                where[role][i] = n
                break
        else:
            raise AssertionError(f"{role} bundle {i} {bundle} fits on no node; free: {free}")
    return where


def cluster_yaml_nodes(config: dict) -> list[dict[str, float]]:
    """Head + `min_workers` of every worker type, with the resources they advertise."""
    types = config["available_node_types"]
    nodes = [dict(types[config["head_node_type"]]["resources"])]
    for name, spec in types.items():
        if name != config["head_node_type"]:
            nodes += [dict(spec["resources"]) for _ in range(spec.get("min_workers", 0))]
    return nodes


def kuberay_nodes(job: dict) -> list[dict[str, float]]:
    """Ray resources of the RayJob's pods: CPU and GPU from the container limits (what
    KubeRay passes to `ray start`), custom resources from `rayStartParams.resources`."""

    def pod(group: dict) -> dict[str, float]:
        params = group.get("rayStartParams", {})
        limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
        res = {"CPU": float(limits["cpu"]), "GPU": float(params.get("num-gpus", limits.get("nvidia.com/gpu", 0)))}
        if "resources" in params:
            # KubeRay's format: a JSON object inside a quoted string.
            res.update(json.loads(json.loads(params["resources"])))
        return res

    spec = job["spec"]["rayClusterSpec"]
    nodes = [pod(spec["headGroupSpec"])]
    for group in spec["workerGroupSpecs"]:
        nodes += [pod(group) for _ in range(group["replicas"])]
    return nodes


@pytest.fixture(scope="module")
def multinode_cfg() -> ExperimentConfig:
    return load_config(ExperimentConfig, MULTINODE)


def test_cluster_yaml_is_a_valid_cluster_launcher_config():
    config = yaml.safe_load(CLUSTER_YAML.read_text())
    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    jsonschema.validate(config, schema)
    assert config["head_node_type"] in config["available_node_types"]


def test_multinode_recipe_fits_the_cluster_yaml(multinode_cfg):
    nodes = cluster_yaml_nodes(yaml.safe_load(CLUSTER_YAML.read_text()))
    where = place(nodes, role_bundles(multinode_cfg))
    # Rollout bundles only on the node offering `rollout_node`, learners on `learner_node`.
    assert {n for n in where["rollout"]} <= {i for i, r in enumerate(nodes) if r.get("rollout_node")}
    assert {n for n in where["learner"]} <= {i for i, r in enumerate(nodes) if r.get("learner_node")}
    assert len(where["learner"]) == 8 and len(where["rollout"]) == 4


def test_multinode_recipe_fits_the_kuberay_worker_groups(multinode_cfg):
    job = yaml.safe_load(RAYJOB_YAML.read_text())
    nodes = kuberay_nodes(job)
    where = place(nodes, role_bundles(multinode_cfg))
    assert {n for n in where["rollout"]} <= {i for i, r in enumerate(nodes) if r.get("rollout_node")}
    assert {n for n in where["learner"]} <= {i for i, r in enumerate(nodes) if r.get("learner_node")}
    # The job runs the multi-node recipe, joining the cluster KubeRay made.
    entry = job["spec"]["entrypoint"].split()
    assert entry[entry.index("--config") + 1] == str(MULTINODE.relative_to(ROOT))
    assert entry[entry.index("--address") + 1] == "auto"


def test_kuberay_runtime_env_sets_the_same_variables_as_the_job_runtime_env():
    job_env = yaml.safe_load(RUNTIME_ENV_YAML.read_text())["env_vars"]
    kuberay_env = yaml.safe_load(yaml.safe_load(RAYJOB_YAML.read_text())["spec"]["runtimeEnvYAML"])["env_vars"]
    assert kuberay_env == job_env


def test_fit_check_rejects_a_cluster_without_the_pinning_resource(multinode_cfg):
    # Same cluster, but the rollout node type forgot `rollout_node`: the recipe's
    # rollout bundles then fit nowhere, although enough GPUs exist.
    config = yaml.safe_load(CLUSTER_YAML.read_text())
    del config["available_node_types"]["rollout_gpu"]["resources"]["rollout_node"]
    with pytest.raises(AssertionError, match=r"rollout bundle \d+ .*rollout_node.* fits on no node"):
        place(cluster_yaml_nodes(config), role_bundles(multinode_cfg))


# ------------------------------------------------------------ simulated cluster


def node_reporter_class():
    """A trivial actor standing in for the vLLM worker and the DeepSpeed learner.

    Defined inside a function so that it is pickled by value (the test module is not
    importable from Ray's worker processes)."""

    class NodeReporter:
        def __init__(self, *args, **kwargs):
            self.args = args
            self.kwargs = kwargs

        def node_id(self) -> str:
            return ray.get_runtime_context().get_node_id()

        def rank(self) -> int:
            return self.kwargs.get("rank", -1)

        def rendezvous(self) -> tuple[str, int]:
            return self.kwargs["master_addr"], self.kwargs["master_port"]

    return NodeReporter


@pytest.fixture
def sim_cluster(ray_env, monkeypatch):
    """head (1 CPU) + 2 rollout nodes {rollout_node: 2} + 1 learner node {learner_node: 2}."""
    from ray.cluster_utils import Cluster

    # The nodes are started from this process, whose Ray config (auth mode included) was
    # fixed when Ray was first imported: keep token auth off explicitly so the in-process
    # GCS client and the node processes agree. (Ray 2.60 resolves a loopback node IP to
    # the host's address when connecting, so the nodes keep their default IP.)
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    common = {"object_store_memory": 80 * 1024**2}
    cluster = Cluster(
        initialize_head=True,
        head_node_args={**common, "num_cpus": 1, "include_dashboard": False, "resources": {"reward_node": 2}},
    )
    try:
        nodes = {
            "rollout": [cluster.add_node(**common, num_cpus=1, resources={"rollout_node": 2}) for _ in range(2)],
            "learner": [cluster.add_node(**common, num_cpus=1, resources={"learner_node": 2})],
        }
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, log_to_driver=False)
        ids = {role: {n.node_id for n in ns} for role, ns in nodes.items()}
        ids["head"] = {cluster.head_node.node_id}
        yield ids
    finally:
        ray.shutdown()
        cluster.shutdown()


def sim_config() -> ExperimentConfig:
    """Roles sized for the simulated cluster: 4 rollout workers (one `rollout_node` each),
    2 reward actors on the head (`reward_node`), 2 learner ranks (`learner_node`)."""
    cfg = ExperimentConfig()
    cfg.cluster = ClusterConfig(
        address="auto",
        num_rollout_workers=4,
        num_reward_actors=2,
        num_learners=2,
        rollout=RoleResources(num_cpus=0, resources={"rollout_node": 1}),
        reward=RoleResources(num_cpus=0, resources={"reward_node": 1}),
        learner=RoleResources(num_cpus=0, resources={"learner_node": 1}),
        placement_strategy="SPREAD",
    )
    return cfg


def bundle_nodes(pg) -> list[str]:
    table = placement_group_table(pg)
    assert table["state"] == "CREATED", table
    return [table["bundles_to_node_id"][i] for i in range(len(table["bundles"]))]


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_roles_land_on_the_nodes_their_resources_demand(sim_cluster, monkeypatch):
    reporter = node_reporter_class()
    monkeypatch.setattr(roles, "RolloutWorker", reporter)
    import repic_ray.learner.engine as learner_engine

    monkeypatch.setattr(learner_engine, "LearnerEngine", reporter)
    cfg = sim_config()

    workers, rollout_pg = roles.create_rollout_workers(cfg)
    rewards, reward_pg = roles.create_reward_actors(cfg)  # the real RewardActor
    learners = roles.LearnerGroup(LearnerConfig(), cfg.cluster.num_learners, cfg.cluster.learner,
                                  cfg.cluster.placement_strategy)

    # Rollout: 4 workers over the 2 rollout nodes (2 units each) -> 2 per node, and each
    # worker runs on the node of its own bundle.
    worker_nodes = ray.get([w.node_id.remote() for w in workers])
    assert worker_nodes == bundle_nodes(rollout_pg)
    assert sorted(worker_nodes.count(n) for n in sim_cluster["rollout"]) == [2, 2]
    assert set(worker_nodes) == sim_cluster["rollout"]

    # Reward: the real actors answer, on the head (the only node with `reward_node`).
    assert set(bundle_nodes(reward_pg)) == sim_cluster["head"]
    assert len(set(ray.get([a.pid.remote() for a in rewards]))) == 2

    # Learners: both ranks on the learner node, in rank order, sharing one rendezvous
    # address that rank 0's bundle resolved.
    learner_nodes = ray.get([a.node_id.remote() for a in learners.actors])
    assert set(learner_nodes) == sim_cluster["learner"]
    assert learner_nodes == bundle_nodes(learners.pg)
    assert ray.get([a.rank.remote() for a in learners.actors]) == [0, 1]
    addr, port = ray.get(learners.actors[0].rendezvous.remote())
    assert addr == ray.util.get_node_ip_address() and port > 0
    assert ray.get(learners.actors[1].rendezvous.remote()) == (addr, port)

    learners.shutdown()
    for pg in (rollout_pg, reward_pg):
        remove_placement_group(pg)


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_role_demanding_a_missing_resource_stays_pending(sim_cluster):
    # No node offers `gpu_node`: the role's placement group can never be created. Ray
    # keeps it pending (an autoscaler could still add such a node); the driver gives up
    # after `cluster.placement_timeout_s` with a message naming the role and the
    # cluster's resources, and removes the pending group.
    res = RoleResources(num_cpus=0, resources={"gpu_node": 1})
    with pytest.raises(RuntimeError, match=r"role 'rollout'.*gpu_node.*could not be placed.*learner_node"):
        roles._role_group(res, 1, "PACK", "rollout", timeout_s=3)
    def pending_gpu_groups():
        return [t for t in placement_group_table().values()
                if t["state"] != "REMOVED" and any("gpu_node" in b for b in t["bundles"].values())]

    deadline = time.monotonic() + 30
    while pending_gpu_groups() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not pending_gpu_groups()
    # The feasible roles still place on the same cluster.
    ok = roles._role_group(RoleResources(num_cpus=0, resources={"learner_node": 1}), 1, "PACK", "learner", timeout_s=30)
    remove_placement_group(ok)
