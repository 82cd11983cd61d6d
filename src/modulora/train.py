"""Run one training stage on Hugging Face accelerate: setup, loop, save.

The loss is the sum of token losses divided by the number of labelled tokens in
the whole optimizer step (all micro-batches, all processes), so one process with
batch B and N processes with B/N rows each compute the same gradient. The data
order of every epoch comes from ``(seed, stage, epoch)`` alone, which is what lets
a run resume mid-stage (skipping the steps already done) and end with the same
weights as an uninterrupted run.
"""

from __future__ import annotations

import importlib.util
import math
import os
import random
import time
from contextlib import nullcontext
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.utils import DataLoaderConfiguration, DistributedDataParallelKwargs
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import get_scheduler

from .data import IGNORE, Example, collate
from .model import MixtureModel
from .plan import Stage
from .run_config import ConfigError, TrainConfig
from .runs import Progress, RunFolder


@dataclass
class StageData:
    """What a stage reads: its training and validation examples."""

    train: list[Example]
    valid: list[Example]


def native_bf16() -> bool:
    """Whether bf16 is computed natively here (else autocast emulates it, slowly)."""
    if torch.cuda.is_available():
        return torch.cuda.is_bf16_supported()
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def resolve_precision(precision: str) -> str:
    """``auto`` -> ``bf16`` or ``fp32`` for this machine; other values unchanged."""
    if precision != "auto":
        return precision
    return "bf16" if native_bf16() else "fp32"


def make_accelerator(precision: str, tensorboard_dir: str | None = None) -> Accelerator:
    """The run's accelerator: batches split over processes, bf16 autocast if asked."""
    kwargs = {}
    if tensorboard_dir is not None:
        if not any(importlib.util.find_spec(m) for m in ("tensorboard", "tensorboardX")):
            raise ConfigError(
                "train.tensorboard needs TensorBoard: pip install 'modulora[tensorboard]'"
            )
        kwargs = {"log_with": "tensorboard", "project_dir": tensorboard_dir}
    # torchrun/`accelerate launch --multi_gpu` on a machine without CUDA: accelerate runs
    # several CPU processes (gloo) only when told cpu=True
    multi_cpu = int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available()
    # accelerate keeps one state per process; a second run in the same process (tests,
    # notebooks) may use another precision. The process group (PartialState) is kept.
    AcceleratorState._reset_state(reset_partial_state=False)
    return Accelerator(
        cpu=multi_cpu,
        mixed_precision="bf16" if resolve_precision(precision) == "bf16" else "no",
        dataloader_config=DataLoaderConfiguration(split_batches=True),
        # top-k routing leaves some experts without gradient in a step
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)],
        **kwargs,
    )


def steps_per_epoch(n_examples: int, cfg: TrainConfig) -> int:
    return n_examples // (cfg.batch_size * cfg.grad_accum)


def total_steps(n_examples: int, cfg: TrainConfig) -> int:
    return cfg.max_steps or cfg.epochs * steps_per_epoch(n_examples, cfg)


def check_stage(stage: Stage, data: StageData, num_processes: int) -> None:
    """Errors a stage would hit, raised before any stage runs."""
    cfg = stage.train
    if cfg.batch_size % num_processes:
        raise ConfigError(
            f"stage {stage.name}: batch_size {cfg.batch_size} is not divisible by "
            f"{num_processes} processes (batch_size is the global batch)"
        )
    if steps_per_epoch(len(data.train), cfg) == 0:
        need = cfg.batch_size * cfg.grad_accum
        raise ConfigError(
            f"stage {stage.name}: {len(data.train)} training examples, fewer than one optimizer "
            f"step ({need} = batch_size x grad_accum); lower batch_size or add data"
        )


def _epoch_order(n: int, seed: int, label: str, epoch: int) -> list[int]:
    return random.Random(f"{seed}:{label}:{epoch}").sample(range(n), n)


def _step_groups(stage: Stage, data: StageData, acc: Accelerator, start: int, pad_id: int):
    """Yield lists of ``grad_accum`` micro-batches, one list per optimizer step from ``start``."""
    cfg = stage.train
    per_epoch = steps_per_epoch(len(data.train), cfg)
    per_step = cfg.batch_size * cfg.grad_accum
    epoch, done = divmod(start, per_epoch)
    while True:
        order = _epoch_order(len(data.train), cfg.seed, stage.label, epoch)
        order = order[done * per_step : per_epoch * per_step]  # whole optimizer steps only
        loader = DataLoader(
            data.train,
            batch_size=cfg.batch_size,
            sampler=order,
            collate_fn=partial(collate, pad_id=pad_id),
        )
        group = []
        for batch in acc.prepare_data_loader(loader):
            group.append(batch)
            if len(group) == cfg.grad_accum:
                yield group
                group = []
        epoch, done = epoch + 1, 0


def _task_arg(tasks: list, model: MixtureModel):
    """Per-row task names, or None when the rows carry none (universal/text data)."""
    if all(t is None for t in tasks):
        return None
    if any(t is None for t in tasks):
        if model.method.task_gated:
            raise ConfigError(f"method {model.mixture_config.method} needs a task on every row")
        return None
    return list(tasks)


