"""A tiny byte-level tokenizer and model folder built in code, for data and CLI tests.

The tokenizer is a byte-level BPE trained on a few sentences in milliseconds, so it
encodes any text; ``chat=True`` gives it a small chat template (like an instruct
model), ``chat=False`` leaves it without one (like a base model).
"""

from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
SPECIALS = ["<pad>", "<eos>", "<|user|>", "<|assistant|>", "<|system|>", "<|end|>"]
CORPUS = [
    "the quick brown fox jumps over the lazy dog",
    "reverse upper lower copy: abc def ghi jkl mno pqr stu vwx yz 0123456789",
    "### Prompt: ### Response: user assistant system",
]


def chat_prompt(tok, messages: list[dict]) -> list[int]:
    """Token ids of ``messages`` plus the generation prompt, rendered by hand from
    ``CHAT_TEMPLATE`` (not with modulora's prompt builder, which tests check against it)."""
    text = "".join(f"<|{m['role']}|>{m['content']}<|end|>\n" for m in messages) + "<|assistant|>"
    return tok(text, add_special_tokens=False)["input_ids"]


def tokenizer(chat: bool = True) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>")
    if chat:
        fast.chat_template = CHAT_TEMPLATE
    return fast


def model_dir(path: str | Path, chat: bool = True, seed: int = 0, hidden: int = 32) -> Path:
    """Write a tiny random Llama and the tokenizer to ``path``, as a user's model folder."""
    import torch

    tok = tokenizer(chat)
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=hidden,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
    )
    path = Path(path)
    LlamaForCausalLM(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return path


# --- a learnable synthetic multi-task set: each task a different string transformation ---

TRANSFORMS = {
    "reverse": lambda s: s[::-1],
    "upper": str.upper,
    "copy": lambda s: s,
    "sort": lambda s: "".join(sorted(s)),
    "double": lambda s: "".join(c + c for c in s),
}


def records(task: str, n: int, seed: int = 0, task_field: bool = True) -> list[dict]:
    import random

    rng = random.Random(f"{task}:{seed}")
    out = []
    for _ in range(n):
        word = "".join(rng.choice("abcdefgh") for _ in range(rng.randint(3, 6)))
        rec = {"prompt": f"{task}: {word}", "response": TRANSFORMS[task](word)}
        out.append({"task": task, **rec} if task_field else rec)
    return out


def write_jsonl(path: str | Path, rows: list[dict]) -> Path:
    import json

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def write_run(
    folder: str | Path,
    method: str,
    model: str | Path,
    tasks=("reverse", "upper"),
    n: int = 48,
    universal: bool = True,
    **sections,
) -> Path:
    """Write task data and a run YAML into ``folder``; ``sections`` override YAML keys.

    ``tasks``: names of ``TRANSFORMS`` tasks (their data is written), or the YAML's
    ``tasks`` mapping itself."""
    import yaml

    folder = Path(folder)
    cfg = {
        "model": str(model),
        "method": method,
        "tasks": tasks  # a dict: the YAML's tasks as given
        if isinstance(tasks, dict)
        else {
            t: {"train": str(write_jsonl(folder / f"data/{t}.jsonl", records(t, n)))} for t in tasks
        },
        "adapter": {"rank": 4, "universal_rank": 8, "num_experts": 2},
        "train": {
            "batch_size": 8,
            "lr": 3e-3,
            "max_length": 48,
            "epochs": 1,
            "seed": 0,
            "eval_every": 0,
            "save_every": 0,
            "warmup_ratio": 0.0,
        },
        "output_dir": str(folder / "run"),
    }
    if universal:
        general = [r for t in TRANSFORMS for r in records(t, n // 4, seed=9, task_field=False)]
        cfg["universal"] = {"train": str(write_jsonl(folder / "data/general.jsonl", general))}
    for key, value in sections.items():
        if isinstance(value, dict) and isinstance(cfg.get(key), dict):
            cfg[key] = {**cfg[key], **value}
        else:
            cfg[key] = value
    path = folder / "run.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False), encoding="utf-8")
    return path
