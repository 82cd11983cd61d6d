"""``modulora quickstart``: MoDULA on a real model and real data, end to end, in minutes.

1. the embedded SmolLM2-135M-Instruct (converted once from its PyPI GGUF);
2. the real mini-benchmark (``modulora.benchmark``: math, medical, news, Chinese,
   plus ``translate`` kept back for add-task), general-ability probes;
3. MoDULA-Res (universal -> 4 domains -> router) and a joint-LoRA baseline with the
   same budget (optimizer steps x batch); ``--full`` adds MoLoRA and MoDULA-Flan;
4. ``translate`` added to the MoDULA-Res run with add-task;
5. every run evaluated (the base model too), then compared in one table and plot.

Each run is an ordinary run folder made from an ordinary YAML file (written next
to it), so any step can be re-run or changed by hand.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import yaml

from .add_task import add_task
from .benchmark import MANIFEST, build_benchmark
from .eval_run import evaluate_run
from .models.embedded import resolve
from .recipe import train_run
from .report import compare_runs
from .run_config import load_run_config

# The budget that fits 10 minutes on 2 CPU cores for SmolLM2-135M. Every method gets the
# same number of optimizer steps of the same batch; MoDULA spends them across its stages.
STAGE_STEPS = {"universal": 12, "domain": 12, "router": 8}
TOTAL_STEPS = STAGE_STEPS["universal"] + 4 * STAGE_STEPS["domain"] + STAGE_STEPS["router"]
TRAIN = {
    "batch_size": 8,
    "lr": 1.0e-3,
    "max_length": 96,
    "precision": "bf16",
    "warmup_ratio": 0.0,
    "eval_every": 0,
    "save_every": 0,
    "seed": 0,
}
EVAL = {"max_examples": 40, "max_new_tokens": 8, "forgetting_examples": 16, "probe_examples": 100}
TOP_LAYERS = 10  # adapt the top blocks only: backward stops there, ~2x faster on CPU


def _top_layer_targets(model_dir: Path, layers: int) -> list[str]:
    config = json.loads((model_dir / "config.json").read_text())
    n = config["num_hidden_layers"]
    projections = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    return [f"layers.{i}.{p}" for i in range(n - layers, n) for p in projections]


def run_config(method: str, model_dir: Path, bench: Path, out: Path) -> dict:
    """The YAML of one quickstart run (plain data, written next to the run)."""
    spec = json.loads((bench / MANIFEST).read_text())
    tasks = {}
    for name, task in spec["tasks"].items():
        if task["role"] != "domain":
            continue
        files = {k: str(bench / v) for k, v in task["files"].items()}
        tasks[name] = {**files, "metric": task["kind"]}
        if task["labels"]:
            tasks[name]["labels"] = task["labels"]
    probes = spec["probes"]
    cfg = {
        "model": str(model_dir),
        "method": method,
        "tasks": tasks,
        "adapter": {
            "rank": 8,
            "universal_rank": 16,
            "num_experts": 4,
            "target_modules": _top_layer_targets(model_dir, TOP_LAYERS),
        },
        "train": dict(TRAIN),
        "eval": {
            **EVAL,
            "mmlu": str(bench / probes["mmlu"]["file"]),
            "text": str(bench / probes["text"]["file"]),
        },
        "output_dir": str(out / method),
    }
    if method.startswith("modula"):
        cfg["universal"] = {k: str(bench / v) for k, v in spec["universal"]["files"].items()}
        cfg["stages"] = {k: {"max_steps": v} for k, v in STAGE_STEPS.items()}
    else:
        cfg["train"]["max_steps"] = TOTAL_STEPS
    return cfg


def quickstart(
    out: str | Path = "runs/quickstart", model: str = "smollm2-135m", full: bool = False
) -> dict:
    """Run the whole demonstration into ``out``; returns timings and the comparison path."""
    out = Path(out)
    times: dict[str, float] = {}
    start = time.perf_counter()
    model_dir = resolve(model)
    bench = build_benchmark()
    times["model + data"] = time.perf_counter() - start
    methods = ["modula-res", "lora"] + (["molora", "modula-flan"] if full else [])
    spec = json.loads((bench / MANIFEST).read_text())
    extra = next(t for t in spec["tasks"].values() if t["role"] == "add-task")
    runs = []
    for method in methods:
        t0 = time.perf_counter()
        path = out / f"{method}.yaml"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(yaml.safe_dump(run_config(method, model_dir, bench, out), sort_keys=False))
        run = load_run_config(path)
        if Path(run.output_dir).exists():
            raise FileExistsError(f"{run.output_dir} exists: remove {out} or pass --out")
        train_run(run)
        runs.append(Path(run.output_dir))
        times[f"train {method}"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    files = {k: str(bench / v) for k, v in extra["files"].items()}
    add_task(
        runs[0],
        extra["name"],
        files.pop("train"),
        files={**files, "metric": extra["kind"], "labels": extra["labels"]},
    )
    times[f"add-task {extra['name']}"] = time.perf_counter() - t0
    for i, run_dir in enumerate(runs):
        t0 = time.perf_counter()
        evaluate_run(run_dir, with_base=i == 0, forgetting=run_dir == runs[0])
        times[f"eval {run_dir.name}"] = time.perf_counter() - t0
    table, path = compare_runs(runs, out / "compare")
    times["total"] = time.perf_counter() - start
    return {"table": table, "compare": str(path), "runs": [str(r) for r in runs], "times": times}
