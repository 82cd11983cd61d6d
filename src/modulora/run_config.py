"""A training run as one YAML file: model, method, task data, adapter, training, stages.

Every key has a default documented here, once; ``modulora plan`` and the README
read these docstrings. ``load_run_config`` resolves data paths against the YAML
file's folder and applies ``--set key.sub=value`` overrides; ``dump`` writes the
resolved config (absolute paths), which re-runs as is.

    model: path/to/hf/model/dir
    method: modula-res
    tasks:
      math: {train: data/math.jsonl, valid: data/math.valid.jsonl}
      medical: {train: data/medical.jsonl}      # valid/test split made by seed
    universal: {train: data/general.jsonl}     # MoDULA universal stage data
    adapter: {rank: 8, universal_rank: 16, target_modules: all-linear}
    train: {batch_size: 8, lr: 2.0e-4, max_length: 256, epochs: 1}
    stages: {universal: {max_steps: 200}, domain: {max_steps: 100},
             router: {max_steps: 50, fraction: 0.2}}
    output_dir: runs/demo
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .config import MixtureConfig
from .metrics import METRICS

SCHEDULES = ("cosine", "linear", "constant")
PRECISIONS = ("fp32", "bf16", "auto")
MIXING = ("concat", "interleave")


class ConfigError(ValueError):
    """A run config that cannot work; the message names the file and the key."""


class _Loader(yaml.SafeLoader):
    """PyYAML's safe loader with YAML 1.2 numbers: YAML 1.1 reads ``1e-3`` (no dot) as
    a string, so ``lr: 1e-3`` or ``--set train.lr=1e-2`` would be refused."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*\.?[0-9_]*|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."),
)


def parse_yaml(text: str):
    """YAML text -> Python values, numbers read as YAML 1.2 reads them."""
    return yaml.load(text, Loader=_Loader)  # noqa: S506 (a SafeLoader subclass)


@dataclass
class TaskData:
    """The data files of one task (or of the universal stage).

    Attributes:
        train: JSONL/CSV training records (required).
        valid: validation records; default: ``data.valid_fraction`` of ``train``, split by seed.
        test: test records; default: ``data.test_fraction`` of ``train``, split by seed.
        rank: rank of this task's expert (default: ``adapter.rank``).
        metric: how ``modulora eval`` scores generated answers on the test split:
            ``exact`` (exact match), ``classification`` (accuracy over ``labels``)
            or ``chrf`` (chrF, sacrebleu, for free text).
        labels: the answers of a classification task (a prediction counts as the
            label it starts with).
    """

    train: str
    valid: str | None = None
    test: str | None = None
    rank: int | None = None
    metric: str = "exact"
    labels: list[str] | None = None


@dataclass
class EvalConfig:
    """What ``modulora eval`` measures.

    Attributes:
        max_examples: test examples per task (first N of the test split).
        max_new_tokens: generation length for answers (greedy).
        batch_size: rows per generation/scoring batch.
        mmlu: general-ability probe, JSONL of ``{"question", "choices", "answer"}``
            scored by the log-likelihood of the answer letter (None: skipped).
        text: held-out general text (``{"text": ...}`` JSONL) for perplexity (None: skipped).
        probe_examples: questions/texts used from each probe file.
        text_examples: texts for perplexity, when fewer than ``probe_examples``.
        forgetting: also score every task after every stage (the forgetting matrix).
        forgetting_examples: test examples per task for the forgetting matrix.
        likelihood: also score classification tasks by likelihood: the label with the
            highest log-likelihood after the prompt (works for models that answer in
            another format, such as the base model).
    """

    max_examples: int = 100
    max_new_tokens: int = 16
    batch_size: int = 8
    mmlu: str | None = None
    text: str | None = None
    probe_examples: int = 200
    text_examples: int | None = None
    forgetting: bool = True
    forgetting_examples: int = 30
    likelihood: bool = True


