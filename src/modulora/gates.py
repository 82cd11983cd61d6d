"""Where expert weights come from: none, fixed, token router, task gate.

A gate is a small strategy object (one factory, ``make_router``); the layer asks
it once per call for the weights of its experts and never cares which kind it is.
Auxiliary losses (Mixtral load balancing, router z-loss, LoRAMoE's localized
balancing) are computed here, from the same routing tensors, and returned beside
the weights.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class Route:
    """Per-forward routing context handed to every adapted layer.

    Attributes:
        task_ids: (B,) long task index per row, or None.
        token_mask: (B, T) 1 for real tokens (the attention mask), or None;
            used only to keep padding out of auxiliary losses.
        knowledge: (B,) bool, LoRAMoE sample type (world-knowledge rows), or None.
        uniform_task: the task index when every row has the same task, so
            task-selected experts can skip the others' work.
        cache: per-forward memo for gates shared by many layers (e.g. which
            experts a batch's tasks may use), so that work is done once.
    """

    task_ids: torch.Tensor | None = None
    token_mask: torch.Tensor | None = None
    knowledge: torch.Tensor | None = None
    uniform_task: int | None = None
    cache: dict = field(default_factory=dict)

    def used_experts(self, allowed: torch.Tensor) -> tuple[int, ...]:
        """Experts that some row's task may use, given an (n_tasks, E) bool table.

        Experts no row can use are skipped, so adding a task never changes the
        computation (and so the outputs, bit for bit) of batches of old tasks.
        """
        key = ("used", allowed.data_ptr(), tuple(allowed.shape))
        if key not in self.cache:
            rows = (
                allowed[self.task_ids]
                if self.uniform_task is None
                else allowed[self.uniform_task][None]
            )
            self.cache[key] = tuple(rows.any(dim=0).nonzero().flatten().tolist())
        return self.cache[key]


@dataclass
class GateOut:
    """Gate decision for one layer call.

    Attributes:
        select: indices of the experts to compute (None: all of them).
        weights: weights of the selected experts, broadcastable to (..., E_sel);
            None means weight 1 for each.
        aux: named auxiliary losses (scalars, already multiplied by their coefficients).
    """

    select: tuple[int, ...] | None = None
    weights: torch.Tensor | None = None
    aux: dict[str, torch.Tensor] = field(default_factory=dict)


def fixed(weights: dict[int, float]) -> GateOut:
    """Constant weights for a stage (e.g. one-hot on the domain being trained).

    Experts with no entry are skipped entirely rather than multiplied by zero.
    """
    select = tuple(sorted(weights))
    if all(weights[i] == 1.0 for i in select):
        return GateOut(select=select)
    return GateOut(select=select, weights=torch.tensor([weights[i] for i in select]))


def per_row(weights: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """(B, E) row weights -> shape broadcastable against x's (B, ..., E)."""
    if x.dim() < 2 or x.shape[0] != weights.shape[0]:
        raise ValueError(
            f"task ids give {weights.shape[0]} rows but the layer input has shape "
            f"{tuple(x.shape)}; pass one task per batch row"
        )
    return weights.view(weights.shape[0], *([1] * (x.dim() - 2)), weights.shape[1])


class TokenRouter(nn.Module):
    """``s = softmax(W_R x)`` per token, optional top-k renormalised (MoLoRA, MoDULA).

    Args:
        d_in: input width.
        num_experts: outputs.
        top_k: keep the k largest weights per token (None: dense).
        init_std: std of the normal init of ``W_R``.
        balance_coef / z_coef: Mixtral load-balancing and z-loss weights.
        loramoe: LoRAMoE localized-balancing settings, or None.
    """

    def __init__(
        self,
        d_in: int,
        num_experts: int,
        top_k: int | None = None,
        init_std: float = 0.02,
        balance_coef: float = 0.0,
        z_coef: float = 0.0,
        loramoe: LoramoeBalance | None = None,
        device=None,
    ) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_experts, d_in, device=device))
        nn.init.normal_(self.weight, std=init_std) if init_std > 0 else nn.init.zeros_(self.weight)
        self.top_k, self.init_std = top_k, init_std
        self.balance_coef, self.z_coef, self.loramoe = balance_coef, z_coef, loramoe
        # (n_tasks, E) experts each task may use when a row names its task; None: all
        self.register_buffer("task_mask", None, persistent=False)

    def set_task_mask(self, allowed: list[list[bool]] | None) -> None:
        """Rows that name a task route only over the experts that existed when that task
        was trained (``methods.base.task_expert_mask``); rows without a task, over all.

        Experts no row of a batch may use are not computed at all, so a batch of old
        tasks gives, bit for bit, what it gave before tasks were added (as task gates).
        """
        mask = None if allowed is None else torch.tensor(allowed, dtype=torch.bool)
        self.task_mask = None if mask is None else mask.to(self.weight.device)

    @property
    def num_experts(self) -> int:
        return self.weight.shape[0]

    def grow(self, n: int = 1) -> None:
        """Add ``n`` outputs; existing rows are kept exactly."""
        new = torch.empty(n, self.weight.shape[1], device=self.weight.device)
        nn.init.normal_(new, std=self.init_std) if self.init_std > 0 else nn.init.zeros_(new)
        grad = self.weight.requires_grad
        self.weight = nn.Parameter(torch.cat([self.weight.data, new.to(self.weight.dtype)]))
        self.weight.requires_grad_(grad)

    def forward(self, x: torch.Tensor, route: Route | None) -> GateOut:
        masked = self.task_mask is not None and route is not None and route.task_ids is not None
        if not masked:
            return self._route(x, route, F.linear(x.to(self.weight.dtype), self.weight), None)
        select = route.used_experts(self.task_mask)
        logits = F.linear(x.to(self.weight.dtype), self.weight[list(select)])  # (..., E_sel)
        rows = self.task_mask[route.task_ids][:, list(select)]  # (B, E_sel)
        logits = logits.masked_fill(~per_row(rows, x), float("-inf"))
        return self._route(x, route, logits, select)

    def _route(self, x, route, logits: torch.Tensor, select) -> GateOut:
        probs = logits.softmax(dim=-1)
        k = self.top_k
        top_idx = None
        if k is not None and k < probs.shape[-1]:
            top_val, top_idx = probs.topk(k, dim=-1)  # (..., k)
            top_val = top_val / top_val.sum(dim=-1, keepdim=True)
            weights = torch.zeros_like(probs).scatter(-1, top_idx, top_val)
        else:
            weights = probs
        aux = {}
        mask = _token_mask(x, route)
        if self.balance_coef > 0:
            aux["load_balance"] = self.balance_coef * load_balance_loss(probs, top_idx, mask)
        if self.z_coef > 0:
            aux["z_loss"] = self.z_coef * z_loss(logits, mask)
        if self.loramoe is not None:
            aux["loramoe_balance"] = self.loramoe(weights, mask, route)
        return GateOut(select=select, weights=weights, aux=aux)


