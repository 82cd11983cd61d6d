"""save_pretrained / load: exact round trip, one file per expert, wrong bases refused."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import TASKS, batch, method_config, randomize_adapters, tiny_model
from safetensors.torch import load_file, save_file

import modulora


def _logits(model, ids, mask):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask, task=list(TASKS)).logits


@pytest.mark.parametrize("method", list(modulora.METHODS))
def test_round_trip_reproduces_logits_exactly(method, tmp_path):
    fam = "gpt2" if method == "moe-ct" else "llama"
    overrides = {"fusion": "scalar"} if method == "moe-ct" else {}
    model = modulora.attach(tiny_model(fam), method_config(method, **overrides))
    if method != "lora":
        model.add_task("finance", rank=None if method in {"molora", "loramoe", "moe-ct"} else 3)
    randomize_adapters(model)
    model.set_stage("inference")
    ids, mask = batch()
    expected = _logits(model, ids, mask)
    model.save_pretrained(tmp_path)

    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["method"] == method
    assert manifest["base_model"]["class"] == type(model.base_model).__name__
    assert set(manifest["base_model"]["targets"]) == set(model.layers)
    for expert in manifest["experts"]:
        assert (tmp_path / expert["file"]).is_file()
        assert expert["rank"] > 0 and expert["role"] and expert["targets"]
    assert len(manifest["experts"]) == len(model.expert_names())
    assert not list(tmp_path.rglob("*.tmp")), "temporary files left behind"

    loaded = modulora.load(tiny_model(fam), tmp_path)
    assert loaded.stage == "inference"
    assert loaded.mixture_config == model.mixture_config
    assert torch.equal(_logits(loaded, ids, mask), expected)


def test_loading_onto_another_checkpoint_raises_and_leaves_the_model_alone(tmp_path):
    model = modulora.attach(tiny_model("llama", seed=0), method_config("modula-res"))
    model.save_pretrained(tmp_path)
    other = tiny_model("llama", seed=123)
    before = {n: p.clone() for n, p in other.state_dict().items()}
    modules = [type(m) for m in other.modules()]
    with pytest.raises(ValueError, match="fingerprint"):
        modulora.load(other, tmp_path)
    assert [type(m) for m in other.modules()] == modules
    assert all(torch.equal(p, before[n]) for n, p in other.state_dict().items())
    with pytest.warns(UserWarning, match="fingerprint"):
        modulora.load(other, tmp_path, strict=False)


@pytest.mark.parametrize("family", ["qwen2", "gpt2"])
def test_loading_onto_another_architecture_raises(family, tmp_path):
    modulora.attach(tiny_model("llama"), method_config("molora")).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="saved for a LlamaForCausalLM"):
        modulora.load(tiny_model(family), tmp_path)


def test_loading_onto_other_shapes_raises(tmp_path):
    modulora.attach(tiny_model("llama"), method_config("lora")).save_pretrained(tmp_path)
    wide = tiny_model("llama", hidden=64)
    with pytest.raises(ValueError, match="hidden size 32"):
        modulora.load(wide, tmp_path)


def test_a_corrupt_expert_file_is_refused_and_the_base_restored(tmp_path):
    model = modulora.attach(tiny_model("llama"), method_config("cgc-lora"))
    model.save_pretrained(tmp_path)
    path = tmp_path / "experts" / "specific-med.safetensors"
    tensors = load_file(str(path))
    key = next(iter(tensors))
    tensors[key] = torch.zeros(1, 1)
    save_file(tensors, str(path))
    base = tiny_model("llama")
    names = sorted(n for n, _ in base.named_modules())
    with pytest.raises(ValueError, match="shape"):
        modulora.load(base, tmp_path)
    assert sorted(n for n, _ in base.named_modules()) == names
    assert all(not hasattr(m, "modulora_experts") for m in base.modules())


def test_missing_or_foreign_folders_give_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="manifest.json"):
        modulora.load(tiny_model(), tmp_path)
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        modulora.load(tiny_model(), tmp_path)
    (tmp_path / "manifest.json").write_text(json.dumps({"format": "peft"}))
    with pytest.raises(ValueError, match="not a modulora manifest"):
        modulora.load(tiny_model(), tmp_path)


def test_fingerprint_ignores_dtype_but_not_values():
    from modulora.checkpoint import fingerprint

    a = tiny_model("llama", seed=0)
    assert fingerprint(a) == fingerprint(tiny_model("llama", seed=0).to(torch.bfloat16))
    assert fingerprint(a) != fingerprint(tiny_model("llama", seed=1))


def test_resaving_overwrites_in_place(tmp_path):
    model = modulora.attach(tiny_model("llama"), method_config("multi-lora"))
    model.save_pretrained(tmp_path)
    randomize_adapters(model)
    model.save_pretrained(tmp_path)
    loaded = modulora.load(tiny_model("llama"), tmp_path)
    for name in model.expert_names():
        mine, theirs = model.expert_state(name), loaded.expert_state(name)
        assert all(torch.equal(mine[k], theirs[k]) for k in mine)
