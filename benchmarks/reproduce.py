"""MoDULA's claims, measured as the paper states them, on the embedded model and real data.

    python benchmarks/reproduce.py                      # 2 seeds, the default budget
    python benchmarks/reproduce.py --seeds 0 --scale 2  # quicker, smaller

For every seed: LoRA, MoLoRA, MoDULA-Flan and MoDULA-Res on SmolLM2-135M-Instruct and
the mini-benchmark (``modulora data build``), each with the same optimizer steps x batch
and the same total rank (48: LoRA r48; MoLoRA 6 x r8; MoDULA a universal r16 and four
domain experts r8); every run evaluated on the full test splits (and the base model
once). Then ``translate`` is added to a copy of the MoDULA-Res run with ``add-task``
(the paper's router stage: every routing row, old and new data, no task ids) and
evaluated again, named and task-free. Writes ``benchmarks/REPRODUCE.md`` (+ PNGs):

- Table 1 analogue: each task's score and the average, generated answers and
  classification by likelihood, seeds pooled, 95% bootstrap intervals; MoDULA-Res
  against every other method by paired bootstrap;
- Table 3 analogue: general ability (MMLU by likelihood, held-out perplexity) vs base;
- Table 4 analogue: adding a task: the old tasks before and after, named and
  task-free, the new task, and the addition's cost against three retrains;
- the training cost of each method side by side.

Runs are reused when their folder is complete, so an interrupted run resumes where it
stopped (delete ``--out`` to start over).
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import sys
import time
from datetime import date
from pathlib import Path

import numpy as np
import yaml

from modulora.add_task import add_task
from modulora.benchmark import MANIFEST, build_benchmark
from modulora.eval_run import evaluate_run
from modulora.metrics import aggregate, difference, interval, resample, task_seed
from modulora.models.embedded import resolve
from modulora.quickstart import STAGE_STEPS, run_config
from modulora.recipe import train_run
from modulora.report import fmt, md_table, plt
from modulora.run_config import load_run_config

METHODS = ["lora", "molora", "modula-flan", "modula-res"]
ADAPTERS = {  # the same total rank, 48, for every method
    "lora": {"rank": 48},
    "molora": {"rank": 8, "num_experts": 6},
    "modula-flan": {"rank": 8, "universal_rank": 16},
    "modula-res": {"rank": 8, "universal_rank": 16},
}
ADDED = "modula-res+translate"
# A longer budget than the quickstart's: its constant 3e-3 made LoRA r48 diverge here
# (its validation loss fell, then rose back to 2.0 and its perplexity exploded), so every
# method gets the library's default cosine schedule with warmup, from 1e-3.
TRAIN = {"lr": 1.0e-3, "schedule": "cosine", "warmup_ratio": 0.03}


def _results(run_dir: Path) -> dict:
    return json.loads((run_dir / "eval" / "results.json").read_text())


def run_seed(seed: int, args, model_dir: Path, bench: Path) -> dict[str, Path]:
    """Train and evaluate every method for one seed (complete runs are reused)."""
    out = Path(args.out).resolve() / f"seed{seed}"  # the YAML files hold absolute paths
    steps = {k: v * args.scale for k, v in STAGE_STEPS.items()}
    dirs = {}
    for i, method in enumerate(args.methods):
        cfg = run_config(
            method, model_dir, bench, out, steps,
            train={"seed": seed, **TRAIN}, adapter=ADAPTERS[method],
            eval={"max_examples": args.test_examples},
        )  # fmt: skip
        path = out / f"{method}.yaml"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(yaml.safe_dump(cfg, sort_keys=False))
        run = load_run_config(path)
        dirs[method] = Path(run.output_dir)
        if not (dirs[method] / "cost.json").is_file():
            shutil.rmtree(dirs[method], ignore_errors=True)  # an interrupted run: start over
            train_run(run)
        if not (dirs[method] / "eval" / "results.json").is_file():
            evaluate_run(dirs[method], with_base=i == 0, forgetting=False)
    if "modula-res" in dirs:
        dirs[ADDED] = _add_translate(dirs["modula-res"], bench)
    return dirs


def _add_translate(source: Path, bench: Path) -> Path:
    """``translate`` added to a copy of the MoDULA-Res run, the paper's way, evaluated."""
    target = source.parent / ADDED
    if (target / "eval" / "results.json").is_file():
        return target
    shutil.rmtree(target, ignore_errors=True)
    shutil.copytree(source, target)
    shutil.rmtree(target / "eval")
    spec = json.loads((bench / MANIFEST).read_text())
    extra = next(t for t in spec["tasks"].values() if t["role"] == "add-task")
    files = {k: str(bench / v) for k, v in extra["files"].items()}
    add_task(
        target,
        extra["name"],
        files.pop("train"),
        files={**files, "metric": extra["kind"], "labels": extra["labels"]},
    )
    evaluate_run(target, with_base=True, forgetting=False)  # the base on the new task too
    return target


