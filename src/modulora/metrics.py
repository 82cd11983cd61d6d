"""Task metrics, example by example, and their confidence intervals.

Every metric is computed from per-example statistics whose aggregate is the score,
so the same numbers give the score, a bootstrap confidence interval (resampling
examples) and a paired bootstrap test between two systems scored on the same
examples:

- ``exact``: 1 if the answer equals the reference after normalisation: Unicode
  NFKC, case folded, whitespace collapsed, a trailing sentence mark (``. ! ? , ; :``)
  and surrounding quotes dropped. Signs, decimal points and every other character
  count. Two numbers compare as numbers (``7.0`` == ``7``, ``1,000`` == ``1000``,
  ``-7`` != ``7``).
- ``classification``: 1 if the answer names the reference label: the label the
  normalised answer starts with, on a word boundary (``"tech, mostly"`` is ``tech``;
  ``"technically"`` is no label). Longer labels are tried first.
- ``chrf``: sacrebleu's chrF; the per-example statistics are its sufficient
  statistics (character and word n-gram matches), summed over examples.

Scores are in [0, 100]. The general-ability probes use the same machinery: MMLU as
hits (a mean), perplexity from per-text (summed token loss, tokens) pairs.
"""

from __future__ import annotations

import re
import unicodedata
import zlib
from dataclasses import dataclass

import numpy as np
from sacrebleu.metrics import CHRF

METRICS = ("exact", "classification", "chrf")
RESAMPLES = 1000
_NUMBER = re.compile(r"[-+]?(\d{1,3}(,\d{3})+|\d+)?(\.\d+)?")
_TRAILING = ".!?,;:"
_QUOTES = "\"'`“”‘’"


def normalize(text: str) -> str:
    """Case-folded text with collapsed whitespace, without a final sentence mark or quotes."""
    text = " ".join(unicodedata.normalize("NFKC", text).casefold().split())
    text = text.strip(_QUOTES).rstrip(_TRAILING).strip(_QUOTES).strip()
    return text


def as_number(text: str) -> float | None:
    """The value of ``text`` if it is one number (``-7``, ``3.50``, ``1,000``), else None."""
    text = text.strip()
    if not text or not _NUMBER.fullmatch(text) or not any(c.isdigit() for c in text):
        return None
    return float(text.replace(",", ""))


def exact_match(prediction: str, reference: str) -> bool:
    pred, ref = normalize(prediction), normalize(reference)
    a, b = as_number(pred), as_number(ref)
    if a is not None and b is not None:
        return a == b
    return pred == ref


def match_label(prediction: str, labels: list[str]) -> str | None:
    """The label ``prediction`` starts with, on a word boundary (None: no label)."""
    pred = normalize(prediction)
    for label in sorted(labels, key=lambda lab: -len(normalize(lab))):
        norm = normalize(label)
        if pred == norm or (pred.startswith(norm) and not _is_word_char(pred[len(norm)])):
            return label
    return None


def _is_word_char(char: str) -> bool:
    return char.isalnum() or char == "_"


def example_stats(
    metric: str, predictions: list[str], references: list[str], labels: list[str] | None = None
) -> np.ndarray:
    """Per-example statistics, shape ``(n, k)``: hits (k = 1) or chrF statistics.

    Raises:
        ValueError: an unknown metric, or predictions and references of other lengths.
    """
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    if metric == "chrf":
        stats = CHRF()._extract_corpus_statistics(predictions, [references])
        return np.asarray(stats, dtype=np.float64).reshape(len(predictions), -1)
    if metric == "classification":
        by_norm = {normalize(label): label for label in labels or []}
        hits = [
            match_label(p, list(by_norm.values())) == by_norm.get(normalize(r), r)
            for p, r in zip(predictions, references, strict=True)
        ]
    elif metric == "exact":
        hits = [exact_match(p, r) for p, r in zip(predictions, references, strict=True)]
    else:
        raise ValueError(f"unknown metric {metric!r}; expected one of {METRICS}")
    return np.asarray(hits, dtype=np.float64).reshape(-1, 1)


def aggregate(metric: str, stats: np.ndarray) -> float:
    """The score of a set of examples from their statistics (NaN for none)."""
    if len(stats) == 0:
        return float("nan")
    if metric == "chrf":
        return float(CHRF()._compute_score_from_stats(list(stats.sum(0))).score)
    if metric == "perplexity":  # rows: (sum of token losses, tokens) per text
        return float(np.exp(stats[:, 0].sum() / max(stats[:, 1].sum(), 1)))
    return float(100.0 * stats[:, 0].mean())


def task_seed(name: str) -> int:
    """A fixed bootstrap seed per task: runs scored on the same task resample the same
    examples (a paired test), different tasks resample independently."""
    return zlib.crc32(name.encode("utf-8"))


def resample(
    metric: str, stats: np.ndarray, seed: int = 0, resamples: int = RESAMPLES
) -> np.ndarray:
    """The score of each of ``resamples`` bootstrap resamples of the examples (seeded:
    the same seed and number of examples draw the same resamples)."""
    index = np.random.default_rng(seed).integers(0, len(stats), size=(resamples, len(stats)))
    if metric == "perplexity":
        return np.exp(stats[index, 0].sum(1) / np.maximum(stats[index, 1].sum(1), 1))
    if metric != "chrf":
        return 100.0 * stats[index, 0].mean(1)
    return np.array([aggregate(metric, stats[row]) for row in index])


def interval(samples: np.ndarray, level: float = 0.95) -> tuple[float, float]:
    """Percentile interval of bootstrap samples."""
    tail = 100 * (1 - level) / 2
    low, high = np.percentile(samples, [tail, 100 - tail])
    return float(low), float(high)


def bootstrap_ci(metric: str, stats: np.ndarray, seed: int = 0) -> tuple[float, float]:
    """95% percentile bootstrap interval of the score, resampling examples."""
    if len(stats) == 0:
        return float("nan"), float("nan")
    return interval(resample(metric, stats, seed))


@dataclass(frozen=True)
class Difference:
    """Score of A minus score of B on the same examples, with its paired bootstrap."""

    delta: float
    low: float  # 95% interval of the difference
    high: float
    p_value: float  # two-sided

    @property
    def significant(self) -> bool:
        return self.p_value < 0.05


def difference(delta: float, samples: np.ndarray) -> Difference:
    """``delta`` with the bootstrap samples of the difference (A's resamples minus B's,
    drawn with the same examples). The p-value counts resamples at least as far from
    ``delta`` as 0 is: the samples spread around ``delta`` as they would around 0 if
    the two were equal (the shift method of Koehn 2004 / Berg-Kirkpatrick et al. 2012)."""
    low, high = interval(samples)
    p = float(np.mean(np.abs(samples - delta) >= abs(delta))) if delta else 1.0
    return Difference(delta, low, high, p)


def paired_bootstrap(metric: str, a: np.ndarray, b: np.ndarray, seed: int = 0) -> Difference:
    """Paired bootstrap of ``score(a) - score(b)``, both resampled with the same examples.

    Raises:
        ValueError: when the two were not scored on the same number of examples.
    """
    if len(a) != len(b):
        raise ValueError(f"paired examples needed: {len(a)} vs {len(b)}")
    delta = aggregate(metric, a) - aggregate(metric, b)
    return difference(delta, resample(metric, a, seed) - resample(metric, b, seed))


def score(metric: str, predictions: list[str], references: list[str], labels=None) -> float:
    """Task score in [0, 100] (NaN for no examples)."""
    return aggregate(metric, example_stats(metric, predictions, references, labels))
