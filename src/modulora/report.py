"""Evaluation reports: Markdown tables and matplotlib figures.

``write_report(dir, results)`` turns ``eval/results.json`` into ``report.md``
with ``scores.png`` (each task, base vs run), ``forgetting.png`` (task score after
each stage) and ``routing.png`` (task x expert routing share).
``compare_runs`` puts several runs side by side in one table and one plot.
"""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no screen
import matplotlib.pyplot as plt  # noqa: E402


def _fmt(value, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def mean(values) -> float | None:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def score_rows(results: dict) -> list[list[str]]:
    """Rows task | metric | base | run | change, then the average."""
    model, base = results["model"]["tasks"], (results.get("base") or {}).get("tasks", {})
    rows = []
    for task, r in model.items():
        b = base.get(task, {}).get("score")
        delta = None if b is None else r["score"] - b
        rows.append([task, r["metric"], _fmt(b), _fmt(r["score"]), _fmt(delta)])
    avg_b = mean(base.get(t, {}).get("score") for t in model) if base else None
    avg_m = mean(r["score"] for r in model.values())
    delta = None if avg_b is None else avg_m - avg_b
    rows.append(["**average**", "", _fmt(avg_b), _fmt(avg_m), _fmt(delta)])
    return rows


def _bar_scores(path: Path, results: dict) -> None:
    tasks = list(results["model"]["tasks"])
    run = [results["model"]["tasks"][t]["score"] for t in tasks]
    fig, ax = plt.subplots(figsize=(1.2 * len(tasks) + 2, 3.2))
    x = range(len(tasks))
    if results.get("base"):
        base = [results["base"]["tasks"][t]["score"] for t in tasks]
        ax.bar([i - 0.2 for i in x], base, 0.4, label="base", color="#999999")
        ax.bar([i + 0.2 for i in x], run, 0.4, label=results["method"], color="#3a6ea5")
        ax.legend()
    else:
        ax.bar(list(x), run, 0.6, color="#3a6ea5")
    ax.set_xticks(list(x), tasks)
    ax.set_ylabel("score")
    ax.set_title("test score per task")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _heatmap(path: Path, matrix, rows: list[str], cols: list[str], title: str, fmt=".0f") -> None:
    fig, ax = plt.subplots(figsize=(0.9 * len(cols) + 2.5, 0.45 * len(rows) + 1.5))
    data = [[float("nan") if v is None else v for v in r] for r in matrix]
    im = ax.imshow(data, cmap="viridis", aspect="auto")
    ax.set_xticks(range(len(cols)), cols, rotation=30, ha="right")
    ax.set_yticks(range(len(rows)), rows)
    for i, r in enumerate(data):
        for j, v in enumerate(r):
            if v == v:  # not NaN
                ax.text(j, i, format(v, fmt), ha="center", va="center", color="white", fontsize=8)
    fig.colorbar(im, ax=ax)
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _probe_section(results: dict) -> str:
    model, base = results["model"], results.get("base") or {}
    rows = []
    for key, label, digits in (("mmlu", "MMLU accuracy (%)", 1), ("perplexity", "perplexity", 2)):
        if key in model:
            rows.append([label, _fmt(base.get(key), digits), _fmt(model[key], digits)])
    if not rows:
        return ""
    note = f" (routed as task `{model['probe_task']}`)" if model.get("probe_task") else ""
    return f"\n## General ability{note}\n\n" + _table(["probe", "base", "run"], rows) + "\n"


def _forgetting_section(out: Path, forgetting: dict | None) -> str:
    if not forgetting:
        return ""
    tasks, stages = forgetting["tasks"], forgetting["stages"]
    matrix = [[row[t] for t in tasks] for row in forgetting["scores"]]
    _heatmap(out / "forgetting.png", matrix, stages, tasks, "task score after each stage")
    rows = [[s, *(_fmt(v) for v in r)] for s, r in zip(stages, matrix, strict=True)]
    change = ", ".join(f"{t} {v:+.1f}" for t, v in forgetting["change"].items()) or "-"
    return (
        "\n## Forgetting: each task's score after each stage\n\n"
        + _table(["after stage", *tasks], rows)
        + f"\n\nBackward transfer (mean change from the stage that trained a task to the end): "
        f"{_fmt(forgetting['bwt'])}; per task: {change}\n\n![forgetting](forgetting.png)\n"
    )


def _routing_section(out: Path, routing: dict | None) -> str:
    if not routing:
        return ""
    experts, tasks = routing["experts"], list(routing["tasks"])
    matrix = [routing["tasks"][t] for t in tasks]
    _heatmap(out / "routing.png", matrix, tasks, experts, "share of each task's routing", ".2f")
    groups: dict[str, list[dict]] = {}
    for name, info in routing["layers"].items():  # q_proj, up_proj, mlp, ... over all blocks
        groups.setdefault(name.split(".")[-1], []).append(info)
    rows = []
    for kind, infos in groups.items():
        tops = [i["load"].index(max(i["load"])) for i in infos]
        top = max(set(tops), key=tops.count)
        rows.append(
            [
                kind,
                _fmt(mean(i["entropy"] for i in infos), 3),
                _fmt(mean(max(i["load"]) for i in infos), 3),
                f"{experts[top]} ({tops.count(top)}/{len(infos)})",
            ]
        )
    return (
        "\n## Router health\n\n"
        f"Routing entropy per token (max {routing['max_entropy']:.3f} = uniform over "
        f"{len(experts)} experts), the top expert's load share, and the expert most often "
        "on top, per kind of layer (mean over blocks):\n\n"
        + _table(["layer", "entropy", "top load share", "top expert (blocks)"], rows)
        + "\n\nWhich experts each task's tokens go to (mean over layers):\n\n"
        + "![routing](routing.png)\n"
    )


def write_report(out: str | Path, results: dict) -> Path:
    """Write ``report.md`` and its PNGs into ``out``; returns the report's path."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    _bar_scores(out / "scores.png", results)
    header = ["task", "metric", "base", "run", "change"]
    text = (
        f"# Evaluation of {results['run']}\n\nMethod: `{results['method']}`. "
        "Scores are in % (chrF for free text); test split of each task.\n\n"
        + _table(header, score_rows(results))
        + "\n\n![scores](scores.png)\n"
        + _probe_section(results)
        + _forgetting_section(out, results.get("forgetting"))
        + _routing_section(out, results.get("routing"))
    )
    samples = [
        f"- **{task}**: `{s['prompt'][:80]}` -> `{s['prediction']}` (reference `{s['reference']}`)"
        for task, r in results["model"]["tasks"].items()
        for s in r["samples"][:2]
    ]
    text += "\n## Sample answers\n\n" + "\n".join(samples) + "\n"
    path = out / "report.md"
    path.write_text(text, encoding="utf-8")
    return path


def compare_runs(run_dirs: list[str | Path], out: str | Path) -> tuple[str, Path]:
    """One table and one plot of several evaluated runs (``eval/results.json`` each).

    Returns the Markdown table and the path of ``compare.md``.
    """
    results = []
    for d in run_dirs:
        path = Path(d) / "eval" / "results.json"
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: run `modulora eval {d}` first")
        results.append(json.loads(path.read_text(encoding="utf-8")))
    names = [f"{Path(r['run']).name} ({r['method']})" for r in results]
    tasks = list(dict.fromkeys(t for r in results for t in r["model"]["tasks"]))
    base = next((r["base"] for r in results if r.get("base")), None)
    header = ["task", *(["base"] if base else []), *names]
    rows = []
    for t in tasks:
        cells = [_fmt(r["model"]["tasks"].get(t, {}).get("score")) for r in results]
        rows.append([t, *([_fmt(base["tasks"].get(t, {}).get("score"))] if base else []), *cells])
    # averaged over the tasks every run was scored on, so runs compare like for like
    common = [t for t in tasks if all(t in r["model"]["tasks"] for r in results)]
    avg = [_fmt(mean(r["model"]["tasks"][t]["score"] for t in common)) for r in results]
    base_avg = [_fmt(mean(base["tasks"].get(t, {}).get("score") for t in common))] if base else []
    label = "**average**" if common == tasks else f"**average** ({', '.join(common)})"
    rows.append([label, *base_avg, *avg])
    for key, label in (("mmlu", "MMLU (%)"), ("perplexity", "perplexity")):
        if any(key in r["model"] for r in results):
            b = [_fmt(base.get(key), 2)] if base else []
            rows.append([label, *b, *(_fmt(r["model"].get(key), 2) for r in results)])
    table = _table(header, rows)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(1.5 * len(tasks) + 3, 3.5))
    series = ([("base", base["tasks"])] if base else []) + [
        (n, r["model"]["tasks"]) for n, r in zip(names, results, strict=True)
    ]
    width = 0.8 / len(series)
    for i, (name, scores) in enumerate(series):
        xs = [j + (i - (len(series) - 1) / 2) * width for j in range(len(tasks))]
        ax.bar(xs, [scores.get(t, {}).get("score") or 0 for t in tasks], width, label=name)
    ax.set_xticks(range(len(tasks)), tasks)
    ax.set_ylabel("score")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "compare.png", dpi=110)
    plt.close(fig)
    path = out / "compare.md"
    path.write_text("# Runs side by side\n\n" + table + "\n\n![compare](compare.png)\n", "utf-8")
    return table, path
