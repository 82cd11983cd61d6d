"""The OpenAI-compatible server, live on loopback with a real HTTP client.

Two tiny trained runs: a task-gated one (cgc-lora) and a token-routed one (molora).
Every answer is checked against ``generate_batch`` run directly (greedy), and batched
answers against the same requests sent alone.
"""

from __future__ import annotations

import asyncio
import inspect
import json

import httpx
import pytest
import torch
from fastapi.testclient import TestClient
from tiny import chat_prompt, model_dir, tokenizer, write_run

from modulora import batching, openai_api
from modulora.cli import main
from modulora.generate import generate_batch, load_run
from modulora.serve import build_app, running, serve

FAST = {"lr": 1e-2, "max_steps": 2, "max_length": 40}
TASKS = ["reverse", "upper"]
CHAT = {"messages": [{"role": "user", "content": "reverse: abc"}], "max_tokens": 12}


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models run faster on one torch thread, and leave a core to the server's loop."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    return model_dir(tmp_path_factory.mktemp("model") / "tiny-llama")


def _live(tmp_path_factory, model_path, method, window_ms):
    folder = tmp_path_factory.mktemp(method)
    assert main(["train", str(write_run(folder, method, model_path, train=FAST))]) == 0
    loaded = load_run(folder / "run")
    app = build_app(loaded, max_batch=8, batch_window_ms=window_ms)
    with running(app) as url, httpx.Client(base_url=url, timeout=60) as client:
        yield loaded, app, client


@pytest.fixture(scope="module")
def gated(tmp_path_factory, model_path, one_thread):
    yield from _live(tmp_path_factory, model_path, "cgc-lora", window_ms=50)


@pytest.fixture(scope="module")
def routed(tmp_path_factory, model_path, one_thread):
    yield from _live(tmp_path_factory, model_path, "molora", window_ms=10)


def _direct(loaded, prompt_ids, task, max_tokens):
    """What the model answers alone, greedy: (text, tokens). (Called between requests, while
    the server's worker is idle, so the two never run the model at once.)"""
    tasks = [task] if loaded.needs_task else None
    tokens = generate_batch(loaded.model, loaded.tokenizer, [prompt_ids], tasks, max_tokens)[0]
    text = loaded.tokenizer.decode(
        tokens, skip_special_tokens=True, clean_up_tokenization_spaces=False
    )
    return text, tokens


def _chat_ids(loaded, body, task):
    assert loaded.run.data.system_prompt is None  # the tiny template has no default system turn
    return chat_prompt(loaded.tokenizer, body["messages"])


def _error(response, status, code=None, param=None):
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == ("invalid_request_error" if status < 500 else "server_error")
    assert error["message"]
    if code is not None:
        assert error["code"] == code
    if param is not None:
        assert error["param"] == param
    return error


def _sse(response) -> list[dict]:
    """The JSON chunks of an SSE response, checked to end with ``data: [DONE]``."""
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    lines = [line for line in response.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines)
    assert lines[-1] == "data: [DONE]"
    return [json.loads(line[6:]) for line in lines[:-1]]


def _release_all(stops: list[str], text: str) -> tuple[list[str], bool]:
    """Feed ``text``'s tokens one by one to the server's incremental decoder."""
    tok = tokenizer()
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == text and len(ids) > len(text.split())
    out = openai_api.IncrementalText(tok, stops)
    pieces = []
    for token in ids:
        out.add(token)
        pieces.append(out.release())
        if out.stopped:
            break
    out.finish()
    return [*pieces, out.release(final=True)], out.stopped


def test_incremental_text_never_splits_characters_or_stop_strings():
    text = "héllo wörld 日本 ok"  # multi-byte characters: several tokens each
    pieces, stopped = _release_all([], text)
    assert "".join(pieces) == text and not stopped
    assert not any("\ufffd" in p for p in pieces) and sum(bool(p) for p in pieces) > 5
    pieces, stopped = _release_all(["wör", "zzz"], text)
    assert "".join(pieces) == "héllo " and stopped
    pieces, stopped = _release_all(["本"], text)
    assert "".join(pieces) == "héllo wörld 日" and stopped


