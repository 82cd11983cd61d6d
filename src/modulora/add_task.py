"""Adding task N+1 to a trained run without retraining tasks 1..N (MoDULA's pluggability).

The run's adapter is loaded onto its base model (fingerprint checked), grown by one
task (``MixtureModel.add_task``), and only the method's add-task stages train:
MoDULA and token-routed mixtures train the new expert alone and then only the
router; task-gated methods train the new expert and the new task's gate row.
Every old expert is compared bit for bit before anything is written, and the
cost of the addition is reported next to three retrains of every task it replaces
(``ledger.py``). For token routers, ``router="all"`` (the default, MoDULA's recipe)
retrains every routing row on old and new data with no task ids, as the paper does;
``"new"`` trains only the new expert's rows and keeps old tasks, when named, exact.
"""

from __future__ import annotations

import copy
from contextlib import contextmanager, nullcontext
from dataclasses import replace
from pathlib import Path

import torch
from accelerate.utils import set_seed

from .checkpoint import load, save
from .gates import TokenRouter
from .ledger import comparators, shares
from .methods import get_method
from .model import MixtureModel
from .models import load_base
from .plan import Stage, build_stages, load_data
from .recipe import enable_checkpointing, run_summary, stage_datasets
from .run_config import METRICS, ConfigError, RunConfig, TaskData, dump, load_run_config
from .runs import RunFolder, write_json
from .train import StageData, make_accelerator, run_stage

GROWN_KEYS_SKIPPED = ("method", "tasks", "task_ranks")


def grown_run(
    run: RunConfig, task: str, data: str, rank: int | None, files: dict | None = None
) -> RunConfig:
    """The run config with ``task`` added; adapter keys the growth changed are recorded.

    ``files`` may give the task's ``valid``/``test`` files, ``metric`` and ``labels``.
    """
    if task in run.tasks:
        raise ConfigError(f"task {task!r} is already in the run; its tasks: {list(run.tasks)}")
    path = Path(data)
    if not path.is_file():
        raise ConfigError(f"--data {data}: file not found")
    method = get_method(run.method)
    try:
        grown = method.add_task(run.mixture_config(), task, rank)
    except ValueError as e:
        raise ConfigError(str(e)) from e
    new = copy.deepcopy(run)
    extra = {k: v for k, v in (files or {}).items() if v is not None}
    for key in ("valid", "test"):
        if key in extra:
            if not Path(extra[key]).is_file():
                raise ConfigError(f"--{key} {extra[key]}: file not found")
            extra[key] = str(Path(extra[key]).resolve())
    new.tasks[task] = TaskData(train=str(path.resolve()), rank=grown.task_ranks.get(task), **extra)
    td = new.tasks[task]
    if td.metric not in METRICS or (td.metric == "classification" and not td.labels):
        raise ConfigError(f"--metric must be one of {METRICS} (classification needs --labels)")
    plain = new.mixture_config().to_dict()
    for key, value in grown.to_dict().items():
        if key not in GROWN_KEYS_SKIPPED and plain[key] != value:
            new.adapter[key] = value
    if new.mixture_config() != grown:  # the YAML must rebuild exactly the grown adapter
        raise RuntimeError(f"cannot express the grown adapter in the run config: {grown}")
    return new


def _snapshot(model: MixtureModel, names: list[str]) -> dict[str, dict[str, torch.Tensor]]:
    return {n: {k: v.detach().clone() for k, v in model.expert_state(n).items()} for n in names}


def _identical(model: MixtureModel, before: dict[str, dict[str, torch.Tensor]]) -> dict[str, bool]:
    out = {}
    for name, tensors in before.items():
        now = model.expert_state(name)
        out[name] = all(torch.equal(now[k], v) for k, v in tensors.items())
    return out


def _token_routers(model: MixtureModel) -> dict[str, TokenRouter]:
    return {n: m for n, m in model.named_modules() if isinstance(m, TokenRouter)}


@contextmanager
def _old_rows_frozen(model: MixtureModel, before: dict[str, torch.Tensor], stage: str):
    """Routers learn only their new rows: old rows get no gradient (so AdamW, with no
    weight decay, leaves them exactly as they were) and are put back at the end."""
    model.set_stage(stage)  # routers trainable, so their gradients can be hooked
    routers = _token_routers(model)
    hooks = []
    for name, old in before.items():
        n = old.shape[0]
        hooks.append(
            routers[name].weight.register_hook(lambda g, n=n: torch.cat([g[:n] * 0, g[n:]]))
        )
    try:
        yield
    finally:
        for h in hooks:
            h.remove()
        with torch.no_grad():
            for name, old in before.items():
                routers[name].weight[: old.shape[0]] = old  # a no-op unless weight decay moved them


@torch.no_grad()
def _old_task_logits(model: MixtureModel, tasks: list[str]) -> torch.Tensor:
    """Logits of one fixed random sequence per old task (task-gated methods keep them)."""
    vocab = model.base_model.get_input_embeddings().num_embeddings
    ids = torch.randint(0, vocab, (len(tasks), 16), generator=torch.Generator().manual_seed(0))
    model.eval()
    out = model(input_ids=ids.to(model._device()), task=tasks).logits
    model.train()
    return out


