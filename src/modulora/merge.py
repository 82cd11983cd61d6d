"""Per-task deployment: fold a task's update into the base weights, or export it for PEFT.

When the gate weights of a layer do not depend on the token, a task's update is
one matrix per layer: ``dW_t = sum_i w^t_i (alpha_i / r_i) B_i A_i`` (METHODS.md,
CGC-LoRA). It is kept here as one low-rank pair, ``A`` (R x d_in) with the experts'
``A_i`` stacked and ``B`` (d_out x R) with each ``B_i`` scaled by ``w^t_i alpha_i / r_i``,
R = sum r_i. ``merge`` adds ``B A`` to ``W0``; ``export_peft`` writes ``A`` and ``B``
as one PEFT LoRA of rank R with scaling 1. Both are exact (up to float rounding).

Exact for: lora, multi-lora, cgc-lora and moelora (gates depend only on the task),
and for any parallel-topology method pinned to one expert (``expert=...``: the model
as in that expert's domain stage), and MoDULA-Res's universal expert alone. Not for
token routers (the weights change per token), MoDULA-Res domain experts (a
LeakyReLU between A and B) or MoE-CT (a mixture of FFNs).
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn
from transformers.pytorch_utils import Conv1D

from .gates import Route
from .inject import replace_module
from .layers import MixtureLinear
from .model import MixtureModel


class NotMergeableError(ValueError):
    """The requested update cannot be folded into one matrix per layer."""


def _why_not(model: MixtureModel) -> str:
    layout = model.method.layout(model.mixture_config)
    name = model.mixture_config.method
    if layout.topology == "ffn-fusion":
        return (
            f"{name} mixes expert FFNs (non-linear) beside the frozen FFN, so it has no "
            "per-layer weight delta; serve it routed with `modulora serve` / `generate`"
        )
    if layout.topology == "residual":
        return (
            f"{name} domain experts apply a LeakyReLU between A and B and are mixed per "
            "token, so no weight matrix reproduces them; merge(expert='universal') folds the "
            "universal expert alone, or serve the routed model with `modulora serve`"
        )
    return (
        f"{name} routes every token with softmax(W_R x), so the mixture's weights change "
        "from token to token and no single matrix reproduces it; pin one expert with "
        f"merge(expert=...) (experts: {model.expert_names()}), or serve the routed model "
        "with `modulora serve`"
    )


def _gate_of(model: MixtureModel, layer: MixtureLinear, task: str | None, expert: str | None):
    """(selected expert indices, their weights) of ``layer`` for ``task`` or a pinned expert."""
    bank = layer.modulora_experts
    if expert is not None:
        return [bank.index(expert)], [1.0]
    router = layer.modulora_router
    if router is None:  # plain LoRA: every expert, weight 1
        return list(range(len(bank))), [1.0] * len(bank)
    idx = model.mixture_config.tasks.index(task)
    route = Route(task_ids=torch.tensor([idx], device=model._device()), uniform_task=idx)
    gate = router(torch.zeros(1, 1, layer.d_in, device=model._device()), route)
    select = list(range(len(bank))) if gate.select is None else list(gate.select)
    weights = [1.0] * len(select) if gate.weights is None else gate.weights.reshape(-1).tolist()
    return select, weights


def _check_request(model: MixtureModel, task: str | None, expert: str | None) -> None:
    cfg = model.mixture_config
    layout = model.method.layout(cfg)
    if task is not None and task not in cfg.tasks:
        raise ValueError(f"unknown task {task!r}; known tasks: {cfg.tasks}")
    if expert is not None:
        if task is not None:
            raise ValueError("give task= or expert=, not both")
        if expert not in model.expert_names():
            raise ValueError(f"unknown expert {expert!r}; experts: {model.expert_names()}")
        if layout.topology == "ffn-fusion" or (
            layout.topology == "residual" and expert != "universal"
        ):
            raise NotMergeableError(_why_not(model))
        return
    if not model.method.mergeable:
        raise NotMergeableError(_why_not(model))
    if model.method.task_gated and task is None:
        raise ValueError(f"{cfg.method} needs task=...; known tasks: {cfg.tasks}")


@torch.no_grad()
def lowrank_update(
    model: MixtureModel, task: str | None = None, expert: str | None = None
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Each adapted layer's exact update for ``task`` (or one pinned ``expert``) as ``(A, B)``.

    Returns:
        Layer name -> ``A`` (R, d_in), ``B`` (d_out, R) in fp32 with the gate weights and
        ``alpha / r`` folded into ``B``, so the update is ``B @ A`` (d_out, d_in).

    Raises:
        NotMergeableError: the update is not one matrix (token routers, MoDULA-Res
            domain experts, MoE-CT); the message says what to use instead.
        ValueError: unknown task or expert, or a task-gated method without a task.
    """
    _check_request(model, task, expert)
    out = {}
    for name, layer in model.layers.items():
        if expert == "universal" and layer.modulora_universal is not None:
            bank, select, weights = layer.modulora_universal, [0], [1.0]
        else:
            bank = layer.modulora_experts
            select, weights = _gate_of(model, layer, task, expert)
        A = torch.cat([bank.A[i].float() for i in select], dim=0)  # (R, d_in)
        B = torch.cat(
            [
                bank.B[i].float() * (w * bank.alphas[i] / bank.ranks[i])
                for i, w in zip(select, weights, strict=True)
            ],
            dim=1,
        )  # (d_out, R)
        out[name] = (A, B)  # torch.cat made fresh tensors: the experts are not shared
    return out