# --- pooling seeds -------------------------------------------------------------------------


def _pooled(entries: list[dict | None], metric: str, task: str) -> dict | None:
    """One score over every seed's examples, with its interval and resamples."""
    if not entries or any(e is None or "stats" not in e for e in entries):
        return None
    stats = np.concatenate([np.asarray(e["stats"], dtype=float) for e in entries])
    samples = resample(metric, stats, task_seed(task))
    return {
        "score": aggregate(metric, stats),
        "ci": interval(samples),
        "samples": samples,
        "seeds": [e["score"] for e in entries],
    }


def _task_entries(all_results, method, task, key="tasks", mode=None):
    out = []
    for results in all_results:
        part = results[method]["model"].get(key) or {}
        entry = part.get(task)
        out.append(entry.get(mode) if entry and mode else entry)
    return out


def _cell(p: dict | None, digits: int = 1) -> str:
    if p is None:
        return "-"
    seeds = ", ".join(fmt(s, digits) for s in p["seeds"])
    low, high = (fmt(v, digits) for v in p["ci"])
    return f"{fmt(p['score'], digits)} [{low}, {high}] ({seeds})"


def _vs(a: dict | None, b: dict | None) -> str:
    """A - B with its paired interval and whether it is significant."""
    if a is None or b is None:
        return "-"
    d = difference(a["score"] - b["score"], a["samples"] - b["samples"])
    mark = "significant" if d.significant else "not significant"
    return f"{d.delta:+.1f} [{d.low:+.1f}, {d.high:+.1f}], p = {d.p_value:.3f}, {mark}"


def _average(parts: list[dict | None]) -> dict | None:
    if not parts or any(p is None for p in parts):
        return None
    samples = np.mean([p["samples"] for p in parts], axis=0)
    seeds = np.mean([p["seeds"] for p in parts], axis=0).tolist()
    return {
        "score": float(np.mean([p["score"] for p in parts])),
        "ci": interval(samples),
        "samples": samples,
        "seeds": seeds,
    }


def table1(all_results, methods, tasks, metrics, mode=None) -> tuple[str, dict]:
    """Scores per task (seeds pooled) and the average; returns the table and the pools."""
    pools = {}
    for m in ["base", *methods]:
        for t in tasks:
            if m == "base":
                entries = [r[methods[0]]["base"]["tasks"].get(t) for r in all_results]
                entries = [e.get(mode) if e and mode else e for e in entries]
            else:
                entries = _task_entries(all_results, m, t, mode=mode)
            pools[m, t] = _pooled(entries, metrics[t], t)
        pools[m, "average"] = _average([pools[m, t] for t in tasks])
    rows = [[t, *(_cell(pools[m, t]) for m in ["base", *methods])] for t in [*tasks, "average"]]
    return md_table(["task", "base", *methods], rows), pools


def _probe_pool(all_results, method: str, key: str, first: str) -> dict | None:
    """A probe pooled over seeds; ``method="base"`` reads the base scored with ``first``."""
    metric = "exact" if key == "mmlu" else "perplexity"
    parts = [r[first]["base"] if method == "base" else r[method]["model"] for r in all_results]
    entries = [
        {"stats": p[f"{key}_stats"], "score": p[key]} if f"{key}_stats" in p else None
        for p in parts
    ]
    return _pooled(entries, metric, key)


# --- the page --------------------------------------------------------------------------------


def _plot_scores(path: Path, pools, methods, tasks) -> None:
    fig, ax = plt.subplots(figsize=(2 + 1.6 * (len(tasks) + 1), 3.6))
    names = ["base", *methods]
    width = 0.8 / len(names)
    for i, m in enumerate(names):
        xs = [j + (i - (len(names) - 1) / 2) * width for j in range(len(tasks) + 1)]
        parts = [pools[m, t] for t in [*tasks, "average"]]
        values = [p["score"] if p else 0 for p in parts]
        errors = [
            [v - p["ci"][0] if p else 0 for v, p in zip(values, parts, strict=True)],
            [p["ci"][1] - v if p else 0 for v, p in zip(values, parts, strict=True)],
        ]
        ax.bar(xs, values, width, yerr=errors, capsize=2, label=m)
    ax.set_xticks(range(len(tasks) + 1), [*tasks, "average"])
    ax.set_ylabel("score (%), 95% interval")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_costs(path: Path, rows: list[tuple[str, dict]]) -> None:
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
    labels = [name for name, _ in rows]
    for ax, key, title in (
        (axes[0], "flops_estimate", "training FLOPs (estimated)"),
        (axes[1], "wall_time_s", "training wall time (s)"),
    ):
        ax.bar(range(len(rows)), [c.get(key) or 0 for _, c in rows], color="#3a6ea5")
        ax.set_xticks(range(len(rows)), labels, rotation=25, ha="right", fontsize=8)
        ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _mean_cost(runs: list[Path]) -> dict:
    totals = [json.loads((r / "cost.json").read_text())["total"] for r in runs]
    return {k: float(np.mean([t.get(k, 0) for t in totals])) for k in totals[0]}