def test_serve_signature_binds_to_loopback():
    params = inspect.signature(serve).parameters
    assert list(params) == [
        "run_dir", "host", "port", "max_batch", "batch_window_ms", "overrides"
    ]  # fmt: skip
    assert params["host"].default == "127.0.0.1" and params["port"].default == 8000


def test_health_and_models(gated, routed):
    for (loaded, _, client), names in [(gated, TASKS), (routed, [*TASKS, "run"])]:
        health = client.get("/health").json()
        assert health["status"] == "ok" and health["tasks"] == TASKS
        assert health["method"] == loaded.run.method and health["needs_task"] == loaded.needs_task
        assert health["context_length"] == 256  # the tiny Llama's max_position_embeddings
        assert {"batches", "requests", "mean_batch_size"} <= set(health["stats"])
        models = client.get("/v1/models").json()
        assert models["object"] == "list"
        assert [m["id"] for m in models["data"]] == names
        assert all(m["object"] == "model" and m["owned_by"] == "modulora" for m in models["data"])
    assert gated[0].needs_task and not routed[0].needs_task


def test_completion_equals_direct_generation(gated):
    loaded, _, client = gated
    prompt = "upper: abc"
    for task in TASKS:
        r = client.post(
            "/v1/completions", json={"model": task, "prompt": [prompt], "max_tokens": 9}
        )
        assert r.status_code == 200, r.text
        body = r.json()
        ids = loaded.tokenizer(prompt, add_special_tokens=False)["input_ids"]
        text, tokens = _direct(loaded, ids, task, 9)
        assert body["object"] == "text_completion" and body["model"] == task
        assert body["id"].startswith("cmpl-") and isinstance(body["created"], int)
        choice = body["choices"][0]
        assert choice["text"] == text and choice["index"] == 0
        assert choice["finish_reason"] == ("length" if len(tokens) == 9 else "stop")
        assert body["usage"] == {
            "prompt_tokens": len(ids),
            "completion_tokens": len(tokens),
            "total_tokens": len(ids) + len(tokens),
        }


def test_default_max_tokens_fits_the_context(gated):
    loaded, _, client = gated
    prompt = "reverse: abc"
    while len(ids := loaded.tokenizer(prompt, add_special_tokens=False)["input_ids"]) < 200:
        prompt += " the quick brown fox"
    assert len(ids) < 250  # the default 64 new tokens would not fit in 256 positions
    body = client.post("/v1/completions", json={"model": "upper", "prompt": prompt}).json()
    assert 0 < body["usage"]["completion_tokens"] <= 256 - len(ids)
    assert body["usage"]["total_tokens"] <= 256


def test_chat_gated_and_routed(gated, routed):
    loaded, _, client = gated
    texts = []
    for task in TASKS:
        body = client.post("/v1/chat/completions", json={**CHAT, "model": task}).json()
        text, tokens = _direct(loaded, _chat_ids(loaded, CHAT, task), task, 12)
        assert body["object"] == "chat.completion" and body["id"].startswith("chatcmpl-")
        assert body["choices"][0]["message"] == {"role": "assistant", "content": text}
        assert body["usage"]["completion_tokens"] == len(tokens)
        texts.append(text)
    assert texts[0] != texts[1]  # the task matters: rows of different tasks differ
    loaded, _, client = routed
    text, _ = _direct(loaded, _chat_ids(loaded, CHAT, None), None, 12)
    for name in ["run", "reverse"]:  # token routers route by token, whatever the name
        body = client.post("/v1/chat/completions", json={**CHAT, "model": name}).json()
        assert body["choices"][0]["message"]["content"] == text and body["model"] == name


