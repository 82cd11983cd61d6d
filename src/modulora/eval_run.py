"""``modulora eval RUN_DIR``: score a run (and its base) and write ``eval/``.

For the run's final adapter and, with ``--base``, the base model alone: each
task's metric on its test split, the general-ability probe (MMLU log-likelihood
accuracy, perplexity on held-out text) and, for token routers, router health.
The forgetting matrix scores every task after every stage, rebuilding the model
after stage k from what each stage saved (``stages/<stage>/adapter``); backward
transfer is the mean change of a task's score from the stage that trained it to
the end.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from accelerate.utils import set_seed

from .checkpoint import load, load_weights, read_manifest
from .config import MixtureConfig
from .evaluate import (
    answer,
    mmlu_predictions,
    router_health,
    text_losses,
)
from .metrics import aggregate, bootstrap_ci, example_stats, task_seed
from .model import MixtureModel, attach
from .models import load_base
from .plan import source_records, stage_label
from .records import Record
from .run_config import ConfigError, EvalConfig, RunConfig, load_run_config
from .runs import RunFolder, write_json


def routes_by_token_with_mask(model) -> bool:
    """Token-routed after add-task: named old tasks skip the new experts, so scores
    with and without task names differ."""
    return (
        isinstance(model, MixtureModel)
        and not model.method.task_gated
        and bool(model.mixture_config.added_tasks)
    )


def _jsonl(path: str, limit: int) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return rows[:limit]


def probe_task(model) -> str | None:
    """The task a task-gated model answers general questions as (its first); None otherwise."""
    if isinstance(model, MixtureModel) and model.method.task_gated:
        return model.mixture_config.tasks[0]
    return None


def score_answers(
    metric: str, predictions: list[str], references: list[str], labels, task: str
) -> dict:
    """Score, 95% bootstrap interval (seeded by task) and the per-example statistics
    (which ``compare`` resamples for paired tests)."""
    return _with_interval(metric, example_stats(metric, predictions, references, labels), task)


def _with_interval(metric: str, stats: np.ndarray, seed_name: str) -> dict:
    """``{"score", "ci", "stats"}`` of per-example statistics (bootstrap seeded by name)."""
    low, high = bootstrap_ci(metric, stats, task_seed(seed_name))
    return {"score": aggregate(metric, stats), "ci": [low, high], "stats": stats.tolist()}


def score_tasks(
    model,
    tokenizer,
    run: RunConfig,
    test: dict[str, list[Record]],
    cfg: EvalConfig,
    task_free: bool = False,
    likelihood: bool = True,
) -> dict:
    """Each task's score on ``test`` with its interval, and a few samples.

    Classification tasks are also scored by likelihood (the label the model finds most
    likely after the prompt) unless ``likelihood`` is off. ``task_free`` routes every
    row by the model's own routing, naming no task (token-routed methods only).
    """
    out = {}
    for task, records in test.items():
        td = run.tasks[task]
        scored = likelihood and cfg.likelihood and td.metric == "classification"
        preds, chosen = answer(
            model, tokenizer, records, cfg.max_new_tokens, cfg.batch_size,
            td.labels if scored else None, task, task_free,
        )  # fmt: skip
        refs = [r.answer for r in records]
        out[task] = {"metric": td.metric, "n": len(records)}
        out[task] |= score_answers(td.metric, preds, refs, td.labels, task)
        if chosen is not None:
            out[task]["likelihood"] = score_answers(td.metric, chosen, refs, td.labels, task)
        out[task]["samples"] = [
            {"prompt": r.question, "prediction": p, "reference": r.answer}
            for r, p in list(zip(records, preds, strict=True))[:5]
        ]
    return out


def score_probes(model, tokenizer, cfg: EvalConfig, max_length: int) -> dict:
    task = probe_task(model)
    out = {"probe_task": task}
    if cfg.mmlu:
        questions = _jsonl(cfg.mmlu, cfg.probe_examples)
        picked = mmlu_predictions(model, tokenizer, questions, task, cfg.batch_size)
        hits = np.array([[float(p == q["answer"])] for p, q in zip(picked, questions, strict=True)])
        out |= _probe("mmlu", _with_interval("exact", hits, "mmlu"))
    if cfg.text:
        texts = [r["text"] for r in _jsonl(cfg.text, cfg.text_examples or cfg.probe_examples)]
        losses = np.array(text_losses(model, tokenizer, texts, task, max_length, cfg.batch_size))
        out |= _probe("perplexity", _with_interval("perplexity", losses, "perplexity"))
    return out


def _probe(name: str, scored: dict) -> dict:
    """A probe's keys in the results: ``name``, ``name_ci``, ``name_stats``."""
    return {name: scored["score"], f"{name}_ci": scored["ci"], f"{name}_stats": scored["stats"]}


