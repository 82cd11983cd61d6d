"""OpenAI's legacy ``logprobs`` object for ``/v1/completions`` (``echo`` and ``logprobs``).

``{"tokens": [...], "token_logprobs": [...], "top_logprobs": [...], "text_offset": [...]}``,
one entry per token: with ``echo`` the prompt's tokens come first, and the first of them
has no log-prob (nothing precedes it), so its entries are ``None``. Tokens are shown as
their decoded text; ``text_offset`` is where each starts in the returned text. This is
the shape lm-eval's ``local-completions`` reads for loglikelihood tasks.
"""

from __future__ import annotations

from .likelihood import Scored


def openai_logprobs(
    tokenizer, ids: list[int], scored: Scored | None, echo: bool, top: int, start: int = 0
) -> dict:
    """The logprobs object of ``ids`` (the prompt's and new tokens with ``echo``, else
    the new ones), whose scores ``scored`` covers every token after the first with
    ``echo``, every token without; ``start`` is the text offset of the first token."""
    pieces = [tokenizer.decode([i], clean_up_tokenization_spaces=False) for i in ids]
    offsets, at = [], start
    for piece in pieces:
        offsets.append(at)
        at += len(piece)
    values = list(scored.logprobs) if scored else []
    alternatives = [_top(tokenizer, alt, top) for alt in scored.top] if scored else []
    if echo and ids:  # the first prompt token is given, not predicted
        values, alternatives = [None, *values], [None, *alternatives]
    return {
        "tokens": pieces,
        "token_logprobs": values,
        "top_logprobs": alternatives,
        "text_offset": offsets,
    }


def _top(tokenizer, alternatives: dict[int, float], top: int) -> dict[str, float]:
    """The ``top`` most likely tokens by text; a token whose text another already has
    (bytes of one character decode alike) is keyed by its vocabulary entry instead."""
    out: dict[str, float] = {}
    for i, lp in sorted(alternatives.items(), key=lambda kv: -kv[1])[:top]:
        key = tokenizer.decode([i], clean_up_tokenization_spaces=False)
        if key in out:
            key = tokenizer.convert_ids_to_tokens(i)
        if key in out:
            key = f"token_id:{i}"
        out[key] = lp
    return out
