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
from .compare import compare_runs
from .eval_run import evaluate_run
from .models.embedded import resolve
from .recipe import train_run
from .report import cell
from .run_config import load_run_config

# The budget that fits 10 minutes on 2 CPU cores for SmolLM2-135M (see the README for
# the measured time). Every method gets the same number of optimizer steps of the same
# batch; MoDULA spends them across its stages. A high constant learning rate because
# each stage has only a few steps: MoDULA-Res domain experts read the universal
# expert's output, which is small after a short universal stage.
STAGE_STEPS = {"universal": 10, "domain": 8, "router": 6}
TRAIN = {
    "batch_size": 4,
    "lr": 3.0e-3,
    "schedule": "constant",
    "max_length": 160,
    "precision": "auto",
    "warmup_ratio": 0.0,
    "eval_every": 0,
    "save_every": 0,
    "seed": 0,
}
DATA = {"max_valid_examples": 12, "system_prompt": ""}  # no default system turn: ~30% fewer tokens
EVAL = {
    "max_examples": 100,  # the whole test split of every benchmark task
    "max_new_tokens": 6,
    "probe_examples": 100,
    "text_examples": 30,
    "forgetting_examples": 8,
}
TOP_LAYERS = 10  # adapt the top blocks only: backward stops there, ~2x faster on CPU


def run_config(
    method: str,
    model_dir: Path,
    bench: Path,
    out: Path,
    stage_steps: dict[str, int] | None = None,
    **sections: dict,
) -> dict:
    """The YAML of one quickstart run (plain data, written next to the run).

    ``stage_steps`` replaces ``STAGE_STEPS`` (joint methods get their sum, with four
    domains); ``sections`` (``train``, ``adapter``, ``eval``, ...) update those keys.
    """
    steps = stage_steps or STAGE_STEPS
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
            "target_modules": "all-linear",
            "layers_to_transform": list(range(-TOP_LAYERS, 0)),
        },
        "data": dict(DATA),
        "train": dict(TRAIN),
        "eval": {
            **EVAL,
            "mmlu": str(bench / probes["mmlu"]["file"]),
            "text": str(bench / probes["text"]["file"]),
        },
        "output_dir": str(out / method),
    }
    for key, values in sections.items():
        cfg[key] = {**cfg.get(key, {}), **values}
    if method.startswith("modula"):
        cfg["universal"] = {k: str(bench / v) for k, v in spec["universal"]["files"].items()}
        cfg["stages"] = {k: {"max_steps": v} for k, v in steps.items()}
    else:
        cfg["train"]["max_steps"] = (
            steps["universal"] + len(tasks) * steps["domain"] + steps["router"]
        )
    return cfg


def quickstart(
    out: str | Path = "runs/quickstart", model: str = "smollm2-135m", full: bool = False
) -> dict:
    """Run the whole demonstration into ``out``; returns timings and the comparison path."""
    out = Path(out).resolve()  # the YAML files hold absolute paths
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
    name = extra["name"]
    before = evaluate_run(  # the old tasks' answers, as the after-table compares them
        runs[0],
        probes=False,
        forgetting=False,
        overrides=["eval.likelihood=false"],
        out_name=f"eval-before-{name}",
    )
    files = {k: str(bench / v) for k, v in extra["files"].items()}
    cost = add_task(
        runs[0],
        name,
        files.pop("train"),
        files={**files, "metric": extra["kind"], "labels": extra["labels"]},
        router="new",  # old tasks keep their routing; only the new expert's row learns
    )
    times[f"add-task {name} (+ eval before)"] = time.perf_counter() - t0
    results = []
    for i, run_dir in enumerate(runs):
        t0 = time.perf_counter()
        results.append(evaluate_run(run_dir, with_base=i == 0, forgetting=False))
        times[f"eval {run_dir.name}"] = time.perf_counter() - t0
    table, path = compare_runs(runs, out / "compare")
    times["total"] = time.perf_counter() - start
    return {
        "table": table,
        "added": added_task_rows(before, results[0], cost),
        "compare": str(path),
        "runs": [str(r) for r in runs],
        "times": times,
    }


ADDED_HEADER = ["old task", "before", "after (named)", "after (task-free)", "change (task-free)"]


def added_task_rows(before: dict, after: dict, cost: dict) -> list[list[str]]:
    """What adding a task changed: old tasks' scores before and after, named (routed over
    the experts they were trained with) and task-free (routed over every expert, as a
    request naming the run), then the addition's cost as a share of each retrain."""
    rows = []
    free = after["model"].get("task_free") or after["model"]["tasks"]
    for task, was in before["model"]["tasks"].items():
        named, unnamed = after["model"]["tasks"][task], free[task]
        change = unnamed["score"] - was["score"]
        rows.append([task, cell(was), cell(named), cell(unnamed), f"{change:+.1f}"])
    for name, comp in cost["comparators"].items():
        share = cost["addition_share"][name]
        rows.append(
            [
                f"cost vs {comp['what']}",
                f"{100 * share['parameters_trained']:.1f}% of parameters",
                f"{100 * share['examples']:.1f}% of examples",
                f"{100 * share['tokens']:.1f}% of tokens",
                f"{100 * share['flops_estimate']:.1f}% of FLOPs",
            ]
        )
    return rows
