"""An OpenAI-compatible HTTP server for a trained run: ``modulora serve RUN_DIR``.

Endpoints: ``GET /health``, ``GET /v1/models``, ``POST /v1/completions`` and
``POST /v1/chat/completions`` (both stream with ``"stream": true``, SSE; the wire
format is ``openai_api.py``), and lm-eval's tokenizer endpoints ``/tokenizer_info``,
``/tokenize``, ``/detokenize``. Completions take text or token ids, several prompts
(a choice each), ``echo`` and ``logprobs`` (scored on the model's thread between
batches), and ``max_tokens: 0`` to score a prompt only. A request's
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
import logging
import threading
import time
from collections.abc import Iterator
from contextlib import asynccontextmanager, contextmanager

import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from .batching import Job, Worker
from .generate import LoadedRun, Sampling, chat_prompt_ids, load_run
from .likelihood import score_continuations
from .logprobs import openai_logprobs
from .openai_api import (
    ApiError,
    BaseRequest,
    ChatRequest,
    CompletionRequest,
    DetokenizeRequest,
    IncrementalText,
    Shape,
    TokenizeRequest,
    complete,
    kept_tokens,
    reply,
    usage_of,
)

log = logging.getLogger("modulora.serve")


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

    def checked(req: BaseRequest, prompt: list[int], max_tokens: int, param: str) -> int:
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

    def submit(req: BaseRequest, prompt: list[int], task, max_tokens: int) -> Job:
        # greedy ignores top_p: one key, so greedy requests always share a batch
        sampling = Sampling(req.temperature, req.top_p if req.temperature > 0 else 1.0)
        job = Job(prompt, task, max_tokens, sampling, asyncio.get_running_loop())
        worker.submit(job)
        return job

    async def answer(req: BaseRequest, prompt: list[int], task, max_tokens: int, chat: bool):
        max_tokens = checked(req, prompt, max_tokens, "messages" if chat else "prompt")
        job = submit(req, prompt, task, max_tokens)
        include_usage = bool((req.stream_options or {}).get("include_usage"))
        text, shape = IncrementalText(tokenizer, req.stops()), Shape(chat, req.model)
        return await reply(job, text, shape, req.stream, include_usage)

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
        texts = [IncrementalText(tokenizer, req.stops()) for _ in ids]
        done = await asyncio.gather(
            *(complete(j, t) for j, t in zip(jobs, texts, strict=True) if j is not None)
        )
        answers = iter(done)
        results = [next(answers) if j is not None else ("", "length") for j in jobs]
        new = [kept_tokens(tokenizer, t.ids, a) for t, (a, _) in zip(texts, results, strict=True)]
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
        shape, choices = Shape(False, req.model), []
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
        usage = usage_of(sum(map(len, ids)), sum(len(t.ids) for t in texts))
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
