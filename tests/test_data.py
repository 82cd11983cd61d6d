"""Task data: reading and its errors, masking, truncation, splits, packing, mixing, batches."""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import replace

import pytest
import tiny
import torch

from modulora.data import (
    IGNORE,
    DataError,
    Example,
    Record,
    collate,
    format_record,
    mix,
    pack,
    read_records,
    split_records,
    tokenize,
)


@pytest.fixture(scope="module")
def chat_tok():
    return tiny.tokenizer(chat=True)


@pytest.fixture(scope="module")
def plain_tok():
    return tiny.tokenizer(chat=False)


def write(path, lines):
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def jl(obj) -> str:
    return json.dumps(obj)


def labelled(tok, ids, labels) -> str:
    return tok.decode([i for i, label in zip(ids, labels, strict=True) if label != IGNORE])


GOOD = jl({"prompt": "p", "response": "r"})
MSG_OK = {"role": "assistant", "content": "a"}

# (bad line, expected words); the bad line is always line 4 (after a blank line)
JSONL_ERRORS = [
    ('{"text": "a"', "invalid JSON"),
    ("[1, 2]", "expected a JSON object"),
    (jl({"foo": 1}), "exactly one of prompt+response, messages or text"),
    (jl({"text": "a", "prompt": "p", "response": "r"}), "exactly one of"),
    (jl({"prompt": "p"}), "no 'response'"),
    (jl({"response": "r"}), "no 'prompt'"),
    (jl({"prompt": 1, "response": "r"}), "'prompt' must be a string"),
    (jl({"prompt": "p", "response": ["r"]}), "'response' must be a string"),
    (jl({"text": 5}), "'text' must be a string"),
    (jl({"text": ""}), "'text' is empty"),
    (jl({"prompt": "p", "response": "  "}), "'response' is empty"),
    (jl({"messages": "hi"}), "non-empty list"),
    (jl({"messages": []}), "non-empty list"),
    (jl({"messages": ["hi"]}), "messages[0] must be a {role, content} object"),
    (jl({"messages": [MSG_OK, {"role": "user", "content": 3}]}), "messages[1] must be"),
    (jl({"messages": [{"role": "bot", "content": "x"}, MSG_OK]}), "role 'bot'"),
    (jl({"messages": [{"role": "user", "content": "x"}]}), "no assistant turn"),
    (jl({"task": 3, "text": "a"}), "'task' must be a non-empty string"),
]


@pytest.mark.parametrize(("bad", "words"), JSONL_ERRORS)
def test_jsonl_errors_name_file_and_line(tmp_path, bad, words):
    path = write(tmp_path / "train.jsonl", [GOOD, GOOD, "", bad, GOOD])
    with pytest.raises(DataError) as err:
        read_records(path)
    assert str(err.value).startswith(f"{path}:4: ")
    assert words in str(err.value)


CSV_ERRORS = [
    (["prompt,response", "p,r", "p,r,extra"], 3, "row has 3 fields, header has 2"),
    (["prompt,response", "p,r", "", "p,"], 4, "'response' is empty"),
    (["text,task", "a,math", ",math"], 3, "'text' is empty"),
    (["question,answer", "p,r"], 1, "must have columns prompt,response or text"),
    (["prompt,response,text", "p,r,t"], 1, "not both"),
    (["messages", "x"], 1, "cannot hold messages"),
]


@pytest.mark.parametrize(("lines", "line", "words"), CSV_ERRORS)
def test_csv_errors_name_file_and_line(tmp_path, lines, line, words):
    path = write(tmp_path / "train.csv", lines)
    with pytest.raises(DataError) as err:
        read_records(path)
    assert str(err.value).startswith(f"{path}:{line}: ")
    assert words in str(err.value)


@pytest.mark.parametrize(
    ("name", "content", "words"),
    [
        ("empty.jsonl", "", "no records (empty dataset)"),
        ("blank.jsonl", "\n  \n\n", "no records (empty dataset)"),
        ("header.csv", "prompt,response\n", "no records (empty dataset)"),
        ("empty.csv", "", "no records (empty dataset)"),
        ("data.txt", "hello\n", "unsupported file type '.txt'"),
    ],
)
def test_whole_file_errors(tmp_path, name, content, words):
    path = tmp_path / name
    path.write_text(content, encoding="utf-8")
    with pytest.raises(DataError) as err:
        read_records(path)
    assert str(err.value).startswith(f"{path}: {words}")


