"""What adding a task costs, next to the retrains it replaces, each computed from its plan.

A comparator is a run config that would train every task, old and new, from scratch:

- ``rerun``: this run's own plan with the new task (MoDULA: universal, every domain
  stage, router);
- ``molora``: MoLoRA from scratch on all tasks, the paper's comparator: as many
  experts as this run has, at the same total rank (sum of every expert's rank) and the
  same budget (the optimizer steps x batch of ``rerun``);
- ``lora``: one joint LoRA of the same total rank and budget.

Each is costed by building its stages on the same data and counting, per stage, the
trainable parameters (on the real base model), the examples its steps read, their
tokens (steps x batch x the stage data's mean length) and the estimated FLOPs
(``train.flops_estimate``). Wall time is measured for the addition only.
"""

from __future__ import annotations

import copy
import math
import warnings
from dataclasses import asdict, dataclass

from accelerate.utils import set_seed

from .methods import get_method
from .model import attach
from .plan import build_stages, load_data
from .recipe import stage_datasets
from .run_config import RunConfig
from .train import flops_estimate, total_steps

KEYS = ("parameters_trained", "examples", "tokens", "flops_estimate")


@dataclass
class PlanCost:
    """The cost of training one plan from scratch."""

    what: str
    method: str
    experts: int
    total_rank: int
    parameters_trained: int
    examples: int
    tokens: int
    flops_estimate: float


def _total_rank(run: RunConfig) -> tuple[int, int]:
    experts = get_method(run.method).layout(run.mixture_config()).all_experts()
    return len(experts), sum(e.rank for e in experts)


def plan_cost(run: RunConfig, base, tokenizer, what: str) -> PlanCost:
    """Cost of ``run``'s default plan; ``base`` is used to count parameters and left as it was."""
    names = get_method(run.method).plan(run.mixture_config())
    stages = build_stages(run, names)
    data = stage_datasets(run, stages, load_data(run, stages, tokenizer), 1)
    set_seed(run.train.seed)
    model = attach(base, run.mixture_config())
    total = {"parameters_trained": 0, "examples": 0, "tokens": 0, "flops_estimate": 0.0}
    try:
        size = sum(p.numel() for p in model.parameters())
        for stage in stages:
            with warnings.catch_warnings():  # nothing trains here: untrained-expert notes
                warnings.simplefilter("ignore")
                model.set_stage(stage.name)
            trainable = model.trainable_parameters()
            train, cfg = data[stage.label].train, stage.train
            examples = total_steps(len(train), cfg) * cfg.batch_size * cfg.grad_accum
            tokens = round(examples * sum(len(e.input_ids) for e in train) / len(train))
            total["parameters_trained"] += trainable
            total["examples"] += examples
            total["tokens"] += tokens
            total["flops_estimate"] += flops_estimate(
                size, tokens, trainable, cfg.gradient_checkpointing
            )
    finally:
        model.detach()
    experts, rank = _total_rank(run)
    return PlanCost(what, run.method, experts, rank, **total)


def _joint(run: RunConfig, method: str, adapter: dict, examples: int) -> RunConfig:
    """``run`` as one joint stage of ``method`` on every task, for ``examples`` examples."""
    out = copy.deepcopy(run)
    out.method, out.universal, out.stages = method, None, {}
    out.adapter = {
        k: v for k, v in run.adapter.items() if k in ("target_modules", "layers_to_transform")
    }
    out.adapter |= adapter
    for task in out.tasks.values():
        task.rank = None
    per_step = run.train.batch_size * run.train.grad_accum
    out.train.max_steps = max(1, math.ceil(examples / per_step))
    return out


def comparators(grown: RunConfig, base, tokenizer) -> dict[str, dict]:
    """The three retrains of ``grown`` (the run with the new task), costed from their plans."""
    rerun = plan_cost(
        grown, base, tokenizer, f"re-running this {grown.method} plan with the new task"
    )
    experts, rank = rerun.experts, rerun.total_rank
    per_expert = max(1, round(rank / experts))
    molora = _joint(grown, "molora", {"num_experts": experts, "rank": per_expert}, rerun.examples)
    lora = _joint(grown, "lora", {"rank": rank}, rerun.examples)
    costs = [
        rerun,
        plan_cost(molora, base, tokenizer, f"MoLoRA from scratch, {experts} x r{per_expert}"),
        plan_cost(lora, base, tokenizer, f"joint LoRA from scratch, r{rank}"),
    ]
    return {name: asdict(c) for name, c in zip(("rerun", "molora", "lora"), costs, strict=True)}


def shares(addition: dict, comparators: dict[str, dict]) -> dict[str, dict]:
    """The addition's cost as a share of each comparator's (None where one is 0)."""
    return {
        name: {k: round(addition[k] / c[k], 4) if c[k] else None for k in KEYS}
        for name, c in comparators.items()
    }
