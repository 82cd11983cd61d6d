"""Saving and loading adapters: ``manifest.json`` + one safetensors file per expert.

Layout of a saved adapter (a run folder uses the same files)::

    manifest.json                  method, config, tasks, experts, base model facts
    experts/<expert>.safetensors   one file per expert: pluggable, copyable
    router.safetensors             routers, task gates, MoE-CT fusion
    base_io.safetensors            MoE-CT with train_embeddings only

Every file is written to a temporary name and renamed, so a crash never leaves a
half-written file under the real name. Weights are read with safetensors only.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import warnings
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .config import MixtureConfig
from .layers import MixtureLinear
from .model import MixtureModel
from .moe_ffn import MoEFFN

FORMAT, VERSION = "modulora", 1
SAMPLE = 1024  # values sampled per tensor for the base fingerprint


def fingerprint(model: nn.Module) -> str:
    """A short hash of the base weights: names, shapes and a strided sample of values.

    Values are rounded to bf16 first, so the same checkpoint loaded in fp32 or bf16
    gives the same fingerprint while another checkpoint (or random init) does not.
    """
    h = hashlib.sha256()
    for name, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):
        flat = p.detach().reshape(-1)
        sample = flat[:: max(1, flat.numel() // SAMPLE)][:SAMPLE]
        h.update(f"{name}:{tuple(p.shape)}".encode())
        h.update(sample.to(torch.bfloat16).float().cpu().numpy().tobytes())
    return h.hexdigest()[:32]


def expert_state(model: MixtureModel, name: str) -> dict[str, torch.Tensor]:
    """One expert's tensors in every adapted layer, keyed ``<layer>.<tensor>``."""
    names = model.expert_names()
    if name not in names:
        raise ValueError(f"unknown expert {name!r}; experts: {names}")
    layout = model.method.layout(model.mixture_config)
    out = {}
    for lname, layer in model.layers.items():
        if isinstance(layer, MoEFFN):
            k = [e.name for e in layout.experts].index(name)
            for sub, lin in layer.expert_linears():
                for t, v in lin.expert_tensors(k).items():
                    out[f"{lname}.{sub}.{t}"] = v
            continue
        for bank in (layer.modulora_experts, layer.modulora_universal):
            if bank is not None and name in bank.names:
                for t, v in bank.expert_tensors(name).items():
                    out[f"{lname}.{t}"] = v
    return out


def router_state(model: MixtureModel) -> dict[str, torch.Tensor]:
    """Routers, task gates and learned fusions, keyed by layer (``shared_gate.`` if shared)."""
    out = {}
    shared = model.modulora_shared_gate
    for lname, layer in model.layers.items():
        modules = {
            "router": layer.modulora_router,
            "fusion": getattr(layer, "modulora_fusion", None),
        }
        for label, module in modules.items():
            if module is None or module is shared:
                continue
            if isinstance(module, nn.Parameter):
                out[f"{lname}.{label}"] = module
            else:
                out.update({f"{lname}.{label}.{n}": p for n, p in module.named_parameters()})
    if shared is not None:
        out.update({f"shared_gate.{n}": p for n, p in shared.named_parameters()})
    return out


def base_io_state(model: MixtureModel) -> dict[str, torch.Tensor]:
    """Input embeddings and LM head (saved only when MoE-CT trains them)."""
    out, seen = {}, set()
    base = model.base_model
    for label, module in (
        ("input", base.get_input_embeddings()),
        ("output", base.get_output_embeddings()),
    ):
        if module is not None and id(module.weight) not in seen:  # tied weights: once
            seen.add(id(module.weight))
            out[f"{label}.weight"] = module.weight
    return out


def _file_name(expert: str) -> str:
    return "experts/" + expert.replace(":", "-") + ".safetensors"