def test_missing_file(tmp_path):
    path = tmp_path / "nope.jsonl"
    with pytest.raises(DataError, match="file not found") as err:
        read_records(path)
    assert str(err.value) == f"{path}: file not found"


def test_invalid_utf8_names_the_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(GOOD.encode() + b"\n" + b'{"text": "\xff"}\n')
    with pytest.raises(DataError, match="UTF-8") as err:
        read_records(path)
    assert str(err.value).startswith(f"{path}:2: ")


def test_task_mismatch_and_unknown_task(tmp_path):
    path = write(
        tmp_path / "a.jsonl", [jl({"task": "math", "text": "a"}), jl({"task": "med", "text": "b"})]
    )
    with pytest.raises(
        DataError, match="has task 'med' but the file is listed under 'math'"
    ) as err:
        read_records(path, task="math")
    assert str(err.value).startswith(f"{path}:2: ")
    with pytest.raises(DataError, match="task 'med' is not in the config's tasks") as err:
        read_records(path, known_tasks=["math", "code"])
    assert str(err.value).startswith(f"{path}:2: ")
    with pytest.raises(DataError, match="task 'code' is not in") as err:
        read_records(write(tmp_path / "b.jsonl", [jl({"text": "a"})]), "code", ["math"])
    assert ":1: " in str(err.value)


def test_task_comes_from_record_or_argument(tmp_path):
    path = write(tmp_path / "a.jsonl", [jl({"text": "a"}), jl({"task": "math", "text": "b"})])
    assert [r.task for r in read_records(path)] == [None, "math"]
    assert [r.task for r in read_records(path, task="math", known_tasks={"math"})] == ["math"] * 2


def test_jsonl_and_csv_read_the_same_records(tmp_path):
    rows = [
        {"task": "math", "prompt": 'add, then\nsay "done"', "response": "4"},
        {"prompt": "ünïcode ✓", "response": "yes"},
        {"task": "math", "prompt": "", "response": "x"},
    ]
    js = write(tmp_path / "d.jsonl", [jl(r) for r in rows])
    cs = tmp_path / "d.csv"
    cs.write_text(
        'task,prompt,response\nmath,"add, then\nsay ""done""",4\n,ünïcode ✓,yes\nmath,,x\n',
        encoding="utf-8",
    )
    from_json, from_csv = read_records(js, task="math"), read_records(cs, task="math")
    strip = [(r.task, r.kind, r.prompt, r.response) for r in from_json]
    assert strip == [(r.task, r.kind, r.prompt, r.response) for r in from_csv]
    assert strip[1] == ("math", "prompt", "ünïcode ✓", "yes")
    # the quoted prompt spans lines 2-3, so the next row starts on line 4
    assert [r.where for r in from_csv] == [f"{cs}:2", f"{cs}:4", f"{cs}:5"]
    assert [r.where for r in from_json] == [f"{js}:1", f"{js}:2", f"{js}:3"]


def test_messages_and_text_records(tmp_path):
    msgs = [{"role": "user", "content": "u"}, {"role": "assistant", "content": "a", "x": 1}]
    path = write(tmp_path / "m.json", [jl({"messages": msgs}), jl({"text": "t"})])
    chat, text = read_records(path)
    assert chat.kind == "messages" and text.kind == "text" and text.text == "t"
    assert chat.messages == (
        {"role": "user", "content": "u"},
        {"role": "assistant", "content": "a"},
    )


# ---------------------------------------------------------------- masking

PROMPT = Record("math", "prompt", prompt="the quick fox", response="lazy dog", where="f:1")
CHAT = Record(
    "math",
    "messages",
    messages=(
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "abc"},
        {"role": "assistant", "content": "def"},
        {"role": "user", "content": "ghi"},
        {"role": "assistant", "content": "jkl"},
    ),
    where="f:2",
)
TEXT = Record(None, "text", text="the lazy dog", where="f:3")


def test_chat_template_labels_only_the_response_and_end_marker(chat_tok):
    ids, labels = format_record(PROMPT, chat_tok)
    assert len(ids) == len(labels)
    assert labelled(chat_tok, ids, labels) == "lazy dog<|end|>\n"
    assert chat_tok.decode(ids) == "<|user|>the quick fox<|end|>\n<|assistant|>lazy dog<|end|>\n"
    prompt_len = len(chat_tok("<|user|>the quick fox<|end|>\n<|assistant|>")["input_ids"])
    assert all(label == IGNORE for label in labels[:prompt_len])
    assert all(label != IGNORE for label in labels[prompt_len:])
    assert [i for i, lab in zip(ids, labels, strict=True) if lab != IGNORE] == labels[prompt_len:]


