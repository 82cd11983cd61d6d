"""The training pipeline end to end: YAML -> CLI -> stages -> run folder.

Tiny random Llama folders and a synthetic multi-task set where each task is a
different string transformation (tests/tiny.py), so validation loss can fall in
a few steps.
"""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from safetensors.torch import load_file
from tiny import model_dir, records, write_jsonl, write_run

import modulora
from modulora.cli import main
from modulora.config import METHODS
from modulora.methods import get_method

FAST = {"lr": 1e-2, "max_steps": 6, "max_length": 40}


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    return model_dir(tmp_path_factory.mktemp("model") / "tiny-llama")


def _run(tmp_path, method, model_path, **sections):
    sections.setdefault("train", FAST)
    if method == "moe-ct":  # continued pre-training on plain text, no tasks
        text = [{"text": r["prompt"] + " = " + r["response"]} for r in records("reverse", 48)]
        sections.setdefault("tasks", {})
        sections.setdefault("universal", {"train": str(write_jsonl(tmp_path / "text.jsonl", text))})
    return write_run(tmp_path, method, model_path, **sections)


def _costs(run_dir):
    return json.loads((run_dir / "cost.json").read_text())["stages"]


def _tensors(run_dir):
    """Every saved adapter tensor of a run folder, keyed ``file:tensor``."""
    out = {}
    for path in sorted([*run_dir.glob("experts/*.safetensors"), run_dir / "router.safetensors"]):
        for k, v in load_file(path).items():
            out[f"{path.name}:{k}"] = v
    return out


@pytest.mark.parametrize("method", METHODS)
def test_default_plan_trains_every_method_from_yaml(tmp_path, model_path, method):
    config = _run(tmp_path, method, model_path)
    assert main(["train", str(config)]) == 0
    run = tmp_path / "run"
    expected = modulora.methods.get_method(method).plan(
        modulora.MixtureConfig(
            method=method, tasks=[] if method == "moe-ct" else ["reverse", "upper"]
        )
    )
    costs = _costs(run)
    assert [c["stage"] for c in costs] == expected
    for cost in costs:  # validation loss falls in every stage that trains
        assert cost["valid_loss_end"] < cost["valid_loss_start"], cost
        assert cost["steps"] == FAST["max_steps"] and cost["trainable_parameters"] > 0
        assert cost["tokens"] > 0 and cost["flops_estimate"] > 0
    for label in (c["stage"].replace(":", "-") for c in costs):
        lines = (run / "stages" / label / "metrics.jsonl").read_text().splitlines()
        assert sum("valid_loss" in line for line in lines) == 2
        assert sum('"loss"' in line for line in lines) == FAST["max_steps"]
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["stages_done"] == expected
    assert all((run / e["file"]).is_file() for e in manifest["experts"])
    # the resolved config re-runs as is: same plan, absolute paths
    resolved = yaml.safe_load((run / "config.yaml").read_text())
    assert resolved["method"] == method and resolved["output_dir"] == str(run)
    # the trained adapter loads onto a fresh base and reproduces itself
    base, _ = modulora.models.load_base(str(model_path))
    assert modulora.load(base, run).mixture_config.method == method


@pytest.mark.parametrize("method", ["modula-res", "modula-flan"])
def test_stage_isolation(tmp_path, model_path, method):
    config = _run(tmp_path, method, model_path)
    run = tmp_path / "run"
    # the adapter at init: the same seed gives the same initial weights
    assert main(["train", str(config), "--stage", "universal"]) == 0
    history = [_tensors(run)]
    for stage in ("domain:reverse", "domain:upper", "router"):
        assert main(["train", str(config), "--stage", stage]) == 0
        history.append(_tensors(run))
    changed = [
        {k.split(":")[0] for k in after if not torch.equal(after[k], before[k])}
        for before, after in zip(history, history[1:], strict=False)
    ]
    assert changed == [
        {"domain-reverse.safetensors"},
        {"domain-upper.safetensors"},
        {"router.safetensors"},
    ]
    base, _ = modulora.models.load_base(str(model_path))
    torch.manual_seed(0)
    from accelerate.utils import set_seed

    set_seed(0)
    init = modulora.attach(base, modulora.MixtureConfig(**_mixture(run)))
    after_universal = history[0]
    for name in init.expert_names():
        file = name.replace(":", "-") + ".safetensors"
        for k, v in init.expert_state(name).items():
            same = torch.equal(v, after_universal[f"{file}:{k}"])
            assert same == (name != "universal"), (name, k)


