"""Scoring a model: task answers, the general-ability probe, router health.

Works on a ``MixtureModel`` (routed by task, or by token) and on a plain Hugging
Face model (the base), with the same prompts the trainer used (``data.py``):
answers are generated greedily in left-padded batches and compared with the
reference by the task's metric (``metrics.py``); classification labels and MMLU
letters are also chosen by log-likelihood (``likelihood.py``); perplexity is
measured on held-out text. Every padded batch passes position ids that follow the
attention mask, so no answer depends on the batch it ran in.
"""

from __future__ import annotations

import copy
import math
from collections import defaultdict
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .data import IGNORE, Record, format_record, prompt_ids
from .gates import TokenRouter
from .generate import generate_batch, left_pad, position_ids
from .likelihood import prefill, score_after, score_continuations, task_kw
from .metrics import score
from .model import MixtureModel

__all__ = [
    "answer",
    "mmlu_accuracy",
    "perplexity",
    "prompt_ids",
    "router_health",
    "score",
]


def _batches(n: int, size: int, desc: str):
    return tqdm(range(0, n, size), desc=desc, unit="batch", leave=False)


def _route(records: list[Record], task_free: bool) -> list[str | None] | None:
    """Each row's task, or None: the model's own routing (task-free, or rows without one)."""
    tasks = [r.task for r in records]
    return None if task_free or any(t is None for t in tasks) else tasks


@torch.no_grad()
def answer(
    model: nn.Module,
    tokenizer,
    records: list[Record],
    max_new_tokens: int = 16,
    batch_size: int = 8,
    labels: list[str] | None = None,
    desc: str = "answers",
    task_free: bool = False,
) -> tuple[list[str], list[str] | None]:
    """Greedy answers to ``records`` (first line) and, given ``labels``, the label each
    prompt makes most likely.

    Each row is routed by its own task unless ``task_free``. A label is scored as
    training writes an answer: its tokens (tokenized alone) right after the prompt,
    their log-probabilities summed (lm-eval's ``acc``). Both read one prompt pass
    (``likelihood.prefill``): the labels from a copy of its cache, generation from it.
    """
    label_ids = [tokenizer(lab, add_special_tokens=False)["input_ids"] for lab in labels or []]
    pad, device = tokenizer.pad_token_id, next(model.parameters()).device
    answers, chosen = [], []
    for start in _batches(len(records), batch_size, desc):
        chunk = records[start : start + batch_size]
        prompts = [prompt_ids(r, tokenizer) for r in chunk]
        routes = _route(chunk, task_free)
        tasks = routes or [None] * len(chunk)
        ids, mask = left_pad(prompts, pad, device)  # (B, T)
        cache = prefill(model, ids, mask, tasks)
        if label_ids:  # scoring reorders the cache it reads: give it a copy
            members = [(row, lab, tasks[row]) for row in range(len(chunk)) for lab in label_ids]
            scored = score_after(model, copy.deepcopy(cache), ids, mask, members, pad)
            chosen += [labels[k] for k in _best(scored, len(label_ids))]
        new = generate_batch(model, tokenizer, prompts, routes, max_new_tokens, cache=cache)
        texts = tokenizer.batch_decode(new, skip_special_tokens=True)
        answers += [t.strip().split("\n")[0].strip() for t in texts]
    return answers, (chosen if labels else None)


def choose(
    model: nn.Module,
    pad_id: int,
    prompts: list[list[int]],
    choices: list[list[int]],
    tasks: list[str | None] | None,
    batch_size: int,
    desc: str,
) -> list[int]:
    """Per prompt, the index of the choice (token ids) with the highest total log-prob."""
    pairs = [(p, c) for p in prompts for c in choices]
    per_pair = None if tasks is None else [t for t in tasks for _ in choices]
    scored = score_continuations(model, pad_id, pairs, per_pair, batch_size, desc=desc)
    return _best(scored, len(choices))


def _best(scored: list, choices: int) -> list[int]:
    """Scores laid out prompt by prompt, ``choices`` each -> each prompt's best choice."""
    totals = torch.tensor([s.total for s in scored]).reshape(-1, choices)  # (prompts, choices)
    return totals.argmax(-1).tolist()


def mmlu_prompt(q: dict) -> str:
    letters = "ABCD"
    options = "\n".join(f"{letters[i]}. {c}" for i, c in enumerate(q["choices"]))
    return f"Question: {q['question']}\n{options}\nAnswer:"


@torch.no_grad()
def mmlu_predictions(
    model: nn.Module, tokenizer, questions: list[dict], task=None, batch_size: int = 8
) -> list[int]:
    """Per question, the index of the answer letter with the highest next-token log-prob."""
    letters = [[tokenizer(f" {c}", add_special_tokens=False)["input_ids"][-1]] for c in "ABCD"]
    prompts = [tokenizer(mmlu_prompt(q), add_special_tokens=False)["input_ids"] for q in questions]
    tasks = None if task is None else [task] * len(prompts)
    return choose(model, tokenizer.pad_token_id, prompts, letters, tasks, batch_size, "mmlu")


def mmlu_accuracy(
    model: nn.Module, tokenizer, questions: list[dict], task=None, batch_size: int = 8
) -> float:
    """Accuracy (%) of the answer letter with the highest next-token log-likelihood."""
    predicted = mmlu_predictions(model, tokenizer, questions, task, batch_size)
    right = sum(p == q["answer"] for p, q in zip(predicted, questions, strict=True))
    return 100.0 * right / max(len(questions), 1)


