"""modulora's plain LoRA computes what PEFT's LoRA computes, weight for weight."""

from __future__ import annotations

import pytest
import torch
from conftest import batch, method_config, randomize_adapters, tiny_model
from peft import LoraConfig, get_peft_model

import modulora


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_lora_matches_peft_lora(family):
    ours = modulora.attach(tiny_model(family), method_config("lora", rank=4))
    randomize_adapters(ours)
    ours.set_stage("inference")
    peft_model = get_peft_model(
        tiny_model(family),
        LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.0),
    )
    modules = dict(peft_model.base_model.model.named_modules())
    assert set(ours.layers) <= set(modules)
    with torch.no_grad():
        for name, layer in ours.layers.items():
            target = modules[name]
            target.lora_A["default"].weight.copy_(layer.modulora_experts.A[0])
            target.lora_B["default"].weight.copy_(layer.modulora_experts.B[0])
    ids, mask = batch()
    with torch.no_grad():
        expected = peft_model(input_ids=ids, attention_mask=mask).logits
        got = ours(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    n_peft = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    ours.set_stage("joint")
    assert ours.trainable_parameters() == n_peft
