"""MoE-CT (arXiv 2407.00875): continual training with the base model frozen.

Each FFN keeps its frozen path and gets a routed mixture of ``num_experts`` expert
FFNs (copies of the FFN, or LoRA deltas on it: ``moe_ct_experts``), fused as
``y = (1 - g) FFN(x) + g MoE(x)`` (``fusion``, ``fusion_share``). One joint stage of
continued pre-training trains the expert FFNs, routers and learned fusion (plus
embeddings and LM head when ``train_embeddings``). The math is in ``moe_ffn.py``.
"""

from __future__ import annotations

from ..config import MixtureConfig
from .base import Layout, Method, expert_list, grown, joint_stage


def _layout(cfg: MixtureConfig) -> Layout:
    return Layout("ffn-fusion", expert_list("ffn", cfg.num_experts, cfg.rank, cfg), "token")


def _add_task(cfg: MixtureConfig, task: str, rank: int | None) -> MixtureConfig:
    return grown(cfg, task, None, num_experts=cfg.num_experts + 1)


def _add_plan(cfg: MixtureConfig, task: str) -> list[str]:
    raise ValueError(
        "moe-ct stacks its expert FFNs in one tensor per linear, so training a new one alone "
        "is not supported; continue pre-training with `modulora train` on the new text instead"
    )


MOE_CT = Method(
    "moe-ct",
    "Li et al. 2024, MoE-CT (arXiv 2407.00875)",
    _layout,
    lambda cfg: ["joint"],
    joint_stage(_layout),
    _add_task,
    add_plan=_add_plan,
)
