"""Evaluation reports: Markdown tables and matplotlib figures.

``write_report(dir, results)`` turns ``eval/results.json`` into ``report.md``
with ``scores.png`` (each task, base vs run), ``forgetting.png`` (task score after
each stage) and ``routing.png`` (task x expert routing share).
``compare.py`` puts several runs side by side.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no screen
import matplotlib.pyplot as plt  # noqa: E402


def fmt(value, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def probe_cell(scores: dict | None, key: str, digits: int = 1) -> str:
    """A probe's value with its interval (``mmlu`` and ``mmlu_ci``), ``-`` when absent."""
    if not scores or scores.get(key) is None:
        return "-"
    ci = scores.get(f"{key}_ci")
    interval = f" [{fmt(ci[0], digits)}, {fmt(ci[1], digits)}]" if ci else ""
    return fmt(scores[key], digits) + interval


PROBES = (("mmlu", "MMLU accuracy (%)", 1), ("perplexity", "perplexity", 2))


def cell(entry: dict | None) -> str:
    """A score with its 95% interval: ``34.4 [25.0, 44.0]`` (``-`` when not scored)."""
    if not entry or entry.get("score") is None:
        return "-"
    ci = entry.get("ci")
    return fmt(entry["score"]) + (f" [{fmt(ci[0])}, {fmt(ci[1])}]" if ci else "")


def md_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def mean(values) -> float | None:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def task_entry(scores: dict, task: str, mode: str | None = None) -> dict | None:
    """A task's scores; ``mode="likelihood"``: its likelihood scores (None where absent)."""
    found = scores.get(task)
    return found.get(mode) if found and mode else found


def score_rows(results: dict, key: str = "tasks", mode: str | None = None) -> list[list[str]]:
    """Rows task | metric | base | run | change, then the average.

    ``key`` picks the run's scores (``tasks``: rows named by task; ``task_free``);
    ``mode="likelihood"`` the classification tasks' likelihood scores.
    """

    model, base = results["model"][key], (results.get("base") or {}).get("tasks", {})
    tasks = [t for t in model if task_entry(model, t, mode)]
    rows = []
    for task in tasks:
        m, b = task_entry(model, task, mode), task_entry(base, task, mode)
        delta = None if b is None else m["score"] - b["score"]
        rows.append([task, model[task]["metric"], cell(b), cell(m), fmt(delta)])
    avg_b = mean((task_entry(base, t, mode) or {}).get("score") for t in tasks) if base else None
    avg_m = mean(task_entry(model, t, mode)["score"] for t in tasks)
    delta = None if avg_b is None or avg_m is None else avg_m - avg_b
    rows.append(["**average**", "", fmt(avg_b), fmt(avg_m), fmt(delta)])
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
    rows = [
        [label, probe_cell(base, key, digits), probe_cell(model, key, digits)]
        for key, label, digits in PROBES
        if key in model
    ]
    if not rows:
        return ""
    note = f" (routed as task `{model['probe_task']}`)" if model.get("probe_task") else ""
    return f"\n## General ability{note}\n\n" + md_table(["probe", "base", "run"], rows) + "\n"


def _forgetting_section(out: Path, forgetting: dict | None) -> str:
    if not forgetting:
        return ""
    tasks, stages = forgetting["tasks"], forgetting["stages"]
    matrix = [[row[t] for t in tasks] for row in forgetting["scores"]]
    _heatmap(out / "forgetting.png", matrix, stages, tasks, "task score after each stage")
    rows = [[s, *(fmt(v) for v in r)] for s, r in zip(stages, matrix, strict=True)]
    change = ", ".join(f"{t} {v:+.1f}" for t, v in forgetting["change"].items()) or "-"
    return (
        "\n## Forgetting: each task's score after each stage\n\n"
        "Each row is the model right after that stage, computing as that stage does (a "
        "MoDULA domain stage runs its own expert at weight 1, before any router is "
        "trained); a stage that serves one task scores only that task.\n\n"
        + md_table(["after stage", *tasks], rows)
        + "\n\n**Backward transfer** (BWT) = mean over tasks of (final score - the task's "
        "score right after the stage that trained it); below 0 means later stages lost "
        f"some of what a task had learned. BWT: {fmt(forgetting['bwt'])}; per task: "
        f"{change}\n\n![forgetting](forgetting.png)\n"
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
                fmt(mean(i["entropy"] for i in infos), 3),
                fmt(mean(max(i["load"]) for i in infos), 3),
                f"{experts[top]} ({tops.count(top)}/{len(infos)})",
            ]
        )
    return (
        "\n## Router health\n\n"
        f"Routing entropy per token (max {routing['max_entropy']:.3f} = uniform over "
        f"{len(experts)} experts), the top expert's load share, and the expert most often "
        "on top, per kind of layer (mean over blocks):\n\n"
        + md_table(["layer", "entropy", "top load share", "top expert (blocks)"], rows)
        + "\n\nWhich experts each task's tokens go to (mean over layers):\n\n"
        + "![routing](routing.png)\n"
    )


def _extra_scores(results: dict) -> str:
    """Likelihood classification and, after add-task, task-free routing."""
    text = ""
    header = ["task", "metric", "base", "run", "change"]
    if any("likelihood" in r for r in results["model"]["tasks"].values()):
        text += (
            "\n## Classification by likelihood\n\nThe label with the highest "
            "log-likelihood after the prompt, whatever the model would write: a baseline "
            "for models that answer in another format.\n\n"
            + md_table(header, score_rows(results, mode="likelihood"))
            + "\n"
        )
    if results["model"].get("task_free"):
        text += (
            "\n## Task-free routing\n\nThe same test sets with no task named (what a request "
            "that names the run gets): every expert, added ones too, is routed by token. "
            "The table above names each task, so old tasks skip experts added after them."
            "\n\n" + md_table(header, score_rows(results, key="task_free")) + "\n"
        )
    return text


def write_report(out: str | Path, results: dict) -> Path:
    """Write ``report.md`` and its PNGs into ``out``; returns the report's path."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    _bar_scores(out / "scores.png", results)
    header = ["task", "metric", "base", "run", "change"]
    text = (
        f"# Evaluation of {results['run']}\n\nMethod: `{results['method']}`. "
        "Scores are in % (chrF for free text) on the test split of each task, with 95% "
        "bootstrap intervals over examples. Answers are generated greedily and compared "
        "with the reference.\n\n"
        + md_table(header, score_rows(results))
        + "\n\n![scores](scores.png)\n"
        + _extra_scores(results)
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
