"""Stacked LoRA experts of one adapted layer.

Each expert ``i`` is a pair ``A_i`` (r_i x d_in), ``B_i`` (d_out x r_i) with scale
``alpha_i / r_i``. The experts are kept as separate parameters, so a stage can
freeze some of them and ``add`` leaves the others bit-identical, and are
concatenated into ``A_all`` (sum r_i x d_in) / ``B_all`` (d_out x sum r_i) for the
forward pass: two matmuls whatever the number of experts (ARCHITECTURE.md).
The concatenation copies a few thousand numbers, negligible next to ``x @ A_all^T``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class Stacked:
    """The selected experts of a bank, ready for the fused forward.

    Attributes:
        A: (R, d_in) rows of the selected experts' A, concatenated.
        B: (d_out, R) columns of their B.
        segment: (R,) long, the position (0..E_sel-1) of the expert owning each rank row.
        scale: (E_sel,) alpha_i / r_i.
    """

    A: torch.Tensor
    B: torch.Tensor
    segment: torch.Tensor
    scale: torch.Tensor
    rank: int | None = None  # the rank of every selected expert, when they share one
    row_scale: torch.Tensor | None = None  # (R,) alpha/r per rank row (= expand(None))

    def expand(self, weights: torch.Tensor | None) -> torch.Tensor:
        """Per-rank-row coefficient (..., R) from per-expert gate weights (..., E_sel)."""
        if weights is None and self.row_scale is not None:
            return self.row_scale
        coef = self.scale if weights is None else weights * self.scale
        return coef[..., self.segment]

    def scale_rows(self, u: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
        """``u`` (..., R) with each expert's rank rows times its gate weight and alpha/r.

        With one rank for all experts this is a broadcast over a (..., E, r) view, whose
        backward is a plain reduction; gathering a (..., R) coefficient (``expand``)
        costs an index scatter in backward, several times slower on CPU.
        """
        if weights is None or self.rank is None:
            return u * self.expand(weights)
        coef = weights * self.scale  # (..., E)
        rows = u.view(*u.shape[:-1], -1, self.rank)  # (..., E, r)
        return (rows * coef[..., None]).view(u.shape)


class ExpertBank(nn.Module):
    """LoRA experts that read the same input, stored per expert, used stacked."""

    def __init__(self, d_in: int, d_out: int, device=None, dtype=torch.float32) -> None:
        super().__init__()
        self.d_in, self.d_out = d_in, d_out
        self.A = nn.ParameterList()
        self.B = nn.ParameterList()
        self.names: list[str] = []
        self.ranks: list[int] = []
        self.alphas: list[float] = []
        self._factory = {"device": device, "dtype": dtype}
        self._cache: dict[tuple[int, ...], tuple[torch.Tensor, ...]] = {}
        self._stacks: dict[tuple[int, ...], tuple] = {}  # frozen experts' Stacked, by key

    def __len__(self) -> int:
        return len(self.names)

    def index(self, name: str) -> int:
        return self.names.index(name)

    def add(self, name: str, rank: int, alpha: float) -> None:
        """Append an expert: ``A`` Kaiming-uniform as in PEFT, ``B`` zero, so it starts a no-op."""
        if name in self.names:
            raise ValueError(f"expert {name!r} already exists in this layer")
        # follow the existing experts if the model was moved or cast since creation
        like = self.A[0] if len(self.A) else None
        factory = (
            {"device": like.device, "dtype": like.dtype} if like is not None else self._factory
        )
        a = torch.empty(rank, self.d_in, **factory)
        nn.init.kaiming_uniform_(a, a=math.sqrt(5))
        self.A.append(nn.Parameter(a))
        self.B.append(nn.Parameter(torch.zeros(self.d_out, rank, **factory)))
        self.names.append(name)
        self.ranks.append(rank)
        self.alphas.append(alpha)
        self._cache.clear()
        self._stacks.clear()

    def _index_tensors(self, sel: tuple[int, ...], device) -> tuple[torch.Tensor, ...]:
        # segment, scale and per-row scale depend only on which experts are selected:
        # cache them so the hot path builds no small tensors from Python lists.
        if torch.compiler.is_compiling():  # traced once into the graph: no Python cache
            return self._build_index(sel, device)
        hit = self._cache.get(sel)
        made_in_inference = hit is not None and hit[1].is_inference()
        if (
            hit is None
            or hit[0].device != device
            or (made_in_inference and not torch.is_inference_mode_enabled())
        ):
            hit = self._cache[sel] = self._build_index(sel, device)
        return hit

    def _build_index(self, sel: tuple[int, ...], device) -> tuple[torch.Tensor, ...]:
        segment = torch.cat(
            [torch.full((self.ranks[i],), j, dtype=torch.long) for j, i in enumerate(sel)]
        ).to(device)
        scale = torch.tensor(
            [self.alphas[i] / self.ranks[i] for i in sel], dtype=self._factory["dtype"]
        ).to(device)
        return segment, scale, scale[segment]

    def stacked(self, select: tuple[int, ...] | None = None) -> Stacked:
        """The selected experts (all by default), concatenated for one fused forward.

        Frozen experts (inference, generation, a router stage) reuse the last result
        while their tensors are unchanged: the key holds each tensor's storage and
        in-place version, so an optimizer step, a load or a move invalidates it.
        Experts that train are concatenated in the graph on every call.
        """
        sel = tuple(range(len(self.names))) if select is None else select
        # the lists' own dicts: ParameterList indexing costs microseconds per item
        a, b = list(self.A._parameters.values()), list(self.B._parameters.values())
        params = [a[i] for i in sel] + [b[i] for i in sel]
        trains = torch.is_grad_enabled() and any(p.requires_grad for p in params)
        if trains or torch.compiler.is_compiling():  # no Python cache inside a graph
            return self._build(sel, params)
        key = tuple((p.data_ptr(), p._version) for p in params)
        hit = self._stacks.get(sel)
        # tensors made under inference_mode cannot be saved for backward outside it
        stale = (
            hit is not None and hit[1].A.is_inference() and not torch.is_inference_mode_enabled()
        )
        if hit is None or hit[0] != key or stale:
            with torch.no_grad():
                hit = self._stacks[sel] = (key, self._build(sel, params))
        return hit[1]

    def _build(self, sel: tuple[int, ...], params: list[torch.Tensor]) -> Stacked:
        n = len(sel)
        if n == 1:
            A, B = params
        else:
            A, B = torch.cat(params[:n], dim=0), torch.cat(params[n:], dim=1)
        segment, scale, row_scale = self._index_tensors(sel, A.device)
        ranks = {self.ranks[i] for i in sel}
        rank = ranks.pop() if len(ranks) == 1 else None
        return Stacked(A, B, segment, scale.to(A.dtype), rank, row_scale.to(A.dtype))

    def expert_tensors(self, name: str) -> dict[str, torch.Tensor]:
        i = self.index(name)
        return {"A": self.A[i], "B": self.B[i]}

    def set_trainable(self, names: set[str]) -> None:
        for i, name in enumerate(self.names):
            self.A[i].requires_grad_(name in names)
            self.B[i].requires_grad_(name in names)
