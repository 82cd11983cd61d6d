"""``MixtureModel``: a Hugging Face causal LM with mixture-of-LoRA-experts layers.

``attach(hf_model, cfg)`` swaps the target modules for adapted layers, freezes the
base model and puts the model in the method's first stage. The wrapper resolves
task names to ids, hands them to the layers for one call, collects auxiliary
losses, and applies a stage's trainability and gating to every layer.
"""

from __future__ import annotations

import inspect
import warnings
from collections import defaultdict
from pathlib import Path

import torch
from torch import nn

from .config import MixtureConfig
from .gates import LoramoeBalance, Route, TaskGate, TaskSelect, TokenRouter, fixed
from .inject import find_targets, hidden_size, replace_module, routing
from .layers import MixtureLinear
from .methods import Layout, Method, StagePlan, get_method
from .methods.base import task_expert_mask
from .moe_ffn import MoEFFN

ADAPTER_PREFIX = "modulora_"


class MixtureModel(nn.Module):
    """A base causal LM (frozen) with a mixture of LoRA experts attached.

    Use ``modulora.attach`` or ``modulora.load`` to build one.

    Attributes:
        base_model: the Hugging Face model, modified in place.
        mixture_config: the ``MixtureConfig`` (grows with ``add_task``).
        method: the ``Method`` describing experts, gates and stages.
        stage: the current stage name.
        layers: adapted module name -> ``MixtureLinear`` or ``MoEFFN``.
        base_fingerprint: fingerprint of the base weights at attach time.
    """

    def __init__(self, base_model: nn.Module, config: MixtureConfig) -> None:
        super().__init__()
        from .checkpoint import fingerprint  # checkpoint imports this module

        if any(isinstance(m, MixtureLinear | MoEFFN) for m in base_model.modules()):
            raise ValueError("this model already has modulora layers; attach to a fresh base model")
        self.base_model = base_model
        self.mixture_config = config
        self.method: Method = get_method(config.method)
        self.base_fingerprint = fingerprint(base_model)
        self._frozen_flags = {n: p.requires_grad for n, p in base_model.named_parameters()}
        for p in base_model.parameters():
            p.requires_grad_(False)
        layout = self.method.layout(config)
        kind = {"ffn-fusion": "ffn"}.get(
            layout.topology, "ffn-linear" if layout.ffn_only else "linear"
        )
        names = find_targets(base_model, config.target_modules, kind, config.layers_to_transform)
        self.layers: dict[str, MixtureLinear | MoEFFN] = {}
        for name in names:
            layer = self._new_layer(base_model.get_submodule(name), layout)
            replace_module(base_model, name, layer)
            self.layers[name] = layer
        self.modulora_shared_gate: TaskGate | None = None
        self._sync(layout)
        self.stage = ""
        self.set_stage(self.method.plan(config)[0])

    # --- building -----------------------------------------------------------------

    def _new_layer(self, module: nn.Module, layout: Layout) -> MixtureLinear | MoEFFN:
        cfg = self.mixture_config
        if layout.topology == "ffn-fusion":
            return MoEFFN(
                module,
                hidden_size(self.base_model),
                num_experts=0,
                mode=cfg.moe_ct_experts,
                rank=cfg.rank,
                alpha=cfg.alpha_for(cfg.rank),
                fusion=cfg.fusion,
                share=cfg.fusion_share,
                **self._router_kwargs(),
            )
        return MixtureLinear(module, layout.topology == "residual", cfg.leaky_relu_slope)

    def _router_kwargs(self) -> dict:
        cfg = self.mixture_config
        loramoe = None
        if cfg.method == "loramoe":
            n_know = cfg.knowledge_experts or max(1, cfg.num_experts // 2)
            loramoe = LoramoeBalance(n_know, cfg.loramoe_beta, cfg.loramoe_delta)
        return {
            "top_k": cfg.top_k,
            "init_std": cfg.router_init_std,
            "balance_coef": cfg.balance_coef,
            "z_coef": cfg.z_loss_coef,
            "loramoe": loramoe,
        }

    def _sync(self, layout: Layout) -> None:
        """Give every layer the experts and router outputs of ``layout``; add only, never touch."""
        cfg = self.mixture_config
        owners = [cfg.tasks.index(e.task) if e.task else None for e in layout.experts]
        if layout.router == "task-shared":
            if self.modulora_shared_gate is None:
                self.modulora_shared_gate = TaskGate(cfg.gate_dim, device=self._device())
            self.modulora_shared_gate.grow(len(cfg.tasks), owners)
        for layer in self.layers.values():
            if isinstance(layer, MoEFFN):
                layer.grow(len(layout.experts) - layer.num_experts)
                continue
            banks = [(layer.modulora_experts, layout.experts)]
            if layer.modulora_universal is not None:
                banks.append((layer.modulora_universal, layout.universal))
            for bank, specs in banks:
                for spec in specs[len(bank) :]:
                    bank.add(spec.name, spec.rank, spec.alpha)
                if bank.names != [s.name for s in specs]:
                    raise RuntimeError(
                        f"layer experts {bank.names} do not match the method's layout"
                    )
            self._sync_router(layer, layout, owners)

    def _sync_router(self, layer: MixtureLinear, layout: Layout, owners: list[int | None]) -> None:
        n = len(layout.experts)
        router = layer.modulora_router
        if layout.router == "token":
            if router is None:
                layer.modulora_router = TokenRouter(
                    layer.d_in, n, device=self._device(), **self._router_kwargs()
                )
            elif router.num_experts < n:
                router.grow(n - router.num_experts)
            layer.modulora_router.set_task_mask(
                task_expert_mask(self.mixture_config, layout.experts)
            )
        elif layout.router == "task":
            if router is None:
                router = layer.modulora_router = TaskGate(
                    self.mixture_config.gate_dim, self._device()
                )
            router.grow(len(self.mixture_config.tasks), owners)
        elif layout.router == "task-shared":
            layer.modulora_router = self.modulora_shared_gate
        elif layout.router == "task-select":
            if router is None:
                router = layer.modulora_router = TaskSelect()
            router.grow([o for o in owners if o is not None])

    def _device(self) -> torch.device:
        return next(self.base_model.parameters()).device

    # --- stages -------------------------------------------------------------------

    def stage_plan(self, name: str) -> StagePlan:
        """The StagePlan of ``name`` for this method (``inference``: the full forward, frozen)."""
        if name == "inference":
            return StagePlan("inference")
        return self.method.stage(self.mixture_config, name)

    def set_stage(self, name: str) -> None:
        """Set what trains and what the forward pass computes (see METHODS.md).

        Raises:
            ValueError: the method has no such stage, or it names an unknown task.
        """
        plan = self.stage_plan(name)
        cfg = self.mixture_config
        layout = self.method.layout(cfg)
        for layer in self.layers.values():
            _apply_stage(layer, plan, cfg, layout)
        io = [self.base_model.get_input_embeddings(), self.base_model.get_output_embeddings()]
        for module in io:
            if module is not None:
                module.requires_grad_(plan.train_base_io)
        self.stage, self._plan = name, plan
        if cfg.method == "modula-res" and plan.task is not None and self._universal_untrained():
            warnings.warn(
                "MoDULA-Res domain experts read the universal expert's output h, which is still "
                "zero: train the 'universal' stage first or domain experts get no gradient",
                stacklevel=2,
            )

    def _universal_untrained(self) -> bool:
        return all(
            not layer.modulora_universal.B[0].any()
            for layer in self.layers.values()
            if isinstance(layer, MixtureLinear) and layer.modulora_universal is not None
        )

    def add_task(self, name: str, rank: int | None = None) -> None:
        """Grow every adapted layer by the new task's expert and the router/gate by one output.

        Existing expert tensors are not touched; new experts start as no-ops (B = 0).
        The current stage is re-applied so the new parameters follow it.
        """
        self.mixture_config = self.method.add_task(self.mixture_config, name, rank)
        self._sync(self.method.layout(self.mixture_config))
        self.set_stage(self.stage)

    # --- forward ------------------------------------------------------------------

    def route(self, task, batch: int, attention_mask=None, device=None) -> Route:
        """Resolve ``task`` (a name, or one name per row) into a ``Route`` for ``batch`` rows.

        Raises:
            ValueError: missing task where one is needed, unknown names, wrong row count.
        """
        cfg, plan = self.mixture_config, self._plan
        needed = self.method.task_gated or plan.task is not None
        if task is None:
            if needed:
                why = f"stage {plan.name!r}" if plan.task else f"method {cfg.method!r}"
                raise ValueError(f"{why} needs task=...; known tasks: {cfg.tasks}")
            return Route(token_mask=attention_mask)
        if not cfg.tasks and not needed:
            return Route(token_mask=attention_mask)  # token-routed without tasks: ignored
        names = [task] * batch if isinstance(task, str) else list(task)
        if len(names) != batch:
            raise ValueError(f"task has {len(names)} entries but the batch has {batch} rows")
        unknown = sorted({t for t in names if t not in cfg.tasks})
        if unknown:
            raise ValueError(f"unknown task(s) {unknown}; known tasks: {cfg.tasks}")
        if plan.task is not None and any(t != plan.task for t in names):
            raise ValueError(
                f"stage {plan.name!r} trains on task {plan.task!r} only, got {sorted(set(names))}"
            )
        ids = torch.tensor([cfg.tasks.index(t) for t in names], device=device)
        knowledge = torch.tensor([t in cfg.knowledge_tasks for t in names], device=device)
        uniform = ids[0].item() if len(set(names)) == 1 else None
        return Route(ids, attention_mask, knowledge, uniform)

    def forward(self, input_ids=None, attention_mask=None, labels=None, task=None, **kwargs):
        """Run the base model with the experts; ``task`` is a name or one name per row.

        Returns the base model's output; when layers report auxiliary losses they are
        in ``out.aux_losses`` (by name, averaged over layers) and ``out.aux_loss``
        (their sum), which is also added to ``out.loss`` when ``labels`` are given.
        """
        ref = input_ids if input_ids is not None else kwargs.get("inputs_embeds")
        route = self.route(task, ref.shape[0], attention_mask, ref.device)
        with routing(list(self.layers.values()), route):
            out = self.base_model(
                input_ids=input_ids, attention_mask=attention_mask, labels=labels, **kwargs
            )
        aux = self._collect_aux()
        if aux:
            total = sum(aux.values())
            out["aux_losses"] = aux
            out["aux_loss"] = total
            if labels is not None and out.get("loss") is not None:
                out["loss"] = out["loss"] + total
        return out

    @property
    def accepts_logits_to_keep(self) -> bool:
        """Whether the base model projects only chosen positions to logits (most HF LMs)."""
        return "logits_to_keep" in inspect.signature(self.base_model.forward).parameters

    @torch.no_grad()
    def generate(self, input_ids=None, attention_mask=None, task=None, **kwargs):
        """``base_model.generate`` with the experts; token routers route every new token."""
        route = self.route(task, input_ids.shape[0], None, input_ids.device)
        expand = kwargs.get("num_beams", 1) * kwargs.get("num_return_sequences", 1)
        if route.task_ids is not None and expand > 1:
            route.task_ids = route.task_ids.repeat_interleave(expand)
            route.knowledge = route.knowledge.repeat_interleave(expand)
        with routing(list(self.layers.values()), route):
            out = self.base_model.generate(
                input_ids=input_ids, attention_mask=attention_mask, **kwargs
            )
        self._collect_aux()
        return out

    def _collect_aux(self) -> dict[str, torch.Tensor]:
        sums, counts = defaultdict(lambda: 0.0), defaultdict(int)
        for layer in self.layers.values():
            for key, value in layer.aux.items():
                sums[key] = sums[key] + value
                counts[key] += 1
            layer.aux = {}
        return {k: sums[k] / counts[k] for k in sums}

    # --- inspection, persistence --------------------------------------------------

    def adapter_parameters(self) -> dict[str, nn.Parameter]:
        """Every adapter parameter by its (unique, ``modulora_``-prefixed) name."""
        return {n: p for n, p in self.named_parameters() if ADAPTER_PREFIX in n}

    def trainable_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad)

    def print_trainable_parameters(self) -> None:
        total = sum(p.numel() for p in self.parameters())
        n = self.trainable_parameters()
        share = 100 * n / total
        print(f"stage {self.stage}: trainable params {n:,} || all params {total:,} || {share:.4f}%")

    def expert_names(self) -> list[str]:
        return [e.name for e in self.method.layout(self.mixture_config).all_experts()]

    def expert_state(self, name: str) -> dict[str, torch.Tensor]:
        """One expert's tensors in every layer, keyed ``<layer>.<tensor>``."""
        from .checkpoint import expert_state

        return expert_state(self, name)

    def save_pretrained(self, directory: str | Path) -> None:
        """Write ``manifest.json``, one safetensors file per expert and ``router.safetensors``."""
        from .checkpoint import save

        save(self, directory)

    def merge(
        self, task: str | None = None, expert: str | None = None, inplace: bool = False
    ) -> nn.Module:
        """A plain transformers model with ``task``'s update folded into the base weights.

        Exact where the gate depends only on the task (lora, multi-lora, cgc-lora,
        moelora) or with one ``expert`` pinned; token routers, MoDULA-Res domain experts
        and MoE-CT raise ``NotMergeableError`` saying why and what to use instead. See
        ``modulora.merge.merge``.
        """
        from .merge import merge

        return merge(self, task, expert, inplace)

    def detach(self) -> nn.Module:
        """Put the original modules back and return the base model as it was."""
        for name, layer in self.layers.items():
            replace_module(self.base_model, name, layer.base_layer)
        for n, p in self.base_model.named_parameters():
            p.requires_grad_(self._frozen_flags.get(n, False))
        self.layers = {}
        return self.base_model


