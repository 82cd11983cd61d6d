"""Loading the base model and tokenizer a run names.

``model:`` in a run config is a local Hugging Face model folder (``config.json``,
weights, tokenizer files). Nothing is fetched from the hub: a name that is not a
local folder is an error that says so.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer

from ..run_config import ConfigError


def load_base(name_or_path: str, dtype: torch.dtype = torch.float32) -> tuple[nn.Module, object]:
    """(model, tokenizer) from a local Hugging Face model folder, on CPU, in ``dtype``.

    Raises:
        ConfigError: the folder does not exist or has no ``config.json``/tokenizer.
    """
    path = Path(name_or_path)
    if not (path / "config.json").is_file():
        raise ConfigError(
            f"model {name_or_path!r} is not a local Hugging Face model folder (no config.json); "
            "modulora never downloads from the hub: save the model locally and give its path"
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
