"""Surgery on Hugging Face models: find target modules, swap them, route task ids.

Knows transformers' module types, nothing of training. The layers themselves only
compute (``layers.py``, ``moe_ffn.py``).
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator

from torch import nn
from transformers.pytorch_utils import Conv1D

from .gates import Route

FFN_CLASS_SUFFIXES = ("MLP", "FeedForward", "FFN")


def is_ffn(module: nn.Module) -> bool:
    """A transformer block's feed-forward module (LlamaMLP, Qwen2MLP, Gemma3MLP, GPT2MLP...)."""
    return type(module).__name__.endswith(FFN_CLASS_SUFFIXES) and any(
        isinstance(m, nn.Linear | Conv1D) for m in module.modules()
    )


def _matches(name: str, suffixes: list[str]) -> bool:
    return any(name == s or name.endswith("." + s) for s in suffixes)


def _excluded(model: nn.Module) -> set[int]:
    out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return {id(out)} if out is not None else set()


def block_index(name: str) -> int | None:
    """The transformer block a module belongs to: the first integer in its dotted name
    (``model.layers.12.mlp.up_proj`` -> 12), as PEFT's ``layers_to_transform``."""
    match = re.search(r"\.(\d+)\.", f".{name}.")
    return int(match.group(1)) if match else None


def find_targets(
    model: nn.Module,
    target_modules: str | list[str],
    kind: str,
    layers: list[int] | None = None,
) -> list[str]:
    """Names of the modules to adapt.

    Args:
        model: the Hugging Face model.
        target_modules: ``"all-linear"`` or module-name suffixes.
        kind: ``"linear"`` (every Linear/Conv1D), ``"ffn-linear"`` (those inside FFN
            blocks, LoRAMoE) or ``"ffn"`` (the FFN blocks themselves, MoE-CT).
        layers: adapt only these transformer blocks (negative: from the last block).

    Raises:
        ValueError: when nothing matches, listing what could have.
    """
    excluded = _excluded(model)
    ffn_names = [n for n, m in model.named_modules() if is_ffn(m)]
    if kind == "ffn":
        candidates = ffn_names
    else:
        candidates = [
            n
            for n, m in model.named_modules()
            if isinstance(m, nn.Linear | Conv1D) and id(m) not in excluded
        ]
        if kind == "ffn-linear":
            candidates = [n for n in candidates if any(n.startswith(f + ".") for f in ffn_names)]
    chosen = (
        candidates
        if target_modules == "all-linear"
        else [n for n in candidates if _matches(n, list(target_modules))]
    )
    if layers is not None:
        blocks = sorted({b for n in candidates if (b := block_index(n)) is not None})
        count = max(blocks) + 1 if blocks else 0
        wanted = {i % count if count else i for i in layers}
        chosen = [n for n in chosen if block_index(n) in wanted]
    if not chosen:
        shown = sorted({n.rsplit(".", 1)[-1] for n in candidates})
        where = f" in blocks {sorted(layers)}" if layers is not None else ""
        raise ValueError(
            f"target_modules={target_modules!r} matched no {kind} module of "
            f"{type(model).__name__}{where}; candidate suffixes: {shown or 'none'}"
        )
    return chosen


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, attr = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, attr, new)


def hidden_size(model: nn.Module) -> int:
    cfg = (
        model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    )
    for key in ("hidden_size", "n_embd", "d_model"):
        if getattr(cfg, key, None):
            return int(getattr(cfg, key))
    raise ValueError(f"cannot tell the hidden size of {type(model).__name__} from its config")


@contextlib.contextmanager
def routing(layers: list[nn.Module], route: Route) -> Iterator[None]:
    """Hand ``route`` to every adapted layer's forward for the duration of one call.

    Forward pre-hooks add the ``route`` keyword and are removed in ``finally``, so
    the base model's own ``forward`` is never overwritten (as PEFT's poly tuner).
    Each layer also keeps the route of its last call, for gradient checkpointing,
    which runs the forward again inside backward, after the hooks are gone
    (see ``layers.route_for``).
    """

    def hook(module, args, kwargs):
        kwargs["route"] = module.last_route = route
        return args, kwargs

    handles = [layer.register_forward_pre_hook(hook, with_kwargs=True) for layer in layers]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
