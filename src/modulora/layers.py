"""The adapted linear layer: a frozen base layer plus gated, stacked LoRA experts.

Two topologies (ARCHITECTURE.md):

* parallel: ``y = W0 x + sum_i w_i E_i(x)`` (LoRA, MoLoRA, MoDULA-Flan, CGC-LoRA,
  MOELoRA, LoRAMoE);
* residual: ``h = E_*(x); y = W0 x + h + sum_i w_i D_i(h)`` with
  ``D_i(h) = s_i B_i LeakyReLU(A_i h)`` (MoDULA-Res, arXiv 2412.07405).

The layer only computes. Which experts exist, what trains and how the gate weights
are obtained in each stage is decided by the method (``modulora.methods``) and set
from outside through ``set_gate`` and ``set_trainable``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D

from .experts import ExpertBank, Stacked
from .gates import GateOut, Route


def linear_dims(layer: nn.Module) -> tuple[int, int]:
    """(d_in, d_out) of an nn.Linear or a GPT-2 style Conv1D (weight stored d_in x d_out)."""
    if isinstance(layer, nn.Linear):
        return layer.in_features, layer.out_features
    if isinstance(layer, Conv1D):
        return layer.weight.shape[0], layer.weight.shape[1]
    raise TypeError(f"cannot adapt {type(layer).__name__}: only nn.Linear and Conv1D layers")


def lora_delta(
    x: torch.Tensor,
    stacked: Stacked,
    weights: torch.Tensor | None,
    act=None,
    add_to: torch.Tensor | None = None,
) -> torch.Tensor:
    """Fused expert path: ``B_all (coef * act(A_all x))`` for all selected experts at once.

    Args:
        x: (..., d_in) input.
        stacked: the selected experts (see ``ExpertBank.stacked``).
        weights: gate weights broadcastable to (..., E_sel), or None for weight 1.
        act: optional non-linearity between A and B (MoDULA-Res domain experts).
        add_to: (..., d_out) the base layer's output: returned plus the experts' sum,
            added inside the second matmul (``addmm``) instead of in another pass.

    Returns:
        (..., d_out) the weighted sum of the experts' outputs (plus ``add_to``).
    """
    u = F.linear(x.to(stacked.A.dtype), stacked.A)  # (..., R): every expert's rank rows
    if act is not None:
        u = act(u)
    if weights is not None and weights.device != u.device:
        weights = weights.to(u.device)
    u = stacked.scale_rows(u, weights)  # (..., R): gate weight * alpha/r of the owning expert
    if add_to is None:
        return F.linear(u, stacked.B)  # (..., d_out)
    if add_to.dtype != u.dtype:  # e.g. a bf16 base under fp32 experts
        return add_to + F.linear(u, stacked.B).to(add_to.dtype)
    flat = torch.addmm(
        add_to.reshape(-1, add_to.shape[-1]), u.reshape(-1, u.shape[-1]), stacked.B.t()
    )
    return flat.view(add_to.shape)  # (..., d_out)


def route_for(layer: nn.Module, route: Route | None) -> Route | None:
    """The route of this call; inside backward (a checkpoint recomputing the forward)
    the route of the layer's last routed call, which is the one being recomputed."""
    if torch.compiler.is_compiling():
        return route
    if route is None and torch._C._current_graph_task_id() != -1:
        return getattr(layer, "last_route", None)
    return route


class MixtureLinear(nn.Module):
    """A frozen ``nn.Linear``/``Conv1D`` with a mixture of LoRA experts beside it.

    Args:
        base_layer: the layer being adapted; its weights stay frozen.
        residual: MoDULA-Res topology (a universal expert on ``x`` whose output ``h``
            feeds the gated experts) instead of parallel experts on ``x``.
        leaky_relu_slope: negative slope of the residual experts' LeakyReLU.

    Attributes:
        modulora_experts: the gated experts (input ``x``, or ``h`` when residual).
        modulora_universal: the residual path's universal expert(s), or None.
        modulora_router: the layer's router/gate module (TokenRouter, TaskGate,
            TaskSelect), possibly shared with other layers, or None.
    """

    def __init__(
        self, base_layer: nn.Module, residual: bool = False, leaky_relu_slope: float = 0.01
    ) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.d_in, self.d_out = linear_dims(base_layer)
        device = base_layer.weight.device
        if residual:
            self.modulora_universal = ExpertBank(self.d_in, self.d_out, device=device)
            self.modulora_experts = ExpertBank(self.d_out, self.d_out, device=device)
        else:
            self.modulora_universal = None
            self.modulora_experts = ExpertBank(self.d_in, self.d_out, device=device)
        self.modulora_router: nn.Module | None = None
        self.leaky_relu_slope = leaky_relu_slope
        self.fixed_gate: GateOut | None = None
        self.aux: dict[str, torch.Tensor] = {}

    def set_gate(self, fixed: GateOut | None) -> None:
        """Use constant gate weights (a stage's one-hot), or the router when None."""
        self.fixed_gate = fixed

    def gate(self, x: torch.Tensor, route: Route | None) -> GateOut:
        if self.fixed_gate is not None:
            return self.fixed_gate
        if self.modulora_router is None:
            return GateOut()
        return self.modulora_router(x, route)

    def _act(self, u: torch.Tensor) -> torch.Tensor:
        return F.leaky_relu(u, self.leaky_relu_slope)

    def forward(self, x: torch.Tensor, route: Route | None = None) -> torch.Tensor:
        y = self.base_layer(x)
        gate = self.gate(x, route_for(self, route))
        self.aux = gate.aux
        inp, act = x, None
        if self.modulora_universal is not None:
            h = lora_delta(x, self.modulora_universal.stacked(), None)  # (..., d_out)
            y = y + h.to(y.dtype)
            inp, act = h, self._act
        if gate.select == () or len(self.modulora_experts) == 0:
            return y
        stacked = self.modulora_experts.stacked(gate.select)
        return lora_delta(inp, stacked, gate.weights, act, add_to=y)

    def extra_repr(self) -> str:
        banks = [("experts", self.modulora_experts), ("universal", self.modulora_universal)]
        parts = [
            f"{label}={list(zip(bank.names, bank.ranks, strict=True))}"
            for label, bank in banks
            if bank is not None
        ]
        return f"d_in={self.d_in}, d_out={self.d_out}, " + ", ".join(parts)
