"""Metrics (hand-computed cases, sacrebleu itself), bootstrap intervals, and likelihood
scoring that does not depend on the batch, on every model family."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import tiny_model
from sacrebleu.metrics import CHRF
from tiny import tokenizer

from modulora.data import Record, prompt_ids
from modulora.evaluate import answer, mmlu_predictions
from modulora.generate import generate_batch
from modulora.likelihood import score_continuations
from modulora.metrics import (
    aggregate,
    bootstrap_ci,
    example_stats,
    match_label,
    paired_bootstrap,
    score,
)


@pytest.mark.parametrize(
    ("prediction", "reference", "hit"),
    [
        ("7", "-7", False),  # the sign is meaning
        ("-7", "-7", True),
        ("7.0", "7", True),  # numbers compare as numbers
        ("7.5", "75", False),  # the decimal point is meaning
        ("1,000", "1000", True),
        ("42.", "42", True),  # a final full stop is not
        ("Paris.", "paris", True),
        ("New  York", "new york", True),
        ('"yes"', "yes", True),
        ("C++", "C", False),
        ("3-4", "34", False),
        ("e-mail", "email", False),
        ("", "0", False),
    ],
)
def test_exact_match_cases(prediction, reference, hit):
    assert score("exact", [prediction], [reference]) == (100.0 if hit else 0.0)


def test_classification_matches_labels_on_word_boundaries():
    labels = ["tech", "sport", "business", "very positive", "positive"]
    assert match_label("technically, no", labels) is None  # a bare prefix is not a label
    assert match_label("Tech: a new phone", labels) == "tech"
    assert match_label("tech", labels) == "tech"
    assert match_label("sports", labels) is None
    assert match_label("Very positive!", labels) == "very positive"  # longest label first
    assert match_label("positive", labels) == "positive"
    assert match_label("The answer is sport", labels) is None  # another format: no label
    preds = ["Tech", "technology", "sport.", "business news", "SPORT"]
    refs = ["tech", "tech", "sport", "business", "tech"]
    assert score("classification", preds, refs, labels) == 60.0  # 3 of 5, counted by hand


def test_chrf_equals_sacrebleu_and_per_example_stats_add_up():
    preds = ["the cat sat on the mat", "a dog", "hello world", ""]
    refs = ["the cat sat on a mat", "the dog", "hello there world", "nothing"]
    want = CHRF().corpus_score(preds, [refs]).score
    assert score("chrf", preds, refs) == pytest.approx(want, abs=1e-9)
    stats = example_stats("chrf", preds, refs)
    assert stats.shape[0] == 4
    for i in range(4):  # one example's stats are its own corpus score
        single = CHRF().corpus_score([preds[i]], [[refs[i]]]).score
        assert aggregate("chrf", stats[i : i + 1]) == pytest.approx(single, abs=1e-9)


def test_bootstrap_interval_is_seeded_and_covers_the_binomial_spread():
    hits = np.array([1.0] * 30 + [0.0] * 70).reshape(-1, 1)  # 30% of 100 examples
    low, high = bootstrap_ci("exact", hits, seed=3)
    assert (low, high) == bootstrap_ci("exact", hits, seed=3)
    # normal approximation of a binomial proportion: 30 +- 1.96 * sqrt(.3 * .7 / 100) * 100
    half = 1.96 * np.sqrt(0.3 * 0.7 / 100) * 100
    assert low == pytest.approx(30 - half, abs=2.5) and high == pytest.approx(30 + half, abs=2.5)
    assert low < 30 < high


def test_paired_bootstrap_tells_a_real_difference_from_noise():
    rng = np.random.default_rng(0)
    a = (rng.random(200) < 0.7).astype(float).reshape(-1, 1)
    flip = rng.random(200) < 0.1  # b differs from a on ~10% of examples, both ways
    b = np.where(flip[:, None], 1 - a, a)
    noise = paired_bootstrap("exact", a, b)
    assert not noise.significant and noise.low < 0 < noise.high
    worse = a.copy()
    worse[np.flatnonzero(a[:, 0])[:40]] = 0.0  # b loses 40 of a's right answers
    real = paired_bootstrap("exact", a, worse)
    assert real.delta == pytest.approx(20.0) and real.significant and real.low > 0
    with pytest.raises(ValueError, match="paired"):
        paired_bootstrap("exact", a, b[:10])


def _pairs(vocab: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    shapes = [(5, 1), (9, 3), (2, 2), (12, 4), (7, 1)]
    out = []
    for n, c in shapes:
        ctx = torch.randint(3, vocab, (n,), generator=g).tolist()
        out.append((ctx, torch.randint(3, vocab, (c,), generator=g).tolist()))
    out.append((out[1][0], [5, 6]))  # a second continuation of one context: shares its pass
    return out


def test_continuation_scores_equal_unpadded_forward(family):
    model = tiny_model(family)
    pairs = _pairs(97)
    got = score_continuations(model, 0, pairs, batch_size=4, top=3)
    for (ctx, cont), scored in zip(pairs, got, strict=True):
        with torch.no_grad():  # one sequence, no padding: the reference
            logp = model(input_ids=torch.tensor([ctx + cont])).logits[0].log_softmax(-1)
        want = [float(logp[len(ctx) - 1 + j, t]) for j, t in enumerate(cont)]
        assert scored.logprobs == pytest.approx(want, abs=1e-5)
        argmax = [int(logp[len(ctx) - 1 + j].argmax()) for j in range(len(cont))]
        assert scored.greedy == (argmax == cont)
        assert [max(t, key=t.get) for t in scored.top] == argmax
    with pytest.raises(ValueError, match="at least one token"):
        score_continuations(model, 0, [([], [1])])


def test_mmlu_and_generation_do_not_depend_on_the_batch(family):
    """Left-padded rows get positions from the mask: batched == one by one."""
    tok = tokenizer(chat=False)
    model = tiny_model(family, vocab=len(tok))
    words = ["the", "quick", "brown", "fox", "jumps", "over", "the", "lazy", "dog"]
    questions = [
        {"question": " ".join(words[: 1 + i % 9]), "choices": list("abcd")} for i in range(12)
    ]
    batched = mmlu_predictions(model, tok, questions, batch_size=12)
    alone = [mmlu_predictions(model, tok, [q], batch_size=1)[0] for q in questions]
    assert batched == alone
    prompts = [tok(q["question"], add_special_tokens=False)["input_ids"] for q in questions[:6]]
    together = generate_batch(model, tok, prompts, max_new_tokens=5)
    assert together == [generate_batch(model, tok, [p], max_new_tokens=5)[0] for p in prompts]


def test_eval_answers_and_labels_share_one_prompt_pass(family):
    """``answer``: generation from the prefilled cache == generate_batch alone, row by row;
    the chosen label == the best by one unpadded forward per (prompt, label)."""
    tok = tokenizer(chat=False)
    model = tiny_model(family, vocab=len(tok))
    words = ["the", "quick", "brown", "fox", "jumps", "over", "the", "lazy", "dog"]
    records = [
        Record("t", "prompt", prompt=" ".join(words[i:]), response="x", where=f"f:{i}")
        for i in range(7)
    ]
    labels = ["dog", "fox jumps", "e"]
    answers, chosen = answer(model, tok, records, 4, batch_size=3, labels=labels)
    for record, got, picked in zip(records, answers, chosen, strict=True):
        prompt = prompt_ids(record, tok)
        alone = generate_batch(model, tok, [prompt], max_new_tokens=4)[0]
        assert got == tok.decode(alone, skip_special_tokens=True).strip().split("\n")[0].strip()
        totals = []
        for label in labels:
            ids = tok(label, add_special_tokens=False)["input_ids"]
            with torch.no_grad():
                logp = model(input_ids=torch.tensor([prompt + ids])).logits[0].log_softmax(-1)
            totals.append(sum(float(logp[len(prompt) - 1 + j, t]) for j, t in enumerate(ids)))
        assert picked == labels[max(range(3), key=totals.__getitem__)]
