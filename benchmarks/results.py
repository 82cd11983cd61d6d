"""RESULTS.md and results.png for benchmarks/run_all.py: tables, targets, one figure."""

from __future__ import annotations

import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def _train_table(rows: dict, rss: bool) -> list[str]:
    r8, r16 = rows["PEFT LoRA r8"]["tokens_s"], rows["PEFT LoRA r16"]["tokens_s"]
    r64 = rows.get("PEFT LoRA r64")
    head = "| configuration | tokens/s | vs PEFT r8 | vs PEFT r16 | training MiB |"
    line = "|---|---:|---:|---:|---:|"
    if r64:
        head, line = head + " vs PEFT r64 |", line + "---:|"
    if rss:
        head, line = head + " peak RSS MiB |", line + "---:|"
    out = [head, line]
    for name, m in rows.items():
        cells = [
            name,
            f"{m['tokens_s']:.0f}",
            f"{m['tokens_s'] / r8:.2f}x",
            f"{m['tokens_s'] / r16:.2f}x",
            f"{m['train_mib']:.0f}",
        ]
        if r64:
            cells.append(f"{m['train_mib'] / r64['train_mib']:.2f}x")
        if rss:
            cells.append(f"{m['rss_mib']:.0f}")
        out.append("| " + " | ".join(cells) + " |")
    return out


def targets(train: dict, scaling: dict, generation: list) -> list[tuple[str, float, str, bool]]:
    """(target, measured, bar, met) for each target of the performance issue."""
    tps = {k: v["tokens_s"] for k, v in train.items()}
    r8, r16 = tps["PEFT LoRA r8"], tps["PEFT LoRA r16"]
    lat = {(n, b): t for n, b, t in generation}
    merged = max(lat[("merged task (cgc-lora)", b)] / lat[("base", b)] for b in (1, 8))
    res = tps["modulora modula-res u16+4 x r8 (router)"]
    lora, molora = tps["modulora lora r8"], tps["modulora molora 8 x r8"]
    fall = 1 - scaling["molora 16 x r8"]["tokens_s"] / scaling["molora 1 x r8"]["tokens_s"]
    mem = train["modulora molora 8 x r8"]["train_mib"] / train["PEFT LoRA r64"]["train_mib"]
    at_least, at_most = (lambda v, b: v >= b), (lambda v, b: v <= b)
    rows = [
        ("lora r8 tokens/s vs PEFT LoRA r8", lora / r8, at_least, 1.1, ">= 1.10x"),
        ("molora 8 x r8 tokens/s vs PEFT LoRA r8", molora / r8, at_least, 0.9, ">= 0.90x"),
        ("modula-res router stage vs PEFT LoRA r16", res / r16, at_least, 0.9, ">= 0.90x"),
        ("molora 8 x r8 training memory vs PEFT LoRA r64", mem, at_most, 1.2, "<= 1.20x"),
        ("merged task generation latency vs base (worst batch)", merged, at_most, 1.03, "<= 1.03x"),
        ("tokens/s lost from 1 to 16 experts", fall, lambda v, b: v < b, 0.25, "< 25%"),
    ]  # fmt: skip
    return [(name, value, bar, ok(value, limit)) for name, value, ok, limit, bar in rows]


def plot(path: Path, train: dict, scaling: dict, generation: list) -> None:
    fig, axes = plt.subplots(1, 3, figsize=(16, 5))
    names = list(train)
    short = [n.replace("modulora ", "").replace(" (router)", "\n(router)") for n in names]
    base = train["PEFT LoRA r8"]
    ax = axes[0]
    ax.barh(short, [train[n]["tokens_s"] / base["tokens_s"] for n in names], color="tab:blue")
    ax.axvline(1.0, color="gray", ls="--")
    ax.set_xlabel("training tokens/s vs PEFT LoRA r8")
    ax.invert_yaxis()
    ax = axes[1]
    ax.barh(short, [train[n]["train_mib"] for n in names], color="tab:orange")
    ax.set_xlabel("training memory (MiB: params, grads, AdamW, saved)")
    ax.set_yticks([])
    ax.invert_yaxis()
    ax = axes[2]
    experts = [int(k.split()[1]) for k in scaling]
    ax.plot(experts, [v["tokens_s"] for v in scaling.values()], "o-", label="molora r8")
    ax.axhline(base["tokens_s"], color="gray", ls="--", label="PEFT LoRA r8")
    ax.set_xscale("log", base=2)
    ax.set_xticks(experts, [str(e) for e in experts])
    ax.set_xlabel("experts")
    ax.set_ylabel("training tokens/s")
    ax.legend()
    fig.suptitle("modulora vs PEFT LoRA (CPU, fp32; medians of interleaved rounds)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_results(out: Path, args, machine: str, train, scaling, generation, embedded) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    plot(out / "results.png", train, scaling, generation)
    lines = [
        "# modulora benchmarks",
        "",
        f"Written by `python benchmarks/run_all.py` on {time.strftime('%Y-%m-%d')}: {machine}.",
        f"Random Llama, hidden {args.hidden}, {args.layers} layers, vocab {args.vocab}, all "
        f"projections adapted, batch {args.batch} x {args.seq}, fp32, AdamW; medians of "
        f"{args.rounds} interleaved rounds, ratios measured in the same process.",
        "",
        "![results](results.png)",
        "",
        "## Targets",
        "",
        "| target | measured | bar | met |",
        "|---|---:|---:|:---:|",
    ]
    for name, value, bar, met in targets(train, scaling, generation):
        shown = f"{100 * value:.1f}%" if bar.endswith("%") else f"{value:.3f}x"
        lines.append(f"| {name} | {shown} | {bar} | {'yes' if met else '**no**'} |")
    lines += ["", "## Training", "", *_train_table(train, rss=True), ""]
    lines += ["## Scaling with the number of experts (molora r8)", ""]
    lines += ["| experts | tokens/s | vs 1 expert |", "|---:|---:|---:|"]
    one = scaling["molora 1 x r8"]["tokens_s"]
    for name, m in scaling.items():
        lines.append(f"| {name.split()[1]} | {m['tokens_s']:.0f} | {m['tokens_s'] / one:.2f}x |")
    lines += ["", f"## Greedy generation ({args.new_tokens} new tokens, prompt 64, KV cache)", ""]
    lines += ["| configuration | batch | latency (s) | vs base |", "|---|---:|---:|---:|"]
    base = {b: t for n, b, t in generation if n == "base"}
    for name, b, t in sorted(generation, key=lambda r: r[1]):
        lines.append(f"| {name} | {b} | {t:.3f} | {t / base[b]:.3f}x |")
    if embedded:
        lines += ["", "## Embedded SmolLM2-135M (batch 4 x 64, 3 rounds)", ""]
        lines += _train_table(embedded, rss=False)
    else:
        why = "--quick" if args.quick else "not cached; run `modulora quickstart` once"
        lines += ["", f"(SmolLM2-135M section skipped: {why}.)"]
    path = out / "RESULTS.md"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    print("\n".join(lines))
    return path