def _mixture(run_dir):
    return json.loads((run_dir / "manifest.json").read_text())["config"]


def _wait_for(path, proc, timeout=120.0):
    import time

    start = time.time()
    while not path.exists():
        assert proc.poll() is None, "the run finished before its first checkpoint"
        assert time.time() - start < timeout, "no checkpoint appeared"
        time.sleep(0.01)


def test_resume_after_sigkill_equals_uninterrupted(tmp_path, model_path):
    import os
    import signal
    import subprocess
    import sys

    train = {**FAST, "max_steps": 40, "save_every": 3, "eval_every": 5}
    config = _run(tmp_path, "modula-res", model_path, train=train)
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "modulora.cli", "train", str(config)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _wait_for(run / "checkpoints" / "latest.json", proc)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    latest = json.loads((run / "checkpoints" / "latest.json").read_text())
    state = json.loads((run / "state.json").read_text()) if (run / "state.json").exists() else {}
    assert latest["stage"] not in state.get("stages_done", [])  # killed mid-stage
    assert main(["train", str(config)]) == 2  # an existing run is never overwritten
    assert main(["train", str(config), "--resume"]) == 0

    clean = _run(tmp_path / "clean", "modula-res", model_path, train=train)
    assert main(["train", str(clean)]) == 0
    resumed, uninterrupted = _tensors(run), _tensors(tmp_path / "clean" / "run")
    assert resumed.keys() == uninterrupted.keys()
    for k in resumed:
        assert torch.equal(resumed[k], uninterrupted[k]), k
    # the resumed stage's metrics hold each step once
    for label in ("universal", "domain-reverse", "domain-upper", "router"):
        steps = [
            r["step"]
            for r in map(json.loads, (run / "stages" / label / "metrics.jsonl").open())
            if "loss" in r
        ]
        assert steps == sorted(set(steps)), label


def test_two_processes_match_one(tmp_path, model_path):
    import subprocess
    import sys

    train = {**FAST, "max_steps": 4, "grad_accum": 2}
    two = _run(tmp_path / "two", "modula-res", model_path, train=train)
    one = _run(tmp_path / "one", "modula-res", model_path, train=train)
    launch = [
        # accelerate 1.x's `--cpu` launcher starts one process unless MPI is set up;
        # `--multi_gpu` uses torchrun, and modulora asks accelerate for CPU (gloo) DDP
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "-m",
        "modulora.cli",
        "train",
        str(two),
    ]
    done = subprocess.run(launch, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert main(["train", str(one)]) == 0
    a, b = _tensors(tmp_path / "two" / "run"), _tensors(tmp_path / "one" / "run")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-5, msg=k)
    assert [c["processes"] for c in _costs(tmp_path / "two" / "run")] == [2] * 4


