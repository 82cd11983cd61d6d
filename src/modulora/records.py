r"""Reading task data: JSONL/CSV files -> validated ``Record`` objects; seeded splits.

A ``.jsonl``/``.json`` file holds one JSON object per line, each one of::

    {"task": "math", "prompt": "...", "response": "..."}
    {"task": "math", "messages": [{"role": "user", "content": "..."}, {"role": "assistant", ...}]}
    {"text": "..."}

A ``.csv`` file has columns ``prompt,response`` or ``text``, optionally ``task``. A record
without a task takes the task its file is listed under. Every problem is a ``DataError``
whose message starts with ``"<path>:<line>: "``.
"""

from __future__ import annotations

import csv
import io
import json
import random
from collections.abc import Collection, Iterator
from dataclasses import dataclass
from pathlib import Path

ROLES = ("system", "user", "assistant")
_KIND_KEYS = {"prompt": ("prompt", "response"), "messages": ("messages",), "text": ("text",)}


class DataError(ValueError):
    """A problem in a data file; the message starts with ``"<path>:<line>: "``."""


@dataclass(frozen=True)
class Record:
    """One record as read from a file, before tokenization."""

    task: str | None  # None: data not tied to a task
    kind: str  # "prompt" | "messages" | "text"
    prompt: str = ""  # kind "prompt"
    response: str = ""  # kind "prompt"; what the loss covers
    messages: tuple = ()  # kind "messages": {"role", "content"} dicts
    text: str = ""  # kind "text"
    where: str = ""  # "path:line", for error messages
    system: str | None = None  # system turn put before the prompt (None: the template's own)

    def conversation(self) -> tuple[dict, ...]:
        """The record as chat turns: a prompt/response record is one user turn and its answer."""
        if self.kind == "prompt":
            return (
                {"role": "user", "content": self.prompt},
                {"role": "assistant", "content": self.response},
            )
        return self.messages

    @property
    def answer(self) -> str:
        """The reference answer: the response, or the last assistant turn of a conversation."""
        if self.kind == "text":
            return self.text
        return next(m["content"] for m in reversed(self.conversation()) if m["role"] == "assistant")

    @property
    def question(self) -> str:
        """What the answer replies to: the prompt, or the last user turn before the answer."""
        turns = self.conversation()
        if not turns:
            return ""
        last = max(i for i, m in enumerate(turns) if m["role"] == "assistant")
        return next((m["content"] for m in reversed(turns[:last]) if m["role"] == "user"), "")