def test_chat_template_multi_turn_labels_both_assistant_turns(chat_tok):
    ids, labels = format_record(CHAT, chat_tok)
    assert labelled(chat_tok, ids, labels) == "def<|end|>\njkl<|end|>\n"
    masked = chat_tok.decode([i for i, lab in zip(ids, labels, strict=True) if lab == IGNORE])
    turns = ["<|system|>be brief", "<|user|>abc", "<|assistant|><|user|>ghi", "<|assistant|>"]
    assert masked == "<|end|>\n".join(turns)


def test_plain_template_labels_response_and_eos(plain_tok):
    ids, labels = format_record(PROMPT, plain_tok)
    assert labelled(plain_tok, ids, labels) == "lazy dog<eos>"
    assert ids[-1] == plain_tok.eos_token_id and labels[-1] == plain_tok.eos_token_id
    assert plain_tok.decode(ids) == "### Prompt:\nthe quick fox\n\n### Response:\nlazy dog<eos>"


def test_plain_template_messages(plain_tok):
    ids, labels = format_record(CHAT, plain_tok)
    assert labelled(plain_tok, ids, labels) == "def<eos>jkl<eos>"
    assert plain_tok.decode(ids) == (
        "### System:\nbe brief\n\n### Prompt:\nabc\n\n### Response:\ndef<eos>\n\n"
        "### Prompt:\nghi\n\n### Response:\njkl<eos>"
    )


def test_prompt_is_the_whole_conversation_up_to_the_last_answer(chat_tok, plain_tok):
    from modulora.data import prompt_ids
    from modulora.generate import chat_prompt_ids

    # expected strings written by hand from the two templates
    chat_prompt = (
        "<|system|>be brief<|end|>\n<|user|>abc<|end|>\n<|assistant|>def<|end|>\n"
        "<|user|>ghi<|end|>\n<|assistant|>"
    )
    plain_prompt = (
        "### System:\nbe brief\n\n### Prompt:\nabc\n\n### Response:\ndef<eos>\n\n"
        "### Prompt:\nghi\n\n### Response:\n"
    )
    asked = [m for m in CHAT.messages[:-1]]  # the conversation a client sends
    for tok, text in ((chat_tok, chat_prompt), (plain_tok, plain_prompt)):
        assert tok.decode(prompt_ids(CHAT, tok)) == text
        assert tok.decode(chat_prompt_ids(tok, asked)) == text
        assert prompt_ids(CHAT, tok) == tok(text, add_special_tokens=False)["input_ids"]
    assert CHAT.answer == "jkl" and CHAT.question == "ghi"
    assert PROMPT.answer == "lazy dog" and PROMPT.question == "the quick fox"


def test_one_prompt_builder_for_training_and_serving(plain_tok):
    """A model without a chat template: generate/serve send what training showed."""
    from modulora.data import prompt_ids
    from modulora.generate import chat_prompt_ids

    expected = "### Prompt:\nthe quick fox\n\n### Response:\n"
    served = chat_prompt_ids(plain_tok, [{"role": "user", "content": "the quick fox"}], "")
    assert plain_tok.decode(served) == expected
    assert plain_tok.decode(prompt_ids(PROMPT, plain_tok)) == expected
    ids, labels = format_record(PROMPT, plain_tok)
    assert ids[: len(served)] == served and all(lab == IGNORE for lab in labels[: len(served)])
    with_system = chat_prompt_ids(plain_tok, [{"role": "user", "content": "x"}], "Be brief.")
    assert (
        plain_tok.decode(with_system)
        == "### System:\nBe brief.\n\n### Prompt:\nx\n\n### Response:\n"
    )


@pytest.mark.parametrize("chat", [True, False])
def test_text_records_are_fully_labelled(chat):
    tok = tiny.tokenizer(chat)
    ids, labels = format_record(TEXT, tok)
    assert labels == ids
    assert tok.decode(ids) == "the lazy dog<eos>"


def test_template_that_is_not_prefix_stable_is_rejected(chat_tok):
    tok = tiny.tokenizer(chat=True)
    tok.chat_template = "{{ messages|length }}{% for m in messages %}{{ m['content'] }}{% endfor %}"
    with pytest.raises(DataError, match="prefix") as err:
        format_record(PROMPT, tok)
    assert str(err.value).startswith("f:1: chat template of tokenizer")