def test_multi_turn_chat_answers_the_last_question(gated):
    loaded, _, client = gated
    history = [
        {"role": "user", "content": "reverse: abc"},
        {"role": "assistant", "content": "cba"},
    ]
    prompts = []
    for last in ("upper: xy", "reverse: hgfe"):
        messages = [*history, {"role": "user", "content": last}]
        body = {"model": "upper", "messages": messages, "max_tokens": 8}
        answer = client.post("/v1/chat/completions", json=body).json()
        expected = chat_prompt(loaded.tokenizer, messages)  # the whole conversation
        assert answer["usage"]["prompt_tokens"] == len(expected)
        text, _ = _direct(loaded, expected, "upper", 8)
        assert answer["choices"][0]["message"]["content"] == text
        prompts.append(answer["usage"]["prompt_tokens"])
    assert prompts[0] != prompts[1]


@pytest.mark.parametrize("server", ["gated", "routed"])
def test_streamed_chat_equals_plain_chat(server, request):
    loaded, _, client = request.getfixturevalue(server)
    body = {**CHAT, "model": "upper", "max_tokens": 16}
    plain = client.post("/v1/chat/completions", json=body).json()
    with client.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as r:
        chunks = _sse(r)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert len({c["id"] for c in chunks}) == 1
    deltas = [c["choices"][0]["delta"].get("content", "") for c in chunks[1:]]
    assert len(deltas) > 2  # token by token, not one piece
    assert "".join(deltas) == plain["choices"][0]["message"]["content"]
    assert [c["choices"][0]["finish_reason"] for c in chunks][-1] == (
        plain["choices"][0]["finish_reason"]
    )
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-1])


def test_streamed_completion_with_usage(gated):
    _, _, client = gated
    body = {"model": "reverse", "prompt": "reverse: hgf", "max_tokens": 10}
    plain = client.post("/v1/completions", json=body).json()
    stream = {**body, "stream": True, "stream_options": {"include_usage": True}}
    with client.stream("POST", "/v1/completions", json=stream) as r:
        chunks = _sse(r)
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == plain["usage"]
    text = "".join(c["choices"][0]["text"] for c in chunks[:-1])
    assert text == plain["choices"][0]["text"]


def test_stop_strings(gated):
    _, _, client = gated
    body = {**CHAT, "model": "reverse", "max_tokens": 24}
    full = client.post("/v1/chat/completions", json=body).json()["choices"][0]["message"]
    full = full["content"]
    assert len(full) >= 6, full
    stop = full[3:5]
    expected = full[: full.find(stop)]
    plain = client.post("/v1/chat/completions", json={**body, "stop": [stop, "\x00never"]}).json()
    assert plain["choices"][0]["message"]["content"] == expected
    assert plain["choices"][0]["finish_reason"] == "stop"
    with client.stream(
        "POST", "/v1/chat/completions", json={**body, "stop": stop, "stream": True}
    ) as r:
        chunks = _sse(r)
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == expected
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"


def _direct_logprobs(loaded, ids: list[int], task) -> list[float]:
    """log p(token i | tokens before it) for i >= 1: one unpadded forward of the run's model."""
    with torch.no_grad():
        logits = loaded.model(input_ids=torch.tensor([ids]), task=task).logits[0]
    logp = logits.log_softmax(-1)
    return [float(logp[i - 1, t]) for i, t in enumerate(ids) if i > 0]


@pytest.mark.parametrize("server", ["gated", "routed"])
def test_echo_logprobs_score_the_prompt(server, request):
    """What lm-eval's local-completions sends for loglikelihood: echo, logprobs, and
    max_tokens 1 (it drops the last entry) or 0 (score only)."""
    loaded, _, client = request.getfixturevalue(server)
    ids = loaded.tokenizer("reverse: abc dog", add_special_tokens=False)["input_ids"]
    task = "upper" if loaded.needs_task else None
    model = task or "run"
    want = _direct_logprobs(loaded, ids, task)
    body = {"model": model, "prompt": ids, "echo": True, "logprobs": 1, "max_tokens": 0}
    choice = client.post("/v1/completions", json=body).json()["choices"][0]
    lp = choice["logprobs"]
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    assert lp["token_logprobs"][1:] == pytest.approx(want, abs=1e-4)
    assert "".join(lp["tokens"]) == choice["text"] == loaded.tokenizer.decode(ids)
    assert lp["text_offset"][0] == 0 and lp["text_offset"][-1] == len(choice["text"]) - len(
        lp["tokens"][-1]
    )
    one = client.post("/v1/completions", json={**body, "max_tokens": 1}).json()
    lp1 = one["choices"][0]["logprobs"]
    assert len(lp1["token_logprobs"]) == len(ids) + 1
    assert lp1["token_logprobs"][1 : len(ids)] == pytest.approx(want, abs=1e-4)
    text, tokens = _direct(loaded, ids, task, 1)  # greedy: the new token is the top one
    last = lp1["token_logprobs"][-1]
    assert one["choices"][0]["text"] == loaded.tokenizer.decode(ids) + text
    assert last == pytest.approx(_direct_logprobs(loaded, ids + tokens, task)[-1], abs=1e-4)
    assert last == pytest.approx(max(lp1["top_logprobs"][-1].values()), abs=1e-6)
    assert all(len(t) == 1 for t in lp1["top_logprobs"][1:])


