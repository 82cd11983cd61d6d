"""An OpenAI-compatible HTTP server for a trained run: ``modulora serve RUN_DIR``.

Endpoints: ``GET /health``, ``GET /v1/models``, ``POST /v1/completions`` and
``POST /v1/chat/completions`` (both stream with ``"stream": true``, SSE). A request's
``model`` names a task; for token-routed runs the run folder's name (the run's own
routing, every expert) is accepted too. A token-routed row that names a task routes
over the experts that existed when that task was trained (so tasks added later do not
move it); rows naming the run route over all experts.

Batching: requests within ``batch_window_ms`` of each other run as one batch, across
tasks, on the one thread that owns the model (``batching.py``).

Choices: ``temperature`` defaults to 0 (greedy, reproducible; OpenAI's default is 1);
a completion prompt is tokenized as is with ``add_special_tokens=False``, as training
tokenizes text records; a chat is rendered exactly as in training, with the run's
``data.system_prompt``; text is decoded with special tokens skipped; a ``stop``
string (or a client gone) ends the answer and its row in the batch, at the next token.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from typing import Literal

import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException

from .batching import Done, Failed, Job, Worker
from .generate import LoadedRun, Sampling, chat_prompt_ids, load_run
from .likelihood import score_continuations
from .logprobs import openai_logprobs

MAX_TOKENS = 2048  # most new tokens one request may ask for
log = logging.getLogger("modulora.serve")


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


class _Request(BaseModel):
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


class CompletionRequest(_Request):
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


class ChatRequest(_Request):
    messages: list[ChatMessage]
    max_completion_tokens: int | None = Field(None, ge=1, le=MAX_TOKENS)  # newer OpenAI name


# --- text out -------------------------------------------------------------------------------


class _Text:
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


async def _pieces(job: Job, text: _Text) -> AsyncIterator[tuple[str, str | None]]:
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
class _Shape:
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


def _usage(prompt: int, new: int) -> dict:
    return dict(prompt_tokens=prompt, completion_tokens=new, total_tokens=prompt + new)


def _sse(payload: dict | str) -> str:
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload)}\n\n"


async def _complete(job: Job, text: _Text) -> tuple[str, str]:
    """The whole answer of a job and its finish reason."""
    out, finish = [], "stop"
    async for piece, finish in _pieces(job, text):  # noqa: B007 (the last finish counts)
        out.append(piece)
    return "".join(out), finish


def _kept(tokenizer, ids: list[int], text: str) -> list[int]:
    """The new tokens that make up ``text`` (a stop string may have cut the last ones)."""
    for k in range(len(ids) + 1):
        if len(tokenizer.decode(ids[:k], skip_special_tokens=True)) >= len(text):
            return ids[:k]
    return ids


async def _reply(job: Job, text: _Text, shape: _Shape, stream: bool, include_usage: bool):
    """The answer to one submitted job: a JSON body, or an SSE stream of chunks."""
    if not stream:
        answer, finish = await _complete(job, text)
        usage = _usage(len(job.prompt), len(text.ids))
        return {**shape.head(False), "choices": [shape.choice(answer, finish, False)],
                "usage": usage}  # fmt: skip
    pieces = _pieces(job, text)
    first = await anext(pieces)  # an error before the first token is still a JSON 500
    head = shape.head(True)

    async def events() -> AsyncIterator[str]:
        try:
            if shape.chat:
                delta = {"role": "assistant", "content": ""}
                yield _sse({**head, "choices": [dict(index=0, delta=delta, finish_reason=None)]})
            piece, finish = first
            while True:
                if piece:
                    yield _sse({**head, "choices": [shape.choice(piece, None, True)]})
                if finish is not None:
                    yield _sse({**head, "choices": [shape.choice("", finish, True)]})
                    break
                piece, finish = await anext(pieces)
            if include_usage:
                yield _sse({**head, "choices": [], "usage": _usage(len(job.prompt), len(text.ids))})
        except ApiError as exc:  # headers are sent: report in the stream
            yield _sse(exc.body())
        finally:
            await pieces.aclose()
        yield _sse("[DONE]")

    return StreamingResponse(events(), media_type="text/event-stream")


# --- the app --------------------------------------------------------------------------------


def _add_error_handlers(app: FastAPI) -> None:
    """Every error is a JSON body in OpenAI's shape; FastAPI's 422s become 400s."""

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        if first.get("type") == "json_invalid":
            return ApiError(400, "the body is not valid JSON", code="invalid_json").response()
        loc = [str(p) for p in first.get("loc", ()) if p != "body"]
        message = f"{'.'.join(loc) or 'body'}: {first.get('msg', 'invalid value')}"
        return ApiError(400, message, param=loc[0] if loc else None).response()

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        return ApiError(exc.status_code, str(exc.detail)).response()

    @app.exception_handler(Exception)
    async def crash(request: Request, exc: Exception) -> JSONResponse:
        return ApiError(500, f"internal error: {type(exc).__name__}: {exc}").response()


def build_app(loaded: LoadedRun, max_batch: int = 8, batch_window_ms: float = 10.0) -> FastAPI:
    """The app serving ``loaded``. Its worker thread runs during the app's lifespan (uvicorn,
    or a ``TestClient`` used as a context manager); ``app.state.stats`` counts its batches."""
    worker = Worker(loaded, max_batch, batch_window_ms)
    run_name, tasks, tokenizer = loaded.root.name, loaded.tasks, loaded.tokenizer
    names = loaded.model_names
    n_ctx = loaded.context_length
    vocab = loaded.model.base_model.get_input_embeddings().num_embeddings

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        worker.start()
        try:
            yield
        finally:
            await asyncio.to_thread(worker.stop)

    app = FastAPI(title=f"modulora: {run_name}", lifespan=lifespan)
    app.state.stats, app.state.worker = worker.stats, worker
    _add_error_handlers(app)

    def resolve(model: str) -> str | None:
        """The task a request's ``model`` asks for (None: the run's own routing)."""
        if model in tasks:
            return model
        if model == run_name and not loaded.needs_task:
            return None
        if model == run_name:
            message = f"{loaded.run.method} is task-gated: name a task as model, one of {tasks}"
            raise ApiError(400, message, param="model", code="task_required")
        message = f"model {model!r} does not exist; this server has {names}"
        raise ApiError(404, message, param="model", code="model_not_found")

    def checked(req: _Request, prompt: list[int], max_tokens: int, param: str) -> int:
        """The number of new tokens to make; errors for prompts that cannot be answered."""
        if not worker.thread.is_alive():  # e.g. the app was used without its lifespan
            raise ApiError(503, "the generation worker is not running")
        if not prompt:
            raise ApiError(400, "the prompt is empty", param=param)
        if not {"max_tokens", "max_completion_tokens"} & req.model_fields_set:
            max_tokens = max(1, min(max_tokens, n_ctx - len(prompt)))  # the default fits
        if len(prompt) + max_tokens > n_ctx:
            message = (
                f"this model's context is {n_ctx} tokens; the prompt has {len(prompt)} "
                f"and max_tokens asks for {max_tokens} more"
            )
            raise ApiError(400, message, param=param, code="context_length_exceeded")
        return max_tokens

    def submit(req: _Request, prompt: list[int], task, max_tokens: int) -> Job:
        # greedy ignores top_p: one key, so greedy requests always share a batch
        sampling = Sampling(req.temperature, req.top_p if req.temperature > 0 else 1.0)
        job = Job(prompt, task, max_tokens, sampling, asyncio.get_running_loop())
        worker.submit(job)
        return job

    async def answer(req: _Request, prompt: list[int], task, max_tokens: int, chat: bool):
        max_tokens = checked(req, prompt, max_tokens, "messages" if chat else "prompt")
        job = submit(req, prompt, task, max_tokens)
        include_usage = bool((req.stream_options or {}).get("include_usage"))
        text, shape = _Text(tokenizer, req.stops()), _Shape(chat, req.model)
        return await _reply(job, text, shape, req.stream, include_usage)

    def token_ids(prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            return tokenizer(prompt, add_special_tokens=False)["input_ids"]
        if any(not 0 <= i < vocab for i in prompt):
            raise ApiError(400, f"token ids must be in [0, {vocab})", param="prompt")
        return list(prompt)

    async def scored_completions(req: CompletionRequest, prompts: list, task) -> dict:
        """Several prompts (a choice each), ``echo`` and ``logprobs``: answers first (batched
        by the worker), then one scoring pass on the model's thread."""
        ids = [token_ids(p) for p in prompts]
        limits = [checked(req, p, req.max_tokens, "prompt") for p in ids]
        jobs = [submit(req, p, task, n) if n else None for p, n in zip(ids, limits, strict=True)]
        texts = [_Text(tokenizer, req.stops()) for _ in ids]
        done = await asyncio.gather(
            *(_complete(j, t) for j, t in zip(jobs, texts, strict=True) if j is not None)
        )
        answers = iter(done)
        results = [next(answers) if j is not None else ("", "length") for j in jobs]
        new = [_kept(tokenizer, t.ids, a) for t, (a, _) in zip(texts, results, strict=True)]
        scored = [None] * len(ids)
        if req.echo or req.logprobs is not None:
            full = [p + n if req.echo else n for p, n in zip(ids, new, strict=True)]
            pairs = [(f[:1], f[1:]) if req.echo else (p, f) for p, f in zip(ids, full, strict=True)]
            todo = [i for i, (_, cont) in enumerate(pairs) if cont]
            top = max(req.logprobs or 0, 1)

            def score():
                tasks = None if task is None else [task] * len(todo)
                return score_continuations(
                    loaded.model, tokenizer.pad_token_id, [pairs[i] for i in todo], tasks, top=top
                )

            for i, result in zip(todo, await worker.call(score), strict=True):
                scored[i] = result
        shape, choices = _Shape(False, req.model), []
        for i, (prompt, p_ids) in enumerate(zip(prompts, ids, strict=True)):
            answer, finish = results[i]
            shown = prompt if isinstance(prompt, str) else tokenizer.decode(p_ids)
            choice = shape.choice((shown if req.echo else "") + answer, finish, False)
            choice["index"] = i
            if req.logprobs is not None:
                tokens = p_ids + new[i] if req.echo else new[i]
                start = 0 if req.echo else len(shown)
                choice["logprobs"] = openai_logprobs(
                    tokenizer, tokens, scored[i], req.echo, req.logprobs, start
                )
            choices.append(choice)
        usage = _usage(sum(map(len, ids)), sum(len(t.ids) for t in texts))
        return {**shape.head(False), "choices": choices, "usage": usage}

    @app.get("/health")
    async def health() -> dict:
        return dict(status="ok", run=run_name, method=loaded.run.method, tasks=tasks,
                    needs_task=loaded.needs_task, models=names, context_length=n_ctx,
                    max_batch=max_batch, batch_window_ms=batch_window_ms,
                    stats=worker.stats.snapshot())  # fmt: skip

    @app.get("/v1/models")
    async def models() -> dict:
        created = int(loaded.root.stat().st_mtime)
        data = [
            dict(id=name, object="model", created=created, owned_by="modulora", root=run_name)
            for name in names
        ]
        return {"object": "list", "data": data}

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest):
        task = resolve(req.model)
        prompts = req.prompts()
        if not prompts:
            raise ApiError(400, "the prompt list is empty", param="prompt")
        simple = len(prompts) == 1 and not req.echo and req.logprobs is None
        if simple and req.max_tokens > 0:
            return await answer(req, token_ids(prompts[0]), task, req.max_tokens, chat=False)
        if req.stream:
            message = "stream one prompt per request, without echo or logprobs"
            raise ApiError(400, message, param="stream")
        return await scored_completions(req, prompts, task)

    @app.get("/tokenizer_info")
    async def tokenizer_info() -> dict:
        """What lm-eval's remote tokenizer reads (``tokenizer_backend=remote``)."""
        return dict(eos_token=tokenizer.eos_token, bos_token=tokenizer.bos_token,
                    pad_token=tokenizer.pad_token, model_max_length=n_ctx,
                    chat_template=getattr(tokenizer, "chat_template", None))  # fmt: skip

    @app.post("/tokenize")
    async def tokenize(req: TokenizeRequest) -> dict:
        ids = tokenizer(req.prompt, add_special_tokens=req.add_special_tokens)["input_ids"]
        return {"tokens": ids, "count": len(ids), "max_model_len": n_ctx}

    @app.post("/detokenize")
    async def detokenize(req: DetokenizeRequest) -> dict:
        return {"prompt": tokenizer.decode(token_ids(req.tokens))}

    @app.post("/v1/chat/completions")
    async def chat(req: ChatRequest):
        task = resolve(req.model)
        messages = [{"role": m.role, "content": m.text()} for m in req.messages]
        try:
            ids = chat_prompt_ids(tokenizer, messages, loaded.run.data.system_prompt, task)
        except ValueError as exc:
            raise ApiError(400, str(exc), param="messages") from exc
        return await answer(req, ids, task, req.max_completion_tokens or req.max_tokens, True)

    return app


@contextmanager
def running(app: FastAPI, host: str = "127.0.0.1", port: int = 0) -> Iterator[str]:
    """Serve ``app`` from a background thread (tests, benchmarks, notebooks); yields its URL.

    ``port=0`` takes a free port. The server (and the app's worker) stop on exit.
    """
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, name="modulora-serve", daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError(f"the server did not start on {host}:{port}")
        time.sleep(0.01)
    bound = server.servers[0].sockets[0].getsockname()
    try:
        yield f"http://{bound[0]}:{bound[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout=60)


def serve(
    run_dir: str,
    host: str = "127.0.0.1",
    port: int = 8000,
    max_batch: int = 8,
    batch_window_ms: float = 10.0,
    overrides=(),
) -> None:
    """Load the run in ``run_dir`` and serve it until interrupted (loopback by default)."""
    loaded = load_run(run_dir, overrides)
    app = build_app(loaded, max_batch=max_batch, batch_window_ms=batch_window_ms)
    models = loaded.model_names
    print(f"modulora serve: {loaded.root} ({loaded.run.method}); models: {models}", flush=True)
    uvicorn.run(app, host=host, port=port, log_level="info")
