"""Write the toy task data the example configs use (run from the repository root).

    python examples/data/make_toy_data.py

Four string-rewriting tasks (one JSONL file each, prompt/response records), a
general instruction mix for MoDULA's universal stage, plain text for MoE-CT, and
a fifth task to try `modulora add-task` with. Small on purpose: the examples show
the plan and the run folder in seconds on a CPU; real data comes with your own
files (same formats, see the README).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

HERE = Path(__file__).parent
WORDS = ["apple", "river", "stone", "cloud", "maple", "tiger", "lemon", "piano", "orbit", "candle"]
TASKS = {
    "reverse": ("Reverse the word", lambda w: w[::-1]),
    "upper": ("Write the word in capitals", str.upper),
    "first": ("Give the first letter", lambda w: w[0]),
    "length": ("How many letters", lambda w: str(len(w))),
    "double": ("Double every letter", lambda w: "".join(c * 2 for c in w)),  # for add-task
}


def task_records(task: str, n: int, rng: random.Random) -> list[dict]:
    instruction, rewrite = TASKS[task]
    words = (rng.choice(WORDS) + rng.choice(WORDS)[: rng.randint(0, 3)] for _ in range(n))
    return [{"task": task, "prompt": f"{instruction}: {w}", "response": rewrite(w)} for w in words]


def write(name: str, rows: list[dict]) -> None:
    (HERE / name).write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


def main() -> None:
    rng = random.Random(0)
    for task in TASKS:
        write(f"{task}.jsonl", task_records(task, 200, rng))
    general = [
        {"prompt": r["prompt"], "response": r["response"]}
        for task in ("reverse", "upper", "first", "length")
        for r in task_records(task, 40, rng)
    ]
    rng.shuffle(general)
    write("general.jsonl", general)
    text = [
        {"text": f"The {a} and the {b} met by the {c}."}
        for a, b, c in (rng.sample(WORDS, 3) for _ in range(300))
    ]
    write("text.jsonl", text)


if __name__ == "__main__":
    main()