def test_several_prompts_get_one_choice_each(gated):
    loaded, _, client = gated
    prompts = ["upper: abc", "reverse: hgfe dog"]
    body = {"model": "upper", "prompt": prompts, "max_tokens": 5, "logprobs": 2}
    choices = client.post("/v1/completions", json=body).json()["choices"]
    assert [c["index"] for c in choices] == [0, 1]
    for prompt, choice in zip(prompts, choices, strict=True):
        ids = loaded.tokenizer(prompt, add_special_tokens=False)["input_ids"]
        text, tokens = _direct(loaded, ids, "upper", 5)
        assert choice["text"] == text
        lp = choice["logprobs"]  # no echo: the new tokens only
        want = _direct_logprobs(loaded, ids + tokens, "upper")[len(ids) - 1 :]
        assert lp["token_logprobs"] == pytest.approx(want, abs=1e-4)
        assert all(len(t) == 2 for t in lp["top_logprobs"])
        assert lp["text_offset"][0] == len(prompt)
    ids = loaded.tokenizer(prompts[0], add_special_tokens=False)["input_ids"]
    as_ids = client.post("/v1/completions", json={**body, "prompt": [ids]}).json()
    assert as_ids["choices"][0]["text"] == choices[0]["text"]


def test_tokenizer_endpoints(gated):
    loaded, _, client = gated
    info = client.get("/tokenizer_info").json()
    assert info["eos_token"] == "<eos>" and info["pad_token"] == "<pad>"
    ids = client.post("/tokenize", json={"prompt": "the lazy dog"}).json()["tokens"]
    assert ids == loaded.tokenizer("the lazy dog", add_special_tokens=False)["input_ids"]
    assert client.post("/detokenize", json={"tokens": ids}).json()["prompt"] == "the lazy dog"


def test_bad_requests_get_openai_errors(gated, routed):
    _, _, client = gated
    chat = "/v1/chat/completions"
    bad_json = client.post(
        chat, content=b'{"model": "reverse", ', headers={"content-type": "application/json"}
    )
    _error(bad_json, 400, code="invalid_json")
    _error(client.post(chat, json=[1, 2]), 400)  # JSON, but not an object
    unknown = _error(client.post(chat, json={**CHAT, "model": "french"}), 404, "model_not_found")
    assert "reverse" in unknown["message"] and "upper" in unknown["message"]
    by_run = _error(client.post(chat, json={**CHAT, "model": "run"}), 400, param="model")
    assert "reverse" in by_run["message"] and "upper" in by_run["message"]
    for max_tokens in [0, -3, 4096, "many"]:
        r = client.post(chat, json={**CHAT, "model": "reverse", "max_tokens": max_tokens})
        _error(r, 400, param="max_tokens")
    _error(client.post(chat, json={"model": "reverse"}), 400, param="messages")
    _error(client.post(chat, json={"model": "reverse", "messages": []}), 400, param="messages")
    last_assistant = {"model": "reverse", "messages": [{"role": "assistant", "content": "hi"}]}
    _error(client.post(chat, json=last_assistant), 400, param="messages")
    _error(client.post(chat, json={**CHAT}), 400, param="model")
    long = {"model": "upper", "prompt": "the quick brown fox " * 80, "max_tokens": 4}
    _error(client.post("/v1/completions", json=long), 400, "context_length_exceeded", "prompt")
    too_many = {**CHAT, "model": "upper", "max_tokens": 250}  # prompt + 250 > 256 positions
    _error(client.post(chat, json=too_many), 400, "context_length_exceeded", "messages")
    _error(client.post("/v1/completions", json={"model": "upper", "prompt": ""}), 400)
    bad_ids = {"model": "upper", "prompt": [1, 2, 99999], "max_tokens": 2}
    _error(client.post("/v1/completions", json=bad_ids), 400, param="prompt")
    streamed = {"model": "upper", "prompt": ["a", "b"], "stream": True}
    _error(client.post("/v1/completions", json=streamed), 400, param="stream")
    _error(client.post("/v1/completions", json={"model": "upper", "prompt": []}), 400)
    _error(client.get("/v1/nothing"), 404)
    _, _, other = routed
    unknown = _error(other.post(chat, json={**CHAT, "model": "french"}), 404, "model_not_found")
    assert "run" in unknown["message"]
    # and both still serve
    assert client.post(chat, json={**CHAT, "model": "upper"}).status_code == 200
    assert other.post(chat, json={**CHAT, "model": "run"}).status_code == 200


