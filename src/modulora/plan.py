"""The stages a run executes and the data each one reads.

A method names its stages (``Method.plan``; ``Method.add_plan`` after ``add_task``);
this module pairs each stage with its data and hyper-parameters:

==================  ==================================================
stage               data
==================  ==================================================
``universal``       ``universal.train`` (default: every task's data)
``domain:<t>``      task t only
``router``          ``fraction`` (default 0.2) of every task's data
``joint``           every task's data (``universal`` if there are none)
==================  ==================================================

``load_data`` reads, validates, splits and tokenizes every file the plan needs
before any training starts, so a bad record fails the run at once.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field, replace

from .data import Example, TokenizeStats, mix, pack, read_records, split_records, tokenize
from .run_config import ConfigError, RunConfig, TrainConfig

UNIVERSAL = None  # the source key of the universal data (its examples have no task)


@dataclass
class Stage:
    """One stage of a run.

    Attributes:
        name: the method's stage name (``domain:math``, ``router``...).
        key: unique within a run (``router@finance`` for the router stage of an added task).
        label: the stage's folder name under ``stages/`` (``key`` with ``:`` as ``-``).
        sources: task names whose data it reads (``None``: the universal data).
        train: its hyper-parameters (``train`` with the stage's overrides).
    """

    name: str
    key: str
    label: str
    sources: list[str | None]
    train: TrainConfig


@dataclass
class Split:
    """One data source's tokenized splits and its tokenization counts."""

    train: list[Example]
    valid: list[Example]
    test: list[Example]
    stats: dict[str, TokenizeStats] = field(default_factory=dict)


def stage_label(name: str) -> str:
    return name.replace(":", "-")


def stage_sources(run: RunConfig, name: str) -> list[str | None]:
    base = name.split("@")[0]
    tasks = list(run.tasks)
    if base == "universal":
        return [UNIVERSAL] if run.universal else tasks
    if base.startswith("domain:"):
        return [base.split(":", 1)[1]]
    if base in ("router", "joint"):
        if tasks:
            return tasks
        if run.universal:
            return [UNIVERSAL]
    raise ConfigError(f"stage {name!r} has no data: give tasks (or universal data) in the config")


def build_stages(run: RunConfig, names: list[str], suffix: str = "") -> list[Stage]:
    """Stages for ``names`` (``suffix`` tags repeated names, e.g. ``router@finance``)."""
    stages = []
    for name in names:
        full = f"{name}@{suffix}" if suffix and not name.startswith("domain:") else name
        train = run.stage_train(full)
        stages.append(Stage(name, full, stage_label(full), stage_sources(run, name), train))
    return stages


def check_stage_overrides(run: RunConfig, names: list[str]) -> None:
    """Every key under ``stages`` must name a stage of the plan (or ``domain``)."""
    valid = set(names) | {"domain"} if any(n.startswith("domain:") for n in names) else set(names)
    unknown = sorted(set(run.stages) - valid)
    if unknown:
        raise ConfigError(
            f"stages: {unknown} are not stages of method {run.method!r}; its stages: {names}"
        )


def source_records(run: RunConfig, source: str | None, known: list[str] | None = None):
    """(train, valid, test) records of one task (or the universal data), split by seed
    where the config gives no valid/test file: the same split for training and eval."""
    files = run.universal if source is UNIVERSAL else run.tasks[source]
    train = read_records(files.train, source, known)
    valid = read_records(files.valid, source, known) if files.valid else None
    test = read_records(files.test, source, known) if files.test else None
    if valid is None or test is None:
        v_frac = 0.0 if valid is not None else run.data.valid_fraction
        t_frac = 0.0 if test is not None else run.data.test_fraction
        train, v_split, t_split = split_records(train, run.train.seed, v_frac, t_frac)
        valid = valid if valid is not None else v_split
        test = test if test is not None else t_split
    system = run.data.system_prompt
    if system is not None:
        train, valid, test = (
            [r if r.kind == "text" else replace(r, system=system) for r in part]
            for part in (train, valid, test)
        )
    return train, valid, test


def load_source(
    run: RunConfig, source: str | None, tokenizer, max_length: int, known: list[str]
) -> Split:
    """Read, split and tokenize one task's (or the universal) files."""
    files = run.universal if source is UNIVERSAL else run.tasks[source]
    train, valid, test = source_records(run, source, known)
    out = Split([], [], [])
    for part, records in (("train", train), ("valid", valid), ("test", test)):
        examples, stats = tokenize(records, tokenizer, max_length) if records else ([], None)
        if run.data.packing and part == "train":
            examples = pack(examples, max_length)
        setattr(out, part, examples)
        if stats is not None:
            out.stats[part] = stats
    if not out.train:
        raise ConfigError(
            f"{files.train}: no training example left after tokenization (every record "
            f"is empty or its response lies past max_length={max_length}; raise "
            "train.max_length)"
        )
    return out


def load_data(run: RunConfig, stages: list[Stage], tokenizer) -> dict[str | None, Split]:
    """Every source the stages read, loaded once (errors before any training)."""
    known = list(run.tasks)
    max_length = max(s.train.max_length for s in stages) if stages else run.train.max_length
    sources = list(dict.fromkeys(src for s in stages for src in s.sources))
    return {src: load_source(run, src, tokenizer, max_length, known) for src in sources}


def _truncate(examples: list[Example], max_length: int) -> list[Example]:
    return [
        e
        if len(e.input_ids) <= max_length
        else Example(e.input_ids[:max_length], e.labels[:max_length], e.task, e.where)
        for e in examples
    ]


def stage_examples(
    run: RunConfig, stage: Stage, data: dict[str | None, Split], part: str = "train"
) -> list[Example]:
    """The examples ``stage`` trains (or validates) on: its sources' ``part``, mixed.

    ``fraction`` takes the same deterministic share of each source's training data.
    """
    per_source = {}
    for src in stage.sources:
        examples = getattr(data[src], part)
        if part == "train" and stage.train.fraction < 1.0:
            rng = random.Random(f"{run.train.seed}:{stage.label}:{src}")
            keep = max(1, round(stage.train.fraction * len(examples)))
            examples = [examples[i] for i in sorted(rng.sample(range(len(examples)), keep))]
        per_source[src] = _truncate(examples, stage.train.max_length)
    if part == "valid":  # an even share of the cap for each source
        cap = max(1, run.data.max_valid_examples // len(per_source))
        return [e for examples in per_source.values() for e in examples[:cap]]
    if part != "train" or len(per_source) == 1:
        return [e for examples in per_source.values() for e in examples]
    return mix(per_source, run.data.mixing, run.data.probabilities or None, run.train.seed)
