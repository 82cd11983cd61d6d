"""The one configuration object of an adapter: which method, which tasks, which ranks.

Every field is documented once, here; the README and (later) the CLI help read the
same text. Validation happens in ``__post_init__`` so a bad config fails before any
model is touched.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import Any

METHODS = (
    "lora",
    "multi-lora",
    "molora",
    "modula-flan",
    "modula-res",
    "cgc-lora",
    "moelora",
    "loramoe",
    "moe-ct",
)
TASK_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")


@dataclass
class MixtureConfig:
    """Configuration of a mixture of LoRA experts.

    Attributes:
        method: one of ``lora``, ``multi-lora``, ``molora``, ``modula-flan``,
            ``modula-res``, ``cgc-lora``, ``moelora``, ``loramoe``, ``moe-ct``.
        tasks: domain/task names, in order. Needed by every task-aware method
            (multi-lora, modula-*, cgc-lora, moelora); optional for the others.
        rank: rank of each domain/task expert, and of lora/molora/loramoe experts.
            For moelora and cgc-lora it is the total rank of one task's experts,
            split evenly among them (METHODS.md) unless ``expert_rank`` is given.
            For moe-ct it is the rank of each LoRA-delta FFN expert.
        universal_rank: rank of the MoDULA universal expert (paper: 16).
        num_experts: experts of molora/moelora/loramoe; common experts of
            cgc-lora; expert FFNs of moe-ct.
        top_k: keep only the k largest token-router weights (renormalised);
            ``None`` is dense soft routing.
        alpha: LoRA alpha of every expert; ``None`` means ``2 * rank`` of that
            expert, so the scale ``alpha / rank`` is 2.
        target_modules: ``"all-linear"`` (every Linear/Conv1D but the LM head;
            the FFN's for loramoe; every FFN block for moe-ct) or a list of
            module-name suffixes such as ``["q_proj", "v_proj"]``.
        layers_to_transform: adapt only these transformer blocks (as in PEFT;
            negative indices count from the last block, e.g. ``[-4, -3, -2, -1]``).
            Adapting only the top blocks also stops backward there: faster on CPU.
        expert_rank: per-expert rank for moelora/cgc-lora, overriding the even
            split of ``rank``.
        task_ranks: per-task rank overrides of domain/task-specific experts
            (``add_task(name, rank=...)`` records here).
        added_tasks: tasks added with ``add_task`` after the first attach, in
            order. moelora gives each of them a task-specific expert.
        router_init_std: std of the normal init of token-router weights (0 gives
            uniform routing at the start; top-k needs some noise to break ties).
        balance_coef: weight of the switch/Mixtral load-balancing loss on token
            routers (0 turns it off).
        z_loss_coef: weight of the router z-loss (0 turns it off).
        loramoe_beta: weight of LoRAMoE's localized balancing loss.
        loramoe_delta: LoRAMoE's importance boost/cut for the matching group.
        knowledge_experts: size of LoRAMoE's world-knowledge expert group
            (default ``num_experts // 2``; the rest are the downstream group).
        knowledge_tasks: tasks whose samples count as world-knowledge samples
            for LoRAMoE's balancing; rows of other tasks (or no task) are
            downstream samples.
        gate_dim: task-embedding size of task gates (64, as in MOELoRA).
        leaky_relu_slope: negative slope of MoDULA-Res domain experts.
        moe_ct_experts: ``"lora"`` (expert FFNs as LoRA deltas on the frozen FFN,
            low memory) or ``"copy"`` (full trainable copies of the FFN).
        fusion: MoE-CT fusion of frozen FFN and MoE path: ``"fixed"`` share,
            learned ``"scalar"`` gate, or per-token ``"token"`` sigmoid gate.
        fusion_share: MoE-CT's fixed share ``g`` of the MoE path (and the
            initial value of learned gates).
        train_embeddings: MoE-CT only: also train the input embeddings and LM
            head in the joint stage (the authors' code does; default off).
    """

    method: str = "modula-res"
    tasks: list[str] = field(default_factory=list)
    rank: int = 8
    universal_rank: int = 16
    num_experts: int = 8
    top_k: int | None = None
    alpha: float | None = None
    target_modules: str | list[str] = "all-linear"
    layers_to_transform: list[int] | None = None
    expert_rank: int | None = None
    task_ranks: dict[str, int] = field(default_factory=dict)
    added_tasks: list[str] = field(default_factory=list)
    router_init_std: float = 0.02
    balance_coef: float = 0.0
    z_loss_coef: float = 0.0
    loramoe_beta: float = 0.1
    loramoe_delta: float = 0.1
    knowledge_experts: int | None = None
    knowledge_tasks: list[str] = field(default_factory=list)
    gate_dim: int = 64
    leaky_relu_slope: float = 0.01
    moe_ct_experts: str = "lora"
    fusion: str = "fixed"
    fusion_share: float = 0.5
    train_embeddings: bool = False

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}; choose one of {', '.join(METHODS)}")
        self.tasks = list(self.tasks)
        for name in self.tasks:
            if not isinstance(name, str) or not TASK_NAME.match(name):
                raise ValueError(
                    f"task name {name!r} must be letters, digits, '_', '.' or '-' "
                    "(it names files in a saved adapter)"
                )
        if len(set(self.tasks)) != len(self.tasks):
            raise ValueError(f"duplicate task names in {self.tasks}")
        needs_tasks = {"multi-lora", "modula-flan", "modula-res", "cgc-lora", "moelora"}
        if self.method in needs_tasks and not self.tasks:
            raise ValueError(f"method {self.method!r} needs at least one task in `tasks`")
        for name, value in (("rank", self.rank), ("universal_rank", self.universal_rank)):
            _positive(name, value)
        _positive("num_experts", self.num_experts)
        _positive("gate_dim", self.gate_dim)
        if self.expert_rank is not None:
            _positive("expert_rank", self.expert_rank)
        for task, r in self.task_ranks.items():
            if task not in self.tasks:
                raise ValueError(f"task_ranks names {task!r}, which is not in tasks {self.tasks}")
            _positive(f"task_ranks[{task!r}]", r)
        if self.top_k is not None and not self.top_k >= 1:
            raise ValueError(f"top_k must be None or >= 1, got {self.top_k}")
        if self.alpha is not None and self.alpha <= 0:
            raise ValueError(f"alpha must be positive, got {self.alpha}")
        if isinstance(self.target_modules, str):
            if self.target_modules != "all-linear":
                self.target_modules = [self.target_modules]
        else:
            self.target_modules = list(self.target_modules)
            if not self.target_modules:
                raise ValueError("target_modules is an empty list")
        if self.layers_to_transform is not None:
            self.layers_to_transform = [int(i) for i in self.layers_to_transform]
            if not self.layers_to_transform:
                raise ValueError("layers_to_transform is an empty list (None adapts every block)")
        if self.moe_ct_experts not in ("lora", "copy"):
            raise ValueError(
                f"moe_ct_experts must be 'lora' or 'copy', got {self.moe_ct_experts!r}"
            )
        if self.fusion not in ("fixed", "scalar", "token"):
            raise ValueError(f"fusion must be 'fixed', 'scalar' or 'token', got {self.fusion!r}")
        if not 0.0 < self.fusion_share < 1.0:
            raise ValueError(f"fusion_share must be in (0, 1), got {self.fusion_share}")
        if self.knowledge_experts is not None and not 0 < self.knowledge_experts < self.num_experts:
            raise ValueError(
                f"knowledge_experts must be in 1..{self.num_experts - 1}, "
                f"got {self.knowledge_experts}"
            )
        unknown = [t for t in self.knowledge_tasks if t not in self.tasks]
        if unknown:
            raise ValueError(f"knowledge_tasks {unknown} are not in tasks {self.tasks}")
        if self.train_embeddings and self.method != "moe-ct":
            raise ValueError(
                "train_embeddings is a MoE-CT option; other methods keep the base frozen"
            )

    def task_rank(self, task: str, default: int | None = None) -> int:
        """Rank of the domain/task-specific expert of ``task`` (``task_ranks``, else
        ``default``, else ``rank``)."""
        return self.task_ranks.get(task, default or self.rank)

    def alpha_for(self, rank: int) -> float:
        """LoRA alpha of an expert of this rank (default 2 * rank)."""
        return float(self.alpha) if self.alpha is not None else 2.0 * rank

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MixtureConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown MixtureConfig keys {unknown}; known keys: {sorted(known)}")
        return cls(**data)


def _positive(name: str, value: Any) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