def write_page(args, seeds_dirs: list[dict[str, Path]], bench: Path, minutes: float) -> Path:
    methods = [m for m in args.methods if m in seeds_dirs[0]]
    all_results = [{m: _results(d[m]) for m in [*methods, ADDED] if m in d} for d in seeds_dirs]
    spec = json.loads((bench / MANIFEST).read_text())
    tasks = [n for n, t in spec["tasks"].items() if t["role"] == "domain"]
    metrics = {n: t["kind"] for n, t in spec["tasks"].items()}
    out = Path(args.page)
    figures = out.parent / "reproduce"
    figures.mkdir(parents=True, exist_ok=True)

    t1, pools = table1(all_results, methods, tasks, metrics)
    classification = [t for t in tasks if metrics[t] == "classification"]
    t1_lik, lik = table1(all_results, methods, classification, metrics, mode="likelihood")
    _plot_scores(figures / "scores.png", pools, methods, tasks)
    ref = "modula-res" if "modula-res" in methods else methods[-1]
    versus = [
        [f"{ref} - {m}", _vs(pools[ref, "average"], pools[m, "average"]),
         _vs(lik[ref, "average"], lik[m, "average"])]
        for m in ["base", *methods] if m != ref
    ]  # fmt: skip

    probe_rows = []
    for key, label, digits in (("mmlu", "MMLU accuracy (%)", 1), ("perplexity", "perplexity", 2)):
        pooled = [_probe_pool(all_results, m, key, methods[0]) for m in ["base", *methods]]
        cells = [_cell(p, digits) for p in pooled]
        probe_rows.append([label, *cells])

    text = [
        "# MoDULA's claims, measured",
        "",
        f"Written by `{' '.join(['python benchmarks/reproduce.py', *sys.argv[1:]])}`"
        f" on {date.today().isoformat()}, {platform.machine()} CPU, "
        f"{len(seeds_dirs)} seed(s), {minutes:.0f} minutes in all.",
        "",
        f"Model: {args.model}. Data: the mini-benchmark (`modulora data build`), "
        f"{args.test_examples} test examples per task. Training: AdamW, lr "
        f"{TRAIN['lr']:g}, {TRAIN['schedule']} schedule, {TRAIN['warmup_ratio']:g} warmup. "
        "Budget per method: "
        f"{sum(STAGE_STEPS.values()) * args.scale + 3 * STAGE_STEPS['domain'] * args.scale} "
        "optimizer steps of batch 4 (MoDULA: "
        + ", ".join(f"{k} {v * args.scale}" for k, v in STAGE_STEPS.items())
        + " steps per stage), top 10 of 30 blocks adapted, total rank 48 for every method "
        "(LoRA r48, MoLoRA 6 x r8, MoDULA universal r16 + 4 domains x r8). Scores pool "
        "the seeds' test examples; brackets are 95% bootstrap intervals, then each seed's "
        "score.",
        "",
        "## Table 1 analogue: task scores",
        "",
        "Generated answers (exact match, accuracy; %):",
        "",
        t1,
        "",
        "Classification by likelihood (the most likely label; %):",
        "",
        t1_lik,
        "",
        f"{ref} against each other system, on the average (paired bootstrap over the same "
        "test examples):",
        "",
        md_table(["difference", "generated answers", "likelihood"], versus),
        "",
        "![scores](reproduce/scores.png)",
        "",
        "## Table 3 analogue: general ability",
        "",
        md_table(["probe", "base", *methods], probe_rows),
        "",
    ]
    text += _table4(all_results, seeds_dirs, tasks, metrics)
    text += _cost_section(seeds_dirs, methods, figures)
    if args.notes and Path(args.notes).is_file():
        text += ["## What the numbers show", "", Path(args.notes).read_text().strip(), ""]
    out.write_text("\n".join(text) + "\n", encoding="utf-8")
    return out


