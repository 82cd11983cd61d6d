"""modulora: mixtures of LoRA experts for Hugging Face causal language models.

>>> import modulora
>>> cfg = modulora.MixtureConfig(method="modula-res", tasks=["math", "code"])
>>> model = modulora.attach(hf_model, cfg)          # doctest: +SKIP
"""

__version__ = "0.1.0"

from .checkpoint import load
from .config import METHODS, MixtureConfig
from .merge import NotMergeableError, export_merged, export_peft
from .model import MixtureModel, attach

__all__ = [
    "METHODS",
    "MixtureConfig",
    "MixtureModel",
    "NotMergeableError",
    "__version__",
    "attach",
    "export_merged",
    "export_peft",
    "load",
]
