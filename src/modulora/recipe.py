"""The training recipe: config -> model + data -> stages -> run folder.

Reads top to bottom: load and check everything (model, every data file, every
stage's settings) before the run folder is touched, then run the stages in order,
saving the adapter, ``state.json`` and ``cost.json`` after each.
"""

from __future__ import annotations

import sys
import warnings
from dataclasses import asdict, dataclass

from accelerate.utils import set_seed

from .methods import get_method
from .model import MixtureModel, attach
from .models import load_base
from .plan import (
    Split,
    Stage,
    build_stages,
    check_stage_overrides,
    load_data,
    stage_examples,
    stage_label,
)
from .run_config import ConfigError, RunConfig, dump
from .runs import RunFolder, read_json, write_json
from .train import StageData, check_stage, make_accelerator, run_stage, total_steps


@dataclass
class Prepared:
    """Everything a run needs, loaded and checked."""

    run: RunConfig
    model: MixtureModel
    tokenizer: object
    stages: list[Stage]
    data: dict[str | None, Split]
    stage_data: dict[str, StageData]


def stage_names(run: RunConfig, only: str | None = None) -> list[str]:
    """The method's default plan, or just ``only`` (checked against the method)."""
    method = get_method(run.method)
    names = method.plan(run.mixture_config())
    check_stage_overrides(run, names)
    if only is None:
        return names
    try:
        method.stage(run.mixture_config(), only)
    except ValueError as e:
        raise ConfigError(str(e)) from e
    return [only]


def prepare(run: RunConfig, only: str | None = None, num_processes: int = 1) -> Prepared:
    """Load the base model, attach the adapter, read every data file the stages need.

    Raises:
        ConfigError / DataError: anything wrong in the config or data, before any training.
    """
    names = stage_names(run, only)
    stages = build_stages(run, names)
    if any(s.train.precision != run.train.precision for s in stages):
        raise ConfigError("precision is set once per run (train.precision), not per stage")
    base, tokenizer = load_base(run.model)
    data = load_data(run, stages, tokenizer)
    stage_data = stage_datasets(run, stages, data, num_processes)
    set_seed(run.train.seed)  # the adapter's initial weights
    model = attach(base, run.mixture_config())
    enable_checkpointing(base, run)
    return Prepared(run, model, tokenizer, stages, data, stage_data)


def stage_datasets(
    run: RunConfig, stages: list[Stage], data: dict[str | None, Split], num_processes: int
) -> dict[str, StageData]:
    """Each stage's training and validation examples, checked to make whole steps."""
    out = {}
    for s in stages:
        out[s.label] = StageData(
            stage_examples(run, s, data), stage_examples(run, s, data, "valid")
        )
        check_stage(s, out[s.label], num_processes)
    return out


def universal_note(run: RunConfig, names: list[str]) -> str | None:
    """A warning when a universal stage has no ``universal:`` data of its own."""
    if "universal" not in names or run.universal is not None:
        return None
    return (
        "warning: the config has no `universal:` data, so the universal stage trains the "
        f"universal expert on every task's data ({', '.join(run.tasks)}); MoDULA trains it "
        "on general instruction data, kept apart from the domain tasks"
    )


def enable_checkpointing(base, run: RunConfig) -> None:
    if run.train.gradient_checkpointing:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def _check_folder(folder: RunFolder, run: RunConfig, resume: bool, only: str | None) -> None:
    if not folder.started():
        if resume:
            raise ConfigError(f"--resume: {folder.root} has no run to resume")
        return
    saved = folder.config_path.read_text(encoding="utf-8") if folder.config_path.is_file() else ""
    if resume or only is not None:
        if saved and saved != dump(run):
            raise ConfigError(
                f"the config differs from {folder.config_path}; resume with the same config "
                "(or train into a new output_dir)"
            )
        return
    raise ConfigError(
        f"{folder.root} already holds a run; pass --resume to continue it, --stage NAME to run "
        "one stage in it, or choose another output_dir"
    )


