"""Registry of methods: ``get_method(name)`` returns a ``Method``."""

from __future__ import annotations

from .base import ExpertSpec, Layout, Method, StagePlan
from .baselines import LORA, LORAMOE, MOELORA, MOLORA, MULTI_LORA
from .cgc import CGC_LORA
from .modula import MODULA_FLAN, MODULA_RES
from .moe_ct import MOE_CT

REGISTRY: dict[str, Method] = {
    m.name: m
    for m in (LORA, MULTI_LORA, MOLORA, MODULA_FLAN, MODULA_RES, CGC_LORA, MOELORA, LORAMOE, MOE_CT)
}


def get_method(name: str) -> Method:
    if name not in REGISTRY:
        raise ValueError(f"unknown method {name!r}; choose one of {', '.join(REGISTRY)}")
    return REGISTRY[name]


__all__ = ["REGISTRY", "ExpertSpec", "Layout", "Method", "StagePlan", "get_method"]
