"""The baselines: plain LoRA, multiple independent LoRAs, MoLoRA, LoRAMoE, MOELoRA.

See METHODS.md for the formulas; each function below is the whole of what makes
one method differ from the others.
"""

from __future__ import annotations

from ..config import MixtureConfig
from .base import (
    ExpertSpec,
    Layout,
    Method,
    StagePlan,
    added_experts_owned,
    domain_task,
    domain_then_router,
    expert_list,
    grown,
    joint_stage,
    task_experts,
    unknown_stage,
)

# --- plain LoRA: y = W0 x + E(x), one expert for everything ---------------------------


def _lora_layout(cfg: MixtureConfig) -> Layout:
    return Layout("parallel", [ExpertSpec("lora", cfg.rank, cfg.alpha_for(cfg.rank))], "none")


def _lora_add_task(cfg: MixtureConfig, task: str, rank: int | None) -> MixtureConfig:
    raise ValueError(
        "plain lora has one expert for all tasks, so a task cannot be added to it; "
        "use multi-lora, modula-res or cgc-lora for pluggable tasks"
    )


LORA = Method(
    "lora",
    "Hu et al. 2021, LoRA (arXiv 2106.09685)",
    _lora_layout,
    lambda cfg: ["joint"],
    joint_stage(_lora_layout),
    _lora_add_task,
    mergeable=True,
)


# --- multiple independent LoRAs: each row uses its own task's LoRA ---------------------


def _multi_layout(cfg: MixtureConfig) -> Layout:
    return Layout("parallel", task_experts("domain", cfg), "task-select")


def _multi_stage(cfg: MixtureConfig, name: str) -> StagePlan:
    task = domain_task(cfg, name)
    if task is not None:
        return StagePlan(name, train=frozenset({f"domain:{task}"}), task=task)
    if name == "joint":  # every task's LoRA at once, each on its own rows
        return StagePlan(name, train=frozenset(f"domain:{t}" for t in cfg.tasks))
    raise unknown_stage(cfg, name, [f"domain:{t}" for t in cfg.tasks] + ["joint"])


MULTI_LORA = Method(
    "multi-lora",
    "one LoRA per task (the 'N separate models' pattern)",
    _multi_layout,
    lambda cfg: [f"domain:{t}" for t in cfg.tasks],
    _multi_stage,
    lambda cfg, task, rank: grown(cfg, task, rank),
    task_gated=True,
    mergeable=True,
)


# --- MoLoRA: s = softmax(W_R x) per token over E shared experts -------------------------


def _molora_layout(cfg: MixtureConfig) -> Layout:
    experts = added_experts_owned(expert_list("expert", cfg.num_experts, cfg.rank, cfg), cfg)
    return Layout("parallel", experts, "token")


def _grow_experts(cfg: MixtureConfig, task: str, rank: int | None) -> MixtureConfig:
    """Token-routed methods grow by one shared expert (rank as the others)."""
    if rank is not None and rank != cfg.rank:
        raise ValueError(f"{cfg.method} experts share one rank ({cfg.rank}); got rank={rank}")
    return grown(cfg, task, None, num_experts=cfg.num_experts + 1)


def _token_routed_stage(layout):
    """Joint training, plus the stages of a task added later: its new expert alone
    (gate fixed to it, as MoDULA's domain stage), then only the router."""
    joint = joint_stage(layout)

    def stage(cfg: MixtureConfig, name: str) -> StagePlan:
        if name == "router":
            return StagePlan(name, train_router=True)
        task = domain_task(cfg, name)
        if task is not None and task in cfg.added_tasks:
            expert = next(e.name for e in layout(cfg).experts if e.task == task)
            return StagePlan(name, train=frozenset({expert}), fixed={expert: 1.0}, task=task)
        if name == "joint":
            return joint(cfg, name)
        added = [f"domain:{t}" for t in cfg.added_tasks]
        raise unknown_stage(cfg, name, ["joint", "router", *added])

    return stage


MOLORA = Method(
    "molora",
    "Zadouri et al. 2023, Pushing Mixture of Experts to the Limit (arXiv 2309.05444)",
    _molora_layout,
    lambda cfg: ["joint"],
    _token_routed_stage(_molora_layout),
    _grow_experts,
    add_plan=domain_then_router,
)


# --- LoRAMoE: MoLoRA on the FFN only, with the localized balancing loss ------------------


def _loramoe_layout(cfg: MixtureConfig) -> Layout:
    return Layout(
        "parallel",
        added_experts_owned(expert_list("expert", cfg.num_experts, cfg.rank, cfg), cfg),
        "token",
        ffn_only=True,
    )


LORAMOE = Method(
    "loramoe",
    "Dou et al. 2024, LoRAMoE (ACL 2024, arXiv 2312.09979)",
    _loramoe_layout,
    lambda cfg: ["joint"],
    _token_routed_stage(_loramoe_layout),
    _grow_experts,
    add_plan=domain_then_router,
)


# --- MOELoRA: w = softmax(W_g emb(task)), one gate for all layers ------------------------


def split_rank(cfg: MixtureConfig, experts_per_task: int) -> int:
    """Per-expert rank: ``expert_rank`` or ``rank`` split evenly (at least 1)."""
    return cfg.expert_rank or max(1, cfg.rank // experts_per_task)


def _moelora_layout(cfg: MixtureConfig) -> Layout:
    rank = split_rank(cfg, cfg.num_experts)
    shared = expert_list("expert", cfg.num_experts, rank, cfg)
    # tasks added later get an expert of their own, masked for the old tasks, so
    # training it cannot change what the old tasks compute
    ranks = {t: cfg.task_rank(t, rank) for t in cfg.added_tasks}
    added = [ExpertSpec(f"specific:{t}", r, cfg.alpha_for(r), t) for t, r in ranks.items()]
    return Layout("parallel", shared + added, "task-shared")


def _moelora_stage(cfg: MixtureConfig, name: str) -> StagePlan:
    task = domain_task(cfg, name)
    if task is not None and task in cfg.added_tasks:
        return StagePlan(name, train=frozenset({f"specific:{task}"}), train_router=task, task=task)
    if name == "joint":
        return joint_stage(_moelora_layout)(cfg, name)
    raise unknown_stage(cfg, name, ["joint"] + [f"domain:{t}" for t in cfg.added_tasks])


MOELORA = Method(
    "moelora",
    "Liu et al. 2024, MOELoRA (SIGIR 2024, arXiv 2310.18339)",
    _moelora_layout,
    lambda cfg: ["joint"],
    _moelora_stage,
    lambda cfg, task, rank: grown(cfg, task, rank),
    task_gated=True,
    mergeable=True,
)
