r"""Task records -> tokenized, prompt-masked examples -> packed, mixed, collated batches.

One prompt builder serves training, evaluation, ``generate`` and ``serve``: a
prompt/response record is the conversation ``[user: prompt, assistant: response]``,
and every conversation is rendered the same way. The loss (labels != -100) covers
only what the model should learn to write. With a chat template: each assistant turn
as rendered, with the template's end-of-turn marker. Without one, ``PLAIN_TEMPLATE``:
each turn is ``"### {header}:\n{content}"`` with the headers ``System``, ``Prompt``
(user) and ``Response`` (assistant), turns separated by a blank line; assistant
content and eos are labelled, so a one-turn record reads
``"### Prompt:\n{prompt}\n\n### Response:\n{response}<eos>"``. Text records are
labelled everywhere, plus eos. The prompt of a record (what the model sees before it
answers) is the whole conversation up to its last assistant turn. Packing does not
block attention between the examples of a row, like TRL's ``packing=True``. Reading
files is ``records.py``.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from itertools import accumulate, chain

import torch

from .records import DataError, Record, read_records, split_records

__all__ = [
    "IGNORE",
    "PLAIN_TEMPLATE",
    "DataError",
    "Example",
    "Record",
    "TokenizeStats",
    "collate",
    "format_record",
    "mix",
    "pack",
    "read_records",
    "split_records",
    "tokenize",
]

IGNORE = -100  # label of tokens without loss (PyTorch cross-entropy's ignore_index)
PLAIN_TEMPLATE = {
    "headers": {"system": "System", "user": "Prompt", "assistant": "Response"},
    "turn_header": "### {header}:\n",  # masked
    "turn_end": "\n\n",  # after each turn's content; masked
}


@dataclass
class Example:
    """A tokenized record (or a packed row of several): token ids and their labels."""

    input_ids: list[int]
    labels: list[int]  # IGNORE where no loss
    task: str | None
    where: str


@dataclass
class TokenizeStats:
    """Counts from ``tokenize``: records in, examples out, and what was lost."""

    records: int
    examples: int
    truncated: int  # records cut to max_length (including ones then dropped)
    dropped: int  # records left without any labelled token after truncation
    tokens: int  # input tokens kept
    label_tokens: int  # labelled tokens kept


def format_record(record: Record, tokenizer) -> tuple[list[int], list[int]]:
    """Render and tokenize one record, with labels masked outside the answer.

    Args:
        record: the record.
        tokenizer: a Hugging Face tokenizer; its chat template if set, else ``PLAIN_TEMPLATE``.

    Returns:
        ``(input_ids, labels)`` before truncation; labels are -100 where there is no loss.

    Raises:
        DataError: when the chat template fails or does not render turns as prefixes.
    """
    return _encode([_segments(record, tokenizer)], tokenizer)[0]


def prompt_ids(record: Record, tokenizer) -> list[int]:
    """What the model reads before it writes the record's answer, exactly as in training.

    The answer is the last assistant turn (a prompt/response record's response); the
    prompt is everything before it: every earlier turn, answers included, and the
    generation prompt of the last turn. Text records have no prompt (``[]``).
    """
    if record.kind == "text":
        return []
    segments = _segments(record, tokenizer)
    # the last assistant turn's content is the last labelled text (eos is an id)
    answer = max(
        i for i, (piece, labelled) in enumerate(segments) if labelled and isinstance(piece, str)
    )
    return _encode([segments[:answer]], tokenizer)[0][0]


def tokenize(
    records: list[Record], tokenizer, max_length: int
) -> tuple[list[Example], TokenizeStats]:
    """Tokenize records (one batched tokenizer call), truncate and drop empty ones.

    Args:
        records, tokenizer: as for ``format_record``.
        max_length: keep at most this many tokens per example, from the start.

    Returns:
        The examples that still have a labelled token, and the counts.

    Raises:
        ValueError: if ``max_length < 2``.
        DataError: as for ``format_record``.
    """
    if max_length < 2:
        raise ValueError(f"max_length must be at least 2, got {max_length}")
    encoded = _encode([_segments(r, tokenizer) for r in records], tokenizer)
    examples, truncated, dropped = [], 0, 0
    for record, (ids, labels) in zip(records, encoded, strict=True):
        if len(ids) > max_length:
            truncated += 1
            ids, labels = ids[:max_length], labels[:max_length]
        if all(label == IGNORE for label in labels):
            dropped += 1
            continue
        examples.append(Example(ids, labels, record.task, record.where))
    tokens = sum(len(e.input_ids) for e in examples)
    label_tokens = sum(label != IGNORE for e in examples for label in e.labels)
    stats = TokenizeStats(len(records), len(examples), truncated, dropped, tokens, label_tokens)
    return examples, stats


# A segment is a piece of text (or one token id, for eos) and whether it is labelled.
Segment = tuple[str | int, bool]


def _segments(record: Record, tokenizer) -> list[Segment]:
    eos = [] if tokenizer.eos_token_id is None else [(tokenizer.eos_token_id, True)]
    if record.kind == "text":
        return [(record.text, True), *eos]
    messages = list(record.conversation())
    chat = bool(getattr(tokenizer, "chat_template", None))
    if record.system is not None and messages[0]["role"] != "system" and (chat or record.system):
        messages.insert(0, {"role": "system", "content": record.system})
    if chat:
        return _chat_segments(messages, tokenizer, record.where)
    return _plain_turns(messages, eos)


def _plain_turns(messages: list[dict], eos: list[Segment]) -> list[Segment]:
    out: list[Segment] = []
    for i, m in enumerate(messages):
        header = PLAIN_TEMPLATE["headers"][m["role"]]
        out.append((PLAIN_TEMPLATE["turn_header"].format(header=header), False))
        last = i == len(messages) - 1
        end = [] if last else [(PLAIN_TEMPLATE["turn_end"], False)]
        if m["role"] == "assistant":
            out += [(m["content"], True), *eos, *end]
        else:
            out += [(m["content"] + PLAIN_TEMPLATE["turn_end"], False)]
    return out


def _chat_segments(messages: list[dict], tokenizer, where: str) -> list[Segment]:
    name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__

    def render(upto: int, generation: bool) -> str:
        try:
            return tokenizer.apply_chat_template(
                messages[:upto], tokenize=False, add_generation_prompt=generation
            )
        except Exception as e:  # jinja errors, templates raising on role order, ...
            raise DataError(f"{where}: chat template of tokenizer {name!r} failed: {e}") from e

    def after(prefix: str, text: str) -> str:
        # masking relies on each rendering extending the previous one
        if not text.startswith(prefix):
            raise DataError(
                f"{where}: chat template of tokenizer {name!r} does not render a conversation "
                "as a prefix of its continuation, so assistant turns cannot be masked"
            )
        return text[len(prefix) :]

    segments: list[Segment] = []
    done = ""
    for i, m in enumerate(messages):
        if m["role"] == "assistant":
            prefix, full = render(i, True), render(i + 1, False)
            segments += [(after(done, prefix), False), (after(prefix, full), True)]
            done = full
    if messages[-1]["role"] != "assistant":
        segments.append((after(done, render(len(messages), False)), False))
    return segments


def _encode(per_record: list[list[Segment]], tokenizer) -> list[tuple[list[int], list[int]]]:
    # one batched call for every text segment of every record: far faster than per segment
    texts = [p for segs in per_record for p, _ in segs if isinstance(p, str) and p]
    encoded = iter(tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else [])
    out = []
    for segs in per_record:
        ids: list[int] = []
        labels: list[int] = []
        for piece, labelled in segs:
            if isinstance(piece, str) and not piece:
                continue
            toks = list(next(encoded)) if isinstance(piece, str) else [piece]
            ids += toks
            labels += toks if labelled else [IGNORE] * len(toks)
        out.append((ids, labels))
    return out


def pack(examples: list[Example], max_length: int) -> list[Example]:
    """Greedily concatenate examples of the same task into rows of <= ``max_length``.

    Attention is not blocked between packed examples (like TRL's ``packing=True``).

    Args:
        examples: tokenized (already truncated) examples.
        max_length: most tokens per row.

    Returns:
        Rows by task in order of first appearance, examples in order; a row's ``where``
        is its first example's.

    Raises:
        ValueError: if an example is longer than ``max_length``.
    """
    rows: dict[str | None, list[Example]] = {}
    for ex in examples:
        if len(ex.input_ids) > max_length:
            raise ValueError(f"{ex.where}: example has {len(ex.input_ids)} > {max_length} tokens")
        task_rows = rows.setdefault(ex.task, [])
        row = task_rows[-1] if task_rows else None
        if row is None or len(row.input_ids) + len(ex.input_ids) > max_length:
            task_rows.append(Example(list(ex.input_ids), list(ex.labels), ex.task, ex.where))
        else:
            row.input_ids += ex.input_ids
            row.labels += ex.labels
    return list(chain.from_iterable(rows.values()))


def mix(
    per_task: dict[str | None, list[Example]],
    how: str = "concat",
    probabilities: dict[str, float] | None = None,
    seed: int = 0,
) -> list[Example]:
    """Combine the examples of several tasks: ``"concat"`` in dict order, or ``"interleave"``.

    Interleaving draws a task per step by probability (default: proportional to size)
    and takes its next example (each task shuffled first), stopping as soon as any task
    with probability > 0 runs out, like ``datasets.interleave_datasets``'s "first_exhausted".

    Args:
        per_task: examples of each task.
        how: ``"concat"`` or ``"interleave"``.
        probabilities: task -> weight (normalised; missing tasks get 0).
        seed: seed of the interleaving (a private ``random.Random``).

    Returns:
        The mixed examples.

    Raises:
        ValueError: on an unknown ``how`` or task, a negative weight or weights summing to 0.
    """
    if how == "concat":
        return list(chain.from_iterable(per_task.values()))
    if how != "interleave":
        raise ValueError(f"unknown mixing {how!r}; expected 'concat' or 'interleave'")
    weights = _weights(per_task, probabilities)
    rng = random.Random(seed)
    names = [t for t, w in weights.items() if w > 0]
    queues = {t: rng.sample(per_task[t], len(per_task[t])) for t in names}
    cumulative = list(accumulate(weights[t] for t in names))  # choices() would redo this
    taken = dict.fromkeys(names, 0)
    out: list[Example] = []
    while all(taken[t] < len(queues[t]) for t in names):
        t = rng.choices(names, cum_weights=cumulative)[0]
        out.append(queues[t][taken[t]])
        taken[t] += 1
    return out


def _weights(
    per_task: dict[str | None, list[Example]], probabilities: dict[str, float] | None
) -> dict[str | None, float]:
    if probabilities is None:
        weights = {t: float(len(exs)) for t, exs in per_task.items()}
    else:
        for t, p in probabilities.items():
            if t not in per_task:
                raise ValueError(f"probabilities name task {t!r}, not one of {list(per_task)}")
            if p < 0:
                raise ValueError(f"probability of task {t!r} is negative ({p})")
        weights = {t: float(probabilities.get(t, 0.0)) for t in per_task}
    if sum(weights.values()) <= 0:
        raise ValueError(f"mixing probabilities sum to 0: {weights}")
    return weights


def collate(examples: list[Example], pad_id: int) -> dict:
    """Right-pad examples into a batch.

    Args:
        examples: the batch's examples.
        pad_id: token id used for padding (the tokenizer's pad or eos id).

    Returns:
        ``input_ids``, ``attention_mask`` and ``labels``, long tensors of shape
        ``(B, T)`` with ``T`` the longest example (labels -100 on padding), and
        ``task``, the list of the ``B`` task names.

    Raises:
        ValueError: if ``pad_id`` is None or ``examples`` is empty.
    """
    if pad_id is None:
        raise ValueError("pad_id is None; set tokenizer.pad_token (e.g. to the eos token)")
    if not examples:
        raise ValueError("cannot collate an empty batch")
    length = max(len(e.input_ids) for e in examples)

    def padded(rows: list[list[int]], value: int) -> torch.Tensor:
        return torch.tensor([r + [value] * (length - len(r)) for r in rows], dtype=torch.long)

    ids = padded([e.input_ids for e in examples], pad_id)  # (B, T)
    mask = padded([[1] * len(e.input_ids) for e in examples], 0)  # (B, T)
    labels = padded([e.labels for e in examples], IGNORE)  # (B, T)
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    return batch | {"task": [e.task for e in examples]}
