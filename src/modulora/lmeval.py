"""The ``modulora`` model type for lm-evaluation-harness: a run folder, evaluated in-process.

Token-routed runs cannot be merged into one plain model, so lm-eval's ``hf`` model
cannot load them; this model type loads the run itself (``generate.load_run``) and
answers lm-eval's three request kinds with modulora's own scoring and generation::

    python -m modulora.lmeval --model modulora --model_args run=runs/demo,task=math \\
        --tasks my_task --include_path tasks/

(``python -m modulora.lmeval`` is lm-eval's own command line with this model type
registered; any ``lm_eval`` argument works.) From Python, ``import modulora.lmeval``
registers it for ``lm_eval.simple_evaluate(model="modulora", model_args=...)``.

``model_args``: ``run`` (the run folder), ``task`` (route every request as this task;
required by task-gated methods; token routers without it route by token, as a
request naming the run does), ``batch_size`` (default 8), ``max_length`` (default:
the model's context), ``max_gen_toks`` (default 256). Texts are tokenized as modulora
tokenizes training text: no special tokens added. Requires ``pip install
"modulora[eval]"``.
"""

from __future__ import annotations

import sys

# lm-eval's own model types first: its registry loads them only while it is empty, so
# registering ours alone would hide them
import lm_eval.models  # noqa: F401
from lm_eval import utils
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from tqdm.auto import tqdm

from .generate import Sampling, chat_prompt_ids, generate_batch, load_run
from .likelihood import score_continuations


@register_model("modulora")
class ModuloraLM(TemplateLM):
    """lm-eval's model interface over a modulora run folder."""

    def __init__(
        self,
        run: str,
        task: str | None = None,
        batch_size: int | str = 8,
        max_length: int | None = None,
        max_gen_toks: int = 256,
        **kwargs,
    ) -> None:
        super().__init__()
        self.loaded = load_run(run)
        if task is not None and task not in self.loaded.tasks:
            raise ValueError(f"task {task!r} is not in the run; its tasks: {self.loaded.tasks}")
        if task is None and self.loaded.needs_task:
            raise ValueError(
                f"{self.loaded.run.method} is task-gated: pass task=..., one of {self.loaded.tasks}"
            )
        self.task, self.tokenizer = task, self.loaded.tokenizer
        self._batch = int(batch_size) if str(batch_size).isdigit() else 8  # "auto": 8
        self.max_length = int(max_length or self.loaded.context_length)
        self.max_gen_toks = int(max_gen_toks)

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def tokenizer_name(self) -> str:
        return str(self.loaded.root)

    def apply_chat_template(self, chat_history: list[dict], add_generation_prompt=True) -> str:
        """lm-eval's ``--apply_chat_template``: the conversation as modulora renders it for
        training and serving (the run's system prompt included)."""
        messages = list(chat_history)
        if not add_generation_prompt and messages and messages[-1]["role"] == "assistant":
            prefill = messages.pop()["content"]  # lm-eval continues an assistant turn
        else:
            prefill = ""
        ids = chat_prompt_ids(self.tokenizer, messages, self.loaded.run.data.system_prompt)
        return self.tokenizer.decode(ids) + prefill

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs):
        return self.tokenizer(string, add_special_tokens=bool(add_special_tokens))["input_ids"]

    def _tasks(self, n: int) -> list[str] | None:
        return None if self.task is None else [self.task] * n

    def _score(self, pairs: list[tuple[list[int], list[int]]]):
        # keep the last max_length tokens of context + continuation, as lm-eval's hf model does
        kept = []
        for ctx, cont in pairs:
            whole = (ctx + cont)[-self.max_length :]
            kept.append((whole[: len(whole) - len(cont)] or [self.prefix_token_id], cont))
        return score_continuations(
            self.loaded.model,
            self.tokenizer.pad_token_id,
            kept,
            self._tasks(len(kept)),
            self._batch,
            desc="lm-eval loglikelihood",
        )

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs):
        scored = self._score([(ctx, cont) for _, ctx, cont in requests])
        out = []
        for (key, _, _), s in zip(requests, scored, strict=True):
            result = (s.total, s.greedy)
            self.cache_hook.add_partial("loglikelihood", key, result)
            out.append(result)
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        windows, owner = [], []
        for i, (text,) in enumerate(req.args for req in requests):
            rolling = utils.get_rolling_token_windows(
                token_list=self.tok_encode(text),
                prefix_token=self.prefix_token_id,
                max_seq_len=self.max_length,
                context_len=1,
            )
            for window in map(utils.make_disjoint_window, rolling):
                windows.append(window)
                owner.append(i)
        totals = [0.0] * len(requests)
        for i, s in zip(owner, self._score(windows), strict=True):
            totals[i] += s.total
        for req, total in zip(requests, totals, strict=True):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        out: list[str | None] = [None] * len(requests)
        groups: dict[str, list[int]] = {}
        for i, req in enumerate(requests):  # one batch shares its decoding settings
            groups.setdefault(repr(sorted(req.args[1].items())), []).append(i)
        bar = tqdm(total=len(requests), desc="lm-eval generate", disable=disable_tqdm)
        for members in groups.values():
            settings = dict(requests[members[0]].args[1])
            stops = _stops(settings.pop("until", None), self.tokenizer.eos_token)
            limit = int(settings.pop("max_gen_toks", self.max_gen_toks))
            temperature = float(settings.pop("temperature", 0.0))
            if not settings.pop("do_sample", temperature > 0):
                temperature = 0.0
            sampling = Sampling(temperature, float(settings.pop("top_p", 1.0)))
            for start in range(0, len(members), self._batch):
                chunk = members[start : start + self._batch]
                contexts = [self.tok_encode(requests[i].args[0]) for i in chunk]
                prompts = [c[-(self.max_length - limit) :] for c in contexts]
                texts = self._generate(prompts, limit, sampling, stops)
                for i, text in zip(chunk, texts, strict=True):
                    out[i] = text
                    self.cache_hook.add_partial("generate_until", requests[i].args, text)
                bar.update(len(chunk))
        bar.close()
        return out  # type: ignore[return-value]

    def _generate(self, prompts, limit: int, sampling: Sampling, stops: list[str]) -> list[str]:
        """Answers cut at the first stop string; a row ends as soon as it has one."""
        ids: list[list[int]] = [[] for _ in prompts]

        def on_token(row: int, token: int) -> bool:
            ids[row].append(token)
            return any(s in self.tokenizer.decode(ids[row]) for s in stops)

        rows = generate_batch(
            self.loaded.model,
            self.tokenizer,
            prompts,
            self._tasks(len(prompts)),
            limit,
            sampling,
            on_token,
        )
        return [_cut(self.tokenizer.decode(row, skip_special_tokens=True), stops) for row in rows]


def _stops(until, eos: str | None) -> list[str]:
    stops = [until] if isinstance(until, str) else list(until or [])
    return [s for s in [*stops, eos] if s]


def _cut(text: str, stops: list[str]) -> str:
    for stop in stops:
        text = text.split(stop)[0]
    return text


def main() -> None:
    """lm-eval's command line with the ``modulora`` model type registered."""
    from lm_eval.__main__ import cli_evaluate

    sys.argv[0] = "lm_eval"
    cli_evaluate()


if __name__ == "__main__":
    main()
