"""Contract tests over the matrix of methods x model families (tiny random models)."""

from __future__ import annotations

import pytest
import torch
from conftest import FAMILIES, TASKS, batch, method_config, randomize_adapters, tiny_model
from reference import use_fused, use_reference

import modulora
from modulora.gates import TaskGate
from modulora.layers import MixtureLinear
from modulora.moe_ffn import MoEFFN

METHODS = list(modulora.METHODS)
TASK_GATED = {"multi-lora", "cgc-lora", "moelora"}


def rows_task(stage: str = "inference") -> list[str]:
    if stage.startswith("domain:"):
        return [stage.split(":", 1)[1]] * 3
    return list(TASKS)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("fam", FAMILIES)
def test_attach_starts_as_the_base_model(method, fam):
    base = tiny_model(fam)
    ids, mask = batch()
    with torch.no_grad():
        expected = base(input_ids=ids, attention_mask=mask).logits
    model = modulora.attach(base, method_config(method))
    assert model.layers, "no layer was adapted"
    for name, p in model.named_parameters():
        assert p.requires_grad == ("modulora_" in name) or not p.requires_grad
    frozen = [n for n, p in model.named_parameters() if "modulora_" not in n and p.requires_grad]
    assert frozen == []
    model.set_stage("inference")
    with torch.no_grad():
        got = model(input_ids=ids, attention_mask=mask, task=rows_task()).logits
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    if method != "moe-ct":  # B = 0 makes every LoRA expert an exact no-op
        assert torch.equal(got, expected)


def _grads(model) -> dict[str, torch.Tensor]:
    return {
        n: (p.grad.clone() if p.grad is not None else torch.zeros_like(p))
        for n, p in model.adapter_parameters().items()
    }


def _stages(method: str) -> list[str]:
    cfg = method_config(method)
    plan = modulora.attach(tiny_model(), cfg).method.plan(cfg)
    return sorted(set(plan[:2] + plan[-1:] + ["inference"]))


