"""Log-likelihoods of continuations given contexts, in batches.

One routine scores (context, continuation) token pairs for every caller: likelihood
classification in ``modulora eval``, lm-eval's loglikelihood requests and the
server's ``echo``/``logprobs``. Each distinct context runs once (``prefill``: left-padded,
with position ids that follow the attention mask, so a row's scores do not depend on
its batch) and keeps its KV cache; the continuations of that context then read the
cache (``score_after``), so scoring five labels costs one prompt pass and one short
pass, not five prompt passes, and ``modulora eval`` reuses the same prefill to generate
its answers.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from .generate import left_pad, position_ids
from .model import MixtureModel


def accepts_logits_to_keep(model: nn.Module) -> bool:
    """Whether the model projects only chosen positions to logits (most HF LMs)."""
    if isinstance(model, MixtureModel):
        return model.accepts_logits_to_keep
    return "logits_to_keep" in inspect.signature(model.forward).parameters


def task_kw(model: nn.Module, tasks: list[str | None]) -> dict:
    """``task=`` for a MixtureModel (None when the rows carry no task), nothing for a base."""
    if not isinstance(model, MixtureModel):
        return {}
    return {"task": None if any(t is None for t in tasks) else list(tasks)}


@dataclass
class Scored:
    """One continuation's scores.

    Attributes:
        logprobs: log p(token | everything before it), one per continuation token.
        greedy: every continuation token is the model's most likely next token.
        top: per continuation token, the ``top`` most likely tokens and their log-probs
            (empty when not asked for).
    """

    logprobs: list[float]
    greedy: bool
    top: list[dict[int, float]]

    @property
    def total(self) -> float:
        return sum(self.logprobs)


def _take(logp: torch.Tensor, tokens: list[int], top: int) -> tuple[list[float], bool, list]:
    """Scores of ``tokens`` from their predicting positions' log-probs ``logp`` (L, V)."""
    idx = torch.tensor(tokens, device=logp.device)
    chosen = logp.gather(1, idx[:, None]).squeeze(1)  # (L,)
    greedy = bool((logp.argmax(-1) == idx).all())
    alts = []
    if top:
        values, ids = logp.topk(top, dim=-1)  # (L, top)
        alts = [
            dict(zip(i.tolist(), v.tolist(), strict=True)) for i, v in zip(ids, values, strict=True)
        ]
    return chosen.tolist(), greedy, alts


@torch.no_grad()
def prefill(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor, tasks) -> object | None:
    """The KV cache of left-padded rows ``ids`` (B, T) without their last column, or None
    when that leaves nothing. Generation (``generate_batch(cache=...)``) and scoring
    (``score_after``) both start from it: each feeds the last prompt token itself."""
    if ids.shape[1] < 2:
        return None
    kw = task_kw(model, tasks)
    if accepts_logits_to_keep(model):  # no logits are needed: project one position only
        kw["logits_to_keep"] = 1
    head, head_mask = ids[:, :-1], mask[:, :-1]
    out = model(
        input_ids=head,
        attention_mask=head_mask,
        position_ids=position_ids(head_mask),
        use_cache=True,
        **kw,
    )
    return out.cache


@torch.no_grad()
def score_after(
    model: nn.Module,
    cache,
    ids: torch.Tensor,
    mask: torch.Tensor,
    members: list[tuple[int, list[int], str | None]],
    pad_id: int,
    top: int = 0,
) -> list[Scored]:
    """Score continuations of prefilled rows: ``members`` are (row of ``ids``,
    continuation ids, task). ``cache`` (``prefill`` of ``ids``) is consumed."""
    rows = [row for row, _, _ in members]
    index = torch.tensor(rows, device=ids.device)
    # feed the context's last token and every continuation token but the last:
    # position j then predicts continuation token j
    feed = [[int(ids[row, -1])] + cont[:-1] for row, cont, _ in members]
    width = max(len(f) for f in feed)
    fed = torch.tensor([f + [pad_id] * (width - len(f)) for f in feed], device=ids.device)
    new = torch.tensor([[1] * len(f) + [0] * (width - len(f)) for f in feed], device=ids.device)
    before = mask[index, :-1]  # (R, T - 1): what the cache holds
    start = before.sum(1, keepdim=True)  # each row's context length minus one
    kw = task_kw(model, [task for _, _, task in members])
    if cache is not None:
        cache.reorder_cache(index)  # one cache row per continuation
        kw["cache"] = cache
    out = model(
        input_ids=fed,
        attention_mask=torch.cat([before, new], dim=1) if cache is not None else new,
        position_ids=start + torch.arange(width, device=ids.device)[None],  # (R, width)
        **kw,
    )
    logp = out.logits.float().log_softmax(-1)  # (R, width, V)
    return [
        Scored(*_take(logp[j, : len(cont)], cont, top)) for j, (_, cont, _) in enumerate(members)
    ]


@torch.no_grad()
def score_continuations(
    model: nn.Module,
    pad_id: int,
    pairs: list[tuple[list[int], list[int]]],
    tasks: list[str | None] | None = None,
    batch_size: int = 8,
    top: int = 0,
    desc: str = "likelihood",
) -> list[Scored]:
    """Score each continuation after its context.

    Args:
        model: a ``MixtureModel`` or a plain Hugging Face causal LM.
        pad_id: the padding token id.
        pairs: ``(context ids, continuation ids)``; both non-empty.
        tasks: one task per pair (routing of a ``MixtureModel``), or None.
        batch_size: distinct contexts per forward pass.
        top: also return the ``top`` most likely tokens at each continuation position.

    Returns:
        One ``Scored`` per pair, in order.

    Raises:
        ValueError: an empty context or continuation, or ``tasks`` of another length.
    """
    tasks = list(tasks) if tasks is not None else [None] * len(pairs)
    if len(tasks) != len(pairs):
        raise ValueError(f"{len(tasks)} tasks for {len(pairs)} pairs")
    if any(not ctx or not cont for ctx, cont in pairs):
        raise ValueError("every context and continuation needs at least one token")
    groups: dict[tuple, list[int]] = {}
    for i, ((ctx, _), task) in enumerate(zip(pairs, tasks, strict=True)):
        groups.setdefault((tuple(ctx), task), []).append(i)
    keys = sorted(groups, key=lambda k: len(k[0]))  # similar lengths together: less padding
    device = next(model.parameters()).device
    out: list[Scored | None] = [None] * len(pairs)
    model.eval()
    for start in tqdm(range(0, len(keys), batch_size), desc=desc, unit="batch", leave=False):
        chunk = keys[start : start + batch_size]
        ids, mask = left_pad([list(k[0]) for k in chunk], pad_id, device)  # (B, T)
        cache = prefill(model, ids, mask, [k[1] for k in chunk])
        members = [(row, i) for row, k in enumerate(chunk) for i in groups[k]]
        scored = score_after(
            model, cache, ids, mask, [(r, pairs[i][1], tasks[i]) for r, i in members], pad_id, top
        )
        for (_, i), result in zip(members, scored, strict=True):
            out[i] = result
    return out  # type: ignore[return-value]
