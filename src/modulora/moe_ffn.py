"""MoE-CT: a mixture of expert FFNs beside each frozen FFN (arXiv 2407.00875).

``y = (1 - g) * FFN_base(x) + g * sum_k s_k FFN_k(x)`` with ``s = softmax(W_R x)``
(optional top-k) and ``g`` a fixed share (0.5), a learned scalar or a per-token
sigmoid. Expert FFNs are full trainable copies of the base FFN or LoRA deltas on
its linears.

The K experts run in one pass, without a Python loop: the FFN module is cloned
once with every linear swapped for an ``ExpertFFNLinear`` that maps
(..., 1 | K, d_in) to (..., K, d_out). Activations and products in the FFN's own
``forward`` broadcast over the extra expert axis, so any FFN made of linears and
element-wise ops (Llama, Qwen2, Gemma3, GPT-2) works unchanged.
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D

from .gates import Route, TokenRouter
from .layers import linear_dims, route_for


def _base_weight(layer: nn.Module) -> torch.Tensor:
    """Weight as (d_out, d_in) whatever the layer's own layout."""
    return layer.weight.T if isinstance(layer, Conv1D) else layer.weight


class ExpertFFNLinear(nn.Module):
    """One linear of K expert FFNs, computed for all experts at once.

    ``mode="copy"``: expert k has its own weight ``W_k`` (K, d_out, d_in), started as
    a copy of the base weight. ``mode="lora"``: expert k is ``W0 + s B_k A_k`` with
    the frozen base layer shared.
    """

    def __init__(self, base: nn.Module, num_experts: int, mode: str, rank: int, alpha: float):
        super().__init__()
        self.d_in, self.d_out = linear_dims(base)
        self.mode, self.rank, self.scale = mode, rank, alpha / rank
        self.base_layer = base if mode == "lora" else None
        # kept outside the module tree (a list hides it from nn.Module): it only seeds new experts
        self._base = [base]
        if mode == "copy":
            self.weight = nn.Parameter(torch.empty(0, self.d_out, self.d_in))
            has_bias = getattr(base, "bias", None) is not None
            self.bias = nn.Parameter(torch.empty(0, self.d_out)) if has_bias else None
        else:
            self.A = nn.Parameter(torch.empty(0, rank, self.d_in))
            self.B = nn.Parameter(torch.empty(0, self.d_out, rank))
        self.grow(num_experts)

    @property
    def num_experts(self) -> int:
        return (self.weight if self.mode == "copy" else self.A).shape[0]

    def _append(self, name: str, new: torch.Tensor) -> None:
        old = getattr(self, name)
        grad = old.requires_grad
        setattr(self, name, nn.Parameter(torch.cat([old.data, new.to(old.device, old.dtype)])))
        getattr(self, name).requires_grad_(grad)

    def grow(self, n: int) -> None:
        """Add ``n`` experts; existing expert slices stay bit-identical."""
        base = self._base[0]
        w0 = _base_weight(base).detach().float()
        if self.mode == "copy":
            self._append("weight", w0.expand(n, -1, -1).clone())
            if self.bias is not None:
                self._append("bias", base.bias.detach().float().expand(n, -1).clone())
            return
        a = torch.empty(n, self.rank, self.d_in, device=w0.device)
        for i in range(n):  # init only, not the hot path
            nn.init.kaiming_uniform_(a[i], a=math.sqrt(5))
        self._append("A", a)
        self._append("B", torch.zeros(n, self.d_out, self.rank))

    def expert_tensors(self, k: int) -> dict[str, torch.Tensor]:
        if self.mode == "copy":
            out = {"weight": self.weight[k]}
            if self.bias is not None:
                out["bias"] = self.bias[k]
            return out
        return {"A": self.A[k], "B": self.B[k]}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: (..., 1, d_in) for the FFN's first linears, (..., K, d_in) after them
        K = self.num_experts
        shared_input = x.shape[-2] == 1
        if self.mode == "copy":
            x = x.to(self.weight.dtype)
            if shared_input:  # one matmul for all experts: (..., d_in) @ (d_in, K*d_out)
                flat_b = None if self.bias is None else self.bias.reshape(-1)
                y = F.linear(x.squeeze(-2), self.weight.reshape(-1, self.d_in), flat_b)
                return y.unflatten(-1, (K, self.d_out))  # (..., K, d_out)
            y = torch.einsum("...kd,kod->...ko", x, self.weight)
            return y if self.bias is None else y + self.bias
        # (..., 1|K, d_out): the frozen W0 broadcasts over experts (Conv1D needs contiguous)
        y = self.base_layer(x.contiguous())
        xa = x.to(self.A.dtype)
        if shared_input:
            u = F.linear(xa.squeeze(-2), self.A.reshape(-1, self.d_in)).unflatten(-1, (K, -1))
        else:
            u = torch.einsum("...kd,krd->...kr", xa, self.A)  # (..., K, r)
        delta = torch.einsum("...kr,kor->...ko", u, self.B) * self.scale  # (..., K, d_out)
        return y + delta.to(y.dtype)


