"""What a method is: its experts, its gate, its topology and its stages.

A method file fills in a ``Method`` with a few short functions; the injector and
the model wrapper read only these, never the method's name.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from ..config import MixtureConfig


@dataclass(frozen=True)
class ExpertSpec:
    """One expert of every adapted layer.

    Attributes:
        name: unique name and role, e.g. ``universal``, ``domain:math``,
            ``common:0``, ``specific:math``, ``expert:3``, ``lora``, ``ffn:1``.
        rank: LoRA rank.
        alpha: LoRA alpha (scale alpha / rank).
        task: the task this expert belongs to (domain/specific experts), or None.
    """

    name: str
    rank: int
    alpha: float
    task: str | None = None

    @property
    def role(self) -> str:
        return self.name.split(":", 1)[0]


@dataclass(frozen=True)
class Layout:
    """What each adapted layer holds.

    Attributes:
        topology: ``parallel``, ``residual`` or ``ffn-fusion``.
        experts: the gated experts, in router-output order.
        universal: the residual path's experts (MoDULA-Res), applied with weight 1.
        router: ``none``, ``token``, ``task`` (one gate per layer), ``task-shared``
            (one gate for all layers) or ``task-select`` (the row's own expert).
        ffn_only: adapt only linears inside FFN blocks (LoRAMoE).
    """

    topology: str
    experts: list[ExpertSpec]
    router: str
    universal: list[ExpertSpec] = field(default_factory=list)
    ffn_only: bool = False

    def all_experts(self) -> list[ExpertSpec]:
        return self.universal + self.experts


@dataclass(frozen=True)
class StagePlan:
    """What one stage trains and how its forward pass gates the experts.

    Attributes:
        name: the stage name (``universal``, ``domain:<t>``, ``router``, ``joint``,
            ``inference``).
        train: names of the experts whose parameters train.
        train_router: ``True`` trains every router/gate parameter; a task name
            trains only that task's gate embedding and the gate rows of the
            experts in ``train`` (task gates); ``False`` freezes routers.
        fixed: constant gate weights by expert name for this stage (experts not
            named are skipped); None uses the layer's router.
        task: the task a domain stage is for: every row must be of this task.
        train_base_io: also train the base model's input embeddings and LM head
            (MoE-CT option).
    """

    name: str
    train: frozenset[str] = frozenset()
    train_router: bool | str = False
    fixed: dict[str, float] | None = None
    task: str | None = None
    train_base_io: bool = False


@dataclass(frozen=True)
class Method:
    """A method as data: build its layout, list and resolve its stages, grow it.

    Attributes:
        name: the ``MixtureConfig.method`` value.
        paper: citation shown in docs and reports.
        layout: config -> what each adapted layer holds.
        plan: config -> default stage names in training order.
        stage: (config, stage name) -> StagePlan; raises ValueError for a stage
            the method does not have.
        add_task: (config, task, rank) -> the config after adding ``task``.
        task_gated: the forward pass always needs task ids.
        mergeable: a task's update folds into the base weights exactly.
        add_plan: (config after ``add_task``, task) -> the stages that train the new
            task (default: its domain stage); raises if the method cannot add tasks.
    """

    name: str
    paper: str
    layout: Callable[[MixtureConfig], Layout]
    plan: Callable[[MixtureConfig], list[str]]
    stage: Callable[[MixtureConfig, str], StagePlan]
    add_task: Callable[[MixtureConfig, str, int | None], MixtureConfig]
    task_gated: bool = False
    mergeable: bool = False
    add_plan: Callable[[MixtureConfig, str], list[str]] = lambda cfg, task: [f"domain:{task}"]


def unknown_stage(cfg: MixtureConfig, name: str, valid: list[str]) -> ValueError:
    return ValueError(
        f"method {cfg.method!r} has no stage {name!r}; its stages are: "
        + ", ".join(valid + ["inference"])
    )


def joint_stage(
    layout: Callable[[MixtureConfig], Layout],
) -> Callable[[MixtureConfig, str], StagePlan]:
    """The stage function of a method with one joint stage training everything."""

    def stage(cfg: MixtureConfig, name: str) -> StagePlan:
        if name != "joint":
            raise unknown_stage(cfg, name, ["joint"])
        experts = frozenset(e.name for e in layout(cfg).all_experts())
        return StagePlan(name, train=experts, train_router=True, train_base_io=cfg.train_embeddings)

    return stage


def domain_then_router(cfg: MixtureConfig, task: str) -> list[str]:
    """Add-task plan of routed methods: the new expert alone, then only the router."""
    return [f"domain:{task}", "router"]


def domain_task(cfg: MixtureConfig, name: str) -> str | None:
    """The task of a ``domain:<task>`` stage name (None for other names); unknown tasks raise."""
    if not name.startswith("domain:"):
        return None
    task = name.split(":", 1)[1]
    if task not in cfg.tasks:
        raise ValueError(f"stage {name!r} names unknown task {task!r}; known tasks: {cfg.tasks}")
    return task


def grown(cfg: MixtureConfig, task: str, rank: int | None, **changes) -> MixtureConfig:
    """A copy of ``cfg`` with ``task`` appended (and its rank recorded) plus ``changes``."""
    if task in cfg.tasks:
        raise ValueError(f"task {task!r} already exists; tasks: {cfg.tasks}")
    data = cfg.to_dict()
    data["tasks"] = [*cfg.tasks, task]
    data["added_tasks"] = [*cfg.added_tasks, task]
    if rank is not None:
        data["task_ranks"] = {**cfg.task_ranks, task: rank}
    data.update(changes)
    return MixtureConfig.from_dict(data)


def expert_list(prefix: str, count: int, rank: int, cfg: MixtureConfig) -> list[ExpertSpec]:
    """``count`` shared experts named ``prefix:0..count-1``."""
    return [ExpertSpec(f"{prefix}:{i}", rank, cfg.alpha_for(rank)) for i in range(count)]


def task_experts(
    prefix: str, cfg: MixtureConfig, default_rank: int | None = None
) -> list[ExpertSpec]:
    """One expert per task named ``prefix:<task>``; rank from ``task_ranks`` or the default."""
    specs = []
    for task in cfg.tasks:
        rank = cfg.task_rank(task, default_rank)
        specs.append(ExpertSpec(f"{prefix}:{task}", rank, cfg.alpha_for(rank), task=task))
    return specs


def added_experts_owned(specs: list[ExpertSpec], cfg: MixtureConfig) -> list[ExpertSpec]:
    """Shared experts grown by ``add_task`` (the last ones) tagged with the task they were
    added for, so a router can tell which experts an old task never saw."""
    first = len(specs) - len(cfg.added_tasks)
    return specs[:first] + [
        ExpertSpec(s.name, s.rank, s.alpha, task)
        for s, task in zip(specs[first:], cfg.added_tasks, strict=True)
    ]


def task_expert_mask(cfg: MixtureConfig, experts: list[ExpertSpec]) -> list[list[bool]] | None:
    """``allowed[t][e]``: task t may use expert e, i.e. e existed when t was trained.

    Tasks of the original plan see the original experts; a task added later also sees
    the experts added up to and with it. None when no task was added (no mask).
    """
    if not cfg.added_tasks:
        return None

    def vintage(task: str | None) -> int:
        return 1 + cfg.added_tasks.index(task) if task in cfg.added_tasks else 0

    return [[vintage(e.task) <= vintage(t) for e in experts] for t in cfg.tasks]