def model_after(folder: RunFolder, keys: list[str], base, seed: int) -> MixtureModel:
    """The adapter as it was after the last stage in ``keys`` (all stages up to it, in
    order), computing as that stage did: a MoDULA domain stage runs its expert at weight 1,
    as it was trained, not through a router that was not trained yet."""
    last = folder.stage_dir(stage_label(keys[-1])) / "adapter"
    cfg = MixtureConfig.from_dict(read_manifest(last)["config"])
    set_seed(seed)  # untrained experts start as at attach time (B = 0: no-ops)
    model = attach(base, cfg)
    for key in keys:
        snap = folder.stage_dir(stage_label(key)) / "adapter"
        # routers grow with add-task: only the last stage's router fits this model
        load_weights(model, snap, partial=True, router=snap == last)
    model.set_stage(keys[-1].split("@")[0])
    model.eval()
    return model


def forgetting_matrix(folder, run, base, tokenizer, test, cfg) -> dict | None:
    """Scores of every task after every stage, and backward transfer.

    Row k is the model after stage k computing as stage k does. A stage that serves one
    task (a domain stage) scores that task only; the others are not defined there.
    Backward transfer (BWT) is the mean over tasks of (final score - the task's score
    right after the stage that trained it); below 0 means later stages lost some of it.
    """
    keys = folder.state()["stages_done"]
    if len(keys) < 2 or not all(
        (folder.stage_dir(stage_label(k)) / "adapter" / "manifest.json").is_file() for k in keys
    ):
        return None
    small = {t: r[: cfg.forgetting_examples] for t, r in test.items()}
    rows = []
    for k in range(len(keys)):
        model = model_after(folder, keys[: k + 1], base, run.train.seed)
        only = model.stage_plan(model.stage).task
        known = {
            t: r for t, r in small.items() if t in model.mixture_config.tasks and only in (None, t)
        }
        scored = score_tasks(model, tokenizer, run, known, cfg, likelihood=False)
        rows.append({t: scored[t]["score"] if t in scored else None for t in small})
        model.detach()
    trained_at = {}
    for k, key in enumerate(keys):
        name = key.split("@")[0]
        for t in small:
            learns = name in ("joint", "router") or name == f"domain:{t}"
            if t not in trained_at and learns and rows[k][t] is not None:
                trained_at[t] = k
    deltas = {t: rows[-1][t] - rows[k][t] for t, k in trained_at.items() if k < len(keys) - 1}
    bwt = sum(deltas.values()) / len(deltas) if deltas else None
    return {
        "stages": keys,
        "tasks": list(small),
        "scores": rows,
        "trained_at": {t: keys[k] for t, k in trained_at.items()},
        "change": deltas,
        "bwt": bwt,
    }


def evaluate_run(
    run_dir: str | Path,
    tasks: list[str] | None = None,
    with_base: bool = False,
    forgetting: bool | None = None,
    overrides=(),
    probes: bool = True,
    out_name: str = "eval",
) -> dict:
    """Score the run in ``run_dir``; write ``<out_name>/results.json`` and ``report.md``.

    ``probes=False`` skips the general-ability probe (task scores only).

    Raises:
        ConfigError: not a run, unknown task names.
    """
    from .report import write_report

    folder = RunFolder(run_dir)
    if not (folder.root / "manifest.json").is_file():
        raise ConfigError(f"{run_dir} is not a trained modulora run (no manifest.json)")
    run = load_run_config(folder.config_path, list(overrides))
    cfg = run.eval
    names = tasks or list(run.tasks)
    unknown = [t for t in names if t not in run.tasks]
    if unknown:
        raise ConfigError(f"unknown task(s) {unknown}; the run's tasks: {list(run.tasks)}")
    test = {t: source_records(run, t, list(run.tasks))[2][: cfg.max_examples] for t in names}
    base, tokenizer = load_base(run.model)
    results = {"run": str(folder.root), "method": run.method, "tasks": names}
    if with_base:
        results["base"] = {"tasks": score_tasks(base, tokenizer, run, test, cfg)}
        if probes:
            results["base"].update(score_probes(base, tokenizer, cfg, run.train.max_length))
    model = load(base, folder.root)
    results["model"] = {"tasks": score_tasks(model, tokenizer, run, test, cfg)}
    if routes_by_token_with_mask(model):
        # a request naming the run routes like the paper's model: no task id
        results["model"]["task_free"] = score_tasks(
            model, tokenizer, run, test, cfg, task_free=True, likelihood=False
        )
    if probes:
        results["model"].update(score_probes(model, tokenizer, cfg, run.train.max_length))
    every = [r for records in test.values() for r in records[: cfg.forgetting_examples]]
    results["routing"] = router_health(model, tokenizer, every, cfg.batch_size)
    base = model.detach()
    if cfg.forgetting if forgetting is None else forgetting:
        results["forgetting"] = forgetting_matrix(folder, run, base, tokenizer, test, cfg)
    out = folder.root / out_name
    write_json(out / "results.json", results)
    write_report(out, results)
    return results
