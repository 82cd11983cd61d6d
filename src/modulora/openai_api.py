"""OpenAI's wire format for ``modulora serve``: request models, answers, streaming.

Requests are pydantic models that ignore fields they do not use (``user``, ``seed``,
...); answers are built in OpenAI's shapes (``chat.completion``, ``text_completion``
and their stream chunks, ``usage``); ``IncrementalText`` decodes a row's tokens incrementally
for streaming without splitting a character or a stop string; errors are
``ApiError``, answered as ``{"error": {message, type, param, code}}``.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Literal

from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from .batching import Done, Failed, Job

MAX_TOKENS = 2048  # most new tokens one request may ask for


class ApiError(Exception):
    """An error answered in OpenAI's shape: ``{"error": {message, type, param, code}}``."""

    def __init__(self, status: int, message: str, param=None, code=None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict:
        kind = "invalid_request_error" if self.status < 500 else "server_error"
        return {"error": dict(message=self.message, type=kind, param=self.param, code=self.code)}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status)


# --- requests: unknown OpenAI fields (user, seed, ...) are ignored --------------------------


class BaseRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str
    max_tokens: int = Field(64, ge=1, le=MAX_TOKENS)
    temperature: float = Field(0.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    n: int = Field(1, ge=1, le=1)
    stream: bool = False
    stream_options: dict | None = None  # {"include_usage": true} adds a usage chunk
    stop: str | list[str] | None = None

    def stops(self) -> list[str]:
        return [s for s in ([self.stop] if isinstance(self.stop, str) else self.stop or []) if s]


class CompletionRequest(BaseRequest):
    # text, token ids, or a list of either (one choice each, as lm-eval sends them)
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int = Field(64, ge=0, le=MAX_TOKENS)  # 0: score the prompt only (echo)
    echo: bool = False  # the prompt comes back before the answer (and in logprobs)
    logprobs: int | None = Field(None, ge=0, le=20)  # also return this many top tokens

    def prompts(self) -> list[str | list[int]]:
        if isinstance(self.prompt, str) or (self.prompt and isinstance(self.prompt[0], int)):
            return [self.prompt]
        return list(self.prompt)


class TokenizeRequest(BaseModel):
    prompt: str
    add_special_tokens: bool = False


class DetokenizeRequest(BaseModel):
    tokens: list[int]


class ChatMessage(BaseModel):
    role: Literal["system", "user", "assistant"]
    content: str | list[dict]  # text, or OpenAI content parts ({"type": "text", "text": ...})

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(str(p.get("text", "")) for p in self.content if p.get("type") == "text")


class ChatRequest(BaseRequest):
    messages: list[ChatMessage]
    max_completion_tokens: int | None = Field(None, ge=1, le=MAX_TOKENS)  # newer OpenAI name


# --- text out -------------------------------------------------------------------------------


class IncrementalText:
    """One row's text, decoded incrementally: the ids so far are decoded whole and only the
    new suffix is released, held back while it ends with U+FFFD (a character whose other
    bytes are still to come) or could be the start of a stop string."""

    def __init__(self, tokenizer, stops: list[str]) -> None:
        self.tokenizer, self.stops = tokenizer, stops
        self.hold = max((len(s) for s in stops), default=1) - 1
        self.ids: list[int] = []
        self.text, self.sent, self.stopped = "", 0, False

    def _decode(self) -> str:
        return self.tokenizer.decode(
            self.ids, skip_special_tokens=True, clean_up_tokenization_spaces=False
        )

    def add(self, token: int) -> None:
        self.ids.append(token)
        if not (text := self._decode()).endswith("\ufffd"):
            self._set(text)

    def finish(self) -> None:
        if not self.stopped:
            self._set(self._decode())

    def _set(self, text: str) -> None:
        hits = [i for s in self.stops if (i := text.find(s)) >= 0]
        self.text, self.stopped = (text[: min(hits)], True) if hits else (text, False)

    def release(self, final: bool = False) -> str:
        end = len(self.text) if final or self.stopped else len(self.text) - self.hold
        piece = self.text[self.sent : max(end, self.sent)]
        self.sent += len(piece)
        return piece


async def pieces_of(job: Job, text: IncrementalText) -> AsyncIterator[tuple[str, str | None]]:
    """Yield ``(new text, None)`` as the job's tokens arrive, then ``(rest, finish_reason)``.

    Raises:
        ApiError: 500, generation failed.
    """
    try:
        while True:
            item = await job.events.get()
            if isinstance(item, Failed):
                raise ApiError(500, item.message)
            if isinstance(item, Done):
                text.finish()
                length = item.tokens >= job.max_tokens and not text.stopped
                yield text.release(final=True), "length" if length else "stop"
                return
            text.add(item)
            if text.stopped:
                yield text.release(final=True), "stop"
                return
            if piece := text.release():
                yield piece, None
    finally:
        job.cancelled = True


@dataclass
class Shape:
    """OpenAI response shapes for one request (chat or text completion)."""

    chat: bool
    model: str
    id: str = field(default_factory=lambda: uuid.uuid4().hex[:24])
    created: int = field(default_factory=lambda: int(time.time()))

    def head(self, stream: bool) -> dict:
        kind = "chat.completion" + (".chunk" if stream else "") if self.chat else "text_completion"
        prefix = "chatcmpl" if self.chat else "cmpl"
        return dict(id=f"{prefix}-{self.id}", object=kind, created=self.created, model=self.model)

    def choice(self, piece: str, finish: str | None, stream: bool) -> dict:
        if not self.chat:
            return dict(index=0, text=piece, logprobs=None, finish_reason=finish)
        if stream:  # the last chunk has an empty delta and the finish reason
            return dict(index=0, delta={"content": piece} if piece else {}, finish_reason=finish)
        message = {"role": "assistant", "content": piece}
        return dict(index=0, message=message, finish_reason=finish)


def usage_of(prompt: int, new: int) -> dict:
    return dict(prompt_tokens=prompt, completion_tokens=new, total_tokens=prompt + new)


def sse(payload: dict | str) -> str:
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload)}\n\n"