CASES = [
    (m, s, k)
    for m in METHODS
    for s in _stages(m)
    for k in (None, 2)
    if k is None or m in {"molora", "modula-flan", "modula-res", "loramoe", "moe-ct"}
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(("method", "stage", "top_k"), CASES)
def test_fused_path_equals_reference(method, stage, top_k, dtype):
    fam = "gpt2" if method in {"moe-ct", "cgc-lora"} else "llama"  # Conv1D too
    model = modulora.attach(tiny_model(fam).to(dtype), method_config(method, top_k=top_k))
    model.to(dtype)
    randomize_adapters(model, scale=0.1)
    model.set_stage(stage)
    for p in model.adapter_parameters().values():
        p.requires_grad_(True)  # compare every gradient, not only the stage's
    ids, mask = batch()
    gen = torch.Generator().manual_seed(3)
    weights = torch.randn(ids.shape[0], ids.shape[1], 97, generator=gen, dtype=dtype)
    results = []
    for swap in (use_fused, use_reference):
        swap(model)
        model.zero_grad(set_to_none=True)
        logits = model(input_ids=ids, attention_mask=mask, task=rows_task(stage)).logits
        (logits * weights).sum().backward()
        results.append((logits.detach(), _grads(model)))
    use_fused(model)
    (fused, g_fused), (ref, g_ref) = results
    # fp32: 1e-5 (sums in another order differ by ~1e-6); fp64 shows the math is the same
    tol = 1e-5 if dtype == torch.float32 else 1e-10
    torch.testing.assert_close(fused, ref, atol=tol, rtol=tol)
    assert g_fused.keys() == g_ref.keys()
    for name in g_fused:
        torch.testing.assert_close(
            g_fused[name], g_ref[name], atol=tol, rtol=tol, msg=lambda m, n=name: f"{n}: {m}"
        )
    assert any(g.abs().sum() > 0 for g in g_fused.values())


def _owner(model, name: str) -> str:
    """Which expert / gate part a parameter belongs to, from its name alone."""
    layer_name, _, rest = name.partition(".modulora_")
    layer = model.base_model.get_submodule(layer_name.removeprefix("base_model."))
    if rest.startswith(("experts.", "universal.")):
        bank = layer.modulora_experts if rest.startswith("experts.") else layer.modulora_universal
        return "expert:" + bank.names[int(rest.rsplit(".", 1)[1])]
    if rest.startswith("router.") and isinstance(layer.modulora_router, TaskGate):
        kind, idx = rest.split(".")[1:3]
        if kind == "emb":
            return "emb:" + model.mixture_config.tasks[int(idx)]
        return "row:" + model.method.layout(model.mixture_config).experts[int(idx)].name
    if rest.startswith(("router", "fusion")):
        return "router"
    if rest.startswith("ffn."):
        return "expert:ffn"
    raise AssertionError(name)


def _expected(method: str, stage: str, owner: str) -> bool:
    """What METHODS.md says each stage trains, written out independently of the code."""
    if stage == "inference":
        return False
    if stage == "joint":
        return True
    if stage == "universal":
        return owner == "expert:universal"
    if stage == "router":
        return owner == "router"
    task = stage.split(":", 1)[1]
    if method in {"modula-flan", "modula-res", "multi-lora"}:
        return owner == f"expert:domain:{task}"
    if method in {"cgc-lora", "moelora"}:
        return owner in {f"expert:specific:{task}", f"emb:{task}", f"row:specific:{task}"}
    raise AssertionError((method, stage))


def _stage_cases():
    out = []
    for method in METHODS:
        cfg = method_config(method)
        plan = modulora.attach(tiny_model(), cfg).method.plan(cfg)
        extra = ["domain:med"] if method == "cgc-lora" else []
        extra += ["joint"] if method == "multi-lora" else []
        out += [(method, s) for s in plan + extra + ["inference"]]
    return out


@pytest.mark.parametrize(("method", "stage"), _stage_cases())
def test_one_step_changes_exactly_the_stage_parameters(method, stage):
    model = modulora.attach(tiny_model("llama"), method_config(method))
    randomize_adapters(model)
    model.set_stage(stage)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainable = [p for p in model.parameters() if p.requires_grad]
    ids, mask = batch()
    out = model(input_ids=ids, attention_mask=mask, labels=ids, task=rows_task(stage))
    if trainable:
        opt = torch.optim.Adam(trainable, lr=1e-2)
        out.loss.backward()
        opt.step()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    for name in before:
        if "modulora_" not in name:
            assert name not in changed, f"base weight {name} changed in stage {stage}"
            continue
        want = _expected(method, stage, _owner(model, name))
        assert (name in changed) == want, (
            f"{stage}: {name} changed={name in changed}, expected {want}"
        )


@pytest.mark.parametrize("method", [m for m in METHODS if m != "lora"])
def test_add_task_keeps_old_experts_and_old_outputs(method):
    model = modulora.attach(tiny_model("llama"), method_config(method))
    randomize_adapters(model)
    model.set_stage("inference")
    old = {
        e: {k: v.clone() for k, v in model.expert_state(e).items()} for e in model.expert_names()
    }
    ids, mask = batch()
    with torch.no_grad():
        before = model(input_ids=ids, attention_mask=mask, task=list(TASKS)).logits
    model.add_task("finance", rank=None if method in {"molora", "loramoe", "moe-ct"} else 5)
    for name, tensors in old.items():
        now = model.expert_state(name)
        assert all(torch.equal(now[k], v) for k, v in tensors.items()), name
    new = [e for e in model.expert_names() if e not in old]
    assert len(new) == 1
    layer = next(iter(model.layers.values()))
    if isinstance(layer, MixtureLinear):
        assert len(layer.modulora_experts) == len(old) + 1 - (method == "modula-res")
        assert not layer.modulora_experts.B[-1].any(), "a new expert must start as a no-op"
    if method in TASK_GATED:
        with torch.no_grad():
            after = model(input_ids=ids, attention_mask=mask, task=list(TASKS)).logits
        assert torch.equal(after, before)
        model(input_ids=ids, attention_mask=mask, task=["finance", "math", "finance"])
    assert "finance" in model.mixture_config.tasks


def test_add_task_grows_routers_by_one_output():
    model = modulora.attach(tiny_model("llama"), method_config("modula-res"))
    layer = next(iter(model.layers.values()))
    n = layer.modulora_router.weight.shape[0]
    old_rows = layer.modulora_router.weight.detach().clone()
    model.add_task("finance", rank=8)
    assert layer.modulora_router.weight.shape[0] == n + 1
    assert torch.equal(layer.modulora_router.weight[:n], old_rows)
    assert layer.modulora_experts.ranks[-1] == 8
    model.set_stage("domain:finance")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(
        "modulora_experts" in n and n.endswith(f".{len(TASKS)}") for n in trainable
    )


@pytest.mark.parametrize("top_k", [None, 2])
@pytest.mark.parametrize("method", ["modula-res", "modula-flan", "molora"])
def test_fused_equals_reference_with_added_task_masks(method, top_k):
    model = modulora.attach(tiny_model().double(), method_config(method, top_k=top_k)).double()
    model.add_task("finance")
    randomize_adapters(model, scale=0.1)
    model.set_stage("inference")
    for p in model.adapter_parameters().values():
        p.requires_grad_(True)
    ids, mask = batch()
    results = []
    for swap in (use_fused, use_reference):
        swap(model)
        model.zero_grad(set_to_none=True)
        logits = model(input_ids=ids, attention_mask=mask, task=["finance", "math", "med"]).logits
        logits.square().sum().backward()
        results.append((logits.detach(), _grads(model)))
    use_fused(model)
    (fused, g_fused), (ref, g_ref) = results
    torch.testing.assert_close(fused, ref, atol=1e-10, rtol=1e-10)
    for name in g_fused:
        torch.testing.assert_close(g_fused[name], g_ref[name], atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("method", ["modula-res", "modula-flan", "molora", "loramoe"])
def test_token_routed_old_tasks_are_bit_identical_after_add_task(method):
    """A row that names an old task routes over the experts that existed when it was
    trained; the new expert and its router row are not even computed for it. (fp64: a
    mixed batch computes one more expert, and fp32 sums of other widths differ by ~1e-5.)"""
    model = modulora.attach(tiny_model("llama").double(), method_config(method)).double()
    randomize_adapters(model)
    model.set_stage("inference")
    ids, mask = batch()
    with torch.no_grad():
        named = model(input_ids=ids, attention_mask=mask, task=list(TASKS)).logits
        plain = model(input_ids=ids, attention_mask=mask).logits
    assert torch.equal(named, plain)  # nothing added yet: the task changes nothing
    model.add_task("finance")
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():  # the new expert and new router rows as if trained
        for layer in model.layers.values():
            layer.modulora_experts.B[-1].copy_(
                torch.randn(layer.modulora_experts.B[-1].shape, generator=g, dtype=torch.float64)
            )
            layer.modulora_router.weight[-1].copy_(
                torch.randn(layer.d_in, generator=g, dtype=torch.float64)
            )
        after = model(input_ids=ids, attention_mask=mask, task=list(TASKS)).logits
        unnamed = model(input_ids=ids, attention_mask=mask).logits
        new = model(input_ids=ids, attention_mask=mask, task=["finance", "math", "med"]).logits
    assert torch.equal(after, named)
    assert not torch.allclose(unnamed, plain)  # without a task, every expert is routed
    torch.testing.assert_close(new[1:], named[1:], atol=1e-12, rtol=1e-12)  # mixed batch
    assert not torch.allclose(new[0], named[0])


def test_frozen_expert_stacks_are_reused_until_the_experts_change():
    model = modulora.attach(tiny_model(), method_config("molora"))
    randomize_adapters(model)
    model.set_stage("inference")
    ids, mask = batch()
    layer = next(iter(model.layers.values()))
    with torch.inference_mode():
        first = model(input_ids=ids, attention_mask=mask).logits
    A = layer.modulora_experts.stacked().A
    assert A is layer.modulora_experts.stacked().A  # reused, not concatenated again
    with torch.no_grad():
        for lay in model.layers.values():
            lay.modulora_experts.B[1].mul_(2.0)  # in place: the cache must notice
        changed = model(input_ids=ids, attention_mask=mask).logits
    assert not torch.allclose(changed, first)
    use_reference(model)
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask).logits
    use_fused(model)
    torch.testing.assert_close(changed, ref, atol=1e-5, rtol=1e-5)
    model.set_stage("joint")  # experts train again: concatenated in the graph, grads flow
    model(input_ids=ids, attention_mask=mask, labels=ids).loss.backward()
    assert layer.modulora_experts.B[1].grad is not None


@pytest.mark.parametrize(
    ("method", "stage", "top_k"),
    [
        ("lora", "joint", None),
        ("molora", "joint", None),
        ("molora", "joint", 2),
        ("modula-flan", "domain:med", None),
        ("modula-res", "universal", None),
        ("modula-res", "router", 2),
    ],
)
def test_expert_path_compiles_without_graph_breaks(method, stage, top_k):
    """torch.compile(fullgraph=True) traces an adapted layer whole: forward and backward."""
    model = modulora.attach(tiny_model(), method_config(method, top_k=top_k))
    randomize_adapters(model)
    model.set_stage(stage)
    layer = next(iter(model.layers.values()))
    x = torch.randn(2, 5, layer.d_in, requires_grad=True)
    eager = layer(x)
    compiled = torch.compile(layer, fullgraph=True, backend="eager")(x)
    torch.testing.assert_close(compiled, eager)
    compiled.sum().backward()
    trained = [p for p in layer.parameters() if p.requires_grad]
    assert trained and all(p.grad is not None for p in trained)


def test_moe_ct_layers_wrap_ffn_blocks_and_optionally_train_embeddings():
    model = modulora.attach(
        tiny_model("qwen2"),
        method_config("moe-ct", moe_ct_experts="copy", fusion="token", train_embeddings=True),
    )
    assert all(isinstance(layer, MoEFFN) for layer in model.layers.values())
    assert all(name.endswith("mlp") for name in model.layers)
    emb = model.base_model.get_input_embeddings().weight
    assert emb.requires_grad
    model.set_stage("inference")
    assert not emb.requires_grad


def test_loramoe_adapts_ffn_linears_only():
    model = modulora.attach(tiny_model("llama"), method_config("loramoe"))
    assert model.layers and all(".mlp." in name for name in model.layers)