@dataclass
class DataConfig:
    """How records become batches.

    Attributes:
        valid_fraction: share of a task's ``train`` file held out for validation
            when the task gives no ``valid`` file.
        test_fraction: share held out for testing when the task gives no ``test`` file.
        packing: concatenate examples of the same task into rows of ``max_length``.
        mixing: how tasks' data are combined in joint/router stages: ``concat``
            (everything, shuffled) or ``interleave`` (sampled with ``probabilities``
            until one task runs out).
        probabilities: task -> sampling weight for ``interleave`` (default: by size).
        max_valid_examples: cap on validation examples per stage (first N, fixed).
        system_prompt: system turn put before every prompt/response record that has
            none, in training and evaluation alike. ``None`` (default) leaves the chat
            template's own default (SmolLM2's adds ~25 tokens per example); ``""`` is
            an empty system turn.
    """

    valid_fraction: float = 0.1
    test_fraction: float = 0.1
    packing: bool = False
    mixing: str = "concat"
    probabilities: dict[str, float] = field(default_factory=dict)
    max_valid_examples: int = 256
    system_prompt: str | None = None


@dataclass
class TrainConfig:
    """Optimisation settings; any of them can be overridden per stage under ``stages``.

    Attributes:
        batch_size: examples per optimizer micro-step, over all processes (the global
            batch is ``batch_size * grad_accum`` whatever the number of processes).
        grad_accum: micro-steps per optimizer step.
        lr: AdamW peak learning rate.
        weight_decay: AdamW weight decay.
        schedule: ``cosine``, ``linear`` (decay to 0) or ``constant``, after warmup.
        warmup_ratio: share of a stage's steps spent warming up linearly.
        max_grad_norm: gradient clipping norm (0 turns clipping off).
        max_length: tokens per example; longer records are truncated (counted in the log).
        epochs: passes over the stage's data (ignored when ``max_steps`` is set).
        max_steps: optimizer steps of the stage (overrides ``epochs``).
        fraction: share of the stage's training data used (router stages default to 0.2).
        seed: seeds the adapter init, data splits and data order.
        precision: ``fp32``, ``bf16`` (autocast; weights stay fp32) or ``auto``: bf16
            where the hardware computes it natively (CUDA with bf16, CPUs with
            AVX512-BF16/AMX), fp32 elsewhere, where emulated bf16 is many times slower.
        gradient_checkpointing: recompute activations in backward to save memory.
        compile: ``torch.compile`` every adapted layer for the stage (the expert path
            traces whole, without graph breaks, for token, fixed and no gates; task
            gates break once per call at their data-dependent choice of experts).
        compile_backend: the ``torch.compile`` backend (``inductor``; ``eager`` traces
            without generating code, for checking).
        eval_every: validation loss every N steps (0: only before and after the stage).
        save_every: mid-stage checkpoint every N steps (0: only at the end of the stage).
        log_every: write a metrics line every N steps.
        tensorboard: also log to TensorBoard under ``<output_dir>/tensorboard``.
    """

    batch_size: int = 8
    grad_accum: int = 1
    lr: float = 2.0e-4
    weight_decay: float = 0.0
    schedule: str = "cosine"
    warmup_ratio: float = 0.03
    max_grad_norm: float = 1.0
    max_length: int = 256
    epochs: int = 1
    max_steps: int | None = None
    fraction: float = 1.0
    seed: int = 0
    precision: str = "fp32"
    gradient_checkpointing: bool = False
    compile: bool = False
    compile_backend: str = "inductor"
    eval_every: int = 50
    save_every: int = 100
    log_every: int = 1
    tensorboard: bool = False

    def __post_init__(self) -> None:
        for name in ("batch_size", "grad_accum", "max_length", "epochs", "log_every"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"train.{name} must be a positive integer, got {value!r}")
        for name in ("eval_every", "save_every"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 0:
                raise ConfigError(f"train.{name} must be an integer >= 0")
        if self.max_steps is not None and (
            not isinstance(self.max_steps, int) or self.max_steps < 1
        ):
            raise ConfigError(f"train.max_steps must be null or >= 1, got {self.max_steps!r}")
        if not isinstance(self.lr, int | float) or self.lr <= 0:
            raise ConfigError(f"train.lr must be a positive number, got {self.lr!r}")
        if not 0.0 < self.fraction <= 1.0:
            raise ConfigError(f"train.fraction must be in (0, 1], got {self.fraction!r}")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise ConfigError(f"train.warmup_ratio must be in [0, 1), got {self.warmup_ratio!r}")
        _choice("train.schedule", self.schedule, SCHEDULES)
        _choice("train.precision", self.precision, PRECISIONS)


@dataclass
class RunConfig:
    """One training run.

    Attributes:
        model: a local Hugging Face model folder (or an embedded model name).
        method: one of ``modulora.METHODS``.
        tasks: task name -> ``TaskData``; order is the experts' order.
        universal: data of the MoDULA universal stage (default: all tasks' training data).
        adapter: ``MixtureConfig`` fields (rank, universal_rank, num_experts, top_k,
            target_modules, ...); ``method`` and ``tasks`` come from the keys above.
        data: ``DataConfig``.
        train: ``TrainConfig``.
        stages: per-stage overrides of ``train`` keys, by stage name (``universal``,
            ``domain`` for every domain stage or ``domain:<task>`` for one,
            ``router``, ``joint``).
        eval: ``EvalConfig``.
        output_dir: the run folder.
    """

    model: str
    method: str = "modula-res"
    tasks: dict[str, TaskData] = field(default_factory=dict)
    universal: TaskData | None = None
    adapter: dict[str, Any] = field(default_factory=dict)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    stages: dict[str, dict[str, Any]] = field(default_factory=dict)
    eval: EvalConfig = field(default_factory=EvalConfig)
    output_dir: str = "runs/run"

    def mixture_config(self) -> MixtureConfig:
        """The adapter's ``MixtureConfig`` (task ranks from ``tasks.<t>.rank``)."""
        ranks = {t: d.rank for t, d in self.tasks.items() if d.rank is not None}
        try:
            return MixtureConfig(
                method=self.method, tasks=list(self.tasks), task_ranks=ranks, **self.adapter
            )
        except (TypeError, ValueError) as e:
            raise ConfigError(f"adapter: {e}") from e

    def stage_train(self, stage: str) -> TrainConfig:
        """``train`` with the overrides of ``stage`` (``domain`` keys, then ``domain:<t>``)."""
        merged = dataclasses.asdict(self.train)
        if stage.startswith("router"):
            merged["fraction"] = 0.2  # the paper trains the router on a small mix
        keys = [stage.split("@")[0]]
        if keys[0].startswith("domain:"):
            keys.insert(0, "domain")
        for key in keys:
            merged.update(self.stages.get(key, {}))
        return TrainConfig(**merged)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _choice(name: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"{name} must be one of {', '.join(allowed)}, got {value!r}")


def _fields(cls) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)}