def clone_ffn_as_experts(ffn: nn.Module, **expert_kwargs) -> nn.Module:
    """Clone ``ffn`` sharing its (frozen) parameters, with every linear made K-way."""
    clone = copy.deepcopy(ffn, memo={id(p): p for p in ffn.parameters()})
    for name, child in list(clone.named_modules()):
        if isinstance(child, nn.Linear | Conv1D):
            parent_name, _, attr = name.rpartition(".")
            parent = clone.get_submodule(parent_name) if parent_name else clone
            setattr(parent, attr, ExpertFFNLinear(child, **expert_kwargs))
    return clone


class MoEFFN(nn.Module):
    """A frozen FFN fused with a routed mixture of expert FFNs (MoE-CT).

    Args:
        base_layer: the model's FFN module (frozen).
        d_model: its input width.
        num_experts: K expert FFNs.
        mode: ``"copy"`` or ``"lora"`` experts.
        rank, alpha: LoRA rank/alpha of ``"lora"`` experts.
        fusion: ``"fixed"``, ``"scalar"`` or ``"token"``.
        share: the fixed share g, or the initial g of learned fusions.
        router_kwargs: TokenRouter options (top_k, init_std, aux-loss weights).
    """

    def __init__(
        self,
        base_layer: nn.Module,
        d_model: int,
        num_experts: int,
        mode: str = "lora",
        rank: int = 8,
        alpha: float = 16.0,
        fusion: str = "fixed",
        share: float = 0.5,
        **router_kwargs,
    ) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.fusion = fusion
        expert_kw = {"num_experts": num_experts, "mode": mode, "rank": rank, "alpha": alpha}
        self.modulora_ffn = clone_ffn_as_experts(base_layer, **expert_kw)
        device = next(base_layer.parameters()).device
        self.modulora_router = TokenRouter(d_model, num_experts, device=device, **router_kwargs)
        logit = math.log(share / (1.0 - share))
        if fusion == "fixed":
            self.register_buffer("share", torch.tensor(share))
        elif fusion == "scalar":
            self.modulora_fusion = nn.Parameter(torch.tensor(logit))
        else:  # per-token sigmoid(w.x + b), starting at the given share everywhere
            self.modulora_fusion = nn.Linear(d_model, 1, device=device)
            nn.init.zeros_(self.modulora_fusion.weight)
            nn.init.constant_(self.modulora_fusion.bias, logit)
        self.aux: dict[str, torch.Tensor] = {}

    def expert_linears(self) -> list[tuple[str, ExpertFFNLinear]]:
        return [
            (n, m) for n, m in self.modulora_ffn.named_modules() if isinstance(m, ExpertFFNLinear)
        ]

    @property
    def num_experts(self) -> int:
        return self.modulora_router.num_experts

    def grow(self, n: int = 1) -> None:
        for _, lin in self.expert_linears():
            lin.grow(n)
        self.modulora_router.grow(n)

    def fusion_share(self, x: torch.Tensor) -> torch.Tensor:
        if self.fusion == "fixed":
            return self.share
        if self.fusion == "scalar":
            return torch.sigmoid(self.modulora_fusion)
        return torch.sigmoid(self.modulora_fusion(x.to(self.modulora_fusion.weight.dtype)))

    def forward(self, x: torch.Tensor, route: Route | None = None) -> torch.Tensor:
        base = self.base_layer(x)  # (..., d)
        gate = self.modulora_router(x, route_for(self, route))
        self.aux = gate.aux
        experts = self.modulora_ffn(x.unsqueeze(-2))  # (..., K, d)
        moe = torch.einsum("...k,...kd->...d", gate.weights.to(experts.dtype), experts)
        g = self.fusion_share(x).to(base.dtype)
        return base + g * (moe.to(base.dtype) - base)  # == (1 - g) * base + g * moe