def train_run(run: RunConfig, only: str | None = None, resume: bool = False) -> dict:
    """Run the plan (or the stage ``only``) into ``run.output_dir``; returns the run's cost.

    Args:
        run: the resolved run config.
        only: run just this stage (the folder's adapter, if any, is loaded first).
        resume: continue the run in ``output_dir``: skip finished stages and resume
            the latest mid-stage checkpoint.
    """
    folder = RunFolder(run.output_dir)
    _check_folder(folder, run, resume, only)
    acc = make_accelerator(
        run.train.precision, str(folder.root / "tensorboard") if run.train.tensorboard else None
    )
    prep = prepare(run, only, acc.num_processes)
    if acc.is_main_process:
        note = universal_note(run, [s.name for s in prep.stages])
        if note:
            warnings.warn(note[len("warning: ") :], stacklevel=2)
        for note in truncation_notes(prep.data):
            print(note, file=sys.stderr)
    if acc.is_main_process:
        folder.root.mkdir(parents=True, exist_ok=True)
        folder.config_path.write_text(dump(run), encoding="utf-8")
        write_json(folder.root / "data.json", data_stats(prep.data))
    if run.train.tensorboard:
        acc.init_trackers("modulora")
    state = folder.state()
    if state["stages_done"]:
        from .checkpoint import load_weights

        load_weights(prep.model, folder.root)
    latest = folder.latest_checkpoint() if resume else None
    pad_id = prep.tokenizer.pad_token_id
    for index, stage in enumerate(prep.stages):
        if only is None and stage.key in state["stages_done"]:
            continue
        resuming = latest is not None and latest["stage"] == stage.label
        if not resuming:
            set_seed(run.train.seed + index + 1)  # dropout etc.; a resumed stage restores its RNG
        cost = run_stage(
            prep.model, stage, prep.stage_data[stage.label], acc, folder, pad_id, resuming
        )
        latest = None
        if stage.key not in state["stages_done"]:
            state["stages_done"].append(stage.key)
        if acc.is_main_process:
            write_json(folder.stage_dir(stage.label) / "cost.json", cost)
            folder.save_stage_adapter(prep.model, stage.label, state)
            folder.clear_checkpoints()
        acc.wait_for_everyone()
    summary = run_summary(folder, prep.model)
    if acc.is_main_process:
        write_json(folder.root / "cost.json", summary)
    acc.end_training()
    return summary


def run_summary(folder: RunFolder, model: MixtureModel) -> dict:
    """Every finished stage's cost and the totals (``cost.json`` at the run's root)."""
    stages = []
    for key in folder.state()["stages_done"]:
        cost = read_json(folder.stage_dir(stage_label(key)) / "cost.json")
        if cost is not None:
            stages.append(cost)
    keys = ("steps", "examples", "tokens", "label_tokens", "wall_time_s", "flops_estimate")
    total = {k: sum(c.get(k, 0) for c in stages) for k in keys}
    total["adapter_parameters"] = sum(p.numel() for p in model.adapter_parameters().values())
    return {"method": model.mixture_config.method, "stages": stages, "total": total}


def describe(run: RunConfig) -> tuple[list[dict], list[str]]:
    """What ``modulora plan`` prints: per stage what trains, on which data; and notes."""
    prep = prepare(run)
    rows = []
    for stage in prep.stages:
        with warnings.catch_warnings():  # untrained-universal warnings: nothing trains here
            warnings.simplefilter("ignore")
            prep.model.set_stage(stage.name)
        plan = prep.model.stage_plan(stage.name)
        trains = sorted(plan.train)
        if plan.train_router is True:
            trains.append("router")
        elif plan.train_router:
            trains.append(f"gate[{plan.train_router}]")
        examples = prep.stage_data[stage.label].train
        rows.append(
            {
                "stage": stage.key,
                "trains": ", ".join(trains) or "-",
                "parameters": prep.model.trainable_parameters(),
                "data": ", ".join("universal" if s is None else s for s in stage.sources),
                "examples": len(examples),
                "tokens": sum(len(e.input_ids) for e in examples),
                "steps": total_steps(len(examples), stage.train),
            }
        )
    notes = [n for n in [universal_note(run, [s.name for s in prep.stages])] if n]
    return rows, notes + truncation_notes(prep.data)


def data_stats(data: dict[str | None, Split]) -> dict:
    """Per source and split: records, examples, truncated, dropped, tokens (``data.json``)."""
    return {
        "universal" if source is None else source: {
            part: asdict(stats) for part, stats in split.stats.items()
        }
        for source, split in data.items()
    }


def truncation_notes(data: dict[str | None, Split]) -> list[str]:
    """One line per data source that had records truncated or dropped."""
    notes = []
    for source, split in data.items():
        for part, stats in split.stats.items():
            if stats.truncated or stats.dropped:
                name = "universal" if source is None else source
                notes.append(
                    f"{name} ({part}): {stats.truncated} of {stats.records} record(s) truncated "
                    f"to max_length, {stats.dropped} dropped (no response token left)"
                )
    return notes
