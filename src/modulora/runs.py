"""The run folder: what a run leaves on disk and how it resumes.

::

    <output_dir>/
      config.yaml                  the resolved config, re-runnable as is
      manifest.json, experts/, router.safetensors   the adapter after the last stage
      state.json                   stages done, tasks added
      data.json                    per data source and split: records, truncated, dropped, tokens
      cost.json                    run summary: every stage's cost and the totals
      stages/<stage>/metrics.jsonl, cost.json
      stages/<stage>/adapter/      what the stage trained (its experts, the router)
      checkpoints/latest.json      -> checkpoints/<stage>-step<N>/ (mid-stage resume)

Every file is written to a temporary name and renamed. A mid-stage checkpoint is
a folder written in full before ``latest.json`` points at it, so a crash at any
moment leaves the previous checkpoint usable.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from .checkpoint import atomic_write, load_weights, save
from .model import MixtureModel


@dataclass
class Progress:
    """How far a stage got: everything a resumed stage needs besides the tensors."""

    step: int = 0
    examples: int = 0
    tokens: int = 0
    label_tokens: int = 0
    wall_time: float = 0.0


def write_json(path: Path, data) -> None:
    text = json.dumps(data, indent=2)
    atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def read_json(path: Path, default=None):
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else default


class RunFolder:
    """Paths and atomic reads/writes of one run folder."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    @property
    def config_path(self) -> Path:
        return self.root / "config.yaml"

    def started(self) -> bool:
        return (self.root / "state.json").is_file() or self.config_path.is_file()

    def state(self) -> dict:
        return read_json(self.root / "state.json", {"stages_done": [], "tasks_added": []})

    def write_state(self, state: dict) -> None:
        write_json(self.root / "state.json", state)

    def stage_dir(self, label: str) -> Path:
        return self.root / "stages" / label

    # --- metrics ------------------------------------------------------------------

    def append_metrics(self, label: str, record: dict) -> None:
        path = self.stage_dir(label) / "metrics.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")

    def read_metrics(self, label: str) -> list[dict]:
        path = self.stage_dir(label) / "metrics.jsonl"
        if not path.is_file():
            return []
        return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]

    def truncate_metrics(self, label: str, step: int) -> None:
        """Drop lines logged after ``step`` (a resumed stage logs them again)."""
        path = self.stage_dir(label) / "metrics.jsonl"
        if path.is_file():
            kept = [r for r in self.read_metrics(label) if r["step"] <= step]
            text = "".join(json.dumps(r) + "\n" for r in kept)
            atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))

    # --- adapter and checkpoints --------------------------------------------------

    def save_adapter(self, model: MixtureModel, state: dict) -> None:
        """The adapter after a stage, then ``state.json`` (so 'done' is never ahead of weights)."""
        save(model, self.root, extra={"stages_done": state["stages_done"]})
        self.write_state(state)

    def save_stage_adapter(self, model: MixtureModel, label: str, state: dict) -> None:
        """The adapter after a stage, then ``state.json``; and, under ``stages/<label>/adapter``,
        what the stage trained (its experts and the router): the forgetting matrix
        rebuilds the model after any stage from these."""
        trained = sorted(model.stage_plan(model.stage).train)
        save(model, self.stage_dir(label) / "adapter", only=trained)
        self.save_adapter(model, state)

    def latest_checkpoint(self) -> dict | None:
        return read_json(self.root / "checkpoints" / "latest.json")

    def save_checkpoint(
        self, model: MixtureModel, label: str, progress: Progress, optimizer, scheduler
    ) -> None:
        ckpts = self.root / "checkpoints"
        name = f"{label}-step{progress.step}"
        folder = ckpts / name
        if folder.exists():
            shutil.rmtree(folder)
        save(model, folder)
        trainer = {"optimizer": optimizer.state_dict(), "rng": torch.get_rng_state()}
        atomic_write(folder / "trainer.pt", lambda tmp: torch.save(trainer, tmp))
        write_json(folder / "scheduler.json", scheduler.state_dict())
        write_json(ckpts / "latest.json", {"stage": label, "folder": name, **asdict(progress)})
        for old in ckpts.iterdir():  # only the newest checkpoint is kept
            if old.is_dir() and old.name != name:
                shutil.rmtree(old)

    def load_checkpoint(self, model: MixtureModel, optimizer, scheduler) -> Progress:
        """Restore the latest checkpoint's weights, optimizer, schedule and RNG."""
        info = self.latest_checkpoint()
        folder = self.root / "checkpoints" / info["folder"]
        load_weights(model, folder)
        trainer = torch.load(folder / "trainer.pt", weights_only=True)
        optimizer.load_state_dict(trainer["optimizer"])
        scheduler.load_state_dict(read_json(folder / "scheduler.json"))
        torch.set_rng_state(trainer["rng"])
        fields = Progress.__dataclass_fields__
        return Progress(**{k: v for k, v in info.items() if k in fields})

    def clear_checkpoints(self) -> None:
        shutil.rmtree(self.root / "checkpoints", ignore_errors=True)
