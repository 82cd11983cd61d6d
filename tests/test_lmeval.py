"""lm-evaluation-harness against modulora runs, both ways: lm-eval's ``local-completions``
talking to a live ``modulora serve``, and the in-process ``modulora`` model type. Task
YAMLs on local JSONL (the hub is unreachable); every loglikelihood lm-eval reports is
checked against one unpadded forward of the run's own model."""

from __future__ import annotations

import json
import os

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import lm_eval  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
import yaml  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402
from tiny import model_dir, write_jsonl, write_run  # noqa: E402

from modulora.cli import main  # noqa: E402
from modulora.generate import load_run  # noqa: E402
from modulora.lmeval import ModuloraLM  # noqa: E402
from modulora.serve import build_app, running  # noqa: E402

MC = [
    {"question": "reverse: abc", "choices": ["cba", "abc", " bca"], "answer": 0},
    {"question": "upper: dog", "choices": ["DOG", "dog"], "answer": 0},
    {"question": "reverse: hgf", "choices": ["fgh", "ghf"], "answer": 1},
]
GEN = [{"question": "reverse: abc", "answer": "cba"}, {"question": "upper: fox", "answer": "FOX"}]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("lmeval")
    model = model_dir(root / "model")
    fast = {"lr": 1e-2, "max_steps": 2, "max_length": 40}
    assert main(["train", str(write_run(root, "molora", model, train=fast))]) == 0
    tasks = root / "tasks"
    common = {"dataset_path": "json", "test_split": "test"}
    mc = {
        "task": "tiny_mc", "output_type": "multiple_choice",
        "dataset_kwargs": {"data_files": {"test": str(write_jsonl(tasks / "mc.jsonl", MC))}},
        "doc_to_text": "{{question}} =", "doc_to_choice": "choices", "doc_to_target": "answer",
        "metric_list": [{"metric": "acc"}],
    }  # fmt: skip
    gen = {
        "task": "tiny_gen", "output_type": "generate_until",
        "dataset_kwargs": {"data_files": {"test": str(write_jsonl(tasks / "gen.jsonl", GEN))}},
        "doc_to_text": "{{question}} =", "doc_to_target": "{{answer}}",
        "generation_kwargs": {"until": ["\n"], "max_gen_toks": 6, "do_sample": False},
        "metric_list": [{"metric": "exact_match"}],
    }  # fmt: skip
    for cfg in (mc, gen):
        (tasks / f"{cfg['task']}.yaml").write_text(yaml.safe_dump({**common, **cfg}))
    return root / "run", model, TaskManager(include_path=str(tasks))


def _evaluate(model, manager):
    out = lm_eval.simple_evaluate(
        model=model, tasks=["tiny_mc", "tiny_gen"], task_manager=manager, log_samples=True
    )
    return out["samples"]


def _direct(loaded, task, context: str, continuation: str) -> float:
    """Sum of log p(continuation tokens): one forward of the whole text, no padding,
    split as lm-eval splits (whole text encoded, the context's tokens first)."""
    tok = loaded.tokenizer
    whole = tok(context + continuation, add_special_tokens=False)["input_ids"]
    n = len(tok(context, add_special_tokens=False)["input_ids"])
    with torch.no_grad():
        logits = loaded.model(input_ids=torch.tensor([whole]), task=task).logits[0]
    logp = logits.log_softmax(-1)
    return sum(float(logp[i - 1, whole[i]]) for i in range(n, len(whole)))


def _check_loglikelihoods(samples, loaded, task):
    checked = 0
    for sample in samples["tiny_mc"]:
        doc = sample["doc"]
        for choice, resp in zip(doc["choices"], sample["resps"], strict=True):
            want = _direct(loaded, task, doc["question"] + " =", " " + choice)
            assert resp[0][0] == pytest.approx(want, abs=1e-4)
            checked += 1
    assert checked == sum(len(d["choices"]) for d in MC)


def test_modulora_model_type_in_process(setup):
    run, _, manager = setup
    samples = _evaluate(ModuloraLM(run=str(run), batch_size=4), manager)
    loaded = load_run(run)
    _check_loglikelihoods(samples, loaded, None)  # token-routed: the run's own routing
    with pytest.raises(ValueError, match="not in the run"):
        ModuloraLM(run=str(run), task="french")
    assert len(samples["tiny_gen"]) == 2


def test_local_completions_against_a_live_server(setup):
    run, model, manager = setup
    loaded = load_run(run)
    with running(build_app(loaded)) as url:
        args = {
            "model": "reverse",  # a named task: routed over the experts it was trained with
            "base_url": f"{url}/v1/completions",
            "tokenizer_backend": "huggingface",
            "tokenizer": str(model),
            "max_retries": 1,
        }
        served = _evaluate(lm_eval.api.registry.get_model("local-completions")(**args), manager)
    _check_loglikelihoods(served, loaded, "reverse")
    in_process = _evaluate(ModuloraLM(run=str(run), task="reverse"), manager)
    answers = [s["resps"][0][0] for s in served["tiny_gen"]]
    assert answers == [s["resps"][0][0] for s in in_process["tiny_gen"]]
    assert json.dumps(answers)  # plain strings