def _old_task_logits(model_path, run, tasks=("reverse", "upper")):
    """Logits of the saved run for fixed inputs, one row per old task, named."""
    base, _ = modulora.models.load_base(str(model_path))
    model = modulora.load(base, run)
    ids = torch.randint(3, 300, (len(tasks), 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return model(input_ids=ids, task=list(tasks)).logits


def _folder_state(root):
    """Every file under ``root`` with its bytes: a run folder 'untouched' keeps this equal."""
    return {p: p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("method", ["modula-res", "molora", "cgc-lora", "multi-lora"])
def test_add_task_keeps_old_experts_and_learns_the_new_task(tmp_path, model_path, method):
    # epochs, not a step budget, so retraining all tasks really reads more data
    config = _run(tmp_path, method, model_path, train={**FAST, "max_steps": None, "epochs": 3})
    assert main(["train", str(config)]) == 0
    run = tmp_path / "run"
    before = _tensors(run)
    named = _old_task_logits(model_path, run)
    new = write_jsonl(tmp_path / "data" / "sort.jsonl", records("sort", 48, task_field=False))
    assert main(["add-task", str(run), "--task", "sort", "--data", str(new), "--rank", "4"]) == 0
    after = _tensors(run)
    old_files = {k for k in before if not k.startswith("router")}
    for k in old_files:  # checked here, not only in the report
        assert torch.equal(before[k], after[k]), k
    new_expert = {"molora": "expert-2", "cgc-lora": "specific-sort"}.get(method, "domain-sort")
    assert any(k.startswith(new_expert + ".safetensors") for k in after)
    report = json.loads((run / "add-task-sort.json").read_text())
    assert report["old_experts_bit_identical"] is True
    loss = report["new_task_valid_loss"]
    assert loss["end"] < loss["start"]
    expected = get_method(method).add_plan(None, "sort")
    assert report["stages"] == expected
    if method in ("cgc-lora", "multi-lora"):  # task-gated: old tasks' outputs are kept
        assert report["old_task_outputs_identical"] is True
        assert torch.equal(_old_task_logits(model_path, run), named)
    rerun = report["comparators"]["rerun"]
    assert 0 < report["addition"]["parameters_trained"] < rerun["parameters_trained"]
    assert 0 < report["addition"]["examples"] < rerun["examples"]
    resolved = yaml.safe_load((run / "config.yaml").read_text())
    assert list(resolved["tasks"]) == ["reverse", "upper", "sort"]
    assert json.loads((run / "state.json").read_text())["tasks_added"] == ["sort"]
    # the grown run loads as a whole and knows the new task
    base, _ = modulora.models.load_base(str(model_path))
    assert modulora.load(base, run).mixture_config.tasks == ["reverse", "upper", "sort"]


@pytest.mark.parametrize("method", ["modula-res", "modula-flan"])
def test_add_task_router_new_trains_only_the_new_routing_rows(tmp_path, model_path, method):
    config = _run(tmp_path, method, model_path)
    assert main(["train", str(config)]) == 0
    run = tmp_path / "run"
    before = {k: v for k, v in _tensors(run).items() if k.startswith("router")}
    named = _old_task_logits(model_path, run)
    new = write_jsonl(tmp_path / "data" / "sort.jsonl", records("sort", 48, task_field=False))
    args = ["add-task", str(run), "--task", "sort", "--data", str(new), "--router", "new"]
    assert main(args) == 0
    after = _tensors(run)
    routers = [k for k in before if before[k].dim() == 2]
    assert routers
    for k in routers:
        n = before[k].shape[0]
        assert after[k].shape[0] == n + 1
        assert torch.equal(after[k][:n], before[k]), k  # old rows exactly as they were
    # the router stage changed the model, and only the new rows could move
    last = _costs(run)[-1]
    assert last["stage"] == "router" and last["valid_loss_end"] != last["valid_loss_start"]
    report = json.loads((run / "add-task-sort.json").read_text())
    assert report["router"] == "new" and report["old_router_rows_identical"] is True
    assert report["old_task_outputs_identical"] is True  # old tasks route as before
    assert torch.equal(_old_task_logits(model_path, run), named)  # from the files themselves
    assert report["old_experts_bit_identical"] is True


def test_add_task_cost_against_three_retrains_from_their_plans(tmp_path, model_path):
    config = _run(tmp_path, "modula-res", model_path)  # 6 steps of 8 per stage
    assert main(["train", str(config)]) == 0
    run = tmp_path / "run"
    new = write_jsonl(tmp_path / "data" / "sort.jsonl", records("sort", 48, task_field=False))
    assert main(["add-task", str(run), "--task", "sort", "--data", str(new), "--rank", "4"]) == 0
    report = json.loads((run / "add-task-sort.json").read_text())
    comps = report["comparators"]
    # the tiny Llama, by hand: per block q 32+32, k 32+16, v 32+16, o 32+32, gate/up 32+48,
    # down 48+32 = 464 (d_in + d_out) over 2 blocks; a rank-r LoRA has r * 928 parameters
    lora_rank = 8 + 3 * 4  # universal 8 + three domain experts of 4: the same total rank
    assert comps["lora"]["total_rank"] == comps["rerun"]["total_rank"] == lora_rank
    assert comps["lora"]["parameters_trained"] == lora_rank * 928
    # MoLoRA: 4 experts x r5, plus a router of 4 rows per adapted layer (sum of d_in = 480)
    assert comps["molora"]["experts"] == 4
    assert comps["molora"]["parameters_trained"] == 4 * 5 * 928 + 4 * 480
    # re-running the plan: universal r8 on x; MoDULA-Res domain experts read h (d_out wide):
    # r * 2 * d_out, summed over layers 448 per block; a router row per domain expert
    assert comps["rerun"]["parameters_trained"] == 8 * 928 + 3 * 4 * 896 + 3 * 480
    # budgets: 5 stages x 6 steps x 8 examples; the joint retrains get the same
    for name in ("rerun", "molora", "lora"):
        assert comps[name]["examples"] == 5 * 6 * 8, name
    # the addition: a domain stage and a router stage of 6 steps x 8
    assert report["addition"]["examples"] == 2 * 6 * 8
    assert report["addition_share"]["rerun"]["examples"] == round(96 / 240, 4)
    base, _ = modulora.models.load_base(str(model_path))
    size = sum(p.numel() for p in base.parameters())
    lora = comps["lora"]  # one stage: tokens x (4 x all parameters + 2 x trainable)
    want = lora["tokens"] * (4 * (size + 18560) + 2 * 18560)
    assert lora["flops_estimate"] == pytest.approx(want, rel=1e-9)


@pytest.mark.parametrize("router", ["all", "new"])
def test_add_task_router_stage_routes_like_the_paper_by_default(
    tmp_path, model_path, router, monkeypatch
):
    """``--router all`` (default): the router stage's rows name no task, so no task mask
    keeps old tasks' tokens from the new expert; ``--router new`` names them."""
    config = _run(tmp_path, "modula-res", model_path)
    assert main(["train", str(config)]) == 0
    seen = []
    forward = modulora.MixtureModel.forward

    def spy(self, *args, task=None, **kwargs):
        if self.stage == "router" and self.training:
            seen.append(task)
        return forward(self, *args, task=task, **kwargs)

    monkeypatch.setattr(modulora.MixtureModel, "forward", spy)
    new = write_jsonl(tmp_path / "data" / "sort.jsonl", records("sort", 48, task_field=False))
    args = ["add-task", str(tmp_path / "run"), "--task", "sort", "--data", str(new)]
    assert main([*args, "--router", router]) == 0
    assert seen
    if router == "all":
        assert all(t is None for t in seen)
    else:  # old and new tasks' rows, each named
        named = {t for rows in seen for t in rows}
        assert named == {"reverse", "upper", "sort"}


def test_add_task_refusals_leave_the_run_untouched(tmp_path, model_path, capsys):
    config = _run(tmp_path, "lora", model_path)
    assert main(["train", str(config)]) == 0
    run = tmp_path / "run"
    snapshot = _folder_state(run)
    new = write_jsonl(tmp_path / "new.jsonl", records("sort", 16, task_field=False))
    assert main(["add-task", str(run), "--task", "sort", "--data", str(new)]) == 2
    assert "cannot be added" in capsys.readouterr().err
    assert main(["add-task", str(run), "--task", "reverse", "--data", str(new)]) == 2
    assert "already in the run" in capsys.readouterr().err
    assert main(["add-task", str(tmp_path / "nope"), "--task", "x", "--data", str(new)]) == 2
    assert _folder_state(run) == snapshot


BAD_LINES = {
    "malformed JSON": ('{"prompt": "a", "response": ', "invalid JSON"),
    "no prompt/messages/text": ('{"task": "reverse", "answer": "x"}', "prompt"),
    "task not in config": ('{"task": "physics", "prompt": "a", "response": "b"}', "physics"),
}


@pytest.mark.parametrize("case", [*BAD_LINES, "empty dataset"])
def test_bad_data_names_file_and_line_and_touches_nothing(tmp_path, model_path, capsys, case):
    config = _run(tmp_path, "modula-res", model_path)
    assert main(["train", str(config), "--stage", "universal"]) == 0
    run = tmp_path / "run"
    snapshot = _folder_state(run)
    data = tmp_path / "data" / "upper.jsonl"
    good = data.read_text().splitlines()
    if case == "empty dataset":
        data.write_text("")
        expected = f"{data}: "
    else:
        line, _ = BAD_LINES[case]
        data.write_text("\n".join([*good[:4], line, *good[4:]]) + "\n")
        expected = f"{data}:5: "
    # the rest of the plan, into the existing run: fails before any stage starts
    assert main(["train", str(config), "--resume"]) == 2
    err = capsys.readouterr().err
    assert expected in err, err
    if case != "empty dataset":
        assert BAD_LINES[case][1] in err
    else:
        assert "empty" in err
    assert _folder_state(run) == snapshot
    # a fresh run with the same data never creates its folder
    fresh = tmp_path / "fresh"
    assert main(["train", str(config), "--set", f"output_dir={fresh}"]) == 2
    assert not fresh.exists()


def test_config_errors_are_clear(tmp_path, model_path, capsys):
    config = _run(tmp_path, "modula-res", model_path)
    cases = {
        "train.lr=-1": "train.lr",
        "train.bogus=1": "unknown keys ['bogus']",
        "stages.joint.max_steps=3": "not stages of method 'modula-res'",
        "adapter.rank=0": "rank must be a positive integer",
        "method=moe-lora": "unknown method",
        "model=/nonexistent": "not a local Hugging Face model folder",
        "train.batch_size=64": "fewer than one optimizer step",
    }
    for override, message in cases.items():
        assert main(["plan", str(config), "--set", override]) == 2, override
        assert message in capsys.readouterr().err, override


def test_numbers_in_yaml_and_set_parse_as_numbers(tmp_path, model_path):
    from modulora.run_config import ConfigError, load_run_config

    config = _run(tmp_path, "lora", model_path)
    text = config.read_text().replace("lr: 0.01", "lr: 1e-3")
    assert "lr: 1e-3" in text  # PyYAML alone reads this as the string '1e-3'
    config.write_text(text)
    assert load_run_config(config).train.lr == 0.001
    run = load_run_config(config, ["train.lr=1e-2", "train.weight_decay=5E-4"])
    assert run.train.lr == 0.01 and run.train.weight_decay == 0.0005
    with pytest.raises(ConfigError, match="train.lr must be a positive number, got '1e'"):
        load_run_config(config, ["train.lr=1e"])  # not a number: stays text, and is refused


def test_universal_stage_without_universal_data_warns(tmp_path, model_path, capsys):
    config = _run(tmp_path, "modula-res", model_path, universal=False)
    assert main(["plan", str(config)]) == 0
    assert "no `universal:` data" in capsys.readouterr().out
    with pytest.warns(UserWarning, match="trains the universal expert on every task's data"):
        assert main(["train", str(config), "--stage", "universal"]) == 0
    config = _run(tmp_path / "with", "modula-res", model_path)  # universal data given
    assert main(["plan", str(config)]) == 0
    assert "no `universal:` data" not in capsys.readouterr().out


def test_plan_prints_every_stage(tmp_path, model_path, capsys):
    config = _run(tmp_path, "modula-res", model_path)
    assert main(["plan", str(config)]) == 0
    out = capsys.readouterr().out
    for stage in ("universal", "domain:reverse", "domain:upper", "router"):
        assert stage in out
    assert not (tmp_path / "run").exists()  # planning trains and writes nothing


def test_bf16_checkpointing_packing_interleave_train(tmp_path, model_path):
    train = {**FAST, "precision": "bf16", "gradient_checkpointing": True}
    data = {"packing": True, "mixing": "interleave", "probabilities": {"reverse": 1, "upper": 3}}
    config = _run(tmp_path, "molora", model_path, train=train, data=data)
    assert main(["train", str(config)]) == 0
    (cost,) = _costs(tmp_path / "run")
    assert cost["valid_loss_end"] < cost["valid_loss_start"]


@pytest.mark.parametrize("method", ["modula-res", "cgc-lora"])
def test_compiled_training_equals_eager_training(tmp_path, model_path, method):
    """train.compile traces the adapted layers; the eager backend runs the same ops,
    so a compiled run must end with the same weights as a plain one."""
    from torch._dynamo.utils import counters

    for sub, extra in (("plain", {}), ("compiled", {"compile": True, "compile_backend": "eager"})):
        config = _run(tmp_path / sub, method, model_path, train={**FAST, "max_steps": 3, **extra})
        counters.clear()
        assert main(["train", str(config)]) == 0
        assert (counters["stats"]["unique_graphs"] > 0) == bool(extra)  # compiled or not
    plain, compiled = _tensors(tmp_path / "plain" / "run"), _tensors(tmp_path / "compiled" / "run")
    assert plain.keys() == compiled.keys()
    for k in plain:
        torch.testing.assert_close(compiled[k], plain[k], atol=1e-6, rtol=1e-5, msg=k)


def test_tensorboard_logs_or_says_how_to_install(tmp_path, model_path, capsys):
    import importlib.util

    train = {**FAST, "max_steps": 2, "tensorboard": True}
    config = _run(tmp_path, "lora", model_path, train=train)
    code = main(["train", str(config)])
    if importlib.util.find_spec("tensorboard") or importlib.util.find_spec("tensorboardX"):
        assert code == 0
        assert list((tmp_path / "run" / "tensorboard").rglob("events.out.tfevents.*"))
    else:
        assert code == 2
        assert "pip install 'modulora[tensorboard]'" in capsys.readouterr().err
        assert not (tmp_path / "run").exists()