def _token_mask(x: torch.Tensor, route: Route | None) -> torch.Tensor | None:
    if route is None or route.token_mask is None:
        return None
    # During cached generation the layer sees one new token while the attention
    # mask covers the whole sequence: the mask is then not about these tokens.
    return route.token_mask if tuple(route.token_mask.shape) == tuple(x.shape[:-1]) else None


def _masked_mean(values: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Mean over all leading dims of values (..., C) -> (C,), counting only unmasked tokens."""
    flat = values.reshape(-1, values.shape[-1])
    if mask is None:
        return flat.mean(dim=0)
    m = mask.reshape(-1, 1).to(flat.dtype)
    return (flat * m).sum(dim=0) / m.sum().clamp_min(1.0)


def load_balance_loss(
    probs: torch.Tensor, top_idx: torch.Tensor | None, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Switch/Mixtral balancing ``E * sum_i f_i P_i``; equals 1 for perfectly even routing.

    ``f_i`` is the share of (token, slot) assignments that go to expert i (top-1 when
    routing is dense), ``P_i`` the mean router probability of expert i.
    """
    num_experts = probs.shape[-1]
    idx = probs.argmax(dim=-1, keepdim=True) if top_idx is None else top_idx  # (..., k)
    assigned = F.one_hot(idx, num_experts).to(probs.dtype).sum(dim=-2) / idx.shape[-1]
    f = _masked_mean(assigned, mask)  # (E,)
    p = _masked_mean(probs, mask)  # (E,)
    return num_experts * (f * p).sum()


def z_loss(logits: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Router z-loss: mean over tokens of ``logsumexp(logits)^2`` (ST-MoE)."""
    z = logits.logsumexp(dim=-1, keepdim=True).square()
    return _masked_mean(z, mask).squeeze(0)


class LoramoeBalance(nn.Module):
    """LoRAMoE's localized balancing constraint ``beta * CV^2(I * Q)``.

    Experts ``[0, n_knowledge)`` form the world-knowledge group, the rest the
    downstream group. Per sample, ``Q`` sums the routing weights over its tokens
    (B x E); ``I`` is ``1 + delta`` on the group matching the sample's type and
    ``1 - delta`` on the other. Rows with no type given count as downstream.
    """

    def __init__(self, n_knowledge: int, beta: float, delta: float) -> None:
        super().__init__()
        self.n_knowledge, self.beta, self.delta = n_knowledge, beta, delta

    def forward(
        self, weights: torch.Tensor, mask: torch.Tensor | None, route: Route | None
    ) -> torch.Tensor:
        w = weights if weights.dim() == 3 else weights.reshape(1, -1, weights.shape[-1])
        if mask is not None:
            w = w * mask.reshape(w.shape[0], w.shape[1], 1).to(w.dtype)
        q = w.sum(dim=1)  # (B, E)
        rows, num_experts = q.shape
        is_knowledge_expert = torch.arange(num_experts, device=q.device) < self.n_knowledge
        knowledge = torch.zeros(rows, dtype=torch.bool, device=q.device)
        if (
            route is not None
            and route.knowledge is not None
            and w.shape[0] == route.knowledge.numel()
        ):
            knowledge = route.knowledge.to(q.device)
        match = knowledge[:, None] == is_knowledge_expert[None, :]  # (B, E)
        importance = torch.where(match, 1.0 + self.delta, 1.0 - self.delta).to(q.dtype) * q
        cv2 = importance.var(unbiased=False) / importance.mean().square().clamp_min(1e-12)
        return self.beta * cv2


class TaskGate(nn.Module):
    """``w^t = softmax(W_g emb(t))`` over the experts task t may use (CGC-LoRA, MOELoRA).

    Task embeddings and the gate's per-expert rows are separate parameters, so a
    new task can train only its own embedding and its own expert's row while every
    old task's weights stay exactly as they were. ``allowed[t, i]`` masks the other
    tasks' specific experts (CGC).
    """

    def __init__(self, gate_dim: int, device=None) -> None:
        super().__init__()
        self.gate_dim = gate_dim
        self.emb = nn.ParameterList()  # one (gate_dim,) per task
        self.rows = nn.ParameterList()  # one (gate_dim,) per expert
        self.owner: list[int | None] = []  # task index owning each expert (None: common)
        self._device = device
        self.register_buffer("allowed", torch.ones(0, 0, dtype=torch.bool), persistent=False)

    def grow(self, num_tasks: int, owners: list[int | None]) -> None:
        """Grow to ``num_tasks`` tasks and the experts described by ``owners``."""
        while len(self.emb) < num_tasks:
            # unit-variance embeddings, zero rows: every allowed expert starts equal
            self.emb.append(nn.Parameter(torch.randn(self.gate_dim, device=self._device)))
        for owner in owners[len(self.rows) :]:
            self.rows.append(nn.Parameter(torch.zeros(self.gate_dim, device=self._device)))
            self.owner.append(owner)
        allowed = torch.tensor(
            [[o is None or o == t for o in self.owner] for t in range(len(self.emb))],
            dtype=torch.bool,
        )
        self.allowed = allowed.to(self.rows[0].device)

    def set_trainable(self, tasks: set[int] | None, experts: set[int] | None) -> None:
        """Train all (None) or only the named task embeddings and expert rows."""
        for t, p in enumerate(self.emb):
            p.requires_grad_(tasks is None or t in tasks)
        for i, p in enumerate(self.rows):
            p.requires_grad_(experts is None or i in experts)

    def forward(self, x: torch.Tensor, route: Route | None) -> GateOut:
        if route is None or route.task_ids is None:
            raise ValueError("a task-gated layer needs task ids (pass task=...)")
        select = route.used_experts(self.allowed)
        # the lists' own dicts: ParameterList indexing costs microseconds per item
        embs, rows = list(self.emb._parameters.values()), list(self.rows._parameters.values())
        emb = torch.stack(embs)[route.task_ids]  # (B, D)
        logits = emb @ torch.stack([rows[i] for i in select]).T  # (B, E_sel)
        logits = logits.masked_fill(~self.allowed[route.task_ids][:, select], float("-inf"))
        return GateOut(select=select, weights=per_row(logits.softmax(dim=-1), x))


class TaskSelect(nn.Module):
    """Each row uses its own task's expert only (multiple independent LoRAs)."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("allowed", torch.ones(0, 0, dtype=torch.bool), persistent=False)

    def grow(self, expert_of_task: list[int]) -> None:
        self.expert_of_task = list(expert_of_task)
        n = len(expert_of_task)
        eye = torch.zeros(n, n, dtype=torch.bool)
        eye[torch.arange(n), torch.tensor(expert_of_task)] = True
        self.allowed = eye.to(self.allowed.device)

    def forward(self, x: torch.Tensor, route: Route | None) -> GateOut:
        if route is None or route.task_ids is None:
            raise ValueError("multi-lora layers need task ids (pass task=...)")
        select = route.used_experts(self.allowed)
        if len(select) == 1:
            return GateOut(select=select)
        onehot = self.allowed[route.task_ids][:, select].to(x.dtype)  # (B, E_sel)
        return GateOut(select=select, weights=per_row(onehot, x))
