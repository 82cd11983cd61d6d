"""``modulora compare``: evaluated runs side by side, with intervals, tests and costs.

Reads each run's ``eval/results.json`` and ``cost.json`` and writes ``compare.md``
and ``compare.png``:

- scores per task with 95% bootstrap intervals; a ``*`` marks a score that differs
  significantly from the first run's (paired bootstrap over the same test examples,
  p < 0.05); the average over the tasks every run has, its interval and test from the
  tasks' resamples averaged;
- the likelihood scores of classification tasks, the same way;
- general ability (MMLU, perplexity);
- training cost: parameters trained, examples, tokens, estimated FLOPs, wall time.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from .metrics import difference, interval, resample, task_seed
from .report import PROBES, cell, fmt, md_table, mean, plt, probe_cell, task_entry


def _load(run_dir: str | Path) -> dict:
    path = Path(run_dir) / "eval" / "results.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: run `modulora eval {run_dir}` first")
    results = json.loads(path.read_text(encoding="utf-8"))
    cost = Path(run_dir) / "cost.json"
    results["cost"] = json.loads(cost.read_text(encoding="utf-8")) if cost.is_file() else None
    return results


def _samples(entry: dict | None, metric: str, task: str) -> np.ndarray | None:
    if not entry or "stats" not in entry:
        return None
    return resample(metric, np.asarray(entry["stats"]), task_seed(task))


def _mark(entry, ref, samples, ref_samples) -> str:
    """``*`` when ``entry`` differs significantly from ``ref`` on the same examples."""
    if entry is None or ref is None or samples is None or ref_samples is None:
        return ""
    if entry is ref or len(entry["stats"]) != len(ref["stats"]):
        return ""
    diff = difference(entry["score"] - ref["score"], samples - ref_samples)
    return " *" if diff.significant else ""


def _score_table(
    columns: list[tuple[str, dict]], tasks: list[str], mode: str | None, ref: int
) -> str:
    """One row per task and the average; ``columns`` are (name, task scores), tested
    against column ``ref``."""
    metrics = {t: next(s[t]["metric"] for _, s in columns if t in s) for t in tasks}
    tasks = [t for t in tasks if any(task_entry(s, t, mode) for _, s in columns)]
    if not tasks:
        return ""
    rows = []
    for t in tasks:
        reference = task_entry(columns[ref][1], t, mode)
        ref_samples = _samples(reference, metrics[t], t)
        row = [t]
        for _, scores in columns:
            found = task_entry(scores, t, mode)
            mark = _mark(found, reference, _samples(found, metrics[t], t), ref_samples)
            row.append(cell(found) + mark)
        rows.append(row)
    common = [t for t in tasks if all(task_entry(s, t, mode) for _, s in columns)]
    rows.append([_average_label(common, tasks), *_averages(columns, common, mode, metrics, ref)])
    return md_table(["task", *(name for name, _ in columns)], rows)


def _average_label(common: list[str], tasks: list[str]) -> str:
    return "**average**" if common == tasks else f"**average** ({', '.join(common)})"


def _averages(columns, common: list[str], mode, metrics, ref: int) -> list[str]:
    """Each column's average over ``common`` with its interval and test vs column ``ref``."""
    if not common:
        return ["-"] * len(columns)
    values, draws = [], []
    for _, scores in columns:
        entries = [task_entry(scores, t, mode) for t in common]
        values.append(mean(e["score"] for e in entries))
        samples = [_samples(e, metrics[t], t) for e, t in zip(entries, common, strict=True)]
        draws.append(None if any(s is None for s in samples) else np.mean(samples, axis=0))
    out = []
    for i, (value, draw) in enumerate(zip(values, draws, strict=True)):
        text = fmt(value)
        if draw is not None:
            low, high = interval(draw)
            text += f" [{fmt(low)}, {fmt(high)}]"
            if i != ref and draws[ref] is not None:
                diff = difference(value - values[ref], draw - draws[ref])
                text += " *" if diff.significant else ""
        out.append(f"**{text}**")
    return out


def _cost_table(names: list[str], results: list[dict]) -> str:
    rows = []
    for name, r in zip(names, results, strict=True):
        total = (r.get("cost") or {}).get("total")
        if not total:
            rows.append([name, *["-"] * 5])
            continue
        rows.append(
            [
                name,
                f"{total.get('adapter_parameters', 0):,}",
                f"{total.get('examples', 0):,}",
                f"{total.get('tokens', 0):,}",
                f"{total.get('flops_estimate', 0):.3g}",
                f"{total.get('wall_time_s', 0):.0f}",
            ]
        )
    header = ["run", "parameters trained", "examples", "tokens", "FLOPs (est.)", "wall time (s)"]
    return md_table(header, rows)


def _plot(path: Path, columns: list[tuple[str, dict]], tasks: list[str]) -> None:
    fig, ax = plt.subplots(figsize=(1.5 * len(tasks) + 3, 3.5))
    width = 0.8 / len(columns)
    for i, (name, scores) in enumerate(columns):
        xs = [j + (i - (len(columns) - 1) / 2) * width for j in range(len(tasks))]
        entries = [scores.get(t) or {} for t in tasks]
        values = [e.get("score") or 0 for e in entries]
        errors = [
            [v - e["ci"][0] if e.get("ci") else 0 for v, e in zip(values, entries, strict=True)],
            [e["ci"][1] - v if e.get("ci") else 0 for v, e in zip(values, entries, strict=True)],
        ]
        ax.bar(xs, values, width, yerr=errors, capsize=2, label=name)
    ax.set_xticks(range(len(tasks)), tasks)
    ax.set_ylabel("score (95% interval)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def compare_runs(run_dirs: list[str | Path], out: str | Path) -> tuple[str, Path]:
    """One report of several evaluated runs; returns its Markdown and the path of ``compare.md``.

    Raises:
        FileNotFoundError: a run without ``eval/results.json``.
    """
    results = [_load(d) for d in run_dirs]
    names = [f"{Path(r['run']).name} ({r['method']})" for r in results]
    tasks = list(dict.fromkeys(t for r in results for t in r["model"]["tasks"]))
    base = next((r["base"] for r in results if r.get("base")), None)
    columns = ([("base", base["tasks"])] if base else []) + [
        (n, r["model"]["tasks"]) for n, r in zip(names, results, strict=True)
    ]
    first, ref = names[0], 1 if base else 0
    text = (
        "Scores in % (chrF for free text) with 95% bootstrap intervals over the test "
        f"examples; `*`: differs from {first} (paired bootstrap, p < 0.05).\n\n"
        + _score_table(columns, tasks, None, ref)
    )
    likelihood = _score_table(columns, tasks, "likelihood", ref)
    if likelihood:
        text += "\n\nClassification by likelihood (the most likely label):\n\n" + likelihood
    probes = []
    for key, label, digits in PROBES:
        if any(key in r["model"] for r in results):
            b = [probe_cell(base, key, digits)] if base else []
            probes.append([label, *b, *(probe_cell(r["model"], key, digits) for r in results)])
    if probes:
        header = ["probe", *(["base"] if base else []), *names]
        text += "\n\nGeneral ability:\n\n" + md_table(header, probes)
    text += "\n\nTraining cost:\n\n" + _cost_table(names, results)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    _plot(out / "compare.png", columns, tasks)
    path = out / "compare.md"
    path.write_text(f"# Runs side by side\n\n{text}\n\n![compare](compare.png)\n", "utf-8")
    return text, path