def _build(cls, data: Any, where: str):
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{where} must be a mapping, got {type(data).__name__}")
    unknown = sorted(set(data) - _fields(cls))
    if unknown:
        raise ConfigError(f"{where}: unknown keys {unknown}; known keys: {sorted(_fields(cls))}")
    try:
        return cls(**data)
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from e
    except TypeError as e:
        raise ConfigError(f"{where}: {e}") from e


def _task_data(data: Any, where: str, base: Path) -> TaskData:
    if isinstance(data, str):
        data = {"train": data}
    if not isinstance(data, dict) or "train" not in data:
        raise ConfigError(f"{where} needs a 'train' file, e.g. {{train: data/x.jsonl}}")
    td = _build(TaskData, data, where)
    for key in ("train", "valid", "test"):
        value = getattr(td, key)
        if value is not None:
            setattr(td, key, str((base / str(value)).resolve()))
    return td


def _set(data: dict, assignment: str) -> None:
    """Apply one ``a.b.c=value`` override (the value parsed as YAML) to ``data``."""
    key, sep, raw = assignment.partition("=")
    if not sep or not key:
        raise ConfigError(f"--set {assignment!r}: expected key.path=value")
    parts = key.split(".")
    node = data
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"--set {assignment!r}: {part!r} is not a mapping")
    node[parts[-1]] = parse_yaml(raw)