def atomic_write(path: Path, write) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _save_tensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    # clone: slices of stacked parameters share storage, which safetensors refuses
    data = {k: v.detach().cpu().clone().contiguous() for k, v in tensors.items()}
    atomic_write(path, lambda tmp: save_file(data, tmp, metadata={"format": "pt"}))


def _layer_dims(layer: MixtureLinear | MoEFFN, d_model: int) -> list[int]:
    return [d_model, d_model] if isinstance(layer, MoEFFN) else [layer.d_in, layer.d_out]


def save(
    model: MixtureModel,
    directory: str | Path,
    extra: dict | None = None,
    only: list[str] | None = None,
) -> None:
    """Write the adapter of ``model`` to ``directory`` (see module docstring).

    ``extra`` entries (e.g. a run's ``stages_done``) are added to the manifest.
    ``only`` writes only those experts (plus the router): a partial adapter, such
    as what one stage trained, loaded with ``load_weights(..., partial=True)``.
    """
    from . import __version__
    from .inject import hidden_size

    root = Path(directory)
    cfg = model.mixture_config
    layout = model.method.layout(cfg)
    experts = []
    for spec in layout.all_experts():
        if only is not None and spec.name not in only:
            continue
        _save_tensors(model.expert_state(spec.name), root / _file_name(spec.name))
        experts.append(
            {
                "name": spec.name,
                "role": spec.role,
                "rank": spec.rank,
                "alpha": spec.alpha,
                "task": spec.task,
                "file": _file_name(spec.name),
                "targets": list(model.layers),
            }
        )
    routers = router_state(model)
    _save_tensors(routers, root / "router.safetensors")
    base_io = None
    if cfg.train_embeddings:
        base_io = "base_io.safetensors"
        _save_tensors(base_io_state(model), root / base_io)
    base = model.base_model
    d_model = hidden_size(base)
    manifest = {
        "format": FORMAT,
        "version": VERSION,
        "modulora_version": __version__,
        "method": cfg.method,
        "paper": model.method.paper,
        "config": cfg.to_dict(),
        "tasks": cfg.tasks,
        "stage": model.stage,
        "experts": experts,
        "partial": only is not None,
        "router_file": "router.safetensors",
        "base_io_file": base_io,
        "base_model": {
            "class": type(base).__name__,
            "name_or_path": getattr(base.config, "_name_or_path", ""),
            "model_type": getattr(base.config, "model_type", ""),
            "hidden_size": d_model,
            "fingerprint": model.base_fingerprint,
            "targets": {n: _layer_dims(layer, d_model) for n, layer in model.layers.items()},
        },
    }
    manifest.update(extra or {})
    text = json.dumps(manifest, indent=2)
    atomic_write(root / "manifest.json", lambda tmp: Path(tmp).write_text(text))


def read_manifest(directory: str | Path) -> dict:
    path = Path(directory) / "manifest.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: not a modulora adapter folder")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from e
    if manifest.get("format") != FORMAT or manifest.get("version", 0) > VERSION:
        raise ValueError(f"{path} is not a modulora manifest of version <= {VERSION}")
    return manifest


def check_base(model: nn.Module, manifest: dict, directory, strict: bool = True) -> None:
    """Raise before any change if ``model`` is not the base the adapter was trained on."""
    from .inject import hidden_size

    info = manifest["base_model"]
    where = f"adapter {directory}"
    if type(model).__name__ != info["class"]:
        raise ValueError(f"{where} was saved for a {info['class']}, not a {type(model).__name__}")
    if hidden_size(model) != info["hidden_size"]:
        raise ValueError(
            f"{where} expects hidden size {info['hidden_size']}, the model has {hidden_size(model)}"
        )
    modules = dict(model.named_modules())
    for name, dims in info["targets"].items():
        if name not in modules:
            raise ValueError(f"{where} adapts module {name!r}, which this model does not have")
        module = modules[name]
        if isinstance(module, MixtureLinear | MoEFFN):
            raise ValueError(f"module {name!r} is already adapted; load onto a fresh base model")
        if not isinstance(dims, list) or len(dims) != 2:
            raise ValueError(f"{where}: bad target entry for {name!r}: {dims!r}")
    found = fingerprint(model)
    if found != info["fingerprint"]:
        msg = (
            f"{where} was trained on base weights with fingerprint {info['fingerprint']}, "
            f"but this model's is {found}: a different checkpoint"
        )
        if strict:
            raise ValueError(msg + " (pass strict=False to load anyway)")
        warnings.warn(msg, stacklevel=3)


