"""Gates and auxiliary losses, checked against their definitions."""

from __future__ import annotations

import pytest
import torch
from conftest import TASKS, batch, method_config, randomize_adapters, tiny_model

import modulora
from modulora.gates import LoramoeBalance, Route, TokenRouter, load_balance_loss, z_loss


def test_top_k_keeps_k_experts_and_renormalises():
    router = TokenRouter(16, 6, top_k=2, init_std=1.0)
    x = torch.randn(4, 5, 16)
    w = router(x, None).weights
    assert w.shape == (4, 5, 6)
    assert ((w > 0).sum(-1) == 2).all()
    torch.testing.assert_close(w.sum(-1), torch.ones(4, 5))
    dense = TokenRouter(16, 6, top_k=None, init_std=1.0)
    dense.weight.data.copy_(router.weight.data)
    probs = dense(x, None).weights
    top = probs.topk(2, dim=-1).indices
    assert torch.equal(w.topk(2, dim=-1).indices.sort(-1).values, top.sort(-1).values)


def test_load_balance_is_one_for_even_routing_and_larger_when_skewed():
    even = torch.full((10, 4), 0.25)
    idx = torch.arange(10).remainder(4)[:, None]
    assert load_balance_loss(even, idx).item() == pytest.approx(1.0)
    skewed = torch.tensor([[0.97, 0.01, 0.01, 0.01]]).expand(10, 4)
    assert load_balance_loss(skewed, None).item() == pytest.approx(4 * 0.97)


def test_padding_is_left_out_of_aux_losses():
    probs = torch.tensor([[[0.9, 0.1], [0.1, 0.9]]])  # (1, 2, 2)
    mask = torch.tensor([[1, 0]])
    assert load_balance_loss(probs, None, mask).item() == pytest.approx(2 * 0.9)
    logits = torch.tensor([[[0.0, 0.0], [5.0, 5.0]]])
    assert z_loss(logits, mask).item() == pytest.approx(torch.log(torch.tensor(2.0)).item() ** 2)


def test_loramoe_balance_matches_its_formula():
    torch.manual_seed(0)
    weights = torch.rand(3, 4, 4).softmax(-1)
    knowledge = torch.tensor([True, False, True])
    loss = LoramoeBalance(n_knowledge=2, beta=0.5, delta=0.1)(
        weights, None, Route(knowledge=knowledge)
    )
    q = weights.sum(1)
    importance = torch.empty_like(q)
    for b in range(3):
        for e in range(4):
            same = knowledge[b].item() == (e < 2)
            importance[b, e] = (1.1 if same else 0.9) * q[b, e]
    cv2 = importance.var(unbiased=False) / importance.mean() ** 2
    assert loss.item() == pytest.approx(0.5 * cv2.item(), rel=1e-6)


def test_aux_losses_are_exposed_and_added_to_the_loss():
    cfg = method_config("molora", balance_coef=0.01, z_loss_coef=0.001, top_k=2)
    model = modulora.attach(tiny_model("llama"), cfg)
    randomize_adapters(model)
    ids, mask = batch()
    out = model(input_ids=ids, attention_mask=mask, labels=ids)
    assert set(out.aux_losses) == {"load_balance", "z_loss"}
    assert out.aux_loss.item() == pytest.approx(sum(v.item() for v in out.aux_losses.values()))
    with torch.no_grad():
        plain = model.base_model(input_ids=ids, attention_mask=mask, labels=ids).loss
    assert out.loss.item() == pytest.approx(plain.item() + out.aux_loss.item(), rel=1e-5)
    assert out.aux_losses["load_balance"].item() >= 0.01 * 0.99  # E * sum f P >= 1


def test_loramoe_reports_its_localized_balancing_loss():
    model = modulora.attach(tiny_model("llama"), method_config("loramoe"))
    randomize_adapters(model)
    ids, mask = batch()
    out = model(input_ids=ids, attention_mask=mask, labels=ids, task=list(TASKS))
    assert set(out.aux_losses) == {"loramoe_balance"}
    assert out.aux_loss.item() > 0
    out.loss.backward()
    router = next(iter(model.layers.values())).modulora_router
    assert router.weight.grad is not None and router.weight.grad.abs().sum() > 0


def test_task_gate_masks_other_tasks_specific_experts():
    model = modulora.attach(tiny_model("llama"), method_config("cgc-lora"))
    randomize_adapters(model)
    layer = next(iter(model.layers.values()))
    route = model.route(["med", "math", "med"], 3)
    out = layer.modulora_router(torch.zeros(3, 2, layer.d_in), route)
    names = [layer.modulora_experts.names[i] for i in out.select]
    assert names == ["common:0", "common:1", "specific:math", "specific:med"]
    w = out.weights.squeeze(1)  # (B, E_sel)
    torch.testing.assert_close(w.sum(-1), torch.ones(3))
    assert (w[0, 2] == 0) and (w[1, 3] == 0) and (w[0, 3] > 0) and (w[1, 2] > 0)
