"""MoDULA (EMNLP 2024, arXiv 2412.07405): universal + domain experts, trained in stages.

Flan: every expert reads ``x``; the router mixes universal and domain experts.
Res: the universal expert's output ``h`` is a residual path that is always on, and
domain experts ``D_i(h) = s_i B_i LeakyReLU(A_i h)`` read ``h``; the router mixes
only the domain experts. Stages (each trains only its own parameters):

======================  ===============================  ==============================
stage                   Flan forward                     Res forward
======================  ===============================  ==============================
``universal``           ``W0 x + E_*(x)``                ``W0 x + h``
``domain:<t>``          ``W0 x + E_t(x)``                ``W0 x + h + D_t(h)``
``router``/inference    ``W0 x + sum s_i E_i(x)``        ``W0 x + h + sum s_i D_i(h)``
======================  ===============================  ==============================
"""

from __future__ import annotations

from ..config import MixtureConfig
from .base import (
    ExpertSpec,
    Layout,
    Method,
    StagePlan,
    domain_task,
    domain_then_router,
    grown,
    task_experts,
    unknown_stage,
)


def _universal(cfg: MixtureConfig) -> ExpertSpec:
    return ExpertSpec("universal", cfg.universal_rank, cfg.alpha_for(cfg.universal_rank))


def _flan_layout(cfg: MixtureConfig) -> Layout:
    return Layout("parallel", [_universal(cfg), *task_experts("domain", cfg)], "token")


def _res_layout(cfg: MixtureConfig) -> Layout:
    return Layout("residual", task_experts("domain", cfg), "token", universal=[_universal(cfg)])


def _plan(cfg: MixtureConfig) -> list[str]:
    return ["universal", *(f"domain:{t}" for t in cfg.tasks), "router"]


def _stage(residual: bool):
    def stage(cfg: MixtureConfig, name: str) -> StagePlan:
        if name == "universal":
            # Res: the universal path is always on and the domain path is skipped;
            # Flan: the universal expert alone, weight 1.
            fixed = {} if residual else {"universal": 1.0}
            return StagePlan(name, train=frozenset({"universal"}), fixed=fixed)
        task = domain_task(cfg, name)
        if task is not None:  # as if s_t = 1; the universal expert stays frozen
            expert = f"domain:{task}"
            return StagePlan(name, train=frozenset({expert}), fixed={expert: 1.0}, task=task)
        if name == "router":
            return StagePlan(name, train_router=True)
        raise unknown_stage(cfg, name, _plan(cfg))

    return stage


def _add_task(cfg: MixtureConfig, task: str, rank: int | None) -> MixtureConfig:
    # pluggability: one new domain expert, then only the router is retrained
    return grown(cfg, task, rank)


MODULA_FLAN = Method(
    "modula-flan",
    "Ma et al. 2024, MoDULA (EMNLP 2024, arXiv 2412.07405), Flan variant",
    _flan_layout,
    _plan,
    _stage(residual=False),
    _add_task,
    add_plan=domain_then_router,
)

MODULA_RES = Method(
    "modula-res",
    "Ma et al. 2024, MoDULA (EMNLP 2024, arXiv 2412.07405), Res variant",
    _res_layout,
    _plan,
    _stage(residual=True),
    _add_task,
    add_plan=domain_then_router,
)
