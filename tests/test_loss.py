"""The training loss projects only labelled positions to logits, with the same result."""

from __future__ import annotations

import pytest
import torch
from conftest import FAMILIES, method_config, randomize_adapters, tiny_model

import modulora
from modulora import train
from modulora.train import _labelled_positions, _token_loss, resolve_precision


def _batch(rows: int = 3, length: int = 12):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 90, (rows, length), generator=g)
    labels = torch.full_like(ids, -100)
    for r, start in enumerate([9, 7, 10][:rows]):  # short responses at different offsets
        labels[r, start:] = ids[r, start:]
    mask = torch.ones_like(ids)
    mask[2, -1:] = 0
    labels[2, -1:] = -100
    return {"input_ids": ids, "attention_mask": mask, "labels": labels, "task": ["math"] * rows}


def _loss_and_grads(model, batch):
    model.zero_grad()
    loss, aux = _token_loss(model, batch, model)
    (loss + aux).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), grads


@pytest.mark.parametrize("family", FAMILIES)
def test_kept_positions_give_the_full_loss_and_gradients(family, monkeypatch):
    model = modulora.attach(tiny_model(family), method_config("molora"))
    randomize_adapters(model)
    model.set_stage("joint")
    batch = _batch()
    keep = _labelled_positions(batch["labels"][:, 1:], model)
    assert model.accepts_logits_to_keep and keep is not None
    assert keep.tolist() == [6, 7, 8, 9, 10]  # union over rows of positions predicting a label
    loss, grads = _loss_and_grads(model, batch)
    monkeypatch.setattr(train, "_labelled_positions", lambda labels, core: None)
    full_loss, full_grads = _loss_and_grads(model, batch)
    torch.testing.assert_close(loss, full_loss, rtol=1e-5, atol=1e-6)
    assert grads.keys() == full_grads.keys() and grads
    for name, g in grads.items():
        torch.testing.assert_close(g, full_grads[name], rtol=1e-4, atol=1e-6, msg=name)


def test_fully_labelled_text_keeps_every_logit():
    model = modulora.attach(tiny_model(), method_config("lora"))
    labels = torch.arange(20).reshape(2, 10)
    assert _labelled_positions(labels, model) is None


def test_auto_precision_follows_the_hardware(monkeypatch):
    monkeypatch.setattr(train, "native_bf16", lambda: False)
    assert resolve_precision("auto") == "fp32"
    monkeypatch.setattr(train, "native_bf16", lambda: True)
    assert resolve_precision("auto") == "bf16"
    assert resolve_precision("fp32") == "fp32"