async def complete(job: Job, text: IncrementalText) -> tuple[str, str]:
    """The whole answer of a job and its finish reason."""
    out, finish = [], "stop"
    async for piece, finish in pieces_of(job, text):  # noqa: B007 (the last finish counts)
        out.append(piece)
    return "".join(out), finish


def kept_tokens(tokenizer, ids: list[int], text: str) -> list[int]:
    """The new tokens that make up ``text`` (a stop string may have cut the last ones)."""
    for k in range(len(ids) + 1):
        if len(tokenizer.decode(ids[:k], skip_special_tokens=True)) >= len(text):
            return ids[:k]
    return ids


async def reply(job: Job, text: IncrementalText, shape: Shape, stream: bool, include_usage: bool):
    """The answer to one submitted job: a JSON body, or an SSE stream of chunks."""
    if not stream:
        answer, finish = await complete(job, text)
        usage = usage_of(len(job.prompt), len(text.ids))
        return {**shape.head(False), "choices": [shape.choice(answer, finish, False)],
                "usage": usage}  # fmt: skip
    pieces = pieces_of(job, text)
    first = await anext(pieces)  # an error before the first token is still a JSON 500
    head = shape.head(True)

    async def events() -> AsyncIterator[str]:
        try:
            if shape.chat:
                delta = {"role": "assistant", "content": ""}
                yield sse({**head, "choices": [dict(index=0, delta=delta, finish_reason=None)]})
            piece, finish = first
            while True:
                if piece:
                    yield sse({**head, "choices": [shape.choice(piece, None, True)]})
                if finish is not None:
                    yield sse({**head, "choices": [shape.choice("", finish, True)]})
                    break
                piece, finish = await anext(pieces)
            if include_usage:
                yield sse(
                    {**head, "choices": [], "usage": usage_of(len(job.prompt), len(text.ids))}
                )
        except ApiError as exc:  # headers are sent: report in the stream
            yield sse(exc.body())
        finally:
            await pieces.aclose()
        yield sse("[DONE]")

    return StreamingResponse(events(), media_type="text/event-stream")