def _plain_copy(model: MixtureModel) -> nn.Module:
    """A deep copy of the base model without adapters (the mixture is left as it is)."""
    for name, layer in model.layers.items():
        replace_module(model.base_model, name, layer.base_layer)
    try:
        plain = copy.deepcopy(model.base_model)
    finally:
        for name, layer in model.layers.items():
            replace_module(model.base_model, name, layer)
    for n, p in plain.named_parameters():
        p.requires_grad_(model._frozen_flags.get(n, False))
    return plain


@torch.no_grad()
def merge(
    model: MixtureModel, task: str | None = None, expert: str | None = None, inplace: bool = False
) -> nn.Module:
    """A plain transformers model with ``task``'s update (or one expert's) in its weights.

    Args:
        model: the mixture.
        task: the task whose update to fold in (required for task-gated methods).
        expert: instead of a task, fold in one expert alone (``domain:math``,
            ``expert:3``, MoDULA-Res ``universal``): the model as in that expert's stage.
        inplace: merge into the base model itself and detach the mixture (saves a copy
            of the base in memory; the ``MixtureModel`` is then empty). By default the
            mixture is left untouched and a merged copy is returned.

    Raises:
        NotMergeableError / ValueError: as ``lowrank_update``, before anything changes.
    """
    update = lowrank_update(model, task, expert)
    plain = model.detach() if inplace else _plain_copy(model)
    for name, (A, B) in update.items():
        module = plain.get_submodule(name)
        w = module.weight
        delta = (B @ A).to(w.device)  # (d_out, d_in)
        if isinstance(module, Conv1D):  # GPT-2 stores the weight as (d_in, d_out)
            delta = delta.T
        w.copy_((w.float() + delta).to(w.dtype))
    return plain


def _fresh_folder(out: str | Path, overwrite: bool) -> Path:
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise FileExistsError(f"{out} exists and is not empty; pass overwrite (--force) to replace")
    return out


def _publish(tmp: Path, out: Path) -> None:
    """Move a finished folder into place: the old one (if any) is removed only now."""
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out)


def _write_folder(out: Path, overwrite: bool, write) -> Path:
    out = _fresh_folder(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        write(tmp)
        _publish(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def provenance(model: MixtureModel, fmt: str, task, expert, source: str | None) -> dict:
    from . import __version__

    return {
        "format": fmt,
        "source": source,
        "method": model.mixture_config.method,
        "task": task,
        "expert": expert,
        "tasks": model.mixture_config.tasks,
        "base_model": getattr(model.base_model.config, "_name_or_path", ""),
        "base_fingerprint": model.base_fingerprint,
        "modulora_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def _peft_config(model: MixtureModel, ranks: dict[str, int]):
    from peft import LoraConfig

    counts = {r: list(ranks.values()).count(r) for r in set(ranks.values())}
    r = max(counts, key=lambda k: (counts[k], k))
    pattern = {name: rank for name, rank in ranks.items() if rank != r}
    conv = any(isinstance(layer.base_layer, Conv1D) for layer in model.layers.values())
    return LoraConfig(
        r=r,
        lora_alpha=r,  # scaling alpha / r = 1: the gate weights and alpha / r are in B
        rank_pattern=pattern,
        alpha_pattern=dict(pattern),
        target_modules=sorted(ranks),
        lora_dropout=0.0,
        bias="none",
        fan_in_fan_out=conv,
        task_type="CAUSAL_LM",
        base_model_name_or_path=getattr(model.base_model.config, "_name_or_path", None) or None,
    )


def export_peft(
    model: MixtureModel,
    out: str | Path,
    task: str | None = None,
    expert: str | None = None,
    source: str | None = None,
    overwrite: bool = False,
) -> Path:
    """Write ``task``'s update as a PEFT LoRA adapter that ``PeftModel.from_pretrained`` loads.

    Files: ``adapter_config.json``, ``adapter_model.safetensors`` and
    ``modulora_export.json`` (provenance). The folder is written under a temporary
    name and renamed, so an existing export is replaced only by a complete one.

    Raises:
        NotMergeableError / ValueError: as ``lowrank_update``; FileExistsError: ``out``
            is a non-empty folder and ``overwrite`` is off. Raised before writing.
    """
    update = lowrank_update(model, task, expert)
    tensors = {}
    for name, (A, B) in update.items():
        tensors[f"base_model.model.{name}.lora_A.weight"] = A.contiguous()
        tensors[f"base_model.model.{name}.lora_B.weight"] = B.contiguous()
    config = _peft_config(model, {n: A.shape[0] for n, (A, _) in update.items()})
    info = provenance(model, "peft", task, expert, source)

    def write(tmp: Path) -> None:
        config.save_pretrained(str(tmp))
        save_file(tensors, str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"})
        (tmp / "modulora_export.json").write_text(json.dumps(info, indent=2))

    return _write_folder(Path(out), overwrite, write)


def export_merged(
    model: MixtureModel,
    out: str | Path,
    tokenizer=None,
    task: str | None = None,
    expert: str | None = None,
    source: str | None = None,
    overwrite: bool = False,
) -> Path:
    """Write the merged model (``save_pretrained`` + tokenizer + provenance) to ``out``,
    a folder ``AutoModelForCausalLM.from_pretrained`` loads. The mixture is not changed.

    Raises:
        as ``export_peft``.
    """
    _fresh_folder(out, overwrite)
    merged = merge(model, task, expert)
    info = provenance(model, "merged", task, expert, source)

    def write(tmp: Path) -> None:
        merged.save_pretrained(str(tmp))
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
        (tmp / "modulora_export.json").write_text(json.dumps(info, indent=2))

    return _write_folder(Path(out), overwrite, write)
