"""``modulora quickstart`` end to end on a tiny random model and the fake-package benchmark."""

from __future__ import annotations

import json

import pytest
import yaml
from test_benchmark_data import CFG, packages  # noqa: F401  (a fixture)
from tiny import model_dir

from modulora import quickstart as Q
from modulora.benchmark import build_benchmark
from modulora.cli import main


@pytest.fixture
def small_budget(monkeypatch):
    monkeypatch.setattr(Q, "STAGE_STEPS", {"universal": 2, "domain": 1, "router": 1})
    monkeypatch.setattr(Q, "TRAIN", {**Q.TRAIN, "batch_size": 2, "max_length": 512})
    monkeypatch.setattr(Q, "EVAL", {**Q.EVAL, "max_examples": 2, "probe_examples": 3})


def test_quickstart_trains_adds_a_task_evaluates_and_compares(
    packages,  # noqa: F811
    tmp_path,
    monkeypatch,
    small_budget,
    capsys,
):
    bench = build_benchmark(tmp_path / "bench", config=CFG, packages_dir=packages)
    monkeypatch.setattr(Q, "build_benchmark", lambda: bench)
    model = model_dir(tmp_path / "model")
    assert main(["quickstart", "--out", str(tmp_path / "qs"), "--model", str(model)]) == 0
    printed = capsys.readouterr().out
    qs = tmp_path / "qs"
    for method in ("modula-res", "lora"):
        cfg = yaml.safe_load((qs / f"{method}.yaml").read_text())
        assert cfg["output_dir"] == str(qs / method)  # absolute: no nesting under --out
        assert (qs / method / "eval" / "report.md").is_file()
    # the same budget: MoDULA's stage steps add up to the joint run's steps
    costs = {m: json.loads((qs / m / "cost.json").read_text()) for m in ("modula-res", "lora")}
    steps = {m: sum(s["steps"] for s in c["stages"]) for m, c in costs.items()}
    assert steps["lora"] == 2 + 4 * 1 + 1  # universal + four domains + router
    assert steps["modula-res"] >= 2 + 4 * 1 + 1  # plus the stages add-task trained
    added = json.loads((qs / "modula-res" / "add-task-translate.json").read_text())
    assert added["old_experts_bit_identical"] is True
    before = json.loads((qs / "modula-res" / "eval-before-translate" / "results.json").read_text())
    assert "translate" not in before["model"]["tasks"] and "mmlu" not in before["model"]
    after = json.loads((qs / "modula-res" / "eval" / "results.json").read_text())
    # the old tasks answer exactly as before the addition
    assert added["old_task_outputs_identical"] is True and added["router"] == "new"
    for task, scored in before["model"]["tasks"].items():
        assert after["model"]["tasks"][task]["score"] == scored["score"], task
        assert after["model"]["tasks"][task]["stats"] == scored["stats"], task  # per example
        got = [s["prediction"] for s in after["model"]["tasks"][task]["samples"]]
        assert got == [s["prediction"] for s in scored["samples"]], task
    # and every task is also scored as a request naming the run would be answered
    assert set(after["model"]["task_free"]) == set(after["model"]["tasks"])
    assert set(added["comparators"]) == {"rerun", "molora", "lora"}
    assert {"math", "medical", "news", "chinese", "translate"} <= set(after["model"]["tasks"])
    assert "mmlu" in after["base"] and "perplexity" in after["model"]
    assert (qs / "compare" / "compare.png").stat().st_size > 0
    for text in ("modula-res", "lora", "after (task-free)", "cost vs", "wall time", "compare.md"):
        assert text in printed
