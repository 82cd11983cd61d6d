"""Naive per-expert reference implementation (tests only).

Loops over experts and rows in Python and recomputes every gate from its
definition in METHODS.md, sharing no math with the fused path. The contract
tests swap it in for each layer's ``forward`` and compare outputs and gradients.
"""

from __future__ import annotations

import types

import torch
import torch.nn.functional as F
from torch.func import functional_call
from transformers.pytorch_utils import Conv1D

from modulora.gates import TaskGate, TaskSelect, TokenRouter
from modulora.layers import MixtureLinear
from modulora.moe_ffn import ExpertFFNLinear, MoEFFN


def token_weights(router: TokenRouter, x: torch.Tensor, route=None) -> torch.Tensor:
    logits = x @ router.weight.T  # (B, T, E)
    mask = getattr(router, "task_mask", None)
    if mask is not None and route is not None and route.task_ids is not None:
        # a row naming a task may use only the experts that existed when it was trained
        for b, t in enumerate(route.task_ids.tolist()):
            logits[b] = logits[b].masked_fill(~mask[t], float("-inf"))
    probs = torch.softmax(logits, dim=-1)  # (..., E)
    k = router.top_k
    if k is None or k >= probs.shape[-1]:
        return probs
    kth = probs.sort(dim=-1, descending=True).values[..., k - 1 : k]
    kept = torch.where(probs >= kth, probs, torch.zeros_like(probs))
    return kept / kept.sum(dim=-1, keepdim=True)


def task_weights(gate: TaskGate, task_ids: torch.Tensor, num_experts: int) -> torch.Tensor:
    rows = []
    for t in task_ids.tolist():
        logits = []
        for i in range(num_experts):
            owner = gate.owner[i]
            if owner is None or owner == t:
                logits.append(torch.dot(gate.emb[t], gate.rows[i]))
            else:
                logits.append(torch.tensor(float("-inf")))
        rows.append(torch.softmax(torch.stack(logits), dim=0))
    return torch.stack(rows)  # (B, E)


def select_weights(gate: TaskSelect, task_ids: torch.Tensor, num_experts: int) -> torch.Tensor:
    out = torch.zeros(len(task_ids), num_experts)
    for b, t in enumerate(task_ids.tolist()):
        out[b, gate.expert_of_task[t]] = 1.0
    return out


def gate_weights(layer, x: torch.Tensor, route, num_experts: int) -> torch.Tensor:
    """Full (..., E) weights, zeros for experts a fixed gate leaves out."""
    shape = (*x.shape[:-1], num_experts)
    fixed = getattr(layer, "fixed_gate", None)
    if fixed is not None:
        w = torch.zeros(num_experts)
        for j, i in enumerate(fixed.select):
            w[i] = 1.0 if fixed.weights is None else fixed.weights[j]
        return w.expand(shape)
    router = layer.modulora_router
    if router is None:
        return torch.ones(shape)
    if isinstance(router, TokenRouter):
        return token_weights(router, x, route)
    table = (task_weights if isinstance(router, TaskGate) else select_weights)(
        router, route.task_ids, num_experts
    )
    return table[:, None, :].expand(shape)


def expert_out(bank, i: int, inp: torch.Tensor, act=None) -> torch.Tensor:
    u = inp @ bank.A[i].T
    if act is not None:
        u = act(u)
    return (u @ bank.B[i].T) * (bank.alphas[i] / bank.ranks[i])


def mixture_linear_forward(self: MixtureLinear, x, route=None):
    y = self.base_layer(x)
    inp, act = x, None
    if self.modulora_universal is not None:
        h = sum(
            expert_out(self.modulora_universal, i, x) for i in range(len(self.modulora_universal))
        )
        y = y + h
        inp, act = h, (lambda u: F.leaky_relu(u, self.leaky_relu_slope))
    bank = self.modulora_experts
    w = gate_weights(self, x, route, len(bank))
    for i in range(len(bank)):
        y = y + w[..., i : i + 1] * expert_out(bank, i, inp, act)
    return y


def expert_ffn_params(layer: MoEFFN, k: int) -> dict[str, torch.Tensor]:
    """Parameters of expert FFN k, materialised as full weights of the base FFN."""
    params = {}
    for sub, lin in layer.modulora_ffn.named_modules():
        if not isinstance(lin, ExpertFFNLinear):
            continue
        base = layer.base_layer.get_submodule(sub)
        w0 = base.weight.T if isinstance(base, Conv1D) else base.weight  # (d_out, d_in)
        if lin.mode == "copy":
            w = lin.weight[k]
            bias = None if lin.bias is None else lin.bias[k]
        else:
            w = w0 + lin.scale * lin.B[k] @ lin.A[k]
            bias = getattr(base, "bias", None)
        params[f"{sub}.weight"] = w.T if isinstance(base, Conv1D) else w
        if bias is not None:
            params[f"{sub}.bias"] = bias
    return params


def moe_ffn_forward(self: MoEFFN, x, route=None):
    base = self.base_layer(x)
    w = token_weights(self.modulora_router, x)
    moe = 0
    for k in range(self.num_experts):
        moe = moe + w[..., k : k + 1] * functional_call(
            self.base_layer, expert_ffn_params(self, k), (x,)
        )
    g = self.fusion_share(x)
    return (1 - g) * base + g * moe


def use_reference(model) -> None:
    """Swap every adapted layer's forward for the reference one (instance attribute)."""
    for layer in model.layers.values():
        fn = moe_ffn_forward if isinstance(layer, MoEFFN) else mixture_linear_forward
        layer.forward = types.MethodType(fn, layer)


def use_fused(model) -> None:
    for layer in model.layers.values():
        layer.__dict__.pop("forward", None)