def test_tokenize_matches_format_record_and_counts(chat_tok):
    records = [PROMPT, CHAT, TEXT]
    examples, stats = tokenize(records, chat_tok, max_length=512)
    for rec, ex in zip(records, examples, strict=True):
        assert (ex.input_ids, ex.labels) == format_record(rec, chat_tok)
        assert (ex.task, ex.where) == (rec.task, rec.where)
    assert (stats.records, stats.examples, stats.truncated, stats.dropped) == (3, 3, 0, 0)
    assert stats.tokens == sum(len(e.input_ids) for e in examples)
    assert stats.label_tokens == sum(lab != IGNORE for e in examples for lab in e.labels)


def test_truncation_and_dropped(plain_tok):
    long_prompt = Record(
        "m", "prompt", prompt="the quick brown fox " * 20, response="dog", where="f:1"
    )
    long_text = Record("m", "text", text="abc def ghi " * 30, where="f:2")
    short = Record("m", "prompt", prompt="a", response="b", where="f:3")
    with pytest.raises(ValueError, match="max_length"):
        tokenize([short], plain_tok, max_length=1)
    examples, stats = tokenize([long_prompt, long_text, short], plain_tok, max_length=24)
    assert [e.where for e in examples] == ["f:2", "f:3"]  # the prompt filled all 24 tokens
    assert (stats.records, stats.examples, stats.truncated, stats.dropped) == (3, 2, 2, 1)
    assert len(examples[0].input_ids) == 24 and examples[0].labels == examples[0].input_ids
    assert examples[0].input_ids == format_record(long_text, plain_tok)[0][:24]  # keeps the start
    assert stats.tokens == 24 + len(examples[1].input_ids)


# ---------------------------------------------------------------- splits


def records(n: int) -> list[Record]:
    return [Record("t", "text", text=f"r{i}", where=f"data.jsonl:{i + 1}") for i in range(n)]


def test_split_is_deterministic_disjoint_and_sized():
    recs = records(100)
    train, valid, test = split_records(recs, seed=1, valid_fraction=0.1, test_fraction=0.2)
    assert (len(train), len(valid), len(test)) == (70, 10, 20)
    assert split_records(recs, 1, 0.1, 0.2) == (train, valid, test)
    assert split_records(recs, 2, 0.1, 0.2)[1] != valid
    keys = [r.where for r in train + valid + test]
    assert sorted(keys) == sorted(r.where for r in recs)  # a partition: no overlap, nothing lost
    assert train == sorted(train, key=recs.index)  # original order kept within a part
    # pinned: depends on the seed only (random.Random), not on PYTHONHASHSEED or global state
    assert [recs.index(r) for r in valid] == [4, 9, 10, 20, 37, 38, 51, 53, 65, 81]


def test_split_small_and_impossible():
    train, valid, test = split_records(records(3), seed=0, valid_fraction=0.01, test_fraction=0.01)
    assert (len(train), len(valid), len(test)) == (1, 1, 1)
    train, valid, test = split_records(records(2), seed=0, valid_fraction=0.1, test_fraction=0.0)
    assert (len(train), len(valid), len(test)) == (2, 0, 0)
    with pytest.raises(DataError) as err:
        split_records(records(4), seed=0, valid_fraction=0.5, test_fraction=0.5)
    assert str(err.value).startswith("data.jsonl: 4 records leave none for training")
    with pytest.raises(ValueError, match="fractions"):
        split_records(records(4), seed=0, valid_fraction=-0.1, test_fraction=0.0)


# ---------------------------------------------------------------- packing, mixing, batches


def ex(task, n, start=0, where="w"):
    ids = list(range(start, start + n))
    return Example(ids, [IGNORE if i % 2 else i for i in ids], task, where)


def test_pack_keeps_tasks_apart_and_preserves_tokens():
    examples = [
        ex("a", 5, 0, "a1"),
        ex("b", 3, 100, "b1"),
        ex("a", 4, 10, "a2"),
        ex("a", 6, 20, "a3"),
    ]
    examples += [ex("b", 8, 200, "b2"), ex(None, 2, 300, "n1")]
    rows = pack(examples, max_length=10)
    assert all(len(r.input_ids) <= 10 and len(r.labels) == len(r.input_ids) for r in rows)
    assert [(r.task, r.where, len(r.input_ids)) for r in rows] == [
        ("a", "a1", 9),
        ("a", "a3", 6),
        ("b", "b1", 3),
        ("b", "b2", 8),
        (None, "n1", 2),
    ]

    def pairs(exs):
        return Counter(
            (e.task, i, lab) for e in exs for i, lab in zip(e.input_ids, e.labels, strict=True)
        )

    assert pairs(rows) == pairs(examples)
    assert rows[0].input_ids == list(range(5)) + list(range(10, 14))  # order kept
    assert examples[0].input_ids == list(range(5))  # inputs not mutated
    with pytest.raises(ValueError, match="a3: example has 6 > 5 tokens"):
        pack(examples, max_length=5)