def from_dict(data: dict[str, Any], base: Path, where: str = "config") -> RunConfig:
    """Build and validate a RunConfig; relative paths are resolved against ``base``."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping at the top level")
    unknown = sorted(set(data) - _fields(RunConfig))
    if unknown:
        raise ConfigError(f"{where}: unknown keys {unknown}; known: {sorted(_fields(RunConfig))}")
    if not data.get("model"):
        raise ConfigError(f"{where}: 'model' is required (a local Hugging Face model folder)")
    tasks = data.get("tasks") or {}
    if not isinstance(tasks, dict):
        raise ConfigError(f"{where}: tasks must map task names to data files")
    model = str(data["model"])
    if (base / model).is_dir():
        model = str((base / model).resolve())
    universal = data.get("universal")
    cfg = RunConfig(
        model=model,
        method=data.get("method", "modula-res"),
        tasks={str(t): _task_data(d, f"{where}: tasks.{t}", base) for t, d in tasks.items()},
        universal=_task_data(universal, f"{where}: universal", base) if universal else None,
        adapter=dict(data.get("adapter") or {}),
        data=_build(DataConfig, data.get("data"), f"{where}: data"),
        train=_build(TrainConfig, data.get("train"), f"{where}: train"),
        stages=dict(data.get("stages") or {}),
        eval=_build(EvalConfig, data.get("eval"), f"{where}: eval"),
        output_dir=str((base / str(data.get("output_dir", "runs/run"))).resolve()),
    )
    for key in ("method", "tasks", "task_ranks"):
        if key in cfg.adapter:
            raise ConfigError(f"{where}: set adapter.{key} at the top level / under tasks instead")
    for key in ("mmlu", "text"):
        value = getattr(cfg.eval, key)
        if value is not None:
            setattr(cfg.eval, key, str((base / str(value)).resolve()))
    for name, td in cfg.tasks.items():
        _choice(f"{where}: tasks.{name}.metric", td.metric, METRICS)
        if td.metric == "classification" and not td.labels:
            raise ConfigError(f"{where}: tasks.{name}: a classification task needs its labels")
    cfg.mixture_config()  # validates method, task names and adapter keys
    _choice(f"{where}: data.mixing", cfg.data.mixing, MIXING)
    for name, overrides in cfg.stages.items():
        if not isinstance(overrides, dict):
            raise ConfigError(f"{where}: stages.{name} must be a mapping of train keys")
        try:
            cfg.stage_train(name)
        except (ConfigError, TypeError) as e:
            raise ConfigError(f"{where}: stages.{name}: {e}") from e
    return cfg


def load_run_config(path: str | Path, overrides: list[str] = ()) -> RunConfig:
    """Read a run YAML file, apply ``--set`` overrides and validate it.

    Raises:
        ConfigError: unreadable YAML, unknown keys, bad values (message names the file).
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        data = parse_yaml(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from e
    data = data or {}
    for assignment in overrides:
        _set(data, assignment)
    return from_dict(data, path.resolve().parent, str(path))


def dump(cfg: RunConfig) -> str:
    """The resolved config as YAML (absolute paths), re-runnable as is."""
    data = cfg.to_dict()
    data["tasks"] = {
        t: {k: v for k, v in d.items() if v is not None} for t, d in data["tasks"].items()
    }
    if data["universal"] is None:
        del data["universal"]
    return yaml.safe_dump(data, sort_keys=False)