def read_records(
    path: str | Path, task: str | None = None, known_tasks: Collection[str] | None = None
) -> list[Record]:
    """Read and validate every record of a ``.jsonl``/``.json`` or ``.csv`` file.

    Args:
        path: the data file.
        task: the task the config lists this file under; records without a ``task``
            get it, records naming another task are an error.
        known_tasks: if given, every resolved (non-None) task must be in it.

    Returns:
        The records in file order.

    Raises:
        DataError: on a missing, empty or unsupported file or the first bad record.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in (".jsonl", ".json", ".csv"):
        raise DataError(f"{path}: unsupported file type {suffix!r}; expected .jsonl, .json or .csv")
    text = _read_text(path)
    rows = _csv_rows(path, text) if suffix == ".csv" else _json_rows(path, text)
    records = [_record(obj, f"{path}:{line}", task, known_tasks) for line, obj in rows]
    if not records:
        raise DataError(f"{path}: no records (empty dataset)")
    return records


def _read_text(path: Path) -> str:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    try:
        return data.decode("utf-8-sig")  # tolerate the BOM spreadsheet tools write
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise DataError(f"{path}:{line}: not valid UTF-8 ({e.reason})") from None


def _json_rows(path: Path, text: str) -> Iterator[tuple[int, object]]:
    # split on "\n" only: str.splitlines would also split on U+2028 inside JSON strings
    for line, raw in enumerate(text.split("\n"), start=1):
        if not raw.strip():
            continue
        try:
            yield line, json.loads(raw)
        except json.JSONDecodeError as e:
            msg = f"invalid JSON ({e.msg}, column {e.colno}); expected one JSON object per line"
            raise DataError(f"{path}:{line}: {msg}") from None


def _csv_rows(path: Path, text: str) -> Iterator[tuple[int, dict]]:
    reader = csv.reader(io.StringIO(text, newline=""))
    header = [h.strip() for h in next(reader, [])]
    if not header:
        return
    cols = set(header)
    if "messages" in cols:
        raise DataError(f"{path}:1: CSV files cannot hold messages; use JSONL for chats")
    has_pair, has_text = {"prompt", "response"} <= cols, "text" in cols
    if has_pair == has_text:
        raise DataError(
            f"{path}:1: CSV header {header} must have columns prompt,response or text "
            "(not both), and optionally task"
        )
    keep = {"task", "prompt", "response"} if has_pair else {"task", "text"}
    start = reader.line_num + 1  # a quoted field may span lines: track where rows begin
    for row in reader:
        line, start = start, reader.line_num + 1
        if not row:
            continue
        if len(row) != len(header):
            raise DataError(f"{path}:{line}: row has {len(row)} fields, header has {len(header)}")
        obj = {k: v for k, v in zip(header, row, strict=True) if k in keep}
        if not obj.get("task"):
            obj.pop("task", None)  # an empty task cell means "the file's task"
        yield line, obj


def _record(obj: object, where: str, task: str | None, known: Collection[str] | None) -> Record:
    if not isinstance(obj, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    kinds = [k for k, keys in _KIND_KEYS.items() if any(key in obj for key in keys)]
    if len(kinds) != 1:
        found = f"found {' and '.join(kinds)}" if kinds else f"found keys {sorted(obj)}"
        raise DataError(
            f"{where}: a record needs exactly one of prompt+response, messages or text; {found}"
        )
    resolved = _resolve_task(obj.get("task"), where, task, known)
    kind = kinds[0]
    if kind == "messages":
        return Record(resolved, kind, messages=_messages(obj["messages"], where), where=where)
    if kind == "text":
        return Record(resolved, kind, text=_string(obj, "text", where, nonempty=True), where=where)
    prompt = _string(obj, "prompt", where, nonempty=False)
    response = _string(obj, "response", where, nonempty=True)
    return Record(resolved, kind, prompt=prompt, response=response, where=where)


def _string(obj: dict, key: str, where: str, nonempty: bool) -> str:
    if key not in obj:
        other = "response" if key == "prompt" else "prompt"
        raise DataError(f"{where}: record has {other!r} but no {key!r}; expected both")
    value = obj[key]
    if not isinstance(value, str):
        raise DataError(f"{where}: {key!r} must be a string, got {type(value).__name__}")
    if nonempty and not value.strip():
        raise DataError(f"{where}: {key!r} is empty; expected non-empty text")
    return value


def _messages(value: object, where: str) -> tuple:
    if not isinstance(value, list) or not value:
        raise DataError(f"{where}: 'messages' must be a non-empty list of {{role, content}}")
    out = []
    for i, m in enumerate(value):
        if not isinstance(m, dict) or not isinstance(m.get("content"), str):
            raise DataError(f"{where}: messages[{i}] must be a {{role, content}} object")
        if m.get("role") not in ROLES:
            raise DataError(f"{where}: messages[{i}] role {m.get('role')!r} not in {ROLES}")
        out.append({"role": m["role"], "content": m["content"]})
    if not any(m["role"] == "assistant" for m in out):
        raise DataError(f"{where}: messages have no assistant turn, so nothing to learn")
    return tuple(out)


def _resolve_task(
    value: object, where: str, task: str | None, known: Collection[str] | None
) -> str | None:
    if value is not None and not (isinstance(value, str) and value):
        raise DataError(f"{where}: 'task' must be a non-empty string, got {value!r}")
    if value is not None and task is not None and value != task:
        raise DataError(f"{where}: record has task {value!r} but the file is listed under {task!r}")
    resolved = value if value is not None else task
    if known is not None and resolved is not None and resolved not in known:
        raise DataError(f"{where}: task {resolved!r} is not in the config's tasks {list(known)}")
    return resolved


def split_records(
    records: list[Record], seed: int, valid_fraction: float, test_fraction: float
) -> tuple[list[Record], list[Record], list[Record]]:
    """Split records into train/valid/test, deterministically by ``seed``.

    Args:
        records: the records to split.
        seed: seed of the shuffle (a private ``random.Random``).
        valid_fraction, test_fraction: shares in [0, 1); a part has
            ``round(fraction * n)`` records, at least 1 if the fraction is > 0 and n >= 3.

    Returns:
        ``(train, valid, test)``, each in the records' original order.

    Raises:
        ValueError: on a fraction outside [0, 1).
        DataError: when no record would be left for training.
    """
    fractions = (valid_fraction, test_fraction)
    if not all(0 <= f < 1 for f in fractions):
        raise ValueError(f"valid/test fractions must be in [0, 1), got {fractions}")
    n = len(records)
    if n == 0:
        raise DataError("no records to split")
    # a tiny dataset still gets one valid/test record when asked for any
    n_valid, n_test = (max(int(f > 0 and n >= 3), round(f * n)) for f in fractions)
    if n - n_valid - n_test < 1:
        path = records[0].where.rsplit(":", 1)[0]
        msg = f"{n} records leave none for training after {n_valid} valid and {n_test} test"
        raise DataError(f"{path}: {msg}; add records or lower the valid/test fractions")
    order = list(range(n))
    random.Random(seed).shuffle(order)
    parts = order[:n_valid], order[n_valid : n_valid + n_test], order[n_valid + n_test :]
    valid, test, train = ([records[i] for i in sorted(p)] for p in parts)
    return train, valid, test
