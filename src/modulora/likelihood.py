"""Log-likelihoods of continuations given contexts, in batches.

One routine scores (context, continuation) token pairs for every caller: likelihood
classification in ``modulora eval``, lm-eval's loglikelihood requests and the
server's ``echo``/``logprobs``. Each distinct context runs once (left-padded, with
position ids that follow the attention mask, so a row's scores do not depend on its
batch) and keeps its KV cache; the continuations of that context then read the cache,
so scoring five labels costs one prompt pass and one short pass, not five prompt passes.
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
        kw = task_kw(model, [k[1] for k in chunk])
        if accepts_logits_to_keep(model):  # the last position only, not (B, T, V)
            kw["logits_to_keep"] = 1
        run = model(
            input_ids=ids,
            attention_mask=mask,
            position_ids=position_ids(mask),
            use_cache=True,
            **kw,
        )
        first = run.logits[:, -1].float().log_softmax(-1)  # (B, V): predicts token 0
        members = [(row, i) for row, k in enumerate(chunk) for i in groups[k]]
        rest = _continue(model, run.cache, mask, members, pairs, tasks, pad_id)
        for j, (row, i) in enumerate(members):
            cont = pairs[i][1]
            logp = first[row][None] if rest is None else torch.cat([first[row][None], rest[j]])
            scores, greedy, alts = _take(logp[: len(cont)], cont, top)
            out[i] = Scored(scores, greedy, alts)
    return out  # type: ignore[return-value]


def _continue(model, cache, mask, members, pairs, tasks, pad_id) -> torch.Tensor | None:
    """Log-probs (rows, L - 1, V) predicting continuation tokens 1.. from the cache."""
    width = max(len(pairs[i][1]) for _, i in members) - 1
    if width == 0:
        return None
    rows = [row for row, _ in members]
    cache.reorder_cache(torch.tensor(rows, device=mask.device))  # a cache row per continuation
    feed = [pairs[i][1][:-1] for _, i in members]  # token j predicts token j + 1
    ids = torch.tensor([f + [pad_id] * (width - len(f)) for f in feed], device=mask.device)
    new = torch.tensor([[1] * len(f) + [0] * (width - len(f)) for f in feed], device=mask.device)
    full = torch.cat([mask[rows], new], dim=1)  # (R, T + width)
    start = mask[rows].sum(1, keepdim=True)  # each row's context length
    positions = start + torch.arange(width, device=mask.device)[None]  # (R, width)
    out = model(
        input_ids=ids,
        attention_mask=full,
        position_ids=positions,
        cache=cache,
        use_cache=True,
        **task_kw(model, [tasks[i] for _, i in members]),
    )
    return out.logits.float().log_softmax(-1)
