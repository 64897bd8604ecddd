"""`repic plan`: will a recipe fit the cluster it is meant for? Memory per role, placement
of each role's placement group on the nodes, and a verdict, computed without a GPU.

    plan = make_plan(cfg, Hardware(nodes=2, gpus_per_node=8, gpu_memory_gib=80))
    print(format_plan(plan))

Architecture numbers come from the checkpoint's `config.json` when the path exists, else
from `repic_ray.models.known` (hub ids of known models, and the shape-faithful 7B).

What is counted, per role (bytes):
- learner (one rank of K): the policy's weights in the training dtype; for trainable
  parameters (LoRA adapters, or the language model in full fine-tuning) the 16-bit
  weights, 16-bit and fp32 gradients, fp32 master weights and Adam's two moments,
  partitioned over the K ranks by ZeRO stage exactly as DeepSpeed's
  `estimate_zero2_model_states_mem_needs` / `estimate_zero3_model_states_mem_needs` count
  them (fp32 training: weights, gradients and moments, no master copy); activations of
  one micro-batch of `micro_batch_size` sequences of `seq_len` tokens (default: the
  engine's `max_model_len`, the longest sequence it admits), with and without gradient
  checkpointing, plus the completion logits (the learner's lm_head sees completion tokens
  only). Activation numbers are estimates (SDPA attention, no attention matrix stored).
- rollout (one vLLM worker of N, per tensor-parallel shard): weights, the LoRA slots,
  a profiled-activation allowance, and the KV-cache tokens left at
  `gpu_memory_utilization` (or the fixed `kv_cache_gib`). vLLM refuses to start when the
  cache cannot hold one `max_model_len` sequence; that is the verdict's test.
Roles without GPUs are counted against the node's host memory instead.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from repic_ray.models.known import KNOWN_CONFIGS, SHAPES_SPEC, shapes_config

GIB = 1 << 30
LORA_TARGETS_PER_LAYER = 7  # q, k, v, o, gate, up, down of each language layer
FRAMEWORK_OVERHEAD_GIB = 1.5
"""CUDA context, NCCL buffers, allocator fragmentation: kept free on every GPU."""
ROLLOUT_DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4, "auto": 2}


@dataclass(frozen=True)
class Arch:
    """The sizes of a Qwen2.5-VL checkpoint that memory depends on."""

    source: str
    vocab: int
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    tie_embeddings: bool
    v_hidden: int
    v_depth: int
    v_intermediate: int
    v_out: int
    patch: int
    merge: int
    temporal_patch: int
    in_channels: int = 3

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim

    def text_layer_params(self) -> int:
        h, kv, i = self.hidden, self.kv_dim, self.intermediate
        attn = (h * h + h) + 2 * (h * kv + kv) + h * h  # q, k, v with bias; o without
        return attn + 3 * h * i + 2 * h  # SwiGLU MLP, two RMSNorms

    def text_params(self) -> int:
        embed = self.vocab * self.hidden
        head = 0 if self.tie_embeddings else embed
        return embed + self.layers * self.text_layer_params() + self.hidden + head

    def vision_params(self) -> int:
        h, i, m2 = self.v_hidden, self.v_intermediate, self.merge**2
        patch = self.in_channels * self.temporal_patch * self.patch**2 * h
        block = 2 * h + (3 * h * h + 3 * h) + (h * h + h) + 2 * (h * i + i) + (i * h + h)
        merger = h + (h * m2 * h * m2 + h * m2) + (h * m2 * self.v_out + self.v_out)
        return patch + self.v_depth * block + merger

    def total_params(self) -> int:
        return self.text_params() + self.vision_params()

    def largest_layer_params(self) -> int:
        """Parameters of the largest single module (DeepSpeed's `largest_layer_params`)."""
        return max(self.vocab * self.hidden, self.hidden * self.intermediate)

    def lora_params(self, r: int) -> int:
        """LoRA A and B of rank r on q/k/v/o/gate/up/down of every language layer."""
        h, kv, i = self.hidden, self.kv_dim, self.intermediate
        per_layer = (h + h) + 2 * (h + kv) + (h + h) + 2 * (h + i) + (i + h)
        return r * per_layer * self.layers

    @classmethod
    def from_config(cls, cfg: dict[str, Any], source: str) -> Arch:
        """From a Qwen2.5-VL `config.json` (old flat layout or transformers 5's `text_config`)."""
        text = {**cfg, **cfg.get("text_config", {})}
        vision = cfg["vision_config"]
        try:
            return cls(
                source=source,
                vocab=text["vocab_size"],
                hidden=text["hidden_size"],
                layers=text["num_hidden_layers"],
                heads=text["num_attention_heads"],
                kv_heads=text.get("num_key_value_heads", text["num_attention_heads"]),
                intermediate=text["intermediate_size"],
                tie_embeddings=bool(cfg.get("tie_word_embeddings", text.get("tie_word_embeddings", False))),
                v_hidden=vision.get("hidden_size", vision.get("embed_dim")),
                v_depth=vision["depth"],
                v_intermediate=vision["intermediate_size"],
                v_out=vision.get("out_hidden_size", text["hidden_size"]),
                patch=vision.get("patch_size", 14),
                merge=vision.get("spatial_merge_size", 2),
                temporal_patch=vision.get("temporal_patch_size", 2),
                in_channels=vision.get("in_channels", vision.get("in_chans", 3)),
            )
        except KeyError as err:
            raise ValueError(f"{source}: not a Qwen2.5-VL config, {err.args[0]!r} missing") from None


def resolve_arch(spec: str) -> Arch:
    """The architecture of a checkpoint spec, without loading weights: a local directory's
    `config.json`, a known hub id, the shape-faithful 7B, or a built tiny model."""
    path = Path(spec)
    if (path / "config.json").is_file():
        return Arch.from_config(json.loads((path / "config.json").read_text()), f"{spec}/config.json")
    if spec in KNOWN_CONFIGS:
        return Arch.from_config(KNOWN_CONFIGS[spec], f"{spec} (built-in table)")
    if spec == SHAPES_SPEC:
        return Arch.from_config(shapes_config(), f"{spec} (built-in table)")
    if spec.startswith("tiny:"):
        from repic_ray.models.loading import resolve_checkpoint

        return resolve_arch(resolve_checkpoint(spec))
    known = ", ".join(sorted(KNOWN_CONFIGS))
    raise ValueError(f"model {spec!r}: no config.json at that path and not a known model ({known})")


@dataclass(frozen=True)
class Hardware:
    """The cluster a recipe is planned for (every node alike)."""

    nodes: int = 1
    gpus_per_node: int = 8
    gpu_memory_gib: float = 80.0
    cpus_per_node: int = 64
    host_memory_gib: float = 512.0

    def __post_init__(self) -> None:
        if self.nodes < 1 or self.gpus_per_node < 0 or self.cpus_per_node < 1:
            raise ValueError("need nodes >= 1, gpus_per_node >= 0 and cpus_per_node >= 1")
        if self.gpu_memory_gib <= 0 or self.host_memory_gib <= 0:
            raise ValueError("gpu_memory_gib and host_memory_gib must be > 0")


# ----------------------------------------------------------------------- learner memory


def model_states_bytes(trainable: int, frozen: int, stage: int, ranks: int, dtype: str,
                       largest_layer: int = 0) -> dict[str, int]:
    """Weights, gradients and optimizer states of one data-parallel rank (bytes).

    bf16 (mixed precision), per trainable parameter: 2 (bf16 weight) + 2 (bf16 grad) +
    4 (fp32 grad) + 4 (fp32 master) + 8 (Adam m, v) = 20 bytes; ZeRO-1 partitions the
    last 16 over the ranks, ZeRO-2 the last 18 (DeepSpeed's `2P + 18P/N`), ZeRO-3 all
    but the 16-bit gradients (reduce buckets only) and holds the largest layer gathered
    (DeepSpeed's `4 * largest + 18P/N`). fp32: 4 + 4 + 8 = 16 bytes, no master copy.
    Frozen weights (the LoRA base) are partitioned only by ZeRO-3.
    """
    if stage not in (0, 1, 2, 3):
        raise ValueError(f"ZeRO stage must be 0-3, got {stage}")
    if dtype not in ("bf16", "fp32"):
        raise ValueError(f"dtype must be bf16 or fp32, got {dtype!r}")
    # bytes per trainable parameter, in the order ZeRO partitions them
    weight, grad16, rest = (2, 2, 4 + 4 + 8) if dtype == "bf16" else (4, 0, 4 + 8)
    t, n = trainable, ranks
    if stage == 0:
        replicated, partitioned = weight + grad16 + rest, 0
    elif stage == 1:
        replicated, partitioned = weight + grad16, rest
    elif stage == 2:
        replicated, partitioned = weight, grad16 + rest
    else:  # 16-bit gradients live only in the reduce buckets (DeepSpeed counts 18 for bf16)
        replicated, partitioned = 0, weight + rest
    states = {
        "frozen_weights": frozen * (2 if dtype == "bf16" else 4) // (n if stage == 3 else 1),
        "states_replicated": replicated * t,
        "states_partitioned": partitioned * t // n,
    }
    if stage == 3:  # the largest layer gathered whole, in DeepSpeed's 4 bytes per parameter
        states["gathered_layer"] = 4 * largest_layer
    return states


def activation_bytes(arch: Arch, micro: int, seq_len: int, completion: int, dtype: str,
                     lora_dropout: bool, checkpointing: bool) -> dict[str, int]:
    """Estimated activation memory of one micro-batch forward + backward.

    Per language layer and token, without checkpointing, saved tensors of
    10 h + 2 kv + 4 i elements (norm inputs/outputs, q/k/v before and after RoPE, the
    attention output, the SwiGLU gate/up/act/product) plus, with LoRA dropout, the 6
    dropped copies of h-wide inputs and one i-wide one. With checkpointing, one h-wide
    layer input per layer plus one layer recomputed during backward. Logits: the
    completion's logits in bf16, fp32, their log-softmax and its gradient (14 bytes)."""
    b = 2 if dtype == "bf16" else 4
    h, kv, i = arch.hidden, arch.kv_dim, arch.intermediate
    per_layer_token = b * (10 * h + 2 * kv + 4 * i + ((6 * h + i) if lora_dropout else 0))
    tokens = micro * seq_len
    if checkpointing:
        layers = tokens * (arch.layers * b * h + per_layer_token)
    else:
        layers = tokens * arch.layers * per_layer_token
    logits = micro * completion * arch.vocab * (14 if dtype == "bf16" else 12)
    return {"layers": layers, "logits": logits}


# ----------------------------------------------------------------------- rollout memory


def kv_bytes_per_token(arch: Arch, dtype_bytes: int, tp: int) -> int:
    """K and V of every layer for one token on one tensor-parallel shard (KV heads are
    split over the shards, replicated when there are more shards than heads)."""
    kv_heads = max(1, arch.kv_heads // tp)
    return 2 * arch.layers * kv_heads * arch.head_dim * dtype_bytes


def rollout_activation_bytes(arch: Arch, batched_tokens: int, max_seqs: int, dtype_bytes: int, tp: int) -> int:
    """Peak of vLLM's profiling forward (estimate): one layer's widest tensors for
    `max_num_batched_tokens` tokens, plus fp32 logits and their softmax for `max_num_seqs`."""
    width = 2 * arch.hidden + (arch.hidden + 2 * arch.kv_dim + 2 * arch.intermediate) // tp
    return batched_tokens * width * dtype_bytes + max_seqs * arch.vocab * 4 * 2


# ----------------------------------------------------------------------------- placement


def _bundle(num_cpus: float, gpus: float, resources: dict[str, float]) -> dict[str, float]:
    return {k: v for k, v in {"CPU": num_cpus, "GPU": gpus, **resources}.items() if v}


def _fits(free: dict[str, float], bundle: dict[str, float]) -> bool:
    return all(free.get(k, 0.0) + 1e-9 >= v for k, v in bundle.items())


def _take(free: dict[str, float], bundle: dict[str, float]) -> None:
    for k, v in bundle.items():
        free[k] = free.get(k, 0.0) - v


def place_group(nodes: list[dict[str, float]], bundles: list[dict[str, float]], strategy: str) -> list[int] | None:
    """Node index of each bundle under Ray's placement strategy, taking the resources from
    `nodes`; None (and nothing taken) when the group cannot be placed."""
    trial = [dict(n) for n in nodes]
    where: list[int] = []
    if strategy == "STRICT_PACK":
        for idx, node in enumerate(trial):
            probe = dict(node)
            if all(_fits(probe, b) and (_take(probe, b) or True) for b in bundles):
                where = [idx] * len(bundles)
                trial[idx] = probe
                break
        else:
            return None
    else:
        for b in bundles:
            used = set(where)
            if strategy == "PACK":  # nodes this group already uses first, then in order
                order = sorted(range(len(trial)), key=lambda j: (j not in used, j))
            else:  # SPREAD / STRICT_SPREAD: unused nodes first
                order = sorted(range(len(trial)), key=lambda j: (j in used, j))
                if strategy == "STRICT_SPREAD":
                    order = [j for j in order if j not in used]
            choice = next((j for j in order if _fits(trial[j], b)), None)
            if choice is None:
                return None
            _take(trial[choice], b)
            where.append(choice)
    nodes[:] = trial
    return where


# ---------------------------------------------------------------------------------- plan


@dataclass
class RolePlan:
    role: str
    count: int
    bundle: dict[str, float]
    on_gpu: bool
    memory: dict[str, int] = field(default_factory=dict)
    """Bytes per actor (per shard for tensor-parallel rollout workers)."""
    budget: int = 0
    """Bytes available to one actor (GPU memory, or its share of host memory)."""
    nodes: list[int] | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def need(self) -> int:
        return sum(self.memory.values())


@dataclass
class Plan:
    recipe: str
    hardware: Hardware
    arch: Arch
    params: dict[str, int]
    roles: list[RolePlan]
    assumptions: list[str]
    problems: list[str]

    @property
    def fits(self) -> bool:
        return not self.problems

    def to_dict(self) -> dict[str, Any]:
        return {
            "recipe": self.recipe, "fits": self.fits, "problems": self.problems,
            "hardware": asdict(self.hardware), "arch": asdict(self.arch), "params": self.params,
            "roles": [{**asdict(r), "need": r.need} for r in self.roles], "assumptions": self.assumptions,
        }


def _node_pool(hw: Hardware, demands: dict[str, float], notes: list[str]) -> list[dict[str, float]]:
    """Nodes with their resources; each custom resource a role asks for (e.g.
    `rollout_node`) is given to its own nodes, as many as that role's GPUs need."""
    nodes = [{"CPU": float(hw.cpus_per_node), "GPU": float(hw.gpus_per_node)} for _ in range(hw.nodes)]
    nxt = 0
    for name, gpus in demands.items():
        want = max(1, math.ceil(gpus / hw.gpus_per_node)) if hw.gpus_per_node else 1
        got = list(range(nxt, min(nxt + want, hw.nodes)))
        for j in got:
            nodes[j][name] = 1e6
        nxt += len(got)
        notes.append(f"custom resource {name!r} assumed on node(s) {got or 'none (no node left)'}")
    return nodes


def make_plan(cfg: Any, hw: Hardware, seq_len: int | None = None, recipe: str = "") -> Plan:
    """Plan an `ExperimentConfig` on `hw`."""
    lc, rc, cc = cfg.learner, cfg.rollout, cfg.cluster
    arch = resolve_arch(rc.model or lc.model)
    assumptions: list[str] = [f"architecture from {arch.source}"]
    problems: list[str] = []
    total, vision = arch.total_params(), arch.vision_params()
    if lc.lora.enabled:
        trainable = arch.lora_params(lc.lora.r)
    else:
        trainable = total - (vision if lc.freeze_vision else 0)
    frozen = total if lc.lora.enabled else total - trainable
    params = {"total": total, "language": arch.text_params(), "vision": vision, "trainable": trainable}
    completion = cfg.sampling.max_tokens
    seq = seq_len or rc.max_model_len
    assumptions.append(f"learner sequences of {seq} tokens ({'given' if seq_len else 'rollout.max_model_len'}), "
                       f"{completion} of them completion")

    # --- placement: rollout, reward, learner, in the order the driver reserves them
    tp = rc.tensor_parallel_size
    specs = [("rollout", cc.num_rollout_workers, cc.rollout, cc.rollout.num_gpus * tp),
             ("reward", cc.num_reward_actors, cc.reward, cc.reward.num_gpus),
             ("learner", cc.num_learners, cc.learner, cc.learner.num_gpus)]
    demands: dict[str, float] = {}
    for _, count, res, gpus in specs:
        for name in res.resources:
            demands[name] = demands.get(name, 0.0) + count * gpus
    nodes = _node_pool(hw, demands, assumptions)
    roles: list[RolePlan] = []
    for role, count, res, gpus in specs:
        bundle = _bundle(res.num_cpus, gpus, res.resources)
        rp = RolePlan(role, count, bundle, on_gpu=gpus > 0)
        rp.nodes = place_group(nodes, [bundle] * count, cc.placement_strategy)
        if rp.nodes is None:
            problems.append(f"{role}: {count} x {bundle} cannot be placed ({cc.placement_strategy}) on "
                            f"{hw.nodes} node(s) of {hw.gpus_per_node} GPUs / {hw.cpus_per_node} CPUs")
        roles.append(rp)
    rollout, _, learner = roles

    # --- learner memory (one rank)
    learner.memory = model_states_bytes(trainable, frozen, lc.zero_stage, cc.num_learners, lc.dtype,
                                        arch.largest_layer_params())
    acts = activation_bytes(arch, lc.micro_batch_size, seq, completion, lc.dtype,
                            lc.lora.enabled and lc.lora.dropout > 0, lc.gradient_checkpointing)
    other = activation_bytes(arch, lc.micro_batch_size, seq, completion, lc.dtype,
                             lc.lora.enabled and lc.lora.dropout > 0, not lc.gradient_checkpointing)
    learner.memory.update(activations=acts["layers"], logits=acts["logits"])
    learner.notes.append(
        f"activations {'with' if lc.gradient_checkpointing else 'without'} gradient checkpointing "
        f"{acts['layers'] / GIB:.1f} GiB (the other way: {other['layers'] / GIB:.1f} GiB); "
        f"micro-batch {lc.micro_batch_size} x {seq} tokens")
    if lc.zero_stage in (2, 3) and lc.dtype == "bf16" and not lc.lora.enabled:
        learner.notes.append(f"model states = DeepSpeed's estimate_zero{lc.zero_stage}_model_states_mem_needs")

    # --- rollout memory (one worker, one shard)
    rb = ROLLOUT_DTYPE_BYTES[rc.dtype]
    rollout.memory = {"weights": total * rb // tp}
    if rc.enable_lora:
        rollout.memory["lora_slots"] = arch.lora_params(rc.max_lora_rank) * rb // tp
    rollout.memory["activations"] = rollout_activation_bytes(arch, rc.max_num_batched_tokens, rc.max_num_seqs, rb, tp)
    per_token = kv_bytes_per_token(arch, rb, tp)

    # --- budgets and verdicts
    gpu = int(hw.gpu_memory_gib * GIB)
    overhead = int(FRAMEWORK_OVERHEAD_GIB * GIB)
    cpu_roles = [r for r in roles if not r.on_gpu and r.role != "reward"]
    host_share = int(hw.host_memory_gib * GIB) // max(1, sum(r.count for r in cpu_roles))
    for r in roles:
        if r.role == "reward":
            continue
        r.budget = gpu - overhead if r.on_gpu else host_share
    if rollout.on_gpu:
        if rc.kv_cache_gib is not None:
            kv = int(rc.kv_cache_gib * GIB)
            rollout.notes.append(f"KV cache fixed at rollout.kv_cache_gib = {rc.kv_cache_gib} GiB")
        else:
            kv = int(gpu * rc.gpu_memory_utilization) - overhead - sum(rollout.memory.values())
            rollout.budget = int(gpu * rc.gpu_memory_utilization) - overhead
            rollout.notes.append(f"gpu_memory_utilization {rc.gpu_memory_utilization}: "
                                 f"{rollout.budget / GIB:.1f} GiB for weights, activations and KV cache")
    else:
        kv = int((rc.kv_cache_gib or 0) * GIB)
        if rc.kv_cache_gib is None:
            problems.append("rollout: on CPU vLLM needs rollout.kv_cache_gib (without it it reserves most of RAM)")
    rollout.memory["kv_cache"] = max(kv, 0)
    kv_tokens = max(kv, 0) // per_token
    batch_tokens = cfg.algo.prompts_per_step * cfg.algo.group_size * rc.max_model_len // cc.num_rollout_workers
    rollout.notes.append(f"KV cache: {kv_tokens:,} tokens ({per_token:,} bytes/token/shard, TP {tp}); "
                         f"{kv_tokens // rc.max_model_len} sequences of max_model_len {rc.max_model_len} at once")
    if kv_tokens < rc.max_model_len:
        problems.append(f"rollout: KV cache holds {kv_tokens:,} tokens < max_model_len {rc.max_model_len:,} "
                        f"(vLLM refuses to start); raise gpu_memory_utilization or tensor_parallel_size")
    elif kv_tokens < batch_tokens:
        rollout.notes.append(f"a step's {batch_tokens:,} worst-case tokens per worker exceed the cache: "
                             "vLLM will queue/preempt sequences (slower, not an error)")
    for r in (learner, rollout):
        if r.budget and r.need > r.budget:
            where = "GPU" if r.on_gpu else "host share"
            problems.append(f"{r.role}: needs {r.need / GIB:.1f} GiB per actor > {r.budget / GIB:.1f} GiB "
                            f"({where}{', after the framework overhead' if r.on_gpu else ''})")
    if learner.on_gpu and rollout.on_gpu and rollout.nodes and learner.nodes:
        shared = cc.rollout.num_gpus * tp < 1 or cc.learner.num_gpus < 1
        if shared:
            problems.append("rollout and learner ask for fractional GPUs: they would share a GPU, "
                            "which this plan does not model")
    assumptions.append(f"{FRAMEWORK_OVERHEAD_GIB} GiB per GPU kept for CUDA context, NCCL and fragmentation")
    return Plan(recipe, hw, arch, params, roles, assumptions, problems)


def format_plan(plan: Plan) -> str:
    """The plan as text: parameters, memory per role, placement, verdict."""
    a, hw = plan.arch, plan.hardware
    lines = [
        (f"plan: {plan.recipe or '(config)'} on {hw.nodes} node(s) x {hw.gpus_per_node} GPUs x "
         f"{hw.gpu_memory_gib:g} GiB ({hw.cpus_per_node} CPUs, {hw.host_memory_gib:g} GiB host memory each)"),
        (f"model: {a.layers} layers, hidden {a.hidden}, heads {a.heads}/{a.kv_heads} kv, vocab {a.vocab}; "
         f"vision depth {a.v_depth} x {a.v_hidden}"),
        "params: " + ", ".join(f"{k} {v / 1e9:.3f} B" for k, v in plan.params.items()),
    ]
    for r in plan.roles:
        place = "unplaced" if r.nodes is None else f"nodes {r.nodes}"
        lines.append(f"[{r.role}] {r.count} x {r.bundle} -> {place}")
        if r.memory:
            parts = ", ".join(f"{k} {v / GIB:.2f}" for k, v in r.memory.items())
            budget = f" of {r.budget / GIB:.1f} GiB" if r.budget else ""
            lines.append(f"  memory per actor (GiB): {parts} = {r.need / GIB:.2f}{budget}"
                         f" ({'GPU' if r.on_gpu else 'host'})")
        lines += [f"  {n}" for n in r.notes]
    lines += [f"assumes: {x}" for x in plan.assumptions]
    if plan.fits:
        lines.append("VERDICT: fits")
    else:
        lines.append("VERDICT: does not fit")
        lines += [f"  - {p}" for p in plan.problems]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """`repic plan --config X [--nodes N --gpus-per-node G --gpu-memory-gib M ...] [--json]`;
    other `--dotted.key value` arguments override the recipe. Exit 0 fits, 1 does not."""
    import argparse

    from repic_ray.config import load_config
    from repic_ray.pipeline.config import ExperimentConfig

    p = argparse.ArgumentParser(prog="repic plan", description=main.__doc__)
    p.add_argument("--config", required=True, help="YAML recipe (configs/*.yaml)")
    p.add_argument("--nodes", type=int, default=1)
    p.add_argument("--gpus-per-node", type=int, default=8)
    p.add_argument("--gpu-memory-gib", type=float, default=80.0)
    p.add_argument("--cpus-per-node", type=int, default=64)
    p.add_argument("--host-memory-gib", type=float, default=512.0)
    p.add_argument("--seq-len", type=int, help="learner sequence length (default rollout.max_model_len)")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    args, overrides = p.parse_known_args(argv)
    cfg = load_config(ExperimentConfig, args.config, overrides)
    hw = Hardware(args.nodes, args.gpus_per_node, args.gpu_memory_gib, args.cpus_per_node, args.host_memory_gib)
    plan = make_plan(cfg, hw, args.seq_len, recipe=args.config)
    print(json.dumps(plan.to_dict(), indent=2) if args.json else format_plan(plan))
    return 0 if plan.fits else 1