def _labelled_positions(labels: torch.Tensor, core: MixtureModel) -> torch.Tensor | None:
    """The positions whose next token carries a label in any row, when they are few.

    Instruction data labels only the response, often a few tokens of a long prompt;
    the output projection over a 50k+ vocabulary then dominates the step for nothing.
    Hugging Face models take ``logits_to_keep`` (positions) and project only those:
    same logits, a fraction of the work and of the (B, T, V) memory.
    """
    if not core.accepts_logits_to_keep:
        return None
    keep = (labels != IGNORE).any(0).nonzero().flatten()
    return keep if len(keep) <= 0.75 * labels.shape[1] else None


def _token_loss(model, batch: dict, core: MixtureModel, per_row: bool = False):
    """(sum of next-token losses, auxiliary loss) of one micro-batch; ``per_row``
    gives the sums per row, shape (B,)."""
    labels = batch["labels"][:, 1:]  # position p predicts token p + 1
    kw = {}
    keep = _labelled_positions(labels, core)
    if keep is not None:
        kw["logits_to_keep"] = keep
        labels = labels[:, keep]
    out = model(
        input_ids=batch["input_ids"],
        attention_mask=batch["attention_mask"],
        task=_task_arg(batch["task"], core),
        **kw,
    )
    logits = (out.logits if keep is not None else out.logits[:, :-1]).float()  # (B, P, V)
    loss = F.cross_entropy(logits.transpose(1, 2), labels, reduction="none")  # (B, T-1)
    loss = loss.sum(1) if per_row else loss.sum()
    aux = out.get("aux_loss")
    return loss, (aux if aux is not None else logits.new_zeros(()))


def _optimizer_step(model, core, group, acc, optimizer, scheduler, cfg) -> dict:
    local = sum(int((b["labels"][:, 1:] != -100).sum()) for b in group)
    counts = acc.reduce(torch.tensor([local, 0.0]), "sum")
    n_labels = max(float(counts[0]), 1.0)
    loss_sum = 0.0
    for i, batch in enumerate(group):
        last = i == len(group) - 1
        with acc.no_sync(model) if not last else nullcontext():
            tok, aux = _token_loss(model, batch, core)
            # DDP averages gradients over processes: scale so the result is the global mean
            loss = tok * acc.num_processes / n_labels + aux / len(group)
            acc.backward(loss)
        loss_sum += float(tok.detach())
    if cfg.max_grad_norm > 0:
        acc.clip_grad_norm_([p for p in core.parameters() if p.requires_grad], cfg.max_grad_norm)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    tokens = sum(int(b["attention_mask"].sum()) for b in group)
    totals = acc.reduce(torch.tensor([loss_sum, float(tokens)]), "sum")
    return {"loss": float(totals[0]) / n_labels, "tokens": int(totals[1]), "labels": int(n_labels)}


@torch.no_grad()
def validation_loss(model, core: MixtureModel, examples: list[Example], acc, cfg, pad_id):
    """Mean next-token loss over ``examples`` (every process's share, gathered)."""
    if not examples:
        return None
    was_training = core.training
    core.eval()
    loader = DataLoader(
        examples, batch_size=cfg.batch_size, collate_fn=partial(collate, pad_id=pad_id)
    )
    total, count = 0.0, 0.0
    for batch in acc.prepare_data_loader(loader):
        rows, _ = _token_loss(model, batch, core, per_row=True)
        counts = (batch["labels"][:, 1:] != -100).sum(1).float()
        # gather_for_metrics drops the rows accelerate repeats to even out the last batch
        rows, counts = acc.gather_for_metrics((rows.float(), counts))
        total, count = total + float(rows.sum()), count + float(counts.sum())
    core.train(was_training)
    return total / max(count, 1.0)


def flops_estimate(total: int, tokens: int, trainable: int, checkpointing: bool) -> float:
    """2 FLOPs per parameter per token for each matmul pass: forward, backward through
    activations, weight gradients of trainable parameters (+ a forward when recomputing).
    ``total``: every parameter of the model, base and adapter."""
    passes = 3 if checkpointing else 2
    return float(tokens) * (2 * total * passes + 2 * trainable)