def _read_tensors(root: Path, rel: str) -> dict[str, torch.Tensor]:
    path = root / rel
    if not path.is_file():
        raise FileNotFoundError(f"{path} is listed in the manifest but missing")
    return load_file(str(path))


def _check_fits(
    target: dict[str, torch.Tensor], source: dict[str, torch.Tensor], what: str
) -> None:
    if set(target) != set(source):
        missing, extra = sorted(set(target) - set(source)), sorted(set(source) - set(target))
        raise ValueError(f"{what}: missing keys {missing[:5]}, unexpected keys {extra[:5]}")
    for k, t in target.items():
        if tuple(t.shape) != tuple(source[k].shape):
            raise ValueError(
                f"{what}: {k} has shape {tuple(source[k].shape)}, expected {tuple(t.shape)}"
            )


def _copy_into(target: dict[str, torch.Tensor], source: dict[str, torch.Tensor]) -> None:
    with torch.no_grad():
        for k, t in target.items():
            t.copy_(source[k].to(t.dtype))


def load_weights(
    mixture: MixtureModel, directory: str | Path, partial: bool = False, router: bool = True
) -> None:
    """Copy the weights saved in ``directory`` into ``mixture`` (same config), in place.

    Every file is read and checked before any weight is changed. ``partial`` accepts
    an adapter holding only some of the model's experts (the others are left as they are);
    ``router=False`` leaves the routers as they are.

    Raises:
        FileNotFoundError / ValueError: missing or corrupt files, experts or shapes that
            do not match ``mixture``.
    """
    root = Path(directory)
    manifest = read_manifest(root)
    files = {e["name"]: _read_tensors(root, e["file"]) for e in manifest["experts"]}
    routers = _read_tensors(root, manifest["router_file"])
    base_io = (
        _read_tensors(root, manifest["base_io_file"]) if manifest.get("base_io_file") else None
    )
    names = mixture.expert_names()
    if (not set(files) <= set(names)) if partial else sorted(files) != sorted(names):
        raise ValueError(
            f"{root}: manifest experts {sorted(files)} do not match the model's "
            f"{sorted(mixture.expert_names())}"
        )
    pairs = [(mixture.expert_state(n), t, str(root / _file_name(n))) for n, t in files.items()]
    if router:
        pairs.append((router_state(mixture), routers, str(root / manifest["router_file"])))
    if base_io is not None:
        pairs.append((base_io_state(mixture), base_io, str(root / manifest["base_io_file"])))
    for target, source, what in pairs:
        _check_fits(target, source, what)
    for target, source, _ in pairs:
        _copy_into(target, source)


def load(model: nn.Module, directory: str | Path, strict: bool = True) -> MixtureModel:
    """Attach the adapter saved in ``directory`` to ``model`` (its base) and load its weights.

    The base is checked (class, hidden size, target modules, weight fingerprint)
    before it is changed; if a weight file then does not fit, the model is put back
    as it was before the error is raised. The result is in the ``inference`` stage.

    Raises:
        FileNotFoundError / ValueError: not an adapter, wrong base, corrupt files.
    """
    root = Path(directory)
    manifest = read_manifest(root)
    cfg = MixtureConfig.from_dict(manifest["config"])
    check_base(model, manifest, root, strict)
    mixture = MixtureModel(model, cfg)
    try:
        load_weights(mixture, root)
    except Exception:
        mixture.detach()
        raise
    mixture.set_stage("inference")
    return mixture