@torch.no_grad()
def text_losses(
    model: nn.Module, tokenizer, texts: list[str], task=None, max_length: int = 256, batch_size=8
) -> list[tuple[float, int]]:
    """Per text, (sum of next-token losses, tokens predicted), each truncated to
    ``max_length`` tokens (right-padded batches: positions start at 0 in every row)."""
    model.eval()
    out = []
    for start in _batches(len(texts), batch_size, "perplexity"):
        chunk = texts[start : start + batch_size]
        rows = [tokenizer(t, add_special_tokens=False)["input_ids"][:max_length] for t in chunk]
        width = max(len(r) for r in rows)
        ids = torch.tensor([r + [tokenizer.pad_token_id] * (width - len(r)) for r in rows])
        mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
        logits = model(input_ids=ids, attention_mask=mask, **task_kw(model, [task] * len(chunk)))
        labels = ids.masked_fill(mask == 0, IGNORE)[:, 1:]
        loss = F.cross_entropy(
            logits.logits[:, :-1].float().transpose(1, 2), labels, reduction="none"
        )  # (B, T - 1), 0 where ignored
        counts = (labels != IGNORE).sum(1)
        out += list(zip(loss.sum(1).tolist(), counts.tolist(), strict=True))
    return out


@torch.no_grad()
def perplexity(
    model: nn.Module, tokenizer, texts: list[str], task=None, max_length: int = 256, batch_size=8
) -> float:
    """exp(mean next-token loss) over ``texts`` (each truncated to ``max_length`` tokens)."""
    losses = text_losses(model, tokenizer, texts, task, max_length, batch_size)
    return math.exp(sum(n for n, _ in losses) / max(sum(c for _, c in losses), 1))


@contextmanager
def routing_recorder(model: MixtureModel):
    """Record token-router weights: per layer, summed per task, over real tokens.

    Yields a dict filled during the ``with`` block: ``{"sums": {(layer, task): (E,)},
    "entropy": {layer: float sum}, "tokens": {(layer, task): int}}``.
    """
    stats = {"sums": defaultdict(float), "entropy": defaultdict(float), "tokens": defaultdict(int)}
    tasks = model.mixture_config.tasks
    handles = []

    def hook(name):
        def record(module, args, out):
            x, route = args
            w = out.weights.detach().float()  # (B, T, E_sel)
            if out.select is not None:  # experts masked for every row: weight 0
                full = w.new_zeros(*w.shape[:-1], module.num_experts)  # (B, T, E)
                full[..., list(out.select)] = w
                w = full
            mask = torch.ones(w.shape[:-1], dtype=torch.bool)
            if (
                route is not None
                and route.token_mask is not None
                and route.token_mask.shape == mask.shape
            ):
                mask = route.token_mask.bool()
            ids = route.task_ids if route is not None and route.task_ids is not None else None
            ent = -(w.clamp_min(1e-12).log() * w).sum(-1)  # (B, T)
            stats["entropy"][name] += float(ent[mask].sum())
            for row in range(w.shape[0]):
                task = tasks[int(ids[row])] if ids is not None else None
                sel = w[row][mask[row]]
                stats["sums"][(name, task)] = stats["sums"][(name, task)] + sel.sum(0)
                stats["tokens"][(name, task)] += int(sel.shape[0])

        return record

    for name, layer in model.layers.items():
        router = getattr(layer, "modulora_router", None)
        if isinstance(router, TokenRouter):
            handles.append(router.register_forward_hook(hook(name)))
    try:
        yield stats
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def router_health(model: MixtureModel, tokenizer, records: list[Record], batch_size: int = 8):
    """Per-layer expert load share and routing entropy, and task -> expert shares.

    Runs the answers' prompts and references (teacher forced) through the model.
    Returns None for methods without token routers.
    """
    if not any(
        isinstance(getattr(m, "modulora_router", None), TokenRouter) for m in model.layers.values()
    ):
        return None
    model.eval()
    with routing_recorder(model) as stats:
        for start in _batches(len(records), batch_size, "routing"):
            chunk = records[start : start + batch_size]
            rows = [format_record(r, tokenizer)[0] for r in chunk]
            ids, mask = left_pad(rows, tokenizer.pad_token_id)
            kw = task_kw(model, [r.task for r in chunk])
            model(input_ids=ids, attention_mask=mask, position_ids=position_ids(mask), **kw)
    return summarize_routing(stats, model.method.layout(model.mixture_config).experts)


def summarize_routing(stats: dict, experts) -> dict:
    names = [e.name for e in experts]
    layers = sorted({layer for layer, _ in stats["sums"]})
    per_layer, per_task, counts = {}, defaultdict(lambda: 0.0), defaultdict(int)
    for layer in layers:
        keys = [k for k in stats["sums"] if k[0] == layer]
        total = sum(stats["sums"][k] for k in keys)
        tokens = sum(stats["tokens"][k] for k in keys)
        share = (total / max(tokens, 1)).tolist()
        per_layer[layer] = {"load": share, "entropy": stats["entropy"][layer] / max(tokens, 1)}
        for _, task in keys:
            per_task[task] = per_task[task] + stats["sums"][(layer, task)]
            counts[task] += stats["tokens"][(layer, task)]
    task_share = {str(t): (per_task[t] / max(counts[t], 1)).tolist() for t in per_task}
    return {
        "experts": names,
        "layers": per_layer,
        "tasks": task_share,
        "max_entropy": math.log(len(names)),
    }