def run_stage(
    core: MixtureModel,
    stage: Stage,
    data: StageData,
    acc: Accelerator,
    folder: RunFolder,
    pad_id: int,
    resume: bool = False,
) -> dict:
    """Train ``stage``; returns its cost. Checkpoints go to ``folder`` (main process)."""
    cfg = stage.train
    core.set_stage(stage.name)
    core.train()
    if cfg.compile:  # each layer's call, hooks included, compiled in place for this stage
        # every layer shares Module._call_impl's code object, whose compiled versions are
        # capped (recompile_limit): start each stage from a clean cache, not the last one's
        torch._dynamo.reset()
        for layer in core.layers.values():
            layer.compile(backend=cfg.compile_backend)
    trainable = [p for p in core.parameters() if p.requires_grad]
    n_trainable = sum(p.numel() for p in trainable)
    steps = total_steps(len(data.train), cfg)
    optimizer = torch.optim.AdamW(trainable, lr=cfg.lr, weight_decay=cfg.weight_decay)
    warmup = math.floor(cfg.warmup_ratio * steps)
    name = {"constant": "constant_with_warmup"}.get(cfg.schedule, cfg.schedule)
    scheduler = get_scheduler(name, optimizer, num_warmup_steps=warmup, num_training_steps=steps)
    model, optimizer, scheduler = acc.prepare(core, optimizer, scheduler)
    progress = Progress()
    if resume:
        progress = folder.load_checkpoint(core, optimizer, scheduler)
        if acc.is_main_process:
            folder.truncate_metrics(stage.label, progress.step)
    log = _Logger(acc, folder, stage, steps, progress.step)
    if resume:
        log.first_valid = next(
            (r["valid_loss"] for r in folder.read_metrics(stage.label) if "valid_loss" in r), None
        )
    if progress.step == 0:
        log.eval(0, validation_loss(model, core, data.valid, acc, cfg, pad_id))
        log.restart_clock()  # tokens/s counts training only
    started = time.perf_counter() - progress.wall_time
    groups = _step_groups(stage, data, acc, progress.step, pad_id)
    while progress.step < steps:
        group = next(groups)
        stats = _optimizer_step(model, core, group, acc, optimizer, scheduler, cfg)
        progress.step += 1
        progress.examples += cfg.batch_size * cfg.grad_accum
        progress.tokens += stats["tokens"]
        progress.label_tokens += stats["labels"]
        progress.wall_time = time.perf_counter() - started
        log.step(progress, stats, scheduler.get_last_lr()[0])
        last = progress.step == steps
        if cfg.eval_every and progress.step % cfg.eval_every == 0 and not last:
            log.eval(progress.step, validation_loss(model, core, data.valid, acc, cfg, pad_id))
        if cfg.save_every and progress.step % cfg.save_every == 0 and not last:
            if acc.is_main_process:
                folder.save_checkpoint(core, stage.label, progress, optimizer, scheduler)
            acc.wait_for_everyone()
    final = validation_loss(model, core, data.valid, acc, cfg, pad_id)
    log.eval(progress.step, final)
    log.close()
    acc.unwrap_model(model, keep_fp32_wrapper=False)  # drops accelerate's autocast wrapper
    for layer in core.layers.values():
        layer._compiled_call_impl = None  # the next stage gates differently: compile anew
    acc.free_memory()
    return {
        "stage": stage.name,
        "trainable_parameters": n_trainable,
        "steps": progress.step,
        "examples": progress.examples,
        "unique_examples": len(data.train),
        "tokens": progress.tokens,
        "label_tokens": progress.label_tokens,
        "wall_time_s": round(progress.wall_time, 3),
        "flops_estimate": flops_estimate(
            sum(p.numel() for p in core.parameters()),
            progress.tokens,
            n_trainable,
            cfg.gradient_checkpointing,
        ),
        "valid_loss_start": log.first_valid,
        "valid_loss_end": final,
        "processes": acc.num_processes,
    }


class _Logger:
    """Progress bar, ``metrics.jsonl`` and TensorBoard, on the main process only."""

    def __init__(self, acc: Accelerator, folder: RunFolder, stage: Stage, steps: int, start: int):
        self.acc, self.folder, self.stage = acc, folder, stage
        self.main = acc.is_main_process
        self.first_valid = None
        self.bar = tqdm(
            total=steps, initial=start, desc=stage.name, unit="step", disable=not self.main
        )
        self.restart_clock()

    def restart_clock(self) -> None:
        self.t0, self.tokens0 = time.perf_counter(), 0

    def step(self, progress: Progress, stats: dict, lr: float) -> None:
        if not self.main:
            return
        self.tokens0 += stats["tokens"]
        rate = self.tokens0 / max(time.perf_counter() - self.t0, 1e-9)
        self.bar.update(1)
        self.bar.set_postfix(loss=f"{stats['loss']:.4f}", tok_s=f"{rate:.0f}")
        if progress.step % self.stage.train.log_every == 0:
            record = {
                "step": progress.step,
                "loss": stats["loss"],
                "lr": lr,
                "tokens": progress.tokens,
                "tokens_per_s": rate,
                "elapsed_s": progress.wall_time,
            }
            self.folder.append_metrics(self.stage.label, record)
            self.acc.log({f"{self.stage.label}/loss": stats["loss"]}, step=progress.step)

    def eval(self, step: int, loss: float | None) -> None:
        if loss is None:
            return
        if self.first_valid is None:
            self.first_valid = loss
        if self.main:
            self.folder.append_metrics(self.stage.label, {"step": step, "valid_loss": loss})
            self.acc.log({f"{self.stage.label}/valid_loss": loss}, step=step)
            self.bar.write(f"{self.stage.name} step {step}: valid loss {loss:.4f}")

    def close(self) -> None:
        self.bar.close()