def _apply_stage(
    layer: MixtureLinear | MoEFFN, plan: StagePlan, cfg: MixtureConfig, layout: Layout
) -> None:
    if isinstance(layer, MoEFFN):
        train = any(e.name in plan.train for e in layout.experts)
        layer.modulora_ffn.requires_grad_(train)
        layer.base_layer.requires_grad_(False)  # its parameters are shared with the clone
        fusion = getattr(layer, "modulora_fusion", None)
        if fusion is not None:
            fusion.requires_grad_(plan.train_router is True)
        layer.modulora_router.requires_grad_(plan.train_router is True)
        return
    for bank in (layer.modulora_experts, layer.modulora_universal):
        if bank is not None:
            bank.set_trainable(set(plan.train))
    if plan.fixed is None:
        layer.set_gate(None)
    else:
        names = layer.modulora_experts.names
        layer.set_gate(fixed({names.index(n): w for n, w in plan.fixed.items() if n in names}))
    if layer.modulora_router is not None:
        _train_router(layer.modulora_router, plan, cfg, layout)


def _train_router(router: nn.Module, plan: StagePlan, cfg: MixtureConfig, layout: Layout) -> None:
    if isinstance(plan.train_router, str) and isinstance(router, TaskGate):
        experts = {i for i, e in enumerate(layout.experts) if e.name in plan.train}
        router.set_trainable({cfg.tasks.index(plan.train_router)}, experts)
    else:
        router.requires_grad_(plan.train_router is True)


def attach(model: nn.Module, config: MixtureConfig) -> MixtureModel:
    """Attach a mixture of LoRA experts to ``model`` (modified in place); base weights frozen.

    Args:
        model: any Hugging Face causal LM (Llama, Qwen2, Gemma3, GPT-2, ...).
        config: the ``MixtureConfig``.

    Returns:
        The ``MixtureModel``, in the method's first stage.

    Raises:
        ValueError: bad config, no target module matched, or an already adapted model.
    """
    return MixtureModel(model, config)