def add_task(
    run_dir: str | Path,
    task: str,
    data: str,
    rank: int | None = None,
    overrides=(),
    files: dict | None = None,
    router: str = "all",
) -> dict:
    """Train ``task`` into the run in ``run_dir``; returns (and writes) the cost report.

    ``router="all"`` retrains every routing row in the router stage (MoDULA's recipe);
    ``"new"`` trains only the rows of the new expert and keeps the old rows exactly,
    so old tasks' routing changes only through the new expert's share.

    Raises:
        ConfigError / DataError: unknown run, existing task, bad data, a method that
            cannot add tasks; raised before the run folder changes.
    """
    folder = RunFolder(run_dir)
    if not folder.config_path.is_file() or not folder.state()["stages_done"]:
        raise ConfigError(f"{run_dir} is not a trained modulora run (no config.yaml/state.json)")
    if router not in ("all", "new"):
        raise ConfigError(f"router must be 'all' or 'new', got {router!r}")
    run = load_run_config(folder.config_path, list(overrides))
    new = grown_run(run, task, data, rank, files)
    try:
        names = get_method(run.method).add_plan(new.mixture_config(), task)
    except ValueError as e:
        raise ConfigError(str(e)) from e
    stages = build_stages(new, names, suffix=task)
    acc = make_accelerator(run.train.precision)
    base, tokenizer = load_base(run.model)
    splits = load_data(new, stages, tokenizer)
    stage_data = stage_datasets(new, stages, splits, acc.num_processes)
    if router == "all":
        _route_router_stage_by_token(stages, stage_data)
    retrains = comparators(new, base, tokenizer)

    model = load(base, folder.root)
    enable_checkpointing(base, run)
    old_experts = model.expert_names()
    before = _snapshot(model, old_experts)
    # task-gated methods, and token routers whose old rows stay, keep old tasks' outputs
    kept = model.method.task_gated or router == "new"
    logits_before = _old_task_logits(model, list(run.tasks)) if kept else None
    rows = {n: r.weight.detach().clone() for n, r in _token_routers(model).items()}
    set_seed(run.train.seed + len(run.tasks))  # the new expert's initial weights
    model.add_task(task, rank)

    costs = []
    for stage in stages:
        frozen = router == "new" and stage.name == "router"
        with _old_rows_frozen(model, rows, stage.name) if frozen else nullcontext():
            cost = run_stage(
                model, stage, stage_data[stage.label], acc, folder, tokenizer.pad_token_id
            )
        costs.append(cost)
        if acc.is_main_process:  # what this stage trained, for the forgetting matrix
            trained = sorted(model.stage_plan(stage.name).train)
            save(model, folder.stage_dir(stage.label) / "adapter", only=trained)
    identical = _identical(model, before)
    if not all(identical.values()):
        changed = [n for n, same in identical.items() if not same]
        raise RuntimeError(f"old experts changed during add-task: {changed}; nothing was saved")
    routers = _token_routers(model)
    rows_same = all(torch.equal(routers[n].weight[: w.shape[0]], w) for n, w in rows.items())
    model.set_stage("inference")
    outputs_same = None
    if kept:
        outputs_same = torch.equal(logits_before, _old_task_logits(model, list(run.tasks)))

    report = _report(new, task, costs, identical, outputs_same, retrains)
    report["router"] = router
    report["old_router_rows_identical"] = rows_same if rows else None
    if acc.is_main_process:
        state = folder.state()
        state["stages_done"] += [s.key for s in stages]
        state["tasks_added"] = [*state.get("tasks_added", []), task]
        for stage, cost in zip(stages, costs, strict=True):
            write_json(folder.stage_dir(stage.label) / "cost.json", cost)
        folder.save_adapter(model, state)
        folder.clear_checkpoints()
        write_json(folder.root / f"add-task-{task}.json", report)
        write_json(folder.root / "cost.json", run_summary(folder, model))
        folder.config_path.write_text(dump(new), encoding="utf-8")
    acc.end_training()
    return report


def _route_router_stage_by_token(stages: list[Stage], stage_data: dict[str, StageData]) -> None:
    """The paper's router stage: rows name no task, so no task mask applies, and old tasks'
    tokens teach every routing row, the new expert's included, where they belong."""
    for stage in stages:
        if stage.name == "router":
            data = stage_data[stage.label]
            stage_data[stage.label] = StageData(
                [replace(e, task=None) for e in data.train],
                [replace(e, task=None) for e in data.valid],
            )


def _report(run, task, costs, identical, outputs_same, retrains) -> dict:
    """This addition's cost next to the retrains of every task it replaces."""
    addition = {k: sum(c[k] for c in costs) for k in ("examples", "tokens", "flops_estimate")}
    addition["parameters_trained"] = sum(c["trainable_parameters"] for c in costs)
    addition["wall_time_s"] = round(sum(c["wall_time_s"] for c in costs), 3)
    return {
        "task": task,
        "method": run.method,
        "stages": [c["stage"] for c in costs],
        "old_experts_bit_identical": all(identical.values()),
        "old_experts_checked": sorted(identical),
        "old_task_outputs_identical": outputs_same,
        "new_task_valid_loss": {
            "start": costs[0]["valid_loss_start"],
            "end": costs[0]["valid_loss_end"],
        },
        "addition": addition,
        "comparators": retrains,
        "addition_share": shares(addition, retrains),
    }
