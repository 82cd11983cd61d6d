"""Generation: prompts rendered as in training, batched rows of different tasks.

``generate_batch`` runs one ``model.generate`` call (KV cache on) for rows that may
each name a different task and ask for a different number of tokens: rows are
left-padded, each stops at its own limit or at end of sequence, and a callback
can receive every new token as it is decided (the server streams with it). Token
routers route each new token; task gates route each row by its task.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import StoppingCriteria, StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer

from .checkpoint import load
from .data import prompt_ids
from .model import MixtureModel
from .models import load_base
from .records import Record
from .run_config import ConfigError, RunConfig, load_run_config
from .runs import RunFolder


@dataclass
class LoadedRun:
    """A trained run ready to generate: the model (inference stage), tokenizer, config."""

    model: MixtureModel
    tokenizer: object
    run: RunConfig
    root: Path

    @property
    def tasks(self) -> list[str]:
        return list(self.model.mixture_config.tasks)

    @property
    def needs_task(self) -> bool:
        """Task-gated methods cannot answer without a task; token routers route alone."""
        return self.model.method.task_gated

    @property
    def context_length(self) -> int:
        """Positions the base model takes (the run's train.max_length when its config is
        silent)."""
        config = getattr(self.model.base_model, "config", None)
        for name in ("max_position_embeddings", "n_positions"):
            if isinstance(value := getattr(config, name, None), int) and value > 0:
                return value
        return self.run.train.max_length

    @property
    def model_names(self) -> list[str]:
        """What a request may name: each task, and for token routers the run itself
        (routing over every expert)."""
        return self.tasks if self.needs_task else [*self.tasks, self.root.name]


def load_run(run_dir: str | Path, overrides=()) -> LoadedRun:
    """Load the base model a run names and the run's final adapter onto it.

    Raises:
        ConfigError: ``run_dir`` is not a trained run.
    """
    folder = RunFolder(run_dir)
    if not (folder.root / "manifest.json").is_file() or not folder.config_path.is_file():
        raise ConfigError(f"{run_dir} is not a trained modulora run (no manifest.json/config.yaml)")
    run = load_run_config(folder.config_path, list(overrides))
    base, tokenizer = load_base(run.model)
    model = load(base, folder.root)
    model.eval()
    return LoadedRun(model, tokenizer, run, folder.root)


def chat_prompt_ids(
    tokenizer, messages: list[dict], system: str | None = None, task: str | None = None
) -> list[int]:
    """Token ids of a conversation up to the assistant's answer, exactly as training renders
    it (the tokenizer's chat template, or modulora's plain template without one).

    ``messages`` are ``{"role", "content"}`` dicts ending with a user turn; ``system``
    is the run's ``data.system_prompt`` (used when the messages have no system turn).
    """
    if not messages or messages[-1].get("role") == "assistant":
        raise ValueError("messages must be non-empty and end with a user (not assistant) turn")
    turns = tuple({"role": str(m["role"]), "content": str(m["content"])} for m in messages) + (
        {"role": "assistant", "content": ""},
    )
    return prompt_ids(Record(task, "messages", messages=turns, system=system), tokenizer)


@dataclass(frozen=True)
class Sampling:
    """Decoding settings shared by the rows of one batch (greedy when temperature is 0)."""

    temperature: float = 0.0
    top_p: float = 1.0

    def kwargs(self) -> dict:
        if self.temperature <= 0:
            return {"do_sample": False}
        return {"do_sample": True, "temperature": self.temperature, "top_p": self.top_p}


class _RowStreamer(BaseStreamer):
    """Collects each row's new tokens, and hands each to ``on_token(row, token_id)`` as it is
    decided, until the row ends (its limit, or an end token, which is not kept)."""

    def __init__(self, on_token: Callable[[int, int], bool | None], limits, eos: set[int]) -> None:
        self.on_token, self.limits, self.eos = on_token, limits, eos
        self.tokens: list[list[int]] = [[] for _ in limits]
        self.count = [0] * len(limits)
        self.done = [False] * len(limits)
        self.ended = [False] * len(limits)  # rows the caller ended early
        self.prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:  # generate() first puts the prompt
            self.prompt_seen = True
            return
        for row, tok in enumerate(value.reshape(-1).tolist()):
            if self.done[row]:
                continue
            self.count[row] += 1
            if tok in self.eos:
                self.done[row] = True
                continue
            self.tokens[row].append(tok)
            if self.on_token(row, tok):  # the caller needs no more of this row
                self.ended[row] = True
            self.done[row] = self.ended[row] or self.count[row] >= self.limits[row]

    def end(self) -> None:
        pass


class _RowLimits(StoppingCriteria):
    """Each row stops after its own number of new tokens, or when its streamer says so
    (generate() hands the streamer each step's tokens before it asks this)."""

    def __init__(self, prompt_len: int, limits: list[int], streamer: _RowStreamer) -> None:
        self.prompt_len, self.limits, self.streamer = prompt_len, torch.tensor(limits), streamer

    def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.BoolTensor:
        made = input_ids.shape[1] - self.prompt_len
        ended = torch.tensor(self.streamer.ended, device=input_ids.device)
        return (made >= self.limits.to(input_ids.device)) | ended


def _eos_ids(model, tokenizer) -> set[int]:
    ids = set()
    for source in (getattr(model, "generation_config", None), tokenizer):
        eos = getattr(source, "eos_token_id", None)
        ids |= set(eos if isinstance(eos, list) else [] if eos is None else [eos])
    return ids


def left_pad(rows: list[list[int]], pad_id: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, attention mask), both (B, T): rows right-aligned so every prompt ends last."""
    width = max(len(r) for r in rows)
    ids = torch.tensor([[pad_id] * (width - len(r)) + r for r in rows], device=device)
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], device=device)
    return ids, mask


def position_ids(mask: torch.Tensor) -> torch.Tensor:
    """Positions that follow the attention mask (B, T): each row's first real token is 0.

    Left-padded rows need them: a model that numbers positions by column would read a
    padded row as starting later, so its answer would depend on its batch.
    """
    return (mask.long().cumsum(-1) - 1).clamp_min(0)


@torch.no_grad()
def generate_batch(
    model: torch.nn.Module,
    tokenizer,
    prompts: list[list[int]],
    tasks: list[str | None] | None = None,
    max_new_tokens: int | list[int] = 64,
    sampling: Sampling = Sampling(),
    on_token: Callable[[int, int], bool | None] | None = None,
    cache=None,
) -> list[list[int]]:
    """Generate for every prompt in one batched call; rows may have different tasks.

    Args:
        model: a ``MixtureModel`` or a plain Hugging Face causal LM.
        tokenizer: its tokenizer (pad and eos tokens).
        prompts: token ids per row (no padding).
        tasks: one task per row (None entries: the model's own routing; every row
            must then be None). Ignored for plain models.
        max_new_tokens: one limit for all rows or one per row.
        sampling: greedy (default) or temperature / top-p sampling.
        on_token: called as ``on_token(row, token_id)`` for each new token of a row,
            in order, as soon as it is decided (not called for the end token); a true
            return value ends that row there (a stop string, a client gone), which
            frees its compute while the other rows go on.
        cache: a KV cache of the left-padded prompts without their last token
            (``likelihood.prefill``), so a caller that scored them already does not pay
            for the prompts twice; None computes it.

    Returns:
        Per row, the new token ids, without padding or the end token.
    """
    n = len(prompts)
    limits = [max_new_tokens] * n if isinstance(max_new_tokens, int) else list(max_new_tokens)
    if len(limits) != n or min(limits, default=1) < 1:
        raise ValueError("max_new_tokens needs one positive limit per prompt")
    pad = tokenizer.pad_token_id
    ids, mask = left_pad(prompts, pad, next(model.parameters()).device)  # (B, T)
    width = ids.shape[1]
    kw = {}
    if isinstance(model, MixtureModel):
        rows = list(tasks) if tasks is not None else [None] * n
        if any(t is None for t in rows) and any(t is not None for t in rows):
            raise ValueError("either every row names a task or none does")
        kw["task"] = None if rows[0] is None else rows
    eos = _eos_ids(model, tokenizer)
    streamer = _RowStreamer(on_token or (lambda row, tok: None), limits, eos)
    model.eval()
    model.generate(
        input_ids=ids,
        attention_mask=mask,
        max_new_tokens=max(limits),
        stopping_criteria=StoppingCriteriaList([_RowLimits(width, limits, streamer)]),
        pad_token_id=pad,
        streamer=streamer,
        **sampling.kwargs(),
        **kw,
        **({} if cache is None else {"cache": cache}),
    )
    return streamer.tokens
