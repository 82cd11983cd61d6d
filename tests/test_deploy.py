"""Deployment: per-task merge, PEFT export, merged folders, mixed-task generation."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import batch, method_config, randomize_adapters, tiny_model
from peft import PeftModel
from tiny import chat_prompt, model_dir, write_run
from transformers import AutoModelForCausalLM

import modulora
from modulora.cli import main
from modulora.generate import Sampling, generate_batch, load_run
from modulora.merge import NotMergeableError, export_peft, lowrank_update

TASK_GATED = ["lora", "multi-lora", "cgc-lora", "moelora"]
TOL = {"atol": 1e-5, "rtol": 1e-5}


def _mixture(method: str, family: str = "llama", **overrides) -> modulora.MixtureModel:
    model = modulora.attach(tiny_model(family), method_config(method, **overrides))
    randomize_adapters(model, scale=0.2)
    model.set_stage("inference")
    return model.eval()


@torch.no_grad()
def _logits(model, ids, mask, **kw):
    return model(input_ids=ids, attention_mask=mask, **kw).logits


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("method", TASK_GATED)
def test_merged_and_peft_export_equal_the_task_logits(tmp_path, method, family):
    model = _mixture(method, family)
    ids, mask = batch()
    before = {t: _logits(model, ids, mask, task=t) for t in model.mixture_config.tasks}
    plain = _logits(tiny_model(family), ids, mask)
    assert not torch.allclose(before["math"], plain, atol=1e-3)  # the adapter does something
    for task in model.mixture_config.tasks[:2]:
        want = before[task]
        merged = model.merge(task=task)
        assert type(merged) is type(model.base_model)
        assert not any("modulora" in n for n, _ in merged.named_modules())
        torch.testing.assert_close(_logits(merged, ids, mask), want, **TOL)
        out = export_peft(model, tmp_path / f"{method}-{task}", task=task)
        peft = PeftModel.from_pretrained(tiny_model(family), str(out)).eval()
        torch.testing.assert_close(_logits(peft, ids, mask), want, **TOL)
    if method != "lora":  # the update really is per task
        assert not torch.allclose(before["math"], before["med"], atol=1e-3)
    for task, logits in before.items():  # merging and exporting left the mixture as it was
        assert torch.equal(_logits(model, ids, mask, task=task), logits)


def test_task_gated_export_is_one_lora_of_the_summed_rank(tmp_path):
    model = _mixture("cgc-lora")  # 2 common experts + 1 specific, rank 4 split -> 1 each
    update = lowrank_update(model, task="med")
    ranks = {A.shape[0] for A, _ in update.values()}
    layer = next(iter(model.layers.values()))
    used = [i for i, e in enumerate(layer.modulora_experts.names) if not e.startswith("specific")]
    expected = sum(layer.modulora_experts.ranks[i] for i in used) + 1
    assert ranks == {expected}
    cfg = json.loads(
        (export_peft(model, tmp_path / "x", task="med") / "adapter_config.json").read_text()
    )
    assert cfg["r"] == expected and cfg["lora_alpha"] == expected and cfg["peft_type"] == "LORA"
    info = json.loads((tmp_path / "x" / "modulora_export.json").read_text())
    assert info["method"] == "cgc-lora" and info["task"] == "med" and info["format"] == "peft"


def test_inplace_merge_returns_the_base_and_empties_the_mixture():
    model = _mixture("multi-lora")
    ids, mask = batch()
    want = _logits(model, ids, mask, task="code")
    base = model.merge(task="code", inplace=True)
    assert model.layers == {}
    torch.testing.assert_close(_logits(base, ids, mask), want, **TOL)


@pytest.mark.parametrize(
    ("method", "expert", "stage"),
    [
        ("molora", "expert:1", None),
        ("modula-flan", "domain:med", "domain:med"),
        ("modula-res", "universal", "universal"),
    ],
)
def test_pinned_expert_merge_equals_that_expert_alone(method, expert, stage):
    model = _mixture(method)
    ids, mask = batch()
    if stage is not None:
        model.set_stage(stage)
    else:  # pin the token router to one expert, as an added task's domain stage does
        for layer in model.layers.values():
            layer.set_gate(modulora.gates.fixed({1: 1.0}))
    task = stage.split(":")[1] if stage and ":" in stage else None
    want = _logits(model, ids, mask, **({"task": [task] * ids.shape[0]} if task else {}))
    merged = model.merge(expert=expert)
    torch.testing.assert_close(_logits(merged, ids, mask), want, **TOL)


@pytest.mark.parametrize("method", ["molora", "loramoe", "modula-flan", "modula-res", "moe-ct"])
def test_routed_methods_refuse_to_merge_and_say_why(tmp_path, method):
    model = _mixture(method)
    task = model.mixture_config.tasks[0] if model.mixture_config.tasks else None
    with pytest.raises(NotMergeableError) as err:
        model.merge(task=task)
    assert "modulora serve" in str(err.value)
    assert ("token" in str(err.value)) or method in ("modula-res", "moe-ct")
    with pytest.raises(NotMergeableError):
        export_peft(model, tmp_path / "out", task=task)
    assert not (tmp_path / "out").exists()  # refused before writing anything
    if method == "modula-res":
        with pytest.raises(NotMergeableError, match="LeakyReLU"):
            model.merge(expert="domain:math")


def test_bad_requests_are_refused_before_anything_is_written(tmp_path):
    model = _mixture("cgc-lora")
    with pytest.raises(ValueError, match="known tasks"):
        model.merge(task="finance")
    with pytest.raises(ValueError, match="needs task"):
        model.merge()
    with pytest.raises(ValueError, match="unknown expert"):
        model.merge(expert="nope")
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError):
        export_peft(model, taken, task="math")
    assert (taken / "keep.txt").read_text() == "mine" and len(list(taken.iterdir())) == 1
    export_peft(model, taken, task="math", overwrite=True)
    assert (taken / "adapter_model.safetensors").is_file() and not (taken / "keep.txt").exists()


# --- generation -----------------------------------------------------------------------


@pytest.mark.parametrize("method", ["multi-lora", "cgc-lora", "moelora", "modula-res", "molora"])
def test_mixed_task_greedy_batch_equals_rows_alone(method):
    model = _mixture(method)
    tok = _FakeTok()
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(3, 97, (n,), generator=g).tolist() for n in (5, 9, 3, 7)]
    tasks = ["math", "code", "med", "math"]
    rows = generate_batch(model, tok, prompts, tasks, max_new_tokens=[6, 4, 6, 5])
    for p, t, limit, got in zip(prompts, tasks, [6, 4, 6, 5], rows, strict=True):
        alone = generate_batch(model, tok, [p], [t], max_new_tokens=limit)[0]
        assert got == alone
        assert len(got) <= limit
    assert [len(r) for r in rows] != [0, 0, 0, 0]
    if model.method.task_gated:  # the task changes the answer: rows really are routed by task
        other = generate_batch(model, tok, prompts, ["code", "med", "math", "code"], 6)
        assert other != rows


def test_streamed_tokens_are_the_returned_tokens():
    model = _mixture("cgc-lora")
    seen: dict[int, list[int]] = {0: [], 1: []}
    prompts = [[5, 6, 7], [8, 9]]
    torch.manual_seed(0)
    rows = generate_batch(
        model,
        _FakeTok(),
        prompts,
        ["math", "med"],
        5,
        Sampling(temperature=0.8, top_p=0.9),
        on_token=lambda r, t: seen[r].append(t),
    )
    assert [seen[0], seen[1]] == rows and all(len(r) <= 5 for r in rows)


def test_a_row_ended_by_its_callback_stops_while_the_others_go_on():
    model = _mixture("multi-lora")
    prompts, tasks = [[5, 6, 7], [8, 9, 10, 11]], ["math", "med"]
    seen = []

    def on_token(row, tok):
        seen.append(row)
        return row == 0 and seen.count(0) == 2  # row 0 wants two tokens only

    rows = generate_batch(model, _FakeTok(), prompts, tasks, 8, on_token=on_token)
    assert len(rows[0]) <= 2 and seen.count(0) == len(rows[0])
    assert rows[1] == generate_batch(model, _FakeTok(), prompts[1:], tasks[1:], 8)[0]
    assert rows[0] == generate_batch(model, _FakeTok(), prompts[:1], tasks[:1], 8)[0][:2]
    calls = []  # a row ended early really stops: fewer forward passes
    hook = model.base_model.register_forward_hook(lambda *a: calls.append(1))
    full = generate_batch(model, _FakeTok(), prompts[1:], tasks[1:], 8)[0]
    passes, calls[:] = len(calls), []
    generate_batch(model, _FakeTok(), prompts[1:], tasks[1:], 8, on_token=lambda r, t: True)
    hook.remove()
    assert len(full) == 8 and passes >= 8 and len(calls) <= 2


class _FakeTok:
    """Just the two ids generation needs, for models with a 97-token vocabulary."""

    pad_token_id = 0
    eos_token_id = 2


# --- from a run folder through the CLI ------------------------------------------------


@pytest.fixture(scope="module")
def cgc_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("deploy")
    config = write_run(
        root,
        "cgc-lora",
        model_dir(root / "model"),
        train={"lr": 1e-2, "max_steps": 3, "max_length": 40},
    )
    assert main(["train", str(config)]) == 0
    return root / "run"


def test_cli_export_peft_and_merged_load_and_match(cgc_run, tmp_path, capsys):
    loaded = load_run(cgc_run)
    prompt = chat_prompt(loaded.tokenizer, [{"role": "user", "content": "upper: abc"}])
    ids = torch.tensor([prompt])
    want = _logits(loaded.model, ids, None, task="upper")
    assert main(["export", str(cgc_run), "--task", "upper", "--out", str(tmp_path / "p")]) == 0
    args = ["export", str(cgc_run), "--task", "upper", "--format", "merged"]
    assert main([*args, "--out", str(tmp_path / "m")]) == 0
    base = AutoModelForCausalLM.from_pretrained(loaded.run.model)
    peft = PeftModel.from_pretrained(base, str(tmp_path / "p")).eval()
    torch.testing.assert_close(_logits(peft, ids, None), want, **TOL)
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "m").eval()
    torch.testing.assert_close(_logits(merged, ids, None), want, **TOL)
    assert (tmp_path / "m" / "tokenizer.json").is_file()
    info = json.loads((tmp_path / "m" / "modulora_export.json").read_text())
    assert info["source"] == str(cgc_run) and info["task"] == "upper"
    # an existing export is never overwritten without --force
    assert main([*args, "--out", str(tmp_path / "m")]) == 2
    assert "not empty" in capsys.readouterr().err


def test_cli_generate_answers_with_the_run(cgc_run, capsys):
    loaded = load_run(cgc_run)
    prompt = chat_prompt(loaded.tokenizer, [{"role": "user", "content": "reverse: abc"}])
    want = generate_batch(loaded.model, loaded.tokenizer, [prompt], ["reverse"], 6)[0]
    text = loaded.tokenizer.decode(want, skip_special_tokens=True).strip()
    args = ["generate", str(cgc_run), "--task", "reverse", "--prompt", "reverse: abc"]
    assert main([*args, "--max-new-tokens", "6"]) == 0
    assert capsys.readouterr().out.strip() == text
    assert main(["generate", str(cgc_run), "--prompt", "x"]) == 2  # task-gated: needs a task
    assert "needs --task" in capsys.readouterr().err
