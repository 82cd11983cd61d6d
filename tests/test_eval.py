"""Evaluation: metrics, probes, router health, the forgetting matrix, reports, compare."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from tiny import chat_prompt, model_dir, records, tokenizer, write_jsonl, write_run

import modulora
from modulora.cli import main
from modulora.eval_run import model_after
from modulora.evaluate import mmlu_accuracy, perplexity, prompt_ids, router_health
from modulora.generate import load_run
from modulora.records import Record
from modulora.runs import RunFolder

TRAIN = {"lr": 1e-2, "max_steps": 4, "max_length": 40}
EVAL = {"max_examples": 6, "max_new_tokens": 4, "forgetting_examples": 3, "probe_examples": 6}


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    return model_dir(tmp_path_factory.mktemp("model") / "tiny-llama")


def test_prompt_ids_are_the_masked_prefix():
    tok = tokenizer(chat=True)
    rec = Record(task="t", kind="prompt", prompt="reverse: abc", response="cba", where="x:1")
    ids = prompt_ids(rec, tok)
    text = tok.decode(ids)
    assert text.endswith("<|assistant|>") and "reverse: abc" in text and "cba" not in text


def test_probes_match_direct_computation(model_path):
    base, tok = modulora.models.load_base(str(model_path))
    texts = ["the quick brown fox", "jumps over the lazy dog and more"]
    ppl = perplexity(base, tok, texts)
    losses, counts = 0.0, 0
    for t in texts:  # one text at a time, no padding
        ids = tok(t, add_special_tokens=False, return_tensors="pt")["input_ids"]
        logits = base(input_ids=ids).logits[:, :-1]
        losses += float(
            F.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="sum").detach()
        )
        counts += ids.shape[1] - 1
    assert ppl == pytest.approx(math.exp(losses / counts), rel=1e-4)
    words = ["the", "quick", "brown", "fox", "jumps", "over", "the", "lazy", "dog"]
    questions = [
        {"question": " ".join(words[i:]), "choices": ["a", "b", "c", "d"], "answer": i % 4}
        for i in range(8)
    ]
    letters = [tok(f" {c}", add_special_tokens=False)["input_ids"][-1] for c in "ABCD"]
    right = 0
    for q in questions:  # one question at a time, no padding, prompt written out by hand
        text = f"Question: {q['question']}\nA. a\nB. b\nC. c\nD. d\nAnswer:"
        ids = tok(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            right += int(base(input_ids=ids).logits[0, -1, letters].argmax()) == q["answer"]
    assert mmlu_accuracy(base, tok, questions, batch_size=8) == 100.0 * right / len(questions)


def test_router_health_shares(model_path, tmp_path):
    base, tok = modulora.models.load_base(str(model_path))
    model = modulora.attach(
        base, modulora.MixtureConfig(method="molora", tasks=["reverse", "upper"], num_experts=3)
    )
    recs = [
        Record(t, "prompt", prompt=r["prompt"], response=r["response"], where="x")
        for t in ("reverse", "upper")
        for r in records(t, 3)
    ]
    health = router_health(model, tok, recs, batch_size=4)
    assert health["experts"] == ["expert:0", "expert:1", "expert:2"]
    assert set(health["tasks"]) == {"reverse", "upper"}
    for shares in [*health["tasks"].values(), *(i["load"] for i in health["layers"].values())]:
        assert sum(shares) == pytest.approx(1.0, abs=1e-5)
    assert all(0 < i["entropy"] <= health["max_entropy"] + 1e-6 for i in health["layers"].values())
    lora = modulora.attach(model.detach(), modulora.MixtureConfig(method="lora"))
    assert router_health(lora, tok, recs) is None  # no token router, nothing to report


def _snapshot_logits(model, ids, task=None):
    with torch.no_grad():
        return model(input_ids=ids, task=task).logits


def test_forgetting_matrix_rebuilds_each_stage(tmp_path, model_path):
    """Row k of the forgetting matrix is the model saved after stage k, computing as that
    stage does (a domain stage: its expert at weight 1, not the untrained router)."""
    config = write_run(tmp_path, "modula-res", model_path, train=TRAIN, eval=EVAL)
    run = tmp_path / "run"
    ids = torch.randint(0, 300, (2, 9), generator=torch.Generator().manual_seed(0))
    stages = [("universal", None), ("domain:reverse", "reverse"), ("domain:upper", "upper")]
    logits = []
    for stage, task in [*stages, ("router", None)]:
        assert main(["train", str(config), "--stage", stage]) == 0
        base, _ = modulora.models.load_base(str(model_path))
        trained = modulora.load(base, run)
        trained.set_stage(stage)
        logits.append(_snapshot_logits(trained, ids, task))
    folder = RunFolder(run)
    keys = folder.state()["stages_done"]
    base, _ = modulora.models.load_base(str(model_path))
    for k, (_, task) in enumerate([*stages, ("router", None)]):
        rebuilt = model_after(folder, keys[: k + 1], base, seed=0)
        assert rebuilt.stage == keys[k]
        got = _snapshot_logits(rebuilt, ids, task)
        torch.testing.assert_close(got, logits[k], rtol=0, atol=1e-6)
        base = rebuilt.detach()
    # after domain:upper, the untrained router would mix both experts: not what was trained
    base, _ = modulora.models.load_base(str(model_path))
    rebuilt = model_after(folder, keys[:3], base, seed=0)
    rebuilt.set_stage("inference")
    assert not torch.allclose(_snapshot_logits(rebuilt, ids, "upper"), logits[2], atol=1e-4)


def test_eval_report_and_compare(tmp_path, model_path, capsys):
    mmlu = [
        {"question": f"q{i}", "choices": ["a", "b", "c", "d"], "answer": i % 4} for i in range(6)
    ]
    probes = {
        "mmlu": str(write_jsonl(tmp_path / "mmlu.jsonl", mmlu)),
        "text": str(write_jsonl(tmp_path / "text.jsonl", [{"text": "the lazy dog"}] * 4)),
    }
    runs = []
    for method in ("modula-res", "lora"):
        folder = tmp_path / method
        config = write_run(folder, method, model_path, train=TRAIN, eval={**EVAL, **probes})
        assert main(["train", str(config)]) == 0
        assert main(["eval", str(folder / "run"), "--base"]) == 0
        runs.append(folder / "run")
    out = capsys.readouterr().out
    assert "test scores" in out and "MMLU accuracy" in out and "95% intervals" in out
    results = json.loads((runs[0] / "eval" / "results.json").read_text())
    assert set(results["model"]["tasks"]) == {"reverse", "upper"}
    assert results["model"]["tasks"]["reverse"]["n"] == 5  # 10% of 48 records, under the cap of 6
    assert results["base"]["mmlu"] is not None and results["model"]["perplexity"] > 1
    assert results["forgetting"]["stages"] == [
        "universal",
        "domain:reverse",
        "domain:upper",
        "router",
    ]
    assert results["routing"]["experts"] == ["domain:reverse", "domain:upper"]
    report = (runs[0] / "eval" / "report.md").read_text()
    for png in ("scores.png", "forgetting.png", "routing.png"):
        assert (runs[0] / "eval" / png).stat().st_size > 1000 and png in report
    lora = json.loads((runs[1] / "eval" / "results.json").read_text())
    assert lora["forgetting"] is None and lora["routing"] is None  # one stage, no router
    assert main(["compare", *map(str, runs), "--out", str(tmp_path / "cmp")]) == 0
    table = capsys.readouterr().out
    assert "run (modula-res)" in table and "run (lora)" in table and "MMLU" in table
    assert (tmp_path / "cmp" / "compare.png").is_file()
    assert main(["eval", str(runs[0]), "--tasks", "nope"]) == 2
    assert main(["compare", str(tmp_path / "missing")]) == 2


def _conversation(i: int) -> dict:
    words = ["abc", "hgf", "bad", "cafe", "egg", "dab", "fed", "ace"]
    a, b = words[i % 8], words[(i + 3) % 8]
    return {
        "messages": [
            {"role": "user", "content": f"reverse: {a}"},
            {"role": "assistant", "content": a[::-1]},
            {"role": "user", "content": f"reverse: {b}"},
            {"role": "assistant", "content": b[::-1]},
        ]
    }


def _parity(i: int) -> dict:
    return {"prompt": f"parity: {i}", "response": "odd" if i % 2 else "even"}


def test_eval_conversations_likelihood_and_task_free_after_add_task(tmp_path, model_path):
    data = tmp_path / "data"
    tasks = {
        "reverse": {
            "train": str(write_jsonl(data / "rev.jsonl", [_conversation(i) for i in range(40)]))
        },
        "parity": {
            "train": str(write_jsonl(data / "par.jsonl", [_parity(i) for i in range(40)])),
            "test": str(write_jsonl(data / "par.test.jsonl", [_parity(i) for i in range(50, 56)])),
            "metric": "classification",
            "labels": ["even", "odd"],
        },
    }
    config = write_run(tmp_path, "modula-res", model_path, tasks=tasks, train=TRAIN, eval=EVAL)
    run = tmp_path / "run"
    assert main(["train", str(config)]) == 0
    assert main(["eval", str(run), "--no-forgetting"]) == 0
    before = json.loads((run / "eval" / "results.json").read_text())
    reverse = before["model"]["tasks"]["reverse"]
    for sample in reverse["samples"]:  # the reference is the last assistant turn
        assert sample["reference"] == sample["prompt"].split(": ")[1][::-1]
    parity = before["model"]["tasks"]["parity"]
    assert parity["n"] == 6
    for entry, n in ((reverse, reverse["n"]), (parity, 6), (parity["likelihood"], 6)):
        low, high = entry["ci"]
        assert low <= entry["score"] <= high and len(entry["stats"]) == n
    # likelihood accuracy, recomputed by hand: whole prompt and label, one forward each
    loaded = load_run(run)
    tok, right = loaded.tokenizer, 0
    for i in range(50, 56):
        prompt = chat_prompt(tok, [{"role": "user", "content": f"parity: {i}"}])
        totals = []
        for label in ("even", "odd"):
            ids = tok(label, add_special_tokens=False)["input_ids"]
            with torch.no_grad():
                out = loaded.model(input_ids=torch.tensor([prompt + ids]), task="parity")
            logp = out.logits[0].log_softmax(-1)
            totals.append(sum(float(logp[len(prompt) - 1 + j, t]) for j, t in enumerate(ids)))
        right += ("odd" if totals[1] > totals[0] else "even") == _parity(i)["response"]
    assert parity["likelihood"]["score"] == pytest.approx(100 * right / 6)
    loaded.model.detach()

    new = write_jsonl(data / "sort.jsonl", records("sort", 40, task_field=False))
    args = ["add-task", str(run), "--task", "sort", "--data", str(new), "--router", "new"]
    assert main(args) == 0
    assert main(["eval", str(run), "--no-forgetting"]) == 0
    after = json.loads((run / "eval" / "results.json").read_text())
    for task in ("reverse", "parity"):  # named: the experts they were trained with, exactly
        assert after["model"]["tasks"][task]["stats"] == before["model"]["tasks"][task]["stats"]
    assert set(after["model"]["task_free"]) == {"reverse", "parity", "sort"}
    report = (run / "eval" / "report.md").read_text()
    for text in ("Task-free routing", "Classification by likelihood", "95% bootstrap"):
        assert text in report


def _fake_run(root, name, hits: dict[str, list[int]], cost: dict):
    tasks = {
        t: {"metric": "exact", "n": len(h), "score": 100 * sum(h) / len(h),
            "ci": [0.0, 100.0], "stats": [[x] for x in h], "samples": []}
        for t, h in hits.items()
    }  # fmt: skip
    results = {"run": str(root / name), "method": "lora", "tasks": list(hits),
               "model": {"tasks": tasks}}  # fmt: skip
    write_jsonl(root / name / "eval" / "results.json", [results])
    (root / name / "cost.json").write_text(json.dumps({"total": cost}))
    return root / name


def test_compare_marks_significant_differences_and_shows_costs(tmp_path, capsys):
    cost = {"adapter_parameters": 1234, "examples": 96, "tokens": 5000, "flops_estimate": 3e9,
            "wall_time_s": 12.0}  # fmt: skip
    a = _fake_run(tmp_path, "a", {"x": [1] * 60 + [0] * 40, "y": [1] * 50 + [0] * 50}, cost)
    # b: 30 fewer right on x (significant), 2 fewer on y (noise)
    b = _fake_run(tmp_path, "b", {"x": [1] * 30 + [0] * 70, "y": [1] * 48 + [0] * 52}, cost)
    assert main(["compare", str(a), str(b), "--out", str(tmp_path / "cmp")]) == 0
    table = capsys.readouterr().out
    rows = {line.split("|")[1].strip(): line for line in table.splitlines() if line.startswith("|")}
    assert rows["x"].rstrip(" |").endswith("*")  # b's x differs from a's
    assert not rows["y"].rstrip(" |").endswith("*")
    assert "60.0 [" in rows["x"] and "30.0 [" in rows["x"]
    assert "1,234" in table and "3e+09" in table and "FLOPs" in table