def _table4(all_results, seeds_dirs, tasks, metrics) -> list[str]:
    if not all(ADDED in r for r in all_results):
        return []
    rows = []
    for t in tasks:
        before = _pooled(_task_entries(all_results, "modula-res", t), metrics[t], t)
        named = _pooled(_task_entries(all_results, ADDED, t), metrics[t], t)
        free = _pooled(_task_entries(all_results, ADDED, t, key="task_free"), metrics[t], t)
        rows.append([t, _cell(before), _cell(named), _cell(free), _vs(free, before)])
    new = next(n for n in metrics if n not in tasks)
    base_new = _pooled([r[ADDED].get("base", {}).get("tasks", {}).get(new) for r in all_results],
                       metrics[new], new)  # fmt: skip
    added_new = _pooled(_task_entries(all_results, ADDED, new), metrics[new], new)
    reports = [json.loads((d[ADDED] / f"add-task-{new}.json").read_text()) for d in seeds_dirs]
    cost_rows = []
    for name in reports[0]["comparators"]:
        comp = reports[0]["comparators"][name]
        shares = {
            k: float(np.mean([r["addition_share"][name][k] for r in reports]))
            for k in ("parameters_trained", "examples", "tokens", "flops_estimate")
        }
        cost_rows.append(
            [comp["what"], *(f"{100 * shares[k]:.1f}%" for k in shares),
             f"{100 * (1 - shares['flops_estimate']):.1f}%"]
        )  # fmt: skip
    return [
        "## Table 4 analogue: adding a task",
        "",
        f"`{new}` added to the MoDULA-Res run with `add-task` (the paper's router stage: "
        "every routing row retrained on old and new data, no task ids). Old tasks: "
        "before the addition, after it named (each routed over the experts it was trained "
        "with) and after it task-free (routed over every expert, as the paper's model and "
        "a request naming the run are); the change is task-free after minus before.",
        "",
        md_table(["old task", "before", "after (named)", "after (task-free)", "change"], rows),
        "",
        f"The new task `{new}` ({metrics[new]}): base {_cell(base_new)} -> "
        f"{_cell(added_new)} after the addition."
        if base_new
        else f"The new task `{new}` ({metrics[new]}): {_cell(added_new)} after the addition.",
        "",
        "The addition's cost as a share of each retrain of every task (mean over seeds; the "
        "last column is the saving in FLOPs):",
        "",
        md_table(
            ["retrain", "parameters", "examples", "tokens", "FLOPs", "FLOPs saved"], cost_rows
        ),  # fmt: skip
        "",
    ]


def _cost_section(seeds_dirs, methods, figures: Path) -> list[str]:
    rows, plotted = [], []
    for m in [*methods, ADDED]:
        if m not in seeds_dirs[0]:
            continue
        cost = _mean_cost([d[m] for d in seeds_dirs])
        if m == ADDED:  # the addition alone: its own stages
            reports = [
                json.loads(next((d[m]).glob("add-task-*.json")).read_text())["addition"]
                for d in seeds_dirs
            ]
            cost = {k: float(np.mean([r[k] for r in reports])) for k in reports[0]}
            cost["adapter_parameters"] = cost["parameters_trained"]
            m = "add-task translate"
        rows.append([m, f"{cost.get('adapter_parameters', 0):,.0f}", f"{cost['examples']:,.0f}",
                     f"{cost['tokens']:,.0f}", f"{cost['flops_estimate']:.3g}",
                     f"{cost['wall_time_s']:.0f}"])  # fmt: skip
        plotted.append((m, cost))
    _plot_costs(figures / "costs.png", plotted)
    header = ["run", "parameters trained", "examples", "tokens", "FLOPs (est.)", "wall time (s)"]
    return [
        "## Training cost side by side",
        "",
        "Mean over seeds, from each run's `cost.json` (the add-task row: the addition's "
        "own stages).",
        "",
        md_table(header, rows),
        "",
        "![costs](reproduce/costs.png)",
        "",
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--scale", type=int, default=4, help="x the quickstart's stage steps")
    parser.add_argument("--methods", nargs="+", default=METHODS, choices=METHODS)
    parser.add_argument("--test-examples", type=int, default=100)
    parser.add_argument("--out", default="runs/reproduce")
    parser.add_argument("--page", default=str(Path(__file__).parent / "REPRODUCE.md"))
    parser.add_argument("--notes", help="a Markdown file: what the numbers show")
    args = parser.parse_args()
    start = time.perf_counter()
    model_dir, bench = resolve(args.model), build_benchmark()
    dirs = []
    for seed in args.seeds:
        t0 = time.perf_counter()
        dirs.append(run_seed(seed, args, model_dir, bench))
        print(f"seed {seed}: {(time.perf_counter() - t0) / 60:.1f} min", flush=True)
    page = write_page(args, dirs, bench, (time.perf_counter() - start) / 60)
    print(f"written: {page}")


if __name__ == "__main__":
    main()