def test_concat_and_bad_mixing_arguments():
    per_task = {"a": [ex("a", 1)], "b": [ex("b", 1), ex("b", 2)]}
    assert [e.task for e in mix(per_task)] == ["a", "b", "b"]
    with pytest.raises(ValueError, match="'zip'"):
        mix(per_task, how="zip")
    with pytest.raises(ValueError, match="'c'"):
        mix(per_task, "interleave", {"a": 1.0, "c": 1.0})
    with pytest.raises(ValueError, match="'b'"):
        mix(per_task, "interleave", {"a": 1.0, "b": -1.0})
    with pytest.raises(ValueError, match="sum to 0"):
        mix(per_task, "interleave", {"a": 0.0})


def test_interleave_follows_probabilities_and_stops_at_first_exhausted():
    per_task = {
        t: [ex(t, 1, i, f"{t}{i}") for i in range(n)]
        for t, n in [("a", 3000), ("b", 3000), ("c", 50)]
    }
    out = mix(per_task, "interleave", {"a": 0.75, "b": 0.25}, seed=3)
    counts = Counter(e.task for e in out)
    assert counts["a"] == 3000 and 0.2 < counts["b"] / len(out) < 0.3
    assert "c" not in counts  # missing from probabilities: weight 0
    assert len({e.where for e in out}) == len(out)  # without replacement
    assert mix(per_task, "interleave", {"a": 0.75, "b": 0.25}, seed=3) == out
    assert mix(per_task, "interleave", {"a": 0.75, "b": 0.25}, seed=4) != out

    sized = {"a": per_task["a"][:300], "b": per_task["b"][:100]}
    default = Counter(e.task for e in mix(sized, "interleave", seed=0))  # weights 3:1
    assert default["a"] == 300 or default["b"] == 100
    assert sum(default.values()) < 400 and 0.65 < default["a"] / sum(default.values()) < 0.85


def test_collate_pads_right():
    batch = collate([ex("a", 3, 5), ex(None, 5, 7)], pad_id=0)
    assert (
        batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape == (2, 5)
    )
    assert batch["input_ids"].dtype == torch.long
    assert batch["input_ids"][0].tolist() == [5, 6, 7, 0, 0]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]
    assert batch["labels"][0].tolist() == [IGNORE, 6, IGNORE, IGNORE, IGNORE]
    assert batch["labels"][1].tolist() == [IGNORE, 8, IGNORE, 10, IGNORE]
    assert batch["task"] == ["a", None]
    with pytest.raises(ValueError, match="pad_id"):
        collate([ex("a", 3)], pad_id=None)


def test_system_prompt_reaches_training_and_eval_prompts_alike(tmp_path):
    from transformers import AutoTokenizer

    from modulora.evaluate import prompt_ids
    from modulora.plan import source_records
    from modulora.run_config import load_run_config

    config = tiny.write_run(
        tmp_path, "lora", tmp_path / "unused", data={"system_prompt": "Be brief."}
    )
    run = load_run_config(config)
    tok = AutoTokenizer.from_pretrained(tiny.model_dir(tmp_path / "m"))
    train, valid, test = source_records(run, "reverse", list(run.tasks))
    assert {r.system for r in train + valid + test} == {"Be brief."}
    ids, labels = format_record(train[0], tok)
    plain_ids, plain_labels = format_record(replace(train[0], system=None), tok)
    assert "Be brief." in tok.decode(ids) and "Be brief." not in tok.decode(plain_ids)
    # the answer and its loss are unchanged; only the (masked) prompt grows
    assert [i for i, lab in zip(ids, labels, strict=True) if lab != IGNORE] == [
        i for i, lab in zip(plain_ids, plain_labels, strict=True) if lab != IGNORE
    ]
    assert tok.decode(prompt_ids(test[0], tok)).count("Be brief.") == 1
