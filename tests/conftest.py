"""Tiny random models of four families, built from configs in code (no downloads)."""

from __future__ import annotations

import subprocess

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    GPT2Config,
    LlamaConfig,
    Qwen2Config,
)

import modulora

VOCAB = 97
TASKS = ["math", "med", "code"]


def _config(family: str, hidden: int = 32, vocab: int = VOCAB):
    if family == "gpt2":
        return GPT2Config(vocab_size=vocab, n_embd=hidden, n_layer=2, n_head=4, n_positions=64)
    decoder = {
        "vocab_size": vocab,
        "hidden_size": hidden,
        "intermediate_size": 48,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
    }
    if family == "gemma3":
        return Gemma3TextConfig(head_dim=8, sliding_window=16, **decoder)
    return {"llama": LlamaConfig, "qwen2": Qwen2Config}[family](**decoder)


FAMILIES = ["llama", "qwen2", "gpt2", "gemma3"]


def tiny_model(family: str = "llama", seed: int = 0, hidden: int = 32, vocab: int = VOCAB):
    torch.manual_seed(seed)
    cfg = _config(family, hidden, vocab)
    # Gemma3's auto class maps to the multimodal model; take the text-only class
    model = Gemma3ForCausalLM(cfg) if family == "gemma3" else AutoModelForCausalLM.from_config(cfg)
    # GPT-2 and others use dropout; evaluation mode keeps forward passes deterministic
    return model.eval().float()


def method_config(method: str, **overrides) -> modulora.MixtureConfig:
    kw = {"method": method, "tasks": list(TASKS), "rank": 4, "universal_rank": 6, "num_experts": 3}
    if method == "cgc-lora":
        kw["num_experts"] = 2
    if method == "loramoe":
        kw["knowledge_tasks"] = ["math"]
    kw.update(overrides)
    return modulora.MixtureConfig(**kw)


def batch(rows: int = 3, length: int = 6, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (rows, length), generator=g)
    mask = torch.ones_like(ids)
    mask[-1, :2] = 0  # left padding on one row
    return ids, mask


def randomize_adapters(model: modulora.MixtureModel, seed: int = 2, scale: float = 0.3) -> None:
    """Give every adapter tensor random values, as if trained (B is zero at init)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.adapter_parameters().values():
            p.copy_(torch.randn(p.shape, generator=g) * scale)


@pytest.fixture(params=FAMILIES)
def family(request):
    return request.param


@pytest.fixture
def no_network(monkeypatch):
    """Any pip (or other subprocess) call fails the test."""

    def refuse(*args, **kwargs):
        raise AssertionError(f"subprocess.run called: {args}")

    monkeypatch.setattr(subprocess, "run", refuse)