def test_generation_failure_fails_only_that_batch(gated, monkeypatch):
    loaded, app, client = gated
    before = app.state.stats.snapshot()["failed_batches"]

    def broken(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(batching, "generate_batch", broken)
    r = client.post("/v1/chat/completions", json={**CHAT, "model": "upper"})
    assert "boom" in _error(r, 500)["message"]
    streamed = client.post("/v1/chat/completions", json={**CHAT, "model": "upper", "stream": True})
    _error(streamed, 500)
    monkeypatch.undo()
    # an app whose lifespan never ran has no worker: 503 at once, not a hung request
    idle = TestClient(build_app(loaded)).post(
        "/v1/chat/completions", json={**CHAT, "model": "upper"}
    )
    _error(idle, 503)
    assert app.state.stats.snapshot()["failed_batches"] == before + 2
    body = client.post("/v1/chat/completions", json={**CHAT, "model": "upper"}).json()
    text, _ = _direct(loaded, _chat_ids(loaded, CHAT, "upper"), "upper", 12)
    assert body["choices"][0]["message"]["content"] == text


def _requests():
    """Six requests over both tasks, chat and completion, different lengths."""
    out = []
    for i, word in enumerate(["abc", "hgfe", "bad", "cafe", "dd", "gheb"]):
        task, n = TASKS[i % 2], 6 + 3 * i
        if i % 3 == 2:
            body = {"model": task, "prompt": f"{task}: {word}", "max_tokens": n}
            out.append(("/v1/completions", body))
        else:
            messages = [{"role": "user", "content": f"{task}: {word}"}]
            out.append(
                ("/v1/chat/completions", {"model": task, "messages": messages, "max_tokens": n})
            )
    return out


def _answer(body: dict) -> tuple[str, str]:
    choice = body["choices"][0]
    return choice.get("text", choice.get("message", {}).get("content")), choice["finish_reason"]


@pytest.mark.parametrize("server", ["gated", "routed"])
def test_concurrent_requests_are_batched_and_exact(server, request):
    _, app, client = request.getfixturevalue(server)
    requests = _requests()
    alone = [_answer(client.post(path, json=body).json()) for path, body in requests]
    before = app.state.stats.snapshot()

    async def together():
        async with httpx.AsyncClient(base_url=str(client.base_url), timeout=60) as c:
            return await asyncio.gather(*(c.post(path, json=body) for path, body in requests))

    responses = asyncio.run(together())
    assert all(r.status_code == 200 for r in responses)
    assert [_answer(r.json()) for r in responses] == alone
    after = app.state.stats.snapshot()
    assert after["requests"] - before["requests"] == len(requests)
    assert after["batches"] - before["batches"] < len(requests)
    assert max(int(size) for size in after["batch_sizes"]) > 1
    assert client.get("/health").json()["stats"]["requests"] == after["requests"]
