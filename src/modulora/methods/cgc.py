"""CGC-LoRA (arXiv 2402.01684): task-common and task-specific experts, task-motivated gate.

Per adapted layer: ``num_experts`` common experts ``C`` shared by the cluster's
tasks and one specific expert ``S_t`` per task. The gate looks only at the task:
``w^t = softmax(W_g emb(t))`` over ``C u S_t`` (other tasks' specific experts are
masked), ``y = W0 x + sum_{i in C u S_t} w^t_i E_i(x)``. The rank ``rank`` is split
evenly over the ``num_experts + 1`` experts a task uses, so a task costs about
one LoRA of rank ``rank``. Each layer has its own gate; since the weights depend
only on the task, a task's update folds into one matrix (mergeable).
"""

from __future__ import annotations

from ..config import MixtureConfig
from .base import (
    Layout,
    Method,
    StagePlan,
    domain_task,
    expert_list,
    grown,
    task_experts,
    unknown_stage,
)
from .baselines import split_rank


def _layout(cfg: MixtureConfig) -> Layout:
    rank = split_rank(cfg, cfg.num_experts + 1)
    common = expert_list("common", cfg.num_experts, rank, cfg)
    return Layout("parallel", common + task_experts("specific", cfg, rank), "task")


def _stage(cfg: MixtureConfig, name: str) -> StagePlan:
    if name == "joint":
        experts = frozenset(e.name for e in _layout(cfg).experts)
        return StagePlan(name, train=experts, train_router=True)
    task = domain_task(cfg, name)
    if task is not None:
        # one task alone: its specific expert, its gate embedding and gate row;
        # common experts and every other task's gate stay as they are
        expert = f"specific:{task}"
        return StagePlan(name, train=frozenset({expert}), train_router=task, task=task)
    raise unknown_stage(cfg, name, ["joint"] + [f"domain:{t}" for t in cfg.tasks])


CGC_LORA = Method(
    "cgc-lora",
    "Song et al. 2024, CGC-LoRA (arXiv 2402.01684)",
    _layout,
    lambda cfg: ["joint"],
    _stage,
    lambda cfg, task, rank: grown(cfg, task, rank),
    task_gated=True,
    mergeable=True,
)
